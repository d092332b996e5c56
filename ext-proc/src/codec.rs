//! The ext_proc gRPC codec and server: the one place where `ProcessingRequest`s are read off
//! the wire and answers written to it.
//!
//! envoy-types' generated server decodes with prost, which copies every `HttpBody.body` out of
//! tonic's receive buffer into a `Vec<u8>`, and encodes with prost, which needs every re-sent
//! body chunk copied into the `Vec<u8>` of a `StreamedBodyResponse` first. Body chunks are most
//! of the bytes the EPP handles (a request body comes in and goes back out in full), so this
//! module replaces both:
//! - [`decode_request`] takes the message as `Bytes` (tonic hands it over without a copy),
//!   finds the body of a `request_body` / `response_body` message by scanning the protobuf
//!   framing, and keeps it as a `Bytes` slice of the received buffer ([`Inbound::body`]);
//!   everything else is decoded by prost from the message with the body fields cut out, so
//!   prost's rules (merging, unknown fields, errors) apply unchanged. A message the scan does
//!   not understand (groups, bad framing), or with more than one body field (Envoy sends one;
//!   a crafted message of millions would cost the scan a range each), is decoded by prost as a
//!   whole: the result, or the error, is then prost's own.
//! - [`encode_answer`] writes a body chunk ([`Answer::Chunk`]) by hand: the nested length
//!   prefixes of `ProcessingResponse` → `BodyResponse` → `CommonResponse` → `BodyMutation` →
//!   `StreamedBodyResponse`, then the chunk's bytes, once, into tonic's output buffer. Every
//!   other answer is encoded by prost.
//! - Before either, a message holding more headers and map or list entries than Envoy could
//!   send ([`MAX_ENTRIES`]) is refused, its entries counted from the framing: prost allocates
//!   tens of times an entry's two wire bytes for it.
//!
//! [`ExtProcServer`] is the tonic service for `ExternalProcessor/Process` over this codec (what
//! the generated `ExternalProcessorServer` does with prost's).

use std::convert::Infallible;
use std::ops::Range;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{decode_varint, encode_varint, encoded_len_varint};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::{Status, Streaming};

use crate::envoy::ext_proc::{HttpBody, ProcessingRequest, processing_request};
use crate::envoy::{Answer, BodyChunk, Direction};
use crate::service::{ExtProcService, ResponseStream};

mod entries;

pub use entries::MAX_ENTRIES;

/// The gRPC path of the one method served.
pub const PROCESS_PATH: &str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

/// One received message: the prost message with any `HttpBody.body` left empty, and that body
/// beside it as a slice of the received buffer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inbound {
    /// The message; a `request_body` / `response_body` has an empty `body`.
    pub message: ProcessingRequest,
    /// The body of a `request_body` / `response_body` message (empty otherwise).
    pub body: Bytes,
}

impl Inbound {
    /// A prost-decoded message, its body moved (not copied) into [`Inbound::body`].
    pub fn from_message(mut message: ProcessingRequest) -> Self {
        let body = match &mut message.request {
            Some(
                processing_request::Request::RequestBody(b)
                | processing_request::Request::ResponseBody(b),
            ) => Bytes::from(std::mem::take(&mut b.body)),
            _ => Bytes::new(),
        };
        Self { message, body }
    }

    /// The prost message with its body put back (a copy when the body is a slice).
    pub fn into_message(self) -> ProcessingRequest {
        let Self { mut message, body } = self;
        if let Some(
            processing_request::Request::RequestBody(b)
            | processing_request::Request::ResponseBody(b),
        ) = &mut message.request
        {
            b.body = Vec::from(body);
        }
        message
    }
}

/// `ProcessingRequest`'s oneof `request`: its field numbers, and those of the two bodies.
const ONEOF_FIELDS: Range<u32> = 2..8;
const REQUEST_BODY_FIELD: u32 = 4;
const RESPONSE_BODY_FIELD: u32 = 5;
/// `HttpBody.body`.
const BODY_FIELD: u32 = 1;
const LENGTH_DELIMITED: u8 = 2;

/// One field's place in a buffer: the whole field, and its payload when length-delimited.
struct Field {
    number: u32,
    wire_type: u8,
    /// From the key's first byte to the field's end.
    whole: Range<usize>,
    /// Where the key and length prefix end (the payload's start).
    payload_start: usize,
}

