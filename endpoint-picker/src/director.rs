//! Request control: everything between "a parsed request" and "these endpoints, in order".
//!
//! For one request the director resolves its objective (priority) and model rewrite, builds
//! the candidate set (the pool, narrowed by any subset hint), applies admission (sheddable
//! requests are rejected while the pool is saturated), runs the data producers and the
//! scheduler, tells the producers the outcome, and counts the request in flight on its primary
//! endpoint until the returned [`Routed`] is dropped, so a vanished client releases its state.

use std::borrow::Cow;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::config::LoadedConfig;
use crate::datastore::{Datastore, Endpoint, EndpointId, Readiness};
use crate::flow::{
    FlowControl, FlowRejection, FlowRequest, MAX_AGENT_ID_BYTES, PoolProbe, PoolReading,
};
use crate::lora::demand::{DemandGuard, LoraDemand};
use crate::request::InferenceRequest;
use crate::saturation::Unrouted;
use crate::scheduling::candidates::CandidateCache;
use crate::scheduling::plugins::filters::AddressMatcher;
use crate::scheduling::{
    Candidate, CycleState, EndpointLoad, InFlightCounts, LoadReading, ScheduleError,
    SchedulingResult,
};
use crate::tokens::TokenProducer;

/// Why a request was not routed. Each maps to one HTTP status at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The pool (or the subset hint ∩ pool) has no endpoint: 503.
    #[error("failed to find endpoint candidates for serving the request")]
    NoCandidates,
    /// A sheddable request while the pool is saturated: 429.
    #[error("request shed: the pool is saturated and the request is sheddable (priority {0})")]
    Shed(i32),
    /// The scheduler found no endpoint: 429.
    #[error("failed to find target endpoint: {0}")]
    Unschedulable(#[from] ScheduleError),
    /// Flow control refused or dropped the request: 429 or 503, with its dropped reason.
    #[error("{0}")]
    FlowControl(FlowRejection),
}

/// A weighted model rewrite target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteTarget {
    /// The model to send to the engine.
    pub model: String,
    /// Relative weight (0 = uniform when all are 0).
    pub weight: u32,
}

/// One rule of an `InferenceModelRewrite`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteRule {
    /// Exact model names this rule matches; empty matches every model.
    pub matches: Vec<String>,
    /// Where matching requests go.
    pub targets: Vec<RewriteTarget>,
}

/// One `InferenceModelRewrite` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRewrite {
    /// Resource name.
    pub name: String,
    /// Creation time (seconds since the epoch) — older resources win ties.
    pub created: i64,
    /// Rules, in order.
    pub rules: Vec<RewriteRule>,
}

/// The objectives and rewrites of the pool, replaced wholesale by discovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    /// `InferenceObjective` name → priority.
    pub objectives: HashMap<String, i32>,
    /// `InferenceModelRewrite`s.
    pub rewrites: Vec<ModelRewrite>,
}

impl Policies {
    /// The rule that applies to `model`: exact matches beat generic rules; among resources the
    /// oldest wins; within a resource the first matching rule wins.
    /// Builds [`RewriteIndex`] each call: the director keeps one per policy change instead.
    pub fn rewrite_rule(&self, model: &str) -> Option<(&ModelRewrite, &RewriteRule)> {
        RewriteIndex::new(self).rule(self, model)
    }
}

/// Which rule of a [`Policies`] applies to each model ([`Policies::rewrite_rule`]'s order),
/// built once when the policies change: a request's lookup is one hash probe, where sorting
/// and scanning every rewrite per request grew with their number.
#[derive(Debug, Default)]
pub struct RewriteIndex {
    /// Model → (rewrite, rule) indices into the policies it was built from.
    exact: HashMap<String, (usize, usize)>,
    /// The oldest resource's first rule that matches every model.
    generic: Option<(usize, usize)>,
}

impl RewriteIndex {
    /// The index of `policies`.
    pub fn new(policies: &Policies) -> Self {
        let mut ordered: Vec<(usize, &ModelRewrite)> =
            policies.rewrites.iter().enumerate().collect();
        ordered
            .sort_by(|(_, a), (_, b)| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
        let mut index = Self::default();
        for (r, rewrite) in ordered {
            for (i, rule) in rewrite.rules.iter().enumerate() {
                if rule.matches.is_empty() {
                    index.generic.get_or_insert((r, i));
                }
                for model in &rule.matches {
                    // The first writer wins: the oldest resource, then its first rule.
                    index.exact.entry(model.clone()).or_insert((r, i));
                }
            }
        }
        index
    }

    /// The rule for `model` in `policies`, which must be the ones this index was built from.
    pub fn rule<'p>(
        &self,
        policies: &'p Policies,
        model: &str,
    ) -> Option<(&'p ModelRewrite, &'p RewriteRule)> {
        let (r, i) = self.exact.get(model).copied().or(self.generic)?;
        let rewrite = policies.rewrites.get(r)?;
        Some((rewrite, rewrite.rules.get(i)?))
    }
}

/// Longest model name a rewrite may send a request to (a client's model name is held to the
/// same bound).
const MAX_TARGET_MODEL_BYTES: usize = 256;

/// Drops the rewrite targets no engine could serve (an empty model, an over-long one, control
/// characters: they would be written into the request body), with a warning naming the
/// resource. A rule left without targets rewrites nothing.
fn drop_unusable_targets(policies: &mut Policies) {
    for rewrite in &mut policies.rewrites {
        for rule in &mut rewrite.rules {
            let before = rule.targets.len();
            rule.targets.retain(|t| {
                !t.model.is_empty()
                    && t.model.len() <= MAX_TARGET_MODEL_BYTES
                    && !t.model.chars().any(char::is_control)
            });
            if rule.targets.len() < before {
                tracing::warn!(
                    rewrite = %rewrite.name,
                    dropped = before - rule.targets.len(),
                    "InferenceModelRewrite: targets with an empty, over-long or unprintable model ignored"
                );
            }
        }
    }
}

/// The policies in force and their rewrite index, swapped together.
#[derive(Debug, Default)]
struct ActivePolicies {
    policies: Arc<Policies>,
    rewrites: RewriteIndex,
}

/// Which endpoint an id names: its name and address, as the datastore keys ids.
type EndpointKey = (String, std::net::SocketAddr);

/// Per-endpoint loads ([`EndpointLoad`]), maintained by the director.
#[derive(Debug, Default)]
pub struct InFlight {
    loads: ArcSwap<Vec<Arc<EndpointLoad>>>,
    /// Taken to replace `loads`; holds, per id, the endpoint (name and address) its load was
    /// last reconciled with at a pool change ([`InFlight::follow_pool`]).
    owners: Mutex<Vec<Option<EndpointKey>>>,
    /// Prefills no stream will see end ([`Director::end_prefill_by_prediction`]), soonest first.
    prefill_deadlines: Mutex<BinaryHeap<PrefillDeadline>>,
}

/// Most prefills waiting for their predicted end at once: one per request in flight whose first
/// token goes unseen, each kept until its deadline. Past it such a request's prompt counts as
/// queued prefill until the answer's end, as before predictions ended it.
const MAX_PREFILL_DEADLINES: usize = 1 << 20;
/// How many of its predicted times to first token a prefill no stream sees is counted for: a
/// margin for a prediction that is short, so that a replica's own queue is not forgotten early.
const PREDICTED_PREFILL_MARGIN: f64 = 2.0;
/// The longest a prefill is counted for by prediction.
const MAX_PREDICTED_PREFILL: Duration = Duration::from_secs(120);

/// When a routed request's unseen prefill is taken to be over.
#[derive(Debug)]
struct PrefillDeadline {
    at: Instant,
    /// Weak: a request released before its deadline frees its prefill at once.
    prefill: std::sync::Weak<Prefill>,
}

