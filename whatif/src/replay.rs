//! One replay: the real scheduler in front of N simulated engines, in virtual time.
//!
//! Everything runs on a current-thread tokio runtime with paused time: the engines' step loops
//! sleep for their modelled step times, the scraper sleeps for its interval, the trace driver
//! sleeps until each arrival, and tokio moves the clock straight to the next timer whenever
//! every task waits. Nothing touches a socket; a run is exact and repeatable for a seed.
//!
//! The EPP's view is modelled as in production: engine state as of its last scrape (the
//! engine's Prometheus text, rendered by the simulator and read by the EPP's own mapping),
//! optionally delayed by a scrape latency; its own in-flight counts and prefix index, exact
//! and current, as the director keeps them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::config;
use endpoint_picker::datastore::{Datastore, EndpointSpec, PoolSpec, Readiness};
use endpoint_picker::director::Director;
use endpoint_picker::request::{Api, InferenceRequest};
use endpoint_picker::scrape::engine::EngineMapping;
use ext_proc::openai;
use ext_proc::protocol::{FAIRNESS_ID, OBJECTIVE, SLO_TPOT_MS, SLO_TTFT_MS};
use serde::Serialize;
use sim::{Engine, EngineEvent, FinishReason, SubmitRequest};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::WhatIfError;
use crate::trace::TraceRequest;

/// What one replay runs.
#[derive(Debug, Clone)]
pub struct ReplayCfg {
    /// Name of the routing config in reports.
    pub name: String,
    /// The EndpointPickerConfig YAML.
    pub config: String,
    /// Replicas in the pool.
    pub replicas: usize,
    /// Every replica's engine knobs (replica `i` seeds with `seed + i`).
    pub engine: sim::Config,
    /// The EPP's scrape interval.
    pub scrape_interval: Duration,
    /// How old a scrape is when the EPP sees it (request, engine, parse).
    pub scrape_latency: Duration,
    /// Seeds the scheduler's tie-breaking (and, with `engine.seed`, the engines).
    pub seed: u64,
}

/// What happened to one request.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Index in the trace.
    pub index: usize,
    /// Arrival, seconds.
    pub at: f64,
    /// Replica that served it.
    pub replica: Option<usize>,
    /// Time to first token, seconds.
    pub ttft: Option<f64>,
    /// Mean time between output tokens after the first, seconds.
    pub itl: Option<f64>,
    /// End to end, seconds.
    pub e2e: Option<f64>,
    /// Waiting before first scheduled, seconds.
    pub queued: Option<f64>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens served from the engine's prefix cache.
    pub cached_tokens: usize,
    /// Output tokens generated.
    pub output_tokens: usize,
    /// The request's TTFT objective, when it had one.
    pub slo_ttft: Option<f64>,
    /// The request's TPOT objective, when it had one.
    pub slo_tpot: Option<f64>,
    /// Why it failed (shed, no endpoint, engine refusal).
    pub error: Option<String>,
    /// Analysis key from the trace.
    pub key: String,
}

/// A finished replay.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// The routing config's name.
    pub name: String,
    /// Replicas in the pool.
    pub replicas: usize,
    /// Every request, in trace order.
    pub outcomes: Vec<Outcome>,
    /// Virtual seconds from the first arrival to the last completion.
    pub virtual_seconds: f64,
}

/// Replays `trace` under `cfg` on a fresh virtual-time runtime.
pub fn run(cfg: &ReplayCfg, trace: &[TraceRequest]) -> Result<RunResult, WhatIfError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(WhatIfError::Runtime)?;
    rt.block_on(replay(cfg, trace))
}

struct Pool {
    director: Arc<Director>,
    engines: Vec<Engine>,
    by_address: HashMap<SocketAddr, usize>,
    base_model: String,
}

