//! Engine metrics and their Prometheus text exposition, under vLLM's or SGLang's names.
//!
//! The engine updates plain counters and histograms under its own lock; a scrape copies them out
//! (a [`MetricsSnapshot`]) and renders text without holding the lock.

use std::fmt::Write as _;

use crate::config::EngineKind;

/// vLLM's TTFT buckets (seconds).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token-latency buckets (seconds).
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request-latency buckets (seconds), used for e2e and queue time.
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A cumulative Prometheus histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket (non-cumulative) counts; the last slot is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (upper bounds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        let idx = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[idx] += 1;
        self.sum += v;
        self.count += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, &bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{bound:?}\"}} {cumulative}"
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {:?}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Cumulative request-level statistics kept by the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStats {
    /// Time to first token, arrival → first token.
    pub ttft: Histogram,
    /// Interval between consecutive tokens of a request.
    pub itl: Histogram,
    /// Arrival → last token, recorded when the request finishes.
    pub e2e: Histogram,
    /// Arrival → first scheduled, recorded when the request finishes (as vLLM does).
    pub queue: Histogram,
    /// Prompt tokens of requests whose prefill completed.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub generation_tokens: u64,
    /// Finished requests with `finish_reason = "length"`.
    pub success_length: u64,
    /// Finished requests with `finish_reason = "stop"`.
    pub success_stop: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Requests pushed back to the waiting queue to free KV blocks.
    pub preemptions: u64,
    /// KV-tier counters, when the replica has tiers or peer pulls (`None`: none, and
    /// `/metrics` is what it was before tiers).
    pub tiers: Option<TierStats>,
}

/// Counters of the KV tiers ([`crate::tiers`]), indexed by [`crate::config::Tier::index`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TierStats {
    /// Prompt tokens served from each tier at admission (GPU = `prefix_hits`).
    pub hit_tokens: [u64; 4],
    /// Seconds spent loading from each tier (GPU: 0).
    pub load_seconds: [f64; 4],
    /// Prompt tokens looked up in the tiers (every admission, as `prefix_queries`).
    pub external_queries: u64,
    /// Requests whose peer header was ignored, by [`crate::tiers::PeerIgnored::index`].
    pub peer_ignored: [u64; 4],
}

impl TierStats {
    /// Tokens loaded from below the GPU (CPU, shared store, peer): vLLM's connector hits.
    pub fn external_hits(&self) -> u64 {
        self.hit_tokens[1..].iter().sum()
    }
}

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(REQUEST_LATENCY_BUCKETS),
            queue: Histogram::new(REQUEST_LATENCY_BUCKETS),
            prompt_tokens: 0,
            generation_tokens: 0,
            success_length: 0,
            success_stop: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            preemptions: 0,
            tiers: None,
        }
    }
}

/// Everything a scrape reports, copied out of the engine at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Requests in the running batch.
    pub running: usize,
    /// Requests in the waiting queue.
    pub waiting: usize,
    /// KV blocks in use / total (0–1).
    pub kv_usage: f64,
    /// KV blocks in use.
    pub kv_used_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Total blocks.
    pub num_gpu_blocks: usize,
    /// LoRA slots.
    pub max_loras: usize,
    /// Adapters of running requests (sorted, deduplicated).
    pub running_loras: Vec<String>,
    /// Adapters of waiting requests (sorted, deduplicated).
    pub waiting_loras: Vec<String>,
    /// Request statistics.
    pub stats: EngineStats,
}

/// Renders a snapshot as Prometheus text. `now_unix` is the value of `vllm:lora_requests_info`
/// (vLLM sets it to the current time so that the newest series wins).
pub fn render(kind: EngineKind, model: &str, s: &MetricsSnapshot, now_unix: f64) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let model = escape(model);
    match kind {
        EngineKind::Vllm => render_vllm(&mut out, &model, s, now_unix),
        EngineKind::Sglang => render_sglang(&mut out, &model, s),
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn render_vllm(out: &mut String, model: &str, s: &MetricsSnapshot, now_unix: f64) {
    let l = format!("engine=\"0\",model_name=\"{model}\"");
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        header(out, name, "gauge", help);
        let _ = writeln!(out, "{name}{{{l}}} {v:?}");
    };
    gauge(
        out,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        s.running as f64,
    );
    gauge(
        out,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        s.waiting as f64,
    );
    gauge(
        out,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        s.kv_usage,
    );

    header(
        out,
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    let _ = writeln!(
        out,
        "vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"{}\"}} 1.0",
        s.block_size, s.num_gpu_blocks
    );

    header(
        out,
        "vllm:lora_requests_info",
        "gauge",
        "Running stats on lora requests.",
    );
    let _ = writeln!(
        out,
        "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now_unix:?}",
        s.max_loras,
        escape(&s.running_loras.join(",")),
        escape(&s.waiting_loras.join(",")),
    );

    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        // Python's prometheus_client (which vLLM and SGLang use) names the family `…_total`.
        header(out, &format!("{name}_total"), "counter", help);
        let _ = writeln!(out, "{name}_total{{{l}}} {v}.0");
    };
    let st = &s.stats;
    counter(
        out,
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        st.prefix_queries,
    );
    counter(
        out,
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        st.prefix_hits,
    );
    if let Some(t) = &st.tiers {
        // vLLM ≥ 0.10 with a KV connector (LMCache, CPU offloading): tokens the connector
        // loaded, beyond the local prefix cache's hits.
        counter(
            out,
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
            t.external_queries,
        );
        counter(
            out,
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
            t.external_hits(),
        );
    }
    counter(
        out,
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        st.preemptions,
    );
    counter(
        out,
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        st.prompt_tokens,
    );
    counter(
        out,
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        st.generation_tokens,
    );

    header(
        out,
        "vllm:request_success",
        "counter",
        "Count of successfully processed requests.",
    );
    for (reason, v) in [("length", st.success_length), ("stop", st.success_stop)] {
        let _ = writeln!(
            out,
            "vllm:request_success_total{{{l},finished_reason=\"{reason}\"}} {v}.0"
        );
    }

    let hist = |out: &mut String, name: &str, help: &str, h: &Histogram| {
        header(out, name, "histogram", help);
        h.render(out, name, &l);
    };
    hist(
        out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &st.ttft,
    );
    hist(
        out,
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &st.itl,
    );
    hist(
        out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &st.e2e,
    );
    hist(
        out,
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &st.queue,
    );
    if let Some(t) = &st.tiers {
        render_tiers(out, &l, t);
    }
}

