//! The whole precise chain, with nothing stubbed: simulated engines tokenize with the project's
//! test tokenizer and publish their KV-cache events over ZMQ (connecting, by vLLM's rule, to the
//! EPP's central `zmqEndpoint`); the EPP's subscriber feeds the precise index; the EPP's token
//! producer computes the same token ids for a request; `precise-prefix-cache-scorer` routes the
//! request to the engine that holds its prefix.
//!
//! The prefixes are computed by requests sent to the engines directly, around the EPP, and
//! speculative entries are off: the only way the EPP can know where a prefix lives is the
//! engines' events. `POST /reset_prefix_cache` (vLLM's `AllBlocksCleared`) then takes that
//! knowledge away again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use endpoint_picker::datastore::EndpointSpec;
use kv_events::KvEventsConfig;
use kv_events::codec::Encoding;
use serde_json::json;
use sim::ReplicaHandle;
use sim::kv_publish::KvEventsSettings;
use testkit as common;
use tokio::net::TcpListener;

const MODEL: &str = "m";

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tokenize/testdata")
}

fn config(central: &str) -> String {
    format!(
        r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    local:
      tokenizerPath: {}
- type: precise-prefix-cache-scorer
  parameters:
    speculativeIndexing: false
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    kvEventsConfig: {{zmqEndpoint: "{central}", discoverPods: false}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
  - pluginRef: max-score-picker
"#,
        testdata().display()
    )
}

/// A prompt of several hundred tokens (a few dozen 16-token blocks), distinct per `tag`.
fn prompt(tag: &str) -> String {
    (0..120).map(|i| format!("{tag} word{i} ")).collect()
}

/// A simulated engine with the test tokenizer, publishing its events to `central`.
async fn engine(central: &str, encoding: Encoding) -> ReplicaHandle {
    let config = sim::Config {
        model: MODEL.into(),
        tokenizer: sim::tokenizer::Tokenizer::load(&testdata(), None).unwrap(),
        ..sim::Config::fast()
    };
    assert_eq!(
        config.block_size, 16,
        "the EPP's blockSizeTokens must match"
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut replica = sim::spawn_replica(config, listener, 0).await.unwrap();
    let events = KvEventsConfig::from_json(
        &json!({"enable_kv_cache_events": true, "endpoint": central}).to_string(),
    )
    .unwrap();
    replica
        .start_kv_events(
            &KvEventsSettings {
                config: events,
                encoding,
                pod_ip: None,
            },
            0,
        )
        .await
        .unwrap();
    replica
}

fn spec(name: &str, replica: &ReplicaHandle) -> EndpointSpec {
    EndpointSpec {
        name: name.into(),
        pod_name: name.into(),
        address: replica.addr(),
        metrics_address: replica.addr(),
        ..endpoint(1, 1)
    }
}

/// `inference_extension_kv_events_applied_total` for one pod, 0 when absent.
async fn applied(epp: &Epp, pod: &str) -> u64 {
    let text = common::http::get_text(epp.metrics, "/metrics")
        .await
        .unwrap();
    let needle = format!("model_server_pod=\"{pod}\"");
    text.lines()
        .filter(|l| {
            l.starts_with("inference_extension_kv_events_applied_total{") && l.contains(&needle)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Completes `prompt` on `replica` directly (around the EPP).
async fn complete(replica: &ReplicaHandle, prompt: &str) {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}).to_string();
    let resp = common::http::post(replica.addr(), "/v1/completions", &[], body.into_bytes()).await;
    assert_eq!(resp.status(), 200);
    common::http::body_text(resp).await;
}

/// Waits (bounded) until the EPP has applied more than `above` events from `pod`, sending
/// throwaway prompts meanwhile when `prime`: a ZMQ PUB socket that is still connecting drops
/// what it publishes, so the first events may be lost.
async fn until_applied(
    epp: &Epp,
    replica: &ReplicaHandle,
    pod: &str,
    above: u64,
    prime: bool,
) -> u64 {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut n = 0;
    loop {
        let now = applied(epp, pod).await;
        if now > above {
            return now;
        }
        if tokio::time::Instant::now() >= deadline {
            // What the EPP saw of the engines' streams, for the failure to speak.
            let text = common::http::get_text(epp.metrics, "/metrics")
                .await
                .unwrap_or_default();
            let kv: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("inference_extension_kv_"))
                .collect();
            panic!(
                "{pod}: no KV events applied past {above} within {TIMEOUT:?}; the EPP's KV-event metrics:\n{}",
                kv.join("\n")
            );
        }
        if prime {
            complete(replica, &prompt(&format!("prime-{pod}-{n}"))).await;
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Routes a completion of `prompt` through the EPP; returns the chosen destination.
async fn route(epp: &Epp, prompt: &str) -> String {
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(
        &[(":path", "/v1/completions"), (":method", "POST")],
        false,
        None,
    ))
    .await;
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}).to_string();
    s.send(req_body(body.as_bytes(), true)).await;
    routing_answer(&s.recv().await).destination().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_events_route_a_prefix_to_the_engine_that_holds_it() {
    // The EPP binds the central socket, after the engines start dialing it: a port from
    // below the ephemeral range, which no port-0 listener and no outgoing connection (the
    // engines' own dials included) can take in between.
    let central = format!("tcp://127.0.0.1:{}", common::ports::free_port().unwrap());
    // One engine per vLLM encoding: the subscriber reads both.
    let a = engine(&central, Encoding::Array).await;
    let b = engine(&central, Encoding::Map).await;
    let epp = start_epp(
        pool(vec![spec("engine-a", &a), spec("engine-b", &b)]),
        EppOptions {
            config: config(&central),
            ..EppOptions::default()
        },
    )
    .await;

    // Both streams live: each engine's events reach the index.
    let seen_a = until_applied(&epp, &a, "engine-a", 0, true).await;
    let mut seen_b = until_applied(&epp, &b, "engine-b", 0, true).await;

    // Each engine computes one long prefix, around the EPP.
    let (on_a, on_b) = (prompt("alpha"), prompt("bravo"));
    complete(&a, &on_a).await;
    complete(&b, &on_b).await;
    until_applied(&epp, &a, "engine-a", seen_a, false).await;
    seen_b = until_applied(&epp, &b, "engine-b", seen_b, false).await;

    // The index's size gauges follow the events (they were refreshed only on pool changes).
    let text = common::http::get_text(epp.metrics, "/metrics")
        .await
        .unwrap();
    let gauge = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(gauge("inference_extension_kv_index_blocks") > 0, "{text}");
    assert!(gauge("inference_extension_kv_index_entries") > 0, "{text}");

    // The same prompts, extended, through the EPP: each goes where its prefix is, every time
    // (with no hit the picker would choose at random between two).
    let (addr_a, addr_b) = (a.addr().to_string(), b.addr().to_string());
    for turn in 0..8 {
        assert_eq!(route(&epp, &format!("{on_a} turn {turn}")).await, addr_a);
        assert_eq!(route(&epp, &format!("{on_b} turn {turn}")).await, addr_b);
    }

    // Routing added nothing to the index (speculative entries are off): engine B clears its
    // cache, the EPP hears `AllBlocksCleared`, and B's prefix is no longer a reason to go there.
    let resp = common::http::post(b.addr(), "/reset_prefix_cache", &[], Vec::new()).await;
    assert_eq!(resp.status(), 200);
    until_applied(&epp, &b, "engine-b", seen_b, false).await;
    // With no hit anywhere the picker chooses at random between the two: both are chosen.
    let mut dests = std::collections::BTreeSet::new();
    for turn in 0..24 {
        dests.insert(route(&epp, &format!("{on_b} again {turn}")).await);
    }
    assert_eq!(
        dests.len(),
        2,
        "after AllBlocksCleared B's old prefix must not attract: {dests:?}"
    );
    // A kept its prefix.
    assert_eq!(route(&epp, &format!("{on_a} last")).await, addr_a);

    drop(epp);
    a.shutdown().await;
    b.shutdown().await;
}
