//! KV tiers below the GPU cache, after LMCache and vLLM's CPU offloading: a CPU tier per
//! replica, one store shared by every replica of the process, and pulls from a peer replica
//! that a request names in `x-kv-cache-source-host-port` (llm-d's `p2p-source-producer`).
//!
//! - **Write-through.** Every full block the engine computes (or loads) is written to the CPU
//!   tier and to the shared store at once, asynchronously in the real systems, so uncharged.
//!   Both are bounded LRU sets of block hashes ([`LruBlocks`]); a write of a block already held
//!   refreshes it. Looking a request up for admission also refreshes every one of its blocks
//!   the CPU tier holds, GPU hits included, first block last, as vLLM's offloading connector
//!   touches a request's blocks when it looks the request up.
//! - **Lookup** on admission: the prefix found in the GPU cache first, then block by block the
//!   continuation from the CPU tier, else the shared store, else the named peer; the first
//!   block none of them holds ends the hit. Loaded blocks become GPU blocks (and are announced
//!   as GPU blocks, as vLLM does after a connector load).
//! - **Cost**: `tokens × kv_bytes_per_token / bandwidth` per tier, added to the step that
//!   admits the sequence ([`crate::KvTiers::load_time`]).
//! - **Events**: a block entering the CPU tier is a `BlockStored` with `medium: "CPU"` and no
//!   token ids, leaving it a `BlockRemoved` `CPU`; the shared store's are `REMOTE`, published
//!   by the replica that wrote the block (its eviction too, whoever caused it).
//! - **Peers**: a registry of the process's replicas by serving address ([`TierPool`]). The
//!   pull reads a *snapshot* of the peer (how many leading blocks of the prompt its GPU or CPU
//!   tier holds) when the request arrives, locking only the peer, never across an await. The
//!   approximation: the transfer does not slow the peer, and blocks the peer evicts after the
//!   snapshot are still pulled.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use kv_events::Medium;
use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;

use crate::engine::WrittenBlock;
use crate::kv_cache::KvEvent;

/// The request header naming the peer to pull KV blocks from (llm-d's name).
pub const KV_SOURCE_HEADER: &str = "x-kv-cache-source-host-port";

/// Longest header value looked at: `[` + an IPv6 address (≤ 45) + `]:65535` fits in 54.
pub const MAX_KV_SOURCE_LEN: usize = 64;

/// A bounded set of block hashes with least-recently-used eviction, each with a value.
#[derive(Debug)]
pub struct LruBlocks<V> {
    capacity: usize,
    /// hash → (recency stamp, value).
    entries: HashMap<u64, (u64, V), foldhash::fast::RandomState>,
    /// recency stamp → hash, oldest first.
    order: BTreeMap<u64, u64>,
    next_stamp: u64,
}

impl<V> LruBlocks<V> {
    /// An empty set holding at most `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: HashMap::default(),
            order: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `hash` is held.
    pub fn contains(&self, hash: u64) -> bool {
        self.entries.contains_key(&hash)
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// Makes `hash` the most recently used; `false` when it is not held.
    pub fn touch(&mut self, hash: u64) -> bool {
        let stamp = self.stamp();
        let Some(entry) = self.entries.get_mut(&hash) else {
            return false;
        };
        self.order.remove(&entry.0);
        entry.0 = stamp;
        self.order.insert(stamp, hash);
        true
    }

    /// Adds `hash` as the most recently used (a held one is only touched, its value kept) and
    /// returns whether it is new, with what had to leave to make room, oldest first.
    pub fn insert(&mut self, hash: u64, value: V, evicted: &mut Vec<(u64, V)>) -> bool {
        if self.capacity == 0 {
            return false;
        }
        if self.touch(hash) {
            return false;
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, v)) = self.entries.remove(&oldest) {
                evicted.push((oldest, v));
            }
        }
        let stamp = self.stamp();
        self.entries.insert(hash, (stamp, value));
        self.order.insert(stamp, hash);
        true
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }
}

/// Where one replica's KV events go: the engine's broadcast channel, made by the first
/// subscriber. Shared with the process's [`TierPool`] so that the shared store can announce the
/// eviction of a block in the name of the replica that wrote it, without that replica's lock.
#[derive(Debug, Default)]
pub(crate) struct EventSink(OnceLock<broadcast::Sender<KvEvent>>);

impl EventSink {
    /// The channel, made on first use.
    pub(crate) fn sender(&self, capacity: usize) -> &broadcast::Sender<KvEvent> {
        self.0.get_or_init(|| broadcast::channel(capacity).0)
    }

