//! The controller as a plain struct: policies, capacity, eviction, TTL (paused time),
//! disconnects, and the waiting room.

use std::sync::atomic::AtomicUsize;

use super::policy::{Las, LasParams, UsageLimitPolicy};
use super::*;

/// A pool of `endpoints` replicas holding `slots` requests in all: saturation is
/// `(in flight + dispatched) / slots`, 1 when empty.
#[derive(Debug)]
struct FakePool {
    endpoints: AtomicUsize,
    in_flight: AtomicU64,
    slots: u64,
}

impl FakePool {
    fn new(endpoints: usize, slots: u64) -> Arc<Self> {
        Arc::new(Self {
            endpoints: AtomicUsize::new(endpoints),
            in_flight: AtomicU64::new(0),
            slots,
        })
    }
}

impl PoolProbe for FakePool {
    fn read(&self, unrouted: Unrouted) -> PoolReading {
        let endpoints = self.endpoints.load(Ordering::Relaxed);
        let load = self.in_flight.load(Ordering::Relaxed) + unrouted.requests;
        PoolReading {
            endpoints,
            saturation: if endpoints == 0 || self.slots == 0 {
                1.0
            } else {
                load as f64 / self.slots as f64
            },
        }
    }
}

/// Records every exit.
#[derive(Debug, Default)]
struct Log(Mutex<Vec<(String, Outcome)>>, AtomicU64);

impl FlowObserver for Log {
    fn entered(&self, _: &FlowRequest) -> FlowRecordKey {
        self.1.fetch_add(1, Ordering::Relaxed);
        FlowRecordKey::default()
    }
    fn left(&self, request: &FlowRequest, _: &FlowRecordKey, outcome: Outcome, _: Duration) {
        self.1.fetch_sub(1, Ordering::Relaxed);
        self.0
            .lock()
            .push((request.fairness_id.to_string(), outcome));
    }
}

fn req(flow: &str, priority: i32) -> FlowRequest {
    FlowRequest {
        fairness_id: Arc::from(flow),
        priority,
        bytes: 100,
        prompt_tokens: 25,
        slo_ttft: None,
        model: "m".into(),
        target_model: "m".into(),
    }
}

fn band(priority: i32, fairness: FairnessPolicy, ordering: OrderingPolicy) -> BandConfig {
    BandConfig {
        priority,
        fairness: (Arc::from(fairness.type_name()), fairness),
        ordering: (Arc::from(ordering.type_name()), ordering),
        ..BandConfig::default()
    }
}

/// Lets go everything the pool takes, one cycle at a time, with every dispatched request
/// routed at once (it becomes in-flight load). Returns the flows in dispatch order.
async fn drain(fc: &Arc<FlowControl>, pool: &FakePool, tickets: &mut Vec<Ticket>) -> Vec<String> {
    let mut order = Vec::new();
    loop {
        // One request per cycle, so that the order seen is the dispatch order.
        fc.wakes.store(0, Ordering::Relaxed);
        if fc.dispatch_cycle(Instant::now(), pool) == 0 {
            return order;
        }
        let mut rest = Vec::new();
        for mut t in tickets.drain(..) {
            // A decided ticket answers at once; a queued one would block.
            if let Ok(Ok(_admitted)) = tokio::time::timeout(Duration::ZERO, t.wait()).await {
                pool.in_flight.fetch_add(1, Ordering::Relaxed);
                order.push(t.request().fairness_id.to_string());
            } else {
                rest.push(t);
            }
        }
        *tickets = rest;
    }
}

/// The answer to `request`, which must be refused (at once, or by the time it is asked).
async fn refusal(fc: &Arc<FlowControl>, request: FlowRequest) -> FlowRejection {
    fc.enqueue(request, Instant::now())
        .wait()
        .await
        .expect_err("refused")
}

fn enqueue_all(fc: &Arc<FlowControl>, items: &[(&str, i32)]) -> Vec<Ticket> {
    items
        .iter()
        .map(|&(f, p)| fc.enqueue(req(f, p), Instant::now()))
        .collect()
}

/// Arrival times are read before the controller's lock and ids are given under it, so a
/// request can be queued after one that arrived later. Found by review: the global-strict index
/// then took the earlier one from the middle of its flow, ahead of the flow's head (the
/// policy serves heads), and the TTL's expiry from the heads could stop at a younger head.
#[tokio::test(start_paused = true)]
async fn a_request_queued_after_a_later_arrival_keeps_the_queue_order() {
    let fc = FlowControl::new(FlowConfig {
        bands: vec![band(0, FairnessPolicy::GlobalStrict, OrderingPolicy::Fcfs)],
        ..FlowConfig::default()
    });
    let pool = FakePool::new(1, 10);
    let t0 = Instant::now();
    let mut tickets = vec![
        fc.enqueue(req("a", 0), t0 + Duration::from_millis(10)),
        // The same flow, arrived before the first but queued after it.
        fc.enqueue(req("a", 0), t0),
        fc.enqueue(req("b", 0), t0 + Duration::from_millis(5)),
    ];
    // In queue order. By arrival it would be a (its second), b, a; by the flows' heads (the
    // policy's own definition) b, a, a.
    let order = drain(&fc, &pool, &mut tickets).await;
    assert_eq!(order, ["a", "a", "b"]);
}

