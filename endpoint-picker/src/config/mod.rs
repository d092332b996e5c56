//! Loading `EndpointPickerConfig` YAML into a ready scheduler.
//!
//! The document format, plugin type names and parameter names are the reference EPP's (GIE
//! `inference.networking.x-k8s.io/v1alpha1` and llm-d `llm-d.ai/v1alpha1`), and so are the
//! defaulting rules: a lone profile gets a `single-profile-handler`, a profile without a picker
//! gets a `max-score-picker`, a scorer without a weight weighs 1, no profiles means one
//! `default` profile holding every filter, scorer and picker, a `prefix-cache-scorer` gets an
//! `approx-prefix-cache-producer`, and the saturation detector is a `utilization-detector`.
//!
//! Loading (the private `build`) runs in named phases, each a function below. Plugin types and
//! their parameters are the [registry]'s business. Every mistake is an error that
//! names the plugin, profile or parameter at fault. Unknown *parameters* are warnings, not
//! errors: GIE's EPP ignored them, and a config that loads there must load here.

pub mod data_layer;
mod flow_control;
pub mod gates;
mod instances;
pub mod params;
pub mod profiles;
pub mod types;

use std::collections::HashSet;
use std::sync::Arc;

use crate::flow::FlowConfig;
use crate::saturation::SaturationDetector;
use crate::scheduling::plugins::cost::TtftCostProducer;
use crate::scheduling::plugins::pickers::MaxScorePicker;
use crate::scheduling::plugins::precise::PrecisePrefixCacheProducer;
use crate::scheduling::plugins::prefix::{ApproxPrefixCacheProducer, PrefixParams};
use crate::scheduling::plugins::profile::SingleProfileHandler;
use crate::scheduling::plugins::response::ResponsePlugin;
use crate::scheduling::registry::{self, Built, Role};
use crate::scheduling::{DataProducer, Filter, Picker, Profile, ProfileHandler, Scheduler, Scorer};
use crate::tokens::TokenProducerConfig;
pub use data_layer::ScrapeSettings;
use gates::FeatureGates;
use instances::{Instance, Plugins};
use params::Params;
pub use params::parse_duration;
pub use types::{API_VERSIONS, EndpointPickerConfig};

/// The reference's default configuration: queue ×2, KV ×2, prefix ×3, max-score picker. A
/// reference EPP given no config runs this; `epp` runs [`UNCONFIGURED_PROFILE`] instead.
/// Tests that compare with the reference use it, as does anyone who passes it as a file.
pub const REFERENCE_DEFAULT_CONFIG: &str = profiles::REFERENCE_DEFAULT;

/// What `epp` runs when given no config: the profile that measured best across the workloads
/// (`cost-model.yaml`; README, "Scheduling" and bench/RESULTS.md "Goodput": in the real-time
/// goodput benchmark of 2026-11-30 it sustained at least the balanced profile's rate on every
/// workload and more on hot-spot and cache-pressure, and at least the best peer router's on
/// every workload).
pub const UNCONFIGURED_PROFILE: &str = profiles::COST_MODEL;

/// The name and type of the prefix producer made for a prefix scorer that has none.
const PREFIX_PRODUCER: &str = "approx-prefix-cache-producer";
/// The cost producer made for the cost model's consumers when none is declared.
const COST_PRODUCER: &str = "ttft-cost-producer";

/// A configuration problem. Each names what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, or not the shape of an `EndpointPickerConfig`.
    #[error("invalid EndpointPickerConfig: {0}")]
    Yaml(#[source] crate::yaml::YamlError),
    /// Wrong or missing `apiVersion`.
    #[error("unsupported apiVersion {0:?}: expected one of {API_VERSIONS:?}")]
    ApiVersion(String),
    /// Wrong `kind`.
    #[error("unsupported kind {0:?}: expected \"EndpointPickerConfig\"")]
    Kind(String),
    /// A feature gate that is unknown, or set to a value not implemented here.
    #[error("feature gate {gate:?}: {reason}")]
    FeatureGate {
        /// The gate as written.
        gate: String,
        /// What is wrong.
        reason: String,
    },
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
        source: yaml_serde::Error,
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
    #[error(
        "scheduling profile {profile:?}: weight of {plugin:?} must be a number from 0 to 1,000,000"
    )]
    Weight {
        /// Profile.
        profile: String,
        /// Scorer.
        plugin: String,
    },
    /// Several profiles and no handler, or several handlers.
    #[error("{0}")]
    ProfileHandler(String),
    /// The `flowControl` section or a policy it names (the reference's messages).
    #[error("flowControl: {0}")]
    FlowControl(String),
}