    /// The channel, when someone made it.
    pub(crate) fn get(&self) -> Option<&broadcast::Sender<KvEvent>> {
        self.0.get()
    }

    /// Whether anyone listens (events are only built then).
    pub(crate) fn active(&self) -> bool {
        self.0.get().is_some_and(|tx| tx.receiver_count() > 0)
    }

    pub(crate) fn send(&self, e: KvEvent) {
        if let Some(tx) = self.0.get() {
            let _ = tx.send(e);
        }
    }
}

/// The store shared by the replicas of a process (LMCache's remote backend): which blocks it
/// holds and, for each, the event sink of the replica that wrote it.
#[derive(Debug)]
pub(crate) struct SharedStore {
    blocks: LruBlocks<Arc<EventSink>>,
}

impl SharedStore {
    pub(crate) fn contains(&self, hash: u64) -> bool {
        self.blocks.contains(hash)
    }

    pub(crate) fn touch(&mut self, hash: u64) {
        self.blocks.touch(hash);
    }

    /// Writes blocks through from `writer`; announces the new ones (`REMOTE`) in the writer's
    /// name, then every block they pushed out in the name of that block's writer.
    pub(crate) fn write(&mut self, writer: &Arc<EventSink>, blocks: &[WrittenBlock]) {
        let announce = writer.active();
        let mut evicted = Vec::new();
        for (hash, parent, lora) in blocks {
            if self.blocks.insert(*hash, writer.clone(), &mut evicted) && announce {
                writer.send(KvEvent::OffloadStored {
                    medium: Medium::Remote,
                    hash: *hash,
                    parent: *parent,
                    lora: lora.as_deref().map(str::to_owned),
                });
            }
        }
        for (hash, owner) in evicted {
            if owner.active() {
                owner.send(KvEvent::OffloadRemoved {
                    medium: Medium::Remote,
                    hash,
                });
            }
        }
    }

    /// Blocks held.
    pub(crate) fn len(&self) -> usize {
        self.blocks.len()
    }
}

/// A replica's entry in the registry: its serving address and a weak handle on its engine.
#[derive(Debug)]
struct Member {
    addr: SocketAddr,
    engine: crate::engine::WeakEngine,
}

/// What one simulator process shares between its replicas: the shared store and the registry of
/// replicas by serving address, for peer pulls. Replicas spawned together
/// ([`crate::spawn_replicas`]) share one; [`crate::spawn_replica_in`] joins a given one.
#[derive(Debug)]
pub struct TierPool {
    shared: Option<Mutex<SharedStore>>,
    members: RwLock<Vec<Member>>,
}

impl TierPool {
    /// A pool whose shared store holds `shared_blocks` blocks (0 = no shared store).
    pub fn new(shared_blocks: usize) -> Arc<Self> {
        Arc::new(Self {
            shared: (shared_blocks > 0).then(|| {
                Mutex::new(SharedStore {
                    blocks: LruBlocks::new(shared_blocks),
                })
            }),
            members: RwLock::new(Vec::new()),
        })
    }

    /// The pool `config` asks for (its shared store's size).
    pub fn for_config(config: &crate::Config) -> Arc<Self> {
        Self::new(config.kv_tiers.shared_blocks)
    }

    pub(crate) fn shared(&self) -> Option<&Mutex<SharedStore>> {
        self.shared.as_ref()
    }

    /// Blocks in the shared store (0 without one).
    pub fn shared_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.lock().len())
    }

    /// Registers `engine` as serving on `addr` (replacing replicas gone since).
    pub fn register(&self, addr: SocketAddr, engine: &crate::Engine) {
        let mut members = self.members.write();
        members.retain(|m| m.engine.is_alive());
        members.push(Member {
            addr,
            engine: engine.downgrade(),
        });
    }

    /// The live replica serving on `addr`: an exact match, else one listening on the wildcard
    /// address with that port (it answers on every local address).
    pub(crate) fn lookup(&self, addr: SocketAddr) -> Option<crate::Engine> {
        let members = self.members.read();
        let exact = members
            .iter()
            .filter(|m| m.addr == addr)
            .find_map(|m| m.engine.upgrade());
        exact.or_else(|| {
            members
                .iter()
                .filter(|m| m.addr.ip().is_unspecified() && m.addr.port() == addr.port())
                .find_map(|m| m.engine.upgrade())
        })
    }
}

