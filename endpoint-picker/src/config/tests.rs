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
    assert_eq!(
        c.saturation_detector
            .utilization()
            .unwrap()
            .queue_depth_threshold,
        5.0
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn reference_default_fixture_loads() {
    let c = load(&fixture("default.yaml"), 1).unwrap();
    assert_eq!(c.scheduler.profiles()[0].scorers.len(), 3);
    assert_eq!(c.scrape.path, None, "no source gave a path");
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
    let d = c.saturation_detector.utilization().unwrap();
    assert_eq!(d.queue_depth_threshold, 8.0);
    assert_eq!(d.metrics_staleness_threshold, Duration::from_millis(250));
    assert!(c.scrape.engines.iter().any(|e| e.name == "my-engine"));
    // openai-parser is accepted and said to be built in.
    assert!(c.warnings.iter().any(|w| w.contains("openai-parser")));
}

/// Two prefix scorers and no declared producer: the producer takes the first one's
/// parameters, and the second's are said to be ignored rather than dropped in silence.
#[test]
fn a_second_prefix_scorers_parameters_are_said_to_be_ignored() {
    let c = load(
        &format!(
            "{HEAD}plugins:\n- name: a\n  type: prefix-cache-scorer\n  parameters:\n    blockSizeTokens: 32\n\
             - name: b\n  type: prefix-cache-scorer\n  parameters:\n    blockSizeTokens: 64\n"
        ),
        1,
    )
    .unwrap();
    assert_eq!(c.prefix_producers[0].params.block_size_tokens, 32);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("\"b\"") && w.contains("parameters ignored")),
        "{:?}",
        c.warnings
    );
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
    // A default engine that names no mapping would leave every unlabelled endpoint unscraped.
    assert!(
        err(&format!(
            "{HEAD}plugins:\n- type: core-metrics-extractor\n  parameters:\n    defaultEngine: vlm\n"
        ))
        .contains("defaultEngine")
    );
    // Upstream's spelling is ours under another name; a declared mapping counts.
    for engine in ["triton-tensorrt-llm", "SGLang", "mine"] {
        load(
            &format!(
                "{HEAD}plugins:\n- type: core-metrics-extractor\n  parameters:\n    defaultEngine: {engine}\n    engineConfigs:\n    - name: mine\n      queuedRequestsSpec: q\n"
            ),
            1,
        )
        .unwrap_or_else(|e| panic!("{engine}: {e}"));
    }
    // A mapping is named as the engine label is read, so that it replaces the built-in one
    // it names however upstream spells it; two that name one engine are refused.
    for (name, engine) in [("SGLang", "sglang"), ("triton-tensorrt-llm", "triton")] {
        let c = load(
            &format!(
                "{HEAD}plugins:\n- type: core-metrics-extractor\n  parameters:\n    engineConfigs:\n    - name: {name}\n      queuedRequestsSpec: my_queue\n"
            ),
            1,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mine: Vec<_> = c
            .scrape
            .engines
            .iter()
            .filter(|m| m.name == engine)
            .collect();
        assert_eq!(mine.len(), 1, "{name}");
        assert_eq!(mine[0].queued[0].name, "my_queue", "{name}");
        // It keeps the built-in engine's readiness check.
        assert!(mine[0].readiness.is_some(), "{name}");
    }
    assert!(
        err(&format!(
            "{HEAD}plugins:\n- type: core-metrics-extractor\n  parameters:\n    engineConfigs:\n    - name: sglang\n      queuedRequestsSpec: a\n    - name: SGLang\n      queuedRequestsSpec: b\n"
        ))
        .contains("two engine configs")
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
    assert_eq!(
        c.saturation_detector
            .utilization()
            .unwrap()
            .queue_depth_threshold,
        9.0
    );
    let ignored: Vec<_> = c
        .warnings
        .iter()
        .filter(|w| w.contains("the flowControl feature gate is disabled"))
        .collect();
    assert_eq!(ignored.len(), 1, "{:?}", c.warnings);
    assert!(
        ignored[0].contains("defaultRequestTTL, maxRequests"),
        "{ignored:?}"
    );
    assert!(c.flow_control.is_none());
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
    assert_eq!(
        c.saturation_detector
            .utilization()
            .unwrap()
            .queue_depth_threshold,
        5.0
    );
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
    // A unit is needed, as in Go, but for zero.
    assert_eq!(parse_duration("2"), None);
    assert_eq!(parse_duration("0.5"), None);
    assert_eq!(parse_duration("0"), Some(Duration::ZERO));
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

/// The reference's flow-control configs (testdata/config/flow-control, each with its source
/// commit) load, and mean what they say.
#[test]
fn reference_flow_control_configs_load() {
    use crate::flow::policy::{FairnessPolicy, UsageLimitPolicy};
    use crate::scheduling::Plugin;
    let fc = |name: &str| {
        let c = load(&fixture(&format!("flow-control/{name}")), 1)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        (c.flow_control.clone(), c)
    };
    // The well-known integration config: three bands, global caps, the concurrency detector.
    let (f, c) = fc("wellknown-flow-control.yaml");
    let f = f.unwrap();
    assert_eq!((f.max_bytes, f.max_requests), (10 * (1 << 30), 1_000));
    assert_eq!(f.request_ttl, Some(Duration::from_secs(60)));
    assert_eq!(f.no_endpoint_ttl, Some(Duration::from_secs(60)));
    let bands: Vec<_> = f
        .bands
        .iter()
        .map(|b| {
            (
                b.priority,
                b.max_requests,
                b.max_bytes,
                b.fairness.1.type_name(),
            )
        })
        .collect();
    assert_eq!(
        bands,
        [
            (100, 500, 1_000_000_000, "round-robin-fairness-policy"),
            (0, 200, 1_000_000_000, "round-robin-fairness-policy"),
            (-10, 50, 1_000_000_000, "round-robin-fairness-policy"),
        ]
    );
    assert_eq!(c.saturation_detector.type_name(), "concurrency-detector");
    assert_eq!(c.saturation_detector.requests_per_endpoint(), 132);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // Program-aware (LAS) fairness as the default band's policy.
    let (f, _) = fc("sim-program-aware-config.yaml");
    let f = f.unwrap();
    assert!(matches!(
        f.bands[0].fairness.1,
        FairnessPolicy::LeastAttainedService(_)
    ));
    assert_eq!(f.bands.len(), 1, "band 0 from the default template");
    // The soft reflective ceiling.
    let (f, _) = fc("soft-reflective-ceiling-epp-config.yaml");
    assert_eq!(
        f.unwrap().usage_limit.type_name(),
        "soft-reflective-ceiling-policy"
    );
    // The loader's own cases: regime-split TTLs, an inherited 0s TTL, custom plugins.
    let (f, _) = fc("loader-success.yaml");
    let f = f.unwrap();
    assert_eq!(f.max_bytes, 1024);
    assert_eq!(f.request_ttl, Some(Duration::from_secs(60)));
    assert_eq!(f.no_endpoint_ttl, Some(Duration::from_secs(300)));
    let (f, _) = fc("loader-inherited-ttl.yaml");
    let f = f.unwrap();
    assert_eq!((f.request_ttl, f.no_endpoint_ttl), (None, None));
    let (f, _) = fc("loader-complex.yaml");
    let f = f.unwrap();
    assert_eq!(
        f.bands
            .iter()
            .map(|b| (b.priority, &*b.ordering.0, &*b.fairness.0))
            .collect::<Vec<_>>(),
        [
            (100, "customFCFS", "customFairness"),
            (0, "fcfs-ordering-policy", "global-strict-fairness-policy")
        ]
    );
    assert!(matches!(*f.usage_limit, UsageLimitPolicy::Static { threshold } if threshold == 1.0));
    // Gate off (explicitly, or by default): the section is ignored, with the warning.
    for name in ["loader-disabled.yaml", "loader-no-gates.yaml"] {
        let (f, c) = fc(name);
        assert!(f.is_none(), "{name}");
        assert!(
            c.warnings.iter().any(|w| w.contains("(maxBytes)")),
            "{name}: {:?}",
            c.warnings
        );
    }
    let e = load(&fixture("flow-control/loader-error-missing-plugin.yaml"), 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("plugin \"non-existent-policy\" not found"),
        "{e}"
    );
}

#[test]
fn flow_control_validation_uses_the_references_messages() {
    let gate = "featureGates: [flowControl]\n";
    for (section, message) in [
        (
            "flowControl:\n  maxBytes: \"-1\"\n",
            "global MaxBytes must be non-negative",
        ),
        (
            "flowControl:\n  maxRequests: -5\n",
            "global MaxRequests must be non-negative",
        ),
        (
            "flowControl:\n  defaultRequestTTL: -1s\n",
            "defaultRequestTTL must be non-negative",
        ),
        (
            // Accepted once, then the dispatcher overflowed the clock with it.
            "flowControl:\n  defaultRequestTTL: \"1e19\"\n",
            "defaultRequestTTL: not a duration (with a unit, e.g. 60s): \"1e19\"",
        ),
        (
            "flowControl:\n  defaultRequestTTL: 10000000h\n",
            "defaultRequestTTL: \"10000000h\" is longer than 365 days",
        ),
        (
            "flowControl:\n  noEndpointRequestTTL: 9000h\n",
            "noEndpointRequestTTL: \"9000h\" is longer than 365 days",
        ),
        (
            "flowControl:\n  priorityBands:\n  - priority: 5\n  - priority: 5\n",
            "duplicate priority level 5",
        ),
        (
            "flowControl:\n  priorityBands:\n  - priority: 5\n    maxRequests: \"-1\"\n",
            "priority band 5: maxRequests must be non-negative",
        ),
        ("flowControl:\n  maxBytes: lots\n", "not a quantity"),
        ("flowControl:\n  maxQueue: 5\n", "unknown field `maxQueue`"),
        (
            "plugins:\n- type: queue-scorer\nflowControl:\n  priorityBands:\n  - priority: 1\n    orderingPolicyRef: queue-scorer\n",
            "plugin \"queue-scorer\" does not implement OrderingPolicy (actual type: scorer)",
        ),
        (
            "flowControl:\n  usageLimitPolicyPluginRef: fcfs-ordering-policy\n",
            "plugin \"fcfs-ordering-policy\" does not implement UsageLimitPolicy",
        ),
        (
            "plugins:\n- type: priority-holdback-policy\n  parameters: {maxCeiling: 0.9}\n",
            "minCeiling",
        ),
        (
            "plugins:\n- type: soft-reflective-ceiling-policy\n  parameters: {x: 1}\n",
            "takes none",
        ),
        (
            "plugins:\n- type: concurrency-detector\n  parameters: {concurrencyMode: bytes}\n",
            "concurrencyMode",
        ),
        (
            "plugins:\n- type: program-aware-fairness\n  parameters: {lasWeightService: -1}\n",
            "lasWeightService",
        ),
        (
            "plugins:\n- type: program-aware-fairness\n  parameters: {lasWeightService: 0, lasWeightHeadWait: 0}\n",
            "both 0",
        ),
    ] {
        let e = err(&format!("{HEAD}{gate}{section}"));
        assert!(e.contains(message), "{section}: {e}");
    }
    // Policies and templates: a priority-holdback limit over dynamic bands, an agent identity.
    let c = load(
        &format!(
            "{HEAD}{gate}plugins:\n- type: priority-holdback-policy\n  parameters: {{minCeiling: 0.4, maxCeiling: 0.9}}\n- type: round-robin-fairness-policy\n- type: agent-identity\n  parameters: {{additionalSessionHeaders: [X-Tenant]}}\nflowControl:\n  usageLimitPolicyPluginRef: priority-holdback-policy\n  noEndpointRequestTTL: 10m\n  enableEviction: true\n  defaultNegativePriorityBand:\n    maxRequests: 10\n    fairnessPolicyRef: round-robin-fairness-policy\n"
        ),
        1,
    )
    .unwrap();
    let f = c.flow_control.unwrap();
    assert!(f.eviction);
    assert_eq!(f.no_endpoint_ttl, Some(Duration::from_secs(600)));
    assert_eq!(f.template(-3).max_requests, 10);
    assert_eq!(
        f.template(-3).fairness.1.type_name(),
        "round-robin-fairness-policy"
    );
    assert_eq!(f.template(3).max_requests, 5_000);
    assert_eq!(f.usage_limit.type_name(), "priority-holdback-policy");
    assert_eq!(
        c.agent_identity.as_deref().unwrap()[..2],
        ["x-tenant".to_owned(), "x-claude-code-session-id".to_owned()]
    );
}

/// Review: the conformance filter lets any client choose its endpoints by a header; a config
/// carrying it loads (the conformance suite needs it) with a warning naming it.
#[test]
fn the_testing_filter_is_warned_about() {
    let c = load(
        r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: max-score-picker
"#,
        1,
    )
    .unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("header-based-testing-filter"));
    assert!(c.warnings[0].contains("test-epp-endpoint-selection"));
}

/// Review: numbers too large for a `Duration` panicked the load; they are refused, naming the
/// parameter.
#[test]
fn huge_durations_are_refused_not_a_panic() {
    for (plugin, parameter) in [
        ("session-affinity-scorer", "evictionTtlSeconds: 1e20"),
        ("session-affinity-scorer", "evictionSweepSeconds: 1e20"),
        ("ttft-cost-producer", "stepMillis: 1e30"),
        ("ttft-cost-producer", "prefillMicrosPerToken: 1e30"),
        ("ttft-cost-producer", "sequenceMicros: 1e30"),
    ] {
        let config = format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: {plugin}\n  parameters:\n    {parameter}\n"
        );
        let e = load(&config, 1).expect_err(parameter).to_string();
        let name = parameter.split(':').next().unwrap();
        assert!(e.contains(name), "{e}");
    }
}

