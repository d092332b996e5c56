//! Kubernetes mode: which model routes to which pool, learned from the HTTPRoutes themselves
//! (read with the `gateway-api` crate), and the routes that can never match.
//!
//! A rule is a *model rule* when one of its matches carries an `Exact` header match on
//! `X-Gateway-Base-Model-Name` and/or `X-Gateway-Model-Name` (header names compared without
//! case) and one of its backendRefs is an `InferencePool` (group `inference.networking.k8s.io`).
//! Other rules, other matches of a model rule, `RegularExpression` header matches and
//! non-pool backends are not indexed. Within one match the two headers are ANDed, as the
//! gateway does.
//!
//! A match serves a model when the headers the router would set for it satisfy the match: a
//! base-model match serves the base model and all its adapters, a model match serves that name,
//! a match on both serves the model when its base model is the one named. It counts only
//! through a backendRef that can take traffic: the InferencePool exists (in the namespace the
//! ref names, default the route's) and the ref's port, if given, is one of its `targetPorts`.
//!
//! Routes that can never match are reported, per (route, rule, reason, detail), with reasons
//! ([`Reason`]): `unknown_model` (a header value that no mapping ConfigMap names: the router
//! never sets that base model, and sets that model only for a client asking for a model no
//! ConfigMap declares; or a model/base pair the mapping contradicts), `missing_pool` (a
//! backendRef to an InferencePool that does not exist) and `port_mismatch` (a backendRef port
//! not among the pool's `targetPorts`). They are logged once when they appear (warn) and when
//! they go (info), not per request, and counted in the gauge `bbr_unmatchable_routes{reason}`.
//!
//! [`RouteIndex`] is a plain value built from the routes, the pools and the mapping, tested
//! without a cluster; [`RouteStore`] holds what the two watches ([`watch`]) listed, and
//! [`run_index`] rebuilds the index on every change of either or of the mapping.
//!
//! Sizes: at most [`MAX_ROUTES`] model-bearing HTTPRoutes and [`MAX_POOLS`] InferencePools are
//! kept (more are ignored and logged); the Gateway API bounds rules, matches and backendRefs per
//! route (16, 64, 16), and the CRD validates them at the API server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;

use ext_proc::protocol::{BASE_MODEL_NAME, MODEL_NAME};
use ext_proc::untrusted::Untrusted;
use futures::{Stream, StreamExt};
use gateway_api::httproutes::{HttpRoute, HttpRouteRulesMatchesHeadersType, HttpRouteSpec};
use k8s::api::{InferencePool, POOL_GROUP};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::watch as channel;
use tokio_util::sync::CancellationToken;

use crate::mapping::{Lookup, Mapping};
use crate::metrics::Metrics;
use crate::models::Served;

/// Most HTTPRoutes with model rules kept.
pub const MAX_ROUTES: usize = 10_000;
/// Most InferencePools kept.
pub const MAX_POOLS: usize = 10_000;
/// Most appearing or vanishing unmatchable routes logged one by one per change (the rest as a
/// count).
pub const MAX_LOGGED: usize = 20;
/// The backendRef kind of a pool.
pub const POOL_KIND: &str = "InferencePool";

/// What a model match requires of the router's headers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelMatch {
    /// `X-Gateway-Model-Name` must equal this.
    pub model: Option<String>,
    /// `X-Gateway-Base-Model-Name` must equal this.
    pub base: Option<String>,
}

/// A backendRef to an InferencePool.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolRef {
    /// `namespace/name` of the pool.
    pub pool: String,
    /// The ref's port, if it names one.
    pub port: Option<i32>,
}

/// One model rule of an HTTPRoute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRule {
    /// Its index in the route's `rules`.
    pub index: usize,
    /// Its model matches (other matches dropped).
    pub matches: Vec<ModelMatch>,
    /// Its InferencePool backendRefs (other backends dropped).
    pub pools: Vec<PoolRef>,
}

/// The model rules of a route in `namespace` (empty: not a model route).
pub fn model_rules(namespace: &str, spec: &HttpRouteSpec) -> Vec<ModelRule> {
    let mut out = Vec::new();
    for (index, rule) in spec.rules.iter().flatten().enumerate() {
        let matches: Vec<ModelMatch> = rule
            .matches
            .iter()
            .flatten()
            .filter_map(|m| {
                let mut mm = ModelMatch {
                    model: None,
                    base: None,
                };
                for h in m.headers.iter().flatten() {
                    let exact = matches!(
                        h.r#type,
                        None | Some(HttpRouteRulesMatchesHeadersType::Exact)
                    );
                    let slot = if h.name.eq_ignore_ascii_case(MODEL_NAME) {
                        &mut mm.model
                    } else if h.name.eq_ignore_ascii_case(BASE_MODEL_NAME) {
                        &mut mm.base
                    } else {
                        continue;
                    };
                    if !exact {
                        // A regular expression is not evaluated here: the match is not indexed.
                        return None;
                    }
                    *slot = Some(h.value.clone());
                }
                (mm.model.is_some() || mm.base.is_some()).then_some(mm)
            })
            .collect();
        let pools: Vec<PoolRef> = rule
            .backend_refs
            .iter()
            .flatten()
            .filter(|b| {
                b.group.as_deref() == Some(POOL_GROUP) && b.kind.as_deref() == Some(POOL_KIND)
            })
            .map(|b| PoolRef {
                pool: format!("{}/{}", b.namespace.as_deref().unwrap_or(namespace), b.name),
                port: b.port,
            })
            .collect();
        if !matches.is_empty() && !pools.is_empty() {
            out.push(ModelRule {
                index,
                matches,
                pools,
            });
        }
    }
    out
}

