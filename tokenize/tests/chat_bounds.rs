//! A chat request's template input is bounded as a whole, and a `tools` value built to expand
//! through the test template's `tojson(indent=4)` is refused as too large, not rendered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tokenize::{Api, Limits, TokenizeError, Tokenizer};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn tokenizer(max_prompt_bytes: usize) -> Tokenizer {
    let limits = Limits {
        max_prompt_bytes,
        ..Limits::default()
    };
    Tokenizer::load(&testdata(), None, limits).unwrap()
}

/// `[[[…[0,0,…,0]…]]]`: `depth` arrays, each holding the next and `zeros` zeros.
fn nested(depth: usize, zeros: usize) -> String {
    let zeros = ",0".repeat(zeros);
    let mut v = String::from("0");
    for _ in 0..depth {
        v = format!("[{v}{zeros}]");
    }
    v
}

fn chat_with(field: &str, value: &str) -> String {
    format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"{field}":{value}}}"#)
}

#[test]
fn every_template_input_counts_against_the_cap() {
    let limit = 4096;
    let tok = tokenizer(limit);
    let big = serde_json::to_string(&"x".repeat(limit)).unwrap();
    for (field, value) in [
        (
            "tools",
            format!(r#"[{{"type":"function","description":{big}}}]"#),
        ),
        ("documents", format!(r#"[{{"text":{big}}}]"#)),
        ("chat_template_kwargs", format!(r#"{{"extra":{big}}}"#)),
    ] {
        let body = chat_with(field, &value);
        assert_eq!(
            tok.chat_input(body.as_bytes()).unwrap_err(),
            TokenizeError::TooLarge { limit },
            "{field}"
        );
        assert_eq!(
            tok.encode_body(Api::ChatCompletions, body.as_bytes()),
            Err(TokenizeError::TooLarge { limit }),
            "{field}"
        );
    }
    // Together: each field alone is under the cap, all of them are not.
    let third = serde_json::to_string(&"x".repeat(limit / 3)).unwrap();
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":{third}}}],"tools":[{third}],"documents":[{third}]}}"#
    );
    assert_eq!(
        tok.chat_input(body.as_bytes()).unwrap_err(),
        TokenizeError::TooLarge { limit }
    );
    // Small fields are given to the template.
    let body = chat_with("chat_template_kwargs", r#"{"extra":"y"}"#);
    let input = tok.chat_input(body.as_bytes()).unwrap();
    assert_eq!(input.kwargs.len(), 1);
}

#[test]
fn nested_tools_over_the_cap_are_refused_before_rendering() {
    // The review's request: ~125 arrays deep, zeros at every level, MiBs of body.
    let limit = Limits::DEFAULT_MAX_PROMPT_BYTES;
    let tok = tokenizer(limit);
    let tools = format!("[{}]", nested(125, 8000));
    assert!(tools.len() > 1024 * 1024);
    let body = chat_with("tools", &tools);
    assert_eq!(
        tok.encode_body(Api::ChatCompletions, body.as_bytes()),
        Err(TokenizeError::TooLarge { limit })
    );
}

#[test]
fn nested_tools_under_the_cap_stop_at_the_rendered_cap() {
    // Under the input cap, but `tojson(indent=4)` would write each zero after 4 bytes of
    // indent a level: hundreds of times the input. The test template renders tools that way.
    let limit = Limits::DEFAULT_MAX_PROMPT_BYTES;
    let tok = tokenizer(limit);
    let tools = format!("[{}]", nested(125, 1000));
    assert!(tools.len() < limit / 2, "{}", tools.len());
    let body = chat_with("tools", &tools);
    assert_eq!(
        tok.encode_body(Api::ChatCompletions, body.as_bytes()),
        Err(TokenizeError::TooLarge { limit })
    );
    // A few levels render.
    let body = chat_with("tools", &format!("[{}]", nested(3, 2)));
    assert!(
        tok.encode_body(Api::ChatCompletions, body.as_bytes())
            .is_ok()
    );
}

#[test]
fn json_nested_past_serde_s_limit_is_invalid_not_a_crash() {
    let tok = tokenizer(Limits::DEFAULT_MAX_PROMPT_BYTES);
    let body = chat_with("tools", &format!("[{}]", nested(1000, 0)));
    assert!(matches!(
        tok.encode_body(Api::ChatCompletions, body.as_bytes()),
        Err(TokenizeError::Invalid(_))
    ));
}
