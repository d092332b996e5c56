//! Scale: one `epp` with 100 or 1,000 endpoints (the fixed backend listening on as many ports,
//! each serving a vLLM-sized `/metrics` whose process counter moves with every scrape, as a
//! real engine's does), at the default 50 ms scrape interval: idle CPU, memory,
//! and the scheduler's decision time under light traffic (from the EPP's own histogram
//! `inference_extension_scheduler_e2e_duration_seconds`).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::overhead::start_backend;
use super::start_switchyard;
use crate::harness::{Tools, get, prom_buckets, prom_sum};
use crate::loadgen::{self, LoadSpec, Mode, Summary};
use crate::stats::histogram_quantile;
use crate::workload::{Kind, WorkloadArgs};

/// Everything measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleResult {
    /// Endpoints in the pool.
    pub endpoints: usize,
    /// `inference_pool_ready_pods` as the EPP reports it.
    pub ready_pods: f64,
    /// Seconds of the idle measurement.
    pub idle_window_s: f64,
    /// `epp` CPU while idle, cores (fraction of one core).
    pub epp_idle_cores: f64,
    /// Backend CPU while idle (what answering the scrapes costs), cores.
    pub backend_idle_cores: f64,
    /// `/metrics` requests the backend answered per second during the idle window.
    pub scrapes_per_s: f64,
    /// `epp` RSS after the idle window, MiB.
    pub epp_rss_idle_mib: f64,
    /// `epp` VmHWM at the end, MiB.
    pub epp_peak_rss_mib: f64,
    /// Client-side summary of the decision-time traffic.
    pub traffic: Summary,
    /// Scheduler decision time, µs: mean (exact), p50 and p99 (interpolated in the histogram's
    /// ×2 buckets, so approximate).
    pub decision_mean_us: Option<f64>,
    /// See `decision_mean_us`.
    pub decision_p50_us: Option<f64>,
    /// See `decision_mean_us`.
    pub decision_p99_us: Option<f64>,
    /// Body end-of-stream to the EPP's answer, µs (mean).
    pub request_path_mean_us: Option<f64>,
    /// `epp` CPU per request during the traffic, µs (includes the scraping going on meanwhile).
    pub epp_cpu_us_per_req_under_load: f64,
}

/// Runs the scenario.
pub async fn run(
    tools: &Tools,
    endpoints: usize,
    quick: bool,
    dir: &Path,
) -> anyhow::Result<ScaleResult> {
    let dir = dir.join("scale");
    std::fs::create_dir_all(&dir)?;
    eprintln!("scale: {endpoints} endpoints");
    let (backend, addrs) = start_backend(endpoints, &dir)?;
    let up = start_switchyard(tools, None, &addrs, &dir, &[]).await?;
    let epp = up.epp().ok_or_else(|| anyhow::anyhow!("no epp"))?;
    let metrics_url = up.epp_metrics.clone().unwrap_or_default();
    // Let the scrapers reach their steady state (every endpoint scraped, connections open).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = if quick { 5.0 } else { 15.0 };
    eprintln!("scale: idle for {window} s");
    let scrapes_url = format!("http://{}/admin/scrapes", addrs[0]);
    let scrapes = || async {
        get(&scrapes_url)
            .await
            .ok()
            .and_then(|(_, b)| b.trim().parse::<f64>().ok())
    };
    let (e0, b0, s0) = (epp.cpu_seconds()?, backend.cpu_seconds()?, scrapes().await);
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let secs = t0.elapsed().as_secs_f64();
    let (e1, b1, s1) = (epp.cpu_seconds()?, backend.cpu_seconds()?, scrapes().await);
    let rss_idle = epp.rss_kib()? as f64 / 1024.0;
    // The pool gauges refresh every 5 s by default; the idle window covered at least one.
    let (_, m) = get(&metrics_url).await?;
    let ready_pods = prom_sum(&m, "inference_pool_ready_pods");

    let count = if quick { 500 } else { 2000 };
    eprintln!("scale: {count} requests at concurrency 4 for the decision time");
    let c0 = epp.cpu_seconds()?;
    let spec = LoadSpec {
        url: up.url.clone(),
        mode: Mode::Concurrency(4),
        duration_s: None,
        count: Some(count),
        drain_timeout_s: 30.0,
        seed: 1,
        progress: true,
    };
    let w = WorkloadArgs {
        workload: Kind::LongPrompt,
        prompt_bytes: 4096,
        output_tokens: 1,
        ..WorkloadArgs::default()
    };
    let rep = loadgen::run(spec, w.build()).await?;
    let cpu_per_req = (epp.cpu_seconds()? - c0) / rep.summary.sent.max(1) as f64 * 1e6;
    let (_, m) = get(&metrics_url).await?;
    let name = "inference_extension_scheduler_e2e_duration_seconds";
    let buckets = prom_buckets(&m, name);
    let (sum, n) = (
        prom_sum(&m, &format!("{name}_sum")),
        prom_sum(&m, &format!("{name}_count")),
    );
    let rp = "inference_extension_request_path_overhead_seconds";
    let (rsum, rn) = (
        prom_sum(&m, &format!("{rp}_sum")),
        prom_sum(&m, &format!("{rp}_count")),
    );
    Ok(ScaleResult {
        endpoints,
        ready_pods,
        idle_window_s: secs,
        epp_idle_cores: (e1 - e0) / secs,
        backend_idle_cores: (b1 - b0) / secs,
        scrapes_per_s: match (s0, s1) {
            (Some(a), Some(b)) => (b - a) / secs,
            _ => f64::NAN,
        },
        epp_rss_idle_mib: rss_idle,
        epp_peak_rss_mib: epp.peak_rss_kib()? as f64 / 1024.0,
        traffic: rep.summary,
        decision_mean_us: (n > 0.0).then(|| sum / n * 1e6),
        decision_p50_us: histogram_quantile(&buckets, 0.5).map(|s| s * 1e6),
        decision_p99_us: histogram_quantile(&buckets, 0.99).map(|s| s * 1e6),
        request_path_mean_us: (rn > 0.0).then(|| rsum / rn * 1e6),
        epp_cpu_us_per_req_under_load: cpu_per_req,
    })
}

