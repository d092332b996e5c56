//! Harnesses for the OpenAI body code of `ext-proc` (`ext_proc::openai`): request bodies and the
//! model rewrite, the response model rewrite, `usage` in JSON bodies and in SSE streams.
//!
//! Shared by the fuzz targets and by `ext-proc/tests/fuzz_regressions.rs`, which replays the
//! seeds and every crash ever found through these same functions under plain `cargo test`.
//! Uses only `ext-proc`'s public API and dependencies both crates have.

use std::sync::Arc;

use bytes::Bytes;
use endpoint_picker::request::Api;
use ext_proc::body_budget::BodyBudget;
use ext_proc::json_usage::JsonUsageScanner;
use ext_proc::openai::{self, BodyError, SseUsageScanner, Usage};

const APIS: [Api; 6] = [
    Api::Completions,
    Api::ChatCompletions,
    Api::Responses,
    Api::Embeddings,
    Api::Conversations,
    Api::HeadersOnly,
];

/// `openai_body`: first byte = API, second byte = replacement model (from a small table), rest
/// = the body. A parse never panics; an accepted body's model is valid and its prompt is a
/// part of the body (or decoded from it); rewriting the model then parsing again yields the new
/// model and leaves every byte outside the model's value as it was.
pub fn body(data: &[u8]) {
    let [api, model, body @ ..] = data else {
        return;
    };
    let api = APIS[usize::from(*api) % APIS.len()];
    let body = Bytes::copy_from_slice(body);
    let parsed = match openai::parse_body(api, &body) {
        Ok(p) => p,
        Err(e) => {
            // Errors echo at most a bounded, escaped part of the input.
            let shown = e.to_string();
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
            assert!(shown.len() < 1024, "{} bytes", shown.len());
            if let BodyError::Json(m) = &e {
                assert!(m.len() < 1024);
            }
            return;
        }
    };
    assert!(openai::validate_model_name(&parsed.model).is_ok());
    let span = parsed.model_span.clone();
    assert!(span.start < span.end && span.end <= body.len(), "{span:?}");
    assert_eq!(body[span.start], b'"');
    assert_eq!(body[span.end - 1], b'"');
    assert!(
        parsed.prompt.len() <= body.len(),
        "prompt larger than the body"
    );

    const MODELS: [&str; 6] = [
        "m",
        "llama-3-8b-instruct",
        "lora/\"quoted\"\\",
        "",
        "日本語-モデル",
        "tab\there\u{7f}",
    ];
    let new_model = MODELS[usize::from(*model) % MODELS.len()];
    let rewritten = openai::rewrite_model(&body, span.clone(), new_model);
    assert_eq!(&rewritten[..span.start], &body[..span.start]);
    let tail = &body[span.end..];
    assert_eq!(&rewritten[rewritten.len() - tail.len()..], tail);
    match openai::parse_body(api, &rewritten) {
        Ok(again) => {
            assert_eq!(again.model, new_model);
            assert_eq!(again.model_span.start, span.start);
            assert_eq!(again.stream, parsed.stream);
            assert_eq!(again.cache_salt, parsed.cache_salt);
        }
        // Only a replacement that is itself no valid model name may be refused.
        Err(e) => assert!(
            openai::validate_model_name(new_model).is_err(),
            "rewritten body refused: {e}"
        ),
    }
}

/// `response_rewrite`: first byte = model pair (and the cuts), rest = a response chunk. The
/// rewrite is `None` exactly when the chunk names no `"model":<from>`; rewriting to the same
/// name is the identity; and rewriting back restores the chunk when `to` does not occur in it
/// already. Fed as a streamed body, a byte at a time and in chunks cut where the first byte
/// says, it comes out as the whole chunk's rewrite, holding back less than a pattern's length,
/// charged, and nothing at its end.
pub fn response_rewrite(data: &[u8]) {
    let [pair, chunk @ ..] = data else {
        return;
    };
    const PAIRS: [(&str, &str); 5] = [
        ("m", "orig"),
        ("llama-v2", "llama"),
        ("a\"b", "c\\d"),
        ("x", "x"),
        ("t", "日本"),
    ];
    let (from, to) = PAIRS[usize::from(*pair) % PAIRS.len()];
    let out = openai::rewrite_response_model(chunk, from, to);
    streamed_rewrite(chunk, from, to, *pair, out.as_deref().unwrap_or(chunk));
    let pattern = |sep: &str, m: &str| {
        format!(
            "\"model\"{sep}{}",
            serde_json::to_string(m).unwrap_or_default()
        )
    };
    let names_from = [":", ": "]
        .iter()
        .any(|sep| memchr::memmem::find(chunk, pattern(sep, from).as_bytes()).is_some());
    assert_eq!(out.is_some(), names_from);
    let Some(out) = out else { return };
    if from == to {
        assert_eq!(out, chunk);
    }
    let names_to = [":", ": "]
        .iter()
        .any(|sep| memchr::memmem::find(chunk, pattern(sep, to).as_bytes()).is_some());
    let both_separators = [":", ": "]
        .iter()
        .all(|sep| memchr::memmem::find(chunk, pattern(sep, from).as_bytes()).is_some());
    if !names_to && !both_separators && from != to {
        let back = openai::rewrite_response_model(&out, to, from);
        assert_eq!(back.as_deref(), Some(chunk), "rewrite is not reversible");
    }
}

