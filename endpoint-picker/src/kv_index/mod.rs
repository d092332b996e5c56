//! The precise prefix-cache index, fed by the engines' KV-cache events (vLLM's
//! `--kv-events-config`), and the health of each endpoint's event stream.
//!
//! [`keys`] computes request keys from token ids as llm-d does; [`index::KvIndex`] is the
//! index itself (plain data, bounded, tested without I/O); [`SharedKvIndex`] is what the EPP
//! shares between the event subscribers (writers) and the request path (readers): the index
//! behind one lock, and per endpoint the state of its event stream, which decides whether the
//! precise scorer trusts the index for that endpoint or falls back to the approximate one.

pub mod groups;
pub mod index;
mod key_table;
pub mod keys;
pub mod peers;
mod slab;

use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use index::{
    Applied, Dropped, EndpointMatch, IndexLimits, KvIndex, Lookup, MAX_BATCH_STORED_BLOCKS,
    MAX_BATCH_TOKENS, MAX_KEYS_PER_ENGINE_HASH, ParentKeys, PreparedBatch, SharedMedia,
    TierWeights,
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

/// Finishes an endpoint's clear if the future that was walking it is dropped first.
struct FinishClearOnDrop<'a> {
    index: Option<&'a SharedKvIndex>,
    endpoint: EndpointId,
}

impl<'a> FinishClearOnDrop<'a> {
    fn new(index: &'a SharedKvIndex, endpoint: EndpointId) -> Self {
        Self {
            index: Some(index),
            endpoint,
        }
    }

    /// The walk ended: nothing to finish.
    fn disarm(&mut self) {
        self.index = None;
    }
}

impl Drop for FinishClearOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(index) = self.index {
            index.finish_clear(self.endpoint);
        }
    }
}

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
    /// Whether a task walks the clears of departed endpoints ([`Self::walk_clears`]);
    /// without one they are walked by whoever removes the endpoint.
    clear_walker: AtomicBool,
    /// Wakes that task: a departed endpoint's clear was begun.
    clears_begun: Notify,
}

impl SharedKvIndex {
    /// An empty index.
    pub fn new(hasher: KeyHasher, limits: IndexLimits) -> Self {
        Self {
            hasher,
            index: RwLock::new(KvIndex::new(hasher, limits)),
            streams: RwLock::new(Vec::new()),
            clear_walker: AtomicBool::new(false),
            clears_begun: Notify::new(),
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
    /// it (a chain's deepest blocks first, which match nothing until its head is in). An
    /// `AllBlocksCleared` in the batch is cleared in slices too ([`Self::clear_endpoint`]).
    pub fn apply(
        &self,
        endpoint: EndpointId,
        model: &str,
        batch: &EventBatch,
        now: Instant,
    ) -> Applied {
        let mut prepared = self.prepare(endpoint, model, batch);
        while !self.apply_slice(endpoint, &mut prepared, now) {}
        prepared.applied()
    }

    /// [`Self::apply`], giving the runtime's other tasks their turn between two slices: a
    /// batch of half a million blocks takes a worker for a good part of a second, which the
    /// ext_proc streams on the same worker must not wait for. If the future is dropped midway,
    /// what is applied stays, and a clear the batch began is finished before the drop returns
    /// (a clear must not be left begun: the endpoint would gain nothing until it ends).
    pub async fn apply_yielding(
        &self,
        endpoint: EndpointId,
        model: &str,
        batch: &EventBatch,
        now: Instant,
    ) -> Applied {
        let mut unfinished = FinishClearOnDrop::new(self, endpoint);
        let mut prepared = self.prepare(endpoint, model, batch);
        while !self.apply_slice(endpoint, &mut prepared, now) {
            tokio::task::yield_now().await;
        }
        unfinished.disarm();
        prepared.applied()
    }

    /// A batch's keys, hashed without the write lock ([`PreparedBatch`]).
    fn prepare<'a>(
        &self,
        endpoint: EndpointId,
        model: &str,
        batch: &'a EventBatch,
    ) -> PreparedBatch<'a> {
        let needed = PreparedBatch::parents(batch);
        let mut parents = ParentKeys::with_capacity_and_hasher(needed.len(), Default::default());
        for chunk in needed.chunks(APPLY_SLICE) {
            self.index.read().parent_keys(endpoint, chunk, &mut parents);
        }
        PreparedBatch::new(&self.hasher, model, batch, &parents)
    }

