//! The simulator's KV events on the wire: a replica publishes over ZMQ (connecting, by vLLM's
//! rule, to a central-mode kv-events subscriber bound on loopback), the subscriber decodes the
//! batches, and vLLM's own structs in msgspec (tools/kv-events/vllm_kv_events.py) decode the
//! saved payloads to the same meaning, in both encodings. `POST /reset_prefix_cache` publishes
//! `AllBlocksCleared`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../kv-events/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kv_events::codec::Encoding;
use kv_events::transport::{ReceivedBatch, Subscriber, SubscriberConfig};
use kv_events::{Event, KvEventsConfig, Medium};
use serde_json::json;
use sim::kv_publish::KvEventsSettings;
use sim::{Config, ReplicaHandle};
use support::msgspec::{neutral, script, temp_dir};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn post(
    c: &HttpClient,
    r: &ReplicaHandle,
    path: &str,
    body: serde_json::Value,
) -> StatusCode {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}{path}", r.url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

/// A prompt of a few hundred tokens, distinct per `n`.
fn prompt(n: usize) -> String {
    (0..120).map(|i| format!("w{n}x{i} ")).collect()
}

struct Setup {
    replica: ReplicaHandle,
    rx: mpsc::Receiver<ReceivedBatch>,
    cancel: CancellationToken,
    client: HttpClient,
}

async fn setup(encoding: Encoding) -> Setup {
    setup_with(encoding, Config::fast()).await
}

async fn setup_with(encoding: Encoding, sim_config: Config) -> Setup {
    let sub = Subscriber::bind(SubscriberConfig::bind("tcp://127.0.0.1:0"))
        .await
        .unwrap();
    let central = sub.local_endpoint().unwrap().to_owned();
    let (tx, rx) = mpsc::channel(1024);
    let cancel = CancellationToken::new();
    tokio::spawn(sub.run(tx, cancel.clone()));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut replica = sim::spawn_replica(sim_config, listener, 0).await.unwrap();
    // No `*`: the PUB socket connects to the central subscriber, as vLLM's would.
    let config = KvEventsConfig::from_json(
        &json!({
            "enable_kv_cache_events": true,
            "endpoint": central,
            "replay_endpoint": "tcp://127.0.0.1:0",
        })
        .to_string(),
    )
    .unwrap();
    let settings = KvEventsSettings {
        config,
        encoding,
        pod_ip: None,
    };
    let publishing = replica.start_kv_events(&settings, 0).await.unwrap();
    assert!(publishing.replay_endpoint().is_some());
    Setup {
        replica,
        rx,
        cancel,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

/// Sends requests until a batch arrives (the PUB socket connects in the background and drops
/// what it publishes before).
async fn first_batch(s: &mut Setup) -> ReceivedBatch {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    loop {
        let body = json!({"model": Config::fast().model, "prompt": prompt(n), "max_tokens": 2});
        assert_eq!(
            post(&s.client, &s.replica, "/v1/completions", body).await,
            StatusCode::OK
        );
        n += 1;
        if let Ok(Some(r)) = timeout(Duration::from_millis(50), s.rx.recv()).await {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no KV-event batch arrived"
        );
    }
}

#[tokio::test]
async fn simulator_batches_decode_in_rust_and_with_vllms_structs() {
    let script = script();
    for (encoding, name) in [(Encoding::Map, "map"), (Encoding::Array, "array")] {
        let mut s = setup(encoding).await;
        let r = first_batch(&mut s).await;
        let port = s.replica.addr().port();
        assert_eq!(
            &*r.topic,
            format!("kv@127.0.0.1:{port}@{}", Config::fast().model).as_str()
        );
        assert_eq!(r.batch.data_parallel_rank, Some(0));
        let stored: Vec<_> = r
            .batch
            .events
            .iter()
            .filter_map(|e| match e {
                Event::BlockStored(b) => Some(b),
                _ => None,
            })
            .collect();
        assert!(!stored.is_empty(), "{:?}", r.batch);
        for b in stored {
            assert_eq!(b.medium, Medium::Gpu);
            assert_eq!(b.block_size, 16);
            assert_eq!(b.token_ids.len(), b.block_hashes.len() * 16);
        }

        // The same payload, decoded by vLLM's own structs.
        if let Some(script) = &script {
            let dir = temp_dir(&format!("sim-kv-wire-{name}"));
            let file = dir.join("sim.msgpack");
            std::fs::write(&file, &r.payload).unwrap();
            let decoded = script.decode(name, &[file]);
            assert_eq!(decoded[0], neutral(&r.batch), "{name}");
            let _ = std::fs::remove_dir_all(&dir);
        }

        // A prefix-cache reset is AllBlocksCleared (once the requests let go of their blocks).
        let deadline = tokio::time::Instant::now() + WAIT;
        while post(&s.client, &s.replica, "/reset_prefix_cache", json!({})).await != StatusCode::OK
        {
            assert!(tokio::time::Instant::now() < deadline, "reset refused");
            tokio::task::yield_now().await;
        }
        let cleared = loop {
            let r = timeout(WAIT, s.rx.recv()).await.unwrap().unwrap();
            if r.batch.events.contains(&Event::AllBlocksCleared) {
                break r;
            }
        };
        assert_eq!(cleared.batch.events.last(), Some(&Event::AllBlocksCleared));
        s.cancel.cancel();
        s.replica.shutdown().await;
    }
}

#[tokio::test]
async fn tier_events_cross_the_wire_with_their_medium() {
    let script = script();
    let mut config = Config::fast();
    config.kv_tiers.cpu_blocks = 1000;
    config.kv_tiers.shared_blocks = 1000;
    let mut s = setup_with(Encoding::Map, config).await;
    let mut r = first_batch(&mut s).await;
    // The first step's batch may have been published before the socket connected: wait for
    // one that carries the write-through.
    let deadline = tokio::time::Instant::now() + WAIT;
    let media = |r: &ReceivedBatch| {
        r.batch
            .events
            .iter()
            .filter_map(|e| match e {
                Event::BlockStored(b) => {
                    Some((b.medium, b.token_ids.len(), b.block_hashes.clone()))
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let mut n = 1000;
    while !media(&r).iter().any(|m| m.0 == Medium::Cpu) {
        n += 1;
        let body = json!({"model": Config::fast().model, "prompt": prompt(n), "max_tokens": 2});
        post(&s.client, &s.replica, "/v1/completions", body).await;
        r = timeout(WAIT, s.rx.recv()).await.unwrap().unwrap();
        assert!(tokio::time::Instant::now() < deadline, "no CPU-tier event");
    }
    let stored = media(&r);
    let gpu = stored.iter().find(|m| m.0 == Medium::Gpu).expect("GPU run");
    for medium in [Medium::Cpu, Medium::Remote] {
        let run = stored.iter().find(|m| m.0 == medium).expect("tier run");
        assert_eq!(run.1, 0, "{medium:?}: no token ids");
        assert_eq!(run.2, gpu.2, "{medium:?}: the GPU run's hashes");
    }
    if let Some(script) = &script {
        let dir = temp_dir("sim-kv-wire-tiers");
        let file = dir.join("tiers.msgpack");
        std::fs::write(&file, &r.payload).unwrap();
        let decoded = script.decode("map", &[file]);
        assert_eq!(decoded[0], neutral(&r.batch));
        let _ = std::fs::remove_dir_all(&dir);
    }
    s.cancel.cancel();
    s.replica.shutdown().await;
}
