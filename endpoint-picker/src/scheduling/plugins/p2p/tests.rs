//! Tests of `p2p-source-producer`: its parameters, its choice of source, its header, and its
//! agreement with the cost model.

use std::sync::Arc;

use bytes::Bytes;
use kv_events::{BlockStored, Event, EventBatch, Medium};
use tokio::time::Instant;

use super::*;
use crate::config::load;
use crate::kv_index::StreamState;
use crate::scheduling::plugins::test_util::{build_from_yaml, candidates, metrics};
use crate::scheduling::{INTERNAL_REQUEST_HEADERS, ScoredCandidate};

fn params(yaml: &str) -> Result<(P2pSourceProducer, Vec<String>), ConfigError> {
    build_from_yaml("p2p-source-producer", yaml, P2pSourceProducer::from_params)
}

#[test]
fn llm_d_parameters_are_read() {
    let (p, warnings) = params(
        "{minCachedTokenDelta: 2048, prefillProfileName: pre, prefixMatchInfoProducerName: x}",
    )
    .unwrap();
    assert_eq!(
        (p.min_delta_tokens, p.prefill_profile.as_str()),
        (2048, "pre")
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let (d, warnings) = params("{}").unwrap();
    assert!(warnings.is_empty());
    assert_eq!(
        (d.min_delta_tokens, d.prefill_profile.as_str()),
        (1, "prefill")
    );
    for bad in ["{minCachedTokenDelta: 0}", "{minCachedTokenDelta: -5}"] {
        let err = params(bad).unwrap_err().to_string();
        assert!(err.contains("minCachedTokenDelta"), "{bad}: {err}");
    }
}

const BS: u32 = 4;

/// Sequence `seq`'s blocks `0..blocks` stored in `medium` (GPU: with tokens; other media:
/// copies of blocks the GPU announced first, by hash).
fn stored(seq: u32, blocks: u32, medium: Medium) -> EventBatch {
    let token_ids = if medium == Medium::Gpu {
        (0..blocks * BS).map(|t| seq * 1000 + t).collect()
    } else {
        Vec::new()
    };
    EventBatch {
        ts: 0.0,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: (0..blocks)
                .map(|b| u64::from(seq) * 100 + u64::from(b))
                .collect(),
            parent_block_hash: None,
            token_ids,
            block_size: BS,
            lora_id: None,
            lora_name: None,
            medium,
            group: None,
        })],
        data_parallel_rank: None,
    }
}

fn request(seq: u32, blocks: u32, id: &str) -> InferenceRequest {
    let tokens: Vec<u32> = (0..blocks * BS).map(|t| seq * 1000 + t).collect();
    InferenceRequest {
        request_id: id.into(),
        target_model: "m".into(),
        prompt: Bytes::from("x".repeat(tokens.len() * 4)),
        token_ids: Some(Arc::from(tokens)),
        max_tokens: Some(1),
        ..Default::default()
    }
}

/// A profile with the precise scorer, the cost model and the producer: the loader orders the
/// producers so that the cost model reads the peer sources.
const CONFIG: &str = r#"
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {tokenProcessorConfig: {blockSizeTokens: 4}}
- type: ttft-cost-scorer
- type: p2p-source-producer
  parameters: {minCachedTokenDelta: 8}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: ttft-cost-scorer}]
"#;

#[test]
fn the_loader_runs_it_between_the_prefix_match_and_the_cost_model() {
    let c = load(CONFIG, 1).unwrap();
    let order = c.scheduler.producer_types();
    assert_eq!(
        order,
        vec![
            "approx-prefix-cache-producer",
            "precise-prefix-cache-scorer",
            "p2p-source-producer",
            "ttft-cost-producer"
        ]
    );
    // Alone, it gets the approximate prefix producer it reads.
    let alone = load(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
         - type: p2p-source-producer\n- type: queue-scorer\n",
        1,
    )
    .unwrap();
    assert_eq!(alone.prefix_producers.len(), 1);
}

/// The approximate index's match of a 12-block request (16 tokens a block): `(candidate,
/// leading blocks)` for the candidates this EPP routed the prefix to.
fn routing_history(cands: &[Candidate], held: &[(usize, u32)]) -> crate::scheduling::PrefixMatch {
    let mut matched = vec![0; 4];
    for &(i, blocks) in held {
        matched[cands[i].endpoint.id.0 as usize] = blocks;
    }
    crate::scheduling::PrefixMatch {
        hashes: vec![0; 12],
        matched,
        block_tokens: 16,
        tokens_through: Vec::new(),
    }
}

