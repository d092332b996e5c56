//! The conversation as vLLM hands it to the chat template, not as the request spelt it.
//!
//! vLLM does not give the template a request's `messages` as they came (`parse_chat_messages`
//! in vLLM's `vllm/entrypoints/chat_utils`, followed as of its late-2026 source; older releases
//! lack the tool-result, `task` and Claude Code steps): it rebuilds each message from the
//! fields it knows, and a template fed the raw request renders other text, hence other token
//! ids, and the precise prefix index misses. What it does, and so what this module does:
//!
//! - The content of every message becomes one shape, chosen per template
//!   ([`ContentFormat`], vLLM's `--chat-template-content-format`): a *string* (text parts joined
//!   with `"\n"`, media parts dropped, no content an empty string) for templates that print
//!   `message.content`, or a *list of parts* (`{"type": "text", "text": …}`, a media part
//!   `{"type": "image"}` and the like; a string one text part) for templates that loop over it.
//!   A tool's result of text parts alone is one string in either format, and a system message's
//!   text loses a leading Claude Code attribution line (`x-anthropic-billing-header…`, different
//!   on every request).
//! - A message keeps `role`, `content`, `name` and `task` (strings), an assistant's `tool_calls` and
//!   `reasoning` (also as `reasoning_content`), a tool's `tool_call_id`, and a developer's
//!   `tools`; nothing else reaches the template.
//! - An assistant's `tool_calls[].function.arguments`, a JSON string in the OpenAI API, become
//!   the object it encodes (templates print them with `tojson`); empty, not JSON or not an object,
//!   they become `{}`; an empty `tool_calls` is dropped. Each call is `{id, function: {arguments,
//!   name}, type}` in that order, other keys dropped, as the server's request validation
//!   rebuilds it.
//!
//! Anything vLLM would refuse (a message that is not an object, a part without a type) is left
//! as it came: the engine answers such a request with an error wherever it is routed.

use minijinja::value::{Value, ValueKind};

/// How a template wants message content (vLLM's `--chat-template-content-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// Content as one string.
    String,
    /// Content as a list of typed parts (OpenAI's shape).
    OpenAi,
}

impl ContentFormat {
    /// The format vLLM's `auto` picks for `template`: the parts list when the template loops
    /// over a message's content (`{% for part in message['content'] %}`, or `.content`), else
    /// a string.
    ///
    /// vLLM reads the template's syntax tree and follows which variables hold messages; this
    /// reads each `for` tag and looks at what it iterates, which agrees for the templates in
    /// use (a loop over some other `content` would be taken for one over messages').
    pub fn detect(template: &str) -> Self {
        let mut rest = template;
        while let Some(start) = rest.find("{%") {
            // A comment before this tag may hold `{%`: skip every comment that opens first.
            if let Some(comment) = rest.find("{#")
                && comment < start
            {
                let Some(end) = rest[comment..].find("#}") else {
                    break;
                };
                rest = &rest[comment + end + 2..];
                continue;
            }
            let tag = &rest[start + 2..];
            let Some(end) = tag.find("%}") else { break };
            if loops_over_content(&tag[..end]) {
                return Self::OpenAi;
            }
            rest = &tag[end + 2..];
        }
        Self::String
    }

    /// `string` or `openai`, as vLLM spells them.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "string" => Some(Self::String),
            "openai" => Some(Self::OpenAi),
            _ => None,
        }
    }

    /// As vLLM spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::OpenAi => "openai",
        }
    }
}

/// Whether a tag's body (between `{%` and `%}`) is a `for` loop over something's `content`.
fn loops_over_content(tag: &str) -> bool {
    let tag = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
    let Some(head) = tag.strip_prefix("for") else {
        return false;
    };
    if !head.starts_with(char::is_whitespace) {
        return false;
    }
    let Some((_, iterable)) = head.split_once(" in ") else {
        return false;
    };
    // `for x in y if cond` and `for x in y recursive`: the iterable ends before them; a
    // filtered one (`y | selectattr(…)`) is still a loop over `y`.
    let iterable = iterable
        .split(" if ")
        .next()
        .unwrap_or(iterable)
        .trim()
        .trim_end_matches("recursive")
        .split('|')
        .next()
        .unwrap_or(iterable)
        .trim();
    ["['content']", "[\"content\"]", ".content"]
        .iter()
        .any(|access| iterable.ends_with(access))
}

