//! The transport against libzmq, what vLLM publishes with (pyzmq, driven by
//! tools/kv-events/vllm_kv_events.py): our PUB socket to a libzmq SUB, our replay ROUTER to a
//! libzmq DEALER, and a libzmq PUB + ROUTER (vLLM's publisher in
//! miniature) to our subscriber, through a sequence gap and its replay. Loopback, OS ports,
//! every wait bounded.
#![cfg(feature = "zmq")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kv_events::codec::{Encoder, Encoding};
use kv_events::transport::{Publisher, PublisherConfig, Subscriber, SubscriberConfig};
use kv_events::{BlockRemoved, Event, EventBatch, Medium};
use serde_json::Value;
use support::msgspec::{neutral, script_with_pyzmq};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// The batch the script sends as number `n` (`batch_n`).
fn batch(n: u64) -> EventBatch {
    EventBatch {
        ts: n as f64,
        events: vec![Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![n],
            medium: Medium::Gpu,
            group_idx: None,
        })],
        data_parallel_rank: Some(0),
    }
}

#[tokio::test]
async fn our_publisher_and_replay_serve_libzmq_clients() {
    let Some(script) = script_with_pyzmq() else {
        return;
    };
    let (publisher, handle) = Publisher::start_binding(PublisherConfig {
        endpoint: "tcp://127.0.0.1:0".to_owned(),
        replay_endpoint: Some("tcp://127.0.0.1:0".to_owned()),
        buffer_steps: 4,
        max_queue_size: 64,
        topic: "kv@rust@m".to_owned(),
        encoder: Encoder::new(Encoding::Map),
    })
    .await
    .unwrap();
    let endpoint = publisher.endpoint().to_owned();
    let replay = publisher.replay_endpoint().unwrap().to_owned();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(publisher.run(cancel.clone()));

    // A libzmq SUB takes three messages; publish (batch n as seq n) until it has them.
    let child = tokio::process::Command::from(script.command(&["zmq-sub", &endpoint, "map", "3"]))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = child.wait_with_output();
    tokio::pin!(output);
    let mut published = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let deadline = tokio::time::Instant::now() + WAIT;
    let output = loop {
        tokio::select! {
            out = &mut output => break out.unwrap(),
            _ = tick.tick() => {
                assert!(handle.publish(batch(published)));
                published += 1;
                assert!(tokio::time::Instant::now() < deadline, "the libzmq subscriber got nothing");
            }
        }
    };
    assert!(output.status.success());
    let got: Value = serde_json::from_slice(&output.stdout).unwrap();
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), 3);
    let first = got[0]["seq"].as_u64().unwrap();
    for (i, m) in got.iter().enumerate() {
        let seq = first + i as u64;
        assert_eq!(m["seq"], seq, "consecutive");
        assert_eq!(m["topic"], "kv@rust@m");
        assert_eq!(m["batch"], neutral(&batch(seq)));
    }

    // A libzmq DEALER against our ROUTER: the last 4 kept, then the end marker.
    let deadline = tokio::time::Instant::now() + WAIT;
    while handle.stats().published.load(Ordering::Relaxed) < published {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    // (Not `script.run`: that blocks this runtime's only thread, which serves the replay.)
    let out = tokio::process::Command::from(script.command(&["zmq-replay", &replay, "map", "0"]))
        .kill_on_drop(true)
        .output();
    let out = timeout(WAIT, out).await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let seqs: Vec<u64> = replayed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let seq = m["seq"].as_u64().unwrap();
            assert_eq!(m["batch"], neutral(&batch(seq)));
            seq
        })
        .collect();
    assert_eq!(seqs, (published - 4..published).collect::<Vec<_>>());
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn our_subscriber_follows_a_libzmq_publisher_through_a_gap() {
    let Some(script) = script_with_pyzmq() else {
        return;
    };
    let mut child = tokio::process::Command::from(script.command(&["zmq-pub", "array"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let endpoints: Value = serde_json::from_str(
        &timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let mut command = async |c: &str| {
        stdin.write_all(format!("{c}\n").as_bytes()).await.unwrap();
        let ok = timeout(WAIT, lines.next_line()).await.unwrap().unwrap();
        assert_eq!(ok.as_deref(), Some("ok"));
    };

    let config = SubscriberConfig {
        replay_endpoint: Some(endpoints["replay_endpoint"].as_str().unwrap().to_owned()),
        ..SubscriberConfig::connect(endpoints["endpoint"].as_str().unwrap())
    };
    let sub = Subscriber::new(config);
    let stats = sub.stats();
    let (tx, mut rx) = mpsc::channel(64);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(sub.run(tx, cancel.clone()));

    // Warm up until the subscription has reached the publisher.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        command("warm").await;
        if let Ok(Some(r)) = timeout(Duration::from_millis(20), rx.recv()).await {
            assert_eq!(&*r.topic, "kv@warm-up@m");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription never arrived"
        );
    }
    // Drain the other warm-ups on their way, up to a marker sent after them (one connection
    // keeps their order; waiting for silence could let a late one through on a busy machine).
    command("warm 1").await;
    while timeout(WAIT, rx.recv()).await.unwrap().unwrap().batch != batch(1) {}

    // 1 and 2 never reach the subscriber live: it sees the gap at 3 and replays them.
    for c in ["pub 0", "keep 1", "keep 2", "pub 3"] {
        command(c).await;
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        let r = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        assert_eq!(&*r.topic, "kv@py@m");
        assert_eq!(r.batch, batch(r.seq));
        got.push((r.seq, r.replayed, r.missed_before));
    }
    assert_eq!(
        got,
        vec![(0, false, 0), (1, true, 0), (2, true, 0), (3, false, 0)]
    );
    let s = stats.snapshot();
    assert_eq!(
        (s.gaps, s.replayed, s.missed, s.decode_errors),
        (1, 2, 0, 0)
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}
