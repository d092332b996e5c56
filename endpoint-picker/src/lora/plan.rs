//! The placement decision: from each adapter's demand and what each replica holds, how many
//! replicas each adapter should be on and which loads and unloads get there. Pure: the caller
//! passes the clock's reading and every input, and runs the [`Action`]s itself.
//!
//! **How many.** An adapter with recent demand (an average rate of at least
//! [`PlanConfig::min_rate`], or a request in flight) gets a share of the replicas proportional
//! to its share of the demand, `x = rate / Σ rate × replicas`, rounded up, at least 1 and at
//! most every replica. Hysteresis: an adapter keeps its previous count `r` while `x` stays in
//! `(r − 1 − band, r + band]`, so demand hovering near a boundary does not flap. When the
//! counts exceed the adapter slots of the pool, the largest counts shrink first, then the
//! adapters with the least demand lose their place. An adapter without recent demand wants 0.
//!
//! **Which replicas.** Adapters are placed most needed first: those on no replica at all
//! (their requests would fail), then by demand. A load goes to a replica with a free slot,
//! the one carrying the least demand (each adapter's rate divided over its replicas) so hot
//! adapters spread; failing that, to the replica whose evictable adapter has the least
//! demand, which is unloaded first. Only an adapter on more replicas than it wants is
//! evictable, and only once it has been there [`PlanConfig::min_dwell`] and has no request
//! running or waiting there. Nothing else is unloaded (an adapter more replicas hold than
//! needed stays until its slot is wanted: unloading costs a reload later and frees nothing
//! now), except the adapters the catalogue says must not exist. Adapters the catalogue does
//! not know are left alone; they take their slot. At most [`PlanConfig::max_changes`] loads
//! and unloads per pass.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::datastore::EndpointId;

/// The decision's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanConfig {
    /// An adapter placed (or first seen) on a replica stays at least this long.
    pub min_dwell: Duration,
    /// Most loads plus unloads per pass.
    pub max_changes: usize,
    /// Hysteresis band, in replicas (see the module doc), `>= 0`.
    pub band: f64,
    /// Average rate (requests/s) from which an adapter has recent demand.
    pub min_rate: f64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            min_dwell: Duration::from_secs(30),
            max_changes: 4,
            band: 0.25,
            min_rate: 0.01,
        }
    }
}

/// One catalogue adapter's demand.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterDemand {
    /// Its name.
    pub name: String,
    /// Average requests per second.
    pub rate: f64,
    /// Requests in flight (the EPP's count).
    pub in_flight: u64,
}

/// One replica the plan may use (the caller leaves out those that failed or do not serve).
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointState {
    /// The endpoint.
    pub id: EndpointId,
    /// Adapter slots (registered adapters it may hold).
    pub capacity: usize,
    /// Registered adapters and since when they are known to be there.
    pub loaded: BTreeMap<String, Instant>,
    /// Adapters with requests running or waiting there (the engine's scraped lists and the
    /// EPP's in-flight count): never unloaded.
    pub busy: BTreeSet<String>,
}

/// A change to make.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Unload `adapter` from `endpoint` (listed before the load it makes room for).
    Unload {
        /// Where.
        endpoint: EndpointId,
        /// What.
        adapter: String,
    },
    /// Load `adapter` on `endpoint`.
    Load {
        /// Where.
        endpoint: EndpointId,
        /// What.
        adapter: String,
    },
}

impl Action {
    /// The endpoint it changes.
    pub fn endpoint(&self) -> EndpointId {
        match self {
            Action::Unload { endpoint, .. } | Action::Load { endpoint, .. } => *endpoint,
        }
    }

    /// The adapter it loads or unloads.
    pub fn adapter(&self) -> &str {
        match self {
            Action::Unload { adapter, .. } | Action::Load { adapter, .. } => adapter,
        }
    }
}

/// A pass's decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Replicas wanted per catalogue adapter (0 included).
    pub desired: BTreeMap<String, usize>,
    /// What to do, in order.
    pub actions: Vec<Action>,
}

