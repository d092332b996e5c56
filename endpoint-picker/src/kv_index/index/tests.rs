//! Unit and property tests of the index.

use std::time::Duration;

use kv_events::{BlockRemoved, BlockStored, Event, EventBatch, Medium};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tokio::time::Instant;

use super::*;
use crate::kv_index::keys::{HashAlgorithm, KeyHasher};

const BS: usize = 4;
const MODEL: &str = "m";

fn hasher() -> KeyHasher {
    KeyHasher::new(BS, "", HashAlgorithm::CborFnv)
}

fn index(limits: IndexLimits) -> KvIndex {
    KvIndex::new(hasher(), limits)
}

fn ep(i: u32) -> EndpointId {
    EndpointId(i)
}

/// Tokens of `blocks` blocks; block `b` of sequence `seq` is `[seq*1000 + b*10 .. +BS]`.
fn tokens(seq: u32, blocks: std::ops::Range<u32>) -> Vec<u32> {
    blocks
        .flat_map(|b| (0..BS as u32).map(move |t| seq * 1000 + b * 10 + t))
        .collect()
}

/// The engine's hash of block `b` of sequence `seq` (any injective naming will do).
fn engine_hash(seq: u32, b: u32) -> u64 {
    (u64::from(seq) << 32) | u64::from(b + 1)
}

fn stored(seq: u32, blocks: std::ops::Range<u32>, medium: Medium) -> Event {
    let parent = (blocks.start > 0).then(|| engine_hash(seq, blocks.start - 1));
    Event::BlockStored(BlockStored {
        block_hashes: blocks.clone().map(|b| engine_hash(seq, b)).collect(),
        parent_block_hash: parent,
        token_ids: tokens(seq, blocks),
        block_size: BS as u32,
        lora_id: None,
        lora_name: None,
        medium,
        group: None,
    })
}

fn removed(seq: u32, blocks: std::ops::Range<u32>, medium: Medium) -> Event {
    Event::BlockRemoved(BlockRemoved {
        block_hashes: blocks.map(|b| engine_hash(seq, b)).collect(),
        medium,
        group_idx: None,
    })
}

fn batch(events: Vec<Event>) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: None,
    }
}

/// The request keys of sequence `seq`'s first `blocks` blocks.
fn request(seq: u32, blocks: u32) -> Vec<u64> {
    hasher().prompt_keys(MODEL, None, &tokens(seq, 0..blocks), usize::MAX)
}

fn lookup(index: &KvIndex, keys: &[u64], candidates: &[u32]) -> Lookup {
    let mut out = Lookup::default();
    index.lookup(
        keys,
        candidates.iter().map(|&i| ep(i)),
        &TierWeights::default(),
        SharedMedia::default(),
        |_| true,
        &mut out,
    );
    out
}

fn lookup_shared(index: &KvIndex, keys: &[u64], candidates: &[u32], shared: SharedMedia) -> Lookup {
    let mut out = Lookup::default();
    index.lookup(
        keys,
        candidates.iter().map(|&i| ep(i)),
        &TierWeights::default(),
        shared,
        |_| true,
        &mut out,
    );
    out
}

/// A copy of blocks `blocks` of `seq` in `medium`, announced by hash only (vLLM's offloading,
/// LMCache's backends).
fn copied(seq: u32, blocks: std::ops::Range<u32>, medium: Medium) -> Event {
    Event::BlockStored(BlockStored {
        block_hashes: blocks.map(|b| engine_hash(seq, b)).collect(),
        parent_block_hash: None,
        token_ids: vec![],
        block_size: BS as u32,
        lora_id: None,
        lora_name: None,
        medium,
        group: None,
    })
}

/// The tiers contract: a block in the shared store counts for every endpoint, whoever wrote
/// it; a CPU copy only for its own; a peer's run is its own tiers' only.
#[test]
fn the_shared_store_counts_for_every_endpoint_and_bridges_their_runs() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    // Endpoint 0 computed blocks 0..6 of sequence 1 and wrote 0..4 to the store and 0..6 to
    // its CPU tier; then its GPU evicted 2..6.
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..6, Medium::Gpu)]),
        now,
    );
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![copied(1, 0..4, Medium::Remote)]),
        now,
    );
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![copied(1, 0..6, Medium::Cpu)]),
        now,
    );
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![removed(1, 2..6, Medium::Gpu)]),
        now,
    );
    // Endpoint 1 holds block 0 and, beyond the store's run, blocks 4..5 on its GPU (it
    // computed the whole prompt once; its GPU evicted 1..4 and 5..).
    idx.apply(
        ep(1),
        MODEL,
        &batch(vec![stored(1, 0..6, Medium::Gpu)]),
        now,
    );
    idx.apply(
        ep(1),
        MODEL,
        &batch(vec![removed(1, 1..4, Medium::Gpu)]),
        now,
    );
    idx.apply(
        ep(1),
        MODEL,
        &batch(vec![removed(1, 5..6, Medium::Gpu)]),
        now,
    );
    let keys = request(1, 8);

    let l = lookup_shared(&idx, &keys, &[0, 1, 2], SharedMedia::default());
    assert_eq!(l.shared_run, 4);
    let (m0, m1, m2) = (l.of(ep(0)), l.of(ep(1)), l.of(ep(2)));
    // Endpoint 0: 2 on the GPU, 4 in its CPU tier (its own store copies need no load).
    assert_eq!(
        (m0.blocks, m0.by_tier, m0.shared, m0.local_run),
        (6, [2, 4, 0, 0], 0, 6)
    );
    // Endpoint 1: block 0 on its GPU, 1..4 from the store, then its own block 4.
    assert_eq!(
        (m1.blocks, m1.by_tier, m1.shared, m1.local_run),
        (5, [2, 0, 0, 0], 3, 1)
    );
    // Endpoint 2 holds nothing: the store's run.
    assert_eq!(
        (m2.blocks, m2.by_tier, m2.shared, m2.local_run),
        (4, [0; 4], 4, 0)
    );
    // A shared block weighs the remote weight (1.0 by default), a CPU one 0.8 unless shared.
    assert!((m2.weighted - 4.0).abs() < 1e-12, "{}", m2.weighted);
    assert!(
        (m0.weighted - (4.0 + 2.0 * 0.8)).abs() < 1e-12,
        "{}",
        m0.weighted
    );
    // The writer need not be a candidate for its store blocks to count.
    let l = lookup_shared(&idx, &keys, &[2], SharedMedia::default());
    assert_eq!(l.of(ep(2)).blocks, 4);

    // With nothing shared (llm-d's behaviour) a REMOTE copy is its writer's own.
    let l = lookup_shared(&idx, &keys, &[0, 1, 2], SharedMedia::NONE);
    assert_eq!((l.shared_run, blocks(&l, 1), blocks(&l, 2)), (0, 1, 0));
    assert_eq!(l.of(ep(0)).by_tier, [2, 4, 0, 0]);

    // The store evicts block 1 (its writer says so): the runs that went through it stop.
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![removed(1, 1..2, Medium::Remote)]),
        now,
    );
    let l = lookup_shared(&idx, &keys, &[0, 1, 2], SharedMedia::default());
    assert_eq!(l.shared_run, 1);
    assert_eq!((blocks(&l, 0), blocks(&l, 1), blocks(&l, 2)), (6, 1, 1));
}

/// Past the GPU prefix, a block is read from the endpoint's other copy (the engine's
/// connector loads what follows its prefix cache's hit).
#[test]
fn only_the_leading_gpu_run_is_read_from_the_gpu() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    // Endpoint 0: blocks 0..4 on its GPU and in its CPU tier; its GPU evicts block 1; block 4
    // is on its GPU only.
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..5, Medium::Gpu)]),
        now,
    );
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![copied(1, 0..4, Medium::Cpu)]),
        now,
    );
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![removed(1, 1..2, Medium::Gpu)]),
        now,
    );
    let l = lookup(&idx, &request(1, 5), &[0]);
    let m = l.of(ep(0));
    // Block 0 from the GPU; 1..4 from the CPU; block 4, GPU only, still counts there.
    assert_eq!((m.blocks, m.by_tier), (5, [2, 3, 0, 0]));
}

