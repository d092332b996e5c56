//! The syncer's long-lived tasks, each under the supervisor: the config file's poller (which
//! publishes each new valid config) and the reconcile loop (a pass at start, on every config
//! change, every `--reconcile-trigger`, and when a failed adapter's backoff ends).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, LoraConfig};
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;

/// Why the config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// It could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a valid config.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ConfigError,
    },
}

/// The config file and the bytes last read.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    validate: bool,
    last: Option<Vec<u8>>,
}

impl ConfigFile {
    /// A file not read yet; `validate` is `--config-validation`.
    pub fn new(path: &Path, validate: bool) -> Self {
        Self {
            path: path.to_owned(),
            validate,
            last: None,
        }
    }

    /// Reads the file: `Ok(Some(config))` when its bytes changed and it is valid, `Ok(None)`
    /// when unchanged. A file that was invalid is read again on the next poll.
    pub async fn poll(&mut self) -> Result<Option<LoraConfig>, ConfigFileError> {
        // Capped as the parser caps it, before it is read: not a /dev/zero read into memory.
        let bytes = endpoint_picker::files::read_at_most(&self.path, config::MAX_FILE_BYTES)
            .await
            .map_err(|source| ConfigFileError::Read {
                path: self.path.clone(),
                source,
            })?;
        if self.last.as_deref() == Some(bytes.as_slice()) {
            return Ok(None);
        }
        let invalid = |source| ConfigFileError::Invalid {
            path: self.path.clone(),
            source,
        };
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| invalid(ConfigError::Parse("not UTF-8".into())))?;
        let parsed = config::parse(text, self.validate).map_err(invalid)?;
        self.last = Some(bytes);
        Ok(Some(parsed))
    }

    /// Polls every `interval` until `shutdown`, publishing each new valid config. A bad file
    /// keeps the last good config (logged once per bad version, counted).
    pub async fn run(
        mut self,
        interval: Duration,
        publish: Arc<watch::Sender<LoraConfig>>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.poll().await {
                Ok(Some(config)) => {
                    failing = None;
                    Metrics::result(&metrics.config_reloads, "ok");
                    // Unchanged contents (a restarted poller reads the file again) wake no one.
                    publish.send_if_modified(|current| {
                        if *current == config {
                            return false;
                        }
                        tracing::info!(path = %self.path.display(), name = ?config.name, "config changed");
                        *current = config;
                        true
                    });
                }
                Ok(None) => {}
                Err(error) => {
                    let text = error.to_string();
                    if failing.as_deref() != Some(text.as_str()) {
                        Metrics::result(&metrics.config_reloads, "error");
                        tracing::warn!(%error, "config not reloaded; keeping the last good one");
                        failing = Some(text);
                    }
                }
            }
        }
    }
}

/// How the reconcile loop paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// `--reconcile-trigger`: a pass at least this often.
    pub reconcile_every: Duration,
    /// `--health-check-interval`: how often `/health` is asked before the first pass.
    pub health_check_interval: Duration,
    /// `--health-check-timeout`: how long the engine may take to become healthy; after that
    /// the run ends (the supervisor counts it and starts it again after its backoff).
    pub health_check_timeout: Duration,
}

/// The reconcile loop, until `shutdown`.
pub async fn reconcile_loop(
    mut configs: watch::Receiver<LoraConfig>,
    pacing: Pacing,
    api_key: Option<Arc<str>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut reconciler =
        Reconciler::new(configs.borrow_and_update().clone(), metrics).with_api_key(api_key);
    let deadline = Instant::now() + pacing.health_check_timeout;
    loop {
        if reconciler.engine().healthy().await {
            break;
        }
        if Instant::now() >= deadline {
            tracing::error!(
                engine = %reconciler.engine().url(),
                timeout = ?pacing.health_check_timeout,
                "engine not healthy in time"
            );
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pacing.health_check_interval) => {}
        }
    }
    loop {
        // A config change or shutdown ends a pass between (or during) its calls: a pass loads
        // one adapter after another, each call up to its timeout, and an operator pulling a bad
        // adapter (`ensureNotExist`) must not wait for all of them. Dropping the pass is safe:
        // every call's outcome is recorded as it returns, and a call cut off is made again.
        let report = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = configs.changed() => {
                if changed.is_err() {
                    return;
                }
                tracing::info!("config changed during a pass; starting again with it");
                reconciler.set_config(configs.borrow_and_update().clone());
                continue;
            }
            report = reconciler.pass(Instant::now()) => report,
        };
        tracing::debug!(?report, "reconciled");
        let wake = next_wake(
            Instant::now(),
            pacing.reconcile_every,
            report.engine_available,
            reconciler.next_retry(),
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = configs.changed() => {
                if changed.is_err() {
                    return;
                }
                reconciler.set_config(configs.borrow_and_update().clone());
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// When the loop wakes after a pass at `now`. An adapter's retry may bring the next pass
/// forward, but only while the engine answers: with the engine down (restarting, refusing
/// connections) an overdue retry would otherwise make every pass start at once, a busy loop of
/// failed connects beside the engine's own pod.
fn next_wake(
    now: Instant,
    reconcile_every: Duration,
    engine_available: bool,
    next_retry: Option<Instant>,
) -> Instant {
    let regular = now + reconcile_every;
    match next_retry {
        Some(retry) if engine_available => regular.min(retry.max(now)),
        _ => regular,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overdue_retry_waits_for_the_regular_pass_while_the_engine_is_down() {
        let now = Instant::now();
        let every = Duration::from_secs(10);
        let overdue = Some(now - Duration::from_secs(1));
        assert_eq!(next_wake(now, every, false, overdue), now + every);
        // The same retry brings the pass forward once the engine answers again …
        assert_eq!(next_wake(now, every, true, overdue), now);
        let soon = Some(now + Duration::from_secs(2));
        assert_eq!(
            next_wake(now, every, true, soon),
            now + Duration::from_secs(2)
        );
        // … and nothing to retry keeps the regular interval.
        assert_eq!(next_wake(now, every, true, None), now + every);
    }

    #[tokio::test]
    async fn the_config_file_is_read_again_on_change_and_a_bad_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("lora-syncer-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("configmap.yaml");
        let v1 = "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: a, source: org/a}\n";
        std::fs::write(&path, v1).unwrap();
        let mut file = ConfigFile::new(&path, true);
        let c = file.poll().await.unwrap().unwrap();
        assert!(c.ensure_exist.contains_key("a"));
        assert!(file.poll().await.unwrap().is_none(), "unchanged");
        std::fs::write(&path, "vLLMLoRAConfig:\n  ensureExst: {}\n").unwrap();
        assert!(matches!(
            file.poll().await,
            Err(ConfigFileError::Invalid { .. })
        ));
        std::fs::write(&path, v1.replace("a, source", "b, source")).unwrap();
        let c = file.poll().await.unwrap().unwrap();
        assert!(c.ensure_exist.contains_key("b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
