//! Scorers: each maps candidates to `[0, 1]`, higher is better.

use crate::request::InferenceRequest;
use crate::scheduling::framework::{Candidate, CycleState, Plugin, Scorer};

macro_rules! plugin_named {
    ($ty:ident, $type_name:literal) => {
        impl Plugin for $ty {
            fn type_name(&self) -> &'static str {
                $type_name
            }
            fn name(&self) -> &str {
                &self.name
            }
        }
    };
}
pub(crate) use plugin_named;

/// Min-max normalisation where lower raw values are better: `(max − v) / (max − min)`;
/// all-equal candidates all score 1.
fn lower_is_better(values: impl Iterator<Item = f64> + Clone, scores: &mut [f64]) {
    let (min, max) = values
        .clone()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let range = max - min;
    for (s, v) in scores.iter_mut().zip(values) {
        *s = if range > 0.0 { (max - v) / range } else { 1.0 };
    }
}

/// `queue-scorer`: fewer waiting requests is better (min-max over the candidates).
#[derive(Debug)]
pub struct QueueScorer {
    /// Configured name.
    pub name: String,
}
plugin_named!(QueueScorer, "queue-scorer");

impl Scorer for QueueScorer {
    fn score(&self, _: &InferenceRequest, _: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        lower_is_better(
            c.iter().map(|c| c.metrics.waiting_queue_size as f64),
            scores,
        );
    }
}

/// `running-requests-size-scorer`: fewer running requests is better (min-max).
#[derive(Debug)]
pub struct RunningRequestsScorer {
    /// Configured name.
    pub name: String,
}
plugin_named!(RunningRequestsScorer, "running-requests-size-scorer");

impl Scorer for RunningRequestsScorer {
    fn score(&self, _: &InferenceRequest, _: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        lower_is_better(c.iter().map(|c| c.metrics.running_requests as f64), scores);
    }
}

/// `kv-cache-utilization-scorer`: `1 − kv_usage`.
#[derive(Debug)]
pub struct KvCacheUtilizationScorer {
    /// Configured name.
    pub name: String,
}
plugin_named!(KvCacheUtilizationScorer, "kv-cache-utilization-scorer");

impl Scorer for KvCacheUtilizationScorer {
    fn score(&self, _: &InferenceRequest, _: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        for (s, c) in scores.iter_mut().zip(c) {
            *s = 1.0 - c.metrics.kv_cache_usage.clamp(0.0, 1.0);
        }
    }
}

/// `prefix-cache-scorer`: the fraction of the request's prefix blocks the endpoint holds,
/// as computed by the prefix producer.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    /// Configured name.
    pub name: String,
}
plugin_named!(PrefixCacheScorer, "prefix-cache-scorer");

impl Scorer for PrefixCacheScorer {
    fn score(&self, _: &InferenceRequest, state: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        match &state.prefix {
            Some(m) => {
                for (s, c) in scores.iter_mut().zip(c) {
                    *s = m.score(&c.endpoint);
                }
            }
            None => scores.iter_mut().for_each(|s| *s = 0.0),
        }
    }
}

/// `lora-affinity-scorer`: prefer endpoints where the target adapter is already loaded
/// (1.0), then endpoints with a free adapter slot (0.8), then endpoints where it is queued for
/// loading (0.6); 0 otherwise.
#[derive(Debug)]
pub struct LoraAffinityScorer {
    /// Configured name.
    pub name: String,
}
plugin_named!(LoraAffinityScorer, "lora-affinity-scorer");

impl Scorer for LoraAffinityScorer {
    fn score(&self, r: &InferenceRequest, _: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        let target = r.target_model.as_str();
        for (s, c) in scores.iter_mut().zip(c) {
            let m = &c.metrics;
            let active = m.active_models.iter().any(|a| a == target);
            let waiting = m.waiting_models.iter().any(|a| a == target);
            let used = m.active_models.len() + m.waiting_models.len();
            *s = if active {
                1.0
            } else if (used as u64) < u64::from(m.max_active_models) {
                0.8
            } else if waiting {
                0.6
            } else {
                0.0
            };
        }
    }
}

/// `load-aware-scorer` (llm-d): `0.5` for an empty queue, else `0.5 × (1 − min(w, t)/t)`.
#[derive(Debug)]
pub struct LoadAwareScorer {
    /// Configured name.
    pub name: String,
    /// Queue length at which the score reaches 0 (`threshold`, default 128).
    pub threshold: u64,
}
plugin_named!(LoadAwareScorer, "load-aware-scorer");

