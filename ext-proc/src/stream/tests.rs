//! The state machine driven message by message, with no gRPC and no Envoy: every answer and
//! every event reported to the recorder is checked directly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::datastore::{Datastore, EngineMetrics, test_util::pool};
use endpoint_picker::director::{Director, ModelRewrite, Policies, RewriteRule, RewriteTarget};
use endpoint_picker::request::InferenceRequest;
use parking_lot::Mutex;

use super::*;
use crate::envoy::BodySendMode;
use crate::envoy::ext_proc::processing_response;
use crate::recorder::{RecordKey, Recorder, Scheduled};
use crate::test_util::*;

/// Records the events the stream reports, as short strings.
#[derive(Debug, Default)]
struct Events(Mutex<Vec<String>>);

impl Recorder for Events {
    fn on_scheduled(&self, s: &Scheduled<'_>) {
        let outcome = match s.outcome {
            Ok(r) => r.destination(),
            Err(e) => e.to_string(),
        };
        self.0.lock().push(format!("scheduled {outcome}"));
    }
    fn on_routed(&self, r: &InferenceRequest, rewritten: bool, _: Duration) -> RecordKey {
        self.0.lock().push(format!(
            "routed {}->{} rewritten={rewritten}",
            r.model, r.target_model
        ));
        RecordKey {
            model: Arc::from(r.model.as_str()),
            target_model: Arc::from(r.target_model.as_str()),
            ..RecordKey::default()
        }
    }
    fn on_rejected(&self, _: Option<&InferenceRequest>, e: &RequestError) {
        self.0.lock().push(format!("rejected {}", e.code()));
    }
    fn on_complete(&self, c: &crate::recorder::Completion<'_>) {
        self.0.lock().push(format!(
            "complete {:?}",
            c.usage.map(|u| u.completion_tokens)
        ));
    }
    fn on_released(&self, key: &RecordKey) {
        self.0.lock().push(format!("released {}", key.model));
    }
    fn on_response_overflow(&self, rewrite: bool) {
        self.0.lock().push(format!("overflow rewrite={rewrite}"));
    }
    fn on_observed(&self, o: &crate::recorder::Observation<'_>) {
        let priority = match &*o.key.priority {
            "" => String::new(),
            p => format!(" priority={p}"),
        };
        self.0.lock().push(format!(
            "observed {} tokens={:?} ttft={:?} bytes={:?}{priority}",
            o.key.model,
            o.usage.map(|u| u.completion_tokens),
            o.time_to_first_chunk,
            o.response_bytes
        ));
    }
    fn on_observer_stream(&self, outcome: crate::recorder::ObserverOutcome) {
        self.0.lock().push(format!("observer {}", outcome.as_str()));
    }
    fn observed_key(&self, model: &str, target_model: &str, _: &str, p: Option<i32>) -> RecordKey {
        RecordKey {
            model: Arc::from(model),
            target_model: Arc::from(target_model),
            priority: p.map_or_else(|| Arc::from(""), |p| Arc::from(p.to_string())),
            ..RecordKey::default()
        }
    }
}

struct Harness {
    director: Arc<Director>,
    events: Arc<Events>,
    options: ServiceOptions,
}

impl Harness {
    fn new(endpoints: u8) -> Self {
        Self::with_config(endpoints, endpoint_picker::config::REFERENCE_DEFAULT_CONFIG)
    }

    /// Installs a token producer whose tokenizer gives every prompt three ids ([`ThreeIds`]).
    fn produce_three_token_ids(&self) {
        assert!(self.director.set_token_producer(Arc::new(
            endpoint_picker::tokens::TokenProducer::new(
                "tokens".into(),
                Arc::new(ThreeIds),
                endpoint_picker::tokens::PoolLimits::default(),
            )
        )));
    }

    fn with_config(endpoints: u8, config: &str) -> Self {
        let ds = Arc::new(Datastore::new());
        for e in ds.apply(pool(endpoints)).endpoints.iter() {
            e.store_metrics(EngineMetrics {
                updated_at: Some(tokio::time::Instant::now()),
                ..Default::default()
            });
        }
        Self {
            director: Arc::new(Director::new(
                ds,
                Arc::new(endpoint_picker::config::load(config, 1).unwrap()),
                1,
            )),
            events: Arc::new(Events::default()),
            options: ServiceOptions::default(),
        }
    }

    fn ctx(&self) -> Arc<ServiceContext> {
        Arc::new(ServiceContext {
            director: self.director.clone(),
            recorder: self.events.clone(),
            options: self.options.clone(),
        })
    }

    fn stream(&self) -> StreamState {
        StreamState::new(self.ctx())
    }

    fn events(&self) -> Vec<String> {
        std::mem::take(&mut *self.events.0.lock())
    }

    /// The last `routed …` event since the previous call.
    fn routed(&self) -> String {
        self.events()
            .into_iter()
            .rfind(|e| e.starts_with("routed"))
            .unwrap_or_default()
    }
}

fn post(path: &str, extra: &[(&str, &str)]) -> ProcessingRequest {
    let mut h = vec![
        (":method", "POST"),
        (":path", path),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(extra);
    req_headers(&h, false, None)
}

fn chat(model: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
    }))
    .unwrap()
}

/// Sends a chat request (headers, then the body in one message) and returns the answers.
fn send_chat(s: &mut StreamState, model: &str, extra: &[(&str, &str)]) -> Vec<ProcessingResponse> {
    assert!(
        s.on_message(post("/v1/chat/completions", extra)).is_empty(),
        "headers deferred"
    );
    s.on_message(req_body(&chat(model), true))
}

#[tokio::test(start_paused = true)]
async fn a_body_is_answered_once_with_headers_then_body_and_released_at_the_end() {
    let h = Harness::new(2);
    let mut s = h.stream();
    assert!(s.on_message(post("/v1/completions", &[])).is_empty());
    let body = br#"{"model":"m","prompt":"hello"}"#;
    assert!(s.on_message(req_body(&body[..10], false)).is_empty());
    let out = s.on_message(req_body(&body[10..], true));
    assert_eq!(out.len(), 2);
    let a = routing_answer(&out[0]);
    assert!(a.destination().starts_with("10.0.0."));
    assert_eq!(a.metadata_destination.as_deref(), Some(a.destination()));
    assert_eq!(a.header("content-length"), Some("30"));
    assert_eq!(streamed_body(&out[1]), (body.to_vec(), true));
    assert_eq!(s.request_id().len(), 36, "generated");
    let dest = a.destination().to_owned();
    assert_eq!(
        h.events(),
        [
            format!("scheduled {dest}"),
            "routed m->m rewritten=false".into()
        ]
    );
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    let usage = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
    let out = s.on_message(resp_body(usage, true));
    assert_eq!(streamed_body(&out[0]), (usage.to_vec(), true));
    assert!(s.exchange_complete());
    assert_eq!(h.events(), ["complete Some(3)", "released m"]);
    drop(s);
    assert!(h.events().is_empty(), "released exactly once");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_stream_releases_its_request() {
    let h = Harness::new(1);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    drop(s);
    assert_eq!(h.events(), ["released m"]);
}

/// Found by the `stream` fuzz target: a second request on one stream (not something Envoy
/// sends, but anything that can reach the port can) replaced the first routed request without
/// releasing it, so the recorder saw two `on_routed` and one `on_released`.
#[tokio::test(start_paused = true)]
async fn a_second_request_on_one_stream_releases_the_first() {
    let h = Harness::new(2);
    let mut s = h.stream();
    send_chat(&mut s, "a", &[]);
    send_chat(&mut s, "b", &[]);
    let events = h.events();
    let routed_a = events
        .iter()
        .position(|e| e.starts_with("routed a"))
        .unwrap();
    let released_a = events.iter().position(|e| e == "released a").unwrap();
    let routed_b = events
        .iter()
        .position(|e| e.starts_with("routed b"))
        .unwrap();
    assert!(routed_a < released_a && released_a < routed_b, "{events:?}");
    drop(s);
    assert_eq!(h.events(), ["released b"]);
}

/// A second request on one stream starts afresh: the first's completed response does not
/// keep the second's from being recorded, and the first's model rewrite is not applied to the
/// second's answer.
#[tokio::test(start_paused = true)]
async fn a_second_request_on_one_stream_does_not_inherit_the_first_ones_response() {
    let h = Harness::new(1);
    operator_rewrite(&h);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    s.on_message(resp_headers(&[(":status", "200")], true, None));
    let first = h.events();
    assert!(first.iter().any(|e| e.starts_with("complete")), "{first:?}");
    send_chat(&mut s, "x", &[]);
    assert!(h.routed().starts_with("routed x->x"));
    s.on_message(resp_headers(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
        None,
    ));
    // The first request's rewrite (m-canary back to m) is not the second's.
    let event = b"data: {\"model\":\"m-canary\"}\n\n";
    let out = s.on_message(resp_body(event, true));
    assert_eq!(streamed_body(&out[0]), (event.to_vec(), true));
    let second = h.events();
    assert!(
        second.iter().any(|e| e.starts_with("complete")),
        "{second:?}"
    );
    drop(s);
}

/// A request with no body API whose stream ends with an empty body message (sent chunked with
/// an empty last chunk; HTTP/2 headers, then an empty DATA frame) is routed on its headers as
/// the same request ending at its headers is, in either body mode, instead of refused as an
/// empty completions body. Body APIs are still refused.
#[tokio::test(start_paused = true)]
async fn a_request_without_a_body_api_ending_with_an_empty_body_is_routed() {
    let h = Harness::new(1);
    let get = [(":method", "GET"), (":path", "/v1/models")];
    let mut s = h.stream();
    assert!(s.on_message(req_headers(&get, false, None)).is_empty());
    let out = s.on_message(req_body(b"", true));
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        routing_answer(&out[0])
            .destination()
            .starts_with("10.0.0.1")
    );
    assert_eq!(streamed_body(&out[1]), (Vec::new(), true));
    // BUFFERED: routed by the body's answer.
    let mut s = h.stream();
    s.on_message(with_request_body_mode(
        req_headers(&get, false, None),
        BodySendMode::Buffered,
    ));
    let out = s.on_message(req_body(b"", true));
    let (a, new_body) = buffered_routing_answer(&out[0]);
    assert!(a.destination().starts_with("10.0.0.1"));
    assert_eq!(new_body, None);
    // A body API with an empty body is still what vLLM would refuse.
    let mut s = h.stream();
    s.on_message(post("/v1/chat/completions", &[]));
    let out = s.on_message(req_body(b"", true));
    assert_eq!(immediate(&out[0]).0, 400);
}

#[tokio::test(start_paused = true)]
async fn headers_only_requests_route_at_once_but_empty_bodies_of_body_apis_are_refused() {
    let h = Harness::new(1);
    let mut s = h.stream();
    let out = s.on_message(req_headers(
        &[(":method", "GET"), (":path", "/v1/models")],
        true,
        None,
    ));
    assert!(
        routing_answer(&out[0])
            .destination()
            .starts_with("10.0.0.1")
    );
    for (method, path, ct) in [
        ("POST", "/v1/chat/completions", ""),
        ("POST", "/v1/completions", "application/json"),
        ("POST", "/custom/generate", "application/json"),
    ] {
        let mut s = h.stream();
        let mut headers = vec![(":method", method), (":path", path)];
        if !ct.is_empty() {
            headers.push(("content-type", ct));
        }
        let out = s.on_message(req_headers(&headers, true, None));
        let (status, body) = immediate(&out[0]);
        assert_eq!(status, 400, "{path}");
        assert!(body.contains("empty body"), "{body}");
        assert!(s.is_done());
    }
}

