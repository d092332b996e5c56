//! Publishes an engine's KV-cache events as vLLM does (`--kv-events-config`): msgpack
//! `KVEventBatch`es on a ZMQ PUB socket, three frames each, with a replay ROUTER, through
//! `kv_events::transport::Publisher`.
//!
//! - A batch is what the engine emitted since the last one: the bridge task takes the first
//!   event, then everything already queued (the rest of that engine step), up to the codec's
//!   cap. Consecutive stored blocks of one sequence become one `BlockStored` (as vLLM sends a
//!   run of blocks), consecutive evictions one `BlockRemoved`. `medium` is `GPU` for the
//!   engine's cache, `CPU` and `REMOTE` for the tiers below it (`crate::tiers`; no token ids);
//!   `data_parallel_rank` is the replica's index.
//! - The engine never waits: its events go through a broadcast ring (a lagging bridge loses
//!   events and counts them) and batches through the publisher's bounded queue
//!   (`max_queue_size`; a full queue drops and counts).
//! - The topic, when the config's is empty, is llm-d's convention `kv@<pod-ip>:<port>@<model>`
//!   (vLLM's own default is the empty topic; llm-d's subscribers filter on `kv@` and key the
//!   engine by what is between the `@`s).
//! - Replica `i` of a process offsets the endpoint's and the replay endpoint's ports by `i`, as
//!   vLLM offsets them by data-parallel rank (port 0 stays 0: the OS picks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kv_events::codec::{
    Encoder, Encoding, MAX_EVENTS_PER_BATCH, MAX_HASHES_PER_EVENT, MAX_TOKEN_IDS_PER_EVENT,
};
use kv_events::transport::{Publisher, PublisherConfig, PublisherHandle, PublisherStats};
use kv_events::{BlockRemoved, BlockStored, Event, EventBatch, KvEventsConfig, Medium};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::SimError;
use crate::engine::Engine;
use crate::kv_cache::KvEvent;

/// How a process's replicas publish their KV events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsSettings {
    /// vLLM's `--kv-events-config`.
    pub config: KvEventsConfig,
    /// The events' msgpack shape (`--kv-events-encoding`).
    pub encoding: Encoding,
    /// The pod IP of the default topic (`POD_IP`); else the listen address, or 127.0.0.1
    /// when that is a wildcard.
    pub pod_ip: Option<String>,
}

/// A replica's running publisher.
#[derive(Debug)]
pub struct KvPublishing {
    endpoint: String,
    replay_endpoint: Option<String>,
    topic: String,
    stats: Arc<PublisherStats>,
    lagged: Arc<AtomicU64>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

// === impl KvPublishing ===

impl KvPublishing {
    /// Starts publishing `engine`'s events (replica `index`, serving `model` on `addr`).
    pub async fn start(
        engine: &Engine,
        settings: &KvEventsSettings,
        index: usize,
        addr: SocketAddr,
        model: &str,
        block_size: usize,
    ) -> Result<Self, SimError> {
        Self::start_with(engine, settings, index, addr, model, block_size, false).await
    }

    /// [`KvPublishing::start`] for a replica that has an address of its own (`sim
    /// --ip-per-replica`): the endpoints' hosts become `addr`'s IP, their ports stay as given
    /// (rank 0 of its own pod), and the PUB socket binds there even though the host is not
    /// vLLM's wildcard (by vLLM's rule a named host would make it connect).
    pub async fn start_on_own_ip(
        engine: &Engine,
        settings: &KvEventsSettings,
        addr: SocketAddr,
        model: &str,
        block_size: usize,
    ) -> Result<Self, SimError> {
        let mut own = settings.clone();
        own.config.endpoint = endpoint_on_ip(&own.config.endpoint, addr.ip())?;
        own.config.replay_endpoint = own
            .config
            .replay_endpoint
            .as_deref()
            .map(|e| endpoint_on_ip(e, addr.ip()))
            .transpose()?;
        Self::start_with(engine, &own, 0, addr, model, block_size, true).await
    }

