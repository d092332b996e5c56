//! The subscribing side: what the EPP runs per engine (pod mode) or once (central mode).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use zeromq::{
    DealerSocket, Socket as _, SocketRecv as _, SocketSend as _, SubSocket, ZmqError, ZmqMessage,
};

use super::guard::{self, Guard, GuardStats, Limits, Peers, Report, UnfinishedBudget};
use super::{Backoff, END_OF_REPLAY, TransportError, bindable, parse_seq, seq_frame, zmq_error};
use crate::codec::{Skipped, decode_batch_lenient};
use crate::topic::{MAX_TOPIC_BYTES, TOPIC_PREFIX};
use crate::{EventBatch, Untrusted};

/// Publishers (topics) one subscriber tracks sequence numbers for, at most: 4,096 (a central
/// subscriber's engines; as many as the guard's connections, `guard::MAX_CONNECTIONS`). A new
/// topic past it takes the place of the topic heard least recently, so that neither a flood of
/// topics (anyone who reaches a bound socket can make them up) nor years of pod churn lock a
/// new engine out, and the table never grows past the cap. An evicted topic's next message
/// starts it again as a topic never seen: delivered as it comes, no gap before it nor restart
/// seen (its sequence number still tells a consumer that tracks them, as the EPP does), and no
/// `replay_history` either, see [`SubscriberConfig::replay_history`].
pub const MAX_TOPICS: usize = 4_096;
/// Batches one replay may deliver, at most.
pub const MAX_REPLAY_BATCHES: u64 = 100_000;
/// How many times [`SubscriberConfig::replay_timeout`] a replay that keeps delivering may
/// last in all (30 s at the default 2 s): the longest a subscriber's live batches wait behind
/// it.
pub const REPLAY_PROGRESS_LIMIT: u32 = 15;

/// Whether the subscriber dials the engine or the engines dial it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeMode {
    /// Pod mode: SUB connects to one engine's PUB endpoint (which binds, vLLM's default).
    Connect,
    /// Central mode: SUB binds; the engines' PUB sockets connect to it.
    Bind,
}

/// What a [`Subscriber`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// The endpoint to connect to or bind (`tcp://10.0.0.7:5557`, `tcp://*:5557`).
    pub endpoint: String,
    /// Connect (pod mode) or bind (central mode).
    pub mode: SubscribeMode,
    /// The SUB socket's prefix filter (llm-d's default `kv@`; empty takes every topic, e.g.
    /// vLLM's default empty topic).
    pub topic_filter: String,
    /// The engine's replay ROUTER endpoint: a sequence gap asks it for the missed batches.
    pub replay_endpoint: Option<String>,
    /// How long a replay may go without a batch before the rest counts as missed. A replay
    /// that keeps delivering goes on, up to [`REPLAY_PROGRESS_LIMIT`] times this in all: a
    /// long ring replayed to an EPP that starts beside a busy engine is not cut off by a
    /// deadline sized for a short gap.
    pub replay_timeout: Duration,
    /// Replay what the publisher kept from before a topic's first message (an EPP that
    /// starts, or restarts, next to a running engine learns its cache); batches older than the
    /// publisher's ring count as missed. Needs `replay_endpoint`. Once the subscriber has
    /// evicted a topic ([`MAX_TOPICS`]), a topic first seen is no longer replayed so: it may be
    /// an evicted one coming back, whose history was delivered already.
    pub replay_history: bool,
    /// The first reconnection delay; it doubles up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// The longest reconnection delay.
    pub reconnect_max: Duration,
}

impl SubscriberConfig {
    /// Pod mode: connect to one engine's endpoint, llm-d's filter `kv@`, no replay.
    pub fn connect(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            mode: SubscribeMode::Connect,
            topic_filter: TOPIC_PREFIX.to_owned(),
            replay_endpoint: None,
            replay_timeout: Duration::from_secs(2),
            replay_history: false,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }

    /// Central mode: bind `endpoint` for every engine to connect to.
    pub fn bind(endpoint: impl Into<String>) -> Self {
        Self {
            mode: SubscribeMode::Bind,
            ..Self::connect(endpoint)
        }
    }
}

/// What a subscriber may hold in batches decoded ahead of their consumer, when it is not given
/// a shared [`QueueBudget`]: 64 MiB (a channel's count alone would allow a thousand batches of
/// up to an 8 MiB frame each, decoded to several times that).
pub const DEFAULT_QUEUE_BYTES: usize = 64 << 20;

/// Bytes of received batches queued ahead of their consumer (the payload and the decoded
/// events), shared by the subscribers given the same budget. A batch that would pass it is
/// dropped and counted as a full channel's are: missed, so the index clears what may be stale.
///
/// Each subscriber holds at most a share of it, `bytes / max(4, subscribers sharing it)`, or
/// one batch however large: an engine that sends heavy batches faster than they are applied
/// then drops its own, not every other engine's, and the shares together never pass the
/// budget. The share is per subscriber, not per topic: in pod mode a subscriber dials one
/// engine, which can publish under as many topics as it likes (`kv@a@m`, `kv@b@m`, …), and
/// a share per topic gave it the whole budget. A central-mode subscriber hears every engine
/// on one socket, and there the topic is the only name an engine has: its topics each hold
/// at most a share (a quarter, the subscriber being one), as before.
#[derive(Debug, Clone)]
pub struct QueueBudget {
    permits: Arc<Semaphore>,
    /// The budget, in bytes.
    bytes: usize,
    /// Subscribers charging it now ([`QueueHolder`]s alive).
    holders: Arc<AtomicUsize>,
}

