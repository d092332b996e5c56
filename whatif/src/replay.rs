//! One replay: the real scheduler in front of N simulated engines, in virtual time.
//!
//! Everything runs on a current-thread tokio runtime with paused time: one driver completes
//! the engines' modelled steps when they are needed (`Stepper`), the scraper sleeps for its
//! interval, the trace driver sleeps until each arrival, and tokio moves the clock straight to
//! the next timer whenever every task waits. Nothing touches a socket; a run is exact and
//! repeatable for a seed.
//!
//! The EPP's view is modelled as in production: engine state as of its last scrape (the
//! engine's Prometheus text, rendered by the simulator and read by the EPP's own mapping),
//! optionally delayed by a scrape latency; its own in-flight counts and prefix index, exact
//! and current, as the director keeps them; and, for `precise-prefix-cache-scorer`, the
//! engines' own KV-cache events, delivered to its index after a lag ([`KvEventFeed`]).
//!
//! Token ids: with a `token-producer` of the `local` backend declared (as the EPP needs one to
//! give the precise scorer ids), each request carries the ids the simulated engine computes
//! for it (the simulator's built-in tokenizer, the same function on both sides; the tokenizer
//! path of the config is not loaded). Tokenizing takes no virtual time and never misses its
//! deadline; a prompt over the producer's `maxPromptBytes` routes without ids, as in the EPP.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::config;
use endpoint_picker::datastore::{
    Datastore, EndpointId, EndpointSpec, EngineMetrics, PoolSpec, Readiness,
};
use endpoint_picker::director::Director;
use endpoint_picker::kv_index::{SharedKvIndex, StreamState};
use endpoint_picker::request::{Api, InferenceRequest};
use endpoint_picker::scrape::engine::EngineMapping;
use endpoint_picker::tokens::Backend;
use ext_proc::openai;
use ext_proc::protocol::{FAIRNESS_ID, OBJECTIVE, SLO_TPOT_MS, SLO_TTFT_MS};
use kv_events::EventBatch;
use kv_events::codec::MAX_EVENTS_PER_BATCH;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sim::kv_cache::KvEvent;
use sim::{Engine, EngineEvent, FinishReason, Outbox, PromptHashes, StepPlan, SubmitRequest};
use tokio::sync::{Notify, broadcast, mpsc};
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
    /// Adds and removes replicas during the replay; `None` keeps `replicas` throughout.
    pub autoscale: Option<Autoscale>,
    /// How the EPP reads an engine's state.
    pub scrape_path: ScrapePath,
    /// How the engines' KV-cache events reach the EPP's precise index (only read when the
    /// config has a `precise-prefix-cache-scorer`).
    pub kv_events: KvEventFeed,
    /// Threads stepping the engines (1: the replay's own thread only). The result is the
    /// same for any number: engines due at one instant are stepped apart and their events
    /// delivered in (time, replica) order. With KV events fed to a precise index the engines
    /// are stepped on the replay's thread (their events go out as they are made).
    pub step_threads: usize,
    /// Whether the engines' steps are completed when something needs them rather than each
    /// at its end (`Stepper`): the same result for less CPU (a test checks it). Off with
    /// KV events fed to a precise index (they go out as steps complete).
    pub lazy_steps: bool,
    /// EPP replicas routing the pool (active-active, issue 15): each its own director
    /// (in-flight counts, prefix index, speculative entries, RNG seeded `seed + i`), its own
    /// scrape of every engine (the scrapes staggered by `scrape_interval / epps`), and every
    /// engine's KV events. Each request goes to one of them as Envoy's `LEAST_REQUEST` sends an
    /// ext_proc stream: the fewer active requests of two drawn at random. 1 is a single EPP.
    pub epps: usize,
    /// With several EPPs: each EPP's speculative entries (the blocks of a request it just
    /// routed, on the chosen replica) are also made in every other EPP's precise index, this
    /// long after the decision (the network between EPPs); `None` keeps them each EPP's own.
    pub share_speculation: Option<Duration>,
}

/// The most EPP replicas a replay runs.
pub const MAX_EPPS: usize = 16;

/// How the engines' KV-cache events reach the EPP's precise index. Each engine's events of one
/// step form a batch, as the simulator's publisher makes them (`sim::kv_publish`); a batch is
/// applied `lag` after its step, in order per engine. A share `drop_rate` of batches is lost on
/// the way (a ZMQ subscriber past its high-water mark), drawn from the replay's seed. The EPP
/// sees a loss as a sequence gap at the engine's next batch and, without a replay socket,
/// answers it as in production: it clears the endpoint's entries and scores that endpoint from
/// the approximate index for `kv_index::GAP_FALLBACK` (30 s).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KvEventFeed {
    /// From the end of the engine step that made a batch to the EPP applying it.
    pub lag: Duration,
    /// Share of batches lost, 0 to 1.
    pub drop_rate: f64,
}

impl Default for KvEventFeed {
    /// 5 ms: vLLM publishes a step's events from a background thread at the step's end, and
    /// the EPP's subscriber applies them on arrival; a few milliseconds on a pod network.
    fn default() -> Self {
        Self {
            lag: Duration::from_millis(5),
            drop_rate: 0.0,
        }
    }
}

/// How a scrape turns an engine's state into what the EPP sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum ScrapePath {
    /// As in production: the engine's Prometheus text, read by the EPP's vLLM mapping.
    #[default]
    Text,
    /// The same values copied field by field, without rendering and parsing text: half the
    /// CPU of a replay at hundreds of replicas, and equal to [`ScrapePath::Text`] (a test
    /// checks it).
    Direct,
}

