//! Scenarios: each starts everything it needs out of process (simulator or fixed backend,
//! `epp`, Envoy, peer routers), drives load, reads the processes' own metrics and tears
//! everything down (also on error: [`crate::harness::Proc`] kills its process group on drop).

pub mod active_active;
pub mod chaos;
pub mod cluster;
pub mod goodput;
pub mod lora;
pub mod overhead;
pub mod path_cpu;
pub mod precise;
pub mod routing;
pub mod scale;
pub mod soak;
pub mod tenants;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::harness::{self, Proc, Tools, free_port, wait_http};
use crate::workload::MODEL;

/// Who routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Router {
    /// Envoy, `ROUND_ROBIN` over the replicas.
    EnvoyRoundRobin,
    /// Envoy, `LEAST_REQUEST` (power of two choices on active requests).
    EnvoyLeastRequest,
    /// Envoy + Switchyard; `config` is an EndpointPickerConfig (None = the default profile).
    Switchyard {
        /// Short name of the profile.
        profile: String,
        /// YAML passed as `--config-text`.
        config: Option<String>,
    },
    /// Envoy + `epps` Switchyard EPPs routing from the engines' KV-cache events (the cost
    /// model with `precise-prefix-cache-scorer`, [`precise::precise_config`]); the engines
    /// publish events ([`precise::EngineEvents`]).
    SwitchyardPrecise {
        /// EPP processes behind the one Envoy.
        epps: usize,
        /// A variant of the precise profile being tuned: `(name, template)`, the template an
        /// EndpointPickerConfig with `${TOKENIZER}` and `${KV_EVENTS_PORT}` placeholders
        /// (None: [`precise::precise_config`]).
        variant: Option<(String, String)>,
    },
    /// `sglang-router launch --policy <policy>`.
    Sglang(String),
    /// `vllm-router --policy <policy>`.
    Vllm(String),
    /// `smg launch --policy <policy>` (Shepherd Model Gateway, PyPI `smg`).
    Smg(String),
}

impl Router {
    /// Short label for tables and plots.
    pub fn label(&self) -> String {
        match self {
            Router::EnvoyRoundRobin => "envoy round-robin".into(),
            Router::EnvoyLeastRequest => "envoy least-request".into(),
            Router::Switchyard { profile, .. } => format!("switchyard {profile}"),
            Router::SwitchyardPrecise {
                epps: 1,
                variant: None,
            } => "switchyard precise".into(),
            Router::SwitchyardPrecise {
                epps,
                variant: None,
            } => format!("switchyard precise ×{epps} EPPs"),
            Router::SwitchyardPrecise {
                variant: Some((name, _)),
                ..
            } => format!("switchyard precise {name}"),
            Router::Sglang(p) => format!("sglang-router {p}"),
            Router::Vllm(p) => format!("vllm-router {p}"),
            Router::Smg(p) => format!("smg {p}"),
        }
    }

    /// A peer router (not Envoy alone, not Switchyard).
    pub fn is_peer(&self) -> bool {
        matches!(self, Router::Sglang(_) | Router::Vllm(_) | Router::Smg(_))
    }

    /// Switchyard with the cost-model profile (whose decisions carry a predicted TTFT): the
    /// `cost*` profiles and the unconfigured default, which is the cost model.
    pub fn is_cost_model(&self) -> bool {
        matches!(self, Router::Switchyard { profile, config }
            if profile.starts_with("cost") || (profile == "default" && config.is_none()))
            || matches!(self, Router::SwitchyardPrecise { .. })
    }

    /// Routes from the engines' KV-cache events: its engines must publish them
    /// ([`precise::EngineEvents`]), and the comparison's other routers get the same engines.
    pub fn needs_engine_events(&self) -> bool {
        matches!(self, Router::SwitchyardPrecise { .. })
    }

