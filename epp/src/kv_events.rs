//! The KV-event subscribers: the engines' KV-cache events into the precise prefix index.
//!
//! With `kvEventsConfig.discoverPods` (llm-d's default) one subscriber per endpoint dials
//! `tcp://<ip>:<socketPort + rank>`; subscribers start and stop as endpoints come and go, and a
//! departed endpoint's entries are cleared. With `kvEventsConfig.zmqEndpoint` one subscriber
//! binds there and every engine dials it; each message's topic (`kv@<ip:port>@<model>`) names
//! its endpoint. All of it runs as one supervised task ([`run`]).
//!
//! Each endpoint's messages carry a sequence number. A jump forward is a gap: the subscriber
//! asks the engine's replay socket for the missing batches (when `replaySocketPort` is set) and
//! applies them; if that fails the endpoint's entries are cleared and its stream is marked
//! [`StreamState::Gap`], so that the precise scorer scores it from the approximate index for a
//! while. A restarted engine (the transport saw its sequence go backwards, or it jumped far
//! back) has its entries cleared too.
//!
//! A stream is [`StreamState::Live`] from the first batch received on it, not from the
//! connection: a subscriber that dials a publisher which is not there (zmq.rs dials again
//! silently, forever) must not make the precise scorer trust an index that nothing feeds. It
//! stops being live when the publisher's connection closes, as the transport's frame guard sees
//! it ([`KvEventSource::connected`]). Not on silence: vLLM publishes nothing while an engine is
//! idle, so a timeout would drop the healthy idle engines (and a bound socket cannot tell one
//! engine's silence from another's). An endpoint whose subscriber task ends unexpectedly (a
//! panic) is cleared, marked down, and its subscriber started again after
//! [`RECONNECT_INTERVAL`].
//!
//! The transport is behind [`Connector`] so that this logic is tested without sockets; the
//! ZMQ implementation (crate `kv-events`, feature `zmq`) plugs in there.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::datastore::{Datastore, Endpoint, EndpointId, PoolSnapshot};
use endpoint_picker::kv_index::groups::CacheGroups;
use endpoint_picker::kv_index::{Applied, Dropped, GAP_FALLBACK, SharedKvIndex, StreamState};
use endpoint_picker::scheduling::plugins::precise::KvEventsSettings;
use ext_proc::untrusted::LogBudget;
use kv_events::{EventBatch, Skipped};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a subscriber waits before dialing again after a failure (llm-d: 5 s).
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(5);
/// The most batches one replay may return (vLLM buffers 10,000 steps by default).
pub const MAX_REPLAY_BATCHES: usize = 10_000;

/// One message of an engine: `[topic, seq, payload]`, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct KvMessage {
    /// `kv@<pod-id>@<model>`.
    pub topic: String,
    /// The publisher's sequence number.
    pub seq: u64,
    /// The events.
    pub batch: EventBatch,
    /// The transport saw the publisher's sequence go backwards: it restarted, and its cache
    /// with it.
    pub publisher_restarted: bool,
    /// The batch came from the engine's replay socket (a gap, or the history an EPP asks for
    /// when it starts), not as it was published.
    pub replayed: bool,
    /// What the transport's decoder left out of the batch (events of an unknown type or
    /// medium, blocks with extra keys), counted as dropped when the batch is applied.
    pub skipped: Skipped,
}

/// What a source hands over.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// A message.
    Message(KvMessage),
    /// A publisher connected or went: see [`KvEventSource::connected`].
    PeersChanged,
}

/// Why a source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The connection failed or was lost.
    #[error("kv events connection: {0}")]
    Connection(String),
    /// Replay is not configured, or the publisher no longer has the batches.
    #[error("kv events replay: {0}")]
    Replay(String),
}

/// A connected stream of one publisher's messages (or, bound, of every engine's).
pub trait KvEventSource: Send {
    /// The next message, or a change of the connected publishers.
    fn recv(&mut self) -> impl Future<Output = Result<SourceEvent, SourceError>> + Send;
    /// Whether the publisher at `ip` is connected now; `None` when the source cannot tell (or
    /// never saw it).
    fn connected(&self, ip: IpAddr) -> Option<bool> {
        let _ = ip;
        None
    }
    /// The batches from `from` on, as the publisher's replay socket returns them (at most
    /// [`MAX_REPLAY_BATCHES`]).
    fn replay(
        &mut self,
        from: u64,
    ) -> impl Future<Output = Result<Vec<KvMessage>, SourceError>> + Send;
}

/// Opens sources.
pub trait Connector: Send + Sync + 'static {
    /// The source type.
    type Source: KvEventSource + 'static;
    /// Dials (`bind` false) or binds (`bind` true) `endpoint`, subscribed to `topic_filter`;
    /// `replay` is the publisher's replay socket, when it has one.
    fn connect(
        &self,
        endpoint: String,
        replay: Option<String>,
        topic_filter: String,
        bind: bool,
    ) -> impl Future<Output = Result<Self::Source, SourceError>> + Send;
}

/// `name, model_server_pod`, as the per-pod pool metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    /// Pool name.
    pub name: String,
    /// Endpoint name.
    pub model_server_pod: String,
}

/// `name, model_server_pod, reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// Pool name.
    pub name: String,
    /// Endpoint name (`unknown` for a topic naming no endpoint of the pool).
    pub model_server_pod: String,
    /// Why: `unknown_parent`, `no_full_block`, `unknown_blocks`, `malformed`, `clearing`,
    /// `batch_cap`, `endpoint_share`, `block_size` (the engine's block is no multiple of the
    /// index's; all of them `kv_index::Dropped`), `bad_topic`, `unknown_endpoint`, `bind` (the
    /// bound socket could not listen; counted under `unknown`, once a retry), `gap`, `rate` (the
    /// engine over `maxBlocksPerSecond`),
    /// `other_group` (a hybrid model's cache group that does not keep prefixes:
    /// `kv_index::groups`), or what the decoder left out ([`SKIP_REASONS`]): `unknown_type`,
    /// `unknown_medium`, `extra_keys`.
    pub reason: &'static str,
}

/// The `reason`s of what the transport's decoder left out of a batch ([`Skipped`]): events of
/// a type or in a medium it does not know, and blocks whose hash has extra keys (counted in
/// blocks, not events: `kv_events::codec`).
pub const SKIP_REASONS: [&str; 3] = ["unknown_type", "unknown_medium", "extra_keys"];

/// `reason` of `inference_extension_kv_events_transport_total`: what the transport below the
/// index lost or refused, before any batch reached it (so no endpoint is named: summed over
/// every subscriber of the process). `decode`: a payload that did not decode; `bad_message`:
/// not `[topic, seq, payload]`, or a bad topic frame; `queue_full`: a decoded batch dropped
/// for a full channel or queue budget; `evicted_topic`: a bound socket's topic forgotten for
/// a new one; `peer_lost`: a bound socket's publisher whose connection failed; and the frame
/// guard's `cut_off` (a frame or message too large, or too slow), `over_budget` (unfinished
/// messages over their budget) and `refused` (connections over the caps).
pub const TRANSPORT_REASONS: [&str; 8] = [
    "decode",
    "bad_message",
    "queue_full",
    "evicted_topic",
    "peer_lost",
    "cut_off",
    "over_budget",
    "refused",
];

