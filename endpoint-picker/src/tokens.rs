//! The token producer: the prompt's token ids as the engine will compute them, before
//! scheduling, so that the precise prefix index can look the request up by the ids the engines
//! publish in their KV events.
//!
//! Tokenising is CPU work (milliseconds for long prompts), so it never runs on the async
//! threads: [`TokenProducer`] runs a [`PromptTokenizer`] on tokio's blocking pool under a
//! semaphore of `workers` permits, with at most `maxQueued` requests waiting for one and a
//! deadline (`timeout`) covering the wait and the work. A request that finds the queue full or
//! misses its deadline proceeds without ids ([`InferenceRequest::token_ids`] stays `None` and
//! routing falls back to its text-based paths); each such outcome is counted. Work that missed
//! its deadline still holds its permit until it ends, so the pool never grows past `workers`;
//! so a request that gets its worker with less time left than its body could take (at twice
//! the measured speed, or at the slowest rate seen in the last minute), or whose caller has
//! gone by the time a thread takes it, is not started. Work that still runs past its deadline
//! is counted ([`TokenProducer::overrun`], [`TokenObserver::overran`]).
//!
//! The tokenizer itself (a model's `tokenizer.json` and chat template) lives in the `tokenize`
//! crate, outside this one, to keep its dependencies out of the decision core; the binary
//! builds it from [`TokenProducerConfig`] and installs it with
//! [`crate::director::Director::set_token_producer`].
//!
//! [`InferenceRequest::token_ids`]: crate::request::InferenceRequest::token_ids

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::ConfigError;
use crate::config::params::{Params, parse_duration};
use crate::request::Api;

/// Why a tokenizer gave no ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Over the configured cap on bytes tokenised.
    TooLarge,
    /// Not a request it tokenises (a batch of prompts, no chat template, an API without a
    /// prompt).
    Unsupported,
    /// Invalid body, a template error or refusal, a tokenizer error.
    Failed,
}

/// A tokenizer the producer can run: CPU-bound, called on a blocking thread.
pub trait PromptTokenizer: Send + Sync + std::fmt::Debug + 'static {
    /// The ids the engine will compute for a request `body` of `api`.
    fn token_ids(&self, api: Api, body: &[u8]) -> Result<Vec<u32>, Skip>;
}

/// What became of one request's tokenization: the `outcome` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Ids produced.
    Tokenized,
    /// Over the cap on bytes tokenised.
    TooLarge,
    /// Not a request the tokenizer handles.
    Unsupported,
    /// The tokenizer or template failed.
    Failed,
    /// Every worker busy and `maxQueued` requests already waiting.
    QueueFull,
    /// The deadline passed while waiting for a worker or tokenising.
    TimedOut,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 6] = [
        Outcome::Tokenized,
        Outcome::TooLarge,
        Outcome::Unsupported,
        Outcome::Failed,
        Outcome::QueueFull,
        Outcome::TimedOut,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Tokenized => "tokenized",
            Outcome::TooLarge => "too_large",
            Outcome::Unsupported => "unsupported",
            Outcome::Failed => "failed",
            Outcome::QueueFull => "queue_full",
            Outcome::TimedOut => "timed_out",
        }
    }
}

/// Receives each tokenization's outcome (the binary's metrics). Called on the request path:
/// must be cheap.
pub trait TokenObserver: Send + Sync + std::fmt::Debug {
    /// One request's tokenization ended with `outcome` after `took` (queue wait included).
    fn tokenized(&self, outcome: Outcome, took: Duration);

    /// Work whose caller had stopped waiting (its deadline passed) ran `by` past that deadline,
    /// holding a worker no one waited for. Called on a blocking thread.
    fn overran(&self, by: Duration) {
        let _ = by;
    }
}

