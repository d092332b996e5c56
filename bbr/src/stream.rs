//! One ext_proc stream of the body-based router: one HTTP request.
//!
//! The body mode is the one Envoy announces in the stream's first message
//! (`protocol_config.request_body_mode`), else `--streaming`'s. In FULL_DUPLEX_STREAMED (what
//! the shipped configs use) the request headers are held until the body has arrived; at its
//! end the router answers with one headers response (the model headers set, client copies
//! removed, `Content-Length`, `clear_route_cache` so that Envoy matches the route again on the
//! new headers) followed by the body, byte for byte, as `streamed_response` chunks of at most
//! 62,000 bytes. In BUFFERED, the headers are answered at once (the client's copies of the model
//! headers removed) and the buffered body's answer carries the header mutation; trailers
//! after no body get their own answer only (Envoy sends no body then, and counts an answer to
//! one it did not send as spurious). A request without a body is answered at once, its client
//! copies of the model headers removed. The response passes through untouched. `GET /v1/models` is answered
//! at its headers with the list of models ([`crate::models`]).
//!
//! Bad bodies get an `ImmediateResponse` in the EPP's format (`inference error: BadRequest -
//! …`), their client input escaped and truncated by `ext_proc::untrusted`. A body without a
//! `model` passes through without model headers, as upstream's: such a request matches no
//! model's route.
//!
//! Pure with respect to I/O: [`BbrStream::on_inbound`] takes one message and returns the
//! answers, so every case is tested without a server.

use std::sync::Arc;

use bytes::Bytes;
use ext_proc::body_budget::{BodyBudget, BodyCharge, OverBudget, charged};
use ext_proc::body_pool::{BodyBuffer, MAX_RESERVED_AHEAD, REQUEST_BODIES};
use ext_proc::codec::Inbound;
#[cfg(test)]
use ext_proc::envoy::ext_proc::ProcessingRequest;
use ext_proc::envoy::ext_proc::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody, HttpHeaders,
    ProcessingResponse, processing_request, processing_response,
};
use ext_proc::envoy::{self, Answer, Direction};
use ext_proc::openai::{self, BodyError};
use ext_proc::protocol::{BASE_MODEL_NAME, DROPPED_REASON, MODEL_NAME};
use ext_proc::untrusted::{LogBudget, Untrusted};
use tokio::time::Instant;

use crate::mapping::Mapping;
use crate::metrics::Metrics;
use crate::models::{self, ModelList};