/// The transport counters of [`TRANSPORT_REASONS`], in its order.
fn transport_counts(s: &kv_events::transport::SubscriberStatsSnapshot) -> [u64; 8] {
    [
        s.decode_errors,
        s.bad_messages,
        s.dropped,
        s.evicted_topics,
        s.peers_lost,
        s.peers_cut_off,
        s.peers_over_budget,
        s.peers_refused,
    ]
}

/// `reason` (one of [`TRANSPORT_REASONS`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// Why.
    pub reason: &'static str,
}

/// Reads the subscribers' counters at each scrape: the transport counts them where they
/// happen, with no task of ours to wake on a payload that never decodes.
#[derive(Debug)]
struct TransportCollector(Arc<kv_events::transport::SubscriberStats>);

impl Collector for TransportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counts = transport_counts(&self.0.snapshot());
        let mut family = encoder.encode_descriptor(
            "inference_extension_kv_events_transport",
            "KV-event messages and connections the transport lost or refused before they \
             reached the index, by reason, summed over every subscriber",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in TRANSPORT_REASONS.into_iter().zip(counts) {
            ConstCounter::new(n).encode(family.encode_family(&TransportLabels { reason })?)?;
        }
        Ok(())
    }
}

/// The KV-event metrics. Labels are bounded by the pool's endpoints; a departed endpoint's
/// series go with it.
#[derive(Debug, Clone, Default)]
pub struct KvEventMetrics {
    /// `inference_extension_kv_events_received_total`: events received.
    pub received: Family<PodLabels, Counter>,
    /// `inference_extension_kv_events_applied_total`: events that changed the index.
    pub applied: Family<PodLabels, Counter>,
    /// `inference_extension_kv_events_dropped_total`: events (for `gap`, batches; for
    /// `extra_keys`, blocks) lost.
    pub dropped: Family<DropLabels, Counter>,
    /// `inference_extension_kv_events_lag_seconds`: now − the last batch's timestamp.
    pub lag: Family<PodLabels, Gauge<f64, AtomicU64>>,
    /// `inference_extension_kv_index_blocks`: request keys the precise index holds.
    pub index_blocks: Gauge,
    /// `inference_extension_kv_index_entries`: (block, endpoint, tier) entries it holds.
    pub index_entries: Gauge,
    /// `inference_extension_speculation_peer_messages_total`: speculative entries shared with
    /// peer EPPs, by outcome ([`crate::speculation_peers`]).
    pub peer_messages: Family<PeerOutcome, Counter>,
    /// `inference_extension_speculation_peers_followed`: peer publishers this EPP has subscribed
    /// to and not stopped (every address of a peer name counts; an unreachable peer still counts
    /// while its socket redials).
    pub peers_followed: Gauge,
    /// `inference_extension_kv_events_transport_total`: what every ZMQ subscriber's transport
    /// counts ([`ZmqConnector::counting_into`]), read at each scrape.
    pub transport: Arc<kv_events::transport::SubscriberStats>,
}

/// `outcome` of a peer message: `sent`, `applied`, or why it was dropped: `queue_full` (the
/// publisher's queue, or no publisher), `send_error`, `decode`, `unknown_endpoint`, `rate`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerOutcome {
    /// What happened.
    pub outcome: &'static str,
}

/// The families [`KvEventMetrics::register`] adds, with their types (see `metrics::FAMILIES`).
pub const FAMILIES: &[(&str, &str)] = &[
    ("inference_extension_kv_events_received", "counter"),
    ("inference_extension_kv_events_applied", "counter"),
    ("inference_extension_kv_events_dropped", "counter"),
    ("inference_extension_kv_events_lag_seconds", "gauge"),
    ("inference_extension_kv_index_blocks", "gauge"),
    ("inference_extension_kv_index_entries", "gauge"),
    ("inference_extension_speculation_peer_messages", "counter"),
    ("inference_extension_speculation_peers_followed", "gauge"),
    ("inference_extension_kv_events_transport", "counter"),
];

impl KvEventMetrics {
    /// Registers the families.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "inference_extension_kv_events_received",
            "KV-cache events received from each endpoint's engine",
            self.received.clone(),
        );
        r.register(
            "inference_extension_kv_events_applied",
            "KV-cache events applied to the precise prefix index",
            self.applied.clone(),
        );
        r.register(
            "inference_extension_kv_events_dropped",
            "KV-cache events dropped, by reason (gap: batches lost and not replayed; \
             rate: an engine over maxBlocksPerSecond; extra_keys: blocks cut)",
            self.dropped.clone(),
        );
        r.register(
            "inference_extension_kv_events_lag_seconds",
            "Now minus the timestamp of the endpoint's last KV-event batch",
            self.lag.clone(),
        );
        r.register(
            "inference_extension_kv_index_blocks",
            "Blocks (request keys) held by the precise prefix index",
            self.index_blocks.clone(),
        );
        r.register(
            "inference_extension_kv_index_entries",
            "Block copies (block, endpoint, tier) held by the precise prefix index",
            self.index_entries.clone(),
        );
        r.register(
            "inference_extension_speculation_peer_messages",
            "Speculative entries shared with peer EPPs (speculativePeers), by outcome",
            self.peer_messages.clone(),
        );
        r.register(
            "inference_extension_speculation_peers_followed",
            "Peer EPP addresses (speculativePeers) this EPP has subscribed to and not stopped",
            self.peers_followed.clone(),
        );
        r.register_collector(Box::new(TransportCollector(self.transport.clone())));
    }

    /// Records one applied batch.
    pub fn record(&self, pod: &PodLabels, received: usize, applied: &Applied, lag: f64) {
        self.received.get_or_create(pod).inc_by(received as u64);
        self.applied
            .get_or_create(pod)
            .inc_by(u64::from(applied.applied));
        for (reason, n) in Dropped::ALL.into_iter().zip(applied.dropped) {
            if n > 0 {
                self.count_dropped(pod, reason.as_str(), u64::from(n));
            }
        }
        if lag.is_finite() {
            self.lag.get_or_create(pod).set(lag.max(0.0));
        }
    }

    /// Records what the decoder left out of a batch: received all the same, and dropped by
    /// their [`SKIP_REASONS`].
    pub fn record_skipped(&self, pod: &PodLabels, skipped: &Skipped) {
        if skipped.is_empty() {
            return;
        }
        self.received
            .get_or_create(pod)
            .inc_by(u64::from(skipped.events()));
        let left_out = [
            skipped.unknown_type,
            skipped.unknown_medium,
            skipped.extra_keys,
        ];
        for (reason, n) in SKIP_REASONS.into_iter().zip(left_out) {
            if n > 0 {
                self.count_dropped(pod, reason, u64::from(n));
            }
        }
    }

    /// Counts `n` dropped for `reason`.
    pub fn count_dropped(&self, pod: &PodLabels, reason: &'static str, n: u64) {
        self.dropped
            .get_or_create(&DropLabels {
                name: pod.name.clone(),
                model_server_pod: pod.model_server_pod.clone(),
                reason,
            })
            .inc_by(n);
    }

    /// Forgets a departed endpoint's series.
    pub fn forget(&self, pod: &PodLabels) {
        self.received.remove(pod);
        self.applied.remove(pod);
        self.lag.remove(pod);
        let reasons = Dropped::ALL.map(Dropped::as_str);
        for reason in reasons
            .into_iter()
            .chain(["bad_topic", "gap", "other_group", "rate"])
            .chain(SKIP_REASONS)
        {
            self.dropped.remove(&DropLabels {
                name: pod.name.clone(),
                model_server_pod: pod.model_server_pod.clone(),
                reason,
            });
        }
    }

    /// Refreshes the index gauges.
    pub fn refresh(&self, index: &SharedKvIndex) {
        let (blocks, entries) = index.sizes();
        self.index_blocks.set(blocks as i64);
        self.index_entries.set(entries as i64);
    }
}

