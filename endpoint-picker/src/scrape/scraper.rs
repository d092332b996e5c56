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
//! list a model; a check the engine refuses for want of an API key, or does not have, leaves
//! the metrics to decide, and one that gets no answer, or a proxy's "busy", leaves the
//! readiness as it was: `NotServing`; the values read are stored while the check runs,
//! [`EngineMetrics::awaiting_check`]); [`ScrapeConfig::failure_threshold`] failed scrapes in a
//! row make it `Unreachable`, and an unreachable endpoint is scraped less and less often (the
//! interval doubled per failure, up to [`ScrapeConfig::max_quiet_interval`]) until it answers.
//! An engine that served and comes back after reloading its model, or after refusing every
//! connection, restarted in place: [`run`] renews its endpoint ([`Datastore::renew`]). The
//! director routes to `Serving` endpoints, and to those whose first check is under way (see
//! [`Readiness`]).
//!
//! `https` (the `metrics-data-source` plugin's `scheme`, or `--model-server-metrics-scheme`)
//! scrapes over TLS (rustls, ring), and the readiness check then uses https too when the
//! metrics are served on the inference port (one server); metrics on a port of their own have
//! it try plain HTTP first, the pool's `appProtocol`, then https if the port speaks TLS
//! (`check_readiness`). As the reference, certificates are not
//! checked by default (`insecureSkipVerify: true`: model servers serve self-signed certificates
//! for pod IPs); with verification on, the chain and the pod IP are checked against the system
//! roots. TLS sessions are pooled and kept alive like plain connections.
//!
//! Idle cost (a pool of 1,000 endpoints is 20,000 scrapes a second at the default interval):
//! each task reads into one body buffer it keeps; a body identical to the previous one (by
//! hash) is not parsed again; only the metric families the engine's mapping reads are parsed
//! ([`EngineMapping::extract`]); and the interval adapts ([`IdleBackoff`]):
//! - after a scrape whose values equal the previous one the next waits twice as long, up to
//!   [`ScrapeConfig::max_idle_interval`] (150 ms by default, below the saturation detector's
//!   200 ms staleness threshold, so that such an endpoint does not look stale unless its
//!   answer comes 50 ms slower than the one before);
//! - an engine that is also *quiet* (nothing running, nothing waiting) keeps doubling up to
//!   [`ScrapeConfig::max_quiet_interval`] (1 s by default, `--idle-scrape-interval`). Its
//!   values stand until the next scrape ([`EngineMetrics::quiet_until`]), because what changes a
//!   quiet engine is a request, and this EPP sends the requests: routing to it
//!   ([`Endpoint::mark_routed`]) wakes its scraper at once and restarts the back-off. A request
//!   that reaches it by another way (another EPP replica, a client going around the gateway)
//!   is seen at most that interval late, and so is a quiet engine that dies;
//! - any change, a failed scrape or an endpoint not yet serving snaps it back to
//!   [`ScrapeConfig::interval`].
//!
//! So a busy endpoint (values change every scrape) is scraped at the interval, as before; an
//! idle pool of 1,000 costs about 1,000 scrapes a second instead of 20,000.
//!
//! Scrapes fall on a grid shared by every scraper of the process ([`ScrapeGrid`]): up to 16
//! endpoints share a phase, so a small pool's scrapes start in one wake-up of the process
//! rather than one each. Waking an otherwise idle EPP costs more than the scrape itself
//! (≈ 250 µs a scrape one at a time against ≈ 55 µs when the process is busy anyway, bench
//! `overhead` and `scale`), and at the cluster's load the scrapes were most of the EPP's CPU per
//! request (bench `path-cpu`). Larger pools spread over ten phases per interval, as before.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::engine::{EngineMapping, Extracted, ReadinessProbe};
use crate::datastore::{Datastore, Endpoint, EndpointId, EngineMetrics, Readiness};

/// Labels that name a pod's engine, in order of preference.
const ENGINE_LABELS: [&str; 2] = [crate::datastore::ENGINE_TYPE_LABEL, "llm-d.ai/engine-type"];

/// An engine's name as the mappings spell it: the label's value (or a configured default)
/// lower-cased, with upstream's other spellings of ours.
pub fn canonical_engine(v: &str) -> String {
    match v.trim().to_ascii_lowercase().as_str() {
        "triton-tensorrt-llm" => "triton".to_owned(),
        "trtllm" => "trtllm-serve".to_owned(),
        other => other.to_owned(),
    }
}

/// The idle back-off's bound: below the saturation detector's default staleness threshold
/// (200 ms), so that backing off never makes an endpoint look stale.
pub const DEFAULT_MAX_IDLE_INTERVAL: Duration = Duration::from_millis(150);

/// The quiet back-off's bound (`--idle-scrape-interval`): an engine with nothing running or
/// waiting whose values do not change is scraped at least this often.
pub const DEFAULT_MAX_QUIET_INTERVAL: Duration = Duration::from_secs(1);

/// What one scrape showed, for the wait that follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Values changed, the scrape failed, or the endpoint does not serve yet: follow closely.
    Changed,
    /// The same values as before, with work running or waiting.
    Unchanged,
    /// The same values as before, nothing running, nothing waiting.
    Quiet,
}

/// The per-endpoint scrape interval: the base interval while values change, doubling after
/// each scrape that changed nothing, up to one bound, or a longer one while the engine is
/// quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleBackoff {
    base: Duration,
    max: Duration,
    max_quiet: Duration,
    current: Duration,
}

impl IdleBackoff {
    /// Starts at `base`; backs off to at most `max` (raised to `base` if lower), or `max_quiet`
    /// (raised to `max` if lower) while quiet.
    pub fn new(base: Duration, max: Duration, max_quiet: Duration) -> Self {
        let max = max.max(base);
        Self {
            base,
            max,
            max_quiet: max_quiet.max(max),
            current: base,
        }
    }

    /// The wait before the next scrape, after one that showed `observed`.
    pub fn next(&mut self, observed: Observed) -> Duration {
        let doubled = self.current.saturating_mul(2);
        self.current = match observed {
            Observed::Changed => self.base,
            Observed::Unchanged => doubled.min(self.max),
            Observed::Quiet => doubled.min(self.max_quiet),
        };
        self.current
    }

    /// Whether the current wait is past the ordinary bound, which only a quiet engine's is:
    /// its values must be vouched for until the next scrape.
    pub fn is_quiet(&self) -> bool {
        self.current > self.max
    }

    /// Back to the base interval (the engine was just sent a request).
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

/// Largest `/metrics` body we read; an engine exposing more is misbehaving.
const MAX_METRICS_BODY: usize = 8 * 1024 * 1024;
/// Largest readiness answer (a model list) we read.
const MAX_PROBE_BODY: usize = 1024 * 1024;

/// How model servers serve their metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MetricsScheme {
    /// Plain HTTP (the default).
    #[default]
    Http,
    /// HTTP over TLS.
    Https,
}

impl MetricsScheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

impl std::str::FromStr for MetricsScheme {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http" => Ok(Self::Http),
            "https" => Ok(Self::Https),
            other => Err(format!("must be http or https, got {other:?}")),
        }
    }
}

/// How an https model server's certificate is checked.
#[derive(Debug, Clone, Default)]
pub enum ScrapeTls {
    /// Not at all, as the reference's default (`insecureSkipVerify: true`): model servers
    /// usually serve self-signed certificates for pod IPs. The handshake's signature is still
    /// checked against the presented certificate's key, as Go's `InsecureSkipVerify` does.
    #[default]
    SkipVerify,
    /// The chain must lead to one of these roots and name the endpoint's address.
    Verify(Arc<RootCertStore>),
}

/// Why the scraper's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeTlsError {
    /// The system trust store held no usable certificate.
    #[error(
        "no usable root certificate in the system trust store ({errors} errors reading it{first}); \
         install ca-certificates or set SSL_CERT_FILE"
    )]
    NoSystemRoots {
        /// How many errors reading the store.
        errors: usize,
        /// The first of them, formatted (`""` without).
        first: String,
    },
    /// rustls refused the configuration.
    #[error("building the TLS client configuration")]
    Config(#[source] rustls::Error),
}

impl ScrapeTls {
    /// Verification against the system's trust store (`/etc/ssl/certs`, or `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR`), as the reference's Go client with `insecureSkipVerify: false`. Reads
    /// the store once, at start-up.
    pub fn system_roots() -> Result<Self, ScrapeTlsError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(ScrapeTlsError::NoSystemRoots {
                errors: found.errors.len(),
                first: found
                    .errors
                    .first()
                    .map(|e| format!(", first: {e}"))
                    .unwrap_or_default(),
            });
        }
        if !found.errors.is_empty() {
            tracing::warn!(
                added,
                errors = found.errors.len(),
                "some system root certificates could not be read"
            );
        }
        Ok(Self::Verify(Arc::new(roots)))
    }
}