/// A loaded configuration, ready to serve.
#[derive(Debug)]
pub struct LoadedConfig {
    /// The scheduler.
    pub scheduler: Arc<Scheduler>,
    /// The saturation detector used for admission.
    pub saturation_detector: Arc<SaturationDetector>,
    /// The shortest `metricsStalenessThreshold` of every utilization detector, the admission
    /// one and any declared (a profile may filter with one): metrics must be refreshed
    /// within it, or endpoints look stale and saturated.
    pub strictest_staleness: Option<std::time::Duration>,
    /// Flow control's settings, with the `flowControl` feature gate on.
    pub flow_control: Option<FlowConfig>,
    /// The headers that name a request's flow when it carries no fairness id
    /// (`agent-identity`), when that plugin is declared.
    pub agent_identity: Option<Arc<[String]>>,
    /// Response-path plugins.
    pub response_plugins: Vec<Arc<dyn ResponsePlugin>>,
    /// Scrape settings.
    pub scrape: ScrapeSettings,
    /// The prefix producers (for metrics of the index).
    pub prefix_producers: Vec<Arc<ApproxPrefixCacheProducer>>,
    /// The precise prefix-cache producers: their indexes are what the KV-event subscribers
    /// feed, with the `kvEventsConfig` each asks for.
    pub precise_producers: Vec<Arc<PrecisePrefixCacheProducer>>,
    /// The declared `token-producer`, for the binary to build (`None`: no ids, as with the
    /// `estimate` backend).
    pub token_producer: Option<TokenProducerConfig>,
    /// Non-fatal remarks (unknown parameters, accepted-but-inert plugins).
    pub warnings: Vec<String>,
}

/// Loads the reference's default configuration ([`REFERENCE_DEFAULT_CONFIG`]).
pub fn load_default(seed: u64) -> Result<LoadedConfig, ConfigError> {
    load(REFERENCE_DEFAULT_CONFIG, seed)
}

/// Parses and builds a configuration. `seed` seeds the scheduler's RNG.
pub fn load(text: &str, seed: u64) -> Result<LoadedConfig, ConfigError> {
    let doc: EndpointPickerConfig = crate::yaml::from_str(text).map_err(ConfigError::Yaml)?;
    build(&doc, seed)
}

/// The largest scorer weight: totals of a few such stay finite and ordered (two weights of
/// 1e308 summed to infinity, where every candidate ties and the weighted-random picker always
/// took the first).
const MAX_WEIGHT: f64 = 1e6;

