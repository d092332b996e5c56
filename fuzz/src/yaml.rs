//! Harnesses for the YAML documents `endpoint-picker` reads: the local pool file
//! (`discovery::file::parse`), the `EndpointPickerConfig` (`config::load`) and the LoRA
//! sidecar's `vLLMLoRAConfig` (`lora::config::parse`). Only the public entry points are called,
//! so the harnesses survive changes of YAML library.
//!
//! Shared by the `pool_file`, `epp_config` and `lora_config` fuzz targets and
//! `endpoint-picker/tests/fuzz_regressions.rs`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use endpoint_picker::config;
use endpoint_picker::datastore::{Datastore, EndpointSpec, EngineMetrics, PoolSpec};
use endpoint_picker::director::Director;
use endpoint_picker::discovery::file;
use endpoint_picker::request::InferenceRequest;

/// `pool_file`: a pool file. A parse never panics; an accepted file yields endpoints on real
/// ports (1–65535) named `<pod>-rank-<i>`, an `http` or `h2c` pool, and rewrite targets that
/// come from the file.
pub fn pool_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let metrics_port = data.len().is_multiple_of(2).then_some(9090);
    let Ok(local) = file::parse(Path::new("pool.yaml"), text, metrics_port) else {
        return;
    };
    let pool = &local.pool;
    assert!(pool.app_protocol == "http" || pool.app_protocol == "kubernetes.io/h2c");
    for e in &pool.endpoints {
        assert_ne!(e.address.port(), 0, "{e:?}");
        assert!(e.name.ends_with(&format!("-rank-{}", e.rank)), "{e:?}");
        assert_eq!(e.address.ip(), e.metrics_address.ip());
    }
    // The datastore takes the file's endpoints (duplicate addresses once).
    let ds = Datastore::new();
    let snap = ds.apply(local.pool.clone());
    assert!(snap.endpoints.len() <= local.pool.endpoints.len());
}

fn endpoint(n: u8) -> EndpointSpec {
    let address = SocketAddr::from(([10, 0, 0, n], 8000));
    EndpointSpec {
        name: format!("pod-{n}-rank-0"),
        pod_name: format!("pod-{n}"),
        namespace: "default".into(),
        address,
        metrics_address: address,
        rank: 0,
        labels: [("app".to_owned(), "sim".to_owned())].into_iter().collect(),
    }
}

/// `epp_config`: an `EndpointPickerConfig`. Loading never panics; a loaded config schedules
/// requests over a small pool without panicking, only ever to pool endpoints.
pub fn epp_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(loaded) = config::load(text, 1) else {
        return;
    };
    for w in &loaded.warnings {
        assert!(!w.is_empty());
    }
    let ds = Arc::new(Datastore::new());
    let snap = ds.apply(PoolSpec {
        name: "pool".into(),
        namespace: "default".into(),
        app_protocol: "http".into(),
        endpoints: (1..=3).map(endpoint).collect(),
    });
    let addresses: HashSet<SocketAddr> = snap.endpoints.iter().map(|e| e.spec.address).collect();
    for (i, e) in snap.endpoints.iter().enumerate() {
        e.store_metrics(EngineMetrics {
            waiting_queue_size: i as u64 * 3,
            running_requests: i as u64,
            kv_cache_usage: 0.3 * i as f64,
            active_models: vec!["m".into()],
            max_active_models: 2,
            cache_block_size: Some(16),
            cache_num_blocks: Some(64),
            updated_at: Some(tokio::time::Instant::now()),
            ..Default::default()
        });
    }
    let director = Director::new(ds, Arc::new(loaded), 1);
    director.pool_changed();
    for (i, priority) in [0, 0, -1].into_iter().enumerate() {
        let request = InferenceRequest {
            request_id: format!("r{i}"),
            model: "m".into(),
            target_model: "m".into(),
            prompt: Bytes::from("You are a helpful assistant. ".repeat(20 + i)),
            priority,
            fairness_id: "default-flow".into(),
            headers: vec![(
                "test-epp-endpoint-selection".into(),
                "10.0.0.2:8000,10.0.0.3".into(),
            )],
            ..Default::default()
        };
        if let Ok(routed) = director.route(&request, None, i == 0) {
            assert!(!routed.targets.is_empty());
            assert!(routed.targets.len() <= addresses.len());
            for t in &routed.targets {
                assert!(addresses.contains(&t.spec.address), "{:?}", t.spec.address);
            }
            if let Some(e) = routed
                .result
                .primary_result()
                .and_then(|r| r.explanation.as_ref())
            {
                let _ = e.compact(8);
            }
        }
    }
}

/// `lora_config`: a `vLLMLoRAConfig` (the `lora-syncer`'s file). A parse never panics; an
/// accepted config keeps within the caps (at most `MAX_ADAPTERS` adapters; ids, sources and
/// base models non-blank, bounded and without control characters; ids and sources trimmed, each
/// filed under its id), has a usable host (no URL syntax, a colon only in an IPv6 address) and
/// a port that is not 0, and lists as conflicts exactly the ids in both lists; what validation
/// accepts, the lenient parse accepts as the same config.
pub fn lora_config(data: &[u8]) {
    use endpoint_picker::lora::config::{
        Adapter, MAX_ADAPTERS, MAX_ID_BYTES, MAX_SOURCE_BYTES, parse,
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lenient = parse(text, false);
    let Ok(config) = parse(text, true) else {
        return;
    };
    assert_eq!(
        lenient.as_ref(),
        Ok(&config),
        "validation accepts more than leniency"
    );
    let field = |value: &str, max: usize| {
        assert!(!value.trim().is_empty(), "a blank field");
        assert!(value.len() <= max, "{} bytes over {max}", value.len());
        assert!(!value.chars().any(char::is_control), "{value:?}");
    };
    let adapter = |id: &String, a: &Adapter| {
        assert_eq!(id, &a.id);
        field(&a.id, MAX_ID_BYTES);
        assert_eq!(a.id.trim(), a.id);
        field(&a.source, MAX_SOURCE_BYTES);
        assert_eq!(a.source.trim(), a.source);
        if let Some(b) = &a.base_model {
            field(b, MAX_ID_BYTES);
        }
    };
    assert!(config.ensure_exist.len() + config.ensure_not_exist.len() <= MAX_ADAPTERS);
    config
        .ensure_exist
        .iter()
        .for_each(|(id, a)| adapter(id, a));
    config
        .ensure_not_exist
        .iter()
        .for_each(|(id, a)| adapter(id, a));
    let both: HashSet<&String> = config
        .ensure_exist
        .keys()
        .filter(|id| config.ensure_not_exist.contains_key(*id))
        .collect();
    assert_eq!(both, config.conflicts.iter().collect::<HashSet<_>>());
    field(&config.host, 253);
    assert!(
        !config.host.contains(['/', '@', '?', '#', ' ']),
        "{:?}",
        config.host
    );
    if config.host.contains(':') {
        let bare = config.host.trim_start_matches('[').trim_end_matches(']');
        assert!(
            bare.parse::<std::net::Ipv6Addr>().is_ok(),
            "{:?}",
            config.host
        );
    }
    assert_ne!(config.port, 0);
}
