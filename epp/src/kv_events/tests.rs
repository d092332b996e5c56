//! The subscribers against an in-memory transport: membership, gaps, replay, removal,
//! liveness, restarts, failures.

use std::collections::{HashMap, VecDeque};

use endpoint_picker::datastore::PoolSpec;
use endpoint_picker::kv_index::{
    HashAlgorithm, IndexLimits, KeyHasher, Lookup, SharedMedia, TierWeights,
};
use kv_events::{BlockStored, Event, Medium};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use std::net::IpAddr;

use super::*;
use crate::test_support::spec;

/// Which publishers a fake source has connected, by IP (absent: never seen).
type Connections = Arc<Mutex<HashMap<IpAddr, bool>>>;

struct FakeSource {
    rx: mpsc::UnboundedReceiver<SourceEvent>,
    /// Signalled at each `recv`: the previous message has been handled.
    polled: mpsc::UnboundedSender<()>,
    replay: Vec<KvMessage>,
    connections: Connections,
}

/// A message on this topic makes the subscriber panic (a bug in it, as far as the manager can
/// tell).
const PANIC_TOPIC: &str = "panic";

impl KvEventSource for FakeSource {
    async fn recv(&mut self) -> Result<SourceEvent, SourceError> {
        let _ = self.polled.send(());
        let event = self
            .rx
            .recv()
            .await
            .ok_or_else(|| SourceError::Connection("closed".into()))?;
        if let SourceEvent::Message(m) = &event {
            assert_ne!(m.topic, PANIC_TOPIC, "a subscriber bug");
        }
        Ok(event)
    }

    fn connected(&self, ip: IpAddr) -> Option<bool> {
        self.connections.lock().get(&ip).copied()
    }

    async fn replay(&mut self, from: u64) -> Result<Vec<KvMessage>, SourceError> {
        Ok(self
            .replay
            .iter()
            .filter(|m| m.seq >= from)
            .cloned()
            .collect())
    }
}

#[derive(Default)]
struct FakeConnector {
    /// Per endpoint, the sources its next connections get, in order.
    sources: Mutex<HashMap<String, VecDeque<FakeSource>>>,
}

impl Connector for FakeConnector {
    type Source = FakeSource;

    async fn connect(
        &self,
        endpoint: String,
        _replay: Option<String>,
        _topic_filter: String,
        _bind: bool,
    ) -> Result<FakeSource, SourceError> {
        self.sources
            .lock()
            .get_mut(&endpoint)
            .and_then(VecDeque::pop_front)
            .ok_or_else(|| SourceError::Connection(format!("refused: {endpoint}")))
    }
}

struct Wire {
    tx: mpsc::UnboundedSender<SourceEvent>,
    polled: mpsc::UnboundedReceiver<()>,
    connections: Connections,
}

impl Wire {
    /// Sends a message and waits until it has been handled.
    async fn send(&mut self, msg: KvMessage) {
        self.tx.send(SourceEvent::Message(msg)).unwrap();
        self.polled.recv().await.unwrap();
    }

    /// The publisher at `ip` connects or goes; waits until the subscriber has seen it.
    async fn set_connected(&mut self, ip: [u8; 4], connected: bool) {
        self.connections.lock().insert(IpAddr::from(ip), connected);
        self.tx.send(SourceEvent::PeersChanged).unwrap();
        self.polled.recv().await.unwrap();
    }
}

/// Queues a source for the next connection to `address` (`tcp://` added unless it has a
/// scheme).
fn plug(connector: &FakeConnector, address: &str, replay: Vec<KvMessage>) -> Wire {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ptx, prx) = mpsc::unbounded_channel();
    let connections = Connections::default();
    let endpoint = if address.contains("://") {
        address.to_owned()
    } else {
        format!("tcp://{address}")
    };
    connector
        .sources
        .lock()
        .entry(endpoint)
        .or_default()
        .push_back(FakeSource {
            rx,
            polled: ptx,
            replay,
            connections: connections.clone(),
        });
    Wire {
        tx,
        polled: prx,
        connections,
    }
}

fn pool(ids: &[u8]) -> PoolSpec {
    PoolSpec {
        name: "pool".into(),
        namespace: "ns".into(),
        app_protocol: "http".into(),
        endpoints: ids.iter().map(|&i| spec(i)).collect(),
    }
}

const BS: usize = 4;

fn tokens(seq: u32) -> Vec<u32> {
    (0..2 * BS as u32).map(|t| seq * 100 + t).collect()
}

fn message(seq: u64, content: u32) -> KvMessage {
    KvMessage {
        topic: "kv@127.0.0.1:8000@m".into(),
        seq,
        batch: EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: vec![u64::from(content) * 10, u64::from(content) * 10 + 1],
                parent_block_hash: None,
                token_ids: tokens(content),
                block_size: BS as u32,
                lora_id: None,
                lora_name: None,
                medium: Medium::Gpu,
                group: None,
            })],
            data_parallel_rank: None,
        },
        publisher_restarted: false,
        replayed: false,
        skipped: Skipped::default(),
    }
}

fn held(index: &SharedKvIndex, id: EndpointId, content: u32) -> u32 {
    let keys = index
        .hasher()
        .prompt_keys("m", None, &tokens(content), usize::MAX);
    let mut out = Lookup::default();
    index.read(Instant::now(), |i| {
        i.lookup(
            &keys,
            [id],
            &TierWeights::default(),
            SharedMedia::default(),
            |_| true,
            &mut out,
        )
    });
    out.of(id).blocks
}