#[tokio::test(start_paused = true)]
async fn hostile_model_names_get_a_short_400_and_reach_no_scheduler() {
    let h = Harness::new(1);
    for model in [
        "x".repeat(4 << 20),
        "m\n2026 INFO forged\u{1b}[31m".to_owned(),
    ] {
        let mut s = h.stream();
        let out = send_chat(&mut s, &model, &[]);
        let (status, body) = immediate(&out[0]);
        assert_eq!(status, 400);
        assert!(body.len() < 200, "{}", body.len());
        assert!(!body.contains('\n') && !body.contains('\u{1b}'), "{body:?}");
        assert_eq!(h.events(), ["rejected BadRequest"]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_mebibyte_in_a_wrongly_typed_field_is_not_reflected() {
    let h = Harness::new(1);
    let mut s = h.stream();
    s.on_message(post("/v1/chat/completions", &[]));
    let body = format!(
        r#"{{"model":"m","stream":"{}","messages":[{{"role":"user","content":"x"}}]}}"#,
        "B".repeat(1 << 20)
    );
    let out = s.on_message(req_body(body.as_bytes(), true));
    let (status, text) = immediate(&out[0]);
    assert_eq!(status, 400);
    assert!(text.contains("\"stream\" must be a boolean"), "{text}");
    assert!(!text.contains("BBBB"));
    // A top-level string is not an object: the serde message is truncated, not echoed.
    let mut s = h.stream();
    s.on_message(post("/v1/chat/completions", &[]));
    let out = s.on_message(req_body(
        format!("\"{}\"", "B".repeat(1 << 20)).as_bytes(),
        true,
    ));
    let (status, text) = immediate(&out[0]);
    assert_eq!(status, 400);
    assert!(text.len() < 400, "{}", text.len());
}

#[tokio::test(start_paused = true)]
async fn malformed_shapes_name_the_field() {
    let h = Harness::new(1);
    for (path, body, field) in [
        (
            "/v1/completions",
            r#"{"model":"m","prompt":{"a":1}}"#,
            "prompt",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":"hi"}"#,
            "messages",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":{"role":"user"}}"#,
            "messages",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":["hi"]}"#,
            "messages",
        ),
        (
            "/v1/embeddings",
            r#"{"model":"m","input":{"x":1}}"#,
            "input",
        ),
        (
            "/v1/responses",
            r#"{"model":"m","input":"q","instructions":[1]}"#,
            "instructions",
        ),
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"p","cache_salt":5}"#,
            "cache_salt",
        ),
    ] {
        let mut s = h.stream();
        s.on_message(post(path, &[]));
        let out = s.on_message(req_body(body.as_bytes(), true));
        let (status, text) = immediate(&out[0]);
        assert_eq!(status, 400, "{body}");
        assert!(text.contains(&format!("{field:?}")), "{text}");
    }
}

fn operator_rewrite(h: &Harness) {
    h.director.set_policies(Policies {
        rewrites: vec![ModelRewrite {
            name: "canary".into(),
            created: 1,
            rules: vec![RewriteRule {
                matches: vec!["m".into()],
                targets: vec![RewriteTarget {
                    model: "m-canary".into(),
                    weight: 1,
                }],
            }],
        }],
        ..Default::default()
    });
}

#[tokio::test(start_paused = true)]
async fn a_client_rewrite_header_is_ignored_unless_trusted_and_never_beats_the_operator() {
    let mut h = Harness::new(1);
    for header in ["x-gateway-model-name-rewrite", "x-llm-d-model-name-rewrite"] {
        let mut s = h.stream();
        send_chat(&mut s, "free", &[(header, "client-choice")]);
        assert_eq!(h.routed(), "routed free->free rewritten=false", "{header}");
    }
    h.options.trust_model_rewrite_header = true;
    let mut s = h.stream();
    send_chat(
        &mut s,
        "free",
        &[("x-llm-d-model-name-rewrite", "gateway-choice")],
    );
    assert_eq!(h.routed(), "routed free->gateway-choice rewritten=true");
    operator_rewrite(&h);
    let mut s = h.stream();
    let out = send_chat(
        &mut s,
        "m",
        &[("x-llm-d-model-name-rewrite", "client-choice")],
    );
    assert_eq!(h.routed(), "routed m->m-canary rewritten=true");
    let (body, _) = streamed_body(&out[1]);
    assert!(String::from_utf8(body).unwrap().contains("\"m-canary\""));
    let mut s = h.stream();
    let out = send_chat(
        &mut s,
        "free",
        &[("x-llm-d-model-name-rewrite", "bad\nname")],
    );
    assert_eq!(immediate(&out[0]).0, 400);
}

/// Records the priority and fairness id of each routed request.
#[derive(Debug, Default)]
struct Routings(Mutex<Vec<(i32, String)>>);

impl Recorder for Routings {
    fn on_routed(&self, r: &InferenceRequest, _: bool, _: Duration) -> RecordKey {
        self.0.lock().push((r.priority, r.fairness_id.clone()));
        RecordKey::default()
    }
}

#[tokio::test(start_paused = true)]
async fn control_headers_are_read_under_both_names_and_validated() {
    let h = Harness::new(1);
    h.director.set_policies(Policies {
        objectives: [("batch".to_string(), -1), ("premium".to_string(), 5)]
            .into_iter()
            .collect(),
        ..Default::default()
    });
    let routings = Arc::new(Routings::default());
    let ctx = Arc::new(ServiceContext {
        director: h.director.clone(),
        recorder: routings.clone(),
        options: h.options.clone(),
    });
    let priority_of = |headers: &[(&str, &str)]| {
        let mut s = StreamState::new(ctx.clone());
        send_chat(&mut s, "m", headers);
        routings.0.lock().pop()
    };
    assert_eq!(priority_of(&[]), Some((0, "default-flow".into())));
    assert_eq!(
        priority_of(&[("x-gateway-inference-objective", "batch")]),
        Some((-1, "default-flow".into()))
    );
    assert_eq!(
        priority_of(&[
            ("x-llm-d-inference-objective", "premium"),
            ("x-gateway-inference-objective", "batch"),
            ("x-llm-d-inference-fairness-id", "tenant-a"),
        ]),
        Some((5, "tenant-a".into())),
        "the current name wins"
    );
    for bad in [
        ("x-llm-d-inference-objective", "Batch\n"),
        ("x-llm-d-inference-fairness-id", "tenant a"),
    ] {
        let mut s = h.stream();
        let out = send_chat(&mut s, "m", &[bad]);
        let (status, body) = immediate(&out[0]);
        assert_eq!(status, 400, "{bad:?}");
        assert!(body.contains(bad.0), "{body}");
    }
    // Review 17: a gateway that appends its value instead of replacing the client's left the
    // client's copy first, which was read. Copies that disagree are refused; alike, read.
    for header in [
        "x-llm-d-inference-objective",
        "x-llm-d-inference-fairness-id",
        "x-slo-ttft-ms",
    ] {
        let mut s = h.stream();
        let out = send_chat(&mut s, "m", &[(header, "premium"), (header, "batch")]);
        let (status, body) = immediate(&out[0]);
        assert_eq!(status, 400, "{header}");
        assert!(body.contains("more than once"), "{body}");
    }
    assert_eq!(
        priority_of(&[
            ("x-llm-d-inference-objective", "premium"),
            ("x-llm-d-inference-objective", " premium"),
        ]),
        Some((5, "default-flow".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn client_routing_headers_are_removed_and_unfit_request_ids_replaced() {
    let h = Harness::new(1);
    let mut s = h.stream();
    let out = send_chat(
        &mut s,
        "m",
        &[
            ("x-gateway-destination-endpoint-served", "6.6.6.6:80"),
            ("x-gateway-destination-endpoint", "6.6.6.6:80"),
            ("x-request-id", "id\u{1b}[2J"),
            // A peer for the model server to pull KV blocks from: the EPP's to name.
            ("x-kv-cache-source-host-port", "6.6.6.6:80"),
        ],
    );
    let a = routing_answer(&out[0]);
    assert!(a.destination().starts_with("10.0.0.1"));
    assert_eq!(
        a.remove,
        [
            "x-gateway-destination-endpoint-served",
            "x-kv-cache-source-host-port"
        ]
    );
    assert_eq!(a.header("x-kv-cache-source-host-port"), None);
    assert_eq!(a.header("x-request-id").map(str::len), Some(36));
    let mut s = h.stream();
    send_chat(&mut s, "m", &[("x-request-id", "abc-123")]);
    assert_eq!(s.request_id(), "abc-123");
}

#[tokio::test(start_paused = true)]
async fn refusals_carry_the_dropped_reason() {
    let h = Harness::new(0);
    let mut s = h.stream();
    let out = send_chat(&mut s, "m", &[]);
    assert_eq!(immediate(&out[0]).0, 503);
    assert_eq!(
        immediate_header(&out[0], "x-llm-d-request-dropped-reason").as_deref(),
        Some("rejected-no-endpoints")
    );
    assert!(
        s.on_message(req_body(b"late", true)).is_empty(),
        "done: no more answers"
    );
}

#[tokio::test(start_paused = true)]
async fn too_large_bodies_get_413() {
    let mut h = Harness::new(1);
    h.options.max_request_body_bytes = 10;
    let mut s = h.stream();
    s.on_message(post("/v1/completions", &[]));
    let out = s.on_message(req_body(&[b' '; 11], false));
    assert_eq!(immediate(&out[0]).0, 413);
}

/// Review (deployments): the shipped routes send every path to the pool, so an engine's
/// administration endpoints (vLLM's runtime LoRA loading) were routed like completions for any
/// client that added a `model`. They are answered 404 at the headers, however spelt, and
/// nothing is routed.
#[tokio::test(start_paused = true)]
async fn engine_admin_paths_are_refused_at_the_headers() {
    let h = Harness::new(1);
    for path in [
        "/v1/load_lora_adapter",
        "/v1/%75nload_lora_adapter",
        "/flush_cache?x",
    ] {
        let mut s = h.stream();
        let out = s.on_message(post(path, &[]));
        assert_eq!(immediate(&out[0]).0, 404, "{path}");
        assert!(
            s.on_message(req_body(&chat("m"), true)).is_empty(),
            "{path}: done, nothing routed"
        );
    }
    // Review: what an engine's server decodes into the same endpoint (a trailing newline, an
    // encoded slash) is refused as malformed.
    for path in ["/v1/load_lora_adapter%0A", "/v1%2Fload_lora_adapter"] {
        let mut s = h.stream();
        let out = s.on_message(post(path, &[]));
        assert_eq!(immediate(&out[0]).0, 400, "{path}");
    }
    // An inference path still routes.
    let mut s = h.stream();
    assert!(s.on_message(post("/v1/chat/completions", &[])).is_empty());
    let out = s.on_message(req_body(&chat("m"), true));
    routing_answer(&out[0]).destination();
}

/// Bodies gathered by every stream together are capped: a chunk that would pass the budget
/// ends its request with 429 `rejected-saturated` and gives its charge back; a routed request
/// gives its charge back too, so the budget never leaks.
#[tokio::test(start_paused = true)]
async fn gathered_bodies_share_one_budget() {
    let mut h = Harness::new(1);
    let budget = Arc::new(BodyBudget::new(100));
    h.options.gathered_request_bytes = budget.clone();
    let body = br#"{"model":"m","prompt":"0123456789012345678901234567890123456789"}"#;
    let (head, tail) = body.split_at(60);

    let mut slow = h.stream();
    s_post(&mut slow);
    assert!(slow.on_message(req_body(head, false)).is_empty());
    assert_eq!(budget.held(), 60);
    // A second stream's chunk would pass 100 bytes: refused, its own charge given back.
    let mut greedy = h.stream();
    s_post(&mut greedy);
    assert!(greedy.on_message(req_body(&body[..30], false)).is_empty());
    let out = greedy.on_message(req_body(&body[30..], false));
    assert_eq!(immediate(&out[0]).0, 429);
    assert_eq!(
        immediate_header(&out[0], "x-llm-d-request-dropped-reason").as_deref(),
        Some("rejected-saturated")
    );
    assert!(greedy.is_done());
    assert_eq!(budget.held(), 60, "the refused stream holds nothing");
    // The first finishes: routed, and its charge is back.
    // The answers as the service holds them until sent (not converted to prost copies).
    let out = slow.on_inbound(Inbound::from_message(req_body(tail, true)));
    assert_eq!(out.len(), 2, "routed, the body re-sent");
    assert_eq!(
        budget.held(),
        body.len(),
        "counted until the answers carrying it are sent"
    );
    drop(out);
    assert_eq!(budget.held(), 0);
    assert_eq!(
        h.events()
            .iter()
            .filter(|e| *e == "rejected ResourceExhausted")
            .count(),
        1
    );
    // A stream that goes away mid-body gives its charge back.
    let mut gone = h.stream();
    s_post(&mut gone);
    gone.on_message(req_body(head, false));
    assert_eq!(budget.held(), 60);
    drop(gone);
    assert_eq!(budget.held(), 0);
}

/// The buffer a declared `content-length` sizes is reserved, not charged: streams that declare
/// long bodies and send nothing cannot lock the others out of the budget (they once could:
/// 256 idle streams declaring 4 MiB took the default 1 GiB). Reservations stop at a quarter of
/// the budget; bytes are charged as they arrive.
#[tokio::test(start_paused = true)]
async fn a_declared_length_is_reserved_not_charged() {
    let mut h = Harness::new(1);
    let budget = Arc::new(BodyBudget::new(400));
    h.options.gathered_request_bytes = budget.clone();
    let body = br#"{"model":"m","prompt":"0123456789012345678901234"}"#;
    // Idle streams declaring long bodies: the first two reserve (100 bytes, a quarter of the
    // budget), the third gets an empty buffer; none is refused and nothing is charged.
    let mut idle: Vec<_> = (0..3).map(|_| h.stream()).collect();
    for s in &mut idle {
        assert!(
            s.on_message(post("/v1/completions", &[("content-length", "50")]))
                .is_empty()
        );
    }
    assert_eq!((budget.held(), budget.reserved()), (0, 100));
    // An honest request beside them is charged as its bytes come and routed.
    let declared = body.len().to_string();
    let mut honest = h.stream();
    assert!(
        honest
            .on_message(post("/v1/completions", &[("content-length", &declared)]))
            .is_empty()
    );
    assert_eq!(budget.reserved(), 100, "no room left to reserve");
    let (head, tail) = body.split_at(20);
    assert!(honest.on_message(req_body(head, false)).is_empty());
    assert_eq!(budget.held(), 20);
    let out = honest.on_inbound(Inbound::from_message(req_body(tail, true)));
    assert_eq!(out.len(), 2, "routed, the body re-sent");
    drop(out);
    assert_eq!(budget.held(), 0);
    drop(idle);
    assert_eq!((budget.held(), budget.reserved()), (0, 0));
    // A body longer than it declared is charged for every byte.
    let mut liar = h.stream();
    liar.on_message(post("/v1/completions", &[("content-length", "10")]));
    assert_eq!((budget.held(), budget.reserved()), (0, 10));
    liar.on_message(req_body(&body[..30], false));
    assert_eq!(budget.held(), 30);
    // Real bytes past the budget are still refused.
    let mut big = h.stream();
    big.on_message(post("/v1/completions", &[]));
    let out = big.on_message(req_body(&[b' '; 380], false));
    assert_eq!(immediate(&out[0]).0, 429);
    assert_eq!(budget.held(), 30, "the refused stream holds nothing");
    drop(liar);
    assert_eq!((budget.held(), budget.reserved()), (0, 0));
}

/// Review (session 6's open item): a chat prompt rebuilt around its tools is a copy beside the
/// body, and the token ids are another, each as long as the body at worst; neither was charged,
/// so chat bodies with tools held up to three times `--max-gathered-request-bytes`. Both are
/// charged now, until the request's answers have gone, and a copy that would pass the budget
/// refuses its request as a long body does.
#[tokio::test(start_paused = true)]
async fn a_copied_prompt_and_its_token_ids_are_charged_beside_the_body() {
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "messages": [{"role": "system", "content": "you are terse"},
                     {"role": "user", "content": "hello"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }))
    .unwrap();
    let copy = openai::parse_body(
        endpoint_picker::request::Api::ChatCompletions,
        &bytes::Bytes::from(body.clone()),
    )
    .unwrap()
    .prompt
    .len();
    assert!(copy > 0);
    let send = |s: &mut StreamState| {
        assert!(s.on_message(post("/v1/chat/completions", &[])).is_empty());
        s.on_message(req_body(&body, true))
    };

    let mut h = Harness::new(1);
    let budget = Arc::new(BodyBudget::new(1 << 20));
    h.options.gathered_request_bytes = budget.clone();
    h.produce_three_token_ids();
    let mut s = h.stream();
    assert!(send(&mut s).is_empty(), "waiting for its ids");
    assert_eq!(budget.held(), body.len() + copy, "the copy beside the body");
    let ids = s.pending_tokenization().unwrap().run().await;
    let out = s.on_token_ids(ids);
    assert_eq!(out.len(), 2, "routed, the body re-sent");
    assert_eq!(budget.held(), body.len() + copy + 3 * 4, "and the ids");
    drop(out);
    assert_eq!(budget.held(), 0);

    // A budget with room for the body but not for its copy: refused, nothing held.
    let mut h = Harness::new(1);
    let budget = Arc::new(BodyBudget::new(body.len() + copy - 1));
    h.options.gathered_request_bytes = budget.clone();
    let mut s = h.stream();
    let out = send(&mut s);
    assert_eq!(immediate(&out[0]).0, 429);
    assert!(s.is_done());
    assert_eq!(budget.held(), 0);
    // Alive: the same budget routes a chat body without tools (no copy).
    let mut plain = h.stream();
    assert!(
        plain
            .on_message(post("/v1/chat/completions", &[]))
            .is_empty()
    );
    let out = plain.on_message(req_body(&chat("m"), true));
    routing_answer(&out[0]).destination();
}

/// A request queued in flow control is no longer charged: flow control's own caps hold it.
#[tokio::test(start_paused = true)]
async fn a_queued_request_leaves_the_gathering_budget() {
    let mut h = Harness::with_config(0, FLOW_CONTROL);
    let budget = Arc::new(BodyBudget::new(1 << 20));
    h.options.gathered_request_bytes = budget.clone();
    let mut s = h.stream();
    assert!(send_chat(&mut s, "m", &[]).is_empty(), "queued");
    assert!(s.admission().is_some());
    assert_eq!(budget.held(), 0);
    let mut gathering = h.stream();
    s_post(&mut gathering);
    gathering.on_message(req_body(b"{\"model\"", false));
    assert_eq!(budget.held(), 8, "alive: a gathering stream is charged");
}

/// Review: once flow control let a request go, its body was counted nowhere until its answers
/// had gone out (flow control's `maxBytes` stops at dispatch). The gathering budget counts it
/// again until then.
#[tokio::test(start_paused = true)]
async fn a_dispatched_body_is_charged_until_its_answers_go() {
    let mut h = Harness::with_config(1, FLOW_CONTROL);
    let budget = Arc::new(BodyBudget::new(1 << 20));
    h.options.gathered_request_bytes = budget.clone();
    let (token, task) = dispatcher(&h);
    let mut s = h.stream();
    assert!(send_chat(&mut s, "m", &[]).is_empty(), "queued");
    assert_eq!(
        budget.held(),
        0,
        "flow control's caps hold it while it waits"
    );
    let decision = s.admission().unwrap().wait().await;
    let answers = s.on_admission(decision);
    assert_eq!(answers.len(), 2, "routed, the body re-sent");
    assert_eq!(budget.held(), chat("m").len());
    drop(answers);
    assert_eq!(budget.held(), 0);
    token.cancel();
    task.await.unwrap();
}

fn s_post(s: &mut StreamState) {
    assert!(s.on_message(post("/v1/completions", &[])).is_empty());
}

/// A log sink for one test: every line the stream writes, in the console format operators read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(start_paused = true)]
async fn hostile_input_reaches_the_log_escaped_and_short() {
    let h = Harness::new(1);
    let logs = Captured::default();
    for json in [false, true] {
        let builder = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG);
        let _guard = if json {
            tracing::subscriber::set_default(builder.json().finish())
        } else {
            tracing::subscriber::set_default(builder.finish())
        };
        let forged = "m\n2026-11-29T00:00:00Z  INFO forged line\u{1b}[2J";
        // Refused: a control character in the model.
        send_chat(&mut h.stream(), forged, &[("x-request-id", "id\nforged")]);
        // Refused: a mebibyte in a wrongly typed field, or as the whole body.
        let mut s = h.stream();
        s.on_message(post("/v1/chat/completions", &[]));
        let big = format!(r#"{{"model":"m","stream":"{}"}}"#, "B".repeat(1 << 20));
        s.on_message(req_body(big.as_bytes(), true));
        let mut s = h.stream();
        s.on_message(post("/v1/completions", &[]));
        s.on_message(req_body(
            format!("[\"{}\"", "C".repeat(1 << 20)).as_bytes(),
            true,
        ));
        // Routed, with every debug line on: a model name that is valid but odd.
        send_chat(&mut h.stream(), "odd \"model\" \u{e9}", &[]);
    }
    let text = String::from_utf8(logs.0.lock().clone()).unwrap();
    assert!(text.contains("request rejected"), "{text}");
    assert!(
        text.contains("scheduled"),
        "debug lines were written: {text}"
    );
    for line in text.lines() {
        assert!(!line.contains("forged") || line.contains("\\n"), "{line}");
        assert!(!line.contains('\u{1b}'), "{line}");
        assert!(line.len() < 1_000, "a {}-byte line", line.len());
    }
}

#[tokio::test(start_paused = true)]
async fn endpoint_scores_are_emitted_only_when_asked() {
    use envoy_types::pb::google::protobuf::value::Kind;
    let scores_of = |r: &ProcessingResponse| -> Option<Vec<(String, f64)>> {
        let lb = match r
            .dynamic_metadata
            .as_ref()?
            .fields
            .get("envoy.lb")?
            .kind
            .as_ref()?
        {
            Kind::StructValue(s) => s.clone(),
            _ => return None,
        };
        match lb
            .fields
            .get("x-gateway-destination-endpoint-scores")?
            .kind
            .as_ref()?
        {
            Kind::StructValue(s) => {
                let mut v: Vec<(String, f64)> = s
                    .fields
                    .iter()
                    .map(|(k, v)| match v.kind {
                        Some(Kind::NumberValue(n)) => (k.clone(), n),
                        _ => panic!("{v:?}"),
                    })
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                Some(v)
            }
            _ => None,
        }
    };
    let mut h = Harness::new(3);
    let out = send_chat(&mut h.stream(), "m", &[]);
    assert_eq!(scores_of(&out[0]), None);
    h.options.emit_endpoint_scores = true;
    let out = send_chat(&mut h.stream(), "m", &[]);
    let scores = scores_of(&out[0]).expect("scores");
    let names: Vec<&str> = scores.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]);
    let a = routing_answer(&out[0]);
    assert_eq!(
        a.metadata_destination.as_deref(),
        Some(a.destination()),
        "unchanged"
    );
}

/// `session-affinity-scorer` (encoded endpoint token): the response carries the serving
/// replica's token, and a request echoing it goes back there.
#[tokio::test(start_paused = true)]
async fn the_session_token_written_on_the_response_pins_the_next_request() {
    let config = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: session-affinity-scorer\n- type: max-score-picker\n";
    let h = Harness::with_config(4, config);
    let mut s = h.stream();
    let out = send_chat(&mut s, "m", &[]);
    let first = routing_answer(&out[0]).destination().to_owned();
    let out = s.on_message(resp_headers(&[(":status", "200")], false, None));
    let Some(crate::envoy::ext_proc::processing_response::Response::ResponseHeaders(hr)) =
        &out[0].response
    else {
        panic!("{out:?}")
    };
    let token = hr
        .response
        .as_ref()
        .and_then(|c| c.header_mutation.as_ref())
        .and_then(|m| m.set_headers.iter().find_map(|o| o.header.as_ref()))
        .filter(|h| h.key == "x-session-token")
        .map(|h| String::from_utf8(h.raw_value.clone()).unwrap())
        .expect("session token");
    for _ in 0..10 {
        let out = send_chat(&mut h.stream(), "m", &[("x-session-token", &token)]);
        assert_eq!(routing_answer(&out[0]).destination(), first);
    }
}

/// Response trailers (a gateway that sends them at the end of a body-less response).
fn resp_trailers() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseTrailers(
            crate::envoy::ext_proc::HttpTrailers::default(),
        )),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_less_response_completes_on_trailers_once() {
    let h = Harness::new(2);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    assert_eq!(s.on_message(resp_headers(&sse, false, None)).len(), 1);
    assert!(!s.exchange_complete(), "the body streams past the EPP");
    assert_eq!(
        s.on_message(resp_trailers()).len(),
        1,
        "the trailers are answered"
    );
    assert!(s.exchange_complete());
    assert_eq!(h.events(), ["complete None", "released m"]);
    // A stream end after that completes nothing twice.
    s.on_stream_end();
    drop(s);
    assert!(h.events().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_lean_path_completes_when_the_stream_ends_or_is_dropped() {
    let h = Harness::new(2);
    // Before response headers, a stream end releases but completes nothing.
    let mut early = h.stream();
    send_chat(&mut early, "m", &[]);
    early.on_stream_end();
    drop(early);
    let events = h.events();
    assert_eq!(events.last().map(String::as_str), Some("released m"));
    assert!(
        !events.iter().any(|e| e.starts_with("complete")),
        "{events:?}"
    );
    // After response headers and no body: the response's end.
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    s.on_stream_end();
    assert_eq!(h.events(), ["complete None", "released m"]);
    // Dropped (Envoy reset the stream; tonic drops it without a message): the same.
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    drop(s);
    assert_eq!(h.events(), ["complete None", "released m"]);
}

#[tokio::test(start_paused = true)]
async fn a_full_path_stream_cut_after_its_first_chunk_is_not_complete() {
    let h = Harness::new(2);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    s.on_message(resp_headers(&sse, false, None));
    s.on_message(resp_body(b"data: {\"choices\":[]}\n\n", false));
    drop(s);
    assert_eq!(
        h.events(),
        ["released m"],
        "released, not recorded as complete"
    );
}

/// The first message of a BUFFERED stream: a chat request's headers, announcing the mode.
fn buffered_post(extra: &[(&str, &str)]) -> ProcessingRequest {
    with_request_body_mode(post("/v1/chat/completions", extra), BodySendMode::Buffered)
}

#[tokio::test(start_paused = true)]
async fn buffered_headers_are_answered_at_once_and_the_body_answer_routes() {
    let h = Harness::new(2);
    let mut s = h.stream();
    let spoofed = ("x-gateway-destination-endpoint-subset", "6.6.6.6:80");
    let out = s.on_message(buffered_post(&[("content-length", "61"), spoofed]));
    assert_eq!(out.len(), 1);
    assert!(
        is_plain_request_headers_answer(&out[0]),
        "no routing before the body: {out:?}"
    );
    assert!(h.events().is_empty(), "nothing scheduled yet");
    let out = s.on_message(req_body(&chat("m"), true));
    assert_eq!(out.len(), 1, "one answer: the body's");
    let (a, new_body) = buffered_routing_answer(&out[0]);
    assert!(a.destination().starts_with("10.0.0."));
    assert_eq!(a.metadata_destination.as_deref(), Some(a.destination()));
    assert!(a.clear_route_cache);
    assert_eq!(a.remove, [spoofed.0], "client routing headers removed");
    assert_eq!(new_body, None, "the body Envoy holds goes on unchanged");
    assert_eq!(
        a.header("content-length"),
        None,
        "Envoy's own length stands"
    );
    assert_eq!(h.routed(), "routed m->m rewritten=false");
    // The lean response path FailOpen runs: headers, then the stream's end.
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    s.on_stream_end();
    assert_eq!(h.events(), ["complete None", "released m"]);
}

#[tokio::test(start_paused = true)]
async fn a_buffered_rewrite_replaces_the_body_with_its_length() {
    let h = Harness::new(1);
    operator_rewrite(&h);
    let mut s = h.stream();
    assert!(is_plain_request_headers_answer(
        &s.on_message(buffered_post(&[]))[0]
    ));
    let out = s.on_message(req_body(&chat("m"), true));
    assert_eq!(h.routed(), "routed m->m-canary rewritten=true");
    let (a, new_body) = buffered_routing_answer(&out[0]);
    let new_body = String::from_utf8(new_body.expect("the rewritten body")).unwrap();
    assert!(new_body.contains("\"m-canary\""), "{new_body}");
    // Envoy refuses a body mutation whose length differs from the held Content-Length.
    assert_eq!(
        a.header("content-length"),
        Some(new_body.len().to_string().as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn a_buffered_body_followed_by_trailers_is_routed_on_the_body() {
    let h = Harness::new(1);
    let mut s = h.stream();
    s.on_message(buffered_post(&[]));
    // With request trailers Envoy sends the whole body without `end_of_stream`.
    let out = s.on_message(req_body(&chat("m"), false));
    buffered_routing_answer(&out[0]).0.destination();
    let trailers = ProcessingRequest {
        request: Some(processing_request::Request::RequestTrailers(
            crate::envoy::ext_proc::HttpTrailers::default(),
        )),
        ..Default::default()
    };
    let out = s.on_message(trailers.clone());
    assert_eq!(out.len(), 1);
    assert!(matches!(
        out[0].response,
        Some(processing_response::Response::RequestTrailers(_))
    ));
    // Trailers and no body: parsing refuses the empty body, and nothing else is answered.
    let mut s = h.stream();
    s.on_message(buffered_post(&[]));
    let out = s.on_message(trailers);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(immediate(&out[0]).0, 400);
}

#[tokio::test(start_paused = true)]
async fn buffered_bounds_and_headers_only_requests() {
    let mut h = Harness::new(1);
    // A request without body is routed by the headers' answer, as on the streamed path.
    let mut s = h.stream();
    let get = req_headers(&[(":method", "GET"), (":path", "/v1/models")], true, None);
    let out = s.on_message(with_request_body_mode(get, BodySendMode::Buffered));
    routing_answer(&out[0]).destination();
    // The EPP's own cap applies to the one body message (Envoy's buffer limit comes first).
    h.options.max_request_body_bytes = 10;
    let mut s = h.stream();
    s.on_message(buffered_post(&[]));
    assert_eq!(
        immediate(&s.on_message(req_body(&chat("m"), true))[0]).0,
        413
    );
    // A body after the routing answer (no Envoy sends one) goes on unchanged.
    h.options.max_request_body_bytes = 1 << 20;
    let mut s = h.stream();
    s.on_message(buffered_post(&[]));
    s.on_message(req_body(&chat("m"), true));
    let out = s.on_message(req_body(b"more", true));
    assert!(matches!(
        &out[0].response,
        Some(processing_response::Response::RequestBody(b))
            if b.response.as_ref() == Some(&Default::default())
    ));
}

/// Sends `first` as a stream's first message: it must be refused at once with a 500 that names
/// `mode`, and the stream end. Returns the answer's body.
fn refused_at_once_naming(h: &Harness, first: ProcessingRequest, mode: BodySendMode) -> String {
    let mut s = h.stream();
    let out = s.on_message(first);
    let (status, body) = immediate(&out[0]);
    assert_eq!(status, 500, "{mode:?}");
    assert!(body.contains(mode.as_str_name()), "{body}");
    assert!(s.is_done());
    body
}

#[tokio::test(start_paused = true)]
async fn request_body_modes_the_epp_cannot_route_with_get_a_500_at_once() {
    let h = Harness::new(1);
    for mode in [
        BodySendMode::None,
        BodySendMode::Streamed,
        BodySendMode::BufferedPartial,
    ] {
        refused_at_once_naming(
            &h,
            with_request_body_mode(post("/v1/completions", &[]), mode),
            mode,
        );
    }
    // FULL_DUPLEX_STREAMED announced is today's behaviour: headers deferred to the body.
    let mut s = h.stream();
    let first = with_request_body_mode(
        post("/v1/completions", &[]),
        BodySendMode::FullDuplexStreamed,
    );
    assert!(s.on_message(first).is_empty());
    // A protocol_config after the first message changes nothing.
    let late = with_request_body_mode(
        req_body(br#"{"model":"m","prompt":"x"}"#, true),
        BodySendMode::Streamed,
    );
    let out = s.on_message(late);
    routing_answer(&out[0]).destination();
    assert!(streamed_body(&out[1]).1, "the body re-sent whole");
}

/// Review 15: a response body mode of STREAMED (the response observer's, easy to copy onto the
/// routing filter) or BUFFERED was accepted, and every answer with a body then failed in Envoy
/// (`streamed_response` is a spurious message outside FULL_DUPLEX_STREAMED), with nothing in
/// the EPP's logs. Such a stream is refused at its first message, naming the mode.
#[tokio::test(start_paused = true)]
async fn response_body_modes_the_epp_cannot_answer_in_get_a_500_at_once() {
    let h = Harness::new(1);
    for mode in [
        BodySendMode::Streamed,
        BodySendMode::Buffered,
        BodySendMode::BufferedPartial,
    ] {
        let body = refused_at_once_naming(
            &h,
            with_response_body_mode(post("/v1/completions", &[]), mode),
            mode,
        );
        assert!(body.contains("response bodies"), "{body}");
    }
    for mode in [BodySendMode::None, BodySendMode::FullDuplexStreamed] {
        let mut s = h.stream();
        let first = with_response_body_mode(post("/v1/completions", &[]), mode);
        assert!(s.on_message(first).is_empty(), "{mode:?}: headers deferred");
        let out = s.on_message(req_body(br#"{"model":"m","prompt":"x"}"#, true));
        routing_answer(&out[0]).destination();
    }
}

/// Flow control on: a concurrency detector of one request per endpoint; a batch band of one.
const FLOW_CONTROL: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- type: concurrency-detector\n  parameters: {maxConcurrency: 1}\nflowControl:\n  saturationDetector: {pluginRef: concurrency-detector}\n  defaultRequestTTL: 10s\n  noEndpointRequestTTL: 60s\n  priorityBands:\n  - priority: 0\n    maxRequests: 1\n";

/// Runs the dispatcher until `token` is cancelled.
fn dispatcher(
    h: &Harness,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(h.director.clone().run_flow_control(token.clone()));
    (token, task)
}

/// The waiting room through the stream: requests sent to an empty pool are answered nothing
/// until an endpoint is added 5 s later, then every one is routed; none is lost.
#[tokio::test(start_paused = true)]
async fn flow_control_scale_from_zero_routes_every_waiting_request() {
    let h = Harness::with_config(
        0,
        &FLOW_CONTROL.replace("maxRequests: 1", "maxRequests: 50"),
    );
    let (token, task) = dispatcher(&h);
    let mut streams: Vec<StreamState> = (0..8).map(|_| h.stream()).collect();
    for s in &mut streams {
        assert!(send_chat(s, "m", &[]).is_empty(), "queued, not answered");
        assert!(s.admission().is_some());
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let fc = h.director.flow_control().unwrap().clone();
    assert_eq!(fc.queued(), 8);
    // An endpoint comes; each routed request finishes in turn (one at a time fits).
    let ds = h.director.datastore().clone();
    ds.apply(pool(1));
    let mut routed = 0;
    for s in &mut streams {
        let decision = s.admission().unwrap().wait().await;
        let out = prost_answers(s.on_admission(decision));
        assert_eq!(routing_answer(&out[0]).destination(), "10.0.0.1:8000");
        assert!(s.admission().is_none());
        routed += 1;
        // The response ends: its slot is free for the next.
        s.on_message(resp_headers(&[(":status", "200")], true, None));
    }
    assert_eq!(routed, 8);
    token.cancel();
    task.await.unwrap();
}

/// A client that goes away while queued leaves the queue at once, and the next request takes
/// its place; a request that does not fit is refused with the reference's answer.
#[tokio::test(start_paused = true)]
async fn flow_control_disconnect_frees_the_place_and_overflow_is_refused() {
    let h = Harness::with_config(1, FLOW_CONTROL);
    let (token, task) = dispatcher(&h);
    let fc = h.director.flow_control().unwrap().clone();
    // The first is routed (one slot); the second waits (the band holds one).
    let mut first = h.stream();
    send_chat(&mut first, "m", &[]);
    let d = first.admission().unwrap().wait().await;
    assert_eq!(prost_answers(first.on_admission(d)).len(), 2);
    let mut waiting = h.stream();
    assert!(send_chat(&mut waiting, "m", &[]).is_empty());
    assert_eq!(fc.queued(), 1);
    // Full: the third is refused at once, 429 rejected-saturated.
    let mut third = h.stream();
    send_chat(&mut third, "m", &[]);
    let d = third.admission().unwrap().wait().await;
    let out = prost_answers(third.on_admission(d));
    assert_eq!(immediate(&out[0]).0, 429);
    assert_eq!(
        immediate_header(&out[0], "x-llm-d-request-dropped-reason").as_deref(),
        Some("rejected-saturated")
    );
    // The waiting client goes away (the ext_proc stream ends): its place is free at once.
    drop(waiting);
    assert_eq!(fc.queued(), 0);
    let mut next = h.stream();
    assert!(send_chat(&mut next, "m", &[]).is_empty());
    assert_eq!(fc.queued(), 1);
    // Nothing frees the slot: after its TTL, 429 rejected-ttl-expired.
    let d = next.admission().unwrap().wait().await;
    let out = prost_answers(next.on_admission(d));
    assert_eq!(immediate(&out[0]).0, 429);
    assert_eq!(
        immediate_header(&out[0], "x-llm-d-request-dropped-reason").as_deref(),
        Some("rejected-ttl-expired")
    );
    drop(first);
    token.cancel();
    task.await.unwrap();
}

/// Fair share through the stream: in a round-robin band, a tenant that fills the band gives
/// its newest place to another tenant's request, and that client is answered 429
/// `evicted-fair-share`.
#[tokio::test(start_paused = true)]
async fn flow_control_fair_share_answers_the_largest_flows_newest() {
    let config = FLOW_CONTROL
        .replace(
            "- type: concurrency-detector",
            "- type: round-robin-fairness-policy\n- type: concurrency-detector",
        )
        .replace(
            "maxRequests: 1\n",
            "maxRequests: 2\n    fairnessPolicyRef: round-robin-fairness-policy\n",
        );
    let h = Harness::with_config(1, &config);
    let (token, task) = dispatcher(&h);
    let fc = h.director.flow_control().unwrap().clone();
    let tenant = |id: &'static str| [("x-llm-d-inference-fairness-id", id)];
    // The one slot is taken; tenant a fills the band behind it.
    let mut first = h.stream();
    send_chat(&mut first, "m", &tenant("a"));
    let d = first.admission().unwrap().wait().await;
    assert_eq!(prost_answers(first.on_admission(d)).len(), 2);
    let mut hog: Vec<StreamState> = (0..2).map(|_| h.stream()).collect();
    for s in &mut hog {
        assert!(send_chat(s, "m", &tenant("a")).is_empty());
    }
    assert_eq!(fc.queued(), 2);
    // Tenant b gets in; a's newest is answered.
    let mut b = h.stream();
    assert!(send_chat(&mut b, "m", &tenant("b")).is_empty());
    assert_eq!(fc.queued(), 2);
    let d = hog[1].admission().unwrap().wait().await;
    let out = prost_answers(hog[1].on_admission(d));
    assert_eq!(immediate(&out[0]).0, 429);
    assert_eq!(
        immediate_header(&out[0], "x-llm-d-request-dropped-reason").as_deref(),
        Some("evicted-fair-share")
    );
    // Tenant a, holding the most, is the one refused now.
    let mut more = h.stream();
    send_chat(&mut more, "m", &tenant("a"));
    let d = more.admission().unwrap().wait().await;
    let out = prost_answers(more.on_admission(d));
    assert_eq!(
        immediate_header(&out[0], "x-llm-d-request-dropped-reason").as_deref(),
        Some("rejected-saturated")
    );
    drop((first, hog, b));
    token.cancel();
    task.await.unwrap();
}

/// Answers as prost messages, as the tests read them.
fn prost_answers(out: Vec<crate::envoy::Answer>) -> Vec<ProcessingResponse> {
    out.into_iter()
        .map(crate::envoy::Answer::into_message)
        .collect()
}

/// The body of the streamed answers, concatenated, and whether only the last one ends it.
fn concat_bodies(out: &[ProcessingResponse]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    let mut eos_last_only = true;
    for (i, r) in out.iter().enumerate() {
        let (chunk, eos) = streamed_body(r);
        body.extend_from_slice(&chunk);
        eos_last_only &= eos == (i + 1 == out.len());
    }
    (body, eos_last_only)
}

/// A whole answer far longer than the copy kept of it is still rewritten back in every chunk,
/// in order, and its usage read from the copy's tail. (Before review 15 it was held to a
/// 16 MiB cap, let go, and its later chunks passed unmodified; until 2026-12-05 its usage was
/// lost past that cap.)
#[tokio::test(start_paused = true)]
async fn a_long_rewritten_response_is_rewritten_in_every_chunk() {
    let h = Harness::new(1);
    operator_rewrite(&h);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    assert_eq!(h.routed(), "routed m->m-canary rewritten=true");
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    // A JSON body with the served model near its start, then 16 MiB of content.
    let head = br#"{"id":"x","model":"m-canary","choices":[{"text":""#.to_vec();
    let filler = vec![b'a'; 4 * 1024 * 1024];
    let later = br#"{"model":"m-canary"}"#;
    let tail = br#""}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#.to_vec();
    let mut sent = Vec::new();
    let mut received = Vec::new();
    let chunks: Vec<&[u8]> = vec![&head, &filler, &filler, &filler, &filler, later, &tail];
    for (i, chunk) in chunks.iter().enumerate() {
        let eos = i + 1 == chunks.len();
        sent.extend_from_slice(chunk);
        let out = s.on_message(resp_body(chunk, eos));
        assert_eq!(out.len(), 1, "chunk {i} answered at once");
        let (body, end) = streamed_body(&out[0]);
        assert_eq!(end, eos, "chunk {i}");
        received.extend_from_slice(&body);
    }
    assert!(s.exchange_complete());
    let expected = openai::rewrite_response_model(&sent, "m-canary", "m").unwrap();
    assert!(
        received == expected,
        "every byte once, in order, every model rewritten"
    );
    assert!(received.starts_with(br#"{"id":"x","model":"m","#));
    assert_eq!(h.events(), ["complete Some(2)", "released m"]);
}

/// A whole answer under the cap is rewritten chunk by chunk as it comes (a field cut by a chunk
/// boundary waits for the next chunk), and its usage read from the copy at the end.
/// Review 15 (finding 6): a client that accepts a compressed answer got one from a model
/// server that compresses, and a compressed answer passes the rewrite back untouched: the
/// client read the served model's name. When the answer must be rewritten back, the request
/// reaches the model server without `accept-encoding`; otherwise it keeps it.
#[tokio::test(start_paused = true)]
async fn a_request_whose_answer_is_rewritten_back_asks_for_it_uncompressed() {
    let h = Harness::new(1);
    let gzip = [("accept-encoding", "gzip, br")];
    let mut s = h.stream();
    let out = send_chat(&mut s, "m", &gzip);
    assert!(
        routing_answer(&out[0]).remove.is_empty(),
        "no rewrite: kept"
    );
    operator_rewrite(&h);
    let mut s = h.stream();
    let out = send_chat(&mut s, "m", &gzip);
    assert_eq!(routing_answer(&out[0]).remove, ["accept-encoding"]);
}

#[tokio::test(start_paused = true)]
async fn a_rewritten_whole_response_goes_out_as_it_comes_and_its_usage_is_read() {
    let h = Harness::new(1);
    operator_rewrite(&h);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    let out = s.on_message(resp_body(br#"{"model":"m-canary","x":"#, false));
    assert_eq!(
        concat_bodies(&out),
        (br#"{"model":"m","x":"#.to_vec(), false),
        "the first chunk goes out at once, rewritten"
    );
    // A chunk's end that may begin the field is held back to the next one.
    let out = s.on_message(resp_body(br#"{"x":1,"mod"#, false));
    assert_eq!(concat_bodies(&out), (br#"{"x":1,"#.to_vec(), false));
    assert!(
        s.on_message(resp_body(br#"e"#, false)).is_empty(),
        "all held"
    );
    let out = s.on_message(resp_body(
        br#"l":"m-canary"},"u":{"prompt_tokens":1,"completion_tokens":2}}"#,
        true,
    ));
    assert_eq!(
        concat_bodies(&out),
        (
            br#""model":"m"},"u":{"prompt_tokens":1,"completion_tokens":2}}"#.to_vec(),
            true
        )
    );
    assert_eq!(h.events(), ["complete None", "released m"]);
    // The usage of a whole answer is read from its copy.
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    s.on_message(resp_body(br#"{"model":"m-canary","usage":"#, false));
    s.on_message(resp_body(
        br#"{"prompt_tokens":1,"completion_tokens":2}}"#,
        true,
    ));
    assert_eq!(h.events(), ["complete Some(2)", "released m"]);
}

/// Review 15: with the response budget full (slow readers of long answers fill it), a whole
/// answer could not be held for its rewrite and went out naming the served model. It is
/// rewritten now whatever the budget holds; only its usage is lost.
#[tokio::test(start_paused = true)]
async fn a_full_response_budget_does_not_leak_the_served_model() {
    let mut h = Harness::new(1);
    h.options.held_response_bytes = Arc::new(BodyBudget::new(0));
    operator_rewrite(&h);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    let out = s.on_message(resp_body(
        br#"{"model":"m-canary","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        true,
    ));
    let (body, end) = concat_bodies(&out);
    assert!(end);
    assert_eq!(
        body,
        br#"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#.to_vec()
    );
    assert_eq!(
        h.events(),
        ["overflow rewrite=true", "complete None", "released m"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_whole_answer_s_usage_is_read_wherever_it_is() {
    let h = Harness::new(1);
    let answer = |chunks: &[&[u8]]| {
        let mut s = h.stream();
        send_chat(&mut s, "m", &[]);
        h.events();
        s.on_message(resp_headers(&[(":status", "200")], false, None));
        for (i, chunk) in chunks.iter().enumerate() {
            let eos = i + 1 == chunks.len();
            let out = s.on_message(resp_body(chunk, eos));
            assert_eq!(out.len(), 1);
            assert_eq!(
                streamed_body(&out[0]),
                (chunk.to_vec(), eos),
                "passed through"
            );
        }
        h.events()
    };
    let usage = br#""usage":{"prompt_tokens":1,"completion_tokens":9}"#;
    // Before or after 3 MiB of text (vLLM puts `prompt_logprobs` after it), in a short
    // answer; cut inside the member; nothing held of the text, so never an overflow.
    let text = vec![b'a'; 3 << 20];
    let at_end = answer(&[br#"{"x":""#, &text, br#"","#, usage, b"}"]);
    assert_eq!(at_end, ["complete Some(9)", "released m"]);
    let at_front = answer(&[b"{", usage, br#","x":""#, &text, br#""}"#]);
    assert_eq!(at_front, ["complete Some(9)", "released m"]);
    let (name, value) = usage.split_at(4);
    let short = answer(&[b"{", name, value, br#","x":""#, b"aaa", br#""}"#]);
    assert_eq!(short, ["complete Some(9)", "released m"]);
    // The answer's own usage only: not one nested under another member.
    let nested = answer(&[br#"{"m":{"#, usage, b"}}"]);
    assert_eq!(nested, ["complete None", "released m"]);
}

/// What all streams hold of non-streamed responses together is capped: the response that
/// would pass the budget goes through as it comes, its usage unknown and counted, while the
/// others are read as before; every charge is given back at the end.
#[tokio::test(start_paused = true)]
async fn held_responses_share_one_budget() {
    let mut h = Harness::new(1);
    let budget = Arc::new(BodyBudget::new(60));
    h.options.held_response_bytes = budget.clone();
    let usage = br#"{"usage":{"prompt_tokens":1,"completion_tokens":7},"x":"#;
    // What an answer holds: its usage value.
    let held = br#"{"prompt_tokens":1,"completion_tokens":7}"#.len();
    let open = |h: &Harness| {
        let mut s = h.stream();
        send_chat(&mut s, "m", &[]);
        s.on_message(resp_headers(&[(":status", "200")], false, None));
        s
    };
    let mut first = open(&h);
    let mut second = open(&h);
    h.events();
    first.on_message(resp_body(usage, false));
    assert_eq!(budget.held(), held);
    // The second's value would pass 60 bytes: passed through, not kept.
    let out = second.on_message(resp_body(usage, false));
    assert_eq!(
        streamed_body(&out[0]),
        (usage.to_vec(), false),
        "passed through"
    );
    assert_eq!(budget.held(), held, "nothing charged for the second");
    second.on_message(resp_body(b"0}", true));
    first.on_message(resp_body(b"0}", true));
    assert_eq!(
        h.events(),
        [
            "overflow rewrite=false",
            "complete None",
            "released m",
            "complete Some(7)",
            "released m"
        ]
    );
    assert_eq!(budget.held(), 0);
    // A response still open when its stream goes gives its charge back too.
    let mut gone = open(&h);
    gone.on_message(resp_body(usage, false));
    assert_eq!(budget.held(), held);
    drop(gone);
    assert_eq!(budget.held(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_passed_through_body_ended_by_trailers_is_read_for_usage() {
    let h = Harness::new(1);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    s.on_message(resp_headers(&[(":status", "200")], false, None));
    s.on_message(resp_body(
        br#"{"usage":{"prompt_tokens":1,"completion_tokens":4}}"#,
        false,
    ));
    assert_eq!(s.on_message(resp_trailers()).len(), 1);
    assert_eq!(h.events(), ["complete Some(4)", "released m"]);
}

#[tokio::test(start_paused = true)]
async fn continuous_usage_stats_are_charged_at_their_last_count() {
    let h = Harness::new(1);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    h.events();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    s.on_message(resp_headers(&sse, false, None));
    for n in 0..5 {
        let event = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"t\"}}}}],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":{n}}}}}\n\n"
        );
        s.on_message(resp_body(event.as_bytes(), false));
    }
    s.on_message(resp_body(
        b"data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n",
        true,
    ));
    assert_eq!(h.events(), ["complete Some(4)", "released m"]);
}

/// `message` as a response observer sends it: in observability mode, with the observer
/// namespace the routing answer `routing` wrote into Envoy's dynamic metadata (`None`: with
/// none).
fn observed(mut message: ProcessingRequest, routing: Option<&ProcessingResponse>) -> Inbound {
    use crate::observer::OBSERVER_NAMESPACE;
    message.observability_mode = true;
    message.metadata_context = routing.map(|r| {
        let namespace = r
            .dynamic_metadata
            .as_ref()
            .and_then(|md| md.fields.get(OBSERVER_NAMESPACE))
            .and_then(|v| match &v.kind {
                Some(envoy_types::pb::google::protobuf::value::Kind::StructValue(s)) => {
                    Some(s.clone())
                }
                _ => None,
            })
            .expect("the routing answer carries an observer id");
        crate::envoy::Metadata {
            filter_metadata: [(OBSERVER_NAMESPACE.to_owned(), namespace)]
                .into_iter()
                .collect(),
            ..Default::default()
        }
    });
    Inbound::from_message(message)
}

/// The pool endpoint a routing answer names.
fn routed_endpoint(
    h: &Harness,
    routing: &ProcessingResponse,
) -> Arc<endpoint_picker::datastore::Endpoint> {
    let destination: std::net::SocketAddr = routing_answer(routing).destination().parse().unwrap();
    h.director
        .datastore()
        .snapshot()
        .by_address(&destination)
        .cloned()
        .unwrap()
}

fn observing() -> Harness {
    let mut h = Harness::new(2);
    h.options.observers = Some(Arc::new(crate::observer::Observers::new(16)));
    h
}

#[tokio::test(start_paused = true)]
async fn an_observer_reports_what_the_lean_routing_stream_cannot_see_once() {
    use crate::observer::{ObserverState, ObserverStep};
    let h = observing();
    let mut s = h.stream();
    let routing = send_chat(&mut s, "m", &[]);
    let endpoint = routed_endpoint(&h, &routing[0]);
    let prefilling = || h.director.in_flight().reading(endpoint.id).prefilling;
    assert_eq!(prefilling(), 1);
    h.events();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    // The observer hears the response first (it is after the routing filter in the chain).
    let mut o = ObserverState::new(h.ctx());
    assert_eq!(
        o.on_inbound(observed(resp_headers(&sse, false, None), Some(&routing[0]))),
        ObserverStep::Continue
    );
    s.on_message(resp_headers(&sse, false, None));
    tokio::time::advance(Duration::from_millis(120)).await;
    let first = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    assert_eq!(
        o.on_inbound(observed(resp_body(first, false), None)),
        ObserverStep::Continue
    );
    assert_eq!(prefilling(), 0, "the first chunk ends the prefill at once");
    let last = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
    assert_eq!(
        o.on_inbound(observed(resp_body(last, true), None)),
        ObserverStep::Close
    );
    // The routing stream's end releases the request and records its duration, as on the lean
    // path; the answer's tokens and first chunk are the observer's.
    s.on_stream_end();
    let bytes = first.len() + last.len();
    assert_eq!(
        h.events(),
        [
            "observer matched".to_owned(),
            format!("observed m tokens=Some(7) ttft=Some(120ms) bytes=Some({bytes})"),
            "complete None".to_owned(),
            "released m".to_owned(),
        ]
    );
    // The id was claimed: a second stream with the same tag (Envoy sends one per request) is
    // known by its tag only, as a released request is.
    let mut again = ObserverState::new(h.ctx());
    assert_eq!(
        again.on_inbound(observed(resp_headers(&sse, false, None), Some(&routing[0]))),
        ObserverStep::Continue
    );
    assert_eq!(h.events(), ["observer released"]);
    assert!(h.options.observers.as_ref().unwrap().is_empty());
}

/// Review 15: a request routed on its headers alone has no model, and its observer's tag
/// (empty model names) was refused as one no EPP wrote: `outcome="invalid"` for every
/// `GET /v1/models`, and the answer not recorded. It is matched and recorded now.
#[tokio::test(start_paused = true)]
async fn an_observer_matches_a_request_routed_on_its_headers_alone() {
    use crate::observer::{ObserverState, ObserverStep};
    let h = observing();
    let mut s = h.stream();
    let get = [(":method", "GET"), (":path", "/v1/models")];
    let routing = s.on_message(req_headers(&get, true, None));
    routing_answer(&routing[0]).destination();
    h.events();
    let json = [(":status", "200"), ("content-type", "application/json")];
    let mut o = ObserverState::new(h.ctx());
    assert_eq!(
        o.on_inbound(observed(
            resp_headers(&json, false, None),
            Some(&routing[0])
        )),
        ObserverStep::Continue
    );
    let body = br#"{"object":"list","data":[]}"#;
    assert_eq!(
        o.on_inbound(observed(resp_body(body, true), None)),
        ObserverStep::Close
    );
    let events = h.events();
    assert_eq!(
        events.first().map(String::as_str),
        Some("observer matched"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("observed  tokens=None")),
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_observer_without_a_tag_closes_at_once_and_a_released_request_is_still_recorded() {
    use crate::observer::{ObserverState, ObserverStep};
    let h = observing();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    // No tag: request-side messages wait (the routing answer may not have written it yet), the
    // response's first message closes (a local reply, a refused or unrouted request).
    let mut o = ObserverState::new(h.ctx());
    assert_eq!(
        o.on_inbound(observed(post("/v1/chat/completions", &[]), None)),
        ObserverStep::Continue
    );
    assert_eq!(
        o.on_inbound(observed(resp_headers(&sse, false, None), None)),
        ObserverStep::Close
    );
    assert_eq!(
        o.on_inbound(observed(resp_body(b"data: x\n\n", true), None)),
        ObserverStep::Close
    );
    assert_eq!(h.events(), ["observer no_tag"]);
    // A short answer whose routing stream ended before the observer claimed it: released, the
    // table empty, and the answer still recorded from the tag.
    let mut s = h.stream();
    let routing = send_chat(&mut s, "m", &[]);
    assert_eq!(h.options.observers.as_ref().unwrap().len(), 1);
    drop(s);
    assert!(h.options.observers.as_ref().unwrap().is_empty());
    h.events();
    let mut late = ObserverState::new(h.ctx());
    let json = [(":status", "200"), ("content-type", "application/json")];
    late.on_inbound(observed(
        resp_headers(&json, false, None),
        Some(&routing[0]),
    ));
    let body = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
    assert_eq!(
        late.on_inbound(observed(resp_body(body, true), None)),
        ObserverStep::Close
    );
    // A whole answer: timed to its end (from the tag's start, in the routing EPP's clock).
    let events = h.events();
    assert_eq!(events[0], "observer released");
    assert!(
        events[1].starts_with("observed m tokens=Some(3) ttft=Some(")
            && events[1].ends_with(&format!("bytes=Some({}) priority=0", body.len())),
        "{events:?}"
    );
}

/// Review 15: the tag carried neither the request's priority nor whether it asked for a
/// streamed answer, so an answer recorded from its tag alone (on another EPP, or after its
/// routing stream ended) was filed under `priority=""`, and an SSE answer without a content
/// type was read as one JSON document: no tokens, its end taken as its first token.
#[tokio::test(start_paused = true)]
async fn an_answer_recorded_from_its_tag_keeps_its_priority_and_its_streaming() {
    use crate::observer::{ObserverState, Observers};
    let h = observing();
    let mut s = h.stream();
    assert!(s.on_message(post("/v1/chat/completions", &[])).is_empty());
    let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let routing = s.on_message(req_body(body, true));
    routing_answer(&routing[0]).destination();
    h.events();
    let mut other = Harness::new(2);
    other.options.observers = Some(Arc::new(Observers::new(16)));
    let mut o = ObserverState::new(other.ctx());
    // No content type: the request's flag, carried by the tag, says how to read the answer.
    o.on_inbound(observed(
        resp_headers(&[(":status", "200")], false, None),
        Some(&routing[0]),
    ));
    o.on_inbound(observed(
        resp_body(b"data: {\"choices\":[]}\n\n", false),
        None,
    ));
    let last =
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\n";
    o.on_inbound(observed(resp_body(last, true), None));
    let events = other.events();
    assert_eq!(events[0], "observer other_epp");
    assert!(
        events[1].starts_with("observed m tokens=Some(7)") && events[1].ends_with(" priority=0"),
        "{events:?}"
    );
}

/// An observer stream on `epp` hears the streamed answer (7 output tokens, with usage) to the
/// request `routing` routed, to its end.
fn hear_an_answer_of_seven_tokens(epp: &Harness, routing: &ProcessingResponse) {
    use crate::observer::{ObserverState, ObserverStep};
    let mut o = ObserverState::new(epp.ctx());
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    o.on_inbound(observed(resp_headers(&sse, false, None), Some(routing)));
    let last =
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\n";
    assert_eq!(
        o.on_inbound(observed(resp_body(last, true), None)),
        ObserverStep::Close
    );
}

#[tokio::test(start_paused = true)]
async fn another_epps_request_is_recorded_from_its_tag_and_a_forged_tag_is_not() {
    use crate::observer::{ObserverState, ObserverStep, Observers};
    let h = observing();
    let mut s = h.stream();
    let routing = send_chat(&mut s, "m", &[]);
    h.events();
    // Another EPP, with a table of its own: the stream reaches it, not the routing one.
    let mut other = Harness::new(2);
    other.options.observers = Some(Arc::new(Observers::new(16)));
    hear_an_answer_of_seven_tokens(&other, &routing[0]);
    let events = other.events();
    assert_eq!(events[0], "observer other_epp");
    assert!(
        events[1].starts_with("observed m tokens=Some(7)"),
        "{events:?}"
    );
    // The routing EPP still holds it: its own observer could claim it.
    assert_eq!(h.options.observers.as_ref().unwrap().len(), 1);
    // A tag that no EPP wrote: counted, closed, nothing recorded.
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    let mut forged = observed(resp_headers(&sse, false, None), Some(&routing[0]));
    forged
        .message
        .metadata_context
        .as_mut()
        .unwrap()
        .filter_metadata
        .get_mut(crate::observer::OBSERVER_NAMESPACE)
        .unwrap()
        .fields
        .remove(crate::observer::OBSERVER_MODEL_KEY);
    let mut f = ObserverState::new(h.ctx());
    assert_eq!(f.on_inbound(forged), ObserverStep::Close);
    assert_eq!(h.events(), ["observer invalid"]);
}

#[tokio::test(start_paused = true)]
async fn a_routing_stream_that_streams_the_answer_itself_tags_no_observer() {
    let h = observing();
    let mut s = h.stream();
    let mut headers = post("/v1/chat/completions", &[]);
    headers.protocol_config = Some(crate::envoy::ext_proc::ProtocolConfiguration {
        request_body_mode: BodySendMode::FullDuplexStreamed as i32,
        response_body_mode: BodySendMode::FullDuplexStreamed as i32,
        ..Default::default()
    });
    assert!(s.on_message(headers).is_empty());
    let routing = s.on_message(req_body(&chat("m"), true));
    let md = routing[0].dynamic_metadata.as_ref().unwrap();
    assert!(!md.fields.contains_key(crate::observer::OBSERVER_NAMESPACE));
    assert!(h.options.observers.as_ref().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_error_answers_first_chunk_ends_the_prefill_but_times_nothing() {
    use crate::observer::ObserverState;
    let h = observing();
    let mut s = h.stream();
    let routing = send_chat(&mut s, "m", &[]);
    let endpoint = routed_endpoint(&h, &routing[0]);
    h.events();
    let mut o = ObserverState::new(h.ctx());
    let sse = [(":status", "400"), ("content-type", "text/event-stream")];
    o.on_inbound(observed(resp_headers(&sse, false, None), Some(&routing[0])));
    tokio::time::advance(Duration::from_millis(5)).await;
    o.on_inbound(observed(
        resp_body(b"data: {\"error\":\"x\"}\n\n", true),
        None,
    ));
    assert_eq!(h.director.in_flight().reading(endpoint.id).prefilling, 0);
    let events = h.events();
    assert!(events[1].contains("ttft=None"), "{events:?}");
}

#[tokio::test(start_paused = true)]
async fn an_observer_reads_usage_from_a_whole_json_answer() {
    use crate::observer::{ObserverState, ObserverStep};
    let h = observing();
    let mut s = h.stream();
    let routing = send_chat(&mut s, "m", &[]);
    h.events();
    let mut o = ObserverState::new(h.ctx());
    let json = [(":status", "200"), ("content-type", "application/json")];
    o.on_inbound(observed(
        resp_headers(&json, false, None),
        Some(&routing[0]),
    ));
    let body = br#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
    assert_eq!(
        o.on_inbound(observed(resp_body(&body[..9], false), None)),
        ObserverStep::Continue
    );
    assert_eq!(
        o.on_inbound(observed(resp_body(&body[9..], true), None)),
        ObserverStep::Close
    );
    assert_eq!(
        h.events(),
        [
            "observer matched".to_owned(),
            format!(
                "observed m tokens=Some(3) ttft=Some(0ns) bytes=Some({})",
                body.len()
            ),
        ]
    );
    assert_eq!(
        h.options.held_response_bytes.held(),
        0,
        "the usage value is no longer charged"
    );
}

#[tokio::test(start_paused = true)]
async fn without_observers_the_routing_answer_carries_no_observer_id() {
    let h = Harness::new(2);
    let mut s = h.stream();
    let routing = send_chat(&mut s, "m", &[]);
    let md = routing[0].dynamic_metadata.as_ref().unwrap();
    assert!(md.fields.contains_key(crate::protocol::LB_NAMESPACE));
    assert!(!md.fields.contains_key(crate::observer::OBSERVER_NAMESPACE));
}

#[tokio::test(start_paused = true)]
async fn past_the_observer_table_cap_a_request_is_recorded_from_its_tag() {
    use crate::observer::{ObserverState, ObserverStep};
    let mut h = Harness::new(2);
    h.options.observers = Some(Arc::new(crate::observer::Observers::new(1)));
    let mut first = h.stream();
    send_chat(&mut first, "m", &[]);
    let mut second = h.stream();
    let routing = send_chat(&mut second, "m", &[]);
    assert_eq!(h.options.observers.as_ref().unwrap().len(), 1);
    h.events();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    let mut o = ObserverState::new(h.ctx());
    assert_eq!(
        o.on_inbound(observed(resp_headers(&sse, false, None), Some(&routing[0]))),
        ObserverStep::Continue
    );
    assert_eq!(h.events(), ["observer released"]);
}

/// One message of an observer stream, for the property below.
#[derive(Debug, Clone)]
enum ObserverInput {
    RequestHeaders,
    ResponseHeaders { sse: bool, eos: bool },
    Body { bytes: Vec<u8>, eos: bool },
    Trailers,
}

/// The id an observer message carries: the routed request's, some other string, or none.
#[derive(Debug, Clone, Copy)]
enum ObserverId {
    Routed,
    Garbage(u8),
    Absent,
}

fn observer_input() -> impl proptest::strategy::Strategy<Value = (ObserverInput, ObserverId)> {
    use proptest::prelude::*;
    let input = prop_oneof![
        Just(ObserverInput::RequestHeaders),
        (any::<bool>(), any::<bool>())
            .prop_map(|(sse, eos)| ObserverInput::ResponseHeaders { sse, eos }),
        (
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                Just(
                    b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n".to_vec()
                ),
                Just(br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#.to_vec()),
            ],
            any::<bool>()
        )
            .prop_map(|(bytes, eos)| ObserverInput::Body { bytes, eos }),
        Just(ObserverInput::Trailers),
    ];
    let id = prop_oneof![
        3 => Just(ObserverId::Routed),
        1 => any::<u8>().prop_map(ObserverId::Garbage),
        2 => Just(ObserverId::Absent),
    ];
    (input, id)
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: 256,
        rng_seed: proptest::test_runner::RngSeed::Fixed(17),
        ..proptest::test_runner::Config::default()
    })]

    /// Whatever an observer stream is sent: it claims at most one request and reports its
    /// answer at most once; once it asks to close it stays closed; and when the streams are
    /// gone nothing is left charged or waiting in the table.
    #[test]
    fn an_observer_stream_reports_at_most_once_and_leaves_nothing_behind(
        inputs in proptest::collection::vec(observer_input(), 0..12),
        release_at in 0usize..8,
    ) {
        use crate::observer::{ObserverState, ObserverStep};
        let h = observing();
        let mut routing_stream = h.stream();
        let routing = send_chat(&mut routing_stream, "m", &[]);
        let mut routing_stream = Some(routing_stream);
        h.events();
        let mut o = ObserverState::new(h.ctx());
        let mut closed = false;
        for (i, (input, id)) in inputs.into_iter().enumerate() {
            if i == release_at {
                // The routing stream ends (a short answer, or Envoy reset it) before or while
                // the observer runs.
                routing_stream = None;
            }
            let message = match input {
                ObserverInput::RequestHeaders => post("/v1/chat/completions", &[]),
                ObserverInput::ResponseHeaders { sse, eos } => {
                    let ct = if sse { "text/event-stream" } else { "application/json" };
                    resp_headers(&[(":status", "200"), ("content-type", ct)], eos, None)
                }
                ObserverInput::Body { bytes, eos } => resp_body(&bytes, eos),
                ObserverInput::Trailers => resp_trailers(),
            };
            let inbound = match id {
                ObserverId::Routed => observed(message, Some(&routing[0])),
                ObserverId::Absent => observed(message, None),
                ObserverId::Garbage(g) => {
                    let mut inbound = observed(message, Some(&routing[0]));
                    if let Some(md) = inbound.message.metadata_context.as_mut()
                        && let Some(ns) = md.filter_metadata.get_mut(crate::observer::OBSERVER_NAMESPACE)
                    {
                        ns.fields.insert(
                            crate::observer::OBSERVER_ID_KEY.to_owned(),
                            envoy_types::pb::google::protobuf::Value {
                                kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                                    format!("{g:x}zz"),
                                )),
                            },
                        );
                    }
                    inbound
                }
            };
            let step = o.on_inbound(inbound);
            proptest::prop_assert!(!closed || step == ObserverStep::Close, "reopened");
            closed |= step == ObserverStep::Close;
        }
        drop(o);
        drop(routing_stream);
        let events = h.events();
        let count = |prefix: &str| events.iter().filter(|e| e.starts_with(prefix)).count();
        let bound = count("observer matched") + count("observer released");
        proptest::prop_assert!(count("observer ") <= 1, "{events:?}");
        proptest::prop_assert!(count("observed ") <= bound, "{events:?}");
        proptest::prop_assert_eq!(h.options.held_response_bytes.held(), 0);
        proptest::prop_assert!(h.options.observers.as_ref().unwrap().is_empty());
    }
}

/// A completion's streaming flag, completion tokens and time to first chunk.
type Recorded = (bool, Option<u64>, Option<Duration>);

/// Records each completion's streaming flag, usage and time to first chunk.
#[derive(Debug, Default)]
struct Completions(Mutex<Vec<Recorded>>);

impl Completions {
    fn times_to_first_chunk(&self) -> Vec<Option<Duration>> {
        self.0.lock().iter().map(|(_, _, t)| *t).collect()
    }
}

/// A context whose recorder keeps `h`'s streams' completions.
fn recording_completions(h: &Harness) -> (Arc<Completions>, Arc<ServiceContext>) {
    let completions = Arc::new(Completions::default());
    let ctx = Arc::new(ServiceContext {
        director: h.director.clone(),
        recorder: completions.clone(),
        options: h.options.clone(),
    });
    (completions, ctx)
}

impl Recorder for Completions {
    fn on_complete(&self, c: &crate::recorder::Completion<'_>) {
        self.0.lock().push((
            c.streaming,
            c.usage.map(|u| u.completion_tokens),
            c.time_to_first_chunk,
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn the_full_path_times_the_first_chunk_of_successful_answers_only() {
    let h = Harness::new(2);
    let (first_chunks, ctx) = recording_completions(&h);
    for status in ["200", "400"] {
        let mut s = StreamState::new(ctx.clone());
        send_chat(&mut s, "m", &[]);
        let sse = [(":status", status), ("content-type", "text/event-stream")];
        s.on_message(resp_headers(&sse, false, None));
        tokio::time::advance(Duration::from_millis(30)).await;
        s.on_message(resp_body(b"data: {}\n\n", true));
    }
    assert_eq!(
        first_chunks.times_to_first_chunk(),
        [Some(Duration::from_millis(30)), None]
    );
}

/// Review 15 (finding 7): the first token was stamped at the first non-empty chunk, and an
/// SSE comment sent to keep the connection open (`: ping`, by a proxy or an engine before any
/// token exists) is one: the time to first token came out short, the prefill ended early, and
/// the cost model learned the endpoint was fast. The first `data:` event stamps it now, also
/// one whose line ends in a CR alone (SSE's third line ending).
#[tokio::test(start_paused = true)]
async fn a_keep_alive_comment_is_no_first_token() {
    let h = Harness::new(2);
    let (first_chunks, ctx) = recording_completions(&h);
    for ending in ["\n", "\r"] {
        let mut s = StreamState::new(ctx.clone());
        let routing = send_chat(&mut s, "m", &[]);
        let endpoint = routed_endpoint(&h, &routing[0]);
        let prefilling = || h.director.in_flight().reading(endpoint.id).prefilling;
        let sse = [(":status", "200"), ("content-type", "text/event-stream")];
        s.on_message(resp_headers(&sse, false, None));
        tokio::time::advance(Duration::from_millis(10)).await;
        s.on_message(resp_body(
            format!(": ping{ending}{ending}").as_bytes(),
            false,
        ));
        assert_eq!(prefilling(), 1, "a comment is no token");
        tokio::time::advance(Duration::from_millis(25)).await;
        // The event's line split across two chunks: it is a token once its line ends.
        s.on_message(resp_body(b"data: {\"choices\":", false));
        assert_eq!(prefilling(), 1, "half an event is no token");
        tokio::time::advance(Duration::from_millis(5)).await;
        s.on_message(resp_body(format!("[]}}{ending}{ending}").as_bytes(), false));
        assert_eq!(prefilling(), 0, "the first event ends the prefill");
        tokio::time::advance(Duration::from_millis(50)).await;
        let usage = r#"data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        s.on_message(resp_body(
            format!("{usage}{ending}{ending}").as_bytes(),
            true,
        ));
    }
    let completions = first_chunks.0.lock().clone();
    assert_eq!(
        completions,
        [(true, Some(2), Some(Duration::from_millis(40))); 2],
        "timed to the event, usage read, with either line ending"
    );
}

/// A whole (non-streamed) answer's first token comes with the answer: its TTFT is the time to
/// its end, as the reference records non-streaming TTFT; an error answer has none.
#[tokio::test(start_paused = true)]
async fn a_whole_answer_is_timed_to_its_end() {
    let h = Harness::new(2);
    let (first_chunks, ctx) = recording_completions(&h);
    for status in ["200", "500"] {
        let mut s = StreamState::new(ctx.clone());
        send_chat(&mut s, "m", &[]);
        tokio::time::advance(Duration::from_millis(40)).await;
        let json = [(":status", status), ("content-type", "application/json")];
        s.on_message(resp_headers(&json, false, None));
        tokio::time::advance(Duration::from_millis(10)).await;
        s.on_message(resp_body(br#"{"choices":[]}"#, true));
    }
    assert_eq!(
        first_chunks.times_to_first_chunk(),
        [Some(Duration::from_millis(50)), None]
    );
}

/// A request that asked for a stream and got one JSON document (an engine's error, or one
/// that ignores `stream`) was recorded as streamed: its usage looked for in SSE events, its
/// time as a first chunk's. The answer's content type decides now; without one, the request.
#[tokio::test(start_paused = true)]
async fn the_answers_content_type_says_whether_it_is_streamed() {
    let h = Harness::new(2);
    let (completions, ctx) = recording_completions(&h);
    let streamed_request =
        br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let json_usage =
        br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
    for content_type in ["application/json", "Application/JSON; charset=utf-8", ""] {
        let mut s = StreamState::new(ctx.clone());
        assert!(s.on_message(post("/v1/chat/completions", &[])).is_empty());
        s.on_message(req_body(streamed_request, true));
        tokio::time::advance(Duration::from_millis(40)).await;
        let mut headers = vec![(":status", "200")];
        if !content_type.is_empty() {
            headers.push(("content-type", content_type));
        }
        s.on_message(resp_headers(&headers, false, None));
        tokio::time::advance(Duration::from_millis(10)).await;
        s.on_message(resp_body(json_usage, true));
    }
    assert_eq!(
        *completions.0.lock(),
        [
            (false, Some(2), Some(Duration::from_millis(50))),
            (false, Some(2), Some(Duration::from_millis(50))),
            // No content type: the request asked for a stream, so SSE it is (no usage event,
            // and no `data:` event to time a first token by).
            (true, None, None),
        ]
    );
}

/// Stands in for a tokenizer: three ids for any body.
#[derive(Debug)]
struct ThreeIds;

impl endpoint_picker::tokens::PromptTokenizer for ThreeIds {
    fn token_ids(
        &self,
        _: endpoint_picker::request::Api,
        _: &[u8],
    ) -> Result<Vec<u32>, endpoint_picker::tokens::Skip> {
        Ok(vec![1, 2, 3])
    }
}

/// Review: with a token producer, a streamed request's trailers were answered before its
/// headers and body (their answers come once the ids are in), breaking the one-answer-per-
/// message order Envoy expects. They are answered after them now.
#[tokio::test]
async fn request_trailers_wait_for_the_token_ids() {
    let h = Harness::new(1);
    h.produce_three_token_ids();
    let mut s = h.stream();
    assert!(s.on_message(post("/v1/chat/completions", &[])).is_empty());
    assert!(s.on_message(req_body(&chat("m"), false)).is_empty());
    let trailers = ProcessingRequest {
        request: Some(processing_request::Request::RequestTrailers(
            crate::envoy::ext_proc::HttpTrailers::default(),
        )),
        ..Default::default()
    };
    assert!(
        s.on_message(trailers).is_empty(),
        "nothing is answered before the request"
    );
    let ids = s
        .pending_tokenization()
        .expect("a tokenization")
        .run()
        .await;
    assert_eq!(ids.as_deref(), Some(&[1, 2, 3][..]));
    let out: Vec<ProcessingResponse> = s
        .on_token_ids(ids)
        .into_iter()
        .map(crate::envoy::Answer::into_message)
        .collect();
    assert!(out.len() >= 3, "{out:?}");
    assert!(matches!(
        out[0].response,
        Some(processing_response::Response::RequestHeaders(_))
    ));
    assert!(matches!(
        out.last().unwrap().response,
        Some(processing_response::Response::RequestTrailers(_))
    ));
    assert_eq!(
        out.iter()
            .filter(|a| matches!(
                a.response,
                Some(processing_response::Response::RequestTrailers(_))
            ))
            .count(),
        1
    );
}

/// [`FLOW_CONTROL`] with a least-attained-service band of 50 and `max_concurrency` requests an
/// endpoint.
fn las_flow_control(max_concurrency: u32) -> String {
    FLOW_CONTROL
        .replace(
            "- type: queue-scorer\n",
            "- type: queue-scorer\n- type: program-aware-fairness\n",
        )
        .replace(
            "    maxRequests: 1\n",
            "    maxRequests: 50\n    fairnessPolicyRef: program-aware-fairness\n",
        )
        .replace(
            "maxConcurrency: 1}",
            &format!("maxConcurrency: {max_concurrency}}}"),
        )
}

/// Review: least-attained-service fairness learnt a flow's service only from the engine's
/// `usage`, which a stream carries only when the client asks for it: a tenant that never asked
/// stayed at zero and was served first for ever. Its prompt is charged when flow control lets
/// the request go, and its answer from the SSE events seen.
#[tokio::test(start_paused = true)]
async fn a_stream_without_usage_still_charges_its_flow() {
    let h = Harness::with_config(1, &las_flow_control(1));
    let (token, task) = dispatcher(&h);
    let fc = h.director.flow_control().unwrap().clone();
    let mut s = h.stream();
    let tenant = [("x-llm-d-inference-fairness-id", "quiet-tenant")];
    assert!(send_chat(&mut s, "m", &tenant).is_empty(), "queued");
    let decision = s.admission().unwrap().wait().await;
    let out = prost_answers(s.on_admission(decision));
    routing_answer(&out[0]).destination();
    let prompt_only = fc.attained_service("quiet-tenant").unwrap();
    assert!(
        prompt_only > 0.0,
        "the prompt is charged as the request goes"
    );
    // A streamed answer of three events and no usage.
    s.on_message(resp_headers(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
        None,
    ));
    let events = b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\ndata: {\"choices\":[{\"text\":\"c\"}]}\n\ndata: [DONE]\n\n";
    s.on_message(resp_body(events, true));
    let charged = fc.attained_service("quiet-tenant").unwrap();
    assert!(
        (charged - prompt_only - 2.0 * 3.0).abs() < 1e-6,
        "three output tokens, weighted twice: {prompt_only} -> {charged}"
    );
    token.cancel();
    task.await.unwrap();
}

/// Review of the above: the prompt's estimate (4 bytes a token of the raw body: a base64 image
/// counts hundreds of thousands) is corrected by the engine's usage, and a stream cut short is
/// charged the events it got.
#[tokio::test(start_paused = true)]
async fn usage_corrects_the_prompt_estimate_and_a_cut_stream_is_charged() {
    let h = Harness::with_config(1, &las_flow_control(10));
    let (token, task) = dispatcher(&h);
    let fc = h.director.flow_control().unwrap().clone();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    // A large prompt (its estimate: thousands of tokens) that the engine counts as 10.
    let mut s = h.stream();
    assert!(
        s.on_message(post(
            "/v1/completions",
            &[("x-llm-d-inference-fairness-id", "big-body")]
        ))
        .is_empty()
    );
    let body = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(40_000));
    assert!(s.on_message(req_body(body.as_bytes(), true)).is_empty());
    let decision = s.admission().unwrap().wait().await;
    routing_answer(&prost_answers(s.on_admission(decision))[0]).destination();
    assert!(fc.attained_service("big-body").unwrap() >= 10_000.0);
    s.on_message(resp_headers(&sse, false, None));
    s.on_message(resp_body(
        b"data: {\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        true,
    ));
    let corrected = fc.attained_service("big-body").unwrap();
    assert!((corrected - 14.0).abs() < 1e-6, "10 + 2 × 2: {corrected}");
    // A stream cut after two events: the prompt, and two tokens weighted twice.
    let mut cut = h.stream();
    let tenant = [("x-llm-d-inference-fairness-id", "cut")];
    assert!(send_chat(&mut cut, "m", &tenant).is_empty());
    let decision = cut.admission().unwrap().wait().await;
    routing_answer(&prost_answers(cut.on_admission(decision))[0]).destination();
    let prompt = fc.attained_service("cut").unwrap();
    cut.on_message(resp_headers(&sse, false, None));
    cut.on_message(resp_body(
        b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\n",
        false,
    ));
    cut.on_stream_end();
    drop(cut);
    let charged = fc.attained_service("cut").unwrap();
    assert!(
        (charged - prompt - 4.0).abs() < 1e-6,
        "{prompt} -> {charged}"
    );
    token.cancel();
    task.await.unwrap();
}

/// Review 15 (finding 8): an answer whose observer stream reached another EPP (half of them
/// with two) was recorded there but charged to no flow, so least-attained-service fairness
/// learnt at most half of a flow's output. The EPP that hears the answer charges it now.
#[tokio::test(start_paused = true)]
async fn another_epps_answer_is_charged_to_its_flow_here() {
    use crate::observer::Observers;
    let routing_epp = observing();
    let mut s = routing_epp.stream();
    let tenant = [("x-llm-d-inference-fairness-id", "heard-elsewhere")];
    let routing = send_chat(&mut s, "m", &tenant);
    // The observer's stream reaches another EPP, with flow control and a table of its own.
    let mut other = Harness::with_config(1, &las_flow_control(10));
    other.options.observers = Some(Arc::new(Observers::new(16)));
    let fc = other.director.flow_control().unwrap().clone();
    assert_eq!(fc.attained_service("heard-elsewhere"), Some(0.0));
    hear_an_answer_of_seven_tokens(&other, &routing[0]);
    assert_eq!(other.events()[0], "observer other_epp");
    assert_eq!(
        fc.attained_service("heard-elsewhere"),
        Some(14.0),
        "seven output tokens, weighted twice"
    );
}

/// The body's deadline runs only while a streamed body is being gathered: not in BUFFERED mode
/// (Envoy holds the body), nor while the request waits for token ids or in flow control, nor
/// once it is routed.
#[tokio::test(start_paused = true)]
async fn the_body_deadline_runs_only_while_a_body_is_gathered() {
    let h = Harness::new(1);
    let mut streamed = h.stream();
    s_post(&mut streamed);
    let deadline = streamed.body_deadline().expect("gathering");
    assert_eq!(
        deadline - Instant::now(),
        crate::stream::DEFAULT_REQUEST_BODY_TIMEOUT
    );
    streamed.on_message(req_body(br#"{"model":"m","prompt":"hi"}"#, true));
    assert!(streamed.body_deadline().is_none(), "routed");
    let mut buffered = h.stream();
    buffered.on_message(buffered_post(&[]));
    assert!(buffered.body_deadline().is_none(), "BUFFERED");
    // Waiting for token ids.
    h.produce_three_token_ids();
    let mut tokenizing = h.stream();
    assert!(send_chat(&mut tokenizing, "m", &[]).is_empty());
    assert!(tokenizing.pending_tokenization().is_some());
    assert!(tokenizing.body_deadline().is_none(), "awaiting token ids");
    // Queued in flow control.
    let queued_h = Harness::with_config(0, FLOW_CONTROL);
    let mut queued = queued_h.stream();
    assert!(send_chat(&mut queued, "m", &[]).is_empty());
    assert!(queued.admission().is_some());
    assert!(queued.body_deadline().is_none(), "queued");
    // Refused: nothing more to wait for.
    let mut refused = h.stream();
    s_post(&mut refused);
    assert_eq!(
        immediate(&prost_answers(refused.on_body_timeout())[0]).0,
        408
    );
    assert!(refused.body_deadline().is_none() && refused.on_body_timeout().is_empty());
}

/// On the lean path the response observer charges the answer; a stream the observer sees cut
/// short (its state dropped before the end) is charged the events it got, once.
#[tokio::test(start_paused = true)]
async fn an_observer_charges_a_cut_stream_its_events() {
    use crate::observer::{ObserverState, ObserverStep};
    let mut h = Harness::with_config(1, &las_flow_control(10));
    h.options.observers = Some(Arc::new(crate::observer::Observers::new(16)));
    let (token, task) = dispatcher(&h);
    let fc = h.director.flow_control().unwrap().clone();
    let mut s = h.stream();
    let tenant = [("x-llm-d-inference-fairness-id", "observed-cut")];
    assert!(send_chat(&mut s, "m", &tenant).is_empty());
    let decision = s.admission().unwrap().wait().await;
    let routing = prost_answers(s.on_admission(decision));
    let prompt = fc.attained_service("observed-cut").unwrap();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    let mut o = ObserverState::new(h.ctx());
    assert_eq!(
        o.on_inbound(observed(resp_headers(&sse, false, None), Some(&routing[0]))),
        ObserverStep::Continue
    );
    let two =
        b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\n";
    assert_eq!(
        o.on_inbound(observed(resp_body(two, false), None)),
        ObserverStep::Continue
    );
    drop(o);
    let charged = fc.attained_service("observed-cut").unwrap();
    assert!(
        (charged - prompt - 4.0).abs() < 1e-6,
        "{prompt} -> {charged}"
    );
    s.on_stream_end();
    drop(s);
    assert!(
        (fc.attained_service("observed-cut").unwrap() - charged).abs() < 1e-6,
        "once"
    );
    token.cancel();
    task.await.unwrap();
}

/// A whole (non-streamed) answer that carries no `usage` is charged from its bytes, 4 a token.
#[tokio::test(start_paused = true)]
async fn a_whole_answer_without_usage_is_charged_by_its_bytes() {
    let h = Harness::with_config(1, &las_flow_control(10));
    let (token, task) = dispatcher(&h);
    let fc = h.director.flow_control().unwrap().clone();
    let mut s = h.stream();
    let tenant = [("x-llm-d-inference-fairness-id", "no-usage")];
    assert!(send_chat(&mut s, "m", &tenant).is_empty());
    let decision = s.admission().unwrap().wait().await;
    routing_answer(&prost_answers(s.on_admission(decision))[0]).destination();
    let prompt = fc.attained_service("no-usage").unwrap();
    s.on_message(resp_headers(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
        None,
    ));
    // 400 bytes: 100 tokens, weighted twice.
    let answer = format!(r#"{{"choices":[{{"text":"{}"}}]}}"#, "y".repeat(400 - 25));
    assert_eq!(answer.len(), 400);
    s.on_message(resp_body(answer.as_bytes(), true));
    let charged = fc.attained_service("no-usage").unwrap();
    assert!(
        (charged - prompt - 200.0).abs() < 1e-6,
        "{prompt} -> {charged}"
    );
    token.cancel();
    task.await.unwrap();
}

/// A request body whose drop is seen: the test holds the flag, the stream only the bytes.
struct Watched(Vec<u8>, Arc<std::sync::atomic::AtomicBool>);

impl AsRef<[u8]> for Watched {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A request-body message whose body is `body`, its buffer's drop reported to the returned flag.
fn watched_body(body: Vec<u8>) -> (Inbound, Arc<std::sync::atomic::AtomicBool>) {
    let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inbound = Inbound {
        message: req_body(b"", true),
        body: Bytes::from_owner(Watched(body, freed.clone())),
    };
    (inbound, freed)
}

/// Review F1: a routed request kept its prompt (a zero-copy slice that keeps the whole body's
/// buffer alive), its token ids and its headers until the stream ended, the end of the
/// response, counted by no budget. Once its answers have gone, the body is let go, in either
/// body mode, while the response is still to come and still recorded.
#[tokio::test(start_paused = true)]
async fn a_routed_request_holds_neither_its_body_nor_its_headers_during_the_response() {
    let h = Harness::new(1);
    for buffered in [false, true] {
        let mut s = h.stream();
        if buffered {
            s.on_message(buffered_post(&[("x-client", "a header")]));
        } else {
            s.on_message(post("/v1/chat/completions", &[("x-client", "a header")]));
        }
        let (inbound, freed) = watched_body(chat("m"));
        let answers = s.on_inbound(inbound);
        assert!(!answers.is_empty(), "routed");
        // Streamed, the answers re-send the body; buffered, Envoy keeps its own.
        assert_eq!(freed.load(std::sync::atomic::Ordering::SeqCst), buffered);
        drop(answers);
        assert_eq!(s.phase, Phase::Routed);
        assert!(
            freed.load(std::sync::atomic::Ordering::SeqCst),
            "the body is let go once its answers are (buffered: {buffered})"
        );
        assert!(s.headers.is_empty(), "the headers are let go");
        // The response path still has what it needs.
        s.on_message(resp_headers(&[(":status", "200")], false, None));
        s.on_message(resp_body(br#"{"usage":{"completion_tokens":3}}"#, true));
        let events = h.events();
        assert_eq!(
            events[2..],
            ["complete Some(3)", "released m"],
            "{events:?}"
        );
    }
}

/// Review F1: the token ids of a routed request are let go with its body.
#[tokio::test]
async fn a_routed_request_lets_its_token_ids_go() {
    let h = Harness::new(1);
    h.produce_three_token_ids();
    let mut s = h.stream();
    assert!(send_chat(&mut s, "m", &[]).is_empty(), "waits for its ids");
    let ids = s
        .pending_tokenization()
        .expect("a tokenization")
        .run()
        .await
        .expect("ids");
    assert!(!s.on_token_ids(Some(ids.clone())).is_empty(), "routed");
    assert_eq!(s.phase, Phase::Routed);
    assert_eq!(Arc::strong_count(&ids), 1, "only the test holds the ids");
}

/// Review F2: a streamed chunk boundary inside `"model":"m-canary"` left both halves as they
/// were, and the client saw the internal target model. Cut anywhere, once or twice, the event
/// reaches the client rewritten whole, the end of stream on its last chunk.
#[tokio::test(start_paused = true)]
async fn a_streamed_model_name_cut_by_chunk_boundaries_is_still_rewritten_back() {
    let h = Harness::new(1);
    operator_rewrite(&h);
    let event = b"data: {\"id\":\"1\",\"model\":\"m-canary\",\"choices\":[]}\n\n";
    let expected = b"data: {\"id\":\"1\",\"model\":\"m\",\"choices\":[]}\n\n";
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    for first in 0..=event.len() {
        for second in first..=event.len() {
            let mut s = h.stream();
            send_chat(&mut s, "m", &[]);
            s.on_message(resp_headers(&sse, false, None));
            let mut out = s.on_message(resp_body(&event[..first], false));
            out.extend(s.on_message(resp_body(&event[first..second], false)));
            out.extend(s.on_message(resp_body(&event[second..], true)));
            let (body, eos_last_only) = concat_bodies(&out);
            assert_eq!(
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(expected),
                "cut at {first} and {second}"
            );
            assert!(
                eos_last_only && !out.is_empty(),
                "cut at {first} and {second}"
            );
            assert!(s.exchange_complete());
            drop(s);
            assert_eq!(h.options.held_response_bytes.held(), 0);
        }
    }
}

/// Review F2: what a streamed body's last chunk held back for the rewrite goes out before the
/// trailers' answer, charged to the response budget until then.
#[tokio::test(start_paused = true)]
async fn a_streamed_body_ended_by_trailers_lets_its_held_end_go_first() {
    let h = Harness::new(1);
    operator_rewrite(&h);
    let mut s = h.stream();
    send_chat(&mut s, "m", &[]);
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    s.on_message(resp_headers(&sse, false, None));
    let out = s.on_message(resp_body(b"data: {\"model\":\"m-can", false));
    assert_eq!(out.len(), 1);
    assert_eq!(streamed_body(&out[0]), (b"data: {".to_vec(), false));
    let held_line = h.options.held_response_bytes.held();
    assert!(
        held_line > 0,
        "the unfinished line (SSE scanner and rewrite)"
    );
    let out = s.on_message(ProcessingRequest {
        request: Some(processing_request::Request::ResponseTrailers(
            crate::envoy::ext_proc::HttpTrailers::default(),
        )),
        ..Default::default()
    });
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(
        streamed_body(&out[0]),
        (b"\"model\":\"m-can".to_vec(), false),
        "as it came: no field to rewrite"
    );
    assert!(matches!(
        out[1].response,
        Some(processing_response::Response::ResponseTrailers(_))
    ));
    assert!(s.exchange_complete());
    drop(s);
    assert_eq!(h.options.held_response_bytes.held(), 0);
}

/// `message` (a stream's first) announcing Envoy's body modes: request FULL_DUPLEX_STREAMED,
/// the response `response`.
fn with_response_body_mode(
    mut message: ProcessingRequest,
    response: BodySendMode,
) -> ProcessingRequest {
    message.protocol_config = Some(crate::envoy::ext_proc::ProtocolConfiguration {
        request_body_mode: BodySendMode::FullDuplexStreamed as i32,
        response_body_mode: response as i32,
        ..Default::default()
    });
    message
}

/// A streamed chat request routed on a stream announcing `response` as the response body mode,
/// then its SSE response headers, then the stream's end: the events after routing.
fn cut_after_response_headers(h: &Harness, response: BodySendMode) -> Vec<String> {
    let mut s = h.stream();
    let headers = with_response_body_mode(post("/v1/chat/completions", &[]), response);
    assert!(s.on_message(headers).is_empty(), "headers deferred");
    let body = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    assert!(!s.on_message(req_body(body, true)).is_empty(), "routed");
    h.events();
    let sse = [(":status", "200"), ("content-type", "text/event-stream")];
    s.on_message(resp_headers(&sse, false, None));
    s.on_stream_end();
    drop(s);
    h.events()
}

/// Review F3: on the full path every body byte goes through the EPP, so a stream that ends
/// after the response headers and before any body (a client that gave up waiting for its
/// first token) was cut short; it was recorded as a complete 200 with a short duration.
#[tokio::test(start_paused = true)]
async fn a_full_path_stream_cut_before_its_first_chunk_is_not_complete() {
    let h = Harness::new(1);
    assert_eq!(
        cut_after_response_headers(&h, BodySendMode::FullDuplexStreamed),
        ["released m"],
        "released, not recorded as complete"
    );
}

/// Review F3's twin: on the lean path no body comes, and the stream's end is the response's.
#[tokio::test(start_paused = true)]
async fn a_lean_path_stream_ending_after_the_response_headers_is_complete() {
    let h = Harness::new(1);
    assert_eq!(
        cut_after_response_headers(&h, BodySendMode::None),
        ["complete None", "released m"]
    );
}
