//! The publishing side: vLLM's `ZmqEventPublisher`, for the simulator.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::{
    PubSocket, RouterSocket, Socket as _, SocketEvent, SocketRecv as _, SocketSend as _, ZmqMessage,
};

use super::guard::{self, Guard, Limits, Report};
use super::{Backoff, END_OF_REPLAY, TransportError, bindable, parse_seq, seq_frame, zmq_error};
use crate::EventBatch;
use crate::codec::Encoder;
use crate::config::{KvEventsConfig, MAX_BUFFER_STEPS, MAX_QUEUE_SIZE, endpoint_binds};

/// What a [`Publisher`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// The PUB endpoint; binds or connects by vLLM's rule ([`endpoint_binds`]).
    pub endpoint: String,
    /// The replay ROUTER endpoint (binds), if any.
    pub replay_endpoint: Option<String>,
    /// Payloads kept for replay.
    pub buffer_steps: usize,
    /// Batches queued between the engine and the socket; more are dropped (and counted).
    pub max_queue_size: usize,
    /// The topic frame of every message.
    pub topic: String,
    /// How batches are written.
    pub encoder: Encoder,
}

impl PublisherConfig {
    /// From vLLM's `--kv-events-config`; `topic` replaces the config's when that is empty.
    pub fn from_kv_events_config(config: &KvEventsConfig, topic: String, encoder: Encoder) -> Self {
        Self {
            endpoint: config.endpoint.clone(),
            replay_endpoint: config.replay_endpoint.clone(),
            buffer_steps: config.buffer_steps,
            max_queue_size: config.max_queue_size,
            topic: if config.topic.is_empty() {
                topic
            } else {
                config.topic.clone()
            },
            encoder,
        }
    }
}

/// Counters of a publisher.
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Batches sent on the PUB socket.
    pub published: AtomicU64,
    /// Batches dropped because the queue was full (the engine never waits for the socket).
    pub dropped: AtomicU64,
    /// Batches the encoder refused (over the decoder's caps).
    pub encode_errors: AtomicU64,
    /// Replay requests served.
    pub replay_requests: AtomicU64,
    /// Batches re-sent by replays.
    pub replayed: AtomicU64,
    /// Times a connecting PUB socket lost its subscriber and dialled again.
    pub reconnects: AtomicU64,
}

/// The engine's side of a publisher: hands batches over without ever waiting.
#[derive(Debug, Clone)]
pub struct PublisherHandle {
    tx: mpsc::Sender<EventBatch>,
    stats: Arc<PublisherStats>,
}

impl PublisherHandle {
    /// Queues `batch` for publishing; `false` (and a count in
    /// [`PublisherStats::dropped`]) when the queue is full or the publisher is gone.
    pub fn publish(&self, batch: EventBatch) -> bool {
        match self.tx.try_send(batch) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// The publisher's counters.
    pub fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }
}

/// Kept payloads, oldest first, shared by the publishing loop and the replay server.
type Ring = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// A PUB socket (and a replay ROUTER), made by [`Publisher::start`], run by
/// [`Publisher::run`].
pub struct Publisher {
    config: PublisherConfig,
    socket: PubSocket,
    /// The PUB endpoint as bound (port 0 resolved); the configured one when connecting.
    endpoint: String,
    /// Where a connecting PUB socket dials (its guard's loopback port); `None` when it binds.
    connect_to: Option<String>,
    /// The guards in front of the sockets, alive as long as they are.
    _guards: Vec<Guard>,
    replay: Option<(RouterSocket, String)>,
    rx: mpsc::Receiver<EventBatch>,
    stats: Arc<PublisherStats>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("endpoint", &self.endpoint)
            .field("replay_endpoint", &self.replay_endpoint())
            .field("topic", &self.config.topic)
            .finish_non_exhaustive()
    }
}

// === impl Publisher ===

impl Publisher {
    /// Binds the sockets that bind (the PUB socket when its endpoint says so, the replay
    /// ROUTER always), so that errors show at start-up and port 0 is resolved; a connecting
    /// PUB socket connects in [`Publisher::run`], retrying.
    pub async fn start(config: PublisherConfig) -> Result<(Self, PublisherHandle), TransportError> {
        let bind = endpoint_binds(&config.endpoint);
        Self::start_with(config, bind).await
    }

