//! Envoy ext_proc message construction and inspection. Protobuf types stay in this crate; the
//! names these messages carry are in [`crate::protocol`].

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
pub use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
pub use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
pub use envoy_types::pb::envoy::service::ext_proc::v3 as ext_proc;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use ext_proc::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation, processing_response,
};

use crate::protocol::{
    DESTINATION_ENDPOINT, DESTINATION_SCORES, DESTINATION_SUBSET, LB_NAMESPACE,
    SUBSET_HINT_NAMESPACE,
};

/// Largest streamed body chunk: some Envoy builds limit a streamed chunk to 64 KiB.
pub const BODY_CHUNK_LIMIT: usize = 62_000;

/// Reads a header map into `(lower-case name, value)` pairs; `raw_value` wins over `value`.
pub fn headers(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    let Some(map) = map else { return Vec::new() };
    map.headers
        .iter()
        .map(|h| {
            let value = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            (h.key.to_ascii_lowercase(), value)
        })
        .collect()
}

/// A header that overwrites any existing value.
pub fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// A string from `filter_metadata[namespace][key]`.
pub fn metadata_string(md: Option<&Metadata>, namespace: &str, key: &str) -> Option<String> {
    match md?
        .filter_metadata
        .get(namespace)?
        .fields
        .get(key)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// What a response's `content-type` says its body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// An SSE stream (`text/event-stream`).
    EventStream,
    /// One JSON document (`application/json`, `…+json` but `…stream+json`): a whole answer,
    /// also to a request that asked for a stream (an engine's error answer, or one that
    /// ignores `stream`).
    Json,
    /// Neither, or no `content-type`: what the request asked for.
    Unknown,
}

impl ResponseBody {
    /// Whether the answer is streamed, given that the request asked for a stream or not.
    pub fn streamed(self, requested: bool) -> bool {
        match self {
            ResponseBody::EventStream => true,
            ResponseBody::Json => false,
            ResponseBody::Unknown => requested,
        }
    }
}

/// What the EPP reads of a response's headers: its `:status`, and what its `content-type`
/// says the body is.
pub fn response_head(h: &ext_proc::HttpHeaders) -> (Option<String>, ResponseBody) {
    let headers = headers(h.headers.as_ref());
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    (
        get(":status").map(str::to_owned),
        get("content-type").map_or(ResponseBody::Unknown, response_body_kind),
    )
}

/// The body a `content-type` names, by its media type alone (parameters such as `charset`
/// ignored, case ignored): `application/json` and `…+json` are one document, but not the
/// streaming JSON types (`application/x-ndjson`, `application/jsonl`, `…/json-seq`,
/// `…stream+json`), which are streams the request's flag decides for.
pub fn response_body_kind(content_type: &str) -> ResponseBody {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "text/event-stream" {
        ResponseBody::EventStream
    } else if media == "application/json"
        || (media.ends_with("+json") && !media.ends_with("stream+json"))
    {
        ResponseBody::Json
    } else {
        ResponseBody::Unknown
    }
}

