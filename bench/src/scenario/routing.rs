//! Routing quality: the same seeded workload against the same simulated cluster (fresh, cold
//! caches for every run), through each router, at several Poisson rates.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Router, start_router_with, start_sim_with};
use crate::harness::{Tools, get, prom_sum};
use crate::loadgen::{self, LoadSpec, Mode, Summary};
use crate::workload::WorkloadArgs;

/// One sweep: a workload and its rates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    /// The workload.
    pub workload: WorkloadArgs,
    /// Poisson rates, requests per second.
    pub rates: Vec<f64>,
    /// Routers for this workload only; empty = every router of the configuration.
    #[serde(default)]
    pub routers: Vec<Router>,
}

impl Sweep {
    /// The routers this sweep runs.
    pub fn routers<'a>(&'a self, cfg: &'a RoutingCfg) -> &'a [Router] {
        if self.routers.is_empty() {
            &cfg.routers
        } else {
            &self.routers
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutingCfg {
    /// Simulated replicas.
    pub replicas: usize,
    /// `sim --stream-granularity` (tokens per SSE event), to keep SSE affordable on 2 cores.
    pub stream_granularity: u32,
    /// Seconds of arrivals per run.
    pub duration_s: f64,
    /// Seconds after the last arrival before unfinished requests are cut.
    pub drain_s: f64,
    /// Routers compared.
    pub routers: Vec<Router>,
    /// Workloads and rates.
    pub sweeps: Vec<Sweep>,
}

/// One (workload, router, rate) run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutingRun {
    /// Workload name.
    pub workload: String,
    /// Router label.
    pub router: String,
    /// Offered rate.
    pub rate: f64,
    /// Client-side summary.
    pub summary: Summary,
    /// Σ `vllm:prefix_cache_hits_total` / Σ `vllm:prefix_cache_queries_total` over replicas.
    pub replica_cache_hit: Option<f64>,
    /// Requests finished per replica (`vllm:request_success_total`).
    pub replica_requests: Vec<f64>,
    /// Busiest replica's requests / mean.
    pub spread_max_over_mean: Option<f64>,
    /// Coefficient of variation of requests per replica.
    pub spread_cv: Option<f64>,
    /// CPU seconds of the router's processes (Envoy, `epp`, or the peer router) during the run.
    pub router_cpu_s: f64,
}

/// Runs every sweep × router × rate; calls `on_run` after each (for incremental saving).
pub async fn run(
    tools: &Tools,
    cfg: &RoutingCfg,
    dir: &Path,
    mut on_run: impl FnMut(&RoutingRun),
) -> anyhow::Result<Vec<RoutingRun>> {
    let mut out = Vec::new();
    let total: usize = cfg
        .sweeps
        .iter()
        .map(|s| s.rates.len() * s.routers(cfg).len())
        .sum();
    let mut n = 0;
    for sweep in &cfg.sweeps {
        for router in sweep.routers(cfg) {
            for &rate in &sweep.rates {
                n += 1;
                eprintln!(
                    "routing [{n}/{total}] {} via {} at {rate} req/s",
                    sweep.workload.workload.as_str(),
                    router.label()
                );
                let run_dir = dir.join(format!(
                    "routing-{}-{}-{rate}",
                    sweep.workload.workload.as_str(),
                    router.label().replace(' ', "-")
                ));
                std::fs::create_dir_all(&run_dir)?;
                match one(tools, cfg, &sweep.workload, router, rate, &run_dir).await {
                    Ok(r) => {
                        eprintln!(
                            "  TTFT p50 {:.0} ms p90 {:.0} ms, {:.0} out tok/s, cache hit {}, errors {}",
                            r.summary.ttft_ms.p50.unwrap_or(f64::NAN),
                            r.summary.ttft_ms.p90.unwrap_or(f64::NAN),
                            r.summary.output_tok_per_s,
                            r.replica_cache_hit
                                .map_or("-".into(), |h| format!("{:.0} %", h * 100.0)),
                            r.summary.sent - r.summary.ok,
                        );
                        on_run(&r);
                        out.push(r);
                    }
                    // One router failing (e.g. a peer not installed) must not sink the sweep.
                    Err(e) => eprintln!("  skipped: {e:#}"),
                }
            }
        }
    }
    Ok(out)
}

async fn one(
    tools: &Tools,
    cfg: &RoutingCfg,
    workload: &WorkloadArgs,
    router: &Router,
    rate: f64,
    dir: &Path,
) -> anyhow::Result<RoutingRun> {
    let mut extra = vec![
        "--stream-granularity".to_owned(),
        cfg.stream_granularity.to_string(),
        "--seed".into(),
        "1".into(),
    ];
    if workload.workload == crate::workload::Kind::Lora {
        extra.push("--lora-modules".into());
        extra.push(workload.adapter_names().join(","));
    }
    // With a precise router in the comparison, every router gets the same engines (test
    // tokenizer, one address per replica, KV events published).
    let events = cfg
        .sweeps
        .iter()
        .flat_map(|s| s.routers(cfg))
        .any(Router::needs_engine_events)
        .then(|| super::precise::EngineEvents::new(&tools.repo))
        .transpose()?;
    let (mut sim, replicas) = start_sim_with(tools, cfg.replicas, &extra, dir, events.as_ref())?;
    let up = start_router_with(tools, router, &replicas, dir, events.as_ref()).await?;
    let cpu0 = up.cpu_seconds();
    let spec = LoadSpec {
        url: up.url.clone(),
        mode: Mode::Rate(rate),
        duration_s: Some(cfg.duration_s),
        count: None,
        drain_timeout_s: cfg.drain_s,
        seed: 1,
        progress: true,
    };
    let report = loadgen::run(spec, workload.build()).await?;
    let router_cpu_s = up.cpu_seconds() - cpu0;
    sim.check_alive()?;
    let (mut hits, mut queries, mut per) = (0.0, 0.0, Vec::new());
    for a in &replicas {
        let (_, text) = get(&format!("http://{a}/metrics")).await?;
        hits += prom_sum(&text, "vllm:prefix_cache_hits_total");
        queries += prom_sum(&text, "vllm:prefix_cache_queries_total");
        per.push(prom_sum(&text, "vllm:request_success_total"));
    }
    drop(up);
    drop(sim);
    let mean = per.iter().sum::<f64>() / per.len().max(1) as f64;
    let (max_over_mean, cv) = if mean > 0.0 {
        let max = per.iter().copied().fold(0.0, f64::max);
        let var = per.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / per.len() as f64;
        (Some(max / mean), Some(var.sqrt() / mean))
    } else {
        (None, None)
    };
    std::fs::write(dir.join("loadgen.json"), serde_json::to_vec(&report)?)?;
    Ok(RoutingRun {
        workload: workload.workload.as_str().into(),
        router: router.label(),
        rate,
        summary: report.summary,
        replica_cache_hit: (queries > 0.0).then(|| hits / queries),
        replica_requests: per,
        spread_max_over_mean: max_over_mean,
        spread_cv: cv,
        router_cpu_s,
    })
}

/// Markdown tables (one per workload) plus the headline ratios.
pub fn markdown(runs: &[RoutingRun], cfg: &RoutingCfg) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let f0 = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}"));
    for sweep in &cfg.sweeps {
        let w = sweep.workload.workload.as_str();
        let _ = writeln!(s, "#### `{w}`\n");
        let _ = writeln!(s, "{}\n", describe(&sweep.workload));
        let _ = writeln!(
            s,
            "| router | rate (req/s) | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) | e2e p90 (ms) | done req/s | output tok/s | prefix-cache hit (replicas) | busiest replica / mean | CV of load | errors | router CPU (s) |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for router in sweep.routers(cfg) {
            for r in runs
                .iter()
                .filter(|r| r.workload == w && r.router == router.label())
            {
                let m = &r.summary;
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.1} | {} | {:.1} | {:.0} | {} | {} | {} | {} | {:.1} |",
                    r.router,
                    r.rate,
                    f0(m.ttft_ms.p50),
                    f0(m.ttft_ms.p90),
                    m.tpot_ms.p50.unwrap_or(f64::NAN),
                    f0(m.e2e_ms.p90),
                    m.req_per_s,
                    m.output_tok_per_s,
                    r.replica_cache_hit
                        .map_or("-".into(), |h| format!("{:.1} %", h * 100.0)),
                    r.spread_max_over_mean
                        .map_or("-".into(), |x| format!("{x:.2}")),
                    r.spread_cv.map_or("-".into(), |x| format!("{x:.2}")),
                    m.sent - m.ok,
                    r.router_cpu_s,
                );
            }
        }
        s.push('\n');
    }
    s
}

