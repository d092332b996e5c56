//! Harness for `bbr::stream::BbrStream::on_inbound`: the body-based router's ext_proc state
//! machine over arbitrary sequences of ext_proc messages.
//!
//! Shared by the `bbr_stream` fuzz target and `bbr/tests/fuzz_regressions.rs`. Only public APIs
//! of `bbr` and `ext-proc` are used.
//!
//! Input: one options byte, then records as in the `stream` target (`fuzz/src/stream.rs`), each
//! starting with `>` and a kind letter, separated by `\n>`:
//!
//! | kind | message |
//! |---|---|
//! | `h` / `H` | request headers (`H`: end of stream); payload lines `name: value` |
//! | `b` / `B` / `E` | request body chunk (`B`: end_of_stream, `E`: end_of_stream_without_message) |
//! | `p` / `P` | a long request body chunk (`P`: end of stream): the payload's first byte is its size in KiB, the rest is repeated to fill it (`a` if empty) |
//! | `t` | request trailers |
//! | `r` / `R` | response headers (`R`: end of stream) |
//! | `d` / `D` / `F` | response body chunk (`D`: end_of_stream, `F`: end_of_stream_without_message) |
//! | `T` | response trailers |
//! | `n` | a message without a request |
//! | `w` | the body's deadline passed (`on_body_timeout`) |
//!
//! Options bits: 0 BUFFERED (else streamed); 1 `GET /v1/models` not answered; 2 a 256-byte
//! body limit (else 1 MiB); 3 a 4 KiB budget of gathered bodies (else 2 MiB). The mapping:
//! `llama` with the adapter `food-review`, `qwen` without adapters.
//!
//! Invariants: no panic; an immediate response comes alone, ends the exchange (`is_done`) and
//! nothing is answered after it; request messages get request answers, response messages
//! response answers; at most one headers answer per request (per request-headers message), and
//! each clears the route cache, removes exactly the client's copies of the model headers, sets
//! the base-model header only beside the model header and only to the mapping's base of that
//! model. Streamed: headers without end of stream wait for the body; at its end (its last
//! chunk, or trailers) the headers answer comes first, then the body re-sent byte for byte in
//! chunks of at most 62,000 bytes, end of stream on the last exactly when the body ended with
//! it, `content-length` its length; a body after the answer and the response pass through
//! unchanged. BUFFERED: headers are answered at once, the body's answer carries the header
//! mutation; a late body and response bodies get an answer that changes nothing. Once the
//! stream and its answers are gone no body byte is still charged.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use bbr::mapping::{Entry, Mapping};
use bbr::metrics::Metrics;
use bbr::models::{self, ModelList};
use bbr::stream::{BbrStream, Context, Options};
use ext_proc::body_budget::BodyBudget;
use ext_proc::codec::Inbound;
use ext_proc::envoy::ext_proc::{
    CommonResponse, HttpBody, HttpTrailers, ProcessingRequest, ProcessingResponse,
    processing_request::Request as Req, processing_response::Response as Resp,
};
use ext_proc::envoy::{self, Answer, BODY_CHUNK_LIMIT};
use ext_proc::protocol::{BASE_MODEL_NAME, MODEL_NAME};

use crate::ext_proc_records::{check_sides, headers, records, streamed};

fn body(payload: Vec<u8>, eos: bool, without_message: bool) -> HttpBody {
    HttpBody {
        body: payload,
        end_of_stream: eos,
        end_of_stream_without_message: without_message,
        ..Default::default()
    }
}

/// A `p` record's body: `payload[0]` KiB of the rest, repeated.
fn long_body(payload: &[u8]) -> Vec<u8> {
    let (size, fill) = match payload.split_first() {
        Some((&k, fill)) => (usize::from(k) * 1024, fill),
        None => (0, &b""[..]),
    };
    let fill = if fill.is_empty() { &b"a"[..] } else { fill };
    fill.iter().copied().cycle().take(size).collect()
}

/// The context of options `opts` (its low 4 bits), built once per process: building the
/// metrics and the models list took most of a run. Its counters and the body budget outlive a
/// run, but every run ends with nothing charged (checked) and the counters are not checked.
fn context(opts: u8) -> Arc<Context> {
    static CONTEXTS: OnceLock<Vec<Arc<Context>>> = OnceLock::new();
    CONTEXTS.get_or_init(|| (0..16).map(new_context).collect())[usize::from(opts & 15)].clone()
}

fn new_context(opts: u8) -> Arc<Context> {
    let mapping = Mapping::new();
    mapping.reset([
        (
            "ns/llama".to_owned(),
            Entry::new(Some("llama"), ["food-review"]).unwrap(),
        ),
        ("ns/qwen".to_owned(), Entry::new(Some("qwen"), []).unwrap()),
    ]);
    let list = ModelList::new();
    list.store(models::render(&mapping.lookup(), None, 0, models::MAX_LISTED_MODELS).body);
    Arc::new(Context {
        mapping,
        metrics: Arc::new(Metrics::default()),
        models: list,
        options: Options {
            streaming: opts & 1 == 0,
            list_models: opts & 2 == 0,
            max_request_body_bytes: if opts & 4 != 0 { 256 } else { 1 << 20 },
            gathered_request_bytes: Arc::new(BodyBudget::new(if opts & 8 != 0 {
                4096
            } else {
                2 << 20
            })),
            request_body_timeout: std::time::Duration::from_secs(60),
        },
    })
}

