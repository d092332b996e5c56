//! Upstream's sidecar format (gateway-api-inference-extension `tools/dynamic-lora-sidecar`):
//!
//! ```yaml
//! vLLMLoRAConfig:
//!   name: vllm-llama3-8b          # optional
//!   host: localhost               # optional, default localhost
//!   port: 8000                    # optional, default 8000
//!   defaultBaseModel: meta-llama/Llama-3.1-8B-Instruct   # optional
//!   ensureExist:
//!     models:
//!     - id: food-review-1
//!       source: Kawon/llama3.1-food-finetune_v14_r8
//!       base-model: meta-llama/Llama-3.1-8B-Instruct     # optional
//!   ensureNotExist:
//!     models:
//!     - id: ski-resorts
//!       source: /adapters/ski-resorts
//! ```
//!
//! The file is written by an operator but read by a process that acts on an engine, so it is
//! checked: ids and sources non-empty, printable and bounded, at most [`MAX_ADAPTERS`]
//! adapters, and (with validation on, upstream's default) no unknown keys. An id in both lists
//! is skipped, as upstream skips it, and reported.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// Most adapters one file may declare (both lists together).
pub const MAX_ADAPTERS: usize = 1_000;
/// Longest adapter id, in bytes (a model name, as the EPP bounds it).
pub const MAX_ID_BYTES: usize = 256;
/// Longest source, in bytes.
pub const MAX_SOURCE_BYTES: usize = 4_096;
/// Largest config file read.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// Why a config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML of the expected shape.
    #[error("not a vLLMLoRAConfig: {0}")]
    Parse(String),
    /// A key the format does not have (with `--config-validation`).
    #[error(
        "unknown key {0} (upstream's schema has none such; --config-validation=false ignores it)"
    )]
    UnknownKey(String),
    /// An unusable field.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
struct File {
    #[serde(rename = "vLLMLoRAConfig")]
    config: Option<RawConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    default_base_model: Option<String>,
    #[serde(default)]
    ensure_exist: Option<RawList>,
    #[serde(default)]
    ensure_not_exist: Option<RawList>,
}

#[derive(Debug, Deserialize)]
struct RawList {
    models: Vec<RawAdapter>,
}

#[derive(Debug, Deserialize)]
struct RawAdapter {
    id: String,
    source: String,
    #[serde(rename = "base-model", default)]
    base_model: Option<String>,
}

/// One adapter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Adapter {
    /// Its name on the engine (`lora_name`).
    pub id: String,
    /// Where the engine reads it from (`lora_path`).
    pub source: String,
    /// Its base model (`base_model_name`), if given.
    pub base_model: Option<String>,
}

/// A checked config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraConfig {
    /// `name`, for logs.
    pub name: Option<String>,
    /// The engine's host.
    pub host: String,
    /// The engine's port.
    pub port: u16,
    /// Adapters to keep loaded, by id.
    pub ensure_exist: BTreeMap<String, Adapter>,
    /// Adapters to keep unloaded, by id.
    pub ensure_not_exist: BTreeMap<String, Adapter>,
    /// Ids in both lists: neither loaded nor unloaded.
    pub conflicts: BTreeSet<String>,
}

