//! Shared by the integration tests (and, by path, the simulator's wire test).
pub mod msgspec;
