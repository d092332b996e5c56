use std::collections::HashMap;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::envoy::ext_proc::{HttpHeaders, HttpTrailers, ProtocolConfiguration};

fn string_struct(fields: Vec<(String, String)>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Value {
                        kind: Some(Kind::StringValue(v)),
                    },
                )
            })
            .collect(),
    }
}

fn structs() -> impl Strategy<Value = HashMap<String, Struct>> {
    proptest::collection::hash_map(
        "[a-z.]{0,8}",
        proptest::collection::vec(("[a-z]{0,6}", "[ -~]{0,12}"), 0..3).prop_map(string_struct),
        0..3,
    )
}

fn http_body() -> impl Strategy<Value = HttpBody> {
    (
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(any::<u8>(), 100..400),
        ],
        any::<[bool; 4]>(),
    )
        .prop_map(|(body, flags)| HttpBody {
            body,
            end_of_stream: flags[0],
            end_of_stream_without_message: flags[1],
            grpc_message_compressed: flags[2],
            drain_complete: flags[3],
        })
}

fn headers() -> impl Strategy<Value = HttpHeaders> {
    (
        proptest::collection::vec(("[a-z:-]{1,10}", "[ -~]{0,16}"), 0..4),
        any::<bool>(),
    )
        .prop_map(|(h, end_of_stream)| HttpHeaders {
            headers: Some(HeaderMap {
                headers: h
                    .into_iter()
                    .map(|(key, v)| HeaderValue {
                        key,
                        raw_value: v.into_bytes(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            end_of_stream,
            ..Default::default()
        })
}

fn oneof() -> impl Strategy<Value = Option<processing_request::Request>> {
    use processing_request::Request as R;
    prop_oneof![
        Just(None),
        headers().prop_map(|h| Some(R::RequestHeaders(h))),
        headers().prop_map(|h| Some(R::ResponseHeaders(h))),
        http_body().prop_map(|b| Some(R::RequestBody(b))),
        http_body().prop_map(|b| Some(R::ResponseBody(b))),
        Just(Some(R::RequestTrailers(HttpTrailers::default()))),
        Just(Some(R::ResponseTrailers(HttpTrailers::default()))),
    ]
}

fn request() -> impl Strategy<Value = ProcessingRequest> {
    (
        oneof(),
        proptest::option::of(structs()),
        structs(),
        any::<bool>(),
        proptest::option::of((0i32..4, 0i32..4, any::<bool>())),
    )
        .prop_map(
            |(request, metadata, attributes, observability_mode, protocol)| ProcessingRequest {
                request,
                metadata_context: metadata.map(|filter_metadata| Metadata {
                    filter_metadata,
                    ..Default::default()
                }),
                attributes,
                observability_mode,
                protocol_config: protocol.map(|(req, resp, send)| ProtocolConfiguration {
                    request_body_mode: req,
                    response_body_mode: resp,
                    send_body_without_waiting_for_header_response: send,
                }),
                ..Default::default()
            },
        )
}

/// The hand decoder agrees with prost on `bytes`: the same message (body put back), or both
/// fail. With `zero_copy` (well-formed input), a body must be a slice of the input.
fn agrees(bytes: &[u8], zero_copy: bool) -> Result<(), TestCaseError> {
    let input = Bytes::copy_from_slice(bytes);
    let ours = decode_request(input.clone());
    let prost = ProcessingRequest::decode(input.clone());
    match (ours, prost) {
        (Ok(inbound), Ok(expected)) => {
            if zero_copy && !inbound.body.is_empty() {
                // A slice of the received buffer, not a copy.
                let start = inbound.body.as_ptr() as usize;
                let base = input.as_ptr() as usize;
                prop_assert!(start >= base && start + inbound.body.len() <= base + input.len());
            }
            prop_assert_eq!(inbound.into_message(), expected);
        }
        (Err(status), Err(_)) => prop_assert_eq!(status.code(), tonic::Code::InvalidArgument),
        (ours, prost) => {
            prop_assert!(
                false,
                "hand decoder {:?}, prost {:?}",
                ours.is_ok(),
                prost.is_ok()
            )
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest::test_runner::Config {
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eedc0de),
        failure_persistence: None,
        ..Default::default()
    })]
    #[test]
    fn decoder_matches_prost(message in request()) {
        agrees(&message.encode_to_vec(), true)?;
    }

    /// Two messages back to back are one merged message (repeated oneof fields merge, another
    /// oneof field replaces). Not necessarily zero-copy: a message with two body fields, which
    /// Envoy never sends, is left to prost.
    #[test]
    fn decoder_matches_prost_on_merged_messages(a in request(), b in request()) {
        let mut bytes = a.encode_to_vec();
        bytes.extend(b.encode_to_vec());
        agrees(&bytes, false)?;
    }

    #[test]
    fn decoder_matches_prost_on_damaged_input(
        message in request(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        damage in 0u8..3,
    ) {
        let mut bytes = message.encode_to_vec();
        let len = bytes.len();
        if len > 0 {
            let (cut, flip) = (cut.index(len), flip.index(len));
            match damage {
                0 => bytes.truncate(cut),
                1 => bytes[flip] = byte,
                _ => {
                    bytes[flip] = byte;
                    bytes.truncate(cut + 1);
                }
            }
        }
        agrees(&bytes, false)?;
    }

    #[test]
    fn decoder_matches_prost_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        agrees(&bytes, false)?;
    }

    #[test]
    fn encoder_matches_prost(
        request_direction in any::<bool>(),
        end_of_stream in any::<bool>(),
        body in prop_oneof![
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 1..200),
            (100usize..20_000).prop_map(|n| vec![b'x'; n]),
        ],
    ) {
        let chunk = BodyChunk {
            direction: if request_direction { Direction::Request } else { Direction::Response },
            body: Bytes::from(body),
            end_of_stream,
        };
        let mut ours = Vec::new();
        encode_chunk(&chunk, &mut ours);
        prop_assert_eq!(ours, chunk.into_message().encode_to_vec());
    }
}

#[test]
fn encoder_writes_the_largest_chunk_as_prost_does() {
    for direction in [Direction::Request, Direction::Response] {
        for end_of_stream in [false, true] {
            let chunk = BodyChunk {
                direction,
                body: Bytes::from(vec![7u8; crate::envoy::BODY_CHUNK_LIMIT]),
                end_of_stream,
            };
            let mut ours = Vec::new();
            encode_answer(&Answer::Chunk(chunk.clone()), &mut ours).unwrap();
            assert_eq!(ours, chunk.into_message().encode_to_vec());
        }
    }
}

#[test]
fn a_body_after_other_oneof_fields_is_the_last_runs() {
    use processing_request::Request as R;
    let body = |b: &[u8]| ProcessingRequest {
        request: Some(R::RequestBody(HttpBody {
            body: b.to_vec(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let headers = ProcessingRequest {
        request: Some(R::RequestHeaders(HttpHeaders::default())),
        ..Default::default()
    };
    // body "a", headers, body with no body field: prost keeps an empty body.
    let mut bytes = body(b"a").encode_to_vec();
    bytes.extend(headers.encode_to_vec());
    bytes.extend(body(b"").encode_to_vec());
    let inbound = decode_request(Bytes::from(bytes)).unwrap();
    assert!(inbound.body.is_empty());
    assert!(matches!(inbound.message.request, Some(R::RequestBody(_))));
    // body "a" then body "b": merged, the last body wins.
    let mut bytes = body(b"a").encode_to_vec();
    bytes.extend(body(b"b").encode_to_vec());
    let inbound = decode_request(Bytes::from(bytes)).unwrap();
    assert_eq!(&inbound.body[..], b"b");
}

/// Found by the `ext_proc_codec` fuzz target: prost reads the map `attributes` (field 9) as
/// length-delimited whatever its wire type, so a field 9 with wire type 5 frames the rest of
/// the message differently; the hand decoder must leave such a message to prost.
#[test]
fn a_map_field_with_another_wire_type_is_read_as_prost_reads_it() {
    // prost: one map entry of 8 bytes (an unknown varint, then an unknown field 4 holding
    // "\n\x01x"). Read with wire type 5 instead, the same bytes would end in a request_body
    // whose body is "x".
    let input: &[u8] = &[0x4d, 0x08, 0x18, 0x80, 0x00, 0x22, 0x03, 0x0a, 0x01, b'x'];
    let prost = ProcessingRequest::decode(input);
    let ours = decode_request(Bytes::copy_from_slice(input));
    assert_eq!(ours.unwrap().into_message(), prost.unwrap());
}

/// A message of many empty body fields (`request_body { body: "" }` over and over) is left to
/// prost, which merges them in place, instead of costing the scan a range and a cut each
/// (tens of times the message's size); it decodes as prost decodes it.
#[test]
fn many_body_fields_are_left_to_prost() {
    for one in [
        &[0x22u8, 0x02, 0x0a, 0x00][..],
        &[0x22, 0x04, 0x0a, 0x00, 0x0a, 0x00],
    ] {
        let buf: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * 100_000)
            .collect();
        assert!(scan(&buf).is_none());
        let inbound = decode_request(Bytes::from(buf.clone())).unwrap();
        assert_eq!(
            inbound.message,
            ProcessingRequest::decode(&buf[..]).unwrap()
        );
        assert!(inbound.body.is_empty());
    }
    // One body field, as Envoy sends it: cut out as before.
    let single = ProcessingRequest {
        request: Some(processing_request::Request::RequestBody(HttpBody {
            body: b"hello".to_vec(),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
    .encode_to_vec();
    let found = scan(&single).expect("scanned");
    assert_eq!(found.cuts.len(), 1);
    assert_eq!(
        decode_request(Bytes::from(single)).unwrap().body,
        &b"hello"[..]
    );
}

/// A message of empty headers, two wire bytes each, is refused before prost builds 72 bytes
/// of `HeaderValue` for each (36 times the message); one at the cap decodes as prost decodes it.
#[test]
fn a_message_of_more_entries_than_envoy_sends_is_refused_before_prost_reads_it() {
    let message = |n: usize| {
        Bytes::from(
            ProcessingRequest {
                request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                    headers: Some(HeaderMap {
                        headers: vec![HeaderValue::default(); n],
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    };
    let at_the_cap = message(MAX_ENTRIES);
    let inbound = decode_request(at_the_cap.clone()).expect("at the cap");
    assert_eq!(
        inbound.message,
        ProcessingRequest::decode(at_the_cap).unwrap()
    );
    let status = decode_request(message(MAX_ENTRIES + 1)).unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("65536"), "{}", status.message());

    // The same through metadata: a list of empty values (a `Value` each).
    let list = Value {
        kind: Some(Kind::ListValue(
            envoy_types::pb::google::protobuf::ListValue {
                values: vec![Value::default(); MAX_ENTRIES + 1],
            },
        )),
    };
    let metadata = ProcessingRequest {
        metadata_context: Some(Metadata {
            filter_metadata: HashMap::from([(
                "ns".to_owned(),
                Struct {
                    fields: HashMap::from([("l".to_owned(), list)]),
                },
            )]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = decode_request(Bytes::from(metadata.encode_to_vec())).unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
}
