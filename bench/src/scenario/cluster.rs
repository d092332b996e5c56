//! A cluster of separate processes that chaos and soak scenarios can break one at a time:
//! one `sim` process per replica (so killing a process kills one replica, on a fixed port so
//! it can come back), the `epp` (local mode, pool file, `/debug/pool`) and Envoy rendered from
//! the shipped `gateway-configs/envoy/envoy-plaintext*.yaml` templates.
//!
//! A background monitor task polls the EPP's `/debug/pool` and keeps every readiness change and
//! every scheduling decision it sees (the ring is read often enough that none is missed), with
//! the EPP's own wall-clock timestamps.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::harness::{self, Proc, Tools, free_port, get, wait_http};
use crate::loadgen::unix_ms;

/// The default profile with fallbacks: the picker returns the best three endpoints, so the
/// ext_proc answer lists a primary and two fallbacks (`x-gateway-destination-endpoint: a,b,c`)
/// and Envoy's retries walk them (override_host) before its fallback policy.
pub const FALLBACK_CONFIG: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 3
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
";

/// The retry idle timeout of the shipped Envoy templates.
pub const SHIPPED_PER_TRY_IDLE: &str = "per_try_idle_timeout: 60s";

/// Which shipped Envoy template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// `envoy-plaintext.yaml` (`failure_mode_allow: false`).
    FailClose,
    /// `envoy-plaintext-failopen.yaml` (`failure_mode_allow: true`).
    FailOpen,
}

impl Variant {
    fn template(self) -> &'static str {
        match self {
            Variant::FailClose => "gateway-configs/envoy/envoy-plaintext.yaml",
            Variant::FailOpen => "gateway-configs/envoy/envoy-plaintext-failopen.yaml",
        }
    }
}

/// How to build the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterCfg {
    /// Extra `sim` flags for every replica.
    pub sim_args: Vec<String>,
    /// Extra `epp` flags.
    pub epp_args: Vec<String>,
    /// The EndpointPickerConfig.
    pub epp_config: String,
    /// Replace the shipped `per_try_idle_timeout: 60s` by this many seconds (short variants).
    pub per_try_idle_s: Option<f64>,
    /// How often the monitor reads `/debug/pool` (0 = no monitor).
    pub poll_ms: u64,
}

/// One replica: its own `sim` process on a fixed port.
#[derive(Debug)]
pub struct Replica {
    /// Pod name (`x-inference-pod`, endpoint `<name>-rank-0`).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The process, while running.
    pub proc: Option<Proc>,
    spawns: usize,
}

/// What the monitor saw.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Observed {
    /// `(unix ms, endpoint pod name, readiness)` at each change (first sighting included).
    pub readiness: Vec<(f64, String, String)>,
    /// Every decision: `(EPP unix ms, picked pod names primary first, outcome)`.
    pub decisions: Vec<(f64, Vec<String>, String)>,
    /// `(unix ms, up)` whenever `/debug/pool` started or stopped answering.
    pub epp_up: Vec<(f64, bool)>,
    /// Polls that answered.
    pub polls: u64,
    /// Largest decision ring seen.
    pub max_ring: usize,
    #[serde(skip)]
    seen: HashSet<(u64, String)>,
    #[serde(skip)]
    last: BTreeMap<String, String>,
}

impl Observed {
    /// Decisions whose primary is `name` at or after `from_ms` (and before `to_ms`).
    pub fn primary_to(&self, name: &str, from_ms: f64, to_ms: f64) -> Vec<f64> {
        self.decisions
            .iter()
            .filter(|(t, p, _)| *t >= from_ms && *t < to_ms && p.first().is_some_and(|x| x == name))
            .map(|(t, _, _)| *t)
            .collect()
    }

    /// Decisions listing `name` anywhere (primary or fallback) in `[from_ms, to_ms)`.
    pub fn listed(&self, name: &str, from_ms: f64, to_ms: f64) -> usize {
        self.decisions
            .iter()
            .filter(|(t, p, _)| *t >= from_ms && *t < to_ms && p.iter().any(|x| x == name))
            .count()
    }