/// Builds a parsed document, phase by phase.
fn build(doc: &EndpointPickerConfig, seed: u64) -> Result<LoadedConfig, ConfigError> {
    check_kind(doc)?;
    let mut warnings = Vec::new();
    let gates = FeatureGates::parse(&doc.feature_gates, &mut warnings)?;
    let mut plugins = instantiate_plugins(&doc.plugins, &mut warnings)?;
    let flow_control = flow_control::build(doc, &gates, &mut plugins, &mut warnings)?;
    let agent_identity = flow_control::agent_identity(&plugins);
    ensure_cost_producer(&mut plugins)?;
    ensure_prefix_producer(&mut plugins, &mut warnings)?;
    one_producer_per_kind(&plugins)?;
    let profiles = build_profiles(&doc.scheduling_profiles, &plugins)?;
    let referenced = referenced_plugins(&doc.scheduling_profiles);
    warn_unused(&plugins, referenced.as_ref(), &gates, &mut warnings);
    let handler = choose_handler(&plugins, profiles.len())?;
    let saturation_detector = choose_saturation_detector(doc, &mut plugins, &mut warnings)?;
    check_data_layer(doc, &plugins)?;
    check_parser(doc, &plugins)?;
    let scrape = scrape_settings(&plugins);

    let prefix_producers = plugins.prefix_producers();
    let precise_producers = plugins.precise_producers();
    // The prefix matches first (the approximate one, then the precise one that falls back on
    // it), then the peer sources: the cost model reads them all.
    let producers = prefix_producers
        .iter()
        .map(|p| p.clone() as Arc<dyn DataProducer>)
        .chain(
            precise_producers
                .iter()
                .map(|p| p.clone() as Arc<dyn DataProducer>),
        )
        .chain(
            plugins
                .p2p_producers()
                .into_iter()
                .map(|p| p as Arc<dyn DataProducer>),
        )
        .chain(
            plugins
                .cost_producers()
                .into_iter()
                .map(|p| p as Arc<dyn DataProducer>),
        )
        .collect();
    let roles: Vec<_> = plugins
        .iter()
        .map(|i| (i.name.as_str(), i.built.role().describe()))
        .collect();
    tracing::debug!(?roles, "plugins instantiated");
    let token_producer = token_producer(&plugins)?;
    let strictest_staleness = plugins
        .iter()
        .filter_map(|i| match &i.built {
            Built::SaturationDetector(d) => d.staleness_threshold(),
            _ => None,
        })
        .chain(saturation_detector.staleness_threshold())
        .min();
    Ok(LoadedConfig {
        scheduler: Arc::new(Scheduler::new(handler, profiles, producers, seed)),
        saturation_detector,
        strictest_staleness,
        flow_control,
        agent_identity,
        response_plugins: plugins.response_plugins(referenced.as_ref()),
        scrape,
        prefix_producers,
        precise_producers,
        token_producer,
        warnings,
    })
}

/// At most one producer of each kind: a request carries one result of each (one prefix
/// match, one precise match, one peer source, one cost), and every consumer reads that one,
/// so a second producer would be computed, and fed, and never read. Likewise one
/// `metrics-data-source`: every endpoint is scraped once, with one path and scheme, and a
/// second one's settings replaced the first's for every endpoint, silently.
fn one_producer_per_kind(plugins: &Plugins<'_>) -> Result<(), ConfigError> {
    let mut seen: Vec<(&'static str, &str)> = Vec::new();
    for i in plugins.iter() {
        let kind = match &i.built {
            Built::PrefixProducer(_) => PREFIX_PRODUCER,
            Built::PreciseScorer(_) => "precise-prefix-cache-scorer",
            Built::CostProducer(_) => COST_PRODUCER,
            Built::P2pSource(_) => "p2p-source-producer",
            Built::MetricsSource(_) => "metrics-data-source",
            _ => continue,
        };
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == kind) {
            return Err(ConfigError::InvalidParameter {
                name: i.name.clone(),
                type_name: kind.into(),
                parameter: "type",
                reason: if kind == "metrics-data-source" {
                    format!(
                        "only one {kind} may be declared ({first:?} is one): every endpoint is \
                         scraped once, with one path and scheme"
                    )
                } else {
                    format!(
                        "only one {kind} may be declared ({first:?} is one): a request carries \
                         one result of each kind, so the other would be computed and never read"
                    )
                },
            });
        }
        seen.push((kind, &i.name));
    }
    Ok(())
}

/// The `token-producer`, at most one (a request has one set of ids).
fn token_producer(plugins: &Plugins<'_>) -> Result<Option<TokenProducerConfig>, ConfigError> {
    let mut found = plugins.iter().filter_map(|i| match &i.built {
        Built::TokenProducer(c) => Some(c),
        _ => None,
    });
    let first = found.next().cloned();
    if let Some(second) = found.next() {
        return Err(ConfigError::InvalidParameter {
            name: second.name.clone(),
            type_name: "token-producer".into(),
            parameter: "type",
            reason: "only one token-producer may be declared".into(),
        });
    }
    Ok(first)
}

