//! The metrics/admin HTTP server: `/metrics` (Prometheus text), `/healthz`, and `/debug/pool`
//! (current endpoints with their latest metrics and the last decisions, as JSON). The bearer
//! token, when set, guards `/metrics` and `/debug/pool`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use endpoint_picker::datastore::Datastore;
use endpoint_picker::director::Director;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;

use crate::debug::{self, DecisionLog};

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The one registry.
    pub registry: Arc<Mutex<Registry>>,
    /// Optional bearer token required on `/metrics`.
    pub bearer_token: Option<Arc<str>>,
    /// Run before each exposition (refreshes gauges computed from current state).
    pub refresh: Option<Refresh>,
    /// What `/debug/pool` reads (`None` = 404).
    pub debug: Option<DebugState>,
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
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/debug/pool", get(debug_pool))
        .with_state(state)
}

/// `Some(401 response)` when a token is required and the request does not carry it.
fn unauthorized(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let token = state.bearer_token.as_ref()?;
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == &**token);
    (!ok).then(|| (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response())
}

async fn debug_pool(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(denied) = unauthorized(&state, &headers) {
        return denied;
    }
    let Some(d) = &state.debug else {
        return (StatusCode::NOT_FOUND, "no debug state\n").into_response();
    };
    axum::Json(debug::pool_view(&d.datastore, &d.director, &d.decisions)).into_response()
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(denied) = unauthorized(&state, &headers) {
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

    #[test]
    fn counters_are_renamed_for_the_text_format() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 2\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 2\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
