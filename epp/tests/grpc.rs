//! gRPC-level tests: an in-process EPP driven by `ExternalProcessorClient` through every
//! message sequence Envoy produces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use testkit as common;

use common::*;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use ext_proc::envoy::ext_proc::processing_response;
use ext_proc::envoy::{BodySendMode, Metadata};
use ext_proc::stream::ServiceOptions;

fn chat(model: &str, content: &str, stream: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }))
    .unwrap()
}

const CHAT_HEADERS: &[(&str, &str)] = &[
    (":method", "POST"),
    (":path", "/v1/chat/completions"),
    ("content-type", "application/json"),
];

fn three() -> endpoint_picker::datastore::PoolSpec {
    pool(vec![
        endpoint(11, 8000),
        endpoint(12, 8000),
        endpoint(13, 8000),
    ])
}

fn subset_metadata(value: Value) -> Metadata {
    let inner = Struct {
        fields: [("x-gateway-destination-endpoint-subset".to_owned(), value)]
            .into_iter()
            .collect(),
    };
    Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_owned(), inner)]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn served_metadata(v: &str) -> Metadata {
    let inner = Struct {
        fields: [(
            "x-gateway-destination-endpoint-served".to_owned(),
            Value {
                kind: Some(Kind::StringValue(v.into())),
            },
        )]
        .into_iter()
        .collect(),
    };
    Metadata {
        filter_metadata: [("envoy.lb".to_owned(), inner)].into_iter().collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn headers_only_request_is_routed_immediately() {
    let epp = start_epp(three(), EppOptions::default()).await;
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(
        &[(":method", "GET"), (":path", "/v1/models")],
        true,
        None,
    ))
    .await;
    let a = routing_answer(&s.recv().await);
    assert!(a.destination().starts_with("127.0.0.1"));
    assert_eq!(a.metadata_destination.as_deref(), Some(a.destination()));
    assert!(a.clear_route_cache);
    assert!(a.header("content-length").is_none());
    // No x-request-id from the client: one is generated and forwarded.
    assert_eq!(a.header("x-request-id").map(str::len), Some(36));
}

#[tokio::test]
async fn multi_chunk_body_is_deferred_then_answered_in_order() {
    let epp = start_epp(three(), EppOptions::default()).await;
    set_queues(&epp, &[5, 0, 5]);
    let mut s = Stream::open(epp.grpc).await;
    let body = chat("m", &"hello ".repeat(500), false);
    s.send(req_headers(
        &[(":path", "/v1/chat/completions"), ("x-request-id", "rid-1")],
        false,
        None,
    ))
    .await;
    s.expect_silence().await;
    let (a, b) = body.split_at(body.len() / 3);
    let (b, c) = b.split_at(b.len() / 2);
    s.send(req_body(a, false)).await;
    s.send(req_body(b, false)).await;
    s.expect_silence().await;
    s.send(req_body(c, true)).await;
    let answer = routing_answer(&s.recv().await);
    assert_eq!(answer.destination(), "127.0.0.12:8000");
    assert_eq!(
        answer.metadata_destination.as_deref(),
        Some("127.0.0.12:8000")
    );
    assert_eq!(
        answer.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert!(
        answer.header("x-request-id").is_none(),
        "the client's id is kept"
    );
    let (echo, eos) = streamed_body(&s.recv().await);
    assert!(eos);
    assert_eq!(echo, body, "the body passes through byte for byte");
}

#[tokio::test]
async fn one_mebibyte_body_is_resent_in_62000_byte_chunks() {
    let epp = start_epp(three(), EppOptions::default()).await;
    let mut s = Stream::open(epp.grpc).await;
    let prompt = "x".repeat(1 << 20);
    let body = serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt})).unwrap();
    s.send(req_headers(
        &[
            (":path", "/v1/completions"),
            ("content-length", &body.len().to_string()),
        ],
        false,
        None,
    ))
    .await;
    for chunk in body.chunks(16 * 1024) {
        s.send(req_body(chunk, false)).await;
    }
    s.send(req_body(b"", true)).await;
    let answer = routing_answer(&s.recv().await);
    assert_eq!(
        answer.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    let mut got = Vec::new();
    loop {
        let (chunk, eos) = streamed_body(&s.recv().await);
        assert!(chunk.len() <= 62_000);
        got.extend_from_slice(&chunk);
        if eos {
            break;
        }
    }
    assert_eq!(got.len(), body.len());
    assert_eq!(got, body);
}

