//! Engine metric mappings: which series of which engine mean queue depth, running requests,
//! KV-cache use, LoRA state and cache geometry, and how to read them from an exposition.
//!
//! The built-in tables follow the reference EPP's `core-metrics-extractor` (vLLM, SGLang,
//! trtllm-serve, Triton TensorRT-LLM). A mapping may list several specs for one field; the
//! first spec that matches any series wins (so vLLM's renamed KV metric falls back to the old
//! `vllm:gpu_cache_usage_perc` on pre-0.10 servers).

use std::str::FromStr;

use super::prometheus::{self, Sample};
use crate::datastore::{EngineMetrics, Readiness};

/// A PromQL-style instant selector: `name` or `name{label="value",…}` (quotes optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    /// Metric name.
    pub name: String,
    /// Label equality matchers.
    pub matchers: Vec<(String, String)>,
}

/// A malformed metric spec string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid metric spec {spec:?}: {reason}")]
pub struct SpecError {
    /// The offending spec.
    pub spec: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for MetricSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpecError {
            spec: s.to_owned(),
            reason,
        };
        let s = s.trim();
        let (name, rest) = match s.find('{') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(err("empty metric name"));
        }
        let mut matchers = Vec::new();
        if let Some(rest) = rest {
            let body = rest
                .strip_suffix('}')
                .ok_or_else(|| err("missing closing brace"))?;
            for part in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = part
                    .split_once('=')
                    .ok_or_else(|| err("matcher without '='"))?;
                let v = v.trim().trim_matches('"');
                matchers.push((k.trim().to_owned(), v.to_owned()));
            }
        }
        Ok(Self {
            name: name.to_owned(),
            matchers,
        })
    }
}

impl MetricSpec {
    fn matches(&self, sample: &Sample<'_>) -> bool {
        sample.name == self.name
            && self
                .matchers
                .iter()
                .all(|(k, v)| sample.label(k).is_some_and(|got| got == v.as_str()))
    }

    fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            matchers: Vec::new(),
        }
    }

    fn with(name: &str, key: &str, value: &str) -> Self {
        Self {
            name: name.to_owned(),
            matchers: vec![(key.to_owned(), value.to_owned())],
        }
    }
}

/// How an engine reports its KV-cache geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheInfoSpec {
    /// An info metric whose labels carry block size and block count.
    Labels {
        /// The info metric.
        metric: MetricSpec,
        /// Label with tokens per block.
        block_size_label: String,
        /// Label with the number of blocks.
        num_blocks_label: String,
    },
    /// Two gauges.
    Gauges {
        /// Gauge with tokens per block.
        block_size: MetricSpec,
        /// Gauge with the number of blocks.
        num_blocks: MetricSpec,
    },
}

/// The metric mapping of one engine type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMapping {
    /// Engine name (`vllm`, `sglang`, `trtllm-serve`, `triton`).
    pub name: String,
    /// Waiting-queue size, in order of preference.
    pub queued: Vec<MetricSpec>,
    /// Running requests, in order of preference.
    pub running: Vec<MetricSpec>,
    /// KV-cache utilisation (0–1), in order of preference.
    pub kv_usage: Vec<MetricSpec>,
    /// LoRA info metric (vLLM only).
    pub lora_info: Option<MetricSpec>,
    /// Cache geometry.
    pub cache_info: Option<CacheInfoSpec>,
    /// The engine's own signal that it serves its model, checked before an endpoint becomes a
    /// candidate (`None`: its metrics series are the signal).
    pub readiness: Option<ReadinessProbe>,
}

/// How an engine says it serves its model, beyond answering `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadinessProbe {
    /// `GET <path>` on the inference port answers 200 with an OpenAI model list holding at
    /// least one model (vLLM's, SGLang's and trtllm-serve's `/v1/models`).
    ModelList(String),
    /// `GET <path>` on the inference port answers 2xx (Triton's `/v2/health/ready`).
    Status(String),
}