/// The simulator's own per-tier series (the tiers contract): tokens served from each tier and
/// the seconds spent loading them, and the peer headers ignored.
fn render_tiers(out: &mut String, labels: &str, t: &TierStats) {
    use crate::config::Tier;
    use crate::tiers::PeerIgnored;
    header(
        out,
        "sim_kv_tier_hit_tokens_total",
        "counter",
        "Prompt tokens served from each KV tier at admission (gpu = the prefix cache).",
    );
    for tier in Tier::ALL {
        let _ = writeln!(
            out,
            "sim_kv_tier_hit_tokens_total{{{labels},tier=\"{}\"}} {}.0",
            tier.as_str(),
            t.hit_tokens[tier.index()]
        );
    }
    header(
        out,
        "sim_kv_tier_load_seconds_total",
        "counter",
        "Seconds of KV transfer charged to engine steps, per tier.",
    );
    for tier in Tier::ALL {
        let _ = writeln!(
            out,
            "sim_kv_tier_load_seconds_total{{{labels},tier=\"{}\"}} {:?}",
            tier.as_str(),
            t.load_seconds[tier.index()]
        );
    }
    header(
        out,
        "sim_kv_peer_header_ignored_total",
        "counter",
        "Requests whose x-kv-cache-source-host-port was ignored, by reason.",
    );
    for reason in PeerIgnored::ALL {
        let _ = writeln!(
            out,
            "sim_kv_peer_header_ignored_total{{{labels},reason=\"{}\"}} {}.0",
            reason.as_str(),
            t.peer_ignored[reason.index()]
        );
    }
}

fn render_sglang(out: &mut String, model: &str, s: &MetricsSnapshot) {
    let l = format!("model_name=\"{model}\"");
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        header(out, name, "gauge", help);
        let _ = writeln!(out, "{name}{{{l}}} {v:?}");
    };
    let st = &s.stats;
    gauge(
        out,
        "sglang:num_running_reqs",
        "The number of running requests.",
        s.running as f64,
    );
    gauge(
        out,
        "sglang:num_queue_reqs",
        "The number of requests in the waiting queue.",
        s.waiting as f64,
    );
    gauge(out, "sglang:token_usage", "The token usage.", s.kv_usage);
    gauge(
        out,
        "sglang:num_used_tokens",
        "The number of used tokens.",
        (s.kv_used_blocks * s.block_size) as f64,
    );
    let hit_rate = if st.prefix_queries == 0 {
        0.0
    } else {
        st.prefix_hits as f64 / st.prefix_queries as f64
    };
    gauge(
        out,
        "sglang:cache_hit_rate",
        "The prefix cache hit rate.",
        hit_rate,
    );

    header(
        out,
        "sglang:cache_config_info",
        "gauge",
        "Cache configuration (page size and count).",
    );
    let _ = writeln!(
        out,
        "sglang:cache_config_info{{{l},num_pages=\"{}\",page_size=\"{}\"}} 1.0",
        s.num_gpu_blocks, s.block_size
    );

    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        // Python's prometheus_client (which vLLM and SGLang use) names the family `…_total`.
        header(out, &format!("{name}_total"), "counter", help);
        let _ = writeln!(out, "{name}_total{{{l}}} {v}.0");
    };
    counter(
        out,
        "sglang:prompt_tokens",
        "Number of prefill tokens processed.",
        st.prompt_tokens,
    );
    counter(
        out,
        "sglang:generation_tokens",
        "Number of generation tokens processed.",
        st.generation_tokens,
    );
    counter(
        out,
        "sglang:cached_tokens",
        "Number of cached prompt tokens.",
        st.prefix_hits,
    );
    counter(
        out,
        "sglang:num_requests",
        "Number of requests processed.",
        st.success_length + st.success_stop,
    );

    let hist = |out: &mut String, name: &str, help: &str, h: &Histogram| {
        header(out, name, "histogram", help);
        h.render(out, name, &l);
    };
    hist(
        out,
        "sglang:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &st.ttft,
    );
    hist(
        out,
        "sglang:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &st.itl,
    );
    hist(
        out,
        "sglang:e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        &st.e2e,
    );
    hist(
        out,
        "sglang:queue_time_seconds",
        "Histogram of queueing time in seconds.",
        &st.queue,
    );
    if let Some(t) = &st.tiers {
        render_tiers(out, &l, t);
    }
}

/// Escapes a label value (`\`, `"` and newlines).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.1\"} 1\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"1.0\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count{a=\"b\"} 3\n"));
        assert_eq!(h.sum(), 5.55);
    }
}
