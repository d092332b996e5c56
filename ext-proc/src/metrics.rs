//! The EPP's Prometheus metrics, with the reference EPP's names, types and labels.
//!
//! One registry is built at start-up and every component gets a handle to [`EppMetrics`].
//! prometheus-client appends `_total` to counters, so counters are registered without it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use endpoint_picker::datastore::Datastore;
use endpoint_picker::director::Director;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `model_name, target_model_name, priority`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model asked for.
    pub model_name: String,
    /// Model served.
    pub target_model_name: String,
    /// Objective priority.
    pub priority: String,
}

/// `model_name, target_model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Model asked for.
    pub model_name: String,
    /// Model served.
    pub target_model_name: String,
}

/// `model_name, target_model_name, error_code`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Model asked for.
    pub model_name: String,
    /// Model served.
    pub target_model_name: String,
    /// Error code name.
    pub error_code: String,
}

/// `model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOnly {
    /// Model asked for.
    pub model_name: String,
}

/// `name` (the pool).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Pool name.
    pub name: String,
}

/// `name, model_server_pod`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    /// Pool name.
    pub name: String,
    /// Endpoint name.
    pub model_server_pod: String,
}

/// `commit, build_ref`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    /// Source revision.
    pub commit: String,
    /// Version.
    pub build_ref: String,
}

/// `status, target_model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success` or `failure`.
    pub status: String,
    /// Model served.
    pub target_model_name: String,
}

/// `outcome` of an ext_proc stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `ok`, `error` or `cancelled`.
    pub outcome: String,
}

fn histogram_family<L>(buckets: &'static [f64]) -> Family<L, Histogram, fn() -> Histogram>
where
    L: Clone + std::hash::Hash + Eq,
{
    fn make(buckets: &'static [f64]) -> Histogram {
        Histogram::new(buckets.iter().copied())
    }
    // Family needs a constructor without captures; pick one of a few static bucket sets.
    let ctor: fn() -> Histogram = if std::ptr::eq(buckets, DURATION_BUCKETS) {
        || make(DURATION_BUCKETS)
    } else if std::ptr::eq(buckets, SIZE_BUCKETS) {
        || make(SIZE_BUCKETS)
    } else if std::ptr::eq(buckets, TOKEN_BUCKETS) {
        || make(TOKEN_BUCKETS)
    } else {
        || make(TPOT_BUCKETS)
    };
    Family::new_with_constructor(ctor)
}

/// Request durations: 5 ms … 1 h, as the reference.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
/// Body sizes in bytes.
const SIZE_BUCKETS: &[f64] = &[
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    2048.0,
    4096.0,
    8192.0,
    16384.0,
    32768.0,
    65536.0,
    131072.0,
    262144.0,
    524288.0,
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
];
/// Token counts.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
];
/// Seconds per output token.
const TPOT_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
];

