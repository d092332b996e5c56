//! Wiring: the mapping's source, the ext_proc server, gRPC health, `/metrics`, all under one
//! supervisor (shared with the EPP, `epp::supervisor`).
//!
//! Readiness: SERVING once the mapping has synced (the first listing of the ConfigMaps, or the
//! first read of the file) and while no task readiness depends on is down (one that ended, by a
//! panic, until the supervisor has run it again). A ConfigMap watch that fails after the first
//! listing does not end: the watcher retries with backoff for ever and the router stays ready
//! on its last good mapping, since turning unready would take every model off the gateway.
//! That failure shows in `bbr_mapping_watch_errors_total` and in
//! `bbr_mapping_watch_last_success_timestamp_seconds` ([`crate::kube`]), not in readiness.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use epp::admin::{self, AdminAuth, AdminState};
use epp::health;
use epp::server::{
    HTTP2_CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS_PER_CONNECTION, MAX_GRPC_MESSAGE,
    ShutdownDelay, serve_then_drain, tls_incoming,
};
use epp::supervisor::{OnExit, Supervisor, factory};
use epp::tls::ServerTls;
use ext_proc::codec::ExtProcServer;
use gateway_api::httproutes::HttpRoute;
use k8s::api::InferencePool;
use k8s_openapi::api::core::v1::ConfigMap;
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::file::MappingFileSource;
use crate::mapping::Mapping;
use crate::metrics::Metrics;
use crate::models::ModelList;
use crate::routes::{RouteIndex, RouteStore};
use crate::service::BbrService;
use crate::stream::{Context, Options};

/// Kubernetes mode's APIs, each in the namespace(s) the router watches.
#[derive(Clone)]
pub struct KubeSource {
    /// The managed ConfigMaps (the mapping).
    pub configmaps: kube::Api<ConfigMap>,
    /// HTTPRoutes (which model routes to which pool, [`crate::routes`]).
    pub httproutes: kube::Api<HttpRoute>,
    /// InferencePools (their target ports).
    pub pools: kube::Api<InferencePool>,
}

/// Where the mapping comes from.
pub enum MappingSource {
    /// Watch the managed ConfigMaps, and the HTTPRoutes and InferencePools.
    Kubernetes(Box<KubeSource>),
    /// Poll a file (read once at start-up, before the ports are bound).
    File {
        /// The file.
        path: std::path::PathBuf,
        /// How often it is read.
        poll_interval: Duration,
    },
    /// Nothing updates the mapping (tests; it must be synced already).
    Static,
}

impl std::fmt::Debug for MappingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MappingSource::Kubernetes(_) => f.write_str("Kubernetes"),
            MappingSource::File { path, .. } => f.debug_tuple("File").field(path).finish(),
            MappingSource::Static => f.write_str("Static"),
        }
    }
}

/// Everything [`serve`] needs besides its listeners.
#[derive(Debug)]
pub struct Settings {
    /// The ext_proc options.
    pub options: Options,
    /// The mapping (shared with its source).
    pub mapping: Arc<Mapping>,
    /// What keeps it current.
    pub source: MappingSource,
    /// TLS on the ext_proc port (`None`: plaintext h2c).
    pub tls: Option<ServerTls>,
    /// Who may read `/metrics`.
    pub admin_auth: AdminAuth,
    /// How long open streams get to finish after SIGTERM.
    pub drain_grace: Duration,
    /// Not ready but still serving, after SIGTERM and before the drain (`--shutdown-delay`).
    pub shutdown_delay: ShutdownDelay,
}

