//! The reference's canonical names, `llm_d_epp_*`, next to the deprecated ones it still
//! exports (`inference_objective_*`, `inference_pool_*`, `inference_extension_*`), so that a
//! dashboard or an alert written on either finds its series.
//!
//! A family whose labels are the same under both names is one family registered twice
//! (`register_twins`): nothing more is recorded. The request families are not: the
//! canonical ones add `fairness_id` and `priority` (and the TTFT family `streaming`), so a
//! request is recorded once under each name. Their label *sets* are bounded together as well
//! as each label alone: past [`MAX_REQUEST_LABEL_SETS`] sets of (model, served model, fairness
//! id, priority), a new set is filed with `fairness_id="other"`, which keeps the models and
//! priorities exact and drops only the tenant of the late sets.
//!
//! Families of the reference not exported here: `request_streaming_itl_seconds` (the EPP does
//! not time each chunk), `request_processing_duration_seconds` and
//! `response_processing_duration_seconds` (ours is `request_path_overhead_seconds`, timed from
//! the end of the body), `datalayer_extract_errors_total`, `extproc_stream_duration_seconds`
//! and `extproc_streams_total` (ours count streams by outcome, not by gRPC code), the prefix
//! indexer's families with plugin labels, and the multimodal, predicted-latency, in-flight-load
//! and KV-cache-index families of plugins this EPP does not have.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{
    AttemptLabels as PodAttemptLabels, EppMetrics, duration_histogram, histogram_family,
    response_size_histogram, size_histogram, token_histogram, tpot_histogram,
};

/// Most (model, served model, fairness id, priority) label sets of their own; later sets are
/// filed under `fairness_id="other"`. Each set is about 250 lines of `/metrics` at worst.
pub const MAX_REQUEST_LABEL_SETS: usize = 512;

/// The `source_type` of the model servers' metrics scrapes (the reference's data source).
pub const METRICS_SOURCE_TYPE: &str = "metrics-data-source";

type GaugeF = Gauge<f64, AtomicU64>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// `model_name, target_model_name, fairness_id, priority`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model asked for.
    pub model_name: Arc<str>,
    /// Model served.
    pub target_model_name: Arc<str>,
    /// The request's flow (`default-flow` without the header; empty when not known).
    pub fairness_id: Arc<str>,
    /// Objective priority (empty when not known).
    pub priority: Arc<str>,
}

/// [`RequestLabels`] and `error_code`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Model asked for.
    pub model_name: Arc<str>,
    /// Model served.
    pub target_model_name: Arc<str>,
    /// The request's flow.
    pub fairness_id: Arc<str>,
    /// Objective priority.
    pub priority: Arc<str>,
    /// Error code name.
    pub error_code: String,
}

/// [`RequestLabels`] and `streaming`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TtftLabels {
    /// Model asked for.
    pub model_name: Arc<str>,
    /// Model served.
    pub target_model_name: Arc<str>,
    /// The request's flow.
    pub fairness_id: Arc<str>,
    /// Objective priority.
    pub priority: Arc<str>,
    /// `true`: the first chunk of a streamed answer (the only TTFT the EPP times).
    pub streaming: &'static str,
}

/// `name, model_server_endpoint`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Pool name.
    pub name: String,
    /// Endpoint name.
    pub model_server_endpoint: String,
}

/// `status, target_model_name, endpoint_name, namespace, port`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success` or `failure`.
    pub status: String,
    /// Model served.
    pub target_model_name: String,
    /// Pod of the primary target.
    pub endpoint_name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its target port.
    pub port: String,
}

impl From<&PodAttemptLabels> for AttemptLabels {
    fn from(a: &PodAttemptLabels) -> Self {
        Self {
            status: a.status.clone(),
            target_model_name: a.target_model_name.clone(),
            endpoint_name: a.pod_name.clone(),
            namespace: a.namespace.clone(),
            port: a.port.clone(),
        }
    }
}

/// `source_type`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// [`METRICS_SOURCE_TYPE`].
    pub source_type: &'static str,
}

