use std::time::Duration;

use super::*;
use crate::datastore::{Datastore, test_util::pool};
use crate::request::InferenceRequest;
use crate::scheduling::plugins::response::SERVED_ENDPOINT_TEST_HEADER;
use crate::scheduling::{Candidate, CycleState};

fn fixture(name: &str) -> String {
    let path = format!("{}/testdata/config/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap()
}

fn err(text: &str) -> String {
    load(text, 1).unwrap_err().to_string()
}

const HEAD: &str =
    "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";

#[test]
fn builtin_default_is_queue_kv_prefix() {
    let c = load_default(1).unwrap();
    let p = &c.scheduler.profiles()[0];
    assert_eq!(p.name, "default");
    let weights: Vec<_> = p.scorers.iter().map(|(s, w)| (s.type_name(), *w)).collect();
    assert_eq!(
        weights,
        vec![
            ("queue-scorer", 2.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("prefix-cache-scorer", 3.0)
        ]
    );
    assert_eq!(p.picker.type_name(), "max-score-picker");
    assert_eq!(
        c.prefix_producers.len(),
        1,
        "prefix scorer gets its producer"
    );
    assert_eq!(c.saturation_detector.queue_depth_threshold, 5.0);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn reference_default_fixture_loads() {
    let c = load(&fixture("default.yaml"), 1).unwrap();
    assert_eq!(c.scheduler.profiles()[0].scorers.len(), 3);
    assert_eq!(c.scrape.path, "/metrics");
}

#[test]
fn prefix_lora_fixture_loads_with_parameters() {
    let c = load(&fixture("prefix-lora.yaml"), 1).unwrap();
    let p = &c.scheduler.profiles()[0];
    assert_eq!(p.scorers.len(), 4);
    let pp = &c.prefix_producers[0].params;
    assert!(!pp.auto_tune);
    assert_eq!(pp.max_prefix_blocks, 128);
    assert_eq!(pp.lru_capacity_per_server, 20000);
    let d = &c.saturation_detector;
    assert_eq!(d.queue_depth_threshold, 8.0);
    assert_eq!(d.metrics_staleness_threshold, Duration::from_millis(250));
    assert!(c.scrape.engines.iter().any(|e| e.name == "my-engine"));
    // openai-parser is accepted and said to be built in.
    assert!(c.warnings.iter().any(|w| w.contains("openai-parser")));
}

#[test]
fn llmd_fixture_loads_legacy_scorer_parameters() {
    let c = load(&fixture("llm-d.yaml"), 1).unwrap();
    let pp = &c.prefix_producers[0].params;
    assert_eq!(pp.block_chars, Some(64));
    assert!(!pp.auto_tune);
    let names: Vec<_> = c.scheduler.profiles()[0]
        .scorers
        .iter()
        .map(|(s, _)| s.type_name())
        .collect();
    assert_eq!(
        names,
        vec![
            "prefix-cache-scorer",
            "load-aware-scorer",
            "kv-cache-utilization-scorer"
        ]
    );
}

#[test]
fn conformance_fixture_routes_by_header() {
    let c = load(&fixture("conformance.yaml"), 1).unwrap();
    assert_eq!(c.response_plugins.len(), 1);
    assert_eq!(
        c.response_plugins[0].response_headers(&crate::scheduling::plugins::response::Served {
            address: Some("10.0.0.1:3000"),
            endpoint: None,
        }),
        vec![(
            SERVED_ENDPOINT_TEST_HEADER.to_owned(),
            "10.0.0.1:3000".to_owned()
        )]
    );
    let ds = Datastore::new();
    let snap = ds.apply(pool(3));
    let cands: Vec<_> = snap.endpoints.iter().cloned().map(Candidate::new).collect();
    let req = InferenceRequest {
        headers: vec![(
            "test-epp-endpoint-selection".into(),
            "10.0.0.2,10.0.0.3".into(),
        )],
        ..Default::default()
    };
    let state = CycleState::new(tokio::time::Instant::now());
    let r = c.scheduler.schedule(&req, &state, &cands, true).unwrap();
    let mut got: Vec<_> = r
        .primary_targets()
        .iter()
        .map(|t| t.candidate.endpoint.spec.name.clone())
        .collect();
    got.sort();
    assert_eq!(got, vec!["pod-2-rank-0", "pod-3-rank-0"]);
    assert!(r.primary_result().unwrap().explanation.is_some());
}

#[test]
fn empty_profiles_default_to_every_profile_plugin() {
    let c = load(
        &format!("{HEAD}plugins:\n- type: queue-scorer\n- type: random-picker\n"),
        1,
    )
    .unwrap();
    let p = &c.scheduler.profiles()[0];
    assert_eq!(p.name, "default");
    assert_eq!(p.scorers[0].1, 1.0);
    assert_eq!(p.picker.type_name(), "random-picker");
}

#[test]
fn errors_name_the_problem() {
    assert!(err("plugins: [").contains("invalid EndpointPickerConfig"));
    assert!(err("kind: EndpointPickerConfig\n").contains("apiVersion"));
    assert!(
        err("apiVersion: v1\nkind: EndpointPickerConfig\n")
            .contains("unsupported apiVersion \"v1\"")
    );
    assert!(err("apiVersion: llm-d.ai/v1alpha1\nkind: Foo\n").contains("kind"));
    assert!(
        err(&format!("{HEAD}plugins:\n- type: no-such-scorer\n"))
            .contains("unknown type \"no-such-scorer\"")
    );
    assert!(
        err(&format!(
            "{HEAD}plugins:\n- type: queue-scorer\n- type: queue-scorer\n"
        ))
        .contains("duplicate plugin name")
    );
    assert!(
        err(&format!(
            "{HEAD}schedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: ghost\n"
        ))
        .contains("undeclared plugin \"ghost\"")
    );
    assert!(
        err(&format!(
            "{HEAD}plugins:\n- type: max-score-picker\n  parameters:\n    maxNumOfEndpoints: 0\n"
        ))
        .contains("maxNumOfEndpoints")
    );
    assert!(
        err(&format!(
            "{HEAD}plugins:\n- type: max-score-picker\n  parameters:\n    maxNumOfEndpoints: lots\n"
        ))
        .contains("invalid parameters")
    );
    assert!(err(&format!(
        "{HEAD}plugins:\n- type: utilization-detector\n  parameters:\n    kvCacheUtilThreshold: 1.5\n"
    ))
    .contains("kvCacheUtilThreshold"));
    assert!(err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: -1\n"
    ))
    .contains("weight"));
    assert!(
        err(&format!(
            "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n- name: b\n"
        ))
        .contains("profile handler")
    );
    assert!(err(&format!("{HEAD}bogusField: 1\n")).contains("bogusField"));
    assert!(err(&format!(
        "{HEAD}plugins:\n- type: max-score-picker\n- name: p2\n  type: random-picker\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: max-score-picker\n  - pluginRef: p2\n"
    ))
    .contains("more than one picker"));
    assert!(
        err(&format!(
            "{HEAD}plugins:\n- type: queue-scorer\nsaturationDetector:\n  pluginRef: queue-scorer\n"
        ))
        .contains("saturationDetector")
    );
}

#[test]
fn feature_gates_are_the_references_and_do_what_they_say() {
    let e = err(&format!("{HEAD}featureGates: [warpDrive]\n"));
    assert!(e.contains("feature gate \"warpDrive\": unknown"), "{e}");
    // Flow control cannot be turned on, with or without its section and policies.
    for config in [
        format!("{HEAD}featureGates: [flowControl]\n"),
        format!(
            "{HEAD}featureGates: [flowControl=true]\nplugins:\n- type: fcfs-ordering-policy\nflowControl:\n  maxRequests: 10\n"
        ),
    ] {
        let e = err(&config);
        assert!(
            e.contains("flowControl=true") && e.contains("not implemented"),
            "{e}"
        );
    }
    let c = load(
        &format!("{HEAD}featureGates: [flowControl=false, dataLayer]\n"),
        1,
    )
    .unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("dataLayer"));
}

