//! `epp`: the Switchyard endpoint picker.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use endpoint_picker::config;
use endpoint_picker::discovery::file;
use endpoint_picker::scrape::{DEFAULT_MAX_IDLE_INTERVAL, MetricsScheme, ScrapeConfig, ScrapeTls};
use epp::admin::AdminAuth;
use epp::args::Args;
use epp::kubernetes;
use epp::server::{self, Listeners, PoolSource, Settings, ShutdownDelay};
use epp::telemetry::{self, TelemetryOptions};
use epp::tls::{self, ServerTls};
use ext_proc::body_budget::BodyBudget;
use ext_proc::observer::{self, Observers};
use ext_proc::stream::ServiceOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        runtime.worker_threads(usize::from(args.worker_threads));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("epp: starting the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    // Inside the runtime: the OTLP exporter's gRPC channel lives on it. The guard flushes
    // traces when dropped, before the runtime goes.
    let _telemetry = {
        let _entered = runtime.enter();
        match telemetry::init(&TelemetryOptions {
            encoder: args.log_encoder().to_owned(),
            filter: args.log_filter(),
            tracing: args.tracing,
        }) {
            Ok(guard) => {
                tracing::info!(
                    otlp = guard.exporting(),
                    "logging initialised; OTLP trace export {}",
                    if guard.exporting() {
                        "on"
                    } else {
                        "off (set OTEL_EXPORTER_OTLP_ENDPOINT to enable)"
                    }
                );
                guard
            }
            Err(e) => {
                eprintln!("epp: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "epp failed");
            eprintln!("epp: {e:#}");
            // 1 when a task it cannot run without ended, else 2 (configuration).
            std::process::ExitCode::from(epp::supervisor::failure_exit_code(e.as_ref()))
        }
    }
}

/// `--pool-file-poll-interval` when not given.
const POOL_FILE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The pool source as validation leaves it: a file read and checked (with its label for the
/// start-up log), or a Kubernetes plan not yet started (no client, no lease).
enum Pool {
    Ready(PoolSource, String),
    Kubernetes(kubernetes::Plan),
}

/// Validates everything, binds the ports, and serves until SIGTERM/SIGINT.
async fn run(args: Args) -> Result<()> {
    let Args {
        grpc_port,
        grpc_uds_path,
        grpc_uds_mode,
        grpc_health_port,
        metrics_port,
        bind_address,
        secure_serving,
        cert_path,
        client_ca_path,
        enable_cert_reload,
        health_checking,
        ha_enable_leader_election,
        pool_name,
        pool_namespace,
        pool_group,
        endpoint_selector,
        endpoint_target_ports,
        pool_file,
        pool_file_poll_interval,
        disable_endpoint_subset_filter,
        refresh_metrics_interval,
        metrics_scrape_timeout,
        idle_scrape_interval,
        refresh_prometheus_metrics_interval,
        metrics_staleness_threshold,
        fairness_id_metric_label_limit,
        model_server_metrics_port,
        model_server_metrics_path,
        model_server_metrics_scheme,
        model_server_metrics_https_insecure_skip_verify,
        config_file,
        config_text,
        max_request_body_bytes,
        request_body_timeout,
        max_gathered_request_bytes,
        seed,
        debug_decision_header,
        debug_decisions,
        trust_model_rewrite_header,
        emit_endpoint_scores,
        response_observer,
        drain_grace_period,
        shutdown_delay,
        metrics_bearer_token,
        metrics_bearer_token_file,
        metrics_endpoint_auth,
        debug_pool,
        // Read by main(): the runtime is built and logging set up before `run`.
        worker_threads: _,
        tracing: _,
        verbosity: _,
        zap_encoder: _,
        zap_log_level: _,
        zap_devel: _,
        enable_pprof,
        lora_placement_config,
        lora_placement_interval,
        lora_placement_min_dwell,
        lora_placement_max_changes,
        lora_placement_band,
        lora_placement_min_rate,
        lora_placement_demand_half_life,
        lora_placement_max_adapters_per_endpoint,
        lora_placement_call_timeout,
        lora_placement_api_key_file,
    } = args;

    // Everything is validated before any port is bound.
    let seed = if seed == 0 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    } else {
        seed
    };
    let lora_placement = match lora_placement_config {
        Some(path) => {
            anyhow::ensure!(
                !ha_enable_leader_election,
                "--lora-placement-config with --ha-enable-leader-election: every EPP replica \
                 would place adapters on its own; run one replica with placement"
            );
            let knobs = epp::lora_placement::PlacementSettingsArgs {
                catalogue: None,
                interval: lora_placement_interval,
                min_dwell: lora_placement_min_dwell,
                max_changes: lora_placement_max_changes,
                band: lora_placement_band,
                min_rate: lora_placement_min_rate,
                demand_half_life: lora_placement_demand_half_life,
                max_adapters_per_endpoint: lora_placement_max_adapters_per_endpoint,
                call_timeout: lora_placement_call_timeout,
            };
            let mut settings = epp::lora_placement::PlacementSettings::load(&path, knobs)?;
            settings.api_key = lora_placement_api_key_file
                .as_deref()
                .map(epp::lora_placement::read_api_key)
                .transpose()?;
            let c = &settings.catalogue;
            if c.host != "localhost" || c.port != 8000 {
                tracing::warn!(host = %c.host, port = c.port, "--lora-placement-config: host and port are the sidecar's; placement calls each endpoint at its own address");
            }
            Some(settings)
        }
        None => None,
    };
    let config_text = match (config_file, config_text) {
        (Some(path), _) => std::fs::read_to_string(&path)
            .with_context(|| format!("reading --config-file {}", path.display()))?,
        (None, Some(text)) => text,
        (None, None) => {
            tracing::info!(
                "no --config-file or --config-text: running the cost-model profile \
                 (pass the reference's default as a file to run that instead)"
            );
            config::UNCONFIGURED_PROFILE.to_owned()
        }
    };
    let loaded = config::load(&config_text, seed).context("loading the EndpointPickerConfig")?;
    epp::lora_placement::check_profiles(&loaded, lora_placement.is_some())
        .map_err(|e| anyhow::anyhow!("LoRA placement: {e}"))?;
    if max_gathered_request_bytes < max_request_body_bytes {
        bail!(
            "--max-gathered-request-bytes={max_gathered_request_bytes} is below \
             --max-request-body-bytes={max_request_body_bytes}: a body of the largest size \
             accepted could never be gathered"
        );
    }
    if let Some(limit) = epp::memory_caps::container_limit() {
        let caps = epp::memory_caps::MemoryCaps {
            gathered_request_bytes: max_gathered_request_bytes as u64,
            held_response_bytes: ext_proc::stream::DEFAULT_HELD_RESPONSE_BYTES as u64,
            flow_control: epp::memory_caps::FlowBound::of(loaded.flow_control.as_ref()),
        };
        if let Some(warning) = caps.warning(limit) {
            tracing::warn!("{warning}");
        }
    }
    if debug_decisions > 0 && !debug_pool {
        bail!(
            "--debug-decisions={debug_decisions} records decisions for /debug/pool: add --debug-pool"
        );
    }
    // Checked here rather than by clap, which counts the environment variable even when
    // empty and names only the flag.
    if metrics_bearer_token_file.is_some() && !metrics_bearer_token.is_empty() {
        bail!(
            "--metrics-bearer-token-file and --metrics-bearer-token (or SWITCHYARD_METRICS_TOKEN, \
             set in the environment) both give the metrics token: keep one"
        );
    }
    let static_token = match metrics_bearer_token_file {
        Some(path) => {
            Some(epp::admin::read_static_metrics_token(&path).map_err(anyhow::Error::msg)?)
        }
        None if metrics_bearer_token.is_empty() => None,
        None => Some(
            epp::admin::static_metrics_token(
                &metrics_bearer_token,
                "--metrics-bearer-token (or SWITCHYARD_METRICS_TOKEN)",
            )
            .map_err(anyhow::Error::msg)?,
        ),
    };
    if static_token.is_some() && !metrics_endpoint_auth {
        bail!(
            "a metrics bearer token is set but --metrics-endpoint-auth=false leaves /metrics open: drop one"
        );
    }
    // The metrics-data-source plugin's parameters win over the deprecated flags, field by
    // field, as the reference (defaults < flags < plugin parameters).
    let scrape_scheme = loaded.scrape.scheme.unwrap_or(model_server_metrics_scheme);
    let skip_verify = loaded
        .scrape
        .insecure_skip_verify
        .unwrap_or(model_server_metrics_https_insecure_skip_verify);
    let scrape_tls = if scrape_scheme == MetricsScheme::Https && !skip_verify {
        ScrapeTls::system_roots().context(
            "scraping model servers over https with certificate verification \
             (insecureSkipVerify false)",
        )?
    } else {
        ScrapeTls::SkipVerify
    };
    // Reloading needs files to reload, and files need TLS. The reference ignores both flags
    // then; a flag that silently does nothing hides a mistake, so start-up stops instead.
    if enable_cert_reload && (cert_path.is_none() || !secure_serving) {
        bail!(
            "--enable-cert-reload reloads the certificate files of --cert-path: it needs \
             --cert-path and --secure-serving (the self-signed certificate has no files)"
        );
    }
    if client_ca_path.is_some() && !secure_serving {
        bail!(
            "--client-ca-path verifies the gateway's certificate on the ext_proc port's TLS: \
             --secure-serving=false serves no TLS"
        );
    }
    if client_ca_path.is_some()
        && let Some(path) = &grpc_uds_path
    {
        // Not refused: a co-located gateway on the socket is the point of both. Said, since
        // the CA's "only the gateway" does not hold there.
        tracing::warn!(
            socket = %path.display(),
            "--client-ca-path checks clients of the TCP port only: the Unix socket serves \
             plaintext to whoever can open its file (its mode is the only guard)"
        );
    }
    if cert_path.is_some() && !secure_serving {
        bail!(
            "--cert-path is the ext_proc port's TLS certificate: --secure-serving=false serves no TLS"
        );
    }
    let metrics_port_override =
        (model_server_metrics_port != 0).then_some(model_server_metrics_port);
    // An empty --pool-namespace is no namespace, as in the reference.
    let pool_namespace = pool_namespace.filter(|ns| !ns.is_empty());
    let shutdown = CancellationToken::new();
    let cut_short = CancellationToken::new();
    let local_mode = pool_file.is_some();
    let pool = match pool_file {
        Some(path) => {
            if ha_enable_leader_election {
                bail!(
                    "--ha-enable-leader-election needs Kubernetes mode (--pool-name without --pool-file)"
                );
            }
            if !endpoint_selector.is_empty() || !endpoint_target_ports.is_empty() {
                bail!(
                    "--endpoint-selector/--endpoint-target-ports cannot be combined with --pool-file"
                );
            }
            let (initial, initial_bytes) =
                file::read_bytes(&path, metrics_port_override).context("reading --pool-file")?;
            if !pool_name.is_empty() && pool_name != initial.pool.name {
                bail!(
                    "--pool-name={pool_name:?} does not match the pool file's InferencePool {:?}",
                    initial.pool.name
                );
            }
            if let Some(ns) = pool_namespace.filter(|ns| *ns != initial.pool.namespace) {
                bail!(
                    "--pool-namespace={ns:?} does not match the pool file's namespace {:?}",
                    initial.pool.namespace
                );
            }
            if pool_group != k8s::api::POOL_GROUP {
                bail!(
                    "--pool-group={pool_group:?}: pool files hold {} (v1) InferencePools",
                    k8s::api::POOL_GROUP
                );
            }
            let label = format!(
                "{} (file, {} endpoints)",
                initial.pool.name,
                initial.pool.endpoints.len()
            );
            let source = PoolSource::File {
                path,
                poll_interval: pool_file_poll_interval.unwrap_or(POOL_FILE_POLL_INTERVAL),
                metrics_port: metrics_port_override,
                initial: Box::new(initial),
                initial_bytes,
            };
            Pool::Ready(source, label)
        }
        None => {
            if pool_file_poll_interval.is_some() {
                bail!(
                    "--pool-file-poll-interval is how often --pool-file is read: add --pool-file"
                );
            }
            // As the reference's resolvePoolNamespace: the flag, else $NAMESPACE (the pod's
            // namespace, from the downward API), else "default".
            let pool_namespace = pool_namespace
                .or_else(|| std::env::var("NAMESPACE").ok().filter(|ns| !ns.is_empty()))
                .unwrap_or_else(|| "default".to_owned());
            let plan = kubernetes::plan(kubernetes::Flags {
                pool_name,
                pool_namespace,
                pool_group,
                endpoint_selector,
                endpoint_target_ports,
                metrics_port: metrics_port_override,
                leader_election: ha_enable_leader_election,
            })?;
            Pool::Kubernetes(plan)
        }
    };
    // The admin port's check; `None`: TokenReview, once Kubernetes mode has its client.
    let admin_auth = match (metrics_endpoint_auth, static_token) {
        (false, _) => Some(AdminAuth::Open),
        (true, Some(token)) => Some(AdminAuth::Token(token)),
        (true, None) if local_mode => bail!(
            "--metrics-endpoint-auth (default true) needs --metrics-bearer-token or \
             --metrics-bearer-token-file in local mode; or pass --metrics-endpoint-auth=false \
             to leave /metrics open"
        ),
        (true, None) => None,
    };

    let tls = if secure_serving {
        Some(
            match cert_path {
                Some(dir) => ServerTls::from_dir(
                    &dir,
                    enable_cert_reload.then_some(tls::CERT_RELOAD_INTERVAL),
                )
                .with_context(|| format!("loading --cert-path {}", dir.display()))?,
                None => {
                    ServerTls::self_signed().context("generating the self-signed certificate")?
                }
            }
            .with_client_ca(client_ca_path.as_deref())
            .context("loading --client-ca-path")?,
        )
    } else {
        None
    };
    if let Some(threshold) = loaded.strictest_staleness
        && refresh_metrics_interval >= threshold
    {
        // Every endpoint would look stale between two scrapes: the detector would call the
        // pool saturated and shed every sheddable request.
        bail!(
            "--refresh-metrics-interval={refresh_metrics_interval:?} is not below the saturation \
             detector's metricsStalenessThreshold ({threshold:?}): scrape more often, or raise the \
             threshold in the config's utilization-detector"
        );
    }
    let mut scrape = ScrapeConfig {
        interval: refresh_metrics_interval,
        timeout: metrics_scrape_timeout,
        scheme: scrape_scheme,
        tls: scrape_tls,
        path: model_server_metrics_path,
        engine_label_key: loaded.scrape.engine_label_key.clone(),
        default_engine: loaded.scrape.default_engine.clone(),
        engines: loaded.scrape.engines.clone(),
        max_quiet_interval: idle_scrape_interval,
        // An endpoint whose values do not change is scraped less often, but always within
        // three quarters of the strictest staleness threshold (150 ms suits the default
        // 200 ms; a threshold of 100 ms once made steady endpoints look stale, and sheddable
        // requests were shed for nothing).
        max_idle_interval: loaded
            .strictest_staleness
            .map_or(DEFAULT_MAX_IDLE_INTERVAL, |t| {
                // `t - t / 4`: `t * 3` overflows for thresholds past 6e18 s.
                DEFAULT_MAX_IDLE_INTERVAL.min(t - t / 4)
            }),
        ..ScrapeConfig::default()
    };
    if let Some(path) = &loaded.scrape.path {
        scrape.path.clone_from(path);
    }

    let bind = |port: u16| SocketAddr::new(bind_address, port);
    let listeners = Listeners {
        grpc: TcpListener::bind(bind(grpc_port))
            .await
            .with_context(|| format!("binding --grpc-port {grpc_port}"))?,
        grpc_uds: match &grpc_uds_path {
            Some(path) => Some(
                server::bind_grpc_uds(path, grpc_uds_mode)
                    .with_context(|| format!("binding --grpc-uds-path {}", path.display()))?,
            ),
            None => None,
        },
        health: TcpListener::bind(bind(grpc_health_port))
            .await
            .with_context(|| format!("binding --grpc-health-port {grpc_health_port}"))?,
        metrics: TcpListener::bind(bind(metrics_port))
            .await
            .with_context(|| format!("binding --metrics-port {metrics_port}"))?,
    };
    // Only now, every check passed and every port bound, is the API server dialled; the lease
    // is competed for inside `serve`, once its own checks (TLS, tokenizer, profiles) passed.
    let (pool, pool_label, admin_auth) = match pool {
        Pool::Ready(source, label) => (
            source,
            label,
            admin_auth.context("TokenReview guards the admin port in Kubernetes mode only")?,
        ),
        Pool::Kubernetes(plan) => {
            let kube = plan.start().await?;
            let auth = admin_auth.unwrap_or_else(|| {
                AdminAuth::Kubernetes(k8s::auth::MetricsAuthorizer::new(kube.client))
            });
            (kube.source, kube.label, auth)
        }
    };
    // Not refused, as the reference's charts may run so, but said: anyone who reaches the
    // admin port can then hold the process under profiling and read its stacks.
    if matches!(admin_auth, AdminAuth::Open) && enable_pprof {
        tracing::warn!(
            "--enable-pprof (default true) with --metrics-endpoint-auth=false: anyone who \
             reaches the metrics port may take CPU profiles; pass --enable-pprof=false or \
             keep the port to Prometheus with a NetworkPolicy"
        );
    }
    // Which check guards the admin port, said once: a token set in the environment replaces
    // the TokenReview check in Kubernetes mode, and a scraper sending its ServiceAccount's
    // token then gets 401.
    tracing::info!(
        check = match &admin_auth {
            AdminAuth::Open => "none (--metrics-endpoint-auth=false)",
            AdminAuth::Token(_) => "static bearer token",
            AdminAuth::Kubernetes(_) => "TokenReview and SubjectAccessReview",
        },
        "admin port (/metrics, /debug) authentication"
    );
    tracing::info!(
        grpc = %listeners.grpc.local_addr()?,
        grpc_uds = grpc_uds_path.as_ref().map(|p| p.display().to_string()),
        health = %listeners.health.local_addr()?,
        metrics = %listeners.metrics.local_addr()?,
        tls = secure_serving,
        pool = %pool_label,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "switchyard epp starting"
    );
    // `..ServiceOptions::default()` fills the conformance-fault field, which exists only when a
    // test build of the workspace enables that feature; built alone, every field is named.
    #[allow(clippy::needless_update)]
    let settings = Settings {
        config: loaded,
        options: ServiceOptions {
            max_request_body_bytes,
            request_body_timeout,
            gathered_request_bytes: Arc::new(BodyBudget::new(max_gathered_request_bytes)),
            disable_subset_filter: disable_endpoint_subset_filter,
            decision_header: debug_decision_header,
            trust_model_rewrite_header,
            emit_endpoint_scores,
            observers: response_observer
                .then(|| Arc::new(Observers::new(observer::DEFAULT_MAX_WATCHED))),
            ..ServiceOptions::default()
        },
        debug_decisions: usize::from(debug_decisions),
        tls,
        scrape: Some(scrape),
        refresh_prometheus_interval: refresh_prometheus_metrics_interval,
        metrics_staleness: metrics_staleness_threshold,
        fairness_label_limit: fairness_id_metric_label_limit,
        pool,
        seed,
        admin_auth,
        debug_pool,
        pprof: enable_pprof,
        health_on_grpc_port: health_checking,
        drain_grace: drain_grace_period,
        shutdown_delay: ShutdownDelay {
            delay: shutdown_delay,
            cut_short: cut_short.clone(),
        },
        lora_placement,
    };
    let signals = tokio::spawn(epp::signals::cancel_on_signals(shutdown.clone(), cut_short));
    // Returns once every supervised task has ended (the lease handed back among them).
    let served = server::serve(settings, listeners, shutdown.clone()).await;
    signals.abort();
    served.map_err(anyhow::Error::from)?;
    Ok(())
}
