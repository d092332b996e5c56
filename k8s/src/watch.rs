//! Watches: kube-runtime watchers with the default backoff, each feeding the [`Index`] from its
//! own task under a tracing span named after the resource.
//!
//! The layer is deliberately thin: a watcher's `Init`/`InitApply`/`InitDone` become one
//! [`IndexResource::reset`] with the complete listing, `Apply`/`Delete` become `apply`/`delete`,
//! and errors are logged while the watcher's backoff schedules the retry (a `410 Gone` relists).
//! All decisions live in the index, where they are tested without a client.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
#[cfg(test)]
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::{InferenceModelRewrite, InferenceObjective, InferencePool, InferencePoolSpec};
use crate::index::{Index, IndexResource, PoolRef, Publisher, SharedIndex};

/// What Kubernetes discovery needs to start.
#[derive(Clone)]
pub struct Discovery {
    /// The API client (in-cluster or kubeconfig).
    pub client: Client,
    /// The pool to serve.
    pub pool: PoolRef,
    /// `--model-server-metrics-port` (single-port pools only).
    pub metrics_port: Option<u16>,
    /// Standalone mode (`--endpoint-selector`/`--endpoint-target-ports`): the pool spec is
    /// given and no InferencePool is watched.
    pub standalone: Option<InferencePoolSpec>,
}

impl Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("pool", &self.pool)
            .field("metrics_port", &self.metrics_port)
            .field("standalone", &self.standalone)
            .finish_non_exhaustive()
    }
}

/// One watch of discovery, restartable: each run starts a fresh watcher, which lists again, so
/// a supervisor can replace a run that ended.
pub struct WatchTask {
    /// What it watches (`inferencepools`, `pods`, …), for logs and metrics.
    pub name: &'static str,
    /// Starts one run; it ends when the token is cancelled.
    pub run: Box<dyn Fn(CancellationToken) -> BoxFuture<'static, ()> + Send + Sync>,
    /// How its runs are doing, for metrics.
    pub health: Arc<WatchHealth>,
}

/// How one watch is doing, across its runs: how often it failed, and when it last worked (a
/// complete listing or an event). A watch can keep failing while the EPP stays ready on what
/// it last saw (a role that grants `list` but not `watch`); this is what shows it.
#[derive(Debug, Default)]
pub struct WatchHealth {
    errors: AtomicU64,
    /// It failed, and has not listed or seen an event since.
    failing: AtomicBool,
    /// Unix time of the last success in milliseconds; 0 until one.
    last_success_ms: AtomicU64,
}

impl WatchHealth {
    /// Failures so far (each retried with backoff).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Whether it failed and has not listed or seen an event since (a quiet watch that works
    /// sees no events: its last success may be old).
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Unix time of the last complete listing or event, in seconds; `None` before one.
    pub fn last_success_unix_seconds(&self) -> Option<f64> {
        match self.last_success_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms as f64 / 1000.0),
        }
    }

    fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.failing.store(true, Ordering::Relaxed);
    }

    fn succeeded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_success_ms.store(now.max(1), Ordering::Relaxed);
        self.failing.store(false, Ordering::Relaxed);
    }
}

impl Debug for WatchTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchTask")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Builds the index and one restartable watch per resource kind; nothing runs until a
    /// task's `run` is called.
    pub fn tasks(self, publisher: Publisher) -> (SharedIndex, Vec<WatchTask>) {
        let Self {
            client,
            pool,
            metrics_port,
            standalone,
        } = self;
        let ns = pool.namespace.clone();
        let mut tasks = Vec::with_capacity(4);
        let index = match standalone {
            Some(spec) => {
                // The selector is fixed, so the API server can filter the pods for us.
                let selector = spec
                    .selector
                    .match_labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let index = Index::standalone(pool, spec, metrics_port, publisher)
                    .awaiting_policies()
                    .shared();
                tasks.push(pods(
                    Api::namespaced(client.clone(), &ns),
                    watch_config().labels(&selector),
                    index.clone(),
                ));
                index
            }
            None => {
                let name = pool.name.clone();
                let index = Index::new(pool, metrics_port, publisher)
                    .awaiting_policies()
                    .shared();
                tasks.push(pools(
                    Api::namespaced(client.clone(), &ns),
                    &name,
                    index.clone(),
                ));
                tasks.push(pods(
                    Api::namespaced(client.clone(), &ns),
                    watch_config(),
                    index.clone(),
                ));
                index
            }
        };
        tasks.push(task::<InferenceObjective>(
            "inferenceobjectives",
            Api::namespaced(client.clone(), &ns),
            watch_config(),
            index.clone(),
        ));
        tasks.push(task::<InferenceModelRewrite>(
            "inferencemodelrewrites",
            Api::namespaced(client, &ns),
            watch_config(),
            index.clone(),
        ));
        (index, tasks)
    }

    /// [`Discovery::tasks`], each run once on its own Tokio task until `shutdown`: tests only,
    /// since nothing restarts these (the EPP supervises [`Discovery::tasks`]).
    #[cfg(test)]
    pub(crate) fn start(
        self,
        publisher: Publisher,
        shutdown: &CancellationToken,
    ) -> (SharedIndex, Vec<JoinHandle<()>>) {
        let (index, tasks) = self.tasks(publisher);
        let handles = tasks
            .into_iter()
            .map(|t| tokio::spawn((t.run)(shutdown.child_token())))
            .collect();
        (index, handles)
    }
}