/// Why a route can never match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// A model header value the router never sets.
    UnknownModel,
    /// A backendRef to an InferencePool that does not exist.
    MissingPool,
    /// A backendRef port not among the pool's target ports.
    PortMismatch,
}

impl Reason {
    /// Every reason (the gauge's label values).
    pub const ALL: [Reason; 3] = [
        Reason::UnknownModel,
        Reason::MissingPool,
        Reason::PortMismatch,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownModel => "unknown_model",
            Reason::MissingPool => "missing_pool",
            Reason::PortMismatch => "port_mismatch",
        }
    }
}

/// One way a route can never match.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unmatchable {
    /// `namespace/name` of the HTTPRoute.
    pub route: String,
    /// The rule's index.
    pub rule: usize,
    /// Why.
    pub reason: Reason,
    /// What exactly (escaped).
    pub detail: String,
}

/// Which model routes to which pool, and what can never match.
#[derive(Debug, Default)]
pub struct RouteIndex {
    by_base: HashMap<String, BTreeSet<String>>,
    by_model: HashMap<String, BTreeSet<String>>,
    by_pair: HashMap<String, HashMap<String, BTreeSet<String>>>,
    /// Every unmatchable (route, rule, reason, detail).
    pub unmatchable: BTreeSet<Unmatchable>,
}

impl RouteIndex {
    /// Builds the index of `routes` (`namespace/name` → model rules) against `pools`
    /// (`namespace/name` → target ports) and the mapping.
    pub fn build(
        routes: &BTreeMap<String, Vec<ModelRule>>,
        pools: &BTreeMap<String, BTreeSet<i32>>,
        lookup: &Lookup,
    ) -> Self {
        let mut index = RouteIndex::default();
        for (route, rules) in routes {
            for rule in rules {
                let mut report = |reason, detail: String| {
                    index.unmatchable.insert(Unmatchable {
                        route: route.clone(),
                        rule: rule.index,
                        reason,
                        detail,
                    });
                };
                let mut live = BTreeSet::new();
                for r in &rule.pools {
                    match pools.get(&r.pool) {
                        None => report(
                            Reason::MissingPool,
                            format!("InferencePool {} not found", Untrusted(&r.pool)),
                        ),
                        Some(ports) if r.port.is_some_and(|p| !ports.contains(&p)) => report(
                            Reason::PortMismatch,
                            format!(
                                "port {} is not a targetPort of InferencePool {} ({ports:?})",
                                r.port.unwrap_or_default(),
                                Untrusted(&r.pool)
                            ),
                        ),
                        Some(_) => {
                            live.insert(r.pool.clone());
                        }
                    }
                }
                for m in &rule.matches {
                    // Envoy matches the value exactly: one with spaces around it never equals
                    // a header BBR sets (names are trimmed), however the lookup reads it.
                    let exact = |v: &String| v.trim() == v.as_str();
                    let known = m.model.iter().chain(&m.base).all(exact)
                        && match (&m.model, &m.base) {
                            (Some(model), None) => lookup.is_known(model),
                            (None, Some(base)) => lookup.is_base_model(base),
                            (Some(model), Some(base)) => {
                                lookup.base_model(model) == Some(base.as_str())
                            }
                            (None, None) => false,
                        };
                    if !known {
                        let detail = match (&m.model, &m.base) {
                            (Some(model), Some(base)) => format!(
                                "{MODEL_NAME}: {} with {BASE_MODEL_NAME}: {}: no mapping ConfigMap maps one to the other",
                                Untrusted(model),
                                Untrusted(base)
                            ),
                            (Some(model), None) => format!(
                                "{MODEL_NAME}: {}: no mapping ConfigMap names this model",
                                Untrusted(model)
                            ),
                            (_, base) => format!(
                                "{BASE_MODEL_NAME}: {}: no mapping ConfigMap has this baseModel",
                                Untrusted(base.as_deref().unwrap_or_default())
                            ),
                        };
                        report(Reason::UnknownModel, detail);
                        continue;
                    }
                    if live.is_empty() {
                        continue;
                    }
                    let target = match (&m.model, &m.base) {
                        (Some(model), Some(base)) => index
                            .by_pair
                            .entry(model.clone())
                            .or_default()
                            .entry(base.clone())
                            .or_default(),
                        (Some(model), None) => index.by_model.entry(model.clone()).or_default(),
                        (_, base) => index
                            .by_base
                            .entry(base.clone().unwrap_or_default())
                            .or_default(),
                    };
                    target.extend(live.iter().cloned());
                }
            }
        }
        index
    }

