//! The approximate prefix-cache index: which endpoint was last sent which prefix blocks.
//!
//! It is a model of the engines' caches built from routing history: after a request is routed,
//! its block hashes are recorded for the chosen endpoint; each endpoint keeps at most
//! `capacity` blocks, evicting the least recently used. A reverse map `hash → endpoints`
//! makes matching one walk over the request's hashes, whatever the number of endpoints.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use lru::LruCache;
use parking_lot::RwLock;
use smallvec::SmallVec;

use crate::datastore::EndpointId;

type Holders = SmallVec<[EndpointId; 4]>;

/// The index. Cheap to share behind an `Arc`; reads take a read lock for one walk.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    holders: HashMap<u64, Holders>,
    /// Per endpoint id: its LRU of block hashes.
    endpoints: Vec<Option<LruCache<u64, ()>>>,
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
            for id in holders {
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
        let capacity = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        let mut inner = self.inner.write();
        let Inner { holders, endpoints } = &mut *inner;
        let slot = endpoint.0 as usize;
        if endpoints.len() <= slot {
            endpoints.resize_with(slot + 1, || None);
        }
        let lru = endpoints[slot].get_or_insert_with(|| LruCache::new(capacity));
        if lru.cap() != capacity {
            // Auto-tuning learned the real cache size; shrink or grow in place.
            while lru.len() > capacity.get() {
                if let Some((old, ())) = lru.pop_lru() {
                    remove_holder(holders, old, endpoint);
                }
            }
            lru.resize(capacity);
        }
        for &h in hashes {
            match lru.push(h, ()) {
                // Already held: refreshed to most recent.
                Some((k, ())) if k == h => {}
                // Newly held, and the LRU block of this endpoint made room.
                Some((evicted, ())) => {
                    remove_holder(holders, evicted, endpoint);
                    holders.entry(h).or_default().push(endpoint);
                }
                None => holders.entry(h).or_default().push(endpoint),
            }
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
                for (h, ()) in lru.iter() {
                    remove_holder(holders, *h, id);
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
            .map(LruCache::len)
            .sum()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn remove_holder(holders: &mut HashMap<u64, Holders>, hash: u64, endpoint: EndpointId) {
    if let Some(set) = holders.get_mut(&hash) {
        set.retain(|id| *id != endpoint);
        if set.is_empty() {
            holders.remove(&hash);
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
        idx.insert(EndpointId(0), 3, &[1, 2, 3]);
        idx.insert(EndpointId(0), 3, &[1]); // touch 1
        idx.insert(EndpointId(0), 3, &[4]); // evicts 2 (least recent)
        assert_eq!(lengths(&idx, &[1, 2], 1), vec![1]);
        assert_eq!(lengths(&idx, &[4], 1), vec![1]);
        assert_eq!(idx.len(), 3);
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
