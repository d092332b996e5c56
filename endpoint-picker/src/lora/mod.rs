//! LoRA adapters: the catalogue format, the engines' adapter API, and the pieces of the EPP's
//! opt-in demand-driven placement (README "LoRA placement").
//!
//! * [`config`] — upstream's sidecar format (`vLLMLoRAConfig`), checked; the `lora-syncer`
//!   sidecar and the EPP's placement read the same files.
//! * [`engine`] — vLLM's adapter API (`/v1/models`, `/v1/load_lora_adapter`,
//!   `/v1/unload_lora_adapter`), with deadlines and bounded reads.
//! * [`demand`] — per-adapter demand counted on the request path (atomics, one short lock),
//!   only for adapters the catalogue declares.
//! * [`plan`] — the placement decision: demand and what each replica holds in, loads and
//!   unloads out. Pure: no I/O, no clock (tests drive it).
//!
//! The loop that runs them (scrapes each engine's adapters, plans, calls the engines) is the
//! binary's (`epp/src/lora_placement.rs`); what it last saw each endpoint hold is published on
//! the endpoint ([`crate::datastore::Endpoint::adapters`]) for `lora-affinity-scorer` and
//! `lora-adapter-filter`.

pub mod config;
pub mod demand;
pub mod engine;
pub mod plan;

use std::collections::BTreeSet;

/// The adapters an engine has registered, as the placement loop last listed them
/// (`GET /v1/models`). Published whole on the endpoint; the request path only reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedAdapters {
    /// Adapter names.
    pub names: BTreeSet<String>,
}

impl LoadedAdapters {
    /// Whether `name` is registered there.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}
