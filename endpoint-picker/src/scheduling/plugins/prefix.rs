//! `approx-prefix-cache-producer`: hashes the request's prefix once, looks up how much of it
//! each candidate is believed to hold, and records the routing decision in the index.

use std::sync::Arc;

use serde::Deserialize;

use super::scorers::plugin_named;
use crate::config::ConfigError;
use crate::config::params::Params;
use crate::datastore::PoolSnapshot;
use crate::prefix::{BlockHasher, PrefixIndex};
use crate::request::InferenceRequest;
use crate::scheduling::framework::{Candidate, CycleState, DataProducer, Plugin, PrefixMatch};

/// The most blocks one endpoint may hold in the index when its engine sets the capacity
/// (`autoTune`): about 16 million tokens at 16 tokens a block, past any single replica's KV
/// cache today. An engine is not trusted to size this process's memory (one that reported
/// `num_gpu_blocks` of 2^64 would never see its entries evicted).
pub const MAX_AUTO_TUNED_CAPACITY: usize = 1 << 20;

/// Parameters, with the reference's names and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixParams {
    /// Take block size and per-endpoint capacity from the engines' cache info (the capacity at
    /// most [`MAX_AUTO_TUNED_CAPACITY`]).
    pub auto_tune: bool,
    /// Tokens per block when not auto-tuned (16).
    pub block_size_tokens: usize,
    /// Legacy `hashBlockSize`: characters per block, overriding the token-based size.
    pub block_chars: Option<usize>,
    /// At most this many blocks are matched (256).
    pub max_prefix_blocks: usize,
    /// When > 0, the block limit is `max_prefix_tokens / block_size_tokens`.
    pub max_prefix_tokens: usize,
    /// Blocks remembered per endpoint when the engine does not say (31,250).
    pub lru_capacity_per_server: usize,
}

impl Default for PrefixParams {
    fn default() -> Self {
        Self {
            auto_tune: true,
            block_size_tokens: 16,
            block_chars: None,
            max_prefix_blocks: 256,
            max_prefix_tokens: 0,
            lru_capacity_per_server: 31_250,
        }
    }
}

/// The producer's parameters as written, with the reference's names. The v1.0–v1.3
/// `prefix-cache-scorer` took the same block (see `hashBlockSize`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PrefixYaml {
    auto_tune: Option<bool>,
    block_size_tokens: Option<i64>,
    /// Deprecated character block size (only with `blockSizeTokens`).
    block_size: Option<i64>,
    /// v1.0–v1.3 scorer parameter: characters per block.
    hash_block_size: Option<i64>,
    max_prefix_blocks_to_match: Option<i64>,
    max_prefix_tokens_to_match: Option<i64>,
    lru_capacity_per_server: Option<i64>,
}

impl PrefixParams {
    /// The parameters `p` describes, over the defaults.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: PrefixYaml = p.decode()?;
        let mut params = Self::default();
        if let Some(a) = y.auto_tune {
            params.auto_tune = a;
        }
        if let Some(t) = p.positive("blockSizeTokens", y.block_size_tokens)? {
            params.block_size_tokens = t;
        }
        if y.block_size.is_some() && y.block_size_tokens.is_none() {
            return Err(p.invalid(
                "blockSize",
                "deprecated character block size; set blockSizeTokens instead",
            ));
        }
        if let Some(c) = p.positive("hashBlockSize", y.hash_block_size)? {
            // The v1.0–v1.3 scorer hashed fixed character blocks and did not auto-tune.
            params.block_chars = Some(c);
            params.auto_tune = y.auto_tune.unwrap_or(false);
        }
        if let Some(b) = p.positive("maxPrefixBlocksToMatch", y.max_prefix_blocks_to_match)? {
            params.max_prefix_blocks = b;
        }
        if let Some(n) = p.non_negative("maxPrefixTokensToMatch", y.max_prefix_tokens_to_match)? {
            params.max_prefix_tokens = n as usize;
        }
        if let Some(c) = p.positive("lruCapacityPerServer", y.lru_capacity_per_server)? {
            params.lru_capacity_per_server = c;
        }
        Ok(params)
    }
}

/// The producer; it owns the index.
#[derive(Debug)]
pub struct ApproxPrefixCacheProducer {
    /// Configured name.
    pub name: String,
    /// Parameters.
    pub params: PrefixParams,
    index: Arc<PrefixIndex>,
}
plugin_named!(ApproxPrefixCacheProducer, "approx-prefix-cache-producer");

