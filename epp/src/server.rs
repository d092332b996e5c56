//! Wiring: the datastore, scrapers, discovery, the three servers, and shutdown.
//!
//! [`serve`] takes already-bound listeners, so the binary binds its flag ports and tests bind
//! `127.0.0.1:0`; everything else is the same code.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use endpoint_picker::config::LoadedConfig;
use endpoint_picker::datastore::{Datastore, PoolSpec};
use endpoint_picker::director::Director;
use endpoint_picker::discovery::file::{self, LocalPool};
use endpoint_picker::scrape::{ScrapeConfig, scraper};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use ext_proc::codec::ExtProcServer;
use ext_proc::service::ExtProcService;
use ext_proc::stream::{ServiceContext, ServiceOptions};

use crate::admin::{self, AdminAuth, AdminState, DebugState};
use crate::connections::{
    Guarded, MAX_CONNECTION_AGE, PREFACE_TIMEOUT, PeerAddress as _, Slots, limited,
};
use crate::debug::DecisionLog;
use crate::flow_metrics::FlowMetrics;
use crate::health;
use crate::labels::{FairnessLabels, ModelLabels};
use crate::metrics::{EppMetrics, MetricsObserver};
use crate::recorder::EppRecorder;
use crate::supervisor::{OnExit, Supervisor, factory};
use crate::tls::{self, ServerCertificate, ServerTls};

/// Largest ext_proc message accepted by default (a request body chunk can be large); a
/// larger `--max-request-body-bytes` raises it.
pub const MAX_GRPC_MESSAGE: usize = 64 * 1024 * 1024;

/// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` of the ext_proc port: how many ext_proc streams one
/// gateway connection may carry at once. Every in-flight HTTP request holds one stream for its
/// whole life (a long streamed response included), and a gateway multiplexes them over few
/// connections (Envoy with one worker put 5,000 streams on one), so this bounds the requests a
/// gateway can have in flight. tonic 0.14 passes "no limit" to hyper, whose own default is 200;
/// with 200, 4,000 to 4,439 of 5,000 concurrent requests through the shipped Envoy config failed
/// with 500: the streams past 200 on a connection were refused (Envoy `http2.rx_reset`), and
/// Envoy does not retry an ext_proc stream. The value is pinned here so that it depends on
/// neither library's default; 100,000 matches the circuit breakers of the shipped Envoy configs.
/// There is no limit across connections (no `concurrency_limit_per_connection`, no load
/// shedding): the gateway's circuit breakers are the admission control. Tested by
/// `conformance/tests/concurrency.rs` (5,000 concurrent streams).
pub const MAX_CONCURRENT_STREAMS_PER_CONNECTION: u32 = 100_000;

/// HTTP/2 connection flow-control window of the ext_proc port (hyper's default is 1 MiB). With
/// thousands of streams on one connection, each ext_proc message is a small DATA frame, and h2
/// (0.4.16 and later) answers "too many small DATA frames" buffered but not yet read by the
/// service with GOAWAY `ENHANCE_YOUR_CALM`, killing every stream of the connection (FailClose:
/// 500 for all of them). Its budget is half the connection window, about 3,000 unread 100-byte
/// frames at 1 MiB; 5,000 concurrent requests through the shipped Envoy config lost the whole
/// connection in 3 of 10 runs on 2 cores. 64 MiB allows some 200,000 unread small frames and
/// bounds what one gateway connection can make the EPP buffer to 64 MiB.
pub const HTTP2_CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// Where the pool comes from.
#[derive(Debug)]
pub enum PoolSource {
    /// A pool file, already read once, then polled for changes.
    File {
        /// Path.
        path: std::path::PathBuf,
        /// Poll interval.
        poll_interval: Duration,
        /// `--model-server-metrics-port`.
        metrics_port: Option<u16>,
        /// The first successful read.
        initial: Box<LocalPool>,
        /// The bytes it was parsed from (the file is read once at start-up).
        initial_bytes: Vec<u8>,
    },
    /// A fixed pool (tests).
    Static(PoolSpec),
    /// Kubernetes mode: the InferencePool (or a standalone selector), its Pods, objectives and
    /// rewrites are watched; the pool is published once everything has been listed.
    Kubernetes {
        /// What to watch.
        discovery: Box<k8s::watch::Discovery>,
        /// With leader election: the lease to compete for, or an election already running.
        leader: Option<Election>,
    },
}

