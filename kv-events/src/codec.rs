//! The msgpack form of a [`EventBatch`], as vLLM's `msgspec` writes it, both ways.
//!
//! vLLM defines its events as `msgspec` structs (`vllm/distributed/kv_events.py`) with
//! `omit_defaults=True` and `tag=True` (the tag is the class name). Two encodings exist:
//!
//! - **arrays** (vLLM up to 0.23, `array_like=True`): every event is a positional array,
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//!   lora_name, …]`. msgspec writes every field of an `array_like` struct (`omit_defaults` does
//!   not apply: a `None` is a nil), but older releases had fewer fields (0.9: up to
//!   `block_size`) and other encoders stop early, so every field after `block_size` is
//!   optional (length guards).
//! - **maps** (vLLM 0.24 and later, PR #42892 dropped `array_like`): every event is a map keyed
//!   by field name, the tag under `"type"`.
//!
//! The batch (`KVEventBatch`) is `[ts, events, data_parallel_rank]` in both (0.26 still sends
//! it positionally); a map batch (`{"ts", "events", "data_parallel_rank"}`, what a `msgspec`
//! struct without `array_like` gives, and vLLM's main branch declares) decodes too.
//!
//! Block hashes are vLLM's `ExternalBlockHash = bytes | int`: an unsigned int (the low 64 bits,
//! `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`), a negative int (Python's builtin `hash()` of older
//! releases, taken as its two's complement) or a byte digest (folded as llm-d folds it: the last
//! 8 bytes, big-endian; shorter digests are zero-padded on the left).
//!
//! ## Hostile input
//!
//! A payload comes from the network, so the decoder trusts nothing in it:
//! - every length is checked against the bytes left before anything is read, and a container
//!   never reserves more than the bytes left could hold (one byte per element at least), so a
//!   length header alone allocates nothing;
//! - the caps below bound what one batch can make ([`MAX_EVENTS_PER_BATCH`],
//!   [`MAX_HASHES_PER_EVENT`], [`MAX_TOKEN_IDS_PER_EVENT`], [`MAX_STRING_BYTES`],
//!   [`MAX_HASH_BYTES`]);
//! - unknown fields (map keys, trailing positional fields of newer releases such as
//!   `extra_keys` or `group_idx`) are skipped without recursion, so nesting depth costs no stack;
//! - a value of the wrong type, a missing field, a field given twice, bytes after the batch: a
//!   [`DecodeError`] for the whole batch (as `msgspec` itself refuses it), never a guess.
//!
//! ## Strict and lenient
//!
//! [`decode_batch`] is the wire format as this crate models it: an unknown event tag or medium
//! fails the whole batch too, and `extra_keys` is skipped as any field it does not model.
//! [`decode_batch_lenient`] is what a consumer that indexes the events reads (the transport's
//! subscriber): one event it cannot use is left out and counted ([`Skipped`]), not the batch
//! (for the EPP a batch that does not decode is a lost one, and a lost one clears the engine's
//! whole index: one event of a new kind, or of a tier added later, would do so with every batch).
//! It accepts whatever [`decode_batch`] accepts:
//! - an event whose tag is unknown (a type of a later release, another engine's) is skipped;
//! - a `BlockStored` or `BlockRemoved` in an unknown medium is skipped (media compare
//!   case-insensitively, as llm-d's). Its cost is unknown, and counting it as the GPU would
//!   overstate what the engine holds; its `BlockRemoved` is skipped as its `BlockStored` was;
//! - `BlockStored.extra_keys` (vLLM PR #33304 on, one entry per block: the LoRA adapter's name,
//!   then multimodal identifiers, the request's `cache_salt` on its first block, prompt-embedding
//!   hashes; `vllm/v1/core/kv_cache_utils.py`, `generate_block_hash_extra_keys`) is read as far as
//!   needed: a block whose hash depends on more than its tokens and its adapter cannot be named by
//!   request keys, which hash tokens only. Indexing it under the plain key of its tokens would make
//!   it match requests the engine cannot serve from it (an unsalted request, or another image with
//!   the same placeholder tokens), so the event is cut before the first such block, and the blocks
//!   after it (chained from it) go too. An entry that is nil, empty, or only the event's own
//!   `lora_name` (by which the index already roots adapter chains) keeps its block. Cut, not folded
//!   into the keys as the request side folds `cache_salt`: that would need the keys carried on
//!   [`BlockStored`], which this crate's users build by the field; so the precise scorer does not
//!   look salted requests up either (they score from the approximate index). vLLM before
//!   `extra_keys` sends none, and its salted blocks are indexed under their tokens' keys as before.

use std::fmt;

use rmp::Marker;
use rmp::encode::ByteBuf;

use crate::{
    BlockRemoved, BlockStored, CacheGroup, CacheKind, EngineBlockHash, Event, EventBatch, Medium,
};

/// Events in one batch, at most. vLLM sends a batch per engine step: a step that stores or
/// evicts blocks for a few hundred sequences makes a few thousand events.
pub const MAX_EVENTS_PER_BATCH: usize = 16_384;
/// Block hashes in one event, at most: 65,536 blocks of 16 tokens are a 1M-token sequence.
pub const MAX_HASHES_PER_EVENT: usize = 65_536;
/// Token ids in one `BlockStored`, at most (65,536 blocks of 16 tokens).
pub const MAX_TOKEN_IDS_PER_EVENT: usize = 1 << 20;
/// Bytes in one string (tags, field names, media, LoRA names), at most.
pub const MAX_STRING_BYTES: usize = 1_024;
/// Bytes in one block-hash digest, at most (vLLM's are 32: SHA-256).
pub const MAX_HASH_BYTES: usize = 64;