/// Review: a `metrics-data-source` that says `path: /metrics` lost to
/// `--model-server-metrics-path`, since the default and a given `/metrics` were one value.
#[test]
fn a_source_path_of_slash_metrics_is_still_given() {
    let c = load(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: metrics-data-source\n  parameters:\n    path: /metrics\n",
        1,
    )
    .unwrap();
    assert_eq!(c.scrape.path.as_deref(), Some("/metrics"));
}

/// The strictest staleness threshold is every utilization detector's, the admission one and a
/// profile's filter alike: the binary keeps its scrape back-off under it.
#[test]
fn the_strictest_staleness_threshold_counts_every_detector() {
    let default = load(HEAD, 1).unwrap();
    assert_eq!(
        default.strictest_staleness,
        Some(Duration::from_millis(200))
    );
    let c = load(
        &format!(
            "{HEAD}plugins:\n- name: strict\n  type: utilization-detector\n  parameters: {{metricsStalenessThreshold: 100ms}}\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: strict\n  - pluginRef: max-score-picker\n"
        ),
        1,
    )
    .unwrap();
    assert_eq!(c.strictest_staleness, Some(Duration::from_millis(100)));
    let concurrency = load(
        &format!("{HEAD}plugins:\n- type: concurrency-detector\nsaturationDetector:\n  pluginRef: concurrency-detector\n"),
        1,
    )
    .unwrap();
    assert_eq!(concurrency.strictest_staleness, None, "it reads no metrics");
}

