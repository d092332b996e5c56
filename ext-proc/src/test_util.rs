//! Builders of ext_proc messages and readers of the EPP's answers, for tests of this crate and
//! of the crates above it (`testkit` re-exports them). Compiled for tests and with the
//! `test-util` feature only.
// Test support: a malformed answer should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::envoy::ext_proc::{
    CommonResponse, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
    ProtocolConfiguration, processing_request, processing_response,
};
use crate::envoy::{BodySendMode, HeaderMap, HeaderValue, Metadata};

pub fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    HeaderMap {
        headers: headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    }
}

pub fn req_headers(
    headers: &[(&str, &str)],
    eos: bool,
    metadata: Option<Metadata>,
) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
            headers: Some(header_map(headers)),
            end_of_stream: eos,
            ..Default::default()
        })),
        metadata_context: metadata,
        ..Default::default()
    }
}

/// `message` (request headers) with `n` more empty headers: a flood no gateway sends.
pub fn with_empty_headers(mut message: ProcessingRequest, n: usize) -> ProcessingRequest {
    if let Some(processing_request::Request::RequestHeaders(h)) = &mut message.request {
        h.headers
            .get_or_insert_with(HeaderMap::default)
            .headers
            .extend(std::iter::repeat_n(HeaderValue::default(), n));
    }
    message
}

/// `message` (a stream's first) announcing Envoy's request body mode, as Envoy does, with the
/// response body mode of the lean path.
pub fn with_request_body_mode(
    mut message: ProcessingRequest,
    mode: BodySendMode,
) -> ProcessingRequest {
    message.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: mode as i32,
        response_body_mode: BodySendMode::None as i32,
        ..Default::default()
    });
    message
}

pub fn req_body(body: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::RequestBody(HttpBody {
            body: body.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn resp_headers(
    headers: &[(&str, &str)],
    eos: bool,
    metadata: Option<Metadata>,
) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseHeaders(HttpHeaders {
            headers: Some(header_map(headers)),
            end_of_stream: eos,
            ..Default::default()
        })),
        metadata_context: metadata,
        ..Default::default()
    }
}

pub fn resp_body(body: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseBody(HttpBody {
            body: body.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The set headers, remove list and dynamic destination of a request-headers response.
pub struct RoutingAnswer {
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
    pub metadata_destination: Option<String>,
    pub clear_route_cache: bool,
}

impl RoutingAnswer {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.set
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn destination(&self) -> &str {
        self.header("x-gateway-destination-endpoint")
            .expect("destination header")
    }
}

pub fn routing_answer(r: &ProcessingResponse) -> RoutingAnswer {
    let Some(processing_response::Response::RequestHeaders(h)) = &r.response else {
        panic!("expected a request-headers response, got {r:?}");
    };
    routing_of(h.response.as_ref().unwrap(), r)
}

/// The routing (as [`routing_answer`]) and the replacement body, if any, of the BUFFERED
/// path's request-body response.
pub fn buffered_routing_answer(r: &ProcessingResponse) -> (RoutingAnswer, Option<Vec<u8>>) {
    use crate::envoy::ext_proc::body_mutation::Mutation;
    let Some(processing_response::Response::RequestBody(b)) = &r.response else {
        panic!("expected a request-body response, got {r:?}");
    };
    let common = b.response.as_ref().unwrap();
    let body = match common
        .body_mutation
        .as_ref()
        .and_then(|m| m.mutation.as_ref())
    {
        None => None,
        Some(Mutation::Body(body)) => Some(body.clone()),
        other => panic!("expected a whole-body mutation, got {other:?}"),
    };
    (routing_of(common, r), body)
}

/// True for a request-headers response that changes nothing (the BUFFERED path's first answer).
pub fn is_plain_request_headers_answer(r: &ProcessingResponse) -> bool {
    matches!(
        &r.response,
        Some(processing_response::Response::RequestHeaders(h))
            if h.response.as_ref() == Some(&CommonResponse::default())
    ) && r.dynamic_metadata.is_none()
}

fn routing_of(common: &CommonResponse, r: &ProcessingResponse) -> RoutingAnswer {
    let mutation = common.header_mutation.clone().unwrap_or_default();
    let set = mutation
        .set_headers
        .iter()
        .map(|o| {
            let h = o.header.as_ref().unwrap();
            (
                h.key.clone(),
                String::from_utf8(h.raw_value.clone()).unwrap(),
            )
        })
        .collect();
    use envoy_types::pb::google::protobuf::value::Kind;
    let metadata_destination = r.dynamic_metadata.as_ref().and_then(|s| {
        match s.fields.get("envoy.lb")?.kind.as_ref()? {
            Kind::StructValue(inner) => match inner
                .fields
                .get("x-gateway-destination-endpoint")?
                .kind
                .as_ref()?
            {
                Kind::StringValue(v) => Some(v.clone()),
                _ => None,
            },
            _ => None,
        }
    });
    RoutingAnswer {
        set,
        remove: mutation.remove_headers,
        metadata_destination,
        clear_route_cache: common.clear_route_cache,
    }
}

/// `(body, end_of_stream)` of a streamed body response in either direction.
pub fn streamed_body(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    use crate::envoy::ext_proc::body_mutation::Mutation;
    let body = match &r.response {
        Some(processing_response::Response::RequestBody(b))
        | Some(processing_response::Response::ResponseBody(b)) => b,
        other => panic!("expected a body response, got {other:?}"),
    };
    match body
        .response
        .as_ref()
        .and_then(|c| c.body_mutation.as_ref())
        .and_then(|m| m.mutation.as_ref())
    {
        Some(Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        other => panic!("expected streamed_response, got {other:?}"),
    }
}

/// `(status, body)` of an immediate response.
pub fn immediate(r: &ProcessingResponse) -> (i32, String) {
    match &r.response {
        Some(processing_response::Response::ImmediateResponse(i)) => (
            i.status.as_ref().unwrap().code,
            String::from_utf8(i.body.clone()).unwrap(),
        ),
        other => panic!("expected an immediate response, got {other:?}"),
    }
}

/// A header of an immediate response.
pub fn immediate_header(r: &ProcessingResponse, name: &str) -> Option<String> {
    match &r.response {
        Some(processing_response::Response::ImmediateResponse(i)) => i
            .headers
            .as_ref()?
            .set_headers
            .iter()
            .filter_map(|o| o.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned()),
        _ => None,
    }
}
