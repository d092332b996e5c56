//! A model's chat template, rendered as Hugging Face's `apply_chat_template` renders it.
//!
//! transformers compiles a template in a sandboxed Jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, the loop-controls extension, a `tojson` filter that is Python's
//! `json.dumps(ensure_ascii=False)` (not Jinja's HTML-safe one), and the globals
//! `raise_exception` and `strftime_now`. Templates also call Python's `str` methods
//! (`.strip()`, `.startswith()`, `.split()`, `dict.items()`), which `minijinja-contrib`'s
//! pycompat layer provides. This module sets MiniJinja up the same way.
//!
//! Bounds, so that a template (or a request driving it) that loops or explodes cannot hold a
//! worker: MiniJinja's fuel (instructions and allocated data), its recursion limit, and a cap
//! on the rendered text, which also caps each `tojson` output as it is written (with a depth
//! limit); each stops the render with an error.

use std::io::Write;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

use crate::TokenizeError;
use crate::conversation::ContentFormat;

/// The name the template is registered under.
const TEMPLATE: &str = "chat";

/// A compiled chat template with its special-token strings.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    max_rendered_bytes: usize,
    content_format: ContentFormat,
}

/// What one chat request gives the template.
#[derive(Debug, Clone, Default)]
pub struct ChatInput {
    /// `messages`, as vLLM gives them to the template ([`crate::conversation::normalize`]).
    pub messages: Value,
    /// `tools`, when given.
    pub tools: Option<Value>,
    /// `documents`, when given (RAG templates read them).
    pub documents: Option<Value>,
    /// Whether to open the assistant's turn (vLLM's default: true).
    pub add_generation_prompt: bool,
    /// Leave the last message open (vLLM's `continue_final_message`).
    pub continue_final_message: bool,
    /// `chat_template_kwargs`: extra template variables.
    pub kwargs: Vec<(String, Value)>,
}

impl ChatTemplate {
    /// Compiles `source`. `fuel` bounds the work of one render (MiniJinja's unit: about one
    /// instruction, or 64 bytes of data allocated); `max_rendered_bytes` caps its output.
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
        fuel: u64,
        max_rendered_bytes: usize,
    ) -> Result<Self, minijinja::Error> {
        let content_format = ContentFormat::detect(&source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_fuel(Some(fuel));
        // Jinja2's default: undefined values print as nothing and iterate as empty.
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A rendered chat is refused past `max_rendered_bytes`, so no one `tojson` call needs
        // more.
        env.add_filter(
            "tojson",
            move |state: &State<'_, '_>, value: &Value, kwargs: Kwargs| {
                tojson(state, value, kwargs, max_rendered_bytes)
            },
        );
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE, source)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            max_rendered_bytes,
            content_format,
        })
    }

    /// How this template wants message content: detected from its source (vLLM's `auto`)
    /// unless set.
    pub fn content_format(&self) -> ContentFormat {
        self.content_format
    }

    /// Sets the content format, as vLLM's `--chat-template-content-format` does.
    pub fn set_content_format(&mut self, format: ContentFormat) {
        self.content_format = format;
    }

    /// Renders one conversation.
    pub fn render(&self, input: &ChatInput) -> Result<String, TokenizeError> {
        let template = self.env.get_template(TEMPLATE).map_err(template_error)?;
        let mut ctx: Vec<(String, Value)> = Vec::with_capacity(8 + input.kwargs.len());
        ctx.push(("messages".into(), input.messages.clone()));
        ctx.push((
            "tools".into(),
            input.tools.clone().unwrap_or(Value::from(())),
        ));
        ctx.push((
            "documents".into(),
            input.documents.clone().unwrap_or(Value::from(())),
        ));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(input.add_generation_prompt && !input.continue_final_message),
        ));
        ctx.push(("bos_token".into(), Value::from(self.bos_token.as_str())));
        ctx.push(("eos_token".into(), Value::from(self.eos_token.as_str())));
        // `chat_template_kwargs` last: they override the special tokens, as transformers'
        // `{**special_tokens_map, **kwargs}` does (the request's fields they name were taken
        // over when the input was read, `messages` excepted).
        ctx.extend(input.kwargs.iter().cloned());
        // A map, later entries winning.
        let ctx: std::collections::BTreeMap<String, Value> = ctx.into_iter().collect();
        let ctx = Value::from(ctx);
        let mut out = CappedWriter {
            buf: Vec::new(),
            cap: self.max_rendered_bytes,
            overflowed: false,
        };
        template
            .render_captured_to(ctx, &mut out)
            .map(drop)
            .map_err(|e| match out.overflowed || is_output_cap(&e) {
                true => TokenizeError::TooLarge {
                    limit: self.max_rendered_bytes,
                },
                false => template_error(e),
            })?;
        let mut rendered = String::from_utf8(out.buf).map_err(|_| TokenizeError::Template {
            reason: "rendered text is not UTF-8".into(),
        })?;
        if input.continue_final_message {
            continue_final_message(&mut rendered, &input.messages)?;
        }
        Ok(rendered)
    }
}

