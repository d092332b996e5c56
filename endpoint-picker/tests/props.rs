//! Property tests through the public API (proptest, fixed seeds): the prefix index against a
//! model of per-endpoint LRU lists (256 cases of up to 40 operations), and configuration
//! round-trips (64 cases): a generated valid `EndpointPickerConfig` loads with what it says,
//! and loading it twice with one seed schedules the same way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use endpoint_picker::config;
use endpoint_picker::datastore::{Datastore, EndpointId, EndpointSpec, EngineMetrics, PoolSpec};
use endpoint_picker::director::Director;
use endpoint_picker::prefix::PrefixIndex;
use endpoint_picker::request::InferenceRequest;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn config(cases: u32, seed: u64) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Insert {
        endpoint: u32,
        capacity: usize,
        hashes: Vec<u64>,
    },
    Retain {
        live: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4u32, 0..6usize, prop::collection::vec(0..12u64, 0..7)).prop_map(
            |(endpoint, capacity, hashes)| Op::Insert { endpoint, capacity, hashes }
        ),
        1 => any::<u8>().prop_map(|live| Op::Retain { live }),
    ]
}

/// The model: per endpoint its blocks, least recently used first.
fn apply(model: &mut [Vec<u64>], op: &Op) {
    match op {
        Op::Insert {
            endpoint,
            capacity,
            hashes,
        } => {
            if hashes.is_empty() {
                return;
            }
            let lru = &mut model[*endpoint as usize];
            // The deepest block is touched first, so the leading block ends up most recent.
            for h in hashes.iter().rev() {
                lru.retain(|x| x != h);
                lru.push(*h);
            }
            while lru.len() > (*capacity).max(1) {
                lru.remove(0);
            }
        }
        Op::Retain { live } => {
            for (i, lru) in model.iter_mut().enumerate() {
                if live & (1 << i) == 0 {
                    lru.clear();
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256, 0x009e_f1c5))]

    #[test]
    fn the_prefix_index_is_bounded_and_evicts_least_recently_used_first(
        ops in prop::collection::vec(op(), 1..40),
        query in prop::collection::vec(0..12u64, 0..8),
    ) {
        let index = PrefixIndex::new();
        let mut model = vec![Vec::new(); 4];
        for op in &ops {
            match op {
                Op::Insert { endpoint, capacity, hashes } => {
                    index.insert(EndpointId(*endpoint), *capacity, hashes);
                    if !hashes.is_empty() {
                        // Bounded: the endpoint holds at most `capacity` blocks right after.
                        let held = (0..12u64)
                            .filter(|h| {
                                let mut m = vec![0u32; 4];
                                index.match_lengths(&[*h], &mut m);
                                m[*endpoint as usize] == 1
                            })
                            .count();
                        prop_assert!(held <= (*capacity).max(1), "{} > {}", held, capacity);
                    }
                }
                Op::Retain { live } => index.retain(|id| live & (1 << id.0) != 0),
            }
            apply(&mut model, op);
            prop_assert_eq!(index.len(), model.iter().map(Vec::len).sum::<usize>());
            for h in 0..12u64 {
                let mut matched = vec![0u32; 4];
                index.match_lengths(&[h], &mut matched);
                for (e, lru) in model.iter().enumerate() {
                    prop_assert_eq!(matched[e] == 1, lru.contains(&h), "endpoint {} block {}", e, h);
                }
            }
        }
        // Matching counts the leading blocks each endpoint holds.
        let mut matched = vec![0u32; 4];
        index.match_lengths(&query, &mut matched);
        for (e, lru) in model.iter().enumerate() {
            let want = query.iter().take_while(|h| lru.contains(h)).count() as u32;
            prop_assert_eq!(matched[e], want, "endpoint {}", e);
        }
    }
}

/// A valid configuration and what loading it must give.
#[derive(Debug, Clone)]
struct Generated {
    yaml: String,
    scorers: Vec<(&'static str, f64)>,
    picker: &'static str,
    max_endpoints: usize,
    producer: Option<(bool, usize, usize, usize)>,
    detector: Option<(f64, f64, u64, f64)>,
}

const SCORERS: [(&str, &str); 8] = [
    ("queue-scorer", ""),
    ("kv-cache-utilization-scorer", ""),
    ("running-requests-size-scorer", ""),
    ("lora-affinity-scorer", ""),
    ("load-aware-scorer", "{threshold: 64}"),
    (
        "active-request-scorer",
        "{idleThreshold: 1, maxBusyScore: 0.75}",
    ),
    ("no-hit-lru-scorer", "{lruSize: 16}"),
    ("prefix-cache-scorer", ""),
];

fn generated() -> impl Strategy<Value = Generated> {
    (
        prop::sample::subsequence((0..SCORERS.len()).collect::<Vec<_>>(), 1..=SCORERS.len()),
        prop::collection::vec((0..40u32).prop_map(|w| f64::from(w) / 4.0), SCORERS.len()),
        prop::sample::select(vec!["max-score-picker", "random-picker", "weighted-random-picker"]),
        1..5usize,
        prop::option::of((any::<bool>(), 1..64usize, 1..512usize, 1..50_000usize)),
        prop::option::of((1..40u32, 1..=20u32, 1..5_000u64, 0..10u32)),
        prop::sample::select(vec![
            "inference.networking.x-k8s.io/v1alpha1",
            "llm-d.ai/v1alpha1",
        ]),
    )
        .prop_map(|(chosen, weights, picker, max, producer, detector, api)| {
            let mut yaml = format!("apiVersion: {api}\nkind: EndpointPickerConfig\nplugins:\n");
            let mut refs = String::new();
            let mut scorers = Vec::new();
            for &i in &chosen {
                let (t, params) = SCORERS[i];
                if params.is_empty() {
                    yaml.push_str(&format!("- type: {t}\n"));
                } else {
                    yaml.push_str(&format!("- type: {t}\n  parameters: {params}\n"));
                }
                refs.push_str(&format!("  - pluginRef: {t}\n    weight: {}\n", weights[i]));
                scorers.push((t, weights[i]));
            }
            yaml.push_str(&format!(
                "- type: {picker}\n  parameters:\n    maxNumOfEndpoints: {max}\n"
            ));
            refs.push_str(&format!("  - pluginRef: {picker}\n"));
            let producer = producer.filter(|_| chosen.contains(&7));
            if let Some((auto, tokens, blocks, capacity)) = producer {
                yaml.push_str(&format!(
                    "- type: approx-prefix-cache-producer\n  parameters: {{autoTune: {auto}, \
                     blockSizeTokens: {tokens}, maxPrefixBlocksToMatch: {blocks}, \
                     lruCapacityPerServer: {capacity}}}\n"
                ));
            }
            let detector = detector.map(|(q, kv, ms, h)| {
                (f64::from(q) / 2.0, f64::from(kv) / 20.0, ms, f64::from(h) / 10.0)
            });
            if let Some((q, kv, ms, h)) = detector {
                yaml.push_str(&format!(
                    "- type: utilization-detector\n  parameters:\n    queueDepthThreshold: {q}\n    \
                     kvCacheUtilThreshold: {kv}\n    metricsStalenessThreshold: {ms}ms\n    \
                     headroom: {h}\n"
                ));
            }
            yaml.push_str("schedulingProfiles:\n- name: default\n  plugins:\n");
            yaml.push_str(&refs);
            Generated {
                yaml,
                scorers,
                picker,
                max_endpoints: max,
                producer,
                detector,
            }
        })
}

fn endpoint(n: u8) -> EndpointSpec {
    let address = SocketAddr::from(([10, 0, 0, n], 8000));
    EndpointSpec {
        name: format!("pod-{n}-rank-0"),
        pod_name: format!("pod-{n}"),
        namespace: "default".into(),
        address,
        metrics_address: address,
        rank: 0,
        labels: Default::default(),
    }
}

/// The destinations of a fixed sequence of requests over a fixed pool.
fn decisions(yaml: &str, seed: u64) -> Vec<String> {
    let ds = Arc::new(Datastore::new());
    let snap = ds.apply(PoolSpec {
        name: "pool".into(),
        namespace: "default".into(),
        app_protocol: "http".into(),
        endpoints: (1..=4).map(endpoint).collect(),
    });
    for (i, e) in snap.endpoints.iter().enumerate() {
        e.store_metrics(EngineMetrics {
            waiting_queue_size: (i as u64 * 7) % 5,
            running_requests: i as u64,
            kv_cache_usage: (i as f64 * 0.37) % 1.0,
            updated_at: Some(tokio::time::Instant::now()),
            ..Default::default()
        });
    }
    let d = Director::new(ds, Arc::new(config::load(yaml, seed).unwrap()), seed);
    d.pool_changed();
    let mut held = Vec::new();
    (0..12)
        .map(|i| {
            let request = InferenceRequest {
                model: "m".into(),
                target_model: "m".into(),
                prompt: Bytes::from(format!("conversation {} ", i % 3).repeat(60)),
                ..Default::default()
            };
            let routed = d.route(&request, None, false).unwrap();
            let destination = routed.destination();
            held.push(routed);
            destination
        })
        .collect()
}

proptest! {
    #![proptest_config(config(64, 0x000c_0f16))]

    #[test]
    fn a_generated_config_loads_with_what_it_says_and_deterministically(
        g in generated(),
        seed in any::<u64>(),
    ) {
        let c = config::load(&g.yaml, seed).unwrap_or_else(|e| panic!("{e}\n{}", g.yaml));
        prop_assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let profiles = c.scheduler.profiles();
        prop_assert_eq!(profiles.len(), 1);
        let scorers: Vec<(&str, f64)> =
            profiles[0].scorers.iter().map(|(s, w)| (s.type_name(), *w)).collect();
        prop_assert_eq!(scorers, g.scorers.clone());
        prop_assert_eq!(profiles[0].picker.type_name(), g.picker);
        let needs_producer = g
            .scorers
            .iter()
            .any(|(t, _)| *t == "prefix-cache-scorer" || *t == "no-hit-lru-scorer");
        prop_assert_eq!(c.prefix_producers.len(), usize::from(needs_producer));
        if let Some((auto, tokens, blocks, capacity)) = g.producer {
            let p = &c.prefix_producers[0].params;
            prop_assert_eq!(
                (p.auto_tune, p.block_size_tokens, p.max_prefix_blocks, p.lru_capacity_per_server),
                (auto, tokens, blocks, capacity)
            );
        }
        if let Some((q, kv, ms, h)) = g.detector {
            let d = c.saturation_detector.utilization().unwrap();
            prop_assert_eq!(d.queue_depth_threshold, q);
            prop_assert_eq!(d.kv_cache_util_threshold, kv);
            prop_assert_eq!(d.metrics_staleness_threshold.as_millis(), u128::from(ms));
            prop_assert_eq!(d.headroom, h);
        }
        let first = decisions(&g.yaml, seed);
        prop_assert_eq!(first.iter().filter(|d| d.split(',').count() > g.max_endpoints).count(), 0);
        prop_assert_eq!(&first, &decisions(&g.yaml, seed), "same config, same seed, same decisions");
    }
}
