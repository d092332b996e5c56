//! Demand-driven LoRA adapter placement (opt-in, `--lora-placement-config`; README "LoRA
//! placement").
//!
//! A supervised loop. Every `--lora-placement-interval` it lists each serving endpoint's
//! registered adapters (`GET /v1/models`, bounded), publishes the lists on the endpoints (the
//! request path reads them: `lora-adapter-filter`, `lora-affinity-scorer`), folds the demand
//! the director counted (requests routed per catalogue adapter, in flight per endpoint) into
//! average rates, asks the pure plan (`endpoint_picker::lora::plan`) what to change, and calls
//! the engines directly: `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` at the
//! endpoint's own address.
//!
//! An unload is first taken out of the published list (new requests stop going there), then
//! made only if, a moment later ([`UNLOAD_GRACE`]), no request of the EPP for that adapter is in
//! flight there and the engine's scraped running and waiting lists do not name it; otherwise
//! it is put back and retried on a later pass. An endpoint whose listing fails is skipped (and
//! its adapters unpublished: what it holds is unknown), a load or unload that fails is not
//! tried again on that endpoint for a while, nor are that endpoint's other planned changes
//! meanwhile (the plan pairs an unload with the load it makes room for): each with a backoff
//! doubling from the interval to [`MAX_BACKOFF`], counted from when the call gave up. A listing
//! may take [`MIN_LISTING_WAIT`] or the interval, whichever is longer, from when it gets its
//! call permit; an endpoint not answered by then is skipped and backed off like one whose
//! listing failed. (Loads and unloads keep the whole call timeout: a load may take long.) The `ensureNotExist` adapters an endpoint lists are never published, so
//! requests for them are not steered to it and it drains. The engines are called over one
//! connection pool kept across passes (a connection per engine, reused), at most
//! [`MAX_CONCURRENT_CALLS`] calls at once. Nothing runs on the request path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::datastore::{Datastore, Endpoint, EndpointId, Readiness};
use endpoint_picker::lora::LoadedAdapters;
use endpoint_picker::lora::config::{self as catalogue, Adapter, ConfigError, LoraConfig};
use endpoint_picker::lora::demand::{LoraDemand, RateMeter};
use endpoint_picker::lora::engine::{Engine, Engines};
use endpoint_picker::lora::plan::{self, Action, AdapterDemand, EndpointState, PlanConfig};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long an adapter is out of the published lists before it is unloaded: covers a request
/// routed from the list read just before (routing and counting happen in one synchronous call,
/// so microseconds would do; this is generous).
pub const UNLOAD_GRACE: Duration = Duration::from_millis(200);
/// Longest wait before an endpoint whose call failed is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Most engine calls in flight at once: a pass over 1,000 endpoints lists them 32 at a time
/// rather than opening 1,000 connections together.
pub const MAX_CONCURRENT_CALLS: usize = 32;
/// The least one listing may take (from when it gets its call permit: it may take the pass's
/// interval, or this, whichever is longer, and never more than the call timeout): a listing
/// not in by then counts as failed, so one engine whose API hangs cannot hold every pass, and
/// the loads other endpoints need, for a whole call timeout.
pub const MIN_LISTING_WAIT: Duration = Duration::from_secs(5);

