//! The command line of the `sim` binary; [`Args`] converts into a [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::config::{Config, EngineKind, FailureInjection, KvTiers, LatencyModel};
use crate::tokenizer::Tokenizer;

/// Engine flavour on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// vLLM metric names.
    Vllm,
    /// SGLang metric names.
    Sglang,
}

/// A vLLM-compatible model-server simulator with a calibrated latency model.
#[derive(Debug, Clone, Parser)]
#[command(name = "sim", version, about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0", env = "SIM_HOST")]
    pub host: String,
    /// First port; replica i listens on port + i (0: an ephemeral port for each).
    #[arg(long, default_value_t = 8000, env = "SIM_PORT")]
    pub port: u16,
    /// Number of independent replicas served by this process.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub replicas: usize,
    /// Replica i listens on the `--host` IPv4 address plus i (`--host 127.0.0.2`: 127.0.0.2,
    /// 127.0.0.3, …; on Linux every 127/8 address is loopback) instead of port + i on one
    /// address, and its KV-event endpoints bind that address with their ports as given (no
    /// offset: each replica is rank 0 of its own pod, as one vLLM per pod). An EPP with
    /// `discoverPods: true` then finds replica i's events at `tcp://<its IP>:<socketPort>`.
    #[arg(long)]
    pub ip_per_replica: bool,
    /// Base model name served.
    #[arg(
        long,
        visible_alias = "served-model-name",
        default_value = "meta-llama/Llama-3.1-8B-Instruct"
    )]
    pub model: String,
    /// Which engine's metric names /metrics exposes.
    #[arg(long, value_enum, default_value = "vllm")]
    pub engine: EngineArg,
    /// Pod name for x-inference-pod (replica i > 0 gets "-i" appended); default `sim-<i>`.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Namespace for x-inference-namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Maximum number of sequences in the running batch.
    #[arg(long, default_value_t = 1024)]
    pub max_num_seqs: usize,
    /// Token budget per engine step (chunked prefill + decodes).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Number of KV-cache blocks.
    #[arg(long, default_value_t = 27_000)]
    pub num_gpu_blocks: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Maximum prompt + completion length.
    #[arg(long, default_value_t = 131_072)]
    pub max_model_len: usize,
    /// Fixed cost of an engine step, microseconds.
    #[arg(long, default_value_t = 6000.0, value_parser = non_negative)]
    pub step_overhead_us: f64,
    /// Cost per uncached prompt token computed, microseconds.
    #[arg(long, default_value_t = 30.0, value_parser = non_negative)]
    pub prefill_per_token_us: f64,
    /// Cost per (prompt token, context token) pair of prefill attention, picoseconds.
    #[arg(long, default_value_t = 960)]
    pub attention_per_pair_ps: u64,
    /// Cost per sequence in the batch, microseconds.
    #[arg(long, default_value_t = 40.0, value_parser = non_negative)]
    pub per_seq_us: f64,
    /// Cost per context (KV) token attended by the batch, nanoseconds.
    #[arg(long, default_value_t = 50.0, value_parser = non_negative)]
    pub per_kv_token_ns: f64,
    /// Cost of loading a LoRA adapter into a GPU slot, milliseconds.
    #[arg(long, default_value_t = 25.0, value_parser = non_negative)]
    pub lora_load_ms: f64,
    /// Cost of reading a LoRA adapter from disk again after it fell out of the CPU cache
    /// (--max-cpu-loras), milliseconds.
    #[arg(long, default_value_t = 100.0, value_parser = non_negative)]
    pub lora_disk_load_ms: f64,
    /// Relative jitter of each step time (0 = deterministic), e.g. 0.05 for ±5%.
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    /// Seed of the replicas' RNGs (replica i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of LoRA slots (adapters that can be in the batch at once).
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// vLLM's --max-cpu-loras: adapters kept in the CPU cache (an adapter used after it fell
    /// out is read from disk again, --lora-disk-load-ms); 0 = every registered adapter.
    #[arg(long, default_value_t = 0)]
    pub max_cpu_loras: usize,
    /// Adapters to preload: `name` or `name=path` (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub lora_modules: Vec<String>,
    /// How fast a local LoRA adapter loads, bytes per second (its size on disk / this; 0 = at
    /// once).
    #[arg(long, default_value_t = 2_000_000_000)]
    pub lora_load_bytes_per_second: u64,
    /// Completion tokens per streamed SSE event.
    #[arg(long, default_value_t = 1)]
    pub stream_granularity: usize,
    /// Completion length when a request sets no max_tokens.
    #[arg(long, default_value_t = 128)]
    pub default_max_tokens: usize,
    /// Dimension of /v1/embeddings vectors.
    #[arg(long, default_value_t = 64)]
    pub embedding_dim: usize,
    /// Percentage (0-100) of inference requests answered with an injected error.
    #[arg(long, default_value_t = 0.0)]
    pub failure_injection_rate: f64,
    /// Statuses injected errors use, picked uniformly.
    #[arg(long, value_delimiter = ',', default_value = "429,500,503", value_parser = clap::value_parser!(u16).range(400..=599))]
    pub failure_statuses: Vec<u16>,
    /// Delay before answering /metrics, milliseconds (slow-scrape mode).
    #[arg(long, default_value_t = 0)]
    pub metrics_delay_ms: u64,
    /// Model loading time at start-up, milliseconds: /health is up at once, but /metrics has
    /// no engine series and /v1/models and inference answer 503 until then.
    #[arg(long, default_value_t = 0)]
    pub model_load_time_ms: u64,
    /// vLLM's `--api-key`: every path under /v1 wants `Authorization: Bearer <key>` (401
    /// otherwise); /metrics and /health stay open.
    #[arg(long)]
    pub api_key: Option<String>,
    /// vLLM's `--kv-events-config` JSON, e.g. `{"enable_kv_cache_events": true,
    /// "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}`: publish KV-cache
    /// events over ZMQ. Replica i offsets both ports by i (vLLM offsets them by data-parallel
    /// rank). An empty `topic` becomes `kv@<pod-ip>:<port>@<model>` (llm-d's convention).
    #[arg(long)]
    pub kv_events_config: Option<String>,
    /// The events' msgpack shape: `map` (vLLM 0.24 and later) or `array` (vLLM 0.23 and
    /// earlier).
    #[arg(long, default_value = "map")]
    pub kv_events_encoding: kv_events::Encoding,
    /// The pod IP in the default KV-event topic (default: the listen address, 127.0.0.1 for a
    /// wildcard).
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<String>,
    /// The model's tokenizer, as vLLM's `--tokenizer` (but a local path only: a directory
    /// holding `tokenizer.json` and `tokenizer_config.json`, or the `tokenizer.json` file).
    /// Default: the built-in stand-in tokenizer and template.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A chat template file (Jinja) replacing the tokenizer's own, as vLLM's `--chat-template`;
    /// needs `--tokenizer`.
    #[arg(long, requires = "tokenizer")]
    pub chat_template: Option<PathBuf>,
    /// How the chat template is given message content, as vLLM's
    /// `--chat-template-content-format`: `auto` (detected from the template), `string` or
    /// `openai`; needs `--tokenizer`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "string", "openai"], requires = "tokenizer")]
    pub chat_template_content_format: String,
    /// KV-cache bytes per token, for the load times of the KV tiers (Llama-3.1-8B fp16:
    /// 2 × 32 layers × 8 KV heads × 128 dims × 2 bytes).
    #[arg(long, default_value_t = 131_072)]
    pub kv_bytes_per_token: u64,
    /// Blocks of each replica's CPU tier (vLLM CPU offloading / LMCache local CPU): every
    /// computed block is written through, LRU; 0 = no CPU tier.
    #[arg(long, default_value_t = 0)]
    pub cpu_kv_blocks: usize,
    /// CPU → GPU load bandwidth of the CPU tier, GB/s.
    #[arg(long, default_value_t = 25.0)]
    pub cpu_load_gbps: f64,
    /// Blocks of the store shared by every replica of this process (LMCache remote backend);
    /// 0 = none.
    #[arg(long, default_value_t = 0)]
    pub shared_kv_blocks: usize,
    /// Load bandwidth from the shared store, GB/s.
    #[arg(long, default_value_t = 10.0)]
    pub shared_load_gbps: f64,
    /// Load bandwidth of a pull from the peer named by `x-kv-cache-source-host-port`, GB/s;
    /// 0 = the header is ignored.
    #[arg(long, default_value_t = 10.0)]
    pub p2p_load_gbps: f64,
}

