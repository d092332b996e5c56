//! Speculative entries shared with peer EPPs (`precise-prefix-cache-scorer`'s
//! `speculativePublishEndpoint` and `speculativePeers`; the message is
//! [`endpoint_picker::kv_index::peers`]).
//!
//! [`publish`] binds a PUB socket and sends what the request path queued in the producer's
//! [`PeerOutbox`]; [`subscribe`] dials one peer and makes each of its messages speculative
//! entries in this EPP's index, for the endpoint of the pool at the message's address (an
//! address this EPP does not know is ignored). Both run under the supervisor; both sockets face
//! the network through the KV-event transport's frame guard, which also redials a lost peer.
//! A peer is trusted no further than its caps: a message is decoded with
//! [`decode`]'s bounds, and at most [`MAX_PEER_MESSAGES_PER_SECOND`] of one peer's messages
//! (and [`MAX_PEER_KEYS_PER_SECOND`] of its keys)
//! are applied per second (the rest are counted and dropped).
//!
//! A peer given by a DNS name rather than an IP address is followed by [`follow_name`]: the
//! name is resolved every [`PEER_RESOLVE_INTERVAL`] and each address it names is a peer of
//! its own, so one entry can name every EPP of a Kubernetes Deployment through a headless
//! Service, as EPP pods come and go. An address that is this EPP's own publisher is skipped,
//! so every replica can share one configuration that names them all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use endpoint_picker::datastore::Datastore;
use endpoint_picker::kv_index::SharedKvIndex;
use endpoint_picker::kv_index::peers::{MAX_PEER_MESSAGE_BYTES, PeerOutbox, decode, encode};
use kv_events::TcpEndpoint;
use kv_events::transport::{FramePub, FrameSub};
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kv_events::{KvEventMetrics, PeerOutcome};

/// One peer's messages applied per second, at most: far above what one EPP routes.
pub const MAX_PEER_MESSAGES_PER_SECOND: u32 = 20_000;
/// One peer's keys applied per second, at most: an EPP routing 1,000 requests a second with
/// 1,000-block prompts. Each key is an insert under the index's write lock, which the request
/// path also takes: a peer sending its messages at the message cap, each at
/// [`MAX_PEER_KEYS`](endpoint_picker::kv_index::peers::MAX_PEER_KEYS), would otherwise ask
/// for 82 million a second.
pub const MAX_PEER_KEYS_PER_SECOND: usize = 1_000_000;
/// First wait before dialing a peer again after its socket failed (doubling to 5 s).
const RETRY: Duration = Duration::from_millis(250);
/// How often a peer named by a DNS name is resolved again.
pub const PEER_RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long one resolution may take before it counts as failed (the addresses followed so far
/// are kept).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses of one peer name followed, at most: the DNS answer is not this EPP's to trust
/// (as many as `speculativePeers` may list).
pub const MAX_ADDRESSES_PER_PEER_NAME: usize = 64;
/// Peer addresses followed over all of `speculativePeers`, at most: each is a socket, a relay
/// and a task, and 64 names of 64 addresses each would make 4,096. The names share what the
/// addresses listed as such leave (`per_name_cap`).
pub const MAX_PEER_ADDRESSES: usize = 256;

/// Addresses each of `names` peer names may follow when `addresses` peers are given as IP
/// addresses: an equal share of what [`MAX_PEER_ADDRESSES`] leaves, at least one, at most
/// [`MAX_ADDRESSES_PER_PEER_NAME`].
fn per_name_cap(names: usize, addresses: usize) -> usize {
    if names == 0 {
        return 0;
    }
    (MAX_PEER_ADDRESSES.saturating_sub(addresses) / names).clamp(1, MAX_ADDRESSES_PER_PEER_NAME)
}

fn count(metrics: &KvEventMetrics, outcome: &'static str, n: u64) {
    if n > 0 {
        metrics
            .peer_messages
            .get_or_create(&PeerOutcome { outcome })
            .inc_by(n);
    }
}

/// Publishes the outbox's messages at `endpoint` until `token` fires. A failed bind ends the
/// task (the supervisor starts it again after its backoff).
pub async fn publish(
    endpoint: String,
    outbox: Arc<PeerOutbox>,
    metrics: Arc<KvEventMetrics>,
    token: CancellationToken,
) {
    let mut rx = outbox.attach();
    let mut socket = match FramePub::bind(&endpoint).await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%endpoint, %error, "speculative peers: cannot bind the publisher");
            return;
        }
    };
    tracing::info!(
        endpoint = socket.endpoint(),
        "speculative peers: publishing"
    );
    // What the request path dropped so far (taken, so that a restart does not count it twice).
    count(
        &metrics,
        "queue_full",
        outbox.dropped.swap(0, Ordering::Relaxed),
    );
    loop {
        let msg = tokio::select! {
            () = token.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        count(
            &metrics,
            "queue_full",
            outbox.dropped.swap(0, Ordering::Relaxed),
        );
        match socket.send(encode(&msg)).await {
            Ok(()) => count(&metrics, "sent", 1),
            Err(error) => {
                count(&metrics, "send_error", 1);
                tracing::debug!(%error, "speculative peers: send failed");
            }
        }
    }
}

