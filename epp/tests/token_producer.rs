//! The token producer computes the ids the engine computes: the EPP's `token-producer` and the
//! simulator (`--tokenizer`) load the same project-made tokenizer and chat template
//! (`tokenize/testdata`) and must agree, id for id, on completions and chat requests; and the
//! producer runs on the request path, before scheduling.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use testkit as common;

use bytes::Bytes;
use common::*;
use endpoint_picker::config;
use endpoint_picker::request::Api;
use endpoint_picker::tokens::Outcome;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tokenize/testdata")
}

fn producer_config() -> String {
    format!(
        r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters:
    local:
      tokenizerPath: {}
      timeout: 10s
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"#,
        testdata().display()
    )
}

/// Requests as raw JSON text (keys in the order a client sent them, which `tojson` keeps).
fn requests() -> Vec<(Api, String)> {
    let long_turns: Vec<String> = (0..40)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            format!(
                r#"{{"role": "{role}", "content": "Turn {i}: the EPP routes by prefix; émigré café 🚀 {}"}}"#,
                "tokens ".repeat(i)
            )
        })
        .collect();
    let mut out = vec![
        (Api::Completions, r#"{"model": "m", "prompt": "Hello, world!"}"#.to_owned()),
        (
            Api::Completions,
            r#"{"model": "m", "prompt": ["Contractions: it's, we're. Numbers 12345.\n\n  "], "max_tokens": 3}"#
                .to_owned(),
        ),
        (Api::Completions, r#"{"model": "m", "prompt": [640, 39, 414]}"#.to_owned()),
        (
            Api::Completions,
            format!(r#"{{"model": "m", "prompt": "{}"}}"#, "Unicode: Ελληνικά, 日本語 — ".repeat(300)),
        ),
        (
            Api::ChatCompletions,
            r#"{"model": "m", "messages": [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]}"#
                .to_owned(),
        ),
        (
            Api::ChatCompletions,
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "text", "text": " here"}]}], "add_generation_prompt": false, "model": "m"}"#
                .to_owned(),
        ),
        (
            Api::ChatCompletions,
            r#"{"model": "m", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "b": 1, "a": [true, null, 2.5]}}}], "messages": [{"role": "user", "content": "call f"}]}"#
                .to_owned(),
        ),
        (
            Api::ChatCompletions,
            format!(r#"{{"model": "m", "messages": [{}]}}"#, long_turns.join(", ")),
        ),
    ];
    // The Python-made cases too.
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(testdata().join("expected.json")).unwrap())
            .unwrap();
    for case in expected["completions"].as_array().unwrap() {
        let body = serde_json::json!({"model": "m", "prompt": case["prompt"]});
        if case["prompt"] != "" {
            out.push((Api::Completions, body.to_string()));
        }
    }
    out
}

#[tokio::test]
async fn the_epp_computes_the_ids_the_simulator_computes() {
    let loaded = config::load(&producer_config(), 1).unwrap();
    let built = epp::tokens::build(loaded.token_producer.as_ref())
        .unwrap()
        .expect("a local token producer");
    let producer = built.producer;
    let engine = sim::Config {
        model: "m".into(),
        tokenizer: sim::tokenizer::Tokenizer::load(&testdata(), None).unwrap(),
        ..sim::Config::fast()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replica = sim::spawn_replica(engine, listener, 0).await.unwrap();
    for (api, body) in requests() {
        let epp_ids = producer
            .token_ids(api, Bytes::from(body.clone()))
            .await
            .unwrap_or_else(|| panic!("no ids for {body}"));
        let resp =
            common::http::post(replica.addr(), "/tokenize", &[], body.clone().into_bytes()).await;
        let sim: serde_json::Value =
            serde_json::from_str(&common::http::body_text(resp).await).unwrap();
        let sim_ids: Vec<u32> = sim["tokens"]
            .as_array()
            .unwrap_or_else(|| panic!("sim /tokenize: {sim} for {body}"))
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(&epp_ids[..], &sim_ids[..], "{body}");
        // And the engine prefills exactly that many tokens for the real request.
        let path = match api {
            Api::ChatCompletions => "/v1/chat/completions",
            _ => "/v1/completions",
        };
        let resp = common::http::post(replica.addr(), path, &[], body.clone().into_bytes()).await;
        let out: serde_json::Value =
            serde_json::from_str(&common::http::body_text(resp).await).unwrap();
        assert_eq!(out["usage"]["prompt_tokens"], sim_ids.len(), "{body}");
    }
    assert_eq!(producer.count(Outcome::Tokenized), requests().len() as u64);
    // Two questions after one long system prompt: the second reuses the first's ids.
    let cache = || {
        built
            .tokenizer
            .prefix_cache_stats()
            .expect("the cache is on")
    };
    let before = cache();
    for question in ["Where?", "Why?"] {
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": "Route every request to the replica that holds its prefix. ".repeat(40)},
            {"role": "user", "content": question},
        ]})
        .to_string();
        let ids = producer
            .token_ids(Api::ChatCompletions, Bytes::from(body.clone()))
            .await
            .unwrap();
        let resp = common::http::post(replica.addr(), "/tokenize", &[], body.into_bytes()).await;
        let sim: serde_json::Value =
            serde_json::from_str(&common::http::body_text(resp).await).unwrap();
        assert_eq!(sim["tokens"].as_array().unwrap().len(), ids.len());
    }
    let after = cache();
    assert!(
        after.reused_bytes - before.reused_bytes > 2000,
        "{before:?} → {after:?}"
    );
    replica.shutdown().await;
}

