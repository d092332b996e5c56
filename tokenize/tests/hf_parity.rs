//! The ids of the project's test tokenizer and chat templates equal those Hugging Face's Python
//! stack gives (`testdata/expected.json`, made by `testdata/make_testdata.py`: `tokenizers` for
//! the BPE, jinja2 set up as transformers' `apply_chat_template`, fed the messages as vLLM
//! rebuilds them, by the script's own Python rendition of vLLM's rules).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tokenize::{Api, ContentFormat, Limits, TokenizeError, Tokenizer};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(testdata().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| u32::try_from(i.as_u64().unwrap()).unwrap())
        .collect()
}

/// The chat requests of expected.json's `key` as raw JSON text.
fn raw_chat_requests(key: &str) -> Vec<Box<serde_json::value::RawValue>> {
    #[derive(serde::Deserialize)]
    struct Case {
        request: Box<serde_json::value::RawValue>,
    }
    let text = std::fs::read_to_string(testdata().join("expected.json")).unwrap();
    let mut e: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_str(&text).unwrap();
    let cases: Vec<Case> = serde_json::from_str(e.remove(key).unwrap().get()).unwrap();
    cases.into_iter().map(|c| c.request).collect()
}

/// Each chat of expected.json's `key` renders and encodes as expected with every tokenizer of
/// `toks`.
fn check_chats(key: &str, toks: &[&Tokenizer]) {
    let cases = expected()[key].as_array().unwrap().clone();
    assert!(cases.len() >= 5, "{key}");
    for (case, request) in cases.iter().zip(raw_chat_requests(key)) {
        // The request as its text, so that its keys keep their order (as a client's do).
        let body = format!(r#"{{"model": "m", {}"#, &request.get()[1..]);
        let want = ids(&case["ids"]);
        for tok in toks {
            let input = tok.chat_input(body.as_bytes()).unwrap();
            assert_eq!(
                tok.render_chat(&input).unwrap(),
                case["rendered"].as_str().unwrap(),
                "{body}"
            );
            assert_eq!(
                tok.encode_body(Api::ChatCompletions, body.as_bytes())
                    .unwrap(),
                want
            );
        }
    }
}

#[test]
fn completions_match_hugging_face() {
    let tok = Tokenizer::load(&testdata(), None, Limits::default()).unwrap();
    for case in expected()["completions"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(
            tok.encode_prompt(prompt).unwrap(),
            want,
            "prompt {prompt:?}"
        );
        let body = serde_json::json!({"model": "m", "prompt": prompt}).to_string();
        assert_eq!(
            tok.encode_body(Api::Completions, body.as_bytes()).unwrap(),
            want
        );
    }
}

#[test]
fn chats_match_hugging_face() {
    // The template from tokenizer_config.json, and the same from the separate .jinja file.
    let from_config = Tokenizer::load(&testdata(), None, Limits::default()).unwrap();
    let from_file = Tokenizer::load(
        &testdata().join("tokenizer.json"),
        Some(&testdata().join("chat_template.jinja")),
        Limits::default(),
    )
    .unwrap();
    assert_eq!(from_config.content_format(), ContentFormat::OpenAi);
    check_chats("chat", &[&from_config, &from_file]);
}

/// The same chats through a template that prints content as a string (vLLM's "string"
/// format): text parts joined with newlines, media dropped; and the first template forced to
/// that format renders its string branch the same way for plain-text chats.
#[test]
fn chats_through_a_string_template_match_hugging_face() {
    let string = Tokenizer::load(
        &testdata().join("tokenizer.json"),
        Some(&testdata().join("chat_template_string.jinja")),
        Limits::default(),
    )
    .unwrap();
    assert_eq!(string.content_format(), ContentFormat::String);
    check_chats("chat_string", &[&string]);
    let forced = Tokenizer::load(&testdata(), None, Limits::default())
        .unwrap()
        .with_content_format(Some(ContentFormat::String));
    assert_eq!(forced.content_format(), ContentFormat::String);
    let body = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#;
    let input = forced.chat_input(body.as_bytes()).unwrap();
    assert!(
        forced
            .render_chat(&input)
            .unwrap()
            .contains("<|end_header_id|>\n\na\nb<|eot_id|>")
    );
}

#[test]
fn token_id_prompts_pass_through_and_are_checked() {
    let tok = Tokenizer::load(&testdata(), None, Limits::default()).unwrap();
    let body = br#"{"model":"m","prompt":[640,5,6]}"#;
    assert_eq!(
        tok.encode_body(Api::Completions, body).unwrap(),
        vec![640, 5, 6]
    );
    let out_of_vocab = format!(r#"{{"model":"m","prompt":[{}]}}"#, tok.vocab_size());
    assert!(matches!(
        tok.encode_body(Api::Completions, out_of_vocab.as_bytes()),
        Err(TokenizeError::Invalid(_))
    ));
}

#[test]
fn oversize_and_bad_templates_are_errors_not_panics() {
    let limits = Limits {
        max_prompt_bytes: 1024,
        ..Limits::default()
    };
    let tok = Tokenizer::load(&testdata(), None, limits).unwrap();
    let long = "x".repeat(1025);
    let body = serde_json::json!({"prompt": long}).to_string();
    assert_eq!(
        tok.encode_body(Api::Completions, body.as_bytes()),
        Err(TokenizeError::TooLarge { limit: 1024 })
    );
    let chat = serde_json::json!({"messages": [{"role": "user", "content": long}]}).to_string();
    assert_eq!(
        tok.encode_body(Api::ChatCompletions, chat.as_bytes()),
        Err(TokenizeError::TooLarge { limit: 1024 })
    );
    // Short messages whose rendering is over the cap.
    let many: Vec<_> = (0..25)
        .map(|_| serde_json::json!({"role": "user", "content": "hi"}))
        .collect();
    let chat = serde_json::json!({"messages": many}).to_string();
    assert!(chat.len() < 1024);
    assert_eq!(
        tok.encode_body(Api::ChatCompletions, chat.as_bytes()),
        Err(TokenizeError::TooLarge { limit: 1024 })
    );
    // The template refuses an unknown role.
    let bad_role = br#"{"messages":[{"role":"wizard","content":"hi"}]}"#;
    assert!(matches!(
        tok.encode_body(Api::ChatCompletions, bad_role),
        Err(TokenizeError::Template { .. })
    ));
    // A template that does not compile fails the load.
    let dir = std::env::temp_dir().join(format!("tokenize-bad-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.jinja");
    std::fs::write(&path, "{% for m in messages %}").unwrap();
    assert!(Tokenizer::load(&testdata(), Some(&path), Limits::default()).is_err());
    // A template that loops for ever runs out of fuel.
    std::fs::write(
        &path,
        "{% for i in range(100000) %}{% for m in range(100000) %}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let looping = Tokenizer::load(&testdata(), Some(&path), Limits::default()).unwrap();
    assert!(matches!(
        looping.encode_body(Api::ChatCompletions, br#"{"messages":[]}"#),
        Err(TokenizeError::Template { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
    // Not JSON, no messages, a batch, a request-supplied template.
    for (api, body) in [
        (Api::ChatCompletions, &b"{"[..]),
        (Api::ChatCompletions, br#"{"model":"m"}"#),
        (Api::Completions, br#"{"prompt":["a","b"]}"#),
        (
            Api::ChatCompletions,
            br#"{"messages":[],"chat_template":"{{ 1 }}"}"#,
        ),
    ] {
        assert!(tok.encode_body(api, body).is_err());
    }
}
