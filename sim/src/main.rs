//! The `sim` binary: serves `--replicas N` simulated engines on ports `--port`..`--port+N-1`.

use anyhow::Context as _;
use clap::Parser as _;
use sim::cli::Args;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let config = sim::Config::from(&args);
    config.validate()?;
    let replicas = sim::spawn_replicas(&config, &args.host, args.port, args.replicas)
        .await
        .with_context(|| {
            format!(
                "starting {} replicas from port {}",
                args.replicas, args.port
            )
        })?;
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
