//! Response observers: the answer's chunks told to the EPP without Envoy waiting for it.
//!
//! On the lean response path (README "Response path") the routing filter hears nothing of the
//! answer's body, so the token, TTFT/TPOT and response-size metrics, and the cost model's end of
//! prefill, are lost. A second ext_proc filter in Envoy's `observability_mode`, after the
//! routing filter, sends the EPP the response headers and every body chunk and never waits for
//! an answer: no gRPC round trip per chunk on the response's critical path, and the EPP sends
//! nothing back. That filter's stream is a different ext_proc stream from the routing one, so
//! the two must be matched, and not by anything a client can send:
//! - with `--response-observer`, the routing answer writes the request's observer tag into
//!   Envoy's dynamic metadata under [`OBSERVER_NAMESPACE`] ([`ObserverTag`]: a random id, this
//!   EPP's instance, the model names, when the request began), and keeps the routed request
//!   here ([`Observers`]) while the routing stream holds it;
//! - the observer filter forwards that namespace (`metadata_options.forwarding_namespaces`), so
//!   its messages carry the tag; the first that does claims the request (once), and the
//!   observer also ends the request's prefill for the cost model;
//! - Envoy balances the observer's stream apart from the routing one, so with several EPPs it
//!   may reach another replica, and on a short answer the routing stream may have released the
//!   request first. The tag alone then suffices to record the answer's metrics (no prefill to
//!   end any more, and flow control's usage only on the EPP that routed it);
//! - the observer stream records what it saw when the response ends ([`crate::recorder::Recorder::on_observed`])
//!   and closes; one whose response begins without a tag (a local reply, a request the EPP
//!   refused or never routed, a filter pair that does not forward the namespace) is counted and
//!   closed at once, and Envoy then stops sending it the answer.
//!
//! The routing stream still releases the request at the response's end and records its
//! duration and status, as on the lean path. A model name rewritten for the model server is
//! not rewritten back on this path: an observer cannot change the answer. A routing filter
//! that streams the response body itself (the full path) gets no tag: it records the answer.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use endpoint_picker::director::FirstToken;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::codec::Inbound;
use crate::envoy::ext_proc::processing_request::Request;
use crate::envoy::{self, Metadata};
use crate::json_usage::JsonUsageScanner;
use crate::openai::{self, SseUsageScanner, Usage};
use crate::recorder::{Observation, ObserverOutcome, RecordKey};
use crate::stream::{MAX_FAIRNESS_ID_BYTES, ServiceContext};

/// The dynamic-metadata namespace the routing answer writes a request's observer id into, and
/// the observer filter forwards.
pub const OBSERVER_NAMESPACE: &str = "switchyard.observer";
/// The key of the id (16 lowercase hex digits) in [`OBSERVER_NAMESPACE`].
pub const OBSERVER_ID_KEY: &str = "request";
/// The key of the routing EPP's instance (16 lowercase hex digits).
pub const OBSERVER_INSTANCE_KEY: &str = "epp";
/// The keys of the model asked for and the model served.
pub const OBSERVER_MODEL_KEY: &str = "model";
/// See [`OBSERVER_MODEL_KEY`].
pub const OBSERVER_TARGET_MODEL_KEY: &str = "target_model";
/// The key of the request's fairness id.
pub const OBSERVER_FAIRNESS_KEY: &str = "fairness_id";
/// The key of when the request began: microseconds since the Unix epoch, decimal.
pub const OBSERVER_STARTED_KEY: &str = "started_us";
/// The key of the request's priority (decimal). Optional on read, as [`OBSERVER_STREAM_KEY`]
/// is: an EPP of an earlier release, beside this one in a rolling update, writes neither.
pub const OBSERVER_PRIORITY_KEY: &str = "priority";
/// The key of whether the request asked for a streamed answer (`true` or `false`).
pub const OBSERVER_STREAM_KEY: &str = "stream";
/// Default of the most requests waiting for their observer at once: each in-flight request is
/// one, so this is far above any EPP's in-flight count; past it a request is routed unobserved.
pub const DEFAULT_MAX_WATCHED: usize = 262_144;

/// The routed requests an observer stream may claim, by id. Shared by every stream.
#[derive(Debug)]
pub struct Observers {
    watched: Mutex<HashMap<u64, Arc<Watched>>>,
    max: usize,
    /// Keys the ids: a request's id is this hash of a counter, which a client cannot predict.
    ids: std::collections::hash_map::RandomState,
    next: AtomicU64,
    /// This process among the EPPs an observer stream may reach.
    instance: u64,
}