/// Scraper settings.
#[derive(Debug, Clone)]
pub struct ScrapeConfig {
    /// Time between two scrapes of one endpoint.
    pub interval: Duration,
    /// Deadline for one scrape.
    pub timeout: Duration,
    /// `http` or `https` (metrics and the readiness check).
    pub scheme: MetricsScheme,
    /// Certificate checks for `https`.
    pub tls: ScrapeTls,
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
    /// Longest interval an endpoint whose values do not change backs off to (never below
    /// `interval`; see [`IdleBackoff`]).
    pub max_idle_interval: Duration,
    /// Longest interval a quiet endpoint (nothing running or waiting, values unchanged) backs
    /// off to (never below `max_idle_interval`; see the module's documentation).
    pub max_quiet_interval: Duration,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            scheme: MetricsScheme::Http,
            tls: ScrapeTls::SkipVerify,
            path: "/metrics".into(),
            engine_label_key: None,
            default_engine: "vllm".into(),
            engines: EngineMapping::builtin(),
            failure_threshold: 2,
            max_idle_interval: DEFAULT_MAX_IDLE_INTERVAL,
            max_quiet_interval: DEFAULT_MAX_QUIET_INTERVAL,
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
    /// The TLS handshake failed (a certificate that does not verify, a server that does not
    /// speak TLS, ...).
    #[error("TLS handshake failed")]
    Tls(#[source] hyper_util::client::legacy::Error),
    /// The server answered with a non-success status.
    #[error("HTTP status {0}")]
    Status(http::StatusCode),
    /// Reading the body failed (cut short), or, through [`scrape_once`], it was too large.
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
    /// The body is (or was announced) longer than the limit of this many bytes.
    #[error("body over the limit of {0} bytes")]
    TooLarge(usize),
}

impl ScrapeError {
    /// What a server says to a request in the scheme it does not speak: a failed handshake
    /// (TLS to a plain server), a connection closed once made (plain HTTP to uvicorn's or
    /// Envoy's TLS), or a 400 (Go's and nginx's TLS fronts: "Client sent an HTTP request to an
    /// HTTPS server"). Not a refused or timed-out connection, which no scheme would change.
    fn may_be_the_wrong_scheme(&self) -> bool {
        match self {
            ScrapeError::Tls(_) => true,
            ScrapeError::Request(e) => !e.is_connect(),
            ScrapeError::Status(status) => status.as_u16() == 400,
            _ => false,
        }
    }

    /// The connection was refused: no process listening there. (Not a connection that timed
    /// out: an address that drops packets, a partition, says nothing of the process.)
    pub fn is_refused(&self) -> bool {
        let ScrapeError::Request(error) = self else {
            return false;
        };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    return true;
                }
                // An io::Error's `source()` skips the error it wraps: step into it instead.
                if let Some(inner) = io.get_ref() {
                    source = Some(inner as &(dyn std::error::Error + 'static));
                    continue;
                }
            }
            source = e.source();
        }
        false
    }
}

/// How one readiness check ended, when it did not say "serving".
///
/// Only an answer that says "not yet" makes an endpoint [`Readiness::Loading`], which is never
/// routed to. A check that could not be asked (the engine's API wants a key its `/metrics` does
/// not: vLLM's and SGLang's `--api-key`; no such route) leaves the metrics to decide, and one
/// that got no answer (a timeout, a refused connection, TLS) says nothing either way. Taking
/// either for "loading" turned a whole pool behind an API key into 503s, and an overloaded
/// engine whose check timed out into one worse than a dead one.
#[derive(Debug, thiserror::Error)]
enum NotServing {
    /// The engine answered that it does not serve yet: an empty or unreadable model list, an
    /// error status but a proxy's busy ones (429, 502, 503, 504), a readiness status that is
    /// not 2xx.
    #[error("the engine does not serve yet: {0}")]
    NotYet(&'static str),
    /// The check cannot be used on this engine (401, 403: its API wants credentials; 404, 405:
    /// no such route).
    #[error("readiness check unusable: {0}")]
    Unusable(#[source] ScrapeError),
    /// No answer to judge by.
    #[error("readiness check unanswered: {0}")]
    Unanswered(#[source] ScrapeError),
}

/// An answer that says the check cannot be used on this engine, not how the engine is: 401
/// and 403 (its API wants credentials), 404 and 405 (no such route). It came from a server
/// that speaks the scheme asked in.
fn refuses_the_check(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403 | 404 | 405)
}

impl NotServing {
    /// Grades a failed fetch of the check.
    fn from_fetch(error: ScrapeError) -> Self {
        match &error {
            ScrapeError::Status(status) if refuses_the_check(*status) => {
                NotServing::Unusable(error)
            }
            ScrapeError::Status(status) => match status.as_u16() {
                // A proxy or rate limiter in front of the API (a gateway, an auth sidecar)
                // says it is busy or could not reach it, not that the model is loading.
                429 | 502 | 503 | 504 => NotServing::Unanswered(error),
                _ => NotServing::NotYet("the check answered with an error status"),
            },
            ScrapeError::Utf8 => NotServing::NotYet("the check's answer is not text"),
            // Cut short (a reset mid-body): no answer to judge by.
            ScrapeError::Body(_) => NotServing::Unanswered(error),
            ScrapeError::Url(_) | ScrapeError::UnknownEngine(_) => NotServing::Unusable(error),
            ScrapeError::Timeout(_)
            | ScrapeError::Request(_)
            | ScrapeError::Tls(_)
            | ScrapeError::TooLarge(_) => NotServing::Unanswered(error),
        }
    }
}

/// Hooks for observing scrapes (metrics of the scraper itself).
pub trait ScrapeObserver: Send + Sync + 'static {
    /// Called after each scrape attempt.
    fn scraped(&self, endpoint: &Endpoint, result: Result<(), &ScrapeError>, took: Duration);

    /// An endpoint's scrape task ended before it was told to (it panicked); it is restarted
    /// after [`RESTART_DELAY`].
    fn scrape_task_died(&self, _endpoint: &Endpoint) {}

    /// The engine's readiness check could not be used or got no answer (its metrics decided,
    /// or the endpoint's readiness stayed as it was).
    fn readiness_check_failed(&self, _endpoint: &Endpoint, _error: &ScrapeError) {}

    /// The engine of an endpoint that served came back from a restart in place: after its
    /// model loaded again, or after its port refused connections. [`run`] then renews the
    /// endpoint ([`Datastore::renew`]).
    fn engine_restarted(&self, _endpoint: &Endpoint) {}
}

/// Passes every observation on, and the restarts to [`run`], which renews their endpoints.
struct RestartRelay {
    inner: Arc<dyn ScrapeObserver>,
    restarts: tokio::sync::mpsc::Sender<EndpointId>,
}

impl ScrapeObserver for RestartRelay {
    fn scraped(&self, endpoint: &Endpoint, result: Result<(), &ScrapeError>, took: Duration) {
        self.inner.scraped(endpoint, result, took);
    }

    fn scrape_task_died(&self, endpoint: &Endpoint) {
        self.inner.scrape_task_died(endpoint);
    }

    fn readiness_check_failed(&self, endpoint: &Endpoint, error: &ScrapeError) {
        self.inner.readiness_check_failed(endpoint, error);
    }

    fn engine_restarted(&self, endpoint: &Endpoint) {
        self.inner.engine_restarted(endpoint);
        // Full only if hundreds restarted at once; a renewal missed leaves stale affinity,
        // no more.
        let _ = self.restarts.try_send(endpoint.id);
    }
}

impl ScrapeObserver for () {
    fn scraped(&self, _: &Endpoint, _: Result<(), &ScrapeError>, _: Duration) {}
}

/// How long a dead per-endpoint scrape task waits before it runs again: long enough that a
/// task that dies at once does not spin, short next to a staleness threshold's worth of lost
/// scrapes.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// When scrapes start: on points of a grid shared by every scraper of the process, one period
/// (the refresh interval) long with ten phases; endpoint ids in blocks of
/// [`ScrapeGrid::BATCH`] share a phase, so their scrapes start in the same wake-up.
#[derive(Debug, Clone, Copy)]
pub struct ScrapeGrid {
    origin: Instant,
    period: Duration,
}

impl ScrapeGrid {
    /// Endpoints whose scrapes start together (ids `16k` to `16k + 15`).
    pub const BATCH: u32 = 16;
    /// Phases per period: larger pools are spread over the interval.
    pub const PHASES: u32 = 10;

    /// A grid of `period` from `origin`.
    pub fn new(origin: Instant, period: Duration) -> Self {
        Self {
            origin,
            period: period.max(Duration::from_millis(1)),
        }
    }

    /// The offset of `id`'s phase in the period.
    pub fn phase_of(&self, id: EndpointId) -> Duration {
        self.period * ((id.0 / Self::BATCH) % Self::PHASES) / Self::PHASES
    }

    /// When the scrape after one that was due at `due` (or started then, woken early) and
    /// waits `wait` starts, on the grid, `now` being when it ended. The wait counts from when
    /// the scrape was due, not from when its task woke: a wake-up a few milliseconds late (a
    /// busy EPP: a thousand endpoints' timers on two cores) rounded the next start up to the
    /// point after, so a busy endpoint was scraped every other point and one whose values stood
    /// still 200 ms apart instead of 150, past the saturation detector's staleness. A scrape
    /// slower than the wait is followed by the next free point, not by a catch-up burst.
    pub fn next_start(
        &self,
        phase: Duration,
        due: Instant,
        wait: Duration,
        now: Instant,
    ) -> Instant {
        self.align(phase, (due + wait).max(now + wait / 2))
    }

