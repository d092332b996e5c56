//! `lora-syncer`: keeps its engine's LoRA adapters as a `vLLMLoRAConfig` file declares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgAction, Parser};
use epp::admin::{self, AdminAuth, AdminState};
use epp::supervisor::{OnExit, Supervisor, factory};
use epp::telemetry::{self, TelemetryOptions};
use lora_syncer::metrics::Metrics;
use lora_syncer::run::{self, ConfigFile, Pacing};
use lora_syncer::target::{ConfigHost, EngineTarget};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// A number of seconds from 0.1 to a day: below a tenth of a second an interval is a busy loop
/// of engine calls or file reads, not a setting.
fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && (0.1..=86_400.0).contains(v))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds in [0.1, 86400]"))
}

/// Upstream's sidecar flags (seconds as plain numbers), plus the bind address, the log level,
/// the API key and the pinned engine.
#[derive(Debug, Parser)]
#[command(name = "lora-syncer", version, about, long_about = None, args_override_self = true)]
struct Args {
    /// The vLLMLoRAConfig file (a mounted ConfigMap: mount the directory, not a subPath, or
    /// updates never arrive).
    #[arg(
        long,
        env = "DYNAMIC_LORA_ROLLOUT_CONFIG",
        default_value = "/config/configmap.yaml"
    )]
    config: PathBuf,
    /// Reject config keys upstream's schema does not have.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    config_validation: bool,
    /// Seconds the engine may take to answer /health 200 before the syncer gives up a run.
    #[arg(long, default_value = "300", value_parser = seconds)]
    health_check_timeout: Duration,
    /// Seconds between /health checks while waiting.
    #[arg(long, default_value = "2", value_parser = seconds)]
    health_check_interval: Duration,
    /// Seconds between forced reconcile passes.
    #[arg(long, default_value = "5", value_parser = seconds)]
    reconcile_trigger: Duration,
    /// Seconds between reads of the config file.
    #[arg(long, default_value = "1", value_parser = seconds)]
    config_poll_interval: Duration,
    /// Port of /metrics (upstream's 8080).
    #[arg(long, default_value_t = 8080)]
    metrics_port: u16,
    /// Address /metrics binds to (no auth, as upstream's: 127.0.0.1 keeps it to the pod).
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: std::net::IpAddr,
    /// Log verbosity: 0 to 3 info, 4 debug, 5 and above trace.
    #[arg(long = "v", short = 'v', default_value_t = 2)]
    verbosity: u8,
    /// The engine's API key, sent as a bearer token with every call (vLLM's and SGLang's
    /// `--api-key` refuse every path under /v1 without it). Best given as `VLLM_API_KEY` from
    /// the Secret the engine reads it from: a flag shows in the process list.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true, value_parser = api_key)]
    api_key: Option<Arc<str>>,
    /// The engine's host. The syncer calls this engine only: a config file whose `host`/`port`
    /// name another has them refused (warned, counted) and its adapter lists applied here.
    #[arg(long, default_value = "localhost", value_parser = engine_host)]
    engine_host: String,
    /// The engine's port (8000, the config file's default `port`).
    #[arg(long, default_value_t = 8000, value_parser = clap::value_parser!(u16).range(1..))]
    engine_port: u16,
    /// Call the engine the config file's `host`/`port` name, as upstream's sidecar does. The
    /// API key still goes only to loopback hosts and --engine-host (see
    /// --api-key-to-config-host).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    allow_config_host: bool,
    /// With --allow-config-host: send the API key to any host the config file names, not only
    /// to loopback and --engine-host.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    api_key_to_config_host: bool,
}

/// A host name or IP address, as the config file's `host` is checked: it goes into a URL.
fn engine_host(s: &str) -> Result<String, String> {
    let host = s.trim();
    let ipv6 = |h: &str| h.parse::<std::net::Ipv6Addr>().is_ok();
    // Brackets only around an IPv6 address, a colon only in one: the port is --engine-port.
    let shape = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) => ipv6(inner),
        None => !host.contains(['[', ']']) && (!host.contains(':') || ipv6(host)),
    };
    let ok = shape
        && !host.is_empty()
        && host.len() <= 253
        && !host.chars().any(|c| c.is_control() || "/@?#% ".contains(c));
    if ok {
        Ok(host.to_owned())
    } else {
        Err("not a host name or IP address (the port goes in --engine-port)".into())
    }
}

