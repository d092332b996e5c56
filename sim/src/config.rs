//! Every knob of a simulated replica, with defaults that form the calibrated "Llama-3.1-8B on one
//! H100 SXM" profile (see the crate README for the sources behind each number).

use std::time::Duration;

/// Which engine the replica pretends to be. Only the `/metrics` names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// vLLM V1 metric names (`vllm:num_requests_waiting`, …).
    #[default]
    Vllm,
    /// SGLang metric names (`sglang:num_queue_reqs`, …).
    Sglang,
}

/// The step-time model: one engine step (one forward pass over the scheduled batch) takes
///
/// `step = overhead + prefill_per_token·P + attention_per_pair·A + per_seq·S + per_kv_token·K
///         (+ lora_load·L)`
///
/// where `P` is the number of uncached prompt tokens computed in the step, `A` the (prompt token,
/// context token) pairs their causal attention covers, `S` the number of sequences in the batch,
/// `K` the total context length (KV tokens) those sequences attend over and `L` the number of
/// adapters that had to be loaded into a GPU slot for this step. The result is then scaled by a
/// uniform factor in `[1 - jitter, 1 + jitter]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyModel {
    /// Fixed cost of a step: reading the weights once (decode is memory-bound) plus scheduling.
    pub step_overhead: Duration,
    /// Cost of one prompt token computed in a step (prefill is compute-bound).
    pub prefill_per_token: Duration,
    /// Cost of one (prompt token, context token) pair of prefill attention, in picoseconds:
    /// what makes long prompts super-linear.
    pub attention_per_pair_ps: u64,
    /// Cost of one sequence in the batch (its decode token's FLOPs, sampling, bookkeeping).
    pub per_seq: Duration,
    /// Cost of one token of context read by attention (KV-cache bandwidth).
    pub per_kv_token: Duration,
    /// Cost of bringing a LoRA adapter into a GPU slot.
    pub lora_load: Duration,
    /// Cost of reading an adapter from disk again when it has fallen out of the CPU cache
    /// (`max_cpu_loras`), charged in the step that brings it into a slot.
    pub lora_disk_load: Duration,
    /// Relative jitter applied to each step, `0.0` = none. Drawn from the replica's seeded RNG.
    pub jitter: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self {
            step_overhead: Duration::from_micros(6_000),
            prefill_per_token: Duration::from_nanos(30_000),
            attention_per_pair_ps: 960,
            per_seq: Duration::from_nanos(40_000),
            per_kv_token: Duration::from_nanos(50),
            lora_load: Duration::from_millis(25),
            lora_disk_load: Duration::from_millis(100),
            jitter: 0.0,
        }
    }
}

/// The work in one engine step, the input of [`LatencyModel::step_time`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepWork {
    /// Uncached prompt tokens computed (prefill chunks, recomputation after preemption).
    pub prefill_tokens: usize,
    /// (prompt token, context token) pairs of causal attention over those prefill tokens.
    pub attention_pairs: u64,
    /// Sequences in the batch.
    pub seqs: usize,
    /// Context tokens attended by the batch: Σ over sequences of (computed + new tokens).
    pub kv_tokens: usize,
    /// Adapters loaded into a slot for this step.
    pub lora_loads: usize,
    /// Transfer time of the KV blocks loaded from the CPU tier, the shared store or a peer for
    /// the sequences admitted in this step, summed: the loads share the replica's link and the
    /// sequences' prefill starts after them (see [`KvTiers::load_time`]).
    pub kv_load: Duration,
    /// Of those, adapters read from disk first (not in the CPU cache, `max_cpu_loras`).
    pub lora_disk_loads: usize,
}

impl StepWork {
    /// Adds a prefill chunk of `new` tokens to a sequence that already has `computed` in the KV
    /// cache.
    pub fn add_prefill(&mut self, computed: usize, new: usize) {
        self.prefill_tokens += new;
        self.attention_pairs += attention_pairs(computed, new);
        self.seqs += 1;
        self.kv_tokens += computed + new;
    }

    /// Adds one decode token of a sequence whose context (including that token) is `context`.
    pub fn add_decode(&mut self, context: usize) {
        self.seqs += 1;
        self.kv_tokens += context;
    }
}

