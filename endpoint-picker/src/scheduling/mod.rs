//! The scheduler: profile handler → profiles (filters → weighted scorers → picker).
//!
//! Every decision can be explained: [`ProfileResult::explanation`] lists the candidates that
//! reached the scorers, each scorer's raw score and weight, the totals and the winners. Building
//! it costs allocations, so it is only filled when asked for (debug logging or the debug header).

pub mod candidates;
pub mod framework;
pub mod plugins;
pub mod registry;

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::request::InferenceRequest;
pub use framework::{
    Candidate, Cost, Costs, CycleState, DataProducer, EndpointLoad, ExtensionPoint, Filter,
    INTERNAL_REQUEST_HEADERS, InFlightCounts, KV_CACHE_SOURCE_HEADER, LoadReading, PeerSources,
    Picker, Plugin, PluginObserver, PrefixMatch, ProfileHandler, Scored, ScoredCandidate, Scorer,
    TierTokens,
};

/// One scheduling profile.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Profile name (e.g. `default`, `prefill`, `decode`).
    pub name: String,
    /// Filters, run in order.
    pub filters: Vec<Arc<dyn Filter>>,
    /// Scorers with their weights.
    pub scorers: Vec<(Arc<dyn Scorer>, f64)>,
    /// The picker.
    pub picker: Arc<dyn Picker>,
}

/// The outcome of one profile.
#[derive(Debug, Clone)]
pub struct ProfileResult {
    /// The profile's name.
    pub profile: String,
    /// Chosen endpoints, primary first.
    pub targets: Vec<ScoredCandidate>,
    /// Why, when explanations were requested.
    pub explanation: Option<Explanation>,
}

/// A scheduling decision broken down.
#[derive(Debug, Clone, Default)]
pub struct Explanation {
    /// `(scorer name, weight)` in profile order.
    pub scorers: Vec<(String, f64)>,
    /// One row per candidate that reached the scorers.
    pub rows: Vec<ExplanationRow>,
    /// Names of the picked endpoints, in order.
    pub picked: Vec<String>,
}

/// One candidate's scores.
#[derive(Debug, Clone)]
pub struct ExplanationRow {
    /// Endpoint name.
    pub endpoint: String,
    /// `ip:port`, as the routing header names it.
    pub address: Arc<str>,
    /// Raw scores, aligned with [`Explanation::scorers`].
    pub scores: Vec<f64>,
    /// Weighted total.
    pub total: f64,
    /// The cost model's predicted time to first token there, milliseconds (when it ran).
    pub predicted_ttft_ms: Option<f64>,
    /// Of which loading KV blocks from the tiers, milliseconds (when the cost model ran).
    pub predicted_load_ms: Option<f64>,
}

impl Explanation {
    /// A compact one-line rendering: `winner=a; a=4.20[q=1.00,kv=0.60,…]; b=…`, best first,
    /// at most `max_rows` rows.
    pub fn compact(&self, max_rows: usize) -> String {
        let mut rows: Vec<&ExplanationRow> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.total.total_cmp(&a.total));
        let mut out = format!("picked={}; weights[", self.picked.join(","));
        for (i, (name, weight)) in self.scorers.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{name}={weight}");
        }
        out.push(']');
        for row in rows.into_iter().take(max_rows) {
            let _ = write!(out, "; {}={:.3}[", row.endpoint, row.total);
            for (i, ((name, _), s)) in self.scorers.iter().zip(&row.scores).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{name}={s:.2}");
            }
            if let Some(ttft) = row.predicted_ttft_ms {
                let _ = write!(out, ",ttft={ttft:.0}ms");
            }
            if let Some(load) = row.predicted_load_ms.filter(|l| *l > 0.0) {
                let _ = write!(out, ",load={load:.0}ms");
            }
            out.push(']');
        }
        out
    }
}

/// Why scheduling failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A profile's filters removed every candidate.
    #[error("no endpoint passed the filters of profile {0:?}")]
    AllFiltered(String),
    /// The profile handler selected nothing.
    #[error("no profile produced a result")]
    NoResult,
}

/// The whole scheduling outcome.
#[derive(Debug, Clone)]
pub struct SchedulingResult {
    /// Name of the primary profile.
    pub primary: String,
    /// Every profile that ran.
    pub results: Vec<ProfileResult>,
}

impl SchedulingResult {
    /// The primary profile's result.
    pub fn primary_result(&self) -> Option<&ProfileResult> {
        self.results.iter().find(|r| r.profile == self.primary)
    }

    /// The primary profile's targets.
    pub fn primary_targets(&self) -> &[ScoredCandidate] {
        self.primary_result()
            .map(|r| r.targets.as_slice())
            .unwrap_or_default()
    }
}

