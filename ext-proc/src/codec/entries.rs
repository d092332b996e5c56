//! How many list and map entries prost would build from a `ProcessingRequest`, counted before
//! it decodes one.
//!
//! prost allocates a whole element for every entry of a repeated or map field: 72 bytes for a
//! `HeaderValue`, a hash-table slot of a key and a `Struct` for a metadata or attribute entry,
//! a `Value` in a `ListValue`, and the vector or table they sit in doubles as it grows. An empty
//! entry is two bytes on the wire, so a message of nothing but empty headers costs prost some
//! 36 times its size, about 2.3 GB for one message under the 64 MiB decode cap, and every stream
//! on the port can send one. Envoy sends at most its `max_headers_count` headers (100 by
//! default) and a few metadata namespaces and attributes; [`MAX_ENTRIES`] is hundreds of times
//! that, so a message over it is refused before prost allocates anything.
//!
//! Only the fields that make entries are followed (headers, trailers, attributes, metadata and
//! the `Struct` / `ListValue` / `Value` trees inside them); a body is skipped by its length. The
//! walk reads each byte of framing once and allocates nothing. Framing it cannot read ends the
//! count of that message level: prost refuses the same bytes, after at most the entries before.

use prost::encoding::decode_varint;

/// The most entries (headers and trailers, attribute and metadata entries, `Struct` fields,
/// `ListValue` values, together) one ext_proc message may hold: at most about 11 MiB of prost's
/// elements and their tables' slack.
pub const MAX_ENTRIES: usize = 65_536;

/// An entry is at least a one-byte key and a one-byte length: below this size no message can
/// hold more than [`MAX_ENTRIES`], and none is walked.
pub(crate) const SMALLEST_OVER_THE_CAP: usize = 2 * (MAX_ENTRIES + 1);

/// prost refuses messages nested deeper than 100; deeper framing is not followed.
const DEPTH_LIMIT: u32 = 100;

/// The message types on the way to entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Message {
    /// `envoy.service.ext_proc.v3.ProcessingRequest`.
    Request,
    /// `HttpHeaders`: `headers` = 1, `attributes` = 2.
    Headers,
    /// `HttpTrailers`: `trailers` = 1.
    Trailers,
    /// `envoy.config.core.v3.HeaderMap`: `headers` = 1, each an entry.
    HeaderMap,
    /// `envoy.config.core.v3.Metadata`: `filter_metadata` = 1, `typed_filter_metadata` = 2.
    Metadata,
    /// A `map<string, Struct>` entry: `value` = 2.
    StructEntry,
    /// `google.protobuf.Struct`: `fields` = 1, map entries of `Value`s.
    Struct,
    /// A `map<string, Value>` entry: `value` = 2.
    ValueEntry,
    /// `google.protobuf.Value`: `struct_value` = 5, `list_value` = 6.
    Value,
    /// `google.protobuf.ListValue`: `values` = 1, each an entry.
    ListValue,
}

/// What a length-delimited field of `parent` holds: whether it is an entry, and the message to
/// follow into (`None`: a leaf, or a field without entries below it).
fn field(parent: Message, number: u64) -> (bool, Option<Message>) {
    use Message as M;
    match (parent, number) {
        (M::Request, 2 | 3) => (false, Some(M::Headers)),
        (M::Request, 6 | 7) => (false, Some(M::Trailers)),
        (M::Request, 8) => (false, Some(M::Metadata)),
        (M::Request, 9) | (M::Headers, 2) | (M::Metadata, 1) => (true, Some(M::StructEntry)),
        (M::Headers, 1) | (M::Trailers, 1) => (false, Some(M::HeaderMap)),
        // A typed metadata entry: a key and an `Any`, its bytes not decoded further.
        (M::HeaderMap, 1) | (M::Metadata, 2) => (true, None),
        (M::StructEntry, 2) | (M::Value, 5) => (false, Some(M::Struct)),
        (M::Struct, 1) => (true, Some(M::ValueEntry)),
        (M::ValueEntry, 2) => (false, Some(M::Value)),
        (M::Value, 6) => (false, Some(M::ListValue)),
        (M::ListValue, 1) => (true, Some(M::Value)),
        _ => (false, None),
    }
}

/// Whether `buf`, a `ProcessingRequest`, holds more than [`MAX_ENTRIES`] entries.
pub(crate) fn over_the_cap(buf: &[u8]) -> bool {
    if buf.len() < SMALLEST_OVER_THE_CAP {
        return false;
    }
    let mut count = 0;
    walk(buf, Message::Request, 0, &mut count);
    count > MAX_ENTRIES
}

