//! The engine's adapter API, as vLLM serves it: `GET /v1/models` (what is loaded),
//! `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`, `GET /health`.
//!
//! Every call has a deadline and every body read is bounded: the engine is a neighbour, not
//! trusted to answer well (a hung or restarting engine must not stall the syncer forever).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::config::{Adapter, MAX_ID_BYTES};

/// Deadline of one call (a load reads the adapter, which may take a while).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest response body read.
const MAX_BODY: usize = 4 << 20;
/// Most adapters taken from one engine's listing: far above what an engine serves (vLLM's
/// `--max-cpu-loras`), so that a misbehaving engine's list costs the placement a bounded
/// amount each pass. Names longer than [`MAX_ID_BYTES`] or with control characters are
/// dropped too: no catalogue adapter is named so.
pub const MAX_LISTED_ADAPTERS: usize = 1_024;
/// Most characters of an engine's error message kept for logs and metrics.
const MAX_MESSAGE: usize = 200;

/// A failed call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No answer: refused, reset, timed out, unreadable.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// An answer with an error status.
    #[error("engine answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of its body, escaped.
        message: String,
    },
}

impl EngineError {
    /// True for an answer that says the request itself is wrong (4xx): retrying the same
    /// request soon will not help, so it backs off to the longest delay sooner.
    pub fn is_permanent(&self) -> bool {
        matches!(self, EngineError::Status { status, .. } if (400..500).contains(status))
    }
}

/// A vLLM-compatible engine at `host:port`.
#[derive(Clone)]
pub struct Engine {
    base: String,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
    api_key: Option<Arc<str>>,
}

/// Whether there is a key, never the key: a `?engine` in a log line would print it.
fn redacted(key: &Option<Arc<str>>) -> Option<&'static str> {
    key.as_ref().map(|_| "<redacted>")
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .field("api_key", &redacted(&self.api_key))
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Models {
    data: Vec<Model>,
}

#[derive(Deserialize)]
struct Model {
    id: String,
    /// The base model of an adapter; absent (or null) for a base model.
    #[serde(default)]
    parent: Option<String>,
}

fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .take(MAX_MESSAGE)
        .flat_map(char::escape_debug)
        .collect()
}

/// Engines that share one connection pool: a caller that talks to many engines again and
/// again (the EPP's placement loop, every endpoint each pass) keeps one connection to each
/// alive between calls instead of opening a new one per call.
#[derive(Clone)]
pub struct Engines {
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
    api_key: Option<Arc<str>>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("timeout", &self.timeout)
            .field("api_key", &redacted(&self.api_key))
            .finish_non_exhaustive()
    }
}

impl Engines {
    /// Engines whose calls are each bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let client = Client::builder(TokioExecutor::new())
            // One idle connection per engine is all a caller that calls in turn reuses.
            .pool_max_idle_per_host(1)
            .build_http();
        Self {
            timeout,
            client,
            api_key: None,
        }
    }

    /// Sends `key` as a bearer token with every call: an engine started with vLLM's or
    /// SGLang's `--api-key` refuses every path under `/v1` without it (401).
    pub fn with_api_key(mut self, key: Option<Arc<str>>) -> Self {
        self.api_key = key;
        self
    }

    /// The engine at `host:port` (plain HTTP, as a sidecar or the EPP talks to its pods).
    pub fn at(&self, host: &str, port: u16) -> Engine {
        // An IPv6 literal needs brackets in a URL.
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        Engine {
            base: format!("http://{host}:{port}"),
            timeout: self.timeout,
            client: self.client.clone(),
            api_key: self.api_key.clone(),
        }
    }
}

impl Engine {
    /// The engine at `host:port` (plain HTTP, as the sidecar talks to its own pod).
    pub fn new(host: &str, port: u16) -> Self {
        Self::with_timeout(host, port, CALL_TIMEOUT)
    }

    /// The engine at `host:port`, each call bounded by `timeout`, with a connection pool of
    /// its own (see [`Engines`] to share one).
    pub fn with_timeout(host: &str, port: u16, timeout: Duration) -> Self {
        Engines::new(timeout).at(host, port)
    }

    /// The engine's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Bytes), EngineError> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(key) = &self.api_key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let payload = match body {
            Some(v) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| EngineError::Unavailable(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| EngineError::Unavailable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        let limit = self.timeout;
        tokio::time::timeout(limit, call)
            .await
            .map_err(|_| EngineError::Unavailable(format!("no answer within {limit:?}")))?
    }

    /// `GET /health` answers 200.
    pub async fn healthy(&self) -> bool {
        matches!(
            self.call(http::Method::GET, "/health", None).await,
            Ok((200, _))
        )
    }

    /// The ids `GET /v1/models` lists (the base model and every loaded adapter).
    pub async fn models(&self) -> Result<BTreeSet<String>, EngineError> {
        Ok(self.list().await?.into_iter().map(|m| m.id).collect())
    }

    async fn list(&self) -> Result<Vec<Model>, EngineError> {
        let (status, body) = self.call(http::Method::GET, "/v1/models", None).await?;
        if status != 200 {
            return Err(EngineError::Status {
                status,
                message: excerpt(&body),
            });
        }
        let models: Models = serde_json::from_slice(&body).map_err(|e| EngineError::Status {
            status,
            // serde quotes the offending value whole (an engine's 4 MiB string, logged each
            // pass): an excerpt of the message, as of a body.
            message: format!("not a model list: {}", excerpt(e.to_string().as_bytes())),
        })?;
        Ok(models.data)
    }

    /// The adapters `GET /v1/models` lists: the entries with a `parent` (vLLM lists each
    /// registered adapter with its base model as parent, and base models without one).
    pub async fn adapters(&self) -> Result<BTreeSet<String>, EngineError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|m| {
                m.parent.is_some()
                    && !m.id.is_empty()
                    && m.id.len() <= MAX_ID_BYTES
                    && !m.id.chars().any(char::is_control)
            })
            .take(MAX_LISTED_ADAPTERS)
            .map(|m| m.id)
            .collect())
    }

    /// Loads `adapter`. An engine that says it has it already counts as success.
    pub async fn load(&self, adapter: &Adapter) -> Result<(), EngineError> {
        let mut body = serde_json::json!({"lora_name": adapter.id, "lora_path": adapter.source});
        if let Some(base) = &adapter.base_model {
            body["base_model_name"] = serde_json::Value::String(base.clone());
        }
        let (status, answer) = self
            .call(http::Method::POST, "/v1/load_lora_adapter", Some(body))
            .await?;
        let message = excerpt(&answer);
        match status {
            200 => Ok(()),
            400 if message.contains("already been loaded") => Ok(()),
            _ => Err(EngineError::Status { status, message }),
        }
    }

    /// Unloads adapter `id`. An engine that does not have it counts as success.
    pub async fn unload(&self, id: &str) -> Result<(), EngineError> {
        let body = serde_json::json!({"lora_name": id});
        let (status, answer) = self
            .call(http::Method::POST, "/v1/unload_lora_adapter", Some(body))
            .await?;
        match status {
            200 | 404 => Ok(()),
            _ => Err(EngineError::Status {
                status,
                message: excerpt(&answer),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_key() {
        let engines = Engines::new(Duration::from_secs(1)).with_api_key(Some(Arc::from("s3cret")));
        let engine = engines.at("localhost", 8000);
        for text in [format!("{engines:?}"), format!("{engine:?}")] {
            assert!(
                !text.contains("s3cret") && text.contains("<redacted>"),
                "{text}"
            );
        }
    }
}
