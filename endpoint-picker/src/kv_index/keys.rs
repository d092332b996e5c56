//! Request keys: the index's own name for a block of tokens, computed the way llm-d's current
//! indexer computes them (`llm-d/llm-d-router@ebab6879:pkg/kvcache/kvblock/token_processor.go`,
//! `TokensToKVBlockKeys`), so that the same tokens give the same keys on the request path and
//! on the event path whatever hash the engine itself uses.
//!
//! Tokens are cut into full blocks of `block_size` (a trailing partial block has no key); each
//! block's key hashes its parent's key, its tokens and its extra keys; the chain starts from a
//! root that hashes the seed's hash and the model name (the LoRA adapter's name for adapter
//! traffic). Two algorithms, as llm-d's `hashAlgorithm`:
//!
//! - `cbor-fnv` (the default): FNV-64a over the canonical CBOR encoding of
//!   `[parent, tokens, extra]`; the root is that of `[fnv64a(seed), null, model]`;
//! - `xxh64`: one XXH64 (seed 0) over `parent` (8 bytes little-endian), the tokens (4 bytes
//!   little-endian each) and each extra string prefixed by its length (8 bytes little-endian);
//!   the root is that of `xxh64(seed)` with no tokens and the model as the one extra.
//!
//! The only extra this side knows is vLLM's `cache_salt`, which llm-d folds into the first
//! block's extras as `[{"Hash": salt}]` (`dataproducer/preciseprefixcache/blockkeys.go`,
//! `foldCacheSalt`). The canonical CBOR of these few shapes is fully determined (RFC 8949
//! §4.2.1: shortest lengths, definite lengths), so it is written straight into the hash with no
//! buffer: no allocation per block.

use xxhash_rust::xxh64::{Xxh64, xxh64};

/// vLLM's default block size, and llm-d's `blockSizeTokens` default.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Which chain of hashes request keys use (llm-d's `tokenProcessorConfig.hashAlgorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashAlgorithm {
    /// FNV-64a over canonical CBOR (`cbor-fnv`, the default).
    #[default]
    CborFnv,
    /// XXH64 over the raw little-endian bytes (`xxh64`).
    Xxh64,
}

impl HashAlgorithm {
    /// Parses llm-d's names (empty means the default).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "" | "cbor-fnv" => Some(Self::CborFnv),
            "xxh64" => Some(Self::Xxh64),
            _ => None,
        }
    }
}

/// Computes request keys. Cheap to copy; one per index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHasher {
    block_size: usize,
    algorithm: HashAlgorithm,
    /// The seed's own hash (llm-d's `initHash`).
    seed_hash: u64,
}