/// A body answer that changes nothing (BUFFERED's pass-through).
fn is_plain_body(r: &ProcessingResponse) -> bool {
    match &r.response {
        Some(Resp::RequestBody(b)) | Some(Resp::ResponseBody(b)) => {
            b.response.is_none() || b.response == Some(CommonResponse::default())
        }
        _ => false,
    }
}

/// Checks a headers mutation (of a headers answer, or of BUFFERED's body answer): the route
/// cache cleared, the client's copies removed, the base model the mapping's base of the model.
/// Returns the `content-length` it sets.
fn check_mutation(
    common: Option<&CommonResponse>,
    request_headers: &[(String, String)],
    ctx: &Context,
) -> Option<String> {
    let common = common.expect("a headers mutation");
    assert!(common.clear_route_cache, "the route cache is not cleared");
    assert!(common.body_mutation.is_none(), "{common:?}");
    let mutation = common.header_mutation.as_ref().expect("a header mutation");
    let removed: HashSet<&str> = mutation.remove_headers.iter().map(String::as_str).collect();
    let copies: HashSet<&str> = request_headers
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| *k == MODEL_NAME || *k == BASE_MODEL_NAME)
        .collect();
    assert_eq!(removed, copies, "not exactly the client's copies removed");
    let get = |name: &str| {
        let mut values = mutation
            .set_headers
            .iter()
            .filter_map(|o| o.header.as_ref())
            .filter(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned());
        let first = values.next();
        assert!(values.next().is_none(), "{name} set twice");
        first
    };
    let model = get(MODEL_NAME);
    let base = get(BASE_MODEL_NAME);
    match &model {
        Some(model) => {
            assert!(
                !model.is_empty() && model.trim() == model,
                "model {model:?}"
            );
            let lookup = ctx.mapping.lookup();
            assert_eq!(base.as_deref(), lookup.base_model(model), "{model}");
        }
        None => assert_eq!(base, None, "a base model without a model"),
    }
    get("content-length")
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&opts, rest)) = data.split_first() else {
        return;
    };
    let ctx = context(opts);
    let streaming = ctx.options.streaming;
    let budget = ctx.options.gathered_request_bytes.clone();
    let mut stream = BbrStream::new(ctx.clone());
    // Answers kept alive until the end: streamed chunks hold their body's charge.
    let mut kept: Vec<Answer> = Vec::new();

    let mut done = false;
    let mut request_headers: Vec<(String, String)> = Vec::new();
    // Streamed: headers seen, their answer waits for the body.
    let mut gathering = false;
    // BUFFERED: headers answered, the body's answer carries the mutation.
    let mut awaiting_body = false;
    let mut received: Vec<u8> = Vec::new();

    for (kind, payload) in records(rest) {
        let request = match kind {
            b'h' | b'H' => Req::RequestHeaders(headers(kind == b'H', payload)),
            b'b' | b'B' | b'E' => {
                Req::RequestBody(body(payload.to_vec(), kind == b'B', kind == b'E'))
            }
            b'p' | b'P' => Req::RequestBody(body(long_body(payload), kind == b'P', false)),
            b't' => Req::RequestTrailers(HttpTrailers::default()),
            b'r' | b'R' => Req::ResponseHeaders(headers(kind == b'R', payload)),
            b'd' | b'D' | b'F' => {
                Req::ResponseBody(body(payload.to_vec(), kind == b'D', kind == b'F'))
            }
            b'T' => Req::ResponseTrailers(HttpTrailers::default()),
            b'n' => {
                assert!(
                    stream
                        .on_inbound(Inbound::from_message(ProcessingRequest::default()))
                        .is_empty()
                );
                continue;
            }
            b'w' => {
                let waiting = stream.body_deadline().is_some();
                assert_eq!(waiting, streaming && gathering && !done);
                let out: Vec<ProcessingResponse> = stream
                    .on_body_timeout()
                    .into_iter()
                    .map(Answer::into_message)
                    .collect();
                if waiting {
                    assert_eq!(out.len(), 1, "{out:?}");
                    assert!(matches!(out[0].response, Some(Resp::ImmediateResponse(_))));
                    assert!(stream.is_done());
                    done = true;
                } else {
                    assert!(out.is_empty(), "{out:?}");
                }
                continue;
            }
            _ => continue,
        };
        let answers = stream.on_inbound(Inbound::from_message(ProcessingRequest {
            request: Some(request.clone()),
            ..Default::default()
        }));
        // Chunks are checked as messages; the answers themselves stay charged until the end.
        let out: Vec<ProcessingResponse> =
            answers.iter().cloned().map(Answer::into_message).collect();
        kept.extend(answers);

        if check_sides(&request, &out, &mut done, stream.is_done()).is_none() {
            continue;
        }
        let headers_answers = out
            .iter()
            .filter(|r| matches!(r.response, Some(Resp::RequestHeaders(_))))
            .count();
        assert!(headers_answers <= 1, "{out:?}");

        match &request {
            Req::RequestHeaders(h) => {
                request_headers = envoy::headers(h.headers.as_ref());
                received.clear();
                gathering = false;
                awaiting_body = false;
                if h.end_of_stream || !streaming {
                    // No body, or BUFFERED: answered at once.
                    assert_eq!(out.len(), 1, "{out:?}");
                    let Some(Resp::RequestHeaders(a)) = &out[0].response else {
                        panic!("not a headers answer: {out:?}");
                    };
                    let length = check_mutation(a.response.as_ref(), &request_headers, &ctx);
                    assert_eq!(length, None);
                    awaiting_body = !h.end_of_stream;
                } else {
                    assert!(out.is_empty(), "streamed headers answered early: {out:?}");
                    gathering = true;
                }
            }
            Req::RequestBody(b) if gathering => {
                received.extend_from_slice(&b.body);
                let ended = b.end_of_stream || b.end_of_stream_without_message;
                if !ended {
                    assert!(out.is_empty(), "{out:?}");
                    continue;
                }
                check_resent(&out, &received, true, &request_headers, &ctx);
                gathering = false;
            }
            Req::RequestBody(_) if awaiting_body => {
                // BUFFERED: the whole body; its answer carries the mutation.
                assert_eq!(out.len(), 1, "{out:?}");
                let Some(Resp::RequestBody(a)) = &out[0].response else {
                    panic!("not a body answer: {out:?}");
                };
                let length = check_mutation(a.response.as_ref(), &request_headers, &ctx);
                assert_eq!(length, None, "BUFFERED keeps Envoy's length");
                awaiting_body = false;
            }
            Req::RequestBody(b) | Req::ResponseBody(b) => {
                // Passed on: unchanged when streamed, an answer that changes nothing else.
                assert_eq!(out.len(), 1, "{out:?}");
                if streaming {
                    assert_eq!(streamed(&out[0]), Some((&b.body[..], b.end_of_stream)));
                } else {
                    assert!(is_plain_body(&out[0]), "{out:?}");
                }
            }
            Req::RequestTrailers(_) => {
                let (last, before) = out.split_last().expect("a trailers answer");
                assert!(
                    matches!(last.response, Some(Resp::RequestTrailers(_))),
                    "{out:?}"
                );
                if gathering {
                    // Trailers end the body: it is answered before them.
                    check_resent(before, &received, false, &request_headers, &ctx);
                    gathering = false;
                } else {
                    // BUFFERED trailers without a body included: Envoy sent no body message,
                    // so only the trailers are answered (an unasked body answer closes the
                    // stream).
                    assert!(before.is_empty(), "{out:?}");
                }
                awaiting_body = false;
            }
            Req::ResponseHeaders(_) => {
                assert_eq!(out.len(), 1, "{out:?}");
                assert!(matches!(out[0].response, Some(Resp::ResponseHeaders(_))));
            }
            Req::ResponseTrailers(_) => {
                assert_eq!(out.len(), 1, "{out:?}");
                assert!(matches!(out[0].response, Some(Resp::ResponseTrailers(_))));
            }
        }
    }
    drop(stream);
    drop(kept);
    assert_eq!(budget.held(), 0, "body bytes still charged");
}

/// A streamed body's answer: the headers answer, then the body byte for byte in chunks of at
/// most [`BODY_CHUNK_LIMIT`], end of stream on the last exactly when `eos`.
fn check_resent(
    out: &[ProcessingResponse],
    received: &[u8],
    eos: bool,
    request_headers: &[(String, String)],
    ctx: &Context,
) {
    let (first, chunks) = out.split_first().expect("the body's answer");
    let Some(Resp::RequestHeaders(a)) = &first.response else {
        panic!("the headers answer does not come first: {out:?}");
    };
    let length = check_mutation(a.response.as_ref(), request_headers, ctx);
    let mut resent = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let (bytes, end) = streamed(c).expect("a request body chunk");
        assert!(
            bytes.len() <= BODY_CHUNK_LIMIT,
            "a chunk of {} bytes",
            bytes.len()
        );
        assert_eq!(end, eos && i + 1 == chunks.len(), "end of stream misplaced");
        resent.extend_from_slice(bytes);
    }
    assert!(!chunks.is_empty() || !eos, "{out:?}");
    assert!(resent == received, "the body was not re-sent byte for byte");
    if received.is_empty() {
        assert_eq!(length, None);
    } else {
        assert_eq!(length, Some(received.len().to_string()));
    }
}
