//! Soak: a long run at 80 % of the cluster's measured capacity through real processes
//! (Envoy with the shipped template, `epp`, one `sim` process per replica), sampling the EPP's
//! RSS and CPU and its internal sizes every 10 s.
//!
//! Capacity is measured first, closed loop: twice as many requests in flight as the replicas
//! have engine slots (`--max-num-seqs`), so every slot is always busy; the completed request
//! rate is the capacity. The soak then runs Poisson arrivals at 80 % of it.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cluster::{Cluster, ClusterCfg, FALLBACK_CONFIG, Variant};
use crate::harness::{Tools, cpu_seconds, get, prom_sum, status_kib};
use crate::loadgen::{self, LoadSpec, Mode, Report};
use crate::report::{Series, line_chart};
use crate::workload::{Kind, WorkloadArgs};

/// Knobs of a soak.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakCfg {
    /// Minutes of soak.
    pub minutes: f64,
    /// Replicas (one process each).
    pub replicas: usize,
    /// Engine slots per replica (`sim --max-num-seqs`).
    pub max_num_seqs: usize,
    /// KV blocks per replica (`sim --num-gpu-blocks`; also the EPP's prefix-index capacity
    /// per endpoint, so the index fills early and then has to evict).
    pub num_gpu_blocks: usize,
    /// Seconds of the capacity measurement.
    pub capacity_s: f64,
    /// Fraction of capacity to soak at.
    pub load_fraction: f64,
    /// Seconds between samples.
    pub sample_s: f64,
    /// Samples before this many seconds are warm-up (not judged).
    pub warmup_s: f64,
}

impl SoakCfg {
    /// The short variant for `make test` (debug binaries): 5 s of capacity, 15 s of soak,
    /// a sample a second, 1,000 KV blocks per replica so that the prefix index (as many
    /// entries per endpoint) is full before the 6 s warm-up ends and has to evict while it is
    /// judged. Too short for the RSS verdict (the decision ring still fills); the others hold.
    pub fn short() -> SoakCfg {
        SoakCfg {
            minutes: 0.25,
            capacity_s: 5.0,
            sample_s: 1.0,
            warmup_s: 6.0,
            num_gpu_blocks: 1000,
            ..SoakCfg::new(0.25)
        }
    }

    /// `make soak` (30 minutes unless `minutes` says otherwise).
    pub fn new(minutes: f64) -> SoakCfg {
        SoakCfg {
            minutes,
            replicas: 4,
            max_num_seqs: 4,
            num_gpu_blocks: 4000,
            capacity_s: if minutes < 5.0 { 10.0 } else { 30.0 },
            load_fraction: 0.8,
            sample_s: if minutes < 5.0 { 2.0 } else { 10.0 },
            warmup_s: (minutes * 60.0 / 6.0).min(300.0),
        }
    }
}

/// One sample.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the soak started.
    pub t_s: f64,
    /// EPP resident set, KiB.
    pub rss_kib: u64,
    /// EPP CPU over the last interval, % of one core.
    pub cpu_pct: f64,
    /// EPP CPU seconds so far.
    pub cpu_s: f64,
    /// `inference_extension_prefix_indexer_size`.
    pub prefix_indexer_size: f64,
    /// `inference_extension_ext_proc_active_streams`.
    pub active_streams: f64,
    /// `inference_extension_ext_proc_streams_total`.
    pub streams_total: f64,
    /// Decisions in the `/debug/pool` ring.
    pub decision_ring: usize,
    /// Endpoints in `/debug/pool`.
    pub endpoints: usize,
    /// Endpoints with requests in flight as the EPP counts them (sum of `in_flight`).
    pub in_flight: u64,
    /// `inference_extension_task_exits_total`.
    pub task_exits: f64,
    /// `inference_extension_model_server_scrape_errors_total`.
    pub scrape_errors: f64,
    /// Envoy resident set, KiB.
    pub envoy_rss_kib: u64,
}

/// The soak's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakRun {
    /// Knobs.
    pub cfg: SoakCfg,
    /// Measured capacity, req/s.
    pub capacity_rps: f64,
    /// Rate soaked at, req/s.
    pub rate: f64,
    /// Samples, every `sample_s`.
    pub samples: Vec<Sample>,
    /// Requests sent.
    pub sent: usize,
    /// Completed successfully.
    pub ok: usize,
    /// Failed, by status (0 = no response).
    pub errors: std::collections::BTreeMap<u16, usize>,
    /// A few failure messages.
    pub error_examples: Vec<String>,
    /// TTFT p50/p99 and e2e p50/p99, ms.
    pub latency_ms: [Option<f64>; 4],
    /// RSS after warm-up: reference (first sample after warm-up), min, max, last (KiB).
    pub rss_after_warmup: [u64; 4],
    /// Largest deviation from the reference after warm-up, %.
    pub rss_deviation_pct: f64,
    /// Mean EPP CPU after warm-up, % of one core.
    pub cpu_mean_pct: f64,
    /// Verdicts: (what, pass).
    pub checks: Vec<(String, bool)>,
}

