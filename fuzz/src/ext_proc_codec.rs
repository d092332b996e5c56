//! The `ext_proc_codec` target: `codec::decode_request`, the hand-written decoder of the
//! ext_proc port, against prost's decoding of the same bytes; and `codec::encode_chunk`
//! against prost's encoding of the same body chunk.

use bytes::Bytes;
use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use ext_proc::codec::{self, Inbound};
use ext_proc::envoy::{BodyChunk, Direction};
use prost::Message;

/// Bytes as Envoy's ext_proc messages: the hand decoder gives prost's message (its body a slice
/// of the input) or fails exactly when prost fails, or refuses a message of more entries than
/// `codec::MAX_ENTRIES`. The same bytes as a body chunk (byte 0:
/// direction and end of stream) encode as prost encodes them.
pub fn run(data: &[u8]) {
    let input = Bytes::copy_from_slice(data);
    let ours = codec::decode_request(input.clone());
    let prost = ProcessingRequest::decode(input.clone());
    match (ours, prost) {
        (Ok(inbound), Ok(expected)) => {
            assert_eq!(Inbound::into_message(inbound), expected);
        }
        // More entries than Envoy sends are refused before prost (whatever prost would say):
        // two wire bytes each at least.
        (Err(status), _) if status.code() == tonic::Code::ResourceExhausted => {
            assert!(data.len() > 2 * codec::MAX_ENTRIES);
        }
        (Err(status), Err(_)) => assert_eq!(status.code(), tonic::Code::InvalidArgument),
        (ours, prost) => panic!(
            "hand decoder ok: {}, prost ok: {}",
            ours.is_ok(),
            prost.is_ok()
        ),
    }
    if let Some((&flags, body)) = data.split_first() {
        let chunk = BodyChunk {
            direction: if flags & 1 == 0 {
                Direction::Request
            } else {
                Direction::Response
            },
            body: Bytes::copy_from_slice(body),
            end_of_stream: flags & 2 != 0,
        };
        let mut ours = Vec::new();
        codec::encode_chunk(&chunk, &mut ours);
        assert_eq!(ours, chunk.into_message().encode_to_vec());
    }
}
