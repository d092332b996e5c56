//! Switchyard's EPP conformance suite: the harness.
//!
//! Upstream's conformance suite (GIE `conformance/`) tests a gateway with a stand-in EPP on a
//! real cluster. This suite turns it around: it runs the same EPP-facing scenarios, with
//! upstream's test names, against *our* EPP behind a real Envoy on loopback, with simulated
//! model servers as the pods, so it runs on every change. The scenarios live in
//! `tests/conformance.rs`; this crate holds what they share: "pods" on their own loopback IPs,
//! the EPPs, the gateways, the traffic method and the report.
// Test support: a failed setup step should stop the scenario with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use endpoint_picker::datastore::{EndpointSpec, PoolSpec};
use ext_proc::faults::ConformanceFault;
use ext_proc::stream::ServiceOptions;
use futures::StreamExt as _;
use testkit::envoy::{Envoy, Variant, lb_endpoints};
use testkit::{Epp, EppOptions};

/// The model every simulated replica serves.
pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// The header upstream's conformance tests use to tell the EPP which endpoints it may pick.
pub const SELECTION: &str = "test-epp-endpoint-selection";
/// The header the `destination-endpoint-served-verifier` plugin echoes the served endpoint in.
pub const SERVED: &str = "x-conformance-test-served-endpoint";
/// Chooses a route in `envoy/multi-pool.yaml`.
pub const ROUTE: &str = "x-conformance-route";
/// Turned into `envoy.lb.subset_hint` metadata by `envoy/multi-pool.yaml`.
pub const SUBSET_HINT: &str = "x-conformance-subset-hint";

/// The EPP configuration upstream's suite gives the full EPP (`conformance/resources/base.yaml`
/// at the last commit with the EPP): the test filter, the served-endpoint verifier and a
/// picker returning up to three endpoints (primary plus fallbacks).
pub const CONFORMANCE_CONFIG: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 3
schedulingProfiles:
- name: conformance-profile
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: max-score-picker
";

/// What every scenario gets.
#[derive(Clone)]
pub struct Ctx {
    /// The Envoy binary.
    pub envoy: PathBuf,
    /// A deliberate EPP fault (self-test of the suite), applied to every EPP started.
    pub fault: Option<ConformanceFault>,
}

impl Ctx {
    /// An in-process EPP for `pool` with the given scheduler config.
    pub async fn epp(&self, pool: PoolSpec, config: &str, tls: bool) -> Epp {
        self.epp_with(pool, config, tls, false).await
    }

    /// [`Ctx::epp`] (plaintext) run with `--response-observer` when `observed`.
    pub async fn epp_observing(&self, pool: PoolSpec, config: &str, observed: bool) -> Epp {
        self.epp_with(pool, config, false, observed).await
    }

    async fn epp_with(&self, pool: PoolSpec, config: &str, tls: bool, observed: bool) -> Epp {
        testkit::start_epp(
            pool,
            EppOptions {
                config: config.to_owned(),
                options: ServiceOptions {
                    fault: self.fault,
                    observers: observed.then(|| {
                        std::sync::Arc::new(ext_proc::observer::Observers::new(
                            ext_proc::observer::DEFAULT_MAX_WATCHED,
                        ))
                    }),
                    ..Default::default()
                },
                tls,
                ..EppOptions::default()
            },
        )
        .await
    }

    /// One of the shipped plain-Envoy templates (`gateway-configs/envoy`) in front of `pods`.
    pub async fn plain_envoy(&self, variant: Variant, epp: SocketAddr, pods: &[Pod]) -> Envoy {
        Envoy::start(&self.envoy, variant, epp, &addresses(pods)).await
    }

    /// A shipped plain-Envoy template switched to a response path (`Full`: the configuration
    /// shipped before the lean path).
    pub async fn plain_envoy_with(
        &self,
        variant: Variant,
        path: testkit::envoy::ResponsePath,
        epp: SocketAddr,
        pods: &[Pod],
    ) -> Envoy {
        Envoy::start_with_response_path(&self.envoy, variant, path, epp, &addresses(pods)).await
    }

