//! Local mode: the pool and its endpoints from a YAML file, reloaded when the file changes.
//!
//! ```yaml
//! pool:                       # an InferencePool, exactly as applied to a cluster
//!   apiVersion: inference.networking.k8s.io/v1
//!   kind: InferencePool
//!   metadata: {name: demo, namespace: default}
//!   spec:
//!     selector: {matchLabels: {app: sim}}
//!     targetPorts: [{number: 8000}]
//!     appProtocol: http
//! endpoints:                  # what the Pods would be
//! - name: sim-0
//!   address: 127.0.0.1
//!   labels: {app: sim}
//!   ports: [8001]             # optional: this endpoint's own target ports (else the pool's)
//!   ready: true               # optional, default true
//!   annotations: {}           # optional; honours inference.networking.k8s.io/active-ports
//! objectives:                 # optional InferenceObjectives: name → priority
//! - {name: batch, priority: -1}
//! modelRewrites:              # optional InferenceModelRewrites (spec.rules as in the CRD)
//! - name: canary
//!   rules:
//!   - matches: [{model: {value: llama}}]
//!     targets: [{modelRewrite: llama-v2, weight: 90}, {modelRewrite: llama-v3, weight: 10}]
//! ```
//!
//! Each (endpoint, target port) becomes one scheduling endpoint named `<name>-rank-<i>`.
//! A file that fails to parse is reported and the previous pool stays in force.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::datastore::{Datastore, EndpointSpec, PoolSpec};
use crate::director::{Director, ModelRewrite, Policies, RewriteRule, RewriteTarget};

/// Annotation restricting which target ports of a pod are live (`"8000,8002"`).
pub const ACTIVE_PORTS_ANNOTATION: &str = "inference.networking.k8s.io/active-ports";