/// Why a payload is not a `KVEventBatch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ends inside a value.
    #[error("the payload ends inside a value (at byte {at})")]
    Truncated {
        /// Offset where more bytes were needed.
        at: usize,
    },
    /// Bytes follow the batch.
    #[error("{trailing} bytes after the batch")]
    TrailingBytes {
        /// How many.
        trailing: usize,
    },
    /// A value of the wrong msgpack type.
    #[error("{what}: expected {expected}, found msgpack marker {marker:#04x}")]
    UnexpectedType {
        /// The field.
        what: &'static str,
        /// What the field must be.
        expected: &'static str,
        /// The marker byte found.
        marker: u8,
    },
    /// A container or string longer than its cap.
    #[error("{what}: {len} exceeds the cap of {cap}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// The length found.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// A required field is absent.
    #[error("{what} is missing")]
    Missing {
        /// The field.
        what: &'static str,
    },
    /// A map gives a field twice.
    #[error("{what} is given twice")]
    Duplicate {
        /// The field.
        what: &'static str,
    },
    /// An integer outside the field's range.
    #[error("{what}: {value} is out of range")]
    OutOfRange {
        /// The field.
        what: &'static str,
        /// The value found.
        value: i128,
    },
    /// A string that is not UTF-8.
    #[error("{what} is not UTF-8")]
    InvalidUtf8 {
        /// The field.
        what: &'static str,
    },
    /// An empty byte string where a block hash was expected.
    #[error("{what}: an empty byte string is not a block hash")]
    EmptyHash {
        /// The field.
        what: &'static str,
    },
    /// An event tag this crate does not know (escaped, at most
    /// [`MAX_LOGGED_CHARS`](crate::MAX_LOGGED_CHARS) characters of it: [`crate::Untrusted`]).
    #[error("unknown event type \"{0}\"")]
    UnknownEventType(String),
    /// A medium this crate does not know (escaped and truncated as an event tag).
    #[error("unknown medium \"{0}\"")]
    UnknownMedium(String),
}

/// Why a batch cannot be encoded: it exceeds what [`decode_batch`] accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A list or string longer than the decoder's cap.
    #[error("{what}: {len} exceeds the cap of {cap}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        cap: usize,
    },
}

/// The shape of the events in a batch (the batch itself is a positional array in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Positional arrays (`array_like=True`): vLLM up to 0.23.
    Array,
    /// Maps keyed by field name, the tag under `"type"`: vLLM 0.24 and later.
    #[default]
    Map,
}

impl Encoding {
    /// `array` or `map`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Array => "array",
            Encoding::Map => "map",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "array" => Ok(Encoding::Array),
            "map" => Ok(Encoding::Map),
            other => Err(format!("unknown encoding {other:?} (array or map)")),
        }
    }
}

/// How block hashes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashEncoding {
    /// Unsigned ints (vLLM's `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`).
    #[default]
    Int,
    /// 8-byte big-endian byte strings (the shape of vLLM's digests, folded to 64 bits).
    Bytes,
}

/// Writes batches as vLLM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Encoder {
    /// The events' shape.
    pub encoding: Encoding,
    /// The hashes' form.
    pub hashes: HashEncoding,
}

// === impl Encoder ===

impl Encoder {
    /// An encoder for `encoding`, hashes as ints.
    pub fn new(encoding: Encoding) -> Self {
        Self {
            encoding,
            hashes: HashEncoding::Int,
        }
    }

    /// The msgpack payload of `batch`, byte for byte what `msgspec` writes for vLLM's structs
    /// holding the same values, the fields this crate does not model (`extra_keys`,
    /// `group_idx`, `kv_cache_spec_*`) being `None`: fields in declaration order; positional
    /// structs write every field (msgspec's `omit_defaults` does not apply to `array_like`
    /// structs: a `None` is a nil), maps leave out the fields at their default.
    pub fn encode(&self, batch: &EventBatch) -> Result<Vec<u8>, EncodeError> {
        check_caps(batch)?;
        let mut w = Writer(ByteBuf::with_capacity(encoded_size_hint(batch)));
        // The batch is positional in both encodings: [ts, events, data_parallel_rank].
        w.array_len(3);
        w.f64(batch.ts);
        w.array_len(batch.events.len());
        for event in &batch.events {
            self.event(&mut w, event);
        }
        match batch.data_parallel_rank {
            Some(rank) => w.sint(rank),
            None => w.nil(),
        }
        Ok(w.0.into_vec())
    }