    /// The first point of `phase` no earlier than half a phase before `due`: a scrape due
    /// between two points starts at the nearer one, never more than half a phase (5 % of the
    /// interval) early, and one due at a point starts there.
    pub fn align(&self, phase: Duration, due: Instant) -> Instant {
        let slack = self.period / Self::PHASES / 2;
        let start = self.origin + phase;
        let target = due.checked_sub(slack).unwrap_or(due);
        if target <= start {
            return start;
        }
        let period = self.period.as_nanos().max(1);
        let periods = (target - start).as_nanos().div_ceil(period);
        let offset = periods.saturating_mul(period);
        start + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
    }
}

/// Runs scrapers for the datastore's endpoints until `shutdown`, following membership changes.
/// Each endpoint's task is watched: one that dies (a panic) is reported and started again.
pub async fn run(
    datastore: Arc<Datastore>,
    config: Arc<ScrapeConfig>,
    observer: Arc<dyn ScrapeObserver>,
    shutdown: CancellationToken,
) {
    let client = match client(&config) {
        Ok(client) => client,
        Err(error) => {
            // Only a provider without TLS versions gets here; ring's has both.
            tracing::error!(%error, "metrics scraping cannot start");
            return;
        }
    };
    let mut changes = datastore.subscribe();
    let grid = ScrapeGrid::new(Instant::now(), config.interval);
    let (restarts_tx, mut restarts) = tokio::sync::mpsc::channel(256);
    let observer: Arc<dyn ScrapeObserver> = Arc::new(RestartRelay {
        inner: observer,
        restarts: restarts_tx,
    });
    let mut scrapers = Scrapers {
        tasks: HashMap::new(),
        by_task: HashMap::new(),
        set: JoinSet::new(),
        client,
        grid,
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
            Some(id) = restarts.recv() => {
                if let Some(fresh) = datastore.renew(id) {
                    tracing::info!(
                        endpoint = %fresh.spec.name, from = id.0, to = fresh.id.0,
                        "engine restarted in place: renewed, what was known of its cache forgotten"
                    );
                }
            }
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
    client: ScrapeClient,
    grid: ScrapeGrid,
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
        let (client, grid, config, observer, t) = (
            self.client.clone(),
            self.grid,
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
            scrape_loop(ep, client, grid, config, observer, t).await;
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

async fn scrape_loop<S: Source>(
    endpoint: Arc<Endpoint>,
    client: S,
    grid: ScrapeGrid,
    config: Arc<ScrapeConfig>,
    observer: Arc<dyn ScrapeObserver>,
    shutdown: CancellationToken,
) {
    let url = format!(
        "{}://{}{}",
        config.scheme.as_str(),
        endpoint.spec.metrics_address,
        config.path
    );
    // Parsed once: every scrape of this endpoint asks for the same URL.
    let uri = parse_url(&url).map_err(|e| e.to_string());
    let mut backoff = IdleBackoff::new(
        config.interval,
        config.max_idle_interval,
        config.max_quiet_interval,
    );
    let mut failures = 0u32;
    // A page that lacks some of its mapping's core series (a typo in a custom mapping, an
    // engine that renamed one) is warned about once per task, not at every scrape.
    let mut warned_missing = false;
    // For telling an engine that restarted in place (see `SinceServing`).
    let mut served = false;
    let mut since_serving = SinceServing::default();
    let mut check_memory = CheckMemory::default();
    // The endpoint's first readiness check has been asked (its first, see `awaiting_check`).
    let mut checked = false;
    // Kept across scrapes: the body buffer (no allocation per scrape once grown), and the last
    // body's hash with what it gave (an identical body is not parsed again).
    let mut body = Vec::new();
    let mut last: Option<(u64, Extracted)> = None;
    let phase = grid.phase_of(endpoint.id);
    // The first scrape at once (a new endpoint); the next ones on the grid.
    let mut next_at = Instant::now();
    loop {
        let routed = endpoint.routed();
        tokio::pin!(routed);
        let quiet = backoff.is_quiet();
        if quiet {
            // Registered before the flag is up: a request routed in between still wakes us.
            routed.as_mut().enable();
            endpoint.set_quiet(true);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next_at) => {}
            _ = &mut routed, if quiet => backoff.reset(),
        }
        endpoint.set_quiet(false);
        let started = Instant::now();
        let result = scrape_reusing(&client, &uri, &endpoint, &config, &mut body, &mut last).await;
        observer.scraped(&endpoint, result.as_ref().map(|_| ()), started.elapsed());
        let previous = endpoint.metrics().readiness;
        let observed = match &result {
            Ok((_, changed)) if *changed || previous != Readiness::Serving => Observed::Changed,
            Ok((x, _)) if x.metrics.running_requests == 0 && x.metrics.waiting_queue_size == 0 => {
                Observed::Quiet
            }
            Ok(_) => Observed::Unchanged,
            Err(_) => Observed::Changed,
        };
        let wait = backoff.next(observed);
        next_at = grid.next_start(phase, next_at.min(started), wait, Instant::now());
        match result {
            Ok((extracted, _)) => {
                if failures >= config.failure_threshold {
                    tracing::info!(endpoint = %endpoint.spec.name, "metrics scrape recovered");
                }
                failures = 0;
                if extracted.found_any_core
                    && !extracted.missing_core.is_empty()
                    && !std::mem::replace(&mut warned_missing, true)
                {
                    tracing::warn!(
                        endpoint = %endpoint.spec.name, engine = %endpoint.engine,
                        missing = ?extracted.missing_core,
                        "the engine's metrics lack series its mapping reads; they count as 0"
                    );
                }
                // The values are as of now, not of when the readiness check below returns.
                let read_at = Instant::now();
                if !extracted.found_any_core {
                    since_serving.reloaded = true;
                }
                // An endpoint already serving stays so while its engine series are there;
                // one that is not is checked with the engine's own signal first.
                let probe = config
                    .mapping_for(&endpoint)
                    .and_then(|m| m.readiness.as_ref());
                let readiness = match probe {
                    _ if !extracted.found_any_core => Readiness::Loading,
                    _ if previous == Readiness::Serving => Readiness::Serving,
                    None => Readiness::Serving,
                    Some(probe) => {
                        // The check may take the scrape's timeout: the values read are stored
                        // first, the readiness unchanged, so that an endpoint whose first
                        // check is under way is weighed by what it holds, not as an empty
                        // engine (and only its first: one whose check went unanswered is not
                        // admitted again).
                        let mut early = extracted.metrics.clone();
                        early.updated_at = Some(read_at);
                        early.readiness = previous;
                        early.awaiting_check = !std::mem::replace(&mut checked, true);
                        endpoint.store_metrics(early);
                        readiness_by_check(
                            &client,
                            &endpoint,
                            probe,
                            &config,
                            previous,
                            &*observer,
                            &mut check_memory,
                        )
                        .await
                    }
                };
                if readiness == Readiness::Serving {
                    if std::mem::replace(&mut served, true)
                        && previous != Readiness::Serving
                        && since_serving.restarted()
                    {
                        observer.engine_restarted(&endpoint);
                    }
                    since_serving = SinceServing::default();
                }
                let mut metrics = extracted.metrics;
                metrics.updated_at = Some(read_at);
                // Vouched for until the next scrape has had its time to answer.
                metrics.quiet_until = backoff.is_quiet().then(|| next_at + config.timeout);
                metrics.readiness = readiness;
                endpoint.store_metrics(metrics);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                if error.is_refused() && endpoint.spec.metrics_address == endpoint.spec.address {
                    since_serving.refused = true;
                }
                let reached = failures == config.failure_threshold;
                let old = endpoint.metrics();
                if reached || old.quiet_until.is_some() {
                    // A failed scrape vouches for nothing.
                    let mut metrics = (*old).clone();
                    metrics.quiet_until = None;
                    if reached {
                        tracing::warn!(endpoint = %endpoint.spec.name, %url, %error, failures, "metrics scrape failing");
                        metrics.readiness = Readiness::Unreachable;
                    }
                    endpoint.store_metrics(metrics);
                }
            }
        }
        if failures >= config.failure_threshold {
            // Unreachable: knocked on less and less often, up to the quiet interval, so a
            // partition of many endpoints is not a storm of connects (20 a second each at the
            // default interval). The first answer puts it back on the regular interval.
            next_at = grid.align(
                phase,
                (started + unreachable_wait(&config, failures)).max(Instant::now()),
            );
        }
        let now = endpoint.metrics().readiness;
        if now != previous {
            tracing::info!(endpoint = %endpoint.spec.name, from = previous.as_str(), to = now.as_str(), "endpoint readiness changed");
        }
    }
}

/// What an endpoint went through since it last served, for telling an engine that restarted
/// in place from one that was only slow or out of reach.
///
/// A hung, overloaded or partitioned engine times out, or is answered for by a proxy; it does
/// not refuse connections (the kernel accepts them, or drops packets), and it may come back
/// with its cache. A refusal on the engine's own port, or a page without its series, is a
/// process that went and came back, whatever else failed meanwhile (a scrape in flight when it
/// was killed, a watchdog killing a hung one). A refusal on a metrics port of its own may be a
/// sidecar's, and says nothing of the engine.
#[derive(Debug, Default)]
struct SinceServing {
    /// A page without the engine's series: a process loading its model again.
    reloaded: bool,
    /// A connection refused on the engine's own port (`/metrics` served on the inference port).
    refused: bool,
}

impl SinceServing {
    fn restarted(&self) -> bool {
        self.reloaded || self.refused
    }
}

/// How long after a failed scrape's start the next one comes, `failures` in a row, at least
/// [`ScrapeConfig::failure_threshold`]: the interval doubled per failure past the threshold,
/// at most [`ScrapeConfig::max_quiet_interval`] (and never below the interval).
fn unreachable_wait(config: &ScrapeConfig, failures: u32) -> Duration {
    let doublings = failures
        .saturating_sub(config.failure_threshold)
        .saturating_add(1)
        .min(16);
    config
        .interval
        .saturating_mul(1 << doublings)
        .min(config.max_quiet_interval)
        .max(config.interval)
}

/// The readiness the engine's own signal gives an endpoint that does not serve yet
/// ([`NotServing`] says what each failure of the check means).
async fn readiness_by_check<S: Source>(
    client: &S,
    endpoint: &Endpoint,
    probe: &ReadinessProbe,
    config: &ScrapeConfig,
    previous: Readiness,
    observer: &dyn ScrapeObserver,
    memory: &mut CheckMemory,
) -> Readiness {
    match check_readiness(client, endpoint, probe, config, &mut memory.scheme).await {
        Ok(()) => Readiness::Serving,
        Err(why @ NotServing::NotYet(_)) => {
            tracing::debug!(endpoint = %endpoint.spec.name, %why, "not serving yet");
            Readiness::Loading
        }
        Err(NotServing::Unusable(error)) => {
            observer.readiness_check_failed(endpoint, &error);
            if !std::mem::replace(&mut memory.warned_unusable, true) {
                tracing::warn!(
                    endpoint = %endpoint.spec.name, %error,
                    "the engine's readiness check cannot be used (an API key? no such route?): \
                     its metrics decide whether it serves"
                );
            }
            Readiness::Serving
        }
        Err(NotServing::Unanswered(error)) => {
            observer.readiness_check_failed(endpoint, &error);
            tracing::debug!(endpoint = %endpoint.spec.name, %error, "readiness check unanswered");
            previous
        }
    }
}

/// What a scrape task remembers of its endpoint's readiness checks.
#[derive(Debug, Default)]
struct CheckMemory {
    /// An unusable check was warned about (once per task, not at every recovery).
    warned_unusable: bool,
    /// The scheme the check last got an answer with.
    scheme: Option<&'static str>,
}

/// Asks the engine, on its inference port, whether it serves its model.
///
/// The scheme first tried is the one last shown to work, else the metrics' when they share the
/// inference port, else plain HTTP, as an InferencePool's `appProtocol` (`http`,
/// `kubernetes.io/h2c`) says (an https sidecar in front of `/metrics` on a port of its own says
/// nothing of the API's). A check answered as a server answers the scheme it does not speak
/// ([`ScrapeError::may_be_the_wrong_scheme`]) is tried once with the other (an API on TLS
/// behind an https metrics sidecar); a scheme is kept in `scheme` only once an answer shows it
/// works (2xx, or 401/403/404/405), not after a timeout or a 400.
async fn check_readiness<S: Source>(
    client: &S,
    endpoint: &Endpoint,
    probe: &ReadinessProbe,
    config: &ScrapeConfig,
    scheme: &mut Option<&'static str>,
) -> Result<(), NotServing> {
    let path = match probe {
        ReadinessProbe::ModelList(p) | ReadinessProbe::Status(p) => p,
    };
    let first = scheme.unwrap_or(if endpoint.spec.metrics_address == endpoint.spec.address {
        config.scheme.as_str()
    } else {
        "http"
    });
    let other = if first == "http" { "https" } else { "http" };
    let mut body = Vec::new();
    let mut fetched = Err(ScrapeError::Url(String::new()));
    for (attempt, tried) in [first, other].into_iter().enumerate() {
        let url = format!("{tried}://{}{path}", endpoint.spec.address);
        let uri = parse_url(&url).map_err(NotServing::Unusable)?;
        fetched = client
            .fetch(&uri, MAX_PROBE_BODY, config.timeout, &mut body)
            .await;
        // Kept only once an answer shows the scheme works: a timeout or a 400 does not.
        let works = match &fetched {
            Ok(()) => true,
            Err(ScrapeError::Status(status)) => refuses_the_check(*status),
            Err(_) => false,
        };
        if works {
            *scheme = Some(tried);
        }
        if attempt > 0
            || !fetched
                .as_ref()
                .is_err_and(ScrapeError::may_be_the_wrong_scheme)
        {
            break;
        }
        tracing::debug!(endpoint = %endpoint.spec.name, scheme = tried, "readiness check answered as in the wrong scheme; trying the other");
    }
    match (probe, fetched) {
        (_, Ok(())) => {}
        // A model list longer than the check reads lists models (thousands of adapters).
        (ReadinessProbe::ModelList(_), Err(ScrapeError::TooLarge(_))) => return Ok(()),
        (_, Err(error)) => return Err(NotServing::from_fetch(error)),
    }
    match probe {
        ReadinessProbe::Status(_) => Ok(()),
        ReadinessProbe::ModelList(_) => {
            #[derive(serde::Deserialize)]
            struct ModelList {
                data: Vec<serde::de::IgnoredAny>,
            }
            match serde_json::from_slice::<ModelList>(&body) {
                Ok(list) if !list.data.is_empty() => Ok(()),
                _ => Err(NotServing::NotYet(
                    "the model list is empty or not a model list",
                )),
            }
        }
    }
}

/// A bounded GET: the body of a 2xx answer within `timeout`.
async fn get(
    client: &ScrapeClient,
    url: &str,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ScrapeError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ScrapeError::Url(e.to_string()))?;
    let fetch = async {
        let response = client.get(uri).await.map_err(classify)?;
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

/// Where a scrape task's bytes come from: the engine over HTTP(S) (the shared client), or a
/// script in tests, so that the task's timing can be checked in virtual time.
trait Source: Send + Sync {
    /// A bounded GET of `url` into `buf` (cleared first, its capacity kept): the body of a 2xx
    /// answer within `timeout`.
    fn fetch(
        &self,
        url: &http::Uri,
        limit: usize,
        timeout: Duration,
        buf: &mut Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), ScrapeError>> + Send;
}

impl Source for ScrapeClient {
    async fn fetch(
        &self,
        url: &http::Uri,
        limit: usize,
        timeout: Duration,
        buf: &mut Vec<u8>,
    ) -> Result<(), ScrapeError> {
        get_into(self, url.clone(), limit, timeout, buf).await
    }
}

fn parse_url(url: &str) -> Result<http::Uri, ScrapeError> {
    url.parse()
        .map_err(|e: http::uri::InvalidUri| ScrapeError::Url(e.to_string()))
}

/// One scrape into the task's `body` buffer: the extracted values and whether they differ from
/// the previous scrape's. A body identical to the previous one is not parsed.
async fn scrape_reusing<S: Source>(
    client: &S,
    url: &Result<http::Uri, String>,
    endpoint: &Endpoint,
    config: &ScrapeConfig,
    body: &mut Vec<u8>,
    last: &mut Option<(u64, Extracted)>,
) -> Result<(Extracted, bool), ScrapeError> {
    let mapping = config
        .mapping_for(endpoint)
        .ok_or_else(|| ScrapeError::UnknownEngine(endpoint.engine.to_string()))?;
    let url = url.as_ref().map_err(|e| ScrapeError::Url(e.clone()))?;
    let fetched = client
        .fetch(url, MAX_METRICS_BODY, config.timeout, body)
        .await;
    let read = fetched.and_then(|()| read_body(mapping, body, last));
    // One page far larger than usual (up to the 8 MiB limit) must not stay held by every
    // endpoint's task for good, whether it was read or failed part-way (too long, too slow).
    if body.capacity() > MAX_KEPT_BODY_CAPACITY {
        *body = Vec::new();
    }
    read
}

/// The buffer a scrape task keeps between scrapes, at most: a vLLM page is tens to a few
/// hundred KB.
const MAX_KEPT_BODY_CAPACITY: usize = 1 << 20;

/// What `body` says, and whether that changed since `last` (an identical body is not parsed
/// again).
fn read_body(
    mapping: &EngineMapping,
    body: &[u8],
    last: &mut Option<(u64, Extracted)>,
) -> Result<(Extracted, bool), ScrapeError> {
    let hash = xxhash_rust::xxh64::xxh64(body, 0);
    if let Some((h, extracted)) = last.as_ref()
        && *h == hash
    {
        return Ok((extracted.clone(), false));
    }
    let text = std::str::from_utf8(body).map_err(|_| ScrapeError::Utf8)?;
    let extracted = mapping.extract(text);
    let changed = last.as_ref().is_none_or(|(_, l)| *l != extracted);
    *last = Some((hash, extracted.clone()));
    Ok((extracted, changed))
}

/// A bounded GET into `buf` (cleared first, its capacity kept): the body of a 2xx answer
/// within `timeout`.
async fn get_into(
    client: &ScrapeClient,
    uri: http::Uri,
    limit: usize,
    timeout: Duration,
    buf: &mut Vec<u8>,
) -> Result<(), ScrapeError> {
    buf.clear();
    let fetch = async {
        let response = client.get(uri).await.map_err(classify)?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status()));
        }
        // A page announced over the limit is refused before a byte of it is read: an engine
        // whose page outgrew the limit is not downloaded whole at every retry.
        if response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|announced| announced > limit as u64)
        {
            return Err(ScrapeError::TooLarge(limit));
        }
        let mut incoming = response.into_body();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| ScrapeError::Body(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(ScrapeError::TooLarge(limit));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout(timeout))?
}

/// Scrapes one endpoint once.
pub async fn scrape_once(
    client: &ScrapeClient,
    url: &str,
    endpoint: &Endpoint,
    config: &ScrapeConfig,
) -> Result<EngineMetrics, ScrapeError> {
    Ok(scrape_extracted(client, url, endpoint, config)
        .await?
        .metrics)
}

async fn scrape_extracted(
    client: &ScrapeClient,
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

/// The HTTP(S) client shared by all scrape tasks.
pub type ScrapeClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The client for `config`: pooled keep-alive connections, `TCP_NODELAY`, the scrape timeout
/// as connect timeout, and TLS for `https` URLs as `config.tls` says (plain `http` URLs go
/// through the same client untouched).
pub fn client(config: &ScrapeConfig) -> Result<ScrapeClient, ScrapeTlsError> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.timeout));
    // The TLS layer hands https URLs to this connector; it must not refuse them.
    http.enforce_http(false);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(ScrapeTlsError::Config)?;
    let tls = match &config.tls {
        ScrapeTls::SkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipServerVerification(provider)))
            .with_no_client_auth(),
        ScrapeTls::Verify(roots) => builder
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
    };
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector))
}

