//! Saturation detection: how busy is the pool? Admission sheds sheddable work at saturation 1
//! (flow control off), and flow control dispatches a band only below its ceiling.
//!
//! Two detectors, with the reference's types and parameters: `utilization-detector` (the
//! default; from scraped engine metrics) and `concurrency-detector` (from the requests and
//! prompt tokens this EPP has in flight on each endpoint; see [`ConcurrencyDetector`]).
//!
//! `utilization-detector`: each endpoint scores `max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold)`; an
//! endpoint with stale or missing metrics scores 1. The pool's saturation is the mean; at or
//! above 1 the pool is saturated and requests with a negative priority are shed (429). As a
//! filter it keeps endpoints with fresh metrics under both thresholds (scaled by
//! `1 + headroom`), and keeps everything if that would leave nothing.
//!
//! A deviation from the reference: `waiting` is the engine's scraped count plus the requests
//! this EPP routed there since that scrape and still sees prefilling, at most 64 of them, and
//! what flow control has
//! let go but not routed yet adds `requests / (endpoints × queueDepthThreshold)` to the mean.
//! The reference reads the scrape alone, so everything queued between two scrapes (50 ms
//! apart) was let go against one reading; now each release counts against the next at once,
//! and the next scrape replaces the guess with the engine's count. Requests routed just before
//! a scrape that the engine had not queued yet (its intake: parsing, templating) are missed
//! until the next one, and those since it that the engine already runs are counted as waiting:
//! a window wider than the scrape's (review 11 tried 25 ms more) counted a healthy replica's
//! own fast prefills twice over and shed on a pool with room, so the window is the scrape's.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::config::ConfigError;
use crate::config::params::{Params, parse_duration};
use crate::request::InferenceRequest;
use crate::scheduling::framework::{Candidate, CycleState, Filter, InFlightCounts, Plugin};
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
                    format!("not a duration (with a unit, e.g. 200ms): {s:?}"),
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

    /// The pool's saturation over `candidates` (≥ 1 means saturated; empty pool = 1), with
    /// this EPP's own requests since each scrape (`in_flight`) and those let go but not routed
    /// yet (`unrouted`) counted as waiting (the module's doc).
    pub fn saturation(
        &self,
        candidates: &[Candidate],
        in_flight: &InFlightCounts,
        unrouted: Unrouted,
        now: Instant,
    ) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let depth = self.queue_depth_threshold.max(f64::MIN_POSITIVE);
        let sum: f64 = candidates
            .iter()
            .map(|c| self.endpoint_score(c, in_flight, now))
            .sum();
        let n = candidates.len() as f64;
        (sum + unrouted.requests as f64 / depth) / n
    }

    /// True when sheddable requests should be rejected.
    pub fn is_saturated(
        &self,
        candidates: &[Candidate],
        in_flight: &InFlightCounts,
        now: Instant,
    ) -> bool {
        self.saturation(candidates, in_flight, Unrouted::default(), now) >= 1.0
    }

    fn endpoint_score(&self, c: &Candidate, in_flight: &InFlightCounts, now: Instant) -> f64 {
        if c.metrics.is_stale(now, self.metrics_staleness_threshold) {
            return 1.0;
        }
        // Requests routed since the scrape that have produced a token are running, not
        // waiting: at most the ones still prefilling count.
        let own = in_flight.load(c.endpoint.id).map_or(0, |load| {
            load.routed_since(c.metrics.updated_at)
                .min(load.prefilling.load(Ordering::Relaxed))
        });
        let waiting = c.metrics.waiting_queue_size.saturating_add(own);
        let q = waiting as f64 / self.queue_depth_threshold.max(f64::MIN_POSITIVE);
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

/// A saturation detector, as configured.
#[derive(Debug, Clone)]
pub enum SaturationDetector {
    /// `utilization-detector`.
    Utilization(UtilizationDetector),
    /// `concurrency-detector`.
    Concurrency(ConcurrencyDetector),
}

impl Default for SaturationDetector {
    fn default() -> Self {
        SaturationDetector::Utilization(UtilizationDetector::default())
    }
}

/// What flow control has let go that is not routed yet, so not in the in-flight counts: both
/// detectors count it as load, so that one dispatch cycle's releases see the previous ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unrouted {
    /// Requests.
    pub requests: u64,
    /// Their prompts' tokens, estimated from their bodies (an upper bound of the uncached
    /// tokens they add once routed).
    pub prompt_tokens: u64,
}

impl SaturationDetector {
    /// How old an endpoint's metrics may be before it counts as saturated (the utilization
    /// detector's `metricsStalenessThreshold`; the concurrency detector reads no metrics).
    pub fn staleness_threshold(&self) -> Option<Duration> {
        match self {
            SaturationDetector::Utilization(u) => Some(u.metrics_staleness_threshold),
            SaturationDetector::Concurrency(_) => None,
        }
    }