    fn event(&self, w: &mut Writer, event: &Event) {
        let map = self.encoding == Encoding::Map;
        match event {
            Event::BlockStored(b) => {
                // type, block_hashes, parent_block_hash, token_ids, block_size, lora_id,
                // medium, lora_name: the fields without a default, always written; then
                // extra_keys (None here), group_idx, kv_cache_spec_kind (from `group`),
                // kv_cache_spec_sliding_window (None here): a None is a nil in an array and
                // left out of a map.
                let group = b.group.map(|g| g.index);
                let kind = b.group.and_then(|g| g.kind);
                let given = 8 + usize::from(group.is_some()) + usize::from(kind.is_some());
                w.container(map, if map { given } else { 12 });
                w.field(map, "type");
                w.str("BlockStored");
                w.field(map, "block_hashes");
                self.hashes(w, &b.block_hashes);
                w.field(map, "parent_block_hash");
                match b.parent_block_hash {
                    Some(h) => self.hash(w, h),
                    None => w.nil(),
                }
                w.field(map, "token_ids");
                w.array_len(b.token_ids.len());
                for &t in &b.token_ids {
                    w.uint(u64::from(t));
                }
                w.field(map, "block_size");
                w.uint(u64::from(b.block_size));
                w.field(map, "lora_id");
                match b.lora_id {
                    Some(id) => w.sint(id),
                    None => w.nil(),
                }
                w.field(map, "medium");
                w.str(b.medium.as_str());
                w.field(map, "lora_name");
                match &b.lora_name {
                    Some(name) => w.str(name),
                    None => w.nil(),
                }
                if !map {
                    w.nil();
                }
                if group.is_some() || !map {
                    w.field(map, "group_idx");
                    match group {
                        Some(index) => w.sint(index),
                        None => w.nil(),
                    }
                }
                if kind.is_some() || !map {
                    w.field(map, "kv_cache_spec_kind");
                    match kind {
                        Some(kind) => w.str(kind.as_str()),
                        None => w.nil(),
                    }
                }
                if !map {
                    w.nil();
                }
            }
            Event::BlockRemoved(b) => {
                // type, block_hashes, medium; then group_idx.
                let given = 3 + usize::from(b.group_idx.is_some());
                w.container(map, if map { given } else { 4 });
                w.field(map, "type");
                w.str("BlockRemoved");
                w.field(map, "block_hashes");
                self.hashes(w, &b.block_hashes);
                w.field(map, "medium");
                w.str(b.medium.as_str());
                if b.group_idx.is_some() || !map {
                    w.field(map, "group_idx");
                    match b.group_idx {
                        Some(index) => w.sint(index),
                        None => w.nil(),
                    }
                }
            }
            Event::AllBlocksCleared => {
                w.container(map, 1);
                w.field(map, "type");
                w.str("AllBlocksCleared");
            }
        }
    }

    fn hashes(&self, w: &mut Writer, hashes: &[EngineBlockHash]) {
        w.array_len(hashes.len());
        for &h in hashes {
            self.hash(w, h);
        }
    }

    fn hash(&self, w: &mut Writer, hash: EngineBlockHash) {
        match self.hashes {
            HashEncoding::Int => w.uint(hash),
            HashEncoding::Bytes => w.bin(&hash.to_be_bytes()),
        }
    }
}

/// The encoder refuses what the decoder would refuse, so a batch always survives a round trip.
fn check_caps(batch: &EventBatch) -> Result<(), EncodeError> {
    let cap = |what, len, cap| {
        if len > cap {
            Err(EncodeError::TooLong { what, len, cap })
        } else {
            Ok(())
        }
    };
    cap("events", batch.events.len(), MAX_EVENTS_PER_BATCH)?;
    for event in &batch.events {
        match event {
            Event::BlockStored(b) => {
                cap("block_hashes", b.block_hashes.len(), MAX_HASHES_PER_EVENT)?;
                cap("token_ids", b.token_ids.len(), MAX_TOKEN_IDS_PER_EVENT)?;
                if let Some(name) = &b.lora_name {
                    cap("lora_name", name.len(), MAX_STRING_BYTES)?;
                }
            }
            Event::BlockRemoved(b) => {
                cap("block_hashes", b.block_hashes.len(), MAX_HASHES_PER_EVENT)?;
            }
            Event::AllBlocksCleared => {}
        }
    }
    Ok(())
}

/// A close upper bound of the payload size, so the buffer grows once at most.
fn encoded_size_hint(batch: &EventBatch) -> usize {
    let per_event: usize = batch
        .events
        .iter()
        .map(|e| match e {
            Event::BlockStored(b) => {
                150 + 9 * b.block_hashes.len()
                    + 5 * b.token_ids.len()
                    + b.lora_name.as_ref().map_or(0, String::len)
            }
            Event::BlockRemoved(b) => 40 + 9 * b.block_hashes.len(),
            Event::AllBlocksCleared => 24,
        })
        .sum();
    24 + per_event
}

/// rmp's writers into a growable buffer, whose writes cannot fail.
struct Writer(ByteBuf);

// The results below are `Result<_, ValueWriteError<Infallible>>`: a `ByteBuf` write cannot
// fail, so there is nothing to handle.
impl Writer {
    fn array_len(&mut self, len: usize) {
        // Lengths are within the caps (check_caps), far below u32::MAX.
        let _ = rmp::encode::write_array_len(&mut self.0, len_u32(len));
    }
    fn map_len(&mut self, len: usize) {
        let _ = rmp::encode::write_map_len(&mut self.0, len_u32(len));
    }
    fn container(&mut self, map: bool, fields: usize) {
        if map {
            self.map_len(fields);
        } else {
            self.array_len(fields);
        }
    }
    /// A map key (maps only: positional arrays have none).
    fn field(&mut self, map: bool, name: &str) {
        if map {
            self.str(name);
        }
    }
    fn str(&mut self, s: &str) {
        let _ = rmp::encode::write_str(&mut self.0, s);
    }
    fn bin(&mut self, b: &[u8]) {
        let _ = rmp::encode::write_bin(&mut self.0, b);
    }
    fn uint(&mut self, v: u64) {
        let _ = rmp::encode::write_uint(&mut self.0, v);
    }
    /// msgspec writes non-negative ints as msgpack uints, negative ones as ints.
    fn sint(&mut self, v: i64) {
        match u64::try_from(v) {
            Ok(u) => self.uint(u),
            Err(_) => {
                let _ = rmp::encode::write_sint(&mut self.0, v);
            }
        }
    }
    fn f64(&mut self, v: f64) {
        let _ = rmp::encode::write_f64(&mut self.0, v);
    }
    fn nil(&mut self) {
        let _ = rmp::encode::write_nil(&mut self.0);
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// What [`decode_batch_lenient`] left out of a batch, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Events whose tag this crate does not know.
    pub unknown_type: u32,
    /// `BlockStored` and `BlockRemoved` events in a medium this crate does not know.
    pub unknown_medium: u32,
    /// Blocks cut from `BlockStored` events because their hash has extra keys (see the
    /// module's documentation): blocks, not events.
    pub extra_keys: u32,
}

impl Skipped {
    /// Whether nothing was left out.
    pub fn is_empty(&self) -> bool {
        *self == Skipped::default()
    }

