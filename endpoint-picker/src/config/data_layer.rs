//! The data layer plugins: `metrics-data-source` (where engine metrics are scraped) and
//! `core-metrics-extractor` (how they are read), folded into [`ScrapeSettings`].
//!
//! They live here rather than beside the scraper because they only describe its settings;
//! the scraper itself takes those settings from the binary.

use serde::Deserialize;

use super::ConfigError;
use super::params::Params;
use crate::scrape::engine::{CacheInfoSpec, SpecError};
use crate::scrape::{EngineMapping, MetricSpec, MetricsScheme};

/// How engine metrics are scraped, as configured by `metrics-data-source` and
/// `core-metrics-extractor`.
#[derive(Debug, Clone)]
pub struct ScrapeSettings {
    /// `scheme`, when a plugin sets it (it wins over `--model-server-metrics-scheme`).
    pub scheme: Option<MetricsScheme>,
    /// `insecureSkipVerify`, when a plugin sets it (it wins over
    /// `--model-server-metrics-https-insecure-skip-verify`).
    pub insecure_skip_verify: Option<bool>,
    /// Metrics path, when a `metrics-data-source` gives one (it wins over
    /// `--model-server-metrics-path`, whatever its value, even `/metrics`).
    pub path: Option<String>,
    /// Pod label naming the engine (checked before the well-known ones).
    pub engine_label_key: Option<String>,
    /// Engine used without a label.
    pub default_engine: String,
    /// Mappings by engine name.
    pub engines: Vec<EngineMapping>,
}

/// What one `metrics-data-source` sets.
#[derive(Debug, Clone, Default)]
pub struct MetricsSource {
    scheme: Option<MetricsScheme>,
    path: Option<String>,
    insecure_skip_verify: Option<bool>,
}

/// What one `core-metrics-extractor` sets.
#[derive(Debug, Clone, Default)]
pub struct MetricsExtractor {
    engine_label_key: Option<String>,
    default_engine: Option<String>,
    engines: Vec<EngineMapping>,
}

/// `metrics-data-source` parameters, with the reference's names.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetricsSourceYaml {
    scheme: Option<String>,
    path: Option<String>,
    /// With https: skip certificate verification (the reference's default, true).
    insecure_skip_verify: Option<bool>,
}

/// `core-metrics-extractor` parameters, with the reference's names.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExtractorYaml {
    engine_label_key: Option<String>,
    default_engine: Option<String>,
    #[serde(default)]
    engine_configs: Vec<EngineConfigYaml>,
}

/// One entry of `engineConfigs`: the metric names of an engine.
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

// === impl ScrapeSettings ===

impl Default for ScrapeSettings {
    fn default() -> Self {
        Self {
            scheme: None,
            insecure_skip_verify: None,
            path: None,
            engine_label_key: None,
            default_engine: "vllm".into(),
            engines: EngineMapping::builtin(),
        }
    }
}

impl ScrapeSettings {
    /// Applies a `metrics-data-source`.
    pub fn apply_source(&mut self, source: &MetricsSource) {
        if let Some(scheme) = source.scheme {
            self.scheme = Some(scheme);
        }
        if let Some(skip) = source.insecure_skip_verify {
            self.insecure_skip_verify = Some(skip);
        }
        if let Some(path) = &source.path {
            self.path = Some(path.clone());
        }
    }

    /// Applies a `core-metrics-extractor`: its label key replaces ours, and each of its
    /// engine configs replaces the built-in mapping of that name wholesale.
    pub fn apply_extractor(&mut self, extractor: &MetricsExtractor) {
        // Only a key that is said replaces ours: a second extractor without one kept the
        // first's out.
        if let Some(key) = &extractor.engine_label_key {
            self.engine_label_key = Some(key.clone());
        }
        if let Some(d) = &extractor.default_engine {
            self.default_engine.clone_from(d);
        }
        for mapping in &extractor.engines {
            self.engines.retain(|m| m.name != mapping.name);
            self.engines.push(mapping.clone());
        }
    }
}

// === impl MetricsSource ===

impl MetricsSource {
    /// The source its `parameters` describe.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: MetricsSourceYaml = p.decode()?;
        let scheme = match &y.scheme {
            Some(s) => Some(s.parse().map_err(|e: String| p.invalid("scheme", e))?),
            None => None,
        };
        Ok(Self {
            scheme,
            insecure_skip_verify: y.insecure_skip_verify,
            path: y.path.map(|path| {
                if path.starts_with('/') {
                    path
                } else {
                    format!("/{path}")
                }
            }),
        })
    }
}

