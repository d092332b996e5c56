//! Property tests of the scorers and pickers (proptest, fixed seeds, 128 cases each).
//!
//! Scorers are tested raw, as the scheduler calls them, before its clamping: over arbitrary
//! candidates and metrics (NaN and infinite KV use included), in-flight counts, prefix matches
//! and parameters, every score is finite and in `[0, 1]`. Pickers only ever return candidates
//! they were given, each once, at most `maxNumOfEndpoints` of them and at least one.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::cost::{TtftCostProducer, TtftCostScorer};
use super::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use super::scorers::{
    ActiveRequestScorer, KvCacheUtilizationScorer, LoadAwareScorer, LoraAffinityScorer,
    NoHitLruScorer, PrefixCacheScorer, QueueScorer, RunningRequestsScorer,
};
use super::session::{Algorithm, SessionAffinityScorer};
use super::test_util::candidates;
use crate::datastore::EngineMetrics;
use crate::request::InferenceRequest;
use crate::scheduling::{
    CycleState, DataProducer, EndpointLoad, InFlightCounts, Picker, PrefixMatch, Scored, Scorer,
};

fn config(seed: u64) -> Config {
    Config {
        cases: 128,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    }
}

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0..=1.0f64,
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
    ]
}

fn names() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "ad", "x"]), 0..4)
        .prop_map(|v| v.into_iter().map(str::to_owned).collect())
}

fn metrics() -> impl Strategy<Value = EngineMetrics> {
    (
        prop_oneof![0..20u64, any::<u64>()],
        prop_oneof![0..20u64, any::<u64>()],
        any_f64(),
        names(),
        names(),
        any::<u32>(),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u64>()),
    )
        .prop_map(
            |(waiting, running, kv, active, queued, max, block, blocks)| EngineMetrics {
                waiting_queue_size: waiting,
                running_requests: running,
                kv_cache_usage: kv,
                active_models: active,
                waiting_models: queued,
                max_active_models: max % 4,
                cache_block_size: block,
                cache_num_blocks: blocks,
                updated_at: Some(tokio::time::Instant::now()),
                ..Default::default()
            },
        )
}

/// Everything a scoring cycle can look like.
#[derive(Debug, Clone)]
struct Cycle {
    metrics: Vec<EngineMetrics>,
    in_flight: Vec<u64>,
    /// `None`: no prefix producer ran. Else `(hashes, matched per endpoint id)`.
    prefix: Option<(usize, Vec<u32>)>,
    target: String,
    threshold: u64,
    idle: u64,
    max_busy: f64,
    lru_size: usize,
    /// Cold routings the no-hit-LRU scorer learnt before, by candidate index.
    history: Vec<usize>,
}

fn cycle() -> impl Strategy<Value = Cycle> {
    (
        prop::collection::vec(metrics(), 0..8),
        prop::collection::vec(prop_oneof![0..5u64, any::<u64>()], 8),
        prop::option::of((0..6usize, prop::collection::vec(0..8u32, 9))),
        prop::sample::select(vec!["a", "ad", "m"]),
        any::<u64>(),
        prop_oneof![0..4u64, any::<u64>()],
        0.0..=1.0f64,
        1..6usize,
        prop::collection::vec(0..8usize, 0..10),
    )
        .prop_map(
            |(metrics, in_flight, prefix, target, threshold, idle, max_busy, lru_size, history)| {
                Cycle {
                    metrics,
                    in_flight,
                    prefix,
                    target: target.to_owned(),
                    threshold,
                    idle,
                    max_busy,
                    lru_size,
                    history,
                }
            },
        )
}

fn scorers(c: &Cycle) -> Vec<Box<dyn Scorer>> {
    vec![
        Box::new(QueueScorer { name: "q".into() }),
        Box::new(RunningRequestsScorer { name: "r".into() }),
        Box::new(KvCacheUtilizationScorer { name: "kv".into() }),
        Box::new(PrefixCacheScorer { name: "p".into() }),
        Box::new(LoraAffinityScorer { name: "l".into() }),
        Box::new(LoadAwareScorer {
            name: "la".into(),
            threshold: c.threshold,
        }),
        Box::new(ActiveRequestScorer {
            name: "a".into(),
            idle_threshold: c.idle,
            max_busy_score: c.max_busy,
        }),
        Box::new(NoHitLruScorer::new("lru".into(), c.lru_size)),
        Box::new(TtftCostScorer::default()),
        Box::new(SessionAffinityScorer::new(
            "s".into(),
            Algorithm::SessionIdHeader,
            "x-session-token".into(),
            std::time::Duration::from_secs(600),
            2,
        )),
    ]
}