/// Leader election in Kubernetes mode: readiness requires leading.
pub enum Election {
    /// The binary's: the lease is competed for only once [`serve`] has checked everything it
    /// checks, so that a start-up that fails never holds a lease it would not hand back.
    Pending {
        /// The API client.
        client: k8s::Client,
        /// The lease's namespace (the pool's).
        namespace: String,
        /// Its name and this replica's identity.
        config: k8s::lease::LeaseConfig,
    },
    /// Already running: `true` while this replica leads, and the lease task, which the
    /// supervisor watches.
    Running(
        tokio::sync::watch::Receiver<bool>,
        tokio::task::JoinHandle<()>,
    ),
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Election::Pending {
                namespace, config, ..
            } => f
                .debug_struct("Pending")
                .field("namespace", namespace)
                .field("config", config)
                .finish_non_exhaustive(),
            Election::Running(..) => f.write_str("Running"),
        }
    }
}

/// Everything [`serve`] needs besides listeners.
#[derive(Debug)]
pub struct Settings {
    /// Loaded plugin configuration.
    pub config: LoadedConfig,
    /// ext_proc service options.
    pub options: ServiceOptions,
    /// Keep the last N decisions for `/debug/pool` (0 = off; `--debug-decisions`).
    pub debug_decisions: usize,
    /// TLS for the ext_proc port (`None` = plaintext).
    pub tls: Option<ServerTls>,
    /// Scraper settings (`None` = no scraping; metrics are set by hand, as in tests).
    pub scrape: Option<ScrapeConfig>,
    /// Pool gauge refresh interval.
    pub refresh_prometheus_interval: Duration,
    /// Staleness threshold for the pool gauges.
    pub metrics_staleness: Duration,
    /// Fairness ids with a metric label of their own (`--fairness-id-metric-label-limit`).
    pub fairness_label_limit: usize,
    /// The pool.
    pub pool: PoolSource,
    /// RNG seed.
    pub seed: u64,
    /// Who may read `/metrics` and `/debug/pool`.
    pub admin_auth: AdminAuth,
    /// Serve `/debug/pool` (`--debug-pool`).
    pub debug_pool: bool,
    /// Serve `/debug/pprof/profile` (`--enable-pprof`).
    pub pprof: bool,
    /// Also serve gRPC health on the ext_proc port.
    pub health_on_grpc_port: bool,
    /// How long open streams may take to finish after shutdown begins.
    pub drain_grace: Duration,
    /// How long the EPP serves on, not ready, after shutdown begins (`--shutdown-delay`).
    pub shutdown_delay: ShutdownDelay,
    /// Demand-driven LoRA adapter placement (`--lora-placement-config`; `None` = off).
    pub lora_placement: Option<crate::lora_placement::PlacementSettings>,
}

/// The three listeners, and the optional Unix socket of the ext_proc service.
#[derive(Debug)]
pub struct Listeners {
    /// ext_proc.
    pub grpc: TcpListener,
    /// ext_proc also on a Unix socket (`--grpc-uds-path`), for a gateway on the same host or
    /// in the same pod: the same service and HTTP/2 settings as `grpc`, always plaintext (the
    /// socket file's permissions are its access control; TLS between two processes that share
    /// a file system protects nothing), served alongside the TCP port.
    pub grpc_uds: Option<UnixListener>,
    /// gRPC health.
    pub health: TcpListener,
    /// Prometheus / admin.
    pub metrics: TcpListener,
}