/// One sentence describing a workload's parameters.
pub fn describe(w: &WorkloadArgs) -> String {
    use crate::workload::Kind;
    match w.workload {
        Kind::SharedPrefix | Kind::CachePressure | Kind::KvSharing => format!(
            "{} groups, {}-token system prompt per group, {}-token question per request, {} output tokens; group drawn uniformly (seed {}).",
            w.groups, w.system_tokens, w.question_tokens, w.output_tokens, w.seed
        ),
        Kind::HotSpot => format!(
            "{} groups, {}-token system prompt per group, {}-token question per request, {} output tokens; group k drawn ∝ 1/(k+1)^{} (Zipf; seed {}).",
            w.groups, w.system_tokens, w.question_tokens, w.output_tokens, w.prefix_zipf, w.seed
        ),
        Kind::MultiTurn => format!(
            "{} conversations open at once, {}-token system prompt per user, +{}-token user message and +{}-token reply per round, {} rounds per user, {} output tokens (seed {}).",
            w.users,
            w.user_system_tokens,
            w.turn_tokens,
            w.reply_tokens,
            w.rounds,
            w.output_tokens,
            w.seed
        ),
        Kind::Mixed => format!(
            "lognormal prompt tokens (median {}, σ {}) and output tokens (median {}, σ {}), unique prompts (seed {}).",
            w.prompt_median, w.prompt_sigma, w.output_median, w.output_sigma, w.seed
        ),
        Kind::Lora => format!(
            "`mixed` over {} adapters, Zipf popularity s = {} (seed {}).",
            w.adapters, w.zipf, w.seed
        ),
        Kind::LongPrompt => format!("{}-byte bodies, unique (seed {}).", w.prompt_bytes, w.seed),
    }
}

