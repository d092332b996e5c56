//! The flow-control policies, with the reference's plugin types and parameters: which flow of a
//! band goes next (fairness), which request of a flow goes next (ordering), and up to which
//! pool saturation each band may dispatch (usage limits).
//!
//! Each policy is a plain value built once by its registry entry
//! ([`crate::scheduling::registry`]); the controller ([`super::FlowControl`]) asks it under its
//! own lock, so nothing here awaits or does I/O. The least-attained-service policy keeps per
//! program state of its own, bounded by [`MAX_PROGRAMS`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::ConfigError;
use crate::config::params::Params;

/// Most programs (fairness ids) the least-attained-service policy remembers. Fairness ids come
/// from a request header, so the map is bounded: past the cap, the program idle longest is
/// forgotten (it restarts at zero attained service, i.e. it is favoured, never starved).
pub const MAX_PROGRAMS: usize = 10_000;

/// Which flow of a band is served next.
#[derive(Debug, Clone)]
pub enum FairnessPolicy {
    /// `global-strict-fairness-policy`: the flow whose head request is first by the band's
    /// ordering policy, whatever flow it is in.
    GlobalStrict,
    /// `round-robin-fairness-policy`: flows in turn, in the order of their ids, starting after
    /// the flow served last.
    RoundRobin,
    /// `program-aware-fairness` with `strategy: las`: the flow with the least attained service
    /// (prompt tokens + 2 × output tokens, decayed), traded against its head's wait.
    LeastAttainedService(Arc<Las>),
}

/// Which request of a flow is served next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderingPolicy {
    /// `fcfs-ordering-policy`: the earliest enqueued.
    Fcfs,
    /// `edf-ordering-policy`: the earliest deadline (enqueue time + TTL). Every request here
    /// has the same TTL, so this is FCFS, as in the reference without caller deadlines.
    Edf,
    /// `slo-deadline-ordering-policy`: the earliest `received + x-llm-d-slo-ttft-ms`; requests
    /// without an objective last; ties by arrival.
    SloDeadline,
}

/// Up to which saturation each band may dispatch (a band is held while `saturation ≥ ceiling`).
#[derive(Debug)]
pub enum UsageLimitPolicy {
    /// `static-usage-limit-policy`: every band's ceiling is `threshold`.
    Static {
        /// `threshold` (1.0).
        threshold: f64,
    },
    /// `priority-holdback-policy`: ceilings from `maxCeiling` (highest band) down to
    /// `minCeiling` (lowest), by rank or by priority value.
    PriorityHoldback {
        /// `minCeiling` (required, in [0, 1)).
        min: f64,
        /// `maxCeiling` (1.0, in (0, 1]).
        max: f64,
        /// `domain: value` (else `rank`).
        by_value: bool,
    },
    /// `soft-reflective-ceiling-policy`: the highest band's ceiling is 1 (held only once the
    /// pool is saturated, like every band); lower bands are held first as saturation rises,
    /// with a duty cycle in between.
    SoftReflectiveCeiling {
        /// The tick shared by every band (advanced once per call in the duty-cycle zone).
        tick: AtomicU64,
    },
}

/// The program-aware fairness policy's parameters and per-program state.
#[derive(Debug)]
pub struct Las {
    /// Parameters as configured.
    pub params: LasParams,
    programs: Mutex<Programs>,
    /// When idle programs were last forgotten (`None`: never yet).
    last_sweep: Mutex<Option<Instant>>,
}

/// `program-aware-fairness` parameters (reference names and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct LasParams {
    /// `lasWeightService` (0.8).
    pub weight_service: f64,
    /// `lasWeightHeadWait` (0.2).
    pub weight_head_wait: f64,
    /// `lasHalfLifeSeconds` (60; 0 = no decay).
    pub half_life: Duration,
    /// `evictionTtlSeconds` (3600; 0 = never forget).
    pub eviction_ttl: Duration,
    /// `evictionSweepSeconds` (300).
    pub eviction_sweep: Duration,
}

