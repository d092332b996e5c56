//! Benchmark support for Switchyard: the load generator, the workloads, the scenario
//! harness (processes, metrics, reports) and the fixtures shared by the criterion benches.

#![warn(missing_docs)]

pub mod fixed_backend;
pub mod harness;
pub mod loadgen;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use endpoint_picker::config;
use endpoint_picker::datastore::{Datastore, EndpointSpec, EngineMetrics, PoolSpec};
use endpoint_picker::director::Director;

/// A pool of `n` endpoints with varied, fresh metrics, behind the default profile.
pub fn director_with_endpoints(n: usize) -> Arc<Director> {
    director_with_config(n, config::REFERENCE_DEFAULT_CONFIG)
}

/// [`director_with_endpoints`] with another `EndpointPickerConfig`.
pub fn director_with_config(n: usize, config_text: &str) -> Arc<Director> {
    let endpoints = (0..n)
        .map(|i| {
            let address = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8000));
            EndpointSpec {
                name: format!("pod-{i}-rank-0"),
                pod_name: format!("pod-{i}"),
                namespace: "default".into(),
                address,
                metrics_address: address,
                rank: 0,
                labels: BTreeMap::new(),
            }
        })
        .collect();
    let ds = Arc::new(Datastore::new());
    let snap = ds.apply(PoolSpec {
        name: "bench".into(),
        namespace: "default".into(),
        app_protocol: "http".into(),
        endpoints,
    });
    for (i, e) in snap.endpoints.iter().enumerate() {
        e.store_metrics(EngineMetrics {
            waiting_queue_size: (i * 7 % 13) as u64,
            running_requests: (i * 5 % 17) as u64,
            kv_cache_usage: (i * 3 % 10) as f64 / 10.0,
            cache_block_size: Some(16),
            cache_num_blocks: Some(27_000),
            updated_at: Some(tokio::time::Instant::now()),
            ..Default::default()
        });
    }
    match config::load(config_text, 42) {
        Ok(c) => {
            let director = Arc::new(Director::new(ds, Arc::new(c), 42));
            director.pool_changed();
            director
        }
        Err(e) => panic!("the benchmark's config must load: {e}"),
    }
}

/// An OpenAI chat body whose user message is about `bytes` long.
pub fn chat_body(bytes: usize, salt: usize) -> Vec<u8> {
    let sentence = "The quick brown fox jumps over the lazy dog while routing tokens. ";
    let mut content = format!("conversation {salt}: ");
    while content.len() < bytes {
        content.push_str(sentence);
    }
    content.truncate(bytes);
    let body = serde_json::json!({
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "stream": true,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content}
        ]
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A completions body with a `bytes`-long prompt.
pub fn completions_body(bytes: usize) -> Vec<u8> {
    let mut prompt = String::with_capacity(bytes);
    while prompt.len() < bytes {
        prompt.push_str("lorem ipsum dolor sit amet consectetur adipiscing elit ");
    }
    prompt.truncate(bytes);
    serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 16}))
        .unwrap_or_default()
}
