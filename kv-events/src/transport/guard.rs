//! A ZMTP frame guard between zmq.rs and the network, for the subscribing side.
//!
//! zmq.rs reserves a frame's announced length before reading it and has no message-size limit
//! (no `ZMQ_MAXMSGSIZE`): ten bytes after the greeting, a frame header announcing 2^50 bytes,
//! and the process aborts on the allocation (measured against the simulator: "memory
//! allocation of 1125899906908169 bytes failed"). A subscriber's sockets therefore never face
//! the network themselves: each TCP connection runs through a relay on loopback that reads the
//! peer's ZMTP 3 stream — the 64-byte greeting, then frames (a flags byte, a 1- or 8-byte
//! length, the body) — and cuts the connection at a frame over [`MAX_FRAME_BYTES`], a message of
//! more than [`MAX_FRAMES_PER_MESSAGE`] frames or over [`MAX_MESSAGE_BYTES`], or reserved flag
//! bits. What the local socket sends goes out unchanged. zmq.rs then reconnects (SUB) or the
//! exchange fails (replay), as for any lost peer.
//!
//! zmq.rs also keeps a message's frames until its last one arrives, so what a peer makes it
//! hold is its unfinished message, whatever the peer's pace. A guard charges each frame's
//! announced length when it passes the header on (when zmq.rs reserves it) and gives it back
//! once the message's last frame is through or the connection ends: its connections together
//! hold at most [`MAX_UNFINISHED_BYTES`], those of one IP [`MAX_UNFINISHED_BYTES_PER_IP`]; a
//! frame that would pass either cuts its connection. One IP has at most
//! [`MAX_CONNECTIONS_PER_IP`] connections open, all peers [`MAX_CONNECTIONS`]; more are closed
//! on accept. Every cut and refusal is counted in [`GuardStats`].
//!
//! A guard also knows what zmq.rs hides: which peers are connected. zmq.rs's SUB socket dials
//! again by itself, forever and silently, and its socket monitor would only see the loopback
//! connection to the guard; the guard sees the peer's own TCP connection open and close, and
//! reports it in [`Peers`] (see [`super::Subscriber::peers`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{TransportError, zmq_error};

/// Bytes in one frame from a peer, at most. A frame is a batch's payload (or a topic, a
/// sequence number, a replay request). vLLM sends one batch per engine step, and the largest
/// legitimate one is a long prefill's: each full block stored in the step is announced with its
/// tokens, at most 5 bytes each in msgpack (ids up to 2^32; 3 bytes below 65,536), and its hash,
/// 34 bytes (a 32-byte sha256 as msgpack bin; an integer hash is 9 at most): with 16-token
/// blocks 16 × 5 + 34 = 114 bytes a block, 7.1 bytes a token. A 128k-token prefill stored in
/// one step is 131,072 × 7.1 ≈ 0.9 MiB; the same step's evictions (`BlockRemoved`, 34 bytes a
/// block) and CPU-offload copies (hash-only `BlockStored`) add 0.27 MiB each: about 1.5 MiB.
/// 8 MiB leaves five times that (some 700k tokens stored in one step), and bounds what one
/// peer makes the subscriber hold per frame to an eighth of the former 64 MiB.
pub const MAX_FRAME_BYTES: u64 = 8 * 1024 * 1024;
/// Frames in one message from a peer, at most (vLLM's have 3; a replay answer 3 after the
/// envelope).
pub const MAX_FRAMES_PER_MESSAGE: usize = 8;
/// Bytes of one message from a peer, its frames together, at most: one payload at
/// [`MAX_FRAME_BYTES`] and 4 KiB for the rest (8 MiB + 4 KiB). A legitimate message has one
/// payload beside small frames — `[topic, seq, payload]` (a topic is at most 512 bytes,
/// [`crate::topic::MAX_TOPIC_BYTES`]; a sequence number 8), a replay answer `["", seq,
/// payload]`, a replay request `["", seq]` — and the other seven frames a message may have
/// would, at a topic's 512 bytes each, be 3.5 KiB. Without it, seven frames at the frame cap
/// marked "more" and never finished made zmq.rs hold 56 MiB per connection.
pub const MAX_MESSAGE_BYTES: u64 = MAX_FRAME_BYTES + 4 * 1024;

/// Messages one subscriber may send a publisher's guard over one connection, at most: a
/// subscriber sends a publisher only subscriptions and cancellations (`0x01`/`0x00` and a topic
/// prefix), one per topic filter, and zmq.rs's PUB keeps every subscription it is sent,
/// duplicates included, for the connection's life. The EPP subscribes once; 64 leaves room for
/// a tool that follows a few topics and resubscribes.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: u64 = 64;
/// How long a peer may leave bytes sent to it unread, at most, before its connection is cut:
/// 10 s. A subscriber that stops reading (stuck, or hostile) would otherwise make zmq.rs's PUB
/// queue up to 100,000 messages for it (its fixed high-water mark), each holding its payload:
/// gigabytes of a publisher's memory at the peers' message sizes. Cut, the subscriber
/// reconnects and misses what it missed anyway.
pub const MAX_WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(10);
/// Bytes zmq.rs sent a peer that the guard holds for it, not yet written, at most: 4 MiB. The
/// guard reads zmq.rs's side as soon as it can, so zmq.rs's own queue for the peer (up to
/// 100,000 messages, each pinning its payload) never grows; a peer that reads, but slower than
/// it is sent to, fills this instead and is cut, where the stall rule alone let a peer reading
/// a couple of kilobytes a second hold zmq.rs's whole queue.
pub const MAX_PEER_BACKLOG_BYTES: usize = 4 << 20;
/// Subscribers a publisher's guard serves at once: its subscribers are the other EPP replicas
/// (and a tool or two), and each may hold [`MAX_PEER_BACKLOG_BYTES`].
pub const MAX_SUBSCRIBER_CONNECTIONS: usize = 64;
/// Subscribers a publisher's guard serves from one IP at once.
pub const MAX_SUBSCRIBER_CONNECTIONS_PER_IP: usize = 8;
/// Bytes in one frame a subscriber sends a publisher's guard, at most: a subscription is one
/// byte and a topic prefix (at most [`crate::topic::MAX_TOPIC_BYTES`]); a command (the
/// handshake's READY with its metadata, a heartbeat) is a few hundred bytes.
pub const MAX_SUBSCRIBER_FRAME_BYTES: u64 = 1024;

/// Connections one guard relays at once, at most (a central subscriber's engines; more are
/// closed on accept).
pub const MAX_CONNECTIONS: usize = 4_096;
/// Connections from one IP one guard relays at once, at most: 256, a sixteenth of
/// [`MAX_CONNECTIONS`], so that one host cannot take the slots of every engine (more are closed
/// on accept). An engine opens one per data-parallel rank publishing (a node's 8 GPUs at most),
/// plus the ones a redial overlaps; the room above is for engines behind a proxy, which all
/// show under the proxy's IP: more than 256 of them behind one need a second subscriber.
pub const MAX_CONNECTIONS_PER_IP: usize = 256;

/// How long a message may take from its first frame's header to its last frame's end (and a
/// command frame from its header to its end): past it the connection is cut, and what it held
/// of the unfinished-bytes budget comes back. A batch crosses a pod network in milliseconds (the
/// largest, 8 MiB, at 1 MB/s); a peer that trickles a large frame for ever would otherwise hold
/// its share of [`MAX_UNFINISHED_BYTES`] for ever, and a few such peers all of it, cutting every
/// honest engine's next frame as over the budget.
pub const MAX_MESSAGE_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes in unfinished messages that one guard's connections make zmq.rs hold together, at
/// most: sixteen messages at [`MAX_MESSAGE_BYTES`], 128 MiB + 64 KiB (beside the subscribers'
/// 256 MiB of queued batches and an index of some 1.9 GiB, within the EPP pod's 4 GiB). A
/// legitimate message is unfinished only while it crosses the wire — zmq.rs reads its peers
/// whenever the subscriber waits for a message, which it does but while it decodes one batch —
/// so the engines' unfinished bytes at any moment are a few MiB even at a thousand engines (the
/// largest legitimate batch is about 1.5 MiB, see [`MAX_FRAME_BYTES`]). A frame that would pass
/// it cuts its connection rather than wait: waiting could deadlock connections that each hold
/// part of a message, and would show a stalled engine as connected. The charge ends when the
/// guard has written a message's last byte to zmq.rs's loopback socket, not when zmq.rs has read
/// it: until the SUB socket's next read of that peer, a finished message may still lie partly in
/// zmq.rs's decoder, uncharged (one per connection at most, and only between two reads). Per
/// budget: a guard has its own unless given an [`UnfinishedBudget`] to share (the EPP gives
/// every subscriber the same one, so pod mode's guards, one per engine, share it).
pub const MAX_UNFINISHED_BYTES: u64 = 16 * MAX_MESSAGE_BYTES;
/// Bytes in unfinished messages the connections of one IP make zmq.rs hold together, at most:
/// two messages at [`MAX_MESSAGE_BYTES`], 16 MiB + 8 KiB (an engine's ranks sharing the pod's
/// IP may be inside ten of the largest legitimate batches at once). A peer holding messages
/// open can thus take an eighth of [`MAX_UNFINISHED_BYTES`], not all of it.
pub const MAX_UNFINISHED_BYTES_PER_IP: u64 = 2 * MAX_MESSAGE_BYTES;

