//! Filters: remove candidates.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use super::scorers::plugin_named;
use crate::config::ConfigError;
use crate::config::params::Params;
use crate::request::InferenceRequest;
use crate::scheduling::framework::{Candidate, CycleState, Filter, Plugin};

/// The header the conformance suite uses to name the endpoints it expects.
pub const TEST_ENDPOINT_SELECTION_HEADER: &str = "test-epp-endpoint-selection";

/// An endpoint selector from a header or hint: an IP (every port) or an exact `ip:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressMatcher {
    /// Any port of this IP.
    Ip(IpAddr),
    /// Exactly this address.
    Socket(SocketAddr),
}

impl AddressMatcher {
    /// Parses `10.0.0.1`, `10.0.0.1:8000`, `fd00::1`, `[fd00::1]` or `[fd00::1]:8000`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Some(Self::Socket(sa));
        }
        let bare = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        bare.parse::<IpAddr>().ok().map(Self::Ip)
    }

    /// Whether `addr` is selected.
    pub fn matches(&self, addr: SocketAddr) -> bool {
        match self {
            Self::Ip(ip) => addr.ip() == *ip,
            Self::Socket(sa) => addr == *sa,
        }
    }

    /// Parses a comma-separated list, skipping empty and malformed entries.
    /// Parses a comma-separated list, its first [`MAX_LISTED_ADDRESSES`] entries only (the
    /// list comes from a client's header: each entry is compared with every candidate).
    pub fn parse_list(s: &str) -> Vec<Self> {
        s.split(',')
            .take(MAX_LISTED_ADDRESSES)
            .filter_map(Self::parse)
            .collect()
    }
}

/// `lora-adapter-filter`: keeps the endpoints whose engine has the request's adapter
/// registered, as the LoRA placement loop last listed them
/// ([`crate::datastore::Endpoint::adapters`]); when no candidate has it (a base-model request,
/// or an adapter not placed yet) every candidate passes. It needs the placement loop (the
/// binary refuses it otherwise: without the lists it would do nothing).
#[derive(Debug)]
pub struct LoraAdapterFilter {
    /// Configured name.
    pub name: String,
}
plugin_named!(LoraAdapterFilter, "lora-adapter-filter");

impl Filter for LoraAdapterFilter {
    fn filter(&self, r: &InferenceRequest, _: &CycleState, c: Vec<Candidate>) -> Vec<Candidate> {
        let target = r.target_model.as_str();
        let holds = |cand: &Candidate| cand.endpoint.adapters().is_some_and(|a| a.contains(target));
        if !c.iter().any(holds) {
            return c;
        }
        c.into_iter().filter(holds).collect()
    }
}

/// Most entries of an address list read ([`AddressMatcher::parse_list`]).
pub const MAX_LISTED_ADDRESSES: usize = 16;

/// `header-based-testing-filter` (conformance only): keeps the endpoints named by the request
/// header `test-epp-endpoint-selection`; without the header, nothing passes. Any client can
/// then pick its endpoints, so loading it is warned about.
#[derive(Debug)]
pub struct HeaderBasedTestingFilter {
    /// Configured name.
    pub name: String,
}
plugin_named!(HeaderBasedTestingFilter, "header-based-testing-filter");

impl Filter for HeaderBasedTestingFilter {
    fn filter(&self, r: &InferenceRequest, _: &CycleState, c: Vec<Candidate>) -> Vec<Candidate> {
        let Some(value) = r.header(TEST_ENDPOINT_SELECTION_HEADER) else {
            return Vec::new();
        };
        let wanted = AddressMatcher::parse_list(value);
        // Keep the header's order: the conformance tests read the first as the primary.
        let mut out = Vec::with_capacity(wanted.len());
        for m in &wanted {
            for cand in &c {
                let addr = cand.endpoint.spec.address;
                if m.matches(addr)
                    && !out
                        .iter()
                        .any(|o: &Candidate| o.endpoint.spec.address == addr)
                {
                    out.push(cand.clone());
                }
            }
        }
        out
    }
}

/// `label-selector-filter` (llm-d; also `by-label-selector`): keeps endpoints whose labels
/// match a Kubernetes label selector, every `matchLabels` entry and every `matchExpressions`
/// requirement.
#[derive(Debug)]
pub struct LabelSelectorFilter {
    /// Configured name.
    pub name: String,
    /// Required labels.
    pub match_labels: Vec<(String, String)>,
    /// Required expressions.
    pub match_expressions: Vec<LabelRequirement>,
}
plugin_named!(LabelSelectorFilter, "label-selector-filter");

