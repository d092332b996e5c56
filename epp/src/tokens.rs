//! The `token-producer`'s tokenizer: the `tokenize` crate (a model's `tokenizer.json` and chat
//! template) behind the decision core's [`PromptTokenizer`], built from the config at start-up
//! (a path that does not load stops the EPP before any port is served).

use std::sync::Arc;

use endpoint_picker::request::Api;
use endpoint_picker::tokens::{
    Backend, ContentFormatChoice, PromptTokenizer, Skip, TokenProducer, TokenProducerConfig,
};
use tokenize::{ContentFormat, Limits, LoadError, TokenizeError, Tokenizer};

/// A loaded model tokenizer, as the token producer runs it.
#[derive(Debug)]
pub struct HfTokenizer(pub Arc<Tokenizer>);

impl PromptTokenizer for HfTokenizer {
    fn token_ids(&self, api: Api, body: &[u8]) -> Result<Vec<u32>, Skip> {
        let api = match api {
            Api::Completions => tokenize::Api::Completions,
            Api::ChatCompletions => tokenize::Api::ChatCompletions,
            _ => return Err(Skip::Unsupported),
        };
        self.0.encode_body(api, body).map_err(|e| match e {
            TokenizeError::TooLarge { .. } => Skip::TooLarge,
            TokenizeError::Unsupported(_) => Skip::Unsupported,
            TokenizeError::Invalid(_)
            | TokenizeError::Template { .. }
            | TokenizeError::Encode(_) => Skip::Failed,
        })
    }
}

/// A built token producer, and its tokenizer (for the prefix cache's metrics).
#[derive(Debug)]
pub struct Built {
    /// The producer, for the director.
    pub producer: Arc<TokenProducer>,
    /// The tokenizer it runs.
    pub tokenizer: Arc<Tokenizer>,
}

/// The producer a config declares: `None` for none or the `estimate` backend (no ids).
pub fn build(config: Option<&TokenProducerConfig>) -> Result<Option<Built>, LoadError> {
    let Some(config) = config else {
        return Ok(None);
    };
    match &config.backend {
        Backend::Estimate => Ok(None),
        Backend::Local(local) => {
            let tokenizer = Tokenizer::load(
                &local.tokenizer_path,
                local.chat_template_path.as_deref(),
                Limits {
                    max_prompt_bytes: local.max_prompt_bytes,
                    template_fuel: local.template_fuel,
                    prefix_cache_bytes: local.prefix_cache_bytes,
                },
            )?
            .with_content_format(match local.content_format {
                ContentFormatChoice::Auto => None,
                ContentFormatChoice::String => Some(ContentFormat::String),
                ContentFormatChoice::OpenAi => Some(ContentFormat::OpenAi),
            });
            tracing::info!(
                producer = %config.name,
                tokenizer = %local.tokenizer_path.display(),
                vocab_size = tokenizer.vocab_size(),
                chat_template = tokenizer.has_chat_template(),
                prefix_cache = tokenizer.has_prefix_cache(),
                content_format = tokenizer.content_format().as_str(),
                "token producer loaded"
            );
            let tokenizer = Arc::new(tokenizer);
            Ok(Some(Built {
                producer: Arc::new(TokenProducer::new(
                    config.name.clone(),
                    Arc::new(HfTokenizer(tokenizer.clone())),
                    local.pool,
                )),
                tokenizer,
            }))
        }
    }
}
