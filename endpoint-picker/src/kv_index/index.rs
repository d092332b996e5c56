//! The precise prefix-cache index: which endpoint holds which block, in which tier, as the
//! engines' KV-cache events say.
//!
//! Blocks are known by their *request key* ([`super::keys`]): computed from the tokens, so the
//! request path and the event path agree without knowing the engine's hash function. Events
//! name blocks by the engine's own hash, so the index also keeps a map engine hash → request
//! keys (one or several, when the engine's block size differs from the index's) to resolve a
//! `BlockStored`'s parent and a `BlockRemoved`'s blocks. This is llm-d's dual-key design
//! (`llm-d/llm-d-router@ebab6879:pkg/kvevents/pool.go`, `pkg/kvcache/kvblock/in_memory.go`).
//!
//! Three structures, all bounded:
//! - `keys`: request key → up to `max_endpoints_per_key` entries `{endpoint, medium,
//!   speculative}`, an LRU capped at `max_keys` keys (recency: the last store or speculation);
//!   each key's entries are themselves in recency order, the oldest dropped past the cap;
//! - `engine`: (endpoint, engine hash) → request keys (at most [`MAX_KEYS_PER_ENGINE_HASH`] a
//!   hash), an LRU capped at `max_engine_keys` keys held by its entries together; per
//!   endpoint because equal engine hashes need not be equal blocks (vLLM's hash covers the
//!   tokens, not the model), and one engine must not decide how another's events resolve;
//!   a mapping it evicts takes its endpoint's entries for its keys with it, as no event could
//!   reach them after (`KvIndex::forget_unreachable`);
//! - `by_endpoint`: per endpoint, the slots of the keys it holds (the reverse index), so that
//!   clearing an endpoint costs its own entries, never a scan of the index. It is a log
//!   appended to when the endpoint first holds a key and compacted when it has grown to twice
//!   the keys held, not a set kept exact: an eviction then touches no reverse structure, where
//!   a set's removal was a cache miss per evicted block (bench/RESULTS.md, "Ingest"). The log
//!   is sharded by slot range, so one compaction reads one shard (a few milliseconds under
//!   the lock), however many keys the endpoint holds.
//!   A clear sets the endpoint's log aside and walks it a slice at a time
//!   ([`KvIndex::begin_clear`]); meanwhile the endpoint matches nothing and gains nothing.
//!
//! Speculative entries (a just-routed request's blocks on the chosen endpoint) live until
//! `speculative_ttl` after they were made, or until a real event for the same block and
//! endpoint replaces them. Their expiry queue is capped too (`max_speculative_keys`).
//!
//! The struct is plain data, tested without I/O; [`super::SharedKvIndex`] puts it behind a lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use kv_events::{BlockRemoved, BlockStored, Event, EventBatch, Medium};
use smallvec::SmallVec;
use tokio::time::Instant;

use super::keys::KeyHasher;
use super::slab::{KeyHashState, SlabLru, Slot};
use crate::datastore::EndpointId;

/// The default `inMemoryConfig.size`: request keys held at most. llm-d's is 100,000,000, which
/// here is some 21 GB of tables: 205 bytes a key, measured with its engine-hash mapping and one
/// holder (`bench/benches/kv_index.rs`'s `memory`, bench/RESULTS.md: 10,000,000 keys in 1,959
/// MiB of tables; a second holder fits inline, more spill). 10,000,000 keys is about 1.9 GiB,
/// within the EPP pod's 4 GiB memory limit (`manifests/epp/deployment.yaml`) with room for the
/// rest; at 16 tokens a block it indexes 160 M tokens of the pool's caches, some 300 engines'
/// GPU caches of 500k tokens (Llama-3.1-8B, 128 KiB a token, on an 80 GB GPU). Raise it with
/// the pod's memory limit (`inMemoryConfig.size`, at most 1,000,000,000).
pub const DEFAULT_MAX_KEYS: usize = 10_000_000;
/// llm-d's default `inMemoryConfig.podCacheSize`: entries per key at most.
pub const DEFAULT_MAX_ENDPOINTS_PER_KEY: usize = 10;
/// llm-d's default `speculativeTTL`.
pub const DEFAULT_SPECULATIVE_TTL: Duration = Duration::from_secs(2);
/// Speculative entries pending expiry at most (keys, summed over routed requests): about 2 s
/// of 1,000 requests a second with 250 blocks each. Past it the oldest expire early.
pub const DEFAULT_MAX_SPECULATIVE_KEYS: usize = 500_000;
/// Routed requests with pending speculative entries at most. Below 2^16 so that the 16-bit
/// generation of an entry names one pending request.
const MAX_SPECULATIVE_REQUESTS: usize = 65_000;

/// The index's bounds and the speculative TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexLimits {
    /// Request keys held at most (`inMemoryConfig.size`).
    pub max_keys: usize,
    /// Entries per key at most (`inMemoryConfig.podCacheSize`).
    pub max_endpoints_per_key: usize,
    /// Request keys the engine hashes remembered stand for, at most (the same as `max_keys`,
    /// as llm-d sizes its map; one key a hash when the engine's block size is the index's).
    /// Hashes are remembered per endpoint, so this counts a block once for every endpoint
    /// that announced it, where `max_keys` counts it once: with every replica holding the
    /// same prefixes, the engine table fills first. Past it the least recently used mappings
    /// go (one a store chains from counts as used) with their endpoint's entries for their
    /// keys, and the removals and children of those blocks are dropped as unknown until
    /// announced again.
    pub max_engine_keys: usize,
    /// Speculative entries pending expiry at most.
    pub max_speculative_keys: usize,
    /// How long a speculative entry lives.
    pub speculative_ttl: Duration,
}

impl Default for IndexLimits {
    fn default() -> Self {
        Self {
            max_keys: DEFAULT_MAX_KEYS,
            max_endpoints_per_key: DEFAULT_MAX_ENDPOINTS_PER_KEY,
            max_engine_keys: DEFAULT_MAX_KEYS,
            max_speculative_keys: DEFAULT_MAX_SPECULATIVE_KEYS,
            speculative_ttl: DEFAULT_SPECULATIVE_TTL,
        }
    }
}

/// How much a hit in each tier counts (llm-d's `kvCacheBackendConfigs`; a tier it does not
/// name counts 1.0, as there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierWeights(pub [f64; 4]);

impl Default for TierWeights {
    /// llm-d's defaults: gpu 1.0, cpu 0.8 (disk and remote unnamed: 1.0).
    fn default() -> Self {
        let mut w = [1.0; 4];
        w[tier(Medium::Cpu)] = 0.8;
        Self(w)
    }
}

impl TierWeights {
    /// The weight of a tier.
    #[inline]
    pub fn of(&self, medium: Medium) -> f64 {
        self.0[tier(medium)]
    }
}

/// The dense index of a medium.
#[inline]
pub fn tier(medium: Medium) -> usize {
    match medium {
        Medium::Gpu => 0,
        Medium::Cpu => 1,
        Medium::Disk => 2,
        Medium::Remote => 3,
    }
}

/// Every medium, in [`tier`] order.
pub const MEDIA: [Medium; 4] = [Medium::Gpu, Medium::Cpu, Medium::Disk, Medium::Remote];

/// One endpoint's copy of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    endpoint: u32,
    medium: Medium,
    speculative: bool,
    /// For speculative entries: the routed request that made it (see `Speculation`).
    generation: u16,
}

type Entries = SmallVec<[Entry; 2]>;
type RequestKeys = SmallVec<[u64; 1]>;