/// The bounds of the blocking pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Tokenizations running at once (blocking threads used).
    pub workers: usize,
    /// Requests waiting for a worker; more proceed at once without ids.
    pub max_queued: usize,
    /// Deadline of one request's tokenization, wait included.
    pub timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            workers: DEFAULT_WORKERS,
            max_queued: DEFAULT_MAX_QUEUED,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Default `workers`: one thread tokenises a few MB of prompt a second (3–4 MB/s measured with
/// the test tokenizer on a loaded 2-core machine: the tokenize bench), so two keep up with
/// hundreds of 8 KB requests a second; more would take cores from the ext_proc threads.
pub const DEFAULT_WORKERS: usize = 2;
/// Default `maxQueued`.
pub const DEFAULT_MAX_QUEUED: usize = 256;
/// Default `timeout`: an 8 KB prompt tokenises in about 2 ms and a 220 KB one in about 70 ms
/// (the tokenize bench, loaded machine), so the default cap (512 KiB) fits; past 250 ms routing
/// without ids costs less than waiting longer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// Runs a [`PromptTokenizer`] off the async threads, bounded.
#[derive(Debug)]
pub struct TokenProducer {
    name: String,
    tokenizer: Arc<dyn PromptTokenizer>,
    workers: Arc<Semaphore>,
    waiting: AtomicUsize,
    limits: PoolLimits,
    counts: [AtomicU64; 6],
    observer: OnceLock<Arc<dyn TokenObserver>>,
    /// The slowest rate lately seen, for the start check.
    learnt: Arc<parking_lot::Mutex<LearntRate>>,
    /// Microseconds of work that ran past its caller's deadline.
    overrun_micros: Arc<AtomicU64>,
}

/// The slowest tokenizing rate seen lately (bytes a microsecond), from work of at least
/// [`LEARN_FROM_BYTES`]: how fast a prompt tokenises depends on its shape (a repeated `a1!`
/// runs at about 1.4 bytes a microsecond with the test tokenizer, prose at 3–4), so a client
/// can send prompts that take longer than the start check's fixed rate assumes; once such work
/// has been seen, the check assumes its rate for [`LEARNT_RATE_FOR`].
#[derive(Debug, Default)]
struct LearntRate {
    slowest: Option<(f64, Instant)>,
}

impl LearntRate {
    /// The rate the start check assumes at `now`.
    fn assumed(&self, now: Instant) -> f64 {
        match self.slowest {
            Some((rate, seen)) if now.saturating_duration_since(seen) < LEARNT_RATE_FOR => rate
                .clamp(
                    SLOWEST_ASSUMED_BYTES_PER_MICROSECOND,
                    FASTEST_BYTES_PER_MICROSECOND,
                ),
            _ => FASTEST_BYTES_PER_MICROSECOND,
        }
    }

    /// Work of `bytes` took `took`, ending at `now`.
    fn learn(&mut self, bytes: usize, took: Duration, now: Instant) {
        if bytes < LEARN_FROM_BYTES || took.is_zero() {
            return;
        }
        let rate = bytes as f64 / took.as_secs_f64() / 1e6;
        let expired = self
            .slowest
            .is_none_or(|(_, seen)| now.saturating_duration_since(seen) >= LEARNT_RATE_FOR);
        if expired || self.slowest.is_some_and(|(slowest, _)| rate <= slowest) {
            self.slowest = Some((rate, now));
        }
    }
}

/// The slowest rate the start check assumes, whatever it has seen: a quarter of the fixed one.
/// The time learnt from is the wall's, so a job preempted on a busy machine (or shaped to be
/// superlinear) looks slower than any prompt is; one such job a minute must not turn away every
/// long prompt. At this rate the default timeout (250 ms) still starts prompts up to 500,000
/// bytes (488 KiB, less any wait for a worker), against 2 MB at the fixed rate; the repeated `a1!`
/// (about 1.4 bytes a microsecond) can still run past its deadline, by about 40 % at most, and a
/// prompt shaped to tokenise superlinearly by more (not seen with the `tokenizers` crate's BPE:
/// a 512 KiB run of one letter took 134 ms).
const SLOWEST_ASSUMED_BYTES_PER_MICROSECOND: f64 = FASTEST_BYTES_PER_MICROSECOND / 4.0;
/// Smaller work is not learnt from: its time is mostly fixed costs, not the prompt's shape.
const LEARN_FROM_BYTES: usize = 64 * 1024;
/// How long a slow rate seen once is assumed (renewed by every work at least as slow).
const LEARNT_RATE_FOR: Duration = Duration::from_secs(60);

/// Decrements the waiting count when the wait ends, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TokenProducer {
    /// A producer named `name` running `tokenizer` within `limits` (`workers` ≥ 1).
    pub fn new(name: String, tokenizer: Arc<dyn PromptTokenizer>, limits: PoolLimits) -> Self {
        Self {
            name,
            tokenizer,
            workers: Arc::new(Semaphore::new(limits.workers.max(1))),
            waiting: AtomicUsize::new(0),
            limits,
            counts: Default::default(),
            observer: OnceLock::new(),
            learnt: Arc::default(),
            overrun_micros: Arc::default(),
        }
    }

    /// Microseconds of tokenizing that ran past its caller's deadline, so far.
    pub fn overrun(&self) -> Duration {
        Duration::from_micros(self.overrun_micros.load(Ordering::Relaxed))
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool's bounds.
    pub fn limits(&self) -> PoolLimits {
        self.limits
    }

    /// Installs the observer of outcomes; false when one was already installed.
    pub fn set_observer(&self, observer: Arc<dyn TokenObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// How many tokenizations ended with `outcome` so far.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.counts[outcome as usize].load(Ordering::Relaxed)
    }

    /// Whether requests of `api` are tokenised (those whose body carries a prompt).
    pub fn handles(api: Api) -> bool {
        matches!(api, Api::Completions | Api::ChatCompletions)
    }

    /// The ids of `body`, or `None` (counted) when the request must proceed without them.
    pub async fn token_ids(&self, api: Api, body: Bytes) -> Option<Arc<[u32]>> {
        let started = Instant::now();
        let result = if Self::handles(api) {
            self.run(api, body, started + self.limits.timeout).await
        } else {
            Err(Outcome::Unsupported)
        };
        let outcome = match &result {
            Ok(_) => Outcome::Tokenized,
            Err(o) => *o,
        };
        self.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = self.observer.get() {
            observer.tokenized(outcome, started.elapsed());
        }
        if let Err(outcome) = result {
            tracing::debug!(producer = %self.name, outcome = outcome.as_str(), "no token ids");
        }
        result.ok().map(Arc::from)
    }

    async fn run(&self, api: Api, body: Bytes, deadline: Instant) -> Result<Vec<u32>, Outcome> {
        let permit = match self.workers.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.limits.max_queued {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                    return Err(Outcome::QueueFull);
                }
                let _waiting = Waiting(&self.waiting);
                match tokio::time::timeout_at(deadline, self.workers.clone().acquire_owned()).await
                {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed; treat it as a full queue if it were.
                    Ok(Err(_)) => return Err(Outcome::QueueFull),
                    Err(_) => return Err(Outcome::TimedOut),
                }
            }
        };
        // Work started with too little time left would end after its caller gave up, holding a
        // worker the queue needs: under overload nearly every worker would then do work no one
        // waits for. What cannot finish even at twice the measured speed (or at the slowest
        // rate seen lately: `LearntRate`) is not started, and work whose caller has gone by the
        // time a blocking thread takes it does not start.
        let now = Instant::now();
        let rate = self.learnt.lock().assumed(now);
        let least =
            Duration::try_from_secs_f64(body.len() as f64 / rate / 1e6).unwrap_or(Duration::MAX);
        if now.checked_add(least).is_none_or(|end| end >= deadline) {
            return Err(Outcome::TimedOut);
        }
        let gone = Arc::new(AtomicBool::new(false));
        let _caller = CallerGone(gone.clone());
        let tokenizer = self.tokenizer.clone();
        let learnt = self.learnt.clone();
        let overrun = self.overrun_micros.clone();
        let observer = self.observer.get().cloned();
        // The permit moves into the work: released when the work ends, not when the caller
        // stops waiting for it.
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if gone.load(Ordering::Relaxed) {
                return Err(Skip::Failed);
            }
            let started = Instant::now();
            let ids = tokenizer.token_ids(api, &body);
            let ended = Instant::now();
            learnt
                .lock()
                .learn(body.len(), ended.saturating_duration_since(started), ended);
            // Counted only when the caller has stopped waiting: work that ends a timer tick
            // late for a caller still there is not overrun.
            let by = ended.saturating_duration_since(deadline);
            if gone.load(Ordering::Relaxed) && !by.is_zero() {
                let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
                overrun.fetch_add(micros, Ordering::Relaxed);
                if let Some(observer) = observer {
                    observer.overran(by);
                }
            }
            ids
        });
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(Ok(ids))) => Ok(ids),
            Ok(Ok(Err(Skip::TooLarge))) => Err(Outcome::TooLarge),
            Ok(Ok(Err(Skip::Unsupported))) => Err(Outcome::Unsupported),
            // A panic in the tokenizer is caught by the blocking pool: a failure, not a crash.
            Ok(Ok(Err(Skip::Failed))) | Ok(Err(_)) => Err(Outcome::Failed),
            Err(_) => Err(Outcome::TimedOut),
        }
    }
}

