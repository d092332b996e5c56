//! The precise prefix-cache index (issue 15): KV-event ingest on one core, one decision with
//! `precise-prefix-cache-scorer` at 1,000 endpoints, and the index's memory at 10 million
//! blocks (printed once, measured from the index's own tables). Results: bench/RESULTS.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use endpoint_picker::datastore::EndpointId;
use endpoint_picker::kv_index::{HashAlgorithm, IndexLimits, KeyHasher, KvIndex, StreamState};
use endpoint_picker::request::{Api, InferenceRequest};
use kv_events::{BlockRemoved, BlockStored, Event, EventBatch, Medium};
use tokio::time::Instant;

const BLOCK: u32 = 16;

/// Sequence `seq`'s token ids. The first two spell the sequence number, so that no two
/// sequences share a first block (and so a key) below 150,000² sequences. (The ids used to
/// repeat every 150,000 sequences, 9.6 M blocks, and the memory fill below never reached 10 M
/// distinct keys.)
fn sequence_tokens(seq: u64, n: u32) -> impl Iterator<Item = u32> {
    (0..n).map(move |t| match t {
        0 => (seq % 150_000) as u32,
        1 => ((seq / 150_000) % 150_000) as u32,
        _ => (seq as u32).wrapping_mul(7919).wrapping_add(t) % 150_000,
    })
}

/// A batch like vLLM's: `events` BlockStored of `blocks` blocks each, each sequence new.
fn stored_batch(first_seq: u64, events: usize, blocks: u32) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events: (0..events as u64)
            .map(|e| {
                let seq = first_seq + e;
                Event::BlockStored(BlockStored {
                    block_hashes: (0..u64::from(blocks))
                        .map(|b| (seq << 16) | (b + 1))
                        .collect(),
                    parent_block_hash: None,
                    token_ids: sequence_tokens(seq, blocks * BLOCK).collect(),
                    block_size: BLOCK,
                    lora_id: None,
                    lora_name: None,
                    medium: Medium::Gpu,
                    group: None,
                })
            })
            .collect(),
        data_parallel_rank: None,
    }
}

fn removed_batch(first_seq: u64, events: usize, blocks: u32) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events: (0..events as u64)
            .map(|e| {
                let seq = first_seq + e;
                Event::BlockRemoved(BlockRemoved {
                    block_hashes: (0..u64::from(blocks))
                        .map(|b| (seq << 16) | (b + 1))
                        .collect(),
                    medium: Medium::Gpu,
                    group_idx: None,
                })
            })
            .collect(),
        data_parallel_rank: None,
    }
}

fn hasher() -> KeyHasher {
    KeyHasher::new(BLOCK as usize, "", HashAlgorithm::CborFnv)
}

/// Block events per second: batches of 16 `BlockStored` × 16 blocks, on an index at its cap
/// (each store evicts), half of them followed by their removal.
fn ingest(c: &mut Criterion) {
    let mut group = c.benchmark_group("kv_index_ingest");
    for (name, algorithm) in [
        ("cbor-fnv", HashAlgorithm::CborFnv),
        ("xxh64", HashAlgorithm::Xxh64),
    ] {
        let mut index = KvIndex::new(
            KeyHasher::new(BLOCK as usize, "", algorithm),
            IndexLimits {
                max_keys: 1_000_000,
                max_engine_keys: 1_000_000,
                ..IndexLimits::default()
            },
        );
        let now = Instant::now();
        let mut seq = 0u64;
        // Fill to the cap first: the steady state evicts.
        while index.len() < 1_000_000 {
            index.apply(
                EndpointId((seq % 100) as u32),
                "m",
                &stored_batch(seq, 16, 16),
                now,
            );
            seq += 16;
        }
        group.throughput(Throughput::Elements(16 * 16));
        group.bench_function(BenchmarkId::new("stored_blocks", name), |b| {
            b.iter(|| {
                let batch = stored_batch(seq, 16, 16);
                let out = index.apply(EndpointId((seq % 100) as u32), "m", black_box(&batch), now);
                seq += 16;
                black_box(out)
            })
        });
        group.bench_function(BenchmarkId::new("stored_then_removed_blocks", name), |b| {
            b.iter(|| {
                let ep = EndpointId((seq % 100) as u32);
                let stored = stored_batch(seq, 8, 16);
                let removed = removed_batch(seq, 8, 16);
                index.apply(ep, "m", black_box(&stored), now);
                let out = index.apply(ep, "m", black_box(&removed), now);
                seq += 8;
                black_box(out)
            })
        });
    }
    group.finish();
}