/// The media part types vLLM knows, with the modality it names them by in the parts list.
const MEDIA_PARTS: [(&str, &str); 8] = [
    ("image_url", "image"),
    ("input_image", "image"),
    ("image_embeds", "image"),
    ("image_pil", "image"),
    ("audio_url", "audio"),
    ("input_audio", "audio"),
    ("audio_embeds", "audio"),
    ("video_url", "video"),
];

/// The text part types, with the field holding their text.
const TEXT_PARTS: [(&str, &str); 5] = [
    ("text", "text"),
    ("input_text", "text"),
    ("output_text", "text"),
    ("refusal", "refusal"),
    ("thinking", "thinking"),
];

fn field(map: &Value, key: &str) -> Option<Value> {
    map.get_attr(key)
        .ok()
        .filter(|v| !v.is_undefined() && !v.is_none())
}

/// `messages` as vLLM gives them to a template of `format` (see the module's documentation).
/// A value that is not a list is returned as it is.
pub fn normalize(messages: &Value, format: ContentFormat) -> Value {
    if messages.kind() != ValueKind::Seq {
        return messages.clone();
    }
    let Ok(items) = messages.try_iter() else {
        return messages.clone();
    };
    items.map(|m| message(&m, format)).collect()
}

/// `tools` as vLLM gives them to a template: each `{"type": "function", "function": …}` rebuilt
/// as its request types dump it (`tool.model_dump()`): `type`, then `function` with `name`,
/// `description` and `parameters` (absent ones as none), then any other key in the request's
/// order (the types keep extra keys). A template printing `tools | tojson` (Llama 3.x, Qwen,
/// Hermes) shows that order and those nones at the head of the prompt, so a tool written
/// otherwise gave ids the engine never saw. Other shapes are returned as they are.
pub fn normalize_tools(tools: &Value) -> Value {
    if tools.kind() != ValueKind::Seq {
        return tools.clone();
    }
    let Ok(items) = tools.try_iter() else {
        return tools.clone();
    };
    items.map(|t| tool(&t)).collect()
}

fn tool(t: &Value) -> Value {
    let Some(function) = field(t, "function").filter(|f| f.kind() == ValueKind::Map) else {
        return t.clone();
    };
    let Some(name) = field(&function, "name") else {
        return t.clone();
    };
    let or_none = |map: &Value, key: &str| {
        map.get_attr(key)
            .ok()
            .filter(|v| !v.is_undefined())
            .unwrap_or(Value::from(()))
    };
    let function = declared_first(
        &function,
        vec![
            ("name", name),
            ("description", or_none(&function, "description")),
            ("parameters", or_none(&function, "parameters")),
        ],
    );
    let kind = field(t, "type").unwrap_or(Value::from("function"));
    declared_first(t, vec![("type", kind), ("function", function)])
}

/// `map`'s entries as a pydantic model with extra keys allowed dumps them: the declared fields
/// in their order, then the others in the map's.
fn declared_first(map: &Value, declared: Vec<(&str, Value)>) -> Value {
    let mut out: Vec<(Value, Value)> = Vec::with_capacity(declared.len());
    let is_declared = |key: &Value| {
        key.as_str()
            .is_some_and(|k| declared.iter().any(|(d, _)| *d == k))
    };
    let mut extras = Vec::new();
    if let Ok(keys) = map.try_iter() {
        for key in keys {
            if !is_declared(&key)
                && let Ok(v) = map.get_item(&key)
            {
                extras.push((key, v));
            }
        }
    }
    out.extend(declared.into_iter().map(|(k, v)| (Value::from(k), v)));
    out.extend(extras);
    Value::from_pairs(out)
}