/// [`subscribe`] to every peer given by an address, and [`follow_name`] every peer given by a
/// DNS name, until `token` fires. `publish`: this EPP's own `speculativePublishEndpoint`.
pub async fn subscribe_all(
    endpoints: Vec<String>,
    publish: Option<String>,
    datastore: Arc<Datastore>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    token: CancellationToken,
) {
    let own = publish.as_deref().and_then(published_address);
    let endpoints: Vec<_> = endpoints.into_iter().map(|e| (dns_name(&e), e)).collect();
    let names = endpoints.iter().filter(|(name, _)| name.is_some()).count();
    let cap = per_name_cap(names, endpoints.len() - names);
    let start = |i: usize| -> PeerTask {
        let (name, endpoint) = &endpoints[i];
        match name {
            Some((host, port)) => Box::pin(follow_name(
                host.clone(),
                *port,
                cap,
                own,
                datastore.clone(),
                index.clone(),
                metrics.clone(),
                token.clone(),
            )),
            None => Box::pin(subscribe(
                endpoint.clone(),
                datastore.clone(),
                index.clone(),
                metrics.clone(),
                token.clone(),
            )),
        }
    };
    supervise(endpoints.len(), &token, start).await;
}

/// One peer's task (an address's subscriber, or a name's follower).
type PeerTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs `start(i)` for each of `peers` until `token` fires, and until they end. One that fails
/// (a panic: they return only when stopped) is started again after [`PEER_RESOLVE_INTERVAL`],
/// as [`follow_name`] starts a failed address's subscriber again at its next resolution:
/// otherwise that peer would be lost until every other one ended too and the supervisor
/// restarted the whole task. The wait keeps a subscriber that fails at once from spinning.
async fn supervise<F, Fut>(peers: usize, token: &CancellationToken, start: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    let mut which: HashMap<tokio::task::Id, usize> = HashMap::new();
    for i in 0..peers {
        which.insert(tasks.spawn(start(i)).id(), i);
    }
    while let Some(done) = tasks.join_next_with_id().await {
        let (id, error) = match done {
            Ok((id, ())) => (id, None),
            Err(error) => (error.id(), Some(error)),
        };
        let Some(i) = which.remove(&id) else { continue };
        let Some(error) = error else { continue };
        if token.is_cancelled() {
            continue;
        }
        tracing::warn!(peer = i, %error, "speculative peers: a peer's task failed; starting it again in {PEER_RESOLVE_INTERVAL:?}");
        let (again, token) = (start(i), token.clone());
        let task = tasks.spawn(async move {
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(PEER_RESOLVE_INTERVAL) => {}
            }
            again.await;
        });
        which.insert(task.id(), i);
    }
}

/// The host and port of a `tcp://<host>:<port>` endpoint whose host is a name, not an IP
/// address (`None` for an address, `*` or anything else).
fn dns_name(endpoint: &str) -> Option<(String, u16)> {
    let parsed = TcpEndpoint::parse(endpoint).ok()?;
    Some((parsed.name()?.to_owned(), parsed.port))
}

/// The address this EPP publishes at: `*` and names are the unspecified address (any of this
/// host's), with the port.
fn published_address(endpoint: &str) -> Option<SocketAddr> {
    let parsed = TcpEndpoint::parse(endpoint).ok()?;
    Some(parsed.socket_address().unwrap_or(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        parsed.port,
    )))
}