    /// Like [`Publisher::start`], but the PUB socket binds its endpoint whatever vLLM's rule
    /// says: a publisher that listens on one interface only (`tcp://127.0.0.1:0` in tests).
    pub async fn start_binding(
        config: PublisherConfig,
    ) -> Result<(Self, PublisherHandle), TransportError> {
        Self::start_with(config, true).await
    }

    async fn start_with(
        config: PublisherConfig,
        bound: bool,
    ) -> Result<(Self, PublisherHandle), TransportError> {
        if config.buffer_steps > MAX_BUFFER_STEPS
            || config.max_queue_size == 0
            || config.max_queue_size > MAX_QUEUE_SIZE
        {
            return Err(TransportError::Config(format!(
                "buffer_steps {} (at most {MAX_BUFFER_STEPS}), max_queue_size {} (1..={MAX_QUEUE_SIZE})",
                config.buffer_steps, config.max_queue_size
            )));
        }
        // Every socket faces the network through a guard (see `guard`): a subscriber could
        // otherwise make the publishing process abort with one frame header.
        let mut guards = Vec::new();
        let mut socket = PubSocket::new();
        let (endpoint, connect_to) = if bound {
            let (endpoint, guard) = guard::bind(
                &mut socket,
                &bindable(&config.endpoint),
                Report::default(),
                Limits::facing_subscribers(),
            )
            .await?;
            guards.extend(guard);
            (endpoint, None)
        } else {
            let (target, guard) = guard::connect_target(
                &config.endpoint,
                Report::default(),
                Limits::facing_subscribers(),
            )
            .await?;
            guards.extend(guard);
            (config.endpoint.clone(), Some(target))
        };
        let replay = match &config.replay_endpoint {
            Some(e) => {
                let mut router = RouterSocket::new();
                let (resolved, guard) = guard::bind(
                    &mut router,
                    &bindable(e),
                    Report::default(),
                    Limits::default(),
                )
                .await?;
                guards.extend(guard);
                Some((router, resolved))
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(config.max_queue_size);
        let stats = Arc::new(PublisherStats::default());
        let handle = PublisherHandle {
            tx,
            stats: stats.clone(),
        };
        Ok((
            Self {
                config,
                socket,
                endpoint,
                connect_to,
                _guards: guards,
                replay,
                rx,
                stats,
            },
            handle,
        ))
    }

    /// The PUB endpoint (as bound, port resolved, when it binds).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay endpoint as bound, if any.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay.as_ref().map(|(_, e)| e.as_str())
    }

    /// Publishes queued batches until `cancel` fires or every handle is dropped, serving
    /// replays beside. Sequence numbers start at 0 with each run.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), TransportError> {
        let ring: Ring = Arc::new(Mutex::new(VecDeque::with_capacity(
            self.config.buffer_steps.min(1024),
        )));
        let replay_task = self.replay.take().map(|(router, endpoint)| {
            tokio::spawn(serve_replays(
                router,
                endpoint,
                ring.clone(),
                self.stats.clone(),
                cancel.child_token(),
            ))
        });
        let result = self.publish(&ring, &cancel).await;
        if let Some(task) = replay_task {
            task.abort();
            let _ = task.await;
        }
        result
    }