/// The model of a topic `kv@<pod-id>@<model>` (and its pod id).
pub fn parse_topic(topic: &str) -> Option<(&str, &str)> {
    let mut parts = topic.splitn(3, '@');
    let _prefix = parts.next()?;
    let pod = parts.next()?;
    let model = parts.next()?;
    Some((pod, model))
}

/// Where a sequence number falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The first message, or the next one.
    InOrder,
    /// Already seen (a replay overlapping the live stream).
    Duplicate,
    /// `missed` messages were lost, from `from` on.
    Gap {
        /// The first lost sequence number.
        from: u64,
        /// How many.
        missed: u64,
    },
    /// The publisher started again from a lower number (the engine restarted).
    Reset,
}

/// One publisher's stream: its sequence numbers, and which of its KV-cache groups feed the
/// index.
#[derive(Debug, Clone, Copy, Default)]
pub struct SequenceTracker {
    last: Option<u64>,
    /// The next number comes from a new transport subscriber, which has seen nothing of the
    /// publisher before: it cannot tell a restart, and dedups nothing against the old one.
    new_source: bool,
    /// The groups its stores named, for a hybrid model's removals.
    groups: CacheGroups,
    /// A topic that names no model was warned about (once a stream).
    warned_bad_topic: bool,
    /// Stores of an engine block that is no multiple of the index's were warned about (once a
    /// stream: every store of that engine is, until it is configured again).
    warned_block_size: bool,
    /// When a gap replay could not fill last cleared the endpoint (until the publisher
    /// restarts), or when the engine last sent over its rate.
    gap_since: Option<Instant>,
    /// The engine's live events against `maxBlocksPerSecond`.
    rate: BlockRate,
    /// Its replayed events against their own allowance ([`REPLAY_ALLOWANCE_SECONDS`]).
    replay_rate: BlockRate,
    /// The engine is over its rate: its batches are dropped.
    throttled: bool,
}

impl SequenceTracker {
    /// A stream whose engine may send `max_blocks_per_second` blocks (0: no cap).
    pub fn new(max_blocks_per_second: u64) -> Self {
        Self {
            rate: BlockRate::new(max_blocks_per_second),
            replay_rate: BlockRate::with_burst(max_blocks_per_second, REPLAY_ALLOWANCE_SECONDS),
            ..Self::default()
        }
    }

    /// The stream is read through a new source (a reconnection): its first number, if lower
    /// than the last, is a restarted publisher's, not a duplicate. An engine that restarted
    /// while the EPP reconnected would otherwise have its first batches (up to
    /// `MAX_REPLAY_BATCHES` of them) dropped as duplicates of the old ones.
    pub fn new_source(&mut self) {
        self.new_source = true;
    }

    /// The transport saw the publisher restart: `seq` starts its new sequence, whatever came
    /// before (a restarted engine's first numbers may lie just below the old ones, which
    /// [`SequenceTracker::observe`] would take for duplicates).
    pub fn restart(&mut self, seq: u64) -> SeqCheck {
        self.last = Some(seq);
        SeqCheck::Reset
    }

    /// Checks `seq` and, unless it is a duplicate, records it.
    pub fn observe(&mut self, seq: u64) -> SeqCheck {
        if std::mem::take(&mut self.new_source) && self.last.is_some_and(|last| seq <= last) {
            self.last = Some(seq);
            return SeqCheck::Reset;
        }
        let check = match self.last {
            None => SeqCheck::InOrder,
            Some(last) if seq == last.wrapping_add(1) => SeqCheck::InOrder,
            Some(last) if seq > last => SeqCheck::Gap {
                from: last + 1,
                missed: seq - last - 1,
            },
            // vLLM numbers from 0: anything at or below a few back is an overlap; far below,
            // a new publisher.
            Some(last) if seq == 0 || last - seq > MAX_REPLAY_BATCHES as u64 => SeqCheck::Reset,
            Some(_) => SeqCheck::Duplicate,
        };
        if check != SeqCheck::Duplicate {
            self.last = Some(seq);
        }
        check
    }
}

/// Seconds of `maxBlocksPerSecond` an engine's replays may apply at once, refilled at the
/// rate: 6 M blocks at the default, more than a busy engine's whole ring (vLLM keeps 10,000
/// batches, about five minutes of a busy engine, some 4 M blocks). Replays come at once, at
/// start-up or after a gap, and are not held to the live rate; this allowance bounds what an
/// engine that opens gaps on purpose gets applied through them to the live rate again.
pub const REPLAY_ALLOWANCE_SECONDS: u32 = 30;

/// A token bucket of blocks, refilled at `maxBlocksPerSecond` up to a burst (a second's worth
/// for live batches).
///
/// A batch passes while the bucket holds its blocks (or is full: a batch larger than the
/// burst passes alone and leaves a debt), so over any long stretch the blocks applied stay
/// within the rate. A dropped batch is charged as well, down to a burst's debt at most: the
/// bucket measures what the engine sends, not what was let through, so an engine over its
/// rate stays throttled for as long as it stays over it.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockRate {
    /// Blocks a second; 0: no cap.
    per_second: f64,
    /// The most the bucket holds.
    burst: f64,
    /// What the bucket holds (negative: a debt).
    tokens: f64,
    /// When it was last refilled (`None`: full).
    refilled: Option<Instant>,
}