/// Why placement could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The catalogue file could not be read.
    #[error("--lora-placement-config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The catalogue is not a valid `vLLMLoRAConfig`.
    #[error("--lora-placement-config {path}: {source}")]
    Catalogue {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// What the loop needs, checked at start-up.
#[derive(Debug, Clone)]
pub struct PlacementSettings {
    /// The catalogue: adapters placed (`ensureExist`) and adapters unloaded wherever seen
    /// (`ensureNotExist`); ids in both are neither.
    pub catalogue: LoraConfig,
    /// The decision's knobs.
    pub plan: PlanConfig,
    /// Time between passes.
    pub interval: Duration,
    /// Half-life of the demand average.
    pub demand_half_life: Duration,
    /// Adapters one endpoint may hold; `None`: the engine's `max_lora` as scraped.
    pub max_adapters_per_endpoint: Option<usize>,
    /// Deadline of one engine call (listing, loading, unloading).
    pub call_timeout: Duration,
    /// Sent as a bearer token with every engine call (`--lora-placement-api-key-file`).
    pub api_key: Option<Arc<str>>,
}

/// The most bytes an API key file is read for.
const MAX_API_KEY_FILE_BYTES: usize = 4096;

/// The API key in the file at `path`: its content trimmed, visible ASCII (it goes into a
/// header), not empty.
pub fn read_api_key(path: &Path) -> Result<Arc<str>, PlacementError> {
    let invalid = |why: String| {
        PlacementError::Invalid(format!(
            "--lora-placement-api-key-file {}: {why}",
            path.display()
        ))
    };
    let bytes = endpoint_picker::files::read_at_most_blocking(path, MAX_API_KEY_FILE_BYTES)
        .map_err(|e| invalid(e.to_string()))?;
    let key = std::str::from_utf8(&bytes)
        .map(str::trim)
        .map_err(|_| invalid("not text".into()))?;
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "empty, or not visible ASCII (it is sent in a header)".into(),
        ));
    }
    Ok(Arc::from(key))
}

