//! `scenario`: the benchmark scenarios, each a single command that starts what it needs
//! (simulator or fixed backend, `epp`, Envoy, peer routers), measures and tears down.
//!
//! ```text
//! scenario routing  [--quick]   # Envoy RR / LR, Switchyard, sglang-router, vllm-router
//! scenario overhead [--quick]   # Envoy -> backend vs Envoy -> Switchyard -> backend
//! scenario overhead --variants  # the EPP over TCP and its Unix socket, body streamed and buffered
//! scenario overhead --bbr       # only the body-based router's hop: Envoy -> Switchyard vs
//!                               # Envoy -> bbr -> Switchyard (a few minutes)
//! scenario scale    [--quick]   # 1,000 endpoints: idle CPU, memory, decision time
//! scenario all      [--quick]   # all three; rewrites bench/RESULTS.md and the plots
//! scenario chaos    [--quick]   # faults one at a time (replica killed/hung/loading, EPP and
//!                               # Envoy restarted, pool-file churn, slow /metrics)
//! scenario soak [--minutes 30]  # 80 % of capacity; EPP RSS/CPU every 10 s, bench/soak.svg
//! scenario goodput  [--quick]   # highest rate within TTFT p90 ≤ 1 s, per workload and router
//! scenario lora     [--quick]   # LoRA adapters, popularity shifting every 20 s: demand-driven
//!                               # placement vs static placement vs the peers
//! scenario tenants  [--quick]   # a batch flood (3× capacity) beside interactive traffic (20 %),
//!                               # flow control on and off
//! scenario active-active [--quick] # 1 vs 2 vs 3 precise EPPs behind one Envoy, same workload
//! scenario path-cpu [--quick]   # CPU per streamed request: Envoy alone, Envoy + Switchyard
//!                               # (full and lean response path), the peers (issue 16)
//! ```

use std::path::PathBuf;

