//! Goodput: for each (workload, router), the highest Poisson rate at which TTFT p90 stays
//! within the SLO (1 s) with no errors.
//!
//! A rate **ladder** per (workload, router): one simulator and router, cold at the start; a
//! warm-up at the first rung's rate, then each rung for `step_s` seconds, one after the other
//! without a restart (the caches stay warm from the rungs below, as in a service whose load
//! grows). Each rung is judged `grace_s` (≥ the SLO) after it ends, while the next one runs: a
//! request of the rung still without its first token then has waited longer than the SLO, so
//! the verdict is already exact. The ladder stops at the first failing rung, except that it
//! goes on up to `must_reach` (the best peer's goodput, so that every router has numbers at
//! that rate). The final numbers are recomputed from the finished run (requests cut at the
//! drain deadline count as errors, with their wait as TTFT); the goodput is the highest rung
//! whose rungs below all passed. Optionally one **bisection** point (a fresh run: warm-up and
//! one step at the geometric middle of the last passing and the first failing rung) halves
//! the resolution.
//!
//! Per rung it also measures **burst herding** (in every 50 ms window of arrivals, one scrape
//! interval, with at least 4 arrivals: the largest share that went to one replica, averaged
//! over the windows) and, for the cost-model profile, the **prediction error** (the TTFT the
//! EPP predicted for the endpoint it picked, from the decision header, against the TTFT the
//! client observed).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Router, RouterUp, start_router_with, start_sim_with};
use crate::harness::Tools;
use crate::loadgen::{self, Control, LoadSpec, Mode, Record, Summary};
use crate::stats::quantile_sorted;
use crate::workload::{Kind, WorkloadArgs};

/// sim's default `--num-gpu-blocks` and `--block-size` (its calibrated profile).
pub const SIM_DEFAULT_GPU_BLOCKS: usize = 27_000;
/// sim's default `--block-size`.
pub const SIM_BLOCK_SIZE: usize = 16;
/// One scrape interval (the EPP's default `--refresh-metrics-interval`).
pub const BURST_WINDOW_S: f64 = 0.05;
/// Windows with fewer arrivals say nothing about herding.
pub const BURST_MIN_ARRIVALS: usize = 4;

/// The KV tiers below the GPU (the tiers contract's `sim` flags; the load bandwidths are the
/// simulator's defaults, the contract's: CPU 25 GB/s, shared store 10 GB/s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiers {
    /// `sim --cpu-kv-blocks`: per replica.
    pub cpu_kv_blocks: usize,
    /// `sim --shared-kv-blocks`: one store for every replica of the `sim` process.
    pub shared_kv_blocks: usize,
}

impl Tiers {
    /// The `sim` flags.
    pub fn sim_args(&self) -> Vec<String> {
        vec![
            "--cpu-kv-blocks".into(),
            self.cpu_kv_blocks.to_string(),
            "--shared-kv-blocks".into(),
            self.shared_kv_blocks.to_string(),
        ]
    }
}

/// One workload's ladder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ladder {
    /// The workload.
    pub workload: WorkloadArgs,
    /// `sim --num-gpu-blocks` (None: sim's default).
    pub gpu_blocks: Option<usize>,
    /// The rungs, requests per second, increasing.
    pub rates: Vec<f64>,
    /// CPU and shared KV tiers on the simulator (None: the GPU tier only).
    #[serde(default)]
    pub tiers: Option<Tiers>,
    /// More `sim` flags, passed as they are (`scenario goodput --sim-arg`).
    #[serde(default)]
    pub sim_args: Vec<String>,
    /// Engine tokens per workload token: 1 with the simulator's built-in tokenizer, more with
    /// the test tokenizer that precise routing needs (engines and EPPs must share one).
    #[serde(default = "one")]
    pub engine_tokens_per_token: f64,
}

fn one() -> f64 {
    1.0
}

impl Ladder {
    /// Tokens the simulated cluster's KV caches hold.
    pub fn cluster_kv_tokens(&self, replicas: usize) -> u64 {
        (self.gpu_blocks.unwrap_or(SIM_DEFAULT_GPU_BLOCKS) * SIM_BLOCK_SIZE * replicas) as u64
    }

    /// Tokens the cluster holds in every tier: GPU, CPU (per replica) and the shared store.
    pub fn cluster_all_tiers_tokens(&self, replicas: usize) -> u64 {
        let below = self.tiers.map_or(0, |t| {
            (t.cpu_kv_blocks * replicas + t.shared_kv_blocks) * SIM_BLOCK_SIZE
        });
        self.cluster_kv_tokens(replicas) + below as u64
    }

    /// The shared prefixes in engine tokens (the workload's count × the tokenizer ratio).
    pub fn engine_working_set_tokens(&self) -> Option<u64> {
        self.workload
            .prefix_working_set_tokens()
            .map(|t| (t as f64 * self.engine_tokens_per_token).round() as u64)
    }