impl BlockRate {
    /// A full bucket for `per_second` blocks a second (0: no cap), a second's worth.
    pub fn new(per_second: u64) -> Self {
        Self::with_burst(per_second, 1)
    }

    /// A full bucket for `per_second` blocks a second (0: no cap), `seconds`' worth.
    pub fn with_burst(per_second: u64, seconds: u32) -> Self {
        let per_second = per_second as f64;
        let burst = per_second * f64::from(seconds);
        Self {
            per_second,
            burst,
            tokens: burst,
            refilled: None,
        }
    }

    fn capped(&self) -> bool {
        self.per_second > 0.0
    }

    fn refill(&mut self, now: Instant) {
        if let Some(then) = self.refilled {
            let elapsed = now.saturating_duration_since(then).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        }
        self.refilled = Some(now);
    }

    /// Whether the bucket is full at `now`: the engine has sent less than the rate for long
    /// enough to pay any debt and fill it again.
    pub fn full(&mut self, now: Instant) -> bool {
        if !self.capped() {
            return true;
        }
        self.refill(now);
        self.tokens >= self.burst
    }

    /// Whether a batch of `blocks` may pass now; takes them from the bucket if so.
    pub fn admit(&mut self, blocks: u64, now: Instant) -> bool {
        if !self.capped() {
            return true;
        }
        self.refill(now);
        let blocks = blocks as f64;
        if self.tokens < blocks.min(self.burst) {
            return false;
        }
        self.tokens -= blocks;
        true
    }

    /// Takes a dropped batch, down to a burst's debt at most.
    pub fn charge_dropped(&mut self, blocks: u64, now: Instant) {
        if self.capped() {
            self.refill(now);
            let floor = -self.burst;
            if self.tokens > floor {
                self.tokens = (self.tokens - blocks as f64).max(floor);
            }
        }
    }
}

/// What a batch costs the index: its events' blocks (an event without blocks counts one).
fn batch_blocks(batch: &EventBatch) -> u64 {
    batch
        .events
        .iter()
        .map(|e| match e {
            kv_events::Event::BlockStored(s) => s.block_hashes.len().max(1),
            kv_events::Event::BlockRemoved(r) => r.block_hashes.len().max(1),
            kv_events::Event::AllBlocksCleared => 1,
        } as u64)
        .sum()
}

/// Applies one message of `endpoint`'s stream: sequence check (replaying or clearing on a
/// gap, clearing on a reset), then the batch, then the metrics.
pub async fn handle<S: KvEventSource>(
    index: &SharedKvIndex,
    metrics: &KvEventMetrics,
    pod: &PodLabels,
    endpoint: EndpointId,
    tracker: &mut SequenceTracker,
    source: &mut S,
    mut msg: KvMessage,
) {
    let Some((_, model)) = parse_topic(&msg.topic) else {
        if !tracker.warned_bad_topic {
            tracker.warned_bad_topic = true;
            tracing::warn!(
                endpoint = %pod.model_server_pod,
                topic = %kv_events::Untrusted(&msg.topic),
                "kv events: the topic names no model (kv@<pod>@<model>): its batches are dropped \
                 and the endpoint is scored from the approximate index"
            );
        }
        let n = msg.batch.events.len() as u64;
        // Received and dropped alike, so that received ≥ applied + dropped holds.
        metrics.received.get_or_create(pod).inc_by(n);
        metrics.count_dropped(pod, "bad_topic", n);
        return;
    };
    let blocks = batch_blocks(&msg.batch);
    let now = Instant::now();
    if tracker.throttled {
        // An episode ends once the engine has stayed under its rate long enough to fill the
        // bucket again; ended by any batch that fits, it would start again at the next, and
        // clear the endpoint each time, at an engine just over its rate. A replay meanwhile is
        // dropped too: its stores would outlive the live removals dropped after them.
        if msg.replayed || !tracker.rate.full(now) {
            throttle(index, metrics, pod, endpoint, tracker, &msg, blocks).await;
            return;
        }
        tracker.rate.admit(blocks, now);
        tracker.throttled = false;
        if let Some(not_logged) = THROTTLE_LOG.allow() {
            tracing::info!(
                endpoint = %pod.model_server_pod,
                not_logged,
                "kv events: the engine is back under maxBlocksPerSecond; its batches are \
                 applied again (the approximate index scores it until the gap's fallback ends)"
            );
        }
    } else if msg.replayed {
        // A replay is the engine's past, asked for and delivered at once: held to the live
        // rate, an EPP's start beside a busy engine would replay its ring only to drop it and
        // clear the endpoint. It has its own allowance instead, so that an engine opening gaps
        // on purpose gains at most the rate again; past it the rest is dropped.
        if !tracker.replay_rate.admit(blocks, now) {
            throttle(index, metrics, pod, endpoint, tracker, &msg, blocks).await;
            return;
        }
    } else if !tracker.rate.admit(blocks, now) {
        throttle(index, metrics, pod, endpoint, tracker, &msg, blocks).await;
        return;
    }
    let model = model.to_owned();
    let check = if msg.publisher_restarted {
        tracker.restart(msg.seq)
    } else {
        tracker.observe(msg.seq)
    };
    if check == SeqCheck::Reset {
        // A restarted engine's cache starts as empty as its entries: nothing is missing.
        tracker.gap_since = None;
    }
    // A gap's fallback outlives a lost connection: the entries it cleared did not come back
    // with the connection (the batch that made the stream live again is no evidence of them).
    if let Some(gap) = tracker.gap_since
        && Instant::now().saturating_duration_since(gap) < GAP_FALLBACK
        && index.stream(endpoint) == StreamState::Live
    {
        index.set_stream(endpoint, StreamState::Gap { since: gap });
    }
    match check {
        SeqCheck::Duplicate => return,
        SeqCheck::InOrder => {}
        SeqCheck::Reset => {
            tracing::info!(endpoint = %pod.model_server_pod, seq = msg.seq, "kv events: sequence reset, clearing the endpoint");
            index.clear_endpoint_yielding(endpoint).await;
        }
        SeqCheck::Gap { from, missed } => {
            let replayed = source.replay(from).await;
            let filled = match replayed {
                Ok(batches) => {
                    let mut next = from;
                    for mut m in batches.into_iter().take(MAX_REPLAY_BATCHES) {
                        if m.seq < next || m.seq >= msg.seq {
                            continue;
                        }
                        if m.seq != next {
                            break;
                        }
                        // Within the replays' allowance, as the transport's replays are.
                        if !tracker
                            .replay_rate
                            .admit(batch_blocks(&m.batch), Instant::now())
                        {
                            break;
                        }
                        next += 1;
                        let received = m.batch.events.len();
                        read_prefix_groups(metrics, pod, tracker, &mut m);
                        apply(index, metrics, pod, endpoint, tracker, &model, &m, received).await;
                    }
                    next == msg.seq
                }
                Err(error) => {
                    tracing::debug!(endpoint = %pod.model_server_pod, %error, "kv events: replay failed");
                    false
                }
            };
            if !filled {
                tracing::warn!(endpoint = %pod.model_server_pod, from, missed, "kv events: gap not replayed, clearing the endpoint");
                metrics.count_dropped(pod, "gap", missed);
                let now = Instant::now();
                tracker.gap_since = Some(now);
                index.gap_yielding(endpoint, now).await;
            }
        }
    }
    // Counted before the other groups' events are left out: they were received, and are
    // counted dropped (`other_group`).
    let received = msg.batch.events.len();
    read_prefix_groups(metrics, pod, tracker, &mut msg);
    apply(
        index, metrics, pod, endpoint, tracker, &model, &msg, received,
    )
    .await;
}

