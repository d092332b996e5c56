//! Token ids exactly as the engine makes them.
//!
//! The precise prefix index keys KV blocks by the token ids the engine publishes; to look a
//! request up, the EPP must compute the same ids. This crate loads a model's own
//! `tokenizer.json` (Hugging Face `tokenizers`, no hub download) and chat template (MiniJinja,
//! set up as transformers renders templates: [`template`]), and tokenises a request body as
//! vLLM does:
//!
//! - `/v1/completions`: a string prompt (or a list of one) is encoded with the tokenizer's
//!   special tokens (`add_special_tokens=True`: Llama's `<|begin_of_text|>`); a prompt of token
//!   ids passes through unchanged;
//! - `/v1/chat/completions`: `messages` (with `tools`, `documents`, `add_generation_prompt`,
//!   `continue_final_message`, `chat_template_kwargs`) go through the chat template, and the
//!   text is encoded without adding special tokens (the template wrote them).
//!
//! Bounds ([`Limits`]): the text tokenised is capped ([`Limits::max_prompt_bytes`], also the cap
//! on the chat template's input fields together, on the rendered chat, and on a prompt's id
//! count), templates run on fuel, and every failure is an error value, never a panic: the
//! caller routes without ids.
//!
//! The simulator (`sim --tokenizer --chat-template`) uses this crate too, so that its KV blocks
//! and events carry the ids the EPP computes.

pub mod conversation;
pub mod prefix_cache;
pub mod template;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

pub use conversation::ContentFormat;
pub use prefix_cache::{PrefixCache, PrefixCacheStats};
pub use template::{ChatInput, ChatTemplate};

/// Why a tokenizer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer.json` is not a tokenizer `tokenizers` can load.
    #[error("loading {path}: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What `tokenizers` said.
        reason: String,
    },
    /// `tokenizer_config.json` is not JSON of the expected shape.
    #[error("parsing {path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The chat template does not compile.
    #[error("compiling the chat template from {path}: {source}")]
    Template {
        /// Where it came from.
        path: PathBuf,
        /// What MiniJinja said.
        #[source]
        source: minijinja::Error,
    },
    /// A limit of zero.
    #[error("invalid limit: {0}")]
    Limit(&'static str),
}

/// Why a request was not tokenised. The caller routes without ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizeError {
    /// The text (prompt, messages or rendered chat) is over the cap.
    #[error("over the tokenization cap of {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// Not a request this tokenizer handles (a batch of prompts, no chat template, …).
    #[error("not tokenised: {0}")]
    Unsupported(&'static str),
    /// The body is not the JSON the API expects.
    #[error("invalid request body: {0}")]
    Invalid(String),
    /// The chat template refused the conversation, failed, or ran out of fuel.
    #[error("chat template: {reason}")]
    Template {
        /// MiniJinja's error, shortened.
        reason: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// The bounds of one tokenization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes tokenised for one request: the completions prompt, the chat template's
    /// input (the request's `messages`, `tools`, `documents` and `chat_template_kwargs` JSON,
    /// together), the rendered chat text and any one `tojson` output in it are each refused
    /// above it; a token-id prompt may hold at most this many ids. Default 512 KiB, about 128k
    /// tokens at 4 bytes a token (a long-context model's whole window); tokenising that much
    /// takes about 150 ms with the test tokenizer on a loaded machine (see the criterion
    /// bench).
    pub max_prompt_bytes: usize,
    /// The fuel of one chat-template render (MiniJinja's unit: about one instruction, or 64
    /// bytes allocated). Default 4,000,000: a 512 KiB conversation of many messages renders
    /// with room to spare; a runaway loop stops after a few tens of milliseconds.
    pub template_fuel: u64,
    /// The most bytes the prefix cache holds ([`prefix_cache`]: the ids of the beginnings of
    /// texts tokenised before, reused by texts that begin the same way); 0 turns it off.
    /// Default 32 MiB: about 8 million ids, the shared beginnings of thousands of long
    /// prompts.
    pub prefix_cache_bytes: usize,
}

impl Limits {
    /// Default [`Limits::max_prompt_bytes`].
    pub const DEFAULT_MAX_PROMPT_BYTES: usize = 512 * 1024;
    /// Default [`Limits::template_fuel`].
    pub const DEFAULT_TEMPLATE_FUEL: u64 = 4_000_000;
    /// Default [`Limits::prefix_cache_bytes`].
    pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 32 * 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_bytes: Self::DEFAULT_MAX_PROMPT_BYTES,
            template_fuel: Self::DEFAULT_TEMPLATE_FUEL,
            prefix_cache_bytes: Self::DEFAULT_PREFIX_CACHE_BYTES,
        }
    }
}