#[test]
fn sequence_numbers_tell_gaps_duplicates_and_resets() {
    let mut t = SequenceTracker::default();
    assert_eq!(t.observe(5), SeqCheck::InOrder);
    assert_eq!(t.observe(6), SeqCheck::InOrder);
    assert_eq!(t.observe(6), SeqCheck::Duplicate);
    assert_eq!(t.observe(9), SeqCheck::Gap { from: 7, missed: 2 });
    assert_eq!(t.observe(0), SeqCheck::Reset);
    assert_eq!(t.observe(1), SeqCheck::InOrder);
    // Review: through a new source (a reconnection), a number at or below the last is a
    // restarted publisher's, not a duplicate; only the first number is read so.
    assert_eq!(
        t.observe(20),
        SeqCheck::Gap {
            from: 2,
            missed: 18
        }
    );
    t.new_source();
    assert_eq!(t.observe(3), SeqCheck::Reset);
    assert_eq!(t.observe(4), SeqCheck::InOrder);
    assert_eq!(t.observe(4), SeqCheck::Duplicate);
    t.new_source();
    assert_eq!(
        t.observe(5),
        SeqCheck::InOrder,
        "the same publisher, going on"
    );
}

#[test]
fn topics_name_the_endpoint_and_the_model() {
    assert_eq!(
        parse_topic("kv@10.0.0.1:8000@Qwen/Qwen3"),
        Some(("10.0.0.1:8000", "Qwen/Qwen3"))
    );
    assert_eq!(parse_topic("kv@a@m@x"), Some(("a", "m@x")));
    assert_eq!(parse_topic("kv"), None);
}

#[tokio::test(start_paused = true)]
async fn subscribers_follow_the_pool_and_feed_the_index() {
    let connector = Arc::new(FakeConnector::default());
    // Endpoint 1 publishes; endpoint 2 refuses connections. Endpoint 1's replay buffer holds
    // batch 1 but not batch 2.
    let mut wire = plug(&connector, "127.0.0.1:5557", vec![message(1, 2)]);
    let datastore = Arc::new(Datastore::new());
    let snap = datastore.apply(pool(&[1, 2]));
    let (e1, e2) = (snap.endpoints[0].id, snap.endpoints[1].id);
    let index = Arc::new(SharedKvIndex::new(
        KeyHasher::new(BS, "", HashAlgorithm::CborFnv),
        IndexLimits::default(),
    ));
    let metrics = Arc::new(KvEventMetrics::default());
    let token = CancellationToken::new();
    let manager = spawn_manager_counting(&connector, &datastore, &index, &metrics, &token);
    wire.polled.recv().await.unwrap();
    // Connected is not live: nothing has come yet.
    assert_eq!(index.stream(e1), StreamState::Unknown);

    wire.send(message(0, 1)).await;
    assert_eq!(index.stream(e1), StreamState::Live);
    assert_eq!(held(&index, e1, 1), 2);
    let pod = PodLabels {
        name: "pool".into(),
        model_server_pod: "pod-1".into(),
    };
    assert_eq!(metrics.applied.get_or_create(&pod).get(), 1);

    // Batch 1 is lost on the way and replayed.
    wire.send(message(2, 3)).await;
    assert_eq!((held(&index, e1, 2), held(&index, e1, 3)), (2, 2));
    assert_eq!(index.stream(e1), StreamState::Live);

    // Batches 3 and 4 are lost for good: the endpoint is cleared and falls back for a while.
    wire.send(message(5, 4)).await;
    assert_eq!((held(&index, e1, 1), held(&index, e1, 4)), (0, 2));
    assert!(matches!(index.stream(e1), StreamState::Gap { .. }));
    let gap = DropLabels {
        name: "pool".into(),
        model_server_pod: "pod-1".into(),
        reason: "gap",
    };
    assert_eq!(metrics.dropped.get_or_create(&gap).get(), 2);

    // Endpoint 2 never connected.
    assert!(matches!(index.stream(e2), StreamState::Down { .. }));

    // Endpoint 1 leaves the pool: its subscriber stops and its entries go.
    datastore.apply(pool(&[2]));
    // Its source is dropped once the manager has stopped it (after clearing its entries).
    assert!(wire.polled.recv().await.is_none());
    assert_eq!(held(&index, e1, 4), 0);
    assert_eq!(index.stream(e1), StreamState::Unknown);

    token.cancel();
    manager.await.unwrap();
}

fn new_index() -> Arc<SharedKvIndex> {
    Arc::new(SharedKvIndex::new(
        KeyHasher::new(BS, "", HashAlgorithm::CborFnv),
        IndexLimits::default(),
    ))
}

/// Yields until `f` holds: on the tests' one-thread runtime the other tasks run in between,
/// so this waits for them to get there without relying on time.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if f() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never: {what}");
}

fn pod(i: u8) -> PodLabels {
    PodLabels {
        name: "pool".into(),
        model_server_pod: format!("pod-{i}"),
    }
}

/// The per-endpoint subscriber manager with default settings, until `token`.
fn spawn_manager(
    connector: &Arc<FakeConnector>,
    datastore: &Arc<Datastore>,
    index: &Arc<SharedKvIndex>,
    token: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_manager_counting(connector, datastore, index, &Arc::default(), token)
}

/// [`spawn_manager`], counting into `metrics`.
fn spawn_manager_counting(
    connector: &Arc<FakeConnector>,
    datastore: &Arc<Datastore>,
    index: &Arc<SharedKvIndex>,
    metrics: &Arc<KvEventMetrics>,
    token: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_manager_with(
        connector,
        datastore,
        index,
        metrics,
        token,
        KvEventsSettings::default(),
    )
}

