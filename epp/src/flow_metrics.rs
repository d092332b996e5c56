//! Flow control's metrics, with the reference's names (`llm_d_epp_flow_control_*`, and the
//! deprecated `inference_extension_flow_control_*` twins of the queue and saturation families,
//! which the workload-variant-autoscaler's scale-from-zero still reads), and the pool's demand
//! gauges the autoscaling examples scale on.
//!
//! Labels a client could choose are bounded: the fairness id through [`FairnessLabels`]
//! (`--fairness-id-metric-label-limit` values, then `other`, as the reference caps it), models through [`ModelLabels`]; priorities
//! come from the operator's InferenceObjectives and outcomes from a fixed set.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use endpoint_picker::director::Director;
use endpoint_picker::flow::{FlowObserver, FlowRecordKey, FlowRequest, Outcome};
use parking_lot::RwLock;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::labels::{FairnessLabels, FirstSeen, ModelLabels};

/// Most (fairness id, model, served model) label sets the flow-control families file requests
/// under; later sets share one, all `other`. Each label is bounded alone, but the families key
/// on them together (and on priority and outcome) and keep every set for the life of the
/// process: 1,000 tenants × a thousand model names would be millions of series. Each set is
/// about 150 lines of `/metrics` at worst (gauges, and both histogram families per outcome).
pub const MAX_FLOW_LABEL_SETS: usize = 512;

/// The families registered here, as in [`crate::metrics::FAMILIES`].
pub const FLOW_FAMILIES: &[(&str, &str)] = &[
    ("llm_d_epp_flow_control_queue_size", "gauge"),
    ("inference_extension_flow_control_queue_size", "gauge"),
    ("llm_d_epp_flow_control_queue_bytes", "gauge"),
    ("inference_extension_flow_control_queue_bytes", "gauge"),
    (
        "llm_d_epp_flow_control_request_queue_duration_seconds",
        "histogram",
    ),
    (
        "inference_extension_flow_control_request_queue_duration_seconds",
        "histogram",
    ),
    ("llm_d_epp_flow_control_requests", "counter"),
    ("llm_d_epp_flow_control_pool_saturation", "gauge"),
    ("inference_extension_flow_control_pool_saturation", "gauge"),
    (
        "llm_d_epp_flow_control_capacity_utilization_requests",
        "gauge",
    ),
    ("llm_d_epp_flow_control_capacity_utilization_bytes", "gauge"),
    ("switchyard_pool_demand_requests", "gauge"),
    ("switchyard_pool_capacity_requests", "gauge"),
    ("switchyard_pool_demand_ratio", "gauge"),
];

/// The reference's queue-duration buckets.
const QUEUE_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// `fairness_id, priority, inference_pool, model_name, target_model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// The flow.
    pub fairness_id: String,
    /// The band.
    pub priority: String,
    /// The pool.
    pub inference_pool: String,
    /// Model asked for.
    pub model_name: String,
    /// Model served.
    pub target_model_name: String,
}

/// `fairness_id, priority, outcome, inference_pool, model_name, target_model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitLabels {
    /// The flow.
    pub fairness_id: String,
    /// The band.
    pub priority: String,
    /// How it left.
    pub outcome: &'static str,
    /// The pool.
    pub inference_pool: String,
    /// Model asked for.
    pub model_name: String,
    /// Model served.
    pub target_model_name: String,
}

/// `outcome, priority, inference_pool`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// How it left.
    pub outcome: &'static str,
    /// The band.
    pub priority: String,
    /// The pool.
    pub inference_pool: String,
}

/// `inference_pool, stage`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SaturationLabels {
    /// The pool.
    pub inference_pool: String,
    /// `effective` (no prefill/decode split here).
    pub stage: &'static str,
}

/// `priority, inference_pool`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BandLabels {
    /// The band.
    pub priority: String,
    /// The pool.
    pub inference_pool: String,
}

/// `name` (the pool; as the other pool gauges).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolName {
    /// The pool.
    pub name: String,
}

type GaugeF = Gauge<f64, AtomicU64>;
type WaitHistograms = Family<WaitLabels, Histogram, fn() -> Histogram>;

