//! Reusing the ids of a text's beginning that an earlier request already tokenised.
//!
//! Prompts that share a long beginning (a system prompt, a document, the earlier turns of a
//! conversation) are the ones prefix routing exists for, and byte-level BPE spends most of its
//! time pre-tokenising and merging that shared part again for every request: about 5 ms of a
//! core per 14 KB chat request with the test tokenizer, the EPP's largest cost under the
//! precise profile. This cache keeps the ids of each 256-byte chunk of the texts it has seen,
//! chained by a keyed hash of everything before, and a new text reuses them for as many whole
//! chunks as it shares with an earlier one; only the rest is encoded.
//!
//! **Why the ids are exact.** A text is cut only after an ASCII letter and before a space
//! (`is_cut`), and each piece between two cuts is encoded on its own. For the byte-level BPE
//! pre-tokenizers `PrefixCache::supports` accepts (GPT-2's regex, Llama 3's and Qwen 2's,
//! split `Isolated`, then byte-level), every alternative that takes a letter stops at the first
//! non-letter, and none that takes the space can take the letter before it (none looks behind),
//! so no pre-token crosses the cut. A piece ends with a letter, so a whitespace run inside it
//! is followed by the same character whether the piece is encoded alone or in the whole text
//! (`\s+(?!\S)` looks one character ahead; a cut after a newline would break exactly that, and
//! the property tests show it). BPE merges within one pre-token. An added token (special or
//! not) with no whitespace in it, and no `lstrip`, `rstrip` or `single_word`, cannot cover a
//! cut either. Each chunk's entry is the ids of the text between its cut and the previous one,
//! stored only when the cut lies before the chunk's last byte, so that the space the cut is
//! decided by is part of what the chain hash covers. Anything else (a normalizer, another
//! pre-tokenizer, BPE dropout, an added token with whitespace, a post-processor that appends)
//! turns the cache off at load, and a self-check at load compares cached and whole encodings of
//! sample texts as a second guard. NFC, Qwen 2's normalizer, is the one normalizer allowed: it
//! changes nothing across such a cut (`PrefixCache::supports` says why).
//!
//! **Bounds.** At most [`Limits::prefix_cache_bytes`](crate::Limits::prefix_cache_bytes) of
//! ids and entry overhead, least recently used first out; a chain's entries are kept and
//! refreshed last to first, so the first chunk of a prefix in use is the last to go. The chain hash is
//! SipHash keyed at random per process, so a client cannot make its text collide with another's.
//! A client's text only ever reads entries for exactly the bytes it sent.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use parking_lot::Mutex;

/// Bytes of text per chunk: the granularity of reuse. A shorter chunk reuses more of a shared
/// beginning (at most one chunk of it is encoded again) for more entries and more encoder calls
/// on a miss.
pub const CHUNK_BYTES: usize = 256;

/// What one entry costs beyond its ids: the map's slot and list links, the boxed slice's
/// header, the cut.
const ENTRY_OVERHEAD_BYTES: usize = 96;

/// The Split regexes whose cuts are proven above: GPT-2's (also what `ByteLevel` with
/// `use_regex` runs), Llama 3's, and Qwen 2's (Llama 3's with single digits).
const KNOWN_PATTERNS: [&str; 3] = [
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];

/// Whether the ids of `text[..at]` followed by those of `text[at..]` are the ids of `text`
/// (for a tokenizer `PrefixCache::supports` accepts): an ASCII letter, then a space.
pub(crate) fn is_cut(text: &[u8], at: usize) -> bool {
    at > 0 && at < text.len() && text[at - 1].is_ascii_alphabetic() && text[at] == b' '
}

/// Every cut of `text`.
pub(crate) fn cuts(text: &str) -> impl Iterator<Item = usize> + '_ {
    (1..text.len()).filter(|&at| is_cut(text.as_bytes(), at))
}

/// The last cut in `text[from..to]`, `to` excluded (so the cut's character is before `to`).
fn last_cut(text: &[u8], from: usize, to: usize) -> Option<usize> {
    (from.max(1)..to).rev().find(|&at| is_cut(text, at))
}

/// The ids of the text between the previous chunk's cut and this one's.
#[derive(Debug)]
struct Entry {
    /// Where this chunk's ids end in the text (a cut, or the previous chunk's when this chunk
    /// holds none).
    cut: usize,
    ids: Box<[u32]>,
}