    /// The pool's saturation over `candidates` (≥ 1 = saturated; no candidates = 1).
    /// `unrouted` is what flow control has let go and is not routed yet (and so not in
    /// `in_flight`): both detectors count it as load (the concurrency detector in every mode).
    pub fn saturation(
        &self,
        candidates: &[Candidate],
        in_flight: &InFlightCounts,
        unrouted: Unrouted,
        now: Instant,
    ) -> f64 {
        match self {
            SaturationDetector::Utilization(d) => {
                d.saturation(candidates, in_flight, unrouted, now)
            }
            SaturationDetector::Concurrency(d) => d.saturation(candidates, in_flight, unrouted),
        }
    }

    /// True when sheddable requests should be rejected (flow control off).
    pub fn is_saturated(
        &self,
        candidates: &[Candidate],
        in_flight: &InFlightCounts,
        now: Instant,
    ) -> bool {
        self.saturation(candidates, in_flight, Unrouted::default(), now) >= 1.0
    }

    /// The utilization detector, if that is what this is.
    pub fn utilization(&self) -> Option<&UtilizationDetector> {
        match self {
            SaturationDetector::Utilization(d) => Some(d),
            SaturationDetector::Concurrency(_) => None,
        }
    }

    /// Requests one endpoint is meant to hold at once: the concurrency detector's
    /// `maxConcurrency`, or that parameter's default (100) for the utilization detector, which
    /// has no request limit. The autoscaling gauge's capacity is this × ready endpoints.
    pub fn requests_per_endpoint(&self) -> u64 {
        match self {
            SaturationDetector::Concurrency(d) => d.max_concurrency,
            SaturationDetector::Utilization(_) => ConcurrencyDetector::default().max_concurrency,
        }
    }
}

impl Plugin for SaturationDetector {
    fn type_name(&self) -> &'static str {
        match self {
            SaturationDetector::Utilization(d) => d.type_name(),
            SaturationDetector::Concurrency(d) => d.type_name(),
        }
    }
    fn name(&self) -> &str {
        match self {
            SaturationDetector::Utilization(d) => d.name(),
            SaturationDetector::Concurrency(d) => d.name(),
        }
    }
}

impl Filter for SaturationDetector {
    fn filter(
        &self,
        request: &InferenceRequest,
        state: &CycleState,
        c: Vec<Candidate>,
    ) -> Vec<Candidate> {
        match self {
            SaturationDetector::Utilization(d) => d.filter(request, state, c),
            SaturationDetector::Concurrency(d) => d.filter(request, state, c),
        }
    }
}

/// What the concurrency detector counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcurrencyMode {
    /// Requests in flight against `maxConcurrency`.
    Requests,
    /// Prompt tokens in flight against `maxTokenConcurrency`.
    Tokens,
    /// Both; an endpoint's load is the larger ratio.
    Hybrid,
}

/// `concurrency-detector`: the load this EPP itself has put on each endpoint. Requests count
/// from routing to the end of their response; tokens are the uncached prompt tokens of the
/// requests not past their first token (the reference counts the whole prompt until the first
/// chunk; the uncached part is what the engine computes). Pool saturation: requests
/// `Σ requests / (N · maxConcurrency)`, tokens `Σ tokens / (N · maxTokenConcurrency)`, hybrid
/// the mean over endpoints of the larger ratio. As a filter it keeps an endpoint while its
/// load is under `max · (1 + headroom)` (hybrid: both).
#[derive(Debug, Clone)]
pub struct ConcurrencyDetector {
    /// Configured name.
    pub name: String,
    /// `concurrencyMode` (`requests`).
    pub mode: ConcurrencyMode,
    /// `maxConcurrency` (100).
    pub max_concurrency: u64,
    /// `maxTokenConcurrency` (1,000,000).
    pub max_token_concurrency: u64,
    /// `headroom` (0.0) for the filter.
    pub headroom: f64,
}
plugin_named!(ConcurrencyDetector, "concurrency-detector");

impl Default for ConcurrencyDetector {
    fn default() -> Self {
        Self {
            name: "concurrency-detector".into(),
            mode: ConcurrencyMode::Requests,
            max_concurrency: 100,
            max_token_concurrency: 1_000_000,
            headroom: 0.0,
        }
    }
}