/// What the routing answer writes for a request's observer (under [`OBSERVER_NAMESPACE`]), and
/// what an observer reads back: enough to record the answer on any EPP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserverTag {
    /// The request's id in the routing EPP's [`Observers`].
    pub id: u64,
    /// The routing EPP's instance.
    pub instance: u64,
    /// The model asked for (a valid model name, or empty for a request without a body).
    pub model: String,
    /// The model served.
    pub target_model: String,
    /// The request's fairness id.
    pub fairness_id: String,
    /// When the request began, microseconds since the Unix epoch.
    pub started_us: u64,
    /// The request's priority (its objective's): the label its answer is filed under on any
    /// EPP, as its routing and duration are on the routing one. `None` from an older EPP.
    pub priority: Option<i32>,
    /// The request asked for a streamed answer: how an answer whose content type does not say
    /// is read (SSE or whole), on any EPP.
    pub streaming: bool,
}

impl ObserverTag {
    /// The tag in a message's metadata: `None` when the namespace is absent, `Some(Err(()))`
    /// when it is there but unusable (not written by an EPP).
    fn from_metadata(metadata: Option<&Metadata>) -> Option<Result<ObserverTag, ()>> {
        let namespace = metadata?.filter_metadata.get(OBSERVER_NAMESPACE)?;
        let field = |key: &str| match namespace.fields.get(key)?.kind.as_ref()? {
            envoy_types::pb::google::protobuf::value::Kind::StringValue(s) => Some(s.as_str()),
            _ => None,
        };
        let hex = |key: &str| {
            field(key)
                .filter(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u64::from_str_radix(h, 16).ok())
        };
        // A request routed on its headers alone (`GET /v1/models`) has no model: its tag names
        // none, which is not a forged tag (review 15: those were counted `invalid`).
        let name = |key: &str| {
            field(key)
                .filter(|m| m.is_empty() || openai::validate_model_name(m).is_ok())
                .map(str::to_owned)
        };
        let tag = (|| {
            Some(ObserverTag {
                id: hex(OBSERVER_ID_KEY)?,
                instance: hex(OBSERVER_INSTANCE_KEY)?,
                model: name(OBSERVER_MODEL_KEY)?,
                target_model: name(OBSERVER_TARGET_MODEL_KEY)?,
                fairness_id: field(OBSERVER_FAIRNESS_KEY)
                    .filter(|f| {
                        f.len() <= MAX_FAIRNESS_ID_BYTES && f.bytes().all(|b| b.is_ascii_graphic())
                    })?
                    .to_owned(),
                started_us: field(OBSERVER_STARTED_KEY)
                    .filter(|d| {
                        !d.is_empty() && d.len() <= 20 && d.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|d| d.parse().ok())?,
                priority: match field(OBSERVER_PRIORITY_KEY) {
                    None => None,
                    Some(p) if p.len() <= 11 => Some(p.parse().ok()?),
                    Some(_) => return None,
                },
                streaming: match field(OBSERVER_STREAM_KEY) {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(_) => return None,
                },
            })
        })();
        Some(tag.ok_or(()))
    }
}

/// Microseconds since the Unix epoch at `instant` (a past instant of the tokio clock).
pub(crate) fn unix_micros_at(instant: Instant) -> u64 {
    SystemTime::now()
        .checked_sub(instant.elapsed())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The tokio instant of `unix_us` (microseconds since the Unix epoch, on this host's clock; a
/// time in the future is now).
fn instant_of_unix_micros(unix_us: u64) -> Instant {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let ago = Duration::from_micros(now_us.saturating_sub(unix_us));
    let now = Instant::now();
    now.checked_sub(ago).unwrap_or(now)
}

/// What an observer needs of a routed request.
#[derive(Debug)]
pub(crate) struct Watched {
    pub(crate) key: RecordKey,
    /// When the routing stream's request headers came (the routing stream's clock).
    pub(crate) started: Instant,
    pub(crate) fairness_id: String,
    pub(crate) streaming: bool,
    pub(crate) first_token: Option<FirstToken>,
}

/// A routed request kept for its observer until dropped (the routing stream's release).
#[derive(Debug)]
pub(crate) struct Watch {
    observers: Arc<Observers>,
    id: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.observers.watched.lock().remove(&self.id);
    }
}

impl Observers {
    /// At most `max` requests waiting for their observer at once.
    pub fn new(max: usize) -> Self {
        Self {
            watched: Mutex::new(HashMap::new()),
            max,
            ids: std::collections::hash_map::RandomState::new(),
            next: AtomicU64::new(0),
            instance: std::collections::hash_map::RandomState::new().hash_one(std::process::id()),
        }
    }

    /// This EPP's instance, written into every tag.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Requests waiting for their observer.
    pub fn len(&self) -> usize {
        self.watched.lock().len()
    }

    /// True when no request waits for its observer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.ids.hash_one(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Keeps `watched` under `id` until the returned [`Watch`] is dropped; `None` when the
    /// table is full (or, once in 2⁶⁴, the id is taken): the request then goes unobserved.
    pub(crate) fn watch(self: &Arc<Self>, id: u64, watched: Watched) -> Option<Watch> {
        let mut map = self.watched.lock();
        if map.len() >= self.max || map.contains_key(&id) {
            return None;
        }
        map.insert(id, Arc::new(watched));
        Some(Watch {
            observers: self.clone(),
            id,
        })
    }

    /// The request under `id`, taken: a second claim of the same id finds nothing.
    fn claim(&self, id: u64) -> Option<Arc<Watched>> {
        self.watched.lock().remove(&id)
    }
}

/// What an observer stream does after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObserverStep {
    /// Wait for the next message.
    Continue,
    /// Close the stream: the response ended, or the stream matched no request.
    Close,
}

/// The request an observer stream reports on.
#[derive(Debug)]
struct Bound {
    key: RecordKey,
    /// The request asked for a streamed answer (what decides when the answer's content type
    /// does not).
    streaming: bool,
    started: Instant,
    /// The flow flow control charges the answer to, on whichever EPP hears it.
    fairness_id: String,
    first_token: Option<FirstToken>,
}

/// One observer stream's state. Pure with respect to I/O, like [`crate::stream::StreamState`];
/// it never answers.
#[derive(Debug)]
pub struct ObserverState {
    ctx: Arc<ServiceContext>,
    watched: Option<Bound>,
    streaming: bool,
    /// The answer's `:status` is 2xx (or unknown): only those calibrate the cost model's TTFT.
    succeeded: bool,
    body_messages: usize,
    bytes: usize,
    sse: SseUsageScanner,
    /// Reads a non-streamed body's `usage` as it passes, as the routing stream does.
    usage_scanner: JsonUsageScanner,
    first_chunk_at: Option<Instant>,
    done: bool,
}

impl ObserverState {
    /// A fresh observer stream.
    pub fn new(ctx: Arc<ServiceContext>) -> Self {
        Self {
            ctx,
            watched: None,
            streaming: false,
            succeeded: true,
            body_messages: 0,
            bytes: 0,
            sse: SseUsageScanner::default(),
            usage_scanner: JsonUsageScanner::default(),
            first_chunk_at: None,
            done: false,
        }
    }

