//! Tests of `precise-prefix-cache-scorer`: its parameters, its scores, its fallback.

use std::sync::Arc;

use bytes::Bytes;
use kv_events::{BlockStored, Event, EventBatch, Medium};
use tokio::time::Instant;

use super::*;
use crate::config::load;
use crate::kv_index::StreamState;
use crate::scheduling::plugins::prefix::{ApproxPrefixCacheProducer, PrefixParams};
use crate::scheduling::plugins::test_util::{build_from_yaml, candidates, metrics};

fn params(yaml: &str) -> Result<(PreciseParams, Vec<String>), ConfigError> {
    build_from_yaml(
        "precise-prefix-cache-scorer",
        yaml,
        PreciseParams::from_params,
    )
}

#[test]
fn llm_d_parameters_are_read() {
    let (p, warnings) = params(
        r#"
tokenProcessorConfig: {blockSizeTokens: 64, hashSeed: "42", hashAlgorithm: xxh64}
indexerConfig:
  kvBlockIndexConfig: {enableMetrics: true, inMemoryConfig: {size: 1000, podCacheSize: 3}}
  kvCacheBackendConfigs: [{name: gpu, weight: 1.0}, {name: cpu, weight: 0.5}]
kvEventsConfig:
  zmqEndpoint: "tcp://*:5557"
  topicFilter: "kv@"
  engineType: vllm
  discoverPods: false
  podDiscoveryConfig: {socketPort: 6000, replaySocketPort: 6001}
  maxBlocksPerSecond: 5000
speculativeIndexing: true
speculativeTTL: 500ms
"#,
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(p.block_size, 64);
    assert_eq!(p.hash_seed, "42");
    assert_eq!(p.hash_algorithm, HashAlgorithm::Xxh64);
    assert_eq!(
        (p.limits.max_keys, p.limits.max_endpoints_per_key),
        (1000, 3)
    );
    assert_eq!(p.weights.0, [1.0, 0.5, 1.0, 1.0]);
    assert!(p.speculative_indexing);
    assert_eq!(p.limits.speculative_ttl, Duration::from_millis(500));
    assert_eq!(
        p.events,
        KvEventsSettings {
            bind_endpoint: Some("tcp://*:5557".into()),
            per_endpoint: false,
            socket_port: 6000,
            replay_port: Some(6001),
            topic_filter: "kv@".into(),
            max_blocks_per_second: 5000,
        }
    );
    let (uncapped, _) = params("kvEventsConfig: {maxBlocksPerSecond: 0}").unwrap();
    assert_eq!(uncapped.events.max_blocks_per_second, 0);
    // The defaults are llm-d's.
    let (d, _) = params("{}").unwrap();
    assert_eq!(d, PreciseParams::default());
    assert_eq!(d.block_size, 16);
    assert_eq!(d.limits.speculative_ttl, Duration::from_secs(2));
    assert_eq!(d.weights.0[..2], [1.0, 0.8]);
    // v0.3 configs nest the token processor in the indexer, and say `blockSize`.
    let (v03, _) =
        params("indexerConfig: {tokenProcessorConfig: {blockSize: 32, hashSeed: '7'}}").unwrap();
    assert_eq!((v03.block_size, v03.hash_seed.as_str()), (32, "7"));
    // An interval left empty, zero or unset is no periodic logging, which is what this does.
    for interval in ["\"\"", "0", "0s", "null"] {
        params(&format!(
            "indexerConfig: {{kvBlockIndexConfig: {{metricsLoggingInterval: {interval}}}}}"
        ))
        .unwrap();
    }
}

#[test]
fn what_cannot_be_honoured_is_an_error_naming_it() {
    for (yaml, parameter) in [
        (
            "tokenProcessorConfig: {blockSizeTokens: 0}",
            "blockSizeTokens",
        ),
        (
            "tokenProcessorConfig: {hashAlgorithm: sha256}",
            "hashAlgorithm",
        ),
        (
            "indexerConfig: {tokenizersPoolConfig: {modelName: x}}",
            "tokenizersPoolConfig",
        ),
        (
            "indexerConfig: {kvBlockIndexConfig: {redisConfig: {address: x}}}",
            "kvBlockIndexConfig",
        ),
        (
            "indexerConfig: {kvBlockIndexConfig: {metricsLoggingInterval: 10s}}",
            "metricsLoggingInterval",
        ),
        (
            "indexerConfig: {kvBlockIndexConfig: {inMemoryConfig: {size: -1}}}",
            "size",
        ),
        (
            "indexerConfig: {kvCacheBackendConfigs: [{name: tape, weight: 1}]}",
            "kvCacheBackendConfigs",
        ),
        (
            "indexerConfig: {kvCacheBackendConfigs: [{name: cpu, weight: 2}]}",
            "kvCacheBackendConfigs",
        ),
        ("kvEventsConfig: {engineType: trtllm}", "engineType"),
        (
            "kvEventsConfig: {maxBlocksPerSecond: 999}",
            "maxBlocksPerSecond",
        ),
        (
            "kvEventsConfig: {maxBlocksPerSecond: -1}",
            "maxBlocksPerSecond",
        ),
        (
            "kvEventsConfig: {maxBlocksPerSecond: 1000000001}",
            "maxBlocksPerSecond",
        ),
        (
            "kvEventsConfig: {podDiscoveryConfig: {socketPort: 70000}}",
            "socketPort",
        ),
        ("speculativeTTL: soon", "speculativeTTL"),
        (
            "{speculativeIndexing: true, speculativePeers: [\"10.0.0.1:5570\"]}",
            "speculativePeers",
        ),
        (
            "{speculativeIndexing: true, speculativePeers: [\"tcp://*:5570\"]}",
            "speculativePeers",
        ),
        (
            "{speculativeIndexing: true, speculativePeers: [\"tcp://a:1\", \"tcp://a:1\"]}",
            "speculativePeers",
        ),
        (
            "{speculativeIndexing: true, speculativePublishEndpoint: \"tcp://*:0\"}",
            "speculativePublishEndpoint",
        ),
        // Sharing speculative entries needs them.
        (
            "{speculativePeers: [\"tcp://epp-1:5570\"]}",
            "speculativeIndexing",
        ),
    ] {
        let err = params(yaml).unwrap_err().to_string();
        assert!(err.contains(parameter), "{yaml}: {err}");
    }
    // What llm-d itself ignores, or this EPP does otherwise, is a warning.
    let (_, warnings) = params(
        "{kvEventsConfig: {concurrency: 8, podDiscoveryConfig: {podLabelSelector: a=b}}, typo: 1}",
    )
    .unwrap();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
}

const BS: usize = 4;

fn stored(seq: u32, blocks: u32) -> EventBatch {
    let tokens: Vec<u32> = (0..blocks * BS as u32).map(|t| seq * 1000 + t).collect();
    EventBatch {
        ts: 0.0,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: (0..blocks)
                .map(|b| u64::from(seq) * 100 + u64::from(b))
                .collect(),
            parent_block_hash: None,
            token_ids: tokens,
            block_size: BS as u32,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
            group: None,
        })],
        data_parallel_rank: None,
    }
}

