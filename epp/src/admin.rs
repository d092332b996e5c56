//! The metrics/admin HTTP server: `/metrics` (Prometheus text), `/healthz`, and, when enabled,
//! `/debug/pool` (current endpoints with their latest metrics and the last decisions, as JSON),
//! and `/debug/pprof/profile` (a CPU profile, see [`crate::profile`]).
//!
//! `/metrics`, `/debug/pool` and `/debug/pprof/profile` sit behind one [`AdminAuth`]: in Kubernetes mode with
//! `--metrics-endpoint-auth` (the default, as the reference), the scraper's bearer token is
//! authenticated by a TokenReview and authorised by a SubjectAccessReview on the request's path
//! and verb; in local mode a static bearer token guards them; with the flag off they are open.
//! `/healthz` is always open (it says nothing but "ok").
//!
//! [`serve`] runs it (and `bbr`'s and `lora-syncer`'s) with bounds that come before any
//! authentication, so that no one client, authenticated or not, can keep the others (Prometheus
//! above all) out:
//!
//! - at most [`MAX_ADMIN_CONNECTIONS`] connections, of which one source address holds at most
//!   [`MAX_ADMIN_CONNECTIONS_PER_PEER`]; a connection past the latter is answered `503` and
//!   closed at once, without taking a slot;
//! - a client that does not send a request's headers within [`ADMIN_HEADER_READ_TIMEOUT`] (an
//!   idle kept-alive connection included) is disconnected;
//! - a connection is closed after an answer that is not a success (`401`/`403` above all, also
//!   `404`) and after `/healthz`: a request anyone may make does not keep a connection alive;
//! - a connection takes no new request after [`ADMIN_CONNECTION_MAX_AGE`] or
//!   [`ADMIN_CONNECTION_MAX_REQUESTS`] requests, and the one in flight then gets
//!   [`ADMIN_CLOSE_GRACE`] to finish, so even an authorised client goes back through the accept
//!   queue (and the caps above) now and then.
//!
//! Without them anyone who reaches the port could hold connections, and file descriptors the
//! ext_proc listener and the scrapers need, for free: 64 kept-alive connections each sending
//! `GET /healthz` every few seconds once held every slot, and Prometheus waited in the backlog.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use endpoint_picker::datastore::Datastore;
use endpoint_picker::director::Director;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::debug::{self, DecisionLog};
use crate::profile::ProfileError;

/// Most connections the admin server holds at once: Prometheus, probes and an operator need a
/// handful; past it, new connections wait in the listen backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Most connections one source address holds at once. A Prometheus keeps one per target and
/// scrape job, an operator's `curl` or port-forward a few more: 8 leaves room for them, and a
/// single address (one pod, one node) can take an eighth of [`MAX_ADMIN_CONNECTIONS`], no more.
/// Clients that share an address (behind a NAT, a proxy, a mesh sidecar that connects from
/// loopback) share these 8.
pub const MAX_ADMIN_CONNECTIONS_PER_PEER: usize = 8;
/// How long a client may take to send a request's headers, counted from the connection or from
/// the previous response (so an idle kept-alive connection ends too).
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Age after which a connection takes no new request. A scraper that asks less often than
/// [`ADMIN_HEADER_READ_TIMEOUT`] reconnects for every scrape anyway; one that asks every few
/// seconds reconnects once a minute, which costs it a TCP handshake and frees the slot for
/// whoever waits.
pub const ADMIN_CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);
/// Requests after which a connection is closed. A scraper makes at most 60 in
/// [`ADMIN_CONNECTION_MAX_AGE`] at a one-second interval, so only a client firing requests back
/// to back meets it, and goes back through the accept queue.
pub const ADMIN_CONNECTION_MAX_REQUESTS: u32 = 100;
/// What a request still in flight at [`ADMIN_CONNECTION_MAX_AGE`] gets to finish: the longest
/// CPU profile and 10 s to send it. After it the connection is dropped, so a client that never
/// reads its response (a page larger than the socket buffers) cannot hold a slot for good.
pub const ADMIN_CLOSE_GRACE: Duration = Duration::from_secs(crate::profile::MAX_SECONDS + 10);
/// How long open admin connections get to finish at shutdown.
const ADMIN_DRAIN: Duration = Duration::from_secs(5);
/// At most one warning about refused addresses in this long; the refusals in between are
/// counted in the next one (a flood must not flood the log too).
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// The answer to a connection past [`MAX_ADMIN_CONNECTIONS_PER_PEER`], written without reading
/// the request: a scraper reports a 503 that says why rather than a bare reset.
const TOO_MANY_FROM_PEER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
connection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 45\r\n\r\n\
too many admin connections from this address\n";

