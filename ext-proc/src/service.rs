//! The `ExternalProcessor` service: one state machine per ext_proc stream (= one HTTP request).
//!
//! Envoy runs the filter with FULL_DUPLEX_STREAMED bodies, so:
//! - request headers are stored and answered later, unless they end the stream (then the
//!   request is routed at once);
//! - request body chunks are buffered; at end of stream the body is parsed, the request routed,
//!   and the EPP answers with one headers response (destination header, `Content-Length`,
//!   `clear_route_cache`, `envoy.lb` metadata) followed by the body as `streamed_response`
//!   chunks of at most 62,000 bytes;
//! - response headers are answered at once; SSE response chunks are answered one by one as they
//!   arrive; other bodies are passed through too, unless the model name must be rewritten back,
//!   in which case they are buffered to the end;
//! - every message gets exactly one answer, in order. Dropping the stream (client gone, Envoy
//!   reset) drops the state and with it the in-flight slot of the routed request.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use endpoint_picker::director::{Director, Routed};
use endpoint_picker::request::{Api, InferenceRequest};
use endpoint_picker::scheduling::plugins::filters::AddressMatcher;
use futures::Stream;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::debug::{DecisionLog, DecisionRecord};
use crate::envoy::{
    self, DESTINATION_ENDPOINT, DESTINATION_SERVED, Direction, HeaderValueOption, LB_NAMESPACE,
    ext_proc::{
        HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
        external_processor_server::ExternalProcessor, processing_request,
    },
};
use crate::error::RequestError;
use crate::metrics::{
    AttemptLabels, EppMetrics, ErrorLabels, ModelLabels, ModelOnly, RequestLabels, StreamLabels,
};
use crate::openai::{self, SseUsageScanner, Usage};
use crate::telemetry;

/// Request headers that carry routing decisions; a client must never set them.
pub const PROTECTED_HEADER_PREFIX: &str = "x-gateway-destination-endpoint";
/// `x-request-id`.
pub const REQUEST_ID: &str = "x-request-id";
/// Objective (priority) selection.
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
/// Forced target model.
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
/// Fairness id.
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";
/// Opt-in decision trace header on the response (with `--debug-decision-header`).
pub const DECISION_HEADER: &str = "x-switchyard-decision";

/// Buffered response bodies (for usage parsing) are capped at this size.
const MAX_RESPONSE_COPY: usize = 16 * 1024 * 1024;

/// Deliberately wrong behaviours, for proving that the conformance suite catches them.
/// Never set in production (`--x-conformance-fault` is hidden from `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConformanceFault {
    /// Answer the request headers at once, before the body arrives (routing without the body).
    HeadersBeforeBody,
    /// Do not write the `envoy.lb` dynamic metadata (only the header).
    NoLbMetadata,
}

impl std::str::FromStr for ConformanceFault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "headers-before-body" => Ok(Self::HeadersBeforeBody),
            "no-lb-metadata" => Ok(Self::NoLbMetadata),
            other => Err(format!(
                "unknown fault {other:?} (headers-before-body, no-lb-metadata)"
            )),
        }
    }
}

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// `--max-request-body-bytes`.
    pub max_request_body_bytes: usize,
    /// `--disable-endpoint-subset-filter`.
    pub disable_subset_filter: bool,
    /// Add [`DECISION_HEADER`] to responses.
    pub decision_header: bool,
    /// Keep the last N decisions for `/debug/pool` (0 = off; `--debug-decisions`).
    pub debug_decisions: usize,
    /// A deliberate protocol fault (conformance self-test only).
    pub fault: Option<ConformanceFault>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            max_request_body_bytes: 16 * 1024 * 1024,
            disable_subset_filter: false,
            decision_header: false,
            debug_decisions: 0,
            fault: None,
        }
    }
}

/// What every stream shares.
#[derive(Debug)]
pub struct ServiceContext {
    /// Request control.
    pub director: Arc<Director>,
    /// Metrics.
    pub metrics: Arc<EppMetrics>,
    /// Settings.
    pub options: ServiceOptions,
    /// Recent decisions for `/debug/pool`.
    pub decisions: Arc<DecisionLog>,
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    ctx: Arc<ServiceContext>,
}