impl Scorer for LoadAwareScorer {
    fn score(&self, _: &InferenceRequest, _: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        let t = self.threshold.max(1) as f64;
        for (s, c) in scores.iter_mut().zip(c) {
            let w = c.metrics.waiting_queue_size as f64;
            *s = if w == 0.0 {
                0.5
            } else {
                0.5 * (1.0 - w.min(t) / t)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_util::{candidates, metrics};

    fn run(scorer: &dyn Scorer, req: &InferenceRequest, c: &[Candidate]) -> Vec<f64> {
        let mut s = vec![f64::NAN; c.len()];
        scorer.score(
            req,
            &CycleState::new(tokio::time::Instant::now()),
            c,
            &mut s,
        );
        s
    }

    #[test]
    fn queue_scorer_min_max() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(5, 0, 0.0), metrics(10, 0, 0.0)]);
        let s = run(
            &QueueScorer { name: "q".into() },
            &InferenceRequest::default(),
            &c,
        );
        assert_eq!(s, vec![1.0, 0.5, 0.0]);
        let equal = candidates(&[metrics(3, 0, 0.0), metrics(3, 0, 0.0)]);
        assert_eq!(
            run(
                &QueueScorer { name: "q".into() },
                &InferenceRequest::default(),
                &equal
            ),
            vec![1.0, 1.0]
        );
    }

    #[test]
    fn running_scorer_min_max() {
        let c = candidates(&[metrics(0, 4, 0.0), metrics(0, 0, 0.0)]);
        let s = run(
            &RunningRequestsScorer { name: "r".into() },
            &InferenceRequest::default(),
            &c,
        );
        assert_eq!(s, vec![0.0, 1.0]);
    }

    #[test]
    fn kv_scorer() {
        let c = candidates(&[metrics(0, 0, 0.25), metrics(0, 0, 1.5)]);
        let s = run(
            &KvCacheUtilizationScorer { name: "kv".into() },
            &InferenceRequest::default(),
            &c,
        );
        assert_eq!(s, vec![0.75, 0.0]);
    }

    #[test]
    fn prefix_scorer_reads_match() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let mut state = CycleState::new(tokio::time::Instant::now());
        let scorer = PrefixCacheScorer { name: "p".into() };
        let mut s = vec![0.0; 2];
        scorer.score(&InferenceRequest::default(), &state, &c, &mut s);
        assert_eq!(s, vec![0.0, 0.0]);
        let mut matched = vec![0; 2];
        matched[c[0].endpoint.id.0 as usize] = 3;
        matched[c[1].endpoint.id.0 as usize] = 1;
        state.prefix = Some(crate::scheduling::PrefixMatch {
            hashes: vec![1, 2, 3, 4],
            matched,
            block_tokens: 16,
        });
        scorer.score(&InferenceRequest::default(), &state, &c, &mut s);
        assert_eq!(s, vec![0.75, 0.25]);
    }

    #[test]
    fn lora_affinity_levels() {
        let mut loaded = metrics(0, 0, 0.0);
        loaded.active_models = vec!["ad".into()];
        loaded.max_active_models = 1;
        let mut free_slot = metrics(0, 0, 0.0);
        free_slot.active_models = vec!["other".into()];
        free_slot.max_active_models = 2;
        let mut queued = metrics(0, 0, 0.0);
        queued.active_models = vec!["x".into()];
        queued.waiting_models = vec!["ad".into()];
        queued.max_active_models = 1;
        let mut full = metrics(0, 0, 0.0);
        full.active_models = vec!["x".into()];
        full.max_active_models = 1;
        let c = candidates(&[loaded, free_slot, queued, full]);
        let req = InferenceRequest {
            target_model: "ad".into(),
            ..Default::default()
        };
        let s = run(&LoraAffinityScorer { name: "l".into() }, &req, &c);
        assert_eq!(s, vec![1.0, 0.8, 0.6, 0.0]);
    }

    #[test]
    fn load_aware() {
        let c = candidates(&[
            metrics(0, 0, 0.0),
            metrics(64, 0, 0.0),
            metrics(500, 0, 0.0),
        ]);
        let s = run(
            &LoadAwareScorer {
                name: "la".into(),
                threshold: 128,
            },
            &InferenceRequest::default(),
            &c,
        );
        assert_eq!(s, vec![0.5, 0.25, 0.0]);
    }
}
