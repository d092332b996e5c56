//! The cost model as plugins (see [`crate::cost`] for the model itself):
//!
//! - `ttft-cost-producer` predicts, for the request on every candidate, its time to first token
//!   and per output token, from the EPP's own load on that replica (exact and current), the
//!   engine's reported queue and batch (for traffic other EPPs sent), what the prefix index
//!   says the replica caches and in which tier (GPU, CPU, disk, the shared store, a peer named
//!   by `p2p-source-producer`: each tier's tokens cost their load time instead of their
//!   prefill, [`crate::cost::TierCosts`]), and the replica's calibration. It runs after the
//!   prefix producers and `p2p-source-producer`.
//! - `ttft-cost-scorer` scores each candidate by the cheapest objective over its own:
//!   `min / objective`, so the cheapest replica scores 1. With a tie band (`tieWithinMillis`,
//!   `tieWithinFraction`) every candidate that close to the cheapest scores 1 too, and the
//!   picker's seeded tie-break spreads the requests over them.
//! - `latency-slo-filter` keeps the candidates predicted to meet the request's
//!   `x-llm-d-slo-ttft-ms` / `x-llm-d-slo-tpot-ms`, when any does; otherwise all of them (the
//!   scorer then picks the least late).

use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::config::params::Params;
use crate::cost::{Backlog, EngineCosts, EngineSeconds, TierCosts, TierLoadRates, count_f64};
use crate::datastore::EndpointId;
use crate::request::InferenceRequest;
use crate::scheduling::{
    Candidate, Cost, Costs, CycleState, DataProducer, Filter, Plugin, Scorer, TierTokens,
};

/// Output tokens assumed for a request that names no `max_tokens` (the median completion of
/// chat traffic is a few hundred tokens).
pub const DEFAULT_OUTPUT_TOKENS: u32 = 256;
/// The eviction weight measured best in the what-if sweep (bench/RESULTS.md, "What-if": 0.5–5
/// tried; 2 gave the highest hit rate under cache pressure without costing TTFT elsewhere).
pub const DEFAULT_EVICTION_WEIGHT: f64 = 2.0;
/// Output tokens counted at most in the objective: a request asking for 100k tokens is no more
/// urgent to place on an idle batch than one asking for a few thousand.
const MAX_OBJECTIVE_OUTPUT_TOKENS: u32 = 4096;

/// `ttft-cost-producer` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProducerYaml {
    token_budget: Option<i64>,
    prefill_micros_per_token: Option<f64>,
    step_millis: Option<f64>,
    sequence_micros: Option<f64>,
    decode_weight: Option<f64>,
    eviction_weight: Option<f64>,
    prefix_home_weight: Option<f64>,
    queue_externality_weight: Option<f64>,
    holder_load_factor: Option<f64>,
    holder_min_kv_usage: Option<f64>,
    default_output_tokens: Option<i64>,
    kv_bytes_per_token: Option<i64>,
    #[serde(rename = "cpuLoadGBps")]
    cpu_load_gbps: Option<f64>,
    #[serde(rename = "diskLoadGBps")]
    disk_load_gbps: Option<f64>,
    #[serde(rename = "sharedLoadGBps")]
    shared_load_gbps: Option<f64>,
    #[serde(rename = "peerLoadGBps")]
    peer_load_gbps: Option<f64>,
}

/// Blocks that name a prefix for [`TtftCostProducer::prefix_home_weight`]: its first 512 tokens
/// at 16-token blocks, deep enough to be past a chat template's common header and into the
/// system prompt or conversation that makes the prefix, shallow enough to be shared by every
/// request that starts the same way.
const HOME_BLOCKS: usize = 32;

/// The largest `queueExternalityWeight`: at 10 a miss with ten requests queued per replica
/// already costs a hundred times its own prefill.
const MAX_QUEUE_EXTERNALITY_WEIGHT: f64 = 10.0;

/// The largest `holderLoadFactor`: past ten times the mean queue a holder is no longer a
/// place to keep anything.
const MAX_HOLDER_LOAD_FACTOR: f64 = 10.0;
/// What a non-holder is charged while `holderLoadFactor` keeps a prefix on its holders, seconds:
/// beyond any prediction, so that it loses to every holder and still ranks among the others.
const HOLDER_RULE_CHARGE: f64 = 3_600.0;

/// The fastest link a load bandwidth may claim, GB/s (beyond any NVLink or PCIe there is).
const MAX_LOAD_GBPS: f64 = 10_000.0;
/// The most KV bytes per token a model may claim (a 1 GiB token is no model's).
const MAX_KV_BYTES_PER_TOKEN: usize = 1 << 30;

/// Predicts each candidate's cost for the request into [`CycleState::costs`].
#[derive(Debug)]
pub struct TtftCostProducer {
    /// Instance name.
    pub name: String,
    /// The engine constants (priors).
    pub engine: EngineCosts,
    /// How much the decode phase counts in the objective: `objective = ttft + w · (n − 1) ·
    /// tpot` for `n` output tokens. 0 minimises TTFT alone; 1 the time to the last token.
    pub decode_weight: f64,
    /// How much evicting the replica's cached prefixes counts: the objective adds
    /// `w · kv_usage · uncached tokens · prefill time per token`.
    pub eviction_weight: f64,
    /// How much a new prefix is drawn to its home: when no candidate holds the prompt's first
    /// 32 blocks (512 tokens) in its own tiers, every candidate but the one the prefix hashes to
    /// (rendezvous hashing of those blocks' key and the endpoint's address) is charged `w ×` its
    /// prefill time of the prompt. Several EPPs, each blind to the others' just-routed requests
    /// until the engine announces the blocks, then send a new prefix to the same replica unless
    /// its queue is longer by that much, instead of computing it on several (bench
    /// `active-active`). 0 (the default) turns it off. Needs keys that every EPP computes alike:
    /// the precise index's (token ids); the approximate index's hashes serve one EPP.
    pub prefix_home_weight: f64,
    /// How much a placement's cost to the requests that will wait behind it counts, as the
    /// cluster's queues grow. The prefill a request adds to a replica (its recomputed tokens
    /// and its tier loads) and the recomputation its evictions will cause there (the eviction
    /// term) delay every request queued after them; its own predicted TTFT does not see that.
    /// The objective adds `w × queued × (added engine time + eviction term)`, where `queued` is
    /// the mean number of requests waiting for their first token per candidate (the EPP's own
    /// prefilling ones, or the engine's waiting queue when it reports more). At an idle cluster
    /// the term is 0; near saturation a miss elsewhere must beat the holder's queue by more, so
    /// prefixes are not traded for queue length just when every recomputation tips the cluster
    /// further into overload. 0 (the default) turns it off. Measured on the bench's
    /// `kv-sharing` (precise index, tiers): at 1 the hit rate rose 2 points and TTFT p90 rose at
    /// every rate, the goodput unchanged; at 3 the first rung failed (bench/RESULTS.md), so the
    /// precise router's trades of hits for queue length were worth their cost there.
    pub queue_externality_weight: f64,
    /// Consistent placement with bounded loads for prefixes someone holds: when some candidates
    /// hold the prompt's first 32 blocks (512 tokens) in their own tiers (GPU, CPU, disk) and
    /// others do not, the others are ruled out (charged an hour) unless every holder's prefill
    /// queue (the tokens queued ahead of this request there, as prefill time) exceeds this
    /// factor × the mean over all candidates plus one prefill of this prompt. A prefix then
    /// gets a second copy only where its holders are overloaded, not whenever a shorter queue
    /// elsewhere pays for recomputing it. 0 (the default) turns it off; otherwise in [1, 10].
    /// Measured on the bench's `kv-sharing` (precise index, tiers): the precise router's
    /// goodput rose from 49 to 55 req/s at 1, 1.5 and 2.5 (58 on one climb, not confirmed by a
    /// fresh bisection), its recomputed share fell from 26 % to 22–23 % and its peer pulls
    /// almost vanished (bench/RESULTS.md, "Bounded loads for prefix holders").
    pub holder_load_factor: f64,
    /// The rule of `holder_load_factor` rules out only the non-holders whose KV cache is at
    /// least this full (`kv_cache_usage`, 0–1): there a copy's blocks evict what the replica
    /// caches for others; a replica with room competes on cost as without the rule. 0 (the
    /// default) rules out every non-holder. On `shared-prefix` (caches a fifth full) the rule
    /// alone cost 66–80 % of TTFT p90 for no hit gained (bench/RESULTS.md, "What
    /// `holderLoadFactor` costs where caches have room").
    pub holder_min_kv_usage: f64,
    /// Output tokens assumed when the request names none.
    pub default_output_tokens: u32,
    /// What loading from each KV tier costs.
    pub tiers: TierCosts,
}

