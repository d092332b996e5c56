//! Process signals, shared by the workspace's binaries (`epp`, `bbr`, `lora-syncer`).

use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on SIGTERM (Kubernetes) or SIGINT (a terminal): both start a graceful
/// drain. A second changes nothing (there is no delay to cut short); a third ends the process.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    cancel_on_signals(shutdown, CancellationToken::new()).await;
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT and `cut_short` on the second: an
/// operator who does not want to wait out the shutdown delay need not (the kubelet itself
/// sends SIGKILL after the termination grace period, not a second SIGTERM). A third ends the
/// process at once (status 128 + the signal's number, as a shell reports a killed process):
/// the handlers stay installed, so without it a third Ctrl-C during the drain did nothing.
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
        let status = tokio::select! {
            _ = term.recv() => 128 + 15,
            _ = int.recv() => 128 + 2,
        };
        tracing::warn!(
            status,
            "a third signal: exiting without finishing the drain"
        );
        std::process::exit(status);
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    }
}
