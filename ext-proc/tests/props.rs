//! Property tests of the OpenAI body code and of client input in logs (proptest, fixed
//! seeds): a model rewrite changes the model and nothing else (256 cases), a string prompt is
//! its decoded text and a slice of the body when it has no escapes (256 cases), and `Untrusted`
//! renders any string without control characters and bounded (256 cases), and the SSE usage
//! scanner reports the last non-null usage of a stream however it is cut into chunks (256
//! cases), no prefix match of a chat prompt is worth more than its estimate (256 cases), and a
//! long answer's tail gives its usage or none, never another (256 cases).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use endpoint_picker::request::Api;
use ext_proc::body_budget::BodyBudget;
use ext_proc::json_usage::JsonUsageScanner;
use ext_proc::openai::{self, MAX_MODEL_NAME_BYTES};
use ext_proc::untrusted::{MAX_LOGGED_CHARS, Untrusted, sanitize};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn config(seed: u64) -> Config {
    Config {
        cases: 256,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    }
}

/// A valid model name: 1–64 characters, no control characters, quotes and backslashes and
/// non-ASCII included.
fn model() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9./:_-]{1,40}",
        "[^\\p{Cc}]{1,64}",
        Just("lora/\"x\"\\y".to_owned()),
    ]
    .prop_filter("a valid model name", |m| {
        openai::validate_model_name(m).is_ok()
    })
}

/// A JSON string value of any text.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,30}", ".{0,20}"]
}

/// A body of `api`: its prompt field, the model, optional fields, in a random order, with
/// random whitespace.
fn body() -> impl Strategy<Value = (Api, String)> {
    let api = prop::sample::select(vec![
        Api::Completions,
        Api::ChatCompletions,
        Api::Responses,
        Api::Embeddings,
        Api::Conversations,
    ]);
    (
        api,
        model(),
        text(),
        any::<bool>(),
        prop::option::of(text()),
        prop::collection::vec(("[a-z_]{1,8}", text()), 0..3),
        any::<u64>(),
        prop::sample::select(vec!["", " ", "\n  ", "\t"]),
    )
        .prop_map(|(api, model, prompt, stream, salt, extra, order, ws)| {
            let s = |v: &str| serde_json::to_string(v).unwrap();
            let prompt_nonempty = if prompt.is_empty() {
                "x".to_owned()
            } else {
                prompt
            };
            let prompt_field = match api {
                Api::ChatCompletions => format!(
                    "\"messages\":[{{\"role\":\"user\",\"content\":{}}}]",
                    s(&prompt_nonempty)
                ),
                Api::Embeddings | Api::Responses => {
                    format!("\"input\":{}", s(&prompt_nonempty))
                }
                Api::Conversations => format!("\"items\":[{}]", s(&prompt_nonempty)),
                _ => format!("\"prompt\":{}", s(&prompt_nonempty)),
            };
            let mut fields = vec![
                format!("\"model\":{ws}{}", s(&model)),
                prompt_field,
                format!("\"stream\":{stream}"),
            ];
            if let Some(salt) = salt {
                fields.push(format!("\"cache_salt\":{}", s(&salt)));
            }
            for (k, v) in extra {
                // Field names the parser reads are not repeated.
                fields.push(format!("\"x_{k}\":{}", s(&v)));
            }
            let n = fields.len();
            fields.rotate_left((order as usize) % n);
            (
                api,
                format!("{{{ws}{}{ws}}}", fields.join(&format!(",{ws}"))),
            )
        })
}

