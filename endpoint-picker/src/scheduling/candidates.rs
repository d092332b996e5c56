//! The candidate list one decision leaves for the next.
//!
//! Building a decision's candidates clones two `Arc`s per endpoint (the endpoint and its
//! metrics) and dropping them gives both back: four atomic writes to lines of memory spread
//! over the whole pool, about a quarter of a decision at 1,000 endpoints (bench
//! `request_path`). Between two decisions most endpoints keep both: the pool changes rarely
//! and an engine's metrics change once a scrape. So the director keeps the last list and
//! refreshes it: an endpoint still at its place whose metrics are still those the list holds
//! (its [`Endpoint::metrics_version`]) costs two reads, and only the others are cloned again.
//!
//! The list is leased whole for a decision. Two decisions at once do not wait for each
//! other: the second finds the cache empty and builds its own list, and whichever comes back
//! last stays for the next.

use std::ops::Deref;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::datastore::Endpoint;
use crate::scheduling::Candidate;

/// The last decision's candidates (see the module's documentation).
#[derive(Debug, Default)]
pub struct CandidateCache {
    last: Mutex<Cached>,
}

/// Candidates and the metrics version each was read at, in the snapshot's order.
#[derive(Debug, Default)]
struct Cached {
    candidates: Vec<Candidate>,
    versions: Vec<u64>,
}

impl CandidateCache {
    /// Every endpoint of `endpoints` as a candidate with its current metrics, for one
    /// decision; the list returns to the cache when the lease is dropped.
    pub fn lease(&self, endpoints: &[Arc<Endpoint>]) -> CandidateLease<'_> {
        let mut cached = self
            .last
            .try_lock()
            .map(|mut last| std::mem::take(&mut *last))
            .unwrap_or_default();
        cached.refresh(endpoints);
        CandidateLease {
            cache: self,
            cached,
        }
    }
}

impl Cached {
    fn refresh(&mut self, endpoints: &[Arc<Endpoint>]) {
        self.candidates.truncate(endpoints.len());
        self.versions.truncate(endpoints.len());
        for (i, endpoint) in endpoints.iter().enumerate() {
            // The version first: metrics stored after it was read make the list newer than its
            // label, and the next refresh reads them again; never older.
            let version = endpoint.metrics_version();
            match (self.candidates.get_mut(i), self.versions.get_mut(i)) {
                (Some(c), Some(v)) if Arc::ptr_eq(&c.endpoint, endpoint) => {
                    if *v != version {
                        c.metrics = endpoint.metrics();
                        *v = version;
                    }
                }
                (Some(c), Some(v)) => {
                    *c = Candidate::new(endpoint.clone());
                    *v = version;
                }
                _ => {
                    self.candidates.push(Candidate::new(endpoint.clone()));
                    self.versions.push(version);
                }
            }
        }
    }
}

/// A decision's candidate list, borrowed from a [`CandidateCache`].
#[derive(Debug)]
pub struct CandidateLease<'a> {
    cache: &'a CandidateCache,
    cached: Cached,
}

impl Deref for CandidateLease<'_> {
    type Target = [Candidate];
    fn deref(&self) -> &[Candidate] {
        &self.cached.candidates
    }
}

impl Drop for CandidateLease<'_> {
    fn drop(&mut self) {
        let mine = std::mem::take(&mut self.cached);
        // The list this one replaces (a concurrent lease's, returned first) or this one, when
        // the cache is busy, is dropped after the lock is released: releasing a whole pool's
        // references under it would make every concurrent lease miss the cache meanwhile.
        let _unkept = match self.cache.last.try_lock() {
            Some(mut last) => std::mem::replace(&mut *last, mine),
            None => mine,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{Datastore, EngineMetrics, test_util::pool};

    fn waiting(n: u64) -> EngineMetrics {
        EngineMetrics {
            waiting_queue_size: n,
            ..Default::default()
        }
    }

    fn queues(candidates: &[Candidate]) -> Vec<u64> {
        candidates
            .iter()
            .map(|c| c.metrics.waiting_queue_size)
            .collect()
    }

    #[test]
    fn a_lease_reads_metrics_stored_since_the_last_and_keeps_the_rest() {
        let ds = Datastore::new();
        let snap = ds.apply(pool(3));
        let cache = CandidateCache::default();
        let first = cache.lease(&snap.endpoints);
        assert_eq!(queues(&first), [0, 0, 0]);
        let kept = first[0].metrics.clone();
        drop(first);
        // The list went back to the cache with what it read: the endpoint's metrics are held
        // by the endpoint, the cache, `kept` and the reading below.
        assert_eq!(Arc::strong_count(&snap.endpoints[0].metrics()), 4);
        snap.endpoints[1].store_metrics(waiting(7));
        let second = cache.lease(&snap.endpoints);
        assert_eq!(queues(&second), [0, 7, 0]);
        assert!(
            Arc::ptr_eq(&second[0].metrics, &kept),
            "unchanged metrics are the same allocation, not a new clone"
        );
        // A store while a lease is out is seen by the next one.
        snap.endpoints[2].store_metrics(waiting(3));
        drop(second);
        assert_eq!(queues(&cache.lease(&snap.endpoints)), [0, 7, 3]);
    }

    #[test]
    fn a_lease_follows_the_pool() {
        let ds = Datastore::new();
        let three = ds.apply(pool(3));
        let cache = CandidateCache::default();
        drop(cache.lease(&three.endpoints));
        // Smaller, then larger with new endpoints: every candidate is the snapshot's.
        let one = ds.apply(pool(1));
        let lease = cache.lease(&one.endpoints);
        assert_eq!(lease.len(), 1);
        assert!(Arc::ptr_eq(&lease[0].endpoint, &one.endpoints[0]));
        drop(lease);
        let four = ds.apply(pool(4));
        let lease = cache.lease(&four.endpoints);
        assert_eq!(lease.len(), 4);
        for (c, e) in lease.iter().zip(four.endpoints.iter()) {
            assert!(Arc::ptr_eq(&c.endpoint, e));
        }
    }

    #[test]
    fn two_leases_at_once_each_get_the_whole_list() {
        let ds = Datastore::new();
        let snap = ds.apply(pool(2));
        let cache = CandidateCache::default();
        drop(cache.lease(&snap.endpoints));
        let a = cache.lease(&snap.endpoints);
        snap.endpoints[0].store_metrics(waiting(5));
        let b = cache.lease(&snap.endpoints);
        assert_eq!(queues(&a), [0, 0]);
        assert_eq!(queues(&b), [5, 0]);
        drop(a);
        drop(b);
        assert_eq!(queues(&cache.lease(&snap.endpoints)), [5, 0]);
    }
}
