//! Observability: requests driven through the real ext_proc path, then `/metrics` read back —
//! every reference family present with its type and labels, counters moved by exactly the
//! requests sent, the exposition accepted by `promtool check metrics`; scrape errors per pod;
//! `/debug/pool` and the decision header; the bearer token; and the Grafana dashboard checked
//! against what we export.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use ext_proc::envoy::ext_proc::processing_response;
use ext_proc::stream::ServiceOptions;
use testkit::http::get_text;
use testkit::*;

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const CHAT_HEADERS: &[(&str, &str)] = &[
    (":method", "POST"),
    (":path", "/v1/chat/completions"),
    ("content-type", "application/json"),
];
/// Long enough for several prefix blocks (64 bytes each).
const SYSTEM: &str = "You are a careful assistant. Answer briefly and cite your sources please. ";

fn chat(content: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": MODEL,
        "stream": true,
        "messages": [{"role": "system", "content": SYSTEM.repeat(4)}, {"role": "user", "content": content}],
    }))
    .unwrap()
}

/// One parsed exposition: family → type, and every sample as (name, labels, value).
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap();
                // Text format 0.0.4 names a counter by its `_total` series; keep the family.
                let name = match ty {
                    "counter" => name.strip_suffix("_total").unwrap_or(name),
                    _ => name,
                };
                e.types.insert(name.to_owned(), ty.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Label values here never contain `",`; a tiny parser is enough.
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").unwrap();
                map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
            }
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap(),
            };
            e.samples.push((name.to_owned(), map, value));
        }
        e
    }

    /// Samples of one series name whose labels include `want`.
    fn values(&self, name: &str, want: &[(&str, &str)]) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, _, v)| *v)
            .collect()
    }

    /// The single value of a series (panics unless exactly one matches).
    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let v = self.values(name, want);
        assert_eq!(v.len(), 1, "{name}{want:?}: {v:?}");
        v[0]
    }

    /// Label names used by the samples of family `family` (suffixes like `_bucket` included;
    /// `le` left out).
    fn label_names(&self, family: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|(n, _, _)| series_family(n, &self.types) == Some(family))
            .flat_map(|(_, l, _)| l.keys().cloned())
            .filter(|k| k != "le")
            .collect()
    }

    /// Every name a query may use: families and their sample names.
    fn names(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self.types.keys().cloned().collect();
        for (family, ty) in &self.types {
            let suffixes: &[&str] = match ty.as_str() {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[],
            };
            for s in suffixes {
                out.insert(format!("{family}{s}"));
            }
        }
        out.extend(self.samples.iter().map(|(n, _, _)| n.clone()));
        out
    }
}

fn series_family<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_total", "_bucket", "_sum", "_count", "_created"]
        .iter()
        .filter_map(|s| name.strip_suffix(s))
        .find(|base| types.contains_key(*base))
}

async fn scrape(epp: &Epp) -> Exposition {
    Exposition::parse(&get_text(epp.metrics, "/metrics").await.expect("/metrics"))
}

