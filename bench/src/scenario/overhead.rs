//! EPP overhead: the same fixed backend behind Envoy alone and behind Envoy + Switchyard on
//! each response path (the shipped full one, the lean, minimal and observed ones, side by side
//! in one run), at body sizes 1 KB, 16 KB, 220 KB and 1 MiB and streamed answers of 1, 64 and
//! 512 output tokens (SSE, one event per token); one request at a time, so the latency
//! difference is what the ext_proc hop adds. Envoy's CPU and the EPP's CPU per request are
//! reported apart (`/proc/<pid>/stat` of each), with added latency p50/p99 and added TTFT.
//!
//! `--variants` measures how the gateway reaches the EPP instead, at the sizes of the EPP CPU
//! and latency goals: over TCP or the EPP's Unix socket, the request body streamed (as shipped)
//! or buffered ([`VARIANT_PATHS`]).
//!
//! `--bbr` ([`run_bbr`]) measures the body-based router's hop instead: the shipped Envoy + EPP
//! against the same template with `bbr` in front ([`bbr_gateway`]), both up at once and
//! measured in turn per body size, with `bbr`'s own CPU and Envoy's extra per request.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use anyhow::Context;
use serde_json::{Value, json};

use super::{
    PlaintextEnvoy, ResponsePath, RouterUp, plaintext_envoy, start_envoy, start_envoy_direct,
    start_epp, start_switchyard_on,
};
use crate::harness::{self, Proc, Tools, free_port, wait_http};
use crate::loadgen::{self, LoadSpec, Mode, Summary};
use crate::workload::{Kind, WorkloadArgs};
use testkit::envoy::RequestBody;

/// One (path, body size) measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `envoy`, `envoy+switchyard` (the shipped, full response path), `envoy+switchyard-lean`,
    /// `envoy+switchyard-minimal` or `envoy+switchyard-observed`.
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
    /// `bbr` CPU per request, µs (paths with the body-based router only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbr_cpu_us_per_req: Option<f64>,
    /// Scrapes of the backend's `/metrics` per request during the measurement (the EPP's, as
    /// the backend counted them): while a request is in flight the endpoint is scraped at the
    /// refresh interval, so a long stream carries several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrapes_per_req: Option<f64>,
    /// The EPP's CPU at rest ([`OverheadResult::epp_rest_us_per_s`], Envoy attached, no
    /// traffic) times the measurement's length, per request, µs: what the process spends by
    /// the clock (health checks, timers, the pool file) whatever the requests do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epp_clock_us_per_req: Option<f64>,
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
    /// `bbr` CPU per request, µs (paths with the body-based router only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbr_cpu_us_per_req: Option<f64>,
    /// `bbr` CPU use during the run, cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbr_cores: Option<f64>,
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
    /// Per EPP path: its CPU at rest, µs per second (Envoy attached and health-checking, no
    /// traffic, the endpoint quiet).
    #[serde(default)]
    pub epp_rest_us_per_s: std::collections::BTreeMap<String, f64>,
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
const PATHS: [&str; 5] = [
    "envoy",
    "envoy+switchyard",
    "envoy+switchyard-lean",
    "envoy+switchyard-minimal",
    "envoy+switchyard-observed",
];

/// The paths of `--variants`: each EPP response path over TCP (as shipped), over the EPP's
/// Unix socket, and with the request body buffered instead of streamed.
pub const VARIANT_PATHS: [&str; 8] = [
    "envoy",
    "envoy+switchyard",
    "envoy+switchyard-uds",
    "envoy+switchyard-buffered",
    "envoy+switchyard-lean",
    "envoy+switchyard-lean-uds",
    "envoy+switchyard-lean-buffered",
    "envoy+switchyard-minimal",
];

/// `epp` + the shipped plaintext template on `response_path`, switched to `request_body`,
/// with its `epp` cluster on the EPP's Unix socket when `uds` (`epp --grpc-uds-path`,
/// [`testkit::envoy::with_epp_pipe`]).
pub async fn start_switchyard_variant(
    tools: &Tools,
    backends: &[std::net::SocketAddr],
    dir: &Path,
    response_path: ResponsePath,
    request_body: RequestBody,
    uds: bool,
    extra_args: &[&str],
) -> anyhow::Result<RouterUp> {
    let socket = dir.join("epp.sock");
    let socket_arg = socket.to_string_lossy().into_owned();
    let mut args: Vec<&str> = if uds {
        vec!["--grpc-uds-path", socket_arg.as_str()]
    } else {
        Vec::new()
    };
    args.extend_from_slice(extra_args);
    let epp = start_epp(tools, None, harness::pool_yaml(backends), dir, &args).await?;
    let PlaintextEnvoy {
        config: rendered,
        admin,
        listen,
    } = plaintext_envoy(tools, response_path, epp.grpc, backends)?;
    let mut envoy_cfg = testkit::envoy::with_request_body(&rendered, request_body)?;
    if uds {
        envoy_cfg = testkit::envoy::with_epp_pipe(&envoy_cfg, &socket)?;
    }
    let envoy = start_envoy(tools, envoy_cfg, admin, listen, dir, true).await?;
    let up = RouterUp {
        url: format!("http://127.0.0.1:{listen}"),
        procs: vec![envoy, epp.proc],
        epp: Some(1),
        epp_metrics: Some(epp.metrics_url),
    };
    super::wait_serving(&up.url, Duration::from_secs(60))
        .await
        .with_context(|| format!("Envoy + epp ({dir:?}) never served a request"))?;
    Ok(up)
}

