//! The `EndpointPickerConfig` document as written by users (serde types only).

use serde::Deserialize;
use yaml_serde::Value;

/// `apiVersion` values accepted (GIE's and llm-d's).
pub const API_VERSIONS: [&str; 2] = [
    "inference.networking.x-k8s.io/v1alpha1",
    "llm-d.ai/v1alpha1",
];

/// The whole document.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPickerConfig {
    /// One of [`API_VERSIONS`].
    pub api_version: Option<String>,
    /// `EndpointPickerConfig`.
    pub kind: Option<String>,
    /// Feature gates (`flowControl`, `dataLayer`, `enableLegacyMetrics=false`, …).
    #[serde(default)]
    pub feature_gates: Vec<String>,
    /// Plugin instances.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Scheduling profiles.
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
    /// The saturation detector (deprecated upstream for `flowControl.saturationDetector`,
    /// which wins when both are set).
    pub saturation_detector: Option<PluginRef>,
    /// Data layer wiring (v1.5+ key).
    pub data_layer: Option<DataLayerSpec>,
    /// Data layer wiring (v1.4 key).
    pub data: Option<DataLayerSpec>,
    /// Flow control.
    pub flow_control: Option<FlowControlSpec>,
    /// The request parser.
    pub parser: Option<PluginRef>,
}

/// One plugin instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginSpec {
    /// Instance name (defaults to the type).
    pub name: Option<String>,
    /// Registered type.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Type-specific parameters.
    #[serde(default)]
    pub parameters: Option<Value>,
}

impl PluginSpec {
    /// The effective name.
    pub fn effective_name(&self) -> &str {
        self.name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.type_name)
    }
}

/// A scheduling profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileSpec {
    /// Profile name.
    pub name: String,
    /// Plugin references with weights.
    #[serde(default)]
    pub plugins: Vec<ProfilePluginRef>,
}

/// A plugin reference inside a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfilePluginRef {
    /// Name of a plugin instance.
    pub plugin_ref: String,
    /// Weight (scorers only; default 1).
    pub weight: Option<f64>,
}

/// A bare plugin reference.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginRef {
    /// Name of a plugin instance.
    pub plugin_ref: String,
}

/// The `flowControl` section (llm-d-router `FlowControlConfig`), decoded strictly as the
/// reference does (an unknown field is an error). Quantities and durations stay as written
/// here; [`crate::flow::config`] reads and validates them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowControlSpec {
    /// The saturation detector; used whether or not flow control is on.
    pub saturation_detector: Option<PluginRef>,
    /// Global cap on the summed body bytes queued (a Kubernetes quantity; 0 = unlimited).
    pub max_bytes: Option<Value>,
    /// Global cap on the requests queued (a Kubernetes quantity; 0 = unlimited).
    pub max_requests: Option<Value>,
    /// Queue-wait budget while the pool has endpoints (a Go duration; default 60s).
    #[serde(rename = "defaultRequestTTL")]
    pub default_request_ttl: Option<String>,
    /// Queue-wait budget while the pool has none (default: `defaultRequestTTL`).
    #[serde(rename = "noEndpointRequestTTL")]
    pub no_endpoint_request_ttl: Option<String>,
    /// Template of bands made for priorities not listed.
    pub default_priority_band: Option<PriorityBandSpec>,
    /// Template of bands made for negative priorities not listed.
    pub default_negative_priority_band: Option<PriorityBandSpec>,
    /// Bands provisioned up front.
    #[serde(default)]
    pub priority_bands: Vec<PriorityBandSpec>,
    /// The usage-limit policy plugin (default `static-usage-limit-policy`).
    pub usage_limit_policy_plugin_ref: Option<String>,
    /// Make room for higher-priority requests by evicting sheddable ones.
    pub enable_eviction: Option<bool>,
}

impl FlowControlSpec {
    /// The names of the fields set besides `saturationDetector` (what the gate governs).
    pub fn settings(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        let mut note = |on: bool, name: &'static str| {
            if on {
                set.push(name);
            }
        };
        note(self.default_priority_band.is_some(), "defaultPriorityBand");
        note(
            self.default_negative_priority_band.is_some(),
            "defaultNegativePriorityBand",
        );
        note(self.default_request_ttl.is_some(), "defaultRequestTTL");
        note(self.enable_eviction.is_some(), "enableEviction");
        note(self.max_bytes.is_some(), "maxBytes");
        note(self.max_requests.is_some(), "maxRequests");
        note(
            self.no_endpoint_request_ttl.is_some(),
            "noEndpointRequestTTL",
        );
        note(!self.priority_bands.is_empty(), "priorityBands");
        note(
            self.usage_limit_policy_plugin_ref.is_some(),
            "usageLimitPolicyPluginRef",
        );
        set
    }
}

/// One priority band (llm-d-router `PriorityBandConfig`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriorityBandSpec {
    /// The band's priority (higher is more important); ignored in the templates.
    #[serde(default)]
    pub priority: i32,
    /// Cap on the band's queued body bytes (omitted or 0 = 1,000,000,000).
    pub max_bytes: Option<Value>,
    /// Cap on the band's queued requests (omitted or 0 = 5000).
    pub max_requests: Option<Value>,
    /// The fairness policy plugin (default `global-strict-fairness-policy`).
    pub fairness_policy_ref: Option<String>,
    /// The ordering policy plugin (default `fcfs-ordering-policy`).
    pub ordering_policy_ref: Option<String>,
}

/// Data layer wiring.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataLayerSpec {
    /// Sources and their extractors.
    #[serde(default)]
    pub sources: Vec<DataSourceSpec>,
}

/// One data source.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataSourceSpec {
    /// The source plugin.
    pub plugin_ref: String,
    /// Its extractors.
    #[serde(default)]
    pub extractors: Vec<PluginRef>,
}