    /// The pools (`namespace/name`) a request for `model` (base model `base`) can reach.
    pub fn pools(&self, model: &str, base: &str) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        for set in [
            self.by_base.get(base),
            self.by_model.get(model),
            self.by_pair.get(model).and_then(|b| b.get(base)),
        ]
        .into_iter()
        .flatten()
        {
            out.extend(set.iter().map(String::as_str));
        }
        out
    }

    /// Unmatchable entries by reason.
    pub fn counts(&self) -> [(Reason, usize); 3] {
        Reason::ALL.map(|r| (r, self.unmatchable.iter().filter(|u| u.reason == r).count()))
    }
}

impl Served for RouteIndex {
    fn serves(&self, model: &str, base: &str) -> bool {
        self.by_base.contains_key(base)
            || self.by_model.contains_key(model)
            || self
                .by_pair
                .get(model)
                .is_some_and(|b| b.contains_key(base))
    }
}

/// What the watches listed.
#[derive(Debug, Default)]
struct RouteState {
    routes: BTreeMap<String, Vec<ModelRule>>,
    pools: BTreeMap<String, BTreeSet<i32>>,
    routes_synced: bool,
    pools_synced: bool,
}

/// One watched object, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An HTTPRoute's model rules.
    Route(Vec<ModelRule>),
    /// An InferencePool's target ports.
    Pool(BTreeSet<i32>),
}

/// Which table of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// HTTPRoutes.
    Routes,
    /// InferencePools.
    Pools,
}

/// The HTTPRoutes and InferencePools the watches listed.
#[derive(Debug)]
pub struct RouteStore {
    state: Mutex<RouteState>,
    version: channel::Sender<u64>,
}

impl Default for RouteStore {
    fn default() -> Self {
        Self {
            state: Mutex::new(RouteState::default()),
            version: channel::channel(0).0,
        }
    }
}

impl RouteStore {
    /// An empty store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Changes on every update.
    pub fn changes(&self) -> channel::Receiver<u64> {
        self.version.subscribe()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn put(state: &mut RouteState, table: Table, key: String, item: Item) -> bool {
        match (table, item) {
            (Table::Routes, Item::Route(rules)) if rules.is_empty() => {
                state.routes.remove(&key);
            }
            (Table::Routes, Item::Route(rules)) => {
                if !state.routes.contains_key(&key) && state.routes.len() >= MAX_ROUTES {
                    return false;
                }
                state.routes.insert(key, rules);
            }
            (Table::Pools, Item::Pool(ports)) => {
                if !state.pools.contains_key(&key) && state.pools.len() >= MAX_POOLS {
                    return false;
                }
                state.pools.insert(key, ports);
            }
            _ => {}
        }
        true
    }

    /// Replaces a table with a complete listing; returns how many objects were over the cap.
    pub fn reset(&self, table: Table, listing: Vec<(String, Item)>) -> usize {
        let mut state = self.state.lock();
        match table {
            Table::Routes => {
                state.routes.clear();
                state.routes_synced = true;
            }
            Table::Pools => {
                state.pools.clear();
                state.pools_synced = true;
            }
        }
        let dropped = listing
            .into_iter()
            .filter(|(key, item)| !Self::put(&mut state, table, key.clone(), item.clone()))
            .count();
        drop(state);
        self.bump();
        dropped
    }

    /// Adds or replaces one object; false when over the cap.
    pub fn apply(&self, table: Table, key: String, item: Item) -> bool {
        let ok = Self::put(&mut self.state.lock(), table, key, item);
        self.bump();
        ok
    }

    /// Removes one object.
    pub fn delete(&self, table: Table, key: &str) {
        let mut state = self.state.lock();
        if table == Table::Routes {
            state.routes.remove(key);
        } else {
            state.pools.remove(key);
        }
        drop(state);
        self.bump();
    }

    /// The index against `lookup`, or `None` until both tables were listed once.
    pub fn index(&self, lookup: &Lookup) -> Option<RouteIndex> {
        let state = self.state.lock();
        (state.routes_synced && state.pools_synced)
            .then(|| RouteIndex::build(&state.routes, &state.pools, lookup))
    }
}

/// A watched kind.
pub trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    /// Its table.
    const TABLE: Table;
    /// What the store keeps of it.
    fn item(&self) -> Item;
}