use anyhow::Context;
use bench::harness::Tools;
use bench::report::update_section;
use bench::scenario::goodput::{self, GoodputCfg, Ladder};
use bench::scenario::routing::{self, RoutingCfg, Sweep};
use bench::scenario::{self, Router, active_active, chaos, lora, overhead, scale, soak, tenants};
use bench::workload::{Kind, WorkloadArgs};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Switchyard benchmark scenarios")]
struct Opts {
    /// Smaller sweeps that finish in minutes.
    #[arg(long, global = true)]
    quick: bool,
    /// Directory of the `sim` and `epp` release binaries (default: next to this binary).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Envoy binary (default: $ENVOY, then the repository's .venv).
    #[arg(long, global = true)]
    envoy: Option<PathBuf>,
    /// Repository root (RESULTS.md, plots and raw JSON are written under bench/).
    #[arg(long, global = true, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
    repo: PathBuf,
    /// Logs and per-run raw reports.
    #[arg(long, global = true, default_value = ".run/bench")]
    run_dir: PathBuf,
    /// Do not touch bench/RESULTS.md nor bench/results/ (raw JSON goes to the run directory).
    #[arg(long, global = true)]
    no_results: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Routing quality sweep.
    Routing(RoutingOpts),
    /// EPP overhead at several body sizes and answer lengths, on both response paths.
    Overhead {
        /// Only the body-based router's hop: Envoy + EPP vs Envoy + BBR + EPP (RESULTS.md
        /// section `overhead-bbr`; a few minutes).
        #[arg(long)]
        bbr: bool,
        /// Each EPP path over TCP, over the EPP's Unix socket (`--grpc-uds-path`) and with the
        /// request body buffered, at 1, 220 and 400 KB (RESULTS.md section `overhead-variants`).
        #[arg(long, alias = "uds", conflicts_with = "bbr")]
        variants: bool,
    },
    /// Idle cost and decision time at 100 and 1,000 endpoints.
    Scale {
        /// Pool sizes, each measured in turn (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        endpoints: Vec<usize>,
    },
    /// Everything, in order (not goodput).
    All(RoutingOpts),
    /// Chaos cases against real processes, one fault at a time.
    Chaos {
        /// Only these cases (default: all).
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
    },
    /// Long run at 80 % of the cluster's capacity, sampling the EPP.
    Soak {
        /// Minutes of soak.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
    },
    /// LoRA adapters with shifting popularity (more adapters than slots, a new hot adapter
    /// every 20 s): demand-driven placement vs static placement vs the peer routers.
    Lora {
        /// Setups: placement, static, and peers (sglang:POLICY, vllm:POLICY, smg:POLICY).
        #[arg(long, value_delimiter = ',')]
        setups: Option<Vec<String>>,
        /// Rates (req/s).
        #[arg(long, value_delimiter = ',')]
        rates: Option<Vec<f64>>,
        /// Seconds of arrivals per run.
        #[arg(long)]
        duration: Option<f64>,
    },
    /// Two tenants on one pool: A floods batch traffic at 3× capacity, B sends interactive
    /// traffic at 20 %; B's TTFT and A's throughput with flow control on and off.
    Tenants {
        /// The batch band's ceiling (`priority-holdback-policy` `minCeiling`), instead of the
        /// scenario's.
        #[arg(long)]
        batch_ceiling: Option<f64>,
        /// Route without `priority-packing-scorer` (batch work spread over every replica).
        #[arg(long)]
        no_packing: bool,
    },
    /// Several EPPs behind one Envoy (precise profile, every EPP hearing every engine's KV
    /// events): 1 vs 2 vs 3 EPPs on the same workload, seed and cluster.
    ActiveActive(ActiveActiveOpts),
    /// CPU per streamed request at 80 % of capacity: Envoy alone, Envoy + Switchyard (full and
    /// lean response path), the peer routers (RESULTS.md section `path-cpu`).
    PathCpu(PathCpuOpts),
    /// Redraw the soak plot from a saved `bench/results/soak.json`.
    SoakReplot {
        /// The saved soak.
        #[arg(long, default_value = "bench/results/soak.json")]
        input: PathBuf,
        /// The SVG to write.
        #[arg(long, default_value = "bench/soak.svg")]
        out: PathBuf,
    },
    /// Goodput: per workload and router, the highest rate with TTFT p90 ≤ 1 s and no errors,
    /// by a rate ladder (long: see `--estimate`).
    Goodput(GoodputOpts),
    /// Redraw the routing plots from a saved `bench/results/routing.json`.
    Replot {
        /// The saved sweep.
        #[arg(long, default_value = "bench/results/routing.json")]
        input: PathBuf,
        /// Where the SVGs go.
        #[arg(long, default_value = "bench")]
        out_dir: PathBuf,
    },
    /// Write the goodput section from saved runs (several `goodput.json` merged: ladders and
    /// routers in order of appearance; a (workload, router) measured twice keeps the later).
    GoodputReport {
        /// Saved runs (`{"cfg": …, "runs": […]}`).
        #[arg(long, required = true)]
        input: Vec<PathBuf>,
        /// Markdown put before the tables (how and when it was run).
        #[arg(long)]
        header_file: Option<PathBuf>,
        /// The RESULTS.md section written, and its raw JSON as for `goodput --section`.
        #[arg(long, default_value = "goodput", value_parser = parse_section)]
        section: String,
    },
    /// (internal) Serve the fixed backend on N ephemeral ports; prints `backend-<i> http://<addr>`
    /// lines, then an empty line.
    Backend {
        /// Number of listeners.
        #[arg(long, default_value_t = 1)]
        ports: usize,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct RoutingOpts {
    /// Routers: rr, lr, switchyard, switchyard-balanced, switchyard-prefix, switchyard-running,
    /// switchyard-lora, sglang:POLICY, vllm:POLICY.
    #[arg(long, value_delimiter = ',')]
    routers: Option<Vec<String>>,
    /// Workloads to sweep.
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<Kind>>,
    /// Rates (req/s) for every workload (default: per-workload presets).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<f64>>,
    /// Seconds of arrivals per run.
    #[arg(long)]
    duration: Option<f64>,
    /// Override: shared-prefix groups.
    #[arg(long)]
    groups: Option<usize>,
    /// Override: shared-prefix system-prompt tokens.
    #[arg(long)]
    system_tokens: Option<usize>,
    /// Override: shared-prefix question tokens.
    #[arg(long)]
    question_tokens: Option<usize>,
    /// Override: multi-turn concurrent users.
    #[arg(long)]
    users: Option<usize>,
    /// Override: multi-turn per-user system-prompt tokens.
    #[arg(long)]
    user_system_tokens: Option<usize>,
    /// Override: output tokens.
    #[arg(long)]
    output_tokens: Option<u32>,
}

#[derive(Debug, Clone, clap::Args)]
struct PathCpuOpts {
    /// Setups to run, in this order (default: all): envoy, full, lean, lean-buffered,
    /// minimal, full-one-thread, minimal-one-thread, sglang, vllm, smg. A name may repeat.
    #[arg(long, value_delimiter = ',')]
    setups: Vec<String>,
    /// An `epp` flag for every Switchyard setup, passed as it is (repeatable; e.g.
    /// `--epp-arg=--refresh-metrics-interval=150ms`).
    #[arg(long = "epp-arg", allow_hyphen_values = true)]
    epp_args: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
struct ActiveActiveOpts {
    /// EPP counts, the first one the baseline.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    epps: Vec<usize>,
    /// Workload (its goodput preset shape).
    #[arg(long, value_enum, default_value_t = Kind::SharedPrefix)]
    workload: Kind,
    /// Poisson rate, requests per second (default: ≈ 75 % of the precise router's capacity on
    /// the preset).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of measured arrivals.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of warm-up arrivals before them.
    #[arg(long)]
    warmup: Option<f64>,
    /// Runs of every EPP count.
    #[arg(long)]
    repeats: Option<usize>,
    /// An `epp` flag for every EPP, passed as it is (repeatable; e.g.
    /// `--epp-arg=--refresh-metrics-interval=20ms`).
    #[arg(long = "epp-arg", allow_hyphen_values = true)]
    epp_args: Vec<String>,
    /// Each EPP keeps its speculative entries to itself (by default several EPPs share them:
    /// `speculativePublishEndpoint` and `speculativePeers`).
    #[arg(long)]
    no_speculative_peers: bool,
    /// Also run, for every count n > 1, one routing EPP beside n − 1 that do everything but
    /// route: the same processes on the same machine, so that what n EPPs cost the machine
    /// the engines run on is told apart from how they route.
    #[arg(long)]
    controls: bool,
}

#[derive(Debug, Clone, clap::Args)]
struct GoodputOpts {
    /// Routers (default: switchyard, switchyard-balanced, sglang:cache_aware,
    /// vllm:cache_aware, smg).
    #[arg(long, value_delimiter = ',')]
    routers: Option<Vec<String>>,
    /// Workloads (default: shared-prefix, multi-turn, hot-spot, cache-pressure, mixed).
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<Kind>>,
    /// Rungs (req/s) for every workload (default: per-workload presets).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<f64>>,
    /// Rungs of one workload, `<workload>=<r1>,<r2>,…` (repeatable; over the presets).
    #[arg(long, value_parser = parse_ladder)]
    ladder: Vec<(Kind, Vec<f64>)>,
    /// Keep only the rungs of index ≥ this in the presets (a shorter climb from higher up).
    #[arg(long, default_value_t = 0)]
    skip_rungs: usize,
    /// Keep at most this many rungs of the presets.
    #[arg(long)]
    max_rungs: Option<usize>,
    /// Seconds of warm-up before the first rung.
    #[arg(long, default_value_t = 20.0)]
    warmup: f64,
    /// Seconds measured per rung.
    #[arg(long, default_value_t = 60.0)]
    step: f64,
    /// One fresh bisection run between the last passing and the first failing rung.
    #[arg(long)]
    bisect: bool,
    /// Print the plan and the time estimate, run nothing.
    #[arg(long)]
    estimate: bool,
    /// A `sim` flag for every ladder, passed as it is (repeatable; e.g. `--sim-arg=--cpu-load-gbps
    /// --sim-arg=25`).
    #[arg(long = "sim-arg", allow_hyphen_values = true)]
    sim_args: Vec<String>,
    /// `kv-sharing` without its CPU and shared tiers (a simulator without the tier flags).
    #[arg(long, conflicts_with = "tiers")]
    no_tiers: bool,
    /// Every workload with `kv-sharing`'s CPU and shared tiers (it has them by default).
    #[arg(long)]
    tiers: bool,
    /// The RESULTS.md section written (`<!-- BEGIN <section> -->`); its raw JSON goes to
    /// `bench/results/goodput.json` for `goodput`, else `bench/results/goodput-<section>.json`.
    #[arg(long, default_value = "goodput", value_parser = parse_section)]
    section: String,
}

/// The raw JSON file of a goodput section, under `bench/results/`.
fn goodput_raw_name(section: &str) -> String {
    if section == "goodput" {
        "goodput.json".to_owned()
    } else {
        format!("goodput-{section}.json")
    }
}

/// A RESULTS.md section name: lowercase letters, digits and dashes (it names a file too).
fn parse_section(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: a section is 1 to 64 of a-z, 0-9 and -"))
    }
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Ctrl-C drops the scenario future, whose process guards then stop every child.
        tokio::select! {
            r = run(o) => r,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; children stopped"),
        }
    })
}