impl Args {
    /// The KV-event publishing settings, `None` unless `--kv-events-config` enables the ZMQ
    /// publisher.
    pub fn kv_events(
        &self,
    ) -> Result<Option<crate::kv_publish::KvEventsSettings>, kv_events::ConfigError> {
        let Some(json) = &self.kv_events_config else {
            return Ok(None);
        };
        let config = kv_events::KvEventsConfig::from_json(json)?;
        Ok(config
            .publishes()
            .then(|| crate::kv_publish::KvEventsSettings {
                config,
                encoding: self.kv_events_encoding,
                pod_ip: self.pod_ip.clone(),
            }))
    }

    /// The listen addresses of `--ip-per-replica`: `--host` plus 0, 1, … `--replicas` - 1.
    pub fn replica_ips(&self) -> Result<Vec<std::net::IpAddr>, crate::SimError> {
        let bad = |why: &str| {
            crate::SimError::InvalidConfig(format!(
                "--ip-per-replica with --host {}: {why}",
                self.host
            ))
        };
        let first: std::net::Ipv4Addr = self
            .host
            .parse()
            .map_err(|_| bad("needs an IPv4 address"))?;
        let first = u32::from(first);
        (0..self.replicas)
            .map(|i| {
                u32::try_from(i)
                    .ok()
                    .and_then(|i| first.checked_add(i))
                    .map(|ip| std::net::IpAddr::V4(ip.into()))
                    .ok_or_else(|| bad("the addresses run past 255.255.255.255"))
            })
            .collect()
    }

