//! Scorers: each maps candidates to `[0, 1]`, higher is better.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use serde::Deserialize;

use crate::config::ConfigError;
use crate::config::params::Params;
use crate::datastore::Endpoint;
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

/// `kv-cache-utilization-scorer`: `1 − kv_usage`; an unknown (NaN) usage scores 0.
#[derive(Debug)]
pub struct KvCacheUtilizationScorer {
    /// Configured name.
    pub name: String,
}
plugin_named!(KvCacheUtilizationScorer, "kv-cache-utilization-scorer");

impl Scorer for KvCacheUtilizationScorer {
    fn score(&self, _: &InferenceRequest, _: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        for (s, c) in scores.iter_mut().zip(c) {
            let kv = c.metrics.kv_cache_usage;
            // `clamp` keeps a NaN, and `1 − NaN` is no score.
            *s = if kv.is_nan() {
                0.0
            } else {
                1.0 - kv.clamp(0.0, 1.0)
            };
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
/// loading (0.6); 0 otherwise. Where the LoRA placement loop lists the engine's registered
/// adapters ([`crate::datastore::Endpoint::adapters`]), an endpoint that does not have the
/// adapter scores 0 (vLLM answers 404 for an adapter it has not registered) and one that has
/// it but runs none of its requests scores 0.8 (it may need a slot swap).
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
            let registered = c.endpoint.adapters().map(|a| a.contains(target));
            *s = if active {
                1.0
            } else if registered == Some(false) {
                0.0
            } else if registered == Some(true) || (used as u64) < u64::from(m.max_active_models) {
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

/// `load-aware-scorer` parameters, as llm-d names them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadAwareYaml {
    threshold: Option<i64>,
}

impl LoadAwareScorer {
    /// The scorer its `parameters` describe.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: LoadAwareYaml = p.decode()?;
        let threshold = p.positive("threshold", y.threshold)?.unwrap_or(128) as u64;
        Ok(Self {
            name: p.name(),
            threshold,
        })
    }
}

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

/// `active-request-scorer` (llm-d): fewer requests in flight from this EPP is better. The
/// count is the EPP's own, so it is exact and current where scraped queues lag by a scrape
/// interval and stay at zero until an engine is past its batch limit. Endpoints with at most
/// `idle_threshold` requests score 1; busier ones `(max − n) / max × max_busy_score`, `max`
/// being the busiest candidate's count.
#[derive(Debug)]
pub struct ActiveRequestScorer {
    /// Configured name.
    pub name: String,
    /// In-flight count up to which an endpoint counts as idle (`idleThreshold`, default 0).
    pub idle_threshold: u64,
    /// Best score of a busy endpoint (`maxBusyScore`, default 1), which opens a gap between
    /// idle and busy endpoints when below 1.
    pub max_busy_score: f64,
}
plugin_named!(ActiveRequestScorer, "active-request-scorer");

/// `active-request-scorer` parameters, as llm-d names them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ActiveRequestYaml {
    idle_threshold: Option<i64>,
    max_busy_score: Option<f64>,
    /// Deprecated upstream and ignored there too (in-flight requests end with their stream).
    request_timeout: Option<String>,
    /// Names upstream's in-flight producer; the counts here are always the director's.
    #[serde(rename = "inFlightLoadProducerName")]
    _in_flight_load_producer_name: Option<String>,
}

impl ActiveRequestScorer {
    /// The scorer its `parameters` describe.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: ActiveRequestYaml = p.decode()?;
        if y.request_timeout.is_some() {
            p.warn("requestTimeout is deprecated and ignored; a request stops counting when its stream ends");
        }
        let idle_threshold = p
            .non_negative("idleThreshold", y.idle_threshold)?
            .unwrap_or(0);
        let max_busy_score = match y.max_busy_score {
            Some(m) if !(0.0..=1.0).contains(&m) => {
                return Err(p.invalid("maxBusyScore", "must be in [0, 1]"));
            }
            Some(m) => m,
            None => 1.0,
        };
        Ok(Self {
            name: p.name(),
            idle_threshold,
            max_busy_score,
        })
    }
}

impl Scorer for ActiveRequestScorer {
    fn score(&self, _: &InferenceRequest, state: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        // Read once: the counters are live and must not change between max and score.
        for (s, c) in scores.iter_mut().zip(c) {
            *s = state.in_flight.get(c.endpoint.id) as f64;
        }
        let max = scores.iter().copied().fold(0.0, f64::max);
        let idle = self.idle_threshold as f64;
        for s in scores.iter_mut() {
            *s = if *s <= idle {
                1.0
            } else {
                (max - *s) / max * self.max_busy_score
            };
        }
    }
}

