//! Fuzz harnesses of Switchyard's parsers of untrusted bytes, one function per fuzz target.
//! The files are also compiled into the parser crates' `fuzz_regressions` tests (by path), so
//! that plain `cargo test` replays the seeds and every crash ever found with the same checks.
// A panic in a harness is the finding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bbr_mapping;
pub mod bbr_stream;
pub mod ext_proc_codec;
pub mod ext_proc_records;
pub mod kv_events;
pub mod openai;
pub mod peer_message;
pub mod prometheus;
pub mod stream;
pub mod tokenize;
pub mod yaml;
pub mod zmtp_guard;
