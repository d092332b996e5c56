//! The `kv_events` target: vLLM KV-event payloads (`kv_events::decode_batch` and the
//! lenient `decode_batch_lenient` the EPP uses, both encodings) and topic frames (`kv_events::Topic::parse`), from the same bytes.

use kv_events::codec::{
    Encoder, Encoding, HashEncoding, MAX_EVENTS_PER_BATCH, MAX_HASHES_PER_EVENT, MAX_STRING_BYTES,
    MAX_TOKEN_IDS_PER_EVENT, decode_batch, decode_batch_lenient,
};
use kv_events::topic::MAX_TOPIC_BYTES;
use kv_events::{Event, EventBatch, Topic};

/// Decodes `data` as a payload and as a topic. A decoded batch keeps within the caps, and
/// re-encoding it in either encoding (hashes as ints or bytes) decodes to the same batch.
pub fn run(data: &[u8]) {
    let strict = decode_batch(data);
    let lenient = decode_batch_lenient(data);
    // Lenient decoding only skips: what the strict decoder accepts it accepts too, and when
    // it skipped nothing it read the same batch.
    if let Ok(strict) = &strict {
        let (batch, skipped) = lenient.as_ref().expect("lenient accepts what strict does");
        if skipped.is_empty() {
            assert!(same(strict, batch), "{strict:?} != {batch:?}");
        }
    }
    if let Ok((batch, _)) = &lenient {
        within_caps(batch);
    }
    if let Ok(batch) = strict {
        within_caps(&batch);
        for encoding in [Encoding::Array, Encoding::Map] {
            for hashes in [HashEncoding::Int, HashEncoding::Bytes] {
                let bytes = Encoder { encoding, hashes }
                    .encode(&batch)
                    .expect("a decoded batch is within the caps");
                let again = decode_batch(&bytes).expect("what the encoder writes decodes");
                assert!(
                    same(&batch, &again),
                    "{encoding} {hashes:?}: {batch:?} != {again:?}"
                );
            }
        }
    }
    if let Ok(topic) = Topic::parse(data) {
        assert!(data.len() <= MAX_TOPIC_BYTES);
        assert!(!topic.pod_id.is_empty() && !topic.model.is_empty());
        assert!(!topic.pod_id.contains('@') && !topic.model.contains('@'));
        assert_eq!(topic.to_string().as_bytes(), data);
    }
}

/// Asserts a decoded batch keeps within the decoder's caps.
fn within_caps(batch: &EventBatch) {
    assert!(batch.events.len() <= MAX_EVENTS_PER_BATCH);
    for e in &batch.events {
        match e {
            Event::BlockStored(b) => {
                assert!(b.block_hashes.len() <= MAX_HASHES_PER_EVENT);
                assert!(b.token_ids.len() <= MAX_TOKEN_IDS_PER_EVENT);
                assert!(
                    b.lora_name
                        .as_ref()
                        .is_none_or(|n| n.len() <= MAX_STRING_BYTES)
                );
            }
            Event::BlockRemoved(b) => assert!(b.block_hashes.len() <= MAX_HASHES_PER_EVENT),
            Event::AllBlocksCleared => {}
        }
    }
}

/// Equal, a NaN timestamp included (bit for bit).
fn same(a: &EventBatch, b: &EventBatch) -> bool {
    a.ts.to_bits() == b.ts.to_bits()
        && a.events == b.events
        && a.data_parallel_rank == b.data_parallel_rank
}