impl PartialEq for PrefillDeadline {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for PrefillDeadline {}

impl PartialOrd for PrefillDeadline {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PrefillDeadline {
    /// Reversed: the heap's top is the soonest deadline.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at)
    }
}

impl InFlight {
    /// `prefill` ends at `at` (by the first [`InFlight::end_due_prefills`] after it) unless it
    /// ended before; past [`MAX_PREFILL_DEADLINES`] waiting, it keeps its old end.
    fn end_prefill_at(&self, prefill: &Arc<Prefill>, at: Instant) {
        let mut due = self.prefill_deadlines.lock();
        if due.len() < MAX_PREFILL_DEADLINES {
            due.push(PrefillDeadline {
                at,
                prefill: Arc::downgrade(prefill),
            });
        }
    }

    /// Ends every unseen prefill whose predicted end has passed by `now`.
    fn end_due_prefills(&self, now: Instant) {
        let mut due = self.prefill_deadlines.lock();
        while due.peek().is_some_and(|d| d.at <= now) {
            if let Some(prefill) = due.pop().and_then(|d| d.prefill.upgrade()) {
                prefill.end(false);
            }
        }
    }

    /// Gives every id the pool no longer holds (`live` lists those it does) a fresh load, and
    /// so does an id that now names another endpoint than at the last change, so that a
    /// newcomer handed an id (after the datastore's quarantine) starts uncalibrated with
    /// nothing in flight, instead of inheriting a departed pod's correction factor (up to 8×
    /// either way, which could keep it idle too long to learn its own), or the counts of a
    /// request routed to the departed pod on a snapshot older than its departure. Requests
    /// still in flight there hold the old load and release into it.
    fn follow_pool(&self, live: &HashMap<EndpointId, EndpointKey>) {
        let untouched = |l: &Arc<EndpointLoad>| {
            Arc::strong_count(l) == 1
                && l.calibration.samples() == 0
                && l.read() == LoadReading::default()
        };
        let mut owners = self.owners.lock();
        let cur = self.loads.load_full();
        let mut replace = vec![false; cur.len()];
        for (i, load) in cur.iter().enumerate() {
            let Ok(id) = u32::try_from(i).map(EndpointId) else {
                continue;
            };
            replace[i] = !untouched(load)
                && match (live.get(&id), owners.get(i).and_then(Option::as_ref)) {
                    (None, _) => true,
                    (Some(now), Some(before)) => now != before,
                    (Some(_), None) => false,
                };
        }
        for (id, key) in live {
            let i = id.0 as usize;
            if owners.len() <= i {
                owners.resize(i + 1, None);
            }
            owners[i] = Some(key.clone());
        }
        if !replace.contains(&true) {
            return;
        }
        let next: Vec<Arc<EndpointLoad>> = cur
            .iter()
            .zip(replace)
            .map(|(l, replace)| if replace { Arc::default() } else { l.clone() })
            .collect();
        self.loads.store(Arc::new(next));
    }

    fn load_of(&self, id: EndpointId) -> Arc<EndpointLoad> {
        let idx = id.0 as usize;
        if let Some(c) = self.loads.load().get(idx) {
            return c.clone();
        }
        let _owners = self.owners.lock();
        let cur = self.loads.load_full();
        if let Some(c) = cur.get(idx) {
            return c.clone();
        }
        let mut next: Vec<Arc<EndpointLoad>> = (*cur).clone();
        next.resize_with(idx + 1, Default::default);
        let c = next[idx].clone();
        self.loads.store(Arc::new(next));
        c
    }

    /// Requests in flight on an endpoint.
    pub fn get(&self, id: EndpointId) -> u64 {
        self.view().get(id)
    }

    /// An endpoint's load.
    pub fn reading(&self, id: EndpointId) -> LoadReading {
        self.view()
            .load(id)
            .map(EndpointLoad::read)
            .unwrap_or_default()
    }

    /// A view of every endpoint's load, for the plugins.
    pub fn view(&self) -> InFlightCounts {
        InFlightCounts::new(self.loads.load_full())
    }
}

/// A routed request's share of its primary endpoint's load: counted while in flight, its
/// uncached prompt tokens counted as queued prefill until its first token, released when
/// dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    load: Arc<EndpointLoad>,
    /// Shared with whichever stream may see the first token (see [`FirstToken`]).
    prefill: Arc<Prefill>,
    /// Flow control, told when the request leaves (its slot is free for a queued one).
    flow: Option<Arc<FlowControl>>,
}

/// A routed request's queued prefill: its uncached prompt tokens, counted on its endpoint until
/// the first token, ended exactly once by whoever sees that first (the routing stream, a
/// response observer's stream, or the request's release).
#[derive(Debug)]
struct Prefill {
    load: Arc<EndpointLoad>,
    tokens: u64,
    prefilling: AtomicBool,
    /// Whether the calibration may no longer learn from this request: it did once, or the
    /// request was released. Apart from `prefilling`: a prefill ended by prediction still
    /// learns from the first token an observer sees afterwards.
    calibrated: AtomicBool,
    routed_at: Instant,
    /// The uncorrected model's TTFT for this request there, seconds, when a cost model ran.
    raw_ttft: Option<f64>,
}

impl Prefill {
    /// The prompt no longer counts as queued; with `observed` (a real first token, now) the
    /// endpoint's calibration learns from it, once per request.
    fn end(&self, observed: bool) {
        if self.prefilling.swap(false, Ordering::AcqRel) {
            self.load.prefilling.fetch_sub(1, Ordering::Relaxed);
            self.load
                .prefill_tokens
                .fetch_sub(self.tokens, Ordering::Relaxed);
        }
        // A prediction past what a `Duration` holds (an engine reporting absurd queues) is no
        // sample, not a panic.
        if observed
            && let Some(predicted) = self
                .raw_ttft
                .and_then(|raw| Duration::try_from_secs_f64(raw.max(0.0)).ok())
            && !self.calibrated.swap(true, Ordering::AcqRel)
        {
            self.load
                .calibration
                .observe(predicted, self.routed_at.elapsed());
        }
    }

    /// The request left: nothing of it counts, and a first token told later (an observer
    /// reading a short answer after its end) is no time to first token.
    fn release(&self) {
        self.calibrated.store(true, Ordering::Release);
        self.end(false);
    }
}

/// The end of a routed request's prefill, for a stream other than the one holding the request
/// (a response observer, README "Response path"): [`FirstToken::seen`] ends the prefill at
/// most once, whichever stream sees the first token first, and does nothing once the request
/// was released.
#[derive(Debug, Clone)]
pub struct FirstToken(Arc<Prefill>);

impl FirstToken {
    /// The model server produced its first token; `observed_ttft` as for
    /// [`Routed::first_token`].
    pub fn seen(&self, observed_ttft: bool) {
        self.0.end(observed_ttft);
    }
}

impl InFlightGuard {
    fn new(
        load: Arc<EndpointLoad>,
        prefill_tokens: u64,
        raw_ttft: Option<f64>,
        flow: Option<Arc<FlowControl>>,
    ) -> Self {
        load.requests.fetch_add(1, Ordering::Relaxed);
        load.routed(Instant::now());
        load.prefilling.fetch_add(1, Ordering::Relaxed);
        load.prefill_tokens
            .fetch_add(prefill_tokens, Ordering::Relaxed);
        Self {
            prefill: Arc::new(Prefill {
                load: load.clone(),
                tokens: prefill_tokens,
                prefilling: AtomicBool::new(true),
                calibrated: AtomicBool::new(false),
                routed_at: Instant::now(),
                raw_ttft,
            }),
            load,
            flow,
        }
    }

    fn first_token(&mut self, observed: bool) {
        self.prefill.end(observed);
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.prefill.release();
        self.load.requests.fetch_sub(1, Ordering::Relaxed);
        if let Some(flow) = &self.flow {
            flow.wake();
        }
    }
}

