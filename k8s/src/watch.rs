//! Watches feeding the index (work in progress).