    /// A reference-style gateway (`conformance/envoy/reference-style.yaml`): ORIGINAL_DST on
    /// the destination header and no client header stripped, plaintext EPP, FailClose.
    pub async fn reference_envoy(&self, epp: SocketAddr) -> Envoy {
        let vars = [
            ("EPP_HOST", epp.ip().to_string()),
            ("EPP_PORT", epp.port().to_string()),
        ];
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/reference-style.yaml");
        Envoy::start_template(&self.envoy, &template, &vars).await
    }

    /// The test-only two-pool gateway (`conformance/envoy/multi-pool.yaml`).
    pub async fn multi_pool_envoy(&self, g: MultiPool<'_>) -> Envoy {
        let ip = |a: SocketAddr| a.ip().to_string();
        let port = |a: SocketAddr| a.port().to_string();
        let vars = [
            ("EPP_PRIMARY_HOST", ip(g.primary_epp)),
            ("EPP_PRIMARY_PORT", port(g.primary_epp)),
            ("EPP_SECONDARY_HOST", ip(g.secondary_epp)),
            ("EPP_SECONDARY_PORT", port(g.secondary_epp)),
            ("PRIMARY_ENDPOINTS", lb_endpoints(&addresses(g.primary))),
            ("SECONDARY_ENDPOINTS", lb_endpoints(&addresses(g.secondary))),
            ("PRIMARY_WEIGHT", g.weights.0.to_string()),
            ("SECONDARY_WEIGHT", g.weights.1.to_string()),
        ];
        Envoy::start_template(&self.envoy, &multi_pool_template(), &vars).await
    }
}

/// The second base model of the body-based-routing scenarios (`envoy/bbr.yaml`).
pub const MODEL_B: &str = "Qwen/Qwen2.5-7B-Instruct";
/// A LoRA adapter of [`MODEL`] in the body-based-routing scenarios.
pub const ADAPTER: &str = "food-review-1";