// === impl MetricsExtractor ===

impl MetricsExtractor {
    /// The extractor its `parameters` describe.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: ExtractorYaml = p.decode()?;
        let engines: Vec<EngineMapping> = y
            .engine_configs
            .iter()
            .map(|e| e.mapping(p))
            .collect::<Result<_, _>>()?;
        // Names are read as the engine label is (`SGLang` is `sglang`, upstream's
        // `triton-tensorrt-llm` our `triton`): a mapping spelled otherwise could never be
        // picked, and the built-in one it meant to replace would be used without a word.
        for (i, mapping) in engines.iter().enumerate() {
            if mapping.name.is_empty() {
                return Err(p.invalid("engineConfigs", "an engine config has no name"));
            }
            if engines[..i].iter().any(|m| m.name == mapping.name) {
                return Err(p.invalid(
                    "engineConfigs",
                    format!("two engine configs name the engine {:?}", mapping.name),
                ));
            }
        }
        // Spelled as the engine label is read (upstream's `triton-tensorrt-llm` is our
        // `triton`), and naming a mapping that exists: a typo here would leave every
        // unlabelled endpoint unscraped and the pool never ready.
        let default_engine = y
            .default_engine
            .filter(|d| !d.trim().is_empty())
            .map(|d| crate::scrape::scraper::canonical_engine(&d));
        if let Some(d) = &default_engine {
            let builtin = EngineMapping::builtin();
            let known: Vec<&str> = builtin
                .iter()
                .chain(&engines)
                .map(|m| m.name.as_str())
                .collect();
            if !known.contains(&d.as_str()) {
                return Err(p.invalid(
                    "defaultEngine",
                    format!(
                        "{d:?} is neither a built-in engine nor one of engineConfigs: {known:?}"
                    ),
                ));
            }
        }
        Ok(Self {
            engine_label_key: y.engine_label_key.filter(|k| !k.is_empty()),
            default_engine,
            engines,
        })
    }
}

// === impl EngineConfigYaml ===

impl EngineConfigYaml {
    fn mapping(&self, p: &Params<'_>) -> Result<EngineMapping, ConfigError> {
        let spec = |parameter: &'static str, s: &Option<String>| match s {
            None => Ok(Vec::new()),
            Some(s) => {
                Ok(vec![s.parse::<MetricSpec>().map_err(|e: SpecError| {
                    p.invalid(parameter, e.to_string())
                })?])
            }
        };
        let cache_info = match &self.cache_info_spec {
            None => None,
            Some(s) => Some(CacheInfoSpec::Labels {
                metric: s
                    .parse()
                    .map_err(|e: SpecError| p.invalid("cacheInfoSpec", e.to_string()))?,
                block_size_label: "block_size".into(),
                num_blocks_label: "num_gpu_blocks".into(),
            }),
        };
        let name = crate::scrape::scraper::canonical_engine(&self.name);
        Ok(EngineMapping {
            queued: spec("queuedRequestsSpec", &self.queued_requests_spec)?,
            running: spec("runningRequestsSpec", &self.running_requests_spec)?,
            kv_usage: spec("kvUsageSpec", &self.kv_usage_spec)?,
            lora_info: spec("loraSpec", &self.lora_spec)?.into_iter().next(),
            cache_info,
            // A mapping that replaces a built-in engine's keeps that engine's readiness signal.
            readiness: EngineMapping::builtin()
                .into_iter()
                .find(|m| m.name == name)
                .and_then(|m| m.readiness),
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second `core-metrics-extractor` that names no label key keeps the first one's.
    #[test]
    fn an_extractor_without_a_label_key_keeps_the_one_set() {
        let mut settings = ScrapeSettings::default();
        settings.apply_extractor(&MetricsExtractor {
            engine_label_key: Some("my.io/engine".into()),
            ..MetricsExtractor::default()
        });
        settings.apply_extractor(&MetricsExtractor::default());
        assert_eq!(settings.engine_label_key.as_deref(), Some("my.io/engine"));
        settings.apply_extractor(&MetricsExtractor {
            engine_label_key: Some("other.io/engine".into()),
            ..MetricsExtractor::default()
        });
        assert_eq!(
            settings.engine_label_key.as_deref(),
            Some("other.io/engine")
        );
    }
}