/// `apiVersion` and `kind` are the reference's.
fn check_kind(doc: &EndpointPickerConfig) -> Result<(), ConfigError> {
    match doc.api_version.as_deref() {
        Some(v) if API_VERSIONS.contains(&v) => {}
        other => return Err(ConfigError::ApiVersion(other.unwrap_or("").to_owned())),
    }
    match doc.kind.as_deref() {
        Some("EndpointPickerConfig") => Ok(()),
        other => Err(ConfigError::Kind(other.unwrap_or("").to_owned())),
    }
}

/// Builds every declared plugin through its registry entry; names must be unique.
fn instantiate_plugins<'a>(
    specs: &'a [types::PluginSpec],
    warnings: &mut Vec<String>,
) -> Result<Plugins<'a>, ConfigError> {
    let mut plugins = Plugins::default();
    for spec in specs {
        let name = spec.effective_name();
        let Some(entry) = registry::lookup(&spec.type_name) else {
            return Err(ConfigError::UnknownType {
                name: name.to_owned(),
                type_name: spec.type_name.clone(),
                known: registry::known_types(),
            });
        };
        let parameters = spec.parameters.as_ref();
        let built = entry.build(&mut Params::new(
            name,
            entry.type_name,
            parameters,
            warnings,
        ))?;
        plugins.add(Instance {
            name: name.to_owned(),
            type_name: entry.type_name,
            parameters,
            built,
        })?;
    }
    Ok(plugins)
}

/// A `prefix-cache-scorer` reads the prefix match an `approx-prefix-cache-producer`
/// computes, a `no-hit-lru-scorer` tells cold requests by it, and a
/// `precise-prefix-cache-scorer` falls back on it per endpoint, so each needs a producer. Without one declared, one is made, configured from the prefix scorer's own
/// parameters when it has them (v1.0–v1.3 configs put them there). With one declared,
/// parameters on the scorer are legacy and ignored, with a warning.
fn ensure_prefix_producer(
    plugins: &mut Plugins<'_>,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let has_producer = plugins
        .iter()
        .any(|i| matches!(i.built, Built::PrefixProducer(_)));
    if has_producer {
        for scorer in plugins.iter().filter(|i| {
            i.type_name == "prefix-cache-scorer" && i.parameters.is_some_and(|v| !v.is_null())
        }) {
            warnings.push(format!(
                "plugin {:?} (prefix-cache-scorer): parameters ignored; configure the {PREFIX_PRODUCER} instead",
                scorer.name
            ));
        }
        return Ok(());
    }
    let consumer = plugins
        .iter()
        .find(|i| i.type_name == "prefix-cache-scorer")
        .map(|i| (i, i.parameters))
        .or_else(|| {
            plugins
                .iter()
                .find(|i| {
                    matches!(i.type_name, "no-hit-lru-scorer")
                        || matches!(
                            i.built,
                            Built::CostProducer(_) | Built::PreciseScorer(_) | Built::P2pSource(_)
                        )
                })
                .map(|i| (i, None))
        });
    let Some((consumer, legacy)) = consumer else {
        return Ok(());
    };
    // One producer serves every prefix scorer: a second scorer's own parameters would go
    // unused, so say so, as for a declared producer.
    for other in plugins.iter().filter(|i| {
        i.type_name == "prefix-cache-scorer"
            && i.name != consumer.name
            && i.parameters.is_some_and(|v| !v.is_null())
            && i.parameters != legacy
    }) {
        warnings.push(format!(
            "plugin {:?} (prefix-cache-scorer): parameters ignored; the {PREFIX_PRODUCER} made for {:?} takes that plugin's",
            other.name, consumer.name
        ));
    }
    let params = PrefixParams::from_params(&mut Params::new(
        &consumer.name,
        consumer.type_name,
        legacy,
        warnings,
    ))?;
    // A plugin of another type that took the producer's name is refused (by `add`), not
    // left to stand in for the producer, which every prefix consumer would then miss.
    plugins.add(Instance {
        name: PREFIX_PRODUCER.to_owned(),
        type_name: PREFIX_PRODUCER,
        parameters: None,
        built: Built::PrefixProducer(Arc::new(ApproxPrefixCacheProducer::new(
            PREFIX_PRODUCER,
            params,
        ))),
    })
}

