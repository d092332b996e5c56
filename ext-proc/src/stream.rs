//! The per-stream state machine: one ext_proc stream is one HTTP request.
//!
//! The request body comes in one of two modes, which Envoy announces in the first message
//! (`protocol_config.request_body_mode`; without it, FULL_DUPLEX_STREAMED):
//! - FULL_DUPLEX_STREAMED (the FailClose templates, the reference's mode): request headers are
//!   stored and answered later, unless they end the stream (then the request is routed at
//!   once); body chunks are buffered here; at end of stream the body is parsed, the request
//!   routed, and the EPP answers with one headers response (destination header,
//!   `Content-Length`, `clear_route_cache`, `envoy.lb` metadata) followed by the body as
//!   `streamed_response` chunks of at most 62,000 bytes;
//! - BUFFERED (the FailOpen templates): Envoy keeps the body itself and sends it whole, after
//!   the headers' answer, so it can still fail open after the EPP saw the body (Envoy drops
//!   fail-open for good once a FULL_DUPLEX_STREAMED body chunk went out, in either direction,
//!   `Filter::failureModeAllow` in ext_proc.cc, envoyproxy/envoy#41276). The headers get an
//!   empty answer at once; the body's answer carries the routing (header mutations apply to
//!   the headers Envoy holds) and, only if the model was rewritten, the new body with its
//!   `Content-Length` (Envoy refuses a body whose length differs from the held header);
//!   other modes get a 500 at once ([`RequestError::UnsupportedBodyMode`]), as do response
//!   body modes other than NONE and FULL_DUPLEX_STREAMED;
//! - response headers are answered at once; response chunks, SSE or whole JSON, are answered
//!   one by one as they arrive (with the model name to rewrite back, a chunk's last bytes that
//!   may begin the `"model"` field wait for the next chunk, [`openai::ModelRewriteBack`]); a
//!   whole answer's `usage` is read as it passes ([`crate::json_usage`]);
//! - the lean response path (`response_body_mode: NONE`, an operator's choice; the shipped
//!   Envoy configs run the full path) sends no body at all: the response completes with the
//!   ext_proc stream's end ([`StreamState::on_stream_end`]). Envoy announces the path with the
//!   stream's first message (`protocol_config.response_body_mode`): on the full path, a stream
//!   that ends before the response's end, even before its first chunk, is a response cut short,
//!   released but not recorded as complete. Without the announcement, the response completes
//!   on whichever end is seen;
//! - every message gets exactly one answer, in order. Dropping the state (client gone, Envoy
//!   reset) releases the in-flight slot of the routed request.
//!
//! The state machine does no I/O: [`StreamState::on_inbound`] takes one message (its body as
//! `Bytes`, a slice of what the codec received) and returns the answers (a re-sent body chunk
//! stays `Bytes` until the codec writes it). The request body goes: [`StreamState::on_inbound`] → `finish_request` (parse with
//! [`crate::openai`]) → `route` ([`Director`]) → `answer_routed` ([`crate::envoy`] builders);
//! every outcome is reported once to the [`Recorder`].
//!
//! With flow control on, `route` does not answer at once: the request takes a place in flow
//! control's queues ([`StreamState::admission`] is then the ticket to wait on, which the
//! service awaits) and is scheduled when [`StreamState::on_admission`] hears it was let go, or
//! answered with flow control's refusal. The body waits with it, in its one buffer. Dropping
//! the state while it waits (the client went away) takes it out of the queue.
//!
//! Control headers and trust: see the README's "Security" section. Client copies of the
//! routing headers are always removed; the model-rewrite header is ignored unless
//! [`ServiceOptions::trust_model_rewrite_header`] (and an operator's InferenceModelRewrite that
//! matches the model wins either way); objective and fairness id are the gateway's to set, and
//! their values are validated.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use endpoint_picker::director::{Director, RouteError, Routed};
use endpoint_picker::flow::{Admitted, FlowRejection, Ticket};
use endpoint_picker::request::{Api, InferenceRequest};
use endpoint_picker::scheduling::plugins::filters::AddressMatcher;
use endpoint_picker::scheduling::plugins::response::Served;
use endpoint_picker::tokens::TokenProducer;
use tokio::time::Instant;

use crate::body_budget::{BodyBudget, BodyCharge, charged};
use crate::body_pool::{BodyBuffer, MAX_RESERVED_AHEAD, REQUEST_BODIES};
use crate::codec::Inbound;
use crate::envoy::{
    self, Answer, Direction, HeaderValueOption,
    ext_proc::{HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request},
};
use crate::error::RequestError;
use crate::json_usage::JsonUsageScanner;
use crate::observer::{ObserverTag, Observers, Watch, Watched, unix_micros_at};
use crate::openai::{self, SseUsageScanner, Usage};
use crate::protocol::{
    self, ControlHeader, DECISION_HEADER, DEFAULT_FAIRNESS_ID, DESTINATION_ENDPOINT,
    DESTINATION_SERVED, INTERNAL_REQUEST_HEADERS, LB_NAMESPACE, PROTECTED_HEADER_PREFIX,
    REQUEST_ID,
};
use crate::recorder::{Completion, RecordKey, Recorder, Scheduled};
use crate::untrusted::{LogBudget, Untrusted};

/// "request rejected" lines a second at INFO, the rest at DEBUG (the refusal counters count
/// them all): a client can cause one a request.
static REJECTION_LOG: LogBudget = LogBudget::new(20);
/// Lines about responses over the buffering caps: a client asking for large answers (or
/// holding the budget with slow readers) causes one a response.
static OVERFLOW_LOG: LogBudget = LogBudget::new(20);

/// Default of [`ServiceOptions::held_response_bytes`]: what all streams hold of their answers
/// together. That is an SSE line not yet ended (up to 1 MiB: the Responses API's last event
/// carries the whole answer), a chunk's end held back for the model rewrite, and a whole
/// answer's `usage` value ([`crate::json_usage`]). A client can ask for long answers cheaply
/// and read them slowly; this bounds what they hold together.
pub const DEFAULT_HELD_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// Longest `x-request-id` kept from a client; a longer or non-printable one is replaced.
pub const MAX_REQUEST_ID_BYTES: usize = 256;
/// Longest fairness id accepted (it keys per-flow state).
pub const MAX_FAIRNESS_ID_BYTES: usize = 128;
/// Longest objective name accepted (a Kubernetes object name).
const MAX_OBJECTIVE_BYTES: usize = 253;
/// Largest latency objective accepted, in milliseconds (an hour).
const MAX_SLO_MS: f64 = 3_600_000.0;

