//! The engine model: one scheduler loop per replica doing continuous batching, as vLLM V1 does.
//!
//! Each step the scheduler
//! 1. gives every running sequence its next tokens (a prefill chunk, or one decode token) from a
//!    shared budget of `max_num_batched_tokens`, allocating KV blocks as needed; when blocks run
//!    out it *preempts* the most recently admitted running sequence (its blocks are freed, it goes
//!    back to the head of the waiting queue and will be recomputed, cheaply if its blocks are
//!    still cached);
//! 2. if nothing was preempted, admits waiting sequences first-come-first-served while there is
//!    budget, fewer than `max_num_seqs` are running, a LoRA slot is available for their adapter
//!    (otherwise they are skipped) and KV blocks are available (otherwise everyone waits). On
//!    admission the longest cached prefix (whole blocks, leaving at least one token to compute) is
//!    taken from the prefix cache, so prefill only costs uncached tokens.
//!
//! The step then "runs" for the time given by [`LatencyModel::step_time`](crate::LatencyModel),
//! the loop sleeping on the tokio clock until it ends; at the end every sequence whose known
//! tokens are all computed samples one token. An idle engine waits on a [`Notify`]: no polling.
//!
//! Times are kept on a *logical* clock: a step that follows another starts exactly when the
//! previous one ended, even though tokio wakes timers at millisecond granularity. This keeps the
//! modelled latencies exact (and tests on paused time exact) while real wake-ups lag by < 1 ms.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::config::{Config, StepWork, Tier};
use crate::kv_cache::{BlockId, KvCache, KvEvent, block_hash, block_hashes, chain_root};
use crate::metrics::{EngineStats, MetricsSnapshot, TierStats};
use crate::tiers::{EventSink, LruBlocks, PeerIgnored, TierPool};
use crate::tokenizer;

