//! The LoRA placement loop against simulated engines on loopback, in paused time: passes
//! driven one by one (`Placement::pass`), the clock moved by `tokio::time::advance` (no
//! sleeps as synchronisation), demand counted as the director counts it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use endpoint_picker::datastore::{
    Datastore, EndpointId, EndpointSpec, EngineMetrics, PoolSpec, Readiness,
};
use endpoint_picker::lora::config::{self, MAX_ID_BYTES};
use endpoint_picker::lora::engine::MAX_LISTED_ADAPTERS;
use endpoint_picker::lora::plan::Action;
use epp::lora_placement::{
    MAX_CONCURRENT_CALLS, Placement, PlacementMetrics, PlacementSettings, PlacementSettingsArgs,
    read_api_key,
};
use prometheus_client::registry::Registry;

const CATALOGUE: &str = "\
vLLMLoRAConfig:
  ensureExist:
    models:
    - {id: a0, source: org/a0}
    - {id: a1, source: org/a1}
    - {id: a2, source: org/a2}
  ensureNotExist:
    models:
    - {id: banned, source: org/banned}
";

struct Rig {
    sims: Vec<sim::ReplicaHandle>,
    datastore: Arc<Datastore>,
    placement: Placement,
    metrics: PlacementMetrics,
}

/// The tests' placement settings: a pass a second, quick demand, `call_timeout` per call.
fn settings(catalogue_text: &str, call_timeout: Duration) -> PlacementSettings {
    PlacementSettingsArgs {
        catalogue: Some(config::parse(catalogue_text, true).unwrap()),
        interval: Duration::from_secs(1),
        min_dwell: Duration::from_secs(5),
        max_changes: 10,
        band: 0.25,
        min_rate: 0.05,
        demand_half_life: Duration::from_secs(1),
        max_adapters_per_endpoint: 0,
        call_timeout,
    }
    .check()
    .unwrap()
}

async fn rig(replicas: usize) -> Rig {
    rig_with(replicas, CATALOGUE).await
}

async fn rig_with(replicas: usize, catalogue_text: &str) -> Rig {
    let mut sims = Vec::new();
    for i in 0..replicas {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = sim::Config {
            max_loras: 2,
            ..sim::Config::fast()
        };
        sims.push(sim::spawn_replica(config, listener, i).await.unwrap());
    }
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr()).collect();
    let datastore = serving_pool(&addrs);
    let metrics = PlacementMetrics::default();
    let placement = Placement::new(
        settings(catalogue_text, Duration::from_secs(600)),
        datastore.clone(),
        metrics.clone(),
    );
    Rig {
        sims,
        datastore,
        placement,
        metrics,
    }
}

/// A pool of one serving endpoint (room for 2 adapters) at each of `addrs`.
fn serving_pool(addrs: &[SocketAddr]) -> Arc<Datastore> {
    let datastore = Arc::new(Datastore::new());
    let snapshot = datastore.apply(PoolSpec {
        name: "pool".into(),
        namespace: "default".into(),
        app_protocol: "http".into(),
        endpoints: addrs
            .iter()
            .enumerate()
            .map(|(i, &address)| EndpointSpec {
                name: format!("sim-{i}-rank-0"),
                pod_name: format!("sim-{i}"),
                namespace: "default".into(),
                address,
                metrics_address: address,
                rank: 0,
                labels: BTreeMap::new(),
            })
            .collect(),
    });
    for e in &snapshot.endpoints {
        e.store_metrics(EngineMetrics {
            max_active_models: 2,
            readiness: Readiness::Serving,
            ..EngineMetrics::default()
        });
    }
    datastore
}

impl Rig {
    fn id(&self, i: usize) -> EndpointId {
        self.datastore.snapshot().endpoints[i].id
    }

    fn holders(&self, adapter: &str) -> usize {
        self.sims
            .iter()
            .filter(|s| s.engine().has_lora(adapter))
            .count()
    }