impl Default for TtftCostProducer {
    fn default() -> Self {
        Self {
            name: "ttft-cost-producer".into(),
            engine: EngineCosts::default(),
            decode_weight: 0.25,
            eviction_weight: DEFAULT_EVICTION_WEIGHT,
            prefix_home_weight: 0.0,
            queue_externality_weight: 0.0,
            holder_load_factor: 0.0,
            holder_min_kv_usage: 0.0,
            default_output_tokens: DEFAULT_OUTPUT_TOKENS,
            tiers: TierCosts::default(),
        }
    }
}

impl TtftCostProducer {
    /// Builds from `tokenBudget`, `prefillMicrosPerToken`, `stepMillis`, `sequenceMicros`
    /// (the engine priors), `decodeWeight` (in [0, 1]), `evictionWeight` (in [0, 100]),
    /// `prefixHomeWeight` (in [0, 10]), `queueExternalityWeight` (in [0, 10]),
    /// `holderLoadFactor` (0, or in [1, 10]), `holderMinKvUsage` (in [0, 1]; only with a
    /// `holderLoadFactor`),
    /// `defaultOutputTokens`, and the tiers: `kvBytesPerToken` (131072, in [1, 2³⁰]),
    /// `cpuLoadGBps` (25), `diskLoadGBps` (0), `sharedLoadGBps` (10), `peerLoadGBps` (10), each
    /// in [0, 10000] GB/s, 0 ignoring the tier.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: ProducerYaml = p.decode()?;
        let mut out = Self {
            name: p.name(),
            ..Self::default()
        };
        if let Some(b) = p.positive("tokenBudget", y.token_budget)? {
            out.engine.token_budget = b as u64;
        }
        // At most an hour: no engine step is longer, and a huge number once panicked the load
        // (a `Duration` overflow).
        let positive_duration = |p: &Params<'_>, name, v: Option<f64>, unit: f64| match v {
            None => Ok(None),
            Some(v) if v.is_finite() && v > 0.0 && v * unit <= 3600.0 => {
                Ok(Some(Duration::from_secs_f64(v * unit)))
            }
            Some(_) => Err(p.invalid(name, "must be a number > 0, at most an hour's worth")),
        };
        if let Some(d) =
            positive_duration(p, "prefillMicrosPerToken", y.prefill_micros_per_token, 1e-6)?
        {
            out.engine.per_token = d;
        }
        if let Some(d) = positive_duration(p, "stepMillis", y.step_millis, 1e-3)? {
            out.engine.per_step = d;
        }
        if let Some(d) = positive_duration(p, "sequenceMicros", y.sequence_micros, 1e-6)? {
            out.engine.per_sequence = d;
        }
        match y.decode_weight {
            Some(w) if !(0.0..=1.0).contains(&w) => {
                return Err(p.invalid("decodeWeight", "must be in [0, 1]"));
            }
            Some(w) => out.decode_weight = w,
            None => {}
        }
        match y.eviction_weight {
            Some(w) if !(w.is_finite() && (0.0..=100.0).contains(&w)) => {
                return Err(p.invalid("evictionWeight", "must be in [0, 100]"));
            }
            Some(w) => out.eviction_weight = w,
            None => {}
        }
        match y.prefix_home_weight {
            Some(w) if !(w.is_finite() && (0.0..=10.0).contains(&w)) => {
                return Err(p.invalid("prefixHomeWeight", "must be in [0, 10]"));
            }
            Some(w) => out.prefix_home_weight = w,
            None => {}
        }
        match y.queue_externality_weight {
            Some(w) if !(w.is_finite() && (0.0..=MAX_QUEUE_EXTERNALITY_WEIGHT).contains(&w)) => {
                return Err(p.invalid("queueExternalityWeight", "must be in [0, 10]"));
            }
            Some(w) => out.queue_externality_weight = w,
            None => {}
        }
        match y.holder_load_factor {
            Some(f)
                if !(f.is_finite()
                    && (f == 0.0 || (1.0..=MAX_HOLDER_LOAD_FACTOR).contains(&f))) =>
            {
                return Err(p.invalid("holderLoadFactor", "must be 0 (off) or in [1, 10]"));
            }
            Some(f) => out.holder_load_factor = f,
            None => {}
        }
        match y.holder_min_kv_usage {
            Some(u) if !(u.is_finite() && (0.0..=1.0).contains(&u)) => {
                return Err(p.invalid("holderMinKvUsage", "must be in [0, 1]"));
            }
            Some(_) if out.holder_load_factor == 0.0 => {
                return Err(p.invalid(
                    "holderMinKvUsage",
                    "applies to the rule of holderLoadFactor, which is off",
                ));
            }
            Some(u) => out.holder_min_kv_usage = u,
            None => {}
        }
        if let Some(n) = p.positive("defaultOutputTokens", y.default_output_tokens)? {
            out.default_output_tokens = n.min(u32::MAX as usize) as u32;
        }
        if let Some(n) = p.positive("kvBytesPerToken", y.kv_bytes_per_token)? {
            if n > MAX_KV_BYTES_PER_TOKEN {
                return Err(p.invalid("kvBytesPerToken", "at most 1073741824"));
            }
            out.tiers.kv_bytes_per_token = n as u64;
        }
        for (name, value, slot) in [
            ("cpuLoadGBps", y.cpu_load_gbps, &mut out.tiers.cpu_gbps),
            ("diskLoadGBps", y.disk_load_gbps, &mut out.tiers.disk_gbps),
            (
                "sharedLoadGBps",
                y.shared_load_gbps,
                &mut out.tiers.shared_gbps,
            ),
            ("peerLoadGBps", y.peer_load_gbps, &mut out.tiers.peer_gbps),
        ] {
            match value {
                Some(v) if !(v.is_finite() && (0.0..=MAX_LOAD_GBPS).contains(&v)) => {
                    return Err(p.invalid(name, "must be in [0, 10000] GB/s (0 ignores the tier)"));
                }
                Some(v) => *slot = v,
                None => {}
            }
        }
        Ok(out)
    }

    /// What every candidate's cost for `request` shares, computed once per decision.
    fn per_request(&self, request: &InferenceRequest, queued_per_candidate: f64) -> PerRequest {
        PerRequest {
            prompt_tokens: request.prompt_tokens(),
            output_tokens: request
                .max_tokens
                .unwrap_or(self.default_output_tokens)
                .min(MAX_OBJECTIVE_OUTPUT_TOKENS),
            engine: self.engine.in_seconds(),
            tiers: self.tiers.load_rates(),
            queued_per_candidate,
        }
    }

    /// The cost of the request on one candidate, whose [`CycleState::tier_tokens`] are `hits`.
    fn cost(
        &self,
        request: &PerRequest,
        state: &CycleState,
        candidate: &Candidate,
        hits: &TierTokens,
    ) -> (Cost, f64) {
        let PerRequest {
            prompt_tokens,
            output_tokens: output,
            engine: ref engine_costs,
            ref tiers,
            queued_per_candidate,
        } = *request;
        let endpoint = &candidate.endpoint;
        let per_token = engine_costs.per_token;
        let placed = tiers.place(prompt_tokens, hits, per_token);
        let uncached = placed.recompute;
        let load = state.in_flight.load(endpoint.id);
        let own = load.map(|l| l.read()).unwrap_or_default();
        let engine = &candidate.metrics;
        // Requests the engine holds that this EPP did not send (another EPP replica's, when
        // several route one pool). Their prompts are unknown here: each is counted at the mean
        // uncached size of this EPP's own requests still prefilling there, or else at what this
        // request would compute there. Counting each as this whole prompt (as before) made a
        // replica busy with the other EPPs' cached-prefix requests look many times costlier than
        // it was, and two EPPs at 30 req/s lost their prefix affinity (bench `active-active`).
        let foreign_waiting = engine.waiting_queue_size.saturating_sub(own.prefilling);
        // (No division when nothing foreign waits: it is the common case and a slow one.)
        let foreign_tokens = if foreign_waiting == 0 {
            0
        } else {
            own.prefill_tokens
                .checked_div(own.prefilling)
                .unwrap_or(uncached)
        };
        let backlog = Backlog {
            queued_tokens: own
                .prefill_tokens
                .saturating_add(foreign_waiting.saturating_mul(foreign_tokens)),
            decoding: (own.requests - own.prefilling.min(own.requests))
                .max(engine.running_requests.saturating_sub(own.prefilling)),
        };
        let mut raw = engine_costs.predict(backlog, uncached);
        raw.ttft += placed.load_seconds;
        let k = load.map_or(1.0, |l| l.calibration.factor());
        let queue_seconds = count_f64(backlog.queued_tokens) * per_token * k;
        let predicted = crate::cost::Prediction {
            ttft: raw.ttft * k,
            tpot: raw.tpot * k,
        };
        // The blocks this prompt brings into the GPU cache (computed or loaded) evict what the
        // replica caches for others, about as many as it is full: their recomputation later is
        // a cost of placing it here. Without it, a cold prefix goes wherever the queue is
        // shortest and copies of every prefix crowd each other out under cache pressure
        // (whatif: hit rate 36 % instead of 50 %).
        let placed_on_gpu = prompt_tokens.saturating_sub(placed.gpu);
        let fullness = engine.kv_cache_usage.clamp(0.0, 1.0);
        let mut evicted_seconds = count_f64(placed_on_gpu) * per_token;
        // Those blocks are also written through to the replica's CPU tier (vLLM's offloading
        // connector and LMCache's local backend store every block the GPU computes or loads),
        // evicting copies kept there for others, each worth what recomputing it costs beyond
        // loading it back. Charged only when the engines' events show the tier (a precise
        // match): without them a CPU copy cannot be told from none. Without this term a prefix
        // that left the GPU for the CPU tier of its replica looked almost as cheap elsewhere
        // (load ≈ recompute − 80 %, the same GPU evictions on both), so a third of the
        // requests went to replicas that held nothing and recomputed it, crowding every CPU
        // tier with copies (bench `kv-sharing`: hit rate 69 % against 95 % for the
        // approximate index, which believes the prefix is still on the GPU).
        if state.precise.is_some()
            && let Some(load) = tiers.cpu
        {
            let held = hits.gpu.saturating_add(hits.cpu).min(prompt_tokens);
            let written = prompt_tokens - held;
            evicted_seconds += count_f64(written) * (per_token - load).max(0.0);
        }
        let eviction = self.eviction_weight * fullness * evicted_seconds * k;
        // What this placement costs the requests waiting behind it there (see
        // `queue_externality_weight`): its own engine time, and the recomputation its
        // evictions will cause, once more for each request waiting per replica.
        let added_seconds = (count_f64(uncached) * per_token + placed.load_seconds) * k;
        let externality =
            self.queue_externality_weight * queued_per_candidate * (added_seconds + eviction);
        let objective = predicted.ttft
            + self.decode_weight * f64::from(output.saturating_sub(1)) * predicted.tpot
            + eviction
            + externality;
        // The load delays the prefill queue as computing this many tokens would.
        let load_as_tokens = if per_token > 0.0 && placed.load_seconds > 0.0 {
            (placed.load_seconds / per_token).ceil() as u64
        } else {
            0
        };
        let cost = Cost {
            predicted,
            raw_ttft: raw.ttft,
            uncached_tokens: uncached.saturating_add(load_as_tokens),
            load_seconds: placed.load_seconds,
            peer: hits.peer_endpoint.filter(|_| placed.peer),
            objective,
        };
        (cost, queue_seconds)
    }
}

