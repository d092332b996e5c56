//! The OpenAI-compatible HTTP API of one replica, as vLLM's server exposes it, plus the admin
//! endpoints for failure injection. HTTP/1.1 and h2c are served on the same port.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::config::{Config, FailureInjection};
use crate::engine::{Completion, Engine, EngineEvent, FinishReason, SubmitRequest};
use crate::tiers::{self, PeerIgnored};
use crate::tokenizer::Tokenizer;
use crate::{metrics, tokenizer};

/// Header that forces an error status on an inference request (llm-d sim: `X-Return-Error`).
pub const RETURN_ERROR_HEADER: &str = "x-return-error";

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 << 20;

/// Everything the handlers of one replica share.
#[derive(Debug)]
pub(crate) struct Replica {
    pub(crate) config: Arc<Config>,
    pub(crate) engine: Engine,
    pub(crate) pod_name: String,
    pub(crate) port: u16,
    pub(crate) failure: Mutex<FailureInjection>,
    pub(crate) metrics_delay: Mutex<Duration>,
    /// Until when the model is still "loading" (see `Config::model_load_time`).
    pub(crate) loaded_at: Mutex<tokio::time::Instant>,
    rng: Mutex<SmallRng>,
    created: u64,
    next_id: AtomicU64,
}

impl Replica {
    pub(crate) fn new(config: Arc<Config>, engine: Engine, index: usize, port: u16) -> Self {
        Self {
            pod_name: config.pod_name_for(index),
            failure: Mutex::new(config.failure.clone()),
            metrics_delay: Mutex::new(config.metrics_delay),
            loaded_at: Mutex::new(tokio::time::Instant::now() + config.model_load_time),
            rng: Mutex::new(SmallRng::seed_from_u64(
                config.seed.wrapping_add(index as u64) ^ 0x0fa1_1ed0,
            )),
            created: unix_now(),
            next_id: AtomicU64::new(0),
            config,
            engine,
            port,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The router of one replica.
pub(crate) fn router(replica: Arc<Replica>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics_handler))
        // What SGLang's own router asks a worker for (load monitor, registration); served in
        // SGLang's shape whatever `--engine` says, so that router runs against the simulator
        // with its engine-reported load instead of falling back to its own request counts.
        .route("/get_load", get(sglang_load))
        .route("/server_info", get(sglang_server_info))
        .route("/get_server_info", get(sglang_server_info))
        .route("/model_info", get(sglang_model_info))
        .route("/get_model_info", get(sglang_model_info))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .route("/admin/pause", post(admin_pause))
        .route("/admin/resume", post(admin_resume))
        .route(
            "/admin/failure",
            get(admin_get_failure).post(admin_set_failure),
        )
        .route("/admin/metrics_delay", post(admin_metrics_delay))
        .route("/admin/reload", post(admin_reload))
        .route("/admin/state", get(admin_state))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Not Found", None) })
        // Long prompts (a 128k-token context is ~0.5 MB of text) exceed axum's 2 MB default once
        // wrapped in chat JSON with history; vLLM has no such limit.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(replica.clone(), gate))
        .with_state(replica)
}

/// Holds requests while the replica is paused (except `/admin/*`), and stamps the replica's
/// identity on every response.
async fn gate(State(r): State<Arc<Replica>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/admin/") {
        let mut paused = r.engine.pause_watch();
        // A paused replica accepts the request and then says nothing, like a hung engine.
        let _ = paused.wait_for(|p| !*p).await;
    }
    let loading = tokio::time::Instant::now() < *r.loaded_at.lock();
    let unauthorized = r.config.api_key.as_deref().is_some_and(|key| {
        path.starts_with("/v1")
            && req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                != Some(key)
    });
    let mut resp = if unauthorized {
        // vLLM's AuthenticationMiddleware: this body, whatever the path.
        (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "Unauthorized"})),
        )
            .into_response()
    } else if loading && !path.starts_with("/admin/") && path != "/health" {
        while_loading(path)
    } else {
        next.run(req).await
    };
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&r.pod_name) {
        headers.insert("x-inference-pod", v);
    }
    headers.insert("x-inference-port", HeaderValue::from(r.port));
    if let Some(ns) = r
        .config
        .namespace
        .as_deref()
        .and_then(|ns| HeaderValue::from_str(ns).ok())
    {
        headers.insert("x-inference-namespace", ns);
    }
    resp
}