/// `priority-packing-scorer` (Switchyard's own; llm-d has none): packs low-priority work onto
/// the busiest endpoints that still have room and sends everything else to the least busy.
/// Under a flood of batch work that flow control holds below a ceiling, the free capacity then
/// sits on a few endpoints, where interactive requests find few batch requests (and so few
/// batch prefills sharing their steps), instead of being spread thinly over every endpoint.
/// The counts are the EPP's own in-flight requests (exact, current).
///
/// A request with a priority below `packBelowPriority` (default 0: sheddable work) scores
/// `(n + 1) / endpointCapacity` on an endpoint with `n < endpointCapacity` requests in flight
/// and 0 on a full one; any other request scores `1 − min(n, endpointCapacity) / endpointCapacity`.
/// `endpointCapacity` (required) is what an endpoint holds at once: the engine's
/// `max-num-seqs`, as the `concurrency-detector`'s `maxConcurrency`.
#[derive(Debug)]
pub struct PriorityPackingScorer {
    /// Configured name.
    pub name: String,
    /// In-flight requests at which an endpoint counts as full (`endpointCapacity`).
    pub endpoint_capacity: u64,
    /// Requests with a priority below this are packed (`packBelowPriority`, default 0).
    pub pack_below_priority: i32,
}
plugin_named!(PriorityPackingScorer, "priority-packing-scorer");

/// `priority-packing-scorer` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PriorityPackingYaml {
    endpoint_capacity: Option<i64>,
    pack_below_priority: Option<i32>,
}

impl PriorityPackingScorer {
    /// The scorer its `parameters` describe.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: PriorityPackingYaml = p.decode()?;
        let Some(capacity) = p.positive("endpointCapacity", y.endpoint_capacity)? else {
            return Err(p.invalid(
                "endpointCapacity",
                "required: the requests one endpoint holds at once (the engine's max-num-seqs)",
            ));
        };
        Ok(Self {
            name: p.name(),
            endpoint_capacity: capacity as u64,
            pack_below_priority: y.pack_below_priority.unwrap_or(0),
        })
    }
}

impl Scorer for PriorityPackingScorer {
    fn score(&self, r: &InferenceRequest, state: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        let cap = self.endpoint_capacity;
        let pack = r.priority < self.pack_below_priority;
        for (s, c) in scores.iter_mut().zip(c) {
            let n = state.in_flight.get(c.endpoint.id);
            *s = match (pack, n < cap) {
                (true, true) => (n + 1) as f64 / cap as f64,
                (true, false) => 0.0,
                (false, _) => 1.0 - n.min(cap) as f64 / cap as f64,
            };
        }
    }
}

/// `no-hit-lru-scorer` (llm-d): spreads cold requests (no endpoint holds any of their prefix)
/// over the endpoints in least-recently-used order, so that the new prefixes, which later
/// requests will stick to, grow evenly over the pool. Endpoints that never received a cold
/// request come first (in pool order), then the least recently used; warm requests score a
/// neutral 0.5 everywhere. Needs a prefix producer (without one every request is cold).
#[derive(Debug)]
pub struct NoHitLruScorer {
    /// Configured name.
    pub name: String,
    /// Endpoints remembered (`lruSize`, default 1024); older ones count as never used again.
    pub lru_size: usize,
    history: Mutex<ColdHistory>,
}

/// Which endpoint took a cold request when.
#[derive(Debug, Default)]
struct ColdHistory {
    /// Cold requests routed so far.
    sequence: u64,
    /// Per endpoint id: the sequence number of its last cold request and the endpoint that
    /// took it. Ids are handed on to newcomers once their endpoint has left the pool: a tick
    /// counts only for the endpoint that earned it (the `Weak` keeps its allocation, so no
    /// later endpoint can share its address).
    last: Vec<(u64, Weak<Endpoint>)>,
}

impl ColdHistory {
    /// The sequence number of `endpoint`'s last cold request (0 = never).
    fn last_of(&self, endpoint: &Arc<Endpoint>) -> u64 {
        self.last
            .get(endpoint.id.0 as usize)
            .filter(|(_, who)| std::ptr::eq(who.as_ptr(), Arc::as_ptr(endpoint)))
            .map_or(0, |(tick, _)| *tick)
    }
}
plugin_named!(NoHitLruScorer, "no-hit-lru-scorer");

