// Switchyard's copy keeps only the HTTPRoute API (see the crate's README.md).
mod enum_defaults;
pub mod httproutes;