/// A vLLM-style error: `{"error": {"message", "type", "param", "code"}}`.
pub(crate) fn error(
    status: StatusCode,
    message: impl Into<String>,
    param: Option<&str>,
) -> Response {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        429 => "RateLimitError",
        500 => "InternalServerError",
        503 => "ServiceUnavailableError",
        _ => "Error",
    };
    let body = json!({
        "error": {"message": message.into(), "type": kind, "param": param, "code": status.as_u16()}
    });
    (status, axum::Json(body)).into_response()
}

/// A request error, rendered by [`error`].
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status,
            message: message.into(),
            param,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.message, self.param)
    }
}

fn bad_response(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message, None)
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message, None)
}

/// Failure injection: the forced-error header first, then the random rate.
fn injected_failure(r: &Replica, headers: &HeaderMap) -> Option<Response> {
    let forced = headers
        .get(RETURN_ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|s| s.is_client_error() || s.is_server_error());
    let status = forced.or_else(|| {
        let failure = r.failure.lock();
        if failure.rate_percent <= 0.0 || failure.statuses.is_empty() {
            return None;
        }
        let mut rng = r.rng.lock();
        if rng.random_range(0.0..100.0) >= failure.rate_percent {
            return None;
        }
        let code = failure.statuses[rng.random_range(0..failure.statuses.len())];
        StatusCode::from_u16(code).ok()
    })?;
    let message = match status.as_u16() {
        429 => format!(
            "Rate limit reached for model {} (injected failure)",
            r.config.model
        ),
        503 => "The server is temporarily unable to serve requests (injected failure)".to_owned(),
        _ => format!("Injected failure with status {}", status.as_u16()),
    };
    Some(error(status, message, None))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("Invalid request body: {e}")))
}

/// Resolves the `model` field to the base model or a registered adapter.
fn resolve_model(r: &Replica, model: Option<String>) -> Result<(String, Option<String>), ApiError> {
    match model {
        None => Ok((r.config.model.clone(), None)),
        Some(m) if m == r.config.model => Ok((m, None)),
        Some(m) if r.engine.has_lora(&m) => Ok((m.clone(), Some(m))),
        Some(m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("The model `{m}` does not exist."),
            Some("model"),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

/// A validated generation request.
struct Generation {
    api: Api,
    model: String,
    lora: Option<String>,
    prompt: Vec<u32>,
    max_tokens: Option<i64>,
    stream: bool,
    include_usage: bool,
    /// The peer named by `x-kv-cache-source-host-port`, parsed (or why not), when present.
    peer: Option<Result<std::net::SocketAddr, PeerIgnored>>,
}

/// The request's `x-kv-cache-source-host-port`, parsed and bounded (`tiers::parse_peer`).
fn kv_source(headers: &HeaderMap) -> Option<Result<std::net::SocketAddr, PeerIgnored>> {
    headers
        .get(tiers::KV_SOURCE_HEADER)
        .map(|v| tiers::parse_peer(v.as_bytes()))
}

fn token_ids(tok: &Tokenizer, v: &[Value]) -> Option<Vec<u32>> {
    let vocab = u64::from(tok.vocab_size());
    v.iter()
        .map(|t| t.as_u64().filter(|&t| t < vocab).map(|t| t as u32))
        .collect()
}

fn completion_prompt(tok: &Tokenizer, prompt: Option<Value>) -> Result<Vec<u32>, ApiError> {
    let text = |s: &str| tok.encode_prompt(s).map_err(bad_request);
    let unsupported = || {
        bad_request(
            "Batched prompts are not supported by the simulator; send one prompt per request.",
        )
    };
    match prompt {
        None | Some(Value::Null) => Err(bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty.",
        )),
        Some(Value::String(s)) => text(&s),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => Err(bad_request("The prompt must not be an empty list.")),
            [Value::String(s)] => text(s),
            [Value::Array(ids)] => {
                token_ids(tok, ids).ok_or_else(|| bad_request("Invalid token ids in prompt."))
            }
            [Value::Number(_), ..] => {
                token_ids(tok, &items).ok_or_else(|| bad_request("Invalid token ids in prompt."))
            }
            [Value::String(_) | Value::Array(_), _, ..] => Err(unsupported()),
            _ => Err(bad_request(
                "The prompt must be a string, a list of strings or a list of token ids.",
            )),
        },
        Some(_) => Err(bad_request(
            "The prompt must be a string, a list of strings or a list of token ids.",
        )),
    }
}

/// The ids of a chat request: through the model's chat template when a tokenizer is loaded
/// (from the body as sent, so that its keys keep their order, as they do in vLLM), else the
/// built-in template over the parsed messages.
fn chat_ids(tok: &Tokenizer, messages: Option<Value>, body: &[u8]) -> Result<Vec<u32>, ApiError> {
    match tok.encode_chat_body(body) {
        Some(ids) => ids.map_err(bad_request),
        None => chat_prompt(messages),
    }
}

fn chat_prompt(messages: Option<Value>) -> Result<Vec<u32>, ApiError> {
    let Some(Value::Array(messages)) = messages else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "messages must be a non-empty list.",
            Some("messages"),
        ));
    };
    if messages.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "messages must be a non-empty list.",
            Some("messages"),
        ));
    }
    let mut rendered = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            bad_request(format!("messages[{i}]: a message needs a string 'role'."))
        })?;
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match p.get("text").and_then(Value::as_str) {
                        Some(t) => text.push_str(t),
                        None => {
                            return Err(bad_request(format!(
                                "messages[{i}]: only text content parts are supported by the simulator."
                            )));
                        }
                    }
                }
                text
            }
            Some(_) => {
                return Err(bad_request(format!(
                    "messages[{i}]: content must be a string or a list of parts."
                )));
            }
        };
        rendered.push((role.to_owned(), content));
    }
    Ok(tokenizer::encode_chat(
        rendered.iter().map(|(r, c)| (r.as_str(), c.as_str())),
    ))
}