#[tokio::test(start_paused = true)]
async fn higher_bands_go_first_and_lower_ones_wait_for_room() {
    let fc = FlowControl::new(FlowConfig {
        bands: vec![
            band(0, FairnessPolicy::GlobalStrict, OrderingPolicy::Fcfs),
            band(10, FairnessPolicy::GlobalStrict, OrderingPolicy::Fcfs),
        ],
        ..FlowConfig::default()
    });
    let pool = FakePool::new(1, 3);
    let mut tickets = enqueue_all(
        &fc,
        &[("low-1", 0), ("low-2", 0), ("high-1", 10), ("high-2", 10)],
    );
    // Three slots: both high ones, then the oldest low one; the pool is then saturated.
    assert_eq!(
        drain(&fc, &pool, &mut tickets).await,
        ["high-1", "high-2", "low-1"]
    );
    assert_eq!(fc.queued(), 1);
    pool.in_flight.fetch_sub(1, Ordering::Relaxed);
    assert_eq!(drain(&fc, &pool, &mut tickets).await, ["low-2"]);
}

#[tokio::test(start_paused = true)]
async fn round_robin_alternates_flows_and_global_strict_keeps_arrival_order() {
    let arrivals = [("a", 0), ("a", 0), ("a", 0), ("b", 0), ("b", 0), ("c", 0)];
    let run = |fairness| async move {
        let fc = FlowControl::new(FlowConfig {
            bands: vec![band(0, fairness, OrderingPolicy::Fcfs)],
            ..FlowConfig::default()
        });
        let pool = FakePool::new(1, 100);
        let mut tickets = enqueue_all(&fc, &arrivals);
        drain(&fc, &pool, &mut tickets).await
    };
    assert_eq!(
        run(FairnessPolicy::RoundRobin).await,
        ["a", "b", "c", "a", "b", "a"]
    );
    assert_eq!(
        run(FairnessPolicy::GlobalStrict).await,
        ["a", "a", "a", "b", "b", "c"]
    );
}

#[tokio::test(start_paused = true)]
async fn least_attained_service_serves_the_light_tenant_first() {
    let las = Arc::new(Las::new(LasParams::default()));
    let fc = FlowControl::new(FlowConfig {
        bands: vec![band(
            0,
            FairnessPolicy::LeastAttainedService(las.clone()),
            OrderingPolicy::Fcfs,
        )],
        ..FlowConfig::default()
    });
    // The heavy tenant generated many output tokens (weighted twice).
    fc.record_usage("heavy", 100, 5_000);
    fc.record_usage("light", 2_000, 100);
    let pool = FakePool::new(1, 100);
    let mut tickets = enqueue_all(&fc, &[("heavy", 0), ("heavy", 0), ("light", 0)]);
    assert_eq!(
        drain(&fc, &pool, &mut tickets).await,
        ["light", "heavy", "heavy"]
    );
}

#[tokio::test(start_paused = true)]
async fn slo_deadline_ordering_serves_the_tightest_objective_first() {
    let fc = FlowControl::new(FlowConfig {
        bands: vec![band(
            0,
            FairnessPolicy::GlobalStrict,
            OrderingPolicy::SloDeadline,
        )],
        ..FlowConfig::default()
    });
    let with_slo = |flow: &str, ms: Option<u64>| FlowRequest {
        slo_ttft: ms.map(Duration::from_millis),
        ..req(flow, 0)
    };
    let mut tickets = vec![
        fc.enqueue(with_slo("none", None), Instant::now()),
        fc.enqueue(with_slo("loose", Some(5_000)), Instant::now()),
        fc.enqueue(with_slo("tight", Some(200)), Instant::now()),
    ];
    let pool = FakePool::new(1, 100);
    assert_eq!(
        drain(&fc, &pool, &mut tickets).await,
        ["tight", "loose", "none"]
    );
}

#[tokio::test(start_paused = true)]
async fn usage_limits_hold_lower_bands_back_first() {
    let fc = FlowControl::new(FlowConfig {
        bands: vec![
            band(10, FairnessPolicy::GlobalStrict, OrderingPolicy::Fcfs),
            band(0, FairnessPolicy::GlobalStrict, OrderingPolicy::Fcfs),
        ],
        usage_limit: Arc::new(UsageLimitPolicy::PriorityHoldback {
            min: 0.4,
            max: 0.9,
            by_value: false,
        }),
        ..FlowConfig::default()
    });
    // Ten slots, five busy: saturation 0.5 is under band 10's ceiling (0.9), over band 0's
    // (0.4). With band 10 empty, band 0 is still held.
    let pool = FakePool::new(1, 10);
    pool.in_flight.store(5, Ordering::Relaxed);
    let mut tickets = enqueue_all(&fc, &[("low", 0)]);
    assert!(drain(&fc, &pool, &mut tickets).await.is_empty());
    tickets.extend(enqueue_all(&fc, &[("high", 10)]));
    assert_eq!(drain(&fc, &pool, &mut tickets).await, ["high"]);
    pool.in_flight.store(3, Ordering::Relaxed);
    assert_eq!(drain(&fc, &pool, &mut tickets).await, ["low"]);
}