/// What the EPP's vLLM mapping reads from `snapshot`, without the text in between.
pub fn direct_metrics(
    engine: &sim::Config,
    snapshot: &sim::metrics::MetricsSnapshot,
) -> EngineMetrics {
    EngineMetrics {
        waiting_queue_size: snapshot.waiting as u64,
        running_requests: snapshot.running as u64,
        kv_cache_usage: snapshot.kv_usage.clamp(0.0, 1.0),
        served_models: vec![engine.model.clone()],
        active_models: snapshot.running_loras.clone(),
        waiting_models: snapshot.waiting_loras.clone(),
        max_active_models: u32::try_from(snapshot.max_loras).unwrap_or(u32::MAX),
        cache_block_size: u32::try_from(snapshot.block_size).ok(),
        cache_num_blocks: Some(snapshot.num_gpu_blocks as u64),
        updated_at: None,
        quiet_until: None,
        readiness: Readiness::Unknown,
        awaiting_check: false,
    }
}

/// What an autoscaling policy watches, averaged over the replicas in the pool (the EPP's view).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum ScaleMetric {
    /// KV-cache utilization (0–1), the pool gauge `inference_pool_average_kv_cache_utilization`.
    KvCache,
    /// Requests in engines' waiting queues, `inference_pool_average_queue_size`.
    Queue,
    /// Requests the EPP has in flight per replica: demand, counted the moment it is routed.
    InFlight,
}

/// An HPA-like policy: every `period`, `desired = ceil(replicas × average / target)`, clamped
/// to `[min, max]`; scaling down takes the highest recommendation of the last
/// `scale_down_window` (the HPA's stabilization window); a new replica joins the pool after
/// `cold_start` (image pull, model load) and costs replica-seconds from the moment it is asked
/// for; a removed one leaves the pool at once and finishes what it holds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Autoscale {
    /// The signal.
    pub metric: ScaleMetric,
    /// Its target per replica.
    pub target: f64,
    /// Fewest replicas.
    pub min: usize,
    /// Most replicas.
    pub max: usize,
    /// How often the policy decides.
    pub period: Duration,
    /// From the decision to serving.
    pub cold_start: Duration,
    /// How long a lower recommendation must persist before replicas are removed.
    pub scale_down_window: Duration,
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
    /// The EPP replica that routed it (0 with one EPP).
    pub epp: usize,
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
    /// Replica-seconds paid for: every replica from the moment it is asked for (cold start
    /// included) until it leaves the pool and has drained.
    pub replica_seconds: f64,
    /// (virtual second, replicas in the pool, replicas starting) at every change.
    pub timeline: Vec<(f64, usize, usize)>,
    /// What the engines' KV events did to the EPP's precise index (zero without one).
    pub kv_events: KvEventCounts,
}

/// The KV-event path's work over a replay, summed over engines (and precise indexes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KvEventCounts {
    /// Batches applied.
    pub batches: u64,
    /// Batches lost (`drop_rate`, or a collector behind its engine's ring).
    pub lost: u64,
    /// Events that changed the index.
    pub applied: u64,
    /// Events the index could not use (unknown parent or block, e.g. after a gap cleared the
    /// endpoint); none in a replay without losses.
    pub unusable: u64,
    /// Gaps the EPP answered by clearing an endpoint.
    pub gaps: u64,
}

/// Replays `trace` under `cfg` on a fresh virtual-time runtime.
pub fn run(cfg: &ReplayCfg, trace: &[TraceRequest]) -> Result<RunResult, WhatIfError> {
    run_stream(cfg, trace.iter().cloned())
}

/// Requests handed from the preparing thread to the replay at once: one wake-up of the other
/// thread per chunk, not per request (a futex call per request was 4 % of the replay).
const PREPARED_CHUNK: usize = 64;
/// Chunks prepared ahead of the replay, at most: with [`PREPARED_CHUNK`], bounds the preparing
/// thread's lead to 1,024 requests (a few MB of bodies and token ids).
const PREPARED_AHEAD: usize = 16;

/// [`run`] over requests made as the replay reaches them (in arrival order): memory holds the
/// requests in flight and one outcome per request, whatever the trace's length.
///
/// A second thread makes the requests and does the work that depends on nothing but each
/// request (making the workload's text, parsing the body as the EPP and the engine do, the
/// engine's tokenizing), a bounded number of requests ahead, while the replay runs on this one:
/// the same work in the same order, so the result is the same as on one thread.
pub fn run_stream(
    cfg: &ReplayCfg,
    trace: impl Iterator<Item = TraceRequest> + Send,
) -> Result<RunResult, WhatIfError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(WhatIfError::Runtime)?;
    let helpers = Arc::new(StepHelpers::default());
    std::thread::scope(|scope| {
        let result = replay_on(scope, cfg, trace, &rt, &helpers);
        // The helpers end with the replay, however it ended.
        helpers.stop();
        result
    })
}