impl QueueBudget {
    /// A budget of `bytes` (counted in KiB, at least one).
    pub fn new(bytes: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(bytes.div_ceil(1024).max(1))),
            bytes,
            holders: Arc::default(),
        }
    }

    /// One subscriber's place in the budget: counted among those sharing it while it lives.
    fn holder(&self) -> QueueHolder {
        self.holders.fetch_add(1, Ordering::Relaxed);
        QueueHolder {
            budget: self.clone(),
            held: Arc::default(),
        }
    }

    /// Bytes one holder (or, central mode, one topic) may hold when it holds anything.
    fn share(&self) -> usize {
        self.bytes / self.holders.load(Ordering::Relaxed).max(4)
    }

    /// Charges `bytes` to `held` (a subscriber's or a topic's), or `None` when the budget has
    /// not that much left or `held` would pass its share. `batches`, when given, counts the
    /// batch among its topic's queued ones until it is dropped.
    fn charge(
        &self,
        bytes: usize,
        held: &Arc<AtomicUsize>,
        batches: Option<&Arc<AtomicUsize>>,
    ) -> Option<QueueCharge> {
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).ok()?;
        // Counted as the budget counts it, in whole KiB.
        let bytes = kib as usize * 1024;
        let holding = held.load(Ordering::Relaxed);
        if holding > 0 && holding.saturating_add(bytes) > self.share() {
            return None;
        }
        let permit = self.permits.clone().try_acquire_many_owned(kib).ok()?;
        held.fetch_add(bytes, Ordering::Relaxed);
        if let Some(batches) = batches {
            batches.fetch_add(1, Ordering::Relaxed);
        }
        Some(QueueCharge {
            _charged: Arc::new(Charged {
                _permit: permit,
                held: held.clone(),
                bytes,
                batches: batches.cloned(),
            }),
        })
    }

    /// KiB left.
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

/// A subscriber's place in a [`QueueBudget`]: what its batches hold, and its count among the
/// holders (which sizes everyone's share), given back when it is dropped.
#[derive(Debug)]
struct QueueHolder {
    budget: QueueBudget,
    /// Bytes of this subscriber's batches queued now.
    held: Arc<AtomicUsize>,
}

impl Drop for QueueHolder {
    fn drop(&mut self) {
        self.budget.holders.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A received batch's charge on its [`QueueBudget`], given back when the batch (and every
/// clone of it) is dropped.
#[derive(Debug, Clone)]
pub struct QueueCharge {
    _charged: Arc<Charged>,
}

#[derive(Debug)]
struct Charged {
    _permit: OwnedSemaphorePermit,
    /// What its topic holds, given back too.
    held: Arc<AtomicUsize>,
    bytes: usize,
    /// Its topic's queued batches (central mode), one given back.
    batches: Option<Arc<AtomicUsize>>,
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        if let Some(batches) = &self.batches {
            batches.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl PartialEq for QueueCharge {
    /// Charges never make two batches differ.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// One decoded batch, in publishing order per topic.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedBatch {
    /// The subscriber's endpoint (pod mode: identifies the engine).
    pub endpoint: Arc<str>,
    /// The message's topic (central mode: identifies the engine, `kv@<pod-id>@<model>`).
    pub topic: Arc<str>,
    /// The publisher's sequence number.
    pub seq: u64,
    /// The events.
    pub batch: EventBatch,
    /// The payload as received (msgpack), for archiving or another decoder; shares the
    /// frame's memory.
    pub payload: Bytes,
    /// Whether it came from a replay (after a gap).
    pub replayed: bool,
    /// Batches of this topic lost for good just before this one (not replayed, undecodable,
    /// or dropped on a full channel): the index may hold stale blocks of this engine.
    pub missed_before: u64,
    /// The sequence number went backwards: the publisher restarted, and the engine's cache
    /// with it (what the index held for it is gone).
    pub publisher_restarted: bool,
    /// What the decoder left out of the batch: events of an unknown type or medium, blocks
    /// with extra keys ([`decode_batch_lenient`]).
    pub skipped: Skipped,
    /// Its charge on the subscriber's [`QueueBudget`]: keep it while the batch waits, drop it
    /// once the batch is taken over.
    pub charge: QueueCharge,
}

/// Counters of a subscriber (monotonic).
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Messages received (live and replayed).
    pub received: AtomicU64,
    /// Batches decoded.
    pub decoded: AtomicU64,
    /// Payloads that did not decode.
    pub decode_errors: AtomicU64,
    /// Messages that were not `[topic, seq, payload]`, or whose topic is not UTF-8 or over
    /// [`MAX_TOPIC_BYTES`].
    pub bad_messages: AtomicU64,
    /// Decoded batches dropped because the output channel was full or the queue over its
    /// budget ([`QueueBudget`]).
    pub dropped: AtomicU64,
    /// Sequence gaps seen.
    pub gaps: AtomicU64,
    /// Batches lost for good in gaps (not recovered by a replay).
    pub missed: AtomicU64,
    /// Batches recovered by replays.
    pub replayed: AtomicU64,
    /// Sequence resets (publisher restarts).
    pub restarts: AtomicU64,
    /// Successful connects or binds.
    pub connects: AtomicU64,
    /// Topics forgotten to make room for a new one ([`MAX_TOPICS`]).
    pub evicted_topics: AtomicU64,
    /// Publishers of a bound socket whose connection failed (reset, or a frame the ZMTP codec
    /// refused): that publisher alone was dropped, the socket kept.
    pub peers_lost: AtomicU64,
    /// The frame guard's: peers cut off or refused (shared by the subscriber's guards).
    pub guard: Arc<GuardStats>,
}

/// A point-in-time copy of [`SubscriberStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SubscriberStatsSnapshot {
    pub received: u64,
    pub decoded: u64,
    pub decode_errors: u64,
    pub bad_messages: u64,
    pub dropped: u64,
    pub gaps: u64,
    pub missed: u64,
    pub replayed: u64,
    pub restarts: u64,
    pub connects: u64,
    pub evicted_topics: u64,
    pub peers_lost: u64,
    pub peers_cut_off: u64,
    pub peers_over_budget: u64,
    pub peers_refused: u64,
}

impl SubscriberStats {
    /// The counters now.
    pub fn snapshot(&self) -> SubscriberStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SubscriberStatsSnapshot {
            received: l(&self.received),
            decoded: l(&self.decoded),
            decode_errors: l(&self.decode_errors),
            bad_messages: l(&self.bad_messages),
            dropped: l(&self.dropped),
            gaps: l(&self.gaps),
            missed: l(&self.missed),
            replayed: l(&self.replayed),
            restarts: l(&self.restarts),
            connects: l(&self.connects),
            evicted_topics: l(&self.evicted_topics),
            peers_lost: l(&self.peers_lost),
            peers_cut_off: l(&self.guard.cut_off),
            peers_over_budget: l(&self.guard.over_budget),
            peers_refused: l(&self.guard.refused),
        }
    }
}

fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// A KV-event subscriber, for a supervised task: build it from a config, keep its
/// [`stats`](Subscriber::stats), [`run`](Subscriber::run) it.
pub struct Subscriber {
    config: SubscriberConfig,
    endpoint: Arc<str>,
    stats: Arc<SubscriberStats>,
    /// Per topic: its name and the next sequence number expected.
    topics: Topics,
    /// A socket bound by [`Subscriber::bind`], for the first run.
    bound: Option<Opened>,
    /// The peers connected now, as the guard sees them.
    peers: watch::Sender<Peers>,
    /// Its place in the queue budget (see [`QueueBudget`] for whose share is counted where).
    budget: QueueHolder,
    /// The frame guard's budget of unfinished messages, when shared with other subscribers.
    unfinished: Option<UnfinishedBudget>,
    /// When the last replay that delivered ended ([`Subscriber::cooling_down`]).
    replay_ended: Option<tokio::time::Instant>,
}

/// A subscribed socket, its endpoint (resolved when bound) and the guard in front of it.
struct Opened {
    socket: SubSocket,
    endpoint: String,
    _guard: Option<Guard>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("config", &self.config)
            .field("topics", &self.topics.len())
            .field("bound", &self.local_endpoint())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct TopicState {
    name: Arc<str>,
    /// Bytes of its batches queued ahead of the consumer: its [`QueueBudget`] share in central
    /// mode (in pod mode the subscriber's is charged instead).
    queued: Arc<AtomicUsize>,
    /// Its batches in the channel to the consumer (central mode): at most a quarter of the
    /// channel's places, so that an engine publishing many small batches cannot fill the one
    /// channel every engine's batches go through (bytes alone would let it).
    queued_batches: Arc<AtomicUsize>,
    next: Option<u64>,
    /// Batches lost since the last delivered one.
    missed: u64,
    /// When it was last heard, on [`Topics`]' clock.
    heard: u64,
}

/// The topics a subscriber tracks, at most [`MAX_TOPICS`], the least recently heard evicted
/// first. Looking a topic up and marking it heard costs O(log n).
#[derive(Debug, Default)]
struct Topics {
    states: HashMap<Bytes, TopicState>,
    /// The topics by when they were last heard, oldest first.
    by_heard: BTreeMap<u64, Bytes>,
    /// Counts messages heard, to order topics by their last.
    clock: u64,
    /// Topics evicted so far.
    evicted: u64,
}

impl Topics {
    fn len(&self) -> usize {
        self.states.len()
    }