fn check_n(n: Option<i64>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) if n < 1 => Err(bad_request(format!("n must be at least 1, got {n}."))),
        Some(_) => Err(bad_request("n > 1 is not supported by the simulator.")),
    }
}

async fn completions(State(r): State<Arc<Replica>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(resp) = injected_failure(&r, &headers) {
        return resp;
    }
    let req: CompletionRequest = match parse_json(&body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let result = (|| -> Result<Generation, ApiError> {
        check_n(req.n)?;
        let (model, lora) = resolve_model(&r, req.model)?;
        let prompt = completion_prompt(&r.config.tokenizer, req.prompt)?;
        Ok(Generation {
            api: Api::Completions,
            model,
            lora,
            prompt,
            max_tokens: req.max_tokens,
            stream: req.stream,
            include_usage: req
                .stream_options
                .unwrap_or_default()
                .include_usage
                .unwrap_or(false),
            peer: kv_source(&headers),
        })
    })();
    match result {
        Ok(g) => generate(r, g).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(
    State(r): State<Arc<Replica>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(resp) = injected_failure(&r, &headers) {
        return resp;
    }
    let req: ChatRequest = match parse_json(&body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let result = (|| -> Result<Generation, ApiError> {
        check_n(req.n)?;
        let (model, lora) = resolve_model(&r, req.model)?;
        let prompt = chat_ids(&r.config.tokenizer, req.messages, &body)?;
        Ok(Generation {
            api: Api::Chat,
            model,
            lora,
            prompt,
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            stream: req.stream,
            include_usage: req
                .stream_options
                .unwrap_or_default()
                .include_usage
                .unwrap_or(false),
            peer: kv_source(&headers),
        })
    })();
    match result {
        Ok(g) => generate(r, g).await,
        Err(e) => e.into_response(),
    }
}

async fn generate(r: Arc<Replica>, g: Generation) -> Response {
    let max_model_len = r.config.max_model_len;
    let prompt_len = g.prompt.len();
    let (max_tokens, finish_reason) = match g.max_tokens {
        Some(n) if n < 1 => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("max_tokens must be at least 1, got {n}."),
                Some("max_tokens"),
            );
        }
        Some(n) => (
            usize::try_from(n).unwrap_or(usize::MAX),
            FinishReason::Length,
        ),
        None => (
            r.config
                .default_max_tokens
                .min(max_model_len.saturating_sub(prompt_len))
                .max(1),
            FinishReason::Stop,
        ),
    };
    if prompt_len.saturating_add(max_tokens) > max_model_len {
        return bad_response(format!(
            "This model's maximum context length is {max_model_len} tokens. However, you requested \
             {} tokens ({prompt_len} in the messages, {max_tokens} in the completion). Please \
             reduce the length of the messages or completion.",
            prompt_len.saturating_add(max_tokens)
        ));
    }
    let submit = SubmitRequest {
        prompt: g.prompt,
        max_tokens,
        lora: g.lora.clone(),
        finish_reason,
    };
    let rx = match r.engine.submit_with_peer(submit, g.peer) {
        Ok(rx) => rx,
        Err(e) => return bad_response(e.to_string()),
    };
    let n = r.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match g.api {
        Api::Completions => format!("cmpl-{}-{n}", r.pod_name),
        Api::Chat => format!("chatcmpl-{}-{n}", r.pod_name),
    };
    let ctx = ResponseCtx {
        api: g.api,
        id,
        model: g.model,
        created: unix_now(),
    };
    if g.stream {
        stream_response(ctx, rx, g.include_usage)
    } else {
        full_response(ctx, rx).await
    }
}

struct ResponseCtx {
    api: Api,
    id: String,
    model: String,
    created: u64,
}

impl ResponseCtx {
    fn chunk(&self, text: &str, finish: Option<&str>) -> Value {
        match self.api {
            Api::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}],
            }),
            Api::Chat => json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": finish}],
            }),
        }
    }

    fn usage_chunk(&self, c: &Completion) -> Value {
        let object = match self.api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [], "usage": usage(c),
        })
    }
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    })
}