/// The results section.
pub fn markdown(r: &ScaleResult) -> String {
    let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}"));
    format!(
        "{} endpoints: the fixed backend on {} loopback ports, each serving a constant vLLM `/metrics`; \
         `epp` with the default profile and the default `--refresh-metrics-interval 50ms` \
         (≈ {:.0} scrapes/s if every interval were met). Envoy lists the same {} endpoints.\n\n\
         | measure | value |\n| --- | ---: |\n\
         | pods the EPP reports ready (`inference_pool_ready_pods`) | {:.0} |\n\
         | `/metrics` scrapes answered per second (idle window) | {:.0} |\n\
         | **epp idle CPU** (over {:.0} s, no traffic) | **{:.3} cores** |\n\
         | backend CPU answering the scrapes (same window) | {:.3} cores |\n\
         | epp RSS idle | {:.1} MiB |\n\
         | epp peak RSS (VmHWM) | {:.1} MiB |\n\
         | decision time mean (scheduler e2e histogram, exact mean) | {} µs |\n\
         | decision time p50 / p99 (interpolated in the histogram's buckets: ×2 from 10 µs, and the reference's edges since 2026-12-04) | {} / {} µs |\n\
         | body end-of-stream → EPP answer, mean | {} µs |\n\
         | epp CPU per request under traffic (scraping included) | {:.0} µs |\n\
         | traffic | {} requests, 4 KB bodies, concurrency 4, {:.0} req/s, {} errors |\n",
        r.endpoints,
        r.endpoints,
        r.endpoints as f64 / 0.05,
        r.endpoints,
        r.ready_pods,
        r.scrapes_per_s,
        r.idle_window_s,
        r.epp_idle_cores,
        r.backend_idle_cores,
        r.epp_rss_idle_mib,
        r.epp_peak_rss_mib,
        f(r.decision_mean_us),
        f(r.decision_p50_us),
        f(r.decision_p99_us),
        f(r.request_path_mean_us),
        r.epp_cpu_us_per_req_under_load,
        r.traffic.sent,
        r.traffic.req_per_s,
        r.traffic.sent - r.traffic.ok,
    )
}

/// Idle cost at every pool size measured (the goals: under 0.01 core at 100
/// endpoints, under 0.1 at 1,000), then each size's full table.
pub fn markdown_all(runs: &[ScaleResult]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "| endpoints | scrapes answered / s (idle) | **epp idle CPU (cores)** | goal | CPU per scrape (µs) |\n\
         | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in runs {
        let goal = if r.endpoints <= 100 {
            "< 0.01"
        } else {
            "< 0.1"
        };
        let per_scrape = if r.scrapes_per_s > 0.0 {
            format!("{:.1}", r.epp_idle_cores / r.scrapes_per_s * 1e6)
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | **{:.4}** | {goal} | {per_scrape} |",
            r.endpoints, r.scrapes_per_s, r.epp_idle_cores
        );
    }
    s.push_str(
        "\nThe scrape rate is below endpoints / 50 ms when the values do not change: each \
         endpoint's interval backs off to at most 150 ms while its values stay the same, and \
         to `--idle-scrape-interval` (1 s) while its engine is also quiet, nothing running or \
         waiting, as here; routing to a quiet engine wakes its scraper \
         (`endpoint-picker/src/scrape/scraper.rs`, `IdleBackoff`).\n",
    );
    for r in runs {
        s.push('\n');
        s.push_str(&markdown(r));
    }
    s
}
