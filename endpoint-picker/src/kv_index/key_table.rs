//! The key → slot table of a [`super::slab::SlabLru`]: open addressing with linear probing, each
//! bucket the key and its slot side by side.
//!
//! Why not `std`'s `HashMap`: at the index's sizes (millions of keys, tables far larger than the
//! processor's caches) every probe is a cache miss, and a SwissTable probe is two of them, the
//! control bytes and then the bucket; a probe here reads one line (four buckets), and the line an
//! insert will write is the one a read-ahead ([`KeyTable::warm`]) brought in. Ingest is mostly
//! these misses (bench/RESULTS.md, "The precise prefix index").
//!
//! Removal shifts the following entries back (no tombstones), so a table under churn stays as
//! fast as a fresh one. Keys come from content clients choose; the bucket comes from a keyed mix
//! ([`KeyHashState`]) so that crafted keys cannot pile into one run.

use super::slab::{KeyHashState, Slot};

/// Marks an empty bucket (slots are far below it: the caps keep the slab small).
const EMPTY: Slot = Slot::MAX;
/// The table grows once it would be fuller than 3/4 (probes stay within a line or two).
const LOAD_NUM: usize = 3;
const LOAD_DEN: usize = 4;
/// Buckets in a 64-byte line.
const BUCKETS_PER_LINE: usize = 64 / std::mem::size_of::<Bucket>();
/// Buckets of a table's first allocation.
const MIN_BUCKETS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    key: u64,
    slot: Slot,
}

const VACANT_BUCKET: Bucket = Bucket {
    key: 0,
    slot: EMPTY,
};

/// Where an absent key goes ([`KeyTable::find`]); valid until the table next changes.
#[derive(Debug, Clone, Copy)]
pub struct Vacant(usize);

/// The table (empty, with a random key for its mix, by default).
#[derive(Debug, Default)]
pub struct KeyTable {
    /// A power of two long, or empty.
    buckets: Vec<Bucket>,
    len: usize,
    hash: KeyHashState,
}

