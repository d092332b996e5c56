//! The plugin contracts of the scheduler, with the reference EPP's shape: a profile handler
//! chooses profiles; a profile runs filters (sequentially), then weighted scorers (each score
//! in `[0, 1]`), then a picker. Data producers compute per-request data before scheduling and
//! learn the outcome afterwards (the prefix index is one).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use tokio::time::Instant;

use crate::datastore::{Endpoint, EndpointId, EngineMetrics, PoolSnapshot};
use crate::request::InferenceRequest;

/// An endpoint as one scheduling cycle sees it: its metrics are loaded once per cycle.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// Its metrics at the start of the cycle.
    pub metrics: Arc<EngineMetrics>,
}

impl Candidate {
    /// Loads the endpoint's current metrics.
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        let metrics = endpoint.metrics();
        Self { endpoint, metrics }
    }
}

/// The requests this EPP has routed to each endpoint and that have not finished, by endpoint
/// id. Unlike scraped metrics it is never stale: it counts the requests sent since the last
/// scrape too. The counters are live; a scorer reads them when it scores.
#[derive(Debug, Clone, Default)]
pub struct InFlightCounts(Arc<Vec<Arc<AtomicU64>>>);

impl InFlightCounts {
    /// A view over the director's counters.
    pub fn new(counters: Arc<Vec<Arc<AtomicU64>>>) -> Self {
        Self(counters)
    }

