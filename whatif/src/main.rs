//! `whatif`: replay a trace or a bench workload against routing configs in virtual time and
//! compare them (README, "What-if").

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bench::workload::WorkloadArgs;
use clap::Parser;
use endpoint_picker::config::profiles::{BALANCED_PREFIX, COST_MODEL, REFERENCE_DEFAULT};
use whatif::replay::{self, Autoscale, KvEventFeed, ReplayCfg, ScaleMetric, ScrapePath};
use whatif::report::{self, Slo};
use whatif::trace;

/// mimalloc rather than glibc's malloc: a tenth less CPU for a replay at hundreds of replicas,
/// which allocates and frees millions of small objects (candidates, events, tasks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "whatif",
    about = "Replay traffic against routing configs in virtual time"
)]
struct Args {
    /// A routing config to compare: `balanced` (what `epp` runs given no config),
    /// `reference-default`, `cost-model` (the shipped profiles), `precise` (`balanced` with
    /// `precise-prefix-cache-scorer` fed by the engines' KV events) or `NAME=PATH` (an
    /// EndpointPickerConfig file). Repeat to compare several.
    #[arg(long = "config", default_values_t = ["balanced".to_owned()])]
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
    /// Workload rates, requests per second (when no trace is given): each config runs at each
    /// rate, and the report ends with each config's goodput (the highest rate, climbing, before
    /// the first whose TTFT p90 exceeds the TTFT objective or that has errors).
    #[arg(long, value_delimiter = ',', default_values_t = [20.0])]
    rates: Vec<f64>,
    /// A workload whose rate changes: `SECOND:RATE,SECOND:RATE,…` from 0 (e.g. `0:8,300:24,900:8`
    /// for a surge), instead of `--rates`.
    #[arg(long, conflicts_with = "rates")]
    rate_schedule: Option<String>,
    /// Scales the offered load: arrivals come this many times faster (1.2 = 20 % more traffic
    /// over the same trace).
    #[arg(long, default_value_t = 1.0)]
    load_factor: f64,
    /// Workload duration, seconds (when no trace is given).
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    /// Requests arriving before this many seconds are replayed but not counted.
    #[arg(long, default_value_t = 15.0)]
    warmup: f64,
    /// The EPP's scrape interval, ms.
    #[arg(long, default_value_t = 50)]
    scrape_interval_ms: u64,
    /// How the EPP reads engines: `text` (their Prometheus text through the EPP's mapping, as
    /// in production) or `direct` (the same values without the text: for hundreds of replicas).
    #[arg(long, default_value = "text", value_parser = ["text", "direct"])]
    scrape_path: String,
    /// How old a scrape is when the EPP reads it, ms.
    #[arg(long, default_value_t = 0)]
    scrape_latency_ms: u64,
    /// For configs with `precise-prefix-cache-scorer`: from the end of the engine step that made
    /// a batch of KV events to the EPP's index applying it, ms.
    #[arg(long, default_value_t = 5.0)]
    kv_event_lag_ms: f64,
    /// Share of KV-event batches lost on the way (0–1; a ZMQ subscriber past its high-water
    /// mark): the EPP sees a gap, clears the endpoint and scores it from the approximate index
    /// for 30 s. Seeded by `--replay-seed`.
    #[arg(long, default_value_t = 0.0)]
    kv_event_drop: f64,
    /// Threads stepping the engines, the replay's own included. The result is the same for
    /// any number. A helper spins between instants: worth it only with a core to spare (on a
    /// shared machine 2 threads were 1.7× slower than 1).
    #[arg(long, default_value_t = 1)]
    step_threads: usize,
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
    /// EPP replicas routing the pool (active-active): each its own in-flight counts, index,
    /// seed and scrape clock (staggered), all hearing every engine's KV events; requests go to
    /// the one with fewer active requests of two drawn at random (Envoy's `LEAST_REQUEST`).
    #[arg(long, default_value_t = 1)]
    epps: usize,
    /// With several EPPs: share each EPP's speculative entries with the others, made in their
    /// indexes this many ms after the decision (the network between EPPs). Not given: each
    /// EPP's own.
    #[arg(long)]
    share_speculation_ms: Option<f64>,
    /// TTFT objective for requests that name none, ms.
    #[arg(long, default_value_t = 1000.0)]
    slo_ttft_ms: f64,
    /// TPOT objective for requests that name none, ms (not checked when absent).
    #[arg(long)]
    slo_tpot_ms: Option<f64>,
    /// A scaling policy to compare: `static` (keep `--replicas`) or `METRIC:TARGET` with METRIC
    /// `kv` (average KV-cache utilization, 0–1), `queue` (average waiting requests) or
    /// `inflight` (the EPP's requests in flight per replica). Repeat to compare several; each
    /// runs with every config. `--replicas` is where an autoscaled pool starts.
    #[arg(long = "policy", default_values_t = ["static".to_owned()])]
    policies: Vec<String>,
    /// Autoscaling: fewest replicas.
    #[arg(long, default_value_t = 1)]
    min_replicas: usize,
    /// Autoscaling: most replicas.
    #[arg(long, default_value_t = 64)]
    max_replicas: usize,
    /// Autoscaling: seconds from the decision to a new replica serving (image pull, model load).
    #[arg(long, default_value_t = 60.0)]
    cold_start_s: f64,
    /// Autoscaling: seconds between decisions (the HPA's sync period).
    #[arg(long, default_value_t = 15.0)]
    scale_period_s: f64,
    /// Autoscaling: seconds a lower recommendation must hold before replicas are removed (the
    /// HPA's scale-down stabilization window).
    #[arg(long, default_value_t = 300.0)]
    scale_down_window_s: f64,
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
        "reference-default" => ("reference-default".into(), REFERENCE_DEFAULT.into()),
        "balanced" => ("balanced".into(), BALANCED_PREFIX.into()),
        "cost-model" => ("cost-model".into(), COST_MODEL.into()),
        "precise" => ("precise".into(), whatif::PRECISE_PROFILE.into()),
        other => {
            let (name, path) = other.split_once('=').with_context(|| {
                format!(
                    "--config {other}: expected balanced, reference-default, cost-model, precise \
                     or NAME=PATH"
                )
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
        rates,
        rate_schedule,
        load_factor,
        duration,
        warmup,
        scrape_interval_ms,
        scrape_latency_ms,
        scrape_path,
        kv_event_lag_ms,
        kv_event_drop,
        step_threads,
        kv_blocks,
        max_num_seqs,
        max_loras,
        replay_seed,
        epps,
        share_speculation_ms,
        slo_ttft_ms,
        slo_tpot_ms,
        policies,
        min_replicas,
        max_replicas,
        cold_start_s,
        scale_period_s,
        scale_down_window_s,
        json,
        svg,
        workload,
    } = Args::parse();
    let seconds = |name: &str, v: f64| {
        anyhow::ensure!(v.is_finite() && v >= 0.0, "--{name} must be ≥ 0");
        Ok(Duration::from_secs_f64(v))
    };
    let (cold_start, period, window) = (
        seconds("cold-start-s", cold_start_s)?,
        seconds("scale-period-s", scale_period_s)?,
        seconds("scale-down-window-s", scale_down_window_s)?,
    );
    let policies = policies
        .iter()
        .map(|p| -> anyhow::Result<(String, Option<Autoscale>)> {
            if p == "static" {
                return Ok((p.clone(), None));
            }
            let (metric, target) = p
                .split_once(':')
                .with_context(|| format!("--policy {p}: expected static or METRIC:TARGET"))?;
            let metric = match metric {
                "kv" => ScaleMetric::KvCache,
                "queue" => ScaleMetric::Queue,
                "inflight" => ScaleMetric::InFlight,
                other => {
                    anyhow::bail!("--policy {p}: unknown metric {other} (kv, queue, inflight)")
                }
            };
            let target: f64 = target
                .parse()
                .ok()
                .filter(|t: &f64| t.is_finite() && *t > 0.0)
                .with_context(|| format!("--policy {p}: the target must be a positive number"))?;
            anyhow::ensure!(
                min_replicas >= 1 && min_replicas <= max_replicas,
                "--min-replicas must be ≥ 1 and ≤ --max-replicas"
            );
            anyhow::ensure!(!period.is_zero(), "--scale-period-s must be positive");
            Ok((
                p.clone(),
                Some(Autoscale {
                    metric,
                    target,
                    min: min_replicas,
                    max: max_replicas,
                    period,
                    cold_start,
                    scale_down_window: window,
                }),
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(
        kv_event_lag_ms.is_finite() && kv_event_lag_ms >= 0.0,
        "--kv-event-lag-ms must be ≥ 0"
    );
    anyhow::ensure!(
        kv_event_drop.is_finite() && (0.0..=1.0).contains(&kv_event_drop),
        "--kv-event-drop must be 0 to 1"
    );
    let share_speculation = share_speculation_ms
        .map(|ms| {
            anyhow::ensure!(
                ms.is_finite() && ms >= 0.0,
                "--share-speculation-ms must be ≥ 0"
            );
            Ok(Duration::from_secs_f64(ms / 1e3))
        })
        .transpose()?;
    let kv_events = KvEventFeed {
        lag: Duration::from_secs_f64(kv_event_lag_ms / 1e3),
        drop_rate: kv_event_drop,
    };
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
    anyhow::ensure!(
        load_factor.is_finite() && load_factor > 0.0,
        "--load-factor must be positive"
    );
    anyhow::ensure!(
        rates.windows(2).all(|w| w[0] < w[1]),
        "--rates must be increasing"
    );
    let schedule = rate_schedule
        .map(|text| {
            text.split(',')
                .map(|part| {
                    let (t, r) = part
                        .split_once(':')
                        .with_context(|| format!("--rate-schedule {part}: expected SECOND:RATE"))?;
                    Ok((t.trim().parse::<f64>()?, r.trim().parse::<f64>()?))
                })
                .collect::<anyhow::Result<Vec<(f64, f64)>>>()
        })
        .transpose()?;
    let from_file = trace_file.is_some() || azure.is_some() || mooncake.is_some();
    anyhow::ensure!(
        !from_file || rates.len() == 1,
        "--rates is for workloads; scale a trace with --load-factor"
    );
    let engine = sim::Config {
        num_gpu_blocks: kv_blocks,
        max_num_seqs,
        max_loras,
        lora_modules: workload.adapter_names(),
        seed: replay_seed,
        // Only the first token's time and the end are read: one event per 64 tokens instead of
        // one per token (a fifth of a replay's CPU at hundreds of replicas; same timings).
        stream_granularity: 64,
        ..sim::Config::default()
    };
    let slo = Slo {
        ttft: slo_ttft_ms / 1e3,
        tpot: slo_tpot_ms.map(|t| t / 1e3),
    };
    let one_policy = policies.len() == 1;
    let mut configs_by_policy = Vec::new();
    for (name, config) in configs
        .iter()
        .map(|spec| config_text(spec))
        .collect::<anyhow::Result<Vec<_>>>()?
    {
        if let Ok(loaded) = endpoint_picker::config::load(&config, replay_seed)
            && !loaded.precise_producers.is_empty()
            && !matches!(
                loaded.token_producer.as_ref().map(|t| &t.backend),
                Some(endpoint_picker::tokens::Backend::Local(_))
            )
        {
            eprintln!(
                "whatif: {name}: precise-prefix-cache-scorer without a `local` token-producer: \
                 as in the EPP, requests carry no token ids and every endpoint is scored from \
                 the approximate index"
            );
        }
        for (policy, autoscale) in &policies {
            let label = if one_policy && autoscale.is_none() {
                name.clone()
            } else {
                format!("{name} · {policy}")
            };
            configs_by_policy.push((label, config.clone(), *autoscale));
        }
    }
    let configs = configs_by_policy;
    let mut stdout = std::io::stdout().lock();
    let mut runs = Vec::new();
    let mut summaries = Vec::new();
    // Per config: the goodput so far and whether a rate has failed.
    let mut goodput: Vec<(Option<f64>, bool)> = vec![(None, false); configs.len()];
    for &rate in &rates {
        // A file is read once and held; a workload is made as each replay reaches it, so a
        // replay of any length holds only what is in flight.
        let file = match (&trace_file, &azure, &mooncake) {
            (Some(p), _, _) => Some(trace::from_jsonl(&read(p)?)?),
            (_, Some(p), _) => Some(trace::from_azure_csv(&read(p)?)?),
            (_, _, Some(p)) => Some(trace::from_mooncake(&read(p)?)?),
            _ => None,
        };
        let rate_schedule = schedule.clone().unwrap_or_else(|| vec![(0.0, rate)]);
        let requests =
            || -> anyhow::Result<Box<dyn Iterator<Item = trace::TraceRequest> + Send + '_>> {
                let scaled = move |mut r: trace::TraceRequest| {
                    r.at /= load_factor;
                    r
                };
                Ok(match &file {
                    Some(f) => Box::new(f.iter().cloned().map(scaled)),
                    None => {
                        Box::new(trace::arrivals(&workload, &rate_schedule, duration)?.map(scaled))
                    }
                })
            };
        match &file {
            Some(f) => eprintln!("whatif: {}", trace::describe(f)),
            None => eprintln!(
                "whatif: about {:.0} requests over {:.0} s",
                trace::arrivals(&workload, &rate_schedule, duration)?.expected,
                duration / load_factor
            ),
        }
        let mut at_rate = Vec::new();
        for (k, (name, config, autoscale)) in configs.iter().enumerate() {
            let cfg = ReplayCfg {
                name: name.clone(),
                config: config.clone(),
                replicas,
                engine: engine.clone(),
                scrape_interval: Duration::from_millis(scrape_interval_ms),
                scrape_latency: Duration::from_millis(scrape_latency_ms),
                seed: replay_seed,
                autoscale: *autoscale,
                scrape_path: if scrape_path == "direct" {
                    ScrapePath::Direct
                } else {
                    ScrapePath::Text
                },
                kv_events,
                step_threads,
                lazy_steps: true,
                epps,
                share_speculation,
            };
            let wall = std::time::Instant::now();
            let run = replay::run_stream(&cfg, requests()?)?;
            eprintln!(
                "whatif: {} replayed {:.0} virtual s in {:.1} s",
                cfg.name,
                run.virtual_seconds,
                wall.elapsed().as_secs_f64()
            );
            let summary = report::summarise(&run, warmup / load_factor, slo);
            let (best, failed) = &mut goodput[k];
            let ok =
                summary.errors == 0 && summary.ttft_ms.p90.is_some_and(|p| p <= slo.ttft * 1e3);
            if ok && !*failed {
                *best = Some(rate * load_factor);
            } else {
                *failed = true;
            }
            at_rate.push(summary);
            runs.push(run);
        }
        if !from_file {
            writeln!(stdout, "### {rate} req/s\n")?;
        }
        writeln!(stdout, "{}", report::markdown(&at_rate, slo))?;
        summaries.extend(at_rate);
    }
    if rates.len() > 1 {
        writeln!(
            stdout,
            "Goodput (highest rate, climbing, with TTFT p90 ≤ {:.0} ms and no errors):\n",
            slo.ttft * 1e3
        )?;
        for ((name, _, _), (best, _)) in configs.iter().zip(&goodput) {
            match best {
                Some(r) => writeln!(stdout, "- `{name}`: {r} req/s")?,
                None => writeln!(stdout, "- `{name}`: below {} req/s", rates[0])?,
            }
        }
    }
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
