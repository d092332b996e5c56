//! The endpoint datastore: the pool, its endpoints and their latest engine metrics.
//!
//! Discovery (a file or Kubernetes) hands the datastore a complete [`PoolSpec`]; the datastore
//! publishes it as one immutable [`PoolSnapshot`] that the request path loads without locking.
//! Engine metrics change far more often than membership, so each endpoint carries its own
//! `ArcSwap<EngineMetrics>` cell that its scraper replaces wholesale; a snapshot swap keeps the
//! cells of endpoints that survive, so no metrics are lost across membership updates.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::lora::LoadedAdapters;

/// Label that selects the engine metric mapping of a pod (`vllm` when absent).
pub const ENGINE_TYPE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// A dense, process-stable numeric id for an endpoint, used to index per-endpoint state
/// (prefix-cache LRUs, in-flight counters) without hashing names on the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

/// What discovery knows about one scheduling endpoint (one pod × one target port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// `<pod>-rank-<i>`.
    pub name: String,
    /// The pod (or host) name the endpoint belongs to.
    pub pod_name: String,
    /// Namespace of the pod.
    pub namespace: String,
    /// Where inference requests go.
    pub address: SocketAddr,
    /// Where `/metrics` is scraped (usually the same as `address`).
    pub metrics_address: SocketAddr,
    /// Index into the pool's target ports (the data-parallel rank).
    pub rank: usize,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
}

/// The pool as discovery sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolSpec {
    /// InferencePool name.
    pub name: String,
    /// InferencePool namespace.
    pub namespace: String,
    /// `http` or `kubernetes.io/h2c`.
    pub app_protocol: String,
    /// The endpoints, in discovery order.
    pub endpoints: Vec<EndpointSpec>,
}

/// Whether an endpoint's engine serves its model, as its scrapes show.
///
/// While any endpoint serves, the candidates are the [`Readiness::Serving`] ones and the
/// [`Readiness::Unknown`] ones whose first readiness check is under way, values read
/// ([`EngineMetrics::awaiting_check`]). When none serves, the endpoints the EPP has no
/// evidence against ([`Readiness::Unknown`], [`Readiness::Unreachable`]) are, as the reference
/// routes to every pod discovery lists whatever its metrics; [`Readiness::Loading`] endpoints
/// never are (their engine answered and said it does not serve yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Readiness {
    /// Not known to serve or not: never scraped (no scraper, or not yet), or scraped and its
    /// readiness check not answered yet.
    #[default]
    Unknown,
    /// Metrics answer with the engine's series and the engine's own readiness signal (its model
    /// list) says it serves.
    Serving,
    /// The engine answers but does not serve yet (no engine series, or a model list that is
    /// empty or answered with an error): a model still loading.
    Loading,
    /// Scrapes keep failing (past the scraper's threshold): dead, hung or unreachable.
    Unreachable,
}

impl Readiness {
    /// A label for logs, metrics and `/debug/pool`.
    pub fn as_str(self) -> &'static str {
        match self {
            Readiness::Unknown => "unknown",
            Readiness::Serving => "serving",
            Readiness::Loading => "loading",
            Readiness::Unreachable => "unreachable",
        }
    }
}

/// Engine state as last scraped from an endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineMetrics {
    /// Requests waiting in the engine's queue.
    pub waiting_queue_size: u64,
    /// Requests currently running (in the batch).
    pub running_requests: u64,
    /// KV-cache utilisation in `[0, 1]`.
    pub kv_cache_usage: f64,
    /// Models the engine says it serves (the `model_name` label of its core series), at most
    /// [`crate::scrape::engine::MAX_SERVED_MODELS`].
    pub served_models: Vec<String>,
    /// LoRA adapters currently loaded and running.
    pub active_models: Vec<String>,
    /// LoRA adapters requested but waiting for a slot.
    pub waiting_models: Vec<String>,
    /// LoRA slots (`max_lora`), 0 when unknown.
    pub max_active_models: u32,
    /// Tokens per KV block, when the engine reports it.
    pub cache_block_size: Option<u32>,
    /// KV blocks on the device, when the engine reports it.
    pub cache_num_blocks: Option<u64>,
    /// When these values were scraped; `None` means never.
    pub updated_at: Option<Instant>,
    /// Set while the scraper treats the engine as quiet (nothing running or waiting, values
    /// unchanged over consecutive scrapes) and scrapes it less often than the staleness
    /// threshold: the values stand until this instant, unless this EPP routes to the engine,
    /// which wakes its scraper ([`Endpoint::mark_routed`]). `None` otherwise.
    pub quiet_until: Option<Instant>,
    /// Whether the engine serves, as of the latest scrape attempt.
    pub readiness: Readiness,
    /// The values are read and the engine's readiness check is under way (it may take the
    /// scrape's timeout): the readiness above is the one before it.
    pub awaiting_check: bool,
}