impl TtftCostProducer {
    /// The home of a new prefix (see [`TtftCostProducer::prefix_home_weight`]): `None` when the
    /// weight is 0, the request has no keys, or a candidate holds its first blocks already.
    /// `hits`: every candidate's [`CycleState::tier_tokens`], in order.
    fn prefix_home(
        &self,
        state: &CycleState,
        candidates: &[Candidate],
        hits: &[TierTokens],
    ) -> Option<EndpointId> {
        if self.prefix_home_weight <= 0.0 {
            return None;
        }
        let (key, depth_tokens) = prefix_key(state)?;
        if hits.iter().any(|t| holds(t, depth_tokens)) {
            return None;
        }
        candidates
            .iter()
            .max_by_key(|c| xxhash_rust::xxh64::xxh64(c.endpoint.host_port.as_bytes(), key))
            .map(|c| c.endpoint.id)
    }
}

/// The key naming the request's prefix (its block key at [`HOME_BLOCKS`], or its last block's
/// when shorter) and that depth in tokens; `None` without keys.
fn prefix_key(state: &CycleState) -> Option<(u64, u64)> {
    match (&state.precise, &state.prefix) {
        (Some(m), _) if !m.keys.is_empty() => {
            let depth = m.keys.len().min(HOME_BLOCKS);
            let key = *m.keys.get(depth.checked_sub(1)?)?;
            Some((key, (depth * m.block_tokens) as u64))
        }
        // In the units the approximate index's holders are counted in (`matched_tokens`).
        (_, Some(p)) => {
            let depth = p.hashes.len().min(HOME_BLOCKS);
            let key = *p.hashes.get(depth.checked_sub(1)?)?;
            Some((key, p.tokens_of(depth as u32)))
        }
        _ => None,
    }
}

/// Whether a candidate with these tier tokens holds the prefix's first `depth_tokens` in its
/// own tiers.
fn holds(t: &TierTokens, depth_tokens: u64) -> bool {
    t.gpu + t.cpu + t.disk >= depth_tokens
}

impl TtftCostProducer {
    /// Whether `holder_load_factor` rules the non-holders out: some candidates hold the prefix
    /// and some do not, and the least-queued holder's queue is within the factor × the mean
    /// queue plus one prefill of the prompt. `queues`: (endpoint, holds, queue seconds).
    fn keeps_on_holders(&self, queues: &[(EndpointId, bool, f64)], prompt_tokens: u64) -> bool {
        if queues.is_empty() || queues.iter().all(|q| q.1) {
            return false;
        }
        let Some(best_holder) = queues
            .iter()
            .filter(|q| q.1)
            .map(|q| q.2)
            .min_by(f64::total_cmp)
        else {
            return false;
        };
        let mean = queues.iter().map(|q| q.2).sum::<f64>() / queues.len() as f64;
        let slack = prompt_tokens as f64 * self.engine.per_token.as_secs_f64();
        best_holder <= self.holder_load_factor * mean + slack
    }
}

/// What the costs of one request on every candidate share (see
/// [`TtftCostProducer::per_request`]).
struct PerRequest {
    /// The prompt's tokens (estimated when no tokenizer counted them).
    prompt_tokens: u64,
    /// Output tokens counted in the objective.
    output_tokens: u32,
    /// The engine constants in seconds.
    engine: EngineSeconds,
    /// The tiers' load time per token.
    tiers: TierLoadRates,
    /// The mean of [`backlog_requests`] over the candidates (0 unless the queue externality
    /// is weighed).
    queued_per_candidate: f64,
}

/// Requests waiting for their first token on a replica: the EPP's own prefilling ones, or the
/// engine's waiting queue when it reports more (other EPPs' requests).
fn backlog_requests(own_prefilling: u64, engine_waiting: u64) -> u64 {
    own_prefilling.max(engine_waiting)
}

/// The mean of [`backlog_requests`] over the candidates (0 without candidates).
fn queued_per_candidate(state: &CycleState, candidates: &[Candidate]) -> f64 {
    if candidates.is_empty() {
        return 0.0;
    }
    let total: u64 = candidates
        .iter()
        .map(|c| {
            let own = state
                .in_flight
                .load(c.endpoint.id)
                .map(|l| l.read().prefilling)
                .unwrap_or_default();
            backlog_requests(own, c.metrics.waiting_queue_size)
        })
        .fold(0u64, u64::saturating_add);
    total as f64 / candidates.len() as f64
}

impl Plugin for TtftCostProducer {
    fn type_name(&self) -> &'static str {
        "ttft-cost-producer"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl DataProducer for TtftCostProducer {
    fn produce(
        &self,
        request: &InferenceRequest,
        candidates: &[Candidate],
        state: &mut CycleState,
    ) {
        let bound = candidates
            .iter()
            .map(|c| c.endpoint.id.0 as usize + 1)
            .max()
            .unwrap_or(0);
        let mut by_endpoint = vec![None; bound];
        // Each candidate's tier tokens, looked up once: before the loop when a rule needs them
        // all (the home and the holders), else in it.
        let all_hits: Vec<TierTokens> =
            if self.prefix_home_weight > 0.0 || self.holder_load_factor > 0.0 {
                candidates
                    .iter()
                    .map(|c| state.tier_tokens(&c.endpoint))
                    .collect()
            } else {
                Vec::new()
            };
        let home = self.prefix_home(state, candidates, &all_hits);
        let queued = if self.queue_externality_weight > 0.0 {
            queued_per_candidate(state, candidates)
        } else {
            0.0
        };
        let per_request = self.per_request(request, queued);
        let prompt_tokens = per_request.prompt_tokens;
        let depth = if self.holder_load_factor > 0.0 {
            prefix_key(state).map(|(_, d)| d)
        } else {
            None
        };
        // (holds the prefix, its queue in seconds) per candidate, for `holder_load_factor`.
        let mut queues = Vec::with_capacity(if depth.is_some() { candidates.len() } else { 0 });
        for (i, c) in candidates.iter().enumerate() {
            let hits = match all_hits.get(i) {
                Some(t) => *t,
                None => state.tier_tokens(&c.endpoint),
            };
            let (mut cost, queue) = self.cost(&per_request, state, c, &hits);
            if let Some(d) = depth {
                queues.push((c.endpoint.id, holds(&hits, d), queue));
            }
            if home.is_some_and(|h| h != c.endpoint.id) {
                let k = state
                    .in_flight
                    .load(c.endpoint.id)
                    .map_or(1.0, |l| l.calibration.factor());
                cost.objective += self.prefix_home_weight
                    * count_f64(prompt_tokens)
                    * per_request.engine.per_token
                    * k;
            }
            by_endpoint[c.endpoint.id.0 as usize] = Some(cost);
        }
        if self.keeps_on_holders(&queues, prompt_tokens) {
            for (c, &(id, held, _)) in candidates.iter().zip(&queues) {
                let full = c.metrics.kv_cache_usage >= self.holder_min_kv_usage;
                if !held
                    && full
                    && let Some(Some(cost)) = by_endpoint.get_mut(id.0 as usize)
                {
                    cost.objective += HOLDER_RULE_CHARGE;
                }
            }
        }
        state.costs = Some(Costs { by_endpoint });
    }
}

/// `ttft-cost-scorer` parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScorerYaml {
    tie_within_millis: Option<f64>,
    tie_within_fraction: Option<f64>,
}