fn request(seq: u32, blocks: u32, prompt: &str) -> InferenceRequest {
    let tokens: Vec<u32> = (0..blocks * BS as u32).map(|t| seq * 1000 + t).collect();
    InferenceRequest {
        target_model: "m".into(),
        prompt: Bytes::from(prompt.to_owned()),
        token_ids: Some(Arc::from(tokens)),
        ..Default::default()
    }
}

fn scorer(speculative: bool) -> PrecisePrefixCacheScorer {
    let params = PreciseParams {
        block_size: BS,
        speculative_indexing: speculative,
        ..PreciseParams::default()
    };
    PrecisePrefixCacheScorer {
        name: "p".into(),
        producer: Arc::new(PrecisePrefixCacheProducer::new("p", params)),
    }
}

fn scores(
    s: &PrecisePrefixCacheScorer,
    approx: &ApproxPrefixCacheProducer,
    req: &InferenceRequest,
    c: &[Candidate],
) -> (Vec<f64>, CycleState) {
    let mut state = CycleState::new(Instant::now());
    approx.produce(req, c, &mut state);
    s.producer.produce(req, c, &mut state);
    let mut out = vec![0.0; c.len()];
    s.score(req, &state, c, &mut out);
    (out, state)
}

#[test]
fn healthy_endpoints_are_scored_from_events_the_others_from_routing_history() {
    let s = scorer(false);
    let approx = ApproxPrefixCacheProducer::new("a", PrefixParams::default());
    let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
    let index = s.producer.index();
    let now = Instant::now();
    // Endpoint 0's events say it holds 3 of the request's 4 blocks; endpoint 1 holds them all
    // but its stream is down; endpoint 2 never connected.
    index.set_stream(c[0].endpoint.id, StreamState::Live);
    index.apply(c[0].endpoint.id, "m", &stored(1, 3), now);
    index.set_stream(c[1].endpoint.id, StreamState::Down { since: now });
    index.apply(c[1].endpoint.id, "m", &stored(1, 4), now);
    // The approximate index was told endpoint 2 got this prompt.
    let prompt = "x".repeat(64 * 4);
    let req = request(1, 4, &prompt);
    let mut state = CycleState::new(now);
    approx.produce(&req, &c, &mut state);
    approx.pre_request(&req, &state, &c[2..]);

    let (s1, state) = scores(&s, &approx, &req, &c);
    assert_eq!(s1, vec![0.75, 0.0, 1.0]);
    assert_eq!(state.cached_tokens(&c[0].endpoint), 12);
    // Four 16-token blocks of the approximate index.
    assert_eq!(state.cached_tokens(&c[2].endpoint), 64);
    let m = state.precise.as_ref().unwrap();
    assert_eq!(m.cached_tokens_by_tier(&c[0].endpoint), Some([12, 0, 0, 0]));
    assert_eq!(m.cached_tokens_by_tier(&c[1].endpoint), None);

    // Once endpoint 1's stream is live again its events count.
    index.set_stream(c[1].endpoint.id, StreamState::Live);
    let (s2, _) = scores(&s, &approx, &req, &c);
    assert_eq!(s2, vec![0.75, 1.0, 1.0]);

    // Without token ids nothing can be looked up: every endpoint falls back.
    let no_tokens = InferenceRequest {
        token_ids: None,
        ..req
    };
    let (s3, state) = scores(&s, &approx, &no_tokens, &c);
    assert_eq!(s3, vec![0.0, 0.0, 1.0]);
    assert!(state.precise.is_none());
}

