//! OpenAI-style request and response bodies: parsed once, never re-serialised needlessly.
//!
//! The request body is validated by one `serde_json` pass that borrows from the buffer: the
//! `model` value and the prompt-bearing field are located as byte ranges of the original body,
//! so the prefix hasher reads a zero-copy slice and a model rewrite is a single splice.
//! Everything else passes through byte for byte.
//!
//! Responses are scanned for `usage`: JSON bodies at the end, SSE streams line by line as the
//! chunks go by (keeping only the current partial line).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use endpoint_picker::request::Api;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::body_budget::{BodyBudget, BodyCharge};

/// Longest model name accepted, in bytes. Hugging Face repository ids are at most 96
/// characters and LoRA adapter names are short; a longer name is an attack on every map and
/// metric label keyed by model, not a model.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// A request body that is not a valid request of its API. Messages never carry more than a
/// few escaped characters of the client's input ([`crate::untrusted`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, or not an object.
    #[error("invalid JSON body: {0}")]
    Json(String),
    /// `model` missing or empty.
    #[error("model not found in request body")]
    MissingModel,
    /// `model` present but unusable.
    #[error("invalid \"model\": {0}")]
    InvalidModel(&'static str),
    /// A field the API requires is missing or empty.
    #[error("{api} request must contain a non-empty {field:?}")]
    MissingField {
        /// The API.
        api: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A field of the wrong JSON type.
    #[error("{api} request field {field:?} must be {expected}")]
    WrongType {
        /// The API.
        api: &'static str,
        /// The field.
        field: &'static str,
        /// What the API accepts.
        expected: &'static str,
    },
    /// No body where the API needs one.
    #[error(
        "{api} request has an empty body; it must be a JSON object with \"model\" and {field:?}"
    )]
    EmptyBody {
        /// The API.
        api: &'static str,
        /// Its prompt-bearing field.
        field: &'static str,
    },
}

impl BodyError {
    fn json(e: impl std::fmt::Display) -> Self {
        BodyError::Json(crate::untrusted::sanitize(&e.to_string()))
    }
}

/// Checks a model name from a client: not empty or white space alone (no model: as a header
/// value it would be trimmed to nothing), at most [`MAX_MODEL_NAME_BYTES`] bytes, no control
/// characters, no invisible or direction-changing format characters (a name becomes a metric
/// label and shows in `/debug/pool` and dashboards, where those would hide or reorder text).
pub fn validate_model_name(model: &str) -> Result<(), BodyError> {
    if model.trim().is_empty() {
        return Err(BodyError::MissingModel);
    }
    if model.len() > MAX_MODEL_NAME_BYTES {
        return Err(BodyError::InvalidModel("longer than 256 bytes"));
    }
    if model.chars().any(char::is_control) {
        return Err(BodyError::InvalidModel("contains control characters"));
    }
    if model.chars().any(is_invisible_format) {
        return Err(BodyError::InvalidModel(
            "contains invisible or bidirectional format characters",
        ));
    }
    Ok(())
}

/// Zero-width characters and joiners, bidirectional marks, embeddings, overrides and isolates,
/// line and paragraph separators, invisible operators, Hangul fillers, musical formatting
/// controls, tag characters and the byte-order mark: Unicode's default-ignorable format
/// characters that hide or reorder text (variation selectors, which only pick a glyph, pass).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{034F}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{3164}'
            | '\u{FFA0}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// The JSON type of a raw value, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonKind {
    String,
    Array,
    Object,
    Other,
}

fn kind_of(text: &str) -> JsonKind {
    match text.trim_start().as_bytes().first() {
        Some(b'"') => JsonKind::String,
        Some(b'[') => JsonKind::Array,
        Some(b'{') => JsonKind::Object,
        _ => JsonKind::Other,
    }
}

/// The kind of an array's first element (`None` for an empty array or a non-array).
fn first_element_kind(text: &str) -> Option<JsonKind> {
    let inner = text.trim_start().strip_prefix('[')?.trim_start();
    (!inner.starts_with(']')).then(|| kind_of(inner))
}

/// The API of a known OpenAI inference path (query string ignored), `None` for any other.
pub fn known_api_for_path(path: &str) -> Option<Api> {
    let path = path
        .split(['?', '#'])
        .next()
        .unwrap_or(path)
        .trim_end_matches('/');
    if path.ends_with("/conversations") {
        Some(Api::Conversations)
    } else if path.ends_with("/responses") {
        Some(Api::Responses)
    } else if path.ends_with("/chat/completions") {
        Some(Api::ChatCompletions)
    } else if path.ends_with("/embeddings") {
        Some(Api::Embeddings)
    } else if path.ends_with("/completions") {
        Some(Api::Completions)
    } else {
        None
    }
}

/// The last path segments of the engines' administration endpoints: vLLM's runtime LoRA
/// loading (`/v1/load_lora_adapter`, with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`) and its
/// development endpoints (`VLLM_SERVER_DEV_MODE`), SGLang's adapter, weight, memory and
/// profiling controls. The EPP never routes these: whoever may call them reaches the pods
/// directly (the LoRA syncer and placement do), and through a gateway any client could unload
/// every tenant's adapter or load weights of its choosing.
pub const ENGINE_ADMIN_ENDPOINTS: &[&str] = &[
    "load_lora_adapter",
    "unload_lora_adapter",
    "reset_prefix_cache",
    "reset_mm_cache",
    "sleep",
    "wake_up",
    "collective_rpc",
    "start_profile",
    "stop_profile",
    "scale_elastic_ep",
    "flush_cache",
    "update_weights_from_disk",
    "update_weights_from_tensor",
    "update_weights_from_distributed",
    "init_weights_update_group",
    "release_memory_occupation",
    "resume_memory_occupation",
    "configure_logging",
    "abort_request",
    "set_internal_state",
    "slow_down",
    "start_expert_distribution_record",
    "stop_expert_distribution_record",
    "dump_expert_distribution_record",
];

/// Why a request path is not routed ([`check_request_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Decoded, it holds a control character (a newline lets Starlette's `$` match before
    /// it), or it encodes a separator (`%2F`, `%5C`) that an engine's server decodes into one:
    /// a path that can name one route here and another there.
    Malformed,
    /// It names an engine administration endpoint ([`ENGINE_ADMIN_ENDPOINTS`]).
    EngineAdmin,
}

/// Judges a request path as the engines' HTTP servers will read it: the whole path (the query
/// string and fragment aside) percent-decoded once, as uvicorn does; then refused if it is
/// [`PathRefusal::Malformed`], or if its last non-empty segment names an engine
/// administration endpoint (without regard to ASCII case).
pub fn check_request_path(path: &str) -> Result<(), PathRefusal> {
    let path = path.split(['?', '#']).next().unwrap_or(path).as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    // Only the last non-empty segment is compared, and only one as short as the longest
    // name can match: the decoded path is never kept whole.
    let mut segment = Segment::default();
    let mut last = Segment::default();
    let mut i = 0;
    while i < path.len() {
        let byte = match (
            path[i],
            path.get(i + 1).copied().and_then(hex),
            path.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                i += 3;
                let b = (h * 16 + l) as u8;
                if b == b'/' || b == b'\\' {
                    return Err(PathRefusal::Malformed);
                }
                b
            }
            (b, _, _) => {
                i += 1;
                b
            }
        };
        if byte < 0x20 || byte == 0x7f {
            return Err(PathRefusal::Malformed);
        }
        if byte == b'/' {
            if !segment.is_empty() {
                last = std::mem::take(&mut segment);
            }
        } else {
            segment.push(byte);
        }
    }
    if !segment.is_empty() {
        last = segment;
    }
    if ENGINE_ADMIN_ENDPOINTS
        .iter()
        .any(|name| last.is(name.as_bytes()))
    {
        return Err(PathRefusal::EngineAdmin);
    }
    Ok(())
}

/// The longest name in [`ENGINE_ADMIN_ENDPOINTS`].
const LONGEST_ADMIN_ENDPOINT: usize = {
    let (mut i, mut longest) = (0, 0);
    while i < ENGINE_ADMIN_ENDPOINTS.len() {
        if ENGINE_ADMIN_ENDPOINTS[i].len() > longest {
            longest = ENGINE_ADMIN_ENDPOINTS[i].len();
        }
        i += 1;
    }
    longest
};

