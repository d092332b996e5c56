//! `whatif`: replay a trace or a bench workload against routing configs in virtual time and
//! compare them (README, "What-if").

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bench::workload::WorkloadArgs;
use clap::Parser;
use endpoint_picker::config::DEFAULT_CONFIG;
use endpoint_picker::config::profiles::{BALANCED_PREFIX, COST_MODEL};
use whatif::replay::{self, ReplayCfg};
use whatif::report::{self, Slo};
use whatif::trace;

#[derive(Debug, Parser)]
#[command(
    name = "whatif",
    about = "Replay traffic against routing configs in virtual time"
)]
struct Args {
    /// A routing config to compare: `default`, `balanced`, `cost-model` (the shipped
    /// profiles) or `NAME=PATH` (an EndpointPickerConfig file). Repeat to compare several.
    #[arg(long = "config", default_values_t = ["default".to_owned()])]
    configs: Vec<String>,
    /// Replicas in the pool.
    #[arg(long, default_value_t = 8)]
    replicas: usize,
    /// A trace in the project's JSONL format (instead of a workload).
    #[arg(long, conflicts_with_all = ["azure", "mooncake"])]
    trace: Option<PathBuf>,
    /// An Azure LLM inference trace CSV.
    #[arg(long, conflicts_with = "mooncake")]
    azure: Option<PathBuf>,
    /// A Mooncake trace JSONL.
    #[arg(long)]
    mooncake: Option<PathBuf>,
    /// Workload rate, requests per second (when no trace is given).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Workload duration, seconds (when no trace is given).
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    /// Requests arriving before this many seconds are replayed but not counted.
    #[arg(long, default_value_t = 15.0)]
    warmup: f64,
    /// The EPP's scrape interval, ms.
    #[arg(long, default_value_t = 50)]
    scrape_interval_ms: u64,
    /// How old a scrape is when the EPP reads it, ms.
    #[arg(long, default_value_t = 0)]
    scrape_latency_ms: u64,
    /// KV-cache blocks per replica (16 tokens each).
    #[arg(long, default_value_t = 27_000)]
    kv_blocks: usize,
    /// Most sequences in a replica's batch.
    #[arg(long, default_value_t = 1024)]
    max_num_seqs: usize,
    /// LoRA slots per replica (adapters of the `lora` workload are registered on every replica).
    #[arg(long, default_value_t = 4)]
    max_loras: usize,
    /// Seed of the scheduler and the engines.
    #[arg(long, default_value_t = 1)]
    replay_seed: u64,
    /// TTFT objective for requests that name none, ms.
    #[arg(long, default_value_t = 1000.0)]
    slo_ttft_ms: f64,
    /// TPOT objective for requests that name none, ms (not checked when absent).
    #[arg(long)]
    slo_tpot_ms: Option<f64>,
    /// Write every summary and outcome as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a TTFT-over-time SVG here.
    #[arg(long)]
    svg: Option<PathBuf>,
    #[command(flatten)]
    workload: WorkloadArgs,
}

fn config_text(spec: &str) -> anyhow::Result<(String, String)> {
    Ok(match spec {
        "default" => ("default".into(), DEFAULT_CONFIG.into()),
        "balanced" => ("balanced".into(), BALANCED_PREFIX.into()),
        "cost-model" => ("cost-model".into(), COST_MODEL.into()),
        other => {
            let (name, path) = other.split_once('=').with_context(|| {
                format!("--config {other}: expected default, balanced, cost-model or NAME=PATH")
            })?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--config {name}: reading {path}"))?;
            (name.to_owned(), text)
        }
    })
}

fn main() -> anyhow::Result<()> {
    let Args {
        configs,
        replicas,
        trace: trace_file,
        azure,
        mooncake,
        rate,
        duration,
        warmup,
        scrape_interval_ms,
        scrape_latency_ms,
        kv_blocks,
        max_num_seqs,
        max_loras,
        replay_seed,
        slo_ttft_ms,
        slo_tpot_ms,
        json,
        svg,
        workload,
    } = Args::parse();
    anyhow::ensure!(
        scrape_interval_ms > 0,
        "--scrape-interval-ms must be positive"
    );
    anyhow::ensure!(
        slo_ttft_ms > 0.0 && slo_tpot_ms.is_none_or(|t| t > 0.0),
        "SLOs must be positive"
    );
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let requests = match (&trace_file, &azure, &mooncake) {
        (Some(p), _, _) => trace::from_jsonl(&read(p)?)?,
        (_, Some(p), _) => trace::from_azure_csv(&read(p)?)?,
        (_, _, Some(p)) => trace::from_mooncake(&read(p)?)?,
        _ => trace::from_workload(&workload, rate, duration)?,
    };
    eprintln!("whatif: {}", trace::describe(&requests));
    let engine = sim::Config {
        num_gpu_blocks: kv_blocks,
        max_num_seqs,
        max_loras,
        lora_modules: workload.adapter_names(),
        seed: replay_seed,
        ..sim::Config::default()
    };
    let slo = Slo {
        ttft: slo_ttft_ms / 1e3,
        tpot: slo_tpot_ms.map(|t| t / 1e3),
    };
    let mut runs = Vec::new();
    let mut summaries = Vec::new();
    for spec in &configs {
        let (name, config) = config_text(spec)?;
        let cfg = ReplayCfg {
            name,
            config,
            replicas,
            engine: engine.clone(),
            scrape_interval: Duration::from_millis(scrape_interval_ms),
            scrape_latency: Duration::from_millis(scrape_latency_ms),
            seed: replay_seed,
        };
        let wall = std::time::Instant::now();
        let run = replay::run(&cfg, &requests)?;
        eprintln!(
            "whatif: {} replayed {:.0} virtual s in {:.1} s",
            cfg.name,
            run.virtual_seconds,
            wall.elapsed().as_secs_f64()
        );
        summaries.push(report::summarise(&run, warmup, slo));
        runs.push(run);
    }
    // The table is the command's output (stdout); progress went to stderr.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", report::markdown(&summaries, slo))?;
    if let Some(path) = json {
        let doc = serde_json::json!({"summaries": summaries, "runs": runs});
        std::fs::write(&path, serde_json::to_vec(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = svg {
        std::fs::write(&path, report::ttft_plot(&runs))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