/// [`run_stream`] once its runtime and helpers are made: starts the helper and preparing
/// threads in `scope`, then replays on this thread.
fn replay_on<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    cfg: &'scope ReplayCfg,
    trace: impl Iterator<Item = TraceRequest> + Send + 'scope,
    rt: &tokio::runtime::Runtime,
    helpers: &Arc<StepHelpers>,
) -> Result<RunResult, WhatIfError> {
    {
        for i in 1..cfg.step_threads.clamp(1, MAX_STEP_THREADS) {
            let helpers = helpers.clone();
            std::thread::Builder::new()
                .name(format!("whatif-step-{i}"))
                .spawn_scoped(scope, move || helpers.serve())
                .map_err(WhatIfError::Runtime)?;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(PREPARED_AHEAD);
        let preparing = std::thread::Builder::new().name("whatif-prepare".into());
        preparing
            .spawn_scoped(scope, move || {
                let mut trace = trace.peekable();
                while trace.peek().is_some() {
                    let chunk: Vec<Prepared> = trace
                        .by_ref()
                        .take(PREPARED_CHUNK)
                        .map(|req| Prepared::new(req, &cfg.engine))
                        .collect();
                    // The replay stopped early (an error): so does the preparing.
                    if tx.send(chunk).is_err() {
                        return;
                    }
                }
            })
            .map_err(WhatIfError::Runtime)?;
        rt.block_on(replay(cfg, rx.into_iter().flatten(), helpers))
    }
}

/// Most threads stepping engines ([`ReplayCfg::step_threads`]).
const MAX_STEP_THREADS: usize = 64;

/// Engines due at one instant below which they are stepped on the replay's thread alone:
/// handing a few to another thread costs more than it saves.
const PARALLEL_MIN_ENGINES: usize = 4;

/// How long a helper waits for the next batch, spinning, before it sleeps (the replay wakes
/// it with the next batch). Longer than a busy replay takes between two instants (a few
/// hundred µs): a helper that sleeps wakes after the replay's thread has stepped the whole
/// batch itself (measured: with 50 µs the helper stepped next to nothing). The price is a
/// core spent spinning, free on a machine with a core to spare, and a loss where there is
/// none (measured on a shared VM: 1.7× the wall time of one thread).
const HELPER_SPIN: std::time::Duration = std::time::Duration::from_millis(2);

/// What stepping one engine gave: the step it now runs (`None`: idle), and its events.
type Stepped = (Option<StepPlan>, Outbox);

/// Engines to step at one instant, shared by the replay's thread and the helpers: each takes
/// the next engine until none is left; results are kept in the engines' order.
struct Batch {
    jobs: Vec<(usize, Option<Instant>, Engine)>,
    now: Instant,
    next: std::sync::atomic::AtomicUsize,
    results: Vec<Mutex<Option<Stepped>>>,
    done: std::sync::atomic::AtomicUsize,
}

impl Batch {
    /// Steps engines of the batch until none is left to take.
    fn work(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            let Some((_, end, engine)) = self.jobs.get(k) else {
                return;
            };
            let mut outbox = Outbox::default();
            let plan = engine.advance_to(*end, self.now, &mut outbox);
            *self.results[k].lock() = Some((plan, outbox));
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// The threads that step engines beside the replay's ([`ReplayCfg::step_threads`]): they
/// spin briefly after a batch and then sleep until the next ([`HELPER_SPIN`]).
#[derive(Default)]
struct StepHelpers {
    batch: Mutex<Option<Arc<Batch>>>,
    generation: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
    sleeping: Mutex<Vec<std::thread::Thread>>,
}

impl StepHelpers {
    /// A helper thread's loop, until [`StepHelpers::stop`].
    fn serve(&self) {
        use std::sync::atomic::Ordering;
        let mut seen = 0;
        let mut idle_since = std::time::Instant::now();
        let mut spins = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            let generation = self.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                let batch = self.batch.lock().clone();
                if let Some(batch) = batch {
                    batch.work();
                }
                idle_since = std::time::Instant::now();
                continue;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || idle_since.elapsed() < HELPER_SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Asleep from here: the replay wakes sleepers with each batch.
            self.sleeping.lock().push(std::thread::current());
            if self.generation.load(Ordering::SeqCst) == seen && !self.stop.load(Ordering::SeqCst) {
                std::thread::park_timeout(std::time::Duration::from_millis(50));
            }
            let me = std::thread::current().id();
            self.sleeping.lock().retain(|t| t.id() != me);
            idle_since = std::time::Instant::now();
        }
    }

    /// Wakes the sleeping helpers (a new batch, or the end).
    fn wake_sleepers(&self) {
        for t in self.sleeping.lock().drain(..) {
            t.unpark();
        }
    }

    /// Steps `jobs` at `now` on this thread and the helpers; results in the jobs' order.
    fn step(
        &self,
        jobs: Vec<(usize, Option<Instant>, Engine)>,
        now: Instant,
    ) -> Vec<(usize, Option<StepPlan>, Outbox)> {
        use std::sync::atomic::Ordering;
        let n = jobs.len();
        let batch = Arc::new(Batch {
            results: (0..n).map(|_| Mutex::new(None)).collect(),
            jobs,
            now,
            next: Default::default(),
            done: Default::default(),
        });
        *self.batch.lock() = Some(batch.clone());
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.wake_sleepers();
        batch.work();
        // The last engines a helper took: a few µs each (unless its thread lost its core).
        let mut spins = 0u32;
        while batch.done.load(Ordering::Acquire) < n {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *self.batch.lock() = None;
        batch
            .jobs
            .iter()
            .zip(&batch.results)
            .map(|((i, _, _), r)| {
                // Every job is done: each result is there.
                let (plan, outbox) = r.lock().take().unwrap_or_default();
                (*i, plan, outbox)
            })
            .collect()
    }

    fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake_sleepers();
    }
}

/// Steps every engine from one task ([`drive_engines`]) instead of a task and a timer per
/// engine, and lazily: an engine's steps are completed when something needs them (a request
/// submitted to it, a scrape reading it, or the first instant at which one of its requests
/// may see its first or last token, [`StepPlan::quiet_until`]), several at once
/// ([`Engine::advance_to`]), not one at a time at each step's end. The result is that of
/// completing each step at its end: nothing looks at an engine in between.
struct Stepper {
    state: Mutex<StepperState>,
    /// Tells the driver that an engine must be looked at earlier than it sleeps until.
    wake: Notify,
    /// Whether engines due together may be stepped on several threads.
    parallel: bool,
    /// Whether steps may be left uncompleted until they are needed (`false`: every step is
    /// completed at its end, as the engines' KV events, sent when a step completes, need).
    lazy: bool,
    helpers: Arc<StepHelpers>,
}

#[derive(Default)]
struct StepperState {
    /// Per replica: when the step it is running ends (`None`: idle).
    ends: Vec<Option<Instant>>,
    /// Per replica: when the driver must look at it next (`None`: idle).
    wakes: Vec<Option<Instant>>,
    /// Per replica: the instant of its entry in `due` (`None`: none). A wake that moves later
    /// (each scrape moves most) keeps the entry, which puts the replica back at its new wake
    /// when it comes: one heap entry per replica, not one per change.
    queued: Vec<Option<Instant>>,
    /// (instant, replica); an entry that is no longer the replica's `queued` is skipped.
    due: BinaryHeap<Reverse<(Instant, usize)>>,
    /// The instant the driver sleeps until (`None`: it is running, and looks at `due` again
    /// before it sleeps).
    sleeping_until: Option<Instant>,
}

/// A request's event for delivery: (the end of the step that made it, replica, event).
type Pending = (Instant, usize, sim::OutboxEvent);

impl Stepper {
    fn new(parallel: bool, lazy: bool, helpers: Arc<StepHelpers>) -> Self {
        Self {
            state: Mutex::default(),
            wake: Notify::new(),
            parallel,
            lazy,
            helpers,
        }
    }

    fn add(&self) {
        let mut s = self.state.lock();
        s.ends.push(None);
        s.wakes.push(None);
        s.queued.push(None);
    }

    /// Records replica `i`'s plan; `true` if the driver must be told (it sleeps past the
    /// replica's new wake).
    fn set(&self, s: &mut StepperState, i: usize, plan: Option<StepPlan>) -> bool {
        s.ends[i] = plan.map(|p| p.step_end);
        let wake = plan.map(|p| if self.lazy { p.quiet_until } else { p.step_end });
        s.wakes[i] = wake;
        let Some(wake) = wake else { return false };
        if s.queued[i].is_some_and(|queued| queued <= wake) {
            return false;
        }
        s.queued[i] = Some(wake);
        s.due.push(Reverse((wake, i)));
        s.sleeping_until.is_some_and(|until| wake < until)
    }

    /// Completes replica `i`'s steps that ended by now and plans the next (an idle engine
    /// given a request starts one now), before and after a request is submitted to it; its
    /// events are delivered at once.
    fn touch(&self, i: usize, engine: &Engine) {
        let now = Instant::now();
        let end = self.state.lock().ends[i];
        let mut outbox = Outbox::default();
        let plan = engine.advance_to(end, now, &mut outbox);
        let tell = {
            let mut s = self.state.lock();
            self.set(&mut s, i, plan)
        };
        if tell {
            self.wake.notify_one();
        }
        for event in outbox.drain() {
            event.deliver();
        }
    }

    /// Completes the steps of `engines` (replica, engine) that ended by now, on the pool's
    /// threads when there are enough, and delivers their events in (step end, replica) order.
    fn complete(&self, engines: Vec<(usize, Option<Instant>, Engine)>, events: &mut Vec<Pending>) {
        let now = Instant::now();
        let stepped: Vec<(usize, Option<StepPlan>, Outbox)> =
            if self.parallel && engines.len() >= PARALLEL_MIN_ENGINES {
                self.helpers.step(engines, now)
            } else {
                engines
                    .into_iter()
                    .map(|(i, end, engine)| {
                        let mut outbox = Outbox::default();
                        let plan = engine.advance_to(end, now, &mut outbox);
                        (i, plan, outbox)
                    })
                    .collect()
            };
        let mut tell = false;
        {
            let mut s = self.state.lock();
            for (i, plan, mut outbox) in stepped {
                tell |= self.set(&mut s, i, plan);
                if !outbox.is_empty() {
                    events.extend(outbox.drain().map(|e| (e.at, i, e)));
                }
            }
        }
        if tell {
            self.wake.notify_one();
        }
        // Stable: one engine's events keep their order.
        events.sort_by_key(|&(at, i, _)| (at, i));
        for (_, _, event) in events.drain(..) {
            event.deliver();
        }
    }
}

/// The engines' loop: at each instant at which an engine must be looked at, its steps that
/// ended are completed and the next planned; engines looked at together are independent of
/// one another, so they are stepped on the pool's threads, and their requests' events are
/// then delivered in (step end, replica) order, whatever thread stepped them.
async fn drive_engines(pool: Arc<Pool>) {
    let stepper = &pool.stepper;
    let mut jobs: Vec<(usize, Option<Instant>, Engine)> = Vec::new();
    let mut events = Vec::new();
    loop {
        let now = Instant::now();
        let next = {
            let r = pool.lock();
            let mut s = stepper.state.lock();
            s.sleeping_until = None;
            while let Some(&Reverse((at, i))) = s.due.peek() {
                if at > now {
                    break;
                }
                s.due.pop();
                if s.queued[i] != Some(at) {
                    continue;
                }
                s.queued[i] = None;
                match s.wakes[i] {
                    None => {}
                    // Its wake moved later since it was queued.
                    Some(wake) if wake > now => {
                        s.queued[i] = Some(wake);
                        s.due.push(Reverse((wake, i)));
                    }
                    Some(_) => {
                        s.wakes[i] = None;
                        jobs.push((i, s.ends[i], r.engines[i].clone()));
                    }
                }
            }
            if jobs.is_empty() {
                // Stale entries would wake the driver for nothing.
                while let Some(&Reverse((at, i))) = s.due.peek() {
                    if s.queued[i] == Some(at) {
                        break;
                    }
                    s.due.pop();
                }
                let next = s.due.peek().map(|r| r.0.0);
                // Without a wake, until notified: any wake is earlier than a year.
                s.sleeping_until = Some(next.unwrap_or(now + Duration::from_secs(365 * 86_400)));
                Some(next)
            } else {
                None
            }
        };
        match next {
            Some(Some(wake)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => {}
                    () = stepper.wake.notified() => {}
                }
            }
            Some(None) => stepper.wake.notified().await,
            None => stepper.complete(std::mem::take(&mut jobs), &mut events),
        }
    }
}

/// A trace request with what depends only on it done ahead of time.
struct Prepared {
    req: TraceRequest,
    api: Api,
    /// The body as the EPP parses it.
    parsed: Result<openai::ParsedBody, String>,
    /// The prompt's ids as the engine computes them.
    prompt: Result<Vec<u32>, String>,
    /// The prompt's block hashes as the engine computes them, for the adapter the request
    /// names (the engine computes them itself if the EPP sends it elsewhere).
    hashes: Option<PromptHashes>,
}

impl Prepared {
    fn new(req: TraceRequest, engine: &sim::Config) -> Self {
        let api = if req.path.ends_with("chat/completions") {
            Api::ChatCompletions
        } else {
            Api::Completions
        };
        let parsed = openai::parse_body(api, &req.body).map_err(|e| e.to_string());
        // Only a body the EPP accepts reaches the engine.
        let prompt = match &parsed {
            Ok(_) => serde_json::from_slice(&req.body)
                .map_err(|e| e.to_string())
                .and_then(|v| sim::prompt_ids(&v)),
            Err(e) => Err(e.clone()),
        };
        let hashes = match (&parsed, &prompt) {
            (Ok(parsed), Ok(prompt)) => {
                let lora = (parsed.model != engine.model).then_some(parsed.model.as_str());
                Some(PromptHashes::new(lora, prompt, engine.block_size))
            }
            _ => None,
        };
        Self {
            req,
            api,
            parsed,
            prompt,
            hashes,
        }
    }
}

/// One EPP replica: its director and what it sees.
struct Epp {
    director: Arc<Director>,
    /// The precise indexes the engines' KV events feed (empty: no engine publishes).
    kv_indexes: Vec<Arc<SharedKvIndex>>,
    /// Per precise index: whether its producer makes speculative entries.
    speculates: Vec<bool>,
    /// Requests routed through it whose response has not ended (Envoy's active streams).
    active: std::sync::atomic::AtomicUsize,
}

impl Epp {
    /// The id this EPP's datastore gives the endpoint at `address`; `None` outside its pool
    /// (e.g. a replica the autoscaler removed).
    fn endpoint_at(&self, address: &SocketAddr) -> Option<EndpointId> {
        self.director
            .datastore()
            .snapshot()
            .by_address(address)
            .map(|e| e.id)
    }
}

struct Pool {
    /// The EPP replicas; the first one's view serves the autoscaler.
    epps: Arc<[Epp]>,
    /// Draws the two EPPs `LEAST_REQUEST` compares.
    balancer: Mutex<SmallRng>,
    engine_cfg: Arc<sim::Config>,
    base_model: String,
    replicas: Mutex<Replicas>,
    /// Whether any EPP has a precise index the engines' KV events feed.
    kv_events: bool,
    kv_feed: KvEventFeed,
    /// `Some(maxPromptBytes)` when requests carry token ids (a `local` token producer).
    token_ids: Option<usize>,
    seed: u64,
    kv_counts: Arc<Mutex<KvEventCounts>>,
    stepper: Stepper,
    share_speculation: Option<Duration>,
}

/// Every replica ever started, which are in the pool, and what they cost. Locked briefly,
/// never across an await.
#[derive(Default)]
struct Replicas {
    engines: Vec<Engine>,
    by_address: HashMap<SocketAddr, usize>,
    in_pool: Vec<usize>,
    starting: usize,
    /// Per replica: asked for at, left the pool at.
    paid: Vec<(Instant, Option<Instant>)>,
    timeline: Vec<(f64, usize, usize)>,
}

fn address_of(i: usize) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000))
}

