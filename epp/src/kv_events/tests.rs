//! The subscribers against an in-memory transport: membership, gaps, replay, removal.

use std::collections::HashMap;

use endpoint_picker::datastore::PoolSpec;
use endpoint_picker::kv_index::{
    HashAlgorithm, IndexLimits, KeyHasher, Lookup, SharedMedia, TierWeights,
};
use kv_events::{BlockStored, Event, Medium};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::*;
use crate::test_support::spec;

struct FakeSource {
    rx: mpsc::UnboundedReceiver<KvMessage>,
    /// Signalled at each `recv`: the previous message has been handled.
    polled: mpsc::UnboundedSender<()>,
    replay: Vec<KvMessage>,
}

impl KvEventSource for FakeSource {
    async fn recv(&mut self) -> Result<KvMessage, SourceError> {
        let _ = self.polled.send(());
        self.rx
            .recv()
            .await
            .ok_or_else(|| SourceError::Connection("closed".into()))
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
    sources: Mutex<HashMap<String, FakeSource>>,
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
            .remove(&endpoint)
            .ok_or_else(|| SourceError::Connection(format!("refused: {endpoint}")))
    }
}

struct Wire {
    tx: mpsc::UnboundedSender<KvMessage>,
    polled: mpsc::UnboundedReceiver<()>,
}

impl Wire {
    /// Sends a message and waits until it has been handled.
    async fn send(&mut self, msg: KvMessage) {
        self.tx.send(msg).unwrap();
        self.polled.recv().await.unwrap();
    }
}

fn plug(connector: &FakeConnector, address: &str, replay: Vec<KvMessage>) -> Wire {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ptx, prx) = mpsc::unbounded_channel();
    connector.sources.lock().insert(
        format!("tcp://{address}"),
        FakeSource {
            rx,
            polled: ptx,
            replay,
        },
    );
    Wire { tx, polled: prx }
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
            })],
            data_parallel_rank: None,
        },
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
    let manager = tokio::spawn(run(
        connector.clone(),
        datastore.clone(),
        index.clone(),
        metrics.clone(),
        KvEventsSettings::default(),
        token.clone(),
    ));
    wire.polled.recv().await.unwrap();
    assert_eq!(index.stream(e1), StreamState::Live);

    wire.send(message(0, 1)).await;
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
