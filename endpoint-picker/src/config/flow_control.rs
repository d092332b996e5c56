//! The flow-control phase of loading: the `flowControl` section and the policy plugins it
//! names become a [`FlowConfig`], with the reference's defaults, validation and messages
//! (llm-d-router `pkg/epp/config/loader/flowcontrol.go`, `pkg/epp/flowcontrol/registry/config.go`).

use std::sync::Arc;
use std::time::Duration;

use yaml_serde::Value;

use super::ConfigError;
use super::gates::{self, FeatureGates};
use super::instances::{Instance, Plugins};
use super::params::{Params, parse_duration};
use super::types::{EndpointPickerConfig, FlowControlSpec, PriorityBandSpec};
use crate::flow::config::{
    BandConfig, DEFAULT_BAND_MAX_BYTES, DEFAULT_BAND_MAX_REQUESTS, DEFAULT_REQUEST_TTL, FlowConfig,
    parse_quantity,
};
use crate::scheduling::registry::{self, Built};

/// The policies a band gets when it names none, and the usage-limit policy by default: the
/// reference registers a plugin of each under its type name when none has that name.
const DEFAULT_FAIRNESS: &str = "global-strict-fairness-policy";
const DEFAULT_ORDERING: &str = "fcfs-ordering-policy";
const DEFAULT_USAGE_LIMIT: &str = "static-usage-limit-policy";

/// Reads the section: `None` with the gate off (its settings other than the saturation
/// detector are then ignored, with the reference's warning).
pub(super) fn build(
    doc: &EndpointPickerConfig,
    gates: &FeatureGates,
    plugins: &mut Plugins<'_>,
    warnings: &mut Vec<String>,
) -> Result<Option<FlowConfig>, ConfigError> {
    let section = doc.flow_control.clone().unwrap_or_default();
    if !gates.enabled(gates::FLOW_CONTROL) {
        let set = section.settings();
        if !set.is_empty() {
            warnings.push(format!(
                "the flowControl config section is set but the flowControl feature gate is \
                 disabled; its settings (other than saturationDetector) are ignored ({})",
                set.join(", ")
            ));
        }
        return Ok(None);
    }
    let mut config = FlowConfig {
        max_bytes: global_cap(section.max_bytes.as_ref(), "MaxBytes")?,
        max_requests: global_cap(section.max_requests.as_ref(), "MaxRequests")?,
        eviction: section.enable_eviction.unwrap_or(false),
        ..FlowConfig::default()
    };
    let (request_ttl, no_endpoint_ttl) = ttls(&section)?;
    config.request_ttl = request_ttl;
    config.no_endpoint_ttl = no_endpoint_ttl;
    config.default_band = band(
        section.default_priority_band.as_ref(),
        plugins,
        "defaultPriorityBand",
        warnings,
    )?;
    config.default_negative_band = match &section.default_negative_priority_band {
        Some(spec) => band(Some(spec), plugins, "defaultNegativePriorityBand", warnings)?,
        None => config.default_band.clone(),
    };
    let mut bands: Vec<BandConfig> = Vec::new();
    for spec in &section.priority_bands {
        if bands.iter().any(|b| b.priority == spec.priority) {
            return Err(flow_error(format!(
                "duplicate priority level {}",
                spec.priority
            )));
        }
        let context = format!("priority band {}", spec.priority);
        bands.push(BandConfig {
            priority: spec.priority,
            ..band(Some(spec), plugins, &context, warnings)?
        });
    }
    if !bands.iter().any(|b| b.priority == 0) {
        bands.push(config.template(0));
    }
    bands.sort_by_key(|b| std::cmp::Reverse(b.priority));
    config.bands = bands;
    let usage = section
        .usage_limit_policy_plugin_ref
        .as_deref()
        .unwrap_or(DEFAULT_USAGE_LIMIT);
    config.usage_limit = match resolve(plugins, usage, warnings)? {
        Built::UsageLimit(u) => u.clone(),
        other => return Err(wrong_type(usage, "UsageLimitPolicy", other)),
    };
    Ok(Some(config))
}