const PRECISE_CONFIG: &str = r#"
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {speculativeIndexing: true}
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: precise-prefix-cache-scorer, weight: 3}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
"#;

/// One decision (producers, scorers, picker, speculative entry) at 1,000 endpoints, each
/// holding four 4,096-token conversations; the request shares 3,072 tokens with one of them.
fn decision(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("decision_precise_prefix_4k_tokens");
    for n in [100usize, 1000] {
        let director = bench::director_with_config(n, PRECISE_CONFIG);
        let producer = director.config().precise_producers[0].clone();
        let index = producer.index().clone();
        let now = Instant::now();
        for e in director.datastore().snapshot().endpoints.iter() {
            index.set_stream(e.id, StreamState::Live);
            for k in 0..4u64 {
                let seq = u64::from(e.id.0) * 4 + k;
                index.apply(e.id, "m", &stored_batch(seq, 1, 256), now);
            }
        }
        // The request: conversation 4·42's first 192 blocks, then 64 blocks of its own.
        let mut tokens: Vec<u32> = sequence_tokens(42 * 4, 192 * BLOCK).collect();
        tokens.extend((0..64 * BLOCK).map(|t| 200_000 + t));
        let body = Bytes::from(bench::chat_body(16 * 1024, 1));
        let request = InferenceRequest {
            api: Api::ChatCompletions,
            model: "m".into(),
            target_model: "m".into(),
            prompt: body.clone(),
            body_len: body.len(),
            token_ids: Some(Arc::from(tokens)),
            ..Default::default()
        };
        // The precise scorer sees endpoint 42 hold 192 of the 256 blocks (the decision itself
        // also weighs its queue and KV use).
        let routed = director.route(&request, None, true).unwrap();
        let explained = routed
            .result
            .primary_result()
            .unwrap()
            .explanation
            .clone()
            .unwrap();
        let row = explained
            .rows
            .iter()
            .find(|r| &*r.address == "10.0.0.42:8000")
            .unwrap();
        assert_eq!(row.scores[0], 0.75);
        drop(routed);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let routed = director.route(black_box(&request), None, false).unwrap();
                black_box(routed.destination())
            })
        });
    }
    group.finish();
}

/// Memory: the index's tables after storing `blocks` distinct blocks over 1,000 endpoints
/// (sequences of 64 blocks; every block held by one endpoint), printed once.
fn memory(_: &mut Criterion) {
    let blocks: usize = std::env::var("KV_INDEX_MEMORY_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let mut index = KvIndex::new(hasher(), IndexLimits::default());
    let now = Instant::now();
    let mut seq = 0u64;
    let started = std::time::Instant::now();
    while index.len() < blocks {
        index.apply(
            EndpointId((seq % 1000) as u32),
            "m",
            &stored_batch(seq, 16, 64),
            now,
        );
        seq += 16;
    }
    let bytes = index.heap_bytes();
    eprintln!(
        "kv_index memory: {} blocks, {} entries, {} engine hashes: {:.1} MiB of tables, {:.1} bytes per block (filled in {:.1} s)",
        index.len(),
        index.entries(),
        index.engine_keys(),
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / index.len() as f64,
        started.elapsed().as_secs_f64()
    );
}

criterion_group!(benches, ingest, decision, memory);
criterion_main!(benches);