    /// Events left out whole (unknown type or medium).
    pub fn events(&self) -> u32 {
        self.unknown_type.saturating_add(self.unknown_medium)
    }
}

/// How much the decoder lets through (see the module's documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strict,
    Lenient,
}

/// The decoder's mode and what it skipped so far.
struct Ctx {
    mode: Mode,
    skipped: Skipped,
}

/// Decodes one payload (the third frame of a vLLM KV-event message), in either encoding;
/// strict: an unknown event tag or medium fails the batch.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    decode(payload, Mode::Strict).map(|(batch, _)| batch)
}

/// Decodes one payload as [`decode_batch`] does, but leaves out (and counts) the events an
/// index cannot use instead of failing the batch: unknown event tags and media, and the blocks
/// whose hash has extra keys (see the module's documentation). Every payload
/// [`decode_batch`] accepts, it accepts; the bounds are the same.
pub fn decode_batch_lenient(payload: &[u8]) -> Result<(EventBatch, Skipped), DecodeError> {
    decode(payload, Mode::Lenient)
}

fn decode(payload: &[u8], mode: Mode) -> Result<(EventBatch, Skipped), DecodeError> {
    let mut ctx = Ctx {
        mode,
        skipped: Skipped::default(),
    };
    let ctx = &mut ctx;
    let mut r = Reader::new(payload);
    let batch = match r.container("KVEventBatch")? {
        Container::Array(n) => {
            if n < 2 {
                return Err(DecodeError::Missing { what: "events" });
            }
            let ts = r.f64("ts")?;
            let events = decode_events(&mut r, ctx)?;
            let data_parallel_rank = if n >= 3 {
                r.opt_i64("data_parallel_rank")?
            } else {
                None
            };
            r.skip_values(n.saturating_sub(3))?;
            EventBatch {
                ts,
                events,
                data_parallel_rank,
            }
        }
        Container::Map(n) => {
            let (mut ts, mut events, mut rank) = (None, None, None);
            for _ in 0..n {
                match r.str("KVEventBatch field", MAX_STRING_BYTES)? {
                    "ts" => set_once(&mut ts, "ts", r.f64("ts")?)?,
                    "events" => set_once(&mut events, "events", decode_events(&mut r, ctx)?)?,
                    "data_parallel_rank" => set_once(
                        &mut rank,
                        "data_parallel_rank",
                        r.opt_i64("data_parallel_rank")?,
                    )?,
                    _ => r.skip_values(1)?,
                }
            }
            EventBatch {
                ts: ts.ok_or(DecodeError::Missing { what: "ts" })?,
                events: events.ok_or(DecodeError::Missing { what: "events" })?,
                data_parallel_rank: rank.flatten(),
            }
        }
    };
    if r.remaining() > 0 {
        return Err(DecodeError::TrailingBytes {
            trailing: r.remaining(),
        });
    }
    Ok((batch, ctx.skipped))
}

fn set_once<T>(slot: &mut Option<T>, what: &'static str, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Duplicate { what });
    }
    *slot = Some(value);
    Ok(())
}

fn decode_events(r: &mut Reader<'_>, ctx: &mut Ctx) -> Result<Vec<Event>, DecodeError> {
    let n = r.array_len("events", MAX_EVENTS_PER_BATCH)?;
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        if let Some(event) = decode_event(r, ctx)? {
            events.push(event);
        }
    }
    Ok(events)
}

/// The event kinds, by their tag.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stored,
    Removed,
    Cleared,
}

/// The kind of `tag`: `None` for a tag this crate does not know, which only a strict decoder
/// refuses.
fn kind(tag: &str, mode: Mode) -> Result<Option<Kind>, DecodeError> {
    match tag {
        "BlockStored" => Ok(Some(Kind::Stored)),
        "BlockRemoved" => Ok(Some(Kind::Removed)),
        "AllBlocksCleared" => Ok(Some(Kind::Cleared)),
        other if mode == Mode::Strict => Err(DecodeError::UnknownEventType(excerpt(other))),
        _ => Ok(None),
    }
}

/// The fields of any event, as read (positionally or by name) before the event is built.
#[derive(Default)]
struct Fields<'a> {
    block_hashes: Option<Vec<EngineBlockHash>>,
    parent_block_hash: Option<Option<EngineBlockHash>>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_id: Option<Option<i64>>,
    /// `Some(None)`: nil, or (lenient) a medium this crate does not know, which
    /// `unknown_medium` tells.
    medium: Option<Option<Medium>>,
    unknown_medium: bool,
    lora_name: Option<Option<String>>,
    /// Read by a lenient decoder only (a strict one skips the field).
    extra_keys: Option<Option<Extras<'a>>>,
    group_idx: Option<Option<i64>>,
    cache_kind: Option<Option<CacheKind>>,
}

/// What `BlockStored.extra_keys` says about its blocks, as far as the index needs it: where
/// the first block is that request keys cannot name. O(1) in size, whatever the entries.
#[derive(Clone, Copy, Default)]
struct Extras<'a> {
    /// The first block whose entry is neither nil, nor empty, nor one lone string (or is a lone
    /// string other than the first one seen).
    other: Option<usize>,
    /// The first block whose entry is one lone string, and that string: a block keeps its key
    /// if that string is the event's adapter name.
    first_lone: Option<(usize, &'a [u8])>,
}

