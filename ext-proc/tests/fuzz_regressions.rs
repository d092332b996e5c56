//! Replays the fuzz seeds and every crash the fuzzers ever found (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) through the fuzz harnesses themselves, under plain
//! `cargo test`: no fuzzing tools, same checks. The harness sources live in `fuzz/src/`.
// A harness panics on a finding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/src/ext_proc_codec.rs"]
mod ext_proc_codec;
#[path = "../../fuzz/src/ext_proc_records.rs"]
mod ext_proc_records;
#[path = "../../fuzz/src/openai.rs"]
mod openai;
#[path = "../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../fuzz/src/stream.rs"]
mod stream;

use replay::replay;

#[test]
fn ext_proc_codec() {
    replay("ext_proc_codec", ext_proc_codec::run);
}

#[test]
fn openai_body() {
    replay("openai_body", openai::body);
}

#[test]
fn response_rewrite() {
    replay("response_rewrite", openai::response_rewrite);
}

#[test]
fn usage_json() {
    replay("usage_json", openai::usage_json);
}

#[test]
fn sse_usage() {
    replay("sse_usage", openai::sse_usage);
}

#[test]
fn stream() {
    replay("stream", stream::run);
}
