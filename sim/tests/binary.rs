//! The `sim` binary end to end: flags, several replicas, readiness lines, the API on each port.

// Helpers outside `#[test]` functions may panic too: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn the_binary_serves_several_replicas_on_ephemeral_ports() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sim"))
        .args([
            "--replicas",
            "3",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--engine",
            "sglang",
        ])
        .args(["--pod-name", "vllm-a", "--step-overhead-us", "500"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut replicas = Vec::new();
    // Bounded: the binary announces itself at once or the test fails.
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.is_empty() {
                break;
            }
            let (pod, url) = line.split_once(' ').unwrap();
            replicas.push((pod.to_owned(), url.to_owned()));
        }
    })
    .await
    .unwrap();
    let pods: Vec<&str> = replicas.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(pods, ["vllm-a", "vllm-a-1", "vllm-a-2"]);

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for (pod, url) in &replicas {
        let req = http::Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                r#"{"prompt": "hi", "max_tokens": 2}"#,
            )))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-inference-pod"], pod.as_str());
        let metrics = client
            .request(
                http::Request::get(format!("{url}/metrics"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        let text = metrics.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&text).unwrap();
        assert!(text.contains("sglang:num_running_reqs"), "--engine sglang");
    }
    child.kill().await.unwrap();
}
