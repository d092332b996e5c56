//! The pool index: a plain synchronous struct fed by the watches, with no client in sight.
//!
//! ```text
//!   [ InferencePool ]──selector.matchLabels──▶[ Pod ]──status.podIP × targetPorts──▶ endpoints
//!          ▲                                     │                                 <pod>-rank-<i>
//!          │ poolRef                             └─ active-ports annotation, Ready, no deletion
//!   [ InferenceObjective ]  name → priority
//!   [ InferenceModelRewrite ] rules, ordered by creationTimestamp
//! ```
//!
//! Each watch calls [`IndexResource::apply`] / [`IndexResource::delete`] on single events and
//! [`IndexResource::reset`] with the complete listing after every (re)list. After each call the
//! index recomputes the [`PoolSpec`] and [`Policies`] and hands whichever changed to the
//! datastore and director. The pool is published only once **both** the pool and the pod
//! watches have completed one full listing (and the pool exists): publishing is what flips the
//! datastore to "synced", and readiness follows that, so an EPP never reports ready with a
//! half-listed pod set. Where the objectives and rewrites are watched too
//! ([`Index::awaiting_policies`]), the first publication also waits for each of them to answer
//! once: its listing, or an API server's word that the kind is not there (a CRD not installed,
//! a role without it), so that the first requests are not routed without the rewrites and
//! priorities the cluster declares.
//!
//! Pods are trimmed on entry to the few fields that matter, so the index holds no full objects.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use endpoint_picker::datastore::{Datastore, EndpointSpec, PoolSpec};
use endpoint_picker::director::{Director, ModelRewrite, Policies, RewriteRule, RewriteTarget};
use endpoint_picker::discovery::file::ACTIVE_PORTS_ANNOTATION;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use parking_lot::Mutex;

use crate::api::{
    InferenceModelRewrite, InferenceObjective, InferencePool, InferencePoolSpec, MatchType,
    PoolObjectReference,
};

/// The index behind a lock, shared by the watch tasks. Never held across an `.await`.
pub type SharedIndex = Arc<Mutex<Index>>;

/// How a watch feeds one resource kind into the index (the kubert `IndexNamespacedResource`
/// shape, for a single namespace).
pub trait IndexResource<K> {
    /// An object was added or changed.
    fn apply(&mut self, obj: K);
    /// An object was deleted.
    fn delete(&mut self, obj: K);
    /// The API server says the kind cannot be listed (not found, forbidden): nothing of it
    /// will come until that changes.
    fn unavailable(&mut self) {}
    /// The watch (re)listed: `objs` is the complete current set; anything else is gone.
    fn reset(&mut self, objs: Vec<K>);
}

/// Which pool this EPP serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    /// InferencePool name (`--pool-name`).
    pub name: String,
    /// Its namespace (`--pool-namespace`).
    pub namespace: String,
    /// Its API group (`--pool-group`).
    pub group: String,
}

/// Where the index publishes.
#[derive(Debug, Clone)]
pub struct Publisher {
    /// Receives every new pool.
    pub datastore: Arc<Datastore>,
    /// Receives every new set of objectives and rewrites.
    pub director: Option<Arc<Director>>,
}

/// What the index keeps of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodEntry {
    labels: BTreeMap<String, String>,
    ip: Option<IpAddr>,
    ready: bool,
    deleting: bool,
    /// `None` = every target port is active.
    active_ports: Option<Vec<u16>>,
}

impl PodEntry {
    fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let active_ports = pod
            .annotations()
            .get(ACTIVE_PORTS_ANNOTATION)
            .map(|s| s.split(',').filter_map(|p| p.trim().parse().ok()).collect());
        Self {
            labels: pod.labels().clone(),
            ip,
            ready,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            active_ports,
        }
    }

    fn is_live(&self) -> bool {
        self.ready && !self.deleting && self.ip.is_some()
    }
}

