//! Traces: the requests a replay sends, when, and what they ask for.
//!
//! A trace is built from one of the bench workloads (Poisson arrivals at a rate), read from
//! the project's JSONL format, or converted from a public trace (Azure LLM inference CSV,
//! Mooncake JSONL). Every request ends up as an OpenAI body, exactly what the gateway would
//! forward, so the scheduler parses and hashes what it would in production.

use std::fmt::Write as _;

use bench::workload::{MODEL, WorkloadArgs};
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::WhatIfError;

/// Largest trace accepted (requests): a replay holds every request's body.
pub const MAX_REQUESTS: usize = 2_000_000;
/// Largest prompt a trace line may ask for, in tokens (the simulator's longest model length).
pub const MAX_PROMPT_TOKENS: usize = 131_072;
/// Largest output a trace line may ask for, in tokens.
pub const MAX_OUTPUT_TOKENS: usize = 32_768;
/// Tokens per Mooncake `hash_ids` block, as its publishers document the trace.
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

/// One request of a trace.
#[derive(Debug, Clone)]
pub struct TraceRequest {
    /// Seconds from the start of the replay.
    pub at: f64,
    /// `/v1/chat/completions` or `/v1/completions`.
    pub path: &'static str,
    /// The JSON body.
    pub body: Bytes,
    /// Completion tokens the engine generates.
    pub output_tokens: usize,
    /// Request headers (lower-case names): objective, fairness id, SLOs, session keys.
    pub headers: Vec<(String, String)>,
    /// What the request belongs to (group, user, adapter), for analysis.
    pub key: String,
}

/// `rate` requests per second of `workload`, Poisson arrivals (seeded), for `seconds`.
pub fn from_workload(
    args: &WorkloadArgs,
    rate: f64,
    seconds: f64,
) -> Result<Vec<TraceRequest>, WhatIfError> {
    from_schedule(args, &[(0.0, rate)], seconds)
}

/// Poisson arrivals of `workload` whose rate changes over time: `schedule` lists
/// `(from second, requests per second)`, in order, the first from 0. Collected; see
/// [`arrivals`] for the same requests made one at a time.
pub fn from_schedule(
    args: &WorkloadArgs,
    schedule: &[(f64, f64)],
    seconds: f64,
) -> Result<Vec<TraceRequest>, WhatIfError> {
    let stream = arrivals(args, schedule, seconds)?;
    if stream.expected > MAX_REQUESTS as f64 {
        return Err(WhatIfError::Trace(format!(
            "{:.0} requests expected; at most {MAX_REQUESTS} are held at once (a workload \
             replays any number when streamed)",
            stream.expected
        )));
    }
    Ok(stream.collect())
}

/// The requests of [`from_schedule`], made as the replay reaches them: a replay of any length
/// holds only the requests in flight.
pub fn arrivals(
    args: &WorkloadArgs,
    schedule: &[(f64, f64)],
    seconds: f64,
) -> Result<Arrivals, WhatIfError> {
    let valid = schedule.first().is_some_and(|s| s.0 == 0.0)
        && schedule.windows(2).all(|w| w[0].0 < w[1].0)
        && schedule.iter().all(|(_, r)| r.is_finite() && *r > 0.0);
    if !(valid && seconds.is_finite() && seconds > 0.0) {
        return Err(WhatIfError::Trace(format!(
            "the rate schedule {schedule:?} must start at 0 s with increasing times and positive \
             rates, and the duration ({seconds} s) must be positive"
        )));
    }
    let expected: f64 = schedule
        .iter()
        .enumerate()
        .map(|(k, &(from, rate))| {
            let to = schedule.get(k + 1).map_or(seconds, |n| n.0).min(seconds);
            (to - from).max(0.0) * rate
        })
        .sum();
    Ok(Arrivals {
        workload: args.build(),
        // Arrivals get their own stream so that the requests do not depend on the rate.
        rng: SmallRng::seed_from_u64(args.seed ^ 0xa771_7a15),
        schedule: schedule.to_vec(),
        segment: 0,
        t: 0.0,
        seconds,
        expected,
    })
}