    async fn start_with(
        engine: &Engine,
        settings: &KvEventsSettings,
        index: usize,
        addr: SocketAddr,
        model: &str,
        block_size: usize,
        force_bind: bool,
    ) -> Result<Self, SimError> {
        let c = &settings.config;
        let pod_ip = settings.pod_ip.clone().unwrap_or_else(|| {
            if addr.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                addr.ip().to_string()
            }
        });
        let mut config = PublisherConfig::from_kv_events_config(
            c,
            format!("kv@{pod_ip}:{}@{model}", addr.port()),
            Encoder::new(settings.encoding),
        );
        config.endpoint = offset_endpoint(&config.endpoint, index)?;
        config.replay_endpoint = config
            .replay_endpoint
            .as_deref()
            .map(|e| offset_endpoint(e, index))
            .transpose()?;
        let topic = config.topic.clone();
        let started = if force_bind {
            Publisher::start_binding(config).await
        } else {
            Publisher::start(config).await
        };
        let (publisher, handle) =
            started.map_err(|e| SimError::InvalidConfig(format!("--kv-events-config: {e}")))?;
        let endpoint = publisher.endpoint().to_owned();
        let replay_endpoint = publisher.replay_endpoint().map(str::to_owned);
        let stats = handle.stats().clone();
        let lagged = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let publish = {
            let cancel = cancel.clone();
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                if let Err(e) = publisher.run(cancel).await {
                    tracing::error!(%endpoint, error = %e, "KV-event publisher stopped");
                }
            })
        };
        let bridge = tokio::spawn(bridge(
            engine.subscribe_kv_events(),
            handle,
            u32::try_from(block_size).unwrap_or(u32::MAX),
            i64::try_from(index).unwrap_or(i64::MAX),
            lagged.clone(),
            cancel.clone(),
        ));
        tracing::info!(%endpoint, replay = ?replay_endpoint, %topic, encoding = %settings.encoding, "publishing KV-cache events");
        Ok(Self {
            endpoint,
            replay_endpoint,
            topic,
            stats,
            lagged,
            cancel,
            tasks: vec![publish, bridge],
        })
    }

    /// The PUB endpoint (resolved when it binds).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay endpoint, if any.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// The topic of every message.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The publisher's counters (published, dropped on a full queue, replays).
    pub fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }

    /// Events the bridge missed because the engine's event ring overflowed.
    pub fn lagged(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }

    /// Stops both tasks.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for KvPublishing {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `tcp://<any host>:<port>` with the host replaced by `ip` (`sim --ip-per-replica`: replica i
/// binds its KV-event sockets on its own address, so every replica keeps the same port).
/// Endpoints that are not TCP are returned as they are.
pub fn endpoint_on_ip(endpoint: &str, ip: std::net::IpAddr) -> Result<String, SimError> {
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return Ok(endpoint.to_owned());
    };
    let (_, port) = rest.rsplit_once(':').ok_or_else(|| {
        SimError::InvalidConfig(format!("KV-event endpoint {endpoint:?}: no port"))
    })?;
    let host = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Ok(format!("tcp://{host}:{port}"))
}

/// vLLM's `offset_endpoint_port`: `inproc://x` becomes `inproc://x_dp<i>`, a TCP endpoint's
/// port grows by `i`; unchanged for replica 0 (and for port 0, which the OS picks).
pub fn offset_endpoint(endpoint: &str, index: usize) -> Result<String, SimError> {
    if index == 0 {
        return Ok(endpoint.to_owned());
    }
    if endpoint.contains("inproc") {
        return Ok(format!("{endpoint}_dp{index}"));
    }
    let bad =
        || SimError::InvalidConfig(format!("KV-event endpoint {endpoint:?}: no port to offset"));
    let (base, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Ok(endpoint.to_owned());
    }
    let port = usize::from(port)
        .checked_add(index)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(bad)?;
    Ok(format!("{base}:{port}"))
}

