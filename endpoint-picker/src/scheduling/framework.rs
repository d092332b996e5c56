//! The plugin contracts of the scheduler, with the reference EPP's shape: a profile handler
//! chooses profiles; a profile runs filters (sequentially), then weighted scorers (each score
//! in `[0, 1]`), then a picker. Data producers compute per-request data before scheduling and
//! learn the outcome afterwards (the prefix index is one).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use tokio::time::Instant;

use crate::cost::{Calibration, Prediction};
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

/// What this EPP has sent one endpoint and not seen finish. Unlike scraped metrics it is never
/// stale: it counts the requests sent since the last scrape too, the moment they are routed.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    /// Requests in flight.
    pub requests: AtomicU64,
    /// Of those, requests that have not produced their first token yet.
    pub prefilling: AtomicU64,
    /// Their uncached prompt tokens (estimated when routed).
    pub prefill_tokens: AtomicU64,
    /// How far the cost model's TTFTs are from those observed on this endpoint.
    pub calibration: Calibration,
    /// When the latest requests were routed here: how many came after a scrape, which the
    /// engine's waiting count cannot include yet.
    recent: parking_lot::Mutex<RecentRoutings>,
}

/// The times of the latest requests routed to an endpoint, newest last; older ones fall off.
#[derive(Debug, Clone)]
pub struct RecentRoutings {
    at: [Option<Instant>; RecentRoutings::CAP],
    /// Where the next one goes.
    next: usize,
}

impl Default for RecentRoutings {
    fn default() -> Self {
        Self {
            at: [None; Self::CAP],
            next: 0,
        }
    }
}

impl RecentRoutings {
    /// How many are kept: past this many requests since one scrape an endpoint is far over
    /// any sensible `queueDepthThreshold` anyway.
    pub const CAP: usize = 64;

    fn push(&mut self, at: Instant) {
        // Kept in order: a routing whose time was read before another's but stored after it
        // is stored at the other's time, so that `since` can stop at the first older one.
        let newest = self.at[(self.next + Self::CAP - 1) % Self::CAP];
        let at = newest.map_or(at, |newest| newest.max(at));
        self.at[self.next] = Some(at);
        self.next = (self.next + 1) % Self::CAP;
    }

    /// How many at or after `since` (every one kept without it), newest first until the first
    /// that is not: routing times only grow.
    fn since(&self, since: Option<Instant>) -> u64 {
        let mut n = 0;
        for k in 1..=Self::CAP {
            let i = (self.next + Self::CAP - k) % Self::CAP;
            match (self.at[i], since) {
                (Some(at), Some(since)) if at >= since => n += 1,
                (Some(_), None) => n += 1,
                _ => break,
            }
        }
        n
    }
}

/// A moment's reading of an [`EndpointLoad`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReading {
    /// Requests in flight.
    pub requests: u64,
    /// Of those, requests before their first token.
    pub prefilling: u64,
    /// Their uncached prompt tokens.
    pub prefill_tokens: u64,
}

impl EndpointLoad {
    /// Notes a request routed here at `at`.
    pub fn routed(&self, at: Instant) {
        self.recent.lock().push(at);
    }

    /// Requests routed here at or after `since` (a scrape's time stamp; all of them without
    /// one), at most [`RecentRoutings::CAP`]. One routed at the very instant of the scrape may
    /// be in its count as well: counted twice rather than not at all.
    pub fn routed_since(&self, since: Option<Instant>) -> u64 {
        self.recent.lock().since(since)
    }

    /// The current values.
    pub fn read(&self) -> LoadReading {
        LoadReading {
            requests: self.requests.load(Ordering::Relaxed),
            prefilling: self.prefilling.load(Ordering::Relaxed),
            prefill_tokens: self.prefill_tokens.load(Ordering::Relaxed),
        }
    }
}

/// The director's [`EndpointLoad`]s, by endpoint id. The counters are live; a plugin reads
/// them when it runs.
#[derive(Debug, Clone, Default)]
pub struct InFlightCounts(Arc<Vec<Arc<EndpointLoad>>>);

