//! End to end: a real Envoy (from `gateway-configs/envoy`), the EPP in-process, and simulated
//! vLLM replicas, all on loopback. Skipped when no Envoy binary is found, unless
//! `SWITCHYARD_REQUIRE_ENVOY` is set (as `make test` does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use testkit as common;

use std::net::SocketAddr;
use std::time::Duration;

use common::envoy::{Envoy, Variant, binary_or_skip};
use common::http::{body_text, frames, header, post};
use common::ports::ClosedPort;
use common::*;

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

const CONFORMANCE_CONFIG: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 3
";

struct Cluster {
    replicas: Vec<sim::ReplicaHandle>,
    epp: Epp,
    envoy: Envoy,
}

async fn replicas(n: usize) -> Vec<sim::ReplicaHandle> {
    let mut out = Vec::new();
    for i in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A context long enough for the 1 MiB prompt test.
        let config = sim::Config {
            seed: 11,
            max_model_len: 4 << 20,
            ..Default::default()
        };
        out.push(sim::spawn_replica(config, listener, i).await.unwrap());
    }
    out
}

fn pool_of(replicas: &[sim::ReplicaHandle]) -> endpoint_picker::datastore::PoolSpec {
    pool(
        replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut e = endpoint(1, r.addr().port());
                e.name = format!("{}-rank-0", r.pod_name());
                e.pod_name = r.pod_name().to_owned();
                e.address = r.addr();
                e.metrics_address = r.addr();
                let _ = i;
                e
            })
            .collect(),
    )
}

async fn cluster(test: &str, n: usize, config: &str, variant: Variant) -> Option<Cluster> {
    let binary = binary_or_skip(test)?;
    let replicas = replicas(n).await;
    let tls = matches!(variant, Variant::TlsFailClose);
    let epp = start_epp(
        pool_of(&replicas),
        EppOptions {
            config: config.to_owned(),
            scrape: true,
            tls,
            ..Default::default()
        },
    )
    .await;
    let backends: Vec<SocketAddr> = replicas.iter().map(|r| r.addr()).collect();
    let envoy = Envoy::start(&binary, variant, epp.grpc, &backends).await;
    envoy.wait_epp_health(true).await;
    Some(Cluster {
        replicas,
        epp,
        envoy,
    })
}