    /// Requests in flight on an endpoint.
    pub fn get(&self, id: EndpointId) -> u64 {
        self.0
            .get(id.0 as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// Per-request data shared by the plugins of one scheduling cycle.
#[derive(Debug, Clone)]
pub struct CycleState {
    /// When the cycle started.
    pub now: Instant,
    /// The prefix-cache match, when a prefix producer ran.
    pub prefix: Option<PrefixMatch>,
    /// The EPP's in-flight requests per endpoint (empty when the caller tracks none).
    pub in_flight: InFlightCounts,
}

impl CycleState {
    /// A fresh state.
    pub fn new(now: Instant) -> Self {
        Self {
            now,
            prefix: None,
            in_flight: InFlightCounts::default(),
        }
    }
}

/// How much of a request's prefix each endpoint is believed to hold.
#[derive(Debug, Clone, Default)]
pub struct PrefixMatch {
    /// The request's block hashes.
    pub hashes: Vec<u64>,
    /// Matched leading blocks, indexed by endpoint id.
    pub matched: Vec<u32>,
    /// Tokens per block that the hashes were computed with.
    pub block_tokens: usize,
}

impl PrefixMatch {
    /// Matched fraction for an endpoint, in `[0, 1]`.
    pub fn score(&self, endpoint: &Endpoint) -> f64 {
        if self.hashes.is_empty() {
            return 0.0;
        }
        let m = self
            .matched
            .get(endpoint.id.0 as usize)
            .copied()
            .unwrap_or(0);
        // At most 1 even if `matched` says more blocks than the request has.
        (f64::from(m) / self.hashes.len() as f64).min(1.0)
    }

    /// Matched blocks for an endpoint.
    pub fn matched_blocks(&self, endpoint: &Endpoint) -> u32 {
        self.matched
            .get(endpoint.id.0 as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// What every plugin is.
pub trait Plugin: Send + Sync + std::fmt::Debug {
    /// The registered type, e.g. `queue-scorer`.
    fn type_name(&self) -> &'static str;
    /// The configured name (defaults to the type).
    fn name(&self) -> &str;
}

/// Removes candidates.
pub trait Filter: Plugin {
    /// Returns the candidates that pass.
    fn filter(
        &self,
        request: &InferenceRequest,
        state: &CycleState,
        candidates: Vec<Candidate>,
    ) -> Vec<Candidate>;
}

/// Scores candidates in `[0, 1]`; higher is better.
pub trait Scorer: Plugin {
    /// Writes one score per candidate into `scores` (same order, same length).
    fn score(
        &self,
        request: &InferenceRequest,
        state: &CycleState,
        candidates: &[Candidate],
        scores: &mut [f64],
    );

    /// Called once the request has been routed to `targets` (primary first), for scorers that
    /// learn from their own decisions (those return true from [`Scorer::learns`]).
    fn pre_request(
        &self,
        _request: &InferenceRequest,
        _state: &CycleState,
        _targets: &[Candidate],
    ) {
    }

    /// Whether [`Scorer::pre_request`] does anything: only those scorers are called (and
    /// timed as `PreRequest` plugins) after a decision.
    fn learns(&self) -> bool {
        false
    }
}

/// A candidate with its weighted total.
#[derive(Debug, Clone)]
pub struct ScoredCandidate {
    /// The candidate.
    pub candidate: Candidate,
    /// Σ weight × score.
    pub score: f64,
}

/// Chooses the target endpoints (first = primary, the rest = ordered fallbacks).
pub trait Picker: Plugin {
    /// Picks from the scored candidates.
    fn pick(&self, scored: Vec<ScoredCandidate>, rng: &mut SmallRng) -> Vec<ScoredCandidate>;
}

/// Computes per-request data before scheduling and learns the outcome afterwards.
pub trait DataProducer: Plugin {
    /// Fills `state` for this request.
    fn produce(&self, request: &InferenceRequest, candidates: &[Candidate], state: &mut CycleState);

    /// Called once the request has been routed to `targets` (primary first).
    fn pre_request(
        &self,
        _request: &InferenceRequest,
        _state: &CycleState,
        _targets: &[Candidate],
    ) {
    }

    /// Called when the pool's membership changed.
    fn pool_changed(&self, _snapshot: &PoolSnapshot) {}

    /// Entries held in the producer's index, for producers that keep one (metrics).
    fn index_entries(&self) -> Option<usize> {
        None
    }
}

/// Where in a scheduling cycle a plugin ran: the reference's `extension_point` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtensionPoint {
    /// The profile handler choosing profiles.
    ProfilePicker,
    /// A filter.
    Filter,
    /// A scorer.
    Scorer,
    /// A picker.
    Picker,
    /// A data producer computing per-request data.
    DataProducer,
    /// A data producer learning where the request went.
    PreRequest,
}

impl ExtensionPoint {
    /// The label value, as the reference spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProfilePicker => "ProfilePicker",
            Self::Filter => "Filter",
            Self::Scorer => "Scorer",
            Self::Picker => "Picker",
            Self::DataProducer => "DataProducer",
            Self::PreRequest => "PreRequest",
        }
    }
}

/// Receives timings and prefix-match outcomes from the scheduler, so that the embedding
/// binary can export them without this crate knowing about any metrics library. Called on the
/// request path: implementations must be cheap and must not block.
pub trait PluginObserver: Send + Sync + std::fmt::Debug {
    /// One plugin call took `took`.
    fn plugin_ran(
        &self,
        point: ExtensionPoint,
        plugin_type: &'static str,
        plugin_name: &str,
        took: Duration,
    );

    /// The prefix lookup of one request: the best endpoint holds `matched_blocks` of the
    /// request's `total_blocks`, about `matched_bytes` bytes of prompt.
    fn prefix_matched(&self, _matched_blocks: usize, _total_blocks: usize, _matched_bytes: usize) {}
}

/// Decides which profiles run, and which result is primary.
pub trait ProfileHandler: Plugin {
    /// Given the results so far, the names of the profiles to run next (empty = done).
    fn next_profiles<'p>(
        &self,
        request: &InferenceRequest,
        profiles: &'p [super::Profile],
        done: &[super::ProfileResult],
    ) -> Vec<&'p super::Profile>;

    /// The name of the primary profile among `results`.
    fn primary<'r>(&self, results: &'r [super::ProfileResult]) -> Option<&'r super::ProfileResult> {
        results.first()
    }
}