fn engine_stopped() -> Value {
    json!({"error": {"message": "the engine stopped", "type": "InternalServerError", "param": null, "code": 500}})
}

fn text_of(ids: &[u32]) -> String {
    ids.iter().map(|&id| tokenizer::output_text(id)).collect()
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn stream_response(
    ctx: ResponseCtx,
    mut rx: mpsc::UnboundedReceiver<EngineEvent>,
    include_usage: bool,
) -> Response {
    let body = async_stream::stream! {
        // vLLM sends the chat role chunk in the same iteration as the first token (its stream
        // generator yields nothing before the engine's first output), so nothing reaches the
        // client, or a gateway watching for the first body chunk, before the prefill is done.
        let mut role_pending = ctx.api == Api::Chat;
        loop {
            let event = rx.recv().await;
            if std::mem::take(&mut role_pending) {
                let mut first = ctx.chunk("", None);
                first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
                yield Ok::<_, Infallible>(sse(&first));
            }
            match event {
                Some(EngineEvent::Tokens { ids, last: false, .. }) => {
                    yield Ok(sse(&ctx.chunk(&text_of(&ids), None)));
                }
                Some(EngineEvent::Tokens { ids, last: true, .. }) => {
                    // The request's `Finished` follows in the same engine step; it carries the
                    // finish reason for this last chunk and the usage.
                    match rx.recv().await {
                        Some(EngineEvent::Finished(c)) => {
                            yield Ok(sse(&ctx.chunk(&text_of(&ids), Some(c.finish_reason.as_str()))));
                            if include_usage {
                                yield Ok(sse(&ctx.usage_chunk(&c)));
                            }
                        }
                        _ => yield Ok(sse(&engine_stopped())),
                    }
                    break;
                }
                Some(EngineEvent::Finished(c)) => {
                    yield Ok(sse(&ctx.chunk("", Some(c.finish_reason.as_str()))));
                    if include_usage {
                        yield Ok(sse(&ctx.usage_chunk(&c)));
                    }
                    break;
                }
                None => {
                    yield Ok(sse(&engine_stopped()));
                    break;
                }
            }
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "response build failed",
                None,
            )
        })
}

