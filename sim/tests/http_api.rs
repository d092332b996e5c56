//! End-to-end tests of a running replica over real sockets: the OpenAI API (streaming checked
//! chunk by chunk), `/metrics` parsed by the EPP's own parser, errors, LoRA, pause, h2c.

// Helpers outside `#[test]` functions may panic too: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use endpoint_picker::scrape::prometheus::parse;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sim::{Config, ReplicaHandle};
use tokio::net::TcpListener;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

async fn replica(config: Config) -> ReplicaHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::spawn_replica(config, listener, 0).await.unwrap()
}

async fn start(
    c: &HttpClient,
    r: &ReplicaHandle,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> hyper::Response<Incoming> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", r.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    c.request(req.body(body).unwrap()).await.unwrap()
}

async fn call(
    c: &HttpClient,
    r: &ReplicaHandle,
    method: Method,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let resp = start(c, r, method, path, body, headers).await;
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

async fn post_json(
    c: &HttpClient,
    r: &ReplicaHandle,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let (status, _, bytes) = call(c, r, Method::POST, path, Some(body), &[]).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Reads an SSE body event by event, as a client would.
struct SseReader {
    body: Incoming,
    buf: String,
}

impl SseReader {
    /// The next `data:` payload, or `None` at the end of the body.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data = event
                    .trim_end()
                    .strip_prefix("data: ")
                    .expect("an SSE data line");
                return Some(data.to_owned());
            }
            let frame = self.body.frame().await?.unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }
}

#[tokio::test]
async fn streaming_completion_checked_chunk_by_chunk() {
    // 20 ms steps: the 40 tokens take ~0.8 s, so the first chunk surely arrives mid-generation
    // even on a busy machine.
    let mut config = Config::default();
    config.latency.step_overhead = Duration::from_millis(20);
    let r = replica(config).await;
    let c = client();
    let resp = start(
        &c,
        &r,
        Method::POST,
        "/v1/completions",
        Some(json!({
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "prompt": "Tell me about prefix caching in vLLM.",
            "max_tokens": 40,
            "stream": true,
            "stream_options": {"include_usage": true},
        })),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(resp.headers()["x-inference-pod"], "sim-0");
    assert_eq!(
        resp.headers()["x-inference-port"],
        r.addr().port().to_string().as_str()
    );
    let mut sse = SseReader {
        body: resp.into_body(),
        buf: String::new(),
    };

    let mut id = None;
    let mut text = String::new();
    for i in 0..40 {
        let chunk: Value = serde_json::from_str(&sse.next().await.unwrap()).unwrap();
        if i == 0 {
            // The first token arrives while the engine is still generating the rest: streaming.
            assert_eq!(r.engine().snapshot().running, 1);
        }
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["model"], "meta-llama/Llama-3.1-8B-Instruct");
        let this_id = chunk["id"].as_str().unwrap().to_owned();
        assert_eq!(
            id.get_or_insert(this_id.clone()),
            &this_id,
            "one id per stream"
        );
        let choice = &chunk["choices"][0];
        let piece = choice["text"].as_str().unwrap();
        assert!(!piece.is_empty(), "one token per event");
        text.push_str(piece);
        let expected_finish = if i == 39 {
            json!("length")
        } else {
            Value::Null
        };
        assert_eq!(choice["finish_reason"], expected_finish, "chunk {i}");
    }
    let usage_chunk: Value = serde_json::from_str(&sse.next().await.unwrap()).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let usage = &usage_chunk["usage"];
    assert_eq!(usage["completion_tokens"], 40);
    let prompt_tokens =
        sim::tokenizer::encode_prompt("Tell me about prefix caching in vLLM.").len();
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    assert_eq!(usage["total_tokens"], prompt_tokens + 40);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(sse.next().await.as_deref(), Some("[DONE]"));
    assert_eq!(sse.next().await, None);
    assert!(!text.is_empty());
}

