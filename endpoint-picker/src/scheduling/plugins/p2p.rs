//! `p2p-source-producer`: names the peer the chosen endpoint pulls the request's KV blocks
//! from, in llm-d's upstream request header `x-kv-cache-source-host-port` (the peer's
//! `ip:port` as the pool lists it), so that the engine (LMCache P2P, vLLM's offloading
//! connector with a P2P tier, through llm-d's routing sidecar) loads them instead of
//! recomputing them.
//!
//! llm-d's plugin of that name (`llm-d/llm-d-router@36c39bf`,
//! `pkg/epp/framework/plugins/requestcontrol/dataproducer/p2psource/`), with its parameters:
//!
//! ```yaml
//! - type: p2p-source-producer
//!   parameters:
//!     prefixMatchInfoProducerName: ""   # accepted: the request's one prefix match is read
//!     minCachedTokenDelta: 1            # tokens the peer must hold beyond the target, >= 1
//!     prefillProfileName: prefill       # under P/D the prefill target computes the prefix
//! ```
//!
//! Before scheduling it chooses the request's source as llm-d does: among the endpoints
//! holding, in their own tiers, within one block of the longest prefix, one drawn with weight
//! `1 / (1 + waiting queue)` at a point fixed by the request id (FNV-32a), so that the pulls of
//! a widely cached prefix spread over its holders; and the best other source, for when the
//! drawn one is the target itself. The shared store never counts (every endpoint reads it
//! itself); unlike llm-d, which counts only a source's CPU tier (its connector serves pulls
//! from there), a source's GPU and CPU tiers both count, as the tiers contract says.
//!
//! The cost model (`ttft-cost-producer`, which runs after this producer) charges the pull to
//! each candidate, at its `peerLoadGBps`, when the peer holds `minCachedTokenDelta` tokens more
//! than the candidate and pulling is cheaper than recomputing. After the decision the header
//! is set exactly when the chosen endpoint's prediction pulled from that peer, so the choice
//! and the header agree; without a cost model, whenever the delta is reached (llm-d's rule).
//! A client's copy of the header is always removed
//! ([`crate::scheduling::INTERNAL_REQUEST_HEADERS`]).

use std::sync::Arc;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::config::params::Params;
use crate::datastore::Endpoint;
use crate::request::InferenceRequest;
use crate::scheduling::framework::{
    Candidate, CycleState, DataProducer, KV_CACHE_SOURCE_HEADER, PeerSources, Plugin,
};
use crate::scheduling::{ProfileResult, SchedulingResult};

/// llm-d's default `minCachedTokenDelta`.
pub const DEFAULT_MIN_CACHED_TOKEN_DELTA: u64 = 1;
/// llm-d's default `prefillProfileName`.
pub const DEFAULT_PREFILL_PROFILE: &str = "prefill";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct P2pYaml {
    prefix_match_info_producer_name: Option<String>,
    min_cached_token_delta: Option<i64>,
    prefill_profile_name: Option<String>,
}

/// `p2p-source-producer`.
#[derive(Debug)]
pub struct P2pSourceProducer {
    /// Instance name.
    pub name: String,
    /// `minCachedTokenDelta`.
    pub min_delta_tokens: u64,
    /// `prefillProfileName`.
    pub prefill_profile: String,
}

impl Default for P2pSourceProducer {
    fn default() -> Self {
        Self {
            name: "p2p-source-producer".into(),
            min_delta_tokens: DEFAULT_MIN_CACHED_TOKEN_DELTA,
            prefill_profile: DEFAULT_PREFILL_PROFILE.into(),
        }
    }
}

impl P2pSourceProducer {
    /// Builds from llm-d's parameters.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: P2pYaml = p.decode()?;
        let mut out = Self {
            name: p.name(),
            ..Self::default()
        };
        if let Some(d) = y.min_cached_token_delta {
            if d < 1 {
                return Err(p.invalid("minCachedTokenDelta", "must be >= 1"));
            }
            out.min_delta_tokens = d as u64;
        }
        if let Some(name) = y.prefill_profile_name.filter(|n| !n.is_empty()) {
            out.prefill_profile = name;
        }
        if y.prefix_match_info_producer_name
            .is_some_and(|n| !n.is_empty())
        {
            p.warn(
                "prefixMatchInfoProducerName has no effect: a request has one prefix match \
                 here (the precise index's where its events are trusted, else the \
                 approximate one's)",
            );
        }
        Ok(out)
    }

    /// The endpoint that computes the request's prefix: the prefill profile's target under
    /// P/D, else the primary profile's.
    fn computing<'r>(&self, result: &'r SchedulingResult) -> Option<&'r Arc<Endpoint>> {
        let has_target = |r: &&ProfileResult| !r.targets.is_empty();
        result
            .results
            .iter()
            .filter(has_target)
            .find(|r| r.profile == self.prefill_profile)
            .or_else(|| result.primary_result().filter(has_target))
            .and_then(|r| r.targets.first())
            .map(|t| &t.candidate.endpoint)
    }
}

