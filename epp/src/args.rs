//! Command-line flags, named as the reference EPP's (Go pflag style: `--flag=value`, booleans
//! as `--flag` or `--flag=false`). Each does what the reference's does; one that cannot apply
//! to the rest of the command line (`--enable-cert-reload` without `--cert-path`, …) stops
//! start-up naming it rather than being ignored.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use endpoint_picker::scrape::MetricsScheme;

fn metrics_scheme(s: &str) -> Result<MetricsScheme, String> {
    s.parse()
}

/// The longest a duration flag may be. No interval, deadline or grace period of these
/// binaries means anything longer, and far past it a timer's next deadline overflows
/// `Instant` (`1e19s` once panicked the pool-gauges task on its second tick, then again on
/// every restart).
pub const MAX_FLAG_DURATION: Duration = Duration::from_secs(86_400);

/// A duration flag, as Go's `time.ParseDuration` reads the reference's: a unit is needed
/// (`50` is refused, where it once meant 50 s to one reader and 50 ms to another), but for
/// `0`; and at most [`MAX_FLAG_DURATION`]. Shared by `epp` and `bbr`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    if trimmed != "0" && trimmed.parse::<f64>().is_ok() {
        return Err(format!(
            "{s:?} has no unit: write {trimmed}s or {trimmed}ms (Go's units: ns, us, ms, s, m, h)"
        ));
    }
    let d = endpoint_picker::config::parse_duration(trimmed)
        .ok_or_else(|| format!("invalid duration {s:?} (e.g. 50ms, 2s, 1m30s)"))?;
    if d > MAX_FLAG_DURATION {
        return Err(format!(
            "{s:?} is over a day, the longest a duration flag may be"
        ));
    }
    Ok(d)
}

/// A file's permission bits in octal (`0660`, `660` or `0o660`), at most 0777.
fn file_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not a file mode in octal (e.g. 0660)"))
}

/// A body's deadline: above zero, at most a day.
pub fn body_timeout(s: &str) -> Result<Duration, String> {
    ext_proc::body_budget::check_body_timeout(duration(s)?)
}

