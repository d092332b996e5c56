//! Precise routing in the bench: simulated engines that publish their KV-cache events as vLLM
//! does, and one or several `epp` processes behind one Envoy that subscribe to them
//! (`precise-prefix-cache-scorer` with `discoverPods: true`).
//!
//! - **Engines.** One `sim` process, `--ip-per-replica`: replica i listens on 127.0.0.(2+i) and
//!   binds its ZMQ PUB socket on `tcp://127.0.0.(2+i):<socketPort>` (every 127/8 address is
//!   loopback on Linux). A vLLM PUB socket either binds or connects to one endpoint, so several
//!   EPPs can only all hear every engine if the engines bind and each EPP dials each engine:
//!   llm-d's `discoverPods` mode, which dials `tcp://<endpoint IP>:<socketPort + rank>`; with
//!   one address per replica every replica is rank 0 and the pool file lists the IPs.
//!   `socketPort` is a free port picked per run, so runs never collide on it. The engines
//!   tokenize with the project's test tokenizer (`tokenize/testdata`), which the EPPs load too:
//!   the precise index is keyed by token ids, so both sides must make the same ones.
//! - **Router.** [`precise_config`]: the cost model (`profiles/cost-model.yaml`) reading its
//!   prefix match from the precise index (the approximate index stays as the per-endpoint
//!   fallback), with speculative entries on. The cost model rather than `balanced`: it turns a
//!   matched prefix into prefill time saved and weighs it against the queue ahead on that
//!   replica, so it keeps the goodput lead it has with the approximate index (RESULTS.md,
//!   goodput); and it reads the engines' running/waiting counts every scrape, which is what keeps
//!   several EPPs, each counting only its own in-flight requests, from herding.
//! - **Several EPPs.** [`envoy_config_multi_epp`]: the shipped plaintext template with N
//!   endpoints in its `epp` cluster. Envoy opens one ext_proc stream per HTTP request and picks
//!   its EPP per stream with the template's `LEAST_REQUEST` (power of two choices on active
//!   streams): a stream lives as long as its request, so active streams are the EPP's in-flight
//!   requests, and the EPP with fewer of them gets the next one (round robin would ignore that a
//!   slow EPP holds more). Every EPP watches the same pool file; there is no leader election in
//!   pool-file mode (`--ha-enable-leader-election` needs Kubernetes), so all are ready and all
//!   route.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{RouterUp, start_envoy};
use crate::harness::{self, Tools, free_port, get, wait_http};

/// The first replica's address; replica i gets this + i.
pub const FIRST_REPLICA_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The tokenizer engines and EPPs share, relative to the repository.
pub const TOKENIZER_DIR: &str = "tokenize/testdata";

/// Engine tokens per workload token: the workloads count tokens of the simulator's built-in
/// tokenizer (`workload::text`); precise runs tokenize with the test tokenizer, a 640-token BPE
/// vocabulary trained on the project's docs, which cuts the workloads' random pseudo-words
/// about three times finer (measured by `the_test_tokenizer_ratio_is_as_stated`). Scenarios
/// with precise routing divide the workload's token counts by it
/// ([`crate::workload::WorkloadArgs::scaled_prompts`]), so that the engines see the prompt
/// lengths of the presets.
pub const TEST_TOKENIZER_TOKENS_PER_TOKEN: f64 = 2.94;

/// How the engines publish their KV events for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvents {
    /// The tokenizer directory (engines and EPPs).
    pub tokenizer: PathBuf,
    /// The ZMQ PUB port on every replica's address (llm-d's `podDiscoveryConfig.socketPort`).
    pub socket_port: u16,
    /// The first replica's address.
    pub first_ip: Ipv4Addr,
}

impl EngineEvents {
    /// A fresh setup: the repository's test tokenizer, a free port.
    pub fn new(repo: &Path) -> anyhow::Result<EngineEvents> {
        Ok(EngineEvents {
            tokenizer: repo.join(TOKENIZER_DIR),
            socket_port: free_port()?,
            first_ip: FIRST_REPLICA_IP,
        })
    }