/// The EPP's CPU at rest, µs per second: Envoy attached and health-checking, no traffic,
/// after the endpoint's scrapes have backed off (`window` long).
async fn epp_at_rest(up: &RouterUp, window: Duration) -> anyhow::Result<Option<f64>> {
    let Some(epp) = up.epp() else {
        return Ok(None);
    };
    // The scraper backs off to its quiet interval within about two seconds of the last request.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = harness::thread_cpu_ns(epp.pid())?;
    tokio::time::sleep(window).await;
    let after = harness::thread_cpu_ns(epp.pid())?;
    Ok(Some(
        harness::thread_cpu_delta(&before, &after) / window.as_secs_f64() * 1e6,
    ))
}

/// Scrapes the fixed backend has answered so far (its `/admin/scrapes` counter).
async fn scrapes(backend: std::net::SocketAddr) -> Option<f64> {
    let (status, body) = harness::get(&format!("http://{backend}/admin/scrapes"))
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    body.trim().parse().ok()
}

/// CPU of a gateway's processes over one measurement.
struct Cpu {
    /// Envoy, µs per request.
    envoy_us: f64,
    /// `epp`, µs per request.
    epp_us: Option<f64>,
    /// `epp`, cores over the run.
    epp_cores: Option<f64>,
    /// `bbr`, µs per request.
    bbr_us: Option<f64>,
    /// `bbr`, cores over the run.
    bbr_cores: Option<f64>,
    /// Backend scrapes per request.
    scrapes_per_req: Option<f64>,
    /// Seconds per request.
    secs_per_req: f64,
}

/// The body-based router among a gateway's processes.
fn bbr_proc(up: &RouterUp) -> Option<&Proc> {
    up.procs.iter().find(|p| p.name == "bbr")
}

async fn measure(
    up: &RouterUp,
    backend: Option<std::net::SocketAddr>,
    mode: Mode,
    count: Option<usize>,
    duration_s: Option<f64>,
    bytes: usize,
    output_tokens: u32,
) -> anyhow::Result<(Summary, Cpu)> {
    let envoy = &up.procs[0];
    // Per-thread nanoseconds rather than the 10 ms ticks of `/proc/<pid>/stat`: a short run of
    // long streams uses a few ticks of EPP CPU in all.
    let cpu = |p: Option<&Proc>| p.and_then(|p| harness::thread_cpu_ns(p.pid()).ok());
    let (e0, b0, p0) = (cpu(up.epp()), cpu(bbr_proc(up)), cpu(Some(envoy)));
    let s0 = match backend {
        Some(b) => scrapes(b).await,
        None => None,
    };
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
    let s1 = match backend {
        Some(b) => scrapes(b).await,
        None => None,
    };
    let used = |before: Option<std::collections::HashMap<u32, u64>>, p: Option<&Proc>| {
        before
            .zip(cpu(p))
            .map(|(a, b)| harness::thread_cpu_delta(&a, &b))
    };
    let epp = used(e0, up.epp());
    let bbr = used(b0, bbr_proc(up));
    let envoy_us = used(p0, Some(envoy)).context("Envoy's CPU")? / n * 1e6;
    Ok((
        rep.summary,
        Cpu {
            envoy_us,
            epp_us: epp.map(|c| c / n * 1e6),
            epp_cores: epp.map(|c| c / secs),
            bbr_us: bbr.map(|c| c / n * 1e6),
            bbr_cores: bbr.map(|c| c / secs),
            scrapes_per_req: s0.zip(s1).map(|(a, b)| (b - a) / n),
            secs_per_req: secs / n,
        },
    ))
}

/// The body sizes measured and the requests sent at each: 1 KB, 16 KB, 220 KB, 1 MiB.
fn body_sizes(quick: bool) -> [(usize, usize); 4] {
    if quick {
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
    }
}

/// The body sizes of `--variants` and the requests sent at each: 1 KB (the latency goal), 220 KB
/// and 400 KB (a 100,000-token prompt, the EPP CPU goal of 1 ms).
fn variant_body_sizes(quick: bool) -> [(usize, usize); 3] {
    let n = if quick { 1 } else { 3 };
    [
        (1024, 1000 * n),
        (220 * 1024, 300 * n),
        (400 * 1024, 200 * n),
    ]
}