/// `msg`, of `blocks` blocks, came over the engine's `maxBlocksPerSecond` (or its replays'
/// allowance, or during an episode): it is dropped (counted `rate`), and a live one is charged
/// to the live bucket all the same. The first of an episode clears the endpoint as a gap does,
/// since what the engine says while over its rate is lost; each one keeps its gap's fallback
/// running, so the endpoint is scored from the approximate index until the fallback's length
/// after the last batch dropped. Its number is taken as heard: the batch after the episode is
/// no gap to replay.
async fn throttle(
    index: &SharedKvIndex,
    metrics: &KvEventMetrics,
    pod: &PodLabels,
    endpoint: EndpointId,
    tracker: &mut SequenceTracker,
    msg: &KvMessage,
    blocks: u64,
) {
    let now = Instant::now();
    if !msg.replayed {
        tracker.rate.charge_dropped(blocks, now);
    }
    let n = msg.batch.events.len() as u64;
    // Received and dropped alike, so that received ≥ applied + dropped holds.
    metrics.received.get_or_create(pod).inc_by(n);
    metrics.count_dropped(pod, "rate", n);
    // Its number is recorded as any other's, so that the batch after the episode is no gap;
    // a duplicate's (a reconnection's overlap) is not, and never moves the stream back.
    if msg.publisher_restarted {
        tracker.restart(msg.seq);
    } else {
        tracker.observe(msg.seq);
    }
    tracker.gap_since = Some(now);
    if std::mem::replace(&mut tracker.throttled, true) {
        index.set_stream(endpoint, StreamState::Gap { since: now });
        return;
    }
    if let Some(not_logged) = THROTTLE_LOG.allow() {
        tracing::warn!(
            endpoint = %pod.model_server_pod,
            max_blocks_per_second = tracker.rate.per_second,
            not_logged,
            "kv events: the engine sends more than maxBlocksPerSecond; its batches are \
             dropped, its entries cleared, and it is scored from the approximate index until it \
             has stayed under the rate for a while"
        );
    }
    index.gap_yielding(endpoint, now).await;
}

/// Leaves out of `msg` the events of cache groups the index does not read (a hybrid model's
/// sliding-window or Mamba groups), counted as `other_group`.
fn read_prefix_groups(
    metrics: &KvEventMetrics,
    pod: &PodLabels,
    tracker: &mut SequenceTracker,
    msg: &mut KvMessage,
) {
    let left_out = tracker.groups.retain_prefix_groups(&mut msg.batch.events);
    if left_out > 0 {
        metrics.count_dropped(pod, "other_group", left_out);
    }
}