/// Default of [`ServiceOptions::request_body_timeout`]: a 16 MiB body (the default cap) at
/// 1 Mbit/s takes about two minutes.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(180);

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// `--max-request-body-bytes`.
    pub max_request_body_bytes: usize,
    /// `--request-body-timeout`: a streamed body must end this long after its headers, or the
    /// request gets 408 (a body trickled in, or never sent, held its bytes and its stream).
    pub request_body_timeout: Duration,
    /// The request-body bytes every stream may hold together before routing
    /// (`--max-gathered-request-bytes`); shared by every clone of these options.
    pub gathered_request_bytes: Arc<BodyBudget>,
    /// The non-streamed response bytes every stream may hold together (copies read for
    /// `usage`, bodies held for a model rewrite); past it a response passes through as it
    /// comes, its usage unknown. Shared by every clone of these options.
    pub held_response_bytes: Arc<BodyBudget>,
    /// `--disable-endpoint-subset-filter`.
    pub disable_subset_filter: bool,
    /// Add [`DECISION_HEADER`] to responses (`--debug-decision-header`).
    pub decision_header: bool,
    /// Honour the model-rewrite header (`--trust-model-rewrite-header`). Off by default: any
    /// client can send it, and it would override the operator's choice of model.
    pub trust_model_rewrite_header: bool,
    /// Put every scored endpoint's score of the primary profile into the `envoy.lb` metadata
    /// (`--emit-endpoint-scores`).
    pub emit_endpoint_scores: bool,
    /// `--response-observer`: each routed request gets an id in the observer namespace, for an
    /// observer filter's stream to claim ([`crate::observer`]).
    pub observers: Option<Arc<Observers>>,
    /// A deliberate protocol fault (conformance self-test only).
    #[cfg(feature = "conformance-faults")]
    pub fault: Option<crate::faults::ConformanceFault>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            max_request_body_bytes: 16 * 1024 * 1024,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            gathered_request_bytes: Arc::default(),
            held_response_bytes: Arc::new(BodyBudget::new(DEFAULT_HELD_RESPONSE_BYTES)),
            disable_subset_filter: false,
            decision_header: false,
            trust_model_rewrite_header: false,
            emit_endpoint_scores: false,
            observers: None,
            #[cfg(feature = "conformance-faults")]
            fault: None,
        }
    }
}

/// What every stream shares.
#[derive(Debug)]
pub struct ServiceContext {
    /// Request control.
    pub director: Arc<Director>,
    /// Where the events of each request go.
    pub recorder: Arc<dyn Recorder>,
    /// Settings.
    pub options: ServiceOptions,
}

/// How Envoy sends the request body (`protocol_config.request_body_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestBodyMode {
    /// FULL_DUPLEX_STREAMED: chunks as they arrive; the EPP answers the headers once it has
    /// routed and sends the body back itself.
    Streamed,
    /// BUFFERED: the whole body in one message after the headers' answer; Envoy keeps it.
    Buffered,
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
#[derive(Debug)]
pub struct StreamState {
    ctx: Arc<ServiceContext>,
    phase: Phase,
    request_body_mode: RequestBodyMode,
    /// Envoy streams the response body through this stream (the full path): the answer is
    /// recorded here, so no response observer is tagged.
    response_body_streamed: bool,
    /// Set once an immediate response ended the exchange.
    done: bool,
    headers: Vec<(String, String)>,
    request_id: String,
    generated_request_id: bool,
    subset: Option<Vec<String>>,
    body: BodyBuffer,
    /// The request body's bytes, charged to the process's budget until the body has been sent
    /// back to Envoy, or the request is refused or queued.
    body_charge: BodyCharge,
    /// The routed request's fairness id: all the response path reads of the request (flow
    /// control's usage). The request itself is not kept: its prompt is a slice that keeps the
    /// whole body's buffer alive and, with its token ids and headers, would stay held, counted
    /// by no budget, for as long as the response lasts (a slow reader's, for hours).
    fairness_id: Option<String>,
    routed: Option<Routed>,
    /// What the recorder filed the routed request under.
    key: RecordKey,
    /// A request waiting in flow control, with its body.
    queued: Option<Queued>,
    started: Instant,
    eos_at: Instant,
    response: ResponseState,
    /// A parsed request waiting for its token ids (see [`StreamState::pending_tokenization`]).
    awaiting_tokens: Option<AwaitingTokens>,
    /// The prompt tokens charged to the request's flow when it went (least attained service),
    /// from its estimate; corrected by the engine's usage.
    prompt_charged: u64,
    /// The routed request, kept for its response observer until released.
    watch: Option<Watch>,
}

/// A request held between the end of its body and its routing while the token producer runs.
#[derive(Debug)]
struct AwaitingTokens {
    request: InferenceRequest,
    body: (Bytes, openai::ParsedBody, bool),
    /// The request's trailers came meanwhile: answered after the request is.
    trailers: bool,
}

/// What the service awaits, off the state machine, before [`StreamState::on_token_ids`]: the
/// token producer runs on its bounded blocking pool, never on the async threads.
#[derive(Debug)]
pub struct Tokenization {
    /// The producer.
    pub producer: Arc<TokenProducer>,
    /// The request's API.
    pub api: Api,
    /// Its body.
    pub body: Bytes,
}

impl Tokenization {
    /// The ids, or `None` when the request proceeds without them.
    pub async fn run(self) -> Option<Arc<[u32]>> {
        self.producer.token_ids(self.api, self.body).await
    }
}

/// A request waiting in flow control: its ticket, and what scheduling will need.
#[derive(Debug)]
struct Queued {
    ticket: Ticket,
    request: InferenceRequest,
    body: Option<(Bytes, openai::ParsedBody, bool)>,
    /// The request trailers came with the end of the body: their answer follows.
    trailers: bool,
}

#[derive(Debug, Default)]
struct ResponseState {
    streaming: bool,
    /// The served model's name to rewrite back to the one asked for; on a streamed body it
    /// holds back (charged) a chunk's end that may begin the name's field.
    rewrite_back: Option<openai::ModelRewriteBack>,
    /// Reads a whole answer's `usage` as it passes; what it keeps is charged to
    /// [`ServiceOptions::held_response_bytes`].
    usage_scanner: JsonUsageScanner,
    sse: SseUsageScanner,
    bytes: usize,
    usage: Option<Usage>,
    status: Option<String>,
    /// Response headers arrived (the response began).
    headers_seen: bool,
    /// The response headers ended the response (no body at all).
    headers_ended: bool,
    /// Response body messages received: none on the lean path, where the size is unknown.
    body_messages: usize,
    complete: bool,
    /// When the chunk that completed the streamed answer's first `data:` event arrived (time
    /// to first token): not its first byte, which may be an SSE comment a proxy or an engine
    /// sends to keep the connection open before any token exists.
    first_chunk_at: Option<Instant>,
}

