//! Flow control: admission and queueing between parsing and scheduling, with the reference's
//! (llm-d-router) configuration names and semantics, on with the `flowControl` feature gate.
//!
//! A request enters [`FlowControl::enqueue`] and waits on its [`Ticket`] until the dispatcher
//! lets it go ([`Admitted`], then it is scheduled) or drops it ([`FlowRejection`], answered
//! with the reference's status and `x-llm-d-request-dropped-reason`). In between it sits in a
//! queue:
//!
//! - **bands** by priority (the InferenceObjective's), highest served first; bands listed in
//!   `priorityBands` exist from the start, others are made from the default templates when a
//!   priority is first seen and dropped after 10 idle minutes;
//! - within a band, **one queue per flow** (the fairness id, `default-flow` when none); the
//!   band's fairness policy picks the flow, its ordering policy the request ([`policy`]);
//! - **dispatch** happens in cycles (after each enqueue, each release and every 1 ms while
//!   anything waits): the cycle asks the pool's saturation (the configured detector, counting
//!   requests dispatched but not yet routed, and with the utilization detector those routed
//!   since the last scrape) and the usage-limit policy's ceilings; from the
//!   highest band down, a band at or over its ceiling stops the cycle (head-of-line, as in the
//!   reference), otherwise it gives up one request. Nothing is dispatched while the pool has
//!   no endpoint: that is the **waiting room** of scale-from-zero;
//! - **TTL**: a request waits at most `defaultRequestTTL` while the pool has endpoints and
//!   `noEndpointRequestTTL` while it has none, each budget charged with the time spent in its
//!   regime, over all the request's time in it (the reference's regime split);
//! - **capacity**: per band (`maxRequests`, `maxBytes`) and global; a request that does not fit
//!   is rejected at once. A request's bytes are what the EPP holds for it while it waits
//!   ([`crate::request::InferenceRequest::held_bytes`]: body, token ids, headers), so that
//!   `maxBytes` bounds memory; the reference counts the body alone. With `enableEviction`, one
//!   that does not fit the *global* caps first evicts queued sheddable requests (priority < 0)
//!   of lower priority: lowest priority first, newest first within it, and only if that makes
//!   room;
//! - **fair share** (a deviation): in a band whose fairness policy serves flows in turn
//!   (round robin, least attained service), a request that does not fit takes its room from
//!   the newest requests of the band's largest flows (by the larger of a flow's fractions of
//!   the band's two caps), each only while that flow holds more than the newcomer's flow
//!   would, at most [`MAX_FAIR_SHARE_EVICTIONS`] of them, and only if that makes room
//!   (`EvictedFairShare`, 429 `evicted-fair-share`), after eviction (if on) made what room
//!   lower priorities could give. Without it one flow can fill a band and
//!   every other tenant is refused, which would make the fairness policy moot under overload.
//!   The largest flow is the one refused, as in fq_codel's drop from the fattest queue. Under
//!   global strict (one arrival-ordered queue) the newcomer is refused, as in the reference;
//! - a client that goes away drops its [`Ticket`]: the request leaves its queue at once and its
//!   capacity is free for the next.
//!
//! Memory: a queued request costs its queue entry ([`QUEUED_ENTRY_BYTES`]) plus a one-shot
//! channel allocation here; the body is not copied (the stream keeps its one buffer).
//!
//! Locking: one mutex over the queues, held for short non-blocking sections only (no `.await`,
//! no observer call under it). The dispatcher is a supervised task ([`FlowControl::run`]).

pub mod config;
pub mod policy;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::config::params::Params;
use crate::saturation::Unrouted;
pub use config::{BandConfig, FlowConfig};
use policy::{Contender, FairnessPolicy, Las, OrderingPolicy};

/// The size of one queue entry (the request's bookkeeping while it waits; the one-shot
/// channel it is answered on is one more small allocation, about 80 bytes).
pub const QUEUED_ENTRY_BYTES: usize = std::mem::size_of::<Item>();
/// Most flows per band listed by [`FlowControl::snapshot`] (`/debug/pool`).
pub const MAX_DEBUG_FLOWS: usize = 100;
/// The flow of a request that names none (the reference's default flow).
pub const DEFAULT_FAIRNESS_ID: &str = "default-flow";
/// Longest header value `agent-identity` takes as a flow id (the fairness header's cap).
pub const MAX_AGENT_ID_BYTES: usize = 128;
/// The headers `agent-identity` reads after its `additionalSessionHeaders`, in order.
pub const AGENT_IDENTITY_HEADERS: [&str; 4] = [
    "x-claude-code-session-id",
    "x-session-affinity",
    "session-id",
    "session_id",
];

/// What became of a request that entered flow control (the reference's outcome names, plus
/// `EvictedPriority` for the displacement `enableEviction` does here and `EvictedFairShare` for
/// the one a full band's fair share does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Let go to the scheduler.
    Dispatched,
    /// Did not fit a band's or the global caps.
    RejectedCapacity,
    /// Did not fit while the pool had no endpoint.
    RejectedNoEndpoints,
    /// Refused for another reason (shutdown).
    RejectedOther,
    /// Waited its TTL while the pool had endpoints.
    EvictedTtl,
    /// Waited `noEndpointRequestTTL` while the pool had none.
    EvictedNoEndpoints,
    /// Its client went away while it waited.
    EvictedContextCancelled,
    /// Dropped for another reason (shutdown).
    EvictedOther,
    /// Displaced by a higher-priority request (`enableEviction`).
    EvictedPriority,
    /// Displaced from a full band by a request of a flow holding less of it (fair share).
    EvictedFairShare,
}

impl Outcome {
    /// Every outcome, for metric and debug listings.
    pub const ALL: [Outcome; 10] = [
        Outcome::Dispatched,
        Outcome::RejectedCapacity,
        Outcome::RejectedNoEndpoints,
        Outcome::RejectedOther,
        Outcome::EvictedTtl,
        Outcome::EvictedNoEndpoints,
        Outcome::EvictedContextCancelled,
        Outcome::EvictedOther,
        Outcome::EvictedPriority,
        Outcome::EvictedFairShare,
    ];

    /// The reference's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Dispatched => "Dispatched",
            Outcome::RejectedCapacity => "RejectedCapacity",
            Outcome::RejectedNoEndpoints => "RejectedNoEndpoints",
            Outcome::RejectedOther => "RejectedOther",
            Outcome::EvictedTtl => "EvictedTTL",
            Outcome::EvictedNoEndpoints => "EvictedNoEndpoints",
            Outcome::EvictedContextCancelled => "EvictedContextCancelled",
            Outcome::EvictedOther => "EvictedOther",
            Outcome::EvictedPriority => "EvictedPriority",
            Outcome::EvictedFairShare => "EvictedFairShare",
        }
    }

    fn index(self) -> usize {
        Outcome::ALL.iter().position(|&o| o == self).unwrap_or(0)
    }
}