impl Extras<'_> {
    /// Blocks before the first one with extra keys other than `lora_name`.
    fn plain_blocks(&self, lora_name: Option<&str>) -> usize {
        let lone = self
            .first_lone
            .filter(|(_, s)| lora_name.is_none_or(|n| n.as_bytes() != *s))
            .map(|(i, _)| i);
        match (self.other, lone) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(usize::MAX),
        }
    }
}

impl Fields<'_> {
    /// The event, or `None` when a lenient decoder leaves it out (counted in `ctx`).
    fn build(self, kind: Kind, ctx: &mut Ctx) -> Result<Option<Event>, DecodeError> {
        if self.unknown_medium && kind != Kind::Cleared {
            ctx.skipped.unknown_medium = ctx.skipped.unknown_medium.saturating_add(1);
            return Ok(None);
        }
        // `medium` absent or nil: vLLM before `medium` existed, i.e. the GPU.
        let medium = self.medium.flatten().unwrap_or_default();
        Ok(Some(match kind {
            Kind::Stored => {
                let mut stored = BlockStored {
                    block_hashes: self.block_hashes.ok_or(DecodeError::Missing {
                        what: "BlockStored.block_hashes",
                    })?,
                    parent_block_hash: self.parent_block_hash.flatten(),
                    token_ids: self.token_ids.ok_or(DecodeError::Missing {
                        what: "BlockStored.token_ids",
                    })?,
                    block_size: self.block_size.ok_or(DecodeError::Missing {
                        what: "BlockStored.block_size",
                    })?,
                    lora_id: self.lora_id.flatten(),
                    lora_name: self.lora_name.flatten(),
                    medium,
                    group: self.group_idx.flatten().map(|index| CacheGroup {
                        index,
                        kind: self.cache_kind.flatten(),
                    }),
                };
                if let Some(extras) = self.extra_keys.flatten()
                    && !cut_at_extra_keys(&mut stored, extras, ctx)
                {
                    return Ok(None);
                }
                Event::BlockStored(stored)
            }
            Kind::Removed => Event::BlockRemoved(BlockRemoved {
                block_hashes: self.block_hashes.ok_or(DecodeError::Missing {
                    what: "BlockRemoved.block_hashes",
                })?,
                medium,
                group_idx: self.group_idx.flatten(),
            }),
            Kind::Cleared => Event::AllBlocksCleared,
        }))
    }
}

/// Cuts `stored` before its first block with extra keys (counted in `ctx`); `false` when no
/// block is left. Its tokens are cut with its blocks when they are all there (`block_size`
/// per block) or kept when absent (vLLM's CPU offloading); any other count makes the event
/// malformed, and it goes whole.
fn cut_at_extra_keys(stored: &mut BlockStored, extras: Extras<'_>, ctx: &mut Ctx) -> bool {
    let blocks = stored.block_hashes.len();
    let plain = extras.plain_blocks(stored.lora_name.as_deref());
    if plain >= blocks {
        return true;
    }
    let bs = stored.block_size as usize;
    let keep = if stored.token_ids.is_empty() {
        plain
    } else if Some(stored.token_ids.len()) == blocks.checked_mul(bs) {
        stored.token_ids.truncate(plain * bs);
        plain
    } else {
        0
    };
    let cut = u32::try_from(blocks - keep).unwrap_or(u32::MAX);
    ctx.skipped.extra_keys = ctx.skipped.extra_keys.saturating_add(cut);
    stored.block_hashes.truncate(keep);
    keep > 0
}

fn decode_event(r: &mut Reader<'_>, ctx: &mut Ctx) -> Result<Option<Event>, DecodeError> {
    match r.container("event")? {
        Container::Array(n) => {
            if n == 0 {
                return Err(DecodeError::Missing { what: "event tag" });
            }
            let Some(kind) = kind(r.str("event tag", MAX_STRING_BYTES)?, ctx.mode)? else {
                r.skip_values(n - 1)?;
                ctx.skipped.unknown_type = ctx.skipped.unknown_type.saturating_add(1);
                return Ok(None);
            };
            // Positions after the tag, by kind; the required ones first.
            let (required, known): (usize, &[&str]) = match kind {
                Kind::Stored => (
                    4,
                    &[
                        "block_hashes",
                        "parent_block_hash",
                        "token_ids",
                        "block_size",
                        "lora_id",
                        "medium",
                        "lora_name",
                        "extra_keys",
                        "group_idx",
                        "kv_cache_spec_kind",
                    ],
                ),
                Kind::Removed => (1, &["block_hashes", "medium", "group_idx"]),
                Kind::Cleared => (0, &[]),
            };
            let given = n - 1;
            if given < required {
                return Err(DecodeError::Missing {
                    what: known.get(given).copied().unwrap_or("event field"),
                });
            }
            let mut fields = Fields::default();
            for &name in known.iter().take(given) {
                read_field(r, &mut fields, name, ctx.mode)?;
            }
            // Fields of newer releases (`kv_cache_spec_sliding_window`, …): not modelled here.
            r.skip_values(given.saturating_sub(known.len()))?;
            fields.build(kind, ctx)
        }
        Container::Map(n) => {
            let mut tag = None;
            let mut fields = Fields::default();
            let mut unknown = false;
            for _ in 0..n {
                let key = r.str("event field name", MAX_STRING_BYTES)?;
                if key == "type" {
                    let k = kind(r.str("event tag", MAX_STRING_BYTES)?, ctx.mode)?;
                    unknown = k.is_none();
                    set_once(&mut tag, "type", k)?;
                } else if unknown {
                    // The fields of a type this crate does not know may be anything.
                    r.skip_values(1)?;
                } else {
                    read_field(r, &mut fields, key, ctx.mode)?;
                }
            }
            match tag.ok_or(DecodeError::Missing { what: "type" })? {
                Some(kind) => fields.build(kind, ctx),
                None => {
                    ctx.skipped.unknown_type = ctx.skipped.unknown_type.saturating_add(1);
                    Ok(None)
                }
            }
        }
    }
}

