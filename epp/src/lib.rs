//! The `epp` binary's library: flags, wiring, the admin and metrics server, the recorder that
//! turns request events into metrics and decision records, telemetry, TLS, CPU profiles, gRPC health
//! and the Kubernetes glue. The protocol lives in `ext-proc`, the decisions in `endpoint-picker`.

#![warn(missing_docs)]

pub mod admin;
pub mod args;
pub mod connections;
pub mod debug;
pub mod flow_metrics;
pub mod health;
pub mod kubernetes;
pub mod kv_events;
pub mod labels;
pub mod lora_placement;
pub mod memory_caps;
pub mod metrics;
pub mod profile;
pub mod recorder;
pub mod server;
pub mod signals;
pub mod speculation_peers;
pub mod supervisor;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod tokens;