/// The widest absolute tie band, ms: ten seconds is beyond any prediction worth ranking.
const MAX_TIE_WITHIN_MILLIS: f64 = 10_000.0;

/// `ttft-cost-scorer`: the cheapest candidate scores 1, the others `cheapest / theirs`; with a
/// tie band, every candidate whose objective is within the band of the cheapest scores 1.
#[derive(Debug)]
pub struct TtftCostScorer {
    /// Instance name.
    pub name: String,
    /// The absolute part of the tie band, seconds of objective (0: none).
    pub tie_within_seconds: f64,
    /// The relative part of the tie band, a share of the cheapest objective (0: none).
    ///
    /// The band is `max(tie_within_seconds, tie_within_fraction × cheapest)`. Candidates in it
    /// tie at 1, so `max-score-picker` chooses among them at random with its seeded RNG
    /// (AIBrix's least-request top-k, the power of two choices). Several EPP replicas each see
    /// the others' just-routed requests only at the next scrape, so with the same snapshot they
    /// all pick the same cheapest replica and pile prefills on it (bench `active-active`, burst
    /// herding); costs closer than what that blind spot hides are no real preference, and a
    /// random choice among them spreads the EPPs. Both 0 (the default) is the plain ranking.
    pub tie_within_fraction: f64,
}

impl Default for TtftCostScorer {
    fn default() -> Self {
        Self {
            name: "ttft-cost-scorer".into(),
            tie_within_seconds: 0.0,
            tie_within_fraction: 0.0,
        }
    }
}

impl TtftCostScorer {
    /// Builds from `tieWithinMillis` (in [0, 10000]) and `tieWithinFraction` (in [0, 1]),
    /// both 0 by default (no tie band).
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: ScorerYaml = p.decode()?;
        let mut out = Self {
            name: p.name(),
            ..Self::default()
        };
        match y.tie_within_millis {
            Some(ms) if !(ms.is_finite() && (0.0..=MAX_TIE_WITHIN_MILLIS).contains(&ms)) => {
                return Err(p.invalid("tieWithinMillis", "must be in [0, 10000] ms"));
            }
            Some(ms) => out.tie_within_seconds = ms / 1e3,
            None => {}
        }
        match y.tie_within_fraction {
            Some(f) if !(f.is_finite() && (0.0..=1.0).contains(&f)) => {
                return Err(p.invalid("tieWithinFraction", "must be in [0, 1]"));
            }
            Some(f) => out.tie_within_fraction = f,
            None => {}
        }
        Ok(out)
    }

    /// How far above the `cheapest` objective a candidate still ties with it (0: no band).
    fn tie_band(&self, cheapest: f64) -> f64 {
        self.tie_within_seconds
            .max(self.tie_within_fraction * cheapest)
    }
}