/// Whether `addr` is where this EPP publishes (`own`): the same address, or, for a publisher
/// bound to every address, the same port on an address of this host. An address of this host
/// is one a socket aimed at it would be sent from (a UDP `connect` sends nothing).
fn is_own(addr: SocketAddr, own: Option<SocketAddr>) -> bool {
    let Some(own) = own else { return false };
    if addr.port() != own.port() {
        return false;
    }
    if !own.ip().is_unspecified() {
        return addr == own;
    }
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| {
            s.connect(addr)?;
            s.local_addr()
        })
        .is_ok_and(|local| local.ip() == addr.ip())
}

/// What one DNS answer changes in the addresses followed (see [`changes`]).
#[derive(Debug, PartialEq, Eq)]
struct Changes {
    /// New in the answer: to start following.
    start: Vec<SocketAddr>,
    /// Gone from it: to stop following.
    stop: Vec<SocketAddr>,
    /// Addresses of the answer past the name's cap, not followed.
    beyond_cap: usize,
}

/// What one DNS answer changes in the addresses followed: this EPP's own is skipped, and the
/// first `cap` in address order are kept (the same ones on every resolution of the same
/// answer).
fn changes<T>(
    followed: &BTreeMap<SocketAddr, T>,
    answer: impl IntoIterator<Item = SocketAddr>,
    own: Option<SocketAddr>,
    cap: usize,
) -> Changes {
    let mut now: BTreeSet<SocketAddr> = answer.into_iter().filter(|a| !is_own(*a, own)).collect();
    let beyond_cap = now.len().saturating_sub(cap);
    while now.len() > cap {
        now.pop_last();
    }
    Changes {
        start: now
            .iter()
            .filter(|a| !followed.contains_key(a))
            .copied()
            .collect(),
        stop: followed
            .keys()
            .filter(|a| !now.contains(a))
            .copied()
            .collect(),
        beyond_cap,
    }
}

/// Follows the peers `host` names: resolves it every [`PEER_RESOLVE_INTERVAL`], [`subscribe`]s
/// to each address it names (at most `cap`, this EPP's own skipped)
/// and stops following those it no longer names, until `token` fires. A failed resolution
/// keeps the addresses followed so far; a subscriber that failed (panicked) is forgotten, so
/// that the next answer naming its address starts it again.
#[allow(clippy::too_many_arguments)] // one task's whole context, passed once at its spawn
pub async fn follow_name(
    host: String,
    port: u16,
    cap: usize,
    own: Option<SocketAddr>,
    datastore: Arc<Datastore>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    token: CancellationToken,
) {
    // Each followed address with the generation of its subscriber (a returning address gets
    // a new one), and each subscriber task's address and generation.
    let mut followed: BTreeMap<SocketAddr, (u64, CancellationToken)> = BTreeMap::new();
    let mut subscribers: HashMap<tokio::task::Id, (SocketAddr, u64)> = HashMap::new();
    let mut generation = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let resolved = tokio::select! {
            () = token.cancelled() => break,
            r = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), port))) => r,
        };
        match resolved {
            Ok(Ok(answer)) => {
                let Changes {
                    start,
                    stop,
                    beyond_cap,
                } = changes(&followed, answer, own, cap);
                if beyond_cap > 0 {
                    tracing::warn!(
                        %host,
                        cap,
                        beyond_cap,
                        "speculative peers: more addresses than this name may follow; the highest are not followed"
                    );
                }
                for addr in stop {
                    tracing::info!(%host, %addr, "speculative peers: address gone");
                    if let Some((_, peer)) = followed.remove(&addr) {
                        peer.cancel();
                    }
                }
                for addr in start {
                    generation += 1;
                    let peer = token.child_token();
                    followed.insert(addr, (generation, peer.clone()));
                    let task = tasks.spawn(subscribe(
                        format!("tcp://{addr}"),
                        datastore.clone(),
                        index.clone(),
                        metrics.clone(),
                        peer,
                    ));
                    subscribers.insert(task.id(), (addr, generation));
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%host, %error, "speculative peers: cannot resolve");
            }
            Err(_) => tracing::warn!(%host, "speculative peers: resolving timed out"),
        }
        while let Some(done) = tasks.try_join_next_with_id() {
            let id = match &done {
                Ok((id, ())) => *id,
                Err(error) => error.id(),
            };
            let Some((addr, generation)) = subscribers.remove(&id) else {
                continue;
            };
            if let Err(error) = done
                && followed.get(&addr).is_some_and(|f| f.0 == generation)
            {
                tracing::warn!(%host, %addr, %error, "speculative peers: subscriber failed");
                followed.remove(&addr);
            }
        }
        tokio::select! {
            () = token.cancelled() => break,
            () = tokio::time::sleep(PEER_RESOLVE_INTERVAL) => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Counts one peer subscription in `inference_extension_speculation_peers_followed` from its
/// first connection until it ends (stopped, or its peer lost for good), however its loop ends.
/// A subscription whose peer is unreachable for a while still counts: the socket redials by
/// itself and does not report the loss.
struct Connected<'a>(&'a Gauge);

