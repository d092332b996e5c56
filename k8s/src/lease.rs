//! Leader election (work in progress).