/// An in-process body-based router (`bbr`), plaintext, FULL_DUPLEX_STREAMED, stopped on drop.
pub struct Bbr {
    /// Its ext_proc port.
    pub grpc: SocketAddr,
    /// Its `/metrics` port.
    pub metrics: SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for Bbr {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a router whose mapping is `entries` (base model, adapters).
pub async fn start_bbr(entries: &[(&str, &[&str])]) -> Bbr {
    use bbr::mapping::{Entry, Mapping};
    let mapping = Mapping::new();
    mapping.reset(entries.iter().enumerate().map(|(i, (base, adapters))| {
        (
            format!("test/{i}"),
            Entry::new(Some(base), adapters.iter().copied()).unwrap(),
        )
    }));
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = bbr::server::Listeners {
        grpc: bind().await.unwrap(),
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let grpc = listeners.grpc.local_addr().unwrap();
    let metrics = listeners.metrics.local_addr().unwrap();
    let settings = bbr::server::Settings {
        options: bbr::stream::Options {
            streaming: true,
            ..Default::default()
        },
        mapping,
        source: bbr::server::MappingSource::Static,
        tls: None,
        admin_auth: epp::admin::AdminAuth::Open,
        drain_grace: Duration::from_secs(1),
        shutdown_delay: Default::default(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move { bbr::server::serve(settings, listeners, token).await });
    Bbr {
        grpc,
        metrics,
        shutdown,
    }
}

/// Inputs of `envoy/bbr.yaml`.
pub struct BbrGateway<'a> {
    /// The router.
    pub bbr: SocketAddr,
    /// The EPP of [`MODEL`]'s pool.
    pub epp_a: SocketAddr,
    /// The EPP of [`MODEL_B`]'s pool.
    pub epp_b: SocketAddr,
    /// [`MODEL`]'s pods.
    pub a: &'a [Pod],
    /// [`MODEL_B`]'s pods.
    pub b: &'a [Pod],
}

impl Ctx {
    /// The test-only gateway with the body-based router (`envoy/bbr.yaml`).
    pub async fn bbr_envoy(&self, g: BbrGateway<'_>) -> Envoy {
        let ip = |a: SocketAddr| a.ip().to_string();
        let port = |a: SocketAddr| a.port().to_string();
        let vars = [
            ("BBR_HOST", ip(g.bbr)),
            ("BBR_PORT", port(g.bbr)),
            ("EPP_A_HOST", ip(g.epp_a)),
            ("EPP_A_PORT", port(g.epp_a)),
            ("EPP_B_HOST", ip(g.epp_b)),
            ("EPP_B_PORT", port(g.epp_b)),
            ("MODEL_A", MODEL.to_owned()),
            ("MODEL_B", MODEL_B.to_owned()),
            ("A_ENDPOINTS", lb_endpoints(&addresses(g.a))),
            ("B_ENDPOINTS", lb_endpoints(&addresses(g.b))),
        ];
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/bbr.yaml");
        Envoy::start_template(&self.envoy, &template, &vars).await
    }
}

/// Inputs of `envoy/multi-pool.yaml`.
pub struct MultiPool<'a> {
    /// The EPP of the primary pool's route.
    pub primary_epp: SocketAddr,
    /// The EPP of the secondary pool's route.
    pub secondary_epp: SocketAddr,
    /// The primary pool's pods (its cluster's endpoints).
    pub primary: &'a [Pod],
    /// The secondary pool's pods.
    pub secondary: &'a [Pod],
    /// Weights of the weighted route (primary, secondary).
    pub weights: (u32, u32),
}

/// Path of the test-only multi-pool Envoy template.
pub fn multi_pool_template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/multi-pool.yaml")
}

/// A "pod": one loopback IP (127.0.0.x) with one simulated model server per data-parallel rank.
pub struct Pod {
    /// The pod's own loopback address.
    pub ip: Ipv4Addr,
    /// One simulated model server per rank, all on `ip`.
    pub ranks: Vec<sim::ReplicaHandle>,
}

impl Pod {
    /// `ip:port` of rank `r`.
    pub fn rank(&self, r: usize) -> SocketAddr {
        self.ranks[r].addr()
    }
}

/// Starts a pod on 127.0.0.`octet` with `ranks` replicas (each on its own OS-chosen port).
/// Replica names are `pod-<octet>-rank-<r>`, which the simulator returns in `x-inference-pod`.
pub async fn pod(octet: u8, ranks: usize, config: &sim::Config) -> Pod {
    let ip = Ipv4Addr::new(127, 0, 0, octet);
    let mut out = Vec::with_capacity(ranks);
    for r in 0..ranks {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let config = sim::Config {
            pod_name: Some(format!("pod-{octet}-rank-{r}")),
            ..config.clone()
        };
        out.push(sim::spawn_replica(config, listener, 0).await.unwrap());
    }
    Pod { ip, ranks: out }
}

/// Pods on 127.0.0.`first`, `first+1`, ….
pub async fn pods(first: u8, n: u8, ranks: usize, config: &sim::Config) -> Vec<Pod> {
    let mut out = Vec::with_capacity(usize::from(n));
    for i in 0..n {
        out.push(pod(first + i, ranks, config).await);
    }
    out
}

/// The simulator profile for functional scenarios: fast steps, and a context long enough for
/// the 1 MiB prompt.
pub fn sim_config() -> sim::Config {
    sim::Config {
        seed: 11,
        max_model_len: 4 << 20,
        ..sim::Config::fast()
    }
}

/// Every rank of every pod.
pub fn addresses(pods: &[Pod]) -> Vec<SocketAddr> {
    pods.iter()
        .flat_map(|p| p.ranks.iter().map(sim::ReplicaHandle::addr))
        .collect()
}

/// The InferencePool over `pods`: one endpoint per (pod, rank), as the EPP derives from a
/// pod's IP and the pool's target ports.
pub fn pool_of(name: &str, pods: &[Pod]) -> PoolSpec {
    let endpoints = pods
        .iter()
        .flat_map(|p| {
            p.ranks.iter().enumerate().map(move |(r, replica)| {
                let pod_name = format!("pod-{}", p.ip.octets()[3]);
                EndpointSpec {
                    name: format!("{pod_name}-rank-{r}"),
                    pod_name,
                    namespace: "default".into(),
                    address: replica.addr(),
                    metrics_address: replica.addr(),
                    rank: r,
                    labels: BTreeMap::new(),
                }
            })
        })
        .collect();
    PoolSpec {
        name: name.into(),
        namespace: "default".into(),
        app_protocol: "http".into(),
        endpoints,
    }
}

/// A request of the traffic method.
#[derive(Clone, Debug)]
pub struct Req {
    /// The request path (`/v1/completions`, ...); the method is always `POST`.
    pub path: String,
    /// Extra headers, in order.
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: Vec<u8>,
}

impl Req {
    /// Upstream's conformance request (`POST` with a fake model and a short prompt), here to
    /// the model the replicas serve.
    pub fn completion() -> Self {
        Self {
            path: "/v1/completions".into(),
            headers: Vec::new(),
            body: serde_json::to_vec(&serde_json::json!({
                "model": MODEL,
                "prompt": "Write as if you were a critic: San Francisco",
                "max_tokens": 4,
            }))
            .unwrap(),
        }
    }

