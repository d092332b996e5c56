//! `bbr`: Switchyard's body-based router.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bbr::args::Args;
use bbr::file::MappingFileSource;
use bbr::mapping::Mapping;
use bbr::server::{self, KubeSource, Listeners, MappingSource, Settings};
use bbr::stream::Options;
use clap::Parser;
use epp::admin::AdminAuth;
use epp::telemetry::{self, TelemetryOptions};
use epp::tls::ServerTls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bbr: starting the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let _telemetry = {
        let _entered = runtime.enter();
        match telemetry::init(&TelemetryOptions {
            encoder: args.zap_encoder.clone(),
            filter: args.log_filter(),
            // Request spans are the EPP's; the router exports none.
            tracing: false,
        }) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("bbr: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "bbr failed");
            eprintln!("bbr: {e:#}");
            // 1 when a task it cannot run without ended, else 2 (configuration).
            std::process::ExitCode::from(epp::supervisor::failure_exit_code(e.as_ref()))
        }
    }
}

/// `--mapping-file-poll-interval` when not given.
const MAPPING_FILE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Validates everything, binds the ports, and serves until SIGTERM/SIGINT.
async fn run(args: Args) -> Result<()> {
    let Args {
        grpc_port,
        grpc_health_port,
        metrics_port,
        bind_address,
        streaming,
        secure_serving,
        cert_path,
        client_ca_path,
        mapping_file,
        mapping_file_poll_interval,
        configmap_namespace,
        max_request_body_bytes,
        max_gathered_request_bytes,
        request_body_timeout,
        list_models,
        metrics_endpoint_auth,
        metrics_bearer_token_file,
        drain_grace_period,
        shutdown_delay,
        // Read by main() before the runtime starts.
        verbosity: _,
        zap_encoder: _,
    } = args;
    // Port 0 (the OS chooses) may repeat; a fixed port may not.
    let fixed: Vec<u16> = [grpc_port, grpc_health_port, metrics_port]
        .into_iter()
        .filter(|p| *p != 0)
        .collect();
    if fixed
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        < fixed.len()
    {
        bail!(
            "--grpc-port ({grpc_port}), --grpc-health-port ({grpc_health_port}) and \
             --metrics-port ({metrics_port}) must all differ"
        );
    }
    // BUFFERED mode gets the whole body in one gRPC message, which the server refuses past
    // its message cap: a larger limit would never answer 413, only break the stream.
    let message_cap = epp::server::MAX_GRPC_MESSAGE - 64 * 1024;
    if !streaming && max_request_body_bytes > message_cap {
        bail!(
            "--max-request-body-bytes={max_request_body_bytes} is over what one gRPC message \
             carries in BUFFERED mode ({message_cap}): lower it, or add --streaming"
        );
    }
    if max_gathered_request_bytes < max_request_body_bytes {
        bail!(
            "--max-gathered-request-bytes={max_gathered_request_bytes} is below \
             --max-request-body-bytes={max_request_body_bytes}: a body of the largest size \
             accepted could never be gathered"
        );
    }
    if client_ca_path.is_some() && !secure_serving {
        bail!(
            "--client-ca-path verifies the gateway's certificate on the ext_proc port's TLS: \
             --secure-serving=false serves no TLS"
        );
    }
    if cert_path.is_some() && !secure_serving {
        bail!(
            "--cert-path is the ext_proc port's TLS certificate: --secure-serving=false serves no TLS"
        );
    }
    let token = match &metrics_bearer_token_file {
        Some(path) => {
            let t = epp::admin::read_static_metrics_token(path).map_err(anyhow::Error::msg)?;
            if !metrics_endpoint_auth {
                bail!(
                    "a metrics bearer token is set but --metrics-endpoint-auth=false leaves /metrics open: drop one"
                );
            }
            Some(t)
        }
        None => None,
    };
    let mapping = Mapping::new();
    let mut client = None;
    let source = match mapping_file {
        Some(path) => {
            if configmap_namespace.is_some() {
                bail!(
                    "--configmap-namespace is Kubernetes mode: it cannot be combined with --mapping-file"
                );
            }
            // The first read must succeed: a router that starts without its mapping would
            // send every adapter to no route.
            MappingFileSource::new(&path)
                .poll(&mapping)
                .await
                .context("reading --mapping-file")?;
            MappingSource::File {
                path,
                poll_interval: mapping_file_poll_interval.unwrap_or(MAPPING_FILE_POLL_INTERVAL),
            }
        }
        None => {
            if mapping_file_poll_interval.is_some() {
                bail!(
                    "--mapping-file-poll-interval is how often --mapping-file is read: add --mapping-file"
                );
            }
            let namespace = configmap_namespace
                .or_else(|| std::env::var("NAMESPACE").ok())
                .filter(|ns| !ns.is_empty());
            let c = k8s::client()
                .await
                .context("Kubernetes mode (no --mapping-file): connecting to the API server")?;
            client = Some(c.clone());
            let ns = namespace.as_deref();
            MappingSource::Kubernetes(Box::new(KubeSource {
                configmaps: bbr::kube::api(c.clone(), ns),
                httproutes: bbr::routes::api(c.clone(), ns),
                pools: bbr::routes::api(c, ns),
            }))
        }
    };
    let admin_auth = match (metrics_endpoint_auth, token, client) {
        (false, _, _) => AdminAuth::Open,
        (true, Some(token), _) => AdminAuth::Token(token),
        (true, None, Some(client)) => {
            AdminAuth::Kubernetes(k8s::auth::MetricsAuthorizer::new(client))
        }
        (true, None, None) => bail!(
            "--metrics-endpoint-auth (default true) needs --metrics-bearer-token-file in file \
             mode; or pass --metrics-endpoint-auth=false to leave /metrics open"
        ),
    };
    let tls = if secure_serving {
        Some(
            match cert_path {
                Some(dir) => ServerTls::from_dir(&dir, None)
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
    let bind = |port: u16| SocketAddr::new(bind_address, port);
    let listeners = Listeners {
        grpc: TcpListener::bind(bind(grpc_port))
            .await
            .with_context(|| format!("binding --grpc-port {grpc_port}"))?,
        health: TcpListener::bind(bind(grpc_health_port))
            .await
            .with_context(|| format!("binding --grpc-health-port {grpc_health_port}"))?,
        metrics: TcpListener::bind(bind(metrics_port))
            .await
            .with_context(|| format!("binding --metrics-port {metrics_port}"))?,
    };
    tracing::info!(
        grpc = %listeners.grpc.local_addr()?,
        health = %listeners.health.local_addr()?,
        metrics = %listeners.metrics.local_addr()?,
        tls = secure_serving,
        streaming,
        source = ?source,
        "switchyard bbr starting"
    );
    let shutdown = CancellationToken::new();
    let cut_short = CancellationToken::new();
    let settings = Settings {
        options: Options {
            streaming,
            max_request_body_bytes,
            list_models,
            gathered_request_bytes: std::sync::Arc::new(ext_proc::body_budget::BodyBudget::new(
                max_gathered_request_bytes,
            )),
            request_body_timeout,
        },
        mapping,
        source,
        tls,
        admin_auth,
        drain_grace: drain_grace_period,
        shutdown_delay: epp::server::ShutdownDelay {
            delay: shutdown_delay,
            cut_short: cut_short.clone(),
        },
    };
    let signals = tokio::spawn(epp::signals::cancel_on_signals(shutdown.clone(), cut_short));
    let served = server::serve(settings, listeners, shutdown).await;
    signals.abort();
    served.map_err(anyhow::Error::from)?;
    Ok(())
}