/// How long the API server keeps one watch request open (`timeoutSeconds`). kube's default,
/// 290 s, is also how long a watch on a connection that died without a reset (a node lost, a
/// black-holed network) goes unnoticed: kube gives up on a watch 5 s after its timeout. The
/// pool would stay as it was that long: deleted pods kept, new ones unseen. A watch renewed
/// every minute resumes from its last version (bookmarks on), so it costs no relist.
pub const WATCH_TIMEOUT_SECS: u32 = 60;

/// The watcher settings of every watch: [`WATCH_TIMEOUT_SECS`].
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT_SECS)
}

/// Watches the one InferencePool named `name` (a `metadata.name` field selector).
pub fn pools(api: Api<InferencePool>, name: &str, index: SharedIndex) -> WatchTask {
    let config = watch_config().fields(&format!("metadata.name={name}"));
    task("inferencepools", api, config, index)
}

/// Watches the Pods of the pool's namespace. Pods are trimmed before they reach the index (and
/// before a relist holds them all): it reads the labels, the active-ports annotation, the pod
/// IP, the Ready condition and the deletion mark, and nothing else (other annotations may be
/// 256 KiB each, and every pod of the namespace is watched, not only the pool's).
pub fn pods(api: Api<Pod>, config: watcher::Config, index: SharedIndex) -> WatchTask {
    let health = Arc::new(WatchHealth::default());
    WatchTask {
        name: "pods",
        health: health.clone(),
        run: Box::new(move |shutdown| {
            let events = watcher::watcher(api.clone(), config.clone())
                .default_backoff()
                .modify(trim_pod);
            feed(index.clone(), events, shutdown, health.clone())
                .instrument(tracing::info_span!("watch", resource = "pods"))
                .boxed()
        }),
    }
}

/// What the index reads of a pod, and nothing more.
fn trim_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::PodStatus;
    pod.managed_fields_mut().clear();
    pod.spec = None;
    pod.annotations_mut()
        .retain(|k, _| k == endpoint_picker::discovery::file::ACTIVE_PORTS_ANNOTATION);
    pod.metadata.owner_references = None;
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            pod_ip: status.pod_ip,
            conditions: status.conditions.map(|cs| {
                cs.into_iter()
                    .filter(|c| c.type_ == "Ready")
                    .map(|c| k8s_openapi::api::core::v1::PodCondition {
                        message: None,
                        reason: None,
                        ..c
                    })
                    .collect()
            }),
            ..PodStatus::default()
        });
    }
}

/// A watch of `K` with the default backoff, feeding `index`.
pub fn task<K>(
    name: &'static str,
    api: Api<K>,
    config: watcher::Config,
    index: SharedIndex,
) -> WatchTask
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Index: IndexResource<K>,
{
    let health = Arc::new(WatchHealth::default());
    WatchTask {
        name,
        health: health.clone(),
        run: Box::new(move |shutdown| {
            let events = watcher::watcher(api.clone(), config.clone()).default_backoff();
            feed(index.clone(), events, shutdown, health.clone())
                .instrument(tracing::info_span!("watch", resource = name))
                .boxed()
        }),
    }
}

/// Drives one watch stream into the index until the stream ends or `shutdown` fires, and
/// counts how it goes in `health`.
pub async fn feed<K, S>(
    index: SharedIndex,
    events: S,
    shutdown: CancellationToken,
    health: Arc<WatchHealth>,
) where
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
    Index: IndexResource<K>,
{
    tokio::pin!(events);
    // Objects of a (re)list, held back until the listing is complete so that the index never
    // sees half a pod set as if it were the whole.
    let mut listing: Vec<K> = Vec::new();
    // A resource that stays unavailable (an alpha CRD that is not installed) fails on every
    // retry; say so once per kind of failure, not every backoff period.
    let mut failures = FailureLog::default();
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
            Ok(Event::InitApply(obj)) => listing.push(obj),
            Ok(Event::InitDone) => {
                health.succeeded();
                failures.succeeded();
                let objs = std::mem::take(&mut listing);
                tracing::debug!(objects = objs.len(), "listed");
                index.lock().reset(objs);
            }
            // An event proves the watch works again (it may resume without listing).
            Ok(Event::Apply(obj)) => {
                health.succeeded();
                failures.succeeded();
                index.lock().apply(obj);
            }
            Ok(Event::Delete(obj)) => {
                health.succeeded();
                failures.succeeded();
                index.lock().delete(obj);
            }
            // The backoff wrapper delays the retry; a 410 Gone makes the watcher relist.
            Err(error) => {
                health.failed();
                let failing_since = failures.failed(&error);
                if is_unavailable(&error) || failing_since.elapsed() >= UNAVAILABLE_AFTER {
                    IndexResource::<K>::unavailable(&mut *index.lock());
                }
            }
        }
    }
}