/// IPs [`Peers`] remembers with no connection open, at most (past it, they are forgotten).
pub const MAX_REMEMBERED_PEERS: usize = 16_384;
/// Silence on a peer connection before TCP keepalive probes it. An engine idles silently (vLLM
/// publishes nothing then), so silence cannot end a connection; but a peer that vanished
/// without closing (its node lost, a partition) would otherwise hold the connection open for
/// good: its stream would stay live in the EPP and its slot taken in the caps above. With
/// these settings it is found dead within [`KEEPALIVE_IDLE`] + [`KEEPALIVE_PROBES`] ×
/// [`KEEPALIVE_INTERVAL`] (one minute) of its last byte.
pub const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Between two unanswered keepalive probes.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Unanswered probes after which the connection is dropped.
pub const KEEPALIVE_PROBES: u32 = 3;

const GREETING_BYTES: usize = 64;
/// How long a peer may take to send its greeting once connected: ZMTP peers send it at once,
/// and a connection that stays silent would otherwise hold one of the guard's slots (and of
/// its IP's) for as long as its host answers TCP keepalive.
pub const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

/// A guard's caps; [`Limits::default`] is the documented constants (tests use smaller ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) frame_bytes: u64,
    pub(crate) frames_per_message: usize,
    pub(crate) message_bytes: u64,
    pub(crate) connections: usize,
    pub(crate) connections_per_ip: usize,
    pub(crate) unfinished_bytes: u64,
    pub(crate) unfinished_bytes_per_ip: u64,
    /// Messages (not commands) over one connection, at most.
    pub(crate) messages_per_connection: u64,
    /// How long the peer may leave what zmq.rs sends it unread before it is cut.
    pub(crate) write_stall: std::time::Duration,
    /// Bytes zmq.rs sent the peer that the guard holds, not yet written, at most: past it the
    /// peer is cut ([`MAX_PEER_BACKLOG_BYTES`]).
    pub(crate) backlog_bytes: usize,
    /// How long an unfinished message (or a command frame) may hold its bytes
    /// ([`MAX_MESSAGE_TIME`]).
    pub(crate) message_time: std::time::Duration,
}

impl Limits {
    /// For a guard in front of a PUB socket, whose peers are subscribers: one-frame messages
    /// of [`MAX_SUBSCRIBER_FRAME_BYTES`] at most, and [`MAX_SUBSCRIPTIONS_PER_CONNECTION`] of
    /// them per connection.
    pub(crate) fn facing_subscribers() -> Self {
        Self {
            frame_bytes: MAX_SUBSCRIBER_FRAME_BYTES,
            frames_per_message: 1,
            message_bytes: MAX_SUBSCRIBER_FRAME_BYTES,
            messages_per_connection: MAX_SUBSCRIPTIONS_PER_CONNECTION,
            connections: MAX_SUBSCRIBER_CONNECTIONS,
            connections_per_ip: MAX_SUBSCRIBER_CONNECTIONS_PER_IP,
            ..Self::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frame_bytes: MAX_FRAME_BYTES,
            frames_per_message: MAX_FRAMES_PER_MESSAGE,
            message_bytes: MAX_MESSAGE_BYTES,
            connections: MAX_CONNECTIONS,
            connections_per_ip: MAX_CONNECTIONS_PER_IP,
            unfinished_bytes: MAX_UNFINISHED_BYTES,
            unfinished_bytes_per_ip: MAX_UNFINISHED_BYTES_PER_IP,
            messages_per_connection: u64::MAX,
            write_stall: MAX_WRITE_STALL,
            backlog_bytes: MAX_PEER_BACKLOG_BYTES,
            message_time: MAX_MESSAGE_TIME,
        }
    }
}

/// A guard's counters (monotonic): the connections it cut or refused, and the dials of an
/// unreachable peer.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Dials of the peer that failed, by a connecting guard (it dials again, backing off from
    /// [`REDIAL_FIRST`] to [`REDIAL_MAX`]): an engine down or not yet listening.
    pub dials_failed: AtomicU64,
    /// Connections cut for breaking a rule of the stream: a frame over [`MAX_FRAME_BYTES`], a
    /// message over [`MAX_MESSAGE_BYTES`] or [`MAX_FRAMES_PER_MESSAGE`], reserved flag bits, a
    /// greeting that is not ZMTP 3.
    pub cut_off: AtomicU64,
    /// Connections cut because a frame would have passed [`MAX_UNFINISHED_BYTES`] (the guard's
    /// connections together) or [`MAX_UNFINISHED_BYTES_PER_IP`] (its IP's).
    pub over_budget: AtomicU64,
    /// Connections closed on accept: [`MAX_CONNECTIONS`] or, from their IP,
    /// [`MAX_CONNECTIONS_PER_IP`] open already.
    pub refused: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The peers a guarded socket is connected with, by IP: how many connections each has open now.
/// An IP once seen stays listed (at 0) after its last connection closed, so that "connected
/// once and gone" differs from "never seen" (a peer behind a proxy shows under the proxy's IP,
/// and the engine's own IP is then never seen).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers {
    tracked: bool,
    open: HashMap<IpAddr, u32>,
}

impl Peers {
    /// Whether connections are tracked at all (a TCP endpoint; `ipc://` is not guarded).
    pub fn is_tracked(&self) -> bool {
        self.tracked
    }

    /// Whether `ip` has a connection open now; `None` when connections are not tracked or `ip`
    /// never connected.
    pub fn connected(&self, ip: IpAddr) -> Option<bool> {
        if !self.tracked {
            return None;
        }
        self.open.get(&ip.to_canonical()).map(|&n| n > 0)
    }

    /// Connections open now, over every peer.
    pub fn open_connections(&self) -> u64 {
        self.open.values().map(|&n| u64::from(n)).sum()
    }

    fn opened(&mut self, ip: IpAddr) {
        if self.open.len() >= MAX_REMEMBERED_PEERS {
            self.open.retain(|_, n| *n > 0);
        }
        *self.open.entry(ip).or_insert(0) += 1;
    }

    fn closed(&mut self, ip: IpAddr) {
        if let Some(n) = self.open.get_mut(&ip) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Where a guard reports: its peers (when someone watches them) and its counters; and the
/// budget it charges, when it shares one.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    pub(crate) peers: Option<watch::Sender<Peers>>,
    pub(crate) stats: Arc<GuardStats>,
    pub(crate) budget: Option<UnfinishedBudget>,
}

/// A budget of unfinished messages that several guards charge together: at most
/// [`MAX_UNFINISHED_BYTES`] over all of them, [`MAX_UNFINISHED_BYTES_PER_IP`] and
/// [`MAX_CONNECTIONS_PER_IP`] connections per peer IP. Pod mode runs one subscriber, so one
/// guard, per engine; without a shared budget what they may hold grows with the number of
/// engines (16 MiB + 8 KiB each), with one it is bounded for the process. A peer over it is cut
/// (its endpoint falls back to the approximate index), never waited for.
#[derive(Debug, Clone)]
pub struct UnfinishedBudget(Arc<Budget>);

impl Default for UnfinishedBudget {
    fn default() -> Self {
        Self(Budget::new(Limits::default()))
    }
}

impl UnfinishedBudget {
    #[cfg(test)]
    pub(crate) fn with_limits(limits: Limits) -> Self {
        Self(Budget::new(limits))
    }

