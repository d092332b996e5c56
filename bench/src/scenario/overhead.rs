//! EPP overhead: the same fixed backend behind Envoy alone and behind Envoy + Switchyard, at
//! body sizes 1 KB, 16 KB, 220 KB and 1 MiB; one request at a time, so the latency
//! difference is what the ext_proc hop adds. CPU per request and peak RSS come from
//! `/proc/<pid>/stat` and `/proc/<pid>/status` of the `epp`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{RouterUp, start_envoy_direct, start_switchyard};
use crate::harness::{Proc, Tools};
use crate::loadgen::{self, LoadSpec, Mode, Summary};
use crate::workload::{Kind, WorkloadArgs};

/// One (path, body size) measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `envoy` or `envoy+switchyard`.
    pub path: String,
    /// Request body bytes.
    pub body_bytes: usize,
    /// Client-side summary (concurrency 1).
    pub summary: Summary,
    /// `epp` CPU per request, µs.
    pub epp_cpu_us_per_req: Option<f64>,
    /// Envoy CPU per request, µs.
    pub envoy_cpu_us_per_req: f64,
}

/// Throughput with long prompts at a fixed concurrency (the GIE #2928 shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Throughput {
    /// `envoy` or `envoy+switchyard`.
    pub path: String,
    /// Body bytes.
    pub body_bytes: usize,
    /// Requests in flight.
    pub concurrency: usize,
    /// Client-side summary.
    pub summary: Summary,
    /// `epp` CPU per request, µs.
    pub epp_cpu_us_per_req: Option<f64>,
    /// `epp` CPU use during the run, cores.
    pub epp_cores: Option<f64>,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverheadResult {
    /// Latency rows.
    pub rows: Vec<Row>,
    /// Long-prompt throughput.
    pub throughput: Vec<Throughput>,
    /// `epp` VmHWM at the end, MiB.
    pub epp_peak_rss_mib: f64,
}

/// Starts the fixed backend (this binary's `backend` subcommand) on `ports` ports.
pub fn start_backend(
    ports: usize,
    dir: &Path,
) -> anyhow::Result<(Proc, Vec<std::net::SocketAddr>)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["backend", "--ports", &ports.to_string()]);
    let (p, lines) =
        Proc::spawn_with_ready_lines("backend", &mut cmd, dir, Duration::from_secs(60))?;
    let addrs: Vec<std::net::SocketAddr> = lines
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(1)?
                .strip_prefix("http://")?
                .parse()
                .ok()
        })
        .collect();
    anyhow::ensure!(
        addrs.len() == ports,
        "backend reported {} addresses",
        addrs.len()
    );
    Ok((p, addrs))
}

fn workload(bytes: usize) -> WorkloadArgs {
    WorkloadArgs {
        workload: Kind::LongPrompt,
        prompt_bytes: bytes,
        output_tokens: 1,
        ..WorkloadArgs::default()
    }
}

async fn measure(
    up: &RouterUp,
    mode: Mode,
    count: Option<usize>,
    duration_s: Option<f64>,
    bytes: usize,
) -> anyhow::Result<(Summary, Option<f64>, f64, f64)> {
    let envoy = &up.procs[0];
    let (e0, p0) = (
        up.epp().and_then(|p| p.cpu_seconds().ok()),
        envoy.cpu_seconds()?,
    );
    let t0 = std::time::Instant::now();
    let spec = LoadSpec {
        url: up.url.clone(),
        mode,
        duration_s,
        count,
        drain_timeout_s: 30.0,
        seed: 1,
        progress: true,
    };
    let rep = loadgen::run(spec, workload(bytes).build()).await?;
    let secs = t0.elapsed().as_secs_f64();
    let n = rep.summary.sent.max(1) as f64;
    let epp = match (e0, up.epp().and_then(|p| p.cpu_seconds().ok())) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let envoy_us = (envoy.cpu_seconds()? - p0) / n * 1e6;
    Ok((
        rep.summary,
        epp.map(|c| c / n * 1e6),
        envoy_us,
        epp.map_or(0.0, |c| c / secs),
    ))
}

/// Runs the scenario.
pub async fn run(tools: &Tools, quick: bool, dir: &Path) -> anyhow::Result<OverheadResult> {
    let dir = dir.join("overhead");
    std::fs::create_dir_all(&dir)?;
    let (_backend, addrs) = start_backend(1, &dir)?;
    let sizes: [(usize, usize); 4] = if quick {
        [
            (1024, 1000),
            (16 * 1024, 1000),
            (220 * 1024, 300),
            (1024 * 1024, 100),
        ]
    } else {
        [
            (1024, 3000),
            (16 * 1024, 3000),
            (220 * 1024, 1000),
            (1024 * 1024, 300),
        ]
    };
    let mut rows = Vec::new();
    let mut throughput = Vec::new();
    let mut epp_peak_rss_mib = 0.0;
    for path in ["envoy", "envoy+switchyard"] {
        let sub = dir.join(path.replace('+', "-"));
        std::fs::create_dir_all(&sub)?;
        let up = if path == "envoy" {
            start_envoy_direct(tools, "LEAST_REQUEST", &addrs, &sub).await?
        } else {
            start_switchyard(tools, None, &addrs, &sub, &[]).await?
        };
        for &(bytes, count) in &sizes {
            eprintln!("overhead: {path}, {bytes}-byte bodies, {count} requests one at a time");
            // Warm connections and caches first.
            measure(&up, Mode::Concurrency(1), Some(50), None, bytes).await?;
            let (summary, epp, envoy, _) =
                measure(&up, Mode::Concurrency(1), Some(count), None, bytes).await?;
            rows.push(Row {
                path: path.into(),
                body_bytes: bytes,
                summary,
                epp_cpu_us_per_req: epp,
                envoy_cpu_us_per_req: envoy,
            });
        }
        let (bytes, conc) = (220 * 1024, 16);
        eprintln!("overhead: {path}, {bytes}-byte bodies at concurrency {conc}");
        let secs = if quick { 5.0 } else { 15.0 };
        let (summary, epp, _, cores) =
            measure(&up, Mode::Concurrency(conc), None, Some(secs), bytes).await?;
        throughput.push(Throughput {
            path: path.into(),
            body_bytes: bytes,
            concurrency: conc,
            summary,
            epp_cpu_us_per_req: epp,
            epp_cores: up.epp().map(|_| cores),
        });
        if let Some(epp) = up.epp() {
            epp_peak_rss_mib = epp.peak_rss_kib()? as f64 / 1024.0;
        }
    }
    Ok(OverheadResult {
        rows,
        throughput,
        epp_peak_rss_mib,
    })
}

