//! Peer messages into the index, and one loopback exchange over real sockets.

use endpoint_picker::datastore::{EndpointId, PoolSpec};
use endpoint_picker::kv_index::peers::PeerSpeculation;
use endpoint_picker::kv_index::{
    HashAlgorithm, IndexLimits, KeyHasher, Lookup, SharedMedia, TierWeights,
};
use kv_events::{BlockStored, Event, EventBatch, Medium};

use super::*;
use crate::test_support::spec;

const BS: usize = 4;

fn setup() -> (Arc<Datastore>, Arc<SharedKvIndex>, Arc<KvEventMetrics>) {
    let datastore = Arc::new(Datastore::new());
    datastore.apply(PoolSpec {
        name: "pool".into(),
        namespace: "ns".into(),
        app_protocol: "http".into(),
        endpoints: vec![spec(2), spec(3)],
    });
    let index = Arc::new(SharedKvIndex::new(
        KeyHasher::new(BS, "", HashAlgorithm::CborFnv),
        IndexLimits::default(),
    ));
    (datastore, index, Arc::default())
}

fn tokens() -> Vec<u32> {
    (0..2 * BS as u32).collect()
}

fn keys(index: &SharedKvIndex) -> Vec<u64> {
    index.hasher().prompt_keys("m", None, &tokens(), usize::MAX)
}

fn id(datastore: &Datastore, i: u8) -> EndpointId {
    datastore
        .snapshot()
        .by_address(&spec(i).address)
        .map(|e| e.id)
        .unwrap()
}

fn held(index: &SharedKvIndex, id: EndpointId, now: Instant) -> u32 {
    let mut out = Lookup::default();
    index.read(now, |i| {
        i.lookup(
            &keys(index),
            [id],
            &TierWeights::default(),
            SharedMedia::default(),
            &mut out,
        )
    });
    out.of(id).blocks
}

fn outcome(metrics: &KvEventMetrics, outcome: &'static str) -> u64 {
    metrics
        .peer_messages
        .get_or_create(&PeerOutcome { outcome })
        .get()
}

#[tokio::test(start_paused = true)]
async fn a_peers_entry_is_a_hit_for_its_endpoint_until_it_expires() {
    let (datastore, index, metrics) = setup();
    let msg = encode(&PeerSpeculation {
        endpoint: spec(3).address,
        keys: keys(&index),
    });
    let now = Instant::now();
    apply(&msg, &datastore, &index, &metrics, now);
    assert_eq!(held(&index, id(&datastore, 3), now), 2);
    assert_eq!(held(&index, id(&datastore, 2), now), 0);
    assert_eq!(outcome(&metrics, "applied"), 1);
    // Gone once the speculative TTL has passed.
    let later = now + IndexLimits::default().speculative_ttl;
    assert_eq!(held(&index, id(&datastore, 3), later), 0);
}

#[tokio::test(start_paused = true)]
async fn the_engines_event_replaces_a_peers_entry() {
    let (datastore, index, metrics) = setup();
    let now = Instant::now();
    let msg = encode(&PeerSpeculation {
        endpoint: spec(3).address,
        keys: keys(&index),
    });
    apply(&msg, &datastore, &index, &metrics, now);
    let batch = EventBatch {
        ts: 0.0,
        events: vec![Event::BlockStored(BlockStored {
            block_hashes: vec![10, 11],
            parent_block_hash: None,
            token_ids: tokens(),
            block_size: BS as u32,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
        })],
        data_parallel_rank: None,
    };
    index.apply(id(&datastore, 3), "m", &batch, now);
    // The real entry stays after the speculative one would have expired.
    let later = now + IndexLimits::default().speculative_ttl * 2;
    assert_eq!(held(&index, id(&datastore, 3), later), 2);
}

#[tokio::test(start_paused = true)]
async fn unknown_endpoints_and_garbage_are_ignored_and_counted() {
    let (datastore, index, metrics) = setup();
    let now = Instant::now();
    let stranger = encode(&PeerSpeculation {
        endpoint: "10.9.9.9:8000".parse().unwrap(),
        keys: keys(&index),
    });
    apply(&stranger, &datastore, &index, &metrics, now);
    apply(b"\x93\x01garbage", &datastore, &index, &metrics, now);
    assert_eq!(outcome(&metrics, "unknown_endpoint"), 1);
    assert_eq!(outcome(&metrics, "decode"), 1);
    assert_eq!(outcome(&metrics, "applied"), 0);
    assert_eq!(held(&index, id(&datastore, 2), now), 0);
    assert_eq!(held(&index, id(&datastore, 3), now), 0);
}

/// One EPP publishes, another subscribes, over loopback TCP through the frame guards.
#[tokio::test]
async fn a_publisher_reaches_a_subscriber_over_loopback() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let (datastore, index, metrics) = setup();
    let outbox = Arc::new(PeerOutbox::default());
    let token = CancellationToken::new();
    let publisher = tokio::spawn(publish(
        endpoint.clone(),
        outbox.clone(),
        metrics.clone(),
        token.clone(),
    ));
    let subscriber = tokio::spawn(subscribe_all(
        vec![endpoint],
        datastore.clone(),
        index.clone(),
        metrics.clone(),
        token.clone(),
    ));
    let target = id(&datastore, 2);
    // PUB/SUB drops what is sent before the subscription is in place: offer until it lands.
    let deadline = Instant::now() + Duration::from_secs(20);
    while held(&index, target, Instant::now()) == 0 {
        assert!(Instant::now() < deadline, "no peer message arrived");
        outbox.offer(spec(2).address, &keys(&index));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(outcome(&metrics, "sent") >= 1);
    assert!(outcome(&metrics, "applied") >= 1);
    token.cancel();
    publisher.await.unwrap();
    subscriber.await.unwrap();
}