/// One decoded path segment, kept only while it could still be an administration endpoint's
/// name; past that, only its length counts.
struct Segment {
    head: [u8; LONGEST_ADMIN_ENDPOINT],
    len: usize,
}

impl Default for Segment {
    fn default() -> Self {
        Self {
            head: [0; LONGEST_ADMIN_ENDPOINT],
            len: 0,
        }
    }
}

impl Segment {
    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.head.get_mut(self.len) {
            *slot = byte;
        }
        self.len = self.len.saturating_add(1);
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it is `name`, without regard to ASCII case.
    fn is(&self, name: &[u8]) -> bool {
        self.head
            .get(..self.len)
            .is_some_and(|held| held.eq_ignore_ascii_case(name))
    }
}

/// Chooses the API from a request path. Unknown paths are treated as completions, as the
/// reference does.
pub fn api_for_path(path: &str) -> Api {
    known_api_for_path(path).unwrap_or(Api::Completions)
}

/// What the request path needs from a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedBody {
    /// The `model`.
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// The text prefix caching is computed over (zero-copy when possible).
    pub prompt: Bytes,
    /// `cache_salt`.
    pub cache_salt: Option<String>,
    /// Byte range of the `model` JSON value (including quotes) in the body.
    pub model_span: Range<usize>,
    /// The output-token limit the client set, if it is a plain integer (a hint for the cost
    /// model; the engine validates it).
    pub max_tokens: Option<u32>,
    /// The prompt's tokens estimated from its content (text and media parts, not the JSON
    /// around them; `endpoint_picker::cost::estimate_json_prompt_tokens`), for when no
    /// tokenizer gives ids.
    pub estimated_prompt_tokens: u64,
    /// `prompt` is JSON (messages, input, token ids), not a plain string's text.
    pub prompt_is_json: bool,
    /// Where in `prompt` the strings that may be media begin (after the Responses API's
    /// instructions and tools, which lead it).
    pub prompt_media_from: usize,
}

/// The fields the EPP reads, each kept raw so that a wrong type is reported by name without
/// echoing the value back, and so that the prompt stays a slice of the body.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    items: Option<&'a RawValue>,
    #[serde(borrow)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    /// Chat: rendered into the prompt by the engine's template (counted, and hashed ahead of
    /// the messages with the tools).
    #[serde(borrow)]
    documents: Option<&'a RawValue>,
    /// Chat: passed to the engine's template (counted, not hashed).
    #[serde(borrow)]
    chat_template_kwargs: Option<&'a RawValue>,
    #[serde(borrow)]
    cache_salt: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_output_tokens: Option<&'a RawValue>,
}

/// The prompt's tokens as the engine will see them, estimated (`endpoint_picker::cost`): the
/// prompt's content, and the parts of the body the engine renders as text beside it, media
/// keys or not: the Responses API's `instructions` and `tools`, chat's `tools`, `documents`
/// and `chat_template_kwargs` (a large tool schema is tokens too, and hiding text there must
/// not make a prompt look small).
fn estimate_prompt_tokens(
    api: Api,
    fields: &Fields<'_>,
    prompt: &[u8],
    media_from: usize,
    plain_text: bool,
) -> u64 {
    use endpoint_picker::cost::{
        MAX_ESTIMATED_PROMPT_TOKENS, estimate_json_prompt_tokens, estimate_json_text_tokens,
        estimate_tokens,
    };
    let text = |raw: Option<&RawValue>| {
        raw.filter(|r| r.get().trim() != "null")
            .map_or(0, |r| estimate_json_text_tokens(r.get().as_bytes()))
    };
    let estimate = match api {
        _ if plain_text => estimate_tokens(prompt.len()),
        Api::Responses => {
            let input = fields
                .input
                .map_or(0, |r| estimate_json_prompt_tokens(r.get().as_bytes()));
            input
                .saturating_add(text(fields.instructions))
                .saturating_add(text(fields.tools))
        }
        // The hashed prompt as built: the system message, tools and documents that lead it as
        // text, the rest of the messages with their media (what the prefix's by-block
        // estimate walks, so that a match is never worth more than the prompt).
        Api::ChatCompletions => {
            let (lead, rest) = prompt.split_at(media_from.min(prompt.len()));
            estimate_json_text_tokens(lead)
                .saturating_add(estimate_json_prompt_tokens(rest))
                .saturating_add(text(fields.chat_template_kwargs))
        }
        _ => estimate_json_prompt_tokens(prompt),
    };
    estimate.min(MAX_ESTIMATED_PROMPT_TOKENS)
}

/// Leads the hashed prompt of a chat request with tools or documents (outside any JSON string:
/// the estimates skip it; JSON text never holds these control bytes, so no client can forge
/// them).
const WITH_TOOLS_MARKER: u8 = 0x1f;
/// Marks a chat request's tools in its hashed prompt.
const TOOLS_MARKER: u8 = 0x1d;
/// Marks a chat request's documents in its hashed prompt.
const DOCUMENTS_MARKER: u8 = 0x1e;

/// Where the first element of a JSON array of messages ends (the byte after it), when that
/// element is an object whose `role` is `system` or `developer`. `raw` is a validated JSON
/// value; anything else gives `None`.
fn leading_system_message_end(raw: &str) -> Option<usize> {
    #[derive(Deserialize)]
    struct Role<'a> {
        #[serde(borrow)]
        role: Option<&'a RawValue>,
    }
    let bytes = raw.as_bytes();
    let open = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
    if bytes[open] != b'[' {
        return None;
    }
    let start = open
        + 1
        + bytes[open + 1..]
            .iter()
            .position(|b| !b.is_ascii_whitespace())?;
    if bytes[start] != b'{' {
        return None;
    }
    // One pass over the first element: an object ends itself, and the stream says where.
    let mut elements = serde_json::Deserializer::from_str(&raw[start..]).into_iter::<Role<'_>>();
    let role = elements.next()?.ok()?.role?.get();
    let end = start + elements.byte_offset();
    // Decoded only when escaped, and only if short: a role is a short word, and a hostile
    // one must not cost an allocation of its size.
    let role: Cow<'_, str> = if !role.contains('\\') {
        Cow::Borrowed(role.strip_prefix('"')?.strip_suffix('"')?)
    } else if role.len() <= 64 {
        Cow::Owned(serde_json::from_str::<String>(role).ok()?)
    } else {
        return None;
    };
    matches!(&*role, "system" | "developer").then_some(end)
}

/// The byte range of `part` inside `whole` (it must be a sub-slice).
fn span_of(whole: &[u8], part: &str) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

fn non_empty(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|r| !matches!(r.get().trim(), "" | "null" | "\"\"" | "[]" | "{}"))
}

/// The prompt-bearing field of each API (named in errors about an empty body).
pub fn prompt_field(api: Api) -> &'static str {
    match api {
        Api::Completions | Api::HeadersOnly => "prompt",
        Api::ChatCompletions => "messages",
        Api::Embeddings | Api::Responses => "input",
        Api::Conversations => "items",
    }
}