    /// The tokenizer the flags name (the built-in one without `--tokenizer`).
    pub fn load_tokenizer(&self) -> Result<Tokenizer, tokenize::LoadError> {
        match &self.tokenizer {
            None => Ok(Tokenizer::BuiltIn),
            Some(path) => Tokenizer::load_with_format(
                path,
                self.chat_template.as_deref(),
                tokenize::ContentFormat::parse(&self.chat_template_content_format),
            ),
        }
    }
}

/// A latency flag: a finite number ≥ 0 (a negative or NaN one became 0 without a word).
fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} must be a finite number ≥ 0")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// A count that must be at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn micros(us: f64) -> Duration {
    nanos(us * 1_000.0)
}

fn nanos(ns: f64) -> Duration {
    Duration::from_nanos(ns.max(0.0).round() as u64)
}

impl From<&Args> for Config {
    fn from(a: &Args) -> Self {
        Config {
            model: a.model.clone(),
            engine: match a.engine {
                EngineArg::Vllm => EngineKind::Vllm,
                EngineArg::Sglang => EngineKind::Sglang,
            },
            pod_name: a.pod_name.clone(),
            namespace: a.namespace.clone(),
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_num_batched_tokens,
            num_gpu_blocks: a.num_gpu_blocks,
            block_size: a.block_size,
            max_model_len: a.max_model_len,
            latency: LatencyModel {
                step_overhead: micros(a.step_overhead_us),
                prefill_per_token: micros(a.prefill_per_token_us),
                attention_per_pair_ps: a.attention_per_pair_ps,
                per_seq: micros(a.per_seq_us),
                per_kv_token: nanos(a.per_kv_token_ns),
                lora_load: micros(a.lora_load_ms * 1_000.0),
                lora_disk_load: micros(a.lora_disk_load_ms * 1_000.0),
                jitter: a.jitter,
            },
            seed: a.seed,
            max_loras: a.max_loras,
            max_cpu_loras: a.max_cpu_loras,
            lora_modules: a
                .lora_modules
                .iter()
                .map(|m| {
                    m.split_once('=')
                        .map_or(m.as_str(), |(name, _)| name)
                        .trim()
                        .to_owned()
                })
                .filter(|m| !m.is_empty())
                .collect(),
            lora_load_bytes_per_second: a.lora_load_bytes_per_second,
            stream_granularity: a.stream_granularity,
            default_max_tokens: a.default_max_tokens,
            embedding_dim: a.embedding_dim,
            failure: FailureInjection {
                rate_percent: a.failure_injection_rate,
                statuses: a.failure_statuses.clone(),
            },
            metrics_delay: Duration::from_millis(a.metrics_delay_ms),
            model_load_time: Duration::from_millis(a.model_load_time_ms),
            api_key: a.api_key.clone().filter(|k| !k.is_empty()),
            // Loading can fail: `Args::load_tokenizer` does it.
            tokenizer: Tokenizer::BuiltIn,
            kv_tiers: KvTiers {
                kv_bytes_per_token: a.kv_bytes_per_token,
                cpu_blocks: a.cpu_kv_blocks,
                cpu_load_gbps: a.cpu_load_gbps,
                shared_blocks: a.shared_kv_blocks,
                shared_load_gbps: a.shared_load_gbps,
                p2p_load_gbps: a.p2p_load_gbps,
            },
        }
    }
}