/// Poisson arrivals of a workload, one request at a time ([`arrivals`]).
pub struct Arrivals {
    workload: Box<dyn bench::workload::Workload>,
    rng: SmallRng,
    schedule: Vec<(f64, f64)>,
    segment: usize,
    t: f64,
    seconds: f64,
    /// Requests expected over the whole schedule.
    pub expected: f64,
}

impl Iterator for Arrivals {
    type Item = TraceRequest;

    fn next(&mut self) -> Option<TraceRequest> {
        loop {
            let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
            let rate = self.schedule.get(self.segment)?.1;
            let next = self.t + -u.ln() / rate;
            // Memoryless arrivals: at a rate change, restart the draw from the boundary.
            if let Some(&(boundary, _)) = self.schedule.get(self.segment + 1)
                && next >= boundary
            {
                self.t = boundary;
                self.segment += 1;
                continue;
            }
            self.t = next;
            if self.t >= self.seconds {
                // Ended for good: later calls see no segment.
                self.segment = self.schedule.len();
                return None;
            }
            let r = self.workload.next_request();
            return Some(TraceRequest {
                at: self.t,
                path: r.path,
                body: r.body,
                output_tokens: r.max_tokens as usize,
                headers: Vec::new(),
                key: r.key,
            });
        }
    }
}

/// One line of the project's JSONL trace format (README, "What-if").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    /// Arrival, seconds from the start.
    t: f64,
    /// Model or adapter; the simulator's model when absent.
    #[serde(default)]
    model: Option<String>,
    /// A completions prompt.
    #[serde(default)]
    prompt: Option<String>,
    /// Chat messages (OpenAI shape).
    #[serde(default)]
    messages: Option<Value>,
    /// Token ids of a completions prompt.
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    /// `[prefix id, tokens]` segments: requests that share a segment id at the same position
    /// share that part of the prompt.
    #[serde(default)]
    segments: Option<Vec<(u64, usize)>>,
    /// Completion tokens.
    output_tokens: usize,
    /// Request headers.
    #[serde(default)]
    headers: Vec<(String, String)>,
    /// Analysis key.
    #[serde(default)]
    key: Option<String>,
}

/// Reads the project's JSONL trace format: one JSON object per line with `t` (seconds),
/// `output_tokens`, and one of `prompt`, `messages`, `token_ids` or `segments`; optional
/// `model`, `headers` (`[[name, value], …]`) and `key`. Lines must be in arrival order.
pub fn from_jsonl(text: &str) -> Result<Vec<TraceRequest>, WhatIfError> {
    let mut out = Vec::new();
    let mut last = 0.0f64;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| WhatIfError::Trace(format!("line {}: {why}", n + 1));
        if out.len() >= MAX_REQUESTS {
            return Err(bad(format!("more than {MAX_REQUESTS} requests")));
        }
        let l: Line = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if !(l.t.is_finite() && l.t >= last) {
            return Err(bad(format!(
                "t = {} is not ≥ the previous line's {last}",
                l.t
            )));
        }
        last = l.t;
        check_output(l.output_tokens).map_err(&bad)?;
        let model = l.model.unwrap_or_else(|| MODEL.to_owned());
        let (path, body) = match (l.prompt, l.messages, l.token_ids, l.segments) {
            (Some(p), None, None, None) => (
                "/v1/completions",
                completion(&model, json!(p), l.output_tokens),
            ),
            (None, Some(m), None, None) => {
                ("/v1/chat/completions", chat(&model, m, l.output_tokens))
            }
            (None, None, Some(ids), None) => {
                if ids.is_empty() || ids.len() > MAX_PROMPT_TOKENS {
                    return Err(bad(format!("token_ids: 1 to {MAX_PROMPT_TOKENS} ids")));
                }
                (
                    "/v1/completions",
                    completion(&model, json!([ids]), l.output_tokens),
                )
            }
            (None, None, None, Some(segs)) => (
                "/v1/completions",
                completion(
                    &model,
                    json!(segment_text(&segs).map_err(&bad)?),
                    l.output_tokens,
                ),
            ),
            _ => {
                return Err(bad(
                    "exactly one of prompt, messages, token_ids, segments".to_owned()
                ));
            }
        };
        out.push(TraceRequest {
            at: l.t,
            path,
            body,
            output_tokens: l.output_tokens,
            headers: l
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            key: l.key.unwrap_or_else(|| model.clone()),
        });
    }
    Ok(out)
}