/// Adds the entries of `buf`, a `message`, to `count`; stops once it is over the cap.
fn walk(mut buf: &[u8], message: Message, depth: u32, count: &mut usize) {
    while !buf.is_empty() && *count <= MAX_ENTRIES {
        let Ok(key) = decode_varint(&mut buf) else {
            return;
        };
        let skip = match key & 7 {
            0 => {
                if decode_varint(&mut buf).is_err() {
                    return;
                }
                0
            }
            1 => 8,
            2 => match decode_varint(&mut buf).map(usize::try_from) {
                Ok(Ok(len)) => len,
                _ => return,
            },
            // A group: prost skips one on a field it does not know and reads on after it (on a
            // known field it refuses the message), so the walk does too: what follows counts.
            3 => {
                if skip_group(&mut buf, key >> 3, depth).is_none() {
                    return;
                }
                continue;
            }
            5 => 4,
            // An end of group with no group open, invalid wire types: prost refuses them.
            _ => return,
        };
        let Some((payload, rest)) = buf.split_at_checked(skip) else {
            return;
        };
        buf = rest;
        if key & 7 != 2 {
            continue;
        }
        let (entry, inner) = field(message, key >> 3);
        if entry {
            *count += 1;
        }
        if let Some(inner) = inner
            && depth < DEPTH_LIMIT
        {
            walk(payload, inner, depth + 1, count);
        }
    }
}