/// Runs the scenario; with `variants`, the EPP paths over TCP and over the EPP's Unix socket,
/// with the request body streamed and buffered ([`VARIANT_PATHS`]).
pub async fn run(
    tools: &Tools,
    quick: bool,
    variants: bool,
    dir: &Path,
) -> anyhow::Result<OverheadResult> {
    let dir = dir.join(if variants {
        "overhead-variants"
    } else {
        "overhead"
    });
    std::fs::create_dir_all(&dir)?;
    let (_backend, addrs) = start_backend(1, &dir)?;
    let backend = addrs.first().copied();
    let sizes: Vec<(usize, usize)> = if variants {
        variant_body_sizes(quick).to_vec()
    } else {
        body_sizes(quick).to_vec()
    };
    let mut rows = Vec::new();
    let mut throughput = Vec::new();
    let mut epp_peak_rss_mib = 0.0;
    let mut epp_rest_us_per_s = std::collections::BTreeMap::new();
    let paths: &[&str] = if variants { &VARIANT_PATHS } else { &PATHS };
    for &path in paths {
        let sub = dir.join(path.replace('+', "-"));
        std::fs::create_dir_all(&sub)?;
        let response_path = if path.contains("-lean") {
            ResponsePath::Lean
        } else if path.contains("-minimal") {
            ResponsePath::Minimal
        } else if path.contains("-observed") {
            ResponsePath::Observed
        } else {
            ResponsePath::Full
        };
        let up = match path {
            "envoy" => start_envoy_direct(tools, "LEAST_REQUEST", &addrs, &sub).await?,
            _ if path.ends_with("-uds") => {
                start_switchyard_variant(
                    tools,
                    &addrs,
                    &sub,
                    response_path,
                    RequestBody::Streamed,
                    true,
                    &[],
                )
                .await?
            }
            _ if path.ends_with("-buffered") => {
                start_switchyard_variant(
                    tools,
                    &addrs,
                    &sub,
                    response_path,
                    RequestBody::Buffered,
                    false,
                    &[],
                )
                .await?
            }
            _ => {
                let flags: &[&str] = if response_path == ResponsePath::Observed {
                    &["--response-observer"]
                } else {
                    &[]
                };
                start_switchyard_on(tools, None, &addrs, &sub, flags, response_path).await?
            }
        };
        let rest_window = Duration::from_secs(if quick { 3 } else { 6 });
        if let Some(rest) = epp_at_rest(&up, rest_window).await? {
            eprintln!("overhead: {path}, epp at rest: {rest:.0} µs/s");
            epp_rest_us_per_s.insert(path.to_owned(), rest);
        }
        let rest = epp_rest_us_per_s.get(path).copied();
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
                    None,
                    Mode::Concurrency(1),
                    Some(10),
                    None,
                    bytes,
                    output_tokens,
                )
                .await?;
                let (summary, cpu) = measure(
                    &up,
                    backend,
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
                    epp_cpu_us_per_req: cpu.epp_us,
                    envoy_cpu_us_per_req: cpu.envoy_us,
                    bbr_cpu_us_per_req: None,
                    scrapes_per_req: cpu.scrapes_per_req.filter(|_| up.epp().is_some()),
                    epp_clock_us_per_req: rest.map(|r| r * cpu.secs_per_req),
                });
            }
        }
        let (bytes, conc) = (220 * 1024, 16);
        eprintln!("overhead: {path}, {bytes}-byte bodies at concurrency {conc}");
        let secs = if quick { 5.0 } else { 15.0 };
        let (summary, cpu) = measure(
            &up,
            None,
            Mode::Concurrency(conc),
            None,
            Some(secs),
            bytes,
            1,
        )
        .await?;
        throughput.push(Throughput {
            path: path.into(),
            body_bytes: bytes,
            concurrency: conc,
            summary,
            epp_cpu_us_per_req: cpu.epp_us,
            epp_cores: cpu.epp_cores,
            bbr_cpu_us_per_req: None,
            bbr_cores: None,
        });
        if let Some(epp) = up.epp() {
            epp_peak_rss_mib = epp.peak_rss_kib()? as f64 / 1024.0;
        }
    }
    Ok(OverheadResult {
        rows,
        throughput,
        epp_peak_rss_mib,
        epp_rest_us_per_s,
    })
}

/// The paths of `--bbr`, in order: the baseline first.
pub const BBR_PATHS: [&str; 2] = ["envoy+switchyard", "envoy+bbr+switchyard"];

/// Everything `--bbr` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BbrResult {
    /// Latency rows, one-token answers.
    pub rows: Vec<Row>,
    /// Long-prompt throughput.
    pub throughput: Vec<Throughput>,
    /// `bbr` VmHWM at the end, MiB.
    pub bbr_peak_rss_mib: f64,
}

/// The ext_proc filter of the body-based router, as the demo (`scripts/demo-envoy.yaml`) and
/// the conformance suite (`conformance/envoy/bbr.yaml`) run it: the request only, its body
/// streamed.
const BBR_FILTER: &str = r#"{
  "name": "bbr",
  "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
    "grpc_service": {"envoy_grpc": {"cluster_name": "bbr"}, "timeout": "10s"},
    "failure_mode_allow": false,
    "message_timeout": "1000s",
    "allow_mode_override": false,
    "processing_mode": {
      "request_header_mode": "SEND", "response_header_mode": "SKIP",
      "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "NONE",
      "request_trailer_mode": "SEND", "response_trailer_mode": "SKIP"
    }
  }
}"#;