/// The scheduler. Shared by all streams; the only lock is the RNG's, held for one pick.
#[derive(Debug)]
pub struct Scheduler {
    handler: Arc<dyn ProfileHandler>,
    profiles: Vec<Profile>,
    producers: Vec<Arc<dyn DataProducer>>,
    rng: Mutex<SmallRng>,
    /// Set at most once, after construction (the binary wires its metrics in); unset, the
    /// scheduler takes no timings at all.
    observer: OnceLock<Arc<dyn PluginObserver>>,
}

impl Scheduler {
    /// Builds a scheduler. `seed` makes random choices reproducible.
    pub fn new(
        handler: Arc<dyn ProfileHandler>,
        profiles: Vec<Profile>,
        producers: Vec<Arc<dyn DataProducer>>,
        seed: u64,
    ) -> Self {
        Self {
            handler,
            profiles,
            producers,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            observer: OnceLock::new(),
        }
    }

    /// Installs the observer of plugin timings and prefix matches. Returns false when one was
    /// already installed (the first one stays).
    pub fn set_observer(&self, observer: Arc<dyn PluginObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Runs `f`, timing it for the observer when there is one.
    #[inline]
    fn timed<R>(&self, point: ExtensionPoint, plugin: &dyn Plugin, f: impl FnOnce() -> R) -> R {
        match self.observer.get() {
            None => f(),
            Some(observer) => {
                let started = std::time::Instant::now();
                let r = f();
                observer.plugin_ran(point, plugin.type_name(), plugin.name(), started.elapsed());
                r
            }
        }
    }

    /// The profiles.
    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }

    /// The data producers.
    pub fn producers(&self) -> &[Arc<dyn DataProducer>] {
        &self.producers
    }