#[tokio::test(start_paused = true)]
async fn capacity_per_band_and_global_rejects_with_the_references_answers() {
    let fc = FlowControl::new(FlowConfig {
        max_bytes: 1_000,
        bands: vec![BandConfig {
            max_requests: 2,
            ..band(0, FairnessPolicy::GlobalStrict, OrderingPolicy::Fcfs)
        }],
        ..FlowConfig::default()
    });
    let log = Arc::new(Log::default());
    fc.set_observer(log.clone());
    let pool = FakePool::new(1, 0);
    fc.dispatch_cycle(Instant::now(), pool.as_ref());
    let _held = enqueue_all(&fc, &[("a", 0), ("a", 0)]);
    // The band is full: 429 rejected-saturated.
    let err = refusal(&fc, req("b", 0)).await;
    assert_eq!(err.outcome, Outcome::RejectedCapacity);
    assert_eq!(err.status(), (429, "ResourceExhausted"));
    assert_eq!(err.dropped_reason(), Some("rejected-saturated"));
    // Another band (made on demand), but the global byte cap: 200 + 801 > 1000.
    let big = FlowRequest {
        bytes: 801,
        ..req("c", 5)
    };
    let err = refusal(&fc, big).await;
    assert_eq!(err.outcome, Outcome::RejectedCapacity);
    let fits = FlowRequest {
        bytes: 800,
        ..req("c", 5)
    };
    let mut fits = fc.enqueue(fits, Instant::now());
    assert!(fits.is_queued());
    drop(fits.wait());
    // While the pool is empty, overflow is 503 rejected-no-endpoints.
    pool.endpoints.store(0, Ordering::Relaxed);
    fc.dispatch_cycle(Instant::now(), pool.as_ref());
    let err = refusal(&fc, req("a", 0)).await;
    assert_eq!(err.outcome, Outcome::RejectedNoEndpoints);
    assert_eq!(err.status(), (503, "ServiceUnavailable"));
    assert_eq!(err.dropped_reason(), Some("rejected-no-endpoints"));
    let rejected = log.0.lock().len();
    assert_eq!(rejected, 3, "every rejection is recorded once");
}

#[tokio::test(start_paused = true)]
async fn eviction_displaces_sheddable_requests_lowest_priority_then_newest() {
    let fc = FlowControl::new(FlowConfig {
        max_requests: 4,
        eviction: true,
        ..FlowConfig::default()
    });
    let pool = FakePool::new(1, 0);
    fc.dispatch_cycle(Instant::now(), pool.as_ref());
    let mut queued = enqueue_all(
        &fc,
        &[
            ("batch-old", -1),
            ("batch-new", -1),
            ("scrap", -5),
            ("chat", 0),
        ],
    );
    // Full. An interactive request evicts the lowest band's request first...
    let _first = fc.enqueue(req("chat", 0), Instant::now());
    // ...then the newest of the next band up.
    let _second = fc.enqueue(req("chat", 0), Instant::now());
    let mut evicted = Vec::new();
    for t in &mut queued {
        if let Ok(Err(e)) = tokio::time::timeout(Duration::ZERO, t.wait()).await {
            assert_eq!(e.status(), (429, "ResourceExhausted"));
            assert_eq!(e.dropped_reason(), Some("evicted-priority"));
            evicted.push(t.request().fairness_id.to_string());
        }
    }
    assert_eq!(evicted, ["batch-new", "scrap"]);
    assert_eq!(fc.queued(), 4);
    // A sheddable arrival displaces nothing of equal priority, and nothing ≥ 0 ever.
    let err = refusal(&fc, req("batch", -1)).await;
    assert_eq!(err.outcome, Outcome::RejectedCapacity);
    let _third = fc.enqueue(req("chat", 0), Instant::now());
    let err = refusal(&fc, req("chat", 0)).await;
    assert_eq!(
        err.outcome,
        Outcome::RejectedCapacity,
        "only chat requests are left"
    );
}

/// The flows among `tickets` that were answered with `outcome`, in order (a fair-share
/// eviction with its status and dropped reason); answered tickets leave `tickets`.
async fn answered(tickets: &mut Vec<Ticket>, outcome: Outcome) -> Vec<String> {
    let mut flows = Vec::new();
    let mut waiting = Vec::new();
    for mut t in tickets.drain(..) {
        match tokio::time::timeout(Duration::ZERO, t.wait()).await {
            Ok(Err(e)) => {
                assert_eq!(e.outcome, outcome);
                if outcome == Outcome::EvictedFairShare {
                    assert_eq!(e.status(), (429, "ResourceExhausted"));
                    assert_eq!(e.dropped_reason(), Some("evicted-fair-share"));
                }
                flows.push(t.request().fairness_id.to_string());
            }
            Ok(Ok(_)) => panic!("nothing is dispatched here"),
            Err(_) => waiting.push(t),
        }
    }
    *tickets = waiting;
    flows
}

