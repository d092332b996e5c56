//! The paged KV cache with automatic prefix caching, modelled on vLLM V1's block pool.
//!
//! - The cache has `num_blocks` blocks of `block_size` tokens.
//! - A block that is full is keyed by a chained hash: `h_i = xxh64(tokens of block i, seed =
//!   h_{i-1})`, with `h_{-1}` derived from the LoRA adapter (or none), so equal prefixes under the
//!   same adapter share blocks and nothing else does.
//! - Blocks are reference-counted by the sequences using them. A block whose count drops to zero
//!   goes to the tail of a free queue *but keeps its hash*: a later request with the same prefix
//!   can take it back (a prefix-cache hit). Allocation takes blocks from the head of the free
//!   queue, evicting their cached content — least recently freed first (LRU).
//! - A sequence releases its blocks last-to-first, so its tail blocks (least likely to be shared)
//!   are evicted before its head blocks.
//!
//! The engine can publish what enters and leaves the cache as [`KvEvent`]s, the shape of vLLM's
//! KV-cache events (`BlockStored` / `BlockRemoved`): the seam for precise prefix-cache routing.

use std::collections::HashMap;

use xxhash_rust::xxh64::xxh64;

/// Index of a block in the pool.
pub type BlockId = u32;

/// A change of the prefix cache, as vLLM's KV-cache events describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// A full block entered the prefix cache.
    BlockStored {
        /// The block's chained hash.
        hash: u64,
        /// The previous block's hash (`None` for a sequence's first block).
        parent: Option<u64>,
        /// The block's token ids.
        token_ids: Vec<u32>,
        /// The LoRA adapter the block belongs to.
        lora: Option<String>,
    },
    /// A cached block was evicted (its content is gone).
    BlockRemoved {
        /// The block's chained hash.
        hash: u64,
    },
    /// The whole prefix cache was dropped ([`crate::Engine::reset_prefix_cache`]).
    AllBlocksCleared,
    /// A full block entered a tier below the GPU ([`crate::tiers`]): the replica's CPU tier
    /// (`Cpu`) or the shared store (`Remote`). No token ids, as vLLM's offloading announces
    /// blocks it already announced for the GPU.
    OffloadStored {
        /// The tier.
        medium: kv_events::Medium,
        /// The block's chained hash.
        hash: u64,
        /// The previous block's hash (`None` for a sequence's first block).
        parent: Option<u64>,
        /// The LoRA adapter the block belongs to.
        lora: Option<String>,
    },
    /// A block left a tier below the GPU.
    OffloadRemoved {
        /// The tier.
        medium: kv_events::Medium,
        /// The block's chained hash.
        hash: u64,
    },
}

#[derive(Debug, Clone)]
struct Block {
    /// Hash of the block's content when it is full and registered in the prefix cache.
    hash: Option<u64>,
    ref_count: u32,
    /// Free-queue links, meaningful while `ref_count == 0` (the block is then in the queue).
    prev: BlockId,
    next: BlockId,
}

/// End of the free queue's links.
const NIL: BlockId = BlockId::MAX;

/// The free queue, as vLLM's `FreeKVCacheBlockQueue`: a doubly linked list threaded through the
/// blocks, ordered by the time a block became free (the head is evicted first). Taking a cached
/// block back out of the middle, freeing to the tail and evicting from the head are all O(1).
#[derive(Debug)]
struct FreeQueue {
    head: BlockId,
    tail: BlockId,
    len: usize,
}

impl FreeQueue {
    fn push_back(&mut self, blocks: &mut [Block], id: BlockId) {
        blocks[id as usize].prev = self.tail;
        blocks[id as usize].next = NIL;
        match self.tail {
            NIL => self.head = id,
            t => blocks[t as usize].next = id,
        }
        self.tail = id;
        self.len += 1;
    }

    fn push_front(&mut self, blocks: &mut [Block], id: BlockId) {
        blocks[id as usize].prev = NIL;
        blocks[id as usize].next = self.head;
        match self.head {
            NIL => self.tail = id,
            h => blocks[h as usize].prev = id,
        }
        self.head = id;
        self.len += 1;
    }

    fn remove(&mut self, blocks: &mut [Block], id: BlockId) {
        let (prev, next) = (blocks[id as usize].prev, blocks[id as usize].next);
        match prev {
            NIL => self.head = next,
            p => blocks[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => blocks[n as usize].prev = prev,
        }
        self.len -= 1;
    }

    fn pop_front(&mut self, blocks: &mut [Block]) -> Option<BlockId> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.remove(blocks, id);
        Some(id)
    }
}