/// An interval, deadline or half-life: zero would mean a timer that fires without end, a
/// deadline nothing meets, or a division by zero.
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be above zero")),
        d => Ok(d),
    }
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
    /// Also serve ext_proc on this Unix socket, alongside --grpc-port: for a gateway on the same
    /// host or in the same pod (Envoy: a `pipe` address on the ext_proc cluster). Always
    /// plaintext, whatever --secure-serving says (the socket file's permissions guard it); a
    /// socket file already there is replaced. At most 107 bytes (the kernel's limit).
    #[arg(long)]
    pub grpc_uds_path: Option<PathBuf>,
    /// The Unix socket file's permission bits, in octal (connecting needs write permission):
    /// 0660 lets the owner and group in (a gateway sharing the pod's fsGroup); 0666 any user
    /// who can reach the directory.
    #[arg(long, default_value = "0660", value_parser = file_mode, requires = "grpc_uds_path")]
    pub grpc_uds_mode: u32,
    /// Threads of the async runtime that serves ext_proc, scrapes the engines and watches the
    /// pool (0: tokio's default, `TOKIO_WORKER_THREADS` or one per CPU the process may use; at
    /// most 1024). One thread spends less CPU per request while requests are few (no wake-ups
    /// of idle threads between a stream's messages: bench/RESULTS.md, "CPU per streamed request
    /// of the whole path") and caps the EPP at one core.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(..=1024))]
    pub worker_threads: u16,
    /// Address the servers bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: std::net::IpAddr,
    /// Serve ext_proc over TLS (a self-signed certificate unless --cert-path).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub secure_serving: bool,
    /// Directory holding tls.crt and tls.key for the ext_proc port (needs --secure-serving).
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Re-read --cert-path every second: a changed pair is served to new connections (open
    /// ones keep theirs); a pair that does not load is logged and the old one kept. Needs
    /// --cert-path.
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
    /// InferencePool namespace (Kubernetes mode: defaults to $NAMESPACE, then "default"; in
    /// local mode it must match the pool file if set).
    #[arg(long)]
    pub pool_namespace: Option<String>,
    /// InferencePool API group (only inference.networking.k8s.io, whose v1 pools pool files
    /// hold too).
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
    /// How often the pool file is checked for changes (default 1s; needs --pool-file).
    #[arg(long, value_parser = positive_duration)]
    pub pool_file_poll_interval: Option<Duration>,
    /// Ignore the subset hint from the gateway.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub disable_endpoint_subset_filter: bool,
    /// Interval between two metric scrapes of one model server.
    #[arg(long, default_value = "50ms", value_parser = positive_duration)]
    pub refresh_metrics_interval: Duration,
    /// Deadline of one metric scrape.
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    pub metrics_scrape_timeout: Duration,
    /// Longest interval between two scrapes of a quiet model server (nothing running or
    /// waiting, values unchanged); its values stand until then, and routing to it wakes its
    /// scraper. At most 150ms turns quiet back-off off (e.g. several EPP replicas routing to
    /// one pool, where another replica's requests do not wake this one's scrapers).
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    pub idle_scrape_interval: Duration,
    /// Interval between refreshes of the pool-level Prometheus gauges.
    #[arg(long, default_value = "5s", value_parser = positive_duration)]
    pub refresh_prometheus_metrics_interval: Duration,
    /// Fairness ids (the `x-llm-d-inference-fairness-id` header) with a metric label of their
    /// own, first come first served for the life of the process; later ones are `other`, and
    /// 0 makes every one `other` (the reference's flag and default). The per-request families
    /// also bound their label sets (model, served model, fairness id, priority) at 512: there
    /// a tenant past that many sets is `other` however high this is.
    #[arg(long, default_value_t = crate::labels::DEFAULT_MAX_FAIRNESS_LABELS)]
    pub fairness_id_metric_label_limit: usize,
    /// Metrics older than this do not count a pod as ready in the pool gauges.
    #[arg(long, default_value = "2s", value_parser = positive_duration)]
    pub metrics_staleness_threshold: Duration,
    /// Scrape this port instead of the target port (single-port pools only; deprecated upstream).
    #[arg(long, default_value_t = 0)]
    pub model_server_metrics_port: u16,
    /// Metrics path on the model servers (deprecated upstream; metrics-data-source wins).
    #[arg(long, default_value = "/metrics")]
    pub model_server_metrics_path: String,
    /// Scheme of the model servers' metrics endpoints: http or https (deprecated upstream; the
    /// metrics-data-source plugin's scheme wins).
    #[arg(long, default_value = "http", value_parser = metrics_scheme)]
    pub model_server_metrics_scheme: MetricsScheme,
    /// With https: accept any certificate (the default, as the reference); false verifies the
    /// chain and the pod IP against the system roots. The plugin's insecureSkipVerify wins.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub model_server_metrics_https_insecure_skip_verify: bool,
    /// A PEM bundle of CAs: with it the ext_proc port requires a client certificate that
    /// chains to one of them (mutual TLS), so that only the gateway can open streams. Needs
    /// --secure-serving. Read at start-up.
    #[arg(long)]
    pub client_ca_path: Option<PathBuf>,
    /// EndpointPickerConfig YAML file.
    #[arg(long, conflicts_with = "config_text")]
    pub config_file: Option<PathBuf>,
    /// EndpointPickerConfig YAML inline.
    #[arg(long)]
    pub config_text: Option<String>,
    /// Largest request body accepted; larger bodies get 413. At least 1024.
    #[arg(long, default_value_t = 16 * 1024 * 1024, value_parser = ext_proc::body_budget::parse_body_limit)]
    pub max_request_body_bytes: usize,
    /// How long a streamed request body may take from its headers to its end; past it the
    /// request gets 408 and what it held is released (a body trickled in, or declared and
    /// never sent, held its bytes and its stream for as long as the gateway let it).
    #[arg(long, default_value = "180s", value_parser = body_timeout)]
    pub request_body_timeout: Duration,
    /// Most request-body bytes held by all streams together while their bodies are gathered
    /// and tokenized; a request whose body would pass it gets 429 (rejected-saturated). At
    /// least --max-request-body-bytes. Bodies queued in flow control count against its
    /// maxBytes instead.
    #[arg(long, default_value_t = ext_proc::body_budget::DEFAULT_GATHERED_REQUEST_BYTES)]
    pub max_gathered_request_bytes: usize,
    /// Seed of the scheduler's random choices (0 = from the clock).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Add an x-switchyard-decision response header with the score breakdown (debugging).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub debug_decision_header: bool,
    /// Keep the last N scheduling decisions with their score breakdown for `/debug/pool`
    /// (needs --debug-pool; 0 = off; at most 10000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=10_000))]
    pub debug_decisions: u16,
    /// Honour the model-rewrite header (x-llm-d-model-name-rewrite, x-gateway-model-name-rewrite).
    /// Off by default: any client can send it. An InferenceModelRewrite that matches the
    /// request's model wins either way. Turn on only when the gateway strips client copies.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub trust_model_rewrite_header: bool,
    /// Emit the scheduler's per-endpoint scores of the primary profile in the request-path
    /// dynamic metadata (`envoy.lb` / `x-gateway-destination-endpoint-scores`: ip:port → score).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub emit_endpoint_scores: bool,
    /// Give each routed request an id in Envoy's dynamic metadata (namespace
    /// `switchyard.observer`) for a second ext_proc filter in observability mode to report its
    /// answer with: the token, TTFT/TPOT and response-size metrics on the lean response path
    /// (README "Response path: observed"). The routing filter must list the namespace in its
    /// `receiving_namespaces`, the observer filter in its `forwarding_namespaces`.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub response_observer: bool,
    /// Grace period for open streams at shutdown (0s: they are cut at once, as a restart
    /// that cannot wait may want; bbr, whose streams carry every request on the Gateway,
    /// refuses 0).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub drain_grace_period: Duration,
    /// At SIGTERM, report NOT_SERVING but keep accepting streams for this long before the
    /// drain, so that health-checking gateways and the Service's endpoints move away first
    /// (0s: stop accepting at once). A second SIGTERM or SIGINT cuts it short. The pod's
    /// terminationGracePeriodSeconds should cover it plus --drain-grace-period.
    #[arg(long, default_value = "0s", value_parser = duration)]
    pub shutdown_delay: Duration,
    /// A static bearer token required on /metrics and /debug/pool (local mode; in Kubernetes
    /// mode it replaces the TokenReview check). Also read from $SWITCHYARD_METRICS_TOKEN, which
    /// keeps it out of the process's arguments; empty counts as unset.
    #[arg(
        long,
        env = "SWITCHYARD_METRICS_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub metrics_bearer_token: String,
    /// A file holding that token (read once at start-up; surrounding whitespace ignored). Not
    /// with --metrics-bearer-token (or $SWITCHYARD_METRICS_TOKEN).
    #[arg(long)]
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
    /// Serve a CPU profile at /debug/pprof/profile?seconds=N (default 30, at most 120) on the
    /// metrics port, behind the same auth as /metrics, as the reference's pprof handlers (Go's
    /// other profiles have no counterpart). Sampling runs only while a profile is taken.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_pprof: bool,
    /// Demand-driven LoRA adapter placement (README "LoRA placement"): the adapter catalogue,
    /// a file in upstream's sidecar format (`vLLMLoRAConfig`: `ensureExist` adapters are
    /// placed by demand, `ensureNotExist` ones unloaded wherever idle; `host`/`port` are the
    /// sidecar's and not used: each endpoint is called at its own address). Read once at
    /// start-up. Needs a profile with `lora-adapter-filter`.
    #[arg(long)]
    pub lora_placement_config: Option<PathBuf>,
    /// Time between two placement passes.
    #[arg(long, default_value = "2s", value_parser = positive_duration, requires = "lora_placement_config")]
    pub lora_placement_interval: Duration,
    /// An adapter placed (or first seen) on a replica stays at least this long.
    #[arg(long, default_value = "30s", value_parser = duration, requires = "lora_placement_config")]
    pub lora_placement_min_dwell: Duration,
    /// Most loads plus unloads per pass (1 to 1000).
    #[arg(long, default_value_t = 4, requires = "lora_placement_config")]
    pub lora_placement_max_changes: usize,
    /// Hysteresis of the replica counts, in replicas (0 to 1): an adapter keeps its count `r`
    /// while its demand share × replicas stays in (r − 1 − band, r + band].
    #[arg(long, default_value_t = 0.25, requires = "lora_placement_config")]
    pub lora_placement_band: f64,
    /// Average requests/s from which an adapter has recent demand (and wants a replica).
    #[arg(long, default_value_t = 0.01, requires = "lora_placement_config")]
    pub lora_placement_min_rate: f64,
    /// Half-life of the per-adapter demand average.
    #[arg(long, default_value = "10s", value_parser = positive_duration, requires = "lora_placement_config")]
    pub lora_placement_demand_half_life: Duration,
    /// Adapters one replica may hold (vLLM's --max-cpu-loras, the adapters it keeps without
    /// reading them again); 0 = the engine's max_lora as scraped.
    #[arg(long, default_value_t = 0, requires = "lora_placement_config")]
    pub lora_placement_max_adapters_per_endpoint: usize,
    /// Deadline of one engine call of the placement (list, load, unload).
    #[arg(long, default_value = "30s", value_parser = positive_duration, requires = "lora_placement_config")]
    pub lora_placement_call_timeout: Duration,
    /// A file holding the engines' API key (a mounted Secret), sent as a bearer token with
    /// every placement call: vLLM and SGLang started with `--api-key` refuse every path under
    /// `/v1` without it.
    #[arg(long, requires = "lora_placement_config")]
    pub lora_placement_api_key_file: Option<PathBuf>,
    /// Log verbosity, as the reference's `--v` (zap level -N): 0 to 3 = info (2 is the
    /// default), 4 = debug, 5 and above = trace.
    #[arg(long = "v", short = 'v', default_value_t = 2)]
    pub verbosity: u8,
    /// Log encoding: console or json. Without it, --zap-devel decides: console in development
    /// mode (the default), json in production mode (--zap-devel=false).
    #[arg(long, value_parser = ["console", "json"])]
    pub zap_encoder: Option<String>,
    /// Log level: debug, info, warn, error, panic (nothing is logged at panic level), or an
    /// integer N > 0 read as --v=N. Wins over --v when set.
    #[arg(long, value_parser = zap_level)]
    pub zap_log_level: Option<LogLevel>,
    /// Development logging, as controller-runtime's zap: the console encoder unless
    /// --zap-encoder is given; false (production) makes json the default. Default true, as the
    /// reference. The level always comes from --zap-log-level or --v, as in the reference,
    /// whose own --v sets the level in both modes; zap's stack traces on warnings have no
    /// counterpart here.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub zap_devel: bool,
}

