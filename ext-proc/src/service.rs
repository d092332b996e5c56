//! The `ExternalProcessor` gRPC service: reads a stream's messages, hands each to the stream's
//! [`StreamState`] inside the request's span, and sends the answers back in order.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Status, Streaming};

use crate::codec::{Inbound, Processor};
use crate::envoy::Answer;
use crate::envoy::ext_proc::processing_request;
use crate::observer::{ObserverState, ObserverStep};
use crate::recorder::StreamOutcome;
use crate::stream::{ServiceContext, StreamState};

/// Most messages held while a request waits in flow control (Envoy sends at most the request
/// trailers then; a client of the port that sends more is cut off).
const MAX_HELD_MESSAGES: usize = 8;
/// Most bytes of messages held while a request waits in flow control: the request trailers fit
/// many times over (Envoy's header limit is 60 KiB by default); a client of the port that sends
/// bodies then is cut off instead of held, since nothing else counts those bytes.
const MAX_HELD_BYTES: usize = 1024 * 1024;

/// What ended a wait in flow control.
enum Woken {
    Decided(Result<endpoint_picker::flow::Admitted, endpoint_picker::flow::FlowRejection>),
    // Boxed: a message is large, a decision is not.
    Message(Box<Result<Option<Inbound>, Status>>),
}

/// The ext_proc service: what one `Process` stream does. Served by [`crate::codec::ExtProcServer`].
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

/// The answers of one `Process` stream.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<Answer, Status>> + Send>>;