impl Plugin for TtftCostScorer {
    fn type_name(&self) -> &'static str {
        "ttft-cost-scorer"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Scorer for TtftCostScorer {
    fn score(
        &self,
        _request: &InferenceRequest,
        state: &CycleState,
        candidates: &[Candidate],
        scores: &mut [f64],
    ) {
        let Some(costs) = &state.costs else {
            scores.iter_mut().for_each(|s| *s = 0.0);
            return;
        };
        let objective = |c: &Candidate| costs.of(&c.endpoint).map(|c| c.objective);
        let best = candidates
            .iter()
            .filter_map(objective)
            .fold(f64::INFINITY, f64::min);
        let band = if best.is_finite() {
            self.tie_band(best)
        } else {
            0.0
        };
        for (s, c) in scores.iter_mut().zip(candidates) {
            *s = match objective(c) {
                Some(o) if band > 0.0 && o <= best + band => 1.0,
                Some(o) if o > 0.0 && best.is_finite() => best / o,
                Some(_) => 1.0,
                None => 0.0,
            };
        }
    }
}

/// `latency-slo-filter`: the candidates predicted to meet the request's latency objectives,
/// when any is; all of them otherwise.
#[derive(Debug)]
pub struct LatencySloFilter {
    /// Instance name.
    pub name: String,
}

impl Plugin for LatencySloFilter {
    fn type_name(&self) -> &'static str {
        "latency-slo-filter"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Filter for LatencySloFilter {
    fn applies_to(&self, request: &InferenceRequest, state: &CycleState) -> bool {
        state.costs.is_some() && (request.slo_ttft.is_some() || request.slo_tpot.is_some())
    }

    fn filter(
        &self,
        request: &InferenceRequest,
        state: &CycleState,
        candidates: Vec<Candidate>,
    ) -> Vec<Candidate> {
        let (Some(costs), true) = (
            &state.costs,
            request.slo_ttft.is_some() || request.slo_tpot.is_some(),
        ) else {
            return candidates;
        };
        let meets = |c: &Candidate| {
            costs.of(&c.endpoint).is_some_and(|cost| {
                request
                    .slo_ttft
                    .is_none_or(|slo| cost.predicted.ttft <= slo.as_secs_f64())
                    && request
                        .slo_tpot
                        .is_none_or(|slo| cost.predicted.tpot <= slo.as_secs_f64())
            })
        };
        if candidates.iter().any(meets) {
            candidates.into_iter().filter(meets).collect()
        } else {
            candidates
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use bytes::Bytes;

    use super::*;
    use crate::datastore::{Datastore, EngineMetrics, test_util::pool};
    use crate::scheduling::{EndpointLoad, InFlightCounts, PrefixMatch};

    struct Setup {
        candidates: Vec<Candidate>,
        loads: Vec<Arc<EndpointLoad>>,
    }

    fn setup(n: u8, running: &[u64]) -> Setup {
        let ds = Datastore::new();
        let snap = ds.apply(pool(n));
        for (e, r) in snap.endpoints.iter().zip(running) {
            e.store_metrics(EngineMetrics {
                running_requests: *r,
                ..Default::default()
            });
        }
        let candidates: Vec<Candidate> =
            snap.endpoints.iter().cloned().map(Candidate::new).collect();
        let loads = (0..=n).map(|_| Arc::default()).collect();
        Setup { candidates, loads }
    }

    fn state(s: &Setup) -> CycleState {
        let mut state = CycleState::new(tokio::time::Instant::now());
        state.in_flight = InFlightCounts::new(Arc::new(s.loads.clone()));
        state
    }

    /// Review: the home depth was counted at `block_tokens` a block while the holders' tokens
    /// are the content the blocks cover (a JSON prompt without ids): a holder of the whole
    /// home prefix never held it. Both are counted alike.
    #[test]
    fn the_home_depth_is_counted_as_the_holders_are() {
        let mut state = CycleState::new(tokio::time::Instant::now());
        state.prefix = Some(PrefixMatch {
            hashes: (0..40).collect(),
            matched: vec![40],
            block_tokens: 16,
            tokens_through: (1..=40).map(|k| k * 11).collect(),
        });
        assert_eq!(prefix_key(&state), Some((31, 32 * 11)));
        // Without content estimates, a block is `block_tokens`.
        state.prefix.as_mut().unwrap().tokens_through.clear();
        assert_eq!(prefix_key(&state), Some((31, 32 * 16)));
    }

    fn request(prompt_tokens: usize) -> InferenceRequest {
        InferenceRequest {
            prompt: Bytes::from("x".repeat(prompt_tokens * 4)),
            max_tokens: Some(1),
            ..Default::default()
        }
    }

    fn run(s: &Setup, state: &mut CycleState, req: &InferenceRequest) -> Vec<f64> {
        TtftCostProducer::default().produce(req, &s.candidates, state);
        let mut scores = vec![f64::NAN; s.candidates.len()];
        TtftCostScorer::default().score(req, state, &s.candidates, &mut scores);
        scores
    }

    #[test]
    fn another_epps_waiting_requests_count_at_their_uncached_size_not_this_prompt() {
        // Endpoint 0 caches 3,840 of this 4,000-token prompt; both engines report 4 waiting
        // requests this EPP did not send.
        let mut s = setup(2, &[0, 0]);
        for c in &s.candidates {
            c.endpoint.store_metrics(EngineMetrics {
                waiting_queue_size: 4,
                ..Default::default()
            });
        }
        s.candidates = s
            .candidates
            .iter()
            .map(|c| Candidate::new(c.endpoint.clone()))
            .collect();
        let mut st = state(&s);
        st.prefix = Some(PrefixMatch {
            hashes: vec![0; 250],
            matched: vec![240, 0],
            block_tokens: 16,
            tokens_through: Vec::new(),
        });
        let req = request(4000);
        TtftCostProducer::default().produce(&req, &s.candidates, &mut st);
        let costs = st.costs.as_ref().unwrap();
        let cached = costs.of(&s.candidates[0].endpoint).unwrap();
        let cold = costs.of(&s.candidates[1].endpoint).unwrap();
        // Where the prefix is cached, the foreign requests are counted as cached-prefix ones too
        // (5 × 160 tokens to compute); where it is not, as full prompts (5 × 4,000).
        assert_eq!(cached.uncached_tokens, 160);
        assert!(
            cached.predicted.ttft * 10.0 < cold.predicted.ttft,
            "{cached:?} vs {cold:?}"
        );
        // With requests of its own prefilling there, the EPP counts the foreign ones at their
        // mean size: 2 own requests of 100 uncached tokens each, 4 − 2 foreign.
        s.loads[s.candidates[1].endpoint.id.0 as usize]
            .prefilling
            .store(2, Ordering::Relaxed);
        s.loads[s.candidates[1].endpoint.id.0 as usize]
            .prefill_tokens
            .store(200, Ordering::Relaxed);
        let mut st2 = state(&s);
        st2.prefix = st.prefix.clone();
        TtftCostProducer::default().produce(&req, &s.candidates, &mut st2);
        let cold_now = st2
            .costs
            .as_ref()
            .unwrap()
            .of(&s.candidates[1].endpoint)
            .unwrap();
        assert!(
            cold_now.predicted.ttft < cold.predicted.ttft,
            "{cold_now:?} vs {cold:?}"
        );
    }

    #[test]
    fn scores_are_relative_costs_with_the_cheapest_at_one() {
        let s = setup(3, &[0, 100, 300]);
        let mut st = state(&s);
        let scores = run(&s, &mut st, &request(1000));
        assert_eq!(scores[0], 1.0);
        assert!(scores[0] > scores[1] && scores[1] > scores[2], "{scores:?}");
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
    }

    /// `s` with this EPP's own queued prefill tokens on each candidate.
    fn queued(s: &Setup, tokens: &[u64]) {
        for (c, &t) in s.candidates.iter().zip(tokens) {
            s.loads[c.endpoint.id.0 as usize]
                .prefill_tokens
                .store(t, Ordering::Relaxed);
        }
    }

    /// How often each candidate is picked first in `draws` decisions of `scorer` and
    /// `max-score-picker` (one RNG seeded `seed` across them, as one EPP's).
    fn pick_counts(s: &Setup, scorer: &TtftCostScorer, seed: u64, draws: usize) -> Vec<usize> {
        use rand::SeedableRng;

        use crate::scheduling::Picker;
        use crate::scheduling::plugins::pickers::MaxScorePicker;
        let picker = MaxScorePicker {
            name: "p".into(),
            max_endpoints: 1,
        };
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let req = request(1000);
        let mut st = state(s);
        TtftCostProducer::default().produce(&req, &s.candidates, &mut st);
        let mut scores = vec![f64::NAN; s.candidates.len()];
        scorer.score(&req, &st, &s.candidates, &mut scores);
        let mut counts = vec![0; s.candidates.len()];
        for _ in 0..draws {
            let scored = scores
                .iter()
                .enumerate()
                .map(|(index, &score)| crate::scheduling::Scored { index, score })
                .collect();
            counts[picker.pick(scored, &mut rng)[0].index] += 1;
        }
        counts
    }

    /// Candidates within the band of the cheapest (here 9 ms apart, a band of 20 ms) share
    /// the picks about evenly; one beyond it (300 ms) is never picked; a winner cheaper by more
    /// than the band (60 ms) is never displaced; the same seed makes the same picks.
    #[test]
    fn a_tie_band_spreads_near_equal_costs_and_keeps_a_clear_winner() {
        let banded = TtftCostScorer {
            tie_within_seconds: 0.020,
            ..TtftCostScorer::default()
        };
        let s = setup(3, &[0, 0, 0]);
        queued(&s, &[0, 300, 10_000]);
        let counts = pick_counts(&s, &banded, 5, 1_000);
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!((400..600).contains(&counts[0]), "{counts:?}");
        assert_eq!(counts, pick_counts(&s, &banded, 5, 1_000), "same seed");
        // Without the band the cheapest takes every pick.
        assert_eq!(
            pick_counts(&s, &TtftCostScorer::default(), 5, 1_000),
            [1_000, 0, 0]
        );
        // A relative band: 9 ms is within 30 % of the cheapest's 36 ms, not within 10 %.
        let relative = |f| TtftCostScorer {
            tie_within_fraction: f,
            ..TtftCostScorer::default()
        };
        assert!(pick_counts(&s, &relative(0.3), 5, 1_000)[1] > 400);
        assert_eq!(pick_counts(&s, &relative(0.1), 5, 1_000)[1], 0);
        queued(&s, &[0, 2_000, 10_000]);
        assert_eq!(pick_counts(&s, &banded, 5, 1_000), [1_000, 0, 0]);
    }

    #[test]
    fn the_tie_band_parameters_are_read_and_checked() {
        use crate::scheduling::plugins::test_util::build_from_yaml;
        let build = |yaml| build_from_yaml("ttft-cost-scorer", yaml, TtftCostScorer::from_params);
        let (s, warnings) = build("{tieWithinMillis: 25, tieWithinFraction: 0.1}").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!((s.tie_within_seconds, s.tie_within_fraction), (0.025, 0.1));
        let (s, _) = build("{}").unwrap();
        assert_eq!((s.tie_within_seconds, s.tie_within_fraction), (0.0, 0.0));
        for (bad, name) in [
            ("{tieWithinMillis: -1}", "tieWithinMillis"),
            ("{tieWithinMillis: 10001}", "tieWithinMillis"),
            ("{tieWithinMillis: .nan}", "tieWithinMillis"),
            ("{tieWithinFraction: 1.5}", "tieWithinFraction"),
            ("{tieWithinFraction: -0.1}", "tieWithinFraction"),
        ] {
            let err = build(bad).unwrap_err().to_string();
            assert!(err.contains(name), "{bad}: {err}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 256,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x7_1e5),
            failure_persistence: None,
            ..Default::default()
        })]
        /// Without a band every score is `cheapest / objective` exactly (the scorer as it was
        /// before the band); with one, a candidate in the band scores 1 and every other keeps
        /// that score, so the band only ever makes near-equal candidates tie.
        #[test]
        fn the_tie_band_only_raises_candidates_within_it_to_one(
            tokens in proptest::collection::vec(0u64..40_000, 1..8),
            millis in 0.0f64..200.0,
            fraction in 0.0f64..0.5,
        ) {
            let s = setup(tokens.len() as u8, &vec![0; tokens.len()]);
            queued(&s, &tokens);
            let req = request(1000);
            let mut st = state(&s);
            TtftCostProducer::default().produce(&req, &s.candidates, &mut st);
            let costs = st.costs.as_ref().unwrap();
            let objectives: Vec<f64> = s
                .candidates
                .iter()
                .map(|c| costs.of(&c.endpoint).unwrap().objective)
                .collect();
            let best = objectives.iter().copied().fold(f64::INFINITY, f64::min);
            let mut plain = vec![f64::NAN; tokens.len()];
            TtftCostScorer::default().score(&req, &st, &s.candidates, &mut plain);
            for (p, o) in plain.iter().zip(&objectives) {
                proptest::prop_assert_eq!(*p, best / o);
            }
            let banded = TtftCostScorer {
                tie_within_seconds: millis / 1e3,
                tie_within_fraction: fraction,
                ..TtftCostScorer::default()
            };
            let mut scores = vec![f64::NAN; tokens.len()];
            banded.score(&req, &st, &s.candidates, &mut scores);
            let band = (millis / 1e3).max(fraction * best);
            for ((sc, p), o) in scores.iter().zip(&plain).zip(&objectives) {
                let want = if band > 0.0 && *o <= best + band { 1.0 } else { *p };
                proptest::prop_assert_eq!(*sc, want);
            }
        }
    }

    #[test]
    fn the_epps_own_queued_prefill_counts_at_once() {
        let s = setup(2, &[0, 0]);
        // 30,000 tokens already routed to the first endpoint and not started.
        s.loads[s.candidates[0].endpoint.id.0 as usize]
            .prefill_tokens
            .store(30_000, Ordering::Relaxed);
        let mut st = state(&s);
        let scores = run(&s, &mut st, &request(1000));
        assert_eq!(scores[1], 1.0, "{scores:?}");
        assert!(scores[0] < 0.2, "{scores:?}");
    }

    #[test]
    fn a_cached_prefix_wins_until_its_replica_is_loaded() {
        let s = setup(2, &[0, 0]);
        let req = request(6_500);
        let cached_on_first = |st: &mut CycleState| {
            let mut matched = vec![0; 3];
            matched[s.candidates[0].endpoint.id.0 as usize] = 375; // 6,000 tokens of 16
            st.prefix = Some(PrefixMatch {
                hashes: vec![0; 406],
                matched,
                block_tokens: 16,
                tokens_through: Vec::new(),
            });
        };
        let mut st = state(&s);
        cached_on_first(&mut st);
        assert_eq!(run(&s, &mut st, &req)[0], 1.0);
        s.loads[s.candidates[0].endpoint.id.0 as usize]
            .prefill_tokens
            .store(20_000, Ordering::Relaxed);
        let mut st = state(&s);
        cached_on_first(&mut st);
        assert_eq!(
            run(&s, &mut st, &req)[1],
            1.0,
            "recomputing elsewhere is cheaper"
        );
    }

    #[test]
    fn the_slo_filter_keeps_who_meets_it_or_everyone() {
        let s = setup(2, &[0, 2000]);
        let mut st = state(&s);
        let mut req = request(1000);
        TtftCostProducer::default().produce(&req, &s.candidates, &mut st);
        let f = LatencySloFilter { name: "f".into() };
        let costs = st.costs.clone().unwrap();
        let ttft = |i: usize| costs.of(&s.candidates[i].endpoint).unwrap().predicted.ttft;
        assert!(ttft(0) < ttft(1));
        req.slo_ttft = Some(Duration::from_secs_f64((ttft(0) + ttft(1)) / 2.0));
        let kept = f.filter(&req, &st, s.candidates.clone());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].endpoint.id, s.candidates[0].endpoint.id);
        req.slo_ttft = Some(Duration::from_micros(1));
        assert_eq!(f.filter(&req, &st, s.candidates.clone()).len(), 2);
        req.slo_ttft = None;
        assert_eq!(f.filter(&req, &st, s.candidates.clone()).len(), 2);
    }