/// Causal-attention pairs of a chunk of `new` tokens after `computed` ones: token `k` of the
/// chunk attends to `computed + k + 1` tokens.
pub fn attention_pairs(computed: usize, new: usize) -> u64 {
    let (c, n) = (computed as u64, new as u64);
    n * c + n * (n + 1) / 2
}

impl LatencyModel {
    /// The modelled duration of a step, before jitter.
    pub fn step_time(&self, w: &StepWork) -> Duration {
        let ns = self.step_overhead.as_nanos()
            + self.prefill_per_token.as_nanos() * w.prefill_tokens as u128
            + u128::from(self.attention_per_pair_ps) * u128::from(w.attention_pairs) / 1000
            + self.per_seq.as_nanos() * w.seqs as u128
            + self.per_kv_token.as_nanos() * w.kv_tokens as u128
            + self.lora_load.as_nanos() * w.lora_loads as u128
            + self.lora_disk_load.as_nanos() * w.lora_disk_loads as u128
            + w.kv_load.as_nanos();
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// The KV tiers below the GPU cache and their load bandwidths (the contract shared with the
/// EPP's cost model and the bench: `sim/README.md`, "KV tiers and sharing").
///
/// Loading `n` tokens from a tier costs `n × kv_bytes_per_token / bandwidth`; every tier is off
/// by default except peer pulls, which only happen when a request names a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct KvTiers {
    /// Bytes of KV cache per token (Llama-3.1-8B fp16: 2 × 32 layers × 8 heads × 128 × 2 B).
    pub kv_bytes_per_token: u64,
    /// Blocks of this replica's CPU tier (vLLM CPU offloading / LMCache local CPU); 0 = none.
    pub cpu_blocks: usize,
    /// CPU → GPU load bandwidth, GB/s (10⁹ bytes per second).
    pub cpu_load_gbps: f64,
    /// Blocks of the store shared by every replica of the process (LMCache remote); 0 = none.
    pub shared_blocks: usize,
    /// Shared store → GPU load bandwidth, GB/s.
    pub shared_load_gbps: f64,
    /// Peer → GPU load bandwidth, GB/s; 0 = peer pulls ignored.
    pub p2p_load_gbps: f64,
}

impl Default for KvTiers {
    fn default() -> Self {
        Self {
            kv_bytes_per_token: 131_072,
            cpu_blocks: 0,
            cpu_load_gbps: 25.0,
            shared_blocks: 0,
            shared_load_gbps: 10.0,
            p2p_load_gbps: 10.0,
        }
    }
}

/// A tier a prompt block can be found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The engine's own paged cache.
    Gpu,
    /// The replica's CPU tier.
    Cpu,
    /// The process's shared store (`REMOTE` in the KV events).
    Remote,
    /// Another replica's GPU or CPU tier, named by the request.
    Peer,
}

impl Tier {
    /// Every tier, in lookup order (the order of [`crate::metrics::TierStats`]' arrays).
    pub const ALL: [Tier; 4] = [Tier::Gpu, Tier::Cpu, Tier::Remote, Tier::Peer];

    /// The `tier` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Remote => "remote",
            Tier::Peer => "peer",
        }
    }

    /// Index into per-tier arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl KvTiers {
    /// Whether the replica has anything like vLLM's KV connector: a CPU tier, the shared store
    /// or peer pulls. Without one, the engine and its `/metrics` are exactly as before tiers.
    pub fn connector(&self) -> bool {
        self.cpu_blocks > 0 || self.shared_blocks > 0 || self.p2p_load_gbps > 0.0
    }

    /// The bandwidth of `tier`, GB/s (the GPU has no load).
    pub fn load_gbps(&self, tier: Tier) -> f64 {
        match tier {
            Tier::Gpu => f64::INFINITY,
            Tier::Cpu => self.cpu_load_gbps,
            Tier::Remote => self.shared_load_gbps,
            Tier::Peer => self.p2p_load_gbps,
        }
    }

    /// `tokens × kv_bytes_per_token / bandwidth`: the time to load `tokens` from `tier`.
    pub fn load_time(&self, tier: Tier, tokens: usize) -> Duration {
        let gbps = self.load_gbps(tier);
        if tokens == 0 || gbps.is_nan() || gbps <= 0.0 || gbps.is_infinite() {
            return Duration::ZERO;
        }
        let bytes = tokens as f64 * self.kv_bytes_per_token as f64;
        let ns = (bytes / gbps).round(); // bytes / (GB/s) = ns
        Duration::from_nanos(if ns >= u64::MAX as f64 {
            u64::MAX
        } else {
            ns as u64
        })
    }

    fn validate(&self) -> Result<(), &'static str> {
        let ok = |g: f64| g.is_finite() && g >= 0.0;
        if !ok(self.cpu_load_gbps) || !ok(self.shared_load_gbps) || !ok(self.p2p_load_gbps) {
            return Err("KV tier load bandwidths must be finite and ≥ 0");
        }
        if (self.cpu_blocks > 0 && self.cpu_load_gbps == 0.0)
            || (self.shared_blocks > 0 && self.shared_load_gbps == 0.0)
        {
            return Err("a CPU tier or shared store needs a load bandwidth > 0");
        }
        if self.connector() && self.kv_bytes_per_token == 0 {
            return Err("kv-bytes-per-token must be at least 1");
        }
        Ok(())
    }
}

