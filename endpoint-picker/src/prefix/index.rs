//! The approximate prefix-cache index: which endpoint was last sent which prefix blocks.
//!
//! It is a model of the engines' caches built from routing history: after a request is routed,
//! its block hashes are recorded for the chosen endpoint; each endpoint keeps at most
//! `capacity` blocks, evicting the least recently used. A reverse map `hash → endpoints`
//! makes matching one walk over the request's hashes, whatever the number of endpoints.
//!
//! Long prompts are indexed sparsely, more sparsely the deeper they go. The first
//! [`DENSE_BLOCKS`] blocks are indexed one by one; up to [`FAR_BLOCKS`] every
//! [`SPARSE_STRIDE`]-th block is; past that every [`FAR_STRIDE`]-th; and always the prompt's
//! last block. Block hashes are chained, so holding a block's hash means holding the whole
//! prefix up to it, and a match is rounded down to the last indexed block: at most
//! `SPARSE_STRIDE - 1` blocks (112 tokens at 16 per block) short on a prompt of more than
//! 4,096 tokens, at most `FAR_STRIDE - 1` (496 tokens, under 3 % of the prefix) past 16,384.
//! What it buys: a 400 KB prompt (4,096 blocks with the cost model's cap) costs 448 map
//! operations to record instead of 4,096 (736 with one stride), and as many to evict; recording
//! was most of the EPP's CPU for such a request (bench/RESULTS.md, "Where a 400 KB prompt's EPP
//! CPU goes"). Each indexed block weighs the blocks it stands for, so an endpoint's capacity is
//! still counted in blocks.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use parking_lot::RwLock;
use smallvec::SmallVec;

use super::block_lru::BlockLru;
use crate::datastore::EndpointId;

/// Leading blocks indexed one by one (the reference's whole match depth: 4,096 tokens).
pub const DENSE_BLOCKS: usize = 256;
/// Past [`DENSE_BLOCKS`], one block in this many is indexed, up to [`FAR_BLOCKS`].
pub const SPARSE_STRIDE: usize = 8;
/// Where the far stride begins (16,384 tokens at 16 per block).
pub const FAR_BLOCKS: usize = 1024;
/// Past [`FAR_BLOCKS`], one block in this many is indexed.
pub const FAR_STRIDE: usize = 32;

/// The tiers of the index: (first block, stride, indexed blocks before the tier).
const TIERS: [(usize, usize, usize); 3] = [
    (0, 1, 0),
    (DENSE_BLOCKS, SPARSE_STRIDE, DENSE_BLOCKS),
    (
        FAR_BLOCKS,
        FAR_STRIDE,
        DENSE_BLOCKS + (FAR_BLOCKS - DENSE_BLOCKS) / SPARSE_STRIDE,
    ),
];

// `indexed` and `weight` run for every block of every request. They branch on the constants
// rather than search [`TIERS`]: with a constant stride in each branch, a remainder is a mask and
// not a division (which was a visible part of recording and matching a prompt).

/// Whether the block at `position` of a prompt of `len` blocks is indexed.
#[inline]
fn indexed(position: usize, len: usize) -> bool {
    let stride_point = if position < DENSE_BLOCKS {
        true
    } else if position < FAR_BLOCKS {
        (position + 1 - DENSE_BLOCKS).is_multiple_of(SPARSE_STRIDE)
    } else {
        (position + 1 - FAR_BLOCKS).is_multiple_of(FAR_STRIDE)
    };
    stride_point || position + 1 == len
}

/// The blocks the indexed block at `position` stands for: itself and the unindexed ones
/// before it (the last block of a prompt may fall between two stride points; at most a
/// stride).
#[inline]
fn weight(position: usize) -> u32 {
    let before = if position < DENSE_BLOCKS {
        0
    } else if position < FAR_BLOCKS {
        (position - DENSE_BLOCKS) % SPARSE_STRIDE
    } else {
        (position - FAR_BLOCKS) % FAR_STRIDE
    };
    before as u32 + 1
}

/// The endpoints holding a block, each with the block's slot in that endpoint's LRU list.
type Holders = SmallVec<[(EndpointId, u32); 4]>;

/// The index. Cheap to share behind an `Arc`; reads take a read lock for one walk.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Block hash → the endpoints holding it and where (foldhash, randomly seeded: block hashes
    /// come from client text, so the map must not let a client choose collisions; SipHash cost
    /// a tenth of a decision).
    holders: HashMap<u64, Holders, foldhash::fast::RandomState>,
    /// Per endpoint id: its recency list of block hashes.
    endpoints: Vec<Option<BlockLru>>,
}

