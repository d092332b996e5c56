//! The syncer's long-lived tasks, each under the supervisor: the config file's poller (which
//! publishes each new valid config) and the reconcile loop (a pass once the first valid config
//! has arrived and the engine is healthy, then on every config change, every
//! `--reconcile-trigger`, and when a failed adapter's backoff ends).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError, LoraConfig};
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::target::{EngineTarget, Resolved};

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

/// Engines named by the config that the poller remembers having warned about.
const WARNED_REMEMBERED: usize = 16;

/// The engines a config named that were warned about (refused, or followed without the key).
/// Bounded: each entry takes an edit of the file, but the process may run for months.
#[derive(Debug, Default)]
struct Warned(VecDeque<String>);

impl Warned {
    /// True the first time `named` is seen (or the first since it was forgotten).
    fn first_time(&mut self, named: &str) -> bool {
        if self.0.iter().any(|n| n == named) {
            return false;
        }
        if self.0.len() == WARNED_REMEMBERED {
            self.0.pop_front();
        }
        self.0.push_back(named.to_owned());
        true
    }
}

/// What is wrong with the engine a config named, if anything.
fn engine_warning(at: &Resolved) -> Option<&'static str> {
    if at.refused {
        Some(
            "the config names an engine other than --engine-host:--engine-port; its adapter \
             lists go to the pinned engine (set --engine-host and --engine-port to the engine, \
             or --allow-config-host to follow the file)",
        )
    } else if at.key_withheld {
        Some(
            "the config names an engine that is neither loopback nor --engine-host: it is \
             called without the API key (--api-key-to-config-host sends it)",
        )
    } else {
        None
    }
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
    /// when unchanged. A file that was unusable is read again on the next poll, and so is the
    /// one after it, even with the bytes of the last good version: the caller learns that the
    /// file is good again.
    pub async fn poll(&mut self) -> Result<Option<LoraConfig>, ConfigFileError> {
        let read = self.read().await;
        if read.is_err() {
            self.last = None;
        }
        read
    }

    async fn read(&mut self) -> Result<Option<LoraConfig>, ConfigFileError> {
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

    /// Polls every `interval` until `shutdown`, publishing each new valid config. A missing or
    /// bad file publishes nothing: before the first good version the reconcile loop waits,
    /// after it the last good config stays. Each distinct error is logged and counted once
    /// (`config_reloads{result="error"}`), and `config_valid` says whether the last read was
    /// good. A config naming an engine other than `target`'s pinned one is published all the
    /// same (the reconciler applies its lists to the pinned engine), counted as
    /// `engine_refused` instead of `ok`, and warned about once per distinct engine named; so is
    /// a followed engine (`--allow-config-host`) that is not trusted with the API key.
    pub async fn run(
        mut self,
        interval: Duration,
        publish: Arc<watch::Sender<Option<LoraConfig>>>,
        metrics: Arc<Metrics>,
        target: EngineTarget,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing: Option<String> = None;
        // Each engine is warned about once, not at every edit of a file that keeps naming it
        // (the count says how many versions did).
        let mut warned = Warned::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.poll().await {
                Ok(Some(config)) => {
                    failing = None;
                    metrics.config_valid.set(1);
                    let at = target.resolve(&config);
                    let result = if at.refused { "engine_refused" } else { "ok" };
                    Metrics::result(&metrics.config_reloads, result);
                    if let Some(message) = engine_warning(&at)
                        && warned.first_time(&at.named)
                    {
                        tracing::warn!(
                            path = %self.path.display(),
                            named = %at.named,
                            engine = %at.address(),
                            "{message}"
                        );
                    }
                    // Unchanged contents (a restarted poller reads the file again, a bad
                    // version reverted) wake no one.
                    publish.send_if_modified(|current| {
                        if current.as_ref() == Some(&config) {
                            return false;
                        }
                        tracing::info!(
                            path = %self.path.display(),
                            name = ?config.name,
                            engine = %at.address(),
                            ensure_exist = config.ensure_exist.len(),
                            ensure_not_exist = config.ensure_not_exist.len(),
                            "config loaded"
                        );
                        *current = Some(config);
                        true
                    });
                }
                Ok(None) => {}
                Err(error) => {
                    metrics.config_valid.set(0);
                    let text = error.to_string();
                    if failing.as_deref() != Some(text.as_str()) {
                        Metrics::result(&metrics.config_reloads, "error");
                        if publish.borrow().is_some() {
                            tracing::warn!(%error, "config not reloaded; keeping the last good one");
                        } else {
                            tracing::error!(
                                %error,
                                "no usable config yet; no adapter is loaded or unloaded until the file is fixed"
                            );
                        }
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

/// The reconcile loop, until `shutdown`: waits for the first config (`None` until the file
/// is valid), then for the engine's `/health`, then reconciles.
pub async fn reconcile_loop(
    mut configs: watch::Receiver<Option<LoraConfig>>,
    pacing: Pacing,
    target: EngineTarget,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let first = loop {
        let current = configs.borrow_and_update().clone();
        if let Some(config) = current {
            break config;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = configs.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    };
    let mut reconciler = Reconciler::new(target, first, metrics);
    // From the first config, not from start-up: the time the file was unusable is not the
    // engine's.
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
                // The poller never takes a config back (a bad file keeps the last good one).
                let current = configs.borrow_and_update().clone();
                if let Some(config) = current {
                    reconciler.set_config(config);
                }
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
                let current = configs.borrow_and_update().clone();
                if let Some(config) = current {
                    reconciler.set_config(config);
                }
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

    #[test]
    fn each_engine_is_warned_about_once_within_a_bounded_memory() {
        let mut warned = Warned::default();
        assert!(warned.first_time("a:1"));
        assert!(!warned.first_time("a:1"));
        for i in 0..WARNED_REMEMBERED {
            assert!(warned.first_time(&format!("b:{i}")));
        }
        assert_eq!(warned.0.len(), WARNED_REMEMBERED);
        // The oldest was forgotten to make room.
        assert!(warned.first_time("a:1"));
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
        // A bad version reverted to the last good bytes is news: the file is good again.
        std::fs::write(&path, "vLLMLoRAConfig: [").unwrap();
        assert!(file.poll().await.is_err());
        std::fs::write(&path, v1.replace("a, source", "b, source")).unwrap();
        assert_eq!(file.poll().await.unwrap(), Some(c));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            file.poll().await,
            Err(ConfigFileError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