/// Checks the shape of the fields the EPP reads against what the API accepts (what vLLM's
/// request models accept): the top-level JSON type and, for arrays, the first element's type.
/// Deeper checks are the engine's; these are O(1) and catch the shapes that would otherwise be
/// routed and rejected by the engine after a scheduling decision was spent on them.
fn check_shapes(api: Api, f: &Fields<'_>) -> Result<(), BodyError> {
    let wrong = |field, expected| BodyError::WrongType {
        api: api.as_str(),
        field,
        expected,
    };
    let kind = |raw: Option<&RawValue>| raw.map(|r| kind_of(r.get()));
    let first = |raw: Option<&RawValue>| raw.and_then(|r| first_element_kind(r.get()));
    if let Some(s) = f.stream
        && !matches!(s.get().trim(), "true" | "false" | "null")
    {
        return Err(wrong("stream", "a boolean"));
    }
    if let Some(k) = kind(f.cache_salt)
        && k != JsonKind::String
        && f.cache_salt.is_some_and(|r| r.get().trim() != "null")
    {
        return Err(wrong("cache_salt", "a string"));
    }
    match api {
        Api::Completions | Api::HeadersOnly => {
            const PROMPT: &str = "a string, an array of strings, or an array of token ids";
            match kind(f.prompt) {
                Some(JsonKind::Object) => return Err(wrong("prompt", PROMPT)),
                Some(JsonKind::Array) if first(f.prompt) == Some(JsonKind::Object) => {
                    return Err(wrong("prompt", PROMPT));
                }
                Some(JsonKind::Other) if f.prompt.is_some_and(|r| r.get().trim() != "null") => {
                    return Err(wrong("prompt", PROMPT));
                }
                _ => {}
            }
        }
        Api::ChatCompletions => {
            const MESSAGES: &str = "an array of message objects";
            match kind(f.messages) {
                None => {}
                Some(JsonKind::Array)
                    if first(f.messages).is_some_and(|k| k != JsonKind::Object) =>
                {
                    return Err(wrong("messages", MESSAGES));
                }
                Some(JsonKind::Array) => {}
                Some(_) if f.messages.is_some_and(|r| r.get().trim() == "null") => {}
                Some(_) => return Err(wrong("messages", MESSAGES)),
            }
        }
        Api::Embeddings | Api::Responses => {
            const INPUT: &str = "a string or an array";
            if matches!(kind(f.input), Some(JsonKind::Object))
                || (matches!(kind(f.input), Some(JsonKind::Other))
                    && f.input.is_some_and(|r| r.get().trim() != "null"))
            {
                return Err(wrong("input", INPUT));
            }
            if api == Api::Responses {
                if kind(f.instructions).is_some_and(|k| k != JsonKind::String)
                    && f.instructions.is_some_and(|r| r.get().trim() != "null")
                {
                    return Err(wrong("instructions", "a string"));
                }
                if kind(f.tools).is_some_and(|k| k != JsonKind::Array)
                    && f.tools.is_some_and(|r| r.get().trim() != "null")
                {
                    return Err(wrong("tools", "an array"));
                }
            }
        }
        Api::Conversations => {
            if kind(f.items).is_some_and(|k| k != JsonKind::Array)
                && f.items.is_some_and(|r| r.get().trim() != "null")
            {
                return Err(wrong("items", "an array"));
            }
        }
    }
    Ok(())
}

/// The `model` of a body on a path that is none of the APIs the EPP knows (a router in front
/// of every route, as the body-based router, sees `/v1/audio/…`, `/v1/rerank`, or another
/// service's uploads): a JSON object's valid string `model`, or nothing. Nothing else of the
/// body is required, and a body that is not JSON is not an error here.
pub fn model_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ModelOnly<'a> {
        #[serde(borrow)]
        model: Option<&'a RawValue>,
    }
    let text = std::str::from_utf8(body).ok()?;
    // serde reads a struct from an array too, by position: only an object names a model.
    if kind_of(text) != JsonKind::Object {
        return None;
    }
    let raw = serde_json::from_str::<ModelOnly<'_>>(text).ok()?.model?;
    if kind_of(raw.get()) != JsonKind::String {
        return None;
    }
    let model: String = serde_json::from_str(raw.get()).ok()?;
    validate_model_name(&model).ok()?;
    Some(model)
}

/// Whether `part` lies within `whole`'s bytes (a slice of it, so held by it), rather than
/// being a copy apart. An empty part holds nothing either way.
pub fn is_slice_of(part: &Bytes, whole: &Bytes) -> bool {
    let start = whole.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    part.is_empty() || (at >= start && at.saturating_add(part.len()) <= start + whole.len())
}

/// Parses and validates a request body of `api`.
pub fn parse_body(api: Api, body: &Bytes) -> Result<ParsedBody, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::EmptyBody {
            api: api.as_str(),
            field: prompt_field(api),
        });
    }
    let text = std::str::from_utf8(body).map_err(BodyError::json)?;
    // serde reads a struct from an array too, by position (`["m", …]` would name model "m").
    if kind_of(text) != JsonKind::Object {
        return Err(BodyError::Json("the body must be a JSON object".into()));
    }
    let fields: Fields<'_> = serde_json::from_str(text).map_err(BodyError::json)?;
    let model_raw = fields
        .model
        .filter(|m| m.get().trim() != "null")
        .ok_or(BodyError::MissingModel)?;
    if kind_of(model_raw.get()) != JsonKind::String {
        return Err(BodyError::InvalidModel("must be a string"));
    }
    let model: Cow<'_, str> = serde_json::from_str(model_raw.get()).map_err(BodyError::json)?;
    validate_model_name(&model)?;
    check_shapes(api, &fields)?;
    let model_span = span_of(body, model_raw.get());
    let slice = |raw: &RawValue| body.slice(span_of(body, raw.get()));
    let missing = |field| BodyError::MissingField {
        api: api.as_str(),
        field,
    };
    // A plain string prompt is text through and through; anything else is JSON whose strings
    // are what the engine reads.
    let mut plain_text = false;
    let mut prompt_media_from = 0;
    let prompt = match api {
        Api::Completions | Api::HeadersOnly => {
            let raw = non_empty(fields.prompt).ok_or_else(|| missing("prompt"))?;
            if let Some(inner) = raw
                .get()
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
            {
                plain_text = true;
                // A plain string prompt: hash the text itself. The pass above validated it as
                // a JSON string, so without a backslash its text is the slice between the
                // quotes (found at memchr speed, not by a second JSON pass over what may be
                // hundreds of kilobytes); with escapes it is decoded once.
                if memchr::memchr(b'\\', inner.as_bytes()).is_none() {
                    body.slice(span_of(body, inner))
                } else {
                    match serde_json::from_str::<String>(raw.get()) {
                        Ok(s) => Bytes::from(s),
                        Err(e) => return Err(BodyError::json(e)),
                    }
                }
            } else {
                slice(raw)
            }
        }
        Api::ChatCompletions => {
            let messages = non_empty(fields.messages).ok_or_else(|| missing("messages"))?;
            let tools = non_empty(fields.tools);
            let documents = non_empty(fields.documents);
            if tools.is_none() && documents.is_none() {
                slice(messages)
            } else {
                // Chat templates render the tools and documents after a leading system (or
                // developer) message and before the rest of the conversation (Qwen's after the
                // system text, Llama 3.1's in the first user turn): they are hashed there, so
                // that the same tools under another system prompt match nothing, and the same
                // system prompt under other tools matches the system prompt. Each part is
                // marked, so that tools and documents of the same bytes hash apart. The system
                // message and the parts are text whatever their keys: media begin after them.
                // A prompt with tools leads with a mark of its own: some templates change the
                // system turn itself when tools are present (Llama 3.1's `Environment:
                // ipython`), so the same system prompt with and without tools is not assumed to
                // share a prefix (a miss where the engine would share one, never a false hit).
                let raw = messages.get();
                let split = leading_system_message_end(raw).unwrap_or(0);
                let mut buf = BytesMut::with_capacity(
                    raw.len()
                        + tools.map_or(0, |t| t.get().len())
                        + documents.map_or(0, |d| d.get().len())
                        + 3,
                );
                buf.extend_from_slice(&[WITH_TOOLS_MARKER]);
                buf.extend_from_slice(&raw.as_bytes()[..split]);
                for (marker, part) in [(TOOLS_MARKER, tools), (DOCUMENTS_MARKER, documents)] {
                    if let Some(part) = part {
                        buf.extend_from_slice(&[marker]);
                        buf.extend_from_slice(part.get().as_bytes());
                    }
                }
                prompt_media_from = buf.len();
                buf.extend_from_slice(&raw.as_bytes()[split..]);
                buf.freeze()
            }
        }
        Api::Embeddings => slice(non_empty(fields.input).ok_or_else(|| missing("input"))?),
        Api::Conversations => slice(non_empty(fields.items).ok_or_else(|| missing("items"))?),
        Api::Responses => {
            let input = non_empty(fields.input).ok_or_else(|| missing("input"))?;
            match (fields.instructions, fields.tools) {
                (None, None) => slice(input),
                // Instructions and tools come first in what the engine sees, so they lead the
                // prefix; with chat's tools, the one case that copies.
                (instructions, tools) => {
                    let mut buf = BytesMut::new();
                    for part in [instructions, tools].into_iter().flatten() {
                        buf.extend_from_slice(part.get().as_bytes());
                    }
                    prompt_media_from = buf.len();
                    buf.extend_from_slice(input.get().as_bytes());
                    buf.freeze()
                }
            }
        }
    };
    let estimated_prompt_tokens =
        estimate_prompt_tokens(api, &fields, &prompt, prompt_media_from, plain_text);
    let stream = fields.stream.is_some_and(|s| s.get().trim() == "true");
    let cache_salt = match fields.cache_salt {
        Some(raw) if kind_of(raw.get()) == JsonKind::String => {
            let salt: String = serde_json::from_str(raw.get()).map_err(BodyError::json)?;
            (!salt.is_empty()).then_some(salt)
        }
        _ => None,
    };
    let max_tokens = [
        fields.max_completion_tokens,
        fields.max_tokens,
        fields.max_output_tokens,
    ]
    .into_iter()
    .flatten()
    .find_map(|raw| raw.get().trim().parse::<u32>().ok());
    Ok(ParsedBody {
        model: model.into_owned(),
        stream,
        prompt,
        cache_salt,
        model_span,
        max_tokens,
        estimated_prompt_tokens,
        prompt_is_json: !plain_text,
        prompt_media_from,
    })
}