/// Applies `msg` (its other groups' events already left out) and records it: `received`
/// events as the engine sent them.
#[allow(clippy::too_many_arguments)] // `handle`'s context, passed through
async fn apply(
    index: &SharedKvIndex,
    metrics: &KvEventMetrics,
    pod: &PodLabels,
    endpoint: EndpointId,
    tracker: &mut SequenceTracker,
    model: &str,
    msg: &KvMessage,
    received: usize,
) {
    let batch = &msg.batch;
    // Keys hashed off the lock, written in bounded slices, the worker's other tasks served
    // between two (`SharedKvIndex::apply_yielding`).
    let applied = index
        .apply_yielding(endpoint, model, batch, Instant::now())
        .await;
    if applied.dropped_for(Dropped::BlockSize) > 0 && !tracker.warned_block_size {
        // Said once: the counter says how many since.
        tracker.warned_block_size = true;
        let index_block = index.hasher().block_size();
        let engine_block = batch.events.iter().find_map(|e| match e {
            kv_events::Event::BlockStored(s)
                if s.block_size != 0 && !(s.block_size as usize).is_multiple_of(index_block) =>
            {
                Some(s.block_size)
            }
            _ => None,
        });
        tracing::warn!(
            endpoint = %pod.model_server_pod,
            engine_block_size = engine_block.unwrap_or(0),
            index_block_size = index_block,
            "kv events: the engine's KV block is not a multiple of the index's \
             (tokenProcessorConfig.blockSizeTokens): its stores are dropped \
             (reason=\"block_size\"), so the precise index holds nothing of it; set \
             blockSizeTokens to the engine's block size or a divisor of it"
        );
    }
    // The size gauges move with every batch; refreshing them only on pool changes left them at
    // their start-up value.
    let (blocks, entries) = index.sizes();
    metrics.index_blocks.set(blocks as i64);
    metrics.index_entries.set(entries as i64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics.record(pod, received, &applied, now - batch.ts);
    metrics.record_skipped(pod, &msg.skipped);
}

/// A batch arrived on `endpoint`'s stream: the stream is live, unless it is in a gap (which
/// keeps its own state until it has passed) or the publisher's connection is known to be gone
/// (a batch that was on its way when it went).
fn batch_arrived(index: &SharedKvIndex, endpoint: EndpointId, connected: Option<bool>) {
    if connected != Some(false)
        && matches!(
            index.stream(endpoint),
            StreamState::Unknown | StreamState::Down { .. }
        )
    {
        index.set_stream(endpoint, StreamState::Live);
    }
}

/// `endpoint`'s publisher is no longer connected: its stream is down until its next batch.
fn publisher_gone(index: &SharedKvIndex, endpoint: EndpointId) {
    if matches!(
        index.stream(endpoint),
        StreamState::Live | StreamState::Gap { .. }
    ) {
        index.set_stream(
            endpoint,
            StreamState::Down {
                since: Instant::now(),
            },
        );
    }
}

/// One endpoint's subscriber, until `token` ends it: dial, read, and on failure dial again
/// after [`RECONNECT_INTERVAL`]. The stream is live from its first batch until the engine's
/// connection goes (see the module's documentation).
pub async fn subscribe_endpoint<C: Connector>(
    connector: Arc<C>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    settings: KvEventsSettings,
    endpoint: Arc<Endpoint>,
    pool: String,
    token: CancellationToken,
) {
    let pod = PodLabels {
        name: pool,
        model_server_pod: endpoint.spec.name.clone(),
    };
    let ip = endpoint.ip();
    let rank = u16::try_from(endpoint.spec.rank).unwrap_or(0);
    let address = SocketAddr::new(ip, settings.socket_port.saturating_add(rank));
    let replay = settings
        .replay_port
        .map(|p| format!("tcp://{}", SocketAddr::new(ip, p.saturating_add(rank))));
    let mut tracker = SequenceTracker::new(settings.max_blocks_per_second);
    loop {
        let connected = tokio::select! {
            _ = token.cancelled() => return,
            c = connector.connect(format!("tcp://{address}"), replay.clone(), settings.topic_filter.clone(), false) => c,
        };
        match connected {
            Ok(mut source) => {
                tracker.new_source();
                loop {
                    let event = tokio::select! {
                        // Stopping comes first: a batch queued behind the endpoint's removal must
                        // not bring back its entries and metric series.
                        biased;
                        _ = token.cancelled() => return,
                        e = source.recv() => e,
                    };
                    match event {
                        Ok(SourceEvent::Message(msg)) => {
                            // A topic that names no model feeds nothing: not live on it.
                            if parse_topic(&msg.topic).is_some() {
                                batch_arrived(&index, endpoint.id, source.connected(ip));
                            }
                            handle(
                                &index,
                                &metrics,
                                &pod,
                                endpoint.id,
                                &mut tracker,
                                &mut source,
                                msg,
                            )
                            .await
                        }
                        Ok(SourceEvent::PeersChanged) => {
                            if source.connected(ip) == Some(false) {
                                tracing::debug!(endpoint = %pod.model_server_pod, "kv events: the engine's connection closed");
                                publisher_gone(&index, endpoint.id);
                            }
                        }
                        Err(error) => {
                            tracing::debug!(endpoint = %pod.model_server_pod, %error, "kv events: connection lost");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::debug!(endpoint = %pod.model_server_pod, %error, "kv events: cannot connect");
            }
        }
        index.set_stream(
            endpoint.id,
            StreamState::Down {
                since: Instant::now(),
            },
        );
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
        }
    }
}

/// Whose a subscriber task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Endpoint(EndpointId),
    Bound,
}

/// A running per-endpoint subscriber.
struct Running {
    address: SocketAddr,
    /// Its endpoint's metric labels.
    pod: PodLabels,
    stop: CancellationToken,
    task: tokio::task::Id,
}

/// `fut` after `delay` (none for a first start), unless `token` ends first.
async fn after(delay: Duration, token: CancellationToken, fut: impl Future<Output = ()>) {
    if !delay.is_zero() {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    fut.await
}

/// The subscriber manager, as one supervised task: per-endpoint subscribers following the
/// pool's membership (`discoverPods`), and the bound one (`zmqEndpoint`), until `token` ends.
/// A subscriber that ends on its own (a panic: they return only when stopped) is reaped, its
/// endpoints cleared and marked down, and it is started again after [`RECONNECT_INTERVAL`]. A
/// departed endpoint's series go in either mode. Started again itself (after a panic), it
/// first clears every endpoint and marks its stream unknown.
pub async fn run<C: Connector>(
    connector: Arc<C>,
    datastore: Arc<Datastore>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    settings: KvEventsSettings,
    token: CancellationToken,
) {
    // This task runs again after a panic (the supervisor restarts it) and finds the index as
    // its old subscribers left it, their sequence trackers gone: whatever the engines published
    // in between is lost unseen, and the next sequence number would pass as in order. Every
    // endpoint starts over, cleared and not trusted until its stream is heard again (at the
    // first start there is nothing to clear).
    for e in &datastore.snapshot().endpoints {
        index.set_stream(e.id, StreamState::Unknown);
        index.clear_endpoint_yielding(e.id).await;
    }
    let mut tasks = JoinSet::new();
    let mut owners: HashMap<tokio::task::Id, Owner> = HashMap::new();
    let run_token = token.child_token();
    let spawn_bound = |tasks: &mut JoinSet<()>, delay: Duration| {
        settings.bind_endpoint.clone().map(|bind| {
            tasks
                .spawn(after(
                    delay,
                    run_token.clone(),
                    subscribe_bound(
                        connector.clone(),
                        datastore.clone(),
                        index.clone(),
                        metrics.clone(),
                        settings.clone(),
                        bind,
                        run_token.clone(),
                    ),
                ))
                .id()
        })
    };
    if let Some(id) = spawn_bound(&mut tasks, Duration::ZERO) {
        owners.insert(id, Owner::Bound);
    }
    let mut running: HashMap<EndpointId, Running> = HashMap::new();
    // Subscribers stopped because their endpoint left, with its labels, until reaped: what a
    // batch they were still applying recorded is cleared again then.
    let mut stopped: HashMap<tokio::task::Id, (EndpointId, PodLabels)> = HashMap::new();
    // Endpoints whose subscriber failed: started again after a delay.
    let mut failed: HashSet<EndpointId> = HashSet::new();
    // Every endpoint of the pool, with its labels: its series go when it leaves.
    let mut known: HashMap<EndpointId, (SocketAddr, PodLabels)> = HashMap::new();
    let mut changes = datastore.subscribe();
    loop {
        let snapshot = datastore.snapshot();
        let pool = snapshot.name.clone();
        let present = |id: EndpointId, address: SocketAddr| {
            snapshot
                .endpoints
                .iter()
                .any(|e| e.id == id && e.spec.address == address)
        };
        known.retain(|id, (address, pod)| {
            let present = present(*id, *address);
            if !present {
                metrics.forget(pod);
            }
            present
        });
        for e in &snapshot.endpoints {
            known.entry(e.id).or_insert_with(|| {
                (
                    e.spec.address,
                    PodLabels {
                        name: pool.clone(),
                        model_server_pod: e.spec.name.clone(),
                    },
                )
            });
        }
        failed.retain(|id| known.contains_key(id));
        if settings.per_endpoint {
            running.retain(|id, r| {
                let present = present(*id, r.address);
                if !present {
                    r.stop.cancel();
                    index.remove_endpoint(*id);
                    stopped.insert(r.task, (*id, r.pod.clone()));
                }
                present
            });
            for e in &snapshot.endpoints {
                if running.contains_key(&e.id) {
                    continue;
                }
                let delay = if failed.remove(&e.id) {
                    RECONNECT_INTERVAL
                } else {
                    Duration::ZERO
                };
                let stop = run_token.child_token();
                let task = tasks
                    .spawn(after(
                        delay,
                        stop.clone(),
                        subscribe_endpoint(
                            connector.clone(),
                            index.clone(),
                            metrics.clone(),
                            settings.clone(),
                            e.clone(),
                            pool.clone(),
                            stop.clone(),
                        ),
                    ))
                    .id();
                owners.insert(task, Owner::Endpoint(e.id));
                running.insert(
                    e.id,
                    Running {
                        address: e.spec.address,
                        pod: PodLabels {
                            name: pool.clone(),
                            model_server_pod: e.spec.name.clone(),
                        },
                        stop,
                        task,
                    },
                );
            }
        }
        metrics.refresh(&index);
        let joined = tokio::select! {
            _ = token.cancelled() => break,
            r = changes.changed() => if r.is_err() { break } else { continue },
            Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => joined,
        };
        let (task, error) = match joined {
            Ok((task, ())) => (task, None),
            Err(e) => (e.id(), Some(e)),
        };
        let unexpected = !run_token.is_cancelled();
        if let Some((id, pod)) = stopped.remove(&task) {
            // A departed endpoint's subscriber has ended: whatever it applied or counted
            // between its removal and its end goes too (unless the endpoint came back, moved
            // to a new address, with a subscriber of its own).
            if !running.contains_key(&id) {
                index.remove_endpoint(id);
            }
            if !known.values().any(|(_, p)| *p == pod) {
                metrics.forget(&pod);
            }
        }
        match owners.remove(&task) {
            // Stopped because the endpoint left (or moved): nothing more to do.
            Some(Owner::Endpoint(id)) if running.get(&id).is_some_and(|r| r.task == task) => {
                running.remove(&id);
                if unexpected {
                    tracing::warn!(endpoint = ?id, error = ?error, "kv events: subscriber ended; clearing the endpoint and starting it again");
                    index.set_stream(
                        id,
                        StreamState::Down {
                            since: Instant::now(),
                        },
                    );
                    index.clear_endpoint_yielding(id).await;
                    failed.insert(id);
                }
            }
            Some(Owner::Bound) if unexpected => {
                tracing::warn!(error = ?error, "kv events: bound subscriber ended; clearing its endpoints and starting it again");
                for id in known.keys().filter(|id| !running.contains_key(id)) {
                    index.clear_endpoint_yielding(*id).await;
                    publisher_gone(&index, *id);
                }
                if let Some(id) = spawn_bound(&mut tasks, RECONNECT_INTERVAL) {
                    owners.insert(id, Owner::Bound);
                }
            }
            _ => {}
        }
    }
    run_token.cancel();
    while tasks.join_next().await.is_some() {}
}

/// The bound subscriber: every engine dials it; the topic names the endpoint.
async fn subscribe_bound<C: Connector>(
    connector: Arc<C>,
    datastore: Arc<Datastore>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    settings: KvEventsSettings,
    bind: String,
    token: CancellationToken,
) {
    // Sequence state per endpoint of the pool (bounded by it).
    let mut trackers: HashMap<EndpointId, (SocketAddr, SequenceTracker)> = HashMap::new();
    // The pool the trackers were last pruned against.
    let mut seen_pool: Option<Arc<PoolSnapshot>> = None;
    // The last failure to bind, as said.
    let mut bind_error: Option<String> = None;
    loop {
        let connected = tokio::select! {
            _ = token.cancelled() => return,
            c = connector.connect(bind.clone(), None, settings.topic_filter.clone(), true) => c,
        };
        let mut source = match connected {
            Ok(source) => {
                bind_error = None;
                source
            }
            Err(error) => {
                // Said once, and again when it changes: every engine stays scored from the
                // approximate index meanwhile.
                let said = error.to_string();
                if bind_error.as_deref() != Some(said.as_str()) {
                    tracing::warn!(%bind, error = %said, "kv events: the bound socket cannot listen; retrying every {RECONNECT_INTERVAL:?}");
                    bind_error = Some(said);
                }
                metrics.count_dropped(
                    &PodLabels {
                        name: datastore.snapshot().name.clone(),
                        model_server_pod: "unknown".into(),
                    },
                    "bind",
                    1,
                );
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
                }
                continue;
            }
        };
        loop {
            let event = tokio::select! {
                _ = token.cancelled() => return,
                m = source.recv() => m,
            };
            let msg = match event {
                Ok(SourceEvent::Message(msg)) => msg,
                Ok(SourceEvent::PeersChanged) => {
                    // The engines heard from whose connection is gone (by their IP; one
                    // behind a proxy is never seen by its own and stays live).
                    let snapshot = datastore.snapshot();
                    for e in &snapshot.endpoints {
                        if trackers.contains_key(&e.id) && source.connected(e.ip()) == Some(false) {
                            publisher_gone(&index, e.id);
                        }
                    }
                    continue;
                }
                Err(_) => break,
            };
            let snapshot = datastore.snapshot();
            let endpoint = parse_topic(&msg.topic)
                .and_then(|(pod, _)| pod.parse::<SocketAddr>().ok())
                .and_then(|a| snapshot.by_address(&a).cloned());
            let Some(endpoint) = endpoint else {
                let unknown = PodLabels {
                    name: snapshot.name.clone(),
                    model_server_pod: "unknown".into(),
                };
                metrics.count_dropped(&unknown, "unknown_endpoint", msg.batch.events.len() as u64);
                continue;
            };
            if !seen_pool
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, &snapshot))
            {
                // Forget the departed endpoints' sequences, once per pool change (a
                // lookup per tracker, not a scan of the pool per message).
                trackers.retain(|id, (a, _)| snapshot.by_address(a).is_some_and(|e| e.id == *id));
                seen_pool = Some(snapshot.clone());
            }
            let (_, tracker) = trackers.entry(endpoint.id).or_insert((
                endpoint.spec.address,
                SequenceTracker::new(settings.max_blocks_per_second),
            ));
            // A bound socket hears engines that are up: their stream is live (the topic
            // named its model: the endpoint was found by it).
            batch_arrived(&index, endpoint.id, source.connected(endpoint.ip()));
            let pod = PodLabels {
                name: snapshot.name.clone(),
                model_server_pod: endpoint.spec.name.clone(),
            };
            handle(
                &index,
                &metrics,
                &pod,
                endpoint.id,
                tracker,
                &mut source,
                msg,
            )
            .await;
            // The endpoint left while its batch was applied (a replay, slices of a long
            // batch): what went in after its entries were cleared, and the series
            // counted after they were forgotten, go too.
            let now = datastore.snapshot();
            if now
                .by_address(&endpoint.spec.address)
                .is_none_or(|e| e.id != endpoint.id)
            {
                index.remove_endpoint(endpoint.id);
                if !now
                    .endpoints
                    .iter()
                    .any(|e| e.spec.name == pod.model_server_pod)
                {
                    metrics.forget(&pod);
                }
            }
        }
        // The socket is gone, and every engine's connection with it.
        for id in trackers.keys() {
            publisher_gone(&index, *id);
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
        }
    }
}