    /// The `sim` flags of this ladder (KV blocks, tiers, pass-through).
    pub fn sim_flags(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(b) = self.gpu_blocks {
            out.push("--num-gpu-blocks".into());
            out.push(b.to_string());
        }
        if let Some(t) = self.tiers {
            out.extend(t.sim_args());
        }
        out.extend(self.sim_args.iter().cloned());
        out
    }
}

/// `kv-sharing`'s group count: shared prefixes of `system_tokens` workload tokens each, whose
/// total in engine tokens sits at the geometric middle of the GPU tier (`gpu_tokens`, the whole
/// cluster's) and every tier together (`all_tokens`): larger than what the GPUs hold, smaller
/// than what the tiers hold, as far from either bound in ratio.
pub fn kv_sharing_groups(
    gpu_tokens: u64,
    all_tokens: u64,
    system_tokens: usize,
    engine_tokens_per_token: f64,
) -> usize {
    let target = (gpu_tokens as f64 * all_tokens as f64).sqrt();
    let per_group = system_tokens as f64 * engine_tokens_per_token;
    (target / per_group.max(1.0)).round().max(1.0) as usize
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GoodputCfg {
    /// Simulated replicas.
    pub replicas: usize,
    /// `sim --stream-granularity`.
    pub stream_granularity: u32,
    /// Seconds of warm-up (at the first rung's rate) before the first measured rung.
    pub warmup_s: f64,
    /// Seconds measured per rung.
    pub step_s: f64,
    /// Seconds after a rung ends before it is judged (at least the SLO).
    pub grace_s: f64,
    /// Seconds after the last arrival before unfinished requests are cut.
    pub drain_s: f64,
    /// The TTFT p90 objective, ms.
    pub ttft_slo_ms: f64,
    /// Run one fresh bisection point between the last passing and the first failing rung.
    pub bisect: bool,
    /// Routers compared (peers are run first on each workload).
    pub routers: Vec<Router>,
    /// Workloads and their rungs.
    pub ladders: Vec<Ladder>,
}

impl GoodputCfg {
    /// Seconds the whole run takes at most (every ladder climbed to its top, plus the
    /// bisection points), and a typical figure (each ladder stopping half-way).
    pub fn estimate_s(&self) -> (f64, f64) {
        // Process start-up (sim, Envoy + epp or the peer) and the tail of the last rung.
        let overhead = 8.0 + self.grace_s + 5.0;
        let mut max = 0.0;
        let mut typical = 0.0;
        for l in &self.ladders {
            let n = l.rates.len() as f64;
            let one = |rungs: f64| overhead + self.warmup_s + rungs * self.step_s;
            let bis = if self.bisect { one(1.0) } else { 0.0 };
            max += self.routers.len() as f64 * (one(n) + bis);
            typical += self.routers.len() as f64 * (one((n / 2.0).ceil() + 1.0).min(one(n)) + bis);
        }
        (max, typical)
    }
}

/// One measured point (a rung, or a fresh bisection run).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Point {
    /// Offered rate, requests per second.
    pub rate: f64,
    /// A fresh run (warm-up at this rate, then one step) rather than a rung of the ladder.
    pub fresh: bool,
    /// TTFT p90 within the SLO and no errors.
    pub passed: bool,
    /// Client-side summary of the requests sent during the rung (rates per second of rung).
    pub summary: Summary,
    /// Σ cached / Σ prompt tokens of the rung's completed requests (the replicas' usage).
    pub cache_hit: Option<f64>,
    /// Burst herding: mean over 50 ms windows (≥ 4 arrivals) of the largest share one replica
    /// got.
    pub herding: Option<f64>,
    /// Windows the herding figure averages.
    pub herding_windows: usize,
    /// Requests with a predicted TTFT (cost profile only).
    pub pred_n: usize,
    /// Median |predicted − observed| TTFT, ms.
    pub pred_abs_err_p50_ms: Option<f64>,
    /// Median |predicted − observed| / observed.
    pub pred_rel_err_p50: Option<f64>,
    /// Median (predicted − observed), ms: < 0 means the model is optimistic.
    pub pred_bias_p50_ms: Option<f64>,
    /// Median observed TTFT of the requests with a prediction, ms (for scale).
    pub pred_observed_p50_ms: Option<f64>,
}

/// One (workload, router) ladder, done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LadderRun {
    /// Workload name.
    pub workload: String,
    /// Router label.
    pub router: String,
    /// The rungs measured, then fresh points (bisection, comparison rate).
    pub points: Vec<Point>,
    /// Highest rate that passed with everything below it passing (None: not even the first
    /// rung).
    pub goodput: Option<f64>,
    /// Lowest rate that failed, if any.
    pub first_fail: Option<f64>,
    /// CPU seconds of the router's processes over the ladder.
    pub router_cpu_s: f64,
    /// Wall seconds of the ladder (fresh points included).
    pub wall_s: f64,
}

impl LadderRun {
    /// The point measured at `rate` (the rung, else a fresh point).
    pub fn at(&self, rate: f64) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.rate == rate && !p.fresh)
            .or_else(|| self.points.iter().find(|p| p.rate == rate))
    }
}