/// Turns the engine's events into batches until cancelled or the engine is gone.
async fn bridge(
    mut rx: broadcast::Receiver<KvEvent>,
    handle: PublisherHandle,
    block_size: u32,
    rank: i64,
    lagged: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            r = rx.recv() => r,
        };
        let mut events = Vec::new();
        match first {
            Ok(e) => push(&mut events, e, block_size),
            Err(broadcast::error::RecvError::Lagged(n)) => note_lag(&lagged, n),
            Err(broadcast::error::RecvError::Closed) => return,
        }
        // What is queued already: the rest of the step.
        while events.len() < MAX_EVENTS_PER_BATCH {
            match rx.try_recv() {
                Ok(e) => push(&mut events, e, block_size),
                Err(broadcast::error::TryRecvError::Lagged(n)) => note_lag(&lagged, n),
                Err(_) => break,
            }
        }
        if !events.is_empty() {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            handle.publish(EventBatch {
                ts,
                events,
                data_parallel_rank: Some(rank),
            });
        }
    }
}

fn note_lag(lagged: &AtomicU64, n: u64) {
    lagged.fetch_add(n, Ordering::Relaxed);
    tracing::warn!(
        missed = n,
        "KV-event bridge lagged behind the engine; events lost"
    );
}

/// Appends `e` to a batch being built, extending the last event when `e` continues it (a run
/// of one sequence's stored blocks, a run of evictions), as the publisher batches an engine
/// step. Public for the what-if, which feeds the EPP's index the batches a publisher would send.
pub fn push(events: &mut Vec<Event>, e: KvEvent, block_size: u32) {
    match e {
        KvEvent::BlockStored {
            hash,
            parent,
            token_ids,
            lora,
        } => push_stored(
            events,
            Medium::Gpu,
            hash,
            parent,
            token_ids,
            lora,
            block_size,
        ),
        KvEvent::OffloadStored {
            medium,
            hash,
            parent,
            lora,
        } => push_stored(events, medium, hash, parent, Vec::new(), lora, block_size),
        KvEvent::BlockRemoved { hash } => push_removed(events, Medium::Gpu, hash),
        KvEvent::OffloadRemoved { medium, hash } => push_removed(events, medium, hash),
        KvEvent::AllBlocksCleared => events.push(Event::AllBlocksCleared),
    }
}

fn push_stored(
    events: &mut Vec<Event>,
    medium: Medium,
    hash: u64,
    parent: Option<u64>,
    token_ids: Vec<u32>,
    lora: Option<String>,
    block_size: u32,
) {
    if let Some(Event::BlockStored(prev)) = events.last_mut()
        && parent.is_some()
        && prev.medium == medium
        && prev.block_hashes.last() == parent.as_ref()
        && prev.lora_name == lora
        && prev.block_hashes.len() < MAX_HASHES_PER_EVENT
        && prev.token_ids.len() + token_ids.len() <= MAX_TOKEN_IDS_PER_EVENT
    {
        prev.block_hashes.push(hash);
        prev.token_ids.extend(token_ids);
        return;
    }
    events.push(Event::BlockStored(BlockStored {
        block_hashes: vec![hash],
        parent_block_hash: parent,
        token_ids,
        block_size,
        lora_id: None,
        lora_name: lora,
        medium,
        group: None,
    }));
}

