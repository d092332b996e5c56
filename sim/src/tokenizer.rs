//! A deterministic, prefix-stable stand-in tokeniser and a Llama-3-like chat template.
//!
//! Real engines tokenise with BPE; what matters for routing is that (1) the same text always gives
//! the same ids, (2) a shared text prefix gives shared leading token ids (so prefix caching works
//! across requests), and (3) the ratio is roughly 4 characters per token, the figure the EPP's
//! approximate, character-based prefix hashing assumes. The rules:
//!
//! - a run of letters is cut into pieces of at most 4 letters; a single space directly before a
//!   letter run is glued to its first piece (`" hello"` → `" hell"`, `"o"`);
//! - a run of digits is cut into pieces of at most 3 digits;
//! - other whitespace is cut into runs of at most 4 characters;
//! - every other character (punctuation, symbols) is one token;
//! - a piece's id is `xxh64(piece) mod 128000`; ids `128000..128256` are special tokens.
//!
//! Each piece depends only on the text up to its end plus one character of look-ahead, so the
//! ids of any prefix of a text are a prefix of the ids of the text, except possibly the last one
//! (exactly like BPE, whose last token can change when the text grows).
//!
//! [`Tokenizer`] chooses between this built-in stand-in (the default) and a real model's
//! `tokenizer.json` and chat template (`--tokenizer`, `--chat-template`, as vLLM's flags), loaded
//! with the `tokenize` crate the EPP's token producer uses, so that the simulator's KV blocks and
//! events carry the ids the EPP computes.

use std::path::Path;
use std::sync::Arc;

use xxhash_rust::xxh64::xxh64;

/// Size of the id space, as Llama 3's vocabulary.
pub const VOCAB_SIZE: u32 = 128_256;
/// Ids below this are ordinary pieces; the rest are special tokens.
pub const FIRST_SPECIAL: u32 = 128_000;
/// `<|begin_of_text|>`.
pub const BOS: u32 = 128_000;
/// `<|start_header_id|>`.
pub const START_HEADER: u32 = 128_006;
/// `<|end_header_id|>`.
pub const END_HEADER: u32 = 128_007;
/// `<|eot_id|>`.
pub const EOT: u32 = 128_009;

/// Appends the ids of `text` to `out`.
pub fn encode_into(text: &str, out: &mut Vec<u32>) {
    let bytes = text.as_bytes();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let mut end = start + c.len_utf8();
        if c.is_alphabetic() || (c == ' ' && chars.peek().is_some_and(|&(_, n)| n.is_alphabetic()))
        {
            // A letter piece, possibly with its leading space.
            let mut letters = usize::from(c != ' ');
            while letters < 4 {
                match chars.peek() {
                    Some(&(i, n)) if n.is_alphabetic() => {
                        end = i + n.len_utf8();
                        letters += 1;
                        chars.next();
                    }
                    _ => break,
                }
            }
        } else if c.is_ascii_digit() {
            let mut digits = 1;
            while digits < 3 {
                match chars.peek() {
                    Some(&(i, n)) if n.is_ascii_digit() => {
                        end = i + n.len_utf8();
                        digits += 1;
                        chars.next();
                    }
                    _ => break,
                }
            }
        } else if c.is_whitespace() {
            let mut count = 1;
            while count < 4 {
                match chars.clone().next() {
                    // Leave a space that starts a word to that word.
                    Some((_, ' '))
                        if chars.clone().nth(1).is_some_and(|(_, n)| n.is_alphabetic()) =>
                    {
                        break;
                    }
                    Some((i, n)) if n.is_whitespace() => {
                        end = i + n.len_utf8();
                        count += 1;
                        chars.next();
                    }
                    _ => break,
                }
            }
        }
        out.push(piece_id(&bytes[start..end]));
    }
}

/// The ids of `text`.
pub fn encode(text: &str) -> Vec<u32> {
    let mut out = Vec::with_capacity(text.len() / 3 + 1);
    encode_into(text, &mut out);
    out
}

fn piece_id(piece: &[u8]) -> u32 {
    // Truncation is the point: fold the hash into the ordinary-id range.
    (xxh64(piece, 0) % u64::from(FIRST_SPECIAL)) as u32
}

/// The ids of a completions prompt: `<|begin_of_text|>` then the text, as vLLM does for Llama.
pub fn encode_prompt(text: &str) -> Vec<u32> {
    let mut out = Vec::with_capacity(text.len() / 3 + 2);
    out.push(BOS);
    encode_into(text, &mut out);
    out
}

/// Renders chat messages with a Llama-3-like template and tokenises them:
///
/// ```text
/// <|begin_of_text|>
/// (<|start_header_id|>{role}<|end_header_id|>"\n\n"{content}<|eot_id|>)*
/// <|start_header_id|>assistant<|end_header_id|>"\n\n"
/// ```
///
/// A conversation's ids are therefore a prefix of the ids of its continuation, except for the
/// trailing assistant header — as with real chat templates.
pub fn encode_chat<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<u32> {
    let mut out = vec![BOS];
    let mut buf = String::new();
    for (role, content) in messages {
        out.push(START_HEADER);
        encode_into(role, &mut out);
        out.push(END_HEADER);
        buf.clear();
        buf.push_str("\n\n");
        buf.push_str(content);
        encode_into(&buf, &mut out);
        out.push(EOT);
    }
    out.push(START_HEADER);
    encode_into("assistant", &mut out);
    out.push(END_HEADER);
    encode_into("\n\n", &mut out);
    out
}