/// The block pool.
#[derive(Debug)]
pub struct KvCache {
    block_size: usize,
    blocks: Vec<Block>,
    /// Prefix cache: content hash → block holding it (foldhash: the hash map is most of the
    /// cost of a step's bookkeeping, and SipHash's DoS resistance buys nothing in a simulator).
    cached: HashMap<u64, BlockId, foldhash::fast::RandomState>,
    /// Blocks no sequence references, least recently freed first.
    free: FreeQueue,
    evictions: u64,
    /// Hashes evicted since the last [`KvCache::take_removed`], when recording.
    removed: Option<Vec<u64>>,
}

/// The root of a hash chain: distinct per adapter, so adapters never share KV blocks.
pub fn chain_root(lora: Option<&str>) -> u64 {
    match lora {
        None => 0x5157_4954_4348_5944, // arbitrary non-zero constant for the base model
        Some(name) => xxh64(name.as_bytes(), 1),
    }
}

/// The hash of a full block given its parent's hash: xxh64 of the tokens' little-endian bytes,
/// seeded with the parent (streamed through a stack buffer: no allocation per block).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut hasher = xxhash_rust::xxh64::Xxh64::new(parent);
    let mut buf = [0u8; 256];
    for chunk in tokens.chunks(buf.len() / 4) {
        for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        hasher.update(&buf[..chunk.len() * 4]);
    }
    hasher.digest()
}

/// The chained hashes of every full block of `tokens`.
pub fn block_hashes(root: u64, tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = root;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            parent = block_hash(parent, chunk);
            parent
        })
        .collect()
}