impl Pool {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Replicas> {
        self.replicas.lock()
    }

    /// Starts replica `i`'s engine (paid from now).
    fn start(&self, r: &mut Replicas) -> Result<usize, WhatIfError> {
        let i = r.engines.len();
        let engine = Engine::stepped(self.engine_cfg.clone(), i)
            .map_err(|e| WhatIfError::Config(e.to_string()))?;
        self.stepper.add();
        if self.kv_events {
            feed_kv_events(self, i, engine.subscribe_kv_events());
        }
        r.engines.push(engine);
        r.by_address.insert(address_of(i), i);
        r.paid.push((Instant::now(), None));
        Ok(i)
    }

    /// Publishes the pool's membership to the datastore, as discovery would.
    fn publish(&self, r: &mut Replicas, start: Instant) {
        let endpoints = r
            .in_pool
            .iter()
            .map(|&i| EndpointSpec {
                name: format!("sim-{i}-rank-0"),
                pod_name: format!("sim-{i}"),
                namespace: "whatif".into(),
                address: address_of(i),
                metrics_address: address_of(i),
                rank: 0,
                labels: BTreeMap::new(),
            })
            .collect();
        let spec = PoolSpec {
            name: "whatif".into(),
            namespace: "whatif".into(),
            app_protocol: "http".into(),
            endpoints,
        };
        for epp in self.epps.iter() {
            epp.director.datastore().apply(spec.clone());
            epp.director.pool_changed();
            // Each endpoint's subscriber connects as discovery lists it.
            let snapshot = epp.director.datastore().snapshot();
            for index in &epp.kv_indexes {
                for e in &snapshot.endpoints {
                    if index.stream(e.id) == StreamState::Unknown {
                        index.set_stream(e.id, StreamState::Live);
                    }
                }
            }
        }
        let t = start.elapsed().as_secs_f64();
        let entry = (t, r.in_pool.len(), r.starting);
        r.timeline.push(entry);
    }