/// From a review of configuration (F2, N1, N2, N3, F6, F8): what loaded and did nothing, or
/// did something else than it said, is refused or does what it says.
#[test]
fn configurations_that_would_do_nothing_or_otherwise_are_refused() {
    // A second producer of a kind: every consumer read the last one's result.
    let two = err(&format!(
        "{HEAD}plugins:\n- name: a\n  type: approx-prefix-cache-producer\n- name: b\n  type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n"
    ));
    assert!(
        two.contains("only one approx-prefix-cache-producer") && two.contains("\"a\""),
        "{two}"
    );
    let two = err(&format!(
        "{HEAD}plugins:\n- name: c1\n  type: ttft-cost-producer\n- name: c2\n  type: ttft-cost-producer\n- type: ttft-cost-scorer\n"
    ));
    assert!(two.contains("only one ttft-cost-producer"), "{two}");
    let two = err(&format!(
        "{HEAD}plugins:\n- name: s1\n  type: metrics-data-source\n  parameters: {{path: /a}}\n- name: s2\n  type: metrics-data-source\n  parameters: {{path: /b}}\n"
    ));
    assert!(two.contains("only one metrics-data-source"), "{two}");
    // A plugin of another type under a producer's name no longer stands in for it.
    let taken = err(&format!(
        "{HEAD}plugins:\n- name: approx-prefix-cache-producer\n  type: queue-scorer\n- type: prefix-cache-scorer\n"
    ));
    assert!(taken.contains("duplicate plugin name"), "{taken}");
    // Weights whose sum would overflow.
    let heavy = err(&format!(
        "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 1e308\n"
    ));
    assert!(heavy.contains("from 0 to 1,000,000"), "{heavy}");
    load(
        &format!(
            "{HEAD}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 1000000\n"
        ),
        1,
    )
    .unwrap();
    // A gate's value is everything after the first `=`.
    let gate = err(&format!(
        "{HEAD}featureGates: [\"flowControl=true=false\"]\n"
    ));
    assert!(gate.contains("is not a boolean"), "{gate}");
    // An empty duration is none, not zero.
    assert_eq!(params::parse_duration(""), None);
    assert_eq!(params::parse_duration("  "), None);
    assert_eq!(params::parse_duration("0"), Some(Duration::ZERO));
    assert_eq!(
        params::parse_duration("1m30s"),
        Some(Duration::from_secs(90))
    );
}

