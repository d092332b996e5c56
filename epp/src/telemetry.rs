//! Logs and traces.
//!
//! Logs go to stderr through `tracing-subscriber`, as `console` text or `json` lines
//! (`--zap-encoder`), filtered by `--v`/`--zap-log-level` or `RUST_LOG`. Every line logged while
//! a request is handled carries its `x-request-id` through the `gateway.request` span that the
//! ext_proc service opens per stream.
//!
//! Traces: with `--tracing` (default true, as the reference) **and** an OTLP endpoint in the
//! environment (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), the
//! `gateway.request` spans are exported over OTLP/gRPC. Without an endpoint nothing is
//! exported and no OpenTelemetry code runs on the request path — a default that cannot stall
//! or spam a cluster without a collector. The other `OTEL_*` variables (service name,
//! sampler, headers, timeout) are read by the SDK. When tracing is on, an incoming W3C
//! `traceparent` becomes the parent of the request's span, and the upstream request gets a
//! `traceparent` naming that span, so the model server's spans join the same trace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state header.
pub const TRACESTATE: &str = "tracestate";

/// Set once OpenTelemetry export is installed; the request path checks it before doing any
/// trace-context work.
static OTEL_ACTIVE: AtomicBool = AtomicBool::new(false);

/// True when request spans are exported (and trace context must be propagated).
pub fn otel_active() -> bool {
    OTEL_ACTIVE.load(Ordering::Relaxed)
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint, ...).
    #[error("building the OTLP span exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("installing the log subscriber: {0}")]
    Subscriber(String),
}

/// What [`init`] needs.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    /// `json` or `console`.
    pub encoder: String,
    /// The filter directive when `RUST_LOG` is not set.
    pub filter: String,
    /// `--tracing`.
    pub tracing: bool,
}

/// Keeps the tracer provider alive; dropping it flushes and shuts the exporter down. Drop it
/// while the Tokio runtime is still running.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// True when spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("epp: flushing traces: {e}");
        }
    }
}

/// True when the environment names an OTLP endpoint for traces.
pub fn otlp_endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
        && !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Installs the global log subscriber and, when enabled and configured, OTLP trace export.
/// Must run inside a Tokio runtime (the gRPC exporter's connection lives there).
pub fn init(options: &TelemetryOptions) -> Result<TelemetryGuard, TelemetryError> {
    // RUST_LOG, when set, replaces the flags' filter; one that does not parse is said once the
    // subscriber is up, and the flags apply.
    let (filter, rust_log_refused) = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(v) if !v.trim().is_empty() => match EnvFilter::try_new(&v) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(&options.filter), Some((v, e))),
        },
        _ => (EnvFilter::new(&options.filter), None),
    };
    // Colours only on a terminal: log files and collectors get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if options.encoder == "json" {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.boxed()
    };
    let provider = if options.tracing && otlp_endpoint_configured() {
        Some(provider()?)
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("switchyard-epp"))
            .with_tracked_inactivity(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    if let Some((value, error)) = rust_log_refused {
        tracing::warn!(
            rust_log = %value.escape_debug(),
            %error,
            filter = %options.filter,
            "RUST_LOG does not parse: the log flags' filter applies"
        );
    }
    if provider.is_some() {
        OTEL_ACTIVE.store(true, Ordering::Relaxed);
    }
    Ok(TelemetryGuard { provider })
}

fn provider() -> Result<SdkTracerProvider, TelemetryError> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    // The SDK reads OTEL_EXPORTER_OTLP_ENDPOINT itself; the traces-specific variable wins.
    if let Ok(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        && !endpoint.trim().is_empty()
    {
        builder = builder.with_endpoint(endpoint);
    }
    let exporter = builder
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = OnRuntime {
        inner: exporter,
        handle: tokio::runtime::Handle::current(),
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("switchyard-epp");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Runs exports on the Tokio runtime. The SDK's batch processor exports from its own OS
/// thread, where the gRPC client (hyper on Tokio) would find no reactor; `Handle::block_on`
/// lends it the runtime's.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    handle: tokio::runtime::Handle,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.inner.export(batch).await
        } else {
            self.handle.block_on(self.inner.export(batch))
        }
    }

    fn shutdown_with_timeout(
        &mut self,
        timeout: Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

struct HeaderExtractor<'a>(&'a [(String, String)]);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

struct HeaderInjector(Vec<(&'static str, String)>);

impl Injector for HeaderInjector {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` is noise on the wire.
        if value.is_empty() {
            return;
        }
        let key = match key {
            TRACEPARENT => TRACEPARENT,
            TRACESTATE => TRACESTATE,
            _ => return,
        };
        self.0.push((key, value));
    }
}

/// Makes `span` a child of the W3C trace context in the request `headers`, when there is one.
pub fn adopt_parent(span: &tracing::Span, headers: &[(String, String)]) {
    if !headers.iter().any(|(k, _)| k == TRACEPARENT) {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        // Fails only when the span is not recorded by OpenTelemetry; nothing to adopt then.
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` (and `tracestate`) headers naming `span` as the parent of the upstream
/// request; empty when the span is not exported.
pub fn trace_headers(span: &tracing::Span) -> Vec<(&'static str, String)> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut injector = HeaderInjector(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&cx, &mut injector);
    injector.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_trace_is_continued_upstream() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("gateway.request");
            adopt_parent(&span, &[(TRACEPARENT.to_owned(), incoming.to_owned())]);
            let headers = trace_headers(&span);
            let (name, value) = &headers[0];
            assert_eq!(*name, TRACEPARENT);
            let parts: Vec<&str> = value.split('-').collect();
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
            assert_ne!(parts[2], "00f067aa0ba902b7", "our span is the new parent");
            assert_eq!(parts[3], "01", "sampled");

            // No incoming context: a new trace starts here.
            let fresh = tracing::info_span!("gateway.request");
            adopt_parent(&fresh, &[]);
            let h = trace_headers(&fresh);
            assert_eq!(h.len(), 1);
            assert!(!h[0].1.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        });
        // Without an OpenTelemetry layer nothing is injected.
        let span = tracing::info_span!("gateway.request");
        assert!(trace_headers(&span).is_empty());
    }
}
