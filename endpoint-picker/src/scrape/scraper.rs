//! Polls every endpoint's `/metrics` off the request path and stores what it reads.
//!
//! One task per endpoint ticks at the refresh interval (50 ms by default) and replaces the
//! endpoint's metrics cell. All tasks share one HTTP client, so connections are pooled and kept
//! alive. A failing endpoint is logged once when it starts failing and once when it recovers;
//! its metrics keep their old `updated_at`, so consumers see them go stale.
//!
//! Each scrape also decides the endpoint's [`Readiness`]: metrics that carry none of the
//! engine's core series mean a process still loading its model (`Loading`); before an endpoint
//! becomes `Serving`, the engine's own readiness signal is checked once (its `/v1/models` must
//! list a model); [`ScrapeConfig::failure_threshold`] failed scrapes in a row make it
//! `Unreachable`. The director routes to `Serving` endpoints (see [`Readiness`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::engine::{EngineMapping, Extracted, ReadinessProbe};
use crate::datastore::{Datastore, Endpoint, EndpointId, EngineMetrics, Readiness};

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
/// Largest readiness answer (a model list) we read.
const MAX_PROBE_BODY: usize = 1024 * 1024;

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
    /// Failed scrapes in a row after which an endpoint is `Unreachable` and leaves the
    /// candidates (2: a dead replica is out within two scrape intervals, one lost scrape is
    /// forgiven).
    pub failure_threshold: u32,
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
            failure_threshold: 2,
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

/// How one readiness check ended, when it did not say "serving".
#[derive(Debug, thiserror::Error)]
enum NotServing {
    #[error("readiness check failed: {0}")]
    Unanswered(#[source] ScrapeError),
    #[error("the model list is empty or not a model list")]
    NoModel,
}

/// Hooks for observing scrapes (metrics of the scraper itself).
pub trait ScrapeObserver: Send + Sync + 'static {
    /// Called after each scrape attempt.
    fn scraped(&self, endpoint: &Endpoint, result: Result<(), &ScrapeError>, took: Duration);

    /// An endpoint's scrape task ended before it was told to (it panicked); it is restarted
    /// after [`RESTART_DELAY`].
    fn scrape_task_died(&self, _endpoint: &Endpoint) {}
}

impl ScrapeObserver for () {
    fn scraped(&self, _: &Endpoint, _: Result<(), &ScrapeError>, _: Duration) {}
}

/// How long a dead per-endpoint scrape task waits before it runs again: long enough that a
/// task that dies at once does not spin, short next to a staleness threshold's worth of lost
/// scrapes.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Runs scrapers for the datastore's endpoints until `shutdown`, following membership changes.
/// Each endpoint's task is watched: one that dies (a panic) is reported and started again.
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
    let mut scrapers = Scrapers {
        tasks: HashMap::new(),
        by_task: HashMap::new(),
        set: JoinSet::new(),
        client,
        config,
        observer,
        shutdown: shutdown.clone(),
    };
    loop {
        scrapers.follow(&datastore.snapshot());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            Some(joined) = scrapers.set.join_next_with_id() => scrapers.ended(joined),
        }
    }
    for (_, token) in scrapers.tasks.into_values() {
        token.cancel();
    }
    scrapers.set.shutdown().await;
}

/// The per-endpoint scrape tasks of [`run`].
struct Scrapers {
    tasks: HashMap<EndpointId, (Arc<Endpoint>, CancellationToken)>,
    /// The endpoint and token of each running task: a task whose own token was cancelled ended
    /// as told, even if its endpoint has a newer task by now.
    by_task: HashMap<tokio::task::Id, (EndpointId, CancellationToken)>,
    set: JoinSet<()>,
    client: Client<HttpConnector, Empty<Bytes>>,
    config: Arc<ScrapeConfig>,
    observer: Arc<dyn ScrapeObserver>,
    shutdown: CancellationToken,
}

impl Scrapers {
    /// One task per endpoint of `snapshot`: new endpoints get one, departed ones lose theirs.
    fn follow(&mut self, snapshot: &crate::datastore::PoolSnapshot) {
        let mut live = HashMap::with_capacity(snapshot.endpoints.len());
        for ep in &snapshot.endpoints {
            live.insert(ep.id, ());
            let same = self
                .tasks
                .get(&ep.id)
                .is_some_and(|(old, _)| Arc::ptr_eq(old, ep));
            if !same {
                self.start(ep.clone(), Duration::ZERO);
            }
        }
        self.tasks.retain(|id, (_, token)| {
            let keep = live.contains_key(id);
            if !keep {
                token.cancel();
            }
            keep
        });
    }

