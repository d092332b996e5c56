//! Test support shared by the ext-proc tests, the conformance suite and the benchmarks: a real
//! Envoy rendered from `gateway-configs/envoy` on OS-chosen loopback ports, an in-process EPP,
//! simulated replicas, an ext_proc stream client and a small HTTP client.
// Test support: a failed setup step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

pub mod envoy;
pub mod http;
pub mod ports;
pub mod process;

pub use envoy_types;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::config;
use endpoint_picker::datastore::{EndpointSpec, EngineMetrics, PoolSpec};
use epp::server::{self, Handles, Listeners, PoolSource, Settings};
use ext_proc::envoy::ext_proc::external_processor_client::ExternalProcessorClient;
use ext_proc::envoy::ext_proc::{ProcessingRequest, ProcessingResponse};
pub use ext_proc::stream::ServiceOptions;
pub use ext_proc::test_util::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

/// How long a test waits for anything it expects (an EPP to start, a response): past it, the
/// test fails instead of hanging.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A running in-process EPP on OS-chosen loopback ports; dropping it cancels `shutdown`.
pub struct Epp {
    /// The ext_proc gRPC server.
    pub grpc: SocketAddr,
    /// The gRPC health server.
    pub health: SocketAddr,
    /// The metrics and admin (`/debug/pool`) HTTP server.
    pub metrics: SocketAddr,
    /// The director and datastore, to set metrics or inspect decisions directly.
    pub handles: Handles,
    /// Cancel to stop (and drain) the EPP.
    pub shutdown: CancellationToken,
    /// The server task; it panics if serving fails.
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for Epp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Endpoint `n` of a test pool: pod `pod-{n}` at `127.0.0.{n}:{port}` (rank 0, metrics on the
/// same address, no labels).
pub fn endpoint(n: u8, port: u16) -> EndpointSpec {
    let address = SocketAddr::from(([127, 0, 0, n], port));
    EndpointSpec {
        name: format!("pod-{n}-rank-0"),
        pod_name: format!("pod-{n}"),
        namespace: "default".into(),
        address,
        metrics_address: address,
        rank: 0,
        labels: BTreeMap::new(),
    }
}

/// The pool `default/pool` (HTTP) of these endpoints.
pub fn pool(endpoints: Vec<EndpointSpec>) -> PoolSpec {
    PoolSpec {
        name: "pool".into(),
        namespace: "default".into(),
        app_protocol: "http".into(),
        endpoints,
    }
}

/// How [`start_epp`] configures the EPP; the default is the default profile, plaintext, metrics
/// set by hand and no decision log.
pub struct EppOptions {
    /// The `EndpointPickerConfig` YAML.
    pub config: String,
    /// The ext_proc service's options (body limits, header names, ...).
    pub options: ServiceOptions,
    /// TLS on the ext_proc port with a self-signed certificate.
    pub tls: bool,
    /// TLS on the ext_proc port as given (wins over `tls`).
    pub server_tls: Option<epp::tls::ServerTls>,
    /// Scrape the endpoints' `/metrics` (real model servers) instead of setting metrics by hand.
    pub scrape: bool,
    /// Decisions kept for `/debug/pool`.
    pub debug_decisions: usize,
    /// Also serve ext_proc on this Unix socket (`--grpc-uds-path`).
    pub grpc_uds: Option<std::path::PathBuf>,
    /// Serving on, not ready, after shutdown begins (`--shutdown-delay`).
    pub shutdown_delay: epp::server::ShutdownDelay,
    /// How long open streams may drain at shutdown (1 s when `None`).
    pub drain_grace: Option<Duration>,
}

impl Default for EppOptions {
    fn default() -> Self {
        Self {
            config: config::REFERENCE_DEFAULT_CONFIG.to_owned(),
            options: ServiceOptions::default(),
            tls: false,
            server_tls: None,
            scrape: false,
            debug_decisions: 0,
            grpc_uds: None,
            shutdown_delay: Default::default(),
            drain_grace: None,
        }
    }
}

/// Starts an EPP serving `pool` (a static pool, seed 7, open admin endpoints) and returns once
/// it is ready; panics if it cannot start within [`TIMEOUT`].
pub async fn start_epp(pool: PoolSpec, opts: EppOptions) -> Epp {
    let bind = || TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        grpc: bind().await.unwrap(),
        grpc_uds: opts
            .grpc_uds
            .as_deref()
            .map(|path| epp::server::bind_grpc_uds(path, 0o660).unwrap()),
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let (grpc, health, metrics) = (
        listeners.grpc.local_addr().unwrap(),
        listeners.health.local_addr().unwrap(),
        listeners.metrics.local_addr().unwrap(),
    );
    let settings = Settings {
        config: config::load(&opts.config, 7).unwrap(),
        options: opts.options,
        debug_decisions: opts.debug_decisions,
        tls: opts.server_tls.or_else(|| {
            opts.tls
                .then(|| epp::tls::ServerTls::self_signed().unwrap())
        }),
        scrape: opts.scrape.then(|| endpoint_picker::scrape::ScrapeConfig {
            interval: Duration::from_millis(50),
            ..Default::default()
        }),
        refresh_prometheus_interval: Duration::from_millis(100),
        metrics_staleness: Duration::from_secs(2),
        fairness_label_limit: epp::labels::DEFAULT_MAX_FAIRNESS_LABELS,
        pool: PoolSource::Static(pool),
        seed: 7,
        admin_auth: epp::admin::AdminAuth::Open,
        debug_pool: true,
        pprof: false,
        health_on_grpc_port: false,
        drain_grace: opts.drain_grace.unwrap_or(Duration::from_secs(1)),
        shutdown_delay: opts.shutdown_delay,
        lora_placement: None,
    };
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        server::serve_with_handles(settings, listeners, token, move |h| {
            let _ = tx.send(h);
        })
        .await
        .unwrap();
    });
    let handles = tokio::time::timeout(TIMEOUT, rx).await.unwrap().unwrap();
    Epp {
        grpc,
        health,
        metrics,
        handles,
        shutdown,
        task,
    }
}