/// transformers' `continue_final_message`: the text is cut right after the last message's
/// content (its last text part when it has parts), stripped, so the model continues it.
fn continue_final_message(rendered: &mut String, messages: &Value) -> Result<(), TokenizeError> {
    let no_content = || TokenizeError::Template {
        reason: "continue_final_message: the final message has no text content".into(),
    };
    let len = messages.len().ok_or_else(no_content)?;
    let last = messages
        .get_item_by_index(len.checked_sub(1).ok_or_else(no_content)?)
        .map_err(|_| no_content())?;
    let content = last.get_attr("content").map_err(|_| no_content())?;
    let text = match content.kind() {
        ValueKind::String => content.as_str().map(str::to_owned),
        ValueKind::Seq => content
            .try_iter()
            .map_err(|_| no_content())?
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find_map(|part| {
                part.get_attr("text")
                    .ok()
                    .and_then(|t| t.as_str().map(str::to_owned))
            }),
        _ => None,
    }
    .ok_or_else(no_content)?;
    let text = text.trim();
    let at = rendered
        .rfind(text)
        .ok_or_else(|| TokenizeError::Template {
            reason: "continue_final_message: the final message is not in the rendered text".into(),
        })?;
    rendered.truncate(at + text.len());
    Ok(())
}

fn template_error(e: minijinja::Error) -> TokenizeError {
    let mut reason = e.to_string();
    // MiniJinja's messages can quote template source; keep the error short for logs.
    reason.truncate(reason.floor_char_boundary(200));
    TokenizeError::Template { reason }
}

/// Collects the rendered text, failing the render once it passes the cap.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
    /// A write would have passed the cap (for `render`'s error mapping).
    overflowed: bool,
}