/// Binds the ext_proc Unix socket at `path` (`--grpc-uds-path`). A socket file left there by
/// an earlier run is replaced (a Unix socket cannot be bound over an existing file, and a pod
/// restart leaves one behind in a shared `emptyDir`); any other kind of file is an error, never
/// removed. The socket file then takes `mode` (`--grpc-uds-mode`): connecting needs write
/// permission on it, and the umask alone left it unreachable to a gateway of another user
/// (0755 under the common 022) or open to every user (under 000).
///
/// The socket is bound in a directory of its own (mode 0700, beside `path`), given its mode
/// there and only then renamed to `path`: bound at `path` and changed after, it was open
/// with the umask's mode in between (a client connecting then stays in the backlog), and the
/// change of mode followed whatever symlink someone put at `path` meanwhile.
pub fn bind_grpc_uds(path: &std::path::Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    check_replaceable(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let private = parent.join(format!(".sy{}", std::process::id()));
    // Left by an earlier process with this pid (a container's pid is often the same).
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("s");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Refuses `path` when something other than a socket is there, and removes a socket left by
/// an earlier run.
fn check_replaceable(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Serving failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server")]
    Grpc(#[from] tonic::transport::Error),
    /// The ext_proc port's TLS could not be set up.
    #[error("ext_proc TLS")]
    Tls(#[from] tls::TlsError),
    /// The token producer's tokenizer could not be loaded.
    #[error("token-producer")]
    Tokenizer(#[from] tokenize::LoadError),
    /// LoRA placement and the scheduling profiles do not fit together.
    #[error("LoRA placement: {0}")]
    LoraPlacement(String),
    /// A task the EPP cannot run without ended, and it shut down.
    #[error("shut down")]
    TaskEnded(#[from] crate::supervisor::TaskEnded),
}

/// Handles to a running EPP (for tests and the binary).
#[derive(Debug, Clone)]
pub struct Handles {
    /// The director.
    pub director: Arc<Director>,
    /// The datastore.
    pub datastore: Arc<Datastore>,
    /// The ext_proc port's certificate (`None` without TLS).
    pub certificate: Option<Arc<ServerCertificate>>,
}

/// Readiness first, then the drain: for this long after shutdown begins the EPP reports
/// NOT_SERVING but still accepts connections and streams, so that gateways that health-check
/// it and the Service's endpoints stop sending to it before it stops listening. Without it a
/// gateway that reconnects after the GOAWAY may still be sent to this pod, and its requests
/// fail (or pass unrouted under `failure_mode_allow`) until the endpoint update arrives.
#[derive(Debug, Clone, Default)]
pub struct ShutdownDelay {
    /// How long (zero: stop accepting at once).
    pub delay: Duration,
    /// Cancelled to end the delay early (a second SIGTERM or SIGINT).
    pub cut_short: CancellationToken,
}

/// Runs the EPP until `shutdown` is cancelled, then (after the shutdown delay) drains within
/// the grace period.
pub async fn serve(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_with_handles(settings, listeners, shutdown, |_| {}).await
}

/// Like [`serve`], calling `on_ready` with handles once everything is wired.
pub async fn serve_with_handles(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Handles),
) -> Result<(), ServeError> {
    let Settings {
        config,
        options,
        debug_decisions,
        tls,
        scrape,
        refresh_prometheus_interval,
        metrics_staleness,
        fairness_label_limit,
        pool,
        seed,
        admin_auth,
        debug_pool,
        pprof,
        health_on_grpc_port,
        drain_grace,
        shutdown_delay,
        lora_placement,
    } = settings;
    crate::lora_placement::check_profiles(&config, lora_placement.is_some())
        .map_err(ServeError::LoraPlacement)?;
    // Before anything starts: a TLS configuration rustls refuses ends here.
    let tls = match tls {
        Some(tls) => Some((tokio_rustls::TlsAcceptor::from(tls.server_config()?), tls)),
        None => None,
    };
    for w in &config.warnings {
        tracing::warn!(warning = %w, "config");
    }
    // Each scorer's tasks are named after it: two precise scorers must not share a task name.
    let precise: Vec<_> = config
        .precise_producers
        .iter()
        .map(|p| (p.name.clone(), p.index().clone(), p.params.events.clone()))
        .collect();
    // Speculative entries shared with peer EPPs: (scorer, index, outbox, publish endpoint,
    // peers).
    let peers: Vec<_> = config
        .precise_producers
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.index().clone(),
                p.peer_outbox().clone(),
                p.params.publish_endpoint.clone(),
                p.params.peers.clone(),
            )
        })
        .collect();
    // Before anything starts too: a tokenizer that does not load.
    let token_producer = crate::tokens::build(config.token_producer.as_ref())?;
    let datastore = Arc::new(Datastore::new());
    let director = Arc::new(Director::new(datastore.clone(), Arc::new(config), seed));
    let labels = Arc::new(ModelLabels::default());
    let fairness_labels = Arc::new(FairnessLabels::with_limit(fairness_label_limit));
    let mut registry = Registry::default();
    let metrics = EppMetrics::register(&mut registry);
    let flow_metrics =
        FlowMetrics::register(&mut registry, labels.clone(), fairness_labels.clone());
    let registry = Arc::new(Mutex::new(registry));
    let observer = Arc::new(MetricsObserver(metrics.clone()));
    director.config().scheduler.set_observer(observer.clone());
    if let Some(flow) = director.flow_control() {
        flow.set_observer(flow_metrics.clone());
    }
    if let Some(crate::tokens::Built {
        producer,
        tokenizer,
    }) = token_producer
    {
        let _ = metrics.token_prefix_cache.set(tokenizer);
        producer.set_observer(observer.clone());
        director.set_token_producer(producer);
    }
    let decisions = Arc::new(DecisionLog::new(debug_decisions));
    let placement = lora_placement.map(|settings| {
        let m = crate::lora_placement::PlacementMetrics::default();
        m.register(&mut registry.lock());
        let placement = Arc::new(crate::lora_placement::Placement::new(
            settings,
            datastore.clone(),
            m,
        ));
        director.set_lora_demand(placement.demand());
        placement
    });

    // Every long-lived task runs under the supervisor (see `supervisor`). Its restartable
    // tasks (scrapers, watches, the flow dispatcher, KV events) outlive `shutdown` until the
    // gRPC drain is over: streams still open are routed on live state, and a request that
    // flow control queued is still let go.
    let tasks_stop = CancellationToken::new();
    // The listeners (ext_proc, health, metrics) close when the shutdown delay is over.
    let stop_accepting = CancellationToken::new();
    let mut tasks = Supervisor::new(shutdown.clone(), metrics.task_exits.clone())
        .run_tasks_until(tasks_stop.clone());

    // Membership changes reach the producers (prefix index purge).
    {
        let director = director.clone();
        tasks.spawn(
            "pool-changes",
            OnExit::Restart,
            factory(move |token: CancellationToken| {
                let director = director.clone();
                async move { director.follow_pool_changes(token).await }
            }),
        );
    }

    // The KV-event subscribers of each precise-prefix-cache-scorer (`kv_events`), and the
    // walker of its departed endpoints' clears (`SharedKvIndex::walk_clears`).
    for (scorer, index, settings) in precise {
        {
            let index = index.clone();
            tasks.spawn(
                format!("kv-clears:{scorer}"),
                OnExit::Restart,
                factory(move |token: CancellationToken| {
                    let index = index.clone();
                    async move {
                        tokio::select! {
                            _ = token.cancelled() => {}
                            _ = index.walk_clears() => {}
                        }
                    }
                }),
            );
        }
        let (datastore, metrics) = (datastore.clone(), metrics.kv_events.clone());
        tasks.spawn(
            format!("kv-events:{scorer}"),
            OnExit::Restart,
            factory(move |token| {
                crate::kv_events::run(
                    Arc::new(crate::kv_events::ZmqConnector::counting_into(
                        metrics.transport.clone(),
                    )),
                    datastore.clone(),
                    index.clone(),
                    metrics.clone(),
                    settings.clone(),
                    token,
                )
            }),
        );
    }

    // Speculative entries shared with peer EPPs (`speculation_peers`).
    for (scorer, index, outbox, publish, peer_endpoints) in peers {
        if let Some(endpoint) = publish.clone() {
            let metrics = metrics.kv_events.clone();
            tasks.spawn(
                format!("speculation-publisher:{scorer}"),
                OnExit::Restart,
                factory(move |token| {
                    crate::speculation_peers::publish(
                        endpoint.clone(),
                        outbox.clone(),
                        metrics.clone(),
                        token,
                    )
                }),
            );
        }
        if !peer_endpoints.is_empty() {
            let (datastore, metrics) = (datastore.clone(), metrics.kv_events.clone());
            tasks.spawn(
                format!("speculation-peers:{scorer}"),
                OnExit::Restart,
                factory(move |token| {
                    crate::speculation_peers::subscribe_all(
                        peer_endpoints.clone(),
                        publish.clone(),
                        datastore.clone(),
                        index.clone(),
                        metrics.clone(),
                        token,
                    )
                }),
            );
        }
    }

    // LoRA placement: a failed pass changes nothing; a restarted loop starts its dwell times
    // afresh.
    if let Some(placement) = placement {
        tasks.spawn(
            "lora-placement",
            OnExit::Restart,
            factory(move |token: CancellationToken| placement.clone().run(token)),
        );
    }

    // Flow control's dispatcher (with the flowControl feature gate on). Restarted if it ever
    // ends early: queued requests keep their places, and its next cycle picks them up.
    if director.flow_control().is_some() {
        let director = director.clone();
        tasks.spawn(
            "flow-control",
            OnExit::Restart,
            factory(move |token: CancellationToken| director.clone().run_flow_control(token)),
        );
    }

    let mut leader = None;
    match pool {
        PoolSource::File {
            path,
            poll_interval,
            metrics_port,
            initial,
            initial_bytes,
        } => {
            file::apply(*initial, &datastore, Some(&director));
            let watcher = Arc::new(file::FileWatcher::new(
                path,
                poll_interval,
                metrics_port,
                datastore.clone(),
                Some(director.clone()),
                initial_bytes,
            ));
            tasks.spawn(
                "pool-file",
                OnExit::Restart,
                factory(move |token| {
                    let watcher = watcher.clone();
                    async move { watcher.run(token).await }
                }),
            );
        }
        PoolSource::Static(spec) => {
            datastore.apply(spec);
        }
        PoolSource::Kubernetes {
            discovery,
            leader: is_leader,
        } => {
            leader = is_leader.map(|election| {
                let (rx, lease) = match election {
                    Election::Pending {
                        client,
                        namespace,
                        config,
                    } => {
                        tracing::info!(lease = %config.name, identity = %config.identity, "leader election on");
                        k8s::lease::start(client, &namespace, config, shutdown.child_token())
                    }
                    Election::Running(rx, lease) => (rx, lease),
                };
                // The lease ends at shutdown, when another replica holds it after this one
                // led, or by a panic. Each ends the process (drained), and Kubernetes starts
                // it again, as controller-runtime exits when its elector stops: a replica
                // that lost the lease only turning unready would go on routing on the
                // gateways' open connections, beside the new leader, until their age ran out;
                // a panicked elector cannot be re-run here.
                tasks.adopt("lease", OnExit::Shutdown, lease);
                rx
            });
            let publisher = k8s::index::Publisher {
                datastore: datastore.clone(),
                director: Some(director.clone()),
            };
            let (_index, watches) = discovery.tasks(publisher);
            metrics
                .kubernetes_watches
                .lock()
                .extend(watches.iter().map(|w| (w.name, w.health.clone())));
            for watch in watches {
                // A watch that ended would leave the pool as it was: not ready until it runs.
                let run = Arc::new(watch.run);
                tasks.spawn(
                    watch.name,
                    OnExit::Degrade,
                    factory(move |token| run(token)),
                );
            }
        }
    }

    if let Some(scrape) = scrape {
        let (datastore, scrape, observer) = (datastore.clone(), Arc::new(scrape), observer.clone());
        tasks.spawn(
            "scraper",
            OnExit::Restart,
            factory(move |token| {
                scraper::run(datastore.clone(), scrape.clone(), observer.clone(), token)
            }),
        );
    }

    {
        let (metrics, flow_metrics, datastore, director, labels, bodies, registry) = (
            metrics.clone(),
            flow_metrics.clone(),
            datastore.clone(),
            director.clone(),
            labels.clone(),
            (
                options.gathered_request_bytes.clone(),
                options.held_response_bytes.clone(),
            ),
            registry.clone(),
        );
        tasks.spawn(
            "pool-gauges",
            OnExit::Restart,
            factory(move |token: CancellationToken| {
                let (metrics, flow_metrics, datastore, director, labels, bodies, registry) = (
                    metrics.clone(),
                    flow_metrics.clone(),
                    datastore.clone(),
                    director.clone(),
                    labels.clone(),
                    bodies.clone(),
                    registry.clone(),
                );
                async move {
                    let mut tick = tokio::time::interval(refresh_prometheus_interval);
                    loop {
                        tokio::select! {
                            _ = token.cancelled() => return,
                            _ = tick.tick() => {
                                refresh_unless_encoding(&registry, || {
                                    metrics.refresh_pool(&datastore, &director, metrics_staleness);
                                    metrics.refresh_held_bodies(&bodies.0, &bodies.1);
                                    flow_metrics.refresh(&director);
                                });
                                labels.learn(&datastore.snapshot(), &director.policies());
                            }
                        }
                    }
                }
            }),
        );
    }

    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::init(&reporter).await;
    {
        // Ready = the pool has synced, no task that readiness depends on is down and, with
        // leader election, this replica leads.
        let readiness = follow_readiness(
            reporter.clone(),
            datastore.subscribe(),
            leader,
            tasks.down(),
            shutdown.clone(),
        );
        tasks.adopt("readiness", OnExit::Shutdown, tokio::spawn(readiness));
    }
    tasks.adopt(
        "health-server",
        OnExit::Shutdown,
        tokio::spawn(crate::health::serve(
            listeners.health,
            health_service.clone(),
            stop_accepting.clone(),
        )),
    );

    {
        let token = stop_accepting.clone();
        let (m, fm, ds, d, bodies) = (
            metrics.clone(),
            flow_metrics.clone(),
            datastore.clone(),
            director.clone(),
            (
                options.gathered_request_bytes.clone(),
                options.held_response_bytes.clone(),
            ),
        );
        let state = AdminState {
            registry: registry.clone(),
            auth: admin_auth,
            refresh: Some(admin::Refresh(Arc::new(move || {
                m.refresh_pool(&ds, &d, metrics_staleness);
                m.refresh_held_bodies(&bodies.0, &bodies.1);
                fm.refresh(&d);
            }))),
            debug: debug_pool
                .then(|| DebugState::new(datastore.clone(), director.clone(), decisions.clone())),
            pprof: pprof.then(|| admin::PprofState {
                shutdown: shutdown.clone(),
            }),
        };
        let listener = listeners.metrics;
        let server = tokio::spawn(async move {
            admin::serve(listener, admin::router(state), token).await;
        });
        tasks.adopt("metrics-server", OnExit::Shutdown, server);
    }
    if let Some((_, tls)) = &tls
        && let Some(reload) = tls.reload()
    {
        // Re-reads --cert-path until shutdown (--enable-cert-reload).
        let (certificate, reload) = (tls.certificate().clone(), reload.clone());
        tasks.spawn(
            "cert-reload",
            OnExit::Restart,
            factory(move |token| {
                tls::watch_certificates(certificate.clone(), reload.clone(), token)
            }),
        );
    }
    let supervisor = tokio::spawn(tasks.run());

    // A gateway in BUFFERED mode sends the whole body in one message, and a rewritten body
    // goes back in one: a limit raised past the default message cap must raise the cap both
    // ways, or such a body would break the stream instead of being routed (or getting its 413).
    let max_message =
        MAX_GRPC_MESSAGE.max(options.max_request_body_bytes.saturating_add(64 * 1024));
    let ctx = Arc::new(ServiceContext {
        director: director.clone(),
        recorder: Arc::new(EppRecorder::new(
            metrics,
            decisions,
            labels,
            fairness_labels,
        )),
        options,
    });
    let svc = ExtProcServer::new(ExtProcService::new(ctx))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    // The HTTP/2 settings are the server's, whatever the transport underneath: TLS is
    // terminated below, before tonic sees the connection.
    let mut router = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Asked to close gracefully (`crate::connections`); no grace cut: a long answer's
        // stream finishes on its old connection.
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS_PER_CONNECTION)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .add_service(svc);
    if health_on_grpc_port {
        router = router.add_service(health_service);
    }
    on_ready(Handles {
        director,
        datastore,
        certificate: tls.as_ref().map(|(_, tls)| tls.certificate().clone()),
    });
    let grpc_token = stop_accepting.clone();
    // `Server::tcp_nodelay` only applies when tonic binds the socket itself; with our own
    // listener the accepted sockets must be configured here, or Nagle's algorithm meets the
    // peer's delayed ACK and mid-size ext_proc messages wait ~40 ms (found by bench/overhead).
    let incoming = TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
    type Serving =
        std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    // The Unix socket first: it takes a clone of the router, the TCP port the router itself.
    let uds: Serving = match listeners.grpc_uds {
        Some(listener) => Box::pin(router.clone().serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            grpc_token.clone().cancelled_owned(),
        )),
        None => Box::pin(std::future::ready(Ok(()))),
    };
    // Bounded connections ([`crate::connections`]); the Unix socket, reachable only on the
    // host and guarded by its file's mode, is not.
    let slots = Slots::default();
    let tcp: Serving =
        match tls {
            Some((acceptor, _)) => Box::pin(router.serve_with_incoming_shutdown(
                tls_incoming(incoming, acceptor, slots),
                grpc_token.cancelled_owned(),
            )),
            None => Box::pin(router.serve_with_incoming_shutdown(
                limited(incoming, slots),
                grpc_token.cancelled_owned(),
            )),
        };
    // Either listener failing ends serving; both end together at shutdown.
    let grpc = async move { futures::try_join!(tcp, uds).map(|_| ()) };
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
    // The supervisor waits for every task to end with its token.
    match supervisor.await {
        Ok(Err(ended)) if result.is_ok() => return Err(ended.into()),
        Ok(_) => {}
        Err(error) => tracing::error!(%error, "the supervisor failed"),
    }
    result
}

