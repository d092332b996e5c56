//! The shipped manifests, read with the Rust side's own eyes: every plugin configuration the
//! ConfigMaps and the chart can produce loads in the EPP, and every sample custom resource
//! deserialises into our API types. (`manifests/validate.py` checks schemas and the chart.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use k8s::api::{InferenceModelRewrite, InferenceObjective, InferencePool};
use serde::Deserialize;

fn manifests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn docs(path: &Path) -> Vec<yaml_serde::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    yaml_serde::Deserializer::from_str(&text)
        .map(|d| yaml_serde::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn load(what: &str, text: &str) {
    let loaded = endpoint_picker::config::load(text, 1).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(loaded.warnings.is_empty(), "{what}: {:?}", loaded.warnings);
}

#[test]
fn plain_configmap_plugin_config_loads() {
    let cm = &docs(&manifests().join("epp/configmap.yaml"))[0];
    let text = cm["data"]["default-plugins.yaml"].as_str().unwrap();
    load("manifests/epp/configmap.yaml", text);
}

/// The LMCache sample's config: precise index with tiers, the tier-aware cost model and
/// `p2p-source-producer`.
#[test]
fn lmcache_sample_plugin_config_loads() {
    let path = manifests().join("samples/vllm-lmcache-llama3-8b-epp.yaml");
    let cm = &docs(&path)[0];
    let text = cm["data"]["default-plugins.yaml"].as_str().unwrap();
    load("manifests/samples/vllm-lmcache-llama3-8b-epp.yaml", text);
    let loaded = endpoint_picker::config::load(text, 1).unwrap();
    let producers: Vec<&str> = loaded
        .scheduler
        .producers()
        .iter()
        .map(|p| p.type_name())
        .collect();
    assert!(producers.contains(&"p2p-source-producer"), "{producers:?}");
    assert_eq!(loaded.precise_producers.len(), 1);
}

#[test]
fn chart_plugin_configs_load_for_every_engine_and_value_set() {
    let chart = manifests().join("charts/switchyard-inferencepool");
    let template = std::fs::read_to_string(chart.join("files/default-plugins.yaml")).unwrap();
    // The chart replaces ENGINE with the mapping name of inferencePool.modelServerType.
    for engine in ["vllm", "sglang", "triton", "trtllm-serve"] {
        let text = template.replace("ENGINE", engine);
        load(&format!("default-plugins.yaml ({engine})"), &text);
        let loaded = endpoint_picker::config::load(&text, 1).unwrap();
        assert_eq!(loaded.scrape.default_engine, engine);
    }
    let mut custom = 0;
    for entry in std::fs::read_dir(chart.join("ci")).unwrap() {
        let path = entry.unwrap().path();
        let values = &docs(&path)[0];
        if let Some(configs) = values["inferenceExtension"]["pluginsCustomConfig"].as_mapping() {
            for (name, text) in configs {
                load(
                    &format!("{} {name:?}", path.display()),
                    text.as_str().unwrap(),
                );
                custom += 1;
            }
        }
    }
    assert!(custom > 0, "a value set exercises pluginsCustomConfig");
}

#[test]
fn sample_custom_resources_deserialise() {
    let mut seen = (0, 0, 0);
    for entry in std::fs::read_dir(manifests().join("samples")).unwrap() {
        let path = entry.unwrap().path();
        for doc in docs(&path) {
            let what = format!("{}: {:?}", path.display(), doc["metadata"]["name"]);
            match doc["kind"].as_str() {
                Some("InferencePool") => {
                    let pool: InferencePool = yaml_serde::from_value(doc).expect(&what);
                    assert!(!pool.spec.target_ports.is_empty(), "{what}");
                    seen.0 += 1;
                }
                Some("InferenceObjective") => {
                    let _: InferenceObjective = yaml_serde::from_value(doc).expect(&what);
                    seen.1 += 1;
                }
                Some("InferenceModelRewrite") => {
                    let _: InferenceModelRewrite = yaml_serde::from_value(doc).expect(&what);
                    seen.2 += 1;
                }
                _ => {}
            }
        }
    }
    assert!(seen.0 >= 2 && seen.1 >= 1 && seen.2 >= 1, "{seen:?}");
}