/// Why a request's peer header was not honoured (the `reason` label of
/// `sim_kv_peer_header_ignored_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerIgnored {
    /// Not `ip:port`, too long or not ASCII.
    Unparseable,
    /// No replica of this process serves on that address.
    Unknown,
    /// The address is this replica's own.
    Own,
    /// Peer pulls are off (`--p2p-load-gbps 0`).
    Disabled,
}

impl PeerIgnored {
    /// Every reason, in the order of [`crate::metrics::TierStats::peer_ignored`].
    pub const ALL: [PeerIgnored; 4] = [
        PeerIgnored::Unparseable,
        PeerIgnored::Unknown,
        PeerIgnored::Own,
        PeerIgnored::Disabled,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerIgnored::Unparseable => "unparseable",
            PeerIgnored::Unknown => "unknown",
            PeerIgnored::Own => "self",
            PeerIgnored::Disabled => "disabled",
        }
    }

    /// Index into per-reason arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Parses a `x-kv-cache-source-host-port` value: at most [`MAX_KV_SOURCE_LEN`] bytes of
/// visible ASCII forming `ip:port` (`[v6]:port` for IPv6), surrounding spaces ignored. Host
/// names are refused: the pool lists endpoints by IP.
pub fn parse_peer(value: &[u8]) -> Result<SocketAddr, PeerIgnored> {
    if value.len() > MAX_KV_SOURCE_LEN {
        return Err(PeerIgnored::Unparseable);
    }
    let text = std::str::from_utf8(value).map_err(|_| PeerIgnored::Unparseable)?;
    text.trim()
        .parse::<SocketAddr>()
        .map_err(|_| PeerIgnored::Unparseable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_blocks_evict_the_least_recently_used() {
        let mut lru = LruBlocks::new(3);
        let mut out = Vec::new();
        for h in [1, 2, 3] {
            assert!(lru.insert(h, (), &mut out));
        }
        assert!(lru.touch(1));
        assert!(!lru.insert(2, (), &mut out), "held: only touched");
        assert!(lru.insert(4, (), &mut out));
        assert_eq!(out, [(3, ())]);
        assert!(lru.contains(1) && lru.contains(2) && lru.contains(4));
        assert_eq!(lru.len(), 3);
        let mut none = LruBlocks::new(0);
        assert!(!none.insert(1, (), &mut out));
        assert!(none.is_empty());
    }

    #[test]
    fn peer_header_values_are_bounded_and_strict() {
        assert_eq!(
            parse_peer(b"10.0.0.7:8000"),
            Ok("10.0.0.7:8000".parse().unwrap())
        );
        assert_eq!(parse_peer(b" [::1]:9 "), Ok("[::1]:9".parse().unwrap()));
        for bad in [
            &b""[..],
            b"10.0.0.7",
            b"host:8000",
            b"10.0.0.7:99999",
            b"10.0.0.7:80:80",
            b"\xff\xfe:1",
            b"1.2.3.4:5\x00",
            b"::1:8000",
        ] {
            assert_eq!(parse_peer(bad), Err(PeerIgnored::Unparseable), "{bad:?}");
        }
        let long = format!("{}1.2.3.4:5", " ".repeat(MAX_KV_SOURCE_LEN));
        assert_eq!(parse_peer(long.as_bytes()), Err(PeerIgnored::Unparseable));
    }

    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    fn config(cases: u32, seed: u64) -> Config {
        Config {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            ..Config::default()
        }
    }

    proptest! {
        #![proptest_config(config(1024, 0x7065_6572_0001))]

        /// Any bytes: an answer, never a panic; an address only from a short value, and then
        /// the address the value spells.
        #[test]
        fn any_header_value_parses_or_is_refused(value in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(addr) = parse_peer(&value) {
                prop_assert!(value.len() <= MAX_KV_SOURCE_LEN);
                let text = std::str::from_utf8(&value).unwrap_or_default();
                prop_assert_eq!(text.trim().parse::<SocketAddr>().ok(), Some(addr));
            }
        }

        /// Every address round-trips through its display form.
        #[test]
        fn every_socket_address_round_trips(ip in any::<std::net::IpAddr>(), port in any::<u16>()) {
            let addr = SocketAddr::new(ip, port);
            let shown = addr.to_string();
            if shown.len() <= MAX_KV_SOURCE_LEN {
                prop_assert_eq!(parse_peer(shown.as_bytes()), Ok(addr));
            }
        }
    }
}