/// A routed request.
#[derive(Debug)]
pub struct Routed {
    /// Target endpoints, primary first.
    pub targets: Vec<Arc<Endpoint>>,
    /// The full scheduling result.
    pub result: SchedulingResult,
    /// Whether the model name was rewritten (the response must be rewritten back).
    pub rewritten: bool,
    /// Upstream request headers the plugins set (lowercase names, each one of
    /// [`crate::scheduling::INTERNAL_REQUEST_HEADERS`]), e.g. `x-kv-cache-source-host-port`.
    pub headers: Vec<(&'static str, String)>,
    in_flight: Option<InFlightGuard>,
    /// The request's count in its adapter's demand (LoRA placement): held, never read, so
    /// that dropping the request releases it.
    _lora_demand: Option<DemandGuard>,
}

impl Routed {
    /// `ip:port[,ip:port…]`, the value of `x-gateway-destination-endpoint`.
    pub fn destination(&self) -> String {
        let mut out = String::with_capacity(self.targets.len() * 22);
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&t.host_port);
        }
        out
    }

    /// The model server produced its first token (the first streamed chunk, or the response
    /// headers of a non-streamed answer): the request's prompt no longer counts as queued
    /// prefill. With `observed_ttft` (a streamed answer, so the time is the real time to first
    /// token) the endpoint's cost calibration learns from it.
    pub fn first_token(&mut self, observed_ttft: bool) {
        if let Some(guard) = self.in_flight.as_mut() {
            guard.first_token(observed_ttft);
        }
    }

    /// A handle that ends this request's prefill from another stream (a response observer);
    /// `None` for a request that counts no load (no primary endpoint).
    pub fn first_token_handle(&self) -> Option<FirstToken> {
        self.in_flight
            .as_ref()
            .map(|guard| FirstToken(guard.prefill.clone()))
    }
}

/// The director. One per process, shared by every stream.
#[derive(Debug)]
pub struct Director {
    datastore: Arc<Datastore>,
    config: Arc<LoadedConfig>,
    policies: ArcSwap<ActivePolicies>,
    in_flight: InFlight,
    rng: Mutex<SmallRng>,
    /// Flow control, with the `flowControl` feature gate on.
    flow: Option<Arc<FlowControl>>,
    /// Set at most once by the binary, which builds the tokenizer the config names.
    token_producer: OnceLock<Arc<TokenProducer>>,
    /// Set at most once by the binary when LoRA placement is on: routed requests for the
    /// catalogue's adapters are counted there.
    lora_demand: OnceLock<Arc<LoraDemand>>,
    /// The last decision's candidates, refreshed for the next.
    candidates: CandidateCache,
}

impl Director {
    /// A director over `datastore` with `config`; `seed` seeds weighted rewrite choices.
    /// With flow control configured, its dispatcher must be run: [`Director::run_flow_control`].
    pub fn new(datastore: Arc<Datastore>, config: Arc<LoadedConfig>, seed: u64) -> Self {
        let flow = config.flow_control.clone().map(FlowControl::new);
        Self {
            datastore,
            config,
            policies: ArcSwap::from_pointee(ActivePolicies::default()),
            in_flight: InFlight::default(),
            rng: Mutex::new(SmallRng::seed_from_u64(seed ^ 0x5eed)),
            flow,
            token_producer: OnceLock::new(),
            lora_demand: OnceLock::new(),
            candidates: CandidateCache::default(),
        }
    }

    /// Flow control, when on.
    pub fn flow_control(&self) -> Option<&Arc<FlowControl>> {
        self.flow.as_ref()
    }

    /// Runs flow control's dispatcher until `token` is cancelled (returns at once when flow
    /// control is off). A long-lived task: run it under the supervisor.
    pub async fn run_flow_control(self: Arc<Self>, token: tokio_util::sync::CancellationToken) {
        let Some(flow) = self.flow.clone() else {
            return;
        };
        flow.run(self, token).await;
    }

    /// What flow control needs of a resolved request.
    pub fn flow_request(&self, request: &InferenceRequest) -> FlowRequest {
        FlowRequest {
            fairness_id: Arc::from(request.fairness_id.as_str()),
            priority: request.priority,
            bytes: request.held_bytes(),
            prompt_tokens: request.prompt_tokens(),
            slo_ttft: request.slo_ttft,
            model: request.model.clone(),
            target_model: request.target_model.clone(),
        }
    }

    /// The whole pool's routable endpoints and its saturation (flow control's view: the
    /// subset hint does not narrow it, as in the reference). `dispatched` requests let go by
    /// flow control and not routed yet count as load.
    pub fn pool_reading(&self, unrouted: Unrouted) -> PoolReading {
        let now = Instant::now();
        // Flow control reads saturation from the prefills counted: ended by prediction here
        // too, or a pool holding requests would wait for a routing that cannot come.
        self.in_flight.end_due_prefills(now);
        let snapshot = self.datastore.snapshot();
        let all = self.candidates.lease(&snapshot.endpoints);
        let candidates = ready_candidates(&all);
        let saturation = self.config.saturation_detector.saturation(
            &candidates,
            &self.in_flight.view(),
            unrouted,
            now,
        );
        PoolReading {
            endpoints: candidates.len(),
            saturation,
        }
    }

