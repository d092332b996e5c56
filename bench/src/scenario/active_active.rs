//! Active-active (issue 15 item 6): the same seeded workload against the same simulated cluster
//! (fresh and cold for every run), routed by 1, 2, 3 … `epp` processes behind one Envoy, all
//! with the precise profile and all hearing every engine's KV events
//! ([`super::precise`]). One EPP is the baseline; the goal is TTFT p90 within 5 % of it and a
//! prefix-cache hit rate (the engines' own counters) within 2 points.
//!
//! Why several EPPs can route as well as one: the prefix index is built from the engines'
//! events, so every EPP has the same one (only the speculative entries, for requests an EPP has
//! just routed and whose events have not arrived yet, are its own); the load signals are the
//! engines' running and waiting counts, scraped by every EPP every 50 ms. What each EPP cannot
//! see is the others' in-flight requests between two scrapes: the measures of that are burst
//! herding (the largest share one replica got in a 50 ms window of arrivals) and the spread of
//! requests over the replicas, next to TTFT and hit rate.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::goodput::{self, Point};
use super::precise::{self, EngineEvents, EppSet};
use super::start_sim_with;
use crate::harness::{Tools, get, prom_sum};
use crate::loadgen::{self, Control, LoadSpec, Mode, Record};
use crate::workload::WorkloadArgs;

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActiveActiveCfg {
    /// Simulated replicas.
    pub replicas: usize,
    /// `sim --stream-granularity`.
    pub stream_granularity: u32,
    /// `sim --num-gpu-blocks` (None: sim's default).
    pub gpu_blocks: Option<usize>,
    /// The workload.
    pub workload: WorkloadArgs,
    /// Poisson rate, requests per second.
    pub rate: f64,
    /// Seconds of arrivals before the measured window (caches fill; not measured).
    pub warmup_s: f64,
    /// Seconds of measured arrivals.
    pub duration_s: f64,
    /// Seconds after the last arrival before unfinished requests are cut.
    pub drain_s: f64,
    /// EPP counts compared, the first being the baseline.
    pub epps: Vec<usize>,
    /// Runs of each EPP count (in rounds: 1, 2, 3, 1, 2, 3, …).
    pub repeats: usize,
    /// More `epp` flags for every EPP (`scenario active-active --epp-arg`).
    #[serde(default)]
    pub epp_args: Vec<String>,
    /// Whether the EPPs share their speculative entries (`speculativePeers`); off:
    /// `scenario active-active --no-speculative-peers`.
    #[serde(default = "yes")]
    pub speculative_peers: bool,
    /// Also run, for every count n > 1, one routing EPP with n − 1 watching ones (every
    /// process, one route): what n EPP processes cost the machine they share with the engines,
    /// apart from how n EPPs route (`scenario active-active --controls`).
    #[serde(default)]
    pub watching_controls: bool,
}

fn yes() -> bool {
    true
}

/// One EPP's share of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EppShare {
    /// Requests it routed (`inference_objective_request_total`), warm-up included.
    pub decisions: f64,
    /// KV events it applied to its index (`inference_extension_kv_events_applied_total`).
    pub kv_events_applied: f64,
    /// Engines it applied events from.
    pub engines_heard: usize,
    /// Peer EPPs' messages it made speculative entries from
    /// (`inference_extension_speculation_peer_messages_total{outcome="applied"}`).
    #[serde(default)]
    pub peer_applied: f64,
}

/// One run: a number of EPPs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActiveActiveRun {
    /// EPPs behind Envoy.
    pub epps: usize,
    /// EPPs beside them that route nothing ([`EppSet::watching`]).
    #[serde(default)]
    pub watching: usize,
    /// Which repetition.
    pub round: usize,
    /// The measured window: client summary, burst herding, prediction error, usage hit rate.
    pub point: Point,
    /// Σ `vllm:prefix_cache_hits_total` / Σ `vllm:prefix_cache_queries_total` over the
    /// replicas, counted over the measured window.
    pub replica_cache_hit: Option<f64>,
    /// Per EPP, in start order.
    pub per_epp: Vec<EppShare>,
    /// Requests of the measured window per replica.
    pub replica_requests: Vec<usize>,
    /// Coefficient of variation of `replica_requests`.
    pub spread_cv: Option<f64>,
    /// CPU seconds of Envoy and the EPPs over the run.
    pub router_cpu_s: f64,
}