impl InFlightCounts {
    /// A view over the director's loads.
    pub fn new(loads: Arc<Vec<Arc<EndpointLoad>>>) -> Self {
        Self(loads)
    }

    /// Requests in flight on an endpoint.
    pub fn get(&self, id: EndpointId) -> u64 {
        self.0
            .get(id.0 as usize)
            .map_or(0, |c| c.requests.load(Ordering::Relaxed))
    }

    /// The load of an endpoint (`None` before anything was routed to it).
    pub fn load(&self, id: EndpointId) -> Option<&EndpointLoad> {
        self.0.get(id.0 as usize).map(|l| &**l)
    }
}

/// Per-request data shared by the plugins of one scheduling cycle.
#[derive(Debug, Clone)]
pub struct CycleState {
    /// When the cycle started.
    pub now: Instant,
    /// The prefix-cache match, when a prefix producer ran.
    pub prefix: Option<PrefixMatch>,
    /// The precise prefix-cache match (KV-cache events), when its producer ran and the request
    /// carried token ids.
    pub precise: Option<super::plugins::precise::PreciseMatch>,
    /// The EPP's in-flight requests per endpoint (empty when the caller tracks none).
    pub in_flight: InFlightCounts,
    /// The cost model's predictions, when a cost producer ran.
    pub costs: Option<Costs>,
    /// The peers a chosen endpoint may pull KV blocks from, when `p2p-source-producer` ran
    /// (it runs before the cost producer, which charges the pull).
    pub p2p: Option<PeerSources>,
}

/// Where an endpoint would get the prompt tokens it does not compute, by tier (the tiers
/// contract: its GPU cache, its CPU and disk tiers, the store shared by the pool, a peer).
/// Each count is a leading run of the prompt, the next tier's after the previous one's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierTokens {
    /// In its GPU prefix cache: free.
    pub gpu: u64,
    /// In its own CPU tier (vLLM CPU offloading, LMCache's local CPU backend).
    pub cpu: u64,
    /// In its own disk tier.
    pub disk: u64,
    /// In the store every endpoint shares (LMCache's remote backend), not held locally.
    pub shared: u64,
    /// What a peer holds beyond all of the above, when `p2p-source-producer` ran and the peer
    /// holds at least its `minCachedTokenDelta` more.
    pub peer: u64,
    /// That peer.
    pub peer_endpoint: Option<EndpointId>,
}

impl TierTokens {
    /// Tokens the endpoint can use without a peer: its own tiers and the shared store.
    pub fn own(&self) -> u64 {
        self.gpu + self.cpu + self.disk + self.shared
    }
}

/// The peers of one request that hold its prefix, for `p2p-source-producer` and the cost
/// model. Only endpoints whose blocks can be pulled count (their own tiers, never the shared
/// store, which every endpoint reads itself).
#[derive(Debug, Clone, Default)]
pub struct PeerSources {
    /// A peer pull is worth naming only past this many more cached tokens than the target's
    /// own (llm-d's `minCachedTokenDelta`).
    pub min_delta_tokens: u64,
    /// The source chosen for this request and the prompt tokens it can serve.
    pub best: Option<(Arc<Endpoint>, u64)>,
    /// The best source other than `best` (for when `best` is the target itself).
    pub second: Option<(Arc<Endpoint>, u64)>,
}

impl PeerSources {
    /// The peer `target` would pull from and the tokens it holds, whatever the delta.
    pub fn source_for(&self, target: EndpointId) -> Option<(&Arc<Endpoint>, u64)> {
        let pick = match &self.best {
            Some((e, _)) if e.id == target => self.second.as_ref(),
            other => other.as_ref(),
        };
        pick.map(|(e, t)| (e, *t)).filter(|(e, _)| e.id != target)
    }