proptest! {
    #![proptest_config(config(0x005c_07e5))]

    #[test]
    fn every_scorer_scores_in_the_unit_interval(c in cycle()) {
        let cands = candidates(&c.metrics);
        let mut state = CycleState::new(tokio::time::Instant::now());
        state.in_flight = InFlightCounts::new(Arc::new(
            c.in_flight
                .iter()
                .map(|&n| {
                    let load = EndpointLoad::default();
                    load.requests.store(n, Ordering::Relaxed);
                    load.prefilling.store(n / 2, Ordering::Relaxed);
                    load.prefill_tokens.store(n.saturating_mul(100), Ordering::Relaxed);
                    Arc::new(load)
                })
                .collect(),
        ));
        if let Some((blocks, matched)) = &c.prefix {
            state.prefix = Some(PrefixMatch {
                hashes: (0..*blocks as u64).collect(),
                // What the prefix producer writes: never more than the request's blocks.
                matched: matched.iter().map(|&m| m.min(*blocks as u32)).collect(),
                block_tokens: 16,
                tokens_through: Vec::new(),
            });
        }
        let request = InferenceRequest {
            target_model: c.target.clone(),
            ..Default::default()
        };
        // The cost scorer reads what its producer predicts.
        TtftCostProducer::default().produce(&request, &cands, &mut state);
        for scorer in scorers(&c) {
            if !cands.is_empty() {
                for &i in &c.history {
                    let target = &cands[i % cands.len()];
                    scorer.pre_request(&request, &state, std::slice::from_ref(target));
                }
            }
            let mut scores = vec![f64::NAN; cands.len()];
            scorer.score(&request, &state, &cands, &mut scores);
            for (i, s) in scores.iter().enumerate() {
                prop_assert!(
                    s.is_finite() && (0.0..=1.0).contains(s),
                    "{} scored candidate {i} {s} ({:?})",
                    scorer.type_name(),
                    c.metrics[i]
                );
            }
        }
    }

    #[test]
    fn the_prefix_score_is_a_fraction_even_of_an_inconsistent_match(
        blocks in 0..6usize,
        matched in prop::collection::vec(any::<u32>(), 0..4),
    ) {
        let cands = candidates(&[EngineMetrics::default(), EngineMetrics::default()]);
        let m = PrefixMatch {
            hashes: (0..blocks as u64).collect(),
            matched,
            block_tokens: 16,
            tokens_through: Vec::new(),
        };
        for c in &cands {
            let s = m.score(&c.endpoint);
            prop_assert!((0.0..=1.0).contains(&s), "{s}");
        }
    }

    #[test]
    fn pickers_pick_only_given_candidates_and_at_most_the_maximum(
        scores in prop::collection::vec(any_f64(), 0..8),
        max in 0..10usize,
        seed in any::<u64>(),
    ) {
        let ms: Vec<_> = scores.iter().map(|_| EngineMetrics::default()).collect();
        let cands = candidates(&ms);
        let given: HashSet<u32> = cands.iter().map(|c| c.endpoint.id.0).collect();
        let scored: Vec<Scored> = scores
            .iter()
            .enumerate()
            .map(|(index, &score)| Scored { index, score })
            .collect();
        let pickers: Vec<Box<dyn Picker>> = vec![
            Box::new(MaxScorePicker { name: "m".into(), max_endpoints: max }),
            Box::new(RandomPicker { name: "r".into(), max_endpoints: max }),
            Box::new(WeightedRandomPicker { name: "w".into(), max_endpoints: max }),
        ];
        for picker in pickers {
            let mut rng = SmallRng::seed_from_u64(seed);
            let picked = picker.pick(scored.clone(), &mut rng);
            let ids: Vec<u32> = picked.iter().map(|p| cands[p.index].endpoint.id.0).collect();
            let unique: HashSet<u32> = ids.iter().copied().collect();
            prop_assert_eq!(unique.len(), ids.len(), "{} picked one twice", picker.type_name());
            prop_assert!(unique.is_subset(&given));
            prop_assert!(picked.len() <= max.max(1));
            prop_assert_eq!(picked.len(), scored.len().min(max.max(1)));
            if picker.type_name() == "max-score-picker" && !picked.is_empty() {
                let best = scored.iter().map(|s| s.score).max_by(f64::total_cmp);
                prop_assert_eq!(
                    best.map(f64::to_bits),
                    Some(picked[0].score.to_bits()),
                    "the primary has the best score"
                );
            }
        }
    }
}
