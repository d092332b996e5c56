use super::*;

fn stored(hashes: &[u64], parent: Option<u64>, block_size: u32) -> BlockStored {
    BlockStored {
        block_hashes: hashes.to_vec(),
        parent_block_hash: parent,
        token_ids: (0..hashes.len() as u32 * block_size).collect(),
        block_size,
        lora_id: None,
        lora_name: None,
        medium: Medium::Gpu,
        group: None,
    }
}

fn sample() -> EventBatch {
    EventBatch {
        ts: 1_789_095_808.837_884_7,
        events: vec![
            Event::BlockStored(stored(&[u64::MAX, 7], None, 4)),
            Event::BlockStored(BlockStored {
                lora_id: Some(3),
                lora_name: Some("sql-lora".to_owned()),
                medium: Medium::Cpu,
                ..stored(&[9], Some(7), 4)
            }),
            Event::BlockRemoved(BlockRemoved {
                block_hashes: vec![7, 9],
                medium: Medium::Gpu,
                group_idx: None,
            }),
            Event::AllBlocksCleared,
        ],
        data_parallel_rank: Some(0),
    }
}

/// A tiny msgpack writer for hand-made payloads.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn arr(self, n: u8) -> Self {
        self.raw(&[0x90 | n])
    }
    fn map(self, n: u8) -> Self {
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
}

#[test]
fn both_encodings_round_trip() {
    for encoding in [Encoding::Array, Encoding::Map] {
        for hashes in [HashEncoding::Int, HashEncoding::Bytes] {
            let enc = Encoder { encoding, hashes };
            let bytes = enc.encode(&sample()).unwrap();
            assert_eq!(
                decode_batch(&bytes).unwrap(),
                sample(),
                "{encoding} {hashes:?}"
            );
        }
    }
}

#[test]
fn the_array_encoding_is_msgspecs_bytes() {
    // [ts, [["AllBlocksCleared"], ["BlockRemoved", [1, u64::MAX], "GPU", nil]], 0]: a uint for
    // u64::MAX (0xcf), fixstr tags, float64 ts, every field written (group_idx nil).
    let batch = EventBatch {
        ts: 1.5,
        events: vec![
            Event::AllBlocksCleared,
            Event::BlockRemoved(BlockRemoved {
                block_hashes: vec![1, u64::MAX],
                medium: Medium::Gpu,
                group_idx: None,
            }),
        ],
        data_parallel_rank: Some(0),
    };
    let want = W::default()
        .arr(3)
        .f(1.5)
        .arr(2)
        .arr(1)
        .s("AllBlocksCleared")
        .arr(4)
        .s("BlockRemoved")
        .arr(2)
        .u(1)
        .raw(&[0xcf])
        .raw(&u64::MAX.to_be_bytes())
        .s("GPU")
        .nil()
        .u(0)
        .0;
    assert_eq!(Encoder::new(Encoding::Array).encode(&batch).unwrap(), want);
    let no_rank = EventBatch {
        data_parallel_rank: None,
        events: vec![],
        ..batch
    };
    // The batch is positional in both encodings: a None rank is a nil.
    assert_eq!(
        Encoder::new(Encoding::Map).encode(&no_rank).unwrap(),
        W::default().arr(3).f(1.5).arr(0).nil().0
    );
}

#[test]
fn old_arrays_without_the_optional_fields_decode() {
    // vLLM 0.9: [tag, hashes, parent, tokens, block_size] and no rank; BlockRemoved without
    // medium.
    let payload = W::default()
        .arr(2)
        .f(2.0)
        .arr(2)
        .arr(5)
        .s("BlockStored")
        .arr(1)
        .u(5)
        .nil()
        .arr(2)
        .u(1)
        .u(2)
        .u(2)
        .arr(2)
        .s("BlockRemoved")
        .arr(1)
        .u(5)
        .0;
    let batch = decode_batch(&payload).unwrap();
    assert_eq!(batch.data_parallel_rank, None);
    assert_eq!(
        batch.events,
        vec![
            Event::BlockStored(BlockStored {
                token_ids: vec![1, 2],
                ..stored(&[5], None, 2)
            }),
            Event::BlockRemoved(BlockRemoved {
                block_hashes: vec![5],
                medium: Medium::Gpu,
                group_idx: None,
            }),
        ]
    );
}