    fn get_mut(&mut self, topic: &[u8]) -> Option<&mut TopicState> {
        self.states.get_mut(topic)
    }

    /// `topic`'s state, marked heard now; made on first sight, in the place of the least
    /// recently heard topic when [`MAX_TOPICS`] are tracked. `None` for a topic that is not
    /// text or over [`MAX_TOPIC_BYTES`].
    fn heard(&mut self, topic: &[u8]) -> Option<&mut TopicState> {
        self.clock += 1;
        let now = self.clock;
        if let Some(state) = self.states.get_mut(topic) {
            if let Some(key) = self.by_heard.remove(&state.heard) {
                self.by_heard.insert(now, key);
            }
            state.heard = now;
            return self.states.get_mut(topic);
        }
        if topic.len() > MAX_TOPIC_BYTES {
            return None;
        }
        let name = std::str::from_utf8(topic).ok()?;
        while self.states.len() >= MAX_TOPICS {
            let Some((_, oldest)) = self.by_heard.pop_first() else {
                break;
            };
            self.states.remove(&oldest);
            self.evicted += 1;
        }
        // A copy: the frame's bytes share zmq.rs's read buffer, which a key kept for as long
        // as the topic would pin (a payload's megabytes with it).
        let key = Bytes::copy_from_slice(topic);
        self.by_heard.insert(now, key.clone());
        Some(self.states.entry(key).or_insert(TopicState {
            name: Arc::from(name),
            queued: Arc::default(),
            queued_batches: Arc::default(),
            next: None,
            missed: 0,
            heard: now,
        }))
    }
}

/// How the receive loop ended.
enum Ended {
    /// Cancelled, or nobody reads the batches any more.
    Done,
    /// The socket failed: reconnect.
    SocketError(ZmqError),
}

// === impl Subscriber ===

impl Subscriber {
    /// A subscriber for `config`.
    pub fn new(config: SubscriberConfig) -> Self {
        Self::with_stats(config, Arc::default())
    }

    /// A subscriber that counts into `stats`: a supervisor's factory makes a new subscriber
    /// per run and keeps the counters across restarts.
    pub fn with_stats(config: SubscriberConfig, stats: Arc<SubscriberStats>) -> Self {
        Self {
            endpoint: Arc::from(config.endpoint.as_str()),
            config,
            stats,
            topics: Topics::default(),
            bound: None,
            peers: watch::Sender::new(Peers::default()),
            budget: QueueBudget::new(DEFAULT_QUEUE_BYTES).holder(),
            unfinished: None,
            replay_ended: None,
        }
    }

    /// Has its frame guard charge unfinished messages to `budget` (shared with other
    /// subscribers) instead of a budget of its own.
    pub fn with_unfinished_budget(mut self, budget: UnfinishedBudget) -> Self {
        self.unfinished = Some(budget);
        self
    }

    /// Charges the batches it queues to `budget` (shared with other subscribers) instead of
    /// a [`DEFAULT_QUEUE_BYTES`] budget of its own.
    pub fn with_queue_budget(mut self, budget: QueueBudget) -> Self {
        self.budget = budget.holder();
        self
    }