const EXT_PROC_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor";
const EXT_PROC_PER_ROUTE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute";

fn at<'a>(v: &'a mut Value, pointer: &str) -> anyhow::Result<&'a mut Value> {
    v.pointer_mut(pointer)
        .with_context(|| format!("the Envoy template has no {pointer}"))
}

fn array<'a>(v: &'a mut Value, pointer: &str) -> anyhow::Result<&'a mut Vec<Value>> {
    at(v, pointer)?
        .as_array_mut()
        .with_context(|| format!("{pointer} is not a list"))
}

/// The shipped single-pool template (rendered) with the body-based router in front, the
/// routing machinery of `scripts/demo-envoy.yaml` and `conformance/envoy/bbr.yaml`, and
/// nothing else changed: `bbr`'s ext_proc filter first after the header strip (which also
/// drops a client's model headers), the pool's route matching `X-Gateway-Base-Model-Name` =
/// `model` with an `ExtProcPerRoute` override naming the EPP's cluster, a last route answering
/// 404 with the EPP disabled, and a `bbr` cluster that copies the EPP's (h2c, health check,
/// breakers) on `bbr_port`. Written as JSON, which Envoy reads as YAML.
pub fn bbr_gateway(rendered: &str, model: &str, bbr_port: u16) -> anyhow::Result<String> {
    let mut cfg: Value =
        yaml_serde::from_str(rendered).context("parsing the rendered Envoy template")?;
    let hcm = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config";
    let filters = array(&mut cfg, &format!("{hcm}/http_filters"))?;
    let epp_at = filters
        .iter()
        .position(|f| f.pointer("/typed_config/@type") == Some(&json!(EXT_PROC_TYPE)))
        .context("the Envoy template has no ext_proc filter")?;
    let epp_filter = filters[epp_at]["name"].clone();
    let epp_service = filters[epp_at]
        .pointer("/typed_config/grpc_service")
        .cloned()
        .context("the EPP filter has no grpc_service")?;
    let epp_cluster = epp_service
        .pointer("/envoy_grpc/cluster_name")
        .and_then(Value::as_str)
        .context("the EPP filter names no cluster")?
        .to_owned();
    filters.insert(epp_at, serde_json::from_str(BBR_FILTER)?);
    let strip = filters
        .iter_mut()
        .find(|f| {
            f.pointer("/typed_config/@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(".header_mutation.v3.HeaderMutation"))
        })
        .context("the Envoy template strips no headers")?;
    array(strip, "/typed_config/mutations/request_mutations")?.extend([
        json!({"remove": "x-gateway-model-name"}),
        json!({"remove": "x-gateway-base-model-name"}),
    ]);

    let routes = array(
        &mut cfg,
        &format!("{hcm}/route_config/virtual_hosts/0/routes"),
    )?;
    anyhow::ensure!(routes.len() == 1, "expected the template's one route");
    let route = &mut routes[0];
    at(route, "/match")?["headers"] = json!([
        {"name": "x-gateway-base-model-name", "string_match": {"exact": model}}
    ]);
    let Some(name) = epp_filter.as_str() else {
        anyhow::bail!("the EPP filter has no name");
    };
    route["typed_per_filter_config"] = json!({
        name: {"@type": EXT_PROC_PER_ROUTE_TYPE, "overrides": {"grpc_service": epp_service}}
    });
    routes.push(json!({
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string":
            "{\"error\":{\"message\":\"no InferencePool serves the requested model\",\"type\":\"NotFoundError\",\"code\":404}}"}},
        "typed_per_filter_config": {name: {"@type": EXT_PROC_PER_ROUTE_TYPE, "disabled": true}}
    }));

    let clusters = array(&mut cfg, "/static_resources/clusters")?;
    let mut bbr = clusters
        .iter()
        .find(|c| c["name"] == json!(epp_cluster))
        .cloned()
        .context("the Envoy template has no EPP cluster")?;
    bbr["name"] = json!("bbr");
    at(&mut bbr, "/load_assignment")?["cluster_name"] = json!("bbr");
    at(
        &mut bbr,
        "/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address",
    )?["port_value"] = json!(bbr_port);
    clusters.push(bbr);
    Ok(serde_json::to_string_pretty(&cfg)?)
}

