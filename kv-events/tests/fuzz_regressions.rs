//! Replays the `kv_events` fuzz target's seeds and every crash it ever found
//! (`fuzz/seeds/kv_events/`, `fuzz/regressions/kv_events/`) through the harness itself, under
//! plain `cargo test`. The harness source lives in `fuzz/src/kv_events.rs`.
// A harness panics on a finding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/src/kv_events.rs"]
mod kv_events_harness;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn kv_events() {
    replay::replay("kv_events", kv_events_harness::run);
}