    /// Decisions in `[from_ms, to_ms)`.
    pub fn decisions_between(&self, from_ms: f64, to_ms: f64) -> usize {
        self.decisions
            .iter()
            .filter(|(t, _, _)| *t >= from_ms && *t < to_ms)
            .count()
    }

    /// First time at or after `from_ms` that `name` was seen with `readiness`.
    pub fn first_readiness(&self, name: &str, readiness: &str, from_ms: f64) -> Option<f64> {
        self.readiness
            .iter()
            .find(|(t, n, r)| *t >= from_ms && n == name && r == readiness)
            .map(|(t, _, _)| *t)
    }

    /// The latest readiness of every endpoint.
    pub fn current(&self) -> BTreeMap<String, String> {
        self.last.clone()
    }

    fn absorb(&mut self, now: f64, doc: &serde_json::Value) {
        self.polls += 1;
        if let Some(eps) = doc.get("endpoints").and_then(|e| e.as_array()) {
            let mut present = BTreeMap::new();
            for e in eps {
                let name = e
                    .get("pod_name")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
                    .to_owned();
                let r = e
                    .pointer("/metrics/readiness")
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
                    .to_owned();
                if self.last.get(&name) != Some(&r) {
                    self.readiness.push((now, name.clone(), r.clone()));
                }
                present.insert(name, r);
            }
            for gone in self.last.keys().filter(|k| !present.contains_key(*k)) {
                self.readiness.push((now, gone.clone(), "absent".into()));
            }
            self.last = present;
        }
        if let Some(ds) = doc.get("decisions").and_then(|d| d.as_array()) {
            self.max_ring = self.max_ring.max(ds.len());
            for d in ds {
                let t = d.get("unix_ms").and_then(|v| v.as_u64()).unwrap_or(0);
                let id = d
                    .get("request_id")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_owned();
                if !self.seen.insert((t, id)) {
                    continue;
                }
                let picked = d
                    .get("picked")
                    .and_then(|p| p.as_array())
                    .map(|p| {
                        p.iter()
                            .filter_map(|x| x.as_str())
                            .map(pod_of)
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                let outcome = d
                    .get("outcome")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_owned();
                self.decisions.push((t as f64, picked, outcome));
            }
        }
    }
}

/// `sim-1-rank-0` → `sim-1`.
fn pod_of(endpoint: &str) -> String {
    match endpoint.rsplit_once("-rank-") {
        Some((pod, _)) => pod.to_owned(),
        None => endpoint.to_owned(),
    }
}

/// The running cluster.
pub struct Cluster {
    tools: Tools,
    /// Logs, configs, the pool file.
    pub dir: PathBuf,
    cfg: ClusterCfg,
    /// The replicas, in pool order.
    pub replicas: Vec<Replica>,
    /// The pool file.
    pub pool_path: PathBuf,
    /// The `epp`, while running.
    pub epp: Option<Proc>,
    epp_spawns: usize,
    grpc: u16,
    health: u16,
    metrics: u16,
    /// Envoy, while running.
    pub envoy: Option<Proc>,
    envoy_spawns: usize,
    /// The template Envoy runs (or last ran).
    pub variant: Variant,
    admin: u16,
    listen: u16,
    /// What the monitor saw so far.
    pub observed: Arc<Mutex<Observed>>,
    poller: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(p) = self.poller.take() {
            p.abort();
        }
    }
}

impl Cluster {
    /// Ports and paths only; nothing runs yet.
    pub fn new(
        tools: &Tools,
        dir: &Path,
        names: &[String],
        cfg: ClusterCfg,
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir)?;
        let mut replicas = Vec::new();
        for name in names {
            replicas.push(Replica {
                name: name.clone(),
                addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
                proc: None,
                spawns: 0,
            });
        }
        Ok(Cluster {
            tools: tools.clone(),
            dir: dir.to_path_buf(),
            cfg,
            replicas,
            pool_path: dir.join("pool.yaml"),
            epp: None,
            epp_spawns: 0,
            grpc: free_port()?,
            health: free_port()?,
            metrics: free_port()?,
            envoy: None,
            envoy_spawns: 0,
            variant: Variant::FailClose,
            admin: free_port()?,
            listen: free_port()?,
            observed: Arc::new(Mutex::new(Observed::default())),
            poller: None,
        })
    }