/// The ZMQ transport of crate `kv-events`: each source runs one `kv_events::transport::
/// Subscriber` (which reconnects, detects gaps and asks the engine's replay socket itself) and
/// hands its batches over a bounded channel. A gap the transport could not fill shows here as a
/// jump of the sequence number, which [`handle`] turns into a cleared endpoint; a publisher
/// restart it saw comes as [`KvMessage::publisher_restarted`]. Its frame guard tells which
/// engines are connected ([`KvEventSource::connected`]).
/// Every subscriber of the process charges the batches it decoded ahead of the index to one
/// budget of 256 MiB (`ZMQ_QUEUE_BYTES`), each at most `256 MiB / max(4, subscribers)` of it
/// (or one batch; `kv_events::transport::QueueBudget`): a per-endpoint subscriber's share is
/// its engine's whatever topics the engine publishes under, so an engine that floods drops its
/// own batches, not the others'; the bound subscriber's is counted per topic, the only name
/// an engine has there. The unfinished messages its frame guard lets
/// zmq.rs hold to one budget of 128 MiB, 16 MiB per peer IP
/// (`kv_events::transport::UnfinishedBudget`): in pod mode, a subscriber per engine, so
/// neither grows with the number of engines.
#[derive(Debug, Clone)]
pub struct ZmqConnector {
    budget: kv_events::transport::QueueBudget,
    unfinished: kv_events::transport::UnfinishedBudget,
    /// Every subscriber's counters (decode errors, drops, the frame guard's cuts).
    stats: Arc<kv_events::transport::SubscriberStats>,
}