/// The in-memory model of one pool: its spec, its namespace's pods, objectives and rewrites.
#[derive(Debug)]
pub struct Index {
    pool_ref: PoolRef,
    metrics_port: Option<u16>,
    /// Standalone mode: the pool is given, not watched.
    fixed_pool: bool,
    pool: Option<InferencePoolSpec>,
    pods: BTreeMap<String, PodEntry>,
    objectives: BTreeMap<String, i32>,
    rewrites: BTreeMap<String, ModelRewrite>,
    pools_synced: bool,
    pods_synced: bool,
    /// The objectives and the rewrites have answered once (listed, or are unavailable), or
    /// are not awaited.
    objectives_settled: bool,
    rewrites_settled: bool,
    published_pool: Option<PoolSpec>,
    published_policies: Option<Policies>,
    publisher: Publisher,
    /// `--model-server-metrics-port` is set and the pool has several target ports, where the
    /// reference ignores it: said once each time the pool becomes so.
    metrics_port_ignored: bool,
}

impl Index {
    /// An index for the InferencePool `pool_ref`. `metrics_port` is
    /// `--model-server-metrics-port` (applies to single-port pools only).
    pub fn new(pool_ref: PoolRef, metrics_port: Option<u16>, publisher: Publisher) -> Self {
        Self {
            pool_ref,
            metrics_port,
            fixed_pool: false,
            pool: None,
            pods: BTreeMap::new(),
            objectives: BTreeMap::new(),
            rewrites: BTreeMap::new(),
            pools_synced: false,
            pods_synced: false,
            objectives_settled: true,
            rewrites_settled: true,
            published_pool: None,
            published_policies: None,
            metrics_port_ignored: false,
            publisher,
        }
    }

    /// Standalone mode (`--endpoint-selector`): the pool spec is given and never watched.
    pub fn standalone(
        pool_ref: PoolRef,
        spec: InferencePoolSpec,
        metrics_port: Option<u16>,
        publisher: Publisher,
    ) -> Self {
        let mut index = Self::new(pool_ref, metrics_port, publisher);
        index.fixed_pool = true;
        index.set_pool(Some(spec));
        index.pools_synced = true;
        index
    }

    /// The first publication of the pool also waits for the objectives and rewrites to have
    /// listed once, or to be unavailable (their watches run beside the pool's).
    pub fn awaiting_policies(mut self) -> Self {
        self.objectives_settled = false;
        self.rewrites_settled = false;
        self
    }

    /// Shares the index between watch tasks.
    pub fn shared(self) -> SharedIndex {
        Arc::new(Mutex::new(self))
    }

    /// The pool this index serves.
    pub fn pool_ref(&self) -> &PoolRef {
        &self.pool_ref
    }

    /// True once the pool and its pods have been listed and published.
    pub fn is_synced(&self) -> bool {
        self.published_pool.is_some()
    }

    /// The pool as last computed (what the datastore holds), if published.
    pub fn published_pool(&self) -> Option<&PoolSpec> {
        self.published_pool.as_ref()
    }

    /// True while `--model-server-metrics-port` is set and ignored: the pool has several
    /// target ports, each scraped on its own (the reference's rule).
    pub fn metrics_port_ignored(&self) -> bool {
        self.metrics_port_ignored
    }

    /// The pool's usable target ports.
    fn target_ports(pool: &InferencePoolSpec) -> Vec<u16> {
        pool.target_ports
            .iter()
            .filter_map(|p| u16::try_from(p.number).ok().filter(|n| *n != 0))
            .collect()
    }

    /// Takes the pool's new spec (or its absence), and says once when it makes
    /// `--model-server-metrics-port` ignored.
    fn set_pool(&mut self, spec: Option<InferencePoolSpec>) {
        let ports = spec.as_ref().map_or(0, |p| Self::target_ports(p).len());
        let ignored = self.metrics_port.is_some() && ports > 1;
        if ignored && !self.metrics_port_ignored {
            tracing::warn!(
                pool = %self.pool_ref.name,
                target_ports = ports,
                "--model-server-metrics-port applies to single-port pools only: each of this pool's target ports is scraped on itself"
            );
        }
        self.metrics_port_ignored = ignored;
        self.pool = spec;
    }