impl PrefixIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// For each endpoint id, the number of leading `hashes` it holds, written into `matches`
    /// (indexed by id; the slice must cover every id of interest and start zeroed). Past the
    /// dense head the count is rounded down to the last indexed block held.
    pub fn match_lengths(&self, hashes: &[u64], matches: &mut [u32]) {
        let inner = self.inner.read();
        // `matches` counts indexed blocks during the walk: an endpoint continues its run
        // when it holds the next indexed block.
        let mut walked = 0u32;
        for (position, h) in hashes.iter().enumerate() {
            if !indexed(position, hashes.len()) {
                continue;
            }
            let Some(holders) = inner.holders.get(h) else {
                break;
            };
            let mut advanced = false;
            for (id, _) in holders {
                if let Some(m) = matches.get_mut(id.0 as usize)
                    && *m == walked
                {
                    *m += 1;
                    advanced = true;
                }
            }
            if !advanced {
                break;
            }
            walked += 1;
        }
        if walked as usize <= DENSE_BLOCKS {
            return; // all in the dense head: indexed blocks are blocks
        }
        for m in matches.iter_mut().filter(|m| **m as usize > DENSE_BLOCKS) {
            *m = blocks_of_indexed(*m as usize, hashes.len()) as u32;
        }
    }

    /// Records that `endpoint` now holds `hashes` (most recent use), evicting its least
    /// recently used blocks beyond `capacity`.
    pub fn insert(&self, endpoint: EndpointId, capacity: usize, hashes: &[u64]) {
        if hashes.is_empty() {
            return;
        }
        let capacity = capacity.max(1);
        let mut inner = self.inner.write();
        let Inner { holders, endpoints } = &mut *inner;
        let slot = endpoint.0 as usize;
        if endpoints.len() <= slot {
            endpoints.resize_with(slot + 1, || None);
        }
        // The capacity is enforced here rather than by the LRU: the index should only hold
        // what routing has actually put there (no table sized for the capacity up front), and
        // auto-tuning can change the capacity at any time.
        let lru = endpoints[slot].get_or_insert_with(BlockLru::new);
        // The prompt's blocks in order (see `BlockLru::start_recording`): a run the list holds
        // in that order already is followed along the list without a map operation; any other
        // indexed block costs one (the holder entry carries its slot in the list).
        lru.start_recording();
        for (position, &h) in hashes.iter().enumerate() {
            if !indexed(position, hashes.len()) || lru.record_in_place(h) {
                continue;
            }
            let set = holders.entry(h).or_default();
            match set.iter().find(|(id, _)| *id == endpoint) {
                Some(&(_, slot)) => lru.record_held(slot),
                None => {
                    let slot = lru.record_new(h, weight(position));
                    set.push((endpoint, slot));
                }
            }
        }
        while lru.len() > capacity {
            let Some(old) = lru.pop_oldest() else { break };
            remove_holder(holders, old, endpoint);
        }
    }

    /// Forgets everything about endpoints whose id is not in `live`.
    pub fn retain(&self, live: impl Fn(EndpointId) -> bool) {
        let mut inner = self.inner.write();
        let Inner { holders, endpoints } = &mut *inner;
        for (slot, lru) in endpoints.iter_mut().enumerate() {
            let id = EndpointId(slot as u32);
            if lru.is_some()
                && !live(id)
                && let Some(lru) = lru.take()
            {
                for h in lru.hashes() {
                    remove_holder(holders, h, id);
                }
            }
        }
    }

    /// Number of (block, endpoint) pairs held, counting the blocks an indexed block stands for.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .endpoints
            .iter()
            .flatten()
            .map(BlockLru::len)
            .sum()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The blocks `walked` indexed blocks of a prompt of `len` blocks cover (`walked` ≥ 1).
fn blocks_of_indexed(walked: usize, len: usize) -> usize {
    // The last indexed block is a stride point of its tier, or the prompt's last block.
    let &(start, stride, before) = TIERS
        .iter()
        .rev()
        .find(|(_, _, before)| walked > *before)
        .unwrap_or(&TIERS[0]);
    (start + (walked - before) * stride).min(len)
}

fn remove_holder(
    holders: &mut HashMap<u64, Holders, foldhash::fast::RandomState>,
    hash: u64,
    endpoint: EndpointId,
) {
    if let Entry::Occupied(mut set) = holders.entry(hash) {
        set.get_mut().retain(|(id, _)| *id != endpoint);
        if set.get().is_empty() {
            set.remove();
        }
    }
}