proptest! {
    #![proptest_config(config(0x00a1_b0d7))]

    #[test]
    fn a_model_rewrite_changes_the_model_and_nothing_else(
        (api, body) in body(),
        new_model in model(),
    ) {
        let body = Bytes::from(body);
        let parsed = openai::parse_body(api, &body).expect("a generated body parses");
        let span = parsed.model_span.clone();
        let out = openai::rewrite_model(&body, span.clone(), &new_model);
        let again = openai::parse_body(api, &out).expect("the rewritten body parses");
        prop_assert_eq!(&again.model, &new_model);
        prop_assert_eq!(&out[..span.start], &body[..span.start]);
        prop_assert_eq!(&out[again.model_span.end..], &body[span.end..]);
        prop_assert_eq!(again.stream, parsed.stream);
        prop_assert_eq!(again.cache_salt, parsed.cache_salt);
        // The prompt is read from the same bytes, so prefix caching is unaffected.
        prop_assert_eq!(again.prompt, parsed.prompt);
    }

    /// Any path is judged without a panic, and every percent-encoding of an administration
    /// endpoint's name (any bytes, any case), after any prefix, is refused (as an endpoint,
    /// or as malformed when the encoding hides a separator or a control character).
    #[test]
    fn engine_admin_paths_are_found_in_any_spelling(
        junk in ".{0,300}",
        name in prop::sample::select(openai::ENGINE_ADMIN_ENDPOINTS.to_vec()),
        encode in prop::collection::vec(any::<(bool, bool)>(), 40),
        prefix in prop::sample::select(vec!["/", "/v1/", "//v1//", "/a/b/", "/v1%2F", "/v1%2f"]),
        suffix in prop::sample::select(vec!["", "/", "?x=1", "#f", "//", "%0A", "%0d%0a", "%00"]),
    ) {
        let _ = openai::check_request_path(&junk);
        let spelt: String = name
            .bytes()
            .zip(encode.iter().cycle())
            .map(|(b, &(enc, upper))| {
                let b = if upper { b.to_ascii_uppercase() } else { b };
                if enc { format!("%{b:02x}") } else { (b as char).to_string() }
            })
            .collect();
        let path = format!("{prefix}{spelt}{suffix}");
        prop_assert!(openai::check_request_path(&path).is_err(), "{}", path);
        let longer = format!("/v1/{spelt}x");
        prop_assert!(openai::check_request_path(&longer).is_ok(), "{}", longer);
    }

    #[test]
    fn a_string_prompt_is_its_decoded_text(
        prompt in prop_oneof!["[ -~]{1,40}", ".{1,20}", "[a\\\\\"/]{1,8}"],
        ws in prop::sample::select(vec!["", " ", "\n  ", "\t"]),
    ) {
        let json = serde_json::to_string(&prompt).unwrap();
        let body = Bytes::from(format!(
            "{{\"model\":\"m\",{ws}\"prompt\"{ws}:{ws}{json}{ws},\"max_tokens\":1}}"
        ));
        let parsed = openai::parse_body(Api::Completions, &body).expect("a valid body parses");
        prop_assert_eq!(&parsed.prompt[..], prompt.as_bytes());
        if !json.contains('\\') {
            // Without escapes the prompt is a slice of the body, not a copy.
            let base = body.as_ptr() as usize;
            prop_assert!((base..base + body.len()).contains(&(parsed.prompt.as_ptr() as usize)));
        }
    }

    #[test]
    fn untrusted_text_has_no_control_characters_and_is_bounded(s in any::<String>()) {
        let shown = Untrusted(&s).to_string();
        prop_assert!(!shown.chars().any(char::is_control), "{:?}", shown);
        // Every character escapes to at most 10 (`\u{10ffff}`), plus the count of the rest.
        prop_assert!(shown.chars().count() <= MAX_LOGGED_CHARS * 10 + 32);
        prop_assert_eq!(sanitize(&s), shown.clone());
        prop_assert_eq!(format!("{:?}", Untrusted(&s)), format!("\"{shown}\""));
        if s.chars().count() <= MAX_LOGGED_CHARS && s.chars().all(|c| c.is_ascii_alphanumeric()) {
            prop_assert_eq!(&shown, &s);
        }
    }

    #[test]
    fn long_untrusted_text_is_cut_and_counted(s in "[^\\p{Cc}]{129,300}") {
        let shown = sanitize(&s);
        let kept: usize = s.chars().take(MAX_LOGGED_CHARS).map(char::len_utf8).sum();
        let suffix = format!("…(+{} bytes)", s.len() - kept);
        prop_assert!(shown.ends_with(&suffix), "{shown:?} does not end with {suffix:?}");
    }

    #[test]
    fn the_sse_scanner_keeps_the_last_usage_across_any_chunking(
        events in prop::collection::vec(
            (prop::option::of((0..1_000_000u64, 0..100_000u64)), any::<bool>(), any::<bool>()),
            0..12,
        ),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let mut stream = String::new();
        let mut want = None;
        for (usage, spaced, crlf) in &events {
            let usage_json = match usage {
                Some((p, c)) => format!("{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}"),
                None => "null".to_owned(),
            };
            let nl = if *crlf { "\r\n" } else { "\n" };
            let sp = if *spaced { " " } else { "" };
            stream.push_str(&format!(
                "data:{sp}{{\"choices\":[{{\"delta\":{{\"content\":\"x\\n\"}}}}],\"usage\":{usage_json}}}{nl}{nl}"
            ));
            if let Some((p, c)) = usage {
                want = Some((*p, *c));
            }
        }
        stream.push_str("data: [DONE]\n\n");
        let bytes = stream.as_bytes();
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.sort_unstable();
        let mut scanner = openai::SseUsageScanner::default();
        let mut from = 0;
        for cut in at.into_iter().chain([bytes.len()]) {
            scanner.feed(&bytes[from..cut]);
            from = cut;
        }
        let got = scanner.usage().map(|u| (u.prompt_tokens, u.completion_tokens));
        prop_assert_eq!(got, want);
    }

    #[test]
    fn model_names_over_the_limit_are_refused(extra in 1..64usize) {
        let name = "m".repeat(MAX_MODEL_NAME_BYTES + extra);
        prop_assert!(openai::validate_model_name(&name).is_err());
        prop_assert!(openai::validate_model_name(&name[..MAX_MODEL_NAME_BYTES]).is_ok());
    }
}