/// A filter, scorer or picker no profile names takes no part in routing: said at load, and an
/// unused scorer's response side (the session token) is not run either. Flow-control policies
/// with the gate off are said to do nothing.
#[test]
fn plugins_nothing_uses_are_said_to_do_nothing() {
    let c = load(
        &format!(
            "{HEAD}plugins:\n- type: session-affinity-scorer\n- type: queue-scorer\n\
             - type: round-robin-fairness-policy\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n"
        ),
        1,
    )
    .unwrap();
    let said = |what: &str| c.warnings.iter().any(|w| w.contains(what));
    assert!(
        said(
            "\"session-affinity-scorer\" (session-affinity-scorer) is declared but no scheduling profile uses it"
        ),
        "{:?}",
        c.warnings
    );
    assert!(
        !said("\"queue-scorer\" (queue-scorer) is declared"),
        "{:?}",
        c.warnings
    );
    assert!(
        c.response_plugins.is_empty(),
        "the unused scorer's response side"
    );
    assert!(
        said(
            "\"round-robin-fairness-policy\" (round-robin-fairness-policy) is a flow-control policy"
        ),
        "{:?}",
        c.warnings
    );
    // Used by a profile, its response side runs.
    let c = load(
        &format!(
            "{HEAD}plugins:\n- type: session-affinity-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: session-affinity-scorer\n"
        ),
        1,
    )
    .unwrap();
    assert_eq!(c.response_plugins.len(), 1);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}