/// Twice the bytes a microsecond the local tokenizer was measured to take (about 3.5 at 512
/// KiB, bench `tokenize`): no prompt it must encode tokenises faster, so a job with less time
/// left than its body at this rate is not started. A prompt whose beginning the tokenizer's
/// prefix cache holds runs far faster (a 220 KB one in under a millisecond), but which part of
/// a body the cache holds is known only once the work runs, so the check stays on the side of
/// the prompt that misses: a long prompt that would have been served from the cache is not
/// started with less time left than its full encoding takes.
const FASTEST_BYTES_PER_MICROSECOND: f64 = 8.0;

/// Set when the caller of a tokenization stops waiting (its deadline, or its request gone).
struct CallerGone(Arc<AtomicBool>);

impl Drop for CallerGone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Where a `token-producer` gets its ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// llm-d's default: no tokenizer, no ids; prompt sizes are estimated at about 4 bytes per
    /// token where they are needed (the cost model, in-flight prefill tokens), which is what
    /// happens without a token producer.
    Estimate,
    /// A model's `tokenizer.json` and chat template from local paths (Switchyard's).
    Local(LocalBackend),
}

/// The `local` backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBackend {
    /// `tokenizerPath`: a model directory (`tokenizer.json`, `tokenizer_config.json`) or the
    /// `tokenizer.json` file.
    pub tokenizer_path: PathBuf,
    /// `chatTemplatePath`: a Jinja file replacing the tokenizer's own chat template.
    pub chat_template_path: Option<PathBuf>,
    /// `chatTemplateContentFormat`: how the template is given message content, as the
    /// engine's `--chat-template-content-format` (`auto`, the default, detects it from the
    /// template as vLLM does).
    pub content_format: ContentFormatChoice,
    /// `maxPromptBytes`: the most bytes tokenised for one request (prompt, messages JSON,
    /// rendered chat); larger requests route without ids.
    pub max_prompt_bytes: usize,
    /// `templateFuel`: the work one chat-template render may do (MiniJinja fuel).
    pub template_fuel: u64,
    /// `prefixCacheBytes`: the most bytes of ids kept to reuse for texts that begin as an
    /// earlier one did (the `tokenize` crate's prefix cache); 0 turns it off.
    pub prefix_cache_bytes: usize,
    /// `workers`, `maxQueued`, `timeout`: the blocking pool.
    pub pool: PoolLimits,
}