/// One `matchExpressions` entry of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelRequirement {
    /// The label has one of the values.
    In(String, Vec<String>),
    /// The label is absent or has none of the values.
    NotIn(String, Vec<String>),
    /// The label is present.
    Exists(String),
    /// The label is absent.
    DoesNotExist(String),
}

/// `label-selector-filter` parameters: a Kubernetes `LabelSelector`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelectorYaml {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<RequirementYaml>,
}

/// One `matchExpressions` entry as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequirementYaml {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

/// `by-label` (llm-d; deprecated there for `label-selector-filter`): keeps endpoints whose
/// `label` has one of `validValues`, and, with `allowsNoLabel`, those without the label.
#[derive(Debug)]
pub struct ByLabelFilter {
    /// Configured name.
    pub name: String,
    /// The label looked at.
    pub label: String,
    /// Values that pass.
    pub valid_values: Vec<String>,
    /// Whether endpoints without the label pass.
    pub allows_no_label: bool,
}
plugin_named!(ByLabelFilter, "by-label");

/// `by-label` parameters, as llm-d names them.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ByLabelYaml {
    #[serde(default)]
    label: String,
    #[serde(default)]
    valid_values: Vec<String>,
    #[serde(default)]
    allows_no_label: bool,
}

// === impl LabelSelectorFilter ===

impl LabelSelectorFilter {
    /// The filter its `parameters` describe; requirements are checked as Kubernetes does.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: LabelSelectorYaml = p.decode()?;
        let match_expressions = y
            .match_expressions
            .into_iter()
            .map(|r| r.requirement(p))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: p.name(),
            match_labels: y.match_labels.into_iter().collect(),
            match_expressions,
        })
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|got| got == v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl Filter for LabelSelectorFilter {
    fn filter(&self, _: &InferenceRequest, _: &CycleState, c: Vec<Candidate>) -> Vec<Candidate> {
        c.into_iter()
            .filter(|cand| self.matches(&cand.endpoint.spec.labels))
            .collect()
    }
}

// === impl LabelRequirement ===

impl LabelRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Self::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Self::Exists(k) => labels.contains_key(k),
            Self::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

impl RequirementYaml {
    /// The requirement, checked as Kubernetes checks it: a key, one of the four operators
    /// (spelled exactly so), values for `In` and `NotIn` and none for the others.
    fn requirement(self, p: &Params<'_>) -> Result<LabelRequirement, ConfigError> {
        let Self {
            key,
            operator,
            values,
        } = self;
        if key.is_empty() {
            return Err(p.invalid("matchExpressions", "key is required"));
        }
        let make: fn(String, Vec<String>) -> LabelRequirement = match operator.as_str() {
            "In" => LabelRequirement::In,
            "NotIn" => LabelRequirement::NotIn,
            "Exists" => |k, _| LabelRequirement::Exists(k),
            "DoesNotExist" => |k, _| LabelRequirement::DoesNotExist(k),
            other => {
                return Err(p.invalid(
                    "matchExpressions",
                    format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                ));
            }
        };
        let takes_values = matches!(operator.as_str(), "In" | "NotIn");
        if takes_values == values.is_empty() {
            let reason = if takes_values {
                format!("{operator} needs values")
            } else {
                format!("{operator} takes no values")
            };
            return Err(p.invalid("matchExpressions", reason));
        }
        Ok(make(key, values))
    }
}

// === impl ByLabelFilter ===

impl ByLabelFilter {
    /// The filter its `parameters` describe: `label` is required, and so is a valid value
    /// unless endpoints without the label pass.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: ByLabelYaml = p.decode()?;
        if y.label.is_empty() {
            return Err(p.invalid("label", "required"));
        }
        if y.valid_values.is_empty() && !y.allows_no_label {
            return Err(p.invalid(
                "validValues",
                "must not be empty unless allowsNoLabel is true",
            ));
        }
        Ok(Self {
            name: p.name(),
            label: y.label,
            valid_values: y.valid_values,
            allows_no_label: y.allows_no_label,
        })
    }
}