    /// A chat completion.
    pub fn chat(model: &str, content: &str, stream: bool, max_tokens: u32) -> Self {
        Self {
            path: "/v1/chat/completions".into(),
            headers: Vec::new(),
            body: serde_json::to_vec(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "stream": stream,
                "max_tokens": max_tokens,
                "stream_options": {"include_usage": true},
            }))
            .unwrap(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_owned(), v.into()));
        self
    }

    /// Posts it through `gateway`; the response, its body unread.
    pub async fn post(&self, gateway: SocketAddr) -> testkit::http::Response {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        testkit::http::post(gateway, &self.path, &headers, self.body.clone()).await
    }
}

/// What the client saw for one request.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The HTTP status.
    pub status: u16,
    /// `x-inference-pod`: the replica that generated the answer (`pod-<octet>-rank-<r>`).
    pub replica: Option<String>,
    /// `x-conformance-test-served-endpoint`: what the gateway reported back to the EPP.
    pub served: Option<String>,
    /// The whole response body, as text.
    pub body: String,
}

impl Outcome {
    /// The loopback IP octet of the pod that answered.
    pub fn pod_octet(&self) -> Option<u8> {
        self.replica
            .as_deref()?
            .strip_prefix("pod-")?
            .split('-')
            .next()?
            .parse()
            .ok()
    }
}

/// Sends one request through `gateway`.
pub async fn send(gateway: SocketAddr, req: &Req) -> Outcome {
    let resp = req.post(gateway).await;
    let status = resp.status().as_u16();
    let replica = testkit::http::header(&resp, "x-inference-pod").map(str::to_owned);
    let served = testkit::http::header(&resp, SERVED).map(str::to_owned);
    let body = testkit::http::body_text(resp).await;
    Outcome {
        status,
        replica,
        served,
        body,
    }
}

/// Upstream's traffic method: `n` requests with at most `concurrency` in flight; every
/// outcome is returned so that the caller asserts on each one.
pub async fn traffic(gateway: SocketAddr, n: usize, concurrency: usize, req: &Req) -> Vec<Outcome> {
    let req = Arc::new(req.clone());
    futures::stream::iter(0..n)
        .map(|_| {
            let req = req.clone();
            tokio::spawn(async move { send(gateway, &req).await })
        })
        .buffer_unordered(concurrency)
        .map(|r| r.expect("request task"))
        .collect()
        .await
}