impl StreamState {
    /// A fresh stream.
    pub fn new(ctx: Arc<ServiceContext>) -> Self {
        Self {
            ctx,
            phase: Phase::Start,
            request_body_mode: RequestBodyMode::Streamed,
            response_body_streamed: false,
            done: false,
            headers: Vec::new(),
            request_id: String::new(),
            generated_request_id: false,
            subset: None,
            body: BodyBuffer::empty(),
            body_charge: BodyCharge::default(),
            fairness_id: None,
            routed: None,
            key: RecordKey::default(),
            queued: None,
            started: Instant::now(),
            eos_at: Instant::now(),
            response: ResponseState::default(),
            awaiting_tokens: None,
            prompt_charged: 0,
            watch: None,
        }
    }

    /// The tokenization the last message left waiting, if any: the caller runs it and hands
    /// the ids to [`StreamState::on_token_ids`], which routes the request.
    pub fn pending_tokenization(&self) -> Option<Tokenization> {
        let waiting = self.awaiting_tokens.as_ref()?;
        Some(Tokenization {
            producer: self.ctx.director.token_producer()?.clone(),
            api: waiting.request.api,
            body: waiting.body.0.clone(),
        })
    }

    /// Routes the request that waited for its token ids (`None`: without them).
    pub fn on_token_ids(&mut self, ids: Option<Arc<[u32]>>) -> Vec<Answer> {
        let Some(AwaitingTokens {
            mut request,
            body,
            trailers,
        }) = self.awaiting_tokens.take()
        else {
            return Vec::new();
        };
        request.token_ids = ids;
        // The ids are as long as the body at worst, held until the request is routed: the
        // gathering budget counts them beside it.
        let ids_bytes = request.token_ids.as_ref().map_or(0, |ids| ids.len() * 4);
        if ids_bytes > 0
            && let Err(e) = self
                .body_charge
                .grow(&self.ctx.options.gathered_request_bytes, ids_bytes)
        {
            let mut out = self.fail(RequestError::BodiesOverBudget(e), Some(&request));
            if trailers {
                out.extend(self.answer_trailers());
            }
            return out;
        }
        let mut out = self.route(request, Some(body));
        if trailers {
            out.extend(self.answer_trailers());
        }
        out
    }

    /// The answer to the request's trailers, in its turn: after the request's own answers,
    /// so held with a request queued in flow control (answered once it leaves the queue), and
    /// none once an immediate response ended the exchange.
    fn answer_trailers(&mut self) -> Option<Answer> {
        if let Some(q) = self.queued.as_mut() {
            q.trailers = true;
            return None;
        }
        (!self.done).then(|| envoy::trailers_response(Direction::Request).into())
    }

    /// When the request's body must have ended: set while a streamed body is being gathered
    /// (not while it waits for token ids or in flow control), `None` otherwise.
    pub fn body_deadline(&self) -> Option<Instant> {
        (self.phase == Phase::RequestBody
            && self.request_body_mode == RequestBodyMode::Streamed
            && !self.done
            && self.awaiting_tokens.is_none()
            && self.queued.is_none())
        .then(|| self.started + self.ctx.options.request_body_timeout)
    }

    /// The body's deadline passed: the request is refused with 408, what it held released.
    pub fn on_body_timeout(&mut self) -> Vec<Answer> {
        if self.body_deadline().is_none() {
            return Vec::new();
        }
        let seconds = self.ctx.options.request_body_timeout.as_secs();
        self.fail(RequestError::BodyTimeout { seconds }, None)
    }

    /// The request id (empty before headers).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// True once an immediate response ended the exchange: later messages get no answer.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The flow-control ticket of a request waiting to be scheduled: the caller awaits
    /// [`Ticket::wait`] (cancel-safe) and hands the decision to [`StreamState::on_admission`].
    /// No other message is answered meanwhile.
    pub fn admission(&mut self) -> Option<&mut Ticket> {
        self.queued.as_mut().map(|q| &mut q.ticket)
    }

    /// Flow control decided on the waiting request: schedule it, or answer the refusal.
    pub fn on_admission(&mut self, decision: Result<Admitted, FlowRejection>) -> Vec<Answer> {
        let Some(Queued {
            request,
            body,
            trailers,
            ..
        }) = self.queued.take()
        else {
            return Vec::new();
        };
        let mut out = match decision {
            Ok(admitted) => {
                // Flow control's `maxBytes` no longer counts the body: the gathering budget
                // does again, until its answers have gone out to Envoy.
                if let Some((b, _, _)) = &body {
                    let budget = self.ctx.options.gathered_request_bytes.clone();
                    let held = b.len().saturating_add(request.held_beside_body());
                    self.body_charge.grow_past(&budget, held);
                }
                let (fairness_id, prompt) = (request.fairness_id.clone(), request.prompt_tokens());
                let out = self.schedule(request, body);
                if !self.done
                    && let Some(flow) = self.ctx.director.flow_control()
                {
                    // The prompt's share of the flow's attained service, charged as the request
                    // goes to its endpoint from its estimate, corrected by the engine's `usage`
                    // at the end (`complete_response`), with the answer's share.
                    flow.record_usage(&fairness_id, prompt, 0);
                    self.prompt_charged = prompt;
                }
                // Routed (its in-flight slot counts now) or refused: either way no longer a
                // dispatched-but-unrouted request.
                drop(admitted);
                out
            }
            Err(rejection) => self.fail(
                RequestError::Route(RouteError::FlowControl(rejection)),
                Some(&request),
            ),
        };
        if trailers && !self.done {
            out.push(envoy::trailers_response(Direction::Request).into());
        }
        out
    }

    /// True once the exchange is over: an immediate response was sent, or the response ended.
    pub fn exchange_complete(&self) -> bool {
        self.done || self.response.complete
    }

    /// [`StreamState::on_inbound`] for a prost-decoded message, answering prost messages (the
    /// form the tests and the fuzz harness use; the service uses `on_inbound`).
    pub fn on_message(&mut self, message: ProcessingRequest) -> Vec<ProcessingResponse> {
        self.on_inbound(Inbound::from_message(message))
            .into_iter()
            .map(Answer::into_message)
            .collect()
    }

