//! Harness for `endpoint_picker::kv_index::peers::decode`: the speculative-entry messages
//! other EPP replicas publish (msgpack `[1, "<ip>:<port>", [key, …]]`, from the network).
//!
//! Shared by the `peer_message` fuzz target and `endpoint-picker/tests/fuzz_regressions.rs`.
//! The same invariants as the module's property tests (`any_bytes_decode_within_the_caps`,
//! `messages_round_trip`), on coverage-guided inputs.
//!
//! Invariants: no panic; longer than `MAX_PEER_MESSAGE_BYTES` is refused; a decoded message
//! has at most `MAX_PEER_KEYS` keys and fewer keys than the input has bytes; it re-encodes
//! within `MAX_PEER_MESSAGE_BYTES` to bytes that decode to the same message and encode again
//! to the same bytes.

use endpoint_picker::kv_index::peers::{
    MAX_PEER_KEYS, MAX_PEER_MESSAGE_BYTES, PeerDecodeError, decode, encode,
};

pub fn run(data: &[u8]) {
    match decode(data) {
        Ok(msg) => {
            assert!(data.len() <= MAX_PEER_MESSAGE_BYTES);
            assert!(msg.keys.len() <= MAX_PEER_KEYS);
            assert!(
                msg.keys.len() < data.len(),
                "each key takes a byte at least"
            );
            let bytes = encode(&msg);
            assert!(bytes.len() <= MAX_PEER_MESSAGE_BYTES, "{msg:?}");
            let again = decode(&bytes).expect("what the encoder writes decodes");
            assert_eq!(again, msg);
            assert_eq!(encode(&again), bytes, "the encoding is canonical");
        }
        Err(PeerDecodeError::TooLong(n)) => {
            assert_eq!(n, data.len());
            assert!(n > MAX_PEER_MESSAGE_BYTES);
        }
        Err(_) => assert!(data.len() <= MAX_PEER_MESSAGE_BYTES),
    }
}
