//! Property tests of the codec (proptest, fixed seeds): encode then decode is the identity in
//! both encodings and both hash forms, strict or lenient (256 cases), and decoding any bytes,
//! or any corruption of a valid payload, returns (an error or a batch) without panicking, the
//! lenient decoder accepting whatever the strict one does (512 cases each). Then the lenient
//! decoder's cases: unknown event types and media, and `extra_keys`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kv_events::codec::{
    Encoder, Encoding, HashEncoding, Skipped, decode_batch, decode_batch_lenient,
};
use kv_events::{BlockRemoved, BlockStored, CacheGroup, CacheKind, Event, EventBatch, Medium};
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
        prop::option::of((any::<i64>(), prop::option::of(cache_kind()))),
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
                group,
            )| {
                Event::BlockStored(BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id,
                    lora_name,
                    medium,
                    group: group.map(|(index, kind)| CacheGroup { index, kind }),
                })
            },
        );
    let removed = (
        prop::collection::vec(any::<u64>(), 0..8),
        medium(),
        prop::option::of(any::<i64>()),
    )
        .prop_map(|(block_hashes, medium, group_idx)| {
            Event::BlockRemoved(BlockRemoved {
                block_hashes,
                medium,
                group_idx,
            })
        });
    prop_oneof![4 => stored, 3 => removed, 1 => Just(Event::AllBlocksCleared)]
}

fn cache_kind() -> impl Strategy<Value = CacheKind> {
    prop_oneof![
        Just(CacheKind::FullAttention),
        Just(CacheKind::MlaAttention),
        Just(CacheKind::SinkFullAttention),
        Just(CacheKind::SlidingWindow),
        Just(CacheKind::Other),
    ]
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
        prop_assert_eq!(decode_batch_lenient(&bytes).unwrap(), (batch.clone(), Skipped::default()));
        prop_assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }
}

/// The lenient decoder accepts whatever the strict one does, and differs from it only by what
/// it counts as skipped (a strict batch has no unknown type or medium; extra keys may cut
/// events, never add one).
fn lenient_agrees(bytes: &[u8]) -> Result<(), TestCaseError> {
    let lenient = decode_batch_lenient(bytes);
    if let Ok(strict) = decode_batch(bytes) {
        let (batch, skipped) = lenient.expect("lenient accepts what strict accepts");
        prop_assert_eq!((skipped.unknown_type, skipped.unknown_medium), (0, 0));
        prop_assert!(batch.events.len() <= strict.events.len());
        if skipped.is_empty() {
            prop_assert_eq!(batch.events, strict.events);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512, 0x6b76_0002))]
    #[test]
    fn any_bytes_decode_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_batch(&bytes);
        lenient_agrees(&bytes)?;
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
        if let Ok((decoded, _)) = decode_batch_lenient(&bytes) {
            prop_assert!(encoder.encode(&decoded).is_ok());
        }
        lenient_agrees(&bytes)?;
    }
}

/// A tiny msgpack writer for hand-made payloads (fix-size forms only).
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn arr(self, n: u8) -> Self {
        assert!(n < 16);
        self.raw(&[0x90 | n])
    }
    fn map(self, n: u8) -> Self {
        assert!(n < 16);
        self.raw(&[0x80 | n])
    }
    fn s(self, s: &str) -> Self {
        assert!(s.len() < 32);
        self.raw(&[0xa0 | s.len() as u8]).raw(s.as_bytes())
    }
    fn nil(self) -> Self {
        self.raw(&[0xc0])
    }
    fn u(self, v: u8) -> Self {
        assert!(v < 128);
        self.raw(&[v])
    }
    fn f(self, v: f64) -> Self {
        self.raw(&[0xcb]).raw(&v.to_be_bytes())
    }
    /// A batch `[0.0, [events…]]` of `n` events, written by `events`.
    fn batch(n: u8, events: impl FnOnce(W) -> W) -> Vec<u8> {
        events(W::default().arr(2).f(0.0).arr(n)).0
    }
    /// `["BlockRemoved", [hash], medium]`.
    fn removed(self, hash: u8, medium: &str) -> Self {
        self.arr(3).s("BlockRemoved").arr(1).u(hash).s(medium)
    }
}

fn removed(hash: u64, medium: Medium) -> Event {
    Event::BlockRemoved(BlockRemoved {
        block_hashes: vec![hash],
        medium,
        group_idx: None,
    })
}

/// Review (M4): one event of an unknown type or medium failed the whole batch, and every such
/// batch (lost, so a gap) cleared the engine's index. Leniently, that event alone is left out
/// and counted, in either encoding; the strict decoder still refuses the batch.
#[test]
fn unknown_event_types_and_media_are_skipped_event_by_event() {
    let array = W::batch(4, |w| {
        w.removed(1, "GPU")
            .arr(3)
            .s("BlockMoved")
            .arr(1)
            .u(2)
            .map(1) // whatever a future type's fields are
            .s("k")
            .u(0)
            .removed(3, "NVMe")
            .removed(4, "cpu")
    });
    assert!(decode_batch(&array).is_err());
    let (batch, skipped) = decode_batch_lenient(&array).unwrap();
    assert_eq!(
        batch.events,
        [removed(1, Medium::Gpu), removed(4, Medium::Cpu)]
    );
    assert_eq!(
        skipped,
        Skipped {
            unknown_type: 1,
            unknown_medium: 1,
            extra_keys: 0
        }
    );

    // Maps: the tag anywhere; a future type's fields after it are not read at all.
    let map = W::batch(1, |w| {
        w.map(2)
            .s("type")
            .s("TierBlocksCleared")
            .s("medium")
            .raw(&[0xc1]) // no msgpack value
    });
    assert!(
        decode_batch_lenient(&map).is_err(),
        "skipped, its bytes are still checked"
    );
    let map = W::batch(3, |w| {
        w.map(2)
            .s("type")
            .s("TierBlocksCleared")
            .s("medium")
            .arr(1)
            .u(7)
            .map(3)
            .s("medium")
            .s("tape")
            .s("type")
            .s("BlockRemoved")
            .s("block_hashes")
            .arr(1)
            .u(5)
            .map(1)
            .s("type")
            .s("AllBlocksCleared")
    });
    assert!(decode_batch(&map).is_err());
    let (batch, skipped) = decode_batch_lenient(&map).unwrap();
    assert_eq!(batch.events, [Event::AllBlocksCleared]);
    assert_eq!((skipped.unknown_type, skipped.unknown_medium), (1, 1));
}