/// The subset hint: `None` when absent; a list (or a comma string) when present.
pub fn subset_hint(md: Option<&Metadata>) -> Option<Vec<String>> {
    let value = md?
        .filter_metadata
        .get(SUBSET_HINT_NAMESPACE)?
        .fields
        .get(DESTINATION_SUBSET)?;
    Some(match value.kind.as_ref() {
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        Some(Kind::StringValue(s)) => s
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect(),
        _ => Vec::new(),
    })
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": destination}}`.
pub fn destination_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_ENDPOINT.to_owned(), string_value(destination))]
            .into_iter()
            .collect(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// Adds a routed request's observer tag ([`crate::observer`]) to the dynamic metadata of
/// [`destination_metadata`], in its own namespace.
pub fn add_observer_tag(metadata: &mut Struct, tag: &crate::observer::ObserverTag) {
    use crate::observer::{
        OBSERVER_FAIRNESS_KEY, OBSERVER_ID_KEY, OBSERVER_INSTANCE_KEY, OBSERVER_MODEL_KEY,
        OBSERVER_NAMESPACE, OBSERVER_PRIORITY_KEY, OBSERVER_STARTED_KEY, OBSERVER_STREAM_KEY,
        OBSERVER_TARGET_MODEL_KEY,
    };
    let inner = Struct {
        fields: [
            (OBSERVER_ID_KEY, format!("{:016x}", tag.id)),
            (OBSERVER_INSTANCE_KEY, format!("{:016x}", tag.instance)),
            (OBSERVER_MODEL_KEY, tag.model.clone()),
            (OBSERVER_TARGET_MODEL_KEY, tag.target_model.clone()),
            (OBSERVER_FAIRNESS_KEY, tag.fairness_id.clone()),
            (OBSERVER_STARTED_KEY, tag.started_us.to_string()),
            (OBSERVER_STREAM_KEY, tag.streaming.to_string()),
        ]
        .into_iter()
        .chain(tag.priority.map(|p| (OBSERVER_PRIORITY_KEY, p.to_string())))
        .map(|(k, v)| (k.to_owned(), string_value(&v)))
        .collect(),
    };
    metadata.fields.insert(
        OBSERVER_NAMESPACE.to_owned(),
        Value {
            kind: Some(Kind::StructValue(inner)),
        },
    );
}

/// Adds `x-gateway-destination-endpoint-scores` (endpoint `ip:port` → score) to the `envoy.lb`
/// struct of [`destination_metadata`] (`--emit-endpoint-scores`, the reference's opt-in).
pub fn add_endpoint_scores<'a>(
    metadata: &mut Struct,
    scores: impl IntoIterator<Item = (&'a str, f64)>,
) {
    let scores = Struct {
        fields: scores
            .into_iter()
            .map(|(endpoint, score)| {
                (
                    endpoint.to_owned(),
                    Value {
                        kind: Some(Kind::NumberValue(score)),
                    },
                )
            })
            .collect(),
    };
    if let Some(Value {
        kind: Some(Kind::StructValue(lb)),
    }) = metadata.fields.get_mut(LB_NAMESPACE)
    {
        lb.fields.insert(
            DESTINATION_SCORES.to_owned(),
            Value {
                kind: Some(Kind::StructValue(scores)),
            },
        );
    }
}

/// A request-headers response carrying routing.
pub fn request_headers_response(
    set: Vec<HeaderValueOption>,
    remove: Vec<String>,
    metadata: Option<Struct>,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: set,
                        remove_headers: remove,
                    }),
                    clear_route_cache: true,
                    ..Default::default()
                }),
            },
        )),
        dynamic_metadata: metadata,
        ..Default::default()
    }
}

/// A request-headers response that changes nothing: on the BUFFERED request path the headers
/// are answered at once, and Envoy holds them (still mutable) until the body's answer.
pub fn continue_request_headers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse {
                response: Some(CommonResponse::default()),
            },
        )),
        ..Default::default()
    }
}

/// The routing answer of the BUFFERED request path: one request-body response carrying what
/// [`request_headers_response`] carries on the streamed path (header mutations apply to the
/// request headers Envoy still holds; `clear_route_cache`; `dynamic_metadata`) and, when the
/// body changed, the whole new body. The caller sets `content-length` to the new body's length
/// in `set`: Envoy refuses a body mutation whose length differs from the held header.
pub fn request_body_response(
    set: Vec<HeaderValueOption>,
    remove: Vec<String>,
    metadata: Option<Struct>,
    new_body: Option<Bytes>,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestBody(BodyResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation {
                    set_headers: set,
                    remove_headers: remove,
                }),
                body_mutation: new_body.map(|body| BodyMutation {
                    mutation: Some(body_mutation::Mutation::Body(body.into())),
                }),
                clear_route_cache: true,
                ..Default::default()
            }),
        })),
        dynamic_metadata: metadata,
        ..Default::default()
    }
}

/// A request-body response that changes nothing (BUFFERED path: the body goes on as it is).
pub fn continue_request_body() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestBody(BodyResponse {
            response: Some(CommonResponse::default()),
        })),
        ..Default::default()
    }
}

/// A response-headers response, optionally adding headers.
pub fn response_headers_response(set: Vec<HeaderValueOption>) -> ProcessingResponse {
    let header_mutation = (!set.is_empty()).then(|| HeaderMutation {
        set_headers: set,
        remove_headers: Vec::new(),
    });
    ProcessingResponse {
        response: Some(processing_response::Response::ResponseHeaders(
            HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation,
                    ..Default::default()
                }),
            },
        )),
        ..Default::default()
    }
}

