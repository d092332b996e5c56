//! `precise-prefix-cache-scorer`: prefix affinity from the engines' own KV-cache events.
//!
//! llm-d's plugin of that name (`llm-d/llm-d-router@ebab6879`,
//! `pkg/epp/framework/plugins/scheduling/scorer/preciseprefixcache/`, which composes the
//! `precise-prefix-cache-producer` of `.../requestcontrol/dataproducer/preciseprefixcache/`
//! with `prefix-cache-scorer`), with its parameters:
//!
//! ```yaml
//! - type: precise-prefix-cache-scorer
//!   parameters:
//!     tokenProcessorConfig: {blockSizeTokens: 16, hashSeed: "", hashAlgorithm: cbor-fnv}
//!     indexerConfig:
//!       kvBlockIndexConfig: {inMemoryConfig: {size: 10000000, podCacheSize: 10}}  # llm-d: 1e8
//!       kvCacheBackendConfigs: [{name: gpu, weight: 1.0}, {name: cpu, weight: 0.8}]
//!     kvEventsConfig:
//!       zmqEndpoint: ""            # e.g. tcp://*:5557: one SUB socket bound here for every engine
//!       topicFilter: "kv@"
//!       discoverPods: true         # one SUB socket per endpoint, dialing its IP
//!       podDiscoveryConfig: {socketPort: 5557, replaySocketPort: 0}
//!       maxBlocksPerSecond: 200000 # Switchyard's: what one engine may send, 0 for no cap
//!     speculativeIndexing: false
//!     speculativeTTL: 2s
//!     sharedMedia: [remote]        # Switchyard's: media that are one store for the pool
//!     speculativePublishEndpoint: tcp://*:5570          # Switchyard's: active-active EPPs
//!     speculativePeers: [tcp://epp-peers:5570]   # a name: every address it resolves to
//! ```
//!
//! `speculativePublishEndpoint` and `speculativePeers` (this EPP's own, both off by default,
//! both need `speculativeIndexing: true`) share speculative entries between EPP replicas that
//! route one pool side by side: this EPP publishes, on a PUB socket bound at the endpoint,
//! each routed request's block keys and chosen endpoint, and subscribes to each peer's
//! endpoint (a host that is a DNS name stands for every address it resolves to, this EPP's
//! own skipped: one headless Service names every replica); a peer's message makes the same
//! speculative entries in this EPP's index (same `speculativeTTL`, replaced by the engine's
//! own events). Until an engine has computed a request's prefix, seconds after the decision
//! when queues are long, only the EPP that routed it knows where it goes; this tells the
//! others (bench/RESULTS.md, "Active-active"). The message and its caps:
//! [`crate::kv_index::peers`]. Peers must hash alike (the same
//! `tokenProcessorConfig`) and see the pool's endpoints at the same addresses.
//!
//! `sharedMedia` (this EPP's own parameter, default `[remote]`, the tiers contract) names the
//! media that are one store shared by every endpoint of the pool, as LMCache's remote backend
//! is: a block an endpoint announces there (`BlockStored` with `medium: "REMOTE"`) counts for
//! every endpoint, since each can load it. `[]` makes every medium per endpoint (llm-d's
//! behaviour). The lookup reports, per endpoint, the blocks it holds by tier, those only the
//! store provides, and its own run (what a peer could pull from it): the cost model and
//! `p2p-source-producer` read them ([`PreciseMatch::tier_tokens`]).
//!
//! The producer half computes the request's keys from its token ids (`InferenceRequest::
//! token_ids`, filled by the token producer) and looks them up once per request; the scorer half
//! scores each candidate `weighted matched blocks / request blocks` (llm-d HEAD, in `[0, 1]`).
//! An endpoint whose event stream is not healthy (no subscriber connected yet, a gap replay did
//! not fill, a lost connection: [`crate::kv_index::StreamState`]) is scored from the approximate
//! index instead (the `approx-prefix-cache-producer`, which the config loader adds for it), as
//! is every endpoint of a request without token ids. The cost model reads the same merged match
//! ([`PreciseMatch::cached_tokens`]).

use std::sync::Arc;
use std::time::Duration;

use kv_events::Medium;
use serde::Deserialize;

