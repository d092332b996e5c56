//! A small open-loop HTTP load generator for a running `sim` (or any OpenAI-compatible server):
//! Poisson arrivals of streaming completions spread round-robin over `--replicas` ports, reporting
//! client-side TTFT and throughput. Used to measure what the simulator itself costs in CPU.
//!
//! ```text
//! cargo run --release -p sim -- --replicas 16 --port 18000 --host 127.0.0.1 &
//! cargo run --release -p sim --example http_load -- --port 18000 --replicas 16 --rate 50 --duration 20
//! ```

// An example binary: printing is its output, panicking on a broken setup is fine.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Parser)]
struct Opts {
    /// First port of the replicas.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Number of replicas (ports port..port+replicas-1).
    #[arg(long, default_value_t = 1)]
    replicas: u16,
    /// Requests per second over all replicas.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of arrivals.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Prompt length in words (~1.3 tokens each).
    #[arg(long, default_value_t = 500)]
    words: usize,
    /// Completion tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
}

#[tokio::main]
async fn main() {
    let opts = Opts::parse();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut rng = SmallRng::seed_from_u64(1);
    let n = (opts.rate * opts.duration).round() as usize;
    let start = Instant::now();
    let mut at = Duration::ZERO;
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        at += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / opts.rate);
        tokio::time::sleep_until((start + at).into()).await;
        let port = opts.port + (i as u16 % opts.replicas);
        let prompt = format!(
            "request {i}: {}",
            "lorem ipsum dolor ".repeat(opts.words / 3)
        );
        let body = serde_json::json!({
            "prompt": prompt, "max_tokens": opts.max_tokens, "stream": true,
        });
        let req = http::Request::post(format!("http://127.0.0.1:{port}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let resp = client.request(req).await.ok()?;
            let mut body = resp.into_body();
            let mut ttft = None;
            let mut events = 0usize;
            while let Some(frame) = body.frame().await {
                let frame = frame.ok()?;
                if let Ok(data) = frame.into_data() {
                    ttft.get_or_insert_with(|| sent.elapsed());
                    events += data.windows(6).filter(|w| w == b"data: ").count();
                }
            }
            Some((ttft?, sent.elapsed(), events))
        }));
    }
    let mut ttfts = Vec::new();
    let mut failed = 0;
    let mut events = 0;
    for t in tasks {
        match t.await.ok().flatten() {
            Some((ttft, _, ev)) => {
                ttfts.push(ttft);
                events += ev;
            }
            None => failed += 1,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    ttfts.sort();
    let p = |q: f64| {
        ttfts
            .get(((ttfts.len().max(1) - 1) as f64 * q) as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "requests {n} ok {} failed {failed} | TTFT p50 {:.1} ms p99 {:.1} ms | {:.0} SSE events/s over {wall:.1} s",
        ttfts.len(),
        p(0.5),
        p(0.99),
        events as f64 / wall
    );
}
