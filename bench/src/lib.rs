//! Benchmark support for Switchyard.
