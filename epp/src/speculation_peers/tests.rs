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
            |_| true,
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
    apply(
        &msg,
        &datastore,
        &index,
        &metrics,
        now,
        &mut PeerRate::new(now),
    );
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
    apply(
        &msg,
        &datastore,
        &index,
        &metrics,
        now,
        &mut PeerRate::new(now),
    );
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
            group: None,
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
    apply(
        &stranger,
        &datastore,
        &index,
        &metrics,
        now,
        &mut PeerRate::new(now),
    );
    apply(
        b"\x93\x01garbage",
        &datastore,
        &index,
        &metrics,
        now,
        &mut PeerRate::new(now),
    );
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
        None,
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
    assert_eq!(metrics.peers_followed.get(), 1);
    token.cancel();
    publisher.await.unwrap();
    subscriber.await.unwrap();
    assert_eq!(
        metrics.peers_followed.get(),
        0,
        "a subscription that ended is not counted"
    );
}

#[test]
fn names_are_told_from_addresses() {
    assert_eq!(
        dns_name("tcp://epp-peers.ns.svc:5570"),
        Some(("epp-peers.ns.svc".to_owned(), 5570))
    );
    assert_eq!(
        dns_name("tcp://localhost:1"),
        Some(("localhost".to_owned(), 1))
    );
    for address in [
        "tcp://10.0.0.1:5570",
        "tcp://[::1]:5570",
        "tcp://*:5570",
        "tcp://epp:notaport",
        "ipc:///tmp/x:1",
    ] {
        assert_eq!(dns_name(address), None, "{address}");
    }
    assert_eq!(
        published_address("tcp://*:5570"),
        Some("0.0.0.0:5570".parse().unwrap())
    );
    assert_eq!(
        published_address("tcp://10.0.0.1:5570"),
        Some("10.0.0.1:5570".parse().unwrap())
    );
}

#[test]
fn this_epps_own_publisher_is_recognised() {
    let any: SocketAddr = "0.0.0.0:5570".parse().unwrap();
    let loopback: SocketAddr = "127.0.0.1:5570".parse().unwrap();
    assert!(
        is_own(loopback, Some(any)),
        "an address of this host, same port"
    );
    assert!(!is_own("127.0.0.1:5571".parse().unwrap(), Some(any)));
    assert!(is_own(loopback, Some(loopback)));
    assert!(!is_own(loopback, Some("127.0.0.2:5570".parse().unwrap())));
    assert!(!is_own(loopback, None));
    // TEST-NET-3: never an address of this host.
    assert!(!is_own("203.0.113.7:5570".parse().unwrap(), Some(any)));
}

#[test]
fn an_answer_starts_new_addresses_stops_gone_ones_and_is_capped() {
    let addr = |i: u16| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 5570));
    let own = Some(SocketAddr::from(([10, 0, 0, 9], 5570)));
    let mut followed: BTreeMap<SocketAddr, ()> = BTreeMap::new();
    let cap = MAX_ADDRESSES_PER_PEER_NAME;
    let c = changes(&followed, [addr(2), addr(1), addr(2)], own, cap);
    assert_eq!(
        (c.start.as_slice(), c.stop.as_slice()),
        ([addr(1), addr(2)].as_slice(), [].as_slice())
    );
    followed.extend(c.start.into_iter().map(|a| (a, ())));
    // 2 stays, 1 is gone, 3 is new; this EPP's own address is never followed.
    let c = changes(&followed, [addr(3), addr(2), addr(9)], own, cap);
    assert_eq!(
        (c.start, c.stop, c.beyond_cap),
        (vec![addr(3)], vec![addr(1)], 0)
    );
    // An answer of hundreds: the first 64 in address order, the same on every resolution, and
    // how many were left out.
    let many: Vec<SocketAddr> = (1..=300).rev().map(addr).collect();
    let c = changes(&BTreeMap::<SocketAddr, ()>::new(), many.clone(), own, cap);
    assert_eq!(c.start.len(), MAX_ADDRESSES_PER_PEER_NAME);
    assert_eq!(c.start[0], addr(1));
    assert!(!c.start.contains(&addr(9)));
    assert!(c.stop.is_empty());
    assert_eq!(c.beyond_cap, 299 - MAX_ADDRESSES_PER_PEER_NAME);
    // An answer without addresses (a resolver may return one for a Service without endpoints;
    // glibc's reports an error instead, which keeps everything) stops everything.
    let c = changes(&followed, [], own, cap);
    assert!(c.start.is_empty());
    assert_eq!(c.stop, [addr(1), addr(2)]);
    // A smaller cap keeps fewer, the lowest addresses again.
    let c = changes(&BTreeMap::<SocketAddr, ()>::new(), many, own, 3);
    assert_eq!(c.start, [addr(1), addr(2), addr(3)]);
    assert_eq!(c.beyond_cap, 299 - 3);
}

