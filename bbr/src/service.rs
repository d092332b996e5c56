//! The `ExternalProcessor` gRPC service: reads a stream's messages, hands each to its
//! [`BbrStream`], and sends the answers back in order.

use std::pin::Pin;
use std::sync::Arc;

use ext_proc::envoy::ext_proc::{
    ProcessingRequest, ProcessingResponse, external_processor_server::ExternalProcessor,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

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

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

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

#[tonic::async_trait]
impl ExternalProcessor for BbrService {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let ctx = self.ctx.clone();
        let output = async_stream::stream! {
            let _open = Open::new(ctx.clone());
            let mut state = BbrStream::new(ctx);
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        for response in state.on_message(message) {
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
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(output)))
    }
}
