//! What-if: replay traffic against routing configs in virtual time.
//!
//! The real scheduler (`endpoint-picker`'s director, any EndpointPickerConfig) drives N
//! instances of the simulator's engine model (`sim::Engine`) on a paused-time tokio runtime:
//! no sleeping, no sockets, exact and repeatable, hours of traffic in minutes. See
//! [`replay`] for what the EPP is shown and when, [`trace`] for the inputs and [`report`] for
//! the outputs.

#![warn(missing_docs)]

pub mod replay;
pub mod report;
pub mod trace;

/// `--config precise`: the `balanced` profile with `precise-prefix-cache-scorer` (fed by the
/// engines' KV events) in place of the approximate prefix scorer, and a token producer.
pub const PRECISE_PROFILE: &str = include_str!("precise.yaml");

/// What can go wrong before or during a replay.
#[derive(Debug, thiserror::Error)]
pub enum WhatIfError {
    /// A trace could not be read or built.
    #[error("trace: {0}")]
    Trace(String),
    /// A routing config or an engine knob is unusable.
    #[error("config: {0}")]
    Config(String),
    /// The virtual-time runtime could not start.
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A request's task panicked.
    #[error("replay task: {0}")]
    Task(String),
}