/// The cost model's consumers (`ttft-cost-scorer`, `latency-slo-filter`) need its producer;
/// one with default parameters is made when none is declared.
fn ensure_cost_producer(plugins: &mut Plugins<'_>) -> Result<(), ConfigError> {
    let has_producer = plugins
        .iter()
        .any(|i| matches!(i.built, Built::CostProducer(_)));
    let needed = plugins
        .iter()
        .any(|i| matches!(i.type_name, "ttft-cost-scorer" | "latency-slo-filter"));
    // As for the prefix producer, a plugin of another type under this name is refused.
    if has_producer || !needed {
        return Ok(());
    }
    plugins.add(Instance {
        name: COST_PRODUCER.to_owned(),
        type_name: COST_PRODUCER,
        parameters: None,
        built: Built::CostProducer(Arc::new(TtftCostProducer {
            name: COST_PRODUCER.to_owned(),
            ..TtftCostProducer::default()
        })),
    })
}

/// The scheduling profiles; none declared means one `default` profile holding every
/// filter, scorer and picker, in declaration order.
fn build_profiles(
    specs: &[types::ProfileSpec],
    plugins: &Plugins<'_>,
) -> Result<Vec<Profile>, ConfigError> {
    let default;
    let specs = if specs.is_empty() {
        default = [types::ProfileSpec {
            name: "default".into(),
            plugins: plugins
                .iter()
                .filter(|i| belongs_in_profile(&i.built))
                .map(|i| types::ProfilePluginRef {
                    plugin_ref: i.name.clone(),
                    weight: None,
                })
                .collect(),
        }];
        &default[..]
    } else {
        specs
    };
    let mut seen = HashSet::new();
    specs
        .iter()
        .map(|spec| {
            if !seen.insert(spec.name.as_str()) {
                return Err(ConfigError::DuplicateProfile(spec.name.clone()));
            }
            build_profile(spec, plugins)
        })
        .collect()
}

/// The plugins the declared profiles name; `None` without profiles (the default profile
/// holds every one that may be in a profile).
fn referenced_plugins(specs: &[types::ProfileSpec]) -> Option<HashSet<String>> {
    (!specs.is_empty()).then(|| {
        specs
            .iter()
            .flat_map(|p| p.plugins.iter().map(|r| r.plugin_ref.clone()))
            .collect()
    })
}

/// Says which declared plugins do nothing: a filter, scorer or picker no profile names, and
/// flow-control policies with the `flowControl` gate off.
fn warn_unused(
    plugins: &Plugins<'_>,
    referenced: Option<&HashSet<String>>,
    gates: &FeatureGates,
    warnings: &mut Vec<String>,
) {
    for i in plugins.iter() {
        let unreferenced = referenced.is_some_and(|r| !r.contains(&i.name))
            // A saturation detector also serves flow control and the pool's saturation
            // outside any profile; a precise scorer's index feeds the cost model and the
            // in-flight prefill whether or not a profile scores with it.
            && belongs_in_profile(&i.built)
            && !matches!(
                i.built,
                Built::SaturationDetector(_) | Built::PreciseScorer(_)
            );
        if unreferenced {
            warnings.push(format!(
                "plugin {:?} ({}) is declared but no scheduling profile uses it: it takes no part \
                 in routing",
                i.name, i.type_name
            ));
        }
        let policy = matches!(
            i.built,
            Built::Fairness(_) | Built::Ordering(_) | Built::UsageLimit(_)
        );
        if policy && !gates.enabled(gates::FLOW_CONTROL) {
            warnings.push(format!(
                "plugin {:?} ({}) is a flow-control policy and flow control is off (feature gate \
                 flowControl): it does nothing",
                i.name, i.type_name
            ));
        }
    }
}

/// Whether a profile may hold the plugin (and the default profile does).
fn belongs_in_profile(built: &Built) -> bool {
    match built {
        Built::Filter(_)
        | Built::SaturationDetector(_)
        | Built::Scorer(_)
        | Built::PreciseScorer(_)
        | Built::Picker(_) => true,
        Built::ProfileHandler(_)
        | Built::PrefixProducer(_)
        | Built::CostProducer(_)
        | Built::P2pSource(_)
        | Built::TokenProducer(_)
        | Built::Response(_)
        | Built::MetricsSource(_)
        | Built::MetricsExtractor(_)
        | Built::Fairness(_)
        | Built::Ordering(_)
        | Built::UsageLimit(_)
        | Built::AgentIdentity(_)
        | Built::Inert { .. } => false,
    }
}

