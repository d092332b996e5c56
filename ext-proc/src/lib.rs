//! Envoy side.