/// A level from `--zap-log-level` (controller-runtime's names, plus `warn`; integers are
/// verbosities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// `debug`.
    Debug,
    /// `info`.
    Info,
    /// `warn` (not in controller-runtime's list; kept because it is obvious).
    Warn,
    /// `error`.
    Error,
    /// `panic`: zap then logs panics only, and this program logs none.
    Panic,
    /// An integer N > 0: zap level -N, the same as `--v=N`.
    Verbosity(u8),
}

fn zap_level(s: &str) -> Result<LogLevel, String> {
    match s.to_ascii_lowercase().as_str() {
        "debug" => Ok(LogLevel::Debug),
        "info" => Ok(LogLevel::Info),
        "warn" => Ok(LogLevel::Warn),
        "error" => Ok(LogLevel::Error),
        "panic" => Ok(LogLevel::Panic),
        other => match other.parse::<u8>() {
            Ok(n) if n > 0 => Ok(LogLevel::Verbosity(n)),
            _ => Err(format!(
                "invalid log level {s:?}: debug, info, warn, error, panic, or an integer > 0"
            )),
        },
    }
}

/// The `tracing` level of a zap verbosity: this program's info lines are V(0) to V(3) in the
/// reference's scheme (`DEFAULT` 2, `VERBOSE` 3), debug lines V(4), trace lines V(5).
/// The tracing level a klog-style `--v` asks for (shared by the workspace's binaries).
pub fn verbosity_level(v: u8) -> &'static str {
    match v {
        0..=3 => "info",
        4 => "debug",
        _ => "trace",
    }
}