/// `epp` + `bbr` (file mode: `model` as the one base model) + Envoy with [`bbr_gateway`] of
/// the shipped plaintext template, in front of `backends`.
pub async fn start_bbr_switchyard(
    tools: &Tools,
    model: &str,
    backends: &[std::net::SocketAddr],
    dir: &Path,
) -> anyhow::Result<RouterUp> {
    anyhow::ensure!(
        tools.bbr.exists(),
        "{} not found: build it with `cargo build --release -p bbr` (make bench-build does)",
        tools.bbr.display()
    );
    // The EPP exactly as the other Switchyard paths run it.
    let epp = start_epp(tools, None, harness::pool_yaml(backends), dir, &[]).await?;
    let mapping = dir.join("model-mapping.yaml");
    std::fs::write(&mapping, format!("mappings:\n- baseModel: {model}\n"))?;
    let (grpc, health, metrics) = (free_port()?, free_port()?, free_port()?);
    let mut cmd = Command::new(&tools.bbr);
    cmd.arg("--mapping-file")
        .arg(&mapping)
        .args([
            "--streaming",
            "--bind-address",
            "127.0.0.1",
            "--secure-serving=false",
            "--metrics-endpoint-auth=false",
        ])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &health.to_string()])
        .args(["--metrics-port", &metrics.to_string()]);
    let bbr = Proc::spawn("bbr", &mut cmd, dir)?;
    wait_http(
        &format!("http://127.0.0.1:{metrics}/metrics"),
        None,
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("bbr not up; see {}", bbr.log.display()))?;
    let PlaintextEnvoy {
        config: rendered,
        admin,
        listen,
    } = plaintext_envoy(tools, ResponsePath::Full, epp.grpc, backends)?;
    let envoy_cfg = bbr_gateway(&rendered, model, grpc)?;
    let envoy = start_envoy(tools, envoy_cfg, admin, listen, dir, true).await?;
    let up = RouterUp {
        url: format!("http://127.0.0.1:{listen}"),
        procs: vec![envoy, epp.proc, bbr],
        epp: Some(1),
        epp_metrics: Some(epp.metrics_url),
    };
    super::wait_serving(&up.url, Duration::from_secs(60))
        .await
        .with_context(|| {
            format!(
                "Envoy + bbr + epp never served a request; logs in {}",
                dir.display()
            )
        })?;
    Ok(up)
}

/// Runs `--bbr`: Envoy + EPP and Envoy + BBR + EPP on one fixed backend, both up at once,
/// measured in turn at each body size (one request at a time, one-token answers: `bbr` is off
/// the response path), then long prompts at concurrency 16.
pub async fn run_bbr(tools: &Tools, quick: bool, dir: &Path) -> anyhow::Result<BbrResult> {
    let dir = dir.join("overhead-bbr");
    std::fs::create_dir_all(&dir)?;
    let (_backend, addrs) = start_backend(1, &dir)?;
    let sizes = body_sizes(quick);
    let mut ups = Vec::new();
    for path in BBR_PATHS {
        let sub = dir.join(path.replace('+', "-"));
        std::fs::create_dir_all(&sub)?;
        ups.push(match path {
            "envoy+switchyard" => {
                start_switchyard_on(tools, None, &addrs, &sub, &[], ResponsePath::Full).await?
            }
            _ => start_bbr_switchyard(tools, crate::workload::MODEL, &addrs, &sub).await?,
        });
    }
    let mut rows = Vec::new();
    for &(bytes, count) in &sizes {
        for (path, up) in BBR_PATHS.iter().zip(&ups) {
            eprintln!(
                "overhead --bbr: {path}, {bytes}-byte bodies, {count} requests one at a time"
            );
            measure(up, None, Mode::Concurrency(1), Some(10), None, bytes, 1).await?;
            let (summary, cpu) =
                measure(up, None, Mode::Concurrency(1), Some(count), None, bytes, 1).await?;
            rows.push(Row {
                path: (*path).into(),
                body_bytes: bytes,
                output_tokens: 1,
                summary,
                epp_cpu_us_per_req: cpu.epp_us,
                envoy_cpu_us_per_req: cpu.envoy_us,
                bbr_cpu_us_per_req: cpu.bbr_us,
                scrapes_per_req: None,
                epp_clock_us_per_req: None,
            });
        }
    }
    let mut throughput = Vec::new();
    let (bytes, conc) = (220 * 1024, 16);
    let secs = if quick { 5.0 } else { 15.0 };
    for (path, up) in BBR_PATHS.iter().zip(&ups) {
        eprintln!("overhead --bbr: {path}, {bytes}-byte bodies at concurrency {conc}");
        let (summary, cpu) = measure(
            up,
            None,
            Mode::Concurrency(conc),
            None,
            Some(secs),
            bytes,
            1,
        )
        .await?;
        throughput.push(Throughput {
            path: (*path).into(),
            body_bytes: bytes,
            concurrency: conc,
            summary,
            epp_cpu_us_per_req: cpu.epp_us,
            epp_cores: cpu.epp_cores,
            bbr_cpu_us_per_req: cpu.bbr_us,
            bbr_cores: cpu.bbr_cores,
        });
    }
    let bbr_peak_rss_mib = match ups.iter().find_map(bbr_proc) {
        Some(p) => p.peak_rss_kib()? as f64 / 1024.0,
        None => f64::NAN,
    };
    Ok(BbrResult {
        rows,
        throughput,
        bbr_peak_rss_mib,
    })
}