/// Runs every EPP count `repeats` times; `on_run` after each.
pub async fn run(
    tools: &Tools,
    cfg: &ActiveActiveCfg,
    dir: &Path,
    mut on_run: impl FnMut(&ActiveActiveRun),
) -> anyhow::Result<Vec<ActiveActiveRun>> {
    let mut out = Vec::new();
    let sets = sets(cfg);
    let total = sets.len() * cfg.repeats;
    let mut k = 0;
    for round in 0..cfg.repeats {
        for &set in &sets {
            k += 1;
            eprintln!(
                "active-active [{k}/{total}] {}, {} at {} req/s",
                set_label(set),
                cfg.workload.workload.as_str(),
                cfg.rate
            );
            let run_dir = dir.join(format!(
                "active-active-{}-{}-{round}",
                set.routed, set.watching
            ));
            std::fs::create_dir_all(&run_dir)?;
            let r = one(tools, cfg, set, round, &run_dir).await?;
            eprintln!(
                "  TTFT p50 {:.0} ms p90 {:.0} ms, hit {}, herding {}, decisions {:?}, errors {}",
                r.point.summary.ttft_ms.p50.unwrap_or(f64::NAN),
                r.point.summary.ttft_ms.p90.unwrap_or(f64::NAN),
                r.replica_cache_hit
                    .map_or("-".into(), |h| format!("{:.1} %", h * 100.0)),
                r.point.herding.map_or("-".into(), |h| format!("{h:.2}")),
                r.per_epp.iter().map(|e| e.decisions).collect::<Vec<_>>(),
                r.point.summary.sent - r.point.summary.ok,
            );
            on_run(&r);
            out.push(r);
        }
    }
    Ok(out)
}

/// The EPP sets of one round, in order: each count, and after each count n > 1 its control
/// (one routing, n − 1 watching) when asked.
fn sets(cfg: &ActiveActiveCfg) -> Vec<EppSet> {
    let mut sets = Vec::new();
    for &n in &cfg.epps {
        sets.push(EppSet::routing(n));
        if cfg.watching_controls && n > 1 {
            sets.push(EppSet {
                routed: 1,
                watching: n - 1,
            });
        }
    }
    sets
}

/// `3 EPPs`, `1 EPP + 2 watching`.
fn set_label(set: EppSet) -> String {
    let routed = format!(
        "{} EPP{}",
        set.routed,
        if set.routed == 1 { "" } else { "s" }
    );
    if set.watching == 0 {
        routed
    } else {
        format!("{routed} + {} watching", set.watching)
    }
}

async fn one(
    tools: &Tools,
    cfg: &ActiveActiveCfg,
    set: EppSet,
    round: usize,
    dir: &Path,
) -> anyhow::Result<ActiveActiveRun> {
    let events = EngineEvents::new(&tools.repo)?;
    let mut extra = vec![
        "--stream-granularity".to_owned(),
        cfg.stream_granularity.to_string(),
        "--seed".into(),
        "1".into(),
    ];
    if let Some(b) = cfg.gpu_blocks {
        extra.push("--num-gpu-blocks".into());
        extra.push(b.to_string());
    }
    let (mut sim, replicas) = start_sim_with(tools, cfg.replicas, &extra, dir, Some(&events))?;
    let mut epp_args = vec!["--debug-decision-header"];
    epp_args.extend(cfg.epp_args.iter().map(String::as_str));
    let multi = precise::start_multi_epp(
        tools,
        &precise::precise_config(&events),
        set,
        &replicas,
        dir,
        &epp_args,
        cfg.speculative_peers,
    )
    .await?;
    super::wait_serving(&multi.up.url, Duration::from_secs(60)).await?;
    let cpu0 = multi.up.cpu_seconds();
    let ctl = Control {
        schedule: vec![(cfg.warmup_s + cfg.duration_s, cfg.rate)],
        ..Control::default()
    };
    let spec = LoadSpec {
        url: multi.up.url.clone(),
        mode: Mode::Rate(cfg.rate),
        duration_s: None,
        count: None,
        drain_timeout_s: cfg.drain_s,
        seed: 1,
        progress: false,
    };
    let start = tokio::time::Instant::now();
    let load = tokio::spawn(loadgen::run_with(spec, cfg.workload.build(), ctl));
    // The engines' counters at the end of the warm-up, to count the measured window only.
    tokio::time::sleep_until(start + Duration::from_secs_f64(cfg.warmup_s)).await;
    let before = replica_counters(&replicas).await?;
    let report = load.await??;
    let after = replica_counters(&replicas).await?;
    let router_cpu_s = multi.up.cpu_seconds() - cpu0;
    let mut per_epp = Vec::with_capacity(set.total());
    for url in &multi.metrics_urls {
        let (_, text) = get(url).await?;
        per_epp.push(EppShare {
            decisions: prom_sum(&text, "inference_objective_request_total"),
            kv_events_applied: prom_sum(&text, "inference_extension_kv_events_applied_total"),
            engines_heard: engines_heard(&text),
            peer_applied: peer_applied(&text),
        });
    }
    sim.check_alive()?;
    drop(multi);
    drop(sim);
    std::fs::write(dir.join("loadgen.json"), serde_json::to_vec(&report)?)?;
    let (from, to) = (cfg.warmup_s, cfg.warmup_s + cfg.duration_s);
    let recs: Vec<&Record> = report
        .records
        .iter()
        .filter(|r| r.sent_s >= from && r.sent_s < to)
        .collect();
    let point = goodput::point(cfg.rate, &recs, cfg.duration_s, 1000.0);
    let hits = after.0 - before.0;
    let queries = after.1 - before.1;
    let mut replica_requests = vec![0usize; cfg.replicas];
    for r in &recs {
        if let Some(i) = r
            .replica
            .as_deref()
            .and_then(|p| p.strip_prefix("sim-"))
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < cfg.replicas)
        {
            replica_requests[i] += 1;
        }
    }
    Ok(ActiveActiveRun {
        epps: set.routed,
        watching: set.watching,
        round,
        point,
        replica_cache_hit: (queries > 0.0).then(|| hits / queries),
        spread_cv: cv(&replica_requests),
        per_epp,
        replica_requests,
        router_cpu_s,
    })
}