/// Headline ratios at the highest rate of each sweep: Switchyard (default profile, and the
/// best Switchyard profile if another one did better) vs Envoy round-robin and vs the best
/// peer router (lowest TTFT p90 among sglang-router and vllm-router policies), on TTFT p90
/// (other / Switchyard: > 1 means Switchyard is faster) and output tokens/s (Switchyard /
/// other: > 1 means Switchyard serves more).
pub fn headlines(runs: &[RoutingRun], cfg: &RoutingCfg) -> Vec<String> {
    let mut out = Vec::new();
    for sweep in &cfg.sweeps {
        let w = sweep.workload.workload.as_str();
        let Some(rate) = sweep.rates.iter().copied().reduce(f64::max) else {
            continue;
        };
        let at: Vec<&RoutingRun> = runs
            .iter()
            .filter(|r| r.workload == w && r.rate == rate)
            .collect();
        let p90 = |r: &RoutingRun| r.summary.ttft_ms.p90.unwrap_or(f64::INFINITY);
        let best = |pred: &dyn Fn(&str) -> bool| {
            at.iter()
                .filter(|r| pred(&r.router))
                .min_by(|a, b| p90(a).total_cmp(&p90(b)))
                .copied()
        };
        let rr = at.iter().find(|r| r.router == "envoy round-robin").copied();
        let peer = best(&|r: &str| {
            r.starts_with("sglang") || r.starts_with("vllm") || r.starts_with("smg")
        });
        let default = at
            .iter()
            .find(|r| r.router == "switchyard default")
            .copied();
        let best_sy = best(&|r: &str| r.starts_with("switchyard"));
        let mut mine: Vec<&RoutingRun> = default.into_iter().collect();
        if let Some(b) = best_sy
            && default.is_none_or(|d| d.router != b.router)
        {
            mine.push(b);
        }
        for sy in mine {
            let mut line = format!(
                "`{w}` at {rate} req/s, {} (TTFT p90 {:.0} ms, {:.0} output tok/s):",
                sy.router,
                p90(sy),
                sy.summary.output_tok_per_s
            );
            for (name, other) in [("Envoy round-robin", rr), ("best peer", peer)] {
                if let Some(o) = other {
                    line.push_str(&format!(
                        " vs {name} ({}: {:.0} ms, {:.0} tok/s) TTFT p90 ×{:.2}, throughput ×{:.2};",
                        o.router,
                        p90(o),
                        o.summary.output_tok_per_s,
                        p90(o) / p90(sy),
                        sy.summary.output_tok_per_s / o.summary.output_tok_per_s.max(1e-9),
                    ));
                }
            }
            out.push(line.trim_end_matches(';').to_owned() + ".");
        }
    }
    out
}