fn chat(content: &str, stream: bool, max_tokens: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": true},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_picked_backend() {
    let Some(c) = cluster(
        "requests_reach_the_picked_backend",
        3,
        CONFORMANCE_CONFIG,
        Variant::PlaintextFailClose,
    )
    .await
    else {
        return;
    };
    for target in [&c.replicas[1], &c.replicas[2], &c.replicas[0]] {
        let pick = target.addr().to_string();
        for _ in 0..3 {
            let resp = post(
                c.envoy.listener,
                "/v1/chat/completions",
                &[("test-epp-endpoint-selection", &pick)],
                chat("hi", false, 4),
            )
            .await;
            assert_eq!(resp.status(), 200);
            assert_eq!(header(&resp, "x-inference-pod"), Some(target.pod_name()));
            // Envoy reported the served endpoint back on the response path.
            assert_eq!(
                header(&resp, "x-conformance-test-served-endpoint"),
                Some(pick.as_str())
            );
            let body = body_text(resp).await;
            assert!(body.contains("\"usage\""), "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_profile_serves_and_spreads_load() {
    let Some(c) = cluster(
        "default_profile_serves_and_spreads_load",
        3,
        endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
        Variant::PlaintextFailClose,
    )
    .await
    else {
        return;
    };
    let mut pods = std::collections::HashSet::new();
    for i in 0..12 {
        // Distinct prompts: no prefix affinity, so the load scorers spread them.
        let resp = post(
            c.envoy.listener,
            "/v1/chat/completions",
            &[],
            chat(&format!("question {i} {}", "x".repeat(i * 50)), false, 2),
        )
        .await;
        assert_eq!(resp.status(), 200);
        pods.insert(header(&resp, "x-inference-pod").unwrap().to_owned());
        let _ = body_text(resp).await;
    }
    assert!(!pods.is_empty());
    // The scraper has read the replicas' metrics through the same path.
    let snap = c.epp.handles.datastore.snapshot();
    assert!(
        snap.endpoints
            .iter()
            .all(|e| e.metrics().updated_at.is_some()),
        "every replica scraped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_makes_envoy_retry_the_next_fallback() {
    let Some(c) = cluster(
        "failing_backend_makes_envoy_retry_the_next_fallback",
        3,
        CONFORMANCE_CONFIG,
        Variant::PlaintextFailClose,
    )
    .await
    else {
        return;
    };
    let (bad, good) = (&c.replicas[0], &c.replicas[1]);
    bad.set_failure_injection(100.0, vec![503]);
    let selection = format!("{},{}", bad.addr(), good.addr());
    for _ in 0..10 {
        let resp = post(
            c.envoy.listener,
            "/v1/chat/completions",
            &[("test-epp-endpoint-selection", &selection)],
            chat("hi", false, 2),
        )
        .await;
        assert_eq!(resp.status(), 200, "the retry reaches the healthy fallback");
        assert_eq!(header(&resp, "x-inference-pod"), Some(good.pod_name()));
        assert_eq!(
            header(&resp, "x-conformance-test-served-endpoint"),
            Some(good.addr().to_string().as_str())
        );
        let _ = body_text(resp).await;
    }
    // Ties are shuffled, so some requests went to the failing endpoint first and were retried.
    let stats = common::http::get_text(
        c.envoy.admin,
        "/stats?filter=inference_pool.upstream_rq_retry$",
    )
    .await
    .unwrap();
    let retries: u64 = stats
        .split(':')
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(retries > 0, "no retry happened: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_tokens_arrive_chunk_by_chunk() {
    let Some(c) = cluster(
        "sse_tokens_arrive_chunk_by_chunk",
        2,
        endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
        Variant::PlaintextFailClose,
    )
    .await
    else {
        return;
    };
    let started = tokio::time::Instant::now();
    let resp = post(
        c.envoy.listener,
        "/v1/chat/completions",
        &[],
        chat("tell me a story", true, 40),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        header(&resp, "content-type")
            .unwrap_or("")
            .contains("text/event-stream")
    );
    let frames = frames(resp).await;
    let text: String = frames
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    let events = text.matches("data: ").count();
    assert!(
        events >= 40,
        "one event per token plus usage and [DONE]: {events}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert!(text.contains("\"usage\""));
    // Tokens are not buffered until the end: many frames, spread over the generation.
    assert!(frames.len() >= 10, "only {} frames", frames.len());
    let first = frames.first().unwrap().0;
    let last = frames.last().unwrap().0;
    assert!(
        last.duration_since(first) > Duration::from_millis(20),
        "frames arrived together"
    );
    assert!(first.duration_since(started) < last.duration_since(started));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_gets_400_with_the_error_text() {
    let Some(c) = cluster(
        "invalid_json_gets_400_with_the_error_text",
        1,
        endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
        Variant::PlaintextFailClose,
    )
    .await
    else {
        return;
    };
    let resp = post(
        c.envoy.listener,
        "/v1/chat/completions",
        &[],
        b"{\"model\": oops".to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body = body_text(resp).await;
    assert!(
        body.starts_with("inference error: BadRequest - invalid JSON body"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_destination_header_has_no_effect() {
    let Some(c) = cluster(
        "client_sent_destination_header_has_no_effect",
        3,
        CONFORMANCE_CONFIG,
        Variant::PlaintextFailClose,
    )
    .await
    else {
        return;
    };
    let chosen = c.replicas[2].addr().to_string();
    let spoofed = c.replicas[0].addr().to_string();
    for _ in 0..5 {
        let resp = post(
            c.envoy.listener,
            "/v1/chat/completions",
            &[
                ("test-epp-endpoint-selection", &chosen),
                ("x-gateway-destination-endpoint", &spoofed),
                ("x-gateway-destination-endpoint-subset", &spoofed),
            ],
            chat("hi", false, 2),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            header(&resp, "x-inference-pod"),
            Some(c.replicas[2].pod_name())
        );
        let _ = body_text(resp).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_prompt_through_envoy() {
    let Some(c) = cluster(
        "one_mebibyte_prompt_through_envoy",
        2,
        endpoint_picker::config::REFERENCE_DEFAULT_CONFIG,
        Variant::PlaintextFailClose,
    )
    .await
    else {
        return;
    };
    let body = serde_json::to_vec(
        &serde_json::json!({"model": MODEL, "prompt": "word ".repeat(200_000), "max_tokens": 2}),
    )
    .unwrap();
    assert!(body.len() > 1_000_000);
    let resp = post(c.envoy.listener, "/v1/completions", &[], body).await;
    let status = resp.status();
    let text = body_text(resp).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_epp() {
    let Some(c) = cluster(
        "tls_to_the_epp",
        2,
        CONFORMANCE_CONFIG,
        Variant::TlsFailClose,
    )
    .await
    else {
        return;
    };
    let pick = c.replicas[1].addr().to_string();
    let resp = post(
        c.envoy.listener,
        "/v1/chat/completions",
        &[("test-epp-endpoint-selection", &pick)],
        chat("hi", false, 2),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "x-inference-pod"),
        Some(c.replicas[1].pod_name())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epp_down_fail_close_answers_5xx_and_fail_open_serves() {
    let Some(binary) = binary_or_skip("epp_down_fail_close_answers_5xx_and_fail_open_serves")
    else {
        return;
    };
    let replicas = replicas(2).await;
    let backends: Vec<SocketAddr> = replicas.iter().map(|r| r.addr()).collect();
    let closed = ClosedPort::new().unwrap();
    let epp = closed.addr();
    let close = Envoy::start(&binary, Variant::PlaintextFailClose, epp, &backends).await;
    let open = Envoy::start(&binary, Variant::PlaintextFailOpen, epp, &backends).await;
    close.wait_epp_health(false).await;
    open.wait_epp_health(false).await;
    for _ in 0..5 {
        let resp = post(
            close.listener,
            "/v1/chat/completions",
            &[],
            chat("hi", false, 2),
        )
        .await;
        assert!(
            resp.status().is_server_error(),
            "FailClose: {}",
            resp.status()
        );
        let resp = post(
            open.listener,
            "/v1/chat/completions",
            &[],
            chat("hi", false, 2),
        )
        .await;
        assert_eq!(resp.status(), 200, "FailOpen still serves");
        let _ = body_text(resp).await;
    }
}

/// A unique directory for a Unix socket (a socket path is at most 107 bytes, so not under a
/// long target directory).
fn socket_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sy-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `--grpc-uds-path` through real Envoy: the shipped plaintext template with its `epp` cluster
/// switched to a `pipe` address (gateway-configs/envoy/README.md, "Unix socket"). The TCP
/// address Envoy was rendered with is a closed port, so every answer proves the socket carried
/// the exchange: the picked replica served it, Envoy reported the served endpoint back on the
/// response path, and the streamed body went through the EPP to the end (usage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_over_a_unix_socket() {
    let Some(binary) = binary_or_skip("ext_proc_over_a_unix_socket") else {
        return;
    };
    let replicas = replicas(2).await;
    let dir = socket_dir("uds");
    let socket = dir.join("epp.sock");
    // A socket file left by an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let epp = start_epp(
        pool_of(&replicas),
        EppOptions {
            config: CONFORMANCE_CONFIG.to_owned(),
            grpc_uds: Some(socket.clone()),
            ..Default::default()
        },
    )
    .await;
    let backends: Vec<SocketAddr> = replicas.iter().map(|r| r.addr()).collect();
    let template = std::fs::read_to_string(
        common::envoy::workspace_root().join("gateway-configs/envoy/envoy-plaintext.yaml"),
    )
    .unwrap();
    let closed_port = ClosedPort::new().unwrap();
    let closed = closed_port.addr();
    let rendered = common::envoy::render_vars(
        &template,
        &[
            ("EPP_HOST", closed.ip().to_string()),
            ("EPP_PORT", closed.port().to_string()),
            ("BACKEND_ENDPOINTS", common::envoy::lb_endpoints(&backends)),
        ],
    );
    let piped = common::envoy::with_epp_pipe(&rendered, &socket).unwrap();
    let envoy = Envoy::start_config(&binary, &piped).await;
    envoy.wait_epp_health(true).await;
    for target in [&replicas[1], &replicas[0]] {
        let pick = target.addr().to_string();
        let resp = post(
            envoy.listener,
            "/v1/chat/completions",
            &[("test-epp-endpoint-selection", &pick)],
            chat("over the socket", true, 8),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-inference-pod"), Some(target.pod_name()));
        assert_eq!(
            header(&resp, "x-conformance-test-served-endpoint"),
            Some(pick.as_str())
        );
        let body = body_text(resp).await;
        assert!(
            body.contains("\"usage\"") && body.contains("[DONE]"),
            "{body}"
        );
    }
    drop(envoy);
    drop(epp);
    let _ = std::fs::remove_dir_all(dir);
}