    fn engine(&self, i: usize) -> Option<Engine> {
        self.lock().engines.get(i).cloned()
    }

    fn index_of(&self, address: &SocketAddr) -> Option<usize> {
        self.lock().by_address.get(address).copied()
    }

    /// The EPP a new request goes to, as Envoy's `LEAST_REQUEST` picks an ext_proc stream's
    /// host: of two drawn at random, the one with fewer active requests (the first on a tie).
    fn balance(&self) -> usize {
        let n = self.epps.len();
        if n == 1 {
            return 0;
        }
        let (a, b) = {
            let mut rng = self.balancer.lock();
            let a = rng.random_range(0..n);
            let b = (a + rng.random_range(1..n)) % n;
            (a, b)
        };
        let active = |i: usize| {
            self.epps[i]
                .active
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        if active(b) < active(a) { b } else { a }
    }
}

/// One request's ext_proc stream on its EPP: counted active until the response ends.
struct ActiveStream<'a>(&'a Epp);

impl<'a> ActiveStream<'a> {
    fn open(epp: &'a Epp) -> Self {
        epp.active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(epp)
    }
}

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn replay(
    cfg: &ReplayCfg,
    trace: impl Iterator<Item = Prepared>,
    helpers: &Arc<StepHelpers>,
) -> Result<RunResult, WhatIfError> {
    if cfg.replicas == 0 || cfg.replicas > 65_536 {
        return Err(WhatIfError::Config(format!(
            "replicas must be 1 to 65536, not {}",
            cfg.replicas
        )));
    }
    if cfg.epps == 0 || cfg.epps > MAX_EPPS {
        return Err(WhatIfError::Config(format!(
            "EPP replicas must be 1 to {MAX_EPPS}, not {}",
            cfg.epps
        )));
    }
    if cfg.epps > 1 && cfg.autoscale.is_some() {
        return Err(WhatIfError::Config(
            "autoscaling reads one EPP's view: it runs with one EPP replica".into(),
        ));
    }
    if let Some(a) = &cfg.autoscale
        && !(a.min >= 1
            && a.min <= a.max
            && a.max <= 65_536
            && a.target.is_finite()
            && a.target > 0.0
            && !a.period.is_zero())
    {
        return Err(WhatIfError::Config(format!(
            "autoscaling needs 1 ≤ min ≤ max ≤ 65536, a positive target and period: {a:?}"
        )));
    }
    let feed = cfg.kv_events;
    if !(feed.drop_rate.is_finite() && (0.0..=1.0).contains(&feed.drop_rate)) {
        return Err(WhatIfError::Config(format!(
            "the KV-event drop rate must be 0 to 1, not {}",
            feed.drop_rate
        )));
    }
    let mut epps = Vec::with_capacity(cfg.epps);
    let mut token_ids = None;
    for i in 0..cfg.epps as u64 {
        // Each EPP replica its own seed, as the bench starts them: ties break differently.
        let seed = cfg.seed.wrapping_add(i);
        let loaded = config::load(&cfg.config, seed)
            .map_err(|e| WhatIfError::Config(format!("{}: {e}", cfg.name)))?;
        let kv_indexes = loaded
            .precise_producers
            .iter()
            .map(|p| p.index().clone())
            .collect();
        let speculates = loaded
            .precise_producers
            .iter()
            .map(|p| p.params.speculative_indexing)
            .collect();
        token_ids = match loaded.token_producer.as_ref().map(|t| &t.backend) {
            Some(Backend::Local(local)) => Some(local.max_prompt_bytes),
            Some(Backend::Estimate) | None => None,
        };
        let datastore = Arc::new(Datastore::new());
        epps.push(Epp {
            director: Arc::new(Director::new(datastore, Arc::new(loaded), seed)),
            kv_indexes,
            speculates,
            active: Default::default(),
        });
    }
    let kv_indexes_empty = epps.iter().all(|e| e.kv_indexes.is_empty());
    let parallel = kv_indexes_empty && cfg.step_threads > 1;
    let pool = Arc::new(Pool {
        epps: epps.into(),
        balancer: Mutex::new(SmallRng::seed_from_u64(cfg.seed ^ 0x656e_766f_795f_6c62)),
        engine_cfg: Arc::new(cfg.engine.clone()),
        base_model: cfg.engine.model.clone(),
        replicas: Mutex::new(Replicas::default()),
        kv_events: !kv_indexes_empty,
        kv_feed: feed,
        token_ids,
        seed: cfg.seed,
        kv_counts: Arc::default(),
        share_speculation: cfg.share_speculation.filter(|_| cfg.epps > 1),
        // Late steps would send the engines' KV events late.
        stepper: Stepper::new(
            parallel,
            kv_indexes_empty && cfg.lazy_steps,
            helpers.clone(),
        ),
    });
    let start = Instant::now();
    {
        let mut r = pool.lock();
        for _ in 0..cfg.replicas {
            let i = pool.start(&mut r)?;
            r.in_pool.push(i);
        }
        pool.publish(&mut r, start);
    }

    let engines = tokio::spawn(drive_engines(pool.clone()));
    // Every EPP learns every engine's state before the first request, as a pod becomes a
    // candidate only after a scrape.
    for epp in 0..pool.epps.len() {
        scrape_all(&pool, epp, cfg, Duration::ZERO);
    }
    // Each EPP scrapes on its own clock; EPP i's ticks come `i / epps` of an interval after
    // the first's, so between them the EPPs' views are as far apart as independent clocks make
    // them on average.
    let scrapers: Vec<_> = (0..pool.epps.len())
        .map(|epp| {
            let pool = pool.clone();
            let cfg = cfg.clone();
            let phase = cfg
                .scrape_interval
                .mul_f64(epp as f64 / pool.epps.len() as f64);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(
                    start + phase + cfg.scrape_interval,
                    cfg.scrape_interval,
                );
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    scrape_all(&pool, epp, &cfg, cfg.scrape_latency);
                }
            })
        })
        .collect();

    let autoscaler = cfg.autoscale.map(|policy| {
        let pool = pool.clone();
        tokio::spawn(async move { autoscale(&pool, policy, start).await })
    });
    let mut running = JoinSet::new();
    let mut outcomes = Vec::new();
    let mut last = 0.0f64;
    for (index, prepared) in trace.enumerate() {
        let at = prepared.req.at;
        if at.is_nan() || at < last {
            return Err(WhatIfError::Trace(format!(
                "request {index} arrives at {at} s, before the previous one ({last} s)"
            )));
        }
        last = at;
        // Collect what has finished, so that a long replay holds only what is in flight.
        while let Some(done) = running.try_join_next() {
            outcomes.push(done.map_err(|e| WhatIfError::Task(e.to_string()))?);
        }
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        let pool = pool.clone();
        running.spawn(async move { one(&pool, index, prepared, start).await });
    }
    while let Some(done) = running.join_next().await {
        outcomes.push(done.map_err(|e| WhatIfError::Task(e.to_string()))?);
    }
    for scraper in scrapers {
        scraper.abort();
    }
    engines.abort();
    if let Some(task) = autoscaler {
        task.abort();
        // A policy that failed (it cannot start an engine) is the replay's error.
        if let Ok(Err(e)) = task.await {
            return Err(e);
        }
    }
    outcomes.sort_by_key(|o| o.index);
    let end = Instant::now();
    let r = pool.lock();
    let replica_seconds = r
        .paid
        .iter()
        .map(|(from, to)| to.unwrap_or(end).duration_since(*from).as_secs_f64())
        .sum();
    Ok(RunResult {
        name: cfg.name.clone(),
        replicas: r.engines.len(),
        outcomes,
        virtual_seconds: start.elapsed().as_secs_f64(),
        replica_seconds,
        timeline: r.timeline.clone(),
        kv_events: *pool.kv_counts.lock(),
    })
}