    /// Parses `rr`, `lr`, `switchyard`, `switchyard-prefix`, `switchyard-running`,
    /// `switchyard-balanced`, `switchyard-lora`, `switchyard-cost`, `sglang:<policy>`,
    /// `vllm:<policy>`, `smg:<policy>` (`smg` alone: `cache_aware`), `switchyard-file:<path>`,
    /// `switchyard-precise` (one EPP), `switchyard-precise:<n>` (n EPPs behind one Envoy) and
    /// `switchyard-precise-file:<path>` (a variant of the precise profile, one EPP).
    pub fn parse(s: &str) -> anyhow::Result<Router> {
        Ok(match s {
            "rr" | "envoy-rr" => Router::EnvoyRoundRobin,
            "lr" | "envoy-lr" => Router::EnvoyLeastRequest,
            "switchyard" => Router::Switchyard {
                profile: "default".into(),
                config: None,
            },
            "switchyard-prefix" => Router::Switchyard {
                profile: "prefix-heavy".into(),
                config: Some(PREFIX_HEAVY.into()),
            },
            "switchyard-running" => Router::Switchyard {
                profile: "running-aware".into(),
                config: Some(RUNNING_AWARE.into()),
            },
            "switchyard-balanced" => Router::Switchyard {
                profile: "balanced".into(),
                config: Some(endpoint_picker::config::profiles::BALANCED_PREFIX.into()),
            },
            "switchyard-lora" => Router::Switchyard {
                profile: "lora".into(),
                config: Some(LORA_AWARE.into()),
            },
            "switchyard-cost" => Router::Switchyard {
                profile: "cost".into(),
                config: Some(endpoint_picker::config::profiles::COST_MODEL.into()),
            },
            "switchyard-precise" => Router::SwitchyardPrecise {
                epps: 1,
                variant: None,
            },
            "smg" => Router::Smg("cache_aware".into()),
            _ => match s.split_once(':') {
                // Any EndpointPickerConfig file, e.g. a profile being tuned; named by its stem
                // (`cost*` stems get the decision header, as the cost profile does).
                Some(("switchyard-file", path)) => Router::Switchyard {
                    profile: Path::new(path)
                        .file_stem()
                        .map_or_else(|| path.to_owned(), |s| s.to_string_lossy().into_owned()),
                    config: Some(
                        std::fs::read_to_string(path)
                            .with_context(|| format!("reading the profile {path}"))?,
                    ),
                },
                Some(("switchyard-precise", n)) => {
                    let epps: usize = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=16).contains(n))
                        .with_context(|| format!("{s:?}: 1 to 16 EPPs"))?;
                    Router::SwitchyardPrecise {
                        epps,
                        variant: None,
                    }
                }
                // A precise profile being tuned (one EPP), named by its stem.
                Some(("switchyard-precise-file", path)) => Router::SwitchyardPrecise {
                    epps: 1,
                    variant: Some((
                        Path::new(path)
                            .file_stem()
                            .map_or_else(|| path.to_owned(), |s| s.to_string_lossy().into_owned()),
                        std::fs::read_to_string(path)
                            .with_context(|| format!("reading the profile {path}"))?,
                    )),
                },
                Some(("sglang", p)) => Router::Sglang(p.into()),
                Some(("vllm", p)) => Router::Vllm(p.into()),
                Some(("smg", p)) => Router::Smg(p.into()),
                _ => anyhow::bail!(
                    "unknown router {s:?} (rr, lr, switchyard, switchyard-prefix, switchyard-running, switchyard-balanced, switchyard-lora, switchyard-cost, switchyard-precise[:<epps>], switchyard-precise-file:<path>, sglang:<policy>, vllm:<policy>, smg[:<policy>])"
                ),
            },
        })
    }
}

/// A Switchyard profile that weighs prefix affinity above load, for prefix-heavy traffic.
/// Same plugins as the default; only the weights differ.
pub const PREFIX_HEAVY: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 5
";

/// The default profile plus `running-requests-size-scorer`: on engines whose waiting queue
/// stays empty until they are far past their knee (vLLM admits up to `max-num-seqs` = 1024),
/// the running count is the load signal the queue scorer does not see.
pub const RUNNING_AWARE: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: running-requests-size-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: running-requests-size-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 3
";