    /// Computes the scheduling endpoints from the current pool and pods.
    fn pool_spec(&self) -> Option<PoolSpec> {
        let pool = self.pool.as_ref()?;
        let ports = Self::target_ports(pool);
        let mut endpoints = Vec::new();
        for (name, pod) in &self.pods {
            let Some(ip) = pod.ip.filter(|_| pod.is_live()) else {
                continue;
            };
            let selected = pool
                .selector
                .match_labels
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v));
            if !selected {
                continue;
            }
            for (rank, &port) in ports.iter().enumerate() {
                if pod
                    .active_ports
                    .as_ref()
                    .is_some_and(|a| !a.contains(&port))
                {
                    continue;
                }
                let scrape_port = match (ports.len(), self.metrics_port) {
                    (1, Some(m)) => m,
                    _ => port,
                };
                endpoints.push(EndpointSpec {
                    name: format!("{name}-rank-{rank}"),
                    pod_name: name.clone(),
                    namespace: self.pool_ref.namespace.clone(),
                    address: SocketAddr::new(ip, port),
                    metrics_address: SocketAddr::new(ip, scrape_port),
                    rank,
                    labels: pod.labels.clone(),
                });
            }
        }
        Some(PoolSpec {
            name: self.pool_ref.name.clone(),
            namespace: self.pool_ref.namespace.clone(),
            app_protocol: pool.app_protocol.as_str().to_owned(),
            endpoints,
        })
    }

    fn policies(&self) -> Policies {
        Policies {
            objectives: self
                .objectives
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect::<HashMap<_, _>>(),
            rewrites: self.rewrites.values().cloned().collect(),
        }
    }

    /// Pushes whatever changed to the datastore and director.
    fn publish(&mut self) {
        let policies = self.policies();
        if self.published_policies.as_ref() != Some(&policies) {
            if let Some(director) = &self.publisher.director {
                director.set_policies(policies.clone());
            }
            tracing::debug!(
                objectives = policies.objectives.len(),
                rewrites = policies.rewrites.len(),
                "policies updated"
            );
            self.published_policies = Some(policies);
        }
        let listed = self.pools_synced && self.pods_synced;
        if !(listed && self.objectives_settled && self.rewrites_settled) {
            return;
        }
        let spec = match self.pool_spec() {
            Some(spec) => spec,
            // The pool is gone (or never existed): nothing may be routed to its old pods.
            None if self.published_pool.is_some() => PoolSpec {
                name: self.pool_ref.name.clone(),
                namespace: self.pool_ref.namespace.clone(),
                app_protocol: "http".into(),
                endpoints: Vec::new(),
            },
            None => return,
        };
        if self.published_pool.as_ref() == Some(&spec) {
            return;
        }
        tracing::info!(
            pool = %spec.name,
            endpoints = spec.endpoints.len(),
            first = self.published_pool.is_none(),
            "pool updated"
        );
        self.publisher.datastore.apply(spec.clone());
        self.published_pool = Some(spec);
    }

    fn is_our_pool(&self, r: &PoolObjectReference) -> bool {
        r.name == self.pool_ref.name && r.group == self.pool_ref.group
    }
}

impl IndexResource<InferencePool> for Index {
    fn apply(&mut self, pool: InferencePool) {
        if self.fixed_pool || pool.name_any() != self.pool_ref.name {
            return;
        }
        self.set_pool(Some(pool.spec));
        self.publish();
    }

    fn delete(&mut self, pool: InferencePool) {
        if self.fixed_pool || pool.name_any() != self.pool_ref.name {
            return;
        }
        tracing::warn!(pool = %self.pool_ref.name, "InferencePool deleted; no endpoints until it returns");
        self.set_pool(None);
        self.publish();
    }

    fn reset(&mut self, pools: Vec<InferencePool>) {
        if self.fixed_pool {
            return;
        }
        let spec = pools
            .into_iter()
            .find(|p| p.name_any() == self.pool_ref.name)
            .map(|p| p.spec);
        self.set_pool(spec);
        if self.pool.is_none() {
            // Before the first publication the EPP is not ready; after it, the pool is
            // published empty and requests get no endpoint (a review found the one message
            // for both).
            if self.published_pool.is_some() {
                tracing::warn!(pool = %self.pool_ref.name, namespace = %self.pool_ref.namespace, "InferencePool not found: its endpoints are gone, and requests find none until it exists again");
            } else {
                tracing::warn!(pool = %self.pool_ref.name, namespace = %self.pool_ref.namespace, "InferencePool not found; not ready until it exists");
            }
        }
        self.pools_synced = true;
        self.publish();
    }
}