/// A TLS failure gets its own error (and metric reason): it is a configuration problem (a
/// certificate that does not verify, a plain-HTTP server), not a server that is down.
fn classify(error: hyper_util::client::legacy::Error) -> ScrapeError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if e.is::<rustls::Error>() {
            return ScrapeError::Tls(error);
        }
        // tokio-rustls wraps rustls errors in io::Errors (nested, through the connector), and
        // an io::Error's `source()` skips the error it wraps: step into it instead.
        source = match e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    ScrapeError::Request(error)
}

/// `insecureSkipVerify`: any certificate is accepted, but the handshake must still be signed
/// by the key of the certificate presented.
#[derive(Debug)]
struct SkipServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;

    /// An engine in a script: `/metrics` with a queue that is empty (idle), stays put
    /// (`steady`), or moves with every scrape (`busy`), plus a process counter that always
    /// moves (no two bodies alike, as vLLM's); its model list for the readiness check. Counts
    /// the metrics scrapes.
    #[derive(Default)]
    struct Scripted {
        scrapes: AtomicU64,
        busy: AtomicBool,
        steady: AtomicBool,
    }

    impl Source for Arc<Scripted> {
        async fn fetch(
            &self,
            url: &http::Uri,
            _limit: usize,
            _timeout: Duration,
            buf: &mut Vec<u8>,
        ) -> Result<(), ScrapeError> {
            buf.clear();
            if url.path() == "/v1/models" {
                buf.extend_from_slice(br#"{"data":[{"id":"m"}]}"#);
                return Ok(());
            }
            let n = self.scrapes.fetch_add(1, Ordering::Relaxed);
            let queue = if self.busy.load(Ordering::Relaxed) {
                n + 1
            } else if self.steady.load(Ordering::Relaxed) {
                3
            } else {
                0
            };
            buf.extend_from_slice(
                format!(
                    "vllm:num_requests_waiting {queue}\nvllm:num_requests_running 0\n\
                     vllm:kv_cache_usage_perc 0.5\nprocess_cpu_seconds_total {n}\n"
                )
                .as_bytes(),
            );
            Ok(())
        }
    }

    fn spawn_loop(
        endpoint: &Arc<Endpoint>,
        engine: &Arc<Scripted>,
        shutdown: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(scrape_loop(
            endpoint.clone(),
            engine.clone(),
            ScrapeGrid::new(Instant::now(), ScrapeConfig::default().interval),
            Arc::new(ScrapeConfig::default()),
            Arc::new(()),
            shutdown.clone(),
        ))
    }

    async fn window(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// A scrape whose task woke late keeps the grid's rhythm: the next one counts from when it
    /// was due, not from the late wake-up.
    #[test]
    fn a_late_wake_up_does_not_push_the_next_scrape_a_point_further() {
        let ms = Duration::from_millis;
        let origin = Instant::now();
        let grid = ScrapeGrid::new(origin, ms(50));
        let phase = Duration::ZERO;
        let due = origin + ms(100);
        // Woke 3 ms late, the scrape took 2 ms.
        let now = due + ms(5);
        for (wait, next) in [(ms(50), 150), (ms(150), 250)] {
            assert_eq!(grid.next_start(phase, due, wait, now), origin + ms(next));
        }
        // A scrape slower than its wait: the next free point, no burst.
        assert_eq!(
            grid.next_start(phase, due, ms(50), due + ms(120)),
            origin + ms(250)
        );
    }

    #[test]
    fn scrapes_fall_on_points_of_the_shared_grid() {
        let ms = Duration::from_millis;
        let origin = Instant::now();
        let grid = ScrapeGrid::new(origin, ms(50));
        assert_eq!(grid.phase_of(EndpointId(0)), Duration::ZERO);
        assert_eq!(grid.phase_of(EndpointId(15)), Duration::ZERO);
        assert_eq!(grid.phase_of(EndpointId(16)), ms(5));
        assert_eq!(grid.phase_of(EndpointId(16 * 9 + 3)), ms(45));
        assert_eq!(grid.phase_of(EndpointId(16 * 10)), Duration::ZERO);
        // (phase, due, start), ms from the origin. Due on a point: that point; up to half a
        // phase after one: that one; later: the next. A long quiet wait lands on the grid too.
        for (phase, due, start) in [
            (0, 100, 100),
            (0, 102, 100),
            (0, 103, 150),
            (5, 52, 55),
            (5, 0, 5),
            (0, 1_002, 1_000),
            (0, 1_017, 1_050),
        ] {
            assert_eq!(
                grid.align(ms(phase), origin + ms(due)),
                origin + ms(start),
                "phase {phase}, due {due}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn busy_endpoints_started_apart_are_scraped_in_the_same_wake_ups() {
        /// A busy [`Scripted`] engine that notes when each metrics scrape happened.
        #[derive(Default)]
        struct Clocked {
            inner: Arc<Scripted>,
            at: parking_lot::Mutex<Vec<Instant>>,
        }
        impl Source for Arc<Clocked> {
            async fn fetch(
                &self,
                url: &http::Uri,
                limit: usize,
                timeout: Duration,
                buf: &mut Vec<u8>,
            ) -> Result<(), ScrapeError> {
                if url.path() != "/v1/models" {
                    self.at.lock().push(Instant::now());
                }
                self.inner.fetch(url, limit, timeout, buf).await
            }
        }
        let ds = crate::datastore::Datastore::new();
        let endpoints = ds
            .apply(crate::datastore::test_util::pool(3))
            .endpoints
            .clone();
        let config = Arc::new(ScrapeConfig::default());
        let origin = Instant::now();
        let grid = ScrapeGrid::new(origin, config.interval);
        let shutdown = CancellationToken::new();
        let mut engines = Vec::new();
        let mut tasks = Vec::new();
        for (endpoint, delay) in endpoints.iter().zip([0, 17, 31]) {
            window(delay).await;
            let engine = Arc::new(Clocked::default());
            engine.inner.busy.store(true, Ordering::Relaxed);
            tasks.push(tokio::spawn(scrape_loop(
                endpoint.clone(),
                engine.clone(),
                grid,
                config.clone(),
                Arc::new(()),
                shutdown.clone(),
            )));
            engines.push(engine);
        }
        window(1_000).await;
        let times: Vec<Vec<Duration>> = engines
            .iter()
            .map(|e| e.at.lock().iter().map(|t| *t - origin).collect())
            .collect();
        // Each is scraped at once when it appears (0, 17 and 48 ms), then on the grid.
        assert_eq!(times[0][0], Duration::ZERO);
        assert_eq!(times[1][0], Duration::from_millis(17));
        assert_eq!(times[2][0], Duration::from_millis(48));
        for t in &times {
            assert!(
                t[1..].iter().all(|d| d.as_millis() % 50 == 0),
                "off the grid: {t:?}"
            );
        }
        // From 100 ms on, the three are scraped at the same instants, every 50 ms.
        let after = |t: &Vec<Duration>| -> Vec<Duration> {
            t.iter()
                .copied()
                .filter(|d| *d >= Duration::from_millis(100))
                .collect()
        };
        assert_eq!(after(&times[0]), after(&times[1]));
        assert_eq!(after(&times[0]), after(&times[2]));
        assert!(
            (18..=20).contains(&after(&times[0]).len()),
            "{:?}",
            times[0]
        );
        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_endpoint_is_scraped_rarely_until_it_is_routed_to() {
        let ds = crate::datastore::Datastore::new();
        let endpoint = ds.apply(crate::datastore::test_util::pool(1)).endpoints[0].clone();
        let engine = Arc::new(Scripted::default());
        let shutdown = CancellationToken::new();
        let task = spawn_loop(&endpoint, &engine, &shutdown);
        // Quiet for 3 s: at 0, 50, 150, 350, 750, 1,550 and 2,550 ms (doubling to the 1 s
        // bound): 7 scrapes where a fixed 50 ms interval makes 61.
        window(3_010).await;
        assert_eq!(
            engine.scrapes.swap(0, Ordering::Relaxed),
            7,
            "quiet scrapes in 3 s"
        );
        assert!(endpoint.is_quiet());
        let m = endpoint.metrics();
        assert_eq!(m.readiness, Readiness::Serving);
        // 460 ms since the last scrape, past the saturation detector's 200 ms, yet fresh: the
        // quiet engine's values stand until its next scrape (3,550) has had its timeout.
        let now = Instant::now();
        assert!(!m.is_stale(now, Duration::from_millis(200)));
        assert!(
            m.quiet_until
                .is_some_and(|q| q > now + Duration::from_millis(500))
        );
        // Routed to: the scraper wakes at once, and follows closely again.
        endpoint.mark_routed();
        assert!(!endpoint.is_quiet());
        window(1).await;
        assert_eq!(
            engine.scrapes.swap(0, Ordering::Relaxed),
            1,
            "woken by routing"
        );
        assert_eq!(
            endpoint.metrics().quiet_until,
            None,
            "not vouched for right after"
        );
        // The request shows up: values change at every scrape, 50 ms apart.
        engine.busy.store(true, Ordering::Relaxed);
        window(3_000).await;
        let busy = engine.scrapes.swap(0, Ordering::Relaxed);
        assert!(
            (58..=61).contains(&busy),
            "scrapes in 3 s while busy: {busy}"
        );
        assert!(!endpoint.is_quiet());
        // Work that stays put (a steady queue) is not quiet: bounded at 150 ms, never stale.
        engine.busy.store(false, Ordering::Relaxed);
        engine.steady.store(true, Ordering::Relaxed);
        window(3_000).await;
        let steady = engine.scrapes.swap(0, Ordering::Relaxed);
        assert!(
            (19..=23).contains(&steady),
            "scrapes in 3 s steady: {steady}"
        );
        assert_eq!(endpoint.metrics().quiet_until, None);
        // Quiet again: backs off again, and a change it did not cause is seen within 1 s.
        engine.steady.store(false, Ordering::Relaxed);
        window(3_000).await;
        let again = engine.scrapes.swap(0, Ordering::Relaxed);
        assert!(
            (6..=8).contains(&again),
            "scrapes in 3 s quiet again: {again}"
        );
        engine.busy.store(true, Ordering::Relaxed);
        window(1_001).await;
        assert!(engine.scrapes.load(Ordering::Relaxed) >= 1);
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_endpoint_that_fails_is_vouched_for_no_longer() {
        let ds = crate::datastore::Datastore::new();
        let endpoint = ds.apply(crate::datastore::test_util::pool(1)).endpoints[0].clone();
        let shutdown = CancellationToken::new();

        /// Answers like [`Scripted`]'s quiet engine until `dead`, then refuses.
        #[derive(Default)]
        struct Dying {
            inner: Arc<Scripted>,
            dead: AtomicBool,
            refused: AtomicU64,
        }
        impl Source for Arc<Dying> {
            async fn fetch(
                &self,
                url: &http::Uri,
                limit: usize,
                timeout: Duration,
                buf: &mut Vec<u8>,
            ) -> Result<(), ScrapeError> {
                if self.dead.load(Ordering::Relaxed) {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(ScrapeError::Status(http::StatusCode::SERVICE_UNAVAILABLE));
                }
                self.inner.fetch(url, limit, timeout, buf).await
            }
        }
        let engine = Arc::new(Dying::default());
        let task = tokio::spawn(scrape_loop(
            endpoint.clone(),
            engine.clone(),
            ScrapeGrid::new(Instant::now(), ScrapeConfig::default().interval),
            Arc::new(ScrapeConfig::default()),
            Arc::new(()),
            shutdown.clone(),
        ));
        window(3_010).await;
        assert!(endpoint.metrics().quiet_until.is_some());
        engine.dead.store(true, Ordering::Relaxed);
        // The next quiet scrape (3,550) fails: no longer vouched for, stale at once; the
        // second failure, 50 ms later, makes it unreachable.
        window(560).await;
        let m = endpoint.metrics();
        assert_eq!(m.quiet_until, None);
        assert!(m.is_stale(Instant::now(), Duration::from_millis(200)));
        window(60).await;
        assert_eq!(endpoint.metrics().readiness, Readiness::Unreachable);
        // Unreachable, it is knocked on less and less often: 100, 200, 400, 800 ms, then every
        // second (the quiet interval), not every 50 ms.
        let before = engine.refused.load(Ordering::Relaxed);
        window(10_000).await;
        let knocks = engine.refused.load(Ordering::Relaxed) - before;
        assert!((10..=14).contains(&knocks), "{knocks} scrapes in 10 s");
        // It answers again: back on the regular interval within a second.
        engine.dead.store(false, Ordering::Relaxed);
        window(1_100).await;
        assert_eq!(endpoint.metrics().readiness, Readiness::Serving);
        shutdown.cancel();
        task.await.unwrap();
    }

    /// One huge page is read, then its buffer let go; a usual page's buffer is kept.
    #[tokio::test]
    async fn a_huge_page_does_not_stay_held_between_scrapes() {
        struct Paged(usize);
        impl Source for Paged {
            async fn fetch(
                &self,
                _url: &http::Uri,
                _limit: usize,
                _timeout: Duration,
                buf: &mut Vec<u8>,
            ) -> Result<(), ScrapeError> {
                buf.clear();
                buf.extend_from_slice(b"vllm:num_requests_waiting 4\n");
                buf.resize(self.0, b'\n');
                Ok(())
            }
        }
        let ds = crate::datastore::Datastore::new();
        let endpoint = ds.apply(crate::datastore::test_util::pool(1)).endpoints[0].clone();
        let config = ScrapeConfig::default();
        let url = Ok("http://10.0.0.1:8000/metrics".parse().unwrap());
        let (mut body, mut last) = (Vec::new(), None);
        for (size, kept) in [(4 << 20, false), (64 << 10, true)] {
            let (read, _) =
                scrape_reusing(&Paged(size), &url, &endpoint, &config, &mut body, &mut last)
                    .await
                    .unwrap();
            assert_eq!(read.metrics.waiting_queue_size, 4);
            assert_eq!(body.capacity() >= size, kept, "{size}");
        }
    }

    /// What an engine's readiness check answers, for [`Checked`].
    #[derive(Clone, Copy)]
    enum CheckAnswer {
        Models,
        Empty,
        Status(u16),
        Timeout,
    }

    /// [`Scripted`]'s quiet engine whose readiness check answers as `check` says, after
    /// `check_delay_ms`; records the URIs it is asked for, the stamp `watched` carries at each
    /// scrape, and counts the failed checks the observer is told of.
    struct Checked {
        metrics: Arc<Scripted>,
        /// `/metrics` answers (`Up`), has no engine series (`Loading`), or times out (`Hung`).
        page: parking_lot::Mutex<Page>,
        restarts: AtomicU64,
        /// Real refused connections (see [`refusals`]), handed out by `Page::Refused` scrapes
        /// and by plain-HTTP checks while `plain_check` is `Refused`.
        refusals: parking_lot::Mutex<Vec<ScrapeError>>,
        /// How the inference port answers a plain-HTTP check, if not as `check` says.
        plain_check: parking_lot::Mutex<Option<PlainCheck>>,
        check: parking_lot::Mutex<CheckAnswer>,
        check_delay_ms: u64,
        asked: parking_lot::Mutex<Vec<http::Uri>>,
        watched: Option<Arc<Endpoint>>,
        stamps_seen: parking_lot::Mutex<Vec<Option<Instant>>>,
        failed_checks: AtomicU64,
    }

    impl Checked {
        fn new(check: CheckAnswer) -> Arc<Self> {
            Arc::new(Self {
                metrics: Arc::default(),
                page: parking_lot::Mutex::new(Page::Up),
                restarts: AtomicU64::new(0),
                refusals: parking_lot::Mutex::default(),
                plain_check: parking_lot::Mutex::new(None),
                check: parking_lot::Mutex::new(check),
                check_delay_ms: 0,
                asked: parking_lot::Mutex::default(),
                watched: None,
                stamps_seen: parking_lot::Mutex::default(),
                failed_checks: AtomicU64::new(0),
            })
        }

        /// One endpoint on `10.0.0.1:8000`, its metrics on `metrics_port`, scraped from this
        /// engine under `config` until [`Scraped::stop`].
        fn scrape(self: &Arc<Self>, metrics_port: u16, config: ScrapeConfig) -> Scraped {
            let ds = crate::datastore::Datastore::new();
            let mut pool = crate::datastore::test_util::pool(1);
            pool.endpoints[0].metrics_address.set_port(metrics_port);
            self.scrape_endpoint(ds.apply(pool).endpoints[0].clone(), config)
        }

        /// `endpoint` scraped from this engine under `config` until [`Scraped::stop`].
        fn scrape_endpoint(
            self: &Arc<Self>,
            endpoint: Arc<Endpoint>,
            config: ScrapeConfig,
        ) -> Scraped {
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(scrape_loop(
                endpoint.clone(),
                self.clone(),
                ScrapeGrid::new(Instant::now(), config.interval),
                Arc::new(config),
                self.clone(),
                shutdown.clone(),
            ));
            Scraped {
                endpoint,
                shutdown,
                task,
            }
        }
    }

    /// A scrape task under test, and its endpoint.
    struct Scraped {
        endpoint: Arc<Endpoint>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Scraped {
        fn readiness(&self) -> Readiness {
            self.endpoint.metrics().readiness
        }

        /// Ends the task, which must end when told.
        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.unwrap();
        }
    }

    impl Source for Arc<Checked> {
        async fn fetch(
            &self,
            url: &http::Uri,
            limit: usize,
            timeout: Duration,
            buf: &mut Vec<u8>,
        ) -> Result<(), ScrapeError> {
            self.asked.lock().push(url.clone());
            if url.path() != "/v1/models" {
                if let Some(endpoint) = &self.watched {
                    self.stamps_seen.lock().push(endpoint.metrics().updated_at);
                }
                let page = *self.page.lock();
                return match page {
                    Page::Up => self.metrics.fetch(url, limit, timeout, buf).await,
                    Page::Loading => {
                        buf.clear();
                        buf.extend_from_slice(b"process_cpu_seconds_total 1\n");
                        Ok(())
                    }
                    Page::Hung => {
                        window(timeout.as_millis() as u64).await;
                        Err(ScrapeError::Timeout(timeout))
                    }
                    Page::Refused => Err(self.refusals.lock().pop().expect("a refusal left")),
                };
            }
            let plain_check = *self.plain_check.lock();
            match plain_check {
                Some(_) if url.scheme_str() != Some("http") => {}
                None => {}
                Some(PlainCheck::Refused) => {
                    return Err(self.refusals.lock().pop().expect("a refusal left"));
                }
                Some(PlainCheck::BadRequest) => {
                    return Err(ScrapeError::Status(http::StatusCode::BAD_REQUEST));
                }
            }
            window(self.check_delay_ms).await;
            buf.clear();
            let answer = *self.check.lock();
            match answer {
                CheckAnswer::Models => buf.extend_from_slice(br#"{"data":[{"id":"m"}]}"#),
                CheckAnswer::Empty => buf.extend_from_slice(br#"{"data":[]}"#),
                CheckAnswer::Status(code) => {
                    return Err(ScrapeError::Status(
                        http::StatusCode::from_u16(code).expect("a status code"),
                    ));
                }
                CheckAnswer::Timeout => {
                    window(timeout.as_millis() as u64).await;
                    return Err(ScrapeError::Timeout(timeout));
                }
            }
            Ok(())
        }
    }

    impl ScrapeObserver for Checked {
        fn scraped(&self, _: &Endpoint, _: Result<(), &ScrapeError>, _: Duration) {}

        fn readiness_check_failed(&self, _: &Endpoint, _: &ScrapeError) {
            self.failed_checks.fetch_add(1, Ordering::Relaxed);
        }

        fn engine_restarted(&self, _: &Endpoint) {
            self.restarts.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[derive(Clone, Copy)]
    enum Page {
        Up,
        Loading,
        Hung,
        Refused,
    }

    /// `n` real refused connections (a closed loopback port), made before the test pauses
    /// time: an error of the HTTP client cannot be built otherwise.
    async fn refusals(n: usize) -> Vec<ScrapeError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let client = client(&ScrapeConfig::default()).unwrap();
        let mut errors = Vec::with_capacity(n);
        for _ in 0..n {
            let url = format!("http://{address}/metrics");
            let error = get(&client, &url, 1024, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(error.is_refused(), "{error:?}");
            errors.push(error);
        }
        errors
    }

    /// An engine whose port refused connections, then serves again, restarted, whatever else
    /// failed meanwhile (hung, then killed by a watchdog). A refusal on a metrics port of its
    /// own may be a sidecar's: no restart.
    #[tokio::test]
    async fn an_engine_that_refused_connections_then_serves_restarted() {
        let refused = refusals(64).await;
        tokio::time::pause();
        let engine = Checked::new(CheckAnswer::Models);
        *engine.refusals.lock() = refused;
        let scraped = engine.scrape(8000, ScrapeConfig::default());
        window(200).await;
        assert_eq!(scraped.readiness(), Readiness::Serving);
        let restarts =
            away_and_back(&engine, &scraped, Page::Refused, Readiness::Unreachable).await;
        assert_eq!(restarts, 1);
        *engine.page.lock() = Page::Hung;
        window(3_000).await;
        let restarts =
            away_and_back(&engine, &scraped, Page::Refused, Readiness::Unreachable).await;
        assert_eq!(restarts, 1, "hung, then refused");
        scraped.stop().await;

        let sidecar = Checked::new(CheckAnswer::Models);
        *sidecar.refusals.lock() = std::mem::take(&mut *engine.refusals.lock());
        let scraped = sidecar.scrape(9090, ScrapeConfig::default());
        window(200).await;
        let restarts =
            away_and_back(&sidecar, &scraped, Page::Refused, Readiness::Unreachable).await;
        assert_eq!(restarts, 0, "refused on the metrics port alone");
        scraped.stop().await;
    }

    /// The engine's page turns `away` for 3 s, where its endpoint must be `gone`, then `Up`
    /// (its checks answering as `engine.check` says for 2.5 s, then listing a model) until it
    /// serves again; the restarts told meanwhile.
    async fn away_and_back(
        engine: &Checked,
        scraped: &Scraped,
        away: Page,
        gone: Readiness,
    ) -> u64 {
        let before = engine.restarts.load(Ordering::Relaxed);
        *engine.page.lock() = away;
        window(3_000).await;
        assert_eq!(scraped.readiness(), gone);
        assert_eq!(
            engine.restarts.load(Ordering::Relaxed),
            before,
            "told early"
        );
        *engine.page.lock() = Page::Up;
        window(2_500).await;
        *engine.check.lock() = CheckAnswer::Models;
        window(1_100).await;
        assert_eq!(scraped.readiness(), Readiness::Serving);
        engine.restarts.load(Ordering::Relaxed) - before
    }

    /// An engine that served and then loaded its model again restarted in place: told once.
    /// One that timed out for a while (hung, overloaded) and answers again did not.
    #[tokio::test(start_paused = true)]
    async fn an_engine_that_loads_its_model_again_restarted() {
        let engine = Checked::new(CheckAnswer::Models);
        let scraped = engine.scrape(8000, ScrapeConfig::default());
        window(200).await;
        assert_eq!(scraped.readiness(), Readiness::Serving);
        // Hung for 5 s, then answering (its first checks unanswered, or answered "busy" or
        // "not yet" by a proxy in front of it): no restart.
        for check in [
            CheckAnswer::Models,
            CheckAnswer::Timeout,
            CheckAnswer::Status(503),
            CheckAnswer::Status(500),
        ] {
            *engine.check.lock() = check;
            let restarts = away_and_back(&engine, &scraped, Page::Hung, Readiness::Unreachable);
            assert_eq!(restarts.await, 0);
        }
        // Its model loading again: a restart, told when it serves again, once.
        let restarts = away_and_back(&engine, &scraped, Page::Loading, Readiness::Loading).await;
        assert_eq!(restarts, 1);
        scraped.stop().await;
    }

    /// A connection refused is a process not listening; a timeout is not.
    #[tokio::test]
    async fn a_refused_connection_is_told_from_a_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let client = client(&ScrapeConfig::default()).unwrap();
        let error = get(
            &client,
            &format!("http://{address}/metrics"),
            1024,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(error.is_refused(), "{error:?}");
        assert!(!ScrapeError::Timeout(Duration::from_secs(1)).is_refused());
        assert!(!ScrapeError::Status(http::StatusCode::BAD_GATEWAY).is_refused());
    }

    /// vLLM and SGLang behind `--api-key` answer 401 on `/v1/models` and serve `/metrics`
    /// openly: the metrics decide, the endpoint serves (it was `Loading`, never routed to, and
    /// such a pool answered every request with 503). So does an engine without the route.
    #[tokio::test(start_paused = true)]
    async fn a_check_refused_for_want_of_a_key_leaves_the_metrics_to_decide() {
        for code in [401, 403, 404, 405] {
            let engine = Checked::new(CheckAnswer::Status(code));
            let scraped = engine.scrape(8000, ScrapeConfig::default());
            window(500).await;
            assert_eq!(scraped.readiness(), Readiness::Serving, "{code}");
            // Checked once, then served on its metrics: no check at every scrape.
            assert_eq!(engine.failed_checks.load(Ordering::Relaxed), 1, "{code}");
            scraped.stop().await;
        }
    }

    /// An engine that answers "not yet" is loading: an empty model list, a server error.
    #[tokio::test(start_paused = true)]
    async fn a_check_that_answers_not_yet_is_loading_until_it_lists_a_model() {
        for answer in [CheckAnswer::Empty, CheckAnswer::Status(500)] {
            let engine = Checked::new(answer);
            let scraped = engine.scrape(8000, ScrapeConfig::default());
            window(500).await;
            assert_eq!(scraped.readiness(), Readiness::Loading);
            assert_eq!(engine.failed_checks.load(Ordering::Relaxed), 0);
            *engine.check.lock() = CheckAnswer::Models;
            window(100).await;
            assert_eq!(scraped.readiness(), Readiness::Serving);
            scraped.stop().await;
        }
    }

    /// A check that gets no answer says nothing: the endpoint keeps the readiness it had
    /// (unknown, or unreachable after failed scrapes: routed to when nothing serves), where it
    /// was made `Loading`, never routed to, worse than a dead engine. A proxy's or a rate
    /// limiter's busy answer is none either.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_check_leaves_the_readiness_as_it_was() {
        for answer in [
            CheckAnswer::Timeout,
            CheckAnswer::Status(429),
            CheckAnswer::Status(502),
            CheckAnswer::Status(503),
            CheckAnswer::Status(504),
        ] {
            let engine = Checked::new(answer);
            let scraped = engine.scrape(8000, ScrapeConfig::default());
            window(3_000).await;
            let m = scraped.endpoint.metrics();
            assert_eq!(m.readiness, Readiness::Unknown);
            // The values were read and stored all the same, and the check is not under way.
            assert!(m.updated_at.is_some());
            assert!(!m.awaiting_check);
            assert!(engine.failed_checks.load(Ordering::Relaxed) >= 2);
            *engine.check.lock() = CheckAnswer::Models;
            window(1_100).await;
            assert_eq!(scraped.readiness(), Readiness::Serving);
            scraped.stop().await;
        }
    }

    /// With `/metrics` on a port of its own behind https (a sidecar), the check goes to the
    /// inference port in plain HTTP, the pool's `appProtocol`; on one port, the metrics' scheme.
    #[tokio::test(start_paused = true)]
    async fn the_check_uses_https_only_where_the_metrics_share_the_inference_port() {
        for (metrics_port, check_scheme) in [(8443, "http"), (8000, "https")] {
            let engine = Checked::new(CheckAnswer::Models);
            let config = ScrapeConfig {
                scheme: MetricsScheme::Https,
                ..ScrapeConfig::default()
            };
            let scraped = engine.scrape(metrics_port, config);
            window(100).await;
            assert_eq!(scraped.readiness(), Readiness::Serving);
            let asked = engine.asked.lock().clone();
            let check = asked.iter().find(|u| u.path() == "/v1/models").unwrap();
            assert_eq!(check.scheme_str(), Some(check_scheme), "{asked:?}");
            assert_eq!(check.port_u16(), Some(8000));
            let scrape = asked.iter().find(|u| u.path() == "/metrics").unwrap();
            assert_eq!(scrape.scheme_str(), Some("https"));
            assert_eq!(scrape.port_u16(), Some(metrics_port));
            scraped.stop().await;
        }
    }

    /// The values are stamped when they were read, not when a slow readiness check returned.
    #[tokio::test(start_paused = true)]
    async fn values_are_stamped_when_read_not_when_the_check_returns() {
        let ds = crate::datastore::Datastore::new();
        let endpoint = ds.apply(crate::datastore::test_util::pool(1)).endpoints[0].clone();
        let engine = Arc::new(Checked {
            check_delay_ms: 500,
            watched: Some(endpoint.clone()),
            ..Arc::into_inner(Checked::new(CheckAnswer::Models)).unwrap()
        });
        let started = Instant::now();
        let scraped = engine.scrape_endpoint(endpoint, ScrapeConfig::default());
        window(600).await;
        assert_eq!(scraped.readiness(), Readiness::Serving);
        // What the second scrape found stored: the first scrape's values, stamped when they
        // were read (at once), not when the check returned 500 ms later.
        let seen = engine.stamps_seen.lock().clone();
        assert_eq!(seen[..2], [None, Some(started)], "{seen:?}");
        scraped.stop().await;
    }

    /// While its check is under way the endpoint's values are stored, marked as such, so the
    /// director weighs it by them; once the check answers, the mark goes.
    #[tokio::test(start_paused = true)]
    async fn values_are_stored_while_the_check_is_under_way() {
        let engine = Arc::new(Checked {
            check_delay_ms: 500,
            ..Arc::into_inner(Checked::new(CheckAnswer::Models)).unwrap()
        });
        engine.metrics.steady.store(true, Ordering::Relaxed);
        let scraped = engine.scrape(8000, ScrapeConfig::default());
        window(100).await;
        let m = scraped.endpoint.metrics();
        assert_eq!(m.readiness, Readiness::Unknown);
        assert!(m.awaiting_check);
        assert_eq!(m.waiting_queue_size, 3);
        window(450).await;
        let m = scraped.endpoint.metrics();
        assert_eq!(m.readiness, Readiness::Serving);
        assert!(!m.awaiting_check);
        scraped.stop().await;
    }

    /// How the inference port answers plain HTTP, for [`Checked`].
    #[derive(Clone, Copy)]
    enum PlainCheck {
        /// Nothing listens.
        Refused,
        /// A Go or nginx TLS front: "Client sent an HTTP request to an HTTPS server".
        BadRequest,
    }

    /// An API on TLS behind an https metrics sidecar on its own port: a check answered as a
    /// TLS server answers plain HTTP is tried in https, which is kept once it answers; a
    /// refused connection, which no scheme changes, is not tried again in the other.
    #[tokio::test]
    async fn a_check_answered_as_in_the_wrong_scheme_tries_the_other() {
        let refused = refusals(8).await;
        tokio::time::pause();
        let schemes = |engine: &Checked| -> Vec<String> {
            let checks = engine.asked.lock();
            let checks = checks.iter().filter(|u| u.path() == "/v1/models");
            checks
                .map(|u| u.scheme_str().unwrap_or_default().to_owned())
                .collect()
        };
        let config = || ScrapeConfig {
            scheme: MetricsScheme::Https,
            ..ScrapeConfig::default()
        };
        let engine = Checked::new(CheckAnswer::Models);
        *engine.plain_check.lock() = Some(PlainCheck::BadRequest);
        let scraped = engine.scrape(8443, config());
        window(100).await;
        assert_eq!(scraped.readiness(), Readiness::Serving);
        assert_eq!(schemes(&engine), ["http", "https"]);
        scraped.stop().await;

        let engine = Checked::new(CheckAnswer::Models);
        *engine.refusals.lock() = refused;
        *engine.plain_check.lock() = Some(PlainCheck::Refused);
        let scraped = engine.scrape(8443, config());
        window(120).await;
        assert_eq!(scraped.readiness(), Readiness::Unknown);
        let tried = schemes(&engine);
        assert!(
            !tried.is_empty() && tried.iter().all(|s| s == "http"),
            "{tried:?}"
        );
        scraped.stop().await;
    }

    /// A page that fails part-way (over the limit, too slow) lets its grown buffer go too.
    #[tokio::test]
    async fn a_huge_page_that_fails_does_not_stay_held_either() {
        struct Overlong;
        impl Source for Overlong {
            async fn fetch(
                &self,
                _url: &http::Uri,
                limit: usize,
                _timeout: Duration,
                buf: &mut Vec<u8>,
            ) -> Result<(), ScrapeError> {
                buf.clear();
                buf.resize(limit, b'\n');
                Err(ScrapeError::Body("length limit exceeded".into()))
            }
        }
        let ds = crate::datastore::Datastore::new();
        let endpoint = ds.apply(crate::datastore::test_util::pool(1)).endpoints[0].clone();
        let config = ScrapeConfig::default();
        let url = Ok("http://10.0.0.1:8000/metrics".parse().unwrap());
        let (mut body, mut last) = (Vec::new(), None);
        let read = scrape_reusing(&Overlong, &url, &endpoint, &config, &mut body, &mut last).await;
        assert!(matches!(read, Err(ScrapeError::Body(_))));
        assert!(
            body.capacity() <= MAX_KEPT_BODY_CAPACITY,
            "{}",
            body.capacity()
        );
    }

    #[test]
    fn an_unreachable_endpoint_backs_off_to_the_quiet_interval() {
        let config = ScrapeConfig::default();
        let ms = Duration::from_millis;
        let waits: Vec<_> = (2..9).map(|f| unreachable_wait(&config, f)).collect();
        assert_eq!(
            waits,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1_000),
                ms(1_000),
                ms(1_000)
            ]
        );
        assert_eq!(unreachable_wait(&config, u32::MAX), ms(1_000));
    }

    #[test]
    fn the_idle_backoff_doubles_to_its_bounds_and_snaps_back_on_change() {
        let ms = Duration::from_millis;
        let mut b = IdleBackoff::new(
            ms(50),
            DEFAULT_MAX_IDLE_INTERVAL,
            DEFAULT_MAX_QUIET_INTERVAL,
        );
        assert_eq!(
            b.next(Observed::Changed),
            ms(50),
            "changing values: the interval"
        );
        assert_eq!(b.next(Observed::Unchanged), ms(100));
        assert_eq!(b.next(Observed::Unchanged), ms(150), "bounded");
        assert_eq!(b.next(Observed::Unchanged), ms(150));
        assert!(!b.is_quiet());
        assert_eq!(
            b.next(Observed::Quiet),
            ms(300),
            "quiet: past the ordinary bound"
        );
        assert!(b.is_quiet());
        assert_eq!(b.next(Observed::Quiet), ms(600));
        assert_eq!(b.next(Observed::Quiet), ms(1_000), "bounded too");
        assert_eq!(
            b.next(Observed::Unchanged),
            ms(150),
            "work again: the ordinary bound"
        );
        assert_eq!(
            b.next(Observed::Changed),
            ms(50),
            "a change snaps back at once"
        );
        b.next(Observed::Quiet);
        b.reset();
        assert_eq!(
            b.next(Observed::Quiet),
            ms(100),
            "routed to: from the interval again"
        );
        // Bounds below the interval never speed scraping up.
        let mut slow = IdleBackoff::new(ms(500), DEFAULT_MAX_IDLE_INTERVAL, ms(100));
        assert_eq!(slow.next(Observed::Quiet), ms(500));
        assert_eq!(slow.next(Observed::Changed), ms(500));
        assert!(!slow.is_quiet());
    }
}