/// The decision for one pass. `previous`: the last pass's [`Plan::desired`] (hysteresis);
/// `forbidden`: adapters that must not be loaded (unloaded when idle).
pub fn plan(
    cfg: &PlanConfig,
    now: Instant,
    demand: &[AdapterDemand],
    forbidden: &BTreeSet<String>,
    endpoints: &[EndpointState],
    previous: &BTreeMap<String, usize>,
) -> Plan {
    // An adapter both declared and forbidden is never loaded.
    let demand: Vec<AdapterDemand> = demand
        .iter()
        .filter(|d| !forbidden.contains(&d.name))
        .cloned()
        .collect();
    let demand = demand.as_slice();
    let catalogue: BTreeSet<&str> = demand.iter().map(|d| d.name.as_str()).collect();
    // Slots each replica has for catalogue adapters (others' adapters keep theirs).
    let usable: Vec<usize> = endpoints
        .iter()
        .map(|e| {
            let foreign = e
                .loaded
                .keys()
                .filter(|a| !catalogue.contains(a.as_str()) && !forbidden.contains(*a))
                .count();
            e.capacity.saturating_sub(foreign)
        })
        .collect();
    let desired = desired_replicas(cfg, demand, &usable, previous);
    let rate: BTreeMap<&str, f64> = demand.iter().map(|d| (d.name.as_str(), d.rate)).collect();
    let mut state = State {
        loaded: endpoints
            .iter()
            .map(|e| e.loaded.keys().cloned().collect())
            .collect(),
        budget: cfg.max_changes,
        actions: Vec::new(),
    };

    // 1. Adapters that must not exist go first, wherever idle.
    for (i, e) in endpoints.iter().enumerate() {
        for a in e.loaded.keys() {
            if forbidden.contains(a) && !e.busy.contains(a) && state.budget > 0 {
                state.unload(i, e.id, a);
            }
        }
    }

    // 2. Missing replicas, most needed first, one at a time.
    let mut stuck: BTreeSet<String> = BTreeSet::new();
    while state.budget > 0 {
        let holders = |s: &State, a: &str| s.loaded.iter().filter(|l| l.contains(a)).count();
        // (no replica at all, −rate) orders the needs; name breaks ties.
        let need = desired
            .iter()
            .filter(|(a, want)| **want > holders(&state, a) && !stuck.contains(*a))
            .min_by(|(a, wa), (b, wb)| {
                let key = |n: &str, w: usize| {
                    let h = holders(&state, n);
                    (h > 0, (h as f64) / (w as f64))
                };
                let (ka, kb) = (key(a, **wa), key(b, **wb));
                ka.0.cmp(&kb.0)
                    .then(ka.1.total_cmp(&kb.1))
                    .then(rate_of(&rate, b).total_cmp(&rate_of(&rate, a)))
                    .then(a.cmp(b))
            })
            .map(|(a, _)| a.clone());
        let Some(adapter) = need else { break };
        // Each replica's demand: its adapters' rates divided over their replicas.
        let heat = |s: &State, i: usize| -> f64 {
            s.loaded[i]
                .iter()
                .map(|a| rate_of(&rate, a) / holders(s, a).max(1) as f64)
                .sum()
        };
        let used = |s: &State, i: usize| {
            s.loaded[i]
                .iter()
                .filter(|a| catalogue.contains(a.as_str()) || forbidden.contains(*a))
                .count()
        };
        let candidates = (0..endpoints.len()).filter(|&i| !state.loaded[i].contains(&adapter));
        // A free slot, on the coolest replica.
        let free = candidates
            .clone()
            .filter(|&i| used(&state, i) < usable[i])
            .min_by(|&x, &y| heat(&state, x).total_cmp(&heat(&state, y)).then(x.cmp(&y)));
        if let Some(i) = free {
            state.load(i, endpoints[i].id, &adapter);
            continue;
        }
        // Else room made by evicting the least-demanded evictable adapter.
        if state.budget < 2 {
            break;
        }
        let victim = candidates
            // One unload must make room (a replica past its slots stays as it is).
            .filter(|&i| usable[i] > 0 && used(&state, i) <= usable[i])
            .filter_map(|i| {
                let e = &endpoints[i];
                state.loaded[i]
                    .iter()
                    .filter(|a| catalogue.contains(a.as_str()))
                    .filter(|a| !e.busy.contains(*a))
                    .filter(|a| {
                        e.loaded.get(*a).is_none_or(|since| {
                            now.saturating_duration_since(*since) >= cfg.min_dwell
                        })
                    })
                    .filter(|a| holders(&state, a) > desired.get(*a).copied().unwrap_or(0))
                    .min_by(|a, b| {
                        rate_of(&rate, a)
                            .total_cmp(&rate_of(&rate, b))
                            .then(a.cmp(b))
                    })
                    .map(|a| (i, a.clone()))
            })
            .min_by(|(i, a), (j, b)| {
                rate_of(&rate, a)
                    .total_cmp(&rate_of(&rate, b))
                    .then(heat(&state, *i).total_cmp(&heat(&state, *j)))
                    .then(i.cmp(j))
            });
        match victim {
            Some((i, v)) => {
                state.unload(i, endpoints[i].id, &v);
                state.load(i, endpoints[i].id, &adapter);
            }
            None => {
                stuck.insert(adapter);
            }
        }
    }
    Plan {
        desired,
        actions: state.actions,
    }
}