fn blocks(l: &Lookup, i: u32) -> u32 {
    l.of(ep(i)).blocks
}

impl KvIndex {
    /// Every structure agrees with every other, and the caps hold.
    fn check_invariants(&self) {
        assert!(self.keys.len() <= self.limits.max_keys);
        assert!(self.engine.len() <= self.limits.max_engine_keys);
        let mut entries = 0;
        let mut held = vec![std::collections::HashSet::new(); self.by_endpoint.len()];
        let mut slot = 0u32;
        let mut seen_keys = 0;
        while seen_keys < self.keys.len() {
            if let Some(es) = self.keys.at(slot) {
                seen_keys += 1;
                assert!(!es.is_empty(), "an empty key is held");
                assert!(es.len() <= self.limits.max_endpoints_per_key);
                entries += es.len();
                for e in es {
                    held[e.endpoint as usize].insert(slot);
                    let dup = es
                        .iter()
                        .filter(|o| o.endpoint == e.endpoint && o.medium == e.medium)
                        .filter(|o| o.speculative == e.speculative)
                        .count();
                    assert_eq!(dup, 1, "duplicate entry {e:?}");
                }
            }
            slot += 1;
        }
        assert_eq!(entries, self.entries, "entry count");
        for (i, log) in self.by_endpoint.iter().enumerate() {
            if let Some((_, pending)) = self.clearing.iter().find(|(e, _)| *e as usize == i) {
                // Being cleared: it gains nothing, and what is left to walk covers what it
                // still has.
                assert!(log.is_none(), "endpoint {i} gained keys while cleared");
                let left: std::collections::HashSet<Slot> = pending.slots().collect();
                assert!(
                    left.is_superset(&held[i]),
                    "clear of endpoint {i} misses a slot"
                );
                assert!(pending.shards.last().is_some_and(|s| !s.slots.is_empty()));
                continue;
            }
            let logged: std::collections::HashSet<Slot> =
                log.iter().flat_map(Held::slots).collect();
            assert!(
                logged.is_superset(&held[i]),
                "reverse index of endpoint {i} misses a slot"
            );
            let keys = log.as_ref().map_or(0, |h| h.keys);
            assert_eq!(keys, held[i].len(), "keys held by endpoint {i}");
            if let Some(h) = log {
                for (s, shard) in h.shards.iter().enumerate() {
                    let in_range = held[i]
                        .iter()
                        .filter(|&&slot| (slot >> SHARD_BITS) as usize == s)
                        .count();
                    assert_eq!(shard.keys, in_range, "keys of shard {s} of endpoint {i}");
                    assert!(
                        shard.slots.len() < 2 * shard.keys + LOG_SLACK,
                        "shard {s} of endpoint {i} not compacted"
                    );
                    assert!(
                        shard
                            .slots
                            .iter()
                            .all(|&slot| (slot >> SHARD_BITS) as usize == s)
                    );
                }
            }
        }
        let pending: usize = self.speculations.iter().map(|s| s.keys.len()).sum();
        assert_eq!(pending, self.speculative_keys);
        assert!(self.speculative_keys <= self.limits.max_speculative_keys);
    }
}

#[test]
fn stored_blocks_match_the_longest_prefix_per_endpoint() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..4, Medium::Gpu)]),
        now,
    );
    // Endpoint 1 gets the same sequence in two events: the second chains on the first's
    // last block through the engine hash.
    let a = idx.apply(
        ep(1),
        MODEL,
        &batch(vec![stored(1, 0..2, Medium::Gpu)]),
        now,
    );
    let b = idx.apply(
        ep(1),
        MODEL,
        &batch(vec![stored(1, 2..3, Medium::Gpu)]),
        now,
    );
    assert_eq!((a.applied, a.blocks, b.applied, b.blocks), (1, 2, 1, 1));
    // Endpoint 2 holds another sequence.
    idx.apply(
        ep(2),
        MODEL,
        &batch(vec![stored(2, 0..4, Medium::Gpu)]),
        now,
    );
    let l = lookup(&idx, &request(1, 5), &[0, 1, 2]);
    assert_eq!((blocks(&l, 0), blocks(&l, 1), blocks(&l, 2)), (4, 3, 0));
    assert_eq!(l.total_blocks, 5);
    assert!((l.score(ep(0)) - 0.8).abs() < 1e-12);
    assert_eq!(idx.len(), 8);
    assert_eq!(idx.entries(), 11);
    idx.check_invariants();
}

/// Review (M3): one 8 MiB frame could carry millions of one-byte tokens and hashes, all hashed
/// and mapped by `PreparedBatch::new` (hundreds of MiB, outside any budget, on a runtime
/// worker). A batch's stores are now capped in tokens and in blocks; what passes the caps is
/// charged before it is hashed, the stores past them are dropped and counted, and the rest
/// of the batch applies.
#[test]
fn a_hostile_batch_is_capped_before_it_is_hashed() {
    let cap = |a: &Applied| {
        let i = Dropped::ALL.iter().position(|&r| r == Dropped::BatchCap);
        a.dropped[i.unwrap()]
    };
    // More tokens than a batch may hash, in blocks of 256 tokens so that they fit them.
    let huge = Event::BlockStored(BlockStored {
        block_hashes: (1..=4097).collect(),
        parent_block_hash: None,
        token_ids: vec![1; MAX_BATCH_TOKENS + 4],
        block_size: 256,
        lora_id: None,
        lora_name: None,
        medium: Medium::Gpu,
        group: None,
    });
    let mut idx = index(IndexLimits::default());
    let applied = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![huge, stored(1, 0..2, Medium::Gpu)]),
        Instant::now(),
    );
    assert_eq!(
        (cap(&applied), applied.dropped_total(), applied.applied),
        (1, 1, 1)
    );
    assert_eq!(blocks(&lookup(&idx, &request(1, 2), &[0]), 0), 2);
    idx.check_invariants();

    // As many hashes as one block of tokens may stand for, event after event: the blocks cap
    // is reached after 2^18 / 64 of them, whatever the tokens.
    let many = |i: u64| {
        Event::BlockStored(BlockStored {
            block_hashes: (0..64).map(|h| (i << 8) | h).collect(),
            parent_block_hash: None,
            token_ids: vec![7; BS],
            block_size: BS as u32,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
            group: None,
        })
    };
    let per_event = MAX_BATCH_STORED_BLOCKS / 64;
    let hostile = batch((0..per_event as u64 + 2).map(many).collect());
    let prepared = PreparedBatch::new(&hasher(), MODEL, &hostile, &ParentKeys::default());
    let out = prepared.applied();
    assert_eq!((cap(&out), out.dropped_total()), (2, 2));
}

#[test]
fn the_request_path_and_the_event_path_compute_the_same_keys() {
    // A chain stored in one event and the same tokens hashed from the root agree block by
    // block; a partial trailing block has no key on either side.
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    let mut ev = stored(3, 0..3, Medium::Gpu);
    if let Event::BlockStored(s) = &mut ev {
        s.token_ids.extend([1, 2]); // a partial block the engine would not announce
    }
    idx.apply(ep(0), MODEL, &batch(vec![ev]), now);
    let mut prompt = tokens(3, 0..3);
    prompt.extend([7, 7, 7]);
    let keys = hasher().prompt_keys(MODEL, None, &prompt, usize::MAX);
    assert_eq!(keys.len(), 3);
    assert_eq!(blocks(&lookup(&idx, &keys, &[0]), 0), 3);
}

#[test]
fn unknown_parents_and_partial_blocks_are_dropped() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    let out = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 2..4, Medium::Gpu)]),
        now,
    );
    assert_eq!(out.applied, 0);
    assert_eq!(out.dropped, [1, 0, 0, 0, 0, 0, 0, 0]);
    let short = Event::BlockStored(BlockStored {
        block_hashes: vec![9],
        parent_block_hash: None,
        token_ids: vec![1, 2],
        block_size: BS as u32,
        lora_id: None,
        lora_name: None,
        medium: Medium::Gpu,
        group: None,
    });
    let out = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![short, removed(5, 0..2, Medium::Gpu)]),
        now,
    );
    assert_eq!(out.dropped, [0, 1, 1, 0, 0, 0, 0, 0]);
    assert!(idx.is_empty());
}