/// `chatTemplateContentFormat`, vLLM's `--chat-template-content-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentFormatChoice {
    /// Detected from the template (a template that loops over message content gets parts).
    #[default]
    Auto,
    /// Content as one string.
    String,
    /// Content as a list of typed parts.
    OpenAi,
}

/// Default `maxPromptBytes` (512 KiB), as the `tokenize` crate's.
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 512 * 1024;
/// Default `templateFuel`, as the `tokenize` crate's.
pub const DEFAULT_TEMPLATE_FUEL: u64 = 4_000_000;
/// Default `prefixCacheBytes` (32 MiB), as the `tokenize` crate's.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// The largest accepted `prefixCacheBytes` (4 GiB).
const PREFIX_CACHE_BYTES_CAP: u64 = 4 * 1024 * 1024 * 1024;
/// The largest accepted `maxPromptBytes` (64 MiB): above the largest request body the EPP
/// buffers by default.
const MAX_PROMPT_BYTES_CAP: usize = 64 * 1024 * 1024;

/// A configured `token-producer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenProducerConfig {
    /// The instance name.
    pub name: String,
    /// Its backend.
    pub backend: Backend,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenProducerYaml {
    estimate: Option<EstimateYaml>,
    local: Option<LocalYaml>,
    vllm: Option<yaml_serde::Value>,
    model_name: Option<String>,
    uds_tokenizer_config: Option<yaml_serde::Value>,
}

