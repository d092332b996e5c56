//! The cost model: what a request would wait for on each replica, predicted in-process.
//!
//! vLLM-style engines run continuous batching: every step carries the decode token of each
//! running sequence plus as many prompt tokens (prefill chunks) as the step's token budget has
//! room for, and a step costs a fixed part (reading the weights), a part per prompt token
//! (compute) and a part per sequence. A new request's first token comes once every prompt token
//! queued ahead of it and its own uncached ones have been computed:
//!
//! ```text
//! prefill = queued + uncached                       tokens to compute before our first token
//! steps   = max(1, ⌈prefill / (budget − decoding)⌉) engine steps that takes
//! ttft    = k · (prefill · t_token + steps · (t_step + decoding · t_seq))
//! tpot    = k · (t_step + (decoding + 1) · t_seq)
//! ```
//!
//! where `queued` are the uncached prompt tokens of requests routed to the replica that have
//! not produced their first token yet (the EPP's own, exact and current, or the engine's waiting
//! queue when it reports more), `uncached` is this request's prompt minus what the replica's
//! prefix cache holds, `decoding` the sequences past their first token, and `k` a per-replica
//! correction learnt
//! online from the TTFTs the EPP observes ([`Calibration`]). The constants are priors close to
//! an 8B model on one H100 (vLLM figures), so that the ranking is right before any observation.
//!
//! A hot prefix held by one replica stops attracting requests once its queue makes it slower
//! than recomputing the prefix elsewhere: no threshold, the comparison of costs does it.
//!
//! ## Tiers
//!
//! With KV-cache tiers (vLLM CPU offloading, LMCache's CPU, disk and shared backends, a peer
//! pulled point to point), the prompt splits into what the GPU cache holds (free), what is
//! loaded from a tier and what is recomputed ([`TierLoadRates::place`]):
//!
//! ```text
//! load      = Σ_tier tokens_tier × kv_bytes_per_token / bandwidth_tier
//! uncached  = prompt − gpu − Σ_tier tokens_tier     tokens recomputed
//! ttft      = k · (prefill · t_token + steps · (t_step + decoding · t_seq) + load)
//! ```
//!
//! with `prefill = queued + uncached` as above: loading precedes the sequence's prefill, in
//! the engine step that schedules it (the tiers contract). Defaults (Llama-3.1-8B fp16: 2 × 32
//! layers × 8 KV heads × 128 × 2 bytes = 131,072 bytes per token): CPU 25 GB/s (≈ 5.2 µs per
//! token), shared store 10 GB/s and peer 10 GB/s (≈ 13 µs), against ≈ 30 µs to recompute. A
//! bandwidth of 0 ignores the tier (its tokens are recomputed). The figures are the tiers
//! contract's, the simulator's defaults; their public sources (vLLM's offloading-connector post:
//! ≈ 50 GB/s one-way DMA on an H100, halved for sharing PCIe; a 100 Gb/s NIC at ≈ 80 % for the
//! store and peers) are in `sim/README.md`, "KV tiers and sharing".
//!
//! The engine decides what it loads from its own tiers: LMCache's connector loads every hit
//! beyond vLLM's GPU hit (`get_num_new_matched_tokens`, the only gate being its
//! `min_retrieve_tokens`), and vLLM's offloading connector loads every hit too; neither
//! compares with recomputing. So the CPU, disk and shared tiers are charged whenever they hold
//! blocks, as the engine will load them. A peer pull happens only when the EPP names the peer
//! (`x-kv-cache-source-host-port`), so the EPP decides it: the peer is counted only when its
//! per-token load is cheaper than recomputing, and the header follows the prediction
//! (`Cost::peer`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bytes of prompt per token when no tokenizer is configured (the reference's estimate).
pub const BYTES_PER_TOKEN: usize = 4;

/// The engine constants of the model (priors; [`Calibration`] corrects them per replica).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineCosts {
    /// Tokens one step can carry (vLLM's `max_num_batched_tokens`, 8192 by default).
    pub token_budget: u64,
    /// Compute time of one prompt token.
    pub per_token: Duration,
    /// Fixed time of one step.
    pub per_step: Duration,
    /// Time one running sequence adds to a step.
    pub per_sequence: Duration,
}

impl Default for EngineCosts {
    /// Llama-3.1-8B on one H100 SXM, vLLM V1 defaults: ~33k prompt tokens/s, 6 ms steps,
    /// 40 µs per sequence (what the project's simulator is calibrated to).
    fn default() -> Self {
        Self {
            token_budget: 8192,
            per_token: Duration::from_micros(30),
            per_step: Duration::from_millis(6),
            per_sequence: Duration::from_micros(40),
        }
    }
}

/// What one replica has on its plate, as the EPP knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Uncached prompt tokens still to compute before a new request's turn.
    pub queued_tokens: u64,
    /// Sequences decoding.
    pub decoding: u64,
}

/// The prediction for one request on one replica.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prediction {
    /// Time to first token, seconds.
    pub ttft: f64,
    /// Time per output token once decoding, seconds.
    pub tpot: f64,
}

impl Prediction {
    /// The time until `output_tokens` tokens are out, seconds.
    pub fn e2e(&self, output_tokens: u64) -> f64 {
        self.ttft + self.tpot * output_tokens.saturating_sub(1) as f64
    }
}

impl EngineCosts {
    /// The uncorrected prediction for a request with `uncached` prompt tokens on a replica
    /// with `backlog`.
    pub fn predict(&self, backlog: Backlog, uncached: u64) -> Prediction {
        self.in_seconds().predict(backlog, uncached)
    }