/// The bounds of [`serve`] (the constants above), one value so tests can shrink them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    connections: usize,
    per_peer: usize,
    header_read_timeout: Duration,
    max_age: Duration,
    max_requests: u32,
    close_grace: Duration,
}

const LIMITS: Limits = Limits {
    connections: MAX_ADMIN_CONNECTIONS,
    per_peer: MAX_ADMIN_CONNECTIONS_PER_PEER,
    header_read_timeout: ADMIN_HEADER_READ_TIMEOUT,
    max_age: ADMIN_CONNECTION_MAX_AGE,
    max_requests: ADMIN_CONNECTION_MAX_REQUESTS,
    close_grace: ADMIN_CLOSE_GRACE,
};

/// Serves `router` on `listener` until `shutdown`, bounded (see the module's documentation).
pub async fn serve(listener: tokio::net::TcpListener, router: Router, shutdown: CancellationToken) {
    serve_bounded(listener, router, shutdown, LIMITS).await;
}

/// Connections per source address. IPv4-mapped IPv6 addresses count as the IPv4 address (a
/// dual-stack listener sees both forms of one client).
pub(crate) type PeerCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One of an address's [`MAX_ADMIN_CONNECTIONS_PER_PEER`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    peers: PeerCounts,
    ip: IpAddr,
}

impl PeerSlot {
    /// `None` when `ip` already holds `cap` connections.
    pub(crate) fn take(peers: &PeerCounts, ip: IpAddr, cap: usize) -> Option<PeerSlot> {
        let ip = ip.to_canonical();
        let mut counts = peers.lock();
        let held = counts.get(&ip).copied().unwrap_or(0);
        if held >= cap {
            return None;
        }
        counts.insert(ip, held + 1);
        Some(PeerSlot {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.peers.lock();
        if let Some(held) = counts.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                // Gone, not zero: the map holds only addresses connected now.
                counts.remove(&self.ip);
            }
        }
    }
}

async fn serve_bounded(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: Limits,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let peers = PeerCounts::default();
    // HTTP/1.1 only (Prometheus, probes and curl speak it): a server that also detects HTTP/2
    // waits for a client's first bytes before any timeout applies, so a silent client would
    // hold its connection for good.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut connections = tokio::task::JoinSet::new();
    let mut refusals = Refusals::default();
    let accept = || async {
        // The permit first: at the cap, connections wait in the backlog, not in memory.
        let permit = permits.clone().acquire_owned().await;
        (permit, listener.accept().await)
    };
    loop {
        let (permit, accepted) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next() => continue,
            next = accept() => next,
        };
        let accepted = accepted.inspect_err(|error| {
            tracing::warn!(%error, "admin server: accept failed");
        });
        let (Ok(permit), Ok((stream, peer))) = (permit, accepted) else {
            // Out of file descriptors, say: the next try after a pause, not at once.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(slot) = PeerSlot::take(&peers, peer.ip(), limits.per_peer) else {
            // Refused here, before any read: the global slot goes back with `permit` at once.
            // `try_write`: the short answer fits an empty socket buffer, and a client that
            // does not take it is not waited for.
            let _ = stream.try_write(TOO_MANY_FROM_PEER);
            refusals.refused(peer.ip().to_canonical(), limits.per_peer);
            continue;
        };
        let io = TokioIo::new(stream);
        let builder = builder.clone();
        let router = router.clone();
        let token = shutdown.clone();
        connections.spawn(async move {
            let _held = (permit, slot);
            serve_connection(io, router, builder, limits, token).await;
        });
    }
    if tokio::time::timeout(ADMIN_DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.shutdown().await;
    }
}

