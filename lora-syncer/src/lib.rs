//! The `lora-syncer` binary's library: a sidecar next to each engine that keeps the LoRA
//! adapters declared in upstream's sidecar format (`vLLMLoRAConfig`, gateway-api-inference-
//! extension `tools/dynamic-lora-sidecar`) loaded, and those it must not have unloaded, through
//! vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
//!
//! * [`config`] — the file format, checked (`endpoint_picker::lora::config`).
//! * [`engine`] — the engine's adapter API, with deadlines and bounded reads
//!   (`endpoint_picker::lora::engine`).
//! * [`reconcile`] — one pass (no timers inside: tests drive it), backoff, restart detection.
//! * [`metrics`] — per-adapter state and call counts.
//! * [`run`] — the config poller and the reconcile loop, as supervised tasks.
//! * [`target`] — which engine is called (the operator's, not the file's) and when the API
//!   key goes with the calls.

#![warn(missing_docs)]

pub mod metrics;
pub mod reconcile;
pub mod run;
pub mod target;

// The file format and the engine client live in the decision core, which the EPP's adapter
// placement shares; the syncer's paths stay as they were.
pub use endpoint_picker::lora::{config, engine};