impl PlacementSettings {
    /// Reads and checks the catalogue at `path` and the knobs.
    pub fn load(path: &Path, mut settings: PlacementSettingsArgs) -> Result<Self, PlacementError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| PlacementError::Read {
            path: shown.clone(),
            source,
        })?;
        if meta.len() > catalogue::MAX_FILE_BYTES as u64 {
            return Err(PlacementError::Invalid(format!(
                "--lora-placement-config {shown}: larger than {} bytes",
                catalogue::MAX_FILE_BYTES
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| PlacementError::Read {
            path: shown.clone(),
            source,
        })?;
        let parsed = catalogue::parse(&text, true).map_err(|source| PlacementError::Catalogue {
            path: shown.clone(),
            source,
        })?;
        if parsed.ensure_exist.is_empty() {
            return Err(PlacementError::Invalid(format!(
                "--lora-placement-config {shown}: ensureExist declares no adapter to place"
            )));
        }
        settings.catalogue = Some(parsed);
        settings.check()
    }
}

/// The knobs as given (flags), before [`PlacementSettings::load`] checks them.
#[derive(Debug, Clone, Default)]
pub struct PlacementSettingsArgs {
    /// Filled by [`PlacementSettings::load`] (or by tests).
    pub catalogue: Option<LoraConfig>,
    /// `--lora-placement-interval`.
    pub interval: Duration,
    /// `--lora-placement-min-dwell`.
    pub min_dwell: Duration,
    /// `--lora-placement-max-changes`.
    pub max_changes: usize,
    /// `--lora-placement-band`.
    pub band: f64,
    /// `--lora-placement-min-rate`.
    pub min_rate: f64,
    /// `--lora-placement-demand-half-life`.
    pub demand_half_life: Duration,
    /// `--lora-placement-max-adapters-per-endpoint` (0: the scraped `max_lora`).
    pub max_adapters_per_endpoint: usize,
    /// `--lora-placement-call-timeout`.
    pub call_timeout: Duration,
}

impl PlacementSettingsArgs {
    /// Range checks; the catalogue must be set.
    pub fn check(self) -> Result<PlacementSettings, PlacementError> {
        let bad = |m: String| Err(PlacementError::Invalid(m));
        let Some(catalogue) = self.catalogue else {
            return bad("no LoRA catalogue".into());
        };
        if self.interval < Duration::from_millis(100) {
            return bad("--lora-placement-interval must be at least 100ms".into());
        }
        if self.call_timeout.is_zero() {
            return bad("--lora-placement-call-timeout must be positive".into());
        }
        if self.demand_half_life.is_zero() {
            return bad("--lora-placement-demand-half-life must be positive".into());
        }
        if self.max_changes == 0 || self.max_changes > 1_000 {
            return bad("--lora-placement-max-changes must be in 1..=1000".into());
        }
        if !(0.0..=1.0).contains(&self.band) {
            return bad(format!(
                "--lora-placement-band {} must be in [0, 1] (replicas)",
                self.band
            ));
        }
        if !(self.min_rate.is_finite() && self.min_rate > 0.0) {
            return bad("--lora-placement-min-rate must be positive".into());
        }
        if self.max_adapters_per_endpoint > catalogue::MAX_ADAPTERS {
            return bad(format!(
                "--lora-placement-max-adapters-per-endpoint must be at most {}",
                catalogue::MAX_ADAPTERS
            ));
        }
        Ok(PlacementSettings {
            catalogue,
            plan: PlanConfig {
                min_dwell: self.min_dwell,
                max_changes: self.max_changes,
                band: self.band,
                min_rate: self.min_rate,
            },
            interval: self.interval,
            demand_half_life: self.demand_half_life,
            max_adapters_per_endpoint: (self.max_adapters_per_endpoint > 0)
                .then_some(self.max_adapters_per_endpoint),
            call_timeout: self.call_timeout,
            api_key: None,
        })
    }
}

/// Placement and `lora-adapter-filter` go together: the filter reads the lists only the
/// placement loop makes, and requests must reach the replicas placement loaded. `Err` names
/// what is missing.
pub fn check_profiles(
    config: &endpoint_picker::config::LoadedConfig,
    placement: bool,
) -> Result<(), String> {
    let filter = config.scheduler.profiles().iter().any(|p| {
        p.filters
            .iter()
            .any(|f| f.type_name() == "lora-adapter-filter")
    });
    match (placement, filter) {
        (true, false) => Err(
            "--lora-placement-config needs a scheduling profile with lora-adapter-filter \
             (README \"LoRA placement\"): without it requests for an adapter go to replicas \
             that do not have it"
                .into(),
        ),
        (false, true) => Err(
            "lora-adapter-filter needs --lora-placement-config (only the placement loop lists \
             the engines' adapters; without it the filter would do nothing)"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// `action, result` of an engine call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `load` or `unload`.
    pub action: &'static str,
    /// `success`, `error`, or (unloads) `busy`: requests came, the adapter stayed.
    pub result: &'static str,
}

/// `adapter`: a catalogue adapter (the label set is the catalogue, at most
/// [`catalogue::MAX_ADAPTERS`] names the operator wrote).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterLabels {
    /// The adapter.
    pub adapter: String,
}

/// The families [`PlacementMetrics::register`] adds, with their types.
pub const FAMILIES: &[(&str, &str)] = &[
    ("inference_extension_lora_placement_passes", "counter"),
    ("inference_extension_lora_placement_actions", "counter"),
    (
        "inference_extension_lora_placement_engine_errors",
        "counter",
    ),
    (
        "inference_extension_lora_placement_desired_replicas",
        "gauge",
    ),
    ("inference_extension_lora_placement_replicas", "gauge"),
];

/// The placement's metrics.
#[derive(Debug, Clone, Default)]
pub struct PlacementMetrics {
    /// Passes run.
    pub passes: Counter,
    /// Engine calls that load or unload, by result.
    pub actions: Family<ActionLabels, Counter>,
    /// Adapter listings that failed (the endpoint is skipped for a while).
    pub engine_errors: Counter,
    /// Replicas each adapter should be on.
    pub desired: Family<AdapterLabels, Gauge>,
    /// Replicas each adapter is on, as listed.
    pub actual: Family<AdapterLabels, Gauge>,
}

impl PlacementMetrics {
    /// Registers the families of [`FAMILIES`].
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "inference_extension_lora_placement_passes",
            "LoRA placement passes run",
            self.passes.clone(),
        );
        r.register(
            "inference_extension_lora_placement_actions",
            "LoRA adapter loads and unloads asked of engines, by result",
            self.actions.clone(),
        );
        r.register(
            "inference_extension_lora_placement_engine_errors",
            "Engine adapter listings that failed (the endpoint is skipped with a backoff)",
            self.engine_errors.clone(),
        );
        r.register(
            "inference_extension_lora_placement_desired_replicas",
            "Replicas each catalogue adapter should be loaded on, from its demand",
            self.desired.clone(),
        );
        r.register(
            "inference_extension_lora_placement_replicas",
            "Replicas each catalogue adapter is loaded on, as the engines list them",
            self.actual.clone(),
        );
    }

    fn action(&self, action: &'static str, result: &'static str) {
        self.actions
            .get_or_create(&ActionLabels { action, result })
            .inc();
    }
}