impl Watched for HttpRoute {
    const TABLE: Table = Table::Routes;
    fn item(&self) -> Item {
        Item::Route(model_rules(
            &self.namespace().unwrap_or_default(),
            &self.spec,
        ))
    }
}

impl Watched for InferencePool {
    const TABLE: Table = Table::Pools;
    fn item(&self) -> Item {
        Item::Pool(self.spec.target_ports.iter().map(|p| p.number).collect())
    }
}

fn key<K: Watched>(k: &K) -> String {
    format!("{}/{}", k.namespace().unwrap_or_default(), k.name_any())
}

/// The API of a watched kind: one namespace or all (the ConfigMaps' namespaces).
pub fn api<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Watched + Resource<Scope = kube::core::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// One run of the watch of `K` into `store`, until the stream ends or `shutdown` fires.
pub async fn watch<K: Watched>(api: Api<K>, store: Arc<RouteStore>, shutdown: CancellationToken) {
    let events = watcher::watcher(api, k8s::watch::watch_config())
        .default_backoff()
        .modify(|k: &mut K| k.meta_mut().managed_fields = None);
    feed(events, &store, shutdown).await;
}

/// Drives one watch stream into the store.
pub async fn feed<K: Watched, S>(events: S, store: &RouteStore, shutdown: CancellationToken)
where
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    tokio::pin!(events);
    let what = K::kind(&());
    let mut listing = Vec::new();
    let mut last_error: Option<String> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => match e {
                Some(e) => e,
                None => return,
            },
        };
        match event {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(k)) => listing.push((key(&k), k.item())),
            Ok(Event::InitDone) => {
                if last_error.take().is_some() {
                    tracing::info!(%what, "watch recovered");
                }
                let n = listing.len();
                let dropped = store.reset(K::TABLE, std::mem::take(&mut listing));
                if dropped > 0 {
                    tracing::warn!(%what, dropped, "objects over the limit ignored");
                }
                tracing::info!(%what, objects = n, "listed");
            }
            Ok(Event::Apply(k)) => {
                if !store.apply(K::TABLE, key(&k), k.item()) {
                    tracing::warn!(%what, object = %key(&k), "over the limit; ignored");
                }
            }
            Ok(Event::Delete(k)) => store.delete(K::TABLE, &key(&k)),
            Err(error) => {
                let text = error.to_string();
                if last_error.as_deref() == Some(text.as_str()) {
                    tracing::debug!(%what, %error, "watch still failing");
                } else {
                    tracing::warn!(%what, %error, "watch failed; retrying with backoff (/v1/models lists every mapped model until the routes are known)");
                    last_error = Some(text);
                }
            }
        }
    }
}

fn log_changes(old: &BTreeSet<Unmatchable>, new: &BTreeSet<Unmatchable>) {
    let appeared: Vec<&Unmatchable> = new.difference(old).collect();
    let gone: Vec<&Unmatchable> = old.difference(new).collect();
    for u in appeared.iter().take(MAX_LOGGED) {
        tracing::warn!(
            httproute = %u.route, rule = u.rule, reason = u.reason.as_str(), detail = %u.detail,
            "HTTPRoute rule can never match"
        );
    }
    for u in gone.iter().take(MAX_LOGGED) {
        tracing::info!(
            httproute = %u.route, rule = u.rule, reason = u.reason.as_str(),
            "HTTPRoute rule can match again"
        );
    }
    let more = appeared.len().saturating_sub(MAX_LOGGED) + gone.len().saturating_sub(MAX_LOGGED);
    if more > 0 {
        tracing::warn!(
            more,
            "further unmatchable-route changes not logged one by one"
        );
    }
}

/// Rebuilds the index whenever the routes, the pools or the mapping change, publishes it to
/// `index` (`None` until both watches listed once), logs what became (un)matchable and sets
/// `bbr_unmatchable_routes`, until `shutdown`.
pub async fn run_index(
    mapping: Arc<Mapping>,
    store: Arc<RouteStore>,
    index: channel::Sender<Option<Arc<RouteIndex>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut mapping_changes = mapping.changes();
    let mut store_changes = store.changes();
    let mut last = BTreeSet::new();
    loop {
        mapping_changes.borrow_and_update();
        store_changes.borrow_and_update();
        if let Some(built) = store.index(&mapping.lookup()) {
            log_changes(&last, &built.unmatchable);
            for (reason, n) in built.counts() {
                metrics.unmatchable(reason.as_str(), n);
            }
            last = built.unmatchable.clone();
            index.send_replace(Some(Arc::new(built)));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = mapping_changes.changed() => if r.is_err() { return },
            r = store_changes.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests;