    /// The `sim` host and flags (besides the workload's): one address per replica, the
    /// tokenizer, vLLM's `--kv-events-config` with a wildcard endpoint (`sim` moves it onto each
    /// replica's address).
    pub fn sim_args(&self) -> (String, Vec<String>) {
        let config = serde_json::json!({
            "enable_kv_cache_events": true,
            "publisher": "zmq",
            "endpoint": format!("tcp://*:{}", self.socket_port),
        });
        (
            self.first_ip.to_string(),
            vec![
                "--ip-per-replica".into(),
                "--tokenizer".into(),
                self.tokenizer.display().to_string(),
                "--kv-events-config".into(),
                config.to_string(),
            ],
        )
    }
}

/// The precise profile: the cost model of `profiles/cost-model.yaml`, its prefix match taken
/// from `precise-prefix-cache-scorer` (events from every endpoint at
/// `tcp://<IP>:<socket_port>`, speculative entries for just-routed requests), token ids from the
/// shared tokenizer.
pub fn precise_config(events: &EngineEvents) -> String {
    let cost = endpoint_picker::config::profiles::COST_MODEL;
    let head = format!(
        "plugins:
- type: token-producer
  parameters:
    local:
      tokenizerPath: {tok}
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {{blockSizeTokens: 16}}
    # The tiers contract's media: a CPU copy counts for its endpoint, the shared store for all.
    indexerConfig:
      kvCacheBackendConfigs:
      - {{name: gpu, weight: 1.0}}
      - {{name: cpu, weight: 0.8}}
      - {{name: remote, weight: 0.6}}
    sharedMedia: [remote]
    # Until the engine's events arrive (a long prefill takes a second), the EPP's own choice is
    # the best guess of where the prefix will be; each EPP knows only its own.
    speculativeIndexing: true
    speculativeTTL: 2s
    kvEventsConfig:
      discoverPods: true
      podDiscoveryConfig: {{socketPort: {port}}}
# When another replica holds a longer prefix (by 256 tokens or more), name it in
# `x-kv-cache-source-host-port`: the simulated engine pulls the blocks from it (`--p2p-load-gbps`).
- type: p2p-source-producer
  parameters:
    minCachedTokenDelta: 256
",
        tok = events.tokenizer.display(),
        port = events.socket_port
    );
    // The cost model charges the tiers' load times (the contract's bandwidths) instead of
    // prefill, and a peer pull when `p2p-source-producer` names a source; without tiers on the
    // engines no CPU or shared block is ever reported. A new prefix goes to its home replica
    // (`prefixHomeWeight`) unless that one's queue is a prefill longer: several EPPs, none of
    // which sees the others' just-routed requests, then compute it once rather than once each.
    // A prefix someone holds stays with its holders until the least-queued one's prefill queue is
    // 2.5 × the mean plus one prefill (`holderLoadFactor`): fewer second copies crowding the
    // tiers (bench/RESULTS.md, "Bounded loads for prefix holders": `kv-sharing` 49 → 55 req/s),
    // at a price on workloads whose caches have room (`shared-prefix` at 30 req/s: TTFT p90
    // ≈ 700 ms against 410 without it; the active-active section runs with it).
    cost.replacen("plugins:\n", &head, 1).replacen(
        "- type: ttft-cost-producer\n  parameters:\n",
        "- type: ttft-cost-producer\n  parameters:\n    kvBytesPerToken: 131072\n    cpuLoadGBps: 25\n    sharedLoadGBps: 10\n    peerLoadGBps: 10\n    prefixHomeWeight: 1\n    holderLoadFactor: 2.5\n",
        1,
    )
}