/// Review: one flow could fill a band, and every other tenant's request was then refused. With
/// a fairness policy that serves flows in turn, a full band now takes the newcomer's room from
/// its largest flow's newest requests; global strict keeps the reference's answer.
#[tokio::test(start_paused = true)]
async fn a_full_band_makes_room_from_its_largest_flow() {
    let config = |fairness| FlowConfig {
        bands: vec![BandConfig {
            max_requests: 4,
            ..band(0, fairness, OrderingPolicy::Fcfs)
        }],
        ..FlowConfig::default()
    };
    let fc = FlowControl::new(config(FairnessPolicy::RoundRobin));
    let log = Arc::new(Log::default());
    fc.set_observer(log.clone());
    let pool = FakePool::new(1, 0);
    fc.dispatch_cycle(Instant::now(), pool.as_ref());
    let mut hog = enqueue_all(&fc, &[("a", 0); 4]);
    let b = fc.enqueue(req("b", 0), Instant::now());
    assert!(b.is_queued(), "a newcomer gets the largest flow's room");
    assert_eq!(answered(&mut hog, Outcome::EvictedFairShare).await, ["a"]);
    assert_eq!(
        hog.len(),
        3,
        "the newest request gave way, the older ones wait on"
    );
    // The largest flow itself is refused; a third flow again takes from the largest.
    let e = refusal(&fc, req("a", 0)).await;
    assert_eq!(e.outcome, Outcome::RejectedCapacity);
    let c = fc.enqueue(req("c", 0), Instant::now());
    assert!(c.is_queued());
    assert_eq!(answered(&mut hog, Outcome::EvictedFairShare).await, ["a"]);
    // a: 2, b: 1, c: 1. b with one more would hold as much as a: nobody gives way.
    let e = refusal(&fc, req("b", 0)).await;
    assert_eq!(e.outcome, Outcome::RejectedCapacity);
    assert_eq!(fc.queued(), 4);
    let outcomes = log.0.lock().iter().map(|(_, o)| *o).collect::<Vec<_>>();
    assert_eq!(
        outcomes,
        [
            Outcome::EvictedFairShare,
            Outcome::RejectedCapacity,
            Outcome::EvictedFairShare,
            Outcome::RejectedCapacity
        ],
        "each displacement is recorded once"
    );
    drop((b, c));

    // Global strict serves one queue in arrival order: the newcomer is refused, as upstream.
    let fc = FlowControl::new(config(FairnessPolicy::GlobalStrict));
    fc.dispatch_cycle(Instant::now(), pool.as_ref());
    let mut hog = enqueue_all(&fc, &[("a", 0); 4]);
    let e = refusal(&fc, req("b", 0)).await;
    assert_eq!(e.outcome, Outcome::RejectedCapacity);
    assert!(
        answered(&mut hog, Outcome::EvictedFairShare)
            .await
            .is_empty()
    );
}

/// A round-robin band of `max_bytes`, its dispatcher's first reading taken (a pool of one).
fn round_robin_band_of_bytes(max_bytes: u64) -> Arc<FlowControl> {
    let fc = FlowControl::new(FlowConfig {
        bands: vec![BandConfig {
            max_bytes,
            ..band(0, FairnessPolicy::RoundRobin, OrderingPolicy::Fcfs)
        }],
        ..FlowConfig::default()
    });
    fc.dispatch_cycle(Instant::now(), FakePool::new(1, 0).as_ref());
    fc
}

/// `request` is refused for capacity, and none of `queued` is displaced for it.
async fn refused_displacing_nothing(
    fc: &Arc<FlowControl>,
    request: FlowRequest,
    queued: &mut Vec<Ticket>,
) {
    assert_eq!(
        refusal(fc, request).await.outcome,
        Outcome::RejectedCapacity
    );
    assert!(answered(queued, Outcome::EvictedFairShare).await.is_empty());
}

/// Review 9: with the band not full but the pool's caps full with a sheddable request among
/// them, fair share took a same-priority tenant's place and spared the sheddable one: with
/// eviction on, the sheddable request goes first. Review 17: skipping fair share whenever a
/// lower priority was queued let a flow shield itself with one sheddable request; so with
/// eviction off (the sheddable one stays), or a sheddable one too small to make the room, the
/// band's largest flow gives way, as with the band's own flows alone filling the caps.
#[tokio::test(start_paused = true)]
async fn the_pool_caps_full_of_lower_priorities_are_not_a_bands_fair_share() {
    let config = |eviction| FlowConfig {
        max_requests: 3,
        eviction,
        bands: vec![
            band(0, FairnessPolicy::RoundRobin, OrderingPolicy::Fcfs),
            band(-1, FairnessPolicy::GlobalStrict, OrderingPolicy::Fcfs),
        ],
        ..FlowConfig::default()
    };
    let started = |eviction| {
        let fc = FlowControl::new(config(eviction));
        fc.dispatch_cycle(Instant::now(), FakePool::new(1, 0).as_ref());
        fc
    };
    let fc = started(false);
    let mut a = enqueue_all(&fc, &[("a", 0), ("a", 0)]);
    let mut s = enqueue_all(&fc, &[("a", -1)]);
    assert!(fc.enqueue(req("b", 0), Instant::now()).is_queued());
    assert_eq!(answered(&mut a, Outcome::EvictedFairShare).await, ["a"]);
    assert!(answered(&mut s, Outcome::EvictedFairShare).await.is_empty());

    let fc = started(true);
    let mut a = enqueue_all(&fc, &[("a", 0), ("a", 0)]);
    let mut s = enqueue_all(&fc, &[("s", -1)]);
    assert!(fc.enqueue(req("b", 0), Instant::now()).is_queued());
    assert_eq!(answered(&mut s, Outcome::EvictedPriority).await, ["s"]);
    assert!(answered(&mut a, Outcome::EvictedFairShare).await.is_empty());

    // The band's own flows fill the pool's caps: the largest gives way, as in a full band.
    let fc = started(false);
    let mut a = enqueue_all(&fc, &[("a", 0), ("a", 0), ("a", 0)]);
    assert!(fc.enqueue(req("b", 0), Instant::now()).is_queued());
    assert_eq!(answered(&mut a, Outcome::EvictedFairShare).await, ["a"]);
}