/// Failure injection: a share of inference requests answered with an error status instead.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureInjection {
    /// Percentage (0–100) of inference requests that fail.
    pub rate_percent: f64,
    /// Statuses to pick from, uniformly (e.g. 429, 500, 503).
    pub statuses: Vec<u16>,
}

impl Default for FailureInjection {
    fn default() -> Self {
        Self {
            rate_percent: 0.0,
            statuses: vec![429, 500, 503],
        }
    }
}

/// Every engine and server knob of one replica. `Default` is the calibrated default profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The base model name served (`--served-model-name`).
    pub model: String,
    /// Which engine's metric names to expose.
    pub engine: EngineKind,
    /// Pod identity for `x-inference-pod`; `None` means `sim-<index>`.
    pub pod_name: Option<String>,
    /// Namespace for `x-inference-namespace`, when set.
    pub namespace: Option<String>,
    /// At most this many sequences run (are in the batch) at once.
    pub max_num_seqs: usize,
    /// Token budget of one step, shared by prefill chunks and decodes.
    pub max_num_batched_tokens: usize,
    /// Number of KV-cache blocks.
    pub num_gpu_blocks: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Longest prompt + completion accepted.
    pub max_model_len: usize,
    /// The step-time model.
    pub latency: LatencyModel,
    /// Seed of the replica's RNG (jitter, failure injection, generated text); replica `i` uses
    /// `seed + i`.
    pub seed: u64,
    /// Number of LoRA adapters that can be in the batch (GPU slots) at once.
    pub max_loras: usize,
    /// Adapters registered at start-up (the first `max_loras` are also resident in a slot).
    pub lora_modules: Vec<String>,
    /// vLLM's `--max-cpu-loras`: adapters kept in the CPU cache; one used after it fell out is
    /// read from disk again ([`LatencyModel::lora_disk_load`]). 0 = unbounded (vLLM's
    /// default is `max_loras`; the simulator keeps every registered adapter unless told).
    pub max_cpu_loras: usize,
    /// How fast `POST /v1/load_lora_adapter` reads a local adapter, in bytes per second: the
    /// load answers after the adapter's size on disk divided by this (0 = at once). A Hugging
    /// Face id has no size here and loads at once.
    pub lora_load_bytes_per_second: u64,
    /// Completion tokens per streamed SSE event (1 = every token, like vLLM).
    pub stream_granularity: usize,
    /// Completion length when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
    /// Dimension of `/v1/embeddings` vectors.
    pub embedding_dim: usize,
    /// Failure injection at start-up (changeable at runtime).
    pub failure: FailureInjection,
    /// Delay before answering `/metrics` (slow-scrape mode), changeable at runtime.
    pub metrics_delay: Duration,
    /// Time the model takes to "load" after start-up: the port is open and `/health` answers
    /// 200 at once (as vLLM's does early), but `/metrics` carries no engine series,
    /// `/v1/models` and inference answer 503 until it has passed.
    pub model_load_time: Duration,
    /// vLLM's `--api-key`: every path under `/v1` wants `Authorization: Bearer <key>` (401
    /// otherwise); `/metrics`, `/health` and the rest stay open, as vLLM leaves them.
    pub api_key: Option<String>,
    /// The tokenizer: the built-in stand-in, or a model's own (`--tokenizer`).
    pub tokenizer: crate::tokenizer::Tokenizer,
    /// KV tiers below the GPU cache (CPU, shared store, peers) and their load costs.
    pub kv_tiers: KvTiers,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model: "meta-llama/Llama-3.1-8B-Instruct".to_owned(),
            engine: EngineKind::Vllm,
            pod_name: None,
            namespace: None,
            max_num_seqs: 1024,
            max_num_batched_tokens: 8192,
            num_gpu_blocks: 27_000,
            block_size: 16,
            max_model_len: 131_072,
            latency: LatencyModel::default(),
            seed: 0,
            max_loras: 1,
            lora_modules: Vec::new(),
            max_cpu_loras: 0,
            // Local NVMe into host memory, about what vLLM's adapter loading reaches.
            lora_load_bytes_per_second: 2_000_000_000,
            stream_granularity: 1,
            default_max_tokens: 128,
            embedding_dim: 64,
            failure: FailureInjection::default(),
            metrics_delay: Duration::ZERO,
            model_load_time: Duration::ZERO,
            api_key: None,
            tokenizer: crate::tokenizer::Tokenizer::BuiltIn,
            kv_tiers: KvTiers::default(),
        }
    }
}

