//! What the engine-model tests share: requests, prompts, and draining a request's events.

// Test support: a failed step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sim::engine::{Completion, EngineEvent, FinishReason, SubmitRequest};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

/// A request for `max_tokens` tokens after `prompt`, no adapter.
pub fn req(prompt: Vec<u32>, max_tokens: usize) -> SubmitRequest {
    SubmitRequest {
        prompt,
        max_tokens,
        lora: None,
        finish_reason: FinishReason::Length,
    }
}

/// Distinct token ids `start..start+n`.
pub fn tokens(start: u32, n: usize) -> Vec<u32> {
    (start..start + n as u32).collect()
}

/// Drains a request: the logical time of every token, and its completion.
pub async fn collect(mut rx: UnboundedReceiver<EngineEvent>) -> (Vec<Instant>, Completion) {
    let mut times = Vec::new();
    loop {
        match rx.recv().await.expect("engine dropped the request") {
            EngineEvent::Tokens { ids, at, .. } => times.extend(std::iter::repeat_n(at, ids.len())),
            EngineEvent::Finished(c) => return (times, c),
        }
    }
}