/// What one engine hash of one endpoint stands for: its request keys, and whose they are (the
/// endpoint and its id's epoch), so that a mapping the table evicts takes its endpoint's
/// entries for those keys with it: no later `BlockRemoved` could reach them.
#[derive(Debug, Clone, Default)]
struct EngineBlock {
    keys: RequestKeys,
    endpoint: u32,
    epoch: u32,
}

/// A routed request's speculative entries, pending expiry.
#[derive(Debug)]
struct Speculation {
    deadline: Instant,
    endpoint: EndpointId,
    generation: u16,
    keys: Box<[u64]>,
}

/// Why an event changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// `BlockStored` whose parent block the index does not know (missed events, or the EPP
    /// started after the engine): its keys cannot be computed.
    UnknownParent,
    /// `BlockStored` with tokens but not one full block of the index's block size.
    NoFullBlock,
    /// `BlockStored` without tokens (a tier copy) or `BlockRemoved` naming no known block.
    UnknownBlocks,
    /// `BlockStored` whose tokens do not fit its blocks: more than `block_size` a block (and
    /// one partial block), or more than [`MAX_KEYS_PER_ENGINE_HASH`] index blocks a hash or
    /// engine hashes an index block. No engine
    /// sends that; taken, one hash would stand for as many keys as the sender likes.
    Malformed,
    /// `BlockStored` (with or without tokens) of an endpoint being cleared by another task
    /// (its removal from the pool, say): what it adds would go with the clear
    /// ([`KvIndex::begin_clear`]).
    Clearing,
    /// `BlockStored` with tokens past what one batch may have hashed and mapped
    /// ([`MAX_BATCH_TOKENS`], [`MAX_BATCH_STORED_BLOCKS`]). No engine step sends that many.
    BatchCap,
    /// `BlockStored` some of whose new keys were refused: the index was full, its endpoint
    /// already held half of it, and room would have been made by evicting other endpoints'
    /// keys (`KvIndex::add`). One flooding endpoint cannot take the whole index.
    EndpointShare,
    /// `BlockStored` with tokens whose engine block (`block_size`) is not a multiple of the
    /// index's (`blockSizeTokens`): an engine block would end partway through an index block,
    /// so a child store chained from it would hash its tokens as if they began a new index
    /// block (keys no request has), and removing that engine block alone would remove an
    /// index key the engine's earlier blocks still hold. A misconfiguration, not one bad
    /// event: every store of that engine goes this way.
    BlockSize,
}

impl Dropped {
    /// Every reason, in [`Applied::dropped`]'s order.
    pub const ALL: [Dropped; 8] = [
        Dropped::UnknownParent,
        Dropped::NoFullBlock,
        Dropped::UnknownBlocks,
        Dropped::Malformed,
        Dropped::Clearing,
        Dropped::BatchCap,
        Dropped::EndpointShare,
        Dropped::BlockSize,
    ];

    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::UnknownParent => "unknown_parent",
            Dropped::NoFullBlock => "no_full_block",
            Dropped::UnknownBlocks => "unknown_blocks",
            Dropped::Malformed => "malformed",
            Dropped::Clearing => "clearing",
            Dropped::BatchCap => "batch_cap",
            Dropped::EndpointShare => "endpoint_share",
            Dropped::BlockSize => "block_size",
        }
    }
}

/// What applying a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events that changed the index.
    pub applied: u32,
    /// Events dropped, by reason ([`Dropped::ALL`]'s order).
    pub dropped: [u32; Dropped::ALL.len()],
    /// Blocks stored or removed by the applied events.
    pub blocks: u32,
}

impl Applied {
    /// Events dropped, whatever the reason.
    pub fn dropped_total(&self) -> u32 {
        self.dropped.iter().sum()
    }

    /// Events dropped for `reason`.
    pub fn dropped_for(&self, reason: Dropped) -> u32 {
        Dropped::ALL
            .iter()
            .position(|&r| r == reason)
            .map_or(0, |i| self.dropped[i])
    }

    fn drop(&mut self, reason: Dropped) {
        if let Some(i) = Dropped::ALL.iter().position(|&r| r == reason) {
            self.dropped[i] += 1;
        }
    }
}

/// One endpoint's match of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EndpointMatch {
    /// Leading blocks of the request the endpoint can use: held in one of its own tiers, or
    /// in the shared store ([`SharedMedia`]).
    pub blocks: u32,
    /// Those blocks weighted by their best tier's weight.
    pub weighted: f64,
    /// Of those blocks, how many the endpoint holds itself, by the tier it would read them
    /// from ([`tier`] order; the fastest: GPU, then CPU, then disk, then a medium that is not
    /// shared). Blocks in a shared medium are never counted here. Only the leading run of GPU
    /// blocks is read from the GPU, as the engine's prefix cache does: past it, a block is
    /// loaded from the endpoint's other copy when it has one (an engine's connector loads what
    /// follows its GPU prefix).
    pub by_tier: [u32; 4],
    /// Of those blocks, how many only the shared store provides (the endpoint holds no copy).
    /// `blocks = Σ by_tier + shared`.
    pub shared: u32,
    /// Leading blocks the endpoint's engine has announced in its own tiers, without the shared
    /// store: what a peer could pull from it. Speculative entries do not count: they stand for
    /// blocks of a request routed there that the engine may not have computed yet (at a cold
    /// start, seconds in its queue), and a pull of them loads nothing.
    pub local_run: u32,
    candidate: bool,
    /// Being cleared ([`KvIndex::begin_clear`]): its own entries are not read.
    clearing: bool,
    last_tier: u8,
    last_weight: f64,
    /// The run has left the GPU (a block read from elsewhere came first).
    gpu_closed: bool,
}

/// Which of an endpoint's copies of a block it reads (lower first): the GPU while its GPU
/// prefix lasts, then CPU, disk, the GPU past its prefix, and a medium that is not shared.
#[inline]
fn read_rank(t: usize, gpu_closed: bool) -> u8 {
    match t {
        0 if gpu_closed => 5,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 6,
    }
}

/// The result of a lookup, by endpoint id. Reusable across lookups.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    /// The request's blocks.
    pub total_blocks: usize,
    /// By endpoint id; endpoints that were not candidates match nothing.
    pub by_endpoint: Vec<EndpointMatch>,
    /// Leading blocks of the request the shared store holds (what any endpoint can load).
    pub shared_run: u32,
    /// Scratch: shared blocks among the first `i` keys, at `i`.
    shared_before: Vec<u32>,
}

/// Which media are one store shared by every endpoint of the pool (LMCache's remote backend):
/// a block one endpoint announces in such a medium counts for all of them. A bit set over
/// [`tier`] indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedMedia(u8);

impl Default for SharedMedia {
    /// `REMOTE` only (the tiers contract: one store shared by every replica).
    fn default() -> Self {
        Self::NONE.with(Medium::Remote)
    }
}

impl SharedMedia {
    /// No medium is shared: every entry counts only for its endpoint.
    pub const NONE: Self = Self(0);

    /// This set and `medium`.
    pub const fn with(self, medium: Medium) -> Self {
        Self(self.0 | 1 << tier_const(medium))
    }

    /// Whether `medium` is shared.
    #[inline]
    pub fn contains(self, medium: Medium) -> bool {
        self.0 & (1 << tier(medium)) != 0
    }

    /// The shared media, in [`tier`] order.
    pub fn iter(self) -> impl Iterator<Item = Medium> {
        MEDIA.into_iter().filter(move |m| self.contains(*m))
    }
}

const fn tier_const(medium: Medium) -> usize {
    match medium {
        Medium::Gpu => 0,
        Medium::Cpu => 1,
        Medium::Disk => 2,
        Medium::Remote => 3,
    }
}

