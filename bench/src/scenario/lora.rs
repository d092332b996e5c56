//! LoRA adapters with shifting popularity (`scenario lora`): more adapters than the whole
//! pool has slots, a hot adapter that changes every `shift_s` seconds; demand-driven placement
//! (the EPP loads and unloads adapters) against static placement and the peer routers.
//!
//! How the engines are modelled (vLLM's limits, in the simulator): `--max-loras` GPU slots
//! per replica (a swap costs `lora_load_ms` in the step that brings the adapter in) and a CPU
//! cache of `--max-cpu-loras` adapters: an adapter registered but fallen out of that cache is
//! read from disk again (`lora_disk_load_ms`) when used. An adapter that is not registered
//! gets vLLM's 404 ("The model … does not exist").
//!
//! * **static**: every adapter registered on every replica at start-up (`--lora-modules`, what
//!   upstream's sidecar does with one ConfigMap for the pool); with more adapters than the CPU
//!   cache holds, requests spread over replicas pay disk reads. Switchyard's `lora` profile
//!   (`lora-affinity-scorer`) routes.
//! * **placement**: adapter k starts on replica k mod R (every adapter somewhere, no cache
//!   overflowing); the EPP's placement
//!   (`--lora-placement-config`, at most `max_cpu_loras` adapters per replica) moves them with
//!   the demand; the `lora-placement` profile (`lora-adapter-filter` + the `lora` profile)
//!   routes to the replicas that hold the adapter.
//! * **peers**: the static registration, routed by a peer router (which knows nothing of
//!   adapters).
//!
//! The hot adapter changes every `rate × shift_s` requests (about every `shift_s` seconds at
//! the Poisson rate), stepping by 5 so that consecutive hot adapters sit on different replicas
//! in the round-robin start.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{LORA_AWARE, Router, start_router, start_sim, start_switchyard};
use crate::harness::{Tools, get};
use crate::loadgen::{self, LoadSpec, Mode, Summary};
use crate::workload::{Mixed, ShiftingLora};

/// The `lora` profile plus `lora-adapter-filter`: requests go to the replicas that hold their
/// adapter (placement's lists), then as the `lora` profile scores.
pub const LORA_PLACEMENT: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: lora-adapter-filter
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: active-request-scorer
- type: no-hit-lru-scorer
- type: lora-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: lora-adapter-filter
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: active-request-scorer
    weight: 2
  - pluginRef: no-hit-lru-scorer
    weight: 1
  - pluginRef: lora-affinity-scorer
    weight: 2
";

/// Who places and routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// Switchyard with demand-driven placement.
    Placement,
    /// Switchyard's `lora` profile over the static registration.
    Static,
    /// A peer router over the static registration.
    Peer(Router),
}

impl Setup {
    /// Label for tables.
    pub fn label(&self) -> String {
        match self {
            Setup::Placement => "switchyard lora-placement".into(),
            Setup::Static => "switchyard lora (static)".into(),
            Setup::Peer(r) => format!("{} (static)", r.label()),
        }
    }