impl ApproxPrefixCacheProducer {
    /// A producer with an empty index.
    pub fn new(name: impl Into<String>, params: PrefixParams) -> Self {
        Self {
            name: name.into(),
            params,
            index: Arc::new(PrefixIndex::new()),
        }
    }

    /// The producer its `parameters` describe.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        Ok(Self::new(p.name(), PrefixParams::from_params(p)?))
    }

    /// The index (for metrics).
    pub fn index(&self) -> &Arc<PrefixIndex> {
        &self.index
    }

    fn hasher(&self, candidates: &[Candidate]) -> (BlockHasher, usize) {
        let p = &self.params;
        let tokens = if p.auto_tune {
            // The engine's block, but never finer than `blockSizeTokens`: SGLang's page is one
            // token, and hashing 4-character blocks made the match depth (a count of blocks)
            // 16 times shallower and the index 16 times larger for the same prompts, where a
            // coarser block under-counts a match by less than one block.
            candidates
                .iter()
                .find_map(|c| c.metrics.cache_block_size)
                .map(|b| b as usize)
                .filter(|b| *b > 0)
                .map_or(p.block_size_tokens, |b| b.max(p.block_size_tokens))
        } else {
            p.block_size_tokens
        }
        .max(1);
        // The legacy `hashBlockSize` sets a block in characters: its tokens are what that many
        // characters are estimated to be, for the matched-token counts as for the depth.
        let chars = p.block_chars.filter(|c| *c > 0);
        let tokens = chars.map_or(tokens, |c| {
            c.div_ceil(crate::prefix::hash::CHARS_PER_TOKEN).max(1)
        });
        let max_blocks = if p.max_prefix_tokens > 0 {
            (p.max_prefix_tokens / tokens).max(1)
        } else {
            p.max_prefix_blocks
        };
        let mut hasher = BlockHasher::from_tokens(tokens, max_blocks);
        if let Some(chars) = chars {
            hasher.block_chars = chars;
        }
        (hasher, tokens)
    }
}

impl DataProducer for ApproxPrefixCacheProducer {
    fn produce(
        &self,
        request: &InferenceRequest,
        candidates: &[Candidate],
        state: &mut CycleState,
    ) {
        let (hasher, block_tokens) = self.hasher(candidates);
        let hashes = hasher.hash(
            &request.target_model,
            request.cache_salt.as_deref(),
            &request.prompt,
        );
        let bound = candidates
            .iter()
            .map(|c| c.endpoint.id.0 as usize + 1)
            .max()
            .unwrap_or(0);
        let mut matched = vec![0u32; bound];
        let mut tokens_through = Vec::new();
        if !hashes.is_empty() {
            self.index.match_lengths(&hashes, &mut matched);
            if request.prompt_is_json {
                crate::cost::estimate_json_prompt_tokens_by_block(
                    &request.prompt,
                    request.prompt_media_from,
                    hasher.block_chars,
                    hashes.len(),
                    &mut tokens_through,
                );
                // With token ids the prompt is counted in them: the runs' estimates are scaled
                // to the ids (the same content in the engine's units), so that whitespace
                // bought no credit there either.
                if let (Some(ids), Some(estimate)) =
                    (&request.token_ids, request.estimated_prompt_tokens)
                {
                    let ids = ids.len() as u64;
                    let scale = ids as f64 / estimate.max(1) as f64;
                    for tokens in &mut tokens_through {
                        *tokens = ((*tokens as f64 * scale) as u64).min(ids);
                    }
                }
            }
        }
        state.prefix = Some(PrefixMatch {
            hashes,
            matched,
            block_tokens,
            tokens_through,
        });
    }

    fn pre_request(&self, _: &InferenceRequest, state: &CycleState, targets: &[Candidate]) {
        let Some(m) = &state.prefix else { return };
        for t in targets {
            let capacity = if self.params.auto_tune {
                t.metrics.cache_num_blocks.filter(|n| *n > 0).map(|n| {
                    // The engine's blocks counted in ours (which may be coarser).
                    let engine_block = t.metrics.cache_block_size.filter(|b| *b > 0).unwrap_or(1);
                    let tokens = n.saturating_mul(u64::from(engine_block));
                    let ours = tokens / (m.block_tokens.max(1) as u64);
                    usize::try_from(ours.max(1))
                        .map_or(MAX_AUTO_TUNED_CAPACITY, |n| n.min(MAX_AUTO_TUNED_CAPACITY))
                })
            } else {
                None
            }
            .unwrap_or(self.params.lru_capacity_per_server);
            self.index.insert(t.endpoint.id, capacity, &m.hashes);
        }
    }