    /// Handles one message.
    pub fn on_inbound(&mut self, inbound: Inbound) -> ObserverStep {
        if self.done {
            return ObserverStep::Close;
        }
        let Inbound { message, body } = inbound;
        if self.watched.is_none() {
            let is_request_side = matches!(
                message.request,
                Some(
                    Request::RequestHeaders(_)
                        | Request::RequestBody(_)
                        | Request::RequestTrailers(_)
                )
            );
            match self.bind(message.metadata_context.as_ref()) {
                Ok((bound, outcome)) => {
                    self.streaming = bound.streaming;
                    self.watched = Some(bound);
                    self.ctx.recorder.on_observer_stream(outcome);
                }
                // The request side may come before the routing answer wrote the tag.
                Err(_) if is_request_side => return ObserverStep::Continue,
                Err(outcome) => {
                    self.done = true;
                    self.ctx.recorder.on_observer_stream(outcome);
                    return ObserverStep::Close;
                }
            }
        }
        match message.request {
            Some(Request::ResponseHeaders(h)) => {
                let (status, body) = envoy::response_head(&h);
                self.streaming = body.streamed(self.streaming);
                self.succeeded = status.is_none_or(|s| s.starts_with('2'));
                if !self.streaming {
                    // A whole answer is ready before its headers: the prompt is done.
                    self.first_token(false);
                }
                if h.end_of_stream {
                    self.complete();
                }
            }
            Some(Request::ResponseBody(b)) => {
                self.on_body(body, b.end_of_stream || b.end_of_stream_without_message)
            }
            Some(Request::ResponseTrailers(_)) => self.complete(),
            _ => {}
        }
        if self.done {
            ObserverStep::Close
        } else {
            ObserverStep::Continue
        }
    }

