//! The router's wiring, in-process over real sockets: file mode (read at start, reloaded on
//! change), readiness once the mapping has synced, the ext_proc answer, and `/metrics`.
//!
//! Waits are on conditions (a health status, an answer), bounded; nothing sleeps to hope.

// Test support: a failed setup step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bbr::file::MappingFileSource;
use bbr::mapping::Mapping;
use bbr::server::{Listeners, MappingSource, Settings, serve};
use bbr::stream::Options;
use ext_proc::protocol::{BASE_MODEL_NAME, MODEL_NAME};
use testkit::{Stream, req_body, req_headers, routing_answer};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DEADLINE: Duration = Duration::from_secs(30);

async fn base_model_of(grpc: std::net::SocketAddr, model: &str) -> Option<String> {
    let mut s = Stream::open(grpc).await;
    s.send(req_headers(
        &[
            (":method", "POST"),
            (":path", "/v1/completions"),
            ("content-type", "application/json"),
        ],
        false,
        None,
    ))
    .await;
    let body = serde_json::json!({"model": model, "prompt": "hi"}).to_string();
    s.send(req_body(body.as_bytes(), true)).await;
    let answer = routing_answer(&s.recv().await);
    assert!(answer.clear_route_cache);
    assert_eq!(answer.header(MODEL_NAME), Some(model));
    answer.header(BASE_MODEL_NAME).map(str::to_owned)
}

#[tokio::test]
async fn file_mode_serves_reloads_and_reports() {
    let dir = std::env::temp_dir().join(format!("bbr-server-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mapping.yaml");
    std::fs::write(&path, "mappings:\n- baseModel: llama\n  adapters: [food]\n").unwrap();
    let mapping = Mapping::new();
    MappingFileSource::new(&path).poll(&mapping).await.unwrap();

    let bind = || TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        grpc: bind().await.unwrap(),
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let grpc = listeners.grpc.local_addr().unwrap();
    let health = listeners.health.local_addr().unwrap();
    let metrics = listeners.metrics.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        Settings {
            options: Options::default(),
            mapping,
            source: MappingSource::File {
                path: path.clone(),
                poll_interval: Duration::from_millis(20),
            },
            tls: None,
            admin_auth: epp::admin::AdminAuth::Open,
            drain_grace: Duration::from_secs(1),
            shutdown_delay: Default::default(),
        },
        listeners,
        shutdown.clone(),
    ));

    let channel = tonic::transport::Channel::from_shared(format!("http://{health}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: "readiness".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::task::yield_now().await;
    }

    assert_eq!(base_model_of(grpc, "food").await.as_deref(), Some("llama"));
    assert_eq!(base_model_of(grpc, "sql").await, None);

    // A message of more headers than Envoy sends ends its stream with the refusal, before it
    // is decoded; the router goes on.
    let flood = testkit::with_empty_headers(
        req_headers(&[(":method", "POST")], false, None),
        ext_proc::codec::MAX_ENTRIES,
    );
    let mut s = Stream::open(grpc).await;
    s.send(flood).await;
    let status = tokio::time::timeout(DEADLINE, s.rx.message())
        .await
        .unwrap()
        .expect_err("the stream ends with the refusal");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(base_model_of(grpc, "sql").await, None);

    // The file changes: the next poll maps the new adapter.
    std::fs::write(
        &path,
        "mappings:\n- baseModel: llama\n  adapters: [food, sql]\n",
    )
    .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while base_model_of(grpc, "sql").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the changed file was never applied"
        );
    }

    let text = testkit::http::get_text(metrics, "/metrics").await.unwrap();
    assert!(text.contains("bbr_mapping_adapters 2"), "{text}");
    assert!(
        text.contains(r#"bbr_requests_by_model_total{model="food",base_model="llama"} 1"#),
        "{text}"
    );

    shutdown.cancel();
    server.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