    /// One slice of a prepared batch under the write lock; whether the batch is done.
    fn apply_slice(
        &self,
        endpoint: EndpointId,
        prepared: &mut PreparedBatch<'_>,
        now: Instant,
    ) -> bool {
        self.index
            .write()
            .apply_prepared(endpoint, prepared, APPLY_SLICE, now)
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

    /// Clears an endpoint's entries (`AllBlocksCleared`, an unfilled gap, removal), in slices
    /// of [`APPLY_SLICE`] slots, each under its own write lock: an endpoint holding 10 M keys
    /// takes seconds to clear, and the request path waits for one slice at most. Meanwhile
    /// the endpoint matches nothing and gains nothing ([`KvIndex::begin_clear`]).
    pub fn clear_endpoint(&self, endpoint: EndpointId) {
        self.index.write().begin_clear(endpoint);
        self.finish_clear(endpoint);
    }

    /// [`Self::clear_endpoint`], giving the runtime's other tasks their turn between two
    /// slices. Dropped midway, it finishes the clear before the drop returns.
    pub async fn clear_endpoint_yielding(&self, endpoint: EndpointId) {
        let mut unfinished = FinishClearOnDrop::new(self, endpoint);
        self.index.write().begin_clear(endpoint);
        while !self.clear_slice(endpoint) {
            tokio::task::yield_now().await;
        }
        unfinished.disarm();
    }

    /// Walks an endpoint's clear to its end (nothing if none was begun).
    fn finish_clear(&self, endpoint: EndpointId) {
        while !self.clear_slice(endpoint) {}
    }

    /// One slice of an endpoint's clear; whether it is done.
    fn clear_slice(&self, endpoint: EndpointId) -> bool {
        self.index.write().clear_some(endpoint, APPLY_SLICE).0
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

    /// A gap replay could not fill: the endpoint is scored from the approximate index for
    /// [`GAP_FALLBACK`], and its entries go.
    pub fn gap(&self, endpoint: EndpointId, now: Instant) {
        self.set_stream(endpoint, StreamState::Gap { since: now });
        self.clear_endpoint(endpoint);
    }

    /// [`Self::gap`], the clear giving the runtime's other tasks their turn between two
    /// slices ([`Self::clear_endpoint_yielding`]).
    pub async fn gap_yielding(&self, endpoint: EndpointId, now: Instant) {
        self.set_stream(endpoint, StreamState::Gap { since: now });
        self.clear_endpoint_yielding(endpoint).await;
    }

    /// An endpoint left the pool: its stream state, its entries and its engine hashes go. The
    /// entries are walked by the clear walker when there is one ([`Self::walk_clears`]),
    /// here otherwise.
    pub fn remove_endpoint(&self, endpoint: EndpointId) {
        self.set_stream(endpoint, StreamState::Unknown);
        {
            let mut index = self.index.write();
            index.begin_clear(endpoint);
            index.forget_engine_hashes(endpoint);
        }
        self.walk_or_hand_over(&[endpoint]);
    }

    /// Forgets every endpoint `live` refuses, as [`Self::remove_endpoint`].
    pub fn retain_endpoints(&self, live: impl Fn(EndpointId) -> bool) {
        {
            let mut streams = self.streams.write();
            for (i, s) in streams.iter_mut().enumerate() {
                if !live(EndpointId(i as u32)) {
                    *s = StreamState::Unknown;
                }
            }
        }
        let gone = self.index.write().begin_retain(&live);
        self.walk_or_hand_over(&gone);
    }

    /// Departed endpoints' clears are walked by a task of their own when the process runs one:
    /// a pool change (on the pool-changes task) and the KV-event supervisor both remove an
    /// endpoint, and neither should take a runtime worker for the seconds an endpoint of
    /// millions of keys takes to clear.
    fn walk_or_hand_over(&self, begun: &[EndpointId]) {
        if begun.is_empty() {
            return;
        }
        if self.clear_walker.load(Ordering::Acquire) {
            self.clears_begun.notify_one();
            return;
        }
        for &endpoint in begun {
            self.finish_clear(endpoint);
        }
    }

    /// Walks the clears of departed endpoints, a slice at a time with the runtime's other tasks
    /// served between two, for as long as it runs (a supervised task of the EPP's). From its
    /// first call, removals leave their clears to it.
    pub async fn walk_clears(&self) {
        self.clear_walker.store(true, Ordering::Release);
        loop {
            // Whatever was begun before this task (re)started, then whatever is begun next.
            loop {
                // The read guard must not live across the awaits below.
                let next = self.index.read().first_clearing();
                let Some(endpoint) = next else { break };
                while !self.clear_slice(endpoint) {
                    tokio::task::yield_now().await;
                }
            }
            self.clears_begun.notified().await;
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Poll, Waker};

    use kv_events::{BlockStored, Event, Medium};

    use super::*;

    const BLOCK: usize = 4;
    const MODEL: &str = "m";

    fn shared() -> SharedKvIndex {
        SharedKvIndex::new(
            KeyHasher::new(BLOCK, "", HashAlgorithm::CborFnv),
            IndexLimits::default(),
        )
    }

    /// One store of `blocks` blocks: a few slices' worth once past [`APPLY_SLICE`] / 2.
    fn store(blocks: u32) -> EventBatch {
        EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: (1..=u64::from(blocks)).collect(),
                parent_block_hash: None,
                token_ids: (0..blocks * BLOCK as u32).collect(),
                block_size: BLOCK as u32,
                lora_id: None,
                lora_name: None,
                medium: Medium::Gpu,
                group: None,
            })],
            data_parallel_rank: None,
        }
    }

    fn held(index: &SharedKvIndex, endpoint: EndpointId) -> usize {
        index.read(Instant::now(), |i| i.endpoint_keys(endpoint))
    }

    /// A clear that yields between slices and is dropped halfway is finished by the drop: a
    /// clear left begun would keep the endpoint from gaining anything for good.
    #[tokio::test]
    async fn a_clear_dropped_halfway_is_finished() {
        let index = shared();
        let (a, b) = (EndpointId(0), EndpointId(1));
        index.apply(a, MODEL, &store(10_000), Instant::now());
        index.apply(b, MODEL, &store(10), Instant::now());
        assert_eq!(held(&index, a), 10_000);
        {
            let mut clear = pin!(index.clear_endpoint_yielding(a));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(clear.as_mut().poll(&mut cx).is_pending());
            // One slice walked: being cleared, with keys of its left in the index.
            assert!(index.read(Instant::now(), |i| i.is_clearing(a)));
            assert!(index.len() > 10);
        }
        assert!(!index.read(Instant::now(), |i| i.is_clearing(a)));
        assert_eq!(held(&index, a), 0);
        assert_eq!(index.len(), 10, "endpoint 1's keys only");
        // It gains keys again.
        index.apply(a, MODEL, &store(5), Instant::now());
        assert_eq!(held(&index, a), 5);
    }

    /// The same for an `AllBlocksCleared` inside a batch applied by `apply_yielding`.
    #[tokio::test]
    async fn a_batch_dropped_halfway_through_its_clear_finishes_it() {
        let index = shared();
        let a = EndpointId(0);
        index.apply(a, MODEL, &store(10_000), Instant::now());
        let mut cleared = store(3);
        cleared.events.insert(0, Event::AllBlocksCleared);
        {
            let mut apply = pin!(index.apply_yielding(a, MODEL, &cleared, Instant::now()));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(apply.as_mut().poll(&mut cx).is_pending());
            assert!(index.read(Instant::now(), |i| i.is_clearing(a)));
        }
        assert!(!index.read(Instant::now(), |i| i.is_clearing(a)));
        // The batch's store, after the clear, was never applied: nothing is held.
        assert!(index.is_empty());
    }

    /// With a clear walker running, a removal hands the departed endpoint's clear over to it
    /// and returns: the walker clears it, a slice at a time.
    #[tokio::test]
    async fn departed_endpoints_are_cleared_by_the_walker() {
        let index = Arc::new(shared());
        let (a, b) = (EndpointId(0), EndpointId(1));
        index.apply(a, MODEL, &store(10_000), Instant::now());
        index.apply(b, MODEL, &store(10), Instant::now());
        index.set_stream(a, StreamState::Live);
        let walker = tokio::spawn({
            let index = index.clone();
            async move { index.walk_clears().await }
        });
        // The walker's first poll: from now on removals are its.
        tokio::task::yield_now().await;
        index.retain_endpoints(|id| id != a);
        assert_eq!(index.stream(a), StreamState::Unknown);
        let clearing = |i: &SharedKvIndex| i.read(Instant::now(), |i| i.is_clearing(a));
        assert!(clearing(&index), "handed over, not walked here");
        assert_eq!(index.len(), 10_000, "endpoint 1 holds the first 10 too");
        let mut turns = 0;
        while clearing(&index) {
            tokio::task::yield_now().await;
            turns += 1;
            assert!(turns < 100, "the walker walks");
        }
        assert!(turns > 1, "in slices: {turns}");
        assert_eq!(index.len(), 10);
        // And the next removal too.
        index.remove_endpoint(b);
        while !index.is_empty() {
            tokio::task::yield_now().await;
        }
        walker.abort();
    }

    /// A large batch applied by `apply_yielding` lets the runtime's other tasks run between
    /// its slices: a task on the same (single) thread sees the batch half applied.
    #[tokio::test]
    async fn a_large_batch_yields_between_its_slices() {
        let index = Arc::new(shared());
        let done = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn({
            let (index, done) = (index.clone(), done.clone());
            async move {
                let mut seen = Vec::new();
                while !done.load(Ordering::Acquire) {
                    seen.push(index.len());
                    tokio::task::yield_now().await;
                }
                seen
            }
        });
        let applied = index
            .apply_yielding(EndpointId(0), MODEL, &store(20_000), Instant::now())
            .await;
        done.store(true, Ordering::Release);
        let seen = watcher.await.unwrap();
        assert_eq!(applied.blocks, 20_000);
        assert_eq!(index.len(), 20_000);
        assert!(
            seen.iter().any(|&n| n > 0 && n < 20_000),
            "the other task ran between slices: {seen:?}"
        );
        // And a clear walked the same way ends with nothing held.
        index.clear_endpoint_yielding(EndpointId(0)).await;
        assert!(index.is_empty());
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            pin!(index.clear_endpoint_yielding(EndpointId(0))).poll(&mut cx),
            Poll::Ready(())
        );
    }
}