fn workload(seed: u64) -> Box<dyn crate::workload::Workload> {
    WorkloadArgs {
        workload: Kind::Mixed,
        seed,
        prompt_median: 300.0,
        prompt_sigma: 0.6,
        output_median: 64.0,
        output_sigma: 0.5,
        ..WorkloadArgs::default()
    }
    .build()
}

/// Runs the soak.
pub async fn run(tools: &Tools, cfg: &SoakCfg, dir: &Path) -> anyhow::Result<SoakRun> {
    let names: Vec<String> = (0..cfg.replicas).map(|i| format!("sim-{i}")).collect();
    let cluster_cfg = ClusterCfg {
        sim_args: vec![
            "--stream-granularity".into(),
            "16".into(),
            "--max-num-seqs".into(),
            cfg.max_num_seqs.to_string(),
            "--num-gpu-blocks".into(),
            cfg.num_gpu_blocks.to_string(),
        ],
        epp_args: vec!["--debug-decisions".into(), "1000".into()],
        epp_config: FALLBACK_CONFIG.into(),
        per_try_idle_s: None,
        poll_ms: 0,
    };
    let mut c = Cluster::new(tools, &dir.join("soak"), &names, cluster_cfg)?;
    let all: Vec<usize> = (0..cfg.replicas).collect();
    c.start(&all, &all, Variant::FailClose).await?;

    // Capacity: every engine slot busy.
    let slots = cfg.replicas * cfg.max_num_seqs;
    let cap = loadgen::run(
        LoadSpec {
            url: c.url(),
            mode: Mode::Concurrency(2 * slots),
            duration_s: Some(cfg.capacity_s),
            count: None,
            drain_timeout_s: 30.0,
            seed: 7,
            progress: false,
        },
        workload(7),
    )
    .await?;
    let capacity = cap.summary.req_per_s;
    anyhow::ensure!(capacity > 0.0, "capacity run completed nothing");
    let rate = capacity * cfg.load_fraction;
    eprintln!(
        "soak: capacity {capacity:.1} req/s ({slots} slots), soaking at {rate:.1} req/s for {} min",
        cfg.minutes
    );

    let epp_pid = c.epp.as_ref().map(|p| p.pid()).unwrap_or(0);
    let envoy_pid = c.envoy.as_ref().map(|p| p.pid()).unwrap_or(0);
    let metrics_url = c.metrics_url();
    let debug_url = c.debug_url();
    let spec = LoadSpec {
        url: c.url(),
        mode: Mode::Rate(rate),
        duration_s: Some(cfg.minutes * 60.0),
        count: None,
        drain_timeout_s: 60.0,
        seed: 42,
        progress: true,
    };
    let load = tokio::spawn(async move { loadgen::run(spec, workload(42)).await });
    let start = tokio::time::Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(cfg.sample_s));
    let (mut last_cpu, mut last_t) = (cpu_seconds(epp_pid).unwrap_or(0.0), 0.0);
    while !load.is_finished() {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds(epp_pid).unwrap_or(last_cpu);
        let mut s = Sample {
            t_s: t,
            rss_kib: status_kib(epp_pid, "VmRSS").unwrap_or(0),
            cpu_s: cpu,
            cpu_pct: if t > last_t {
                (cpu - last_cpu) / (t - last_t) * 100.0
            } else {
                0.0
            },
            envoy_rss_kib: status_kib(envoy_pid, "VmRSS").unwrap_or(0),
            ..Sample::default()
        };
        (last_cpu, last_t) = (cpu, t);
        if let Ok((200, m)) = get(&metrics_url).await {
            s.prefix_indexer_size = prom_sum(&m, "inference_extension_prefix_indexer_size");
            s.active_streams = prom_sum(&m, "inference_extension_ext_proc_active_streams");
            s.streams_total = prom_sum(&m, "inference_extension_ext_proc_streams_total");
            s.task_exits = prom_sum(&m, "inference_extension_task_exits_total");
            s.scrape_errors = prom_sum(&m, "inference_extension_model_server_scrape_errors_total");
        }
        if let Ok((200, body)) = get(&debug_url).await
            && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body)
        {
            s.decision_ring = doc
                .get("decisions")
                .and_then(|d| d.as_array())
                .map_or(0, Vec::len);
            let eps = doc.get("endpoints").and_then(|e| e.as_array());
            s.endpoints = eps.map_or(0, Vec::len);
            s.in_flight = eps.map_or(0, |e| {
                e.iter()
                    .filter_map(|x| x.get("in_flight").and_then(serde_json::Value::as_u64))
                    .sum()
            });
        }
        if samples.len().is_multiple_of(6) {
            eprintln!(
                "soak: t={:.0}s rss={:.1} MiB cpu={:.1}% prefix_index={} streams={} ring={}",
                t,
                s.rss_kib as f64 / 1024.0,
                s.cpu_pct,
                s.prefix_indexer_size,
                s.active_streams,
                s.decision_ring
            );
        }
        samples.push(s);
    }
    let rep = load.await??;
    // A last sample once idle: nothing in flight must be left behind.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(judge(cfg, capacity, rate, samples, &rep))
}