/// A step that starts within this long after the previous one ended is treated as back-to-back.
const BACK_TO_BACK_SLACK: Duration = Duration::from_millis(2);

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitRequest {
    /// Prompt token ids (already templated).
    pub prompt: Vec<u32>,
    /// Number of tokens to generate.
    pub max_tokens: usize,
    /// LoRA adapter, if any (must be registered).
    pub lora: Option<String>,
    /// Reported finish reason (`length` when the client set `max_tokens`, else `stop`).
    pub finish_reason: FinishReason,
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_tokens`.
    Length,
    /// The model "chose" to stop.
    Stop,
}

impl FinishReason {
    /// The OpenAI string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
        }
    }
}

/// Logical timestamps of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTiming {
    /// When the engine received it.
    pub arrival: Instant,
    /// When it was first scheduled.
    pub scheduled: Instant,
    /// When its first token was produced.
    pub first_token: Instant,
    /// When its last token was produced.
    pub finished: Instant,
}

impl RequestTiming {
    /// Time to first token.
    pub fn ttft(&self) -> Duration {
        self.first_token.saturating_duration_since(self.arrival)
    }

    /// Time spent waiting before first being scheduled.
    pub fn queue_time(&self) -> Duration {
        self.scheduled.saturating_duration_since(self.arrival)
    }
}

/// Summary of a finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
    /// Why it finished.
    pub finish_reason: FinishReason,
    /// Logical timestamps.
    pub timing: RequestTiming,
}

/// What the engine tells a request's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// Newly generated tokens (`stream_granularity` of them, fewer for the first and last).
    Tokens {
        /// Token ids, in order.
        ids: Vec<u32>,
        /// Logical time the last of them was produced.
        at: Instant,
        /// Whether these are the request's last tokens (a `Finished` event follows).
        last: bool,
    },
    /// The request is done; no more events follow.
    Finished(Completion),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Prompt plus completion cannot fit in the whole KV cache.
    #[error(
        "the request needs {needed} KV-cache blocks but the cache only has {available}; reduce the prompt or max_tokens"
    )]
    ExceedsKvCache {
        /// Blocks needed.
        needed: usize,
        /// Blocks in the cache.
        available: usize,
    },
    /// A LoRA adapter was requested but the replica has no LoRA slots.
    #[error("LoRA adapters are disabled on this replica (max-loras = 0)")]
    LoraDisabled,
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// A [`Engine::stepped`] engine's events for its requests, kept instead of sent, so that the
/// caller delivers those of many engines in an order of its choosing (the what-if steps
/// engines in parallel and delivers in (time, replica) order).
#[derive(Debug, Default)]
pub struct Outbox {
    events: Vec<OutboxEvent>,
}

/// One kept event: for one request, made by the step that ended at `at`.
#[derive(Debug)]
pub struct OutboxEvent {
    /// The end of the step that made it.
    pub at: Instant,
    tx: mpsc::UnboundedSender<EngineEvent>,
    event: EngineEvent,
}

impl OutboxEvent {
    /// Sends it to its request; `false` if the request's owner has gone.
    pub fn deliver(self) -> bool {
        self.tx.send(self.event).is_ok()
    }
}

impl Outbox {
    /// Keeps `event` for `tx`; `false` (and nothing kept) if the request's owner has gone,
    /// as a failed send tells the loop.
    fn push(
        &mut self,
        at: Instant,
        tx: &mpsc::UnboundedSender<EngineEvent>,
        event: EngineEvent,
    ) -> bool {
        if tx.is_closed() {
            return false;
        }
        self.events.push(OutboxEvent {
            at,
            tx: tx.clone(),
            event,
        });
        true
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The kept events, in the order they were made.
    pub fn drain(&mut self) -> std::vec::Drain<'_, OutboxEvent> {
        self.events.drain(..)
    }
}

/// The step a [`Engine::stepped`] engine is running ([`Engine::advance_to`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// When it ends.
    pub step_end: Instant,
    /// No step that ends before this instant gives a request its first token or its last
    /// (`step_end` at the earliest), unless a request is submitted meanwhile: a lower bound
    /// from the steps each request still needs and the shortest step the latency model makes.
    /// Until then the owner may leave the steps uncompleted, unless it reads the engine's state.
    pub quiet_until: Instant,
}

/// A prompt's chained block hashes ([`block_hashes`]), computed ahead of
/// [`Engine::submit_hashed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptHashes {
    root: u64,
    block_size: usize,
    hashes: Vec<u64>,
}

impl PromptHashes {
    /// The hashes of `prompt`'s full blocks of `block_size` tokens under `lora` (the engine's
    /// block size and the request's adapter, or they are not used).
    pub fn new(lora: Option<&str>, prompt: &[u32], block_size: usize) -> Self {
        let root = chain_root(lora);
        Self {
            root,
            block_size,
            hashes: block_hashes(root, prompt, block_size.max(1)),
        }
    }
}

/// LoRA registry and GPU slots.
#[derive(Debug, Default)]
struct LoraSlots {
    max: usize,
    /// Registered adapters, in registration order.
    registered: Vec<Arc<str>>,
    /// Adapters occupying a slot, least recently used first.
    resident: Vec<Arc<str>>,
    /// Running sequences per adapter.
    in_use: HashMap<Arc<str>, usize>,
    /// CPU-cache size (`max_cpu_loras`; 0 = unbounded).
    cpu_max: usize,
    /// Adapters in the CPU cache, least recently used first (only kept when bounded).
    cpu: Vec<Arc<str>>,
}

impl LoraSlots {
    fn used(&self, name: &str) -> usize {
        self.in_use.get(name).copied().unwrap_or(0)
    }

    /// `Some(needs_load)` if a sequence for `name` can enter the batch now.
    fn can_admit(&self, name: &str) -> Option<bool> {
        if self.resident.iter().any(|r| &**r == name) {
            Some(false)
        } else if self.resident.len() < self.max || self.resident.iter().any(|r| self.used(r) == 0)
        {
            Some(true)
        } else {
            None
        }
    }

    /// Marks `name` used in the CPU cache; `true` if it was not there (read from disk). With
    /// the cache full, the least recently used adapter not in a GPU slot leaves it.
    fn touch_cpu(&mut self, name: &Arc<str>) -> bool {
        if self.cpu_max == 0 {
            return false;
        }
        let miss = match self.cpu.iter().position(|r| r == name) {
            Some(pos) => {
                let r = self.cpu.remove(pos);
                self.cpu.push(r);
                false
            }
            None => {
                self.cpu.push(name.clone());
                true
            }
        };
        while self.cpu.len() > self.cpu_max {
            let Some(pos) = self
                .cpu
                .iter()
                .position(|c| c != name && !self.resident.contains(c))
            else {
                break;
            };
            self.cpu.remove(pos);
        }
        miss
    }

    /// Takes a slot for `name`; `true` if the adapter had to be read from disk first.
    fn acquire(&mut self, name: &Arc<str>) -> bool {
        let mut disk = false;
        if let Some(pos) = self.resident.iter().position(|r| r == name) {
            let r = self.resident.remove(pos);
            self.resident.push(r);
            self.touch_cpu(name);
        } else {
            disk = self.touch_cpu(name);
            if self.resident.len() >= self.max
                && let Some(pos) = self.resident.iter().position(|r| self.used(r) == 0)
            {
                self.resident.remove(pos);
            }
            self.resident.push(name.clone());
        }
        *self.in_use.entry(name.clone()).or_insert(0) += 1;
        disk
    }

    fn release(&mut self, name: &str) {
        if let Some(n) = self.in_use.get_mut(name) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One request inside the engine.
#[derive(Debug)]
struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    finish_reason: FinishReason,
    lora: Option<Arc<str>>,
    root: u64,
    /// Chained hashes of every full block of `tokens`.
    hashes: Vec<u64>,
    /// How many of this sequence's blocks are registered in the prefix cache.
    registered: usize,
    num_computed: usize,
    blocks: Vec<BlockId>,
    /// Tokens scheduled in the current step.
    scheduled: usize,
    arrival: Instant,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    cached_tokens: usize,
    pending: Vec<u32>,
    seed: u64,
    tx: mpsc::UnboundedSender<EngineEvent>,
    /// Leading prompt blocks the peer named by the request held (GPU or CPU) when it arrived:
    /// what a peer pull can bring (see `crate::tiers`).
    peer_blocks: usize,
}

impl Seq {
    fn output_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn extend_hashes(&mut self, block_size: usize) {
        while self.hashes.len() < self.tokens.len() / block_size {
            let b = self.hashes.len();
            let parent = if b == 0 {
                self.root
            } else {
                self.hashes[b - 1]
            };
            self.hashes.push(block_hash(
                parent,
                &self.tokens[b * block_size..(b + 1) * block_size],
            ));
        }
    }
}

/// The mutable state of one engine, behind the engine's lock.
#[derive(Debug)]
struct EngineState {
    config: Arc<Config>,
    kv: KvCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    lora: LoraSlots,
    stats: EngineStats,
    rng: SmallRng,
    seed: u64,
    next_id: u64,
    /// The channel is made by the first subscriber: tokio's broadcast channel allocates its
    /// whole ring (65,536 events, ~6 MiB) up front, which a replica nobody listens to should
    /// not pay (the what-if replays hundreds of engines in one process). Shared with the
    /// process's shared store, which announces evictions in the writer's name.
    sink: Arc<EventSink>,
    /// The replica's CPU tier (`--cpu-kv-blocks`), `None` without one.
    cpu: Option<LruBlocks<()>>,
    /// What the process shares: the shared store and the peer registry.
    pool: Arc<TierPool>,
    /// Whether a request whose receiver was dropped is aborted at the next step (`false` for
    /// a [`Engine::stepped`] engine, whose owner keeps every receiver until `Finished`).
    aborts_dropped: bool,
}

/// A block written through to the lower tiers: its hash, its parent's, its adapter.
pub(crate) type WrittenBlock = (u64, Option<u64>, Option<Arc<str>>);

/// Events buffered for slow KV-event subscribers before they start missing some (they then see
/// `Lagged`, as a ZMQ subscriber would drop messages).
const KV_EVENT_BUFFER: usize = 65_536;

impl EngineState {
    fn new(config: Arc<Config>, index: usize, pool: Arc<TierPool>) -> Self {
        let seed = config.seed.wrapping_add(index as u64);
        let mut lora = LoraSlots {
            max: config.max_loras,
            cpu_max: config.max_cpu_loras,
            ..LoraSlots::default()
        };
        for name in &config.lora_modules {
            let name: Arc<str> = Arc::from(name.as_str());
            if !lora.registered.contains(&name) {
                lora.registered.push(name.clone());
                // Preloaded adapters start resident in a slot, as if already used.
                if lora.resident.len() < lora.max {
                    lora.resident.push(name.clone());
                }
                // Registered at start-up is read at start-up (vLLM loads `--lora-modules`).
                lora.touch_cpu(&name);
            }
        }
        let mut stats = EngineStats::default();
        if config.kv_tiers.connector() {
            stats.tiers = Some(TierStats::default());
        }
        Self {
            kv: KvCache::new(config.num_gpu_blocks, config.block_size),
            waiting: VecDeque::new(),
            running: Vec::new(),
            lora,
            stats,
            rng: SmallRng::seed_from_u64(seed),
            seed,
            next_id: 0,
            sink: Arc::new(EventSink::default()),
            cpu: (config.kv_tiers.cpu_blocks > 0)
                .then(|| LruBlocks::new(config.kv_tiers.cpu_blocks)),
            pool,
            aborts_dropped: true,
            config,
        }
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    fn release_seq(&mut self, seq: &mut Seq) {
        self.kv.release(&seq.blocks);
        seq.blocks.clear();
        seq.registered = 0;
        if let Some(l) = &seq.lora {
            self.lora.release(l);
        }
    }

    /// Drops requests whose owner went away (client disconnected), like vLLM's abort.
    fn drop_cancelled(&mut self) {
        self.waiting.retain(|s| !s.tx.is_closed());
        if self.running.iter().any(|s| s.tx.is_closed()) {
            let running = std::mem::take(&mut self.running);
            for mut seq in running {
                if seq.tx.is_closed() {
                    self.release_seq(&mut seq);
                } else {
                    self.running.push(seq);
                }
            }
        }
    }

    fn preempt(&mut self, idx: usize) {
        let mut seq = self.running.remove(idx);
        self.release_seq(&mut seq);
        seq.num_computed = 0;
        seq.scheduled = 0;
        self.stats.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Plans one step starting at `now`; returns its duration, or `None` when there is nothing
    /// to run.
    fn schedule(&mut self, now: Instant) -> Option<Duration> {
        if self.aborts_dropped {
            self.drop_cancelled();
        }
        let block_size = self.config.block_size;
        let mut budget = self.config.max_num_batched_tokens;
        let mut work = StepWork::default();
        let mut preempted = false;

        // 1. Running sequences first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (num_new, need) = {
                let seq = &self.running[i];
                let num_new = (seq.tokens.len() - seq.num_computed).min(budget);
                let need = self
                    .blocks_for(seq.num_computed + num_new)
                    .saturating_sub(seq.blocks.len());
                (num_new, need)
            };
            if num_new == 0 {
                i += 1;
                continue;
            }
            let mut self_preempted = false;
            while self.kv.num_free() < need {
                let last = self.running.len() - 1;
                preempted = true;
                self.preempt(last);
                if last == i {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            let new_blocks = self.kv.allocate(need).unwrap_or_default();
            let seq = &mut self.running[i];
            seq.blocks.extend(new_blocks);
            seq.scheduled = num_new;
            if num_new == 1 && seq.output_len() > 0 {
                work.add_decode(seq.num_computed + 1);
            } else {
                work.add_prefill(seq.num_computed, num_new);
            }
            budget -= num_new;
            i += 1;
        }

        // 2. Admit waiting sequences — not in a step that had to preempt, unless that left the
        //    batch empty (then waiting is the only work; never idle with requests queued).
        if !preempted || work.seqs == 0 {
            let mut skipped = Vec::new();
            while budget > 0 && self.running.len() < self.config.max_num_seqs {
                let Some(mut seq) = self.waiting.pop_front() else {
                    break;
                };
                let needs_load = match &seq.lora {
                    None => false,
                    Some(l) => match self.lora.can_admit(l) {
                        Some(load) => load,
                        None => {
                            // No slot for this adapter now; later requests may still run.
                            skipped.push(seq);
                            continue;
                        }
                    },
                };
                seq.extend_hashes(block_size);
                let max_hit_blocks = ((seq.tokens.len() - 1) / block_size).min(seq.hashes.len());
                let hit = self.kv.longest_hit(&seq.hashes[..max_hit_blocks]);
                // Below the GPU: the continuation, block by block, from the fastest tier that
                // holds it (all zero without tiers).
                // The connector's lookup touches the request's blocks whether or not it is
                // admitted now (a head of the queue that waits for KV blocks keeps its prefix
                // fresh in the CPU tier, as in vLLM).
                self.touch_cpu_tier(&seq);
                let loads = self.tier_continuation(&seq, hit, max_hit_blocks);
                let loaded: usize = loads.iter().sum();
                let computed = (hit + loaded) * block_size;
                let num_new = (seq.tokens.len() - computed).min(budget);
                let need = self.blocks_for(computed + num_new) - hit;
                if !self.kv.can_allocate(need, &seq.hashes[..hit]) {
                    // Out of KV blocks: the head of the queue waits, and everyone behind it.
                    self.waiting.push_front(seq);
                    break;
                }
                let mut blocks = self.kv.take_hits(&seq.hashes[..hit]);
                blocks.extend(self.kv.allocate(need).unwrap_or_default());
                if let Some(l) = &seq.lora
                    && self.lora.acquire(l)
                {
                    work.lora_disk_loads += 1;
                }
                if needs_load {
                    work.lora_loads += 1;
                }
                seq.blocks = blocks;
                seq.registered = hit;
                seq.num_computed = computed;
                seq.scheduled = num_new;
                self.stats.prefix_queries += seq.tokens.len() as u64;
                self.stats.prefix_hits += (hit * block_size) as u64;
                if loaded > 0 {
                    self.take_loads(&seq, hit, &loads);
                    work.kv_load += self.charge_loads(&loads);
                }
                if let Some(t) = &mut self.stats.tiers {
                    t.external_queries += seq.tokens.len() as u64;
                    t.hit_tokens[Tier::Gpu.index()] += (hit * block_size) as u64;
                }
                if seq.scheduled_at.is_none() {
                    seq.scheduled_at = Some(now);
                    seq.cached_tokens = computed;
                }
                work.add_prefill(computed, num_new);
                budget -= num_new;
                self.running.push(seq);
            }
            for seq in skipped.into_iter().rev() {
                self.waiting.push_front(seq);
            }
        }

        self.publish_removed();
        if work.seqs == 0 {
            return None;
        }
        let latency = &self.config.latency;
        let mut step = latency.step_time(&work);
        if latency.jitter > 0.0 {
            let factor = 1.0 + latency.jitter * self.rng.random_range(-1.0..=1.0);
            step = step.mul_f64(factor);
        }
        Some(step)
    }

    /// [`StepPlan::quiet_until`] for the step planned to end at `end`: counts the steps after
    /// it before a request can see its first or last token (a sequence in this step sees
    /// one token at its end; one not in it, or still prefilling, or waiting, needs at least
    /// one more step; preemption only delays), times the shortest possible step.
    fn quiet_until(&self, end: Instant) -> Instant {
        let mut steps = if self.waiting.is_empty() {
            usize::MAX
        } else {
            1
        };
        for seq in &self.running {
            let output = seq.output_len();
            let after = if seq.scheduled == 0 || seq.num_computed + seq.scheduled < seq.tokens.len()
            {
                1
            } else if output == 0 {
                0
            } else {
                seq.max_tokens.saturating_sub(output + 1)
            };
            steps = steps.min(after);
            if steps == 0 {
                return end;
            }
        }
        // No step is shorter than its overhead, less the jitter (a microsecond off for the
        // rounding of the jitter's product); capped at a day, far beyond any request.
        let latency = &self.config.latency;
        let shortest = latency
            .step_overhead
            .mul_f64(1.0 - latency.jitter)
            .saturating_sub(Duration::from_micros(1));
        let steps = u32::try_from(steps).unwrap_or(u32::MAX).min(1_000_000);
        let quiet = shortest
            .saturating_mul(steps)
            .min(Duration::from_secs(86_400));
        end + quiet
    }

    fn publish_removed(&mut self) {
        let removed = self.kv.take_removed();
        if let Some(tx) = self.sink.get() {
            for hash in removed {
                let _ = tx.send(KvEvent::BlockRemoved { hash });
            }
        }
    }

    /// How many blocks after the `hit` GPU blocks (up to `max` in all) each lower tier can
    /// give, in [`Tier`] order: block by block, the CPU tier if it holds the block, else the
    /// shared store, else the peer (which held the first `peer_blocks` when the request
    /// arrived); the first block none of them holds ends the run.
    fn tier_continuation(&self, seq: &Seq, hit: usize, max: usize) -> [usize; 4] {
        let mut loads = [0usize; 4];
        let shared = self.pool.shared().map(|s| s.lock());
        let peer_ok = self.config.kv_tiers.p2p_load_gbps > 0.0;
        for (b, &h) in seq.hashes[..max].iter().enumerate().skip(hit) {
            let tier = if self.cpu.as_ref().is_some_and(|c| c.contains(h)) {
                Tier::Cpu
            } else if shared.as_ref().is_some_and(|s| s.contains(h)) {
                Tier::Remote
            } else if peer_ok && b < seq.peer_blocks {
                Tier::Peer
            } else {
                break;
            };
            loads[tier.index()] += 1;
        }
        loads
    }

    /// Marks every full block of a sequence looked up for admission that the CPU tier holds as
    /// used, the first block last (the most recent), as vLLM's offloading connector does when it
    /// looks a request up (`touch` of all the request's block hashes before `lookup`): a prefix
    /// served from the GPU stays fresh in the CPU tier, instead of ageing out there while it is
    /// hot and being gone when the GPU evicts it. The first block is kept longest, so the tier
    /// keeps whole prefixes rather than their tails.
    fn touch_cpu_tier(&mut self, seq: &Seq) {
        if let Some(cpu) = &mut self.cpu {
            for &h in seq.hashes.iter().rev() {
                cpu.touch(h);
            }
        }
    }

    /// Marks the blocks a sequence loads from the shared store as used there (LRU; the CPU
    /// tier's were touched at admission).
    fn take_loads(&mut self, seq: &Seq, hit: usize, loads: &[usize; 4]) {
        let total: usize = loads.iter().sum();
        let run = &seq.hashes[hit..hit + total];
        if loads[Tier::Remote.index()] > 0
            && let Some(shared) = self.pool.shared()
        {
            let mut shared = shared.lock();
            for &h in run {
                shared.touch(h);
            }
        }
    }

    /// The transfer time of `loads` (blocks per tier), serialised on the replica's link, and
    /// the tier counters.
    fn charge_loads(&mut self, loads: &[usize; 4]) -> Duration {
        let tiers = &self.config.kv_tiers;
        let mut total = Duration::ZERO;
        for tier in Tier::ALL {
            let tokens = loads[tier.index()] * self.config.block_size;
            if tokens == 0 {
                continue;
            }
            let t = tiers.load_time(tier, tokens);
            total += t;
            if let Some(s) = &mut self.stats.tiers {
                s.hit_tokens[tier.index()] += tokens as u64;
                s.load_seconds[tier.index()] += t.as_secs_f64();
            }
        }
        total
    }

    /// Writes blocks that just entered the GPU cache through to the CPU tier and the shared
    /// store (asynchronous in the real systems: not charged), announcing what enters and
    /// leaves them: per tier the stored runs first, then the evictions.
    fn write_through(&mut self, blocks: &[WrittenBlock]) {
        if blocks.is_empty() {
            return;
        }
        if let Some(cpu) = &mut self.cpu {
            let announce = self.sink.active();
            let mut evicted = Vec::new();
            for (hash, parent, lora) in blocks {
                if cpu.insert(*hash, (), &mut evicted) && announce {
                    self.sink.send(KvEvent::OffloadStored {
                        medium: kv_events::Medium::Cpu,
                        hash: *hash,
                        parent: *parent,
                        lora: lora.as_deref().map(str::to_owned),
                    });
                }
            }
            if announce {
                for (hash, ()) in evicted {
                    self.sink.send(KvEvent::OffloadRemoved {
                        medium: kv_events::Medium::Cpu,
                        hash,
                    });
                }
            }
        }
        if let Some(shared) = self.pool.shared() {
            shared.lock().write(&self.sink, blocks);
        }
    }

    /// Leading blocks of `hashes` this replica holds in its GPU cache or CPU tier: what a peer
    /// pull from it can bring.
    fn held_prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|&&h| {
                self.kv.is_cached(h) || self.cpu.as_ref().is_some_and(|c| c.contains(h))
            })
            .count()
    }

    /// Completes the step that ends at `end`: advances sequences, samples tokens, finishes
    /// requests.
    fn commit(&mut self, end: Instant) {
        self.commit_into(end, None);
    }

    /// [`EngineState::commit`], with the requests' events kept in `outbox` (when given)
    /// instead of sent.
    fn commit_into(&mut self, end: Instant, mut outbox: Option<&mut Outbox>) {
        let recording = self.sink.active();
        self.kv.set_recording(recording);
        let tiered = self.cpu.is_some() || self.pool.shared().is_some();
        let block_size = self.config.block_size;
        let granularity = self.config.stream_granularity;
        let mut done = Vec::new();
        let mut written: Vec<WrittenBlock> = Vec::new();
        for (idx, seq) in self.running.iter_mut().enumerate() {
            if seq.scheduled == 0 {
                continue;
            }
            seq.num_computed += seq.scheduled;
            seq.scheduled = 0;
            // Blocks that just became full join the prefix cache (and blocks loaded from a
            // lower tier at admission, which count as computed).
            let full = seq.num_computed / block_size;
            seq.extend_hashes(block_size);
            while seq.registered < full {
                let b = seq.registered;
                let new = self.kv.commit_full(seq.blocks[b], seq.hashes[b]);
                let parent = b.checked_sub(1).map(|p| seq.hashes[p]);
                if new
                    && recording
                    && let Some(tx) = self.sink.get()
                {
                    let _ = tx.send(KvEvent::BlockStored {
                        hash: seq.hashes[b],
                        parent,
                        token_ids: seq.tokens[b * block_size..(b + 1) * block_size].to_vec(),
                        lora: seq.lora.as_deref().map(str::to_owned),
                    });
                }
                if tiered {
                    written.push((seq.hashes[b], parent, seq.lora.clone()));
                }
                seq.registered += 1;
            }
            if seq.num_computed < seq.tokens.len() {
                continue; // a prefill chunk that did not reach the end of the prompt
            }
            let index = seq.output_len();
            if index == 0 {
                seq.first_token_at = Some(end);
                self.stats.prompt_tokens += seq.prompt_len as u64;
                self.stats
                    .ttft
                    .observe(end.saturating_duration_since(seq.arrival).as_secs_f64());
            } else if let Some(last) = seq.last_token_at {
                self.stats
                    .itl
                    .observe(end.saturating_duration_since(last).as_secs_f64());
            }
            seq.last_token_at = Some(end);
            let id = tokenizer::sample(seq.seed, index);
            seq.tokens.push(id);
            seq.pending.push(id);
            self.stats.generation_tokens += 1;
            let finished = seq.output_len() >= seq.max_tokens;
            if finished || index == 0 || seq.pending.len() >= granularity {
                let ids = std::mem::take(&mut seq.pending);
                let event = EngineEvent::Tokens {
                    ids,
                    at: end,
                    last: finished,
                };
                let sent = match outbox.as_deref_mut() {
                    None => seq.tx.send(event).is_ok(),
                    Some(outbox) => outbox.push(end, &seq.tx, event),
                };
                if !sent {
                    done.push((idx, false));
                    continue;
                }
            }
            if finished {
                done.push((idx, true));
            }
        }
        self.write_through(&written);
        for &(idx, success) in done.iter().rev() {
            let mut seq = self.running.remove(idx);
            self.release_seq(&mut seq);
            if !success {
                continue;
            }
            self.stats
                .e2e
                .observe(end.saturating_duration_since(seq.arrival).as_secs_f64());
            // vLLM records queue time with the finished request's stats, like e2e.
            let scheduled = seq.scheduled_at.unwrap_or(seq.arrival);
            self.stats.queue.observe(
                scheduled
                    .saturating_duration_since(seq.arrival)
                    .as_secs_f64(),
            );
            match seq.finish_reason {
                FinishReason::Length => self.stats.success_length += 1,
                FinishReason::Stop => self.stats.success_stop += 1,
            }
            let timing = RequestTiming {
                arrival: seq.arrival,
                scheduled: seq.scheduled_at.unwrap_or(seq.arrival),
                first_token: seq.first_token_at.unwrap_or(end),
                finished: end,
            };
            let event = EngineEvent::Finished(Completion {
                prompt_tokens: seq.prompt_len,
                completion_tokens: seq.output_len(),
                cached_tokens: seq.cached_tokens,
                finish_reason: seq.finish_reason,
                timing,
            });
            match outbox.as_deref_mut() {
                None => {
                    let _ = seq.tx.send(event);
                }
                Some(outbox) => {
                    outbox.push(end, &seq.tx, event);
                }
            }
        }
    }

    fn snapshot(&self) -> MetricsSnapshot {
        let adapters = |seqs: &mut dyn Iterator<Item = &Seq>| {
            let mut v: Vec<String> = seqs
                .filter_map(|s| s.lora.as_ref().map(|l| l.to_string()))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        MetricsSnapshot {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: self.kv.usage(),
            kv_used_blocks: self.kv.num_used(),
            block_size: self.config.block_size,
            num_gpu_blocks: self.kv.num_blocks(),
            max_loras: self.lora.max,
            running_loras: adapters(&mut self.running.iter()),
            waiting_loras: adapters(&mut self.waiting.iter()),
            stats: self.stats.clone(),
        }
    }
}

/// Why a LoRA load/unload failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoraError {
    /// Loading an adapter that is already registered.
    #[error("The lora adapter '{0}' has already been loaded.")]
    AlreadyLoaded(String),
    /// Unloading an adapter that is not registered.
    #[error("The lora adapter '{0}' cannot be found.")]
    NotFound(String),
    /// The adapter name is the base model's or empty.
    #[error("Invalid LoRA adapter name '{0}'.")]
    InvalidName(String),
}

#[derive(Debug)]
struct EngineShared {
    state: Mutex<EngineState>,
    wake: Notify,
    paused: watch::Sender<bool>,
}

/// A running engine (one replica's scheduler loop). Cloning gives another handle to the same
/// engine; the loop stops when [`Engine::stop`] is called or the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Engine {
    shared: Arc<EngineShared>,
    /// The scheduler loop; `None` for an engine its owner steps ([`Engine::stepped`]).
    task: Option<Arc<AbortOnDrop>>,
}

/// A handle on an engine that does not keep it running ([`Engine::downgrade`]).
#[derive(Debug, Clone)]
pub struct WeakEngine {
    shared: std::sync::Weak<EngineShared>,
    task: Option<std::sync::Weak<AbortOnDrop>>,
}

impl WeakEngine {
    /// The engine, while some [`Engine`] handle keeps it running.
    pub fn upgrade(&self) -> Option<Engine> {
        let task = match &self.task {
            Some(task) => Some(task.upgrade()?),
            None => None,
        };
        Some(Engine {
            shared: self.shared.upgrade()?,
            task,
        })
    }

    /// Whether the engine still runs.
    pub fn is_alive(&self) -> bool {
        match &self.task {
            Some(task) => task.strong_count() > 0,
            // A stepped engine runs while its owner holds it.
            None => self.shared.strong_count() > 0,
        }
    }
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Engine {
    /// Starts the scheduler loop of replica `index` on the current tokio runtime, with a
    /// shared store of its own (shared with nobody) and no peers.
    pub fn spawn(config: Arc<Config>, index: usize) -> Result<Self, crate::SimError> {
        let pool = TierPool::for_config(&config);
        Self::spawn_in(config, index, pool)
    }

    /// Like [`Engine::spawn`], sharing `pool`'s store with the other replicas of the pool.
    /// Register the engine in the pool ([`TierPool::register`]) to make it a peer.
    pub fn spawn_in(
        config: Arc<Config>,
        index: usize,
        pool: Arc<TierPool>,
    ) -> Result<Self, crate::SimError> {
        config.validate()?;
        let (paused, _) = watch::channel(false);
        let shared = Arc::new(EngineShared {
            state: Mutex::new(EngineState::new(config, index, pool)),
            wake: Notify::new(),
            paused,
        });
        let task = tokio::spawn(run(shared.clone()));
        Ok(Self {
            shared,
            task: Some(Arc::new(AbortOnDrop(task))),
        })
    }

    /// Replica `index` without a scheduler loop: its owner runs the loop's steps with
    /// [`Engine::advance_to`], which is how one driver steps hundreds of engines (the what-if)
    /// without a task and a timer per engine. Two things differ from [`Engine::spawn`]:
    /// pausing has no effect, and dropping a request's receiver does not abort the request
    /// (the owner keeps every receiver until `Finished`; checking every request at every
    /// step is a cache miss per request that hundreds of engines in one process notice).
    pub fn stepped(config: Arc<Config>, index: usize) -> Result<Self, crate::SimError> {
        config.validate()?;
        let (paused, _) = watch::channel(false);
        let pool = TierPool::for_config(&config);
        let mut state = EngineState::new(config, index, pool);
        state.aborts_dropped = false;
        let shared = Arc::new(EngineShared {
            state: Mutex::new(state),
            wake: Notify::new(),
            paused,
        });
        Ok(Self { shared, task: None })
    }

    /// What [`Engine::spawn`]'s loop does up to `now`, for a [`Engine::stepped`] engine:
    /// completes the step in progress if it ends by `now` (`step_end`; `None` for an idle
    /// engine, which plans a step starting `now` if it was given a request), then every step
    /// that follows it back to back and ends by `now` too. Returns the step now in progress
    /// (`None`: the engine is idle; call again, with `None`, after the next
    /// [`Engine::submit`]). The requests' events go to `outbox`, in order, for the caller to
    /// deliver; the KV-cache events are sent at once, as by the loop.
    ///
    /// The owner may call it late: with no request submitted in between, completing at `now`
    /// the steps that ended before gives the state, events and timings that completing each
    /// at its end would have (a step's plan reads nothing but the engine; its start is the
    /// previous step's end, which the loop keeps too, its wake-ups lagging by < 1 ms). What it
    /// cannot do late is deliver an event in time: [`StepPlan::quiet_until`] says until when
    /// that is safe.
    pub fn advance_to(
        &self,
        step_end: Option<Instant>,
        now: Instant,
        outbox: &mut Outbox,
    ) -> Option<StepPlan> {
        let mut st = self.shared.state.lock();
        let mut end = match step_end {
            Some(end) => end,
            None => now + st.schedule(now)?,
        };
        while end <= now {
            st.commit_into(end, Some(outbox));
            end += st.schedule(end)?;
        }
        Some(StepPlan {
            step_end: end,
            quiet_until: st.quiet_until(end),
        })
    }

    /// Stops the scheduler loop; in-flight requests never complete.
    pub fn stop(&self) {
        if let Some(task) = &self.task {
            task.0.abort();
        }
    }

    /// A handle that does not keep the engine running (the peer registry holds these).
    pub fn downgrade(&self) -> WeakEngine {
        WeakEngine {
            shared: Arc::downgrade(&self.shared),
            task: self.task.as_ref().map(Arc::downgrade),
        }
    }

    /// Queues a request; its events arrive on the returned channel. Dropping the receiver aborts
    /// the request (its KV blocks are freed at the next step).
    pub fn submit(
        &self,
        req: SubmitRequest,
    ) -> Result<mpsc::UnboundedReceiver<EngineEvent>, SubmitError> {
        self.submit_with_peer(req, None)
    }

    /// Like [`Engine::submit`], for a request that names a peer to pull KV blocks from (the
    /// parsed `x-kv-cache-source-host-port`, or why it could not be parsed). The peer is looked
    /// up among the replicas of this engine's [`TierPool`] and read once, now: how many leading
    /// blocks of the prompt it holds in its GPU cache or CPU tier. A peer that is unknown, this
    /// replica itself, or any peer while `p2p_load_gbps` is 0, is ignored and counted.
    pub fn submit_with_peer(
        &self,
        req: SubmitRequest,
        peer: Option<Result<std::net::SocketAddr, PeerIgnored>>,
    ) -> Result<mpsc::UnboundedReceiver<EngineEvent>, SubmitError> {
        self.submit_inner(req, peer, None)
    }

    /// Like [`Engine::submit`], with the prompt's block hashes computed ahead (the what-if
    /// computes them on another thread than the one stepping the engines). Hashes made for
    /// another adapter or block size than the request's and the engine's are not used.
    pub fn submit_hashed(
        &self,
        req: SubmitRequest,
        hashes: PromptHashes,
    ) -> Result<mpsc::UnboundedReceiver<EngineEvent>, SubmitError> {
        self.submit_inner(req, None, Some(hashes))
    }

    fn submit_inner(
        &self,
        req: SubmitRequest,
        peer: Option<Result<std::net::SocketAddr, PeerIgnored>>,
        hashes: Option<PromptHashes>,
    ) -> Result<mpsc::UnboundedReceiver<EngineEvent>, SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let (peer_blocks, ignored) = match peer {
            None => (0, None),
            Some(peer) => match self.peer_snapshot(&req, peer) {
                Ok(n) => (n, None),
                Err(why) => (0, Some(why)),
            },
        };
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.shared.state.lock();
            if let Some(why) = ignored
                && let Some(t) = &mut st.stats.tiers
            {
                t.peer_ignored[why.index()] += 1;
            }
            let needed = st.blocks_for(req.prompt.len() + req.max_tokens.max(1));
            if needed > st.kv.num_blocks() {
                return Err(SubmitError::ExceedsKvCache {
                    needed,
                    available: st.kv.num_blocks(),
                });
            }
            if req.lora.is_some() && st.lora.max == 0 {
                return Err(SubmitError::LoraDisabled);
            }
            let lora: Option<Arc<str>> = req.lora.map(|l| {
                st.lora
                    .registered
                    .iter()
                    .find(|r| ***r == *l)
                    .cloned()
                    .unwrap_or_else(|| Arc::from(l))
            });
            let id = st.next_id;
            st.next_id += 1;
            let seed = st.seed.rotate_left(32) ^ id;
            let root = chain_root(lora.as_deref());
            let hashes = hashes
                .filter(|h| {
                    h.root == root
                        && h.block_size == st.config.block_size
                        && h.hashes.len() == req.prompt.len() / h.block_size
                })
                .map(|h| h.hashes)
                .unwrap_or_default();
            let seq = Seq {
                prompt_len: req.prompt.len(),
                max_tokens: req.max_tokens.max(1),
                finish_reason: req.finish_reason,
                root,
                lora,
                hashes,
                registered: 0,
                num_computed: 0,
                blocks: Vec::new(),
                scheduled: 0,
                arrival: Instant::now(),
                scheduled_at: None,
                first_token_at: None,
                last_token_at: None,
                cached_tokens: 0,
                pending: Vec::new(),
                seed,
                tx,
                tokens: req.prompt,
                peer_blocks,
            };
            st.waiting.push_back(seq);
        }
        self.shared.wake.notify_one();
        Ok(rx)
    }

    /// Resolves and reads the peer a request names: the leading blocks of its prompt the peer
    /// holds. Locks only the peer's state (this engine's lock is not held here), once.
    fn peer_snapshot(
        &self,
        req: &SubmitRequest,
        peer: Result<std::net::SocketAddr, PeerIgnored>,
    ) -> Result<usize, PeerIgnored> {
        let (pool, block_size, enabled) = {
            let st = self.shared.state.lock();
            (
                st.pool.clone(),
                st.config.block_size,
                st.config.kv_tiers.p2p_load_gbps > 0.0,
            )
        };
        let addr = peer?;
        if !enabled {
            return Err(PeerIgnored::Disabled);
        }
        let engine = pool.lookup(addr).ok_or(PeerIgnored::Unknown)?;
        if Arc::ptr_eq(&engine.shared, &self.shared) {
            return Err(PeerIgnored::Own);
        }
        let hashes = block_hashes(chain_root(req.lora.as_deref()), &req.prompt, block_size);
        let held = engine.shared.state.lock().held_prefix(&hashes);
        Ok(held)
    }

    /// The state `/metrics` reports, copied at this instant.
    pub fn snapshot(&self) -> MetricsSnapshot {
        self.shared.state.lock().snapshot()
    }

    /// Blocks held by the replica's CPU tier (0 without one).
    pub fn cpu_tier_len(&self) -> usize {
        self.shared
            .state
            .lock()
            .cpu
            .as_ref()
            .map_or(0, LruBlocks::len)
    }

    /// Blocks held by the store this replica shares with its pool (0 without one).
    pub fn shared_store_len(&self) -> usize {
        let pool = self.shared.state.lock().pool.clone();
        pool.shared_len()
    }

    /// Adapters currently occupying a GPU slot, least recently used first.
    pub fn resident_loras(&self) -> Vec<String> {
        self.shared
            .state
            .lock()
            .lora
            .resident
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// Registered adapters, in registration order.
    pub fn loras(&self) -> Vec<String> {
        self.shared
            .state
            .lock()
            .lora
            .registered
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// Subscribes to the prefix cache's changes ([`KvEvent`]), like a consumer of vLLM's
    /// KV-cache events. Recording starts with the first subscriber and costs nothing without one.
    pub fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEvent> {
        let mut st = self.shared.state.lock();
        st.kv.set_recording(true);
        st.sink.sender(KV_EVENT_BUFFER).subscribe()
    }

    /// Drops the whole prefix cache, like vLLM's `POST /reset_prefix_cache`, and publishes
    /// `AllBlocksCleared`. Refused (`false`) while a request holds blocks, as vLLM refuses it.
    pub fn reset_prefix_cache(&self) -> bool {
        let mut st = self.shared.state.lock();
        // Evictions recorded before the reset go out first, in order.
        st.publish_removed();
        if !st.kv.reset_prefix_cache() {
            return false;
        }
        // `AllBlocksCleared` clears every tier of the replica for a consumer: the CPU tier goes
        // too. (The shared store is not the replica's to clear.)
        if let Some(cpu) = &mut st.cpu {
            cpu.clear();
        }
        st.sink.send(KvEvent::AllBlocksCleared);
        true
    }

    /// Whether `name` is a registered adapter.
    pub fn has_lora(&self, name: &str) -> bool {
        self.shared
            .state
            .lock()
            .lora
            .registered
            .iter()
            .any(|l| &**l == name)
    }

    /// Registers an adapter (`POST /v1/load_lora_adapter`). It takes a GPU slot on first use.
    pub fn load_lora(&self, name: &str) -> Result<(), LoraError> {
        let mut st = self.shared.state.lock();
        if name.is_empty() || name == st.config.model {
            return Err(LoraError::InvalidName(name.to_owned()));
        }
        if st.lora.registered.iter().any(|l| &**l == name) {
            return Err(LoraError::AlreadyLoaded(name.to_owned()));
        }
        let name: Arc<str> = Arc::from(name);
        // vLLM reads a registered adapter into its CPU cache at once.
        st.lora.touch_cpu(&name);
        st.lora.registered.push(name);
        Ok(())
    }

    /// Forgets every adapter loaded at run time, keeping those of `keep` (the start-up
    /// `--lora-modules`): what a restarted engine has.
    pub fn reset_loras(&self, keep: &[String]) {
        let mut st = self.shared.state.lock();
        st.lora
            .registered
            .retain(|l| keep.iter().any(|k| **k == **l));
        let registered = st.lora.registered.clone();
        st.lora
            .resident
            .retain(|l| registered.iter().any(|r| r == l));
    }

    /// Unregisters an adapter (`POST /v1/unload_lora_adapter`) and frees its slot if unused.
    /// Requests already queued for it still run.
    pub fn unload_lora(&self, name: &str) -> Result<(), LoraError> {
        let mut st = self.shared.state.lock();
        let Some(pos) = st.lora.registered.iter().position(|l| &**l == name) else {
            return Err(LoraError::NotFound(name.to_owned()));
        };
        st.lora.registered.remove(pos);
        st.lora.cpu.retain(|c| &**c != name);
        if st.lora.used(name) == 0 {
            st.lora.resident.retain(|l| &**l != name);
        }
        Ok(())
    }

    /// Freezes (or unfreezes) the scheduler loop, like a hung engine: no step starts while paused.
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.send_replace(paused);
    }

    /// Whether the engine is paused.
    pub fn is_paused(&self) -> bool {
        *self.shared.paused.borrow()
    }

    /// A receiver that observes pause changes.
    pub fn pause_watch(&self) -> watch::Receiver<bool> {
        self.shared.paused.subscribe()
    }
}

async fn run(shared: Arc<EngineShared>) {
    let mut paused = shared.paused.subscribe();
    let mut prev_end: Option<Instant> = None;
    loop {
        if *paused.borrow_and_update() {
            if paused.wait_for(|p| !*p).await.is_err() {
                return;
            }
            prev_end = None;
        }
        let now = Instant::now();
        let start = match prev_end {
            Some(end) if now.saturating_duration_since(end) <= BACK_TO_BACK_SLACK => end,
            _ => now,
        };
        let step = shared.state.lock().schedule(start);
        match step {
            None => {
                prev_end = None;
                tokio::select! {
                    () = shared.wake.notified() => {}
                    _ = paused.changed() => {}
                }
            }
            Some(duration) => {
                let end = start + duration;
                tokio::time::sleep_until(end).await;
                shared.state.lock().commit(end);
                prev_end = Some(end);
            }
        }
    }
}
