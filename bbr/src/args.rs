//! The flags: upstream BBR's names and defaults (`--grpc-port` 9004, `--grpc-health-port` 9005,
//! `--metrics-port` 9090, `--streaming`, `--secure-serving`, `--metrics-endpoint-auth`, `--v`),
//! plus file mode and the body limit.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

// The EPP's duration flags: Go's units and forms (500ms, 2s, 1m30s, 1.5h), a unit required
// but for 0, at most a day; a body's deadline and an interval or grace period above zero.
use epp::args::{body_timeout, duration, positive_duration};

/// Switchyard's body-based router: the request body's model into headers, before route
/// matching.
#[derive(Debug, Clone, Parser)]
// A flag given twice takes its last value, as Go's pflag does.
#[command(name = "bbr", version, about, long_about = None, args_override_self = true)]
pub struct Args {
    /// gRPC port of the ext_proc service.
    #[arg(long, default_value_t = 9004)]
    pub grpc_port: u16,
    /// gRPC health port (liveness and readiness).
    #[arg(long, default_value_t = 9005)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address every port binds to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: std::net::IpAddr,
    /// FULL_DUPLEX_STREAMED bodies (as the EPP); without it, Envoy's BUFFERED mode. Only for
    /// streams whose first message does not announce the mode (Envoy announces it).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub streaming: bool,
    /// TLS on the ext_proc port (a self-signed certificate unless --cert-path).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub secure_serving: bool,
    /// Directory with tls.crt and tls.key for the ext_proc port.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// A PEM bundle of CAs: the ext_proc port then requires a client certificate that chains
    /// to one of them (mutual TLS), as the EPP's flag of the same name. Needs --secure-serving.
    #[arg(long)]
    pub client_ca_path: Option<PathBuf>,
    /// File mode: the adapter mapping from this YAML/JSON file instead of ConfigMaps.
    #[arg(long)]
    pub mapping_file: Option<PathBuf>,
    /// How often --mapping-file is read for changes.
    #[arg(long, value_parser = positive_duration)]
    pub mapping_file_poll_interval: Option<Duration>,
    /// Kubernetes mode: the namespace whose ConfigMaps are watched (default $NAMESPACE, as
    /// upstream; "" or unset watches every namespace).
    #[arg(long)]
    pub configmap_namespace: Option<String>,
    /// Answer `GET /v1/models` with the models served behind the gateway (false: the request
    /// passes through like any other).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub list_models: bool,
    /// Largest request body read; a larger one gets 413. At least 1024.
    #[arg(long, default_value_t = 16 * 1024 * 1024, value_parser = ext_proc::body_budget::parse_body_limit)]
    pub max_request_body_bytes: usize,
    /// Most request-body bytes held by all streams together while their bodies are gathered;
    /// a request whose body would pass it gets 429 (rejected-saturated). At least
    /// --max-request-body-bytes.
    #[arg(long, default_value_t = ext_proc::body_budget::DEFAULT_GATHERED_REQUEST_BYTES)]
    pub max_gathered_request_bytes: usize,
    /// How long a streamed request body may take from its headers to its end; past it the
    /// request gets 408 and what it held is released (as at the EPP).
    #[arg(long, default_value = "180s", value_parser = body_timeout)]
    pub request_body_timeout: Duration,
    /// Authenticate and authorize /metrics (TokenReview + SubjectAccessReview in Kubernetes
    /// mode, --metrics-bearer-token-file in file mode).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub metrics_endpoint_auth: bool,
    /// A file holding the bearer token /metrics requires (surrounding whitespace ignored).
    #[arg(long)]
    pub metrics_bearer_token_file: Option<PathBuf>,
    /// Grace period for open streams at shutdown.
    #[arg(long, default_value = "30s", value_parser = positive_duration)]
    pub drain_grace_period: Duration,
    /// At SIGTERM, report NOT_SERVING but keep accepting streams for this long before the
    /// drain (0s: stop accepting at once); a second SIGTERM or SIGINT cuts it short. As the
    /// EPP's flag of the same name.
    #[arg(long, default_value = "0s", value_parser = duration)]
    pub shutdown_delay: Duration,
    /// Log verbosity as the reference's `--v`: 0 to 3 info, 4 debug, 5 and above trace.
    #[arg(long = "v", short = 'v', default_value_t = 2)]
    pub verbosity: u8,
    /// Log encoding: console or json.
    #[arg(long, default_value = "console", value_parser = ["console", "json"])]
    pub zap_encoder: String,
}

impl Args {
    /// The tracing filter of `--v`.
    pub fn log_filter(&self) -> String {
        epp::args::filter_at(epp::args::verbosity_level(self.verbosity))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn upstream_defaults_and_flags() {
        let error = Args::try_parse_from(["bbr", "--max-request-body-bytes=0"]).unwrap_err();
        assert!(
            error.to_string().contains("--max-request-body-bytes"),
            "{error}"
        );
        let a = Args::try_parse_from(["bbr"]).unwrap();
        assert_eq!(
            (a.grpc_port, a.grpc_health_port, a.metrics_port),
            (9004, 9005, 9090)
        );
        assert!(!a.streaming && a.secure_serving && a.metrics_endpoint_auth && a.list_models);
        assert!(
            !Args::try_parse_from(["bbr", "--list-models=false"])
                .unwrap()
                .list_models
        );
        let a = Args::try_parse_from([
            "bbr",
            "--streaming",
            "--secure-serving=false",
            "--mapping-file",
            "/m.yaml",
            "--mapping-file-poll-interval",
            "500ms",
            "--v",
            "4",
        ])
        .unwrap();
        assert!(a.streaming && !a.secure_serving);
        assert_eq!(
            a.mapping_file_poll_interval,
            Some(Duration::from_millis(500))
        );
        assert!(a.log_filter().starts_with("debug,"), "{}", a.log_filter());
        assert!(a.log_filter().contains("h2=warn"), "{}", a.log_filter());
        // Upstream's plugin framework is not here: start-up fails naming the flag.
        let e = Args::try_parse_from(["bbr", "--plugin", "x:y"]).unwrap_err();
        assert!(e.to_string().contains("--plugin"), "{e}");
        assert!(Args::try_parse_from(["bbr", "--mapping-file-poll-interval", "0s"]).is_err());
        assert!(Args::try_parse_from(["bbr", "--drain-grace-period", "0s"]).is_err());
        let a = Args::try_parse_from(["bbr", "--shutdown-delay", "5s"]).unwrap();
        assert_eq!(a.shutdown_delay, Duration::from_secs(5));
        // The EPP's forms, not only one unit.
        let a = Args::try_parse_from(["bbr", "--shutdown-delay", "1m30s"]).unwrap();
        assert_eq!(a.shutdown_delay, Duration::from_secs(90));
    }
}
