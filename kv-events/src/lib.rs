//! vLLM's KV-cache events, as the engines publish them (`--kv-events-config`).
//!
//! An engine reports every block that enters or leaves its prefix cache: `BlockStored` (the
//! block's hash, its parent's, its token ids, the tier it lives in), `BlockRemoved` and
//! `AllBlocksCleared`, in batches (`KVEventBatch`) sent as msgpack over ZMQ PUB. This crate holds
//! the types both sides share: the simulator publishes them, the EPP's precise prefix index
//! applies them. They are the decoded, bounded form of the wire format, not the format itself:
//! block hashes are folded to 64 bits as llm-d folds them (the low 8 bytes, big-endian, of a
//! byte digest), and the medium is one of a closed set.
//!
//! Wire format reference: `../shared/reference/llmd.md` §2 (vLLM `vllm/distributed/kv_events.py`).

#![warn(missing_docs)]

pub mod codec;
pub mod config;
pub mod endpoint;
pub mod topic;
#[cfg(feature = "zmq")]
pub mod transport;

pub use codec::{
    DecodeError, EncodeError, Encoder, Encoding, HashEncoding, Skipped, decode_batch,
    decode_batch_lenient,
};
pub use config::{ConfigError, KvEventsConfig, PublisherKind};
pub use endpoint::{EndpointError, TcpEndpoint, TcpHost};
pub use topic::{Topic, TopicError};

/// Most characters of one untrusted string written to a log line or an error message.
pub const MAX_LOGGED_CHARS: usize = 128;

/// A string from outside (an engine's topic, event tag or medium here; a client's model name or
/// field in `ext-proc`, which re-exports this as `untrusted::Untrusted`), displayed with every
/// control character, quote and backslash escaped (`char::escape_debug`, the same in every log
/// format), at most [`MAX_LOGGED_CHARS`] characters, then how much was left out. A value
/// holding a newline and ESC bytes would otherwise write a forged line into a console log.
/// Here, the lowest crate both use, so that there is one escaper.
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == MAX_LOGGED_CHARS {
                return write!(f, "…(+{} bytes)", self.0.len() - i);
            }
            write!(f, "{}", c.escape_debug())?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A block's hash as the engine computed it, folded to 64 bits.
pub type EngineBlockHash = u64;

/// One message's payload: the events of one or more engine steps.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// When the batch was made (seconds since the Unix epoch, as the engine's clock says).
    pub ts: f64,
    /// The events, in the order the engine made them.
    pub events: Vec<Event>,
    /// The data-parallel rank that produced the batch, when the engine runs several.
    pub data_parallel_rank: Option<i64>,
}

impl EventBatch {
    /// The memory the decoded batch holds, about (its vectors' lengths; what a queue of
    /// batches is charged).
    pub fn approx_bytes(&self) -> usize {
        let events: usize = self
            .events
            .iter()
            .map(|e| match e {
                Event::BlockStored(ev) => {
                    ev.block_hashes.len() * std::mem::size_of::<EngineBlockHash>()
                        + ev.token_ids.len() * std::mem::size_of::<u32>()
                        + ev.lora_name.as_ref().map_or(0, String::len)
                }
                Event::BlockRemoved(ev) => {
                    ev.block_hashes.len() * std::mem::size_of::<EngineBlockHash>()
                }
                Event::AllBlocksCleared => 0,
            })
            .sum();
        events + self.events.len() * std::mem::size_of::<Event>()
    }
}

/// A change of an engine's prefix cache.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Full blocks entered a tier of the cache.
    BlockStored(BlockStored),
    /// Blocks left a tier of the cache.
    BlockRemoved(BlockRemoved),
    /// The engine dropped everything it had cached (e.g. on a reset or a weight reload).
    AllBlocksCleared,
}

/// `BlockStored`: a run of consecutive full blocks of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    /// The blocks' hashes, first to last.
    pub block_hashes: Vec<EngineBlockHash>,
    /// The hash of the block before the first one (`None` at the start of a sequence).
    pub parent_block_hash: Option<EngineBlockHash>,
    /// The tokens of all the blocks, `block_size` per block. vLLM's CPU offloading stores
    /// blocks it already announced for the GPU with no tokens.
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u32,
    /// The LoRA adapter's integer id, when the blocks belong to one.
    pub lora_id: Option<i64>,
    /// The LoRA adapter's name (newer vLLM), when the blocks belong to one.
    pub lora_name: Option<String>,
    /// Where the blocks live.
    pub medium: Medium,
    /// The KV-cache group the blocks were stored in, for models whose layers keep different
    /// caches (`None`: the engine does not say, one cache for every layer).
    pub group: Option<CacheGroup>,
}

