//! Kubernetes mode: a watch of the ConfigMaps labelled
//! `inference.networking.k8s.io/bbr-managed=true` feeding the [`Mapping`].
//!
//! Thin on purpose, as `k8s::watch`: the API server filters by label (a ConfigMap whose label
//! is removed arrives as a deletion), a (re)listing becomes one [`Mapping::relist`] (oldest
//! `creationTimestamp` first, then namespace/name: who claimed an adapter first), additions
//! and changes one [`Mapping::apply`], deletions one [`Mapping::delete`]; the watcher's backoff
//! schedules retries. Everything else is decided in [`crate::mapping`], tested without a
//! client.
//!
//! The watch never ends on an error: the watcher retries with backoff for ever, and the
//! mapping keeps its last good state meanwhile (readiness stays up: an unready router would
//! take every model off the gateway). So that a watch failing after the first listing (RBAC
//! removed, API server unreachable) is seen, every error counts in
//! `bbr_mapping_watch_errors_total` and every complete listing or event sets
//! `bbr_mapping_watch_last_success_timestamp_seconds`.

use std::collections::BinaryHeap;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::mapping::{Entry, MAX_SOURCES, MAX_TOTAL_ADAPTERS, Mapping};
use crate::metrics::Metrics;

/// The label selector of managed ConfigMaps.
pub fn selector() -> String {
    format!("{}=true", ext_proc::protocol::BBR_MANAGED_LABEL)
}

/// The mapping key of a ConfigMap.
fn key(cm: &ConfigMap) -> String {
    format!("{}/{}", cm.namespace().unwrap_or_default(), cm.name_any())
}

/// When the API server created a ConfigMap (Unix seconds; none sorts last): the order in which
/// a fresh process takes a listing's ConfigMaps, so that the older of two claims on an adapter
/// keeps it. Set by the API server, not by the ConfigMap's author.
fn created(cm: &ConfigMap) -> i64 {
    cm.metadata
        .creation_timestamp
        .as_ref()
        .map_or(i64::MAX, |t| t.0.as_second())
}

/// The entry of a ConfigMap, or `None` (logged, counted) when it is invalid.
fn entry(cm: &ConfigMap, metrics: &Metrics) -> Option<Entry> {
    let data = cm.data.clone().unwrap_or_default();
    match Entry::from_config_map_data(&data) {
        Ok(e) => Some(e),
        Err(error) => {
            metrics.sources_rejected.inc();
            tracing::warn!(
                configmap = %key(cm),
                %error,
                "mapping ConfigMap invalid; its last good version, if any, stays"
            );
            None
        }
    }
}

/// The ConfigMaps API: one namespace (`$NAMESPACE`, as upstream limits its cache) or all.
pub fn api(client: Client, namespace: Option<&str>) -> Api<ConfigMap> {
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// One run of the watch, until the stream ends or `shutdown` fires.
pub async fn watch(
    api: Api<ConfigMap>,
    mapping: Arc<Mapping>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let config = k8s::watch::watch_config().labels(&selector());
    let events = watcher::watcher(api, config)
        .default_backoff()
        .modify(|cm: &mut ConfigMap| cm.managed_fields_mut().clear());
    feed(events, &mapping, &metrics, shutdown).await;
}

/// A listing's ConfigMaps, gathered until it is complete, within what a relist can take: the
/// sources the mapping holds already (at most [`MAX_SOURCES`]), and of the new ones only the
/// oldest that fit [`MAX_SOURCES`] and [`MAX_TOTAL_ADAPTERS`] together. Whoever can create
/// labelled ConfigMaps in the namespace could otherwise make each listing (and every watch
/// restart) parse and hold all of them, some thousands of 1 MiB adapter lists.
#[derive(Default)]
struct Listing {
    known: Vec<Listed>,
    /// A max-heap by creation: the newest is the first to go past the caps.
    fresh: BinaryHeap<Listed>,
    fresh_adapters: usize,
    left_out: usize,
}

/// One listed ConfigMap, ordered by creation time, then key (unique, so the order is total).
struct Listed {
    created: i64,
    key: String,
    entry: Entry,
}

impl PartialEq for Listed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Listed {}
impl PartialOrd for Listed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Listed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.created, &self.key).cmp(&(other.created, &other.key))
    }
}