/// The names share what the peers given as addresses leave of [`MAX_PEER_ADDRESSES`]: 64
/// names of 64 addresses each cannot make 4,096 subscriptions.
#[test]
fn all_names_together_follow_a_bounded_number_of_addresses() {
    assert_eq!(per_name_cap(0, 5), 0);
    assert_eq!(per_name_cap(1, 0), MAX_ADDRESSES_PER_PEER_NAME);
    assert_eq!(per_name_cap(3, 2), MAX_ADDRESSES_PER_PEER_NAME);
    for names in 1..=64 {
        for addresses in 0..=(64 - names) {
            let cap = per_name_cap(names, addresses);
            assert!(cap >= 1, "{names} names, {addresses} addresses");
            assert!(
                names * cap + addresses <= MAX_PEER_ADDRESSES,
                "{names} names of {cap} and {addresses} addresses"
            );
        }
    }
    assert_eq!(per_name_cap(64, 0), MAX_PEER_ADDRESSES / 64);
}

/// A peer given by a name is followed at every address it resolves to; the address that is
/// this EPP's own publisher is skipped. Two publishers on loopback: `localhost:<own>` (this
/// EPP's) and `localhost:<other>`. (A publisher bound to every address, `*`, is recognised by
/// `this_epps_own_publisher_is_recognised`; here everything stays on loopback.)
#[tokio::test]
async fn a_named_peer_is_followed_and_this_epp_is_skipped() {
    // Ports picked ahead, since `publish` binds what it is given: a port taken meanwhile makes
    // the own publisher fail, which the listener below would notice.
    let own_port = testkit::ports::free_port().unwrap();
    let other_port = testkit::ports::free_port().unwrap();
    let (datastore, index, metrics) = setup();
    let token = CancellationToken::new();
    let own_outbox = Arc::new(PeerOutbox::default());
    let other_outbox = Arc::new(PeerOutbox::default());
    let own_publish = format!("tcp://127.0.0.1:{own_port}");
    let publishers = [
        tokio::spawn(publish(
            own_publish.clone(),
            own_outbox.clone(),
            Arc::default(),
            token.clone(),
        )),
        tokio::spawn(publish(
            format!("tcp://127.0.0.1:{other_port}"),
            other_outbox.clone(),
            Arc::default(),
            token.clone(),
        )),
    ];
    // The own publisher is alive and heard by whoever does subscribe to it.
    let mut listener = FrameSub::connect(&own_publish, MAX_PEER_MESSAGE_BYTES as u64)
        .await
        .unwrap();
    let subscriber = tokio::spawn(subscribe_all(
        vec![
            format!("tcp://localhost:{own_port}"),
            format!("tcp://localhost:{other_port}"),
        ],
        Some(own_publish),
        datastore.clone(),
        index.clone(),
        metrics.clone(),
        token.clone(),
    ));
    let (from_other, from_own) = (id(&datastore, 2), id(&datastore, 3));
    let offer = || {
        other_outbox.offer(spec(2).address, &keys(&index));
        own_outbox.offer(spec(3).address, &keys(&index));
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut own_heard = false;
    while held(&index, from_other, Instant::now()) == 0 || !own_heard {
        assert!(
            Instant::now() < deadline,
            "the named peer's message (or the own publisher's) never arrived"
        );
        offer();
        if let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::from_millis(20), listener.recv()).await
        {
            own_heard = true;
        }
    }
    // The other peer is heard, and the own publisher is heard by a subscriber; this EPP's
    // own messages, offered as often, still do not reach its index.
    for _ in 0..25 {
        offer();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(held(&index, from_own, Instant::now()), 0);
    token.cancel();
    for p in publishers {
        p.await.unwrap();
    }
    subscriber.await.unwrap();
}

#[test]
fn a_peer_is_held_to_its_keys_and_its_messages_a_second() {
    let start = Instant::now();
    let mut rate = PeerRate::new(start);
    let full = endpoint_picker::kv_index::peers::MAX_PEER_KEYS;
    let admitted = (0..1_000).take_while(|_| rate.admit(start, full)).count();
    assert_eq!(admitted, MAX_PEER_KEYS_PER_SECOND / full);
    assert!(
        rate.admit(start, MAX_PEER_KEYS_PER_SECOND % full),
        "what is left of the keys"
    );
    assert!(!rate.admit(start, 1));
    // Empty messages count against the message cap alone.
    let mut rate = PeerRate::new(start);
    let empty = (0..30_000).take_while(|_| rate.admit(start, 0)).count();
    assert_eq!(empty, MAX_PEER_MESSAGES_PER_SECOND as usize);
    // A second later, a fresh window.
    assert!(rate.admit(start + Duration::from_secs(1), full));
}

#[test]
fn a_message_over_the_rate_is_counted_and_applies_nothing() {
    let (datastore, index, metrics) = setup();
    let now = Instant::now();
    let msg = encode(&PeerSpeculation {
        endpoint: spec(2).address,
        keys: keys(&index),
    });
    let mut spent = PeerRate::new(now);
    while spent.admit(now, 0) {}
    apply(&msg, &datastore, &index, &metrics, now, &mut spent);
    assert_eq!(outcome(&metrics, "rate"), 1);
    assert_eq!(held(&index, id(&datastore, 2), now), 0);
    apply(
        &msg,
        &datastore,
        &index,
        &metrics,
        now + Duration::from_secs(1),
        &mut spent,
    );
    assert_eq!(outcome(&metrics, "applied"), 1);
    assert_eq!(
        held(&index, id(&datastore, 2), now + Duration::from_secs(1)),
        2
    );
}

/// Review 14 (finding 9): a subscriber of a peer given by its address that panicked was
/// joined and forgotten, the peer lost until every other peer's task ended too. It is
/// started again (after the resolution interval, as a name's failed address is).
#[tokio::test(start_paused = true)]
async fn a_peer_task_that_panics_is_started_again() {
    use std::sync::atomic::AtomicUsize;

    let token = CancellationToken::new();
    let starts = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = {
        let token = token.clone();
        move |peer: usize| {
            let (n, tx, token) = (
                starts.fetch_add(1, Ordering::Relaxed),
                tx.clone(),
                token.clone(),
            );
            async move {
                let _ = tx.send((peer, n));
                assert_ne!(n, 0, "a subscriber bug, the first time only");
                token.cancelled().await;
            }
        }
    };
    let supervisor = tokio::spawn({
        let token = token.clone();
        async move { supervise(1, &token, start).await }
    });
    assert_eq!(rx.recv().await, Some((0, 0)));
    let at = Instant::now();
    assert_eq!(rx.recv().await, Some((0, 1)), "started again");
    assert!(at.elapsed() >= PEER_RESOLVE_INTERVAL);
    token.cancel();
    supervisor.await.unwrap();
    assert_eq!(rx.recv().await, None, "not started once stopped");
}