/// What travels from an engine's event collector to its subscriber.
enum Feed {
    /// Events were lost before this point (a dropped batch, or the collector fell behind the
    /// engine's ring): the next batch shows a sequence gap.
    Lost,
    /// A batch, made at this instant.
    Batch(Instant, EventBatch),
}

/// Starts replica `i`'s KV-event path: a collector that turns each engine step's events into
/// one batch (as the simulator's publisher does) and drops a share of them, and a subscriber
/// that applies each batch to every precise index `lag` after it was made, in order. Both end
/// with the engine (its event channel closes).
fn feed_kv_events(pool: &Pool, replica: usize, mut rx: broadcast::Receiver<KvEvent>) {
    let (tx, mut batches) = mpsc::unbounded_channel::<Feed>();
    let block_size = u32::try_from(pool.engine_cfg.block_size).unwrap_or(u32::MAX);
    let drop_rate = pool.kv_feed.drop_rate;
    let mut rng = SmallRng::seed_from_u64(
        pool.seed ^ 0x6b76_6576_656e_7473 ^ (replica as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    tokio::spawn(async move {
        loop {
            let mut events = Vec::new();
            let mut lost = false;
            match rx.recv().await {
                Ok(e) => sim::kv_publish::push(&mut events, e, block_size),
                Err(broadcast::error::RecvError::Lagged(_)) => lost = true,
                Err(broadcast::error::RecvError::Closed) => return,
            }
            // What is queued already: the rest of the step.
            while events.len() < MAX_EVENTS_PER_BATCH {
                match rx.try_recv() {
                    Ok(e) => sim::kv_publish::push(&mut events, e, block_size),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => lost = true,
                    Err(_) => break,
                }
            }
            if lost && tx.send(Feed::Lost).is_err() {
                return;
            }
            if events.is_empty() {
                continue;
            }
            let msg = if drop_rate > 0.0 && rng.random_bool(drop_rate) {
                Feed::Lost
            } else {
                Feed::Batch(
                    Instant::now(),
                    EventBatch {
                        ts: 0.0,
                        events,
                        data_parallel_rank: Some(0),
                    },
                )
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    });
    let epps = pool.epps.clone();
    let model = pool.base_model.clone();
    let lag = pool.kv_feed.lag;
    let address = address_of(replica);
    let counts = pool.kv_counts.clone();
    tokio::spawn(async move {
        let mut gap = false;
        while let Some(msg) = batches.recv().await {
            let (made, batch) = match msg {
                Feed::Lost => {
                    counts.lock().lost += 1;
                    gap = true;
                    continue;
                }
                Feed::Batch(made, batch) => (made, batch),
            };
            let due = made + lag;
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            let now = Instant::now();
            let mut c = counts.lock();
            c.batches += 1;
            c.gaps += u64::from(gap);
            // Every EPP's subscriber hears the engine; the counts are the first EPP's.
            for (i, epp) in epps.iter().enumerate() {
                // Outside the pool (removed by the autoscaler), no subscriber listens.
                let Some(id) = epp.endpoint_at(&address) else {
                    continue;
                };
                for index in &epp.kv_indexes {
                    if gap {
                        index.gap(id, now);
                    }
                    let applied = index.apply(id, &model, &batch, now);
                    if i == 0 {
                        c.applied += u64::from(applied.applied);
                        c.unusable += u64::from(applied.dropped_total());
                    }
                }
            }
            gap = false;
        }
    });
}

/// The routing EPP's speculative entries for `request` on `replica`, made in every other EPP's
/// precise indexes `delay` later (as the routing EPP's own producer makes them: only where
/// `speculativeIndexing` is on, for the request's keys).
fn share_speculation(
    pool: &Pool,
    from: usize,
    request: &InferenceRequest,
    replica: usize,
    delay: Duration,
) {
    let Some(tokens) = request.token_ids.clone() else {
        return;
    };
    let address = address_of(replica);
    for (i, epp) in pool.epps.iter().enumerate() {
        if i == from {
            continue;
        }
        let Some(id) = epp.endpoint_at(&address) else {
            continue;
        };
        for (index, &on) in epp.kv_indexes.iter().zip(&epp.speculates) {
            if !on {
                continue;
            }
            let keys = index.hasher().prompt_keys(
                &request.target_model,
                request.cache_salt.as_deref(),
                &tokens,
                endpoint_picker::scheduling::plugins::precise::MAX_LOOKUP_BLOCKS,
            );
            let index = index.clone();
            if delay.is_zero() {
                index.speculate(id, &keys, Instant::now());
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    index.speculate(id, &keys, Instant::now());
                });
            }
        }
    }
}

/// EPP `epp` scrapes every engine: its Prometheus text through the EPP's vLLM mapping, stored
/// after `latency` (the values are those of the scrape's start).
fn scrape_all(pool: &Arc<Pool>, epp: usize, cfg: &ReplayCfg, latency: Duration) {
    let mapping = EngineMapping::vllm();
    let Some(epp) = pool.epps.get(epp) else {
        return;
    };
    let snapshot = epp.director.datastore().snapshot();
    // The engines' steps that ended by now are completed first: their state as of now.
    let now = Instant::now();
    let jobs = {
        let replicas = pool.lock();
        let s = pool.stepper.state.lock();
        snapshot
            .endpoints
            .iter()
            .filter_map(|e| replicas.by_address.get(&e.spec.address))
            .filter(|&&i| s.ends[i].is_some_and(|end| end <= now))
            .map(|&i| (i, s.ends[i], replicas.engines[i].clone()))
            .collect()
    };
    pool.stepper.complete(jobs, &mut Vec::new());
    // One lock for the whole pass (nothing else runs meanwhile: one thread, no await).
    let replicas = pool.lock();
    for endpoint in snapshot.endpoints.iter() {
        let Some(engine) = replicas
            .by_address
            .get(&endpoint.spec.address)
            .and_then(|&i| replicas.engines.get(i))
        else {
            continue;
        };
        let state = engine.snapshot();
        let mut metrics = match cfg.scrape_path {
            ScrapePath::Text => {
                let text = sim::metrics::render(cfg.engine.engine, &cfg.engine.model, &state, 0.0);
                mapping.extract(&text).metrics
            }
            ScrapePath::Direct => direct_metrics(&cfg.engine, &state),
        };
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

/// The policy loop: decide every period; start replicas that join after their cold start;
/// remove the newest ones when the stabilized recommendation is lower.
async fn autoscale(pool: &Arc<Pool>, policy: Autoscale, start: Instant) -> Result<(), WhatIfError> {
    let mut tick = tokio::time::interval(policy.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // (when, recommendation) of the last scale_down_window.
    let mut recent: std::collections::VecDeque<(Instant, usize)> = Default::default();
    loop {
        tick.tick().await;
        let snapshot = pool.epps[0].director.datastore().snapshot();
        let in_pool = snapshot.endpoints.len();
        if in_pool == 0 {
            continue;
        }
        let in_flight = pool.epps[0].director.in_flight().view();
        let total: f64 = snapshot
            .endpoints
            .iter()
            .map(|e| match policy.metric {
                ScaleMetric::KvCache => e.metrics().kv_cache_usage,
                ScaleMetric::Queue => e.metrics().waiting_queue_size as f64,
                ScaleMetric::InFlight => in_flight.get(e.id) as f64,
            })
            .sum();
        let average = total / in_pool as f64;
        let now = Instant::now();
        let mut r = pool.lock();
        let current = r.in_pool.len() + r.starting;
        let wanted = ((in_pool as f64 * average / policy.target).ceil() as usize)
            .clamp(policy.min, policy.max);
        recent.push_back((now, wanted));
        while recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > policy.scale_down_window)
        {
            recent.pop_front();
        }
        let stabilized = recent.iter().map(|(_, w)| *w).max().unwrap_or(wanted);
        if wanted > current {
            for _ in current..wanted {
                let i = pool.start(&mut r)?;
                r.starting += 1;
                let pool = pool.clone();
                let cold_start = policy.cold_start;
                tokio::spawn(async move {
                    tokio::time::sleep(cold_start).await;
                    let mut r = pool.lock();
                    r.starting -= 1;
                    r.in_pool.push(i);
                    pool.publish(&mut r, start);
                });
            }
            pool.publish(&mut r, start);
        } else if stabilized < current && r.in_pool.len() > policy.min {
            let remove = (current - stabilized).min(r.in_pool.len() - policy.min);
            for _ in 0..remove {
                if let Some(i) = r.in_pool.pop() {
                    // Paid until it leaves; what it holds still completes (not counted: a
                    // drained pod is gone within seconds).
                    r.paid[i].1 = Some(now);
                }
            }
            pool.publish(&mut r, start);
        }
    }
}

async fn one(pool: &Pool, index: usize, prepared: Prepared, start: Instant) -> Outcome {
    let Prepared {
        req,
        api,
        parsed,
        prompt,
        hashes,
    } = prepared;
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
        epp: 0,
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
    let parsed = match parsed {
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
        // As the EPP estimates it (from the prompt's content), when no tokenizer gives ids.
        estimated_prompt_tokens: Some(parsed.estimated_prompt_tokens),
        prompt_is_json: parsed.prompt_is_json,
        prompt_media_from: parsed.prompt_media_from,
        cache_salt: parsed.cache_salt,
        objective: header(&spellings(OBJECTIVE)),
        fairness_id: header(&spellings(FAIRNESS_ID))
            .unwrap_or_else(|| ext_proc::protocol::DEFAULT_FAIRNESS_ID.to_owned()),
        stream: true,
        body_len: req.body.len(),
        max_tokens: parsed.max_tokens,
        slo_ttft: slo_ttft.map(Duration::from_secs_f64),
        slo_tpot: slo_tpot.map(Duration::from_secs_f64),
        headers: req.headers,
        ..Default::default()
    };
    // The engine's ids go to the scheduler too when the token producer would hand them over.
    if let (Some(max_bytes), Ok(ids)) = (pool.token_ids, &prompt)
        && request.prompt.len() <= max_bytes
    {
        request.token_ids = Some(Arc::from(ids.as_slice()));
    }
    out.epp = pool.balance();
    let epp = &pool.epps[out.epp];
    let _stream = ActiveStream::open(epp);
    epp.director.resolve(&mut request, None);
    let mut routed = match epp.director.route(&request, None, false) {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("not routed: {e}"));
            return out;
        }
    };
    let Some(replica) = routed
        .targets
        .first()
        .and_then(|t| pool.index_of(&t.spec.address))
    else {
        out.error = Some("routed outside the pool".into());
        return out;
    };
    out.replica = Some(replica);
    if let Some(delay) = pool.share_speculation {
        share_speculation(pool, out.epp, &request, replica, delay);
    }
    let prompt = match prompt {
        Ok(p) => p,
        Err(e) => {
            out.error = Some(format!("engine 400: {e}"));
            return out;
        }
    };
    out.prompt_tokens = prompt.len();
    let lora = (request.target_model != pool.base_model).then(|| request.target_model.clone());
    let Some(engine) = pool.engine(replica) else {
        out.error = Some("no such replica".into());
        return out;
    };
    // The engine as of now (its steps may lag, `Stepper`), then with the request.
    pool.stepper.touch(replica, &engine);
    let submit = SubmitRequest {
        prompt,
        max_tokens: req.output_tokens,
        lora,
        finish_reason: FinishReason::Length,
    };
    let submitted = match hashes {
        Some(hashes) => engine.submit_hashed(submit, hashes),
        None => engine.submit(submit),
    };
    let mut events = match submitted {
        Ok(rx) => rx,
        Err(e) => {
            out.error = Some(format!("engine refused: {e}"));
            return out;
        }
    };
    pool.stepper.touch(replica, &engine);
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