/// `no-hit-lru-scorer` parameters, as llm-d names them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NoHitLruYaml {
    lru_size: Option<i64>,
    /// Never used upstream; accepted so that its configs load.
    #[serde(rename = "prefixPluginType")]
    _prefix_plugin_type: Option<String>,
    /// Never used upstream; accepted so that its configs load.
    #[serde(rename = "prefixPluginName")]
    _prefix_plugin_name: Option<String>,
    /// Names upstream's prefix producer; here the profile's prefix producer is used.
    #[serde(rename = "prefixMatchInfoProducerName")]
    _prefix_match_info_producer_name: Option<String>,
}

impl NoHitLruScorer {
    /// The scorer its `parameters` describe.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: NoHitLruYaml = p.decode()?;
        let lru_size = p.positive("lruSize", y.lru_size)?.unwrap_or(1024);
        Ok(Self::new(p.name(), lru_size))
    }

    /// A scorer remembering at most `lru_size` endpoints.
    pub fn new(name: String, lru_size: usize) -> Self {
        Self {
            name,
            lru_size: lru_size.max(1),
            history: Mutex::default(),
        }
    }

    /// Cold: no candidate holds any block of the request's prefix (or nothing was matched).
    /// An endpoint that is not a candidate (not ready, outside the subset) holding it does not
    /// make the request warm: it cannot go there.
    fn is_cold(state: &CycleState, candidates: &[Candidate]) -> bool {
        state.prefix.as_ref().is_none_or(|m| {
            candidates
                .iter()
                .all(|c| m.matched_blocks(&c.endpoint) == 0)
        })
    }
}

impl Scorer for NoHitLruScorer {
    fn score(&self, _: &InferenceRequest, state: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        if !Self::is_cold(state, c) {
            scores.iter_mut().for_each(|s| *s = 0.5);
            return;
        }
        if c.is_empty() {
            return;
        }
        if c.len() == 1 {
            scores[0] = 1.0;
            return;
        }
        let last: Vec<u64> = {
            let history = self.history.lock();
            c.iter().map(|c| history.last_of(&c.endpoint)).collect()
        };
        // (last use, index) of the used ones, oldest first. Uses are distinct ticks, so an
        // unstable sort of the pairs orders them exactly, without chasing `last[i]`.
        let mut used: Vec<(u64, usize)> = (0..c.len())
            .filter(|&i| last[i] > 0)
            .map(|i| (last[i], i))
            .collect();
        used.sort_unstable();
        // Beyond `lru_size` remembered endpoints the oldest are forgotten: never used again.
        let forgotten = used.len().saturating_sub(self.lru_size);
        // Never used first, in candidate order (already ascending unless some were forgotten).
        let mut order: Vec<usize> = (0..c.len()).filter(|&i| last[i] == 0).collect();
        if forgotten > 0 {
            order.extend(used[..forgotten].iter().map(|&(_, i)| i));
            order.sort_unstable();
        }
        order.extend(used[forgotten..].iter().map(|&(_, i)| i));
        let span = (c.len() - 1) as f64;
        for (rank, &i) in order.iter().enumerate() {
            scores[i] = 1.0 - rank as f64 / span;
        }
    }

    fn learns(&self) -> bool {
        true
    }