/// Checks that every outcome is a 200 answered by a replica whose address is in `allowed`,
/// and (when `check_served`) that the gateway reported that same address back to the EPP.
pub fn all_served_by(
    outcomes: &[Outcome],
    allowed: &BTreeSet<SocketAddr>,
    names: &BTreeMap<String, SocketAddr>,
    check_served: bool,
) -> anyhow::Result<BTreeSet<SocketAddr>> {
    let mut seen = BTreeSet::new();
    for (i, o) in outcomes.iter().enumerate() {
        ensure!(
            o.status == 200,
            "request {i}: status {} (body {:.200})",
            o.status,
            o.body
        );
        let replica = o.replica.as_deref().context("no x-inference-pod")?;
        let addr = *names
            .get(replica)
            .with_context(|| format!("unknown replica {replica}"))?;
        ensure!(
            allowed.contains(&addr),
            "request {i}: served by {replica} ({addr}), allowed {allowed:?}"
        );
        if check_served {
            let served = o.served.as_deref().unwrap_or("<missing>");
            ensure!(
                served == addr.to_string(),
                "request {i}: {SERVED} = {served}, but {addr} answered"
            );
        }
        seen.insert(addr);
    }
    Ok(seen)
}

/// Replica name → address, for every rank of `pods`.
pub fn names(pods: &[&[Pod]]) -> BTreeMap<String, SocketAddr> {
    pods.iter()
        .flat_map(|ps| ps.iter())
        .flat_map(|p| p.ranks.iter())
        .map(|r| (r.pod_name().to_owned(), r.addr()))
        .collect()
}

/// Stops an in-process EPP and waits until its ports are closed.
pub async fn stop_epp(epp: Epp) -> anyhow::Result<()> {
    let grpc = epp.grpc;
    epp.shutdown.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(grpc).await.is_err() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("EPP at {grpc} still accepts connections");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(epp);
    Ok(())
}

/// The IP part of an address, as the selection header takes it.
pub fn ip(a: SocketAddr) -> IpAddr {
    a.ip()
}

/// Runs `envoy --mode validate` on a rendered config; the error is Envoy's output.
pub fn envoy_validate(binary: &Path, config: &str) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("switchyard-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{:x}.yaml", fxhash(config)));
    std::fs::write(&file, config)?;
    let out = std::process::Command::new(binary)
        .args(["--mode", "validate", "--log-level", "error", "-c"])
        .arg(&file)
        .output()?;
    let _ = std::fs::remove_file(&file);
    ensure!(
        out.status.success(),
        "envoy --mode validate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A minimal bootstrap around one HTTP filter (e.g. the ext_proc filter an Istio `EnvoyFilter`
/// patch inserts), with a static HTTP/2 cluster for every `cluster_name` the filter names, so
/// that Envoy can validate the filter's typed config.
pub fn bootstrap_around_filter(filter: &serde_json::Value) -> String {
    let mut clusters = Vec::new();
    collect_cluster_names(filter, &mut clusters);
    let clusters: Vec<serde_json::Value> = clusters
        .into_iter()
        .map(|name| {
            serde_json::json!({
                "name": name,
                "type": "STATIC",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9004}}}}
                ]}]},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }}
            })
        })
        .collect();
    let bootstrap = serde_json::json!({
        "static_resources": {
            "listeners": [{
                "name": "l",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "l",
                        "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": []}]},
                        "http_filters": [filter, {
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                        }]
                    }
                }]}]
            }],
            "clusters": clusters
        }
    });
    serde_json::to_string_pretty(&bootstrap).unwrap()
}