fn push_removed(events: &mut Vec<Event>, medium: Medium, hash: u64) {
    if let Some(Event::BlockRemoved(prev)) = events.last_mut()
        && prev.medium == medium
        && prev.block_hashes.len() < MAX_HASHES_PER_EVENT
    {
        prev.block_hashes.push(hash);
        return;
    }
    events.push(Event::BlockRemoved(BlockRemoved {
        block_hashes: vec![hash],
        medium,
        group_idx: None,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_endpoints_move_to_the_replica_ip() {
        let ip: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        assert_eq!(
            endpoint_on_ip("tcp://*:5557", ip).unwrap(),
            "tcp://127.0.0.3:5557"
        );
        assert_eq!(
            endpoint_on_ip("tcp://[::]:5558", ip).unwrap(),
            "tcp://127.0.0.3:5558"
        );
        assert_eq!(endpoint_on_ip("inproc://kv", ip).unwrap(), "inproc://kv");
        assert!(endpoint_on_ip("tcp://host", ip).is_err());
    }

    #[test]
    fn endpoints_offset_like_vllm() {
        assert_eq!(offset_endpoint("tcp://*:5557", 0).unwrap(), "tcp://*:5557");
        assert_eq!(offset_endpoint("tcp://*:5557", 2).unwrap(), "tcp://*:5559");
        assert_eq!(
            offset_endpoint("tcp://[::]:5557", 1).unwrap(),
            "tcp://[::]:5558"
        );
        assert_eq!(
            offset_endpoint("inproc://kv", 1).unwrap(),
            "inproc://kv_dp1"
        );
        assert_eq!(
            offset_endpoint("tcp://127.0.0.1:0", 3).unwrap(),
            "tcp://127.0.0.1:0"
        );
        assert!(offset_endpoint("tcp://*:65535", 1).is_err());
        assert!(offset_endpoint("tcp://host", 1).is_err());
    }

    #[test]
    fn runs_of_blocks_become_one_event_and_evictions_another() {
        let mut events = Vec::new();
        let stored = |hash, parent: Option<u64>| KvEvent::BlockStored {
            hash,
            parent,
            token_ids: vec![hash as u32; 2],
            lora: None,
        };
        push(&mut events, stored(1, None), 2);
        push(&mut events, stored(2, Some(1)), 2);
        push(&mut events, stored(3, Some(2)), 2);
        push(&mut events, stored(9, Some(7)), 2); // another sequence
        push(&mut events, KvEvent::BlockRemoved { hash: 4 }, 2);
        push(&mut events, KvEvent::BlockRemoved { hash: 5 }, 2);
        push(&mut events, KvEvent::AllBlocksCleared, 2);
        assert_eq!(events.len(), 4);
        let Event::BlockStored(run) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(run.block_hashes, [1, 2, 3]);
        assert_eq!(run.parent_block_hash, None);
        assert_eq!(run.token_ids, [1, 1, 2, 2, 3, 3]);
        assert_eq!((run.block_size, run.medium), (2, Medium::Gpu));
        assert!(matches!(&events[1], Event::BlockStored(b) if b.parent_block_hash == Some(7)));
        assert!(matches!(&events[2], Event::BlockRemoved(b) if b.block_hashes == [4, 5]));
        assert_eq!(events[3], Event::AllBlocksCleared);
    }

    #[test]
    fn tier_events_carry_their_medium_and_no_tokens() {
        let mut events = Vec::new();
        let cpu = |hash, parent| KvEvent::OffloadStored {
            medium: Medium::Cpu,
            hash,
            parent,
            lora: None,
        };
        push(&mut events, cpu(1, None), 16);
        push(&mut events, cpu(2, Some(1)), 16);
        // The same run in another tier is another event.
        push(
            &mut events,
            KvEvent::OffloadStored {
                medium: Medium::Remote,
                hash: 3,
                parent: Some(2),
                lora: None,
            },
            16,
        );
        push(&mut events, KvEvent::BlockRemoved { hash: 7 }, 16);
        push(
            &mut events,
            KvEvent::OffloadRemoved {
                medium: Medium::Cpu,
                hash: 8,
            },
            16,
        );
        assert_eq!(events.len(), 4);
        let Event::BlockStored(run) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(
            (run.block_hashes.as_slice(), run.medium),
            (&[1, 2][..], Medium::Cpu)
        );
        assert!(run.token_ids.is_empty());
        assert!(matches!(&events[1], Event::BlockStored(b) if b.medium == Medium::Remote));
        assert!(
            matches!(&events[2], Event::BlockRemoved(b) if b.medium == Medium::Gpu && b.block_hashes == [7])
        );
        assert!(
            matches!(&events[3], Event::BlockRemoved(b) if b.medium == Medium::Cpu && b.block_hashes == [8])
        );
    }
}
