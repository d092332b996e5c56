//! One reconcile pass: what the engine lists (`GET /v1/models`) against what the config
//! declares; load what is missing, unload what must not be there, remember failures and retry
//! them with backoff.
//!
//! A pass takes `now` as an argument and does no sleeping, so that tests drive passes one by
//! one (and backoff by moving `now`) with no timers; a failure backs off from the later of
//! `now` and the clock when its call returned. The loop that calls it lives in
//! [`crate::run`].
//!
//! An adapter this syncer had loaded that the engine no longer lists means the engine lost it
//! (a restart; vLLM keeps adapters loaded at run time in memory only): it is logged, counted in
//! `lora_syncer_engine_restarts_total` and loaded again at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Adapter, LoraConfig};
use crate::engine::{Engine, EngineError};
use crate::metrics::{AdapterLabels, Metrics, StateLabels};
use crate::target::{EngineTarget, Resolved};

/// First retry delay after a failed call.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// First retry delay after the engine refused the request (4xx: a missing source, a bad
/// name), which a quick retry will not fix.
pub const PERMANENT_BACKOFF: Duration = Duration::from_secs(30);

/// Where an adapter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterState {
    /// Declared, not yet acted on.
    Pending,
    /// Listed by the engine (and declared in `ensureExist`).
    Loaded,
    /// Not listed by the engine (and declared in `ensureNotExist`).
    Unloaded,
    /// The last call failed; retried after the backoff.
    Failed,
    /// In both lists: left alone, as upstream does.
    Conflict,
}

impl AdapterState {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterState::Pending => "pending",
            AdapterState::Loaded => "loaded",
            AdapterState::Unloaded => "unloaded",
            AdapterState::Failed => "failed",
            AdapterState::Conflict => "conflict",
        }
    }
}

#[derive(Debug, Clone)]
struct Track {
    state: AdapterState,
    failures: u32,
    next_try: Option<Instant>,
    last_error: Option<String>,
    /// When this syncer's own load of it was answered (not when the engine merely listed it).
    loaded_at: Option<Instant>,
    /// Times in a row it went missing sooner than [`LOST_TOO_SOON`] after our load, with no
    /// listing in between.
    quick_losses: u32,
}

impl Default for Track {
    fn default() -> Self {
        Self {
            state: AdapterState::Pending,
            failures: 0,
            next_try: None,
            last_error: None,
            loaded_at: None,
            quick_losses: 0,
        }
    }
}

/// An adapter this syncer loaded that is missing from the engine's list sooner than this, a
/// second time in a row, is a failure (backed off), not an engine restart (loaded again at
/// once).
pub const LOST_TOO_SOON: Duration = Duration::from_secs(60);

/// What one pass saw and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// `GET /v1/models` answered.
    pub engine_available: bool,
    /// Adapters loaded by this pass.
    pub loaded: Vec<String>,
    /// Adapters unloaded by this pass.
    pub unloaded: Vec<String>,
    /// Adapters whose call failed in this pass.
    pub failed: Vec<String>,
    /// Adapters found missing after they had been loaded (loaded again in this pass, or
    /// failed).
    pub lost: Vec<String>,
    /// Adapters waiting for their backoff.
    pub waiting: Vec<String>,
    /// Ended at a call the engine did not answer; the adapters after it wait for the next
    /// pass.
    pub cut_short: bool,
}

/// The reconciler of one engine.
#[derive(Debug)]
pub struct Reconciler {
    engine: Engine,
    /// Which engine a config may have called, and with the key or not.
    target: EngineTarget,
    /// Where `engine` calls, as `target` resolved the current config.
    at: Resolved,
    config: LoraConfig,
    tracks: BTreeMap<String, Track>,
    metrics: Arc<Metrics>,
    /// The adapter whose unanswered call cut the last pass short: the next pass starts after
    /// it, so that one adapter that hangs its engine cannot keep the ones after it from ever
    /// being tried.
    cut_at: Option<String>,
}

/// The later of a pass's `now` and the clock: when a call returned, which for a call that
/// timed out is minutes after the pass began. Backing off from the pass's start would have the
/// retry due before the pass even ended (the first back-offs are shorter than a call's
/// timeout). Tests that move `now` ahead of the clock keep their `now`.
fn after_call(now: Instant) -> Instant {
    now.max(Instant::now())
}