impl Entry {
    fn cost(&self) -> usize {
        self.ids.len() * std::mem::size_of::<u32>() + ENTRY_OVERHEAD_BYTES
    }
}

#[derive(Debug)]
struct State {
    entries: LruCache<u64, Entry>,
    bytes: usize,
}

/// How much the cache saved: bytes of text whose ids were reused, and bytes encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Bytes of text whose ids came from the cache.
    pub reused_bytes: u64,
    /// Bytes of text encoded.
    pub encoded_bytes: u64,
    /// Bytes of ids and entry overhead held now.
    pub held_bytes: u64,
}

/// The cache of one tokenizer: ids of text chunks, keyed by a hash of the text up to each.
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    keys: RandomState,
    state: Mutex<State>,
    reused: AtomicU64,
    encoded: AtomicU64,
}

/// The pre-tokenizer, normalizer, model and added tokens of a tokenizer, as the cache needs
/// them to decide whether cutting is exact.
#[derive(Debug)]
pub(crate) struct Shape {
    /// The normalizer, as `tokenizer.json` writes it.
    pub normalizer: Option<serde_json::Value>,
    pub pre_tokenizer: Option<serde_json::Value>,
    pub bpe_without_dropout: bool,
    pub added_tokens: Vec<tokenizers::AddedToken>,
}