impl KeyHasher {
    /// A hasher for `block_size`-token blocks (at least 1) with llm-d's `hashSeed`.
    pub fn new(block_size: usize, seed: &str, algorithm: HashAlgorithm) -> Self {
        let seed_hash = match algorithm {
            HashAlgorithm::CborFnv => {
                let mut h = Fnv::new();
                h.bytes(seed.as_bytes());
                h.0
            }
            HashAlgorithm::Xxh64 => xxh64(seed.as_bytes(), 0),
        };
        Self {
            block_size: block_size.max(1),
            algorithm,
            seed_hash,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The chain's root for a model (or LoRA adapter) name.
    pub fn root(&self, model: &str) -> u64 {
        match self.algorithm {
            HashAlgorithm::CborFnv => {
                let mut h = Fnv::new();
                h.array(3);
                h.uint(self.seed_hash);
                h.null();
                h.text(model);
                h.0
            }
            HashAlgorithm::Xxh64 => {
                let mut h = Xxh64::new(0);
                h.update(&self.seed_hash.to_le_bytes());
                h.update(&(model.len() as u64).to_le_bytes());
                h.update(model.as_bytes());
                h.digest()
            }
        }
    }

    /// The key of one block of tokens after `parent`; `salt` is the first block's cache salt.
    pub fn block(&self, parent: u64, tokens: &[u32], salt: Option<&str>) -> u64 {
        match self.algorithm {
            HashAlgorithm::CborFnv => {
                let mut h = Fnv::new();
                h.array(3);
                h.uint(parent);
                h.array(tokens.len() as u64);
                for &t in tokens {
                    h.uint(u64::from(t));
                }
                match salt {
                    None => h.null(),
                    Some(salt) => {
                        // `[{"Hash": salt}]`: a list of one `MMHash` struct.
                        h.array(1);
                        h.head(5, 1);
                        h.text("Hash");
                        h.text(salt);
                    }
                }
                h.0
            }
            HashAlgorithm::Xxh64 => {
                let mut h = Xxh64::new(0);
                h.update(&parent.to_le_bytes());
                let mut buf = [0u8; 256];
                for chunk in tokens.chunks(buf.len() / 4) {
                    for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
                        dst.copy_from_slice(&t.to_le_bytes());
                    }
                    h.update(&buf[..chunk.len() * 4]);
                }
                if let Some(salt) = salt {
                    h.update(&(salt.len() as u64).to_le_bytes());
                    h.update(salt.as_bytes());
                }
                h.digest()
            }
        }
    }

    /// Appends the keys of `tokens`' full blocks, chained from `parent`, to `out`, at most
    /// `max_blocks` of them. `salt` (a non-empty cache salt) goes into the first block's
    /// extras, as llm-d folds it; it only applies when the chain starts at a root.
    pub fn keys_into(
        &self,
        parent: u64,
        tokens: &[u32],
        salt: Option<&str>,
        max_blocks: usize,
        out: &mut Vec<u64>,
    ) {
        let salt = salt.filter(|s| !s.is_empty());
        let mut prev = parent;
        let blocks = tokens.chunks_exact(self.block_size).take(max_blocks);
        out.reserve(blocks.len());
        for (i, block) in blocks.enumerate() {
            prev = self.block(prev, block, if i == 0 { salt } else { None });
            out.push(prev);
        }
    }

    /// The keys of a prompt: from the model's root, salt folded into the first block.
    pub fn prompt_keys(
        &self,
        model: &str,
        salt: Option<&str>,
        tokens: &[u32],
        max_blocks: usize,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        self.keys_into(self.root(model), tokens, salt, max_blocks, &mut out);
        out
    }
}

/// FNV-64a fed with canonical CBOR items.
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self(Self::OFFSET)
    }

    #[inline]
    fn byte(&mut self, b: u8) {
        self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
    }

    #[inline]
    fn bytes(&mut self, bs: &[u8]) {
        for &b in bs {
            self.byte(b);
        }
    }

    /// An item head: major type and argument, in the shortest form.
    #[inline]
    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        if arg < 24 {
            self.byte(m | arg as u8);
        } else if arg <= 0xff {
            self.byte(m | 24);
            self.byte(arg as u8);
        } else if arg <= 0xffff {
            self.byte(m | 25);
            self.bytes(&(arg as u16).to_be_bytes());
        } else if arg <= 0xffff_ffff {
            self.byte(m | 26);
            self.bytes(&(arg as u32).to_be_bytes());
        } else {
            self.byte(m | 27);
            self.bytes(&arg.to_be_bytes());
        }
    }

    fn uint(&mut self, v: u64) {
        self.head(0, v);
    }

    fn array(&mut self, len: u64) {
        self.head(4, len);
    }

    fn text(&mut self, s: &str) {
        self.head(3, s.len() as u64);
        self.bytes(s.as_bytes());
    }

    fn null(&mut self) {
        self.byte(0xf6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fnv(bytes: &[u8]) -> u64 {
        let mut h = Fnv::new();
        h.bytes(bytes);
        h.0
    }

    #[test]
    fn fnv64a_matches_its_published_vectors() {
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn cbor_encoding_is_the_canonical_one() {
        // [1000, [1, 24, 65536], null] in canonical CBOR, written out by hand (RFC 8949).
        let expected: &[u8] = &[
            0x83, 0x19, 0x03, 0xe8, 0x83, 0x01, 0x18, 0x18, 0x1a, 0x00, 0x01, 0x00, 0x00, 0xf6,
        ];
        let h = KeyHasher::new(3, "", HashAlgorithm::CborFnv);
        assert_eq!(h.block(1000, &[1, 24, 65536], None), fnv(expected));
        // Root: [fnv64a(""), null, "m"].
        let mut root = vec![0x83, 0x1b];
        root.extend_from_slice(&0xcbf2_9ce4_8422_2325u64.to_be_bytes());
        root.extend_from_slice(&[0xf6, 0x61, b'm']);
        assert_eq!(h.root("m"), fnv(&root));
        // The salt: [{"Hash": "s"}].
        let salted: &[u8] = &[
            0x83, 0x00, 0x81, 0x07, 0x81, 0xa1, 0x64, b'H', b'a', b's', b'h', 0x61, b's',
        ];
        assert_eq!(h.block(0, &[7], Some("s")), fnv(salted));
    }

    #[test]
    fn only_full_blocks_have_keys_and_they_chain() {
        for algorithm in [HashAlgorithm::CborFnv, HashAlgorithm::Xxh64] {
            let h = KeyHasher::new(4, "", algorithm);
            let tokens: Vec<u32> = (0..11).collect();
            let keys = h.prompt_keys("m", None, &tokens, usize::MAX);
            assert_eq!(keys.len(), 2, "{algorithm:?}");
            // Continuing a chain from a parent key gives the same keys as one pass.
            let mut tail = Vec::new();
            h.keys_into(keys[0], &tokens[4..], None, usize::MAX, &mut tail);
            assert_eq!(tail, keys[1..]);
            // Shared prefixes share keys; the model, the seed and the salt split chains.
            let other: Vec<u32> = (0..4).chain(100..104).collect();
            let k2 = h.prompt_keys("m", None, &other, usize::MAX);
            assert_eq!(k2[0], keys[0]);
            assert_ne!(k2[1], keys[1]);
            assert_ne!(h.prompt_keys("lora", None, &tokens, 9)[0], keys[0]);
            assert_ne!(h.prompt_keys("m", Some("s"), &tokens, 9)[0], keys[0]);
            assert_eq!(h.prompt_keys("m", Some(""), &tokens, 9), keys);
            let seeded = KeyHasher::new(4, "42", algorithm);
            assert_ne!(seeded.prompt_keys("m", None, &tokens, 9)[0], keys[0]);
            assert_eq!(h.prompt_keys("m", None, &tokens, 1).len(), 1);
        }
    }

    #[test]
    fn xxh64_layout_is_llm_d_s() {
        let h = KeyHasher::new(2, "", HashAlgorithm::Xxh64);
        let mut bytes = 5u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&2u32.to_le_bytes());
        assert_eq!(h.block(5, &[1, 2], None), xxh64(&bytes, 0));
        let mut root = xxh64(b"", 0).to_le_bytes().to_vec();
        root.extend_from_slice(&1u64.to_le_bytes());
        root.push(b'm');
        assert_eq!(h.root("m"), xxh64(&root, 0));
    }
}
