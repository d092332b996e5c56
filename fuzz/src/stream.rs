//! Harness for `ext_proc::stream::StreamState`: arbitrary sequences of ext_proc messages.
//!
//! Shared by the `stream` fuzz target and `ext-proc/tests/fuzz_regressions.rs`. Only public
//! APIs of `ext-proc` and `endpoint-picker` and dependencies both crates have are used.
//!
//! Input: one options byte, then records, each starting with `>` and a kind letter, separated
//! by `\n>` (so that seeds are readable text):
//!
//! | kind | message |
//! |---|---|
//! | `h` / `H` | request headers (`H`: end of stream); payload lines `name: value` |
//! | `b` / `B` / `E` | request body chunk (`B`: end_of_stream, `E`: end_of_stream_without_message) |
//! | `t` | request trailers |
//! | `r` / `R` | response headers (`R`: end of stream) |
//! | `d` / `D` / `F` | response body chunk (`D`: end_of_stream, `F`: without message) |
//! | `T` | response trailers |
//! | `m` | metadata for the next message: the payload is the subset hint and the served endpoint |
//! | `p` | `protocol_config` on the next message: the payload's first byte is the request body mode (`0`–`9` as a digit, else its value) |
//! | `n` | a message without a request |
//! | `o` | a message to the stream's response observer (`ext_proc::observer`), in observability mode, carrying the observer id of the last routing answer if any: the payload's first byte is its kind (`h`, `r`/`R`, `d`/`D`/`F`, `T` as above), the rest its payload |
//!
//! Options bits: 0–1 pool size − 1 (1–4 endpoints); 2 trust the model-rewrite header; 3 the
//! decision header; 4 a 64-byte body limit; 5 an operator rewrite `m` → `m-canary`/`m-blue`; 6
//! a saturated pool and a sheddable objective `batch`; 7 no subset filter.
//!
//! Invariants: no panic; at most one immediate response, alone in its answer, and nothing
//! after it; request messages get request answers and response messages response answers; at
//! most one routing answer per request-headers message, first in its answer, naming pool
//! endpoints only, with the same destination in the header and the `envoy.lb` metadata; the
//! body re-sent with it is the body received with at most the model's value changed, with
//! `content-length` right and the end of stream where it belongs; a request-headers message
//! with end of stream, or a request body with end of stream, is answered at once; response
//! bodies pass through unchanged unless the model is rewritten back; and every request the
//! recorder saw routed is released exactly once (`Recorder::on_released`'s contract). Every
//! stream runs with response observers on: an observer never answers, matches at most once
//! and reports at most once, and once both streams are gone nothing waits in the observer
//! table and no response byte is still charged.
//!
//! Once a BUFFERED request body mode is announced before the first request headers (Envoy
//! announces it on the first message): headers without end of stream get one answer that
//! changes nothing; the body message that follows is answered at once with the routing
//! (destination header and `envoy.lb` metadata naming pool endpoints), and with a new body
//! only if the model was rewritten, then with only the model's value changed and its
//! `content-length`; any later body message gets an answer that changes nothing. A mode the
//! EPP cannot route with gets an immediate response.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use endpoint_picker::config::{LoadedConfig, load_default};
use endpoint_picker::datastore::{Datastore, EndpointSpec, EngineMetrics, PoolSpec};
use endpoint_picker::director::{Director, ModelRewrite, Policies, RewriteRule, RewriteTarget};
use endpoint_picker::request::{Api, InferenceRequest};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use ext_proc::body_budget::BodyBudget;
use ext_proc::codec::Inbound;
use ext_proc::envoy::ext_proc::body_mutation::Mutation;
use ext_proc::envoy::ext_proc::{
    CommonResponse, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
    ProtocolConfiguration, processing_request::Request as Req,
    processing_response::Response as Resp,
};
use ext_proc::envoy::{BodySendMode, Metadata};
use ext_proc::error::RequestError;
use ext_proc::observer::{OBSERVER_NAMESPACE, ObserverState, ObserverStep, Observers};
use ext_proc::openai;
use ext_proc::recorder::{Observation, ObserverOutcome, RecordKey, Recorder};
use ext_proc::stream::{ServiceContext, ServiceOptions, StreamState};

use crate::ext_proc_records::{check_sides, headers, records, streamed};

