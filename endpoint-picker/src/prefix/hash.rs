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
        if prompt.len() < self.block_chars || self.block_chars == 0 || self.max_blocks == 0 {
            return;
        }
        let limit = prompt
            .len()
            .min(self.max_blocks.saturating_mul(self.block_chars));
        let prompt = &prompt[..limit];
        out.reserve(prompt.len().div_ceil(self.block_chars));
        let mut prev = seed(model, cache_salt);
        // Each block is hashed with its parent's hash appended.
        let mut blocks = prompt.chunks_exact(self.block_chars);
        if self.block_chars.is_multiple_of(STRIPE) {
            // Whole stripes of text: xxh64 consumes them before it reads the parent, so each
            // block's stripes do not wait for the previous block's hash and the CPU overlaps
            // them with it; only the parent's round and the final mix form the chain.
            for block in blocks.by_ref() {
                prev = chained_xxh64(stripes(block), prev);
                out.push(prev);
            }
        }
        // Other block sizes, and the trailing partial block. For blocks that fit, block and
        // parent are copied side by side and hashed in one call: the same value as feeding the
        // two to a streaming hasher, at about half the cost (the streaming state's set-up,
        // buffering and finish were a third of a decision at 10 endpoints for an 8 KB prompt).
        let rest = blocks.remainder();
        let mut joined = [0u8; ONE_SHOT_BLOCK + 8];
        for block in blocks.chain((!rest.is_empty()).then_some(rest)) {
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

// xxh64 (seed 0) of a block of whole stripes followed by its parent's 8 bytes, in two parts
// (the algorithm as its specification, github.com/Cyan4973/xxHash doc/xxhash_spec.md, defines
// it; the tests check every value against the `xxhash-rust` crate).
const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
/// Bytes xxh64 consumes at a time, four lanes of 8.
const STRIPE: usize = 32;

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, lane: u64) -> u64 {
    (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
}

/// The state xxh64 (seed 0) reaches over `text ‖ parent` once it has consumed `text`, whose
/// length is a non-zero multiple of [`STRIPE`]: the lanes over the stripes, merged, plus the
/// whole input's length.
fn stripes(text: &[u8]) -> u64 {
    let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
    let (stripes, _) = text.as_chunks::<STRIPE>();
    for stripe in stripes {
        let (lanes, _) = stripe.as_chunks::<8>();
        for (acc, lane) in v.iter_mut().zip(lanes) {
            *acc = round(*acc, u64::from_le_bytes(*lane));
        }
    }
    let mut h = v[0]
        .rotate_left(1)
        .wrapping_add(v[1].rotate_left(7))
        .wrapping_add(v[2].rotate_left(12))
        .wrapping_add(v[3].rotate_left(18));
    for acc in v {
        h = merge(h, acc);
    }
    h.wrapping_add(text.len() as u64 + 8)
}

/// Finishes [`stripes`]' state with the parent's hash: `xxh64(text ‖ parent_le, 0)`.
fn chained_xxh64(state: u64, parent: u64) -> u64 {
    let mut h = (state ^ round(0, parent))
        .rotate_left(27)
        .wrapping_mul(P1)
        .wrapping_add(P4);
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
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
        for block_chars in [1, 4, 32, 63, 64, 65, 96, 255, 256, 257, 300, 1024] {
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

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x4a54),
            failure_persistence: None,
            ..Default::default()
        })]
        /// The two-part hash is xxh64 of the block and its parent, for every length of whole
        /// stripes.
        #[test]
        fn split_xxh64_is_xxh64(
            text in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300),
            parent in proptest::prelude::any::<u64>(),
        ) {
            let text = &text[..text.len() / STRIPE * STRIPE];
            proptest::prop_assume!(!text.is_empty());
            let joined = [text, &parent.to_le_bytes()].concat();
            proptest::prop_assert_eq!(chained_xxh64(stripes(text), parent), xxh64(&joined, 0));
        }
    }

    #[test]
    fn truncates_to_max_blocks() {
        let hasher = BlockHasher::from_tokens(16, 4);
        assert_eq!(hasher.hash("m", None, &vec![b'a'; 220 * 1024]).len(), 4);
    }
}