impl Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered chat exceeds the cap"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: today's date in the template (Llama 3.1's system header).
fn strftime_now(format: String) -> Result<Value, Error> {
    let now = jiff::Zoned::now();
    let mut out = String::new();
    jiff::fmt::strtime::format(format.as_bytes(), &now)
        .map(|s| out.push_str(&s))
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from(out))
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`, whose default separators are `", "` and
/// `": "` (`","` between items once indented).
///
/// Bounded as it writes, never after: the output stops with an error as soon as it passes
/// `max_bytes` (the template's rendered-size cap: the call's text could never fit in the
/// rendered chat anyway; a [`TooLarge`] error) or what the remaining fuel pays for (an
/// out-of-fuel error), and values nested deeper than [`MAX_JSON_DEPTH`] are refused. A nested
/// `tools` value of a few bytes per level indented at every level grows quadratically, so
/// checking only the finished text would let one call allocate gigabytes.
fn tojson(
    state: &State<'_, '_>,
    value: &Value,
    kwargs: Kwargs,
    max_bytes: usize,
) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                let n = usize::try_from(v)?;
                Some(" ".repeat(n.min(MAX_INDENT)))
            }
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    // What the remaining fuel pays for, at MiniJinja's own `tojson` price per byte.
    let fuel_bytes = state.fuel_levels().map_or(usize::MAX, |(_, remaining)| {
        usize::try_from(remaining.saturating_mul(FUEL_BYTES_PER_UNIT)).unwrap_or(usize::MAX)
    });
    let mut w = PyJson {
        out: String::new(),
        limit: max_bytes.min(fuel_bytes),
        out_of_fuel: fuel_bytes < max_bytes,
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    w.value(value, 0)?;
    // Serialising is work the engine does not see: charge it as MiniJinja charges its own
    // `tojson` (the engine charges the returned string's bytes itself).
    state.consume_fuel((w.out.len() as u64).div_ceil(FUEL_BYTES_PER_UNIT))?;
    Ok(Value::from_safe_string(w.out))
}

/// Bytes of `tojson` output one fuel pays for: a quarter of a fuel a byte, what MiniJinja's own
/// `tojson` charges for serialising (its unit is 1/64 of a fuel; 16 units a byte).
const FUEL_BYTES_PER_UNIT: u64 = 4;

/// Widest numeric `tojson` indent; a larger number is cut to it. (A string indent is taken as
/// is: every copy of it is written against the output limit.)
const MAX_INDENT: usize = 64;

/// The source of the error `tojson` stops with once its output passes the rendered-size cap:
/// [`ChatTemplate::render`] finds it and reports the render as [`TooLarge`].
///
/// [`TooLarge`]: TokenizeError::TooLarge
#[derive(Debug)]
struct OutputCap;

impl std::fmt::Display for OutputCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tojson output exceeds the rendered-size cap")
    }
}

impl std::error::Error for OutputCap {}

/// Whether `e` (or an error it wraps) is `tojson` stopping at the rendered-size cap.
fn is_output_cap(e: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<OutputCap>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A writer of Python's `json.dumps` format into a string of at most `limit` bytes.
struct PyJson {
    out: String,
    /// The most bytes written; the write that would pass it fails instead.
    limit: usize,
    /// The limit is the fuel's, not the rendered-size cap's.
    out_of_fuel: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// Values nested deeper than this are refused (a template cannot build deeper ones cheaply,
/// but a request's JSON could). The writer recurses once per level, so this also bounds its
/// stack.
const MAX_JSON_DEPTH: usize = 128;

impl PyJson {
    /// Appends `s`, or fails if the output would pass the limit (nothing is appended then).
    fn put(&mut self, s: &str) -> Result<(), Error> {
        if s.len() > self.limit.saturating_sub(self.out.len()) {
            return Err(self.over_limit());
        }
        self.out.push_str(s);
        Ok(())
    }

    fn put_char(&mut self, c: char) -> Result<(), Error> {
        self.put(c.encode_utf8(&mut [0; 4]))
    }

    fn over_limit(&self) -> Error {
        if self.out_of_fuel {
            Error::new(ErrorKind::OutOfFuel, "tojson output")
        } else {
            Error::new(ErrorKind::InvalidOperation, "tojson: output too large")
                .with_source(OutputCap)
        }
    }

    fn newline(&mut self, depth: usize) -> Result<(), Error> {
        let Some(indent) = self.indent.take() else {
            return Ok(());
        };
        // Checked whole before writing: `depth` copies of the indent.
        let need = indent.len().saturating_mul(depth).saturating_add(1);
        let result = if need > self.limit.saturating_sub(self.out.len()) {
            Err(self.over_limit())
        } else {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(&indent);
            }
            Ok(())
        };
        self.indent = Some(indent);
        result
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Error> {
        if depth > MAX_JSON_DEPTH {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: too deep"));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => self.put("null")?,
            ValueKind::Bool => self.put(if v.is_true() { "true" } else { "false" })?,
            ValueKind::Number => {
                // Integers (any width) print as MiniJinja shows them; floats as Python does.
                let shown = v.to_string();
                match f64::try_from(v.clone()) {
                    Ok(f) if shown.contains(['.', 'e', 'E', 'i', 'n']) => {
                        self.put(&py_float(f))?;
                    }
                    _ => self.put(&shown)?,
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default())?,
            ValueKind::Bytes => {
                self.string(&String::from_utf8_lossy(v.as_bytes().unwrap_or(&[])))?;
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.open_close('[', ']', items.len(), depth, |w, i, d| {
                    w.value(&items[i], d)
                })?;
            }
            ValueKind::Map | ValueKind::Plain => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                self.open_close('{', '}', keys.len(), depth, |w, i, d| {
                    let key = &keys[i];
                    match key.as_str() {
                        Some(s) => w.string(s)?,
                        None => w.string(&key.to_string())?,
                    }
                    let sep = std::mem::take(&mut w.key_sep);
                    let result = w.put(&sep);
                    w.key_sep = sep;
                    result?;
                    w.value(&v.get_item(key)?, d)
                })?;
            }
            // Unreachable for request data; Python would refuse what JSON cannot carry.
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: value not serialisable",
                ));
            }
        }
        Ok(())
    }

    fn open_close(
        &mut self,
        open: char,
        close: char,
        n: usize,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.put_char(open)?;
        if n == 0 {
            return self.put_char(close);
        }
        for i in 0..n {
            if i > 0 {
                let sep = std::mem::take(&mut self.item_sep);
                let result = self.put(&sep);
                self.item_sep = sep;
                result?;
            }
            self.newline(depth + 1)?;
            item(self, i, depth + 1)?;
        }
        self.newline(depth)?;
        self.put_char(close)
    }

    fn string(&mut self, s: &str) -> Result<(), Error> {
        self.put_char('"')?;
        for c in s.chars() {
            match c {
                '"' => self.put("\\\"")?,
                '\\' => self.put("\\\\")?,
                '\n' => self.put("\\n")?,
                '\r' => self.put("\\r")?,
                '\t' => self.put("\\t")?,
                '\u{08}' => self.put("\\b")?,
                '\u{0c}' => self.put("\\f")?,
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        self.put(&format!("\\u{unit:04x}"))?;
                    }
                }
                c => self.put_char(c)?,
            }
        }
        self.put_char('"')
    }
}

/// Python's `repr` of a float, as `json.dumps` writes it: the shortest digits that round-trip,
/// positional for exponents in [-4, 16), else `d.ddde±XX`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` is the shortest round-trip digits with an exponent: "1.5e-5", "1e16".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let positional = format!("{f}");
        if positional.contains('.') {
            positional
        } else {
            format!("{positional}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(src: &str) -> ChatTemplate {
        ChatTemplate::new(src.to_owned(), "<s>".into(), "</s>".into(), 100_000, 10_000).unwrap()
    }

    /// `messages` is JSON text, as requests arrive: keys keep their order.
    fn render(src: &str, messages: &str) -> Result<String, TokenizeError> {
        let messages: Value = serde_json::from_str(messages).unwrap();
        template(src).render(&ChatInput {
            messages,
            add_generation_prompt: true,
            ..Default::default()
        })
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let out = render(
            "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
            r#"[{"b": 1, "a": [1.5, true, null, "é\"\n"], "c": {}}]"#,
        )
        .unwrap();
        assert_eq!(
            out,
            "[{\"b\": 1, \"a\": [1.5, true, null, \"é\\\"\\n\"], \"c\": {}}]|{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    true,\n    null,\n    \"é\\\"\\n\"\n  ],\n  \"c\": {}\n}"
        );
        let ascii = render(
            "{{ messages | tojson(ensure_ascii=true, separators=[',', ':'], sort_keys=true) }}",
            &serde_json::json!({"z": "é🚀", "a": 2.0}).to_string(),
        )
        .unwrap();
        assert_eq!(ascii, "{\"a\":2.0,\"z\":\"\\u00e9\\ud83d\\ude80\"}");
    }

    #[test]
    fn floats_print_as_pythons_repr() {
        for (f, py) in [
            (2.0, "2.0"),
            (1.5, "1.5"),
            (0.1, "0.1"),
            (-0.0001, "-0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
        ] {
            assert_eq!(py_float(f), py, "{f}");
        }
        let out = render(
            "{{ messages | tojson }}",
            "[18446744073709551615, -3, 1e-05, 2.5]",
        )
        .unwrap();
        assert_eq!(out, "[18446744073709551615, -3, 1e-05, 2.5]");
    }

    #[test]
    fn python_string_methods_and_globals() {
        let out = render(
            "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% if m.content.startswith(' h') %}!{% endif %}{% endfor %}{{ eos_token }}",
            &serde_json::json!([{"content": " hi "}]).to_string(),
        )
        .unwrap();
        assert_eq!(out, "<s>HI!</s>");
        let err = render(
            "{{ raise_exception('no system role') }}",
            &serde_json::json!([]).to_string(),
        )
        .unwrap_err();
        assert!(
            matches!(err, TokenizeError::Template { ref reason } if reason.contains("no system role")),
            "{err:?}"
        );
    }

    #[test]
    fn runaway_templates_are_stopped() {
        // An endless-looking loop runs out of fuel.
        let err = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            &serde_json::json!([]).to_string(),
        )
        .unwrap_err();
        assert!(matches!(err, TokenizeError::Template { .. }), "{err:?}");
        // Output past the cap.
        let err = render("{{ 'x' * 20000 }}", &serde_json::json!([]).to_string()).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizeError::TooLarge { limit: 10_000 } | TokenizeError::Template { .. }
            ),
            "{err:?}"
        );
        // Unbounded recursion hits the recursion limit.
        let err = render(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            &serde_json::json!([]).to_string(),
        )
        .unwrap_err();
        assert!(matches!(err, TokenizeError::Template { .. }), "{err:?}");
    }

    fn template_with(src: &str, fuel: u64, cap: usize) -> ChatTemplate {
        ChatTemplate::new(src.to_owned(), String::new(), String::new(), fuel, cap).unwrap()
    }

    fn input(messages: Value) -> ChatInput {
        ChatInput {
            messages,
            ..Default::default()
        }
    }

    #[test]
    fn tojson_stops_at_the_rendered_size_cap_while_writing() {
        // The output is never written: only `tojson`'s own bound can stop it.
        let src = "{% set x = messages | tojson(indent=2) %}{{ x | length }}";
        let messages: Value = serde_json::from_str(
            r#"[{"role": "user", "content": "h\u00e9\"llo", "n": [1, 2.5, null, true, {}], "e": []}]"#,
        )
        .unwrap();
        let full = template_with("{{ messages | tojson(indent=2) }}", 100_000, 10_000)
            .render(&input(messages.clone()))
            .unwrap();
        let len = full.len();
        assert!(len > 50, "{full}");
        // Every cap: the call fits and is whole, or it is refused as too large.
        for cap in 0..len + 3 {
            let out = template_with(src, 100_000, cap.max(8)).render(&input(messages.clone()));
            match out {
                Ok(n) => {
                    assert!(len <= cap.max(8), "cap {cap}");
                    // `length` counts characters.
                    assert_eq!(n, full.chars().count().to_string());
                }
                Err(e) => {
                    assert!(len > cap.max(8), "cap {cap}: {e:?}");
                    assert_eq!(e, TokenizeError::TooLarge { limit: cap.max(8) });
                }
            }
        }
    }

    #[test]
    fn a_deep_indented_value_is_refused_without_building_its_expansion() {
        // ~125 levels, each with a few zeros: indent=4 writes 4 bytes a level before every
        // zero, hundreds of times the input. The cap stops it at 64 KiB.
        let mut v = String::from("0");
        for _ in 0..125 {
            v = format!("[{v},0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]");
        }
        let cap = 64 * 1024;
        let tools: Value = serde_json::from_str(&format!("[{v}]")).unwrap();
        let t = template_with(
            "{% for t in tools %}{% set x = t | tojson(indent=4) %}{% endfor %}ok",
            4_000_000,
            cap,
        );
        let err = t
            .render(&ChatInput {
                tools: Some(tools),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err, TokenizeError::TooLarge { limit: cap });
    }

    #[test]
    fn tojson_refuses_values_nested_past_its_depth_limit() {
        let mut deep = Value::from(0);
        for _ in 0..MAX_JSON_DEPTH + 1 {
            deep = Value::from(vec![deep]);
        }
        let t = template_with("{{ messages | tojson }}", 100_000, 10_000);
        let err = t.render(&input(deep.clone())).unwrap_err();
        assert!(
            matches!(err, TokenizeError::Template { ref reason } if reason.contains("too deep")),
            "{err:?}"
        );
        // One level less is written.
        let ok = t
            .render(&input(deep.get_item_by_index(0).unwrap()))
            .unwrap();
        assert_eq!(ok.len(), 2 * MAX_JSON_DEPTH + 1);
    }

    #[test]
    fn tojson_is_paid_for_in_fuel() {
        // 200 serialisations of ~5 KB, never written: the instructions alone cost little, the
        // serialising runs the fuel out.
        let messages = serde_json::json!([{"content": "x".repeat(5000)}]).to_string();
        let messages: Value = serde_json::from_str(&messages).unwrap();
        let src = "{% for i in range(200) %}{% set x = messages | tojson %}{% endfor %}ok";
        let err = template_with(src, 100_000, 10_000)
            .render(&input(messages.clone()))
            .unwrap_err();
        assert!(matches!(err, TokenizeError::Template { .. }), "{err:?}");
        // Once is fine.
        let once = "{% set x = messages | tojson %}ok";
        assert_eq!(
            template_with(once, 100_000, 10_000)
                .render(&input(messages.clone()))
                .unwrap(),
            "ok"
        );
        // A call bigger than the remaining fuel pays for stops as it writes, out of fuel.
        let err = template_with(once, 500, 1_000_000)
            .render(&input(messages))
            .unwrap_err();
        assert!(
            matches!(err, TokenizeError::Template { ref reason } if reason.contains("fuel")),
            "{err:?}"
        );
    }

    #[test]
    fn continue_final_message_cuts_after_the_last_content() {
        let t = template(
            "{% for m in messages %}[{{ m.role }}]{{ m.content }}<end>{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
        );
        let messages: Value = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Once upon "},
        ]))
        .unwrap();
        let out = t
            .render(&ChatInput {
                messages,
                add_generation_prompt: true,
                continue_final_message: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(out, "[user]hi<end>[assistant]Once upon");
    }
}
