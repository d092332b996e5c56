use super::*;

const SLOTS: usize = 2;

fn cfg() -> PlanConfig {
    PlanConfig {
        min_dwell: Duration::from_secs(30),
        max_changes: 100,
        band: 0.25,
        min_rate: 0.01,
    }
}

fn demand(rates: &[(&str, f64)]) -> Vec<AdapterDemand> {
    rates
        .iter()
        .map(|(n, r)| AdapterDemand {
            name: (*n).to_owned(),
            rate: *r,
            in_flight: 0,
        })
        .collect()
}

fn ep(id: u32, loaded: &[&str], since: Instant) -> EndpointState {
    EndpointState {
        id: EndpointId(id),
        capacity: SLOTS,
        loaded: loaded.iter().map(|a| ((*a).to_owned(), since)).collect(),
        busy: BTreeSet::new(),
    }
}

/// The endpoints' adapters after applying `actions`.
fn apply(endpoints: &[EndpointState], actions: &[Action]) -> Vec<BTreeSet<String>> {
    let mut out: Vec<BTreeSet<String>> = endpoints
        .iter()
        .map(|e| e.loaded.keys().cloned().collect())
        .collect();
    for a in actions {
        match a {
            Action::Load { endpoint, adapter } => {
                assert!(
                    out[endpoint.0 as usize].insert(adapter.clone()),
                    "{a:?} twice"
                );
            }
            Action::Unload { endpoint, adapter } => {
                assert!(out[endpoint.0 as usize].remove(adapter), "{a:?} not loaded");
            }
        }
    }
    out
}

fn holders(after: &[BTreeSet<String>], a: &str) -> usize {
    after.iter().filter(|l| l.contains(a)).count()
}

#[test]
fn a_cold_pool_gets_every_demanded_adapter_and_the_hot_one_spread() {
    let now = Instant::now();
    let eps: Vec<_> = (0..4).map(|i| ep(i, &[], now)).collect();
    let d = demand(&[("hot", 10.0), ("warm", 1.0), ("cool", 1.0), ("idle", 0.0)]);
    let p = plan(&cfg(), now, &d, &BTreeSet::new(), &eps, &BTreeMap::new());
    // 10/12 of 4 replicas rounds up to 4; the others 1; idle 0.
    assert_eq!(p.desired["hot"], 4);
    assert_eq!(
        (p.desired["warm"], p.desired["cool"], p.desired["idle"]),
        (1, 1, 0)
    );
    // Adapters on no replica come first: each gets one before the hot one gets more.
    let first: Vec<_> = p.actions[..3]
        .iter()
        .map(|a| match a {
            Action::Load { adapter, .. } => adapter.as_str(),
            Action::Unload { .. } => "unload",
        })
        .collect();
    assert_eq!(first, ["hot", "cool", "warm"]);
    let after = apply(&eps, &p.actions);
    assert_eq!(holders(&after, "hot"), 4);
    assert_eq!((holders(&after, "warm"), holders(&after, "cool")), (1, 1));
    assert!(after.iter().all(|l| l.len() <= SLOTS));
    // warm and cool spread to different replicas (the coolest free ones).
    assert!(
        !after
            .iter()
            .any(|l| l.contains("warm") && l.contains("cool"))
    );
}

#[test]
fn counts_have_hysteresis() {
    let now = Instant::now();
    let eps: Vec<_> = (0..4).map(|i| ep(i, &[], now)).collect();
    let prev = BTreeMap::from([("a".to_owned(), 3)]);
    // x = share × 4 replicas; a keeps 3 for x in (1.75, 3.25].
    for (share, want) in [(0.80, 3), (0.82, 4), (0.45, 3), (0.43, 2)] {
        let d = demand(&[("a", share), ("b", 1.0 - share)]);
        let p = plan(&cfg(), now, &d, &BTreeSet::new(), &eps, &prev);
        assert_eq!(p.desired["a"], want, "share {share}");
    }
    // Without a previous count, the plain rounding.
    let d = demand(&[("a", 0.45), ("b", 0.55)]);
    let p = plan(&cfg(), now, &d, &BTreeSet::new(), &eps, &BTreeMap::new());
    assert_eq!(p.desired["a"], 2);
}

