//! The `sim` binary: serves `--replicas N` simulated engines on ports `--port`..`--port+N-1`.

use anyhow::Context as _;
use clap::Parser as _;
use sim::cli::Args;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout carries only the ready lines below.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = sim::Config::from(&args);
    config.tokenizer = args.load_tokenizer().context("loading --tokenizer")?;
    config.validate()?;
    let kv_events = args.kv_events()?;
    let mut replicas = if args.ip_per_replica {
        let ips = args.replica_ips()?;
        sim::spawn_replicas_on_ips(&config, &ips, args.port)
            .await
            .with_context(|| format!("starting {} replicas from {}", args.replicas, args.host))?
    } else {
        sim::spawn_replicas(&config, &args.host, args.port, args.replicas)
            .await
            .with_context(|| {
                format!(
                    "starting {} replicas from port {}",
                    args.replicas, args.port
                )
            })?
    };
    if let Some(settings) = &kv_events {
        for (i, r) in replicas.iter_mut().enumerate() {
            if args.ip_per_replica {
                r.start_kv_events_on_own_ip(settings).await
            } else {
                r.start_kv_events(settings, i).await
            }
            .with_context(|| format!("publishing KV events of replica {i}"))?;
        }
    }
    announce(&replicas);
    tracing::info!(
        replicas = replicas.len(),
        first_port = args.port,
        model = %config.model,
        "simulator ready"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    for r in replicas {
        r.shutdown().await;
    }
    Ok(())
}

/// Prints one `<pod> http://<addr>` line per replica on stdout, then a blank line: scripts and
/// tests wait for it (and learn the ports when `--port 0` asked for ephemeral ones).
#[allow(clippy::print_stdout)] // stdout is this binary's interface for readiness
fn announce(replicas: &[sim::ReplicaHandle]) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for r in replicas {
        let _ = writeln!(out, "{} {}", r.pod_name(), r.url());
    }
    let _ = writeln!(out);
    let _ = out.flush();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