/// Runs every ladder × router; `on_run` after each (for incremental saving).
pub async fn run(
    tools: &Tools,
    cfg: &GoodputCfg,
    dir: &Path,
    mut on_run: impl FnMut(&LadderRun),
) -> anyhow::Result<Vec<LadderRun>> {
    let mut out = Vec::new();
    let total = cfg.ladders.len() * cfg.routers.len();
    let mut n = 0;
    let began = std::time::Instant::now();
    for ladder in &cfg.ladders {
        let w = ladder.workload.workload.as_str();
        // Peers first: their best goodput is the rate every Switchyard ladder must reach.
        let mut order: Vec<&Router> = cfg.routers.iter().filter(|r| r.is_peer()).collect();
        order.extend(cfg.routers.iter().filter(|r| !r.is_peer()));
        let mut best_peer: Option<f64> = None;
        for router in order {
            n += 1;
            eprintln!(
                "goodput [{n}/{total}] {w} via {} (rungs {:?} req/s; {:.0} min so far)",
                router.label(),
                ladder.rates,
                began.elapsed().as_secs_f64() / 60.0
            );
            let must_reach = if router.is_peer() {
                0.0
            } else {
                best_peer.unwrap_or(0.0)
            };
            let run_dir = dir.join(format!("goodput-{w}-{}", router.label().replace(' ', "-")));
            std::fs::create_dir_all(&run_dir)?;
            match one_ladder(tools, cfg, ladder, router, must_reach, &run_dir).await {
                Ok(r) => {
                    eprintln!(
                        "  goodput {} req/s (first fail {}), {:.0} s",
                        r.goodput.map_or("<first rung".into(), |g| format!("{g}")),
                        r.first_fail.map_or("-".into(), |f| format!("{f}")),
                        r.wall_s
                    );
                    if router.is_peer() {
                        best_peer = best_peer.into_iter().chain(r.goodput).reduce(f64::max);
                    }
                    on_run(&r);
                    out.push(r);
                }
                Err(e) => eprintln!("  skipped: {e:#}"),
            }
        }
    }
    Ok(out)
}

async fn one_ladder(
    tools: &Tools,
    cfg: &GoodputCfg,
    ladder: &Ladder,
    router: &Router,
    must_reach: f64,
    dir: &Path,
) -> anyhow::Result<LadderRun> {
    let began = std::time::Instant::now();
    let (mut points, mut cpu) =
        climb(tools, cfg, ladder, router, &ladder.rates, must_reach, dir).await?;
    let (mut goodput, mut first_fail) = verdict(&points);
    if cfg.bisect
        && let (Some(g), Some(f)) = (goodput, first_fail)
    {
        let mid = (g * f).sqrt().round();
        if mid > g && mid < f {
            let sub = dir.join(format!("bisect-{mid}"));
            std::fs::create_dir_all(&sub)?;
            let (mut p, c) = climb(tools, cfg, ladder, router, &[mid], 0.0, &sub).await?;
            cpu += c;
            if let Some(mut p) = p.pop() {
                p.fresh = true;
                if p.passed {
                    goodput = Some(mid);
                } else {
                    first_fail = Some(mid);
                }
                points.push(p);
            }
        }
    }
    // The comparison rate (the best peer's goodput) when the ladder did not measure it.
    if must_reach > 0.0 && !points.iter().any(|p| p.rate == must_reach) {
        let sub = dir.join(format!("at-{must_reach}"));
        std::fs::create_dir_all(&sub)?;
        let (mut p, c) = climb(tools, cfg, ladder, router, &[must_reach], 0.0, &sub).await?;
        cpu += c;
        if let Some(mut p) = p.pop() {
            p.fresh = true;
            points.push(p);
        }
    }
    Ok(LadderRun {
        workload: ladder.workload.workload.as_str().into(),
        router: router.label(),
        points,
        goodput,
        first_fail,
        router_cpu_s: cpu,
        wall_s: began.elapsed().as_secs_f64(),
    })
}

/// Goodput (highest rung whose rungs below all passed) and first failing rate.
fn verdict(points: &[Point]) -> (Option<f64>, Option<f64>) {
    let mut goodput = None;
    for p in points.iter().filter(|p| !p.fresh) {
        if !p.passed {
            return (goodput, Some(p.rate));
        }
        goodput = Some(p.rate);
    }
    (goodput, None)
}

