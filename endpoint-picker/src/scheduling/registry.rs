//! The plugin registry: every plugin `type` an `EndpointPickerConfig` may name, what it is
//! for, and how its `parameters` become a plugin.
//!
//! [`REGISTRY`] is the whole truth. A type is known if and only if it has an entry; an
//! alias is an entry of its own (naming the type it stands for); a type accepted only so
//! that reference configs load is an entry too, with the reason it does nothing here. An
//! unknown type is an error that lists the table. Each entry's factory decodes and checks
//! that plugin's parameters, which are declared beside the plugin.

use std::sync::Arc;

use crate::config::ConfigError;
use crate::config::data_layer::{MetricsExtractor, MetricsSource};
use crate::config::params::Params;
use crate::flow::policy::{FairnessPolicy, OrderingPolicy, UsageLimitPolicy};
use crate::saturation::{ConcurrencyDetector, SaturationDetector, UtilizationDetector};
use crate::scheduling::plugins::compat;
use crate::scheduling::plugins::cost::{LatencySloFilter, TtftCostProducer, TtftCostScorer};
use crate::scheduling::plugins::filters::{
    ByLabelFilter, HeaderBasedTestingFilter, LabelSelectorFilter, LoraAdapterFilter,
};
use crate::scheduling::plugins::p2p::P2pSourceProducer;
use crate::scheduling::plugins::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use crate::scheduling::plugins::precise::PrecisePrefixCacheScorer;
use crate::scheduling::plugins::prefix::ApproxPrefixCacheProducer;
use crate::scheduling::plugins::profile::SingleProfileHandler;
use crate::scheduling::plugins::response::{DestinationEndpointServedVerifier, ResponsePlugin};
use crate::scheduling::plugins::scorers::{
    ActiveRequestScorer, KvCacheUtilizationScorer, LoadAwareScorer, LoraAffinityScorer,
    NoHitLruScorer, PrefixCacheScorer, PriorityPackingScorer, QueueScorer, RunningRequestsScorer,
};
use crate::scheduling::plugins::session::SessionAffinityScorer;
use crate::scheduling::{Filter, Picker, ProfileHandler, Scorer};
use crate::tokens::TokenProducerConfig;

/// What a plugin type is for, which decides where a config may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Removes candidates (a profile's filters).
    Filter,
    /// Scores candidates (a profile's weighted scorers).
    Scorer,
    /// Chooses among scored candidates (a profile's picker).
    Picker,
    /// Decides which profiles run.
    ProfileHandler,
    /// Computes per-request data that scorers read.
    DataProducer,
    /// Decides when the pool is saturated (admission); also usable as a filter.
    SaturationDetector,
    /// Adds response headers.
    ResponsePlugin,
    /// A `dataLayer` source.
    DataSource,
    /// A `dataLayer` extractor.
    DataExtractor,
    /// Parses request bodies.
    Parser,
    /// Flow control: which flow of a band goes next.
    FairnessPolicy,
    /// Flow control: which request of a flow goes next.
    OrderingPolicy,
    /// Flow control: up to which saturation each band dispatches.
    UsageLimitPolicy,
    /// Derives request attributes from headers (`agent-identity`).
    RequestHeaderProcessor,
}

/// A plugin built from its configuration.
#[derive(Debug, Clone)]
pub enum Built {
    /// A filter.
    Filter(Arc<dyn Filter>),
    /// A scorer.
    Scorer(Arc<dyn Scorer>),
    /// A picker.
    Picker(Arc<dyn Picker>),
    /// A profile handler.
    ProfileHandler(Arc<dyn ProfileHandler>),
    /// The approximate prefix-cache producer (kept concrete for the index metrics).
    PrefixProducer(Arc<ApproxPrefixCacheProducer>),
    /// `precise-prefix-cache-scorer`: a scorer with its producer, which owns the index the
    /// KV-event subscribers feed (kept concrete for the wiring and the metrics).
    PreciseScorer(Arc<PrecisePrefixCacheScorer>),
    /// The cost model's producer (runs after the prefix producers, whose match it reads).
    CostProducer(Arc<TtftCostProducer>),
    /// `p2p-source-producer` (runs after the prefix producers and before the cost producer,
    /// which charges the pulls it proposes).
    P2pSource(Arc<P2pSourceProducer>),
    /// A `token-producer`'s settings: the binary builds its tokenizer (the heavy dependencies
    /// stay out of this crate) and runs it before scheduling, off the async threads.
    TokenProducer(TokenProducerConfig),
    /// A saturation detector (kept concrete: admission asks it more than a filter can say).
    SaturationDetector(Arc<SaturationDetector>),
    /// A flow-control fairness policy.
    Fairness(FairnessPolicy),
    /// A flow-control ordering policy.
    Ordering(OrderingPolicy),
    /// A flow-control usage-limit policy.
    UsageLimit(Arc<UsageLimitPolicy>),
    /// `agent-identity`: the headers whose first non-empty value is a request's flow when it
    /// names no fairness id, in order.
    AgentIdentity(Arc<[String]>),
    /// A response plugin.
    Response(Arc<dyn ResponsePlugin>),
    /// Scrape settings of a `metrics-data-source`.
    MetricsSource(MetricsSource),
    /// Metric mappings of a `core-metrics-extractor`.
    MetricsExtractor(MetricsExtractor),
    /// Accepted so that reference configs load; does nothing here.
    Inert {
        /// What the type is for.
        role: Role,
        /// Why doing nothing is right here.
        reason: &'static str,
    },
}

