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
            + self.lora_disk_load.as_nanos() * w.lora_disk_loads as u128;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
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
    /// The tokenizer: the built-in stand-in, or a model's own (`--tokenizer`).
    pub tokenizer: crate::tokenizer::Tokenizer,
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
            tokenizer: crate::tokenizer::Tokenizer::BuiltIn,
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
        Ok(())
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