/// Flow control's metrics and the demand gauges.
#[derive(Debug)]
pub struct FlowMetrics {
    queue_size: [Family<QueueLabels, Gauge>; 2],
    queue_bytes: [Family<QueueLabels, Gauge>; 2],
    queue_duration: [WaitHistograms; 2],
    requests: Family<OutcomeLabels, Counter>,
    saturation: [Family<SaturationLabels, GaugeF>; 2],
    band_requests: Family<BandLabels, GaugeF>,
    band_bytes: Family<BandLabels, GaugeF>,
    demand: Family<PoolName, Gauge>,
    capacity: Family<PoolName, Gauge>,
    demand_ratio: Family<PoolName, GaugeF>,
    models: Arc<ModelLabels>,
    fairness: Arc<FairnessLabels>,
    /// The label sets given out so far ([`MAX_FLOW_LABEL_SETS`]).
    label_sets: FirstSeen<FlowRecordKey>,
    pool: RwLock<Arc<str>>,
}

impl FlowMetrics {
    /// Creates the families and registers them.
    pub fn register(
        registry: &mut Registry,
        models: Arc<ModelLabels>,
        fairness: Arc<FairnessLabels>,
    ) -> Arc<Self> {
        fn queue_histogram() -> Histogram {
            Histogram::new(QUEUE_BUCKETS.iter().copied())
        }
        let hist = || Family::new_with_constructor(queue_histogram as fn() -> Histogram);
        let m = Self {
            queue_size: Default::default(),
            queue_bytes: Default::default(),
            queue_duration: [hist(), hist()],
            requests: Family::default(),
            saturation: Default::default(),
            band_requests: Family::default(),
            band_bytes: Family::default(),
            demand: Family::default(),
            capacity: Family::default(),
            demand_ratio: Family::default(),
            models,
            fairness,
            label_sets: FirstSeen::new(MAX_FLOW_LABEL_SETS),
            pool: RwLock::new(Arc::from("")),
        };
        for (i, prefix) in ["llm_d_epp", "inference_extension"].iter().enumerate() {
            registry.register(
                format!("{prefix}_flow_control_queue_size"),
                "Requests currently held by flow control, per flow and priority",
                m.queue_size[i].clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_queue_bytes"),
                "Request body bytes currently held by flow control, per flow and priority",
                m.queue_bytes[i].clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_request_queue_duration_seconds"),
                "Time requests spent in flow control, per flow, priority and outcome",
                m.queue_duration[i].clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_pool_saturation"),
                "Pool saturation as flow control's detector sees it (1 = saturated)",
                m.saturation[i].clone(),
            );
        }
        registry.register(
            "llm_d_epp_flow_control_requests",
            "Requests that went through flow control, by outcome and priority",
            m.requests.clone(),
        );
        registry.register(
            "llm_d_epp_flow_control_capacity_utilization_requests",
            "Requests queued in a priority band over the band's request capacity",
            m.band_requests.clone(),
        );
        registry.register(
            "llm_d_epp_flow_control_capacity_utilization_bytes",
            "Bytes queued in a priority band over the band's byte capacity",
            m.band_bytes.clone(),
        );
        registry.register(
            "switchyard_pool_demand_requests",
            "Requests the pool is asked to serve now: queued in flow control, dispatched, and in flight on the endpoints",
            m.demand.clone(),
        );
        registry.register(
            "switchyard_pool_capacity_requests",
            "Requests the pool's ready endpoints are meant to hold at once (ready endpoints times the saturation detector's per-endpoint concurrency)",
            m.capacity.clone(),
        );
        registry.register(
            "switchyard_pool_demand_ratio",
            "Demand over capacity (above 1: more replicas wanted; with no ready endpoint, the demand itself)",
            m.demand_ratio.clone(),
        );
        Arc::new(m)
    }

    fn queue_labels(&self, request: &FlowRequest, key: &FlowRecordKey) -> QueueLabels {
        QueueLabels {
            fairness_id: key.fairness_id.to_string(),
            priority: request.priority.to_string(),
            inference_pool: key.pool.to_string(),
            model_name: key.model.to_string(),
            target_model_name: key.target_model.to_string(),
        }
    }