#[test]
fn removals_go_by_engine_hash_and_medium() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..4, Medium::Gpu)]),
        now,
    );
    idx.apply(
        ep(1),
        MODEL,
        &batch(vec![stored(1, 0..4, Medium::Gpu)]),
        now,
    );
    // A CPU copy of endpoint 0's blocks, announced by hash only (vLLM's offloading).
    let cpu = Event::BlockStored(BlockStored {
        block_hashes: (0..4).map(|b| engine_hash(1, b)).collect(),
        parent_block_hash: None,
        token_ids: vec![],
        block_size: BS as u32,
        lora_id: None,
        lora_name: None,
        medium: Medium::Cpu,
        group: None,
    });
    assert_eq!(idx.apply(ep(0), MODEL, &batch(vec![cpu]), now).blocks, 4);
    // Endpoint 0 evicts block 2 from the GPU: it still has it in CPU memory.
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![removed(1, 2..3, Medium::Gpu)]),
        now,
    );
    let l = lookup(&idx, &request(1, 4), &[0, 1]);
    assert_eq!((blocks(&l, 0), blocks(&l, 1)), (4, 4));
    // Read: blocks 0 and 1 from the GPU, 2 from the CPU, and 3 from the CPU too (past the GPU
    // prefix); weighted by each block's best copy all the same.
    assert_eq!(l.of(ep(0)).by_tier, [2, 2, 0, 0]);
    assert!((l.of(ep(0)).weighted - 3.8).abs() < 1e-12);
    // Then from the CPU: the chain breaks there for endpoint 0 only.
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![removed(1, 2..3, Medium::Cpu)]),
        now,
    );
    let l = lookup(&idx, &request(1, 4), &[0, 1]);
    assert_eq!((blocks(&l, 0), blocks(&l, 1)), (2, 4));
    // Endpoint 1 removes it too: the key goes, the engine mapping with it.
    let engine_before = idx.engine_keys();
    idx.apply(
        ep(1),
        MODEL,
        &batch(vec![removed(1, 2..3, Medium::Gpu)]),
        now,
    );
    assert_eq!(idx.engine_keys(), engine_before - 1);
    assert_eq!(idx.len(), 3);
    idx.check_invariants();
}

#[test]
fn all_blocks_cleared_and_gaps_clear_one_endpoint() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    for i in 0..3 {
        idx.apply(
            ep(i),
            MODEL,
            &batch(vec![stored(1, 0..4, Medium::Gpu)]),
            now,
        );
    }
    idx.apply(ep(1), MODEL, &batch(vec![Event::AllBlocksCleared]), now);
    let l = lookup(&idx, &request(1, 4), &[0, 1, 2]);
    assert_eq!((blocks(&l, 0), blocks(&l, 1), blocks(&l, 2)), (4, 0, 4));
    assert_eq!(idx.endpoint_keys(ep(1)), 0);
    // The gap hook is the same clear.
    idx.clear_endpoint(ep(2));
    assert_eq!(blocks(&lookup(&idx, &request(1, 4), &[2]), 2), 0);
    assert_eq!(idx.entries(), 4);
    idx.check_invariants();
    // Clearing a departed endpoint removes keys nobody else holds.
    idx.retain_endpoints(|id| id != ep(0));
    assert!(idx.is_empty());
    idx.check_invariants();
}

#[test]
fn endpoint_removal_then_id_reuse_starts_clean() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..4, Medium::Gpu)]),
        now,
    );
    idx.retain_endpoints(|_| false);
    // A new endpoint reuses id 0: it holds nothing of its predecessor's.
    assert_eq!(blocks(&lookup(&idx, &request(1, 4), &[0]), 0), 0);
    idx.check_invariants();
}

#[tokio::test(start_paused = true)]
async fn speculative_entries_expire_after_their_ttl() {
    let mut idx = index(IndexLimits {
        speculative_ttl: Duration::from_secs(2),
        ..IndexLimits::default()
    });
    let keys = request(1, 3);
    idx.speculate(ep(0), &keys, Instant::now());
    assert_eq!(blocks(&lookup(&idx, &keys, &[0]), 0), 3);
    tokio::time::advance(Duration::from_millis(1_999)).await;
    idx.expire(Instant::now());
    assert_eq!(blocks(&lookup(&idx, &keys, &[0]), 0), 3);
    tokio::time::advance(Duration::from_millis(1)).await;
    idx.expire(Instant::now());
    assert_eq!(blocks(&lookup(&idx, &keys, &[0]), 0), 0);
    assert!(idx.is_empty());
    idx.check_invariants();
}

#[tokio::test(start_paused = true)]
async fn real_events_replace_speculative_entries() {
    let mut idx = index(IndexLimits::default());
    let keys = request(1, 4);
    idx.speculate(ep(0), &keys, Instant::now());
    // The engine confirms the first two blocks (and was not sent the rest after all).
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..2, Medium::Gpu)]),
        Instant::now(),
    );
    assert_eq!(idx.entries(), 4);
    tokio::time::advance(Duration::from_secs(3)).await;
    idx.expire(Instant::now());
    // The confirmed blocks stay; the unconfirmed ones expired.
    assert_eq!(blocks(&lookup(&idx, &keys, &[0]), 0), 2);
    assert_eq!(idx.entries(), 2);
    idx.check_invariants();
}

/// A speculative entry is a GPU hit for its endpoint (the request routed there will find its
/// blocks), but nothing a peer can pull: the engine may not have computed them yet. The run
/// a peer can pull is what the engine announced.
#[tokio::test(start_paused = true)]
async fn speculative_blocks_are_hits_but_not_a_peers_source() {
    let mut idx = index(IndexLimits::default());
    let keys = request(1, 4);
    idx.speculate(ep(0), &keys, Instant::now());
    let m = lookup(&idx, &keys, &[0]).of(ep(0));
    assert_eq!((m.blocks, m.by_tier[0], m.local_run), (4, 4, 0));
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..2, Medium::Gpu)]),
        Instant::now(),
    );
    let m = lookup(&idx, &keys, &[0]).of(ep(0));
    assert_eq!((m.blocks, m.by_tier[0], m.local_run), (4, 4, 2));
    idx.check_invariants();
}

#[tokio::test(start_paused = true)]
async fn a_later_request_extends_a_speculative_entry() {
    let mut idx = index(IndexLimits::default());
    let keys = request(1, 2);
    idx.speculate(ep(0), &keys, Instant::now());
    tokio::time::advance(Duration::from_secs(1)).await;
    idx.speculate(ep(0), &keys, Instant::now());
    tokio::time::advance(Duration::from_millis(1_500)).await;
    idx.expire(Instant::now());
    // The first request's TTL is over, the second's is not.
    assert_eq!(blocks(&lookup(&idx, &keys, &[0]), 0), 2);
    tokio::time::advance(Duration::from_secs(1)).await;
    idx.expire(Instant::now());
    assert!(idx.is_empty());
    idx.check_invariants();
}

#[tokio::test(start_paused = true)]
async fn speculation_beyond_its_cap_expires_the_oldest_early() {
    let mut idx = index(IndexLimits {
        max_speculative_keys: 4,
        ..IndexLimits::default()
    });
    idx.speculate(ep(0), &request(1, 2), Instant::now());
    idx.speculate(ep(1), &request(2, 3), Instant::now());
    assert_eq!(blocks(&lookup(&idx, &request(1, 2), &[0]), 0), 0);
    assert_eq!(blocks(&lookup(&idx, &request(2, 3), &[1]), 1), 3);
    idx.check_invariants();
}