/// The `overhead-bbr` results section: what the BBR hop adds to Envoy + EPP.
pub fn markdown_bbr(res: &BbrResult) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Same fixed backend and Envoy 1.40 (`--concurrency 2`) as above. Baseline: the shipped \
         `gateway-configs/envoy/envoy-plaintext.yaml` + `epp` (h2c, full response path). With \
         BBR: the same rendered template with `bbr` (file mode, `--streaming`, h2c) in front \
         (`bench/src/scenario/overhead.rs` `bbr_gateway`: BBR's ext_proc first, request headers \
         and body `FULL_DUPLEX_STREAMED`, the route matching `X-Gateway-Base-Model-Name` with a \
         per-route EPP override and a 404 route, as `scripts/demo-envoy.yaml` and \
         `conformance/envoy/bbr.yaml`; nothing else changed). Both gateways up at once, \
         measured in turn at each size; one request at a time after 10 warm-up requests, \
         one-token answers (BBR is off the response path); latency client-side end to end.\n"
    );
    let _ = writeln!(
        s,
        "| body | requests | Envoy + EPP p50 (ms) | p99 | + BBR p50 (ms) | p99 | **added p50 (ms)** | **added p99 (ms)** | **bbr CPU / request (µs)** | **Envoy's extra CPU / request (µs)** | Envoy CPU / request, without → with BBR (µs) | epp CPU / request, without → with BBR (µs) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (base, with) in bbr_pairs(res) {
        let q = |r: &Row| {
            (
                r.summary.e2e_ms.p50.unwrap_or(f64::NAN),
                r.summary.e2e_ms.p99.unwrap_or(f64::NAN),
            )
        };
        let (b, w) = (q(base), q(with));
        let us = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.0}"));
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | **{:.2}** | **{:.2}** | **{}** | **{:.0}** | {:.0} → {:.0} | {} → {} |",
            size_label(base.body_bytes),
            with.summary.ok,
            b.0,
            b.1,
            w.0,
            w.1,
            w.0 - b.0,
            w.1 - b.1,
            us(with.bbr_cpu_us_per_req),
            with.envoy_cpu_us_per_req - base.envoy_cpu_us_per_req,
            base.envoy_cpu_us_per_req,
            with.envoy_cpu_us_per_req,
            us(base.epp_cpu_us_per_req),
            us(with.epp_cpu_us_per_req),
        );
    }
    let _ = writeln!(
        s,
        "\n`bbr` peak RSS (VmHWM) over the whole run: {:.1} MiB.\n",
        res.bbr_peak_rss_mib
    );
    let _ = writeln!(
        s,
        "Long prompts at a fixed concurrency:\n\n\
         | path | body | concurrency | req/s | TTFT p50 (ms) | TTFT p99 (ms) | errors | epp CPU / request (µs) | bbr CPU / request (µs) | bbr cores |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for t in &res.throughput {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} |",
            t.path,
            size_label(t.body_bytes),
            t.concurrency,
            t.summary.req_per_s,
            t.summary.ttft_ms.p50.unwrap_or(f64::NAN),
            t.summary.ttft_ms.p99.unwrap_or(f64::NAN),
            t.summary.sent - t.summary.ok,
            t.epp_cpu_us_per_req
                .map_or("-".into(), |c| format!("{c:.0}")),
            t.bbr_cpu_us_per_req
                .map_or("-".into(), |c| format!("{c:.0}")),
            t.bbr_cores.map_or("-".into(), |c| format!("{c:.2}")),
        );
    }
    s
}

/// (Envoy + EPP, Envoy + BBR + EPP) rows of each body size, in the order measured.
fn bbr_pairs(res: &BbrResult) -> Vec<(&Row, &Row)> {
    res.rows
        .iter()
        .filter(|r| r.path == BBR_PATHS[0])
        .filter_map(|b| {
            res.rows
                .iter()
                .find(|r| r.path == BBR_PATHS[1] && r.body_bytes == b.body_bytes)
                .map(|w| (b, w))
        })
        .collect()
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
         response path, the lean one with `response_body_mode: NONE`, the minimal one with \
         `response_header_mode: SKIP` as well, and the observed one: lean plus \
         `response-observer.yaml` and `--response-observer`). One request at a \
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
         `response_body_mode: NONE`, the body past the EPP; `minimal` = lean and \
         `response_header_mode: SKIP`, the EPP sees the request and the response's end only; \
         `observed` = lean and the response observer, a second ext_proc filter in observability \
         mode that sends the EPP every response chunk without waiting; `UDS` = Envoy reaches the EPP on \
         its Unix socket, `--grpc-uds-path`, instead of TCP; `buffered body` = \
         `request_body_mode: BUFFERED` instead of the shipped `FULL_DUPLEX_STREAMED`: Envoy \
         keeps the body and sends it once, after the headers' answer). `epp by the clock` is the EPP's \
         CPU at rest (Envoy attached, no traffic: health checks, timers) times the request's \
         length, a part of `epp CPU / req` that does not depend on the request; `scrapes / req` \
         counts the EPP's scrapes of the backend during the measurement (≈ 250 µs of EPP CPU \
         each for this backend's 30 KB exposition; an endpoint with a request in flight is \
         scraped at the refresh interval, so at one request at a time a long stream carries \
         them all):\n\n\
         | body | output tokens | path | Envoy CPU / req (µs) | epp CPU / req (µs) | \
         epp by the clock (µs) | scrapes / req | total (µs) | \
         added p50 (ms) | added p99 (ms) | TTFT added p50 (ms) |\n\
         | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |c| format!("{c:.digits$}"));
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
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
                size_label(r.body_bytes),
                r.output_tokens,
                path_label(&r.path),
                r.envoy_cpu_us_per_req,
                opt(r.epp_cpu_us_per_req, 0),
                opt(r.epp_clock_us_per_req, 0),
                opt(r.scrapes_per_req, 1),
                r.envoy_cpu_us_per_req + r.epp_cpu_us_per_req.unwrap_or(0.0),
                b.0 - a.0,
                b.1 - a.1,
                b.2 - a.2,
            );
        }
    }
    if !res.epp_rest_us_per_s.is_empty() {
        let rest: Vec<String> = res
            .epp_rest_us_per_s
            .iter()
            .map(|(path, us)| format!("{} {us:.0} µs/s", path_label(path)))
            .collect();
        let _ = writeln!(s, "\nThe EPP at rest: {}.", rest.join(", "));
    }
    s
}