async fn run(o: Opts) -> anyhow::Result<()> {
    if let Cmd::Backend { ports } = o.cmd {
        let addrs = bench::fixed_backend::serve(ports).await?;
        let mut lines = String::new();
        for (i, a) in addrs.iter().enumerate() {
            lines.push_str(&format!("backend-{i} http://{a}\n"));
        }
        lines.push('\n');
        use std::io::Write;
        let mut out = std::io::stdout();
        out.write_all(lines.as_bytes())?;
        out.flush()?;
        std::future::pending::<()>().await;
        return Ok(());
    }
    if let Cmd::GoodputReport {
        input,
        header_file,
        section,
    } = &o.cmd
    {
        #[derive(serde::Deserialize)]
        struct Saved {
            cfg: GoodputCfg,
            runs: Vec<goodput::LadderRun>,
        }
        let mut merged: Option<GoodputCfg> = None;
        let mut runs: Vec<goodput::LadderRun> = Vec::new();
        for path in input {
            let saved: Saved = serde_json::from_slice(&std::fs::read(path)?)
                .with_context(|| format!("reading {}", path.display()))?;
            let cfg = merged.get_or_insert_with(|| GoodputCfg {
                routers: Vec::new(),
                ladders: Vec::new(),
                ..saved.cfg.clone()
            });
            for r in saved.cfg.routers {
                if !cfg.routers.contains(&r) {
                    cfg.routers.push(r);
                }
            }
            for l in saved.cfg.ladders {
                if !cfg
                    .ladders
                    .iter()
                    .any(|m| m.workload.workload == l.workload.workload)
                {
                    cfg.ladders.push(l);
                }
            }
            for run in saved.runs {
                runs.retain(|r| !(r.workload == run.workload && r.router == run.router));
                runs.push(run);
            }
        }
        let cfg = merged.context("no input")?;
        let head = match header_file {
            Some(p) => std::fs::read_to_string(p)?,
            None => String::new(),
        };
        let md = format!("{head}\n{}", goodput::markdown(&runs, &cfg));
        eprintln!("{md}");
        if !o.no_results {
            let repo = o.repo.canonicalize().context("repository root")?;
            update_section(&repo.join("bench/RESULTS.md"), section, &md)?;
            std::fs::write(
                repo.join("bench/results").join(goodput_raw_name(section)),
                serde_json::to_vec_pretty(&serde_json::json!({"cfg": cfg, "runs": runs}))?,
            )?;
        }
        return Ok(());
    }
    if let Cmd::Replot { input, out_dir } = &o.cmd {
        #[derive(serde::Deserialize)]
        struct Saved {
            cfg: RoutingCfg,
            runs: Vec<routing::RoutingRun>,
        }
        let saved: Saved = serde_json::from_slice(&std::fs::read(input)?)?;
        for (file, svg) in routing::plots(&saved.runs, &saved.cfg) {
            std::fs::write(out_dir.join(&file), svg)?;
            eprintln!("wrote {}", out_dir.join(file).display());
        }
        return Ok(());
    }
    if let Cmd::SoakReplot { input, out } = &o.cmd {
        let saved: soak::SoakRun = serde_json::from_slice(&std::fs::read(input)?)?;
        std::fs::write(out, soak::plot(&saved))?;
        eprintln!("wrote {}", out.display());
        return Ok(());
    }
    let repo = o.repo.canonicalize().context("repository root")?;
    let tools = Tools::locate(repo.clone(), o.bin_dir.clone(), o.envoy.clone())?;
    let run_dir = if o.run_dir.is_absolute() {
        o.run_dir.clone()
    } else {
        repo.join(&o.run_dir)
    };
    std::fs::create_dir_all(&run_dir)?;
    let results = repo.join("bench/RESULTS.md");
    let write = !o.no_results;
    // Raw numbers go next to RESULTS.md, or with --no-results into the run directory.
    let raw = if write {
        repo.join("bench/results")
    } else {
        run_dir.clone()
    };
    std::fs::create_dir_all(&raw)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let header = format!(
        "Machine: {}. Date: {} (UTC). Load average before the run: {}.\n\nCommand: `{command}`\n",
        scenario::machine(),
        scenario::cmd_out("date", &["-u", "+%Y-%m-%d %H:%M"]),
        scenario::loadavg(),
    );
    match &o.cmd {
        Cmd::Routing(r) => do_routing(&tools, r, o.quick, &run_dir, &repo, &header, write).await?,
        Cmd::Goodput(g) => do_goodput(&tools, g, o.quick, &run_dir, &repo, &header, write).await?,
        Cmd::Overhead { bbr: true, .. } => {
            do_overhead_bbr(&tools, o.quick, &run_dir, &raw, &results, &header, write).await?;
        }
        Cmd::Overhead {
            bbr: false,
            variants,
        } => {
            let res = overhead::run(&tools, o.quick, *variants, &run_dir).await?;
            let section = if *variants {
                "overhead-variants"
            } else {
                "overhead"
            };
            std::fs::write(
                raw.join(format!("{section}.json")),
                serde_json::to_vec_pretty(&res)?,
            )?;
            let md = format!("{header}\n{}", overhead::markdown(&res));
            eprintln!("{md}");
            if write {
                update_section(&results, section, &md)?;
            }
        }
        Cmd::Scale { endpoints } => {
            let mut res = Vec::new();
            for &n in endpoints {
                res.push(scale::run(&tools, n, o.quick, &run_dir).await?);
            }
            std::fs::write(raw.join("scale.json"), serde_json::to_vec_pretty(&res)?)?;
            let md = format!("{header}\n{}", scale::markdown_all(&res));
            eprintln!("{md}");
            if write {
                update_section(&results, "scale", &md)?;
            }
        }
        Cmd::All(r) => {
            let res = overhead::run(&tools, o.quick, false, &run_dir).await?;
            std::fs::write(raw.join("overhead.json"), serde_json::to_vec_pretty(&res)?)?;
            if write {
                update_section(
                    &results,
                    "overhead",
                    &format!("{header}\n{}", overhead::markdown(&res)),
                )?;
            }
            do_overhead_bbr(&tools, o.quick, &run_dir, &raw, &results, &header, write).await?;
            let mut res = Vec::new();
            for n in [100, 1000] {
                res.push(scale::run(&tools, n, o.quick, &run_dir).await?);
            }
            std::fs::write(raw.join("scale.json"), serde_json::to_vec_pretty(&res)?)?;
            if write {
                update_section(
                    &results,
                    "scale",
                    &format!("{header}\n{}", scale::markdown_all(&res)),
                )?;
            }
            do_routing(&tools, r, o.quick, &run_dir, &repo, &header, write).await?;
        }
        Cmd::Chaos { only } => {
            let mut cfg = if o.quick {
                chaos::ChaosCfg::quick()
            } else {
                chaos::ChaosCfg::full()
            };
            cfg.only = only.clone().unwrap_or_default();
            let res = chaos::run(&tools, &cfg, &run_dir, |_| {}).await?;
            std::fs::write(raw.join("chaos.json"), serde_json::to_vec_pretty(&res)?)?;
            let md = format!("{header}\n{}", chaos::markdown(&res));
            eprintln!("{md}");
            if write {
                update_section(&results, "chaos", &md)?;
            }
            let failed: Vec<&str> = res
                .cases
                .iter()
                .filter(|c| !c.pass)
                .map(|c| c.name.as_str())
                .collect();
            anyhow::ensure!(failed.is_empty(), "chaos cases failed: {failed:?}");
        }
        Cmd::Soak { minutes } => {
            let cfg = soak::SoakCfg::new(*minutes);
            let res = soak::run(&tools, &cfg, &run_dir).await?;
            std::fs::write(raw.join("soak.json"), serde_json::to_vec_pretty(&res)?)?;
            let plot = "soak.svg";
            let md = format!("{header}\n{}", soak::markdown(&res, plot));
            eprintln!("{md}");
            if write {
                std::fs::write(repo.join("bench").join(plot), soak::plot(&res))?;
                update_section(&results, "soak", &md)?;
            } else {
                std::fs::write(run_dir.join(plot), soak::plot(&res))?;
            }
            ensure_verdicts("soak", &res.checks)?;
        }
        Cmd::Lora {
            setups,
            rates,
            duration,
        } => {
            let mut cfg = if o.quick {
                lora::LoraCfg::quick()?
            } else {
                lora::LoraCfg::full()?
            };
            if let Some(list) = setups {
                cfg.setups = list
                    .iter()
                    .map(|s| lora::Setup::parse(s))
                    .collect::<anyhow::Result<_>>()?;
            }
            if let Some(r) = rates {
                cfg.rates = r.clone();
            }
            if let Some(d) = duration {
                cfg.duration_s = *d;
            }
            let runs = lora::run(&tools, &cfg, &run_dir).await?;
            std::fs::write(
                raw.join("lora-shift.json"),
                serde_json::to_vec_pretty(&serde_json::json!({"cfg": cfg, "runs": runs}))?,
            )?;
            let md = format!("{header}\n{}", lora::markdown(&runs, &cfg));
            eprintln!("{md}");
            if write {
                update_section(&results, "lora-shift", &md)?;
            }
        }
        Cmd::Tenants {
            batch_ceiling,
            no_packing,
        } => {
            let mut cfg = if o.quick {
                tenants::TenantsCfg::quick()
            } else {
                tenants::TenantsCfg::full()
            };
            if let Some(c) = *batch_ceiling {
                anyhow::ensure!(
                    c > 0.0 && c <= 1.0,
                    "--batch-ceiling must be in (0, 1], got {c}"
                );
                cfg.batch_ceiling = c;
            }
            cfg.packing = !*no_packing;
            let res = tenants::run(&tools, &cfg, &run_dir).await?;
            std::fs::write(raw.join("tenants.json"), serde_json::to_vec_pretty(&res)?)?;
            let md = format!("{header}\n{}", tenants::markdown(&res));
            eprintln!("{md}");
            if write {
                update_section(&results, "tenants", &md)?;
            }
            ensure_verdicts("tenants", &res.checks)?;
        }
        Cmd::ActiveActive(a) => {
            let cfg = active_active_cfg(a, o.quick)?;
            let json = raw.join("active-active.json");
            let mut so_far = Vec::new();
            let began = std::time::Instant::now();
            let runs = active_active::run(&tools, &cfg, &run_dir, |r| {
                so_far.push(r.clone());
                let _ = std::fs::write(
                    &json,
                    serde_json::to_vec_pretty(&serde_json::json!({"cfg": cfg, "runs": so_far}))
                        .unwrap_or_default(),
                );
            })
            .await?;
            let heads = active_active::headlines(&runs, &cfg);
            let mut md = format!(
                "{header}
{} simulated replicas (`sim`, calibrated profile, `--stream-granularity {}`, test tokenizer, KV events on `tcp://127.0.0.(2+i):<port>`), {} (token counts are the goodput preset's divided by {:.2}, the test tokenizer's tokens per workload token, so the engines see the preset's prompt lengths); {} req/s Poisson, {} s of warm-up then {} s measured, cold cluster per run, {} round(s). Every EPP runs the precise profile (cost model + `precise-prefix-cache-scorer`, `discoverPods`, speculative entries{}){} on the same pool file; Envoy balances the ext_proc streams `LEAST_REQUEST`.{} Hit rate: the engines' `vllm:prefix_cache_hits_total` / `queries_total` over the measured window. Took {:.0} min.\n\n",
                cfg.replicas,
                cfg.stream_granularity,
                scenario::routing::describe(&cfg.workload),
                scenario::precise::TEST_TOKENIZER_TOKENS_PER_TOKEN,
                cfg.rate,
                cfg.warmup_s,
                cfg.duration_s,
                cfg.repeats,
                if cfg.speculative_peers {
                    ", shared between the EPPs: `speculativePeers`"
                } else {
                    ", each EPP's own"
                },
                if cfg.epp_args.is_empty() {
                    String::new()
                } else {
                    format!(" with `{}`", cfg.epp_args.join(" "))
                },
                if cfg.watching_controls {
                    " `1 + k watching`: one EPP routes while k more run beside it doing everything but route (scrape every engine, apply every KV event and peer message), i.e. the processes of k + 1 EPPs on this shared machine with the routing of one."
                } else {
                    ""
                },
                began.elapsed().as_secs_f64() / 60.0,
            );
            for h in &heads {
                md.push_str(&format!("- {h}\n"));
            }
            md.push('\n');
            md.push_str(&active_active::markdown(&runs, &cfg));
            eprintln!("{md}");
            if write {
                update_section(&results, "active-active", &md)?;
            }
        }
        Cmd::PathCpu(p) => {
            use scenario::path_cpu::{self, PathCpuCfg, Setup};
            let mut cfg = if o.quick {
                PathCpuCfg::quick()
            } else {
                PathCpuCfg::full()
            };
            if !p.setups.is_empty() {
                cfg.setups = p
                    .setups
                    .iter()
                    .map(|n| Setup::from_name(n))
                    .collect::<anyhow::Result<_>>()?;
            }
            cfg.epp_args = p.epp_args.clone();
            let runs = path_cpu::run(&tools, &cfg, &run_dir).await?;
            std::fs::write(
                raw.join("path-cpu.json"),
                serde_json::to_vec_pretty(&serde_json::json!({"cfg": cfg, "runs": runs}))?,
            )?;
            let md = format!("{header}\n{}", path_cpu::markdown(&runs, &cfg));
            eprintln!("{md}");
            if write {
                update_section(&results, "path-cpu", &md)?;
            }
        }
        Cmd::Backend { .. }
        | Cmd::Replot { .. }
        | Cmd::SoakReplot { .. }
        | Cmd::GoodputReport { .. } => {}
    }
    Ok(())
}

/// The routing presets: the full sweep, or `--quick`.
/// Fails naming every verdict of `scenario` that did not pass.
fn ensure_verdicts(scenario: &str, checks: &[(String, bool)]) -> anyhow::Result<()> {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.1)
        .map(|c| c.0.as_str())
        .collect();
    anyhow::ensure!(failed.is_empty(), "{scenario} verdicts failed: {failed:?}");
    Ok(())
}

