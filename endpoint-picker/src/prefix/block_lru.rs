//! A least-recently-used list of block hashes, kept in one slab.
//!
//! The prefix index holds tens of thousands of blocks per endpoint and touches up to a few
//! thousand per routed request. A general LRU map allocates a node per entry and frees it on
//! eviction; here the nodes live in one `Vec`, linked by index, and an evicted node's slot is
//! reused by the next insert, so a steady-state insert allocates nothing. The list has no map of
//! its own: the index's `hash → holders` map keeps each holder's slot, so a block costs at most
//! one hash-map operation to add or move and one to evict, and none when it is where the prompt
//! puts it already ([`BlockLru::start_recording`]; a 400 KB prompt inserts 4,096 blocks
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
    /// The recording that last placed it (see [`BlockLru::start_recording`]).
    recorded: u32,
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
    /// The current recording's number, from 1 (0 is no recording's: see
    /// [`BlockLru::start_recording`]).
    recording: u32,
    /// The entry the current recording placed last (`NIL` before its first).
    anchor: u32,
    /// The entry that was behind the last one the current recording moved, where it was
    /// (`NIL`: none): the likely next block of the prompt (see [`BlockLru::record_in_place`]).
    trail: u32,
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
            recording: 0,
            anchor: NIL,
            trail: NIL,
        }
    }

    /// Number of blocks held: the entries' weights summed.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Starts recording a prompt, whose blocks the `record_*` calls then give in prompt order.
    ///
    /// The first block becomes the most recent entry and each next one goes just behind the
    /// one before: the prompt ends up newest first in prompt order (matching stops at the first
    /// miss, so when something must go it should be a prompt's tail, never its head), and
    /// blocks recorded together stay together. So recording again a run the list holds in that
    /// order (a system prompt shared by the requests routed there) follows the links without
    /// a map lookup and moves nothing. Where the prompt parts from the run in place and goes on
    /// with one recorded earlier (another conversation's history after the shared system
    /// prompt), its first block there costs a map lookup and the rest follow that run's links.
    pub(crate) fn start_recording(&mut self) {
        self.recording = self.recording.wrapping_add(1);
        if self.recording == 0 {
            // Once in 2³² recordings the number comes round: an entry left alone since then
            // would carry the current number and pass for placed already, and the prompt's
            // later blocks would go in ahead of it. Every stamp is cleared instead (one pass
            // over the slab), and numbering goes on from 1.
            for node in &mut self.nodes {
                node.recorded = 0;
            }
            self.recording = 1;
        }
        self.anchor = NIL;
        self.trail = NIL;
    }

    /// Records `hash` without a map lookup when the list says where it is: just behind the
    /// last entry recorded (or the most recent, for the first), where it stays; or just behind
    /// where the last moved entry was, whence it follows it. Returns false, recording nothing,
    /// otherwise. Only held blocks are linked, so an entry found here is the index's for
    /// `hash`.
    pub(crate) fn record_in_place(&mut self, hash: u64) -> bool {
        let slot = match self.anchor {
            NIL => self.newest,
            a => self.nodes[a as usize].older,
        };
        if let Some(node) = self.nodes.get_mut(slot as usize)
            && node.hash == hash
        {
            node.recorded = self.recording;
            self.anchor = slot;
            return true;
        }
        let trail = self.trail;
        match self.nodes.get(trail as usize) {
            Some(node) if node.hash == hash && node.recorded != self.recording => {
                self.move_behind_anchor(trail);
                true
            }
            _ => false,
        }
    }

    /// Records the block held in `slot`, which [`BlockLru::record_in_place`] did not find,
    /// moving it where it belongs. A block this recording placed already (a prompt whose hash
    /// chain repeats a block) stays where it was put.
    pub(crate) fn record_held(&mut self, slot: u32) {
        if self.nodes[slot as usize].recorded != self.recording {
            self.move_behind_anchor(slot);
        }
    }

    /// Moves the entry in `slot`, not recorded yet, just behind the anchor and records it; the
    /// entry that was behind it becomes the trail.
    fn move_behind_anchor(&mut self, slot: u32) {
        let node = &mut self.nodes[slot as usize];
        node.recorded = self.recording;
        self.trail = node.older;
        self.unlink(slot);
        self.link_behind_anchor(slot);
        self.anchor = slot;
    }

    /// Records `hash` (not held), standing for `weight` blocks; returns its slot.
    pub(crate) fn record_new(&mut self, hash: u64, weight: u32) -> u32 {
        let node = Node {
            hash,
            weight,
            newer: NIL,
            older: NIL,
            recorded: self.recording,
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
        self.link_behind_anchor(slot);
        self.anchor = slot;
        slot
    }

    /// Removes and returns the least recently used block.
    pub(crate) fn pop_oldest(&mut self) -> Option<u64> {
        if self.oldest == NIL {
            return None;
        }
        let slot = self.oldest;
        // (The index evicts after a recording, never during one.)
        if slot == self.anchor {
            self.anchor = NIL;
        }
        if slot == self.trail {
            self.trail = NIL;
        }
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

    /// Links the unlinked `slot` just behind the recording's anchor, or as the most recent
    /// entry before the recording's first.
    fn link_behind_anchor(&mut self, slot: u32) {
        let (newer, older) = match self.anchor {
            NIL => (NIL, self.newest),
            a => (a, self.nodes[a as usize].older),
        };
        {
            let node = &mut self.nodes[slot as usize];
            node.newer = newer;
            node.older = older;
        }
        match newer {
            NIL => self.newest = slot,
            n => self.nodes[n as usize].older = slot,
        }
        match older {
            NIL => self.oldest = slot,
            o => self.nodes[o as usize].newer = slot,
        }
    }
}

#[cfg(test)]
impl BlockLru {
    /// Checks the list's structure and returns its entries, most recent first, as (hash,
    /// slot): links that agree both ways and end at `newest` and `oldest`, no cycle, no hash
    /// twice, every slot either linked or free (once), `len` the weights' sum.
    pub(crate) fn check_invariants(&self) -> Vec<(u64, u32)> {
        let mut entries = Vec::new();
        let (mut at, mut newer, mut weights) = (self.newest, NIL, 0usize);
        while at != NIL {
            assert!(
                entries.len() < self.nodes.len(),
                "a cycle through slot {at}"
            );
            let node = &self.nodes[at as usize];
            assert_eq!(node.newer, newer, "slot {at}'s link to the newer entry");
            entries.push((node.hash, at));
            weights += node.weight as usize;
            (newer, at) = (at, node.older);
        }
        assert_eq!(self.oldest, newer, "the oldest entry");
        let mut hashes: Vec<u64> = entries.iter().map(|e| e.0).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), entries.len(), "a hash held twice");
        let mut slots: Vec<u32> = entries
            .iter()
            .map(|e| e.1)
            .chain(self.free.clone())
            .collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(
            slots.len(),
            entries.len() + self.free.len(),
            "a slot both linked and free"
        );
        assert_eq!(
            slots.len(),
            self.nodes.len(),
            "a slot neither linked nor free"
        );
        assert_eq!(self.len, weights, "len is the weights' sum");
        entries
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};

    use super::*;

    /// The index's side of the contract: hash → slot while held, and the lookups made.
    #[derive(Default)]
    struct Slots(HashMap<u64, u32>, usize);

    impl Slots {
        /// Records `h` in the current recording; true when it was not held.
        fn record_one(&mut self, lru: &mut BlockLru, h: u64) -> bool {
            if lru.record_in_place(h) {
                assert!(self.0.contains_key(&h), "an entry in place is held");
                return false;
            }
            self.1 += 1;
            match self.0.get(&h) {
                Some(&slot) => {
                    lru.record_held(slot);
                    false
                }
                None => {
                    self.0.insert(h, lru.record_new(h, 1));
                    true
                }
            }
        }

        /// Adds or promotes `h`; true when it was not held.
        fn touch(&mut self, lru: &mut BlockLru, h: u64) -> bool {
            lru.start_recording();
            self.record_one(lru, h)
        }

        /// Records a prompt's blocks as the index does.
        fn record(&mut self, lru: &mut BlockLru, prompt: &[u64]) {
            lru.start_recording();
            for &h in prompt {
                self.record_one(lru, h);
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
        lru.start_recording();
        lru.record_new(1, 1);
        lru.start_recording();
        lru.record_new(2, 8);
        assert_eq!(lru.len(), 9);
        assert_eq!(lru.pop_oldest(), Some(1));
        assert_eq!(lru.len(), 8);
        assert_eq!(lru.pop_oldest(), Some(2));
        assert_eq!(lru.len(), 0);
    }

    #[test]
    fn a_stamp_from_2_pow_32_recordings_ago_does_not_pass_for_placed() {
        let (mut lru, mut s) = (BlockLru::new(), Slots::default());
        s.record(&mut lru, &[1]);
        s.record(&mut lru, &[2]);
        // Stands for 2³² − 3 more recordings of [2], each in place: only 2 is stamped again.
        lru.recording = u32::MAX;
        lru.nodes[s.0[&2] as usize].recorded = u32::MAX;
        s.record(&mut lru, &[2]);
        assert_eq!(lru.recording, 1, "numbering goes on from 1");
        // 1 was last stamped by the first recording, which this one's number is again.
        s.record(&mut lru, &[1, 3]);
        // Promoting deepest first (3, then 1): least recent first 2, 3, 1.
        assert_eq!(lru.hashes().collect::<Vec<_>>(), vec![2, 3, 1]);
        lru.check_invariants();
    }

    #[test]
    fn a_recorded_run_stays_together_and_is_not_moved_again() {
        let (mut lru, mut s) = (BlockLru::new(), Slots::default());
        s.record(&mut lru, &[1, 2, 3]);
        s.record(&mut lru, &[7, 8]);
        // Least recent first: the first run, then the second, each in prompt order reversed.
        assert_eq!(lru.hashes().collect::<Vec<_>>(), vec![3, 2, 1, 8, 7]);
        // The first run again, with a new tail: its held blocks move as a unit, the tail
        // joins behind them.
        s.record(&mut lru, &[1, 2, 9]);
        assert_eq!(lru.hashes().collect::<Vec<_>>(), vec![3, 8, 7, 9, 2, 1]);
        let links: Vec<(u32, u32)> = lru.nodes.iter().map(|n| (n.newer, n.older)).collect();
        s.record(&mut lru, &[1, 2, 9]);
        let again: Vec<(u32, u32)> = lru.nodes.iter().map(|n| (n.newer, n.older)).collect();
        assert_eq!(links, again, "recording what is in place writes nothing");
        // Another conversation recorded since: the first run's first block is looked up and
        // moved, the rest follow it along the list.
        s.record(&mut lru, &[7, 8]);
        let before = s.1;
        s.record(&mut lru, &[1, 2, 9]);
        assert_eq!(
            s.1 - before,
            1,
            "one lookup, where the prompt leaves the run in place"
        );
        assert_eq!(lru.hashes().collect::<Vec<_>>(), vec![3, 8, 7, 9, 2, 1]);
        // A chain that repeats a block (a collision of the hash chain, which only a client
        // searching for one would produce): the block stays where its first occurrence put it,
        // as promoting deepest first would leave it, and the list stays whole.
        s.record(&mut lru, &[4, 4, 5, 4]);
        assert_eq!(lru.len(), 8);
        assert_eq!(
            lru.hashes().collect::<Vec<_>>(),
            vec![3, 8, 7, 9, 2, 1, 5, 4]
        );
        let mut back = Vec::new();
        let mut at = lru.newest;
        while at != NIL {
            back.push(lru.nodes[at as usize].hash);
            at = lru.nodes[at as usize].older;
        }
        back.reverse();
        assert_eq!(
            back,
            lru.hashes().collect::<Vec<_>>(),
            "both directions agree"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 256,
            rng_seed: proptest::test_runner::RngSeed::Fixed(23),
            failure_persistence: None,
            ..Default::default()
        })]
        /// Recording prompts run by run leaves the list as promoting each prompt's blocks one
        /// by one, deepest first (the index's order before runs), would.
        #[test]
        fn recording_runs_is_promoting_deepest_first(
            // Few distinct blocks make prompts that repeat blocks and lists the prompts
            // rearrange; more make runs that part and join.
            prompts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::collection::vec(0u64..6, 1..20),
                    proptest::collection::vec(0u64..40, 1..12),
                ],
                0..40,
            ),
            evictions in proptest::collection::vec(0usize..4, 0..40),
        ) {
            let (mut lru, mut s) = (BlockLru::new(), Slots::default());
            let mut model: VecDeque<u64> = VecDeque::new();
            for (i, prompt) in prompts.iter().enumerate() {
                s.record(&mut lru, prompt);
                for &h in prompt.iter().rev() {
                    model.retain(|&x| x != h);
                    model.push_back(h);
                }
                for _ in 0..evictions.get(i).copied().unwrap_or(0) {
                    proptest::prop_assert_eq!(s.pop(&mut lru), model.pop_front());
                }
                let mut by_slot: Vec<(u64, u32)> = s.0.iter().map(|(&h, &slot)| (h, slot)).collect();
                let mut listed = lru.check_invariants();
                by_slot.sort_unstable();
                listed.sort_unstable();
                proptest::prop_assert_eq!(listed, by_slot, "the slots the caller keeps");
                let held: Vec<u64> = lru.hashes().collect();
                let want: Vec<u64> = model.iter().copied().collect();
                proptest::prop_assert_eq!(held, want);
                proptest::prop_assert_eq!(lru.len(), model.len());
            }
        }
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
                lru.check_invariants();
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