/// Serving, and its end: until `shutdown`, then for the shutdown delay (not ready, still
/// accepting), then `stop_accepting` closes the listeners and open streams get `grace` to
/// finish. Returns early with serving's own end. Shared with the `bbr` binary.
pub async fn serve_then_drain<E>(
    serving: impl Future<Output = Result<(), E>>,
    shutdown: &CancellationToken,
    delay: &ShutdownDelay,
    stop_accepting: &CancellationToken,
    grace: Duration,
) -> Result<(), E> {
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => return r,
        _ = shutdown.cancelled() => {}
    }
    if !delay.delay.is_zero() {
        tracing::info!(
            delay = ?delay.delay,
            "shutting down: not ready, still serving for --shutdown-delay"
        );
        tokio::select! {
            r = &mut serving => return r,
            _ = tokio::time::sleep(delay.delay) => {}
            _ = delay.cut_short.cancelled() => tracing::info!("shutdown delay cut short"),
        }
    }
    stop_accepting.cancel();
    tracing::info!(?grace, "shutting down; draining open streams");
    match tokio::time::timeout(grace, &mut serving).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("drain grace period elapsed; closing remaining streams");
            Ok(())
        }
    }
}

/// Keeps the readiness services in step with "synced, no supervised task that readiness
/// depends on down, and leader" until shutdown, then marks them NOT_SERVING. Losing the lease
/// (or the lease task dying) drops readiness at once; a lease not renewed in time (the API
/// server out of reach) comes back, a lease another replica holds ends the process (the
/// lease task ends; see where it is adopted).
async fn follow_readiness(
    reporter: tonic_health::server::HealthReporter,
    mut synced: tokio::sync::watch::Receiver<u64>,
    mut leader: Option<tokio::sync::watch::Receiver<bool>>,
    mut down: tokio::sync::watch::Receiver<BTreeSet<crate::supervisor::TaskName>>,
    token: CancellationToken,
) {
    let election = leader.is_some();
    let mut ready = false;
    loop {
        let is_synced = *synced.borrow_and_update() > 0;
        let leads = !election || leader.as_mut().is_some_and(|l| *l.borrow_and_update());
        let tasks_down: Vec<String> = down
            .borrow_and_update()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let now = is_synced && leads && tasks_down.is_empty();
        if now != ready {
            ready = now;
            health::set_ready(&reporter, ready).await;
            tracing::info!(
                ready,
                synced = is_synced,
                leader = leads,
                ?tasks_down,
                "readiness changed"
            );
        }
        let leader_changed = async {
            match leader.as_mut() {
                Some(l) => l.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = token.cancelled() => break,
            r = synced.changed() => if r.is_err() { break },
            r = down.changed() => if r.is_err() { break },
            alive = leader_changed => if !alive {
                tracing::error!("leader election stopped; no longer ready");
                leader = None;
            },
        }
    }
    health::set_ready(&reporter, false).await;
}

/// How long a client may take to complete its TLS handshake. The handshakes run beside the
/// accept loop, so a slow one delays no one else; this bounds what a client that connects and
/// never finishes can hold.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS connections of the ext_proc port: each accepted socket's handshake runs as its own
/// task (so one slow client does not hold up the others), and the finished ones are handed to
/// tonic. A failed or timed-out handshake is logged at debug and dropped, as tonic does with
/// its own TLS. Dropping the stream (at shutdown) aborts the handshakes in progress. Shared
/// with the `bbr` binary, whose ext_proc port serves TLS the same way.
///
/// Each connection holds a slot of `slots` from its accept, handshake included; past the cap a
/// connection is closed at once, and after its handshake it must send the HTTP/2 preface in
/// time ([`crate::connections`]).
pub fn tls_incoming(
    tcp: TcpIncoming,
    acceptor: tokio_rustls::TlsAcceptor,
    slots: Slots,
) -> impl tokio_stream::Stream<Item = Result<TlsConnection, std::io::Error>> {
    use tokio_stream::StreamExt as _;

    type Handshake = Result<
        Result<tokio_rustls::server::TlsStream<Guarded<tokio::net::TcpStream>>, std::io::Error>,
        tokio::time::error::Elapsed,
    >;
    enum Next {
        Accepted(Option<Result<tokio::net::TcpStream, std::io::Error>>),
        // Boxed: a TLS stream is large, a socket is not.
        Handshake(Box<Result<Handshake, tokio::task::JoinError>>),
    }

    let handshakes = tokio::task::JoinSet::new();
    futures::stream::unfold(
        (tcp, handshakes, acceptor),
        move |(mut tcp, mut handshakes, acceptor)| {
            let slots = slots.clone();
            async move {
                loop {
                    let next = tokio::select! {
                        accepted = tcp.next() => Next::Accepted(accepted),
                        Some(done) = handshakes.join_next() => Next::Handshake(Box::new(done)),
                    };
                    match next {
                        // The listener is gone: the stream ends (tonic stops serving).
                        Next::Accepted(None) => return None,
                        // tonic logs accept errors and carries on.
                        Next::Accepted(Some(Err(e))) => {
                            return Some((Err(e), (tcp, handshakes, acceptor)));
                        }
                        Next::Accepted(Some(Ok(socket))) => {
                            // Past the cap the socket is dropped (closed) here.
                            let Some(slot) = slots.take(socket.peer_ip()) else {
                                continue;
                            };
                            let socket = Guarded::new(socket, Some(slot), None);
                            let acceptor = acceptor.clone();
                            handshakes.spawn(async move {
                                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(socket))
                                    .await
                            });
                        }
                        Next::Handshake(done) => match *done {
                            Ok(Ok(Ok(stream))) => {
                                let stream = Guarded::new(stream, None, Some(PREFACE_TIMEOUT));
                                return Some((Ok(stream), (tcp, handshakes, acceptor)));
                            }
                            Ok(Ok(Err(error))) => {
                                tracing::debug!(%error, "ext_proc TLS handshake failed");
                            }
                            Ok(Err(_)) => {
                                tracing::debug!(timeout = ?TLS_HANDSHAKE_TIMEOUT, "ext_proc TLS handshake timed out");
                            }
                            Err(error) => {
                                tracing::debug!(%error, "ext_proc TLS handshake task ended");
                            }
                        },
                    }
                }
            }
        },
    )
}