impl PrefixCache {
    /// A cache of at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            keys: RandomState::new(),
            state: Mutex::new(State {
                entries: LruCache::unbounded(),
                bytes: 0,
            }),
            reused: AtomicU64::new(0),
            encoded: AtomicU64::new(0),
        }
    }

    /// Why a tokenizer of this shape cannot be cut exactly, if it cannot.
    pub(crate) fn supports(shape: &Shape) -> Result<(), &'static str> {
        // NFC (Qwen 2's) works character by character, apart from reordering runs of
        // combining marks and composing a character with the ones after it; a space is no
        // combining mark and composes with nothing, so neither crosses a cut, and an ASCII
        // letter and a space are their own NFC. Any other normalizer is not checked.
        if shape
            .normalizer
            .as_ref()
            .is_some_and(|n| *n != serde_json::json!({"type": "NFC"}))
        {
            return Err("the tokenizer has a normalizer other than NFC");
        }
        if !shape.bpe_without_dropout {
            return Err("the model is not BPE without dropout");
        }
        let byte_level = |v: &serde_json::Value, use_regex: bool| {
            v["type"] == "ByteLevel"
                && v["add_prefix_space"] == false
                && v["use_regex"] == use_regex
        };
        let known = match &shape.pre_tokenizer {
            Some(v) if byte_level(v, true) => true,
            Some(v) if v["type"] == "Sequence" => match v["pretokenizers"].as_array() {
                Some(steps) if steps.len() == 2 => {
                    let split = &steps[0];
                    split["type"] == "Split"
                        && split["behavior"] == "Isolated"
                        && split["invert"] == false
                        && split["pattern"]["Regex"]
                            .as_str()
                            .is_some_and(|p| KNOWN_PATTERNS.contains(&p))
                        && byte_level(&steps[1], false)
                }
                _ => false,
            },
            _ => false,
        };
        if !known {
            return Err("the pre-tokenizer is not a known byte-level BPE split");
        }
        if shape.added_tokens.iter().any(|t| {
            t.lstrip || t.rstrip || t.single_word || t.content.chars().any(char::is_whitespace)
        }) {
            return Err("an added token strips, is single-word, or holds whitespace");
        }
        Ok(())
    }

    /// The ids of `text`, each chunk's from the cache where an earlier text began with the same
    /// bytes, the rest by `encode_piece` (which must encode without adding special tokens), in pieces
    /// between cuts; the pieces of whole chunks are kept for the next text.
    pub fn encode<E>(
        &self,
        text: &str,
        mut encode_piece: impl FnMut(&str) -> Result<Vec<u32>, E>,
    ) -> Result<Vec<u32>, E> {
        let bytes = text.as_bytes();
        let chunks = bytes.len() / CHUNK_BYTES;
        // The chain: each chunk's key covers every byte before its end.
        let mut keys = Vec::with_capacity(chunks);
        let mut chain = 0u64;
        for chunk in bytes.chunks_exact(CHUNK_BYTES) {
            let mut h = self.keys.build_hasher();
            chain.hash(&mut h);
            chunk.hash(&mut h);
            chain = h.finish();
            keys.push(chain);
        }
        let mut ids = Vec::new();
        let mut cut = 0;
        let mut reused_chunks = 0;
        {
            let mut state = self.state.lock();
            for (i, key) in keys.iter().enumerate() {
                let Some(entry) = state.entries.peek(key) else {
                    break;
                };
                // Defensive (a 64-bit key collision): an entry's cut lies in its own chunk or
                // is the one before, and is a cut of this text (so a character's boundary).
                if entry.cut < cut
                    || entry.cut >= (i + 1) * CHUNK_BYTES
                    || (entry.cut != cut && !is_cut(bytes, entry.cut))
                {
                    break;
                }
                ids.extend_from_slice(&entry.ids);
                cut = entry.cut;
                reused_chunks = i + 1;
            }
            // Marked used now, so that what this text's fresh chunks evict is not its own
            // prefix; again after they are kept ([`Self::keep`]).
            for key in keys[..reused_chunks].iter().rev() {
                state.entries.promote(key);
            }
        }
        self.reused.fetch_add(cut as u64, Ordering::Relaxed);
        self.encoded
            .fetch_add((bytes.len() - cut) as u64, Ordering::Relaxed);

        let mut fresh = Vec::new();
        for (i, &key) in keys.iter().enumerate().skip(reused_chunks) {
            let end = (i + 1) * CHUNK_BYTES;
            let next = last_cut(bytes, cut.max(i * CHUNK_BYTES), end - 1).unwrap_or(cut);
            let piece = if next > cut {
                encode_piece(&text[cut..next])?
            } else {
                Vec::new()
            };
            ids.extend_from_slice(&piece);
            fresh.push((
                key,
                Entry {
                    cut: next,
                    ids: piece.into_boxed_slice(),
                },
            ));
            cut = next;
        }
        if cut < bytes.len() {
            ids.extend(encode_piece(&text[cut..])?);
        }
        self.keep(&keys[..reused_chunks], fresh);
        Ok(ids)
    }

    /// Keeps the `fresh` entries after the `reused` chain and marks the whole chain used,
    /// last chunk to first: a lookup stops at its first miss, so a chain's first chunk must be
    /// the last of it evicted (evicted first, it would leave the rest held and unreachable).
    fn keep(&self, reused: &[u64], mut fresh: Vec<(u64, Entry)>) {
        // An entry larger than the whole cache ends what can be kept of the chain.
        if let Some(too_large) = fresh.iter().position(|(_, e)| e.cost() > self.capacity) {
            fresh.truncate(too_large);
        }
        let mut state = self.state.lock();
        for (key, entry) in fresh.into_iter().rev() {
            state.bytes += entry.cost();
            if let Some((_, old)) = state.entries.push(key, entry) {
                state.bytes -= old.cost();
            }
        }
        for key in reused.iter().rev() {
            state.entries.promote(key);
        }
        // Evicted only now, the whole chain marked: a chain's own prefix is never evicted
        // for its tail.
        while state.bytes > self.capacity {
            let Some((_, old)) = state.entries.pop_lru() else {
                break;
            };
            state.bytes -= old.cost();
        }
    }

    /// What the cache has saved so far, and what it holds.
    pub fn stats(&self) -> PrefixCacheStats {
        let held = self.state.lock().bytes;
        PrefixCacheStats {
            reused_bytes: self.reused.load(Ordering::Relaxed),
            encoded_bytes: self.encoded.load(Ordering::Relaxed),
            held_bytes: held as u64,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().entries.len()
    }
}

