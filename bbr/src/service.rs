//! The `ExternalProcessor` gRPC service: reads a stream's messages, hands each to its
//! [`BbrStream`], and sends the answers back in order. Served over the EPP's codec
//! ([`ext_proc::codec::ExtProcServer`]): bodies stay `Bytes` from tonic's receive buffer to its
//! send buffer, as in the EPP.

use std::sync::Arc;

use ext_proc::codec::{Inbound, Processor};
use ext_proc::service::ResponseStream;
use tonic::Streaming;

use crate::stream::{BbrStream, Context};

/// The tonic service.
#[derive(Debug, Clone)]
pub struct BbrService {
    ctx: Arc<Context>,
}

impl BbrService {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

/// Counts a stream as open until dropped (also when tonic drops it on a reset).
struct Open(Arc<Context>);

impl Open {
    fn new(ctx: Arc<Context>) -> Self {
        ctx.metrics.streams_inflight.inc();
        Self(ctx)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.streams_inflight.dec();
    }
}

impl Processor for BbrService {
    fn process(&self, mut inbound: Streaming<Inbound>) -> ResponseStream {
        let ctx = self.ctx.clone();
        let output = async_stream::stream! {
            let _open = Open::new(ctx.clone());
            let mut state = BbrStream::new(ctx);
            loop {
                let next = match state.body_deadline() {
                    None => inbound.message().await,
                    // A body being gathered has a deadline, as at the EPP: past it, 408.
                    Some(deadline) => match tokio::time::timeout_at(deadline, inbound.message()).await {
                        Ok(next) => next,
                        Err(_) => {
                            for response in state.on_body_timeout() {
                                yield Ok(response);
                            }
                            break;
                        }
                    },
                };
                match next {
                    Ok(Some(message)) => {
                        for response in state.on_inbound(message) {
                            yield Ok(response);
                        }
                        if state.is_done() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) if status.code() == tonic::Code::Cancelled => break,
                    Err(status) => {
                        tracing::debug!(%status, "ext_proc stream error");
                        if ext_proc::codec::refuses_the_message(&status) {
                            yield Err(status);
                        }
                        break;
                    }
                }
            }
        };
        Box::pin(output)
    }
}