fn rate_of(rate: &BTreeMap<&str, f64>, adapter: &str) -> f64 {
    rate.get(adapter).copied().unwrap_or(0.0)
}

struct State {
    loaded: Vec<BTreeSet<String>>,
    budget: usize,
    actions: Vec<Action>,
}

impl State {
    fn load(&mut self, i: usize, endpoint: EndpointId, adapter: &str) {
        self.loaded[i].insert(adapter.to_owned());
        self.budget = self.budget.saturating_sub(1);
        self.actions.push(Action::Load {
            endpoint,
            adapter: adapter.to_owned(),
        });
    }

    fn unload(&mut self, i: usize, endpoint: EndpointId, adapter: &str) {
        self.loaded[i].remove(adapter);
        self.budget = self.budget.saturating_sub(1);
        self.actions.push(Action::Unload {
            endpoint,
            adapter: adapter.to_owned(),
        });
    }
}

/// Replicas wanted per adapter (see the module doc), within the slots of `usable`.
fn desired_replicas(
    cfg: &PlanConfig,
    demand: &[AdapterDemand],
    usable: &[usize],
    previous: &BTreeMap<String, usize>,
) -> BTreeMap<String, usize> {
    let mut out: BTreeMap<String, usize> = demand.iter().map(|d| (d.name.clone(), 0)).collect();
    let replicas = usable.iter().filter(|&&u| u > 0).count();
    let slots: usize = usable.iter().sum();
    if replicas == 0 {
        return out;
    }
    let wanted: Vec<&AdapterDemand> = demand
        .iter()
        .filter(|d| d.rate >= cfg.min_rate || d.in_flight > 0)
        .collect();
    let total: f64 = wanted.iter().map(|d| d.rate.max(0.0)).sum();
    for d in &wanted {
        // Only in flight (no measured rate yet): the smallest share.
        let x = if total > 0.0 {
            d.rate.max(0.0) / total * replicas as f64
        } else {
            0.0
        };
        let fresh = (x.ceil() as usize).clamp(1, replicas);
        let r = match previous.get(&d.name).copied().filter(|&p| p > 0) {
            Some(p) if x > p as f64 - 1.0 - cfg.band && x <= p as f64 + cfg.band => p.min(replicas),
            _ => fresh,
        };
        out.insert(d.name.clone(), r);
    }
    // Fit the slots: shrink the largest counts, then drop the least demanded adapters.
    let rate: BTreeMap<&str, f64> = demand.iter().map(|d| (d.name.as_str(), d.rate)).collect();
    while out.values().sum::<usize>() > slots {
        let largest = out
            .iter()
            .filter(|(_, r)| **r > 1)
            .max_by(|(a, ra), (b, rb)| {
                ra.cmp(rb)
                    .then(rate_of(&rate, b).total_cmp(&rate_of(&rate, a)))
                    .then(b.cmp(a))
            })
            .map(|(a, _)| a.clone());
        let pick = largest.or_else(|| {
            out.iter()
                .filter(|(_, r)| **r > 0)
                .min_by(|(a, _), (b, _)| {
                    rate_of(&rate, a)
                        .total_cmp(&rate_of(&rate, b))
                        .then(b.cmp(a))
                })
                .map(|(a, _)| a.clone())
        });
        match pick.and_then(|a| out.get_mut(&a)) {
            Some(r) => *r -= 1,
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests;