/// Refusals of [`MAX_ADMIN_CONNECTIONS_PER_PEER`], logged at most once a
/// [`REFUSAL_WARNING_INTERVAL`].
#[derive(Default)]
struct Refusals {
    last_warning: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, ip: IpAddr, cap: usize) {
        let now = tokio::time::Instant::now();
        if self
            .last_warning
            .is_some_and(|at| now.duration_since(at) < REFUSAL_WARNING_INTERVAL)
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            peer = %ip,
            cap,
            refused_unlogged_since_last_warning = self.unlogged,
            "admin server: refused a connection, the address already holds its share"
        );
        self.last_warning = Some(now);
        self.unlogged = 0;
    }
}

/// Serves one connection: keep-alive only while it is earned (see the module's documentation),
/// and for at most `max_age`, plus `close_grace` for a request in flight then.
async fn serve_connection<I>(
    io: I,
    router: Router,
    builder: hyper::server::conn::http1::Builder,
    limits: Limits,
    shutdown: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use hyper::service::Service as _;

    let inner = hyper_util::service::TowerToHyperService::new(router);
    let served = AtomicU32::new(0);
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
        // hyper calls the service one request at a time on an HTTP/1.1 connection, so the
        // count is the request's position on it.
        let position = served.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let last = position >= limits.max_requests || request.uri().path() == "/healthz";
        let response = inner.call(request);
        async move {
            let mut response: Response = response.await?;
            // An answer to anyone (a refusal, a 404, `/healthz`) or the last one allowed: hyper
            // closes the connection once a response carrying `connection: close` is written.
            if last || !response.status().is_success() {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(limits.max_age) => {}
    }
    // No new request; an idle connection closes at once, one in flight after its response.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.close_grace, connection).await;
}

/// Who may read `/metrics` and `/debug/pool`.
#[derive(Debug, Clone)]
pub enum AdminAuth {
    /// Anyone (`--metrics-endpoint-auth=false`).
    Open,
    /// Requests carrying this bearer token (local mode).
    Token(Arc<str>),
    /// Kubernetes TokenReview + SubjectAccessReview on the path and verb.
    Kubernetes(k8s::auth::MetricsAuthorizer),
}

impl AdminAuth {
    /// `Some(refusal)` when the request may not read `path`.
    async fn refuse(&self, headers: &HeaderMap, path: &str) -> Option<Response> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self {
            AdminAuth::Open => None,
            AdminAuth::Token(token) => {
                let ok = k8s::auth::bearer_token(authorization)
                    .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
                (!ok).then(|| (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response())
            }
            AdminAuth::Kubernetes(authorizer) => {
                let token = k8s::auth::bearer_token(authorization).unwrap_or("");
                let decision = authorizer.authorize(token, path, "get").await;
                if decision.is_allowed() {
                    return None;
                }
                // Anyone who reaches the port can send a bad token, as often as TCP connects
                // go: those are kept to debug; a token that authenticated and was refused
                // (an RBAC mistake) is worth an operator's eye.
                if matches!(decision, k8s::auth::Decision::Unauthenticated { .. }) {
                    tracing::debug!(path, ?decision, "admin request refused");
                } else {
                    tracing::info!(path, ?decision, "admin request refused");
                }
                Some((decision.status(), decision.message()).into_response())
            }
        }
    }
}

/// The most bytes read of `--metrics-bearer-token-file` (a ServiceAccount token is about 1 KiB).
pub const MAX_TOKEN_FILE_BYTES: usize = 64 * 1024;

/// A static metrics token as scrapers send it, from `source` (the flag or variable that gave
/// it, named in the error): surrounding whitespace trimmed (a Secret made from a file ends in a
/// newline, and Prometheus trims its `credentials_file` too), then one or more visible ASCII
/// characters, since a token with a space, a control character or nothing in it could never
/// arrive in an `Authorization` header and every scrape would get 401.
pub fn static_metrics_token(token: &str, source: &str) -> Result<Arc<str>, String> {
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("{source} holds no token"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{source}: the token holds spaces, control characters or non-ASCII bytes, which no \
             Authorization header can carry"
        ));
    }
    Ok(Arc::from(token))
}