async fn replay(cfg: &ReplayCfg, trace: &[TraceRequest]) -> Result<RunResult, WhatIfError> {
    if cfg.replicas == 0 || cfg.replicas > 65_536 {
        return Err(WhatIfError::Config(format!(
            "replicas must be 1 to 65536, not {}",
            cfg.replicas
        )));
    }
    let loaded = config::load(&cfg.config, cfg.seed)
        .map_err(|e| WhatIfError::Config(format!("{}: {e}", cfg.name)))?;
    let engine_cfg = Arc::new(cfg.engine.clone());
    let mut engines = Vec::with_capacity(cfg.replicas);
    let mut endpoints = Vec::with_capacity(cfg.replicas);
    let mut by_address = HashMap::with_capacity(cfg.replicas);
    for i in 0..cfg.replicas {
        engines.push(
            Engine::spawn(engine_cfg.clone(), i).map_err(|e| WhatIfError::Config(e.to_string()))?,
        );
        let address = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8000));
        by_address.insert(address, i);
        endpoints.push(EndpointSpec {
            name: format!("sim-{i}-rank-0"),
            pod_name: format!("sim-{i}"),
            namespace: "whatif".into(),
            address,
            metrics_address: address,
            rank: 0,
            labels: BTreeMap::new(),
        });
    }
    let datastore = Arc::new(Datastore::new());
    datastore.apply(PoolSpec {
        name: "whatif".into(),
        namespace: "whatif".into(),
        app_protocol: "http".into(),
        endpoints,
    });
    let director = Arc::new(Director::new(datastore, Arc::new(loaded), cfg.seed));
    director.pool_changed();
    let pool = Arc::new(Pool {
        director,
        engines,
        by_address,
        base_model: cfg.engine.model.clone(),
    });

    // The EPP learns every engine's state before the first request, as a pod becomes a
    // candidate only after a scrape.
    scrape_all(&pool, cfg, Duration::ZERO);
    let scraper = {
        let pool = pool.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cfg.scrape_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                scrape_all(&pool, &cfg, cfg.scrape_latency);
            }
        })
    };

    let start = Instant::now();
    let mut running = JoinSet::new();
    for (index, req) in trace.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(req.at)).await;
        let pool = pool.clone();
        let req = req.clone();
        running.spawn(async move { one(&pool, index, &req, start).await });
    }
    let mut outcomes = Vec::with_capacity(trace.len());
    while let Some(done) = running.join_next().await {
        outcomes.push(done.map_err(|e| WhatIfError::Task(e.to_string()))?);
    }
    scraper.abort();
    outcomes.sort_by_key(|o| o.index);
    Ok(RunResult {
        name: cfg.name.clone(),
        replicas: cfg.replicas,
        outcomes,
        virtual_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Scrapes every engine: its Prometheus text through the EPP's vLLM mapping, stored after
/// `latency` (the values are those of the scrape's start).
fn scrape_all(pool: &Arc<Pool>, cfg: &ReplayCfg, latency: Duration) {
    let mapping = EngineMapping::vllm();
    let snapshot = pool.director.datastore().snapshot();
    for endpoint in snapshot.endpoints.iter() {
        let Some(&i) = pool.by_address.get(&endpoint.spec.address) else {
            continue;
        };
        let text = sim::metrics::render(
            cfg.engine.engine,
            &cfg.engine.model,
            &pool.engines[i].snapshot(),
            0.0,
        );
        let mut metrics = mapping.extract(&text).metrics;
        metrics.readiness = Readiness::Serving;
        if latency.is_zero() {
            metrics.updated_at = Some(Instant::now());
            endpoint.store_metrics(metrics);
        } else {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                tokio::time::sleep(latency).await;
                metrics.updated_at = Some(Instant::now());
                endpoint.store_metrics(metrics);
            });
        }
    }
}