/// The bound ports.
#[derive(Debug)]
pub struct Listeners {
    /// ext_proc.
    pub grpc: TcpListener,
    /// gRPC health.
    pub health: TcpListener,
    /// `/metrics`.
    pub metrics: TcpListener,
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server")]
    Grpc(#[from] tonic::transport::Error),
    /// The ext_proc port's TLS could not be set up.
    #[error("ext_proc TLS")]
    Tls(#[from] epp::tls::TlsError),
    /// A task the router cannot run without ended, and it shut down.
    #[error("shut down")]
    TaskEnded(#[from] epp::supervisor::TaskEnded),
}

/// Serves until `shutdown`, then drains.
pub async fn serve(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let Settings {
        options,
        mapping,
        source,
        tls,
        admin_auth,
        drain_grace,
        shutdown_delay,
    } = settings;
    let acceptor = match &tls {
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(tls.server_config()?)),
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let registry = {
        let mut r = Registry::default();
        metrics.register(&mut r);
        Arc::new(Mutex::new(r))
    };
    // The mapping's watches and the model list keep running until the drain is over, as the
    // EPP's restartable tasks do: during the shutdown delay bbr still serves on a live mapping.
    let tasks_stop = CancellationToken::new();
    let mut tasks = Supervisor::new(shutdown.clone(), metrics.task_exits.clone())
        .run_tasks_until(tasks_stop.clone());
    // The listeners close when the shutdown delay is over.
    let stop_accepting = CancellationToken::new();
    let mut route_index = None;
    match source {
        MappingSource::Kubernetes(apis) => {
            let KubeSource {
                configmaps,
                httproutes,
                pools,
            } = *apis;
            {
                let (mapping, metrics) = (mapping.clone(), metrics.clone());
                // The watcher retries its errors for ever, so this task ends only by a panic;
                // then the mapping would be stale with nothing to follow it, so not ready until
                // it runs again. A watch that keeps failing stays up and ready on the last good
                // mapping, counted in the watch metrics (`crate::kube`).
                tasks.spawn(
                    "watch-configmaps",
                    OnExit::Degrade,
                    factory(move |token| {
                        crate::kube::watch(
                            configmaps.clone(),
                            mapping.clone(),
                            metrics.clone(),
                            token,
                        )
                    }),
                );
            }
            // The routes only narrow /v1/models and report unmatchable routes: routing does
            // not depend on them, so their watches restart without touching readiness.
            let store = RouteStore::new();
            let (index_tx, index_rx) = tokio::sync::watch::channel::<Option<Arc<RouteIndex>>>(None);
            route_index = Some(index_rx);
            {
                let store = store.clone();
                tasks.spawn(
                    "watch-httproutes",
                    OnExit::Restart,
                    factory(move |token| {
                        crate::routes::watch(httproutes.clone(), store.clone(), token)
                    }),
                );
            }
            {
                let store = store.clone();
                tasks.spawn(
                    "watch-inferencepools",
                    OnExit::Restart,
                    factory(move |token| crate::routes::watch(pools.clone(), store.clone(), token)),
                );
            }
            {
                let (mapping, metrics) = (mapping.clone(), metrics.clone());
                tasks.spawn(
                    "route-index",
                    OnExit::Restart,
                    factory(move |token| {
                        crate::routes::run_index(
                            mapping.clone(),
                            store.clone(),
                            index_tx.clone(),
                            metrics.clone(),
                            token,
                        )
                    }),
                );
            }
        }
        MappingSource::File {
            path,
            poll_interval,
        } => {
            let (mapping, metrics) = (mapping.clone(), metrics.clone());
            // Each run reads the file afresh; applying unchanged contents changes nothing.
            tasks.spawn(
                "mapping-file",
                OnExit::Degrade,
                factory(move |token| {
                    MappingFileSource::new(&path).run(
                        poll_interval,
                        mapping.clone(),
                        metrics.clone(),
                        token,
                    )
                }),
            );
        }
        MappingSource::Static => {}
    }

    let models = ModelList::new();
    {
        let (mapping, metrics, models) = (mapping.clone(), metrics.clone(), models.clone());
        tasks.spawn(
            "model-list",
            OnExit::Restart,
            factory(move |token| {
                crate::models::run(
                    mapping.clone(),
                    route_index.clone(),
                    models.clone(),
                    metrics.clone(),
                    token,
                )
            }),
        );
    }

    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::init(&reporter).await;
    tasks.adopt(
        "readiness",
        OnExit::Shutdown,
        tokio::spawn(follow_readiness(
            reporter.clone(),
            mapping.synced(),
            tasks.down(),
            shutdown.clone(),
        )),
    );
    // As the EPP's: bounded connections, each aged out (`epp::health::serve`).
    tasks.adopt(
        "health-server",
        OnExit::Shutdown,
        tokio::spawn(epp::health::serve(
            listeners.health,
            health_service.clone(),
            stop_accepting.clone(),
        )),
    );
    {
        let token = stop_accepting.clone();
        let (m, map) = (metrics.clone(), mapping.clone());
        let state = AdminState {
            registry,
            auth: admin_auth,
            refresh: Some(admin::Refresh(Arc::new(move || {
                m.mapping_size(&map.lookup())
            }))),
            debug: None,
            pprof: None,
        };
        let listener = listeners.metrics;
        let server = tokio::spawn(async move {
            admin::serve(listener, admin::router(state), token).await;
        });
        tasks.adopt("metrics-server", OnExit::Shutdown, server);
    }
    let supervisor = tokio::spawn(tasks.run());

    let ctx = Arc::new(Context {
        mapping,
        metrics,
        models,
        options,
    });
    let svc = ExtProcServer::new(BbrService::new(ctx))
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE);
    let router = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_connection_age(epp::connections::MAX_CONNECTION_AGE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS_PER_CONNECTION)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .add_service(svc);
    let incoming = TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
    let token = stop_accepting.clone();
    // Bounded connections, as the EPP's (`epp::connections`).
    let slots = epp::connections::Slots::default();
    let grpc: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match acceptor {
            Some(acceptor) => Box::pin(router.serve_with_incoming_shutdown(
                tls_incoming(incoming, acceptor, slots),
                token.cancelled_owned(),
            )),
            None => Box::pin(router.serve_with_incoming_shutdown(
                epp::connections::limited(incoming, slots),
                token.cancelled_owned(),
            )),
        };
    let result = serve_then_drain(
        grpc,
        &shutdown,
        &shutdown_delay,
        &stop_accepting,
        drain_grace,
    )
    .await
    .map_err(ServeError::from);
    shutdown.cancel();
    stop_accepting.cancel();
    tasks_stop.cancel();
    match supervisor.await {
        Ok(Err(ended)) if result.is_ok() => return Err(ended.into()),
        Ok(_) => {}
        Err(error) => tracing::error!(%error, "the supervisor failed"),
    }
    result
}

/// Keeps readiness at "mapping synced and no degrading task down" until shutdown.
async fn follow_readiness(
    reporter: tonic_health::server::HealthReporter,
    mut synced: tokio::sync::watch::Receiver<bool>,
    mut down: tokio::sync::watch::Receiver<BTreeSet<epp::supervisor::TaskName>>,
    token: CancellationToken,
) {
    let mut ready = false;
    loop {
        let is_synced = *synced.borrow_and_update();
        let tasks_down: Vec<String> = down
            .borrow_and_update()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let now = is_synced && tasks_down.is_empty();
        if now != ready {
            ready = now;
            health::set_ready(&reporter, ready).await;
            tracing::info!(ready, synced = is_synced, ?tasks_down, "readiness changed");
        }
        tokio::select! {
            _ = token.cancelled() => break,
            r = synced.changed() => if r.is_err() { break },
            r = down.changed() => if r.is_err() { break },
        }
    }
    health::set_ready(&reporter, false).await;
}
