//! Loading `EndpointPickerConfig` YAML into a ready scheduler.
//!
//! The document format, plugin type names and parameter names are the reference EPP's (GIE
//! `inference.networking.x-k8s.io/v1alpha1` and llm-d `llm-d.ai/v1alpha1`), and so are the
//! defaulting rules: a lone profile gets a `single-profile-handler`, a profile without a picker
//! gets a `max-score-picker`, a scorer without a weight weighs 1, no profiles means one
//! `default` profile holding every filter, scorer and picker, a `prefix-cache-scorer` gets an
//! `approx-prefix-cache-producer`, and the saturation detector is a `utilization-detector`.
//!
//! Every mistake is an error that names the plugin, profile or parameter at fault. Unknown
//! *parameters* are warnings, not errors: the reference ignores them, and a config that loads
//! there must load here.

pub mod profiles;
pub mod types;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::saturation::UtilizationDetector;
use crate::scheduling::plugins::filters::{HeaderBasedTestingFilter, LabelSelectorFilter};
use crate::scheduling::plugins::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use crate::scheduling::plugins::prefix::{ApproxPrefixCacheProducer, PrefixParams};
use crate::scheduling::plugins::profile::SingleProfileHandler;
use crate::scheduling::plugins::scorers::{
    ActiveRequestScorer, KvCacheUtilizationScorer, LoadAwareScorer, LoraAffinityScorer,
    NoHitLruScorer, PrefixCacheScorer, QueueScorer, RunningRequestsScorer,
};
use crate::scheduling::{DataProducer, Filter, Picker, Profile, ProfileHandler, Scheduler, Scorer};
use crate::scrape::{EngineMapping, MetricSpec, engine::CacheInfoSpec};
pub use types::{API_VERSIONS, EndpointPickerConfig};

/// The configuration used when none is given: queue ×2, KV ×2, prefix ×3, max-score picker.
pub const DEFAULT_CONFIG: &str = "\
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
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
";

/// Response header set by the `destination-endpoint-served-verifier` test plugin.
pub const SERVED_ENDPOINT_TEST_HEADER: &str = "x-conformance-test-served-endpoint";

