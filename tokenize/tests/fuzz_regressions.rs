//! Replays the `tokenize_body` fuzz seeds and every crash found (`fuzz/seeds/tokenize_body/`,
//! `fuzz/regressions/tokenize_body/`) through the fuzz harness itself, under plain
//! `cargo test`. The harness source lives in `fuzz/src/`.
// A harness panics on a finding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../fuzz/src/tokenize.rs"]
mod tokenize_harness;

#[test]
fn tokenize_body() {
    replay::replay("tokenize_body", tokenize_harness::body);
}
