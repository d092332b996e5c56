//! The wire test against vLLM's own definitions: batches that msgspec writes with vLLM's
//! structs (tools/kv-events/vllm_kv_events.py, both encodings, every hash form) decode here to
//! what they mean; what the Rust encoder writes is byte for byte what msgspec writes, and
//! msgspec decodes it (ints and bytes hashes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use kv_events::codec::{Encoder, Encoding, HashEncoding, decode_batch};
use support::msgspec::{neutral, script, temp_dir};

#[test]
fn msgspec_batches_decode_in_rust_and_rust_batches_in_msgspec() {
    let Some(script) = script() else { return };
    let dir = temp_dir("msgspec-wire");
    script.run(&["write", &dir.display().to_string()]);
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();

    for (encoding, name) in [(Encoding::Array, "array"), (Encoding::Map, "map")] {
        for (fixture, suffix) in [("rich", ""), ("canonical", "-canonical")] {
            let file = dir.join(format!("{name}{suffix}.msgpack"));
            let payload = std::fs::read(&file).unwrap();
            let batch =
                decode_batch(&payload).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(neutral(&batch), expected[fixture], "{}", file.display());
            if fixture == "canonical" {
                // The Rust encoder writes msgspec's exact bytes.
                assert_eq!(
                    Encoder::new(encoding).encode(&batch).unwrap(),
                    payload,
                    "{}",
                    file.display()
                );
                // And msgspec reads what Rust writes, with hashes as ints or bytes.
                for hashes in [HashEncoding::Int, HashEncoding::Bytes] {
                    let out = dir.join(format!("rust-{name}-{hashes:?}.msgpack"));
                    let bytes = Encoder { encoding, hashes }.encode(&batch).unwrap();
                    std::fs::write(&out, bytes).unwrap();
                    let decoded = script.decode(name, &[out]);
                    assert_eq!(decoded[0], expected[fixture], "{name} {hashes:?}");
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
