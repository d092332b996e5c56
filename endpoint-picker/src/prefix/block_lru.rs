//! A least-recently-used set of block hashes, kept in one slab.
//!
//! The prefix index holds tens of thousands of blocks per endpoint and touches a few hundred per
//! routed request. A general LRU map allocates a node per entry and frees it on eviction; here
//! the nodes live in one `Vec`, linked by index, and an evicted node's slot is reused by the
//! next insert, so a steady-state insert allocates nothing. The hash map from block hash to
//! slot uses foldhash with a per-map random seed: block hashes come from client text, so the
//! map must not let a client choose collisions, and SipHash cost a tenth of a decision.

use std::collections::HashMap;

/// Marks the end of the recency list.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    /// Towards the most recent end.
    newer: u32,
    /// Towards the least recent end.
    older: u32,
}

/// The set. Capacity is enforced by the caller ([`BlockLru::pop_oldest`]), so it can change.
#[derive(Debug, Default)]
pub(crate) struct BlockLru {
    slots: HashMap<u64, u32, foldhash::fast::RandomState>,
    nodes: Vec<Node>,
    /// Slots of evicted nodes, reused before the slab grows.
    free: Vec<u32>,
    newest: u32,
    oldest: u32,
}

impl BlockLru {
    /// An empty set.
    pub(crate) fn new() -> Self {
        Self {
            slots: HashMap::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
        }
    }

    /// Number of blocks held.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Makes `hash` the most recent block; true when it was not held before.
    pub(crate) fn touch(&mut self, hash: u64) -> bool {
        if let Some(&slot) = self.slots.get(&hash) {
            self.unlink(slot);
            self.link_newest(slot);
            return false;
        }
        let node = Node {
            hash,
            newer: NIL,
            older: NIL,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                // At most u32::MAX - 1 blocks: the index caps each endpoint far below that.
                let slot = u32::try_from(self.nodes.len()).unwrap_or(NIL - 1);
                self.nodes.push(node);
                slot
            }
        };
        self.slots.insert(hash, slot);
        self.link_newest(slot);
        true
    }

    /// Removes and returns the least recently used block.
    pub(crate) fn pop_oldest(&mut self) -> Option<u64> {
        if self.oldest == NIL {
            return None;
        }
        let slot = self.oldest;
        self.unlink(slot);
        let hash = self.nodes[slot as usize].hash;
        self.slots.remove(&hash);
        self.free.push(slot);
        Some(hash)
    }

    /// The blocks held, in no particular order.
    pub(crate) fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.keys().copied()
    }

    fn unlink(&mut self, slot: u32) {
        let Node { newer, older, .. } = self.nodes[slot as usize];
        match newer {
            NIL => self.newest = older,
            n => self.nodes[n as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.nodes[o as usize].newer = newer,
        }
    }

    fn link_newest(&mut self, slot: u32) {
        let previous = self.newest;
        {
            let node = &mut self.nodes[slot as usize];
            node.newer = NIL;
            node.older = previous;
        }
        match previous {
            NIL => self.oldest = slot,
            p => self.nodes[p as usize].newer = slot,
        }
        self.newest = slot;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    #[test]
    fn evicts_in_recency_order_and_reuses_slots() {
        let mut lru = BlockLru::new();
        assert!(lru.touch(1));
        assert!(lru.touch(2));
        assert!(lru.touch(3));
        assert!(!lru.touch(1), "already held: promoted, not added");
        assert_eq!(lru.pop_oldest(), Some(2));
        assert!(lru.touch(4));
        assert_eq!(lru.nodes.len(), 3, "the evicted slot was reused");
        assert_eq!(lru.pop_oldest(), Some(3));
        assert_eq!(lru.pop_oldest(), Some(1));
        assert_eq!(lru.pop_oldest(), Some(4));
        assert_eq!(lru.pop_oldest(), None);
        assert_eq!(lru.len(), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 256,
            rng_seed: proptest::test_runner::RngSeed::Fixed(17),
            failure_persistence: None,
            ..Default::default()
        })]
        /// Against a plain model (a deque, most recent at the back): same membership, same
        /// eviction order, whatever the interleaving of touches and evictions.
        #[test]
        fn behaves_like_a_recency_ordered_list(
            ops in proptest::collection::vec(proptest::option::weighted(0.8, 0u64..24), 0..300),
        ) {
            let mut lru = BlockLru::new();
            let mut model: VecDeque<u64> = VecDeque::new();
            for op in ops {
                match op {
                    Some(h) => {
                        let was_new = !model.contains(&h);
                        model.retain(|&x| x != h);
                        model.push_back(h);
                        proptest::prop_assert_eq!(lru.touch(h), was_new);
                    }
                    None => proptest::prop_assert_eq!(lru.pop_oldest(), model.pop_front()),
                }
                proptest::prop_assert_eq!(lru.len(), model.len());
            }
            let mut held: Vec<u64> = lru.hashes().collect();
            held.sort_unstable();
            let mut want: Vec<u64> = model.iter().copied().collect();
            want.sort_unstable();
            proptest::prop_assert_eq!(held, want);
            while let Some(h) = model.pop_front() {
                proptest::prop_assert_eq!(lru.pop_oldest(), Some(h));
            }
        }
    }
}
