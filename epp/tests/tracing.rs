//! Logs and traces of the real `epp` binary: JSON log lines of a request carry its
//! `x-request-id`, and with `OTEL_EXPORTER_OTLP_ENDPOINT` set the request's span reaches an
//! OTLP collector (in-process here) as a child of the incoming `traceparent`, while the upstream
//! request gets a `traceparent` naming that span.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use testkit::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

#[derive(Default)]
struct Collector {
    spans: Mutex<Vec<Span>>,
    arrived: Notify,
}

#[derive(Clone)]
struct Service(Arc<Collector>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.spans.lock().extend(spans);
        self.0.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_span_is_exported_and_propagated_and_logs_carry_the_request_id() {
    let collector = Arc::new(Collector::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Service(collector.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = std::env::temp_dir().join(format!("switchyard-tracing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = dir.join("pool.yaml");
    std::fs::write(
        &pool,
        "pool:\n  apiVersion: inference.networking.k8s.io/v1\n  kind: InferencePool\n  metadata: {name: traced, namespace: default}\n  spec:\n    selector: {matchLabels: {app: x}}\n    targetPorts: [{number: 8000}]\nendpoints:\n- {name: only, address: 127.0.0.9, labels: {app: x}}\n",
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args([
            "--pool-file",
            pool.to_str().unwrap(),
            "--secure-serving=false",
            "--metrics-endpoint-auth=false",
            "--bind-address=127.0.0.1",
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--zap-encoder=json",
            "--v=4",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (log_tx, mut log_rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let grpc: std::net::SocketAddr = tokio::time::timeout(TIMEOUT, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("epp exited");
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
            if v["message"] == "switchyard epp starting" {
                return v["grpc"].as_str().unwrap().parse().unwrap();
            }
        }
    })
    .await
    .unwrap();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = log_tx.send(v);
            }
        }
    });

    let mut s = Stream::open(grpc).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    s.send(req_headers(
        &[
            (":method", "POST"),
            (":path", "/v1/completions"),
            ("x-request-id", "traced-req-1"),
            ("traceparent", &traceparent),
        ],
        false,
        None,
    ))
    .await;
    s.send(req_body(br#"{"model":"m","prompt":"hello"}"#, true))
        .await;
    let answer = routing_answer(&s.recv().await);
    let upstream = answer.header("traceparent").expect("traceparent upstream");
    let parts: Vec<&str> = upstream.split('-').collect();
    assert_eq!(parts[1], TRACE_ID, "same trace upstream");
    assert_ne!(parts[2], PARENT_ID, "the EPP's span is the upstream parent");
    let _ = s.recv().await; // the body
    let Stream { tx, mut rx } = s;
    drop(tx);
    let _ = tokio::time::timeout(TIMEOUT, rx.message()).await.unwrap();

    // The span arrives at the collector: same trace, child of the incoming parent, and its id is
    // the one sent upstream.
    let span = tokio::time::timeout(TIMEOUT, async {
        loop {
            let arrived = collector.arrived.notified();
            if let Some(s) = collector
                .spans
                .lock()
                .iter()
                .find(|s| s.name == "gateway.request")
            {
                return s.clone();
            }
            arrived.await;
        }
    })
    .await
    .expect("span exported in time");
    assert_eq!(hex(&span.trace_id), TRACE_ID);
    assert_eq!(hex(&span.parent_span_id), PARENT_ID);
    assert_eq!(hex(&span.span_id), parts[2]);

    // Log lines of the request carry its id (the debug "routed" line at --v=4).
    let routed = tokio::time::timeout(TIMEOUT, async {
        loop {
            let v = log_rx.recv().await.expect("log stream");
            if v["message"] == "routed" {
                return v;
            }
        }
    })
    .await
    .expect("a routed log line");
    assert_eq!(routed["span"]["request_id"], "traced-req-1", "{routed}");

    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