/// Counts routed and released requests.
#[derive(Debug, Default)]
struct Counts {
    routed: AtomicUsize,
    released: AtomicUsize,
    rejected: AtomicUsize,
    observer_streams: AtomicUsize,
    observed: AtomicUsize,
}

impl Recorder for Counts {
    fn on_routed(&self, r: &InferenceRequest, _: bool, _: Duration) -> RecordKey {
        self.routed.fetch_add(1, Ordering::Relaxed);
        RecordKey {
            model: Arc::from(r.model.as_str()),
            target_model: Arc::from(r.target_model.as_str()),
            ..RecordKey::default()
        }
    }
    fn on_rejected(&self, _: Option<&InferenceRequest>, _: &RequestError) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
    fn on_released(&self, _: &RecordKey) {
        self.released.fetch_add(1, Ordering::Relaxed);
    }
    fn on_observer_stream(&self, _: ObserverOutcome) {
        self.observer_streams.fetch_add(1, Ordering::Relaxed);
    }
    fn on_observed(&self, _: &Observation<'_>) {
        self.observed.fetch_add(1, Ordering::Relaxed);
    }
}

fn endpoint(n: u8) -> EndpointSpec {
    let address = SocketAddr::from(([10, 0, 0, n], 8000));
    EndpointSpec {
        name: format!("pod-{n}-rank-0"),
        pod_name: format!("pod-{n}"),
        namespace: "default".into(),
        address,
        metrics_address: address,
        rank: 0,
        labels: Default::default(),
    }
}