async fn full_response(ctx: ResponseCtx, mut rx: mpsc::UnboundedReceiver<EngineEvent>) -> Response {
    let mut ids = Vec::new();
    let completion = loop {
        match rx.recv().await {
            Some(EngineEvent::Tokens { ids: chunk, .. }) => ids.extend(chunk),
            Some(EngineEvent::Finished(c)) => break c,
            None => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine stopped",
                    None,
                );
            }
        }
    };
    let text = text_of(&ids);
    let reason = completion.finish_reason.as_str();
    let body = match ctx.api {
        Api::Completions => json!({
            "id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": reason, "stop_reason": null}],
            "usage": usage(&completion),
        }),
        Api::Chat => json!({
            "id": ctx.id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": null, "finish_reason": reason, "stop_reason": null,
            }],
            "usage": usage(&completion),
        }),
    };
    axum::Json(body).into_response()
}

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Value>,
}

/// The prompt token ids the simulator would compute for a request body: `messages` through
/// the chat template when present, else `prompt` (what `/tokenize` answers). The error is the
/// 400 message the server would send. For callers that drive [`crate::Engine`] without HTTP,
/// such as the what-if replay.
pub fn prompt_ids(body: &Value) -> Result<Vec<u32>, String> {
    let tokens = match (body.get("messages"), body.get("prompt")) {
        (Some(messages), _) => chat_prompt(Some(messages.clone())),
        (None, prompt) => completion_prompt(&Tokenizer::BuiltIn, prompt.cloned()),
    };
    tokens.map_err(|e| e.message)
}

