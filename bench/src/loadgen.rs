//! The load generator: OpenAI streaming requests at a Poisson rate or a fixed concurrency,
//! for a duration or a count, in the manner of vLLM's `benchmark_serving` / `inference-perf`.
//!
//! Per request it records TTFT (first event carrying generated text), the gaps between SSE
//! content events, end-to-end latency, status, the replica that served it (`x-inference-pod`,
//! which the simulator sets and every router passes through) and the usage the server reported.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::stats::Quantiles;
use crate::workload::{Request, Workload};

/// How requests are issued.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Open loop: Poisson arrivals at this many requests per second.
    Rate(f64),
    /// Closed loop: this many requests in flight at all times.
    Concurrency(usize),
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Base URL, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// Arrival process.
    pub mode: Mode,
    /// Stop issuing after this long (seconds)…
    pub duration_s: Option<f64>,
    /// …or after this many requests (whichever comes first).
    pub count: Option<usize>,
    /// After the last arrival, requests still running are cut after this long (seconds).
    pub drain_timeout_s: f64,
    /// Seed of the arrival process.
    pub seed: u64,
    /// Draw a progress bar on stderr (only if it is a terminal).
    pub progress: bool,
}

/// One request's outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number.
    pub i: usize,
    /// Workload key (group, user, adapter).
    pub key: String,
    /// Seconds from the start of the run to sending.
    pub sent_s: f64,
    /// HTTP status; 0 = no response (connection error, cut).
    pub status: u16,
    /// Time to the first generated text, ms.
    pub ttft_ms: Option<f64>,
    /// Gaps between consecutive content events, ms.
    pub itl_ms: Vec<f32>,
    /// End-to-end latency, ms (absent if the request did not complete).
    pub e2e_ms: Option<f64>,
    /// Completion tokens (usage, else asked).
    pub output_tokens: u32,
    /// Prompt tokens (usage, else the workload's count).
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache, as the server reported.
    pub cached_tokens: Option<u32>,
    /// `x-inference-pod` of the response.
    pub replica: Option<String>,
    /// The TTFT Switchyard's cost model predicted for this request on the endpoint it picked,
    /// ms, from the `x-switchyard-decision` response header (`epp --debug-decision-header`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_ttft_ms: Option<f64>,
    /// That header as it came (kept for analysis; only the cost profile's runs send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
    /// `x-llm-d-request-dropped-reason` of a request the EPP answered itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_reason: Option<String>,
    /// Seconds from the start of the run to the end of the request (success or error).
    #[serde(default)]
    pub done_s: f64,
}

impl Record {
    /// Completed with a 2xx and a full stream.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status) && self.e2e_ms.is_some() && self.error.is_none()
    }
}

/// The aggregate of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Requests sent.
    pub sent: usize,
    /// Completed successfully.
    pub ok: usize,
    /// Failed, by status (0 = transport error or cut at the drain deadline).
    pub errors: BTreeMap<u16, usize>,
    /// From the first send to the last completion, seconds.
    pub wall_s: f64,
    /// Completed requests per second.
    pub req_per_s: f64,
    /// Output tokens of completed requests per second.
    pub output_tok_per_s: f64,
    /// Time to first token, ms: every request that got one, plus requests cut at the drain
    /// deadline before their first token, counted with the time they waited (a lower bound).
    pub ttft_ms: Quantiles,
    /// Time per output token after the first, ms: (e2e − TTFT) / (tokens − 1).
    pub tpot_ms: Quantiles,
    /// Gap between SSE content events, ms.
    pub itl_ms: Quantiles,
    /// End-to-end latency, ms.
    pub e2e_ms: Quantiles,
    /// Σ cached / Σ prompt tokens over completed requests, from the usage the server reported.
    pub usage_cache_hit: Option<f64>,
    /// Completed requests per replica.
    pub per_replica: BTreeMap<String, usize>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// What was run.
    pub spec: LoadSpec,
    /// The aggregate.
    pub summary: Summary,
    /// Per request.
    pub records: Vec<Record>,
    /// Wall-clock start of the run (`sent_s` and `done_s` count from it), ms since the epoch.
    #[serde(default)]
    pub start_unix_ms: f64,
}