/// The canonical families recorded apart from their deprecated twins.
#[derive(Debug)]
pub struct CanonicalMetrics {
    /// `llm_d_epp_request_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `llm_d_epp_request_error_total`.
    pub request_errors: Family<ErrorLabels, Counter>,
    /// `llm_d_epp_request_duration_seconds`.
    pub request_duration: Histograms<RequestLabels>,
    /// `llm_d_epp_request_size_bytes`.
    pub request_sizes: Histograms<RequestLabels>,
    /// `llm_d_epp_response_size_bytes`.
    pub response_sizes: Histograms<RequestLabels>,
    /// `llm_d_epp_request_input_tokens`.
    pub input_tokens: Histograms<RequestLabels>,
    /// `llm_d_epp_request_output_tokens`.
    pub output_tokens: Histograms<RequestLabels>,
    /// `llm_d_epp_request_cached_tokens`.
    pub cached_tokens: Histograms<RequestLabels>,
    /// `llm_d_epp_request_running`.
    pub running: Family<RequestLabels, Gauge>,
    /// `llm_d_epp_request_ntpot_seconds`.
    pub normalized_tpot: Histograms<RequestLabels>,
    /// `llm_d_epp_request_ttft_seconds`.
    pub ttft: Histograms<TtftLabels>,
    /// `llm_d_epp_request_streaming_tpot_seconds`.
    pub streaming_tpot: Histograms<RequestLabels>,
    /// `llm_d_epp_std_dev_kv_cache_utilization`.
    pub std_dev_kv: Family<super::PoolLabels, GaugeF>,
    /// `llm_d_epp_std_dev_queue_size`.
    pub std_dev_queue: Family<super::PoolLabels, GaugeF>,
    /// `llm_d_epp_std_dev_running_requests`.
    pub std_dev_running: Family<super::PoolLabels, GaugeF>,
    /// `llm_d_epp_per_endpoint_queue_size`.
    pub per_endpoint_queue: Family<EndpointLabels, Gauge>,
    /// `llm_d_epp_scheduler_attempts_total`.
    pub attempts: Family<AttemptLabels, Counter>,
    /// `llm_d_epp_datalayer_poll_errors_total`.
    pub poll_errors: Family<SourceLabels, Counter>,
}

impl CanonicalMetrics {
    /// The families, empty.
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            request_errors: Family::default(),
            request_duration: histogram_family(duration_histogram),
            request_sizes: histogram_family(size_histogram),
            response_sizes: histogram_family(response_size_histogram),
            input_tokens: histogram_family(token_histogram),
            output_tokens: histogram_family(token_histogram),
            cached_tokens: histogram_family(token_histogram),
            running: Family::default(),
            normalized_tpot: histogram_family(tpot_histogram),
            ttft: histogram_family(duration_histogram),
            streaming_tpot: histogram_family(tpot_histogram),
            std_dev_kv: Family::default(),
            std_dev_queue: Family::default(),
            std_dev_running: Family::default(),
            per_endpoint_queue: Family::default(),
            attempts: Family::default(),
            poll_errors: Family::default(),
        }
    }

    /// Registers the families recorded apart.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "llm_d_epp_request",
            "Requests, per model, served model, flow and priority",
            self.requests.clone(),
        );
        r.register(
            "llm_d_epp_request_error",
            "Requests that ended in an error, per model, served model, flow, priority and error code",
            self.request_errors.clone(),
        );
        r.register(
            "llm_d_epp_request_duration_seconds",
            "Request latency from the EPP's first sight of the request to the end of its response, in seconds",
            self.request_duration.clone(),
        );
        r.register(
            "llm_d_epp_request_size_bytes",
            "Request body sizes in bytes",
            self.request_sizes.clone(),
        );
        r.register(
            "llm_d_epp_response_size_bytes",
            "Response body sizes in bytes",
            self.response_sizes.clone(),
        );
        r.register(
            "llm_d_epp_request_input_tokens",
            "Prompt tokens per request, as the model server's usage reports them",
            self.input_tokens.clone(),
        );
        r.register(
            "llm_d_epp_request_output_tokens",
            "Output tokens per request, as the model server's usage reports them",
            self.output_tokens.clone(),
        );
        r.register(
            "llm_d_epp_request_cached_tokens",
            "Prompt tokens served from the model server's prefix cache, per request",
            self.cached_tokens.clone(),
        );
        r.register(
            "llm_d_epp_request_running",
            "Requests in flight (routed, response not ended)",
            self.running.clone(),
        );
        r.register(
            "llm_d_epp_request_ntpot_seconds",
            "Request latency divided by its output tokens, in seconds",
            self.normalized_tpot.clone(),
        );
        r.register(
            "llm_d_epp_request_ttft_seconds",
            "Time to the first token, in seconds: a streamed response's first chunk, a whole response's duration (streaming=\"false\")",
            self.ttft.clone(),
        );
        r.register(
            "llm_d_epp_request_streaming_tpot_seconds",
            "Time per output token after the first, in seconds (streamed responses)",
            self.streaming_tpot.clone(),
        );
        r.register(
            "llm_d_epp_std_dev_kv_cache_utilization",
            "Standard deviation of the KV-cache utilization of the pool's ready endpoints",
            self.std_dev_kv.clone(),
        );
        r.register(
            "llm_d_epp_std_dev_queue_size",
            "Standard deviation of the queue sizes of the pool's ready endpoints",
            self.std_dev_queue.clone(),
        );
        r.register(
            "llm_d_epp_std_dev_running_requests",
            "Standard deviation of the running requests of the pool's ready endpoints",
            self.std_dev_running.clone(),
        );
        r.register(
            "llm_d_epp_per_endpoint_queue_size",
            "Requests waiting in the queue of each endpoint",
            self.per_endpoint_queue.clone(),
        );
        r.register(
            "llm_d_epp_scheduler_attempts",
            "Scheduling attempts, by status and primary target",
            self.attempts.clone(),
        );
        r.register(
            "llm_d_epp_datalayer_poll_errors",
            "Failed polls of the model servers' metrics",
            self.poll_errors.clone(),
        );
    }
}