impl Default for LasParams {
    fn default() -> Self {
        Self {
            weight_service: 0.8,
            weight_head_wait: 0.2,
            half_life: Duration::from_secs(60),
            eviction_ttl: Duration::from_secs(3600),
            eviction_sweep: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Program {
    /// Attained service (token units), as of `updated`.
    service: f64,
    updated: Instant,
    /// Last completion, and a sequence number that orders equal times: its key in
    /// [`Programs::by_activity`].
    active: (Instant, u64),
}

/// The remembered programs, by id and by last activity, so that forgetting the idlest (at the
/// cap, or past the TTL) takes a first entry instead of a scan of all 10,000 under the lock.
#[derive(Debug, Default)]
struct Programs {
    by_id: HashMap<Arc<str>, Program>,
    /// The same programs, idlest first.
    by_activity: BTreeMap<(Instant, u64), Arc<str>>,
    next: u64,
}

/// A flow that could be served: its id and its head request's enqueue time.
#[derive(Debug, Clone, Copy)]
pub struct Contender<'a> {
    /// The flow's fairness id.
    pub id: &'a str,
    /// Its best request by the band's ordering policy: enqueue time.
    pub head_enqueued: Instant,
    /// Its best request's ordering key (smaller goes first).
    pub head_key: (bool, Instant, u64),
}

// === impl FairnessPolicy ===

impl FairnessPolicy {
    /// Picks one of `contenders` (non-empty flows, sorted by id). `last` is the flow this
    /// band served last (round-robin's cursor).
    pub fn pick(&self, contenders: &[Contender<'_>], last: Option<&str>, now: Instant) -> usize {
        match self {
            FairnessPolicy::GlobalStrict => contenders
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.head_key)
                .map_or(0, |(i, _)| i),
            FairnessPolicy::RoundRobin => match last {
                // The first flow after the last one served, wrapping around.
                Some(last) => contenders.iter().position(|c| c.id > last).unwrap_or(0),
                None => 0,
            },
            FairnessPolicy::LeastAttainedService(las) => las.pick(contenders, now),
        }
    }

    /// The reference's type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            FairnessPolicy::GlobalStrict => "global-strict-fairness-policy",
            FairnessPolicy::RoundRobin => "round-robin-fairness-policy",
            FairnessPolicy::LeastAttainedService(_) => "program-aware-fairness",
        }
    }

    /// `program-aware-fairness` from its parameters.
    pub fn las_from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        #[derive(Debug, Default, Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Yaml {
            strategy: Option<String>,
            las_weight_service: Option<f64>,
            las_weight_head_wait: Option<f64>,
            las_half_life_seconds: Option<f64>,
            eviction_ttl_seconds: Option<f64>,
            eviction_sweep_seconds: Option<f64>,
        }
        let y: Yaml = p.decode()?;
        if let Some(s) = y.strategy.as_deref()
            && s != "las"
        {
            return Err(p.invalid("strategy", format!("unknown strategy {s:?}; known: las")));
        }
        let mut params = LasParams::default();
        let non_negative = |name: &'static str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x >= 0.0) => Err(p.invalid(name, "must be ≥ 0")),
            v => Ok(v),
        };
        if let Some(w) = non_negative("lasWeightService", y.las_weight_service)? {
            params.weight_service = w;
        }
        if let Some(w) = non_negative("lasWeightHeadWait", y.las_weight_head_wait)? {
            params.weight_head_wait = w;
        }
        if params.weight_service == 0.0 && params.weight_head_wait == 0.0 {
            // Every flow would score alike: the tie goes to the same flow every time and the
            // others wait out their TTL.
            return Err(p.invalid(
                "lasWeightService",
                "lasWeightService and lasWeightHeadWait are both 0: no flow could be told from another",
            ));
        }
        if let Some(s) = non_negative("lasHalfLifeSeconds", y.las_half_life_seconds)? {
            params.half_life = Duration::from_secs_f64(s.min(1e9));
            if s > 0.0 {
                // Below a nanosecond rounds to zero, which means "no decay": the opposite.
                params.half_life = params.half_life.max(Duration::from_nanos(1));
            }
        }
        if let Some(s) = non_negative("evictionTtlSeconds", y.eviction_ttl_seconds)? {
            params.eviction_ttl = Duration::from_secs_f64(s.min(1e9));
        }
        if let Some(s) = y.eviction_sweep_seconds {
            if !(s.is_finite() && s > 0.0) {
                return Err(p.invalid("evictionSweepSeconds", "must be > 0"));
            }
            params.eviction_sweep = Duration::from_secs_f64(s.min(1e9));
        }
        Ok(FairnessPolicy::LeastAttainedService(Arc::new(Las::new(
            params,
        ))))
    }
}