impl ExtProcService {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ServiceContext>) -> Self {
        Self { ctx }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let ctx = self.ctx.clone();
        let output = async_stream::stream! {
            let mut state = StreamState::new(ctx.clone());
            ctx.metrics.active_streams.inc();
            // Counts the stream when it ends; a stream dropped by tonic (Envoy reset it) is
            // counted as `cancelled` by the guard's default.
            let mut active = scopeguard(ctx.clone());
            // Every log line of this request carries its id: the span is entered around each
            // message's (synchronous) handling only, never across an `.await`. It is created
            // with the first message, so that it can adopt an incoming trace context first.
            let mut span: Option<tracing::Span> = None;
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        let span = span.get_or_insert_with(|| request_span(&message));
                        let responses = span.in_scope(|| state.on_message(message));
                        for response in responses {
                            yield Ok(response);
                        }
                        // Envoy resets the stream once the exchange is over, so an exchange that
                        // completed counts as `ok` however the stream ends afterwards.
                        if state.exchange_complete() {
                            active.outcome = "ok";
                        }
                        if state.done {
                            active.outcome = "ok";
                            break;
                        }
                    }
                    Ok(None) => {
                        active.outcome = "ok";
                        break;
                    }
                    Err(status) if status.code() == tonic::Code::Cancelled => break,
                    Err(status) => {
                        let span = span.get_or_insert_with(tracing::Span::none);
                        span.in_scope(|| tracing::info!(%status, "ext_proc stream error"));
                        if !state.exchange_complete() {
                            active.outcome = "error";
                        }
                        break;
                    }
                }
            }
            match span {
                Some(span) => span.in_scope(|| state.finish_metrics()),
                None => state.finish_metrics(),
            }
        };
        Ok(Response::new(Box::pin(output)))
    }
}

/// The per-request span (`gateway.request`, the reference's span name). When traces are
/// exported and the first message carries a W3C `traceparent`, the span continues that trace.
fn request_span(first: &ProcessingRequest) -> tracing::Span {
    let span = tracing::info_span!("gateway.request", request_id = tracing::field::Empty);
    if telemetry::otel_active()
        && let Some(processing_request::Request::RequestHeaders(h)) = &first.request
    {
        telemetry::adopt_parent(&span, &envoy::headers(h.headers.as_ref()));
    }
    span
}

struct ActiveGuard {
    ctx: Arc<ServiceContext>,
    outcome: &'static str,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let m = &self.ctx.metrics;
        m.active_streams.dec();
        m.streams
            .get_or_create(&StreamLabels {
                outcome: self.outcome.to_owned(),
            })
            .inc();
    }
}