impl EngineMapping {
    /// vLLM (v1 names, with the pre-0.10 KV metric as fallback).
    pub fn vllm() -> Self {
        Self {
            name: "vllm".into(),
            queued: vec![MetricSpec::named("vllm:num_requests_waiting")],
            running: vec![MetricSpec::named("vllm:num_requests_running")],
            kv_usage: vec![
                MetricSpec::named("vllm:kv_cache_usage_perc"),
                MetricSpec::named("vllm:gpu_cache_usage_perc"),
            ],
            lora_info: Some(MetricSpec::named("vllm:lora_requests_info")),
            cache_info: Some(CacheInfoSpec::Labels {
                metric: MetricSpec::named("vllm:cache_config_info"),
                block_size_label: "block_size".into(),
                num_blocks_label: "num_gpu_blocks".into(),
            }),
            readiness: Some(ReadinessProbe::ModelList("/v1/models".into())),
        }
    }

    /// SGLang.
    pub fn sglang() -> Self {
        Self {
            name: "sglang".into(),
            queued: vec![MetricSpec::named("sglang:num_queue_reqs")],
            running: vec![MetricSpec::named("sglang:num_running_reqs")],
            kv_usage: vec![MetricSpec::named("sglang:token_usage")],
            lora_info: None,
            cache_info: Some(CacheInfoSpec::Labels {
                metric: MetricSpec::named("sglang:cache_config_info"),
                block_size_label: "page_size".into(),
                num_blocks_label: "num_pages".into(),
            }),
            readiness: Some(ReadinessProbe::ModelList("/v1/models".into())),
        }
    }

    /// trtllm-serve.
    pub fn trtllm_serve() -> Self {
        Self {
            name: "trtllm-serve".into(),
            queued: vec![MetricSpec::named("trtllm_num_requests_waiting")],
            running: vec![MetricSpec::named("trtllm_num_requests_running")],
            kv_usage: vec![MetricSpec::named("trtllm_kv_cache_utilization")],
            lora_info: None,
            cache_info: Some(CacheInfoSpec::Gauges {
                block_size: MetricSpec::named("trtllm_kv_cache_tokens_per_block"),
                num_blocks: MetricSpec::named("trtllm_kv_cache_max_blocks"),
            }),
            readiness: Some(ReadinessProbe::ModelList("/v1/models".into())),
        }
    }

    /// Triton with the TensorRT-LLM backend.
    pub fn triton() -> Self {
        let block = "nv_trt_llm_kv_cache_block_metrics";
        Self {
            name: "triton".into(),
            queued: vec![MetricSpec::with(
                "nv_trt_llm_request_metrics",
                "request_type",
                "waiting",
            )],
            running: vec![MetricSpec::with(
                "nv_trt_llm_request_metrics",
                "request_type",
                "scheduled",
            )],
            kv_usage: vec![MetricSpec::with(block, "kv_cache_block_type", "fraction")],
            lora_info: None,
            cache_info: Some(CacheInfoSpec::Gauges {
                block_size: MetricSpec::with(block, "kv_cache_block_type", "tokens_per"),
                num_blocks: MetricSpec::with(block, "kv_cache_block_type", "max"),
            }),
            readiness: Some(ReadinessProbe::Status("/v2/health/ready".into())),
        }
    }

    /// The built-in mappings.
    pub fn builtin() -> Vec<Self> {
        vec![
            Self::vllm(),
            Self::sglang(),
            Self::trtllm_serve(),
            Self::triton(),
        ]
    }