/// The API of a body to tokenise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    ChatCompletions,
}

/// A model's tokenizer and chat template.
#[derive(Debug)]
pub struct Tokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat: Option<ChatTemplate>,
    limits: Limits,
    vocab_size: u32,
    prefix: Option<Prefix>,
}

/// The prefix cache of a tokenizer that can be cut exactly, and the special tokens its
/// post-processor puts first (added before the cached ids when special tokens are asked for).
#[derive(Debug)]
struct Prefix {
    cache: PrefixCache,
    lead: Vec<u32>,
}

/// The fields of `tokenizer_config.json` used here.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<TemplateField>,
    #[serde(default)]
    bos_token: Option<TokenField>,
    #[serde(default)]
    eos_token: Option<TokenField>,
}

/// `chat_template`: one template, or named ones (the `default` is used).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token: a string, or an `AddedToken` object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Added { content: String },
    Other(serde::de::IgnoredAny),
}

impl TokenField {
    fn text(self) -> Option<String> {
        match self {
            Self::Text(s) | Self::Added { content: s } => Some(s),
            Self::Other(_) => None,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Tokenizer {
    /// Loads a tokenizer. `tokenizer` is a model directory (holding `tokenizer.json`, and
    /// usually `tokenizer_config.json`) or the `tokenizer.json` file itself (its
    /// `tokenizer_config.json` is then looked for beside it). The chat template is `chat_template`
    /// when given (a `.jinja` file, as vLLM's `--chat-template`), else `tokenizer_config.json`'s
    /// `chat_template`, else a `chat_template.jinja` beside the tokenizer; without any, chat
    /// requests are not tokenised.
    pub fn load(
        tokenizer: &Path,
        chat_template: Option<&Path>,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let (dir, json_path) = if tokenizer.is_dir() {
            (tokenizer.to_owned(), tokenizer.join("tokenizer.json"))
        } else {
            let dir = tokenizer.parent().map(Path::to_owned).unwrap_or_default();
            (dir, tokenizer.to_owned())
        };
        let json = read(&json_path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice::<TokenizerConfig>(&bytes).map_err(|source| {
                LoadError::Config {
                    path: config_path.clone(),
                    source,
                }
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenizerConfig::default(),
            Err(source) => {
                return Err(LoadError::Read {
                    path: config_path,
                    source,
                });
            }
        };
        let beside = dir.join("chat_template.jinja");
        let template = match chat_template {
            Some(path) => Some((path.to_owned(), text(read(path)?, path)?)),
            None => match config.chat_template {
                Some(TemplateField::One(t)) => Some((config_path.clone(), t)),
                Some(TemplateField::Named(named)) => named
                    .into_iter()
                    .find(|n| n.name == "default")
                    .map(|n| (config_path.clone(), n.template)),
                None if beside.is_file() => Some((beside.clone(), text(read(&beside)?, &beside)?)),
                None => None,
            },
        };
        let bos = config.bos_token.and_then(TokenField::text);
        let eos = config.eos_token.and_then(TokenField::text);
        Self::from_parts(&json, &json_path, template, bos, eos, limits)
    }

    /// Builds a tokenizer from the bytes of a `tokenizer.json` (`origin` names it in errors)
    /// and an optional `(origin, source)` chat template with its special-token strings.
    pub fn from_parts(
        tokenizer_json: &[u8],
        origin: &Path,
        template: Option<(PathBuf, String)>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        if limits.max_prompt_bytes == 0 {
            return Err(LoadError::Limit("max_prompt_bytes must be > 0"));
        }
        if limits.template_fuel == 0 {
            return Err(LoadError::Limit("template_fuel must be > 0"));
        }
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| {
            LoadError::Tokenizer {
                path: origin.to_owned(),
                reason: e.to_string(),
            }
        })?;
        // A tokenizer.json saved after a truncating or padding call keeps those settings, and
        // the library applies them on every encode. The engine's tokenizer turns both off
        // unless a request asks for them (transformers' fast tokenizers do, and vLLM does not
        // ask): left on, a long prompt's ids would be cut (and the precise index and the cost
        // model would see a few hundred tokens of a 100k-token prompt) or padded.
        if tokenizer.get_truncation().is_some() || tokenizer.get_padding().is_some() {
            tracing::info!(path = %origin.display(), "tokenizer.json's truncation and padding settings are ignored, as the engine ignores them");
        }
        tokenizer
            .with_truncation(None)
            .map_err(|e| LoadError::Tokenizer {
                path: origin.to_owned(),
                reason: e.to_string(),
            })?
            .with_padding(None);
        let chat = template
            .map(|(path, source)| {
                ChatTemplate::new(
                    source,
                    bos_token.unwrap_or_default(),
                    eos_token.unwrap_or_default(),
                    limits.template_fuel,
                    limits.max_prompt_bytes,
                )
                .map_err(|source| LoadError::Template { path, source })
            })
            .transpose()?;
        let vocab_size = u32::try_from(tokenizer.get_vocab_size(true)).unwrap_or(u32::MAX);
        let prefix = (limits.prefix_cache_bytes > 0)
            .then(|| match Prefix::for_tokenizer(&tokenizer, limits.prefix_cache_bytes) {
                Ok(prefix) => Some(prefix),
                Err(why) => {
                    tracing::info!(path = %origin.display(), why, "tokenizer prefix cache off: the ids of a cut text might not be the whole text's");
                    None
                }
            })
            .flatten();
        Ok(Self {
            tokenizer,
            chat,
            limits,
            vocab_size,
            prefix,
        })
    }

    /// Whether the prefix cache is on (configured, and the tokenizer can be cut exactly).
    pub fn has_prefix_cache(&self) -> bool {
        self.prefix.is_some()
    }

    /// What the prefix cache has saved, when it is on.
    pub fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        self.prefix.as_ref().map(|p| p.cache.stats())
    }

    /// The number of ids, special tokens included: valid ids are below it.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Whether a chat template is loaded.
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// How the chat template is given message content ([`ContentFormat::String`] without a
    /// template).
    pub fn content_format(&self) -> ContentFormat {
        self.chat
            .as_ref()
            .map_or(ContentFormat::String, ChatTemplate::content_format)
    }

    /// Sets how the chat template is given message content (vLLM's
    /// `--chat-template-content-format`: set it as the engine's is); `None` keeps the format
    /// detected from the template (vLLM's `auto`).
    pub fn with_content_format(mut self, format: Option<ContentFormat>) -> Self {
        if let (Some(chat), Some(format)) = (self.chat.as_mut(), format) {
            chat.set_content_format(format);
        }
        self
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The ids of a completions prompt, with the tokenizer's special tokens (BOS).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        self.encode(text, true)
    }

    /// The ids of text a chat template rendered (no special tokens added).
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        self.encode(text, false)
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        if text.len() > self.limits.max_prompt_bytes {
            return Err(TokenizeError::TooLarge {
                limit: self.limits.max_prompt_bytes,
            });
        }
        let Some(prefix) = &self.prefix else {
            return encode_with(&self.tokenizer, text, add_special_tokens);
        };
        let mut ids = if add_special_tokens {
            prefix.lead.clone()
        } else {
            Vec::new()
        };
        ids.extend(
            prefix
                .cache
                .encode(text, |piece| encode_with(&self.tokenizer, piece, false))?,
        );
        Ok(ids)
    }

    /// Renders a conversation with the chat template.
    pub fn render_chat(&self, input: &ChatInput) -> Result<String, TokenizeError> {
        let chat = self
            .chat
            .as_ref()
            .ok_or(TokenizeError::Unsupported("no chat template loaded"))?;
        chat.render(input)
    }

    /// The ids of a conversation: rendered, then encoded.
    pub fn encode_chat(&self, input: &ChatInput) -> Result<Vec<u32>, TokenizeError> {
        let rendered = self.render_chat(input)?;
        self.encode_rendered(&rendered)
    }

    /// The ids the engine computes for a request body of `api`.
    pub fn encode_body(&self, api: Api, body: &[u8]) -> Result<Vec<u32>, TokenizeError> {
        match api {
            Api::Completions => {
                let prompt = completion_prompt(body, self.limits.max_prompt_bytes)?;
                self.encode_completion_prompt(prompt)
            }
            Api::ChatCompletions => {
                // Before the body is parsed: without a template there is nothing to render.
                if self.chat.is_none() {
                    return Err(TokenizeError::Unsupported("no chat template loaded"));
                }
                let input = self.chat_input(body)?;
                self.encode_chat(&input)
            }
        }
    }

    /// The ids of a completions `prompt` value.
    pub fn encode_completion_prompt(&self, prompt: Prompt<'_>) -> Result<Vec<u32>, TokenizeError> {
        match prompt {
            Prompt::Text(text) => self.encode_prompt(&text),
            Prompt::Ids(ids) => {
                if ids.len() > self.limits.max_prompt_bytes {
                    return Err(TokenizeError::TooLarge {
                        limit: self.limits.max_prompt_bytes,
                    });
                }
                if ids.iter().any(|&id| id >= self.vocab_size) {
                    return Err(TokenizeError::Invalid(
                        "a token id is out of the vocabulary".into(),
                    ));
                }
                Ok(ids)
            }
        }
    }

    /// The template input of a chat-completions body, bounded.
    pub fn chat_input(&self, body: &[u8]) -> Result<ChatInput, TokenizeError> {
        #[derive(Deserialize)]
        struct ChatBody<'a> {
            #[serde(borrow)]
            messages: Option<&'a RawValue>,
            #[serde(borrow)]
            tools: Option<&'a RawValue>,
            #[serde(borrow)]
            documents: Option<&'a RawValue>,
            add_generation_prompt: Option<bool>,
            continue_final_message: Option<bool>,
            #[serde(borrow)]
            chat_template_kwargs: Option<&'a RawValue>,
            #[serde(borrow)]
            chat_template: Option<&'a RawValue>,
        }
        let invalid = |e: serde_json::Error| TokenizeError::Invalid(e.to_string());
        let b: ChatBody<'_> = serde_json::from_slice(body).map_err(invalid)?;
        if b.chat_template.is_some_and(|t| t.get() != "null") {
            // vLLM refuses a request-supplied template unless trusted; routing never runs one.
            return Err(TokenizeError::Unsupported(
                "a request-supplied chat_template",
            ));
        }
        let messages = b
            .messages
            .ok_or_else(|| TokenizeError::Invalid("no messages".into()))?;
        // Everything the template is given counts against the cap, not only `messages`: the
        // other fields are template input too, and a template may expand them (`tojson`).
        let limit = self.limits.max_prompt_bytes;
        let given = [Some(messages), b.tools, b.documents, b.chat_template_kwargs]
            .into_iter()
            .flatten()
            .fold(0usize, |sum, raw| sum.saturating_add(raw.get().len()));
        if given > limit {
            return Err(TokenizeError::TooLarge { limit });
        }
        let value = |raw: Option<&RawValue>| -> Result<Option<minijinja::Value>, TokenizeError> {
            raw.filter(|r| r.get() != "null")
                .map(|r| serde_json::from_str::<minijinja::Value>(r.get()).map_err(invalid))
                .transpose()
        };
        // The request's tools as vLLM dumps them; tools given in the kwargs go as they are.
        let mut tools = value(b.tools)?.map(|t| conversation::normalize_tools(&t));
        let mut documents = value(b.documents)?;
        let mut add_generation_prompt = b.add_generation_prompt.unwrap_or(true);
        let mut continue_final_message = b.continue_final_message.unwrap_or(false);
        // `chat_template_kwargs` override the request's own fields and the tokenizer's special
        // tokens, as in vLLM (`_chat_template_kwargs.update(request.chat_template_kwargs)`)
        // and transformers (`{**special_tokens_map, **kwargs}`); `messages` cannot be (the
        // engine refuses a request that tries). Not a mapping: vLLM refuses the request.
        let mut kwargs = Vec::new();
        if let Some(map) = value(b.chat_template_kwargs)? {
            if map.kind() != minijinja::value::ValueKind::Map {
                return Err(TokenizeError::Invalid(
                    "chat_template_kwargs is not an object".into(),
                ));
            }
            let keys: Vec<minijinja::Value> = map
                .try_iter()
                .map_err(|e| TokenizeError::Invalid(e.to_string()))?
                .collect();
            for key in keys {
                let (Some(name), Ok(v)) = (key.as_str(), map.get_item(&key)) else {
                    continue;
                };
                match name {
                    "messages" => {}
                    "tools" => tools = (!v.is_none()).then_some(v),
                    "documents" => documents = (!v.is_none()).then_some(v),
                    "add_generation_prompt" => add_generation_prompt = v.is_true(),
                    "continue_final_message" => continue_final_message = v.is_true(),
                    _ => kwargs.push((name.to_owned(), v)),
                }
            }
        }
        let messages = value(Some(messages))?.unwrap_or_default();
        Ok(ChatInput {
            // As vLLM rebuilds them for the template, so that the ids are the engine's.
            messages: conversation::normalize(&messages, self.content_format()),
            tools,
            documents,
            add_generation_prompt,
            continue_final_message,
            kwargs,
        })
    }
}

fn encode_with(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<u32>, TokenizeError> {
    tokenizer
        .encode_fast(text, add_special_tokens)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| TokenizeError::Encode(e.to_string()))
}

impl Prefix {
    /// The cache for `tokenizer`, or why its ids cannot be reused exactly: its shape
    /// ([`PrefixCache::supports`]), a post-processor that adds more than leading special
    /// tokens, or a self-check on sample texts that found a cut encoding unlike the whole one.
    fn for_tokenizer(
        tokenizer: &tokenizers::Tokenizer,
        capacity: usize,
    ) -> Result<Self, &'static str> {
        let shape = prefix_cache::Shape {
            normalizer: tokenizer
                .get_normalizer()
                .map(|n| serde_json::to_value(n).unwrap_or(serde_json::Value::Null)),
            pre_tokenizer: tokenizer
                .get_pre_tokenizer()
                .and_then(|p| serde_json::to_value(p).ok()),
            bpe_without_dropout: matches!(
                tokenizer.get_model(),
                tokenizers::models::ModelWrapper::BPE(bpe)
                    if bpe.dropout.is_none_or(|d| d == 0.0)
            ),
            added_tokens: tokenizer.get_added_tokens_decoder().into_values().collect(),
        };
        PrefixCache::supports(&shape)?;
        let encode = |text: &str, special: bool| {
            encode_with(tokenizer, text, special).map_err(|_| "a sample text does not encode")
        };
        let mut lead = None;
        for sample in [
            "Hello there",
            "a much longer sample, with punctuation\n and lines",
        ] {
            let (with, without) = (encode(sample, true)?, encode(sample, false)?);
            let head = with
                .strip_suffix(without.as_slice())
                .ok_or("special tokens are added after the text")?;
            if lead.get_or_insert_with(|| head.to_vec()) != head {
                return Err("the special tokens added depend on the text");
            }
        }
        // Every cut of the samples, not only the one per chunk the cache would pick.
        let added: Vec<String> = shape
            .added_tokens
            .iter()
            .map(|t| t.content.clone())
            .collect();
        for text in prefix_cache::self_check_texts(&added) {
            let whole = encode(&text, false)?;
            for at in prefix_cache::cuts(&text) {
                let mut cut = encode(&text[..at], false)?;
                cut.extend(encode(&text[at..], false)?);
                if cut != whole {
                    return Err("a text cut after a letter encodes unlike the whole text");
                }
            }
        }
        Ok(Self {
            cache: PrefixCache::new(capacity),
            lead: lead.unwrap_or_default(),
        })
    }
}