    fn pool_changed(&self, snapshot: &PoolSnapshot) {
        let live: std::collections::HashSet<_> = snapshot.endpoints.iter().map(|e| e.id).collect();
        self.index.retain(|id| live.contains(&id));
    }

    fn index_entries(&self) -> Option<usize> {
        Some(self.index.len())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::scheduling::plugins::test_util::{candidates, metrics};

    #[test]
    fn routing_history_drives_matches() {
        let p = ApproxPrefixCacheProducer::new("p", PrefixParams::default());
        let c = candidates(&[metrics(0, 0, 0.0), metrics(0, 0, 0.0)]);
        let req = InferenceRequest {
            target_model: "m".into(),
            prompt: Bytes::from("s".repeat(64 * 10)),
            ..Default::default()
        };
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&req, &c, &mut state);
        let m = state.prefix.clone().unwrap();
        assert_eq!(m.hashes.len(), 10);
        assert_eq!(m.score(&c[0].endpoint), 0.0);
        p.pre_request(&req, &state, &c[1..]);
        // Same prefix, longer question: endpoint 2 holds the first 10 of 12 blocks.
        let req2 = InferenceRequest {
            prompt: Bytes::from(format!("{}{}", "s".repeat(640), "q".repeat(128))),
            ..req
        };
        let mut state2 = CycleState::new(tokio::time::Instant::now());
        p.produce(&req2, &c, &mut state2);
        let m2 = state2.prefix.unwrap();
        assert_eq!(m2.score(&c[0].endpoint), 0.0);
        assert!((m2.score(&c[1].endpoint) - 10.0 / 12.0).abs() < 1e-9);
    }