#[tokio::test]
async fn sse_response_chunks_are_answered_one_by_one_and_state_released() {
    let epp = start_epp(three(), EppOptions::default()).await;
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(&chat("m", "hi", true), true)).await;
    let dest = routing_answer(&s.recv().await).destination().to_owned();
    let _ = s.recv().await;
    let snap = epp.handles.datastore.snapshot();
    let id = snap
        .endpoints
        .iter()
        .find(|e| *e.host_port == dest)
        .unwrap()
        .id;
    assert_eq!(epp.handles.director.in_flight().get(id), 1);
    s.send(resp_headers(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
        Some(served_metadata(&dest)),
    ))
    .await;
    assert!(matches!(
        s.recv().await.response,
        Some(processing_response::Response::ResponseHeaders(_))
    ));
    let events = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"model\":\"m\"}\n\n".to_string(),
        "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"model\":\"m\"}\n\n".to_string(),
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n".to_string(),
    ];
    for (i, e) in events.iter().enumerate() {
        let last = i + 1 == events.len();
        s.send(resp_body(e.as_bytes(), last)).await;
        // Each chunk comes back before the next is sent: nothing is buffered.
        let (echo, eos) = streamed_body(&s.recv().await);
        assert_eq!(echo, e.as_bytes());
        assert_eq!(eos, last);
    }
    assert_eq!(
        epp.handles.director.in_flight().get(id),
        0,
        "completion releases the in-flight slot"
    );
}

#[tokio::test]
async fn non_sse_response_passes_through() {
    let epp = start_epp(three(), EppOptions::default()).await;
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    let _ = s.recv().await;
    let _ = s.recv().await;
    s.send(resp_headers(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
        None,
    ))
    .await;
    let _ = s.recv().await;
    let body = br#"{"object":"chat.completion","model":"m","usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
    s.send(resp_body(&body[..10], false)).await;
    assert_eq!(streamed_body(&s.recv().await), (body[..10].to_vec(), false));
    s.send(resp_body(&body[10..], true)).await;
    assert_eq!(streamed_body(&s.recv().await), (body[10..].to_vec(), true));
}

#[tokio::test]
async fn client_abort_releases_in_flight_state() {
    let epp = start_epp(pool(vec![endpoint(11, 8000)]), EppOptions::default()).await;
    let id = epp.handles.datastore.snapshot().endpoints[0].id;
    {
        let mut s = Stream::open(epp.grpc).await;
        s.send(req_headers(CHAT_HEADERS, false, None)).await;
        s.send(req_body(&chat("m", "hi", true), true)).await;
        let _ = s.recv().await;
        let _ = s.recv().await;
        assert_eq!(epp.handles.director.in_flight().get(id), 1);
        // The client goes away mid-response.
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while epp.handles.director.in_flight().get(id) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "in-flight state not released"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn subset_hint_list_and_string_restrict_candidates() {
    let epp = start_epp(three(), EppOptions::default()).await;
    let list = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: vec![Value {
                kind: Some(Kind::StringValue("127.0.0.13:8000".into())),
            }],
        })),
    };
    for hint in [
        list,
        Value {
            kind: Some(Kind::StringValue("127.0.0.99:1, 127.0.0.13".into())),
        },
    ] {
        for _ in 0..5 {
            let mut s = Stream::open(epp.grpc).await;
            s.send(req_headers(
                CHAT_HEADERS,
                false,
                Some(subset_metadata(hint.clone())),
            ))
            .await;
            s.send(req_body(&chat("m", "hi", false), true)).await;
            assert_eq!(
                routing_answer(&s.recv().await).destination(),
                "127.0.0.13:8000"
            );
        }
    }
    // Empty hint or a hint outside the pool: 503.
    for hint in [
        Value {
            kind: Some(Kind::ListValue(ListValue::default())),
        },
        Value {
            kind: Some(Kind::StringValue("10.9.9.9:80".into())),
        },
    ] {
        let mut s = Stream::open(epp.grpc).await;
        s.send(req_headers(
            CHAT_HEADERS,
            false,
            Some(subset_metadata(hint)),
        ))
        .await;
        s.send(req_body(&chat("m", "hi", false), true)).await;
        let (status, body) = immediate(&s.recv().await);
        assert_eq!(status, 503);
        assert!(
            body.starts_with("inference error: ServiceUnavailable - "),
            "{body}"
        );
    }
}