#[test]
fn peers_are_read() {
    let (p, warnings) = params(
        r#"{speculativeIndexing: true, speculativePublishEndpoint: "tcp://*:5570",
            speculativePeers: ["tcp://epp-1.epp:5570", "tcp://10.0.0.3:5570"]}"#,
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(p.publish_endpoint.as_deref(), Some("tcp://*:5570"));
    assert_eq!(p.peers, vec!["tcp://epp-1.epp:5570", "tcp://10.0.0.3:5570"]);
    let (d, _) = params("{}").unwrap();
    assert!(d.publish_endpoint.is_none() && d.peers.is_empty());
}

/// With a publish endpoint, each routed request's keys and endpoint go to the outbox too.
#[tokio::test(start_paused = true)]
async fn a_routed_request_is_offered_to_the_peers() {
    let mut s = scorer(true);
    let mut params = s.producer.params.clone();
    params.publish_endpoint = Some("tcp://*:5570".into());
    s.producer = Arc::new(PrecisePrefixCacheProducer::new("p", params));
    let approx = ApproxPrefixCacheProducer::new("a", PrefixParams::default());
    let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
    let mut rx = s.producer.peer_outbox().attach();
    let req = request(1, 4, "");
    let (_, state) = scores(&s, &approx, &req, &c);
    s.producer.pre_request(&req, &state, &c[1..]);
    let m = rx.try_recv().unwrap();
    assert_eq!(m.endpoint, c[1].endpoint.spec.address);
    assert_eq!(m.keys, state.precise.as_ref().unwrap().keys);
    assert!(rx.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn speculative_indexing_covers_the_event_lag() {
    for speculative in [false, true] {
        let s = scorer(speculative);
        let approx = ApproxPrefixCacheProducer::new("a", PrefixParams::default());
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        for e in &c {
            s.producer
                .index()
                .set_stream(e.endpoint.id, StreamState::Live);
        }
        let req = request(1, 4, "");
        let (_, state) = scores(&s, &approx, &req, &c);
        s.producer.pre_request(&req, &state, &c[1..]);
        let (after, _) = scores(&s, &approx, &req, &c);
        let expected = if speculative { 1.0 } else { 0.0 };
        assert_eq!(after, vec![0.0, expected], "speculative {speculative}");
        tokio::time::advance(Duration::from_secs(2)).await;
        let (expired, _) = scores(&s, &approx, &req, &c);
        assert_eq!(expired, vec![0.0, 0.0]);
    }
}

#[test]
fn the_loader_builds_the_scorer_with_its_fallback_and_the_cost_model_reads_it() {
    let c = load(
        r#"
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {speculativeIndexing: true, kvEventsConfig: {zmqEndpoint: "tcp://*:5557"}}
- type: ttft-cost-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: precise-prefix-cache-scorer, weight: 3}, {pluginRef: ttft-cost-scorer}]
"#,
        1,
    )
    .unwrap();
    assert_eq!(c.precise_producers.len(), 1);
    assert_eq!(
        c.prefix_producers.len(),
        1,
        "the approximate fallback is made"
    );
    let order = c.scheduler.producer_types();
    assert_eq!(
        order,
        vec![
            "approx-prefix-cache-producer",
            "precise-prefix-cache-scorer",
            "ttft-cost-producer"
        ]
    );
    assert!(c.precise_producers[0].params.speculative_indexing);
}