impl ConcurrencyDetector {
    /// The detector its `parameters` describe, over the reference's defaults.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        #[derive(Debug, Default, Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Yaml {
            concurrency_mode: Option<String>,
            max_concurrency: Option<i64>,
            max_token_concurrency: Option<i64>,
            headroom: Option<f64>,
            in_flight_load_producer_name: Option<String>,
        }
        let y: Yaml = p.decode()?;
        if y.in_flight_load_producer_name.is_some() {
            p.warn(
                "inFlightLoadProducerName has no effect here: the detector counts requests and \
                 uncached prompt tokens itself",
            );
        }
        let mut d = Self {
            name: p.name(),
            ..Default::default()
        };
        d.mode = match y.concurrency_mode.as_deref() {
            None | Some("requests") => ConcurrencyMode::Requests,
            Some("tokens") => ConcurrencyMode::Tokens,
            Some("hybrid") => ConcurrencyMode::Hybrid,
            Some(m) => {
                return Err(p.invalid(
                    "concurrencyMode",
                    format!("unknown mode {m:?}; known: requests, tokens, hybrid"),
                ));
            }
        };
        if let Some(n) = p.positive("maxConcurrency", y.max_concurrency)? {
            d.max_concurrency = n as u64;
        }
        if let Some(n) = p.positive("maxTokenConcurrency", y.max_token_concurrency)? {
            d.max_token_concurrency = n as u64;
        }
        if let Some(h) = y.headroom {
            if !(h.is_finite() && h >= 0.0) {
                return Err(p.invalid("headroom", "must be ≥ 0"));
            }
            if h > 1.0 {
                p.warn(format_args!(
                    "headroom {h} lets endpoints take more than twice maxConcurrency"
                ));
            }
            d.headroom = h;
        }
        Ok(d)
    }

    /// The pool's saturation; requests let go and not routed yet count as load, by number
    /// and by their prompts' estimated tokens.
    pub fn saturation(
        &self,
        candidates: &[Candidate],
        in_flight: &InFlightCounts,
        unrouted: Unrouted,
    ) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let n = candidates.len() as f64;
        let max_req = self.max_concurrency.max(1) as f64;
        let max_tok = self.max_token_concurrency.max(1) as f64;
        let reading = |c: &Candidate| {
            in_flight
                .load(c.endpoint.id)
                .map(|l| l.read())
                .unwrap_or_default()
        };
        let extra = unrouted.requests as f64;
        let extra_tokens = unrouted.prompt_tokens as f64;
        match self.mode {
            ConcurrencyMode::Requests => {
                let sum: u64 = candidates.iter().map(|c| reading(c).requests).sum();
                (sum as f64 + extra) / (n * max_req)
            }
            ConcurrencyMode::Tokens => {
                let sum: u64 = candidates.iter().map(|c| reading(c).prefill_tokens).sum();
                (sum as f64 + extra_tokens) / (n * max_tok)
            }
            ConcurrencyMode::Hybrid => {
                let sum: f64 = candidates
                    .iter()
                    .map(|c| {
                        let r = reading(c);
                        (r.requests as f64 / max_req).max(r.prefill_tokens as f64 / max_tok)
                    })
                    .sum();
                sum / n + (extra / (n * max_req)).max(extra_tokens / (n * max_tok))
            }
        }
    }
}

