//! The prefix cache gives the ids the whole text gives: texts that share beginnings of every
//! length, cut at every kind of place, through a cached tokenizer and one without the cache.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use tokenize::{Api, Limits, Tokenizer};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn limits(prefix_cache_bytes: usize) -> Limits {
    Limits {
        prefix_cache_bytes,
        ..Limits::default()
    }
}

/// The test tokenizer with its `tokenizer.json` edited by `edit`.
fn edited(edit: impl FnOnce(&mut serde_json::Value), cache: usize) -> Tokenizer {
    let path = testdata().join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    Tokenizer::from_parts(
        json.to_string().as_bytes(),
        &path,
        None,
        None,
        None,
        limits(cache),
    )
    .unwrap()
}

/// GPT-2's pre-tokenizer: byte-level with its own regex, instead of Llama 3's split.
fn gpt2(json: &mut serde_json::Value) {
    json["pre_tokenizer"] = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
}

/// Pieces of text of every class the pre-tokenizers tell apart, the test tokenizer's special
/// tokens among them.
const FRAGMENTS: &[&str] = &[
    "a",
    "b",
    "Z",
    "word",
    "Words",
    "it's",
    "IT'S",
    "we're",
    "they'll",
    "'d",
    "'",
    "0",
    "42",
    "12345",
    "3.5",
    "é",
    "naïve",
    "日本",
    "Ж",
    "—",
    "…",
    "!",
    "?!",
    ".",
    ",",
    "(",
    ")",
    "\"",
    "-",
    "_",
    "#",
    " ",
    " ",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n",
    "\n\n",
    " \n",
    "\n ",
    "\r\n",
    "\u{a0}",
    "e\u{301}",
    "\u{301}",
    "\u{308}\u{323}",
    "\u{1100}",
    "\u{1161}",
    "\u{212b}",
    "\u{fb01}",
    "<|eot_id|>",
    "<|start_header_id|>",
    "🙂",
];

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..900).prop_map(|f| f.concat())
}

/// Two texts that begin the same way: a shared head, then each its own tail.
fn pair() -> impl Strategy<Value = (String, String)> {
    (text(), text(), text()).prop_map(|(head, a, b)| (format!("{head}{a}"), format!("{head}{b}")))
}

/// Loaded once: the cached ones keep what every case left in them, as a long-running EPP does.
static WHOLE: LazyLock<Tokenizer> =
    LazyLock::new(|| Tokenizer::load(&testdata(), None, limits(0)).unwrap());
static CACHED: LazyLock<Tokenizer> =
    LazyLock::new(|| Tokenizer::load(&testdata(), None, limits(256 * 1024)).unwrap());
static GPT2_WHOLE: LazyLock<Tokenizer> = LazyLock::new(|| edited(gpt2, 0));
static GPT2_CACHED: LazyLock<Tokenizer> = LazyLock::new(|| edited(gpt2, 256 * 1024));
static NFC_WHOLE: LazyLock<Tokenizer> = LazyLock::new(|| edited(nfc, 0));
static NFC_CACHED: LazyLock<Tokenizer> = LazyLock::new(|| edited(nfc, 256 * 1024));

/// Qwen 2's normalizer.
fn nfc(json: &mut serde_json::Value) {
    json["normalizer"] = serde_json::json!({"type": "NFC"});
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        rng_seed: RngSeed::Fixed(0x7e11_ca5e),
        ..ProptestConfig::default()
    })]

    #[test]
    fn cached_ids_are_the_whole_texts_ids((a, b) in pair()) {
        let (whole, cached) = (&*WHOLE, &*CACHED);
        prop_assert!(cached.has_prefix_cache());
        for text in [&a, &b, &a] {
            prop_assert_eq!(cached.encode_rendered(text).unwrap(), whole.encode_rendered(text).unwrap());
            prop_assert_eq!(cached.encode_prompt(text).unwrap(), whole.encode_prompt(text).unwrap());
        }
    }

    #[test]
    fn cached_ids_are_the_whole_texts_ids_with_an_nfc_normalizer((a, b) in pair()) {
        let (whole, cached) = (&*NFC_WHOLE, &*NFC_CACHED);
        prop_assert!(cached.has_prefix_cache());
        for text in [&a, &b, &a] {
            prop_assert_eq!(cached.encode_prompt(text).unwrap(), whole.encode_prompt(text).unwrap());
        }
    }

    #[test]
    fn cached_ids_are_the_whole_texts_ids_with_gpt2s_pre_tokenizer((a, b) in pair()) {
        let (whole, cached) = (&*GPT2_WHOLE, &*GPT2_CACHED);
        prop_assert!(cached.has_prefix_cache());
        for text in [&a, &b, &a] {
            prop_assert_eq!(cached.encode_prompt(text).unwrap(), whole.encode_prompt(text).unwrap());
        }
    }
}

#[test]
fn a_conversation_that_grows_reuses_its_earlier_turns() {
    let whole = Tokenizer::load(&testdata(), None, limits(0)).unwrap();
    let cached = Tokenizer::load(&testdata(), None, Limits::default()).unwrap();
    let mut messages = vec![serde_json::json!({
        "role": "system",
        "content": "You answer questions about the routing of requests to model servers. ".repeat(60),
    })];
    for turn in 0..6 {
        messages.push(serde_json::json!({"role": "user", "content": format!("Question {turn}: why is the replica {turn} slow today?")}));
        let body = serde_json::json!({"model": "m", "messages": messages}).to_string();
        assert_eq!(
            cached
                .encode_body(Api::ChatCompletions, body.as_bytes())
                .unwrap(),
            whole
                .encode_body(Api::ChatCompletions, body.as_bytes())
                .unwrap(),
            "turn {turn}"
        );
        messages.push(serde_json::json!({"role": "assistant", "content": format!("Because its queue holds {turn} long prompts.")}));
    }
    let stats = cached.prefix_cache_stats().unwrap();
    assert!(
        stats.reused_bytes > 3 * stats.encoded_bytes,
        "most of each turn's text is reused: {stats:?}"
    );
}

/// An edit of `tokenizer.json`.
type Edit = fn(&mut serde_json::Value);

#[test]
fn the_cache_is_off_where_a_cut_might_change_the_ids() {
    let cases: [(&str, Edit); 6] = [
        ("a normalizer other than NFC", |j| {
            j["normalizer"] = serde_json::json!({"type": "Prepend", "prepend": "▁"})
        }),
        (
            "a metaspace pre-tokenizer",
            |j| j["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true}),
        ),
        ("an unknown split regex", |j| {
            j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] =
                serde_json::json!(r"\s*\S+")
        }),
        ("a prefix space", |j| gpt2_with_prefix_space(j)),
        (
            "NFC in a sequence",
            |j| {
                j["normalizer"] =
                    serde_json::json!({"type": "Sequence", "normalizers": [{"type": "NFC"}]})
            },
        ),
        ("an added token with a space", |j| {
            j["added_tokens"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "id": 700, "content": "new line", "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true
                }))
        }),
    ];
    for (what, edit) in cases {
        assert!(!edited(edit, 1 << 20).has_prefix_cache(), "{what}");
    }
    assert!(edited(|_| {}, 1 << 20).has_prefix_cache());
    assert!(edited(nfc, 1 << 20).has_prefix_cache(), "NFC");
    assert!(
        !edited(|_| {}, 0).has_prefix_cache(),
        "0 bytes turns it off"
    );
}

fn gpt2_with_prefix_space(json: &mut serde_json::Value) {
    gpt2(json);
    json["pre_tokenizer"]["add_prefix_space"] = serde_json::json!(true);
}