/// Reads the value of field `name` into `fields` (skips it when unknown).
fn read_field<'a>(
    r: &mut Reader<'a>,
    fields: &mut Fields<'a>,
    name: &str,
    mode: Mode,
) -> Result<(), DecodeError> {
    match name {
        "block_hashes" => {
            let v = r.hashes("block_hashes")?;
            set_once(&mut fields.block_hashes, "block_hashes", v)
        }
        "parent_block_hash" => {
            let v = r.opt_hash("parent_block_hash")?;
            set_once(&mut fields.parent_block_hash, "parent_block_hash", v)
        }
        "token_ids" => {
            let v = r.token_ids()?;
            set_once(&mut fields.token_ids, "token_ids", v)
        }
        "block_size" => {
            let v = r.u32("block_size")?;
            set_once(&mut fields.block_size, "block_size", v)
        }
        "lora_id" => {
            let v = r.opt_i64("lora_id")?;
            set_once(&mut fields.lora_id, "lora_id", v)
        }
        "medium" => {
            let v = match r.opt_str("medium", MAX_STRING_BYTES)? {
                None => None,
                Some(name) => match (Medium::parse(name), mode) {
                    (Some(m), _) => Some(m),
                    (None, Mode::Strict) => {
                        return Err(DecodeError::UnknownMedium(excerpt(name)));
                    }
                    (None, Mode::Lenient) => {
                        fields.unknown_medium = true;
                        None
                    }
                },
            };
            set_once(&mut fields.medium, "medium", v)
        }
        "lora_name" => {
            let v = r.opt_str("lora_name", MAX_STRING_BYTES)?.map(str::to_owned);
            set_once(&mut fields.lora_name, "lora_name", v)
        }
        "extra_keys" if mode == Mode::Lenient => {
            let v = r.extras()?;
            // Given twice (a strict decoder skips both; a lenient one accepts what it does):
            // neither is to be trusted, so every block goes.
            let every_block = Extras {
                other: Some(0),
                first_lone: None,
            };
            fields.extra_keys = Some(fields.extra_keys.map_or(v, |_| Some(every_block)));
            Ok(())
        }
        "group_idx" => {
            let v = r.opt_i64("group_idx")?;
            set_once(&mut fields.group_idx, "group_idx", v)
        }
        "kv_cache_spec_kind" => {
            let v = r
                .opt_str("kv_cache_spec_kind", MAX_STRING_BYTES)?
                .map(CacheKind::parse);
            set_once(&mut fields.cache_kind, "kv_cache_spec_kind", v)
        }
        _ => r.skip_values(1),
    }
}

/// An unexpected name for an error message (which is logged): escaped and truncated, as
/// [`crate::Untrusted`] shows it.
fn excerpt(s: &str) -> String {
    crate::Untrusted(s).to_string()
}

enum Container {
    Array(usize),
    Map(usize),
}

/// An integer as msgpack holds it.
enum Int {
    Unsigned(u64),
    Negative(i64),
}

/// A bounds-checked cursor over a payload.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