#[tokio::test]
async fn bad_bodies_get_400_with_the_error_text() {
    let epp = start_epp(three(), EppOptions::default()).await;
    for (body, needle) in [
        (&b"{not json"[..], "invalid JSON body"),
        (
            br#"{"messages":[{"role":"user","content":"x"}]}"#,
            "model not found",
        ),
        (br#"{"model":"m","messages":[]}"#, "messages"),
    ] {
        let mut s = Stream::open(epp.grpc).await;
        s.send(req_headers(CHAT_HEADERS, false, None)).await;
        s.send(req_body(body, true)).await;
        let (status, text) = immediate(&s.recv().await);
        assert_eq!(status, 400);
        assert!(
            text.starts_with("inference error: BadRequest - ") && text.contains(needle),
            "{text}"
        );
    }
}

#[tokio::test]
async fn oversized_body_gets_413() {
    let opts = EppOptions {
        options: ServiceOptions {
            max_request_body_bytes: 1000,
            ..Default::default()
        },
        ..Default::default()
    };
    let epp = start_epp(three(), opts).await;
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(&[b' '; 600], false)).await;
    s.send(req_body(&[b' '; 600], false)).await;
    let (status, text) = immediate(&s.recv().await);
    assert_eq!(status, 413);
    assert!(text.contains("exceeds the limit of 1000 bytes"));
}

/// A headers message of more entries than Envoy ever sends.
fn too_many_headers() -> ext_proc::envoy::ext_proc::ProcessingRequest {
    with_empty_headers(
        req_headers(CHAT_HEADERS, true, None),
        ext_proc::codec::MAX_ENTRIES,
    )
}

/// A headers message of more entries than Envoy ever sends (prost would build 72 bytes for
/// each two-byte empty header) ends its stream with `RESOURCE_EXHAUSTED` before it is decoded;
/// the EPP routes the next stream on the same connection.
#[tokio::test]
async fn a_message_of_more_headers_than_envoy_sends_ends_its_stream() {
    let epp = start_epp(three(), EppOptions::default()).await;
    let channel = connect(epp.grpc).await;
    let mut s = Stream::on(channel.clone()).await;
    s.send(too_many_headers()).await;
    let status = tokio::time::timeout(TIMEOUT, s.rx.message())
        .await
        .expect("an answer in time")
        .expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    let mut next = Stream::on(channel).await;
    next.send(req_headers(
        &[(":method", "GET"), (":path", "/v1/models")],
        true,
        None,
    ))
    .await;
    let a = routing_answer(&next.recv().await);
    assert!(a.destination().starts_with("127.0.0.1"));
}