/// What one pass did (for tests and logs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    /// Endpoints whose adapters were listed.
    pub listed: usize,
    /// Replicas wanted per adapter.
    pub desired: BTreeMap<String, usize>,
    /// Actions carried out, with their result.
    pub done: Vec<(Action, &'static str)>,
}

/// The placement loop's state across passes (a restarted task starts afresh: dwell times
/// start again, which only delays changes).
#[derive(Debug)]
pub struct LoopState {
    meter: RateMeter,
    previous: BTreeMap<String, usize>,
    /// When each (endpoint, adapter) was first listed or loaded.
    since: HashMap<(EndpointId, String), Instant>,
    /// Endpoints whose listing failed: consecutive failures and when to try again.
    backoff: HashMap<EndpointId, (u32, Instant)>,
    /// Loads and unloads that failed, per (endpoint, adapter): consecutive failures and when
    /// to try again. Apart from `backoff`: an endpoint that lists fine but refuses one
    /// adapter (a wrong source, a hub error) keeps its other adapters published and placed.
    action_backoff: HashMap<ActionKey, (u32, Instant)>,
}

/// A load or an unload of one adapter on one endpoint, as backed off: (endpoint, adapter, is a
/// load). A load and an unload of the same adapter back off apart.
type ActionKey = (EndpointId, String, bool);

fn action_key(action: &Action) -> ActionKey {
    (
        action.endpoint(),
        action.adapter().to_owned(),
        matches!(action, Action::Load { .. }),
    )
}

/// The planned actions that may run now: an action that failed lately waits out its backoff,
/// and so does the rest of its endpoint's plan for this pass (the plan pairs an unload with the
/// load it makes room for, and one without the other would evict for nothing or load past the
/// slots). The other endpoints' actions go ahead.
fn actions_due(
    actions: Vec<Action>,
    backoff: &HashMap<ActionKey, (u32, Instant)>,
    now: Instant,
) -> Vec<Action> {
    let waiting: BTreeSet<EndpointId> = actions
        .iter()
        .filter(|a| backoff.get(&action_key(a)).is_some_and(|(_, at)| *at > now))
        .map(Action::endpoint)
        .collect();
    actions
        .into_iter()
        .filter(|a| !waiting.contains(&a.endpoint()))
        .collect()
}

/// The placement: catalogue, demand counters, and the loop.
#[derive(Debug)]
pub struct Placement {
    settings: PlacementSettings,
    adapters: BTreeMap<String, Adapter>,
    /// `ensureNotExist`: unloaded when idle, and never published, so that no request is
    /// steered to a replica that still holds one (which would keep it busy, so loaded).
    forbidden: Arc<BTreeSet<String>>,
    demand: Arc<LoraDemand>,
    datastore: Arc<Datastore>,
    metrics: PlacementMetrics,
    /// One connection pool for every endpoint, kept across passes.
    engines: Engines,
    /// Bounds the engine calls in flight at once (listings and each endpoint's changes).
    calls: Arc<Semaphore>,
}