impl KeyTable {
    /// Keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes of the buckets.
    pub fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<Bucket>()
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        // `buckets.len()` is a power of two (or 0, and then no caller gets here).
        (self.hash.hash_u64(key) as usize) & (self.buckets.len() - 1)
    }

    /// The bucket holding `key`, or the empty one ending its probe (where it would go). The
    /// table must have buckets.
    #[inline]
    fn probe(&self, key: u64) -> Result<usize, usize> {
        let mask = self.buckets.len() - 1;
        let mut i = self.home(key);
        loop {
            let b = self.buckets[i];
            if b.slot == EMPTY {
                return Err(i);
            }
            if b.key == key {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot of `key`.
    #[inline]
    pub fn get(&self, key: u64) -> Option<Slot> {
        if self.len == 0 {
            return None;
        }
        self.probe(key).ok().map(|i| self.buckets[i].slot)
    }

    /// The slot of `key`, or where it would go. Grows the table first if one more key would
    /// make it too full, so that the [`Vacant`] stays valid for [`KeyTable::fill`].
    #[inline]
    pub fn find(&mut self, key: u64) -> Result<Slot, Vacant> {
        if (self.len + 1) * LOAD_DEN > self.buckets.len() * LOAD_NUM {
            self.grow();
        }
        self.probe(key)
            .map(|i| self.buckets[i].slot)
            .map_err(Vacant)
    }

    /// Puts `key` where [`KeyTable::find`] said, with no change to the table in between.
    #[inline]
    pub fn fill(&mut self, at: Vacant, key: u64, slot: Slot) {
        debug_assert!(slot != EMPTY);
        debug_assert!(self.buckets[at.0].slot == EMPTY);
        self.buckets[at.0] = Bucket { key, slot };
        self.len += 1;
    }

    /// Removes `key`, returning its slot. The entries after it in its run move back, so that
    /// every key stays reachable from its home bucket without tombstones.
    pub fn remove(&mut self, key: u64) -> Option<Slot> {
        if self.len == 0 {
            return None;
        }
        let mut hole = self.probe(key).ok()?;
        let slot = self.buckets[hole].slot;
        let mask = self.buckets.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let b = self.buckets[j];
            if b.slot == EMPTY {
                break;
            }
            // An entry stays if its home lies cyclically in (hole, j]: moving it before its
            // home would hide it. Otherwise it fills the hole, and its bucket is the new hole.
            let home = self.home(b.key);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = VACANT_BUCKET;
        self.len -= 1;
        Some(slot)
    }

    /// Reads the bucket line of `key`'s home and the line after it, changing nothing: where an
    /// insert of `key` writes, or what its removal reads and moves, unless its run is longer.
    /// Two plain loads, with no branch on what they read: the reads of many keys are then
    /// independent and the processor overlaps their misses. (A probe loop would not: its exit
    /// depends on the missing line, and every mispredicted exit discards the reads begun after
    /// it.)
    #[inline]
    pub fn warm(&self, key: u64) {
        if self.buckets.is_empty() {
            return;
        }
        let mask = self.buckets.len() - 1;
        let i = self.home(key);
        std::hint::black_box(self.buckets[i].slot);
        std::hint::black_box(self.buckets[(i + BUCKETS_PER_LINE) & mask].slot);
    }

    fn grow(&mut self) {
        let buckets = (self.buckets.len() * 2).max(MIN_BUCKETS);
        let old = std::mem::replace(&mut self.buckets, vec![VACANT_BUCKET; buckets]);
        let mask = buckets - 1;
        for b in old.into_iter().filter(|b| b.slot != EMPTY) {
            let mut i = self.home(b.key);
            while self.buckets[i].slot != EMPTY {
                i = (i + 1) & mask;
            }
            self.buckets[i] = b;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn put(t: &mut KeyTable, key: u64, slot: Slot) -> bool {
        match t.find(key) {
            Ok(_) => false,
            Err(at) => {
                t.fill(at, key, slot);
                true
            }
        }
    }

    #[test]
    fn inserts_finds_removes_and_grows() {
        let mut t = KeyTable::default();
        assert_eq!(t.get(1), None);
        assert_eq!(t.remove(1), None);
        for k in 0..1000u64 {
            assert!(put(&mut t, k * 7919, k as Slot));
        }
        assert!(!put(&mut t, 7919, 99));
        assert_eq!(t.len(), 1000);
        assert!(t.buckets.len() * LOAD_NUM >= t.len() * LOAD_DEN);
        for k in 0..1000u64 {
            assert_eq!(t.get(k * 7919), Some(k as Slot));
        }
        for k in (0..1000u64).step_by(2) {
            assert_eq!(t.remove(k * 7919), Some(k as Slot));
        }
        assert_eq!(t.len(), 500);
        for k in 0..1000u64 {
            let want = (k % 2 == 1).then_some(k as Slot);
            assert_eq!(t.get(k * 7919), want, "key {k}");
        }
        // Keys 0 and Slot-like values are ordinary keys.
        assert!(put(&mut t, 0, 3));
        assert_eq!(t.get(0), Some(3));
        t.warm(0);
        t.warm(12345);
        KeyTable::default().warm(1);
    }

    /// Runs that wrap past the table's end, and removals in the middle of them: a small table
    /// (16 buckets) filled to its load, by every order of removal a seed picks.
    #[test]
    fn removal_keeps_wrapped_runs_reachable() {
        for seed in 0..200u64 {
            let mut t = KeyTable::default();
            let keys: Vec<u64> = (0..12).map(|i| seed * 1000 + i).collect();
            for (i, &k) in keys.iter().enumerate() {
                put(&mut t, k, i as Slot);
            }
            assert_eq!(t.buckets.len(), 16);
            let mut order = keys.clone();
            order.sort_by_key(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15 ^ seed));
            for (n, k) in order.iter().enumerate() {
                assert!(t.remove(*k).is_some());
                for rest in &order[n + 1..] {
                    assert!(t.get(*rest).is_some(), "seed {seed}: {rest} lost");
                }
            }
            assert_eq!(t.len(), 0);
        }
    }

    proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x7ab1e),
            failure_persistence: None,
            ..Default::default()
        })]
        /// Against a `HashMap`: any sequence of inserts and removals over a small key space
        /// (so that runs form and break) agrees on every key.
        #[test]
        fn agrees_with_a_hash_map(ops in prop::collection::vec((any::<bool>(), 0u64..64), 0..400)) {
            let mut t = KeyTable::default();
            let mut model: HashMap<u64, Slot> = HashMap::new();
            for (n, (insert, key)) in ops.into_iter().enumerate() {
                if insert {
                    let fresh = !model.contains_key(&key);
                    prop_assert_eq!(put(&mut t, key, n as Slot), fresh);
                    model.entry(key).or_insert(n as Slot);
                } else {
                    prop_assert_eq!(t.remove(key), model.remove(&key));
                }
                prop_assert_eq!(t.len(), model.len());
            }
            for key in 0..64 {
                prop_assert_eq!(t.get(key), model.get(&key).copied());
            }
        }
    }
}