    /// The request this stream's tag names: claimed from this EPP's table while the routing
    /// stream holds it, else recorded from the tag alone.
    fn bind(
        &self,
        metadata: Option<&Metadata>,
    ) -> Result<(Bound, ObserverOutcome), ObserverOutcome> {
        let tag = match ObserverTag::from_metadata(metadata) {
            None => return Err(ObserverOutcome::NoTag),
            Some(Err(())) => return Err(ObserverOutcome::Invalid),
            Some(Ok(tag)) => tag,
        };
        let observers = self.ctx.options.observers.as_ref();
        if let Some(watched) = observers.and_then(|o| o.claim(tag.id)) {
            let bound = Bound {
                key: watched.key.clone(),
                streaming: watched.streaming,
                started: watched.started,
                fairness_id: watched.fairness_id.clone(),
                first_token: watched.first_token.clone(),
            };
            return Ok((bound, ObserverOutcome::Matched));
        }
        let here = observers.is_some_and(|o| o.instance() == tag.instance);
        let bound = Bound {
            key: self.ctx.recorder.observed_key(
                &tag.model,
                &tag.target_model,
                &tag.fairness_id,
                tag.priority,
            ),
            streaming: tag.streaming,
            started: instant_of_unix_micros(tag.started_us),
            // Charged here too when another EPP routed it: Envoy spreads a flow's routing
            // streams and its observer streams over the EPPs alike, so each EPP's fairness
            // state, charged the answers it hears, holds about its share of every answer. Left
            // to the routing EPP alone, an answer reached it one time in N (two EPPs: half of
            // them), and a flow's output went mostly uncharged.
            fairness_id: tag.fairness_id,
            first_token: None,
        };
        let outcome = if here {
            ObserverOutcome::Released
        } else {
            ObserverOutcome::OtherEpp
        };
        Ok((bound, outcome))
    }

    fn on_body(&mut self, chunk: Bytes, eos: bool) {
        self.bytes += chunk.len();
        self.body_messages += 1;
        if self.streaming {
            self.sse
                .feed_charged(&chunk, &self.ctx.options.held_response_bytes);
            // The first `data:` event, not the first byte (an SSE comment kept the connection
            // open before any token existed), as on the routing stream.
            if self.first_chunk_at.is_none() && self.sse.data_events() > 0 {
                self.first_chunk_at = Some(Instant::now());
                // An error answer's first event ends the prefill but says nothing of TTFT.
                self.first_token(self.succeeded);
            }
        } else if self
            .usage_scanner
            .push(&chunk, &self.ctx.options.held_response_bytes)
            .is_err()
        {
            self.ctx.recorder.on_response_overflow(false);
        }
        if eos {
            self.complete();
        }
    }

    fn first_token(&self, observed_ttft: bool) {
        if let Some(first) = self.watched.as_ref().and_then(|w| w.first_token.as_ref()) {
            first.seen(observed_ttft);
        }
    }

    /// The observed stream ended before its answer did (a reset, a client gone): the flow is
    /// charged the events it got, once; nothing else is recorded for an unfinished answer.
    fn cut_short(&mut self) {
        if self.done || !self.streaming {
            return;
        }
        self.done = true;
        if let (Some(flow), Some(fairness_id)) = (
            self.ctx.director.flow_control(),
            self.watched.as_ref().map(|w| w.fairness_id.as_str()),
        ) {
            flow.record_usage(fairness_id, 0, self.sse.data_events());
        }
    }

    fn complete(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let whole_answer_usage = self.usage_scanner.take_usage();
        let Some(watched) = self.watched.as_ref() else {
            return;
        };
        let usage: Option<Usage> = self.sse.usage().or(whole_answer_usage);
        if let Some(flow) = self.ctx.director.flow_control() {
            // The answer's share of the flow's attained service (the routing stream charged
            // the prompt when flow control let the request go): usage, else the SSE events.
            let completion = match usage {
                Some(u) => u.completion_tokens,
                None if self.streaming => self.sse.data_events(),
                // A whole answer without usage: its bytes, 4 a token, as the routing stream
                // charges it. Zero let a client that hid the usage go uncharged.
                None => endpoint_picker::cost::estimate_tokens(self.bytes),
            };
            flow.record_usage(&watched.fairness_id, 0, completion);
        }
        self.ctx.recorder.on_observed(&Observation {
            key: &watched.key,
            elapsed: watched.started.elapsed(),
            // A headers-only answer's size is the routing stream's to record (it sees that end).
            response_bytes: (self.body_messages > 0).then_some(self.bytes),
            usage,
            // Only a successful answer's first chunk is a time to first token; a whole
            // answer's is the answer's time.
            time_to_first_chunk: self
                .first_chunk_at
                .filter(|_| self.succeeded)
                .map(|first| first.saturating_duration_since(watched.started))
                .or(
                    (!self.streaming && self.succeeded && self.body_messages > 0)
                        .then(|| watched.started.elapsed()),
                ),
            after_first_chunk: self
                .first_chunk_at
                .filter(|_| self.succeeded)
                .map(|first| first.elapsed()),
            streaming: self.streaming,
        });
    }
}

impl Drop for ObserverState {
    fn drop(&mut self) {
        self.cut_short();
    }
}
