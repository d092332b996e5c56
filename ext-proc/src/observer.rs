//! Response observers: the answer's chunks told to the EPP without Envoy waiting for it.
//!
//! On the lean response path (README "Response path") the routing filter hears nothing of the
//! answer's body, so the token, TTFT/TPOT and response-size metrics, and the cost model's end of
//! prefill, are lost. A second ext_proc filter in Envoy's `observability_mode`, after the
//! routing filter, sends the EPP the response headers and every body chunk and never waits for
//! an answer: no gRPC round trip per chunk on the response's critical path, and the EPP sends
//! nothing back. That filter's stream is a different ext_proc stream from the routing one, so
//! the two must be matched, and not by anything a client can send:
//! - with `--response-observer`, each routed request gets a random id, written into Envoy's
//!   dynamic metadata under [`OBSERVER_NAMESPACE`] with the routing answer, and kept here
//!   ([`Observers`]) while the routing stream holds the request;
//! - the observer filter forwards that namespace (`metadata_options.forwarding_namespaces`), so
//!   its messages carry the id; the first that does claims the request (once);
//! - the observer stream records what it saw when the response ends ([`Recorder::on_observed`])
//!   and closes; one that carries no known id by the response's first message is counted as
//!   unmatched and closed at once (Envoy then stops sending it the answer).
//!
//! The routing stream still releases the request at the response's end and records its
//! duration and status, as on the lean path. A model name rewritten for the model server is
//! not rewritten back on this path: an observer cannot change the answer.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use endpoint_picker::director::FirstToken;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::body_budget::BodyCharge;
use crate::codec::Inbound;
use crate::envoy::ext_proc::processing_request::Request;
use crate::envoy::{self, Metadata};
use crate::openai::{self, SseUsageScanner, Usage};
use crate::recorder::{Observation, ObserverOutcome, RecordKey};
use crate::stream::{MAX_RESPONSE_COPY, ServiceContext};

/// The dynamic-metadata namespace the routing answer writes a request's observer id into, and
/// the observer filter forwards.
pub const OBSERVER_NAMESPACE: &str = "switchyard.observer";
/// The key of the id (16 lowercase hex digits) in [`OBSERVER_NAMESPACE`].
pub const OBSERVER_ID_KEY: &str = "request";
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
        }
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

/// The id in a message's metadata, if it carries one.
fn observer_id(metadata: Option<&Metadata>) -> Option<u64> {
    let hex = envoy::metadata_string(metadata, OBSERVER_NAMESPACE, OBSERVER_ID_KEY)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(&hex, 16).ok()
}

/// What an observer stream does after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObserverStep {
    /// Wait for the next message.
    Continue,
    /// Close the stream: the response ended, or the stream matched no request.
    Close,
}

/// One observer stream's state. Pure with respect to I/O, like [`crate::stream::StreamState`];
/// it never answers.
#[derive(Debug)]
pub struct ObserverState {
    ctx: Arc<ServiceContext>,
    watched: Option<Arc<Watched>>,
    streaming: bool,
    headers_ended: bool,
    body_messages: usize,
    bytes: usize,
    sse: SseUsageScanner,
    /// A non-streamed body, kept (bounded as the routing stream's copy is) to read `usage`.
    copy: BytesMut,
    charge: BodyCharge,
    overflowed: bool,
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
            headers_ended: false,
            body_messages: 0,
            bytes: 0,
            sse: SseUsageScanner::default(),
            copy: BytesMut::new(),
            charge: BodyCharge::default(),
            overflowed: false,
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
            let claimed = observer_id(message.metadata_context.as_ref()).and_then(|id| {
                self.ctx
                    .options
                    .observers
                    .as_ref()
                    .and_then(|observers| observers.claim(id))
            });
            match claimed {
                Some(watched) => {
                    self.streaming = watched.streaming;
                    self.watched = Some(watched);
                    self.ctx
                        .recorder
                        .on_observer_stream(ObserverOutcome::Matched);
                }
                // The request side may come before the routing answer wrote the id.
                None if matches!(
                    message.request,
                    Some(
                        Request::RequestHeaders(_)
                            | Request::RequestBody(_)
                            | Request::RequestTrailers(_)
                    )
                ) =>
                {
                    return ObserverStep::Continue;
                }
                None => {
                    self.done = true;
                    self.ctx
                        .recorder
                        .on_observer_stream(ObserverOutcome::Unmatched);
                    return ObserverStep::Close;
                }
            }
        }
        match message.request {
            Some(Request::ResponseHeaders(h)) => {
                let headers = envoy::headers(h.headers.as_ref());
                let get = |name: &str| {
                    headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                if get("content-type").is_some_and(|ct| ct.contains("text/event-stream")) {
                    self.streaming = true;
                }
                if !self.streaming {
                    // A whole answer is ready before its headers: the prompt is done.
                    self.first_token(false);
                }
                if h.end_of_stream {
                    self.headers_ended = true;
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

    fn on_body(&mut self, chunk: Bytes, eos: bool) {
        self.bytes += chunk.len();
        self.body_messages += 1;
        if self.streaming {
            if self.first_chunk_at.is_none() && !chunk.is_empty() {
                self.first_chunk_at = Some(Instant::now());
                self.first_token(true);
            }
            self.sse.feed(&chunk);
        } else if !self.overflowed {
            let budget = &self.ctx.options.held_response_bytes;
            if self.copy.len() + chunk.len() > MAX_RESPONSE_COPY
                || self.charge.grow(budget, chunk.len()).is_err()
            {
                self.overflowed = true;
                self.copy = BytesMut::new();
                self.charge.release();
                self.ctx.recorder.on_response_overflow(false);
            } else {
                self.copy.extend_from_slice(&chunk);
            }
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

    fn complete(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let copy = std::mem::take(&mut self.copy);
        self.charge.release();
        let Some(watched) = self.watched.as_ref() else {
            return;
        };
        let usage: Option<Usage> = self.sse.usage().or_else(|| openai::usage_from_json(&copy));
        if let (Some(flow), Some(usage)) = (self.ctx.director.flow_control(), usage) {
            flow.record_usage(
                &watched.fairness_id,
                usage.prompt_tokens,
                usage.completion_tokens,
            );
        }
        self.ctx.recorder.on_observed(&Observation {
            key: &watched.key,
            elapsed: watched.started.elapsed(),
            response_bytes: (self.body_messages > 0 || self.headers_ended).then_some(self.bytes),
            usage,
            time_to_first_chunk: self
                .first_chunk_at
                .map(|first| first.saturating_duration_since(watched.started)),
            after_first_chunk: self.first_chunk_at.map(|first| first.elapsed()),
        });
    }
}