use super::scorers::plugin_named;
use crate::config::ConfigError;
use crate::config::params::{Params, parse_duration};
use crate::datastore::{Endpoint, EndpointId, PoolSnapshot};
use crate::kv_index::index::{DEFAULT_MAX_ENDPOINTS_PER_KEY, DEFAULT_MAX_KEYS, MEDIA, tier};
use crate::kv_index::keys::DEFAULT_BLOCK_SIZE;
use crate::kv_index::peers::PeerOutbox;
use crate::kv_index::{
    HashAlgorithm, IndexLimits, KeyHasher, Lookup, SharedKvIndex, SharedMedia, TierWeights,
};
use crate::request::InferenceRequest;
use crate::scheduling::framework::{
    Candidate, CycleState, DataProducer, Plugin, PrefixMatch, Scorer, TierTokens,
};

/// The most blocks of one request that are hashed and looked up: 256 Ki tokens at the default
/// block size. Token ids come from the EPP's own tokenizer, bounded by the body limit; this
/// bounds the per-request work and allocation whatever that limit is.
pub const MAX_LOOKUP_BLOCKS: usize = 16_384;

/// llm-d's default `kvEventsConfig.podDiscoveryConfig.socketPort`.
pub const DEFAULT_SOCKET_PORT: u16 = 5557;

/// Where the KV-event subscribers connect, from `kvEventsConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsSettings {
    /// `zmqEndpoint`: one SUB socket bound here (`tcp://*:5557`) that every engine dials.
    pub bind_endpoint: Option<String>,
    /// `discoverPods`: one SUB socket per endpoint, dialing `tcp://<ip>:<socketPort + rank>`.
    pub per_endpoint: bool,
    /// `podDiscoveryConfig.socketPort`.
    pub socket_port: u16,
    /// `podDiscoveryConfig.replaySocketPort`: the engines' replay ROUTER port, when set.
    pub replay_port: Option<u16>,
    /// `topicFilter`: the SUB socket's subscription prefix.
    pub topic_filter: String,
    /// `maxBlocksPerSecond` (Switchyard's own; 0: no cap): the blocks one engine's events may
    /// store or remove a second, over a second's burst. Past it the engine's batches are
    /// dropped and it is scored from the approximate index until it slows down, so an engine
    /// that floods its events (a bug, a compromised pod) costs the EPP a bounded share of a
    /// core. A busy engine announces a few thousand blocks a second (50,000 prefill tokens a
    /// second at 16-token blocks, stored, offloaded and later removed, is about 12,500).
    /// Replayed batches (a gap's, or the history asked for at start) are not held to it but
    /// to an allowance of their own, 30 seconds of it (`epp`'s `REPLAY_ALLOWANCE_SECONDS`).
    pub max_blocks_per_second: u64,
}

/// Default of [`KvEventsSettings::max_blocks_per_second`]: about 16 times the busiest engine's
/// rate, and a sixth of what one core ingests (1.27 M stored blocks a second, bench/RESULTS.md,
/// "The precise prefix index").
pub const DEFAULT_MAX_BLOCKS_PER_SECOND: u64 = 200_000;
/// The lowest `maxBlocksPerSecond` other than 0: below it a busy engine would be cut off.
pub const MIN_MAX_BLOCKS_PER_SECOND: u64 = 1_000;
/// The highest `maxBlocksPerSecond`: a thousand times what one core ingests, and far within
/// what the token bucket's `f64` counts exactly (0 is the way to say no cap).
pub const MAX_MAX_BLOCKS_PER_SECOND: u64 = 1_000_000_000;

impl Default for KvEventsSettings {
    fn default() -> Self {
        Self {
            bind_endpoint: None,
            per_endpoint: true,
            socket_port: DEFAULT_SOCKET_PORT,
            replay_port: None,
            topic_filter: "kv@".into(),
            max_blocks_per_second: DEFAULT_MAX_BLOCKS_PER_SECOND,
        }
    }
}

/// The plugin's parameters, decoded and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PreciseParams {
    /// Tokens per block (`tokenProcessorConfig.blockSizeTokens`, 16).
    pub block_size: usize,
    /// `tokenProcessorConfig.hashSeed`.
    pub hash_seed: String,
    /// `tokenProcessorConfig.hashAlgorithm`.
    pub hash_algorithm: HashAlgorithm,
    /// The index's caps (`inMemoryConfig`) and the speculative TTL.
    pub limits: IndexLimits,
    /// Tier weights (`kvCacheBackendConfigs`).
    pub weights: TierWeights,
    /// `speculativeIndexing`.
    pub speculative_indexing: bool,
    /// `kvEventsConfig`.
    pub events: KvEventsSettings,
    /// `sharedMedia`: the media that are one store for the whole pool.
    pub shared: SharedMedia,
    /// `speculativePublishEndpoint`: where this EPP publishes its speculative entries.
    pub publish_endpoint: Option<String>,
    /// `speculativePeers`: the other EPPs' publish endpoints.
    pub peers: Vec<String>,
}

