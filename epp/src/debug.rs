//! Decision traces: a bounded ring of the last scheduling decisions, and the JSON behind the
//! admin server's `/debug/pool` (current endpoints with their latest metrics, plus that ring).
//!
//! Recording happens on the request path, so it is one short lock and a few small copies; the
//! ring's capacity is fixed at start-up and old records are dropped, never grown past it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use endpoint_picker::datastore::Datastore;
use endpoint_picker::director::Director;
use endpoint_picker::scheduling::Explanation;
use parking_lot::Mutex;
use serde::Serialize;

/// Largest ring accepted; a larger `--debug-decisions` is clamped to it.
pub const MAX_DECISIONS: usize = 10_000;
/// Candidate rows kept per decision (best first).
const MAX_ROWS: usize = 8;

/// One scorer of a decision.
#[derive(Debug, Clone, Serialize)]
pub struct ScorerWeight {
    /// Scorer name.
    pub name: String,
    /// Its weight.
    pub weight: f64,
}

/// One candidate of a decision.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateScores {
    /// Endpoint name.
    pub endpoint: String,
    /// Weighted total.
    pub total: f64,
    /// Raw scores, aligned with [`DecisionRecord::scorers`].
    pub scores: Vec<f64>,
    /// The cost model's predicted time to first token, milliseconds (when it ran).
    pub predicted_ttft_ms: Option<f64>,
}

/// One scheduling decision (or refusal).
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Wall-clock time of the decision, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// `x-request-id`.
    pub request_id: String,
    /// Model asked for.
    pub model: String,
    /// Model served.
    pub target_model: String,
    /// `routed`, or the error code of a refusal.
    pub outcome: String,
    /// The destination header value, when routed.
    pub destination: Option<String>,
    /// Time spent in the director (candidates, admission, producers, scheduler), microseconds.
    pub scheduling_us: u64,
    /// Picked endpoint names, primary first.
    pub picked: Vec<String>,
    /// The scorers and weights of the primary profile.
    pub scorers: Vec<ScorerWeight>,
    /// The best candidates with their scores (at most 8).
    pub candidates: Vec<CandidateScores>,
}

