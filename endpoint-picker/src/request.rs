//! The request as the scheduler sees it: parsed once at the edge, read by every plugin.

use bytes::Bytes;

/// The OpenAI-style API a request targets (chosen from the path suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Api {
    /// `/v1/completions` (also the default).
    #[default]
    Completions,
    /// `/v1/chat/completions`.
    ChatCompletions,
    /// `/v1/responses`.
    Responses,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/conversations`.
    Conversations,
    /// A request without a body (headers only).
    HeadersOnly,
}

impl Api {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Completions => "completions",
            Api::ChatCompletions => "chat-completions",
            Api::Responses => "responses",
            Api::Embeddings => "embeddings",
            Api::Conversations => "conversations",
            Api::HeadersOnly => "headers-only",
        }
    }
}

/// One inference request.
#[derive(Debug, Clone, Default)]
pub struct InferenceRequest {
    /// `x-request-id` (generated when the client sent none).
    pub request_id: String,
    /// The API.
    pub api: Api,
    /// The model the client asked for (`model` in the body).
    pub model: String,
    /// The model the engine will see, after any rewrite.
    pub target_model: String,
    /// The `InferenceModelRewrite` whose rule chose `target_model`, when one did (not when
    /// the `x-gateway-model-name-rewrite` header did). Operator-named, so fit for a label.
    pub rewrite: Option<String>,
    /// The text prefix caching is computed over: the prompt for completions, the raw JSON of
    /// `messages` / `input` / `items` otherwise. A zero-copy slice of the body when possible.
    pub prompt: Bytes,
    /// `cache_salt`, which partitions the prefix cache like vLLM's.
    pub cache_salt: Option<String>,
    /// Priority from the InferenceObjective (negative = sheddable).
    pub priority: i32,
    /// The InferenceObjective named by `x-gateway-inference-objective`.
    pub objective: Option<String>,
    /// Fairness id (`x-gateway-inference-fairness-id`, default `default-flow`).
    pub fairness_id: String,
    /// Whether the client asked for a streamed response.
    pub stream: bool,
    /// Size of the request body in bytes.
    pub body_len: usize,
    /// Whether `prompt` is a copy apart from the body (decoded escapes, chat messages put
    /// together) rather than a slice of it: then it is held on top of the body.
    pub prompt_is_copy: bool,
    /// Whether `prompt` is JSON whose strings are what the engine reads (chat messages,
    /// Responses input, a token-id array), not plain text (a completion's string prompt): a
    /// run of its bytes is then worth the content inside it, not a token per 4 bytes.
    pub prompt_is_json: bool,
    /// Where in a JSON `prompt` the strings that may be media begin: the Responses API's
    /// instructions and tools lead its prompt and are text whatever their keys; 0 otherwise.
    pub prompt_media_from: usize,
    /// The prompt's tokens as the body parser estimated them from its content (text and media
    /// parts, not the JSON around them): what [`Self::prompt_tokens`] says without token ids.
    pub estimated_prompt_tokens: Option<u64>,
    /// The most output tokens the client asked for (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`), when it said.
    pub max_tokens: Option<u32>,
    /// Time-to-first-token objective (`x-llm-d-slo-ttft-ms`).
    pub slo_ttft: Option<std::time::Duration>,
    /// Time-per-output-token objective (`x-llm-d-slo-tpot-ms`).
    pub slo_tpot: Option<std::time::Duration>,
    /// The prompt's token ids as the engine will see them (chat template applied), when a
    /// tokenizer is configured and produced them; `None` otherwise. Shared, never copied.
    pub token_ids: Option<std::sync::Arc<[u32]>>,
    /// Request headers a plugin may read (lower-case names), e.g. the conformance
    /// `test-epp-endpoint-selection` or `x-session-token`.
    pub headers: Vec<(String, String)>,
}

impl InferenceRequest {
    /// The prompt's length in tokens: exact when the token producer gave ids, else the
    /// parser's estimate from the prompt's content, else estimated from its bytes (≈ 4 bytes a
    /// token, the `estimate` backend's rule), at most `cost::MAX_ESTIMATED_PROMPT_TOKENS`.
    pub fn prompt_tokens(&self) -> u64 {
        match (&self.token_ids, self.estimated_prompt_tokens) {
            (Some(ids), _) => ids.len() as u64,
            (None, Some(estimate)) => estimate,
            (None, None) => crate::cost::estimate_tokens(self.prompt.len()),
        }
    }

    /// What the EPP holds for this request while it waits in flow control, as `maxBytes`
    /// counts it: the body, the prompt when it is a copy apart from the body, the token ids (4
    /// bytes each) and the headers (kept twice: the stream's and this request's copy).
    pub fn held_bytes(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        (self.body_len as u64)
            .saturating_add(self.held_beside_body() as u64)
            .saturating_add(2 * headers as u64)
    }

    /// What the request holds beside its body and headers, each as long as the body at
    /// worst: the prompt when it is a copy apart from the body (a chat prompt rebuilt around
    /// its tools, a decoded escaped one) and the token ids (4 bytes each).
    pub fn held_beside_body(&self) -> usize {
        let ids = self.token_ids.as_ref().map_or(0, |ids| ids.len() * 4);
        let prompt = if self.prompt_is_copy {
            self.prompt.len()
        } else {
            0
        };
        ids.saturating_add(prompt)
    }

    /// The value of a request header (names are compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_count_the_body_a_copied_prompt_the_ids_and_the_headers_twice() {
        let mut r = InferenceRequest {
            body_len: 1000,
            prompt: Bytes::from_static(b"a slice of the body, not counted"),
            ..Default::default()
        };
        assert_eq!(r.held_bytes(), 1000);
        r.token_ids = Some(std::sync::Arc::from(vec![1u32; 100]));
        r.headers = vec![("x-a".into(), "0123456".into())];
        assert_eq!(r.held_bytes(), 1000 + 400 + 2 * 10);
        r.prompt_is_copy = true;
        assert_eq!(
            r.held_bytes(),
            1000 + 32 + 400 + 2 * 10,
            "a decoded prompt counts"
        );
    }
}