/// One full cycle through the loaded scheduler: produce, schedule, headers.
fn cycle(
    c: &crate::config::LoadedConfig,
    cands: &[Candidate],
    req: &InferenceRequest,
) -> (CycleState, SchedulingResult, Vec<(&'static str, String)>) {
    let mut state = CycleState::new(Instant::now());
    c.scheduler.produce(req, cands, &mut state);
    let result = c.scheduler.schedule(req, &state, cands, false).unwrap();
    let headers = c.scheduler.request_headers(req, &state, &result);
    (state, result, headers)
}

/// The holder of a long prefix is busy: the cost model sends the request to an idle endpoint
/// and counts the pull, and the header names the holder, as the pool lists it.
#[tokio::test(start_paused = true)]
async fn the_chosen_endpoint_pulls_from_the_holder_when_the_cost_model_counted_it() {
    let c = load(CONFIG, 1).unwrap();
    let cands = candidates(&[
        metrics(40, 200, 0.5),
        metrics(0, 0, 0.0),
        metrics(0, 0, 0.0),
    ]);
    let index = c.precise_producers[0].index();
    let now = Instant::now();
    for e in &cands {
        index.set_stream(e.endpoint.id, StreamState::Live);
    }
    // Endpoint 0 holds 500 blocks of the 512-block prompt: 100 on its GPU, all of them in
    // its CPU tier; endpoint 2 holds the first 10 blocks.
    index.apply(cands[0].endpoint.id, "m", &stored(1, 500, Medium::Gpu), now);
    index.apply(cands[0].endpoint.id, "m", &stored(1, 500, Medium::Cpu), now);
    index.apply(cands[2].endpoint.id, "m", &stored(1, 10, Medium::Gpu), now);
    let req = request(1, 512, "r-1");
    let (state, result, headers) = cycle(&c, &cands, &req);
    let target = &result.primary_targets()[0].candidate.endpoint;
    assert_ne!(target.id, cands[0].endpoint.id, "the busy holder loses");
    assert_eq!(
        headers,
        vec![(KV_CACHE_SOURCE_HEADER, "10.0.0.1:8000".to_owned())]
    );
    let cost = state.costs.as_ref().unwrap().of(target).unwrap();
    assert_eq!(cost.peer, Some(cands[0].endpoint.id));
    assert!(cost.load_seconds > 0.0);
    // The sources: the holder, and endpoint 2 after it.
    let sources = state.p2p.as_ref().unwrap();
    assert_eq!(sources.best.as_ref().unwrap().1, 2000);
    assert_eq!(sources.second.as_ref().unwrap().1, 40);
    assert!(INTERNAL_REQUEST_HEADERS.contains(&KV_CACHE_SOURCE_HEADER));

    // A prompt the target mostly holds itself: the peer's extra blocks are under the delta.
    index.apply(target.id, "m", &stored(1, 499, Medium::Gpu), now);
    let (state, result, headers) = cycle(&c, &cands, &req);
    assert_eq!(result.primary_targets()[0].candidate.endpoint.id, target.id);
    assert!(headers.is_empty(), "{headers:?}");
    let cost = state.costs.as_ref().unwrap();
    assert_eq!(cost.of(target).unwrap().peer, None);
}

/// Without a cost model, llm-d's rule: the header when the source out-caches the target by
/// the delta; never the target itself; the prefill profile's target under P/D.
#[test]
fn without_a_cost_model_the_delta_decides() {
    let cands = candidates(&[metrics(0, 0, 0.0), metrics(3, 0, 0.0), metrics(0, 0, 0.0)]);
    let p = P2pSourceProducer {
        min_delta_tokens: 16,
        ..P2pSourceProducer::default()
    };
    let mut state = CycleState::new(Instant::now());
    state.prefix = Some(routing_history(&cands, &[(0, 10), (1, 9)]));
    let req = request(1, 1, "r");
    p.produce(&req, &cands, &mut state);
    let result = |profile: &str, i: usize| SchedulingResult {
        primary: "decode".into(),
        results: vec![crate::scheduling::ProfileResult {
            profile: profile.into(),
            targets: vec![ScoredCandidate {
                candidate: cands[i].clone(),
                score: 1.0,
            }],
            explanation: None,
        }],
    };
    let headers = |r: &SchedulingResult| {
        let mut h = Vec::new();
        p.request_headers(&req, &state, r, &mut h);
        h
    };
    // Endpoint 2 holds nothing: 160 tokens to pull from 0 or 1 (both in the one-block band).
    let h = headers(&result("decode", 2));
    assert_eq!(h.len(), 1);
    assert!(
        ["10.0.0.1:8000", "10.0.0.2:8000"].contains(&h[0].1.as_str()),
        "{h:?}"
    );
    // Endpoint 0 holds the most: no other source has more, and never the target itself.
    assert!(headers(&result("decode", 0)).is_empty());
    // Endpoint 1 holds 144 tokens: 16 more at endpoint 0 is exactly the delta.
    let h = headers(&result("decode", 1));
    assert_eq!(
        h,
        vec![(KV_CACHE_SOURCE_HEADER, "10.0.0.1:8000".to_owned())]
    );
    // Under P/D the prefill target computes the prefix.
    let mut pd = result("decode", 0);
    pd.results.push(result("prefill", 2).results.remove(0));
    assert_eq!(headers(&pd).len(), 1);
}

/// The draw spreads the pulls of a widely held prefix over its holders, favouring short
/// queues, and is the same for the same request id.
#[test]
fn sources_in_the_one_block_band_share_the_pulls_by_queue() {
    let cands = candidates(&[metrics(0, 0, 0.0), metrics(3, 0, 0.0), metrics(0, 0, 0.0)]);
    let p = P2pSourceProducer::default();
    let prefix = routing_history(&cands, &[(0, 10), (1, 9), (2, 3)]);
    let mut picks = [0u32; 3];
    for i in 0..1000 {
        let mut state = CycleState::new(Instant::now());
        state.prefix = Some(prefix.clone());
        let req = request(1, 1, &format!("req-{i}"));
        p.produce(&req, &cands, &mut state);
        let sources = state.p2p.as_ref().unwrap();
        let (best, _) = sources.best.as_ref().unwrap();
        let idx = cands.iter().position(|c| c.endpoint.id == best.id).unwrap();
        picks[idx] += 1;
        let mut again = CycleState::new(Instant::now());
        again.prefix = Some(prefix.clone());
        p.produce(&req, &cands, &mut again);
        assert_eq!(
            again.p2p.unwrap().best.unwrap().0.id,
            best.id,
            "deterministic"
        );
    }
    // Weights 1 and 1/4: about 800 and 200; endpoint 2 is out of the band.
    assert_eq!(picks[2], 0);
    assert!((700..900).contains(&picks[0]), "{picks:?}");
}

/// Review 14 (finding 6): where the precise index looked the request up, an endpoint whose
/// event stream is not trusted (never heard from, down, in a gap's fallback) was a source by
/// the approximate index's count, i.e. by this EPP's own routing history: a request routed
/// there 5 ms earlier made it the pull source of the next one, for blocks it had not computed.
/// It is no source now; without the precise index the approximate one still decides.
#[test]
fn an_untrusted_endpoint_is_never_a_pull_source_when_the_precise_index_looked() {
    use crate::kv_index::Lookup;
    use crate::scheduling::plugins::precise::PreciseMatch;

    let cands = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
    let p = P2pSourceProducer::default();
    // Routing history: endpoint 0 took this prefix (10 blocks of 16 tokens).
    let prefix = routing_history(&cands, &[(0, 10)]);
    // The precise index looked the request up; no candidate's stream is trusted yet.
    let precise = PreciseMatch {
        keys: vec![0; 12],
        lookup: Lookup::default(),
        trusted: vec![false; 4],
        block_tokens: 16,
    };
    let req = request(1, 1, "r");
    let mut state = CycleState::new(Instant::now());
    state.prefix = Some(prefix.clone());
    state.precise = Some(precise);
    p.produce(&req, &cands, &mut state);
    let sources = state.p2p.as_ref().unwrap();
    assert!(
        sources.best.is_none() && sources.second.is_none(),
        "{sources:?}"
    );

    // Without the precise index, routing history is all there is, as before.
    let mut state = CycleState::new(Instant::now());
    state.prefix = Some(prefix);
    p.produce(&req, &cands, &mut state);
    let sources = state.p2p.as_ref().unwrap();
    let (best, tokens) = sources.best.as_ref().unwrap();
    assert_eq!((best.id, *tokens), (cands[0].endpoint.id, 160));
}