/// Reads the field at `*pos` of `buf`; `None` for anything prost might read differently or
/// refuse (the caller then leaves the whole message to prost). Groups are not read.
fn next_field(buf: &[u8], pos: &mut usize) -> Option<Field> {
    let start = *pos;
    let mut rest = buf.get(start..)?;
    let before = rest.len();
    let key = decode_varint(&mut rest).ok()?;
    let key = u32::try_from(key).ok()?;
    let number = key >> 3;
    let wire_type = u8::try_from(key & 7).ok()?;
    if number == 0 {
        return None;
    }
    let len = match wire_type {
        0 => {
            decode_varint(&mut rest).ok()?;
            0
        }
        1 => 8,
        LENGTH_DELIMITED => usize::try_from(decode_varint(&mut rest).ok()?).ok()?,
        5 => 4,
        _ => return None,
    };
    let payload_start = start + (before - rest.len());
    let end = payload_start.checked_add(len)?;
    if end > buf.len() {
        return None;
    }
    *pos = end;
    Some(Field {
        number,
        wire_type,
        whole: start..end,
        payload_start,
    })
}

/// A top-level body message holding body fields.
struct Cut {
    /// Its key (the length prefix after it is rewritten).
    key: Range<usize>,
    /// Its payload.
    payload: Range<usize>,
    /// The body fields inside the payload, whole (key, length and bytes).
    bodies: Vec<Range<usize>>,
}

/// What the scan of a message found: the body fields to cut out, and the body that prost would
/// keep.
struct Scan {
    /// The body messages with body fields, in order.
    cuts: Vec<Cut>,
    /// The payload of the body field that wins (the last one of the oneof's last run).
    body: Option<Range<usize>>,
}

fn scan(buf: &[u8]) -> Option<Scan> {
    let mut pos = 0;
    let mut cuts = Vec::new();
    // The oneof field last seen, and the body prost would hold for it so far: a repeated oneof
    // field merges into the value, another oneof field replaces it.
    let mut oneof: Option<u32> = None;
    let mut body: Option<Range<usize>> = None;
    while pos < buf.len() {
        let field = next_field(buf, &mut pos)?;
        // A known field with another wire type: prost refuses it, or (a map, field 9) reads it
        // as length-delimited anyway, framing the rest differently. Left to prost.
        let expected = match field.number {
            10 => Some(0),
            2..=9 | 11..=13 => Some(LENGTH_DELIMITED),
            _ => None,
        };
        if expected.is_some_and(|w| w != field.wire_type) {
            return None;
        }
        if !ONEOF_FIELDS.contains(&field.number) {
            continue;
        }
        if oneof != Some(field.number) {
            oneof = Some(field.number);
            body = None;
        }
        if field.number != REQUEST_BODY_FIELD && field.number != RESPONSE_BODY_FIELD {
            continue;
        }
        let payload = field.payload_start..field.whole.end;
        let inner_buf = buf.get(payload.clone())?;
        let mut inner = 0;
        let mut bodies = Vec::new();
        while inner < inner_buf.len() {
            let f = next_field(inner_buf, &mut inner)?;
            // HttpBody: bytes `body` = 1, bools 2 to 5.
            let expected = match f.number {
                BODY_FIELD => Some(LENGTH_DELIMITED),
                2..=5 => Some(0),
                _ => None,
            };
            if expected.is_some_and(|w| w != f.wire_type) {
                return None;
            }
            if f.number == BODY_FIELD {
                // Envoy sends one body field in one body message. More is a crafted message:
                // a range (and a `Cut`) per two-byte field would make the scan allocate
                // tens of times the message's size, where prost merges them in place.
                if !bodies.is_empty() || !cuts.is_empty() {
                    return None;
                }
                let offset = payload.start;
                bodies.push(f.whole.start + offset..f.whole.end + offset);
                body = Some(f.payload_start + offset..f.whole.end + offset);
            }
        }
        if !bodies.is_empty() {
            // The key alone: the length prefix is rewritten.
            let mut key_only = &buf[field.whole.start..];
            let before = key_only.len();
            decode_varint(&mut key_only).ok()?;
            let key_end = field.whole.start + (before - key_only.len());
            cuts.push(Cut {
                key: field.whole.start..key_end,
                payload,
                bodies,
            });
        }
    }
    Some(Scan { cuts, body })
}