/// Converts the Azure LLM inference trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`,
/// as Microsoft publishes it): prompts carry no sharing information, so each request gets a
/// unique prompt of its length. Times are made relative to the first row.
pub fn from_azure_csv(text: &str) -> Result<Vec<TraceRequest>, WhatIfError> {
    let mut rows = text.lines().filter(|l| !l.trim().is_empty());
    let header = rows.next().unwrap_or_default();
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| WhatIfError::Trace(format!("Azure CSV: no {name} column in {header:?}")))
    };
    let (ts, ctx, gen_) = (
        col("TIMESTAMP")?,
        col("ContextTokens")?,
        col("GeneratedTokens")?,
    );
    let mut out = Vec::new();
    let mut first: Option<(i64, f64)> = None;
    for (n, row) in rows.enumerate() {
        let bad = |why: String| WhatIfError::Trace(format!("Azure CSV row {}: {why}", n + 2));
        if out.len() >= MAX_REQUESTS {
            return Err(bad(format!("more than {MAX_REQUESTS} requests")));
        }
        let f: Vec<&str> = row.split(',').map(str::trim).collect();
        let get = |i: usize| {
            f.get(i)
                .copied()
                .ok_or_else(|| bad(format!("column {i} missing")))
        };
        let (day, sec) =
            parse_timestamp(get(ts)?).ok_or_else(|| bad("TIMESTAMP unreadable".into()))?;
        let (day0, sec0) = *first.get_or_insert((day, sec));
        // Days and seconds apart: an absolute time in seconds would lose the microseconds.
        let at = (day - day0) as f64 * 86_400.0 + (sec - sec0);
        let prompt: usize = get(ctx)?.parse().map_err(|_| bad("ContextTokens".into()))?;
        let output: usize = get(gen_)?
            .parse()
            .map_err(|_| bad("GeneratedTokens".into()))?;
        let output = output.max(1);
        check_output(output).map_err(&bad)?;
        let prompt = prompt.clamp(1, MAX_PROMPT_TOKENS);
        // A unique segment id per row: no two requests share anything.
        let text = segment_text(&[(u64::MAX - n as u64, prompt)]).map_err(&bad)?;
        out.push(TraceRequest {
            at: at.max(0.0),
            path: "/v1/completions",
            body: completion(MODEL, json!(text), output),
            output_tokens: output,
            headers: Vec::new(),
            key: "azure".to_owned(),
        });
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(out)
}