    /// `n` requests for `adapter` routed (and finished) on endpoint 0.
    fn requests(&self, adapter: &str, n: usize) {
        let demand = self.placement.demand();
        for _ in 0..n {
            drop(demand.routed(adapter, self.id(0)));
        }
    }

    fn exposition(&self) -> String {
        let mut registry = Registry::default();
        self.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }
}

#[tokio::test(start_paused = true)]
async fn adapters_follow_demand_without_flapping_or_unloading_running_ones() {
    let rig = rig(3).await;
    // Someone else's forbidden adapter is on replica 0.
    rig.sims[0].engine().load_lora("banned").unwrap();
    let mut st = rig.placement.state();

    // No demand yet: the forbidden adapter goes, nothing is loaded.
    let r = rig.placement.pass(&mut st).await;
    assert_eq!(r.listed, 3);
    assert_eq!(
        r.done,
        [(
            Action::Unload {
                endpoint: rig.id(0),
                adapter: "banned".into()
            },
            "success"
        )]
    );
    assert!(!rig.sims[0].engine().has_lora("banned"));
    assert!(r.desired.values().all(|&n| n == 0));

    // a0 is hot (20 req/s), a1 warm (2 req/s): a0 on every replica, a1 on one.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        rig.requests("a0", 20);
        rig.requests("a1", 2);
        rig.placement.pass(&mut st).await;
    }
    assert_eq!((rig.holders("a0"), rig.holders("a1")), (3, 1));
    // The request path sees the lists.
    let listed = rig.datastore.snapshot().endpoints[0].adapters().unwrap();
    assert!(listed.contains("a0"));

    // The popularity shifts to a2; a0 keeps a request running on replica 0.
    let held = rig.placement.demand().routed("a0", rig.id(0)).unwrap();
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        rig.requests("a2", 20);
        rig.requests("a1", 2);
        rig.placement.pass(&mut st).await;
    }
    // a2 first takes the free slots (two replicas), and a0's slots only once their dwell
    // time is over; the running request keeps a0 on replica 0 whatever the demand.
    assert!(rig.holders("a2") >= 2, "{}", rig.holders("a2"));
    assert!(rig.sims[0].engine().has_lora("a0"));
    for _ in 0..6 {
        tokio::time::advance(Duration::from_secs(1)).await;
        rig.requests("a2", 20);
        rig.requests("a1", 2);
        rig.placement.pass(&mut st).await;
    }
    assert_eq!(rig.holders("a2"), 3);
    assert_eq!(rig.holders("a1"), 1);
    assert!(
        rig.sims[0].engine().has_lora("a0"),
        "a0 has a request running there"
    );
    drop(held);

    // Steady demand: passes change nothing (no flapping).
    let before = rig.exposition();
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(1)).await;
        rig.requests("a2", 20);
        rig.requests("a1", 2);
        let r = rig.placement.pass(&mut st).await;
        assert!(r.done.is_empty(), "{:?}", r.done);
    }
    let after = rig.exposition();
    let loads = |t: &str| {
        t.lines()
            .find(|l| {
                l.starts_with("inference_extension_lora_placement_actions_total")
                    && l.contains("action=\"load\"")
                    && l.contains("result=\"success\"")
            })
            .map(str::to_owned)
    };
    assert_eq!(loads(&before), loads(&after));
    assert!(
        after.contains("inference_extension_lora_placement_desired_replicas{adapter=\"a2\"} 3")
    );
    assert!(after.contains("inference_extension_lora_placement_replicas{adapter=\"a2\"} 3"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_engine_is_skipped_and_the_others_are_served() {
    let mut rig = rig(2).await;
    let mut st = rig.placement.state();
    let dead = rig.sims.pop().unwrap();
    dead.shutdown().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    rig.requests("a0", 20);
    rig.placement.pass(&mut st).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    rig.requests("a0", 20);
    let r = rig.placement.pass(&mut st).await;
    assert_eq!(r.listed, 1, "the dead endpoint is in backoff");
    assert!(rig.sims[0].engine().has_lora("a0"));
    assert!(
        rig.exposition()
            .contains("inference_extension_lora_placement_engine_errors_total 1")
    );
    // Its published list is gone: the request path does not count on it.
    assert!(rig.datastore.snapshot().endpoints[1].adapters().is_none());
}

/// Engines behind vLLM's `--api-key` list and load with `--lora-placement-api-key-file`'s key,
/// and refuse a placement without it.
#[tokio::test(start_paused = true)]
async fn the_api_key_is_sent_to_engines_that_want_one() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let keyed = sim::Config {
        max_loras: 2,
        api_key: Some("secret".into()),
        ..sim::Config::fast()
    };
    let sim = sim::spawn_replica(keyed, listener, 0).await.unwrap();
    let dir = std::env::temp_dir().join(format!("placement-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, "secret\n").unwrap();
    for key in [None, Some(read_api_key(&key_file).unwrap())] {
        let with_key = key.is_some();
        let datastore = serving_pool(&[sim.addr()]);
        let placement = Placement::new(
            PlacementSettings {
                api_key: key,
                ..settings(CATALOGUE, Duration::from_secs(600))
            },
            datastore.clone(),
            PlacementMetrics::default(),
        );
        let mut st = placement.state();
        for _ in 0..2 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let id = datastore.snapshot().endpoints[0].id;
            for _ in 0..20 {
                drop(placement.demand().routed("a0", id));
            }
            placement.pass(&mut st).await;
        }
        assert_eq!(sim.engine().has_lora("a0"), with_key);
    }
    // A key that cannot go into a header is refused at start-up.
    for bad in ["", " \n", "two words"] {
        std::fs::write(&key_file, bad).unwrap();
        let error = read_api_key(&key_file).unwrap_err().to_string();
        assert!(error.contains("--lora-placement-api-key-file"), "{error}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An engine whose API accepts connections and never answers holds a pass for
/// `MIN_LISTING_WAIT` at most, not a whole call timeout: the healthy endpoint gets its load
/// within that, and the hung one is backed off from when its listing was given up.
#[tokio::test(start_paused = true)]
async fn a_hung_engine_holds_a_pass_no_longer_than_the_listing_wait() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = sim::spawn_replica(
        sim::Config {
            max_loras: 2,
            ..sim::Config::fast()
        },
        listener,
        0,
    )
    .await
    .unwrap();
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            let (s, _) = hung.accept().await.unwrap();
            open.push(s); // read nothing, answer nothing
        }
    });
    let datastore = serving_pool(&[sim.addr(), hung_addr]);
    let placement = Placement::new(
        settings(CATALOGUE, Duration::from_secs(30)),
        datastore.clone(),
        PlacementMetrics::default(),
    );
    let mut st = placement.state();
    let healthy = datastore.snapshot().endpoints[0].id;
    let demand = placement.demand();
    let mut took = Vec::new();
    for _ in 0..2 {
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..20 {
            drop(demand.routed("a0", healthy));
        }
        let began = tokio::time::Instant::now();
        placement.pass(&mut st).await;
        took.push(began.elapsed());
    }
    assert!(
        sim.engine().has_lora("a0"),
        "the healthy endpoint was served"
    );
    assert!(
        took[0] <= epp::lora_placement::MIN_LISTING_WAIT + Duration::from_millis(500),
        "not a call timeout: {took:?}"
    );
    // Backed off from when it was given up: the next pass does not wait for it again.
    assert!(took[1] < Duration::from_secs(1), "{took:?}");
    assert!(datastore.snapshot().endpoints[1].adapters().is_none());
    held.abort();
}

fn load_errors(text: &str) -> u64 {
    text.lines()
        .find(|l| {
            l.starts_with("inference_extension_lora_placement_actions_total")
                && l.contains("action=\"load\"")
                && l.contains("result=\"error\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One catalogue adapter whose source the engine refuses: its load backs off, doubling up to
/// MAX_BACKOFF, although the endpoint lists fine every pass (that once reset the backoff, so
/// the load was retried every other pass), and the endpoint's healthy adapter stays published
/// throughout (each failure once blanked the list, and requests for it went anywhere).
#[tokio::test(start_paused = true)]
async fn a_refused_load_backs_off_alone_and_the_endpoint_stays_published() {
    let catalogue = "\
vLLMLoRAConfig:
  ensureExist:
    models:
    - {id: a0, source: org/a0}
    - {id: bad, source: /definitely/missing/adapter}
";
    let rig = rig_with(1, catalogue).await;
    let mut st = rig.placement.state();
    let mut blanked = 0;
    let passes = 30;
    for _ in 0..passes {
        tokio::time::advance(Duration::from_secs(1)).await;
        rig.requests("a0", 20);
        rig.requests("bad", 20);
        rig.placement.pass(&mut st).await;
        if rig.sims[0].engine().has_lora("a0")
            && rig.datastore.snapshot().endpoints[0].adapters().is_none()
        {
            blanked += 1;
        }
    }
    let errors = load_errors(&rig.exposition());
    // Tries at 1, 3, 7, 15 and 31 s (the interval doubled after each failure): 4 in 30 s.
    assert_eq!(
        (errors, blanked),
        (4, 0),
        "failed loads, passes with a0 unpublished"
    );
    assert!(
        rig.sims[0].engine().has_lora("a0"),
        "the healthy adapter was placed"
    );
}

/// An adapter the catalogue forbids is never published, even while requests for it run there:
/// lora-adapter-filter then sends no new request for it to that engine, which drains and
/// unloads it (published, it was kept busy, so loaded, by a trickle of requests).
#[tokio::test(start_paused = true)]
async fn a_forbidden_adapter_is_never_published_and_unloaded_once_idle() {
    let rig = rig(1).await;
    rig.sims[0].engine().load_lora("banned").unwrap();
    let e = rig.datastore.snapshot().endpoints[0].clone();
    e.store_metrics(EngineMetrics {
        max_active_models: 2,
        active_models: vec!["banned".into()],
        readiness: Readiness::Serving,
        ..EngineMetrics::default()
    });
    let mut st = rig.placement.state();
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(1)).await;
        rig.placement.pass(&mut st).await;
    }
    // Busy: still loaded, but not published.
    assert!(rig.sims[0].engine().has_lora("banned"));
    let listed = e.adapters().unwrap();
    assert!(!listed.contains("banned"), "published: {listed:?}");
    // Its requests are over: the next passes unload it.
    e.store_metrics(EngineMetrics {
        max_active_models: 2,
        readiness: Readiness::Serving,
        ..EngineMetrics::default()
    });
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        rig.placement.pass(&mut st).await;
    }
    assert!(!rig.sims[0].engine().has_lora("banned"));
}

/// An engine's `GET /v1/models` is read within bounds: at most MAX_LISTED_ADAPTERS names, none
/// longer than an adapter id may be, whatever the engine lists within its 4 MiB body.
#[tokio::test]
async fn an_engines_adapter_listing_is_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut body = String::from("{\"object\":\"list\",\"data\":[");
    body.push_str(&format!(
        "{{\"id\":\"{}\",\"parent\":\"b\"}}",
        "x".repeat(200_000)
    ));
    for i in 0..110_000 {
        body.push_str(&format!(",{{\"id\":\"a{i}\",\"parent\":\"b\"}}"));
    }
    body.push_str("]}");
    assert!(body.len() < 4 << 20, "{}", body.len());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = body.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let body = served.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    let datastore = serving_pool(&[addr]);
    let placement = Placement::new(
        settings(CATALOGUE, Duration::from_secs(30)),
        datastore.clone(),
        PlacementMetrics::default(),
    );
    let mut st = placement.state();
    let r = placement.pass(&mut st).await;
    assert_eq!(r.listed, 1);
    let listed = datastore.snapshot().endpoints[0].adapters().unwrap();
    let longest = listed.names.iter().map(String::len).max().unwrap();
    assert_eq!(
        (listed.names.len(), longest <= MAX_ID_BYTES),
        (MAX_LISTED_ADAPTERS, true)
    );
}

/// Engines counting their connections and the listings they serve at once.
#[derive(Default)]
struct Tally {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// `n` engines on loopback answering every adapter listing (an empty list) after `delay`, one
/// keep-alive request after another, counted in `tally`.
async fn listing_engines(n: usize, delay: Duration, tally: Arc<Tally>) -> Vec<SocketAddr> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut addrs = Vec::new();
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let tally = tally.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tally.connections.fetch_add(1, Ordering::SeqCst);
                let tally = tally.clone();
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    let mut line = String::new();
                    // One keep-alive request after another (no request body: listings).
                    loop {
                        line.clear();
                        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line != "\r\n" {
                            continue;
                        }
                        let now = tally.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        tally.most_in_flight.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        tally.in_flight.fetch_sub(1, Ordering::SeqCst);
                        let body = "{\"object\":\"list\",\"data\":[]}";
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.get_mut().write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    addrs
}

/// Review: each pass made a new HTTP client per endpoint (a new connection to every engine,
/// every pass), and listed every endpoint at once. Now one pool is kept across passes and at
/// most MAX_CONCURRENT_CALLS calls are in flight.
#[tokio::test]
async fn passes_reuse_one_connection_per_engine_and_bound_calls_in_flight() {
    const ENGINES: usize = MAX_CONCURRENT_CALLS + 8;
    let tally = Arc::new(Tally::default());
    // Slow enough for every listing not held back to overlap.
    let addrs = listing_engines(ENGINES, Duration::from_millis(20), tally.clone()).await;
    let datastore = serving_pool(&addrs);
    let placement = Placement::new(
        settings(CATALOGUE, Duration::from_secs(30)),
        datastore,
        PlacementMetrics::default(),
    );
    let mut st = placement.state();
    for _ in 0..3 {
        assert_eq!(placement.pass(&mut st).await.listed, ENGINES);
    }
    assert_eq!(
        tally.connections.load(Ordering::SeqCst),
        ENGINES,
        "one connection per engine, kept across passes"
    );
    let most = tally.most_in_flight.load(Ordering::SeqCst);
    assert!(most <= MAX_CONCURRENT_CALLS, "{most} listings at once");
    assert!(most > 1, "listings run side by side ({most})");
}

/// A listing's wait starts when it gets its call permit: in a pool larger than the permits,
/// healthy engines that each answer in 3 s (within the 5 s a listing may take) are all listed,
/// though the last of them answer 6 s into the pass. Paused time.
#[tokio::test(start_paused = true)]
async fn waiting_for_a_call_permit_is_no_listing_failure() {
    const ENGINES: usize = MAX_CONCURRENT_CALLS + 8;
    let tally = Arc::new(Tally::default());
    let addrs = listing_engines(ENGINES, Duration::from_secs(3), tally.clone()).await;
    let datastore = serving_pool(&addrs);
    let placement = Placement::new(
        settings(CATALOGUE, Duration::from_secs(30)),
        datastore.clone(),
        PlacementMetrics::default(),
    );
    let mut st = placement.state();
    let began = tokio::time::Instant::now();
    assert_eq!(placement.pass(&mut st).await.listed, ENGINES);
    assert!(
        began.elapsed() >= Duration::from_secs(6),
        "{:?}",
        began.elapsed()
    );
    assert!(
        datastore
            .snapshot()
            .endpoints
            .iter()
            .all(|e| e.adapters().is_some())
    );
}