    /// Reads an exposition into engine metrics. Missing series leave their field at its
    /// default; a malformed line is skipped (the rest of the scrape is still useful) and counted.
    pub fn extract(&self, text: &str) -> Extracted {
        let mut best = Fields::default();
        let mut latest_lora: Option<Sample<'_>> = None;
        let mut bad_lines = 0usize;
        // Only the families this mapping reads are parsed (an engine exposes hundreds of
        // series, histograms mostly, and reads a handful): the same values, a fraction of the
        // work. `bad_lines` therefore counts malformed lines of those families only.
        let names: Vec<&str> = self.metric_specs().map(|spec| spec.name.as_str()).collect();
        let wanted = |name: &str| names.contains(&name);
        for sample in prometheus::samples_named(text, &wanted) {
            let Ok(sample) = sample else {
                bad_lines += 1;
                continue;
            };
            if self.queued.iter().any(|spec| spec.matches(&sample))
                && let Some(model) = sample.label(MODEL_NAME_LABEL)
            {
                best.note_served(&model);
            }
            best.offer_ranked(&self.queued, &sample, Field::Queued);
            best.offer_ranked(&self.running, &sample, Field::Running);
            best.offer_ranked(&self.kv_usage, &sample, Field::Kv);
            // The adapter lists are read once, from the latest line: reading every line that
            // raised the best (each up to 2 × 256 names) cost an engine's page of thousands
            // of such lines millions of allocations a scrape.
            if let Some(spec) = &self.lora_info
                && spec.matches(&sample)
                && latest_lora
                    .as_ref()
                    .is_none_or(|l: &Sample<'_>| sample.value > l.value)
            {
                latest_lora = Some(sample.clone());
            }
            match &self.cache_info {
                Some(CacheInfoSpec::Labels {
                    metric,
                    block_size_label,
                    num_blocks_label,
                }) if metric.matches(&sample) => {
                    best.block_size = sample
                        .label(block_size_label)
                        .and_then(|v| v.trim().parse().ok());
                    best.num_blocks = sample
                        .label(num_blocks_label)
                        .and_then(|v| v.trim().parse().ok());
                }
                Some(CacheInfoSpec::Gauges {
                    block_size,
                    num_blocks,
                }) => {
                    if block_size.matches(&sample) && sample.value.is_finite() && sample.value > 0.0
                    {
                        best.block_size = Some(sample.value as u32);
                    }
                    if num_blocks.matches(&sample) && sample.value.is_finite() && sample.value > 0.0
                    {
                        best.num_blocks = Some(sample.value as u64);
                    }
                }
                _ => {}
            }
        }
        let (active, waiting, max) = latest_lora.as_ref().map(lora_from).unwrap_or_default();
        Extracted {
            metrics: EngineMetrics {
                waiting_queue_size: best.queued.map_or(0, |s| count(s.value)),
                running_requests: best.running.map_or(0, |s| count(s.value)),
                kv_cache_usage: best.kv.map_or(0.0, |s| non_negative(s.value).min(1.0)),
                served_models: best.served,
                active_models: active,
                waiting_models: waiting,
                max_active_models: max,
                // Sizes an engine reports that no engine has are dropped: the prefix index
                // sizes itself from them.
                cache_block_size: best.block_size.filter(|b| (1..=MAX_BLOCK_SIZE).contains(b)),
                cache_num_blocks: best.num_blocks.filter(|n| (1..=MAX_NUM_BLOCKS).contains(n)),
                updated_at: None,
                quiet_until: None,
                readiness: Readiness::Unknown,
                awaiting_check: false,
            },
            found_core: best.queued.is_some() && best.running.is_some() && best.kv.is_some(),
            missing_core: [
                ("queued", best.queued.is_none() && !self.queued.is_empty()),
                (
                    "running",
                    best.running.is_none() && !self.running.is_empty(),
                ),
                ("kv usage", best.kv.is_none() && !self.kv_usage.is_empty()),
            ]
            .into_iter()
            .filter_map(|(what, missing)| missing.then_some(what))
            .collect(),
            found_any_core: best.queued.is_some() || best.running.is_some() || best.kv.is_some(),
            bad_lines,
        }
    }
}

impl EngineMapping {
    /// Every metric this mapping reads.
    fn metric_specs(&self) -> impl Iterator<Item = &MetricSpec> {
        let cache: [Option<&MetricSpec>; 2] = match &self.cache_info {
            Some(CacheInfoSpec::Labels { metric, .. }) => [Some(metric), None],
            Some(CacheInfoSpec::Gauges {
                block_size,
                num_blocks,
            }) => [Some(block_size), Some(num_blocks)],
            None => [None, None],
        };
        self.queued
            .iter()
            .chain(&self.running)
            .chain(&self.kv_usage)
            .chain(self.lora_info.as_ref())
            .chain(cache.into_iter().flatten())
    }
}

/// The largest KV block an engine may report, in tokens (vLLM's are 16 to 256).
const MAX_BLOCK_SIZE: u32 = 1 << 16;
/// The most KV blocks an engine may report (SGLang counts pages of one token: 16 million
/// tokens of cache).
const MAX_NUM_BLOCKS: u64 = 1 << 24;

/// The label naming the served model on vLLM's, SGLang's and TRT-LLM's series.
pub const MODEL_NAME_LABEL: &str = "model_name";
/// Most served model names kept per endpoint.
pub const MAX_SERVED_MODELS: usize = 16;
/// Most adapters kept per list (running, waiting) of an endpoint's LoRA series.
pub const MAX_LORA_ADAPTERS: usize = 256;
/// Longest served model name (or adapter name) kept.
const MAX_SERVED_MODEL_BYTES: usize = 256;

/// The result of reading one exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The values read (with `updated_at` unset; the scraper stamps it).
    pub metrics: EngineMetrics,
    /// Whether queue, running and KV series were all present.
    pub found_core: bool,
    /// Whether any of them was: the engine is up (a process still loading its model exposes
    /// none of them).
    pub found_any_core: bool,
    /// Which of those the mapping reads were not (`queued`, `running`, `kv usage`): read as 0.
    pub missing_core: Vec<&'static str>,
    /// Lines that did not parse.
    pub bad_lines: usize,
}

