//! Drives one simulated engine with Poisson arrivals at several rates (on paused tokio time, so it
//! runs in seconds) and prints TTFT / ITL percentiles as a Markdown table — the table in
//! `sim/README.md`.
//!
//! ```text
//! cargo run --release -p sim --example load_table
//! cargo run --release -p sim --example load_table -- --input 2000 --output 200 --shared-prefix 1500
//! ```

// An example binary: printing is its output, panicking on a broken runtime is fine.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sim::engine::{EngineEvent, FinishReason, SubmitRequest};
use sim::{Config, Engine};
use tokio::time::Instant;

#[derive(Debug, Parser)]
struct Opts {
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 1024)]
    input: usize,
    /// Completion length in tokens.
    #[arg(long, default_value_t = 128)]
    output: usize,
    /// Leading prompt tokens shared by every request (a common system prompt).
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// Arrival rates to try, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,20,30,40,50")]
    rates: Vec<f64>,
    /// Simulated seconds of arrivals per rate.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
}

#[derive(Debug, Default)]
struct Row {
    ttft: Vec<Duration>,
    itl: Vec<Duration>,
    queue: Vec<Duration>,
    output_tokens: usize,
    cached: usize,
    prompt: usize,
    span: Duration,
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let idx = ((v.len() - 1) as f64 * p).round() as usize;
    v[idx].as_secs_f64() * 1e3
}

async fn run(opts: &Opts, rate: f64) -> Row {
    let engine = Engine::spawn(Arc::new(Config::default()), 0).unwrap();
    let mut rng = SmallRng::seed_from_u64(42);
    let n = (rate * opts.duration).round().max(1.0) as usize;
    let start = Instant::now();
    let mut at = start;
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / rate;
        at += Duration::from_secs_f64(gap);
        tokio::time::sleep_until(at).await;
        let mut prompt: Vec<u32> = (0..opts.shared_prefix as u32).collect();
        prompt.extend(
            (opts.shared_prefix..opts.input).map(|j| sim::tokenizer::sample(i as u64 + 1, j)),
        );
        let req = SubmitRequest {
            prompt,
            max_tokens: opts.output,
            lora: None,
            finish_reason: FinishReason::Length,
        };
        let mut rx = engine.submit(req).expect("request fits");
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                match rx.recv().await.expect("engine alive") {
                    EngineEvent::Tokens { ids, at, .. } => {
                        times.extend(std::iter::repeat_n(at, ids.len()))
                    }
                    EngineEvent::Finished(c) => return (times, c),
                }
            }
        }));
    }
    let mut row = Row::default();
    let mut end = start;
    for t in tasks {
        let (times, c) = t.await.expect("task");
        row.ttft.push(c.timing.ttft());
        row.queue.push(c.timing.queue_time());
        row.itl.extend(times.windows(2).map(|w| w[1] - w[0]));
        row.output_tokens += c.completion_tokens;
        row.cached += c.cached_tokens;
        row.prompt += c.prompt_tokens;
        end = end.max(c.timing.finished);
    }
    row.span = end - start;
    row
}

fn main() {
    let opts = Opts::parse();
    assert!(
        opts.shared_prefix < opts.input,
        "the shared prefix must be shorter than the prompt"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!(
        "input {} tokens ({} shared), output {} tokens, {} s of Poisson arrivals per rate, default profile\n",
        opts.input, opts.shared_prefix, opts.output, opts.duration
    );
    println!(
        "| rate (req/s) | TTFT p50 (ms) | TTFT p90 | TTFT p99 | ITL p50 (ms) | ITL p90 | ITL p99 | queue p90 (ms) | cached % | output tok/s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &rate in &opts.rates {
        let mut row = rt.block_on(run(&opts, rate));
        println!(
            "| {rate} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
            pct(&mut row.ttft, 0.5),
            pct(&mut row.ttft, 0.9),
            pct(&mut row.ttft, 0.99),
            pct(&mut row.itl, 0.5),
            pct(&mut row.itl, 0.9),
            pct(&mut row.itl, 0.99),
            pct(&mut row.queue, 0.9),
            100.0 * row.cached as f64 / row.prompt.max(1) as f64,
            row.output_tokens as f64 / row.span.as_secs_f64(),
        );
    }
}