/// Moves `buf` past the group of field `number` whose start it has just read, as prost skips
/// one: fields up to the matching end, groups inside it skipped alike. `None` for framing prost
/// refuses (an end of another field, a group deeper than prost's recursion limit).
fn skip_group(buf: &mut &[u8], number: u64, depth: u32) -> Option<()> {
    if depth >= DEPTH_LIMIT {
        return None;
    }
    loop {
        let key = decode_varint(buf).ok()?;
        match key & 7 {
            0 => {
                decode_varint(buf).ok()?;
            }
            1 => *buf = buf.get(8..)?,
            2 => {
                let len = usize::try_from(decode_varint(buf).ok()?).ok()?;
                *buf = buf.get(len..)?;
            }
            3 => skip_group(buf, key >> 3, depth + 1)?,
            4 => return (key >> 3 == number).then_some(()),
            5 => *buf = buf.get(4..)?,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
    use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
    use prost::Message as _;

    use super::*;
    use crate::envoy::ext_proc::{
        HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, processing_request,
    };

    fn count(buf: &[u8]) -> usize {
        let mut count = 0;
        walk(buf, Message::Request, 0, &mut count);
        count
    }

    fn headers(n: usize) -> HeaderMap {
        HeaderMap {
            headers: (0..n)
                .map(|i| HeaderValue {
                    key: format!("x-{i}"),
                    raw_value: b"v".to_vec(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn list(n: usize) -> Value {
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![Value::default(); n],
            })),
        }
    }

    /// Every kind of entry is counted where prost would build it: headers, trailers,
    /// attributes, metadata (plain and typed), `Struct` fields and list values, nested.
    #[test]
    fn entries_are_counted_where_prost_builds_them() {
        let nested = Struct {
            fields: HashMap::from([
                ("list".to_owned(), list(3)),
                (
                    "inner".to_owned(),
                    Value {
                        kind: Some(Kind::StructValue(Struct {
                            fields: HashMap::from([("deep".to_owned(), list(2))]),
                        })),
                    },
                ),
            ]),
        };
        let message = ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                headers: Some(headers(5)),
                attributes: HashMap::from([("a".to_owned(), Struct::default())]),
                end_of_stream: true,
            })),
            metadata_context: Some(Metadata {
                filter_metadata: HashMap::from([("ns".to_owned(), nested)]),
                typed_filter_metadata: HashMap::from([("t".to_owned(), Default::default())]),
            }),
            attributes: HashMap::from([("b".to_owned(), Struct::default())]),
            ..Default::default()
        };
        // 5 headers, 1 + 1 attributes, the typed entry, the `ns` entry, its 2 fields, the
        // list's 3 values, `inner`'s 1 field and its list's 2 values.
        assert_eq!(
            count(&message.encode_to_vec()),
            5 + 2 + 1 + 1 + 2 + 3 + 1 + 2
        );

        let trailers = ProcessingRequest {
            request: Some(processing_request::Request::ResponseTrailers(
                HttpTrailers {
                    trailers: Some(headers(7)),
                },
            )),
            ..Default::default()
        };
        assert_eq!(count(&trailers.encode_to_vec()), 7);
    }

    /// A body is skipped by its length, whatever its bytes look like.
    #[test]
    fn a_body_holds_no_entries() {
        let body: Vec<u8> = [0x0au8, 0x00].repeat(MAX_ENTRIES * 2);
        let message = ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(HttpBody {
                body,
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        };
        let bytes = message.encode_to_vec();
        assert_eq!(count(&bytes), 0);
        assert!(!over_the_cap(&bytes));
    }

    /// Empty headers, two bytes each: one over the cap is refused, the cap itself is not.
    #[test]
    fn the_cap_is_on_entries_not_bytes() {
        let message = |n: usize| {
            ProcessingRequest {
                request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                    headers: Some(HeaderMap {
                        headers: vec![HeaderValue::default(); n],
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert!(!over_the_cap(&message(MAX_ENTRIES)));
        assert!(over_the_cap(&message(MAX_ENTRIES + 1)));
        // Small messages are not walked: no message under the size can be over.
        assert!(message(MAX_ENTRIES + 1).len() >= SMALLEST_OVER_THE_CAP);
    }

    /// A group on a field prost does not know is skipped as prost skips it, and the entries
    /// after it still count: a group first must not hide a flood of headers behind it, at the
    /// top level or inside a header map.
    #[test]
    fn entries_after_a_skipped_group_still_count() {
        let headers = ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap {
                    headers: vec![HeaderValue::default(); MAX_ENTRIES + 1],
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
        .encode_to_vec();
        // Field 99, an empty group, and one holding a nested group and a varint.
        let empty_group = [0x9b, 0x06, 0x9c, 0x06];
        let nested = [0x9b, 0x06, 0xa3, 0x06, 0xa4, 0x06, 0x08, 0x01, 0x9c, 0x06];
        for group in [&empty_group[..], &nested[..]] {
            let mut bytes = group.to_vec();
            bytes.extend_from_slice(&headers);
            assert!(
                ProcessingRequest::decode(&bytes[..]).is_ok(),
                "prost reads past it"
            );
            assert!(over_the_cap(&bytes), "{group:02x?}");
        }
        // Inside the header map, before its entries.
        let map: Vec<u8> = empty_group
            .iter()
            .copied()
            .chain([0x0au8, 0x00].repeat(MAX_ENTRIES + 1))
            .collect();
        let mut http_headers = vec![0x0a];
        prost::encoding::encode_varint(map.len() as u64, &mut http_headers);
        http_headers.extend_from_slice(&map);
        let mut bytes = vec![0x12];
        prost::encoding::encode_varint(http_headers.len() as u64, &mut bytes);
        bytes.extend_from_slice(&http_headers);
        assert!(ProcessingRequest::decode(&bytes[..]).is_ok());
        assert!(over_the_cap(&bytes));
        // An end of group with no group open, or of another field: prost refuses, the walk stops.
        assert!(ProcessingRequest::decode(&[0x9c, 0x06][..]).is_err());
        assert!(ProcessingRequest::decode(&[0x9b, 0x06, 0xa4, 0x06][..]).is_err());
        assert_eq!(count(&[0x9b, 0x06, 0xa4, 0x06]), 0);
    }

    /// Broken framing ends the count at that level, and a nesting deeper than prost reads is
    /// not followed (prost refuses it); neither panics nor loops.
    #[test]
    fn damaged_and_deep_framing_end_the_walk() {
        let mut bytes = ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
                headers: Some(headers(3)),
                ..Default::default()
            })),
            ..Default::default()
        }
        .encode_to_vec();
        for cut in 0..bytes.len() {
            assert!(count(&bytes[..cut]) <= 3);
        }
        bytes.push(0xff);
        assert_eq!(count(&bytes), 3);

        let mut deep = list(1);
        for _ in 0..200 {
            deep = Value {
                kind: Some(Kind::ListValue(ListValue { values: vec![deep] })),
            };
        }
        let message = ProcessingRequest {
            attributes: HashMap::from([(
                "a".to_owned(),
                Struct {
                    fields: HashMap::from([("v".to_owned(), deep)]),
                },
            )]),
            ..Default::default()
        };
        let n = count(&message.encode_to_vec());
        assert!(n > 10 && n < 100, "{n}");
    }
}