/// The agent-identity headers, when an `agent-identity` plugin is declared.
pub(super) fn agent_identity(plugins: &Plugins<'_>) -> Option<Arc<[String]>> {
    plugins.iter().find_map(|i| match &i.built {
        Built::AgentIdentity(h) => Some(h.clone()),
        _ => None,
    })
}

fn flow_error(reason: String) -> ConfigError {
    ConfigError::FlowControl(reason)
}

/// A global cap: omitted or 0 = unlimited; negative is an error.
fn global_cap(value: Option<&Value>, name: &str) -> Result<u64, ConfigError> {
    match quantity(value, &format!("global {name}"))? {
        Some(n) if n < 0 => Err(flow_error(format!("global {name} must be non-negative"))),
        Some(n) => u64::try_from(n).map_err(|_| flow_error(format!("global {name} too large"))),
        None => Ok(0),
    }
}

/// A band cap: omitted or 0 = `default`; negative is an error.
fn band_cap(
    value: Option<&Value>,
    context: &str,
    name: &str,
    default: u64,
) -> Result<u64, ConfigError> {
    match quantity(value, &format!("{context} {name}"))? {
        Some(n) if n < 0 => Err(flow_error(format!(
            "{context}: {name} must be non-negative"
        ))),
        Some(0) | None => Ok(default),
        Some(n) => u64::try_from(n).map_err(|_| flow_error(format!("{context}: {name} too large"))),
    }
}

/// A Kubernetes quantity written as a string or a number.
fn quantity(value: Option<&Value>, what: &str) -> Result<Option<i128>, ConfigError> {
    let text = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(flow_error(format!("{what}: not a quantity: {other:?}")));
        }
    };
    parse_quantity(&text)
        .map(Some)
        .ok_or_else(|| flow_error(format!("{what}: not a quantity: {text:?}")))
}

/// A Go duration (`60s`, `1m`, `0s`); negative is an error.
fn duration(text: Option<&str>, name: &str) -> Result<Option<Duration>, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let t = text.trim();
    if let Some(rest) = t.strip_prefix('-')
        && parse_duration(rest).is_some_and(|d| !d.is_zero())
    {
        return Err(flow_error(format!(
            "{name} must be non-negative, got {t:?}"
        )));
    }
    match parse_duration(t) {
        Some(d) if d > MAX_TTL => Err(flow_error(format!(
            "{name}: {t:?} is longer than {} days; use 0 for no limit",
            MAX_TTL.as_secs() / 86_400
        ))),
        Some(d) => Ok(Some(d)),
        None => Err(flow_error(format!(
            "{name}: not a duration (with a unit, e.g. 60s): {t:?}"
        ))),
    }
}

/// The longest TTL taken: a year. Longer ones are typos or "forever", which is written 0.
const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

/// `defaultRequestTTL` (60s when omitted; 0 = no TTL) and `noEndpointRequestTTL` (follows
/// `defaultRequestTTL` when omitted, as it is written; 0 = wait for an endpoint forever).
fn ttls(section: &FlowControlSpec) -> Result<(Option<Duration>, Option<Duration>), ConfigError> {
    let default = duration(section.default_request_ttl.as_deref(), "defaultRequestTTL")?;
    let empty = duration(
        section.no_endpoint_request_ttl.as_deref(),
        "noEndpointRequestTTL",
    )?;
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    let request_ttl = nonzero(default.unwrap_or(DEFAULT_REQUEST_TTL));
    let no_endpoint_ttl = match (empty, default) {
        (Some(e), _) => nonzero(e),
        (None, Some(d)) => nonzero(d),
        (None, None) => Some(DEFAULT_REQUEST_TTL),
    };
    Ok((request_ttl, no_endpoint_ttl))
}