/// One SVG per workload: TTFT p90 vs offered rate, a line per router.
pub fn plots(runs: &[RoutingRun], cfg: &RoutingCfg) -> Vec<(String, String)> {
    use crate::report::{Series, line_chart_log_y};
    cfg.sweeps
        .iter()
        .map(|sweep| {
            let w = sweep.workload.workload.as_str();
            let series: Vec<Series> = sweep
                .routers(cfg)
                .iter()
                .map(|router| Series {
                    label: router.label(),
                    points: runs
                        .iter()
                        .filter(|r| r.workload == w && r.router == router.label())
                        .filter_map(|r| Some((r.rate, r.summary.ttft_ms.p90?)))
                        .collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect();
            let svg = line_chart_log_y(
                &format!(
                    "{w}: TTFT p90 vs request rate ({} simulated replicas)",
                    cfg.replicas
                ),
                "offered rate (requests/s, Poisson)",
                "TTFT p90 (ms, log scale)",
                &series,
            );
            (format!("routing-{w}.svg"), svg)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Quantiles;
    use crate::workload::Kind;

    fn run(router: &str, rate: f64, p90: f64, tok: f64) -> RoutingRun {
        RoutingRun {
            workload: "shared-prefix".into(),
            router: router.into(),
            rate,
            summary: Summary {
                ttft_ms: Quantiles {
                    p90: Some(p90),
                    ..Quantiles::default()
                },
                output_tok_per_s: tok,
                ..Summary::default()
            },
            replica_cache_hit: Some(0.5),
            replica_requests: vec![1.0, 1.0],
            spread_max_over_mean: Some(1.0),
            spread_cv: Some(0.0),
            router_cpu_s: 0.1,
        }
    }

    #[test]
    fn headlines_compare_at_the_highest_rate_with_rr_and_the_best_peer() {
        let cfg = RoutingCfg {
            replicas: 8,
            stream_granularity: 16,
            duration_s: 1.0,
            drain_s: 1.0,
            routers: ["rr", "switchyard", "sglang:cache_aware", "vllm:cache_aware"]
                .iter()
                .map(|r| Router::parse(r).unwrap())
                .collect(),
            sweeps: vec![Sweep {
                workload: WorkloadArgs {
                    workload: Kind::SharedPrefix,
                    ..WorkloadArgs::default()
                },
                rates: vec![5.0, 10.0],
                routers: Vec::new(),
            }],
        };
        let runs = vec![
            run("envoy round-robin", 5.0, 1.0, 1.0),
            run("envoy round-robin", 10.0, 400.0, 50.0),
            run("switchyard default", 10.0, 100.0, 100.0),
            run("sglang-router cache_aware", 10.0, 200.0, 80.0),
            run("vllm-router cache_aware", 10.0, 300.0, 90.0),
        ];
        let h = headlines(&runs, &cfg);
        assert_eq!(h.len(), 1);
        assert!(h[0].contains("at 10 req/s, switchyard default"), "{}", h[0]);
        assert!(
            h[0].contains("TTFT p90 ×4.00, throughput ×2.00"),
            "{}",
            h[0]
        );
        assert!(
            h[0].contains("sglang-router cache_aware: 200 ms"),
            "{}",
            h[0]
        );
        assert!(
            h[0].contains("TTFT p90 ×2.00, throughput ×1.25"),
            "{}",
            h[0]
        );
        let md = markdown(&runs, &cfg);
        assert_eq!(md.matches("| switchyard default |").count(), 1);
        let plots = plots(&runs, &cfg);
        assert_eq!(plots.len(), 1);
        assert_eq!(plots[0].0, "routing-shared-prefix.svg");
        assert_eq!(plots[0].1.matches("<polyline").count(), 4);
    }
}
