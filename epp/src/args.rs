//! Command-line flags, named as the reference EPP's (Go pflag style: `--flag=value`, booleans
//! as `--flag` or `--flag=false`). Flags that do not apply to this build are accepted and say
//! so in `--help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

fn duration(s: &str) -> Result<Duration, String> {
    endpoint_picker::config::parse_duration(s)
        .ok_or_else(|| format!("invalid duration {s:?} (e.g. 50ms, 2s, 1m)"))
}

/// Switchyard: a Gateway API Inference Extension endpoint picker.
#[derive(Debug, Clone, Parser)]
// A flag given twice takes its last value, as Go's pflag does: a chart that sets a flag the
// user sets again must still start.
#[command(name = "epp", version, about, long_about = None, args_override_self = true)]
pub struct Args {
    /// gRPC port of the ext_proc service.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// gRPC health port.
    #[arg(long, default_value_t = 9003)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address the servers bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: std::net::IpAddr,
    /// Serve ext_proc over TLS (a self-signed certificate unless --cert-path).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub secure_serving: bool,
    /// Directory holding tls.crt and tls.key.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Reload certificates on change (accepted; certificates are read at start-up).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_cert_reload: bool,
    /// Also serve gRPC health on the ext_proc port.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub health_checking: bool,
    /// Leader election for HA (needs Kubernetes mode; not available in local mode).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ha_enable_leader_election: bool,
    /// InferencePool name (Kubernetes mode; in local mode it must match the pool file if set).
    #[arg(long, default_value = "")]
    pub pool_name: String,
    /// InferencePool namespace (defaults to $NAMESPACE, then "default").
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pub pool_namespace: String,
    /// InferencePool API group.
    #[arg(long, default_value = "inference.networking.k8s.io")]
    pub pool_group: String,
    /// Standalone selector `key=value,...` (Kubernetes mode; not available in local mode).
    #[arg(long, default_value = "")]
    pub endpoint_selector: String,
    /// Standalone target ports (Kubernetes mode; not available in local mode).
    #[arg(long, value_delimiter = ',')]
    pub endpoint_target_ports: Vec<u16>,
    /// Local mode: a YAML file with an InferencePool and its endpoints, reloaded on change.
    #[arg(long)]
    pub pool_file: Option<PathBuf>,
    /// How often the pool file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub pool_file_poll_interval: Duration,
    /// Ignore the subset hint from the gateway.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub disable_endpoint_subset_filter: bool,
    /// Interval between two metric scrapes of one model server.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub refresh_metrics_interval: Duration,
    /// Deadline of one metric scrape.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub metrics_scrape_timeout: Duration,
    /// Interval between refreshes of the pool-level Prometheus gauges.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub refresh_prometheus_metrics_interval: Duration,
    /// Metrics older than this do not count a pod as ready in the pool gauges.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub metrics_staleness_threshold: Duration,
    /// Scrape this port instead of the target port (single-port pools only; deprecated upstream).
    #[arg(long, default_value_t = 0)]
    pub model_server_metrics_port: u16,
    /// Metrics path on the model servers (deprecated upstream; metrics-data-source wins).
    #[arg(long, default_value = "/metrics")]
    pub model_server_metrics_path: String,
    /// Metrics scheme (only http is implemented).
    #[arg(long, default_value = "http")]
    pub model_server_metrics_scheme: String,
    /// Skip TLS verification when scraping over https (accepted; https scraping is not implemented).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub model_server_metrics_https_insecure_skip_verify: bool,
    /// EndpointPickerConfig YAML file.
    #[arg(long, conflicts_with = "config_text")]
    pub config_file: Option<PathBuf>,
    /// EndpointPickerConfig YAML inline.
    #[arg(long)]
    pub config_text: Option<String>,
    /// Largest request body accepted; larger bodies get 413.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
    /// Seed of the scheduler's random choices (0 = from the clock).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Add an x-switchyard-decision response header with the score breakdown (debugging).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub debug_decision_header: bool,
    /// Keep the last N scheduling decisions with their score breakdown for `/debug/pool`
    /// (needs --debug-pool; 0 = off; at most 10000).
    #[arg(long, default_value_t = 0)]
    pub debug_decisions: usize,
    /// Honour the model-rewrite header (x-llm-d-model-name-rewrite, x-gateway-model-name-rewrite).
    /// Off by default: any client can send it. An InferenceModelRewrite that matches the
    /// request's model wins either way. Turn on only when the gateway strips client copies.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub trust_model_rewrite_header: bool,
    /// Emit the scheduler's per-endpoint scores of the primary profile in the request-path
    /// dynamic metadata (`envoy.lb` / `x-gateway-destination-endpoint-scores`: ip:port → score).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub emit_endpoint_scores: bool,
    /// Grace period for open streams at shutdown.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub drain_grace_period: Duration,
    /// A static bearer token required on /metrics and /debug/pool (local mode; in Kubernetes
    /// mode it replaces the TokenReview check).
    #[arg(
        long,
        env = "SWITCHYARD_METRICS_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub metrics_bearer_token: String,
    /// A file holding that token (read once at start-up; surrounding whitespace ignored).
    #[arg(long, conflicts_with = "metrics_bearer_token")]
    pub metrics_bearer_token_file: Option<PathBuf>,
    /// Authenticate and authorise readers of /metrics and /debug/pool: in Kubernetes mode by
    /// TokenReview and SubjectAccessReview (path, verb get), as the reference; in local mode by
    /// --metrics-bearer-token(-file), which it then requires. false leaves them open.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub metrics_endpoint_auth: bool,
    /// Serve /debug/pool (endpoints, their metrics, recent decisions) on the metrics port,
    /// behind the same auth as /metrics.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub debug_pool: bool,
    /// OpenTelemetry tracing: export request spans over OTLP/gRPC when
    /// OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set; off without an endpoint.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub tracing: bool,
    /// pprof endpoints (accepted; Go-only).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_pprof: bool,
    /// Log verbosity: 2 = info (default), 3 = verbose, 4 = debug, 5 = trace.
    #[arg(long = "v", short = 'v', default_value_t = 2)]
    pub verbosity: u8,
    /// Log encoding: console or json.
    #[arg(long, default_value = "console", value_parser = ["console", "json"])]
    pub zap_encoder: String,
    /// Log level (info, debug, error, or a number); overrides --v when set.
    #[arg(long)]
    pub zap_log_level: Option<String>,
    /// Development logging (accepted).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub zap_devel: bool,
}