impl Plugin for P2pSourceProducer {
    fn type_name(&self) -> &'static str {
        "p2p-source-producer"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Prompt tokens a peer could pull from `endpoint`: its own tiers' leading run. From the
/// approximate index only when the precise one did not look the request up (not configured,
/// no token ids, a salted request): where it did, an endpoint whose stream is not trusted is
/// no source (`PreciseMatch::source_tokens`).
fn source_tokens(state: &CycleState, endpoint: &Endpoint) -> u64 {
    match &state.precise {
        Some(m) => m.source_tokens(endpoint),
        None => state
            .prefix
            .as_ref()
            .map_or(0, |p| p.matched_tokens(endpoint)),
    }
}

/// Maps a request id onto `[0, 1)`: the same request always draws the same source.
fn spread_fraction(request_id: &str) -> f64 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in request_id.as_bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    f64::from(h) / 4_294_967_296.0
}

impl DataProducer for P2pSourceProducer {
    fn produce(
        &self,
        request: &InferenceRequest,
        candidates: &[Candidate],
        state: &mut CycleState,
    ) {
        let block = match (&state.precise, &state.prefix) {
            (Some(m), _) => m.block_tokens as u64,
            (None, Some(p)) => p.block_tokens as u64,
            (None, None) => 0,
        };
        let mut sources = PeerSources {
            min_delta_tokens: self.min_delta_tokens,
            ..PeerSources::default()
        };
        // Three passes over the candidates, no allocation: the longest run; the band's total
        // weight; the draw.
        let max = candidates
            .iter()
            .map(|c| source_tokens(state, &c.endpoint))
            .max()
            .unwrap_or(0);
        if max > 0 {
            let weight = |c: &Candidate| 1.0 / (1.0 + c.metrics.waiting_queue_size as f64);
            let in_band = |tokens: u64| tokens > 0 && tokens + block >= max;
            let total: f64 = candidates
                .iter()
                .filter(|c| in_band(source_tokens(state, &c.endpoint)))
                .map(weight)
                .sum();
            let mut target = spread_fraction(&request.request_id) * total;
            let mut drawn = None;
            for c in candidates {
                let tokens = source_tokens(state, &c.endpoint);
                if !in_band(tokens) {
                    continue;
                }
                drawn = Some((c, tokens));
                let w = weight(c);
                if target < w {
                    break;
                }
                target -= w;
            }
            if let Some((best, tokens)) = drawn {
                sources.second = candidates
                    .iter()
                    .filter(|c| c.endpoint.id != best.endpoint.id)
                    .map(|c| (c, source_tokens(state, &c.endpoint)))
                    .filter(|(_, t)| *t > 0)
                    .max_by_key(|(_, t)| *t)
                    .map(|(c, t)| (c.endpoint.clone(), t));
                sources.best = Some((best.endpoint.clone(), tokens));
            }
        }
        state.p2p = Some(sources);
    }

    fn request_headers(
        &self,
        _request: &InferenceRequest,
        state: &CycleState,
        result: &SchedulingResult,
        headers: &mut Vec<(&'static str, String)>,
    ) {
        let (Some(sources), Some(target)) = (&state.p2p, self.computing(result)) else {
            return;
        };
        let peer = match state.costs.as_ref().and_then(|c| c.of(target)) {
            // The prediction that chose the target decided whether it pulls.
            Some(cost) => cost.peer.and_then(|id| {
                sources
                    .source_for(target.id)
                    .filter(|(peer, _)| peer.id == id)
                    .map(|(peer, _)| peer)
            }),
            None => sources
                .extra_for(target.id, state.cached_tokens(target))
                .map(|(peer, _)| peer),
        };
        if let Some(peer) = peer {
            headers.push((KV_CACHE_SOURCE_HEADER, peer.host_port.to_string()));
        }
    }
}

#[cfg(test)]
mod tests;