fn size_label(b: usize) -> String {
    if b >= 1024 * 1024 {
        format!("{} MiB", b / (1024 * 1024))
    } else {
        format!("{} KB", b / 1024)
    }
}

/// Added latency per size (p50, p99 of e2e; Switchyard minus direct) and EPP CPU per request.
pub fn added(res: &OverheadResult) -> Vec<(usize, f64, f64, Option<f64>)> {
    let mut out = Vec::new();
    for d in res.rows.iter().filter(|r| r.path == "envoy") {
        if let Some(s) = res
            .rows
            .iter()
            .find(|r| r.path != "envoy" && r.body_bytes == d.body_bytes)
        {
            let p = |r: &Row, f: fn(&crate::stats::Quantiles) -> Option<f64>| {
                f(&r.summary.e2e_ms).unwrap_or(f64::NAN)
            };
            out.push((
                d.body_bytes,
                p(s, |q| q.p50) - p(d, |q| q.p50),
                p(s, |q| q.p99) - p(d, |q| q.p99),
                s.epp_cpu_us_per_req,
            ));
        }
    }
    out
}

/// The results section.
pub fn markdown(res: &OverheadResult) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Fixed backend (`scenario backend`: reads the body, answers a 1-token SSE completion at once), \
         Envoy 1.40 (`--concurrency 2`) with `bench/envoy/envoy-direct.yaml` (no ext_proc) vs the \
         shipped `gateway-configs/envoy/envoy-plaintext.yaml` + `epp` (default profile, h2c, \
         FULL_DUPLEX_STREAMED). Streaming completions, one request at a time, after 50 warm-up \
         requests; latency is client-side end to end.\n"
    );
    let _ = writeln!(
        s,
        "| body | requests | Envoy p50 (ms) | Envoy p99 | + Switchyard p50 (ms) | + Switchyard p99 | **added p50 (ms)** | **added p99 (ms)** | epp CPU / request (µs) | Envoy CPU / request, direct → with EPP (µs) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (bytes, a50, a99, cpu) in added(res) {
        let d = res
            .rows
            .iter()
            .find(|r| r.path == "envoy" && r.body_bytes == bytes);
        let w = res
            .rows
            .iter()
            .find(|r| r.path != "envoy" && r.body_bytes == bytes);
        if let (Some(d), Some(w)) = (d, w) {
            let q = |r: &Row| {
                (
                    r.summary.e2e_ms.p50.unwrap_or(f64::NAN),
                    r.summary.e2e_ms.p99.unwrap_or(f64::NAN),
                )
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | **{a50:.2}** | **{a99:.2}** | {} | {:.0} → {:.0} |",
                size_label(bytes),
                w.summary.ok,
                q(d).0,
                q(d).1,
                q(w).0,
                q(w).1,
                cpu.map_or("-".into(), |c| format!("{c:.0}")),
                d.envoy_cpu_us_per_req,
                w.envoy_cpu_us_per_req,
            );
        }
    }
    let _ = writeln!(
        s,
        "\n`epp` peak RSS (VmHWM) over the whole scenario: {:.1} MiB.\n",
        res.epp_peak_rss_mib
    );
    let _ = writeln!(
        s,
        "Long prompts at a fixed concurrency (the shape where the reference EPP plateaus near 130 req/s, GIE #2928; \
         here the backend is near-free, so this is the gateway path's own ceiling on this 2-core machine, \
         load generator included):\n\n\
         | path | body | concurrency | req/s | TTFT p50 (ms) | TTFT p99 (ms) | errors | epp CPU / request (µs) | epp cores |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for t in &res.throughput {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} |",
            t.path,
            size_label(t.body_bytes),
            t.concurrency,
            t.summary.req_per_s,
            t.summary.ttft_ms.p50.unwrap_or(f64::NAN),
            t.summary.ttft_ms.p99.unwrap_or(f64::NAN),
            t.summary.sent - t.summary.ok,
            t.epp_cpu_us_per_req
                .map_or("-".into(), |c| format!("{c:.0}")),
            t.epp_cores.map_or("-".into(), |c| format!("{c:.2}")),
        );
    }
    s
}
