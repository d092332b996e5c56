//! Switchyard's model-server simulator: a stand-in for a pool of vLLM (or SGLang) replicas that
//! behaves like an engine under load — continuous batching, a waiting queue, chunked prefill, a
//! paged KV cache with prefix caching and LRU eviction, LoRA slots — behind vLLM's OpenAI API and
//! metric names. See `sim/README.md` for the latency model and its calibration.
//!
//! Start replicas in-process (tests bind `127.0.0.1:0` themselves):
//!
//! ```no_run
//! # async fn demo() -> Result<(), sim::SimError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let replica = sim::spawn_replica(sim::Config::default(), listener, 0).await?;
//! println!("serving on http://{}", replica.addr());
//! // `Config::fast()` is a profile for functional tests: 1 ms steps, 16-token completions.
//! replica.pause(); // hangs like a stuck engine
//! replica.resume();
//! replica.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod engine;
pub mod kv_cache;
pub mod kv_publish;
pub mod metrics;
mod server;
pub mod tiers;
pub mod tokenizer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use config::{Config, EngineKind, FailureInjection, KvTiers, LatencyModel, StepWork, Tier};
pub use engine::{
    Engine, EngineEvent, FinishReason, Outbox, OutboxEvent, PromptHashes, StepPlan, SubmitRequest,
};
pub use server::{RETURN_ERROR_HEADER, prompt_ids};

/// Errors of the simulator library.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A knob is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A socket operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A running replica: one engine serving the HTTP API on one listener.
///
/// Dropping the handle stops the replica (the listener closes, in-flight requests are cut off).
#[derive(Debug)]
pub struct ReplicaHandle {
    addr: SocketAddr,
    replica: Arc<server::Replica>,
    server: JoinHandle<()>,
    kv_events: Option<kv_publish::KvPublishing>,
}

impl ReplicaHandle {
    /// The address the replica listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The pod name reported in `x-inference-pod`.
    pub fn pod_name(&self) -> &str {
        &self.replica.pod_name
    }

    /// The replica's engine (for direct inspection: [`Engine::snapshot`], LoRA state, …).
    pub fn engine(&self) -> &Engine {
        &self.replica.engine
    }

    /// Pauses the replica: connections are still accepted but nothing is answered (except
    /// `/admin/*`) and no engine step runs, like a hung engine.
    pub fn pause(&self) {
        self.replica.engine.set_paused(true);
    }

    /// Resumes a paused replica; held requests proceed.
    pub fn resume(&self) {
        self.replica.engine.set_paused(false);
    }

    /// Whether the replica is paused.
    pub fn is_paused(&self) -> bool {
        self.replica.engine.is_paused()
    }

    /// Sets failure injection: `rate_percent` (0–100) of inference requests fail with a status
    /// drawn uniformly from `statuses`.
    pub fn set_failure_injection(&self, rate_percent: f64, statuses: Vec<u16>) {
        *self.replica.failure.lock() = FailureInjection {
            rate_percent,
            statuses,
        };
    }

    /// Makes the replica load its model again for `duration`, as at start-up (see
    /// [`Config::model_load_time`]); zero makes it ready at once.
    pub fn set_loading(&self, duration: Duration) {
        *self.replica.loaded_at.lock() = tokio::time::Instant::now() + duration;
    }

    /// Whether the replica is still loading its model.
    pub fn is_loading(&self) -> bool {
        tokio::time::Instant::now() < *self.replica.loaded_at.lock()
    }

    /// Delays every `/metrics` answer by `delay` (slow-scrape mode); zero turns it off.
    pub fn set_metrics_delay(&self, delay: Duration) {
        *self.replica.metrics_delay.lock() = delay;
    }

    /// Starts publishing the replica's KV-cache events (vLLM's `--kv-events-config`; see
    /// [`kv_publish`]) as replica `index` of its process.
    pub async fn start_kv_events(
        &mut self,
        settings: &kv_publish::KvEventsSettings,
        index: usize,
    ) -> Result<&kv_publish::KvPublishing, SimError> {
        let publishing = kv_publish::KvPublishing::start(
            &self.replica.engine,
            settings,
            index,
            self.addr,
            &self.replica.config.model,
            self.replica.config.block_size,
        )
        .await?;
        Ok(self.kv_events.insert(publishing))
    }