/// Replaces the `model` value at `span` with `new_model` (one copy of the body).
pub fn rewrite_model(body: &[u8], span: Range<usize>, new_model: &str) -> Bytes {
    let encoded = serde_json::to_string(new_model).unwrap_or_else(|_| format!("\"{new_model}\""));
    let mut out = BytesMut::with_capacity(body.len() + encoded.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(encoded.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out.freeze()
}

/// Rewrites `"model":"<from>"` and `"model": "<from>"` back to `<to>` in a response chunk
/// ([`ModelRewriteBack::rewrite`]). Returns `None` when the chunk does not contain either.
pub fn rewrite_response_model(chunk: &[u8], from: &str, to: &str) -> Option<Vec<u8>> {
    ModelRewriteBack::new(from, to)?.rewrite(chunk)
}

/// Rewrites the model a response names back to the one the client asked for:
/// `"model":"<from>"` and `"model": "<from>"` become `"model":"<to>"` and `"model": "<to>"`,
/// in a whole body ([`Self::rewrite`]) or in a body that arrives in chunks
/// ([`Self::rewrite_chunk`]), with the same result however the body is cut.
#[derive(Debug)]
pub struct ModelRewriteBack {
    /// Each spelling of the field with `<from>`, and its replacement.
    patterns: [(memchr::memmem::Finder<'static>, Vec<u8>); 2],
    /// The end of the last chunk, held back because it may begin a pattern that the next
    /// chunk completes: at most a pattern's length less one byte.
    held: Vec<u8>,
    /// `held`, charged to the response budget.
    charge: BodyCharge,
}

impl ModelRewriteBack {
    /// The rewrite of `from` back to `to` (`None`: a name JSON cannot encode).
    pub fn new(from: &str, to: &str) -> Option<Self> {
        let from = serde_json::to_string(from).ok()?;
        let to = serde_json::to_string(to).ok()?;
        let spelled = |sep: &str, model: &str| format!("\"model\"{sep}{model}").into_bytes();
        Some(Self {
            patterns: [":", ": "].map(|sep| {
                (
                    memchr::memmem::Finder::new(&spelled(sep, &from)).into_owned(),
                    spelled(sep, &to),
                )
            }),
            held: Vec::new(),
            charge: BodyCharge::default(),
        })
    }

    /// `body` rewritten, or `None` when it names no `<from>`.
    pub fn rewrite(&self, body: &[u8]) -> Option<Vec<u8>> {
        self.rewrite_whole(body).0
    }

    /// The next chunk of a body, rewritten: what can go out now. The chunk's end is held back
    /// when it may begin a pattern cut by the chunk boundary (Envoy's chunks follow the
    /// upstream's reads and frames, not SSE events or JSON fields), and goes out with the next
    /// chunk; with `end` (the body's last chunk) nothing is held. What is held is charged to
    /// `budget`; when the budget cannot hold it, it goes out as it is.
    pub fn rewrite_chunk(&mut self, chunk: Bytes, budget: &Arc<BodyBudget>, end: bool) -> Bytes {
        let data = if self.held.is_empty() {
            chunk
        } else {
            let mut joined = BytesMut::with_capacity(self.held.len() + chunk.len());
            joined.extend_from_slice(&self.held);
            joined.extend_from_slice(&chunk);
            self.held.clear();
            self.charge.release();
            joined.freeze()
        };
        let (rewritten, rewritten_to) = self.rewrite_whole(&data);
        let hold = if end {
            0
        } else {
            self.pattern_start_at_end(&data[rewritten_to..])
        };
        // A pattern is a few hundred bytes for a valid model name; the SSE line cap bounds what
        // an operator's name of any length could make a stream hold.
        let hold = if hold > 0 && hold <= MAX_SSE_LINE && self.charge.grow(budget, hold).is_ok() {
            self.held.extend_from_slice(&data[data.len() - hold..]);
            hold
        } else {
            0
        };
        match rewritten {
            // The held bytes come after the last rewrite: they end `out` as they end `data`.
            Some(mut out) => {
                out.truncate(out.len() - hold);
                Bytes::from(out)
            }
            None => data.slice(..data.len() - hold),
        }
    }

    /// What is held back, let go as it is (it holds no whole pattern): for a body that ends
    /// without a last chunk (trailers).
    pub fn flush(&mut self) -> Bytes {
        self.charge.release();
        Bytes::from(std::mem::take(&mut self.held))
    }

    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// `body` with every pattern rewritten (leftmost first, none overlapping), or `None` when
    /// there is none; and where the last one ends in `body` (0 without any).
    fn rewrite_whole(&self, body: &[u8]) -> (Option<Vec<u8>>, usize) {
        let find = |i: usize, from: usize| {
            let finder: &memchr::memmem::Finder<'static> = &self.patterns[i].0;
            finder.find(&body[from..]).map(|at| from + at)
        };
        let mut next = [find(0, 0), find(1, 0)];
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        // The two spellings differ at the byte after the colon: never at the same place.
        while let Some((at, i)) = (0..2).filter_map(|i| next[i].map(|at| (at, i))).min() {
            let (finder, replacement) = &self.patterns[i];
            let out =
                out.get_or_insert_with(|| Vec::with_capacity(body.len() + 2 * replacement.len()));
            out.extend_from_slice(&body[copied..at]);
            out.extend_from_slice(replacement);
            copied = at + finder.needle().len();
            for (j, n) in next.iter_mut().enumerate() {
                if n.is_some_and(|at| at < copied) {
                    *n = find(j, copied);
                }
            }
        }
        if let Some(out) = out.as_mut() {
            out.extend_from_slice(&body[copied..]);
        }
        (out, copied)
    }

    /// The length of the longest end of `tail` that is the start of a pattern but not all of
    /// it (0 when none is): the bytes a chunk boundary may have cut a pattern after.
    fn pattern_start_at_end(&self, tail: &[u8]) -> usize {
        let longest = self
            .patterns
            .iter()
            .map(|(f, _)| f.needle().len())
            .max()
            .unwrap_or(0);
        let window = &tail[tail.len().saturating_sub(longest.saturating_sub(1))..];
        // Every pattern starts with a quote: only the window's quotes can begin one; the
        // first that does gives the longest end.
        memchr::memchr_iter(b'"', window)
            .map(|at| &window[at..])
            .find(|end| {
                self.patterns
                    .iter()
                    .any(|(f, _)| end.len() < f.needle().len() && f.needle().starts_with(end))
            })
            .map_or(0, <[u8]>::len)
    }
}

/// Token usage reported by the model server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u64,
}

#[derive(Deserialize, Default)]
struct UsageJson {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<Object<Details>>,
    prompt_token_details: Option<Object<Details>>,
    input_tokens_details: Option<Object<Details>>,
}

/// A `T` read from a JSON object only. Serde's derived structs also take an array, its
/// elements as the fields in their order, which no server writes for a usage: the
/// `usage_json` fuzz target found `"usage":[4,62,3,…]` read as a usage whose total was not
/// its parts' sum.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OnlyMaps<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OnlyMaps<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(OnlyMaps(std::marker::PhantomData))
    }
}

#[derive(Deserialize, Default)]
struct Details {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<Object<UsageJson>>,
    #[serde(rename = "type")]
    kind: Option<String>,
    response: Option<Box<WithUsage>>,
}

impl From<Object<UsageJson>> for Usage {
    fn from(Object(u): Object<UsageJson>) -> Self {
        let prompt = u.prompt_tokens.or(u.input_tokens).unwrap_or(0);
        let completion = u.completion_tokens.or(u.output_tokens).unwrap_or(0);
        let cached = [
            u.prompt_tokens_details,
            u.prompt_token_details,
            u.input_tokens_details,
        ]
        .into_iter()
        .flatten()
        .find_map(|d| d.0.cached_tokens)
        .unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            // Saturating: the counts are the server's, and `u64::MAX + 1` would panic.
            total_tokens: u.total_tokens.unwrap_or(prompt.saturating_add(completion)),
            cached_tokens: cached,
        }
    }
}