fn judge(cfg: &SoakCfg, capacity: f64, rate: f64, samples: Vec<Sample>, rep: &Report) -> SoakRun {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= cfg.warmup_s).collect();
    let reference = after.first().map_or(0, |s| s.rss_kib);
    let min = after.iter().map(|s| s.rss_kib).min().unwrap_or(0);
    let max = after.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let last = after.last().map_or(0, |s| s.rss_kib);
    let dev = if reference > 0 {
        after
            .iter()
            .map(|s| (s.rss_kib as f64 - reference as f64).abs() / reference as f64 * 100.0)
            .fold(0.0, f64::max)
    } else {
        f64::NAN
    };
    // Skip the last sample: it may straddle the end of the load.
    let judged = &after[..after.len().saturating_sub(1)];
    let cpu_mean = if judged.is_empty() {
        0.0
    } else {
        judged.iter().map(|s| s.cpu_pct).sum::<f64>() / judged.len() as f64
    };
    let mut checks = Vec::new();
    let failed = rep.records.iter().filter(|r| !r.ok()).count();
    checks.push((
        format!("0 failed requests ({failed} of {})", rep.records.len()),
        failed == 0,
    ));
    checks.push((
        format!("EPP RSS within ±5 % after warm-up ({:.1} %)", dev),
        dev <= 5.0,
    ));
    // Internal sizes: bounded, not growing in the second half of the post-warm-up window.
    let half = judged.len() / 2;
    let grows = |f: &dyn Fn(&Sample) -> f64| -> (f64, f64) {
        let a = judged[..half].iter().map(|s| f(s)).fold(0.0, f64::max);
        let b = judged[half..].iter().map(|s| f(s)).fold(0.0, f64::max);
        (a, b)
    };
    let (pa, pb) = grows(&|s| s.prefix_indexer_size);
    checks.push((
        format!(
            "prefix index bounded: max {pb:.0} in the second half vs {pa:.0} in the first (≤ +5 %, cap {} per endpoint)",
            cfg.num_gpu_blocks
        ),
        pb <= pa * 1.05 + 1.0 && pb <= (cfg.replicas * cfg.num_gpu_blocks) as f64,
    ));
    let ring_max = samples.iter().map(|s| s.decision_ring).max().unwrap_or(0);
    checks.push((
        format!("decision ring bounded ({ring_max} ≤ 1000)"),
        ring_max <= 1000,
    ));
    let (sa, sb) = grows(&|s| s.active_streams);
    let cap_streams = (2.0 * rate * 10.0).max(50.0);
    checks.push((
        format!(
            "active ext_proc streams bounded (max {sa:.0} / {sb:.0} per half; ≤ {cap_streams:.0})"
        ),
        sa.max(sb) <= cap_streams,
    ));
    let exits = samples.last().map_or(0.0, |s| s.task_exits);
    checks.push((format!("no task exit ({exits})"), exits == 0.0));
    let mut errors = std::collections::BTreeMap::new();
    let mut error_examples = Vec::new();
    for r in rep.records.iter().filter(|r| !r.ok()) {
        *errors.entry(r.status).or_default() += 1;
        if error_examples.len() < 5 {
            error_examples.push(format!(
                "#{} at {:.1}s status {}: {}",
                r.i,
                r.sent_s,
                r.status,
                r.error.clone().unwrap_or_default()
            ));
        }
    }
    SoakRun {
        cfg: cfg.clone(),
        capacity_rps: capacity,
        rate,
        sent: rep.records.len(),
        ok: rep.summary.ok,
        errors,
        error_examples,
        latency_ms: [
            rep.summary.ttft_ms.p50,
            rep.summary.ttft_ms.p99,
            rep.summary.e2e_ms.p50,
            rep.summary.e2e_ms.p99,
        ],
        rss_after_warmup: [reference, min, max, last],
        rss_deviation_pct: dev,
        cpu_mean_pct: cpu_mean,
        checks,
        samples,
    }
}