impl Processor for ExtProcService {
    fn process(&self, mut inbound: Streaming<Inbound>) -> ResponseStream {
        let ctx = self.ctx.clone();
        let output = async_stream::stream! {
            let mut state = StreamState::new(ctx.clone());
            // Reports the stream's end when dropped; a stream dropped by tonic (Envoy reset it)
            // is `cancelled` unless its exchange had completed.
            let mut open = OpenStream::new(ctx.clone());
            // Every log line of this request carries its id: the span is entered around each
            // message's (synchronous) handling only, never across an `.await`. It is created
            // with the first message, so that it can adopt an incoming trace context first.
            let mut span: Option<tracing::Span> = None;
            // Messages that came while the request waited in flow control, answered after it.
            let mut held: VecDeque<Inbound> = VecDeque::new();
            let mut held_bytes = 0usize;
            loop {
                if let Some(ticket) = state.admission() {
                    // Waiting in flow control: the decision, or the stream's end (the client
                    // went away: the state is dropped below, which leaves the queue).
                    let woken = tokio::select! {
                        decision = ticket.wait() => Woken::Decided(decision),
                        message = inbound.message() => Woken::Message(Box::new(message)),
                    };
                    match woken {
                        Woken::Decided(decision) => {
                            let span = span.get_or_insert_with(tracing::Span::none);
                            let responses = span.in_scope(|| state.on_admission(decision));
                            for response in responses {
                                yield Ok(response);
                            }
                            if state.is_done() {
                                break;
                            }
                        }
                        Woken::Message(message) => match *message {
                            Ok(Some(message)) => {
                                let size = held_size(&message);
                                if held.len() >= MAX_HELD_MESSAGES
                                    || held_bytes.saturating_add(size) > MAX_HELD_BYTES
                                {
                                    open.outcome = StreamOutcome::Error;
                                    break;
                                }
                                held_bytes += size;
                                held.push_back(message);
                            }
                            // A refused message ends the stream with its status here too.
                            Err(status) if crate::codec::refuses_the_message(&status) => {
                                open.outcome = StreamOutcome::Error;
                                yield Err(status);
                                break;
                            }
                            _ => break,
                        },
                    }
                    continue;
                }
                let next = match held.pop_front() {
                    Some(message) => {
                        held_bytes -= held_size(&message);
                        Ok(Some(message))
                    }
                    None => match state.body_deadline() {
                        None => inbound.message().await,
                        // A body being gathered has a deadline: past it the request gets 408
                        // and its stream ends, whatever the client still trickles.
                        Some(deadline) => {
                            match tokio::time::timeout_at(deadline, inbound.message()).await {
                                Ok(next) => next,
                                Err(_) => {
                                    let span = span.get_or_insert_with(tracing::Span::none);
                                    for response in span.in_scope(|| state.on_body_timeout()) {
                                        yield Ok(response);
                                    }
                                    // Answered (408), as any other immediate response.
                                    open.outcome = StreamOutcome::Ok;
                                    break;
                                }
                            }
                        }
                    },
                };
                match next {
                    Ok(Some(message)) if span.is_none() && message.message.observability_mode => {
                        // A response observer's stream (crate::observer): it only listens.
                        observe(ObserverState::new(ctx.clone()), message, &mut inbound).await;
                        open.outcome = StreamOutcome::Ok;
                        break;
                    }
                    Ok(Some(message)) => {
                        let span = span.get_or_insert_with(|| {
                            let headers = match &message.message.request {
                                Some(processing_request::Request::RequestHeaders(h)) => {
                                    h.headers.as_ref()
                                }
                                _ => None,
                            };
                            ctx.recorder.request_span(headers)
                        });
                        let mut responses = span.in_scope(|| state.on_inbound(message));
                        if let Some(tokenization) = state.pending_tokenization() {
                            // Awaited here, outside the state machine and the span: the work
                            // runs on the token producer's bounded blocking pool.
                            let ids = tokenization.run().await;
                            responses.extend(span.in_scope(|| state.on_token_ids(ids)));
                        }
                        for response in responses {
                            yield Ok(response);
                        }
                        // Envoy resets the stream once the exchange is over, so an exchange that
                        // completed counts as `ok` however the stream ends afterwards.
                        if state.exchange_complete() {
                            open.outcome = StreamOutcome::Ok;
                        }
                        if state.is_done() {
                            break;
                        }
                    }
                    Ok(None) => {
                        // The lean response path may end here, with no trailers message.
                        let span = span.get_or_insert_with(tracing::Span::none);
                        span.in_scope(|| state.on_stream_end());
                        open.outcome = StreamOutcome::Ok;
                        break;
                    }
                    Err(status) if status.code() == tonic::Code::Cancelled => {
                        // Envoy resets the stream when the HTTP exchange ends; on the lean
                        // response path that is the response's only end the EPP sees.
                        let span = span.get_or_insert_with(tracing::Span::none);
                        span.in_scope(|| state.on_stream_end());
                        break;
                    }
                    Err(status) => {
                        let span = span.get_or_insert_with(tracing::Span::none);
                        span.in_scope(|| {
                            tracing::info!(%status, "ext_proc stream error");
                            // A reset after the response began is the lean path's end too.
                            state.on_stream_end();
                        });
                        if !state.exchange_complete() {
                            open.outcome = StreamOutcome::Error;
                        }
                        if crate::codec::refuses_the_message(&status) {
                            yield Err(status);
                        }
                        break;
                    }
                }
            }
            // Released inside the span, so that the release is logged with the request id.
            match span {
                Some(span) => span.in_scope(|| drop(state)),
                None => drop(state),
            }
        };
        Box::pin(output)
    }
}

/// Feeds an observer stream's messages to `state` until it closes or Envoy ends the stream;
/// nothing is sent back (Envoy ignores answers in `observability_mode`). Returning ends the
/// gRPC stream, which tells Envoy to send no more.
async fn observe(mut state: ObserverState, first: Inbound, inbound: &mut Streaming<Inbound>) {
    let mut next = Some(first);
    while let Some(message) = next.take() {
        if state.on_inbound(message) == ObserverStep::Close {
            return;
        }
        next = inbound.message().await.ok().flatten();
    }
}

/// The bytes a held message keeps: its body and the rest of it as encoded.
fn held_size(message: &Inbound) -> usize {
    use prost::Message as _;
    message.body.len() + message.message.encoded_len()
}

/// An open stream, counted by the recorder until dropped.
struct OpenStream {
    ctx: Arc<ServiceContext>,
    outcome: StreamOutcome,
}

impl OpenStream {
    fn new(ctx: Arc<ServiceContext>) -> Self {
        ctx.recorder.stream_opened();
        Self {
            ctx,
            outcome: StreamOutcome::Cancelled,
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.ctx.recorder.stream_closed(self.outcome);
    }
}