    /// `placement`, `static`, or a peer as `Router::parse` reads it.
    pub fn parse(s: &str) -> anyhow::Result<Setup> {
        Ok(match s {
            "placement" => Setup::Placement,
            "static" => Setup::Static,
            other => {
                let r = Router::parse(other)?;
                anyhow::ensure!(r.is_peer(), "{other}: placement, static or a peer router");
                Setup::Peer(r)
            }
        })
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraCfg {
    /// Simulated replicas.
    pub replicas: usize,
    /// GPU adapter slots per replica (`--max-loras`).
    pub max_loras: usize,
    /// CPU-cached adapters per replica (`--max-cpu-loras`), also placement's per-replica cap.
    pub max_cpu_loras: usize,
    /// Adapters (`lora-0` …).
    pub adapters: usize,
    /// GPU slot swap, ms.
    pub lora_load_ms: f64,
    /// Read from disk after falling out of the CPU cache, ms.
    pub lora_disk_load_ms: f64,
    /// Share of the requests for the hot adapter.
    pub hot_share: f64,
    /// Seconds between changes of the hot adapter.
    pub shift_s: f64,
    /// Poisson rates, requests/s.
    pub rates: Vec<f64>,
    /// Seconds of arrivals per run.
    pub duration_s: f64,
    /// Seconds after the last arrival before unfinished requests are cut.
    pub drain_s: f64,
    /// `sim --stream-granularity`.
    pub stream_granularity: u32,
    /// Median prompt and output tokens (lognormal, σ 0.6 and 0.5).
    pub prompt_median: f64,
    /// See `prompt_median`.
    pub output_median: f64,
    /// Setups compared.
    pub setups: Vec<Setup>,
    /// Workload seed.
    pub seed: u64,
}

impl LoraCfg {
    /// The full comparison: 4 replicas × 2 slots and a CPU cache of 6 (24 places for 16
    /// adapters: every adapter keeps one and the hot one gets up to 3), 16 adapters, a new hot
    /// adapter every 20 s,
    /// 120 s of arrivals at two rates, every peer's best policy.
    pub fn full() -> anyhow::Result<Self> {
        Ok(Self {
            replicas: 4,
            max_loras: 2,
            max_cpu_loras: 6,
            adapters: 16,
            lora_load_ms: 25.0,
            lora_disk_load_ms: 100.0,
            hot_share: 0.5,
            shift_s: 20.0,
            rates: vec![4.0, 8.0],
            duration_s: 120.0,
            drain_s: 30.0,
            stream_granularity: 8,
            prompt_median: 600.0,
            output_median: 128.0,
            setups: [
                "placement",
                "static",
                "sglang:cache_aware",
                "vllm:cache_aware",
                "smg:cache_aware",
            ]
            .iter()
            .map(|s| Setup::parse(s))
            .collect::<anyhow::Result<_>>()?,
            seed: 42,
        })
    }

    /// Minutes, not more: one rate, 40 s (two shifts), one peer.
    pub fn quick() -> anyhow::Result<Self> {
        Ok(Self {
            rates: vec![6.0],
            duration_s: 40.0,
            drain_s: 20.0,
            output_median: 64.0,
            setups: ["placement", "static", "vllm:cache_aware"]
                .iter()
                .map(|s| Setup::parse(s))
                .collect::<anyhow::Result<_>>()?,
            ..Self::full()?
        })
    }

    fn names(&self) -> Vec<String> {
        (0..self.adapters).map(|i| format!("lora-{i}")).collect()
    }

    /// The placement's catalogue: every adapter, a repository id as source (the simulator
    /// accepts it at once; the load cost is the slot swap and the disk read it models).
    fn catalogue(&self) -> String {
        let mut s = String::from("vLLMLoRAConfig:\n  ensureExist:\n    models:\n");
        for n in self.names() {
            s.push_str(&format!("    - id: {n}\n      source: bench/{n}\n"));
        }
        s
    }
}

/// One (setup, rate) run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraRun {
    /// Setup label.
    pub setup: String,
    /// Offered rate.
    pub rate: f64,
    /// Client-side summary.
    pub summary: Summary,
    /// Adapter loads the EPP's placement made (placement only).
    pub placement_loads: Option<f64>,
    /// Adapter unloads the EPP's placement made (placement only).
    pub placement_unloads: Option<f64>,
}

/// Runs every setup × rate.
pub async fn run(tools: &Tools, cfg: &LoraCfg, dir: &Path) -> anyhow::Result<Vec<LoraRun>> {
    let mut out = Vec::new();
    for setup in &cfg.setups {
        for &rate in &cfg.rates {
            eprintln!("lora {} at {rate} req/s", setup.label());
            let run_dir = dir.join(format!(
                "lora-{}-{rate}",
                setup.label().replace([' ', '(', ')'], "-")
            ));
            std::fs::create_dir_all(&run_dir)?;
            match one(tools, cfg, setup, rate, &run_dir).await {
                Ok(r) => {
                    eprintln!(
                        "  TTFT p50 {:.0} ms p90 {:.0} ms, {:.0} out tok/s, errors {}",
                        r.summary.ttft_ms.p50.unwrap_or(f64::NAN),
                        r.summary.ttft_ms.p90.unwrap_or(f64::NAN),
                        r.summary.output_tok_per_s,
                        r.summary.sent - r.summary.ok,
                    );
                    out.push(r);
                }
                // A peer not installed must not sink the comparison.
                Err(e) => eprintln!("  skipped: {e:#}"),
            }
        }
    }
    Ok(out)
}

async fn one(
    tools: &Tools,
    cfg: &LoraCfg,
    setup: &Setup,
    rate: f64,
    dir: &Path,
) -> anyhow::Result<LoraRun> {
    let names = cfg.names();
    let mut extra = vec![
        "--stream-granularity".to_owned(),
        cfg.stream_granularity.to_string(),
        "--seed".into(),
        "1".into(),
        "--max-loras".into(),
        cfg.max_loras.to_string(),
        "--max-cpu-loras".into(),
        cfg.max_cpu_loras.to_string(),
        "--lora-load-ms".into(),
        cfg.lora_load_ms.to_string(),
        "--lora-disk-load-ms".into(),
        cfg.lora_disk_load_ms.to_string(),
    ];
    if *setup != Setup::Placement {
        extra.push("--lora-modules".into());
        extra.push(names.join(","));
    }
    let (mut sim, replicas) = start_sim(tools, cfg.replicas, &extra, dir)?;
    let up = match setup {
        Setup::Placement => {
            // The start: adapter k on replica k mod R, within each replica's CPU cache.
            for (k, name) in names.iter().enumerate() {
                let addr = replicas[k % replicas.len()];
                let engine =
                    endpoint_picker::lora::engine::Engine::new(&addr.ip().to_string(), addr.port());
                engine
                    .load(&endpoint_picker::lora::config::Adapter {
                        id: name.clone(),
                        source: format!("bench/{name}"),
                        base_model: None,
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("registering {name} on {addr}: {e}"))?;
            }
            let catalogue = dir.join("catalogue.yaml");
            std::fs::write(&catalogue, cfg.catalogue())?;
            let catalogue = catalogue.display().to_string();
            let per_replica = cfg.max_cpu_loras.to_string();
            start_switchyard(
                tools,
                Some(LORA_PLACEMENT),
                &replicas,
                dir,
                &[
                    "--lora-placement-config",
                    &catalogue,
                    "--lora-placement-max-adapters-per-endpoint",
                    &per_replica,
                    "--lora-placement-interval",
                    "1s",
                    "--lora-placement-min-dwell",
                    "5s",
                    "--lora-placement-demand-half-life",
                    "5s",
                    "--lora-placement-max-changes",
                    "4",
                ],
            )
            .await?
        }
        Setup::Static => {
            let router = Router::Switchyard {
                profile: "lora".into(),
                config: Some(LORA_AWARE.into()),
            };
            start_router(tools, &router, &replicas, dir).await?
        }
        Setup::Peer(router) => start_router(tools, router, &replicas, dir).await?,
    };
    let spec = LoadSpec {
        url: up.url.clone(),
        mode: Mode::Rate(rate),
        duration_s: Some(cfg.duration_s),
        count: None,
        drain_timeout_s: cfg.drain_s,
        seed: 1,
        progress: true,
    };
    let per_epoch = (rate * cfg.shift_s).round().max(1.0) as u64;
    let workload = ShiftingLora::new(
        cfg.seed,
        cfg.adapters,
        per_epoch,
        cfg.hot_share,
        5,
        Mixed::new(
            cfg.seed ^ 0x10ad,
            cfg.prompt_median,
            0.6,
            cfg.output_median,
            0.5,
        ),
    );
    let report = loadgen::run(spec, Box::new(workload)).await?;
    sim.check_alive()?;
    let (mut loads, mut unloads) = (None, None);
    if let Some(url) = &up.epp_metrics
        && *setup == Setup::Placement
    {
        let (_, text) = get(url).await?;
        let actions = |action: &str| {
            text.lines()
                .filter(|l| {
                    l.starts_with("inference_extension_lora_placement_actions_total")
                        && l.contains(&format!("action=\"{action}\""))
                        && l.contains("result=\"success\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .fold(0.0, |a, b| a + b)
        };
        loads = Some(actions("load"));
        unloads = Some(actions("unload"));
    }
    drop(up);
    drop(sim);
    std::fs::write(dir.join("loadgen.json"), serde_json::to_vec(&report)?)?;
    Ok(LoraRun {
        setup: setup.label(),
        rate,
        summary: report.summary,
        placement_loads: loads,
        placement_unloads: unloads,
    })
}

/// The results section: the set-up, one table, the headline against static and the best peer.
pub fn markdown(runs: &[LoraRun], cfg: &LoraCfg) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} simulated replicas × {} GPU adapter slots (swap {} ms), CPU cache of {} adapters per replica (a read from disk {} ms); {} adapters (more than the pool's {} slots), `mixed` traffic (prompt median {}, output median {} tokens): {:.0} % to one hot adapter, the rest uniform; the hot adapter changes every {} s; {} s of arrivals per run (seed {}).\n",
        cfg.replicas,
        cfg.max_loras,
        cfg.lora_load_ms,
        cfg.max_cpu_loras,
        cfg.lora_disk_load_ms,
        cfg.adapters,
        cfg.replicas * cfg.max_loras,
        cfg.prompt_median,
        cfg.output_median,
        cfg.hot_share * 100.0,
        cfg.shift_s,
        cfg.duration_s,
        cfg.seed,
    );
    let _ = writeln!(
        s,
        "| setup | rate (req/s) | TTFT p50 (ms) | TTFT p90 (ms) | e2e p90 (ms) | done req/s | output tok/s | errors | placement loads / unloads |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let f0 = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}"));
    for r in runs {
        let m = &r.summary;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.1} | {:.0} | {} | {} |",
            r.setup,
            r.rate,
            f0(m.ttft_ms.p50),
            f0(m.ttft_ms.p90),
            f0(m.e2e_ms.p90),
            m.req_per_s,
            m.output_tok_per_s,
            m.sent - m.ok,
            match (r.placement_loads, r.placement_unloads) {
                (Some(l), Some(u)) => format!("{l:.0} / {u:.0}"),
                _ => "-".into(),
            },
        );
    }
    s.push('\n');
    for line in headlines(runs, cfg) {
        let _ = writeln!(s, "- {line}");
    }
    s
}