/// The tracing filter for `level`, the HTTP/2, gRPC and TLS libraries held at `warn`: their
/// debug lines are per frame and per connection, noise even at trace (and on a router that
/// sees every request on the Gateway, a flood). Shared by the workspace's binaries.
pub fn filter_at(level: &str) -> String {
    format!("{level},h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,rustls=warn")
}

impl Args {
    /// The tracing filter the verbosity flags ask for: `--zap-log-level` if given, else `--v`.
    pub fn log_filter(&self) -> String {
        let level = match self.zap_log_level {
            Some(LogLevel::Debug) => "debug",
            Some(LogLevel::Info) => "info",
            Some(LogLevel::Warn) => "warn",
            Some(LogLevel::Error) => "error",
            Some(LogLevel::Panic) => "off",
            Some(LogLevel::Verbosity(n)) => verbosity_level(n),
            None => verbosity_level(self.verbosity),
        };
        filter_at(level)
    }

    /// The log encoder: `--zap-encoder` if given, else `console` in development mode and
    /// `json` in production mode (`--zap-devel=false`), as controller-runtime's zap.
    pub fn log_encoder(&self) -> &str {
        match (&self.zap_encoder, self.zap_devel) {
            (Some(explicit), _) => explicit,
            (None, true) => "console",
            (None, false) => "json",
        }
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

    /// A zero interval or deadline is refused, naming the flag: accepted, it panicked a timer
    /// (`--refresh-prometheus-metrics-interval`), scraped without pause, or failed every scrape.
    #[test]
    fn zero_intervals_and_deadlines_are_refused() {
        for flag in [
            "--pool-file-poll-interval",
            "--refresh-metrics-interval",
            "--metrics-scrape-timeout",
            "--idle-scrape-interval",
            "--refresh-prometheus-metrics-interval",
            "--metrics-staleness-threshold",
            "--request-body-timeout",
        ] {
            let error = Args::try_parse_from(["epp", &format!("{flag}=0s")]).unwrap_err();
            assert!(error.to_string().contains(flag), "{flag}: {error}");
            assert!(Args::try_parse_from(["epp", &format!("{flag}=1ms")]).is_ok());
        }
        assert!(Args::try_parse_from(["epp", "--drain-grace-period=0s"]).is_ok());
        // Past the ring's size it is refused, not silently cut.
        let error = Args::try_parse_from(["epp", "--debug-decisions=10001"]).unwrap_err();
        assert!(error.to_string().contains("--debug-decisions"), "{error}");
        assert!(Args::try_parse_from(["epp", "--debug-decisions=10000"]).is_ok());
        // A body limit of 0 refused every POST.
        for n in ["0", "1023"] {
            let error = Args::try_parse_from(["epp", &format!("--max-request-body-bytes={n}")])
                .unwrap_err();
            assert!(
                error.to_string().contains("--max-request-body-bytes"),
                "{error}"
            );
        }
        assert!(Args::try_parse_from(["epp", "--max-request-body-bytes=1024"]).is_ok());
        // A deadline past a day would overflow `Instant + Duration` on every request.
        let error = Args::try_parse_from(["epp", "--request-body-timeout=1e19s"]).unwrap_err();
        assert!(
            error.to_string().contains("--request-body-timeout"),
            "{error}"
        );
        assert!(Args::try_parse_from(["epp", "--request-body-timeout=25h"]).is_err());
        assert!(Args::try_parse_from(["epp", "--request-body-timeout=24h"]).is_ok());
    }

    /// Every duration flag wants a unit (Go's reading; `0` alone needs none) and is at most a
    /// day: `1e19s` once panicked a supervised task on every restart.
    #[test]
    fn duration_flags_need_a_unit_and_stay_within_a_day() {
        let flags = [
            "--pool-file-poll-interval",
            "--refresh-metrics-interval",
            "--metrics-scrape-timeout",
            "--idle-scrape-interval",
            "--refresh-prometheus-metrics-interval",
            "--metrics-staleness-threshold",
            "--request-body-timeout",
            "--drain-grace-period",
            "--shutdown-delay",
        ];
        for flag in flags {
            for bad in ["50", "1.5", "25h", "10000000000000000000s", "5 parsecs"] {
                let error = Args::try_parse_from(["epp", &format!("{flag}={bad}")]).unwrap_err();
                assert!(error.to_string().contains(flag), "{flag}={bad}: {error}");
            }
            for good in ["50ms", "1.5s", "1m30s", "24h"] {
                assert!(
                    Args::try_parse_from(["epp", &format!("{flag}={good}")]).is_ok(),
                    "{flag}={good}"
                );
            }
        }
        let error = Args::try_parse_from(["epp", "--refresh-metrics-interval=50"]).unwrap_err();
        assert!(error.to_string().contains("has no unit"), "{error}");
        assert_eq!(
            parse(&["--drain-grace-period=0", "--shutdown-delay=0"]).drain_grace_period,
            Duration::ZERO
        );
    }

    #[test]
    fn the_socket_mode_is_octal_and_needs_the_socket() {
        let a = parse(&["--grpc-uds-path=/tmp/s", "--grpc-uds-mode=0600"]);
        assert_eq!(a.grpc_uds_mode, 0o600);
        assert_eq!(parse(&["--grpc-uds-path=/tmp/s"]).grpc_uds_mode, 0o660);
        for bad in ["0888", "01000", "rw", ""] {
            let flag = format!("--grpc-uds-mode={bad}");
            let e = Args::try_parse_from(["epp", "--grpc-uds-path=/tmp/s", &flag]).unwrap_err();
            assert!(e.to_string().contains("--grpc-uds-mode"), "{bad}: {e}");
        }
        // Without a socket it would do nothing: refused, naming the socket's flag.
        let e = Args::try_parse_from(["epp", "--grpc-uds-mode=0600"]).unwrap_err();
        assert!(e.to_string().contains("--grpc-uds-path"), "{e}");
    }

    #[test]
    fn worker_threads_are_bounded() {
        assert_eq!(parse(&[]).worker_threads, 0);
        assert_eq!(parse(&["--worker-threads=1"]).worker_threads, 1);
        assert_eq!(parse(&["--worker-threads=1024"]).worker_threads, 1024);
        let error = Args::try_parse_from(["epp", "--worker-threads=1025"]).unwrap_err();
        assert!(error.to_string().contains("--worker-threads"), "{error}");
    }

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("epp").chain(args.iter().copied())).unwrap()
    }

    fn level(args: &[&str]) -> String {
        let filter = parse(args).log_filter();
        filter.split(',').next().unwrap_or_default().to_owned()
    }

    #[test]
    fn zap_devel_picks_the_encoder_unless_zap_encoder_is_given() {
        // Development mode is the default, as the reference's: console.
        assert_eq!(parse(&[]).log_encoder(), "console");
        assert_eq!(parse(&["--zap-devel"]).log_encoder(), "console");
        // Production mode: json, as zap's production defaults.
        assert_eq!(parse(&["--zap-devel=false"]).log_encoder(), "json");
        // An explicit encoder wins in either mode.
        assert_eq!(
            parse(&["--zap-devel=false", "--zap-encoder=console"]).log_encoder(),
            "console"
        );
        assert_eq!(parse(&["--zap-encoder=json"]).log_encoder(), "json");
        assert_eq!(
            parse(&["--zap-devel=true", "--zap-encoder", "json"]).log_encoder(),
            "json"
        );
        assert!(Args::try_parse_from(["epp", "--zap-encoder=logfmt"]).is_err());
    }

    #[test]
    fn the_level_comes_from_zap_log_level_then_v_in_either_mode() {
        // The reference derives the zap level from --v whenever --zap-log-level is not set, so
        // development mode's debug default never applies; the same here.
        assert_eq!(level(&[]), "info");
        assert_eq!(level(&["--zap-devel"]), "info");
        assert_eq!(level(&["--zap-devel=false"]), "info");
        // --v: zap level -N; this program's info lines are V(0) to V(3).
        for (v, want) in [("0", "info"), ("1", "info"), ("3", "info"), ("4", "debug")] {
            assert_eq!(level(&["--v", v]), want, "--v={v}");
        }
        assert_eq!(level(&["-v", "5"]), "trace");
        assert_eq!(level(&["--v=9"]), "trace");
        // --zap-log-level wins over --v, names or integers (read as --v).
        assert_eq!(level(&["--v=5", "--zap-log-level=info"]), "info");
        assert_eq!(level(&["--v=5", "--zap-log-level=1"]), "info");
        assert_eq!(level(&["--zap-log-level=4"]), "debug");
        assert_eq!(level(&["--zap-log-level=5"]), "trace");
        assert_eq!(level(&["--zap-log-level=DEBUG"]), "debug");
        assert_eq!(level(&["--zap-log-level=error"]), "error");
        assert_eq!(level(&["--zap-log-level=warn"]), "warn");
        // zap's panic level shows panics only; this program logs none.
        assert_eq!(level(&["--zap-log-level=panic"]), "off");
        // What zap refuses is refused here, naming the flag.
        for bad in ["0", "-1", "verbose", ""] {
            let err = Args::try_parse_from(["epp", &format!("--zap-log-level={bad}")])
                .expect_err(bad)
                .to_string();
            assert!(err.contains("--zap-log-level"), "{err}");
        }
        // Libraries stay quiet even at trace.
        assert!(parse(&["--v=5"]).log_filter().contains("h2=warn"));
    }
}