#[test]
fn full_replicas_evict_only_idle_surplus_adapters_past_their_dwell() {
    let t0 = Instant::now();
    let later = t0 + Duration::from_secs(60);
    // Every slot taken by old adapters with no demand; "new" is wanted.
    let eps = vec![
        ep(0, &["old-a", "old-b"], t0),
        ep(1, &["old-c", "old-d"], t0),
    ];
    let d = demand(&[
        ("new", 5.0),
        ("old-a", 0.0),
        ("old-b", 0.0),
        ("old-c", 0.0),
        ("old-d", 0.0),
    ]);
    // Within the dwell time nothing moves.
    let p = plan(
        &cfg(),
        t0 + Duration::from_secs(10),
        &d,
        &BTreeSet::new(),
        &eps,
        &BTreeMap::new(),
    );
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    // Past it, the room is made first, on the same replica.
    let p = plan(&cfg(), later, &d, &BTreeSet::new(), &eps, &BTreeMap::new());
    assert_eq!(p.desired["new"], 2);
    assert!(matches!(&p.actions[0], Action::Unload { .. }));
    let after = apply(&eps, &p.actions);
    assert_eq!(holders(&after, "new"), 2);
    // Busy adapters are never unloaded, whatever else holds.
    let mut busy = eps.clone();
    for e in &mut busy {
        e.busy = e.loaded.keys().cloned().collect();
    }
    let p = plan(&cfg(), later, &d, &BTreeSet::new(), &busy, &BTreeMap::new());
    assert!(p.actions.is_empty(), "{:?}", p.actions);
}

#[test]
fn an_adapter_on_as_many_replicas_as_it_wants_is_not_evicted() {
    let t0 = Instant::now();
    let later = t0 + Duration::from_secs(60);
    // a and b each want their one replica; c has as much demand but no slot left.
    let eps = vec![ep(0, &["a"], t0), ep(1, &["b"], t0)];
    let mut eps = eps;
    for e in &mut eps {
        e.capacity = 1;
    }
    let d = demand(&[("a", 1.0), ("b", 1.0), ("c", 0.5)]);
    let p = plan(&cfg(), later, &d, &BTreeSet::new(), &eps, &BTreeMap::new());
    // Two slots, three adapters: the least demanded loses its place.
    assert_eq!((p.desired["a"], p.desired["b"], p.desired["c"]), (1, 1, 0));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
}

#[test]
fn changes_per_pass_are_bounded() {
    let now = Instant::now();
    let eps: Vec<_> = (0..8).map(|i| ep(i, &[], now)).collect();
    let names: Vec<String> = (0..16).map(|i| format!("a{i}")).collect();
    let d: Vec<_> = names
        .iter()
        .map(|n| AdapterDemand {
            name: n.clone(),
            rate: 1.0,
            in_flight: 0,
        })
        .collect();
    let c = PlanConfig {
        max_changes: 3,
        ..cfg()
    };
    let p = plan(&c, now, &d, &BTreeSet::new(), &eps, &BTreeMap::new());
    assert_eq!(p.actions.len(), 3);
}

#[test]
fn forbidden_adapters_go_when_idle_and_foreign_ones_stay() {
    let now = Instant::now();
    let mut e0 = ep(0, &["banned", "theirs"], now);
    let e1 = ep(1, &["banned"], now);
    e0.busy.insert("banned".into());
    let d = demand(&[("a", 1.0)]);
    let forbidden = BTreeSet::from(["banned".to_owned()]);
    let p = plan(
        &cfg(),
        now,
        &d,
        &forbidden,
        &[e0.clone(), e1.clone()],
        &BTreeMap::new(),
    );
    assert!(p.actions.contains(&Action::Unload {
        endpoint: EndpointId(1),
        adapter: "banned".into()
    }));
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::Unload { endpoint, .. } if *endpoint == EndpointId(0)))
    );
    // "theirs" (not in the catalogue) keeps its slot: e0 has none left for "a".
    let after = apply(&[e0, e1], &p.actions);
    assert!(after[0].contains("theirs"));
    assert!(after[1].contains("a"));
}