/// A request flow control did not let through, and how its client is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRejection {
    /// What happened.
    pub outcome: Outcome,
    /// Whether the pool had no endpoint when it happened.
    pub pool_empty: bool,
}

impl std::fmt::Display for FlowRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.outcome {
            Outcome::Dispatched => "dispatched",
            Outcome::RejectedCapacity => "flow control queue capacity exceeded",
            Outcome::RejectedNoEndpoints | Outcome::EvictedNoEndpoints => {
                "no endpoints available to serve the request"
            }
            Outcome::RejectedOther | Outcome::EvictedOther => "flow controller is shutting down",
            Outcome::EvictedTtl if self.pool_empty => "no endpoints available to serve the request",
            Outcome::EvictedTtl => "request timed out in the flow control queue",
            Outcome::EvictedContextCancelled => "request cancelled while queued",
            Outcome::EvictedPriority => "request evicted by a higher-priority request",
            Outcome::EvictedFairShare => {
                "request evicted: its flow held more than its share of a full queue"
            }
        };
        f.write_str(why)
    }
}

impl std::error::Error for FlowRejection {}

impl FlowRejection {
    /// The HTTP status and the reference's error-code name.
    pub fn status(&self) -> (u16, &'static str) {
        match self.outcome {
            Outcome::RejectedCapacity | Outcome::EvictedPriority | Outcome::EvictedFairShare => {
                (429, "ResourceExhausted")
            }
            Outcome::EvictedTtl if !self.pool_empty => (429, "ResourceExhausted"),
            Outcome::Dispatched => (500, "Internal"),
            _ => (503, "ServiceUnavailable"),
        }
    }

    /// The reference's `x-llm-d-request-dropped-reason`.
    pub fn dropped_reason(&self) -> Option<&'static str> {
        Some(match self.outcome {
            Outcome::RejectedCapacity => "rejected-saturated",
            Outcome::RejectedNoEndpoints | Outcome::EvictedNoEndpoints => "rejected-no-endpoints",
            Outcome::EvictedTtl if self.pool_empty => "rejected-no-endpoints",
            Outcome::EvictedTtl => "rejected-ttl-expired",
            Outcome::EvictedContextCancelled => "rejected-context-cancelled",
            Outcome::RejectedOther | Outcome::EvictedOther => "rejected-shutting-down",
            Outcome::EvictedPriority => "evicted-priority",
            Outcome::EvictedFairShare => "evicted-fair-share",
            Outcome::Dispatched => return None,
        })
    }
}

/// What flow control needs to know of a request.
#[derive(Debug, Clone)]
pub struct FlowRequest {
    /// Its flow (fairness id).
    pub fairness_id: Arc<str>,
    /// Its priority (band).
    pub priority: i32,
    /// Its body size, counted against the byte caps.
    pub bytes: u64,
    /// Its prompt tokens (`InferenceRequest::prompt_tokens`), counted as dispatched prefill.
    pub prompt_tokens: u64,
    /// Its TTFT objective (the SLO-deadline ordering's deadline).
    pub slo_ttft: Option<Duration>,
    /// The model asked for (metric labels).
    pub model: String,
    /// The model to be served (metric labels).
    pub target_model: String,
}

/// The names an observer files a request's flow-control events under, chosen on entry and
/// handed back on exit (a gauge raised under a name is lowered under the same one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FlowRecordKey {
    /// The flow's label value.
    pub fairness_id: Arc<str>,
    /// The model's label value.
    pub model: Arc<str>,
    /// The served model's label value.
    pub target_model: Arc<str>,
    /// The pool's label value when the request entered (the pool's name may be learnt, or
    /// change, while it waits).
    pub pool: Arc<str>,
}

/// Hears every request enter and leave flow control (metrics). Called outside flow control's
/// lock, on the request path: must not block.
pub trait FlowObserver: Send + Sync + std::fmt::Debug {
    /// A request entered (it is counted queued until [`FlowObserver::left`]).
    fn entered(&self, request: &FlowRequest) -> FlowRecordKey;
    /// It left, after `waited`, with `outcome`.
    fn left(&self, request: &FlowRequest, key: &FlowRecordKey, outcome: Outcome, waited: Duration);
}

/// The pool as the dispatcher sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolReading {
    /// Endpoints a request could be routed to now.
    pub endpoints: usize,
    /// The saturation detector's value over them (1 or more = saturated; 1 when empty).
    pub saturation: f64,
}

/// Reads the pool for the dispatcher (the director, or a test's stand-in).
pub trait PoolProbe: Send + Sync {
    /// The pool now; `unrouted` has been let go and is not routed yet.
    fn read(&self, unrouted: Unrouted) -> PoolReading;
}

/// A request let go by flow control. Held until it is routed: until then it counts as load
/// for the saturation detector, so that one cycle's dispatches see the previous ones.
#[derive(Debug)]
pub struct Admitted {
    fc: Arc<FlowControl>,
    /// How long it waited.
    pub waited: Duration,
    /// Its prompt's estimated tokens, counted in `dispatched_tokens` until routed.
    tokens: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.fc.dispatched.fetch_sub(1, Ordering::Relaxed);
        self.fc
            .dispatched_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        self.fc.wake();
    }
}

type Decision = Result<Admitted, FlowRejection>;

/// A queued request.
#[derive(Debug)]
struct Item {
    id: u64,
    enqueued: Instant,
    /// The pool's time without endpoints when it was enqueued, in nanoseconds (its wait
    /// without endpoints is measured from it, its wait with them is the rest of its wait:
    /// [`State::expire`]; a `u64`, not a `Duration`, to keep the entry small).
    empty_clock_at_enqueue: u64,
    /// The SLO-deadline ordering's deadline.
    deadline: Option<Instant>,
    bytes: u64,
    prompt_tokens: u64,
    tx: oneshot::Sender<Decision>,
}

impl Item {
    /// The ordering key (smaller goes first): FCFS/EDF by arrival; SLO deadline by deadline,
    /// requests without one after all those with one.
    fn key(&self, ordering: OrderingPolicy) -> (bool, Instant, u64) {
        match (ordering, self.deadline) {
            (OrderingPolicy::SloDeadline, Some(d)) => (false, d, self.id),
            (OrderingPolicy::SloDeadline, None) => (true, self.enqueued, self.id),
            _ => (false, self.enqueued, self.id),
        }
    }
}