    /// Starts publishing KV events on the replica's own IP (`sim --ip-per-replica`; see
    /// [`kv_publish::KvPublishing::start_on_own_ip`]).
    pub async fn start_kv_events_on_own_ip(
        &mut self,
        settings: &kv_publish::KvEventsSettings,
    ) -> Result<&kv_publish::KvPublishing, SimError> {
        let publishing = kv_publish::KvPublishing::start_on_own_ip(
            &self.replica.engine,
            settings,
            self.addr,
            &self.replica.config.model,
            self.replica.config.block_size,
        )
        .await?;
        Ok(self.kv_events.insert(publishing))
    }

    /// The replica's KV-event publisher, when started.
    pub fn kv_events(&self) -> Option<&kv_publish::KvPublishing> {
        self.kv_events.as_ref()
    }

    /// Stops the replica and waits for its server task to end.
    pub async fn shutdown(mut self) {
        if let Some(k) = self.kv_events.take() {
            k.shutdown().await;
        }
        self.server.abort();
        self.replica.engine.stop();
        let _ = (&mut self.server).await;
    }
}

impl Drop for ReplicaHandle {
    fn drop(&mut self) {
        self.server.abort();
        self.replica.engine.stop();
    }
}

/// Starts replica `index` with `config` on `listener` (HTTP/1.1 and h2c on the same port), alone
/// in its [`tiers::TierPool`] (no shared store beyond its own, no peers).
pub async fn spawn_replica(
    config: Config,
    listener: TcpListener,
    index: usize,
) -> Result<ReplicaHandle, SimError> {
    let pool = tiers::TierPool::for_config(&config);
    spawn_replica_in(config, listener, index, &pool).await
}

/// Starts replica `index` in `pool`: it shares the pool's store (`kv_tiers.shared_blocks` of
/// the pool's first config) and is a peer of the pool's other replicas, found by the address
/// of `listener`.
pub async fn spawn_replica_in(
    config: Config,
    listener: TcpListener,
    index: usize,
    pool: &Arc<tiers::TierPool>,
) -> Result<ReplicaHandle, SimError> {
    let addr = listener.local_addr()?;
    let config = Arc::new(config);
    let engine = Engine::spawn_in(config.clone(), index, pool.clone())?;
    pool.register(addr, &engine);
    let replica = Arc::new(server::Replica::new(config, engine, index, addr.port()));
    let app = server::router(replica.clone());
    let server = tokio::spawn(serve(listener, app));
    tracing::info!(pod = %replica.pod_name, %addr, "replica listening");
    Ok(ReplicaHandle {
        addr,
        replica,
        server,
        kv_events: None,
    })
}

/// Binds `host:base_port+i` for `i in 0..n` and starts a replica on each, all in one
/// [`tiers::TierPool`] (one shared store, peers of each other). A `base_port` of 0 gives every
/// replica its own ephemeral port.
pub async fn spawn_replicas(
    config: &Config,
    host: &str,
    base_port: u16,
    n: usize,
) -> Result<Vec<ReplicaHandle>, SimError> {
    let pool = tiers::TierPool::for_config(config);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let port = if base_port == 0 {
            0
        } else {
            u16::try_from(usize::from(base_port) + i).map_err(|_| {
                SimError::InvalidConfig(format!("port {base_port}+{i} out of range"))
            })?
        };
        let listener = TcpListener::bind((host, port)).await?;
        out.push(spawn_replica_in(config.clone(), listener, i, &pool).await?);
    }
    Ok(out)
}

/// Binds `ips[i]:port` and starts replica `i` on it, for every address (`sim --ip-per-replica`:
/// one address per replica, the same port on each; 0 gives each an ephemeral port), all in one
/// [`tiers::TierPool`] as [`spawn_replicas`] does (one shared store, peers of each other).
pub async fn spawn_replicas_on_ips(
    config: &Config,
    ips: &[std::net::IpAddr],
    port: u16,
) -> Result<Vec<ReplicaHandle>, SimError> {
    let pool = tiers::TierPool::for_config(config);
    let mut out = Vec::with_capacity(ips.len());
    for (i, ip) in ips.iter().enumerate() {
        let listener = TcpListener::bind((*ip, port)).await?;
        out.push(spawn_replica_in(config.clone(), listener, i, &pool).await?);
    }
    Ok(out)
}

async fn serve(listener: TcpListener, app: axum::Router) {
    // Connection tasks live in the set, so aborting this task closes every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let svc = TowerToHyperService::new(app.clone());
                    conns.spawn(async move {
                        let builder =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        if let Err(e) =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await
                        {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