impl Summary {
    /// Aggregates `records`.
    pub fn of(records: &[Record], wall_s: f64) -> Self {
        let ok: Vec<&Record> = records.iter().filter(|r| r.ok()).collect();
        let mut errors = BTreeMap::new();
        for r in records.iter().filter(|r| !r.ok()) {
            *errors.entry(r.status).or_default() += 1;
        }
        let mut per_replica = BTreeMap::new();
        for r in &ok {
            *per_replica
                .entry(r.replica.clone().unwrap_or_else(|| "?".into()))
                .or_default() += 1;
        }
        let out_tokens: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
        let prompt: u64 = ok.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let cached: u64 = ok
            .iter()
            .filter_map(|r| r.cached_tokens)
            .map(u64::from)
            .sum();
        let any_cached = ok.iter().any(|r| r.cached_tokens.is_some());
        let wall = wall_s.max(1e-9);
        Summary {
            sent: records.len(),
            ok: ok.len(),
            errors,
            wall_s,
            req_per_s: ok.len() as f64 / wall,
            output_tok_per_s: out_tokens as f64 / wall,
            ttft_ms: Quantiles::of(records.iter().filter_map(|r| r.ttft_ms).collect()),
            tpot_ms: Quantiles::of(
                ok.iter()
                    .filter(|r| r.output_tokens > 1)
                    .filter_map(|r| Some((r.e2e_ms? - r.ttft_ms?) / f64::from(r.output_tokens - 1)))
                    .collect(),
            ),
            itl_ms: Quantiles::of(
                ok.iter()
                    .flat_map(|r| r.itl_ms.iter().map(|&x| f64::from(x)))
                    .collect(),
            ),
            e2e_ms: Quantiles::of(ok.iter().filter_map(|r| r.e2e_ms).collect()),
            usage_cache_hit: (any_cached && prompt > 0).then(|| cached as f64 / prompt as f64),
            per_replica,
        }
    }

    /// A few human-readable lines.
    pub fn render(&self) -> String {
        let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let errs = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(s, n)| format!("{s}×{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "requests   sent {} ok {} errors {errs} in {:.1} s\n\
             throughput {:.2} req/s, {:.0} output tok/s\n\
             TTFT ms    p50 {} p90 {} p99 {} mean {}\n\
             TPOT ms    p50 {} p90 {} p99 {}\n\
             ITL ms     p50 {} p99 {} (between SSE events)\n\
             e2e ms     p50 {} p90 {} p99 {}\n\
             cache hit  {} (usage.cached_tokens / prompt_tokens)\n\
             replicas   {}",
            self.sent,
            self.ok,
            self.wall_s,
            self.req_per_s,
            self.output_tok_per_s,
            f(self.ttft_ms.p50),
            f(self.ttft_ms.p90),
            f(self.ttft_ms.p99),
            f(self.ttft_ms.mean),
            f(self.tpot_ms.p50),
            f(self.tpot_ms.p90),
            f(self.tpot_ms.p99),
            f(self.itl_ms.p50),
            f(self.itl_ms.p99),
            f(self.e2e_ms.p50),
            f(self.e2e_ms.p90),
            f(self.e2e_ms.p99),
            self.usage_cache_hit
                .map_or("-".to_owned(), |h| format!("{:.1} %", h * 100.0)),
            self.per_replica
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(" "),
        )
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Shared counters for the progress bar.
#[derive(Default)]
struct Progress {
    sent: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
}

/// Steering of a rate-mode run from outside: a piecewise-constant rate and an early stop, with
/// each request's first token visible while the run goes on.
#[derive(Debug, Clone, Default)]
pub struct Control {
    /// `(until_s, rate)`: Poisson arrivals at `rate` until `until_s` seconds after the start,
    /// then the next segment's; issuing ends after the last one. Replaces the spec's rate and
    /// duration when not empty.
    pub schedule: Vec<(f64, f64)>,
    /// Issuing stops as soon as this is set.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// Every issued request as it goes.
    pub live: Arc<LiveLog>,
    /// Headers sent with every request (a tenant's fairness id and objective).
    pub headers: Vec<(String, String)>,
}

/// What the caller of [`run_with`] can see of the requests while the run goes on.
#[derive(Debug, Default)]
pub struct LiveLog {
    entries: Mutex<Vec<LiveEntry>>,
}

/// One issued request, as far as it got.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LiveEntry {
    /// Seconds from the start of the run to sending.
    pub sent_s: f64,
    /// Time to first token, once it came.
    pub ttft_ms: Option<f64>,
    /// It failed (transport error, non-2xx, broken stream).
    pub failed: bool,
}

impl LiveLog {
    fn push(&self, i: usize, sent_s: f64) {
        let mut e = self.entries.lock();
        if e.len() <= i {
            e.resize(i + 1, LiveEntry::default());
        }
        e[i].sent_s = sent_s;
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut LiveEntry)) {
        if let Some(e) = self.entries.lock().get_mut(i) {
            f(e);
        }
    }

