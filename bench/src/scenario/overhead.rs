//! EPP overhead: the same fixed backend behind Envoy alone and behind Envoy + Switchyard on
//! both response paths (the shipped full one and the lean one, side by side in one run), at body sizes 1 KB, 16 KB, 220 KB and 1 MiB and streamed answers of 1, 64 and
//! 512 output tokens (SSE, one event per token); one request at a time, so the latency
//! difference is what the ext_proc hop adds. Envoy's CPU and the EPP's CPU per request are
//! reported apart (`/proc/<pid>/stat` of each), with added latency p50/p99 and added TTFT.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ResponsePath, RouterUp, start_envoy_direct, start_switchyard_on};
use crate::harness::{Proc, Tools};
use crate::loadgen::{self, LoadSpec, Mode, Summary};
use crate::workload::{Kind, WorkloadArgs};

/// One (path, body size) measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `envoy`, `envoy+switchyard` (the shipped, full response path) or `envoy+switchyard-lean`.
    pub path: String,
    /// Request body bytes.
    pub body_bytes: usize,
    /// Output tokens streamed back (one SSE event each).
    #[serde(default = "one")]
    pub output_tokens: u32,
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

fn one() -> u32 {
    1
}

fn workload(bytes: usize, output_tokens: u32) -> WorkloadArgs {
    WorkloadArgs {
        workload: Kind::LongPrompt,
        prompt_bytes: bytes,
        output_tokens,
        ..WorkloadArgs::default()
    }
}

/// The paths measured, in order: the baseline first.
const PATHS: [&str; 3] = ["envoy", "envoy+switchyard", "envoy+switchyard-lean"];

async fn measure(
    up: &RouterUp,
    mode: Mode,
    count: Option<usize>,
    duration_s: Option<f64>,
    bytes: usize,
    output_tokens: u32,
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
    let rep = loadgen::run(spec, workload(bytes, output_tokens).build()).await?;
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
    for path in PATHS {
        let sub = dir.join(path.replace('+', "-"));
        std::fs::create_dir_all(&sub)?;
        let up = match path {
            "envoy" => start_envoy_direct(tools, "LEAST_REQUEST", &addrs, &sub).await?,
            "envoy+switchyard" => {
                start_switchyard_on(tools, None, &addrs, &sub, &[], ResponsePath::Full).await?
            }
            _ => start_switchyard_on(tools, None, &addrs, &sub, &[], ResponsePath::Lean).await?,
        };
        for output_tokens in [1u32, 64, 512] {
            for &(bytes, count) in &sizes {
                // Streams take about a millisecond per token: fewer of the long ones.
                let count = match (output_tokens, quick) {
                    (1, _) => count,
                    (64, false) => (count / 4).max(20),
                    (64, true) => (count / 10).max(10),
                    (_, false) => (count / 20).max(10),
                    (_, true) => (count / 50).max(5),
                };
                eprintln!(
                    "overhead: {path}, {bytes}-byte bodies, {output_tokens} output tokens, \
                     {count} requests one at a time"
                );
                // Warm connections and caches first.
                measure(
                    &up,
                    Mode::Concurrency(1),
                    Some(10),
                    None,
                    bytes,
                    output_tokens,
                )
                .await?;
                let (summary, epp, envoy, _) = measure(
                    &up,
                    Mode::Concurrency(1),
                    Some(count),
                    None,
                    bytes,
                    output_tokens,
                )
                .await?;
                rows.push(Row {
                    path: path.into(),
                    body_bytes: bytes,
                    output_tokens,
                    summary,
                    epp_cpu_us_per_req: epp,
                    envoy_cpu_us_per_req: envoy,
                });
            }
        }
        let (bytes, conc) = (220 * 1024, 16);
        eprintln!("overhead: {path}, {bytes}-byte bodies at concurrency {conc}");
        let secs = if quick { 5.0 } else { 15.0 };
        let (summary, epp, _, cores) =
            measure(&up, Mode::Concurrency(conc), None, Some(secs), bytes, 1).await?;
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

/// Added latency per size (p50, p99 of e2e; the shipped Switchyard path minus direct,
/// one-token answers) and EPP CPU per request.
pub fn added(res: &OverheadResult) -> Vec<(usize, f64, f64, Option<f64>)> {
    let mut out = Vec::new();
    for d in res
        .rows
        .iter()
        .filter(|r| r.path == "envoy" && r.output_tokens == 1)
    {
        if let Some(s) = res.rows.iter().find(|r| {
            r.path == "envoy+switchyard" && r.body_bytes == d.body_bytes && r.output_tokens == 1
        }) {
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
        "Fixed backend (`scenario backend`: reads the body, answers an SSE completion of \
         `max_tokens` events, one per token 1 ms apart), Envoy 1.40 (`--concurrency 2`) with \
         `bench/envoy/envoy-direct.yaml` (no ext_proc) vs the shipped \
         `gateway-configs/envoy/envoy-plaintext.yaml` + `epp` (default profile, h2c; full \
         response path, and the lean one with `response_body_mode: NONE`). One request at a \
         time, after 10 warm-up requests; latency is client-side end to end. The first table is \
         one-token answers on the shipped path.\n"
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
            .find(|r| r.path == "envoy" && r.body_bytes == bytes && r.output_tokens == 1);
        let w = res.rows.iter().find(|r| {
            r.path == "envoy+switchyard" && r.body_bytes == bytes && r.output_tokens == 1
        });
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
    let _ = writeln!(s, "\n{}", split_table(res));
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

/// CPU per streamed request split into Envoy's and the EPP's, for every path, size and answer
/// length: Envoy alone, then Envoy + EPP on the lean (shipped) and the full (before) response
/// paths, with latency and TTFT added to Envoy alone.
pub fn split_table(res: &OverheadResult) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "CPU per request, Envoy and EPP apart (Envoy alone vs Envoy + EPP, same backend; \
         `full` = the shipped response path, every response chunk through the EPP; `lean` = \
         `response_body_mode: NONE`, the body past the EPP):\n\n\
         | body | output tokens | path | Envoy CPU / req (µs) | epp CPU / req (µs) | total (µs) | \
         added p50 (ms) | added p99 (ms) | TTFT added p50 (ms) |\n\
         | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for d in res.rows.iter().filter(|r| r.path == "envoy") {
        for r in res
            .rows
            .iter()
            .filter(|r| r.body_bytes == d.body_bytes && r.output_tokens == d.output_tokens)
        {
            let q = |r: &Row| {
                (
                    r.summary.e2e_ms.p50.unwrap_or(f64::NAN),
                    r.summary.e2e_ms.p99.unwrap_or(f64::NAN),
                    r.summary.ttft_ms.p50.unwrap_or(f64::NAN),
                )
            };
            let (a, b) = (q(d), q(r));
            let label = match r.path.as_str() {
                "envoy" => "Envoy alone",
                "envoy+switchyard" => "+ epp, full",
                _ => "+ epp, lean",
            };
            let epp = r.epp_cpu_us_per_req.unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| {} | {} | {label} | {:.0} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
                size_label(r.body_bytes),
                r.output_tokens,
                r.envoy_cpu_us_per_req,
                r.epp_cpu_us_per_req
                    .map_or("-".into(), |c| format!("{c:.0}")),
                r.envoy_cpu_us_per_req + epp,
                b.0 - a.0,
                b.1 - a.1,
                b.2 - a.2,
            );
        }
    }
    s
}
