//! Polls every endpoint's `/metrics` off the request path and stores what it reads.
//!
//! One task per endpoint ticks at the refresh interval (50 ms by default) and replaces the
//! endpoint's metrics cell. All tasks share one HTTP client, so connections are pooled and kept
//! alive. A failing endpoint is logged once when it starts failing and once when it recovers;
//! its metrics keep their old `updated_at`, so consumers see them go stale.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::engine::EngineMapping;
use crate::datastore::{Datastore, Endpoint, EndpointId, EngineMetrics};

/// Labels that name a pod's engine, in order of preference.
const ENGINE_LABELS: [&str; 2] = [crate::datastore::ENGINE_TYPE_LABEL, "llm-d.ai/engine-type"];

fn canonical_engine(v: &str) -> String {
    match v.trim().to_ascii_lowercase().as_str() {
        "triton-tensorrt-llm" => "triton".to_owned(),
        "trtllm" => "trtllm-serve".to_owned(),
        other => other.to_owned(),
    }
}

/// Largest `/metrics` body we read; an engine exposing more is misbehaving.
const MAX_METRICS_BODY: usize = 8 * 1024 * 1024;

/// Scraper settings.
#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// Time between two scrapes of one endpoint.
    pub interval: Duration,
    /// Deadline for one scrape.
    pub timeout: Duration,
    /// URL path of the metrics endpoint.
    pub path: String,
    /// Pod label naming the engine, checked before the well-known ones.
    pub engine_label_key: Option<String>,
    /// Engine name used when an endpoint has no engine label, or an unknown one.
    pub default_engine: String,
    /// Mappings by engine name.
    pub engines: Vec<EngineMapping>,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            path: "/metrics".into(),
            engine_label_key: None,
            default_engine: "vllm".into(),
            engines: EngineMapping::builtin(),
        }
    }
}

impl ScrapeConfig {
    /// The mapping for an endpoint: its engine label (the configured key, then GIE's and
    /// llm-d's), else the default engine.
    pub fn mapping_for(&self, endpoint: &Endpoint) -> Option<&EngineMapping> {
        let labels = &endpoint.spec.labels;
        let engine = self
            .engine_label_key
            .iter()
            .map(String::as_str)
            .chain(ENGINE_LABELS)
            .find_map(|k| labels.get(k))
            .map(|v| canonical_engine(v));
        engine
            .and_then(|e| self.engines.iter().find(|m| m.name == e))
            .or_else(|| self.engines.iter().find(|m| m.name == self.default_engine))
    }
}

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The request did not complete in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Connecting or sending failed.
    #[error("request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    /// The server answered with a non-success status.
    #[error("HTTP status {0}")]
    Status(http::StatusCode),
    /// Reading the body failed or it was too large.
    #[error("reading body: {0}")]
    Body(String),
    /// The body was not UTF-8.
    #[error("body is not UTF-8")]
    Utf8,
    /// The URL could not be built.
    #[error("invalid URL: {0}")]
    Url(String),
    /// No mapping for the engine.
    #[error("no metric mapping for engine {0:?}")]
    UnknownEngine(String),
}

/// Hooks for observing scrapes (metrics of the scraper itself).
pub trait ScrapeObserver: Send + Sync + 'static {
    /// Called after each scrape attempt.
    fn scraped(&self, endpoint: &Endpoint, result: Result<(), &ScrapeError>, took: Duration);
}

impl ScrapeObserver for () {
    fn scraped(&self, _: &Endpoint, _: Result<(), &ScrapeError>, _: Duration) {}
}

/// Runs scrapers for the datastore's endpoints until `shutdown`, following membership changes.
pub async fn run(
    datastore: Arc<Datastore>,
    config: Arc<ScrapeConfig>,
    observer: Arc<dyn ScrapeObserver>,
    shutdown: CancellationToken,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.timeout));
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector);
    let mut changes = datastore.subscribe();
    let mut tasks: HashMap<EndpointId, (Arc<Endpoint>, CancellationToken)> = HashMap::new();
    loop {
        let snapshot = datastore.snapshot();
        let mut live = HashMap::with_capacity(snapshot.endpoints.len());
        for ep in &snapshot.endpoints {
            live.insert(ep.id, ());
            let same = tasks
                .get(&ep.id)
                .is_some_and(|(old, _)| Arc::ptr_eq(old, ep));
            if same {
                continue;
            }
            if let Some((_, token)) = tasks.remove(&ep.id) {
                token.cancel();
            }
            let token = shutdown.child_token();
            tokio::spawn(scrape_loop(
                ep.clone(),
                client.clone(),
                config.clone(),
                observer.clone(),
                token.clone(),
            ));
            tasks.insert(ep.id, (ep.clone(), token));
        }
        tasks.retain(|id, (_, token)| {
            let keep = live.contains_key(id);
            if !keep {
                token.cancel();
            }
            keep
        });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    for (_, token) in tasks.into_values() {
        token.cancel();
    }
}

async fn scrape_loop(
    endpoint: Arc<Endpoint>,
    client: Client<HttpConnector, Empty<Bytes>>,
    config: Arc<ScrapeConfig>,
    observer: Arc<dyn ScrapeObserver>,
    shutdown: CancellationToken,
) {
    let url = format!("http://{}{}", endpoint.spec.metrics_address, config.path);
    let mut ticker = tokio::time::interval(config.interval);
    // A slow scrape must not be followed by a burst of catch-up scrapes.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let result = scrape_once(&client, &url, &endpoint, &config).await;
        observer.scraped(&endpoint, result.as_ref().map(|_| ()), started.elapsed());
        match result {
            Ok(mut metrics) => {
                metrics.updated_at = Some(Instant::now());
                endpoint.store_metrics(metrics);
                if failing {
                    tracing::info!(endpoint = %endpoint.spec.name, "metrics scrape recovered");
                    failing = false;
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(endpoint = %endpoint.spec.name, %url, %error, "metrics scrape failing");
                    failing = true;
                }
            }
        }
    }
}

/// Scrapes one endpoint once.
pub async fn scrape_once(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    endpoint: &Endpoint,
    config: &ScrapeConfig,
) -> Result<EngineMetrics, ScrapeError> {
    let mapping = config
        .mapping_for(endpoint)
        .ok_or_else(|| ScrapeError::UnknownEngine(endpoint.engine.to_string()))?;
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ScrapeError::Url(e.to_string()))?;
    let fetch = async {
        let response = client.get(uri).await.map_err(ScrapeError::Request)?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_METRICS_BODY)
            .collect()
            .await
            .map_err(|e| ScrapeError::Body(e.to_string()))?
            .to_bytes();
        Ok(body)
    };
    let body = tokio::time::timeout(config.timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout(config.timeout))??;
    let text = std::str::from_utf8(&body).map_err(|_| ScrapeError::Utf8)?;
    Ok(mapping.extract(text).metrics)
}
