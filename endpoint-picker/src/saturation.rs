//! Saturation detection (`utilization-detector`): is the pool too busy for sheddable work?
//!
//! Each endpoint scores `max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold)`; an
//! endpoint with stale or missing metrics scores 1. The pool's saturation is the mean; at or
//! above 1 the pool is saturated and requests with a negative priority are shed (429). As a
//! filter it keeps endpoints with fresh metrics under both thresholds (scaled by
//! `1 + headroom`), and keeps everything if that would leave nothing.

use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::config::ConfigError;
use crate::config::params::{Params, parse_duration};
use crate::request::InferenceRequest;
use crate::scheduling::framework::{Candidate, CycleState, Filter, Plugin};
use crate::scheduling::plugins::scorers::plugin_named;

/// The detector with the reference's parameters.
#[derive(Debug, Clone)]
pub struct UtilizationDetector {
    /// Configured name.
    pub name: String,
    /// `queueDepthThreshold` (5).
    pub queue_depth_threshold: f64,
    /// `kvCacheUtilThreshold` (0.8).
    pub kv_cache_util_threshold: f64,
    /// `metricsStalenessThreshold` (200 ms).
    pub metrics_staleness_threshold: Duration,
    /// `headroom` (0.0) for the filter.
    pub headroom: f64,
}

impl Default for UtilizationDetector {
    fn default() -> Self {
        Self {
            name: "utilization-detector".into(),
            queue_depth_threshold: 5.0,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}
plugin_named!(UtilizationDetector, "utilization-detector");

/// The detector's parameters as written, with the reference's names.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DetectorYaml {
    queue_depth_threshold: Option<f64>,
    kv_cache_util_threshold: Option<f64>,
    metrics_staleness_threshold: Option<String>,
    headroom: Option<f64>,
}

impl UtilizationDetector {
    /// The detector its `parameters` describe, over the reference's defaults.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: DetectorYaml = p.decode()?;
        let mut d = Self {
            name: p.name(),
            ..Default::default()
        };
        if let Some(q) = y.queue_depth_threshold {
            if !(q.is_finite() && q > 0.0) {
                return Err(p.invalid("queueDepthThreshold", "must be > 0"));
            }
            d.queue_depth_threshold = q;
        }
        if let Some(kv) = y.kv_cache_util_threshold {
            if !(kv > 0.0 && kv <= 1.0) {
                return Err(p.invalid("kvCacheUtilThreshold", "must be in (0, 1]"));
            }
            d.kv_cache_util_threshold = kv;
        }
        if let Some(s) = y.metrics_staleness_threshold {
            d.metrics_staleness_threshold = parse_duration(&s).ok_or_else(|| {
                p.invalid(
                    "metricsStalenessThreshold",
                    format!("not a duration: {s:?}"),
                )
            })?;
        }
        if let Some(h) = y.headroom {
            if !(h.is_finite() && h >= 0.0) {
                return Err(p.invalid("headroom", "must be ≥ 0"));
            }
            d.headroom = h;
        }
        Ok(d)
    }

    /// The pool's saturation over `candidates` (≥ 1 means saturated; empty pool = 1).
    pub fn saturation(&self, candidates: &[Candidate], now: Instant) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let sum: f64 = candidates.iter().map(|c| self.endpoint_score(c, now)).sum();
        sum / candidates.len() as f64
    }

    /// True when sheddable requests should be rejected.
    pub fn is_saturated(&self, candidates: &[Candidate], now: Instant) -> bool {
        self.saturation(candidates, now) >= 1.0
    }

    fn endpoint_score(&self, c: &Candidate, now: Instant) -> f64 {
        if c.metrics.is_stale(now, self.metrics_staleness_threshold) {
            return 1.0;
        }
        let q =
            c.metrics.waiting_queue_size as f64 / self.queue_depth_threshold.max(f64::MIN_POSITIVE);
        let kv = c.metrics.kv_cache_usage / self.kv_cache_util_threshold.max(f64::MIN_POSITIVE);
        q.max(kv)
    }
}

impl Filter for UtilizationDetector {
    fn filter(
        &self,
        _: &InferenceRequest,
        state: &CycleState,
        c: Vec<Candidate>,
    ) -> Vec<Candidate> {
        let scale = 1.0 + self.headroom;
        let keep: Vec<Candidate> = c
            .iter()
            .filter(|c| {
                !c.metrics
                    .is_stale(state.now, self.metrics_staleness_threshold)
                    && (c.metrics.waiting_queue_size as f64) < self.queue_depth_threshold * scale
                    && c.metrics.kv_cache_usage < self.kv_cache_util_threshold * scale
            })
            .cloned()
            .collect();
        if keep.is_empty() { c } else { keep }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_util::{candidates, metrics};

    #[tokio::test(start_paused = true)]
    async fn saturation_is_mean_of_endpoint_scores() {
        let d = UtilizationDetector::default();
        let now = Instant::now();
        let c = candidates(&[metrics(0, 0, 0.4), metrics(10, 0, 0.0)]);
        // 0.5 and 2.0 → mean 1.25.
        assert!((d.saturation(&c, now) - 1.25).abs() < 1e-9);
        assert!(d.is_saturated(&c, now));
        let calm = candidates(&[metrics(1, 0, 0.1), metrics(0, 0, 0.2)]);
        assert!(!d.is_saturated(&calm, now));
        assert!(d.is_saturated(&[], now));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_metrics_count_as_saturated() {
        let d = UtilizationDetector::default();
        let c = candidates(&[metrics(0, 0, 0.0)]);
        tokio::time::advance(Duration::from_millis(201)).await;
        assert!(d.is_saturated(&c, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn filter_keeps_unsaturated_or_all() {
        let d = UtilizationDetector::default();
        let state = CycleState::new(Instant::now());
        let c = candidates(&[metrics(6, 0, 0.0), metrics(0, 0, 0.9), metrics(1, 0, 0.1)]);
        let kept = d.filter(&InferenceRequest::default(), &state, c);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].endpoint.spec.name, "pod-3-rank-0");
        let busy = candidates(&[metrics(6, 0, 0.0), metrics(9, 0, 0.0)]);
        assert_eq!(
            d.filter(&InferenceRequest::default(), &state, busy).len(),
            2
        );
    }
}