    /// The guard's budget: the shared one, or one of its own under `limits`.
    fn for_guard(shared: Option<&Self>, limits: Limits) -> Arc<Budget> {
        shared.map_or_else(|| Budget::new(limits), |b| b.0.clone())
    }
}

/// One relayed connection, counted in [`Peers`] while it lives (dropping it, also when the
/// guard's task is aborted, counts it closed).
struct Counted {
    peers: Option<watch::Sender<Peers>>,
    ip: IpAddr,
}

impl Counted {
    fn open(peers: &Option<watch::Sender<Peers>>, ip: IpAddr) -> Self {
        let ip = ip.to_canonical();
        if let Some(r) = peers {
            r.send_modify(|p| p.opened(ip));
        }
        Self {
            peers: peers.clone(),
            ip,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(r) = &self.peers {
            r.send_modify(|p| p.closed(self.ip));
        }
    }
}

fn track(report: &Report) {
    if let Some(r) = &report.peers {
        r.send_if_modified(|p| !std::mem::replace(&mut p.tracked, true));
    }
}

/// What one guard's connections hold together: connections and unfinished bytes per IP, and
/// unfinished bytes over all. Only IPs with a connection open are listed, so it has at most
/// [`MAX_CONNECTIONS`] entries.
#[derive(Debug)]
pub(crate) struct Budget {
    limits: Limits,
    state: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    unfinished: u64,
    by_ip: HashMap<IpAddr, IpUse>,
}

#[derive(Debug, Default)]
struct IpUse {
    connections: usize,
    unfinished: u64,
}

/// Why a connection was cut.
#[derive(Debug, thiserror::Error)]
enum Cut {
    /// The peer broke a rule of the stream.
    #[error("{0}")]
    Rule(&'static str),
    /// The peer's frame would have passed an unfinished-bytes budget.
    #[error("{0}")]
    Budget(&'static str),
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Budget {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(BudgetState::default()),
        })
    }

    /// A lease for a connection from `ip`, or `None` when `ip` has
    /// [`Limits::connections_per_ip`] open already.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Lease> {
        let ip = ip.to_canonical();
        let mut state = self.state.lock();
        let used = state.by_ip.entry(ip).or_default();
        if used.connections >= self.limits.connections_per_ip {
            return None;
        }
        used.connections += 1;
        Some(Lease {
            budget: self.clone(),
            ip,
            held: 0,
        })
    }
}

/// A connection's share of its guard's [`Budget`]: the bytes of its unfinished message, given
/// back as the message ends and, with the connection's slot, when it is dropped.
#[derive(Debug)]
struct Lease {
    budget: Arc<Budget>,
    ip: IpAddr,
    held: u64,
}

impl Lease {
    /// Charges `bytes` more, or refuses when the guard's or the IP's budget would be passed.
    fn charge(&mut self, bytes: u64) -> Result<(), Cut> {
        let limits = self.budget.limits;
        let mut state = self.budget.state.lock();
        let total = state.unfinished.saturating_add(bytes);
        if total > limits.unfinished_bytes {
            return Err(Cut::Budget("unfinished messages over the guard's budget"));
        }
        let used = state.by_ip.entry(self.ip).or_default();
        let own = used.unfinished.saturating_add(bytes);
        if own > limits.unfinished_bytes_per_ip {
            return Err(Cut::Budget("unfinished messages over the peer's budget"));
        }
        used.unfinished = own;
        state.unfinished = total;
        self.held += bytes;
        Ok(())
    }

    /// Gives `bytes` back (at most what is held).
    fn release(&mut self, bytes: u64) {
        let bytes = bytes.min(self.held);
        self.held -= bytes;
        let mut state = self.budget.state.lock();
        state.unfinished = state.unfinished.saturating_sub(bytes);
        if let Some(used) = state.by_ip.get_mut(&self.ip) {
            used.unfinished = used.unfinished.saturating_sub(bytes);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock();
        state.unfinished = state.unfinished.saturating_sub(self.held);
        if let Some(used) = state.by_ip.get_mut(&self.ip) {
            used.unfinished = used.unfinished.saturating_sub(self.held);
            used.connections = used.connections.saturating_sub(1);
            if used.connections == 0 {
                state.by_ip.remove(&self.ip);
            }
        }
    }
}

/// A running guard; dropping it stops the relays.
#[derive(Debug)]
pub(crate) struct Guard {
    /// Where the local zmq.rs socket connects (`tcp://127.0.0.1:<port>`).
    pub(crate) local_endpoint: String,
    task: JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A guard for a socket that connects: the local socket connects to the guard's loopback
/// port, and each of its connections is relayed to `remote` (`tcp://host:port`), counted in
/// `report` while the remote end is connected.
pub(crate) async fn connecting(remote: &str, report: Report) -> io::Result<Guard> {
    connecting_with(remote, report, Limits::default()).await
}

async fn connecting_with(remote: &str, report: Report, limits: Limits) -> io::Result<Guard> {
    let target = tcp_address(remote)?;
    track(&report);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let local_endpoint = format!("tcp://{}", listener.local_addr()?);
    let budget = UnfinishedBudget::for_guard(report.budget.as_ref(), limits);
    let task = tokio::spawn(async move {
        let mut relays = tokio::task::JoinSet::new();
        let mut pause = AcceptPause::default();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let local = match accepted {
                        Ok((local, _)) => local,
                        Err(error) => {
                            pause.after(&error).await;
                            continue;
                        }
                    };
                    pause.reset();
                    if relays.len() >= limits.connections {
                        inc(&report.stats.refused);
                        continue;
                    }
                    let target = target.clone();
                    let report = report.clone();
                    let budget = budget.clone();
                    relays.spawn(async move {
                        let Some((local, remote)) = dial(local, &target, &report.stats).await
                        else {
                            return;
                        };
                        let Ok(peer) = remote.peer_addr() else { return };
                        let Some(lease) = budget.admit(peer.ip()) else {
                            inc(&report.stats.refused);
                            return;
                        };
                        let _counted = Counted::open(&report.peers, peer.ip());
                        relay(local, remote, lease, &report.stats).await;
                    });
                }
                Some(_) = relays.join_next(), if !relays.is_empty() => {}
            }
        }
    });
    Ok(Guard {
        local_endpoint,
        task,
    })
}

/// First wait before a connecting guard dials an unreachable peer again (zmq.rs waiting).
pub const REDIAL_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest wait between two dials of an unreachable peer by a connecting guard.
pub const REDIAL_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects a connecting guard's local side (zmq.rs) to `target`, dialing again while the peer
/// is unreachable: 100 ms, doubling to 5 s. zmq.rs waits in its handshake meanwhile. Dropping
/// the local side instead would hand the redial to zmq.rs, whose own back-off grows to 30 s,
/// so an engine back after a restart of a minute or more would be heard up to 30 s late.
/// zmq.rs sends its greeting at once and nothing more until it has the peer's, so the greeting
/// is read here (and sent on first); anything readable after it means zmq.rs closed or gave
/// up, and then the dialing stops (`None`).
async fn dial(
    mut local: TcpStream,
    target: &str,
    stats: &GuardStats,
) -> Option<(TcpStream, TcpStream)> {
    let mut greeting = [0u8; GREETING_BYTES];
    local.read_exact(&mut greeting).await.ok()?;
    let mut wait = REDIAL_FIRST;
    let mut remote = loop {
        if let Ok(remote) = TcpStream::connect(target).await {
            break remote;
        }
        inc(&stats.dials_failed);
        let mut probe = [0u8; 1];
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = local.read(&mut probe) => return None,
        }
        wait = (wait * 2).min(REDIAL_MAX);
    };
    remote.write_all(&greeting).await.ok()?;
    Some((local, remote))
}

/// How long a guard waits after a failed accept before the next: out of file descriptors
/// (EMFILE, ENFILE) or buffers, an accept fails again at once for as long as it lasts, and
/// retrying at once would spin a core. 100 ms, doubling to 1 s while accepts keep failing.
#[derive(Debug)]
struct AcceptPause(std::time::Duration);

impl AcceptPause {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(1);