/// [`static_metrics_token`] read from `--metrics-bearer-token-file` at `path`, at most
/// [`MAX_TOKEN_FILE_BYTES`].
pub fn read_static_metrics_token(path: &std::path::Path) -> Result<Arc<str>, String> {
    let source = format!("--metrics-bearer-token-file {}", path.display());
    let bytes = endpoint_picker::files::read_at_most_blocking(path, MAX_TOKEN_FILE_BYTES)
        .map_err(|e| format!("reading {source}: {e}"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| format!("{source}: not text"))?;
    static_metrics_token(text, &source)
}

/// Compares without an early exit, so that the time taken does not tell how much of a guessed
/// token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The one registry.
    pub registry: Arc<Mutex<Registry>>,
    /// Who may read `/metrics` and `/debug/pool`.
    pub auth: AdminAuth,
    /// Run before each exposition (refreshes gauges computed from current state).
    pub refresh: Option<Refresh>,
    /// What `/debug/pool` reads (`None`: not served, `--debug-pool=false`).
    pub debug: Option<DebugState>,
    /// `/debug/pprof/profile` (`None`: not served, `--enable-pprof=false`).
    pub pprof: Option<PprofState>,
}

/// The state behind `/debug/pprof/profile`.
#[derive(Debug, Clone)]
pub struct PprofState {
    /// Ends a profile in progress when the server shuts down.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// The state behind `/debug/pool`.
#[derive(Debug, Clone)]
pub struct DebugState {
    /// Endpoints and their metrics.
    pub datastore: Arc<Datastore>,
    /// In-flight counts.
    pub director: Arc<Director>,
    /// Recent decisions.
    pub decisions: Arc<DecisionLog>,
    /// One view built at a time: each is up to some 20 MB of JSON and a core for its time.
    building: Arc<tokio::sync::Semaphore>,
}

impl DebugState {
    /// The view of `datastore`, `director` and `decisions`.
    pub fn new(
        datastore: Arc<Datastore>,
        director: Arc<Director>,
        decisions: Arc<DecisionLog>,
    ) -> Self {
        Self {
            datastore,
            director,
            decisions,
            building: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

/// A callback that refreshes derived gauges.
#[derive(Clone)]
pub struct Refresh(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Refresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refresh")
    }
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    // The debug routes exist whether or not they are enabled, and authorise before they
    // answer 404: a route missing from the router would answer 404 to anyone and tell who may
    // not read them whether profiling or the pool view is on.
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/debug/pool", get(debug_pool))
        .route("/debug/pprof/profile", get(pprof_profile))
        .with_state(state)
}

/// `?seconds=N` of `/debug/pprof/profile`.
#[derive(Debug, serde::Deserialize)]
struct ProfileQuery {
    seconds: Option<String>,
}

async fn pprof_profile(
    State(state): State<AdminState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    // Authorised before the query is read: a malformed query must not answer 400 (and so
    // tell that profiling is on) to someone who may not read it.
    if let Some(denied) = state.auth.refuse(&headers, "/debug/pprof/profile").await {
        return denied;
    }
    let query: ProfileQuery = match Query::try_from_uri(&uri) {
        Ok(Query(q)) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let Some(p) = &state.pprof else {
        return (StatusCode::NOT_FOUND, "not enabled (--enable-pprof)\n").into_response();
    };
    let seconds = match crate::profile::seconds(query.seconds.as_deref()) {
        Ok(s) => s,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    tracing::info!(seconds, "CPU profile requested");
    match crate::profile::cpu(Duration::from_secs(seconds), p.shutdown.clone()).await {
        Ok(profile) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile\"",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            profile,
        )
            .into_response(),
        Err(e) => {
            let status = match e {
                ProfileError::Busy => StatusCode::CONFLICT,
                ProfileError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::error!(error = %e, "CPU profile failed");
            }
            (status, format!("{e}\n")).into_response()
        }
    }
}

async fn debug_pool(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(denied) = state.auth.refuse(&headers, "/debug/pool").await {
        return denied;
    }
    let Some(d) = state.debug.clone() else {
        return (StatusCode::NOT_FOUND, "not enabled (--debug-pool)\n").into_response();
    };
    // One at a time: readers past the first would each hold their own 20 MB and a core.
    let Ok(building) = d.building.clone().try_acquire_owned() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "a /debug/pool view is being built: retry\n",
        )
            .into_response();
    };
    // Up to 10,000 decisions, some 20 MB of JSON: built on a blocking thread, not on a
    // runtime worker whose ext_proc streams would wait for it (with `--worker-threads=1`,
    // every stream).
    let view = tokio::task::spawn_blocking(move || {
        let _building = building;
        serde_json::to_vec(&debug::pool_view(&d.datastore, &d.director, &d.decisions))
    })
    .await;
    match view {
        Ok(Ok(json)) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(denied) = state.auth.refuse(&headers, "/metrics").await {
        return denied;
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    // Refreshed and encoded on a blocking thread: a pool's worth of series takes milliseconds,
    // which a runtime worker's ext_proc streams would otherwise wait out.
    let encoded = tokio::task::spawn_blocking(move || {
        let mut out = String::with_capacity(16 * 1024);
        // Refreshed and encoded under the registry's lock, which every refresh takes: some
        // refreshes clear a family and fill it again, and an encode between the two would
        // miss its series (Prometheus then marks them stale).
        let registry = state.registry.lock();
        if let Some(refresh) = &state.refresh {
            (refresh.0)();
        }
        prometheus_client::encoding::text::encode(&mut out, &registry).map(|()| {
            if openmetrics {
                out
            } else {
                openmetrics_to_text(&out)
            }
        })
    })
    .await;
    let out = match encoded {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    ([(header::CONTENT_TYPE, content_type)], out).into_response()
}

/// Rewrites prometheus-client's OpenMetrics exposition as Prometheus text format 0.0.4 (what
/// the reference EPP serves by default, and what `promtool check metrics` reads): a counter's
/// HELP/TYPE lines name the `_total` series, and `# EOF`/`# UNIT` lines are dropped.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Generous for loopback, and only reached when something is wrong.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// A token with a Secret's trailing newline is the token; one no header can carry (a
    /// space, a control character, nothing) is refused naming where it came from; a token file
    /// is read no further than its cap.
    #[test]
    fn a_static_token_is_what_a_header_can_carry() {
        assert_eq!(&*static_metrics_token("tok\n", "X").unwrap(), "tok");
        for bad in ["", " \n", "to ken", "tok\u{7f}", "tök"] {
            let e = static_metrics_token(bad, "SOURCE").unwrap_err();
            assert!(e.starts_with("SOURCE"), "{bad:?}: {e}");
        }
        let dir = std::env::temp_dir().join(format!("admin-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(&*read_static_metrics_token(&file).unwrap(), "s3cret");
        std::fs::write(&file, "a".repeat(MAX_TOKEN_FILE_BYTES + 1)).unwrap();
        let e = read_static_metrics_token(&file).unwrap_err();
        assert!(e.contains("--metrics-bearer-token-file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A response read off a connection: its status, its head (lower-cased) and body.
    #[derive(Debug)]
    struct Answer {
        status: u16,
        head: String,
        body: String,
    }

    impl Answer {
        fn closes(&self) -> bool {
            self.head.contains("\r\nconnection: close\r\n")
        }
    }

    /// Reads one response (headers, then a `content-length` body); `None` at end of stream
    /// or a reset before its first byte.
    async fn read_answer<R: AsyncRead + Unpin>(conn: &mut R) -> Option<Answer> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            match conn.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ if head.is_empty() => return None,
                other => panic!("cut off in the headers: {other:?}"),
            }
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).await.unwrap();
        let body = String::from_utf8(body).unwrap();
        Some(Answer { status, head, body })
    }

    /// Sends a kept-alive GET and reads its answer.
    async fn ask<C: AsyncRead + AsyncWrite + Unpin>(
        conn: &mut C,
        path: &str,
        token: Option<&str>,
    ) -> Option<Answer> {
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\n{auth}\r\n");
        conn.write_all(request.as_bytes()).await.ok()?;
        tokio::time::timeout(DEADLINE, read_answer(conn))
            .await
            .expect("an answer in time")
    }

    /// True once the server has closed `conn` (end of stream, or a reset).
    async fn closed<R: AsyncRead + Unpin>(conn: &mut R) -> bool {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(DEADLINE, conn.read(&mut buf))
            .await
            .expect("the server's move in time");
        matches!(read, Ok(0) | Err(_))
    }

    fn test_router() -> Router {
        Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(100)).await;
                    "slow"
                }),
            )
            .route(
                "/stuck",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(100_000)).await;
                    "never"
                }),
            )
    }

    async fn start(limits: Limits, router: Router) -> (std::net::SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_bounded(listener, router, shutdown.clone(), limits));
        (addr, shutdown)
    }

    /// One connection served in memory, for the tests that move paused time.
    fn serve_in_memory(router: Router) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(LIMITS.header_read_timeout);
        tokio::spawn(serve_connection(
            hyper_util::rt::TokioIo::new(server),
            router,
            builder,
            LIMITS,
            CancellationToken::new(),
        ));
        client
    }

    /// Bounds before authentication: a client that sends nothing is disconnected after the
    /// header timeout, and past the connection cap a new client waits until one leaves.
    #[tokio::test]
    async fn the_admin_server_drops_silent_clients_and_caps_connections() {
        let limits = Limits {
            connections: 1,
            header_read_timeout: Duration::from_millis(300),
            ..LIMITS
        };
        let (addr, shutdown) = start(limits, test_router()).await;
        let get = |mut c: tokio::net::TcpStream| async move {
            c.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        // Alive: a request is answered.
        let answer = get(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // A silent client holds the one slot; a second one waits …
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::spawn(get(tokio::net::TcpStream::connect(addr).await.unwrap()));
        // … until the silent one is disconnected by the header timeout.
        assert!(closed(&mut silent).await);
        let answer = tokio::time::timeout(DEADLINE, waiting)
            .await
            .expect("served once the slot freed")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        shutdown.cancel();
    }

    /// One address gets its share of the connections and no more, answered 503 past it, while
    /// another address is still served; the share comes back as its connections close.
    /// (A current-thread runtime, as `#[tokio::test]` gives: the server gives a slot back in
    /// the same poll that closes the connection, so the client cannot see the close first.)
    #[cfg(target_os = "linux")] // Linux routes all of 127.0.0.0/8 to loopback.
    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_the_connections() {
        let (addr, shutdown) = start(LIMITS, test_router()).await;
        let from = |source: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind((std::net::Ipv4Addr::from(source), 0).into())
                .unwrap();
            socket.connect(addr).await.unwrap()
        };
        // The address's share, each connection served and kept alive.
        let mut held = Vec::new();
        for _ in 0..MAX_ADMIN_CONNECTIONS_PER_PEER {
            let mut conn = from([127, 0, 0, 1]).await;
            let answer = ask(&mut conn, "/ok", None).await.unwrap();
            assert_eq!((answer.status, answer.closes()), (200, false), "{answer:?}");
            held.push(conn);
        }
        // One more from the same address: refused at once, with a reason, before its request.
        let mut over = from([127, 0, 0, 1]).await;
        let refusal = tokio::time::timeout(DEADLINE, read_answer(&mut over))
            .await
            .expect("refused in time")
            .expect("a refusal, not a bare close");
        assert_eq!(refusal.status, 503, "{refusal:?}");
        assert!(refusal.closes(), "{refusal:?}");
        assert_eq!(
            refusal.body,
            "too many admin connections from this address\n"
        );
        assert!(closed(&mut over).await);
        // Another address (another client, Prometheus say) is served meanwhile.
        let mut other = from([127, 0, 0, 2]).await;
        let answer = ask(&mut other, "/ok", None).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        // A held connection ends (the server closes it after `/healthz`) …
        let mut leaving = held.pop().unwrap();
        let answer = ask(&mut leaving, "/healthz", None).await.unwrap();
        assert!(answer.closes(), "{answer:?}");
        assert!(closed(&mut leaving).await);
        // … and the address may connect again.
        let mut again = from([127, 0, 0, 1]).await;
        let answer = ask(&mut again, "/ok", None).await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        shutdown.cancel();
    }

    /// An answer anyone can get does not keep a connection: a refusal (401), a 404 and
    /// `/healthz` close it; an authorised scrape keeps it for the next one.
    #[tokio::test]
    async fn refusals_and_open_answers_close_the_connection() {
        let state = AdminState {
            registry: Arc::new(Mutex::new(Registry::default())),
            auth: AdminAuth::Token("s3cret".into()),
            refresh: None,
            debug: None,
            pprof: None,
        };
        let (addr, shutdown) = start(LIMITS, router(state)).await;
        let connect = || tokio::net::TcpStream::connect(addr);
        for (path, token, status) in [
            ("/metrics", None, 401),
            ("/metrics", Some("wrong"), 401),
            // Disabled here, but that is not told before authorisation.
            ("/debug/pool", None, 401),
            ("/debug/pprof/profile?seconds=x", Some("wrong"), 401),
            ("/healthz", None, 200),
            ("/nowhere", None, 404),
        ] {
            let mut conn = connect().await.unwrap();
            let answer = ask(&mut conn, path, token).await.unwrap();
            assert_eq!(answer.status, status, "{path} {answer:?}");
            assert!(answer.closes(), "{path} {answer:?}");
            assert!(closed(&mut conn).await, "{path}");
        }
        // Prometheus's kept-alive scrapes go on, on one connection.
        let mut scraper = connect().await.unwrap();
        for _ in 0..3 {
            let answer = ask(&mut scraper, "/metrics", Some("s3cret")).await.unwrap();
            assert_eq!((answer.status, answer.closes()), (200, false), "{answer:?}");
        }
        // Until it asks for something it may not have.
        let answer = ask(&mut scraper, "/debug/pool", Some("s3cret"))
            .await
            .unwrap();
        assert_eq!(answer.status, 404, "{answer:?}");
        assert!(closed(&mut scraper).await);
        shutdown.cancel();
    }

    /// One `/debug/pool` view is built at a time: a reader asking while one is built gets 429,
    /// and the next view is built once it is done.
    #[tokio::test]
    async fn one_debug_pool_view_is_built_at_a_time() {
        let datastore = Arc::new(Datastore::new());
        datastore.apply(endpoint_picker::datastore::test_util::pool(2));
        let director = Arc::new(Director::new(
            datastore.clone(),
            Arc::new(endpoint_picker::config::load_default(1).unwrap()),
            1,
        ));
        let debug = DebugState::new(datastore, director, Arc::new(DecisionLog::new(10)));
        let state = AdminState {
            registry: Arc::new(Mutex::new(Registry::default())),
            auth: AdminAuth::Token("s3cret".into()),
            refresh: None,
            debug: Some(debug.clone()),
            pprof: None,
        };
        let (addr, shutdown) = start(LIMITS, router(state)).await;
        let connect = || tokio::net::TcpStream::connect(addr);
        // A view under way: its permit held.
        let building = debug.building.clone().try_acquire_owned().unwrap();
        let answer = ask(&mut connect().await.unwrap(), "/debug/pool", Some("s3cret"))
            .await
            .unwrap();
        assert_eq!(answer.status, 429, "{answer:?}");
        drop(building);
        let answer = ask(&mut connect().await.unwrap(), "/debug/pool", Some("s3cret"))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(answer.body.contains("pod-1"), "{answer:?}");
        // Its permit went back with it.
        assert_eq!(debug.building.available_permits(), 1);
        shutdown.cancel();
    }

    /// The last request a connection may make is answered, and the connection closed.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_after_its_request_cap() {
        let mut conn = serve_in_memory(test_router());
        for n in 1..ADMIN_CONNECTION_MAX_REQUESTS {
            let answer = ask(&mut conn, "/ok", None).await.unwrap();
            assert_eq!(
                (answer.status, answer.closes()),
                (200, false),
                "request {n}"
            );
        }
        let answer = ask(&mut conn, "/ok", None).await.unwrap();
        assert_eq!((answer.status, answer.closes()), (200, true), "{answer:?}");
        assert!(closed(&mut conn).await);
    }

    /// A busy connection (a request every 5 s, under the header timeout) is closed at its age
    /// cap all the same.
    #[tokio::test(start_paused = true)]
    async fn a_connection_takes_no_request_after_its_age_cap() {
        let step = Duration::from_secs(5);
        let opened = tokio::time::Instant::now();
        let mut conn = serve_in_memory(test_router());
        let mut age = Duration::ZERO;
        while age < ADMIN_CONNECTION_MAX_AGE {
            let answer = ask(&mut conn, "/ok", None).await.unwrap();
            assert_eq!((answer.status, answer.closes()), (200, false), "at {age:?}");
            tokio::time::advance(step).await;
            age += step;
        }
        assert!(closed(&mut conn).await);
        // At the cap, not at the header timeout 10 s after the last answer.
        assert_eq!(opened.elapsed(), ADMIN_CONNECTION_MAX_AGE);
    }

    /// A request in flight at the age cap finishes within the grace, and the connection then
    /// closes; one that would take longer is cut off at the grace's end.
    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_at_the_age_cap_gets_the_grace_and_no_more() {
        // `/slow` (100 s) asked at 50 s: answered at 150 s, within 60 s + the grace.
        let mut conn = serve_in_memory(test_router());
        tokio::time::advance(Duration::from_secs(50)).await;
        let started = tokio::time::Instant::now();
        conn.write_all(b"GET /slow HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(&mut conn).await.unwrap();
        assert_eq!((answer.status, answer.body.as_str()), (200, "slow"));
        assert!(answer.closes(), "{answer:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(100));
        assert!(closed(&mut conn).await);

        // `/stuck` never answers: the connection goes at 60 s + the grace.
        let opened = tokio::time::Instant::now();
        let mut conn = serve_in_memory(test_router());
        conn.write_all(b"GET /stuck HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await
            .unwrap();
        assert!(read_answer(&mut conn).await.is_none());
        assert_eq!(
            opened.elapsed(),
            ADMIN_CONNECTION_MAX_AGE + ADMIN_CLOSE_GRACE
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
    }

    #[test]
    fn counters_are_renamed_for_the_text_format() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 2\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 2\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