/// At each rate: placement against static and against the best peer (lowest TTFT p90), on
/// TTFT p90 (other / placement: > 1 means placement is faster) and output tokens/s.
pub fn headlines(runs: &[LoraRun], cfg: &LoraCfg) -> Vec<String> {
    let mut out = Vec::new();
    let p90 = |r: &LoraRun| r.summary.ttft_ms.p90.unwrap_or(f64::INFINITY);
    for &rate in &cfg.rates {
        let at: Vec<&LoraRun> = runs.iter().filter(|r| r.rate == rate).collect();
        let Some(mine) = at
            .iter()
            .find(|r| r.setup == Setup::Placement.label())
            .copied()
        else {
            continue;
        };
        let stat = at
            .iter()
            .find(|r| r.setup == Setup::Static.label())
            .copied();
        let peer = at
            .iter()
            .filter(|r| r.setup.ends_with("(static)") && !r.setup.starts_with("switchyard"))
            .min_by(|a, b| p90(a).total_cmp(&p90(b)))
            .copied();
        let mut line = format!(
            "at {rate} req/s, placement (TTFT p90 {:.0} ms, {:.0} output tok/s, {} errors):",
            p90(mine),
            mine.summary.output_tok_per_s,
            mine.summary.sent - mine.summary.ok
        );
        for (name, other) in [("static", stat), ("best peer", peer)] {
            if let Some(o) = other {
                line.push_str(&format!(
                    " vs {name} ({}: {:.0} ms, {:.0} tok/s, {} errors) TTFT p90 ×{:.2}, throughput ×{:.2};",
                    o.setup,
                    p90(o),
                    o.summary.output_tok_per_s,
                    o.summary.sent - o.summary.ok,
                    p90(o) / p90(mine),
                    mine.summary.output_tok_per_s / o.summary.output_tok_per_s.max(1e-9),
                ));
            }
        }
        out.push(line.trim_end_matches(';').to_owned() + ".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Quantiles;

    fn run(setup: &str, p90: f64, tok: f64) -> LoraRun {
        LoraRun {
            setup: setup.into(),
            rate: 8.0,
            summary: Summary {
                ttft_ms: Quantiles {
                    p90: Some(p90),
                    ..Quantiles::default()
                },
                output_tok_per_s: tok,
                ..Summary::default()
            },
            placement_loads: None,
            placement_unloads: None,
        }
    }

    #[test]
    fn headlines_compare_placement_with_static_and_the_best_peer() {
        let cfg = LoraCfg {
            rates: vec![8.0],
            ..LoraCfg::full().unwrap()
        };
        let runs = vec![
            run("switchyard lora-placement", 100.0, 200.0),
            run("switchyard lora (static)", 400.0, 100.0),
            run("sglang-router cache_aware (static)", 300.0, 150.0),
            run("vllm-router cache_aware (static)", 200.0, 160.0),
        ];
        let h = headlines(&runs, &cfg);
        assert_eq!(h.len(), 1);
        assert!(
            h[0].contains("TTFT p90 ×4.00, throughput ×2.00"),
            "{}",
            h[0]
        );
        assert!(
            h[0].contains("vllm-router cache_aware (static): 200 ms"),
            "{}",
            h[0]
        );
        let md = markdown(&runs, &cfg);
        assert_eq!(md.matches("| switchyard lora-placement |").count(), 1);
        assert!(md.contains("16 adapters (more than the pool's 8 slots)"));
        assert!(LoraCfg::quick().unwrap().setups.contains(&Setup::Placement));
        assert!(Setup::parse("rr").is_err());
    }

    /// The placement profile and catalogue load as the EPP loads them.
    #[test]
    fn the_placement_profile_and_catalogue_load() {
        endpoint_picker::config::load(LORA_PLACEMENT, 1).unwrap();
        let cfg = LoraCfg::quick().unwrap();
        let c = endpoint_picker::lora::config::parse(&cfg.catalogue(), true).unwrap();
        assert_eq!(c.ensure_exist.len(), cfg.adapters);
    }
}