impl<'a> Connected<'a> {
    fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Applies peer `endpoint`'s messages to `index` until `token` fires.
pub async fn subscribe(
    endpoint: String,
    datastore: Arc<Datastore>,
    index: Arc<SharedKvIndex>,
    metrics: Arc<KvEventMetrics>,
    token: CancellationToken,
) {
    let mut retry = RETRY;
    loop {
        let opened = tokio::select! {
            () = token.cancelled() => return,
            s = FrameSub::connect(&endpoint, MAX_PEER_MESSAGE_BYTES as u64) => s,
        };
        match opened {
            Ok(mut sub) => {
                tracing::info!(%endpoint, "speculative peers: subscribed");
                let _connected = Connected::new(&metrics.peers_followed);
                retry = RETRY;
                let mut rate = PeerRate::new(Instant::now());
                loop {
                    let frame = tokio::select! {
                        () = token.cancelled() => return,
                        f = sub.recv() => f,
                    };
                    match frame {
                        Ok(Some(frame)) => {
                            apply(
                                &frame,
                                &datastore,
                                &index,
                                &metrics,
                                Instant::now(),
                                &mut rate,
                            );
                        }
                        Ok(None) => count(&metrics, "decode", 1),
                        Err(error) => {
                            tracing::warn!(%endpoint, %error, "speculative peers: peer lost");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%endpoint, %error, "speculative peers: cannot dial");
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}

/// What one peer may still have applied in the current second (a window restarted by the
/// first message a second or more after the last restart).
#[derive(Debug)]
pub struct PeerRate {
    since: Instant,
    messages: u32,
    keys: usize,
}

impl PeerRate {
    /// A fresh window from `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            since: now,
            messages: 0,
            keys: 0,
        }
    }

    /// Whether a message of `keys` keys at `now` stays within [`MAX_PEER_MESSAGES_PER_SECOND`]
    /// and [`MAX_PEER_KEYS_PER_SECOND`] (counted only if it does).
    fn admit(&mut self, now: Instant, keys: usize) -> bool {
        if now.duration_since(self.since) >= Duration::from_secs(1) {
            *self = Self::new(now);
        }
        if self.messages >= MAX_PEER_MESSAGES_PER_SECOND
            || self.keys.saturating_add(keys) > MAX_PEER_KEYS_PER_SECOND
        {
            return false;
        }
        self.messages += 1;
        self.keys += keys;
        true
    }
}

/// One peer message into the index: speculative entries for the endpoint it names, if the
/// peer's `rate` allows them.
pub fn apply(
    frame: &[u8],
    datastore: &Datastore,
    index: &SharedKvIndex,
    metrics: &KvEventMetrics,
    now: Instant,
    rate: &mut PeerRate,
) {
    let msg = match decode(frame) {
        Ok(m) => m,
        Err(error) => {
            count(metrics, "decode", 1);
            tracing::debug!(%error, "speculative peers: message refused");
            return;
        }
    };
    if !rate.admit(now, msg.keys.len()) {
        count(metrics, "rate", 1);
        return;
    }
    let Some(id) = datastore.snapshot().by_address(&msg.endpoint).map(|e| e.id) else {
        count(metrics, "unknown_endpoint", 1);
        return;
    };
    index.speculate(id, &msg.keys, now);
    count(metrics, "applied", 1);
}

#[cfg(test)]
mod tests;