/// One cold start, a warm-up at `rates[0]`, then the rungs until one fails at or above
/// `must_reach`. Returns the measured rungs and the router's CPU seconds.
async fn climb(
    tools: &Tools,
    cfg: &GoodputCfg,
    ladder: &Ladder,
    router: &Router,
    rates: &[f64],
    must_reach: f64,
    dir: &Path,
) -> anyhow::Result<(Vec<Point>, f64)> {
    anyhow::ensure!(!rates.is_empty(), "no rungs");
    let mut extra = vec![
        "--stream-granularity".to_owned(),
        cfg.stream_granularity.to_string(),
        "--seed".into(),
        "1".into(),
    ];
    extra.extend(ladder.sim_flags());
    if ladder.workload.workload == Kind::Lora {
        extra.push("--lora-modules".into());
        extra.push(ladder.workload.adapter_names().join(","));
    }
    // Every router of a comparison with a precise one gets the same engines (tokenizer, one
    // address per replica, events published), so that they serve the same token counts.
    let events = cfg
        .routers
        .iter()
        .any(Router::needs_engine_events)
        .then(|| super::precise::EngineEvents::new(&tools.repo))
        .transpose()?;
    let (mut sim, replicas) = start_sim_with(tools, cfg.replicas, &extra, dir, events.as_ref())?;
    let up = start_router_with(tools, router, &replicas, dir, events.as_ref()).await?;
    let cpu0 = up.cpu_seconds();
    let mut schedule = vec![(cfg.warmup_s, rates[0])];
    for (k, &r) in rates.iter().enumerate() {
        schedule.push((cfg.warmup_s + (k + 1) as f64 * cfg.step_s, r));
    }
    let ctl = Control {
        schedule,
        ..Control::default()
    };
    let (stop, live) = (ctl.stop.clone(), ctl.live.clone());
    let spec = LoadSpec {
        url: up.url.clone(),
        mode: Mode::Rate(rates[0]),
        duration_s: None,
        count: None,
        drain_timeout_s: cfg.drain_s,
        seed: 1,
        progress: false,
    };
    let start = tokio::time::Instant::now();
    let load = tokio::spawn(loadgen::run_with(spec, ladder.workload.build(), ctl));
    let mut last = rates.len() - 1;
    for (k, &rate) in rates.iter().enumerate() {
        let (from, to) = rung_window(cfg, k);
        tokio::time::sleep_until(start + Duration::from_secs_f64(to + cfg.grace_s)).await;
        let now = start.elapsed().as_secs_f64();
        let entries = live.snapshot();
        let mut ttfts = Vec::new();
        let mut failed = false;
        for e in entries.iter().filter(|e| e.sent_s >= from && e.sent_s < to) {
            ttfts.push(e.ttft_ms.unwrap_or((now - e.sent_s) * 1e3));
            failed |= e.failed;
        }
        ttfts.sort_by(f64::total_cmp);
        let p90 = quantile_sorted(&ttfts, 0.9);
        let pass = !failed && p90.is_some_and(|p| p <= cfg.ttft_slo_ms);
        eprintln!(
            "  rung {rate} req/s: {} requests, TTFT p90 {:.0} ms{} → {}",
            ttfts.len(),
            p90.unwrap_or(f64::NAN),
            if failed { ", errors" } else { "" },
            if pass { "pass" } else { "FAIL" }
        );
        if !pass && rate >= must_reach {
            last = k;
            stop.store(true, Ordering::Relaxed);
            break;
        }
    }
    let report = load.await??;
    let cpu = up.cpu_seconds() - cpu0;
    sim.check_alive()?;
    save_metrics(&up, &replicas, dir).await;
    drop(up);
    drop(sim);
    std::fs::write(dir.join("loadgen.json"), serde_json::to_vec(&report)?)?;
    let points = rates[..=last]
        .iter()
        .enumerate()
        .map(|(k, &rate)| {
            let (from, to) = rung_window(cfg, k);
            let recs: Vec<&Record> = report
                .records
                .iter()
                .filter(|r| r.sent_s >= from && r.sent_s < to)
                .collect();
            point(rate, &recs, cfg.step_s, cfg.ttft_slo_ms)
        })
        .collect();
    Ok((points, cpu))
}

/// Keeps the engines' and the EPP's `/metrics` at the end of a climb in the run directory
/// (`sim-<i>.metrics`, `epp.metrics`): where the tables raise a question (a hit rate, an index
/// that dropped events), the counters answer it. Best effort: a failed scrape is skipped.
async fn save_metrics(up: &RouterUp, replicas: &[std::net::SocketAddr], dir: &Path) {
    let mut targets: Vec<(String, String)> = replicas
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("sim-{i}.metrics"), format!("http://{a}/metrics")))
        .collect();
    if let Some(url) = &up.epp_metrics {
        targets.push(("epp.metrics".into(), url.clone()));
    }
    for (file, url) in targets {
        if let Ok((200, body)) = crate::harness::get(&url).await {
            let _ = std::fs::write(dir.join(file), body);
        }
    }
}

/// Send-time window of rung `k`, seconds from the start of the run.
fn rung_window(cfg: &GoodputCfg, k: usize) -> (f64, f64) {
    let from = cfg.warmup_s + k as f64 * cfg.step_s;
    (from, from + cfg.step_s)
}

