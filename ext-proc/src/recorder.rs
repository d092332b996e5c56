//! What the protocol code tells the rest of the process about each request.
//!
//! The stream state machine reports events (a stream opened, a request routed or rejected, a
//! response complete, a request released) and nothing else; the binary's implementation turns
//! them into metrics, decision records and trace spans. Keeping the bookkeeping behind this
//! trait keeps metric families, label policies and the OpenTelemetry SDK out of the protocol
//! code, and lets each binary (`epp`, `bbr`) record what it needs.

use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::director::{RouteError, Routed};
use endpoint_picker::request::InferenceRequest;

use crate::envoy::HeaderMap;
use crate::error::RequestError;
use crate::openai::Usage;

/// How an ext_proc stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOutcome {
    /// The exchange completed (however Envoy closed the stream afterwards).
    Ok,
    /// The stream failed before the exchange completed.
    Error,
    /// Envoy or the client dropped the stream before the exchange completed.
    Cancelled,
}

impl StreamOutcome {
    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamOutcome::Ok => "ok",
            StreamOutcome::Error => "error",
            StreamOutcome::Cancelled => "cancelled",
        }
    }
}

/// One scheduling attempt: the resolved request and what the director answered.
#[derive(Debug)]
pub struct Scheduled<'a> {
    /// The request, objective and rewrite resolved.
    pub request: &'a InferenceRequest,
    /// The director's answer.
    pub outcome: Result<&'a Routed, &'a RouteError>,
    /// Time spent in the director.
    pub took: Duration,
}

/// The names a recorder files a routed request under, chosen once when it is routed and handed
/// back with every later event about it: a gauge raised under a name is lowered under the same
/// one, whatever the recorder's naming policy has learnt in between.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordKey {
    /// The label value of the model asked for.
    pub model: Arc<str>,
    /// The label value of the model served.
    pub target_model: Arc<str>,
    /// The label value of the request's fairness id (empty when not known).
    pub fairness_id: Arc<str>,
    /// The label value of the request's priority (empty when not known).
    pub priority: Arc<str>,
}

/// A finished response. It carries no [`InferenceRequest`]: the stream lets the request go
/// once it is routed (its prompt keeps the whole body alive); what a recorder needs of it is
/// in the [`RecordKey`] it chose at [`Recorder::on_routed`].
#[derive(Debug)]
pub struct Completion<'a> {
    /// What [`Recorder::on_routed`] filed it under.
    pub key: &'a RecordKey,
    /// From the request headers to the end of the response.
    pub elapsed: Duration,
    /// Response body bytes; `None` on the lean response path, where Envoy streams the body
    /// past the EPP.
    pub response_bytes: Option<usize>,
    /// `usage` reported by the model server.
    pub usage: Option<Usage>,
    /// From the request headers to the first non-empty streamed chunk; for a successful
    /// whole (non-streamed) answer, to its end.
    pub time_to_first_chunk: Option<Duration>,
    /// From the first streamed chunk to the end of the response.
    pub after_first_chunk: Option<Duration>,
    /// The response was streamed: an SSE answer, or, without a content type that says, one
    /// asked for with `stream: true` (a JSON answer is whole whatever was asked).
    pub streaming: bool,
    /// The response's `:status`.
    pub status: Option<&'a str>,
}

/// What a response observer saw of a routed request's answer (README "Response path"): the
/// parts of a [`Completion`] the lean routing stream cannot see. Its duration and status are
/// the routing stream's to record.
#[derive(Debug)]
pub struct Observation<'a> {
    /// What [`Recorder::on_routed`] filed the request under.
    pub key: &'a RecordKey,
    /// From the request headers to the end of the response.
    pub elapsed: Duration,
    /// Response body bytes.
    pub response_bytes: Option<usize>,
    /// `usage` reported by the model server.
    pub usage: Option<Usage>,
    /// From the request headers to the first non-empty streamed chunk.
    pub time_to_first_chunk: Option<Duration>,
    /// From the first streamed chunk to the end of the response.
    pub after_first_chunk: Option<Duration>,
    /// The response was streamed: an SSE answer, or, without a content type that says, one
    /// asked for with `stream: true` (a JSON answer is whole whatever was asked).
    pub streaming: bool,
}