/// llm-d's `estimate` tunes multimodal placeholder counts; here every media part of a prompt
/// is estimated at `cost::MEDIA_PART_TOKENS` (`cost::estimate_json_prompt_tokens`), so it takes
/// no parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EstimateYaml {}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalYaml {
    tokenizer_path: Option<String>,
    chat_template_path: Option<String>,
    chat_template_content_format: Option<String>,
    max_prompt_bytes: Option<i64>,
    template_fuel: Option<i64>,
    prefix_cache_bytes: Option<i64>,
    workers: Option<i64>,
    max_queued: Option<i64>,
    timeout: Option<String>,
}

impl TokenProducerConfig {
    /// Decodes `token-producer` parameters. Unlike most plugins', unknown keys are errors:
    /// a misspelt path would otherwise leave routing silently without ids.
    pub fn from_params(p: &mut Params<'_>) -> Result<Self, ConfigError> {
        let y: TokenProducerYaml = p.decode()?;
        if y.vllm.is_some() || y.model_name.is_some() {
            return Err(p.invalid(
                "vllm",
                "the vllm /render backend (and its modelName) is not implemented here; use \
                 `local` with the model's tokenizer.json, or `estimate`",
            ));
        }
        if y.uds_tokenizer_config.is_some() {
            return Err(p.invalid(
                "udsTokenizerConfig",
                "the UDS tokenizer backend (deprecated in llm-d) is not implemented here; use `local`",
            ));
        }
        let backend = match (y.estimate, y.local) {
            (Some(_), Some(_)) => {
                return Err(p.invalid("local", "only one of `estimate` and `local` may be set"));
            }
            (_, None) => Backend::Estimate,
            (None, Some(l)) => Backend::Local(LocalBackend::from_yaml(p, l)?),
        };
        Ok(Self {
            name: p.name(),
            backend,
        })
    }
}