impl Default for CanonicalMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers, under their canonical names, the families whose labels the reference kept:
/// the same series, recorded once.
pub(super) fn register_twins(
    m: &EppMetrics,
    info: &Family<super::InfoLabels, Gauge>,
    r: &mut Registry,
) {
    r.register(
        "llm_d_epp_average_kv_cache_utilization",
        "The average KV-cache utilization of the pool's ready endpoints",
        m.pool_avg_kv.clone(),
    );
    r.register(
        "llm_d_epp_average_queue_size",
        "The average queue size of the pool's ready endpoints",
        m.pool_avg_queue.clone(),
    );
    r.register(
        "llm_d_epp_average_running_requests",
        "The average running requests of the pool's ready endpoints",
        m.pool_avg_running.clone(),
    );
    r.register(
        "llm_d_epp_ready_endpoints",
        "Ready endpoints of the pool",
        m.pool_ready_pods.clone(),
    );
    r.register(
        "llm_d_epp_scheduler_e2e_duration_seconds",
        "End-to-end scheduling latency distribution in seconds",
        m.scheduler_e2e.clone(),
    );
    r.register(
        "llm_d_epp_plugin_duration_seconds",
        "Plugin processing latency distribution in seconds for each extension point, plugin type and plugin name",
        m.plugin_duration.clone(),
    );
    r.register(
        "llm_d_epp_model_rewrite_decisions",
        "Model rewrite decisions",
        m.rewrites.clone(),
    );
    r.register(
        "llm_d_epp_extproc_streams_inflight",
        "ext_proc streams currently open",
        m.active_streams.clone(),
    );
    r.register(
        "llm_d_epp_info",
        "General information of the current build",
        info.clone(),
    );
}

/// The population standard deviation of `values` (0 for none).
pub fn std_dev(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let (n, sum) = values
        .clone()
        .fold((0usize, 0.0), |(n, s), v| (n + 1, s + v));
    if n == 0 {
        return 0.0;
    }
    let mean = sum / n as f64;
    let var = values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
    var.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_dev_is_the_population_one() {
        assert_eq!(std_dev(std::iter::empty()), 0.0);
        assert_eq!(std_dev([3.0].into_iter()), 0.0);
        assert!(
            (std_dev([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0].into_iter()) - 2.0).abs() < 1e-12
        );
    }
}