#[derive(Debug)]
struct Band {
    cfg: BandConfig,
    /// Flow id → its queue, in arrival order (empty flows are removed).
    flows: BTreeMap<Arc<str>, VecDeque<Item>>,
    /// With global-strict fairness: every queued request by its ordering key, and its flow.
    /// The first entry is the band's next request, found without visiting every flow (a client
    /// names its flow in a header, so there can be as many flows as queued requests).
    by_key: Option<BTreeMap<(bool, Instant, u64), Arc<str>>>,
    /// Every queued request by id (arrival), and its flow: the last is the newest, the one
    /// eviction displaces first, again without visiting every flow.
    by_id: BTreeMap<u64, Arc<str>>,
    len: u64,
    bytes: u64,
    /// The flow served last (round-robin's cursor).
    last_served: Option<Arc<str>>,
    /// Listed in `priorityBands` (never dropped).
    provisioned: bool,
    /// Last enqueue or dispatch.
    active: Instant,
    /// With a fairness policy that serves flows in turn: what each flow holds of the band,
    /// largest first, for [`Band::plan_fair_room`].
    shares: Option<Shares>,
}

/// Most requests one arrival may displace from a full band's largest flows: a request that
/// would need more is refused instead (bounds the work under flow control's lock).
pub const MAX_FAIR_SHARE_EVICTIONS: usize = 64;

/// What each flow holds of a band (requests, bytes), indexed by its share of the band's caps so
/// that the largest flow is found in O(log flows).
#[derive(Debug)]
struct Shares {
    max_requests: u64,
    max_bytes: u64,
    held: HashMap<Arc<str>, (u64, u64)>,
    largest: BTreeSet<(u128, Arc<str>)>,
}

impl Shares {
    fn new(cfg: &BandConfig) -> Self {
        Self {
            max_requests: cfg.max_requests.max(1),
            max_bytes: cfg.max_bytes.max(1),
            held: HashMap::new(),
            largest: BTreeSet::new(),
        }
    }

    /// A flow's share of the band: the larger of its fractions of the two caps, scaled by
    /// their product (comparable across flows without division).
    fn weight(&self, (requests, bytes): (u64, u64)) -> u128 {
        (u128::from(requests) * u128::from(self.max_bytes))
            .max(u128::from(bytes) * u128::from(self.max_requests))
    }

    fn held(&self, flow: &str) -> (u64, u64) {
        self.held.get(flow).copied().unwrap_or_default()
    }

    /// Moves `flow`'s holding by one request of `bytes`, up or down.
    fn change(&mut self, flow: &Arc<str>, bytes: u64, up: bool) {
        let before = self.held(flow);
        if before != (0, 0) {
            self.largest.remove(&(self.weight(before), flow.clone()));
        }
        let after = if up {
            (before.0 + 1, before.1.saturating_add(bytes))
        } else {
            (before.0.saturating_sub(1), before.1.saturating_sub(bytes))
        };
        if after.0 == 0 {
            self.held.remove(flow);
        } else {
            self.held.insert(flow.clone(), after);
            self.largest.insert((self.weight(after), flow.clone()));
        }
    }

    fn clear(&mut self) {
        self.held.clear();
        self.largest.clear();
    }
}

impl Band {
    fn new(cfg: BandConfig, provisioned: bool, now: Instant) -> Self {
        let global_strict = matches!(cfg.fairness.1, FairnessPolicy::GlobalStrict);
        let by_key = global_strict.then(BTreeMap::new);
        let shares = (!global_strict).then(|| Shares::new(&cfg));
        Self {
            cfg,
            flows: BTreeMap::new(),
            by_key,
            by_id: BTreeMap::new(),
            len: 0,
            bytes: 0,
            last_served: None,
            provisioned,
            active: now,
            shares,
        }
    }

    /// Queues `item` (its id above every id queued) at the back of `flow`.
    fn push(&mut self, flow: Arc<str>, item: Item) {
        if let Some(by_key) = &mut self.by_key {
            by_key.insert(item.key(self.cfg.ordering.1), flow.clone());
        }
        self.by_id.insert(item.id, flow.clone());
        if let Some(shares) = &mut self.shares {
            shares.change(&flow, item.bytes, true);
        }
        self.len += 1;
        self.bytes += item.bytes;
        self.flows.entry(flow).or_default().push_back(item);
    }

    /// Removes the request at `index` of `flow`.
    fn take(&mut self, flow: &Arc<str>, index: usize) -> Option<Item> {
        let queue = self.flows.get_mut(flow)?;
        let item = queue.remove(index)?;
        if queue.is_empty() {
            self.flows.remove(flow);
        }
        if let Some(by_key) = &mut self.by_key {
            by_key.remove(&item.key(self.cfg.ordering.1));
        }
        self.by_id.remove(&item.id);
        if let Some(shares) = &mut self.shares {
            shares.change(flow, item.bytes, false);
        }
        self.len -= 1;
        self.bytes -= item.bytes;
        Some(item)
    }

    /// Removes the band's oldest requests for which `expired` holds, oldest first, into `out`,
    /// and stops at the first that has not expired. Expiry follows arrival: every request of a
    /// regime has the same budget, and a request's wait in either regime grows no slower than
    /// that of any request queued after it (the empty-pool clock runs no faster than the
    /// wall). So the cycle costs O(log n) per request expired plus one look at the oldest,
    /// not a visit of every flow each millisecond (a client names its flow, so there can be as
    /// many flows as queued requests).
    fn expire_heads(&mut self, expired: impl Fn(&Item) -> bool, out: &mut Vec<Item>) {
        while let Some((_, flow)) = self.by_id.first_key_value() {
            let flow = flow.clone();
            // The band's oldest request is the head of its flow's queue (each queue is in
            // arrival order).
            if !self
                .flows
                .get(&flow)
                .and_then(VecDeque::front)
                .is_some_and(&expired)
            {
                break;
            }
            match self.take(&flow, 0) {
                Some(item) => out.push(item),
                None => break,
            }
        }
    }

