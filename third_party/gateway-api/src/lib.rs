#![deny(unsafe_code)]

//! Rust bindings for the Kubernetes Gateway API: Switchyard's trimmed copy of `gateway-api`
//! 0.22.0 (kube-rs/gateway-api-rs), built on kube 5 / k8s-openapi 0.29. Only the standard
//! channel's HTTPRoute is kept; see README.md for every change.

/// Auto-generated Gateway API type bindings.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic, rust_2018_idioms)]
pub mod apis;
pub use apis::standard::*;