impl EngineMetrics {
    /// True when the metrics are missing, or older than `threshold` at `now` and not vouched
    /// for by a quiet engine's [`quiet_until`](Self::quiet_until).
    pub fn is_stale(&self, now: Instant, threshold: std::time::Duration) -> bool {
        match self.updated_at {
            None => true,
            Some(at) => {
                now.saturating_duration_since(at) > threshold
                    && self.quiet_until.is_none_or(|until| now > until)
            }
        }
    }
}

/// One endpoint of the current snapshot.
#[derive(Debug)]
pub struct Endpoint {
    /// Dense id, stable for as long as the endpoint keeps its name and address.
    pub id: EndpointId,
    /// What discovery said.
    pub spec: EndpointSpec,
    /// `ip:port` (IPv6 in brackets), precomputed for the wire.
    pub host_port: Arc<str>,
    /// The engine mapping name (lower-case), from [`ENGINE_TYPE_LABEL`].
    pub engine: Arc<str>,
    metrics: ArcSwap<EngineMetrics>,
    /// Bumped after every store of `metrics`: a reader that saw a version holds metrics at
    /// least that new ([`crate::scheduling::candidates`]).
    metrics_version: AtomicU64,
    /// The scraper is waiting out a quiet engine's long interval (see
    /// [`EngineMetrics::quiet_until`]); routing here must wake it.
    quiet: AtomicBool,
    /// Wakes the quiet scraper.
    wake: Notify,
    /// The adapters the engine has registered, as the LoRA placement loop last listed them;
    /// `None` when nothing lists them (placement off, or not listed yet).
    adapters: ArcSwapOption<LoadedAdapters>,
}

impl Endpoint {
    fn new(
        id: EndpointId,
        spec: EndpointSpec,
        metrics: Arc<EngineMetrics>,
        adapters: Option<Arc<LoadedAdapters>>,
    ) -> Self {
        let engine: Arc<str> = spec
            .labels
            .get(ENGINE_TYPE_LABEL)
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "vllm".to_owned())
            .into();
        Self {
            id,
            host_port: host_port(spec.address).into(),
            engine,
            metrics: ArcSwap::new(metrics),
            metrics_version: AtomicU64::new(0),
            quiet: AtomicBool::new(false),
            wake: Notify::new(),
            adapters: ArcSwapOption::new(adapters),
            spec,
        }
    }

    /// The latest engine metrics.
    pub fn metrics(&self) -> Arc<EngineMetrics> {
        self.metrics.load_full()
    }

    /// Replaces the engine metrics (called by the scraper).
    pub fn store_metrics(&self, metrics: EngineMetrics) {
        self.metrics.store(Arc::new(metrics));
        self.metrics_version.fetch_add(1, Ordering::Release);
    }

    /// How many times the metrics were stored: metrics read after this value are at least as
    /// new as every store it counts.
    pub fn metrics_version(&self) -> u64 {
        self.metrics_version.load(Ordering::Acquire)
    }

    /// The adapters its engine has registered, when the LoRA placement loop lists them.
    pub fn adapters(&self) -> Option<Arc<LoadedAdapters>> {
        self.adapters.load_full()
    }

    /// Replaces the registered adapters (called by the LoRA placement loop).
    pub fn store_adapters(&self, adapters: Option<LoadedAdapters>) {
        self.adapters.store(adapters.map(Arc::new));
    }

    /// The IP the endpoint listens on.
    pub fn ip(&self) -> IpAddr {
        self.spec.address.ip()
    }

    /// This EPP just sent the endpoint a request: a quiet engine is quiet no more, so its
    /// scraper is woken to follow it closely again. One relaxed load when not quiet.
    pub fn mark_routed(&self) {
        if self.quiet.load(Ordering::Relaxed) && self.quiet.swap(false, Ordering::AcqRel) {
            self.wake.notify_waiters();
        }
    }

    /// Whether the scraper waits out a quiet engine's long interval.
    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed)
    }

    /// The scraper: the engine is quiet (or not). Waiting on [`Self::routed`] must be enabled
    /// before this is set, so that no wake-up falls in between.
    pub(crate) fn set_quiet(&self, quiet: bool) {
        self.quiet.store(quiet, Ordering::Release);
    }

    /// Completes when [`Self::mark_routed`] wakes a quiet endpoint's scraper.
    pub(crate) fn routed(&self) -> Notified<'_> {
        self.wake.notified()
    }
}