impl Default for ZmqConnector {
    fn default() -> Self {
        Self::counting_into(Arc::default())
    }
}

impl ZmqConnector {
    /// A connector whose subscribers all count into `stats` ([`KvEventMetrics::transport`],
    /// which exports them): a payload that never decodes reaches no handler, so the
    /// transport's count is all there is of it.
    pub fn counting_into(stats: Arc<kv_events::transport::SubscriberStats>) -> Self {
        Self {
            budget: kv_events::transport::QueueBudget::new(ZMQ_QUEUE_BYTES),
            unfinished: kv_events::transport::UnfinishedBudget::default(),
            stats,
        }
    }
}

/// Lines a second about engines going over and back under `maxBlocksPerSecond`, over all
/// engines: a fleet of engines near their rate would otherwise fill the log.
static THROTTLE_LOG: LogBudget = LogBudget::new(5);

/// Batches a subscriber may have decoded ahead of the index (the transport counts what a full
/// channel drops as missed).
const ZMQ_CHANNEL: usize = 1024;

/// Bytes of decoded batches (and their payloads) all subscribers together may hold ahead of
/// the index: 256 MiB, beside an index of at most some 1.9 GiB at its default size, within the
/// pod's 4 GiB. Past it batches are dropped as missed, and their engines' entries cleared.
const ZMQ_QUEUE_BYTES: usize = 256 << 20;

/// A running `kv-events` subscriber.
#[derive(Debug)]
pub struct ZmqSource {
    rx: tokio::sync::mpsc::Receiver<kv_events::transport::ReceivedBatch>,
    peers: tokio::sync::watch::Receiver<kv_events::transport::Peers>,
    /// Whether `peers` still has a sender (the subscriber runs).
    peers_open: bool,
    /// The last event returned was a peer change: a batch waiting goes first now.
    peers_served: bool,
    stop: CancellationToken,
}

/// A subscriber's next batch (`Some`) or a change of its peers (`None`). Peer changes go
/// first, but never twice in a row over a batch that waits: connections opened and closed
/// faster than a change is handled would otherwise starve the batches (the channel fills, and
/// every engine misses some).
async fn next_batch_or_peer_change<T, P>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    peers: &mut tokio::sync::watch::Receiver<P>,
    peers_open: &mut bool,
    peers_served: &mut bool,
) -> Result<Option<T>, SourceError> {
    if std::mem::take(peers_served)
        && let Ok(b) = rx.try_recv()
    {
        return Ok(Some(b));
    }
    loop {
        tokio::select! {
            biased;
            changed = peers.changed(), if *peers_open => match changed {
                Ok(()) => {
                    *peers_served = true;
                    return Ok(None);
                }
                // The subscriber ended: its channel closes too.
                Err(_) => *peers_open = false,
            },
            b = rx.recv() => {
                let b = b.ok_or_else(|| SourceError::Connection("subscriber ended".into()))?;
                return Ok(Some(b));
            }
        }
    }
}

fn message_of(b: kv_events::transport::ReceivedBatch) -> SourceEvent {
    SourceEvent::Message(KvMessage {
        topic: b.topic.to_string(),
        seq: b.seq,
        batch: b.batch,
        publisher_restarted: b.publisher_restarted,
        replayed: b.replayed,
        skipped: b.skipped,
    })
}

impl Drop for ZmqSource {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl KvEventSource for ZmqSource {
    async fn recv(&mut self) -> Result<SourceEvent, SourceError> {
        let next = next_batch_or_peer_change(
            &mut self.rx,
            &mut self.peers,
            &mut self.peers_open,
            &mut self.peers_served,
        )
        .await?;
        Ok(next.map_or(SourceEvent::PeersChanged, message_of))
    }

    fn connected(&self, ip: IpAddr) -> Option<bool> {
        self.peers.borrow().connected(ip)
    }

    async fn replay(&mut self, _from: u64) -> Result<Vec<KvMessage>, SourceError> {
        // The transport already replayed what the engine still had.
        Err(SourceError::Replay("not replayed by the transport".into()))
    }
}

impl Connector for ZmqConnector {
    type Source = ZmqSource;

    /// Starts a subscriber. Dialing cannot fail here (zmq.rs dials in the background, again
    /// and again): the stream is not live until a batch comes.
    async fn connect(
        &self,
        endpoint: String,
        replay: Option<String>,
        topic_filter: String,
        bind: bool,
    ) -> Result<ZmqSource, SourceError> {
        use kv_events::transport::{Subscriber, SubscriberConfig};
        let config = SubscriberConfig {
            topic_filter,
            replay_history: replay.is_some(),
            replay_endpoint: replay,
            ..if bind {
                SubscriberConfig::bind(endpoint)
            } else {
                SubscriberConfig::connect(endpoint)
            }
        };
        let subscriber = if bind {
            Subscriber::bind_with_stats(config, self.stats.clone())
                .await
                .map_err(|e| SourceError::Connection(e.to_string()))?
        } else {
            Subscriber::with_stats(config, self.stats.clone())
        };
        let subscriber = subscriber
            .with_queue_budget(self.budget.clone())
            .with_unfinished_budget(self.unfinished.clone());
        let peers = subscriber.peers();
        let (tx, rx) = tokio::sync::mpsc::channel(ZMQ_CHANNEL);
        let stop = CancellationToken::new();
        let run = subscriber.run(tx, stop.clone());
        tokio::spawn(async move {
            if let Err(error) = run.await {
                tracing::warn!(%error, "KV-event subscriber ended");
            }
        });
        Ok(ZmqSource {
            rx,
            peers,
            peers_open: true,
            peers_served: false,
            stop,
        })
    }
}

#[cfg(test)]
mod tests;