    /// A copy of every entry so far, by request number.
    pub fn snapshot(&self) -> Vec<LiveEntry> {
        self.entries.lock().clone()
    }
}

/// The rate of `schedule` at `t` seconds (`None` past its end).
fn rate_at(schedule: &[(f64, f64)], t: f64) -> Option<f64> {
    schedule.iter().find(|(until, _)| t < *until).map(|s| s.1)
}

/// Runs `spec` with requests from `workload`.
pub async fn run(spec: LoadSpec, workload: Box<dyn Workload>) -> anyhow::Result<Report> {
    run_with(spec, workload, Control::default()).await
}

/// Runs `spec` with requests from `workload`, steered by `ctl` (rate mode only).
pub async fn run_with(
    spec: LoadSpec,
    workload: Box<dyn Workload>,
    ctl: Control,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        ctl.schedule.is_empty() || matches!(spec.mode, Mode::Rate(_)),
        "a rate schedule needs rate mode"
    );
    let ctl = Arc::new(ctl);
    anyhow::ensure!(
        spec.duration_s.is_some() || spec.count.is_some() || !ctl.schedule.is_empty(),
        "give a duration or a count"
    );
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4096)
        .build(connector);
    let base = spec.url.trim_end_matches('/').to_owned();
    let start_unix_ms = unix_ms();
    let start = Instant::now();
    let stop_at = spec.duration_s.map(|d| start + Duration::from_secs_f64(d));
    let count = spec.count.unwrap_or(usize::MAX);
    let progress = Arc::new(Progress::default());
    let bar = (spec.progress && std::io::stderr().is_terminal())
        .then(|| tokio::spawn(draw_progress(progress.clone(), start, spec.clone())));
    let workload = Arc::new(Mutex::new(workload));
    // The drain deadline is only known once issuing stops; tasks read it from here.
    let deadline = Arc::new(Mutex::new(None::<Instant>));

    let mut handles = Vec::new();
    match spec.mode {
        Mode::Rate(rate) => {
            anyhow::ensure!(
                rate > 0.0 && ctl.schedule.iter().all(|s| s.1 > 0.0),
                "rate must be positive"
            );
            let mut rng = SmallRng::seed_from_u64(spec.seed);
            let mut at = Duration::ZERO;
            for i in 0..count {
                // Piecewise-constant rate: the gap is drawn at the rate in force at the last
                // arrival (exact within a segment, seeded: the same schedule gives the same
                // arrivals).
                let r = if ctl.schedule.is_empty() {
                    rate
                } else {
                    match rate_at(&ctl.schedule, at.as_secs_f64()) {
                        Some(r) => r,
                        None => break,
                    }
                };
                at += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / r);
                let when = start + at;
                if stop_at.is_some_and(|s| when >= s)
                    || (!ctl.schedule.is_empty()
                        && rate_at(&ctl.schedule, at.as_secs_f64()).is_none())
                {
                    break;
                }
                tokio::time::sleep_until(when).await;
                if ctl.stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = workload.lock().next_request();
                progress.sent.fetch_add(1, Ordering::Relaxed);
                let (client, base, progress, deadline, ctl) = (
                    client.clone(),
                    base.clone(),
                    progress.clone(),
                    deadline.clone(),
                    ctl.clone(),
                );
                ctl.live.push(i, (Instant::now() - start).as_secs_f64());
                handles.push(tokio::spawn(async move {
                    let r = one_timed(&client, &base, i, req, start, &deadline, &ctl).await;
                    count_done(&progress, &r);
                    vec![r]
                }));
            }
        }
        Mode::Concurrency(n) => {
            anyhow::ensure!(n > 0, "concurrency must be positive");
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..n {
                let (client, base, progress, deadline, workload, next, ctl) = (
                    client.clone(),
                    base.clone(),
                    progress.clone(),
                    deadline.clone(),
                    workload.clone(),
                    next.clone(),
                    ctl.clone(),
                );
                handles.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        if stop_at.is_some_and(|s| Instant::now() >= s) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let req = workload.lock().next_request();
                        progress.sent.fetch_add(1, Ordering::Relaxed);
                        ctl.live.push(i, (Instant::now() - start).as_secs_f64());
                        let r = one_timed(&client, &base, i, req, start, &deadline, &ctl).await;
                        count_done(&progress, &r);
                        mine.push(r);
                    }
                    mine
                }));
            }
        }
    }
    // Issuing is over (rate mode); in concurrency mode it ends inside the workers, so the
    // drain deadline counts from the planned stop.
    let drain_from = match spec.mode {
        Mode::Rate(_) => Instant::now(),
        Mode::Concurrency(_) => {
            stop_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
        }
    };
    *deadline.lock() = Some(drain_from + Duration::from_secs_f64(spec.drain_timeout_s));

    let mut records = Vec::new();
    for h in handles {
        records.extend(h.await?);
    }
    records.sort_by_key(|r| r.i);
    if let Some(b) = bar {
        b.abort();
        eprintln!();
    }
    let end = records
        .iter()
        .filter_map(|r| Some(r.sent_s + r.e2e_ms? / 1e3))
        .fold(0.0f64, f64::max);
    let wall_s = if end > 0.0 {
        end
    } else {
        start.elapsed().as_secs_f64()
    };
    Ok(Report {
        summary: Summary::of(&records, wall_s),
        spec,
        records,
        start_unix_ms,
    })
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn count_done(p: &Progress, r: &Record) {
    p.done.fetch_add(1, Ordering::Relaxed);
    if !r.ok() {
        p.failed.fetch_add(1, Ordering::Relaxed);
    }
}