/// A string value that may pass for media: a long data URL, a `file:` link, or text.
fn media_or_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{0,40}",
        "[A-Za-z0-9+/]{0,600}".prop_map(|b| format!("data:image/png;base64,{b}")),
        Just("file:x".to_owned()),
    ]
}

proptest! {
    #![proptest_config(config(0x7001))]

    /// Review 8's property, for chat since its system message, tools and documents lead the
    /// hashed prompt (review 11): whatever a body holds (media keys in the tools, images in the
    /// messages, a system message or not), no prefix match of the hashed prompt is worth more
    /// tokens than the request's own estimate, so a match cannot buy credit for content the
    /// client did not send.
    #[test]
    fn a_chat_prefix_match_is_never_worth_more_than_the_prompt(
        system in prop::option::of(media_or_text()),
        tools in prop::collection::vec((prop::sample::select(vec!["url", "data", "description", "image_url"]), media_or_text()), 0..4),
        documents in prop::option::of(media_or_text()),
        user in prop::collection::vec((any::<bool>(), media_or_text()), 1..4),
        block in prop::sample::select(vec![16usize, 64, 256]),
    ) {
        let mut messages = Vec::new();
        if let Some(s) = &system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        for (image, content) in &user {
            messages.push(if *image {
                serde_json::json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": content}}]})
            } else {
                serde_json::json!({"role": "user", "content": content})
            });
        }
        let mut body = serde_json::json!({"model": "m", "messages": messages});
        if !tools.is_empty() {
            let tools: Vec<serde_json::Value> = tools
                .iter()
                .map(|(k, v)| serde_json::json!({"type": "function", "function": {"name": "f", "parameters": {*k: v}}}))
                .collect();
            body["tools"] = serde_json::Value::Array(tools);
        }
        if let Some(d) = &documents {
            body["documents"] = serde_json::json!([{"text": d, "url": d}]);
        }
        let raw = Bytes::from(serde_json::to_vec(&body).unwrap());
        let parsed = openai::parse_body(Api::ChatCompletions, &raw).unwrap();
        let mut by_block = Vec::new();
        endpoint_picker::cost::estimate_json_prompt_tokens_by_block(
            &parsed.prompt,
            parsed.prompt_media_from,
            block,
            usize::MAX,
            &mut by_block,
        );
        let whole = by_block.last().copied().unwrap_or(0);
        prop_assert!(
            whole <= parsed.estimated_prompt_tokens,
            "match {} > estimate {}", whole, parsed.estimated_prompt_tokens
        );
    }
}

/// A member value for an answer: text that may spell `"usage": {...}` inside a string, an
/// object with a nested `usage`, an array, a number.
fn answer_value() -> impl Strategy<Value = serde_json::Value> {
    let usage_text = r#"say "usage": {"completion_tokens": 0} \"#;
    prop_oneof![
        text().prop_map(serde_json::Value::from),
        Just(serde_json::Value::from(usage_text)),
        (0u64..1000).prop_map(|n| serde_json::json!({"usage": {"completion_tokens": n}})),
        prop::collection::vec(text(), 0..4).prop_map(|v| serde_json::json!(v)),
        any::<i32>().prop_map(serde_json::Value::from),
    ]
}

proptest! {
    #![proptest_config(config(0x0a5e_7a11))]

    /// A whole answer's `usage` is read as it passes (`json_usage`): however the answer is
    /// cut into chunks and wherever the member is, the top-level usage is read, never a
    /// nested one nor text that spells one.
    #[test]
    fn the_scanner_reads_the_top_level_usage_however_the_answer_is_cut(
        before in prop::collection::vec(("[a-z]{1,8}", answer_value()), 0..4),
        after in prop::collection::vec(("[a-z]{1,8}", answer_value()), 0..4),
        prompt in 0u64..100_000,
        completion in 0u64..100_000,
        spaced in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        // Built by hand, so the members keep their order (a JSON map would sort them).
        let member = |(k, v): &(String, serde_json::Value)| {
            format!("\"{}\":{}", if k == "usage" { "x" } else { k }, v)
        };
        let usage = format!(
            "\"usage\"{}:{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion}}}",
            if spaced { " " } else { "" }
        );
        let members: Vec<String> = before
            .iter()
            .map(member)
            .chain([usage])
            .chain(after.iter().map(member))
            .collect();
        let body = format!("{{{}}}{}", members.join(","), if spaced { "\n" } else { "" });
        let whole = openai::usage_from_json(body.as_bytes()).expect("a generated answer parses");
        prop_assert_eq!((whole.prompt_tokens, whole.completion_tokens), (prompt, completion));
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        let budget = Arc::new(BodyBudget::new(1 << 20));
        let mut scanner = JsonUsageScanner::default();
        let mut from = 0;
        for cut in cuts.into_iter().chain([body.len()]) {
            prop_assert!(scanner.push(&body.as_bytes()[from..cut], &budget).is_ok());
            from = cut;
        }
        prop_assert_eq!(scanner.take_usage(), Some(whole));
        prop_assert_eq!(budget.held(), 0);
    }
}
