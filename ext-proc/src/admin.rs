//! The metrics/admin HTTP server: `/metrics` (Prometheus text), `/healthz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The one registry.
    pub registry: Arc<Mutex<Registry>>,
    /// Optional bearer token required on `/metrics`.
    pub bearer_token: Option<Arc<str>>,
    /// Run before each exposition (refreshes gauges computed from current state).
    pub refresh: Option<Refresh>,
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
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.bearer_token {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == &**token);
        if !ok {
            return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
        }
    }
    if let Some(refresh) = &state.refresh {
        (refresh.0)();
    }
    let mut out = String::with_capacity(16 * 1024);
    let result = {
        let registry = state.registry.lock();
        prometheus_client::encoding::text::encode(&mut out, &registry)
    };
    match result {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