impl Filter for ConcurrencyDetector {
    fn filter(
        &self,
        _: &InferenceRequest,
        state: &CycleState,
        c: Vec<Candidate>,
    ) -> Vec<Candidate> {
        let scale = 1.0 + self.headroom;
        let max_req = (self.max_concurrency as f64 * scale) as u64;
        let max_tok = (self.max_token_concurrency as f64 * scale) as u64;
        c.into_iter()
            .filter(|c| {
                let r = state
                    .in_flight
                    .load(c.endpoint.id)
                    .map(|l| l.read())
                    .unwrap_or_default();
                match self.mode {
                    ConcurrencyMode::Requests => r.requests < max_req,
                    ConcurrencyMode::Tokens => r.prefill_tokens < max_tok,
                    ConcurrencyMode::Hybrid => r.requests < max_req && r.prefill_tokens < max_tok,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::framework::EndpointLoad;
    use crate::scheduling::plugins::test_util::{candidates, metrics};
    use std::sync::Arc;

    /// Review (scheduling): in `tokens` mode requests let go and not yet routed counted for
    /// nothing, so one dispatch cycle let many go against the same reading. Every mode counts
    /// them now, by number or by their prompts' tokens.
    #[tokio::test(start_paused = true)]
    async fn unrouted_requests_count_in_every_mode() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let in_flight = InFlightCounts::default();
        let unrouted = Unrouted {
            requests: 2,
            prompt_tokens: 10_000,
        };
        let detector = |mode| ConcurrencyDetector {
            mode,
            max_concurrency: 10,
            max_token_concurrency: 20_000,
            ..Default::default()
        };
        let at = |mode, u| detector(mode).saturation(&c, &in_flight, u);
        let none = Unrouted::default();
        for mode in [
            ConcurrencyMode::Requests,
            ConcurrencyMode::Tokens,
            ConcurrencyMode::Hybrid,
        ] {
            assert_eq!(at(mode, none), 0.0, "{mode:?}");
        }
        // 2 of 20 requests; 10,000 of 40,000 tokens; hybrid the larger of the two.
        assert!((at(ConcurrencyMode::Requests, unrouted) - 0.1).abs() < 1e-9);
        assert!((at(ConcurrencyMode::Tokens, unrouted) - 0.25).abs() < 1e-9);
        assert!((at(ConcurrencyMode::Hybrid, unrouted) - 0.25).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn saturation_is_mean_of_endpoint_scores() {
        let d = UtilizationDetector::default();
        let now = Instant::now();
        let c = candidates(&[metrics(0, 0, 0.4), metrics(10, 0, 0.0)]);
        let none = InFlightCounts::default();
        // 0.5 and 2.0 → mean 1.25.
        assert!((d.saturation(&c, &none, Unrouted::default(), now) - 1.25).abs() < 1e-9);
        assert!(d.is_saturated(&c, &none, now));
        let calm = candidates(&[metrics(1, 0, 0.1), metrics(0, 0, 0.2)]);
        assert!(!d.is_saturated(&calm, &none, now));
        assert!(d.is_saturated(&[], &none, now));
    }

    /// Review 9: the utilization detector read the scrape alone, so one dispatch cycle let a
    /// whole burst go against one reading (50 requests at a reading of 0.9). Requests routed
    /// since the scrape and still prefilling count as waiting, and those let go but not yet
    /// routed as waiting spread over the pool, until the next scrape says what the engine has.
    #[tokio::test(start_paused = true)]
    async fn requests_sent_since_the_scrape_count_until_the_next_one() {
        let d = UtilizationDetector::default();
        // Two endpoints 4 of 5 waiting: 0.8 each.
        let c = candidates(&[metrics(4, 0, 0.0), metrics(4, 0, 0.0)]);
        let loads: Vec<Arc<EndpointLoad>> = (0..2).map(|_| Arc::default()).collect();
        let in_flight = InFlightCounts::new(Arc::new(loads.clone()));
        let read = |c: &[Candidate], u| d.saturation(c, &in_flight, u, Instant::now());
        assert!((read(&c, Unrouted::default()) - 0.8).abs() < 1e-9);
        // Three let go, not routed yet: 3 / (2 × 5) more.
        let three = Unrouted {
            requests: 3,
            prompt_tokens: 0,
        };
        assert!((read(&c, three) - 1.1).abs() < 1e-9);
        // Routed to the first endpoint, prefilling there: (4 + 3) / 5 = 1.4, and 0.8.
        let first = &loads[c[0].endpoint.id.0 as usize];
        for _ in 0..3 {
            first.routed(Instant::now());
        }
        first.prefilling.fetch_add(3, Ordering::Relaxed);
        assert!((read(&c, Unrouted::default()) - 1.1).abs() < 1e-9);
        // One has produced its first token: running, not waiting.
        first.prefilling.fetch_sub(1, Ordering::Relaxed);
        assert!((read(&c, Unrouted::default()) - 1.0).abs() < 1e-9);
        // The next scrape counts what the engine has; the requests routed before it are its.
        tokio::time::advance(Duration::from_millis(50)).await;
        c[0].endpoint.store_metrics(metrics(6, 1, 0.0));
        let rescraped = [Candidate::new(c[0].endpoint.clone()), c[1].clone()];
        assert!((read(&rescraped, Unrouted::default()) - (1.2 + 0.8) / 2.0).abs() < 1e-9);
        // Routed after it: counted again.
        tokio::time::advance(Duration::from_millis(1)).await;
        first.routed(Instant::now());
        first.prefilling.fetch_add(1, Ordering::Relaxed);
        assert!((read(&rescraped, Unrouted::default()) - (1.4 + 0.8) / 2.0).abs() < 1e-9);
        // One routed before a scrape is the scrape's to count, however shortly before.
        let second = &loads[c[1].endpoint.id.0 as usize];
        second.routed(Instant::now());
        second.prefilling.fetch_add(1, Ordering::Relaxed);
        tokio::time::advance(Duration::from_millis(5)).await;
        c[1].endpoint.store_metrics(metrics(4, 0, 0.0));
        let both = [rescraped[0].clone(), Candidate::new(c[1].endpoint.clone())];
        assert!((read(&both, Unrouted::default()) - (1.4 + 0.8) / 2.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_metrics_count_as_saturated() {
        let d = UtilizationDetector::default();
        let c = candidates(&[metrics(0, 0, 0.0)]);
        tokio::time::advance(Duration::from_millis(201)).await;
        assert!(d.is_saturated(&c, &InFlightCounts::default(), Instant::now()));
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