impl KvCache {
    /// A pool of `num_blocks` empty blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Block ids are u32 and `NIL` is reserved: a pool is far smaller than 4 billion blocks.
        let num_blocks = num_blocks.min(NIL as usize);
        let mut blocks: Vec<Block> = (0..num_blocks)
            .map(|_| Block {
                hash: None,
                ref_count: 0,
                prev: NIL,
                next: NIL,
            })
            .collect();
        let mut free = FreeQueue {
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for id in 0..num_blocks {
            free.push_back(&mut blocks, id as BlockId);
        }
        Self {
            block_size,
            blocks,
            cached: HashMap::default(),
            free,
            evictions: 0,
            removed: None,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks not referenced by any sequence (some of them still hold cached content).
    pub fn num_free(&self) -> usize {
        self.free.len
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.free.len
    }

    /// Fraction of blocks in use, as `vllm:kv_cache_usage_perc` reports it (0–1).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        self.num_used() as f64 / self.blocks.len() as f64
    }

    /// How many cached blocks have been evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether content with this hash is in the prefix cache.
    pub fn is_cached(&self, hash: u64) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Number of leading `hashes` present in the prefix cache.
    pub fn longest_hit(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Of the first `hit` blocks of `hashes` (all cached), how many are currently free, i.e. would
    /// leave the free queue when taken.
    pub fn free_among_hits(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .filter_map(|h| self.cached.get(h))
            .filter(|&&b| self.blocks[b as usize].ref_count == 0)
            .count()
    }

    /// Whether `new_blocks` fresh blocks can be allocated after taking `hit_hashes` from the cache.
    pub fn can_allocate(&self, new_blocks: usize, hit_hashes: &[u64]) -> bool {
        self.free.len >= new_blocks + self.free_among_hits(hit_hashes)
    }

    /// Takes references on the cached blocks of `hashes` (which must all be cached), removing
    /// free ones from the free queue.
    pub fn take_hits(&mut self, hashes: &[u64]) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(hashes.len());
        for h in hashes {
            let Some(&id) = self.cached.get(h) else { break };
            if self.blocks[id as usize].ref_count == 0 {
                self.free.remove(&mut self.blocks, id);
            }
            self.blocks[id as usize].ref_count += 1;
            out.push(id);
        }
        out
    }

    /// Allocates `n` blocks from the head of the free queue (evicting their cached content), or
    /// nothing when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.free.len < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.free.pop_front(&mut self.blocks)?;
            let block = &mut self.blocks[id as usize];
            if let Some(h) = block.hash.take() {
                if self.cached.get(&h) == Some(&id) {
                    self.cached.remove(&h);
                    if let Some(removed) = &mut self.removed {
                        removed.push(h);
                    }
                }
                self.evictions += 1;
            }
            block.ref_count = 1;
            out.push(id);
        }
        Some(out)
    }

    /// Registers a block that has just become full under its content hash. If the content is
    /// already cached in another block, the first copy stays the cached one (as in vLLM).
    /// Returns whether the content is new to the cache.
    pub fn commit_full(&mut self, id: BlockId, hash: u64) -> bool {
        let block = &mut self.blocks[id as usize];
        if block.hash.is_some() {
            return false;
        }
        block.hash = Some(hash);
        match self.cached.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(id);
                true
            }
        }
    }

    /// Forgets every cached block's content (vLLM's `reset_prefix_cache`). Only when no
    /// sequence holds a block (`num_used() == 0`), as vLLM refuses it otherwise; `false` then.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_used() > 0 {
            return false;
        }
        self.cached.clear();
        for block in &mut self.blocks {
            block.hash = None;
        }
        true
    }

    /// Starts or stops recording evicted hashes (only worth it when someone listens).
    pub fn set_recording(&mut self, on: bool) {
        if on != self.removed.is_some() {
            self.removed = on.then(Vec::new);
        }
    }

    /// The hashes evicted since the last call, while recording.
    pub fn take_removed(&mut self) -> Vec<u64> {
        self.removed
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Drops one reference on each of `ids`, last block first; blocks reaching zero go to the tail
    /// of the free queue with their content still cached.
    pub fn release(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let block = &mut self.blocks[id as usize];
            if block.ref_count == 0 {
                continue; // already free: releasing twice must not link it twice
            }
            block.ref_count -= 1;
            if block.ref_count == 0 {
                if block.hash.is_none() {
                    // A partial block holds nothing reusable: hand it out before cached content.
                    self.free.push_front(&mut self.blocks, id);
                } else {
                    self.free.push_back(&mut self.blocks, id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(start: u32, n: usize) -> Vec<u32> {
        (start..start + n as u32).collect()
    }

    #[test]
    fn a_released_sequence_is_a_cache_hit_for_the_next() {
        let mut kv = KvCache::new(8, 4);
        let hashes = block_hashes(chain_root(None), &toks(0, 10), 4);
        assert_eq!(hashes.len(), 2, "only full blocks are hashed");
        let blocks = kv.allocate(3).unwrap();
        kv.commit_full(blocks[0], hashes[0]);
        kv.commit_full(blocks[1], hashes[1]);
        assert_eq!(kv.num_used(), 3);
        kv.release(&blocks);
        assert_eq!(kv.num_used(), 0);
        assert_eq!(kv.longest_hit(&hashes), 2);
        let hits = kv.take_hits(&hashes);
        assert_eq!(hits, blocks[..2]);
        assert_eq!(kv.num_used(), 2);
        // A different adapter never hits.
        let other = block_hashes(chain_root(Some("lora-a")), &toks(0, 10), 4);
        assert_eq!(kv.longest_hit(&other), 0);
    }

    #[test]
    fn eviction_is_lru_over_free_blocks() {
        let mut kv = KvCache::new(4, 2);
        let seq = |kv: &mut KvCache, start: u32| {
            let hashes = block_hashes(chain_root(None), &toks(start, 2), 2);
            let b = kv.allocate(1).unwrap();
            kv.commit_full(b[0], hashes[0]);
            kv.release(&b);
            hashes[0]
        };
        let a = seq(&mut kv, 0);
        let b = seq(&mut kv, 10);
        let c = seq(&mut kv, 20);
        let d = seq(&mut kv, 30);
        assert!([a, b, c, d].iter().all(|&h| kv.is_cached(h)));
        // Touch `a` so it becomes most recently used.
        let hit = kv.take_hits(&[a]);
        kv.release(&hit);
        // Two fresh blocks evict the two least recently freed: b then c.
        kv.allocate(2).unwrap();
        assert!(kv.is_cached(a));
        assert!(!kv.is_cached(b));
        assert!(!kv.is_cached(c));
        assert!(kv.is_cached(d));
        assert_eq!(kv.evictions(), 2);
        assert!(kv.allocate(3).is_none(), "only 2 free blocks left");
    }

    #[test]
    fn shared_blocks_are_reference_counted() {
        let mut kv = KvCache::new(4, 2);
        let hashes = block_hashes(chain_root(None), &toks(0, 4), 2);
        let b = kv.allocate(2).unwrap();
        kv.commit_full(b[0], hashes[0]);
        kv.commit_full(b[1], hashes[1]);
        let shared = kv.take_hits(&hashes);
        assert_eq!(kv.num_used(), 2);
        kv.release(&b);
        assert_eq!(kv.num_used(), 2, "still referenced by the second sequence");
        assert!(kv.can_allocate(2, &[]));
        assert!(!kv.can_allocate(3, &[]));
        kv.release(&shared);
        assert_eq!(kv.num_free(), 4);
        assert!(
            kv.can_allocate(2, &hashes),
            "two hits taken back leave two blocks"
        );
        assert!(!kv.can_allocate(3, &hashes));
    }

    #[test]
    fn evictions_are_recorded_when_asked() {
        let mut kv = KvCache::new(1, 2);
        let h = block_hashes(chain_root(None), &toks(0, 2), 2)[0];
        let b = kv.allocate(1).unwrap();
        assert!(kv.commit_full(b[0], h));
        kv.release(&b);
        kv.set_recording(true);
        kv.allocate(1).unwrap();
        assert_eq!(kv.take_removed(), [h]);
        assert!(kv.take_removed().is_empty());
    }

    #[test]
    fn a_prefix_cache_reset_waits_for_free_blocks_then_forgets_everything() {
        let mut kv = KvCache::new(2, 2);
        let h = block_hashes(chain_root(None), &toks(0, 2), 2)[0];
        let b = kv.allocate(1).unwrap();
        assert!(kv.commit_full(b[0], h));
        assert!(!kv.reset_prefix_cache(), "a sequence holds a block");
        assert!(kv.is_cached(h));
        kv.release(&b);
        assert!(kv.reset_prefix_cache());
        assert!(!kv.is_cached(h));
        assert_eq!(kv.num_free(), 2);
        // The forgotten block is not "evicted" again later.
        kv.set_recording(true);
        kv.allocate(2).unwrap();
        assert!(kv.take_removed().is_empty());
    }

    #[test]
    fn partial_blocks_are_reused_before_cached_ones() {
        let mut kv = KvCache::new(2, 2);
        let h = block_hashes(chain_root(None), &toks(0, 2), 2)[0];
        let b = kv.allocate(2).unwrap();
        kv.commit_full(b[0], h);
        kv.release(&b);
        kv.allocate(1).unwrap();
        assert!(kv.is_cached(h), "the uncached partial block went first");
    }

    /// The queue's links agree with the reference counts: walking it from the head visits
    /// exactly the free blocks, once each, and the backward links mirror the forward ones.
    fn assert_queue_consistent(kv: &KvCache) {
        let mut seen = vec![false; kv.blocks.len()];
        let (mut id, mut prev, mut n) = (kv.free.head, NIL, 0);
        while id != NIL {
            assert!(!seen[id as usize], "block {id} linked twice");
            seen[id as usize] = true;
            assert_eq!(kv.blocks[id as usize].prev, prev);
            assert_eq!(kv.blocks[id as usize].ref_count, 0);
            (prev, id) = (id, kv.blocks[id as usize].next);
            n += 1;
        }
        assert_eq!(kv.free.tail, prev);
        assert_eq!(n, kv.free.len);
        let free = kv.blocks.iter().filter(|b| b.ref_count == 0).count();
        assert_eq!(free, kv.free.len);
    }

    #[test]
    fn the_free_queue_stays_consistent_under_random_use() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let mut kv = KvCache::new(32, 2);
        let mut held: Vec<Vec<BlockId>> = Vec::new();
        for step in 0..5_000u32 {
            match rng.random_range(0..4) {
                0 | 1 => {
                    let n = rng.random_range(1..4);
                    if let Some(ids) = kv.allocate(n) {
                        // Fill some blocks: full ones keep cached content when freed.
                        for (i, &id) in ids.iter().enumerate() {
                            if rng.random_bool(0.5) {
                                kv.commit_full(id, u64::from(step) * 8 + i as u64);
                            }
                        }
                        held.push(ids);
                    }
                }
                2 if !held.is_empty() => {
                    let ids = held.swap_remove(rng.random_range(0..held.len()));
                    kv.release(&ids);
                }
                _ => {
                    let hashes: Vec<u64> = (0..3).map(|_| rng.random_range(0..40_000)).collect();
                    let hit = kv.longest_hit(&hashes);
                    if hit > 0 {
                        held.push(kv.take_hits(&hashes[..hit]));
                    }
                }
            }
            assert_queue_consistent(&kv);
        }
    }
}