/// An API key: visible ASCII (it goes into a header), not empty.
fn api_key(s: &str) -> Result<Arc<str>, String> {
    let key = s.trim();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("empty, or not visible ASCII (it is sent in a header)".into());
    }
    Ok(Arc::from(key))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lora-syncer: starting the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let filter = epp::args::filter_at(epp::args::verbosity_level(args.verbosity));
    let _telemetry = {
        let _entered = runtime.enter();
        match telemetry::init(&TelemetryOptions {
            encoder: "json".to_owned(),
            filter,
            tracing: false,
        }) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("lora-syncer: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "lora-syncer failed");
            eprintln!("lora-syncer: {e:#}");
            // 1 when a task it cannot run without ended, else 2 (flags: bad values, a metrics
            // port that cannot be bound; never the config file, which the poller waits on).
            std::process::ExitCode::from(epp::supervisor::failure_exit_code(e.as_ref()))
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let Args {
        config,
        config_validation,
        health_check_timeout,
        health_check_interval,
        reconcile_trigger,
        config_poll_interval,
        metrics_port,
        bind_address,
        verbosity: _,
        api_key,
        engine_host,
        engine_port,
        allow_config_host,
        api_key_to_config_host,
    } = args;
    let config_host = match (allow_config_host, api_key_to_config_host) {
        (false, false) => ConfigHost::Refuse,
        (true, false) => ConfigHost::Follow,
        (true, true) => ConfigHost::FollowWithKey,
        (false, true) => bail!(
            "--api-key-to-config-host says where the key goes when the config file's host is \
             followed: add --allow-config-host"
        ),
    };
    let target = EngineTarget::pinned(engine_host, engine_port)
        .with_api_key(api_key.clone())
        .with_config_host(config_host);
    let metrics = Arc::new(Metrics::default());
    let registry = {
        let mut r = Registry::default();
        metrics.register(&mut r);
        Arc::new(Mutex::new(r))
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(bind_address, metrics_port))
        .await
        .with_context(|| format!("binding --metrics-port {metrics_port}"))?;
    // The config file is not read here: a missing or bad one must not stop the process (a
    // native sidecar that exits keeps its engine's pod from being ready, so one bad edit of a
    // shared ConfigMap would take replicas out of service one restart at a time). The poller
    // reports it (logs, `lora_syncer_config_reloads_total{result="error"}`,
    // `lora_syncer_config_valid`) and the reconcile loop waits for a valid one.
    tracing::info!(
        config = %config.display(),
        engine = %target.address(),
        allow_config_host,
        api_key_to_config_host,
        api_key = api_key.is_some(),
        metrics = %listener.local_addr().context("the metrics listener's address")?,
        "switchyard lora-syncer starting"
    );
    let shutdown = CancellationToken::new();
    let mut tasks = Supervisor::new(shutdown.clone(), metrics.task_exits.clone());
    // None until the file is first valid.
    let configs = Arc::new(tokio::sync::watch::channel(None).0);
    {
        let (configs, metrics, path) = (configs.clone(), metrics.clone(), config.clone());
        let target = target.clone();
        tasks.spawn(
            "config-file",
            OnExit::Restart,
            factory(move |token| {
                ConfigFile::new(&path, config_validation).run(
                    config_poll_interval,
                    configs.clone(),
                    metrics.clone(),
                    target.clone(),
                    token,
                )
            }),
        );
    }
    {
        let (configs, metrics) = (configs.clone(), metrics.clone());
        let pacing = Pacing {
            reconcile_every: reconcile_trigger,
            health_check_interval,
            health_check_timeout,
        };
        tasks.spawn(
            "reconcile",
            OnExit::Restart,
            factory(move |token| {
                run::reconcile_loop(
                    configs.subscribe(),
                    pacing,
                    target.clone(),
                    metrics.clone(),
                    token,
                )
            }),
        );
    }
    {
        // No auth, as upstream's: bound to every address by default, so anything in the
        // cluster that reaches the pod can read it. What it tells (the adapters of the
        // operator's config, the engine's answers counted) is what the engine's own /metrics
        // beside it tells; `--bind-address=127.0.0.1` keeps it to the pod.
        let state = AdminState {
            registry,
            auth: AdminAuth::Open,
            refresh: None,
            debug: None,
            pprof: None,
        };
        let token = shutdown.clone();
        let server = tokio::spawn(async move {
            admin::serve(listener, admin::router(state), token).await;
        });
        tasks.adopt("metrics-server", OnExit::Shutdown, server);
    }
    let signals = tokio::spawn(epp::signals::cancel_on_signal(shutdown.clone()));
    let ended = tasks.run().await;
    signals.abort();
    Ok(ended?)
}
