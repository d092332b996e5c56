//! The scheduler: profile handler → profiles (filters → weighted scorers → picker).
//!
//! Every decision can be explained: [`ProfileResult::explanation`] lists the candidates that
//! reached the scorers, each scorer's raw score and weight, the totals and the winners. Building
//! it costs allocations, so it is only filled when asked for (debug logging or the debug header).

pub mod framework;
pub mod plugins;

use std::fmt::Write as _;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::request::InferenceRequest;
pub use framework::{
    Candidate, CycleState, DataProducer, Filter, Picker, Plugin, PrefixMatch, ProfileHandler,
    ScoredCandidate, Scorer,
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
    /// Raw scores, aligned with [`Explanation::scorers`].
    pub scores: Vec<f64>,
    /// Weighted total.
    pub total: f64,
}

impl Explanation {
    /// A compact one-line rendering: `winner=a; a=4.20[q=1.00,kv=0.60,…]; b=…`, best first,
    /// at most `max_rows` rows.
    pub fn compact(&self, max_rows: usize) -> String {
        let mut rows: Vec<&ExplanationRow> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.total.total_cmp(&a.total));
        let mut out = format!("picked={}", self.picked.join(","));
        for row in rows.into_iter().take(max_rows) {
            let _ = write!(out, "; {}={:.3}[", row.endpoint, row.total);
            for (i, ((name, _), s)) in self.scorers.iter().zip(&row.scores).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{name}={s:.2}");
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

    /// Runs the data producers for a request.
    pub fn produce(
        &self,
        request: &InferenceRequest,
        candidates: &[Candidate],
        state: &mut CycleState,
    ) {
        for p in &self.producers {
            p.produce(request, candidates, state);
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
                p.pre_request(request, state, &targets);
            }
        }
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
            let next = self
                .handler
                .next_profiles(request, &self.profiles, &results);
            if next.is_empty() {
                break;
            }
            for profile in next {
                results.push(self.run_profile(
                    profile,
                    request,
                    state,
                    candidates.to_vec(),
                    explain,
                )?);
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
        mut candidates: Vec<Candidate>,
        explain: bool,
    ) -> Result<ProfileResult, ScheduleError> {
        for filter in &profile.filters {
            candidates = filter.filter(request, state, candidates);
            if candidates.is_empty() {
                return Err(ScheduleError::AllFiltered(profile.name.clone()));
            }
        }
        let n = candidates.len();
        let mut totals = vec![0.0f64; n];
        let mut scratch = vec![0.0f64; n];
        let mut per_scorer: Vec<Vec<f64>> = Vec::new();
        for (scorer, weight) in &profile.scorers {
            scratch.iter_mut().for_each(|s| *s = 0.0);
            scorer.score(request, state, &candidates, &mut scratch);
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
                    scores: per_scorer.iter().map(|v| v[i]).collect(),
                    total: totals[i],
                })
                .collect(),
            picked: Vec::new(),
        });
        let scored: Vec<ScoredCandidate> = candidates
            .into_iter()
            .zip(totals)
            .map(|(candidate, score)| ScoredCandidate { candidate, score })
            .collect();
        let targets = {
            let mut rng = self.rng.lock();
            profile.picker.pick(scored, &mut rng)
        };
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