    async fn after(&mut self, error: &io::Error) {
        tracing::warn!(%error, pause = ?self.0, "KV-event guard: accepting a connection failed");
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::MAX);
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

impl Default for AcceptPause {
    fn default() -> Self {
        Self(Self::FIRST)
    }
}

/// A guard for a socket that binds: the guard listens on `public` (`tcp://host:port`) and
/// relays each connection to the local socket bound at `local` (loopback), counted in `report`
/// while it lasts. Returns the guard and the public address as bound (port 0 resolved).
pub(crate) async fn binding(
    public: &str,
    local: SocketAddr,
    report: Report,
    limits: Limits,
) -> io::Result<(Guard, SocketAddr)> {
    let listener = TcpListener::bind(tcp_address(public)?).await?;
    track(&report);
    let bound = listener.local_addr()?;
    let budget = UnfinishedBudget::for_guard(report.budget.as_ref(), limits);
    let task = tokio::spawn(async move {
        let mut relays = tokio::task::JoinSet::new();
        let mut pause = AcceptPause::default();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (remote, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            pause.after(&error).await;
                            continue;
                        }
                    };
                    pause.reset();
                    if relays.len() >= limits.connections {
                        inc(&report.stats.refused);
                        tracing::warn!(limit = limits.connections, "KV-event connection refused: too many");
                        continue;
                    }
                    let Some(lease) = budget.admit(peer.ip()) else {
                        inc(&report.stats.refused);
                        // Counted; not a warning each, as one host can open them at will.
                        tracing::debug!(limit = limits.connections_per_ip, ip = %peer.ip(), "KV-event connection refused: too many from one IP");
                        continue;
                    };
                    let report = report.clone();
                    relays.spawn(async move {
                        if let Ok(local) = TcpStream::connect(local).await {
                            let _counted = Counted::open(&report.peers, peer.ip());
                            relay(local, remote, lease, &report.stats).await;
                        }
                    });
                }
                Some(_) = relays.join_next(), if !relays.is_empty() => {}
            }
        }
    });
    Ok((
        Guard {
            local_endpoint: format!("tcp://{local}"),
            task,
        },
        bound,
    ))
}

/// Binds `socket` at `endpoint` behind a guard when it is TCP (the socket itself on an
/// ephemeral loopback port); other transports (`ipc://`, local to the host) bind directly.
/// Returns the endpoint as bound (port 0 resolved) and the guard to keep alive. The guard
/// reports to `report` and holds its peers to `limits`.
pub(crate) async fn bind<S: zeromq::Socket>(
    socket: &mut S,
    endpoint: &str,
    report: Report,
    limits: Limits,
) -> Result<(String, Option<Guard>), TransportError> {
    if !endpoint.starts_with("tcp://") {
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(zmq_error("bind", endpoint))?;
        return Ok((bound.to_string(), None));
    }
    let local = socket
        .bind("tcp://127.0.0.1:0")
        .await
        .map_err(zmq_error("bind", endpoint))?
        .to_string();
    let local = local
        .strip_prefix("tcp://")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| TransportError::Config(format!("unexpected local endpoint {local}")))?;
    let (guard, public) = binding(endpoint, local, report, limits)
        .await
        .map_err(guard_error(endpoint))?;
    Ok((format!("tcp://{public}"), Some(guard)))
}

/// The endpoint a socket connects to instead of `endpoint`, and the guard to keep alive:
/// TCP goes through a guard, other transports connect directly. The guard reports to
/// `report` and holds the peer to `limits`.
pub(crate) async fn connect_target(
    endpoint: &str,
    report: Report,
    limits: Limits,
) -> Result<(String, Option<Guard>), TransportError> {
    if !endpoint.starts_with("tcp://") {
        return Ok((endpoint.to_owned(), None));
    }
    let guard = connecting_with(endpoint, report, limits)
        .await
        .map_err(guard_error(endpoint))?;
    Ok((guard.local_endpoint.clone(), Some(guard)))
}

fn guard_error(endpoint: &str) -> impl FnOnce(io::Error) -> TransportError {
    let endpoint = endpoint.to_owned();
    move |source| TransportError::Guard { endpoint, source }
}

/// `host:port` of a `tcp://` endpoint (libzmq's wildcard `*` is `0.0.0.0`; a name is resolved
/// by the bind).
fn tcp_address(endpoint: &str) -> io::Result<String> {
    let parsed = crate::TcpEndpoint::parse(endpoint).map_err(|why| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{endpoint}: only tcp:// endpoints are guarded: {why}"),
        )
    })?;
    Ok(match parsed.socket_address() {
        Some(address) => address.to_string(),
        // Only a name has no address: the bind resolves it.
        None => format!("{}:{}", parsed.name().unwrap_or_default(), parsed.port),
    })
}

/// Turns on TCP keepalive on a peer connection ([`KEEPALIVE_IDLE`]). Without it, a read on
/// a connection whose peer vanished waits for ever; with it, the read fails and the relay ends.
fn keep_alive(stream: &TcpStream) {
    let probing = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&probing) {
        tracing::debug!(%error, "KV-event peer connection: TCP keepalive not set");
    }
}

/// Relays until either side closes or the remote breaks a rule (counted in `stats`).
async fn relay(local: TcpStream, remote: TcpStream, mut lease: Lease, stats: &GuardStats) {
    let _ = local.set_nodelay(true);
    let _ = remote.set_nodelay(true);
    keep_alive(&remote);
    let (mut local_read, mut local_write) = local.into_split();
    let (mut remote_read, mut remote_write) = remote.into_split();
    let (stall, backlog) = (
        lease.budget.limits.write_stall,
        lease.budget.limits.backlog_bytes,
    );
    let outbound = copy_unless_behind(&mut local_read, &mut remote_write, stall, backlog);
    let inbound = checked_copy(&mut remote_read, &mut local_write, &mut lease);
    tokio::select! {
        r = outbound => if let Err(e) = r && e.kind() == io::ErrorKind::TimedOut {
            inc(&stats.cut_off);
            tracing::warn!(stall = ?stall, backlog, error = %e, "KV-event peer cut off");
        },
        r = inbound => match r {
            Ok(()) => {}
            Err(Cut::Io(e)) => tracing::debug!(error = %e, "KV-event peer connection failed"),
            Err(e) => {
                inc(if matches!(e, Cut::Rule(_)) { &stats.cut_off } else { &stats.over_budget });
                tracing::warn!(error = %e, "KV-event peer cut off");
            }
        }
    }
    // The slot and the bytes come back before either side sees the connection close.
    drop(lease);
}

/// Copies what zmq.rs sends the peer, reading zmq.rs's side as soon as it can into one
/// buffer the writes drain: more than `backlog` bytes held, or no write progress for `stall`
/// while anything is held, ends it with `TimedOut` ([`MAX_PEER_BACKLOG_BYTES`],
/// [`MAX_WRITE_STALL`]). One contiguous buffer, so that what is held is what is counted (a
/// chunk per read would keep a read buffer alive for each small message).
async fn copy_unless_behind(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    stall: std::time::Duration,
    backlog: usize,
) -> io::Result<()> {
    use bytes::Buf as _;
    let mut held = bytes::BytesMut::new();
    let mut scratch = vec![0u8; 16 * 1024];
    let mut open = true;
    let mut progress = tokio::time::Instant::now();
    loop {
        if !open && held.is_empty() {
            return Ok(());
        }
        tokio::select! {
            // Writes first: what can go to the peer goes before more is read for it.
            biased;
            ready = to.writable(), if !held.is_empty() => {
                ready?;
                match to.try_write(&held) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        held.advance(n);
                        progress = tokio::time::Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            ready = from.readable(), if open => {
                ready?;
                // At most a scratch buffer a read, so that writes (which take all that is
                // held) get their turn between reads.
                match from.try_read(&mut scratch) {
                    Ok(0) => open = false,
                    Ok(n) => {
                        if held.is_empty() {
                            progress = tokio::time::Instant::now();
                        }
                        held.extend_from_slice(&scratch[..n]);
                        if held.len() > backlog {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the peer reads slower than it is sent to",
                            ));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            () = tokio::time::sleep_until(progress + stall), if !held.is_empty() => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"));
            }
        }
    }
}

/// Copies a ZMTP 3 stream, frame by frame, refusing what zmq.rs must not see, and charging
/// each unfinished message to `lease` (see the module's documentation).
async fn checked_copy<R, W>(from: &mut R, to: &mut W, lease: &mut Lease) -> Result<(), Cut>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let limits = lease.budget.limits;
    let mut greeting = [0u8; GREETING_BYTES];
    // A peer that connects and says nothing holds a connection slot: it must greet first.
    tokio::time::timeout(GREETING_TIMEOUT, from.read_exact(&mut greeting))
        .await
        .map_err(|_| Cut::Rule("no greeting in time"))??;
    if greeting[0] != 0xFF || greeting[9] & 1 != 1 || greeting[10] < 3 {
        return Err(Cut::Rule("not a ZMTP 3 greeting"));
    }
    to.write_all(&greeting).await?;
    let mut frames_in_message = 0usize;
    // The bytes of the message's frames so far, the one being passed on included.
    let mut message_bytes = 0u64;
    let mut messages = 0u64;
    let mut header = [0u8; 9];
    // While bytes are held (a message under way), when it must be through.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let flags = match within(deadline, from.read_u8()).await {
            Ok(f) => f,
            Err(Cut::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        // A message's first frame, or a command between messages, starts the clock.
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + limits.message_time);
        if flags & !(MORE | LONG | COMMAND) != 0 {
            return Err(Cut::Rule("reserved frame flags"));
        }
        header[0] = flags;
        let (len, header_len) = if flags & LONG != 0 {
            within(deadline, from.read_exact(&mut header[1..9])).await?;
            let mut be = [0u8; 8];
            be.copy_from_slice(&header[1..9]);
            (u64::from_be_bytes(be), 9)
        } else {
            header[1] = within(deadline, from.read_u8()).await?;
            (u64::from(header[1]), 2)
        };
        if len > limits.frame_bytes {
            return Err(Cut::Rule("a frame over the size cap"));
        }
        let command = flags & COMMAND != 0;
        let last = !command && flags & MORE == 0;
        if !command {
            frames_in_message += 1;
            if frames_in_message > limits.frames_per_message {
                return Err(Cut::Rule("a message of too many frames"));
            }
            message_bytes += len;
            if message_bytes > limits.message_bytes {
                return Err(Cut::Rule("a message over the size cap"));
            }
            if last {
                messages += 1;
                if messages > limits.messages_per_connection {
                    return Err(Cut::Rule("more messages than the connection may send"));
                }
            }
        }
        // Charged before zmq.rs sees the header, as it reserves the whole frame then.
        lease.charge(len)?;
        write_untimed(to, &header[..header_len], &mut deadline).await?;
        let mut left = len;
        // A frame's own buffer, as `tokio::io::copy` had: an idle connection holds none.
        let mut chunk = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(8 * 1024)];
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            let n = within(deadline, from.read(&mut chunk[..want])).await?;
            if n == 0 {
                return Ok(()); // the peer closed inside a frame
            }
            write_untimed(to, &chunk[..n], &mut deadline).await?;
            left -= n as u64;
        }
        if command {
            // A command is handed over whole, apart from any message in progress.
            lease.release(len);
        } else if last {
            lease.release(message_bytes);
            frames_in_message = 0;
            message_bytes = 0;
        }
        if frames_in_message == 0 {
            // Nothing held: the next read may wait as long as the peer likes.
            deadline = None;
        }
    }
}