fn usage_of(json: &[u8]) -> Option<Usage> {
    let v: WithUsage = serde_json::from_slice(json).ok()?;
    // The Responses API's last event: `response.completed`, or `response.incomplete` (e.g. at
    // `max_output_tokens`) or `response.failed`, each with the response and its usage.
    if matches!(
        v.kind.as_deref(),
        Some("response.completed" | "response.incomplete" | "response.failed")
    ) && let Some(r) = v.response
    {
        return r.usage.map(Usage::from);
    }
    v.usage.map(Usage::from)
}

/// Usage from a complete (non-streamed) JSON response body.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    usage_of(body)
}

/// Usage from the value of a JSON answer's top-level `usage` member, whitespace around it
/// allowed ([`crate::json_usage`]).
pub(crate) fn usage_from_member_value(value: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<Option<Object<UsageJson>>>(value)
        .ok()
        .flatten()
        .map(Usage::from)
}

/// Longest SSE line kept while waiting for its end; longer lines are skipped. A usage event
/// is small, but the Responses API's `response.completed` carries the whole answer with its
/// usage, so the cap stays at 1 MiB; the part kept is charged to the response budget
/// ([`SseUsageScanner::feed_charged`]).
const MAX_SSE_LINE: usize = 1 << 20;

/// Scans an SSE stream chunk by chunk for `usage`, keeping the last non-null one: with
/// `stream_options.continuous_usage_stats` vLLM puts a running usage in every chunk, and only
/// the last counts every completion token (the first says about none).
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    partial: Vec<u8>,
    /// `partial`, charged to the budget given to [`Self::feed_charged`].
    charge: BodyCharge,
    overflowed: bool,
    usage: Option<Usage>,
    data_events: u64,
}

