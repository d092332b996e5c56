//! The precise prefix-cache index, fed by the engines' KV-cache events (vLLM's
//! `--kv-events-config`), and the health of each endpoint's event stream.
//!
//! [`keys`] computes request keys from token ids as llm-d does; [`index::KvIndex`] is the
//! index itself (plain data, bounded, tested without I/O); [`SharedKvIndex`] is what the EPP
//! shares between the event subscribers (writers) and the request path (readers): the index
//! behind one lock, and per endpoint the state of its event stream, which decides whether the
//! precise scorer trusts the index for that endpoint or falls back to the approximate one.

pub mod index;
mod key_table;
pub mod keys;
pub mod peers;
mod slab;

use std::time::Duration;

use parking_lot::RwLock;
use tokio::time::Instant;

pub use index::{
    Applied, Dropped, EndpointMatch, IndexLimits, KvIndex, Lookup, MAX_KEYS_PER_ENGINE_HASH,
    ParentKeys, PreparedBatch, SharedMedia, TierWeights,
};
pub use keys::{HashAlgorithm, KeyHasher};

use crate::datastore::EndpointId;
use kv_events::EventBatch;

/// How long after a sequence gap that replay could not fill an endpoint is scored from the
/// approximate index. The gap cleared its entries; by then its events have re-announced what
/// it caches recently (the blocks older than that are the first its engine evicts anyway).
pub const GAP_FALLBACK: Duration = Duration::from_secs(30);

/// Units of work (keys stored, hashes mapped, removed or looked up) one hold of the index's
/// lock does at most while a batch is applied: a batch of a long prefill (8,192 blocks for 128k
/// tokens, 16,384 units with their engine hashes) is applied in slices, and the request path
/// waits for one slice at most (some 4,096 map operations, a few milliseconds), not for the
/// batch.
pub const APPLY_SLICE: usize = 4_096;

/// The state of one endpoint's event stream, as its subscriber reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamState {
    /// No subscriber has connected yet (or the endpoint has none).
    #[default]
    Unknown,
    /// Connected, and the index holds everything the stream said.
    Live,
    /// Events were lost and replay could not fill the gap: the endpoint's entries were
    /// cleared at `since`.
    Gap {
        /// When.
        since: Instant,
    },
    /// The subscriber lost its connection at `since` (or never got one back).
    Down {
        /// When.
        since: Instant,
    },
}

impl StreamState {
    /// Whether the index can be trusted for this endpoint at `now`.
    pub fn is_healthy(self, now: Instant) -> bool {
        match self {
            StreamState::Live => true,
            StreamState::Gap { since } => now.saturating_duration_since(since) >= GAP_FALLBACK,
            StreamState::Unknown | StreamState::Down { .. } => false,
        }
    }

    /// A label for logs and `/debug`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Unknown => "unknown",
            StreamState::Live => "live",
            StreamState::Gap { .. } => "gap",
            StreamState::Down { .. } => "down",
        }
    }
}

/// The index and the streams' states, shared by the subscribers and the request path.
#[derive(Debug)]
pub struct SharedKvIndex {
    hasher: KeyHasher,
    index: RwLock<KvIndex>,
    streams: RwLock<Vec<StreamState>>,
}

impl SharedKvIndex {
    /// An empty index.
    pub fn new(hasher: KeyHasher, limits: IndexLimits) -> Self {
        Self {
            hasher,
            index: RwLock::new(KvIndex::new(hasher, limits)),
            streams: RwLock::new(Vec::new()),
        }
    }

    /// The key hasher (no lock needed).
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Applies a batch of an endpoint's events. The parents' keys are read first (read locks,
    /// [`APPLY_SLICE`] lookups each), the batch's keys are hashed with no lock held, and the
    /// result is written in slices of [`APPLY_SLICE`] units, each under its own write lock: a
    /// large batch never holds the lock for long, and readers between two slices see part of
    /// it (a chain's deepest blocks first, which match nothing until its head is in).
    pub fn apply(
        &self,
        endpoint: EndpointId,
        model: &str,
        batch: &EventBatch,
        now: Instant,
    ) -> Applied {
        let needed = PreparedBatch::parents(batch);
        let mut parents = ParentKeys::with_capacity_and_hasher(needed.len(), Default::default());
        for chunk in needed.chunks(APPLY_SLICE) {
            self.index.read().parent_keys(chunk, &mut parents);
        }
        let mut prepared = PreparedBatch::new(&self.hasher, model, batch, &parents);
        while !self
            .index
            .write()
            .apply_prepared(endpoint, &mut prepared, APPLY_SLICE, now)
        {}
        prepared.applied()
    }

    /// Request keys and (key, endpoint, tier) entries held, read together.
    pub fn sizes(&self) -> (usize, usize) {
        let index = self.index.read();
        (index.len(), index.entries())
    }

    /// Runs `f` on the index for reading, after dropping expired speculative entries.
    pub fn read<R>(&self, now: Instant, f: impl FnOnce(&KvIndex) -> R) -> R {
        let due = self.index.read().next_expiry().is_some_and(|d| d <= now);
        if due {
            self.index.write().expire(now);
        }
        f(&self.index.read())
    }

    /// Runs `f` on the index for writing.
    pub fn write<R>(&self, f: impl FnOnce(&mut KvIndex) -> R) -> R {
        f(&mut self.index.write())
    }

    /// Speculative entries for a just-routed request.
    pub fn speculate(&self, endpoint: EndpointId, keys: &[u64], now: Instant) {
        self.index.write().speculate(endpoint, keys, now);
    }

    /// Clears an endpoint's entries (`AllBlocksCleared`, an unfilled gap, removal).
    pub fn clear_endpoint(&self, endpoint: EndpointId) {
        self.index.write().clear_endpoint(endpoint);
    }

    /// The state of an endpoint's stream.
    pub fn stream(&self, endpoint: EndpointId) -> StreamState {
        self.streams
            .read()
            .get(endpoint.0 as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Every endpoint's stream state, by id (for a whole decision under one lock).
    pub fn with_streams<R>(&self, f: impl FnOnce(&[StreamState]) -> R) -> R {
        f(&self.streams.read())
    }

    /// Records an endpoint's stream state.
    pub fn set_stream(&self, endpoint: EndpointId, state: StreamState) {
        let mut streams = self.streams.write();
        let i = endpoint.0 as usize;
        if streams.len() <= i {
            streams.resize(i + 1, StreamState::Unknown);
        }
        streams[i] = state;
    }

    /// A gap replay could not fill: the endpoint's entries go, and it is scored from the
    /// approximate index for [`GAP_FALLBACK`].
    pub fn gap(&self, endpoint: EndpointId, now: Instant) {
        self.clear_endpoint(endpoint);
        self.set_stream(endpoint, StreamState::Gap { since: now });
    }

    /// An endpoint left the pool: its entries and its stream state go.
    pub fn remove_endpoint(&self, endpoint: EndpointId) {
        self.clear_endpoint(endpoint);
        self.set_stream(endpoint, StreamState::Unknown);
    }

    /// Forgets every endpoint `live` refuses.
    pub fn retain_endpoints(&self, live: impl Fn(EndpointId) -> bool) {
        self.index.write().retain_endpoints(&live);
        let mut streams = self.streams.write();
        for (i, s) in streams.iter_mut().enumerate() {
            if !live(EndpointId(i as u32)) {
                *s = StreamState::Unknown;
            }
        }
    }

    /// Request keys held.
    pub fn len(&self) -> usize {
        self.index.read().len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
