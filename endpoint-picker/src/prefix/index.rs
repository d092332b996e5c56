//! The approximate prefix-cache index: which endpoint was last sent which prefix blocks.
//!
//! It is a model of the engines' caches built from routing history: after a request is routed,
//! its block hashes are recorded for the chosen endpoint; each endpoint keeps at most
//! `capacity` blocks, evicting the least recently used. A reverse map `hash → endpoints`
//! makes matching one walk over the request's hashes, whatever the number of endpoints.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use parking_lot::RwLock;
use smallvec::SmallVec;

use super::block_lru::BlockLru;
use crate::datastore::EndpointId;

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
    /// (indexed by id; the slice must cover every id of interest and start zeroed).
    pub fn match_lengths(&self, hashes: &[u64], matches: &mut [u32]) {
        let inner = self.inner.read();
        for (i, h) in hashes.iter().enumerate() {
            let Some(holders) = inner.holders.get(h) else {
                break;
            };
            let mut advanced = false;
            for (id, _) in holders {
                if let Some(m) = matches.get_mut(id.0 as usize)
                    && *m as usize == i
                {
                    *m += 1;
                    advanced = true;
                }
            }
            if !advanced {
                break;
            }
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
        // Deepest block first, so the leading blocks end up most recent: matching stops at the
        // first miss, so when something must go it should be a request's tail, never its head.
        // One map operation per block: the holder entry carries the block's slot in the list.
        for &h in hashes.iter().rev() {
            let set = holders.entry(h).or_default();
            match set.iter().find(|(id, _)| *id == endpoint) {
                Some(&(_, slot)) => lru.promote(slot),
                None => {
                    let slot = lru.push_newest(h);
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

    /// Number of (block, endpoint) entries held.
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
mod tests {
    use super::*;

    fn lengths(index: &PrefixIndex, hashes: &[u64], n: usize) -> Vec<u32> {
        let mut m = vec![0; n];
        index.match_lengths(hashes, &mut m);
        m
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

    #[test]
    fn out_of_range_ids_are_ignored_when_matching() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointId(5), 10, &[1]);
        assert_eq!(lengths(&idx, &[1], 2), vec![0, 0]);
    }
}