    /// The datastore.
    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.datastore
    }

    /// The loaded configuration.
    pub fn config(&self) -> &Arc<LoadedConfig> {
        &self.config
    }

    /// Replaces objectives and rewrites.
    pub fn set_policies(&self, mut policies: Policies) {
        drop_unusable_targets(&mut policies);
        let rewrites = RewriteIndex::new(&policies);
        self.policies.store(Arc::new(ActivePolicies {
            policies: Arc::new(policies),
            rewrites,
        }));
    }

    /// The current objectives and rewrites.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies.load().policies.clone()
    }

    /// Installs the token producer that fills [`InferenceRequest::token_ids`] before
    /// [`Director::route`] (the caller awaits [`TokenProducer::token_ids`] first). Returns false
    /// when one was already installed (the first one stays).
    pub fn set_token_producer(&self, producer: Arc<TokenProducer>) -> bool {
        self.token_producer.set(producer).is_ok()
    }

    /// Installs the LoRA placement's demand counters (once; `false` if already set).
    pub fn set_lora_demand(&self, demand: Arc<LoraDemand>) -> bool {
        self.lora_demand.set(demand).is_ok()
    }

    /// The token producer, when one is installed.
    pub fn token_producer(&self) -> Option<&Arc<TokenProducer>> {
        self.token_producer.get()
    }

    /// In-flight counts.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// Tells the producers the pool changed (call on every datastore update).
    pub fn pool_changed(&self) {
        let snap = self.datastore.snapshot();
        self.in_flight.follow_pool(
            &snap
                .endpoints
                .iter()
                .map(|e| (e.id, (e.spec.name.clone(), e.spec.address)))
                .collect(),
        );
        for p in self.config.scheduler.producers() {
            p.pool_changed(&snap);
        }
    }

    /// Calls [`Director::pool_changed`] at every datastore update until `stop`, and wakes
    /// the flow-control waiting room (an endpoint that came may open it). The pool as it is
    /// when this starts counts as a change: run again after a panic, it must not wait for the
    /// next update to purge what departed while it was down (a departed id past its quarantine
    /// would hand its state to a newcomer).
    pub async fn follow_pool_changes(&self, stop: tokio_util::sync::CancellationToken) {
        let mut changes = self.datastore.subscribe();
        changes.mark_changed();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            self.pool_changed();
            if let Some(flow) = self.flow_control() {
                flow.wake();
            }
        }
    }

    /// Resolves objective priority and model rewrite in place. `forced_target` is the
    /// model-rewrite header's value when the operator trusts it; an InferenceModelRewrite that
    /// matches the request's model wins over it, so that no header can bypass the operator's
    /// rewrites.
    pub fn resolve(&self, request: &mut InferenceRequest, forced_target: Option<&str>) {
        if let Some(headers) = &self.config.agent_identity
            && request.fairness_id == crate::flow::DEFAULT_FAIRNESS_ID
            && let Some(agent) = headers
                .iter()
                .find_map(|h| request.header(h).map(str::trim).filter(|v| is_flow_id(v)))
        {
            request.fairness_id = agent.to_owned();
        }
        let active = self.policies.load();
        let policies = &*active.policies;
        request.priority = request
            .objective
            .as_deref()
            .and_then(|o| policies.objectives.get(o).copied())
            .unwrap_or(0);
        if request.target_model.is_empty() {
            request.target_model = request.model.clone();
        }
        let matched = active.rewrites.rule(policies, &request.model);
        // A rule that matches owns the model, even with no usable target left: the header
        // applies only where the operator wrote no rule.
        if matched.is_none()
            && let Some(forced) = forced_target.filter(|f| !f.is_empty())
        {
            request.target_model = forced.to_owned();
            return;
        }
        let rule = matched.filter(|(_, rule)| !rule.targets.is_empty());
        if let Some((rewrite, rule)) = rule {
            let total: u64 = rule.targets.iter().map(|t| u64::from(t.weight)).sum();
            let mut rng = self.rng.lock();
            let chosen = if total == 0 {
                &rule.targets[rng.random_range(0..rule.targets.len())]
            } else {
                let mut pick = rng.random_range(0..total);
                let mut chosen = &rule.targets[0];
                for t in &rule.targets {
                    if pick < u64::from(t.weight) {
                        chosen = t;
                        break;
                    }
                    pick -= u64::from(t.weight);
                }
                chosen
            };
            request.target_model = chosen.model.clone();
            request.rewrite = Some(rewrite.name.clone());
        }
    }

    /// Routes a resolved request. `subset` is the subset hint, already parsed (`None` = the
    /// whole pool; `Some(empty)` = nothing).
    pub fn route(
        &self,
        request: &InferenceRequest,
        subset: Option<&[AddressMatcher]>,
        explain: bool,
    ) -> Result<Routed, RouteError> {
        let snapshot = self.datastore.snapshot();
        let (leased, subset_only);
        let all: &[Candidate] = match subset {
            None => {
                leased = self.candidates.lease(&snapshot.endpoints);
                &leased
            }
            Some(subset) => {
                subset_only = snapshot
                    .endpoints
                    .iter()
                    .filter(|e| subset.iter().any(|m| m.matches(e.spec.address)))
                    .cloned()
                    .map(Candidate::new)
                    .collect::<Vec<_>>();
                &subset_only
            }
        };
        let candidates = ready_candidates(all);
        if candidates.is_empty() {
            return Err(RouteError::NoCandidates);
        }
        let now = Instant::now();
        self.in_flight.end_due_prefills(now);
        // Flow control, when on, replaces the shedding of sheddable requests: they waited
        // their turn in its queues before coming here.
        if self.flow.is_none()
            && request.priority < 0
            && self.config.saturation_detector.is_saturated(
                &candidates,
                &self.in_flight.view(),
                now,
            )
        {
            return Err(RouteError::Shed(request.priority));
        }
        let scheduler = &self.config.scheduler;
        let mut state = CycleState::new(now);
        state.in_flight = self.in_flight.view();
        scheduler.produce(request, &candidates, &mut state);
        let result = scheduler.schedule(request, &state, &candidates, explain)?;
        scheduler.pre_request(request, &state, &result);
        let headers = scheduler.request_headers(request, &state, &result);
        let targets: Vec<Arc<Endpoint>> = result
            .primary_targets()
            .iter()
            .map(|t| t.candidate.endpoint.clone())
            .collect();
        for t in &targets {
            t.mark_routed();
        }
        let guard = targets.first().map(|t| {
            let cost = state.costs.as_ref().and_then(|c| c.of(t));
            let uncached = match cost {
                Some(c) => c.uncached_tokens,
                None => uncached_tokens(request, &state, t),
            };
            InFlightGuard::new(
                self.in_flight.load_of(t.id),
                uncached,
                cost.map(|c| c.raw_ttft),
                self.flow.clone(),
            )
        });
        let lora_demand = self.lora_demand.get().and_then(|d| {
            let primary = targets.first()?;
            d.routed(&request.target_model, primary.id)
        });
        Ok(Routed {
            targets,
            result,
            rewritten: request.target_model != request.model && !request.model.is_empty(),
            headers,
            in_flight: guard,
            _lora_demand: lora_demand,
        })
    }

    /// The routing stream will not see `routed`'s first token: a non-streamed answer (its
    /// headers come with the whole answer) or a streamed one on the lean or minimal response
    /// path. Its prompt then stops counting as queued prefill on its replica at twice the cost
    /// model's calibrated time to first token (at most 120 s), instead of at the answer's end,
    /// which on a long answer is many times its real prefill. Ended at the next decision after
    /// that time, or sooner by a response observer's first chunk; a request without a cost
    /// prediction keeps the old end.
    pub fn end_prefill_by_prediction(&self, routed: &Routed) {
        let Some(prefill) = routed.in_flight.as_ref().map(|g| &g.prefill) else {
            return;
        };
        let Some(raw) = prefill.raw_ttft else {
            return;
        };
        let predicted = raw * prefill.load.calibration.factor() * PREDICTED_PREFILL_MARGIN;
        if predicted.is_finite() && predicted >= 0.0 {
            let counted = predicted.min(MAX_PREDICTED_PREFILL.as_secs_f64());
            self.in_flight.end_prefill_at(
                prefill,
                prefill.routed_at + Duration::from_secs_f64(counted),
            );
        }
    }
}

impl PoolProbe for Director {
    fn read(&self, unrouted: Unrouted) -> PoolReading {
        self.pool_reading(unrouted)
    }
}

/// A header value fit to be a flow id (`agent-identity`): visible ASCII, at most
/// [`MAX_AGENT_ID_BYTES`].
fn is_flow_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_AGENT_ID_BYTES && v.bytes().all(|b| b.is_ascii_graphic())
}

/// The prompt tokens of `request` that `endpoint` would compute: all of them but the blocks its
/// prefix cache is believed to hold.
fn uncached_tokens(request: &InferenceRequest, state: &CycleState, endpoint: &Endpoint) -> u64 {
    // The precise index where the endpoint's events are trusted, else the approximate one:
    // what the scorers read too.
    request
        .prompt_tokens()
        .saturating_sub(state.cached_tokens(endpoint))
}