impl IndexResource<Pod> for Index {
    fn apply(&mut self, pod: Pod) {
        let entry = PodEntry::from_pod(&pod);
        let name = pod.name_any();
        if self.pods.get(&name) == Some(&entry) {
            return;
        }
        self.pods.insert(name, entry);
        self.publish();
    }

    fn delete(&mut self, pod: Pod) {
        if self.pods.remove(&pod.name_any()).is_some() {
            self.publish();
        }
    }

    fn reset(&mut self, pods: Vec<Pod>) {
        self.pods = pods
            .iter()
            .map(|p| (p.name_any(), PodEntry::from_pod(p)))
            .collect();
        self.pods_synced = true;
        self.publish();
    }
}

impl IndexResource<InferenceObjective> for Index {
    fn apply(&mut self, obj: InferenceObjective) {
        let name = obj.name_any();
        if self.is_our_pool(&obj.spec.pool_ref) {
            self.objectives.insert(name, obj.spec.priority.unwrap_or(0));
        } else {
            // It may have been ours before an edit of its poolRef.
            self.objectives.remove(&name);
        }
        self.publish();
    }

    fn delete(&mut self, obj: InferenceObjective) {
        self.objectives.remove(&obj.name_any());
        self.publish();
    }

    fn reset(&mut self, objs: Vec<InferenceObjective>) {
        self.objectives = objs
            .into_iter()
            .filter(|o| self.is_our_pool(&o.spec.pool_ref))
            .map(|o| (o.name_any(), o.spec.priority.unwrap_or(0)))
            .collect();
        self.objectives_settled = true;
        self.publish();
    }

    fn unavailable(&mut self) {
        if !self.objectives_settled {
            tracing::info!(
                "InferenceObjectives cannot be listed; routing without priorities until they can"
            );
            self.objectives_settled = true;
            self.publish();
        }
    }
}

fn to_rewrite(obj: &InferenceModelRewrite) -> ModelRewrite {
    ModelRewrite {
        name: obj.name_any(),
        created: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(i64::MAX),
        rules: obj
            .spec
            .rules
            .iter()
            // A match of a kind not known here matches nothing; a rule left with no match it
            // can make is dropped (no matches at all would match every model).
            .filter(|rule| {
                rule.matches.is_empty()
                    || rule
                        .matches
                        .iter()
                        .any(|m| m.model.r#type == MatchType::Exact)
            })
            .map(|rule| RewriteRule {
                matches: rule
                    .matches
                    .iter()
                    .filter(|m| m.model.r#type == MatchType::Exact)
                    .map(|m| m.model.value.clone())
                    .collect(),
                targets: rule
                    .targets
                    .iter()
                    .map(|t| RewriteTarget {
                        model: t.model_rewrite.clone(),
                        // Weights are all set or all unset; unset everywhere means uniform.
                        weight: t.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(1),
                    })
                    .collect(),
            })
            .collect(),
    }
}

impl IndexResource<InferenceModelRewrite> for Index {
    fn apply(&mut self, obj: InferenceModelRewrite) {
        let name = obj.name_any();
        if self.is_our_pool(&obj.spec.pool_ref) {
            self.rewrites.insert(name, to_rewrite(&obj));
        } else {
            self.rewrites.remove(&name);
        }
        self.publish();
    }

    fn delete(&mut self, obj: InferenceModelRewrite) {
        self.rewrites.remove(&obj.name_any());
        self.publish();
    }

    fn reset(&mut self, objs: Vec<InferenceModelRewrite>) {
        self.rewrites = objs
            .iter()
            .filter(|o| self.is_our_pool(&o.spec.pool_ref))
            .map(|o| (o.name_any(), to_rewrite(o)))
            .collect();
        self.rewrites_settled = true;
        self.publish();
    }

    fn unavailable(&mut self) {
        if !self.rewrites_settled {
            tracing::info!(
                "InferenceModelRewrites cannot be listed; routing without rewrites until they can"
            );
            self.rewrites_settled = true;
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests;