/// Polls `/metrics` until `done` holds (the stream-end counters move after the client is gone).
async fn scrape_until(epp: &Epp, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let e = scrape(epp).await;
        if done(&e) {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never reached the expected state: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn three() -> endpoint_picker::datastore::PoolSpec {
    pool(vec![
        endpoint(21, 8000),
        endpoint(22, 8000),
        endpoint(23, 8000),
    ])
}

/// Sends one streamed chat completion through a stream and plays the model server's side.
/// Returns the destination and the decision header.
async fn complete_one(epp: &Epp, i: usize) -> (String, Option<String>) {
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(
        &[CHAT_HEADERS, &[("x-request-id", &format!("req-{i}"))]].concat(),
        false,
        None,
    ))
    .await;
    s.send(req_body(&chat(&format!("question {i}")), true))
        .await;
    let destination = routing_answer(&s.recv().await).destination().to_owned();
    let (_, eos) = streamed_body(&s.recv().await);
    assert!(eos);
    s.send(resp_headers(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
        None,
    ))
    .await;
    let r = s.recv().await;
    let Some(processing_response::Response::ResponseHeaders(h)) = r.response else {
        panic!("expected response headers answer, got {r:?}")
    };
    let decision = h
        .response
        .and_then(|c| c.header_mutation)
        .into_iter()
        .flat_map(|m| m.set_headers)
        .filter_map(|o| o.header)
        .find(|h| h.key == "x-switchyard-decision")
        .map(|h| String::from_utf8(h.raw_value).unwrap());
    let events = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":5,\"prompt_tokens_details\":{\"cached_tokens\":16}}}\n\ndata: [DONE]\n\n",
    ];
    for (k, e) in events.iter().enumerate() {
        s.send(resp_body(e.as_bytes(), k + 1 == events.len())).await;
        let _ = streamed_body(&s.recv().await);
    }
    // Half-close as Envoy does at the end of the exchange; the EPP then ends the stream.
    let Stream { tx, mut rx } = s;
    drop(tx);
    let end = tokio::time::timeout(TIMEOUT, rx.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    (destination, decision)
}

/// Any client may name any model: 10,000 distinct names (routed and answered) leave every
/// model label within the budget of `epp::labels`, the rest under one overflow value.
#[tokio::test]
async fn ten_thousand_model_names_stay_under_the_label_cap() {
    use epp::labels::{MAX_UNKNOWN_MODELS, OVERFLOW_LABEL};
    use futures::StreamExt;
    let epp = start_epp(three(), EppOptions::default()).await;
    set_queues(&epp, &[0, 0, 0]);
    let channel = connect(epp.grpc).await;
    let exchange = |i: usize| {
        let channel = channel.clone();
        async move {
            let mut s = Stream::on(channel).await;
            s.send(req_headers(CHAT_HEADERS, false, None)).await;
            let body = serde_json::json!({"model": format!("model-{i}"), "messages": [{"role": "user", "content": "hi"}]});
            s.send(req_body(&serde_json::to_vec(&body).unwrap(), true))
                .await;
            routing_answer(&s.recv().await);
            streamed_body(&s.recv().await);
            s.send(resp_headers(&[(":status", "200")], false, None))
                .await;
            s.recv().await;
            s.send(resp_body(
                br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
                true,
            ))
            .await;
            s.recv().await;
        }
    };
    futures::stream::iter(0..10_000)
        .map(exchange)
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let exposition = scrape(&epp).await;
    let models: BTreeSet<String> = exposition
        .samples
        .iter()
        .filter_map(|(_, labels, _)| labels.get("model_name").cloned())
        .collect();
    assert!(models.contains(OVERFLOW_LABEL), "{models:?}");
    assert!(
        models.len() <= MAX_UNKNOWN_MODELS + 1,
        "{} model label values",
        models.len()
    );
    let routed: f64 = exposition
        .values("inference_objective_request_total", &[])
        .iter()
        .sum();
    assert_eq!(routed, 10_000.0, "every request counted, under some label");
}

/// A model rewrite is counted under the reference's labels: the InferenceModelRewrite that
/// chose the target, the model asked for and the model it chose; the request is counted as
/// served by the target.
#[tokio::test]
async fn rewrite_decisions_name_the_rewrite_and_both_models() {
    use endpoint_picker::director::{ModelRewrite, Policies, RewriteRule, RewriteTarget};
    let epp = start_epp(three(), EppOptions::default()).await;
    set_queues(&epp, &[0, 0, 0]);
    epp.handles.director.set_policies(Policies {
        objectives: HashMap::new(),
        rewrites: vec![ModelRewrite {
            name: "canary-split".into(),
            created: 0,
            rules: vec![RewriteRule {
                matches: vec![MODEL.into()],
                targets: vec![RewriteTarget {
                    model: "m-canary".into(),
                    weight: 1,
                }],
            }],
        }],
    });
    for i in 0..2 {
        complete_one(&epp, i).await;
    }
    let e = scrape(&epp).await;
    let family = "inference_extension_model_rewrite_decisions";
    assert_eq!(e.types.get(family).map(String::as_str), Some("counter"));
    assert_eq!(
        e.label_names(family),
        ["model_rewrite_name", "model_name", "target_model"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        e.value(
            "inference_extension_model_rewrite_decisions_total",
            &[
                ("model_rewrite_name", "canary-split"),
                ("model_name", MODEL),
                ("target_model", "m-canary"),
            ]
        ),
        2.0
    );
    assert_eq!(
        e.value(
            "inference_objective_request_total",
            &[("model_name", MODEL), ("target_model_name", "m-canary")]
        ),
        2.0
    );
}

async fn bad_body(epp: &Epp) {
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(CHAT_HEADERS, false, None)).await;
    s.send(req_body(b"{not json", true)).await;
    assert_eq!(immediate(&s.recv().await).0, 400);
}

const OK: usize = 5;
const BAD: usize = 2;

#[tokio::test]
async fn every_family_is_exported_and_counters_match_the_requests() {
    let opts = EppOptions {
        options: ServiceOptions {
            decision_header: true,
            ..Default::default()
        },
        debug_decisions: 3,
        ..Default::default()
    };
    let epp = start_epp(three(), opts).await;
    set_queues(&epp, &[0, 0, 0]);
    let snap = epp.handles.datastore.snapshot();
    for i in 0..OK {
        let (destination, decision) = complete_one(&epp, i).await;
        // The decision header names the endpoint that was chosen.
        let chosen = snap
            .endpoints
            .iter()
            .find(|e| destination.starts_with(&*e.host_port))
            .unwrap();
        let decision = decision.expect("x-switchyard-decision");
        assert!(
            decision.starts_with(&format!("picked={}", chosen.spec.name)),
            "{decision} vs {destination}"
        );
    }
    for _ in 0..BAD {
        bad_body(&epp).await;
    }
    let total = (OK + BAD) as f64;
    let e = scrape_until(&epp, |e| {
        e.values("inference_extension_ext_proc_streams_total", &[])
            .iter()
            .sum::<f64>()
            == total
    })
    .await;

    // Families, types and label names (gie.md §5.1, then ours).
    let model = &["model_name", "target_model_name"][..];
    let expected: &[(&str, &str, &[&str])] = &[
        (
            "inference_objective_request",
            "counter",
            &["model_name", "target_model_name", "priority"],
        ),
        (
            "inference_objective_request_error",
            "counter",
            &["model_name", "target_model_name", "error_code"],
        ),
        (
            "inference_objective_request_duration_seconds",
            "histogram",
            model,
        ),
        ("inference_objective_request_sizes", "histogram", model),
        ("inference_objective_response_sizes", "histogram", model),
        ("inference_objective_input_tokens", "histogram", model),
        ("inference_objective_output_tokens", "histogram", model),
        (
            "inference_objective_prompt_cached_tokens",
            "histogram",
            model,
        ),
        (
            "inference_objective_normalized_time_per_output_token_seconds",
            "histogram",
            model,
        ),
        (
            "inference_objective_request_ttft_seconds",
            "histogram",
            model,
        ),
        (
            "inference_objective_request_tpot_seconds",
            "histogram",
            model,
        ),
        (
            "inference_objective_running_requests",
            "gauge",
            &["model_name"],
        ),
        (
            "inference_pool_average_kv_cache_utilization",
            "gauge",
            &["name"],
        ),
        ("inference_pool_average_queue_size", "gauge", &["name"]),
        (
            "inference_pool_average_running_requests",
            "gauge",
            &["name"],
        ),
        ("inference_pool_ready_pods", "gauge", &["name"]),
        (
            "inference_pool_per_pod_queue_size",
            "gauge",
            &["name", "model_server_pod"],
        ),
        (
            "inference_pool_per_pod_kv_cache_utilization",
            "gauge",
            &["name", "model_server_pod"],
        ),
        (
            "inference_extension_info",
            "gauge",
            &["commit", "build_ref"],
        ),
        (
            "inference_extension_scheduler_e2e_duration_seconds",
            "histogram",
            &[],
        ),
        (
            "inference_extension_scheduler_attempts",
            "counter",
            &[
                "status",
                "target_model_name",
                "pod_name",
                "namespace",
                "port",
            ],
        ),
        (
            "inference_extension_plugin_duration_seconds",
            "histogram",
            &["extension_point", "plugin_type", "plugin_name"],
        ),
        ("inference_extension_prefix_indexer_size", "gauge", &[]),
        (
            "inference_extension_prefix_indexer_hit_ratio",
            "histogram",
            &[],
        ),
        (
            "inference_extension_prefix_indexer_hit_bytes",
            "histogram",
            &[],
        ),
        (
            "inference_extension_model_server_metrics_age_seconds",
            "gauge",
            &["name", "model_server_pod"],
        ),
        (
            "inference_extension_model_server_scrape_duration_seconds",
            "histogram",
            &[],
        ),
        (
            "inference_extension_ext_proc_streams",
            "counter",
            &["outcome"],
        ),
        ("inference_extension_ext_proc_active_streams", "gauge", &[]),
        (
            "inference_extension_request_path_overhead_seconds",
            "histogram",
            &[],
        ),
    ];
    for (family, ty, labels) in expected {
        assert_eq!(
            e.types.get(*family).map(String::as_str),
            Some(*ty),
            "type of {family}"
        );
        let want: BTreeSet<String> = labels.iter().map(|s| s.to_string()).collect();
        assert_eq!(e.label_names(family), want, "labels of {family}");
    }

    // Counters moved by exactly the requests sent.
    let m = &[("model_name", MODEL), ("target_model_name", MODEL)][..];
    assert_eq!(
        e.value(
            "inference_objective_request_total",
            &[m, &[("priority", "0")]].concat()
        ),
        OK as f64
    );
    assert_eq!(
        e.value(
            "inference_objective_request_error_total",
            &[("error_code", "BadRequest")]
        ),
        BAD as f64
    );
    assert_eq!(
        e.values("inference_objective_request_error_total", &[])
            .iter()
            .sum::<f64>(),
        BAD as f64
    );
    assert_eq!(
        e.values(
            "inference_extension_scheduler_attempts_total",
            &[
                ("status", "success"),
                ("namespace", "default"),
                ("port", "8000")
            ]
        )
        .iter()
        .sum::<f64>(),
        OK as f64
    );
    assert_eq!(
        e.value(
            "inference_extension_ext_proc_streams_total",
            &[("outcome", "ok")]
        ),
        total
    );
    assert_eq!(
        e.value("inference_extension_ext_proc_active_streams", &[]),
        0.0
    );
    for family in [
        "inference_objective_request_duration_seconds",
        "inference_objective_request_sizes",
        "inference_objective_response_sizes",
        "inference_objective_input_tokens",
        "inference_objective_output_tokens",
        "inference_objective_prompt_cached_tokens",
        "inference_objective_normalized_time_per_output_token_seconds",
        "inference_objective_request_ttft_seconds",
        "inference_objective_request_tpot_seconds",
    ] {
        assert_eq!(
            e.value(&format!("{family}_count"), m),
            OK as f64,
            "{family}"
        );
    }
    assert_eq!(
        e.value("inference_objective_input_tokens_sum", m),
        30.0 * OK as f64
    );
    assert_eq!(
        e.value("inference_objective_output_tokens_sum", m),
        5.0 * OK as f64
    );
    assert_eq!(
        e.value(
            "inference_objective_running_requests",
            &[("model_name", MODEL)]
        ),
        0.0
    );
    assert_eq!(
        e.value(
            "inference_extension_scheduler_e2e_duration_seconds_count",
            &[]
        ),
        OK as f64
    );
    assert_eq!(
        e.value(
            "inference_extension_request_path_overhead_seconds_count",
            &[]
        ),
        OK as f64
    );
    // One prefix lookup per routed request; all but the first find the shared system prompt.
    assert_eq!(
        e.value("inference_extension_prefix_indexer_hit_ratio_count", &[]),
        OK as f64
    );
    assert!(e.value("inference_extension_prefix_indexer_hit_bytes_sum", &[]) > 0.0);
    assert!(e.value("inference_extension_prefix_indexer_size", &[]) > 0.0);
    // Every plugin of the default profile timed, once per request.
    for (point, ty) in [
        ("ProfilePicker", "single-profile-handler"),
        ("DataProducer", "approx-prefix-cache-producer"),
        ("PreRequest", "approx-prefix-cache-producer"),
        ("Scorer", "queue-scorer"),
        ("Scorer", "kv-cache-utilization-scorer"),
        ("Scorer", "prefix-cache-scorer"),
        ("Picker", "max-score-picker"),
    ] {
        let count = e.values(
            "inference_extension_plugin_duration_seconds_count",
            &[("extension_point", point), ("plugin_type", ty)],
        );
        assert!(!count.is_empty(), "{point}/{ty} not timed");
        // The profile handler runs twice per cycle (pick, then "done").
        assert!(count.iter().sum::<f64>() >= OK as f64, "{point}/{ty}");
    }
    // Pool gauges.
    let pool_name = &[("name", "pool")][..];
    assert_eq!(e.value("inference_pool_ready_pods", pool_name), 3.0);
    assert_eq!(
        e.values("inference_pool_per_pod_queue_size", pool_name)
            .len(),
        3
    );
    assert_eq!(
        e.values(
            "inference_extension_model_server_metrics_age_seconds",
            pool_name
        )
        .len(),
        3
    );
    assert_eq!(
        e.value(
            "inference_extension_info",
            &[("build_ref", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // /debug/pool: the endpoints with their metrics, and the last 3 decisions only.
    let pool: serde_json::Value =
        serde_json::from_str(&get_text(epp.metrics, "/debug/pool").await.unwrap()).unwrap();
    assert_eq!(pool["pool"], "pool");
    assert_eq!(pool["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(pool["endpoints"][0]["metrics"]["waiting_queue_size"], 0);
    assert_eq!(pool["decision_log_capacity"], 3);
    let decisions = pool["decisions"].as_array().unwrap();
    let ids: Vec<_> = decisions
        .iter()
        .map(|d| d["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["req-2", "req-3", "req-4"]);
    let last = &decisions[2];
    assert_eq!(last["outcome"], "routed");
    assert_eq!(last["model"], MODEL);
    assert_eq!(last["candidates"].as_array().unwrap().len(), 3);
    assert_eq!(last["scorers"].as_array().unwrap().len(), 3);
    let picked = last["picked"][0].as_str().unwrap();
    assert_eq!(
        last["candidates"][0]["endpoint"], picked,
        "best candidate first"
    );

    // promtool accepts the exposition (required under `make test`).
    let text = get_text(epp.metrics, "/metrics").await.unwrap();
    promtool_check(&text);
}

fn promtool_check(text: &str) {
    use std::io::Write;
    let required = std::env::var_os("SWITCHYARD_REQUIRE_PROMTOOL").is_some();
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if !required => {
            eprintln!("skipping promtool check: {e}");
            return;
        }
        Err(e) => panic!("promtool is required (SWITCHYARD_REQUIRE_PROMTOOL): {e}"),
    };
    // promtool reads the `_d_` of the reference's canonical prefix `llm_d_epp_` as the unit
    // "days"; that name is the reference's, not ours to change. The rest of each name is
    // checked as it is: the prefix alone is respelt.
    let text = text.replace("llm_d_epp_", "llm_epp_");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn scrape_errors_are_counted_per_pod() {
    // A port with nothing listening: every scrape fails to connect.
    let closed = testkit::ports::ClosedPort::new().unwrap();
    let mut ep = endpoint(1, closed.addr().port());
    ep.name = "dead-rank-0".into();
    let epp = start_epp(
        pool(vec![ep]),
        EppOptions {
            scrape: true,
            ..Default::default()
        },
    )
    .await;
    let e = scrape_until(&epp, |e| {
        e.values(
            "inference_extension_model_server_scrape_errors_total",
            &[("model_server_pod", "dead-rank-0"), ("name", "pool")],
        )
        .first()
        .is_some_and(|v| *v >= 2.0)
    })
    .await;
    assert_eq!(
        e.types
            .get("inference_extension_model_server_scrape_errors")
            .map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        e.label_names("inference_extension_model_server_scrape_errors"),
        ["model_server_pod", "name", "reason"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert!(
        e.value(
            "inference_extension_model_server_scrape_duration_seconds_count",
            &[]
        ) >= 2.0
    );
    // Never scraped successfully: no age, not ready.
    assert!(
        e.values("inference_extension_model_server_metrics_age_seconds", &[])
            .is_empty()
    );
    assert_eq!(e.value("inference_pool_ready_pods", &[]), 0.0);
}

#[tokio::test]
async fn bearer_token_guards_metrics_and_debug() {
    use epp::server::{Listeners, PoolSource, Settings};
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        grpc: bind().await.unwrap(),
        grpc_uds: None,
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let addr = listeners.metrics.local_addr().unwrap();
    let settings = Settings {
        config: endpoint_picker::config::load_default(1).unwrap(),
        options: ServiceOptions::default(),
        debug_decisions: 0,
        tls: None,
        scrape: None,
        refresh_prometheus_interval: Duration::from_secs(1),
        metrics_staleness: Duration::from_secs(2),
        fairness_label_limit: epp::labels::DEFAULT_MAX_FAIRNESS_LABELS,
        pool: PoolSource::Static(three()),
        seed: 1,
        admin_auth: epp::admin::AdminAuth::Token("s3cret".into()),
        debug_pool: true,
        pprof: false,
        health_on_grpc_port: false,
        drain_grace: Duration::from_secs(1),
        shutdown_delay: Default::default(),
        lora_placement: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(epp::server::serve(settings, listeners, shutdown.clone()));
    // A raw HTTP/1.1 GET: only the status line matters here.
    let get = |path: &'static str, token: Option<&'static str>| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nhost: epp\r\n{auth}connection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(TIMEOUT, conn.read_to_end(&mut resp))
            .await
            .unwrap()
            .unwrap();
        let resp = String::from_utf8_lossy(&resp);
        resp.split(' ').nth(1).unwrap().parse::<u16>().unwrap()
    };
    for path in ["/metrics", "/debug/pool"] {
        assert_eq!(get(path, None).await, 401, "{path}");
        assert_eq!(get(path, Some("wrong")).await, 401, "{path}");
        assert_eq!(get(path, Some("s3cret")).await, 200, "{path}");
    }
    assert_eq!(get("/healthz", None).await, 200);
    // --enable-pprof=false: no profile endpoint.
    assert_eq!(get("/debug/pprof/profile", Some("s3cret")).await, 404);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// Spins until `stop`, in a function the profile must name.
#[inline(never)]
fn burn_cpu_for_the_profile(stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut x = 1u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    x
}

/// `--enable-pprof`: a CPU profile in pprof's format behind the metrics auth, one at a time,
/// bounded in length. (The only test in this binary that profiles: the sampler is per process.)
#[tokio::test]
async fn pprof_profile_is_a_cpu_profile_behind_the_metrics_auth() {
    use epp::profile::proto::Profile;
    use epp::server::{Listeners, PoolSource, Settings};
    use prost::Message;
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        grpc: bind().await.unwrap(),
        grpc_uds: None,
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let addr = listeners.metrics.local_addr().unwrap();
    let settings = Settings {
        config: endpoint_picker::config::load_default(1).unwrap(),
        options: ServiceOptions::default(),
        debug_decisions: 0,
        tls: None,
        scrape: None,
        refresh_prometheus_interval: Duration::from_secs(1),
        metrics_staleness: Duration::from_secs(2),
        fairness_label_limit: epp::labels::DEFAULT_MAX_FAIRNESS_LABELS,
        pool: PoolSource::Static(three()),
        seed: 1,
        admin_auth: epp::admin::AdminAuth::Token("s3cret".into()),
        debug_pool: false,
        pprof: true,
        health_on_grpc_port: false,
        drain_grace: Duration::from_secs(1),
        shutdown_delay: Default::default(),
        lora_placement: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(epp::server::serve(settings, listeners, shutdown.clone()));
    let bearer = [("authorization", "Bearer s3cret")];
    let get = |path: &'static str, auth: bool| async move {
        let headers: &[(&str, &str)] = if auth { &bearer } else { &[] };
        testkit::http::get_bytes(addr, path, headers).await
    };
    assert_eq!(get("/debug/pprof/profile?seconds=1", false).await.0, 401);
    // A malformed query is refused after the auth, not before (which would tell that
    // profiling is on to anyone).
    let duplicated = "/debug/pprof/profile?seconds=1&seconds=2";
    assert_eq!(get(duplicated, false).await.0, 401);
    assert_eq!(get(duplicated, true).await.0, 400);
    let (status, body) = get("/debug/pprof/profile?seconds=121", true).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    // While another profile runs (here the test's own), a request gets 409.
    {
        let _running = pprof::ProfilerGuardBuilder::default().build().unwrap();
        assert_eq!(get("/debug/pprof/profile?seconds=1", true).await.0, 409);
    }
    // A one-second profile while a thread burns CPU names that thread's function.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burner = {
        let stop = stop.clone();
        std::thread::spawn(move || burn_cpu_for_the_profile(&stop))
    };
    let (status, body) = get("/debug/pprof/profile?seconds=1", true).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    burner.join().unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let profile = Profile::decode(body.as_slice()).expect("a pprof protobuf");
    let s = |i: i64| profile.string_table[i as usize].as_str();
    let types: Vec<(&str, &str)> = profile
        .sample_type
        .iter()
        .map(|t| (s(t.r#type), s(t.unit)))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    assert_eq!(profile.period, 10_000_000, "100 Hz, as Go");
    assert!(profile.duration_nanos >= 1_000_000_000);
    assert!(!profile.sample.is_empty());
    let named = |f: u64| s(profile.function[f as usize - 1].name);
    let burned: i64 = profile
        .sample
        .iter()
        .filter(|sample| {
            sample.location_id.iter().any(|l| {
                profile.location[*l as usize - 1]
                    .line
                    .iter()
                    .any(|line| named(line.function_id).contains("burn_cpu_for_the_profile"))
            })
        })
        .map(|sample| sample.value[0])
        .sum();
    assert!(burned > 0, "no sample in the burning function");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// The dashboard is valid JSON and every query names only metrics the EPP exports.
#[test]
fn dashboard_queries_name_exported_metrics() {
    // Every registered family and its sample names (a live scrape omits empty families; the
    // list is checked against the registry by a unit test in `metrics.rs`).
    let exported = Exposition {
        types: epp::metrics::FAMILIES
            .iter()
            .chain(epp::flow_metrics::FLOW_FAMILIES)
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect(),
        samples: Vec::new(),
    }
    .names();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/observability");
    let text = std::fs::read_to_string(format!("{dir}/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dashboard["title"].is_string());
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    let mut used = HashMap::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "query names no metric: {expr}");
        for n in names {
            assert!(
                exported.contains(&n),
                "dashboard query uses {n}, which the EPP does not export: {expr}"
            );
            *used.entry(n).or_insert(0) += 1;
        }
    }
    // The panels the issue asks for.
    for must in [
        "inference_pool_average_queue_size",
        "inference_pool_average_kv_cache_utilization",
        "inference_pool_per_pod_queue_size",
        "inference_pool_per_pod_kv_cache_utilization",
        "inference_objective_request_total",
        "inference_objective_request_error_total",
        "inference_objective_request_ttft_seconds_bucket",
        "inference_objective_request_tpot_seconds_bucket",
        "inference_extension_scheduler_e2e_duration_seconds_bucket",
        "inference_extension_plugin_duration_seconds_bucket",
        "inference_extension_prefix_indexer_hit_ratio_bucket",
    ] {
        assert!(used.contains_key(must), "no panel uses {must}");
    }
}

/// The autoscaling examples and scrape configs name only exported metrics too.
#[test]
fn manifests_name_exported_metrics() {
    let exported = Exposition {
        types: epp::metrics::FAMILIES
            .iter()
            .chain(epp::flow_metrics::FLOW_FAMILIES)
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect(),
        samples: Vec::new(),
    }
    .names();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/observability");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for name in metric_names(&text) {
            assert!(
                exported.contains(&name),
                "{} names {name}, which the EPP does not export",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "HPA/KEDA examples name the pool gauges");
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    // Template-variable queries: `label_values(metric, label)`.
                    ("query", serde_json::Value::String(s)) if s.contains("label_values") => {
                        out.push(s.clone())
                    }
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(serde_json::Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Identifiers in a PromQL expression that look like metric names (ours all start with
/// `inference_`), skipping label matchers, strings and `by (...)` lists.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = expr.char_indices().peekable();
    let mut depth_braces = 0;
    let mut in_string = false;
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => in_string = !in_string,
            '{' if !in_string => depth_braces += 1,
            '}' if !in_string => depth_braces -= 1,
            c if !in_string && depth_braces == 0 && (c.is_ascii_alphabetic() || c == '_') => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &expr[i..end];
                if word.starts_with("inference_") {
                    out.push(word.to_owned());
                }
            }
            _ => {}
        }
    }
    out
}

/// Envoy resets the ext_proc stream once the exchange is over: that is `ok`; a stream abandoned
/// before its answer is `cancelled`.
#[tokio::test]
async fn stream_outcomes_follow_the_exchange_not_the_reset() {
    let epp = start_epp(three(), EppOptions::default()).await;
    set_queues(&epp, &[0, 0, 0]);
    let outcome = |e: &Exposition, o: &str| {
        e.values(
            "inference_extension_ext_proc_streams_total",
            &[("outcome", o)],
        )
        .iter()
        .sum::<f64>()
    };
    {
        let mut s = Stream::open(epp.grpc).await;
        s.send(req_headers(
            &[(":method", "GET"), (":path", "/v1/models")],
            true,
            None,
        ))
        .await;
        let _ = routing_answer(&s.recv().await);
        s.send(resp_headers(&[(":status", "200")], true, None))
            .await;
        let _ = s.recv().await;
        drop(s); // both halves: a reset, as Envoy does
    }
    scrape_until(&epp, |e| outcome(e, "ok") == 1.0).await;
    {
        let s = Stream::open(epp.grpc).await;
        s.send(req_headers(CHAT_HEADERS, false, None)).await;
        // Wait until the EPP holds the stream, then go away before the body.
        scrape_until(&epp, |e| {
            e.value("inference_extension_ext_proc_active_streams", &[]) == 1.0
        })
        .await;
        drop(s);
    }
    let e = scrape_until(&epp, |e| outcome(e, "cancelled") == 1.0).await;
    assert_eq!(outcome(&e, "ok"), 1.0);
    assert_eq!(outcome(&e, "error"), 0.0);
    assert_eq!(
        e.value("inference_extension_ext_proc_active_streams", &[]),
        0.0
    );
}

/// The gathering budget end to end: streams that hold half a body each use it up, the next
/// body is refused with 429 `rejected-saturated` and counted, the bytes held are on
/// `/metrics`, and once the streams go away the budget is whole again.
#[tokio::test]
async fn the_gathering_budget_refuses_counts_and_recovers() {
    let budget = std::sync::Arc::new(ext_proc::body_budget::BodyBudget::new(4096));
    let opts = EppOptions {
        options: ServiceOptions {
            gathered_request_bytes: budget.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let epp = start_epp(three(), opts).await;
    set_queues(&epp, &[0, 0, 0]);
    let mut holders = Vec::new();
    for _ in 0..2 {
        let s = Stream::open(epp.grpc).await;
        s.send(req_headers(CHAT_HEADERS, false, None)).await;
        s.send(req_body(&[b' '; 2000], false)).await;
        holders.push(s);
    }
    // A stream that declares a length and sends nothing reserves, and holds nothing.
    let reserving = Stream::open(epp.grpc).await;
    let mut declared = CHAT_HEADERS.to_vec();
    declared.push(("content-length", "1000"));
    reserving.send(req_headers(&declared, false, None)).await;
    holders.push(reserving);
    let e = scrape_until(&epp, |e| {
        e.value("inference_extension_request_body_bytes_held", &[]) == 4000.0
            && e.value("inference_extension_request_body_bytes_reserved", &[]) == 1000.0
    })
    .await;
    assert_eq!(
        e.value(
            "inference_extension_request_body_budget_rejections_total",
            &[]
        ),
        0.0
    );
    let mut refused = Stream::open(epp.grpc).await;
    refused.send(req_headers(CHAT_HEADERS, false, None)).await;
    refused.send(req_body(&chat("over"), true)).await;
    let answer = refused.recv().await;
    assert_eq!(immediate(&answer).0, 429);
    assert_eq!(
        immediate_header(&answer, "x-llm-d-request-dropped-reason").as_deref(),
        Some("rejected-saturated")
    );
    scrape_until(&epp, |e| {
        e.value(
            "inference_extension_request_body_budget_rejections_total",
            &[],
        ) == 1.0
    })
    .await;
    drop(holders);
    scrape_until(&epp, |e| {
        e.value("inference_extension_request_body_bytes_held", &[]) == 0.0
            && e.value("inference_extension_request_body_bytes_reserved", &[]) == 0.0
    })
    .await;
    assert_eq!(budget.held(), 0);
    // Whole again: a request is routed.
    let (destination, _) = complete_one(&epp, 0).await;
    assert!(!destination.is_empty());
}