impl Placement {
    /// The placement over `datastore`'s endpoints.
    pub fn new(
        settings: PlacementSettings,
        datastore: Arc<Datastore>,
        metrics: PlacementMetrics,
    ) -> Self {
        let c = &settings.catalogue;
        let adapters: BTreeMap<String, Adapter> = c
            .ensure_exist
            .iter()
            .filter(|(id, _)| !c.conflicts.contains(*id))
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect();
        let forbidden = Arc::new(
            c.ensure_not_exist
                .keys()
                .filter(|id| !c.conflicts.contains(*id))
                .cloned()
                .collect(),
        );
        for id in &c.conflicts {
            tracing::warn!(adapter = %id, "in both ensureExist and ensureNotExist: neither placed nor removed");
        }
        let demand = Arc::new(LoraDemand::new(adapters.keys().cloned()));
        Self {
            engines: Engines::new(settings.call_timeout).with_api_key(settings.api_key.clone()),
            calls: Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS)),
            settings,
            adapters,
            forbidden,
            demand,
            datastore,
            metrics,
        }
    }

    /// The demand counters, for the director ([`endpoint_picker::director::Director::set_lora_demand`]).
    pub fn demand(&self) -> Arc<LoraDemand> {
        self.demand.clone()
    }

    /// A fresh loop state.
    pub fn state(&self) -> LoopState {
        LoopState {
            meter: RateMeter::new(self.settings.demand_half_life),
            previous: BTreeMap::new(),
            since: HashMap::new(),
            backoff: HashMap::new(),
            action_backoff: HashMap::new(),
        }
    }

    /// Runs passes every interval until `token` is cancelled. A long-lived task: run it under
    /// the supervisor.
    pub async fn run(self: Arc<Self>, token: CancellationToken) {
        let mut state = self.state();
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = token.cancelled() => return,
                report = self.pass(&mut state) => {
                    if !report.done.is_empty() {
                        tracing::debug!(?report.done, "LoRA placement pass");
                    }
                }
            }
        }
    }

    fn engine(&self, e: &Endpoint) -> Engine {
        let addr = e.spec.address;
        self.engines.at(&addr.ip().to_string(), addr.port())
    }

    /// One pass: list, plan, act.
    pub async fn pass(&self, st: &mut LoopState) -> PassReport {
        self.metrics.passes.inc();
        let now = Instant::now();
        let snapshot = self.datastore.snapshot();
        let live: BTreeSet<EndpointId> = snapshot.endpoints.iter().map(|e| e.id).collect();
        st.backoff.retain(|id, _| live.contains(id));
        // A failure is forgotten a while after its retry was due and not made (the plan no
        // longer wanted it): the next failure then backs off from the start again.
        st.action_backoff
            .retain(|(id, _, _), (_, at)| live.contains(id) && *at + MAX_BACKOFF > now);
        st.since.retain(|(id, _), _| live.contains(id));

        // 1. What each usable endpoint holds.
        let mut listing = JoinSet::new();
        // Each listing may take `listing_wait` from when it gets its permit (not from the
        // pass's start: in a pool larger than the permits, waiting for one is no failure).
        let listing_wait = self
            .settings
            .interval
            .max(MIN_LISTING_WAIT)
            .min(self.settings.call_timeout);
        for e in &snapshot.endpoints {
            let usable = matches!(
                e.metrics().readiness,
                Readiness::Serving | Readiness::Unknown
            ) && st.backoff.get(&e.id).is_none_or(|(_, at)| *at <= now);
            if !usable {
                e.store_adapters(None);
                continue;
            }
            let (e, engine, calls) = (e.clone(), self.engine(e), self.calls.clone());
            listing.spawn(async move {
                // The semaphore is never closed; were it, the call goes ahead unbounded.
                let _permit = calls.acquire_owned().await.ok();
                let r = tokio::time::timeout(listing_wait, engine.adapters()).await;
                (e, r)
            });
        }
        let mut listed: Vec<(Arc<Endpoint>, BTreeSet<String>)> = Vec::new();
        while let Some(joined) = listing.join_next().await {
            let Ok((e, r)) = joined else { continue };
            let error = match r {
                Ok(Ok(names)) => {
                    st.backoff.remove(&e.id);
                    e.store_adapters(Some(published(&names, &self.forbidden)));
                    listed.push((e, names));
                    continue;
                }
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("no answer within {listing_wait:?}"),
            };
            self.metrics.engine_errors.inc();
            let delay = self.failed(st, e.id);
            tracing::warn!(endpoint = %e.spec.name, %error, retry_in = ?delay, "LoRA placement: listing adapters failed; endpoint skipped");
            e.store_adapters(None);
        }
        listed.sort_by_key(|(e, _)| e.id);
        for (e, names) in &listed {
            st.since
                .retain(|(id, a), _| *id != e.id || names.contains(a));
            for a in names {
                st.since.entry((e.id, a.clone())).or_insert(now);
            }
        }

        // 2. Demand.
        let totals = self.demand.totals();
        let rates = st.meter.update(now, &totals).to_vec();
        let in_flight = self.demand.in_flight_all();
        let demand: Vec<AdapterDemand> = self
            .demand
            .names()
            .iter()
            .zip(&rates)
            .map(|(name, &rate)| AdapterDemand {
                name: name.clone(),
                rate,
                in_flight: in_flight
                    .iter()
                    .filter(|(a, _, _)| a == name)
                    .map(|(_, _, n)| u64::from(*n))
                    .sum(),
            })
            .collect();

        // 3. The plan.
        let endpoints: Vec<EndpointState> = listed
            .iter()
            .map(|(e, names)| {
                let m = e.metrics();
                let mut busy: BTreeSet<String> = m
                    .active_models
                    .iter()
                    .chain(&m.waiting_models)
                    .cloned()
                    .collect();
                busy.extend(
                    in_flight
                        .iter()
                        .filter(|(_, id, _)| *id == e.id)
                        .map(|(a, _, _)| a.clone()),
                );
                EndpointState {
                    id: e.id,
                    capacity: self
                        .settings
                        .max_adapters_per_endpoint
                        .unwrap_or(m.max_active_models as usize),
                    loaded: names
                        .iter()
                        .map(|a| {
                            let since = st.since.get(&(e.id, a.clone())).copied().unwrap_or(now);
                            (a.clone(), since)
                        })
                        .collect(),
                    busy,
                }
            })
            .collect();
        let decided = plan::plan(
            &self.settings.plan,
            now,
            &demand,
            &self.forbidden,
            &endpoints,
            &st.previous,
        );
        st.previous = decided.desired.clone();
        let actions = actions_due(decided.actions, &st.action_backoff, now);
        for (adapter, want) in &decided.desired {
            let on = listed.iter().filter(|(_, n)| n.contains(adapter)).count();
            let labels = AdapterLabels {
                adapter: adapter.clone(),
            };
            self.metrics
                .desired
                .get_or_create(&labels)
                .set(*want as i64);
            self.metrics.actual.get_or_create(&labels).set(on as i64);
        }

        // 4. The changes: endpoints in parallel, each one's actions in order (an unload makes
        //    the room its load needs).
        let mut per_endpoint: BTreeMap<EndpointId, Vec<Action>> = BTreeMap::new();
        for a in actions {
            per_endpoint.entry(a.endpoint()).or_default().push(a);
        }
        let mut work = JoinSet::new();
        for (id, actions) in per_endpoint {
            let Some((e, names)) = listed.iter().find(|(e, _)| e.id == id).cloned() else {
                continue;
            };
            let job = EndpointJob {
                engine: self.engine(&e),
                endpoint: e,
                names,
                forbidden: self.forbidden.clone(),
                adapters: self.adapters.clone(),
                demand: self.demand.clone(),
                metrics: self.metrics.clone(),
            };
            let calls = self.calls.clone();
            work.spawn(async move {
                let _permit = calls.acquire_owned().await.ok();
                job.run(actions).await
            });
        }
        let mut report = PassReport {
            listed: listed.len(),
            desired: decided.desired,
            done: Vec::new(),
        };
        while let Some(joined) = work.join_next().await {
            let Ok((id, done)) = joined else {
                continue;
            };
            for (action, result) in &done {
                let pair = action_key(action);
                match (action, *result) {
                    (Action::Load { adapter, .. }, "success") => {
                        st.action_backoff.remove(&pair);
                        st.since.insert((id, adapter.clone()), now);
                    }
                    (Action::Unload { adapter, .. }, "success") => {
                        st.action_backoff.remove(&pair);
                        st.since.remove(&(id, adapter.clone()));
                    }
                    (_, "error") => {
                        let failures = st.action_backoff.get(&pair).map_or(0, |(n, _)| *n) + 1;
                        let delay = self.backoff_after(failures);
                        tracing::info!(endpoint = ?id, adapter = %pair.1, load = pair.2, retry_in = ?delay, "LoRA placement: action backed off");
                        // From when the call gave up, not the pass's start: the first
                        // back-offs are shorter than a call's timeout.
                        st.action_backoff
                            .insert(pair, (failures, Instant::now() + delay));
                    }
                    _ => {}
                }
            }
            report.done.extend(done);
        }
        report.done.sort();
        report
    }

    /// Counts a failed listing of `id`; returns the delay before it is tried again, counted
    /// from now (when the call gave up).
    fn failed(&self, st: &mut LoopState, id: EndpointId) -> Duration {
        let failures = st.backoff.get(&id).map_or(0, |(n, _)| *n) + 1;
        let delay = self.backoff_after(failures);
        st.backoff.insert(id, (failures, Instant::now() + delay));
        delay
    }

    /// The wait after `failures` consecutive failures: doubling from the interval up to
    /// [`MAX_BACKOFF`].
    fn backoff_after(&self, failures: u32) -> Duration {
        self.settings
            .interval
            .saturating_mul(1u32 << failures.min(16))
            .min(MAX_BACKOFF)
    }
}

