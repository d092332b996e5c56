//! The EPP's Prometheus metrics, with the reference EPP's names, types and labels.
//!
//! One registry is built at start-up and every component gets a handle to [`EppMetrics`].
//! prometheus-client appends `_total` to counters, so counters are registered without it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use endpoint_picker::datastore::{Datastore, Endpoint, Readiness};
use endpoint_picker::director::Director;
use endpoint_picker::scheduling::{ExtensionPoint, PluginObserver};
use endpoint_picker::scrape::scraper::{ScrapeError, ScrapeObserver};
use endpoint_picker::tokens::{Outcome, TokenObserver};
use ext_proc::body_budget::BodyBudget;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::supervisor::TaskExitLabels;

pub mod canonical;

use canonical::CanonicalMetrics;

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

/// `status, target_model_name, pod_name, namespace, port` (the target is empty on failure).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success` or `failure`.
    pub status: String,
    /// Model served.
    pub target_model_name: String,
    /// Pod of the primary target.
    pub pod_name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its target port.
    pub port: String,
}

/// `outcome` of a response observer's stream (`ObserverOutcome::as_str`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObserverLabels {
    /// `ObserverOutcome::as_str`.
    pub outcome: &'static str,
}

/// `rewrite`: whether a model rewrite was due.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RewriteLabels {
    /// Whether a model rewrite was due on the response: "true" or "false".
    pub rewrite: &'static str,
}

/// `model_rewrite_name, model_name, target_model`: the reference's labels of
/// `inference_extension_model_rewrite_decisions_total`. The rewrite's name is an
/// `InferenceModelRewrite`'s (operator-written); the models go through the label budget.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RewriteDecisionLabels {
    /// The `InferenceModelRewrite` whose rule chose the target.
    pub model_rewrite_name: String,
    /// Model asked for.
    pub model_name: String,
    /// Model the rule chose.
    pub target_model: String,
}

/// `extension_point, plugin_type, plugin_name`. The first two are static strings, so recording
/// a plugin timing allocates only the name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// `Filter`, `Scorer`, `Picker`, `ProfilePicker`, `DataProducer` or `PreRequest`.
    pub extension_point: &'static str,
    /// Plugin type, e.g. `queue-scorer`.
    pub plugin_type: &'static str,
    /// Configured plugin name.
    pub plugin_name: String,
}

/// `name, model_server_pod, reason` of a failed scrape.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeErrorLabels {
    /// Pool name.
    pub name: String,
    /// Endpoint name.
    pub model_server_pod: String,
    /// `timeout`, `request`, `tls`, `status`, `body`, `utf8`, `url` or `unknown_engine` for a
    /// scrape; `readiness_check` for an engine readiness check that was refused (401, 403, 404,
    /// 405) or got no answer.
    pub reason: &'static str,
}

/// `outcome` of an ext_proc stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `ok`, `error` or `cancelled`.
    pub outcome: String,
}

fn histogram_family<L>(make: fn() -> Histogram) -> Family<L, Histogram, fn() -> Histogram>
where
    L: Clone + std::hash::Hash + Eq,
{
    Family::new_with_constructor(make)
}

// The families' constructors (a `Family` takes a constructor without captures).
fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS.iter().copied())
}
fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS.iter().copied())
}
fn response_size_histogram() -> Histogram {
    Histogram::new(response_size_buckets())
}
fn token_histogram() -> Histogram {
    Histogram::new(TOKEN_BUCKETS.iter().copied())
}
fn tpot_histogram() -> Histogram {
    Histogram::new(TPOT_BUCKETS.iter().copied())
}

/// Request durations: 5 ms … 1 h, as the reference.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
/// The reference's edges for `scheduler_e2e_duration_seconds` and `plugin_duration_seconds`,
/// which alerts written for it name (`le="0.001"`: scheduled within a millisecond).
const REFERENCE_LATENCY_EDGES: [f64; 10] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];

/// The reference's response-size edges that [`SIZE_BUCKETS`] lacks: 1 … 32 bytes (an error, an
/// empty answer) and its 32778 (sic), so that a query written on them finds a series.
const REFERENCE_RESPONSE_SIZE_EDGES: [f64; 5] = [1.0, 8.0, 16.0, 32.0, 32778.0];

/// `buckets` with the reference's `edges` added (ours are finer where they differ: decisions
/// of a few microseconds).
fn with_edges(buckets: impl Iterator<Item = f64>, edges: &[f64]) -> Vec<f64> {
    let mut all: Vec<f64> = buckets.chain(edges.iter().copied()).collect();
    all.sort_by(f64::total_cmp);
    // Equal within rounding: 0.00001 · 2^k never lands on a decimal edge, but keep one of two.
    all.dedup_by(|a, b| (*a - *b).abs() <= *b * 1e-9);
    all
}

/// Response sizes in bytes: [`SIZE_BUCKETS`] and the reference's own edges.
fn response_size_buckets() -> Vec<f64> {
    with_edges(SIZE_BUCKETS.iter().copied(), &REFERENCE_RESPONSE_SIZE_EDGES)
}

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