// === impl Las ===

impl Las {
    /// A policy with no history.
    pub fn new(params: LasParams) -> Self {
        Self {
            params,
            programs: Mutex::new(Programs::default()),
            last_sweep: Mutex::new(None),
        }
    }

    /// `S · 2^(−Δt / halfLife)`.
    fn decayed(&self, p: &Program, now: Instant) -> f64 {
        if self.params.half_life.is_zero() {
            return p.service;
        }
        let dt = now.saturating_duration_since(p.updated).as_secs_f64();
        p.service * (-dt / self.params.half_life.as_secs_f64()).exp2()
    }

    /// The attained service of `program` now (0 for one never seen).
    pub fn attained(&self, program: &str, now: Instant) -> f64 {
        self.programs
            .lock()
            .by_id
            .get(program)
            .map_or(0.0, |p| self.decayed(p, now))
    }

    /// A response of `program` ended: it attained `prompt + 2 × completion` tokens of service.
    pub fn record(&self, program: &str, prompt_tokens: u64, completion_tokens: u64, now: Instant) {
        let add = prompt_tokens as f64 + 2.0 * completion_tokens as f64;
        let mut programs = self.programs.lock();
        let Programs {
            by_id,
            by_activity,
            next,
        } = &mut *programs;
        let active = (now, *next);
        *next += 1;
        if let Some(p) = by_id.get_mut(program) {
            p.service = self.decayed(p, now) + add;
            p.updated = now;
            if let Some(id) = by_activity.remove(&p.active) {
                by_activity.insert(active, id);
            }
            p.active = active;
            return;
        }
        if by_id.len() >= MAX_PROGRAMS
            && let Some((_, idlest)) = by_activity.pop_first()
        {
            by_id.remove(&idlest);
        }
        let id: Arc<str> = Arc::from(program);
        by_activity.insert(active, id.clone());
        by_id.insert(
            id,
            Program {
                service: add,
                updated: now,
                active,
            },
        );
    }

    /// Takes back `tokens` of service charged to `program` ahead of the engine's count (a
    /// prompt charged from its estimate, corrected by `usage`); never below zero.
    pub fn take_back(&self, program: &str, tokens: u64, now: Instant) {
        let mut programs = self.programs.lock();
        if let Some(p) = programs.by_id.get_mut(program) {
            p.service = (self.decayed(p, now) - tokens as f64).max(0.0);
            p.updated = now;
        }
    }

    /// Forgets programs idle for `evictionTtlSeconds` (0 = never), at most once per
    /// `evictionSweepSeconds`: a call sooner than that after the last sweep does nothing (the
    /// first call only starts the clock).
    pub fn sweep(&self, now: Instant) {
        let ttl = self.params.eviction_ttl;
        if ttl.is_zero() {
            return;
        }
        {
            let mut last = self.last_sweep.lock();
            match *last {
                Some(at) if now.saturating_duration_since(at) < self.params.eviction_sweep => {
                    return;
                }
                Some(_) => *last = Some(now),
                None => {
                    *last = Some(now);
                    return;
                }
            }
        }
        let mut programs = self.programs.lock();
        let Programs {
            by_id, by_activity, ..
        } = &mut *programs;
        while let Some(entry) = by_activity.first_entry() {
            if now.saturating_duration_since(entry.key().0) < ttl {
                break;
            }
            by_id.remove(&entry.remove());
        }
    }

