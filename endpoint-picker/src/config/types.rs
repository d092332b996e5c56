//! The `EndpointPickerConfig` document as written by users (serde types only).

use serde::Deserialize;

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
    /// Feature gates (`flowControl`, `dataLayer`, `enableLegacyMetrics`, …).
    #[serde(default)]
    pub feature_gates: Vec<String>,
    /// Plugin instances.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Scheduling profiles.
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
    /// The saturation detector.
    pub saturation_detector: Option<PluginRef>,
    /// Data layer wiring (v1.5+ key).
    pub data_layer: Option<DataLayerSpec>,
    /// Data layer wiring (v1.4 key).
    pub data: Option<DataLayerSpec>,
    /// Flow control (accepted; queueing is not implemented yet).
    pub flow_control: Option<yaml_serde::Value>,
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
    pub parameters: Option<yaml_serde::Value>,
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