/// "request refused" lines a second at INFO, the rest at DEBUG (the refusal counter counts them
/// all): a client can cause one a request, as at the EPP.
static REFUSAL_LOG: LogBudget = LogBudget::new(20);

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--streaming`: FULL_DUPLEX_STREAMED bodies (else BUFFERED).
    pub streaming: bool,
    /// `--max-request-body-bytes`: a larger body is refused with 413.
    pub max_request_body_bytes: usize,
    /// `--list-models`: `GET /v1/models` answered by the router ([`crate::models`]).
    pub list_models: bool,
    /// `--max-gathered-request-bytes`: the request-body bytes every stream may hold together;
    /// shared by every clone of these options. A body that would pass it gets 429.
    pub gathered_request_bytes: Arc<BodyBudget>,
    /// `--request-body-timeout`: a streamed body must end this long after its headers, or the
    /// request gets 408 (as at the EPP).
    pub request_body_timeout: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            streaming: true,
            max_request_body_bytes: 16 * 1024 * 1024,
            list_models: true,
            gathered_request_bytes: Arc::default(),
            request_body_timeout: ext_proc::stream::DEFAULT_REQUEST_BODY_TIMEOUT,
        }
    }
}

/// What every stream shares.
#[derive(Debug)]
pub struct Context {
    /// Adapter → base model.
    pub mapping: Arc<Mapping>,
    /// Where outcomes are counted.
    pub metrics: Arc<Metrics>,
    /// The rendered `/v1/models` list (answered when `options.list_models`).
    pub models: Arc<ModelList>,
    /// Settings.
    pub options: Options,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for request headers.
    Start,
    /// Headers seen, body arriving.
    Body,
    /// The request was answered; the response passes through.
    Answered,
}

/// Why the router answered a request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A body that is not a valid request: 400.
    #[error(transparent)]
    BadBody(#[from] BodyError),
    /// A body over `--max-request-body-bytes`: 413.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The bodies held by every stream together would pass `--max-gathered-request-bytes`:
    /// 429, `rejected-saturated` as the EPP's.
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    /// The body did not end within `--request-body-timeout` of its headers: 408.
    #[error("request body not received within {seconds} s of its headers")]
    BodyTimeout {
        /// The deadline, in seconds.
        seconds: u64,
    },
}

impl Refusal {
    /// HTTP status and the error-code name of the EPP's error bodies.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Refusal::BadBody(_) => (400, "BadRequest"),
            Refusal::TooLarge { .. } => (413, "PayloadTooLarge"),
            Refusal::OverBudget(_) => (429, "ResourceExhausted"),
            Refusal::BodyTimeout { .. } => (408, "RequestTimeout"),
        }
    }

    fn to_response(&self) -> ProcessingResponse {
        let (status, code) = self.status();
        let reason: &[(&str, &str)] = match self {
            Refusal::OverBudget(_) => &[(DROPPED_REASON, "rejected-saturated")],
            _ => &[],
        };
        envoy::immediate_response(status, format!("inference error: {code} - {self}"), reason)
    }
}

/// The per-stream state machine.
#[derive(Debug)]
pub struct BbrStream {
    ctx: Arc<Context>,
    phase: Phase,
    done: bool,
    headers: Vec<(String, String)>,
    body: BodyBuffer,
    /// The body's bytes, charged to the process's budget until the body is answered.
    body_charge: BodyCharge,
    /// When the request's headers came.
    started: Instant,
    /// FULL_DUPLEX_STREAMED request bodies (else BUFFERED): as Envoy announces in the first
    /// message, else `--streaming`.
    streaming: bool,
}

impl BbrStream {
    /// A fresh stream.
    pub fn new(ctx: Arc<Context>) -> Self {
        let ctx_streaming = ctx.options.streaming;
        Self {
            ctx,
            phase: Phase::Start,
            done: false,
            headers: Vec::new(),
            body: BodyBuffer::empty(),
            body_charge: BodyCharge::default(),
            started: Instant::now(),
            streaming: ctx_streaming,
        }
    }

    /// When the body being gathered must have ended (streamed mode), `None` otherwise.
    pub fn body_deadline(&self) -> Option<Instant> {
        (self.phase == Phase::Body && self.streaming && !self.done)
            .then(|| self.started + self.ctx.options.request_body_timeout)
    }

    /// The body's deadline passed: 408, what the stream held released.
    pub fn on_body_timeout(&mut self) -> Vec<Answer> {
        if self.body_deadline().is_none() {
            return Vec::new();
        }
        let seconds = self.ctx.options.request_body_timeout.as_secs();
        self.refuse(Refusal::BodyTimeout { seconds })
    }

    /// True once an immediate response ended the exchange: later messages get no answer.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The client's copies of the model headers: always removed, whatever the body says.
    fn client_copies(&self) -> Vec<String> {
        let mut remove: Vec<String> = self
            .headers
            .iter()
            .map(|(k, _)| k)
            .filter(|k| *k == MODEL_NAME || *k == BASE_MODEL_NAME)
            .cloned()
            .collect();
        remove.dedup();
        remove
    }

    /// Handles one message (its body beside it, see [`Inbound`]); returns the answers to
    /// send, in order.
    pub fn on_inbound(&mut self, inbound: Inbound) -> Vec<Answer> {
        if self.done {
            return Vec::new();
        }
        // The body mode Envoy announces wins over `--streaming`: upstream's flags (streaming
        // off) in front of the shipped FULL_DUPLEX_STREAMED configs had refused every body
        // longer than one chunk. A mode this router does not speak keeps the flag's.
        if self.phase == Phase::Start
            && let Some(config) = &inbound.message.protocol_config
        {
            use envoy::BodySendMode as M;
            match M::try_from(config.request_body_mode) {
                Ok(M::FullDuplexStreamed) => self.streaming = true,
                Ok(M::Buffered) => self.streaming = false,
                _ => {}
            }
        }
        use processing_request::Request as R;
        match inbound.message.request {
            Some(R::RequestHeaders(h)) => self.on_request_headers(h),
            Some(R::RequestBody(b)) => self.on_request_body(b, inbound.body),
            Some(R::RequestTrailers(_)) => {
                let mut out = Vec::new();
                if self.phase == Phase::Body && !self.streaming {
                    // BUFFERED, and no body message came (the first one is answered at once):
                    // Envoy sends the buffered body before the trailers only when it buffered
                    // some (ext_proc's `onTrailers`), so none is owed. A body answer here is
                    // spurious to Envoy, which then stops processing the stream. No body, no
                    // model, as a request whose headers end it; the client's copies of the
                    // model headers went in the headers answer already.
                    self.phase = Phase::Answered;
                    self.body_charge.release();
                    self.ctx.metrics.no_model();
                } else if self.phase == Phase::Body {
                    // Trailers end the body: it is answered before them.
                    let body = self.take_body().freeze();
                    out = self.finish(body, false);
                }
                if !self.done {
                    out.push(envoy::trailers_response(Direction::Request).into());
                }
                out
            }
            Some(R::ResponseHeaders(_)) => {
                vec![envoy::response_headers_response(Vec::new()).into()]
            }
            Some(R::ResponseBody(b)) => {
                vec![self.pass_body(Direction::Response, inbound.body, b.end_of_stream)]
            }
            Some(R::ResponseTrailers(_)) => {
                vec![envoy::trailers_response(Direction::Response).into()]
            }
            None => Vec::new(),
        }
    }

    /// [`BbrStream::on_inbound`] with prost messages in and out (bodies copied): for tests.
    #[cfg(test)]
    pub fn on_message(&mut self, message: ProcessingRequest) -> Vec<ProcessingResponse> {
        self.on_inbound(Inbound::from_message(message))
            .into_iter()
            .map(Answer::into_message)
            .collect()
    }

    fn take_body(&mut self) -> BodyBuffer {
        std::mem::replace(&mut self.body, BodyBuffer::empty())
    }

    fn on_request_headers(&mut self, h: HttpHeaders) -> Vec<Answer> {
        self.headers = envoy::headers(h.headers.as_ref());
        if self.ctx.options.list_models
            && models::is_list_request(self.header(":method"), self.header(":path"))
        {
            // Answered here, before route matching: no pool is asked (crate::models says why).
            self.done = true;
            self.phase = Phase::Answered;
            self.ctx.metrics.models_requests.inc();
            return vec![self.ctx.models.response().into()];
        }
        if h.end_of_stream {
            // No body, no model: nothing to set, but a client's copies must not reach route
            // matching.
            self.phase = Phase::Answered;
            self.ctx.metrics.no_model();
            return vec![headers_answer(Vec::new(), self.client_copies()).into()];
        }
        self.phase = Phase::Body;
        self.started = Instant::now();
        let expected = self
            .header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
            .min(self.ctx.options.max_request_body_bytes);
        // A second request on the stream (no Envoy sends one) starts its own charge.
        self.body_charge.release();
        if self.streaming {
            // The buffer sized from the declared length is a reservation, bounded apart from
            // the charges, as in the EPP (`ext_proc::body_budget`): streams that declare long
            // bodies and send none cannot lock the others out. The body's bytes are charged as
            // they arrive.
            let reserved = self.body_charge.reserve(
                &self.ctx.options.gathered_request_bytes,
                expected.min(MAX_RESERVED_AHEAD),
            );
            self.body = REQUEST_BODIES.take(reserved);
            // Answered with the body, when the model is known.
            return Vec::new();
        }
        // BUFFERED: the body comes whole in one message, kept without a copy (nothing to
        // reserve); the headers go on now, and the body's answer carries the mutation.
        self.body = BodyBuffer::empty();
        vec![headers_answer(Vec::new(), self.client_copies()).into()]
    }

    fn pass_body(&self, direction: Direction, body: Bytes, end_of_stream: bool) -> Answer {
        if self.streaming {
            envoy::body_chunk(direction, body, end_of_stream).into()
        } else {
            let body = BodyResponse::default();
            ProcessingResponse {
                response: Some(match direction {
                    Direction::Request => processing_response::Response::RequestBody(body),
                    Direction::Response => processing_response::Response::ResponseBody(body),
                }),
                ..Default::default()
            }
            .into()
        }
    }

    fn on_request_body(&mut self, b: HttpBody, body: Bytes) -> Vec<Answer> {
        if self.phase != Phase::Body {
            // After the answer (or before any headers, which Envoy never does): pass it on.
            return vec![self.pass_body(Direction::Request, body, b.end_of_stream)];
        }
        let limit = self.ctx.options.max_request_body_bytes;
        if self.body.len() + body.len() > limit {
            return self.refuse(Refusal::TooLarge { limit });
        }
        let budget = &self.ctx.options.gathered_request_bytes;
        let beyond_charge = (self.body.len() + body.len()).saturating_sub(self.body_charge.bytes());
        if let Err(e) = self.body_charge.grow(budget, beyond_charge) {
            return self.refuse(e.into());
        }
        // BUFFERED: Envoy sends the whole body in one message, with `end_of_stream` false when
        // trailers follow; it is the body all the same (as the EPP reads it).
        let end = b.end_of_stream || b.end_of_stream_without_message || !self.streaming;
        if self.body.is_empty() && end {
            // The whole body in one message: no copy.
            self.body = BodyBuffer::empty();
            return self.finish(body, true);
        }
        self.body.extend_from_slice(&body);
        if end {
            let body = self.take_body().freeze();
            return self.finish(body, true);
        }
        Vec::new()
    }

    fn refuse(&mut self, refusal: Refusal) -> Vec<Answer> {
        self.done = true;
        self.phase = Phase::Answered;
        self.body = BodyBuffer::empty();
        self.body_charge.release();
        match REFUSAL_LOG.allow() {
            Some(not_logged) => tracing::info!(error = %refusal, not_logged, "request refused"),
            None => tracing::debug!(error = %refusal, "request refused"),
        }
        self.ctx.metrics.refused(refusal.status().0);
        vec![refusal.to_response().into()]
    }

    fn finish(&mut self, body: Bytes, end_of_stream: bool) -> Vec<Answer> {
        self.phase = Phase::Answered;
        // Counted until it has gone back to Envoy (streamed), or now (BUFFERED, or refused).
        let charge = std::mem::take(&mut self.body_charge);
        let started = Instant::now();
        let mut set = Vec::new();
        // The OpenAI APIs are validated as the EPP validates them; any other path (this router
        // sits in front of every route) only gives its model, if its body names one.
        let model =
            match openai::known_api_for_path(self.header(":path").unwrap_or("/v1/completions")) {
                Some(api) => openai::parse_body(api, &body).map(|parsed| parsed.model),
                None => openai::model_of(&body).ok_or(BodyError::MissingModel),
            };
        match model {
            Ok(model) => {
                let lookup = self.ctx.mapping.lookup();
                let base = lookup.base_model(&model);
                tracing::debug!(
                    model = %Untrusted(&model),
                    base_model = ?base.map(Untrusted),
                    "model headers set"
                );
                // The name as it was looked up (trimmed): a padded adapter name must not skip
                // an exact `X-Gateway-Model-Name` rule and fall through to its base's.
                set.push(envoy::set_header(MODEL_NAME, model.trim()));
                // An unknown model gets no base-model header: no route matches it, and the
                // gateway answers 404 (upstream sets it empty, which matches nothing either).
                if let Some(base) = base {
                    set.push(envoy::set_header(BASE_MODEL_NAME, base));
                }
                self.ctx.metrics.routed(&lookup, &model, base);
            }
            Err(BodyError::MissingModel) => {
                tracing::debug!("no model in the body; no model headers");
                self.ctx.metrics.no_model();
            }
            Err(e) => return self.refuse(Refusal::BadBody(e)),
        }
        self.ctx.metrics.observe_processing(started.elapsed());
        let remove = self.client_copies();
        if !self.streaming {
            let mutation = HeaderMutation {
                set_headers: set,
                remove_headers: remove,
            };
            return vec![
                ProcessingResponse {
                    response: Some(processing_response::Response::RequestBody(BodyResponse {
                        response: Some(CommonResponse {
                            header_mutation: Some(mutation),
                            clear_route_cache: true,
                            ..Default::default()
                        }),
                    })),
                    ..Default::default()
                }
                .into(),
            ];
        }
        if !body.is_empty() {
            set.push(envoy::set_header("content-length", &body.len().to_string()));
        }
        let mut out = vec![headers_answer(set, remove).into()];
        out.extend(
            envoy::body_chunks(Direction::Request, charged(body, charge), end_of_stream)
                .into_iter()
                .map(Answer::from),
        );
        out
    }
}

/// A request-headers answer that sets and removes headers and clears the route cache.
fn headers_answer(set: Vec<envoy::HeaderValueOption>, remove: Vec<String>) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: set,
                        remove_headers: remove,
                    }),
                    clear_route_cache: true,
                    ..Default::default()
                }),
            },
        )),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ext_proc::test_util::{
        immediate, immediate_header, req_body, req_headers, resp_body, resp_headers,
        routing_answer, streamed_body,
    };

    use super::*;
    use crate::mapping::Entry;

    fn ctx(streaming: bool) -> Arc<Context> {
        let mapping = Mapping::new();
        mapping.reset([
            (
                "ns/llama".to_owned(),
                Entry::new(Some("llama"), ["food-review"]).unwrap(),
            ),
            ("ns/qwen".to_owned(), Entry::new(Some("qwen"), []).unwrap()),
        ]);
        let list = ModelList::new();
        list.store(models::render(&mapping.lookup(), None, 0, models::MAX_LISTED_MODELS).body);
        Arc::new(Context {
            mapping,
            metrics: Arc::new(Metrics::default()),
            models: list,
            options: Options {
                streaming,
                max_request_body_bytes: 1 << 20,
                list_models: true,
                gathered_request_bytes: Arc::new(BodyBudget::new(2 << 20)),
                request_body_timeout: std::time::Duration::from_secs(60),
            },
        })
    }

    const CHAT: &str = "/v1/chat/completions";

    fn headers(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut h = vec![
            (":method", "POST"),
            (":path", CHAT),
            ("content-type", "application/json"),
        ];
        h.extend_from_slice(extra);
        h
    }

    fn chat(model: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "model": model, "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap()
    }

    /// Review 10: the body mode came from `--streaming` alone (off by default, as upstream's),
    /// so upstream's flags in front of the shipped FULL_DUPLEX_STREAMED configs refused every
    /// body of more than one chunk. The mode Envoy announces wins, either way.
    #[test]
    fn the_body_mode_envoy_announces_wins_over_the_flag() {
        use ext_proc::envoy::BodySendMode as M;
        use ext_proc::envoy::ext_proc::ProtocolConfiguration;
        let announced = |mode: M| {
            let mut first = req_headers(&headers(&[]), false, None);
            first.protocol_config = Some(ProtocolConfiguration {
                request_body_mode: mode as i32,
                ..Default::default()
            });
            first
        };
        // Flag off, Envoy streams: the headers wait, the body comes in chunks.
        let mut s = BbrStream::new(ctx(false));
        assert!(s.on_message(announced(M::FullDuplexStreamed)).is_empty());
        let body = chat("food-review");
        let (a, b) = body.split_at(10);
        assert!(s.on_message(req_body(a, false)).is_empty());
        let out = s.on_message(req_body(b, true));
        assert_eq!(
            routing_answer(&out[0]).header(BASE_MODEL_NAME),
            Some("llama")
        );
        assert_eq!(streamed_body(&out[1]), (body.clone(), true));
        // Flag on, Envoy buffers: the headers are answered at once, the body whole.
        let mut s = BbrStream::new(ctx(true));
        assert_eq!(s.on_message(announced(M::Buffered)).len(), 1);
        let out = s.on_message(req_body(&body, true));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn adapter_gets_both_headers_body_untouched_route_cache_cleared() {
        let c = ctx(true);
        let mut s = BbrStream::new(c.clone());
        assert!(
            s.on_message(req_headers(
                &headers(&[
                    ("x-gateway-model-name", "spoofed"),
                    ("x-gateway-base-model-name", "qwen")
                ]),
                false,
                None
            ))
            .is_empty(),
            "headers wait for the body"
        );
        let body = chat("food-review");
        let (a, b) = body.split_at(10);
        assert!(s.on_message(req_body(a, false)).is_empty());
        let out = s.on_message(req_body(b, true));
        assert_eq!(out.len(), 2);
        let answer = routing_answer(&out[0]);
        assert!(answer.clear_route_cache);
        assert_eq!(answer.header(MODEL_NAME), Some("food-review"));
        assert_eq!(answer.header(BASE_MODEL_NAME), Some("llama"));
        assert_eq!(
            answer.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(answer.remove, [MODEL_NAME, BASE_MODEL_NAME]);
        assert_eq!(streamed_body(&out[1]), (body, true));
        // The response passes through.
        let out = s.on_message(resp_headers(&[(":status", "200")], false, None));
        assert_eq!(out.len(), 1);
        let out = s.on_message(resp_body(b"data: x\n\n", true));
        assert_eq!(streamed_body(&out[0]), (b"data: x\n\n".to_vec(), true));
        assert_eq!(c.metrics.success_total(), 1);
    }

    #[test]
    fn base_model_maps_to_itself_and_unknown_gets_no_base_header() {
        let mut s = BbrStream::new(ctx(true));
        s.on_message(req_headers(&headers(&[]), false, None));
        let out = s.on_message(req_body(&chat("qwen"), true));
        assert_eq!(
            routing_answer(&out[0]).header(BASE_MODEL_NAME),
            Some("qwen")
        );
        let mut s = BbrStream::new(ctx(true));
        s.on_message(req_headers(
            &headers(&[("x-gateway-base-model-name", "llama")]),
            false,
            None,
        ));
        let out = s.on_message(req_body(&chat("gpt-5"), true));
        let answer = routing_answer(&out[0]);
        assert_eq!(answer.header(MODEL_NAME), Some("gpt-5"));
        assert_eq!(answer.header(BASE_MODEL_NAME), None);
        assert_eq!(answer.remove, [BASE_MODEL_NAME]);
    }

    #[test]
    fn large_bodies_are_rechunked_and_over_the_limit_refused() {
        let mut s = BbrStream::new(ctx(true));
        s.on_message(req_headers(&headers(&[]), false, None));
        let prompt = "a".repeat(200_000);
        let big = serde_json::to_vec(&serde_json::json!({
            "model": "food-review", "messages": [{"role": "user", "content": prompt}]
        }))
        .unwrap();
        for chunk in big.chunks(30_000) {
            assert!(s.on_message(req_body(chunk, false)).is_empty());
        }
        let out = s.on_message(req_body(b"", true));
        let echoed: Vec<u8> = out[1..].iter().flat_map(|r| streamed_body(r).0).collect();
        assert_eq!(echoed, big);
        assert!(out[1..].iter().all(|r| streamed_body(r).0.len() <= 62_000));
        assert!(streamed_body(out.last().unwrap()).1);

        let mut s = BbrStream::new(ctx(true));
        s.on_message(req_headers(&headers(&[]), false, None));
        let out = s.on_message(req_body(&vec![b' '; (1 << 20) + 1], false));
        assert_eq!(immediate(&out[0]).0, 413);
        assert!(s.is_done());
        assert!(s.on_message(req_body(b"x", true)).is_empty());
    }

    /// Bodies gathered by every stream together share one budget: the stream whose chunk would
    /// pass it gets 429 `rejected-saturated` and gives its charge back; answered bodies give
    /// theirs back too.
    #[test]
    fn gathered_bodies_share_one_budget() {
        let ctx = ctx(true);
        let budget = ctx.options.gathered_request_bytes.clone();
        // Two bodies of 900 KB in a budget of 2 MiB leave no room for a third of 400 KB.
        let half = vec![b' '; 900_000];
        let mut first = BbrStream::new(ctx.clone());
        first.on_message(req_headers(&headers(&[]), false, None));
        assert!(first.on_message(req_body(&half, false)).is_empty());
        let mut second = BbrStream::new(ctx.clone());
        second.on_message(req_headers(&headers(&[]), false, None));
        assert!(second.on_message(req_body(&half, false)).is_empty());
        assert_eq!(budget.held(), 1_800_000);
        let mut third = BbrStream::new(ctx.clone());
        third.on_message(req_headers(&headers(&[]), false, None));
        let out = third.on_message(req_body(&vec![b' '; 400_000], false));
        assert_eq!(immediate(&out[0]).0, 429);
        assert_eq!(
            immediate_header(&out[0], DROPPED_REASON).as_deref(),
            Some("rejected-saturated")
        );
        // The first ends its body: answered, its charge back; a new body fits again.
        // The answers as the service holds them until sent (not converted to prost copies).
        let out = first.on_inbound(Inbound::from_message(req_body(&chat("food-review"), true)));
        assert!(out.len() > 1, "answered with the body");
        assert!(
            budget.held() > 1_800_000,
            "counted until the answers carrying it are sent"
        );
        drop(out);
        assert_eq!(budget.held(), 900_000);
        drop(second);
        assert_eq!(budget.held(), 0, "a dropped stream gives its charge back");
        let mut fourth = BbrStream::new(ctx);
        fourth.on_message(req_headers(&headers(&[]), false, None));
        assert!(
            fourth
                .on_message(req_body(&chat("food-review"), true))
                .len()
                > 1
        );
        assert_eq!(budget.held(), 0);
    }

    /// The buffer a declared `content-length` sizes is reserved, not charged (as at the EPP):
    /// idle streams declaring long bodies cannot lock the others out; reservations stop at a
    /// quarter of the budget and bytes are charged as they arrive. BUFFERED mode reserves
    /// nothing.
    #[test]
    fn a_declared_length_is_reserved_not_charged() {
        let streamed = ctx(true);
        let budget = streamed.options.gathered_request_bytes.clone();
        let body = chat("food-review");
        // Idle streams declaring 256 KiB each: two fill the reservations' quarter of the
        // 2 MiB budget, the third starts empty; none is refused, nothing is charged.
        let kib256 = [("content-length", "262144")];
        let mut idle: Vec<_> = (0..3).map(|_| BbrStream::new(streamed.clone())).collect();
        for s in &mut idle {
            assert!(
                s.on_message(req_headers(&headers(&kib256), false, None))
                    .is_empty()
            );
        }
        assert_eq!((budget.held(), budget.reserved()), (0, 512 << 10));
        // An honest stream beside them is charged as its bytes come, and answered.
        let declared: &'static str = Box::leak(body.len().to_string().into_boxed_str());
        let mut honest = BbrStream::new(streamed.clone());
        assert!(
            honest
                .on_message(req_headers(
                    &headers(&[("content-length", declared)]),
                    false,
                    None
                ))
                .is_empty()
        );
        let (head, tail) = body.split_at(10);
        assert!(honest.on_message(req_body(head, false)).is_empty());
        assert_eq!(budget.held(), 10);
        let out = honest.on_inbound(Inbound::from_message(req_body(tail, true)));
        assert!(out.len() > 1, "answered with the body");
        drop(out);
        assert_eq!(budget.held(), 0);
        drop(idle);
        assert_eq!((budget.held(), budget.reserved()), (0, 0));
        // A body longer than it declared is charged for every byte.
        let mut liar = BbrStream::new(streamed.clone());
        liar.on_message(req_headers(
            &headers(&[("content-length", "5")]),
            false,
            None,
        ));
        assert_eq!((budget.held(), budget.reserved()), (0, 5));
        liar.on_message(req_body(&body[..30], false));
        assert_eq!(budget.held(), 30);
        drop(liar);
        assert_eq!((budget.held(), budget.reserved()), (0, 0));
        // BUFFERED: nothing reserved at the headers.
        let buffered = ctx(false);
        let mut b = BbrStream::new(buffered.clone());
        b.on_message(req_headers(&headers(&kib256), false, None));
        let budget = &buffered.options.gathered_request_bytes;
        assert_eq!((budget.held(), budget.reserved()), (0, 0));
    }

    /// A body that stops coming gets 408 at its deadline, what it held released; BUFFERED
    /// mode (Envoy holds the body) has none.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_gets_408() {
        let streamed = ctx(true);
        let budget = streamed.options.gathered_request_bytes.clone();
        let mut s = BbrStream::new(streamed.clone());
        assert!(s.body_deadline().is_none(), "no request yet");
        s.on_message(req_headers(
            &headers(&[("content-length", "1000")]),
            false,
            None,
        ));
        s.on_message(req_body(b"{\"model\"", false));
        assert_eq!(budget.held(), 8);
        let deadline = s.body_deadline().expect("gathering");
        assert_eq!(
            deadline - Instant::now(),
            std::time::Duration::from_secs(60)
        );
        let out: Vec<_> = s
            .on_body_timeout()
            .into_iter()
            .map(ext_proc::envoy::Answer::into_message)
            .collect();
        assert_eq!(immediate(&out[0]).0, 408);
        assert!(s.is_done() && s.body_deadline().is_none());
        assert_eq!((budget.held(), budget.reserved()), (0, 0));
        let mut b = BbrStream::new(ctx(false));
        b.on_message(req_headers(&headers(&[]), false, None));
        assert!(b.body_deadline().is_none());
    }

    #[test]
    fn bad_bodies_get_a_clear_escaped_400() {
        for (body, needle) in [
            (&b"{not json"[..], "invalid JSON body"),
            (br#"{"model": 7, "messages": [{}]}"#, "must be a string"),
            (
                br#"{"model": "m\u001b[31m", "messages": [{}]}"#,
                "control characters",
            ),
            (br#"{"model": "llama", "messages": "hi"}"#, "messages"),
        ] {
            let mut s = BbrStream::new(ctx(true));
            s.on_message(req_headers(&headers(&[]), false, None));
            let out = s.on_message(req_body(body, true));
            let (status, text) = immediate(&out[0]);
            assert_eq!(status, 400, "{text}");
            assert!(text.starts_with("inference error: BadRequest - "), "{text}");
            assert!(text.contains(needle), "{text}");
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
        // A megabyte of garbage comes back as at most a short excerpt.
        let mut s = BbrStream::new(ctx(true));
        s.on_message(req_headers(&headers(&[]), false, None));
        let garbage = format!("{{\"model\": \"{}", "\n".repeat(100_000));
        let (_, text) = immediate(&s.on_message(req_body(garbage.as_bytes(), true))[0]);
        assert!(text.len() < 1_000, "{}", text.len());
    }

    /// In front of every route: another API's body needs only its model, and a body that is
    /// not JSON passes without model headers; the OpenAI paths keep the EPP's validation.
    #[test]
    fn other_paths_need_only_a_model_and_never_get_a_400() {
        let on = |path: &'static str, body: &[u8]| {
            let mut s = BbrStream::new(ctx(true));
            s.on_message(req_headers(
                &[(":method", "POST"), (":path", path)],
                false,
                None,
            ));
            s.on_message(req_body(body, true))
        };
        let out = on(
            "/v1/audio/speech",
            br#"{"model": "food-review", "input": "hi"}"#,
        );
        let answer = routing_answer(&out[0]);
        assert_eq!(answer.header(MODEL_NAME), Some("food-review"));
        assert_eq!(answer.header(BASE_MODEL_NAME), Some("llama"));
        for body in [
            &b"--boundary\r\nContent-Disposition: form-data; name=\"file\""[..],
            br#"{"model": 7}"#,
        ] {
            let answer = routing_answer(&on("/v1/audio/transcriptions", body)[0]);
            assert_eq!(answer.header(MODEL_NAME), None);
        }
        let (status, _) = immediate(&on("/v1/completions", br#"{"model": "llama"}"#)[0]);
        assert_eq!(
            status, 400,
            "a completion without a prompt is still refused"
        );
    }

    #[test]
    fn no_model_and_no_body_pass_without_model_headers() {
        let mut s = BbrStream::new(ctx(true));
        s.on_message(req_headers(
            &headers(&[("x-gateway-model-name", "llama")]),
            false,
            None,
        ));
        let out = s.on_message(req_body(br#"{"messages": [{"role": "user"}]}"#, true));
        let answer = routing_answer(&out[0]);
        assert_eq!(answer.header(MODEL_NAME), None);
        assert_eq!(answer.remove, [MODEL_NAME]);
        let mut s = BbrStream::new(ctx(true));
        let out = s.on_message(req_headers(
            &[
                (":method", "GET"),
                (":path", "/v1/models/llama"),
                ("x-gateway-base-model-name", "q"),
            ],
            true,
            None,
        ));
        let answer = routing_answer(&out[0]);
        assert!(answer.set.is_empty());
        assert_eq!(answer.remove, [BASE_MODEL_NAME]);
    }

    #[test]
    fn get_v1_models_is_answered_with_the_list_and_nothing_else_is() {
        for streaming in [true, false] {
            let c = ctx(streaming);
            let mut s = BbrStream::new(c.clone());
            let out = s.on_message(req_headers(
                &[(":method", "GET"), (":path", "/v1/models?limit=1")],
                true,
                None,
            ));
            let (status, text) = immediate(&out[0]);
            assert_eq!(status, 200);
            assert_eq!(
                immediate_header(&out[0], "content-type").as_deref(),
                Some("application/json")
            );
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let ids: Vec<&str> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap())
                .collect();
            assert_eq!(ids, ["llama", "qwen", "food-review"]);
            assert!(s.is_done());
            assert_eq!(c.metrics.models_requests.get(), 1);
        }
        // A POST to the same path is an ordinary request (no model in its body: no headers).
        let mut s = BbrStream::new(ctx(true));
        let out = s.on_message(req_headers(
            &[(":method", "POST"), (":path", "/v1/models")],
            false,
            None,
        ));
        assert!(out.is_empty());
        let out = s.on_message(req_body(b"{}", true));
        assert_eq!(routing_answer(&out[0]).header(MODEL_NAME), None);
        // Turned off: the GET passes through as before.
        let c = ctx(true);
        let mut off = Context {
            mapping: c.mapping.clone(),
            metrics: c.metrics.clone(),
            models: c.models.clone(),
            options: c.options.clone(),
        };
        off.options.list_models = false;
        let mut s = BbrStream::new(Arc::new(off));
        let out = s.on_message(req_headers(
            &[(":method", "GET"), (":path", "/v1/models")],
            true,
            None,
        ));
        assert!(routing_answer(&out[0]).set.is_empty());
    }

    #[test]
    fn trailers_end_the_body() {
        let mut s = BbrStream::new(ctx(true));
        s.on_message(req_headers(&headers(&[]), false, None));
        s.on_message(req_body(&chat("llama"), false));
        let out = s.on_message(ProcessingRequest {
            request: Some(processing_request::Request::RequestTrailers(
                Default::default(),
            )),
            ..Default::default()
        });
        assert_eq!(out.len(), 3);
        assert_eq!(
            routing_answer(&out[0]).header(BASE_MODEL_NAME),
            Some("llama")
        );
        assert!(!streamed_body(&out[1]).1);
    }

    #[test]
    fn buffered_mode_answers_headers_then_mutates_on_the_body() {
        let mut s = BbrStream::new(ctx(false));
        let out = s.on_message(req_headers(
            &headers(&[("x-gateway-model-name", "x")]),
            false,
            None,
        ));
        assert_eq!(routing_answer(&out[0]).remove, [MODEL_NAME]);
        let out = s.on_message(req_body(&chat("food-review"), true));
        let Some(processing_response::Response::RequestBody(b)) = &out[0].response else {
            panic!("{out:?}");
        };
        let common = b.response.as_ref().unwrap();
        assert!(common.clear_route_cache);
        assert!(common.body_mutation.is_none(), "the body is not touched");
        let set = &common.header_mutation.as_ref().unwrap().set_headers;
        assert_eq!(set.len(), 2);

        // Trailers follow: the one body message (not at its end) is the whole body, answered
        // with the model headers; the trailers get a trailers answer only.
        let mut s = BbrStream::new(ctx(false));
        s.on_message(req_headers(&headers(&[]), false, None));
        let out = s.on_message(req_body(&chat("food-review"), false));
        let Some(processing_response::Response::RequestBody(b)) = &out[0].response else {
            panic!("{out:?}");
        };
        let set = &b
            .response
            .as_ref()
            .unwrap()
            .header_mutation
            .as_ref()
            .unwrap();
        assert_eq!(set.set_headers.len(), 2);
        let out = s.on_message(ProcessingRequest {
            request: Some(processing_request::Request::RequestTrailers(
                Default::default(),
            )),
            ..Default::default()
        });
        assert_eq!(out.len(), 1);
        assert!(matches!(
            out[0].response,
            Some(processing_response::Response::RequestTrailers(_))
        ));
    }

    /// Review B5: BUFFERED, trailers and no body. Envoy sends no body message when it buffered
    /// nothing (ext_proc's `onTrailers` sends one only for buffered data), so the trailers
    /// get their answer alone: a body answer before it was spurious to Envoy, which then
    /// stopped processing the stream. The client's copies of the model headers still go, in
    /// the headers answer.
    #[test]
    fn buffered_trailers_without_a_body_get_only_their_answer() {
        for path in ["/upload", CHAT] {
            let mut s = BbrStream::new(ctx(false));
            let out = s.on_message(req_headers(
                &[
                    (":method", "POST"),
                    (":path", path),
                    ("x-gateway-model-name", "llama"),
                    ("x-gateway-base-model-name", "llama"),
                ],
                false,
                None,
            ));
            assert_eq!(out.len(), 1, "{path}");
            assert_eq!(
                routing_answer(&out[0]).remove,
                [MODEL_NAME, BASE_MODEL_NAME],
                "{path}"
            );
            let out = s.on_message(ProcessingRequest {
                request: Some(processing_request::Request::RequestTrailers(
                    Default::default(),
                )),
                ..Default::default()
            });
            assert_eq!(out.len(), 1, "{path}: {out:?}");
            assert!(
                matches!(
                    out[0].response,
                    Some(processing_response::Response::RequestTrailers(_))
                ),
                "{path}: {out:?}"
            );
            assert!(!s.is_done(), "{path}: the response still passes through");
            let out = s.on_message(resp_headers(&[(":status", "200")], false, None));
            assert_eq!(out.len(), 1, "{path}");
        }
    }
}