fn metadata(payload: &[u8]) -> Metadata {
    let s = String::from_utf8_lossy(payload).into_owned();
    let one = |key: &str| Struct {
        fields: [(
            key.to_owned(),
            Value {
                kind: Some(Kind::StringValue(s.clone())),
            },
        )]
        .into_iter()
        .collect(),
    };
    Metadata {
        filter_metadata: [
            (
                "envoy.lb.subset_hint".to_owned(),
                one("x-gateway-destination-endpoint-subset"),
            ),
            (
                "envoy.lb".to_owned(),
                one("x-gateway-destination-endpoint-served"),
            ),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

fn body(payload: &[u8], eos: bool, without_message: bool) -> HttpBody {
    HttpBody {
        body: payload.to_vec(),
        end_of_stream: eos,
        end_of_stream_without_message: without_message,
        ..Default::default()
    }
}

/// The routing answer's destination header, `content-length` and metadata destination.
fn routing(r: &ProcessingResponse) -> (String, Option<String>, Option<String>) {
    let Some(Resp::RequestHeaders(h)) = &r.response else {
        panic!("not a routing answer: {r:?}");
    };
    routing_of(h.response.as_ref(), r)
}

/// The BUFFERED path's routing answer (a request-body response): as [`routing`], and the new
/// body if it carries one.
fn buffered_routing(
    r: &ProcessingResponse,
) -> (String, Option<String>, Option<String>, Option<Vec<u8>>) {
    let Some(Resp::RequestBody(b)) = &r.response else {
        panic!("not a BUFFERED routing answer: {r:?}");
    };
    let new_body = match b
        .response
        .as_ref()
        .and_then(|c| c.body_mutation.as_ref())
        .and_then(|m| m.mutation.as_ref())
    {
        None => None,
        Some(Mutation::Body(body)) => Some(body.clone()),
        Some(other) => panic!("a BUFFERED body answer with {other:?}"),
    };
    let (destination, content_length, meta) = routing_of(b.response.as_ref(), r);
    (destination, content_length, meta, new_body)
}

/// An answer that changes nothing (the BUFFERED path's headers answer, or a body after routing).
fn is_plain(r: &ProcessingResponse) -> bool {
    let common = match &r.response {
        Some(Resp::RequestHeaders(h)) => h.response.as_ref(),
        Some(Resp::RequestBody(b)) => b.response.as_ref(),
        _ => return false,
    };
    common == Some(&CommonResponse::default()) && r.dynamic_metadata.is_none()
}

fn routing_of(
    common: Option<&CommonResponse>,
    r: &ProcessingResponse,
) -> (String, Option<String>, Option<String>) {
    let mutation = common
        .and_then(|c| c.header_mutation.as_ref())
        .expect("a routing answer mutates headers");
    let get = |name: &str| {
        mutation
            .set_headers
            .iter()
            .filter_map(|o| o.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned())
    };
    let meta = r.dynamic_metadata.as_ref().and_then(|s| {
        match s.fields.get("envoy.lb")?.kind.as_ref()? {
            Kind::StructValue(inner) => {
                match inner
                    .fields
                    .get("x-gateway-destination-endpoint")?
                    .kind
                    .as_ref()?
                {
                    Kind::StringValue(v) => Some(v.clone()),
                    _ => None,
                }
            }
            _ => None,
        }
    });
    (
        get("x-gateway-destination-endpoint").expect("destination header"),
        get("content-length"),
        meta,
    )
}

/// A headers message as `(lower-case name, value)` pairs.
fn header_pairs(h: &HttpHeaders) -> Vec<(String, String)> {
    h.headers
        .as_ref()
        .map(|m| {
            m.headers
                .iter()
                .map(|v| {
                    (
                        v.key.to_ascii_lowercase(),
                        String::from_utf8_lossy(&v.raw_value).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The path's API, as the stream chooses it.
fn api_of(headers: &[(String, String)]) -> Api {
    let path = headers
        .iter()
        .find(|(k, _)| k == ":path")
        .map_or("/v1/completions", |(_, v)| v.as_str());
    openai::api_for_path(path)
}

/// The default configuration, loaded once per process: loading it (a YAML parse) took most of
/// the time of a run. Its scheduler keeps state across runs (the picker's RNG, the prefix
/// index), which only changes which pool endpoint wins, never what is checked here.
fn default_config() -> Arc<LoadedConfig> {
    static CONFIG: OnceLock<Arc<LoadedConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| Arc::new(load_default(1).expect("the default config loads")))
        .clone()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&opts, rest)) = data.split_first() else {
        return;
    };
    let n = (opts & 3) + 1;
    let ds = Arc::new(Datastore::new());
    let pool: Vec<EndpointSpec> = (1..=n).map(endpoint).collect();
    let addresses: HashSet<String> = pool.iter().map(|e| e.address.to_string()).collect();
    let saturated = opts & 64 != 0;
    let snapshot = ds.apply(PoolSpec {
        name: "pool".into(),
        namespace: "default".into(),
        app_protocol: "http".into(),
        endpoints: pool,
    });
    for e in snapshot.endpoints.iter() {
        e.store_metrics(EngineMetrics {
            waiting_queue_size: if saturated { 1000 } else { 0 },
            kv_cache_usage: if saturated { 1.0 } else { 0.0 },
            updated_at: Some(tokio::time::Instant::now()),
            ..Default::default()
        });
    }
    let director = Arc::new(Director::new(ds, default_config(), 1));
    let mut policies = Policies::default();
    if saturated {
        policies.objectives.insert("batch".into(), -1);
    }
    if opts & 32 != 0 {
        policies.rewrites.push(ModelRewrite {
            name: "canary".into(),
            created: 1,
            rules: vec![RewriteRule {
                matches: vec!["m".into()],
                targets: vec![
                    RewriteTarget {
                        model: "m-canary".into(),
                        weight: 1,
                    },
                    RewriteTarget {
                        model: "m-blue".into(),
                        weight: 1,
                    },
                ],
            }],
        });
    }
    director.set_policies(policies);
    let counts = Arc::new(Counts::default());
    // `..Default::default()` fills `fault` when a build enables `conformance-faults`.
    #[allow(clippy::needless_update)]
    // Small enough that long inputs pass it; every charge must be back once the stream is gone.
    let budget = Arc::new(BodyBudget::new(4096));
    let options = ServiceOptions {
        max_request_body_bytes: if opts & 16 != 0 { 64 } else { 1 << 20 },
        gathered_request_bytes: budget.clone(),
        disable_subset_filter: opts & 128 != 0,
        decision_header: opts & 8 != 0,
        trust_model_rewrite_header: opts & 4 != 0,
        observers: Some(Arc::new(Observers::new(4))),
        ..Default::default()
    };
    let observers = options.observers.clone();
    let held_responses = options.held_response_bytes.clone();
    let ctx = Arc::new(ServiceContext {
        director,
        recorder: counts.clone(),
        options,
    });
    let mut stream = StreamState::new(ctx.clone());
    let mut observer = ObserverState::new(ctx);
    // The observer namespace of the last routing answer, as Envoy would forward it.
    let mut observer_md: Option<Metadata> = None;
    let mut observer_closed = false;

    // What the harness knows of the stream's state.
    let mut immediate_seen = false;
    let mut request_headers: Vec<(String, String)> = Vec::new();
    let mut awaiting_body = false;
    let mut routing_answers = 0usize;
    let mut headers_since_routing = false;
    let mut received = Vec::new();
    let mut pending_metadata = None;
    let mut response_in = Vec::new();
    let mut response_out = Vec::new();
    let mut pending_protocol = None;
    // The stream takes a body mode until its first request headers.
    let mut request_headers_seen = false;
    let mut buffered = false;

    for (kind, payload) in records(rest) {
        let request = match kind {
            b'h' | b'H' => Req::RequestHeaders(headers(kind == b'H', payload)),
            b'b' | b'B' | b'E' => Req::RequestBody(body(payload, kind == b'B', kind == b'E')),
            b't' => Req::RequestTrailers(HttpTrailers::default()),
            b'r' | b'R' => Req::ResponseHeaders(headers(kind == b'R', payload)),
            b'd' | b'D' | b'F' => Req::ResponseBody(body(payload, kind == b'D', kind == b'F')),
            b'T' => Req::ResponseTrailers(HttpTrailers::default()),
            b'm' => {
                pending_metadata = Some(metadata(payload));
                continue;
            }
            b'o' => {
                let Some((&sub, payload)) = payload.split_first() else {
                    continue;
                };
                let request = match sub {
                    b'h' => Req::RequestHeaders(headers(false, payload)),
                    b'r' | b'R' => Req::ResponseHeaders(headers(sub == b'R', payload)),
                    b'd' | b'D' | b'F' => {
                        Req::ResponseBody(body(payload, sub == b'D', sub == b'F'))
                    }
                    b'T' => Req::ResponseTrailers(HttpTrailers::default()),
                    _ => continue,
                };
                let step = observer.on_inbound(Inbound::from_message(ProcessingRequest {
                    request: Some(request),
                    metadata_context: observer_md.clone(),
                    observability_mode: true,
                    ..Default::default()
                }));
                assert!(
                    !observer_closed || step == ObserverStep::Close,
                    "an observer reopened"
                );
                observer_closed |= step == ObserverStep::Close;
                continue;
            }
            b'p' => {
                let mode = match payload.first() {
                    Some(d @ b'0'..=b'9') => i32::from(d - b'0'),
                    Some(&v) => i32::from(v),
                    None => 0,
                };
                pending_protocol = Some(ProtocolConfiguration {
                    request_body_mode: mode,
                    ..Default::default()
                });
                continue;
            }
            b'n' => {
                let protocol_config = pending_protocol.take();
                let announced = protocol_config.is_some() && !request_headers_seen;
                if announced {
                    buffered = protocol_config
                        .is_some_and(|p| p.request_body_mode == BodySendMode::Buffered as i32);
                }
                let out = stream.on_message(ProcessingRequest {
                    protocol_config,
                    ..Default::default()
                });
                if announced && stream.is_done() && !immediate_seen {
                    // A mode the EPP cannot route with: refused at once.
                    assert_eq!(out.len(), 1, "{out:?}");
                    assert!(matches!(out[0].response, Some(Resp::ImmediateResponse(_))));
                    immediate_seen = true;
                    continue;
                }
                assert!(out.is_empty(), "a message without a request gets no answer");
                continue;
            }
            _ => continue,
        };
        let protocol_config = pending_protocol.take();
        if !request_headers_seen && let Some(p) = protocol_config {
            buffered = p.request_body_mode == BodySendMode::Buffered as i32;
        }
        request_headers_seen |= matches!(request, Req::RequestHeaders(_));
        let message = ProcessingRequest {
            request: Some(request.clone()),
            metadata_context: pending_metadata.take(),
            protocol_config,
            ..Default::default()
        };
        let out = stream.on_message(message);
        if let Some(namespace) = out
            .iter()
            .filter_map(|r| r.dynamic_metadata.as_ref()?.fields.get(OBSERVER_NAMESPACE))
            .find_map(|v| match &v.kind {
                Some(Kind::StructValue(s)) => Some(s.clone()),
                _ => None,
            })
        {
            observer_md = Some(Metadata {
                filter_metadata: [(OBSERVER_NAMESPACE.to_owned(), namespace)]
                    .into_iter()
                    .collect(),
                ..Default::default()
            });
        }

        let Some(request_side) = check_sides(&request, &out, &mut immediate_seen, stream.is_done())
        else {
            continue;
        };

        if buffered && request_side {
            match &request {
                Req::RequestHeaders(h) if h.end_of_stream => {
                    // No body: routed by the headers' answer, as on the streamed path.
                    assert_eq!(out.len(), 1, "{out:?}");
                    let (destination, _, meta) = routing(&out[0]);
                    assert!(destination.split(',').all(|d| addresses.contains(d)));
                    assert_eq!(meta.as_deref(), Some(destination.as_str()));
                    routing_answers += 1;
                    awaiting_body = false;
                }
                Req::RequestHeaders(h) => {
                    assert_eq!(out.len(), 1, "{out:?}");
                    assert!(is_plain(&out[0]), "BUFFERED headers answered with {out:?}");
                    request_headers = header_pairs(h);
                    awaiting_body = true;
                }
                Req::RequestBody(b) if awaiting_body => {
                    // The whole body, with or without end of stream: answered at once.
                    assert_eq!(out.len(), 1, "{out:?}");
                    let (destination, content_length, meta, new_body) = buffered_routing(&out[0]);
                    assert!(
                        destination.split(',').all(|d| addresses.contains(d)),
                        "{destination} is not in the pool"
                    );
                    assert_eq!(meta.as_deref(), Some(destination.as_str()));
                    routing_answers += 1;
                    awaiting_body = false;
                    match new_body {
                        None => assert_eq!(content_length, None, "Envoy's own length stands"),
                        Some(new_body) => {
                            assert_eq!(content_length, Some(new_body.len().to_string()));
                            let api = api_of(&request_headers);
                            let before = openai::parse_body(api, &Bytes::from(b.body.clone()))
                                .expect("a routed body parses");
                            let after = openai::parse_body(api, &Bytes::from(new_body.clone()))
                                .expect("the new body parses");
                            assert_eq!(
                                b.body[..before.model_span.start],
                                new_body[..after.model_span.start]
                            );
                            assert_eq!(
                                b.body[before.model_span.end..],
                                new_body[after.model_span.end..]
                            );
                            assert_ne!(before.model, after.model);
                        }
                    }
                }
                Req::RequestBody(_) => {
                    assert_eq!(out.len(), 1, "{out:?}");
                    assert!(is_plain(&out[0]), "a late body answered with {out:?}");
                }
                _ => {
                    assert!(!awaiting_body, "trailers without a body routed: {out:?}");
                    assert_eq!(out.len(), 1);
                    assert!(matches!(out[0].response, Some(Resp::RequestTrailers(_))));
                }
            }
            continue;
        }

        // Routing answers: at most one per stream, first, to pool endpoints only.
        if matches!(request, Req::RequestHeaders(_)) {
            headers_since_routing = true;
        }
        let routed_here = out
            .iter()
            .filter(|r| matches!(r.response, Some(Resp::RequestHeaders(_))))
            .count();
        if routed_here > 0 {
            assert_eq!(routed_here, 1);
            assert!(matches!(out[0].response, Some(Resp::RequestHeaders(_))));
            routing_answers += 1;
            assert!(
                headers_since_routing,
                "routed twice on one request-headers message"
            );
            headers_since_routing = false;
            let (destination, content_length, meta) = routing(&out[0]);
            assert!(
                destination.split(',').all(|d| addresses.contains(d)),
                "{destination} is not in the pool"
            );
            assert_eq!(meta.as_deref(), Some(destination.as_str()));
            // Trailers that end the body are answered after it.
            let mut body_answers = &out[1..];
            if matches!(request, Req::RequestTrailers(_)) {
                let (last, rest) = body_answers.split_last().expect("a trailers answer");
                assert!(
                    matches!(last.response, Some(Resp::RequestTrailers(_))),
                    "{out:?}"
                );
                body_answers = rest;
            }
            let resent: Vec<u8> = body_answers
                .iter()
                .map(|r| streamed(r).expect("a request body chunk").0)
                .collect::<Vec<_>>()
                .concat();
            match &request {
                Req::RequestHeaders(h) => {
                    assert!(h.end_of_stream && out.len() == 1, "{out:?}");
                }
                Req::RequestBody(_) | Req::RequestTrailers(_) => {
                    let eos = match &request {
                        Req::RequestBody(b) => b.end_of_stream || b.end_of_stream_without_message,
                        _ => false,
                    };
                    let (last, before_last) = body_answers.split_last().expect("the body");
                    assert_eq!(streamed(last).expect("body").1, eos);
                    for r in before_last {
                        assert!(
                            !streamed(r).expect("body").1,
                            "end of stream before the last chunk"
                        );
                    }
                    if let Req::RequestBody(b) = &request {
                        received.extend_from_slice(&b.body);
                    }
                    if !resent.is_empty() {
                        assert_eq!(content_length, Some(resent.len().to_string()));
                    }
                    if resent != received {
                        // Only the model's value may differ.
                        let api = api_of(&request_headers);
                        let before = openai::parse_body(api, &Bytes::from(received.clone()))
                            .expect("a routed body parses");
                        let after = openai::parse_body(api, &Bytes::from(resent.clone()))
                            .expect("the re-sent body parses");
                        assert_eq!(
                            received[..before.model_span.start],
                            resent[..after.model_span.start]
                        );
                        assert_eq!(
                            received[before.model_span.end..],
                            resent[after.model_span.end..]
                        );
                        assert_ne!(before.model, after.model);
                    }
                }
                _ => panic!("routed on a response message"),
            }
            awaiting_body = false;
            continue;
        }

        match &request {
            Req::RequestHeaders(h) => {
                request_headers = header_pairs(h);
                assert!(!h.end_of_stream, "headers with end of stream unanswered");
                assert!(out.is_empty(), "{out:?}");
                awaiting_body = true;
                received.clear();
            }
            Req::RequestBody(b) if awaiting_body => {
                assert!(
                    !b.end_of_stream && !b.end_of_stream_without_message,
                    "a body with end of stream unanswered"
                );
                assert!(out.is_empty(), "{out:?}");
                received.extend_from_slice(&b.body);
            }
            Req::RequestBody(b) => {
                assert_eq!(out.len(), 1, "{out:?}");
                assert_eq!(streamed(&out[0]), Some((&b.body[..], b.end_of_stream)));
            }
            Req::RequestTrailers(_) => {
                assert!(!awaiting_body, "trailers ended the body without an answer");
                assert_eq!(out.len(), 1);
                assert!(matches!(out[0].response, Some(Resp::RequestTrailers(_))));
            }
            Req::ResponseHeaders(_) => {
                assert_eq!(out.len(), 1, "{out:?}");
                assert!(matches!(out[0].response, Some(Resp::ResponseHeaders(_))));
            }
            Req::ResponseBody(b) => {
                response_in.extend_from_slice(&b.body);
                for r in &out {
                    response_out.extend_from_slice(streamed(r).expect("a response body").0);
                }
                assert!(out.len() <= 1 || b.end_of_stream || b.end_of_stream_without_message);
            }
            Req::ResponseTrailers(_) => {
                assert!(
                    matches!(
                        out.last().and_then(|r| r.response.as_ref()),
                        Some(Resp::ResponseTrailers(_))
                    ),
                    "{out:?}"
                );
                for r in &out[..out.len() - 1] {
                    response_out.extend_from_slice(streamed(r).expect("a response body").0);
                }
            }
        }
    }
    if routing_answers == 0 || opts & 36 == 0 {
        // Without a model rewrite to undo, response bodies pass through byte for byte.
        assert!(
            response_in == response_out,
            "response body changed without a rewrite"
        );
    }
    drop(stream);
    drop(observer);
    assert_eq!(budget.held(), 0, "every body charge is given back");
    assert_eq!(budget.reserved(), 0, "every reservation is given back");
    assert_eq!(
        held_responses.held(),
        0,
        "every response charge is given back"
    );
    assert!(
        observers.is_some_and(|o| o.is_empty()),
        "a released request still waits for its observer"
    );
    assert!(counts.observer_streams.load(Ordering::Relaxed) <= 1);
    assert!(counts.observed.load(Ordering::Relaxed) <= 1);
    let routed = counts.routed.load(Ordering::Relaxed);
    let released = counts.released.load(Ordering::Relaxed);
    assert_eq!(routed, released, "every routed request is released once");
    assert_eq!(routed, routing_answers);
}