    /// The constants as seconds, converted once for the many predictions of one decision.
    pub fn in_seconds(&self) -> EngineSeconds {
        EngineSeconds {
            token_budget: self.token_budget,
            per_token: self.per_token.as_secs_f64(),
            per_step: self.per_step.as_secs_f64(),
            per_sequence: self.per_sequence.as_secs_f64(),
        }
    }
}

/// [`EngineCosts`] with its durations in seconds (see [`EngineCosts::in_seconds`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineSeconds {
    /// Tokens one step can carry.
    pub token_budget: u64,
    /// Compute time of one prompt token, seconds.
    pub per_token: f64,
    /// Fixed time of one step, seconds.
    pub per_step: f64,
    /// Time one running sequence adds to a step, seconds.
    pub per_sequence: f64,
}

impl EngineSeconds {
    /// See [`EngineCosts::predict`].
    pub fn predict(&self, backlog: Backlog, uncached: u64) -> Prediction {
        // A step always has room for some prefill: at least a sixteenth of the budget, as the
        // engine caps the running sequences well below its token budget.
        let room = self
            .token_budget
            .saturating_sub(backlog.decoding)
            .max(self.token_budget / 16)
            .max(1);
        let prefill = backlog.queued_tokens.saturating_add(uncached);
        // Most prefills fit one step; the division is the slowest instruction of a decision's
        // per-candidate work, so it is spent only when they do not.
        let steps = if prefill <= room {
            1
        } else {
            prefill.div_ceil(room)
        };
        let step = self.per_step + count_f64(backlog.decoding) * self.per_sequence;
        let ttft = count_f64(prefill) * self.per_token + count_f64(steps) * step;
        // The prefill queued ahead is done by our first token; what arrives later is unknown,
        // so a decode step is the batch's own cost.
        let tpot =
            self.per_step + count_f64(backlog.decoding.saturating_add(1)) * self.per_sequence;
        Prediction { ttft, tpot }
    }
}

/// A token or request count as `f64`, by way of `i64`: one instruction on x86-64 where `u64`'s
/// conversion takes five, and a decision converts several counts for every candidate. Counts
/// past `i64::MAX` (none is real; saturating sums can reach it) stay there.
#[inline]
pub fn count_f64(n: u64) -> f64 {
    i64::try_from(n).unwrap_or(i64::MAX) as f64
}

/// Bytes of KV cache per token of Llama-3.1-8B in fp16 (the tiers contract).
pub const DEFAULT_KV_BYTES_PER_TOKEN: u64 = 131_072;

/// What loading KV blocks from each tier costs. Bandwidths in GB/s (10⁹ bytes per second);
/// 0 ignores the tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierCosts {
    /// Bytes of KV cache per token (all layers, K and V).
    pub kv_bytes_per_token: u64,
    /// Host memory → GPU (vLLM CPU offloading, LMCache's local CPU backend).
    pub cpu_gbps: f64,
    /// Local disk → GPU (LMCache's local disk backend). No default figure: ignored.
    pub disk_gbps: f64,
    /// The store shared by the pool → GPU (LMCache's remote backend).
    pub shared_gbps: f64,
    /// Another replica → GPU (LMCache P2P, NIXL), when the EPP names the peer.
    pub peer_gbps: f64,
}

impl Default for TierCosts {
    /// The tiers contract's figures.
    fn default() -> Self {
        Self {
            kv_bytes_per_token: DEFAULT_KV_BYTES_PER_TOKEN,
            cpu_gbps: 25.0,
            disk_gbps: 0.0,
            shared_gbps: 10.0,
            peer_gbps: 10.0,
        }
    }
}

/// How one request's prompt would be served on one replica.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Placement {
    /// Prompt tokens recomputed.
    pub recompute: u64,
    /// Prompt tokens read from the replica's GPU cache.
    pub gpu: u64,
    /// Seconds spent loading the tiers' tokens.
    pub load_seconds: f64,
    /// Whether the peer's tokens are pulled.
    pub peer: bool,
}

impl TierCosts {
    /// Seconds to load one token at `gbps` (`None` for an ignored tier).
    pub fn seconds_per_token(&self, gbps: f64) -> Option<f64> {
        (gbps.is_finite() && gbps > 0.0).then(|| self.kv_bytes_per_token as f64 / (gbps * 1e9))
    }

    /// Each tier's [`seconds_per_token`](Self::seconds_per_token), computed once for the many
    /// placements of one decision.
    pub fn load_rates(&self) -> TierLoadRates {
        TierLoadRates {
            cpu: self.seconds_per_token(self.cpu_gbps),
            disk: self.seconds_per_token(self.disk_gbps),
            shared: self.seconds_per_token(self.shared_gbps),
            peer: self.seconds_per_token(self.peer_gbps),
        }
    }
}

/// Seconds to load one token from each tier, `None` for an ignored one (see
/// [`TierCosts::load_rates`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TierLoadRates {
    /// From the replica's CPU memory.
    pub cpu: Option<f64>,
    /// From its local disk.
    pub disk: Option<f64>,
    /// From the shared store.
    pub shared: Option<f64>,
    /// From a peer.
    pub peer: Option<f64>,
}