/// A problem with the pool file.
#[derive(Debug, thiserror::Error)]
pub enum PoolFileError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML did not parse.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The YAML error.
        #[source]
        source: crate::yaml::YamlError,
    },
    /// The content is inconsistent.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PoolFile {
    pool: InferencePoolDoc,
    #[serde(default)]
    endpoints: Vec<EndpointDoc>,
    #[serde(default)]
    objectives: Vec<ObjectiveDoc>,
    #[serde(default)]
    model_rewrites: Vec<RewriteDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InferencePoolDoc {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Metadata,
    spec: PoolSpecDoc,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpecDoc {
    selector: SelectorDoc,
    target_ports: Vec<PortDoc>,
    #[serde(default)]
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorDoc {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct PortDoc {
    number: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EndpointDoc {
    name: String,
    address: IpAddr,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    metrics_port: Option<u16>,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    namespace: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectiveDoc {
    name: String,
    #[serde(default)]
    priority: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RewriteDoc {
    name: String,
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    #[serde(default)]
    matches: Vec<MatchDoc>,
    #[serde(default)]
    targets: Vec<TargetDoc>,
}

#[derive(Debug, Deserialize)]
struct MatchDoc {
    model: ModelMatchDoc,
}

#[derive(Debug, Deserialize)]
struct ModelMatchDoc {
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TargetDoc {
    model_rewrite: String,
    #[serde(default)]
    weight: Option<u32>,
}

/// What a pool file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalPool {
    /// The pool and its scheduling endpoints.
    pub pool: PoolSpec,
    /// Objectives and rewrites.
    pub policies: Policies,
}

/// Parses a pool file's contents. `metrics_port` overrides the scrape port when the pool has a
/// single target port (the reference's `--model-server-metrics-port` rule).
pub fn parse(
    path: &Path,
    text: &str,
    metrics_port: Option<u16>,
) -> Result<LocalPool, PoolFileError> {
    let invalid = |reason: String| PoolFileError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let doc: PoolFile = crate::yaml::from_str(text).map_err(|source| PoolFileError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let p = &doc.pool;
    if let Some(v) = &p.api_version
        && v != "inference.networking.k8s.io/v1"
    {
        return Err(invalid(format!(
            "pool apiVersion must be inference.networking.k8s.io/v1, got {v:?}"
        )));
    }
    if let Some(k) = &p.kind
        && k != "InferencePool"
    {
        return Err(invalid(format!(
            "pool kind must be InferencePool, got {k:?}"
        )));
    }
    let ports: Vec<u16> = p.spec.target_ports.iter().map(|t| t.number).collect();
    check_ports(&ports, "pool targetPorts").map_err(invalid)?;
    if let Some(m) = metrics_port
        && ports.len() > 1
    {
        tracing::warn!(
            path = %path.display(),
            metrics_port = m,
            target_ports = ports.len(),
            "--model-server-metrics-port applies to single-port pools only: each of this pool's target ports is scraped on itself"
        );
    }
    let app_protocol = p.spec.app_protocol.clone().unwrap_or_else(|| "http".into());
    if app_protocol != "http" && app_protocol != "kubernetes.io/h2c" {
        return Err(invalid(format!(
            "appProtocol must be http or kubernetes.io/h2c, got {app_protocol:?}"
        )));
    }
    let namespace = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut endpoints = Vec::new();
    for e in &doc.endpoints {
        if !e.ready {
            continue;
        }
        if !p
            .spec
            .selector
            .match_labels
            .iter()
            .all(|(k, v)| e.labels.get(k) == Some(v))
        {
            continue;
        }
        // An endpoint's own ports stand in for the pool's and obey the same rules.
        if !e.ports.is_empty() {
            check_ports(&e.ports, &format!("endpoint {:?} ports", e.name)).map_err(invalid)?;
        }
        if e.metrics_port == Some(0) {
            return Err(invalid(format!(
                "endpoint {:?} metricsPort must be in 1..65535",
                e.name
            )));
        }
        let own_ports = if e.ports.is_empty() {
            ports.clone()
        } else {
            e.ports.clone()
        };
        let active: Option<Vec<u16>> = e
            .annotations
            .get(ACTIVE_PORTS_ANNOTATION)
            .map(|s| s.split(',').filter_map(|p| p.trim().parse().ok()).collect());
        for (rank, &port) in own_ports.iter().enumerate() {
            if active.as_ref().is_some_and(|a| !a.contains(&port)) {
                continue;
            }
            let address = SocketAddr::new(e.address, port);
            let scrape_port = e
                .metrics_port
                .or(if own_ports.len() == 1 {
                    metrics_port
                } else {
                    None
                })
                .unwrap_or(port);
            endpoints.push(EndpointSpec {
                name: format!("{}-rank-{rank}", e.name),
                pod_name: e.name.clone(),
                namespace: e.namespace.clone().unwrap_or_else(|| namespace.clone()),
                address,
                metrics_address: SocketAddr::new(e.address, scrape_port),
                rank,
                labels: e.labels.clone(),
            });
        }
    }
    let objectives = doc
        .objectives
        .iter()
        .map(|o| (o.name.clone(), o.priority.unwrap_or(0)))
        .collect();
    let rewrites = doc
        .model_rewrites
        .iter()
        .enumerate()
        .map(|(i, r)| ModelRewrite {
            name: r.name.clone(),
            // File order stands in for creation time.
            created: i as i64,
            rules: r
                .rules
                .iter()
                .map(|rule| RewriteRule {
                    matches: rule.matches.iter().map(|m| m.model.value.clone()).collect(),
                    targets: rule
                        .targets
                        .iter()
                        .map(|t| RewriteTarget {
                            model: t.model_rewrite.clone(),
                            weight: t.weight.unwrap_or(1),
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    Ok(LocalPool {
        pool: PoolSpec {
            name: p.metadata.name.clone(),
            namespace,
            app_protocol,
            endpoints,
        },
        policies: Policies {
            objectives,
            rewrites,
        },
    })
}

/// 1 to 8 ports, each in 1..65535, no two alike.
fn check_ports(ports: &[u16], what: &str) -> Result<(), String> {
    if ports.is_empty() || ports.len() > 8 {
        return Err(format!("{what}: 1 to 8 ports needed, got {}", ports.len()));
    }
    if ports.contains(&0) {
        return Err(format!("{what} must be in 1..65535"));
    }
    let mut uniq = ports.to_vec();
    uniq.sort_unstable();
    uniq.dedup();
    if uniq.len() != ports.len() {
        return Err(format!("{what} must be unique"));
    }
    Ok(())
}

/// The largest pool file read: a thousand endpoints with their objectives and rewrites take a
/// few hundred KB. A longer file (a mistaken path: a log, `/dev/zero`, a FIFO) is refused
/// before it is read whole, at start-up and at every poll.
pub const MAX_POOL_FILE_BYTES: usize = 16 << 20;

/// Reads and parses a pool file.
pub fn read(path: &Path, metrics_port: Option<u16>) -> Result<LocalPool, PoolFileError> {
    read_bytes(path, metrics_port).map(|(pool, _)| pool)
}

/// Reads and parses a pool file, returning the bytes read too: the watcher compares later
/// reads against them, so the file is read once at start-up and a change right after it is
/// not lost.
pub fn read_bytes(
    path: &Path,
    metrics_port: Option<u16>,
) -> Result<(LocalPool, Vec<u8>), PoolFileError> {
    let bytes =
        crate::files::read_at_most_blocking(path, MAX_POOL_FILE_BYTES).map_err(|source| {
            PoolFileError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
    let pool = parse(path, &String::from_utf8_lossy(&bytes), metrics_port)?;
    Ok((pool, bytes))
}

/// Applies a local pool to the datastore and director.
pub fn apply(local: LocalPool, datastore: &Datastore, director: Option<&Director>) {
    datastore.apply(local.pool);
    if let Some(d) = director {
        d.set_policies(local.policies);
        d.pool_changed();
    }
}

/// Follows a pool file: re-reads it every `interval` and applies it when its bytes changed.
/// Errors are logged; the last good pool stays in force. The bytes last seen live here, not in
/// the task, so a supervisor may restart [`FileWatcher::run`] without re-applying an unchanged
/// file.
#[derive(Debug)]
pub struct FileWatcher {
    path: PathBuf,
    interval: Duration,
    metrics_port: Option<u16>,
    datastore: Arc<Datastore>,
    director: Option<Arc<Director>>,
    last: Mutex<Vec<u8>>,
}

impl FileWatcher {
    /// A watcher of `path` whose current contents, `seen`, are already applied.
    pub fn new(
        path: PathBuf,
        interval: Duration,
        metrics_port: Option<u16>,
        datastore: Arc<Datastore>,
        director: Option<Arc<Director>>,
        seen: Vec<u8>,
    ) -> Self {
        Self {
            path,
            interval,
            metrics_port,
            datastore,
            director,
            last: Mutex::new(seen),
        }
    }

    /// Polls until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            self.poll().await;
        }
    }

    async fn poll(&self) {
        let path = &self.path;
        let bytes = match crate::files::read_at_most(path, MAX_POOL_FILE_BYTES).await {
            Ok(b) => b,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "pool file unreadable; keeping the current pool");
                return;
            }
        };
        if *self.last.lock() == bytes {
            return;
        }
        match parse(path, &String::from_utf8_lossy(&bytes), self.metrics_port) {
            Ok(local) => {
                let n = local.pool.endpoints.len();
                apply(local, &self.datastore, self.director.as_deref());
                tracing::info!(path = %path.display(), endpoints = n, "pool file reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "pool file invalid; keeping the current pool");
            }
        }
        *self.last.lock() = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
pool:
  apiVersion: inference.networking.k8s.io/v1
  kind: InferencePool
  metadata: {name: demo, namespace: ns}
  spec:
    selector: {matchLabels: {app: sim}}
    targetPorts: [{number: 8000}, {number: 8002}]
endpoints:
- {name: a, address: 10.0.0.1, labels: {app: sim}}
- {name: b, address: 10.0.0.2, labels: {app: sim}, annotations: {"inference.networking.k8s.io/active-ports": "8002"}}
- {name: c, address: 10.0.0.3, labels: {app: other}}
- {name: d, address: 10.0.0.4, labels: {app: sim}, ready: false}
- {name: e, address: "::1", labels: {app: sim}, ports: [9001]}
objectives:
- {name: batch, priority: -5}
modelRewrites:
- name: r
  rules:
  - matches: [{model: {value: m}}]
    targets: [{modelRewrite: m2, weight: 3}]
"#;

    #[test]
    fn parses_pool_endpoints_and_policies() {
        let local = parse(Path::new("f"), FILE, None).unwrap();
        let names: Vec<_> = local
            .pool
            .endpoints
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(names, vec!["a-rank-0", "a-rank-1", "b-rank-1", "e-rank-0"]);
        assert_eq!(
            local.pool.endpoints[1].address,
            "10.0.0.1:8002".parse().unwrap()
        );
        assert_eq!(
            local.pool.endpoints[3].address,
            "[::1]:9001".parse().unwrap()
        );
        assert_eq!(local.pool.namespace, "ns");
        assert_eq!(local.pool.app_protocol, "http");
        assert_eq!(local.policies.objectives.get("batch"), Some(&-5));
        assert_eq!(local.policies.rewrites[0].rules[0].targets[0].model, "m2");
    }

    /// A pool file past its cap (a mistaken path) is refused before it is read whole.
    #[test]
    fn a_pool_file_past_its_cap_is_refused_unread() {
        let dir = std::env::temp_dir().join(format!("pool-file-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let long = dir.join("pool.yaml");
        let mut text = FILE.to_owned().into_bytes();
        text.resize(MAX_POOL_FILE_BYTES + 1, b'#');
        std::fs::write(&long, &text).unwrap();
        for path in [long.as_path(), Path::new("/dev/zero")] {
            match read(path, None) {
                Err(PoolFileError::Read { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::FileTooLarge, "{path:?}")
                }
                other => panic!("{path:?}: {other:?}"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_port_override_applies_to_single_port_pools() {
        let text = FILE.replace(
            "targetPorts: [{number: 8000}, {number: 8002}]",
            "targetPorts: [{number: 8000}]",
        );
        let local = parse(Path::new("f"), &text, Some(9090)).unwrap();
        assert_eq!(local.pool.endpoints[0].metrics_address.port(), 9090);
    }

    #[test]
    fn invalid_files_are_errors() {
        let bad_ports = FILE.replace(
            "[{number: 8000}, {number: 8002}]",
            "[{number: 8000}, {number: 8000}]",
        );
        assert!(
            parse(Path::new("f"), &bad_ports, None)
                .unwrap_err()
                .to_string()
                .contains("unique")
        );
        let bad_proto = FILE.replace("targetPorts:", "appProtocol: grpc\n    targetPorts:");
        assert!(
            parse(Path::new("f"), &bad_proto, None)
                .unwrap_err()
                .to_string()
                .contains("appProtocol")
        );
        assert!(parse(Path::new("f"), "pool: [", None).is_err());
        let bad_kind = FILE.replace("kind: InferencePool", "kind: Service");
        assert!(parse(Path::new("f"), &bad_kind, None).is_err());
    }

    #[test]
    fn endpoint_ports_obey_the_pool_port_rules() {
        // Found by the pool_file fuzz target: `ports: [0]` made an endpoint on port 0 (and
        // duplicate ports two endpoints on one address).
        for (ports, why) in [
            ("[0]", "1..65535"),
            ("[9001, 9001]", "unique"),
            ("[1, 2, 3, 4, 5, 6, 7, 8, 9]", "1 to 8"),
        ] {
            let text = FILE.replace("ports: [9001]", &format!("ports: {ports}"));
            let e = parse(Path::new("f"), &text, None).unwrap_err().to_string();
            assert!(e.contains("endpoint \"e\" ports") && e.contains(why), "{e}");
        }
        let text = FILE.replace("ports: [9001]", "ports: [9001], metricsPort: 0");
        let e = parse(Path::new("f"), &text, None).unwrap_err().to_string();
        assert!(e.contains("metricsPort"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn watch_reloads_changes_and_keeps_last_good() {
        let dir = std::env::temp_dir().join(format!("switchyard-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.yaml");
        std::fs::write(&path, FILE).unwrap();
        let ds = Arc::new(Datastore::new());
        let (initial, seen) = read_bytes(&path, None).unwrap();
        apply(initial, &ds, None);
        assert_eq!(ds.snapshot().endpoints.len(), 4);
        let token = CancellationToken::new();
        let watcher = Arc::new(FileWatcher::new(
            path.clone(),
            Duration::from_millis(100),
            None,
            ds.clone(),
            None,
            seen,
        ));
        let task = tokio::spawn({
            let (watcher, token) = (watcher.clone(), token.clone());
            async move { watcher.run(token).await }
        });
        let mut versions = ds.subscribe();
        std::fs::write(
            &path,
            FILE.replace("- {name: a, address: 10.0.0.1, labels: {app: sim}}\n", ""),
        )
        .unwrap();
        versions.changed().await.unwrap();
        assert_eq!(ds.snapshot().endpoints.len(), 2);
        std::fs::write(&path, "pool: [").unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            ds.snapshot().endpoints.len(),
            2,
            "a broken file keeps the last good pool"
        );
        // ...and the watcher is still alive: a good file applies again.
        std::fs::write(&path, FILE).unwrap();
        versions.changed().await.unwrap();
        assert_eq!(ds.snapshot().endpoints.len(), 4);
        token.cancel();
        task.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