fn spawn_manager_with(
    connector: &Arc<FakeConnector>,
    datastore: &Arc<Datastore>,
    index: &Arc<SharedKvIndex>,
    metrics: &Arc<KvEventMetrics>,
    token: &CancellationToken,
    settings: KvEventsSettings,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(
        connector.clone(),
        datastore.clone(),
        index.clone(),
        metrics.clone(),
        settings,
        token.clone(),
    ))
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_live_from_its_first_batch_until_its_engine_goes() {
    let connector = Arc::new(FakeConnector::default());
    let mut wire = plug(&connector, "127.0.0.1:5557", vec![]);
    let datastore = Arc::new(Datastore::new());
    let e1 = datastore.apply(pool(&[1])).endpoints[0].id;
    let index = new_index();
    let token = CancellationToken::new();
    let manager = spawn_manager(&connector, &datastore, &index, &token);
    // Dialing an engine that never answers (or answers nothing) is not live, however long.
    wire.polled.recv().await.unwrap();
    wire.set_connected([127, 0, 0, 1], true).await;
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(index.stream(e1), StreamState::Unknown);

    wire.send(message(0, 1)).await;
    assert_eq!(index.stream(e1), StreamState::Live);
    // An idle engine sends nothing and stays live: no silence timeout.
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(index.stream(e1), StreamState::Live);

    // Its connection closes: down (the precise scorer falls back), entries kept.
    wire.set_connected([127, 0, 0, 1], false).await;
    assert!(matches!(index.stream(e1), StreamState::Down { .. }));
    assert_eq!(held(&index, e1, 1), 2);
    // A batch that was on its way does not make it live again.
    wire.send(message(1, 2)).await;
    assert!(matches!(index.stream(e1), StreamState::Down { .. }));

    // Back, and its next batch makes it live.
    wire.set_connected([127, 0, 0, 1], true).await;
    assert!(matches!(index.stream(e1), StreamState::Down { .. }));
    wire.send(message(2, 3)).await;
    assert_eq!(index.stream(e1), StreamState::Live);

    token.cancel();
    manager.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_restarted_publisher_clears_its_endpoint() {
    let connector = Arc::new(FakeConnector::default());
    let mut wire = plug(&connector, "127.0.0.1:5557", vec![]);
    let datastore = Arc::new(Datastore::new());
    let e1 = datastore.apply(pool(&[1])).endpoints[0].id;
    let index = new_index();
    let token = CancellationToken::new();
    let manager = spawn_manager(&connector, &datastore, &index, &token);
    wire.polled.recv().await.unwrap();
    for seq in 0..6 {
        wire.send(message(seq, 1)).await;
    }
    assert_eq!(held(&index, e1, 1), 2);
    // The engine restarted and its third batch is the first to arrive: by the numbers alone
    // it is an old duplicate (5 - 3 is no big drop), but the transport saw the sequence go
    // back.
    let mut t = SequenceTracker::default();
    t.observe(5);
    assert_eq!(t.observe(3), SeqCheck::Duplicate);
    let mut restarted = message(3, 2);
    restarted.publisher_restarted = true;
    wire.send(restarted).await;
    assert_eq!((held(&index, e1, 1), held(&index, e1, 2)), (0, 2));
    // And the new sequence goes on from there.
    wire.send(message(4, 3)).await;
    assert_eq!(held(&index, e1, 3), 2);
    assert_eq!(index.stream(e1), StreamState::Live);

    token.cancel();
    manager.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panicked_subscriber_is_reaped_its_endpoint_cleared_and_started_again() {
    let connector = Arc::new(FakeConnector::default());
    let mut first = plug(&connector, "127.0.0.1:5557", vec![]);
    let mut second = plug(&connector, "127.0.0.1:5557", vec![]);
    let datastore = Arc::new(Datastore::new());
    let e1 = datastore.apply(pool(&[1])).endpoints[0].id;
    let index = new_index();
    let token = CancellationToken::new();
    let manager = spawn_manager(&connector, &datastore, &index, &token);
    first.polled.recv().await.unwrap();
    first.send(message(0, 1)).await;
    assert_eq!(
        (index.stream(e1), held(&index, e1, 1)),
        (StreamState::Live, 2)
    );

    let mut bug = message(1, 2);
    bug.topic = PANIC_TOPIC.into();
    first.tx.send(SourceEvent::Message(bug)).unwrap();
    // The manager reaps it: the endpoint is cleared and down...
    until("the endpoint is down", || {
        matches!(index.stream(e1), StreamState::Down { .. })
    })
    .await;
    assert_eq!(held(&index, e1, 1), 0);
    // ...and a new subscriber dials after the reconnect interval, not at once.
    let reaped = Instant::now();
    second.polled.recv().await.unwrap();
    assert!(Instant::now() - reaped >= RECONNECT_INTERVAL);
    second.send(message(0, 3)).await;
    assert_eq!(
        (index.stream(e1), held(&index, e1, 3)),
        (StreamState::Live, 2)
    );

    token.cancel();
    manager.await.unwrap();
}

/// Review (M8): the manager started again (after a panic) had fresh sequence trackers and
/// left every stream live, so what was published while it was down passed unseen. It now
/// starts by clearing every endpoint and marking it unknown, trusted again once heard.
#[tokio::test(start_paused = true)]
async fn a_restarted_manager_trusts_no_endpoint_until_it_is_heard_again() {
    let connector = Arc::new(FakeConnector::default());
    let mut first = plug(&connector, "127.0.0.1:5557", vec![]);
    let mut second = plug(&connector, "127.0.0.1:5557", vec![]);
    let datastore = Arc::new(Datastore::new());
    let e1 = datastore.apply(pool(&[1])).endpoints[0].id;
    let index = new_index();
    let token = CancellationToken::new();
    let manager = spawn_manager(&connector, &datastore, &index, &token);
    first.polled.recv().await.unwrap();
    first.send(message(0, 1)).await;
    assert_eq!(
        (index.stream(e1), held(&index, e1, 1)),
        (StreamState::Live, 2)
    );
    // The manager ends (as a panic would end it) and the supervisor starts it again.
    manager.abort();
    assert!(manager.await.unwrap_err().is_cancelled());
    let again = spawn_manager(&connector, &datastore, &index, &token);
    second.polled.recv().await.unwrap();
    assert_eq!(index.stream(e1), StreamState::Unknown);
    assert_eq!(held(&index, e1, 1), 0, "cleared before anything is heard");
    // Heard again: live, from what it says now.
    second.send(message(5, 3)).await;
    assert_eq!(
        (index.stream(e1), held(&index, e1, 3)),
        (StreamState::Live, 2)
    );
    token.cancel();
    again.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_bound_subscriber_follows_its_engines_and_forgets_departed_series() {
    let connector = Arc::new(FakeConnector::default());
    let mut wire = plug(&connector, "tcp://*:5557", vec![]);
    let datastore = Arc::new(Datastore::new());
    let snap = datastore.apply(pool(&[1, 2]));
    let (e1, e2) = (snap.endpoints[0].id, snap.endpoints[1].id);
    let index = new_index();
    let metrics = Arc::new(KvEventMetrics::default());
    let token = CancellationToken::new();
    let manager = tokio::spawn(run(
        connector.clone(),
        datastore.clone(),
        index.clone(),
        metrics.clone(),
        KvEventsSettings {
            bind_endpoint: Some("tcp://*:5557".into()),
            per_endpoint: false,
            ..KvEventsSettings::default()
        },
        token.clone(),
    ));
    wire.polled.recv().await.unwrap();
    let mut from_2 = message(0, 2);
    from_2.topic = "kv@127.0.0.2:8000@m".into();
    wire.set_connected([127, 0, 0, 1], true).await;
    wire.set_connected([127, 0, 0, 2], true).await;
    wire.send(message(0, 1)).await;
    wire.send(from_2).await;
    assert_eq!(
        (index.stream(e1), index.stream(e2)),
        (StreamState::Live, StreamState::Live)
    );
    assert_eq!(metrics.received.get(&pod(1)).map(|c| c.get()), Some(1));

    // Engine 2's connection goes: its stream is down, engine 1's stays live.
    wire.set_connected([127, 0, 0, 2], false).await;
    assert!(matches!(index.stream(e2), StreamState::Down { .. }));
    assert_eq!(index.stream(e1), StreamState::Live);

    // Endpoint 1 leaves the pool: its series go, though no subscriber of its own ran.
    metrics.count_dropped(&pod(1), "gap", 1);
    datastore.apply(pool(&[2]));
    until("endpoint 1's series are gone", || {
        metrics.received.get(&pod(1)).is_none()
    })
    .await;
    assert!(metrics.applied.get(&pod(1)).is_none());
    assert!(metrics.lag.get(&pod(1)).is_none());
    let gap = DropLabels {
        name: "pool".into(),
        model_server_pod: "pod-1".into(),
        reason: "gap",
    };
    assert!(metrics.dropped.get(&gap).is_none());
    assert!(metrics.received.get(&pod(2)).is_some());

    token.cancel();
    manager.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_departed_endpoints_late_batches_leave_nothing_behind() {
    // A terminating engine keeps publishing while it drains: batches are still queued when
    // its endpoint leaves the pool. Several rounds, because which of a stop and a queued
    // batch a subscriber sees first is up to its `select!`.
    for round in 0..10 {
        let connector = Arc::new(FakeConnector::default());
        let mut wire = plug(&connector, "127.0.0.1:5557", vec![]);
        let datastore = Arc::new(Datastore::new());
        let e1 = datastore.apply(pool(&[1])).endpoints[0].id;
        let index = new_index();
        let metrics = Arc::new(KvEventMetrics::default());
        let token = CancellationToken::new();
        let manager = spawn_manager_counting(&connector, &datastore, &index, &metrics, &token);
        wire.polled.recv().await.unwrap();
        wire.send(message(0, 1)).await;
        assert_eq!(metrics.received.get(&pod(1)).map(|c| c.get()), Some(1));

        datastore.apply(pool(&[2]));
        for seq in 1..=50 {
            wire.tx.send(SourceEvent::Message(message(seq, 2))).unwrap();
        }
        // The source is dropped when the subscriber stops.
        while wire.polled.recv().await.is_some() {}
        until(
            "the departed endpoint's series and entries are gone",
            || {
                metrics.received.get(&pod(1)).is_none()
                    && metrics.applied.get(&pod(1)).is_none()
                    && held(&index, e1, 1) == 0
                    && held(&index, e1, 2) == 0
            },
        )
        .await;
        assert_eq!(index.stream(e1), StreamState::Unknown, "round {round}");

        token.cancel();
        manager.await.unwrap();
    }
}

/// Review: peer changes were always served first, so connections opened and closed faster
/// than a change was handled starved the batches. A batch that waits now goes between two
/// changes.
#[tokio::test]
async fn peer_changes_never_starve_waiting_batches() {
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let (peers_tx, mut peers) = tokio::sync::watch::channel(0u32);
    let (mut open, mut served) = (true, false);
    tx.send(1u32).await.unwrap();
    tx.send(2).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        // A connection churns before every call.
        peers_tx.send_modify(|n| *n += 1);
        let next = next_batch_or_peer_change(&mut rx, &mut peers, &mut open, &mut served)
            .await
            .unwrap();
        order.push(next);
    }
    assert_eq!(order, [None, Some(1), None, Some(2)]);
    // The change passed over is still reported; then, none pending, the batch.
    tx.send(3).await.unwrap();
    for expected in [None, Some(3)] {
        let next = next_batch_or_peer_change(&mut rx, &mut peers, &mut open, &mut served).await;
        assert_eq!(next.unwrap(), expected);
    }
}

/// Review (M4): one event of an unknown type or medium made the whole batch undecodable, and
/// an undecodable batch is a lost one: a gap, the engine's index cleared, with every such
/// batch. The transport's decoder now leaves those events out; the rest of the batch is
/// applied, nothing is cleared, and what was left out is counted under bounded reasons.
#[tokio::test(start_paused = true)]
async fn events_the_decoder_left_out_are_counted_and_clear_nothing() {
    let connector = Arc::new(FakeConnector::default());
    let mut wire = plug(&connector, "127.0.0.1:5557", Vec::new());
    let datastore = Arc::new(Datastore::new());
    let e1 = datastore.apply(pool(&[1])).endpoints[0].id;
    let index = new_index();
    let metrics = Arc::new(KvEventMetrics::default());
    let token = CancellationToken::new();
    let manager = spawn_manager_counting(&connector, &datastore, &index, &metrics, &token);
    wire.polled.recv().await.unwrap();
    wire.send(message(0, 1)).await;
    assert_eq!(held(&index, e1, 1), 2);

    // Batch 1 as a newer engine writes it: its blocks, an event of a type this EPP does not
    // know, and a removal from a tier it does not know.
    let mut batch = message(1, 2).batch;
    batch.events.push(Event::AllBlocksCleared);
    batch
        .events
        .push(Event::BlockRemoved(kv_events::BlockRemoved {
            block_hashes: vec![10],
            medium: Medium::Disk,
            group_idx: None,
        }));
    let mut payload = kv_events::Encoder::new(kv_events::Encoding::Array)
        .encode(&batch)
        .unwrap();
    let mut rename = |from: &[u8], to: &[u8]| {
        let at = payload.windows(from.len()).position(|w| w == from).unwrap();
        payload[at..at + to.len()].copy_from_slice(to);
    };
    rename(b"AllBlocksCleared", b"TierBlocksClear!");
    rename(b"DISK", b"NVMe");
    let (batch, skipped) = kv_events::decode_batch_lenient(&payload).unwrap();
    wire.send(KvMessage {
        skipped,
        batch,
        ..message(1, 2)
    })
    .await;

    assert_eq!(
        (held(&index, e1, 1), held(&index, e1, 2)),
        (2, 2),
        "applied, nothing cleared"
    );
    assert_eq!(index.stream(e1), StreamState::Live);
    let dropped = |reason| {
        metrics
            .dropped
            .get(&DropLabels {
                name: "pool".into(),
                model_server_pod: "pod-1".into(),
                reason,
            })
            .map(|c| c.get())
    };
    assert_eq!(
        (
            dropped("unknown_type"),
            dropped("unknown_medium"),
            dropped("gap")
        ),
        (Some(1), Some(1), None)
    );
    // Received: one event, then one applied and two left out.
    assert_eq!(metrics.received.get_or_create(&pod(1)).get(), 4);
    // A departed endpoint's series go, these reasons' too.
    metrics.forget(&pod(1));
    assert_eq!(dropped("unknown_type"), None);

    token.cancel();
    manager.await.unwrap();
}

/// One endpoint (`pod-1`, 127.0.0.1) and its subscriber, under a running manager that counts
/// into `metrics`.
struct OneEngine {
    wire: Wire,
    e1: EndpointId,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    token: CancellationToken,
    manager: tokio::task::JoinHandle<()>,
}

impl OneEngine {
    async fn start() -> Self {
        Self::start_with(KvEventsSettings::default()).await
    }

    async fn start_with(settings: KvEventsSettings) -> Self {
        let connector = Arc::new(FakeConnector::default());
        let mut wire = plug(&connector, "127.0.0.1:5557", Vec::new());
        let datastore = Arc::new(Datastore::new());
        let e1 = datastore.apply(pool(&[1])).endpoints[0].id;
        let index = new_index();
        let metrics = Arc::new(KvEventMetrics::default());
        let token = CancellationToken::new();
        let manager =
            spawn_manager_with(&connector, &datastore, &index, &metrics, &token, settings);
        wire.polled.recv().await.unwrap();
        Self {
            wire,
            e1,
            index,
            metrics,
            token,
            manager,
        }
    }

    /// `kv_events_dropped_total{model_server_pod="pod-1", reason}`.
    fn dropped(&self, reason: &'static str) -> Option<u64> {
        self.metrics
            .dropped
            .get(&DropLabels {
                name: "pool".into(),
                model_server_pod: "pod-1".into(),
                reason,
            })
            .map(|c| c.get())
    }

    async fn stop(self) {
        self.token.cancel();
        self.manager.await.unwrap();
    }
}

/// `message(seq, content)` as a hybrid model's engine sends it: the blocks stored in its
/// full-attention group 0 and its sliding-window group 1.
fn hybrid_message(seq: u64, content: u32) -> KvMessage {
    let mut msg = message(seq, content);
    let Event::BlockStored(full) = &mut msg.batch.events[0] else {
        unreachable!()
    };
    full.group = Some(kv_events::CacheGroup {
        index: 0,
        kind: Some(kv_events::CacheKind::FullAttention),
    });
    let mut window = full.clone();
    window.group = Some(kv_events::CacheGroup {
        index: 1,
        kind: Some(kv_events::CacheKind::SlidingWindow),
    });
    msg.batch.events.push(Event::BlockStored(window));
    msg
}

/// A hybrid model's sliding window evicts blocks its full attention keeps: the prompt is still
/// found cached; the full-attention group's own eviction removes it. The other group's events
/// are counted as left out.
#[tokio::test(start_paused = true)]
async fn a_sliding_windows_evictions_leave_the_full_attention_blocks() {
    let mut one = OneEngine::start().await;
    one.wire.send(hybrid_message(0, 1)).await;
    assert_eq!(held(&one.index, one.e1, 1), 2);

    let evicted = |seq, group_idx| KvMessage {
        batch: EventBatch {
            ts: 0.0,
            events: vec![Event::BlockRemoved(kv_events::BlockRemoved {
                block_hashes: vec![10, 11],
                medium: Medium::Gpu,
                group_idx: Some(group_idx),
            })],
            data_parallel_rank: None,
        },
        ..message(seq, 1)
    };
    one.wire.send(evicted(1, 1)).await;
    assert_eq!(
        held(&one.index, one.e1, 1),
        2,
        "the window's eviction removes nothing"
    );
    assert_eq!(
        one.dropped("other_group"),
        Some(2),
        "the window's store and its eviction"
    );
    one.wire.send(evicted(2, 0)).await;
    assert_eq!(
        held(&one.index, one.e1, 1),
        0,
        "full attention's eviction removes it"
    );
    one.metrics.forget(&pod(1));
    assert_eq!(one.dropped("other_group"), None);
    one.stop().await;
}

/// Review 14 (finding 9): events were counted received after a hybrid model's other groups'
/// were left out of the batch, and a topic naming no model was counted dropped but never
/// received, so `received < applied + dropped` could hold. Both are received now.
#[tokio::test(start_paused = true)]
async fn events_are_counted_received_before_any_is_left_out() {
    let mut one = OneEngine::start().await;
    let received = |one: &OneEngine| one.metrics.received.get_or_create(&pod(1)).get();
    one.wire.send(hybrid_message(0, 1)).await;
    assert_eq!(
        (
            received(&one),
            one.metrics.applied.get_or_create(&pod(1)).get(),
            one.dropped("other_group")
        ),
        (2, 1, Some(1))
    );
    one.wire
        .send(KvMessage {
            topic: "kv@127.0.0.1:8000".into(),
            ..message(1, 2)
        })
        .await;
    assert_eq!((received(&one), one.dropped("bad_topic")), (3, Some(1)));
    one.stop().await;
}

/// A topic that names no model (`kv@<pod>` without `@<model>`) feeds nothing: its batches are
/// dropped as `bad_topic` and the stream is not taken for live (the precise scorer would
/// otherwise score the endpoint from an index nothing fills).
#[tokio::test(start_paused = true)]
async fn a_topic_naming_no_model_does_not_make_the_stream_live() {
    let mut one = OneEngine::start().await;
    for seq in 0..3 {
        one.wire
            .send(KvMessage {
                topic: "kv@127.0.0.1:8000".into(),
                ..message(seq, 1)
            })
            .await;
    }
    assert_eq!(one.index.stream(one.e1), StreamState::Unknown);
    assert_eq!(held(&one.index, one.e1, 1), 0);
    assert_eq!(one.dropped("bad_topic"), Some(3));
    // A topic that names its model: live, and read.
    one.wire.send(message(3, 1)).await;
    assert_eq!(one.index.stream(one.e1), StreamState::Live);
    assert_eq!(held(&one.index, one.e1, 1), 2);
    one.stop().await;
}

/// A bound socket that cannot listen is counted (`bind`, under `unknown`) on every retry,
/// and listens once it can.
#[tokio::test(start_paused = true)]
async fn a_bound_socket_that_cannot_listen_is_counted_and_retried() {
    let connector = Arc::new(FakeConnector::default());
    let datastore = Arc::new(Datastore::new());
    let e1 = datastore.apply(pool(&[1])).endpoints[0].id;
    let index = new_index();
    let metrics = Arc::new(KvEventMetrics::default());
    let token = CancellationToken::new();
    let manager = tokio::spawn(run(
        connector.clone(),
        datastore.clone(),
        index.clone(),
        metrics.clone(),
        KvEventsSettings {
            bind_endpoint: Some("tcp://*:5557".into()),
            per_endpoint: false,
            ..KvEventsSettings::default()
        },
        token.clone(),
    ));
    let binds = || {
        metrics
            .dropped
            .get(&DropLabels {
                name: "pool".into(),
                model_server_pod: "unknown".into(),
                reason: "bind",
            })
            .map_or(0, |c| c.get())
    };
    until("a failed bind is counted", || binds() == 1).await;
    tokio::time::advance(RECONNECT_INTERVAL).await;
    until("and counted again on its retry", || binds() == 2).await;

    // The port is free now: the next retry listens and reads.
    let mut wire = plug(&connector, "tcp://*:5557", vec![]);
    tokio::time::advance(RECONNECT_INTERVAL).await;
    wire.polled.recv().await.unwrap();
    wire.send(message(0, 1)).await;
    assert_eq!(held(&index, e1, 1), 2);
    assert_eq!(binds(), 2);

    token.cancel();
    manager.await.unwrap();
}

/// A gap replay could not fill clears the endpoint and scores it from the approximate index
/// for `GAP_FALLBACK`; its connection closing and coming back meanwhile does not cut that short
/// (the cleared entries did not come back with the connection), and a restarted publisher
/// (whose cache starts empty, as its entries) does.
#[tokio::test(start_paused = true)]
async fn a_gaps_fallback_outlives_a_reconnection() {
    use endpoint_picker::kv_index::GAP_FALLBACK;
    let OneEngine {
        mut wire,
        e1,
        index,
        metrics: _,
        token,
        manager,
    } = OneEngine::start().await;
    let healthy = || index.stream(e1).is_healthy(Instant::now());
    wire.set_connected([127, 0, 0, 1], true).await;
    wire.send(message(0, 1)).await;
    assert!(healthy());
    // Batches 1 and 2 lost, no replay: a gap.
    wire.send(message(3, 2)).await;
    assert!(matches!(index.stream(e1), StreamState::Gap { .. }));
    tokio::time::advance(Duration::from_secs(10)).await;
    // The engine's connection blips; its next batch comes.
    wire.set_connected([127, 0, 0, 1], false).await;
    wire.set_connected([127, 0, 0, 1], true).await;
    // A duplicate first (a batch heard before), then a new one: neither ends the fallback.
    wire.send(message(3, 2)).await;
    assert!(!healthy(), "a duplicate does not end the gap's fallback");
    wire.send(message(4, 3)).await;
    assert!(!healthy(), "still in the gap's fallback");
    assert_eq!(held(&index, e1, 3), 2, "what it says is indexed");
    tokio::time::advance(GAP_FALLBACK - Duration::from_secs(10)).await;
    assert!(healthy(), "the fallback ends when the gap's would have");
    // Another gap, then the publisher restarts: its cache is as empty as its entries.
    wire.send(message(9, 4)).await;
    assert!(!healthy());
    wire.send(KvMessage {
        publisher_restarted: true,
        ..message(0, 5)
    })
    .await;
    wire.set_connected([127, 0, 0, 1], false).await;
    wire.set_connected([127, 0, 0, 1], true).await;
    wire.send(message(1, 6)).await;
    assert_eq!(index.stream(e1), StreamState::Live);

    token.cancel();
    manager.await.unwrap();
}

/// Review 14 (finding 2): the transport's counters (payloads that never decode, batches
/// dropped for a full queue, the frame guard's cuts) were kept by each subscriber and read by
/// nothing: an engine whose every payload failed to decode reached no handler, counted
/// nothing received or dropped, and was silently scored from the approximate index. The
/// connector's subscribers now count into the metrics' stats, exported at each scrape.
#[tokio::test]
async fn a_payload_that_never_decodes_shows_in_the_exposition() {
    use bytes::Bytes;
    use kv_events::{Encoder, Encoding};
    use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

    let metrics = KvEventMetrics::default();
    let connector = ZmqConnector::counting_into(metrics.transport.clone());
    let mut publisher = PubSocket::new();
    let endpoint = publisher
        .bind("tcp://127.0.0.1:0")
        .await
        .unwrap()
        .to_string();
    let mut source = connector
        .connect(endpoint, None, String::new(), false)
        .await
        .unwrap();
    let frames = |topic: &str, seq: u64, payload: Vec<u8>| {
        ZmqMessage::try_from(vec![
            Bytes::from(topic.to_owned()),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            Bytes::from(payload),
        ])
        .unwrap()
    };
    let good = Encoder::new(Encoding::Array)
        .encode(&message(0, 1).batch)
        .unwrap();
    // The next message on `topic`, skipping peer changes.
    async fn next_on(source: &mut ZmqSource, topic: &str) -> KvMessage {
        loop {
            if let SourceEvent::Message(m) = source.recv().await.unwrap()
                && m.topic == topic
            {
                return m;
            }
        }
    }
    // A PUB socket drops what it publishes before the subscription reached it: publish until
    // a message comes through (each wait bounded, all of them too).
    let warm = async {
        for seq in 0.. {
            publisher
                .send(frames("kv@warm@m", seq, good.clone()))
                .await
                .unwrap();
            let wait = Duration::from_millis(50);
            if tokio::time::timeout(wait, next_on(&mut source, "kv@warm@m"))
                .await
                .is_ok()
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), warm)
        .await
        .expect("the subscription reached the publisher");
    // An undecodable payload (0xc1: no msgpack value starts so), then a good batch on the same
    // connection: once the second is out, the first has been read and counted.
    publisher
        .send(frames("kv@a@m", 0, vec![0xc1]))
        .await
        .unwrap();
    publisher
        .send(frames("kv@a@m", 1, good.clone()))
        .await
        .unwrap();
    let after = tokio::time::timeout(Duration::from_secs(10), next_on(&mut source, "kv@a@m"))
        .await
        .expect("the good batch");
    assert_eq!(after.seq, 1);

    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("inference_extension_kv_events_transport_total{reason=\"decode\"} 1\n"),
        "{text}"
    );
    // Every reason is a series from the start, so that an alert's rate() sees the first one.
    for reason in TRANSPORT_REASONS {
        assert!(
            text.contains(&format!(
                "inference_extension_kv_events_transport_total{{reason=\"{reason}\"}}"
            )),
            "{reason}"
        );
    }
}

/// `content`'s blocks, `blocks` of them, in one batch (`message` has two).
fn wide_message(seq: u64, content: u32, blocks: usize) -> KvMessage {
    let mut msg = message(seq, content);
    let Event::BlockStored(stored) = &mut msg.batch.events[0] else {
        unreachable!()
    };
    let first = u64::from(content) * 10_000;
    stored.block_hashes = (0..blocks as u64).map(|b| first + b).collect();
    stored.token_ids = (0..(blocks * BS) as u32)
        .map(|t| content * 100_000 + t)
        .collect();
    msg
}

/// An engine that floods its events (a bug, a compromised pod) costs the EPP what
/// `maxBlocksPerSecond` lets through: past it its batches are dropped, its entries cleared and
/// it is scored from the approximate index, for as long as it stays over the rate; once it has
/// stayed under it long enough to fill the bucket again its batches are applied, with no gap
/// to replay, and the fallback ends the usual time after the last batch dropped.
#[tokio::test(start_paused = true)]
async fn an_engine_over_its_block_rate_is_dropped_then_heard_again() {
    use endpoint_picker::kv_index::GAP_FALLBACK;
    let mut engine = OneEngine::start_with(KvEventsSettings {
        max_blocks_per_second: 1000,
        ..KvEventsSettings::default()
    })
    .await;
    let e1 = engine.e1;
    let healthy = |engine: &OneEngine| engine.index.stream(e1).is_healthy(Instant::now());
    engine.wire.set_connected([127, 0, 0, 1], true).await;
    engine.wire.send(message(0, 1)).await;
    assert!(healthy(&engine));
    assert_eq!(held(&engine.index, e1, 1), 2);
    // 2 + 9 × 100 blocks within the second's 1,000: applied.
    for seq in 1..=9 {
        engine.wire.send(wide_message(seq, 10, 100)).await;
    }
    assert!(healthy(&engine));
    assert_eq!(engine.dropped("rate"), None);
    // The tenth hundred is over: dropped, and the endpoint cleared as on a gap.
    engine.wire.send(wide_message(10, 11, 100)).await;
    assert_eq!(engine.dropped("rate"), Some(1));
    assert!(matches!(engine.index.stream(e1), StreamState::Gap { .. }));
    assert_eq!(held(&engine.index, e1, 1), 0, "cleared");
    // A small batch that would fit is dropped too: the episode lasts until the engine has
    // stayed under the rate for a while (ended by any batch that fits, it would start again
    // at the next and clear the endpoint each time). So is a replayed batch: its stores would
    // outlive the removals dropped after them.
    engine.wire.send(message(11, 2)).await;
    engine
        .wire
        .send(KvMessage {
            replayed: true,
            ..message(12, 20)
        })
        .await;
    assert_eq!(engine.dropped("rate"), Some(3));
    assert_eq!(held(&engine.index, e1, 2), 0);
    assert_eq!(held(&engine.index, e1, 20), 0);
    // Just over the rate for five seconds (1,100 blocks a second): all dropped.
    for seq in 13..68 {
        tokio::time::advance(Duration::from_millis(1000 / 11)).await;
        engine.wire.send(wide_message(seq, 12, 100)).await;
    }
    assert_eq!(engine.dropped("rate"), Some(58));
    // Then quiet: half a second's debt paid, not yet full. Two more seconds fill the bucket,
    // and it is heard again, its number following the dropped ones' (no gap).
    tokio::time::advance(Duration::from_secs(1)).await;
    engine.wire.send(message(68, 3)).await;
    assert_eq!(engine.dropped("rate"), Some(59), "not yet");
    tokio::time::advance(Duration::from_millis(2100)).await;
    engine.wire.send(message(69, 3)).await;
    assert_eq!(held(&engine.index, e1, 3), 2);
    assert_eq!(engine.dropped("gap"), None);
    assert!(
        !healthy(&engine),
        "the fallback runs from the last batch dropped"
    );
    tokio::time::advance(GAP_FALLBACK).await;
    engine.wire.send(message(70, 4)).await;
    assert!(healthy(&engine));
    assert_eq!(engine.dropped("gap"), None, "no gap replayed or cleared");
    // What the engine replays (its ring, to an EPP that starts beside it) is not held to the
    // live rate: twice a second's worth at once, all applied, and the live batch after it too.
    let replayed = |seq: u64, content: u32, blocks: usize| KvMessage {
        replayed: true,
        ..wide_message(seq, content, blocks)
    };
    for seq in 71..91 {
        engine.wire.send(replayed(seq, 13, 100)).await;
    }
    engine.wire.send(message(91, 5)).await;
    assert_eq!(engine.dropped("rate"), Some(59));
    assert_eq!(held(&engine.index, e1, 4), 2, "nothing cleared");
    assert_eq!(held(&engine.index, e1, 5), 2);
    assert!(healthy(&engine));
    // Replays have their own allowance, 30 seconds' worth: past it (gaps opened on purpose)
    // the rest is dropped and the endpoint cleared.
    for seq in 92..120 {
        engine.wire.send(replayed(seq, 14, 1000)).await;
    }
    assert_eq!(engine.dropped("rate"), Some(59), "28,000 more: within it");
    engine.wire.send(replayed(120, 15, 1000)).await;
    assert_eq!(engine.dropped("rate"), Some(60));
    assert_eq!(held(&engine.index, e1, 5), 0, "cleared");
    engine.stop().await;
}

/// Review 16: a batch over the rate that repeats one already seen (a reconnection's overlap)
/// is dropped without moving the stream back, so the batch after it is no gap.
#[tokio::test(start_paused = true)]
async fn a_duplicate_over_the_rate_does_not_move_the_stream_back() {
    let mut engine = OneEngine::start_with(KvEventsSettings {
        max_blocks_per_second: 1000,
        ..KvEventsSettings::default()
    })
    .await;
    let e1 = engine.e1;
    engine.wire.set_connected([127, 0, 0, 1], true).await;
    for seq in 0..10 {
        engine.wire.send(wide_message(seq, 10, 100)).await;
    }
    // Seq 5 again, over the rate: dropped; once the bucket is full again, 10 follows 9.
    engine.wire.send(wide_message(5, 10, 100)).await;
    assert_eq!(engine.dropped("rate"), Some(1));
    tokio::time::advance(Duration::from_secs(3)).await;
    engine.wire.send(message(10, 2)).await;
    assert_eq!(held(&engine.index, e1, 2), 2, "heard again");
    assert_eq!(engine.dropped("gap"), None, "no gap seen");
    engine.stop().await;
}

#[test]
fn the_block_rate_refills_and_lets_a_huge_batch_pass_alone() {
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    let mut rate = BlockRate::new(1000);
    assert!(rate.admit(600, at(0)));
    assert!(!rate.admit(600, at(0)), "400 left");
    assert!(rate.admit(600, at(200)), "refilled by 200");
    // A batch larger than a second's worth passes when the bucket is full, and leaves a debt.
    assert!(rate.admit(5000, at(5000)));
    assert!(!rate.admit(1, at(8000)), "still in debt");
    assert!(!rate.admit(1, at(9000)), "even at 0");
    assert!(rate.admit(1000, at(10000)), "paid back and refilled");
    // A dropped batch is charged down to a second's debt, no further: a second to pay it, one
    // more to fill the bucket.
    let mut rate = BlockRate::new(1000);
    assert!(rate.admit(1000, at(0)));
    rate.charge_dropped(u64::MAX, at(0));
    assert!(!rate.full(at(1999)));
    assert!(rate.full(at(2000)));
    // A burst of 30 seconds (replays'): 29,000 at once, then what a second refills.
    let mut replays = BlockRate::with_burst(1000, 30);
    assert!(replays.admit(29_000, at(0)));
    assert!(!replays.admit(2_000, at(0)));
    assert!(replays.admit(2_000, at(1000)));
    // No cap.
    let mut free = BlockRate::new(0);
    assert!((0..1000).all(|_| free.admit(u64::MAX, at(0))));
    free.charge_dropped(u64::MAX, at(0));
    assert!(free.full(at(0)));
}