/// One band's settings from its spec (or the defaults when there is none).
fn band(
    spec: Option<&PriorityBandSpec>,
    plugins: &mut Plugins<'_>,
    context: &str,
    warnings: &mut Vec<String>,
) -> Result<BandConfig, ConfigError> {
    let default = PriorityBandSpec::default();
    let spec = spec.unwrap_or(&default);
    let fairness_ref = spec
        .fairness_policy_ref
        .as_deref()
        .unwrap_or(DEFAULT_FAIRNESS);
    let fairness = match resolve(plugins, fairness_ref, warnings)? {
        Built::Fairness(f) => f.clone(),
        other => return Err(wrong_type(fairness_ref, "FairnessPolicy", other)),
    };
    let ordering_ref = spec
        .ordering_policy_ref
        .as_deref()
        .unwrap_or(DEFAULT_ORDERING);
    let ordering = match resolve(plugins, ordering_ref, warnings)? {
        Built::Ordering(o) => *o,
        other => return Err(wrong_type(ordering_ref, "OrderingPolicy", other)),
    };
    Ok(BandConfig {
        priority: spec.priority,
        max_requests: band_cap(
            spec.max_requests.as_ref(),
            context,
            "maxRequests",
            DEFAULT_BAND_MAX_REQUESTS,
        )?,
        max_bytes: band_cap(
            spec.max_bytes.as_ref(),
            context,
            "maxBytes",
            DEFAULT_BAND_MAX_BYTES,
        )?,
        fairness: (Arc::from(fairness_ref), fairness),
        ordering: (Arc::from(ordering_ref), ordering),
    })
}

/// The plugin named `name`; the three default policies are made under their type names when
/// no plugin has that name (the reference's auto-registration).
fn resolve<'p>(
    plugins: &'p mut Plugins<'_>,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<&'p Built, ConfigError> {
    if plugins.get(name).is_none()
        && matches!(
            name,
            DEFAULT_FAIRNESS | DEFAULT_ORDERING | DEFAULT_USAGE_LIMIT
        )
        && let Some(entry) = registry::lookup(name)
    {
        let built = entry.build(&mut Params::new(name, entry.type_name, None, warnings))?;
        plugins.add(Instance {
            name: name.to_owned(),
            type_name: entry.type_name,
            parameters: None,
            built,
        })?;
    }
    plugins
        .get(name)
        .map(|i| &i.built)
        .ok_or_else(|| flow_error(format!("plugin {name:?} not found")))
}

fn wrong_type(name: &str, expected: &str, built: &Built) -> ConfigError {
    flow_error(format!(
        "plugin {name:?} does not implement {expected} (actual type: {})",
        built.role().describe()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_defaults_follow_the_reference() {
        let spec = |d: Option<&str>, e: Option<&str>| FlowControlSpec {
            default_request_ttl: d.map(str::to_owned),
            no_endpoint_request_ttl: e.map(str::to_owned),
            ..FlowControlSpec::default()
        };
        let s = |secs| Some(Duration::from_secs(secs));
        assert_eq!(ttls(&spec(None, None)).unwrap(), (s(60), s(60)));
        assert_eq!(
            ttls(&spec(Some("1m"), Some("5m"))).unwrap(),
            (s(60), s(300))
        );
        assert_eq!(ttls(&spec(Some("30s"), None)).unwrap(), (s(30), s(30)));
        assert_eq!(ttls(&spec(Some("0s"), None)).unwrap(), (None, None));
        assert_eq!(ttls(&spec(None, Some("0s"))).unwrap(), (s(60), None));
        let e = ttls(&spec(Some("-5s"), None)).unwrap_err().to_string();
        assert!(e.contains("defaultRequestTTL must be non-negative"), "{e}");
        let e = ttls(&spec(None, Some("soon"))).unwrap_err().to_string();
        assert!(e.contains("noEndpointRequestTTL: not a duration"), "{e}");
    }
}