/// Marks every endpoint fresh with the given queue sizes (in pool order).
pub fn set_queues(epp: &Epp, queues: &[u64]) {
    let snap = epp.handles.datastore.snapshot();
    for (e, q) in snap.endpoints.iter().zip(queues) {
        e.store_metrics(EngineMetrics {
            waiting_queue_size: *q,
            updated_at: Some(tokio::time::Instant::now()),
            ..Default::default()
        });
    }
}

/// A plaintext gRPC connection to an EPP.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// One open ext_proc stream, driven message by message as Envoy would.
pub struct Stream {
    /// Requests to the EPP; dropping it half-closes the stream.
    pub tx: mpsc::Sender<ProcessingRequest>,
    /// The EPP's responses.
    pub rx: Streaming<ProcessingResponse>,
}

impl Stream {
    /// A stream on a new plaintext connection to the EPP at `addr`.
    pub async fn open(addr: SocketAddr) -> Self {
        Self::on(connect(addr).await).await
    }

    /// A stream on an existing connection (many streams share one, as from Envoy).
    pub async fn on(channel: Channel) -> Self {
        // Past the EPP's default 64 MiB cap, so that a test can show the EPP raising its own.
        let mut client = ExternalProcessorClient::new(channel)
            .max_decoding_message_size(128 << 20)
            .max_encoding_message_size(128 << 20);
        let (tx, rx) = mpsc::channel(64);
        let rx = client
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    /// Sends one message; panics if the stream is gone.
    pub async fn send(&self, m: ProcessingRequest) {
        self.tx.send(m).await.unwrap();
    }

    /// The next response; panics on an error, an end of stream or [`TIMEOUT`].
    pub async fn recv(&mut self) -> ProcessingResponse {
        self.recv_within(TIMEOUT).await
    }

    /// [`Stream::recv`] with its own deadline, for an answer whose work grows with a large
    /// body (unoptimised test builds, other tests running beside it).
    pub async fn recv_within(&mut self, deadline: Duration) -> ProcessingResponse {
        tokio::time::timeout(deadline, self.rx.message())
            .await
            .expect("response in time")
            .unwrap()
            .expect("a response")
    }

    /// Asserts nothing arrives within a short window (used to check deferral).
    pub async fn expect_silence(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(200), self.rx.message()).await;
        assert!(r.is_err(), "expected no response yet, got {r:?}");
    }
}

/// `Arc::new`, short for test tables.
pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