/// Writes `bytes` to zmq.rs's side, the time it takes added to `deadline`: the peer's clock
/// runs while it is the one to send, not while this process is slow to read.
async fn write_untimed<W: AsyncWriteExt + Unpin>(
    to: &mut W,
    bytes: &[u8],
    deadline: &mut Option<tokio::time::Instant>,
) -> io::Result<()> {
    let started = tokio::time::Instant::now();
    to.write_all(bytes).await?;
    if let Some(at) = deadline {
        *at += started.elapsed();
    }
    Ok(())
}

/// `io` within `deadline` (when there is one): past it the connection is cut, as a message
/// under way that did not finish in time ([`MAX_MESSAGE_TIME`]).
async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, Cut> {
    match deadline {
        None => Ok(io.await?),
        Some(at) => match tokio::time::timeout_at(at, io).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Cut::Rule("a message not finished in time")),
        },
    }
}

/// The frame guard's stream parser, `checked_copy`, and its budget, for the `zmtp_guard` fuzz
/// target (`fuzz/src/zmtp_guard.rs`) and its replay in this crate's `fuzz_regressions` test.
/// Not part of the crate's API: nothing else uses it, and it may change at any time.
#[doc(hidden)]
pub mod fuzzing {
    use std::io;
    use std::net::IpAddr;
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{Budget, Cut, Lease, Limits};