#[test]
fn an_adapter_with_requests_in_flight_but_no_rate_yet_is_placed() {
    let now = Instant::now();
    let eps = vec![ep(0, &[], now)];
    let d = vec![AdapterDemand {
        name: "new".into(),
        rate: 0.0,
        in_flight: 1,
    }];
    let p = plan(&cfg(), now, &d, &BTreeSet::new(), &eps, &BTreeMap::new());
    assert_eq!(p.desired["new"], 1);
    assert_eq!(p.actions.len(), 1);
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: 256,
        rng_seed: proptest::test_runner::RngSeed::Fixed(17),
        failure_persistence: None,
        ..Default::default()
    })]
    /// Whatever the demand and the holdings: at most `max_changes` actions, no busy adapter
    /// unloaded, no adapter unloaded before its dwell time (but forbidden ones), no replica
    /// past its slots by a load, and no adapter wanted on more replicas than exist.
    #[test]
    fn plans_keep_their_invariants(
        rates in proptest::collection::vec(0u8..20, 1..12),
        holdings in proptest::collection::vec(
            (proptest::collection::vec((0usize..12, 0u64..60, proptest::prelude::any::<bool>()), 0..4), 0usize..4),
            1..6,
        ),
        max_changes in 0usize..6,
    ) {
        let base = Instant::now();
        let now = base + Duration::from_secs(60);
        let names: Vec<String> = (0..12).map(|i| format!("a{i}")).collect();
        let d: Vec<AdapterDemand> = rates
            .iter()
            .enumerate()
            .map(|(i, &r)| AdapterDemand { name: names[i].clone(), rate: f64::from(r) / 4.0, in_flight: 0 })
            .collect();
        let forbidden = BTreeSet::from([names[11].clone()]);
        let eps: Vec<EndpointState> = holdings
            .iter()
            .enumerate()
            .map(|(i, (held, cap))| {
                let mut e = EndpointState {
                    id: EndpointId(i as u32),
                    capacity: *cap,
                    loaded: BTreeMap::new(),
                    busy: BTreeSet::new(),
                };
                for &(a, age, busy) in held {
                    e.loaded.insert(names[a].clone(), now - Duration::from_secs(age));
                    if busy {
                        e.busy.insert(names[a].clone());
                    }
                }
                e
            })
            .collect();
        let c = PlanConfig { max_changes, ..cfg() };
        let p = plan(&c, now, &d, &forbidden, &eps, &BTreeMap::new());
        proptest::prop_assert!(p.actions.len() <= max_changes);
        let replicas = eps.len();
        proptest::prop_assert!(p.desired.values().all(|&r| r <= replicas));
        let mut loaded: Vec<BTreeSet<String>> =
            eps.iter().map(|e| e.loaded.keys().cloned().collect()).collect();
        for a in &p.actions {
            match a {
                Action::Unload { endpoint, adapter } => {
                    let e = &eps[endpoint.0 as usize];
                    proptest::prop_assert!(!e.busy.contains(adapter), "busy {adapter} unloaded");
                    let since = e.loaded[adapter];
                    proptest::prop_assert!(
                        forbidden.contains(adapter) || now - since >= c.min_dwell,
                        "{adapter} unloaded within its dwell"
                    );
                    proptest::prop_assert!(loaded[endpoint.0 as usize].remove(adapter));
                }
                Action::Load { endpoint, adapter } => {
                    let i = endpoint.0 as usize;
                    proptest::prop_assert!(!forbidden.contains(adapter));
                    proptest::prop_assert!(loaded[i].insert(adapter.clone()));
                    proptest::prop_assert!(loaded[i].len() <= eps[i].capacity, "over slots: {:?}", loaded[i]);
                }
            }
        }
    }
}