#[test]
fn shared_media_are_a_parameter_with_remote_by_default() {
    use crate::kv_index::SharedMedia;
    let (d, _) = params("{}").unwrap();
    assert_eq!(d.shared, SharedMedia::default());
    assert!(d.shared.contains(Medium::Remote) && !d.shared.contains(Medium::Cpu));
    let (p, _) = params("{sharedMedia: [remote, disk]}").unwrap();
    assert!(p.shared.contains(Medium::Disk) && p.shared.contains(Medium::Remote));
    let (none, _) = params("{sharedMedia: []}").unwrap();
    assert_eq!(none.shared, SharedMedia::NONE);
    for bad in ["{sharedMedia: [gpu]}", "{sharedMedia: [tape]}"] {
        let err = params(bad).unwrap_err().to_string();
        assert!(err.contains("sharedMedia"), "{bad}: {err}");
    }
}

/// A block one endpoint wrote to the shared store is a hit for every endpoint, in the tier
/// the cost model charges the store's bandwidth for.
#[test]
fn the_store_written_by_one_endpoint_serves_all_of_them() {
    let s = scorer(false);
    let approx = ApproxPrefixCacheProducer::new("a", PrefixParams::default());
    let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
    let index = s.producer.index();
    let now = Instant::now();
    for e in &c {
        index.set_stream(e.endpoint.id, StreamState::Live);
    }
    index.apply(c[0].endpoint.id, "m", &stored(1, 4), now);
    let mut remote = stored(1, 4);
    if let Event::BlockStored(b) = &mut remote.events[0] {
        b.token_ids.clear();
        b.medium = Medium::Remote;
    }
    index.apply(c[0].endpoint.id, "m", &remote, now);
    let req = request(1, 4, "");
    let (scores, state) = scores(&s, &approx, &req, &c);
    assert_eq!(scores, vec![1.0, 1.0]);
    let t0 = state.tier_tokens(&c[0].endpoint);
    let t1 = state.tier_tokens(&c[1].endpoint);
    assert_eq!((t0.gpu, t0.shared), (16, 0));
    assert_eq!((t1.gpu, t1.shared), (0, 16));
    let m = state.precise.as_ref().unwrap();
    assert_eq!(m.cached_tokens_by_tier(&c[1].endpoint), Some([0, 0, 0, 16]));
    assert_eq!(m.source_tokens(&c[1].endpoint), 0, "the store is no peer");
    assert_eq!(m.source_tokens(&c[0].endpoint), 16);
}

/// Review (M1): any engine could say a block is in the shared store and every candidate got
/// the hit, even from an engine whose own stream was down or never heard. Only an endpoint
/// whose stream is trusted vouches for the store now.
#[test]
fn only_an_endpoint_with_a_trusted_stream_vouches_for_the_store() {
    let s = scorer(false);
    let approx = ApproxPrefixCacheProducer::new("a", PrefixParams::default());
    let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
    let index = s.producer.index();
    let now = Instant::now();
    index.set_stream(c[1].endpoint.id, StreamState::Live);
    // Endpoint 0 announces the store holds the prompt, its stream down.
    index.set_stream(c[0].endpoint.id, StreamState::Down { since: now });
    let mut remote = stored(1, 4);
    if let Event::BlockStored(b) = &mut remote.events[0] {
        b.medium = Medium::Remote;
    }
    index.apply(c[0].endpoint.id, "m", &remote, now);
    let req = request(1, 4, "");
    let (_, state) = scores(&s, &approx, &req, &c);
    assert_eq!(state.tier_tokens(&c[1].endpoint).shared, 0, "not believed");
    // Its stream trusted again, the store counts for the other endpoint.
    index.set_stream(c[0].endpoint.id, StreamState::Live);
    let (_, state) = scores(&s, &approx, &req, &c);
    assert_eq!(state.tier_tokens(&c[1].endpoint).shared, 16);
}