fn collect_cluster_names(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "cluster_name"
                    && let Some(s) = x.as_str()
                {
                    out.push(s.to_owned());
                }
                collect_cluster_names(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_cluster_names(x, out)),
        _ => {}
    }
}

/// The `epp` binary Cargo built next to this test binary, if it is there and newer than every
/// source file of the crates it is made of (a stale binary would test old code).
pub fn epp_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/<profile>/deps/conformance-<hash> → <target>/<profile>/epp
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("epp"))
        .ok_or("no target directory")?;
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .map_err(|_| format!("{} not built (cargo build -p epp --bin epp)", bin.display()))?;
    let root = testkit::envoy::workspace_root();
    let newest = ["epp", "ext-proc", "endpoint-picker"]
        .iter()
        .filter_map(|c| newest_mtime(&root.join(c).join("src")))
        .max();
    match newest {
        Some(src) if src > built => Err(format!(
            "{} is older than the sources (cargo build -p epp --bin epp)",
            bin.display()
        )),
        _ => Ok(bin),
    }
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// A loopback port that is free on every one of `ips` (so that pods on several loopback IPs
/// can share one target port, as Pods of a real InferencePool do).
pub fn common_free_port(ips: &[Ipv4Addr]) -> u16 {
    let ips: Vec<IpAddr> = ips.iter().copied().map(IpAddr::V4).collect();
    testkit::ports::free_port_on(&ips).unwrap()
}

/// Pods that all listen on the same `port` (one rank each).
pub async fn pods_on_port(ips: &[Ipv4Addr], port: u16, config: &sim::Config) -> Vec<Pod> {
    let mut out = Vec::with_capacity(ips.len());
    for ip in ips {
        let listener = tokio::net::TcpListener::bind((*ip, port)).await.unwrap();
        let config = sim::Config {
            pod_name: Some(format!("pod-{}-rank-0", ip.octets()[3])),
            ..config.clone()
        };
        let replica = sim::spawn_replica(config, listener, 0).await.unwrap();
        out.push(Pod {
            ip: *ip,
            ranks: vec![replica],
        });
    }
    out
}

/// A running `epp` process, killed on drop.
pub struct EppProcess {
    child: tokio::process::Child,
    /// Its ext_proc port (TLS) on 127.0.0.1.
    pub grpc: SocketAddr,
    dir: PathBuf,
}

impl Drop for EppProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl EppProcess {
    /// Kills the process with SIGKILL, as a crash would, and waits until it is gone: its
    /// connections are reset, streams in flight included.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Starts `binary` in local mode with a pool file for `pods` (target port `port`) and the
    /// given scheduler config, with the reference EPP's default transport (TLS, self-signed),
    /// and waits until the ext_proc port accepts connections.
    pub async fn start(
        binary: &Path,
        pods: &[Pod],
        port: u16,
        config: &str,
    ) -> anyhow::Result<EppProcess> {
        Self::start_with(binary, pods, port, config, &[]).await
    }

