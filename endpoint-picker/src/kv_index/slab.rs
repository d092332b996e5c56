//! A least-recently-used map from 64-bit keys to values, in one slab.
//!
//! Nodes live in a `Vec` and link to each other by `u32` slot, so an entry costs its key, two
//! links and its value, plus one bucket of its [`KeyTable`]; there is no allocation per entry
//! and slots are reused. A slot is a stable handle to an entry until the entry is removed, which lets the
//! index keep reverse maps of slots (an endpoint's blocks) instead of keys.

use std::hash::{BuildHasher, Hasher};

use super::key_table::KeyTable;

/// No slot: the end of the recency list.
const NIL: u32 = u32::MAX;
/// Marks a free node (in `newer`, which a live node sets to `NIL` or a slot).
const FREE: u32 = u32::MAX - 1;

/// A slot handle.
pub type Slot = u32;

#[derive(Debug)]
struct Node<V> {
    key: u64,
    /// Towards the most recently used end.
    newer: u32,
    /// Towards the least recently used end.
    older: u32,
    /// `V::default()` while the node is free.
    value: V,
}

impl<V> Node<V> {
    #[inline]
    fn live(&self) -> bool {
        self.newer != FREE
    }
}

/// The map. Recency changes only on [`SlabLru::insert`] and [`SlabLru::touch`].
#[derive(Debug)]
pub struct SlabLru<V> {
    by_key: KeyTable,
    nodes: Vec<Node<V>>,
    free: Vec<Slot>,
    newest: u32,
    oldest: u32,
}

impl<V: Default> Default for SlabLru<V> {
    fn default() -> Self {
        Self {
            by_key: KeyTable::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
        }
    }
}

impl<V: Default> SlabLru<V> {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_key.len() == 0
    }

    /// The slot of `key`, without touching its recency.
    #[inline]
    pub fn slot(&self, key: u64) -> Option<Slot> {
        self.by_key.get(key)
    }

    /// The value of `key`, without touching its recency.
    #[inline]
    pub fn get(&self, key: u64) -> Option<&V> {
        self.slot(key).and_then(|s| self.at(s))
    }

    /// The value at a live slot.
    #[inline]
    pub fn at(&self, slot: Slot) -> Option<&V> {
        self.nodes
            .get(slot as usize)
            .filter(|n| n.live())
            .map(|n| &n.value)
    }

    /// The value at a live slot, mutably.
    #[inline]
    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut V> {
        self.nodes
            .get_mut(slot as usize)
            .filter(|n| n.live())
            .map(|n| &mut n.value)
    }

    /// The key at a live slot.
    #[cfg(test)]
    pub fn key_at(&self, slot: Slot) -> Option<u64> {
        self.nodes
            .get(slot as usize)
            .filter(|n| n.live())
            .map(|n| n.key)
    }

    /// The slot of `key`, inserting `make()` if absent; either way `key` becomes the most
    /// recently used. Returns the slot and whether it was inserted.
    pub fn insert_with(&mut self, key: u64, make: impl FnOnce() -> V) -> (Slot, bool) {
        // One probe of the table for both outcomes (a lookup and then an insert would be two,
        // each a cache miss on a table of millions of keys).
        let vacant = match self.by_key.find(key) {
            Ok(slot) => {
                self.touch(slot);
                return (slot, false);
            }
            Err(vacant) => vacant,
        };
        let node = Node {
            key,
            newer: NIL,
            older: NIL,
            value: make(),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                // Slots are u32; the caps keep the count far below that.
                self.nodes.push(node);
                (self.nodes.len() - 1) as Slot
            }
        };
        self.by_key.fill(vacant, key, slot);
        self.link_newest(slot);
        (slot, true)
    }

    /// Makes a live slot the most recently used.
    pub fn touch(&mut self, slot: Slot) {
        let live = self.nodes.get(slot as usize).is_some_and(Node::live);
        if !live || self.newest == slot {
            return;
        }
        self.unlink(slot);
        self.link_newest(slot);
    }

    /// Removes a live slot, returning its key and value.
    pub fn remove(&mut self, slot: Slot) -> Option<(u64, V)> {
        let node = self.nodes.get(slot as usize).filter(|n| n.live())?;
        let key = node.key;
        self.unlink(slot);
        let node = &mut self.nodes[slot as usize];
        let value = std::mem::take(&mut node.value);
        node.newer = FREE;
        self.by_key.remove(key);
        self.free.push(slot);
        Some((key, value))
    }

    /// Reads the table bucket of each of `keys` and of the `evictions` least recently used
    /// entries' keys, changing nothing. The reads are independent, so the processor overlaps
    /// their cache misses, where the inserts and evictions that follow would take them one at a
    /// time (each waits on the last). On a table of millions of keys that is most of an
    /// insert's cost (bench/RESULTS.md, "Ingest").
    pub fn warm(&self, keys: impl Iterator<Item = u64>, evictions: usize) {
        for key in keys {
            self.by_key.warm(key);
        }
        let mut slot = self.oldest;
        for _ in 0..evictions {
            let Some(node) = self.nodes.get(slot as usize) else {
                break;
            };
            self.by_key.warm(node.key);
            slot = node.newer;
        }
    }

    /// The least recently used slot.
    pub fn oldest(&self) -> Option<Slot> {
        (self.oldest != NIL).then_some(self.oldest)
    }

    /// Bytes held by the map's own storage (not by what values point to).
    pub fn heap_bytes(&self) -> usize {
        self.by_key.heap_bytes()
            + self.nodes.capacity() * std::mem::size_of::<Node<V>>()
            + self.free.capacity() * std::mem::size_of::<Slot>()
    }

    fn link_newest(&mut self, slot: Slot) {
        let old_newest = self.newest;
        {
            let n = &mut self.nodes[slot as usize];
            n.newer = NIL;
            n.older = old_newest;
        }
        if old_newest != NIL {
            self.nodes[old_newest as usize].newer = slot;
        } else {
            self.oldest = slot;
        }
        self.newest = slot;
    }

    fn unlink(&mut self, slot: Slot) {
        let (newer, older) = {
            let n = &self.nodes[slot as usize];
            (n.newer, n.older)
        };
        if newer != NIL {
            self.nodes[newer as usize].older = older;
        } else {
            self.newest = older;
        }
        if older != NIL {
            self.nodes[older as usize].newer = newer;
        } else {
            self.oldest = newer;
        }
    }
}