impl Lookup {
    /// The match of an endpoint (zero when it was not a candidate).
    pub fn of(&self, id: EndpointId) -> EndpointMatch {
        self.by_endpoint
            .get(id.0 as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Whether `id` was a candidate of the lookup.
    pub fn is_candidate(&self, id: EndpointId) -> bool {
        self.by_endpoint
            .get(id.0 as usize)
            .is_some_and(|m| m.candidate)
    }

    /// The weighted match as a fraction of the request's blocks, in `[0, 1]` (llm-d HEAD's
    /// `prefix-cache-scorer`: matched / total).
    pub fn score(&self, id: EndpointId) -> f64 {
        if self.total_blocks == 0 {
            return 0.0;
        }
        (self.of(id).weighted / self.total_blocks as f64).clamp(0.0, 1.0)
    }
}

/// Counts a copy or removal event: applied when one of its hashes was known.
fn settle(out: &mut Applied, known: u32) {
    if known > 0 {
        out.applied += 1;
        out.blocks = out.blocks.saturating_add(known);
    } else {
        out.drop(Dropped::UnknownBlocks);
    }
}

/// Engine hash → the request key a batch's store chains from ([`KvIndex::parent_keys`]).
/// Keyed as the index's own tables are: the hashes come from engines.
pub type ParentKeys = HashMap<u64, u64, KeyHashState>;

/// A batch with its request keys computed, ready to apply. The hashing (most of a batch's cost:
/// one hash per block, over its tokens) is done without the index's lock, from the parents' keys
/// looked up before ([`KvIndex::parent_keys`], under a read lock); a parent announced earlier in
/// the same batch chains from that announcement, as when the events are applied one by one.
/// [`KvIndex::apply_prepared`] then applies it, in slices.
#[derive(Debug, Default)]
pub struct PreparedBatch<'a> {
    ops: Vec<Op<'a>>,
    /// The op being applied, and how far into it.
    next: usize,
    pos: usize,
    /// Hashes of the current copy or removal that were known.
    partial: u32,
    started: bool,
    out: Applied,
}

/// One event, prepared.
#[derive(Debug)]
enum Op<'a> {
    /// `BlockStored` with tokens: the engine hashes' keys ([`engine_pairs`]), then the keys,
    /// stored deepest first.
    Store {
        medium: Medium,
        /// The engine hash it chains from, when the index knew it: its mapping is used, so it
        /// is kept as recent (a hot prefix's last block is stored once and chained from for
        /// as long as the engine holds it).
        parent: Option<u64>,
        engine: Vec<(u64, RequestKeys)>,
        keys: Vec<u64>,
    },
    /// `BlockStored` without tokens: copies of blocks the engine hashes map to.
    Copies(&'a BlockStored),
    /// `BlockRemoved`.
    Remove(&'a BlockRemoved),
    /// `AllBlocksCleared`.
    Clear,
}

impl Op<'_> {
    /// Units of work ([`KvIndex::apply_prepared`]).
    fn units(&self) -> usize {
        match self {
            Op::Store { engine, keys, .. } => engine.len() + keys.len(),
            Op::Copies(ev) => ev.block_hashes.len(),
            Op::Remove(ev) => ev.block_hashes.len(),
            // What clearing costs is known when it runs (`KvIndex::clear_some`).
            Op::Clear => 1,
        }
    }
}

impl<'a> PreparedBatch<'a> {
    /// The parent hashes `batch`'s stores chain from (distinct, in order): what
    /// [`KvIndex::parent_keys`] looks up before [`PreparedBatch::new`].
    pub fn parents(batch: &EventBatch) -> Vec<u64> {
        let mut seen: HashSet<u64, KeyHashState> = HashSet::default();
        batch
            .events
            .iter()
            .filter_map(|e| match e {
                Event::BlockStored(ev) if !ev.token_ids.is_empty() => ev.parent_block_hash,
                _ => None,
            })
            // vLLM's simulators sent 0 for "no parent" (llm-d reads 0 that way too).
            .filter(|&h| h != 0 && seen.insert(h))
            .collect()
    }

    /// Computes `batch`'s keys with `hasher` (no lock held): `parents` maps the parent hashes
    /// the index knew to their keys. Events that cannot apply are counted dropped here.
    pub fn new(
        hasher: &KeyHasher,
        model: &str,
        batch: &'a EventBatch,
        parents: &ParentKeys,
    ) -> Self {
        let mut out = Applied::default();
        let mut ops = Vec::with_capacity(batch.events.len());
        // Engine hash → the last key it maps to, as this batch's own stores announce them.
        // Grown by the stores that pass the checks below, not sized from every hash the
        // batch names: those of stores dropped would be allocated all the same.
        let mut own = ParentKeys::with_hasher(KeyHashState::random());
        // What the batch's stores may still have hashed and mapped (see `MAX_BATCH_TOKENS`).
        let (mut tokens_left, mut blocks_left) = (MAX_BATCH_TOKENS, MAX_BATCH_STORED_BLOCKS);
        for event in &batch.events {
            let ev = match event {
                Event::BlockStored(ev) if ev.token_ids.is_empty() => {
                    ops.push(Op::Copies(ev));
                    continue;
                }
                Event::BlockStored(ev) => ev,
                Event::BlockRemoved(ev) => {
                    ops.push(Op::Remove(ev));
                    continue;
                }
                Event::AllBlocksCleared => {
                    ops.push(Op::Clear);
                    continue;
                }
            };
            // Checked first: whatever else is wrong with such a store, its keys would be too
            // (see `Dropped::BlockSize`). A size of 0 is an encoding that does not carry it (or
            // a simulator's): taken as before, as engine blocks of any size.
            if ev.block_size != 0 && !(ev.block_size as usize).is_multiple_of(hasher.block_size()) {
                out.drop(Dropped::BlockSize);
                continue;
            }
            let (parent, parent_hash) = match ev.parent_block_hash {
                Some(hash) if hash != 0 => match own.get(&hash).or_else(|| parents.get(&hash)) {
                    Some(&key) => (key, Some(hash)),
                    None => {
                        out.drop(Dropped::UnknownParent);
                        continue;
                    }
                },
                _ => {
                    let name = ev
                        .lora_name
                        .as_deref()
                        .filter(|n| !n.is_empty())
                        .unwrap_or(model);
                    (hasher.root(name), None)
                }
            };
            // A trailing partial block is let through (its tokens make no key).
            let holds = (ev.block_size as usize).saturating_mul(ev.block_hashes.len() + 1);
            if ev.block_size > 0 && ev.token_ids.len() > holds {
                out.drop(Dropped::Malformed);
                continue;
            }
            // Charged before the hashing, whether the store then passes or not: what it
            // costs is the hashing and the mappings.
            let (t, b) = (ev.token_ids.len(), ev.block_hashes.len());
            if t > tokens_left || b > blocks_left {
                out.drop(Dropped::BatchCap);
                continue;
            }
            tokens_left -= t;
            blocks_left -= b;
            let mut keys = Vec::new();
            hasher.keys_into(parent, &ev.token_ids, None, usize::MAX, &mut keys);
            if keys.is_empty() {
                out.drop(Dropped::NoFullBlock);
                continue;
            }
            // Either way round: an engine block of up to 64 index blocks, or (an engine that
            // does not say its block size) an index block of up to 64 engine hashes.
            let (hashes, n) = (ev.block_hashes.len(), keys.len());
            if n > hashes.saturating_mul(MAX_KEYS_PER_ENGINE_HASH)
                || hashes > n.saturating_mul(MAX_KEYS_PER_ENGINE_HASH)
            {
                out.drop(Dropped::Malformed);
                continue;
            }
            let engine = engine_pairs(&ev.block_hashes, &keys);
            // A hash repeated side by side is one entry: it must not stand for more either.
            if engine
                .iter()
                .any(|(_, ks)| ks.len() > MAX_KEYS_PER_ENGINE_HASH)
            {
                out.drop(Dropped::Malformed);
                continue;
            }
            for (hash, ks) in &engine {
                if let Some(&last) = ks.last() {
                    own.insert(*hash, last);
                }
            }
            ops.push(Op::Store {
                medium: ev.medium,
                parent: parent_hash,
                engine,
                keys,
            });
        }
        Self {
            ops,
            out,
            ..Self::default()
        }
    }