impl TierLoadRates {
    /// Splits a `prompt`-token request over the tiers `hits` describes. `recompute_per_token`
    /// (seconds) decides the one tier the EPP chooses, the peer. Counts beyond the prompt are
    /// cut, in tier order (GPU, CPU, disk, shared, peer).
    pub fn place(
        &self,
        prompt: u64,
        hits: &crate::scheduling::TierTokens,
        recompute_per_token: f64,
    ) -> Placement {
        let mut left = prompt;
        let mut take = |n: u64| {
            let n = n.min(left);
            left -= n;
            n
        };
        let gpu = take(hits.gpu);
        let mut load = 0.0;
        for (tokens, rate) in [
            (hits.cpu, self.cpu),
            (hits.disk, self.disk),
            (hits.shared, self.shared),
        ] {
            // (Most candidates hold nothing in a tier: no conversion for them.)
            if let Some(per_token) = rate
                && tokens > 0
            {
                load += count_f64(take(tokens)) * per_token;
            }
        }
        let mut peer = false;
        if let Some(per_token) = self.peer
            && per_token < recompute_per_token
            && hits.peer > 0
        {
            let n = take(hits.peer);
            load += count_f64(n) * per_token;
            peer = n > 0;
        }
        Placement {
            recompute: left,
            gpu,
            load_seconds: load,
            peer,
        }
    }
}

/// Learns, per replica, how far the model's TTFTs are from the observed ones: an exponentially
/// weighted mean of `ln(observed / predicted)`, each sample clamped to ±ln 4 so that one
/// outlier (a stalled connection, a preemption) moves the correction by a bounded step, and the
/// correction itself clamped to [1/8, 8].
#[derive(Debug)]
pub struct Calibration {
    /// `ln k` as f64 bits.
    log_factor: AtomicU64,
    /// `k` as f64 bits, kept beside its log: every candidate of every decision reads it, and
    /// an `exp` each time was a visible part of a decision at 1,000 endpoints.
    factor: AtomicU64,
    /// Observations so far (saturating), for the warm-up weight.
    samples: AtomicU64,
}

/// Weight of a new sample once warmed up (~ the last 20 observations matter).
const CALIBRATION_WEIGHT: f64 = 0.05;
/// Largest correction of one sample, in `ln` units (a factor of 4).
const MAX_SAMPLE_LOG: f64 = 1.386_294_361_119_890_6;
/// Largest correction overall, in `ln` units (a factor of 8).
const MAX_LOG_FACTOR: f64 = 2.079_441_541_679_835_8;

impl Default for Calibration {
    fn default() -> Self {
        Self {
            log_factor: AtomicU64::new(0f64.to_bits()),
            factor: AtomicU64::new(1f64.to_bits()),
            samples: AtomicU64::new(0),
        }
    }
}

impl Calibration {
    /// The current correction factor `k`.
    pub fn factor(&self) -> f64 {
        f64::from_bits(self.factor.load(Ordering::Relaxed))
    }

    /// Learns from one request whose first token took `observed` where the uncorrected model
    /// said `predicted`. Racing updates may drop a sample; the mean does not care.
    pub fn observe(&self, predicted: Duration, observed: Duration) {
        let (p, o) = (predicted.as_secs_f64(), observed.as_secs_f64());
        if !(p > 0.0 && o > 0.0 && p.is_finite() && o.is_finite()) {
            return;
        }
        let sample = (o / p).ln().clamp(-MAX_SAMPLE_LOG, MAX_SAMPLE_LOG);
        let n = self
            .samples
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        // Plain averaging for the first samples, so a handful of observations already count.
        let weight = (1.0 / n as f64).max(CALIBRATION_WEIGHT);
        let old = f64::from_bits(self.log_factor.load(Ordering::Relaxed));
        let new = (old + weight * (sample - old)).clamp(-MAX_LOG_FACTOR, MAX_LOG_FACTOR);
        self.log_factor.store(new.to_bits(), Ordering::Relaxed);
        self.factor.store(new.exp().to_bits(), Ordering::Relaxed);
    }

    /// Observations learnt from.
    pub fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }
}

/// Most prompt tokens an estimate gives one request: a 16 MiB body (the default request cap)
/// estimated at 4 bytes a token would be 4.2 M tokens, minutes of prefill charged to the replica
/// it goes to, which a client could send on purpose to take replicas out of rotation. Past a
/// long context the estimate is wrong anyway (an engine refuses such a prompt).
pub const MAX_ESTIMATED_PROMPT_TOKENS: u64 = 262_144;

/// Tokens one media part (an image, an audio clip) of a structured prompt is estimated at,
/// whatever the length of its base64: a high-resolution image is of this order for today's
/// vision models, and its base64 bytes say little about it.
pub const MEDIA_PART_TOKENS: u64 = 1_024;

/// A value at least this long under a media key is a media part.
const MIN_MEDIA_BYTES: usize = 1_024;

/// Media parts counted as such in one request; any further part counts as its bytes, as text
/// does. A link is a few bytes, so without a bound a 12 KiB body of 256 links would be
/// charged as the estimate's cap; engines refuse far fewer per prompt (vLLM's
/// `--limit-mm-per-prompt`).
pub const MAX_MEDIA_PARTS: u64 = 32;

/// The keys whose string values are media, not text, to the engine, in a prompt's messages:
/// OpenAI's and vLLM's `image_url.url`, `video_url.url`, `audio_url.url`, `input_audio.data`,
/// vLLM's `image_embeds` and `audio_embeds`, and the Responses API's `image_url` and
/// `file_data`. What a client puts there is decoded as media (or refused), never tokenized as
/// text, so a long text cannot pass for an image by its key (a `data:` prefix alone would have
/// let a 400 KiB prompt count as one image). Only in messages: tools and instructions are
/// rendered as text whatever their keys ([`estimate_json_text_tokens`]).
const MEDIA_KEYS: [&[u8]; 6] = [
    b"url",
    b"data",
    b"image_url",
    b"file_data",
    b"image_embeds",
    b"audio_embeds",
];