/// The measures of one rung from its requests.
pub fn point(rate: f64, recs: &[&Record], step_s: f64, slo_ms: f64) -> Point {
    let owned: Vec<Record> = recs.iter().map(|r| (*r).clone()).collect();
    let summary = Summary::of(&owned, step_s);
    let errors = summary.sent - summary.ok;
    let passed = errors == 0 && summary.ttft_ms.p90.is_some_and(|p| p <= slo_ms);
    let (herding, herding_windows) = herding(recs);
    let mut abs = Vec::new();
    let mut rel = Vec::new();
    let mut bias = Vec::new();
    let mut obs = Vec::new();
    for r in recs.iter().filter(|r| r.ok()) {
        if let (Some(p), Some(o)) = (r.predicted_ttft_ms, r.ttft_ms) {
            abs.push((p - o).abs());
            bias.push(p - o);
            obs.push(o);
            if o > 0.0 {
                rel.push((p - o).abs() / o);
            }
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        quantile_sorted(&v, 0.5)
    };
    Point {
        rate,
        fresh: false,
        passed,
        cache_hit: summary.usage_cache_hit,
        summary,
        herding,
        herding_windows,
        pred_n: abs.len(),
        pred_abs_err_p50_ms: med(abs),
        pred_rel_err_p50: med(rel),
        pred_bias_p50_ms: med(bias),
        pred_observed_p50_ms: med(obs),
    }
}

/// Burst herding: arrivals grouped into consecutive 50 ms windows (from the first arrival);
/// in each window with at least [`BURST_MIN_ARRIVALS`] arrivals that were answered, the
/// largest share that one replica got; the mean over those windows, and their number.
pub fn herding(recs: &[&Record]) -> (Option<f64>, usize) {
    let mut windows: BTreeMap<i64, BTreeMap<&str, usize>> = BTreeMap::new();
    let Some(t0) = recs.iter().map(|r| r.sent_s).reduce(f64::min) else {
        return (None, 0);
    };
    for r in recs {
        if let Some(rep) = r.replica.as_deref() {
            let w = ((r.sent_s - t0) / BURST_WINDOW_S).floor() as i64;
            *windows.entry(w).or_default().entry(rep).or_default() += 1;
        }
    }
    let shares: Vec<f64> = windows
        .values()
        .filter_map(|per| {
            let n: usize = per.values().sum();
            (n >= BURST_MIN_ARRIVALS).then(|| *per.values().max().unwrap_or(&0) as f64 / n as f64)
        })
        .collect();
    let n = shares.len();
    ((n > 0).then(|| shares.iter().sum::<f64>() / n as f64), n)
}

/// The comparison rate of a workload: the best peer's goodput (else the first rung).
pub fn comparison_rate(runs: &[LadderRun], ladder: &Ladder, peers: &[String]) -> Option<f64> {
    let w = ladder.workload.workload.as_str();
    runs.iter()
        .filter(|r| r.workload == w && peers.contains(&r.router))
        .filter_map(|r| r.goodput)
        .reduce(f64::max)
        .or_else(|| ladder.rates.first().copied())
}

/// The Markdown section: goodput table, numbers at the best peer's goodput rate, burst
/// herding, prediction error, and every rung.
pub fn markdown(runs: &[LadderRun], cfg: &GoodputCfg) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let f0 = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let pct = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{:.0} %", v * 100.0));
    let peers: Vec<String> = cfg
        .routers
        .iter()
        .filter(|r| r.is_peer())
        .map(Router::label)
        .collect();
    let find = |w: &str, router: &str| runs.iter().find(|r| r.workload == w && r.router == router);
    let goodput_cell = |r: Option<&LadderRun>, ladder: &Ladder| match r {
        None => "not run".to_owned(),
        Some(r) => match (r.goodput, r.first_fail) {
            (Some(g), Some(_)) => format!("{g}"),
            (Some(g), None) => format!("≥ {g}"),
            (None, _) => format!("< {}", ladder.rates.first().copied().unwrap_or(0.0)),
        },
    };

    // 1. Goodput.
    let _ = writeln!(
        s,
        "**Goodput** (req/s): the highest rate with TTFT p90 ≤ {:.0} ms and no errors; `≥ x`: never failed up to the top rung; `< x`: failed the first rung. Ratios: Switchyard's goodput / the best peer's (a `< x` or `≥ x` counted as x).\n",
        cfg.ttft_slo_ms
    );
    let mut head = "| workload |".to_owned();
    let mut sep = "| --- |".to_owned();
    for r in &cfg.routers {
        let _ = write!(head, " {} |", r.label());
        sep.push_str(" ---: |");
    }
    // One ratio column per Switchyard router run (the default, the profiles compared with it).
    let ours: Vec<String> = cfg
        .routers
        .iter()
        .filter(|r| {
            matches!(
                r,
                Router::Switchyard { .. } | Router::SwitchyardPrecise { .. }
            )
        })
        .map(Router::label)
        .collect();
    for label in &ours {
        let _ = write!(
            head,
            " {} / best peer |",
            label.trim_start_matches("switchyard ")
        );
        sep.push_str(" ---: |");
    }
    let _ = writeln!(s, "{head}\n{sep}");
    for ladder in &cfg.ladders {
        let w = ladder.workload.workload.as_str();
        if !runs.iter().any(|r| r.workload == w) {
            continue;
        }
        let mut row = format!("| `{w}` |");
        for r in &cfg.routers {
            let _ = write!(row, " {} |", goodput_cell(find(w, &r.label()), ladder));
        }
        let lower = |r: &LadderRun| {
            r.goodput
                .or_else(|| ladder.rates.first().copied())
                .unwrap_or(0.0)
        };
        let best_peer = runs
            .iter()
            .filter(|r| r.workload == w && peers.contains(&r.router))
            .map(lower)
            .reduce(f64::max);
        for label in &ours {
            let cell = match (find(w, label), best_peer) {
                (Some(r), Some(b)) if b > 0.0 => format!("×{:.2}", lower(r) / b),
                _ => "-".into(),
            };
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(s, "{row}");
    }
    s.push('\n');

    // 2. At the best peer's goodput rate.
    let _ = writeln!(
        s,
        "**At the best peer's goodput rate** (per workload; `fresh` = a separate run at that rate, warm-up then one step, because the router's ladder had stopped below it or the rate was a bisection point): TTFT, E2E, output tokens/s (of the rung's completed requests per second of rung: the offered load unless requests fail), errors, prefix-cache hit (usage), burst herding (mean largest share of a 50 ms window to one replica; 0.25 = spread over 4, 1.0 = all to one), and the cost model's median prediction error.\n"
    );
    let _ = writeln!(
        s,
        "| workload | rate (req/s) | router | TTFT p50 (ms) | TTFT p90 (ms) | E2E p90 (ms) | output tok/s (completed) | errors | cache hit | burst herding | pred. error p50 (ms / rel.) |\n\
         | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for ladder in &cfg.ladders {
        let w = ladder.workload.workload.as_str();
        let Some(rate) = comparison_rate(runs, ladder, &peers) else {
            continue;
        };
        for r in &cfg.routers {
            let Some(run) = find(w, &r.label()) else {
                continue;
            };
            let cell = match run.at(rate) {
                Some(p) => format!(
                    "{} | {} | {} | {:.0} | {} | {} | {} | {} |",
                    f0(p.summary.ttft_ms.p50),
                    f0(p.summary.ttft_ms.p90),
                    f0(p.summary.e2e_ms.p90),
                    p.summary.output_tok_per_s,
                    p.summary.sent - p.summary.ok,
                    pct(p.cache_hit),
                    p.herding.map_or("-".into(), |h| format!("{h:.2}")),
                    pred_cell(p),
                ),
                None => {
                    format!(
                        "not reached (failed at {} req/s) | | | | | | | |",
                        f0(run.first_fail)
                    )
                }
            };
            let fresh = run.at(rate).is_some_and(|p| p.fresh);
            let _ = writeln!(
                s,
                "| `{w}` | {rate}{} | {} | {cell}",
                if fresh { " (fresh)" } else { "" },
                run.router
            );
        }
    }
    s.push('\n');

    // 3. Every rung.
    let _ = writeln!(
        s,
        "**Every rung** (the ladders as climbed; `fresh` points are separate runs):\n"
    );
    for ladder in &cfg.ladders {
        let w = ladder.workload.workload.as_str();
        if !runs.iter().any(|r| r.workload == w) {
            continue;
        }
        let _ = writeln!(s, "#### `{w}`\n");
        let _ = writeln!(s, "{}\n", describe(ladder, cfg.replicas));
        let _ = writeln!(
            s,
            "| router | rate (req/s) | verdict | TTFT p50 (ms) | TTFT p90 (ms) | E2E p90 (ms) | output tok/s | errors | cache hit | burst herding (windows) | pred. error p50 (ms / rel.) | pred. bias p50 (ms) |\n\
             | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in &cfg.routers {
            let Some(run) = find(w, &r.label()) else {
                continue;
            };
            for p in &run.points {
                let _ = writeln!(
                    s,
                    "| {} | {}{} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
                    run.router,
                    p.rate,
                    if p.fresh { " (fresh)" } else { "" },
                    if p.passed { "pass" } else { "**fail**" },
                    f0(p.summary.ttft_ms.p50),
                    f0(p.summary.ttft_ms.p90),
                    f0(p.summary.e2e_ms.p90),
                    p.summary.output_tok_per_s,
                    p.summary.sent - p.summary.ok,
                    pct(p.cache_hit),
                    p.herding
                        .map_or("-".into(), |h| format!("{h:.2} ({})", p.herding_windows)),
                    pred_cell(p),
                    f0(p.pred_bias_p50_ms),
                );
            }
        }
        s.push('\n');
    }
    s
}

fn pred_cell(p: &Point) -> String {
    match (p.pred_abs_err_p50_ms, p.pred_rel_err_p50) {
        (Some(a), Some(r)) => format!("{a:.0} / {:.0} %", r * 100.0),
        _ => "-".into(),
    }
}

/// One sentence describing a ladder's workload and the cluster's KV capacity.
pub fn describe(l: &Ladder, replicas: usize) -> String {
    let mut s = super::routing::describe(&l.workload);
    let kv = l.cluster_kv_tokens(replicas);
    let _ = std::fmt::Write::write_fmt(
        &mut s,
        format_args!(
            " Cluster KV cache: {replicas} × {} blocks × {SIM_BLOCK_SIZE} tokens = {kv} tokens",
            l.gpu_blocks.unwrap_or(SIM_DEFAULT_GPU_BLOCKS)
        ),
    );
    if let Some(t) = l.tiers {
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!(
                "; tiers: CPU {replicas} × {} blocks, shared store {} blocks: {} tokens in all",
                t.cpu_kv_blocks,
                t.shared_kv_blocks,
                l.cluster_all_tiers_tokens(replicas)
            ),
        );
    }
    if let Some(ws) = l.engine_working_set_tokens() {
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!(
                "; shared prefixes {ws} tokens = {:.2}× the cluster's KV capacity",
                ws as f64 / kv as f64
            ),
        );
        if l.tiers.is_some() {
            let _ = std::fmt::Write::write_fmt(
                &mut s,
                format_args!(
                    " (GPU), {:.2}× every tier's",
                    ws as f64 / l.cluster_all_tiers_tokens(replicas) as f64
                ),
            );
        }
    }
    if l.engine_tokens_per_token != 1.0 {
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!(
                " (engine tokens: the engines tokenize with the test tokenizer, {:.2} tokens per workload token, and the workload's token counts are divided by that)",
                l.engine_tokens_per_token
            ),
        );
    }
    if !l.sim_args.is_empty() {
        let _ = std::fmt::Write::write_fmt(
            &mut s,
            format_args!("; sim flags `{}`", l.sim_args.join(" ")),
        );
    }
    s.push_str(&format!(". Rungs: {:?} req/s.", l.rates));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize, sent_s: f64, replica: &str, ttft: f64, predicted: Option<f64>) -> Record {
        Record {
            i,
            sent_s,
            status: 200,
            ttft_ms: Some(ttft),
            e2e_ms: Some(ttft + 100.0),
            output_tokens: 10,
            prompt_tokens: 100,
            cached_tokens: Some(50),
            replica: Some(replica.into()),
            predicted_ttft_ms: predicted,
            ..Record::default()
        }
    }

    #[test]
    fn herding_is_the_mean_largest_share_over_busy_windows() {
        // Window 0: 4 arrivals, 3 to a → 0.75. Window 1: 4 arrivals spread → 0.25.
        // Window 2: 2 arrivals (too few, ignored).
        let recs = [
            rec(0, 0.000, "a", 1.0, None),
            rec(1, 0.010, "a", 1.0, None),
            rec(2, 0.020, "a", 1.0, None),
            rec(3, 0.040, "b", 1.0, None),
            rec(4, 0.051, "a", 1.0, None),
            rec(5, 0.060, "b", 1.0, None),
            rec(6, 0.070, "c", 1.0, None),
            rec(7, 0.080, "d", 1.0, None),
            rec(8, 0.120, "a", 1.0, None),
            rec(9, 0.130, "a", 1.0, None),
        ];
        let refs: Vec<&Record> = recs.iter().collect();
        let (h, n) = herding(&refs);
        assert_eq!(n, 2);
        assert!((h.unwrap() - 0.5).abs() < 1e-9, "{h:?}");
        assert_eq!(herding(&[]), (None, 0));
    }

    #[test]
    fn a_point_judges_the_slo_and_measures_the_prediction_error() {
        let recs: Vec<Record> = (0..10)
            .map(|i| {
                rec(
                    i,
                    i as f64 * 0.1,
                    "a",
                    100.0 * (i + 1) as f64,
                    Some(100.0 * (i + 1) as f64 + 50.0),
                )
            })
            .collect();
        let refs: Vec<&Record> = recs.iter().collect();
        let p = point(5.0, &refs, 1.0, 1000.0);
        // TTFTs 100..1000: p90 = 910 ms.
        assert!(p.passed, "{:?}", p.summary.ttft_ms);
        assert_eq!(p.pred_n, 10);
        assert_eq!(p.pred_abs_err_p50_ms, Some(50.0));
        assert_eq!(p.pred_bias_p50_ms, Some(50.0));
        assert_eq!(p.cache_hit, Some(0.5));
        assert!((p.summary.output_tok_per_s - 100.0).abs() < 1e-9);
        let strict = point(5.0, &refs, 1.0, 900.0);
        assert!(!strict.passed);
        // One error fails the point whatever the TTFTs.
        let mut bad = recs.clone();
        bad[0].status = 503;
        bad[0].error = Some("x".into());
        let refs: Vec<&Record> = bad.iter().collect();
        assert!(!point(5.0, &refs, 1.0, 1000.0).passed);
    }

    #[test]
    fn goodput_is_the_highest_rung_with_every_rung_below_passing() {
        let pt = |rate, passed, fresh| Point {
            rate,
            passed,
            fresh,
            ..Point::default()
        };
        assert_eq!(
            verdict(&[
                pt(10.0, true, false),
                pt(15.0, true, false),
                pt(20.0, false, false)
            ]),
            (Some(15.0), Some(20.0))
        );
        // A pass above a failure does not count; fresh points are not rungs.
        assert_eq!(
            verdict(&[pt(10.0, false, false), pt(15.0, true, false)]),
            (None, Some(10.0))
        );
        assert_eq!(
            verdict(&[pt(10.0, true, false), pt(12.0, false, true)]),
            (Some(10.0), None)
        );
    }

    #[test]
    fn kv_sharing_sits_between_the_gpu_tier_and_every_tier() {
        let tiers = Tiers {
            cpu_kv_blocks: 16_384,
            shared_kv_blocks: 65_536,
        };
        for ratio in [1.0, 1.3, 1.8] {
            let mut l = Ladder {
                workload: WorkloadArgs {
                    workload: Kind::KvSharing,
                    system_tokens: 8000,
                    ..WorkloadArgs::default()
                },
                gpu_blocks: Some(8192),
                rates: vec![10.0],
                tiers: Some(tiers),
                sim_args: vec!["--jitter".into(), "0.05".into()],
                engine_tokens_per_token: ratio,
            };
            let (gpu, all) = (l.cluster_kv_tokens(8), l.cluster_all_tiers_tokens(8));
            assert_eq!(gpu, 8 * 8192 * 16);
            assert_eq!(all, gpu + (8 * 16_384 + 65_536) * 16);
            l.workload.groups = kv_sharing_groups(gpu, all, 8000, ratio);
            let ws = l.engine_working_set_tokens().unwrap();
            assert!(
                ws > gpu && ws < all,
                "ratio {ratio}: {ws} not in ({gpu}, {all})"
            );
            // The geometric middle: as many times the GPU tier as every tier is times it.
            let (lo, hi) = (ws as f64 / gpu as f64, all as f64 / ws as f64);
            assert!((lo / hi - 1.0).abs() < 0.05, "{lo} vs {hi}");
            assert_eq!(
                l.sim_flags(),
                [
                    "--num-gpu-blocks",
                    "8192",
                    "--cpu-kv-blocks",
                    "16384",
                    "--shared-kv-blocks",
                    "65536",
                    "--jitter",
                    "0.05"
                ]
            );
            let d = describe(&l, 8);
            assert!(d.contains("tiers: CPU 8 × 16384 blocks"), "{d}");
        }
    }

    #[test]
    fn tables_name_the_comparison_rate_and_the_ratios() {
        let routers: Vec<Router> = ["switchyard", "switchyard-cost", "sglang:cache_aware", "smg"]
            .iter()
            .map(|r| Router::parse(r).unwrap())
            .collect();
        let ladder = Ladder {
            workload: WorkloadArgs {
                workload: Kind::HotSpot,
                groups: 4,
                system_tokens: 1000,
                ..WorkloadArgs::default()
            },
            gpu_blocks: Some(100),
            rates: vec![10.0, 20.0, 40.0],
            tiers: None,
            sim_args: Vec::new(),
            engine_tokens_per_token: 1.0,
        };
        let cfg = GoodputCfg {
            replicas: 2,
            stream_granularity: 16,
            warmup_s: 1.0,
            step_s: 1.0,
            grace_s: 1.0,
            drain_s: 1.0,
            ttft_slo_ms: 1000.0,
            bisect: false,
            routers,
            ladders: vec![ladder],
        };
        let run = |router: &str, passes: &[bool]| LadderRun {
            workload: "hot-spot".into(),
            router: router.into(),
            points: passes
                .iter()
                .zip([10.0, 20.0, 40.0])
                .map(|(&passed, rate)| Point {
                    rate,
                    passed,
                    herding: Some(0.5),
                    ..Point::default()
                })
                .collect(),
            goodput: None,
            first_fail: None,
            router_cpu_s: 0.0,
            wall_s: 0.0,
        };
        let mut runs = vec![
            run("sglang-router cache_aware", &[true, false]),
            run("smg cache_aware", &[true, true, false]),
            run("switchyard default", &[false]),
            run("switchyard cost", &[true, true, true]),
        ];
        for r in &mut runs {
            (r.goodput, r.first_fail) = verdict(&r.points);
        }
        let peers = vec![
            "sglang-router cache_aware".to_owned(),
            "smg cache_aware".to_owned(),
        ];
        assert_eq!(comparison_rate(&runs, &cfg.ladders[0], &peers), Some(20.0));
        let md = markdown(&runs, &cfg);
        assert!(
            md.contains("| `hot-spot` | < 10 | ≥ 40 | 10 | 20 | ×0.50 | ×2.00 |"),
            "{md}"
        );
        assert!(md.contains("not reached (failed at 10 req/s)"), "{md}");
        // 4 groups × 1,000 tokens against 2 × 100 × 16 = 3,200 tokens of KV.
        assert!(md.contains("= 1.25× the cluster's KV capacity"), "{md}");
        let (max, typical) = cfg.estimate_s();
        assert!(max >= typical && typical > 0.0);
    }
}