/// Review 17 (second pass): with eviction on and a sheddable request too small to make the
/// room, fair share took it all from a same-priority flow and the sheddable request stayed.
/// The sheddable request goes first now, and fair share takes only the rest.
#[tokio::test(start_paused = true)]
async fn sheddable_requests_give_their_part_before_fair_share() {
    let fc = FlowControl::new(FlowConfig {
        max_bytes: 1_000,
        eviction: true,
        bands: vec![
            band(0, FairnessPolicy::RoundRobin, OrderingPolicy::Fcfs),
            band(-1, FairnessPolicy::GlobalStrict, OrderingPolicy::Fcfs),
        ],
        ..FlowConfig::default()
    });
    fc.dispatch_cycle(Instant::now(), FakePool::new(1, 0).as_ref());
    let sized = |flow: &str, priority, bytes| FlowRequest {
        bytes,
        ..req(flow, priority)
    };
    let mut a: Vec<Ticket> = (0..8)
        .map(|_| fc.enqueue(sized("a", 0, 100), Instant::now()))
        .collect();
    let mut s = vec![fc.enqueue(sized("s", -1, 100), Instant::now())];
    // 900 held; 300 more needs 200: the sheddable 100, then one of a's (not two).
    assert!(fc.enqueue(sized("b", 0, 300), Instant::now()).is_queued());
    assert_eq!(answered(&mut s, Outcome::EvictedPriority).await, ["s"]);
    assert_eq!(answered(&mut a, Outcome::EvictedFairShare).await, ["a"]);
}

/// Bytes too: a flow's share is the larger of its fractions of the two caps. The room is
/// taken only while the giving flow still holds more than the newcomer's, and never past
/// `MAX_FAIR_SHARE_EVICTIONS` displacements; a refusal displaces nothing.
#[tokio::test(start_paused = true)]
async fn fair_room_counts_bytes_and_is_bounded() {
    let sized = |flow: &str, bytes| FlowRequest {
        bytes,
        ..req(flow, 0)
    };
    let fc = round_robin_band_of_bytes(1_000);
    let mut hog: Vec<Ticket> = (0..5)
        .map(|_| fc.enqueue(sized("a", 200), Instant::now()))
        .collect();
    // Larger than the band: refused, nothing displaced.
    refused_displacing_nothing(&fc, sized("b", 1_001), &mut hog).await;
    // 500 bytes need three of a's: a then holds 400 (less than b), which is allowed, since a
    // held more than b's 500 before each one it gave.
    let b = fc.enqueue(sized("b", 500), Instant::now());
    assert!(b.is_queued());
    assert_eq!(
        answered(&mut hog, Outcome::EvictedFairShare).await,
        ["a"; 3]
    );
    drop(b);

    // 200 one-byte requests fill a 200-byte band; 70 bytes would need 70 displacements.
    let fc = round_robin_band_of_bytes(200);
    let mut hog: Vec<Ticket> = (0..200)
        .map(|_| fc.enqueue(sized("a", 1), Instant::now()))
        .collect();
    refused_displacing_nothing(&fc, sized("b", 70), &mut hog).await;
    const { assert!(MAX_FAIR_SHARE_EVICTIONS >= 60 && MAX_FAIR_SHARE_EVICTIONS < 70) };
    let b = fc.enqueue(sized("b", 60), Instant::now());
    assert!(b.is_queued());
    assert_eq!(
        answered(&mut hog, Outcome::EvictedFairShare).await.len(),
        60
    );
    assert_eq!(fc.queued(), 141);
}