async fn one(pool: &Pool, index: usize, req: &TraceRequest, start: Instant) -> Outcome {
    let arrival = Instant::now();
    let header = |names: &[&str]| {
        req.headers
            .iter()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.clone())
    };
    let spellings = |h: ext_proc::protocol::ControlHeader| h.spellings().collect::<Vec<_>>();
    let ms = |v: Option<String>| {
        v.and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v > 0.0)
            .map(|v| v / 1e3)
    };
    let slo_ttft = ms(header(&spellings(SLO_TTFT_MS)));
    let slo_tpot = ms(header(&spellings(SLO_TPOT_MS)));
    let mut out = Outcome {
        index,
        at: arrival.duration_since(start).as_secs_f64(),
        replica: None,
        ttft: None,
        itl: None,
        e2e: None,
        queued: None,
        prompt_tokens: 0,
        cached_tokens: 0,
        output_tokens: 0,
        slo_ttft,
        slo_tpot,
        error: None,
        key: req.key.clone(),
    };
    let api = if req.path.ends_with("chat/completions") {
        Api::ChatCompletions
    } else {
        Api::Completions
    };
    let parsed = match openai::parse_body(api, &req.body) {
        Ok(p) => p,
        Err(e) => {
            out.error = Some(format!("400: {e}"));
            return out;
        }
    };
    let mut request = InferenceRequest {
        request_id: format!("whatif-{index}"),
        api,
        model: parsed.model.clone(),
        target_model: parsed.model,
        prompt: parsed.prompt,
        cache_salt: parsed.cache_salt,
        objective: header(&spellings(OBJECTIVE)),
        fairness_id: header(&spellings(FAIRNESS_ID))
            .unwrap_or_else(|| ext_proc::protocol::DEFAULT_FAIRNESS_ID.to_owned()),
        stream: true,
        body_len: req.body.len(),
        max_tokens: parsed.max_tokens,
        slo_ttft: slo_ttft.map(Duration::from_secs_f64),
        slo_tpot: slo_tpot.map(Duration::from_secs_f64),
        headers: req.headers.clone(),
        ..Default::default()
    };
    pool.director.resolve(&mut request, None);
    let mut routed = match pool.director.route(&request, None, false) {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("not routed: {e}"));
            return out;
        }
    };
    let Some(replica) = routed
        .targets
        .first()
        .and_then(|t| pool.by_address.get(&t.spec.address).copied())
    else {
        out.error = Some("routed outside the pool".into());
        return out;
    };
    out.replica = Some(replica);
    let prompt = match serde_json::from_slice(&req.body)
        .map_err(|e| e.to_string())
        .and_then(|v| sim::prompt_ids(&v))
    {
        Ok(p) => p,
        Err(e) => {
            out.error = Some(format!("engine 400: {e}"));
            return out;
        }
    };
    out.prompt_tokens = prompt.len();
    let lora = (request.target_model != pool.base_model).then(|| request.target_model.clone());
    let mut events = match pool.engines[replica].submit(SubmitRequest {
        prompt,
        max_tokens: req.output_tokens,
        lora,
        finish_reason: FinishReason::Length,
    }) {
        Ok(rx) => rx,
        Err(e) => {
            out.error = Some(format!("engine refused: {e}"));
            return out;
        }
    };
    let mut first = None;
    while let Some(event) = events.recv().await {
        match event {
            EngineEvent::Tokens { at, .. } => {
                if first.is_none() {
                    first = Some(at);
                    // What the EPP sees on the response path: the first streamed chunk.
                    routed.first_token(true);
                }
            }
            EngineEvent::Finished(c) => {
                let t = c.timing;
                out.ttft = Some(t.first_token.duration_since(arrival).as_secs_f64());
                out.e2e = Some(t.finished.duration_since(arrival).as_secs_f64());
                out.queued = Some(t.queue_time().as_secs_f64());
                out.itl = (c.completion_tokens > 1).then(|| {
                    t.finished.duration_since(t.first_token).as_secs_f64()
                        / (c.completion_tokens - 1) as f64
                });
                out.cached_tokens = c.cached_tokens;
                out.output_tokens = c.completion_tokens;
                break;
            }
        }
    }
    if out.e2e.is_none() {
        out.error = Some("engine stopped".into());
    }
    // Dropping `routed` ends the request's in-flight count, as the end of the stream does.
    drop(routed);
    out
}