async fn draw_progress(p: Arc<Progress>, start: Instant, spec: LoadSpec) {
    let total = spec.count.map(|c| c as f64).or_else(|| match spec.mode {
        Mode::Rate(r) => spec.duration_s.map(|d| d * r),
        Mode::Concurrency(_) => None,
    });
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let (sent, done, failed) = (
            p.sent.load(Ordering::Relaxed),
            p.done.load(Ordering::Relaxed),
            p.failed.load(Ordering::Relaxed),
        );
        let t = start.elapsed().as_secs_f64();
        let frac = match (total, spec.duration_s) {
            (Some(n), _) if n > 0.0 => done as f64 / n,
            (_, Some(d)) if d > 0.0 => t / d,
            _ => 0.0,
        }
        .clamp(0.0, 1.0);
        let width = 30;
        let filled = (frac * width as f64).round() as usize;
        let bar: String = "=".repeat(filled) + &" ".repeat(width - filled);
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r[{bar}] {:>3.0}%  sent {sent}  done {done}  failed {failed}  in flight {}  {t:.1} s ",
            frac * 100.0,
            sent.saturating_sub(done)
        );
        let _ = err.flush();
    }
}

/// [`one`], stamped with the time it ended.
async fn one_timed(
    client: &HttpClient,
    base: &str,
    i: usize,
    req: Request,
    start: Instant,
    deadline: &Mutex<Option<Instant>>,
    ctl: &Control,
) -> Record {
    let mut r = one(client, base, i, req, start, deadline, ctl).await;
    r.done_s = start.elapsed().as_secs_f64();
    r
}

