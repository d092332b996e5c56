//! Switchyard's Envoy side: the `ExternalProcessor` gRPC service and its per-stream state
//! machine, OpenAI request/response parsing, gRPC health, TLS, the metrics server, and the
//! wiring the `epp` binary runs.
//!
//! All protobuf types stay here; the decision core (`endpoint-picker`) never sees them.

pub mod admin;
pub mod args;
pub mod debug;
pub mod envoy;
pub mod error;
pub mod health;
pub mod metrics;
pub mod openai;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod tls;