impl Filter for ByLabelFilter {
    fn filter(&self, _: &InferenceRequest, _: &CycleState, c: Vec<Candidate>) -> Vec<Candidate> {
        c.into_iter()
            .filter(|cand| match cand.endpoint.spec.labels.get(&self.label) {
                Some(v) => self.valid_values.contains(v),
                // As upstream: a missing label reads as "", which a valid value may be.
                None => self.allows_no_label || self.valid_values.iter().any(String::is_empty),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_util::{build_from_yaml, candidates, metrics};

    #[test]
    fn address_matchers() {
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        assert!(AddressMatcher::parse("10.0.0.1").unwrap().matches(a));
        assert!(AddressMatcher::parse("10.0.0.1:8000").unwrap().matches(a));
        assert!(!AddressMatcher::parse("10.0.0.1:8001").unwrap().matches(a));
        let v6: SocketAddr = "[fd00::1]:8000".parse().unwrap();
        assert!(AddressMatcher::parse("[fd00::1]").unwrap().matches(v6));
        assert!(AddressMatcher::parse("fd00::1").unwrap().matches(v6));
        assert!(AddressMatcher::parse("[fd00::1]:8000").unwrap().matches(v6));
        assert_eq!(
            AddressMatcher::parse_list(&"10.0.0.9,".repeat(1000)).len(),
            MAX_LISTED_ADDRESSES,
            "a client's list is read no further than its first entries"
        );
        assert_eq!(
            AddressMatcher::parse_list("10.0.0.1, nonsense ,,10.0.0.2").len(),
            2
        );
    }

    #[test]
    fn lora_adapter_filter_keeps_the_holders_or_everyone() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let f = LoraAdapterFilter { name: "l".into() };
        let state = CycleState::new(tokio::time::Instant::now());
        let req = InferenceRequest {
            target_model: "ad".into(),
            ..Default::default()
        };
        // Nothing listed (placement off): everyone.
        assert_eq!(f.filter(&req, &state, c.clone()).len(), 3);
        let listed = |names: &[&str]| {
            Some(crate::lora::LoadedAdapters {
                names: names.iter().map(|n| (*n).to_owned()).collect(),
            })
        };
        c[0].endpoint.store_adapters(listed(&["other"]));
        c[2].endpoint.store_adapters(listed(&["ad", "other"]));
        let kept = f.filter(&req, &state, c.clone());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].endpoint.id, c[2].endpoint.id);
        // An adapter nobody holds (or the base model): everyone.
        let base = InferenceRequest {
            target_model: "base".into(),
            ..Default::default()
        };
        assert_eq!(f.filter(&base, &state, c).len(), 3);
    }