/// The soak plot: EPP RSS (MiB) and CPU (% of one core) over time (minutes), stacked.
pub fn plot(run: &SoakRun) -> String {
    let rss = Series {
        label: "EPP RSS (MiB)".into(),
        points: run
            .samples
            .iter()
            .map(|s| (s.t_s / 60.0, s.rss_kib as f64 / 1024.0))
            .collect(),
    };
    let cpu = Series {
        label: "EPP CPU (% of a core)".into(),
        points: run
            .samples
            .iter()
            .skip(1)
            .map(|s| (s.t_s / 60.0, s.cpu_pct))
            .collect(),
    };
    let warm = run.cfg.warmup_s / 60.0;
    let top = line_chart(
        &format!(
            "Soak: EPP RSS at {:.1} req/s ({:.0} % of capacity), warm-up until {:.1} min",
            run.rate,
            run.cfg.load_fraction * 100.0,
            warm
        ),
        "minutes",
        "MiB",
        &[rss],
        Some(warm),
    );
    let bottom = line_chart(
        "Soak: EPP CPU",
        "minutes",
        "% of one core",
        &[cpu],
        Some(warm),
    );
    let h = 440.0;
    // Each chart's body (without its own <svg> element) in a translated group: nested <svg>
    // elements are not drawn by every renderer.
    let body = |svg: &str| -> String {
        let inner = svg.split_once('\n').map_or("", |(_, rest)| rest);
        inner
            .trim_end()
            .strip_suffix("</svg>")
            .unwrap_or(inner)
            .to_owned()
    };
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{}\" \
         viewBox=\"0 0 760 {}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <g>\n{}</g>\n<g transform=\"translate(0,{h})\">\n{}</g>\n</svg>\n",
        2.0 * h,
        2.0 * h,
        body(&top),
        body(&bottom),
    )
}

