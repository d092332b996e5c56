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
//! authentication: at most [`MAX_ADMIN_CONNECTIONS`] connections, and a client that does not
//! send a request's headers within [`ADMIN_HEADER_READ_TIMEOUT`] (an idle kept-alive connection
//! included) is disconnected. Without them anyone who reaches the port could hold connections,
//! and file descriptors the ext_proc listener and the scrapers need, for free.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use endpoint_picker::datastore::Datastore;
use endpoint_picker::director::Director;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;

use crate::debug::{self, DecisionLog};
use crate::profile::ProfileError;

/// Most connections the admin server holds at once: Prometheus, probes and an operator need a
/// handful; past it, new connections wait in the listen backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers, counted from the connection or from
/// the previous response (so an idle kept-alive connection ends too).
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open admin connections get to finish at shutdown.
const ADMIN_DRAIN: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown`, bounded (see the module's documentation).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) {
    serve_bounded(
        listener,
        router,
        shutdown,
        MAX_ADMIN_CONNECTIONS,
        ADMIN_HEADER_READ_TIMEOUT,
    )
    .await;
}

async fn serve_bounded(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
    max_connections: usize,
    header_read_timeout: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    // HTTP/1.1 only (Prometheus, probes and curl speak it): a server that also detects HTTP/2
    // waits for a client's first bytes before any timeout applies, so a silent client would
    // hold its connection for good.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let mut connections = tokio::task::JoinSet::new();
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
        let (Ok(permit), Ok((stream, _))) = (permit, accepted) else {
            // Out of file descriptors, say: the next try after a pause, not at once.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let token = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = token.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
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
                tracing::info!(path, ?decision, "admin request refused");
                Some((decision.status(), decision.message()).into_response())
            }
        }
    }
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
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }));
    if state.debug.is_some() {
        router = router.route("/debug/pool", get(debug_pool));
    }
    if state.pprof.is_some() {
        router = router.route("/debug/pprof/profile", get(pprof_profile));
    }
    router.with_state(state)
}

/// `?seconds=N` of `/debug/pprof/profile`.
#[derive(Debug, serde::Deserialize)]
struct ProfileQuery {
    seconds: Option<String>,
}

async fn pprof_profile(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<ProfileQuery>,
) -> Response {
    if let Some(denied) = state.auth.refuse(&headers, "/debug/pprof/profile").await {
        return denied;
    }
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
    let Some(d) = &state.debug else {
        return (StatusCode::NOT_FOUND, "not enabled (--debug-pool)\n").into_response();
    };
    axum::Json(debug::pool_view(&d.datastore, &d.director, &d.decisions)).into_response()
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(denied) = state.auth.refuse(&headers, "/metrics").await {
        return denied;
    }
    if let Some(refresh) = &state.refresh {
        (refresh.0)();
    }
    let mut out = String::with_capacity(16 * 1024);
    let result = {
        let registry = state.registry.lock();
        prometheus_client::encoding::text::encode(&mut out, &registry)
    };
    if let Err(e) = result {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        return (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        openmetrics_to_text(&out),
    )
        .into_response()
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

    /// Bounds before authentication: a client that sends nothing is disconnected after the
    /// header timeout, and past the connection cap a new client waits until one leaves.
    #[tokio::test]
    async fn the_admin_server_drops_silent_clients_and_caps_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let router = Router::new().route("/healthz", get(|| async { "ok" }));
        let server = tokio::spawn(serve_bounded(
            listener,
            router,
            shutdown.clone(),
            1,
            Duration::from_millis(300),
        ));
        let get = |mut c: tokio::net::TcpStream| async move {
            c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
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
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("disconnected in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "{:?}", &buf[..n]);
        let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("served once the slot freed")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        shutdown.cancel();
        server.await.unwrap();
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