/// Which direction a body belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → model server.
    Request,
    /// Model server → client.
    Response,
}

/// One streamed body chunk to send back (a `streamed_response` body message), kept as `Bytes`:
/// the codec (`crate::codec`) writes it into the output buffer itself, so the chunk is not
/// copied into a protobuf `Vec<u8>` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyChunk {
    /// The body's direction.
    pub direction: Direction,
    /// The chunk's bytes.
    pub body: Bytes,
    /// Whether it ends the body.
    pub end_of_stream: bool,
}

impl BodyChunk {
    /// The chunk as a prost message (copies the bytes unless they are a whole, unshared
    /// buffer).
    pub fn into_message(self) -> ProcessingResponse {
        let body = BodyResponse {
            response: Some(CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(body_mutation::Mutation::StreamedResponse(
                        StreamedBodyResponse {
                            body: Vec::from(self.body),
                            end_of_stream: self.end_of_stream,
                            ..Default::default()
                        },
                    )),
                }),
                ..Default::default()
            }),
        };
        ProcessingResponse {
            response: Some(match self.direction {
                Direction::Request => processing_response::Response::RequestBody(body),
                Direction::Response => processing_response::Response::ResponseBody(body),
            }),
            ..Default::default()
        }
    }
}

impl From<BodyChunk> for ProcessingResponse {
    fn from(chunk: BodyChunk) -> Self {
        chunk.into_message()
    }
}

/// One answer to Envoy: a prost message, or a body chunk the codec writes by hand.
// Boxing the message would cost an allocation per answer; a few answers live at a time.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Any answer but a streamed body chunk.
    Message(ProcessingResponse),
    /// A streamed body chunk.
    Chunk(BodyChunk),
}

impl Answer {
    /// The answer as a prost message (a chunk's bytes are copied).
    pub fn into_message(self) -> ProcessingResponse {
        match self {
            Answer::Message(message) => message,
            Answer::Chunk(chunk) => chunk.into_message(),
        }
    }
}

impl From<ProcessingResponse> for Answer {
    fn from(message: ProcessingResponse) -> Self {
        Answer::Message(message)
    }
}

impl From<BodyChunk> for Answer {
    fn from(chunk: BodyChunk) -> Self {
        Answer::Chunk(chunk)
    }
}

/// One `streamed_response` body message.
pub fn body_chunk(direction: Direction, chunk: Bytes, end_of_stream: bool) -> BodyChunk {
    BodyChunk {
        direction,
        body: chunk,
        end_of_stream,
    }
}

/// A body re-sent as `streamed_response` chunks of at most [`BODY_CHUNK_LIMIT`] bytes; an
/// empty body is one empty chunk. `end_of_stream` goes on the last chunk only.
pub fn body_chunks(direction: Direction, body: Bytes, end_of_stream: bool) -> Vec<BodyChunk> {
    if body.is_empty() {
        return vec![body_chunk(direction, body, end_of_stream)];
    }
    let n = body.len().div_ceil(BODY_CHUNK_LIMIT);
    (0..n)
        .map(|i| {
            let start = i * BODY_CHUNK_LIMIT;
            let end = (start + BODY_CHUNK_LIMIT).min(body.len());
            body_chunk(
                direction,
                body.slice(start..end),
                end_of_stream && i + 1 == n,
            )
        })
        .collect()
}

/// An empty trailers response.
pub fn trailers_response(direction: Direction) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(match direction {
            Direction::Request => processing_response::Response::RequestTrailers(t),
            Direction::Response => processing_response::Response::ResponseTrailers(t),
        }),
        ..Default::default()
    }
}

