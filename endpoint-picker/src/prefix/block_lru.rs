//! A least-recently-used list of block hashes, kept in one slab.
//!
//! The prefix index holds tens of thousands of blocks per endpoint and touches up to a few
//! thousand per routed request. A general LRU map allocates a node per entry and frees it on
//! eviction; here the nodes live in one `Vec`, linked by index, and an evicted node's slot is
//! reused by the next insert, so a steady-state insert allocates nothing. The list has no map of
//! its own: the index's `hash → holders` map keeps each holder's slot, so a block costs one
//! hash-map operation to add or promote and one to evict (a 400 KB prompt inserts 4,096 blocks
//! with the default profile, and four map operations per block on tables far larger than the
//! cache were half of the EPP's CPU for it: bench/RESULTS.md, "Where a 400 KB prompt's EPP CPU
//! goes").

/// Marks the end of the recency list.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    /// The blocks this entry stands for (the index records long prompts sparsely).
    weight: u32,
    /// Towards the most recent end.
    newer: u32,
    /// Towards the least recent end.
    older: u32,
}

/// The list. Capacity is enforced by the caller ([`BlockLru::pop_oldest`]), so it can change.
/// Slots are only valid while their block is held: the caller forgets a slot when
/// [`BlockLru::pop_oldest`] returns its hash.
#[derive(Debug, Default)]
pub(crate) struct BlockLru {
    nodes: Vec<Node>,
    /// Slots of evicted nodes, reused before the slab grows.
    free: Vec<u32>,
    newest: u32,
    oldest: u32,
    /// Sum of the entries' weights.
    len: usize,
}

impl BlockLru {
    /// An empty list.
    pub(crate) fn new() -> Self {
        Self {
            nodes: Vec::new(),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
            len: 0,
        }
    }

    /// Number of blocks held: the entries' weights summed.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds `hash` (not held), standing for `weight` blocks, as the most recent entry; returns
    /// its slot.
    pub(crate) fn push_newest(&mut self, hash: u64, weight: u32) -> u32 {
        let node = Node {
            hash,
            weight,
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
        self.len += weight as usize;
        self.link_newest(slot);
        slot
    }

    /// Makes the block held in `slot` the most recent.
    pub(crate) fn promote(&mut self, slot: u32) {
        if self.newest == slot {
            return;
        }
        self.unlink(slot);
        self.link_newest(slot);
    }

    /// Removes and returns the least recently used block.
    pub(crate) fn pop_oldest(&mut self) -> Option<u64> {
        if self.oldest == NIL {
            return None;
        }
        let slot = self.oldest;
        self.unlink(slot);
        self.free.push(slot);
        let node = self.nodes[slot as usize];
        self.len -= node.weight as usize;
        Some(node.hash)
    }

    /// The blocks held, least recent first.
    pub(crate) fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        let mut at = self.oldest;
        std::iter::from_fn(move || {
            let node = self.nodes.get(at as usize)?;
            at = node.newer;
            Some(node.hash)
        })
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
    use std::collections::{HashMap, VecDeque};

    use super::*;

    /// The index's side of the contract: hash → slot while held.
    #[derive(Default)]
    struct Slots(HashMap<u64, u32>);

    impl Slots {
        /// Adds or promotes `h`; true when it was not held.
        fn touch(&mut self, lru: &mut BlockLru, h: u64) -> bool {
            match self.0.get(&h) {
                Some(&slot) => {
                    lru.promote(slot);
                    false
                }
                None => {
                    self.0.insert(h, lru.push_newest(h, 1));
                    true
                }
            }
        }

        fn pop(&mut self, lru: &mut BlockLru) -> Option<u64> {
            let h = lru.pop_oldest()?;
            self.0.remove(&h);
            Some(h)
        }
    }

    #[test]
    fn evicts_in_recency_order_and_reuses_slots() {
        let (mut lru, mut s) = (BlockLru::new(), Slots::default());
        assert!(s.touch(&mut lru, 1));
        assert!(s.touch(&mut lru, 2));
        assert!(s.touch(&mut lru, 3));
        assert!(!s.touch(&mut lru, 1), "already held: promoted, not added");
        assert_eq!(s.pop(&mut lru), Some(2));
        assert!(s.touch(&mut lru, 4));
        assert_eq!(lru.nodes.len(), 3, "the evicted slot was reused");
        assert_eq!(lru.hashes().collect::<Vec<_>>(), vec![3, 1, 4]);
        assert_eq!(s.pop(&mut lru), Some(3));
        assert_eq!(s.pop(&mut lru), Some(1));
        assert_eq!(s.pop(&mut lru), Some(4));
        assert_eq!(s.pop(&mut lru), None);
        assert_eq!(lru.len(), 0);
        assert_eq!(lru.hashes().count(), 0);
    }

    #[test]
    fn len_counts_weights() {
        let mut lru = BlockLru::new();
        lru.push_newest(1, 1);
        lru.push_newest(2, 8);
        assert_eq!(lru.len(), 9);
        assert_eq!(lru.pop_oldest(), Some(1));
        assert_eq!(lru.len(), 8);
        assert_eq!(lru.pop_oldest(), Some(2));
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
            let (mut lru, mut s) = (BlockLru::new(), Slots::default());
            let mut model: VecDeque<u64> = VecDeque::new();
            for op in ops {
                match op {
                    Some(h) => {
                        let was_new = !model.contains(&h);
                        model.retain(|&x| x != h);
                        model.push_back(h);
                        proptest::prop_assert_eq!(s.touch(&mut lru, h), was_new);
                    }
                    None => proptest::prop_assert_eq!(s.pop(&mut lru), model.pop_front()),
                }
                proptest::prop_assert_eq!(lru.len(), model.len());
            }
            let held: Vec<u64> = lru.hashes().collect();
            let want: Vec<u64> = model.iter().copied().collect();
            proptest::prop_assert_eq!(held, want);
            while let Some(h) = model.pop_front() {
                proptest::prop_assert_eq!(s.pop(&mut lru), Some(h));
            }
        }
    }
}