/// `BlockRemoved`: blocks evicted from a tier.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    /// The evicted blocks' hashes.
    pub block_hashes: Vec<EngineBlockHash>,
    /// The tier they left.
    pub medium: Medium,
    /// The KV-cache group they left (vLLM's `group_idx`; `None`: not said, every group).
    pub group_idx: Option<i64>,
}

/// The KV-cache group of a `BlockStored` (vLLM's `group_idx` and `kv_cache_spec_kind`). A
/// hybrid model (sliding-window or Mamba layers beside full attention: gpt-oss, Gemma 3) keeps
/// a cache per group and announces every group's blocks under the same hashes: a sliding
/// window's evictions leave the full-attention blocks, which prefix matching reads, in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheGroup {
    /// `group_idx`.
    pub index: i64,
    /// `kv_cache_spec_kind` (`None`: not said).
    pub kind: Option<CacheKind>,
}

/// `kv_cache_spec_kind`: what the layers of a KV-cache group keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheKind {
    /// `full_attention`: every token's keys and values.
    FullAttention,
    /// `mla_attention`: full attention, latent-compressed.
    MlaAttention,
    /// `sink_full_attention`: full attention with attention sinks.
    SinkFullAttention,
    /// `sliding_window`: the last tokens of a window only.
    SlidingWindow,
    /// Any other kind (Mamba state, chunked local attention, …).
    Other,
}

impl CacheKind {
    /// The wire name (`Other` writes `other`).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheKind::FullAttention => "full_attention",
            CacheKind::MlaAttention => "mla_attention",
            CacheKind::SinkFullAttention => "sink_full_attention",
            CacheKind::SlidingWindow => "sliding_window",
            CacheKind::Other => "other",
        }
    }

    /// Parses a wire name (case-insensitively); any name not listed is `Other`.
    pub fn parse(name: &str) -> CacheKind {
        [
            CacheKind::FullAttention,
            CacheKind::MlaAttention,
            CacheKind::SinkFullAttention,
            CacheKind::SlidingWindow,
        ]
        .into_iter()
        .find(|k| k.as_str().eq_ignore_ascii_case(name))
        .unwrap_or(CacheKind::Other)
    }

    /// Whether the group keeps every token of a prefix, so that its blocks say what a prompt
    /// would find cached (llm-d indexes these three kinds only).
    pub fn keeps_prefixes(self) -> bool {
        matches!(
            self,
            CacheKind::FullAttention | CacheKind::MlaAttention | CacheKind::SinkFullAttention
        )
    }
}

/// The tier of a cached block. vLLM says `GPU` (the default when absent) or `CPU` (its CPU
/// offloading); LMCache-style stores add local disk and a remote, shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Medium {
    /// The engine's GPU memory: a hit costs nothing.
    #[default]
    Gpu,
    /// The replica's CPU memory: a hit costs a host-to-device copy.
    Cpu,
    /// The replica's local disk.
    Disk,
    /// A store shared by the replicas (or a peer's memory), reached over the network.
    Remote,
}

impl Medium {
    /// The wire name (as vLLM writes `GPU` and `CPU`).
    pub fn as_str(self) -> &'static str {
        match self {
            Medium::Gpu => "GPU",
            Medium::Cpu => "CPU",
            Medium::Disk => "DISK",
            Medium::Remote => "REMOTE",
        }
    }

    /// Parses a wire name, case-insensitively; `None` for a name this crate does not know.
    pub fn parse(name: &str) -> Option<Medium> {
        [Medium::Gpu, Medium::Cpu, Medium::Disk, Medium::Remote]
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_parse_case_insensitively_and_round_trip() {
        for m in [Medium::Gpu, Medium::Cpu, Medium::Disk, Medium::Remote] {
            assert_eq!(Medium::parse(m.as_str()), Some(m));
            assert_eq!(Medium::parse(&m.as_str().to_lowercase()), Some(m));
        }
        assert_eq!(Medium::parse("tape"), None);
    }
}

#[cfg(test)]
mod untrusted_tests {
    use super::*;

    #[test]
    fn peer_strings_are_escaped_and_truncated() {
        let forged = "kv@p@m\n2026-01-01T00:00:00Z  INFO forged\x1b[31m\\";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(
            shown,
            "kv@p@m\\n2026-01-01T00:00:00Z  INFO forged\\u{1b}[31m\\\\"
        );
        assert_eq!(format!("{:?}", Untrusted("a\"b")), "\"a\\\"b\"");
        let long = "\r".repeat(300);
        let shown = Untrusted(&long).to_string();
        assert_eq!(
            shown,
            format!("{}…(+172 bytes)", "\\r".repeat(MAX_LOGGED_CHARS))
        );
    }
}
