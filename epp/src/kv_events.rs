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
//! while. A jump backwards is a restarted engine: its entries are cleared too.
//!
//! The transport is behind [`Connector`] so that this logic is tested without sockets; the
//! ZMQ implementation (crate `kv-events`, feature `zmq`) plugs in there.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::datastore::{Datastore, Endpoint, EndpointId};
use endpoint_picker::kv_index::{Applied, SharedKvIndex, StreamState};
use endpoint_picker::scheduling::plugins::precise::KvEventsSettings;
use kv_events::EventBatch;
use prometheus_client::encoding::EncodeLabelSet;
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
    /// The next message.
    fn recv(&mut self) -> impl Future<Output = Result<KvMessage, SourceError>> + Send;
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
    /// Why: `unknown_parent`, `no_full_block`, `unknown_blocks`, `bad_topic`,
    /// `unknown_endpoint`, `gap`.
    pub reason: &'static str,
}

/// The KV-event metrics. Labels are bounded by the pool's endpoints; a departed endpoint's
/// series go with it.
#[derive(Debug, Clone, Default)]
pub struct KvEventMetrics {
    /// `inference_extension_kv_events_received_total`: events received.
    pub received: Family<PodLabels, Counter>,
    /// `inference_extension_kv_events_applied_total`: events that changed the index.
    pub applied: Family<PodLabels, Counter>,
    /// `inference_extension_kv_events_dropped_total`: events (or, for `gap`, batches) lost.
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
            "KV-cache events dropped, by reason (gap: batches lost and not replayed)",
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
    }

    /// Records one applied batch.
    pub fn record(&self, pod: &PodLabels, received: usize, applied: &Applied, lag: f64) {
        self.received.get_or_create(pod).inc_by(received as u64);
        self.applied
            .get_or_create(pod)
            .inc_by(u64::from(applied.applied));
        for (reason, n) in ["unknown_parent", "no_full_block", "unknown_blocks"]
            .into_iter()
            .zip(applied.dropped)
        {
            if n > 0 {
                self.count_dropped(pod, reason, u64::from(n));
            }
        }
        if lag.is_finite() {
            self.lag.get_or_create(pod).set(lag.max(0.0));
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
        for reason in [
            "unknown_parent",
            "no_full_block",
            "unknown_blocks",
            "bad_topic",
            "gap",
        ] {
            self.dropped.remove(&DropLabels {
                name: pod.name.clone(),
                model_server_pod: pod.model_server_pod.clone(),
                reason,
            });
        }
    }

    /// Refreshes the index gauges.
    pub fn refresh(&self, index: &SharedKvIndex) {
        let (blocks, entries) = index.write(|i| (i.len(), i.entries()));
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

/// One publisher's sequence numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SequenceTracker {
    last: Option<u64>,
}

impl SequenceTracker {
    /// Checks `seq` and, unless it is a duplicate, records it.
    pub fn observe(&mut self, seq: u64) -> SeqCheck {
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

/// Applies one message of `endpoint`'s stream: sequence check (replaying or clearing on a
/// gap, clearing on a reset), then the batch, then the metrics.
pub async fn handle<S: KvEventSource>(
    index: &SharedKvIndex,
    metrics: &KvEventMetrics,
    pod: &PodLabels,
    endpoint: EndpointId,
    tracker: &mut SequenceTracker,
    source: &mut S,
    msg: KvMessage,
) {
    let Some((_, model)) = parse_topic(&msg.topic) else {
        metrics.count_dropped(pod, "bad_topic", msg.batch.events.len() as u64);
        return;
    };
    let model = model.to_owned();
    match tracker.observe(msg.seq) {
        SeqCheck::Duplicate => return,
        SeqCheck::InOrder => {}
        SeqCheck::Reset => {
            tracing::info!(endpoint = %pod.model_server_pod, seq = msg.seq, "kv events: sequence reset, clearing the endpoint");
            index.clear_endpoint(endpoint);
        }
        SeqCheck::Gap { from, missed } => {
            let replayed = source.replay(from).await;
            let filled = match replayed {
                Ok(batches) => {
                    let mut next = from;
                    for m in batches.into_iter().take(MAX_REPLAY_BATCHES) {
                        if m.seq < next || m.seq >= msg.seq {
                            continue;
                        }
                        if m.seq != next {
                            break;
                        }
                        next += 1;
                        apply(index, metrics, pod, endpoint, &model, &m.batch);
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
                index.gap(endpoint, Instant::now());
            }
        }
    }
    apply(index, metrics, pod, endpoint, &model, &msg.batch);
}

fn apply(
    index: &SharedKvIndex,
    metrics: &KvEventMetrics,
    pod: &PodLabels,
    endpoint: EndpointId,
    model: &str,
    batch: &EventBatch,
) {
    // The size gauges move with every batch (read under the same lock: both are counters the
    // index keeps); refreshing them only on pool changes left them at their start-up value.
    let (applied, blocks, entries) = index.write(|i| {
        let applied = i.apply(endpoint, model, batch, Instant::now());
        (applied, i.len(), i.entries())
    });
    metrics.index_blocks.set(blocks as i64);
    metrics.index_entries.set(entries as i64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics.record(pod, batch.events.len(), &applied, now - batch.ts);
}

/// One endpoint's subscriber, until `token` ends it: dial, read, and on failure dial again
/// after [`RECONNECT_INTERVAL`].
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
    let mut tracker = SequenceTracker::default();
    loop {
        let connected = tokio::select! {
            _ = token.cancelled() => return,
            c = connector.connect(format!("tcp://{address}"), replay.clone(), settings.topic_filter.clone(), false) => c,
        };
        match connected {
            Ok(mut source) => {
                index.set_stream(endpoint.id, StreamState::Live);
                loop {
                    let msg = tokio::select! {
                        _ = token.cancelled() => return,
                        m = source.recv() => m,
                    };
                    match msg {
                        Ok(msg) => {
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

/// The subscriber manager, as one supervised task: per-endpoint subscribers following the
/// pool's membership (`discoverPods`), and the bound one (`zmqEndpoint`), until `token` ends.
pub async fn run<C: Connector>(
    connector: Arc<C>,
    datastore: Arc<Datastore>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    settings: KvEventsSettings,
    token: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    let run_token = token.child_token();
    if let Some(bind) = settings.bind_endpoint.clone() {
        tasks.spawn(subscribe_bound(
            connector.clone(),
            datastore.clone(),
            index.clone(),
            metrics.clone(),
            settings.clone(),
            bind,
            run_token.clone(),
        ));
    }
    let mut running: HashMap<EndpointId, (SocketAddr, CancellationToken, PodLabels)> =
        HashMap::new();
    let mut changes = datastore.subscribe();
    loop {
        if settings.per_endpoint {
            let snapshot = datastore.snapshot();
            let pool = snapshot.name.clone();
            running.retain(|id, (address, stop, pod)| {
                let live = snapshot
                    .endpoints
                    .iter()
                    .any(|e| e.id == *id && e.spec.address == *address);
                if !live {
                    stop.cancel();
                    index.remove_endpoint(*id);
                    metrics.forget(pod);
                }
                live
            });
            for e in &snapshot.endpoints {
                if running.contains_key(&e.id) {
                    continue;
                }
                let stop = run_token.child_token();
                let pod = PodLabels {
                    name: pool.clone(),
                    model_server_pod: e.spec.name.clone(),
                };
                running.insert(e.id, (e.spec.address, stop.clone(), pod));
                tasks.spawn(subscribe_endpoint(
                    connector.clone(),
                    index.clone(),
                    metrics.clone(),
                    settings.clone(),
                    e.clone(),
                    pool.clone(),
                    stop,
                ));
            }
        }
        metrics.refresh(&index);
        tokio::select! {
            _ = token.cancelled() => break,
            r = changes.changed() => if r.is_err() { break },
            // Reap finished subscribers so the set does not grow with churn.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
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
    loop {
        let connected = tokio::select! {
            _ = token.cancelled() => return,
            c = connector.connect(bind.clone(), None, settings.topic_filter.clone(), true) => c,
        };
        if let Ok(mut source) = connected {
            loop {
                let msg = tokio::select! {
                    _ = token.cancelled() => return,
                    m = source.recv() => m,
                };
                let Ok(msg) = msg else { break };
                let snapshot = datastore.snapshot();
                let endpoint = parse_topic(&msg.topic)
                    .and_then(|(pod, _)| pod.parse::<SocketAddr>().ok())
                    .and_then(|a| snapshot.by_address(&a).cloned());
                let Some(endpoint) = endpoint else {
                    let unknown = PodLabels {
                        name: snapshot.name.clone(),
                        model_server_pod: "unknown".into(),
                    };
                    metrics.count_dropped(
                        &unknown,
                        "unknown_endpoint",
                        msg.batch.events.len() as u64,
                    );
                    continue;
                };
                trackers.retain(|id, (a, _)| {
                    snapshot
                        .endpoints
                        .iter()
                        .any(|e| e.id == *id && e.spec.address == *a)
                });
                let (_, tracker) = trackers
                    .entry(endpoint.id)
                    .or_insert((endpoint.spec.address, SequenceTracker::default()));
                // A bound socket hears engines that are up: their stream is live (a gap keeps
                // its own state until it has passed).
                if matches!(
                    index.stream(endpoint.id),
                    StreamState::Unknown | StreamState::Down { .. }
                ) {
                    index.set_stream(endpoint.id, StreamState::Live);
                }
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
            }
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
/// jump of the sequence number, which [`handle`] turns into a cleared endpoint.
#[derive(Debug, Default)]
pub struct ZmqConnector;

/// Batches a subscriber may have decoded ahead of the index (the transport counts what a full
/// channel drops as missed).
const ZMQ_CHANNEL: usize = 1024;

/// A running `kv-events` subscriber.
#[derive(Debug)]
pub struct ZmqSource {
    rx: tokio::sync::mpsc::Receiver<kv_events::transport::ReceivedBatch>,
    stop: CancellationToken,
}

impl Drop for ZmqSource {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl KvEventSource for ZmqSource {
    async fn recv(&mut self) -> Result<KvMessage, SourceError> {
        let b = self
            .rx
            .recv()
            .await
            .ok_or_else(|| SourceError::Connection("subscriber ended".into()))?;
        Ok(KvMessage {
            topic: b.topic.to_string(),
            seq: b.seq,
            batch: b.batch,
        })
    }

    async fn replay(&mut self, _from: u64) -> Result<Vec<KvMessage>, SourceError> {
        // The transport already replayed what the engine still had.
        Err(SourceError::Replay("not replayed by the transport".into()))
    }
}

impl Connector for ZmqConnector {
    type Source = ZmqSource;

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
            Subscriber::bind(config)
                .await
                .map_err(|e| SourceError::Connection(e.to_string()))?
        } else {
            Subscriber::new(config)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(ZMQ_CHANNEL);
        let stop = CancellationToken::new();
        let run = subscriber.run(tx, stop.clone());
        tokio::spawn(async move {
            if let Err(error) = run.await {
                tracing::warn!(%error, "KV-event subscriber ended");
            }
        });
        Ok(ZmqSource { rx, stop })
    }
}

#[cfg(test)]
mod tests;
