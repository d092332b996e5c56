//! What a chat request's fields become in the template's input, as vLLM builds it: its tools
//! dumped by their types, and `chat_template_kwargs` over everything but the messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tokenize::{Limits, TokenizeError, Tokenizer};

fn tokenizer() -> Tokenizer {
    let testdata: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    Tokenizer::load(&testdata, None, Limits::default()).unwrap()
}

fn rendered(body: serde_json::Value) -> String {
    let tok = tokenizer();
    let input = tok.chat_input(body.to_string().as_bytes()).unwrap();
    tok.render_chat(&input).unwrap()
}

fn chat(extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Review 10: a tool written in another key order, or without its optional fields, reached the
/// template as written; vLLM's types dump it as `type`, `function` {`name`, `description`,
/// `parameters`}, absent fields as null, extra keys after them, and a template printing
/// `tool | tojson` shows exactly that at the head of the prompt.
#[test]
fn tools_reach_the_template_as_vllm_dumps_them() {
    let terse = rendered(chat(serde_json::json!({
        "tools": [{"function": {"name": "f", "strict": true}, "type": "function", "x": 1}]
    })));
    let full = rendered(chat(serde_json::json!({
        "tools": [{"type": "function", "function": {"name": "f", "description": null,
                   "parameters": null, "strict": true}, "x": 1}]
    })));
    assert_eq!(terse, full);
    assert!(
        terse.contains(
            "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"f\",\n        \"description\": null,\n        \"parameters\": null,\n        \"strict\": true\n    },\n    \"x\": 1\n}"
        ),
        "{terse}"
    );
    // Another shape passes as it came, in its order (the engine judges it).
    let tok = tokenizer();
    let body =
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"b":1,"a":2}]}"#;
    let odd = tok
        .render_chat(&tok.chat_input(body.as_bytes()).unwrap())
        .unwrap();
    assert!(odd.contains("\"b\": 1,\n    \"a\": 2"), "{odd}");
}

/// Review 10: the kwargs were put under the request's fields and the special tokens, where
/// vLLM lays them over both: `bos_token: ""` drops the BOS, `add_generation_prompt: false`
/// the assistant header, and a `tools` kwarg replaces the request's tools.
#[test]
fn chat_template_kwargs_override_the_request_fields_and_the_special_tokens() {
    let plain = rendered(chat(serde_json::json!({})));
    let overridden = rendered(chat(serde_json::json!({
        "chat_template_kwargs": {"bos_token": "", "add_generation_prompt": false}
    })));
    assert!(plain.starts_with("<|begin_of_text|>"), "{plain}");
    assert!(!overridden.starts_with("<|begin_of_text|>"), "{overridden}");
    assert!(
        plain.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "{plain}"
    );
    assert!(!overridden.contains("assistant"), "{overridden}");
    let tools = rendered(chat(serde_json::json!({
        "tools": [{"type": "function", "function": {"name": "from_the_request"}}],
        "chat_template_kwargs": {"tools": [{"name": "from_the_kwargs"}]}
    })));
    assert!(
        tools.contains("from_the_kwargs") && !tools.contains("from_the_request"),
        "{tools}"
    );
    // `messages` stays the request's.
    let messages = rendered(chat(serde_json::json!({
        "chat_template_kwargs": {"messages": [{"role": "user", "content": "other"}]}
    })));
    assert!(
        messages.contains("hi") && !messages.contains("other"),
        "{messages}"
    );
    // Not an object: refused, as vLLM refuses it.
    let tok = tokenizer();
    let body = chat(serde_json::json!({"chat_template_kwargs": [1]}));
    assert!(matches!(
        tok.chat_input(body.to_string().as_bytes()),
        Err(TokenizeError::Invalid(_))
    ));
}