#[test]
fn the_key_cap_evicts_the_least_recently_stored_keeping_chain_heads() {
    let mut idx = index(IndexLimits {
        max_keys: 6,
        ..IndexLimits::default()
    });
    let now = Instant::now();
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..4, Medium::Gpu)]),
        now,
    );
    idx.apply(
        ep(1),
        MODEL,
        &batch(vec![stored(2, 0..3, Medium::Gpu)]),
        now,
    );
    assert_eq!(idx.len(), 6);
    // Sequence 1's deepest block went first: its head still matches.
    assert_eq!(blocks(&lookup(&idx, &request(1, 4), &[0]), 0), 3);
    assert_eq!(blocks(&lookup(&idx, &request(2, 3), &[1]), 1), 3);
    assert_eq!(idx.endpoint_keys(ep(0)), 3);
    idx.check_invariants();
}

/// Review (H1): the key table is one LRU for the pool, and an endpoint storing blocks of
/// random tokens evicted every other endpoint's keys (their streams live, their engines then
/// looking cold). Once the index is full, an endpoint holding half of it gets no room out of
/// the others' keys; alone, or below half, it evicts the oldest as before.
#[test]
fn a_flooding_endpoint_cannot_evict_the_others_past_half_the_index() {
    let share = |a: &Applied| {
        let i = Dropped::ALL
            .iter()
            .position(|&r| r == Dropped::EndpointShare);
        a.dropped[i.unwrap()]
    };
    let mut idx = index(IndexLimits {
        max_keys: 8,
        ..IndexLimits::default()
    });
    let now = Instant::now();
    let a = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..4, Medium::Gpu)]),
        now,
    );
    assert_eq!(share(&a), 0);
    let flood = idx.apply(
        ep(1),
        MODEL,
        &batch(vec![
            stored(2, 0..16, Medium::Gpu),
            stored(3, 0..16, Medium::Gpu),
        ]),
        now,
    );
    assert_eq!(share(&flood), 2, "{flood:?}");
    assert_eq!(idx.len(), 8);
    assert_eq!(idx.endpoint_keys(ep(1)), 4);
    // The other endpoint's prefix is whole.
    assert_eq!(idx.endpoint_keys(ep(0)), 4);
    assert_eq!(blocks(&lookup(&idx, &request(1, 4), &[0]), 0), 4);
    idx.check_invariants();
    // The other endpoint leaves: the flooder, alone, evicts its own oldest keys as it stores.
    idx.clear_endpoint(ep(0));
    let alone = idx.apply(
        ep(1),
        MODEL,
        &batch(vec![stored(4, 0..8, Medium::Gpu)]),
        now,
    );
    assert_eq!(share(&alone), 0, "{alone:?}");
    assert_eq!(idx.endpoint_keys(ep(1)), 8);
    assert_eq!(blocks(&lookup(&idx, &request(4, 8), &[1]), 1), 8);
    idx.check_invariants();
}

#[test]
fn the_endpoints_per_key_cap_drops_the_oldest_holder() {
    let mut idx = index(IndexLimits {
        max_endpoints_per_key: 2,
        ..IndexLimits::default()
    });
    let now = Instant::now();
    for i in 0..3 {
        idx.apply(
            ep(i),
            MODEL,
            &batch(vec![stored(1, 0..2, Medium::Gpu)]),
            now,
        );
    }
    let l = lookup(&idx, &request(1, 2), &[0, 1, 2]);
    assert_eq!((blocks(&l, 0), blocks(&l, 1), blocks(&l, 2)), (0, 2, 2));
    assert_eq!(idx.endpoint_keys(ep(0)), 0);
    idx.check_invariants();
}

#[test]
fn lookups_name_only_candidates() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    for i in 0..3 {
        idx.apply(
            ep(i),
            MODEL,
            &batch(vec![stored(1, 0..2, Medium::Gpu)]),
            now,
        );
    }
    let l = lookup(&idx, &request(1, 2), &[1]);
    assert_eq!((blocks(&l, 0), blocks(&l, 1), blocks(&l, 2)), (0, 2, 0));
    assert!(!l.is_candidate(ep(0)) && l.is_candidate(ep(1)));
}

#[test]
fn lora_blocks_chain_from_the_adapter_name() {
    let mut idx = index(IndexLimits::default());
    let mut ev = stored(1, 0..2, Medium::Gpu);
    if let Event::BlockStored(s) = &mut ev {
        s.lora_name = Some("sql".into());
    }
    idx.apply(ep(0), MODEL, &batch(vec![ev]), Instant::now());
    assert_eq!(blocks(&lookup(&idx, &request(1, 2), &[0]), 0), 0);
    let keys = hasher().prompt_keys("sql", None, &tokens(1, 0..2), usize::MAX);
    assert_eq!(blocks(&lookup(&idx, &keys, &[0]), 0), 2);
}

/// Review 14 (finding 1): an index block larger than the engine's (`blockSizeTokens: 64`
/// against vLLM's default 16) made keys no request has for every store chained from a parent
/// that ended partway through an index block, silently, and counted them applied. Such stores
/// are now dropped and counted under `block_size`; an engine block that is a multiple of the
/// index's is taken as before, and so is a store that does not say its block size.
#[test]
fn an_engine_block_that_is_not_a_multiple_of_the_index_block_is_dropped() {
    let now = Instant::now();
    // Request 1 stores 6 engine blocks from the root; request 2 hits that prefix and stores 6
    // more, chained from the sixth.
    let two_requests = |engine_block: u32| {
        let n = 6 * engine_block;
        let first = root_store(
            vec![1, 2, 3, 4, 5, 6],
            (0..n).collect(),
            engine_block,
            Medium::Gpu,
        );
        let mut next = root_store(
            vec![7, 8, 9, 10, 11, 12],
            (n..2 * n).collect(),
            engine_block,
            Medium::Gpu,
        );
        if let Event::BlockStored(s) = &mut next {
            s.parent_block_hash = Some(6);
        }
        (batch(vec![first, next]), (0..2 * n).collect::<Vec<u32>>())
    };

    // Engine 16, index 64: both dropped, nothing stored, nothing counted applied.
    let coarse = KeyHasher::new(64, "", HashAlgorithm::CborFnv);
    let mut idx = KvIndex::new(coarse, IndexLimits::default());
    let (b, _) = two_requests(16);
    let out = idx.apply(ep(0), MODEL, &b, now);
    assert_eq!(
        (
            out.applied,
            out.dropped_for(Dropped::BlockSize),
            out.dropped_total()
        ),
        (0, 2, 2)
    );
    assert!(idx.is_empty() && idx.engine_keys() == 0);

    // Engine 64, index 16: taken, every key matches.
    let fine = KeyHasher::new(16, "", HashAlgorithm::CborFnv);
    let mut idx = KvIndex::new(fine, IndexLimits::default());
    let (b, prompt) = two_requests(64);
    let out = idx.apply(ep(0), MODEL, &b, now);
    assert_eq!((out.applied, out.dropped_total()), (2, 0));
    let keys = fine.prompt_keys(MODEL, None, &prompt, usize::MAX);
    assert_eq!(keys.len(), 48);
    assert_eq!(blocks(&lookup(&idx, &keys, &[0]), 0), 48);

    idx.check_invariants();

    // An engine that does not say its block size (`block_size` 0, an older encoding): taken as
    // before, whatever the index's block size.
    let mut idx = KvIndex::new(coarse, IndexLimits::default());
    let (mut b, _) = two_requests(16);
    for e in &mut b.events {
        if let Event::BlockStored(s) = e {
            s.block_size = 0;
        }
    }
    let out = idx.apply(ep(0), MODEL, &b, now);
    assert_eq!((out.applied, out.dropped_total()), (2, 0));
}

