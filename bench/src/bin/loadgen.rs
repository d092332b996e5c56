//! `loadgen`: OpenAI streaming load at a Poisson rate or a fixed concurrency, for a duration or
//! a count, from a seeded workload; prints p50/p90/p99 and throughput, writes JSON.
//!
//! ```text
//! loadgen --url http://127.0.0.1:8081 --rate 20 --duration 30 --workload shared-prefix \
//!         --groups 150 --system-tokens 6000 --question-tokens 1200 --json out.json
//! ```

use anyhow::Context;
use bench::loadgen::{self, LoadSpec, Mode};
use bench::workload::WorkloadArgs;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "OpenAI streaming load generator (Poisson rate or fixed concurrency)")]
struct Opts {
    /// Base URL of the OpenAI API (Envoy, a router, or a replica).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Poisson arrivals at this many requests per second.
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Keep this many requests in flight.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds of issuing.
    #[arg(long)]
    duration: Option<f64>,
    /// Number of requests.
    #[arg(long)]
    count: Option<usize>,
    /// Cut requests still running this many seconds after issuing stops.
    #[arg(long, default_value_t = 60.0)]
    drain_timeout: f64,
    /// Seed of the arrival process.
    #[arg(long, default_value_t = 1)]
    arrival_seed: u64,
    /// Write the report (spec, summary, every request) as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    workload: WorkloadArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let mode = match (o.rate, o.concurrency) {
        (Some(r), _) => Mode::Rate(r),
        (None, Some(c)) => Mode::Concurrency(c),
        (None, None) => Mode::Concurrency(1),
    };
    let (duration_s, count) = match (o.duration, o.count) {
        (None, None) => (Some(30.0), None),
        d => d,
    };
    let spec = LoadSpec {
        url: o.url,
        mode,
        duration_s,
        count,
        drain_timeout_s: o.drain_timeout,
        seed: o.arrival_seed,
        progress: !o.quiet,
    };
    let report = loadgen::run(spec, o.workload.build()).await?;
    eprintln!("{}", report.summary.render());
    if let Some(path) = o.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}