fn message(m: &Value, format: ContentFormat) -> Value {
    if m.kind() != ValueKind::Map {
        return m.clone();
    }
    let role = field(m, "role").unwrap_or_default();
    let Some(content) = content(field(m, "content"), role.as_str(), format) else {
        return m.clone();
    };
    let mut out: Vec<(&str, Value)> = vec![("role", role.clone()), ("content", content)];
    match role.as_str() {
        Some("assistant") => {
            if let Some(calls) = field(m, "tool_calls")
                && let Some(calls) = tool_calls(&calls)
            {
                out.push(("tool_calls", calls));
            }
            if let Some(reasoning) = field(m, "reasoning") {
                out.push(("reasoning", reasoning.clone()));
                out.push(("reasoning_content", reasoning));
            }
        }
        Some("tool") => {
            if let Some(id) = m
                .get_attr("tool_call_id")
                .ok()
                .filter(|v| !v.is_undefined())
            {
                out.push(("tool_call_id", id));
            }
        }
        _ => {}
    }
    if let Some(name) = field(m, "name").filter(|n| n.kind() == ValueKind::String) {
        out.push(("name", name));
    }
    if let Some(task) = field(m, "task").filter(|t| t.kind() == ValueKind::String) {
        out.push(("task", task));
    }
    if role.as_str() == Some("developer") {
        out.push(("tools", field(m, "tools").unwrap_or(Value::from(()))));
    }
    Value::from_pairs(out)
}

/// Claude Code's attribution line, which vLLM drops from system text: its value changes on
/// every request, and left in it would end every prefix match there.
const CLAUDE_CODE_BILLING_HEADER: &str = "x-anthropic-billing-header";

/// A message's content in `format`; `None` when it is neither absent, a string nor a list
/// (the engine refuses such a message).
fn content(content: Option<Value>, role: Option<&str>, format: ContentFormat) -> Option<Value> {
    let parts: Vec<Value> = match &content {
        None => Vec::new(),
        Some(c) if c.kind() == ValueKind::String => vec![text_part(c.as_str().unwrap_or(""))],
        Some(c) if c.kind() == ValueKind::Seq => c.try_iter().ok()?.collect(),
        Some(_) => return None,
    };
    let mut texts: Vec<String> = Vec::new();
    let mut wrapped: Vec<Value> = Vec::new();
    let mut media = false;
    for part in &parts {
        let kind = field(part, "type");
        let kind = kind.as_ref().and_then(Value::as_str);
        let text = if let Some(text) = part.as_str() {
            Some(text.to_owned())
        } else if let Some((_, key)) = TEXT_PARTS.iter().find(|(t, _)| Some(*t) == kind) {
            // A text part without its text is skipped.
            let Some(text) = field(part, key) else {
                continue;
            };
            Some(
                text.as_str()
                    .map_or_else(|| text.to_string(), str::to_owned),
            )
        } else {
            None
        };
        match text {
            Some(mut text) => {
                if role == Some("system")
                    && (part.as_str().is_some() || kind == Some("text"))
                    && text.starts_with(CLAUDE_CODE_BILLING_HEADER)
                {
                    text = text
                        .split_once('\n')
                        .map(|(_, rest)| rest)
                        .unwrap_or("")
                        .to_owned();
                    if text.is_empty() {
                        continue;
                    }
                }
                wrapped.push(text_part(&text));
                texts.push(text);
            }
            None => {
                if let Some((_, modality)) = MEDIA_PARTS.iter().find(|(t, _)| Some(*t) == kind) {
                    wrapped.push(Value::from_pairs([("type", Value::from(*modality))]));
                    media = true;
                }
            }
        }
    }
    Some(match format {
        ContentFormat::String => Value::from(texts.join("\n")),
        // A tool's result of text parts alone is one string in either format: most templates
        // print a tool message's content as a string.
        ContentFormat::OpenAi if role == Some("tool") && !media => Value::from(texts.join("\n")),
        ContentFormat::OpenAi => Value::from(wrapped),
    })
}

fn text_part(text: &str) -> Value {
    Value::from_pairs([("type", Value::from("text")), ("text", Value::from(text))])
}