/// The message with the body fields of `cuts` left out (their enclosing lengths adjusted).
fn without_bodies(buf: &[u8], cuts: &[Cut]) -> Bytes {
    let removed: usize = cuts
        .iter()
        .flat_map(|cut| cut.bodies.iter().map(|b| b.len()))
        .sum();
    let mut out = BytesMut::with_capacity(buf.len() - removed);
    let mut copied = 0;
    for Cut {
        key,
        payload,
        bodies,
    } in cuts
    {
        out.put_slice(&buf[copied..key.end]);
        let kept = payload.len() - bodies.iter().map(|b| b.len()).sum::<usize>();
        encode_varint(kept as u64, &mut out);
        copied = payload.start;
        for b in bodies {
            out.put_slice(&buf[copied..b.start]);
            copied = b.end;
        }
        out.put_slice(&buf[copied..payload.end]);
        copied = payload.end;
    }
    out.put_slice(&buf[copied..]);
    out.freeze()
}

/// Whether `status`, read from a stream's messages, refuses the message itself (malformed,
/// over the entry cap, over the size cap) rather than saying the stream broke: the status to
/// end the stream with, so that the sender learns why.
pub fn refuses_the_message(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
    )
}

fn invalid(error: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("malformed ext_proc message: {error}"))
}

/// Decodes one `ProcessingRequest`, its body (if any) as a zero-copy slice of `bytes`. The
/// result is what prost decodes from `bytes` ([`Inbound::into_message`] gives it back), and
/// fails when prost fails (`InvalidArgument`) and, before prost reads it, when the message holds
/// more than [`MAX_ENTRIES`] headers and map or list entries (`ResourceExhausted`: prost would
/// allocate tens of times the message for them).
pub fn decode_request(bytes: Bytes) -> Result<Inbound, Status> {
    if entries::over_the_cap(&bytes) {
        return Err(Status::resource_exhausted(format!(
            "ext_proc message holds more than {MAX_ENTRIES} headers, attribute, metadata or list entries"
        )));
    }
    let Some(found) = scan(&bytes) else {
        // Framing the scan does not read: prost's result (or error) as it is.
        return ProcessingRequest::decode(bytes)
            .map(Inbound::from_message)
            .map_err(invalid);
    };
    let message = if found.cuts.is_empty() {
        ProcessingRequest::decode(bytes.clone())
    } else {
        ProcessingRequest::decode(without_bodies(&bytes, &found.cuts))
    }
    .map_err(invalid)?;
    let body = match (&message.request, found.body) {
        (
            Some(
                processing_request::Request::RequestBody(HttpBody { .. })
                | processing_request::Request::ResponseBody(HttpBody { .. }),
            ),
            Some(range),
        ) => bytes.slice(range),
        _ => Bytes::new(),
    };
    Ok(Inbound { message, body })
}

const fn key(field: u32, wire_type: u8) -> u64 {
    ((field << 3) | wire_type as u32) as u64
}

/// The encoded length of a length-delimited field of `len` bytes (field numbers below 16).
fn nested_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Writes a body chunk as prost would write the `ProcessingResponse` of
/// [`BodyChunk::into_message`], the chunk's bytes copied once.
pub fn encode_chunk(chunk: &BodyChunk, out: &mut impl BufMut) {
    // StreamedBodyResponse { body = 1, end_of_stream = 2 }: default values are not written.
    let body_len = chunk.body.len();
    let streamed = if body_len > 0 {
        nested_len(body_len)
    } else {
        0
    } + if chunk.end_of_stream { 2 } else { 0 };
    // BodyMutation.streamed_response = 3; CommonResponse.body_mutation = 3;
    // BodyResponse.response = 1; ProcessingResponse.request_body = 3 / response_body = 4.
    let mutation = nested_len(streamed);
    let common = nested_len(mutation);
    let body_response = nested_len(common);
    let direction = match chunk.direction {
        Direction::Request => 3,
        Direction::Response => 4,
    };
    encode_varint(key(direction, LENGTH_DELIMITED), out);
    encode_varint(body_response as u64, out);
    encode_varint(key(1, LENGTH_DELIMITED), out);
    encode_varint(common as u64, out);
    encode_varint(key(3, LENGTH_DELIMITED), out);
    encode_varint(mutation as u64, out);
    encode_varint(key(3, LENGTH_DELIMITED), out);
    encode_varint(streamed as u64, out);
    if body_len > 0 {
        encode_varint(key(1, LENGTH_DELIMITED), out);
        encode_varint(body_len as u64, out);
        out.put_slice(&chunk.body);
    }
    if chunk.end_of_stream {
        encode_varint(key(2, 0), out);
        out.put_u8(1);
    }
}