fn non_negative(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

/// Most requests an engine is believed to hold running or waiting: far above any engine's
/// batch and queue, and low enough that summing a pool's counts cannot overflow.
const MAX_REPORTED_REQUESTS: f64 = 1e9;

/// A request count an engine reports, bounded.
fn count(v: f64) -> u64 {
    non_negative(v).min(MAX_REPORTED_REQUESTS) as u64
}

type Lora = (Vec<String>, Vec<String>, u32);

fn lora_from(sample: &Sample<'_>) -> Lora {
    let list = |key: &str| -> Vec<String> {
        sample
            .label(key)
            .map(|v| {
                // Bounded as the served models are: the LoRA filters and scorers walk these
                // lists for every candidate of every request.
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.len() <= MAX_SERVED_MODEL_BYTES)
                    .take(MAX_LORA_ADAPTERS)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let max = sample
        .label("max_lora")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (
        list("running_lora_adapters"),
        list("waiting_lora_adapters"),
        max,
    )
}

#[derive(Clone, Copy)]
enum Field {
    Queued,
    Running,
    Kv,
}

#[derive(Clone, Copy)]
struct Chosen {
    rank: usize,
    timestamp: i64,
    value: f64,
}

#[derive(Default)]
struct Fields {
    queued: Option<Chosen>,
    running: Option<Chosen>,
    kv: Option<Chosen>,
    block_size: Option<u32>,
    num_blocks: Option<u64>,
    served: Vec<String>,
}

impl Fields {
    /// Notes a served model name, bounded: an engine is trusted to name its models, not to
    /// grow the EPP's memory.
    fn note_served(&mut self, model: &str) {
        if self.served.len() < MAX_SERVED_MODELS
            && !model.is_empty()
            && model.len() <= MAX_SERVED_MODEL_BYTES
            && !model.chars().any(char::is_control)
            && !self.served.iter().any(|m| m == model)
        {
            self.served.push(model.to_owned());
        }
    }

    /// Keeps the sample if it matches a more preferred spec, or the same spec with a newer
    /// timestamp (several matching series: the newest wins, as in the reference).
    fn offer_ranked(&mut self, specs: &[MetricSpec], sample: &Sample<'_>, field: Field) {
        let Some(rank) = specs.iter().position(|s| s.matches(sample)) else {
            return;
        };
        let slot = match field {
            Field::Queued => &mut self.queued,
            Field::Running => &mut self.running,
            Field::Kv => &mut self.kv,
        };
        let candidate = Chosen {
            rank,
            timestamp: sample.timestamp_ms.unwrap_or(i64::MIN),
            value: sample.value,
        };
        let better = match slot {
            None => true,
            Some(cur) => {
                rank < cur.rank || (rank == cur.rank && candidate.timestamp >= cur.timestamp)
            }
        };
        if better {
            *slot = Some(candidate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a vLLM exposition holds besides the few series read: histograms, counters, process
    /// metrics, and a malformed line in a family nobody reads.
    fn noise() -> String {
        let mut out = String::new();
        for family in [
            "vllm:e2e_request_latency_seconds",
            "vllm:time_to_first_token_seconds",
        ] {
            out.push_str(&format!(
                "# HELP {family} latency\n# TYPE {family} histogram\n"
            ));
            for le in ["0.1", "0.5", "1.0", "+Inf"] {
                out.push_str(&format!(
                    "{family}_bucket{{model_name=\"m\",le=\"{le}\"}} 7\n"
                ));
            }
            out.push_str(&format!(
                "{family}_sum{{model_name=\"m\"}} 3.5\n{family}_count 7\n"
            ));
        }
        out.push_str("process_cpu_seconds_total 12.5\npython_gc_objects_collected_total{generation=\"0\"} 9\n");
        out.push_str("vllm:num_requests_waiting_not_this_one 99\n");
        out.push_str("unread_family{broken 1\n");
        out
    }

    #[test]
    fn unread_families_are_skipped_yet_the_values_are_identical() {
        let core = "vllm:num_requests_waiting{model_name=\"m\"} 3\n\
                    vllm:num_requests_running{model_name=\"m\"} 5\n\
                    vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n\
                    vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"1000\"} 1\n";
        let mapping = EngineMapping::builtin()
            .into_iter()
            .find(|m| m.name == "vllm")
            .unwrap();
        let alone = mapping.extract(core);
        let noise = noise();
        let mixed = mapping.extract(&format!("{noise}{core}{noise}"));
        assert_eq!(
            alone, mixed,
            "same values, and the broken unread line is not counted"
        );
        assert_eq!(mixed.metrics.waiting_queue_size, 3);
        assert_eq!(mixed.metrics.running_requests, 5);
        assert_eq!(mixed.metrics.cache_block_size, Some(16));
        assert!(mixed.found_core);
        // The filtered iterator yields exactly the wanted subset of the full one.
        let text = format!("{noise}{core}");
        let wanted = |n: &str| n.starts_with("vllm:num_requests");
        let filtered: Vec<_> = prometheus::samples_named(&text, &wanted).collect();
        let full: Vec<_> = prometheus::samples(&text)
            .filter(|s| s.as_ref().is_ok_and(|s| wanted(s.name)))
            .collect();
        assert_eq!(filtered, full);
        assert_eq!(filtered.len(), 3);
    }

    /// Review: counts past u64 saturated and two of them wrapped the cost model's sum; the
    /// adapter lists were read from every line that raised the best. Counts are capped, and
    /// the lists read from the latest line only.
    #[test]
    fn counts_are_capped_and_the_latest_adapter_line_wins() {
        let mapping = EngineMapping::builtin()
            .into_iter()
            .find(|m| m.name == "vllm")
            .unwrap();
        let mut text = String::from(
            "vllm:num_requests_waiting{model_name=\"m\"} 1e19\n\
             vllm:num_requests_running{model_name=\"m\"} 5\n",
        );
        for (i, adapters) in ["a", "b,c", "d"].iter().enumerate() {
            text.push_str(&format!(
                "vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"{adapters}\",waiting_lora_adapters=\"\"}} {}\n",
                [10, 30, 20][i]
            ));
        }
        let got = mapping.extract(&text);
        assert_eq!(got.metrics.waiting_queue_size, MAX_REPORTED_REQUESTS as u64);
        assert_eq!(got.metrics.running_requests, 5);
        assert_eq!(got.metrics.active_models, ["b", "c"]);
    }

    #[test]
    fn spec_parsing() {
        let s: MetricSpec = "nv_trt_llm_request_metrics{request_type=waiting}"
            .parse()
            .unwrap();
        assert_eq!(s.name, "nv_trt_llm_request_metrics");
        assert_eq!(s.matchers, vec![("request_type".into(), "waiting".into())]);
        let s: MetricSpec = r#"x{a="1", b=2}"#.parse().unwrap();
        assert_eq!(s.matchers.len(), 2);
        assert!("x{a=1".parse::<MetricSpec>().is_err());
        assert!("{a=1}".parse::<MetricSpec>().is_err());
    }

    #[test]
    fn vllm_extraction() {
        let text = r#"
vllm:num_requests_waiting{model_name="m"} 4
vllm:num_requests_running{model_name="m"} 9
vllm:kv_cache_usage_perc{model_name="m"} 0.42
vllm:cache_config_info{block_size="16",num_gpu_blocks="4096"} 1
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 100
vllm:lora_requests_info{max_lora="2",running_lora_adapters="c",waiting_lora_adapters="d"} 200
"#;
        let got = EngineMapping::vllm().extract(text);
        assert!(got.found_core);
        let m = got.metrics;
        assert_eq!((m.waiting_queue_size, m.running_requests), (4, 9));
        assert!((m.kv_cache_usage - 0.42).abs() < 1e-9);
        assert_eq!(m.cache_block_size, Some(16));
        assert_eq!(m.cache_num_blocks, Some(4096));
        // The LoRA series with the largest value (a timestamp) wins.
        assert_eq!(m.active_models, vec!["c".to_string()]);
        assert_eq!(m.waiting_models, vec!["d".to_string()]);
        assert_eq!(m.max_active_models, 2);
    }

    #[test]
    fn vllm_falls_back_to_old_kv_metric() {
        let text = "vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_waiting 1\n";
        let m = EngineMapping::vllm().extract(text);
        assert!((m.metrics.kv_cache_usage - 0.5).abs() < 1e-9);
        assert!(!m.found_core);
        // What the scraper warns about: the series read as 0 for want of them.
        assert_eq!(m.missing_core, ["running"]);
        let both = "vllm:gpu_cache_usage_perc 0.5\nvllm:kv_cache_usage_perc 0.25\n";
        assert!((EngineMapping::vllm().extract(both).metrics.kv_cache_usage - 0.25).abs() < 1e-9);
    }

    #[test]
    fn newest_timestamp_wins() {
        let text = "vllm:num_requests_waiting 3 2000\nvllm:num_requests_waiting 5 1000\n";
        assert_eq!(
            EngineMapping::vllm()
                .extract(text)
                .metrics
                .waiting_queue_size,
            3
        );
    }

    #[test]
    fn an_engines_adapter_lists_are_bounded() {
        let names: Vec<String> = (0..MAX_LORA_ADAPTERS + 50)
            .map(|i| format!("a{i}"))
            .collect();
        let long = "x".repeat(MAX_SERVED_MODEL_BYTES + 1);
        let text = format!(
            "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n\
             vllm:lora_requests_info{{running_lora_adapters=\"{long},{}\",waiting_lora_adapters=\"\",max_lora=\"4\"}} 1\n",
            names.join(",")
        );
        let m = EngineMapping::vllm().extract(&text).metrics;
        assert_eq!(m.active_models.len(), MAX_LORA_ADAPTERS);
        assert_eq!(m.active_models[0], "a0");
    }

    #[test]
    fn cache_sizes_no_engine_has_are_dropped() {
        let page = |size: &str, blocks: &str| {
            format!(
                "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n\
                 vllm:cache_config_info{{block_size=\"{size}\",num_gpu_blocks=\"{blocks}\"}} 1\n"
            )
        };
        let read = |text: &str| {
            let m = EngineMapping::vllm().extract(text).metrics;
            (m.cache_block_size, m.cache_num_blocks)
        };
        assert_eq!(read(&page("16", "4096")), (Some(16), Some(4096)));
        assert_eq!(read(&page("0", "18446744073709551615")), (None, None));
        assert_eq!(read(&page("4294967295", "0")), (None, None));
    }

    #[test]
    fn other_engines() {
        let sg = "sglang:num_queue_reqs 2\nsglang:num_running_reqs 3\nsglang:token_usage 0.1\n\
                  sglang:cache_config_info{page_size=\"1\",num_pages=\"500\"} 1\n";
        let m = EngineMapping::sglang().extract(sg);
        assert!(m.found_core);
        assert_eq!(m.metrics.cache_num_blocks, Some(500));
        let tri = "nv_trt_llm_request_metrics{request_type=\"waiting\"} 6\n\
                   nv_trt_llm_request_metrics{request_type=\"scheduled\"} 2\n\
                   nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"} 0.3\n\
                   nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"tokens_per\"} 64\n\
                   nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\"} 1000\n";
        let m = EngineMapping::triton().extract(tri).metrics;
        assert_eq!((m.waiting_queue_size, m.running_requests), (6, 2));
        assert_eq!(
            (m.cache_block_size, m.cache_num_blocks),
            (Some(64), Some(1000))
        );
        let trt = "trtllm_num_requests_waiting 1\ntrtllm_num_requests_running 2\n\
                   trtllm_kv_cache_utilization 0.9\ntrtllm_kv_cache_tokens_per_block 32\n";
        let m = EngineMapping::trtllm_serve().extract(trt);
        assert!(m.found_core);
        assert_eq!(m.metrics.cache_block_size, Some(32));
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        // A malformed line of a family the mapping reads is counted; garbage elsewhere is
        // skipped unread, like every family the mapping does not read.
        let m = EngineMapping::vllm()
            .extract("vllm:num_requests_waiting 2\n%%%\nvllm:num_requests_running{broken 1\n");
        assert_eq!(m.bad_lines, 1);
        assert_eq!(m.metrics.waiting_queue_size, 2);
    }
}