    /// Programs remembered.
    pub fn len(&self) -> usize {
        self.programs.lock().by_id.len()
    }

    /// Whether no program is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Score = `wS·(1 − norm(S)) + wW·norm(wait)`, each normalised over the contenders
    /// (0.5 when all are equal); the highest wins, ties to the first (lowest id), where the
    /// reference leaves ties to Go's map order.
    fn pick(&self, contenders: &[Contender<'_>], now: Instant) -> usize {
        if contenders.len() <= 1 {
            return 0;
        }
        let programs = self.programs.lock();
        let service: Vec<f64> = contenders
            .iter()
            .map(|c| {
                programs
                    .by_id
                    .get(c.id)
                    .map_or(0.0, |p| self.decayed(p, now))
            })
            .collect();
        drop(programs);
        let wait: Vec<f64> = contenders
            .iter()
            .map(|c| now.saturating_duration_since(c.head_enqueued).as_secs_f64())
            .collect();
        // Each range once: this runs under flow control's lock, and per contender it was
        // quadratic in the queued flows (22 ms a dispatch at 4,000 flows).
        let range = |values: &[f64]| {
            values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                })
        };
        let norm = |(lo, hi): (f64, f64), v: f64| {
            if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
                0.5
            } else {
                (v - lo) / (hi - lo)
            }
        };
        let (service_range, wait_range) = (range(&service), range(&wait));
        let (ws, ww) = (self.params.weight_service, self.params.weight_head_wait);
        let mut best = 0;
        let mut best_score = f64::NEG_INFINITY;
        for i in 0..contenders.len() {
            let score =
                ws * (1.0 - norm(service_range, service[i])) + ww * norm(wait_range, wait[i]);
            if score > best_score {
                best = i;
                best_score = score;
            }
        }
        best
    }
}

// === impl OrderingPolicy ===

impl OrderingPolicy {
    /// The reference's type name.
    pub fn type_name(self) -> &'static str {
        match self {
            OrderingPolicy::Fcfs => "fcfs-ordering-policy",
            OrderingPolicy::Edf => "edf-ordering-policy",
            OrderingPolicy::SloDeadline => "slo-deadline-ordering-policy",
        }
    }
}

// === impl UsageLimitPolicy ===