/// The media keys whose value may be a link to the media rather than the media itself.
const LINK_KEYS: [&[u8]; 2] = [b"url", b"image_url"];

/// A value under a link key that is media whatever its length: a link to it (the engine
/// fetches an image, it does not read its address as text).
fn is_media_link(value: &[u8]) -> bool {
    [&b"http://"[..], b"https://", b"file:", b"data:"]
        .iter()
        .any(|scheme| {
            value.len() >= scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme)
        })
}

/// Prompt tokens of a prompt of `bytes` bytes, estimated (at most
/// [`MAX_ESTIMATED_PROMPT_TOKENS`]).
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes.div_ceil(BYTES_PER_TOKEN) as u64).min(MAX_ESTIMATED_PROMPT_TOKENS)
}

/// Prompt tokens of a structured prompt (chat `messages`, Responses `input`, …) given as its
/// raw JSON, estimated from what the engine tokenizes: the bytes inside JSON strings at
/// [`BYTES_PER_TOKEN`] (keys and values: role names and part types become template tokens
/// too), each media part (under a media key such as `url`, `data` or `image_url`: a value of
/// 1 KiB or more, or a link under `url` or `image_url`; at most [`MAX_MEDIA_PARTS`]) at
/// [`MEDIA_PART_TOKENS`], and nothing for the JSON's structure and whitespace. A JSON without
/// strings (a completion prompt of token ids) counts one token per number. At most
/// [`MAX_ESTIMATED_PROMPT_TOKENS`].
pub fn estimate_json_prompt_tokens(json: &[u8]) -> u64 {
    estimate_json(json, true)
}

/// Tokens of JSON the engine renders as text whatever its keys (a request's `tools`, the
/// Responses API's `instructions`, chat `documents`): [`estimate_json_prompt_tokens`] without
/// media parts.
pub fn estimate_json_text_tokens(json: &[u8]) -> u64 {
    estimate_json(json, false)
}

/// [`estimate_json_prompt_tokens`] of each leading run of `json` that a prefix hash of
/// `block_bytes`-byte blocks covers, at most `blocks` of them (`out[k]`: of
/// `json[..min((k + 1) × block_bytes, len)]`, the last run the trailing partial block the
/// hasher hashes too), in one pass: what a prefix match of `k + 1` blocks of the raw JSON is
/// worth in the prompt's estimated tokens. Without it a match was counted at
/// [`BYTES_PER_TOKEN`] per byte of JSON, whitespace and all, while the prompt is estimated
/// from its content: a body led by 16 KiB of spaces matched on every replica bought 4,096
/// tokens of prefill for free. A media part counts in the runs that hold all of it, never in
/// part (a run that ends inside an image holds some of its base64, which says nothing of
/// whether the rest is the same image); a text string cut by a run's end counts its bytes
/// inside the run. Strings before `media_from` are text whatever their keys (the Responses
/// API's instructions and tools, which lead its hashed prompt).
pub fn estimate_json_prompt_tokens_by_block(
    json: &[u8],
    media_from: usize,
    block_bytes: usize,
    blocks: usize,
    out: &mut Vec<u64>,
) {
    out.clear();
    if block_bytes == 0 {
        return;
    }
    let blocks = blocks.min(json.len().div_ceil(block_bytes));
    let json = &json[..json.len().min(blocks.saturating_mul(block_bytes))];
    let run_end = |k: usize| ((k + 1) * block_bytes).min(json.len());
    let tokens = |text: usize, media: u64| {
        (text.div_ceil(BYTES_PER_TOKEN) as u64)
            .saturating_add(media.saturating_mul(MEDIA_PART_TOKENS))
            .min(MAX_ESTIMATED_PROMPT_TOKENS)
    };
    let (mut text, mut media, mut any) = (0usize, 0u64, false);
    for part in JsonStrings::new(json, media_from) {
        any = true;
        // The runs that end before this string begins.
        while out.len() < blocks && run_end(out.len()) <= part.start {
            out.push(tokens(text, media));
        }
        // The runs that end inside it: a text string's bytes up to their end.
        while out.len() < blocks && run_end(out.len()) < part.end {
            let partial = if part.media_key {
                0
            } else {
                run_end(out.len()) - part.start
            };
            out.push(tokens(text + partial, media));
        }
        match (part.media, part.closed) {
            (true, true) => media += 1,
            // An image the run ends inside: none of it.
            _ if part.media_key && !part.closed => {}
            _ => text += part.end - part.start,
        }
    }
    if !any {
        // Token ids: one token per number.
        let mut numbers = 0u64;
        for (at, (b, before)) in json
            .iter()
            .zip(std::iter::once(&b' ').chain(json.iter()))
            .enumerate()
        {
            if b.is_ascii_digit() && !before.is_ascii_digit() {
                numbers += 1;
            }
            if at + 1 == run_end(out.len()) {
                out.push(numbers.min(MAX_ESTIMATED_PROMPT_TOKENS));
            }
        }
        return;
    }
    while out.len() < blocks {
        out.push(tokens(text, media));
    }
}

/// One string of a JSON text: the bytes between its quotes, and what it is.
struct JsonString {
    start: usize,
    end: usize,
    /// A value under a media key, whatever its length.
    media_key: bool,
    /// A media part (see [`estimate_json_prompt_tokens`]).
    media: bool,
    /// Its closing quote is in the text (not cut short).
    closed: bool,
}