/// The balanced profile plus `lora-affinity-scorer`, for traffic spread over LoRA adapters
/// on engines with few adapter slots.
pub const LORA_AWARE: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: active-request-scorer
- type: no-hit-lru-scorer
- type: lora-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: active-request-scorer
    weight: 2
  - pluginRef: no-hit-lru-scorer
    weight: 1
  - pluginRef: lora-affinity-scorer
    weight: 2
";

/// A running router: where to send traffic, and its processes.
pub struct RouterUp {
    /// Base URL of the OpenAI API.
    pub url: String,
    /// Processes (Envoy, `epp`, or a peer router); dropped = stopped.
    pub procs: Vec<Proc>,
    /// Index in `procs` of the `epp`, if any.
    pub epp: Option<usize>,
    /// Metrics URL of the `epp`, if any.
    pub epp_metrics: Option<String>,
}

impl RouterUp {
    /// CPU seconds used so far by all of the router's processes.
    pub fn cpu_seconds(&self) -> f64 {
        self.procs.iter().filter_map(|p| p.cpu_seconds().ok()).sum()
    }

    /// The `epp` process, if any.
    pub fn epp(&self) -> Option<&Proc> {
        self.epp.and_then(|i| self.procs.get(i))
    }
}

/// Starts `router` in front of `backends` and waits until a request goes through.
pub async fn start_router(
    tools: &Tools,
    router: &Router,
    backends: &[SocketAddr],
    dir: &Path,
) -> anyhow::Result<RouterUp> {
    start_router_with(tools, router, backends, dir, None).await
}

/// [`start_router`] on engines that publish KV events as `events` says (needed by
/// [`Router::SwitchyardPrecise`], ignored by the others).
pub async fn start_router_with(
    tools: &Tools,
    router: &Router,
    backends: &[SocketAddr],
    dir: &Path,
    events: Option<&precise::EngineEvents>,
) -> anyhow::Result<RouterUp> {
    let up = match router {
        Router::SwitchyardPrecise { epps, variant } => {
            let events = events.context("the precise router needs engines publishing KV events")?;
            let config = match variant {
                None => precise::precise_config(events),
                Some((_, template)) => harness::render(
                    template,
                    &[
                        ("TOKENIZER", events.tokenizer.display().to_string()),
                        ("KV_EVENTS_PORT", events.socket_port.to_string()),
                    ],
                )?,
            };
            precise::start_multi_epp(
                tools,
                &config,
                precise::EppSet::routing(*epps),
                backends,
                dir,
                &["--debug-decision-header"],
                variant.is_none(),
            )
            .await?
            .up
        }
        Router::EnvoyRoundRobin => start_envoy_direct(tools, "ROUND_ROBIN", backends, dir).await?,
        Router::EnvoyLeastRequest => {
            start_envoy_direct(tools, "LEAST_REQUEST", backends, dir).await?
        }
        Router::Switchyard { config, .. } => {
            // The cost model's predicted TTFT reaches the client in the decision header, so
            // that the bench can compare it with the observed one.
            let extra: &[&str] = if router.is_cost_model() {
                &["--debug-decision-header"]
            } else {
                &[]
            };
            start_switchyard(tools, config.as_deref(), backends, dir, extra).await?
        }
        Router::Smg(policy) => {
            // `python -m smg`, not the `smg` console script: sglang-router 0.3.2 installs a
            // script of the same name into the same venv (its own CLI under another name).
            let python = tools.peers_venv.join("bin").join("python");
            anyhow::ensure!(
                python.exists(),
                "{} not installed: run `make bench-peers` (installs smg into bench/.venv-peers)",
                python.display()
            );
            let port = free_port()?;
            let prom = free_port()?;
            let mut cmd = Command::new(&python);
            cmd.args(["-m", "smg", "launch"])
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--prometheus-host",
                    "127.0.0.1",
                    "--prometheus-port",
                    &prom.to_string(),
                ])
                .args(["--policy", policy])
                .args(["--log-level", "warn"])
                .arg("--worker-urls")
                .args(backends.iter().map(|a| format!("http://{a}")));
            let p = Proc::spawn("smg", &mut cmd, dir)?;
            RouterUp {
                url: format!("http://127.0.0.1:{port}"),
                procs: vec![p],
                epp: None,
                epp_metrics: None,
            }
        }
        Router::Sglang(policy) | Router::Vllm(policy) => {
            let sglang = matches!(router, Router::Sglang(_));
            let (bin, pre): (&str, &[&str]) = if sglang {
                ("sglang-router", &["launch"])
            } else {
                ("vllm-router", &[])
            };
            let exe = tools.peers_venv.join("bin").join(bin);
            anyhow::ensure!(
                exe.exists(),
                "{} not installed: run `make bench-peers` (installs sglang-router and vllm-router into bench/.venv-peers)",
                exe.display()
            );
            let port = free_port()?;
            let prom = free_port()?;
            let mut cmd = Command::new(&exe);
            cmd.args(pre)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--prometheus-host",
                    "127.0.0.1",
                    "--prometheus-port",
                    &prom.to_string(),
                ])
                .args(["--policy", policy])
                .args(["--log-level", if sglang { "warn" } else { "warning" }])
                .arg("--worker-urls")
                .args(backends.iter().map(|a| format!("http://{a}")));
            let p = Proc::spawn(bin, &mut cmd, dir)?;
            RouterUp {
                url: format!("http://127.0.0.1:{port}"),
                procs: vec![p],
                epp: None,
                epp_metrics: None,
            }
        }
    };
    wait_serving(&up.url, Duration::from_secs(60))
        .await
        .with_context(|| {
            let logs: Vec<String> = up
                .procs
                .iter()
                .map(|p| p.log.display().to_string())
                .collect();
            format!(
                "{} never served a request; logs: {}",
                router.label(),
                logs.join(", ")
            )
        })?;
    Ok(up)
}