impl Config {
    /// A profile for functional tests where latency does not matter: 1 ms steps, near-free
    /// prefill, 16-token completions by default. Capacity knobs keep their defaults.
    pub fn fast() -> Self {
        Self {
            latency: LatencyModel {
                step_overhead: Duration::from_millis(1),
                prefill_per_token: Duration::from_nanos(100),
                attention_per_pair_ps: 0,
                per_seq: Duration::from_micros(1),
                per_kv_token: Duration::ZERO,
                lora_load: Duration::from_millis(1),
                lora_disk_load: Duration::from_millis(1),
                jitter: 0.0,
            },
            default_max_tokens: 16,
            ..Self::default()
        }
    }

    /// The pod name replica `index` reports.
    pub fn pod_name_for(&self, index: usize) -> String {
        match &self.pod_name {
            Some(name) if index == 0 => name.clone(),
            Some(name) => format!("{name}-{index}"),
            None => format!("sim-{index}"),
        }
    }

    /// Checks the knobs that would make the engine unable to run.
    pub fn validate(&self) -> Result<(), crate::SimError> {
        let bad = |what: &str| Err(crate::SimError::InvalidConfig(what.to_owned()));
        if self.max_num_seqs == 0 {
            return bad("max-num-seqs must be at least 1");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max-num-batched-tokens must be at least 1");
        }
        if self.block_size == 0 || self.num_gpu_blocks == 0 {
            return bad("block-size and num-gpu-blocks must be at least 1");
        }
        if self.stream_granularity == 0 {
            return bad("stream-granularity must be at least 1");
        }
        if !(0.0..=100.0).contains(&self.failure.rate_percent) {
            return bad("failure-injection-rate must be within 0..=100");
        }
        if !(0.0..1.0).contains(&self.latency.jitter) {
            return bad("jitter must be within 0..1");
        }
        self.kv_tiers.validate().or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_time_adds_the_terms() {
        let m = LatencyModel::default();
        assert_eq!(m.step_time(&StepWork::default()), Duration::from_millis(6));
        let mut w = StepWork::default();
        w.add_prefill(0, 1000);
        assert_eq!(w.attention_pairs, 500_500);
        // 6 ms + 1000 × 30 µs + 500 500 × 0.96 ns + one sequence 40 µs + 1000 KV tokens × 50 ns.
        assert_eq!(
            m.step_time(&w),
            Duration::from_nanos(6_000_000 + 30_000_000 + 480_480 + 40_000 + 50_000)
        );
        w.add_decode(2000);
        assert_eq!(w.seqs, 2);
        assert_eq!(w.kv_tokens, 3000);
        assert_eq!(attention_pairs(10, 2), 10 * 2 + 3);
    }

    #[test]
    fn pod_names() {
        let mut c = Config::default();
        assert_eq!(c.pod_name_for(3), "sim-3");
        c.pod_name = Some("vllm".into());
        assert_eq!(c.pod_name_for(0), "vllm");
        assert_eq!(c.pod_name_for(2), "vllm-2");
    }
}