fn check(what: &str, value: &str, max: usize) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::Invalid(format!("{what} is empty")));
    }
    if value.len() > max {
        return Err(ConfigError::Invalid(format!(
            "{what} is longer than {max} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ConfigError::Invalid(format!(
            "{what} {:?} contains control characters",
            value.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

fn adapters(
    list: Option<RawList>,
    default_base: Option<&str>,
) -> Result<BTreeMap<String, Adapter>, ConfigError> {
    let mut out = BTreeMap::new();
    for a in list.map(|l| l.models).unwrap_or_default() {
        check("adapter id", &a.id, MAX_ID_BYTES)?;
        check(
            &format!("source of {:?}", a.id),
            &a.source,
            MAX_SOURCE_BYTES,
        )?;
        let base_model = a.base_model.or_else(|| default_base.map(str::to_owned));
        if let Some(b) = &base_model {
            check(&format!("base-model of {:?}", a.id), b, MAX_ID_BYTES)?;
        }
        let id = a.id.trim().to_owned();
        if out.contains_key(&id) {
            return Err(ConfigError::Invalid(format!(
                "adapter {id:?} is listed twice"
            )));
        }
        out.insert(
            id.clone(),
            Adapter {
                id,
                source: a.source.trim().to_owned(),
                base_model,
            },
        );
    }
    Ok(out)
}

/// Parses and checks a config file. `validate`: unknown keys are errors (upstream's
/// `--config-validation`, on by default); without it they are ignored.
pub fn parse(text: &str, validate: bool) -> Result<LoraConfig, ConfigError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(ConfigError::Invalid("config file larger than 1 MiB".into()));
    }
    crate::yaml::refuse_aliases(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    let mut unknown = Vec::new();
    let de = yaml_serde::Deserializer::from_str(text);
    let file: File = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
        .map_err(|e| ConfigError::Parse(e.to_string()))?;
    if validate && let Some(key) = unknown.first() {
        return Err(ConfigError::UnknownKey(key.clone()));
    }
    let raw = file
        .config
        .ok_or_else(|| ConfigError::Invalid("vLLMLoRAConfig is missing".into()))?;
    let default_base = raw.default_base_model.as_deref().map(str::trim);
    let ensure_exist = adapters(raw.ensure_exist, default_base)?;
    let ensure_not_exist = adapters(raw.ensure_not_exist, default_base)?;
    if ensure_exist.len() + ensure_not_exist.len() > MAX_ADAPTERS {
        return Err(ConfigError::Invalid(format!(
            "more than {MAX_ADAPTERS} adapters"
        )));
    }
    let host = raw.host.unwrap_or_else(|| "localhost".to_owned());
    check("host", &host, 253)?;
    if host.contains(['/', '@', '?', '#', ' ']) {
        return Err(ConfigError::Invalid(format!(
            "host {host:?} is not a host name"
        )));
    }
    // A colon only in an IPv6 address: `svc:8000` would make no URL, and every call would fail
    // without saying why.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if host.contains(':') && bare.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(ConfigError::Invalid(format!(
            "host {host:?} is not a host name or an IPv6 address (the port goes in `port`)"
        )));
    }
    let port = raw.port.unwrap_or(8000);
    if port == 0 {
        // Nothing listens on port 0: the syncer would wait out its health timeout and restart
        // forever instead of saying what is wrong.
        return Err(ConfigError::Invalid("port 0 is no engine's port".into()));
    }
    let conflicts = ensure_exist
        .keys()
        .filter(|id| ensure_not_exist.contains_key(*id))
        .cloned()
        .collect();
    Ok(LoraConfig {
        name: raw.name,
        host,
        port,
        ensure_exist,
        ensure_not_exist,
        conflicts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPSTREAM: &str = "\
vLLMLoRAConfig:
  name: vllm-qwen3-32b
  port: 8000
  defaultBaseModel: Qwen/Qwen3-32B
  ensureExist:
    models:
    - id: small-segment-lora-1
      source: ttt421/nec119-small-segment-lora
    - id: small-segment-lora-2
      source: ttt421/nec119-small-segment-lora
      base-model: other/base
  ensureNotExist:
    models:
    - id: old
      source: /adapters/old
";

    /// Anchors referred to by aliases are refused before they are expanded
    /// ([`crate::yaml`]).
    #[test]
    fn aliases_are_refused() {
        let text = UPSTREAM.replacen("name: vllm", "name: &n vllm", 1) + "x: *n\n";
        let err = parse(&text, false).unwrap_err();
        assert!(
            err.to_string().contains("aliases are not accepted"),
            "{err}"
        );
    }

    #[test]
    fn a_host_with_a_port_is_refused_and_ipv6_is_not() {
        let with = |host: &str| {
            parse(
                &UPSTREAM.replacen(
                    "  port: 8000",
                    &format!("  host: \"{host}\"\n  port: 8000"),
                    1,
                ),
                true,
            )
        };
        let err = with("svc:8000").unwrap_err();
        assert!(err.to_string().contains("the port goes in `port`"), "{err}");
        assert_eq!(with("::1").unwrap().host, "::1");
        assert_eq!(with("[fd00::1]").unwrap().host, "[fd00::1]");
        assert_eq!(with("vllm.ns.svc").unwrap().host, "vllm.ns.svc");
    }

    #[test]
    fn upstream_example_parses() {
        let c = parse(UPSTREAM, true).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("localhost", 8000));
        assert_eq!(c.ensure_exist.len(), 2);
        assert_eq!(
            c.ensure_exist["small-segment-lora-1"].base_model.as_deref(),
            Some("Qwen/Qwen3-32B")
        );
        assert_eq!(
            c.ensure_exist["small-segment-lora-2"].base_model.as_deref(),
            Some("other/base")
        );
        assert_eq!(c.ensure_not_exist["old"].source, "/adapters/old");
        assert!(c.conflicts.is_empty());
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let zero = UPSTREAM.replace("  port: 8000", "  port: 0");
        assert!(matches!(parse(&zero, true), Err(ConfigError::Invalid(m)) if m.contains("port 0")));
        let unknown = UPSTREAM.replace("  port: 8000", "  prot: 8000");
        assert!(matches!(
            parse(&unknown, true),
            Err(ConfigError::UnknownKey(_))
        ));
        assert!(parse(&unknown, false).is_ok());
        assert!(parse("other: 1\n", false).is_err());
        let no_source = "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - id: a\n";
        assert!(matches!(parse(no_source, true), Err(ConfigError::Parse(_))));
        let empty = "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: '', source: x}\n";
        assert!(matches!(parse(empty, true), Err(ConfigError::Invalid(_))));
        let twice = "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: a, source: x}\n    - {id: a, source: y}\n";
        assert!(matches!(parse(twice, true), Err(ConfigError::Invalid(_))));
        let host = "vLLMLoRAConfig:\n  host: 'evil/path'\n";
        assert!(matches!(parse(host, true), Err(ConfigError::Invalid(_))));
        let ctl =
            "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: \"a\\nb\", source: x}\n";
        assert!(matches!(parse(ctl, true), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn an_id_in_both_lists_is_a_conflict() {
        let both = "vLLMLoRAConfig:\n  ensureExist:\n    models:\n    - {id: a, source: x}\n  ensureNotExist:\n    models:\n    - {id: a, source: x}\n";
        let c = parse(both, true).unwrap();
        assert_eq!(c.conflicts, BTreeSet::from(["a".to_owned()]));
    }
}

#[cfg(test)]
mod shipped {
    /// The syncer's shipped ConfigMap holds a config the syncer accepts with validation on.
    #[test]
    fn shipped_configmap_parses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/lora-syncer/configmap.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let doc: serde_json::Value = yaml_serde::from_str(&text).unwrap();
        let inner = doc["data"]["configmap.yaml"].as_str().unwrap();
        let c = super::parse(inner, true).unwrap();
        assert_eq!(c.ensure_exist.len(), 2);
        assert_eq!(c.ensure_not_exist.len(), 1);
    }
}