/// A completions prompt: text to encode, or ids to pass through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt<'a> {
    /// A string (or a list of one string).
    Text(std::borrow::Cow<'a, str>),
    /// Token ids (or a list of one list of ids).
    Ids(Vec<u32>),
}

/// The `prompt` of a completions body. A batch of several prompts is not tokenised (one
/// request, one engine sequence is what routing reasons about; vLLM would run several).
///
/// At most `max_ids` token ids are kept (more is [`TokenizeError::TooLarge`]), and the value is
/// read in one pass into its final shape: a batch is skipped without being collected. An
/// untagged enum would first copy the whole value into serde's generic representation (32
/// bytes an element, about 16 times the body for a list of ids) before any limit applied.
pub fn completion_prompt(body: &[u8], max_ids: usize) -> Result<Prompt<'_>, TokenizeError> {
    #[derive(Deserialize)]
    struct CompletionBody<'a> {
        #[serde(borrow)]
        prompt: Option<&'a RawValue>,
    }
    let invalid = |e: serde_json::Error| TokenizeError::Invalid(e.to_string());
    let b: CompletionBody<'_> = serde_json::from_slice(body).map_err(invalid)?;
    let raw = b
        .prompt
        .ok_or_else(|| TokenizeError::Invalid("no prompt".into()))?;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let shape = serde::Deserializer::deserialize_any(&mut de, PromptVisitor { max_ids })
        .map_err(|_| TokenizeError::Invalid(SHAPES.into()))?;
    match shape {
        Ok(prompt) => Ok(prompt),
        Err(PromptShape::Batch) => Err(TokenizeError::Unsupported("a batch of prompts")),
        Err(PromptShape::TooManyIds) => Err(TokenizeError::TooLarge { limit: max_ids }),
        Err(PromptShape::Invalid(m)) => Err(TokenizeError::Invalid(m.into())),
    }
}