    /// The peer worth pulling from for a target that has `own` tokens already, with the
    /// extra tokens it brings: `None` below the minimum delta.
    pub fn extra_for(&self, target: EndpointId, own: u64) -> Option<(&Arc<Endpoint>, u64)> {
        let (peer, held) = self.source_for(target)?;
        let extra = held.saturating_sub(own);
        (extra > 0 && extra >= self.min_delta_tokens).then_some((peer, extra))
    }
}

/// What the cost model predicts for this request on each candidate, indexed by endpoint id.
#[derive(Debug, Clone, Default)]
pub struct Costs {
    /// Per endpoint id: the prediction, calibrated, and its uncorrected TTFT (what the
    /// calibration learns against), `None` for endpoints that are not candidates.
    pub by_endpoint: Vec<Option<Cost>>,
}

/// One candidate's predicted cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// The calibrated prediction.
    pub predicted: Prediction,
    /// The TTFT the uncorrected model gave, seconds.
    pub raw_ttft: f64,
    /// What this request adds to that endpoint's prefill queue, in prompt tokens: those it
    /// would compute (cached in no tier it loads from) plus its tier loads expressed as the
    /// tokens computing takes as long.
    pub uncached_tokens: u64,
    /// Seconds of KV loading from the CPU, disk, shared and peer tiers in the prediction.
    pub load_seconds: f64,
    /// The peer the prediction pulls from (the `x-kv-cache-source-host-port` to send).
    pub peer: Option<EndpointId>,
    /// What the scorer minimises, seconds (see the cost scorer).
    pub objective: f64,
}

impl Costs {
    /// The cost of an endpoint.
    pub fn of(&self, endpoint: &Endpoint) -> Option<&Cost> {
        self.by_endpoint
            .get(endpoint.id.0 as usize)
            .and_then(Option::as_ref)
    }
}

impl CycleState {
    /// Where `endpoint` would get this request's cached prompt tokens, by tier: the precise
    /// index's tiers where it trusts the endpoint's events (plus a peer when
    /// `p2p-source-producer` ran), else the approximate index's count as GPU tokens (and the
    /// shared store's run beyond it).
    pub fn tier_tokens(&self, endpoint: &Endpoint) -> TierTokens {
        let mut t = match &self.precise {
            Some(m) => m.tier_tokens(endpoint, self.prefix.as_ref()),
            None => TierTokens {
                gpu: self.cached_tokens(endpoint),
                ..TierTokens::default()
            },
        };
        if let Some((peer, extra)) = self
            .p2p
            .as_ref()
            .and_then(|p| p.extra_for(endpoint.id, t.own()))
        {
            t.peer = extra;
            t.peer_endpoint = Some(peer.id);
        }
        t
    }

    /// Prompt tokens `endpoint` is believed to cache (in any tier it reads itself, the shared
    /// store included): the precise index's count where it trusts the endpoint's events, else
    /// the approximate index's.
    pub fn cached_tokens(&self, endpoint: &Endpoint) -> u64 {
        match &self.precise {
            Some(m) => m.cached_tokens(endpoint, self.prefix.as_ref()),
            None => self
                .prefix
                .as_ref()
                .map_or(0, |p| p.matched_tokens(endpoint)),
        }
    }