/// The strings of a JSON text in order, found by one pass over its quotes (escaped or not: a
/// search per escape cost 121 µs at 220 KB of text with an escape every 23 characters, this
/// 57 µs, 2 µs without escapes). An unterminated string (damaged JSON, or a run cut short)
/// ends at the end.
struct JsonStrings<'a> {
    json: &'a [u8],
    quotes: memchr::Memchr<'a>,
    /// Strings that begin before this are text whatever their keys.
    media_from: usize,
    /// Media parts so far (at most [`MAX_MEDIA_PARTS`] are).
    media: u64,
    /// The last string that was a key (followed by `:`), and where the bytes between strings
    /// begin.
    key: (usize, usize),
    between: usize,
    done: bool,
}

impl<'a> JsonStrings<'a> {
    fn new(json: &'a [u8], media_from: usize) -> Self {
        Self {
            json,
            quotes: memchr::memchr_iter(b'"', json),
            media_from,
            media: 0,
            key: (0, 0),
            between: 0,
            done: false,
        }
    }
}

impl Iterator for JsonStrings<'_> {
    type Item = JsonString;

    fn next(&mut self) -> Option<JsonString> {
        if self.done {
            return None;
        }
        let json = self.json;
        let Some(open) = self.quotes.next() else {
            self.done = true;
            return None;
        };
        let is_value = json[self.between..open]
            .iter()
            .rev()
            .find(|b| !b.is_ascii_whitespace())
            == Some(&b':');
        let start = open + 1;
        // The closing quote is the first one after an even run of backslashes.
        let end = loop {
            let Some(quote) = self.quotes.next() else {
                self.done = true;
                break json.len();
            };
            let backslashes = json[start..quote]
                .iter()
                .rev()
                .take_while(|&&b| b == b'\\')
                .count();
            if backslashes % 2 == 0 {
                break quote;
            }
        };
        let string = &json[start..end];
        let key = &json[self.key.0..self.key.1];
        let media_key = start >= self.media_from && is_value && MEDIA_KEYS.contains(&key);
        let media = media_key
            && self.media < MAX_MEDIA_PARTS
            && (string.len() >= MIN_MEDIA_BYTES
                || (LINK_KEYS.contains(&key) && is_media_link(string)));
        self.media += u64::from(media);
        self.between = (end + 1).min(json.len());
        let is_key = json[self.between..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            == Some(&b':');
        self.key = if is_key { (start, end) } else { (0, 0) };
        Some(JsonString {
            start,
            end,
            media_key,
            media,
            closed: !self.done,
        })
    }
}