/// Formats an address the way the wire wants it: `ip:port`, IPv6 in brackets.
pub fn host_port(addr: SocketAddr) -> String {
    // SocketAddr's Display already brackets IPv6 addresses.
    addr.to_string()
}

/// An immutable view of the pool, swapped whole on every membership change.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    /// Pool name.
    pub name: String,
    /// Pool namespace.
    pub namespace: String,
    /// Pool app protocol.
    pub app_protocol: String,
    /// The endpoints, in discovery order.
    pub endpoints: Vec<Arc<Endpoint>>,
    by_address: HashMap<SocketAddr, usize>,
}

impl PoolSnapshot {
    /// Looks an endpoint up by its inference address.
    pub fn by_address(&self, addr: &SocketAddr) -> Option<&Arc<Endpoint>> {
        self.by_address.get(addr).map(|&i| &self.endpoints[i])
    }

    /// The highest endpoint id in use plus one (for dense per-endpoint arrays).
    pub fn id_bound(&self) -> usize {
        self.endpoints
            .iter()
            .map(|e| e.id.0 as usize + 1)
            .max()
            .unwrap_or(0)
    }
}

/// The datastore: the current snapshot plus the bookkeeping needed to build the next one.
#[derive(Debug)]
pub struct Datastore {
    current: ArcSwap<PoolSnapshot>,
    /// Bumped on every `apply`; 0 means "never synced".
    version: watch::Sender<u64>,
    ids: Mutex<IdAllocator>,
}

#[derive(Debug, Default)]
struct IdAllocator {
    by_key: HashMap<(String, SocketAddr), EndpointId>,
    /// Released ids with when, oldest first.
    free: std::collections::VecDeque<(EndpointId, Instant)>,
    next: u32,
}

/// How long a released endpoint id rests before a newcomer may take it. What is keyed by id
/// elsewhere (prefix and KV index entries, the director's in-flight loads and their cost
/// calibration) is purged when the pool-change watchers wake (`Director::pool_changed`); they see only the latest snapshot, so an id handed on before they ran would
/// pass the departed pod's state to the newcomer. Between two applies a watcher is woken at
/// once; this leaves it seconds.
const ID_QUARANTINE: std::time::Duration = std::time::Duration::from_secs(10);

impl IdAllocator {
    /// The oldest id that has rested long enough, or a new one.
    fn take(&mut self, now: Instant) -> EndpointId {
        if self
            .free
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= ID_QUARANTINE)
            && let Some((id, _)) = self.free.pop_front()
        {
            return id;
        }
        let id = EndpointId(self.next);
        self.next += 1;
        id
    }
}

impl Default for Datastore {
    fn default() -> Self {
        Self::new()
    }
}