    /// A fresh state.
    pub fn new(now: Instant) -> Self {
        Self {
            now,
            prefix: None,
            precise: None,
            in_flight: InFlightCounts::default(),
            costs: None,
            p2p: None,
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
    /// The prompt's estimated tokens in its first `k + 1` blocks, at `k`, when the blocks are
    /// of a JSON prompt without token ids (`cost::estimate_json_prompt_tokens_by_block`):
    /// there a block's bytes are whitespace and structure as well as text, and a match is
    /// worth the content it covers, in the units of the prompt's own estimate. Empty
    /// otherwise: a block is `block_tokens`.
    pub tokens_through: Vec<u64>,
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

    /// Prompt tokens in the first `blocks` blocks.
    pub fn tokens_of(&self, blocks: u32) -> u64 {
        match blocks.checked_sub(1) {
            None => 0,
            Some(last) => self
                .tokens_through
                .get(last as usize)
                .copied()
                .unwrap_or_else(|| u64::from(blocks).saturating_mul(self.block_tokens as u64)),
        }
    }

    /// Prompt tokens of the blocks an endpoint matched.
    pub fn matched_tokens(&self, endpoint: &Endpoint) -> u64 {
        self.tokens_of(self.matched_blocks(endpoint))
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

    /// Whether the filter can remove anything for this request (by default it can). One that
    /// cannot is not run, and a profile none of whose filters apply scores the shared
    /// candidate list instead of a copy of it.
    fn applies_to(&self, _request: &InferenceRequest, _state: &CycleState) -> bool {
        true
    }
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

    /// The scorer's response side, for scorers that write response headers (the session
    /// token of `session-affinity-scorer`).
    fn response_plugin(&self) -> Option<&dyn super::plugins::response::ResponsePlugin> {
        None
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

/// What a picker orders: a candidate's place in the profile's candidate list and its
/// weighted total. Cheap to move; only the candidates picked are cloned out of the list (at
/// 1,000 endpoints, cloning and dropping every candidate's two `Arc`s was a third of a
/// decision).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Index into the candidates the profile scored.
    pub index: usize,
    /// Σ weight × score.
    pub score: f64,
}

/// Chooses the target endpoints (first = primary, the rest = ordered fallbacks).
pub trait Picker: Plugin {
    /// Picks from the scored candidates.
    fn pick(&self, scored: Vec<Scored>, rng: &mut SmallRng) -> Vec<Scored>;
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

    /// Called once the request has been scheduled: the headers this producer sets on the
    /// upstream request (llm-d's `PreRequest` header mutations, e.g. `p2p-source-producer`).
    /// Names must be lowercase and listed in [`INTERNAL_REQUEST_HEADERS`] so that a client's
    /// copy is always removed.
    fn request_headers(
        &self,
        _request: &InferenceRequest,
        _state: &CycleState,
        _result: &super::SchedulingResult,
        _headers: &mut Vec<(&'static str, String)>,
    ) {
    }

    /// Called when the pool's membership changed.
    fn pool_changed(&self, _snapshot: &PoolSnapshot) {}

    /// Entries held in the producer's index, for producers that keep one (metrics).
    fn index_entries(&self) -> Option<usize> {
        None
    }
}

/// The upstream request headers only the EPP sets: a client's copy is removed from every
/// request, whether or not a plugin sets the header (llm-d's `InternalRoutingHeaders`, which
/// its request handler drops from the client's headers and removes unless a plugin set them:
/// `llm-d/llm-d-router@02405f3:pkg/epp/handlers/request.go`). A model server or its sidecar
/// acts on these (pulls KV from the named peer), so a client must never choose them.
pub const INTERNAL_REQUEST_HEADERS: [&str; 4] = [
    KV_CACHE_SOURCE_HEADER,
    "x-prefiller-host-port",
    "x-encoder-hosts-ports",
    "x-data-parallel-host-port",
];

/// llm-d's header naming the peer (`ip:port`, as the pool lists it) the target pulls the
/// request's KV blocks from instead of recomputing them (`p2p-source-producer`).
pub const KV_CACHE_SOURCE_HEADER: &str = "x-kv-cache-source-host-port";

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 11: a routing whose time was read before another's but stored after it must not
    /// hide the newer ones from `since`, which stops at the first older time; and the ring
    /// keeps the last [`RecentRoutings::CAP`].
    #[tokio::test(start_paused = true)]
    async fn recent_routings_stay_in_order_and_bounded() {
        let mut recent = RecentRoutings::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        recent.push(t1);
        recent.push(t0);
        assert_eq!(recent.since(Some(t1)), 2);
        assert_eq!(recent.since(Some(t1 + Duration::from_millis(1))), 0);
        assert_eq!(recent.since(None), 2);
        for _ in 0..RecentRoutings::CAP * 2 {
            recent.push(t1);
        }
        assert_eq!(recent.since(Some(t0)), RecentRoutings::CAP as u64);
    }
}