/// An ext_proc connection over TLS: the socket holds its slot, the TLS stream its preface
/// deadline.
pub type TlsConnection = Guarded<tokio_rustls::server::TlsStream<Guarded<tokio::net::TcpStream>>>;

/// Runs `refresh` under the registry's lock, unless a scrape holds it: a scrape encodes under
/// that lock after the same refresh (admin.rs), and this runs on a runtime worker, whose
/// ext_proc streams (every stream, on one worker thread) would wait out every encode queued
/// for the lock. Whether it ran.
fn refresh_unless_encoding(registry: &Mutex<Registry>, refresh: impl FnOnce()) -> bool {
    match registry.try_lock() {
        Some(_encoding) => {
            refresh();
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {

    #![allow(clippy::unwrap_used)]

    use super::bind_grpc_uds;
    use super::{Mutex, Registry, refresh_unless_encoding};

    /// The periodic refresh does not wait for a scrape's encode: with the lock held elsewhere
    /// it returns at once without refreshing, and refreshes once the lock is free.
    #[test]
    fn the_periodic_refresh_skips_while_a_scrape_encodes() {
        let registry = Mutex::new(Registry::default());
        let held = registry.lock();
        let mut ran = false;
        assert!(!refresh_unless_encoding(&registry, || ran = true));
        assert!(!ran);
        drop(held);
        assert!(refresh_unless_encoding(&registry, || ran = true));
        assert!(ran);
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sy-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_another_file_is_left_alone() {
        let dir = dir("bind-uds");
        let socket = dir.join("epp.sock");
        // Left behind by an earlier process (bound, then dropped without removing the file).
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let listener = bind_grpc_uds(&socket, 0o660).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "{mode:o}");
        // Staged beside it and renamed: nothing else is left in the directory.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("epp.sock")]);
        let client = tokio::net::UnixStream::connect(&socket);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        accepted.unwrap();
        connected.unwrap();

        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let error = bind_grpc_uds(&file, 0o660).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
