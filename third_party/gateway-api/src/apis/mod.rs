// Switchyard's copy keeps only the standard channel (see the crate's README.md).
pub mod standard;