/// Every family the EPP registers, with its type, named as in the `# TYPE` line (counters
/// without `_total`). Dashboards and alerts are checked against this list; a unit test checks
/// the list against the registry. (prometheus-client leaves families without samples out of
/// the exposition, so a live scrape alone cannot list them.)
pub const FAMILIES: &[(&str, &str)] = &[
    ("inference_objective_request", "counter"),
    ("inference_objective_request_error", "counter"),
    ("inference_objective_request_duration_seconds", "histogram"),
    ("inference_objective_request_sizes", "histogram"),
    ("inference_objective_response_sizes", "histogram"),
    ("inference_objective_input_tokens", "histogram"),
    ("inference_objective_output_tokens", "histogram"),
    ("inference_objective_prompt_cached_tokens", "histogram"),
    (
        "inference_objective_normalized_time_per_output_token_seconds",
        "histogram",
    ),
    ("inference_objective_request_ttft_seconds", "histogram"),
    ("inference_objective_request_tpot_seconds", "histogram"),
    ("inference_objective_running_requests", "gauge"),
    ("inference_pool_average_kv_cache_utilization", "gauge"),
    ("inference_pool_average_queue_size", "gauge"),
    ("inference_pool_average_running_requests", "gauge"),
    ("inference_pool_ready_pods", "gauge"),
    ("inference_pool_per_pod_queue_size", "gauge"),
    ("inference_pool_per_pod_kv_cache_utilization", "gauge"),
    ("inference_extension_info", "gauge"),
    (
        "inference_extension_scheduler_e2e_duration_seconds",
        "histogram",
    ),
    ("inference_extension_scheduler_attempts", "counter"),
    ("inference_extension_plugin_duration_seconds", "histogram"),
    ("inference_extension_prefix_indexer_size", "gauge"),
    ("inference_extension_prefix_indexer_hit_ratio", "histogram"),
    ("inference_extension_prefix_indexer_hit_bytes", "histogram"),
    ("inference_extension_model_rewrite_decisions", "counter"),
    (
        "inference_extension_request_path_overhead_seconds",
        "histogram",
    ),
    ("inference_extension_ext_proc_streams", "counter"),
    ("inference_extension_ext_proc_active_streams", "gauge"),
    ("inference_extension_request_body_bytes_held", "gauge"),
    ("inference_extension_request_body_bytes_reserved", "gauge"),
    (
        "inference_extension_request_body_budget_rejections",
        "counter",
    ),
    ("inference_extension_response_body_overflows", "counter"),
    ("inference_extension_response_observer_streams", "counter"),
    ("inference_extension_response_body_bytes_held", "gauge"),
    (
        "inference_extension_model_server_metrics_age_seconds",
        "gauge",
    ),
    ("inference_extension_model_server_scrape_errors", "counter"),
    (
        "inference_extension_model_server_scrape_duration_seconds",
        "histogram",
    ),
    ("inference_extension_task_exits", "counter"),
    ("switchyard_kubernetes_watch_errors", "counter"),
    ("switchyard_kubernetes_watch_failing", "gauge"),
    (
        "switchyard_kubernetes_watch_last_success_timestamp_seconds",
        "gauge",
    ),
    // The KV-event subscribers' (`kv_events::FAMILIES`).
    ("inference_extension_kv_events_received", "counter"),
    ("inference_extension_kv_events_applied", "counter"),
    ("inference_extension_kv_events_dropped", "counter"),
    ("inference_extension_kv_events_lag_seconds", "gauge"),
    ("inference_extension_kv_index_blocks", "gauge"),
    ("inference_extension_kv_index_entries", "gauge"),
    ("inference_extension_speculation_peer_messages", "counter"),
    ("inference_extension_speculation_peers_followed", "gauge"),
    ("inference_extension_kv_events_transport", "counter"),
    ("inference_extension_token_producer_requests", "counter"),
    (
        "inference_extension_token_producer_duration_seconds",
        "histogram",
    ),
    (
        "inference_extension_token_producer_overrun_seconds",
        "counter",
    ),
    (
        "inference_extension_token_producer_prefix_cache_bytes",
        "counter",
    ),
    (
        "inference_extension_token_producer_prefix_cache_held_bytes",
        "gauge",
    ),
    // The reference's canonical names (`canonical`).
    ("llm_d_epp_request", "counter"),
    ("llm_d_epp_request_error", "counter"),
    ("llm_d_epp_request_duration_seconds", "histogram"),
    ("llm_d_epp_request_size_bytes", "histogram"),
    ("llm_d_epp_response_size_bytes", "histogram"),
    ("llm_d_epp_request_input_tokens", "histogram"),
    ("llm_d_epp_request_output_tokens", "histogram"),
    ("llm_d_epp_request_cached_tokens", "histogram"),
    ("llm_d_epp_request_running", "gauge"),
    ("llm_d_epp_request_ntpot_seconds", "histogram"),
    ("llm_d_epp_request_ttft_seconds", "histogram"),
    ("llm_d_epp_request_streaming_tpot_seconds", "histogram"),
    ("llm_d_epp_average_kv_cache_utilization", "gauge"),
    ("llm_d_epp_average_queue_size", "gauge"),
    ("llm_d_epp_average_running_requests", "gauge"),
    ("llm_d_epp_std_dev_kv_cache_utilization", "gauge"),
    ("llm_d_epp_std_dev_queue_size", "gauge"),
    ("llm_d_epp_std_dev_running_requests", "gauge"),
    ("llm_d_epp_ready_endpoints", "gauge"),
    ("llm_d_epp_per_endpoint_queue_size", "gauge"),
    ("llm_d_epp_scheduler_e2e_duration_seconds", "histogram"),
    ("llm_d_epp_scheduler_attempts", "counter"),
    ("llm_d_epp_plugin_duration_seconds", "histogram"),
    ("llm_d_epp_info", "gauge"),
    ("llm_d_epp_model_rewrite_decisions", "counter"),
    ("llm_d_epp_datalayer_poll_errors", "counter"),
    ("llm_d_epp_extproc_streams_inflight", "gauge"),
];

/// `outcome` of a byte of text the token producer tokenised: `reused` (its ids came from the
/// prefix cache) or `encoded`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrefixCacheLabels {
    outcome: &'static str,
}

/// Reads the tokenizer's prefix-cache counters at each scrape (zero before a tokenizer with a
/// cache is built, and without one).
#[derive(Debug)]
struct PrefixCacheCollector(Arc<std::sync::OnceLock<Arc<tokenize::Tokenizer>>>);

impl prometheus_client::collector::Collector for PrefixCacheCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let stats = self
            .0
            .get()
            .and_then(|t| t.prefix_cache_stats())
            .unwrap_or_default();
        let mut family = encoder.encode_descriptor(
            "inference_extension_token_producer_prefix_cache_bytes",
            "Bytes of prompt text the token producer tokenised, by whether their ids came from its prefix cache (reused) or were encoded",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in [
            ("reused", stats.reused_bytes),
            ("encoded", stats.encoded_bytes),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&PrefixCacheLabels { outcome })?)?;
        }
        let held = encoder.encode_descriptor(
            "inference_extension_token_producer_prefix_cache_held_bytes",
            "Bytes the token producer's prefix cache holds (ids and entry overhead; at most local.prefixCacheBytes)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(stats.held_bytes).unwrap_or(i64::MAX)).encode(held)?;
        Ok(())
    }
}

/// `resource` of a Kubernetes watch (`inferencepools`, `pods`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    resource: &'static str,
}

