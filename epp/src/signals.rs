//! Process signals, shared by the workspace's binaries (`epp`, `bbr`, `lora-syncer`).

use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on SIGTERM (Kubernetes) or SIGINT (a terminal): both start a graceful
/// drain.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    cancel_on_signals(shutdown, CancellationToken::new()).await;
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT and `cut_short` on the second: an
/// operator who does not want to wait out the shutdown delay need not (the kubelet itself
/// sends SIGKILL after the termination grace period, not a second SIGTERM).
pub async fn cancel_on_signals(shutdown: CancellationToken, cut_short: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        for token in [shutdown, cut_short] {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            token.cancel();
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    }
}