    /// Starts the replicas named in `serving` (and the others not), writes the pool file with
    /// `pool` (indices), starts the `epp` and Envoy (`variant`) and waits until a request
    /// goes through.
    pub async fn start(
        &mut self,
        serving: &[usize],
        pool: &[usize],
        variant: Variant,
    ) -> anyhow::Result<()> {
        for &i in serving {
            self.start_replica(i, &[])?;
        }
        self.write_pool(pool)?;
        self.start_epp().await?;
        self.start_envoy(variant).await?;
        super::wait_serving(&self.url(), Duration::from_secs(60))
            .await
            .with_context(|| format!("the cluster never served; logs in {}", self.dir.display()))?;
        if self.cfg.poll_ms > 0 {
            self.start_monitor();
        }
        Ok(())
    }

    /// The OpenAI base URL (Envoy's listener).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listen)
    }

    /// The EPP's `/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics)
    }

    /// The EPP's `/debug/pool`.
    pub fn debug_url(&self) -> String {
        format!("http://127.0.0.1:{}/debug/pool", self.metrics)
    }

    /// Replica `i`'s base URL.
    pub fn replica_url(&self, i: usize) -> String {
        self.replicas
            .get(i)
            .map_or_else(String::new, |r| format!("http://{}", r.addr))
    }

    /// Starts replica `i` (again) on its port, with `extra` flags.
    pub fn start_replica(&mut self, i: usize, extra: &[String]) -> anyhow::Result<()> {
        let tools_sim = self.tools.sim.clone();
        let sim_args = self.cfg.sim_args.clone();
        let dir = self.dir.clone();
        let r = self.replicas.get_mut(i).context("no such replica")?;
        let mut cmd = Command::new(&tools_sim);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &r.addr.port().to_string(),
            "--replicas",
            "1",
            "--pod-name",
            &r.name,
        ])
        .args(&sim_args)
        .args(extra)
        .env("RUST_LOG", "warn");
        let log = format!("{}-{}", r.name, r.spawns);
        r.spawns += 1;
        let (p, _) = Proc::spawn_with_ready_lines(&log, &mut cmd, &dir, Duration::from_secs(30))?;
        r.proc = Some(p);
        Ok(())
    }

    /// Writes the pool file with replicas `order` (atomically: temporary file + rename).
    pub fn write_pool(&self, order: &[usize]) -> anyhow::Result<()> {
        let named: Vec<(String, SocketAddr)> = order
            .iter()
            .filter_map(|&i| self.replicas.get(i))
            .map(|r| (r.name.clone(), r.addr))
            .collect();
        let tmp = self.pool_path.with_extension("yaml.tmp");
        std::fs::write(&tmp, harness::pool_yaml_named(&named))?;
        std::fs::rename(&tmp, &self.pool_path)?;
        Ok(())
    }

    /// Starts the `epp` (again) on its ports and waits for `/metrics`.
    pub async fn start_epp(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.tools.epp);
        cmd.arg("--pool-file")
            .arg(&self.pool_path)
            .args([
                "--bind-address",
                "127.0.0.1",
                "--secure-serving=false",
                "--metrics-endpoint-auth=false",
                "--debug-pool",
                "--seed",
                "1",
            ])
            .args(["--grpc-port", &self.grpc.to_string()])
            .args(["--grpc-health-port", &self.health.to_string()])
            .args(["--metrics-port", &self.metrics.to_string()])
            .args(["--config-text", &self.cfg.epp_config])
            .args(&self.cfg.epp_args);
        let p = Proc::spawn(&format!("epp-{}", self.epp_spawns), &mut cmd, &self.dir)?;
        self.epp_spawns += 1;
        let log = p.log.clone();
        self.epp = Some(p);
        wait_http(&self.metrics_url(), None, Duration::from_secs(30))
            .await
            .with_context(|| format!("epp not up; see {}", log.display()))
    }

    /// Envoy's config for `variant`.
    fn envoy_config(&self, variant: Variant) -> anyhow::Result<String> {
        let template = std::fs::read_to_string(self.tools.repo.join(variant.template()))?;
        let addrs: Vec<SocketAddr> = self.replicas.iter().map(|r| r.addr).collect();
        let mut cfg = harness::render(
            &template,
            &[
                ("LISTEN_PORT", self.listen.to_string()),
                ("ADMIN_PORT", self.admin.to_string()),
                ("EPP_HOST", "127.0.0.1".into()),
                ("EPP_PORT", self.grpc.to_string()),
                ("BACKEND_ENDPOINTS", harness::lb_endpoints(&addrs)),
            ],
        )?;
        if let Some(s) = self.cfg.per_try_idle_s {
            anyhow::ensure!(
                cfg.contains(SHIPPED_PER_TRY_IDLE),
                "the template has no `{SHIPPED_PER_TRY_IDLE}` to shorten"
            );
            cfg = cfg.replace(
                SHIPPED_PER_TRY_IDLE,
                &format!("per_try_idle_timeout: {s:.3}s"),
            );
        }
        Ok(cfg)
    }

    /// Starts Envoy (again) on its ports with `variant`; waits until it is live and, when the
    /// EPP runs, until its health check passes.
    pub async fn start_envoy(&mut self, variant: Variant) -> anyhow::Result<()> {
        let config = self.envoy_config(variant)?;
        let path = self.dir.join(format!("envoy-{}.yaml", self.envoy_spawns));
        std::fs::write(&path, config)?;
        let mut cmd = Command::new(&self.tools.envoy);
        cmd.arg("-c").arg(&path).args([
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--concurrency",
            "2",
        ]);
        let p = Proc::spawn(&format!("envoy-{}", self.envoy_spawns), &mut cmd, &self.dir)?;
        self.envoy_spawns += 1;
        let log = p.log.clone();
        self.envoy = Some(p);
        self.variant = variant;
        self.wait_envoy_ready()
            .await
            .with_context(|| format!("Envoy not ready; see {}", log.display()))
    }

    /// Waits until Envoy is live and, with the EPP running, its health check passes.
    pub async fn wait_envoy_ready(&self) -> anyhow::Result<()> {
        let admin = format!("http://127.0.0.1:{}", self.admin);
        wait_http(
            &format!("{admin}/ready"),
            Some("LIVE"),
            Duration::from_secs(30),
        )
        .await?;
        if self.epp.is_some() {
            wait_http(
                &format!("{admin}/clusters"),
                Some("epp::127.0.0.1"),
                Duration::from_secs(30),
            )
            .await?;
            self.wait_epp_healthy_in_envoy(Duration::from_secs(30))
                .await?;
        }
        Ok(())
    }

    /// Waits until Envoy's health check of the EPP passes.
    pub async fn wait_epp_healthy_in_envoy(&self, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/clusters", self.admin);
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = get(&url).await
                && body
                    .lines()
                    .any(|l| l.starts_with("epp::") && l.ends_with("::health_flags::healthy"))
            {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "Envoy never saw the EPP healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Envoy's `rq_total` for the upstream host `addr` (requests that reached it).
    pub async fn envoy_rq_total(&self, addr: SocketAddr) -> anyhow::Result<u64> {
        let (_, body) = get(&format!("http://127.0.0.1:{}/clusters", self.admin)).await?;
        let key = format!("inference_pool::{addr}::rq_total::");
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Starts the `/debug/pool` poller.
    fn start_monitor(&mut self) {
        let url = self.debug_url();
        let observed = self.observed.clone();
        let every = Duration::from_millis(self.cfg.poll_ms.max(1));
        self.poller = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut up = None;
            loop {
                tick.tick().await;
                let got = get(&url).await.ok().filter(|(s, _)| *s == 200);
                let now = unix_ms();
                let doc = got.and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok());
                let mut o = observed.lock();
                if up != Some(doc.is_some()) {
                    up = Some(doc.is_some());
                    o.epp_up.push((now, doc.is_some()));
                }
                if let Some(doc) = doc {
                    o.absorb(now, &doc);
                }
            }
        }));
    }

    /// Waits until the monitor sees every endpoint of `names` with `readiness`; the time it did.
    pub async fn wait_readiness(
        &self,
        names: &[&str],
        readiness: &str,
        timeout: Duration,
    ) -> anyhow::Result<f64> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            {
                let cur = self.observed.lock().current();
                if names
                    .iter()
                    .all(|n| cur.get(*n).is_some_and(|r| r == readiness))
                {
                    return Ok(unix_ms());
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < until,
                    "{names:?} not {readiness} after {timeout:?}: {cur:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The EPP's `/metrics` text.
    pub async fn epp_metrics(&self) -> anyhow::Result<String> {
        let (status, body) = get(&self.metrics_url()).await?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// The EPP's resident set, KiB (0 when it is not running).
    pub fn epp_rss_kib(&self) -> u64 {
        self.epp
            .as_ref()
            .and_then(|p| p.rss_kib().ok())
            .unwrap_or(0)
    }

    /// Replica names.
    pub fn names(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(readiness: &[(&str, &str)], decisions: &[(u64, &str, &[&str])]) -> serde_json::Value {
        serde_json::json!({
            "endpoints": readiness.iter().map(|(p, r)| serde_json::json!({
                "name": format!("{p}-rank-0"), "pod_name": p, "metrics": {"readiness": r}
            })).collect::<Vec<_>>(),
            "decisions": decisions.iter().map(|(t, id, picked)| serde_json::json!({
                "unix_ms": t, "request_id": id, "outcome": "routed",
                "picked": picked.iter().map(|p| format!("{p}-rank-0")).collect::<Vec<_>>()
            })).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn monitor_keeps_changes_and_every_decision_once() {
        let mut o = Observed::default();
        o.absorb(
            1.0,
            &doc(
                &[("sim-0", "serving"), ("sim-1", "serving")],
                &[(10, "a", &["sim-1", "sim-0"])],
            ),
        );
        // The same ring again plus one decision; sim-1 turns unreachable, sim-0 leaves.
        o.absorb(
            2.0,
            &doc(
                &[("sim-1", "unreachable")],
                &[(10, "a", &["sim-1", "sim-0"]), (20, "b", &["sim-0"])],
            ),
        );
        assert_eq!(o.decisions.len(), 2, "ring entries are not counted twice");
        assert_eq!(o.primary_to("sim-1", 0.0, 100.0), vec![10.0]);
        assert!(o.primary_to("sim-0", 0.0, 15.0).is_empty());
        assert_eq!(
            o.listed("sim-0", 0.0, 100.0),
            2,
            "fallbacks count as listed"
        );
        assert_eq!(o.decisions_between(15.0, 25.0), 1);
        assert_eq!(o.first_readiness("sim-1", "unreachable", 0.0), Some(2.0));
        assert_eq!(o.first_readiness("sim-0", "absent", 0.0), Some(2.0));
        assert_eq!(
            o.current().get("sim-1").map(String::as_str),
            Some("unreachable")
        );
        assert_eq!(o.readiness.len(), 4);
    }

    #[test]
    fn endpoint_names_map_to_pods() {
        assert_eq!(pod_of("sim-1-rank-0"), "sim-1");
        assert_eq!(pod_of("plain"), "plain");
    }
}
