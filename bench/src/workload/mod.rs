//! Seeded, generated workloads (nothing is downloaded).
//!
//! A workload is an endless, deterministic sequence of OpenAI requests: the same seed and
//! parameters give byte-identical bodies in the same order, so every router in a comparison
//! sees exactly the same traffic.
//!
//! | name | shape |
//! | --- | --- |
//! | `shared-prefix` | G groups, each a long system prompt shared by its requests + a unique question (upstream's prefix benchmark layout) |
//! | `multi-turn` | users holding conversations whose history grows every round |
//! | `mixed` | lognormal prompt/output lengths, like chat traffic; no sharing |
//! | `lora` | `mixed` spread over LoRA adapters with Zipf-skewed popularity |
//! | `long-prompt` | fixed-size prompts of N bytes (220 KB by default), unique per request |
//! | `hot-spot` | `shared-prefix` with Zipf-skewed group popularity: a few prefixes far more popular than the rest |
//! | `cache-pressure` | `shared-prefix` whose prefixes together exceed the cluster's KV cache (uniform popularity) |
//! | `kv-sharing` | `shared-prefix` whose prefixes exceed the cluster's GPU KV tier but fit GPU + CPU + shared tiers (uniform popularity) |

mod generators;
pub mod text;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

pub use generators::{LongPrompt, Lora, Mixed, MultiTurn, SharedPrefix, ShiftingLora};

/// The model every workload asks for (the simulator's default served name).
pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// One request, ready to send.
#[derive(Debug, Clone)]
pub struct Request {
    /// The JSON body.
    pub body: Bytes,
    /// `/v1/chat/completions` or `/v1/completions`.
    pub path: &'static str,
    /// What the request belongs to (group, user, adapter), for analysis.
    pub key: String,
    /// Completion tokens asked for (the simulator generates exactly this many).
    pub max_tokens: u32,
    /// Prompt tokens as the simulator counts them, before the chat template.
    pub prompt_tokens: u32,
}

/// A source of requests.
pub trait Workload: Send {
    /// The next request of the sequence.
    fn next_request(&mut self) -> Request;
}

/// Which workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Groups sharing a long system prompt.
    SharedPrefix,
    /// Growing conversations.
    MultiTurn,
    /// Lognormal lengths, no sharing.
    Mixed,
    /// Adapters with skewed popularity.
    Lora,
    /// Fixed-size long prompts.
    LongPrompt,
    /// Groups sharing a long system prompt, Zipf-skewed popularity.
    HotSpot,
    /// Groups sharing a long system prompt, more of them than the KV caches hold.
    CachePressure,
    /// Groups sharing a long system prompt, more than the GPU KV tier holds but fewer than the
    /// GPU, CPU and shared tiers together (sized by the scenario from the tier flags).
    KvSharing,
}

impl Kind {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SharedPrefix => "shared-prefix",
            Kind::MultiTurn => "multi-turn",
            Kind::Mixed => "mixed",
            Kind::Lora => "lora",
            Kind::LongPrompt => "long-prompt",
            Kind::HotSpot => "hot-spot",
            Kind::CachePressure => "cache-pressure",
            Kind::KvSharing => "kv-sharing",
        }
    }
}

/// Every workload knob; each workload reads its own.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct WorkloadArgs {
    /// Workload.
    #[arg(long, value_enum, default_value_t = Kind::SharedPrefix)]
    pub workload: Kind,
    /// RNG seed of the workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Completion tokens per request (shared-prefix, multi-turn, long-prompt).
    #[arg(long, default_value_t = 64)]
    pub output_tokens: u32,
    /// shared-prefix, hot-spot, cache-pressure: number of groups.
    #[arg(long, default_value_t = 150)]
    pub groups: usize,
    /// shared-prefix, hot-spot, cache-pressure: system-prompt tokens per group.
    #[arg(long, default_value_t = 6000)]
    pub system_tokens: usize,
    /// shared-prefix, hot-spot, cache-pressure: question tokens per request.
    #[arg(long, default_value_t = 1200)]
    pub question_tokens: usize,
    /// multi-turn: conversations open at once.
    #[arg(long, default_value_t = 64)]
    pub users: usize,
    /// multi-turn: rounds per conversation before the user leaves (a new one takes the slot).
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// multi-turn: system-prompt tokens (one per user).
    #[arg(long, default_value_t = 2000)]
    pub user_system_tokens: usize,
    /// multi-turn: tokens of each user message.
    #[arg(long, default_value_t = 300)]
    pub turn_tokens: usize,
    /// multi-turn: tokens of each (synthetic) assistant reply kept in the history.
    #[arg(long, default_value_t = 200)]
    pub reply_tokens: usize,
    /// mixed/lora: median prompt tokens (lognormal).
    #[arg(long, default_value_t = 600.0)]
    pub prompt_median: f64,
    /// mixed/lora: sigma of ln(prompt tokens).
    #[arg(long, default_value_t = 0.9)]
    pub prompt_sigma: f64,
    /// mixed/lora: median output tokens (lognormal).
    #[arg(long, default_value_t = 128.0)]
    pub output_median: f64,
    /// mixed/lora: sigma of ln(output tokens).
    #[arg(long, default_value_t = 0.7)]
    pub output_sigma: f64,
    /// lora: number of adapters (`lora-0` … `lora-{N-1}`).
    #[arg(long, default_value_t = 8)]
    pub adapters: usize,
    /// lora: Zipf exponent of adapter popularity.
    #[arg(long, default_value_t = 1.2)]
    pub zipf: f64,
    /// long-prompt: body size in bytes.
    #[arg(long, default_value_t = 220 * 1024)]
    pub prompt_bytes: usize,
    /// hot-spot: Zipf exponent of group popularity (group k drawn ∝ 1 / (k + 1)^s).
    #[arg(long, default_value_t = 1.5)]
    pub prefix_zipf: f64,
}