/// Peers in `speculativePeers`, at most.
pub const MAX_SPECULATIVE_PEERS: usize = 64;

impl Default for PreciseParams {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            hash_seed: String::new(),
            hash_algorithm: HashAlgorithm::CborFnv,
            limits: IndexLimits::default(),
            weights: TierWeights::default(),
            speculative_indexing: false,
            events: KvEventsSettings::default(),
            shared: SharedMedia::default(),
            publish_endpoint: None,
            peers: Vec::new(),
        }
    }
}

// The parameters as written, with llm-d's names (Go's `encoding/json` field names).

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreciseYaml {
    token_processor_config: Option<TokenProcessorYaml>,
    indexer_config: Option<IndexerYaml>,
    kv_events_config: Option<KvEventsYaml>,
    speculative_indexing: Option<bool>,
    #[serde(rename = "speculativeTTL")]
    speculative_ttl: Option<String>,
    shared_media: Option<Vec<String>>,
    speculative_publish_endpoint: Option<String>,
    speculative_peers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenProcessorYaml {
    /// Deprecated for `blockSizeTokens` (llm-d promotes it when alone).
    block_size: Option<i64>,
    block_size_tokens: Option<i64>,
    hash_seed: Option<String>,
    hash_algorithm: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexerYaml {
    kv_block_index_config: Option<BlockIndexYaml>,
    kv_cache_backend_configs: Option<Vec<BackendYaml>>,
    /// v0.3-era configs put the token processor here.
    token_processor_config: Option<TokenProcessorYaml>,
    tokenizers_pool_config: Option<yaml_serde::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BlockIndexYaml {
    in_memory_config: Option<InMemoryYaml>,
    redis_config: Option<yaml_serde::Value>,
    cost_aware_memory_config: Option<yaml_serde::Value>,
    enable_metrics: Option<bool>,
    metrics_logging_interval: Option<yaml_serde::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InMemoryYaml {
    size: Option<i64>,
    pod_cache_size: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct BackendYaml {
    name: String,
    weight: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KvEventsYaml {
    zmq_endpoint: Option<String>,
    topic_filter: Option<String>,
    concurrency: Option<i64>,
    engine_type: Option<String>,
    discover_pods: Option<bool>,
    pod_discovery_config: Option<PodDiscoveryYaml>,
    max_blocks_per_second: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodDiscoveryYaml {
    pod_label_selector: Option<String>,
    pod_namespace: Option<String>,
    socket_port: Option<i64>,
    replay_socket_port: Option<i64>,
}

impl PreciseParams {
    /// The parameters `p` describes, over llm-d's defaults. What this EPP cannot do is an error
    /// naming it; what llm-d itself ignores is a warning.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: PreciseYaml = p.decode()?;
        let mut out = Self::default();
        let indexer = y.indexer_config.unwrap_or_default();
        if indexer.tokenizers_pool_config.is_some() {
            return Err(p.invalid(
                "indexerConfig.tokenizersPoolConfig",
                "tokenization belongs to the token producer here (as in llm-d's \
                 precise-prefix-cache-producer)",
            ));
        }
        let tp = y
            .token_processor_config
            .or(indexer.token_processor_config)
            .unwrap_or_default();
        let block = match (tp.block_size_tokens, tp.block_size) {
            (Some(t), _) => p.positive("tokenProcessorConfig.blockSizeTokens", Some(t))?,
            (None, Some(b)) => p.positive("tokenProcessorConfig.blockSize", Some(b))?,
            (None, None) => None,
        };
        if let Some(b) = block {
            // A block is one CBOR array; beyond this it is not a cache block of any engine.
            if b > 1 << 16 {
                return Err(p.invalid("tokenProcessorConfig.blockSizeTokens", "at most 65536"));
            }
            out.block_size = b;
        }
        out.hash_seed = tp.hash_seed.unwrap_or_default();
        if let Some(a) = tp.hash_algorithm {
            out.hash_algorithm = HashAlgorithm::parse(&a).ok_or_else(|| {
                p.invalid(
                    "tokenProcessorConfig.hashAlgorithm",
                    format!("{a:?}: accepted values are \"cbor-fnv\" and \"xxh64\""),
                )
            })?;
        }

        let bi = indexer.kv_block_index_config.unwrap_or_default();
        if bi.redis_config.is_some() || bi.cost_aware_memory_config.is_some() {
            return Err(p.invalid(
                "indexerConfig.kvBlockIndexConfig",
                "only inMemoryConfig is implemented (no redisConfig or costAwareMemoryConfig)",
            ));
        }
        if bi
            .metrics_logging_interval
            .as_ref()
            .is_some_and(|v| !is_zero(v))
        {
            return Err(p.invalid(
                "indexerConfig.kvBlockIndexConfig.metricsLoggingInterval",
                "periodic metrics logging is not implemented; the index metrics are on /metrics",
            ));
        }
        if bi.enable_metrics == Some(false) {
            p.warn("enableMetrics: false ignored: the index metrics are always exported");
        }
        let mem = bi.in_memory_config.unwrap_or_default();
        let max_keys = p
            .positive(
                "indexerConfig.kvBlockIndexConfig.inMemoryConfig.size",
                mem.size,
            )?
            .unwrap_or(DEFAULT_MAX_KEYS);
        // Slots of the index are 32-bit.
        if max_keys > 1_000_000_000 {
            return Err(p.invalid(
                "indexerConfig.kvBlockIndexConfig.inMemoryConfig.size",
                "at most 1000000000",
            ));
        }
        let per_key = p
            .positive(
                "indexerConfig.kvBlockIndexConfig.inMemoryConfig.podCacheSize",
                mem.pod_cache_size,
            )?
            .unwrap_or(DEFAULT_MAX_ENDPOINTS_PER_KEY);
        if per_key > 1024 {
            p.warn(format_args!(
                "podCacheSize {per_key} is cut to 1024 (the endpoints one block records)"
            ));
        }
        let per_key = per_key.min(1024);
        out.limits.max_keys = max_keys;
        out.limits.max_engine_keys = max_keys;
        out.limits.max_endpoints_per_key = per_key;

        if let Some(backends) = indexer.kv_cache_backend_configs {
            // llm-d: the list replaces the defaults; an unnamed tier counts 1.0.
            let mut w = [1.0; 4];
            for b in backends {
                let Some(medium) = kv_events::Medium::parse(&b.name) else {
                    return Err(p.invalid(
                        "indexerConfig.kvCacheBackendConfigs",
                        format!("unknown tier {:?} (gpu, cpu, disk, remote)", b.name),
                    ));
                };
                if !(b.weight.is_finite() && (0.0..=1.0).contains(&b.weight)) {
                    return Err(p.invalid(
                        "indexerConfig.kvCacheBackendConfigs",
                        format!("weight of {:?} must be in [0, 1]", b.name),
                    ));
                }
                w[tier(medium)] = b.weight;
            }
            out.weights = TierWeights(w);
        }

        if let Some(on) = y.speculative_indexing {
            out.speculative_indexing = on;
        }
        if let Some(ttl) = y.speculative_ttl.filter(|s| !s.is_empty()) {
            let d = parse_duration(&ttl).ok_or_else(|| {
                p.invalid(
                    "speculativeTTL",
                    format!("not a duration (with a unit, e.g. 30s): {ttl:?}"),
                )
            })?;
            // llm-d: a non-positive TTL means the default.
            if !d.is_zero() {
                out.limits.speculative_ttl = d.min(Duration::from_secs(3600));
            }
        }

        if let Some(media) = y.shared_media {
            let mut shared = SharedMedia::NONE;
            for name in media {
                let medium = kv_events::Medium::parse(&name).ok_or_else(|| {
                    p.invalid(
                        "sharedMedia",
                        format!("unknown tier {name:?} (gpu, cpu, disk, remote)"),
                    )
                })?;
                if medium == kv_events::Medium::Gpu {
                    return Err(p.invalid(
                        "sharedMedia",
                        "gpu is each engine's own cache, never shared",
                    ));
                }
                shared = shared.with(medium);
            }
            out.shared = shared;
        }

        if let Some(e) = y.speculative_publish_endpoint.filter(|e| !e.is_empty()) {
            if let Err(why) = check_peer_endpoint(&e, true) {
                return Err(p.invalid(
                    "speculativePublishEndpoint",
                    format!("{e:?}: expected tcp://<host or *>:<port> ({why})"),
                ));
            }
            out.publish_endpoint = Some(e);
        }
        if let Some(peers) = y.speculative_peers {
            if peers.len() > MAX_SPECULATIVE_PEERS {
                return Err(p.invalid(
                    "speculativePeers",
                    format!("at most {MAX_SPECULATIVE_PEERS} peers"),
                ));
            }
            for e in &peers {
                if let Err(why) = check_peer_endpoint(e, false) {
                    return Err(p.invalid(
                        "speculativePeers",
                        format!("{e:?}: expected tcp://<host>:<port> ({why})"),
                    ));
                }
                if peers.iter().filter(|o| *o == e).count() > 1 {
                    return Err(p.invalid("speculativePeers", format!("{e:?} twice")));
                }
            }
            out.peers = peers;
        }
        if (out.publish_endpoint.is_some() || !out.peers.is_empty()) && !out.speculative_indexing {
            return Err(p.invalid(
                "speculativePeers",
                "sharing speculative entries needs speculativeIndexing: true",
            ));
        }

        let ev = y.kv_events_config.unwrap_or_default();
        if let Some(engine) = ev.engine_type.filter(|e| !e.is_empty() && e != "vllm") {
            return Err(p.invalid(
                "kvEventsConfig.engineType",
                format!("{engine:?}: only \"vllm\" events are decoded here"),
            ));
        }
        if let Some(c) = ev.concurrency {
            p.positive("kvEventsConfig.concurrency", Some(c))?;
            p.warn(
                "kvEventsConfig.concurrency has no effect: each endpoint's subscriber applies \
                 its own events in order, with no shared worker pool",
            );
        }
        let mut events = KvEventsSettings {
            bind_endpoint: ev.zmq_endpoint.filter(|e| !e.is_empty()),
            ..KvEventsSettings::default()
        };
        if let Some(t) = ev.topic_filter {
            events.topic_filter = t;
        }
        if let Some(d) = ev.discover_pods {
            events.per_endpoint = d;
        }
        if let Some(pd) = ev.pod_discovery_config {
            if pd.pod_label_selector.is_some() || pd.pod_namespace.is_some() {
                p.warn(
                    "podLabelSelector and podNamespace have no effect: subscribers follow the \
                     pool's endpoints (llm-d's router ignores them too)",
                );
            }
            if let Some(port) = pd.socket_port {
                events.socket_port =
                    port_param(p, "kvEventsConfig.podDiscoveryConfig.socketPort", port)?;
            }
            if let Some(port) = pd.replay_socket_port.filter(|p| *p > 0) {
                events.replay_port = Some(port_param(
                    p,
                    "kvEventsConfig.podDiscoveryConfig.replaySocketPort",
                    port,
                )?);
            }
        }
        if let Some(max) = ev.max_blocks_per_second {
            events.max_blocks_per_second = u64::try_from(max)
                .ok()
                .filter(|m| {
                    *m == 0 || (MIN_MAX_BLOCKS_PER_SECOND..=MAX_MAX_BLOCKS_PER_SECOND).contains(m)
                })
                .ok_or_else(|| {
                    p.invalid(
                        "kvEventsConfig.maxBlocksPerSecond",
                        format!(
                            "{max}: 0 (no cap), or {MIN_MAX_BLOCKS_PER_SECOND} to \
                             {MAX_MAX_BLOCKS_PER_SECOND}"
                        ),
                    )
                })?;
        }
        out.events = events;
        Ok(out)
    }

    /// The key hasher these parameters describe.
    pub fn hasher(&self) -> KeyHasher {
        KeyHasher::new(self.block_size, &self.hash_seed, self.hash_algorithm)
    }
}

/// `tcp://host:port` with a non-zero port (`*` as the host only where it binds), or why not.
fn check_peer_endpoint(e: &str, bind: bool) -> Result<(), String> {
    let endpoint = kv_events::TcpEndpoint::parse(e).map_err(|why| why.to_string())?;
    if endpoint.port == 0 {
        return Err("port 0".to_owned());
    }
    if !bind && endpoint.host == kv_events::TcpHost::Any {
        return Err("* only where this EPP binds".to_owned());
    }
    Ok(())
}

fn port_param(p: &Params<'_>, name: &'static str, port: i64) -> Result<u16, ConfigError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| p.invalid(name, format!("not a port: {port}")))
}

/// Go durations come as strings or nanoseconds; an empty string is the interval left unset.
fn is_zero(v: &yaml_serde::Value) -> bool {
    match v {
        yaml_serde::Value::Null => true,
        yaml_serde::Value::Number(n) => n.as_f64() == Some(0.0),
        yaml_serde::Value::String(s) => {
            s.trim().is_empty() || parse_duration(s).is_some_and(|d| d.is_zero())
        }
        _ => false,
    }
}

/// What the precise index says of one request, for every candidate, merged with the approximate
/// index for the endpoints whose stream is not healthy.
#[derive(Debug, Clone, Default)]
pub struct PreciseMatch {
    /// The request's keys.
    pub keys: Vec<u64>,
    /// The lookup, by endpoint id.
    pub lookup: Lookup,
    /// By endpoint id: whether its event stream was healthy when the request was scheduled
    /// (trusted endpoints are scored from `lookup`, the others from the approximate index).
    pub trusted: Vec<bool>,
    /// Tokens per block.
    pub block_tokens: usize,
}

impl PreciseMatch {
    /// Whether the precise index was used for an endpoint.
    pub fn is_trusted(&self, endpoint: &Endpoint) -> bool {
        self.trusted
            .get(endpoint.id.0 as usize)
            .copied()
            .unwrap_or(false)
    }

    /// The endpoint's prefix score in `[0, 1]`: precise when trusted, else the approximate one.
    pub fn score(&self, endpoint: &Endpoint, approx: Option<&PrefixMatch>) -> f64 {
        if self.is_trusted(endpoint) {
            self.lookup.score(endpoint.id)
        } else {
            approx.map_or(0.0, |m| m.score(endpoint))
        }
    }

    /// Prompt tokens the endpoint caches, per the same rule.
    pub fn cached_tokens(&self, endpoint: &Endpoint, approx: Option<&PrefixMatch>) -> u64 {
        if self.is_trusted(endpoint) {
            u64::from(self.lookup.of(endpoint.id).blocks).saturating_mul(self.block_tokens as u64)
        } else {
            approx.map_or(0, |m| m.matched_tokens(endpoint))
        }
    }

    /// Where the endpoint would get its cached prompt tokens, by tier. A trusted endpoint: its
    /// own tiers (a medium that is not shared but not GPU, CPU or disk either, i.e. `REMOTE`
    /// with `sharedMedia: []`, is read like the store) and the store's blocks it holds no
    /// copy of. Any other: the approximate index's tokens as GPU ones, and the store's run
    /// beyond them. No peer (the caller adds it).
    pub fn tier_tokens(&self, endpoint: &Endpoint, approx: Option<&PrefixMatch>) -> TierTokens {
        let bt = self.block_tokens as u64;
        let tokens = |blocks: u32| u64::from(blocks).saturating_mul(bt);
        if self.is_trusted(endpoint) {
            let m = self.lookup.of(endpoint.id);
            TierTokens {
                gpu: tokens(m.by_tier[tier(Medium::Gpu)]),
                cpu: tokens(m.by_tier[tier(Medium::Cpu)]),
                disk: tokens(m.by_tier[tier(Medium::Disk)]),
                shared: tokens(m.shared + m.by_tier[tier(Medium::Remote)]),
                ..TierTokens::default()
            }
        } else {
            let gpu = approx.map_or(0, |m| m.matched_tokens(endpoint));
            TierTokens {
                gpu,
                shared: tokens(self.lookup.shared_run).saturating_sub(gpu),
                ..TierTokens::default()
            }
        }
    }

    /// Prompt tokens a peer could pull from the endpoint: the leading run its engine has
    /// announced in its own tiers (never the shared store nor speculative entries); none when
    /// its stream is not trusted. The approximate index would name it from this EPP's own
    /// routing history, as unproven as a speculative entry (a request routed there
    /// milliseconds ago, an engine whose connection just closed): a pull of blocks it has not
    /// computed loads nothing. Scoring still falls back to it ([`PreciseMatch::score`]).
    pub fn source_tokens(&self, endpoint: &Endpoint) -> u64 {
        if self.is_trusted(endpoint) {
            u64::from(self.lookup.of(endpoint.id).local_run)
                .saturating_mul(self.block_tokens as u64)
        } else {
            0
        }
    }

    /// Cached prompt tokens per tier (GPU, CPU, disk, remote) on a trusted endpoint, the
    /// shared store's blocks it holds no copy of counted as remote; `None` for an endpoint
    /// scored from the approximate index (which knows no tiers).
    pub fn cached_tokens_by_tier(&self, endpoint: &Endpoint) -> Option<[u64; 4]> {
        self.is_trusted(endpoint).then(|| {
            let m = self.lookup.of(endpoint.id);
            let mut out = [0u64; 4];
            for medium in MEDIA {
                let t = tier(medium);
                out[t] = u64::from(m.by_tier[t]).saturating_mul(self.block_tokens as u64);
            }
            out[tier(Medium::Remote)] += u64::from(m.shared) * self.block_tokens as u64;
            out
        })
    }
}

/// The producer half: owns the index, computes and looks up each request's keys, and makes
/// speculative entries for the chosen endpoints.
#[derive(Debug)]
pub struct PrecisePrefixCacheProducer {
    /// Configured name (the scorer's).
    pub name: String,
    /// Parameters.
    pub params: PreciseParams,
    index: Arc<SharedKvIndex>,
    peers: Arc<PeerOutbox>,
}
plugin_named!(PrecisePrefixCacheProducer, "precise-prefix-cache-scorer");

impl PrecisePrefixCacheProducer {
    /// A producer with an empty index.
    pub fn new(name: impl Into<String>, params: PreciseParams) -> Self {
        let index = Arc::new(SharedKvIndex::new(params.hasher(), params.limits));
        Self {
            name: name.into(),
            params,
            index,
            peers: Arc::default(),
        }
    }

    /// The index the event subscribers feed.
    pub fn index(&self) -> &Arc<SharedKvIndex> {
        &self.index
    }

    /// Where routed requests go for the peers (`speculativePublishEndpoint`).
    pub fn peer_outbox(&self) -> &Arc<PeerOutbox> {
        &self.peers
    }
}

impl DataProducer for PrecisePrefixCacheProducer {
    fn produce(
        &self,
        request: &InferenceRequest,
        candidates: &[Candidate],
        state: &mut CycleState,
    ) {
        let Some(tokens) = request.token_ids.as_deref() else {
            // Nothing to look up: every endpoint is scored from the approximate index.
            state.precise = None;
            return;
        };
        if request.cache_salt.as_deref().is_some_and(|s| !s.is_empty()) {
            // Nothing in the precise index can serve a salted request: vLLM folds the salt into
            // its first block's hash (so into every block's after it), and the index takes no
            // block whose hash has extra keys (`kv_events::codec`, "Strict and lenient"), the
            // salt's included, since `BlockStored` does not carry them to it. Keys salted here
            // would match nothing and score every trusted endpoint 0; unsalted ones would match
            // blocks the engine cannot reuse for it. Scored from the approximate index instead,
            // whose chains the salt seeds (routing history, not engine truth).
            state.precise = None;
            return;
        }
        let hasher = self.index.hasher();
        let keys = hasher.prompt_keys(&request.target_model, None, tokens, MAX_LOOKUP_BLOCKS);
        let mut lookup = Lookup::default();
        let now = state.now;
        // Whose streams are healthy, by id, read once (and not under the index's lock): a
        // candidate is scored from the index only when its own is, and a block in the shared
        // store counts only when announced by an endpoint whose stream is.
        let healthy: Vec<bool> = self
            .index
            .with_streams(|streams| streams.iter().map(|s| s.is_healthy(now)).collect());
        let is_healthy = |id: EndpointId| healthy.get(id.0 as usize).copied().unwrap_or(false);
        self.index.read(now, |index| {
            index.lookup(
                &keys,
                candidates.iter().map(|c| c.endpoint.id),
                &self.params.weights,
                self.params.shared,
                is_healthy,
                &mut lookup,
            )
        });
        let mut trusted = vec![false; lookup.by_endpoint.len()];
        for c in candidates {
            if let Some(t) = trusted.get_mut(c.endpoint.id.0 as usize) {
                *t = is_healthy(c.endpoint.id);
            }
        }
        state.precise = Some(PreciseMatch {
            keys,
            lookup,
            trusted,
            block_tokens: hasher.block_size(),
        });
    }

    fn pre_request(&self, _: &InferenceRequest, state: &CycleState, targets: &[Candidate]) {
        if !self.params.speculative_indexing {
            return;
        }
        let Some(m) = &state.precise else { return };
        let publish = self.params.publish_endpoint.is_some();
        for t in targets {
            self.index.speculate(t.endpoint.id, &m.keys, state.now);
            if publish {
                self.peers.offer(t.endpoint.spec.address, &m.keys);
            }
        }
    }

    fn pool_changed(&self, snapshot: &PoolSnapshot) {
        let live: std::collections::HashSet<_> = snapshot.endpoints.iter().map(|e| e.id).collect();
        self.index.retain_endpoints(|id| live.contains(&id));
    }

    fn index_entries(&self) -> Option<usize> {
        Some(self.index.len())
    }
}

/// The scorer half.
#[derive(Debug)]
pub struct PrecisePrefixCacheScorer {
    /// Configured name.
    pub name: String,
    /// Its producer.
    pub producer: Arc<PrecisePrefixCacheProducer>,
}
plugin_named!(PrecisePrefixCacheScorer, "precise-prefix-cache-scorer");

impl PrecisePrefixCacheScorer {
    /// The scorer and its producer, from the plugin's `parameters`.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let params = PreciseParams::from_params(p)?;
        Ok(Self {
            name: p.name(),
            producer: Arc::new(PrecisePrefixCacheProducer::new(p.name(), params)),
        })
    }
}

impl Scorer for PrecisePrefixCacheScorer {
    fn score(&self, _: &InferenceRequest, state: &CycleState, c: &[Candidate], scores: &mut [f64]) {
        let approx = state.prefix.as_ref();
        for (s, c) in scores.iter_mut().zip(c) {
            *s = match &state.precise {
                Some(m) => m.score(&c.endpoint, approx),
                None => approx.map_or(0.0, |m| m.score(&c.endpoint)),
            };
        }
    }
}

#[cfg(test)]
mod tests;

/// Review (M2): salted requests were looked up under salted keys that no event names (score
/// 0 on every trusted endpoint), while blocks salted requests stored were indexed under plain
/// keys. Now salted blocks are not indexed (`kv_events::codec`) and salted requests are scored
/// from the approximate index.
#[cfg(test)]
mod salt_tests {
    use std::sync::Arc;

    use crate::kv_index::StreamState;
    use kv_events::{BlockStored, Event, EventBatch, Medium};
    use tokio::time::Instant;

    use super::*;
    use crate::scheduling::plugins::prefix::{ApproxPrefixCacheProducer, PrefixParams};
    use crate::scheduling::plugins::test_util::{candidates, metrics};

    #[test]
    fn a_salted_request_is_scored_from_routing_history() {
        let params = PreciseParams {
            block_size: 4,
            ..PreciseParams::default()
        };
        let producer = PrecisePrefixCacheProducer::new("p", params);
        let approx = ApproxPrefixCacheProducer::new("a", PrefixParams::default());
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let now = Instant::now();
        // Endpoint 0's engine holds the prompt's two blocks, as an unsalted request left them.
        let tokens: Vec<u32> = (0..8).collect();
        let stored = EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: vec![1, 2],
                parent_block_hash: None,
                token_ids: tokens.clone(),
                block_size: 4,
                lora_id: None,
                lora_name: None,
                medium: Medium::Gpu,
                group: None,
            })],
            data_parallel_rank: None,
        };
        producer
            .index()
            .set_stream(c[0].endpoint.id, StreamState::Live);
        producer.index().apply(c[0].endpoint.id, "m", &stored, now);
        let request = |salt: Option<&str>| InferenceRequest {
            target_model: "m".into(),
            token_ids: Some(Arc::from(tokens.clone())),
            cache_salt: salt.map(str::to_owned),
            ..Default::default()
        };

        let mut state = CycleState::new(now);
        producer.produce(&request(None), &c, &mut state);
        let m = state.precise.as_ref().unwrap();
        assert_eq!(m.cached_tokens_by_tier(&c[0].endpoint), Some([8, 0, 0, 0]));

        // Salted: those blocks cannot serve it, and nothing salted is in the index.
        let mut state = CycleState::new(now);
        approx.produce(&request(Some("tenant-a")), &c, &mut state);
        producer.produce(&request(Some("tenant-a")), &c, &mut state);
        assert!(state.precise.is_none(), "scored from the approximate index");
        // An empty salt is no salt (vLLM's `if request.cache_salt`).
        let mut state = CycleState::new(now);
        producer.produce(&request(Some("")), &c, &mut state);
        assert!(state.precise.is_some());
    }
}
