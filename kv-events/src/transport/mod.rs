//! vLLM's KV-event transport over ZeroMQ (feature `zmq`).
//!
//! - A message is three frames: `[topic, seq, payload]`, `seq` a per-publisher counter from 0
//!   as 8 bytes big-endian, `payload` a msgpack [`EventBatch`](crate::EventBatch).
//! - The publisher keeps its last `buffer_steps` payloads; a ROUTER socket serves replays: a
//!   request `[identity, "", start_seq]` is answered `[identity, "", seq, payload]` for each kept
//!   `seq >= start_seq`, then `[identity, "", -1, ""]` (eight 0xFF bytes, empty payload).
//!
//! [`Publisher`] is what the simulator runs (what vLLM's `ZmqEventPublisher` does);
//! [`Subscriber`] is what the EPP runs per engine (pod mode) or once (central mode).
//!
//! The ZMQ implementation is `zeromq` (zmq.rs), pure Rust on tokio: nothing to build or ship
//! beside the binary, async sockets that a supervised task can own. It interoperates with
//! libzmq (vLLM's pyzmq) over ZMTP 3. It has no message-size limit, so its sockets never face
//! the network: TCP goes through a [`guard`] that bounds frames (see the crate README).

mod frames;
pub mod guard;
mod publisher;
mod subscriber;

pub use frames::{FramePub, FrameSub};
pub use guard::{Peers, UnfinishedBudget};
pub use publisher::{Publisher, PublisherConfig, PublisherHandle, PublisherStats};
pub use subscriber::{
    DEFAULT_QUEUE_BYTES, MAX_REPLAY_BATCHES, MAX_TOPICS, QueueBudget, QueueCharge,
    REPLAY_PROGRESS_LIMIT, ReceivedBatch, SubscribeMode, Subscriber, SubscriberConfig,
    SubscriberStats, SubscriberStatsSnapshot,
};

use std::time::Duration;

/// The replay stream's end marker: sequence number -1, as eight 0xFF bytes.
pub const END_OF_REPLAY: [u8; 8] = [0xFF; 8];

/// Why a transport task failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket could not bind, connect, send or receive.
    #[error("zmq {what} {endpoint}: {source}")]
    Zmq {
        /// What was being done (`bind`, `connect`, ...).
        what: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The socket's error.
        #[source]
        source: zeromq::ZmqError,
    },
    /// The frame guard in front of a subscriber's socket could not listen or connect.
    #[error("zmq guard for {endpoint}: {source}")]
    Guard {
        /// The endpoint guarded.
        endpoint: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value that cannot work.
    #[error("invalid transport configuration: {0}")]
    Config(String),
}

fn zmq_error(
    what: &'static str,
    endpoint: &str,
) -> impl FnOnce(zeromq::ZmqError) -> TransportError {
    let endpoint = endpoint.to_owned();
    move |source| TransportError::Zmq {
        what,
        endpoint,
        source,
    }
}

/// The endpoint zmq.rs can bind: libzmq's wildcard host `*` (vLLM's default `tcp://*:5557`)
/// is `0.0.0.0` there.
fn bindable(endpoint: &str) -> String {
    match crate::TcpEndpoint::parse(endpoint) {
        Ok(crate::TcpEndpoint {
            host: crate::TcpHost::Any,
            port,
        }) => format!("tcp://0.0.0.0:{port}"),
        _ => endpoint.to_owned(),
    }
}

/// A sequence number frame.
fn seq_frame(seq: u64) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&seq.to_be_bytes())
}

/// A sequence number from its frame (exactly 8 bytes, big-endian).
fn parse_seq(frame: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(frame).ok().map(u64::from_be_bytes)
}

/// Exponential backoff between reconnection attempts: `initial`, doubling up to `max`.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests;
