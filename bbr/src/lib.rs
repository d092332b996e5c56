//! The `bbr` binary's library: Switchyard's body-based router (BBR).
//!
//! An ext_proc server placed before route matching: it reads the OpenAI request body's
//! `model` (with the EPP's parser and validation, `ext_proc::openai`), sets
//! `X-Gateway-Model-Name` and `X-Gateway-Base-Model-Name` (a LoRA adapter's base model from the
//! mapping), clears the route cache so the gateway matches the route again on them, and
//! forwards the body untouched. Upstream BBR's contract and flags
//! (gateway-api-inference-extension `cmd/bbr`, `pkg/bbr`).
//!
//! * [`mapping`] — adapter → base model, per source, with bounded sizes.
//! * [`stream`] — the per-stream state machine (no I/O).
//! * [`service`] — the tonic service around it.
//! * [`kube`] — Kubernetes mode: the watch of the managed ConfigMaps.
//! * [`file`](mod@file) — file mode: the mapping file, reloaded on change.
//! * [`models`] — `GET /v1/models`, answered by the router.
//! * [`routes`] — Kubernetes mode: model → pool from the HTTPRoutes, unmatchable routes.
//! * [`metrics`] — `bbr_*` metrics with bounded labels.
//! * [`server`] — wiring under the EPP's supervisor, gRPC health, `/metrics`.
//! * [`args`] — the flags.

#![warn(missing_docs)]

pub mod args;
pub mod file;
pub mod kube;
pub mod mapping;
pub mod metrics;
pub mod models;
pub mod routes;
pub mod server;
pub mod service;
pub mod stream;
