//! The LoRA placement loop against simulated engines on loopback, in paused time: passes
//! driven one by one (`Placement::pass`), the clock moved by `tokio::time::advance` (no
//! sleeps as synchronisation), demand counted as the director counts it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::datastore::{
    Datastore, EndpointId, EndpointSpec, EngineMetrics, PoolSpec, Readiness,
};
use endpoint_picker::lora::config;
use endpoint_picker::lora::plan::Action;
use epp::lora_placement::{Placement, PlacementMetrics, PlacementSettingsArgs};
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

async fn rig(replicas: usize) -> Rig {
    let mut sims = Vec::new();
    for i in 0..replicas {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = sim::Config {
            max_loras: 2,
            ..sim::Config::fast()
        };
        sims.push(sim::spawn_replica(config, listener, i).await.unwrap());
    }
    let datastore = Arc::new(Datastore::new());
    let snapshot = datastore.apply(PoolSpec {
        name: "pool".into(),
        namespace: "default".into(),
        app_protocol: "http".into(),
        endpoints: sims
            .iter()
            .enumerate()
            .map(|(i, s)| EndpointSpec {
                name: format!("sim-{i}-rank-0"),
                pod_name: format!("sim-{i}"),
                namespace: "default".into(),
                address: s.addr(),
                metrics_address: s.addr(),
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
    let settings = PlacementSettingsArgs {
        catalogue: Some(config::parse(CATALOGUE, true).unwrap()),
        interval: Duration::from_secs(1),
        min_dwell: Duration::from_secs(5),
        max_changes: 10,
        band: 0.25,
        min_rate: 0.05,
        demand_half_life: Duration::from_secs(1),
        max_adapters_per_endpoint: 0,
        call_timeout: Duration::from_secs(600),
    }
    .check()
    .unwrap();
    let metrics = PlacementMetrics::default();
    let placement = Placement::new(settings, datastore.clone(), metrics.clone());
    Rig {
        sims,
        datastore,
        placement,
        metrics,
    }
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