/// Converts Mooncake's JSONL trace (`timestamp` in ms, `input_length`, `output_length`,
/// `hash_ids`: one id per 512-token block, equal ids = equal blocks, as its publishers
/// document it) into segments.
pub fn from_mooncake(text: &str) -> Result<Vec<TraceRequest>, WhatIfError> {
    #[derive(Deserialize)]
    struct Row {
        timestamp: f64,
        input_length: usize,
        output_length: usize,
        #[serde(default)]
        hash_ids: Vec<u64>,
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| WhatIfError::Trace(format!("Mooncake line {}: {why}", n + 1));
        if out.len() >= MAX_REQUESTS {
            return Err(bad(format!("more than {MAX_REQUESTS} requests")));
        }
        let r: Row = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let output = r.output_length.max(1);
        check_output(output).map_err(&bad)?;
        let input = r.input_length.clamp(1, MAX_PROMPT_TOKENS);
        let mut segs = Vec::with_capacity(r.hash_ids.len() + 1);
        let mut left = input;
        for id in r.hash_ids {
            if left == 0 {
                break;
            }
            let len = left.min(MOONCAKE_BLOCK_TOKENS);
            segs.push((id, len));
            left -= len;
        }
        if left > 0 {
            // The tail past the listed blocks is this request's own.
            segs.push((u64::MAX - n as u64, left));
        }
        out.push(TraceRequest {
            at: r.timestamp / 1000.0,
            path: "/v1/completions",
            body: completion(MODEL, json!(segment_text(&segs).map_err(&bad)?), output),
            output_tokens: output,
            headers: Vec::new(),
            key: "mooncake".to_owned(),
        });
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    if let Some(t0) = out.first().map(|r| r.at) {
        for r in &mut out {
            r.at -= t0;
        }
    }
    Ok(out)
}

fn check_output(n: usize) -> Result<(), String> {
    if n == 0 || n > MAX_OUTPUT_TOKENS {
        return Err(format!(
            "output_tokens must be 1 to {MAX_OUTPUT_TOKENS}, not {n}"
        ));
    }
    Ok(())
}

/// Text whose simulator tokens follow the segments: a segment is `len` four-letter words
/// (one token each) drawn from a generator seeded by the segment id and its position, so
/// equal (id, position) pairs give equal text.
fn segment_text(segs: &[(u64, usize)]) -> Result<String, String> {
    let total: usize = segs.iter().map(|s| s.1).sum();
    if total == 0 || total > MAX_PROMPT_TOKENS {
        return Err(format!(
            "segments: 1 to {MAX_PROMPT_TOKENS} tokens, not {total}"
        ));
    }
    let mut text = String::with_capacity(total * 5);
    for (pos, &(id, len)) in segs.iter().enumerate() {
        let mut rng = SmallRng::seed_from_u64(id.rotate_left(17) ^ pos as u64);
        for _ in 0..len {
            let w: u32 = rng.random();
            text.push(' ');
            for k in 0..4 {
                text.push(char::from(b'a' + ((w >> (k * 5)) % 26) as u8));
            }
        }
    }
    Ok(text)
}

/// (day number, seconds into the day) of an Azure timestamp (`2023-11-16 18:15:46.6805900`),
/// or (0, seconds) of a plain number.
fn parse_timestamp(s: &str) -> Option<(i64, f64)> {
    if let Ok(v) = s.parse::<f64>() {
        return v.is_finite().then_some((0, v));
    }
    let (date, time) = s.split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from a fixed origin (civil calendar); only differences matter.
    let (y, m) = if m <= 2 { (y - 1, m + 12) } else { (y, m) };
    let days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * (m - 3) + 2) / 5 + day;
    Some((days, h * 3600.0 + min * 60.0 + sec))
}

fn completion(model: &str, prompt: Value, max_tokens: usize) -> Bytes {
    Bytes::from(
        json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": true})
            .to_string(),
    )
}

fn chat(model: &str, messages: Value, max_tokens: usize) -> Bytes {
    Bytes::from(
        json!({"model": model, "messages": messages, "max_tokens": max_tokens, "stream": true})
            .to_string(),
    )
}