const SHAPES: &str = "prompt must be a string, a list of strings or token ids";

/// A prompt value that is not one prompt to tokenise.
enum PromptShape {
    Batch,
    TooManyIds,
    Invalid(&'static str),
}

/// Reads a `prompt`: a string, a list of ids, or a list of one string or of one list of ids.
struct PromptVisitor {
    max_ids: usize,
}

impl<'de> serde::de::Visitor<'de> for PromptVisitor {
    type Value = Result<Prompt<'de>, PromptShape>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(SHAPES)
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Ok(Prompt::Text(v.into())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Ok(Prompt::Text(v.into())))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Ok(Prompt::Text(v.to_owned().into())))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let seed = ElementSeed {
            max_ids: self.max_ids,
        };
        let Some(first) = seq.next_element_seed(seed)? else {
            return Ok(Err(PromptShape::Invalid("empty prompt")));
        };
        let shape = match first {
            Element::Id(id) => {
                let mut ids = vec![id];
                return read_ids(&mut seq, &mut ids, self.max_ids).map(|fits| {
                    if fits {
                        Ok(Prompt::Ids(ids))
                    } else {
                        Err(PromptShape::TooManyIds)
                    }
                });
            }
            Element::Text(text) => Ok(Prompt::Text(text)),
            Element::Ids(Some(ids)) if ids.is_empty() => Err(PromptShape::Invalid("empty prompt")),
            Element::Ids(Some(ids)) => Ok(Prompt::Ids(ids)),
            Element::Ids(None) => Err(PromptShape::TooManyIds),
        };
        // One prompt in a list is that prompt; a second makes a batch, read but not kept.
        if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            skip_rest(&mut seq)?;
            return Ok(Err(PromptShape::Batch));
        }
        Ok(shape)
    }
}