/// Sends one request and follows its stream; tells `live` of its first token and its failure.
async fn one(
    client: &HttpClient,
    base: &str,
    i: usize,
    req: Request,
    start: Instant,
    deadline: &Mutex<Option<Instant>>,
    ctl: &Control,
) -> Record {
    let rec = one_inner(client, base, i, req, start, deadline, ctl).await;
    if !rec.ok() {
        ctl.live.update(i, |e| e.failed = true);
    }
    rec
}

async fn one_inner(
    client: &HttpClient,
    base: &str,
    i: usize,
    req: Request,
    start: Instant,
    deadline: &Mutex<Option<Instant>>,
    ctl: &Control,
) -> Record {
    let live = &ctl.live;
    let sent = Instant::now();
    let mut rec = Record {
        i,
        key: req.key,
        sent_s: (sent - start).as_secs_f64(),
        output_tokens: req.max_tokens,
        prompt_tokens: req.prompt_tokens,
        ..Record::default()
    };
    let mut builder = http::Request::post(format!("{base}{}", req.path))
        .header(http::header::CONTENT_TYPE, "application/json");
    for (k, v) in &ctl.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let http_req = match builder.body(Full::new(req.body)) {
        Ok(r) => r,
        Err(e) => {
            rec.error = Some(e.to_string());
            return rec;
        }
    };
    // Waits that can be cut by the drain deadline (unknown while the run is still issuing).
    let far = || Instant::now() + Duration::from_secs(3600);
    let cut_at = || deadline.lock().unwrap_or_else(far);
    let resp = tokio::select! {
        r = client.request(http_req) => r,
        _ = wait_deadline(deadline) => {
            rec.error = Some("cut at the drain deadline before the response".into());
            rec.ttft_ms = Some(sent.elapsed().as_secs_f64() * 1e3);
            return rec;
        }
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            rec.error = Some(format!("transport: {e}"));
            return rec;
        }
    };
    rec.status = resp.status().as_u16();
    rec.dropped_reason = resp
        .headers()
        .get("x-llm-d-request-dropped-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    rec.replica = resp
        .headers()
        .get("x-inference-pod")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    rec.decision = resp
        .headers()
        .get(DECISION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    rec.predicted_ttft_ms = rec.decision.as_deref().and_then(picked_predicted_ttft_ms);
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut last_content: Option<Instant> = None;
    let mut raw_error = Vec::new();
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::time::sleep_until(cut_at()) => {
                rec.error = Some("cut at the drain deadline mid-stream".into());
                // Still queued: the wait so far is a lower bound of its TTFT, and leaving it
                // out would make an overloaded router look better than it is.
                rec.ttft_ms.get_or_insert(sent.elapsed().as_secs_f64() * 1e3);
                return rec;
            }
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                rec.error = Some(format!("body: {e}"));
                return rec;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if !ok {
            raw_error.extend_from_slice(&data);
            continue;
        }
        buf.extend_from_slice(&data);
        while let Some(pos) = find_event_end(&buf) {
            let event = buf.split_to(pos + 2);
            let now = Instant::now();
            let first = rec.ttft_ms.is_none();
            on_event(&event, now, sent, &mut last_content, &mut rec);
            if first && let Some(t) = rec.ttft_ms {
                live.update(i, |e| e.ttft_ms = Some(t));
            }
        }
    }
    if !ok {
        rec.error = Some(String::from_utf8_lossy(&raw_error[..raw_error.len().min(300)]).into());
        return rec;
    }
    rec.e2e_ms = Some(sent.elapsed().as_secs_f64() * 1e3);
    if rec.ttft_ms.is_none() {
        rec.error = Some("stream ended without generated text".into());
    }
    rec
}