/// An immediate (local) reply with a plain-text body and `headers` besides its content type.
pub fn immediate_response(
    status: u16,
    body: String,
    headers: &[(&str, &str)],
) -> ProcessingResponse {
    let mut set_headers = Vec::with_capacity(1 + headers.len());
    set_headers.push(set_header("content-type", "text/plain; charset=utf-8"));
    set_headers.extend(headers.iter().map(|(k, v)| set_header(k, v)));
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: Some(HeaderMutation {
                    set_headers,
                    remove_headers: Vec::new(),
                }),
                body: body.into_bytes(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 13: `application/x-ndjson` and the other streaming JSON types had passed for one
    /// JSON document (a substring match on `json`); the media type alone decides now.
    #[test]
    fn a_content_type_names_its_body_by_its_media_type() {
        for (ct, kind) in [
            ("text/event-stream", ResponseBody::EventStream),
            (
                "Text/Event-Stream; charset=utf-8",
                ResponseBody::EventStream,
            ),
            ("application/json", ResponseBody::Json),
            ("application/json; charset=utf-8", ResponseBody::Json),
            ("APPLICATION/PROBLEM+JSON", ResponseBody::Json),
            ("application/x-ndjson", ResponseBody::Unknown),
            ("application/jsonl", ResponseBody::Unknown),
            ("application/json-seq", ResponseBody::Unknown),
            ("application/stream+json", ResponseBody::Unknown),
            ("text/plain; note=json", ResponseBody::Unknown),
            ("", ResponseBody::Unknown),
        ] {
            assert_eq!(response_body_kind(ct), kind, "{ct}");
        }
        assert!(ResponseBody::Unknown.streamed(true));
        assert!(!ResponseBody::Unknown.streamed(false));
        assert!(!ResponseBody::Json.streamed(true));
        assert!(ResponseBody::EventStream.streamed(false));
    }
    use envoy_types::pb::google::protobuf::ListValue;

    fn md(ns: &str, key: &str, v: Value) -> Metadata {
        let inner = Struct {
            fields: [(key.to_owned(), v)].into_iter().collect(),
        };
        Metadata {
            filter_metadata: [(ns.to_owned(), inner)].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn subset_hint_list_or_string() {
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![string_value("1.1.1.1:80"), string_value("2.2.2.2:80")],
            })),
        };
        let m = md(SUBSET_HINT_NAMESPACE, DESTINATION_SUBSET, list);
        assert_eq!(
            subset_hint(Some(&m)).unwrap(),
            vec!["1.1.1.1:80", "2.2.2.2:80"]
        );
        let m = md(
            SUBSET_HINT_NAMESPACE,
            DESTINATION_SUBSET,
            string_value("1.1.1.1, 2.2.2.2"),
        );
        assert_eq!(subset_hint(Some(&m)).unwrap(), vec!["1.1.1.1", "2.2.2.2"]);
        let empty = md(
            SUBSET_HINT_NAMESPACE,
            DESTINATION_SUBSET,
            Value {
                kind: Some(Kind::ListValue(ListValue::default())),
            },
        );
        assert_eq!(subset_hint(Some(&empty)), Some(vec![]));
        assert_eq!(subset_hint(None), None);
        let other = md("envoy.lb", DESTINATION_SUBSET, string_value("x"));
        assert_eq!(subset_hint(Some(&other)), None);
    }

    #[test]
    fn chunking() {
        let body = Bytes::from(vec![b'a'; BODY_CHUNK_LIMIT * 2 + 1]);
        let chunks = body_chunks(Direction::Request, body, true);
        assert_eq!(chunks.len(), 3);
        let eos: Vec<bool> = chunks
            .into_iter()
            .map(BodyChunk::into_message)
            .map(|c| match c.response {
                Some(processing_response::Response::RequestBody(b)) => {
                    match &b
                        .response
                        .as_ref()
                        .unwrap()
                        .body_mutation
                        .as_ref()
                        .unwrap()
                        .mutation
                        .as_ref()
                        .unwrap()
                    {
                        body_mutation::Mutation::StreamedResponse(s) => s.end_of_stream,
                        _ => panic!(),
                    }
                }
                _ => panic!(),
            })
            .collect();
        assert_eq!(eos, vec![false, false, true]);
        assert_eq!(
            body_chunks(Direction::Response, Bytes::new(), true).len(),
            1
        );
    }

    #[test]
    fn metadata_roundtrip() {
        let s = destination_metadata("1.2.3.4:80,[::1]:80");
        let m = Metadata {
            filter_metadata: s
                .fields
                .iter()
                .map(|(k, v)| match &v.kind {
                    Some(Kind::StructValue(st)) => (k.clone(), st.clone()),
                    _ => panic!(),
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            metadata_string(Some(&m), LB_NAMESPACE, DESTINATION_ENDPOINT).unwrap(),
            "1.2.3.4:80,[::1]:80"
        );
    }
}