/// As vLLM: the role chunk comes with the first token, not before the prefill (a gateway takes
/// the first body chunk for the first token).
#[tokio::test]
async fn streaming_chat_sends_nothing_before_the_first_token() {
    let r = replica(Config::default()).await;
    let c = client();
    // 20,000 prompt tokens: ≈ 0.6 s of prefill at the calibrated 30 µs per token.
    let body = json!({
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": [{"role": "user", "content": "word ".repeat(20_000)}],
        "max_tokens": 2,
        "stream": true,
    });
    let sent = std::time::Instant::now();
    let resp = start(
        &c,
        &r,
        Method::POST,
        "/v1/chat/completions",
        Some(body),
        &[],
    )
    .await;
    let mut sse = SseReader {
        body: resp.into_body(),
        buf: String::new(),
    };
    let first: Value = serde_json::from_str(&sse.next().await.unwrap()).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(
        sent.elapsed() >= std::time::Duration::from_millis(400),
        "the role chunk came after {:?}, before the prefill was done",
        sent.elapsed()
    );
}

#[tokio::test]
async fn streaming_chat_starts_with_the_role_and_reports_cached_tokens() {
    let r = replica(Config {
        stream_granularity: 4,
        ..Config::default()
    })
    .await;
    let c = client();
    let system = "You are a helpful assistant. ".repeat(20);
    let body = json!({
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi!"}],
        "max_completion_tokens": 10,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    for round in 0..2 {
        let resp = start(
            &c,
            &r,
            Method::POST,
            "/v1/chat/completions",
            Some(body.clone()),
            &[],
        )
        .await;
        let mut sse = SseReader {
            body: resp.into_body(),
            buf: String::new(),
        };
        let first: Value = serde_json::from_str(&sse.next().await.unwrap()).unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        // 10 tokens at 4 per event: the first token alone, then 4, 4, 1: four content events.
        let mut sizes = Vec::new();
        let mut finish = Value::Null;
        loop {
            let chunk: Value = serde_json::from_str(&sse.next().await.unwrap()).unwrap();
            if chunk["choices"] == json!([]) {
                let cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap();
                if round == 0 {
                    assert_eq!(cached, 0);
                } else {
                    assert!(
                        cached > 100,
                        "the second round hits the prefix cache: {cached}"
                    );
                }
                break;
            }
            let content = chunk["choices"][0]["delta"]["content"].as_str().unwrap();
            sizes.push(content.len());
            finish = chunk["choices"][0]["finish_reason"].clone();
        }
        assert_eq!(sizes.len(), 4, "{sizes:?}");
        assert_eq!(finish, "length");
        assert_eq!(sse.next().await.as_deref(), Some("[DONE]"));
    }
}

#[tokio::test]
async fn non_streaming_responses_carry_usage() {
    let r = replica(Config::default()).await;
    let c = client();
    let (status, v) = post_json(
        &c,
        &r,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["finish_reason"], "stop",
        "no max_tokens: the model stops by itself"
    );
    assert_eq!(v["usage"]["completion_tokens"], 128, "--default-max-tokens");

    let (status, v) = post_json(
        &c,
        &r,
        "/v1/completions",
        json!({"prompt": [1, 2, 3, 4], "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        v["usage"]["prompt_tokens"], 4,
        "token-id prompts are taken as they are"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let (status, v) = post_json(&c, &r, "/tokenize", json!({"prompt": "Hello world"})).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(ids, sim::tokenizer::encode_prompt("Hello world"));
    assert_eq!(v["count"], ids.len());
    let (_, v) = post_json(
        &c,
        &r,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(
        v["count"],
        sim::tokenizer::encode_chat([("user", "Hi")]).len()
    );

    let (status, v) = post_json(&c, &r, "/v1/embeddings", json!({"input": ["a b c", "d"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 64);
}

#[tokio::test]
async fn metrics_scrape_parses_with_the_epp_parser_and_matches_the_engine() {
    let r = replica(Config::default()).await;
    let c = client();
    for _ in 0..2 {
        let (status, _) = post_json(
            &c,
            &r,
            "/v1/completions",
            json!({"prompt": "x ".repeat(300), "max_tokens": 5}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, headers, body) = call(&c, &r, Method::GET, "/metrics", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = std::str::from_utf8(&body).unwrap();
    let samples = parse(text).unwrap();
    let s = r.engine().snapshot();
    let value = |name: &str| samples.iter().find(|x| x.name == name).unwrap().value;
    assert_eq!(value("vllm:num_requests_running"), 0.0);
    assert_eq!(value("vllm:num_requests_waiting"), 0.0);
    assert_eq!(value("vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(
        value("vllm:prefix_cache_queries_total"),
        s.stats.prefix_queries as f64
    );
    assert_eq!(
        value("vllm:prefix_cache_hits_total"),
        s.stats.prefix_hits as f64
    );
    assert!(s.stats.prefix_hits > 0);
    assert_eq!(value("vllm:generation_tokens_total"), 10.0);
    assert_eq!(value("vllm:time_to_first_token_seconds_count"), 2.0);
    assert_eq!(value("vllm:inter_token_latency_seconds_count"), 8.0);
    let info = samples
        .iter()
        .find(|x| x.name == "vllm:cache_config_info")
        .unwrap();
    assert_eq!(info.label("num_gpu_blocks").as_deref(), Some("27000"));

    // The SGLang flavour.
    let r = replica(Config {
        engine: sim::EngineKind::Sglang,
        ..Config::default()
    })
    .await;
    let (_, _, body) = call(&c, &r, Method::GET, "/metrics", None, &[]).await;
    let text = std::str::from_utf8(&body).unwrap();
    let samples = parse(text).unwrap();
    assert!(samples.iter().any(|x| x.name == "sglang:num_queue_reqs"));
    assert!(samples.iter().all(|x| !x.name.starts_with("vllm:")));
}

#[tokio::test]
async fn sglang_router_endpoints_report_load_and_identity() {
    let r = replica(Config::default()).await;
    let c = client();
    let get = |path: &'static str| {
        let (c, r) = (c.clone(), &r);
        async move {
            let (status, _, body) = call(&c, r, Method::GET, path, None, &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            serde_json::from_slice::<Value>(&body).unwrap()
        }
    };
    let idle = get("/get_load").await;
    assert_eq!(
        idle,
        json!([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}])
    );
    // A streamed request that has produced its first token is running and holds KV.
    let resp = start(
        &c,
        &r,
        Method::POST,
        "/v1/completions",
        Some(json!({"prompt": "x ".repeat(100), "max_tokens": 400, "stream": true})),
        &[],
    )
    .await;
    let mut sse = SseReader {
        body: resp.into_body(),
        buf: String::new(),
    };
    assert!(sse.next().await.is_some());
    let busy = get("/get_load").await;
    assert_eq!(busy[0]["num_reqs"], 1);
    assert_eq!(busy[0]["num_waiting_reqs"], 0);
    assert!(busy[0]["num_tokens"].as_u64().unwrap() > 0, "{busy}");
    while sse.next().await.is_some() {}
    assert_eq!(get("/get_load").await[0]["num_reqs"], 0);
    let model = Config::default().model;
    for path in ["/server_info", "/get_server_info"] {
        let info = get(path).await;
        assert_eq!(info["model_path"], model.as_str());
        assert_eq!(info["dp_size"], 1);
    }
    for path in ["/model_info", "/get_model_info"] {
        assert_eq!(get(path).await["is_generation"], true);
    }
}

#[tokio::test]
async fn invalid_requests_get_vllm_style_errors() {
    let r = replica(Config {
        max_model_len: 1000,
        ..Config::default()
    })
    .await;
    let c = client();
    let (status, _, body) = call(&c, &r, Method::POST, "/v1/completions", None, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "BadRequestError");
    assert_eq!(v["error"]["code"], 400);

    let cases = [
        ("/v1/completions", json!({"max_tokens": 5}), 400),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 0}),
            400,
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": "many"}),
            400,
        ),
        ("/v1/completions", json!({"prompt": "hi", "n": 2}), 400),
        (
            "/v1/completions",
            json!({"prompt": "word ".repeat(400), "max_tokens": 900}),
            400,
        ),
        ("/v1/chat/completions", json!({"messages": []}), 400),
        (
            "/v1/chat/completions",
            json!({"messages": [{"content": "no role"}]}),
            400,
        ),
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "hi"}),
            404,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            404,
        ),
    ];
    for (path, body, want) in cases {
        let (status, v) = post_json(&c, &r, path, body.clone()).await;
        assert_eq!(status.as_u16(), want, "{body}");
        assert_eq!(v["error"]["code"], want, "{body}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (_, v) = post_json(
        &c,
        &r,
        "/v1/completions",
        json!({"model": "nope", "prompt": "hi"}),
    )
    .await;
    assert_eq!(v["error"]["type"], "NotFoundError");
    assert_eq!(v["error"]["message"], "The model `nope` does not exist.");
}

#[tokio::test]
async fn failure_injection_by_header_and_by_rate() {
    let r = replica(Config::default()).await;
    let c = client();
    let body = json!({"prompt": "hi", "max_tokens": 1});
    let (status, headers, _) = call(
        &c,
        &r,
        Method::POST,
        "/v1/completions",
        Some(body.clone()),
        &[("x-return-error", "503")],
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        headers["x-inference-pod"], "sim-0",
        "errors identify the replica too"
    );

    r.set_failure_injection(100.0, vec![429]);
    let (status, v) = post_json(&c, &r, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v["error"]["code"], 429);

    // Runtime changes through the admin endpoint as well.
    let (status, v) = post_json(
        &c,
        &r,
        "/admin/failure",
        json!({"rate_percent": 0.0, "statuses": [500]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["statuses"], json!([500]));
    let (status, _) = post_json(&c, &r, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_paused_replica_accepts_but_does_not_answer_until_resumed() {
    let r = replica(Config::default()).await;
    let c = client();
    r.pause();
    let pending = {
        let c = c.clone();
        let uri = format!("{}/health", r.url());
        tokio::spawn(async move {
            c.request(Request::get(uri).body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap()
                .status()
        })
    };
    // Admin endpoints still answer while paused.
    let (status, _, body) = call(&c, &r, Method::GET, "/admin/state", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["paused"],
        true
    );
    let scrape = tokio::time::timeout(
        Duration::from_millis(200),
        call(&c, &r, Method::GET, "/metrics", None, &[]),
    )
    .await;
    assert!(scrape.is_err(), "a paused replica does not answer");
    assert!(!pending.is_finished());

    let (status, _) = post_json(&c, &r, "/admin/resume", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        pending.await.unwrap(),
        StatusCode::OK,
        "held requests proceed after resume"
    );
}

#[tokio::test]
async fn slow_metrics_mode_delays_scrapes() {
    let r = replica(Config::default()).await;
    let c = client();
    r.set_metrics_delay(Duration::from_secs(5));
    let scrape = tokio::time::timeout(
        Duration::from_millis(200),
        call(&c, &r, Method::GET, "/metrics", None, &[]),
    )
    .await;
    assert!(scrape.is_err());
    r.set_metrics_delay(Duration::ZERO);
    let (status, _, _) = call(&c, &r, Method::GET, "/metrics", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn lora_adapters_load_unload_and_list() {
    let r = replica(Config {
        lora_modules: vec!["sql".into()],
        ..Config::default()
    })
    .await;
    let c = client();
    let (status, _, body) = call(
        &c,
        &r,
        Method::POST,
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "chat", "lora_path": "org/chat-lora"})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let (status, _) = post_json(
        &c,
        &r,
        "/v1/load_lora_adapter",
        json!({"lora_name": "chat", "lora_path": "org/chat-lora"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "already loaded");

    let (_, _, body) = call(&c, &r, Method::GET, "/v1/models", None, &[]).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["meta-llama/Llama-3.1-8B-Instruct", "sql", "chat"]);
    assert_eq!(v["data"][1]["parent"], "meta-llama/Llama-3.1-8B-Instruct");

    let (status, v) = post_json(
        &c,
        &r,
        "/v1/completions",
        json!({"model": "chat", "prompt": "q", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["model"], "chat");

    let (status, _, _) = call(
        &c,
        &r,
        Method::POST,
        "/v1/unload_lora_adapter",
        Some(json!({"lora_name": "chat"})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post_json(
        &c,
        &r,
        "/v1/unload_lora_adapter",
        json!({"lora_name": "chat"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post_json(
        &c,
        &r,
        "/v1/completions",
        json!({"model": "chat", "prompt": "q"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn h2c_serves_the_same_api() {
    let r = replica(Config::default()).await;
    let c = h2c_client();
    let resp = start(
        &c,
        &r,
        Method::POST,
        "/v1/completions",
        Some(json!({"prompt": "over h2c", "max_tokens": 3, "stream": true})),
        &[],
    )
    .await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-inference-pod"], "sim-0");
    let mut sse = SseReader {
        body: resp.into_body(),
        buf: String::new(),
    };
    let mut events = Vec::new();
    while let Some(e) = sse.next().await {
        events.push(e);
    }
    assert_eq!(events.len(), 4, "three tokens and [DONE]: {events:?}");
    assert_eq!(events[3], "[DONE]");
    let (status, _, _) = call(&c, &r, Method::GET, "/metrics", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn shutdown_closes_the_port_and_replicas_are_independent() {
    let c = client();
    let replicas = sim::spawn_replicas(&Config::default(), "127.0.0.1", 0, 1)
        .await
        .unwrap();
    assert_eq!(replicas.len(), 1);
    let a = replica(Config::default()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = sim::spawn_replica(Config::default(), listener, 1)
        .await
        .unwrap();
    assert_eq!(b.pod_name(), "sim-1");
    a.pause();
    let (status, headers, _) = call(&c, &b, Method::GET, "/health", None, &[]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "pausing one replica leaves the others alone"
    );
    assert_eq!(headers["x-inference-pod"], "sim-1");
    let addr = b.addr();
    b.shutdown().await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the listener is closed");
}

#[tokio::test]
async fn large_bodies_are_read_and_invalid_configs_refused() {
    let r = replica(Config::default()).await;
    let c = client();
    // 3 MB of prompt: read in full (no 413), then refused for exceeding max-model-len.
    let (status, v) = post_json(
        &c,
        &r,
        "/v1/completions",
        json!({"prompt": "ab ".repeat(1_000_000), "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 131072")
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = sim::spawn_replica(
        Config {
            block_size: 0,
            ..Config::default()
        },
        listener,
        0,
    )
    .await;
    assert!(matches!(err, Err(sim::SimError::InvalidConfig(_))));
}

#[tokio::test]
async fn the_fast_profile_answers_quickly() {
    let r = replica(Config::fast()).await;
    let c = client();
    let (status, v) = post_json(&c, &r, "/v1/completions", json!({"prompt": "hi"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["usage"]["completion_tokens"], 16);
}

/// A replica still loading its model: `/health` says 200 (as vLLM's does early), `/metrics`
/// answers without any engine series, the model list and inference answer 503; once loaded,
/// all of it serves. `/admin/reload` starts another load, as a restart would.
#[tokio::test]
async fn a_loading_replica_is_up_but_serves_no_model() {
    let r = replica(Config {
        model_load_time: Duration::from_secs(3600),
        ..Config::fast()
    })
    .await;
    let c = client();
    let body = |text: &str| Some(json!({"prompt": text, "max_tokens": 2}));
    assert!(r.is_loading());
    let status = |resp: &hyper::Response<Incoming>| resp.status();
    assert_eq!(
        status(&start(&c, &r, Method::GET, "/health", None, &[]).await),
        StatusCode::OK
    );
    let metrics = start(&c, &r, Method::GET, "/metrics", None, &[]).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = String::from_utf8(
        metrics
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(!text.contains("vllm:"), "{text}");
    for (method, path, b) in [
        (Method::GET, "/v1/models", None),
        (Method::POST, "/v1/completions", body("hi")),
    ] {
        let resp = start(&c, &r, method, path, b, &[]).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
    }
    r.set_loading(Duration::ZERO);
    assert!(!r.is_loading());
    let resp = start(&c, &r, Method::POST, "/v1/completions", body("hi"), &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let metrics = start(&c, &r, Method::GET, "/metrics", None, &[]).await;
    let text = String::from_utf8(
        metrics
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("vllm:num_requests_running"), "{text}");
    let reload = start(
        &c,
        &r,
        Method::POST,
        "/admin/reload",
        Some(json!({"seconds": 3600})),
        &[],
    )
    .await;
    assert_eq!(reload.status(), StatusCode::OK);
    assert!(r.is_loading());
    let resp = start(&c, &r, Method::GET, "/v1/models", None, &[]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn the_kv_source_header_pulls_from_a_peer_replica_and_hostile_values_are_ignored() {
    let c = &client();
    let replicas = sim::spawn_replicas(&Config::fast(), "127.0.0.1", 0, 2)
        .await
        .unwrap();
    let (a, b) = (&replicas[0], &replicas[1]);
    // A prompt of 100 token ids (6 full blocks) that only `a` has seen.
    let seen_by_a = |i: u32| async move {
        let body =
            json!({"prompt": (i * 1000..i * 1000 + 100).collect::<Vec<u32>>(), "max_tokens": 1});
        let (status, _) = post_json(c, a, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK);
        body
    };
    let on_b = |body: Value, source: String| async move {
        let (status, _, bytes) = call(
            c,
            b,
            Method::POST,
            "/v1/completions",
            Some(body),
            &[("x-kv-cache-source-host-port", &source)],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{source}");
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        v["usage"]["prompt_tokens_details"]["cached_tokens"].clone()
    };
    let hostile = [
        "nonsense".to_owned(),
        "[::1".to_owned(),
        "1".repeat(300),
        "127.0.0.1:1".to_owned(),
        b.addr().to_string(),
    ];
    for (i, value) in (1..).zip(hostile) {
        let body = seen_by_a(i).await;
        assert_eq!(
            on_b(body, value.clone()).await,
            json!(0),
            "{value}: nothing pulled"
        );
    }
    let body = seen_by_a(9).await;
    assert_eq!(
        on_b(body, a.addr().to_string()).await,
        json!(96),
        "pulled from a"
    );

    let (_, _, text) = call(c, b, Method::GET, "/metrics", None, &[]).await;
    let samples = parse(std::str::from_utf8(&text).unwrap()).unwrap();
    let value = |name: &str, key: &str, label: &str| {
        samples
            .iter()
            .find(|x| x.name == name && x.label(key).as_deref() == Some(label))
            .unwrap_or_else(|| panic!("{name}{{{key}={label}}} missing"))
            .value
    };
    assert_eq!(value("sim_kv_tier_hit_tokens_total", "tier", "peer"), 96.0);
    assert_eq!(
        value("sim_kv_peer_header_ignored_total", "reason", "unparseable"),
        3.0
    );
    assert_eq!(
        value("sim_kv_peer_header_ignored_total", "reason", "unknown"),
        1.0
    );
    assert_eq!(
        value("sim_kv_peer_header_ignored_total", "reason", "self"),
        1.0
    );
}