    #[test]
    fn calibration_scales_a_replicas_predictions() {
        let s = setup(2, &[0, 0]);
        let slow = &s.loads[s.candidates[1].endpoint.id.0 as usize];
        for _ in 0..50 {
            slow.calibration
                .observe(Duration::from_millis(10), Duration::from_millis(30));
        }
        let mut st = state(&s);
        let req = request(1000);
        TtftCostProducer::default().produce(&req, &s.candidates, &mut st);
        let costs = st.costs.unwrap();
        let a = costs.of(&s.candidates[0].endpoint).unwrap();
        let b = costs.of(&s.candidates[1].endpoint).unwrap();
        assert!((b.predicted.ttft / a.predicted.ttft - 3.0).abs() < 0.05);
        assert_eq!(a.raw_ttft, b.raw_ttft, "the raw model is the same");
    }

    /// `s` with its engines reporting these KV utilizations and `running` requests each (the
    /// candidates rebuilt: a candidate holds the metrics read when it was made).
    fn reporting(s: Setup, kv_usage: &[f64], running: u64) -> Setup {
        for (c, kv) in s.candidates.iter().zip(kv_usage) {
            c.endpoint.store_metrics(EngineMetrics {
                running_requests: running,
                kv_cache_usage: *kv,
                ..Default::default()
            });
        }
        Setup {
            candidates: s
                .candidates
                .iter()
                .map(|c| Candidate::new(c.endpoint.clone()))
                .collect(),
            loads: s.loads,
        }
    }

