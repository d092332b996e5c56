//! Replays the `bbr_stream` and `bbr_mapping` fuzz targets' seeds and every crash they ever
//! found (`fuzz/seeds/<target>/`, `fuzz/regressions/<target>/`) through the harnesses
//! themselves, under plain `cargo test`: no fuzzing tools, same checks. The harness sources live
//! in `fuzz/src/bbr_stream.rs` and `fuzz/src/bbr_mapping.rs`.
// A harness panics on a finding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/src/bbr_mapping.rs"]
mod bbr_mapping;
#[path = "../../fuzz/src/bbr_stream.rs"]
mod bbr_stream;
#[path = "../../fuzz/src/ext_proc_records.rs"]
mod ext_proc_records;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn bbr_stream() {
    replay::replay("bbr_stream", bbr_stream::run);
}

#[test]
fn bbr_mapping() {
    replay::replay("bbr_mapping", bbr_mapping::run);
}