/// How an observer stream found the request it reports on (README "Response path").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObserverOutcome {
    /// Claimed from this EPP while the routing stream held the request: everything recorded,
    /// the prefill ended at the first chunk.
    Matched,
    /// Routed by this EPP and already released (a short answer whose routing stream ended
    /// first): recorded from the tag, no prefill left to end.
    Released,
    /// Routed by another EPP (Envoy balanced the observer's stream apart): recorded from the
    /// tag, without the prefill and flow control's usage, which are that EPP's.
    OtherEpp,
    /// The answer began without a tag: a local reply, a request the EPP refused or never
    /// routed (fail-open), an EPP without `--response-observer`, or a filter pair that does not
    /// pass the namespace. Not recorded.
    NoTag,
    /// A tag that no EPP wrote. Not recorded.
    Invalid,
}

impl ObserverOutcome {
    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ObserverOutcome::Matched => "matched",
            ObserverOutcome::Released => "released",
            ObserverOutcome::OtherEpp => "other_epp",
            ObserverOutcome::NoTag => "no_tag",
            ObserverOutcome::Invalid => "invalid",
        }
    }
}

/// The events of the request path. Every method runs on the request path: implementations
/// must not block and must bound what they keep.
pub trait Recorder: Send + Sync + std::fmt::Debug {
    /// Whether scheduling should build a score breakdown (it costs allocations).
    fn wants_explanation(&self) -> bool {
        false
    }

    /// A stream opened.
    fn stream_opened(&self) {}

    /// A stream ended.
    fn stream_closed(&self, _outcome: StreamOutcome) {}

    /// The span every log line of this stream is written in. `first_headers` are the request
    /// headers when the stream's first message carries them (trace context may be adopted).
    fn request_span(&self, _first_headers: Option<&HeaderMap>) -> tracing::Span {
        tracing::info_span!("gateway.request", request_id = tracing::field::Empty)
    }

    /// Headers that carry the request's trace context to the model server.
    fn trace_headers(&self, _span: &tracing::Span) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// The director answered (routed or refused).
    fn on_scheduled(&self, _scheduled: &Scheduled<'_>) {}

    /// A request was routed and its headers answered; `overhead` is from the end of the
    /// request body to that answer, and `rewritten` says whether the body's model changed.
    /// Returns the names later events about this request are filed under.
    fn on_routed(
        &self,
        _request: &InferenceRequest,
        _rewritten: bool,
        _overhead: Duration,
    ) -> RecordKey {
        RecordKey::default()
    }

    /// The EPP answered a request itself. `request` is `None` when it failed before parsing.
    fn on_rejected(&self, _request: Option<&InferenceRequest>, _error: &RequestError) {}

    /// The response of a routed request ended.
    fn on_complete(&self, _completion: &Completion<'_>) {}

    /// A response observer saw a routed request's answer end.
    fn on_observed(&self, _observation: &Observation<'_>) {}

    /// The names an observer files a request under when it knows the request by its tag only
    /// (routed by another EPP, or released): the same policy as [`Recorder::on_routed`]'s.
    /// `priority` is `None` from a tag an EPP of an earlier release wrote.
    fn observed_key(
        &self,
        _model: &str,
        _target_model: &str,
        _fairness_id: &str,
        _priority: Option<i32>,
    ) -> RecordKey {
        RecordKey::default()
    }

    /// An observer stream matched its request, or did not.
    fn on_observer_stream(&self, _outcome: ObserverOutcome) {}

    /// The copy of a non-streamed response body kept to read `usage` from would pass what
    /// all streams may hold together: it is dropped and the usage unknown (`rewrite`: a model
    /// rewrite back was due, done chunk by chunk all the same).
    fn on_response_overflow(&self, _rewrite: bool) {}

    /// A routed request left (its response ended or its stream was dropped). Called exactly
    /// once per [`Recorder::on_routed`], with what it returned.
    fn on_released(&self, _key: &RecordKey) {}
}

/// Records nothing (tests, tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopRecorder;

impl Recorder for NoopRecorder {}