/// One registered type.
#[derive(Debug)]
pub struct Entry {
    /// The `type` as written in configs.
    pub type_name: &'static str,
    /// What it is for.
    pub role: Role,
    /// For an alias, the type it builds (whose name the plugin reports).
    pub alias_of: Option<&'static str>,
    /// How it is built.
    pub factory: Factory,
}

/// How an entry turns parameters into a plugin.
#[derive(Debug, Clone, Copy)]
pub enum Factory {
    /// Decodes and checks the parameters, and builds the plugin.
    Build(fn(&mut Params<'_>) -> Result<Built, ConfigError>),
    /// Accepted for compatibility and doing nothing, for `reason`; `parameters` checks the
    /// parameters all the same.
    Inert {
        /// Why doing nothing is right here.
        reason: &'static str,
        /// Checks the parameters.
        parameters: fn(&mut Params<'_>) -> Result<(), ConfigError>,
    },
}

/// Every plugin type, grouped by role.
pub static REGISTRY: &[Entry] = &[
    // Profile handlers.
    Entry::new("single-profile-handler", Role::ProfileHandler, |p| {
        p.none()?;
        handler(SingleProfileHandler { name: p.name() })
    }),
    // Filters.
    Entry::new("header-based-testing-filter", Role::Filter, |p| {
        p.none()?;
        p.warn(
            "any client picks its own endpoints with the test-epp-endpoint-selection header: \
             a conformance-test plugin, not for traffic",
        );
        filter(HeaderBasedTestingFilter { name: p.name() })
    }),
    Entry::new("label-selector-filter", Role::Filter, |p| {
        filter(LabelSelectorFilter::from_params(p)?)
    }),
    Entry::alias(
        "by-label-selector",
        "label-selector-filter",
        Role::Filter,
        |p| filter(LabelSelectorFilter::from_params(p)?),
    ),
    Entry::new("lora-adapter-filter", Role::Filter, |p| {
        p.none()?;
        filter(LoraAdapterFilter { name: p.name() })
    }),
    Entry::new("by-label", Role::Filter, |p| {
        filter(ByLabelFilter::from_params(p)?)
    }),
    Entry::new("latency-slo-filter", Role::Filter, |p| {
        p.none()?;
        filter(LatencySloFilter { name: p.name() })
    }),
    // Scorers.
    Entry::new("queue-scorer", Role::Scorer, |p| {
        p.none()?;
        scorer(QueueScorer { name: p.name() })
    }),
    Entry::new("kv-cache-utilization-scorer", Role::Scorer, |p| {
        p.none()?;
        scorer(KvCacheUtilizationScorer { name: p.name() })
    }),
    Entry::alias(
        "kv-cache-scorer",
        "kv-cache-utilization-scorer",
        Role::Scorer,
        |p| {
            p.none()?;
            scorer(KvCacheUtilizationScorer { name: p.name() })
        },
    ),
    Entry::new("running-requests-size-scorer", Role::Scorer, |p| {
        p.none()?;
        scorer(RunningRequestsScorer { name: p.name() })
    }),
    // Its v1.0–v1.3 parameters configure the producer made for it (see
    // `config::ensure_prefix_producer`).
    Entry::new("prefix-cache-scorer", Role::Scorer, |p| {
        scorer(PrefixCacheScorer { name: p.name() })
    }),
    // Owns the KV-events index; falls back per endpoint to the approximate producer (made
    // for it when none is declared, see `config::ensure_prefix_producer`).
    Entry::new("precise-prefix-cache-scorer", Role::Scorer, |p| {
        Ok(Built::PreciseScorer(Arc::new(
            PrecisePrefixCacheScorer::from_params(p)?,
        )))
    }),
    Entry::new("lora-affinity-scorer", Role::Scorer, |p| {
        p.none()?;
        scorer(LoraAffinityScorer { name: p.name() })
    }),
    Entry::new("load-aware-scorer", Role::Scorer, |p| {
        scorer(LoadAwareScorer::from_params(p)?)
    }),
    Entry::new("active-request-scorer", Role::Scorer, |p| {
        scorer(ActiveRequestScorer::from_params(p)?)
    }),
    Entry::new("priority-packing-scorer", Role::Scorer, |p| {
        scorer(PriorityPackingScorer::from_params(p)?)
    }),
    Entry::new("no-hit-lru-scorer", Role::Scorer, |p| {
        scorer(NoHitLruScorer::from_params(p)?)
    }),
    Entry::new("session-affinity-scorer", Role::Scorer, |p| {
        scorer(SessionAffinityScorer::from_params(p)?)
    }),
    // Reads the `ttft-cost-producer`'s predictions (one is made when none is declared).
    Entry::new("ttft-cost-scorer", Role::Scorer, |p| {
        scorer(TtftCostScorer::from_params(p)?)
    }),
    // Pickers.
    Entry::new("max-score-picker", Role::Picker, |p| {
        picker(MaxScorePicker::from_params(p)?)
    }),
    Entry::new("random-picker", Role::Picker, |p| {
        picker(RandomPicker::from_params(p)?)
    }),
    Entry::new("weighted-random-picker", Role::Picker, |p| {
        picker(WeightedRandomPicker::from_params(p)?)
    }),
    // Data producers.
    Entry::new("approx-prefix-cache-producer", Role::DataProducer, |p| {
        Ok(Built::PrefixProducer(Arc::new(
            ApproxPrefixCacheProducer::from_params(p)?,
        )))
    }),
    Entry::new("ttft-cost-producer", Role::DataProducer, |p| {
        Ok(Built::CostProducer(Arc::new(
            TtftCostProducer::from_params(p)?,
        )))
    }),
    // llm-d's: names the peer to pull KV blocks from (`x-kv-cache-source-host-port`).
    Entry::new("p2p-source-producer", Role::DataProducer, |p| {
        Ok(Built::P2pSource(Arc::new(P2pSourceProducer::from_params(
            p,
        )?)))
    }),
    // llm-d's `token-producer` (backends `estimate`, llm-d's default, and our `local`).
    Entry::new("token-producer", Role::DataProducer, |p| {
        Ok(Built::TokenProducer(TokenProducerConfig::from_params(p)?))
    }),
    // llm-d's deprecated name of the same plugin.
    Entry::alias("tokenizer", "token-producer", Role::DataProducer, |p| {
        Ok(Built::TokenProducer(TokenProducerConfig::from_params(p)?))
    }),
    Entry::inert(
        "inflight-load-producer",
        Role::DataProducer,
        "in-flight requests are always counted, and concurrency-detector counts the uncached \
         prompt tokens of requests before their first token itself: this producer's token \
         estimates (addEstimatedOutputTokens, outputRatio, maxEstimatedOutputTokens) change \
         nothing here",
        compat::inflight_load_producer,
    ),
    // Saturation detectors.
    Entry::new("utilization-detector", Role::SaturationDetector, |p| {
        Ok(Built::SaturationDetector(Arc::new(
            SaturationDetector::Utilization(UtilizationDetector::from_params(p)?),
        )))
    }),
    Entry::new("concurrency-detector", Role::SaturationDetector, |p| {
        Ok(Built::SaturationDetector(Arc::new(
            SaturationDetector::Concurrency(ConcurrencyDetector::from_params(p)?),
        )))
    }),
    // Response plugins.
    Entry::new(
        "destination-endpoint-served-verifier",
        Role::ResponsePlugin,
        |p| {
            p.none()?;
            Ok(Built::Response(Arc::new(DestinationEndpointServedVerifier)))
        },
    ),
    // The data layer.
    Entry::new("metrics-data-source", Role::DataSource, |p| {
        Ok(Built::MetricsSource(MetricsSource::from_params(p)?))
    }),
    Entry::new("core-metrics-extractor", Role::DataExtractor, |p| {
        Ok(Built::MetricsExtractor(MetricsExtractor::from_params(p)?))
    }),
    Entry::inert(
        "k8s-notification-source",
        Role::DataSource,
        NOTIFICATIONS,
        compat::k8s_notification_source,
    ),
    Entry::inert(
        "endpoint-notification-source",
        Role::DataSource,
        NOTIFICATIONS,
        no_parameters,
    ),
    // Parsers.
    Entry::inert(
        "openai-parser",
        Role::Parser,
        "the OpenAI parser is built in and parses every request",
        no_parameters,
    ),
    // Flow control (used with the `flowControl` feature gate on; see `crate::flow`).
    Entry::new("global-strict-fairness-policy", Role::FairnessPolicy, |p| {
        p.none()?;
        Ok(Built::Fairness(FairnessPolicy::GlobalStrict))
    }),
    Entry::new("round-robin-fairness-policy", Role::FairnessPolicy, |p| {
        p.none()?;
        Ok(Built::Fairness(FairnessPolicy::RoundRobin))
    }),
    Entry::new("program-aware-fairness", Role::FairnessPolicy, |p| {
        Ok(Built::Fairness(FairnessPolicy::las_from_params(p)?))
    }),
    Entry::new("fcfs-ordering-policy", Role::OrderingPolicy, |p| {
        p.none()?;
        Ok(Built::Ordering(OrderingPolicy::Fcfs))
    }),
    Entry::new("edf-ordering-policy", Role::OrderingPolicy, |p| {
        p.none()?;
        Ok(Built::Ordering(OrderingPolicy::Edf))
    }),
    Entry::new("slo-deadline-ordering-policy", Role::OrderingPolicy, |p| {
        p.none()?;
        Ok(Built::Ordering(OrderingPolicy::SloDeadline))
    }),
    Entry::new("static-usage-limit-policy", Role::UsageLimitPolicy, |p| {
        Ok(Built::UsageLimit(Arc::new(
            UsageLimitPolicy::static_from_params(p)?,
        )))
    }),
    Entry::new("priority-holdback-policy", Role::UsageLimitPolicy, |p| {
        Ok(Built::UsageLimit(Arc::new(
            UsageLimitPolicy::holdback_from_params(p)?,
        )))
    }),
    Entry::new(
        "soft-reflective-ceiling-policy",
        Role::UsageLimitPolicy,
        |p| {
            Ok(Built::UsageLimit(Arc::new(
                UsageLimitPolicy::soft_reflective_from_params(p)?,
            )))
        },
    ),
    Entry::new("agent-identity", Role::RequestHeaderProcessor, |p| {
        Ok(Built::AgentIdentity(crate::flow::agent_identity_headers(
            p,
        )?))
    }),
];

/// Why the notification sources do nothing: they only feed extractors, and no notification
/// extractor exists here (one would be an unknown type).
const NOTIFICATIONS: &str = "it only feeds notification extractors, and none is implemented here";

/// The entry of `type_name`, if it is registered.
pub fn lookup(type_name: &str) -> Option<&'static Entry> {
    REGISTRY.iter().find(|e| e.type_name == type_name)
}

/// Every registered type, comma-separated, for errors.
pub fn known_types() -> String {
    let names: Vec<&str> = REGISTRY.iter().map(|e| e.type_name).collect();
    names.join(", ")
}

fn filter(f: impl Filter + 'static) -> Result<Built, ConfigError> {
    Ok(Built::Filter(Arc::new(f)))
}

fn scorer(s: impl Scorer + 'static) -> Result<Built, ConfigError> {
    Ok(Built::Scorer(Arc::new(s)))
}

fn picker(p: impl Picker + 'static) -> Result<Built, ConfigError> {
    Ok(Built::Picker(Arc::new(p)))
}

fn handler(h: impl ProfileHandler + 'static) -> Result<Built, ConfigError> {
    Ok(Built::ProfileHandler(Arc::new(h)))
}

/// For inert types that take no parameters: unknown keys are warned about.
fn no_parameters(p: &mut Params<'_>) -> Result<(), ConfigError> {
    p.none()
}

// === impl Role ===

impl Role {
    /// How errors name it.
    pub fn describe(self) -> &'static str {
        match self {
            Role::Filter => "filter",
            Role::Scorer => "scorer",
            Role::Picker => "picker",
            Role::ProfileHandler => "profile handler",
            Role::DataProducer => "data producer",
            Role::SaturationDetector => "saturation detector",
            Role::ResponsePlugin => "response plugin",
            Role::DataSource => "data source",
            Role::DataExtractor => "data extractor",
            Role::Parser => "parser",
            Role::FairnessPolicy => "fairness policy",
            Role::OrderingPolicy => "ordering policy",
            Role::UsageLimitPolicy => "usage limit policy",
            Role::RequestHeaderProcessor => "request header processor",
        }
    }
}

// === impl Built ===

impl Built {
    /// What the built plugin is for.
    pub fn role(&self) -> Role {
        match self {
            Built::Filter(_) => Role::Filter,
            Built::Scorer(_) | Built::PreciseScorer(_) => Role::Scorer,
            Built::Picker(_) => Role::Picker,
            Built::ProfileHandler(_) => Role::ProfileHandler,
            Built::PrefixProducer(_)
            | Built::CostProducer(_)
            | Built::P2pSource(_)
            | Built::TokenProducer(_) => Role::DataProducer,
            Built::SaturationDetector(_) => Role::SaturationDetector,
            Built::Fairness(_) => Role::FairnessPolicy,
            Built::Ordering(_) => Role::OrderingPolicy,
            Built::UsageLimit(_) => Role::UsageLimitPolicy,
            Built::AgentIdentity(_) => Role::RequestHeaderProcessor,
            Built::Response(_) => Role::ResponsePlugin,
            Built::MetricsSource(_) => Role::DataSource,
            Built::MetricsExtractor(_) => Role::DataExtractor,
            Built::Inert { role, .. } => *role,
        }
    }
}

// === impl Entry ===

impl Entry {
    const fn new(
        type_name: &'static str,
        role: Role,
        build: fn(&mut Params<'_>) -> Result<Built, ConfigError>,
    ) -> Self {
        Self {
            type_name,
            role,
            alias_of: None,
            factory: Factory::Build(build),
        }
    }

    const fn alias(
        type_name: &'static str,
        alias_of: &'static str,
        role: Role,
        build: fn(&mut Params<'_>) -> Result<Built, ConfigError>,
    ) -> Self {
        Self {
            type_name,
            role,
            alias_of: Some(alias_of),
            factory: Factory::Build(build),
        }
    }

    const fn inert(
        type_name: &'static str,
        role: Role,
        reason: &'static str,
        parameters: fn(&mut Params<'_>) -> Result<(), ConfigError>,
    ) -> Self {
        Self {
            type_name,
            role,
            alias_of: None,
            factory: Factory::Inert { reason, parameters },
        }
    }

    /// Builds an instance from `params`; an inert type says so in a warning.
    pub fn build(&self, params: &mut Params<'_>) -> Result<Built, ConfigError> {
        match self.factory {
            Factory::Build(build) => build(params),
            Factory::Inert { reason, parameters } => {
                parameters(params)?;
                params.warn(format_args!("accepted but inert: {reason}"));
                Ok(Built::Inert {
                    role: self.role,
                    reason,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use yaml_serde::Value;

    use super::*;
    use crate::scheduling::Plugin;

    /// The type name a built plugin reports, where it has one.
    fn reported_type(built: &Built) -> Option<&'static str> {
        let plugin: &dyn Plugin = match built {
            Built::Filter(f) => f.as_ref(),
            Built::Scorer(s) => s.as_ref(),
            Built::PreciseScorer(s) => s.as_ref(),
            Built::Picker(p) => p.as_ref(),
            Built::ProfileHandler(h) => h.as_ref(),
            Built::PrefixProducer(p) => p.as_ref(),
            Built::CostProducer(p) => p.as_ref(),
            Built::P2pSource(p) => p.as_ref(),
            Built::SaturationDetector(d) => d.as_ref(),
            Built::Fairness(f) => return Some(f.type_name()),
            Built::Ordering(o) => return Some(o.type_name()),
            Built::UsageLimit(u) => return Some(u.type_name()),
            Built::Response(_)
            | Built::TokenProducer(_)
            | Built::MetricsSource(_)
            | Built::MetricsExtractor(_)
            | Built::AgentIdentity(_)
            | Built::Inert { .. } => return None,
        };
        Some(plugin.type_name())
    }

    /// The least a type needs: most need nothing.
    fn required_parameters(type_name: &str) -> Option<Value> {
        let yaml = match type_name {
            "k8s-notification-source" => "{version: v1, kind: Pod}",
            "by-label" => "{label: role, validValues: [decode]}",
            "priority-holdback-policy" => "{minCeiling: 0.4}",
            "priority-packing-scorer" => "{endpointCapacity: 16}",
            _ => return None,
        };
        Some(yaml_serde::from_str(yaml).unwrap())
    }

    #[test]
    fn every_type_builds_what_it_declares() {
        for entry in REGISTRY {
            let mut warnings = Vec::new();
            let parameters = required_parameters(entry.type_name);
            let mut params = Params::new("p", entry.type_name, parameters.as_ref(), &mut warnings);
            let built = entry
                .build(&mut params)
                .unwrap_or_else(|e| panic!("{}: {e}", entry.type_name));
            assert_eq!(built.role(), entry.role, "{}", entry.type_name);
            if let Some(reported) = reported_type(&built) {
                assert_eq!(
                    reported,
                    entry.alias_of.unwrap_or(entry.type_name),
                    "{} builds a plugin of another type",
                    entry.type_name
                );
            }
            match entry.factory {
                Factory::Inert { .. } => assert_eq!(warnings.len(), 1, "{}", entry.type_name),
                // The conformance filter is built, and warned about (any client picks its
                // endpoints with it).
                Factory::Build(_) if entry.type_name == "header-based-testing-filter" => {
                    assert_eq!(warnings.len(), 1, "{}", entry.type_name)
                }
                Factory::Build(_) => {
                    assert!(warnings.is_empty(), "{}: {warnings:?}", entry.type_name)
                }
            }
        }
    }

    #[test]
    fn parameters_nobody_reads_are_warned_about() {
        let extra: Value = yaml_serde::from_str("{typo: 1}").unwrap();
        for type_name in [
            "queue-scorer",
            "openai-parser",
            "destination-endpoint-served-verifier",
        ] {
            let mut warnings = Vec::new();
            let entry = lookup(type_name).unwrap();
            entry
                .build(&mut Params::new(
                    "p",
                    type_name,
                    Some(&extra),
                    &mut warnings,
                ))
                .unwrap();
            assert!(
                warnings.iter().any(|w| w.contains("\"typo\"")),
                "{type_name}: {warnings:?}"
            );
        }
    }

    #[test]
    fn inert_types_check_their_parameters_as_the_reference_does() {
        let cases = [
            ("inflight-load-producer", "{outputRatio: -1}", "outputRatio"),
            (
                "inflight-load-producer",
                "{maxEstimatedOutputTokens: -1}",
                "maxEstimatedOutputTokens",
            ),
            (
                "k8s-notification-source",
                "{group: apps, version: v1}",
                "kind",
            ),
            ("k8s-notification-source", "{kind: Pod}", "version"),
        ];
        for (type_name, yaml, parameter) in cases {
            let value: Value = yaml_serde::from_str(yaml).unwrap();
            let mut warnings = Vec::new();
            let err = lookup(type_name)
                .unwrap()
                .build(&mut Params::new(
                    "p",
                    type_name,
                    Some(&value),
                    &mut warnings,
                ))
                .unwrap_err()
                .to_string();
            assert!(err.contains(parameter), "{type_name} {yaml}: {err}");
        }
        assert!(
            lookup("k8s-notification-source")
                .unwrap()
                .build(&mut Params::new(
                    "p",
                    "k8s-notification-source",
                    None,
                    &mut Vec::new()
                ))
                .is_err()
        );
    }

    #[test]
    fn types_are_unique_and_aliases_point_at_real_types() {
        let mut seen = HashSet::new();
        for entry in REGISTRY {
            assert!(seen.insert(entry.type_name), "{} twice", entry.type_name);
            assert_eq!(
                lookup(entry.type_name).map(|e| e.type_name),
                Some(entry.type_name)
            );
            if let Some(target) = entry.alias_of {
                let target = lookup(target).unwrap_or_else(|| panic!("{target} unknown"));
                assert_eq!(target.role, entry.role, "{}", entry.type_name);
                assert!(
                    target.alias_of.is_none(),
                    "{} aliases an alias",
                    entry.type_name
                );
            }
        }
        assert!(lookup("warp-drive-scorer").is_none());
    }
}