impl Datastore {
    /// An empty, unsynced datastore.
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(PoolSnapshot::default()),
            version: watch::channel(0).0,
            ids: Mutex::new(IdAllocator::default()),
        }
    }

    /// The current snapshot (one atomic load; never blocks).
    pub fn snapshot(&self) -> Arc<PoolSnapshot> {
        self.current.load_full()
    }

    /// True once discovery has delivered the pool at least once.
    pub fn is_synced(&self) -> bool {
        *self.version.borrow() > 0
    }

    /// A receiver of the snapshot version: it changes on every `apply`; 0 means unsynced.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Publishes a new pool. Endpoints that keep their name and address keep their id and
    /// their metrics; the others get fresh ones. Returns the new snapshot.
    pub fn apply(&self, spec: PoolSpec) -> Arc<PoolSnapshot> {
        let now = Instant::now();
        // The id table is held from reading the current snapshot to publishing the next one,
        // as in `renew`: neither can publish over the other's newer snapshot.
        let mut ids = self.ids.lock();
        let old = self.snapshot();
        let mut endpoints = Vec::with_capacity(spec.endpoints.len());
        let mut by_address = HashMap::with_capacity(spec.endpoints.len());
        let mut kept = HashMap::with_capacity(spec.endpoints.len());
        for es in spec.endpoints {
            if by_address.contains_key(&es.address) {
                tracing::warn!(endpoint = %es.name, address = %es.address, "duplicate endpoint address ignored");
                continue;
            }
            let key = (es.name.clone(), es.address);
            let previous = old
                .by_address(&es.address)
                .filter(|e| e.spec.name == es.name)
                .cloned();
            let id = match ids.by_key.get(&key) {
                Some(id) => *id,
                None => {
                    let id = ids.take(now);
                    ids.by_key.insert(key.clone(), id);
                    id
                }
            };
            kept.insert(key, id);
            by_address.insert(es.address, endpoints.len());
            if let Some(same) = previous.as_ref().filter(|p| p.id == id && p.spec == es) {
                // Unchanged: the same endpoint, so whatever follows it by identity (its scrape
                // task, with its failure count and place on the grid) carries on. A pool that
                // changes elsewhere must not restart every scraper, or an engine that hangs
                // never stays unanswered long enough to be marked unreachable.
                endpoints.push(same.clone());
                continue;
            }
            let mut metrics = previous.as_ref().map(|p| p.metrics()).unwrap_or_default();
            if metrics.awaiting_check {
                // The check under way belongs to the old endpoint's scraper, which stops: the
                // new one's first scrape marks its own.
                metrics = Arc::new(EngineMetrics {
                    awaiting_check: false,
                    ..(*metrics).clone()
                });
            }
            let adapters = previous.as_ref().and_then(|p| p.adapters());
            endpoints.push(Arc::new(Endpoint::new(id, es, metrics, adapters)));
        }
        // Release the ids of endpoints that left, so the id space stays dense.
        let gone: Vec<_> = ids
            .by_key
            .iter()
            .filter(|(k, _)| !kept.contains_key(*k))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (k, id) in gone {
            ids.by_key.remove(&k);
            ids.free.push_back((id, now));
        }
        let snapshot = Arc::new(PoolSnapshot {
            name: spec.name,
            namespace: spec.namespace,
            app_protocol: spec.app_protocol,
            endpoints,
            by_address,
        });
        self.current.store(snapshot.clone());
        drop(ids);
        self.version.send_modify(|v| *v += 1);
        snapshot
    }
}

impl Datastore {
    /// The endpoint `id` as a newcomer: the same spec under a fresh id, with nothing of the old
    /// one's state (metrics, adapters), and the old id released as a departed endpoint's is.
    /// For an engine that restarted in place (its address kept, so discovery saw no change):
    /// what is keyed by its id (the prefix index's entries, its in-flight loads and cost
    /// calibration) describes a cache and a process that are gone, and is purged by the
    /// pool-change watchers exactly as a departure's. `None` when `id` is no longer in the pool.
    pub fn renew(&self, id: EndpointId) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        // The id table is held from reading the snapshot to publishing the next, as in
        // `apply`: a pool applied meanwhile comes wholly before (and is what is renewed here)
        // or wholly after (and keys the renewed id).
        let mut ids = self.ids.lock();
        let old = self.snapshot();
        let at = old.endpoints.iter().position(|e| e.id == id)?;
        let spec = old.endpoints[at].spec.clone();
        let key = (spec.name.clone(), spec.address);
        if ids.by_key.get(&key) != Some(&id) {
            return None;
        }
        let fresh_id = ids.take(now);
        ids.by_key.insert(key, fresh_id);
        ids.free.push_back((id, now));
        let fresh = Arc::new(Endpoint::new(fresh_id, spec, Arc::default(), None));
        let mut endpoints = old.endpoints.clone();
        endpoints[at] = fresh.clone();
        self.current.store(Arc::new(PoolSnapshot {
            name: old.name.clone(),
            namespace: old.namespace.clone(),
            app_protocol: old.app_protocol.clone(),
            endpoints,
            by_address: old.by_address.clone(),
        }));
        drop(ids);
        self.version.send_modify(|v| *v += 1);
        Some(fresh)
    }
}