    /// A central-mode subscriber whose socket is bound now: a bad endpoint fails here, and
    /// [`Subscriber::local_endpoint`] tells the port the OS picked for port 0.
    pub async fn bind(config: SubscriberConfig) -> Result<Self, TransportError> {
        Self::bind_with_stats(config, Arc::default()).await
    }

    /// [`Subscriber::bind`], counting into `stats` (as [`Subscriber::with_stats`]: its frame
    /// guard's counters are `stats.guard`, taken when the socket is bound).
    pub async fn bind_with_stats(
        config: SubscriberConfig,
        stats: Arc<SubscriberStats>,
    ) -> Result<Self, TransportError> {
        let config = SubscriberConfig {
            mode: SubscribeMode::Bind,
            ..config
        };
        let mut sub = Self::with_stats(config, stats);
        sub.bound = Some(sub.open().await?);
        Ok(sub)
    }

    /// The endpoint bound by [`Subscriber::bind`] (port resolved).
    pub fn local_endpoint(&self) -> Option<&str> {
        self.bound.as_ref().map(|o| o.endpoint.as_str())
    }

    /// Its counters (shared: read them while it runs).
    pub fn stats(&self) -> Arc<SubscriberStats> {
        self.stats.clone()
    }

    /// The publishers connected now, by IP, as the frame guard sees their TCP connections
    /// (pod mode: the engine; central mode: every engine that dialed in). It changes when one
    /// connects or goes, which zmq.rs does not tell: its SUB socket dials again silently. Not
    /// tracked for `ipc://` endpoints.
    pub fn peers(&self) -> watch::Receiver<Peers> {
        self.peers.subscribe()
    }