impl Default for WorkloadArgs {
    fn default() -> Self {
        WorkloadArgs {
            workload: Kind::SharedPrefix,
            seed: 42,
            output_tokens: 64,
            groups: 150,
            system_tokens: 6000,
            question_tokens: 1200,
            users: 64,
            rounds: 10,
            user_system_tokens: 2000,
            turn_tokens: 300,
            reply_tokens: 200,
            prompt_median: 600.0,
            prompt_sigma: 0.9,
            output_median: 128.0,
            output_sigma: 0.7,
            adapters: 8,
            zipf: 1.2,
            prompt_bytes: 220 * 1024,
            prefix_zipf: 1.5,
        }
    }
}

impl WorkloadArgs {
    /// Builds the workload these arguments describe.
    pub fn build(&self) -> Box<dyn Workload> {
        match self.workload {
            Kind::SharedPrefix | Kind::CachePressure | Kind::KvSharing => {
                Box::new(SharedPrefix::new(
                    self.seed,
                    self.groups,
                    self.system_tokens,
                    self.question_tokens,
                    self.output_tokens,
                ))
            }
            Kind::HotSpot => Box::new(
                SharedPrefix::new(
                    self.seed,
                    self.groups,
                    self.system_tokens,
                    self.question_tokens,
                    self.output_tokens,
                )
                .with_zipf(self.prefix_zipf),
            ),
            Kind::MultiTurn => Box::new(MultiTurn::new(
                self.seed,
                self.users,
                self.rounds,
                self.user_system_tokens,
                self.turn_tokens,
                self.reply_tokens,
                self.output_tokens,
            )),
            Kind::Mixed => Box::new(Mixed::new(
                self.seed,
                self.prompt_median,
                self.prompt_sigma,
                self.output_median,
                self.output_sigma,
            )),
            Kind::Lora => Box::new(Lora::new(
                self.seed,
                self.adapters,
                self.zipf,
                Mixed::new(
                    self.seed ^ 0x10ad,
                    self.prompt_median,
                    self.prompt_sigma,
                    self.output_median,
                    self.output_sigma,
                ),
            )),
            Kind::LongPrompt => Box::new(LongPrompt::new(
                self.seed,
                self.prompt_bytes,
                self.output_tokens,
            )),
        }
    }

    /// Tokens of distinct shared prefixes (the reusable working set) of the prefix workloads.
    pub fn prefix_working_set_tokens(&self) -> Option<u64> {
        matches!(
            self.workload,
            Kind::SharedPrefix | Kind::HotSpot | Kind::CachePressure | Kind::KvSharing
        )
        .then(|| self.groups as u64 * self.system_tokens as u64)
    }

    /// The same workload with every prompt-length knob multiplied by `factor` (rounded, at
    /// least 1); output lengths stay (the engine generates exactly `max_tokens`, whatever its
    /// tokenizer). Used to keep the engines' prompt lengths when they tokenize finer.
    pub fn scaled_prompts(&self, factor: f64) -> WorkloadArgs {
        let n = |x: usize| ((x as f64 * factor).round() as usize).max(1);
        WorkloadArgs {
            system_tokens: n(self.system_tokens),
            question_tokens: n(self.question_tokens),
            user_system_tokens: n(self.user_system_tokens),
            turn_tokens: n(self.turn_tokens),
            reply_tokens: n(self.reply_tokens),
            prompt_median: (self.prompt_median * factor).max(1.0),
            prompt_bytes: n(self.prompt_bytes),
            ..self.clone()
        }
    }

    /// The adapter names the `lora` workload uses (the simulator must register them).
    pub fn adapter_names(&self) -> Vec<String> {
        (0..self.adapters).map(|i| format!("lora-{i}")).collect()
    }
}
