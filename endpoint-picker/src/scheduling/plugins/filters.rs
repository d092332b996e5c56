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
    pub fn parse_list(s: &str) -> Vec<Self> {
        s.split(',').filter_map(Self::parse).collect()
    }
}

/// `header-based-testing-filter` (conformance only): keeps the endpoints named by the request
/// header `test-epp-endpoint-selection`; without the header, nothing passes.
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
/// match every `matchLabels` entry.
#[derive(Debug)]
pub struct LabelSelectorFilter {
    /// Configured name.
    pub name: String,
    /// Required labels.
    pub match_labels: Vec<(String, String)>,
}
plugin_named!(LabelSelectorFilter, "label-selector-filter");

/// `label-selector-filter` parameters (a Kubernetes label selector).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelectorYaml {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

impl LabelSelectorFilter {
    /// The filter its `parameters` describe.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: LabelSelectorYaml = p.decode()?;
        Ok(Self {
            name: p.name(),
            match_labels: y.match_labels.into_iter().collect(),
        })
    }
}

impl Filter for LabelSelectorFilter {
    fn filter(&self, _: &InferenceRequest, _: &CycleState, c: Vec<Candidate>) -> Vec<Candidate> {
        c.into_iter()
            .filter(|cand| {
                self.match_labels
                    .iter()
                    .all(|(k, v)| cand.endpoint.spec.labels.get(k).is_some_and(|got| got == v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduling::plugins::test_util::{candidates, metrics};

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
            AddressMatcher::parse_list("10.0.0.1, nonsense ,,10.0.0.2").len(),
            2
        );
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
        };
        let got = f.filter(
            &InferenceRequest::default(),
            &CycleState::new(tokio::time::Instant::now()),
            c,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].endpoint.spec.name, "pod-2-rank-0");
    }
}