/// `items` (in order of their ids) starting after `cut_at`, which goes last: a pass cut short
/// at an adapter resumes with the ones it did not reach.
fn resuming_after<T>(mut items: Vec<T>, id: impl Fn(&T) -> &str, cut_at: Option<&str>) -> Vec<T> {
    if let Some(cut) = cut_at {
        let first_after = items.partition_point(|item| id(item) <= cut);
        items.rotate_left(first_after);
    }
    items
}

fn backoff(failures: u32, permanent: bool) -> Duration {
    let base = if permanent {
        PERMANENT_BACKOFF
    } else {
        INITIAL_BACKOFF
    };
    let doublings = failures.saturating_sub(1).min(20);
    base.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

impl Reconciler {
    /// A reconciler for `config`, calling the engine `target` resolves for it (the pinned
    /// one, unless the target lets the config name another).
    pub fn new(target: EngineTarget, config: LoraConfig, metrics: Arc<Metrics>) -> Self {
        let at = target.resolve(&config);
        let engine = target.engine(&at);
        let mut r = Self {
            engine,
            target,
            at,
            config: LoraConfig {
                name: None,
                host: String::new(),
                port: 0,
                ensure_exist: BTreeMap::new(),
                ensure_not_exist: BTreeMap::new(),
                conflicts: BTreeSet::new(),
            },
            tracks: BTreeMap::new(),
            metrics,
            cut_at: None,
        };
        r.set_config(config);
        r
    }

    /// The engine this reconciler talks to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The state of adapter `id`, if declared.
    pub fn state(&self, id: &str) -> Option<AdapterState> {
        self.tracks.get(id).map(|t| t.state)
    }

    /// The last error of adapter `id`, if its last call failed.
    pub fn last_error(&self, id: &str) -> Option<&str> {
        self.tracks.get(id).and_then(|t| t.last_error.as_deref())
    }

    /// The earliest time a failed adapter may be retried.
    pub fn next_retry(&self) -> Option<Instant> {
        self.tracks.values().filter_map(|t| t.next_try).min()
    }

    /// Replaces the declared set: new adapters start pending (a changed source is tried again
    /// at once), dropped ones lose their state and metrics.
    pub fn set_config(&mut self, config: LoraConfig) {
        let at = self.target.resolve(&config);
        if !at.same_engine(&self.at) {
            tracing::info!(engine = %at.address(), with_key = at.with_key, "the config moved the engine");
            self.engine = self.target.engine(&at);
            // Another engine: nothing known about it.
            for id in self.tracks.keys().cloned().collect::<Vec<_>>() {
                self.set_state(&id, AdapterState::Pending);
            }
        }
        self.at = at;
        let declared: BTreeSet<&String> = config
            .ensure_exist
            .keys()
            .chain(config.ensure_not_exist.keys())
            .collect();
        let dropped: Vec<String> = self
            .tracks
            .keys()
            .filter(|id| !declared.contains(id))
            .cloned()
            .collect();
        for id in dropped {
            if let Some(t) = self.tracks.remove(&id) {
                self.metrics.state.remove(&StateLabels {
                    adapter_name: id.clone(),
                    state: t.state.as_str(),
                });
            }
            self.metrics
                .status
                .remove(&AdapterLabels { adapter_name: id });
        }
        let exist = config.ensure_exist.iter().map(|e| (e, true));
        let absent = config.ensure_not_exist.iter().map(|e| (e, false));
        for ((id, adapter), wanted) in exist.chain(absent) {
            // Moving between the lists is a change too: an unload must not wait out the
            // backoff of a failed load.
            let before = match self.config.ensure_exist.get(id) {
                Some(a) => Some((a, true)),
                None => self.config.ensure_not_exist.get(id).map(|a| (a, false)),
            };
            let changed = before != Some((adapter, wanted));
            let track = self.tracks.entry(id.clone()).or_default();
            if changed {
                // A new or edited declaration is tried at once, whatever failed before.
                track.failures = 0;
                track.next_try = None;
            }
        }
        for id in &config.conflicts {
            tracing::warn!(adapter = %id, "adapter in both ensureExist and ensureNotExist: skipped");
        }
        let conflicts = config.conflicts.clone();
        self.config = config;
        let ids: Vec<String> = self.tracks.keys().cloned().collect();
        for id in ids {
            let state = match self.tracks.get(&id).map(|t| t.state) {
                _ if conflicts.contains(&id) => AdapterState::Conflict,
                Some(AdapterState::Conflict) => AdapterState::Pending,
                Some(s) => s,
                None => AdapterState::Pending,
            };
            self.set_state(&id, state);
        }
    }

    fn set_state(&mut self, id: &str, state: AdapterState) {
        let Some(track) = self.tracks.get_mut(id) else {
            return;
        };
        let old = track.state;
        track.state = state;
        if old != state {
            self.metrics.state.remove(&StateLabels {
                adapter_name: id.to_owned(),
                state: old.as_str(),
            });
        }
        self.metrics
            .state
            .get_or_create(&StateLabels {
                adapter_name: id.to_owned(),
                state: state.as_str(),
            })
            .set(1);
        self.metrics
            .status
            .get_or_create(&AdapterLabels {
                adapter_name: id.to_owned(),
            })
            .set(i64::from(state == AdapterState::Loaded));
    }

    fn failed(&mut self, id: &str, now: Instant, error: &EngineError, report: &mut PassReport) {
        let Some(track) = self.tracks.get_mut(id) else {
            return;
        };
        track.failures = track.failures.saturating_add(1);
        let delay = backoff(track.failures, error.is_permanent());
        track.next_try = Some(after_call(now) + delay);
        track.last_error = Some(error.to_string());
        tracing::warn!(adapter = %id, %error, retry_in = ?delay, failures = track.failures, "adapter call failed");
        report.failed.push(id.to_owned());
        self.set_state(id, AdapterState::Failed);
    }

    fn succeeded(&mut self, id: &str, state: AdapterState) {
        if let Some(track) = self.tracks.get_mut(id) {
            track.failures = 0;
            track.next_try = None;
            track.last_error = None;
        }
        self.set_state(id, state);
    }

    fn may_try(&self, id: &str, now: Instant) -> bool {
        self.tracks
            .get(id)
            .and_then(|t| t.next_try)
            .is_none_or(|at| at <= now)
    }

    /// A call the engine did not answer (refused, reset, timed out) ends the pass: the next
    /// calls would most likely wait as long, and an engine that lists its adapters but hangs
    /// on loads would otherwise hold a pass for a call timeout per adapter (hours at a
    /// thousand), while config changes wait for the pass to end.
    fn stops_the_pass(error: &EngineError) -> bool {
        matches!(error, EngineError::Unavailable(_))
    }

    fn cut_short(&mut self, mut report: PassReport, at: &str) -> PassReport {
        report.cut_short = true;
        self.cut_at = Some(at.to_owned());
        Metrics::result(&self.metrics.reconciles, "engine_unavailable");
        report
    }

    /// One pass at time `now`: unloads, then loads; ended early by a call the engine does not
    /// answer.
    pub async fn pass(&mut self, now: Instant) -> PassReport {
        let mut report = PassReport::default();
        let listed = match self.engine.models().await {
            Ok(m) => m,
            Err(error) => {
                tracing::info!(%error, engine = %self.engine.url(), "engine not answering /v1/models; nothing reconciled");
                Metrics::result(&self.metrics.reconciles, "engine_unavailable");
                return report;
            }
        };
        report.engine_available = true;
        // Unloads first: pulling an adapter (a bad one, say) must not wait behind loads.
        // Read, not taken: a pass dropped part-way (a config change, shutdown) leaves it for
        // the next; a pass that ends clears or replaces it.
        let cut_at = self.cut_at.clone();
        let unwanted: Vec<String> = self
            .config
            .ensure_not_exist
            .keys()
            .filter(|id| !self.config.conflicts.contains(*id))
            .cloned()
            .collect();
        let unwanted = resuming_after(unwanted, |id| id, cut_at.as_deref());
        for id in unwanted {
            if !listed.contains(&id) {
                self.succeeded(&id, AdapterState::Unloaded);
                continue;
            }
            if !self.may_try(&id, now) {
                report.waiting.push(id);
                continue;
            }
            match self.engine.unload(&id).await {
                Ok(()) => {
                    self.metrics.operation("unload", true);
                    tracing::info!(adapter = %id, "adapter unloaded");
                    report.unloaded.push(id.clone());
                    self.succeeded(&id, AdapterState::Unloaded);
                }
                Err(error) => {
                    self.metrics.operation("unload", false);
                    self.failed(&id, now, &error, &mut report);
                    if Self::stops_the_pass(&error) {
                        return self.cut_short(report, &id);
                    }
                }
            }
        }
        let wanted: Vec<Adapter> = self
            .config
            .ensure_exist
            .values()
            .filter(|a| !self.config.conflicts.contains(&a.id))
            .cloned()
            .collect();
        let wanted = resuming_after(wanted, |a| &a.id, cut_at.as_deref());
        let mut lost_any = false;
        let mut cut_by = None;
        for adapter in wanted {
            let id = adapter.id.as_str();
            if listed.contains(id) {
                if self.state(id) != Some(AdapterState::Loaded) {
                    tracing::info!(adapter = %id, "adapter loaded on the engine");
                }
                if let Some(t) = self.tracks.get_mut(id) {
                    t.quick_losses = 0;
                }
                self.succeeded(id, AdapterState::Loaded);
                continue;
            }
            if self.state(id) == Some(AdapterState::Loaded) {
                report.lost.push(id.to_owned());
                let quick = self.tracks.get_mut(id).and_then(|t| {
                    let soon = t
                        .loaded_at
                        .is_some_and(|at| now.saturating_duration_since(at) < LOST_TOO_SOON);
                    t.quick_losses = if soon { t.quick_losses + 1 } else { 0 };
                    (t.quick_losses > 1).then(|| {
                        t.failures = t.quick_losses - 1;
                    })
                });
                if quick.is_some() {
                    // Gone again right after our load, never listed in between: an engine that
                    // answers loads and does not keep them, not a restart. Loading it every
                    // pass would not help; a failure, backed off (doubling with each).
                    let error = EngineError::Status {
                        status: 200,
                        message: "the engine answered the load but does not list the adapter"
                            .into(),
                    };
                    self.failed(id, now, &error, &mut report);
                    continue;
                }
                // Counted as found: a pass dropped during the reload would not count it later
                // (the adapter is no longer `Loaded`). Once a pass, however many were lost.
                if !lost_any {
                    self.metrics.engine_restarts.inc();
                }
                lost_any = true;
                tracing::warn!(adapter = %id, "loaded adapter missing from the engine (restarted?); loading it again");
                if let Some(t) = self.tracks.get_mut(id) {
                    t.next_try = None;
                    t.failures = 0;
                }
                self.set_state(id, AdapterState::Pending);
            }
            if !self.may_try(id, now) {
                report.waiting.push(id.to_owned());
                continue;
            }
            match self.engine.load(&adapter).await {
                Ok(()) => {
                    self.metrics.operation("load", true);
                    tracing::info!(adapter = %id, source = %adapter.source, "adapter loaded");
                    report.loaded.push(id.to_owned());
                    self.succeeded(id, AdapterState::Loaded);
                    if let Some(t) = self.tracks.get_mut(id) {
                        t.loaded_at = Some(after_call(now));
                    }
                }
                Err(error) => {
                    self.metrics.operation("load", false);
                    self.failed(id, now, &error, &mut report);
                    if Self::stops_the_pass(&error) {
                        cut_by = Some(adapter.id.clone());
                        break;
                    }
                }
            }
        }
        if let Some(id) = cut_by {
            return self.cut_short(report, &id);
        }
        self.cut_at = None;
        Metrics::result(&self.metrics.reconciles, "ok");
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_starts_later_for_refusals() {
        assert_eq!(backoff(1, false), Duration::from_secs(1));
        assert_eq!(backoff(2, false), Duration::from_secs(2));
        assert_eq!(backoff(5, false), Duration::from_secs(16));
        assert_eq!(backoff(30, false), MAX_BACKOFF);
        assert_eq!(backoff(1, true), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX, true), MAX_BACKOFF);
    }
}