/// Appends the list's ids to `ids` while they fit in `max`; past it, reads the rest without
/// keeping it and says so (`false`).
fn read_ids<'de, A: serde::de::SeqAccess<'de>>(
    seq: &mut A,
    ids: &mut Vec<u32>,
    max: usize,
) -> Result<bool, A::Error> {
    while let Some(id) = seq.next_element::<u32>()? {
        if ids.len() >= max {
            skip_rest(seq)?;
            return Ok(false);
        }
        ids.push(id);
    }
    Ok(true)
}

/// Reads what is left of a list without keeping it.
fn skip_rest<'de, A: serde::de::SeqAccess<'de>>(seq: &mut A) -> Result<(), A::Error> {
    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
    Ok(())
}

/// The first element of a `prompt` list.
enum Element<'de> {
    Id(u32),
    Text(std::borrow::Cow<'de, str>),
    /// A list of ids (`None`: more than the limit).
    Ids(Option<Vec<u32>>),
}

struct ElementSeed {
    max_ids: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for ElementSeed {
    type Value = Element<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ElementSeed {
    type Value = Element<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a token id, a string or a list of token ids")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        u32::try_from(v)
            .map(Element::Id)
            .map_err(|_| E::custom("a token id over u32"))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Element::Text(v.into()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Element::Text(v.into()))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Element::Text(v.to_owned().into()))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut ids = Vec::new();
        let fits = read_ids(&mut seq, &mut ids, self.max_ids)?;
        Ok(Element::Ids(fits.then_some(ids)))
    }
}