/// A body that stops coming (here after one chunk) gets 408 once `--request-body-timeout` has
/// passed since its headers, and what it held is given back.
#[tokio::test]
async fn a_body_that_stops_coming_gets_408() {
    let budget = std::sync::Arc::new(ext_proc::body_budget::BodyBudget::new(1 << 20));
    let opts = EppOptions {
        options: ServiceOptions {
            request_body_timeout: std::time::Duration::from_millis(300),
            gathered_request_bytes: budget.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let epp = start_epp(three(), opts).await;
    let mut s = Stream::open(epp.grpc).await;
    let mut headers = CHAT_HEADERS.to_vec();
    headers.push(("content-length", "100000"));
    s.send(req_headers(&headers, false, None)).await;
    s.send(req_body(&[b' '; 600], false)).await;
    let (status, text) = immediate(&s.recv().await);
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("RequestTimeout"), "{text}");
    assert_eq!((budget.held(), budget.reserved()), (0, 0));
}

#[tokio::test]
async fn client_routing_headers_have_no_effect() {
    let epp = start_epp(three(), EppOptions::default()).await;
    set_queues(&epp, &[9, 9, 0]);
    let mut s = Stream::open(epp.grpc).await;
    let mut headers = CHAT_HEADERS.to_vec();
    headers.push(("x-gateway-destination-endpoint", "6.6.6.6:80"));
    headers.push(("x-gateway-destination-endpoint-fallbacks", "6.6.6.6:81"));
    s.send(req_headers(&headers, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    let a = routing_answer(&s.recv().await);
    assert_eq!(a.destination(), "127.0.0.13:8000");
    assert_eq!(
        a.remove,
        vec!["x-gateway-destination-endpoint-fallbacks".to_owned()]
    );
}

/// An EPP trusting the gateway's model rewrite header (the header is honoured only when the
/// operator says the gateway owns it), `options` otherwise; a stream to it; and request headers
/// asking to serve `served-model`.
async fn rewriting_epp(
    options: ServiceOptions,
) -> (Epp, Stream, Vec<(&'static str, &'static str)>) {
    let opts = EppOptions {
        options: ServiceOptions {
            trust_model_rewrite_header: true,
            ..options
        },
        ..Default::default()
    };
    let epp = start_epp(three(), opts).await;
    let s = Stream::open(epp.grpc).await;
    let mut headers = CHAT_HEADERS.to_vec();
    headers.push(("x-gateway-model-name-rewrite", "served-model"));
    (epp, s, headers)
}

#[tokio::test]
async fn model_rewrite_header_rewrites_body_and_response_back() {
    let (_epp, mut s, headers) = rewriting_epp(ServiceOptions::default()).await;
    s.send(req_headers(&headers, false, None)).await;
    s.send(req_body(&chat("asked-model", "hi", false), true))
        .await;
    let a = routing_answer(&s.recv().await);
    let (body, _) = streamed_body(&s.recv().await);
    assert_eq!(
        a.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["model"], "served-model");
    s.send(resp_headers(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
        None,
    ))
    .await;
    let _ = s.recv().await;
    s.send(resp_body(br#"{"model":"served-model","choices":[]}"#, true))
        .await;
    let (back, eos) = streamed_body(&s.recv().await);
    assert!(eos);
    assert_eq!(back, br#"{"model":"asked-model","choices":[]}"#);
}

/// A BUFFERED gateway sends the body in one message and takes a rewritten body back in one.
/// With `--max-request-body-bytes` above the default 64 MiB message cap, the EPP raises its cap
/// both ways: a 65 MiB body is read, rewritten (the gateway's model header) and sent back whole
/// instead of breaking the stream.
#[tokio::test]
async fn a_body_past_the_default_message_cap_is_read_and_rewritten_whole() {
    let (_epp, mut s, headers) = rewriting_epp(ServiceOptions {
        max_request_body_bytes: 70 << 20,
        ..Default::default()
    })
    .await;
    s.send(with_request_body_mode(
        req_headers(&headers, false, None),
        BodySendMode::Buffered,
    ))
    .await;
    assert!(is_plain_request_headers_answer(&s.recv().await));
    let body = chat("asked-model", &"a".repeat(65 << 20), false);
    assert!(body.len() > epp::server::MAX_GRPC_MESSAGE);
    s.send(req_body(&body, true)).await;
    // 65 MiB each way through a debug build: more than the default deadline may allow.
    let answer = s.recv_within(std::time::Duration::from_secs(60)).await;
    let (a, new_body) = buffered_routing_answer(&answer);
    assert!(a.destination().starts_with("127.0.0."), "routed");
    let new_body = new_body.expect("the rewritten body");
    assert!(new_body.len() > epp::server::MAX_GRPC_MESSAGE);
    assert_eq!(
        a.header("content-length"),
        Some(new_body.len().to_string().as_str())
    );
    let head = String::from_utf8_lossy(&new_body[..200.min(new_body.len())]).into_owned();
    let tail = String::from_utf8_lossy(&new_body[new_body.len() - 200..]).into_owned();
    assert!(
        head.contains("served-model") || tail.contains("served-model"),
        "{head} … {tail}"
    );
}

#[tokio::test]
async fn sheddable_request_gets_429_when_saturated() {
    let epp = start_epp(three(), EppOptions::default()).await;
    epp.handles
        .director
        .set_policies(endpoint_picker::director::Policies {
            objectives: [("batch".to_string(), -1)].into_iter().collect(),
            rewrites: vec![],
        });
    set_queues(&epp, &[50, 50, 50]);
    let mut s = Stream::open(epp.grpc).await;
    let mut headers = CHAT_HEADERS.to_vec();
    headers.push(("x-gateway-inference-objective", "batch"));
    s.send(req_headers(&headers, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    let (status, text) = immediate(&s.recv().await);
    assert_eq!(status, 429);
    assert!(text.contains("sheddable"), "{text}");
    // The same request without the sheddable objective goes through.
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    routing_answer(&s.recv().await);
}

#[tokio::test]
async fn fallbacks_and_conformance_plugins() {
    let config = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: header-based-testing-filter\n- type: destination-endpoint-served-verifier\n- type: max-score-picker\n  parameters:\n    maxNumOfEndpoints: 3\n";
    let epp = start_epp(
        three(),
        EppOptions {
            config: config.into(),
            ..Default::default()
        },
    )
    .await;
    let mut s = Stream::open(epp.grpc).await;
    let mut headers = CHAT_HEADERS.to_vec();
    headers.push(("test-epp-endpoint-selection", "127.0.0.12,127.0.0.11"));
    s.send(req_headers(&headers, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    let a = routing_answer(&s.recv().await);
    let mut got: Vec<&str> = a.destination().split(',').collect();
    got.sort();
    assert_eq!(got, vec!["127.0.0.11:8000", "127.0.0.12:8000"]);
    let _ = s.recv().await;
    s.send(resp_headers(
        &[(":status", "200")],
        false,
        Some(served_metadata("127.0.0.12:8000")),
    ))
    .await;
    let r = s.recv().await;
    let Some(processing_response::Response::ResponseHeaders(h)) = r.response else {
        panic!()
    };
    let set = h.response.unwrap().header_mutation.unwrap().set_headers;
    let hv = set[0].header.as_ref().unwrap();
    assert_eq!(hv.key, "x-conformance-test-served-endpoint");
    assert_eq!(hv.raw_value, b"127.0.0.12:8000");
}

#[tokio::test]
async fn empty_pool_gets_503() {
    let epp = start_epp(pool(vec![]), EppOptions::default()).await;
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    assert_eq!(immediate(&s.recv().await).0, 503);
}

#[tokio::test]
async fn health_reports_ready_after_sync_and_metrics_are_served() {
    let epp = start_epp(three(), EppOptions::default()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", epp.health))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in [
        "liveness",
        "readiness",
        "inference-extension",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let r = client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            if r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{service} never became SERVING"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    // One routed request, then the counter shows it.
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    let _ = s.recv().await;
    let text = http_get(epp.metrics, "/metrics").await;
    assert!(text.contains("inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"0\"} 1"), "{text}");
    endpoint_picker::scrape::prometheus::parse(&text).expect("our exposition parses");
}

/// A certificate directory laid out as a Kubernetes Secret volume: `tls.crt` and `tls.key` are
/// symlinks through `..data`, which is swapped atomically to publish a new pair.
struct CertDir {
    dir: std::path::PathBuf,
    generation: u32,
}

impl CertDir {
    fn new(name: &str, identity: &epp::tls::TlsIdentity) -> Self {
        let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{file}"), dir.join(file)).unwrap();
        }
        let mut d = Self { dir, generation: 0 };
        d.publish(&identity.cert_pem, &identity.key_pem);
        d
    }

    /// Writes a new generation and points `..data` at it in one rename, as the kubelet does.
    fn publish(&mut self, cert_pem: &str, key_pem: &str) {
        self.generation += 1;
        let generation = format!("..gen{}", self.generation);
        let target = self.dir.join(&generation);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("tls.crt"), cert_pem).unwrap();
        std::fs::write(target.join("tls.key"), key_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&generation, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn der(identity: &epp::tls::TlsIdentity) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap()
}

type Seen = std::sync::Arc<parking_lot::Mutex<Vec<rustls::pki_types::CertificateDer<'static>>>>;

/// A gRPC channel over TLS that verifies the server's certificate against `roots` for the
/// name `localhost`, offers ALPN h2 as gRPC clients do, and records the certificate of every
/// connection it makes.
async fn tls_channel_result(
    addr: std::net::SocketAddr,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<(tonic::transport::Channel, Seen), tonic::transport::Error> {
    tls_channel_as(addr, roots, None).await
}

/// [`tls_channel_result`], the client presenting `identity`.
async fn tls_channel_as(
    addr: std::net::SocketAddr,
    roots: &[rustls::pki_types::CertificateDer<'static>],
    identity: Option<ClientIdentity>,
) -> Result<(tonic::transport::Channel, Seen), tonic::transport::Error> {
    let connector = tls_connector_as(roots, identity);
    let seen = Seen::default();
    let record = seen.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let (connector, record) = (connector.clone(), record.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await?;
                let (_, session) = tls.get_ref();
                assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
                let cert = session.peer_certificates().unwrap()[0].clone();
                record.lock().push(cert);
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok((channel, seen))
}

/// A TLS client that verifies against `roots` and offers ALPN h2, as gRPC clients do.
fn tls_connector(
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> tokio_rustls::TlsConnector {
    tls_connector_as(roots, None)
}

/// A client certificate chain and its key.
type ClientIdentity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// [`tls_connector`], presenting `identity` when the server asks for a certificate.
fn tls_connector_as(
    roots: &[rustls::pki_types::CertificateDer<'static>],
    identity: Option<ClientIdentity>,
) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store);
    let mut config = match identity {
        Some((chain, key)) => config.with_client_auth_cert(chain, key).unwrap(),
        None => config.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> (tonic::transport::Channel, Seen) {
    tls_channel_result(addr, roots).await.unwrap()
}

/// One routed request over `channel`: an ext_proc answer naming a pool endpoint.
async fn routed_over(channel: tonic::transport::Channel) {
    let mut s = Stream::on(channel).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    let a = routing_answer(&s.recv().await);
    assert!(
        a.destination().starts_with("127.0.0.1"),
        "{}",
        a.destination()
    );
}

#[tokio::test]
async fn tls_serving_routes_over_a_verified_handshake() {
    let a = epp::tls::self_signed().unwrap();
    let dir = CertDir::new("tls-serving", &a);
    let epp = start_epp(
        three(),
        EppOptions {
            server_tls: Some(epp::tls::ServerTls::from_dir(&dir.dir, None).unwrap()),
            ..Default::default()
        },
    )
    .await;
    // A real handshake: the chain verifies against A for the name localhost, ALPN is h2, and
    // the certificate presented is A, the one the server says it serves.
    let (channel, seen) = tls_channel(epp.grpc, &[der(&a)]).await;
    routed_over(channel).await;
    assert_eq!(seen.lock().as_slice(), &[der(&a)]);
    let served = epp.handles.certificate.as_ref().unwrap().status();
    assert_eq!(
        served.borrow().fingerprint,
        epp::tls::fingerprint(der(&a).as_ref())
    );
    // The server's HTTP/2 settings apply over TLS: its SETTINGS frame carries the stream limit
    // (100,000, not hyper's 200).
    let tcp = tokio::net::TcpStream::connect(epp.grpc).await.unwrap();
    let tls = tls_connector(&[der(&a)])
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (_client, mut connection) = h2::client::handshake(tls).await.unwrap();
    let limit = tokio::time::timeout(
        TIMEOUT,
        std::future::poll_fn(|cx| {
            let closed = std::pin::Pin::new(&mut connection).poll(cx).is_ready();
            let limit = connection.max_concurrent_send_streams();
            if closed || limit != usize::MAX {
                std::task::Poll::Ready(limit)
            } else {
                std::task::Poll::Pending
            }
        }),
    )
    .await
    .expect("the server's SETTINGS in time");
    assert_eq!(limit, 100_000);
    // A client trusting another certificate refuses the handshake.
    let other = epp::tls::self_signed().unwrap();
    assert!(tls_channel_result(epp.grpc, &[der(&other)]).await.is_err());
    // A plaintext client cannot talk to the TLS port.
    let plain = tonic::transport::Channel::from_shared(format!("http://{}", epp.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c =
            ext_proc::envoy::ext_proc::external_processor_client::ExternalProcessorClient::new(ch);
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        assert!(
            c.process(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .is_err()
        );
    }
    // The self-signed default serves TLS too, with the certificate it reports.
    let epp = start_epp(
        three(),
        EppOptions {
            tls: true,
            ..Default::default()
        },
    )
    .await;
    let status = epp.handles.certificate.as_ref().unwrap().status();
    let fingerprint = status.borrow().fingerprint;
    // Trusting A (not the self-signed certificate) the handshake must fail; the failure
    // proves the port speaks TLS with another certificate.
    let refused = tls_channel_result(epp.grpc, &[der(&a)]).await;
    assert!(refused.is_err());
    assert_ne!(fingerprint, epp::tls::fingerprint(der(&a).as_ref()));
}

#[tokio::test]
async fn cert_reload_serves_the_new_certificate_to_new_connections_only() {
    let (a, b) = (
        epp::tls::self_signed().unwrap(),
        epp::tls::self_signed().unwrap(),
    );
    let mut dir = CertDir::new("cert-reload", &a);
    let epp = start_epp(
        three(),
        EppOptions {
            server_tls: Some(
                epp::tls::ServerTls::from_dir(&dir.dir, Some(std::time::Duration::from_millis(20)))
                    .unwrap(),
            ),
            ..Default::default()
        },
    )
    .await;
    let roots = [der(&a), der(&b)];
    let (old, old_seen) = tls_channel(epp.grpc, &roots).await;
    routed_over(old.clone()).await;
    assert_eq!(old_seen.lock().as_slice(), &[der(&a)]);

    // B replaces A: wait until the server says it serves B (bounded), then a new connection
    // gets B.
    let mut status = epp.handles.certificate.as_ref().unwrap().status();
    dir.publish(&b.cert_pem, &b.key_pem);
    let b_print = epp::tls::fingerprint(der(&b).as_ref());
    tokio::time::timeout(TIMEOUT, status.wait_for(|s| s.fingerprint == b_print))
        .await
        .expect("B served in time")
        .unwrap();
    let (new, new_seen) = tls_channel(epp.grpc, &roots).await;
    routed_over(new.clone()).await;
    assert_eq!(new_seen.lock().as_slice(), &[der(&b)]);
    // The open connection keeps A: it still routes, and it was never re-made.
    routed_over(old.clone()).await;
    assert_eq!(old_seen.lock().as_slice(), &[der(&a)]);

    // A bad pair (B's certificate with A's key) is refused; B stays.
    let rejected = status.borrow().rejected;
    dir.publish(&b.cert_pem, &a.key_pem);
    tokio::time::timeout(TIMEOUT, status.wait_for(|s| s.rejected > rejected))
        .await
        .expect("the bad pair is seen and refused in time")
        .unwrap();
    assert_eq!(status.borrow().fingerprint, b_print);
    let (after, after_seen) = tls_channel(epp.grpc, &roots).await;
    routed_over(after).await;
    assert_eq!(after_seen.lock().as_slice(), &[der(&b)]);
    // And a good pair after it is taken again.
    dir.publish(&a.cert_pem, &a.key_pem);
    let a_print = epp::tls::fingerprint(der(&a).as_ref());
    tokio::time::timeout(TIMEOUT, status.wait_for(|s| s.fingerprint == a_print))
        .await
        .expect("A served again in time")
        .unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(TIMEOUT, conn.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The readiness service's status, as a gateway's health check reads it.
async fn readiness(
    client: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
) -> i32 {
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Readiness first, then the drain: once shutdown begins and for `--shutdown-delay`, health
/// says NOT_SERVING while new connections and streams are still routed. Cutting the delay
/// short (a second signal) closes the listeners, and serving ends once open streams drain.
#[tokio::test]
async fn the_shutdown_delay_keeps_serving_while_not_ready() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let cut_short = tokio_util::sync::CancellationToken::new();
    let mut epp = start_epp(
        three(),
        EppOptions {
            shutdown_delay: epp::server::ShutdownDelay {
                delay: std::time::Duration::from_secs(3600),
                cut_short: cut_short.clone(),
            },
            // Far longer than serving takes to end by the drain, so that a slow machine cannot
            // be mistaken for the grace running out.
            drain_grace: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .await;
    let channel = connect(epp.health).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let until = |want: ServingStatus| want as i32;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while readiness(&mut health).await != until(ServingStatus::Serving) {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    epp.shutdown.cancel();
    while readiness(&mut health).await != until(ServingStatus::NotServing) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready after shutdown began"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Not ready, yet a new connection's request is routed.
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(&chat("m", "hi", false), true)).await;
    assert!(
        routing_answer(&s.recv().await)
            .destination()
            .starts_with("127.0.0.1")
    );
    assert!(!epp.task.is_finished(), "still serving");
    // The stream done, nothing is left to drain: serving ends as soon as the delay is cut
    // short, long before the drain grace (60 s here) would end it.
    drop(s);
    cut_short.cancel();
    tokio::time::timeout(TIMEOUT, &mut epp.task)
        .await
        .expect("serving ends by the drain once the delay is cut short, not by the grace")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(epp.grpc).await.is_err(),
        "the listener is closed"
    );
}

/// Flow control on, one band; an empty pool holds requests for a minute.
const FLOW_CONTROL: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nplugins:\n- type: queue-scorer\nflowControl:\n  defaultRequestTTL: 60s\n  noEndpointRequestTTL: 60s\n";

/// While a request waits in flow control the EPP holds what else its stream sends, to answer
/// after the decision: trailers (what Envoy sends then) are held and answered; a client of the
/// port that sends megabytes instead is cut off, and its request leaves the queue.
#[tokio::test]
async fn a_queued_stream_holds_trailers_but_not_megabytes() {
    let epp = start_epp(
        pool(vec![]),
        EppOptions {
            config: FLOW_CONTROL.into(),
            ..Default::default()
        },
    )
    .await;
    let flow = epp.handles.director.flow_control().unwrap().clone();
    let queued = |n: u64| {
        let flow = flow.clone();
        async move {
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            while flow.queued() != n {
                assert!(tokio::time::Instant::now() < deadline, "never {n} queued");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    };
    let open_queued = || async {
        let s = Stream::open(epp.grpc).await;
        s.send(req_headers(CHAT_HEADERS, false, None)).await;
        s.send(req_body(&chat("m", "hi", false), false)).await;
        s
    };
    // Trailers end the body: the request is queued, and its trailers answered later.
    let mut patient = open_queued().await;
    patient
        .send(ext_proc::envoy::ext_proc::ProcessingRequest {
            request: Some(
                ext_proc::envoy::ext_proc::processing_request::Request::RequestTrailers(
                    Default::default(),
                ),
            ),
            ..Default::default()
        })
        .await;
    queued(1).await;
    let mut greedy = open_queued().await;
    greedy.send(req_body(b"", true)).await;
    queued(2).await;
    // 2 MiB more while waiting: cut off, and out of the queue.
    greedy.send(resp_body(&vec![b'x'; 2 << 20], false)).await;
    let ended = tokio::time::timeout(TIMEOUT, greedy.rx.message())
        .await
        .expect("the stream ends");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    queued(1).await;
    // A message of more headers than Envoy sends while waiting: the stream ends with the
    // refusal's status, and leaves the queue.
    let mut flooding = open_queued().await;
    flooding.send(req_body(b"", true)).await;
    queued(2).await;
    flooding.send(too_many_headers()).await;
    let ended = tokio::time::timeout(TIMEOUT, flooding.rx.message())
        .await
        .expect("the stream ends");
    assert_eq!(
        ended.expect_err("with a status").code(),
        tonic::Code::ResourceExhausted
    );
    queued(1).await;
    // An endpoint arrives: the patient request is routed, then its trailers are answered.
    epp.handles.datastore.apply(pool(vec![endpoint(11, 8000)]));
    set_queues(&epp, &[0]);
    assert!(
        routing_answer(&patient.recv().await)
            .destination()
            .starts_with("127.0.0.11")
    );
    streamed_body(&patient.recv().await);
    assert!(matches!(
        patient.recv().await.response,
        Some(processing_response::Response::RequestTrailers(_))
    ));
}

/// A CA and a client certificate it signed, and a client certificate no CA of the server's
/// signed.
fn client_identities() -> (String, ClientIdentity, ClientIdentity) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let identity = |issued_by_ca: bool| {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["gateway".to_owned()]).unwrap();
        let cert = if issued_by_ca {
            params.signed_by(&key, &ca).unwrap()
        } else {
            params.self_signed(&key).unwrap()
        };
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![cert.der().clone()], key)
    };
    (ca.pem(), identity(true), identity(false))
}

/// `--client-ca-path`: with it, only a client whose certificate chains to the CA opens
/// ext_proc streams; one without a certificate, or with another, fails the handshake.
#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_given() {
    let server = epp::tls::self_signed().unwrap();
    let dir = CertDir::new("mtls", &server);
    let (ca_pem, gateway, stranger) = client_identities();
    let ca_path = dir.dir.join("client-ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    let tls = epp::tls::ServerTls::from_dir(&dir.dir, None)
        .unwrap()
        .require_client_certificates(&ca_path)
        .unwrap();
    let epp = start_epp(
        three(),
        EppOptions {
            server_tls: Some(tls),
            ..Default::default()
        },
    )
    .await;
    let roots = [der(&server)];
    let (channel, _) = tls_channel_as(epp.grpc, &roots, Some(gateway))
        .await
        .unwrap();
    routed_over(channel).await;
    // TLS 1.3 reports a refused client certificate after the handshake: the first request on
    // the connection fails, if the connection itself did not.
    for identity in [None, Some(stranger)] {
        let refused = match tls_channel_as(epp.grpc, &roots, identity).await {
            Err(_) => true,
            Ok((channel, _)) => {
                let mut client = ext_proc::envoy::ext_proc::external_processor_client::ExternalProcessorClient::new(channel);
                let (_tx, rx) = tokio::sync::mpsc::channel(1);
                client
                    .process(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .is_err()
            }
        };
        assert!(refused, "a client without the CA's certificate was served");
    }
    // A bundle with no certificate is refused at start-up.
    let empty = dir.dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let e = epp::tls::ServerTls::self_signed()
        .unwrap()
        .require_client_certificates(&empty)
        .unwrap_err();
    assert!(e.to_string().contains("no certificate"), "{e}");
}