/// A path's name in the tables.
fn path_label(path: &str) -> &'static str {
    match path {
        "envoy" => "Envoy alone",
        "envoy+switchyard" => "+ epp, full",
        "envoy+switchyard-uds" => "+ epp, full, UDS",
        "envoy+switchyard-buffered" => "+ epp, full, buffered body",
        "envoy+switchyard-lean" => "+ epp, lean",
        "envoy+switchyard-lean-uds" => "+ epp, lean, UDS",
        "envoy+switchyard-lean-buffered" => "+ epp, lean, buffered body",
        "envoy+switchyard-minimal" => "+ epp, minimal",
        "envoy+switchyard-observed" => "+ epp, observed",
        _ => "+ epp",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::stats::Quantiles;
    use crate::workload::MODEL;

    fn repo() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The shipped plaintext template, rendered as the scenario renders it.
    fn shipped() -> String {
        let template =
            std::fs::read_to_string(repo().join("gateway-configs/envoy/envoy-plaintext.yaml"))
                .unwrap();
        let backends = ["127.0.0.1:18001".parse().unwrap()];
        harness::render(
            &template,
            &[
                ("LISTEN_PORT", "18080".into()),
                ("ADMIN_PORT", "18081".into()),
                ("EPP_HOST", "127.0.0.1".into()),
                ("EPP_PORT", "19002".into()),
                ("BACKEND_ENDPOINTS", harness::lb_endpoints(&backends)),
            ],
        )
        .unwrap()
    }

    const HCM: &str = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config";

    #[test]
    fn the_uds_gateway_reaches_the_epp_on_its_socket_and_nothing_else_changes() {
        let rendered = shipped();
        let socket = Path::new("/tmp/x/epp.sock");
        let piped = testkit::envoy::with_epp_pipe(&rendered, socket).unwrap();
        let cfg: Value = yaml_serde::from_str(&piped).unwrap();
        let clusters = cfg["static_resources"]["clusters"].as_array().unwrap();
        let epp = clusters.iter().find(|c| c["name"] == "epp").unwrap();
        assert_eq!(epp["type"], "STATIC");
        assert_eq!(
            epp.pointer("/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/pipe/path"),
            Some(&json!("/tmp/x/epp.sock"))
        );
        // Only the epp cluster's two lines differ.
        let before: Value = yaml_serde::from_str(&rendered).unwrap();
        let others = |v: &Value| -> Vec<Value> {
            v["static_resources"]["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["name"] != "epp")
                .cloned()
                .collect()
        };
        assert_eq!(others(&before), others(&cfg));
        assert_eq!(
            before["static_resources"]["listeners"],
            cfg["static_resources"]["listeners"]
        );
        assert_eq!(piped.lines().count(), rendered.lines().count());
        // A template without the cluster is refused, not silently left on TCP.
        assert!(testkit::envoy::with_epp_pipe("static_resources: {}\n", socket).is_err());
    }

    #[test]
    fn bbr_goes_first_and_the_route_matches_the_base_model() {
        let out: Value =
            serde_json::from_str(&bbr_gateway(&shipped(), MODEL, 19004).unwrap()).unwrap();
        let names: Vec<&str> = out
            .pointer(&format!("{HCM}/http_filters"))
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "envoy.filters.http.header_mutation",
                "bbr",
                "envoy.filters.http.ext_proc",
                "envoy.filters.http.router"
            ]
        );
        let removed = out
            .pointer(&format!(
                "{HCM}/http_filters/0/typed_config/mutations/request_mutations"
            ))
            .unwrap()
            .to_string();
        assert!(
            removed.contains("\"x-gateway-base-model-name\""),
            "{removed}"
        );
        let routes = out
            .pointer(&format!("{HCM}/route_config/virtual_hosts/0/routes"))
            .and_then(Value::as_array)
            .unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(
            routes[0].pointer("/match/headers/0/string_match/exact"),
            Some(&json!(MODEL))
        );
        assert_eq!(
            routes[0].pointer(
                "/typed_per_filter_config/envoy.filters.http.ext_proc/overrides/grpc_service/envoy_grpc/cluster_name"
            ),
            Some(&json!("epp"))
        );
        assert_eq!(
            routes[1].pointer("/direct_response/status"),
            Some(&json!(404))
        );
        assert_eq!(
            routes[1].pointer("/typed_per_filter_config/envoy.filters.http.ext_proc/disabled"),
            Some(&json!(true))
        );
        let clusters = out["static_resources"]["clusters"].as_array().unwrap();
        let bbr = clusters.iter().find(|c| c["name"] == "bbr").unwrap();
        assert_eq!(
            bbr.pointer("/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address/port_value"),
            Some(&json!(19004))
        );
    }

    /// Taking the additions out again gives the shipped template back: the two gateways
    /// differ by the BBR hop and its routing only.
    #[test]
    fn nothing_else_changes() {
        let original: Value = yaml_serde::from_str(&shipped()).unwrap();
        let mut out: Value =
            serde_json::from_str(&bbr_gateway(&shipped(), MODEL, 19004).unwrap()).unwrap();
        let hcm = out.pointer_mut(HCM).unwrap();
        hcm["http_filters"].as_array_mut().unwrap().remove(1);
        let strip = hcm
            .pointer_mut("/http_filters/0/typed_config/mutations/request_mutations")
            .and_then(Value::as_array_mut)
            .unwrap();
        strip.truncate(strip.len() - 2);
        let routes = hcm
            .pointer_mut("/route_config/virtual_hosts/0/routes")
            .and_then(Value::as_array_mut)
            .unwrap();
        routes.pop();
        routes[0]["match"]
            .as_object_mut()
            .unwrap()
            .remove("headers");
        routes[0]
            .as_object_mut()
            .unwrap()
            .remove("typed_per_filter_config");
        out["static_resources"]["clusters"]
            .as_array_mut()
            .unwrap()
            .retain(|c| c["name"] != "bbr");
        assert_eq!(out, original);
    }

    /// Envoy itself accepts the generated config (skipped without Envoy unless
    /// `SWITCHYARD_REQUIRE_ENVOY` is set).
    #[test]
    fn envoy_validates_the_bbr_gateway() {
        let envoy = std::env::var_os("ENVOY")
            .filter(|e| !e.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| testkit::envoy::venv_binary(&repo()));
        let Some(envoy) = envoy else {
            assert!(
                std::env::var_os("SWITCHYARD_REQUIRE_ENVOY").is_none(),
                "no Envoy (set ENVOY or run make envoy)"
            );
            eprintln!("skipped: no Envoy");
            return;
        };
        let path = std::env::temp_dir().join(format!(
            "switchyard-bbr-gateway-{}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, bbr_gateway(&shipped(), MODEL, 19004).unwrap()).unwrap();
        let out = Command::new(envoy)
            .args(["--mode", "validate", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn row(path: &str, bytes: usize, p50: f64, p99: f64, envoy: f64, bbr: Option<f64>) -> Row {
        let summary = Summary {
            sent: 100,
            ok: 100,
            e2e_ms: Quantiles {
                n: 100,
                p50: Some(p50),
                p99: Some(p99),
                ..Quantiles::default()
            },
            ..Summary::default()
        };
        Row {
            path: path.into(),
            body_bytes: bytes,
            output_tokens: 1,
            summary,
            epp_cpu_us_per_req: Some(250.0),
            envoy_cpu_us_per_req: envoy,
            bbr_cpu_us_per_req: bbr,
            scrapes_per_req: None,
            epp_clock_us_per_req: None,
        }
    }

    #[test]
    fn bbr_table_reports_what_the_hop_adds() {
        let res = BbrResult {
            rows: vec![
                row(BBR_PATHS[0], 1024, 0.90, 1.20, 500.0, None),
                row(BBR_PATHS[1], 1024, 1.25, 1.80, 640.0, Some(120.0)),
                row(BBR_PATHS[0], 220 * 1024, 1.70, 3.00, 870.0, None),
                row(BBR_PATHS[1], 220 * 1024, 2.50, 4.10, 1300.0, Some(400.0)),
            ],
            throughput: Vec::new(),
            bbr_peak_rss_mib: 12.5,
        };
        let md = markdown_bbr(&res);
        assert!(
            md.contains("| 1 KB | 100 | 0.90 | 1.20 | 1.25 | 1.80 | **0.35** | **0.60** | **120** | **140** | 500 → 640 | 250 → 250 |"),
            "{md}"
        );
        assert!(md.contains("| 220 KB | 100 |"), "{md}");
        assert!(
            md.contains("**0.80** | **1.10** | **400** | **430** |"),
            "{md}"
        );
        assert!(md.contains("12.5 MiB"), "{md}");
    }
}