impl Listing {
    fn push(&mut self, created: i64, key: String, entry: Entry, known: bool) {
        let listed = Listed {
            created,
            key,
            entry,
        };
        if known {
            self.known.push(listed);
            return;
        }
        self.fresh_adapters += listed.entry.adapters.len();
        self.fresh.push(listed);
        while self.fresh.len() > MAX_SOURCES || self.fresh_adapters > MAX_TOTAL_ADAPTERS {
            let Some(newest) = self.fresh.pop() else {
                break;
            };
            self.fresh_adapters -= newest.entry.adapters.len();
            self.left_out += 1;
        }
    }

    fn len(&self) -> usize {
        self.known.len() + self.fresh.len() + self.left_out
    }

    /// Every ConfigMap kept, oldest first (the API's order is namespace, then name: an order
    /// anyone able to pick a name could jump), and how many were left out.
    fn into_sorted(self) -> (Vec<(String, Entry)>, usize) {
        let mut all = self.known;
        all.extend(self.fresh);
        all.sort_unstable();
        let sorted = all.into_iter().map(|l| (l.key, l.entry)).collect();
        (sorted, self.left_out)
    }
}

/// Drives one watch stream into the mapping.
pub async fn feed<S>(events: S, mapping: &Mapping, metrics: &Metrics, shutdown: CancellationToken)
where
    S: Stream<Item = Result<Event<ConfigMap>, watcher::Error>>,
{
    tokio::pin!(events);
    let mut listing = Listing::default();
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
            Ok(Event::Init) => listing = Listing::default(),
            Ok(Event::InitApply(cm)) => {
                let k = key(&cm);
                // An invalid ConfigMap keeps the version last taken from it, across relists
                // too (see `Apply`).
                let known = mapping.current(&k);
                let is_known = known.is_some();
                if let Some(e) = entry(&cm, metrics).or(known) {
                    listing.push(created(&cm), k, e, is_known);
                }
            }
            Ok(Event::InitDone) => {
                metrics.watch_succeeded();
                if last_error.take().is_some() {
                    tracing::info!("ConfigMap watch recovered");
                }
                let n = listing.len();
                let (sorted, left_out) = std::mem::take(&mut listing).into_sorted();
                let dropped = left_out + mapping.relist(sorted);
                if dropped > 0 {
                    tracing::warn!(dropped, "mapping ConfigMaps over the limit ignored");
                }
                tracing::info!(configmaps = n, "mapping ConfigMaps listed");
            }
            Ok(Event::Apply(cm)) => {
                metrics.watch_succeeded();
                let k = key(&cm);
                // An invalid edit (counted and warned by `entry`) keeps the last good version,
                // as file mode keeps the last good file: a typo in the adapter list had
                // dropped the base model too, and every request for it found no route.
                if let Some(e) = entry(&cm, metrics)
                    && let Err(error) = mapping.apply(&k, e)
                {
                    metrics.sources_rejected.inc();
                    tracing::warn!(configmap = %k, %error, "mapping ConfigMap ignored");
                }
            }
            Ok(Event::Delete(cm)) => {
                metrics.watch_succeeded();
                mapping.delete(&key(&cm));
            }
            Err(error) => {
                // Counted every time, logged once per distinct error: the count is what shows
                // a watch that keeps failing on the same error.
                metrics.watch_errors.inc();
                let text = error.to_string();
                if last_error.as_deref() == Some(text.as_str()) {
                    tracing::debug!(%error, "ConfigMap watch still failing");
                } else {
                    tracing::warn!(%error, "ConfigMap watch failed; retrying with backoff");
                    last_error = Some(text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use k8s::mock;
    use serde_json::{Value, json};

    use super::*;
    use crate::mapping::MAX_ADAPTERS_PER_SOURCE;

    fn cm(ns: &str, name: &str, base: &str, adapters: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "1",
                         "labels": {"inference.networking.k8s.io/bbr-managed": "true"}},
            "data": {"baseModel": base, "adapters": adapters}
        })
    }

    async fn until(mapping: &Mapping, model: &str, want: Option<&str>) {
        for _ in 0..1_000 {
            if mapping.lookup().base_model(model) == want {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{model} never mapped to {want:?}");
    }

    /// Review 17: a listing held every ConfigMap it parsed until it was complete. It keeps
    /// the sources already held and, of the new ones, only the oldest within the caps.
    #[test]
    fn a_listing_holds_no_more_than_a_relist_can_take() {
        let mut listing = Listing::default();
        let fresh = |i: usize| Entry::new(Some(&format!("b{i}")), []).unwrap();
        // New ones in a scrambled order of creation, and one the mapping holds, newest of all.
        for i in (0..MAX_SOURCES + 5).rev() {
            listing.push(i as i64, format!("ns/{i:05}"), fresh(i), false);
        }
        listing.push(i64::MAX, "ns/known".into(), fresh(0), true);
        assert_eq!(listing.fresh.len(), MAX_SOURCES);
        assert_eq!(listing.len(), MAX_SOURCES + 6);
        let (sorted, left_out) = listing.into_sorted();
        assert_eq!(left_out, 5);
        assert_eq!(sorted.len(), MAX_SOURCES + 1);
        assert_eq!(sorted[0].0, "ns/00000", "oldest first");
        assert_eq!(
            sorted[MAX_SOURCES - 1].0,
            format!("ns/{:05}", MAX_SOURCES - 1)
        );
        assert_eq!(sorted[MAX_SOURCES].0, "ns/known");
        // Adapters too: the newest goes while the new ones hold more than the total cap.
        let mut listing = Listing::default();
        let wide = |i: usize| {
            let names: Vec<String> = (0..MAX_ADAPTERS_PER_SOURCE)
                .map(|a| format!("a{i}-{a}"))
                .collect();
            Entry::new(Some("b"), names.iter().map(String::as_str)).unwrap()
        };
        let per_total = MAX_TOTAL_ADAPTERS / MAX_ADAPTERS_PER_SOURCE;
        for i in 0..=per_total {
            listing.push(i as i64, format!("ns/{i}"), wide(i), false);
        }
        assert_eq!((listing.fresh.len(), listing.left_out), (per_total, 1));
    }

    /// The real watcher of namespace `default`, against a scripted API server.
    struct Watching {
        server: mock::ApiServer,
        mapping: Arc<Mapping>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn watching() -> Watching {
        let (client, server) = mock::client("default");
        let mapping = Mapping::new();
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch(
            api(client, Some("default")),
            mapping.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        Watching {
            server,
            mapping,
            metrics,
            shutdown,
            task,
        }
    }

    /// The real watcher against a scripted API server: the label selector is sent, the
    /// listing syncs the mapping, then events change it.
    #[tokio::test(start_paused = true)]
    async fn watch_lists_then_follows_events() {
        let Watching {
            mut server,
            mapping,
            metrics,
            shutdown,
            task,
        } = watching();
        let path = "/api/v1/namespaces/default/configmaps";
        let (req, send) = server.expect_get(path, false).await;
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert!(
            query.contains("labelSelector=inference.networking.k8s.io%2Fbbr-managed%3Dtrue"),
            "{query}"
        );
        mock::respond_list(
            send,
            vec![
                cm("default", "llama", "llama", "- food-review\n"),
                cm("default", "broken", "", "- x\n"),
            ],
        );
        let (_, watch) = server.expect_watch(path).await;
        let mut synced = mapping.synced();
        synced.wait_for(|s| *s).await.unwrap();
        assert_eq!(mapping.lookup().base_model("food-review"), Some("llama"));
        assert_eq!(metrics.sources_rejected.get(), 1);

        watch
            .send("ADDED", cm("default", "qwen", "qwen", "[sql-lora]"))
            .await;
        until(&mapping, "sql-lora", Some("qwen")).await;
        watch
            .send("MODIFIED", cm("default", "llama", "llama", "[]"))
            .await;
        until(&mapping, "food-review", None).await;
        assert_eq!(mapping.lookup().base_model("llama"), Some("llama"));
        watch
            .send("DELETED", cm("default", "qwen", "qwen", "[sql-lora]"))
            .await;
        until(&mapping, "qwen", None).await;

        // Review 10: an invalid edit dropped the whole source, base model included. It keeps
        // the last good version, through a relist too.
        watch
            .send("MODIFIED", cm("default", "llama", "llama", "[sql-lora]"))
            .await;
        until(&mapping, "sql-lora", Some("llama")).await;
        watch
            .send("MODIFIED", cm("default", "llama", "llama", "- a\n -b: ["))
            .await;
        // A later valid event proves the invalid one was handled.
        watch
            .send("ADDED", cm("default", "mistral", "mistral", "[]"))
            .await;
        until(&mapping, "mistral", Some("mistral")).await;
        assert_eq!(metrics.sources_rejected.get(), 2);
        assert_eq!(mapping.lookup().base_model("sql-lora"), Some("llama"));
        watch.send("ERROR", mock::status(410, "Expired")).await;
        let (_, send) = server.expect_get(path, false).await;
        mock::respond_list(
            send,
            vec![
                cm("default", "llama", "llama", "- a\n -b: ["),
                cm("default", "mistral", "mistral", "[]"),
            ],
        );
        let (_, _watch) = server.expect_watch(path).await;
        assert_eq!(metrics.sources_rejected.get(), 3);
        assert_eq!(mapping.lookup().base_model("sql-lora"), Some("llama"));
        assert_eq!(mapping.lookup().base_model("llama"), Some("llama"));
        shutdown.cancel();
        task.await.unwrap();
    }

    /// Review B3: on a fresh process the listing comes in the API's order (namespace, then
    /// name), which anyone able to pick a namespace or name can jump. The oldest ConfigMap
    /// (the API server's `creationTimestamp`) claims first, then namespace/name.
    #[tokio::test]
    async fn a_fresh_listing_takes_the_oldest_configmap_first() {
        let at = |mut v: Value, created: Option<&str>| {
            if let Some(t) = created {
                v["metadata"]["creationTimestamp"] = json!(t);
            }
            serde_json::from_value::<ConfigMap>(v).unwrap()
        };
        let listing = [
            at(
                cm("a-tenant", "evil", "evil", "[food-review, sql]"),
                Some("2026-02-01T00:00:00Z"),
            ),
            at(cm("b", "undated", "undated", "[sql]"), None),
            at(
                cm("b", "tie", "tie", "[tied]"),
                Some("2025-01-01T00:00:00Z"),
            ),
            at(
                cm("team", "llama", "llama", "[food-review, tied]"),
                Some("2025-01-01T00:00:00Z"),
            ),
            at(
                cm("z", "qwen", "qwen", "[sql]"),
                Some("2025-06-01T00:00:00Z"),
            ),
        ];
        let events = futures::stream::iter(
            std::iter::once(Event::Init)
                .chain(listing.into_iter().map(Event::InitApply))
                .chain(std::iter::once(Event::InitDone))
                .map(Ok),
        );
        let mapping = Mapping::new();
        let metrics = Metrics::default();
        feed(events, &mapping, &metrics, CancellationToken::new()).await;
        let l = mapping.lookup();
        assert_eq!(l.base_model("food-review"), Some("llama"));
        assert_eq!(l.base_model("sql"), Some("qwen"));
        assert_eq!(
            l.base_model("tied"),
            Some("tie"),
            "same second: b/tie first"
        );
        assert_eq!(l.contested(), 4);
    }

    /// Review B4: a watch that fails after the first listing (here: expired, then the relist
    /// refused as when RBAC is removed) never ends, so nothing took readiness down and the
    /// only sign was one warn line per distinct error. The router stays ready on its last good
    /// mapping; every error is counted and the last success keeps its time until the watch
    /// works again.
    #[tokio::test(start_paused = true)]
    async fn watch_failures_are_counted_and_the_last_success_timed() {
        let Watching {
            mut server,
            mapping,
            metrics,
            shutdown,
            task,
        } = watching();
        let path = "/api/v1/namespaces/default/configmaps";
        assert_eq!(metrics.watch_last_success.get(), 0, "nothing listed yet");
        server
            .expect_list(path, vec![cm("default", "llama", "llama", "[food]")], "1")
            .await;
        let (_, watch) = server.expect_watch(path).await;
        mapping.synced().wait_for(|s| *s).await.unwrap();
        let listed = metrics.watch_last_success.get();
        assert!(listed > 1_700_000_000, "a Unix time: {listed}");
        assert_eq!(metrics.watch_errors.get(), 0);
        // An old success, so that any later one shows.
        metrics.watch_last_success.set(1);

        watch.send("ERROR", mock::status(410, "Expired")).await;
        // The next request comes after the feed handled the error (it pulls the stream).
        let (_, send) = server.expect_get(path, false).await;
        assert_eq!(metrics.watch_errors.get(), 1);
        mock::respond_json(
            send,
            axum::http::StatusCode::FORBIDDEN,
            &mock::status(403, "Forbidden"),
        );
        let (_, send) = server.expect_get(path, false).await;
        assert_eq!(metrics.watch_errors.get(), 2);
        assert_eq!(metrics.watch_last_success.get(), 1, "no success since");
        // Still synced (ready) on the last good mapping.
        assert!(*mapping.synced().borrow());
        assert_eq!(mapping.lookup().base_model("food"), Some("llama"));

        mock::respond_list(send, vec![cm("default", "llama", "llama", "[sql]")]);
        // The watch starts once the listing was handled.
        let (_, _watch) = server.expect_watch(path).await;
        assert!(
            metrics.watch_last_success.get() > 1,
            "the relist is a success"
        );
        assert_eq!(mapping.lookup().base_model("sql"), Some("llama"));
        assert_eq!(metrics.watch_errors.get(), 2);
        shutdown.cancel();
        task.await.unwrap();
    }
}