    fn start(&mut self, endpoint: Arc<Endpoint>, delay: Duration) {
        if let Some((_, token)) = self.tasks.remove(&endpoint.id) {
            token.cancel();
        }
        let token = self.shutdown.child_token();
        let (client, config, observer, t) = (
            self.client.clone(),
            self.config.clone(),
            self.observer.clone(),
            token.clone(),
        );
        let ep = endpoint.clone();
        let handle = self.set.spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    _ = t.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            scrape_loop(ep, client, config, observer, t).await;
        });
        self.by_task
            .insert(handle.id(), (endpoint.id, token.clone()));
        self.tasks.insert(endpoint.id, (endpoint, token));
    }

    /// A task ended: expected if it was cancelled, else it died and is started again.
    fn ended(&mut self, joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let task = match &joined {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let Some((endpoint_id, token)) = self.by_task.remove(&task) else {
            return;
        };
        if token.is_cancelled() {
            return;
        }
        let Some((endpoint, _)) = self.tasks.get(&endpoint_id) else {
            return;
        };
        let endpoint = endpoint.clone();
        tracing::error!(endpoint = %endpoint.spec.name, panicked = joined.is_err(), "scrape task died; restarting");
        self.observer.scrape_task_died(&endpoint);
        self.start(endpoint, RESTART_DELAY);
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
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let result = scrape_extracted(&client, &url, &endpoint, &config).await;
        observer.scraped(&endpoint, result.as_ref().map(|_| ()), started.elapsed());
        let previous = endpoint.metrics().readiness;
        match result {
            Ok(extracted) => {
                if failures >= config.failure_threshold {
                    tracing::info!(endpoint = %endpoint.spec.name, "metrics scrape recovered");
                }
                failures = 0;
                let readiness =
                    readiness_after_scrape(&client, &endpoint, &config, &extracted, previous).await;
                let mut metrics = extracted.metrics;
                metrics.updated_at = Some(Instant::now());
                metrics.readiness = readiness;
                endpoint.store_metrics(metrics);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                if failures == config.failure_threshold {
                    tracing::warn!(endpoint = %endpoint.spec.name, %url, %error, failures, "metrics scrape failing");
                    let mut metrics = (*endpoint.metrics()).clone();
                    metrics.readiness = Readiness::Unreachable;
                    endpoint.store_metrics(metrics);
                }
            }
        }
        let now = endpoint.metrics().readiness;
        if now != previous {
            tracing::info!(endpoint = %endpoint.spec.name, from = previous.as_str(), to = now.as_str(), "endpoint readiness changed");
        }
    }
}

/// The readiness a successful scrape shows. An endpoint already serving stays so while its
/// engine series are there; one that is not is checked with the engine's own signal first.
async fn readiness_after_scrape(
    client: &Client<HttpConnector, Empty<Bytes>>,
    endpoint: &Endpoint,
    config: &ScrapeConfig,
    extracted: &Extracted,
    previous: Readiness,
) -> Readiness {
    if !extracted.found_any_core {
        return Readiness::Loading;
    }
    if previous == Readiness::Serving {
        return Readiness::Serving;
    }
    let probe = config
        .mapping_for(endpoint)
        .and_then(|m| m.readiness.as_ref());
    match probe {
        None => Readiness::Serving,
        Some(probe) => match check_readiness(client, endpoint, probe, config.timeout).await {
            Ok(()) => Readiness::Serving,
            Err(why) => {
                tracing::debug!(endpoint = %endpoint.spec.name, %why, "not serving yet");
                Readiness::Loading
            }
        },
    }
}

/// Asks the engine, on its inference port, whether it serves its model.
async fn check_readiness(
    client: &Client<HttpConnector, Empty<Bytes>>,
    endpoint: &Endpoint,
    probe: &ReadinessProbe,
    timeout: Duration,
) -> Result<(), NotServing> {
    let path = match probe {
        ReadinessProbe::ModelList(p) | ReadinessProbe::Status(p) => p,
    };
    let url = format!("http://{}{path}", endpoint.spec.address);
    let body = get(client, &url, MAX_PROBE_BODY, timeout)
        .await
        .map_err(NotServing::Unanswered)?;
    match probe {
        ReadinessProbe::Status(_) => Ok(()),
        ReadinessProbe::ModelList(_) => {
            #[derive(serde::Deserialize)]
            struct ModelList {
                data: Vec<serde::de::IgnoredAny>,
            }
            match serde_json::from_slice::<ModelList>(&body) {
                Ok(list) if !list.data.is_empty() => Ok(()),
                _ => Err(NotServing::NoModel),
            }
        }
    }
}

/// A bounded GET: the body of a 2xx answer within `timeout`.
async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ScrapeError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ScrapeError::Url(e.to_string()))?;
    let fetch = async {
        let response = client.get(uri).await.map_err(ScrapeError::Request)?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status()));
        }
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| ScrapeError::Body(e.to_string()))?
            .to_bytes();
        Ok(body)
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout(timeout))?
}

/// Scrapes one endpoint once.
pub async fn scrape_once(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    endpoint: &Endpoint,
    config: &ScrapeConfig,
) -> Result<EngineMetrics, ScrapeError> {
    Ok(scrape_extracted(client, url, endpoint, config)
        .await?
        .metrics)
}

async fn scrape_extracted(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    endpoint: &Endpoint,
    config: &ScrapeConfig,
) -> Result<Extracted, ScrapeError> {
    let mapping = config
        .mapping_for(endpoint)
        .ok_or_else(|| ScrapeError::UnknownEngine(endpoint.engine.to_string()))?;
    let body = get(client, url, MAX_METRICS_BODY, config.timeout).await?;
    let text = std::str::from_utf8(&body).map_err(|_| ScrapeError::Utf8)?;
    Ok(mapping.extract(text))
}