/// `config` (a profile with `speculativeIndexing: true`) for one of several EPPs that share
/// their speculative entries: it publishes them on `publish` and hears each of `peers`.
pub fn with_speculative_peers(config: &str, publish: u16, peers: &[u16]) -> anyhow::Result<String> {
    let line = "    speculativeIndexing: true\n";
    anyhow::ensure!(
        config.contains(line),
        "the profile has no `speculativeIndexing: true` to share"
    );
    let peers: Vec<String> = peers
        .iter()
        .map(|p| format!("\"tcp://127.0.0.1:{p}\""))
        .collect();
    Ok(config.replacen(
        line,
        &format!(
            "{line}    speculativePublishEndpoint: tcp://127.0.0.1:{publish}\n    speculativePeers: [{}]\n",
            peers.join(", ")
        ),
        1,
    ))
}

/// The shipped Envoy template with `ports.len()` EPP endpoints (all on 127.0.0.1) in its `epp`
/// cluster instead of `${EPP_HOST}:${EPP_PORT}`; the template's `LEAST_REQUEST` balances the
/// ext_proc streams over them.
pub fn envoy_config_multi_epp(
    template: &str,
    epp_ports: &[u16],
    listen: u16,
    admin: u16,
    backends: &[SocketAddr],
) -> anyhow::Result<String> {
    let epps: Vec<SocketAddr> = epp_ports
        .iter()
        .map(|&port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect();
    let out = testkit::envoy::with_several_epps(template, &epps)?;
    harness::render(
        &out,
        &[
            ("LISTEN_PORT", listen.to_string()),
            ("ADMIN_PORT", admin.to_string()),
            ("BACKEND_ENDPOINTS", harness::lb_endpoints(backends)),
        ],
    )
}

/// Several `epp` processes behind one Envoy.
pub struct MultiEppUp {
    /// The router (Envoy first, then the EPPs; `epp` and `epp_metrics` name the first EPP).
    pub up: RouterUp,
    /// Every EPP's `/metrics`, in start order.
    pub metrics_urls: Vec<String>,
}

/// EPP processes of an active-active setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EppSet {
    /// EPPs Envoy balances ext_proc streams over.
    pub routed: usize,
    /// More EPPs that do everything but route (scrape every engine, apply every KV event and
    /// peer message): a control for what more EPP processes cost a machine they share with
    /// the engines.
    pub watching: usize,
}

impl EppSet {
    /// `n` EPPs, all routing.
    pub fn routing(n: usize) -> Self {
        Self {
            routed: n,
            watching: 0,
        }
    }

    /// Every EPP process.
    pub fn total(self) -> usize {
        self.routed + self.watching
    }
}