    /// Handles one message (its body, if any, beside it as `Bytes`); returns the answers to
    /// send, in order.
    pub fn on_inbound(&mut self, inbound: Inbound) -> Vec<Answer> {
        let Inbound {
            message,
            body: body_bytes,
        } = inbound;
        if self.done {
            return Vec::new();
        }
        if self.phase == Phase::Start
            && let Some(config) = message.protocol_config
            && let Err(e) = self.note_protocol(config)
        {
            return self.fail(e, None);
        }
        let metadata = message.metadata_context.as_ref();
        use processing_request::Request as R;
        match message.request {
            Some(R::RequestHeaders(h)) => {
                if self.phase != Phase::Start {
                    self.begin_next_request();
                }
                self.note_subset_hint(metadata);
                self.on_request_headers(h)
            }
            Some(R::RequestBody(b)) => {
                self.note_subset_hint(metadata);
                self.on_request_body(b, body_bytes)
            }
            Some(R::RequestTrailers(_)) => {
                let mut out = Vec::new();
                if self.phase == Phase::RequestBody {
                    // BUFFERED: trailers here mean a request without body (Envoy sends the
                    // body, if any, before them), which parsing refuses: no body answer then
                    // precedes the trailers' answer.
                    out = self.finish_request(false);
                }
                if let Some(a) = self.awaiting_tokens.as_mut() {
                    // Answered after the request is, once its token ids are in.
                    a.trailers = true;
                    return out;
                }
                out.extend(self.answer_trailers());
                out
            }
            Some(R::ResponseHeaders(h)) => {
                let served = envoy::metadata_string(metadata, LB_NAMESPACE, DESTINATION_SERVED);
                self.on_response_headers(h, served)
            }
            Some(R::ResponseBody(b)) => self.on_response_body(b, body_bytes),
            Some(R::ResponseTrailers(_)) => {
                let mut out = Vec::new();
                // A passed-through body ended by trailers: its usage is read (none if it
                // was dropped, or streamed).
                self.complete_response();
                // A body's end held back for the rewrite: no chunk completes it now.
                if let Some(held) = self.response.rewrite_back.as_mut().map(|r| r.flush())
                    && !held.is_empty()
                {
                    out.push(envoy::body_chunk(Direction::Response, held, false).into());
                }
                out.push(envoy::trailers_response(Direction::Response).into());
                out
            }
            None => Vec::new(),
        }
    }

    /// The ext_proc stream ended (Envoy closed or reset it). On the lean response path without
    /// trailers this is the only sign that the response is over: a response whose headers were
    /// seen completes here, so that its duration and status are still recorded. A stream that
    /// ends before response headers completes nothing (the request is only released), nor does
    /// one on the full path that ends before the response's end, even before its first chunk.
    pub fn on_stream_end(&mut self) {
        // Only on the lean path, where no body goes through the EPP: on the full path every
        // body byte does, so a stream that ends before the body's end (before its first chunk
        // too: a client that gave up waiting for its first token) is a response cut short.
        if self.phase == Phase::Routed
            && !self.response_body_streamed
            && self.response.headers_seen
            && self.response.body_messages == 0
            && !self.done
        {
            self.complete_response();
        } else if self.phase == Phase::Routed
            && self.response.streaming
            && !self.response.complete
            && !self.done
        {
            // A stream cut short: no completion, but the flow is charged for what it got (the
            // events seen), once.
            self.response.complete = true;
            if let (Some(flow), Some(fairness_id)) =
                (self.ctx.director.flow_control(), &self.fairness_id)
            {
                flow.record_usage(fairness_id, 0, self.response.sse.data_events());
            }
        }
    }

    /// Reads the body mode Envoy announces with the stream's first message.
    fn note_protocol(
        &mut self,
        config: envoy::ext_proc::ProtocolConfiguration,
    ) -> Result<(), RequestError> {
        use envoy::BodySendMode as M;
        let unsupported = |direction, mode: Result<M, _>, needs| {
            Err(RequestError::UnsupportedBodyMode {
                direction,
                mode: mode.map_or("an unknown mode", |m| m.as_str_name()),
                needs,
            })
        };
        self.request_body_mode = match M::try_from(config.request_body_mode) {
            Ok(M::FullDuplexStreamed) => RequestBodyMode::Streamed,
            Ok(M::Buffered) => RequestBodyMode::Buffered,
            other => return unsupported("request", other, "FULL_DUPLEX_STREAMED or BUFFERED"),
        };
        // The response side answers every body message with a `streamed_response` chunk (or
        // nothing, holding bytes back for the model rewrite): what FULL_DUPLEX_STREAMED takes,
        // and what Envoy rejects as a spurious message in STREAMED or BUFFERED, breaking every
        // answer with a body. STREAMED is the response observer's mode (a filter of its own);
        // copied onto the routing filter it is refused here, at once and by name.
        self.response_body_streamed = match M::try_from(config.response_body_mode) {
            Ok(M::None) => false,
            Ok(M::FullDuplexStreamed) => true,
            other => return unsupported("response", other, "NONE or FULL_DUPLEX_STREAMED"),
        };
        Ok(())
    }

    /// A second request on the same stream (Envoy never sends one; any other client of the
    /// port may) starts from a fresh state, the stream's modes kept: the first exchange ends
    /// as the stream's end would end it (released; completed only if its response was), and
    /// nothing of it (its response's state, its model rewrite, its subset hint, its charges)
    /// carries over to the second, whose completion is then recorded as any other's.
    fn begin_next_request(&mut self) {
        let mut next = StreamState::new(self.ctx.clone());
        next.request_body_mode = self.request_body_mode;
        next.response_body_streamed = self.response_body_streamed;
        // The previous state is dropped here: its `Drop` ends the first exchange.
        *self = next;
    }

    fn note_subset_hint(&mut self, metadata: Option<&envoy::Metadata>) {
        if !self.ctx.options.disable_subset_filter
            && let Some(hint) = envoy::subset_hint(metadata)
        {
            self.subset = Some(hint);
        }
    }

    fn on_request_headers(&mut self, h: HttpHeaders) -> Vec<Answer> {
        self.started = Instant::now();
        self.headers = envoy::headers(h.headers.as_ref());
        match self
            .header(REQUEST_ID)
            .filter(|v| is_printable_token(v, MAX_REQUEST_ID_BYTES))
        {
            Some(id) => self.request_id = id.to_owned(),
            None => {
                // Absent, or unfit to be logged and forwarded: a fresh one replaces it.
                self.request_id = uuid::Uuid::new_v4().to_string();
                self.generated_request_id = true;
            }
        }
        // The request's span (entered by the service) carries the id on every log line.
        tracing::Span::current().record("request_id", self.request_id.as_str());
        self.phase = Phase::RequestBody;
        if let Err(refusal) = openai::check_request_path(self.header(":path").unwrap_or("")) {
            return self.fail(refusal.into(), None);
        }
        if h.end_of_stream {
            self.eos_at = Instant::now();
            if let Some(api) = self.body_api() {
                // A body-carrying API without a body: what vLLM would refuse, refused here.
                return self.fail(
                    openai::BodyError::EmptyBody {
                        api: api.as_str(),
                        field: openai::prompt_field(api),
                    }
                    .into(),
                    None,
                );
            }
            let request = match self.base_request(Api::HeadersOnly) {
                Ok(r) => r,
                Err(e) => return self.fail(e, None),
            };
            return self.route(request, None);
        }
        #[cfg(feature = "conformance-faults")]
        if self.ctx.options.fault == Some(crate::faults::ConformanceFault::HeadersBeforeBody) {
            // Deliberately wrong: route on the headers alone; the body then passes through.
            self.eos_at = Instant::now();
            return match self.base_request(Api::HeadersOnly) {
                Ok(request) => self.route(request, None),
                Err(e) => self.fail(e, None),
            };
        }
        if self.request_body_mode == RequestBodyMode::Buffered {
            // Envoy sends the body only after this answer, and keeps the headers (still
            // mutable) until the body's answer, which carries the routing.
            return vec![envoy::continue_request_headers().into()];
        }
        let expected = self
            .header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
            .min(self.ctx.options.max_request_body_bytes);
        // A second request on the stream (no Envoy sends one) starts its own charge.
        self.body_charge.release();
        // The buffer sized from the declared length is a reservation, bounded apart from the
        // charges (`body_budget`): streams that declare long bodies and send none cannot lock
        // the others out. The body's bytes are charged as they arrive.
        let reserved = self.body_charge.reserve(
            &self.ctx.options.gathered_request_bytes,
            expected.min(MAX_RESERVED_AHEAD),
        );
        self.body = REQUEST_BODIES.take(reserved);
        Vec::new()
    }