    /// What applying the batch did (all of it once [`KvIndex::apply_prepared`] returned true).
    pub fn applied(&self) -> Applied {
        self.out
    }

    /// Whether every event has been applied.
    pub fn is_done(&self) -> bool {
        self.next >= self.ops.len()
    }
}

/// Token ids the `BlockStored` events of one batch may have hashed, at most: 2^20, 64 times
/// the 16,384 tokens of a large engine step (vLLM's `max_num_batched_tokens` is 8,192 by
/// default), a few tens of milliseconds of hashing. The decoder alone lets an 8 MiB frame
/// through with millions (one byte each), which [`PreparedBatch::new`] would hash off the
/// lock but on a runtime worker, with the keys and mappings allocated outside any budget.
/// Stores past it are dropped ([`Dropped::BatchCap`]); their children then miss their parent.
pub const MAX_BATCH_TOKENS: usize = 1 << 20;

/// Engine block hashes the `BlockStored` events (with tokens) of one batch may map, at most:
/// 2^18, the blocks of [`MAX_BATCH_TOKENS`] at vLLM's 16 tokens a block and 4 times more.
/// Bounds the batch's own engine-hash map and its engine-to-key pairs (a few MiB).
pub const MAX_BATCH_STORED_BLOCKS: usize = 1 << 18;

/// Most speculative keys one [`KvIndex::expire`] drops (as many as a slice of a batch).
pub const EXPIRE_SLICE: usize = 4_096;

/// Most index blocks one engine hash may stand for: an engine block of up to 64 times the
/// index's block size (vLLM's largest block size is 256 tokens against the index's 16 by
/// default). Bounds what an engine-hash entry holds and what one hash of a copy or removal
/// costs.
pub const MAX_KEYS_PER_ENGINE_HASH: usize = 64;

/// Engine hash → request keys, spread in proportion as llm-d does (`engineToRequestMapping`):
/// with 4 engine hashes and 4 keys one each; 16 hashes for 4 keys, four hashes per key; 2
/// hashes for 4 keys, two keys per hash.
fn engine_pairs(hashes: &[u64], keys: &[u64]) -> Vec<(u64, RequestKeys)> {
    let (ne, nr) = (hashes.len(), keys.len());
    let mut out: Vec<(u64, RequestKeys)> = Vec::with_capacity(ne.min(nr));
    if ne == 0 || nr == 0 {
        return out;
    }
    let n = ne.max(nr);
    for i in 0..n {
        let hash = hashes[i * ne / n];
        let key = keys[i * nr / n];
        match out.last_mut() {
            Some((h, ks)) if *h == hash => {
                if ks.last() != Some(&key) {
                    ks.push(key);
                }
            }
            _ => out.push((hash, smallvec::smallvec![key])),
        }
    }
    out
}

/// Slots per shard of an endpoint's reverse log (2^16): a compaction sorts and reads at most
/// twice that many plus [`LOG_SLACK`], about 5 ms, where one log of an endpoint holding 10 M
/// keys took 0.85 s to compact.
#[cfg(not(test))]
const SHARD_BITS: u32 = 16;
/// Small shards in tests, so that the property tests' few keys span many.
#[cfg(test)]
const SHARD_BITS: u32 = 3;
/// Past twice the keys it holds and this many more, a shard of a log is compacted.
const LOG_SLACK: usize = 64;

/// An endpoint's reverse index: the slots of the keys it holds entries for.
#[derive(Debug, Default)]
struct Held {
    /// By slot range (`slot >> SHARD_BITS`).
    shards: Vec<Shard>,
    /// Keys the endpoint holds an entry for.
    keys: usize,
}

/// One slot range of a [`Held`].
#[derive(Debug, Default)]
struct Shard {
    /// Every slot of the range where the endpoint came to hold a key, since the last
    /// compaction: a superset of the slots it holds (a slot stays after the key left, or went
    /// to another key), with repeats.
    slots: Vec<Slot>,
    /// Keys of the range the endpoint holds an entry for.
    keys: usize,
}

impl Held {
    /// Every logged slot (with the stale ones and the repeats).
    #[cfg(test)]
    fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.shards.iter().flat_map(|s| s.slots.iter().copied())
    }

    fn heap_bytes(&self) -> usize {
        let slots: usize = self.shards.iter().map(|s| s.slots.capacity()).sum();
        slots * std::mem::size_of::<Slot>() + self.shards.capacity() * std::mem::size_of::<Shard>()
    }
}

/// The index.
#[derive(Debug)]
pub struct KvIndex {
    hasher: KeyHasher,
    limits: IndexLimits,
    keys: SlabLru<Entries>,
    engine: SlabLru<EngineBlock>,
    /// Request keys the engine table's entries hold together (its cap).
    engine_held: usize,
    by_endpoint: Vec<Option<Held>>,
    /// Endpoints whose entries are being cleared, with what is left of their reverse index
    /// ([`KvIndex::begin_clear`]): until it is done they match nothing and gain no entry.
    clearing: Vec<(u32, Held)>,
    /// Mixed into every engine hash with the endpoint's id and epoch ([`KvIndex::engine_key`]).
    engine_salt: KeyHashState,
    /// Per endpoint id, how many times it left the pool: an id reused by a new endpoint does
    /// not resolve its events through its predecessor's engine hashes.
    engine_epochs: Vec<u32>,
    entries: usize,
    speculations: VecDeque<Speculation>,
    speculative_keys: usize,
    next_generation: u16,
}

impl KvIndex {
    /// An empty index computing keys with `hasher`, within `limits`.
    pub fn new(hasher: KeyHasher, limits: IndexLimits) -> Self {
        Self {
            hasher,
            limits: IndexLimits {
                max_keys: limits.max_keys.max(1),
                max_endpoints_per_key: limits.max_endpoints_per_key.max(1),
                max_engine_keys: limits.max_engine_keys.max(1),
                ..limits
            },
            keys: SlabLru::default(),
            engine: SlabLru::default(),
            engine_held: 0,
            by_endpoint: Vec::new(),
            clearing: Vec::new(),
            engine_salt: KeyHashState::random(),
            engine_epochs: Vec::new(),
            entries: 0,
            speculations: VecDeque::new(),
            speculative_keys: 0,
            next_generation: 0,
        }
    }

    /// The key hasher (the request path computes its keys with it).
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// The limits.
    pub fn limits(&self) -> &IndexLimits {
        &self.limits
    }

    /// Request keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// (key, endpoint, tier) entries held, speculative ones included.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Engine hashes remembered.
    pub fn engine_keys(&self) -> usize {
        self.engine.len()
    }

    /// Keys an endpoint holds an entry for.
    pub fn endpoint_keys(&self, id: EndpointId) -> usize {
        self.by_endpoint
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .map_or(0, |h| h.keys)
    }