    /// Review: a chat body led by 16 KiB of spaces, once routed, matched 256 blocks on its
    /// replica for every later body of that shape, and each was credited 4,096 cached tokens
    /// while its whole prompt was estimated at about that: a prefill counted as free. A match
    /// is worth the content it covers.
    #[test]
    fn a_match_over_padding_is_worth_no_tokens() {
        let p = ApproxPrefixCacheProducer::new("p", PrefixParams::default());
        let c = candidates(&[metrics(0, 0, 0.0)]);
        let body = |text: &str| {
            let prompt = format!(
                r#"[{}{{"role":"user","content":"{text}"}}]"#,
                " ".repeat(16 * 1024)
            );
            InferenceRequest {
                target_model: "m".into(),
                estimated_prompt_tokens: Some(crate::cost::estimate_json_prompt_tokens(
                    prompt.as_bytes(),
                )),
                prompt: Bytes::from(prompt),
                prompt_is_json: true,
                ..Default::default()
            }
        };
        let first = body(&"a".repeat(16 * 1024));
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&first, &c, &mut state);
        p.pre_request(&first, &state, &c);
        let second = body(&"b".repeat(16 * 1024));
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&second, &c, &mut state);
        let m = state.prefix.clone().unwrap();
        assert_eq!(m.matched_blocks(&c[0].endpoint), 256, "the padding matches");
        assert_eq!(
            state.cached_tokens(&c[0].endpoint),
            0,
            "and is worth nothing"
        );
        // The same body again is worth what the hashed run holds of its text.
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&first, &c, &mut state);
        assert_eq!(
            state.cached_tokens(&c[0].endpoint),
            0,
            "256 blocks are all padding"
        );
        // With token ids (a tokenizer, or a salt that keeps the request off the precise
        // index), the padding is worth nothing either.
        let with_ids = InferenceRequest {
            token_ids: Some(std::sync::Arc::from(vec![7u32; 3000])),
            ..second.clone()
        };
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&with_ids, &c, &mut state);
        assert_eq!(state.cached_tokens(&c[0].endpoint), 0);
        // Text in the run is worth its share of the ids: 2 KiB of text in a 4 KiB prompt.
        let short = InferenceRequest {
            prompt: Bytes::from(format!(r#"[{{"content":"{}"}}]"#, "t".repeat(4096))),
            estimated_prompt_tokens: Some(1026),
            token_ids: Some(std::sync::Arc::from(vec![7u32; 513])),
            ..second.clone()
        };
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&short, &c, &mut state);
        let m = state.prefix.clone().unwrap();
        let half = m.tokens_of(32);
        assert!((250..=260).contains(&half), "{half}");
        assert_eq!(
            m.tokens_of(m.hashes.len() as u32),
            513,
            "the whole: every id"
        );
        // A plain prompt's blocks are a token per 4 bytes, as before.
        let plain = InferenceRequest {
            prompt_is_json: false,
            ..second
        };
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&plain, &c, &mut state);
        assert_eq!(state.cached_tokens(&c[0].endpoint), 256 * 16);
    }

    #[test]
    fn auto_tune_reads_block_size_and_capacity() {
        let p = ApproxPrefixCacheProducer::new("p", PrefixParams::default());
        let mut m = metrics(0, 0, 0.0);
        m.cache_block_size = Some(32);
        m.cache_num_blocks = Some(2);
        let c = candidates(&[m]);
        let req = InferenceRequest {
            target_model: "m".into(),
            prompt: Bytes::from("a".repeat(128 * 5)),
            ..Default::default()
        };
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&req, &c, &mut state);
        let pm = state.prefix.clone().unwrap();
        assert_eq!(pm.block_tokens, 32);
        assert_eq!(pm.hashes.len(), 5);
        p.pre_request(&req, &state, &c);
        assert_eq!(p.index().len(), 2, "capacity comes from num_gpu_blocks");
    }

    /// SGLang's page is one token: hashing one-token blocks made a 256-block depth 256
    /// tokens. The block is never finer than `blockSizeTokens`, and the capacity (the engine's
    /// pages) is counted in those blocks.
    #[test]
    fn an_engine_block_finer_than_ours_is_hashed_at_ours() {
        let p = ApproxPrefixCacheProducer::new("p", PrefixParams::default());
        let mut m = metrics(0, 0, 0.0);
        m.cache_block_size = Some(1);
        m.cache_num_blocks = Some(64);
        let c = candidates(&[m]);
        let req = InferenceRequest {
            target_model: "m".into(),
            prompt: Bytes::from("a".repeat(64 * 300)),
            ..Default::default()
        };
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&req, &c, &mut state);
        let pm = state.prefix.clone().unwrap();
        assert_eq!(pm.block_tokens, 16);
        assert_eq!(pm.hashes.len(), 256, "256 blocks of 16 tokens deep");
        p.pre_request(&req, &state, &c);
        assert_eq!(p.index().len(), 4, "64 one-token pages are 4 blocks of 16");
    }

    #[test]
    fn an_engine_cannot_lift_the_capacity_past_its_bound() {
        // One-token blocks, so that a few thousand short prompts pass the bound.
        let p = ApproxPrefixCacheProducer::new(
            "p",
            PrefixParams {
                block_size_tokens: 1,
                ..PrefixParams::default()
            },
        );
        let mut m = metrics(0, 0, 0.0);
        m.cache_block_size = Some(1);
        m.cache_num_blocks = Some(u64::MAX);
        let c = candidates(&[m]);
        let mut state = CycleState::new(tokio::time::Instant::now());
        let mut inserted = 0;
        // Distinct prompts of 256 blocks each: more than the bound in total.
        for i in 0..(MAX_AUTO_TUNED_CAPACITY / 256 + 8) {
            let req = InferenceRequest {
                target_model: "m".into(),
                prompt: Bytes::from(format!("{i:08}").repeat(256)),
                ..Default::default()
            };
            p.produce(&req, &c, &mut state);
            inserted += state.prefix.as_ref().map_or(0, |m| m.hashes.len());
            p.pre_request(&req, &state, &c);
        }
        assert!(inserted > MAX_AUTO_TUNED_CAPACITY, "{inserted}");
        assert!(p.index().len() <= MAX_AUTO_TUNED_CAPACITY);
    }

    #[test]
    fn max_tokens_limits_blocks_and_legacy_chars() {
        let params = PrefixParams {
            auto_tune: false,
            max_prefix_tokens: 64,
            block_chars: Some(10),
            ..Default::default()
        };
        let p = ApproxPrefixCacheProducer::new("p", params);
        let c = candidates(&[metrics(0, 0, 0.0)]);
        let req = InferenceRequest {
            prompt: Bytes::from("a".repeat(1000)),
            ..Default::default()
        };
        let mut state = CycleState::new(tokio::time::Instant::now());
        p.produce(&req, &c, &mut state);
        // 10 characters are 3 tokens (4 characters a token, rounded up): 64 tokens are 21
        // blocks, and a matched block counts 3 tokens (it counted 16, the token block's size).
        let matched = state.prefix.unwrap();
        assert_eq!(matched.hashes.len(), 21);
        assert_eq!(matched.block_tokens, 3);
    }
}