    /// Refreshes the gauges read from current state: saturation, band utilisation, demand
    /// and capacity. Called with the other pool gauges.
    pub fn refresh(&self, director: &Director) {
        let pool = director.datastore().snapshot().name.clone();
        if **self.pool.read() != *pool {
            *self.pool.write() = Arc::from(pool.as_str());
        }
        let in_flight: u64 = {
            let snap = director.datastore().snapshot();
            snap.endpoints
                .iter()
                .map(|e| director.in_flight().get(e.id))
                .sum()
        };
        let (queued, dispatched) = match director.flow_control() {
            Some(fc) => {
                let s = fc.snapshot(tokio::time::Instant::now());
                // Read now, not as the last dispatch cycle saw it: cycles stop while nothing
                // waits, and the gauge (which an autoscaler reads) had kept the load of the
                // last burst until the next request.
                let saturation = director.pool_reading(fc.unrouted()).saturation;
                for (i, _) in self.saturation.iter().enumerate() {
                    self.saturation[i]
                        .get_or_create(&SaturationLabels {
                            inference_pool: pool.clone(),
                            stage: "effective",
                        })
                        .set(saturation);
                }
                self.band_requests.clear();
                self.band_bytes.clear();
                for b in &s.bands {
                    let labels = BandLabels {
                        priority: b.priority.to_string(),
                        inference_pool: pool.clone(),
                    };
                    self.band_requests
                        .get_or_create(&labels)
                        .set(b.queued as f64 / b.max_requests.max(1) as f64);
                    self.band_bytes
                        .get_or_create(&labels)
                        .set(b.bytes as f64 / b.max_bytes.max(1) as f64);
                }
                (s.queued, s.dispatched_unrouted)
            }
            None => (0, 0),
        };
        let reading = director.pool_reading(Default::default());
        let demand = queued + dispatched + in_flight;
        let capacity = reading.endpoints as u64
            * director
                .config()
                .saturation_detector
                .requests_per_endpoint();
        let labels = PoolName { name: pool };
        self.demand
            .get_or_create(&labels)
            .set(i64::try_from(demand).unwrap_or(i64::MAX));
        self.capacity
            .get_or_create(&labels)
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        self.demand_ratio
            .get_or_create(&labels)
            .set(if capacity == 0 {
                demand as f64
            } else {
                demand as f64 / capacity as f64
            });
    }
}

impl FlowMetrics {
    /// `key` if it is one of the first [`MAX_FLOW_LABEL_SETS`] sets, else the overflow set.
    fn label_set(&self, key: FlowRecordKey) -> FlowRecordKey {
        if self.label_sets.admits(&key) {
            return key;
        }
        let other = self.fairness.overflow();
        FlowRecordKey {
            fairness_id: other.clone(),
            model: other.clone(),
            target_model: other.clone(),
            pool: key.pool,
        }
    }
}

impl FlowObserver for FlowMetrics {
    fn entered(&self, request: &FlowRequest) -> FlowRecordKey {
        let key = self.label_set(FlowRecordKey {
            fairness_id: self.fairness.label(&request.fairness_id),
            model: self.models.label(&request.model),
            target_model: self.models.label(&request.target_model),
            pool: self.pool.read().clone(),
        });
        let labels = self.queue_labels(request, &key);
        for i in 0..2 {
            self.queue_size[i].get_or_create(&labels).inc();
            self.queue_bytes[i]
                .get_or_create(&labels)
                .inc_by(i64::try_from(request.bytes).unwrap_or(i64::MAX));
        }
        key
    }