/// The Kubernetes watches, by resource, once they are built ([`EppMetrics::kubernetes_watches`]).
pub type WatchHealths = Arc<parking_lot::Mutex<Vec<(&'static str, Arc<k8s::watch::WatchHealth>)>>>;

/// Reads the Kubernetes watches' health at each scrape; nothing without them (file mode).
#[derive(Debug)]
struct WatchCollector(WatchHealths);

impl prometheus_client::collector::Collector for WatchCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let watches = self.0.lock().clone();
        if watches.is_empty() {
            return Ok(());
        }
        let mut errors = encoder.encode_descriptor(
            "switchyard_kubernetes_watch_errors",
            "Failures of a Kubernetes watch (listing or watching), each retried with backoff: while they go on, that resource's objects stay as last seen",
            None,
            MetricType::Counter,
        )?;
        for (resource, health) in &watches {
            ConstCounter::new(health.errors())
                .encode(errors.encode_family(&WatchLabels { resource })?)?;
        }
        let mut failing = encoder.encode_descriptor(
            "switchyard_kubernetes_watch_failing",
            "1 while a Kubernetes watch has failed without a complete listing or event since: that resource's objects stay as last seen (alert when it stays 1)",
            None,
            MetricType::Gauge,
        )?;
        for (resource, health) in &watches {
            ConstGauge::new(i64::from(health.failing()))
                .encode(failing.encode_family(&WatchLabels { resource })?)?;
        }
        let mut success = encoder.encode_descriptor(
            "switchyard_kubernetes_watch_last_success_timestamp_seconds",
            "Unix time of a Kubernetes watch's last complete listing or event (absent before one): alert when it falls far behind while its errors rise",
            None,
            MetricType::Gauge,
        )?;
        for (resource, health) in &watches {
            if let Some(at) = health.last_success_unix_seconds() {
                ConstGauge::new(at).encode(success.encode_family(&WatchLabels { resource })?)?;
            }
        }
        Ok(())
    }
}

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
    /// `inference_extension_request_body_bytes_held`: request-body bytes charged to
    /// `--max-gathered-request-bytes` (refreshed on scrape).
    pub request_body_bytes_held: Gauge,
    /// `inference_extension_request_body_bytes_reserved`: buffer capacity reserved from
    /// declared lengths, apart from the bytes held (at most a quarter of
    /// `--max-gathered-request-bytes`; refreshed on scrape).
    pub request_body_bytes_reserved: Gauge,
    /// `inference_extension_request_body_budget_rejections_total`: requests refused because
    /// their body would pass `--max-gathered-request-bytes`.
    pub request_body_budget_rejections: Counter,
    /// `inference_extension_response_body_overflows_total{rewrite}`: non-streamed response
    /// bodies whose `usage` value would have passed what all streams may hold together (usage
    /// unknown; a rewrite back was done all the same).
    pub response_body_overflows: Family<RewriteLabels, Counter>,
    /// `inference_extension_response_observer_streams_total{outcome}`: streams of a response
    /// observer (`--response-observer`) by how they found their request
    /// (`ObserverOutcome::as_str`).
    pub observer_streams: Family<ObserverLabels, Counter>,
    /// `inference_extension_response_body_bytes_held`: non-streamed response bytes held by all
    /// streams together (refreshed on scrape).
    pub response_body_bytes_held: Gauge,
    /// `inference_extension_model_rewrite_decisions_total`: requests whose target an
    /// `InferenceModelRewrite` rule chose.
    pub rewrites: Family<RewriteDecisionLabels, Counter>,
    /// `inference_extension_plugin_duration_seconds`.
    pub plugin_duration: Family<PluginLabels, Histogram, fn() -> Histogram>,
    /// The KV-event subscribers' metrics.
    pub kv_events: Arc<crate::kv_events::KvEventMetrics>,
    /// `inference_extension_prefix_indexer_size` (block entries held, refreshed on scrape).
    pub prefix_indexer_size: Gauge,
    /// `inference_extension_prefix_indexer_hit_ratio`.
    pub prefix_hit_ratio: Histogram,
    /// `inference_extension_prefix_indexer_hit_bytes`.
    pub prefix_hit_bytes: Histogram,
    /// `inference_objective_request_ttft_seconds` (streamed responses: first body chunk).
    pub ttft: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_objective_request_tpot_seconds` (streamed responses: after the first chunk).
    pub tpot: Family<ModelLabels, Histogram, fn() -> Histogram>,
    /// `inference_pool_per_pod_kv_cache_utilization` (ours, next to the per-pod queue size).
    pub per_pod_kv: Family<PodLabels, Gauge<f64, AtomicU64>>,
    /// `inference_extension_model_server_metrics_age_seconds`: age of each endpoint's metrics.
    pub scrape_age: Family<PodLabels, Gauge<f64, AtomicU64>>,
    /// `inference_extension_model_server_scrape_errors_total`.
    pub scrape_errors: Family<ScrapeErrorLabels, Counter>,
    /// `inference_extension_model_server_scrape_duration_seconds`.
    pub scrape_duration: Histogram,
    /// `inference_extension_task_exits_total`: supervised tasks that ended unexpectedly.
    pub task_exits: Family<TaskExitLabels, Counter>,
    /// `inference_extension_token_producer_requests_total{outcome}`: tokenizations by
    /// outcome; every outcome but `tokenized` routed without token ids.
    pub token_outcomes: Family<TokenOutcomeLabels, Counter>,
    /// `inference_extension_token_producer_duration_seconds`: queue wait plus tokenization.
    pub token_duration: Histogram,
    /// `inference_extension_token_producer_overrun_seconds_total`: tokenizing that ran past its
    /// caller's deadline (a worker busy for no one).
    pub token_overrun: Counter<f64, std::sync::atomic::AtomicU64>,
    /// The token producer's tokenizer, once built, for its prefix cache's counters
    /// (`inference_extension_token_producer_prefix_cache_*`, read at each scrape).
    pub token_prefix_cache: Arc<std::sync::OnceLock<Arc<tokenize::Tokenizer>>>,
    /// `switchyard_kubernetes_watch_errors_total{resource}` and
    /// `switchyard_kubernetes_watch_last_success_timestamp_seconds{resource}`: the Kubernetes
    /// watches, added when they are built (none in file mode).
    pub kubernetes_watches: WatchHealths,
    /// The reference's canonical families that are not the same series as one above.
    pub canonical: CanonicalMetrics,
    /// Pool name for the scrape error labels (set by the first pool refresh).
    pool_name: parking_lot::RwLock<String>,
    /// The (pool, pod, reason) label sets of the `scrape_errors` series, so that a departed
    /// pod's series go with it (a counter family cannot list its own labels). At most the
    /// pool's size times the reasons.
    scrape_error_pods:
        parking_lot::Mutex<std::collections::BTreeSet<(String, String, &'static str)>>,
    /// The `scheduler_attempts` label sets naming a pod, so that a departed pod's series go
    /// with it: a rollout or a scale-down names new pods, and without this every pod the EPP
    /// ever routed to kept its series for the life of the process. Held (read) across the
    /// increment of a known set and (write) across the creation of a new one, so a removal
    /// in `refresh_pool` never races a creation. At most pods × served models × ports.
    /// Each set's canonical twin is kept beside it, so that counting an attempt under the
    /// canonical labels allocates nothing once the set exists.
    attempt_series: parking_lot::RwLock<HashMap<AttemptLabels, Counter>>,
    /// `plugin_duration` handles by (extension point, plugin type), then plugin name: once a
    /// plugin has been seen, timing it on the request path allocates nothing.
    plugin_cache: PluginCache,
}

type PluginCache =
    parking_lot::RwLock<HashMap<(ExtensionPoint, &'static str), HashMap<String, Histogram>>>;

impl EppMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = EppMetrics {
            requests: Family::default(),
            request_errors: Family::default(),
            request_duration: histogram_family(duration_histogram),
            request_sizes: histogram_family(size_histogram),
            response_sizes: histogram_family(response_size_histogram),
            input_tokens: histogram_family(token_histogram),
            output_tokens: histogram_family(token_histogram),
            cached_tokens: histogram_family(token_histogram),
            normalized_tpot: histogram_family(tpot_histogram),
            running_requests: Family::default(),
            pool_avg_kv: Family::default(),
            pool_avg_queue: Family::default(),
            pool_avg_running: Family::default(),
            pool_ready_pods: Family::default(),
            per_pod_queue: Family::default(),
            scheduler_e2e: Histogram::new(with_edges(
                exponential_buckets(0.00001, 2.0, 20),
                &REFERENCE_LATENCY_EDGES,
            )),
            scheduler_attempts: Family::default(),
            request_path_overhead: Histogram::new(exponential_buckets(0.00001, 2.0, 20)),
            streams: Family::default(),
            active_streams: Gauge::default(),
            request_body_bytes_held: Gauge::default(),
            request_body_bytes_reserved: Gauge::default(),
            request_body_budget_rejections: Counter::default(),
            response_body_overflows: Family::default(),
            observer_streams: Family::default(),
            response_body_bytes_held: Gauge::default(),
            rewrites: Family::default(),
            plugin_duration: Family::new_with_constructor(|| {
                Histogram::new(with_edges(
                    exponential_buckets(0.000_001, 2.0, 20),
                    &REFERENCE_LATENCY_EDGES,
                ))
            }),
            kv_events: Arc::default(),
            prefix_indexer_size: Gauge::default(),
            prefix_hit_ratio: Histogram::new((0..=10).map(|i| f64::from(i) / 10.0)),
            prefix_hit_bytes: Histogram::new(
                std::iter::once(0.0).chain((4..=16).map(|p| f64::from(1u32 << p))),
            ),
            ttft: histogram_family(duration_histogram),
            tpot: histogram_family(tpot_histogram),
            per_pod_kv: Family::default(),
            scrape_age: Family::default(),
            scrape_errors: Family::default(),
            scrape_duration: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            task_exits: Family::default(),
            token_outcomes: Family::default(),
            token_duration: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            token_overrun: Counter::default(),
            token_prefix_cache: Arc::default(),
            kubernetes_watches: Arc::default(),
            canonical: CanonicalMetrics::new(),
            pool_name: parking_lot::RwLock::new(String::new()),
            scrape_error_pods: parking_lot::Mutex::default(),
            attempt_series: parking_lot::RwLock::default(),
            plugin_cache: PluginCache::default(),
        };
        // prometheus-client appends the final period of each help text itself.
        let r = registry;
        r.register(
            "inference_objective_request",
            "Counter of inference objective requests broken out for each model and target model",
            m.requests.clone(),
        );
        r.register("inference_objective_request_error", "Counter of inference objective requests errors broken out for each model and target model", m.request_errors.clone());
        r.register("inference_objective_request_duration_seconds", "Inference objective response latency distribution in seconds for each model and target model", m.request_duration.clone());
        r.register("inference_objective_request_sizes", "Inference objective requests size distribution in bytes for each model and target model", m.request_sizes.clone());
        r.register("inference_objective_response_sizes", "Inference objective responses size distribution in bytes for each model and target model", m.response_sizes.clone());
        r.register(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model",
            m.input_tokens.clone(),
        );
        r.register(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model",
            m.output_tokens.clone(),
        );
        r.register(
            "inference_objective_prompt_cached_tokens",
            "Inference objective prompt cached token count distribution for requests in each model",
            m.cached_tokens.clone(),
        );
        r.register("inference_objective_normalized_time_per_output_token_seconds", "Inference objective latency divided by number of output tokens in seconds for each model and target model", m.normalized_tpot.clone());
        r.register(
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model",
            m.running_requests.clone(),
        );
        r.register(
            "inference_pool_average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool",
            m.pool_avg_kv.clone(),
        );
        r.register(
            "inference_pool_average_queue_size",
            "The average number of requests pending in the model server queue",
            m.pool_avg_queue.clone(),
        );
        r.register(
            "inference_pool_average_running_requests",
            "The average number of requests currently being processed by model servers in the pool",
            m.pool_avg_running.clone(),
        );
        r.register(
            "inference_pool_ready_pods",
            "The number of ready pods in the inference server pool",
            m.pool_ready_pods.clone(),
        );
        r.register("inference_pool_per_pod_queue_size", "The total number of requests pending in the model server queue for each underlying pod", m.per_pod_queue.clone());
        r.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds",
            m.scheduler_e2e.clone(),
        );
        r.register(
            "inference_extension_scheduler_attempts",
            "Total number of scheduling attempts",
            m.scheduler_attempts.clone(),
        );
        r.register(
            "inference_extension_request_path_overhead_seconds",
            "Time from the end of the request body to the EPP's answer, in seconds",
            m.request_path_overhead.clone(),
        );
        r.register(
            "inference_extension_ext_proc_streams",
            "ext_proc streams handled, by outcome",
            m.streams.clone(),
        );
        r.register(
            "inference_extension_ext_proc_active_streams",
            "ext_proc streams currently open",
            m.active_streams.clone(),
        );
        r.register(
            "inference_extension_model_rewrite_decisions",
            "Model rewrite decisions",
            m.rewrites.clone(),
        );
        r.register(
            "inference_extension_plugin_duration_seconds",
            "Plugin processing latency distribution in seconds for each extension point, plugin type and plugin name",
            m.plugin_duration.clone(),
        );
        m.kv_events.register(r);
        r.register(
            "inference_extension_request_body_bytes_held",
            "Request-body bytes held by all ext_proc streams together while gathered, tokenized and sent back (capped by --max-gathered-request-bytes)",
            m.request_body_bytes_held.clone(),
        );
        r.register(
            "inference_extension_request_body_bytes_reserved",
            "Buffer capacity reserved from declared content-lengths, apart from the bytes held (at most a quarter of --max-gathered-request-bytes)",
            m.request_body_bytes_reserved.clone(),
        );
        r.register(
            "inference_extension_response_body_bytes_held",
            "Response bytes held by all ext_proc streams together (usage values and unfinished SSE lines read for usage, a chunk's end held for a model rewrite; capped at 256 MiB)",
            m.response_body_bytes_held.clone(),
        );
        r.register(
            "inference_extension_response_body_overflows",
            "Non-streamed response bodies whose usage value would pass what all streams may hold together: passed through as they came, usage unknown",
            m.response_body_overflows.clone(),
        );
        r.register(
            "inference_extension_response_observer_streams",
            "Streams of a response observer (an ext_proc filter in observability mode, --response-observer), by how they found their request: matched (claimed while routed here), released (routed here, already released), other_epp (routed by another EPP; recorded from its tag), no_tag (a local reply, a refused or unrouted request, or a filter pair that does not pass the namespace: not recorded), invalid (a tag no EPP wrote)",
            m.observer_streams.clone(),
        );
        r.register(
            "inference_extension_request_body_budget_rejections",
            "Requests refused with 429 because their body would pass --max-gathered-request-bytes",
            m.request_body_budget_rejections.clone(),
        );
        r.register(
            "inference_extension_prefix_indexer_size",
            "Size of the prefix indexer (block entries held, summed over endpoints)",
            m.prefix_indexer_size.clone(),
        );
        r.register(
            "inference_extension_prefix_indexer_hit_ratio",
            "Ratio of prefix length matched to total prefix length in the cache lookup",
            m.prefix_hit_ratio.clone(),
        );
        r.register(
            "inference_extension_prefix_indexer_hit_bytes",
            "Length of the prefix match in number of bytes in the cache lookup",
            m.prefix_hit_bytes.clone(),
        );
        r.register(
            "inference_objective_request_ttft_seconds",
            "Inference objective time to first token (first streamed response chunk) in seconds",
            m.ttft.clone(),
        );
        r.register(
            "inference_objective_request_tpot_seconds",
            "Inference objective time per output token after the first, in seconds (streamed responses)",
            m.tpot.clone(),
        );
        r.register(
            "inference_pool_per_pod_kv_cache_utilization",
            "The KV-cache utilization of each pod of the pool, in [0, 1]",
            m.per_pod_kv.clone(),
        );
        r.register(
            "inference_extension_model_server_metrics_age_seconds",
            "Age of the latest successful metrics scrape of each pod, in seconds",
            m.scrape_age.clone(),
        );
        r.register(
            "inference_extension_model_server_scrape_errors",
            "Failed metrics scrapes of the model servers, by pod and reason",
            m.scrape_errors.clone(),
        );
        r.register(
            "inference_extension_model_server_scrape_duration_seconds",
            "Duration of model-server metrics scrapes in seconds",
            m.scrape_duration.clone(),
        );
        r.register(
            "inference_extension_task_exits",
            "Long-lived tasks of the EPP that ended unexpectedly (and were restarted, or took readiness or the process down), by task and reason",
            m.task_exits.clone(),
        );
        r.register(
            "inference_extension_token_producer_requests",
            "Token producer runs by outcome; all but tokenized routed without token ids",
            m.token_outcomes.clone(),
        );
        r.register(
            "inference_extension_token_producer_duration_seconds",
            "Time from the end of the request body to its token ids (queue wait included)",
            m.token_duration.clone(),
        );
        r.register(
            "inference_extension_token_producer_overrun_seconds",
            "Tokenizing that ran past its request's deadline, holding a worker no request waited for",
            m.token_overrun.clone(),
        );
        r.register_collector(Box::new(PrefixCacheCollector(m.token_prefix_cache.clone())));
        r.register_collector(Box::new(WatchCollector(m.kubernetes_watches.clone())));
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
            "General information of the current build of Inference Extension",
            info.clone(),
        );
        m.canonical.register(r);
        canonical::register_twins(&m, &info, r);
        Arc::new(m)
    }

    /// Counts one scheduling attempt. A set naming a pod is remembered, so that it goes with
    /// the pod (`refresh_pool`).
    pub fn count_attempt(&self, attempt: &AttemptLabels) {
        let canonical = || {
            self.canonical
                .attempts
                .get_or_create_owned(&canonical::AttemptLabels::from(attempt))
        };
        if attempt.pod_name.is_empty() {
            self.scheduler_attempts.get_or_create(attempt).inc();
            canonical().inc();
            return;
        }
        {
            let known = self.attempt_series.read();
            if let Some(twin) = known.get(attempt) {
                self.scheduler_attempts.get_or_create(attempt).inc();
                twin.inc();
                return;
            }
        }
        let mut known = self.attempt_series.write();
        self.scheduler_attempts.get_or_create(attempt).inc();
        let twin = canonical();
        twin.inc();
        known.insert(attempt.clone(), twin);
    }

    /// Refreshes the gauges of request- and response-body bytes held.
    pub fn refresh_held_bodies(&self, requests: &BodyBudget, responses: &BodyBudget) {
        let bytes = |b: &BodyBudget| i64::try_from(b.held()).unwrap_or(i64::MAX);
        self.request_body_bytes_held.set(bytes(requests));
        self.request_body_bytes_reserved
            .set(i64::try_from(requests.reserved()).unwrap_or(i64::MAX));
        self.response_body_bytes_held.set(bytes(responses));
    }

    /// Refreshes the gauges computed from current state: pool averages over endpoints with
    /// fresh metrics, per-pod queue and KV, the age of every endpoint's metrics, and the prefix
    /// index size. Called on every `/metrics` request and periodically.
    pub fn refresh_pool(&self, datastore: &Datastore, director: &Director, staleness: Duration) {
        let snap = datastore.snapshot();
        if *self.pool_name.read() != snap.name {
            *self.pool_name.write() = snap.name.clone();
        }
        let pool = PoolLabels {
            name: snap.name.clone(),
        };
        let now = tokio::time::Instant::now();
        let all: Vec<_> = snap.endpoints.iter().map(|e| (e, e.metrics())).collect();
        // Ready: fresh metrics from an engine that has not said it is loading or stopped
        // answering.
        let fresh: Vec<_> = all
            .iter()
            .filter(|(_, m)| {
                !m.is_stale(now, staleness)
                    && !matches!(m.readiness, Readiness::Loading | Readiness::Unreachable)
            })
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
        let c = &self.canonical;
        c.std_dev_kv.get_or_create(&pool).set(canonical::std_dev(
            fresh.iter().map(|(_, m)| m.kv_cache_usage),
        ));
        c.std_dev_queue.get_or_create(&pool).set(canonical::std_dev(
            fresh.iter().map(|(_, m)| m.waiting_queue_size as f64),
        ));
        c.std_dev_running
            .get_or_create(&pool)
            .set(canonical::std_dev(
                fresh.iter().map(|(_, m)| m.running_requests as f64),
            ));
        // Departed pods must disappear from the per-pod families.
        self.per_pod_queue.clear();
        self.per_pod_kv.clear();
        self.scrape_age.clear();
        c.per_endpoint_queue.clear();
        for (e, m) in &all {
            let labels = PodLabels {
                name: snap.name.clone(),
                model_server_pod: e.spec.name.clone(),
            };
            if let Some(at) = m.updated_at {
                self.scrape_age
                    .get_or_create(&labels)
                    .set(now.saturating_duration_since(at).as_secs_f64());
            }
            if !m.is_stale(now, staleness) {
                let queue = i64::try_from(m.waiting_queue_size).unwrap_or(i64::MAX);
                c.per_endpoint_queue
                    .get_or_create(&canonical::EndpointLabels {
                        name: labels.name.clone(),
                        model_server_endpoint: labels.model_server_pod.clone(),
                    })
                    .set(queue);
                self.per_pod_queue.get_or_create(&labels).set(queue);
                self.per_pod_kv.get_or_create(&labels).set(m.kv_cache_usage);
            }
        }
        // Every series counted is remembered with its reason, so that each goes with its pod.
        self.scrape_error_pods.lock().retain(|(pool, pod, reason)| {
            let live = *pool == snap.name && snap.endpoints.iter().any(|e| e.spec.name == *pod);
            if !live {
                self.scrape_errors.remove(&ScrapeErrorLabels {
                    name: pool.clone(),
                    model_server_pod: pod.clone(),
                    reason,
                });
            }
            live
        });
        // Found under the read lock, which routing shares; the write lock only to remove.
        let live: HashSet<(&str, &str)> = snap
            .endpoints
            .iter()
            .map(|e| (e.spec.pod_name.as_str(), e.spec.namespace.as_str()))
            .collect();
        let departed: Vec<AttemptLabels> = self
            .attempt_series
            .read()
            .keys()
            .filter(|a| !live.contains(&(a.pod_name.as_str(), a.namespace.as_str())))
            .cloned()
            .collect();
        if !departed.is_empty() {
            let mut known = self.attempt_series.write();
            for a in &departed {
                known.remove(a);
                self.scheduler_attempts.remove(a);
                self.canonical
                    .attempts
                    .remove(&canonical::AttemptLabels::from(a));
            }
        }
        let entries: usize = director
            .config()
            .scheduler
            .producers()
            .iter()
            .filter_map(|p| p.index_entries())
            .sum();
        self.prefix_indexer_size.set(entries as i64);
    }
}

/// `outcome` of a token producer run: `tokenized`, `too_large`, `unsupported`, `failed`,
/// `queue_full`, `timed_out`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenOutcomeLabels {
    /// The outcome.
    pub outcome: &'static str,
}

impl TokenObserver for MetricsObserver {
    fn tokenized(&self, outcome: Outcome, took: Duration) {
        self.0
            .token_outcomes
            .get_or_create(&TokenOutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        self.0.token_duration.observe(took.as_secs_f64());
    }

    fn overran(&self, by: Duration) {
        self.0.token_overrun.inc_by(by.as_secs_f64());
    }
}

/// Feeds scheduler and scraper events into [`EppMetrics`].
#[derive(Debug, Clone)]
pub struct MetricsObserver(pub Arc<EppMetrics>);

impl PluginObserver for MetricsObserver {
    fn plugin_ran(
        &self,
        point: ExtensionPoint,
        plugin_type: &'static str,
        plugin_name: &str,
        took: Duration,
    ) {
        let m = &self.0;
        let seconds = took.as_secs_f64();
        if let Some(h) = m
            .plugin_cache
            .read()
            .get(&(point, plugin_type))
            .and_then(|by_name| by_name.get(plugin_name))
        {
            h.observe(seconds);
            return;
        }
        let h = m
            .plugin_duration
            .get_or_create(&PluginLabels {
                extension_point: point.as_str(),
                plugin_type,
                plugin_name: plugin_name.to_owned(),
            })
            .clone();
        h.observe(seconds);
        m.plugin_cache
            .write()
            .entry((point, plugin_type))
            .or_default()
            .insert(plugin_name.to_owned(), h);
    }

    fn prefix_matched(&self, matched_blocks: usize, total_blocks: usize, matched_bytes: usize) {
        // A prompt too short for one block is not a lookup (the reference records none either).
        if total_blocks == 0 {
            return;
        }
        self.0
            .prefix_hit_ratio
            .observe(matched_blocks as f64 / total_blocks as f64);
        self.0.prefix_hit_bytes.observe(matched_bytes as f64);
    }
}

impl MetricsObserver {
    /// One more `scrape_errors` for the pod, its series remembered so that it goes with the pod.
    fn count_scrape_error(&self, endpoint: &Endpoint, reason: &'static str) {
        let (pool, pod) = (self.0.pool_name.read().clone(), endpoint.spec.name.clone());
        self.0
            .scrape_errors
            .get_or_create(&ScrapeErrorLabels {
                name: pool.clone(),
                model_server_pod: pod.clone(),
                reason,
            })
            .inc();
        self.0.scrape_error_pods.lock().insert((pool, pod, reason));
        self.0
            .canonical
            .poll_errors
            .get_or_create(&canonical::SourceLabels {
                source_type: canonical::METRICS_SOURCE_TYPE,
            })
            .inc();
    }
}

impl ScrapeObserver for MetricsObserver {
    fn scrape_task_died(&self, _endpoint: &Endpoint) {
        self.0
            .task_exits
            .get_or_create(&TaskExitLabels {
                task: "endpoint-scraper".into(),
                reason: "panicked",
            })
            .inc();
    }

    fn readiness_check_failed(&self, endpoint: &Endpoint, _error: &ScrapeError) {
        self.count_scrape_error(endpoint, "readiness_check");
    }

    fn scraped(&self, endpoint: &Endpoint, result: Result<(), &ScrapeError>, took: Duration) {
        self.0.scrape_duration.observe(took.as_secs_f64());
        if let Err(e) = result {
            let reason = match e {
                ScrapeError::Timeout(_) => "timeout",
                ScrapeError::Request(_) => "request",
                ScrapeError::Tls(_) => "tls",
                ScrapeError::Status(_) => "status",
                ScrapeError::Body(_) | ScrapeError::TooLarge(_) => "body",
                ScrapeError::Utf8 => "utf8",
                ScrapeError::Url(_) => "url",
                ScrapeError::UnknownEngine(_) => "unknown_engine",
            };
            self.count_scrape_error(endpoint, reason);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A departed pod's scrape-error series go with it; a live pod's stay, and keep counting.
    #[test]
    fn series_of_departed_pods_are_removed() {
        let mut registry = Registry::default();
        let m = EppMetrics::register(&mut registry);
        let datastore = Arc::new(Datastore::new());
        let snap = datastore.apply(endpoint_picker::datastore::test_util::pool(2));
        let director = Director::new(
            datastore.clone(),
            Arc::new(endpoint_picker::config::load_default(1).unwrap()),
            1,
        );
        m.refresh_pool(&datastore, &director, Duration::from_secs(1));
        let observer = MetricsObserver(m.clone());
        let attempt = |pod: &str, target: &str| AttemptLabels {
            status: if pod.is_empty() { "failure" } else { "success" }.into(),
            target_model_name: target.into(),
            pod_name: pod.into(),
            namespace: if pod.is_empty() { "" } else { "default" }.into(),
            port: if pod.is_empty() { "" } else { "8000" }.into(),
        };
        for e in &snap.endpoints {
            observer.scraped(e, Err(&ScrapeError::Utf8), Duration::ZERO);
            observer.readiness_check_failed(e, &ScrapeError::Utf8);
            for target in ["a", "b"] {
                m.count_attempt(&attempt(&e.spec.pod_name, target));
            }
        }
        m.count_attempt(&attempt("", "a"));
        let text = || {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        // (scrape-error series, attempt series) naming `pod`.
        let series = |text: &str, pod: &str| {
            let count = |family: &str, label: &str| {
                text.lines()
                    .filter(|l| l.starts_with(family))
                    .filter(|l| l.contains(&format!("{label}=\"{pod}\"")))
                    .count()
            };
            (
                count(
                    "inference_extension_model_server_scrape_errors_total{",
                    "model_server_pod",
                ),
                count("inference_extension_scheduler_attempts_total{", "pod_name"),
            )
        };
        let before = text();
        // `utf8` and `readiness_check` each.
        assert_eq!(series(&before, "pod-1-rank-0").0, 2);
        assert_eq!(series(&before, "pod-2-rank-0").0, 2);
        assert_eq!(series(&before, "pod-1").1, 2);
        assert_eq!(series(&before, "pod-2").1, 2);
        assert_eq!(series(&before, "").1, 1, "the failure without a pod");
        let mut next = endpoint_picker::datastore::test_util::pool(2);
        next.endpoints.remove(0);
        datastore.apply(next);
        m.refresh_pool(&datastore, &director, Duration::from_secs(1));
        // The live pod's attempts still count after the refresh.
        m.count_attempt(&attempt("pod-2", "a"));
        let after = text();
        assert_eq!(series(&after, "pod-1-rank-0").0, 0);
        assert_eq!(series(&after, "pod-2-rank-0").0, 2);
        assert_eq!(series(&after, "pod-1").1, 0);
        assert_eq!(series(&after, "pod-2").1, 2);
        assert_eq!(series(&after, "").1, 1);
        assert!(after.contains(
            "inference_extension_scheduler_attempts_total{status=\"success\",target_model_name=\"a\",pod_name=\"pod-2\",namespace=\"default\",port=\"8000\"} 2"
        ));
    }

    /// Every edge of the reference's buckets is an `le` of ours, so that alerts written on one
    /// find a series: scheduling and plugin latencies, response sizes.
    #[test]
    fn the_reference_bucket_edges_are_ours_too() {
        let mut registry = Registry::default();
        let m = EppMetrics::register(&mut registry);
        m.scheduler_e2e.observe(0.000_05);
        m.plugin_duration
            .get_or_create(&PluginLabels {
                extension_point: "Scorer",
                plugin_type: "queue-scorer",
                plugin_name: "q".into(),
            })
            .observe(0.000_05);
        let model = ModelLabels {
            model_name: "m".into(),
            target_model_name: "m".into(),
        };
        m.response_sizes.get_or_create(&model).observe(10.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let edges = |family: &str| -> Vec<f64> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{family}_bucket{{")))
                .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
                .collect()
        };
        for family in [
            "inference_extension_scheduler_e2e_duration_seconds",
            "inference_extension_plugin_duration_seconds",
        ] {
            let ours = edges(family);
            for edge in REFERENCE_LATENCY_EDGES {
                assert!(ours.contains(&edge), "{family}: {edge} not in {ours:?}");
            }
        }
        let ours = edges("inference_objective_response_sizes");
        for edge in [1.0, 8.0, 16.0, 32.0, 64.0, 1024.0, 65536.0] {
            assert!(
                ours.contains(&edge),
                "response sizes: {edge} not in {ours:?}"
            );
        }
    }

    /// Each model family has its own buckets. They were once picked by a `const`'s address,
    /// and each use of a `const` may be a copy of its own: every family got the TPOT buckets
    /// (1 ms … 10 s), so sizes in bytes and token counts all fell in `+Inf`.
    #[test]
    fn each_model_family_has_its_own_buckets() {
        let mut registry = Registry::default();
        let m = EppMetrics::register(&mut registry);
        let model = ModelLabels {
            model_name: "m".into(),
            target_model_name: "m".into(),
        };
        m.request_duration.get_or_create(&model).observe(1.0);
        m.request_sizes.get_or_create(&model).observe(1.0);
        m.response_sizes.get_or_create(&model).observe(1.0);
        m.input_tokens.get_or_create(&model).observe(1.0);
        m.output_tokens.get_or_create(&model).observe(1.0);
        m.cached_tokens.get_or_create(&model).observe(1.0);
        m.normalized_tpot.get_or_create(&model).observe(1.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let edges = |family: &str| -> Vec<f64> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{family}_bucket{{")))
                .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
                .filter(|e: &f64| e.is_finite())
                .collect()
        };
        for (family, expected) in [
            (
                "inference_objective_request_duration_seconds",
                DURATION_BUCKETS.to_vec(),
            ),
            ("inference_objective_request_sizes", SIZE_BUCKETS.to_vec()),
            (
                "inference_objective_response_sizes",
                response_size_buckets(),
            ),
            ("inference_objective_input_tokens", TOKEN_BUCKETS.to_vec()),
            ("inference_objective_output_tokens", TOKEN_BUCKETS.to_vec()),
            (
                "inference_objective_prompt_cached_tokens",
                TOKEN_BUCKETS.to_vec(),
            ),
            (
                "inference_objective_normalized_time_per_output_token_seconds",
                TPOT_BUCKETS.to_vec(),
            ),
        ] {
            assert_eq!(edges(family), expected, "{family}");
        }
    }

    #[test]
    fn families_list_matches_the_registry() {
        let mut registry = Registry::default();
        let m = EppMetrics::register(&mut registry);
        // Families without samples are not encoded: give every one a sample.
        let model = ModelLabels {
            model_name: "m".into(),
            target_model_name: "m".into(),
        };
        let pod = PodLabels {
            name: "p".into(),
            model_server_pod: "a".into(),
        };
        let pool = PoolLabels { name: "p".into() };
        m.requests
            .get_or_create(&RequestLabels {
                model_name: "m".into(),
                target_model_name: "m".into(),
                priority: "0".into(),
            })
            .inc();
        m.request_errors
            .get_or_create(&ErrorLabels {
                model_name: "m".into(),
                target_model_name: "m".into(),
                error_code: "BadRequest".into(),
            })
            .inc();
        for h in [
            &m.request_duration,
            &m.request_sizes,
            &m.response_sizes,
            &m.input_tokens,
            &m.output_tokens,
            &m.cached_tokens,
            &m.normalized_tpot,
            &m.ttft,
            &m.tpot,
        ] {
            h.get_or_create(&model).observe(1.0);
        }
        m.running_requests
            .get_or_create(&ModelOnly {
                model_name: "m".into(),
            })
            .set(0);
        let c = &m.canonical;
        let labelled = canonical::RequestLabels {
            model_name: "m".into(),
            target_model_name: "m".into(),
            fairness_id: "f".into(),
            priority: "0".into(),
        };
        c.requests.get_or_create(&labelled).inc();
        c.running.get_or_create(&labelled).set(0);
        c.request_errors
            .get_or_create(&canonical::ErrorLabels {
                model_name: "m".into(),
                target_model_name: "m".into(),
                fairness_id: "f".into(),
                priority: "0".into(),
                error_code: "BadRequest".into(),
            })
            .inc();
        for h in [
            &c.request_duration,
            &c.request_sizes,
            &c.response_sizes,
            &c.input_tokens,
            &c.output_tokens,
            &c.cached_tokens,
            &c.normalized_tpot,
            &c.streaming_tpot,
        ] {
            h.get_or_create(&labelled).observe(1.0);
        }
        c.ttft
            .get_or_create(&canonical::TtftLabels {
                model_name: "m".into(),
                target_model_name: "m".into(),
                fairness_id: "f".into(),
                priority: "0".into(),
                streaming: "true",
            })
            .observe(1.0);
        for g in [&c.std_dev_kv, &c.std_dev_queue, &c.std_dev_running] {
            g.get_or_create(&pool).set(0.0);
        }
        c.per_endpoint_queue
            .get_or_create(&canonical::EndpointLabels {
                name: "p".into(),
                model_server_endpoint: "a".into(),
            })
            .set(0);
        c.poll_errors
            .get_or_create(&canonical::SourceLabels {
                source_type: canonical::METRICS_SOURCE_TYPE,
            })
            .inc();
        for g in [&m.pool_avg_kv, &m.pool_avg_queue, &m.pool_avg_running] {
            g.get_or_create(&pool).set(0.0);
        }
        m.pool_ready_pods.get_or_create(&pool).set(1);
        m.per_pod_queue.get_or_create(&pod).set(0);
        m.per_pod_kv.get_or_create(&pod).set(0.0);
        m.scrape_age.get_or_create(&pod).set(0.0);
        m.count_attempt(&AttemptLabels {
            status: "success".into(),
            target_model_name: "m".into(),
            pod_name: "a".into(),
            namespace: "default".into(),
            port: "8000".into(),
        });
        m.plugin_duration
            .get_or_create(&PluginLabels {
                extension_point: "Scorer",
                plugin_type: "queue-scorer",
                plugin_name: "queue-scorer".into(),
            })
            .observe(0.0);
        m.rewrites
            .get_or_create(&RewriteDecisionLabels {
                model_rewrite_name: "r".into(),
                model_name: "m".into(),
                target_model: "m".into(),
            })
            .inc();
        m.streams
            .get_or_create(&StreamLabels {
                outcome: "ok".into(),
            })
            .inc();
        m.scrape_errors
            .get_or_create(&ScrapeErrorLabels {
                name: "p".into(),
                model_server_pod: "a".into(),
                reason: "timeout",
            })
            .inc();
        m.task_exits
            .get_or_create(&TaskExitLabels {
                task: "scraper".into(),
                reason: "panicked",
            })
            .inc();
        let kv_pod = crate::kv_events::PodLabels {
            name: "p".into(),
            model_server_pod: "a".into(),
        };
        m.kv_events.record(&kv_pod, 1, &Default::default(), 0.5);
        m.kv_events.count_dropped(&kv_pod, "gap", 1);
        m.kv_events
            .peer_messages
            .get_or_create(&crate::kv_events::PeerOutcome { outcome: "sent" })
            .inc();
        MetricsObserver(m.clone()).tokenized(Outcome::TimedOut, Duration::from_millis(1));
        m.response_body_overflows
            .get_or_create(&RewriteLabels { rewrite: "false" })
            .inc();
        m.observer_streams
            .get_or_create(&ObserverLabels { outcome: "matched" })
            .inc();
        let watch = k8s::watch::WatchHealth::default();
        let watch = Arc::new(watch);
        m.kubernetes_watches.lock().push(("pods", watch.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("switchyard_kubernetes_watch_errors_total{resource=\"pods\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("switchyard_kubernetes_watch_last_success_timestamp_seconds{"),
            "no success yet, no sample"
        );
        assert_registered_families_are(&text, FAMILIES);
    }

    /// The `# TYPE` lines of an encoded registry are exactly `families` (name, type).
    pub(crate) fn assert_registered_families_are(text: &str, families: &[(&str, &str)]) {
        let mut registered: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (n, t) = l.split_once(' ').unwrap();
                (n.to_owned(), t.to_owned())
            })
            .collect();
        registered.sort();
        let mut listed: Vec<(String, String)> = families
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        listed.sort();
        assert_eq!(registered, listed);
    }
}