#[test]
fn flow_control_section_without_the_gate_keeps_only_its_detector() {
    let c = load(
        &format!(
            "{HEAD}plugins:\n- type: utilization-detector\n  parameters: {{queueDepthThreshold: 9}}\n- name: old\n  type: utilization-detector\n- type: fcfs-ordering-policy\n  parameters: {{anything: 1}}\nsaturationDetector:\n  pluginRef: old\nflowControl:\n  saturationDetector:\n    pluginRef: utilization-detector\n  maxRequests: 10\n  defaultRequestTTL: 30s\n"
        ),
        1,
    )
    .unwrap();
    // The new field wins over the deprecated one.
    assert_eq!(c.saturation_detector.queue_depth_threshold, 9.0);
    let ignored: Vec<_> = c
        .warnings
        .iter()
        .filter(|w| w.contains("flowControl settings ignored"))
        .collect();
    assert_eq!(ignored.len(), 1, "{:?}", c.warnings);
    assert!(
        ignored[0].contains("defaultRequestTTL, maxRequests"),
        "{ignored:?}"
    );
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("fcfs-ordering-policy") && w.contains("inert"))
    );
    // Only a detector: nothing ignored, nothing to say.
    let c = load(
        &format!(
            "{HEAD}flowControl:\n  saturationDetector:\n    pluginRef: utilization-detector\n"
        ),
        1,
    )
    .unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn undeclared_detector_and_parser_types_are_made_as_the_reference_does() {
    let c = load(
        &format!("{HEAD}saturationDetector:\n  pluginRef: utilization-detector\nparser:\n  pluginRef: openai-parser\n"),
        1,
    )
    .unwrap();
    assert_eq!(c.saturation_detector.queue_depth_threshold, 5.0);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let e = err(&format!("{HEAD}parser:\n  pluginRef: anthropic-parser\n"));
    assert!(
        e.contains("parser references undeclared plugin \"anthropic-parser\""),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nparser:\n  pluginRef: queue-scorer\n"
    ));
    assert!(e.contains("parser: plugin \"queue-scorer\""), "{e}");
    let e = err(&format!("{HEAD}parser:\n  pluginRef: queue-scorer\n"));
    assert!(e.contains("a parser such as openai-parser"), "{e}");
    let c = load(
        &format!("{HEAD}plugins:\n- name: p\n  type: openai-parser\nparser:\n  pluginRef: p\n"),
        1,
    )
    .unwrap();
    assert_eq!(
        c.warnings.len(),
        1,
        "only the inert remark: {:?}",
        c.warnings
    );
}