    /// Every head for which `expired` holds, by visiting every flow: what
    /// [`Band::expire_heads`] finds from the oldest request, for the property test.
    #[cfg(test)]
    fn expired_by_visiting_every_flow(&self, expired: impl Fn(&Item) -> bool) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .flows
            .values()
            .flat_map(|queue| queue.iter().take_while(|item| expired(item)))
            .map(|item| item.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Empties the band.
    fn clear(&mut self) -> impl Iterator<Item = Item> + use<> {
        if let Some(by_key) = &mut self.by_key {
            by_key.clear();
        }
        self.by_id.clear();
        if let Some(shares) = &mut self.shares {
            shares.clear();
        }
        self.len = 0;
        self.bytes = 0;
        std::mem::take(&mut self.flows).into_values().flatten()
    }

    /// The newest queued request: (flow, index in its queue), the back of its flow.
    fn newest(&self) -> Option<(Arc<str>, usize)> {
        let (_, flow) = self.by_id.last_key_value()?;
        let index = self.flows.get(flow)?.len().checked_sub(1)?;
        Some((flow.clone(), index))
    }

    /// Fair share of a full band: which of the newest requests of the band's largest flows
    /// make `need` (requests, bytes) of room for a request of `flow` holding `bytes`, each taken
    /// only from a flow that would still hold more of the band than `flow` with the newcomer.
    /// As (flow, how many from its back). `None` when the band does not share its room by flow
    /// (global-strict fairness), or when that cannot make the room within
    /// [`MAX_FAIR_SHARE_EVICTIONS`]: then the newcomer is the one refused.
    fn plan_fair_room(
        &self,
        flow: &Arc<str>,
        bytes: u64,
        (need_requests, need_bytes): (u64, u64),
    ) -> Option<Vec<(Arc<str>, usize)>> {
        struct Giving {
            flow: Arc<str>,
            held: (u64, u64),
            taken: usize,
        }
        let shares = self.shares.as_ref()?;
        let own = shares.held(flow);
        let own = shares.weight((own.0 + 1, own.1.saturating_add(bytes)));
        // Flows not yet giving, largest first; those giving are re-weighed as they give.
        let mut others = shares.largest.iter().rev().filter(|(_, f)| f != flow);
        let mut next_other = others.next();
        let mut giving: Vec<Giving> = Vec::new();
        let (mut freed_requests, mut freed_bytes, mut taken) = (0u64, 0u64, 0usize);
        while freed_requests < need_requests || freed_bytes < need_bytes {
            if taken == MAX_FAIR_SHARE_EVICTIONS {
                return None;
            }
            let largest_giving = giving
                .iter()
                .enumerate()
                .map(|(n, g)| (shares.weight(g.held), n))
                .max();
            let index = match (largest_giving, next_other) {
                (Some((weight, n)), Some((other, _))) if weight >= *other => {
                    (weight > own).then_some(n)
                }
                (_, Some((other, id))) => (*other > own).then(|| {
                    giving.push(Giving {
                        flow: id.clone(),
                        held: shares.held(id),
                        taken: 0,
                    });
                    next_other = others.next();
                    giving.len() - 1
                }),
                (Some((weight, n)), None) => (weight > own).then_some(n),
                (None, None) => None,
            }?;
            let g = &mut giving[index];
            let queue = self.flows.get(&g.flow)?;
            let item = queue.get(queue.len().checked_sub(g.taken + 1)?)?;
            g.taken += 1;
            g.held = (
                g.held.0.saturating_sub(1),
                g.held.1.saturating_sub(item.bytes),
            );
            freed_requests += 1;
            freed_bytes = freed_bytes.saturating_add(item.bytes);
            taken += 1;
        }
        Some(giving.into_iter().map(|g| (g.flow, g.taken)).collect())
    }

    /// The best request of `queue` by the band's ordering policy: its index.
    fn best_of(&self, queue: &VecDeque<Item>) -> Option<usize> {
        let ordering = self.cfg.ordering.1;
        match ordering {
            OrderingPolicy::SloDeadline => queue
                .iter()
                .enumerate()
                .min_by_key(|(_, i)| i.key(ordering))
                .map(|(n, _)| n),
            OrderingPolicy::Fcfs | OrderingPolicy::Edf => (!queue.is_empty()).then_some(0),
        }
    }

    /// The next request by the band's policies: (flow, index in its queue). Round robin and
    /// global strict find it in O(log flows) (and round robin's SLO-deadline ordering scans the
    /// one flow it serves); least attained service weighs every flow.
    fn pick(&self, now: Instant) -> Option<(Arc<str>, usize)> {
        let picked = self.quick_pick(now);
        // The indexes follow the queues (every change goes through `push`, `take`,
        // `expire_heads` and `clear`); were they ever out of step, the band would stop
        // dispatching without a sign. Tests fail on it; a release build weighs every flow.
        debug_assert!(
            picked.is_some() || self.len == 0,
            "a band's index is out of step with its queues"
        );
        match picked {
            None if self.len > 0 => self.pick_by_weighing_every_flow(now),
            picked => picked,
        }
    }

    fn quick_pick(&self, now: Instant) -> Option<(Arc<str>, usize)> {
        match (&self.cfg.fairness.1, &self.by_key) {
            (FairnessPolicy::GlobalStrict, Some(by_key)) => {
                let (&(_, _, id), flow) = by_key.first_key_value()?;
                let position = self
                    .flows
                    .get(flow)?
                    .binary_search_by_key(&id, |i| i.id)
                    .ok()?;
                Some((flow.clone(), position))
            }
            (FairnessPolicy::RoundRobin, _) => {
                let after = self.last_served.as_deref().and_then(|last| {
                    self.flows
                        .range::<str, _>((Bound::Excluded(last), Bound::Unbounded))
                        .next()
                });
                let (flow, queue) = after.or_else(|| self.flows.first_key_value())?;
                Some((flow.clone(), self.best_of(queue)?))
            }
            _ => self.pick_by_weighing_every_flow(now),
        }
    }

    /// [`Band::pick`] by building every non-empty flow's contender and asking the fairness
    /// policy (what least attained service needs; the others' reference in tests).
    fn pick_by_weighing_every_flow(&self, now: Instant) -> Option<(Arc<str>, usize)> {
        let ordering = self.cfg.ordering.1;
        let mut flows: Vec<(&Arc<str>, usize)> = Vec::with_capacity(self.flows.len());
        let mut contenders: Vec<Contender<'_>> = Vec::with_capacity(self.flows.len());
        for (id, queue) in &self.flows {
            let Some(best) = self.best_of(queue) else {
                continue;
            };
            let item = &queue[best];
            flows.push((id, best));
            contenders.push(Contender {
                id,
                head_enqueued: item.enqueued,
                head_key: item.key(ordering),
            });
        }
        if flows.is_empty() {
            return None;
        }
        let chosen = self
            .cfg
            .fairness
            .1
            .pick(&contenders, self.last_served.as_deref(), now)
            .min(flows.len() - 1);
        let (id, index) = flows[chosen];
        Some((id.clone(), index))
    }
}

#[derive(Debug)]
struct State {
    /// Highest priority first.
    bands: Vec<Band>,
    len: u64,
    bytes: u64,
    pool_empty: bool,
    /// Whether a cycle has read the pool yet (the first reading sets the regime, it does not
    /// change it).
    pool_read: bool,
    /// When the pool last changed between empty and not.
    regime_since: Instant,
    /// The pool's time without endpoints up to `regime_since`.
    empty_clock: Duration,
    next_id: u64,
    /// The arrival time of the last request queued: see [`FlowControl::enqueue`].
    last_enqueued: Option<Instant>,
    saturation: f64,
    ceilings: Vec<f64>,
    priorities: Vec<i32>,
    last_housekeeping: Instant,
    /// The dispatcher has stopped (shutdown): nothing queued now would ever be let go.
    stopped: bool,
}

impl State {
    fn band_index(&mut self, priority: i32, config: &FlowConfig, now: Instant) -> usize {
        match self
            .bands
            .binary_search_by(|b| priority.cmp(&b.cfg.priority))
        {
            Ok(i) => i,
            Err(i) => {
                self.bands
                    .insert(i, Band::new(config.template(priority), false, now));
                i
            }
        }
    }