    /// The API of a request whose method and path say it must carry a JSON body.
    fn body_api(&self) -> Option<Api> {
        let post = self.header(":method").is_some_and(|m| m == "POST");
        let json = self
            .header("content-type")
            .is_some_and(|ct| ct.contains("json"));
        let path = self.header(":path").unwrap_or("");
        match openai::known_api_for_path(path) {
            Some(api) if post => Some(api),
            None if post && json => Some(openai::api_for_path(path)),
            _ => None,
        }
    }

    fn on_request_body(&mut self, b: HttpBody, body: Bytes) -> Vec<Answer> {
        let buffered = self.request_body_mode == RequestBodyMode::Buffered;
        if self.phase != Phase::RequestBody {
            // A body after the request was answered cannot be routed again; pass it on.
            if buffered {
                return vec![envoy::continue_request_body().into()];
            }
            return vec![envoy::body_chunk(Direction::Request, body, b.end_of_stream).into()];
        }
        let limit = self.ctx.options.max_request_body_bytes;
        if self.body.len() + body.len() > limit {
            return self.fail(RequestError::TooLarge { limit }, None);
        }
        let budget = &self.ctx.options.gathered_request_bytes;
        let beyond_charge = (self.body.len() + body.len()).saturating_sub(self.body_charge.bytes());
        if let Err(e) = self.body_charge.grow(budget, beyond_charge) {
            return self.fail(RequestError::BodiesOverBudget(e), None);
        }
        if buffered {
            // The whole body, even without `end_of_stream` (trailers follow it then).
            return self.finish_request_with(body, b.end_of_stream);
        }
        if self.body.is_empty() && b.end_of_stream {
            // The whole body in one message: take it without copying.
            self.body = BodyBuffer::empty();
            return self.finish_request_with(body, true);
        }
        self.body.extend_from_slice(&body);
        if b.end_of_stream || b.end_of_stream_without_message {
            return self.finish_request(true);
        }
        Vec::new()
    }

    fn finish_request(&mut self, end_of_stream: bool) -> Vec<Answer> {
        let body = std::mem::replace(&mut self.body, BodyBuffer::empty()).freeze();
        self.finish_request_with(body, end_of_stream)
    }