#[test]
fn data_layer_wires_sources_to_extractors() {
    let e = err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\ndataLayer:\n  sources:\n  - pluginRef: queue-scorer\n"
    ));
    assert!(e.contains("a data source"), "{e}");
    let e = err(&format!(
        "{HEAD}plugins:\n- type: metrics-data-source\ndataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n    extractors:\n    - pluginRef: metrics-data-source\n"
    ));
    assert!(e.contains("a data extractor"), "{e}");
    let e = err(&format!("{HEAD}data:\n  sources:\n  - pluginRef: ghost\n"));
    assert!(
        e.contains("dataLayer references undeclared plugin \"ghost\""),
        "{e}"
    );
}

#[test]
fn unknown_parameters_warn() {
    let c = load(&format!("{HEAD}plugins:\n- type: load-aware-scorer\n  parameters:\n    threshold: 10\n    typo: 1\n"), 1).unwrap();
    assert!(
        c.warnings.iter().any(|w| w.contains("typo")),
        "{:?}",
        c.warnings
    );
    // Plugins without parameters say so too.
    let c = load(
        &format!("{HEAD}plugins:\n- type: queue-scorer\n  parameters:\n    threshold: 10\n"),
        1,
    )
    .unwrap();
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("\"threshold\" ignored")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("200ms"), Some(Duration::from_millis(200)));
    assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
    assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("5 parsecs"), None);
    assert_eq!(parse_duration("ms"), None);
}

#[test]
fn durations_past_the_largest_are_refused_not_a_panic() {
    // Found by review while fuzzing `epp_config`: `Duration::from_secs_f64` panicked.
    assert_eq!(parse_duration("1e300"), None);
    assert_eq!(parse_duration("99999999999999999999h"), None);
    let e = err(&format!(
        "{HEAD}plugins:\n- type: utilization-detector\n  parameters: {{metricsStalenessThreshold: \"1e300\"}}\n"
    ));
    assert!(e.contains("metricsStalenessThreshold"), "{e}");
}