/// A configuration problem. Each names what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, or not the shape of an `EndpointPickerConfig`.
    #[error("invalid EndpointPickerConfig: {0}")]
    Yaml(#[source] serde_yaml::Error),
    /// Wrong or missing `apiVersion`.
    #[error("unsupported apiVersion {0:?}: expected one of {API_VERSIONS:?}")]
    ApiVersion(String),
    /// Wrong `kind`.
    #[error("unsupported kind {0:?}: expected \"EndpointPickerConfig\"")]
    Kind(String),
    /// A plugin type nobody registered.
    #[error("plugin {name:?}: unknown type {type_name:?}; known types: {known}")]
    UnknownType {
        /// Instance name.
        name: String,
        /// The unknown type.
        type_name: String,
        /// Comma-separated known types.
        known: String,
    },
    /// Parameters of the wrong shape or type.
    #[error("plugin {name:?} ({type_name}): invalid parameters: {source}")]
    Parameters {
        /// Instance name.
        name: String,
        /// Its type.
        type_name: String,
        /// What serde said.
        #[source]
        source: serde_yaml::Error,
    },
    /// A parameter with an out-of-range value.
    #[error("plugin {name:?} ({type_name}): parameter {parameter}: {reason}")]
    InvalidParameter {
        /// Instance name.
        name: String,
        /// Its type.
        type_name: String,
        /// The parameter.
        parameter: &'static str,
        /// Why it is wrong.
        reason: String,
    },
    /// Two plugins with the same name.
    #[error("duplicate plugin name {0:?}")]
    DuplicatePlugin(String),
    /// Two profiles with the same name.
    #[error("duplicate scheduling profile name {0:?}")]
    DuplicateProfile(String),
    /// A reference to a plugin that is not declared.
    #[error("{context} references undeclared plugin {plugin:?}")]
    UnknownRef {
        /// Where the reference is.
        context: String,
        /// The missing name.
        plugin: String,
    },
    /// A plugin used where its type does not fit.
    #[error("{context}: plugin {plugin:?} of type {type_name} cannot be used here ({expected})")]
    WrongRole {
        /// Where.
        context: String,
        /// Plugin name.
        plugin: String,
        /// Plugin type.
        type_name: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A profile with two pickers.
    #[error("scheduling profile {0:?} has more than one picker")]
    MultiplePickers(String),
    /// A bad weight.
    #[error("scheduling profile {profile:?}: weight of {plugin:?} must be a finite number ≥ 0")]
    Weight {
        /// Profile.
        profile: String,
        /// Scorer.
        plugin: String,
    },
    /// Several profiles and no handler, or several handlers.
    #[error("{0}")]
    ProfileHandler(String),
}

/// A response-path plugin.
pub trait ResponsePlugin: Send + Sync + std::fmt::Debug {
    /// Headers to add to the response, given the endpoint that served it (if Envoy said).
    fn response_headers(&self, served_endpoint: Option<&str>) -> Vec<(String, String)>;
}

/// `destination-endpoint-served-verifier` (conformance only): echoes the served endpoint
/// Envoy reported into a response header.
#[derive(Debug)]
pub struct DestinationEndpointServedVerifier;

impl ResponsePlugin for DestinationEndpointServedVerifier {
    fn response_headers(&self, served: Option<&str>) -> Vec<(String, String)> {
        let value = match served {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => "fail: missing destination endpoint served metadata".to_owned(),
        };
        vec![(SERVED_ENDPOINT_TEST_HEADER.to_owned(), value)]
    }
}

/// How engine metrics are scraped, as configured by `metrics-data-source` and
/// `core-metrics-extractor`.
#[derive(Debug, Clone)]
pub struct ScrapeSettings {
    /// `http` or `https`.
    pub scheme: String,
    /// Metrics path.
    pub path: String,
    /// Pod label naming the engine (checked before the well-known ones).
    pub engine_label_key: Option<String>,
    /// Engine used without a label.
    pub default_engine: String,
    /// Mappings by engine name.
    pub engines: Vec<EngineMapping>,
}

impl Default for ScrapeSettings {
    fn default() -> Self {
        Self {
            scheme: "http".into(),
            path: "/metrics".into(),
            engine_label_key: None,
            default_engine: "vllm".into(),
            engines: EngineMapping::builtin(),
        }
    }
}

/// A loaded configuration, ready to serve.
#[derive(Debug)]
pub struct LoadedConfig {
    /// The scheduler.
    pub scheduler: Arc<Scheduler>,
    /// The saturation detector used for admission.
    pub saturation_detector: Arc<UtilizationDetector>,
    /// Response-path plugins.
    pub response_plugins: Vec<Arc<dyn ResponsePlugin>>,
    /// Scrape settings.
    pub scrape: ScrapeSettings,
    /// Enabled feature gates.
    pub feature_gates: Vec<String>,
    /// The prefix producers (for metrics of the index).
    pub prefix_producers: Vec<Arc<ApproxPrefixCacheProducer>>,
    /// Non-fatal remarks (unknown parameters, accepted-but-inert plugins).
    pub warnings: Vec<String>,
    /// `(name, type)` of every plugin instance, for logs and metrics.
    pub plugins: Vec<(String, &'static str)>,
}

/// Loads the default configuration.
pub fn load_default(seed: u64) -> Result<LoadedConfig, ConfigError> {
    load(DEFAULT_CONFIG, seed)
}

/// Parses and builds a configuration. `seed` seeds the scheduler's RNG.
pub fn load(text: &str, seed: u64) -> Result<LoadedConfig, ConfigError> {
    let doc: EndpointPickerConfig = serde_yaml::from_str(text).map_err(ConfigError::Yaml)?;
    build(doc, seed)
}

enum Role {
    Filter(Arc<dyn Filter>),
    Scorer(Arc<dyn Scorer>),
    Picker(Arc<dyn Picker>),
    Handler(Arc<dyn ProfileHandler>),
    Producer(Arc<ApproxPrefixCacheProducer>),
    Detector(Arc<UtilizationDetector>),
    Response(Arc<dyn ResponsePlugin>),
    MetricsSource,
    MetricsExtractor,
    /// Accepted for compatibility; does nothing here.
    Inert,
}

impl Role {
    fn describe(&self) -> &'static str {
        match self {
            Role::Filter(_) | Role::Detector(_) => "filter",
            Role::Scorer(_) => "scorer",
            Role::Picker(_) => "picker",
            Role::Handler(_) => "profile handler",
            Role::Producer(_) => "data producer",
            Role::Response(_) => "response plugin",
            Role::MetricsSource | Role::MetricsExtractor => "data layer plugin",
            Role::Inert => "inert plugin",
        }
    }
}

struct Instance {
    name: String,
    type_name: &'static str,
    role: Role,
}

/// Types accepted and ignored, with the reason logged as a warning.
const INERT_TYPES: &[(&str, &str)] = &[
    ("openai-parser", "the OpenAI parser is built in"),
    (
        "inflight-load-producer",
        "in-flight counts are always tracked",
    ),
    ("k8s-notification-source", "discovery is built in"),
    ("endpoint-notification-source", "discovery is built in"),
    (
        "global-strict-fairness-policy",
        "flow control is not implemented yet",
    ),
    (
        "round-robin-fairness-policy",
        "flow control is not implemented yet",
    ),
    (
        "fcfs-ordering-policy",
        "flow control is not implemented yet",
    ),
    ("edf-ordering-policy", "flow control is not implemented yet"),
    (
        "static-usage-limit-policy",
        "flow control is not implemented yet",
    ),
];

const KNOWN_TYPES: &[&str] = &[
    "single-profile-handler",
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "kv-cache-scorer",
    "running-requests-size-scorer",
    "prefix-cache-scorer",
    "approx-prefix-cache-producer",
    "lora-affinity-scorer",
    "load-aware-scorer",
    "active-request-scorer",
    "no-hit-lru-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "utilization-detector",
    "header-based-testing-filter",
    "label-selector-filter",
    "by-label-selector",
    "by-label",
    "destination-endpoint-served-verifier",
    "metrics-data-source",
    "core-metrics-extractor",
];

struct Ctx<'a> {
    name: &'a str,
    type_name: &'static str,
    warnings: &'a mut Vec<String>,
}