impl Args {
    /// The tracing filter the verbosity flags ask for.
    pub fn log_filter(&self) -> String {
        let level = match self.zap_log_level.as_deref() {
            Some("debug") => "debug",
            Some("error") => "error",
            Some("warn") => "warn",
            Some("info") => "info",
            Some(n) if n.parse::<u8>().is_ok_and(|n| n >= 4) => "debug",
            _ => match self.verbosity {
                0 | 1 => "warn",
                2 | 3 => "info",
                4 => "debug",
                _ => "trace",
            },
        };
        format!("{level},h2=warn,hyper=warn,tower=warn,tonic=warn")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_style_flags_parse() {
        let a = Args::try_parse_from([
            "epp",
            "--pool-name",
            "p",
            "--secure-serving=false",
            "--refresh-metrics-interval=100ms",
            "--v=4",
            "--zap-encoder",
            "json",
            "--grpc-port=0",
            "--health-checking",
        ])
        .unwrap();
        assert!(!a.secure_serving);
        assert!(a.health_checking);
        assert_eq!(a.refresh_metrics_interval, Duration::from_millis(100));
        assert_eq!(a.verbosity, 4);
        assert!(a.log_filter().starts_with("debug"));
        let d = Args::try_parse_from(["epp"]).unwrap();
        assert!(d.secure_serving);
        assert_eq!(
            (d.grpc_port, d.grpc_health_port, d.metrics_port),
            (9002, 9003, 9090)
        );
        assert_eq!(d.refresh_metrics_interval, Duration::from_millis(50));
        assert!(Args::try_parse_from(["epp", "--config-file=a", "--config-text=b"]).is_err());
        let twice = Args::try_parse_from(["epp", "--v=2", "--v=3", "--tracing=false", "--tracing"])
            .unwrap();
        assert_eq!(twice.verbosity, 3, "the last one wins");
        assert!(twice.tracing);
        assert!(Args::try_parse_from(["epp", "--refresh-metrics-interval=soon"]).is_err());
    }
}