#[test]
fn engine_blocks_larger_than_index_blocks_map_to_several_keys() {
    // The engine's 8-token blocks are two of the index's 4-token blocks each.
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    let first = Event::BlockStored(BlockStored {
        block_hashes: vec![100, 200],
        parent_block_hash: None,
        token_ids: tokens(1, 0..4),
        block_size: 8,
        lora_id: None,
        lora_name: None,
        medium: Medium::Gpu,
        group: None,
    });
    let next = Event::BlockStored(BlockStored {
        block_hashes: vec![300],
        parent_block_hash: Some(200),
        token_ids: tokens(1, 4..6),
        block_size: 8,
        lora_id: None,
        lora_name: None,
        medium: Medium::Gpu,
        group: None,
    });
    idx.apply(ep(0), MODEL, &batch(vec![first, next]), now);
    assert_eq!(blocks(&lookup(&idx, &request(1, 6), &[0]), 0), 6);
    // Removing engine block 200 removes index blocks 2 and 3.
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![200],
            medium: Medium::Gpu,
            group_idx: None,
        })]),
        now,
    );
    assert_eq!(blocks(&lookup(&idx, &request(1, 6), &[0]), 0), 2);
    idx.check_invariants();
}

// === properties ===

fn config(seed: u64) -> Config {
    Config {
        cases: 64,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Store {
        endpoint: u32,
        seq: u32,
        from: u32,
        len: u32,
        cpu: bool,
    },
    Remove {
        endpoint: u32,
        seq: u32,
        from: u32,
        len: u32,
        cpu: bool,
    },
    Clear {
        endpoint: u32,
    },
    /// A tier copy announced by hash only: to the shared store (`remote`) or the CPU tier.
    Copy {
        endpoint: u32,
        seq: u32,
        len: u32,
        remote: bool,
    },
    Speculate {
        endpoint: u32,
        seq: u32,
        len: u32,
    },
    Advance {
        millis: u64,
    },
    Retain {
        keep_below: u32,
    },
    /// A clear walked a few slots at a time ([`KvIndex::begin_clear`]), interleaved with the
    /// rest.
    BeginClear {
        endpoint: u32,
    },
    ClearSome {
        endpoint: u32,
        budget: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let endpoint = 0..6u32;
    let seq = 0..4u32;
    prop_oneof![
        4 => (endpoint.clone(), seq.clone(), 0..6u32, 1..6u32, any::<bool>())
            .prop_map(|(endpoint, seq, from, len, cpu)| Op::Store { endpoint, seq, from, len, cpu }),
        2 => (endpoint.clone(), seq.clone(), 0..8u32, 1..4u32, any::<bool>())
            .prop_map(|(endpoint, seq, from, len, cpu)| Op::Remove { endpoint, seq, from, len, cpu }),
        1 => endpoint.clone().prop_map(|endpoint| Op::Clear { endpoint }),
        2 => (endpoint.clone(), seq.clone(), 1..6u32, any::<bool>())
            .prop_map(|(endpoint, seq, len, remote)| Op::Copy { endpoint, seq, len, remote }),
        2 => (endpoint, seq, 1..8u32).prop_map(|(endpoint, seq, len)| Op::Speculate { endpoint, seq, len }),
        1 => (0..3_000u64).prop_map(|millis| Op::Advance { millis }),
        1 => (0..6u32).prop_map(|keep_below| Op::Retain { keep_below }),
        1 => (0..6u32).prop_map(|endpoint| Op::BeginClear { endpoint }),
        2 => (0..6u32, 1..4usize).prop_map(|(endpoint, budget)| Op::ClearSome { endpoint, budget }),
    ]
}

proptest! {
    #![proptest_config(config(0x6b76_1dec))]

    /// Whatever the events, the caps hold, the structures agree, scores stay in [0, 1] and a
    /// lookup never names an endpoint that was not a candidate.
    #[test]
    fn the_index_stays_bounded_and_consistent(
        ops in prop::collection::vec(op(), 1..80),
        max_keys in 1..40usize,
        max_endpoints_per_key in 1..4usize,
        candidates in prop::collection::vec(0..8u32, 0..6),
        seq in 0..4u32,
    ) {
        let limits = IndexLimits {
            max_keys,
            max_endpoints_per_key,
            max_engine_keys: max_keys,
            max_speculative_keys: 12,
            speculative_ttl: Duration::from_secs(2),
        };
        let mut idx = index(limits);
        let start = Instant::now();
        let mut now = start;
        for op in ops {
            match op {
                Op::Store { endpoint, seq, from, len, cpu } => {
                    let m = if cpu { Medium::Cpu } else { Medium::Gpu };
                    idx.apply(ep(endpoint), MODEL, &batch(vec![stored(seq, from..from + len, m)]), now);
                }
                Op::Remove { endpoint, seq, from, len, cpu } => {
                    let m = if cpu { Medium::Cpu } else { Medium::Gpu };
                    idx.apply(ep(endpoint), MODEL, &batch(vec![removed(seq, from..from + len, m)]), now);
                }
                Op::Clear { endpoint } => {
                    idx.apply(ep(endpoint), MODEL, &batch(vec![Event::AllBlocksCleared]), now);
                }
                Op::Copy { endpoint, seq, len, remote } => {
                    let m = if remote { Medium::Remote } else { Medium::Cpu };
                    idx.apply(ep(endpoint), MODEL, &batch(vec![copied(seq, 0..len, m)]), now);
                }
                Op::Speculate { endpoint, seq, len } => idx.speculate(ep(endpoint), &request(seq, len), now),
                Op::Advance { millis } => {
                    now += Duration::from_millis(millis);
                    idx.expire(now);
                }
                Op::Retain { keep_below } => idx.retain_endpoints(|id| id.0 < keep_below),
                Op::BeginClear { endpoint } => idx.begin_clear(ep(endpoint)),
                Op::ClearSome { endpoint, budget } => {
                    let (done, work) = idx.clear_some(ep(endpoint), budget);
                    prop_assert!(work <= budget);
                    prop_assert_eq!(done, !idx.is_clearing(ep(endpoint)));
                }
            }
            idx.check_invariants();
        }
        let keys = request(seq, 8);
        let l = lookup(&idx, &keys, &candidates);
        for (i, m) in l.by_endpoint.iter().enumerate() {
            let id = ep(i as u32);
            if !candidates.contains(&id.0) {
                prop_assert_eq!(m.blocks, 0);
                prop_assert!(!l.is_candidate(id));
            }
            let s = l.score(id);
            prop_assert!((0.0..=1.0).contains(&s), "score {}", s);
            prop_assert!(m.blocks as usize <= keys.len());
            prop_assert_eq!(m.by_tier.iter().sum::<u32>() + m.shared, m.blocks);
            prop_assert!(m.local_run <= m.blocks);
            if l.is_candidate(id) {
                prop_assert!(m.blocks >= l.shared_run, "the store's run counts for everyone");
            }
        }
        // Sharing nothing, no endpoint matches more than when the store is shared.
        let own = lookup_shared(&idx, &keys, &candidates, SharedMedia::NONE);
        prop_assert_eq!(own.shared_run, 0);
        for (mine, shared) in own.by_endpoint.iter().zip(&l.by_endpoint) {
            prop_assert_eq!(mine.shared, 0);
            prop_assert!(mine.blocks <= shared.blocks);
        }
    }
}

// === slices ===

/// An event of one endpoint's batch (for [`a_batch_applied_in_slices_ends_as_applied_whole`]).
fn batch_event() -> impl Strategy<Value = Event> {
    let seq = 0..4u32;
    prop_oneof![
        4 => (seq.clone(), 0..6u32, 1..6u32, any::<bool>()).prop_map(|(seq, from, len, cpu)| {
            stored(seq, from..from + len, if cpu { Medium::Cpu } else { Medium::Gpu })
        }),
        2 => (seq.clone(), 0..8u32, 1..4u32).prop_map(|(seq, from, len)| removed(seq, from..from + len, Medium::Gpu)),
        2 => (seq, 1..6u32).prop_map(|(seq, len)| copied(seq, 0..len, Medium::Cpu)),
        1 => Just(Event::AllBlocksCleared),
    ]
}

/// Every endpoint's match of every sequence, and the sizes: what two indexes must agree on.
fn state(idx: &KvIndex) -> (Vec<Vec<u32>>, usize, usize, usize) {
    let matches = (0..4)
        .map(|seq| {
            let l = lookup(idx, &request(seq, 12), &[0, 1, 2]);
            (0..3).map(|e| blocks(&l, e)).collect()
        })
        .collect();
    (matches, idx.len(), idx.entries(), idx.engine_keys())
}

proptest! {
    #![proptest_config(config(0x5_11ce))]

    /// Hashing before the lock and applying in slices changes nothing: a batch applied a few
    /// units at a time leaves the index as applied at once, with the same counts.
    #[test]
    fn a_batch_applied_in_slices_ends_as_applied_whole(
        history in prop::collection::vec((0..3u32, batch_event()), 0..12),
        events in prop::collection::vec(batch_event(), 1..12),
        endpoint in 0..3u32,
        budget in 1..6usize,
    ) {
        let limits = IndexLimits { max_keys: 64, max_engine_keys: 64, ..IndexLimits::default() };
        let mut whole = index(limits);
        let mut sliced = index(limits);
        let now = Instant::now();
        for (e, ev) in &history {
            whole.apply(ep(*e), MODEL, &batch(vec![ev.clone()]), now);
            sliced.apply(ep(*e), MODEL, &batch(vec![ev.clone()]), now);
        }
        let b = batch(events);
        let applied = whole.apply(ep(endpoint), MODEL, &b, now);

        let mut parents = ParentKeys::default();
        sliced.parent_keys(ep(endpoint), &PreparedBatch::parents(&b), &mut parents);
        let mut prepared = PreparedBatch::new(sliced.hasher(), MODEL, &b, &parents);
        let mut slices = 1;
        while !sliced.apply_prepared(ep(endpoint), &mut prepared, budget, now) {
            slices += 1;
            prop_assert!(slices <= 1_000);
        }
        prop_assert!(prepared.is_done());
        prop_assert_eq!(prepared.applied(), applied);
        prop_assert_eq!(state(&sliced), state(&whole));
        sliced.check_invariants();
    }
}

/// A batch's own stores are parents of its later ones, as vLLM chains a request's blocks over
/// the events of one step.
#[test]
fn a_parent_stored_earlier_in_the_batch_chains_the_next_store() {
    let mut idx = index(IndexLimits::default());
    let applied = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![
            stored(1, 0..2, Medium::Gpu),
            stored(1, 2..5, Medium::Gpu),
            stored(2, 3..4, Medium::Gpu), // its parent was never stored
        ]),
        Instant::now(),
    );
    assert_eq!(
        (applied.applied, applied.dropped),
        (2, [1, 0, 0, 0, 0, 0, 0, 0])
    );
    assert_eq!(blocks(&lookup(&idx, &request(1, 5), &[0]), 0), 5);
}

