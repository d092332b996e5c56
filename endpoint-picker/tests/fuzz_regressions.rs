//! Replays the fuzz seeds and every crash the fuzzers ever found (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) through the fuzz harnesses themselves, under plain
//! `cargo test`: no fuzzing tools, same checks. The harness sources live in `fuzz/src/`.
// A harness panics on a finding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../fuzz/src/peer_message.rs"]
mod peer_message;
#[path = "../../fuzz/src/prometheus.rs"]
mod prometheus;
#[path = "../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../fuzz/src/yaml.rs"]
mod yaml;

use replay::replay;

#[test]
fn prometheus() {
    replay("prometheus", prometheus::run);
}

#[test]
fn pool_file() {
    replay("pool_file", yaml::pool_file);
}

#[test]
fn epp_config() {
    replay("epp_config", yaml::epp_config);
}

#[test]
fn peer_message() {
    replay("peer_message", peer_message::run);
}

#[test]
fn lora_config() {
    replay("lora_config", yaml::lora_config);
}