impl DecisionRecord {
    /// A record without a score breakdown.
    pub fn new(
        request_id: &str,
        model: &str,
        target_model: &str,
        outcome: &str,
        scheduling: Duration,
    ) -> Self {
        Self {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            request_id: request_id.to_owned(),
            model: model.to_owned(),
            target_model: target_model.to_owned(),
            outcome: outcome.to_owned(),
            destination: None,
            scheduling_us: scheduling.as_micros() as u64,
            picked: Vec::new(),
            scorers: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Adds the breakdown of `explanation`, best candidates first.
    pub fn with_explanation(mut self, e: &Explanation) -> Self {
        self.picked = e.picked.clone();
        self.scorers = e
            .scorers
            .iter()
            .map(|(name, weight)| ScorerWeight {
                name: name.clone(),
                weight: *weight,
            })
            .collect();
        let mut rows: Vec<_> = e.rows.iter().collect();
        rows.sort_by(|a, b| b.total.total_cmp(&a.total));
        self.candidates = rows
            .into_iter()
            .take(MAX_ROWS)
            .map(|r| CandidateScores {
                endpoint: r.endpoint.clone(),
                total: r.total,
                scores: r.scores.clone(),
                predicted_ttft_ms: r.predicted_ttft_ms,
            })
            .collect();
        self
    }
}

/// The ring of recent decisions. Capacity 0 records nothing.
#[derive(Debug)]
pub struct DecisionLog {
    capacity: usize,
    /// Shared records: reading the ring under its lock (which every routed request's `push`
    /// takes) copies pointers, not up to 10,000 records.
    ring: Mutex<VecDeque<Arc<DecisionRecord>>>,
}

impl DecisionLog {
    /// A ring holding the last `capacity` decisions (clamped to [`MAX_DECISIONS`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(MAX_DECISIONS);
        Self {
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    /// True when decisions are recorded.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records a decision, dropping the oldest when full.
    pub fn push(&self, record: DecisionRecord) {
        if self.capacity == 0 {
            return;
        }
        let evicted = {
            let mut ring = self.ring.lock();
            let evicted = if ring.len() == self.capacity {
                ring.pop_front()
            } else {
                None
            };
            ring.push_back(Arc::new(record));
            evicted
        };
        // Freed outside the lock.
        drop(evicted);
    }

    /// The recorded decisions, oldest first.
    pub fn recent(&self) -> Vec<Arc<DecisionRecord>> {
        self.ring.lock().iter().cloned().collect()
    }
}

/// An endpoint's latest engine metrics as `/debug/pool` shows them.
#[derive(Debug, Serialize)]
pub struct EndpointMetricsView {
    /// Requests waiting in the engine's queue.
    pub waiting_queue_size: u64,
    /// Requests running.
    pub running_requests: u64,
    /// KV-cache utilisation in `[0, 1]`.
    pub kv_cache_usage: f64,
    /// LoRA adapters loaded.
    pub active_models: Vec<String>,
    /// LoRA adapters waiting.
    pub waiting_models: Vec<String>,
    /// LoRA slots.
    pub max_active_models: u32,
    /// Tokens per KV block.
    pub cache_block_size: Option<u32>,
    /// KV blocks.
    pub cache_num_blocks: Option<u64>,
    /// Seconds since the last successful scrape (`None` = never scraped).
    pub age_seconds: Option<f64>,
    /// Seconds the values still stand while the engine is quiet and scraped rarely (see
    /// `--idle-scrape-interval`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet_for_seconds: Option<f64>,
    /// `serving`, `loading`, `unreachable` or `unknown` (never scraped, or its readiness
    /// check not answered yet).
    pub readiness: &'static str,
}

/// One endpoint of `/debug/pool`.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// Scheduling endpoint name.
    pub name: String,
    /// Pod name.
    pub pod_name: String,
    /// `ip:port`.
    pub address: String,
    /// Requests this EPP has in flight on it.
    pub in_flight: u64,
    /// Latest metrics.
    pub metrics: EndpointMetricsView,
}

/// The `/debug/pool` document.
#[derive(Debug, Serialize)]
pub struct PoolView {
    /// Pool name.
    pub pool: String,
    /// Pool namespace.
    pub namespace: String,
    /// Endpoints, in discovery order.
    pub endpoints: Vec<EndpointView>,
    /// Flow control's queues (`None`: the flowControl feature gate is off).
    pub flow_control: Option<FlowView>,
    /// Ring capacity (0 = decisions are not recorded; see `--debug-decisions`).
    pub decision_log_capacity: usize,
    /// The last decisions, oldest first.
    #[serde(serialize_with = "shared_records")]
    pub decisions: Vec<Arc<DecisionRecord>>,
}

/// Flow control's queues as `/debug/pool` shows them.
#[derive(Debug, Serialize)]
pub struct FlowView {
    /// Requests queued.
    pub queued: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Requests let go and not yet routed.
    pub dispatched_unrouted: u64,
    /// Whether the pool had no endpoint at the last dispatch cycle (the waiting room).
    pub pool_empty: bool,
    /// The saturation at the last cycle.
    pub saturation: f64,
    /// Global request cap (0 = none).
    pub max_requests: u64,
    /// Global byte cap (0 = none).
    pub max_bytes: u64,
    /// Bands, highest priority first.
    pub bands: Vec<BandView>,
    /// Requests per outcome since start.
    pub outcomes: std::collections::BTreeMap<&'static str, u64>,
}

/// One band of [`FlowView`].
#[derive(Debug, Serialize)]
pub struct BandView {
    /// Priority.
    pub priority: i32,
    /// Requests queued.
    pub queued: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Request cap.
    pub max_requests: u64,
    /// Byte cap.
    pub max_bytes: u64,
    /// Its ceiling at the last cycle.
    pub ceiling: Option<f64>,
    /// Fairness policy (plugin name).
    pub fairness: String,
    /// Ordering policy (plugin name).
    pub ordering: String,
    /// Flows with requests queued.
    pub flow_count: usize,
    /// The first 100 of them, by fairness id.
    pub flows: Vec<FlowQueueView>,
}

/// One flow's queue of [`BandView`].
#[derive(Debug, Serialize)]
pub struct FlowQueueView {
    /// Fairness id.
    pub fairness_id: String,
    /// Requests queued.
    pub queued: usize,
    /// Their body bytes.
    pub bytes: u64,
    /// Seconds its oldest request has waited.
    pub oldest_wait_seconds: f64,
}

fn flow_view(director: &Director, now: tokio::time::Instant) -> Option<FlowView> {
    let s = director.flow_control()?.snapshot(now);
    Some(FlowView {
        queued: s.queued,
        bytes: s.bytes,
        dispatched_unrouted: s.dispatched_unrouted,
        pool_empty: s.pool_empty,
        saturation: s.saturation,
        max_requests: s.max_requests,
        max_bytes: s.max_bytes,
        bands: s
            .bands
            .into_iter()
            .map(|b| BandView {
                priority: b.priority,
                queued: b.queued,
                bytes: b.bytes,
                max_requests: b.max_requests,
                max_bytes: b.max_bytes,
                ceiling: b.ceiling,
                fairness: b.fairness.to_string(),
                ordering: b.ordering.to_string(),
                flow_count: b.flow_count,
                flows: b
                    .flows
                    .into_iter()
                    .map(|f| FlowQueueView {
                        fairness_id: f.fairness_id.to_string(),
                        queued: f.queued,
                        bytes: f.bytes,
                        oldest_wait_seconds: f.oldest_wait.as_secs_f64(),
                    })
                    .collect(),
            })
            .collect(),
        outcomes: s
            .outcomes
            .into_iter()
            .map(|(o, n)| (o.as_str(), n))
            .collect(),
    })
}

/// The ring's shared records, serialised as the records themselves.
fn shared_records<S: serde::Serializer>(
    records: &[Arc<DecisionRecord>],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(records.iter().map(|r| &**r))
}

/// Builds the `/debug/pool` document from current state.
pub fn pool_view(datastore: &Datastore, director: &Director, log: &DecisionLog) -> PoolView {
    let snap = datastore.snapshot();
    let now = tokio::time::Instant::now();
    let endpoints = snap
        .endpoints
        .iter()
        .map(|e| {
            let m = e.metrics();
            EndpointView {
                name: e.spec.name.clone(),
                pod_name: e.spec.pod_name.clone(),
                address: e.host_port.to_string(),
                in_flight: director.in_flight().get(e.id),
                metrics: EndpointMetricsView {
                    waiting_queue_size: m.waiting_queue_size,
                    running_requests: m.running_requests,
                    kv_cache_usage: m.kv_cache_usage,
                    active_models: m.active_models.clone(),
                    waiting_models: m.waiting_models.clone(),
                    max_active_models: m.max_active_models,
                    cache_block_size: m.cache_block_size,
                    cache_num_blocks: m.cache_num_blocks,
                    age_seconds: m
                        .updated_at
                        .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                    quiet_for_seconds: m
                        .quiet_until
                        .map(|until| until.saturating_duration_since(now).as_secs_f64()),
                    readiness: m.readiness.as_str(),
                },
            }
        })
        .collect();
    PoolView {
        pool: snap.name.clone(),
        namespace: snap.namespace.clone(),
        endpoints,
        flow_control: flow_view(director, now),
        decision_log_capacity: log.capacity(),
        decisions: log.recent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_n() {
        let log = DecisionLog::new(3);
        for i in 0..5 {
            log.push(DecisionRecord::new(
                &i.to_string(),
                "m",
                "m",
                "routed",
                Duration::ZERO,
            ));
        }
        let ids: Vec<_> = log
            .recent()
            .into_iter()
            .map(|r| r.request_id.clone())
            .collect();
        assert_eq!(ids, vec!["2", "3", "4"]);
        let off = DecisionLog::new(0);
        off.push(DecisionRecord::new("x", "m", "m", "routed", Duration::ZERO));
        assert!(off.recent().is_empty() && !off.enabled());
        assert_eq!(DecisionLog::new(usize::MAX).capacity(), MAX_DECISIONS);
    }
}
