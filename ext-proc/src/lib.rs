//! Switchyard's Envoy side: the `ExternalProcessor` gRPC service and its per-stream state
//! machine, OpenAI request/response parsing, the protocol's names, and the one mapping of
//! request errors to `ImmediateResponse`s. Shared by the `epp` and `bbr` binaries.
//!
//! The port's wire format is read and written in [`codec`]: bodies stay `Bytes` from tonic's
//! receive buffer to its send buffer (envoy-types' generated server would copy each body into
//! and out of a protobuf `Vec<u8>`). All protobuf types stay here; the decision core (`endpoint-picker`) never sees them, and
//! nothing here knows Kubernetes, flags or HTTP servers: what a binary wants recorded about each
//! request it receives through a [`recorder::Recorder`].

#![warn(missing_docs)]

pub mod body_budget;
pub mod body_pool;
pub mod codec;
pub mod envoy;
pub mod error;
#[cfg(feature = "conformance-faults")]
pub mod faults;
pub mod json_usage;
pub mod observer;
pub mod openai;
pub mod protocol;
pub mod recorder;
pub mod service;
pub mod stream;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod untrusted;