/// `POST /tokenize` as vLLM: the ids the engine sees for a prompt or chat messages (with the
/// template), so routing experiments can hash exactly what the engine caches.
async fn tokenize(State(r): State<Arc<Replica>>, body: Bytes) -> Response {
    let req: TokenizeRequest = match parse_json(&body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = resolve_model(&r, req.model) {
        return e.into_response();
    }
    let tok = &r.config.tokenizer;
    let tokens = match (req.messages, req.prompt) {
        (Some(messages), _) => chat_ids(tok, Some(messages), &body),
        (None, prompt) => completion_prompt(tok, prompt),
    };
    match tokens {
        Ok(tokens) => axum::Json(json!({
            "count": tokens.len(), "max_model_len": r.config.max_model_len, "tokens": tokens,
            "token_strs": null,
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    model: Option<String>,
    input: Option<Value>,
}

/// Embeddings are cheap: tokenised and answered at once, without going through the scheduler.
async fn embeddings(State(r): State<Arc<Replica>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(resp) = injected_failure(&r, &headers) {
        return resp;
    }
    let req: EmbeddingRequest = match parse_json(&body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let model = match resolve_model(&r, req.model) {
        Ok((model, _)) => model,
        Err(e) => return e.into_response(),
    };
    let tok = &r.config.tokenizer;
    let text = |s: &str| tok.encode_prompt(s);
    let inputs: Vec<Vec<u32>> = match req.input {
        Some(Value::String(s)) => match text(&s) {
            Ok(ids) => vec![ids],
            Err(e) => return bad_response(e),
        },
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                match token_ids(tok, &items) {
                    Some(ids) => vec![ids],
                    None => return bad_response("Invalid token ids in input."),
                }
            } else {
                let mut out = Vec::with_capacity(items.len());
                for item in &items {
                    match item {
                        Value::String(s) => match text(s) {
                            Ok(ids) => out.push(ids),
                            Err(e) => return bad_response(e),
                        },
                        Value::Array(ids) => match token_ids(tok, ids) {
                            Some(ids) => out.push(ids),
                            None => return bad_response("Invalid token ids in input."),
                        },
                        _ => {
                            return bad_response(
                                "input must be a string, a list of strings or token ids.",
                            );
                        }
                    }
                }
                out
            }
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a non-empty string or list.",
                Some("input"),
            );
        }
    };
    let dim = r.config.embedding_dim;
    let mut total = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            total += ids.len();
            json!({"object": "embedding", "index": i, "embedding": embed(ids, dim)})
        })
        .collect();
    axum::Json(json!({
        "id": format!("embd-{}-{}", r.pod_name, r.next_id.fetch_add(1, Ordering::Relaxed)),
        "object": "list", "created": unix_now(), "model": model, "data": data,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }))
    .into_response()
}

/// A deterministic unit vector derived from the token ids.
fn embed(ids: &[u32], dim: usize) -> Vec<f32> {
    let mut v = vec![0f32; dim];
    if dim == 0 {
        return v;
    }
    for (i, &id) in ids.iter().enumerate() {
        let h = tokenizer::sample(u64::from(id), i);
        v[h as usize % dim] += if h & 1 == 0 { 1.0 } else { -1.0 };
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

async fn models(State(r): State<Arc<Replica>>) -> Response {
    let base = &r.config.model;
    let mut data = vec![json!({
        "id": base, "object": "model", "created": r.created, "owned_by": "vllm",
        "root": base, "parent": null, "max_model_len": r.config.max_model_len, "permission": [],
    })];
    for lora in r.engine.loras() {
        data.push(json!({
            "id": lora, "object": "model", "created": r.created, "owned_by": "vllm",
            "root": lora, "parent": base, "max_model_len": r.config.max_model_len, "permission": [],
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// SGLang's `/get_load`: one entry per data-parallel rank (one here). `num_tokens` is the KV
/// held by running requests, in tokens.
async fn sglang_load(State(r): State<Arc<Replica>>) -> Response {
    let s = r.engine.snapshot();
    axum::Json(json!([{
        "dp_rank": 0,
        "num_reqs": s.running + s.waiting,
        "num_waiting_reqs": s.waiting,
        "num_tokens": s.kv_used_blocks * s.block_size,
    }]))
    .into_response()
}

/// SGLang's `/server_info` (the subset routers read).
async fn sglang_server_info(State(r): State<Arc<Replica>>) -> Response {
    axum::Json(json!({
        "model_path": r.config.model,
        "served_model_name": r.config.model,
        "tp_size": 1,
        "dp_size": 1,
        "context_length": r.config.max_model_len,
        "disaggregation_mode": "null",
        "version": concat!("switchyard-sim ", env!("CARGO_PKG_VERSION")),
    }))
    .into_response()
}

/// SGLang's `/model_info`.
async fn sglang_model_info(State(r): State<Arc<Replica>>) -> Response {
    axum::Json(json!({
        "model_path": r.config.model,
        "tokenizer_path": r.config.model,
        "is_generation": true,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
    }))
    .into_response()
}

/// What a replica still loading its model answers: process metrics only (no engine series yet),
/// 503 for the model list and for inference.
fn while_loading(path: &str) -> Response {
    if path == "/metrics" {
        return (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            "# HELP process_start_time_seconds Start time of the process.\n\
             # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 0\n",
        )
            .into_response();
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "The model is still loading",
        None,
    )
}

/// Makes the replica "load its model" again for `seconds` (a restart), as at start-up, and
/// forgets the adapters loaded at run time.
async fn admin_reload(State(r): State<Arc<Replica>>, body: Bytes) -> Response {
    let seconds = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["seconds"].as_f64())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(0.0);
    *r.loaded_at.lock() = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    // A restarted engine keeps only its start-up adapters (`--lora-modules`); those loaded at
    // run time must be loaded again (what the LoRA syncer re-does).
    r.engine.reset_loras(&r.config.lora_modules);
    axum::Json(json!({"loading_seconds": seconds})).into_response()
}

/// vLLM's `POST /reset_prefix_cache` (a development endpoint there): drops the prefix cache
/// and publishes `AllBlocksCleared`; 400 while requests hold blocks.
async fn reset_prefix_cache(State(r): State<Arc<Replica>>) -> Response {
    if r.engine.reset_prefix_cache() {
        StatusCode::OK.into_response()
    } else {
        error(
            StatusCode::BAD_REQUEST,
            "the prefix cache cannot be reset while requests hold blocks",
            None,
        )
    }
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics_handler(State(r): State<Arc<Replica>>) -> Response {
    let delay = *r.metrics_delay.lock();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let snapshot = r.engine.snapshot();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let text = metrics::render(r.config.engine, &r.config.model, &snapshot, now);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LoraRequest {
    lora_name: Option<String>,
    lora_path: Option<String>,
}

/// Most directory entries walked to size a local adapter (an adapter is a few files).
const MAX_ADAPTER_FILES: usize = 10_000;

/// Where an adapter comes from, as vLLM reads `lora_path`: a local path (which must exist), or
/// a Hugging Face repository id (`owner/name`), which vLLM would download and the simulator
/// accepts as is.
#[derive(Debug, PartialEq, Eq)]
enum AdapterSource {
    /// A local file or directory and its size in bytes.
    Local(u64),
    /// A repository id.
    Hub,
}

/// Checks `lora_path` as vLLM would (`Err` is the message of a 404 or 400).
fn adapter_source(path: &str) -> Result<AdapterSource, (StatusCode, String)> {
    let local = path.strip_prefix("file://").unwrap_or(path);
    let is_local = path.starts_with("file://")
        || local.starts_with('/')
        || local.starts_with("./")
        || local.starts_with("../");
    if is_local {
        let meta = std::fs::metadata(local).map_err(|_| {
            (
                StatusCode::NOT_FOUND,
                format!("No adapter found for {}", escape(path)),
            )
        })?;
        if meta.is_file() {
            return Ok(AdapterSource::Local(meta.len()));
        }
        // A directory: the sum of its files (bounded walk).
        let mut total = 0u64;
        let mut stack = vec![std::path::PathBuf::from(local)];
        let mut seen = 0usize;
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                seen += 1;
                if seen > MAX_ADAPTER_FILES {
                    return Ok(AdapterSource::Local(total));
                }
                match e.metadata() {
                    Ok(m) if m.is_dir() => stack.push(e.path()),
                    Ok(m) => total = total.saturating_add(m.len()),
                    Err(_) => {}
                }
            }
        }
        return Ok(AdapterSource::Local(total));
    }
    let valid_id = {
        let mut parts = path.split('/');
        let ok = |p: Option<&str>| {
            p.is_some_and(|p| {
                !p.is_empty()
                    && p.len() <= 96
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            })
        };
        ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
    };
    if valid_id {
        Ok(AdapterSource::Hub)
    } else {
        Err((
            StatusCode::BAD_REQUEST,
            format!(
                "Invalid lora_path {}: neither a local path nor a repository id",
                escape(path)
            ),
        ))
    }
}

#[cfg(test)]
mod adapter_source_tests {
    use super::*;

    #[test]
    fn sources_are_checked_as_vllm_reads_them() {
        assert_eq!(adapter_source("org/food-review"), Ok(AdapterSource::Hub));
        assert_eq!(
            adapter_source("/definitely/missing/adapter").map_err(|e| e.0),
            Err(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            adapter_source("not a\nrepo").map_err(|e| e.0),
            Err(StatusCode::BAD_REQUEST)
        );
        let dir = std::env::temp_dir().join(format!("sim-adapter-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("sub/adapter_config.json"), b"{}").unwrap();
        assert_eq!(
            adapter_source(dir.to_str().unwrap()),
            Ok(AdapterSource::Local(1002))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A client's string in an error message: escaped, at most 128 characters.
fn escape(s: &str) -> String {
    let mut out: String = s.chars().take(128).flat_map(char::escape_debug).collect();
    if s.chars().count() > 128 {
        out.push('…');
    }
    out
}

async fn load_lora(State(r): State<Arc<Replica>>, body: Bytes) -> Response {
    let req: LoraRequest = match parse_json(&body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let (Some(name), Some(path)) = (
        req.lora_name.filter(|n| !n.is_empty()),
        req.lora_path.filter(|p| !p.is_empty()),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "Both 'lora_name' and 'lora_path' must be provided.",
            Some("lora_name"),
        );
    };
    if r.engine.has_lora(&name) {
        return bad_response(crate::engine::LoraError::AlreadyLoaded(name).to_string());
    }
    // File-system calls run off the async workers.
    let checked = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || adapter_source(&path)).await
    };
    let source = match checked {
        Ok(Ok(s)) => s,
        Ok(Err((status, message))) => return error(status, message, Some("lora_path")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    };
    // Reading the adapter takes time by its size, as in vLLM (the request waits).
    if let AdapterSource::Local(bytes) = source
        && r.config.lora_load_bytes_per_second > 0
    {
        let secs = bytes as f64 / r.config.lora_load_bytes_per_second as f64;
        tokio::time::sleep(Duration::from_secs_f64(secs.min(600.0))).await;
    }
    match r.engine.load_lora(&name) {
        Ok(()) => {
            tracing::info!(pod = %r.pod_name, lora = %name, "LoRA adapter loaded");
            format!("Success: LoRA adapter '{name}' added successfully.").into_response()
        }
        Err(e) => bad_response(e.to_string()),
    }
}

async fn unload_lora(State(r): State<Arc<Replica>>, body: Bytes) -> Response {
    let req: LoraRequest = match parse_json(&body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    let Some(name) = req.lora_name.filter(|n| !n.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "'lora_name' must be provided.",
            Some("lora_name"),
        );
    };
    match r.engine.unload_lora(&name) {
        Ok(()) => {
            tracing::info!(pod = %r.pod_name, lora = %name, "LoRA adapter unloaded");
            format!("Success: LoRA adapter '{name}' removed successfully.").into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string(), Some("lora_name")),
    }
}

async fn admin_pause(State(r): State<Arc<Replica>>) -> Response {
    r.engine.set_paused(true);
    tracing::info!(pod = %r.pod_name, "replica paused");
    axum::Json(json!({"paused": true})).into_response()
}

async fn admin_resume(State(r): State<Arc<Replica>>) -> Response {
    r.engine.set_paused(false);
    tracing::info!(pod = %r.pod_name, "replica resumed");
    axum::Json(json!({"paused": false})).into_response()
}

fn failure_json(f: &FailureInjection) -> Value {
    json!({"rate_percent": f.rate_percent, "statuses": f.statuses})
}

async fn admin_get_failure(State(r): State<Arc<Replica>>) -> Response {
    axum::Json(failure_json(&r.failure.lock())).into_response()
}

#[derive(Debug, Deserialize)]
struct FailureRequest {
    rate_percent: f64,
    statuses: Option<Vec<u16>>,
}

async fn admin_set_failure(State(r): State<Arc<Replica>>, body: Bytes) -> Response {
    let req: FailureRequest = match parse_json(&body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    if !(0.0..=100.0).contains(&req.rate_percent) {
        return bad_response("rate_percent must be within 0..=100");
    }
    let statuses = req
        .statuses
        .unwrap_or_else(|| r.failure.lock().statuses.clone());
    if statuses.iter().any(|&s| !(400..=599).contains(&s)) {
        return bad_response("statuses must be within 400..=599");
    }
    let mut f = r.failure.lock();
    *f = FailureInjection {
        rate_percent: req.rate_percent,
        statuses,
    };
    tracing::info!(pod = %r.pod_name, rate = f.rate_percent, statuses = ?f.statuses, "failure injection set");
    axum::Json(failure_json(&f)).into_response()
}

#[derive(Debug, Deserialize)]
struct DelayRequest {
    ms: u64,
}

async fn admin_metrics_delay(State(r): State<Arc<Replica>>, body: Bytes) -> Response {
    let req: DelayRequest = match parse_json(&body) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    *r.metrics_delay.lock() = Duration::from_millis(req.ms);
    axum::Json(json!({"metrics_delay_ms": req.ms})).into_response()
}

async fn admin_state(State(r): State<Arc<Replica>>) -> Response {
    let s = r.engine.snapshot();
    axum::Json(json!({
        "pod": r.pod_name,
        "paused": r.engine.is_paused(),
        "running": s.running,
        "waiting": s.waiting,
        "kv_cache_usage": s.kv_usage,
        "kv_used_blocks": s.kv_used_blocks,
        "num_gpu_blocks": s.num_gpu_blocks,
        "resident_loras": r.engine.resident_loras(),
        "loras": r.engine.loras(),
        "prefix_cache_queries": s.stats.prefix_queries,
        "prefix_cache_hits": s.stats.prefix_hits,
        "preemptions": s.stats.preemptions,
        "cpu_kv_blocks_held": r.engine.cpu_tier_len(),
        "shared_kv_blocks_held": r.engine.shared_store_len(),
    }))
    .into_response()
}