/// Sends a one-token completion until one succeeds (every router gets the same probe).
async fn wait_serving(url: &str, timeout: Duration) -> anyhow::Result<()> {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let until = std::time::Instant::now() + timeout;
    let body = format!("{{\"model\":\"{MODEL}\",\"prompt\":\"ping\",\"max_tokens\":1}}");
    loop {
        let req = http::Request::post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))?;
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
        {
            let ok = resp.status().is_success();
            let _ = resp.into_body().collect().await;
            if ok {
                return Ok(());
            }
        }
        anyhow::ensure!(std::time::Instant::now() < until, "timeout");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn start_envoy(
    tools: &Tools,
    config: String,
    admin: u16,
    listen: u16,
    dir: &Path,
    wait_epp: bool,
) -> anyhow::Result<Proc> {
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(&tools.envoy);
    cmd.arg("-c").arg(&path).args([
        "--disable-hot-restart",
        "--log-level",
        "warn",
        "--concurrency",
        "2",
    ]);
    let envoy = Proc::spawn("envoy", &mut cmd, dir)?;
    let admin_url = format!("http://127.0.0.1:{admin}");
    wait_http(
        &format!("{admin_url}/ready"),
        Some("LIVE"),
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("Envoy not ready; see {}", envoy.log.display()))?;
    if wait_epp {
        // Envoy health-checks the EPP once a second; FailClose answers 500 until it passes.
        wait_http(
            &format!("{admin_url}/clusters"),
            Some("::health_flags::healthy"),
            Duration::from_secs(30),
        )
        .await?;
    }
    let _ = listen;
    Ok(envoy)
}

/// Envoy alone: `lb_policy` over `backends`.
pub async fn start_envoy_direct(
    tools: &Tools,
    lb_policy: &str,
    backends: &[SocketAddr],
    dir: &Path,
) -> anyhow::Result<RouterUp> {
    let template = std::fs::read_to_string(tools.repo.join("bench/envoy/envoy-direct.yaml"))?;
    let (admin, listen) = (free_port()?, free_port()?);
    let config = harness::render(
        &template,
        &[
            ("LISTEN_PORT", listen.to_string()),
            ("ADMIN_PORT", admin.to_string()),
            ("BACKEND_ENDPOINTS", harness::lb_endpoints(backends)),
            ("LB_POLICY", lb_policy.to_owned()),
        ],
    )?;
    let envoy = start_envoy(tools, config, admin, listen, dir, false).await?;
    Ok(RouterUp {
        url: format!("http://127.0.0.1:{listen}"),
        procs: vec![envoy],
        epp: None,
        epp_metrics: None,
    })
}