/// Switchyard's opt-in decision trace header (`epp --debug-decision-header`).
pub const DECISION_HEADER: &str = "x-switchyard-decision";

/// The predicted TTFT (ms) of the picked endpoint in a decision header:
/// `picked=a; weights[…]; a=1.000[ttft-cost-scorer=1.00,ttft=123ms]; b=…` (rows best first,
/// one `ttft=` per row when a cost model ran).
pub fn picked_predicted_ttft_ms(header: &str) -> Option<f64> {
    let mut parts = header.split("; ");
    let picked = parts
        .next()?
        .strip_prefix("picked=")?
        .split(',')
        .next()
        .filter(|p| !p.is_empty())?;
    // (name, total, predicted TTFT) of each row.
    let rows: Vec<(&str, &str, Option<f64>)> = parts
        .filter_map(|row| {
            let (name, rest) = row.split_once('=')?;
            let (total, scores) = rest.split_once('[')?;
            let ttft = scores
                .strip_suffix(']')?
                .split(',')
                .find_map(|kv| kv.strip_prefix("ttft=")?.strip_suffix("ms")?.parse().ok());
            Some((name, total, ttft))
        })
        .filter(|r| !r.0.starts_with("weights["))
        .collect();
    match rows.iter().find(|r| r.0 == picked) {
        Some(r) => r.2,
        // The header lists the best 4 rows; a pick among more tied at the top is not listed,
        // but it has the top total, i.e. the same cost as the first row.
        None => rows
            .first()
            .filter(|first| rows.len() >= 4 && rows[3].1 == first.1)
            .and_then(|first| first.2),
    }
}

