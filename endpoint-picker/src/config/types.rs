//! The `EndpointPickerConfig` document as written by users (serde types only).

use std::collections::BTreeMap;

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

/// The `flowControl` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowControlSpec {
    /// The saturation detector; used whether or not flow control is on.
    pub saturation_detector: Option<PluginRef>,
    /// Everything else (limits, TTLs, priority bands, policies), kept as written: the
    /// reference reads it only with the `flowControl` feature gate on, which is not
    /// implemented here yet.
    #[serde(flatten)]
    pub settings: BTreeMap<String, Value>,
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