impl From<Args> for Config {
    fn from(a: Args) -> Self {
        Config::from(&a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_defaults_are_the_default_profile() {
        let args = Args::try_parse_from(["sim"]).unwrap();
        assert_eq!(Config::from(&args), Config::default());
    }

    #[test]
    fn flags_convert() {
        let args = Args::try_parse_from([
            "sim",
            "--engine",
            "sglang",
            "--lora-modules",
            "a=/x,b",
            "--lora-modules",
            "c",
            "--failure-statuses",
            "503",
            "--prefill-per-token-us",
            "12.5",
            "--max-num-seqs",
            "4",
        ])
        .unwrap();
        let c = Config::from(args);
        assert_eq!(c.engine, EngineKind::Sglang);
        assert_eq!(c.lora_modules, ["a", "b", "c"]);
        assert_eq!(c.failure.statuses, [503]);
        assert_eq!(c.latency.prefill_per_token, Duration::from_nanos(12_500));
        assert_eq!(c.max_num_seqs, 4);
    }

    /// Values the simulator cannot honour are refused, naming the flag (they were taken
    /// silently: a 200 "error", a NaN latency as 0, no replica at all).
    #[test]
    fn values_that_cannot_be_honoured_are_refused() {
        for (flag, value) in [
            ("--failure-statuses", "200"),
            ("--failure-statuses", "1000"),
            ("--replicas", "0"),
            ("--step-overhead-us", "-1"),
            ("--per-kv-token-ns", "NaN"),
        ] {
            let e = Args::try_parse_from(["sim", &format!("{flag}={value}")]).unwrap_err();
            assert!(e.to_string().contains(flag), "{flag}={value}: {e}");
        }
        assert!(Args::try_parse_from(["sim", "--failure-statuses", "400,599"]).is_ok());
    }

    #[test]
    fn ip_per_replica_counts_up_from_the_host() {
        let args = Args::try_parse_from([
            "sim",
            "--host",
            "127.0.0.254",
            "--replicas",
            "3",
            "--ip-per-replica",
        ])
        .unwrap();
        assert!(args.ip_per_replica);
        let ips: Vec<String> = args
            .replica_ips()
            .unwrap()
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, ["127.0.0.254", "127.0.0.255", "127.0.1.0"]);
        let args = Args::try_parse_from(["sim", "--host", "::1", "--ip-per-replica"]).unwrap();
        assert!(args.replica_ips().is_err());
        let args =
            Args::try_parse_from(["sim", "--host", "255.255.255.255", "--replicas", "2"]).unwrap();
        assert!(args.replica_ips().is_err());
    }

    #[test]
    fn kv_event_flags_parse() {
        let args = Args::try_parse_from(["sim"]).unwrap();
        assert_eq!(args.kv_events().unwrap(), None);
        assert_eq!(args.kv_events_encoding, kv_events::Encoding::Map);
        // Present but not enabled: vLLM publishes nothing either.
        let args = Args::try_parse_from(["sim", "--kv-events-config", "{}"]).unwrap();
        assert_eq!(args.kv_events().unwrap(), None);
        let args = Args::try_parse_from([
            "sim",
            "--kv-events-config",
            r#"{"enable_kv_cache_events": true, "replay_endpoint": "tcp://*:5558"}"#,
            "--kv-events-encoding",
            "array",
            "--pod-ip",
            "10.1.2.3",
        ])
        .unwrap();
        let s = args.kv_events().unwrap().unwrap();
        assert_eq!(s.encoding, kv_events::Encoding::Array);
        assert_eq!(s.config.endpoint, "tcp://*:5557");
        assert_eq!(s.pod_ip.as_deref(), Some("10.1.2.3"));
        let args =
            Args::try_parse_from(["sim", "--kv-events-config", r#"{"enable": true}"#]).unwrap();
        assert!(args.kv_events().is_err());
        assert!(Args::try_parse_from(["sim", "--kv-events-encoding", "json"]).is_err());
    }

    #[test]
    fn kv_tier_flags() {
        let args = Args::try_parse_from([
            "sim",
            "--cpu-kv-blocks",
            "4096",
            "--cpu-load-gbps",
            "50",
            "--shared-kv-blocks",
            "100000",
            "--shared-load-gbps",
            "5",
            "--p2p-load-gbps",
            "0",
            "--kv-bytes-per-token",
            "65536",
        ])
        .unwrap();
        let t = Config::from(&args).kv_tiers;
        assert_eq!(
            t,
            KvTiers {
                kv_bytes_per_token: 65_536,
                cpu_blocks: 4096,
                cpu_load_gbps: 50.0,
                shared_blocks: 100_000,
                shared_load_gbps: 5.0,
                p2p_load_gbps: 0.0,
            }
        );
        let bad =
            Args::try_parse_from(["sim", "--shared-kv-blocks", "9", "--shared-load-gbps", "0"])
                .unwrap();
        assert!(Config::from(&bad).validate().is_err());
    }

    #[test]
    fn tokenizer_flags() {
        let builtin = Args::try_parse_from(["sim"]).unwrap();
        assert_eq!(builtin.load_tokenizer().unwrap(), Tokenizer::BuiltIn);
        // A chat template alone means nothing: it needs the tokenizer it belongs to.
        assert!(Args::try_parse_from(["sim", "--chat-template", "t.jinja"]).is_err());
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tokenize/testdata");
        let args = Args::try_parse_from([
            "sim",
            "--tokenizer",
            dir,
            "--chat-template",
            &format!("{dir}/chat_template.jinja"),
        ])
        .unwrap();
        let t = args.load_tokenizer().unwrap();
        assert!(matches!(t, Tokenizer::Loaded(ref l) if l.has_chat_template()));
        let missing =
            Args::try_parse_from(["sim", "--tokenizer", "/nonexistent/tokenizer.json"]).unwrap();
        assert!(missing.load_tokenizer().is_err());
    }
}
