//! Per-adapter demand, counted where the director routes.
//!
//! Only adapters the placement catalogue declares are tracked (the catalogue is bounded by
//! [`super::config::MAX_ADAPTERS`]; a model name from a client that is not in it costs one
//! failed hash lookup and nothing else). The request path adds to an atomic counter and, for
//! the in-flight count per (adapter, endpoint) that keeps an adapter from being unloaded under
//! its requests, takes one short lock; the placement loop reads both.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::datastore::EndpointId;

/// Demand counters for the catalogue's adapters.
#[derive(Debug)]
pub struct LoraDemand {
    index: HashMap<String, usize>,
    names: Vec<String>,
    routed: Vec<AtomicU64>,
    /// Requests routed and not finished, per (adapter index, endpoint). Entries at 0 are
    /// removed, so the map holds at most adapters × endpoints with requests running.
    in_flight: Mutex<HashMap<(usize, EndpointId), u32>>,
}

/// One routed request's share of its adapter's in-flight count; released when dropped (the
/// request's stream ended).
#[derive(Debug)]
pub struct DemandGuard {
    demand: Arc<LoraDemand>,
    adapter: usize,
    endpoint: EndpointId,
}

impl Drop for DemandGuard {
    fn drop(&mut self) {
        let mut m = self.demand.in_flight.lock();
        if let Some(n) = m.get_mut(&(self.adapter, self.endpoint)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&(self.adapter, self.endpoint));
            }
        }
    }
}

impl LoraDemand {
    /// Counters for `names` (duplicates kept once, in first-seen order).
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let mut index = HashMap::new();
        let mut list = Vec::new();
        for n in names {
            if !index.contains_key(&n) {
                index.insert(n.clone(), list.len());
                list.push(n);
            }
        }
        let routed = list.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            index,
            names: list,
            routed,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// The tracked adapters, in index order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Counts a request for `model` routed to `endpoint`; `None` (and nothing counted) when
    /// `model` is not a catalogue adapter. Keep the guard for as long as the request runs.
    pub fn routed(self: &Arc<Self>, model: &str, endpoint: EndpointId) -> Option<DemandGuard> {
        let &adapter = self.index.get(model)?;
        self.routed[adapter].fetch_add(1, Ordering::Relaxed);
        *self
            .in_flight
            .lock()
            .entry((adapter, endpoint))
            .or_insert(0) += 1;
        Some(DemandGuard {
            demand: self.clone(),
            adapter,
            endpoint,
        })
    }

    /// Requests routed so far, per adapter (index order).
    pub fn totals(&self) -> Vec<u64> {
        self.routed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Requests for `adapter` in flight on `endpoint`.
    pub fn in_flight(&self, adapter: &str, endpoint: EndpointId) -> u32 {
        let Some(&a) = self.index.get(adapter) else {
            return 0;
        };
        self.in_flight
            .lock()
            .get(&(a, endpoint))
            .copied()
            .unwrap_or(0)
    }

    /// Every (adapter, endpoint) with requests in flight, and how many.
    pub fn in_flight_all(&self) -> Vec<(String, EndpointId, u32)> {
        self.in_flight
            .lock()
            .iter()
            .map(|(&(a, e), &n)| (self.names[a].clone(), e, n))
            .collect()
    }
}

/// Request rates from counter totals: an exponentially weighted moving average with a
/// half-life, so a burst counts for a while and old demand fades.
#[derive(Debug, Clone)]
pub struct RateMeter {
    half_life: Duration,
    last: Option<(Instant, Vec<u64>)>,
    rates: Vec<f64>,
}

impl RateMeter {
    /// A meter whose weights halve every `half_life` (at least 1 ms).
    pub fn new(half_life: Duration) -> Self {
        Self {
            half_life: half_life.max(Duration::from_millis(1)),
            last: None,
            rates: Vec::new(),
        }
    }

    /// Folds in the totals read at `now`; returns the rates (requests per second, same order).
    pub fn update(&mut self, now: Instant, totals: &[u64]) -> &[f64] {
        self.rates.resize(totals.len(), 0.0);
        if let Some((at, prev)) = &self.last {
            let dt = now.saturating_duration_since(*at).as_secs_f64();
            if dt > 0.0 {
                // The weight of the new window: 1 − 2^(−dt / half-life).
                let w = 1.0 - (-dt / self.half_life.as_secs_f64()).exp2();
                for (i, (r, &t)) in self.rates.iter_mut().zip(totals).enumerate() {
                    let before = prev.get(i).copied().unwrap_or(t);
                    let window = t.saturating_sub(before) as f64 / dt;
                    *r += w * (window - *r);
                }
            }
        }
        self.last = Some((now, totals.to_vec()));
        &self.rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_catalogue_adapters_are_counted_and_guards_release() {
        let d = Arc::new(LoraDemand::new(["a".to_owned(), "b".into(), "a".into()]));
        assert_eq!(d.names(), ["a", "b"]);
        assert!(d.routed("base-model", EndpointId(0)).is_none());
        let g1 = d.routed("a", EndpointId(1));
        let g2 = d.routed("a", EndpointId(1));
        let _g3 = d.routed("b", EndpointId(2));
        assert_eq!(d.totals(), [2, 1]);
        assert_eq!(d.in_flight("a", EndpointId(1)), 2);
        drop(g1);
        assert_eq!(d.in_flight("a", EndpointId(1)), 1);
        drop(g2);
        assert_eq!(d.in_flight("a", EndpointId(1)), 0);
        assert_eq!(d.in_flight_all(), [("b".to_owned(), EndpointId(2), 1)]);
        assert_eq!(d.totals(), [2, 1], "totals only grow");
    }

    #[tokio::test(start_paused = true)]
    async fn rates_follow_demand_and_fade() {
        let mut m = RateMeter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(m.update(t0, &[0, 0]), [0.0, 0.0]);
        // 10 req/s on the first adapter for 10 s: the average converges on 10.
        let mut at = t0;
        for i in 1..=10u64 {
            at += Duration::from_secs(1);
            m.update(at, &[10 * i, 0]);
        }
        assert!((m.rates[0] - 10.0).abs() < 0.05, "{:?}", m.rates);
        // Silence: after one half-life per step it halves.
        at += Duration::from_secs(1);
        let r = m.update(at, &[100, 0])[0];
        assert!((r - 5.0).abs() < 0.05, "{r}");
    }
}