/// A long prefill's batch is hashed off the lock and written in slices of at most
/// [`APPLY_SLICE`](crate::kv_index::APPLY_SLICE) units, and all of it lands.
#[test]
fn a_long_prefill_is_applied_in_bounded_slices() {
    use crate::kv_index::{APPLY_SLICE, SharedKvIndex};

    // 128k tokens of 16-token blocks, as one event: 8,192 keys and 8,192 engine hashes.
    let hasher = KeyHasher::new(16, "", HashAlgorithm::CborFnv);
    let blocks = 8_192u32;
    let tokens: Vec<u32> = (0..blocks * 16).collect();
    let b = batch(vec![Event::BlockStored(BlockStored {
        block_hashes: (1..=u64::from(blocks)).collect(),
        parent_block_hash: None,
        token_ids: tokens.clone(),
        block_size: 16,
        lora_id: None,
        lora_name: None,
        medium: Medium::Gpu,
        group: None,
    })]);
    let now = Instant::now();

    // Directly: three holds of the lock, each within the slice.
    let mut idx = KvIndex::new(hasher, IndexLimits::default());
    let mut prepared = PreparedBatch::new(&hasher, MODEL, &b, &ParentKeys::default());
    let mut holds = 0;
    loop {
        holds += 1;
        let before = idx.len() + idx.engine_keys();
        let done = idx.apply_prepared(ep(0), &mut prepared, APPLY_SLICE, now);
        assert!(idx.len() + idx.engine_keys() - before <= APPLY_SLICE);
        if done {
            break;
        }
    }
    assert_eq!(holds, 2 * blocks as usize / APPLY_SLICE);
    assert_eq!(idx.len(), blocks as usize);

    // Through the shared index, as the subscribers apply it.
    let shared = SharedKvIndex::new(hasher, IndexLimits::default());
    let applied = shared.apply(ep(0), MODEL, &b, now);
    assert_eq!((applied.applied, applied.blocks), (1, blocks));
    assert_eq!(shared.sizes(), (blocks as usize, blocks as usize));
    let keys = hasher.prompt_keys(MODEL, None, &tokens, usize::MAX);
    let mut out = Lookup::default();
    shared.read(now, |i| {
        i.lookup(
            &keys,
            [ep(0)],
            &TierWeights::default(),
            SharedMedia::default(),
            |_| true,
            &mut out,
        )
    });
    assert_eq!(out.of(ep(0)).blocks, blocks);
}

/// Keys come and go under the cap far more often than an endpoint holds them: its reverse log
/// is compacted (bounded by twice the keys held plus the slack) and still clears exactly the
/// endpoint's entries, on slots that the evictions handed from one endpoint to another.
#[test]
fn reverse_logs_stay_bounded_under_churn_and_clear_exactly() {
    let mut idx = index(IndexLimits {
        max_keys: 64,
        max_engine_keys: 64,
        ..IndexLimits::default()
    });
    let now = Instant::now();
    for seq in 0..3_000u32 {
        // Endpoint 1 holds its one sequence throughout; 0 and 2 churn through the cap.
        let e = if seq % 2 == 0 { 0 } else { 2 };
        idx.apply(
            ep(e),
            MODEL,
            &batch(vec![stored(seq, 0..2, Medium::Gpu)]),
            now,
        );
        idx.apply(
            ep(1),
            MODEL,
            &batch(vec![stored(9_999, 0..2, Medium::Cpu)]),
            now,
        );
        if seq % 500 == 0 {
            idx.check_invariants();
        }
    }
    idx.check_invariants();
    for e in [0, 1, 2] {
        let held = idx.by_endpoint[e].as_ref().unwrap();
        let log = held.slots().count();
        // The churning endpoints went through every slot of the cap.
        assert!(e == 1 || held.shards.len() > 1, "the test spans shards");
        assert!(
            log < 2 * idx.endpoint_keys(ep(e as u32)) + LOG_SLACK * held.shards.len(),
            "log of {e}: {log}"
        );
    }
    // Alive: endpoint 1 holds its sequence, endpoint 0 its last one.
    assert_eq!(blocks(&lookup(&idx, &request(9_999, 2), &[1]), 1), 2);
    assert_eq!(blocks(&lookup(&idx, &request(2_998, 2), &[0]), 0), 2);
    assert!(idx.endpoint_keys(ep(0)) > 0);

    idx.clear_endpoint(ep(0));
    idx.check_invariants();
    assert_eq!(idx.endpoint_keys(ep(0)), 0);
    assert_eq!(blocks(&lookup(&idx, &request(2_998, 2), &[0]), 0), 0);
    // The others keep what they hold.
    assert_eq!(blocks(&lookup(&idx, &request(9_999, 2), &[1]), 1), 2);
    assert_eq!(blocks(&lookup(&idx, &request(2_999, 2), &[2]), 2), 2);
    assert_eq!(
        idx.entries(),
        idx.endpoint_keys(ep(1)) + idx.endpoint_keys(ep(2))
    );
}