    /// [`EppProcess::start`] with `extra` flags.
    pub async fn start_with(
        binary: &Path,
        pods: &[Pod],
        port: u16,
        config: &str,
        extra: &[&str],
    ) -> anyhow::Result<EppProcess> {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-conformance-epp-{}-{}",
            std::process::id(),
            fxhash(&format!("{:?}", std::time::SystemTime::now()))
        ));
        std::fs::create_dir_all(&dir)?;
        let endpoints: Vec<serde_json::Value> = pods
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": format!("pod-{}", p.ip.octets()[3]),
                    "address": p.ip.to_string(),
                    "labels": {"app": "sim"},
                })
            })
            .collect();
        let pool = serde_json::json!({
            "pool": {
                "apiVersion": "inference.networking.k8s.io/v1",
                "kind": "InferencePool",
                "metadata": {"name": "primary", "namespace": "default"},
                "spec": {"selector": {"matchLabels": {"app": "sim"}}, "targetPorts": [{"number": port}]},
            },
            "endpoints": endpoints,
        });
        let pool_file = dir.join("pool.yaml");
        std::fs::write(&pool_file, yaml_serde::to_string(&pool)?)?;
        let ports: Vec<u16> = (0..3)
            .map(|_| testkit::ports::free_port())
            .collect::<Result<_, _>>()?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.arg("--pool-file")
            .arg(&pool_file)
            .arg(format!("--config-text={config}"))
            .args([
                "--bind-address",
                "127.0.0.1",
                "--metrics-endpoint-auth=false",
            ])
            .args(["--grpc-port", &ports[0].to_string()])
            .args(["--grpc-health-port", &ports[1].to_string()])
            .args(["--metrics-port", &ports[2].to_string()])
            .args(["--v", "1"])
            // Routing draws from a seeded RNG: a failing run can be replayed.
            .args(["--seed", "11"])
            .args(extra);
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut epp = EppProcess {
            child,
            grpc: SocketAddr::from(([127, 0, 0, 1], ports[0])),
            dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(epp.grpc).await.is_err() {
            if let Some(status) = epp.child.try_wait()? {
                bail!("epp exited early: {status}");
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "epp never listened on {}",
                epp.grpc
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(epp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize as _;

    /// The test-only gateway template is valid Envoy config (the suite also runs it live).
    #[test]
    fn multi_pool_template_validates() {
        let Some(envoy) = testkit::envoy::binary_or_skip("multi_pool_template_validates") else {
            return;
        };
        let text = std::fs::read_to_string(multi_pool_template()).unwrap();
        let a: SocketAddr = "127.0.0.2:8000".parse().unwrap();
        let b: SocketAddr = "[::1]:8001".parse().unwrap();
        let vars = [
            ("EPP_PRIMARY_HOST", "127.0.0.1".to_owned()),
            ("EPP_PRIMARY_PORT", "9002".to_owned()),
            ("EPP_SECONDARY_HOST", "epp-secondary.example".to_owned()),
            ("EPP_SECONDARY_PORT", "9012".to_owned()),
            ("PRIMARY_ENDPOINTS", lb_endpoints(&[a])),
            ("SECONDARY_ENDPOINTS", lb_endpoints(&[b])),
            ("PRIMARY_WEIGHT", "70".to_owned()),
            ("SECONDARY_WEIGHT", "30".to_owned()),
        ];
        let rendered = testkit::envoy::render_vars(&text, &vars);
        envoy_validate(&envoy, &rendered).unwrap();
    }

    /// The HTTP filters that the Istio EnvoyFilters insert (BBR's ext_proc in
    /// `gateway-configs/body-based-routing/bbr-istio.yaml`, the objective's header_mutation in
    /// `gateway-configs/istio/fixed-objective.yaml`) are valid Envoy config (the schema check
    /// cannot see inside an EnvoyFilter patch).
    #[test]
    fn istio_envoy_filter_patches_validate() {
        let Some(envoy) = testkit::envoy::binary_or_skip("istio_envoy_filter_patches_validate")
        else {
            return;
        };
        let dir = testkit::envoy::workspace_root().join("gateway-configs");
        let mut checked = 0;
        for file in [
            "body-based-routing/bbr-istio.yaml",
            "istio/fixed-objective.yaml",
        ] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            for doc in yaml_serde::Deserializer::from_str(&text) {
                let doc = serde_json::Value::deserialize(doc).unwrap();
                if doc["kind"] != "EnvoyFilter" {
                    continue;
                }
                for patch in doc["spec"]["configPatches"].as_array().unwrap() {
                    if patch["applyTo"] == "HTTP_FILTER" {
                        let bootstrap = bootstrap_around_filter(&patch["patch"]["value"]);
                        envoy_validate(&envoy, &bootstrap)
                            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 0, "no EnvoyFilter HTTP_FILTER patch found");
    }
}