/// Words the simulated model "generates"; a generated token id picks one.
const WORDS: &[&str] = &[
    " the", " model", " server", " routes", " tokens", " to", " a", " replica", " with", " cache",
    " and", " latency", " is", " low", " when", " prefix", " hits", ".", ",", " of", " batch",
    " queue", " in", " GPU", " memory", " block", " request", " stream", " it", " fast", " time",
    " load",
];

/// The text of a generated token id.
pub fn output_text(id: u32) -> &'static str {
    WORDS[id as usize % WORDS.len()]
}

/// A deterministic "sampled" token id for position `index` of request `seed`.
pub fn sample(seed: u64, index: usize) -> u32 {
    let h = xxh64(&(index as u64).to_le_bytes(), seed);
    (h % u64::from(FIRST_SPECIAL)) as u32
}

/// The tokenizer a replica runs: the built-in stand-in, or a model's own.
#[derive(Debug, Clone, Default)]
pub enum Tokenizer {
    /// The deterministic stand-in of this module with its Llama-3-like template.
    #[default]
    BuiltIn,
    /// A model's `tokenizer.json` and chat template.
    Loaded(Arc<tokenize::Tokenizer>),
}

impl PartialEq for Tokenizer {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::BuiltIn, Self::BuiltIn) => true,
            (Self::Loaded(a), Self::Loaded(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The simulator tokenises what an engine would accept: far more than the EPP's routing cap.
const ENGINE_LIMITS: tokenize::Limits = tokenize::Limits {
    max_prompt_bytes: 64 * 1024 * 1024,
    template_fuel: 64 * tokenize::Limits::DEFAULT_TEMPLATE_FUEL,
    prefix_cache_bytes: tokenize::Limits::DEFAULT_PREFIX_CACHE_BYTES,
};

impl Tokenizer {
    /// Loads a model's tokenizer (a directory or its `tokenizer.json`) and, optionally, a chat
    /// template file that replaces the one in `tokenizer_config.json`.
    pub fn load(
        tokenizer: &Path,
        chat_template: Option<&Path>,
    ) -> Result<Self, tokenize::LoadError> {
        Self::load_with_format(tokenizer, chat_template, None)
    }

    /// [`Self::load`], with the chat template's content format set (vLLM's
    /// `--chat-template-content-format`; `None` is `auto`).
    pub fn load_with_format(
        tokenizer: &Path,
        chat_template: Option<&Path>,
        content_format: Option<tokenize::ContentFormat>,
    ) -> Result<Self, tokenize::LoadError> {
        tokenize::Tokenizer::load(tokenizer, chat_template, ENGINE_LIMITS)
            .map(|t| Self::Loaded(Arc::new(t.with_content_format(content_format))))
    }

    /// Valid ids are below this.
    pub fn vocab_size(&self) -> u32 {
        match self {
            Self::BuiltIn => VOCAB_SIZE,
            Self::Loaded(t) => t.vocab_size(),
        }
    }

    /// The ids of a completions prompt (with BOS).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            Self::BuiltIn => Ok(encode_prompt(text)),
            Self::Loaded(t) => t.encode_prompt(text).map_err(|e| e.to_string()),
        }
    }

    /// The ids of a chat body through the model's template, or `None` for the built-in (whose
    /// template reads parsed messages: see [`encode_chat`]).
    pub fn encode_chat_body(&self, body: &[u8]) -> Option<Result<Vec<u32>, String>> {
        match self {
            Self::BuiltIn => None,
            Self::Loaded(t) => Some(
                t.encode_body(tokenize::Api::ChatCompletions, body)
                    .map_err(|e| e.to_string()),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_about_four_chars_per_token() {
        let text = "The quick brown fox jumps over the lazy dog, again and again: 12345 times.";
        let a = encode(text);
        assert_eq!(a, encode(text));
        let ratio = text.len() as f64 / a.len() as f64;
        assert!((2.5..=5.0).contains(&ratio), "ratio {ratio}");
        assert!(a.iter().all(|&id| id < FIRST_SPECIAL));
    }

    #[test]
    fn pieces_follow_the_rules() {
        let piece = |s: &str| piece_id(s.as_bytes());
        assert_eq!(encode(" hello"), vec![piece(" hell"), piece("o")]);
        assert_eq!(encode("12345"), vec![piece("123"), piece("45")]);
        assert_eq!(encode("a,b"), vec![piece("a"), piece(","), piece("b")]);
        assert_eq!(encode("\n\n  x"), vec![piece("\n\n "), piece(" x")]);
    }

    #[test]
    fn prefix_stable_except_the_last_token() {
        let text = "Système: you are a helpful assistant.\n\nUser asks about 2048 tokens, \
                    KV-caches and   spacing; émigré naïve café.";
        let full = encode(text);
        for (cut, _) in text.char_indices() {
            let prefix = encode(&text[..cut]);
            let keep = prefix.len().saturating_sub(1);
            assert_eq!(prefix[..keep], full[..keep], "cut at {cut}");
        }
    }

    #[test]
    fn chat_history_is_a_prefix_of_its_continuation() {
        let turn1 = [("system", "Be brief."), ("user", "Hi there")];
        let turn2 = [
            ("system", "Be brief."),
            ("user", "Hi there"),
            ("assistant", "Hello"),
            ("user", "More"),
        ];
        let a = encode_chat(turn1);
        let b = encode_chat(turn2);
        // Everything before the trailing assistant header is shared.
        let header = 1 + encode("assistant").len() + 1 + encode("\n\n").len();
        let shared = a.len() - header;
        assert_eq!(a[..shared], b[..shared]);
        assert_eq!(a[0], BOS);
    }
}