    /// Bytes the index's tables take (the allocations, not counting allocator overhead): the
    /// key and engine slabs with their hash tables and the reverse logs (not the entries
    /// spilled out of line: more than two on one key).
    pub fn heap_bytes(&self) -> usize {
        let reverse: usize = self
            .by_endpoint
            .iter()
            .flatten()
            .map(Held::heap_bytes)
            .sum();
        self.keys.heap_bytes() + self.engine.heap_bytes() + reverse
    }

    /// The earliest moment a speculative entry expires, if any is pending.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.speculations.front().map(|s| s.deadline)
    }

    // === ingest ===

    /// Applies one batch of `endpoint`'s events. `model` is the model the engine serves (from
    /// the event topic); blocks of a LoRA adapter chain from the adapter's name instead.
    ///
    /// The same steps as [`super::SharedKvIndex::apply`], all at once: the batch's parents are
    /// looked up, its keys computed ([`PreparedBatch`]), then the whole batch applied.
    pub fn apply(
        &mut self,
        endpoint: EndpointId,
        model: &str,
        batch: &EventBatch,
        now: Instant,
    ) -> Applied {
        let mut parents = ParentKeys::default();
        self.parent_keys(endpoint, &PreparedBatch::parents(batch), &mut parents);
        let mut prepared = PreparedBatch::new(&self.hasher, model, batch, &parents);
        self.apply_prepared(endpoint, &mut prepared, usize::MAX, now);
        prepared.applied()
    }

    /// The request key each of `hashes` (a batch's parents, [`PreparedBatch::parents`])
    /// chains from, for those `endpoint`'s events mapped, into `out`. Reads only.
    pub fn parent_keys(&self, endpoint: EndpointId, hashes: &[u64], out: &mut ParentKeys) {
        for &hash in hashes {
            let engine_key = self.engine_key(endpoint, hash);
            if let Some(&key) = self.engine.get(engine_key).and_then(|b| b.keys.last()) {
                out.insert(hash, key);
            }
        }
    }

    /// Applies what is left of a prepared batch of `endpoint`'s events, `budget` units of work
    /// at most (a unit: one engine hash mapped, one key stored, one key a hash of a copy or a
    /// removal stands for (at least one a hash), one event with nothing to map; an event that
    /// needs more is continued on the next call). Returns whether the batch is done. The first call also drops the expired
    /// speculative entries.
    pub fn apply_prepared(
        &mut self,
        endpoint: EndpointId,
        prepared: &mut PreparedBatch<'_>,
        budget: usize,
        now: Instant,
    ) -> bool {
        if !prepared.started {
            prepared.started = true;
            self.expire(now);
        }
        let mut left = budget.max(1);
        let PreparedBatch {
            ops,
            next,
            pos,
            partial,
            out,
            ..
        } = prepared;
        while let Some(op) = ops.get_mut(*next) {
            if left == 0 {
                return false;
            }
            if *pos == 0
                && matches!(op, Op::Store { .. } | Op::Copies(_))
                && self.is_clearing(endpoint)
            {
                // Refused by `add` anyway: counted for what it is.
                out.drop(Dropped::Clearing);
                *next += 1;
                left -= 1;
                continue;
            }
            let total = op.units();
            let mut end = total.min(pos.saturating_add(left));
            // Copies and removals count the keys their hashes stand for (at least one a hash),
            // so that a slice is bounded by the work it does.
            let mut spent = None;
            match op {
                Op::Store {
                    medium,
                    parent,
                    engine,
                    keys,
                } => {
                    if *pos == 0
                        && let Some(hash) = *parent
                        && let Some(slot) = self.engine.slot(self.engine_key(endpoint, hash))
                    {
                        self.engine.touch(slot);
                    }
                    self.warm(endpoint, engine, keys, *pos, end);
                    for i in *pos..end {
                        if let Some((hash, ks)) = engine.get_mut(i) {
                            self.set_engine(endpoint, *hash, std::mem::take(ks));
                            continue;
                        }
                        // Deepest block first, so that the leading blocks are the most recent:
                        // a lookup stops at its first miss, so when the cap takes something it
                        // should be a chain's tail (and a reader between two slices sees a
                        // chain's tail before its head, which matches nothing yet).
                        let j = keys.len() + engine.len() - 1 - i;
                        if let Some(&key) = keys.get(j)
                            && !self.add(key, endpoint, *medium, None)
                        {
                            // Keys refused, across the store's slices.
                            *partial += 1;
                        }
                    }
                    if end == total {
                        out.applied += 1;
                        out.blocks = out.blocks.saturating_add(keys.len() as u32);
                        if *partial > 0 {
                            out.drop(Dropped::EndpointShare);
                        }
                    }
                }
                Op::Copies(ev) => {
                    // vLLM's CPU offloading announces copies of blocks it stored before, by
                    // hash only.
                    let (mut i, mut work) = (*pos, 0);
                    while let Some(&hash) = ev.block_hashes.get(i).filter(|_| work < left) {
                        i += 1;
                        let engine_key = self.engine_key(endpoint, hash);
                        let Some(keys) = self.engine.get(engine_key).map(|b| b.keys.clone()) else {
                            work += 1;
                            continue;
                        };
                        work += keys.len().max(1);
                        for key in keys {
                            self.add(key, endpoint, ev.medium, None);
                        }
                        *partial += 1;
                    }
                    (end, spent) = (i, Some(work));
                    if end == total {
                        settle(out, *partial);
                    }
                }
                Op::Remove(ev) => {
                    let (mut i, mut work) = (*pos, 0);
                    while let Some(&hash) = ev.block_hashes.get(i).filter(|_| work < left) {
                        i += 1;
                        match self.remove_hash(endpoint, ev.medium, hash) {
                            Some(keys) => {
                                work += keys.max(1);
                                *partial += 1;
                            }
                            None => work += 1,
                        }
                    }
                    (end, spent) = (i, Some(work));
                    if end == total {
                        settle(out, *partial);
                    }
                }
                Op::Clear => {
                    // Cleared in slices of the budget: `partial` says the clear has begun.
                    if *partial == 0 {
                        self.begin_clear(endpoint);
                        *partial = 1;
                    }
                    let (done, work) = self.clear_some(endpoint, left);
                    spent = Some(work);
                    if done {
                        out.applied += 1;
                    } else {
                        end = *pos;
                    }
                }
            }
            // An event with nothing to map still costs a unit, so a slice stays bounded.
            left = left.saturating_sub(spent.unwrap_or(end - *pos).max(1));
            if end == total {
                *next += 1;
                *pos = 0;
                *partial = 0;
            } else {
                *pos = end;
            }
        }
        true
    }

    /// Reads ahead what units `pos..end` of a store will write ([`SlabLru::warm`]): the engine
    /// hashes' and the keys' table slots, and those of the entries they will evict.
    fn warm(
        &self,
        endpoint: EndpointId,
        engine: &[(u64, RequestKeys)],
        keys: &[u64],
        pos: usize,
        end: usize,
    ) {
        let split = engine.len();
        let hashes = engine
            .get(pos.min(split)..end.min(split))
            .unwrap_or_default();
        let spare_engine = self
            .limits
            .max_engine_keys
            .saturating_sub(self.engine.len());
        self.engine.warm(
            hashes.iter().map(|(h, _)| self.engine_key(endpoint, *h)),
            hashes.len().saturating_sub(spare_engine),
        );
        // Keys are stored deepest first: unit `i` past the engine pairs is key `len - 1 - (i -
        // split)`.
        let (from, to) = (pos.max(split) - split, end.max(split) - split);
        let n = keys.len();
        let stored = keys.get(n - to.min(n)..n - from.min(n)).unwrap_or_default();
        let spare = self.limits.max_keys.saturating_sub(self.keys.len());
        self.keys
            .warm(stored.iter().copied(), stored.len().saturating_sub(spare));
    }

    /// The engine table's key for `endpoint`'s hash `hash`. Engine hashes are namespaced per
    /// endpoint: vLLM's block hash covers the tokens, not the model, so two engines' equal
    /// hashes can stand for different request keys (two models with the same system prompt,
    /// or an engine that announces a hash it does not hold); one endpoint's events never
    /// resolve through another's mapping. The per-endpoint salt is keyed by a random seed, so
    /// no engine can pick a hash that lands on another endpoint's entry.
    #[inline]
    fn engine_key(&self, endpoint: EndpointId, hash: u64) -> u64 {
        let epoch = self.epoch_of(endpoint);
        hash ^ self
            .engine_salt
            .hash_u64(u64::from(epoch) << 32 | u64::from(endpoint.0))
    }

    /// How many times `endpoint`'s id was given up ([`KvIndex::forget_engine_hashes`]).
    #[inline]
    fn epoch_of(&self, endpoint: EndpointId) -> u32 {
        self.engine_epochs
            .get(endpoint.0 as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The endpoint left the pool: its engine hashes are forgotten (left to age out of the
    /// table), so that a new endpoint given its id starts with none.
    pub fn forget_engine_hashes(&mut self, endpoint: EndpointId) {
        let i = endpoint.0 as usize;
        if self.engine_epochs.len() <= i {
            self.engine_epochs.resize(i + 1, 0);
        }
        self.engine_epochs[i] = self.engine_epochs[i].wrapping_add(1);
    }

    /// Maps `endpoint`'s engine hash `hash` to `keys`. The table is capped by the keys its
    /// entries hold together (an entry holds up to [`MAX_KEYS_PER_ENGINE_HASH`]), oldest
    /// entries out first, each with its endpoint's entries for its keys
    /// ([`KvIndex::forget_unreachable`]).
    fn set_engine(&mut self, endpoint: EndpointId, hash: u64, keys: RequestKeys) {
        let engine_key = self.engine_key(endpoint, hash);
        let epoch = self.epoch_of(endpoint);
        let (slot, _) = self.engine.insert_with(engine_key, EngineBlock::default);
        if let Some(v) = self.engine.at_mut(slot) {
            self.engine_held = self.engine_held - v.keys.len() + keys.len();
            *v = EngineBlock {
                keys,
                endpoint: endpoint.0,
                epoch,
            };
        }
        while self.engine_held > self.limits.max_engine_keys && self.engine.len() > 1 {
            match self
                .engine
                .oldest()
                .and_then(|oldest| self.engine.remove(oldest))
            {
                Some((_, gone)) => {
                    self.engine_held -= gone.keys.len();
                    self.forget_unreachable(&gone);
                }
                None => break,
            }
        }
    }

    /// An evicted mapping's keys, forgotten for its endpoint (its engine's entries in every
    /// tier; speculative ones expire on their own). Kept, they would match requests for as
    /// long as the keys stayed in the table, after the engine evicted the blocks: its
    /// `BlockRemoved` finds no mapping. Forgotten, the endpoint under-reports what it still
    /// holds, which a miss costs less than a false hit does (a prefill where a hit was
    /// predicted). A mapping of an earlier epoch (an endpoint gone, its id given again) is
    /// not the current endpoint's: its entries went with the old one.
    fn forget_unreachable(&mut self, gone: &EngineBlock) {
        if gone.epoch != self.epoch_of(EndpointId(gone.endpoint)) {
            return;
        }
        for &key in &gone.keys {
            if let Some(slot) = self.keys.slot(key) {
                self.retain_entries(slot, |e| e.endpoint != gone.endpoint || e.speculative);
            }
        }
    }

    /// One hash of a `BlockRemoved`: the endpoint's entries in that tier for the keys the hash
    /// maps to. Returns how many keys that was, `None` if the hash was not known.
    fn remove_hash(&mut self, endpoint: EndpointId, medium: Medium, hash: u64) -> Option<usize> {
        let engine_slot = self.engine.slot(self.engine_key(endpoint, hash))?;
        let keys = self
            .engine
            .at(engine_slot)
            .map(|b| b.keys.clone())
            .unwrap_or_default();
        let mut all_gone = true;
        for &key in &keys {
            let Some(slot) = self.keys.slot(key) else {
                continue;
            };
            self.retain_entries(slot, |e| {
                !(e.endpoint == endpoint.0 && e.medium == medium && !e.speculative)
            });
            if self.holds(slot, endpoint.0) {
                all_gone = false;
            }
        }
        // The endpoint still holds the blocks in another tier: keep the mapping for its events.
        if all_gone && let Some((_, gone)) = self.engine.remove(engine_slot) {
            self.engine_held -= gone.keys.len();
        }
        Some(keys.len())
    }

    /// Forgets everything an endpoint holds (`AllBlocksCleared`, a sequence gap that replay did
    /// not fill, the endpoint leaving the pool), at once: [`KvIndex::begin_clear`], then
    /// [`KvIndex::clear_some`] to the end. Costs the endpoint's own entries.
    pub fn clear_endpoint(&mut self, endpoint: EndpointId) {
        self.begin_clear(endpoint);
        while !self.clear_some(endpoint, usize::MAX).0 {}
    }

    /// Begins forgetting everything an endpoint holds. Its reverse index is set aside for
    /// [`KvIndex::clear_some`] to walk, a slice at a time (an endpoint of 10 M keys takes
    /// seconds to clear, which one hold of the lock must not). Until that is done the
    /// endpoint matches nothing and gains no entry, so what it held can never be told apart
    /// from what it gains: a clear is all of its entries or none.
    pub fn begin_clear(&mut self, endpoint: EndpointId) {
        let Some(held) = self
            .by_endpoint
            .get_mut(endpoint.0 as usize)
            .and_then(Option::take)
        else {
            // Nothing held (an endpoint being cleared gains nothing meanwhile).
            return;
        };
        match self.clearing.iter_mut().find(|(e, _)| *e == endpoint.0) {
            Some((_, pending)) => pending.shards.extend(held.shards),
            None => self.clearing.push((endpoint.0, held)),
        }
    }

    /// An endpoint being cleared, if any.
    pub fn first_clearing(&self) -> Option<EndpointId> {
        self.clearing.first().map(|(e, _)| EndpointId(*e))
    }

    /// Whether `endpoint` is being cleared ([`KvIndex::begin_clear`]).
    pub fn is_clearing(&self, endpoint: EndpointId) -> bool {
        !self.clearing.is_empty() && self.clearing.iter().any(|(e, _)| *e == endpoint.0)
    }

    /// Walks `budget` logged slots at most of the endpoint's clear. Returns whether it is done
    /// (also when none was begun) and the slots walked (at least 1, a unit of work).
    pub fn clear_some(&mut self, endpoint: EndpointId, budget: usize) -> (bool, usize) {
        let Some(at) = self.clearing.iter().position(|(e, _)| *e == endpoint.0) else {
            return (true, 1);
        };
        let (_, mut held) = self.clearing.swap_remove(at);
        let mut work = 0;
        while work < budget
            && let Some(shard) = held.shards.last_mut()
        {
            let Some(slot) = shard.slots.pop() else {
                held.shards.pop();
                continue;
            };
            work += 1;
            // A slot the endpoint no longer holds (or that is logged twice) removes nothing.
            let Some(entries) = self.keys.at_mut(slot) else {
                continue;
            };
            let before = entries.len();
            entries.retain(|e| e.endpoint != endpoint.0);
            self.entries -= before - entries.len();
            if entries.is_empty() {
                self.keys.remove(slot);
            }
        }
        while held.shards.last().is_some_and(|s| s.slots.is_empty()) {
            held.shards.pop();
        }
        let done = held.shards.is_empty();
        if !done {
            self.clearing.push((endpoint.0, held));
        }
        (done, work.max(1))
    }

    /// Forgets every endpoint whose id `live` refuses (pool membership changed), at once.
    pub fn retain_endpoints(&mut self, live: impl Fn(EndpointId) -> bool) {
        for id in self.begin_retain(live) {
            self.clear_endpoint(id);
        }
    }

    /// Begins clearing every endpoint whose id `live` refuses; returns them, for
    /// [`KvIndex::clear_some`].
    pub fn begin_retain(&mut self, live: impl Fn(EndpointId) -> bool) -> Vec<EndpointId> {
        let gone: Vec<EndpointId> = self
            .by_endpoint
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| EndpointId(i as u32))
            .filter(|&id| !live(id))
            .collect();
        for &id in &gone {
            self.begin_clear(id);
            self.forget_engine_hashes(id);
        }
        gone
    }

    // === speculation ===

    /// Records that `endpoint` will soon hold `keys` (it was just routed a request with these
    /// blocks), until `now + speculative_ttl` or until its events say so.
    pub fn speculate(&mut self, endpoint: EndpointId, keys: &[u64], now: Instant) {
        self.expire(now);
        if keys.is_empty() || self.limits.speculative_ttl.is_zero() || self.is_clearing(endpoint) {
            return;
        }
        let keys = &keys[..keys.len().min(self.limits.max_speculative_keys)];
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        for &key in keys.iter().rev() {
            self.add(key, endpoint, Medium::Gpu, Some(generation));
        }
        self.speculations.push_back(Speculation {
            deadline: now + self.limits.speculative_ttl,
            endpoint,
            generation,
            keys: keys.into(),
        });
        self.speculative_keys += keys.len();
        while self.speculations.len() > MAX_SPECULATIVE_REQUESTS
            || self.speculative_keys > self.limits.max_speculative_keys
        {
            self.expire_front();
        }
    }

    /// Drops the speculative entries whose time is up, some [`EXPIRE_SLICE`] keys' worth at
    /// most (at least one request's): it runs under the write lock on the request path, and
    /// a burst of speculations all due at once would otherwise be dropped in one hold. What is
    /// left is dropped by the next calls (every read, speculation and batch makes one).
    pub fn expire(&mut self, now: Instant) {
        let mut spent = 0;
        while spent < EXPIRE_SLICE
            && let Some(front) = self.speculations.front().filter(|s| s.deadline <= now)
        {
            spent += front.keys.len().max(1);
            self.expire_front();
        }
    }

    fn expire_front(&mut self) {
        let Some(spec) = self.speculations.pop_front() else {
            return;
        };
        self.speculative_keys -= spec.keys.len();
        for &key in spec.keys.iter() {
            if let Some(slot) = self.keys.slot(key) {
                self.retain_entries(slot, |e| {
                    !(e.speculative
                        && e.endpoint == spec.endpoint.0
                        && e.generation == spec.generation)
                });
            }
        }
    }

    // === entries ===

    /// Adds (or refreshes) an entry; `speculative` carries the generation of a speculative one.
    /// Returns false when refused for the endpoint's share ([`Dropped::EndpointShare`]).
    fn add(
        &mut self,
        key: u64,
        endpoint: EndpointId,
        medium: Medium,
        speculative: Option<u16>,
    ) -> bool {
        // What an endpoint gains while it is cleared would be cleared with it.
        if self.is_clearing(endpoint) {
            return true;
        }
        // The key table is one LRU for the pool: left alone, one endpoint storing blocks of
        // random tokens (a compromised pod) would evict every other endpoint's keys, whose
        // streams stay live, so their engines would look cold. Once the index is full, an
        // endpoint holding half of it makes room by evicting only what it holds itself; a new
        // key whose room would come out of another endpoint's is refused. Below half, or
        // alone in the pool, it evicts the oldest as before.
        if self.keys.len() >= self.limits.max_keys
            && self.endpoint_keys(endpoint) >= self.limits.max_keys.div_ceil(2)
            && self.keys.slot(key).is_none()
            && self
                .keys
                .oldest()
                .is_some_and(|oldest| !self.holds(oldest, endpoint.0))
        {
            return false;
        }
        let (slot, _) = self.keys.insert_with(key, Entries::new);
        let cap = self.limits.max_endpoints_per_key;
        let Some(entries) = self.keys.at_mut(slot) else {
            return true;
        };
        // Either way the endpoint holds the key after this.
        let newly_held = !entries.iter().any(|e| e.endpoint == endpoint.0);
        let mut evicted = None;
        let mut delta: isize = 0;
        match speculative {
            None => {
                // A real entry replaces the endpoint's speculative one.
                let before = entries.len();
                entries.retain(|e| !(e.endpoint == endpoint.0 && e.speculative));
                delta -= (before - entries.len()) as isize;
                if let Some(i) = entries
                    .iter()
                    .position(|e| e.endpoint == endpoint.0 && e.medium == medium)
                {
                    // Most recent last.
                    let e = entries.remove(i);
                    entries.push(e);
                } else {
                    if entries.len() >= cap {
                        evicted = Some(entries.remove(0));
                        delta -= 1;
                    }
                    entries.push(Entry {
                        endpoint: endpoint.0,
                        medium,
                        speculative: false,
                        generation: 0,
                    });
                    delta += 1;
                }
            }
            Some(generation) => {
                if let Some(e) = entries.iter_mut().find(|e| e.endpoint == endpoint.0) {
                    // Real entries win; a pending speculative one is taken over by this request.
                    if e.speculative {
                        e.generation = generation;
                    }
                } else {
                    if entries.len() >= cap {
                        evicted = Some(entries.remove(0));
                        delta -= 1;
                    }
                    entries.push(Entry {
                        endpoint: endpoint.0,
                        medium,
                        speculative: true,
                        generation,
                    });
                    delta += 1;
                }
            }
        }
        self.entries = self.entries.saturating_add_signed(delta);
        if let Some(e) = evicted
            && !self.holds(slot, e.endpoint)
        {
            self.forget_slot(EndpointId(e.endpoint), slot);
        }
        if newly_held {
            self.remember_slot(endpoint, slot);
        }
        while self.keys.len() > self.limits.max_keys {
            let Some(oldest) = self.keys.oldest() else {
                break;
            };
            self.evict_key(oldest);
        }
        true
    }

    /// Removes the entries of a key `keep` refuses; the key goes when none is left.
    fn retain_entries(&mut self, slot: Slot, keep: impl Fn(&Entry) -> bool) {
        let Some(entries) = self.keys.at_mut(slot) else {
            return;
        };
        let mut gone: SmallVec<[u32; 4]> = SmallVec::new();
        entries.retain(|e| {
            let k = keep(e);
            // An endpoint's entries in two tiers are one key held.
            if !k && !gone.contains(&e.endpoint) {
                gone.push(e.endpoint);
            }
            k
        });
        if gone.is_empty() {
            return;
        }
        self.entries -= gone.len();
        let now_empty = entries.is_empty();
        for endpoint in gone {
            if now_empty || !self.holds(slot, endpoint) {
                self.forget_slot(EndpointId(endpoint), slot);
            }
        }
        if now_empty {
            self.keys.remove(slot);
        }
    }

    fn evict_key(&mut self, slot: Slot) {
        if let Some((_, entries)) = self.keys.remove(slot) {
            self.entries -= entries.len();
            for (i, e) in entries.iter().enumerate() {
                // An endpoint's entries in two tiers are one key held.
                if !entries[..i].iter().any(|o| o.endpoint == e.endpoint) {
                    self.forget_slot(EndpointId(e.endpoint), slot);
                }
            }
        }
    }

    fn holds(&self, slot: Slot, endpoint: u32) -> bool {
        self.keys
            .at(slot)
            .is_some_and(|es| es.iter().any(|e| e.endpoint == endpoint))
    }

    /// The endpoint has come to hold the key at `slot`.
    fn remember_slot(&mut self, endpoint: EndpointId, slot: Slot) {
        let i = endpoint.0 as usize;
        if self.by_endpoint.len() <= i {
            self.by_endpoint.resize_with(i + 1, || None);
        }
        let held = self.by_endpoint[i].get_or_insert_with(Held::default);
        held.keys += 1;
        let s = (slot >> SHARD_BITS) as usize;
        if held.shards.len() <= s {
            held.shards.resize_with(s + 1, Shard::default);
        }
        let shard = &mut held.shards[s];
        shard.slots.push(slot);
        shard.keys += 1;
        if shard.slots.len() >= 2 * shard.keys + LOG_SLACK {
            // Amortised: at least `keys + LOG_SLACK` pushes since the shard's last compaction
            // pay for reading its `2 keys + LOG_SLACK` slots, in address order.
            let mut slots = std::mem::take(&mut shard.slots);
            slots.sort_unstable();
            slots.dedup();
            slots.retain(|&s| self.holds(s, endpoint.0));
            if let Some(Some(held)) = self.by_endpoint.get_mut(i)
                && let Some(shard) = held.shards.get_mut(s)
            {
                shard.slots = slots;
            }
        }
    }

    /// The endpoint no longer holds the key at `slot` (its log keeps the slot until the next
    /// compaction).
    fn forget_slot(&mut self, endpoint: EndpointId, slot: Slot) {
        if let Some(Some(held)) = self.by_endpoint.get_mut(endpoint.0 as usize) {
            held.keys = held.keys.saturating_sub(1);
            if let Some(shard) = held.shards.get_mut((slot >> SHARD_BITS) as usize) {
                shard.keys = shard.keys.saturating_sub(1);
            }
        }
    }

    // === lookup ===

    /// For each candidate, the longest run of `keys` from the first that it can use: blocks it
    /// holds in any of its tiers, or that the shared store holds (a block in a medium of
    /// `shared`, announced by an endpoint `vouches` for, candidate or not). Each block counts in the tier
    /// the endpoint would read it from and is weighted by the best weight among the copies it
    /// can use. Endpoints not among `candidates` match nothing. Speculative entries count as
    /// GPU hits. Takes `&self`: recency is not changed by lookups.
    ///
    /// Costs one pass over the request's entries plus one over the candidates; a shared block
    /// is never visited per endpoint (an endpoint's run bridges shared gaps when its next own
    /// block comes, and extends over a trailing shared run at the end).
    pub fn lookup(
        &self,
        keys: &[u64],
        candidates: impl IntoIterator<Item = EndpointId>,
        weights: &TierWeights,
        shared: SharedMedia,
        vouches: impl Fn(EndpointId) -> bool,
        out: &mut Lookup,
    ) {
        out.total_blocks = keys.len();
        out.by_endpoint.clear();
        out.shared_before.clear();
        out.shared_before.push(0);
        for id in candidates {
            let i = id.0 as usize;
            if out.by_endpoint.len() <= i {
                out.by_endpoint.resize(i + 1, EndpointMatch::default());
            }
            let m = &mut out.by_endpoint[i];
            m.candidate = true;
            // An endpoint being cleared holds nothing of its own any more (its entries go a
            // slice at a time); the shared store is still there for it.
            m.clearing = self.is_clearing(id);
        }
        let shared_weight = shared.iter().map(|m| weights.of(m)).fold(0.0f64, f64::max);
        // Shared blocks among keys[a..b].
        let shared_between =
            |before: &[u32], a: u32, b: u32| before[b as usize] - before[a as usize];
        for (i, &key) in keys.iter().enumerate() {
            let Some(entries) = self.keys.get(key) else {
                break;
            };
            let i = i as u32;
            // Any engine can say a block is in the store: only one whose own stream is
            // trusted is believed, else one engine's junk (or a dead one's past) would give
            // every candidate phantom hits.
            let shared_here = entries.iter().any(|e| {
                !e.speculative && shared.contains(e.medium) && vouches(EndpointId(e.endpoint))
            });
            let before = out.shared_before[i as usize];
            out.shared_before.push(before + u32::from(shared_here));
            let mut advanced = false;
            for e in entries {
                if shared.contains(e.medium) {
                    continue;
                }
                let Some(m) = out.by_endpoint.get_mut(e.endpoint as usize) else {
                    continue;
                };
                if !m.candidate || m.clearing {
                    continue;
                }
                let t = tier(e.medium);
                let w = weights.0[t];
                if !e.speculative && m.local_run == i {
                    m.local_run += 1;
                }
                // A copy of a block the store also holds weighs at least the store's.
                let w = if shared_here { w.max(shared_weight) } else { w };
                if m.blocks == i + 1 {
                    // A second copy of this block on the endpoint: read from the faster tier,
                    // weighted by the better one.
                    let lt = m.last_tier as usize;
                    if read_rank(t, m.gpu_closed) < read_rank(lt, m.gpu_closed) {
                        m.by_tier[lt] -= 1;
                        m.by_tier[t] += 1;
                        m.last_tier = t as u8;
                    }
                    if w > m.last_weight {
                        m.weighted += w - m.last_weight;
                        m.last_weight = w;
                    }
                    continue;
                }
                // Blocks between the endpoint's run and this one: usable if the store has
                // them all.
                let gap = i - m.blocks;
                if gap > 0 && shared_between(&out.shared_before, m.blocks, i) != gap {
                    continue;
                }
                m.shared += gap;
                m.weighted += f64::from(gap) * shared_weight;
                m.gpu_closed |= gap > 0;
                m.blocks = i + 1;
                m.by_tier[t] += 1;
                m.last_tier = t as u8;
                m.weighted += w;
                m.last_weight = w;
                advanced = true;
            }
            // A block read from elsewhere than the GPU ends the endpoint's GPU prefix.
            for e in entries {
                if let Some(m) = out.by_endpoint.get_mut(e.endpoint as usize)
                    && m.blocks == i + 1
                    && m.last_tier != 0
                {
                    m.gpu_closed = true;
                }
            }
            if !advanced && !shared_here {
                break;
            }
        }
        // Turn the counts into the length of the shared run from each block on (in place,
        // from the end), then extend every endpoint's run over the shared blocks after it.
        let runs = &mut out.shared_before;
        let seen = runs.len() - 1;
        let any_shared = runs[seen] > 0;
        let mut after = runs[seen];
        runs[seen] = 0;
        for j in (0..seen).rev() {
            let here = runs[j];
            runs[j] = if after - here == 1 {
                runs[j + 1] + 1
            } else {
                0
            };
            after = here;
        }
        out.shared_run = runs[0];
        if !any_shared {
            return;
        }
        for m in out.by_endpoint.iter_mut().filter(|m| m.candidate) {
            let extra = runs.get(m.blocks as usize).copied().unwrap_or(0);
            m.shared += extra;
            m.blocks += extra;
            m.weighted += f64::from(extra) * shared_weight;
        }
    }
}

#[cfg(test)]
mod tests;