impl Ctx<'_> {
    /// Deserializes parameters, warning about (not rejecting) unknown keys.
    fn params<T: DeserializeOwned + Default>(
        &mut self,
        value: Option<&serde_yaml::Value>,
    ) -> Result<T, ConfigError> {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Ok(T::default());
        };
        let mut unknown = Vec::new();
        let parsed: T =
            serde_ignored::deserialize(value.clone(), |path| unknown.push(path.to_string()))
                .map_err(|source| ConfigError::Parameters {
                    name: self.name.to_owned(),
                    type_name: self.type_name.to_owned(),
                    source,
                })?;
        for p in unknown {
            self.warnings.push(format!(
                "plugin {:?} ({}): unknown parameter {p:?} ignored",
                self.name, self.type_name
            ));
        }
        Ok(parsed)
    }

    fn invalid(&self, parameter: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidParameter {
            name: self.name.to_owned(),
            type_name: self.type_name.to_owned(),
            parameter,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PickerParams {
    max_num_of_endpoints: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PrefixYaml {
    auto_tune: Option<bool>,
    block_size_tokens: Option<i64>,
    /// Deprecated character block size (only with `blockSizeTokens`).
    block_size: Option<i64>,
    /// v1.0–v1.3 scorer parameter: characters per block.
    hash_block_size: Option<i64>,
    max_prefix_blocks_to_match: Option<i64>,
    max_prefix_tokens_to_match: Option<i64>,
    lru_capacity_per_server: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DetectorYaml {
    queue_depth_threshold: Option<f64>,
    kv_cache_util_threshold: Option<f64>,
    metrics_staleness_threshold: Option<String>,
    headroom: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadAwareYaml {
    threshold: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ActiveRequestYaml {
    idle_threshold: Option<i64>,
    max_busy_score: Option<f64>,
    /// Deprecated upstream and ignored there too (in-flight requests end with their stream).
    request_timeout: Option<String>,
    /// Names upstream's in-flight producer; the counts here are always the director's.
    in_flight_load_producer_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NoHitLruYaml {
    lru_size: Option<i64>,
    /// Never used upstream; accepted so that its configs load.
    prefix_plugin_type: Option<String>,
    /// Never used upstream; accepted so that its configs load.
    prefix_plugin_name: Option<String>,
    /// Names upstream's prefix producer; here the profile's prefix producer is used.
    prefix_match_info_producer_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelectorYaml {
    #[serde(default)]
    match_labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetricsSourceYaml {
    scheme: Option<String>,
    path: Option<String>,
    insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExtractorYaml {
    engine_label_key: Option<String>,
    default_engine: Option<String>,
    #[serde(default)]
    engine_configs: Vec<EngineConfigYaml>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EngineConfigYaml {
    name: String,
    queued_requests_spec: Option<String>,
    running_requests_spec: Option<String>,
    kv_usage_spec: Option<String>,
    #[serde(alias = "loraRequestInfoSpec")]
    lora_spec: Option<String>,
    cache_info_spec: Option<String>,
}

fn positive(
    ctx: &Ctx<'_>,
    parameter: &'static str,
    v: Option<i64>,
) -> Result<Option<usize>, ConfigError> {
    match v {
        None => Ok(None),
        Some(n) if n > 0 => Ok(Some(n as usize)),
        Some(n) => Err(ctx.invalid(parameter, format!("must be > 0, got {n}"))),
    }
}

fn prefix_params(
    ctx: &mut Ctx<'_>,
    value: Option<&serde_yaml::Value>,
) -> Result<PrefixParams, ConfigError> {
    let y: PrefixYaml = ctx.params(value)?;
    let mut p = PrefixParams::default();
    if let Some(a) = y.auto_tune {
        p.auto_tune = a;
    }
    if let Some(t) = positive(ctx, "blockSizeTokens", y.block_size_tokens)? {
        p.block_size_tokens = t;
    }
    if y.block_size.is_some() && y.block_size_tokens.is_none() {
        return Err(ctx.invalid(
            "blockSize",
            "deprecated character block size; set blockSizeTokens instead",
        ));
    }
    if let Some(c) = positive(ctx, "hashBlockSize", y.hash_block_size)? {
        // The v1.0–v1.3 scorer hashed fixed character blocks and did not auto-tune.
        p.block_chars = Some(c);
        p.auto_tune = y.auto_tune.unwrap_or(false);
    }
    if let Some(b) = positive(ctx, "maxPrefixBlocksToMatch", y.max_prefix_blocks_to_match)? {
        p.max_prefix_blocks = b;
    }
    match y.max_prefix_tokens_to_match {
        Some(n) if n < 0 => return Err(ctx.invalid("maxPrefixTokensToMatch", "must be ≥ 0")),
        Some(n) => p.max_prefix_tokens = n as usize,
        None => {}
    }
    if let Some(c) = positive(ctx, "lruCapacityPerServer", y.lru_capacity_per_server)? {
        p.lru_capacity_per_server = c;
    }
    Ok(p)
}

/// Parses a Go-style duration (`200ms`, `2s`, `1m30s`, `1.5h`) or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    // `try_from_secs_f64` refuses negative, NaN and too large values, where `from_secs_f64`
    // panics on values past `Duration::MAX` (`1e300`).
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

fn instantiate(
    spec: &types::PluginSpec,
    warnings: &mut Vec<String>,
) -> Result<Instance, ConfigError> {
    let name = spec.effective_name().to_owned();
    let raw_type = spec.type_name.as_str();
    if let Some((t, why)) = INERT_TYPES.iter().find(|(t, _)| *t == raw_type) {
        warnings.push(format!("plugin {name:?} ({t}) accepted but inert: {why}"));
        return Ok(Instance {
            name,
            type_name: t,
            role: Role::Inert,
        });
    }
    let Some(&type_name) = KNOWN_TYPES.iter().find(|t| **t == raw_type) else {
        let mut known: Vec<&str> = KNOWN_TYPES.to_vec();
        known.extend(INERT_TYPES.iter().map(|(t, _)| *t));
        return Err(ConfigError::UnknownType {
            name,
            type_name: raw_type.to_owned(),
            known: known.join(", "),
        });
    };
    let params = spec.parameters.as_ref();
    let mut ctx = Ctx {
        name: &name,
        type_name,
        warnings,
    };
    let n = name.clone();
    let role = match type_name {
        "single-profile-handler" => {
            let _: serde_yaml::Value = ctx.params(params)?;
            Role::Handler(Arc::new(SingleProfileHandler { name: n }))
        }
        "queue-scorer" => Role::Scorer(Arc::new(QueueScorer { name: n })),
        "kv-cache-utilization-scorer" | "kv-cache-scorer" => {
            Role::Scorer(Arc::new(KvCacheUtilizationScorer { name: n }))
        }
        "running-requests-size-scorer" => Role::Scorer(Arc::new(RunningRequestsScorer { name: n })),
        "lora-affinity-scorer" => Role::Scorer(Arc::new(LoraAffinityScorer { name: n })),
        "prefix-cache-scorer" => Role::Scorer(Arc::new(PrefixCacheScorer { name: n })),
        "load-aware-scorer" => {
            let y: LoadAwareYaml = ctx.params(params)?;
            let threshold = positive(&ctx, "threshold", y.threshold)?.unwrap_or(128) as u64;
            Role::Scorer(Arc::new(LoadAwareScorer { name: n, threshold }))
        }
        "active-request-scorer" => {
            let y: ActiveRequestYaml = ctx.params(params)?;
            if y.request_timeout.is_some() {
                ctx.warnings.push(format!(
                    "plugin {n:?} (active-request-scorer): requestTimeout is deprecated and ignored; a request stops counting when its stream ends"
                ));
            }
            let _ = y.in_flight_load_producer_name;
            let idle_threshold = match y.idle_threshold {
                Some(t) if t < 0 => return Err(ctx.invalid("idleThreshold", "must be ≥ 0")),
                Some(t) => t as u64,
                None => 0,
            };
            let max_busy_score = match y.max_busy_score {
                Some(m) if !(0.0..=1.0).contains(&m) => {
                    return Err(ctx.invalid("maxBusyScore", "must be in [0, 1]"));
                }
                Some(m) => m,
                None => 1.0,
            };
            Role::Scorer(Arc::new(ActiveRequestScorer {
                name: n,
                idle_threshold,
                max_busy_score,
            }))
        }
        "no-hit-lru-scorer" => {
            let y: NoHitLruYaml = ctx.params(params)?;
            let _ = (
                y.prefix_plugin_type,
                y.prefix_plugin_name,
                y.prefix_match_info_producer_name,
            );
            let lru_size = positive(&ctx, "lruSize", y.lru_size)?.unwrap_or(1024);
            Role::Scorer(Arc::new(NoHitLruScorer::new(n, lru_size)))
        }
        "approx-prefix-cache-producer" => {
            let p = prefix_params(&mut ctx, params)?;
            Role::Producer(Arc::new(ApproxPrefixCacheProducer::new(n, p)))
        }
        "max-score-picker" | "random-picker" | "weighted-random-picker" => {
            let y: PickerParams = ctx.params(params)?;
            let max_endpoints =
                positive(&ctx, "maxNumOfEndpoints", y.max_num_of_endpoints)?.unwrap_or(1);
            Role::Picker(match type_name {
                "max-score-picker" => Arc::new(MaxScorePicker {
                    name: n,
                    max_endpoints,
                }),
                "random-picker" => Arc::new(RandomPicker {
                    name: n,
                    max_endpoints,
                }),
                _ => Arc::new(WeightedRandomPicker {
                    name: n,
                    max_endpoints,
                }),
            })
        }
        "utilization-detector" => {
            let y: DetectorYaml = ctx.params(params)?;
            let mut d = UtilizationDetector {
                name: n,
                ..Default::default()
            };
            if let Some(q) = y.queue_depth_threshold {
                if !(q.is_finite() && q > 0.0) {
                    return Err(ctx.invalid("queueDepthThreshold", "must be > 0"));
                }
                d.queue_depth_threshold = q;
            }
            if let Some(kv) = y.kv_cache_util_threshold {
                if !(kv > 0.0 && kv <= 1.0) {
                    return Err(ctx.invalid("kvCacheUtilThreshold", "must be in (0, 1]"));
                }
                d.kv_cache_util_threshold = kv;
            }
            if let Some(s) = y.metrics_staleness_threshold {
                d.metrics_staleness_threshold = parse_duration(&s).ok_or_else(|| {
                    ctx.invalid(
                        "metricsStalenessThreshold",
                        format!("not a duration: {s:?}"),
                    )
                })?;
            }
            if let Some(h) = y.headroom {
                if !(h.is_finite() && h >= 0.0) {
                    return Err(ctx.invalid("headroom", "must be ≥ 0"));
                }
                d.headroom = h;
            }
            Role::Detector(Arc::new(d))
        }
        "header-based-testing-filter" => {
            Role::Filter(Arc::new(HeaderBasedTestingFilter { name: n }))
        }
        "label-selector-filter" | "by-label-selector" | "by-label" => {
            let y: LabelSelectorYaml = ctx.params(params)?;
            Role::Filter(Arc::new(LabelSelectorFilter {
                name: n,
                match_labels: y.match_labels.into_iter().collect(),
            }))
        }
        "destination-endpoint-served-verifier" => {
            Role::Response(Arc::new(DestinationEndpointServedVerifier))
        }
        "metrics-data-source" => Role::MetricsSource,
        "core-metrics-extractor" => Role::MetricsExtractor,
        _ => Role::Inert,
    };
    Ok(Instance {
        name,
        type_name,
        role,
    })
}

fn engine_from_yaml(y: &EngineConfigYaml, ctx: &Ctx<'_>) -> Result<EngineMapping, ConfigError> {
    let spec = |p: &'static str, s: &Option<String>| -> Result<Vec<MetricSpec>, ConfigError> {
        match s {
            None => Ok(Vec::new()),
            Some(s) => Ok(vec![s.parse().map_err(
                |e: crate::scrape::engine::SpecError| ctx.invalid(p, e.to_string()),
            )?]),
        }
    };
    let cache_info = match &y.cache_info_spec {
        None => None,
        Some(s) => Some(CacheInfoSpec::Labels {
            metric: s.parse().map_err(|e: crate::scrape::engine::SpecError| {
                ctx.invalid("cacheInfoSpec", e.to_string())
            })?,
            block_size_label: "block_size".into(),
            num_blocks_label: "num_gpu_blocks".into(),
        }),
    };
    Ok(EngineMapping {
        name: y.name.clone(),
        queued: spec("queuedRequestsSpec", &y.queued_requests_spec)?,
        running: spec("runningRequestsSpec", &y.running_requests_spec)?,
        kv_usage: spec("kvUsageSpec", &y.kv_usage_spec)?,
        lora_info: spec("loraSpec", &y.lora_spec)?.into_iter().next(),
        cache_info,
    })
}

fn build(doc: EndpointPickerConfig, seed: u64) -> Result<LoadedConfig, ConfigError> {
    match doc.api_version.as_deref() {
        Some(v) if API_VERSIONS.contains(&v) => {}
        other => return Err(ConfigError::ApiVersion(other.unwrap_or("").to_owned())),
    }
    match doc.kind.as_deref() {
        Some("EndpointPickerConfig") => {}
        other => return Err(ConfigError::Kind(other.unwrap_or("").to_owned())),
    }
    let mut warnings = Vec::new();
    if doc.flow_control.is_some() || doc.feature_gates.iter().any(|g| g == "flowControl") {
        warnings.push("flowControl is accepted but not implemented yet: requests are admitted or shed, never queued".into());
    }
    if doc
        .parser
        .as_ref()
        .is_some_and(|p| p.plugin_ref != "openai-parser")
    {
        warnings.push("only the OpenAI parser is implemented; parser reference ignored".into());
    }

    let mut instances: Vec<Instance> = Vec::with_capacity(doc.plugins.len() + 4);
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut scrape = ScrapeSettings::default();
    for spec in &doc.plugins {
        let inst = instantiate(spec, &mut warnings)?;
        if by_name.insert(inst.name.clone(), instances.len()).is_some() {
            return Err(ConfigError::DuplicatePlugin(inst.name));
        }
        let mut ctx = Ctx {
            name: &inst.name,
            type_name: inst.type_name,
            warnings: &mut warnings,
        };
        match inst.role {
            Role::MetricsSource => {
                let y: MetricsSourceYaml = ctx.params(spec.parameters.as_ref())?;
                if let Some(s) = y.scheme {
                    if s != "http" && s != "https" {
                        return Err(
                            ctx.invalid("scheme", format!("must be http or https, got {s:?}"))
                        );
                    }
                    if s == "https" {
                        ctx.warnings.push("metrics-data-source: https scraping is not implemented yet; using http".into());
                    }
                    scrape.scheme = "http".into();
                }
                if let Some(p) = y.path {
                    scrape.path = if p.starts_with('/') {
                        p
                    } else {
                        format!("/{p}")
                    };
                }
                let _ = y.insecure_skip_verify;
            }
            Role::MetricsExtractor => {
                let y: ExtractorYaml = ctx.params(spec.parameters.as_ref())?;
                scrape.engine_label_key = y.engine_label_key.filter(|k| !k.is_empty());
                if let Some(d) = y.default_engine.filter(|d| !d.is_empty()) {
                    scrape.default_engine = d.to_ascii_lowercase();
                }
                for e in &y.engine_configs {
                    let mapping = engine_from_yaml(e, &ctx)?;
                    // An entry replaces the built-in config of that name wholesale.
                    scrape.engines.retain(|m| m.name != mapping.name);
                    scrape.engines.push(mapping);
                }
            }
            _ => {}
        }
        instances.push(inst);
    }

    // A prefix scorer needs a producer; create one, configured from the scorer's legacy
    // parameters when it has them (v1.0–v1.3 configs put them there). The no-hit-LRU scorer
    // tells cold requests by the prefix match, so it needs one too (default parameters).
    let has_producer = instances
        .iter()
        .any(|i| matches!(i.role, Role::Producer(_)));
    let consumer = doc
        .plugins
        .iter()
        .find(|p| p.type_name == "prefix-cache-scorer")
        .map(|spec| (spec, "prefix-cache-scorer", spec.parameters.as_ref()))
        .or_else(|| {
            doc.plugins
                .iter()
                .find(|p| p.type_name == "no-hit-lru-scorer")
                .map(|spec| (spec, "no-hit-lru-scorer", None))
        });
    if !has_producer && let Some((spec, type_name, legacy)) = consumer {
        let name = "approx-prefix-cache-producer".to_owned();
        let mut ctx = Ctx {
            name: spec.effective_name(),
            type_name,
            warnings: &mut warnings,
        };
        let params = prefix_params(&mut ctx, legacy)?;
        if !by_name.contains_key(&name) {
            by_name.insert(name.clone(), instances.len());
            instances.push(Instance {
                name: name.clone(),
                type_name: "approx-prefix-cache-producer",
                role: Role::Producer(Arc::new(ApproxPrefixCacheProducer::new(name, params))),
            });
        }
    } else if has_producer {
        // Parameters on the scorer itself are legacy; they only matter without a producer.
        for spec in doc
            .plugins
            .iter()
            .filter(|p| p.type_name == "prefix-cache-scorer")
        {
            if spec.parameters.as_ref().is_some_and(|v| !v.is_null()) {
                warnings.push(format!(
                    "plugin {:?} (prefix-cache-scorer): parameters ignored; configure the approx-prefix-cache-producer instead",
                    spec.effective_name()
                ));
            }
        }
    }

    // Profiles.
    let mut profile_specs = doc.scheduling_profiles.clone();
    if profile_specs.is_empty() {
        profile_specs.push(types::ProfileSpec {
            name: "default".into(),
            plugins: instances
                .iter()
                .filter(|i| {
                    matches!(
                        i.role,
                        Role::Filter(_) | Role::Scorer(_) | Role::Picker(_) | Role::Detector(_)
                    )
                })
                .map(|i| types::ProfilePluginRef {
                    plugin_ref: i.name.clone(),
                    weight: None,
                })
                .collect(),
        });
    }
    let mut seen_profiles = HashSet::new();
    let mut profiles = Vec::with_capacity(profile_specs.len());
    for ps in &profile_specs {
        if !seen_profiles.insert(ps.name.clone()) {
            return Err(ConfigError::DuplicateProfile(ps.name.clone()));
        }
        let context = format!("scheduling profile {:?}", ps.name);
        let mut filters: Vec<Arc<dyn Filter>> = Vec::new();
        let mut scorers: Vec<(Arc<dyn Scorer>, f64)> = Vec::new();
        let mut picker: Option<Arc<dyn Picker>> = None;
        for r in &ps.plugins {
            let Some(&idx) = by_name.get(&r.plugin_ref) else {
                return Err(ConfigError::UnknownRef {
                    context,
                    plugin: r.plugin_ref.clone(),
                });
            };
            let inst = &instances[idx];
            match &inst.role {
                Role::Filter(f) => filters.push(f.clone()),
                Role::Detector(d) => filters.push(d.clone()),
                Role::Scorer(s) => {
                    let w = r.weight.unwrap_or(1.0);
                    if !(w.is_finite() && w >= 0.0) {
                        return Err(ConfigError::Weight {
                            profile: ps.name.clone(),
                            plugin: r.plugin_ref.clone(),
                        });
                    }
                    scorers.push((s.clone(), w));
                }
                Role::Picker(p) => {
                    if picker.replace(p.clone()).is_some() {
                        return Err(ConfigError::MultiplePickers(ps.name.clone()));
                    }
                }
                other => {
                    return Err(ConfigError::WrongRole {
                        context,
                        plugin: r.plugin_ref.clone(),
                        type_name: inst.type_name.to_owned(),
                        expected: match other {
                            Role::Inert => "it is accepted for compatibility but does nothing",
                            _ => "a profile holds filters, scorers and one picker",
                        },
                    });
                }
            }
        }
        let picker = picker.unwrap_or_else(|| {
            Arc::new(MaxScorePicker {
                name: "max-score-picker".into(),
                max_endpoints: 1,
            })
        });
        profiles.push(Profile {
            name: ps.name.clone(),
            filters,
            scorers,
            picker,
        });
    }

    let handlers: Vec<Arc<dyn ProfileHandler>> = instances
        .iter()
        .filter_map(|i| match &i.role {
            Role::Handler(h) => Some(h.clone()),
            _ => None,
        })
        .collect();
    let handler: Arc<dyn ProfileHandler> = match (handlers.len(), profiles.len()) {
        (0, 1) => Arc::new(SingleProfileHandler {
            name: "single-profile-handler".into(),
        }),
        (0, n) => {
            return Err(ConfigError::ProfileHandler(format!(
                "{n} scheduling profiles need a profile handler plugin"
            )));
        }
        (1, n) => {
            if n > 1 && handlers[0].type_name() == "single-profile-handler" {
                return Err(ConfigError::ProfileHandler(format!(
                    "single-profile-handler cannot run {n} scheduling profiles"
                )));
            }
            handlers[0].clone()
        }
        (n, _) => {
            return Err(ConfigError::ProfileHandler(format!(
                "{n} profile handlers declared; at most one is allowed"
            )));
        }
    };

    let saturation_detector = match &doc.saturation_detector {
        Some(r) => {
            let Some(&idx) = by_name.get(&r.plugin_ref) else {
                return Err(ConfigError::UnknownRef {
                    context: "saturationDetector".into(),
                    plugin: r.plugin_ref.clone(),
                });
            };
            match &instances[idx].role {
                Role::Detector(d) => d.clone(),
                _ => {
                    return Err(ConfigError::WrongRole {
                        context: "saturationDetector".into(),
                        plugin: r.plugin_ref.clone(),
                        type_name: instances[idx].type_name.to_owned(),
                        expected: "a saturation detector such as utilization-detector",
                    });
                }
            }
        }
        None => instances
            .iter()
            .find_map(|i| match &i.role {
                Role::Detector(d) => Some(d.clone()),
                _ => None,
            })
            .unwrap_or_default(),
    };

    for ds in doc
        .data_layer
        .iter()
        .chain(doc.data.iter())
        .flat_map(|d| &d.sources)
    {
        for r in std::iter::once(&ds.plugin_ref).chain(ds.extractors.iter().map(|e| &e.plugin_ref))
        {
            if !by_name.contains_key(r) {
                return Err(ConfigError::UnknownRef {
                    context: "dataLayer".into(),
                    plugin: r.clone(),
                });
            }
        }
    }

    let prefix_producers: Vec<Arc<ApproxPrefixCacheProducer>> = instances
        .iter()
        .filter_map(|i| match &i.role {
            Role::Producer(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let producers: Vec<Arc<dyn DataProducer>> = prefix_producers
        .iter()
        .map(|p| p.clone() as Arc<dyn DataProducer>)
        .collect();
    let response_plugins = instances
        .iter()
        .filter_map(|i| match &i.role {
            Role::Response(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    let plugins = instances
        .iter()
        .map(|i| (i.name.clone(), i.type_name))
        .collect();
    let describe: Vec<_> = instances
        .iter()
        .map(|i| (i.name.as_str(), i.role.describe()))
        .collect();
    tracing::debug!(?describe, "plugins instantiated");
    Ok(LoadedConfig {
        scheduler: Arc::new(Scheduler::new(handler, profiles, producers, seed)),
        saturation_detector,
        response_plugins,
        scrape,
        feature_gates: doc.feature_gates,
        prefix_producers,
        warnings,
        plugins,
    })
}

#[cfg(test)]
mod tests;