/// `["BlockStored", hashes 1..=blocks, parent nil, tokens (2 a block, or none), 2, nil, "GPU",
/// lora_name, extra_keys]`, `extra_keys` written by `extra`.
fn stored_with(
    blocks: u8,
    tokens: bool,
    lora: Option<&str>,
    extra: impl FnOnce(W) -> W,
) -> Vec<u8> {
    W::batch(1, |w| {
        let mut w = w.arr(9).s("BlockStored").arr(blocks);
        for h in 1..=blocks {
            w = w.u(h);
        }
        w = w.nil();
        if tokens {
            w = w.arr(2 * blocks);
            for t in 0..2 * blocks {
                w = w.u(t);
            }
        } else {
            w = w.arr(0);
        }
        w = w.u(2).nil().s("GPU");
        w = match lora {
            Some(name) => w.s(name),
            None => w.nil(),
        };
        extra(w)
    })
}

/// The blocks (hashes) and tokens of the one `BlockStored` left, and the blocks cut.
fn kept(payload: &[u8]) -> (Vec<u64>, usize, u32) {
    let (batch, skipped) = decode_batch_lenient(payload).unwrap();
    // The strict decoder skips `extra_keys`: the whole event.
    assert_eq!(decode_batch(payload).unwrap().events.len(), 1);
    match batch.events.as_slice() {
        [] => (Vec::new(), 0, skipped.extra_keys),
        [Event::BlockStored(b)] => (
            b.block_hashes.clone(),
            b.token_ids.len(),
            skipped.extra_keys,
        ),
        other => panic!("{other:?}"),
    }
}

/// Review (M2): blocks stored for a salted (or multimodal) request were indexed under the
/// plain key of their tokens, and matched requests the engine cannot serve from them. Each
/// `BlockStored` is now cut before its first block with extra keys other than its adapter's
/// name, the blocks chained after it going too.
#[test]
fn blocks_with_extra_keys_are_cut_and_counted() {
    // None, or nil for every block: text.
    assert_eq!(
        kept(&stored_with(3, true, None, W::nil)),
        (vec![1, 2, 3], 6, 0)
    );
    let nils = |w: W| w.arr(3).nil().nil().arr(0);
    assert_eq!(
        kept(&stored_with(3, true, None, nils)),
        (vec![1, 2, 3], 6, 0)
    );
    // A cache salt on the first block: every block is salted through the chain.
    let salted = |w: W| w.arr(3).arr(1).s("tenant-a").nil().nil();
    assert_eq!(kept(&stored_with(3, true, None, salted)), (vec![], 0, 3));
    // The adapter's own name keeps its blocks (the index roots adapter chains by it); an
    // image after it does not.
    let lora = |w: W| {
        w.arr(3)
            .arr(1)
            .s("sql")
            .arr(1)
            .s("sql")
            .arr(2)
            .s("sql")
            .s("image-1")
    };
    assert_eq!(
        kept(&stored_with(3, true, Some("sql"), lora)),
        (vec![1, 2], 4, 1)
    );
    // The same entries without that adapter: salt-like, cut from the first.
    assert_eq!(kept(&stored_with(3, true, None, lora)), (vec![], 0, 3));
    // A legacy multimodal entry, `(identifier, offset)`, on the second block.
    let image = |w: W| w.arr(3).nil().arr(1).arr(2).s("image-1").u(3).nil();
    assert_eq!(kept(&stored_with(3, true, None, image)), (vec![1], 2, 2));
    // CPU offloading's tokenless stores are cut by their blocks alone.
    assert_eq!(kept(&stored_with(3, false, None, image)), (vec![1], 0, 2));
    // Not a list: no block can be trusted.
    assert_eq!(
        kept(&stored_with(3, true, None, |w| w.u(5))),
        (vec![], 0, 3)
    );

    // Maps: `extra_keys` before `lora_name` reads the same.
    let map = W::batch(1, |w| {
        w.map(7)
            .s("extra_keys")
            .arr(2)
            .arr(1)
            .s("sql")
            .arr(2)
            .s("sql")
            .s("salt")
            .s("type")
            .s("BlockStored")
            .s("block_hashes")
            .arr(2)
            .u(1)
            .u(2)
            .s("parent_block_hash")
            .nil()
            .s("token_ids")
            .arr(4)
            .u(0)
            .u(1)
            .u(2)
            .u(3)
            .s("block_size")
            .u(2)
            .s("lora_name")
            .s("sql")
    });
    assert_eq!(kept(&map), (vec![1], 2, 1));
}