    async fn publish(
        &mut self,
        ring: &Ring,
        cancel: &CancellationToken,
    ) -> Result<(), TransportError> {
        // zmq.rs reconnects SUB sockets by itself, not PUB ones: a connecting publisher watches
        // its socket and dials again when the subscriber goes (a central EPP restarting).
        let mut monitor = self.connect_to.is_some().then(|| self.socket.monitor());
        if self.connect_to.is_some() && !self.connect(cancel).await {
            return Ok(());
        }
        let topic = Bytes::from(self.config.topic.clone().into_bytes());
        let mut seq: u64 = 0;
        loop {
            let batch = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                event = next_event(&mut monitor) => {
                    if matches!(event, SocketEvent::Disconnected(_)) {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        if !self.connect(cancel).await {
                            return Ok(());
                        }
                    }
                    continue;
                }
                batch = self.rx.recv() => match batch {
                    Some(b) => b,
                    None => return Ok(()),
                },
            };
            let payload = match self.config.encoder.encode(&batch) {
                Ok(p) => Bytes::from(p),
                Err(e) => {
                    self.stats.encode_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "KV-event batch not published");
                    continue;
                }
            };
            let message = three_frames(topic.clone(), seq_frame(seq), payload.clone());
            // A PUB socket drops for slow subscribers rather than wait; an error here is the
            // socket's end.
            self.socket
                .send(message)
                .await
                .map_err(zmq_error("send", &self.endpoint))?;
            self.stats.published.fetch_add(1, Ordering::Relaxed);
            if self.config.buffer_steps > 0 {
                let mut ring = ring.lock();
                if ring.len() == self.config.buffer_steps {
                    ring.pop_front();
                }
                ring.push_back((seq, payload));
            }
            seq += 1;
        }
    }

    /// Connects the PUB socket (vLLM's "connect" endpoints: a central subscriber binds),
    /// retrying with backoff; `false` when cancelled first.
    async fn connect(&mut self, cancel: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let Some(target) = &self.connect_to else {
                return true;
            };
            let attempt = tokio::select! {
                () = cancel.cancelled() => return false,
                r = self.socket.connect(target) => r,
            };
            match attempt {
                Ok(()) => return true,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(endpoint = %self.config.endpoint, error = %e, ?delay, "KV-event publisher cannot connect; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// The socket's next event; never, without a monitor (or once it is gone).
async fn next_event(
    monitor: &mut Option<futures::channel::mpsc::Receiver<SocketEvent>>,
) -> SocketEvent {
    if let Some(m) = monitor
        && let Some(event) = m.next().await
    {
        return event;
    }
    *monitor = None;
    std::future::pending().await
}

fn three_frames(a: Bytes, b: Bytes, c: Bytes) -> ZmqMessage {
    let mut m = ZmqMessage::from(a);
    m.push_back(b);
    m.push_back(c);
    m
}

/// Answers replay requests from the ring until cancelled. A malformed request is ignored, as
/// vLLM does.
async fn serve_replays(
    mut router: RouterSocket,
    endpoint: String,
    ring: Ring,
    stats: Arc<PublisherStats>,
    cancel: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            () = cancel.cancelled() => return,
            r = router.recv() => r,
        };
        let frames = match request {
            Ok(m) => m.into_vec(),
            Err(e) => {
                tracing::debug!(%endpoint, error = %e, "replay socket receive failed");
                continue;
            }
        };
        let [identity, delimiter, start] = frames.as_slice() else {
            tracing::debug!(%endpoint, frames = frames.len(), "replay request ignored: not 3 frames");
            continue;
        };
        let Some(start) = parse_seq(start).filter(|_| delimiter.is_empty()) else {
            tracing::debug!(%endpoint, "replay request ignored: bad delimiter or sequence");
            continue;
        };
        stats.replay_requests.fetch_add(1, Ordering::Relaxed);
        // A snapshot (cheap: the payloads are shared), so the publishing loop never waits for
        // a slow replay client.
        let kept: Vec<(u64, Bytes)> = ring
            .lock()
            .iter()
            .filter(|(seq, _)| *seq >= start)
            .cloned()
            .collect();
        for (seq, payload) in kept {
            let reply = four_frames(identity.clone(), seq_frame(seq), payload);
            if router.send(reply).await.is_err() {
                break;
            }
            stats.replayed.fetch_add(1, Ordering::Relaxed);
        }
        let end = four_frames(
            identity.clone(),
            Bytes::from_static(&END_OF_REPLAY),
            Bytes::new(),
        );
        let _ = router.send(end).await;
    }
}

fn four_frames(identity: Bytes, seq: Bytes, payload: Bytes) -> ZmqMessage {
    let mut m = ZmqMessage::from(identity);
    m.push_back(Bytes::new());
    m.push_back(seq);
    m.push_back(payload);
    m
}