/// Hashes 64-bit keys with a per-process random seed. Keys are already hashes, but of content a
/// client chooses: a keyed mix keeps crafted prompts from piling into one bucket.
#[derive(Debug, Clone, Copy)]
pub struct KeyHashState {
    seed: u64,
}

impl KeyHashState {
    /// A random seed.
    pub fn random() -> Self {
        Self {
            seed: rand::random::<u64>() | 1,
        }
    }
}

impl KeyHashState {
    /// What a [`KeyHasher64`] of this state makes of one `u64`, without building one.
    #[inline]
    pub fn hash_u64(&self, key: u64) -> u64 {
        fold(key ^ self.seed, self.seed)
    }
}

/// The folded 128-bit multiply both [`KeyHasher64`] and [`KeyHashState::hash_u64`] use.
#[inline]
fn fold(state: u64, seed: u64) -> u64 {
    let m = u128::from(state) * u128::from(0x9e37_79b9_7f4a_7c15u64 ^ seed);
    (m as u64) ^ ((m >> 64) as u64)
}

impl Default for KeyHashState {
    /// A random seed, as [`KeyHashState::random`].
    fn default() -> Self {
        Self::random()
    }
}

impl BuildHasher for KeyHashState {
    type Hasher = KeyHasher64;

    fn build_hasher(&self) -> KeyHasher64 {
        KeyHasher64 {
            seed: self.seed,
            state: 0,
        }
    }
}

/// The hasher of [`KeyHashState`]: a folded 128-bit multiply of the key with the seed.
#[derive(Debug)]
pub struct KeyHasher64 {
    seed: u64,
    state: u64,
}

impl Hasher for KeyHasher64 {
    fn finish(&self) -> u64 {
        fold(self.state ^ self.seed, self.seed)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; other input still hashes, slowly.
        for &b in bytes {
            self.state = (self.state.rotate_left(8)) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.state ^= v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_in_least_recently_used_order() {
        let mut lru = SlabLru::default();
        let (a, _) = lru.insert_with(1, || 'a');
        lru.insert_with(2, || 'b');
        lru.insert_with(3, || 'c');
        lru.touch(a);
        let order: Vec<u64> = std::iter::from_fn(|| {
            let s = lru.oldest()?;
            lru.remove(s).map(|(k, _)| k)
        })
        .collect();
        assert_eq!(order, vec![2, 3, 1]);
        assert!(lru.is_empty());
    }

    #[test]
    fn warming_reads_only() {
        let mut lru = SlabLru::default();
        for k in 1..=4 {
            lru.insert_with(k, || k * 10);
        }
        // Present and absent keys, and more evictions than entries.
        lru.warm([2, 9, 4].into_iter(), 10);
        assert_eq!(lru.len(), 4);
        assert_eq!(lru.get(2), Some(&20));
        assert_eq!(lru.get(9), None);
        let order: Vec<u64> = std::iter::from_fn(|| {
            let s = lru.oldest()?;
            lru.remove(s).map(|(k, _)| k)
        })
        .collect();
        assert_eq!(order, vec![1, 2, 3, 4]);
        SlabLru::<u64>::default().warm([1].into_iter(), 3);
    }

    #[test]
    fn slots_are_reused_and_stale_slots_read_nothing() {
        let mut lru = SlabLru::default();
        let (s, inserted) = lru.insert_with(7, || 1);
        assert!(inserted);
        assert_eq!(lru.insert_with(7, || 2), (s, false));
        assert_eq!(lru.remove(s), Some((7, 1)));
        assert_eq!(lru.at(s), None);
        assert_eq!(lru.remove(s), None);
        let (s2, _) = lru.insert_with(8, || 3);
        assert_eq!(s2, s);
        assert_eq!(lru.get(8), Some(&3));
        assert_eq!(lru.key_at(s2), Some(8));
        assert_eq!(lru.len(), 1);
    }
}