/// One endpoint's share of a pass: its actions, in order, stopping at the first that fails.
struct EndpointJob {
    endpoint: Arc<Endpoint>,
    engine: Engine,
    names: BTreeSet<String>,
    forbidden: Arc<BTreeSet<String>>,
    adapters: BTreeMap<String, Adapter>,
    demand: Arc<LoraDemand>,
    metrics: PlacementMetrics,
}

/// What the request path is told an endpoint holds: what it lists, less the forbidden
/// adapters (requests for one are not steered to a replica that still holds it).
fn published(names: &BTreeSet<String>, forbidden: &BTreeSet<String>) -> LoadedAdapters {
    LoadedAdapters {
        names: names.difference(forbidden).cloned().collect(),
    }
}

impl EndpointJob {
    fn publish(&self) {
        self.endpoint
            .store_adapters(Some(published(&self.names, &self.forbidden)));
    }

    fn busy(&self, adapter: &str) -> bool {
        let m = self.endpoint.metrics();
        self.demand.in_flight(adapter, self.endpoint.id) > 0
            || m.active_models.iter().any(|a| a == adapter)
            || m.waiting_models.iter().any(|a| a == adapter)
    }

    /// Returns the endpoint and what was done, with results (`"error"`: the call failed, and
    /// the endpoint's later actions were not tried).
    async fn run(mut self, actions: Vec<Action>) -> (EndpointId, Vec<(Action, &'static str)>) {
        let name = self.endpoint.spec.name.clone();
        let mut done = Vec::new();
        for action in actions {
            match &action {
                Action::Unload { adapter, .. } => {
                    // Out of the list first: new requests go elsewhere.
                    self.names.remove(adapter);
                    self.publish();
                    tokio::time::sleep(UNLOAD_GRACE).await;
                    if self.busy(adapter) {
                        self.names.insert(adapter.clone());
                        self.publish();
                        self.metrics.action("unload", "busy");
                        tracing::info!(endpoint = %name, %adapter, "LoRA placement: unload put off, requests are running");
                        done.push((action, "busy"));
                        break;
                    }
                    match self.engine.unload(adapter).await {
                        Ok(()) => {
                            self.metrics.action("unload", "success");
                            tracing::info!(endpoint = %name, %adapter, "LoRA placement: adapter unloaded");
                            done.push((action, "success"));
                        }
                        Err(err) => {
                            self.names.insert(adapter.clone());
                            self.publish();
                            self.metrics.action("unload", "error");
                            tracing::warn!(endpoint = %name, %adapter, error = %err, "LoRA placement: unload failed");
                            done.push((action, "error"));
                            return (self.endpoint.id, done);
                        }
                    }
                }
                Action::Load { adapter, .. } => {
                    let Some(spec) = self.adapters.get(adapter) else {
                        break;
                    };
                    match self.engine.load(spec).await {
                        Ok(()) => {
                            self.names.insert(adapter.clone());
                            self.publish();
                            self.metrics.action("load", "success");
                            tracing::info!(endpoint = %name, %adapter, "LoRA placement: adapter loaded");
                            done.push((action, "success"));
                        }
                        Err(err) => {
                            self.metrics.action("load", "error");
                            tracing::warn!(endpoint = %name, %adapter, error = %err, "LoRA placement: load failed");
                            done.push((action, "error"));
                            return (self.endpoint.id, done);
                        }
                    }
                }
            }
        }
        (self.endpoint.id, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backed-off action holds back its endpoint's other actions of the pass (an unload and
    /// the load it makes room for go together), not the other endpoints'; its key tells a load
    /// from an unload, and a backoff that is over holds nothing.
    #[test]
    fn a_backed_off_action_holds_its_endpoints_plan_only() {
        let now = Instant::now();
        let (e0, e1) = (EndpointId(0), EndpointId(1));
        let unload = |endpoint, adapter: &str| Action::Unload {
            endpoint,
            adapter: adapter.into(),
        };
        let load = |endpoint, adapter: &str| Action::Load {
            endpoint,
            adapter: adapter.into(),
        };
        let plan = vec![
            unload(e0, "old"),
            load(e0, "new"),
            unload(e1, "old"),
            load(e1, "new"),
        ];
        let mut backoff = HashMap::new();
        backoff.insert(
            action_key(&unload(e0, "old")),
            (1, now + Duration::from_secs(2)),
        );
        // The same adapter's load on e1 is not the backed-off unload on e0.
        backoff.insert(
            action_key(&load(e1, "old")),
            (1, now + Duration::from_secs(2)),
        );
        assert_eq!(
            actions_due(plan.clone(), &backoff, now),
            [unload(e1, "old"), load(e1, "new")]
        );
        assert_eq!(
            actions_due(plan.clone(), &backoff, now + Duration::from_secs(2)),
            plan
        );
    }

    #[test]
    fn families_list_matches_the_registry() {
        let mut registry = Registry::default();
        let m = PlacementMetrics::default();
        m.register(&mut registry);
        m.passes.inc();
        m.engine_errors.inc();
        m.action("load", "success");
        let labels = AdapterLabels {
            adapter: "a".into(),
        };
        m.desired.get_or_create(&labels).set(1);
        m.actual.get_or_create(&labels).set(1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        crate::metrics::tests::assert_registered_families_are(&text, FAMILIES);
    }

    fn args() -> PlacementSettingsArgs {
        PlacementSettingsArgs {
            catalogue: Some(
                catalogue::parse(
                    "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: a, source: org/a}\n",
                    true,
                )
                .unwrap(),
            ),
            interval: Duration::from_secs(1),
            min_dwell: Duration::from_secs(10),
            max_changes: 4,
            band: 0.25,
            min_rate: 0.01,
            demand_half_life: Duration::from_secs(10),
            max_adapters_per_endpoint: 0,
            call_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(args().check().is_ok());
        for broken in [
            PlacementSettingsArgs {
                interval: Duration::from_millis(10),
                ..args()
            },
            PlacementSettingsArgs {
                max_changes: 0,
                ..args()
            },
            PlacementSettingsArgs {
                band: 2.0,
                ..args()
            },
            PlacementSettingsArgs {
                min_rate: 0.0,
                ..args()
            },
            PlacementSettingsArgs {
                catalogue: None,
                ..args()
            },
        ] {
            assert!(broken.check().is_err());
        }
        let dir = std::env::temp_dir().join(format!("lora-placement-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.yaml");
        std::fs::write(&empty, "vLLMLoRAConfig:\n  name: x\n").unwrap();
        assert!(matches!(
            PlacementSettings::load(&empty, args()),
            Err(PlacementError::Invalid(_))
        ));
        assert!(matches!(
            PlacementSettings::load(&dir.join("missing.yaml"), args()),
            Err(PlacementError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