/// Every metric the EPP exports.
#[derive(Debug)]
pub struct EppMetrics {
    /// `inference_objective_request_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `inference_objective_request_error_total`.
    pub request_errors: Family<ErrorLabels, Counter>,
    /// `inference_objective_request_duration_seconds`.
    pub request_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_objective_request_sizes`.
    pub request_sizes: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_objective_response_sizes`.
    pub response_sizes: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_objective_input_tokens`.
    pub input_tokens: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_objective_output_tokens`.
    pub output_tokens: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_objective_prompt_cached_tokens`.
    pub cached_tokens: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_objective_normalized_time_per_output_token_seconds`.
    pub normalized_tpot: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_objective_running_requests`.
    pub running_requests: Family<ModelOnly, Gauge>,
    /// `inference_pool_average_kv_cache_utilization`.
    pub pool_avg_kv: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    /// `inference_pool_average_queue_size`.
    pub pool_avg_queue: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    /// `inference_pool_average_running_requests`.
    pub pool_avg_running: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    /// `inference_pool_ready_pods`.
    pub pool_ready_pods: Family<PoolLabels, Gauge>,
    /// `inference_pool_per_pod_queue_size`.
    pub per_pod_queue: Family<PodLabels, Gauge>,
    /// `inference_extension_scheduler_e2e_duration_seconds`.
    pub scheduler_e2e: Histogram,
    /// `inference_extension_scheduler_attempts_total`.
    pub scheduler_attempts: Family<AttemptLabels, Counter>,
    /// `inference_extension_request_path_overhead_seconds`: body EoS to our answer.
    pub request_path_overhead: Histogram,
    /// `inference_extension_ext_proc_streams_total`.
    pub streams: Family<StreamLabels, Counter>,
    /// `inference_extension_ext_proc_active_streams`.
    pub active_streams: Gauge,
    /// `inference_extension_model_rewrite_decisions_total` is recorded with this.
    pub rewrites: Family<ModelLabels, Counter>,
}

impl EppMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = EppMetrics {
            requests: Family::default(),
            request_errors: Family::default(),
            request_duration: histogram_family(DURATION_BUCKETS),
            request_sizes: histogram_family(SIZE_BUCKETS),
            response_sizes: histogram_family(SIZE_BUCKETS),
            input_tokens: histogram_family(TOKEN_BUCKETS),
            output_tokens: histogram_family(TOKEN_BUCKETS),
            cached_tokens: histogram_family(TOKEN_BUCKETS),
            normalized_tpot: histogram_family(TPOT_BUCKETS),
            running_requests: Family::default(),
            pool_avg_kv: Family::default(),
            pool_avg_queue: Family::default(),
            pool_avg_running: Family::default(),
            pool_ready_pods: Family::default(),
            per_pod_queue: Family::default(),
            scheduler_e2e: Histogram::new(exponential_buckets(0.00001, 2.0, 20)),
            scheduler_attempts: Family::default(),
            request_path_overhead: Histogram::new(exponential_buckets(0.00001, 2.0, 20)),
            streams: Family::default(),
            active_streams: Gauge::default(),
            rewrites: Family::default(),
        };
        let r = registry;
        r.register(
            "inference_objective_request",
            "Counter of inference objective requests broken out for each model and target model.",
            m.requests.clone(),
        );
        r.register("inference_objective_request_error", "Counter of inference objective requests errors broken out for each model and target model.", m.request_errors.clone());
        r.register("inference_objective_request_duration_seconds", "Inference objective response latency distribution in seconds for each model and target model.", m.request_duration.clone());
        r.register("inference_objective_request_sizes", "Inference objective requests size distribution in bytes for each model and target model.", m.request_sizes.clone());
        r.register("inference_objective_response_sizes", "Inference objective responses size distribution in bytes for each model and target model.", m.response_sizes.clone());
        r.register(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model.",
            m.input_tokens.clone(),
        );
        r.register(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model.",
            m.output_tokens.clone(),
        );
        r.register("inference_objective_prompt_cached_tokens", "Inference objective prompt cached token count distribution for requests in each model.", m.cached_tokens.clone());
        r.register("inference_objective_normalized_time_per_output_token_seconds", "Inference objective latency divided by number of output tokens in seconds for each model and target model.", m.normalized_tpot.clone());
        r.register(
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model.",
            m.running_requests.clone(),
        );
        r.register(
            "inference_pool_average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool.",
            m.pool_avg_kv.clone(),
        );
        r.register(
            "inference_pool_average_queue_size",
            "The average number of requests pending in the model server queue.",
            m.pool_avg_queue.clone(),
        );
        r.register("inference_pool_average_running_requests", "The average number of requests currently being processed by model servers in the pool.", m.pool_avg_running.clone());
        r.register(
            "inference_pool_ready_pods",
            "The number of ready pods in the inference server pool.",
            m.pool_ready_pods.clone(),
        );
        r.register("inference_pool_per_pod_queue_size", "The total number of requests pending in the model server queue for each underlying pod.", m.per_pod_queue.clone());
        r.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds.",
            m.scheduler_e2e.clone(),
        );
        r.register(
            "inference_extension_scheduler_attempts",
            "Total number of scheduling attempts.",
            m.scheduler_attempts.clone(),
        );
        r.register(
            "inference_extension_request_path_overhead_seconds",
            "Time from the end of the request body to the EPP's answer, in seconds.",
            m.request_path_overhead.clone(),
        );
        r.register(
            "inference_extension_ext_proc_streams",
            "ext_proc streams handled, by outcome.",
            m.streams.clone(),
        );
        r.register(
            "inference_extension_ext_proc_active_streams",
            "ext_proc streams currently open.",
            m.active_streams.clone(),
        );
        r.register(
            "inference_extension_model_rewrite_decisions",
            "Model rewrite decisions.",
            m.rewrites.clone(),
        );
        let info: Family<InfoLabels, Gauge> = Family::default();
        info.get_or_create(&InfoLabels {
            commit: option_env!("SWITCHYARD_COMMIT")
                .unwrap_or("unknown")
                .to_owned(),
            build_ref: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
        r.register(
            "inference_extension_info",
            "General information of the current build of Inference Extension.",
            info,
        );
        Arc::new(m)
    }

    /// Refreshes the pool-level gauges from the datastore (called periodically).
    pub fn refresh_pool(
        &self,
        datastore: &Datastore,
        director: &Director,
        staleness: std::time::Duration,
    ) {
        let _ = director;
        let snap = datastore.snapshot();
        let pool = PoolLabels {
            name: snap.name.clone(),
        };
        let now = tokio::time::Instant::now();
        let fresh: Vec<_> = snap
            .endpoints
            .iter()
            .map(|e| (e, e.metrics()))
            .filter(|(_, m)| !m.is_stale(now, staleness))
            .collect();
        let n = fresh.len().max(1) as f64;
        self.pool_ready_pods
            .get_or_create(&pool)
            .set(fresh.len() as i64);
        self.pool_avg_kv
            .get_or_create(&pool)
            .set(fresh.iter().map(|(_, m)| m.kv_cache_usage).sum::<f64>() / n);
        self.pool_avg_queue.get_or_create(&pool).set(
            fresh
                .iter()
                .map(|(_, m)| m.waiting_queue_size as f64)
                .sum::<f64>()
                / n,
        );
        self.pool_avg_running.get_or_create(&pool).set(
            fresh
                .iter()
                .map(|(_, m)| m.running_requests as f64)
                .sum::<f64>()
                / n,
        );
        self.per_pod_queue.clear();
        for (e, m) in &fresh {
            self.per_pod_queue
                .get_or_create(&PodLabels {
                    name: snap.name.clone(),
                    model_server_pod: e.spec.name.clone(),
                })
                .set(m.waiting_queue_size as i64);
        }
    }
}