    fn pre_request(&self, _: &InferenceRequest, state: &CycleState, targets: &[Candidate]) {
        let Some(primary) = targets.first() else {
            return;
        };
        // The candidates are not known here: any endpoint holding the prefix makes the
        // request warm, so a request scored cold because only a non-candidate held it is not
        // recorded (the order misses one use; it never records a warm one).
        if state
            .prefix
            .as_ref()
            .is_some_and(|m| m.matched.iter().any(|&b| b > 0))
        {
            return;
        }
        let idx = primary.endpoint.id.0 as usize;
        let mut history = self.history.lock();
        history.sequence += 1;
        let sequence = history.sequence;
        if history.last.len() <= idx {
            history.last.resize(idx + 1, (0, Weak::new()));
        }
        history.last[idx] = (sequence, Arc::downgrade(&primary.endpoint));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
        let c = candidates(&[
            metrics(0, 0, 0.25),
            metrics(0, 0, 1.5),
            metrics(0, 0, f64::NAN),
        ]);
        let s = run(
            &KvCacheUtilizationScorer { name: "kv".into() },
            &InferenceRequest::default(),
            &c,
        );
        // Found by the scorer property test: a NaN usage used to score NaN.
        assert_eq!(s, vec![0.75, 0.0, 0.0]);
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
            tokens_through: Vec::new(),
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
        // With the placement loop's lists: not registered is 0 whatever the free slots,
        // registered and idle is 0.8 even without one.
        let listed = |names: &[&str]| {
            Some(crate::lora::LoadedAdapters {
                names: names.iter().map(|n| (*n).to_owned()).collect(),
            })
        };
        c[1].endpoint.store_adapters(listed(&["other"]));
        c[3].endpoint.store_adapters(listed(&["x", "ad"]));
        let s = run(&LoraAffinityScorer { name: "l".into() }, &req, &c);
        assert_eq!(s, vec![1.0, 0.0, 0.6, 0.8]);
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

    #[test]
    fn active_request_scorer_prefers_fewer_in_flight() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let len = c.iter().map(|c| c.endpoint.id.0 as usize).max().unwrap() + 1;
        let counters: Vec<Arc<crate::scheduling::EndpointLoad>> =
            (0..len).map(|_| Arc::default()).collect();
        for (c, n) in c.iter().zip([0, 2, 4]) {
            counters[c.endpoint.id.0 as usize]
                .requests
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        let mut state = CycleState::new(tokio::time::Instant::now());
        state.in_flight = crate::scheduling::InFlightCounts::new(Arc::new(counters));
        let run = |scorer: &ActiveRequestScorer, c: &[Candidate], state: &CycleState| {
            let mut s = vec![f64::NAN; c.len()];
            scorer.score(&InferenceRequest::default(), state, c, &mut s);
            s
        };
        let plain = ActiveRequestScorer {
            name: "a".into(),
            idle_threshold: 0,
            max_busy_score: 1.0,
        };
        assert_eq!(run(&plain, &c, &state), vec![1.0, 0.5, 0.0]);
        // An idle threshold of 2 with a gap: ≤ 2 in flight is idle (1.0), busy pods ≤ 0.5.
        let gapped = ActiveRequestScorer {
            name: "a".into(),
            idle_threshold: 2,
            max_busy_score: 0.5,
        };
        assert_eq!(run(&gapped, &c, &state), vec![1.0, 1.0, 0.0]);
        // Nothing in flight anywhere (or no counts at all): every endpoint is idle.
        let untracked = CycleState::new(tokio::time::Instant::now());
        assert_eq!(run(&plain, &c, &untracked), vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn priority_packing_packs_sheddable_work_and_spreads_the_rest() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let len = c.iter().map(|c| c.endpoint.id.0 as usize).max().unwrap() + 1;
        let counters: Vec<Arc<crate::scheduling::EndpointLoad>> =
            (0..len).map(|_| Arc::default()).collect();
        for (c, n) in c.iter().zip([1, 3, 4]) {
            counters[c.endpoint.id.0 as usize]
                .requests
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        let mut state = CycleState::new(tokio::time::Instant::now());
        state.in_flight = crate::scheduling::InFlightCounts::new(Arc::new(counters));
        let scorer = PriorityPackingScorer {
            name: "p".into(),
            endpoint_capacity: 4,
            pack_below_priority: 0,
        };
        let run = |priority: i32| {
            let mut s = vec![f64::NAN; c.len()];
            let r = InferenceRequest {
                priority,
                ..Default::default()
            };
            scorer.score(&r, &state, &c, &mut s);
            s
        };
        // Sheddable: the busiest endpoint with room wins; a full one scores nothing.
        assert_eq!(run(-1), vec![0.5, 1.0, 0.0]);
        // Anything else: the least busy wins.
        assert_eq!(run(0), vec![0.75, 0.25, 0.0]);
        assert_eq!(run(10), run(0));
        // The parameters: capacity required and positive, unknown keys refused.
        let load = |params: &str| {
            crate::config::load(
                &format!(
                    "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: priority-packing-scorer\n  parameters: {params}\n- type: max-score-picker\n"
                ),
                1,
            )
        };
        assert!(load("{endpointCapacity: 16, packBelowPriority: 5}").is_ok());
        for bad in [
            "{}",
            "{endpointCapacity: 0}",
            "{endpointCapacity: 16, pack: 1}",
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(
                err.contains("priority-packing-scorer") || err.contains("endpointCapacity"),
                "{bad}: {err}"
            );
        }
    }

    fn cold_state(hit: Option<(usize, u32)>) -> CycleState {
        let mut state = CycleState::new(tokio::time::Instant::now());
        let mut matched = vec![0; 8];
        if let Some((i, b)) = hit {
            matched[i] = b;
        }
        state.prefix = Some(crate::scheduling::PrefixMatch {
            hashes: vec![1, 2, 3, 4],
            matched,
            block_tokens: 16,
            tokens_through: Vec::new(),
        });
        state
    }

    /// Scores a cold request and records the best candidate as its destination.
    fn route_cold(scorer: &NoHitLruScorer, c: &[Candidate]) -> (Vec<f64>, usize) {
        let state = cold_state(None);
        let mut s = vec![0.0; c.len()];
        scorer.score(&InferenceRequest::default(), &state, c, &mut s);
        let best = (0..c.len())
            .max_by(|&a, &b| s[a].total_cmp(&s[b]).then(b.cmp(&a)))
            .unwrap();
        scorer.pre_request(
            &InferenceRequest::default(),
            &state,
            std::slice::from_ref(&c[best]),
        );
        (s, best)
    }

    #[test]
    fn no_hit_lru_spreads_cold_requests_in_lru_order() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let scorer = NoHitLruScorer::new("lru".into(), 1024);
        // Never-used endpoints first, in pool order.
        let (s, best) = route_cold(&scorer, &c);
        assert_eq!((s, best), (vec![1.0, 0.5, 0.0], 0));
        let (s, best) = route_cold(&scorer, &c);
        assert_eq!((s, best), (vec![0.0, 1.0, 0.5], 1));
        let (s, best) = route_cold(&scorer, &c);
        assert_eq!((s, best), (vec![0.5, 0.0, 1.0], 2));
        // All used: the least recently used (endpoint 0) comes first.
        let (s, best) = route_cold(&scorer, &c);
        assert_eq!((s, best), (vec![1.0, 0.5, 0.0], 0));
        // A warm request is neutral and does not move the order.
        let warm = cold_state(Some((c[2].endpoint.id.0 as usize, 1)));
        let mut s = vec![0.0; 3];
        scorer.score(&InferenceRequest::default(), &warm, &c, &mut s);
        assert_eq!(s, vec![0.5, 0.5, 0.5]);
        scorer.pre_request(&InferenceRequest::default(), &warm, &c[2..]);
        let (s, _) = route_cold(&scorer, &c);
        assert_eq!(s, vec![0.0, 1.0, 0.5]);
    }

    /// A prefix held only by an endpoint that is not a candidate does not make a request
    /// warm: it cannot go there, so it is spread as a cold one.
    #[test]
    fn a_prefix_held_only_outside_the_candidates_is_cold() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let scorer = NoHitLruScorer::new("lru".into(), 1024);
        let outside = c.iter().map(|c| c.endpoint.id.0 as usize).max().unwrap() + 1;
        let state = cold_state(Some((outside, 3)));
        let mut s = vec![0.0; 2];
        scorer.score(&InferenceRequest::default(), &state, &c, &mut s);
        assert_eq!(
            s,
            vec![1.0, 0.0],
            "spread, not the warm request's neutral 0.5"
        );
    }

    #[test]
    fn no_hit_lru_scores_no_candidates_without_panicking() {
        // Found by the scorer property test: `c.len() - 1` underflowed for an empty slice.
        let scorer = NoHitLruScorer::new("lru".into(), 4);
        scorer.score(
            &InferenceRequest::default(),
            &cold_state(None),
            &[],
            &mut [],
        );
    }

    /// Review (scheduling): ids pass to newcomers once their endpoint has left; a newcomer
    /// inherited the departed endpoint's last cold request and ranked as recently used. Only
    /// the endpoint that took a cold request is remembered for it.
    #[test]
    fn no_hit_lru_does_not_hand_a_departed_endpoints_turn_on() {
        let m = || [metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)];
        let c = candidates(&m());
        let scorer = NoHitLruScorer::new("lru".into(), 1024);
        route_cold(&scorer, &c);
        route_cold(&scorer, &c);
        // The same ids, other endpoints: all of them never used, in pool order.
        let newcomers = candidates(&m());
        assert_eq!(c[0].endpoint.id, newcomers[0].endpoint.id);
        let (s, best) = route_cold(&scorer, &newcomers);
        assert_eq!((s, best), (vec![1.0, 0.5, 0.0], 0));
    }

    #[test]
    fn no_hit_lru_forgets_beyond_its_size() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let scorer = NoHitLruScorer::new("lru".into(), 1);
        route_cold(&scorer, &c);
        route_cold(&scorer, &c);
        // Endpoints 0 and 1 were used, but only the newest (1) is remembered: 0 and 2 rank as
        // never used, in pool order.
        let (s, best) = route_cold(&scorer, &c);
        assert_eq!((s, best), (vec![1.0, 0.0, 0.5], 0));
    }
}