/// Review: one engine hash could stand for as many keys as the engine sent tokens for, and a
/// copy or removal repeating it did that many inserts per "unit" of a slice (quadratic work
/// under the write lock), while the engine table, capped by entries, kept every such list.
/// Now a store whose tokens do not fit its blocks is dropped, a hash stands for at most
/// MAX_KEYS_PER_ENGINE_HASH keys, slices count the keys touched, and the engine table is
/// capped by the keys it holds.
#[test]
fn an_engine_hash_stands_for_a_bounded_number_of_keys() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    let one_hash = |tokens: usize, block_size: u32| {
        root_store(
            vec![7],
            (0..tokens as u32).collect(),
            block_size,
            Medium::Gpu,
        )
    };
    // More tokens than one block (and a partial one) of its claimed size, or, with no size,
    // more index blocks than a hash may stand for: dropped.
    let fanned = one_hash(65_536 * BS, BS as u32);
    let unsized_ = one_hash((MAX_KEYS_PER_ENGINE_HASH + 1) * BS, 0);
    // And a full block of tokens announced under more hashes than 64 a block (by an engine
    // that does not say its block size: one that says 1 is dropped for that alone).
    let many_hashes = root_store(
        (0..=MAX_KEYS_PER_ENGINE_HASH as u64).collect(),
        (0..BS as u32).collect(),
        0,
        Medium::Gpu,
    );
    // And one hash repeated: 100 of them for 6,400 blocks would be one entry of 6,400 keys.
    let repeated = root_store(
        vec![7; 100],
        (0..6_400 * BS as u32).collect(),
        64 * BS as u32,
        Medium::Gpu,
    );
    let four = batch(vec![fanned, unsized_, many_hashes, repeated]);
    let out = idx.apply(ep(0), MODEL, &four, now);
    assert_eq!(out.dropped, [0, 0, 0, 4, 0, 0, 0, 0]);
    assert!(idx.is_empty() && idx.engine_keys() == 0);
    // An engine block of 64 index blocks is taken: one hash, 64 keys.
    let wide = MAX_KEYS_PER_ENGINE_HASH * BS;
    let out = idx.apply(ep(0), MODEL, &batch(vec![one_hash(wide, wide as u32)]), now);
    assert_eq!(
        (out.applied, out.blocks),
        (1, MAX_KEYS_PER_ENGINE_HASH as u32)
    );
    // Copies and removals repeating that hash: each slice stays within its budget of keys.
    let repeats = 1_000;
    for ev in [
        root_store(vec![7; repeats], Vec::new(), wide as u32, Medium::Cpu),
        Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![7; repeats],
            medium: Medium::Cpu,
            group_idx: None,
        }),
    ] {
        let b = batch(vec![ev]);
        let parents = ParentKeys::default();
        let mut prepared = PreparedBatch::new(idx.hasher(), MODEL, &b, &parents);
        let budget = 256;
        let mut holds = 0;
        while !idx.apply_prepared(ep(0), &mut prepared, budget, now) {
            holds += 1;
        }
        // 1,000 hashes of 64 keys: 64,000 keys' work in slices of 256 (+ one hash's overrun).
        let least = repeats * MAX_KEYS_PER_ENGINE_HASH / (budget + MAX_KEYS_PER_ENGINE_HASH);
        assert!(
            holds >= least,
            "{holds} slices for {repeats} hashes of 64 keys"
        );
    }
    idx.check_invariants();

    // The engine table is capped by the keys its entries hold, not by their number.
    let mut small = index(IndexLimits {
        max_engine_keys: 3 * MAX_KEYS_PER_ENGINE_HASH,
        ..IndexLimits::default()
    });
    let events = (0..10)
        .map(|seq| {
            let tokens = tokens(seq, 0..MAX_KEYS_PER_ENGINE_HASH as u32);
            root_store(vec![engine_hash(seq, 0)], tokens, wide as u32, Medium::Gpu)
        })
        .collect();
    small.apply(ep(0), MODEL, &batch(events), now);
    assert_eq!(small.engine_keys(), 3, "three entries of 64 keys fill 192");
}

/// A `BlockStored` without a parent.
fn root_store(hashes: Vec<u64>, tokens: Vec<u32>, block_size: u32, medium: Medium) -> Event {
    Event::BlockStored(BlockStored {
        block_hashes: hashes,
        parent_block_hash: None,
        token_ids: tokens,
        block_size,
        lora_id: None,
        lora_name: None,
        medium,
        group: None,
    })
}

/// Review: speculative entries all due at once were dropped in one write-lock hold on the
/// request path. One call drops about EXPIRE_SLICE keys' worth; the next calls the rest.
#[test]
fn speculative_entries_expire_a_slice_at_a_time() {
    let mut idx = index(IndexLimits::default());
    let start = Instant::now();
    let per_request = 1_000u64;
    for r in 0..20u64 {
        let keys: Vec<u64> = (r * per_request..(r + 1) * per_request).collect();
        idx.speculate(ep(0), &keys, start);
    }
    assert_eq!(idx.len(), 20_000);
    let due = start + IndexLimits::default().speculative_ttl;
    idx.expire(due);
    let left = idx.len();
    assert!(
        (20_000 - EXPIRE_SLICE - per_request as usize..=20_000 - EXPIRE_SLICE).contains(&left),
        "{left}"
    );
    let mut calls = 1;
    while !idx.is_empty() {
        idx.expire(due);
        calls += 1;
    }
    // Whole requests until the slice is reached: five of 1,000 keys a call.
    assert_eq!(calls, 20_000 / (EXPIRE_SLICE.div_ceil(1_000) * 1_000));
    idx.check_invariants();
}

// === clearing in slices, engine hashes per endpoint ===

/// A clear walks the endpoint's keys a slice at a time. Between two slices the endpoint
/// matches nothing and gains nothing (what it held and what it gains could not be told apart
/// by a later slice), while the others are untouched; once done it is an endpoint like any.
#[test]
fn a_clear_in_slices_leaves_the_endpoint_matching_and_gaining_nothing_until_done() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    for e in [0, 1] {
        idx.apply(
            ep(e),
            MODEL,
            &batch(vec![stored(1, 0..40, Medium::Gpu)]),
            now,
        );
    }
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(2, 0..10, Medium::Cpu)]),
        now,
    );
    let entries_of_one = idx.entries() - idx.endpoint_keys(ep(0));
    let keys = request(1, 40);

    idx.begin_clear(ep(0));
    assert!(idx.is_clearing(ep(0)));
    let (done, work) = idx.clear_some(ep(0), 7);
    assert_eq!((done, work), (false, 7));
    idx.check_invariants();
    let l = lookup(&idx, &keys, &[0, 1]);
    assert_eq!((blocks(&l, 0), blocks(&l, 1)), (0, 40));
    assert!(
        l.is_candidate(ep(0)),
        "still a candidate, of the shared store at least"
    );

    // Neither events nor speculation add anything meanwhile.
    let applied = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(3, 0..5, Medium::Gpu)]),
        now,
    );
    assert_eq!((applied.applied, applied.dropped_total()), (0, 1));
    assert_eq!(applied.dropped[4], 1, "counted as dropped while clearing");
    idx.speculate(ep(0), &request(3, 5), now);
    idx.check_invariants();
    assert_eq!(blocks(&lookup(&idx, &request(3, 5), &[0]), 0), 0);
    assert_eq!(idx.endpoint_keys(ep(0)), 0);

    let mut calls = 2;
    while !idx.clear_some(ep(0), 7).0 {
        calls += 1;
        idx.check_invariants();
    }
    // 50 keys, logged once each: seven slices of 7 and a last one of 1.
    assert_eq!(calls, 8);
    assert!(!idx.is_clearing(ep(0)));
    assert_eq!(idx.entries(), entries_of_one);
    assert_eq!(blocks(&lookup(&idx, &keys, &[0, 1]), 1), 40);

    // Done: it gains and matches again.
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(3, 0..5, Medium::Gpu)]),
        now,
    );
    assert_eq!(blocks(&lookup(&idx, &request(3, 5), &[0]), 0), 5);
    idx.check_invariants();
    // A clear of an endpoint that holds nothing, or of one not being cleared, is done at once.
    assert_eq!(idx.clear_some(ep(7), 1), (true, 1));
    idx.begin_clear(ep(7));
    assert!(!idx.is_clearing(ep(7)));
}

