//! Decode throughput of KV-event payloads, in block events per second (one block hash of a
//! `BlockStored` or `BlockRemoved` is one block event), for both encodings and both hash
//! forms. The batch is what a busy engine step makes: 32 `BlockStored` of 16 blocks of 16
//! tokens (a 256-token run each: 512 stored blocks, 8,192 token ids) and 32 `BlockRemoved` of
//! 16 blocks (512 evictions). Issue 15 asks for ingest of at least a million block events per
//! second on one core; `cargo bench -p kv-events --bench decode`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use kv_events::codec::{Encoder, Encoding, HashEncoding, decode_batch};
use kv_events::{BlockRemoved, BlockStored, Event, EventBatch, Medium};

const BLOCK_SIZE: u32 = 16;

fn step_batch() -> EventBatch {
    // A fixed LCG: deterministic, full-width hashes (the 9-byte msgpack form, as vLLM's are).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x | (1 << 63)
    };
    let mut events = Vec::new();
    for _ in 0..32 {
        let hashes: Vec<u64> = (0..16).map(|_| next()).collect();
        events.push(Event::BlockStored(BlockStored {
            parent_block_hash: Some(next()),
            token_ids: (0..16 * BLOCK_SIZE)
                .map(|t| (next() % 150_000) as u32 + t % 2)
                .collect(),
            block_hashes: hashes,
            block_size: BLOCK_SIZE,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
            group: None,
        }));
        events.push(Event::BlockRemoved(BlockRemoved {
            block_hashes: (0..16).map(|_| next()).collect(),
            medium: Medium::Gpu,
            group_idx: None,
        }));
    }
    EventBatch {
        ts: 1_789_095_808.837_884_7,
        events,
        data_parallel_rank: Some(0),
    }
}

fn block_events(batch: &EventBatch) -> u64 {
    batch
        .events
        .iter()
        .map(|e| match e {
            Event::BlockStored(b) => b.block_hashes.len() as u64,
            Event::BlockRemoved(b) => b.block_hashes.len() as u64,
            Event::AllBlocksCleared => 1,
        })
        .sum()
}

fn decode(c: &mut Criterion) {
    let batch = step_batch();
    let mut group = c.benchmark_group("kv_events_decode");
    group.throughput(Throughput::Elements(block_events(&batch)));
    for (encoding, hashes, name) in [
        (Encoding::Map, HashEncoding::Int, "map_int_hashes"),
        (Encoding::Array, HashEncoding::Int, "array_int_hashes"),
        (Encoding::Map, HashEncoding::Bytes, "map_bytes_hashes"),
    ] {
        let payload = Encoder { encoding, hashes }.encode(&batch).unwrap();
        assert_eq!(decode_batch(&payload).unwrap(), batch);
        group.bench_with_input(
            BenchmarkId::new(name, format!("{}B", payload.len())),
            &payload,
            |b, p| b.iter(|| decode_batch(black_box(p)).unwrap()),
        );
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let batch = step_batch();
    let mut group = c.benchmark_group("kv_events_encode");
    group.throughput(Throughput::Elements(block_events(&batch)));
    group.bench_function("map_int_hashes", |b| {
        b.iter(|| {
            Encoder::new(Encoding::Map)
                .encode(black_box(&batch))
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