impl UsageLimitPolicy {
    /// The reference's type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            UsageLimitPolicy::Static { .. } => "static-usage-limit-policy",
            UsageLimitPolicy::PriorityHoldback { .. } => "priority-holdback-policy",
            UsageLimitPolicy::SoftReflectiveCeiling { .. } => "soft-reflective-ceiling-policy",
        }
    }

    /// `static-usage-limit-policy` from its parameters. As in the reference, `threshold` is
    /// not range-checked beyond being a finite number.
    pub fn static_from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        #[derive(Debug, Default, Deserialize)]
        struct Yaml {
            threshold: Option<f64>,
        }
        let y: Yaml = p.decode()?;
        let threshold = y.threshold.unwrap_or(1.0);
        if !threshold.is_finite() {
            return Err(p.invalid("threshold", "must be a finite number"));
        }
        Ok(UsageLimitPolicy::Static { threshold })
    }

    /// `priority-holdback-policy` from its parameters.
    pub fn holdback_from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        #[derive(Debug, Default, Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Yaml {
            min_ceiling: Option<f64>,
            max_ceiling: Option<f64>,
            shape: Option<String>,
            domain: Option<String>,
        }
        let y: Yaml = p.decode()?;
        let Some(min) = y.min_ceiling else {
            return Err(p.invalid("minCeiling", "is required"));
        };
        if !(0.0..1.0).contains(&min) {
            return Err(p.invalid("minCeiling", "must be in [0, 1)"));
        }
        let max = y.max_ceiling.unwrap_or(1.0);
        if !(max > 0.0 && max <= 1.0) {
            return Err(p.invalid("maxCeiling", "must be in (0, 1]"));
        }
        if min >= max {
            return Err(p.invalid("minCeiling", "must be less than maxCeiling"));
        }
        if let Some(s) = y.shape.as_deref()
            && s != "linear"
        {
            return Err(p.invalid("shape", format!("unknown shape {s:?}; known: linear")));
        }
        let by_value = match y.domain.as_deref() {
            None | Some("rank") => false,
            Some("value") => true,
            Some(d) => {
                return Err(p.invalid(
                    "domain",
                    format!("unknown domain {d:?}; known: rank, value"),
                ));
            }
        };
        Ok(UsageLimitPolicy::PriorityHoldback { min, max, by_value })
    }

    /// `soft-reflective-ceiling-policy`, which takes no parameters (any given is an error, as
    /// in the reference).
    pub fn soft_reflective_from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        if p.has_parameters() {
            return Err(p.invalid("parameters", "this policy takes none"));
        }
        Ok(UsageLimitPolicy::SoftReflectiveCeiling {
            tick: AtomicU64::new(0),
        })
    }

    /// The ceiling of each band, `priorities` being every band's priority (provisioned and
    /// made on demand alike: a band made for a new priority shifts the ranks),
    /// highest first. Called once per dispatch cycle.
    pub fn ceilings(&self, saturation: f64, priorities: &[i32], out: &mut Vec<f64>) {
        out.clear();
        let n = priorities.len();
        match self {
            UsageLimitPolicy::Static { threshold } => out.resize(n, *threshold),
            UsageLimitPolicy::PriorityHoldback { min, max, by_value } => {
                if n <= 1 {
                    out.resize(n, *max);
                    return;
                }
                if *by_value {
                    let hi = priorities.iter().copied().max().unwrap_or(0);
                    let lo = priorities.iter().copied().min().unwrap_or(0);
                    for &p in priorities {
                        out.push(if hi == lo {
                            *max
                        } else {
                            // In f64: priorities spread wider than i32 holds would wrap.
                            min + (f64::from(p) - f64::from(lo)) / (f64::from(hi) - f64::from(lo))
                                * (max - min)
                        });
                    }
                } else {
                    for i in 0..n {
                        out.push(max - i as f64 * (max - min) / (n - 1) as f64);
                    }
                }
            }
            UsageLimitPolicy::SoftReflectiveCeiling { tick } => {
                if n <= 1 {
                    out.resize(n, 1.0);
                    return;
                }
                let s = saturation;
                let mut on_tick = true;
                if s >= 1.0 - s && s < 1.0 {
                    let t = tick.fetch_add(1, AtomicOrdering::Relaxed);
                    let period = (s / (1.0 - s + 1e-9)).round().max(1.0) as u64;
                    on_tick = t % period == 0;
                }
                for i in 0..n {
                    let r = 1.0 - i as f64 * s / (n - 1) as f64;
                    out.push(if i == 0 || s < r {
                        1.0
                    } else if s >= 1.0 {
                        0.0
                    } else if on_tick {
                        1.0
                    } else {
                        0.0
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contenders(items: &[(&'static str, u64)], base: Instant) -> Vec<Contender<'static>> {
        items
            .iter()
            .map(|&(id, ms)| {
                let at = base + Duration::from_millis(ms);
                Contender {
                    id,
                    head_enqueued: at,
                    head_key: (false, at, ms),
                }
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn global_strict_picks_the_best_head_across_flows() {
        let now = Instant::now();
        let c = contenders(&[("a", 30), ("b", 10), ("c", 20)], now);
        assert_eq!(FairnessPolicy::GlobalStrict.pick(&c, None, now), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_starts_after_the_last_flow_served() {
        let now = Instant::now();
        let c = contenders(&[("a", 0), ("b", 0), ("d", 0)], now);
        let rr = FairnessPolicy::RoundRobin;
        assert_eq!(rr.pick(&c, None, now), 0);
        assert_eq!(rr.pick(&c, Some("a"), now), 1);
        assert_eq!(rr.pick(&c, Some("b"), now), 2);
        // "c" emptied and left: the next after it is "d"; after the last, wrap to the first.
        assert_eq!(rr.pick(&c, Some("c"), now), 2);
        assert_eq!(rr.pick(&c, Some("d"), now), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn least_attained_service_weighs_output_tokens_twice_and_decays() {
        let now = Instant::now();
        let las = Las::new(LasParams::default());
        // A's prompts are small but it generated a lot; B's prompts are large.
        las.record("a", 100, 1_000, now);
        las.record("b", 1_500, 100, now);
        assert_eq!(las.attained("a", now), 2_100.0);
        assert_eq!(las.attained("b", now), 1_700.0);
        let policy = FairnessPolicy::LeastAttainedService(Arc::new(las));
        // Equal waits: the least attained (b) goes first.
        let c = contenders(&[("a", 0), ("b", 0)], now);
        assert_eq!(policy.pick(&c, None, now), 1);
        // A program never seen has attained nothing: it goes first.
        let c = contenders(&[("a", 0), ("b", 0), ("new", 0)], now);
        assert_eq!(policy.pick(&c, None, now), 2);
        let FairnessPolicy::LeastAttainedService(las) = &policy else {
            unreachable!()
        };
        // One half-life later, half is left.
        let later = now + Duration::from_secs(60);
        assert!((las.attained("a", later) - 1_050.0).abs() < 1e-6);
        // With the default weights (wS 0.8, wW 0.2) service decides: head waits 10 s (a) vs
        // 0 s (b), service 2100 (a) vs 1700 (b): a scores 0.2, b 0.8. Weighted to the wait,
        // a goes first.
        let c = contenders(&[("a", 0), ("b", 10_000)], now);
        assert_eq!(policy.pick(&c, None, now + Duration::from_secs(10)), 1);
        let heavy = Las::new(LasParams {
            weight_service: 0.1,
            weight_head_wait: 0.9,
            ..LasParams::default()
        });
        heavy.record("a", 100, 1_000, now);
        let policy = FairnessPolicy::LeastAttainedService(Arc::new(heavy));
        assert_eq!(policy.pick(&c, None, now + Duration::from_secs(10)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn least_attained_service_state_is_bounded_and_swept() {
        let now = Instant::now();
        let las = Las::new(LasParams::default());
        for i in 0..MAX_PROGRAMS + 5 {
            las.record(
                &format!("p{i}"),
                1,
                1,
                now + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(las.len(), MAX_PROGRAMS);
        assert_eq!(las.attained("p0", now), 0.0, "the idlest was forgotten");
        // Activity moves a program to the back: p5, the idlest now, is heard from again, so
        // the next newcomer pushes out p6 instead.
        let later = now + Duration::from_secs(60);
        las.record("p5", 1, 1, later);
        las.record("newcomer", 1, 1, later);
        assert!(las.attained("p5", later) > 0.0);
        assert_eq!(las.attained("p6", later), 0.0);
        {
            let programs = las.programs.lock();
            assert_eq!(programs.by_id.len(), MAX_PROGRAMS);
            assert_eq!(programs.by_activity.len(), MAX_PROGRAMS, "both views agree");
        }
        las.sweep(now); // starts the sweep clock
        las.sweep(now + Duration::from_secs(3_601 + 60));
        assert!(las.is_empty());
    }

    /// `evictionSweepSeconds` spaces the sweeps: an idle program outlives its TTL until the
    /// next sweep is due, then goes.
    #[tokio::test(start_paused = true)]
    async fn sweeps_come_every_eviction_sweep_seconds() {
        let now = Instant::now();
        let las = Las::new(LasParams {
            eviction_ttl: Duration::from_secs(10),
            eviction_sweep: Duration::from_secs(100),
            ..LasParams::default()
        });
        las.sweep(now);
        las.record("idle", 1, 1, now);
        las.sweep(now + Duration::from_secs(50));
        assert_eq!(las.len(), 1, "past its TTL, but no sweep is due");
        las.sweep(now + Duration::from_secs(100));
        assert!(las.is_empty(), "the sweep 100 s after the last forgets it");
        las.record("next", 1, 1, now + Duration::from_secs(101));
        las.sweep(now + Duration::from_secs(150));
        assert_eq!(las.len(), 1);
        las.sweep(now + Duration::from_secs(200));
        assert!(las.is_empty());
    }

    /// Review: a half-life below a nanosecond rounded to zero, which means "no decay": the
    /// opposite of what was asked. It is the shortest decay instead; 0 still means none.
    #[test]
    fn a_half_life_below_a_nanosecond_still_decays() {
        use crate::scheduling::plugins::test_util::build_from_yaml;
        let half_life = |yaml: &str| {
            let (policy, _) = build_from_yaml(
                "program-aware-fairness",
                yaml,
                FairnessPolicy::las_from_params,
            )
            .unwrap();
            let FairnessPolicy::LeastAttainedService(las) = policy else {
                panic!("LAS");
            };
            las.params.half_life
        };
        assert_eq!(
            half_life("{lasHalfLifeSeconds: 1e-12}"),
            Duration::from_nanos(1)
        );
        assert_eq!(half_life("{lasHalfLifeSeconds: 0}"), Duration::ZERO);
        assert_eq!(
            half_life("{lasHalfLifeSeconds: 2.5}"),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn ceilings() {
        let mut out = Vec::new();
        UsageLimitPolicy::Static { threshold: 0.9 }.ceilings(0.5, &[10, 0], &mut out);
        assert_eq!(out, [0.9, 0.9]);
        let rank = UsageLimitPolicy::PriorityHoldback {
            min: 0.4,
            max: 0.9,
            by_value: false,
        };
        rank.ceilings(0.0, &[100, 10, 0], &mut out);
        assert_eq!(out, [0.9, 0.65, 0.4]);
        rank.ceilings(0.0, &[7], &mut out);
        assert_eq!(out, [0.9]);
        let value = UsageLimitPolicy::PriorityHoldback {
            min: 0.4,
            max: 0.9,
            by_value: true,
        };
        value.ceilings(0.0, &[100, 90, 0], &mut out);
        assert!((out[1] - 0.85).abs() < 1e-9 && out[2] == 0.4, "{out:?}");
        // Review: priorities spread wider than i32 holds (the difference wrapped, giving the
        // middle band a negative ceiling that held it and every band below for ever).
        value.ceilings(0.0, &[2_000_000_000, 0, -2_000_000_000], &mut out);
        assert_eq!(out[0], 0.9);
        assert!((out[1] - 0.65).abs() < 1e-9 && out[2] == 0.4, "{out:?}");
        let soft = UsageLimitPolicy::SoftReflectiveCeiling {
            tick: AtomicU64::new(0),
        };
        // Low saturation: nobody held. Full saturation: all but the top band held.
        soft.ceilings(0.2, &[2, 1, 0], &mut out);
        assert_eq!(out, [1.0, 1.0, 1.0]);
        soft.ceilings(1.0, &[2, 1, 0], &mut out);
        assert_eq!(out, [1.0, 0.0, 0.0]);
        // s = 0.75: band 1 (r = 0.625) and band 2 (r = 0.25) are in the duty cycle, period 3.
        let held: Vec<f64> = (0..3)
            .map(|_| {
                soft.ceilings(0.75, &[2, 1, 0], &mut out);
                out[2]
            })
            .collect();
        assert_eq!(held, [1.0, 0.0, 0.0]);
    }
}