    /// The pool's time without endpoints up to `now`.
    fn empty_clock(&self, now: Instant) -> Duration {
        if self.pool_empty {
            self.empty_clock + now.saturating_duration_since(self.regime_since)
        } else {
            self.empty_clock
        }
    }

    /// Moves to the regime `empty` at `now`, charging the time since the last change to the
    /// regime it ends.
    fn change_regime(&mut self, empty: bool, now: Instant) {
        self.empty_clock = self.empty_clock(now);
        self.regime_since = now;
        self.pool_empty = empty;
    }

    /// Pops every request whose wait budget for the current regime is spent: `budget` of time
    /// waited in this regime (with endpoints, or without) since it was enqueued, all such
    /// stretches counted together. Budgets are charged, not restarted, at each change, so a
    /// pool that flaps between empty and not faster than either budget cannot hold a request
    /// for ever. Each queue is in arrival order and the budget is the same for all, so only
    /// queue heads need looking at.
    fn expire(&mut self, budget: Option<Duration>, now: Instant, out: &mut Vec<(Item, Outcome)>) {
        let Some(budget) = budget else { return };
        let empty = self.pool_empty;
        let outcome = if empty {
            Outcome::EvictedNoEndpoints
        } else {
            Outcome::EvictedTtl
        };
        let empty_clock = self.empty_clock(now);
        let mut items = Vec::new();
        for band in &mut self.bands {
            band.expire_heads(
                |head| {
                    let without = empty_clock
                        .saturating_sub(Duration::from_nanos(head.empty_clock_at_enqueue));
                    let waited = if empty {
                        without
                    } else {
                        now.saturating_duration_since(head.enqueued)
                            .saturating_sub(without)
                    };
                    waited >= budget
                },
                &mut items,
            );
        }
        for item in items {
            self.len -= 1;
            self.bytes -= item.bytes;
            out.push((item, outcome));
        }
    }

