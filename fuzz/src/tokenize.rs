//! Harness of the token producer's request parsing and rendering (`tokenize`): a request body
//! as a client sends it, through the project's test tokenizer and Llama-3-style chat template
//! (`tokenize/testdata/`, compiled in).
//!
//! Shared by the `tokenize_body` fuzz target and `tokenize/tests/fuzz_regressions.rs`.

use std::path::PathBuf;
use std::sync::OnceLock;

use tokenize::{Api, Limits, TokenizeError, Tokenizer};

const TOKENIZER_JSON: &[u8] = include_bytes!("../../tokenize/testdata/tokenizer.json");
const CHAT_TEMPLATE: &str = include_str!("../../tokenize/testdata/chat_template.jinja");
/// Small caps, so that the fuzzer reaches them (the prefix cache's too: it evicts often).
const LIMITS: Limits = Limits {
    max_prompt_bytes: 4096,
    template_fuel: 200_000,
    prefix_cache_bytes: 16 * 1024,
};

/// The tokenizer under test, with its prefix cache.
fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| load(LIMITS))
}

/// The same tokenizer without the prefix cache: what every body's ids must be.
fn uncached() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        load(Limits {
            prefix_cache_bytes: 0,
            ..LIMITS
        })
    })
}

fn load(limits: Limits) -> Tokenizer {
    Tokenizer::from_parts(
        TOKENIZER_JSON,
        &PathBuf::from("tokenizer.json"),
        Some((
            PathBuf::from("chat_template.jinja"),
            CHAT_TEMPLATE.to_owned(),
        )),
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
        limits,
    )
    .expect("the test tokenizer loads")
}

/// `tokenize_body`: byte 0 picks the API, the rest is the body. Never panics; ids are in the
/// vocabulary; a text prompt over the cap is refused as too large; a string prompt's ids start
/// with `<|begin_of_text|>`; tokenising twice gives the same ids, and they are those of the
/// tokenizer without the prefix cache.
pub fn body(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let tok = tokenizer();
    let api = if selector & 1 == 0 {
        Api::Completions
    } else {
        Api::ChatCompletions
    };
    let result = tok.encode_body(api, body);
    if let Ok(ids) = &result {
        assert!(ids.iter().all(|&id| id < tok.vocab_size()), "{ids:?}");
        if api == Api::Completions
            && let Ok(tokenize::Prompt::Text(text)) =
                tokenize::completion_prompt(body, LIMITS.max_prompt_bytes)
        {
            assert!(text.len() <= LIMITS.max_prompt_bytes);
            assert_eq!(
                ids.first().copied(),
                tok.encode_prompt("").unwrap().first().copied()
            );
        }
    }
    if let Err(TokenizeError::TooLarge { limit }) = &result {
        assert_eq!(*limit, LIMITS.max_prompt_bytes);
    }
    assert_eq!(tok.encode_body(api, body), result, "deterministic");
    assert!(tok.has_prefix_cache());
    assert_eq!(
        uncached().encode_body(api, body),
        result,
        "the prefix cache changes no id"
    );
}