/// Resolves once the drain deadline is set and has passed.
async fn wait_deadline(deadline: &Mutex<Option<Instant>>) {
    loop {
        let d = *deadline.lock();
        match d {
            Some(d) => {
                tokio::time::sleep_until(d).await;
                return;
            }
            None => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn find_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

/// Handles one SSE event (`data: {...}\n\n`).
fn on_event(
    event: &[u8],
    now: Instant,
    sent: Instant,
    last_content: &mut Option<Instant>,
    rec: &mut Record,
) {
    let Some(data) = event.strip_prefix(b"data: ") else {
        return;
    };
    let data = data.trim_ascii_end();
    if data == b"[DONE]" {
        return;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        if let Some(c) = u
            .get("completion_tokens")
            .and_then(serde_json::Value::as_u64)
        {
            rec.output_tokens = c as u32;
        }
        if let Some(p) = u.get("prompt_tokens").and_then(serde_json::Value::as_u64) {
            rec.prompt_tokens = p as u32;
        }
        rec.cached_tokens = u
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(serde_json::Value::as_u64)
            .map(|c| c as u32);
    }
    let c0 = v.pointer("/choices/0");
    let text = c0
        .and_then(|c| c.pointer("/delta/content").or_else(|| c.get("text")))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    if text.is_empty() {
        return;
    }
    match last_content {
        None => rec.ttft_ms = Some((now - sent).as_secs_f64() * 1e3),
        Some(prev) => rec.itl_ms.push(((now - *prev).as_secs_f64() * 1e3) as f32),
    }
    *last_content = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_give_ttft_itl_and_usage() {
        let sent = Instant::now();
        let mut rec = Record::default();
        let mut last = None;
        let role = br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        on_event(
            role,
            sent + Duration::from_millis(1),
            sent,
            &mut last,
            &mut rec,
        );
        assert_eq!(rec.ttft_ms, None, "the role event carries no text");
        let tok = br#"data: {"choices":[{"delta":{"content":" hi"}}]}"#;
        on_event(
            tok,
            sent + Duration::from_millis(40),
            sent,
            &mut last,
            &mut rec,
        );
        on_event(
            tok,
            sent + Duration::from_millis(50),
            sent,
            &mut last,
            &mut rec,
        );
        let text = br#"data: {"choices":[{"text":" yo"}]}"#;
        on_event(
            text,
            sent + Duration::from_millis(70),
            sent,
            &mut last,
            &mut rec,
        );
        let usage = br#"data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        on_event(
            usage,
            sent + Duration::from_millis(71),
            sent,
            &mut last,
            &mut rec,
        );
        on_event(b"data: [DONE]", sent, sent, &mut last, &mut rec);
        assert!((rec.ttft_ms.unwrap() - 40.0).abs() < 0.01);
        assert_eq!(rec.itl_ms.len(), 2);
        assert!((f64::from(rec.itl_ms[1]) - 20.0).abs() < 0.01);
        assert_eq!(
            (rec.prompt_tokens, rec.output_tokens, rec.cached_tokens),
            (10, 3, Some(8))
        );
    }

    #[test]
    fn the_picked_endpoints_predicted_ttft_is_read_from_the_decision_header() {
        let h = "picked=sim-3; weights[ttft-cost-scorer=1]; sim-3=1.000[ttft-cost-scorer=1.00,ttft=123ms]; sim-1=0.500[ttft-cost-scorer=0.50,ttft=246ms]";
        assert_eq!(picked_predicted_ttft_ms(h), Some(123.0));
        // The picked row need not be first (ties), and names may prefix one another.
        let h = "picked=sim-1; weights[a=1]; sim-10=1.000[a=1.00,ttft=5ms]; sim-1=1.000[a=1.00,ttft=7ms]";
        assert_eq!(picked_predicted_ttft_ms(h), Some(7.0));
        // A pick among more ties than the header lists costs what the first row costs.
        let h = "picked=sim-7; weights[a=1]; sim-1=1.000[a=1.00,ttft=9ms]; sim-2=1.000[a=1.00,ttft=9ms]; sim-3=1.000[a=1.00,ttft=9ms]; sim-4=1.000[a=1.00,ttft=9ms]";
        assert_eq!(picked_predicted_ttft_ms(h), Some(9.0));
        let h = "picked=sim-7; weights[a=1]; sim-1=1.000[a=1.00,ttft=9ms]; sim-2=0.500[a=0.50,ttft=18ms]";
        assert_eq!(picked_predicted_ttft_ms(h), None);
        // No cost model: no prediction.
        let h = "picked=sim-1; weights[queue-scorer=2]; sim-1=2.000[queue-scorer=1.00]";
        assert_eq!(picked_predicted_ttft_ms(h), None);
        assert_eq!(picked_predicted_ttft_ms("garbage"), None);
    }

    #[test]
    fn a_schedule_gives_the_rate_in_force() {
        let s = [(10.0, 5.0), (20.0, 8.0)];
        assert_eq!(rate_at(&s, 0.0), Some(5.0));
        assert_eq!(rate_at(&s, 10.0), Some(8.0));
        assert_eq!(rate_at(&s, 19.9), Some(8.0));
        assert_eq!(rate_at(&s, 20.0), None);
    }

    #[test]
    fn summary_counts_errors_and_replicas() {
        let ok = |i, rep: &str| Record {
            i,
            status: 200,
            ttft_ms: Some(10.0 * i as f64),
            e2e_ms: Some(100.0),
            output_tokens: 10,
            prompt_tokens: 100,
            cached_tokens: Some(50),
            replica: Some(rep.into()),
            ..Record::default()
        };
        let recs = vec![
            ok(1, "a"),
            ok(2, "a"),
            ok(3, "b"),
            Record {
                i: 4,
                status: 503,
                error: Some("x".into()),
                ..Record::default()
            },
        ];
        let s = Summary::of(&recs, 2.0);
        assert_eq!((s.sent, s.ok), (4, 3));
        assert_eq!(s.errors.get(&503), Some(&1));
        assert_eq!(s.per_replica.get("a"), Some(&2));
        assert!((s.req_per_s - 1.5).abs() < 1e-9);
        assert!((s.output_tok_per_s - 15.0).abs() < 1e-9);
        assert_eq!(s.usage_cache_hit, Some(0.5));
        assert_eq!(s.ttft_ms.p50, Some(20.0));
        assert!(s.render().contains("503×1"));
    }
}