    /// The caps a guard holds a peer's stream to (its other limits as in production).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Caps {
        /// Bytes in one frame, at most.
        pub frame_bytes: u64,
        /// Frames in one message, at most.
        pub frames_per_message: usize,
        /// Bytes in one message, at most.
        pub message_bytes: u64,
        /// Unfinished bytes of all the budget's connections, at most.
        pub unfinished_bytes: u64,
        /// Unfinished bytes of one IP's connections, at most.
        pub unfinished_bytes_per_ip: u64,
        /// Messages over one connection, at most.
        pub messages_per_connection: u64,
    }

    impl Caps {
        /// A subscriber's guard's caps, facing engines (the documented constants).
        pub fn facing_publishers() -> Self {
            Self::from(Limits::default())
        }

        /// A publisher's guard's caps, facing subscribers.
        pub fn facing_subscribers() -> Self {
            Self::from(Limits::facing_subscribers())
        }
    }

    impl From<Limits> for Caps {
        fn from(l: Limits) -> Self {
            Self {
                frame_bytes: l.frame_bytes,
                frames_per_message: l.frames_per_message,
                message_bytes: l.message_bytes,
                unfinished_bytes: l.unfinished_bytes,
                unfinished_bytes_per_ip: l.unfinished_bytes_per_ip,
                messages_per_connection: l.messages_per_connection,
            }
        }
    }

    /// A guard's budget, which its connections charge.
    #[derive(Debug, Clone)]
    pub struct GuardBudget(Arc<Budget>);

    impl GuardBudget {
        /// A budget under `caps`.
        pub fn new(caps: Caps) -> Self {
            Self(Budget::new(Limits {
                frame_bytes: caps.frame_bytes,
                frames_per_message: caps.frames_per_message,
                message_bytes: caps.message_bytes,
                unfinished_bytes: caps.unfinished_bytes,
                unfinished_bytes_per_ip: caps.unfinished_bytes_per_ip,
                messages_per_connection: caps.messages_per_connection,
                ..Limits::default()
            }))
        }

        /// A connection from `ip`, or `None` when its IP has its connections open already.
        pub fn admit(&self, ip: IpAddr) -> Option<Connection> {
            self.0.admit(ip).map(Connection)
        }

        /// Unfinished bytes charged now, all connections together.
        pub fn unfinished(&self) -> u64 {
            self.0.state.lock().unfinished
        }

        /// Unfinished bytes charged now by `ip`'s connections.
        pub fn unfinished_of(&self, ip: IpAddr) -> u64 {
            let state = self.0.state.lock();
            state
                .by_ip
                .get(&ip.to_canonical())
                .map_or(0, |u| u.unfinished)
        }

        /// IPs with a connection open now.
        pub fn ips(&self) -> usize {
            self.0.state.lock().by_ip.len()
        }
    }

    /// One admitted connection's share of its budget (given back when dropped).
    #[derive(Debug)]
    pub struct Connection(Lease);

    impl Connection {
        /// Unfinished bytes this connection holds charged.
        pub fn held(&self) -> u64 {
            self.0.held
        }
    }

    /// How [`checked_copy`] ended.
    #[derive(Debug)]
    pub enum Ending {
        /// The peer closed (between frames or inside a frame's body).
        Closed,
        /// Cut: the peer broke a rule of the stream.
        Rule(&'static str),
        /// Cut: the frame would have passed a budget.
        Budget(&'static str),
        /// Reading or writing failed (a stream that ends inside the greeting or a header).
        Io(io::Error),
    }

    /// The guard's copy of a peer's stream to zmq.rs (see the module's documentation).
    pub async fn checked_copy<R, W>(from: &mut R, to: &mut W, connection: &mut Connection) -> Ending
    where
        R: AsyncReadExt + Unpin,
        W: AsyncWriteExt + Unpin,
    {
        match super::checked_copy(from, to, &mut connection.0).await {
            Ok(()) => Ending::Closed,
            Err(Cut::Rule(why)) => Ending::Rule(why),
            Err(Cut::Budget(why)) => Ending::Budget(why),
            Err(Cut::Io(e)) => Ending::Io(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpSocket;
    use tokio::time::timeout;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);
    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn greeting() -> Vec<u8> {
        let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
        g.extend_from_slice(b"NULL");
        g.resize(GREETING_BYTES, 0);
        g
    }

    /// A frame: its header (long when over 255 bytes) and `len` bytes of body.
    fn frame(flags: u8, len: usize) -> Vec<u8> {
        let mut f = if len > 255 {
            let mut h = vec![flags | LONG];
            h.extend_from_slice(&(len as u64).to_be_bytes());
            h
        } else {
            vec![flags, len as u8]
        };
        f.resize(f.len() + len, b'x');
        f
    }

    async fn copy_with(limits: Limits, input: Vec<u8>) -> (Result<(), Cut>, Vec<u8>) {
        let budget = Budget::new(limits);
        let mut lease = budget.admit(LOCAL).unwrap();
        let mut out = Vec::new();
        let r = checked_copy(&mut input.as_slice(), &mut out, &mut lease).await;
        (r, out)
    }

    async fn copy(input: Vec<u8>) -> (Result<(), Cut>, Vec<u8>) {
        copy_with(Limits::default(), input).await
    }

    /// A peer connection probes a silent peer: keepalive on, with the guard's timings (the
    /// kernel's defaults would wait two hours before the first probe).
    #[tokio::test]
    async fn peer_connections_probe_a_silent_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(
            !socket.keepalive().unwrap(),
            "off until the guard turns it on"
        );
        keep_alive(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }

    #[tokio::test]
    async fn good_frames_pass_unchanged() {
        let mut input = greeting();
        input.extend_from_slice(&[COMMAND, 3, b'a', b'b', b'c']); // a short command
        input.extend_from_slice(&[MORE, 1, b't']); // a 3-frame message
        input.extend_from_slice(&[MORE | LONG, 0, 0, 0, 0, 0, 0, 0, 2, b's', b'q']);
        input.extend_from_slice(&[0, 0]);
        let (r, out) = copy(input.clone()).await;
        r.unwrap();
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn a_huge_frame_header_cuts_the_stream_before_it_is_passed_on() {
        let mut input = greeting();
        input.push(COMMAND | LONG);
        input.extend_from_slice(&(1u64 << 50).to_be_bytes());
        let (r, out) = copy(input).await;
        assert!(matches!(r, Err(Cut::Rule(_))));
        assert_eq!(out, greeting(), "the header never reaches the local socket");
    }

    #[tokio::test]
    async fn too_many_frames_bad_flags_and_bad_greetings_are_refused() {
        let mut input = greeting();
        for _ in 0..=MAX_FRAMES_PER_MESSAGE {
            input.extend_from_slice(&[MORE, 0]);
        }
        assert!(matches!(copy(input).await.0, Err(Cut::Rule(_))));
        let mut input = greeting();
        input.extend_from_slice(&[0x80, 0]);
        assert!(matches!(copy(input).await.0, Err(Cut::Rule(_))));
        let mut input = greeting();
        input[10] = 2; // ZMTP 2
        assert!(matches!(copy(input).await.0, Err(Cut::Rule(_))));
    }

    /// At the real caps: a vLLM message with a payload at the frame cap passes; frames each
    /// under the frame cap but together over the message cap are cut before the frame that
    /// passes it reaches zmq.rs.
    #[tokio::test]
    async fn a_message_over_its_byte_cap_is_cut_and_one_at_the_frame_cap_passes() {
        let mut good = greeting();
        good.extend(frame(MORE, crate::topic::MAX_TOPIC_BYTES));
        good.extend(frame(MORE, 8));
        good.extend(frame(0, MAX_FRAME_BYTES as usize));
        let (r, out) = copy(good.clone()).await;
        r.unwrap();
        assert_eq!(out.len(), good.len());

        let mut bad = greeting();
        bad.extend(frame(MORE, MAX_FRAME_BYTES as usize));
        let passed = bad.len();
        bad.extend(frame(MORE, 4 * 1024 + 1));
        bad.extend(frame(0, 0));
        let (r, out) = copy(bad).await;
        assert!(matches!(r, Err(Cut::Rule("a message over the size cap"))));
        assert_eq!(
            out.len(),
            passed,
            "the frame over the cap never reaches zmq.rs"
        );
    }

    fn small() -> Limits {
        Limits {
            frame_bytes: 250,
            frames_per_message: 8,
            message_bytes: 1_000,
            connections: 16,
            connections_per_ip: 2,
            unfinished_bytes: 500,
            unfinished_bytes_per_ip: 300,
            messages_per_connection: u64::MAX,
            write_stall: MAX_WRITE_STALL,
            backlog_bytes: MAX_PEER_BACKLOG_BYTES,
            message_time: MAX_MESSAGE_TIME,
        }
    }

    /// An engine that is down when zmq.rs dials (or redials) it: the guard keeps zmq.rs's
    /// connection and dials the engine again on its own schedule, so zmq.rs's handshake goes
    /// through as soon as the engine listens (before, the guard dropped zmq.rs's side and left
    /// the redial to zmq.rs's back-off, up to 30 s).
    #[tokio::test]
    async fn a_connecting_guard_dials_a_peer_that_is_down_again_while_zmq_waits() {
        // Bound but not listening: dials are refused until it listens.
        let engine = TcpSocket::new_v4().unwrap();
        engine.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let target = engine.local_addr().unwrap();
        let report = Report::default();
        let stats = report.stats.clone();
        let guard = connecting_with(&format!("tcp://{target}"), report, Limits::default())
            .await
            .unwrap();
        let local = guard.local_endpoint.strip_prefix("tcp://").unwrap();
        let mut zmq = TcpStream::connect(local).await.unwrap();
        zmq.write_all(&greeting()).await.unwrap();
        // The engine refused a dial (so the redial is what reaches it) before it listens.
        timeout(WAIT, async {
            while stats.dials_failed.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("a refused dial");
        let listener = engine.listen(16).unwrap();
        let (mut peer, _) = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
        let mut theirs = [0u8; GREETING_BYTES];
        timeout(WAIT, peer.read_exact(&mut theirs))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(theirs.to_vec(), greeting(), "zmq.rs's greeting, sent on");
        peer.write_all(&greeting()).await.unwrap();
        let mut back = [0u8; GREETING_BYTES];
        timeout(WAIT, zmq.read_exact(&mut back))
            .await
            .unwrap()
            .expect("zmq.rs's side was kept and is relayed");
        assert_eq!(back.to_vec(), greeting());
    }

    /// A subscriber that stops reading: the guard cuts it once a write has waited
    /// `write_stall`, so zmq.rs stops queueing for it (its PUB would hold 100,000 messages).
    #[tokio::test]
    async fn a_peer_that_stops_reading_is_cut() {
        let limits = Limits {
            write_stall: Duration::from_millis(200),
            ..small()
        };
        let (_guard, public, local, stats) = guarded(limits).await;
        let mut reader_that_stopped = client([127, 0, 0, 1], public).await;
        reader_that_stopped.write_all(&greeting()).await.unwrap();
        let mut zmq = relayed(&local).await;
        // zmq.rs writes until the guard lets go of its side: the peer's and the guard's
        // buffers fill, the guard's write waits, and past the stall the connection is cut.
        let chunk = vec![0u8; 1 << 20];
        let cut = timeout(WAIT, async {
            loop {
                if zmq.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(cut.is_ok(), "the guard kept a peer that reads nothing");
        assert_eq!(stats.cut_off.load(Ordering::Relaxed), 1);
    }

    /// Review: a subscriber that reads, but slower than it is sent to, never tripped the
    /// stall rule, and zmq.rs's queue for it (100,000 messages) filled. The guard now reads
    /// zmq.rs's side at once and cuts the peer when what it holds for it passes the backlog cap,
    /// while a peer that keeps up is never cut.
    #[tokio::test]
    async fn a_peer_that_reads_too_slowly_is_cut_at_the_backlog_cap() {
        let limits = Limits {
            backlog_bytes: 256 * 1024,
            ..small()
        };
        let (_guard, public, local, stats) = guarded(limits).await;
        // One that keeps up: 8 MiB through, more than the cap, in 64 KiB writes.
        let mut fast = client([127, 0, 0, 1], public).await;
        fast.write_all(&greeting()).await.unwrap();
        let mut zmq = relayed(&local).await;
        let chunk = vec![7u8; 64 * 1024];
        let total = 8 << 20;
        // Keeping up: each chunk is read before the next is sent.
        let (took, mut taken) = tokio::sync::mpsc::channel(1);
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; GREETING_BYTES];
            fast.read_exact(&mut got).await.unwrap();
            let mut body = vec![0u8; 64 * 1024];
            let mut all_sevens = true;
            for _ in 0..total / body.len() {
                fast.read_exact(&mut body).await.unwrap();
                all_sevens &= body.iter().all(|&b| b == 7);
                took.send(()).await.unwrap();
            }
            all_sevens
        });
        zmq.write_all(&greeting()).await.unwrap();
        for _ in 0..total / chunk.len() {
            zmq.write_all(&chunk).await.unwrap();
            timeout(WAIT, taken.recv()).await.unwrap().unwrap();
        }
        assert!(timeout(WAIT, reader).await.unwrap().unwrap());
        assert_eq!(stats.cut_off.load(Ordering::Relaxed), 0);

        // One that reads a little now and then: zmq.rs's writes still go through (the guard
        // takes them) until the guard holds more than the cap for the peer; then it is cut.
        let mut slow = client([127, 0, 0, 2], public).await;
        slow.write_all(&greeting()).await.unwrap();
        let mut zmq = relayed(&local).await;
        let trickle = tokio::spawn(async move {
            let mut sip = [0u8; 512];
            while let Ok(n) = slow.read(&mut sip).await {
                if n == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let cut = timeout(WAIT, async {
            loop {
                if zmq.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(cut.is_ok(), "the guard kept a peer that falls behind");
        assert_eq!(stats.cut_off.load(Ordering::Relaxed), 1);
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_greets_is_cut_after_the_greeting_timeout() {
        let (mut silent, mut guard_side) = tokio::io::duplex(1024);
        let budget = Budget::new(Limits::default());
        let mut lease = budget.admit(LOCAL).unwrap();
        let mut out = Vec::new();
        let started = tokio::time::Instant::now();
        let r = checked_copy(&mut guard_side, &mut out, &mut lease).await;
        assert!(matches!(r, Err(Cut::Rule("no greeting in time"))));
        assert_eq!(started.elapsed(), GREETING_TIMEOUT);
        assert!(out.is_empty());
        // The peer's end was open the whole time: silence, not a close.
        silent.write_all(b"late").await.unwrap();
    }

    /// A peer that starts a message and trickles the rest (or never sends its last frame) is
    /// cut `MAX_MESSAGE_TIME` after the message began, and gives back what it held; one that
    /// finishes its messages may then stay silent as long as it likes.
    #[tokio::test(start_paused = true)]
    async fn a_message_not_finished_in_time_is_cut_and_its_bytes_given_back() {
        for stall_inside_frame in [true, false] {
            let (mut peer, mut guard_side) = tokio::io::duplex(4 << 20);
            let budget = Budget::new(Limits::default());
            let mut lease = budget.admit(LOCAL).unwrap();
            peer.write_all(&greeting()).await.unwrap();
            let mut first = frame(MORE, 1 << 20);
            if stall_inside_frame {
                first.truncate(first.len() / 2);
            }
            peer.write_all(&first).await.unwrap();
            let mut out = Vec::new();
            let started = tokio::time::Instant::now();
            let r = checked_copy(&mut guard_side, &mut out, &mut lease).await;
            assert!(
                matches!(r, Err(Cut::Rule("a message not finished in time"))),
                "{stall_inside_frame}: {r:?}"
            );
            assert_eq!(started.elapsed(), MAX_MESSAGE_TIME);
            assert_eq!(budget.state.lock().unfinished, 1 << 20, "held until cut");
            drop(lease);
            assert_eq!(budget.state.lock().unfinished, 0, "given back");
        }

        // This side slow to read what the guard passes on (zmq.rs behind a busy process), and
        // the peer, held back by it (TCP), sends its last frame a second after this side reads
        // again: 31 s after the message began, 1 s of it the peer's. Not cut.
        let (mut peer, mut guard_side) = tokio::io::duplex(1 << 20);
        let (mut to_zmq, mut zmq) = tokio::io::duplex(256);
        let budget = Budget::new(Limits::default());
        let mut lease = budget.admit(LOCAL).unwrap();
        let (resumed_tx, resumed) = tokio::sync::oneshot::channel::<()>();
        peer.write_all(&greeting()).await.unwrap();
        peer.write_all(&frame(MORE, 10_000)).await.unwrap();
        let late_peer = tokio::spawn(async move {
            resumed.await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            peer.write_all(&frame(0, 10_000)).await.unwrap();
        });
        let slow_reader = tokio::spawn(async move {
            // The greeting and the message's first bytes, then a pause mid-message.
            let mut first = vec![0u8; GREETING_BYTES + 1_000];
            zmq.read_exact(&mut first).await.unwrap();
            tokio::time::sleep(MAX_MESSAGE_TIME * 3).await;
            resumed_tx.send(()).unwrap();
            let mut rest = Vec::new();
            zmq.read_to_end(&mut rest).await.unwrap();
            first.len() + rest.len()
        });
        let r = checked_copy(&mut guard_side, &mut to_zmq, &mut lease).await;
        assert!(r.is_ok(), "{r:?}");
        drop(to_zmq);
        late_peer.await.unwrap();
        assert_eq!(
            slow_reader.await.unwrap(),
            GREETING_BYTES + 2 * (9 + 10_000)
        );

        // Whole messages, then an hour of silence, then another: nothing is cut.
        let (mut peer, mut guard_side) = tokio::io::duplex(1 << 20);
        let budget = Budget::new(Limits::default());
        let mut lease = budget.admit(LOCAL).unwrap();
        let copying = tokio::spawn(async move {
            let mut out = Vec::new();
            let r = checked_copy(&mut guard_side, &mut out, &mut lease).await;
            (r, out.len())
        });
        peer.write_all(&greeting()).await.unwrap();
        peer.write_all(&frame(MORE, 100)).await.unwrap();
        peer.write_all(&frame(0, 100)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        peer.write_all(&frame(0, 100)).await.unwrap();
        drop(peer);
        let (r, passed) = copying.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(passed, GREETING_BYTES + 3 * (2 + 100));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_pause_the_guard_longer_and_longer_up_to_a_second() {
        let mut pause = AcceptPause::default();
        let error = io::Error::from_raw_os_error(24); // EMFILE
        let mut waited = Vec::new();
        for _ in 0..6 {
            let start = tokio::time::Instant::now();
            pause.after(&error).await;
            waited.push(start.elapsed().as_millis());
        }
        assert_eq!(waited, [100, 200, 400, 800, 1000, 1000]);
        pause.reset();
        let start = tokio::time::Instant::now();
        pause.after(&error).await;
        assert_eq!(
            start.elapsed().as_millis(),
            100,
            "an accept that worked starts over"
        );
    }

    #[tokio::test]
    async fn a_subscriber_may_send_a_publisher_only_a_few_small_subscriptions() {
        let subscription = |len| frame(0, len);
        // 64 subscriptions of a topic's length pass.
        let mut input = greeting();
        input.extend(frame(COMMAND, 300));
        for _ in 0..MAX_SUBSCRIPTIONS_PER_CONNECTION {
            input.extend(subscription(1 + crate::topic::MAX_TOPIC_BYTES));
        }
        let (r, out) = copy_with(Limits::facing_subscribers(), input.clone()).await;
        r.unwrap();
        assert_eq!(out, input);
        // The 65th cuts the connection before it is passed on (zmq.rs's PUB would keep it).
        let mut flood = input.clone();
        flood.extend(subscription(1));
        let (r, out) = copy_with(Limits::facing_subscribers(), flood).await;
        assert!(matches!(r, Err(Cut::Rule(_))));
        assert_eq!(out, input);
        // A long frame, or a message of two frames, is no subscription.
        for bad in [subscription(2_000), [frame(MORE, 1), frame(0, 1)].concat()] {
            let mut input = greeting();
            input.extend(bad);
            let (r, _) = copy_with(Limits::facing_subscribers(), input).await;
            assert!(matches!(r, Err(Cut::Rule(_))));
        }
    }

    #[test]
    fn the_budget_bounds_bytes_per_ip_and_over_all_and_gives_them_back() {
        let budget = Budget::new(small());
        let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
        let mut a = budget.admit(ip(1)).unwrap();
        let mut a2 = budget.admit(ip(1)).unwrap();
        assert!(budget.admit(ip(1)).is_none(), "two connections per IP");
        a.charge(200).unwrap();
        assert!(matches!(a2.charge(101), Err(Cut::Budget(_))), "300 per IP");
        a2.charge(100).unwrap();
        let mut b = budget.admit(ip(2)).unwrap();
        assert!(matches!(b.charge(201), Err(Cut::Budget(_))), "500 over all");
        b.charge(200).unwrap();
        a.release(200);
        b.charge(100).unwrap();
        drop(a2); // its 100 and its connection slot come back
        let a3 = budget.admit(ip(1)).unwrap();
        assert_eq!(budget.state.lock().unfinished, 300);
        drop((a, a3, b));
        let state = budget.state.lock();
        assert_eq!(state.unfinished, 0);
        assert!(
            state.by_ip.is_empty(),
            "only IPs with a connection open are kept"
        );
    }

    #[tokio::test]
    async fn commands_are_charged_while_they_pass_and_messages_until_their_last_frame() {
        // A command of 200 then a message of 200 + 200 in a 300-a-peer budget: the command is
        // given back once through, the message's first frame is still held at its second.
        let mut input = greeting();
        input.extend(frame(COMMAND, 200));
        input.extend(frame(MORE, 200));
        input.extend(frame(0, 200));
        let (r, _) = copy_with(small(), input).await;
        assert!(matches!(r, Err(Cut::Budget(_))));
        let mut input = greeting();
        input.extend(frame(COMMAND, 200));
        input.extend(frame(0, 200));
        input.extend(frame(MORE, 200));
        input.extend(frame(0, 50));
        copy_with(small(), input).await.0.unwrap();
    }

    /// A client from `ip` (any of 127/8 on Linux) connected to `to`.
    async fn client(ip: [u8; 4], to: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((ip, 0))).unwrap();
        s.connect(to).await.unwrap()
    }

    /// A guard with `limits` in front of a plain listener (zmq.rs's place).
    async fn guarded(limits: Limits) -> (Guard, SocketAddr, TcpListener, Arc<GuardStats>) {
        guarded_by(Report::default(), limits).await
    }

    async fn guarded_by(
        report: Report,
        limits: Limits,
    ) -> (Guard, SocketAddr, TcpListener, Arc<GuardStats>) {
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stats = report.stats.clone();
        let (guard, public) = binding(
            "tcp://127.0.0.1:0",
            local.local_addr().unwrap(),
            report,
            limits,
        )
        .await
        .unwrap();
        (guard, public, local, stats)
    }

    /// The local side of the next relayed connection, its greeting read.
    async fn relayed(local: &TcpListener) -> TcpStream {
        let (mut s, _) = timeout(WAIT, local.accept()).await.unwrap().unwrap();
        let mut g = [0u8; GREETING_BYTES];
        timeout(WAIT, s.read_exact(&mut g)).await.unwrap().unwrap();
        s
    }

    /// Reads one frame of `len` bytes (short header) from the local side.
    async fn passed(s: &mut TcpStream, len: usize) {
        let mut f = vec![0u8; 2 + len];
        timeout(WAIT, s.read_exact(&mut f)).await.unwrap().unwrap();
    }

    /// Waits for the guard to close `s` (EOF or reset).
    async fn closed(s: &mut TcpStream) {
        let mut rest = Vec::new();
        let _ = timeout(WAIT, s.read_to_end(&mut rest)).await.unwrap();
    }

    #[tokio::test]
    async fn unfinished_messages_over_the_shared_budget_cut_their_connection() {
        let (_guard, public, local, stats) = guarded(small()).await;
        let over_budget = || stats.over_budget.load(Ordering::Relaxed);

        // A holds 200 of its IP's 300 and of the guard's 500.
        let mut a = client([127, 0, 0, 1], public).await;
        a.write_all(&greeting()).await.unwrap();
        let mut a_local = relayed(&local).await;
        a.write_all(&frame(MORE, 200)).await.unwrap();
        passed(&mut a_local, 200).await;

        // B, from the same IP, would make it 400: cut, its frame never passed on.
        let mut b = client([127, 0, 0, 1], public).await;
        b.write_all(&greeting()).await.unwrap();
        let mut b_local = relayed(&local).await;
        b.write_all(&frame(MORE, 200)).await.unwrap();
        closed(&mut b).await;
        assert_eq!(over_budget(), 1);
        closed(&mut b_local).await;

        // C, from another IP, fits (400 over all); D would make it 600: cut.
        let mut c = client([127, 0, 0, 2], public).await;
        c.write_all(&greeting()).await.unwrap();
        let mut c_local = relayed(&local).await;
        c.write_all(&frame(MORE, 200)).await.unwrap();
        passed(&mut c_local, 200).await;
        let mut d = client([127, 0, 0, 3], public).await;
        d.write_all(&greeting()).await.unwrap();
        let _d_local = relayed(&local).await;
        d.write_all(&frame(MORE, 200)).await.unwrap();
        closed(&mut d).await;
        assert_eq!(over_budget(), 2);

        // A finishes its message: its 200 come back, and a new peer's frame fits.
        a.write_all(&frame(0, 0)).await.unwrap();
        passed(&mut a_local, 0).await;
        let mut e = client([127, 0, 0, 3], public).await;
        e.write_all(&greeting()).await.unwrap();
        let mut e_local = relayed(&local).await;
        e.write_all(&frame(0, 200)).await.unwrap();
        passed(&mut e_local, 200).await;
        assert_eq!(over_budget(), 2);
        assert_eq!(stats.cut_off.load(Ordering::Relaxed), 0);
    }

    /// Two guards (two pod-mode subscribers) sharing one budget: a peer of each fits, and a
    /// third peer would pass the sum, though each guard alone would be under its own.
    #[tokio::test]
    async fn guards_sharing_a_budget_bound_the_sum() {
        let shared = UnfinishedBudget::with_limits(small());
        let report = || Report {
            budget: Some(shared.clone()),
            ..Report::default()
        };
        let (_g1, public1, local1, stats1) = guarded_by(report(), small()).await;
        let (_g2, public2, local2, stats2) = guarded_by(report(), small()).await;

        // 200 through the first guard, 200 through the second: 400 of the shared 500.
        let mut a = client([127, 0, 0, 1], public1).await;
        a.write_all(&greeting()).await.unwrap();
        let mut a_local = relayed(&local1).await;
        a.write_all(&frame(MORE, 200)).await.unwrap();
        passed(&mut a_local, 200).await;
        let mut b = client([127, 0, 0, 2], public2).await;
        b.write_all(&greeting()).await.unwrap();
        let mut b_local = relayed(&local2).await;
        b.write_all(&frame(MORE, 200)).await.unwrap();
        passed(&mut b_local, 200).await;

        // A third peer on the second guard would make it 600: cut, though that guard holds
        // only 200 itself.
        let mut c = client([127, 0, 0, 3], public2).await;
        c.write_all(&greeting()).await.unwrap();
        let _c_local = relayed(&local2).await;
        c.write_all(&frame(MORE, 200)).await.unwrap();
        closed(&mut c).await;
        assert_eq!(stats2.over_budget.load(Ordering::Relaxed), 1);
        assert_eq!(stats1.over_budget.load(Ordering::Relaxed), 0);

        // The first peer finishes its message: the room it frees is the second guard's too.
        a.write_all(&frame(0, 0)).await.unwrap();
        passed(&mut a_local, 0).await;
        let mut d = client([127, 0, 0, 3], public2).await;
        d.write_all(&greeting()).await.unwrap();
        let mut d_local = relayed(&local2).await;
        d.write_all(&frame(MORE, 200)).await.unwrap();
        passed(&mut d_local, 200).await;
        assert_eq!(stats2.over_budget.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn connections_past_the_cap_of_their_ip_are_refused_and_counted() {
        let (_guard, public, local, stats) = guarded(small()).await;
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut c = client([127, 0, 0, 1], public).await;
            c.write_all(&greeting()).await.unwrap();
            open.push((c, relayed(&local).await));
        }
        let mut third = client([127, 0, 0, 1], public).await;
        closed(&mut third).await;
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);

        // Another IP still gets in, and so does the first once one of its connections closes.
        let mut other = client([127, 0, 0, 2], public).await;
        other.write_all(&greeting()).await.unwrap();
        let _other_local = relayed(&local).await;
        let (first, mut first_local) = open.remove(0);
        drop(first);
        closed(&mut first_local).await;
        // The slot is given back when the relay ends, which the local side's EOF follows.
        let mut again = client([127, 0, 0, 1], public).await;
        again.write_all(&greeting()).await.unwrap();
        let _again_local = relayed(&local).await;
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn endpoints_become_addresses() {
        assert_eq!(tcp_address("tcp://*:5557").unwrap(), "0.0.0.0:5557");
        assert_eq!(tcp_address("tcp://10.0.0.7:5557").unwrap(), "10.0.0.7:5557");
        assert_eq!(tcp_address("tcp://[::]:5557").unwrap(), "[::]:5557");
        assert_eq!(
            tcp_address("tcp://localhost:5557").unwrap(),
            "localhost:5557"
        );
        assert!(tcp_address("ipc:///tmp/kv").is_err());
        assert!(tcp_address("tcp://epp\n:5557").is_err());
    }
}