/// An assistant's `tool_calls` with each call's `arguments` decoded; `None` to drop the field
/// (an empty list). Anything but a list of calls with a `function` object is left as it came.
fn tool_calls(calls: &Value) -> Option<Value> {
    if calls.kind() != ValueKind::Seq {
        return Some(calls.clone());
    }
    let items: Vec<Value> = calls.try_iter().ok()?.collect();
    if items.is_empty() {
        return None;
    }
    Some(items.iter().map(tool_call).collect())
}

fn tool_call(call: &Value) -> Value {
    let Some(function) = field(call, "function").filter(|f| f.kind() == ValueKind::Map) else {
        return call.clone();
    };
    let arguments = match field(&function, "arguments") {
        Some(a) if a.is_true() => match a.kind() {
            ValueKind::Map => a,
            ValueKind::String => a
                .as_str()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                .filter(|v| v.kind() == ValueKind::Map)
                .unwrap_or_else(empty_map),
            _ => empty_map(),
        },
        _ => empty_map(),
    };
    // vLLM's server validates a call as OpenAI's typed dicts (pydantic), which rebuilds them
    // with their keys in the types' order and drops any other: `{id, function: {arguments,
    // name}, type}` (checked with pydantic 2.14 and openai 3.60). A template printing
    // `function | tojson` shows that order.
    let mut function_out = vec![("arguments", arguments)];
    function_out.extend(field(&function, "name").map(|n| ("name", n)));
    let mut out = Vec::with_capacity(3);
    out.extend(
        call.get_attr("id")
            .ok()
            .filter(|v| !v.is_undefined())
            .map(|id| ("id", id)),
    );
    out.push(("function", Value::from_pairs(function_out)));
    out.extend(
        call.get_attr("type")
            .ok()
            .filter(|v| !v.is_undefined())
            .map(|t| ("type", t)),
    );
    Value::from_pairs(out)
}

fn empty_map() -> Value {
    Value::from_pairs(Vec::<(Value, Value)>::new())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_template_that_loops_over_content_wants_parts() {
        for t in [
            "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}",
            "{%- for part in message.content -%}x{%- endfor %}",
            "{%+ for part in message[\"content\"] if part.type == 'text' %}{% endfor %}",
            "{% for a, b in msg.content recursive %}{% endfor %}",
            "{% for p in m['content'] | selectattr('type', 'equalto', 'text') %}{% endfor %}",
        ] {
            assert_eq!(ContentFormat::detect(t), ContentFormat::OpenAi, "{t}");
        }
        for t in [
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "{% if content %}{% for x in contents %}{% endfor %}{% endif %}",
            "{% for m in messages %}{{ m.content | trim }}{% endfor %}",
            "{% formatted %}",
            "{% for",
            "{# {% for p in m['content'] %} #}{{ m['content'] }}",
            "{# unclosed {% for p in m.content %}",
        ] {
            assert_eq!(ContentFormat::detect(t), ContentFormat::String, "{t}");
        }
    }

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn messages_are_rebuilt_as_vllm_rebuilds_them() {
        let messages = json(
            r#"[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}},"b"],"x":1},
                {"role":"assistant","content":null,"tool_calls":[{"id":"1","function":{"name":"f","arguments":"{\"z\":1,\"a\":2}"}}]},
                {"role":"assistant","content":"hi","tool_calls":[]},
                7]"#,
        );
        let string = normalize(&messages, ContentFormat::String);
        assert_eq!(
            string.to_string(),
            json(
                r#"[{"role":"user","content":"a\nb"},
                    {"role":"assistant","content":"","tool_calls":[{"id":"1","function":{"arguments":{"z":1,"a":2},"name":"f"}}]},
                    {"role":"assistant","content":"hi"},
                    7]"#
            )
            .to_string()
        );
        let parts = normalize(&messages, ContentFormat::OpenAi);
        assert_eq!(
            parts
                .get_item_by_index(0)
                .unwrap()
                .get_attr("content")
                .unwrap()
                .to_string(),
            json(r#"[{"type":"text","text":"a"},{"type":"image"},{"type":"text","text":"b"}]"#)
                .to_string()
        );
        // Not a list: as it came.
        assert_eq!(
            normalize(&json(r#"{"a":1}"#), ContentFormat::String),
            json(r#"{"a":1}"#)
        );
    }
}