    /// Two cold replicas with the same queue: the one whose cache is fuller loses more to the
    /// new prompt's blocks, so it costs more; without the term they tie.
    #[test]
    fn a_fuller_cache_costs_the_evictions_a_new_prompt_causes() {
        let s = reporting(setup(2, &[4, 4]), &[0.2, 0.9], 4);
        let req = request(4000);
        let mut st = state(&s);
        let scores = run(&s, &mut st, &req);
        assert_eq!(scores[0], 1.0);
        assert!(scores[1] < 1.0, "{scores:?}");
        let mut st = state(&s);
        let without = TtftCostProducer {
            eviction_weight: 0.0,
            ..TtftCostProducer::default()
        };
        without.produce(&req, &s.candidates, &mut st);
        let costs = st.costs.as_ref().unwrap();
        let (a, b) = (
            costs.of(&s.candidates[0].endpoint).unwrap().objective,
            costs.of(&s.candidates[1].endpoint).unwrap().objective,
        );
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    /// Tier tokens for the first candidate only, through a precise match built by hand.
    fn with_tiers(s: &Setup, st: &mut CycleState, by_endpoint: &[(usize, [u32; 4], u32)]) {
        use crate::kv_index::{EndpointMatch, Lookup};
        use crate::scheduling::plugins::precise::PreciseMatch;
        let bound = s
            .candidates
            .iter()
            .map(|c| c.endpoint.id.0 as usize + 1)
            .max()
            .unwrap();
        let mut lookup = Lookup::default();
        lookup.total_blocks = 400;
        lookup.by_endpoint = vec![EndpointMatch::default(); bound];
        for &(i, by_tier, shared) in by_endpoint {
            let m = &mut lookup.by_endpoint[s.candidates[i].endpoint.id.0 as usize];
            m.by_tier = by_tier;
            m.shared = shared;
            m.blocks = by_tier.iter().sum::<u32>() + shared;
            m.local_run = by_tier.iter().sum::<u32>();
        }
        st.precise = Some(PreciseMatch {
            keys: vec![0; 400],
            lookup,
            trusted: vec![true; bound],
            block_tokens: 16,
        });
    }

    fn ttft(s: &Setup, st: &mut CycleState, req: &InferenceRequest, i: usize) -> f64 {
        TtftCostProducer::default().produce(req, &s.candidates, st);
        st.costs
            .as_ref()
            .unwrap()
            .of(&s.candidates[i].endpoint)
            .unwrap()
            .predicted
            .ttft
    }

    /// 6,400 prompt tokens, 6,000 of them held: on the GPU, in CPU memory, nowhere.
    #[test]
    fn a_cpu_hit_is_faster_than_recomputing_and_slower_than_a_gpu_hit() {
        let s = setup(1, &[0]);
        let req = request(6_400);
        let mut st = state(&s);
        with_tiers(&s, &mut st, &[(0, [375, 0, 0, 0], 0)]);
        let gpu = ttft(&s, &mut st, &req, 0);
        let mut st = state(&s);
        with_tiers(&s, &mut st, &[(0, [0, 375, 0, 0], 0)]);
        let cpu = ttft(&s, &mut st, &req, 0);
        let cost = *st
            .costs
            .as_ref()
            .unwrap()
            .of(&s.candidates[0].endpoint)
            .unwrap();
        let mut st = state(&s);
        let cold = ttft(&s, &mut st, &req, 0);
        assert!(gpu < cpu && cpu < cold, "{gpu} {cpu} {cold}");
        // The load: 6,000 tokens × 131,072 bytes at 25 GB/s.
        let load = 6_000.0 * 131_072.0 / 25e9;
        assert!((cost.load_seconds - load).abs() < 1e-12);
        assert!((cpu - gpu - load).abs() < 1e-9, "{cpu} {gpu} {load}");
        // It queues as the 400 computed tokens plus the load as prefill-equivalent tokens.
        assert_eq!(cost.uncached_tokens, 400 + (load / 30e-6).ceil() as u64);
        // A CPU tier the config ignores is recomputed.
        let mut st = state(&s);
        with_tiers(&s, &mut st, &[(0, [0, 375, 0, 0], 0)]);
        let ignoring = TtftCostProducer {
            tiers: crate::cost::TierCosts {
                cpu_gbps: 0.0,
                ..Default::default()
            },
            ..TtftCostProducer::default()
        };
        ignoring.produce(&req, &s.candidates, &mut st);
        let c = st
            .costs
            .as_ref()
            .unwrap()
            .of(&s.candidates[0].endpoint)
            .unwrap();
        assert!((c.predicted.ttft - cold).abs() < 1e-12);
    }

    /// Two replicas at the same fullness and queue, a 6,400-token prompt: one holds 6,000 of
    /// its tokens in its CPU tier, the other nothing but the shared store's copy. Both evict
    /// the same GPU blocks to take the prompt; only the second also writes 6,000 tokens into
    /// its CPU tier, evicting copies kept there, so the holder's lead is its cheaper load plus
    /// those evictions (each token worth recomputing it less loading it back).
    #[test]
    fn placing_a_prefix_elsewhere_costs_the_cpu_tier_it_writes_through() {
        let s = reporting(setup(2, &[0, 0]), &[0.5, 0.5], 0);
        let req = request(6_400);
        let mut st = state(&s);
        with_tiers(&s, &mut st, &[(0, [0, 375, 0, 0], 0), (1, [0; 4], 375)]);
        TtftCostProducer::default().produce(&req, &s.candidates, &mut st);
        let costs = st.costs.as_ref().unwrap();
        let (holder, other) = (
            costs.of(&s.candidates[0].endpoint).unwrap(),
            costs.of(&s.candidates[1].endpoint).unwrap(),
        );
        let per_token = 30e-6;
        let (cpu, shared) = (131_072.0 / 25e9, 131_072.0 / 10e9);
        let loads = 6_000.0 * (shared - cpu);
        let written = 2.0 * 0.5 * 6_000.0 * (per_token - cpu);
        let lead = other.objective - holder.objective;
        assert!(
            (lead - loads - written).abs() < 1e-9,
            "{lead} vs {}",
            loads + written
        );
    }

    /// The index of the candidate `producer`'s costs make `ttft-cost-scorer` score highest.
    fn winner(
        producer: &TtftCostProducer,
        req: &InferenceRequest,
        s: &Setup,
        st: &mut CycleState,
    ) -> usize {
        producer.produce(req, &s.candidates, st);
        let mut scores = vec![f64::NAN; s.candidates.len()];
        TtftCostScorer::default().score(req, st, &s.candidates, &mut scores);
        (0..scores.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap()
    }

    /// The winner's index under `producer` for a 4,000-token request whose approximate hashes
    /// are `hashes` (250 blocks), with `matched` blocks held per candidate.
    fn home_pick(producer: &TtftCostProducer, s: &Setup, hashes: &[u64], matched: &[u32]) -> usize {
        let mut st = state(s);
        let mut m = vec![0; s.candidates.len() + 1];
        for (c, n) in s.candidates.iter().zip(matched) {
            m[c.endpoint.id.0 as usize] = *n;
        }
        st.prefix = Some(crate::scheduling::PrefixMatch {
            hashes: hashes.to_vec(),
            matched: m,
            block_tokens: 16,
            tokens_through: Vec::new(),
        });
        let req = request(4_000);
        winner(producer, &req, s, &mut st)
    }

    /// A new prefix goes to the replica its first blocks hash to, whichever EPP routes it (the
    /// choice depends on the keys and the endpoints' addresses only), unless that replica's
    /// queue is longer by more than the weight's share of a prefill; new prefixes spread over
    /// the replicas; a prefix someone holds is placed by cost alone.
    #[test]
    fn a_new_prefix_goes_to_its_home_from_every_epp() {
        let s = setup(4, &[0, 0, 0, 0]);
        let homing = TtftCostProducer {
            prefix_home_weight: 1.0,
            ..TtftCostProducer::default()
        };
        let hashes = |g: u64| (0..250).map(|i| g * 1_000 + i).collect::<Vec<u64>>();
        let mut homes = std::collections::BTreeSet::new();
        for g in 0..32 {
            let home = home_pick(&homing, &s, &hashes(g), &[0; 4]);
            // A second EPP (its own state, same pool) agrees.
            assert_eq!(home_pick(&homing, &s, &hashes(g), &[0; 4]), home);
            homes.insert(home);
        }
        assert_eq!(homes.len(), 4, "new prefixes spread: {homes:?}");
        // The home of prefix 0, made busier by one EPP's own queued prefill (2,000 tokens, half
        // a prefill of this prompt): still the home with the weight, not without it.
        let g0 = home_pick(&homing, &s, &hashes(0), &[0; 4]);
        let load = &s.loads[s.candidates[g0].endpoint.id.0 as usize];
        load.requests.store(1, Ordering::Relaxed);
        load.prefilling.store(1, Ordering::Relaxed);
        load.prefill_tokens.store(2_000, Ordering::Relaxed);
        assert_eq!(home_pick(&homing, &s, &hashes(0), &[0; 4]), g0);
        assert_ne!(
            home_pick(&TtftCostProducer::default(), &s, &hashes(0), &[0; 4]),
            g0
        );
        // Someone holds the first 32 blocks: the cost alone decides, the holder wins.
        let other = (g0 + 1) % 4;
        let mut held = [0; 4];
        held[other] = 32;
        assert_eq!(home_pick(&homing, &s, &hashes(0), &held), other);
    }

    /// The store's blocks count for every endpoint: each gets cheaper, none is preferred.
    #[test]
    fn a_shared_store_hit_makes_every_endpoint_cheaper() {
        let s = setup(3, &[0, 0, 0]);
        let req = request(6_400);
        let mut st = state(&s);
        let cold: Vec<f64> = (0..3).map(|i| ttft(&s, &mut st, &req, i)).collect();
        let mut st = state(&s);
        with_tiers(
            &s,
            &mut st,
            &[(0, [0; 4], 375), (1, [0; 4], 375), (2, [0; 4], 375)],
        );
        let warm: Vec<f64> = (0..3).map(|i| ttft(&s, &mut st, &req, i)).collect();
        for i in 0..3 {
            assert!(warm[i] < cold[i], "{warm:?} {cold:?}");
            assert!((warm[i] - warm[0]).abs() < 1e-12);
        }
        // Through the state's own rule: an endpoint the precise index does not trust still
        // gets the store's run beyond its approximate match.
        let mut st = state(&s);
        with_tiers(&s, &mut st, &[]);
        if let Some(m) = st.precise.as_mut() {
            m.trusted = vec![false; m.trusted.len()];
            m.lookup.shared_run = 375;
        }
        let t = st.tier_tokens(&s.candidates[1].endpoint);
        assert_eq!((t.gpu, t.shared), (0, 6_000));
    }

    /// Without tier data (the approximate index, or the precise one with GPU blocks only) the
    /// prediction is the model's without tiers: no load, the uncached tokens queued as before.
    #[test]
    fn no_tier_data_predicts_as_without_tiers() {
        let s = setup(2, &[0, 0]);
        let req = request(6_500);
        let check = |st: &CycleState| {
            let cost = st
                .costs
                .as_ref()
                .unwrap()
                .of(&s.candidates[0].endpoint)
                .unwrap();
            let want = EngineCosts::default().predict(Backlog::default(), 500);
            assert_eq!(cost.raw_ttft, want.ttft);
            assert_eq!(
                (cost.uncached_tokens, cost.load_seconds, cost.peer),
                (500, 0.0, None)
            );
        };
        let mut st = state(&s);
        let mut matched = vec![0; 3];
        matched[s.candidates[0].endpoint.id.0 as usize] = 375;
        st.prefix = Some(PrefixMatch {
            hashes: vec![0; 406],
            matched,
            block_tokens: 16,
            tokens_through: Vec::new(),
        });
        TtftCostProducer::default().produce(&req, &s.candidates, &mut st);
        check(&st);
        let mut st = state(&s);
        with_tiers(&s, &mut st, &[(0, [375, 0, 0, 0], 0)]);
        TtftCostProducer::default().produce(&req, &s.candidates, &mut st);
        check(&st);
    }

    /// `s` with this EPP's own requests waiting for their first token on each candidate: `n`
    /// requests of `tokens` uncached tokens each.
    fn prefilling(s: &Setup, per_candidate: &[(u64, u64)]) {
        for (c, &(n, tokens)) in s.candidates.iter().zip(per_candidate) {
            let load = &s.loads[c.endpoint.id.0 as usize];
            load.requests.store(n, Ordering::Relaxed);
            load.prefilling.store(n, Ordering::Relaxed);
            load.prefill_tokens.store(n * tokens, Ordering::Relaxed);
        }
    }

    /// The winner's index for a 6,500-token request of which the first candidate caches 6,000
    /// tokens (GPU, approximate index), under `producer`.
    fn holder_or_cold(producer: &TtftCostProducer, s: &Setup) -> usize {
        let req = request(6_500);
        let mut st = state(s);
        let mut matched = vec![0; s.candidates.len() + 1];
        matched[s.candidates[0].endpoint.id.0 as usize] = 375;
        st.prefix = Some(PrefixMatch {
            hashes: vec![0; 406],
            matched,
            block_tokens: 16,
            tokens_through: Vec::new(),
        });
        winner(producer, &req, s, &mut st)
    }

    /// The two candidates' objectives for a 6,500-token request of which each holds `held`
    /// blocks (GPU, approximate index), under `producer`.
    fn objectives(producer: &TtftCostProducer, s: &Setup, held: [u32; 2]) -> [f64; 2] {
        let req = request(6_500);
        let mut st = state(s);
        let mut matched = vec![0; 3];
        for (c, n) in s.candidates.iter().zip(held) {
            matched[c.endpoint.id.0 as usize] = n;
        }
        st.prefix = Some(PrefixMatch {
            hashes: vec![0; 406],
            matched,
            block_tokens: 16,
            tokens_through: Vec::new(),
        });
        producer.produce(&req, &s.candidates, &mut st);
        let costs = st.costs.unwrap();
        [0, 1].map(|i| costs.of(&s.candidates[i].endpoint).unwrap().objective)
    }

    /// The holder of a prefix has 20 requests of 1,000 uncached tokens waiting, the cold
    /// replica none: by its own TTFT the request is better off recomputing the prefix on the
    /// cold one, and so it goes there without the externality. With it, the 6,000 tokens it
    /// would recompute are charged for the 10 requests per replica waiting (the mean over the
    /// two), and it stays with the holder. At an idle cluster the term is 0.
    #[test]
    fn a_miss_is_charged_for_the_requests_that_will_queue_behind_it() {
        let s = setup(2, &[0, 0]);
        prefilling(&s, &[(20, 1_000), (0, 0)]);
        let charging = TtftCostProducer {
            queue_externality_weight: 0.5,
            ..TtftCostProducer::default()
        };
        assert_eq!(holder_or_cold(&TtftCostProducer::default(), &s), 1);
        assert_eq!(holder_or_cold(&charging, &s), 0);
        // The charge itself, with the caches half full: 0.5 × 10 requests waiting per replica
        // × (the engine time added + the eviction term), on each candidate.
        let s = reporting(s, &[0.5, 0.5], 0);
        let (with, without) = (
            objectives(&charging, &s, [375, 0]),
            objectives(&TtftCostProducer::default(), &s, [375, 0]),
        );
        for (i, computed) in [(0, 500.0), (1, 6_500.0)] {
            let added = computed * 30e-6;
            let eviction = 2.0 * 0.5 * computed * 30e-6;
            let want = 0.5 * 10.0 * (added + eviction);
            assert!(
                (with[i] - without[i] - want).abs() < 1e-9,
                "{i}: {with:?} {without:?} {want}"
            );
        }
        // Nothing waiting anywhere: no charge.
        prefilling(&s, &[(0, 0), (0, 0)]);
        assert_eq!(
            objectives(&charging, &s, [375, 0]),
            objectives(&TtftCostProducer::default(), &s, [375, 0])
        );
    }

    /// Another EPP's requests in an engine's waiting queue count as waiting too.
    #[test]
    fn the_requests_waiting_count_the_engines_queue_beyond_the_epps_own() {
        let s = reporting(setup(2, &[0, 0]), &[0.0, 0.0], 0);
        for c in &s.candidates {
            c.endpoint.store_metrics(EngineMetrics {
                waiting_queue_size: 6,
                ..Default::default()
            });
        }
        let s = Setup {
            candidates: s
                .candidates
                .iter()
                .map(|c| Candidate::new(c.endpoint.clone()))
                .collect(),
            loads: s.loads,
        };
        prefilling(&s, &[(2, 100), (9, 100)]);
        let st = state(&s);
        // max(2, 6) and max(9, 6): 7.5 per candidate.
        assert_eq!(queued_per_candidate(&st, &s.candidates), 7.5);
        assert_eq!(queued_per_candidate(&st, &[]), 0.0);
    }

    /// The holder of a 6,500-token request's prefix has 10 requests of 1,000 uncached tokens
    /// waiting (0.3 s of prefill), the other replica none: by cost the request recomputes the
    /// prefix on the idle one. With `holderLoadFactor` 1 it stays, since 0.3 s is within the
    /// mean queue (0.15 s) plus one prefill of the prompt (0.195 s); at 20 waiting (0.6 s against
    /// 0.3 + 0.195) the holder counts as overloaded and cost decides again. Nobody holding the
    /// prefix, or everybody, leaves the costs as they are.
    #[test]
    fn a_prefix_stays_with_its_holders_until_they_are_overloaded() {
        let s = setup(2, &[0, 0]);
        let bounded = TtftCostProducer {
            holder_load_factor: 1.0,
            ..TtftCostProducer::default()
        };
        prefilling(&s, &[(10, 1_000), (0, 0)]);
        assert_eq!(holder_or_cold(&TtftCostProducer::default(), &s), 1);
        assert_eq!(holder_or_cold(&bounded, &s), 0);
        prefilling(&s, &[(20, 1_000), (0, 0)]);
        assert_eq!(holder_or_cold(&bounded, &s), 1);
        // The rule compares queues only: no holder, or every candidate a holder, no charge.
        prefilling(&s, &[(10, 1_000), (0, 0)]);
        let objectives = |p: &TtftCostProducer, held: [u32; 2]| objectives(p, &s, held);
        for held in [[0, 0], [375, 375], [31, 0]] {
            assert_eq!(
                objectives(&bounded, held),
                objectives(&TtftCostProducer::default(), held),
                "{held:?}"
            );
        }
        let (with, without) = (
            objectives(&bounded, [375, 0]),
            objectives(&TtftCostProducer::default(), [375, 0]),
        );
        assert_eq!(with[0], without[0]);
        assert!((with[1] - without[1] - HOLDER_RULE_CHARGE).abs() < 1e-6);
    }

    /// With `holderMinKvUsage`, the rule rules out only a non-holder whose cache is that full:
    /// the cold replica at 20 % competes on cost as without the rule (a copy there evicts
    /// little), at 90 % it is charged out.
    #[test]
    fn a_non_holder_with_room_is_not_ruled_out_when_the_rule_asks_for_fullness() {
        let gated = TtftCostProducer {
            holder_load_factor: 1.0,
            holder_min_kv_usage: 0.5,
            ..TtftCostProducer::default()
        };
        let ungated = TtftCostProducer {
            holder_load_factor: 1.0,
            ..TtftCostProducer::default()
        };
        let objectives = |p: &TtftCostProducer, cold_usage: f64| {
            let s = reporting(setup(2, &[0, 0]), &[0.9, cold_usage], 0);
            prefilling(&s, &[(10, 1_000), (0, 0)]);
            objectives(p, &s, [375, 0])
        };
        let off = TtftCostProducer::default();
        let with_room = (objectives(&gated, 0.2), objectives(&off, 0.2));
        assert_eq!(
            with_room.0, with_room.1,
            "a cold replica with room competes"
        );
        let full = (objectives(&gated, 0.9), objectives(&off, 0.9));
        assert_eq!(full.0[0], full.1[0]);
        assert!((full.0[1] - full.1[1] - HOLDER_RULE_CHARGE).abs() < 1e-6);
        // Without the gate the cold replica is charged out either way.
        let ungated = objectives(&ungated, 0.2);
        assert!((ungated[1] - with_room.1[1] - HOLDER_RULE_CHARGE).abs() < 1e-6);
    }

    #[test]
    fn holder_min_kv_usage_is_read_and_checked() {
        use crate::scheduling::plugins::test_util::build_from_yaml;
        let build =
            |yaml| build_from_yaml("ttft-cost-producer", yaml, TtftCostProducer::from_params);
        let (p, warnings) = build("{holderLoadFactor: 2.5, holderMinKvUsage: 0.5}").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(p.holder_min_kv_usage, 0.5);
        assert_eq!(
            build("{holderLoadFactor: 2.5}")
                .unwrap()
                .0
                .holder_min_kv_usage,
            0.0
        );
        for bad in [
            "{holderLoadFactor: 2.5, holderMinKvUsage: -0.1}",
            "{holderLoadFactor: 2.5, holderMinKvUsage: 1.5}",
            "{holderLoadFactor: 2.5, holderMinKvUsage: .nan}",
            "{holderMinKvUsage: 0.5}",
        ] {
            let err = build(bad).unwrap_err().to_string();
            assert!(err.contains("holderMinKvUsage"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_holder_load_factor_is_read_and_checked() {
        use crate::scheduling::plugins::test_util::build_from_yaml;
        let build =
            |yaml| build_from_yaml("ttft-cost-producer", yaml, TtftCostProducer::from_params);
        let (p, warnings) = build("{holderLoadFactor: 1.5}").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(p.holder_load_factor, 1.5);
        assert_eq!(
            build("{holderLoadFactor: 0}").unwrap().0.holder_load_factor,
            0.0
        );
        assert_eq!(build("{}").unwrap().0.holder_load_factor, 0.0);
        for bad in [
            "{holderLoadFactor: 0.5}",
            "{holderLoadFactor: -1}",
            "{holderLoadFactor: 10.5}",
            "{holderLoadFactor: .nan}",
            "{holderLoadFactor: .inf}",
        ] {
            let err = build(bad).unwrap_err().to_string();
            assert!(err.contains("holderLoadFactor"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_externality_weight_is_read_and_checked() {
        use crate::scheduling::plugins::test_util::build_from_yaml;
        let build =
            |yaml| build_from_yaml("ttft-cost-producer", yaml, TtftCostProducer::from_params);
        let (p, warnings) = build("{queueExternalityWeight: 0.5}").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(p.queue_externality_weight, 0.5);
        assert_eq!(build("{}").unwrap().0.queue_externality_weight, 0.0);
        for bad in [
            "{queueExternalityWeight: -0.1}",
            "{queueExternalityWeight: 10.5}",
            "{queueExternalityWeight: .nan}",
            "{queueExternalityWeight: .inf}",
        ] {
            let err = build(bad).unwrap_err().to_string();
            assert!(err.contains("queueExternalityWeight"), "{bad}: {err}");
        }
    }
}