impl LocalBackend {
    fn from_yaml(p: &Params<'_>, l: LocalYaml) -> Result<Self, ConfigError> {
        let tokenizer_path = l
            .tokenizer_path
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| p.invalid("local.tokenizerPath", "required"))?;
        let max_prompt_bytes = p
            .positive("local.maxPromptBytes", l.max_prompt_bytes)?
            .unwrap_or(DEFAULT_MAX_PROMPT_BYTES);
        if max_prompt_bytes > MAX_PROMPT_BYTES_CAP {
            return Err(p.invalid("local.maxPromptBytes", "at most 67108864 (64 MiB)"));
        }
        let content_format = match l.chat_template_content_format.as_deref() {
            None | Some("auto") => ContentFormatChoice::Auto,
            Some("string") => ContentFormatChoice::String,
            Some("openai") => ContentFormatChoice::OpenAi,
            Some(other) => {
                return Err(p.invalid(
                    "local.chatTemplateContentFormat",
                    format!("{other:?}: one of auto, string, openai (the engine's --chat-template-content-format)"),
                ));
            }
        };
        let template_fuel = p
            .positive("local.templateFuel", l.template_fuel)?
            .map_or(DEFAULT_TEMPLATE_FUEL, |f| f as u64);
        let prefix_cache_bytes = match p
            .non_negative("local.prefixCacheBytes", l.prefix_cache_bytes)?
        {
            None => DEFAULT_PREFIX_CACHE_BYTES,
            Some(b) if b <= PREFIX_CACHE_BYTES_CAP => usize::try_from(b)
                .map_err(|_| p.invalid("local.prefixCacheBytes", "too large for this machine"))?,
            Some(_) => {
                return Err(p.invalid("local.prefixCacheBytes", "at most 4294967296 (4 GiB)"));
            }
        };
        let workers = p
            .positive("local.workers", l.workers)?
            .unwrap_or(DEFAULT_WORKERS);
        if workers > 64 {
            return Err(p.invalid("local.workers", "at most 64"));
        }
        let max_queued = p
            .non_negative("local.maxQueued", l.max_queued)?
            .map_or(DEFAULT_MAX_QUEUED, |q| q as usize);
        let timeout = match l.timeout {
            None => DEFAULT_TIMEOUT,
            Some(t) => match parse_duration(&t) {
                Some(d) if !d.is_zero() && d <= Duration::from_secs(60) => d,
                _ => {
                    return Err(p.invalid(
                        "local.timeout",
                        format!("{t:?}: a duration in (0, 60s], e.g. 100ms"),
                    ));
                }
            },
        };
        Ok(Self {
            tokenizer_path: PathBuf::from(tokenizer_path),
            chat_template_path: l
                .chat_template_path
                .filter(|s| !s.trim().is_empty())
                .map(PathBuf::from),
            content_format,
            max_prompt_bytes,
            template_fuel,
            prefix_cache_bytes,
            pool: PoolLimits {
                workers,
                max_queued,
                timeout,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use parking_lot::Mutex;

    use super::*;

    /// A tokenizer that returns the body's length as one id, after its gate opens.
    #[derive(Debug)]
    struct Gated {
        started: Mutex<mpsc::Sender<()>>,
        open: Mutex<mpsc::Receiver<()>>,
    }

    impl PromptTokenizer for Gated {
        fn token_ids(&self, _api: Api, body: &[u8]) -> Result<Vec<u32>, Skip> {
            let _ = self.started.lock().send(());
            // Blocks this blocking thread until the test opens the gate.
            let _ = self.open.lock().recv();
            Ok(vec![body.len() as u32])
        }
    }

    fn gated(limits: PoolLimits) -> (Arc<TokenProducer>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (started_tx, started_rx) = mpsc::channel();
        let (open_tx, open_rx) = mpsc::channel();
        let tok = Gated {
            started: Mutex::new(started_tx),
            open: Mutex::new(open_rx),
        };
        let producer = TokenProducer::new("tp".into(), Arc::new(tok), limits);
        (Arc::new(producer), started_rx, open_tx)
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_full_queue_proceeds_at_once_without_ids() {
        let (tp, started, open) = gated(PoolLimits {
            workers: 1,
            max_queued: 1,
            timeout: Duration::from_secs(3600),
        });
        // One running (holding the only worker), one waiting.
        let running = tokio::spawn({
            let tp = tp.clone();
            async move {
                tp.token_ids(Api::Completions, Bytes::from_static(b"abc"))
                    .await
            }
        });
        tokio::task::yield_now().await;
        started.recv().unwrap();
        let waiting = tokio::spawn({
            let tp = tp.clone();
            async move {
                tp.token_ids(Api::Completions, Bytes::from_static(b"ab"))
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(tp.waiting.load(Ordering::Relaxed), 1);
        // The third finds the queue full.
        assert_eq!(tp.token_ids(Api::Completions, Bytes::new()).await, None);
        assert_eq!(tp.count(Outcome::QueueFull), 1);
        // Opening the gate twice lets both finish, in order.
        open.send(()).unwrap();
        open.send(()).unwrap();
        assert_eq!(running.await.unwrap().as_deref(), Some(&[3][..]));
        assert_eq!(waiting.await.unwrap().as_deref(), Some(&[2][..]));
        assert_eq!(tp.count(Outcome::Tokenized), 2);
        assert_eq!(tp.waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_deadline_bounds_the_wait_and_the_work_keeps_its_worker() {
        // Paused time does not advance by itself while blocking work runs: the test moves it.
        let (tp, started, open) = gated(PoolLimits {
            workers: 1,
            max_queued: 8,
            timeout: Duration::from_millis(100),
        });
        let call = |api| {
            let tp = tp.clone();
            tokio::spawn(async move { tp.token_ids(api, Bytes::new()).await })
        };
        // The work does not finish before the deadline.
        let stuck = call(Api::ChatCompletions);
        tokio::task::yield_now().await;
        started.recv().unwrap();
        tokio::time::advance(Duration::from_millis(101)).await;
        assert_eq!(stuck.await.unwrap(), None);
        assert_eq!(tp.count(Outcome::TimedOut), 1);
        // Its worker is still held: the next request waits for it, then times out too.
        assert_eq!(tp.workers.available_permits(), 0);
        let queued = call(Api::Completions);
        tokio::task::yield_now().await;
        assert_eq!(tp.waiting.load(Ordering::Relaxed), 1);
        tokio::time::advance(Duration::from_millis(101)).await;
        assert_eq!(queued.await.unwrap(), None);
        assert_eq!(tp.count(Outcome::TimedOut), 2);
        assert_eq!(tp.waiting.load(Ordering::Relaxed), 0);
        // Once the stuck work ends, its worker is free again; the time it ran past its
        // caller's deadline is counted.
        assert_eq!(tp.overrun(), Duration::ZERO);
        open.send(()).unwrap();
        drop(tp.workers.acquire().await.unwrap());
        assert_eq!(tp.overrun(), Duration::from_millis(102));
        open.send(()).unwrap();
        assert!(
            tp.token_ids(Api::Completions, Bytes::from_static(b"x"))
                .await
                .is_some()
        );
        // A request that gets its worker with less time left than its body could take is not
        // started: the worker is free again at once.
        while started.try_recv().is_ok() {}
        let stuck = call(Api::Completions);
        tokio::task::yield_now().await;
        started.recv().unwrap();
        let late = {
            let tp = tp.clone();
            tokio::spawn(async move {
                tp.token_ids(Api::Completions, Bytes::from(vec![b'x'; 100_000]))
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(tp.waiting.load(Ordering::Relaxed), 1);
        tokio::time::advance(Duration::from_millis(95)).await;
        open.send(()).unwrap();
        assert!(stuck.await.unwrap().is_some());
        assert_eq!(late.await.unwrap(), None, "5 ms left for 100 KB");
        assert_eq!(tp.count(Outcome::TimedOut), 3);
        assert!(started.try_recv().is_err(), "never started");
        assert_eq!(tp.workers.available_permits(), 1);
        // APIs without a prompt are not tokenised at all.
        assert_eq!(tp.token_ids(Api::Embeddings, Bytes::new()).await, None);
        assert_eq!(tp.count(Outcome::Unsupported), 1);
    }

    /// Review 10 (T3): a prompt's shape can make it tokenise several times slower than the
    /// start check's fixed rate assumes (a repeated `a1!`), so a client could have the workers
    /// run work past every deadline. Once work that slow has been seen, the check assumes its
    /// rate for a minute, but never less than a quarter of the fixed rate (review 11: a single
    /// job's wall time must not turn away every long prompt): longer prompts are not started,
    /// and a prompt that fits still is.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn slow_work_teaches_the_start_check_its_rate_for_a_minute() {
        let limits = PoolLimits {
            workers: 1,
            max_queued: 8,
            timeout: Duration::from_millis(250),
        };
        let (tp, started, open) = gated(limits);
        let call = |tp: &Arc<TokenProducer>, bytes: usize| {
            let tp = tp.clone();
            tokio::spawn(async move {
                tp.token_ids(Api::Completions, Bytes::from(vec![b'x'; bytes]))
                    .await
            })
        };
        // Fresh, 600 KB is started (75 ms at the fixed rate); let it finish at once.
        let first = call(&tp, 600_000);
        tokio::task::yield_now().await;
        started.recv().unwrap();
        open.send(()).unwrap();
        assert!(first.await.unwrap().is_some());
        // 200 KB that takes 200 ms: one byte a microsecond, assumed at the floor of two.
        let slow = call(&tp, 200_000);
        tokio::task::yield_now().await;
        started.recv().unwrap();
        tokio::time::advance(Duration::from_millis(200)).await;
        open.send(()).unwrap();
        assert!(slow.await.unwrap().is_some());
        // 600 KB would now take 300 ms of a 250 ms budget: not started.
        assert_eq!(call(&tp, 600_000).await.unwrap(), None);
        assert!(started.try_recv().is_err(), "not started");
        assert_eq!(tp.count(Outcome::TimedOut), 1);
        // 400 KB fits at the floor (200 ms; 400 ms at the rate seen) and is started.
        let fits = call(&tp, 400_000);
        tokio::task::yield_now().await;
        started.recv().unwrap();
        open.send(()).unwrap();
        assert!(fits.await.unwrap().is_some());
        // A minute later the fixed rate is back.
        tokio::time::advance(Duration::from_secs(61)).await;
        let again = call(&tp, 600_000);
        tokio::task::yield_now().await;
        started.recv().unwrap();
        open.send(()).unwrap();
        assert!(again.await.unwrap().is_some());
        assert_eq!(tp.overrun(), Duration::ZERO, "nothing ran past a deadline");
    }
}