/// How often a watch that keeps failing with the same error says so at warn.
pub const STILL_FAILING_EVERY: Duration = Duration::from_secs(300);

/// What one watch's log has said of its failures. A watch that keeps failing (a role that
/// grants `list` but not `watch`) leaves the kind's objects as they were: it says so at warn
/// again every [`STILL_FAILING_EVERY`], not once and then at debug. One whose streams are cut
/// again and again (a proxy), with events between, says each error once per that period too,
/// not a warn and a recovery a minute.
#[derive(Debug, Default)]
struct FailureLog {
    /// Since when the watch has failed without a complete listing or an event in between.
    since: Option<Instant>,
    /// The last failure said at warn, and when.
    warned: Option<(String, Instant)>,
    /// A failure was said at warn since the last success: the next one says it recovered.
    unrecovered: bool,
}

impl FailureLog {
    /// Logs `error`; returns since when the watch has failed.
    fn failed(&mut self, error: &watcher::Error) -> Instant {
        let since = *self.since.get_or_insert_with(Instant::now);
        let text = error.to_string();
        let repeated = self
            .warned
            .as_ref()
            .is_some_and(|(said, at)| *said == text && at.elapsed() < STILL_FAILING_EVERY);
        if repeated {
            tracing::debug!(%error, "watch still failing; retrying with backoff");
        } else if self.unrecovered {
            let failing_for = since.elapsed().as_secs();
            tracing::warn!(%error, failing_for, "watch still failing: this kind's objects are not updated until it recovers");
            self.warned = Some((text, Instant::now()));
        } else {
            tracing::warn!(%error, "watch failed; retrying with backoff");
            self.warned = Some((text, Instant::now()));
            self.unrecovered = true;
        }
        since
    }

    /// A listing or an event came: the watch works. Says so if a failure was said.
    fn succeeded(&mut self) {
        self.since = None;
        if std::mem::take(&mut self.unrecovered) {
            tracing::info!("watch recovered");
        }
    }
}

/// How long a kind may fail to list before what waits for its first listing (readiness, for
/// the objectives and rewrites) goes on without it: a conversion webhook that answers 500, an
/// aggregated API that is down, must not keep the pool unready for good. Retries go on.
pub const UNAVAILABLE_AFTER: Duration = Duration::from_secs(30);

/// The API server's word that a kind cannot be listed as it is: not found (its CRD is not
/// installed), forbidden or unauthorized (the role does not grant it), or an object in it that
/// does not decode. Other failures are retried for [`UNAVAILABLE_AFTER`] before the kind is
/// given up on for now.
fn is_unavailable(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status)) => {
            matches!(status.code, 401 | 403 | 404)
        }
        watcher::Error::InitialListFailed(kube::Error::SerdeError(_)) => true,
        _ => false,
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_` and `.`, alphanumeric at both ends.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// A label value: at most 63 alphanumerics, `-`, `_` and `.`, alphanumeric at both ends
/// (empty is a value too).
fn is_label_value(value: &str) -> bool {
    let edge = |b: Option<u8>| b.is_none_or(|b| b.is_ascii_alphanumeric());
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && edge(value.bytes().next())
        && edge(value.bytes().last())
}

/// Parses `--endpoint-selector` (`key=value,...`) and `--endpoint-target-ports` into the
/// pool spec of standalone mode.
pub fn standalone_spec(selector: &str, ports: &[u16]) -> crate::Result<InferencePoolSpec> {
    use crate::api::{AppProtocol, LabelSelector, Port};
    let mut match_labels = std::collections::BTreeMap::new();
    for pair in selector.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(crate::Error::Invalid(format!(
                "--endpoint-selector: {pair:?} is not key=value"
            )));
        };
        let (k, v) = (k.trim(), v.trim());
        if !is_label_key(k) || !is_label_value(v) {
            // The API server would read `app==x` as `app=x` and `app!=x` as a negation, where
            // the index matches the pair as written: the two would disagree, silently.
            return Err(crate::Error::Invalid(format!(
                "--endpoint-selector: {pair:?} is not key=value with a label key and value"
            )));
        }
        match_labels.insert(k.to_owned(), v.to_owned());
    }
    if match_labels.is_empty() {
        return Err(crate::Error::Invalid(
            "--endpoint-selector needs at least one key=value".into(),
        ));
    }
    let mut uniq = ports.to_vec();
    uniq.sort_unstable();
    uniq.dedup();
    if ports.is_empty() || ports.len() > 8 || uniq.len() != ports.len() || ports.contains(&0) {
        return Err(crate::Error::Invalid(
            "--endpoint-target-ports needs 1 to 8 unique ports in 1..65535".into(),
        ));
    }
    Ok(InferencePoolSpec {
        selector: LabelSelector { match_labels },
        target_ports: ports
            .iter()
            .map(|&p| Port {
                number: i32::from(p),
            })
            .collect(),
        app_protocol: AppProtocol::Http,
        endpoint_picker_ref: None,
    })
}

#[cfg(test)]
mod tests;