    fn left(&self, request: &FlowRequest, key: &FlowRecordKey, outcome: Outcome, waited: Duration) {
        let labels = self.queue_labels(request, key);
        for i in 0..2 {
            self.queue_size[i].get_or_create(&labels).dec();
            self.queue_bytes[i]
                .get_or_create(&labels)
                .dec_by(i64::try_from(request.bytes).unwrap_or(i64::MAX));
        }
        let wait = WaitLabels {
            fairness_id: labels.fairness_id,
            priority: labels.priority,
            outcome: outcome.as_str(),
            inference_pool: labels.inference_pool,
            model_name: labels.model_name,
            target_model_name: labels.target_model_name,
        };
        for h in &self.queue_duration {
            h.get_or_create(&wait).observe(waited.as_secs_f64());
        }
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
                priority: wait.priority,
                inference_pool: wait.inference_pool,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 9: the saturation gauge kept the last dispatch cycle's reading while nothing
    /// waited, so an autoscaler reading it saw the pool as loaded as at the last burst. It is
    /// read from the pool at each refresh.
    #[tokio::test(start_paused = true)]
    async fn the_saturation_gauge_follows_the_pool_while_nothing_waits() {
        use endpoint_picker::datastore::{Datastore, EngineMetrics, test_util::pool};
        let ds = Arc::new(Datastore::new());
        ds.apply(pool(1));
        let config = endpoint_picker::config::load(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\n",
            1,
        )
        .unwrap();
        let director = Director::new(ds.clone(), Arc::new(config), 1);
        assert!(director.flow_control().is_some());
        let mut registry = Registry::default();
        let m = FlowMetrics::register(
            &mut registry,
            Arc::new(ModelLabels::default()),
            Arc::default(),
        );
        let waiting = |n| {
            for e in ds.snapshot().endpoints.iter() {
                e.store_metrics(EngineMetrics {
                    waiting_queue_size: n,
                    updated_at: Some(tokio::time::Instant::now()),
                    ..Default::default()
                });
            }
        };
        let gauge = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text.lines()
                .find(|l| l.starts_with("llm_d_epp_flow_control_pool_saturation{"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap()
        };
        waiting(100);
        m.refresh(&director);
        let loaded = gauge();
        waiting(0);
        m.refresh(&director);
        let idle = gauge();
        assert!(loaded >= 1.0 && idle < loaded, "{loaded} then {idle}");
    }

    /// Tenants × model names: the label sets stop at MAX_FLOW_LABEL_SETS, later ones share the
    /// overflow set, and a request leaves under the set it entered with.
    #[test]
    fn flow_label_sets_are_bounded_together() {
        let mut registry = Registry::default();
        let m = FlowMetrics::register(
            &mut registry,
            Arc::new(ModelLabels::default()),
            Arc::default(),
        );
        let mut held = Vec::new();
        for tenant in 0..600 {
            for model in ["a", "b", "c"] {
                let request = FlowRequest {
                    fairness_id: Arc::from(format!("tenant-{tenant}").as_str()),
                    priority: 0,
                    bytes: 1,
                    prompt_tokens: 1,
                    slo_ttft: None,
                    model: model.into(),
                    target_model: model.into(),
                };
                let key = m.entered(&request);
                held.push((request, key));
            }
        }
        let series = |text: &str| {
            text.lines()
                .filter(|l| l.starts_with("inference_extension_flow_control_queue_size{"))
                .count()
        };
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert_eq!(series(&text), MAX_FLOW_LABEL_SETS + 1);
        assert!(
            text.contains("inference_extension_flow_control_queue_size{fairness_id=\"other\",priority=\"0\",inference_pool=\"\",model_name=\"other\",target_model_name=\"other\"} 1288"),
            "{text}"
        );
        for (request, key) in &held {
            m.left(request, key, Outcome::Dispatched, Duration::ZERO);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.lines()
                .filter(|l| l.starts_with("inference_extension_flow_control_queue_size{"))
                .all(|l| l.ends_with(" 0")),
            "every gauge back to 0"
        );
    }

    #[test]
    fn queue_gauges_rise_and_fall_under_the_same_labels() {
        let mut registry = Registry::default();
        let m = FlowMetrics::register(
            &mut registry,
            Arc::new(ModelLabels::default()),
            Arc::default(),
        );
        let request = FlowRequest {
            fairness_id: Arc::from("tenant-a"),
            priority: -1,
            bytes: 300,
            prompt_tokens: 75,
            slo_ttft: None,
            model: "m".into(),
            target_model: "m".into(),
        };
        let key = m.entered(&request);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "llm_d_epp_flow_control_queue_size{fairness_id=\"tenant-a\",priority=\"-1\""
            ),
            "{text}"
        );
        // The pool's name is learnt while the request waits (review: it left under the new
        // name, and a +1 and a -1 series stuck).
        *m.pool.write() = Arc::from("p");
        m.left(&request, &key, Outcome::EvictedTtl, Duration::from_secs(2));
        // Families without samples are left out of the exposition: give each one.
        let pool = PoolName { name: "p".into() };
        let band = BandLabels {
            priority: "0".into(),
            inference_pool: "p".into(),
        };
        for f in &m.saturation {
            f.get_or_create(&SaturationLabels {
                inference_pool: "p".into(),
                stage: "effective",
            })
            .set(0.5);
        }
        m.band_requests.get_or_create(&band).set(0.1);
        m.band_bytes.get_or_create(&band).set(0.1);
        m.demand.get_or_create(&pool).set(1);
        m.capacity.get_or_create(&pool).set(1);
        m.demand_ratio.get_or_create(&pool).set(1.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("inference_extension_flow_control_queue_size{fairness_id=\"tenant-a\",priority=\"-1\",inference_pool=\"\",model_name=\"m\",target_model_name=\"m\"} 0"), "{text}");
        assert!(
            !text.contains(
                "queue_size{fairness_id=\"tenant-a\",priority=\"-1\",inference_pool=\"p\""
            ),
            "{text}"
        );
        assert!(
            text.contains("llm_d_epp_flow_control_requests_total{outcome=\"EvictedTTL\",priority=\"-1\",inference_pool=\"\"} 1"),
            "{text}"
        );
        crate::metrics::tests::assert_registered_families_are(&text, FLOW_FAMILIES);
    }
}