// === impl Reader ===

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(DecodeError::Truncated { at: self.pos })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(DecodeError::Truncated { at: self.pos })?;
        self.pos += 1;
        Ok(b)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<usize, DecodeError> {
        Ok(usize::from(self.byte()?))
    }
    fn u16(&mut self) -> Result<usize, DecodeError> {
        Ok(usize::from(u16::from_be_bytes(self.be()?)))
    }
    fn u32_len(&mut self) -> Result<usize, DecodeError> {
        // usize is at least 32 bits on every target this crate builds for.
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    /// The next marker, and its byte for error messages.
    fn marker(&mut self) -> Result<(Marker, u8), DecodeError> {
        let b = self.byte()?;
        Ok((Marker::from_u8(b), b))
    }

    fn unexpected(what: &'static str, expected: &'static str, byte: u8) -> DecodeError {
        DecodeError::UnexpectedType {
            what,
            expected,
            marker: byte,
        }
    }

    /// A container's element count, refused when the bytes left cannot hold that many
    /// (`per_element` bytes each at least): a header alone never makes a big allocation.
    fn checked_count(&self, n: usize, per_element: usize) -> Result<usize, DecodeError> {
        if n.saturating_mul(per_element) > self.remaining() {
            return Err(DecodeError::Truncated { at: self.pos });
        }
        Ok(n)
    }

    fn container(&mut self, what: &'static str) -> Result<Container, DecodeError> {
        let (m, b) = self.marker()?;
        Ok(match m {
            Marker::FixArray(n) => Container::Array(self.checked_count(usize::from(n), 1)?),
            Marker::Array16 => {
                let n = self.u16()?;
                Container::Array(self.checked_count(n, 1)?)
            }
            Marker::Array32 => {
                let n = self.u32_len()?;
                Container::Array(self.checked_count(n, 1)?)
            }
            Marker::FixMap(n) => Container::Map(self.checked_count(usize::from(n), 2)?),
            Marker::Map16 => {
                let n = self.u16()?;
                Container::Map(self.checked_count(n, 2)?)
            }
            Marker::Map32 => {
                let n = self.u32_len()?;
                Container::Map(self.checked_count(n, 2)?)
            }
            _ => return Err(Self::unexpected(what, "an array or a map", b)),
        })
    }

    /// An array's length, at most `cap`.
    fn array_len(&mut self, what: &'static str, cap: usize) -> Result<usize, DecodeError> {
        let (m, b) = self.marker()?;
        let n = match m {
            Marker::FixArray(n) => usize::from(n),
            Marker::Array16 => self.u16()?,
            Marker::Array32 => self.u32_len()?,
            _ => return Err(Self::unexpected(what, "an array", b)),
        };
        if n > cap {
            return Err(DecodeError::TooLong { what, len: n, cap });
        }
        self.checked_count(n, 1)
    }

    fn int_after(
        &mut self,
        what: &'static str,
        expected: &'static str,
        m: Marker,
        b: u8,
    ) -> Result<Int, DecodeError> {
        Ok(match m {
            Marker::FixPos(v) => Int::Unsigned(u64::from(v)),
            Marker::U8 => Int::Unsigned(u64::from(self.byte()?)),
            Marker::U16 => Int::Unsigned(u64::from(u16::from_be_bytes(self.be()?))),
            Marker::U32 => Int::Unsigned(u64::from(u32::from_be_bytes(self.be()?))),
            Marker::U64 => Int::Unsigned(u64::from_be_bytes(self.be()?)),
            Marker::FixNeg(v) => Int::Negative(i64::from(v)),
            Marker::I8 => Int::Negative(i64::from(i8::from_be_bytes(self.be()?))),
            Marker::I16 => Int::Negative(i64::from(i16::from_be_bytes(self.be()?))),
            Marker::I32 => Int::Negative(i64::from(i32::from_be_bytes(self.be()?))),
            Marker::I64 => Int::Negative(i64::from_be_bytes(self.be()?)),
            _ => return Err(Self::unexpected(what, expected, b)),
        })
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let (m, b) = self.marker()?;
        match self.int_after(what, "an int", m, b)? {
            // A signed marker may hold a non-negative value (other encoders than msgspec).
            Int::Unsigned(v) => u32::try_from(v).map_err(|_| DecodeError::OutOfRange {
                what,
                value: i128::from(v),
            }),
            Int::Negative(v) => u32::try_from(v).map_err(|_| DecodeError::OutOfRange {
                what,
                value: i128::from(v),
            }),
        }
    }

    fn opt_i64(&mut self, what: &'static str) -> Result<Option<i64>, DecodeError> {
        let (m, b) = self.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        match self.int_after(what, "an int or nil", m, b)? {
            Int::Unsigned(v) => i64::try_from(v)
                .map(Some)
                .map_err(|_| DecodeError::OutOfRange {
                    what,
                    value: i128::from(v),
                }),
            Int::Negative(v) => Ok(Some(v)),
        }
    }

    fn f64(&mut self, what: &'static str) -> Result<f64, DecodeError> {
        let (m, b) = self.marker()?;
        Ok(match m {
            Marker::F64 => f64::from_be_bytes(self.be()?),
            Marker::F32 => f64::from(f32::from_be_bytes(self.be()?)),
            // An integral timestamp from another encoder.
            _ => match self.int_after(what, "a float", m, b)? {
                Int::Unsigned(v) => v as f64,
                Int::Negative(v) => v as f64,
            },
        })
    }

    /// A block hash after its marker: an int (negative ones as two's complement) or a digest
    /// (its last 8 bytes, big-endian).
    fn hash_after(
        &mut self,
        what: &'static str,
        m: Marker,
        b: u8,
    ) -> Result<EngineBlockHash, DecodeError> {
        let len = match m {
            Marker::Bin8 => self.u8()?,
            Marker::Bin16 => self.u16()?,
            Marker::Bin32 => self.u32_len()?,
            _ => {
                return match self.int_after(what, "an int or bytes", m, b)? {
                    Int::Unsigned(v) => Ok(v),
                    // Python's builtin hash() is a signed 64-bit value: keep its bits.
                    Int::Negative(v) => Ok(v as u64),
                };
            }
        };
        if len == 0 {
            return Err(DecodeError::EmptyHash { what });
        }
        if len > MAX_HASH_BYTES {
            return Err(DecodeError::TooLong {
                what,
                len,
                cap: MAX_HASH_BYTES,
            });
        }
        let digest = self.take(len)?;
        let tail = &digest[len.saturating_sub(8)..];
        let mut folded = [0u8; 8];
        folded[8 - tail.len()..].copy_from_slice(tail);
        Ok(u64::from_be_bytes(folded))
    }

    fn opt_hash(&mut self, what: &'static str) -> Result<Option<EngineBlockHash>, DecodeError> {
        let (m, b) = self.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        self.hash_after(what, m, b).map(Some)
    }

    fn hashes(&mut self, what: &'static str) -> Result<Vec<EngineBlockHash>, DecodeError> {
        let n = self.array_len(what, MAX_HASHES_PER_EVENT)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (m, b) = self.marker()?;
            out.push(self.hash_after(what, m, b)?);
        }
        Ok(out)
    }

    fn token_ids(&mut self) -> Result<Vec<u32>, DecodeError> {
        let n = self.array_len("token_ids", MAX_TOKEN_IDS_PER_EVENT)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.u32("token_ids")?);
        }
        Ok(out)
    }

    fn str_after(
        &mut self,
        what: &'static str,
        cap: usize,
        m: Marker,
        b: u8,
    ) -> Result<&'a str, DecodeError> {
        let len = match m {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => self.u8()?,
            Marker::Str16 => self.u16()?,
            Marker::Str32 => self.u32_len()?,
            _ => return Err(Self::unexpected(what, "a string", b)),
        };
        if len > cap {
            return Err(DecodeError::TooLong { what, len, cap });
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    /// The next marker, not consumed (`None` at the end).
    fn peek(&self) -> Option<Marker> {
        self.buf.get(self.pos).map(|&b| Marker::from_u8(b))
    }

    /// A string's bytes (any length: they are in the payload already, nothing is copied), or
    /// `None`, nothing consumed, when the next value is not a string.
    fn opt_str_bytes(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        let len = match self.peek() {
            Some(Marker::FixStr(n)) => {
                self.byte()?;
                usize::from(n)
            }
            Some(Marker::Str8) => {
                self.byte()?;
                self.u8()?
            }
            Some(Marker::Str16) => {
                self.byte()?;
                self.u16()?
            }
            Some(Marker::Str32) => {
                self.byte()?;
                self.u32_len()?
            }
            _ => return Ok(None),
        };
        self.take(len).map(Some)
    }

    /// `BlockStored.extra_keys`: nil, or one entry per block (nil or a list of keys), read
    /// into [`Extras`] without allocating, whatever the entries hold (what is not a lone string
    /// is skipped as unknown fields are). A value of another shape marks every block.
    fn extras(&mut self) -> Result<Option<Extras<'a>>, DecodeError> {
        let n = match self.peek() {
            Some(Marker::Null) => {
                self.byte()?;
                return Ok(None);
            }
            Some(Marker::FixArray(_) | Marker::Array16 | Marker::Array32) => {
                self.array_len("extra_keys", usize::MAX)?
            }
            _ => {
                self.skip_values(1)?;
                return Ok(Some(Extras {
                    other: Some(0),
                    first_lone: None,
                }));
            }
        };
        let mut extras = Extras::default();
        for block in 0..n {
            let keys = match self.peek() {
                Some(Marker::Null) => {
                    self.byte()?;
                    0
                }
                Some(Marker::FixArray(_) | Marker::Array16 | Marker::Array32) => {
                    self.array_len("extra_keys", usize::MAX)?
                }
                // Neither nil nor a list (or the payload ends: skipping says so).
                _ => {
                    self.skip_values(1)?;
                    extras.other.get_or_insert(block);
                    continue;
                }
            };
            if keys == 0 {
                continue;
            }
            if keys == 1
                && let Some(s) = self.opt_str_bytes()?
            {
                match extras.first_lone {
                    None => extras.first_lone = Some((block, s)),
                    Some((_, first)) if first == s => {}
                    Some(_) => {
                        extras.other.get_or_insert(block);
                    }
                }
                continue;
            }
            self.skip_values(keys)?;
            extras.other.get_or_insert(block);
        }
        Ok(Some(extras))
    }

    fn str(&mut self, what: &'static str, cap: usize) -> Result<&'a str, DecodeError> {
        let (m, b) = self.marker()?;
        self.str_after(what, cap, m, b)
    }

    fn opt_str(&mut self, what: &'static str, cap: usize) -> Result<Option<&'a str>, DecodeError> {
        let (m, b) = self.marker()?;
        if m == Marker::Null {
            return Ok(None);
        }
        self.str_after(what, cap, m, b).map(Some)
    }

    /// Skips `count` values of any type, iteratively (no recursion, so nesting costs no
    /// stack): containers add their elements to the count. Every element takes a byte at
    /// least, so the count never exceeds the bytes left, and the time is linear in them.
    fn skip_values(&mut self, count: usize) -> Result<(), DecodeError> {
        let mut pending = count;
        while pending > 0 {
            pending -= 1;
            let (m, _) = self.marker()?;
            let (skip, elements) = match m {
                Marker::FixPos(_)
                | Marker::FixNeg(_)
                | Marker::Null
                | Marker::True
                | Marker::False => (0, 0),
                Marker::U8 | Marker::I8 => (1, 0),
                Marker::U16 | Marker::I16 => (2, 0),
                Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
                Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
                Marker::FixStr(n) => (usize::from(n), 0),
                Marker::Str8 | Marker::Bin8 => (self.u8()?, 0),
                Marker::Str16 | Marker::Bin16 => (self.u16()?, 0),
                Marker::Str32 | Marker::Bin32 => (self.u32_len()?, 0),
                Marker::FixArray(n) => (0, usize::from(n)),
                Marker::Array16 => (0, self.u16()?),
                Marker::Array32 => (0, self.u32_len()?),
                Marker::FixMap(n) => (0, 2 * usize::from(n)),
                Marker::Map16 => (0, 2 * self.u16()?),
                Marker::Map32 => (0, 2usize.saturating_mul(self.u32_len()?)),
                Marker::FixExt1 => (2, 0),
                Marker::FixExt2 => (3, 0),
                Marker::FixExt4 => (5, 0),
                Marker::FixExt8 => (9, 0),
                Marker::FixExt16 => (17, 0),
                Marker::Ext8 => (self.u8()? + 1, 0),
                Marker::Ext16 => (self.u16()? + 1, 0),
                Marker::Ext32 => (self.u32_len()?.saturating_add(1), 0),
                Marker::Reserved => {
                    return Err(DecodeError::UnexpectedType {
                        what: "value",
                        expected: "a msgpack value",
                        marker: 0xc1,
                    });
                }
            };
            self.take(skip)?;
            pending = pending.saturating_add(self.checked_count(elements, 1)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