/// Starts the EPPs of `set` on `config` (each its own ports and seed, one shared pool file of
/// `backends`) and Envoy in front of the routed ones; waits until Envoy sees those healthy.
pub async fn start_multi_epp(
    tools: &Tools,
    config: &str,
    set: EppSet,
    backends: &[SocketAddr],
    dir: &Path,
    extra_args: &[&str],
    speculative_peers: bool,
) -> anyhow::Result<MultiEppUp> {
    let (routed, n) = (set.routed, set.total());
    anyhow::ensure!(routed > 0, "no EPP to route");
    // With several EPPs sharing speculative entries, each its own publish port and the
    // others' as peers.
    let publish: Vec<u16> = if speculative_peers && n > 1 {
        (0..n).map(|_| free_port()).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let pool = dir.join("pool.yaml");
    std::fs::write(&pool, harness::pool_yaml(backends))?;
    let mut epps = Vec::with_capacity(n);
    let mut grpc_ports = Vec::with_capacity(n);
    let mut metrics_urls = Vec::with_capacity(n);
    for i in 0..n {
        let config = match publish.get(i) {
            Some(&port) => {
                let peers: Vec<u16> = publish.iter().copied().filter(|&p| p != port).collect();
                with_speculative_peers(config, port, &peers)?
            }
            None => config.to_owned(),
        };
        // Distinct seeds: replicas tied on score are not broken the same way by every EPP.
        let up = super::spawn_epp(
            tools,
            &format!("epp-{i}"),
            i + 1,
            Some(&config),
            &pool,
            dir,
            extra_args,
        )?;
        epps.push(up.proc);
        grpc_ports.push(up.grpc);
        metrics_urls.push(up.metrics_url);
    }
    for (url, p) in metrics_urls.iter().zip(&epps) {
        wait_http(url, None, Duration::from_secs(30))
            .await
            .with_context(|| format!("epp not up; see {}", p.log.display()))?;
    }
    let template = std::fs::read_to_string(
        tools
            .repo
            .join("gateway-configs/envoy/envoy-plaintext.yaml"),
    )?;
    let (admin, listen) = (free_port()?, free_port()?);
    let envoy_cfg =
        envoy_config_multi_epp(&template, &grpc_ports[..routed], listen, admin, backends)?;
    let envoy = start_envoy(tools, envoy_cfg, admin, listen, dir, false).await?;
    wait_epps_healthy(admin, routed, Duration::from_secs(30))
        .await
        .with_context(|| format!("Envoy never saw {routed} EPPs healthy"))?;
    let mut procs = vec![envoy];
    procs.extend(epps);
    Ok(MultiEppUp {
        up: RouterUp {
            url: format!("http://127.0.0.1:{listen}"),
            procs,
            epp: Some(1),
            epp_metrics: metrics_urls.first().cloned(),
        },
        metrics_urls,
    })
}

/// Waits until Envoy's health checks pass for `n` hosts of its `epp` cluster.
async fn wait_epps_healthy(admin: u16, n: usize, timeout: Duration) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{admin}/clusters");
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok((200, body)) = get(&url).await
            && healthy_epps(&body) >= n
        {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < until, "timeout");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Hosts of the `epp` cluster whose health flags say healthy, in Envoy's `/clusters` text.
pub fn healthy_epps(clusters: &str) -> usize {
    clusters
        .lines()
        .filter(|l| l.starts_with("epp::") && l.ends_with("::health_flags::healthy"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../gateway-configs/envoy/envoy-plaintext.yaml"),
        )
        .unwrap()
    }

    #[test]
    fn envoy_gets_one_ext_proc_endpoint_per_epp() {
        let backends: Vec<SocketAddr> = vec!["127.0.0.2:8000".parse().unwrap()];
        let yaml =
            envoy_config_multi_epp(&template(), &[9001, 9002, 9003], 10, 11, &backends).unwrap();
        let doc: yaml_serde::Value = yaml_serde::from_str(&yaml).unwrap();
        let clusters = doc["static_resources"]["clusters"].as_sequence().unwrap();
        let epp = clusters
            .iter()
            .find(|c| c["name"].as_str() == Some("epp"))
            .unwrap();
        assert_eq!(epp["lb_policy"].as_str(), Some("LEAST_REQUEST"));
        let eps = epp["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_sequence()
            .unwrap();
        let ports: Vec<u64> = eps
            .iter()
            .map(|e| {
                e["endpoint"]["address"]["socket_address"]["port_value"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ports, [9001, 9002, 9003]);
        assert!(eps.iter().all(
            |e| e["endpoint"]["address"]["socket_address"]["address"].as_str() == Some("127.0.0.1")
        ));
        // One EPP: the shipped template's cluster exactly.
        let one = envoy_config_multi_epp(&template(), &[9001], 10, 11, &backends).unwrap();
        let shipped = harness::render(
            &template(),
            &[
                ("LISTEN_PORT", "10".into()),
                ("ADMIN_PORT", "11".into()),
                ("EPP_HOST", "127.0.0.1".into()),
                ("EPP_PORT", "9001".into()),
                ("BACKEND_ENDPOINTS", harness::lb_endpoints(&backends)),
            ],
        )
        .unwrap();
        assert_eq!(one.trim_end(), shipped.trim_end());
        assert!(envoy_config_multi_epp(&template(), &[], 10, 11, &backends).is_err());
    }

    #[test]
    fn the_pool_lists_each_replica_at_its_own_ip() {
        let addrs: Vec<SocketAddr> = (0..3u8)
            .map(|i| SocketAddr::from(([127, 0, 0, 2 + i], 40000 + u16::from(i))))
            .collect();
        let pool = harness::pool_yaml(&addrs);
        let doc: yaml_serde::Value = yaml_serde::from_str(&pool).unwrap();
        let eps = doc["endpoints"].as_sequence().unwrap();
        let got: Vec<(String, u64)> = eps
            .iter()
            .map(|e| {
                (
                    e["address"].as_str().unwrap().to_owned(),
                    e["ports"][0].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("127.0.0.2".to_owned(), 40000),
                ("127.0.0.3".to_owned(), 40001),
                ("127.0.0.4".to_owned(), 40002)
            ]
        );
    }

    #[test]
    fn engines_publish_on_their_own_ip_and_the_profile_dials_there() {
        let ev = EngineEvents {
            tokenizer: PathBuf::from("/repo/tokenize/testdata"),
            socket_port: 5601,
            first_ip: FIRST_REPLICA_IP,
        };
        let (host, args) = ev.sim_args();
        assert_eq!(host, "127.0.0.2");
        assert_eq!(args[0], "--ip-per-replica");
        let kv: serde_json::Value = serde_json::from_str(&args[4]).unwrap();
        assert_eq!(kv["endpoint"], "tcp://*:5601");
        assert_eq!(kv["enable_kv_cache_events"], true);
        let cfg = precise_config(&ev);
        assert!(cfg.contains("socketPort: 5601"), "{cfg}");
        assert!(cfg.contains("tokenizerPath: /repo/tokenize/testdata"));
        assert!(cfg.contains("    cpuLoadGBps: 25\n"), "{cfg}");
        // The profile loads (the tokenizer is not read at load time) with no warnings.
        let loaded = endpoint_picker::config::load(&cfg, 1);
        match loaded {
            Ok(c) => assert!(c.warnings.is_empty(), "{:?}", c.warnings),
            Err(e) => panic!("{e}\n{cfg}"),
        }
    }

    #[test]
    fn the_test_tokenizer_ratio_is_as_stated() {
        use rand::SeedableRng;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(TOKENIZER_DIR);
        let tok = sim::tokenizer::Tokenizer::load(&dir, None).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let text = crate::workload::text::words(&mut rng, 20_000);
        let n = tok.encode_prompt(&text).unwrap().len();
        let ratio = n as f64 / 20_000.0;
        assert!(
            (ratio / TEST_TOKENIZER_TOKENS_PER_TOKEN - 1.0).abs() < 0.03,
            "measured {ratio:.3}"
        );
    }

    #[test]
    fn each_epp_publishes_on_its_port_and_hears_the_others() {
        let ev = EngineEvents {
            tokenizer: PathBuf::from("/repo/tokenize/testdata"),
            socket_port: 5601,
            first_ip: FIRST_REPLICA_IP,
        };
        let cfg = with_speculative_peers(&precise_config(&ev), 7001, &[7002, 7003]).unwrap();
        assert!(
            cfg.contains("speculativePublishEndpoint: tcp://127.0.0.1:7001\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains(r#"speculativePeers: ["tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003"]"#)
        );
        let loaded = endpoint_picker::config::load(&cfg, 1).unwrap();
        let p = &loaded.precise_producers[0].params;
        assert_eq!(p.publish_endpoint.as_deref(), Some("tcp://127.0.0.1:7001"));
        assert_eq!(p.peers.len(), 2);
        assert!(with_speculative_peers("plugins: []", 1, &[2]).is_err());
    }

    #[test]
    fn healthy_epps_are_counted_from_envoy_clusters() {
        let text = "epp::127.0.0.1:1::health_flags::healthy\n\
                    epp::127.0.0.1:2::health_flags::/failed_active_hc\n\
                    epp::127.0.0.1:3::health_flags::healthy\n\
                    inference_pool::127.0.0.2:5::health_flags::healthy\n";
        assert_eq!(healthy_epps(text), 2);
    }
}
