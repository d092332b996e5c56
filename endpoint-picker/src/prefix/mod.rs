//! Approximate prefix-cache awareness: block hashing of prompts and the routing-history index.

mod block_lru;
pub mod hash;
pub mod index;

pub use hash::BlockHasher;
pub use index::PrefixIndex;
