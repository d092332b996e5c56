//! Summaries of replays: percentiles, hit rate, load spread, SLO attainment; as a Markdown
//! table, JSON and SVG.

use std::fmt::Write as _;

use bench::report::{Series, line_chart_log_y};
use bench::stats::Quantiles;
use serde::Serialize;

use crate::replay::{Outcome, RunResult};

/// What a report counts as meeting the service level when a request names no objective.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Slo {
    /// TTFT objective, seconds.
    pub ttft: f64,
    /// Time-per-output-token objective, seconds (none: not checked).
    pub tpot: Option<f64>,
}

/// One replay, summarised over the requests that arrived after the warm-up.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The routing config.
    pub name: String,
    /// Requests counted (after warm-up).
    pub requests: usize,
    /// Requests that failed.
    pub errors: usize,
    /// Time to first token, ms.
    pub ttft_ms: Quantiles,
    /// Mean inter-token latency per request, ms.
    pub itl_ms: Quantiles,
    /// End to end, ms.
    pub e2e_ms: Quantiles,
    /// Engine queueing before first scheduled, ms.
    pub queued_ms: Quantiles,
    /// Prompt tokens served from the prefix cache / prompt tokens.
    pub hit_rate: f64,
    /// Requests per replica.
    pub per_replica: Vec<usize>,
    /// Busiest replica's requests over the mean.
    pub max_over_mean: f64,
    /// Share of requests meeting their SLO (their own objectives, else the report's).
    pub slo_attainment: f64,
    /// Output tokens per second of the measured span.
    pub output_tokens_per_s: f64,
}

/// Summarises `run`, counting requests that arrived at or after `warmup` seconds.
pub fn summarise(run: &RunResult, warmup: f64, slo: Slo) -> Summary {
    let counted: Vec<&Outcome> = run.outcomes.iter().filter(|o| o.at >= warmup).collect();
    let ok: Vec<&&Outcome> = counted.iter().filter(|o| o.error.is_none()).collect();
    let q = |f: &dyn Fn(&Outcome) -> Option<f64>| {
        Quantiles::of(ok.iter().filter_map(|o| f(o)).map(|v| v * 1e3).collect())
    };
    let prompt: usize = ok.iter().map(|o| o.prompt_tokens).sum();
    let cached: usize = ok.iter().map(|o| o.cached_tokens).sum();
    let mut per_replica = vec![0usize; run.replicas];
    for o in &counted {
        if let Some(r) = o.replica
            && let Some(n) = per_replica.get_mut(r)
        {
            *n += 1;
        }
    }
    let mean = per_replica.iter().sum::<usize>() as f64 / run.replicas.max(1) as f64;
    let max = per_replica.iter().copied().max().unwrap_or(0) as f64;
    let met = counted
        .iter()
        .filter(|o| {
            o.error.is_none()
                && o.ttft.is_some_and(|t| t <= o.slo_ttft.unwrap_or(slo.ttft))
                && match (o.itl, o.slo_tpot.or(slo.tpot)) {
                    (Some(itl), Some(tpot)) => itl <= tpot,
                    _ => true,
                }
        })
        .count();
    let span_end = ok
        .iter()
        .filter_map(|o| o.e2e.map(|e| o.at + e))
        .fold(warmup, f64::max);
    let out_tokens: usize = ok.iter().map(|o| o.output_tokens).sum();
    Summary {
        name: run.name.clone(),
        requests: counted.len(),
        errors: counted.len() - ok.len(),
        ttft_ms: q(&|o| o.ttft),
        itl_ms: q(&|o| o.itl),
        e2e_ms: q(&|o| o.e2e),
        queued_ms: q(&|o| o.queued),
        hit_rate: if prompt > 0 {
            cached as f64 / prompt as f64
        } else {
            0.0
        },
        per_replica,
        max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
        slo_attainment: if counted.is_empty() {
            0.0
        } else {
            met as f64 / counted.len() as f64
        },
        output_tokens_per_s: if span_end > warmup {
            out_tokens as f64 / (span_end - warmup)
        } else {
            0.0
        },
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.0}"))
}

/// The side-by-side table.
pub fn markdown(summaries: &[Summary], slo: Slo) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| config | requests | errors | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p90 | E2E p50 | E2E p90 | queued p90 | hit rate | busiest / mean | SLO met (TTFT ≤ {:.0} ms{}) | output tok/s |",
        slo.ttft * 1e3,
        slo.tpot
            .map_or_else(String::new, |t| format!(", TPOT ≤ {:.0} ms", t * 1e3))
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for x in summaries {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {:.1}% | {:.2} | {:.1}% | {:.0} |",
            x.name,
            x.requests,
            x.errors,
            ms(x.ttft_ms.p50),
            ms(x.ttft_ms.p90),
            ms(x.ttft_ms.p99),
            x.itl_ms.p50.unwrap_or(f64::NAN),
            x.itl_ms.p90.unwrap_or(f64::NAN),
            ms(x.e2e_ms.p50),
            ms(x.e2e_ms.p90),
            ms(x.queued_ms.p90),
            x.hit_rate * 100.0,
            x.max_over_mean,
            x.slo_attainment * 100.0,
            x.output_tokens_per_s,
        );
    }
    s.push_str("\nTimes in ms (virtual time).\n");
    s
}

/// TTFT over the replay (each request's TTFT at its arrival, 1 s buckets' p90), one line per
/// config.
pub fn ttft_plot(runs: &[RunResult]) -> String {
    let series: Vec<Series> = runs
        .iter()
        .map(|run| {
            let mut buckets: Vec<Vec<f64>> = Vec::new();
            for o in &run.outcomes {
                if let Some(t) = o.ttft {
                    let b = o.at.max(0.0) as usize;
                    if buckets.len() <= b {
                        buckets.resize_with(b + 1, Vec::new);
                    }
                    buckets[b].push(t * 1e3);
                }
            }
            Series {
                label: run.name.clone(),
                points: buckets
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, v)| Quantiles::of(v).p90.map(|p| (i as f64, p)))
                    .collect(),
            }
        })
        .collect();
    line_chart_log_y(
        "TTFT p90 per second of the replay (virtual time)",
        "seconds",
        "TTFT p90 (ms)",
        &series,
    )
}