/// Writes one answer: a body chunk by hand, anything else with prost.
pub fn encode_answer(answer: &Answer, out: &mut impl BufMut) -> Result<(), Status> {
    match answer {
        Answer::Chunk(chunk) => {
            encode_chunk(chunk, out);
            Ok(())
        }
        Answer::Message(message) => message
            .encode(out)
            .map_err(|e| Status::internal(format!("encoding an ext_proc answer: {e}"))),
    }
}

/// The codec of [`ExtProcServer`]: [`Inbound`] in, [`Answer`] out.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtProcCodec;

/// The decoding half of [`ExtProcCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct InboundDecoder;

/// The encoding half of [`ExtProcCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerEncoder;

impl Codec for ExtProcCodec {
    type Encode = Answer;
    type Decode = Inbound;
    type Encoder = AnswerEncoder;
    type Decoder = InboundDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        AnswerEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        InboundDecoder
    }
}

impl Decoder for InboundDecoder {
    type Item = Inbound;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Inbound>, Status> {
        // Zero-copy: tonic's DecodeBuf splits the message off its receive buffer.
        let bytes = src.copy_to_bytes(src.remaining());
        decode_request(bytes).map(Some)
    }
}

impl Encoder for AnswerEncoder {
    type Item = Answer;
    type Error = Status;

    fn encode(&mut self, item: Answer, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        if let Answer::Chunk(chunk) = &item {
            dst.reserve(chunk.body.len() + 32);
        }
        encode_answer(&item, dst)
    }
}

/// What serves one `Process` stream over [`ExtProcCodec`]: its messages in, its answers out.
/// The EPP's [`ExtProcService`] and the body-based router's service both do.
pub trait Processor: Send + Sync + 'static {
    /// Serves one stream.
    fn process(&self, inbound: Streaming<Inbound>) -> ResponseStream;
}

/// The ext_proc gRPC service over [`ExtProcCodec`]: serves `ExternalProcessor/Process` with a
/// [`Processor`] (the EPP's [`ExtProcService`] unless said otherwise); any other path is
/// answered `UNIMPLEMENTED`.
#[derive(Debug)]
pub struct ExtProcServer<P = ExtProcService> {
    service: Arc<P>,
    max_decoding_message_size: Option<usize>,
    max_encoding_message_size: Option<usize>,
}

// By hand: a derive would ask `P: Clone`, and only the `Arc` is cloned.
impl<P> Clone for ExtProcServer<P> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
            max_encoding_message_size: self.max_encoding_message_size,
        }
    }
}

impl<P: Processor> ExtProcServer<P> {
    /// A server for `service`, with tonic's default message size limits.
    pub fn new(service: P) -> Self {
        Self {
            service: Arc::new(service),
            max_decoding_message_size: None,
            max_encoding_message_size: None,
        }
    }

    /// Largest message accepted from Envoy (tonic's default: 4 MiB).
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }

    /// Largest answer sent (tonic's default: unlimited).
    #[must_use]
    pub fn max_encoding_message_size(mut self, limit: usize) -> Self {
        self.max_encoding_message_size = Some(limit);
        self
    }
}

/// The `Process` method as tonic's streaming service.
struct Process<P>(Arc<P>);

impl<P: Processor> tonic::server::StreamingService<Inbound> for Process<P> {
    type Response = Answer;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<Inbound>>) -> Self::Future {
        let stream = self.0.process(request.into_inner());
        Box::pin(std::future::ready(Ok(tonic::Response::new(stream))))
    }
}

impl<P, B> tonic::codegen::Service<http::Request<B>> for ExtProcServer<P>
where
    P: Processor,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != PROCESS_PATH {
            return Box::pin(async {
                Ok(Status::unimplemented("unknown method").into_http::<tonic::body::Body>())
            });
        }
        let method = Process(self.service.clone());
        let mut grpc = tonic::server::Grpc::new(ExtProcCodec).apply_max_message_size_config(
            self.max_decoding_message_size,
            self.max_encoding_message_size,
        );
        Box::pin(async move { Ok(grpc.streaming(method, request).await) })
    }
}

impl<P> tonic::server::NamedService for ExtProcServer<P> {
    const NAME: &'static str = "envoy.service.ext_proc.v3.ExternalProcessor";
}

#[cfg(test)]
mod tests;