    /// A control header's value under the first of its spellings present (the current name
    /// first), refused when that spelling's copies disagree: an operator's gateway that
    /// appends its value (Envoy's default for a header mutation) instead of replacing the
    /// client's would otherwise leave the client's copy first, and the client would choose its
    /// own priority, fairness id or SLO.
    fn control(&self, header: ControlHeader) -> Result<Option<&str>, RequestError> {
        let copies = |name: &'static str| {
            self.headers
                .iter()
                .filter(move |(k, _)| k == name)
                .map(|(_, v)| v.trim())
                .filter(|v| !v.is_empty())
        };
        let Some(mut values) = header
            .spellings()
            .map(copies)
            .find_map(|mut c| c.next().map(|first| std::iter::once(first).chain(c)))
        else {
            return Ok(None);
        };
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.any(|v| v != first) {
            return Err(RequestError::BadHeader {
                header: header.name,
                reason: "sent more than once, with different values",
            });
        }
        Ok(Some(first))
    }

    /// The request as the headers describe it, control headers validated.
    fn base_request(&self, api: Api) -> Result<InferenceRequest, RequestError> {
        let objective = match self.control(protocol::OBJECTIVE)? {
            Some(o) if !is_object_name(o) => {
                return Err(RequestError::BadHeader {
                    header: protocol::OBJECTIVE.name,
                    reason: "not a Kubernetes object name",
                });
            }
            o => o.map(str::to_owned),
        };
        let fairness_id = match self.control(protocol::FAIRNESS_ID)? {
            None => DEFAULT_FAIRNESS_ID.to_owned(),
            Some(f) if is_printable_token(f, MAX_FAIRNESS_ID_BYTES) => f.to_owned(),
            Some(_) => {
                return Err(RequestError::BadHeader {
                    header: protocol::FAIRNESS_ID.name,
                    reason: "longer than 128 bytes or not printable ASCII",
                });
            }
        };
        let slo = |header: ControlHeader| match self.control(header)? {
            None => Ok(None),
            Some(v) => match v.parse::<f64>() {
                Ok(ms) if ms.is_finite() && ms > 0.0 && ms <= MAX_SLO_MS => {
                    Ok(Some(Duration::from_secs_f64(ms / 1000.0)))
                }
                _ => Err(RequestError::BadHeader {
                    header: header.name,
                    reason: "not a number of milliseconds in (0, 3600000]",
                }),
            },
        };
        Ok(InferenceRequest {
            request_id: self.request_id.clone(),
            api,
            objective,
            fairness_id,
            slo_ttft: slo(protocol::SLO_TTFT_MS)?,
            slo_tpot: slo(protocol::SLO_TPOT_MS)?,
            headers: self.headers.clone(),
            ..Default::default()
        })
    }

    fn finish_request_with(&mut self, body: Bytes, end_of_stream: bool) -> Vec<Answer> {
        self.eos_at = Instant::now();
        if body.is_empty()
            && self.body_api().is_none()
            && (end_of_stream || self.request_body_mode == RequestBodyMode::Streamed)
        {
            // No body API and no body: a `GET /v1/models` sent chunked with an empty last
            // chunk, or HTTP/2 headers then an empty DATA frame. Routed on its headers, as the
            // same request ending at its headers is, instead of refused as an empty
            // completions body. (In BUFFERED mode trailers come after the headers' answer, so
            // there is nothing left to route by: refused as before.)
            let request = match self.base_request(Api::HeadersOnly) {
                Ok(r) => r,
                Err(e) => return self.fail(e, None),
            };
            let nothing = openai::ParsedBody {
                model: String::new(),
                stream: false,
                prompt: Bytes::new(),
                cache_salt: None,
                model_span: 0..0,
                max_tokens: None,
                estimated_prompt_tokens: 0,
                prompt_is_json: false,
                prompt_media_from: 0,
            };
            return self.route(request, Some((body, nothing, end_of_stream)));
        }
        let api = openai::api_for_path(self.header(":path").unwrap_or("/v1/completions"));
        let parsed = match openai::parse_body(api, &body) {
            Ok(p) => p,
            Err(e) => return self.fail(RequestError::BadBody(e), None),
        };
        let request = match self.base_request(api) {
            Ok(r) => InferenceRequest {
                model: parsed.model.clone(),
                max_tokens: parsed.max_tokens,
                stream: parsed.stream,
                prompt: parsed.prompt.clone(),
                prompt_is_copy: !openai::is_slice_of(&parsed.prompt, &body),
                estimated_prompt_tokens: Some(parsed.estimated_prompt_tokens),
                prompt_is_json: parsed.prompt_is_json,
                prompt_media_from: parsed.prompt_media_from,
                cache_salt: parsed.cache_salt.clone(),
                body_len: body.len(),
                ..r
            },
            Err(e) => return self.fail(e, None),
        };
        // A prompt copied apart from the body is held beside it until the request is routed:
        // the gathering budget counts it, or a client's chat bodies with tools would hold twice
        // what `--max-gathered-request-bytes` says.
        let beside = request.held_beside_body();
        if beside > 0
            && let Err(e) = self
                .body_charge
                .grow(&self.ctx.options.gathered_request_bytes, beside)
        {
            return self.fail(RequestError::BodiesOverBudget(e), Some(&request));
        }
        if TokenProducer::handles(api) && self.ctx.director.token_producer().is_some() {
            // Answered once the ids are in: `pending_tokenization`, then `on_token_ids`.
            self.awaiting_tokens = Some(AwaitingTokens {
                request,
                body: (body, parsed, end_of_stream),
                trailers: false,
            });
            return Vec::new();
        }
        self.route(request, Some((body, parsed, end_of_stream)))
    }

    /// The model-rewrite header's value, when the operator trusts it.
    fn forced_model(&self) -> Result<Option<String>, RequestError> {
        if !self.ctx.options.trust_model_rewrite_header {
            return Ok(None);
        }
        match self.control(protocol::MODEL_REWRITE)? {
            None => Ok(None),
            Some(m) => match openai::validate_model_name(m) {
                Ok(()) => Ok(Some(m.to_owned())),
                Err(_) => Err(RequestError::BadHeader {
                    header: protocol::MODEL_REWRITE.name,
                    reason: "not a valid model name",
                }),
            },
        }
    }

    fn route(
        &mut self,
        mut request: InferenceRequest,
        body: Option<(Bytes, openai::ParsedBody, bool)>,
    ) -> Vec<Answer> {
        let forced = match self.forced_model() {
            Ok(f) => f,
            Err(e) => return self.fail(e, Some(&request)),
        };
        let director = self.ctx.director.clone();
        director.resolve(&mut request, forced.as_deref());
        if let Some(flow) = director.flow_control() {
            // Queued under flow control's own caps (`maxBytes`) from here.
            self.body_charge.release();
            let ticket = flow.enqueue(director.flow_request(&request), Instant::now());
            self.queued = Some(Queued {
                ticket,
                request,
                body,
                trailers: false,
            });
            return Vec::new();
        }
        self.schedule(request, body)
    }

    /// Schedules a resolved (and, with flow control, admitted) request and answers it.
    fn schedule(
        &mut self,
        request: InferenceRequest,
        body: Option<(Bytes, openai::ParsedBody, bool)>,
    ) -> Vec<Answer> {
        let director = self.ctx.director.clone();
        let subset: Option<Vec<AddressMatcher>> = self
            .subset
            .as_ref()
            .map(|s| s.iter().filter_map(|e| AddressMatcher::parse(e)).collect());
        let recorder = self.ctx.recorder.clone();
        let explain = self.ctx.options.decision_header
            || self.ctx.options.emit_endpoint_scores
            || recorder.wants_explanation()
            || tracing::enabled!(tracing::Level::DEBUG);
        let scheduling_started = Instant::now();
        let routed = director.route(&request, subset.as_deref(), explain);
        recorder.on_scheduled(&Scheduled {
            request: &request,
            outcome: routed.as_ref(),
            took: scheduling_started.elapsed(),
        });
        match routed {
            Ok(routed) => self.answer_routed(request, routed, body),
            Err(e) => self.fail(RequestError::Route(e), Some(&request)),
        }
    }

    /// The headers response (and the body, re-sent) for a routed request.
    fn answer_routed(
        &mut self,
        request: InferenceRequest,
        routed: Routed,
        body: Option<(Bytes, openai::ParsedBody, bool)>,
    ) -> Vec<Answer> {
        // A second request on the same stream (Envoy never sends one; any other client of the
        // port may) replaces the first: release the first before filing the second, so that
        // every `on_routed` still gets its one `on_released`.
        self.release();
        let destination = routed.destination();
        if let Some(e) = routed
            .result
            .primary_result()
            .and_then(|r| r.explanation.as_ref())
        {
            tracing::debug!(model = %Untrusted(&request.target_model), decision = %e.compact(8), "scheduled");
        }
        tracing::debug!(%destination, "routed");

        let mut set: Vec<HeaderValueOption> =
            vec![envoy::set_header(DESTINATION_ENDPOINT, &destination)];
        if self.generated_request_id {
            set.push(envoy::set_header(REQUEST_ID, &self.request_id));
        }
        // The model server's spans become children of this request's span.
        for (k, v) in self.ctx.recorder.trace_headers(&tracing::Span::current()) {
            set.push(envoy::set_header(k, &v));
        }
        // Headers the plugins set for the model server (`x-kv-cache-source-host-port`).
        for (k, v) in &routed.headers {
            set.push(envoy::set_header(k, v));
        }
        // Client-sent routing headers other than those set here are removed: the EPP's own
        // (`x-gateway-destination-endpoint*`) and those a model server or its sidecar acts on.
        // An answer whose model is rewritten back must come uncompressed: the rewrite (and the
        // usage) reads its bytes, and a compressed answer would reach the client naming the
        // served model. So the client's `accept-encoding` does not reach the model server.
        let must_read_answer = routed.rewritten;
        let remove: Vec<String> = self
            .headers
            .iter()
            .map(|(k, _)| k)
            .filter(|k| {
                let internal = (k.starts_with(PROTECTED_HEADER_PREFIX)
                    && k.as_str() != DESTINATION_ENDPOINT)
                    || INTERNAL_REQUEST_HEADERS
                        .iter()
                        .any(|h| k.eq_ignore_ascii_case(h));
                let compression = must_read_answer && k.as_str() == "accept-encoding";
                (internal
                    && !routed
                        .headers
                        .iter()
                        .any(|(h, _)| k.eq_ignore_ascii_case(h)))
                    || compression
            })
            .cloned()
            .collect();
        let mut rewritten = false;
        let body_out = body.map(|(body, parsed, eos)| {
            // An empty body has no model to rewrite (a request without a body API).
            let body = if !body.is_empty() && request.target_model != parsed.model {
                rewritten = true;
                openai::rewrite_model(&body, parsed.model_span.clone(), &request.target_model)
            } else {
                body
            };
            // Streamed: Envoy drops the client's length and takes the EPP's body. Buffered:
            // Envoy keeps its own body and length unless the body is replaced.
            if !body.is_empty()
                && (self.request_body_mode == RequestBodyMode::Streamed || rewritten)
            {
                set.push(envoy::set_header("content-length", &body.len().to_string()));
            }
            (body, eos)
        });
        let mut metadata = self
            .lb_metadata_enabled()
            .then(|| envoy::destination_metadata(&destination));
        if self.ctx.options.emit_endpoint_scores
            && let (Some(metadata), Some(e)) = (
                metadata.as_mut(),
                routed
                    .result
                    .primary_result()
                    .and_then(|r| r.explanation.as_ref()),
            )
        {
            envoy::add_endpoint_scores(metadata, e.rows.iter().map(|r| (&*r.address, r.total)));
        }
        let observer_id = match (&self.ctx.options.observers, metadata.as_mut()) {
            (Some(observers), Some(metadata)) if !self.response_body_streamed => {
                let id = observers.next_id();
                envoy::add_observer_tag(
                    metadata,
                    &ObserverTag {
                        id,
                        instance: observers.instance(),
                        model: request.model.clone(),
                        target_model: request.target_model.clone(),
                        fairness_id: request.fairness_id.clone(),
                        started_us: unix_micros_at(self.started),
                        priority: Some(request.priority),
                        streaming: request.stream,
                    },
                );
                Some(id)
            }
            _ => None,
        };
        let out = match (self.request_body_mode, body_out) {
            (RequestBodyMode::Streamed, Some((body, eos))) => {
                let mut out = Vec::with_capacity(2);
                out.push(envoy::request_headers_response(set, remove, metadata).into());
                // Counted until the chunks have gone out to Envoy.
                let body = charged(body, std::mem::take(&mut self.body_charge));
                out.extend(
                    envoy::body_chunks(Direction::Request, body, eos)
                        .into_iter()
                        .map(Answer::from),
                );
                out
            }
            // Headers that end the request: routed by their answer, in either mode.
            (_, None) => vec![envoy::request_headers_response(set, remove, metadata).into()],
            (RequestBodyMode::Buffered, Some((body, _))) => {
                let new_body = rewritten.then_some(body);
                vec![envoy::request_body_response(set, remove, metadata, new_body).into()]
            }
        };
        // A body Envoy keeps (BUFFERED, not rewritten) is not the EPP's to count any more.
        self.body_charge.release();
        self.key = self
            .ctx
            .recorder
            .on_routed(&request, rewritten, self.eos_at.elapsed());
        if routed.rewritten {
            self.response.rewrite_back =
                openai::ModelRewriteBack::new(&request.target_model, &request.model);
        }
        self.response.streaming = request.stream;
        if let (Some(observers), Some(id)) = (&self.ctx.options.observers, observer_id) {
            // Before the answer leaves: Envoy writes the id with it, and only then can an
            // observer's message carry it.
            self.watch = observers.watch(
                id,
                Watched {
                    key: self.key.clone(),
                    started: self.started,
                    fairness_id: request.fairness_id.clone(),
                    streaming: request.stream,
                    first_token: routed.first_token_handle(),
                },
            );
        }
        if !(request.stream && self.response_body_streamed) {
            // This stream will not see the first token (a whole answer's headers come with
            // its end; the lean path sees no chunk): the prompt stops counting as queued
            // prefill by prediction, unless an observer's first chunk ends it sooner.
            self.ctx.director.end_prefill_by_prediction(&routed);
        }
        // Routed: what the request was routed on (headers, prompt, token ids) is let go now,
        // and the stream's copy of the headers with it.
        self.fairness_id = Some(request.fairness_id);
        self.headers = Vec::new();
        self.routed = Some(routed);
        self.phase = Phase::Routed;
        out
    }

    #[cfg(feature = "conformance-faults")]
    fn lb_metadata_enabled(&self) -> bool {
        self.ctx.options.fault != Some(crate::faults::ConformanceFault::NoLbMetadata)
    }

    #[cfg(not(feature = "conformance-faults"))]
    fn lb_metadata_enabled(&self) -> bool {
        true
    }

    fn fail(&mut self, error: RequestError, request: Option<&InferenceRequest>) -> Vec<Answer> {
        let model = Untrusted(request.map_or("", |r| r.model.as_str()));
        match REJECTION_LOG.allow() {
            Some(not_logged) => tracing::info!(
                %model,
                %error,
                code = error.code(),
                not_logged,
                "request rejected"
            ),
            None => tracing::debug!(%model, %error, code = error.code(), "request rejected"),
        }
        self.ctx.recorder.on_rejected(request, &error);
        self.done = true;
        self.body = BodyBuffer::empty();
        self.body_charge.release();
        vec![error.to_response().into()]
    }

    fn on_response_headers(&mut self, h: HttpHeaders, served: Option<String>) -> Vec<Answer> {
        let (status, body) = envoy::response_head(&h);
        self.response.headers_seen = true;
        // The answer's own content type decides, the request's `stream` only without one: a
        // JSON answer to a streamed request (an engine's error, or one that ignores `stream`)
        // is a whole answer, its usage read from the JSON and its time not a first token's.
        self.response.streaming = body.streamed(self.response.streaming);
        if !self.response.streaming
            && let Some(routed) = self.routed.as_mut()
        {
            // A whole answer is ready before its headers: the prompt is done, but the time is
            // not a time to first token.
            routed.first_token(false);
        }
        self.response.status = status;
        let mut set = Vec::new();
        let plugins = &self.ctx.director.config().response_plugins;
        if !plugins.is_empty() {
            // The endpoint Envoy says served the response, else the primary target.
            let snapshot = self.ctx.director.datastore().snapshot();
            let endpoint = served
                .as_deref()
                .and_then(|s| s.parse().ok())
                .and_then(|addr| snapshot.by_address(&addr).cloned())
                .or_else(|| {
                    self.routed
                        .as_ref()
                        .and_then(|r| r.targets.first().cloned())
                });
            let served = Served {
                address: served.as_deref(),
                endpoint: endpoint.as_deref(),
            };
            for plugin in plugins {
                for (k, v) in plugin.response_headers(&served) {
                    set.push(envoy::set_header(&k, &v));
                }
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
            self.response.headers_ended = true;
            self.complete_response();
        }
        vec![envoy::response_headers_response(set).into()]
    }

    fn on_response_body(&mut self, b: HttpBody, chunk: Bytes) -> Vec<Answer> {
        let eos = b.end_of_stream || b.end_of_stream_without_message;
        self.response.bytes += chunk.len();
        self.response.body_messages += 1;
        if self.response.streaming {
            let budget = &self.ctx.options.held_response_bytes;
            self.response.sse.feed_charged(&chunk, budget);
            if self.response.first_chunk_at.is_none() && self.response.sse.data_events() > 0 {
                self.response.first_chunk_at = Some(Instant::now());
                // An error answer's first event ends the prefill but is no time to first
                // token: it must not teach the cost model that the endpoint is fast.
                let succeeded = self
                    .response
                    .status
                    .as_deref()
                    .is_none_or(|s| s.starts_with('2'));
                if let Some(routed) = self.routed.as_mut() {
                    routed.first_token(succeeded);
                }
            }
            let Some(out) = self.rewrite_back(chunk, eos) else {
                return Vec::new();
            };
            if eos {
                self.complete_response();
            }
            return vec![envoy::body_chunk(Direction::Response, out, eos).into()];
        }
        if self.response.complete {
            // More body after its end (no Envoy sends it): passed on, neither kept nor charged.
            return vec![envoy::body_chunk(Direction::Response, chunk, eos).into()];
        }
        // A whole (JSON) answer is passed on as it comes too, its model rewritten back chunk by
        // chunk as a streamed one is (the same bytes as a rewrite of the whole). It was held to
        // the end once: the client waited for its first byte, and with the response budget
        // full (any client reading long answers slowly can fill it) the answer went out
        // unmodified, naming the served model. Its `usage` is read as it passes.
        self.scan_response(&chunk);
        let Some(out) = self.rewrite_back(chunk, eos) else {
            return Vec::new();
        };
        if eos {
            self.complete_response();
        }
        vec![envoy::body_chunk(Direction::Response, out, eos).into()]
    }

    /// A response chunk with the model name rewritten back, when it must be; `None` when all
    /// of it is held back (it may begin the name's field), to go out with the next chunk
    /// (never the last).
    fn rewrite_back(&mut self, chunk: Bytes, eos: bool) -> Option<Bytes> {
        let Some(rewrite) = self.response.rewrite_back.as_mut() else {
            return Some(chunk);
        };
        let out = rewrite.rewrite_chunk(chunk, &self.ctx.options.held_response_bytes, eos);
        (!out.is_empty() || rewrite.held() == 0).then_some(out)
    }

    /// Reads a passed-through chunk for the answer's `usage` ([`JsonUsageScanner`]); the
    /// first time what it keeps would pass [`ServiceOptions::held_response_bytes`], this
    /// answer's usage is unknown, and that is counted and logged.
    fn scan_response(&mut self, chunk: &[u8]) {
        let budget = &self.ctx.options.held_response_bytes;
        if self.response.usage_scanner.push(chunk, budget).is_ok() {
            return;
        }
        let rewrite = self.response.rewrite_back.is_some();
        self.ctx.recorder.on_response_overflow(rewrite);
        let all_streams_limit = budget.limit();
        match OVERFLOW_LOG.allow() {
            Some(not_logged) => tracing::warn!(
                all_streams_limit,
                rewrite,
                not_logged,
                "non-streamed responses over what all streams may hold: this one passed \
                 through as it comes, usage unknown"
            ),
            None => tracing::debug!(
                all_streams_limit,
                rewrite,
                "non-streamed responses over what all streams may hold: passed through, usage \
                 unknown"
            ),
        }
    }

    fn complete_response(&mut self) {
        if self.response.complete {
            return;
        }
        self.response.complete = true;
        let whole_answer_usage = self.response.usage_scanner.take_usage();
        self.response.usage = self.response.sse.usage().or(whole_answer_usage);
        // Neither a body message nor an end of stream on the headers: the lean path, where
        // Envoy streamed the body past the EPP, so its size is not known here.
        let bytes_known = self.response.body_messages > 0 || self.response.headers_ended;
        let Some(fairness_id) = &self.fairness_id else {
            return;
        };
        if let Some(flow) = self.ctx.director.flow_control() {
            // The least-attained-service policy learns what each flow consumed: its prompt was
            // charged from its estimate when it went (`on_admission`) and is corrected here by
            // the engine's usage; its answer is charged here, from usage or, when the client did
            // not ask for usage, the SSE events seen (about one a token). Charging only what
            // usage reported let a flow that never asks for it stay at zero, served first for
            // ever.
            let completion = match self.response.usage {
                Some(u) => {
                    flow.correct_prompt(fairness_id, self.prompt_charged, u.prompt_tokens);
                    u.completion_tokens
                }
                None if self.response.streaming => self.response.sse.data_events(),
                // A whole answer without usage (none in it, or the budget full): its
                // bytes, 4 a token.
                None if self.response.body_messages > 0 => {
                    endpoint_picker::cost::estimate_tokens(self.response.bytes)
                }
                None => 0,
            };
            flow.record_usage(fairness_id, 0, completion);
        }
        let elapsed = self.started.elapsed();
        // Only a successful answer's first chunk is a time to first token; a whole answer's
        // first token is known with the answer, so its time is the answer's (the reference's
        // non-streaming TTFT).
        let succeeded = self
            .response
            .status
            .as_deref()
            .is_none_or(|s| s.starts_with('2'));
        let first_chunk_at = self.response.first_chunk_at.filter(|_| succeeded);
        let whole_answer = !self.response.streaming && succeeded && self.response.body_messages > 0;
        self.ctx.recorder.on_complete(&Completion {
            key: &self.key,
            elapsed,
            response_bytes: bytes_known.then_some(self.response.bytes),
            usage: self.response.usage,
            time_to_first_chunk: first_chunk_at
                .map(|first| first.saturating_duration_since(self.started))
                .or(whole_answer.then_some(elapsed)),
            after_first_chunk: first_chunk_at.map(|first| first.elapsed()),
            streaming: self.response.streaming,
            status: self.response.status.as_deref(),
        });
        tracing::debug!(
            usage = ?self.response.usage,
            elapsed_ms = elapsed.as_millis() as u64,
            "response complete"
        );
        self.release();
    }

    /// Releases per-request state: the in-flight slot, and tells the recorder (once).
    fn release(&mut self) {
        self.watch = None;
        if let Some(routed) = self.routed.take() {
            drop(routed);
            self.ctx.recorder.on_released(&self.key);
        }
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
        // Envoy resets the ext_proc stream when the HTTP exchange ends and tonic then drops
        // the stream's state without another message: on the lean path, the response's end.
        self.on_stream_end();
        self.release();
    }
}

/// Visible ASCII (no spaces, no control characters), 1 to `max` bytes: safe to log, to
/// forward, and to key a bounded map with.
fn is_printable_token(v: &str, max: usize) -> bool {
    !v.is_empty() && v.len() <= max && v.bytes().all(|b| b.is_ascii_graphic())
}

/// A Kubernetes object name (DNS subdomain: lower-case alphanumerics, `-` and `.`).
fn is_object_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_OBJECTIVE_BYTES
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests;