#[test]
fn newer_fields_are_read_or_skipped_in_both_encodings() {
    // Array: lora_id, medium "cpu" (any case), lora_name, then extra_keys [[...], nil],
    // group_idx 0, kv_cache_spec_kind (both read), and a future field (skipped).
    let payload = W::default()
        .arr(3)
        .f(2.0)
        .arr(1)
        .arr(13)
        .s("BlockStored")
        .arr(1)
        .u(5)
        .u(4)
        .arr(0)
        .u(16)
        .nil()
        .s("cpu")
        .nil()
        .arr(2)
        .arr(2)
        .s("salt")
        .map(1)
        .s("k")
        .arr(0)
        .nil()
        .u(0)
        .s("full_attention")
        .raw(&[0xcc, 128])
        .raw(&[0xd6, 0x01, 0, 0, 0, 0]) // fixext4: an unknown extension type
        .u(1)
        .0;
    let batch = decode_batch(&payload).unwrap();
    assert_eq!(batch.data_parallel_rank, Some(1));
    let Event::BlockStored(b) = &batch.events[0] else {
        panic!("{batch:?}")
    };
    assert_eq!(b.medium, Medium::Cpu);
    assert_eq!(b.parent_block_hash, Some(4));
    assert!(b.token_ids.is_empty());
    assert_eq!(
        b.group,
        Some(CacheGroup {
            index: 0,
            kind: Some(CacheKind::FullAttention)
        })
    );

    // Map: keys in any order, the tag last, group_idx read, unknown keys (locality, extra_keys)
    // skipped.
    let payload = W::default()
        .arr(3)
        .f(2.0)
        .arr(1)
        .map(7)
        .s("group_idx")
        .u(0)
        .s("block_hashes")
        .arr(1)
        .u(9)
        .s("extra_keys")
        .arr(1)
        .nil()
        .s("medium")
        .nil()
        .s("locality")
        .s("local")
        .s("lora_name")
        .s("a")
        .s("type")
        .s("BlockRemoved")
        .u(0)
        .0;
    let batch = decode_batch(&payload).unwrap();
    assert_eq!(
        batch.events,
        vec![Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![9],
            medium: Medium::Gpu,
            group_idx: Some(0),
        })]
    );
}

#[test]
fn a_map_batch_decodes() {
    let payload = W::default()
        .map(3)
        .s("events")
        .arr(1)
        .map(1)
        .s("type")
        .s("AllBlocksCleared")
        .s("ts")
        .f(3.0)
        .s("data_parallel_rank")
        .u(2)
        .0;
    let batch = decode_batch(&payload).unwrap();
    assert_eq!(batch.ts, 3.0);
    assert_eq!(batch.events, vec![Event::AllBlocksCleared]);
    assert_eq!(batch.data_parallel_rank, Some(2));
}

#[test]
fn hashes_fold_from_every_form() {
    let mut digest = [0u8; 32];
    digest[24..].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    let payload = W::default()
        .arr(2)
        .f(0.0)
        .arr(1)
        .arr(3)
        .s("BlockRemoved")
        .arr(5)
        .raw(&[0xc4, 32])
        .raw(&digest) // a SHA-256 digest: its last 8 bytes
        .raw(&[0xc4, 2, 0xab, 0xcd]) // short: zero-padded on the left
        .raw(&[0xd3])
        .raw(&(-2i64).to_be_bytes()) // negative int64: two's complement
        .raw(&[0xff]) // negative fixint -1
        .raw(&[0xcd, 0x01, 0x00]) // uint16 256
        .s("GPU")
        .0;
    let batch = decode_batch(&payload).unwrap();
    assert_eq!(
        batch.events,
        vec![Event::BlockRemoved(BlockRemoved {
            block_hashes: vec![0x0102_0304_0506_0708, 0xabcd, (-2i64) as u64, u64::MAX, 256],
            medium: Medium::Gpu,
            group_idx: None,
        })]
    );
}

fn removed_with(hash: &[u8], medium: &str) -> Vec<u8> {
    W::default()
        .arr(2)
        .f(0.0)
        .arr(1)
        .arr(3)
        .s("BlockRemoved")
        .arr(1)
        .raw(hash)
        .s(medium)
        .0
}

