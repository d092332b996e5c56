//! Property tests of the codec (proptest, fixed seeds): encode then decode is the identity in
//! both encodings and both hash forms (256 cases), and decoding any bytes, or any corruption
//! of a valid payload, returns (an error or a batch) without panicking (512 cases each).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_events::codec::{Encoder, Encoding, HashEncoding, decode_batch};
use kv_events::{BlockRemoved, BlockStored, Event, EventBatch, Medium};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn config(cases: u32, seed: u64) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    }
}

fn medium() -> impl Strategy<Value = Medium> {
    prop::sample::select(vec![Medium::Gpu, Medium::Cpu, Medium::Disk, Medium::Remote])
}

fn event() -> impl Strategy<Value = Event> {
    let stored = (
        prop::collection::vec(any::<u64>(), 0..8),
        prop::option::of(any::<u64>()),
        prop::collection::vec(any::<u32>(), 0..40),
        any::<u32>(),
        prop::option::of(any::<i64>()),
        prop::option::of(".{0,20}"),
        medium(),
    )
        .prop_map(
            |(
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                lora_name,
                medium,
            )| {
                Event::BlockStored(BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id,
                    lora_name,
                    medium,
                })
            },
        );
    let removed =
        (prop::collection::vec(any::<u64>(), 0..8), medium()).prop_map(|(block_hashes, medium)| {
            Event::BlockRemoved(BlockRemoved {
                block_hashes,
                medium,
            })
        });
    prop_oneof![4 => stored, 3 => removed, 1 => Just(Event::AllBlocksCleared)]
}

fn batch() -> impl Strategy<Value = EventBatch> {
    (
        // Finite: NaN is not equal to itself (it still round-trips bit for bit).
        -1e18f64..1e18,
        prop::collection::vec(event(), 0..12),
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(ts, events, data_parallel_rank)| EventBatch {
            ts,
            events,
            data_parallel_rank,
        })
}

fn encoder() -> impl Strategy<Value = Encoder> {
    (
        prop::sample::select(vec![Encoding::Array, Encoding::Map]),
        prop::sample::select(vec![HashEncoding::Int, HashEncoding::Bytes]),
    )
        .prop_map(|(encoding, hashes)| Encoder { encoding, hashes })
}

proptest! {
    #![proptest_config(config(256, 0x6b76_0001))]
    #[test]
    fn encode_then_decode_is_the_identity(batch in batch(), encoder in encoder()) {
        let bytes = encoder.encode(&batch).unwrap();
        prop_assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }
}

proptest! {
    #![proptest_config(config(512, 0x6b76_0002))]
    #[test]
    fn any_bytes_decode_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_batch(&bytes);
    }

    #[test]
    fn corrupted_payloads_decode_or_fail_without_panicking(
        batch in batch(),
        encoder in encoder(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = encoder.encode(&batch).unwrap();
        if !bytes.is_empty() {
            for (at, b) in flips {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
        }
        if let Ok(decoded) = decode_batch(&bytes) {
            // Whatever decodes re-encodes within the caps.
            prop_assert!(encoder.encode(&decoded).is_ok());
        }
    }
}
