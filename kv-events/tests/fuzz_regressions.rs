//! Replays the `kv_events` and `zmtp_guard` fuzz targets' seeds and every crash they ever found
//! (`fuzz/seeds/<target>/`, `fuzz/regressions/<target>/`) through the harnesses themselves,
//! under plain `cargo test`. The harness sources live in `fuzz/src/kv_events.rs` and
//! `fuzz/src/zmtp_guard.rs`; the frame guard is part of the transport, so `zmtp_guard` runs
//! with the `zmq` feature (on in `cargo test --workspace`, which the EPP and the simulator
//! enable it in; alone: `cargo test -p kv-events --features zmq --test fuzz_regressions`).
// A harness panics on a finding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/src/kv_events.rs"]
mod kv_events_harness;
#[path = "../../fuzz/src/replay.rs"]
mod replay;
#[cfg(feature = "zmq")]
#[path = "../../fuzz/src/zmtp_guard.rs"]
mod zmtp_guard;

#[test]
fn kv_events() {
    replay::replay("kv_events", kv_events_harness::run);
}

#[cfg(feature = "zmq")]
#[test]
fn zmtp_guard() {
    replay::replay("zmtp_guard", zmtp_guard::run);
}