#[tokio::test(start_paused = true)]
async fn ttl_expires_in_paused_time_with_the_regime_split() {
    let fc = FlowControl::new(FlowConfig {
        request_ttl: Some(Duration::from_secs(10)),
        no_endpoint_ttl: Some(Duration::from_secs(30)),
        ..FlowConfig::default()
    });
    // A saturated pool: requests wait and expire after 10 s (429 rejected-ttl-expired).
    let pool = FakePool::new(1, 0);
    let start = Instant::now();
    let mut t = fc.enqueue(req("a", 0), start);
    fc.dispatch_cycle(start + Duration::from_millis(9_999), pool.as_ref());
    assert!(t.is_queued() && fc.queued() == 1);
    fc.dispatch_cycle(start + Duration::from_secs(10), pool.as_ref());
    let e = t.wait().await.unwrap_err();
    assert_eq!(e.outcome, Outcome::EvictedTtl);
    assert_eq!(
        (e.status().0, e.dropped_reason()),
        (429, Some("rejected-ttl-expired"))
    );
    // The pool empties at 20 s: a request enqueued at 15 s gets 30 s from then (not 10 from
    // its arrival), and goes out 503 rejected-no-endpoints.
    let mut u = fc.enqueue(req("b", 0), start + Duration::from_secs(15));
    pool.endpoints.store(0, Ordering::Relaxed);
    fc.dispatch_cycle(start + Duration::from_secs(20), pool.as_ref());
    fc.dispatch_cycle(start + Duration::from_secs(49), pool.as_ref());
    assert_eq!(fc.queued(), 1);
    fc.dispatch_cycle(start + Duration::from_secs(50), pool.as_ref());
    let e = u.wait().await.unwrap_err();
    assert_eq!(e.outcome, Outcome::EvictedNoEndpoints);
    assert_eq!(
        (e.status().0, e.dropped_reason()),
        (503, Some("rejected-no-endpoints"))
    );
    // No TTL at all: waits forever.
    let fc = FlowControl::new(FlowConfig {
        request_ttl: None,
        no_endpoint_ttl: None,
        ..FlowConfig::default()
    });
    let _w = fc.enqueue(req("c", 0), start);
    fc.dispatch_cycle(start + Duration::from_secs(86_400), pool.as_ref());
    assert_eq!(fc.queued(), 1);
}