/// `epp` (plaintext ext_proc, pool file of `backends`) + Envoy with the shipped plaintext
/// template (`gateway-configs/envoy/envoy-plaintext.yaml`).
pub async fn start_switchyard(
    tools: &Tools,
    config: Option<&str>,
    backends: &[SocketAddr],
    dir: &Path,
    extra_args: &[&str],
) -> anyhow::Result<RouterUp> {
    start_switchyard_on(tools, config, backends, dir, extra_args, ResponsePath::Full).await
}

/// The response path of the shipped Envoy template (README "Response path").
pub use testkit::envoy::ResponsePath;

/// [`start_switchyard`] with the Envoy template on a given response path.
pub async fn start_switchyard_on(
    tools: &Tools,
    config: Option<&str>,
    backends: &[SocketAddr],
    dir: &Path,
    extra_args: &[&str],
    response_path: ResponsePath,
) -> anyhow::Result<RouterUp> {
    start_switchyard_pool(
        tools,
        config,
        harness::pool_yaml(backends),
        backends,
        dir,
        extra_args,
        response_path,
    )
    .await
}

/// [`start_switchyard_on`] with the pool file's text given (e.g. with InferenceObjectives).
pub async fn start_switchyard_pool(
    tools: &Tools,
    config: Option<&str>,
    pool_file: String,
    backends: &[SocketAddr],
    dir: &Path,
    extra_args: &[&str],
    response_path: ResponsePath,
) -> anyhow::Result<RouterUp> {
    let EppUp {
        proc: epp,
        grpc,
        metrics_url,
    } = start_epp(tools, config, pool_file, dir, extra_args).await?;
    let PlaintextEnvoy {
        config: envoy_cfg,
        admin,
        listen,
    } = plaintext_envoy(tools, response_path, grpc, backends)?;
    let envoy = start_envoy(tools, envoy_cfg, admin, listen, dir, true).await?;
    Ok(RouterUp {
        url: format!("http://127.0.0.1:{listen}"),
        procs: vec![envoy, epp],
        epp: Some(1),
        epp_metrics: Some(metrics_url),
    })
}

/// The shipped plaintext Envoy template on `response_path`, rendered for one EPP at
/// `127.0.0.1:epp_grpc` in front of `backends`, with free admin and listener ports.
pub struct PlaintextEnvoy {
    /// The rendered configuration.
    pub config: String,
    /// Its admin port.
    pub admin: u16,
    /// Its listener port.
    pub listen: u16,
}

/// Renders [`PlaintextEnvoy`].
pub fn plaintext_envoy(
    tools: &Tools,
    response_path: ResponsePath,
    epp_grpc: u16,
    backends: &[SocketAddr],
) -> anyhow::Result<PlaintextEnvoy> {
    let template = testkit::envoy::with_response_path(
        &std::fs::read_to_string(
            tools
                .repo
                .join("gateway-configs/envoy/envoy-plaintext.yaml"),
        )?,
        response_path,
    );
    let (admin, listen) = (free_port()?, free_port()?);
    let config = harness::render(
        &template,
        &[
            ("LISTEN_PORT", listen.to_string()),
            ("ADMIN_PORT", admin.to_string()),
            ("EPP_HOST", "127.0.0.1".into()),
            ("EPP_PORT", epp_grpc.to_string()),
            ("BACKEND_ENDPOINTS", harness::lb_endpoints(backends)),
        ],
    )?;
    Ok(PlaintextEnvoy {
        config,
        admin,
        listen,
    })
}