impl SseUsageScanner {
    /// Feeds one chunk; an unfinished line is kept up to 1 MiB, uncharged.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.feed_within(chunk, None);
    }

    /// Feeds one chunk; an unfinished line is kept up to 1 MiB while `budget`
    /// can hold it (streams that stop reading mid-line would otherwise hold up to 1 MiB
    /// each, counted nowhere), and skipped past that.
    pub fn feed_charged(&mut self, chunk: &[u8], budget: &Arc<BodyBudget>) {
        self.feed_within(chunk, Some(budget));
    }

    fn feed_within(&mut self, mut chunk: &[u8], budget: Option<&Arc<BodyBudget>>) {
        // SSE ends a line at LF, CR or CRLF: a CR alone ends one too (the LF of a CRLF then
        // ends an empty line, which is no event). No JSON value holds a raw CR or LF.
        while let Some(nl) = memchr::memchr2(b'\n', b'\r', chunk) {
            let line_end = &chunk[..nl];
            if self.overflowed || self.partial.len() + line_end.len() > MAX_SSE_LINE {
                // A line over the limit is skipped however the stream was cut (the usage kept
                // is the last one, so a line read in one cut and not another would differ).
                self.overflowed = false;
                self.drop_partial();
            } else if self.partial.is_empty() {
                self.line(line_end);
            } else {
                self.partial.extend_from_slice(line_end);
                let line = std::mem::take(&mut self.partial);
                self.charge.release();
                self.line(&line);
            }
            chunk = &chunk[nl + 1..];
        }
        if self.overflowed || chunk.is_empty() {
            return;
        }
        let charged = budget.is_none_or(|b| self.charge.grow(b, chunk.len()).is_ok());
        if !charged || self.partial.len() + chunk.len() > MAX_SSE_LINE {
            self.overflowed = true;
            self.drop_partial();
        } else {
            self.partial.extend_from_slice(chunk);
        }
    }

    /// Frees the unfinished line, its allocation and its charge.
    fn drop_partial(&mut self) {
        self.partial = Vec::new();
        self.charge.release();
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            return;
        }
        self.data_events = self.data_events.saturating_add(1);
        if memchr::memmem::find(data, b"\"usage\"").is_none() {
            return;
        }
        if let Some(u) = usage_of(data) {
            self.usage = Some(u);
        }
    }

    /// The last usage found so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The `data:` events seen (`[DONE]` aside; a line over the cap is not seen): about one
    /// a token (or `--stream-granularity` tokens) of a streamed answer, give or take the
    /// role-only first chunk and a closing one; what the answer is charged at when the client
    /// did not ask for usage.
    pub fn data_events(&self) -> u64 {
        self.data_events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unfinished SSE line is charged to the response budget while kept, and skipped when
    /// the budget cannot hold it; the next line is read either way.
    #[test]
    fn an_unfinished_sse_line_is_charged_or_skipped() {
        let usage = b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n";
        let budget = Arc::new(BodyBudget::new(64 << 10));
        let mut kept = SseUsageScanner::default();
        kept.feed_charged(b"data: {\"choices\":[", &budget);
        assert_eq!(budget.held(), 18, "the unfinished line is charged");
        kept.feed_charged(b"]}\n", &budget);
        assert_eq!(budget.held(), 0, "a finished line is let go");
        // A line the budget cannot hold is skipped, its charge and allocation given back.
        let mut skipped = SseUsageScanner::default();
        skipped.feed_charged(&[b'x'; 100 << 10], &budget);
        assert_eq!(budget.held(), 0);
        assert_eq!(skipped.partial.capacity(), 0);
        skipped.feed_charged(b"tail of the long line\n", &budget);
        skipped.feed_charged(usage, &budget);
        assert_eq!(skipped.usage().map(|u| u.completion_tokens), Some(2));
        // Dropped mid-line, a scanner gives its charge back.
        kept.feed_charged(b"data: {", &budget);
        assert_eq!(budget.held(), 7);
        drop(kept);
        assert_eq!(budget.held(), 0);
    }

    /// Flow control's `maxBytes` counts a prompt held apart from the body: found by address.
    #[test]
    fn a_decoded_prompt_is_told_from_a_slice_of_the_body() {
        let plain = Bytes::from_static(br#"{"model":"m","prompt":"hello"}"#);
        let p = parse_body(Api::Completions, &plain).unwrap();
        assert!(is_slice_of(&p.prompt, &plain));
        let escaped = Bytes::from_static(br#"{"model":"m","prompt":"hel\nlo"}"#);
        let p = parse_body(Api::Completions, &escaped).unwrap();
        assert!(!is_slice_of(&p.prompt, &escaped), "decoded: a copy");
        let responses =
            Bytes::from_static(br#"{"model":"m","input":"hi","instructions":"be brief"}"#);
        let p = parse_body(Api::Responses, &responses).unwrap();
        assert!(!is_slice_of(&p.prompt, &responses), "put together: a copy");
        assert!(is_slice_of(&Bytes::new(), &plain));
        assert!(
            !is_slice_of(&plain, &plain.slice(1..)),
            "longer than the whole"
        );
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn model_names_with_invisible_or_bidi_characters_are_refused() {
        for name in [
            "a\u{202E}b",
            "a\u{200B}",
            "\u{FEFF}m",
            "a\u{2028}b",
            "a\u{2066}b",
            "m\u{E0041}\u{E007F}",
            "a\u{3164}",
        ] {
            assert!(
                matches!(validate_model_name(name), Err(BodyError::InvalidModel(_))),
                "{name:?}"
            );
        }
        for name in ["meta-llama/Llama-3.1-8B", "qwen2.5:7b", "モデル", "a b"] {
            assert!(validate_model_name(name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn a_model_name_of_white_space_alone_is_no_model() {
        for name in ["", " ", "   ", "\u{3000}", " \u{2003} "] {
            assert!(
                matches!(validate_model_name(name), Err(BodyError::MissingModel)),
                "{name:?}"
            );
        }
        let body = Bytes::from_static("{\"model\":\"\u{3000}\",\"prompt\":\"hi\"}".as_bytes());
        assert!(matches!(
            parse_body(Api::Completions, &body),
            Err(BodyError::MissingModel)
        ));
    }

    #[test]
    fn api_by_path() {
        assert_eq!(api_for_path("/v1/chat/completions"), Api::ChatCompletions);
        assert_eq!(api_for_path("/v1/completions?x=1"), Api::Completions);
        assert_eq!(api_for_path("/v1/responses"), Api::Responses);
        assert_eq!(api_for_path("/v1/embeddings/"), Api::Embeddings);
        assert_eq!(api_for_path("/v1/conversations"), Api::Conversations);
        assert_eq!(api_for_path("/whatever"), Api::Completions);
    }

    #[test]
    fn engine_admin_paths_are_recognised_however_spelt() {
        use PathRefusal::{EngineAdmin, Malformed};
        for path in [
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/unload_lora_adapter",
            "/v1/load_lora_adapter/",
            "//v1//load_lora_adapter?x=1",
            "/v1/%6Coad_lora_adapter",
            "/v1/%6coad%5Flora%5fadapter",
            "/V1/LOAD_LORA_ADAPTER",
            "/collective_rpc",
            "/flush_cache",
            "/update_weights_from_disk#frag",
        ] {
            assert_eq!(check_request_path(path), Err(EngineAdmin), "{path}");
        }
        // Review: what uvicorn decodes and Starlette routes to the same handler.
        for path in [
            "/v1/load_lora_adapter%0A",
            "/v1/load_lora_adapter%0a/",
            "/v1%2Fload_lora_adapter",
            "/v1%2fload_lora_adapter",
            "/v1%5Cload_lora_adapter",
            "/v1/load_lora_adapter%00",
            "/v1/%7F",
            "/v1/chat/completions\n",
        ] {
            assert_eq!(check_request_path(path), Err(Malformed), "{path:?}");
        }
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/",
            "",
            "/v1/load_lora_adapter/x",
            "/v1/load_lora_adapters",
            "/v1/load_lora_adapter;x",
            "/v1/%6",
            "/v1/%zzload_lora_adapter",
            "/v1/%252Fload_lora_adapter",
            "/v1/completions?next=%0A%2F",
        ] {
            assert_eq!(check_request_path(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn completions_prompt_is_zero_copy() {
        let body = b(r#"{"model":"m","prompt":"hello world","stream":true,"max_tokens":5}"#);
        let p = parse_body(Api::Completions, &body).unwrap();
        assert_eq!(p.model, "m");
        assert_eq!(p.max_tokens, Some(5));
        assert!(p.stream);
        assert_eq!(&p.prompt[..], b"hello world");
        assert_eq!(&body[p.model_span.clone()], b"\"m\"");
        // Shares the body's allocation.
        let base = body.as_ptr() as usize;
        assert!((base..base + body.len()).contains(&(p.prompt.as_ptr() as usize)));
    }

    #[test]
    fn escaped_prompt_is_decoded() {
        let p = parse_body(Api::Completions, &b(r#"{"model":"m","prompt":"a\nb"}"#)).unwrap();
        assert_eq!(&p.prompt[..], b"a\nb");
        let arr = parse_body(Api::Completions, &b(r#"{"model":"m","prompt":["x","y"]}"#)).unwrap();
        assert_eq!(&arr.prompt[..], br#"["x","y"]"#);
    }

    #[test]
    fn chat_uses_raw_messages() {
        let body =
            b(r#"{"messages":[{"role":"user","content":"hi"}],"model":"llama","cache_salt":"s"}"#);
        let p = parse_body(Api::ChatCompletions, &body).unwrap();
        assert_eq!(&p.prompt[..], br#"[{"role":"user","content":"hi"}]"#);
        assert_eq!(p.cache_salt.as_deref(), Some("s"));
        assert!(!p.stream);
    }

    /// The prompt's token estimate counts its text and media parts, not the JSON around them:
    /// a client cannot pad a body into minutes of predicted prefill on one replica.
    #[test]
    fn the_prompt_estimate_counts_content_not_padding() {
        let text = "word ".repeat(2000);
        let plain = parse_body(
            Api::Completions,
            &b(&format!(r#"{{"model":"m","prompt":"{text}"}}"#)),
        )
        .unwrap();
        assert_eq!(plain.estimated_prompt_tokens, 2500);
        let padding = " ".repeat(8 << 20);
        let padded = parse_body(
            Api::ChatCompletions,
            &b(&format!(
                r#"{{"model":"m","messages":[{padding}{{"role":"user",{padding}"content":"{text}"}}]}}"#
            )),
        )
        .unwrap();
        assert_eq!(
            padded.estimated_prompt_tokens,
            (10_000 + 15_u64).div_ceil(4)
        );
        let image = format!("data:image/png;base64,{}", "QUJD".repeat(1 << 18));
        let vision = parse_body(
            Api::ChatCompletions,
            &b(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{image}"}}}}]}}]}}"#
            )),
        )
        .unwrap();
        assert!(
            vision.estimated_prompt_tokens < endpoint_picker::cost::MEDIA_PART_TOKENS + 16,
            "{}",
            vision.estimated_prompt_tokens
        );
    }

    /// What the engine renders as text beside the prompt counts, media keys or not: tools and
    /// instructions of the Responses API, a chat request's tools and documents.
    #[test]
    fn text_beside_the_prompt_counts_whatever_its_keys() {
        let hidden = "word".repeat(10_000);
        let responses = parse_body(
            Api::Responses,
            &b(&format!(
                r#"{{"model":"m","input":"q","tools":[{{"type":"function","parameters":{{"data":"{hidden}"}}}}]}}"#
            )),
        )
        .unwrap();
        assert!(
            responses.estimated_prompt_tokens > 10_000,
            "{}",
            responses.estimated_prompt_tokens
        );
        // The tools lead the hashed prompt and are text whatever their keys: media begin
        // with the input.
        assert_eq!(
            &responses.prompt[responses.prompt_media_from..],
            &b"\"q\""[..]
        );
        let chat = parse_body(
            Api::ChatCompletions,
            &b(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"function":{{"description":"{hidden}"}}}}],"documents":[{{"text":"{hidden}"}}]}}"#
            )),
        )
        .unwrap();
        assert!(
            chat.estimated_prompt_tokens > 20_000,
            "{}",
            chat.estimated_prompt_tokens
        );
        // The tools and documents lead the hashed prompt, as text: media begin with the
        // messages.
        assert_eq!(
            &chat.prompt[chat.prompt_media_from..],
            br#"[{"role":"user","content":"hi"}]"#
        );
        assert!(chat.prompt.starts_with(b"\x1f\x1d[{\"function\":"));
    }

    /// Chat's tools and documents were counted but not hashed: the same messages under other
    /// tools matched in the EPP and missed in the engine, whose template renders the tools
    /// first. They lead the hashed prompt now; without them it is the messages' own bytes.
    #[test]
    fn chat_tools_and_documents_lead_the_hashed_prompt() {
        let chat = |extra: &str| {
            parse_body(
                Api::ChatCompletions,
                &b(&format!(
                    r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
                )),
            )
            .unwrap()
        };
        let plain = chat("");
        assert_eq!(&plain.prompt[..], br#"[{"role":"user","content":"hi"}]"#);
        assert_eq!(plain.prompt_media_from, 0);
        for empty in [r#","tools":null"#, r#","tools":[]"#] {
            assert_eq!(chat(empty).prompt, plain.prompt, "{empty}");
        }
        let a = chat(r#","tools":[{"type":"function","function":{"name":"a"}}]"#);
        let b2 = chat(r#","tools":[{"type":"function","function":{"name":"b"}}]"#);
        assert_ne!(a.prompt, b2.prompt);
        assert_eq!(
            a.prompt,
            chat(r#","tools":[{"type":"function","function":{"name":"a"}}]"#).prompt
        );
        // Marked apart: the same bytes as tools or as documents are other prompts.
        let documents = chat(r#","tools":[1],"documents":[{"text":"d"}]"#);
        assert_eq!(
            &documents.prompt[..documents.prompt_media_from],
            b"\x1f\x1d[1]\x1e[{\"text\":\"d\"}]"
        );
        assert_ne!(
            chat(r#","tools":[1]"#).prompt,
            chat(r#","documents":[1]"#).prompt
        );
        // Review 11: templates render the tools after a leading system message, so they are
        // hashed after it: the same system prompt under other tools shares its bytes, the same
        // tools under another system prompt share nothing.
        let with_system = |system: &str, tool: &str| {
            parse_body(
                Api::ChatCompletions,
                &b(&format!(
                    r#"{{"model":"m","messages":[ {{"role":"system","content":"{system}"}} , {{"role":"user","content":"hi"}}],"tools":[{{"name":"{tool}"}}]}}"#
                )),
            )
            .unwrap()
        };
        let s1 = with_system("be kind", "a");
        assert_eq!(
            &s1.prompt[..],
            &b"\x1f[ {\"role\":\"system\",\"content\":\"be kind\"}\x1d[{\"name\":\"a\"}] , {\"role\":\"user\",\"content\":\"hi\"}]"[..]
        );
        assert_eq!(
            &s1.prompt[s1.prompt_media_from..],
            &b" , {\"role\":\"user\",\"content\":\"hi\"}]"[..]
        );
        let shared = |x: &ParsedBody, y: &ParsedBody| {
            x.prompt
                .iter()
                .zip(y.prompt.iter())
                .take_while(|(a, b)| a == b)
                .count()
        };
        let system_len = r#"_[ {"role":"system","content":"be kind"}"#.len();
        assert!(shared(&s1, &with_system("be kind", "b")) > system_len);
        assert!(shared(&s1, &with_system("be firm", "a")) < system_len);
        // A leading user message stays in place, after the tools.
        let user_first = chat(r#","tools":[1]"#);
        assert!(user_first.prompt.starts_with(b"\x1f\x1d[1]["));
        // Review 12: with tools or without, the same system prompt shares nothing (a template
        // may change the system turn when tools are present).
        let without = parse_body(
            Api::ChatCompletions,
            &b(r#"{"model":"m","messages":[ {"role":"system","content":"be kind"} , {"role":"user","content":"hi"}]}"#),
        )
        .unwrap();
        assert_ne!(without.prompt[0], s1.prompt[0]);
        // The estimate is unchanged by where the tools go: the messages with media keys, the
        // tools as text.
        assert_eq!(
            a.estimated_prompt_tokens,
            plain.estimated_prompt_tokens
                + endpoint_picker::cost::estimate_json_text_tokens(
                    br#"[{"type":"function","function":{"name":"a"}}]"#
                )
        );
    }

    #[test]
    fn a_leading_system_message_is_found_past_strings_that_look_like_structure() {
        let tricky = r#"[{"content":"} ] \" { [","role":"system"},{"role":"user"}]"#;
        let end = leading_system_message_end(tricky).unwrap();
        assert_eq!(
            &tricky[..end],
            r#"[{"content":"} ] \" { [","role":"system"}"#
        );
        assert!(leading_system_message_end(r#" [ {"role":"developer"} ]"#).is_some());
        assert!(leading_system_message_end(r#"[{"role":"\u0073ystem"}]"#).is_some());
        for none in [
            r#"[{"role":"user","content":"x"},{"role":"system"}]"#,
            r#"[{"role":["system"]}]"#,
            r#"[{"content":"x"}]"#,
            r#"["system"]"#,
            r#"{"role":"system"}"#,
            "[]",
            "",
        ] {
            assert_eq!(leading_system_message_end(none), None, "{none}");
        }
    }

    #[test]
    fn responses_put_instructions_first() {
        let p = parse_body(
            Api::Responses,
            &b(r#"{"model":"m","input":"q","instructions":"be brief"}"#),
        )
        .unwrap();
        assert_eq!(&p.prompt[..], br#""be brief""q""#);
        let p = parse_body(Api::Embeddings, &b(r#"{"model":"m","input":["a"]}"#)).unwrap();
        assert_eq!(&p.prompt[..], br#"["a"]"#);
        let p = parse_body(Api::Conversations, &b(r#"{"model":"m","items":[1]}"#)).unwrap();
        assert_eq!(&p.prompt[..], b"[1]");
    }

    #[test]
    fn invalid_bodies() {
        let e = |api, s| parse_body(api, &b(s)).unwrap_err();
        assert!(matches!(e(Api::Completions, "{nope"), BodyError::Json(_)));
        assert!(matches!(e(Api::Completions, "[1,2]"), BodyError::Json(_)));
        assert!(matches!(e(Api::Completions, "\u{ff}"), BodyError::Json(_)));
        assert_eq!(
            e(Api::Completions, r#"{"prompt":"x"}"#),
            BodyError::MissingModel
        );
        assert_eq!(
            e(Api::Completions, r#"{"model":"","prompt":"x"}"#),
            BodyError::MissingModel
        );
        assert_eq!(
            e(Api::Completions, r#"{"model":5,"prompt":"x"}"#),
            BodyError::InvalidModel("must be a string")
        );
        assert!(matches!(
            e(Api::Completions, r#"{"model":"m"}"#),
            BodyError::MissingField {
                field: "prompt",
                ..
            }
        ));
        assert!(matches!(
            e(Api::Completions, r#"{"model":"m","prompt":""}"#),
            BodyError::MissingField { .. }
        ));
        assert!(matches!(
            e(Api::ChatCompletions, r#"{"model":"m","messages":[]}"#),
            BodyError::MissingField { .. }
        ));
        assert!(matches!(
            e(
                Api::ChatCompletions,
                r#"{"model":"m","stream":"yes","messages":[{}]}"#
            ),
            BodyError::WrongType {
                field: "stream",
                ..
            }
        ));
        assert!(matches!(
            e(Api::ChatCompletions, r#"{"model":"m","messages":[1]}"#),
            BodyError::WrongType {
                field: "messages",
                ..
            }
        ));
        assert!(matches!(
            e(Api::ChatCompletions, "  "),
            BodyError::EmptyBody {
                field: "messages",
                ..
            }
        ));
        assert!(matches!(
            e(
                Api::Completions,
                r#"{"model":"m","model":"n","prompt":"x"}"#
            ),
            BodyError::Json(_)
        ));
    }

    #[test]
    fn model_rewrite_splices_once() {
        let body = b(r#"{"model": "base", "prompt":"p"}"#);
        let p = parse_body(Api::Completions, &body).unwrap();
        let out = rewrite_model(&body, p.model_span, "lora-\"x\"");
        assert_eq!(&out[..], br#"{"model": "lora-\"x\"", "prompt":"p"}"#);
        let again = parse_body(Api::Completions, &out).unwrap();
        assert_eq!(again.model, "lora-\"x\"");
    }

    #[test]
    fn response_model_rewrite() {
        let out = rewrite_response_model(br#"{"id":1,"model":"t","x":{"model":"t"}}"#, "t", "orig")
            .unwrap();
        assert_eq!(out, br#"{"id":1,"model":"orig","x":{"model":"orig"}}"#);
        let spaced = rewrite_response_model(br#"{"model": "t"}"#, "t", "o").unwrap();
        assert_eq!(spaced, br#"{"model": "o"}"#);
        assert!(rewrite_response_model(b"{}", "t", "o").is_none());
        let both = rewrite_response_model(br#"{"model": "t"}{"model":"t"}"#, "t", "o").unwrap();
        assert_eq!(both, br#"{"model": "o"}{"model":"o"}"#, "both spellings");
    }

    /// Review F2: fed in chunks cut anywhere, and a byte at a time, a body comes out as the
    /// whole body's rewrite, both spellings of the field included; what is held back is at most
    /// a pattern's length less one, charged to the budget, and nothing once the body ends.
    #[test]
    fn a_chunked_model_rewrite_equals_the_whole_rewrite() {
        let body = b"data: {\"model\":\"t-1\",\"x\":\"\\\"\"}\n\ndata: {\"model\": \"t-1\"}\n\n\"model\":\"t-1\"";
        let budget = Arc::new(BodyBudget::new(1 << 20));
        let whole = ModelRewriteBack::new("t-1", "orig").unwrap();
        let expected = whole.rewrite(body).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&expected),
            "data: {\"model\":\"orig\",\"x\":\"\\\"\"}\n\ndata: {\"model\": \"orig\"}\n\n\"model\":\"orig\""
        );
        let longest = b"\"model\": \"t-1\"".len();
        let mut cuts: Vec<Vec<usize>> = (0..=body.len()).map(|cut| vec![cut]).collect();
        cuts.push((1..body.len()).collect());
        for cut in cuts {
            let mut r = ModelRewriteBack::new("t-1", "orig").unwrap();
            let mut out = Vec::new();
            let mut from = 0;
            for &to in &cut {
                out.extend_from_slice(&r.rewrite_chunk(
                    Bytes::copy_from_slice(&body[from..to]),
                    &budget,
                    false,
                ));
                assert!(r.held() < longest);
                assert_eq!(budget.held(), r.held());
                from = to;
            }
            out.extend_from_slice(&r.rewrite_chunk(
                Bytes::copy_from_slice(&body[from..]),
                &budget,
                true,
            ));
            assert_eq!(r.held(), 0);
            assert_eq!(budget.held(), 0);
            assert!(
                out == expected,
                "cut at {cut:?}: {}",
                String::from_utf8_lossy(&out)
            );
        }
        // A chunk that may begin the field is held back; flushed, it goes out as it came.
        let mut r = ModelRewriteBack::new("t-1", "orig").unwrap();
        assert_eq!(
            &r.rewrite_chunk(Bytes::from_static(b"{\"mod"), &budget, false)[..],
            b"{"
        );
        assert_eq!(&r.flush()[..], b"\"mod");
        assert_eq!(budget.held(), 0);
        // A budget that cannot hold it: it goes out as it is.
        let full = Arc::new(BodyBudget::new(2));
        let mut r = ModelRewriteBack::new("t-1", "orig").unwrap();
        assert_eq!(
            &r.rewrite_chunk(Bytes::from_static(b"{\"mod"), &full, false)[..],
            b"{\"mod"
        );
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn usage_from_bodies() {
        let u = usage_from_json(
            br#"{"object":"chat.completion","usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
                cached_tokens: 8
            }
        );
        let r = usage_from_json(
            br#"{"object":"response","usage":{"input_tokens":3,"output_tokens":4}}"#,
        )
        .unwrap();
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens, r.total_tokens),
            (3, 4, 7)
        );
        assert!(usage_from_json(b"{}").is_none());
        assert!(usage_from_json(br#"{"usage":null}"#).is_none());
    }

    /// Found by the `usage_json` fuzz target: a derived struct also takes an array.
    #[test]
    fn usage_is_read_from_objects_only() {
        assert!(usage_from_json(br#"{"usage":[4,62,3,676,17,{},{},null]}"#).is_none());
        assert!(usage_from_member_value(b"[4,62,3,676,17,{},{},null]").is_none());
        let u = usage_from_json(br#"{"usage":{"prompt_tokens":1,"prompt_tokens_details":[5]}}"#);
        assert!(u.is_none(), "details from an array either");
        let u = usage_from_member_value(br#" {"prompt_tokens":1,"completion_tokens":2} "#).unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (1, 2, 3)
        );
    }

    #[test]
    fn usage_total_saturates() {
        // Found in review of the usage_json fuzz target: the implied total overflowed (a
        // panic with overflow checks, a wrapped total without).
        let u = usage_from_json(
            br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#,
        )
        .unwrap();
        assert_eq!(u.total_tokens, u64::MAX);
    }

    #[test]
    fn sse_usage_across_chunk_boundaries() {
        let stream = "data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n\
                      data: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut s = SseUsageScanner::default();
            s.feed(&stream.as_bytes()[..split]);
            s.feed(&stream.as_bytes()[split..]);
            let u = s.usage().unwrap_or_else(|| panic!("split at {split}"));
            assert_eq!((u.prompt_tokens, u.completion_tokens), (7, 2));
        }
        let mut resp = SseUsageScanner::default();
        resp.feed(b"event: response.completed\r\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":1,\"output_tokens\":2}}}\r\n");
        assert_eq!(resp.usage().unwrap().completion_tokens, 2);
        // Review 15: an answer cut at `max_output_tokens` (or failed) ends on another event
        // that carries its usage as well; those were recorded without tokens.
        for kind in ["response.incomplete", "response.failed"] {
            let mut resp = SseUsageScanner::default();
            resp.feed(format!("event: {kind}\ndata: {{\"type\":\"{kind}\",\"response\":{{\"usage\":{{\"input_tokens\":1,\"output_tokens\":3}}}}}}\n\n").as_bytes());
            assert_eq!(resp.usage().map(|u| u.completion_tokens), Some(3), "{kind}");
        }
        // Another event's nested response is not read.
        let mut other = SseUsageScanner::default();
        other.feed(b"data: {\"type\":\"response.created\",\"response\":{\"usage\":{\"output_tokens\":3}}}\n\n");
        assert_eq!(other.usage(), None);
    }

    #[test]
    fn a_body_that_is_not_an_object_is_refused() {
        for body in [&br#"["llama", false, "prompt"]"#[..], b"\"llama\"", b"7"] {
            let e = parse_body(Api::Completions, &Bytes::from_static(body)).unwrap_err();
            assert!(matches!(e, BodyError::Json(_)), "{e}");
        }
    }

    #[test]
    fn the_model_of_a_body_on_an_unknown_path() {
        assert_eq!(
            model_of(br#"{"model":"m","input":"say it"}"#).as_deref(),
            Some("m")
        );
        // No prompt needed; not JSON, no model, a model that is not a valid name: nothing.
        for body in [
            &b"--boundary\r\nContent-Disposition: form-data"[..],
            br#"{"input":"x"}"#,
            br#"{"model":7}"#,
            b"{\"model\":\"a\\r\\nx-evil: 1\"}",
            br#"["model"]"#,
            b"",
        ] {
            assert_eq!(model_of(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn sse_usage_is_the_last_non_null_one() {
        // `continuous_usage_stats`: a running count in every chunk; the last is the total.
        let mut s = SseUsageScanner::default();
        s.feed(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":0}}\n\n",
        );
        assert_eq!(s.usage().unwrap().completion_tokens, 0);
        s.feed(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1}}\n\n",
        );
        s.feed(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":5}}\n\n",
        );
        // A null usage or an event without one does not erase it.
        s.feed(b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"x\":1}\n\ndata: [DONE]\n\n");
        let u = s.usage().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (7, 5, 12)
        );
    }

    #[test]
    fn sse_overlong_line_is_skipped() {
        let mut s = SseUsageScanner::default();
        s.feed(&vec![b'x'; MAX_SSE_LINE + 10]);
        s.feed(b"tail\ndata: {\"usage\":{\"prompt_tokens\":1}}\n");
        assert_eq!(s.usage().unwrap().prompt_tokens, 1);
        // A usage line over the limit is skipped whether it comes whole, in pieces, or with
        // its end pushing it over.
        let mut long = b"data: {\"usage\":{\"prompt_tokens\":2},\"x\":\"".to_vec();
        long.resize(MAX_SSE_LINE - 1, b'x');
        long.extend_from_slice(b"\"}\n");
        // The line (without its newline) is one byte over.
        assert_eq!(long.len(), MAX_SSE_LINE + 2);
        for cut in [
            0,
            10,
            MAX_SSE_LINE - 10,
            MAX_SSE_LINE,
            MAX_SSE_LINE + 1,
            long.len(),
        ] {
            let mut s = SseUsageScanner::default();
            s.feed(b"data: {\"usage\":{\"prompt_tokens\":1}}\n");
            s.feed(&long[..cut]);
            s.feed(&long[cut..]);
            assert_eq!(s.usage().unwrap().prompt_tokens, 1, "cut at {cut}");
        }
        // One byte shorter, it is read.
        let mut s = SseUsageScanner::default();
        s.feed(&long[..MAX_SSE_LINE - 2]);
        s.feed(b"\"}\n");
        assert_eq!(s.usage().unwrap().prompt_tokens, 2);
    }
}