fn text(bytes: Vec<u8>, path: &Path) -> Result<String, LoadError> {
    String::from_utf8(bytes).map_err(|e| LoadError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review: a tokenizer.json saved with `truncation` (or `padding`) set made every encode
    /// cut (or pad) the ids, where the engine ignores both.
    #[test]
    fn a_saved_truncation_or_padding_is_not_applied() {
        let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tokenizer.json");
        let json = std::fs::read(&testdata).unwrap();
        let plain =
            Tokenizer::from_parts(&json, &testdata, None, None, None, Limits::default()).unwrap();
        let mut saved: serde_json::Value = serde_json::from_slice(&json).unwrap();
        saved["truncation"] = serde_json::json!({
            "direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0
        });
        saved["padding"] = serde_json::json!({
            "strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"
        });
        let saved = serde_json::to_vec(&saved).unwrap();
        let loaded =
            Tokenizer::from_parts(&saved, &testdata, None, None, None, Limits::default()).unwrap();
        let prompt = "the quick brown fox jumps over the lazy dog ".repeat(8);
        let ids = plain.encode_prompt(&prompt).unwrap();
        assert!(ids.len() > 8 && ids.len() != 64, "{}", ids.len());
        assert_eq!(loaded.encode_prompt(&prompt).unwrap(), ids);
        // Without a template a chat body is refused before it is parsed (even when invalid).
        assert_eq!(
            loaded.encode_body(Api::ChatCompletions, b"not json"),
            Err(TokenizeError::Unsupported("no chat template loaded"))
        );
    }

    #[test]
    fn prompt_shapes() {
        fn p(s: &str) -> Result<Prompt<'_>, TokenizeError> {
            completion_prompt(s.as_bytes(), 4)
        }
        assert_eq!(
            p(r#"{"prompt":"a\nb"}"#).unwrap(),
            Prompt::Text("a\nb".into())
        );
        assert_eq!(p(r#"{"prompt":["x"]}"#).unwrap(), Prompt::Text("x".into()));
        assert_eq!(p(r#"{"prompt":[1,2]}"#).unwrap(), Prompt::Ids(vec![1, 2]));
        assert_eq!(p(r#"{"prompt":[[3]]}"#).unwrap(), Prompt::Ids(vec![3]));
        // A string that looks like ids is text.
        assert_eq!(
            p(r#"{"prompt":"[1, 2]"}"#).unwrap(),
            Prompt::Text("[1, 2]".into())
        );
        assert_eq!(
            p(r#"{"prompt":["x","y"]}"#).unwrap_err(),
            TokenizeError::Unsupported("a batch of prompts")
        );
        assert!(matches!(
            p(r#"{"prompt":[-1]}"#),
            Err(TokenizeError::Invalid(_))
        ));
        assert!(matches!(
            p(r#"{"prompt":{}}"#),
            Err(TokenizeError::Invalid(_))
        ));
        assert!(matches!(
            p(r#"{"model":"m"}"#),
            Err(TokenizeError::Invalid(_))
        ));
        // Empty lists, nested batches, and more ids than the limit, without reading them in.
        for empty in [r#"{"prompt":[]}"#, r#"{"prompt":[[]]}"#] {
            assert!(
                matches!(p(empty), Err(TokenizeError::Invalid(_))),
                "{empty}"
            );
        }
        assert_eq!(
            p(r#"{"prompt":[[1],[2,3]]}"#).unwrap_err(),
            TokenizeError::Unsupported("a batch of prompts")
        );
        assert_eq!(
            p(r#"{"prompt":[1,2,3,4]}"#).unwrap(),
            Prompt::Ids(vec![1, 2, 3, 4])
        );
        for over in [r#"{"prompt":[1,2,3,4,5]}"#, r#"{"prompt":[[1,2,3,4,5,6]]}"#] {
            assert_eq!(
                p(over).unwrap_err(),
                TokenizeError::TooLarge { limit: 4 },
                "{over}"
            );
        }
        // Malformed lists are refused, not guessed; a list whose first element is a prompt
        // and that has a second is a batch, whatever the second is (the engine judges it).
        for bad in [
            r#"{"prompt":[1,"x"]}"#,
            r#"{"prompt":[4294967296]}"#,
            r#"{"prompt":[1.5]}"#,
            r#"{"prompt":[null]}"#,
        ] {
            assert!(matches!(p(bad), Err(TokenizeError::Invalid(_))), "{bad}");
        }
        assert_eq!(
            p(r#"{"prompt":["x",1]}"#).unwrap_err(),
            TokenizeError::Unsupported("a batch of prompts")
        );
    }

    /// A prompt of millions of ids costs the ids it keeps, not serde's generic copy of them:
    /// over the limit it is refused while being read.
    #[test]
    fn a_huge_id_prompt_is_refused_while_read() {
        let body = format!(r#"{{"prompt":[{}0]}}"#, "0,".repeat(4_000_000));
        assert_eq!(
            completion_prompt(body.as_bytes(), 1000).unwrap_err(),
            TokenizeError::TooLarge { limit: 1000 }
        );
    }
}