/// Texts the load-time self-check encodes cut at each of their cuts and whole: every ordered
/// pair of the kinds of piece the known pre-tokenizers tell apart (letters, digits, punctuation,
/// contractions, runs of spaces, tabs and newlines, non-ASCII letters and symbols, what NFC
/// composes) and of
/// `added` (the tokenizer's added tokens), glued, then a space; in texts of about 200 bytes.
pub(crate) fn self_check_texts(added: &[String]) -> Vec<String> {
    const WORDS: [&str; 27] = [
        "The",
        "endpoint",
        "it's",
        "WE'RE",
        "they'll",
        "4096",
        "12345678",
        "3.14",
        "émigré",
        "naïve",
        "日本語",
        "—",
        "?!",
        "(x)",
        "\"q\"",
        "a",
        "I",
        "\t",
        "  ",
        "\n",
        "\n\n",
        " \n",
        "\r\n",
        "ok.",
        // What NFC composes: a letter and a combining mark, Hangul jamo, a lone mark.
        "e\u{301}",
        "\u{1100}\u{1161}",
        "\u{308}",
    ];
    let words: Vec<&str> = WORDS
        .iter()
        .copied()
        .chain(added.iter().map(String::as_str))
        .collect();
    let mut texts = Vec::new();
    let mut text = String::new();
    for x in &words {
        for y in &words {
            text.push_str(x);
            text.push_str(y);
            text.push(' ');
            if text.len() >= 200 {
                texts.push(std::mem::take(&mut text));
            }
        }
    }
    texts.push(text);
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake encoder: one id per byte, so pieces are checkable, and a record of what it was
    /// asked to encode.
    fn bytes_encoder(log: &mut Vec<String>) -> impl FnMut(&str) -> Result<Vec<u32>, ()> + '_ {
        move |s: &str| {
            log.push(s.to_owned());
            Ok(s.bytes().map(u32::from).collect())
        }
    }

    fn prose(words: usize, seed: u32) -> String {
        let mut s = String::new();
        for i in 0..words {
            let w = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 7;
            s.push_str(["alpha", "beta", "gamma\n", "delta,", "eps", "zeta", "eta"][w as usize]);
            s.push(' ');
        }
        s
    }

    #[test]
    fn cuts_are_after_a_letter_before_a_space() {
        let t = b"ab cd\nef 1 \nx y";
        let cuts: Vec<usize> = (0..t.len()).filter(|&i| is_cut(t, i)).collect();
        assert_eq!(cuts, vec![2, 8, 13]);
        assert!(!is_cut(t, 0));
        assert!(!is_cut(t, t.len()));
    }

    #[test]
    fn a_shared_beginning_is_reused_and_the_rest_encoded() {
        let cache = PrefixCache::new(1 << 20);
        let shared = prose(400, 1);
        let first = format!("{shared}first question");
        let second = format!("{shared}another question entirely");
        let mut log = Vec::new();
        let a = cache.encode(&first, bytes_encoder(&mut log)).unwrap();
        assert_eq!(a, first.bytes().map(u32::from).collect::<Vec<_>>());
        assert!(cache.len() >= shared.len() / CHUNK_BYTES);
        let mut log = Vec::new();
        let b = cache.encode(&second, bytes_encoder(&mut log)).unwrap();
        assert_eq!(b, second.bytes().map(u32::from).collect::<Vec<_>>());
        let encoded: usize = log.iter().map(String::len).sum();
        assert!(
            encoded < 2 * CHUNK_BYTES + 30,
            "only the end is encoded again: {encoded} bytes"
        );
        let stats = cache.stats();
        assert_eq!(
            stats.reused_bytes + stats.encoded_bytes,
            (first.len() + second.len()) as u64
        );
        assert!(stats.reused_bytes > (shared.len() - 2 * CHUNK_BYTES) as u64);
    }

    #[test]
    fn every_piece_begins_and_ends_at_a_cut() {
        let cache = PrefixCache::new(1 << 20);
        let text = prose(300, 7);
        let mut log = Vec::new();
        cache.encode(&text, bytes_encoder(&mut log)).unwrap();
        let mut at = 0;
        for piece in &log {
            assert!(at == 0 || is_cut(text.as_bytes(), at), "piece at {at}");
            at += piece.len();
        }
        assert_eq!(at, text.len());
    }

    #[test]
    fn a_chunk_without_a_cut_joins_the_next_piece() {
        let cache = PrefixCache::new(1 << 20);
        // 600 bytes with no space or newline, then prose.
        let text = format!("{}{}", "x".repeat(600), prose(200, 3));
        let mut log = Vec::new();
        let ids = cache.encode(&text, bytes_encoder(&mut log)).unwrap();
        assert_eq!(ids.len(), text.len());
        assert!(log[0].len() > 600, "the first piece runs to the first cut");
        let mut again = Vec::new();
        assert_eq!(cache.encode(&text, bytes_encoder(&mut again)).unwrap(), ids);
    }

    #[test]
    fn the_cache_stays_within_its_bytes_and_keeps_a_prefixs_first_chunks() {
        let capacity = 8 * 1024;
        let cache = PrefixCache::new(capacity);
        let hot = prose(200, 11);
        for i in 0..50 {
            let mut log = Vec::new();
            cache
                .encode(
                    &format!("{hot}{}", prose(100, 100 + i)),
                    bytes_encoder(&mut log),
                )
                .unwrap();
            assert!(cache.stats().held_bytes <= capacity as u64);
            let mut log = Vec::new();
            cache.encode(&hot, bytes_encoder(&mut log)).unwrap();
        }
        // The hot prefix, used between every cold text, still begins in the cache.
        let mut log = Vec::new();
        cache.encode(&hot, bytes_encoder(&mut log)).unwrap();
        assert!(log.first().is_none_or(|p| p.len() < hot.len()), "{log:?}");
        assert!(cache.stats().held_bytes > 0);
    }

    /// Review 16: a text longer than the cache kept its chunks first to last, so the last
    /// ones evicted its first and none could be reached again. Its first chunks are kept now,
    /// and a text that goes on from a cached one keeps that one's chunks before its own.
    #[test]
    fn a_text_longer_than_the_cache_keeps_its_first_chunks() {
        let capacity = 8 * 1024;
        let cache = PrefixCache::new(capacity);
        let long = prose(2000, 13);
        assert!(
            long.len() * 4 > 2 * capacity,
            "twice the ids (4 bytes each) the cache holds"
        );
        let mut log = Vec::new();
        cache.encode(&long, bytes_encoder(&mut log)).unwrap();
        assert!(cache.stats().held_bytes <= capacity as u64);
        let mut log = Vec::new();
        let ids = cache.encode(&long, bytes_encoder(&mut log)).unwrap();
        assert_eq!(ids, long.bytes().map(u32::from).collect::<Vec<_>>());
        let reused = cache.stats().reused_bytes;
        assert!(reused > 4 * CHUNK_BYTES as u64, "reused {reused} bytes");
        assert!(
            !long.starts_with(log[0].as_str()),
            "the front was not encoded again"
        );
        // A text held whole (60 % of the cache), then itself and as much again: its chunks
        // stay, the new ones go.
        let cache = PrefixCache::new(capacity);
        let first = prose(270, 17);
        let mut log = Vec::new();
        cache.encode(&first, bytes_encoder(&mut log)).unwrap();
        let held = cache.stats().held_bytes;
        assert!(held > capacity as u64 / 2, "held {held}");
        let longer = format!("{first}{}", prose(270, 19));
        let mut log = Vec::new();
        cache.encode(&longer, bytes_encoder(&mut log)).unwrap();
        let before = cache.stats().reused_bytes;
        let mut log = Vec::new();
        cache.encode(&first, bytes_encoder(&mut log)).unwrap();
        let reused = cache.stats().reused_bytes - before;
        assert!(
            reused + 2 * CHUNK_BYTES as u64 > first.len() as u64,
            "reused {reused} of {}",
            first.len()
        );
    }

    #[test]
    fn texts_differing_in_one_byte_share_only_the_chunks_before_it() {
        let cache = PrefixCache::new(1 << 20);
        let a = prose(300, 5);
        let mut b = a.clone().into_bytes();
        let at = 3 * CHUNK_BYTES + 10;
        b[at] = if b[at] == b'a' { b'o' } else { b'a' };
        let b = String::from_utf8(b).unwrap();
        let mut log = Vec::new();
        cache.encode(&a, bytes_encoder(&mut log)).unwrap();
        let mut log = Vec::new();
        let ids = cache.encode(&b, bytes_encoder(&mut log)).unwrap();
        assert_eq!(ids, b.bytes().map(u32::from).collect::<Vec<_>>());
        let reencoded: usize = log.iter().map(String::len).sum();
        assert!(reencoded >= b.len() - 3 * CHUNK_BYTES);
    }
}