/// One profile: its filters in order, its weighted scorers, and one picker (a
/// `max-score-picker` when it names none).
fn build_profile(spec: &types::ProfileSpec, plugins: &Plugins<'_>) -> Result<Profile, ConfigError> {
    let context = format!("scheduling profile {:?}", spec.name);
    let mut filters: Vec<Arc<dyn Filter>> = Vec::new();
    let mut scorers: Vec<(Arc<dyn Scorer>, f64)> = Vec::new();
    let mut picker: Option<Arc<dyn Picker>> = None;
    for r in &spec.plugins {
        let inst = plugins.resolve(&context, &r.plugin_ref)?;
        let wrong = |expected| ConfigError::WrongRole {
            context: context.clone(),
            plugin: r.plugin_ref.clone(),
            type_name: inst.type_name.to_owned(),
            expected,
        };
        match &inst.built {
            Built::Filter(f) => filters.push(f.clone()),
            // The reference's utilization detector is a filter too.
            Built::SaturationDetector(d) => filters.push(d.clone()),
            Built::Scorer(s) => {
                let w = r.weight.unwrap_or(1.0);
                if !(0.0..=MAX_WEIGHT).contains(&w) {
                    return Err(ConfigError::Weight {
                        profile: spec.name.clone(),
                        plugin: r.plugin_ref.clone(),
                    });
                }
                scorers.push((s.clone(), w));
            }
            Built::PreciseScorer(s) => {
                let w = r.weight.unwrap_or(1.0);
                if !(0.0..=MAX_WEIGHT).contains(&w) {
                    return Err(ConfigError::Weight {
                        profile: spec.name.clone(),
                        plugin: r.plugin_ref.clone(),
                    });
                }
                scorers.push((s.clone() as Arc<dyn Scorer>, w));
            }
            Built::Picker(p) => {
                if picker.replace(p.clone()).is_some() {
                    return Err(ConfigError::MultiplePickers(spec.name.clone()));
                }
            }
            Built::Inert { .. } => {
                return Err(wrong("it is accepted for compatibility but does nothing"));
            }
            Built::ProfileHandler(_)
            | Built::PrefixProducer(_)
            | Built::CostProducer(_)
            | Built::P2pSource(_)
            | Built::TokenProducer(_)
            | Built::Response(_)
            | Built::MetricsSource(_)
            | Built::MetricsExtractor(_)
            | Built::Fairness(_)
            | Built::Ordering(_)
            | Built::UsageLimit(_)
            | Built::AgentIdentity(_) => {
                return Err(wrong("a profile holds filters, scorers and one picker"));
            }
        }
    }
    let picker = picker.unwrap_or_else(|| {
        Arc::new(MaxScorePicker {
            name: "max-score-picker".into(),
            max_endpoints: 1,
        })
    });
    Ok(Profile {
        name: spec.name.clone(),
        filters,
        scorers,
        picker,
    })
}

/// The profile handler: the one declared, or a `single-profile-handler` for a lone profile.
fn choose_handler(
    plugins: &Plugins<'_>,
    profiles: usize,
) -> Result<Arc<dyn ProfileHandler>, ConfigError> {
    let handlers: Vec<&Arc<dyn ProfileHandler>> = plugins
        .iter()
        .filter_map(|i| match &i.built {
            Built::ProfileHandler(h) => Some(h),
            _ => None,
        })
        .collect();
    match (handlers.as_slice(), profiles) {
        ([], 1) => Ok(Arc::new(SingleProfileHandler {
            name: "single-profile-handler".into(),
        })),
        ([], n) => Err(ConfigError::ProfileHandler(format!(
            "{n} scheduling profiles need a profile handler plugin"
        ))),
        ([h], n) if n > 1 && h.type_name() == "single-profile-handler" => {
            Err(ConfigError::ProfileHandler(format!(
                "single-profile-handler cannot run {n} scheduling profiles"
            )))
        }
        ([h], _) => Ok(Arc::clone(h)),
        (many, _) => Err(ConfigError::ProfileHandler(format!(
            "{} profile handlers declared; at most one is allowed",
            many.len()
        ))),
    }
}