/// Pools for tests, here and in the crates above (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
pub mod test_util {
    use super::*;

    /// An endpoint spec on `10.0.0.<n>:8000`.
    pub fn spec(n: u8) -> EndpointSpec {
        let address = SocketAddr::from(([10, 0, 0, n], 8000));
        EndpointSpec {
            name: format!("pod-{n}-rank-0"),
            pod_name: format!("pod-{n}"),
            namespace: "default".into(),
            address,
            metrics_address: address,
            rank: 0,
            labels: BTreeMap::new(),
        }
    }

    /// A pool of `n` endpoints.
    pub fn pool(n: u8) -> PoolSpec {
        PoolSpec {
            name: "pool".into(),
            namespace: "default".into(),
            app_protocol: "http".into(),
            endpoints: (1..=n).map(spec).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn apply_publishes_snapshot_and_syncs() {
        let ds = Datastore::new();
        assert!(!ds.is_synced());
        let snap = ds.apply(pool(3));
        assert!(ds.is_synced());
        assert_eq!(snap.endpoints.len(), 3);
        assert_eq!(&*snap.endpoints[0].host_port, "10.0.0.1:8000");
        assert_eq!(&*snap.endpoints[0].engine, "vllm");
        let addr = SocketAddr::from(([10, 0, 0, 2], 8000));
        assert_eq!(snap.by_address(&addr).unwrap().spec.name, "pod-2-rank-0");
    }

    /// An endpoint rebuilt by a pool edit (a label changed) keeps its values but not the mark
    /// of a readiness check under way: that check belongs to the old endpoint's scraper.
    #[tokio::test(start_paused = true)]
    async fn a_rebuilt_endpoint_does_not_inherit_a_check_under_way() {
        let ds = Datastore::new();
        let old = ds.apply(pool(1)).endpoints[0].clone();
        old.store_metrics(EngineMetrics {
            waiting_queue_size: 7,
            awaiting_check: true,
            ..Default::default()
        });
        let mut edited = pool(1);
        edited.endpoints[0].labels.insert("team".into(), "a".into());
        let rebuilt = ds.apply(edited).endpoints[0].clone();
        assert!(!Arc::ptr_eq(&old, &rebuilt));
        assert_eq!(rebuilt.id, old.id);
        assert_eq!(rebuilt.metrics().waiting_queue_size, 7);
        assert!(!rebuilt.metrics().awaiting_check);
    }

    /// A renewed endpoint is a newcomer under a fresh id with nothing of the old state; the
    /// old id rests as a departed one's, and the watchers are woken.
    #[tokio::test(start_paused = true)]
    async fn a_renewed_endpoint_is_a_newcomer_under_a_fresh_id() {
        let ds = Datastore::new();
        let snap = ds.apply(pool(2));
        let old = snap.endpoints[1].clone();
        old.store_metrics(EngineMetrics {
            waiting_queue_size: 7,
            readiness: Readiness::Serving,
            ..Default::default()
        });
        let mut changes = ds.subscribe();
        changes.mark_unchanged();
        let fresh = ds.renew(old.id).unwrap();
        assert!(changes.has_changed().unwrap());
        assert_ne!(fresh.id, old.id);
        assert_eq!(fresh.spec, old.spec);
        assert_eq!(fresh.metrics().readiness, Readiness::Unknown);
        assert_eq!(fresh.metrics().waiting_queue_size, 0);
        let now = ds.snapshot();
        assert!(Arc::ptr_eq(&now.endpoints[1], &fresh));
        assert!(Arc::ptr_eq(&now.endpoints[0], &snap.endpoints[0]));
        assert!(Arc::ptr_eq(
            now.by_address(&old.spec.address).unwrap(),
            &fresh
        ));
        // The next apply of the same pool keeps the fresh endpoint as it is.
        let again = ds.apply(pool(2));
        assert!(Arc::ptr_eq(&again.endpoints[1], &fresh));
        // An id no longer in the pool is not renewed; the old id is not handed on at once.
        assert!(ds.renew(old.id).is_none());
        ds.apply(pool(1));
        let newcomer = ds.apply(pool(3)).endpoints[2].id;
        assert_ne!(newcomer, old.id);
    }

    #[tokio::test(start_paused = true)]
    async fn surviving_endpoints_keep_id_and_metrics() {
        let ds = Datastore::new();
        let snap = ds.apply(pool(3));
        snap.endpoints[1].store_metrics(EngineMetrics {
            waiting_queue_size: 7,
            ..Default::default()
        });
        let id1 = snap.endpoints[1].id;
        let mut next = pool(3);
        next.endpoints.remove(0);
        let snap2 = ds.apply(next);
        assert_eq!(snap2.endpoints[0].id, id1);
        assert_eq!(snap2.endpoints[0].metrics().waiting_queue_size, 7);
        // The freed id rests first: a newcomer right after gets a fresh one, so nothing keyed
        // by the departed pod's id (prefix entries, in-flight counts) passes to it before the
        // pool-change watchers purge it …
        let freed = snap.endpoints[0].id;
        let mut grown = pool(3);
        grown.endpoints.remove(0);
        grown.endpoints.push(spec(9));
        let snap3 = ds.apply(grown.clone());
        assert_ne!(snap3.endpoints[2].id, freed);
        // … and is reused once rested, keeping the id space dense.
        grown.endpoints.remove(2);
        ds.apply(grown.clone());
        tokio::time::advance(ID_QUARANTINE).await;
        grown.endpoints.push(spec(10));
        let snap4 = ds.apply(grown);
        assert_eq!(snap4.endpoints[2].id, freed);
        assert!(snap4.id_bound() <= 4);
    }

    /// A pool change elsewhere (a pod leaving, another's labels) leaves an unchanged endpoint
    /// the very same object, so its scrape task is not restarted; a changed one is new.
    #[test]
    fn an_unchanged_endpoint_stays_the_same_object_across_applies() {
        let ds = Datastore::new();
        let snap = ds.apply(pool(3));
        let mut next = pool(3);
        next.endpoints.remove(0);
        next.endpoints[1].labels.insert("rev".into(), "2".into());
        let snap2 = ds.apply(next);
        assert!(Arc::ptr_eq(&snap.endpoints[1], &snap2.endpoints[0]));
        assert!(!Arc::ptr_eq(&snap.endpoints[2], &snap2.endpoints[1]));
        assert_eq!(
            snap2.endpoints[1]
                .spec
                .labels
                .get("rev")
                .map(String::as_str),
            Some("2")
        );
        assert_eq!(snap2.endpoints[1].id, snap.endpoints[2].id);
    }

    #[test]
    fn ipv6_is_bracketed_and_engine_label_read() {
        let ds = Datastore::new();
        let mut p = pool(1);
        p.endpoints[0].address = "[fd00::1]:8000".parse().unwrap();
        p.endpoints[0]
            .labels
            .insert(ENGINE_TYPE_LABEL.into(), "SGLang".into());
        let snap = ds.apply(p);
        assert_eq!(&*snap.endpoints[0].host_port, "[fd00::1]:8000");
        assert_eq!(&*snap.endpoints[0].engine, "sglang");
    }

    #[test]
    fn duplicate_addresses_are_dropped() {
        let ds = Datastore::new();
        let mut p = pool(2);
        p.endpoints[1].address = p.endpoints[0].address;
        assert_eq!(ds.apply(p).endpoints.len(), 1);
    }
}