/// Σ prefix-cache hits and queries over the replicas.
async fn replica_counters(replicas: &[std::net::SocketAddr]) -> anyhow::Result<(f64, f64)> {
    let (mut hits, mut queries) = (0.0, 0.0);
    for a in replicas {
        let (_, text) = get(&format!("http://{a}/metrics")).await?;
        hits += prom_sum(&text, "vllm:prefix_cache_hits_total");
        queries += prom_sum(&text, "vllm:prefix_cache_queries_total");
    }
    Ok((hits, queries))
}

/// Coefficient of variation (None when nothing was counted).
fn cv(xs: &[usize]) -> Option<f64> {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<usize>() as f64 / n.max(1.0);
    (mean > 0.0).then(|| {
        let var = xs.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n;
        var.sqrt() / mean
    })
}

/// Peer messages applied, from an EPP's `/metrics`.
pub fn peer_applied(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|l| {
            l.strip_prefix(
                "inference_extension_speculation_peer_messages_total{outcome=\"applied\"} ",
            )
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Engines (`model_server_pod`) with at least one applied KV event in an EPP's `/metrics`.
pub fn engines_heard(metrics: &str) -> usize {
    let mut pods = std::collections::BTreeSet::new();
    for l in metrics.lines() {
        let Some(rest) = l.strip_prefix("inference_extension_kv_events_applied_total{") else {
            continue;
        };
        let applied = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if applied <= 0.0 {
            continue;
        }
        if let Some(pod) = rest
            .split_once("model_server_pod=\"")
            .and_then(|(_, p)| p.split_once('"'))
            .map(|(p, _)| p)
        {
            pods.insert(pod.to_owned());
        }
    }
    pods.len()
}

/// Per EPP set: the mean over its rounds of TTFT p50 and p90 and of the hit rate.
fn means(runs: &[ActiveActiveRun], set: EppSet) -> Option<(f64, f64, f64)> {
    let rs: Vec<&ActiveActiveRun> = runs
        .iter()
        .filter(|r| r.epps == set.routed && r.watching == set.watching)
        .collect();
    let k = rs.len() as f64;
    let p50: Option<Vec<f64>> = rs.iter().map(|r| r.point.summary.ttft_ms.p50).collect();
    let p90: Option<Vec<f64>> = rs.iter().map(|r| r.point.summary.ttft_ms.p90).collect();
    let hit: Option<Vec<f64>> = rs.iter().map(|r| r.replica_cache_hit).collect();
    let (p50, p90, hit) = (p50?, p90?, hit?);
    (k > 0.0).then(|| {
        (
            p50.iter().sum::<f64>() / k,
            p90.iter().sum::<f64>() / k,
            hit.iter().sum::<f64>() / k,
        )
    })
}

/// The verdict lines: each EPP count against the first (means over the rounds), and with
/// the controls, against one routing EPP among as many processes.
pub fn headlines(runs: &[ActiveActiveRun], cfg: &ActiveActiveCfg) -> Vec<String> {
    let Some(&base_n) = cfg.epps.first() else {
        return Vec::new();
    };
    let base = EppSet::routing(base_n);
    let mut lines = Vec::new();
    for &n in cfg.epps.iter().skip(1) {
        let set = EppSet::routing(n);
        lines.extend(verdict(runs, set, base));
        if cfg.watching_controls && n > 1 {
            let control = EppSet {
                routed: 1,
                watching: n - 1,
            };
            lines.extend(verdict(runs, set, control));
        }
    }
    lines
}

/// `set` against `base` on the goals: TTFT p90 within 5 %, hit rate within 2 points.
fn verdict(runs: &[ActiveActiveRun], set: EppSet, base: EppSet) -> Option<String> {
    let (_, base_p90, base_hit) = means(runs, base)?;
    let (_, p90, hit) = means(runs, set)?;
    let ratio = p90 / base_p90;
    let points = (hit - base_hit) * 100.0;
    let ok = ratio <= 1.05 && points.abs() <= 2.0;
    Some(format!(
        "{} vs {}: TTFT p90 {p90:.0} ms vs {base_p90:.0} ms (×{ratio:.3}, goal ≤ ×1.05), hit rate {:.1} % vs {:.1} % ({points:+.1} points, goal within ±2): **{}**.",
        set_label(set),
        set_label(base),
        hit * 100.0,
        base_hit * 100.0,
        if ok { "met" } else { "not met" }
    ))
}

/// The markdown table.
pub fn markdown(runs: &[ActiveActiveRun], cfg: &ActiveActiveCfg) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| EPPs | round | TTFT p50 (ms) | TTFT p90 (ms) | E2E p90 (ms) | prefix-cache hit (engines) | cache hit (usage) | burst herding | CV of load | decisions per EPP | KV events applied per EPP | peer entries applied per EPP | engines heard per EPP | pred. error p50 (ms) | errors | router CPU (s) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: | ---: |"
    );
    let f0 = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}"));
    for r in runs {
        let m = &r.point.summary;
        let join = |f: &dyn Fn(&EppShare) -> String| {
            r.per_epp.iter().map(f).collect::<Vec<_>>().join(" / ")
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            if r.watching == 0 {
                r.epps.to_string()
            } else {
                format!("{} + {} watching", r.epps, r.watching)
            },
            r.round + 1,
            f0(m.ttft_ms.p50),
            f0(m.ttft_ms.p90),
            f0(m.e2e_ms.p90),
            r.replica_cache_hit
                .map_or("-".into(), |h| format!("{:.1} %", h * 100.0)),
            r.point
                .cache_hit
                .map_or("-".into(), |h| format!("{:.1} %", h * 100.0)),
            r.point.herding.map_or("-".into(), |h| format!("{h:.2}")),
            r.spread_cv.map_or("-".into(), |x| format!("{x:.2}")),
            join(&|e| format!("{:.0}", e.decisions)),
            join(&|e| format!("{:.0}", e.kv_events_applied)),
            join(&|e| format!("{:.0}", e.peer_applied)),
            join(&|e| format!("{}/{}", e.engines_heard, cfg.replicas)),
            f0(r.point.pred_abs_err_p50_ms),
            m.sent - m.ok,
            r.router_cpu_s,
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::Summary;
    use crate::stats::Quantiles;
    use crate::workload::Kind;

    fn run(epps: usize, p90: f64, hit: f64) -> ActiveActiveRun {
        watched(epps, 0, p90, hit)
    }

    fn watched(epps: usize, watching: usize, p90: f64, hit: f64) -> ActiveActiveRun {
        ActiveActiveRun {
            epps,
            watching,
            round: 0,
            point: Point {
                rate: 10.0,
                summary: Summary {
                    ttft_ms: Quantiles {
                        p50: Some(p90 / 2.0),
                        p90: Some(p90),
                        ..Quantiles::default()
                    },
                    ..Summary::default()
                },
                ..Point::default()
            },
            replica_cache_hit: Some(hit),
            per_epp: (0..epps + watching)
                .map(|_| EppShare {
                    decisions: 10.0,
                    kv_events_applied: 5.0,
                    engines_heard: 2,
                    peer_applied: 0.0,
                })
                .collect(),
            replica_requests: vec![5, 5],
            spread_cv: Some(0.0),
            router_cpu_s: 1.0,
        }
    }

    fn cfg(watching_controls: bool) -> ActiveActiveCfg {
        ActiveActiveCfg {
            replicas: 2,
            stream_granularity: 16,
            gpu_blocks: None,
            workload: WorkloadArgs {
                workload: Kind::SharedPrefix,
                ..WorkloadArgs::default()
            },
            rate: 10.0,
            warmup_s: 1.0,
            duration_s: 1.0,
            drain_s: 1.0,
            epps: vec![1, 2, 3],
            repeats: 1,
            epp_args: Vec::new(),
            speculative_peers: true,
            watching_controls,
        }
    }

    #[test]
    fn headlines_hold_each_count_to_the_goal_against_one_epp() {
        let cfg = cfg(false);
        let runs = [
            run(1, 400.0, 0.80),
            run(2, 416.0, 0.79),
            run(3, 440.0, 0.80),
        ];
        let h = headlines(&runs, &cfg);
        assert_eq!(h.len(), 2);
        assert!(
            h[0].contains("×1.040") && h[0].contains("-1.0 points") && h[0].ends_with("**met**."),
            "{}",
            h[0]
        );
        assert!(
            h[1].contains("×1.100") && h[1].ends_with("**not met**."),
            "{}",
            h[1]
        );
        let md = markdown(&runs, &cfg);
        assert_eq!(md.lines().count(), 5);
        assert!(md.contains("| 10 / 10 / 10 |"), "{md}");
        assert!(md.contains("| 2/2 / 2/2 |"), "{md}");
    }

    #[test]
    fn controls_hold_each_count_against_one_routing_epp_among_as_many() {
        let cfg = cfg(true);
        assert_eq!(
            sets(&cfg),
            [
                EppSet::routing(1),
                EppSet::routing(2),
                EppSet {
                    routed: 1,
                    watching: 1
                },
                EppSet::routing(3),
                EppSet {
                    routed: 1,
                    watching: 2
                },
            ]
        );
        let runs = [
            run(1, 400.0, 0.80),
            run(2, 416.0, 0.79),
            watched(1, 1, 410.0, 0.80),
            run(3, 440.0, 0.80),
            watched(1, 2, 430.0, 0.80),
        ];
        let h = headlines(&runs, &cfg);
        assert_eq!(h.len(), 4, "{h:?}");
        assert!(
            h[1].starts_with("2 EPPs vs 1 EPP + 1 watching: TTFT p90 416 ms vs 410 ms (×1.015")
                && h[1].ends_with("**met**."),
            "{}",
            h[1]
        );
        assert!(
            h[2].starts_with("3 EPPs vs 1 EPP:") && h[2].ends_with("**not met**."),
            "{}",
            h[2]
        );
        assert!(
            h[3].starts_with("3 EPPs vs 1 EPP + 2 watching: TTFT p90 440 ms vs 430 ms (×1.023")
                && h[3].ends_with("**met**."),
            "{}",
            h[3]
        );
        let md = markdown(&runs, &cfg);
        assert!(md.contains("| 1 + 2 watching | 1 |"), "{md}");
        assert!(md.contains("| 10 / 10 / 10 |"), "{md}");
    }

    #[test]
    fn engines_heard_counts_pods_with_applied_events() {
        let text = "# TYPE inference_extension_kv_events_applied counter\n\
            inference_extension_kv_events_applied_total{model_server_pod=\"sim-0\",x=\"y\"} 12\n\
            inference_extension_kv_events_applied_total{model_server_pod=\"sim-1\"} 0\n\
            inference_extension_kv_events_applied_total{model_server_pod=\"sim-2\"} 3\n\
            inference_extension_kv_events_received_total{model_server_pod=\"sim-3\"} 3\n";
        assert_eq!(engines_heard(text), 2);
    }

    #[test]
    fn the_spread_is_the_coefficient_of_variation() {
        assert_eq!(cv(&[0, 0]), None);
        assert_eq!(cv(&[5, 5]), Some(0.0));
        assert!((cv(&[0, 10]).unwrap() - 1.0).abs() < 1e-9);
    }
}