    /// Takes the newest request of the lowest-priority band below `priority` that holds
    /// sheddable requests.
    fn displace_one(&mut self, priority: i32) -> Option<Item> {
        let band = self
            .bands
            .iter_mut()
            .rev()
            .find(|b| b.cfg.priority < priority.min(0) && b.len > 0)?;
        let (flow, index) = band.newest()?;
        let item = band.take(&flow, index)?;
        self.len -= 1;
        self.bytes -= item.bytes;
        Some(item)
    }
}

/// Counters of outcomes, for `/debug/pool`.
#[derive(Debug, Default)]
struct Counters([AtomicU64; Outcome::ALL.len()]);

/// The flow controller: the queues and the dispatcher's decisions. One per EPP.
#[derive(Debug)]
pub struct FlowControl {
    config: FlowConfig,
    state: Mutex<State>,
    wake: Notify,
    /// Wake-ups since the last cycle: a cycle dispatches up to this many (at least one), so
    /// that, as in the reference, every enqueue and release is worth a dispatch attempt.
    wakes: AtomicU64,
    /// Requests let go and not yet routed.
    dispatched: AtomicU64,
    /// Their prompts' estimated tokens.
    dispatched_tokens: AtomicU64,
    observer: OnceLock<Arc<dyn FlowObserver>>,
    counters: Counters,
    /// The least-attained-service policies in use, which hear of completed responses.
    las: Vec<Arc<Las>>,
}

impl FlowControl {
    /// A controller with `config`; the pool is taken as having endpoints until the first
    /// cycle reads it.
    pub fn new(config: FlowConfig) -> Arc<Self> {
        let now = Instant::now();
        let mut bands: Vec<Band> = config
            .bands
            .iter()
            .map(|b| Band::new(b.clone(), true, now))
            .collect();
        bands.sort_by_key(|b| std::cmp::Reverse(b.cfg.priority));
        let mut las: Vec<Arc<Las>> = Vec::new();
        for b in config
            .bands
            .iter()
            .chain([&config.default_band, &config.default_negative_band])
        {
            if let FairnessPolicy::LeastAttainedService(l) = &b.fairness.1
                && !las.iter().any(|x| Arc::ptr_eq(x, l))
            {
                las.push(l.clone());
            }
        }
        Arc::new(Self {
            state: Mutex::new(State {
                bands,
                len: 0,
                bytes: 0,
                pool_empty: false,
                pool_read: false,
                regime_since: now,
                empty_clock: Duration::ZERO,
                next_id: 0,
                last_enqueued: None,
                saturation: 1.0,
                ceilings: Vec::new(),
                priorities: Vec::new(),
                last_housekeeping: now,
                stopped: false,
            }),
            config,
            wake: Notify::new(),
            wakes: AtomicU64::new(0),
            dispatched: AtomicU64::new(0),
            dispatched_tokens: AtomicU64::new(0),
            observer: OnceLock::new(),
            counters: Counters::default(),
            las,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FlowConfig {
        &self.config
    }

    /// Sets the observer (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn FlowObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Requests queued now.
    pub fn queued(&self) -> u64 {
        self.state.lock().len
    }

    /// Requests let go and not yet routed.
    pub fn dispatched_unrouted(&self) -> u64 {
        self.dispatched.load(Ordering::Relaxed)
    }

    /// What was let go and is not yet routed, for the saturation detector.
    pub fn unrouted(&self) -> Unrouted {
        Unrouted {
            requests: self.dispatched.load(Ordering::Relaxed),
            prompt_tokens: self.dispatched_tokens.load(Ordering::Relaxed),
        }
    }

    /// Asks for a dispatch cycle soon (a request finished, the pool changed).
    pub fn wake(&self) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// A response of `fairness_id` ended: the least-attained-service policies count it.
    pub fn record_usage(&self, fairness_id: &str, prompt_tokens: u64, completion_tokens: u64) {
        if prompt_tokens == 0 && completion_tokens == 0 {
            return;
        }
        let now = Instant::now();
        for las in &self.las {
            las.record(fairness_id, prompt_tokens, completion_tokens, now);
        }
    }

    /// A prompt charged from its estimate (`charged` tokens) turned out `actual` tokens long
    /// (the engine's `usage`): the difference is charged, or taken back.
    pub fn correct_prompt(&self, fairness_id: &str, charged: u64, actual: u64) {
        if actual >= charged {
            self.record_usage(fairness_id, actual - charged, 0);
            return;
        }
        let now = Instant::now();
        for las in &self.las {
            las.take_back(fairness_id, charged - actual, now);
        }
    }

    /// The service the least-attained-service policies have charged a flow (the largest, with
    /// several), decayed to now; `None` without such a policy.
    pub fn attained_service(&self, fairness_id: &str) -> Option<f64> {
        let now = Instant::now();
        self.las
            .iter()
            .map(|las| las.attained(fairness_id, now))
            .reduce(f64::max)
    }

    /// Queues `request`, or decides at once that it cannot be (capacity); either way the
    /// answer comes from [`Ticket::wait`].
    pub fn enqueue(self: &Arc<Self>, request: FlowRequest, now: Instant) -> Ticket {
        let key = self
            .observer
            .get()
            .map(|o| o.entered(&request))
            .unwrap_or_default();
        let (tx, rx) = oneshot::channel();
        let mut displaced = Vec::new();
        let queued = {
            let mut st = self.state.lock();
            if st.stopped {
                // After shutdown no dispatcher runs: answer now instead of holding the stream
                // until its TTL (or the end of the drain).
                return Ticket {
                    fc: self.clone(),
                    request,
                    key,
                    entered: now,
                    state: TicketState::Decided(Some(Err(FlowRejection {
                        outcome: Outcome::RejectedOther,
                        pool_empty: st.pool_empty,
                    }))),
                };
            }
            let cfg = &self.config;
            let bi = st.band_index(request.priority, cfg, now);
            let fits_band = |st: &State| {
                let b = &st.bands[bi];
                b.len < b.cfg.max_requests
                    && b.bytes.saturating_add(request.bytes) <= b.cfg.max_bytes
            };
            let fits_global = |st: &State| {
                (cfg.max_requests == 0 || st.len < cfg.max_requests)
                    && (cfg.max_bytes == 0
                        || st.bytes.saturating_add(request.bytes) <= cfg.max_bytes)
            };
            if fits_band(&st) && !fits_global(&st) && cfg.eviction {
                self.make_room(&mut st, &request, &mut displaced);
            }
            // Fair share once eviction (if on) has made what room lower priorities could give:
            // it took the sheddable requests first where they sufficed. Skipped whenever any
            // lower-priority request was queued, as it once was, a flow could keep every other
            // tenant of its band out by queueing one sheddable request beside its own (too
            // small to make the room, or not evictable at all).
            if !fits_band(&st) || !fits_global(&st) {
                self.make_fair_room(&mut st, bi, &request, &mut displaced);
            }
            if fits_band(&st) && fits_global(&st) {
                let id = st.next_id;
                st.next_id += 1;
                // Ids are given here, under the lock; arrival times are read before it, so two
                // racing requests can get them in opposite orders. A time earlier than the last
                // queued one's is raised to it: every queue then holds its requests oldest
                // first in both orders, which the bands' indexes (by key, by id) and the TTL's
                // expiry from the heads rely on.
                let enqueued = st.last_enqueued.map_or(now, |last| last.max(now));
                st.last_enqueued = Some(enqueued);
                let empty_clock_at_enqueue =
                    u64::try_from(st.empty_clock(enqueued).as_nanos()).unwrap_or(u64::MAX);
                let band = &mut st.bands[bi];
                band.active = now;
                band.push(
                    request.fairness_id.clone(),
                    Item {
                        id,
                        enqueued,
                        empty_clock_at_enqueue,
                        deadline: request.slo_ttft.map(|d| enqueued + d),
                        bytes: request.bytes,
                        prompt_tokens: request.prompt_tokens,
                        tx,
                    },
                );
                st.len += 1;
                st.bytes += request.bytes;
                Ok(id)
            } else {
                Err(FlowRejection {
                    outcome: if st.pool_empty {
                        Outcome::RejectedNoEndpoints
                    } else {
                        Outcome::RejectedCapacity
                    },
                    pool_empty: st.pool_empty,
                })
            }
        };
        let pool_empty = self.state.lock().pool_empty;
        for (item, outcome) in displaced {
            let _ = item.tx.send(Err(FlowRejection {
                outcome,
                pool_empty,
            }));
        }
        let state = match queued {
            Ok(id) => {
                self.wake();
                TicketState::Queued { id, rx }
            }
            Err(rejection) => TicketState::Decided(Some(Err(rejection))),
        };
        Ticket {
            fc: self.clone(),
            request,
            key,
            entered: now,
            state,
        }
    }

    /// `enableEviction`: evicts queued sheddable requests below `request`'s priority until it
    /// fits the global caps, or none if that cannot make room.
    fn make_room(&self, st: &mut State, request: &FlowRequest, out: &mut Vec<(Item, Outcome)>) {
        let cfg = &self.config;
        // Room needed, and whether the evictable requests hold enough of it.
        let need_requests = if cfg.max_requests > 0 {
            (st.len + 1).saturating_sub(cfg.max_requests)
        } else {
            0
        };
        let need_bytes = if cfg.max_bytes > 0 {
            (st.bytes + request.bytes).saturating_sub(cfg.max_bytes)
        } else {
            0
        };
        let (mut have_requests, mut have_bytes) = (0, 0);
        for b in st
            .bands
            .iter()
            .filter(|b| b.cfg.priority < request.priority.min(0))
        {
            have_requests += b.len;
            have_bytes += b.bytes;
        }
        if have_requests < need_requests || have_bytes < need_bytes {
            return;
        }
        let (mut freed_requests, mut freed_bytes) = (0, 0);
        while freed_requests < need_requests || freed_bytes < need_bytes {
            let Some(item) = st.displace_one(request.priority) else {
                break;
            };
            freed_requests += 1;
            freed_bytes += item.bytes;
            out.push((item, Outcome::EvictedPriority));
        }
    }

    /// Fair share: a request that does not fit its band (or the global caps) takes the room
    /// from the newest requests of its band's largest flows, as long as each of them holds more
    /// of the band than the request's own flow would ([`Band::plan_fair_room`]); else nothing
    /// is displaced. Only in bands whose fairness policy serves flows in turn.
    fn make_fair_room(
        &self,
        st: &mut State,
        band: usize,
        request: &FlowRequest,
        out: &mut Vec<(Item, Outcome)>,
    ) {
        let cfg = &self.config;
        let b = &st.bands[band];
        let over = |held: u64, adding: u64, cap: u64| {
            if cap == 0 {
                0
            } else {
                held.saturating_add(adding).saturating_sub(cap)
            }
        };
        // With eviction on, the sheddable requests of lower priority give their part of the
        // global caps' room first (they were too few to give all of it, `make_room`): fair
        // share takes only the rest from the band's largest flows.
        let (lower_requests, lower_bytes) = if cfg.eviction {
            st.bands
                .iter()
                .filter(|l| l.cfg.priority < request.priority.min(0))
                .fold((0, 0), |(n, bytes), l| (n + l.len, bytes + l.bytes))
        } else {
            (0, 0)
        };
        let need = (
            over(b.len, 1, b.cfg.max_requests)
                .max(over(st.len, 1, cfg.max_requests).saturating_sub(lower_requests)),
            over(b.bytes, request.bytes, b.cfg.max_bytes)
                .max(over(st.bytes, request.bytes, cfg.max_bytes).saturating_sub(lower_bytes)),
        );
        let Some(plan) = b.plan_fair_room(&request.fairness_id, request.bytes, need) else {
            return;
        };
        let b = &mut st.bands[band];
        let before = out.len();
        for (flow, count) in plan {
            for _ in 0..count {
                let Some(index) = b.flows.get(&flow).and_then(|q| q.len().checked_sub(1)) else {
                    break;
                };
                if let Some(item) = b.take(&flow, index) {
                    out.push((item, Outcome::EvictedFairShare));
                }
            }
        }
        for (item, _) in &out[before..] {
            st.len -= 1;
            st.bytes -= item.bytes;
        }
        // Then the sheddable requests, for what the global caps still need.
        while (cfg.max_requests > 0 && st.len >= cfg.max_requests)
            || (cfg.max_bytes > 0 && st.bytes.saturating_add(request.bytes) > cfg.max_bytes)
        {
            if !cfg.eviction {
                break;
            }
            let Some(item) = st.displace_one(request.priority) else {
                break;
            };
            out.push((item, Outcome::EvictedPriority));
        }
    }

    /// Removes a request whose client went away; `false` if it had already left the queue.
    fn cancel(&self, priority: i32, flow: &Arc<str>, id: u64) -> bool {
        let mut st = self.state.lock();
        let Ok(bi) = st.bands.binary_search_by(|b| priority.cmp(&b.cfg.priority)) else {
            return false;
        };
        let band = &mut st.bands[bi];
        let Some(index) = band
            .flows
            .get(flow)
            .and_then(|q| q.binary_search_by_key(&id, |i| i.id).ok())
        else {
            return false;
        };
        let Some(item) = band.take(flow, index) else {
            return false;
        };
        st.len -= 1;
        st.bytes -= item.bytes;
        true
    }

    /// One dispatch cycle at `now`: reads the pool, expires what waited too long, and lets go
    /// up to one request per wake-up since the last cycle (at least one), re-reading the pool
    /// between them. Returns how many it let go.
    pub fn dispatch_cycle(self: &Arc<Self>, now: Instant, pool: &dyn PoolProbe) -> usize {
        let budget = self.wakes.swap(0, Ordering::Relaxed).max(1);
        let mut sent = 0;
        let mut expired = Vec::new();
        for round in 0..budget {
            let reading = pool.read(self.unrouted());
            let empty = reading.endpoints == 0;
            let mut st = self.state.lock();
            if empty != st.pool_empty {
                if st.pool_read {
                    st.change_regime(empty, now);
                } else {
                    // The first reading sets the regime; the time before it counts to it.
                    st.pool_empty = empty;
                }
            }
            st.pool_read = true;
            if round == 0 {
                let ttl = if empty {
                    self.config.no_endpoint_ttl
                } else {
                    self.config.request_ttl
                };
                st.expire(ttl, now, &mut expired);
                self.housekeeping(&mut st, now);
            }
            st.saturation = reading.saturation;
            let chosen = if empty {
                None
            } else {
                self.choose(&mut st, now)
            };
            drop(st);
            for (item, outcome) in expired.drain(..) {
                let _ = item.tx.send(Err(FlowRejection {
                    outcome,
                    pool_empty: empty,
                }));
            }
            let Some(item) = chosen else { break };
            // The request's own estimate (from its content, or its token ids), not its held
            // bytes: an inline image had counted as 262,144 tokens here and 1,024 once routed.
            let tokens = item.prompt_tokens;
            self.dispatched.fetch_add(1, Ordering::Relaxed);
            self.dispatched_tokens.fetch_add(tokens, Ordering::Relaxed);
            let admitted = Admitted {
                fc: self.clone(),
                waited: now.saturating_duration_since(item.enqueued),
                tokens,
            };
            // A receiver gone since (its client left) drops the `Admitted` with the error.
            let _ = item.tx.send(Ok(admitted));
            sent += 1;
        }
        sent
    }

    /// The cycle's choice: from the highest band down, stop at a band at or over its
    /// ceiling; otherwise the first band with a request gives it up.
    fn choose(&self, st: &mut State, now: Instant) -> Option<Item> {
        let State {
            bands,
            ceilings,
            priorities,
            saturation,
            ..
        } = st;
        priorities.clear();
        priorities.extend(bands.iter().map(|b| b.cfg.priority));
        self.config
            .usage_limit
            .ceilings(*saturation, priorities, ceilings);
        let mut chosen = None;
        for (i, band) in bands.iter_mut().enumerate() {
            // Not under the ceiling (a NaN reading included): the band, and every band
            // below it, waits.
            let ceiling = ceilings.get(i).copied().unwrap_or(1.0);
            if (*saturation).partial_cmp(&ceiling) != Some(std::cmp::Ordering::Less) {
                break;
            }
            let Some((flow, index)) = band.pick(now) else {
                continue;
            };
            chosen = band.take(&flow, index);
            band.last_served = Some(flow);
            band.active = now;
            break;
        }
        let item = chosen?;
        st.len -= 1;
        st.bytes -= item.bytes;
        Some(item)
    }

    /// Once a second: drops bands made on demand that stayed empty for 10 minutes, and lets
    /// the least-attained-service policies forget idle programs.
    fn housekeeping(&self, st: &mut State, now: Instant) {
        if now.saturating_duration_since(st.last_housekeeping) < Duration::from_secs(1) {
            return;
        }
        st.last_housekeeping = now;
        st.bands.retain(|b| {
            b.provisioned
                || b.len > 0
                || now.saturating_duration_since(b.active) < config::DYNAMIC_BAND_IDLE
        });
        for las in &self.las {
            las.sweep(now);
        }
    }

    /// Drops every queued request (shutdown): they are answered `rejected-shutting-down`.
    pub fn shutdown(&self) {
        let mut items = Vec::new();
        {
            let mut st = self.state.lock();
            st.stopped = true;
            for band in &mut st.bands {
                items.extend(band.clear());
            }
            st.len = 0;
            st.bytes = 0;
        }
        for item in items {
            let _ = item.tx.send(Err(FlowRejection {
                outcome: Outcome::EvictedOther,
                pool_empty: false,
            }));
        }
    }

    /// The dispatcher: a cycle after every wake-up, and every [`config::DISPATCH_TICK`] while
    /// anything is queued (saturation moves with scrapes, which wake no one). Queued requests
    /// are dropped (`rejected-shutting-down`) when `token` is cancelled.
    pub async fn run(self: Arc<Self>, pool: Arc<dyn PoolProbe>, token: CancellationToken) {
        self.state.lock().stopped = false;
        loop {
            self.dispatch_cycle(Instant::now(), pool.as_ref());
            let waiting = self.queued() > 0;
            tokio::select! {
                _ = token.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(config::DISPATCH_TICK), if waiting => {}
            }
        }
        self.shutdown();
    }

    /// What is queued, for `/debug/pool` and the gauges.
    pub fn snapshot(&self, now: Instant) -> FlowSnapshot {
        let st = self.state.lock();
        let bands = st
            .bands
            .iter()
            .enumerate()
            .map(|(i, b)| BandSnapshot {
                priority: b.cfg.priority,
                queued: b.len,
                bytes: b.bytes,
                max_requests: b.cfg.max_requests,
                max_bytes: b.cfg.max_bytes,
                ceiling: st.ceilings.get(i).copied(),
                fairness: b.cfg.fairness.0.clone(),
                ordering: b.cfg.ordering.0.clone(),
                flow_count: b.flows.len(),
                flows: b
                    .flows
                    .iter()
                    .take(MAX_DEBUG_FLOWS)
                    .map(|(id, q)| FlowQueueSnapshot {
                        fairness_id: id.clone(),
                        queued: q.len(),
                        bytes: q.iter().map(|i| i.bytes).sum(),
                        oldest_wait: q
                            .front()
                            .map(|i| now.saturating_duration_since(i.enqueued))
                            .unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect();
        FlowSnapshot {
            queued: st.len,
            bytes: st.bytes,
            dispatched_unrouted: self.dispatched.load(Ordering::Relaxed),
            pool_empty: st.pool_empty,
            saturation: st.saturation,
            max_requests: self.config.max_requests,
            max_bytes: self.config.max_bytes,
            bands,
            outcomes: Outcome::ALL
                .iter()
                .map(|&o| (o, self.counters.0[o.index()].load(Ordering::Relaxed)))
                .collect(),
        }
    }

    fn count(&self, outcome: Outcome) {
        self.counters.0[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// What is queued at one moment.
#[derive(Debug, Clone)]
pub struct FlowSnapshot {
    /// Requests queued.
    pub queued: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Requests let go and not yet routed.
    pub dispatched_unrouted: u64,
    /// Whether the pool had no endpoint at the last cycle.
    pub pool_empty: bool,
    /// The saturation at the last cycle.
    pub saturation: f64,
    /// Global request cap (0 = none).
    pub max_requests: u64,
    /// Global byte cap (0 = none).
    pub max_bytes: u64,
    /// Bands, highest first.
    pub bands: Vec<BandSnapshot>,
    /// Requests per outcome since start.
    pub outcomes: Vec<(Outcome, u64)>,
}

/// One band at one moment.
#[derive(Debug, Clone)]
pub struct BandSnapshot {
    /// Priority.
    pub priority: i32,
    /// Requests queued.
    pub queued: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Request cap.
    pub max_requests: u64,
    /// Byte cap.
    pub max_bytes: u64,
    /// Its ceiling at the last cycle.
    pub ceiling: Option<f64>,
    /// Fairness policy plugin name.
    pub fairness: Arc<str>,
    /// Ordering policy plugin name.
    pub ordering: Arc<str>,
    /// Flows with requests queued.
    pub flow_count: usize,
    /// The first [`MAX_DEBUG_FLOWS`] of them, by id.
    pub flows: Vec<FlowQueueSnapshot>,
}

/// One flow's queue at one moment.
#[derive(Debug, Clone)]
pub struct FlowQueueSnapshot {
    /// The fairness id.
    pub fairness_id: Arc<str>,
    /// Requests queued.
    pub queued: usize,
    /// Their body bytes.
    pub bytes: u64,
    /// How long its oldest request has waited.
    pub oldest_wait: Duration,
}

#[derive(Debug)]
enum TicketState {
    Queued {
        id: u64,
        rx: oneshot::Receiver<Decision>,
    },
    Decided(Option<Decision>),
    Done,
}

/// A request's place in flow control. [`Ticket::wait`] gives the decision; dropping the ticket
/// before it (the client went away) takes the request out of its queue at once.
#[derive(Debug)]
pub struct Ticket {
    fc: Arc<FlowControl>,
    request: FlowRequest,
    key: FlowRecordKey,
    entered: Instant,
    state: TicketState,
}

impl Ticket {
    /// Waits for the decision: the request is let go, or refused. Cancel-safe: dropping the
    /// future keeps the ticket's place.
    pub async fn wait(&mut self) -> Result<Admitted, FlowRejection> {
        let decision = match &mut self.state {
            TicketState::Queued { rx, .. } => rx.await.unwrap_or(Err(FlowRejection {
                outcome: Outcome::EvictedOther,
                pool_empty: false,
            })),
            TicketState::Decided(d) => d.take().unwrap_or(Err(FlowRejection {
                outcome: Outcome::RejectedOther,
                pool_empty: false,
            })),
            // Asked again after its answer: the exit was counted the first time.
            TicketState::Done => {
                return Err(FlowRejection {
                    outcome: Outcome::RejectedOther,
                    pool_empty: false,
                });
            }
        };
        self.state = TicketState::Done;
        let outcome = match &decision {
            Ok(_) => Outcome::Dispatched,
            Err(r) => r.outcome,
        };
        self.finish(outcome);
        decision
    }

    /// Whether the request is still waiting in a queue.
    pub fn is_queued(&self) -> bool {
        matches!(self.state, TicketState::Queued { .. })
    }

    /// The request's flow-control view.
    pub fn request(&self) -> &FlowRequest {
        &self.request
    }

    fn finish(&self, outcome: Outcome) {
        self.fc.count(outcome);
        if let Some(o) = self.fc.observer.get() {
            o.left(&self.request, &self.key, outcome, self.entered.elapsed());
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, TicketState::Done) {
            TicketState::Queued { id, mut rx } => {
                let mut outcome = Outcome::EvictedContextCancelled;
                if self
                    .fc
                    .cancel(self.request.priority, &self.request.fairness_id, id)
                {
                    self.fc.wake();
                } else {
                    // Decided in the meantime: an `Admitted` in the channel is released here
                    // (the client left before it was routed); a refusal already sent (TTL,
                    // eviction) is what happened to the request, not the client's leaving.
                    rx.close();
                    if let Ok(Err(refusal)) = rx.try_recv() {
                        outcome = refusal.outcome;
                    }
                }
                self.finish(outcome);
            }
            TicketState::Decided(Some(d)) => {
                self.finish(match &d {
                    Ok(_) => Outcome::Dispatched,
                    Err(r) => r.outcome,
                });
            }
            TicketState::Decided(None) | TicketState::Done => {}
        }
    }
}

/// `agent-identity` parameters: `additionalSessionHeaders`, read before the built-in ones.
pub fn agent_identity_headers(p: &mut Params<'_>) -> Result<Arc<[String]>, ConfigError> {
    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Yaml {
        #[serde(default)]
        additional_session_headers: Vec<String>,
    }
    let y: Yaml = p.decode()?;
    let mut headers: Vec<String> = Vec::new();
    for h in y
        .additional_session_headers
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .chain(AGENT_IDENTITY_HEADERS.iter().map(|h| (*h).to_owned()))
    {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(p.invalid(
                "additionalSessionHeaders",
                format!("not a header name: {h:?}"),
            ));
        }
        if !headers.contains(&h) {
            headers.push(h);
        }
    }
    Ok(headers.into())
}

#[cfg(test)]
mod tests;