    #[test]
    fn testing_filter_keeps_named_in_header_order() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let f = HeaderBasedTestingFilter { name: "t".into() };
        let state = CycleState::new(tokio::time::Instant::now());
        let none = f.filter(&InferenceRequest::default(), &state, c.clone());
        assert!(none.is_empty());
        let req = InferenceRequest {
            headers: vec![(
                TEST_ENDPOINT_SELECTION_HEADER.into(),
                "10.0.0.3,10.0.0.1:8000,10.9.9.9".into(),
            )],
            ..Default::default()
        };
        let got: Vec<_> = f
            .filter(&req, &state, c)
            .iter()
            .map(|c| c.endpoint.spec.name.clone())
            .collect();
        assert_eq!(got, vec!["pod-3-rank-0", "pod-1-rank-0"]);
    }

    #[test]
    fn label_selector() {
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let mut labelled = c[1].endpoint.spec.clone();
        labelled
            .labels
            .insert("llm-d.ai/role".into(), "decode".into());
        let ds = crate::datastore::Datastore::new();
        let snap = ds.apply(crate::datastore::PoolSpec {
            endpoints: vec![c[0].endpoint.spec.clone(), labelled],
            ..Default::default()
        });
        let c: Vec<_> = snap.endpoints.iter().cloned().map(Candidate::new).collect();
        let f = LabelSelectorFilter {
            name: "l".into(),
            match_labels: vec![("llm-d.ai/role".into(), "decode".into())],
            match_expressions: Vec::new(),
        };
        let got = f.filter(
            &InferenceRequest::default(),
            &CycleState::new(tokio::time::Instant::now()),
            c,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].endpoint.spec.name, "pod-2-rank-0");
    }

    /// Candidates `pod-1…` carrying the given labels.
    fn labelled(labels: &[&[(&str, &str)]]) -> Vec<Candidate> {
        let plain = candidates(&vec![metrics(0, 0, 0.0); labels.len()]);
        let specs = plain
            .iter()
            .zip(labels)
            .map(|(c, labels)| {
                let mut spec = c.endpoint.spec.clone();
                for (k, v) in *labels {
                    spec.labels.insert((*k).into(), (*v).into());
                }
                spec
            })
            .collect();
        let ds = crate::datastore::Datastore::new();
        let snap = ds.apply(crate::datastore::PoolSpec {
            endpoints: specs,
            ..Default::default()
        });
        snap.endpoints.iter().cloned().map(Candidate::new).collect()
    }

    /// Names of the candidates `filter` keeps.
    fn kept(filter: &dyn Filter, c: Vec<Candidate>) -> Vec<String> {
        let state = CycleState::new(tokio::time::Instant::now());
        filter
            .filter(&InferenceRequest::default(), &state, c)
            .iter()
            .map(|c| c.endpoint.spec.name.clone())
            .collect()
    }

    /// Builds `build` from `yaml` parameters.
    fn from_yaml<T>(
        yaml: &str,
        build: fn(&mut Params<'_>) -> Result<T, ConfigError>,
    ) -> Result<T, String> {
        let (built, warnings) = build_from_yaml("test", yaml, build).map_err(|e| e.to_string())?;
        assert!(warnings.is_empty(), "{warnings:?}");
        Ok(built)
    }

    #[test]
    fn label_selector_expressions() {
        let c = labelled(&[
            &[("role", "decode"), ("zone", "a")],
            &[("role", "prefill")],
            &[("zone", "b")],
        ]);
        let f = |yaml| from_yaml(yaml, LabelSelectorFilter::from_params).unwrap();
        let all = ["pod-1-rank-0", "pod-2-rank-0", "pod-3-rank-0"];
        let cases: [(&str, &[&str]); 6] = [
            ("{}", &all),
            (
                "matchExpressions: [{key: role, operator: In, values: [decode, prefill]}]",
                &all[..2],
            ),
            (
                "matchExpressions: [{key: role, operator: NotIn, values: [decode]}]",
                &all[1..],
            ),
            (
                "matchExpressions: [{key: zone, operator: Exists}]",
                &[all[0], all[2]],
            ),
            (
                "matchExpressions: [{key: zone, operator: DoesNotExist}]",
                &all[1..2],
            ),
            (
                "{matchLabels: {zone: a}, matchExpressions: [{key: role, operator: Exists}]}",
                &all[..1],
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(kept(&f(yaml), c.clone()), want, "{yaml}");
        }
        for (yaml, why) in [
            (
                "matchExpressions: [{key: role, operator: In}]",
                "In needs values",
            ),
            (
                "matchExpressions: [{key: role, operator: Exists, values: [x]}]",
                "takes no values",
            ),
            (
                "matchExpressions: [{key: role, operator: in, values: [x]}]",
                "unknown operator",
            ),
            (
                "matchExpressions: [{key: '', operator: Exists}]",
                "key is required",
            ),
        ] {
            let e = from_yaml(yaml, LabelSelectorFilter::from_params).unwrap_err();
            assert!(e.contains(why), "{yaml}: {e}");
        }
    }

    #[test]
    fn by_label_keeps_valid_values_and_optionally_the_unlabelled() {
        let c = labelled(&[&[("role", "decode")], &[("role", "prefill")], &[]]);
        let f = |yaml| from_yaml(yaml, ByLabelFilter::from_params).unwrap();
        assert_eq!(
            kept(&f("{label: role, validValues: [decode]}"), c.clone()),
            ["pod-1-rank-0"]
        );
        assert_eq!(
            kept(
                &f("{label: role, validValues: [prefill], allowsNoLabel: true}"),
                c.clone()
            ),
            ["pod-2-rank-0", "pod-3-rank-0"]
        );
        assert_eq!(
            kept(&f("{label: role, allowsNoLabel: true}"), c),
            ["pod-3-rank-0"]
        );
        let e = from_yaml("{validValues: [decode]}", ByLabelFilter::from_params).unwrap_err();
        assert!(e.contains("parameter label: required"), "{e}");
        let e = from_yaml("{label: role}", ByLabelFilter::from_params).unwrap_err();
        assert!(e.contains("validValues"), "{e}");
    }
}