    /// The data producers' type names, in the order they run.
    #[cfg(test)]
    pub(crate) fn producer_types(&self) -> Vec<&'static str> {
        self.producers.iter().map(|p| p.type_name()).collect()
    }

    /// Runs the data producers for a request.
    pub fn produce(
        &self,
        request: &InferenceRequest,
        candidates: &[Candidate],
        state: &mut CycleState,
    ) {
        for p in &self.producers {
            self.timed(ExtensionPoint::DataProducer, p.as_ref(), || {
                p.produce(request, candidates, state)
            });
        }
        if let (Some(observer), Some(m)) = (self.observer.get(), &state.prefix) {
            let total = m.hashes.len();
            let matched = m.matched.iter().copied().max().unwrap_or(0) as usize;
            // Blocks are hashed over `block_tokens × CHARS_PER_TOKEN` bytes of prompt.
            let bytes = matched
                .saturating_mul(m.block_tokens)
                .saturating_mul(crate::prefix::hash::CHARS_PER_TOKEN)
                .min(request.prompt.len());
            observer.prefix_matched(matched, total, bytes);
        }
    }

    /// Tells the producers where the request went.
    pub fn pre_request(
        &self,
        request: &InferenceRequest,
        state: &CycleState,
        result: &SchedulingResult,
    ) {
        for r in &result.results {
            let targets: Vec<Candidate> = r
                .targets
                .iter()
                .take(1)
                .map(|t| t.candidate.clone())
                .collect();
            for p in &self.producers {
                self.timed(ExtensionPoint::PreRequest, p.as_ref(), || {
                    p.pre_request(request, state, &targets)
                });
            }
            if let Some(profile) = self.profiles.iter().find(|p| p.name == r.profile) {
                for (scorer, _) in profile.scorers.iter().filter(|(s, _)| s.learns()) {
                    self.timed(ExtensionPoint::PreRequest, scorer.as_ref(), || {
                        scorer.pre_request(request, state, &targets)
                    });
                }
            }
        }
    }

    /// The upstream request headers the producers set once `result` is decided (empty for
    /// most configs: no allocation then).
    pub fn request_headers(
        &self,
        request: &InferenceRequest,
        state: &CycleState,
        result: &SchedulingResult,
    ) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        for p in &self.producers {
            p.request_headers(request, state, result, &mut headers);
        }
        headers
    }

    /// Schedules one request over `candidates`.
    pub fn schedule(
        &self,
        request: &InferenceRequest,
        state: &CycleState,
        candidates: &[Candidate],
        explain: bool,
    ) -> Result<SchedulingResult, ScheduleError> {
        let mut results: Vec<ProfileResult> = Vec::with_capacity(self.profiles.len());
        loop {
            let next = self.timed(ExtensionPoint::ProfilePicker, self.handler.as_ref(), || {
                self.handler
                    .next_profiles(request, &self.profiles, &results)
            });
            if next.is_empty() {
                break;
            }
            for profile in next {
                results.push(self.run_profile(profile, request, state, candidates, explain)?);
            }
        }
        let primary = self
            .handler
            .primary(&results)
            .ok_or(ScheduleError::NoResult)?
            .profile
            .clone();
        Ok(SchedulingResult { primary, results })
    }

    fn run_profile(
        &self,
        profile: &Profile,
        request: &InferenceRequest,
        state: &CycleState,
        all: &[Candidate],
        explain: bool,
    ) -> Result<ProfileResult, ScheduleError> {
        // Filters take and return owned lists; a profile without a filter that applies to
        // this request scores the shared list as it is, without cloning every candidate.
        let filtered: Vec<Candidate>;
        let candidates: &[Candidate] =
            if !profile.filters.iter().any(|f| f.applies_to(request, state)) {
                all
            } else {
                let mut kept = all.to_vec();
                for filter in &profile.filters {
                    if !filter.applies_to(request, state) {
                        continue;
                    }
                    kept = self.timed(ExtensionPoint::Filter, filter.as_ref(), || {
                        filter.filter(request, state, kept)
                    });
                    if kept.is_empty() {
                        return Err(ScheduleError::AllFiltered(profile.name.clone()));
                    }
                }
                filtered = kept;
                &filtered
            };
        let n = candidates.len();
        let mut totals = vec![0.0f64; n];
        let mut scratch = vec![0.0f64; n];
        let mut per_scorer: Vec<Vec<f64>> = Vec::new();
        for (scorer, weight) in &profile.scorers {
            scratch.iter_mut().for_each(|s| *s = 0.0);
            self.timed(ExtensionPoint::Scorer, scorer.as_ref(), || {
                scorer.score(request, state, candidates, &mut scratch)
            });
            for (t, s) in totals.iter_mut().zip(&scratch) {
                // Scores are clamped to [0, 1] (a buggy scorer must not dominate).
                let s = if s.is_finite() {
                    s.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                *t += s * weight;
            }
            if explain {
                per_scorer.push(
                    scratch
                        .iter()
                        .map(|s| {
                            if s.is_finite() {
                                s.clamp(0.0, 1.0)
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                );
            }
        }
        let explanation = explain.then(|| Explanation {
            scorers: profile
                .scorers
                .iter()
                .map(|(s, w)| (s.name().to_owned(), *w))
                .collect(),
            rows: candidates
                .iter()
                .enumerate()
                .map(|(i, c)| ExplanationRow {
                    endpoint: c.endpoint.spec.name.clone(),
                    address: c.endpoint.host_port.clone(),
                    predicted_ttft_ms: state
                        .costs
                        .as_ref()
                        .and_then(|costs| costs.of(&c.endpoint))
                        .map(|cost| cost.predicted.ttft * 1000.0),
                    predicted_load_ms: state
                        .costs
                        .as_ref()
                        .and_then(|costs| costs.of(&c.endpoint))
                        .map(|cost| cost.load_seconds * 1000.0),
                    scores: per_scorer.iter().map(|v| v[i]).collect(),
                    total: totals[i],
                })
                .collect(),
            picked: Vec::new(),
        });
        let scored: Vec<Scored> = totals
            .into_iter()
            .enumerate()
            .map(|(index, score)| Scored { index, score })
            .collect();
        let picked = {
            let mut rng = self.rng.lock();
            self.timed(ExtensionPoint::Picker, profile.picker.as_ref(), || {
                profile.picker.pick(scored, &mut rng)
            })
        };
        let targets: Vec<ScoredCandidate> = picked
            .into_iter()
            .filter_map(|p| {
                candidates.get(p.index).map(|c| ScoredCandidate {
                    candidate: c.clone(),
                    score: p.score,
                })
            })
            .collect();
        let explanation = explanation.map(|mut e| {
            e.picked = targets
                .iter()
                .map(|t| t.candidate.endpoint.spec.name.clone())
                .collect();
            e
        });
        Ok(ProfileResult {
            profile: profile.name.clone(),
            targets,
            explanation,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::load_default;
    use crate::datastore::{Datastore, test_util::pool};

    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<(ExtensionPoint, &'static str, String)>>,
        prefix: Mutex<Vec<(usize, usize, usize)>>,
    }

    impl PluginObserver for Recorder {
        fn plugin_ran(&self, point: ExtensionPoint, ty: &'static str, name: &str, _: Duration) {
            self.calls.lock().push((point, ty, name.to_owned()));
        }
        fn prefix_matched(&self, matched: usize, total: usize, bytes: usize) {
            self.prefix.lock().push((matched, total, bytes));
        }
    }

    /// Runs `rounds` full cycles (produce, schedule, pre-request) of one 4-block request over a
    /// pool of two, with `recorder` observing `scheduler`; returns the observed prefix matches
    /// after each round.
    fn cycles(
        scheduler: &Scheduler,
        recorder: &Recorder,
        rounds: usize,
    ) -> Vec<Vec<(usize, usize, usize)>> {
        let ds = Datastore::new();
        let snap = ds.apply(pool(2));
        let cands: Vec<_> = snap.endpoints.iter().cloned().map(Candidate::new).collect();
        let req = InferenceRequest {
            target_model: "m".into(),
            prompt: bytes::Bytes::from("p".repeat(64 * 4)),
            ..Default::default()
        };
        (0..rounds)
            .map(|_| {
                let mut state = CycleState::new(tokio::time::Instant::now());
                scheduler.produce(&req, &cands, &mut state);
                let r = scheduler.schedule(&req, &state, &cands, false).unwrap();
                scheduler.pre_request(&req, &state, &r);
                recorder.prefix.lock().clone()
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn observer_sees_every_plugin_and_the_prefix_match() {
        let c = load_default(1).unwrap();
        let recorder = Arc::new(Recorder::default());
        assert!(c.scheduler.set_observer(recorder.clone()));
        assert!(!c.scheduler.set_observer(recorder.clone()), "set once");
        for (round, prefix) in cycles(&c.scheduler, &recorder, 2).into_iter().enumerate() {
            // First lookup: nothing held; second: all 4 blocks (256 bytes) on the first pick.
            let want = if round == 0 { (0, 4, 0) } else { (4, 4, 256) };
            assert_eq!(prefix[round], want);
        }
        let calls = recorder.calls.lock().clone();
        let points: std::collections::HashSet<_> = calls.iter().map(|c| c.0).collect();
        for p in [
            ExtensionPoint::ProfilePicker,
            ExtensionPoint::Scorer,
            ExtensionPoint::Picker,
            ExtensionPoint::DataProducer,
            ExtensionPoint::PreRequest,
        ] {
            assert!(points.contains(&p), "{p:?} missing from {calls:?}");
        }
        assert!(
            calls
                .iter()
                .any(|c| c.0 == ExtensionPoint::Scorer && c.1 == "queue-scorer")
        );
        assert_eq!(
            c.scheduler.producers()[0].index_entries(),
            Some(4),
            "4 blocks recorded once"
        );
    }

    /// The cost model's `latency-slo-filter` runs only for requests with a latency objective:
    /// without one it could not remove anything, and skipping it spares a copy of every
    /// candidate.
    #[tokio::test(start_paused = true)]
    async fn a_filter_that_cannot_apply_is_not_run() {
        let c = crate::config::load(crate::config::profiles::COST_MODEL, 1).unwrap();
        let recorder = Arc::new(Recorder::default());
        assert!(c.scheduler.set_observer(recorder.clone()));
        let ds = Datastore::new();
        let snap = ds.apply(pool(2));
        let cands: Vec<_> = snap.endpoints.iter().cloned().map(Candidate::new).collect();
        let filtered = |req: &InferenceRequest| {
            recorder.calls.lock().clear();
            let mut state = CycleState::new(tokio::time::Instant::now());
            c.scheduler.produce(req, &cands, &mut state);
            let r = c.scheduler.schedule(req, &state, &cands, false).unwrap();
            assert_eq!(r.primary_targets().len(), 1);
            recorder
                .calls
                .lock()
                .iter()
                .filter(|c| c.0 == ExtensionPoint::Filter)
                .count()
        };
        let plain = InferenceRequest {
            target_model: "m".into(),
            prompt: bytes::Bytes::from("p".repeat(256)),
            ..Default::default()
        };
        assert_eq!(filtered(&plain), 0);
        let with_slo = InferenceRequest {
            slo_ttft: Some(Duration::from_millis(500)),
            ..plain.clone()
        };
        assert_eq!(filtered(&with_slo), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn learning_scorers_are_called_and_timed_after_the_decision() {
        let c = crate::config::load(crate::config::profiles::BALANCED_PREFIX, 1).unwrap();
        let recorder = Arc::new(Recorder::default());
        assert!(c.scheduler.set_observer(recorder.clone()));
        cycles(&c.scheduler, &recorder, 1);
        let pre: Vec<&'static str> = recorder
            .calls
            .lock()
            .iter()
            .filter(|c| c.0 == ExtensionPoint::PreRequest)
            .map(|c| c.1)
            .collect();
        assert_eq!(
            pre,
            vec!["approx-prefix-cache-producer", "no-hit-lru-scorer"]
        );
    }
}