/// The RESULTS.md section.
pub fn markdown(run: &SoakRun, plot_file: &str) -> String {
    let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let mib = |k: u64| k as f64 / 1024.0;
    let c = &run.cfg;
    let first = run.samples.first();
    let last = run.samples.last();
    let mut md = format!(
        "{} `sim` processes (one replica each, `--max-num-seqs {}`, `--num-gpu-blocks {}`, \
         `--stream-granularity 16`), the `epp` (default profile + `maxNumOfEndpoints: 3`, \
         `--debug-decisions 1000`) and Envoy (shipped `envoy-plaintext.yaml`). Capacity measured \
         closed loop with every engine slot busy ({} in flight, {:.0} s): **{:.1} req/s**; soak at \
         {:.0} % = **{:.1} req/s** Poisson for **{} min** (unique prompts, median 300 tokens, \
         median 64 output tokens, streamed). EPP sampled every {:.0} s; warm-up = first {:.0} s.\n\n\
         ![soak plot]({plot_file})\n\n",
        c.replicas,
        c.max_num_seqs,
        c.num_gpu_blocks,
        2 * c.replicas * c.max_num_seqs,
        c.capacity_s,
        run.capacity_rps,
        c.load_fraction * 100.0,
        run.rate,
        c.minutes,
        c.sample_s,
        c.warmup_s,
    );
    md.push_str("| | value |\n| --- | --- |\n");
    md.push_str(&format!(
        "| requests | {} sent, {} ok, errors {} |\n",
        run.sent,
        run.ok,
        if run.errors.is_empty() {
            "none".to_owned()
        } else {
            run.errors
                .iter()
                .map(|(s, n)| format!("{s}×{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    ));
    md.push_str(&format!(
        "| latency | TTFT p50 {} ms, p99 {} ms; e2e p50 {} ms, p99 {} ms |\n",
        f(run.latency_ms[0]),
        f(run.latency_ms[1]),
        f(run.latency_ms[2]),
        f(run.latency_ms[3])
    ));
    md.push_str(&format!(
        "| EPP RSS | start {:.1} MiB; after warm-up {:.1} MiB (min {:.1}, max {:.1}), end {:.1} MiB; largest deviation {:.1} % |\n",
        first.map_or(0.0, |s| mib(s.rss_kib)),
        mib(run.rss_after_warmup[0]),
        mib(run.rss_after_warmup[1]),
        mib(run.rss_after_warmup[2]),
        mib(run.rss_after_warmup[3]),
        run.rss_deviation_pct
    ));
    md.push_str(&format!(
        "| EPP CPU | {:.1} % of one core on average after warm-up; {:.0} CPU-s in all |\n",
        run.cpu_mean_pct,
        last.map_or(0.0, |s| s.cpu_s)
    ));
    md.push_str(&format!(
        "| EPP internals (end) | prefix index {:.0} entries, active ext_proc streams {:.0}, decision ring {}, endpoints {}, in flight {}, scrape errors {:.0}, task exits {:.0} |\n",
        last.map_or(0.0, |s| s.prefix_indexer_size),
        last.map_or(0.0, |s| s.active_streams),
        last.map_or(0, |s| s.decision_ring),
        last.map_or(0, |s| s.endpoints),
        last.map_or(0, |s| s.in_flight),
        last.map_or(0.0, |s| s.scrape_errors),
        last.map_or(0.0, |s| s.task_exits),
    ));
    md.push_str(&format!(
        "| Envoy RSS | {:.1} → {:.1} MiB |\n",
        first.map_or(0.0, |s| mib(s.envoy_rss_kib)),
        last.map_or(0.0, |s| mib(s.envoy_rss_kib)),
    ));
    md.push_str("\nVerdicts:\n\n");
    for (what, pass) in &run.checks {
        md.push_str(&format!("- {} {what}\n", if *pass { "✓" } else { "✗" }));
    }
    if !run.error_examples.is_empty() {
        md.push_str("\nFailures (first few):\n\n");
        for e in &run.error_examples {
            md.push_str(&format!("- {}\n", e.replace('\n', " ")));
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::{Record, Summary};

    fn report(failed: usize) -> Report {
        let records: Vec<Record> = (0..10)
            .map(|i| Record {
                i,
                status: if i < failed { 503 } else { 200 },
                e2e_ms: Some(10.0),
                ttft_ms: Some(1.0),
                error: (i < failed).then(|| "x".to_owned()),
                ..Record::default()
            })
            .collect();
        Report {
            spec: LoadSpec {
                url: String::new(),
                mode: Mode::Rate(1.0),
                duration_s: Some(1.0),
                count: None,
                drain_timeout_s: 1.0,
                seed: 0,
                progress: false,
            },
            summary: Summary::of(&records, 1.0),
            records,
            start_unix_ms: 0.0,
        }
    }

    fn samples(rss: impl Fn(usize) -> u64) -> Vec<Sample> {
        (0..60)
            .map(|i| Sample {
                t_s: i as f64 * 10.0,
                rss_kib: rss(i),
                prefix_indexer_size: 16_000.0,
                decision_ring: 1000,
                active_streams: 10.0,
                ..Sample::default()
            })
            .collect()
    }

    #[test]
    fn flat_rss_passes_and_growth_fails() {
        let cfg = SoakCfg::new(10.0);
        let flat = judge(
            &cfg,
            30.0,
            24.0,
            samples(|i| 20_000 + (i as u64 % 3) * 100),
            &report(0),
        );
        assert!(flat.checks.iter().all(|c| c.1), "{:?}", flat.checks);
        let leak = judge(
            &cfg,
            30.0,
            24.0,
            samples(|i| 20_000 + i as u64 * 200),
            &report(0),
        );
        assert!(
            !leak
                .checks
                .iter()
                .find(|c| c.0.starts_with("EPP RSS"))
                .unwrap()
                .1
        );
        assert!(leak.rss_deviation_pct > 5.0);
        let failed = judge(&cfg, 30.0, 24.0, samples(|_| 20_000), &report(2));
        assert!(!failed.checks[0].1);
        assert_eq!(failed.errors.get(&503), Some(&2));
    }

    #[test]
    fn plot_has_both_panels() {
        let cfg = SoakCfg::new(10.0);
        let run = judge(&cfg, 30.0, 24.0, samples(|_| 20_000), &report(0));
        let svg = plot(&run);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(
            svg.matches("<svg").count(),
            1,
            "one svg element, two groups"
        );
        assert!(svg.contains("EPP RSS") && svg.contains("EPP CPU"));
    }
}