/// A running `epp` (plaintext ext_proc, no metrics auth).
pub struct EppUp {
    /// The process.
    pub proc: Proc,
    /// Its ext_proc port on 127.0.0.1.
    pub grpc: u16,
    /// Its `/metrics` URL.
    pub metrics_url: String,
}

/// Starts an `epp` on the pool file's text and waits for its metrics endpoint.
pub async fn start_epp(
    tools: &Tools,
    config: Option<&str>,
    pool_file: String,
    dir: &Path,
    extra_args: &[&str],
) -> anyhow::Result<EppUp> {
    let pool = dir.join("pool.yaml");
    std::fs::write(&pool, pool_file)?;
    let up = spawn_epp(tools, "epp", 1, config, &pool, dir, extra_args)?;
    wait_http(&up.metrics_url, None, Duration::from_secs(30))
        .await
        .with_context(|| format!("epp not up; see {}", up.proc.log.display()))?;
    Ok(up)
}

/// Spawns an `epp` named `name` (its log file) on the pool file at `pool`, plaintext, no
/// metrics auth, on free loopback ports, with `seed`; does not wait for it.
pub fn spawn_epp(
    tools: &Tools,
    name: &str,
    seed: usize,
    config: Option<&str>,
    pool: &Path,
    dir: &Path,
    extra_args: &[&str],
) -> anyhow::Result<EppUp> {
    let (grpc, health, metrics) = (free_port()?, free_port()?, free_port()?);
    let mut cmd = Command::new(&tools.epp);
    cmd.arg("--pool-file")
        .arg(pool)
        .args([
            "--bind-address",
            "127.0.0.1",
            "--secure-serving=false",
            "--metrics-endpoint-auth=false",
        ])
        .args(["--seed", &seed.to_string()])
        .args(["--grpc-port", &grpc.to_string()])
        .args(["--grpc-health-port", &health.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(extra_args);
    if let Some(c) = config {
        cmd.args(["--config-text", c]);
    }
    Ok(EppUp {
        proc: Proc::spawn(name, &mut cmd, dir)?,
        grpc,
        metrics_url: format!("http://127.0.0.1:{metrics}/metrics"),
    })
}

/// Starts `replicas` simulated replicas (default profile plus `extra` flags) on ephemeral
/// ports; returns the process and the replica addresses.
pub fn start_sim(
    tools: &Tools,
    replicas: usize,
    extra: &[String],
    dir: &Path,
) -> anyhow::Result<(Proc, Vec<SocketAddr>)> {
    start_sim_with(tools, replicas, extra, dir, None)
}

/// [`start_sim`], publishing KV events as `events` says (one loopback address per replica).
pub fn start_sim_with(
    tools: &Tools,
    replicas: usize,
    extra: &[String],
    dir: &Path,
    events: Option<&precise::EngineEvents>,
) -> anyhow::Result<(Proc, Vec<SocketAddr>)> {
    let (host, event_args) = match events {
        Some(e) => e.sim_args(),
        None => ("127.0.0.1".to_owned(), Vec::new()),
    };
    let mut cmd = Command::new(&tools.sim);
    cmd.args(&event_args)
        .args([
            "--host",
            &host,
            "--port",
            "0",
            "--replicas",
            &replicas.to_string(),
        ])
        .args(extra)
        .env("RUST_LOG", "warn");
    let (p, lines) = Proc::spawn_with_ready_lines("sim", &mut cmd, dir, Duration::from_secs(30))?;
    let addrs = lines
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(1)?
                .strip_prefix("http://")?
                .parse()
                .ok()
        })
        .collect::<Vec<SocketAddr>>();
    anyhow::ensure!(addrs.len() == replicas, "sim reported {lines:?}");
    Ok((p, addrs))
}

/// Machine and run conditions for the results file.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|x| x.1.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = harness_mem_gib();
    let kernel = cmd_out("uname", &["-r"]);
    format!("{cores} vCPU {cpu}, {mem:.0} GiB RAM, Linux {kernel}")
}

fn harness_mem_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0)
}

/// stdout of a command, trimmed ("" on failure).
pub fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The 1/5/15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