/// `body` fed to [`openai::ModelRewriteBack::rewrite_chunk`] a byte at a time and in chunks
/// of up to 16 bytes (sizes from `seed`): each must come out as `expected`.
fn streamed_rewrite(body: &[u8], from: &str, to: &str, seed: u8, expected: &[u8]) {
    let longest = format!(
        "\"model\": {}",
        serde_json::to_string(from).unwrap_or_default()
    )
    .len();
    let budget = Arc::new(BodyBudget::new(1 << 20));
    let bytewise: Vec<usize> = (1..=body.len()).collect();
    let mut step = usize::from(seed);
    let mut chunked = Vec::new();
    let mut at = 0;
    while at < body.len() {
        step = step.wrapping_mul(31).wrapping_add(7) % 97;
        at = (at + step % 17).min(body.len());
        chunked.push(at);
    }
    for ends in [bytewise, chunked] {
        let Some(mut rewrite) = openai::ModelRewriteBack::new(from, to) else {
            return;
        };
        let mut out = Vec::new();
        let mut start = 0;
        for (i, &end) in ends.iter().enumerate() {
            let last = i + 1 == ends.len();
            let piece = Bytes::copy_from_slice(&body[start..end]);
            out.extend_from_slice(&rewrite.rewrite_chunk(piece, &budget, last));
            assert!(rewrite.held() < longest, "held more than a pattern's start");
            assert_eq!(budget.held(), rewrite.held(), "what is held is charged");
            start = end;
        }
        assert_eq!(rewrite.held(), 0, "held past the end");
        assert!(
            out == expected,
            "a streamed rewrite differs from the whole one"
        );
    }
}

/// `usage_json`: `usage` of a complete JSON response. Never panics; totals are never below
/// their parts unless the server said so. Read as the body passes (`json_usage`, what the EPP
/// does with a whole answer), the usage does not depend on how the body is cut, and on a body
/// the whole parse reads it is that usage or unknown, never another value.
pub fn usage_json(data: &[u8]) {
    let whole = openai::usage_from_json(data);
    if let Some(u) = whole {
        check_usage(data, u);
    }
    let budget = Arc::new(BodyBudget::new(1 << 20));
    let scan = |chunk: usize| {
        let mut scanner = JsonUsageScanner::default();
        for piece in data.chunks(chunk.max(1)) {
            scanner.push(piece, &budget).expect("within the budget");
        }
        scanner.take_usage()
    };
    let scanned = scan(data.len());
    assert_eq!(scan(1), scanned, "bytewise");
    assert_eq!(scan(7), scanned, "by 7 bytes");
    assert_eq!(budget.held(), 0, "given back");
    let Some(scanned) = scanned else {
        return;
    };
    check_usage(data, scanned);
    // A body the whole parse reads is valid JSON, so the scanner's member is its top-level
    // `usage`: the same one, unless the body is a Responses API event, whose usage the whole
    // parse takes from its `response` member.
    if let Some(u) = whole
        && memchr::memmem::find(data, b"\"response.").is_none()
    {
        assert_eq!(scanned, u, "the scanner read another usage");
    }
}

fn check_usage(data: &[u8], u: Usage) {
    // Without an explicit total, the total is the sum (saturated).
    if memchr::memmem::find(data, b"total_tokens").is_none() {
        assert_eq!(
            u.total_tokens,
            u.prompt_tokens.saturating_add(u.completion_tokens)
        );
    }
}

/// `sse_usage`: first byte = chunking seed, rest = an SSE stream. The usage found does not
/// depend on how the stream is cut into chunks.
pub fn sse_usage(data: &[u8]) {
    let [seed, stream @ ..] = data else {
        return;
    };
    let mut whole = SseUsageScanner::default();
    whole.feed(stream);
    let mut bytewise = SseUsageScanner::default();
    for b in stream.chunks(1) {
        bytewise.feed(b);
    }
    let mut chunked = SseUsageScanner::default();
    let mut rest = stream;
    let mut step = usize::from(*seed);
    while !rest.is_empty() {
        step = step.wrapping_mul(31).wrapping_add(7) % 97;
        let n = (step % 17).min(rest.len());
        let (a, b) = rest.split_at(n);
        chunked.feed(a);
        rest = b;
    }
    assert_eq!(whole.usage(), bytewise.usage());
    assert_eq!(whole.usage(), chunked.usage());
    if let Some(u) = whole.usage() {
        check_usage(stream, u);
    }
}