    /// Receives, orders and decodes batches into `out` until `cancel` fires or `out` closes
    /// (`Ok`). In pod mode a lost connection is retried with backoff forever; in central mode
    /// a failed bind is an `Err` (the supervisor restarts the task). `out` is this
    /// subscriber's own: a replay waits for room in it and then delivers, which another sender
    /// could take in between (the batch would then be dropped, as when nothing waits).
    pub async fn run(
        mut self,
        out: mpsc::Sender<ReceivedBatch>,
        cancel: CancellationToken,
    ) -> Result<(), TransportError> {
        let mut backoff = Backoff::new(self.config.reconnect_initial, self.config.reconnect_max);
        loop {
            let opened = match self.bound.take() {
                Some(bound) => Ok(bound),
                None => tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    s = self.open() => s,
                },
            };
            let ended = match opened {
                Ok(opened) => {
                    inc(&self.stats.connects, 1);
                    backoff.reset();
                    // The guard lives as long as the socket it protects.
                    let Opened { socket, _guard, .. } = opened;
                    let ended = self.receive(socket, &out, &cancel).await;
                    drop(_guard);
                    ended
                }
                Err(e) if self.config.mode == SubscribeMode::Bind => return Err(e),
                Err(TransportError::Zmq { source, .. }) => Ended::SocketError(source),
                Err(e) => return Err(e),
            };
            match ended {
                Ended::Done => return Ok(()),
                Ended::SocketError(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(endpoint = %self.endpoint, error = %e, ?delay, "KV-event subscriber disconnected; reconnecting");
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// A subscribed socket. TCP goes through a [`guard`](super::guard) (zmq.rs must not read
    /// the network itself); `ipc://` endpoints, local to the host, do not.
    async fn open(&self) -> Result<Opened, TransportError> {
        let mut socket = SubSocket::new();
        let e = &self.config.endpoint;
        let (endpoint, guard) = match self.config.mode {
            SubscribeMode::Connect => {
                let (target, guard) =
                    guard::connect_target(e, self.report(), Limits::default()).await?;
                socket
                    .connect(&target)
                    .await
                    .map_err(zmq_error("connect", e))?;
                (e.clone(), guard)
            }
            SubscribeMode::Bind => {
                guard::bind(&mut socket, &bindable(e), self.report(), Limits::default()).await?
            }
        };
        socket
            .subscribe(&self.config.topic_filter)
            .await
            .map_err(zmq_error("subscribe", e))?;
        Ok(Opened {
            socket,
            endpoint,
            _guard: guard,
        })
    }

    /// Where its guards report: its peers and its counters.
    fn report(&self) -> Report {
        Report {
            peers: Some(self.peers.clone()),
            stats: self.stats.guard.clone(),
            budget: self.unfinished.clone(),
        }
    }

    async fn receive(
        &mut self,
        mut socket: SubSocket,
        out: &mpsc::Sender<ReceivedBatch>,
        cancel: &CancellationToken,
    ) -> Ended {
        loop {
            let message = tokio::select! {
                () = cancel.cancelled() => return Ended::Done,
                m = socket.recv() => m,
            };
            let frames = match message {
                Ok(m) => m.into_vec(),
                // On a bound socket an error is one publisher's (its connection reset, or a
                // frame zmq.rs's codec refused, such as an unknown ZMTP command): zmq.rs has
                // dropped that publisher and the socket serves the others. Rebinding would cut
                // every engine's connection (a sequence gap, and a cleared index, for each),
                // and anyone who can reach the port could make it do so every backoff period.
                Err(ZmqError::Codec(_) | ZmqError::Network(_))
                    if self.config.mode == SubscribeMode::Bind =>
                {
                    inc(&self.stats.peers_lost, 1);
                    continue;
                }
                Err(e) => return Ended::SocketError(e),
            };
            inc(&self.stats.received, 1);
            if !self.on_message(frames, out).await {
                return Ended::Done;
            }
        }
    }

    /// Orders one live message; `false` when `out` is closed.
    async fn on_message(&mut self, frames: Vec<Bytes>, out: &mpsc::Sender<ReceivedBatch>) -> bool {
        let [topic, seq, payload] = <[Bytes; 3]>::try_from(frames).unwrap_or_else(|_| {
            [Bytes::new(), Bytes::new(), Bytes::new()] // fails parse_seq below
        });
        let Some(seq) = parse_seq(&seq) else {
            inc(&self.stats.bad_messages, 1);
            return true;
        };
        let evicted_before = self.topics.evicted;
        let Some(next) = self.topics.heard(&topic).map(|t| t.next) else {
            inc(&self.stats.bad_messages, 1);
            return true;
        };
        inc(
            &self.stats.evicted_topics,
            self.topics.evicted - evicted_before,
        );
        // A topic's first message: with `replay_history`, what came before it is a gap too,
        // so the publisher's ring (its last `buffer_steps` batches) is replayed first — unless
        // a topic was ever evicted, as this may be that topic back (see `MAX_TOPICS`).
        let history = self.config.replay_history
            && self.config.replay_endpoint.is_some()
            && self.topics.evicted == 0;
        let next = next.or(history.then_some(0));
        let mut restarted = false;
        match next {
            Some(expected) if seq > expected => {
                inc(&self.stats.gaps, 1);
                let recovered = if self.cooling_down() {
                    tracing::debug!(topic = %Untrusted(std::str::from_utf8(&topic).unwrap_or_default()), from = expected, until = seq, "KV-event gap not replayed: the last replay ended within the cooldown");
                    Some(0)
                } else {
                    self.replay(&topic, expected, seq, out).await
                };
                let Some(recovered) = recovered else {
                    return false;
                };
                let missed = (seq - expected).saturating_sub(recovered);
                inc(&self.stats.missed, missed);
                if let Some(t) = self.topics.get_mut(&topic) {
                    t.missed = t.missed.saturating_add(missed);
                }
            }
            Some(expected) if seq < expected => {
                inc(&self.stats.restarts, 1);
                restarted = true;
            }
            _ => {}
        }
        self.deliver(&topic, seq, payload, false, restarted, out)
    }

    /// Decodes and hands over one batch; `false` when `out` is closed.
    fn deliver(
        &mut self,
        topic: &Bytes,
        seq: u64,
        payload: Bytes,
        replayed: bool,
        restarted: bool,
        out: &mpsc::Sender<ReceivedBatch>,
    ) -> bool {
        let Some(state) = self.topics.get_mut(topic) else {
            return true;
        };
        state.next = Some(seq.saturating_add(1));
        // Lenient: an event of a kind (or tier) this crate does not know is left out and
        // counted, not the batch, which would be missed and clear the engine's whole index.
        let (batch, skipped) = match decode_batch_lenient(&payload) {
            Ok(b) => b,
            Err(e) => {
                inc(&self.stats.decode_errors, 1);
                state.missed = state.missed.saturating_add(1);
                tracing::debug!(topic = %Untrusted(&state.name), seq, error = %e, "KV-event batch does not decode");
                return true;
            }
        };
        inc(&self.stats.decoded, 1);
        let bytes = payload.len() + batch.approx_bytes();
        // Whose share: the engine's. In pod mode that is the subscriber's, whatever topics the
        // engine makes up; in central mode the topic is all that tells engines apart.
        let (held, batches) = match self.config.mode {
            SubscribeMode::Connect => (&self.budget.held, None),
            SubscribeMode::Bind => (&state.queued, Some(&state.queued_batches)),
        };
        // Central mode: a topic's places in the channel, a quarter of them as of the bytes
        // (the channel, shared by every engine, is all a pod-mode subscriber's own engine has).
        let places = (out.max_capacity() / 4).max(1);
        let has_place = batches.is_none_or(|b| b.load(Ordering::Relaxed) < places);
        let charge = has_place
            .then(|| self.budget.budget.charge(bytes, held, batches))
            .flatten();
        let Some(charge) = charge else {
            inc(&self.stats.dropped, 1);
            state.missed = state.missed.saturating_add(1);
            return true;
        };
        let received = ReceivedBatch {
            endpoint: self.endpoint.clone(),
            topic: state.name.clone(),
            seq,
            batch,
            payload,
            replayed,
            missed_before: state.missed,
            publisher_restarted: restarted,
            skipped,
            charge,
        };
        match out.try_send(received) {
            Ok(()) => {
                state.missed = 0;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                inc(&self.stats.dropped, 1);
                state.missed = state.missed.saturating_add(1);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Whether the last replay that delivered ended less than the replay cooldown ago: the
    /// replay's longest run ([`REPLAY_PROGRESS_LIMIT`] times the replay timeout, 30 s at the
    /// default). Live batches wait behind a replay, and a publisher faster than its consumer
    /// drops them, so each replay could reveal the gap for the next, without end; and an
    /// engine (or anyone who can open gaps in its stream) could have its ring replayed at
    /// will. So a subscriber (one engine's: the replay endpoint is the engine's, and serves
    /// every topic it publishes) replays at most half the time; a gap within the cooldown is
    /// missed, and the consumer clears what it knew of that engine. A replay that delivered
    /// nothing (its endpoint not listening yet) starts no cooldown.
    fn cooling_down(&self) -> bool {
        let cooldown = self
            .config
            .replay_timeout
            .saturating_mul(REPLAY_PROGRESS_LIMIT);
        self.replay_ended
            .is_some_and(|ended| ended.elapsed() < cooldown)
    }

    /// Asks the replay endpoint for `from..until` and delivers what comes back in order.
    /// Returns how many were recovered (`None` when `out` closed). No replay endpoint, a
    /// timeout or an error recover what arrived so far.
    async fn replay(
        &mut self,
        topic: &Bytes,
        from: u64,
        until: u64,
        out: &mpsc::Sender<ReceivedBatch>,
    ) -> Option<u64> {
        let Some(endpoint) = self.config.replay_endpoint.clone() else {
            return Some(0);
        };
        let recovered = self.replay_from(endpoint, topic, from, until, out).await;
        if recovered.is_some_and(|n| n > 0) {
            self.replay_ended = Some(tokio::time::Instant::now());
        }
        recovered
    }

    async fn replay_from(
        &mut self,
        endpoint: String,
        topic: &Bytes,
        from: u64,
        until: u64,
        out: &mpsc::Sender<ReceivedBatch>,
    ) -> Option<u64> {
        let want = (until - from).min(MAX_REPLAY_BATCHES);
        let (tx, mut rx) = mpsc::channel::<(u64, Bytes)>(64);
        // The replay's guard counts into the subscriber's counters and charges its budget;
        // its peer is not tracked.
        let report = Report {
            peers: None,
            stats: self.stats.guard.clone(),
            budget: self.unfinished.clone(),
        };
        let fetch = fetch_replay(endpoint.clone(), from, until, want, tx, report);
        let idle = self.config.replay_timeout;
        let limit = tokio::time::Instant::now() + idle.saturating_mul(REPLAY_PROGRESS_LIMIT);
        let timeout = tokio::time::sleep(idle);
        tokio::pin!(fetch, timeout);
        let mut recovered = 0;
        let mut fetch_done = false;
        loop {
            tokio::select! {
                r = &mut fetch, if !fetch_done => {
                    fetch_done = true;
                    if let Err(e) = r {
                        tracing::debug!(%endpoint, error = %e, "KV-event replay failed");
                    }
                }
                item = rx.recv() => match item {
                    Some((seq, payload)) => {
                        // Room first: a replay comes faster than a loaded consumer takes it,
                        // and a replayed batch dropped for a full channel would show as a gap
                        // and undo the replay (a clear). Waited for under the replay's
                        // deadline; the fetch behind it waits in turn.
                        match Self::room(out, &mut timeout).await {
                            Room::Made => {}
                            Room::TimedOut => {
                                tracing::debug!(%endpoint, from, until, recovered, "KV-event replay timed out waiting for the consumer");
                                return Some(recovered);
                            }
                            Room::Closed => return None,
                        }
                        // Counted once it can go: one given up above was not recovered.
                        inc(&self.stats.received, 1);
                        inc(&self.stats.replayed, 1);
                        recovered += 1;
                        if !self.deliver(topic, seq, payload, true, false, out) {
                            return None;
                        }
                        // Progress: the replay may go on for another `idle`, within its limit.
                        let next = (tokio::time::Instant::now() + idle).min(limit);
                        timeout.as_mut().reset(next);
                    }
                    None => break,
                },
                () = &mut timeout => {
                    tracing::debug!(%endpoint, from, until, recovered, "KV-event replay timed out");
                    break;
                }
            }
        }
        // And for the batch that revealed the gap, delivered next.
        match Self::room(out, &mut timeout).await {
            Room::Closed => None,
            Room::Made | Room::TimedOut => Some(recovered),
        }
    }

    /// Waits until `out` has room for one batch, or `deadline` passes. The subscriber is the
    /// channel's only sender, so the room is still there when it delivers.
    async fn room(
        out: &mpsc::Sender<ReceivedBatch>,
        deadline: &mut std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Room {
        tokio::select! {
            permit = out.reserve() => match permit {
                Ok(_) => Room::Made,
                Err(_) => Room::Closed,
            },
            () = deadline.as_mut() => Room::TimedOut,
        }
    }
}

/// What waiting for room in the consumer's channel came to.
enum Room {
    Made,
    TimedOut,
    Closed,
}

/// One replay exchange on a fresh DEALER: `["", from]` out, `["", seq, payload]` back until
/// the end marker; forwards the batches in `from..until`, increasing, `want` at most.
async fn fetch_replay(
    endpoint: String,
    from: u64,
    until: u64,
    want: u64,
    tx: mpsc::Sender<(u64, Bytes)>,
    report: Report,
) -> Result<(), TransportError> {
    let mut dealer = DealerSocket::new();
    // Through a guard, as the SUB socket (the replay endpoint is the network too).
    let guard = if endpoint.starts_with("tcp://") {
        Some(
            guard::connecting(&endpoint, report)
                .await
                .map_err(|source| TransportError::Guard {
                    endpoint: endpoint.clone(),
                    source,
                })?,
        )
    } else {
        None
    };
    let target = guard
        .as_ref()
        .map_or(endpoint.as_str(), |g| g.local_endpoint.as_str());
    dealer
        .connect(target)
        .await
        .map_err(zmq_error("connect", &endpoint))?;
    let mut request = ZmqMessage::from(Bytes::new());
    request.push_back(seq_frame(from));
    dealer
        .send(request)
        .await
        .map_err(zmq_error("send", &endpoint))?;
    let mut last: Option<u64> = None;
    let mut forwarded = 0;
    loop {
        let reply = dealer
            .recv()
            .await
            .map_err(zmq_error("recv", &endpoint))?
            .into_vec();
        let [_, seq, payload] = reply.as_slice() else {
            continue;
        };
        if seq.as_ref() == END_OF_REPLAY {
            return Ok(());
        }
        let Some(seq) = parse_seq(seq) else { continue };
        if seq < from || seq >= until || last.is_some_and(|l| seq <= l) {
            continue;
        }
        last = Some(seq);
        if tx.send((seq, payload.clone())).await.is_err() {
            return Ok(());
        }
        forwarded += 1;
        if forwarded >= want {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod topic_tests {
    use super::*;
    use crate::codec::{Encoder, Encoding};
    use crate::{BlockRemoved, Event, Medium};

    fn message(topic: &str, seq: u64) -> Vec<Bytes> {
        let batch = EventBatch {
            ts: seq as f64,
            events: vec![Event::BlockRemoved(BlockRemoved {
                block_hashes: vec![seq],
                medium: Medium::Gpu,
                group_idx: None,
            })],
            data_parallel_rank: None,
        };
        let payload = Encoder::new(Encoding::Array).encode(&batch).unwrap();
        vec![
            Bytes::from(topic.to_owned()),
            seq_frame(seq),
            Bytes::from(payload),
        ]
    }

    fn flood(i: usize) -> String {
        format!("kv@flood-{i}@m")
    }

    /// The table and its order agree, and stay within the cap.
    fn check(topics: &Topics) {
        assert!(topics.len() <= MAX_TOPICS);
        assert_eq!(topics.by_heard.len(), topics.states.len());
    }

    /// A flood of made-up topics on a bound subscriber: the table never passes its cap, nothing
    /// is refused, and an engine that comes after it is tracked as any other (its gap seen).
    #[tokio::test]
    async fn a_flood_of_topics_never_grows_the_table_and_a_new_engine_is_still_tracked() {
        let mut sub = Subscriber::new(SubscriberConfig::bind("tcp://127.0.0.1:0"));
        let (tx, mut rx) = mpsc::channel(16);
        let flooded = 2 * MAX_TOPICS + 10;
        for i in 0..flooded {
            assert!(sub.on_message(message(&flood(i), 0), &tx).await);
            check(&sub.topics);
            while rx.try_recv().is_ok() {}
        }
        assert_eq!(sub.topics.len(), MAX_TOPICS);
        let s = sub.stats.snapshot();
        assert_eq!(s.bad_messages, 0, "no topic is refused");
        assert_eq!(s.evicted_topics, (flooded - MAX_TOPICS) as u64);

        let engine = "kv@10.0.0.9:8000@m";
        assert!(sub.on_message(message(engine, 5), &tx).await);
        let first = rx.try_recv().unwrap();
        assert_eq!(
            (&*first.topic, first.seq, first.missed_before),
            (engine, 5, 0)
        );
        assert!(sub.on_message(message(engine, 8), &tx).await);
        let next = rx.try_recv().unwrap();
        assert_eq!((next.seq, next.missed_before), (8, 2), "6 and 7 missed");
        let s = sub.stats.snapshot();
        assert_eq!((s.gaps, s.missed, s.bad_messages), (1, 2, 0));
        assert_eq!(sub.topics.len(), MAX_TOPICS);
    }

    /// Sequence numbers a hostile publisher picks to make the missed count overflow: a jump
    /// to the last one, then undecodable batches. The count stops at its maximum; the next
    /// good batch still arrives.
    #[tokio::test]
    async fn sequence_numbers_from_a_hostile_publisher_do_not_overflow_the_missed_count() {
        let mut sub = Subscriber::new(SubscriberConfig::bind("tcp://127.0.0.1:0"));
        let (tx, mut rx) = mpsc::channel(16);
        let engine = "kv@10.0.0.9:8000@m";
        let garbage = |seq| {
            vec![
                Bytes::from(engine.to_owned()),
                seq_frame(seq),
                Bytes::from_static(b"\xc1 not msgpack"),
            ]
        };
        assert!(sub.on_message(message(engine, 0), &tx).await);
        assert!(sub.on_message(garbage(u64::MAX), &tx).await);
        assert!(sub.on_message(garbage(0), &tx).await);
        while rx.try_recv().is_ok() {}
        assert!(sub.on_message(message(engine, 1), &tx).await);
        let next = rx.try_recv().unwrap();
        assert_eq!((next.seq, next.missed_before), (1, u64::MAX));
    }

    /// Review (H2): the budget's share was counted per topic, and a per-endpoint subscriber
    /// takes any topic its engine makes up, so one engine publishing under many topics held
    /// the whole shared budget and every other engine's batches were dropped (each one a gap
    /// that cleared that engine). The share is now the subscriber's: the flood drops its own.
    #[tokio::test]
    async fn an_engine_flooding_under_many_topics_holds_one_share_and_starves_no_other() {
        let budget = QueueBudget::new(8 * 1024);
        let mut flooder = Subscriber::new(SubscriberConfig::connect("tcp://10.0.0.1:5557"))
            .with_queue_budget(budget.clone());
        let mut other = Subscriber::new(SubscriberConfig::connect("tcp://10.0.0.2:5557"))
            .with_queue_budget(budget.clone());
        // Nothing the flooder sends is taken: its channel has room for all of it.
        let (flood_tx, _flood_rx) = mpsc::channel(1024);
        let (other_tx, mut other_rx) = mpsc::channel(16);
        for i in 0..64 {
            assert!(flooder.on_message(message(&flood(i), 0), &flood_tx).await);
        }
        // Its share: 8 KiB / max(4, 2 subscribers), two batches of 1 KiB (what one costs).
        assert_eq!(flooder.stats.snapshot().dropped, 62);
        assert_eq!(budget.available_kib(), 6);
        let engine = "kv@10.0.0.2:8000@m";
        for seq in 0..2 {
            assert!(other.on_message(message(engine, seq), &other_tx).await);
        }
        assert_eq!(
            other.stats.snapshot().dropped,
            0,
            "the other engine drops nothing"
        );
        let first = other_rx.try_recv().unwrap();
        let second = other_rx.try_recv().unwrap();
        assert_eq!((first.seq, second.seq, second.missed_before), (0, 1, 0));
        assert_eq!(budget.available_kib(), 4);
    }

    /// Shares shrink as subscribers join, so that together they never pass the budget, and
    /// grow back as they go.
    #[tokio::test]
    async fn shares_follow_the_number_of_subscribers() {
        let budget = QueueBudget::new(8 * 1024);
        let (tx, _rx) = mpsc::channel(1024);
        let mut subs: Vec<Subscriber> = (0..8)
            .map(|i| {
                Subscriber::new(SubscriberConfig::connect(format!("tcp://10.0.0.{i}:5557")))
                    .with_queue_budget(budget.clone())
            })
            .collect();
        for (i, sub) in subs.iter_mut().enumerate() {
            for seq in 0..4 {
                assert!(sub.on_message(message(&flood(i), seq), &tx).await);
            }
            assert_eq!(sub.stats.snapshot().dropped, 3, "8 KiB / 8: one batch each");
        }
        assert_eq!(budget.available_kib(), 0);
        subs.truncate(4);
        assert_eq!(budget.share(), 2 * 1024, "8 KiB / 4 once four have gone");
    }

    /// Central mode: one subscriber hears every engine, and the topic is all that tells them
    /// apart, so each topic holds a share (a quarter) of its own.
    #[tokio::test]
    async fn a_bound_subscriber_counts_the_share_per_topic() {
        let budget = QueueBudget::new(8 * 1024);
        let mut sub = Subscriber::new(SubscriberConfig::bind("tcp://127.0.0.1:0"))
            .with_queue_budget(budget.clone());
        let (tx, mut rx) = mpsc::channel(64);
        for seq in 0..6 {
            assert!(
                sub.on_message(message("kv@10.0.0.1:8000@m", seq), &tx)
                    .await
            );
        }
        assert_eq!(sub.stats.snapshot().dropped, 4, "a quarter: two batches");
        assert!(sub.on_message(message("kv@10.0.0.2:8000@m", 0), &tx).await);
        assert_eq!(
            sub.stats.snapshot().dropped,
            4,
            "another engine's still fits"
        );
        let topics: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|b| b.topic.to_string())
            .collect();
        assert_eq!(
            topics,
            [
                "kv@10.0.0.1:8000@m",
                "kv@10.0.0.1:8000@m",
                "kv@10.0.0.2:8000@m"
            ]
        );
    }

    /// Review 14 (finding 3): in central mode every engine's batches go through one channel,
    /// and the byte shares did not bound its places: an engine publishing many small batches
    /// faster than the index took them filled it, and every other engine's batches were
    /// dropped (each a gap that cleared that engine). A topic holds a quarter of the places.
    #[tokio::test]
    async fn a_bound_subscriber_gives_each_topic_a_quarter_of_the_channel() {
        let mut sub = Subscriber::new(SubscriberConfig::bind("tcp://127.0.0.1:0"))
            .with_queue_budget(QueueBudget::new(64 << 20));
        let (tx, mut rx) = mpsc::channel(8);
        let busy = "kv@10.0.0.1:8000@m";
        for seq in 0..5 {
            assert!(sub.on_message(message(busy, seq), &tx).await);
        }
        assert_eq!(sub.stats.snapshot().dropped, 3, "two places of eight");
        for seq in 0..2 {
            assert!(
                sub.on_message(message("kv@10.0.0.2:8000@m", seq), &tx)
                    .await
            );
        }
        assert_eq!(sub.stats.snapshot().dropped, 3, "the other engine's fit");
        // A batch taken (and let go) by the consumer gives its place back.
        drop(rx.try_recv().unwrap());
        assert!(sub.on_message(message(busy, 5), &tx).await);
        assert_eq!(sub.stats.snapshot().dropped, 3);
        let delivered: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|b| (b.topic.to_string(), b.seq, b.missed_before))
            .collect();
        assert_eq!(
            delivered,
            [
                (busy.to_owned(), 1, 0),
                ("kv@10.0.0.2:8000@m".to_owned(), 0, 0),
                ("kv@10.0.0.2:8000@m".to_owned(), 1, 0),
                (busy.to_owned(), 5, 3),
            ]
        );
    }

    /// The topic heard least recently goes first; one heard again stays.
    #[test]
    fn the_least_recently_heard_topic_is_evicted() {
        let mut topics = Topics::default();
        for i in 0..MAX_TOPICS {
            topics.heard(flood(i).as_bytes()).unwrap();
        }
        topics.heard(flood(0).as_bytes()).unwrap();
        topics.heard(b"kv@new@m").unwrap();
        check(&topics);
        assert_eq!(topics.evicted, 1);
        assert!(topics.get_mut(flood(0).as_bytes()).is_some(), "heard again");
        assert!(topics.get_mut(flood(1).as_bytes()).is_none(), "the oldest");
        assert!(topics.get_mut(b"kv@new@m").is_some());
        // Not text, or too long: refused, and nothing is evicted for them.
        assert!(topics.heard(b"kv@\xff@m").is_none());
        assert!(topics.heard(&[b'k'; MAX_TOPIC_BYTES + 1]).is_none());
        assert_eq!(topics.evicted, 1);
    }

    #[test]
    fn a_kept_topic_does_not_pin_the_frame_it_came_in() {
        let frame = Bytes::from(b"kv@p@m plus the rest of a read buffer".to_vec()).slice(..6);
        let mut topics = Topics::default();
        topics.heard(&frame).unwrap();
        let (key, _) = topics.states.iter().next().unwrap();
        assert_eq!(key, &frame);
        assert_ne!(
            key.as_ptr(),
            frame.as_ptr(),
            "a copy, not a view of the frame"
        );
    }

    /// An evicted topic's next message is a fresh stream: delivered, no gap, no history
    /// replay (which would deliver its past a second time), whatever `replay_history` says.
    #[tokio::test]
    async fn an_evicted_topic_comes_back_as_a_fresh_stream_without_a_replay() {
        let config = SubscriberConfig {
            // Never dialed: a replay would count a gap first, which the test would see.
            replay_endpoint: Some("tcp://127.0.0.1:1".to_owned()),
            replay_history: true,
            ..SubscriberConfig::bind("tcp://127.0.0.1:0")
        };
        let mut sub = Subscriber::new(config);
        let (tx, mut rx) = mpsc::channel(16);
        let engine = "kv@10.0.0.9:8000@m";
        // Its first message was seen (its history replayed then), and the batch up to 41.
        sub.topics.heard(engine.as_bytes()).unwrap().next = Some(42);
        for i in 0..MAX_TOPICS {
            sub.topics.heard(flood(i).as_bytes()).unwrap();
        }
        assert!(sub.topics.get_mut(engine.as_bytes()).is_none(), "evicted");

        assert!(sub.on_message(message(engine, 50), &tx).await);
        let back = rx.try_recv().unwrap();
        assert_eq!(
            (
                back.seq,
                back.replayed,
                back.missed_before,
                back.publisher_restarted
            ),
            (50, false, 0, false)
        );
        let s = sub.stats.snapshot();
        assert_eq!((s.gaps, s.replayed, s.missed), (0, 0, 0));
        // And it is tracked again from there.
        assert_eq!(
            sub.topics.get_mut(engine.as_bytes()).unwrap().next,
            Some(51)
        );
        check(&sub.topics);
    }
}