#[cfg(test)]
impl PrefixIndex {
    /// Checks every list (see [`BlockLru::check_invariants`]) and that the holders map says
    /// exactly what the lists hold, slot for slot. Returns each endpoint's hashes, least
    /// recent first.
    fn check_invariants(&self) -> Vec<Vec<u64>> {
        let inner = self.inner.read();
        let mut listed = 0;
        let mut lists = Vec::new();
        for (id, lru) in inner.endpoints.iter().enumerate() {
            let Some(lru) = lru else {
                lists.push(Vec::new());
                continue;
            };
            let entries = lru.check_invariants();
            for &(hash, slot) in &entries {
                let holders = inner
                    .holders
                    .get(&hash)
                    .map(|h| h.as_slice())
                    .unwrap_or(&[]);
                let mine: Vec<u32> = holders
                    .iter()
                    .filter(|(e, _)| e.0 as usize == id)
                    .map(|&(_, s)| s)
                    .collect();
                assert_eq!(mine, [slot], "endpoint {id}'s holder entry for {hash}");
            }
            listed += entries.len();
            lists.push(entries.iter().rev().map(|e| e.0).collect());
        }
        let in_map: usize = inner.holders.values().map(|h| h.len()).sum();
        assert_eq!(in_map, listed, "holder entries that no list has");
        assert!(
            inner.holders.values().all(|h| !h.is_empty()),
            "an empty holder set kept"
        );
        lists
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(index: &PrefixIndex, hashes: &[u64], n: usize) -> Vec<u32> {
        let mut m = vec![0; n];
        index.match_lengths(hashes, &mut m);
        m
    }

    #[test]
    fn indexed_blocks_and_weights_follow_the_tiers() {
        // The table's reading of a position: the last tier starting at or before it.
        let tier = |position: usize| {
            let &(start, stride, _) = TIERS.iter().rev().find(|t| position >= t.0).unwrap();
            (start, stride)
        };
        for len in [1, 255, 256, 257, 300, 1024, 1025, 1100, 5000] {
            for position in 0..len {
                let (start, stride) = tier(position);
                let expected = (position + 1 - start).is_multiple_of(stride) || position + 1 == len;
                assert_eq!(indexed(position, len), expected, "{position} of {len}");
                assert_eq!(
                    weight(position) as usize,
                    (position - start) % stride + 1,
                    "{position}"
                );
            }
        }
    }

    #[test]
    fn matches_longest_held_prefix_per_endpoint() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointId(0), 100, &[1, 2, 3]);
        idx.insert(EndpointId(1), 100, &[1, 2]);
        idx.insert(EndpointId(2), 100, &[2, 3]); // does not start at the beginning
        assert_eq!(lengths(&idx, &[1, 2, 3, 4], 3), vec![3, 2, 0]);
        assert_eq!(lengths(&idx, &[9, 1], 3), vec![0, 0, 0]);
    }

    #[test]
    fn evicts_least_recently_used_blocks() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointId(0), 3, &[1, 2, 3]); // recency, oldest first: 3, 2, 1
        idx.insert(EndpointId(0), 3, &[2]); // touch 2: 3, 1, 2
        idx.insert(EndpointId(0), 3, &[4]); // evicts 3, the least recently used
        assert_eq!(lengths(&idx, &[1, 2, 3], 1), vec![2]);
        assert_eq!(lengths(&idx, &[4], 1), vec![1]);
        assert_eq!(idx.len(), 3);
    }

    #[test]
    fn a_request_longer_than_the_capacity_keeps_its_head() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointId(0), 2, &[1, 2, 3, 4]);
        assert_eq!(lengths(&idx, &[1, 2, 3, 4], 1), vec![2]);
    }

    #[test]
    fn capacity_change_shrinks() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointId(0), 10, &[1, 2, 3, 4]);
        idx.insert(EndpointId(0), 2, &[5]);
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn retain_drops_departed_endpoints() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointId(0), 10, &[1, 2]);
        idx.insert(EndpointId(1), 10, &[1, 2]);
        idx.retain(|id| id == EndpointId(1));
        assert_eq!(lengths(&idx, &[1, 2], 2), vec![0, 2]);
        assert_eq!(idx.len(), 2);
    }

    /// Chained-hash stand-ins: `n` blocks sharing the first `shared` with `base`'s chain.
    fn chain(base: u64, n: usize, shared: usize) -> Vec<u64> {
        (0..n as u64)
            .map(|i| {
                if (i as usize) < shared {
                    i + 1
                } else {
                    base * 1_000_000 + i + 1
                }
            })
            .collect()
    }

    fn entries(index: &PrefixIndex) -> usize {
        index.inner.read().holders.len()
    }

    #[test]
    fn a_long_prompt_is_indexed_sparsely_past_the_dense_head() {
        let idx = PrefixIndex::new();
        let prompt = chain(1, 4096, 4096);
        idx.insert(EndpointId(0), 100_000, &prompt);
        assert_eq!(
            entries(&idx),
            DENSE_BLOCKS
                + (FAR_BLOCKS - DENSE_BLOCKS) / SPARSE_STRIDE
                + (4096 - FAR_BLOCKS) / FAR_STRIDE
        );
        assert_eq!(idx.len(), 4096, "capacity is counted in blocks");
        assert_eq!(lengths(&idx, &prompt, 1), vec![4096]);
        // A prompt sharing 1,003 blocks: matched to the last indexed block at or before them.
        assert_eq!(lengths(&idx, &chain(2, 2000, 1003), 1), vec![1000]);
        // Past the far stride's start, to its last point.
        assert_eq!(lengths(&idx, &chain(2, 4000, 3000), 1), vec![2976]);
        assert_eq!(lengths(&idx, &chain(2, 4000, 1024), 1), vec![1024]);
        // Within the dense head, exact.
        assert_eq!(lengths(&idx, &chain(3, 2000, 201), 1), vec![201]);
        // A prompt ending between two indexed blocks matches whole where it was recorded
        // itself; endpoint 0 recorded it only as part of a longer prompt.
        idx.insert(EndpointId(1), 100_000, &chain(1, 1003, 1003));
        assert_eq!(lengths(&idx, &chain(1, 1003, 1003), 2), vec![1000, 1003]);
    }

    #[test]
    fn eviction_counts_the_blocks_an_indexed_block_stands_for() {
        let idx = PrefixIndex::new();
        let prompt = chain(1, 4096, 4096);
        idx.insert(EndpointId(0), 1000, &prompt);
        assert!(idx.len() <= 1000, "{}", idx.len());
        let m = lengths(&idx, &prompt, 1)[0] as usize;
        assert!((1000 - FAR_STRIDE..=1000).contains(&m), "{m}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 64,
            rng_seed: proptest::test_runner::RngSeed::Fixed(29),
            failure_persistence: None,
            ..Default::default()
        })]
        /// Against exact matching: never more than the blocks held, at most a stride of the
        /// tier short, exact in the dense head and for a repeated prompt.
        #[test]
        fn sparse_matching_is_at_most_a_stride_short(
            stored in 1usize..2500,
            query in 1usize..2500,
            shared in 0usize..2500,
        ) {
            let idx = PrefixIndex::new();
            let held = chain(1, stored, stored);
            idx.insert(EndpointId(0), 100_000, &held);
            let q = chain(2, query, shared);
            let exact = q.iter().zip(&held).take_while(|(a, b)| a == b).count();
            let got = lengths(&idx, &q, 1)[0] as usize;
            proptest::prop_assert!(got <= exact, "{} > {}", got, exact);
            let stride = if exact <= FAR_BLOCKS { SPARSE_STRIDE } else { FAR_STRIDE };
            proptest::prop_assert!(got + stride > exact, "{} vs {}", got, exact);
            if exact <= DENSE_BLOCKS || q == held {
                proptest::prop_assert_eq!(got, exact);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 48,
            rng_seed: proptest::test_runner::RngSeed::Fixed(31),
            failure_persistence: None,
            ..Default::default()
        })]
        /// Inserts (prompts sharing prefixes, long enough for every tier, capacities that evict)
        /// and removals of endpoints: the lists and the holders map stay one structure, and
        /// each list is what promoting its prompts' indexed blocks deepest first and evicting
        /// the least recent past the capacity (by weight) gives.
        #[test]
        fn the_lists_and_the_holders_stay_in_step(
            ops in proptest::collection::vec(
                (0u32..3, 1u64..5, 1usize..1400, 0usize..1400, 1usize..3000, 0u8..8), 1..24),
        ) {
            let idx = PrefixIndex::new();
            let mut model: Vec<std::collections::VecDeque<(u64, u32)>> = vec![Default::default(); 3];
            for (endpoint, base, len, shared, capacity, removal) in ops {
                if removal == 0 {
                    idx.retain(|id| id.0 != endpoint);
                    model[endpoint as usize].clear();
                } else {
                    let prompt = chain(base, len, shared);
                    idx.insert(EndpointId(endpoint), capacity, &prompt);
                    let list = &mut model[endpoint as usize];
                    for (position, &h) in prompt.iter().enumerate().rev() {
                        if indexed(position, prompt.len()) {
                            list.retain(|&(x, _)| x != h);
                            list.push_back((h, weight(position)));
                        }
                    }
                    while list.iter().map(|&(_, w)| w as usize).sum::<usize>() > capacity {
                        list.pop_front();
                    }
                }
                let lists = idx.check_invariants();
                for (id, want) in model.iter().enumerate() {
                    let got = lists.get(id).cloned().unwrap_or_default();
                    let want: Vec<u64> = want.iter().map(|&(h, _)| h).collect();
                    proptest::prop_assert_eq!(got, want, "endpoint {}", id);
                }
            }
        }
    }

    #[test]
    fn out_of_range_ids_are_ignored_when_matching() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointId(5), 10, &[1]);
        assert_eq!(lengths(&idx, &[1], 2), vec![0, 0]);
    }
}