/// The detector admission asks: the one `flowControl.saturationDetector` (or the older
/// top-level `saturationDetector`) names, else the first declared, else a
/// `utilization-detector` with the reference's defaults. As in the reference, naming an
/// undeclared plugin after a detector type makes one with default parameters.
fn choose_saturation_detector(
    doc: &EndpointPickerConfig,
    plugins: &mut Plugins<'_>,
    warnings: &mut Vec<String>,
) -> Result<Arc<SaturationDetector>, ConfigError> {
    let named = doc
        .flow_control
        .as_ref()
        .and_then(|fc| fc.saturation_detector.as_ref())
        .map(|r| ("flowControl.saturationDetector", r))
        .or_else(|| {
            doc.saturation_detector
                .as_ref()
                .map(|r| ("saturationDetector", r))
        });
    let Some((context, r)) = named else {
        return Ok(plugins
            .iter()
            .find_map(|i| match &i.built {
                Built::SaturationDetector(d) => Some(d.clone()),
                _ => None,
            })
            .unwrap_or_default());
    };
    let inst =
        plugins.resolve_or_default(context, &r.plugin_ref, Role::SaturationDetector, warnings)?;
    match &inst.built {
        Built::SaturationDetector(d) => Ok(d.clone()),
        _ => Err(ConfigError::WrongRole {
            context: context.into(),
            plugin: r.plugin_ref.clone(),
            type_name: inst.type_name.to_owned(),
            expected: "a saturation detector such as utilization-detector or concurrency-detector",
        }),
    }
}

/// Every plugin the `dataLayer` (or v1.4 `data`) section names is declared, sources are
/// data sources and extractors are data extractors.
fn check_data_layer(doc: &EndpointPickerConfig, plugins: &Plugins<'_>) -> Result<(), ConfigError> {
    let sources = doc
        .data_layer
        .iter()
        .chain(doc.data.iter())
        .flat_map(|d| &d.sources);
    let context = "dataLayer";
    for source in sources {
        plugins.expect_role(
            context,
            &source.plugin_ref,
            Role::DataSource,
            "a data source such as metrics-data-source",
        )?;
        for extractor in &source.extractors {
            plugins.expect_role(
                context,
                &extractor.plugin_ref,
                Role::DataExtractor,
                "a data extractor such as core-metrics-extractor",
            )?;
        }
    }
    Ok(())
}

/// The request parser `parser` names is a parser: a declared one, or, as in the reference,
/// an undeclared name that is a parser type. The only parser here, `openai-parser`, is built
/// in and always used.
fn check_parser(doc: &EndpointPickerConfig, plugins: &Plugins<'_>) -> Result<(), ConfigError> {
    let Some(r) = &doc.parser else {
        return Ok(());
    };
    let context = "parser";
    let expected = "a parser such as openai-parser";
    if plugins.get(&r.plugin_ref).is_some() {
        return plugins.expect_role(context, &r.plugin_ref, Role::Parser, expected);
    }
    match registry::lookup(&r.plugin_ref) {
        Some(entry) if entry.role == Role::Parser => Ok(()),
        Some(entry) => Err(ConfigError::WrongRole {
            context: context.into(),
            plugin: r.plugin_ref.clone(),
            type_name: entry.type_name.to_owned(),
            expected,
        }),
        None => Err(ConfigError::UnknownRef {
            context: context.into(),
            plugin: r.plugin_ref.clone(),
        }),
    }
}

/// Scrape settings: the defaults, then each data layer plugin in declaration order.
fn scrape_settings(plugins: &Plugins<'_>) -> ScrapeSettings {
    let mut scrape = ScrapeSettings::default();
    for i in plugins.iter() {
        match &i.built {
            Built::MetricsSource(s) => scrape.apply_source(s),
            Built::MetricsExtractor(e) => scrape.apply_extractor(e),
            _ => {}
        }
    }
    scrape
}

#[cfg(test)]
mod tests;