/// The endpoints a request may go to: those serving, and those whose first readiness check
/// is under way with their values read; when none serves, those the EPP has no evidence
/// against (never scraped, or scrapes failing), as the reference routes to every pod discovery
/// lists whatever its metrics; never one whose engine said it is still loading. Borrowed when
/// that is every one of them (the usual case), so nothing is cloned.
///
/// An endpoint whose check is under way stays a candidate beside serving ones, weighed by the
/// values its scrape read: after an EPP restart, or a pool edit that renews every endpoint,
/// the first engine to answer its check was otherwise the only candidate until the others
/// answered theirs (up to the scrape timeout for a busy one), and took the whole pool's
/// traffic meanwhile. One not scraped yet is not (it would be weighed as an empty engine,
/// and may not answer at all), nor one whose check went unanswered.
fn ready_candidates(all: &[Candidate]) -> Cow<'_, [Candidate]> {
    let ready: fn(&Candidate) -> bool = if all
        .iter()
        .any(|c| c.metrics.readiness == Readiness::Serving)
    {
        |c| {
            c.metrics.readiness == Readiness::Serving
                || (c.metrics.readiness == Readiness::Unknown && c.metrics.awaiting_check)
        }
    } else {
        |c| c.metrics.readiness != Readiness::Loading
    };
    if all.iter().all(ready) {
        Cow::Borrowed(all)
    } else {
        Cow::Owned(all.iter().filter(|c| ready(c)).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, load_default};
    use crate::datastore::{EngineMetrics, test_util::pool};

    fn director(n: u8) -> Director {
        let ds = Arc::new(Datastore::new());
        ds.apply(pool(n));
        Director::new(ds, Arc::new(load_default(1).unwrap()), 1)
    }

    fn req() -> InferenceRequest {
        InferenceRequest {
            model: "m".into(),
            target_model: "m".into(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn routes_to_least_loaded_and_counts_in_flight() {
        let d = director(3);
        let snap = d.datastore().snapshot();
        for (i, e) in snap.endpoints.iter().enumerate() {
            e.store_metrics(EngineMetrics {
                waiting_queue_size: if i == 1 { 0 } else { 10 },
                updated_at: Some(Instant::now()),
                ..Default::default()
            });
        }
        let routed = d.route(&req(), None, true).unwrap();
        assert_eq!(routed.destination(), "10.0.0.2:8000");
        let why = routed
            .result
            .primary_result()
            .unwrap()
            .explanation
            .as_ref()
            .unwrap()
            .compact(2);
        assert!(why.starts_with("picked=pod-2-rank-0; weights[queue-scorer=2,kv-cache-utilization-scorer=2,prefix-cache-scorer=3]"), "{why}");
        assert!(
            why.contains("pod-2-rank-0=") && why.contains("queue-scorer=1.00"),
            "{why}"
        );
        assert_eq!(d.in_flight().get(snap.endpoints[1].id), 1);
        drop(routed);
        assert_eq!(d.in_flight().get(snap.endpoints[1].id), 0);
    }

    /// Review (scheduling): a prediction past what a `Duration` holds (an engine reporting
    /// absurd queues) panicked on the first token; it is no sample now.
    #[tokio::test(start_paused = true)]
    async fn an_absurd_prediction_is_no_sample() {
        let load = Arc::new(EndpointLoad::default());
        // Not counted as prefilling: only the calibration is under test.
        let prefill = |raw: f64| Prefill {
            load: load.clone(),
            tokens: 0,
            prefilling: AtomicBool::new(false),
            calibrated: AtomicBool::new(false),
            routed_at: Instant::now(),
            raw_ttft: Some(raw),
        };
        let routed: Vec<Prefill> = [2e19, f64::INFINITY, f64::NAN, 0.001]
            .into_iter()
            .map(prefill)
            .collect();
        tokio::time::advance(Duration::from_millis(5)).await;
        for p in &routed[..3] {
            p.end(true);
        }
        assert_eq!(load.calibration.samples(), 0);
        // A sane prediction still teaches.
        routed[3].end(true);
        assert_eq!(load.calibration.samples(), 1);
    }

    /// Review (scheduling): a departed endpoint's load kept its cost calibration, and a
    /// newcomer handed its id inherited it (up to 8× either way). Once the pool no longer
    /// holds an id its slot is fresh; a request still in flight there releases into the old
    /// one, and a live endpoint keeps what it learnt.
    #[tokio::test(start_paused = true)]
    async fn a_departed_endpoints_calibration_is_not_handed_on() {
        let d = director(2);
        let snap = d.datastore().snapshot();
        let (kept, gone) = (snap.endpoints[0].id, snap.endpoints[1].id);
        let slow = |id| {
            let load = d.in_flight().load_of(id);
            for _ in 0..50 {
                load.calibration
                    .observe(Duration::from_millis(10), Duration::from_millis(80));
            }
            assert!(load.calibration.factor() > 3.5);
        };
        slow(kept);
        slow(gone);
        let routed = d.route(&req(), None, false).unwrap();
        let on = routed.result.primary_result().unwrap().targets[0]
            .candidate
            .endpoint
            .id;
        d.pool_changed();
        assert!(
            d.in_flight().load_of(gone).calibration.factor() > 3.5,
            "still in the pool"
        );
        d.datastore().apply(pool(1));
        d.pool_changed();
        let fresh = d.in_flight().load_of(gone);
        assert_eq!(fresh.calibration.factor(), 1.0);
        assert_eq!(fresh.calibration.samples(), 0);
        assert!(d.in_flight().load_of(kept).calibration.factor() > 3.5);
        // The request in flight releases where it was counted; nothing underflows.
        drop(routed);
        assert_eq!(d.in_flight().reading(on), LoadReading::default());
        assert_eq!(d.in_flight().reading(gone), LoadReading::default());
        // A fresh slot is not replaced again on the next change (a handle held counts as a
        // request in flight, so only its address is kept).
        let fresh_at = Arc::as_ptr(&fresh);
        drop(fresh);
        d.pool_changed();
        assert_eq!(Arc::as_ptr(&d.in_flight().load_of(gone)), fresh_at);
    }

    /// An endpoint whose first check is under way shares the traffic with one that already
    /// serves (after a restart, the first to answer took it all); one not scraped yet, or
    /// scraped and not shown to serve (its check unanswered), does not.
    #[tokio::test(start_paused = true)]
    async fn endpoints_awaiting_their_check_share_with_the_first_that_serves() {
        let d = director(3);
        d.pool_changed();
        let snap = d.datastore().snapshot();
        snap.endpoints[0].store_metrics(EngineMetrics {
            updated_at: Some(Instant::now()),
            readiness: Readiness::Serving,
            ..Default::default()
        });
        let spread = |d: &Director| {
            let mut by = std::collections::BTreeSet::new();
            let routed: Vec<Routed> = (0..30)
                .map(|_| d.route(&req(), None, false).unwrap())
                .collect();
            for r in &routed {
                by.insert(r.destination());
            }
            by.len()
        };
        // Not scraped yet: nothing to weigh them by.
        assert_eq!(spread(&d), 1);
        let awaiting = |awaiting_check| EngineMetrics {
            updated_at: Some(Instant::now()),
            readiness: Readiness::Unknown,
            awaiting_check,
            ..Default::default()
        };
        for e in &snap.endpoints[1..] {
            e.store_metrics(awaiting(true));
        }
        assert_eq!(spread(&d), 3);
        // Their check got no answer: no longer.
        for e in &snap.endpoints[1..] {
            e.store_metrics(awaiting(false));
        }
        assert_eq!(spread(&d), 1);
    }

    /// The pool follower purges what departed before it started (a follower run again after
    /// a panic), without waiting for the next update.
    #[tokio::test(start_paused = true)]
    async fn the_pool_follower_takes_the_pool_as_it_finds_it() {
        let d = Arc::new(director(2));
        let gone = d.datastore().snapshot().endpoints[1].id;
        d.pool_changed();
        let load = d.in_flight().load_of(gone);
        load.calibration
            .observe(Duration::from_millis(10), Duration::from_millis(80));
        drop(load);
        d.datastore().apply(pool(1));
        let stop = tokio_util::sync::CancellationToken::new();
        let follower = tokio::spawn({
            let (d, stop) = (d.clone(), stop.clone());
            async move { d.follow_pool_changes(stop).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(d.in_flight().load_of(gone).calibration.samples(), 0);
        // Alive: it follows the next update too, and ends when told.
        let load = d.in_flight().load_of(gone);
        load.calibration
            .observe(Duration::from_millis(10), Duration::from_millis(80));
        drop(load);
        d.datastore().apply(pool(2));
        d.datastore().apply(pool(1));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(d.in_flight().load_of(gone).calibration.samples(), 0);
        stop.cancel();
        follower.await.unwrap();
    }

    /// A request routed on a snapshot older than its pod's departure counts on the slot the
    /// departure made fresh; a newcomer later handed that id does not inherit it.
    #[tokio::test(start_paused = true)]
    async fn a_stale_requests_counts_are_not_handed_to_a_newcomer() {
        let d = director(2);
        let gone = d.datastore().snapshot().endpoints[1].id;
        d.pool_changed();
        d.datastore().apply(pool(1));
        d.pool_changed();
        // The stale request: routed before the change, counted after it.
        let stale = d.in_flight().load_of(gone);
        stale
            .calibration
            .observe(Duration::from_millis(10), Duration::from_millis(80));
        assert_eq!(stale.calibration.samples(), 1);
        // Past the id's quarantine another pod takes it.
        tokio::time::advance(Duration::from_secs(11)).await;
        let mut spec = pool(1);
        spec.endpoints.push(crate::datastore::test_util::spec(9));
        let snap = d.datastore().apply(spec);
        let newcomer = snap
            .endpoints
            .iter()
            .find(|e| e.spec.name == "pod-9-rank-0")
            .unwrap();
        assert_eq!(newcomer.id, gone, "the newcomer takes the departed id");
        d.pool_changed();
        let fresh = d.in_flight().load_of(gone);
        assert!(!Arc::ptr_eq(&fresh, &stale));
        assert_eq!(fresh.calibration.samples(), 0);
        // The same endpoint keeps its load across changes (the check is alive both ways).
        d.pool_changed();
        assert!(Arc::ptr_eq(&d.in_flight().load_of(gone), &fresh));
    }

    /// The end of prefill told from another stream (a response observer) counts once, whoever
    /// tells it first, and not at all after the request left.
    #[tokio::test(start_paused = true)]
    async fn a_first_token_from_another_stream_ends_the_prefill_once() {
        let d = director(1);
        let id = d.datastore().snapshot().endpoints[0].id;
        let reading = || d.in_flight().reading(id);
        let mut routed = d.route(&req(), None, false).unwrap();
        let handle = routed.first_token_handle().expect("a primary endpoint");
        assert_eq!((reading().requests, reading().prefilling), (1, 1));
        handle.seen(true);
        assert_eq!((reading().requests, reading().prefilling), (1, 0));
        // The routing stream's own first token, and the release, end nothing twice.
        routed.first_token(true);
        assert_eq!(reading().prefilling, 0);
        let other = d.route(&req(), None, false).unwrap();
        assert_eq!((reading().requests, reading().prefilling), (2, 1));
        drop(routed);
        assert_eq!((reading().requests, reading().prefilling), (1, 1));
        // A handle outliving its request does nothing.
        let late = other.first_token_handle().unwrap();
        drop(other);
        late.seen(true);
        assert_eq!(
            (
                reading().requests,
                reading().prefilling,
                reading().prefill_tokens
            ),
            (0, 0, 0)
        );
    }

    /// The rule a model gets, as the rewrites were read before the index: sort by (created,
    /// name), the first resource with an exact match (its first such rule), else the first
    /// resource with a generic rule.
    fn rewrite_rule_by_scan<'p>(
        policies: &'p Policies,
        model: &str,
    ) -> Option<(&'p ModelRewrite, &'p RewriteRule)> {
        let mut ordered: Vec<&ModelRewrite> = policies.rewrites.iter().collect();
        ordered.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
        let find = |exact: bool| {
            ordered.iter().find_map(|r| {
                r.rules
                    .iter()
                    .find(|rule| {
                        if exact {
                            rule.matches.iter().any(|m| m == model)
                        } else {
                            rule.matches.is_empty()
                        }
                    })
                    .map(|rule| (*r, rule))
            })
        };
        find(true).or_else(|| find(false))
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x2e117e),
            failure_persistence: None,
            ..Default::default()
        })]
        /// The index answers every model as the scan did: the same resource and rule, with ties
        /// in creation time, duplicate matches, several generic rules and unknown models.
        #[test]
        fn the_rewrite_index_answers_as_the_scan(
            rewrites in proptest::collection::vec(
                (0i64..3, 0u8..4, proptest::collection::vec(
                    proptest::collection::vec(0u8..5, 0..3), 1..4)),
                0..6,
            ),
        ) {
            let policies = Policies {
                objectives: HashMap::new(),
                rewrites: rewrites
                    .iter()
                    .enumerate()
                    .map(|(n, (created, name, rules))| ModelRewrite {
                        name: format!("r{name}-{}", n % 2),
                        created: *created,
                        rules: rules
                            .iter()
                            .enumerate()
                            .map(|(i, matches)| RewriteRule {
                                matches: matches.iter().map(|m| format!("m{m}")).collect(),
                                targets: vec![RewriteTarget {
                                    model: format!("t{n}-{i}"),
                                    weight: 1,
                                }],
                            })
                            .collect(),
                    })
                    .collect(),
            };
            let index = RewriteIndex::new(&policies);
            for model in ["m0", "m1", "m2", "m3", "m4", "unknown"] {
                let by_index = index
                    .rule(&policies, model)
                    .map(|(r, rule)| (r as *const ModelRewrite, rule as *const RewriteRule));
                let by_scan = rewrite_rule_by_scan(&policies, model)
                    .map(|(r, rule)| (r as *const ModelRewrite, rule as *const RewriteRule));
                proptest::prop_assert_eq!(by_index, by_scan, "{}", model);
            }
        }
    }

    /// Review 9: with the default utilization detector, one dispatch cycle let every queued
    /// request go against one scraped reading (the pool at 0.8, 50 queued: all 50 went). Each
    /// release now counts against the next, routed or not, until the next scrape.
    #[tokio::test(start_paused = true)]
    async fn flow_control_counts_its_own_releases_against_one_scrape() {
        let d = director(2);
        let scrape = |waiting| {
            for e in &d.datastore().snapshot().endpoints {
                e.store_metrics(EngineMetrics {
                    waiting_queue_size: waiting,
                    updated_at: Some(Instant::now()),
                    readiness: Readiness::Serving,
                    ..Default::default()
                });
            }
        };
        // 4 of `queueDepthThreshold` 5 waiting on both: 0.8.
        scrape(4);
        let fc = FlowControl::new(crate::flow::FlowConfig::default());
        let mut tickets: Vec<_> = (0..50)
            .map(|_| fc.enqueue(d.flow_request(&req()), Instant::now()))
            .collect();
        // 0.8, then 0.9 with one let go: the third would go at 1.0.
        assert_eq!(fc.dispatch_cycle(Instant::now(), &d), 2);
        let mut routed = Vec::new();
        for ticket in &mut tickets[..2] {
            let admitted = ticket.wait().await.expect("let go");
            routed.push(d.route(&req(), None, false).unwrap());
            drop(admitted);
        }
        // Routed and still prefilling, they count where they went: still 1.0.
        fc.wake();
        assert_eq!(fc.dispatch_cycle(Instant::now(), &d), 0);
        // The next scrape: 1 waiting on each (0.2); eight more fit under 1.0.
        tokio::time::advance(Duration::from_millis(50)).await;
        scrape(1);
        for _ in 0..20 {
            fc.wake();
        }
        assert_eq!(fc.dispatch_cycle(Instant::now(), &d), 8);
        drop(routed);
    }

    /// A prefill no stream will see ends by prediction: at the first decision after twice the
    /// cost model's time to first token, or sooner by a first token after all, and a request
    /// released before its deadline leaves nothing behind. Without a prediction (not the cost
    /// model) nothing changes.
    #[tokio::test(start_paused = true)]
    async fn an_unseen_prefill_ends_at_twice_its_predicted_first_token() {
        let ds = Arc::new(Datastore::new());
        ds.apply(pool(1));
        let d = Director::new(
            ds,
            Arc::new(load(crate::config::profiles::COST_MODEL, 1).unwrap()),
            1,
        );
        d.pool_changed();
        let id = d.datastore().snapshot().endpoints[0].id;
        d.datastore().snapshot().endpoints[0].store_metrics(EngineMetrics {
            updated_at: Some(Instant::now()),
            readiness: Readiness::Serving,
            ..Default::default()
        });
        let prefilling = || d.in_flight().reading(id).prefilling;
        let prompt = |i: usize| InferenceRequest {
            prompt: bytes::Bytes::from(format!("{i:05} ").repeat(1_300)),
            ..req()
        };
        let unseen = d.route(&prompt(0), None, false).unwrap();
        let predicted = unseen.result.primary_result().and_then(|_| {
            let guard = unseen.in_flight.as_ref()?;
            guard.prefill.raw_ttft
        });
        let predicted = Duration::from_secs_f64(predicted.expect("the cost model predicts"));
        d.end_prefill_by_prediction(&unseen);
        // Seen early by an observer: ended then; its deadline later ends nothing twice.
        let observed = d.route(&prompt(1), None, false).unwrap();
        d.end_prefill_by_prediction(&observed);
        observed.first_token_handle().unwrap().seen(false);
        // Released before its deadline.
        let released = d.route(&prompt(2), None, false).unwrap();
        d.end_prefill_by_prediction(&released);
        drop(released);
        assert_eq!(prefilling(), 1);
        // Just before twice the prediction, a decision ends nothing.
        tokio::time::advance(predicted * 2 - Duration::from_millis(1)).await;
        let later = d.route(&prompt(3), None, false).unwrap();
        assert_eq!(prefilling(), 2);
        // After it, the next decision ends the unseen prefill; the request stays in flight.
        tokio::time::advance(Duration::from_millis(2)).await;
        let last = d.route(&prompt(4), None, false).unwrap();
        let reading = d.in_flight().reading(id);
        assert_eq!((reading.requests, reading.prefilling), (4, 2));
        // The two others' deadlines are later (their predictions queue behind the first's
        // prefill), and still kept: ending nothing, since those prefills are over.
        assert_eq!(d.in_flight().prefill_deadlines.lock().len(), 2);
        drop((unseen, observed, later, last));
        let reading = d.in_flight().reading(id);
        assert_eq!(
            (reading.requests, reading.prefilling, reading.prefill_tokens),
            (0, 0, 0)
        );
        // An observer's first token after the deadline is still a sample for the calibration,
        // once; a first token told after the release is not.
        let samples = || d.in_flight().load_of(id).calibration.samples();
        let late = d.route(&prompt(5), None, false).unwrap();
        d.end_prefill_by_prediction(&late);
        let handle = late.first_token_handle().unwrap();
        tokio::time::advance(Duration::from_secs(120)).await;
        // Flow control's reading ends due prefills too (no decision needed).
        d.pool_reading(Unrouted::default());
        assert_eq!(d.in_flight().reading(id).prefilling, 0);
        let before = samples();
        handle.seen(true);
        handle.seen(true);
        assert_eq!(samples(), before + 1);
        let released = d.route(&prompt(6), None, false).unwrap();
        let handle = released.first_token_handle().unwrap();
        drop((late, released));
        handle.seen(true);
        assert_eq!(samples(), before + 1);
        // The reference's default profile predicts nothing: no deadline is kept.
        let plain = director(1);
        let routed = plain.route(&req(), None, false).unwrap();
        plain.end_prefill_by_prediction(&routed);
        assert_eq!(plain.in_flight().prefill_deadlines.lock().len(), 0);
    }

    /// Routing to a quiet endpoint (its scraper waiting out the long interval) wakes its
    /// scraper; the others stay quiet.
    #[tokio::test(start_paused = true)]
    async fn routing_wakes_a_quiet_endpoints_scraper() {
        let d = director(2);
        let snap = d.datastore().snapshot();
        for (i, e) in snap.endpoints.iter().enumerate() {
            e.store_metrics(EngineMetrics {
                waiting_queue_size: if i == 0 { 0 } else { 10 },
                updated_at: Some(Instant::now()),
                ..Default::default()
            });
            e.set_quiet(true);
        }
        let woken = snap.endpoints[0].routed();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let routed = d.route(&req(), None, false).unwrap();
        assert_eq!(routed.destination(), "10.0.0.1:8000");
        assert!(!snap.endpoints[0].is_quiet());
        assert!(snap.endpoints[1].is_quiet(), "not routed to: still quiet");
        tokio::time::timeout(Duration::from_millis(1), woken)
            .await
            .expect("the scraper is woken");
    }

    /// The balanced profile: new conversations (no prefix held anywhere) go to the replica
    /// with the fewest requests in flight from this EPP, even though every scraped metric is
    /// equal; a conversation's next turn then follows its prefix.
    #[tokio::test(start_paused = true)]
    async fn balanced_profile_spreads_new_prefixes_and_keeps_them_sticky() {
        let ds = Arc::new(Datastore::new());
        ds.apply(pool(3));
        let config = load(crate::config::profiles::BALANCED_PREFIX, 1).unwrap();
        let d = Director::new(ds, Arc::new(config), 1);
        d.pool_changed();
        let snap = d.datastore().snapshot();
        for e in &snap.endpoints {
            e.store_metrics(EngineMetrics {
                updated_at: Some(Instant::now()),
                ..Default::default()
            });
        }
        let conversation = |user: usize, turns: usize| InferenceRequest {
            prompt: bytes::Bytes::from(
                (0..turns)
                    .map(|t| format!("user {user} says {t}: ").repeat(40))
                    .collect::<String>(),
            ),
            ..req()
        };
        // Six first turns, each still in flight when the next arrives: two per replica.
        let first: Vec<Routed> = (0..6)
            .map(|u| d.route(&conversation(u, 1), None, false).unwrap())
            .collect();
        for e in &snap.endpoints {
            assert_eq!(d.in_flight().get(e.id), 2, "{}", e.spec.name);
        }
        // Second turns (first turn + more) go where the first turn went, busy or not.
        for (u, routed) in first.iter().enumerate() {
            let next = d.route(&conversation(u, 2), None, false).unwrap();
            assert_eq!(next.destination(), routed.destination(), "user {u}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn subset_hint_restricts_and_empty_subset_is_503() {
        let d = director(3);
        let only3 = [AddressMatcher::parse("10.0.0.3").unwrap()];
        for _ in 0..10 {
            assert_eq!(
                d.route(&req(), Some(&only3), false).unwrap().destination(),
                "10.0.0.3:8000"
            );
        }
        assert_eq!(
            d.route(&req(), Some(&[]), false).unwrap_err(),
            RouteError::NoCandidates
        );
        let outside = [AddressMatcher::parse("192.168.0.1").unwrap()];
        assert_eq!(
            d.route(&req(), Some(&outside), false).unwrap_err(),
            RouteError::NoCandidates
        );
    }

    /// Serving endpoints only; with none serving, the ones without evidence against them; a
    /// loading engine never.
    #[tokio::test(start_paused = true)]
    async fn only_serving_endpoints_are_candidates() {
        let d = director(3);
        let set = |states: [Readiness; 3]| {
            for (e, readiness) in d.datastore().snapshot().endpoints.iter().zip(states) {
                e.store_metrics(EngineMetrics {
                    updated_at: Some(Instant::now()),
                    readiness,
                    ..Default::default()
                });
            }
        };
        let picks = || -> std::collections::BTreeSet<String> {
            (0..30)
                .filter_map(|_| d.route(&req(), None, false).ok())
                .map(|r| r.destination())
                .collect()
        };
        use Readiness::*;
        set([Loading, Serving, Unreachable]);
        assert_eq!(picks(), ["10.0.0.2:8000".to_owned()].into());
        set([Loading, Unknown, Unreachable]);
        assert_eq!(
            picks(),
            ["10.0.0.2:8000".to_owned(), "10.0.0.3:8000".to_owned()].into()
        );
        set([Loading, Loading, Loading]);
        assert_eq!(
            d.route(&req(), None, false).unwrap_err(),
            RouteError::NoCandidates
        );
        set([Serving, Serving, Serving]);
        assert_eq!(picks().len(), 3, "every serving endpoint is a candidate");
    }

    /// The cost model within one scrape interval (no metrics move): a burst of new prompts
    /// spreads evenly, since each routed request queues its prefill on its replica at once; a
    /// hot prefix stays on its replica until that queue costs more than recomputing the prefix,
    /// then takes a second one; as requests get their first token, the first replica is cheap
    /// again.
    #[tokio::test(start_paused = true)]
    async fn the_cost_model_spreads_bursts_and_hands_a_hot_prefix_over() {
        let ds = Arc::new(Datastore::new());
        ds.apply(pool(4));
        let config = load(crate::config::profiles::COST_MODEL, 1).unwrap();
        let d = Director::new(ds, Arc::new(config), 1);
        d.pool_changed();
        let snap = d.datastore().snapshot();
        for e in &snap.endpoints {
            e.store_metrics(EngineMetrics {
                updated_at: Some(Instant::now()),
                readiness: Readiness::Serving,
                ..Default::default()
            });
        }
        let prompt = |text: String| InferenceRequest {
            prompt: bytes::Bytes::from(text),
            ..req()
        };
        let count = |routed: &[Routed]| {
            let mut by: std::collections::BTreeMap<String, usize> = Default::default();
            for r in routed {
                *by.entry(r.destination()).or_default() += 1;
            }
            by.into_values().collect::<Vec<_>>()
        };
        // 40 distinct 2,000-token prompts at once: 10 per replica.
        let burst: Vec<Routed> = (0..40)
            .map(|i| {
                d.route(&prompt(format!("{i:05} ").repeat(1_300)), None, false)
                    .unwrap()
            })
            .collect();
        assert_eq!(count(&burst), [10, 10, 10, 10]);
        drop(burst);
        // One hot 3,000-token prefix (+ a 500-token question each). The first request computes
        // it; then requests pile on its replica, each queueing only its question, until a
        // second replica (recomputing the prefix: 3,500 tokens) is cheaper, after about six.
        let system = "You are a helpful assistant. ".repeat(414);
        let ask = |i: usize| prompt(format!("{system}{}", format!("q{i:04} ").repeat(333)));
        let mut seed = d.route(&ask(0), None, false).unwrap();
        seed.first_token(false);
        let first = seed.destination();
        let hot: Vec<Routed> = (1..25)
            .map(|i| d.route(&ask(i), None, false).unwrap())
            .collect();
        assert!(
            hot[..5].iter().all(|r| r.destination() == first),
            "the holder takes the first ones: {:?}",
            hot.iter().map(Routed::destination).collect::<Vec<_>>()
        );
        let on_first = hot.iter().filter(|r| r.destination() == first).count();
        assert!(
            on_first < 24 && count(&hot).len() > 1,
            "{on_first} of 24 on the holder"
        );
        // Their first tokens come back: a replica holding the prefix is cheapest again (the
        // one with the fewest decodes among them).
        let mut hot = hot;
        for r in &mut hot {
            r.first_token(false);
        }
        let holders: std::collections::BTreeSet<String> =
            hot.iter().map(Routed::destination).collect();
        let next = d
            .route(
                &prompt(format!("{system}{}", "z0000 ".repeat(333))),
                None,
                false,
            )
            .unwrap();
        assert!(holders.contains(&next.destination()), "{holders:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn empty_pool_is_503() {
        let d = director(0);
        assert_eq!(
            d.route(&req(), None, false).unwrap_err(),
            RouteError::NoCandidates
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sheddable_requests_are_shed_when_saturated() {
        let d = director(2);
        for e in d.datastore().snapshot().endpoints.iter() {
            e.store_metrics(EngineMetrics {
                waiting_queue_size: 50,
                updated_at: Some(Instant::now()),
                ..Default::default()
            });
        }
        let mut r = req();
        r.priority = -1;
        assert_eq!(d.route(&r, None, false).unwrap_err(), RouteError::Shed(-1));
        r.priority = 0;
        assert!(
            d.route(&r, None, false).is_ok(),
            "non-sheddable requests still go through"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fallbacks_are_ordered() {
        let cfg = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: max-score-picker\n  parameters:\n    maxNumOfEndpoints: 3\n";
        let ds = Arc::new(Datastore::new());
        ds.apply(pool(3));
        for (i, e) in ds.snapshot().endpoints.iter().enumerate() {
            e.store_metrics(EngineMetrics {
                waiting_queue_size: 10 - i as u64 * 3,
                updated_at: Some(Instant::now()),
                ..Default::default()
            });
        }
        let d = Director::new(ds, Arc::new(load(cfg, 1).unwrap()), 1);
        assert_eq!(
            d.route(&req(), None, false).unwrap().destination(),
            "10.0.0.3:8000,10.0.0.2:8000,10.0.0.1:8000"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn prefix_affinity_sticks_to_the_same_endpoint() {
        let d = director(4);
        for e in d.datastore().snapshot().endpoints.iter() {
            e.store_metrics(EngineMetrics {
                updated_at: Some(Instant::now()),
                ..Default::default()
            });
        }
        let mut r = req();
        r.prompt = bytes::Bytes::from("system prompt ".repeat(100));
        let first = d.route(&r, None, false).unwrap().destination();
        for _ in 0..20 {
            assert_eq!(d.route(&r, None, false).unwrap().destination(), first);
        }
    }

    #[test]
    fn objectives_and_rewrites() {
        let d = director(1);
        let rule = |matches: &[&str], targets: &[(&str, u32)]| RewriteRule {
            matches: matches.iter().map(|s| s.to_string()).collect(),
            targets: targets
                .iter()
                .map(|(m, w)| RewriteTarget {
                    model: m.to_string(),
                    weight: *w,
                })
                .collect(),
        };
        d.set_policies(Policies {
            objectives: HashMap::from([("batch".to_string(), -1)]),
            rewrites: vec![
                ModelRewrite {
                    name: "newer".into(),
                    created: 20,
                    rules: vec![rule(&["m"], &[("newer-target", 1)])],
                },
                ModelRewrite {
                    name: "generic".into(),
                    created: 1,
                    rules: vec![rule(&[], &[("catch-all", 1)])],
                },
                ModelRewrite {
                    name: "older".into(),
                    created: 10,
                    rules: vec![rule(&["m"], &[("a", 3), ("b", 0)])],
                },
            ],
        });
        let mut r = req();
        r.objective = Some("batch".into());
        r.target_model.clear();
        d.resolve(&mut r, None);
        assert_eq!(r.priority, -1);
        assert_eq!(
            r.target_model, "a",
            "exact beats generic, older beats newer, weight 0 never chosen"
        );
        assert_eq!(
            r.rewrite.as_deref(),
            Some("older"),
            "the rewrite that chose"
        );
        let mut other = InferenceRequest {
            model: "x".into(),
            ..Default::default()
        };
        d.resolve(&mut other, None);
        assert_eq!(other.target_model, "catch-all");
        assert_eq!(other.rewrite.as_deref(), Some("generic"));
        // A forced target cannot bypass an operator's rewrite of the model...
        let mut forced = req();
        d.resolve(&mut forced, Some("forced"));
        assert_eq!(forced.target_model, "a");
        assert_eq!(forced.priority, 0);
        // ...and applies where no rewrite matches.
        d.set_policies(Policies::default());
        let mut free = req();
        d.resolve(&mut free, Some("forced"));
        assert_eq!(free.target_model, "forced");
        assert_eq!(free.rewrite, None, "the header is no InferenceModelRewrite");
        // Targets no engine could serve are dropped when the policies are set: the request
        // goes to a usable one, or, with none left, is not rewritten.
        let long = "x".repeat(MAX_TARGET_MODEL_BYTES + 1);
        d.set_policies(Policies {
            objectives: HashMap::new(),
            rewrites: vec![ModelRewrite {
                name: "careless".into(),
                created: 1,
                rules: vec![
                    rule(&["m"], &[("", 5), (long.as_str(), 5), ("ok", 1)]),
                    rule(&["n"], &[("bad\nname", 1)]),
                ],
            }],
        });
        for _ in 0..20 {
            let mut r = req();
            d.resolve(&mut r, None);
            assert_eq!(r.target_model, "ok");
        }
        let mut n = InferenceRequest {
            model: "n".into(),
            ..Default::default()
        };
        d.resolve(&mut n, None);
        assert_eq!(n.target_model, "n");
        assert_eq!(
            n.rewrite, None,
            "a rule without a usable target chose nothing"
        );
        // Nor does the trusted header take a model whose rule lost its targets.
        let mut n = InferenceRequest {
            model: "n".into(),
            ..Default::default()
        };
        d.resolve(&mut n, Some("forced"));
        assert_eq!(n.target_model, "n");
    }
}