#[test]
fn bad_payloads_are_errors() {
    let ok = Encoder::new(Encoding::Array).encode(&sample()).unwrap();
    // Every strict prefix is truncated.
    for cut in 0..ok.len() {
        assert!(decode_batch(&ok[..cut]).is_err(), "prefix {cut}");
    }
    let mut trailing = ok.clone();
    trailing.push(0xc0);
    assert_eq!(
        decode_batch(&trailing),
        Err(DecodeError::TrailingBytes { trailing: 1 })
    );
    assert_eq!(
        decode_batch(&removed_with(&[1], "TAPE")),
        Err(DecodeError::UnknownMedium("TAPE".to_owned()))
    );
    assert_eq!(
        decode_batch(&removed_with(&[0xc4, 0], "GPU")),
        Err(DecodeError::EmptyHash {
            what: "block_hashes"
        })
    );
    assert!(matches!(
        decode_batch(&removed_with(&[0xc3], "GPU")),
        Err(DecodeError::UnexpectedType { .. })
    ));
    let unknown = W::default().arr(2).f(0.0).arr(1).arr(1).s("BlockMoved").0;
    assert_eq!(
        decode_batch(&unknown),
        Err(DecodeError::UnknownEventType("BlockMoved".to_owned()))
    );
    // A tag or medium holding control characters is escaped before it reaches an error (which
    // is logged; `Untrusted`'s own tests cover the truncation).
    let forged = W::default()
        .arr(2)
        .f(0.0)
        .arr(1)
        .arr(1)
        .s("X\nINFO forged\x1b[31m")
        .0;
    let Err(e) = decode_batch(&forged) else {
        panic!("an unknown tag decodes");
    };
    let shown = e.to_string();
    assert!(!shown.chars().any(char::is_control), "{shown:?}");
    assert_eq!(shown, "unknown event type \"X\\nINFO forged\\u{1b}[31m\"");
    assert_eq!(
        decode_batch(&removed_with(&[1], "\r\"")),
        Err(DecodeError::UnknownMedium("\\r\\\"".to_owned()))
    );
    let missing = W::default()
        .arr(2)
        .f(0.0)
        .arr(1)
        .arr(3)
        .s("BlockStored")
        .arr(0)
        .nil()
        .0;
    assert_eq!(
        decode_batch(&missing),
        Err(DecodeError::Missing { what: "token_ids" })
    );
    let untagged = W::default()
        .arr(2)
        .f(0.0)
        .arr(1)
        .map(1)
        .s("block_hashes")
        .arr(0)
        .0;
    assert_eq!(
        decode_batch(&untagged),
        Err(DecodeError::Missing { what: "type" })
    );
    let twice = W::default()
        .arr(2)
        .f(0.0)
        .arr(1)
        .map(3)
        .s("type")
        .s("BlockRemoved")
        .s("block_hashes")
        .arr(0)
        .s("block_hashes")
        .arr(0)
        .0;
    assert_eq!(
        decode_batch(&twice),
        Err(DecodeError::Duplicate {
            what: "block_hashes"
        })
    );
    let token_too_big = W::default()
        .arr(2)
        .f(0.0)
        .arr(1)
        .arr(5)
        .s("BlockStored")
        .arr(0)
        .nil()
        .arr(1)
        .raw(&[0xcf])
        .raw(&(1u64 << 40).to_be_bytes())
        .u(16)
        .0;
    assert!(matches!(
        decode_batch(&token_too_big),
        Err(DecodeError::OutOfRange {
            what: "token_ids",
            ..
        })
    ));
}

#[test]
fn length_headers_alone_allocate_nothing_and_caps_hold() {
    // An array32 of 2^32-1 events in a 10-byte payload: refused before any allocation.
    let huge = W::default()
        .arr(2)
        .f(0.0)
        .raw(&[0xdd, 0xff, 0xff, 0xff, 0xff])
        .0;
    assert_eq!(
        decode_batch(&huge),
        Err(DecodeError::TooLong {
            what: "events",
            len: u32::MAX as usize,
            cap: MAX_EVENTS_PER_BATCH
        })
    );
    // Under the cap but longer than the bytes left: truncated.
    let short = W::default().arr(2).f(0.0).raw(&[0xdc, 0x10, 0x00]).0;
    assert!(matches!(
        decode_batch(&short),
        Err(DecodeError::Truncated { .. })
    ));
    // A map32 header in a skipped field.
    let skipped = W::default()
        .arr(4)
        .f(0.0)
        .arr(0)
        .nil()
        .raw(&[0xdf, 0xff, 0xff, 0xff, 0xff])
        .0;
    assert!(matches!(
        decode_batch(&skipped),
        Err(DecodeError::Truncated { .. })
    ));
    // Deep nesting in a skipped field costs no stack: 100,000 nested arrays.
    let mut deep = W::default().arr(4).f(0.0).arr(0).nil().0;
    deep.extend(std::iter::repeat_n(0x91, 100_000));
    deep.push(0xc0);
    assert!(decode_batch(&deep).is_ok());
    // A string over the cap.
    let mut long = W::default()
        .arr(2)
        .f(0.0)
        .arr(1)
        .arr(1)
        .raw(&[0xda, 0x08, 0x00])
        .0;
    long.extend(std::iter::repeat_n(b'a', 0x800));
    assert_eq!(
        decode_batch(&long),
        Err(DecodeError::TooLong {
            what: "event tag",
            len: 0x800,
            cap: MAX_STRING_BYTES
        })
    );
}

#[test]
fn the_encoder_refuses_what_the_decoder_would() {
    let batch = EventBatch {
        ts: 0.0,
        events: vec![Event::AllBlocksCleared; MAX_EVENTS_PER_BATCH + 1],
        data_parallel_rank: None,
    };
    assert!(matches!(
        Encoder::default().encode(&batch),
        Err(EncodeError::TooLong { what: "events", .. })
    ));
}

#[test]
fn encodings_parse_from_their_names() {
    for e in [Encoding::Array, Encoding::Map] {
        assert_eq!(e.as_str().parse::<Encoding>(), Ok(e));
    }
    assert!("arrays".parse::<Encoding>().is_err());
    assert_eq!(Encoding::default(), Encoding::Map);
}
