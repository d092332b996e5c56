//! Approximate prefix hashing: the prompt cut into fixed-size character blocks, each block's
//! hash chained to the previous one, the chain seeded by the target model (and `cache_salt`).
//!
//! Two requests share the first `n` hashes exactly when they share the model, the salt and the
//! first `n` blocks of text, which is what an engine's prefix cache rewards. The scheme follows
//! the reference EPP (xxhash64, 4 characters per token, a trailing partial block hashed too), so
//! that a mixed fleet of EPPs would agree; only hashing costs matter here, and a 220 KB prompt
//! costs at most `max_blocks × block_chars` bytes of hashing, never a copy.

use xxhash_rust::xxh64::{Xxh64, xxh64};

/// The reference heuristic: one token is about four characters.
pub const CHARS_PER_TOKEN: usize = 4;

/// Blocks up to this many bytes are hashed in one call from a copy on the stack; longer ones
/// (an operator's `blockSizeTokens` above 64) through the streaming hasher.
const ONE_SHOT_BLOCK: usize = 256;

/// How to cut a prompt into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasher {
    /// Characters (bytes) per block.
    pub block_chars: usize,
    /// At most this many blocks are hashed.
    pub max_blocks: usize,
}

impl BlockHasher {
    /// A hasher for `block_tokens`-token blocks.
    pub fn from_tokens(block_tokens: usize, max_blocks: usize) -> Self {
        Self {
            // Saturating: `blockSizeTokens` is the operator's, up to `i64::MAX`.
            block_chars: block_tokens.saturating_mul(CHARS_PER_TOKEN).max(1),
            max_blocks,
        }
    }

    /// Appends the chained block hashes of `prompt` to `out`. A prompt shorter than one block
    /// yields no hashes (it cannot hit a cached block either).
    pub fn hash_into(
        &self,
        model: &str,
        cache_salt: Option<&str>,
        prompt: &[u8],
        out: &mut Vec<u64>,
    ) {
        if prompt.len() < self.block_chars || self.max_blocks == 0 {
            return;
        }
        let limit = prompt
            .len()
            .min(self.max_blocks.saturating_mul(self.block_chars));
        let prompt = &prompt[..limit];
        out.reserve(prompt.len().div_ceil(self.block_chars));
        let mut prev = seed(model, cache_salt);
        // Each block is hashed with its parent's hash appended. For blocks that fit, block and
        // parent are copied side by side and hashed in one call: the same value as feeding the
        // two to a streaming hasher, at about half the cost (the streaming state's set-up,
        // buffering and finish were a third of a decision at 10 endpoints for an 8 KB prompt).
        let mut joined = [0u8; ONE_SHOT_BLOCK + 8];
        for block in prompt.chunks(self.block_chars) {
            prev = match joined.get_mut(..block.len() + 8) {
                Some(buf) => {
                    let (text, parent) = buf.split_at_mut(block.len());
                    text.copy_from_slice(block);
                    parent.copy_from_slice(&prev.to_le_bytes());
                    xxh64(buf, 0)
                }
                None => {
                    let mut h = Xxh64::new(0);
                    h.update(block);
                    h.update(&prev.to_le_bytes());
                    h.digest()
                }
            };
            out.push(prev);
        }
    }

    /// Convenience wrapper returning a fresh vector.
    pub fn hash(&self, model: &str, cache_salt: Option<&str>, prompt: &[u8]) -> Vec<u64> {
        let mut out = Vec::new();
        self.hash_into(model, cache_salt, prompt, &mut out);
        out
    }
}

fn seed(model: &str, cache_salt: Option<&str>) -> u64 {
    match cache_salt {
        None | Some("") => xxh64(model.as_bytes(), 0),
        Some(salt) => {
            let mut h = Xxh64::new(0);
            h.update(model.as_bytes());
            h.update(salt.as_bytes());
            h.digest()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> BlockHasher {
        BlockHasher::from_tokens(16, 256)
    }

    #[test]
    fn huge_block_sizes_saturate() {
        // Found by review while fuzzing `epp_config`: `blockSizeTokens: 4611686018427387904`
        // overflowed `tokens × 4` (a panic with overflow checks, 1-byte blocks without).
        let h = BlockHasher::from_tokens(1 << 62, 4);
        assert_eq!(h.block_chars, usize::MAX);
        assert!(h.hash("m", None, b"short").is_empty());
    }

    #[test]
    fn short_prompts_have_no_blocks() {
        assert!(h().hash("m", None, &[b'a'; 63]).is_empty());
        assert_eq!(h().hash("m", None, &[b'a'; 64]).len(), 1);
        // A trailing partial block is hashed too.
        assert_eq!(h().hash("m", None, &[b'a'; 65]).len(), 2);
    }

    #[test]
    fn shared_prefix_gives_shared_hashes() {
        let a = [b"x".repeat(128), b"y".repeat(64)].concat();
        let b = [b"x".repeat(128), b"z".repeat(64)].concat();
        let (ha, hb) = (h().hash("m", None, &a), h().hash("m", None, &b));
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
    }

    #[test]
    fn chain_depends_on_model_salt_and_history() {
        let p = b"q".repeat(128);
        assert_ne!(h().hash("a", None, &p), h().hash("b", None, &p));
        assert_ne!(h().hash("a", None, &p), h().hash("a", Some("s"), &p));
        assert_eq!(h().hash("a", Some(""), &p), h().hash("a", None, &p));
        // Identical blocks at different positions hash differently (the chain).
        let hs = h().hash("a", None, &p);
        assert_ne!(hs[0], hs[1]);
    }

    #[test]
    fn one_shot_blocks_hash_as_the_streaming_chain_does() {
        // The chain as first defined: each block, then its parent's hash, streamed.
        fn streamed(block_chars: usize, prompt: &[u8]) -> Vec<u64> {
            let mut prev = seed("m", None);
            prompt
                .chunks(block_chars)
                .map(|block| {
                    let mut h = Xxh64::new(0);
                    h.update(block);
                    h.update(&prev.to_le_bytes());
                    prev = h.digest();
                    prev
                })
                .collect()
        }
        let prompt: Vec<u8> = (0..3_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Both sides of the one-shot bound, and a trailing partial block each time.
        for block_chars in [1, 4, 63, 64, 65, 255, 256, 257, 300, 1024] {
            let hasher = BlockHasher {
                block_chars,
                max_blocks: usize::MAX,
            };
            assert_eq!(
                hasher.hash("m", None, &prompt),
                streamed(block_chars, &prompt),
                "{block_chars}-byte blocks"
            );
        }
    }

    #[test]
    fn truncates_to_max_blocks() {
        let hasher = BlockHasher::from_tokens(16, 4);
        assert_eq!(hasher.hash("m", None, &vec![b'a'; 220 * 1024]).len(), 4);
    }
}