fn estimate_json(json: &[u8], media_keys: bool) -> u64 {
    let (mut text, mut media, mut strings) = (0usize, 0u64, 0usize);
    let media_from = if media_keys { 0 } else { usize::MAX };
    for part in JsonStrings::new(json, media_from) {
        strings += 1;
        if part.media {
            media += 1;
        } else {
            text += part.end - part.start;
        }
    }
    if strings == 0 {
        // Token ids: one token per number, whatever the whitespace around them.
        let numbers = json
            .iter()
            .zip(std::iter::once(&b' ').chain(json.iter()))
            .filter(|(b, before)| b.is_ascii_digit() && !before.is_ascii_digit())
            .count();
        return (numbers as u64).min(MAX_ESTIMATED_PROMPT_TOKENS);
    }
    (text.div_ceil(BYTES_PER_TOKEN) as u64)
        .saturating_add(media.saturating_mul(MEDIA_PART_TOKENS))
        .min(MAX_ESTIMATED_PROMPT_TOKENS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_structured_prompt_is_estimated_from_its_text_and_media_parts() {
        let text = "word ".repeat(800);
        let chat = format!(r#"[{{"role":"user","content":"{text}"}}]"#);
        // 4,000 bytes of text plus "role", "user", "content": 4,015 bytes.
        assert_eq!(estimate_json_prompt_tokens(chat.as_bytes()), 1004);
        // Whitespace between the JSON's tokens is not text.
        let padded = format!(
            r#"[ {{ "role" : "user" , {} "content" : "{text}" }} ]"#,
            " ".repeat(1 << 20)
        );
        assert_eq!(estimate_json_prompt_tokens(padded.as_bytes()), 1004);
        // An image is one media part, whatever its size; an escaped quote stays inside.
        let image = format!("data:image/jpeg;base64,{}", "QUJD".repeat(1 << 18));
        let vision = format!(
            r#"[{{"role":"user","content":[{{"type":"text","text":"say \"hi\""}},{{"type":"image_url","image_url":{{"url":"{image}"}}}}]}}]"#
        );
        let text_bytes = [
            "role",
            "user",
            "content",
            "type",
            "text",
            "text",
            r#"say \"hi\""#,
            "type",
            "image_url",
            "image_url",
            "url",
        ]
        .iter()
        .map(|s| s.len())
        .sum::<usize>();
        assert_eq!(
            estimate_json_prompt_tokens(vision.as_bytes()),
            text_bytes.div_ceil(BYTES_PER_TOKEN) as u64 + MEDIA_PART_TOKENS
        );
        // Audio as bare base64 too.
        let audio = format!(
            r#"[{{"input_audio":{{"data":"{}","format":"wav"}}}}]"#,
            "QUJD".repeat(1000)
        );
        assert_eq!(
            estimate_json_prompt_tokens(audio.as_bytes()),
            ("input_audio".len() + "data".len() + "format".len() + "wav".len()).div_ceil(4) as u64
                + MEDIA_PART_TOKENS
        );
        // Token ids: one token per number, padding or not.
        assert_eq!(estimate_json_prompt_tokens(b"[1,2,3,4,5,6,7,8]"), 8);
        let padded_ids = format!("[101,{}2023 , 7]", " ".repeat(1 << 20));
        assert_eq!(estimate_json_prompt_tokens(padded_ids.as_bytes()), 3);
        // Text is text whatever it looks like: a `data:` prefix or base64 letters under a
        // text key do not make a long prompt one image.
        let disguised = format!(r#"[{{"content":"data:{}"}}]"#, "word".repeat(1000));
        assert_eq!(
            estimate_json_prompt_tokens(disguised.as_bytes()),
            ("content".len() + 5 + 4000).div_ceil(4) as u64
        );
        let letters = format!(r#"[{{"text":"{}"}}]"#, "QUJD".repeat(1000));
        assert_eq!(
            estimate_json_prompt_tokens(letters.as_bytes()),
            ("text".len() + 4000).div_ceil(4) as u64
        );
        // A link is an image whatever its length; embeddings are media too.
        let linked = r#"[{"image_url":{"url":"https://example.com/cat.jpg"}}]"#;
        assert_eq!(
            estimate_json_prompt_tokens(linked.as_bytes()),
            ("image_url".len() + "url".len()).div_ceil(4) as u64 + MEDIA_PART_TOKENS
        );
        let embeds = format!(r#"[{{"image_embeds":"{}"}}]"#, "QUJD".repeat(1000));
        assert_eq!(
            estimate_json_prompt_tokens(embeds.as_bytes()),
            ("image_embeds".len() as u64).div_ceil(4) + MEDIA_PART_TOKENS
        );
        // In text the engine renders whatever its keys (tools), a media key is text.
        let tool = format!(r#"[{{"parameters":{{"data":"{}"}}}}]"#, "word".repeat(1000));
        assert_eq!(
            estimate_json_text_tokens(tool.as_bytes()),
            ("parameters".len() + "data".len() + 4000).div_ceil(4) as u64
        );
        // A key named like a media key but used as a value is text.
        let value = format!(r#"["url","{}"]"#, "a".repeat(2000));
        assert_eq!(
            estimate_json_prompt_tokens(value.as_bytes()),
            (3 + 2000_u64).div_ceil(4)
        );
    }

    #[test]
    fn estimates_are_capped_and_survive_damaged_json() {
        let huge = format!(r#"[{{"content":"{}"}}]"#, "word ".repeat(1 << 20));
        assert_eq!(
            estimate_json_prompt_tokens(huge.as_bytes()),
            MAX_ESTIMATED_PROMPT_TOKENS
        );
        assert_eq!(estimate_tokens(16 << 20), MAX_ESTIMATED_PROMPT_TOKENS);
        // Unterminated strings and a trailing backslash end the walk, not the process.
        for damaged in [
            &br#"\"#[..],
            br#""abc"#,
            br#""abc\"#,
            br#""\"#,
            br#"""#,
            br#""""#,
            b"",
        ] {
            let _ = estimate_json_prompt_tokens(damaged);
        }
        assert_eq!(estimate_json_prompt_tokens(br#""abcd""#), 1);
        // A string ending in an escaped backslash ends at its quote; an escaped quote after
        // an escaped backslash does not end it.
        assert_eq!(estimate_json_prompt_tokens(br#"["ab\\","cdefgh"]"#), 3);
        assert_eq!(estimate_json_prompt_tokens(br#"["ab\\\"cd"]"#), 2);
    }

    /// A match over whitespace and JSON structure is worth what the content in it is: a body
    /// padded with spaces before its text gets no credit for the spaces.
    #[test]
    fn a_matched_run_is_worth_its_content_not_its_bytes() {
        let padded = format!(
            r#"[{}{{"role":"user","content":"{}"}}]"#,
            " ".repeat(4096),
            "word".repeat(1024)
        );
        let mut by_block = Vec::new();
        estimate_json_prompt_tokens_by_block(padded.as_bytes(), 0, 64, 1000, &mut by_block);
        assert_eq!(
            by_block.len(),
            padded.len().div_ceil(64),
            "the partial block too"
        );
        // The 64 blocks of spaces are worth nothing; the whole is worth the estimate.
        assert_eq!(by_block[63], 0);
        assert!(by_block.windows(2).all(|w| w[0] <= w[1]), "{by_block:?}");
        let whole = estimate_json_prompt_tokens(padded.as_bytes());
        assert_eq!(*by_block.last().unwrap(), whole, "the whole prompt");
        // At most `blocks` runs, none past the JSON's end.
        estimate_json_prompt_tokens_by_block(padded.as_bytes(), 0, 64, 3, &mut by_block);
        assert_eq!(by_block, vec![0, 0, 0]);
        estimate_json_prompt_tokens_by_block(b"[]", 0, 64, 3, &mut by_block);
        assert_eq!(by_block, vec![0]);
        estimate_json_prompt_tokens_by_block(b"", 0, 64, 3, &mut by_block);
        assert!(by_block.is_empty());
        estimate_json_prompt_tokens_by_block(b"[]", 0, 0, 3, &mut by_block);
        assert!(by_block.is_empty());
        // Token ids: one token per number in each run.
        estimate_json_prompt_tokens_by_block(b"[1, 22, 333, 4]", 0, 5, 3, &mut by_block);
        assert_eq!(by_block, vec![2, 3, 4], "[1, 2 | 2, 3 | 33, 4]");
        estimate_json_prompt_tokens_by_block(b"[1, 22, 333, 4]", 0, 4, 9, &mut by_block);
        assert_eq!(by_block, vec![1, 2, 3, 4], "[1, | 22,  | 333, | 4]");
    }

    /// An image counts in the runs that hold it whole, never in part nor as base64 text.
    #[test]
    fn a_matched_run_counts_an_image_not_its_base64() {
        let image = "QUJD".repeat(2048);
        let json = format!(
            r#"[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}},{{"type":"text","text":"{}"}}]"#,
            "word".repeat(256)
        );
        let mut by_block = Vec::new();
        estimate_json_prompt_tokens_by_block(json.as_bytes(), 0, 64, usize::MAX, &mut by_block);
        let before_image = ("type".len() + "image_url".len() * 2 + "url".len()).div_ceil(4) as u64;
        let inside = 8192 / 64 - 2;
        assert_eq!(
            by_block[inside], before_image,
            "no credit for half an image"
        );
        assert_eq!(
            by_block[by_block.len() - 1],
            estimate_json_prompt_tokens(json.as_bytes()),
            "the whole prompt"
        );
        // A run cut inside it, as the hasher's depth may cut it, holds none of it either.
        estimate_json_prompt_tokens_by_block(json.as_bytes(), 0, 64, inside + 1, &mut by_block);
        assert_eq!(by_block[inside], before_image);
        // Before `media_from` (the Responses API's tools, leading its prompt) a media key is
        // text, as the prompt's own estimate counts it.
        let tools = r#"[{"url":"file:"},{"data":"https://x"}]"#;
        let joined = format!("{tools}{json}");
        estimate_json_prompt_tokens_by_block(
            joined.as_bytes(),
            tools.len(),
            64,
            usize::MAX,
            &mut by_block,
        );
        // The tools' 21 bytes of strings as text; the messages' 1,061 bytes of text and
        // their image.
        assert_eq!(
            by_block[by_block.len() - 1],
            (21 + 1061_u64).div_ceil(4) + MEDIA_PART_TOKENS
        );
        assert_eq!(
            estimate_json_prompt_tokens(json.as_bytes()),
            1061_u64.div_ceil(4) + MEDIA_PART_TOKENS
        );
    }

    /// A few bytes of links cannot pass for the estimate's cap: at most 32 media parts count.
    #[test]
    fn links_count_as_media_at_most_so_many_times() {
        let part = r#"{"type":"image_url","image_url":{"url":"file:"}}"#;
        let json = format!("[{}]", vec![part; 256].join(","));
        let estimate = estimate_json_prompt_tokens(json.as_bytes());
        // 32 images, and the rest as the text it is.
        assert!(
            estimate <= MAX_MEDIA_PARTS * MEDIA_PART_TOKENS + json.len() as u64 / 4,
            "{estimate}"
        );
        assert!(
            estimate >= MAX_MEDIA_PARTS * MEDIA_PART_TOKENS,
            "{estimate}"
        );
        // A short value under a data key is text, not a link to media.
        let short = r#"[{"input_audio":{"data":"https://x"}}]"#;
        assert!(estimate_json_prompt_tokens(short.as_bytes()) < 16);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5e57),
            cases: 512,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]
        /// Each run's worth is the estimate of the run alone (text without media: where
        /// they differ is a media part cut short, tested above).
        #[test]
        fn each_run_is_worth_its_own_estimate(
            parts in proptest::collection::vec(("[a-z]{0,6}", "[a-z\\\\\"\n ]{0,90}"), 1..8),
            block in 1usize..40,
        ) {
            let messages: Vec<std::collections::BTreeMap<String, String>> = parts
                .into_iter()
                .map(|(k, v)| std::iter::once((format!("k{k}"), v)).collect())
                .collect();
            let json = serde_json::to_string_pretty(&messages).unwrap();
            let mut by_block = Vec::new();
            estimate_json_prompt_tokens_by_block(json.as_bytes(), 0, block, usize::MAX, &mut by_block);
            proptest::prop_assert_eq!(by_block.len(), json.len().div_ceil(block));
            for (k, tokens) in by_block.iter().enumerate() {
                let run = &json.as_bytes()[..((k + 1) * block).min(json.len())];
                // A run without a string yet: nothing (the whole-JSON rule would count numbers).
                let expected = if run.contains(&b'"') { estimate_json_prompt_tokens(run) } else { 0 };
                proptest::prop_assert_eq!(*tokens, expected, "run {}", k);
            }
        }

        /// Every string a JSON encoder writes, escapes and all, ends where the encoder ended it:
        /// the estimate counts exactly the bytes inside the quotes of each.
        #[test]
        fn strings_end_where_the_encoder_ended_them(
            parts in proptest::collection::vec("[a-z\\\\\"\n\u{e9} ]{0,40}", 1..6)
        ) {
            let json = serde_json::to_string(&parts).unwrap();
            let inside: usize = parts
                .iter()
                .map(|p| serde_json::to_string(p).unwrap().len() - 2)
                .sum();
            proptest::prop_assert_eq!(
                estimate_json_prompt_tokens(json.as_bytes()),
                inside.div_ceil(4) as u64
            );
        }
    }

    fn ms(s: f64) -> f64 {
        s * 1000.0
    }

    #[test]
    fn an_idle_replica_costs_one_step_plus_the_prompt() {
        let c = EngineCosts::default();
        let p = c.predict(Backlog::default(), 1000);
        // 1000 × 30 µs + one 6 ms step.
        assert!((ms(p.ttft) - 36.0).abs() < 1e-6, "{}", ms(p.ttft));
        assert!((ms(p.tpot) - 6.04).abs() < 1e-6, "{}", ms(p.tpot));
        assert!((p.e2e(11) - (p.ttft + 10.0 * p.tpot)).abs() < 1e-12);
    }

    #[test]
    fn queued_prefill_and_decodes_both_delay_the_first_token() {
        let c = EngineCosts::default();
        let idle = c.predict(Backlog::default(), 2000).ttft;
        let queued = c
            .predict(
                Backlog {
                    queued_tokens: 20_000,
                    decoding: 0,
                },
                2000,
            )
            .ttft;
        let busy = c
            .predict(
                Backlog {
                    queued_tokens: 0,
                    decoding: 200,
                },
                2000,
            )
            .ttft;
        assert!(queued > idle * 10.0, "{queued} vs {idle}");
        assert!(busy > idle, "{busy} vs {idle}");
        // 22,000 tokens: three steps of 7,992 tokens of room with 200 decodes.
        let both = c.predict(
            Backlog {
                queued_tokens: 20_000,
                decoding: 200,
            },
            2000,
        );
        let want = 22_000.0 * 30e-6 + 3.0 * (6e-3 + 200.0 * 40e-6);
        assert!((both.ttft - want).abs() < 1e-9, "{} vs {want}", both.ttft);
        assert!(both.tpot > c.predict(Backlog::default(), 0).tpot);
    }

    /// The hot-prefix case: the replica holding a 6,000-token prefix is best while its queue is
    /// short; once the requests piled on it queue more prefill than recomputing the prefix
    /// costs, a cold replica becomes cheaper, by construction.
    #[test]
    fn a_hot_prefix_moves_to_a_second_replica_when_queueing_costs_more_than_recomputing() {
        let c = EngineCosts::default();
        let prompt = 6_500;
        let cached_there = 6_000;
        let holder = |queued| {
            c.predict(
                Backlog {
                    queued_tokens: queued,
                    decoding: 32,
                },
                prompt - cached_there,
            )
            .ttft
        };
        let cold = c
            .predict(
                Backlog {
                    queued_tokens: 0,
                    decoding: 32,
                },
                prompt,
            )
            .ttft;
        assert!(holder(0) < cold);
        // Each request piled on the holder queues its 500 uncached tokens.
        let piled = (0..40u64)
            .find(|n| holder(n * 500) > cold)
            .expect("the holder stops winning");
        assert!(
            (10..15).contains(&piled),
            "switches after {piled} queued requests"
        );
    }

    #[test]
    fn calibration_learns_a_slower_replica_and_shrugs_off_outliers() {
        let cal = Calibration::default();
        assert_eq!(cal.factor(), 1.0);
        let predicted = Duration::from_millis(100);
        for _ in 0..200 {
            cal.observe(predicted, Duration::from_millis(200));
        }
        assert!((cal.factor() - 2.0).abs() < 0.01, "{}", cal.factor());
        // One 100× outlier moves it by at most the clamped sample's weight.
        cal.observe(predicted, Duration::from_secs(20));
        assert!(cal.factor() < 2.0 * 1.08, "{}", cal.factor());
        // Garbage is ignored.
        cal.observe(Duration::ZERO, Duration::from_millis(5));
        cal.observe(predicted, Duration::ZERO);
        assert_eq!(cal.samples(), 201);
        // Bounded overall.
        for _ in 0..1000 {
            cal.observe(predicted, Duration::from_secs(100));
        }
        assert!(cal.factor() <= 8.0 + 1e-9, "{}", cal.factor());
    }

    fn hits(gpu: u64, cpu: u64, shared: u64, peer: u64) -> crate::scheduling::TierTokens {
        crate::scheduling::TierTokens {
            gpu,
            cpu,
            shared,
            peer,
            ..Default::default()
        }
    }

    #[test]
    fn tier_loads_follow_the_contract_figures() {
        let t = TierCosts::default();
        let us = |gbps| t.seconds_per_token(gbps).unwrap() * 1e6;
        assert!((us(25.0) - 5.243).abs() < 1e-3, "{}", us(25.0));
        assert!((us(10.0) - 13.107).abs() < 1e-3, "{}", us(10.0));
        assert_eq!(t.seconds_per_token(0.0), None);
        // 1,000 prompt tokens: 400 on the GPU, 300 in CPU memory, 200 in the store, 100
        // recomputed; the counts past the prompt are cut.
        let p = t.load_rates().place(1000, &hits(400, 300, 200, 0), 30e-6);
        assert_eq!((p.gpu, p.recompute, p.peer), (400, 100, false));
        let want = 300.0 * 131_072.0 / 25e9 + 200.0 * 131_072.0 / 10e9;
        assert!((p.load_seconds - want).abs() < 1e-12);
        let p = t.load_rates().place(500, &hits(400, 300, 200, 0), 30e-6);
        assert_eq!((p.gpu, p.recompute), (400, 0));
        // An ignored tier is recomputed.
        let no_cpu = TierCosts { cpu_gbps: 0.0, ..t };
        assert_eq!(
            no_cpu
                .load_rates()
                .place(1000, &hits(400, 300, 0, 0), 30e-6)
                .recompute,
            600
        );
    }

    #[test]
    fn a_peer_is_pulled_only_when_loading_beats_recomputing() {
        let t = TierCosts::default();
        let p = t.load_rates().place(1000, &hits(0, 0, 0, 800), 30e-6);
        assert!(p.peer);
        assert_eq!(p.recompute, 200);
        // Recomputing at 10 µs a token beats a 13 µs pull.
        let p = t.load_rates().place(1000, &hits(0, 0, 0, 800), 10e-6);
        assert!(!p.peer);
        assert_eq!((p.recompute, p.load_seconds), (1000, 0.0));
    }

    #[test]
    fn token_estimate() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(4000), 1000);
    }
}