/// A pool that flaps between empty and not faster than either budget (replicas crash-looping)
/// charges each budget with the request's time in its regime, all stretches together, instead
/// of restarting it at each change: the request goes once it has waited `defaultRequestTTL`
/// with endpoints, even with no budget at all without them.
#[tokio::test(start_paused = true)]
async fn a_flapping_pool_charges_each_budget_instead_of_restarting_it() {
    for no_endpoint_ttl in [Some(Duration::from_secs(30)), None] {
        let fc = FlowControl::new(FlowConfig {
            request_ttl: Some(Duration::from_secs(10)),
            no_endpoint_ttl,
            ..FlowConfig::default()
        });
        let pool = FakePool::new(1, 0);
        let start = Instant::now();
        fc.dispatch_cycle(start, pool.as_ref());
        let mut t = fc.enqueue(req("a", 0), start);
        // Up for 5 s, empty for 5 s, and so on; a cycle every second. With endpoints: 0-5 s and
        // 10-15 s make 10 s, but 15-20 s is empty, so it goes at 20 s.
        for secs in 1..20u64 {
            pool.endpoints
                .store(usize::from((secs / 5).is_multiple_of(2)), Ordering::Relaxed);
            fc.dispatch_cycle(start + Duration::from_secs(secs), pool.as_ref());
            assert_eq!(
                fc.queued(),
                1,
                "still waiting at {secs} s ({no_endpoint_ttl:?})"
            );
        }
        pool.endpoints.store(1, Ordering::Relaxed);
        fc.dispatch_cycle(start + Duration::from_secs(20), pool.as_ref());
        assert_eq!(fc.queued(), 0, "held past its budget ({no_endpoint_ttl:?})");
        let e = t.wait().await.unwrap_err();
        assert_eq!(e.outcome, Outcome::EvictedTtl);
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_frees_its_place_at_once() {
    let fc = FlowControl::new(FlowConfig {
        bands: vec![BandConfig {
            max_requests: 1,
            ..BandConfig::default()
        }],
        ..FlowConfig::default()
    });
    let log = Arc::new(Log::default());
    fc.set_observer(log.clone());
    let pool = FakePool::new(1, 0);
    fc.dispatch_cycle(Instant::now(), pool.as_ref());
    let mut gone = fc.enqueue(req("gone", 0), Instant::now());
    // The client's future is dropped mid-wait (the ext_proc stream ended).
    assert!(
        tokio::time::timeout(Duration::from_millis(5), gone.wait())
            .await
            .is_err()
    );
    assert!(gone.is_queued());
    drop(gone);
    assert_eq!(fc.queued(), 0);
    assert_eq!(
        log.1.load(Ordering::Relaxed),
        0,
        "it left the queue gauge too"
    );
    assert_eq!(
        log.0.lock().as_slice(),
        [("gone".to_owned(), Outcome::EvictedContextCancelled)]
    );
    // Its place is free at once.
    assert!(fc.enqueue(req("next", 0), Instant::now()).is_queued());
}

#[tokio::test(start_paused = true)]
async fn a_dispatched_request_whose_client_left_releases_its_load() {
    let fc = FlowControl::new(FlowConfig::default());
    let pool = FakePool::new(1, 10);
    let t = fc.enqueue(req("a", 0), Instant::now());
    assert_eq!(fc.dispatch_cycle(Instant::now(), pool.as_ref()), 1);
    assert_eq!(fc.dispatched_unrouted(), 1);
    // Its 100-byte body: 25 tokens, for the concurrency detector's token modes.
    assert_eq!(
        fc.unrouted(),
        Unrouted {
            requests: 1,
            prompt_tokens: 25
        }
    );
    drop(t);
    assert_eq!(fc.dispatched_unrouted(), 0);
    assert_eq!(fc.unrouted(), Unrouted::default());
}

#[tokio::test(start_paused = true)]
async fn dispatched_requests_count_as_load_until_routed() {
    let fc = FlowControl::new(FlowConfig::default());
    let pool = FakePool::new(1, 2);
    let mut tickets = enqueue_all(&fc, &[("a", 0), ("a", 0), ("a", 0), ("a", 0)]);
    // Four wake-ups are worth four attempts, but two slots stop them at two.
    assert_eq!(fc.dispatch_cycle(Instant::now(), pool.as_ref()), 2);
    let admitted: Vec<Admitted> = {
        let mut out = Vec::new();
        for t in &mut tickets[..2] {
            out.push(t.wait().await.unwrap());
        }
        out
    };
    assert_eq!(fc.dispatch_cycle(Instant::now(), pool.as_ref()), 0);
    drop(admitted);
    assert_eq!(fc.dispatch_cycle(Instant::now(), pool.as_ref()), 2);
}

/// The waiting room: requests sent to an empty pool wait; an endpoint comes 5 s later and
/// every one of them is served, none lost. The dispatcher runs as in production (its own
/// task, 1 ms ticks), in paused time.
#[tokio::test(start_paused = true)]
async fn scale_from_zero_serves_every_waiting_request() {
    let fc = FlowControl::new(FlowConfig::default());
    let pool = FakePool::new(0, 1_000);
    let token = CancellationToken::new();
    let dispatcher = tokio::spawn(fc.clone().run(pool.clone(), token.clone()));
    let waiters: Vec<_> = (0..50)
        .map(|i| {
            let mut t = fc.enqueue(req(&format!("tenant-{}", i % 3), 0), Instant::now());
            tokio::spawn(async move { t.wait().await.map(|a| a.waited) })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fc.queued(), 50, "nothing goes out to an empty pool");
    pool.endpoints.store(1, Ordering::Relaxed);
    for w in waiters {
        let waited = w.await.unwrap().expect("served");
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
    }
    assert_eq!(fc.queued(), 0);
    token.cancel();
    dispatcher.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_answers_every_queued_request() {
    let fc = FlowControl::new(FlowConfig::default());
    let pool = FakePool::new(0, 1);
    let token = CancellationToken::new();
    let dispatcher = tokio::spawn(fc.clone().run(pool, token.clone()));
    let mut t = fc.enqueue(req("a", 0), Instant::now());
    tokio::time::sleep(Duration::from_millis(10)).await;
    token.cancel();
    dispatcher.await.unwrap();
    let e = t.wait().await.unwrap_err();
    assert_eq!(
        (e.status().0, e.dropped_reason()),
        (503, Some("rejected-shutting-down"))
    );
    // A request that arrives after the dispatcher stopped is answered at once, not held until
    // its TTL with no one left to let it go.
    let mut late = fc.enqueue(req("b", 0), Instant::now());
    let e = tokio::time::timeout(Duration::from_millis(1), late.wait())
        .await
        .expect("answered at once")
        .unwrap_err();
    assert_eq!(e.dropped_reason(), Some("rejected-shutting-down"));
    assert_eq!(fc.queued(), 0);
}

#[test]
fn a_queued_request_costs_little() {
    // The entry (ids, times, size, prompt tokens, channel handle); the body stays with the
    // stream.
    const { assert!(QUEUED_ENTRY_BYTES <= 72) };
}

/// One step of the band property test.
#[derive(Debug, Clone)]
enum BandOp {
    /// Queue a request of flow `0` (of 6), with an SLO of `1` ms when set, `2` ms later.
    Push(u8, Option<u8>, u8),
    /// Take the request the band picks (a dispatch).
    Dispatch,
    /// Take the `1`-th request of the `0`-th flow (a cancellation), when there is one.
    Cancel(u8, u8),
    /// Expire every head queued more than `0` ms ago.
    Expire(u8),
}

fn band_op() -> impl proptest::strategy::Strategy<Value = BandOp> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0u8..6, proptest::option::of(0u8..50), 0u8..4)
            .prop_map(|(f, slo, dt)| BandOp::Push(f, slo, dt)),
        2 => Just(BandOp::Dispatch),
        1 => (0u8..6, 0u8..4).prop_map(|(f, i)| BandOp::Cancel(f, i)),
        1 => (0u8..30).prop_map(BandOp::Expire),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: 256,
        rng_seed: proptest::test_runner::RngSeed::Fixed(16),
        failure_persistence: None,
        ..Default::default()
    })]
    /// Round robin and global strict find the next request without weighing every flow; what
    /// they find is what weighing every flow finds, whatever was queued, dispatched,
    /// cancelled or expired; expiry from the oldest request takes what a visit of every
    /// flow's head finds; and the indexes hold exactly what is queued (the newest request,
    /// eviction's victim, is the one a scan of every flow finds).
    #[test]
    fn a_bands_quick_pick_is_the_pick_of_weighing_every_flow(
        fairness in 0u8..2,
        ordering in 0u8..2,
        ops in proptest::collection::vec(band_op(), 1..80),
    ) {
        let fairness = [FairnessPolicy::GlobalStrict, FairnessPolicy::RoundRobin][fairness as usize].clone();
        let ordering = [OrderingPolicy::Fcfs, OrderingPolicy::SloDeadline][ordering as usize];
        let start = Instant::now();
        let mut now = start;
        let mut band = Band::new(band(0, fairness, ordering), true, now);
        let mut next_id = 0u64;
        let mut receivers = Vec::new();
        for op in ops {
            match op {
                BandOp::Push(flow, slo, dt) => {
                    now += Duration::from_millis(u64::from(dt));
                    let (tx, rx) = oneshot::channel();
                    receivers.push(rx);
                    band.push(
                        Arc::from(format!("flow-{flow}")),
                        Item {
                            id: next_id,
                            enqueued: now,
                            empty_clock_at_enqueue: 0,
                            deadline: slo.map(|ms| now + Duration::from_millis(u64::from(ms))),
                            bytes: 10,
                            prompt_tokens: 3,
                            tx,
                        },
                    );
                    next_id += 1;
                }
                BandOp::Dispatch => {
                    let quick = band.pick(now);
                    let weighed = band.pick_by_weighing_every_flow(now);
                    proptest::prop_assert_eq!(&quick, &weighed);
                    proptest::prop_assert_eq!(quick.is_some(), band.len > 0);
                    if let Some((flow, index)) = quick {
                        proptest::prop_assert!(band.take(&flow, index).is_some());
                        band.last_served = Some(flow);
                    }
                }
                BandOp::Cancel(flow, index) => {
                    let flow: Arc<str> = Arc::from(format!("flow-{flow}"));
                    let _ = band.take(&flow, usize::from(index));
                }
                BandOp::Expire(ms) => {
                    let cut = Duration::from_millis(u64::from(ms));
                    let expired = |head: &Item| now >= head.enqueued + cut;
                    let visited = band.expired_by_visiting_every_flow(expired);
                    let mut out = Vec::new();
                    band.expire_heads(expired, &mut out);
                    let ids: Vec<u64> = out.iter().map(|item| item.id).collect();
                    proptest::prop_assert_eq!(ids, visited);
                }
            }
            let queued: usize = band.flows.values().map(VecDeque::len).sum();
            proptest::prop_assert_eq!(queued as u64, band.len);
            proptest::prop_assert_eq!(band.bytes, 10 * band.len);
            proptest::prop_assert!(band.flows.values().all(|q| !q.is_empty()));
            if let Some(by_key) = &band.by_key {
                proptest::prop_assert_eq!(by_key.len(), queued);
            }
            proptest::prop_assert_eq!(band.by_id.len(), queued);
            // Round robin's shares follow the queues: each flow's (requests, bytes), by weight.
            if let Some(shares) = &band.shares {
                let held: HashMap<Arc<str>, (u64, u64)> = band
                    .flows
                    .iter()
                    .map(|(f, q)| (f.clone(), (q.len() as u64, q.iter().map(|i| i.bytes).sum())))
                    .collect();
                proptest::prop_assert_eq!(&shares.held, &held);
                let largest: BTreeSet<(u128, Arc<str>)> =
                    held.iter().map(|(f, &h)| (shares.weight(h), f.clone())).collect();
                proptest::prop_assert_eq!(&shares.largest, &largest);
            }
            // The newest request (eviction's first victim) is the largest id at any flow's back.
            let newest = band
                .flows
                .iter()
                .filter_map(|(flow, q)| q.back().map(|i| (i.id, flow.clone(), q.len() - 1)))
                .max_by_key(|(id, _, _)| *id)
                .map(|(_, flow, index)| (flow, index));
            proptest::prop_assert_eq!(band.newest(), newest);
        }
    }
}

/// Review 9: a ticket dropped after its refusal was sent (a TTL expiry the stream had not read
/// yet) was counted as the client's cancellation. It is counted as the refusal it was.
#[tokio::test(start_paused = true)]
async fn a_refusal_already_sent_is_counted_as_itself() {
    let fc = FlowControl::new(FlowConfig::default());
    let log = Arc::new(Log::default());
    fc.set_observer(log.clone());
    let pool = FakePool::new(1, 0);
    fc.dispatch_cycle(Instant::now(), pool.as_ref());
    let expired = fc.enqueue(req("a", 0), Instant::now());
    tokio::time::advance(Duration::from_secs(61)).await;
    fc.dispatch_cycle(Instant::now(), pool.as_ref());
    drop(expired);
    // A ticket still queued when dropped is the client's leaving.
    let waiting = fc.enqueue(req("b", 0), Instant::now());
    drop(waiting);
    let outcomes: Vec<_> = log.0.lock().iter().map(|(f, o)| (f.clone(), *o)).collect();
    assert_eq!(
        outcomes,
        [
            ("a".to_owned(), Outcome::EvictedTtl),
            ("b".to_owned(), Outcome::EvictedContextCancelled)
        ]
    );
}