#[tokio::test]
async fn the_producer_runs_before_scheduling_on_the_request_path() {
    let epp = start_epp(
        three_endpoints(),
        EppOptions {
            config: producer_config(),
            ..EppOptions::default()
        },
    )
    .await;
    let producer = epp
        .handles
        .director
        .token_producer()
        .expect("installed")
        .clone();
    let mut s = Stream::open(epp.grpc).await;
    let body = br#"{"model":"m","messages":[{"role":"user","content":"Hi"}]}"#;
    s.send(req_headers(
        &[(":path", "/v1/chat/completions"), (":method", "POST")],
        false,
        None,
    ))
    .await;
    s.send(req_body(body, true)).await;
    let answer = routing_answer(&s.recv().await);
    assert!(answer.destination().starts_with("127.0.0."));
    assert_eq!(producer.count(Outcome::Tokenized), 1);
    // Too large for the cap, not JSON the tokenizer takes: routed all the same, without ids.
    let mut s = Stream::open(epp.grpc).await;
    s.send(req_headers(
        &[(":path", "/v1/completions"), (":method", "POST")],
        false,
        None,
    ))
    .await;
    s.send(req_body(br#"{"model":"m","prompt":["a","b"]}"#, true))
        .await;
    assert!(
        routing_answer(&s.recv().await)
            .destination()
            .starts_with("127.0.0.")
    );
    assert_eq!(producer.count(Outcome::Unsupported), 1);
    let metrics = common::http::get_text(epp.metrics, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"inference_extension_token_producer_requests_total{outcome="tokenized"} 1"#
        ),
        "{metrics}"
    );
}

fn three_endpoints() -> endpoint_picker::datastore::PoolSpec {
    pool((1..=3).map(|i| endpoint(i, 8000)).collect())
}

#[test]
fn config_names_and_bounds() {
    let cfg = |params: &str| {
        config::load(
            &format!(
                "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: token-producer\n  parameters:\n{params}"
            ),
            1,
        )
    };
    // llm-d's default backend: no ids, nothing built.
    let estimate = cfg("    estimate: {}\n").unwrap();
    assert!(
        epp::tokens::build(estimate.token_producer.as_ref())
            .unwrap()
            .is_none()
    );
    // Unknown parameters, the vllm backend, a missing path: refused.
    for bad in [
        "    locl: {}\n",
        "    local:\n      tokenizerPath: /x\n      workerz: 2\n",
        "    vllm:\n      url: http://localhost:8000\n    modelName: m\n",
        "    local: {}\n",
        "    local:\n      tokenizerPath: /x\n      timeout: 0s\n",
        "    local:\n      tokenizerPath: /x\n      workers: 0\n",
        "    local:\n      tokenizerPath: /x\n      chatTemplateContentFormat: json\n",
        "    local:\n      tokenizerPath: /x\n      prefixCacheBytes: -1\n",
        "    local:\n      tokenizerPath: /x\n      prefixCacheBytes: 5000000000\n",
    ] {
        assert!(cfg(bad).is_err(), "{bad}");
    }
    // The `local` backend a few lines of its parameters give.
    let local = |given: &str| {
        let c = cfg(&format!("    local:\n      tokenizerPath: /x\n{given}")).unwrap();
        let Some(endpoint_picker::tokens::TokenProducerConfig {
            backend: endpoint_picker::tokens::Backend::Local(local),
            ..
        }) = c.token_producer
        else {
            panic!("{given}");
        };
        local
    };
    // The prefix cache: on by default, sized or turned off.
    for (given, want) in [
        ("", endpoint_picker::tokens::DEFAULT_PREFIX_CACHE_BYTES),
        ("      prefixCacheBytes: 0\n", 0),
        ("      prefixCacheBytes: 1048576\n", 1 << 20),
    ] {
        assert_eq!(local(given).prefix_cache_bytes, want, "{given}");
    }
    // The engine's --chat-template-content-format, as it is spelt there.
    for (given, want) in [
        ("", endpoint_picker::tokens::ContentFormatChoice::Auto),
        (
            "      chatTemplateContentFormat: auto\n",
            endpoint_picker::tokens::ContentFormatChoice::Auto,
        ),
        (
            "      chatTemplateContentFormat: string\n",
            endpoint_picker::tokens::ContentFormatChoice::String,
        ),
        (
            "      chatTemplateContentFormat: openai\n",
            endpoint_picker::tokens::ContentFormatChoice::OpenAi,
        ),
    ] {
        assert_eq!(local(given).content_format, want, "{given}");
    }
    // A path that does not load fails at start-up.
    let missing = cfg("    local:\n      tokenizerPath: /nonexistent/tokenizer.json\n").unwrap();
    assert!(epp::tokens::build(missing.token_producer.as_ref()).is_err());
    // llm-d's legacy type name is the same plugin.
    let legacy = config::load(
        &format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: tokenizer\n  parameters:\n    local:\n      tokenizerPath: {}\n      maxPromptBytes: 4096\n      workers: 1\n      maxQueued: 0\n",
            testdata().display()
        ),
        1,
    )
    .unwrap();
    let p = epp::tokens::build(legacy.token_producer.as_ref())
        .unwrap()
        .unwrap()
        .producer;
    assert_eq!(p.limits().workers, 1);
    assert_eq!(p.limits().max_queued, 0);
}