fn routing_cfg(r: &RoutingOpts, quick: bool) -> anyhow::Result<RoutingCfg> {
    let parse = |names: &[&str]| -> anyhow::Result<Vec<Router>> {
        names.iter().map(|s| Router::parse(s)).collect()
    };
    // The quick sweep keeps what the headline needs: round-robin, Switchyard's default and
    // recommended profiles, and each peer's cache-aware policy (their best).
    let routers = match &r.routers {
        Some(list) => list
            .iter()
            .map(|s| Router::parse(s))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None if quick => parse(&[
            "rr",
            "switchyard",
            "switchyard-balanced",
            "sglang:cache_aware",
            "vllm:cache_aware",
        ])?,
        None => parse(&[
            "rr",
            "lr",
            "switchyard",
            "switchyard-balanced",
            "switchyard-prefix",
            "sglang:cache_aware",
            "sglang:power_of_two",
            "vllm:cache_aware",
            "vllm:power_of_two",
        ])?,
    };
    // `mixed` has no shared prefixes and `lora` is about adapter placement: the load-only
    // baselines, Switchyard's profiles that matter there and the peers' cache-aware policy.
    let short_list = |k: Kind| -> anyhow::Result<Vec<Router>> {
        if r.routers.is_some() {
            return Ok(Vec::new());
        }
        match k {
            Kind::Mixed => parse(&[
                "rr",
                "lr",
                "switchyard",
                "switchyard-balanced",
                "sglang:cache_aware",
                "vllm:cache_aware",
            ]),
            Kind::Lora => parse(&[
                "rr",
                "lr",
                "switchyard",
                "switchyard-balanced",
                "switchyard-lora",
                "sglang:cache_aware",
                "vllm:cache_aware",
            ]),
            _ => Ok(Vec::new()),
        }
    };
    let workloads = r.workloads.clone().unwrap_or_else(|| {
        if quick {
            vec![Kind::SharedPrefix, Kind::MultiTurn]
        } else {
            vec![Kind::SharedPrefix, Kind::MultiTurn, Kind::Mixed, Kind::Lora]
        }
    });
    let sweeps = workloads
        .into_iter()
        .map(|k| {
            let mut workload = preset_workload(k);
            if let Some(v) = r.groups {
                workload.groups = v;
            }
            if let Some(v) = r.system_tokens {
                workload.system_tokens = v;
            }
            if let Some(v) = r.question_tokens {
                workload.question_tokens = v;
            }
            if let Some(v) = r.users {
                workload.users = v;
            }
            if let Some(v) = r.user_system_tokens {
                workload.user_system_tokens = v;
            }
            if let Some(v) = r.output_tokens {
                workload.output_tokens = v;
            }
            let preset: Vec<f64> = match (k, quick) {
                (Kind::SharedPrefix, true) => vec![12.0, 18.0],
                (Kind::SharedPrefix, false) => vec![6.0, 12.0, 18.0, 24.0],
                (Kind::MultiTurn, true) => vec![40.0, 60.0],
                (Kind::MultiTurn, false) => vec![20.0, 40.0, 60.0, 80.0],
                (_, true) => vec![10.0, 20.0],
                (_, false) => vec![10.0, 20.0, 30.0],
            };
            Ok(Sweep {
                workload,
                rates: r.rates.clone().unwrap_or(preset),
                routers: short_list(k)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(RoutingCfg {
        replicas: 8,
        stream_granularity: 16,
        duration_s: r.duration.unwrap_or(if quick { 10.0 } else { 20.0 }),
        drain_s: if quick { 15.0 } else { 30.0 },
        routers,
        sweeps,
    })
}

/// The routing sweep's workload shapes (see RESULTS.md for why they are scaled as they are).
fn preset_workload(k: Kind) -> WorkloadArgs {
    let mut w = WorkloadArgs {
        workload: k,
        ..WorkloadArgs::default()
    };
    if k == Kind::SharedPrefix {
        w.groups = 32;
        w.system_tokens = 16_000;
        w.question_tokens = 1200;
    }
    w
}

async fn do_routing(
    tools: &Tools,
    r: &RoutingOpts,
    quick: bool,
    run_dir: &std::path::Path,
    repo: &std::path::Path,
    header: &str,
    write: bool,
) -> anyhow::Result<()> {
    let cfg = routing_cfg(r, quick)?;
    // With --no-results the committed raw numbers stay as they are too.
    let raw = if write {
        repo.join("bench/results/routing.json")
    } else {
        run_dir.join("routing.json")
    };
    let mut so_far = Vec::new();
    let runs = routing::run(tools, &cfg, run_dir, |run| {
        // Saved after every run, so an interrupted sweep keeps what it measured.
        so_far.push(run.clone());
        let _ = std::fs::write(
            &raw,
            serde_json::to_vec_pretty(&serde_json::json!({"cfg": cfg, "runs": so_far}))
                .unwrap_or_default(),
        );
    })
    .await?;
    let mut md = format!(
        "{header}\n{} simulated replicas (`sim`, default calibrated profile, `--stream-granularity {}`), \
         cold caches for every run (simulator and router restarted), Poisson arrivals for {} s per run, \
         requests still running {} s after the last arrival are cut and counted as errors.\n\n",
        cfg.replicas, cfg.stream_granularity, cfg.duration_s, cfg.drain_s
    );
    let heads = routing::headlines(&runs, &cfg);
    if !heads.is_empty() {
        md.push_str("Headline (highest rate of each sweep):\n\n");
        for h in &heads {
            md.push_str(&format!("- {h}\n"));
        }
        md.push('\n');
    }
    for (file, _) in routing::plots(&runs, &cfg) {
        md.push_str(&format!("![{file}]({file})\n\n"));
    }
    md.push_str(&routing::markdown(&runs, &cfg));
    eprintln!("{md}");
    if write {
        for (file, svg) in routing::plots(&runs, &cfg) {
            std::fs::write(repo.join("bench").join(file), svg)?;
        }
        update_section(&repo.join("bench/RESULTS.md"), "routing", &md)?;
    }
    Ok(())
}

/// `overhead --bbr`: the body-based router's hop, into RESULTS.md's `overhead-bbr` section.
async fn do_overhead_bbr(
    tools: &Tools,
    quick: bool,
    run_dir: &std::path::Path,
    raw: &std::path::Path,
    results: &std::path::Path,
    header: &str,
    write: bool,
) -> anyhow::Result<()> {
    let res = overhead::run_bbr(tools, quick, run_dir).await?;
    std::fs::write(
        raw.join("overhead-bbr.json"),
        serde_json::to_vec_pretty(&res)?,
    )?;
    let md = format!("{header}\n{}", overhead::markdown_bbr(&res));
    eprintln!("{md}");
    if write {
        update_section(results, "overhead-bbr", &md)?;
    }
    Ok(())
}

/// The goodput presets: the five workloads, each with rungs ×1.25 apart around where the
/// routers' knees were found (see RESULTS.md), and the routers of issue 13 (`switchyard` is the
/// unconfigured default, `cost-model.yaml`, so `switchyard-cost` would run it twice).
fn goodput_cfg(g: &GoodputOpts, quick: bool) -> anyhow::Result<GoodputCfg> {
    let names = [
        "switchyard",
        "switchyard-balanced",
        "sglang:cache_aware",
        "vllm:cache_aware",
        "smg",
    ];
    let routers = match &g.routers {
        Some(list) => list
            .iter()
            .map(|s| Router::parse(s))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => names
            .iter()
            .map(|s| Router::parse(s))
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    let workloads = g.workloads.clone().unwrap_or_else(|| {
        vec![
            Kind::SharedPrefix,
            Kind::MultiTurn,
            Kind::HotSpot,
            Kind::CachePressure,
            Kind::Mixed,
        ]
    });
    let ladders = workloads
        .into_iter()
        .map(|k| {
            let (mut workload, gpu_blocks, preset) = goodput_preset(k);
            let tiers =
                ((k == Kind::KvSharing && !g.no_tiers) || g.tiers).then_some(KV_SHARING_TIERS);
            let ratio = if routers.iter().any(Router::needs_engine_events) {
                scenario::precise::TEST_TOKENIZER_TOKENS_PER_TOKEN
            } else {
                1.0
            };
            // The engines' prompt lengths as in the preset, whatever their tokenizer.
            workload = workload.scaled_prompts(1.0 / ratio);
            let given = g
                .ladder
                .iter()
                .find(|(w, _)| *w == k)
                .map(|(_, r)| r.clone());
            let mut rates = given.clone().or(g.rates.clone()).unwrap_or(preset);
            if g.rates.is_none() && given.is_none() {
                rates = rates.into_iter().skip(g.skip_rungs).collect();
                if let Some(m) = g.max_rungs {
                    rates.truncate(m);
                }
            }
            anyhow::ensure!(!rates.is_empty(), "no rungs left for {}", k.as_str());
            let mut ladder = Ladder {
                workload: workload.clone(),
                gpu_blocks,
                rates,
                tiers,
                sim_args: g.sim_args.clone(),
                engine_tokens_per_token: ratio,
            };
            if k == Kind::KvSharing {
                // Sized from the tiers as configured (with them off, still from the contract's
                // tiers: the same prefixes, now past what the cluster holds).
                let sized = Ladder {
                    tiers: Some(KV_SHARING_TIERS),
                    ..ladder.clone()
                };
                workload.groups = goodput::kv_sharing_groups(
                    sized.cluster_kv_tokens(REPLICAS),
                    sized.cluster_all_tiers_tokens(REPLICAS),
                    workload.system_tokens,
                    ratio,
                );
                ladder.workload = workload;
            }
            Ok(ladder)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(GoodputCfg {
        replicas: REPLICAS,
        stream_granularity: 16,
        warmup_s: if quick { 5.0 } else { g.warmup },
        step_s: if quick { 15.0 } else { g.step },
        grace_s: 2.0,
        drain_s: 20.0,
        ttft_slo_ms: 1000.0,
        bisect: g.bisect,
        routers,
        ladders,
    })
}

/// The active-active preset: the goodput preset of the workload, at ≈ 75 % of the precise
/// router's capacity on it; `--quick`: shorter.
fn active_active_cfg(
    a: &ActiveActiveOpts,
    quick: bool,
) -> anyhow::Result<active_active::ActiveActiveCfg> {
    anyhow::ensure!(
        !a.epps.is_empty() && a.epps.iter().all(|n| (1..=16).contains(n)),
        "--epps: 1 to 16 each"
    );
    let (workload, gpu_blocks, _) = goodput_preset(a.workload);
    // The preset's prompt lengths in engine tokens (the engines use the test tokenizer).
    let workload =
        workload.scaled_prompts(1.0 / scenario::precise::TEST_TOKENIZER_TOKENS_PER_TOKEN);
    Ok(active_active::ActiveActiveCfg {
        replicas: REPLICAS,
        stream_granularity: 16,
        gpu_blocks,
        workload,
        rate: a.rate.unwrap_or(ACTIVE_ACTIVE_RATE),
        warmup_s: a.warmup.unwrap_or(if quick { 10.0 } else { 20.0 }),
        duration_s: a.duration.unwrap_or(if quick { 30.0 } else { 90.0 }),
        drain_s: 20.0,
        epps: a.epps.clone(),
        repeats: a.repeats.unwrap_or(1).max(1),
        epp_args: a.epp_args.clone(),
        speculative_peers: !a.no_speculative_peers,
        watching_controls: a.controls,
    })
}

/// ≈ 75 % of the precise router's capacity on the `shared-prefix` goodput preset with the test
/// tokenizer (see RESULTS.md, active-active).
const ACTIVE_ACTIVE_RATE: f64 = 20.0;

/// Simulated replicas of the goodput runs.
const REPLICAS: usize = 8;

/// `kv-sharing`'s tiers: per replica a CPU tier twice its GPU tier (8,192 blocks, below), one
/// shared store of 65,536 blocks (1 M tokens; 137 GB at the contract's 131,072 bytes a token).
const KV_SHARING_TIERS: goodput::Tiers = goodput::Tiers {
    cpu_kv_blocks: 16_384,
    shared_kv_blocks: 65_536,
};

/// `hot-spot=31,39,49` → (HotSpot, [31, 39, 49]).
fn parse_ladder(s: &str) -> Result<(Kind, Vec<f64>), String> {
    use clap::ValueEnum;
    let (w, rates) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected <workload>=<rate>,<rate>,…"))?;
    let kind = Kind::from_str(w, false)?;
    let rates = rates
        .split(',')
        .map(|r| r.trim().parse::<f64>().map_err(|e| format!("{r:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if rates.is_empty() || rates.windows(2).any(|w| w[0] >= w[1]) || rates[0] <= 0.0 {
        return Err(format!("{s:?}: rates must be positive and increasing"));
    }
    Ok((kind, rates))
}

/// Per workload: its shape, the simulator's KV blocks (None: sim's default) and the rungs.
/// The shapes are heavier than the routing sweep's, whose knees (in steady state, caches warm)
/// lie past what this 2-core machine can drive: here every workload's knee falls between
/// 20 and 60 req/s (see RESULTS.md).
fn goodput_preset(k: Kind) -> (WorkloadArgs, Option<usize>, Vec<f64>) {
    let mut w = preset_workload(k);
    // Rungs 1.25× apart from 16 req/s: 16, 20, 25, 31, 39, 49, 61.
    let ladder: Vec<f64> = (0..7).map(|i| (16.0 * 1.25f64.powi(i)).round()).collect();
    match k {
        Kind::SharedPrefix => {
            // 32 groups × 16,000-token system prompts, 3,000-token questions.
            w.question_tokens = 3000;
            (w, None, ladder)
        }
        Kind::MultiTurn => {
            // 8,000-token system prompts, 1,000-token turns and replies.
            w.user_system_tokens = 8000;
            w.turn_tokens = 1000;
            w.reply_tokens = 1000;
            (w, None, ladder)
        }
        Kind::HotSpot => {
            // 64 groups, Zipf(1.5): the top group takes ≈ 42 % of requests, the top 3 ≈ 65 %.
            w.groups = 64;
            w.prefix_zipf = 1.5;
            w.system_tokens = 8000;
            w.question_tokens = 3000;
            (w, None, ladder)
        }
        Kind::CachePressure => {
            // 224 × 8,000 = 1.79M prefix tokens against 8 × 8,192 × 16 = 1.05M of KV (1.71×).
            w.groups = 224;
            w.system_tokens = 8000;
            w.question_tokens = 400;
            (w, Some(8192), ladder)
        }
        Kind::KvSharing => {
            // 8,000-token prefixes (the group count is sized from the tiers), 400-token
            // questions; the cache-pressure cluster's GPU tier (8 × 8,192 blocks).
            w.system_tokens = 8000;
            w.question_tokens = 400;
            (w, Some(8192), ladder)
        }
        Kind::Mixed => {
            // Prompts of median 3,000 tokens (σ 0.9), outputs of median 128.
            w.prompt_median = 3000.0;
            (w, None, ladder)
        }
        _ => (w, None, ladder),
    }
}

async fn do_goodput(
    tools: &Tools,
    g: &GoodputOpts,
    quick: bool,
    run_dir: &std::path::Path,
    repo: &std::path::Path,
    header: &str,
    write: bool,
) -> anyhow::Result<()> {
    let cfg = goodput_cfg(g, quick)?;
    let (max, typical) = cfg.estimate_s();
    eprintln!(
        "goodput: {} workloads × {} routers, warm-up {} s, {} s per rung{}; estimate ≈ {:.0} min (at most {:.0} min)",
        cfg.ladders.len(),
        cfg.routers.len(),
        cfg.warmup_s,
        cfg.step_s,
        if cfg.bisect {
            ", one bisection point"
        } else {
            ""
        },
        typical / 60.0,
        max / 60.0
    );
    for l in &cfg.ladders {
        eprintln!("  {}", goodput::describe(l, cfg.replicas));
    }
    if g.estimate {
        return Ok(());
    }
    let raw = if write {
        repo.join("bench/results")
            .join(goodput_raw_name(&g.section))
    } else {
        run_dir.join("goodput.json")
    };
    let began = std::time::Instant::now();
    let mut so_far = Vec::new();
    let runs = goodput::run(tools, &cfg, run_dir, |run| {
        so_far.push(run.clone());
        let _ = std::fs::write(
            &raw,
            serde_json::to_vec_pretty(&serde_json::json!({"cfg": cfg, "runs": so_far}))
                .unwrap_or_default(),
        );
    })
    .await?;
    let md = format!(
        "{header}\n{} simulated replicas (`sim`, calibrated profile, `--stream-granularity {}`); per (workload, router) one cold start, {} s of warm-up at the first rung's rate, then {} s measured per rung, rungs climbed without a restart until one fails (TTFT p90 > {:.0} ms or any error){}; requests still running {} s after the last arrival are cut and counted as errors. Took {:.0} min.\n\n{}",
        cfg.replicas,
        cfg.stream_granularity,
        cfg.warmup_s,
        cfg.step_s,
        cfg.ttft_slo_ms,
        if cfg.bisect {
            ", then one fresh bisection run"
        } else {
            ""
        },
        cfg.drain_s,
        began.elapsed().as_secs_f64() / 60.0,
        goodput::markdown(&runs, &cfg)
    );
    eprintln!("{md}");
    if write {
        update_section(&repo.join("bench/RESULTS.md"), &g.section, &md)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_goodput_section_names_a_results_section_and_its_raw_file() {
        assert_eq!(
            parse_section("cache-pressure-tiers").as_deref(),
            Ok("cache-pressure-tiers")
        );
        for bad in ["", "Goodput", "../x", "a b", &"x".repeat(65)] {
            assert!(parse_section(bad).is_err(), "{bad:?}");
        }
        assert_eq!(goodput_raw_name("goodput"), "goodput.json");
        assert_eq!(goodput_raw_name("kv-sharing"), "goodput-kv-sharing.json");
    }

    #[test]
    fn goodput_takes_the_tiers_and_a_section() {
        let o = Opts::try_parse_from([
            "scenario",
            "goodput",
            "--workloads",
            "cache-pressure",
            "--tiers",
            "--section",
            "cache-pressure-tiers",
        ])
        .expect("parses");
        let Cmd::Goodput(g) = o.cmd else {
            panic!("not goodput")
        };
        assert!(g.tiers && !g.no_tiers);
        assert_eq!(g.section, "cache-pressure-tiers");
        assert!(
            Opts::try_parse_from(["scenario", "goodput", "--tiers", "--no-tiers"]).is_err(),
            "contradictory"
        );
    }
}