fn scopeguard(ctx: Arc<ServiceContext>) -> ActiveGuard {
    ActiveGuard {
        ctx,
        outcome: "cancelled",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for request headers.
    Start,
    /// Headers seen, body arriving.
    RequestBody,
    /// Request answered; waiting for (or inside) the response.
    Routed,
}

/// The per-stream state machine. Pure with respect to I/O: each message in, the answers out.
pub struct StreamState {
    ctx: Arc<ServiceContext>,
    phase: Phase,
    /// Set once an immediate response ended the exchange.
    pub done: bool,
    headers: Vec<(String, String)>,
    request_id: String,
    generated_request_id: bool,
    subset: Option<Vec<String>>,
    body: BytesMut,
    request: Option<InferenceRequest>,
    routed: Option<Routed>,
    started: Instant,
    eos_at: Instant,
    response: ResponseState,
}

#[derive(Default)]
struct ResponseState {
    streaming: bool,
    rewrite_back: Option<(String, String)>,
    buffered: BytesMut,
    copy: BytesMut,
    sse: SseUsageScanner,
    bytes: usize,
    usage: Option<Usage>,
    status: Option<String>,
    complete: bool,
    /// When the first non-empty streamed body chunk arrived (time to first token).
    first_chunk_at: Option<Instant>,
}

impl StreamState {
    /// A fresh stream.
    pub fn new(ctx: Arc<ServiceContext>) -> Self {
        Self {
            ctx,
            phase: Phase::Start,
            done: false,
            headers: Vec::new(),
            request_id: String::new(),
            generated_request_id: false,
            subset: None,
            body: BytesMut::new(),
            request: None,
            routed: None,
            started: Instant::now(),
            eos_at: Instant::now(),
            response: ResponseState::default(),
        }
    }

    /// The request id (empty before headers).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// True once the exchange is over: an immediate response was sent, or the response ended.
    pub fn exchange_complete(&self) -> bool {
        self.done || self.response.complete
    }

    /// Handles one message; returns the answers to send, in order.
    pub fn on_message(&mut self, message: ProcessingRequest) -> Vec<ProcessingResponse> {
        if self.done {
            return Vec::new();
        }
        let metadata = message.metadata_context.as_ref();
        use processing_request::Request as R;
        match message.request {
            Some(R::RequestHeaders(h)) => {
                if !self.ctx.options.disable_subset_filter
                    && let Some(hint) = envoy::subset_hint(metadata)
                {
                    self.subset = Some(hint);
                }
                self.on_request_headers(h)
            }
            Some(R::RequestBody(b)) => {
                if !self.ctx.options.disable_subset_filter
                    && let Some(hint) = envoy::subset_hint(metadata)
                {
                    self.subset = Some(hint);
                }
                self.on_request_body(b)
            }
            Some(R::RequestTrailers(_)) => {
                let mut out = Vec::new();
                if self.phase == Phase::RequestBody {
                    out = self.finish_request(false);
                }
                if !self.done {
                    out.push(envoy::trailers_response(Direction::Request));
                }
                out
            }
            Some(R::ResponseHeaders(h)) => {
                let served = envoy::metadata_string(metadata, LB_NAMESPACE, DESTINATION_SERVED);
                self.on_response_headers(h, served)
            }
            Some(R::ResponseBody(b)) => self.on_response_body(b),
            Some(R::ResponseTrailers(_)) => {
                let mut out = Vec::new();
                let rest = std::mem::take(&mut self.response.buffered);
                if !rest.is_empty() {
                    self.complete_response(&rest);
                    out.extend(envoy::body_chunks(
                        Direction::Response,
                        self.rewrite_response(rest.freeze()),
                        false,
                    ));
                } else {
                    self.complete_response(&[]);
                }
                out.push(envoy::trailers_response(Direction::Response));
                out
            }
            None => Vec::new(),
        }
    }

    fn on_request_headers(&mut self, h: HttpHeaders) -> Vec<ProcessingResponse> {
        self.started = Instant::now();
        self.headers = envoy::headers(h.headers.as_ref());
        match self.header(REQUEST_ID).filter(|v| !v.is_empty()) {
            Some(id) => self.request_id = id.to_owned(),
            None => {
                self.request_id = uuid::Uuid::new_v4().to_string();
                self.generated_request_id = true;
            }
        }
        // The request's span (entered by the service) carries the id on every log line.
        tracing::Span::current().record("request_id", self.request_id.as_str());
        if h.end_of_stream {
            self.eos_at = Instant::now();
            self.phase = Phase::RequestBody;
            let request = InferenceRequest {
                api: Api::HeadersOnly,
                request_id: self.request_id.clone(),
                ..self.base_request()
            };
            return self.route_and_answer(request, None);
        }
        let expected = self
            .header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
            .min(self.ctx.options.max_request_body_bytes);
        self.body = BytesMut::with_capacity(expected);
        self.phase = Phase::RequestBody;
        if self.ctx.options.fault == Some(ConformanceFault::HeadersBeforeBody) {
            // Deliberately wrong: route on the headers alone; the body then passes through.
            self.eos_at = Instant::now();
            let request = self.base_request();
            return self.route_and_answer(request, None);
        }
        Vec::new()
    }

    fn on_request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if self.phase != Phase::RequestBody {
            // A body after the request was answered cannot be routed again; pass it on.
            return vec![envoy::body_chunk(
                Direction::Request,
                Bytes::from(b.body),
                b.end_of_stream,
            )];
        }
        let limit = self.ctx.options.max_request_body_bytes;
        if self.body.len() + b.body.len() > limit {
            return self.fail(RequestError::TooLarge { limit }, None);
        }
        if self.body.is_empty() && b.end_of_stream {
            // The whole body in one message: take it without copying.
            self.body = BytesMut::new();
            return self.finish_request_with(Bytes::from(b.body), true);
        }
        self.body.extend_from_slice(&b.body);
        if b.end_of_stream || b.end_of_stream_without_message {
            return self.finish_request(true);
        }
        Vec::new()
    }

    fn finish_request(&mut self, end_of_stream: bool) -> Vec<ProcessingResponse> {
        let body = std::mem::take(&mut self.body).freeze();
        self.finish_request_with(body, end_of_stream)
    }

    fn base_request(&self) -> InferenceRequest {
        InferenceRequest {
            request_id: self.request_id.clone(),
            objective: self
                .header(OBJECTIVE_HEADER)
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
            fairness_id: self
                .header(FAIRNESS_HEADER)
                .filter(|v| !v.is_empty())
                .unwrap_or("default-flow")
                .to_owned(),
            headers: self.headers.clone(),
            ..Default::default()
        }
    }

    fn finish_request_with(&mut self, body: Bytes, end_of_stream: bool) -> Vec<ProcessingResponse> {
        self.eos_at = Instant::now();
        let path = self.header(":path").unwrap_or("/v1/completions").to_owned();
        let api = openai::api_for_path(&path);
        let parsed = match openai::parse_body(api, &body) {
            Ok(p) => p,
            Err(e) => return self.fail(RequestError::BadBody(e), None),
        };
        let request = InferenceRequest {
            api,
            model: parsed.model.clone(),
            stream: parsed.stream,
            prompt: parsed.prompt.clone(),
            cache_salt: parsed.cache_salt.clone(),
            body_len: body.len(),
            ..self.base_request()
        };
        self.route_and_answer(request, Some((body, parsed, end_of_stream)))
    }

    fn route_and_answer(
        &mut self,
        mut request: InferenceRequest,
        body: Option<(Bytes, openai::ParsedBody, bool)>,
    ) -> Vec<ProcessingResponse> {
        let director = &self.ctx.director;
        let forced = self.header(MODEL_REWRITE_HEADER).map(str::to_owned);
        director.resolve(&mut request, forced.as_deref());
        let subset: Option<Vec<AddressMatcher>> = self
            .subset
            .as_ref()
            .map(|s| s.iter().filter_map(|e| AddressMatcher::parse(e)).collect());
        let decisions = &self.ctx.decisions;
        let explain = self.ctx.options.decision_header
            || decisions.enabled()
            || tracing::enabled!(tracing::Level::DEBUG);
        let scheduling_started = Instant::now();
        let routed = director.route(&request, subset.as_deref(), explain);
        let metrics = &self.ctx.metrics;
        let scheduling = scheduling_started.elapsed();
        metrics.scheduler_e2e.observe(scheduling.as_secs_f64());
        if decisions.enabled() {
            let outcome = match &routed {
                Ok(_) => "routed",
                Err(e) => RequestError::Route(e.clone()).code(),
            };
            let mut record = DecisionRecord::new(
                &request.request_id,
                &request.model,
                &request.target_model,
                outcome,
                scheduling,
            );
            if let Ok(r) = &routed {
                record.destination = Some(r.destination());
                if let Some(e) = r
                    .result
                    .primary_result()
                    .and_then(|p| p.explanation.as_ref())
                {
                    record = record.with_explanation(e);
                }
            }
            decisions.push(record);
        }
        let routed = match routed {
            Ok(r) => r,
            Err(e) => {
                metrics
                    .scheduler_attempts
                    .get_or_create(&AttemptLabels {
                        status: "failure".into(),
                        target_model_name: request.target_model.clone(),
                        pod_name: String::new(),
                        namespace: String::new(),
                        port: String::new(),
                    })
                    .inc();
                return self.fail(RequestError::Route(e), Some(&request));
            }
        };
        metrics
            .scheduler_attempts
            .get_or_create(&AttemptLabels {
                status: "success".into(),
                target_model_name: request.target_model.clone(),
                pod_name: routed
                    .targets
                    .first()
                    .map(|t| t.spec.pod_name.clone())
                    .unwrap_or_default(),
                namespace: routed
                    .targets
                    .first()
                    .map(|t| t.spec.namespace.clone())
                    .unwrap_or_default(),
                port: routed
                    .targets
                    .first()
                    .map(|t| t.spec.address.port().to_string())
                    .unwrap_or_default(),
            })
            .inc();
        let destination = routed.destination();
        if let Some(e) = routed
            .result
            .primary_result()
            .and_then(|r| r.explanation.as_ref())
        {
            tracing::debug!(request_id = %request.request_id, model = %request.target_model, decision = %e.compact(8), "scheduled");
        }
        tracing::debug!(request_id = %request.request_id, %destination, "routed");

        let mut set: Vec<HeaderValueOption> =
            vec![envoy::set_header(DESTINATION_ENDPOINT, &destination)];
        if self.generated_request_id {
            set.push(envoy::set_header(REQUEST_ID, &self.request_id));
        }
        if telemetry::otel_active() {
            // The model server's spans become children of this request's span.
            for (k, v) in telemetry::trace_headers(&tracing::Span::current()) {
                set.push(envoy::set_header(k, &v));
            }
        }
        // Client-sent routing headers other than the one we just set are removed.
        let remove: Vec<String> = self
            .headers
            .iter()
            .map(|(k, _)| k)
            .filter(|k| {
                k.starts_with(PROTECTED_HEADER_PREFIX) && k.as_str() != DESTINATION_ENDPOINT
            })
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(2);
        let body_out = body.map(|(body, parsed, eos)| {
            let rewritten = request.target_model != parsed.model;
            let body = if rewritten {
                metrics
                    .rewrites
                    .get_or_create(&ModelLabels {
                        model_name: request.model.clone(),
                        target_model_name: request.target_model.clone(),
                    })
                    .inc();
                openai::rewrite_model(&body, parsed.model_span.clone(), &request.target_model)
            } else {
                body
            };
            if !body.is_empty() {
                set.push(envoy::set_header("content-length", &body.len().to_string()));
            }
            (body, eos)
        });
        let metadata = (self.ctx.options.fault != Some(ConformanceFault::NoLbMetadata))
            .then(|| envoy::destination_metadata(&destination));
        out.push(envoy::request_headers_response(set, remove, metadata));
        if let Some((body, eos)) = body_out {
            out.extend(envoy::body_chunks(Direction::Request, body, eos));
        }
        metrics
            .request_path_overhead
            .observe(self.eos_at.elapsed().as_secs_f64());
        let labels = RequestLabels {
            model_name: request.model.clone(),
            target_model_name: request.target_model.clone(),
            priority: request.priority.to_string(),
        };
        metrics.requests.get_or_create(&labels).inc();
        metrics
            .request_sizes
            .get_or_create(&ModelLabels {
                model_name: request.model.clone(),
                target_model_name: request.target_model.clone(),
            })
            .observe(request.body_len as f64);
        metrics
            .running_requests
            .get_or_create(&ModelOnly {
                model_name: request.model.clone(),
            })
            .inc();
        if routed.rewritten {
            self.response.rewrite_back =
                Some((request.target_model.clone(), request.model.clone()));
        }
        self.response.streaming = request.stream;
        self.request = Some(request);
        self.routed = Some(routed);
        self.phase = Phase::Routed;
        out
    }

    fn fail(
        &mut self,
        error: RequestError,
        request: Option<&InferenceRequest>,
    ) -> Vec<ProcessingResponse> {
        let (model, target) = match request {
            Some(r) => (r.model.clone(), r.target_model.clone()),
            None => (String::new(), String::new()),
        };
        tracing::info!(request_id = %self.request_id, model = %model, error = %error, code = error.code(), "request rejected");
        self.ctx
            .metrics
            .request_errors
            .get_or_create(&ErrorLabels {
                model_name: model,
                target_model_name: target,
                error_code: error.code().to_owned(),
            })
            .inc();
        self.done = true;
        self.body = BytesMut::new();
        vec![error.to_response()]
    }

    fn on_response_headers(
        &mut self,
        h: HttpHeaders,
        served: Option<String>,
    ) -> Vec<ProcessingResponse> {
        let headers = envoy::headers(h.headers.as_ref());
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if get("content-type").is_some_and(|ct| ct.contains("text/event-stream")) {
            self.response.streaming = true;
        }
        self.response.status = get(":status").map(str::to_owned);
        let mut set = Vec::new();
        for plugin in &self.ctx.director.config().response_plugins {
            for (k, v) in plugin.response_headers(served.as_deref()) {
                set.push(envoy::set_header(&k, &v));
            }
        }
        if self.ctx.options.decision_header
            && let Some(e) = self
                .routed
                .as_ref()
                .and_then(|r| r.result.primary_result())
                .and_then(|r| r.explanation.as_ref())
        {
            set.push(envoy::set_header(DECISION_HEADER, &e.compact(4)));
        }
        if h.end_of_stream {
            self.complete_response(&[]);
        }
        vec![envoy::response_headers_response(set)]
    }

    fn on_response_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        let eos = b.end_of_stream || b.end_of_stream_without_message;
        let chunk = Bytes::from(b.body);
        self.response.bytes += chunk.len();
        if self.response.streaming {
            if self.response.first_chunk_at.is_none() && !chunk.is_empty() {
                self.response.first_chunk_at = Some(Instant::now());
            }
            self.response.sse.feed(&chunk);
            if eos {
                self.complete_response(&[]);
            }
            return vec![envoy::body_chunk(
                Direction::Response,
                self.rewrite_response(chunk),
                eos,
            )];
        }
        if self.response.rewrite_back.is_none() {
            // Pass through at once; keep a bounded copy to read `usage` at the end.
            if self.response.copy.len() + chunk.len() <= MAX_RESPONSE_COPY {
                self.response.copy.extend_from_slice(&chunk);
            }
            if eos {
                let copy = std::mem::take(&mut self.response.copy);
                self.complete_response(&copy);
            }
            return vec![envoy::body_chunk(Direction::Response, chunk, eos)];
        }
        self.response.buffered.extend_from_slice(&chunk);
        if !eos {
            return Vec::new();
        }
        let body = std::mem::take(&mut self.response.buffered).freeze();
        self.complete_response(&body);
        envoy::body_chunks(Direction::Response, self.rewrite_response(body), true)
    }

    fn rewrite_response(&self, chunk: Bytes) -> Bytes {
        match &self.response.rewrite_back {
            Some((from, to)) => openai::rewrite_response_model(&chunk, from, to)
                .map(Bytes::from)
                .unwrap_or(chunk),
            None => chunk,
        }
    }

    fn complete_response(&mut self, json_body: &[u8]) {
        if self.response.complete {
            return;
        }
        self.response.complete = true;
        self.response.usage = self
            .response
            .sse
            .usage()
            .or_else(|| openai::usage_from_json(json_body));
        let Some(request) = &self.request else { return };
        let labels = ModelLabels {
            model_name: request.model.clone(),
            target_model_name: request.target_model.clone(),
        };
        let m = &self.ctx.metrics;
        let elapsed = self.started.elapsed();
        m.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        m.response_sizes
            .get_or_create(&labels)
            .observe(self.response.bytes as f64);
        if let Some(u) = self.response.usage {
            m.input_tokens
                .get_or_create(&labels)
                .observe(u.prompt_tokens as f64);
            m.output_tokens
                .get_or_create(&labels)
                .observe(u.completion_tokens as f64);
            m.cached_tokens
                .get_or_create(&labels)
                .observe(u.cached_tokens as f64);
            if u.completion_tokens > 0 {
                m.normalized_tpot
                    .get_or_create(&labels)
                    .observe(elapsed.as_secs_f64() / u.completion_tokens as f64);
            }
            if let Some(first) = self.response.first_chunk_at
                && u.completion_tokens > 1
            {
                m.tpot
                    .get_or_create(&labels)
                    .observe(first.elapsed().as_secs_f64() / (u.completion_tokens - 1) as f64);
            }
        }
        if let Some(first) = self.response.first_chunk_at {
            m.ttft
                .get_or_create(&labels)
                .observe(first.saturating_duration_since(self.started).as_secs_f64());
        }
        if let Some(status) = &self.response.status
            && !status.starts_with('2')
        {
            m.request_errors
                .get_or_create(&ErrorLabels {
                    model_name: request.model.clone(),
                    target_model_name: request.target_model.clone(),
                    error_code: format!("ModelServerError{status}"),
                })
                .inc();
        }
        tracing::debug!(
            request_id = %self.request_id,
            usage = ?self.response.usage,
            elapsed_ms = elapsed.as_millis() as u64,
            "response complete"
        );
        self.release();
    }

    /// Releases per-request state: the in-flight slot and the running-requests gauge.
    fn release(&mut self) {
        if let (Some(_routed), Some(request)) = (self.routed.take(), self.request.as_ref()) {
            self.ctx
                .metrics
                .running_requests
                .get_or_create(&ModelOnly {
                    model_name: request.model.clone(),
                })
                .dec();
        }
    }

    /// Called when the stream ends, whatever the reason.
    pub fn finish_metrics(&mut self) {
        self.release();
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Drop for StreamState {
    fn drop(&mut self) {
        self.release();
    }
}

/// How long a stream may stay open after shutdown begins.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
