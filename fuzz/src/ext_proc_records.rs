//! What the two ext_proc stream harnesses (`stream` for the EPP, `bbr_stream` for the
//! body-based router) share: the readable record format of their inputs, the messages built
//! from a record, and the checks every answer to one message passes whatever the server.
//!
//! Compiled into the fuzz crate and, by path, into the `fuzz_regressions` tests of `ext-proc`
//! and `bbr`, beside the harness that uses it (so it is named from the crate root).

use ext_proc::envoy::ext_proc::body_mutation::Mutation;
use ext_proc::envoy::ext_proc::{
    HttpHeaders, ProcessingResponse, processing_request::Request as Req,
    processing_response::Response as Resp,
};
use ext_proc::envoy::{HeaderMap, HeaderValue};

/// The records of an input: `(kind, payload)`. Each starts with `>` and a kind letter; they
/// are separated by `\n>` so that seeds are readable text.
pub fn records(mut rest: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    rest = rest.strip_prefix(b">").unwrap_or(rest);
    while !rest.is_empty() {
        let end = memchr::memmem::find(rest, b"\n>").unwrap_or(rest.len());
        let record = &rest[..end];
        if let Some((&kind, payload)) = record.split_first() {
            // A newline after the kind letter is for readability.
            let payload = payload.strip_prefix(b"\n").unwrap_or(payload);
            out.push((kind, payload));
        }
        rest = rest.get(end + 2..).unwrap_or_default();
    }
    out
}

/// Headers from payload lines `name: value` (a line without `": "` is a name with an empty
/// value).
pub fn header_map(payload: &[u8]) -> HeaderMap {
    let text = String::from_utf8_lossy(payload);
    HeaderMap {
        headers: text
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(|line| {
                let (k, v) = line.split_once(": ").unwrap_or((line, ""));
                HeaderValue {
                    key: k.to_owned(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                }
            })
            .collect(),
    }
}

/// A headers message of the payload's lines.
pub fn headers(eos: bool, payload: &[u8]) -> HttpHeaders {
    HttpHeaders {
        headers: Some(header_map(payload)),
        end_of_stream: eos,
        ..Default::default()
    }
}

/// A body answer's streamed chunk: its bytes and end of stream.
pub fn streamed(r: &ProcessingResponse) -> Option<(&[u8], bool)> {
    let b = match &r.response {
        Some(Resp::RequestBody(b)) | Some(Resp::ResponseBody(b)) => b,
        _ => return None,
    };
    match b
        .response
        .as_ref()?
        .body_mutation
        .as_ref()?
        .mutation
        .as_ref()?
    {
        Mutation::StreamedResponse(s) => Some((&s.body, s.end_of_stream)),
        _ => None,
    }
}

fn is_request_side(r: &ProcessingResponse) -> bool {
    matches!(
        r.response,
        Some(Resp::RequestHeaders(_)) | Some(Resp::RequestBody(_)) | Some(Resp::RequestTrailers(_))
    )
}

fn is_response_side(r: &ProcessingResponse) -> bool {
    matches!(
        r.response,
        Some(Resp::ResponseHeaders(_))
            | Some(Resp::ResponseBody(_))
            | Some(Resp::ResponseTrailers(_))
    )
}

/// Checks `out`, the answers to `request`, against what every ext_proc server here promises:
/// nothing after an immediate response (`ended` says one came); an immediate response alone,
/// ending the exchange (`is_done` after the message); request messages answered on the
/// request side, response messages on the response side.
///
/// Returns whether `request` is of the request side, or `None` when the exchange is over
/// (this answer was, or followed, an immediate response) and nothing else is to be checked.
pub fn check_sides(
    request: &Req,
    out: &[ProcessingResponse],
    ended: &mut bool,
    is_done: bool,
) -> Option<bool> {
    if *ended {
        assert!(
            out.is_empty(),
            "answers after an immediate response: {out:?}"
        );
        return None;
    }
    let immediates = out
        .iter()
        .filter(|r| matches!(r.response, Some(Resp::ImmediateResponse(_))))
        .count();
    if immediates > 0 {
        assert_eq!(out.len(), 1, "an immediate response comes alone: {out:?}");
        assert!(is_done);
        *ended = true;
        return None;
    }
    assert!(!is_done);
    let request_side = matches!(
        request,
        Req::RequestHeaders(_) | Req::RequestBody(_) | Req::RequestTrailers(_)
    );
    if request_side {
        assert!(out.iter().all(is_request_side), "{out:?}");
    } else {
        assert!(out.iter().all(is_response_side), "{out:?}");
    }
    Some(request_side)
}