/// An `AllBlocksCleared` inside a batch is walked in the batch's slices, and what the batch
/// stores after it is applied once the clear is done.
#[test]
fn a_cleared_batch_is_applied_in_slices_of_its_budget() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..30, Medium::Gpu)]),
        now,
    );
    let b = batch(vec![Event::AllBlocksCleared, stored(2, 0..3, Medium::Gpu)]);
    let mut parents = ParentKeys::default();
    idx.parent_keys(ep(0), &PreparedBatch::parents(&b), &mut parents);
    let mut prepared = PreparedBatch::new(idx.hasher(), MODEL, &b, &parents);
    let mut slices = 1;
    while !idx.apply_prepared(ep(0), &mut prepared, 8, now) {
        slices += 1;
        idx.check_invariants();
    }
    // 30 slots in slices of 8, then the store's 6 units (3 hashes, 3 keys) after the last 6.
    assert_eq!(slices, 5);
    assert_eq!(prepared.applied().applied, 2);
    assert_eq!(blocks(&lookup(&idx, &request(1, 30), &[0]), 0), 0);
    assert_eq!(blocks(&lookup(&idx, &request(2, 3), &[0]), 0), 3);
}

/// One engine's hashes never resolve another's events: an engine announcing the hashes of
/// another's blocks over other tokens (another model's engine with the same system prompt, or
/// a hostile one) neither redirects the other's later blocks nor keeps its removals from
/// applying.
#[test]
fn one_endpoints_engine_hashes_never_resolve_anothers_events() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..4, Medium::Gpu)]),
        now,
    );
    // Endpoint 1 announces sequence 1's engine hashes over sequence 2's tokens.
    let forged = match stored(2, 0..4, Medium::Gpu) {
        Event::BlockStored(mut b) => {
            b.block_hashes = (0..4).map(|b| engine_hash(1, b)).collect();
            Event::BlockStored(b)
        }
        _ => unreachable!(),
    };
    idx.apply(ep(1), MODEL, &batch(vec![forged]), now);
    // Endpoint 0's next blocks chain from its own block 3.
    let a = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 4..6, Medium::Gpu)]),
        now,
    );
    assert_eq!(a.dropped_total(), 0);
    assert_eq!(blocks(&lookup(&idx, &request(1, 6), &[0, 1]), 0), 6);
    assert_eq!(blocks(&lookup(&idx, &request(2, 4), &[0, 1]), 1), 4);
    // Its removal removes its own block 2 (and so its run stops at 2)...
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![removed(1, 2..3, Medium::Gpu)]),
        now,
    );
    assert_eq!(blocks(&lookup(&idx, &request(1, 6), &[0]), 0), 2);
    // ...and never endpoint 1's: its copy of "sequence 1" is sequence 2's tokens, intact.
    assert_eq!(blocks(&lookup(&idx, &request(2, 4), &[1]), 1), 4);
    // A hash only another endpoint announced is unknown here.
    let c = idx.apply(
        ep(2),
        MODEL,
        &batch(vec![removed(1, 0..1, Medium::Gpu)]),
        now,
    );
    assert_eq!(c.dropped_total(), 1);
    idx.check_invariants();
}

/// A parent's mapping is used each time a store chains from it, so it stays as recent as its
/// children: a hot prefix's last block (stored once) is not the first out of a full table.
#[test]
fn chaining_from_a_hash_keeps_its_mapping_recent() {
    let limits = IndexLimits {
        max_engine_keys: 4,
        ..IndexLimits::default()
    };
    let mut idx = index(limits);
    let now = Instant::now();
    for seq in 1..=4 {
        idx.apply(
            ep(0),
            MODEL,
            &batch(vec![stored(seq, 0..1, Medium::Gpu)]),
            now,
        );
    }
    // Chains from sequence 1's block 0 (the oldest mapping), then maps block 1: the table is
    // over its cap by one, and the oldest is sequence 2's now.
    let a = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 1..2, Medium::Gpu)]),
        now,
    );
    assert_eq!(a.dropped_total(), 0);
    let b = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 1..3, Medium::Gpu)]),
        now,
    );
    assert_eq!(
        (b.applied, b.dropped_total()),
        (1, 0),
        "block 0's mapping is still there"
    );
    let c = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(2, 1..2, Medium::Gpu)]),
        now,
    );
    assert_eq!(c.dropped_total(), 1, "sequence 2's block 0 was the oldest");
    idx.check_invariants();
}

/// An endpoint that left the pool leaves its engine hashes behind: a new endpoint given the
/// same id resolves nothing through them.
#[test]
fn a_departed_endpoints_engine_hashes_are_not_its_successors() {
    let mut idx = index(IndexLimits::default());
    let now = Instant::now();
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..2, Medium::Gpu)]),
        now,
    );
    idx.retain_endpoints(|id| id != ep(0));
    let a = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 2..3, Medium::Gpu)]),
        now,
    );
    assert_eq!(
        a.dropped_total(),
        1,
        "chained from the predecessor's block 1"
    );
    // Its own blocks resolve as usual.
    idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 0..2, Medium::Gpu)]),
        now,
    );
    let b = idx.apply(
        ep(0),
        MODEL,
        &batch(vec![stored(1, 2..3, Medium::Gpu)]),
        now,
    );
    assert_eq!(b.dropped_total(), 0);
    assert_eq!(blocks(&lookup(&idx, &request(1, 3), &[0]), 0), 3);
}

/// Review 14 (finding 5): a mapping the full engine table evicted left its endpoint's entries
/// for its keys in the index, where no `BlockRemoved` could reach them: after the engine
/// evicted the block they still matched, a hit predicted where a prefill came. The eviction
/// takes them with it, for that endpoint only; a mapping of an earlier epoch (an endpoint
/// gone, its id given to a new one) takes nothing of the new endpoint's.
#[test]
fn an_evicted_mapping_takes_its_endpoints_entries_with_it() {
    let limits = IndexLimits {
        max_engine_keys: 3,
        ..IndexLimits::default()
    };
    let mut idx = index(limits);
    let now = Instant::now();
    let store = |idx: &mut KvIndex, endpoint: u32, seq: u32| {
        let a = idx.apply(
            ep(endpoint),
            MODEL,
            &batch(vec![stored(seq, 0..1, Medium::Gpu)]),
            now,
        );
        assert_eq!((a.applied, a.dropped_total()), (1, 0));
    };
    store(&mut idx, 0, 1);
    store(&mut idx, 1, 1);
    store(&mut idx, 0, 2);
    let both = lookup(&idx, &request(1, 1), &[0, 1]);
    assert_eq!((blocks(&both, 0), blocks(&both, 1)), (1, 1));
    // A fourth mapping: endpoint 0's of sequence 1, the oldest, goes.
    store(&mut idx, 0, 3);
    let after = lookup(&idx, &request(1, 1), &[0, 1]);
    assert_eq!(
        (blocks(&after, 0), blocks(&after, 1)),
        (0, 1),
        "endpoint 0 forgets the block, endpoint 1 still holds it"
    );
    assert_eq!(blocks(&lookup(&idx, &request(2, 1), &[0]), 0), 1);
    idx.check_invariants();

    // Endpoint 2 stores sequence 4, leaves, and a new endpoint 2 stores it again: the old
    // mapping, evicted later, is not the new endpoint's.
    store(&mut idx, 2, 4);
    idx.retain_endpoints(|id| id != ep(2));
    store(&mut idx, 2, 4);
    assert_eq!(blocks(&lookup(&idx, &request(4, 1), &[2]), 2), 1);
    // Oldest first: endpoint 0's sequence 3, then the old endpoint 2's mapping.
    for seq in 5..7 {
        store(&mut idx, 0, seq);
    }
    assert_eq!(
        blocks(&lookup(&idx, &request(4, 1), &[2]), 2),
        1,
        "the new endpoint 2 still holds it"
    );
    // One more, and the new endpoint's own mapping goes, with its entry.
    store(&mut idx, 0, 7);
    assert_eq!(blocks(&lookup(&idx, &request(4, 1), &[2]), 2), 0);
    idx.check_invariants();
}