/// A short description of a trace: requests, span, mean rate.
pub fn describe(trace: &[TraceRequest]) -> String {
    let mut s = String::new();
    let span = trace.last().map_or(0.0, |r| r.at);
    let _ = write!(
        s,
        "{} requests over {span:.1} s ({:.2} req/s)",
        trace.len(),
        if span > 0.0 {
            trace.len() as f64 / span
        } else {
            0.0
        }
    );
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn segments_share_exactly_their_common_part() {
        let a = segment_text(&[(7, 100), (1, 20)]).unwrap();
        let b = segment_text(&[(7, 100), (2, 20)]).unwrap();
        let ta = sim::tokenizer::encode_prompt(&a);
        let tb = sim::tokenizer::encode_prompt(&b);
        assert_eq!(ta.len(), 121, "one token per word plus BOS");
        let common = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
        assert!((100..=101).contains(&common), "{common}");
    }

    #[test]
    fn jsonl_reads_every_prompt_form_and_rejects_bad_lines() {
        let text = r#"{"t": 0, "prompt": "hello", "output_tokens": 4}
{"t": 0.5, "messages": [{"role": "user", "content": "hi"}], "output_tokens": 2, "headers": [["X-LLM-D-SLO-TTFT-MS", "500"]]}
{"t": 1, "token_ids": [1, 2, 3], "output_tokens": 1}
{"t": 2, "segments": [[1, 10]], "output_tokens": 8, "model": "lora-1"}
"#;
        let t = from_jsonl(text).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[1].path, "/v1/chat/completions");
        assert_eq!(t[1].headers[0].0, "x-llm-d-slo-ttft-ms");
        assert!(String::from_utf8_lossy(&t[3].body).contains("lora-1"));
        for bad in [
            r#"{"t": 1, "output_tokens": 1}"#,
            r#"{"t": 1, "prompt": "a", "output_tokens": 0}"#,
            r#"{"t": 1, "prompt": "a", "token_ids": [1], "output_tokens": 1}"#,
            r#"{"t": 1, "prompt": "a", "output_tokens": 1, "extra": 1}"#,
            r#"{"t": 1, "segments": [[1, 999999999]], "output_tokens": 1}"#,
        ] {
            assert!(from_jsonl(bad).is_err(), "{bad}");
        }
        let backwards = "{\"t\": 2, \"prompt\": \"a\", \"output_tokens\": 1}\n{\"t\": 1, \"prompt\": \"a\", \"output_tokens\": 1}";
        assert!(from_jsonl(backwards).is_err());
    }

    #[test]
    fn azure_and_mooncake_convert() {
        let azure = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                     2023-11-16 18:15:46.6805900,374,44\n\
                     2023-11-16 18:15:50.9951690,396,109\n";
        let t = from_azure_csv(azure).unwrap();
        assert_eq!(t.len(), 2);
        assert!((t[1].at - 4.3145790).abs() < 1e-6, "{}", t[1].at);
        assert_eq!(t[1].output_tokens, 109);

        let mooncake = r#"{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2353, 2354]}
{"timestamp": 30535, "input_length": 1100, "output_length": 26, "hash_ids": [46, 47, 2355]}"#;
        let t = from_mooncake(mooncake).unwrap();
        assert_eq!(t.len(), 2);
        assert!((t[1].at - 3.053).abs() < 1e-9);
        let p = |r: &TraceRequest| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            sim::tokenizer::encode_prompt(v["prompt"].as_str().unwrap())
        };
        let (a, b) = (p(&t[0]), p(&t[1]));
        assert_eq!(a.len(), 6956);
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert!(
            (1024..=1025).contains(&common),
            "two shared blocks: {common}"
        );
    }

    #[test]
    fn a_rate_schedule_changes_the_rate_at_its_boundaries() {
        let args = WorkloadArgs::default();
        let t = from_schedule(&args, &[(0.0, 5.0), (100.0, 20.0)], 200.0).unwrap();
        let early = t.iter().filter(|r| r.at < 100.0).count();
        let late = t.len() - early;
        assert!((400..600).contains(&early), "{early}");
        assert!((1800..2200).contains(&late), "{late}");
        assert!(from_schedule(&args, &[(1.0, 5.0)], 10.0).is_err());
        assert!(from_schedule(&args, &[(0.0, 5.0), (0.0, 6.0)], 10.0).is_err());
    }

    #[test]
    fn workload_arrivals_are_seeded_and_at_the_rate() {
        let args = WorkloadArgs::default();
        let a = from_workload(&args, 20.0, 50.0).unwrap();
        let b = from_workload(&args, 20.0, 50.0).unwrap();
        assert_eq!(a.len(), b.len());
        assert!((900..1100).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(from_workload(&args, 0.0, 1.0).is_err());
    }
}
