//! Speculative entries shared between EPP replicas (active-active, `speculativePeers` of
//! `precise-prefix-cache-scorer`).
//!
//! An engine announces a request's blocks only once it has computed them, seconds after the
//! decision while the queues are long. Until then only the EPP that routed the request knows
//! where its prefix is going (its speculative entries); with several EPPs behind one gateway
//! the others route the same prefix elsewhere. With peers configured each EPP also tells the
//! others, over a PUB socket, which endpoint it chose for which request keys, and each makes
//! the same speculative entries in its own index (same TTL; a real event replaces them).
//!
//! The message is msgpack: `[1, "<ip>:<port>", [key, …]]` (version, the endpoint's address as
//! every EPP of the pool knows it, the request's block keys in prompt order, at most
//! [`MAX_PEER_KEYS`]). The keys already encode the model, LoRA and cache salt, so peers must
//! hash alike (the same `tokenProcessorConfig`); keys of another hashing match nothing.
//! [`decode`] refuses anything longer than [`MAX_PEER_MESSAGE_BYTES`], another version, an
//! address that does not parse and more keys than the cap.
//!
//! The request path never waits: [`PeerOutbox::offer`] hands the message to a bounded queue
//! that the publisher task drains, and drops it (counted) when the queue is full or no
//! publisher runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use tokio::sync::mpsc;

/// The message format's version.
pub const PEER_MESSAGE_VERSION: u64 = 1;
/// Keys of one request sent to peers, at most (64 Ki tokens at 16 per block): the leading
/// ones, which are what a prefix match needs.
pub const MAX_PEER_KEYS: usize = 4096;
/// Bytes of one message, at most: the version, an address of up to 64 bytes, and
/// [`MAX_PEER_KEYS`] keys of 9 bytes.
pub const MAX_PEER_MESSAGE_BYTES: usize = 16 + 64 + 5 + 9 * MAX_PEER_KEYS;
/// Messages queued for the publisher, at most.
pub const PEER_QUEUE: usize = 1024;

/// One routed request: `keys` are going to `endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpeculation {
    /// The chosen endpoint's address.
    pub endpoint: SocketAddr,
    /// The request's block keys, in prompt order.
    pub keys: Vec<u64>,
}

/// Why a peer's message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerDecodeError {
    /// Longer than [`MAX_PEER_MESSAGE_BYTES`].
    #[error("peer message of {0} bytes (at most {MAX_PEER_MESSAGE_BYTES})")]
    TooLong(usize),
    /// Another version of the format.
    #[error("peer message version {0} (this EPP reads {PEER_MESSAGE_VERSION})")]
    Version(u64),
    /// Not the format.
    #[error("malformed peer message: {0}")]
    Malformed(&'static str),
}

/// The message's bytes.
pub fn encode(msg: &PeerSpeculation) -> Vec<u8> {
    let keys = &msg.keys[..msg.keys.len().min(MAX_PEER_KEYS)];
    let address = msg.endpoint.to_string();
    let mut out = Vec::with_capacity(16 + address.len() + 9 * keys.len());
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_array_len(&mut out, 3);
    let _ = rmp::encode::write_uint(&mut out, PEER_MESSAGE_VERSION);
    let _ = rmp::encode::write_str(&mut out, &address);
    let _ = rmp::encode::write_array_len(&mut out, keys.len() as u32);
    for &k in keys {
        let _ = rmp::encode::write_uint(&mut out, k);
    }
    out
}

/// A peer's message, checked (see the module docs).
pub fn decode(bytes: &[u8]) -> Result<PeerSpeculation, PeerDecodeError> {
    use PeerDecodeError::Malformed;
    if bytes.len() > MAX_PEER_MESSAGE_BYTES {
        return Err(PeerDecodeError::TooLong(bytes.len()));
    }
    let mut rd = bytes;
    let n = rmp::decode::read_array_len(&mut rd).map_err(|_| Malformed("not an array"))?;
    if n != 3 {
        return Err(Malformed("not 3 fields"));
    }
    let version: u64 = rmp::decode::read_int(&mut rd).map_err(|_| Malformed("version"))?;
    if version != PEER_MESSAGE_VERSION {
        return Err(PeerDecodeError::Version(version));
    }
    let len = rmp::decode::read_str_len(&mut rd).map_err(|_| Malformed("address"))? as usize;
    if len > 64 || len > rd.len() {
        return Err(Malformed("address length"));
    }
    let (address, rest) = rd.split_at(len);
    rd = rest;
    let endpoint = std::str::from_utf8(address)
        .ok()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .ok_or(Malformed("address"))?;
    let count = rmp::decode::read_array_len(&mut rd).map_err(|_| Malformed("keys"))? as usize;
    // Each key takes a byte at least: a count beyond the bytes left is a lie.
    if count > MAX_PEER_KEYS || count > rd.len() {
        return Err(Malformed("key count"));
    }
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        keys.push(rmp::decode::read_int(&mut rd).map_err(|_| Malformed("key"))?);
    }
    if !rd.is_empty() {
        return Err(Malformed("trailing bytes"));
    }
    Ok(PeerSpeculation { endpoint, keys })
}

/// The request path's side of the publisher: a bounded queue, never waited on.
#[derive(Debug, Default)]
pub struct PeerOutbox {
    tx: ArcSwapOption<mpsc::Sender<PeerSpeculation>>,
    /// Messages queued for the publisher.
    pub queued: AtomicU64,
    /// Messages dropped since the publisher last took the count: the queue was full or no
    /// publisher ran.
    pub dropped: AtomicU64,
}

impl PeerOutbox {
    /// A new queue for a (re)started publisher; the previous one's messages are dropped.
    pub fn attach(&self) -> mpsc::Receiver<PeerSpeculation> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        self.tx.store(Some(Arc::new(tx)));
        rx
    }

    /// Hands a routed request's keys (at most [`MAX_PEER_KEYS`]) to the publisher, or drops
    /// them when it cannot take them now.
    pub fn offer(&self, endpoint: SocketAddr, keys: &[u64]) {
        if keys.is_empty() {
            return;
        }
        let guard = self.tx.load();
        let Some(tx) = guard.as_ref() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let msg = PeerSpeculation {
            endpoint,
            keys: keys[..keys.len().min(MAX_PEER_KEYS)].to_vec(),
        };
        match tx.try_send(msg) {
            Ok(()) => self.queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(keys: Vec<u64>) -> PeerSpeculation {
        PeerSpeculation {
            endpoint: "10.0.0.7:8000".parse().unwrap(),
            keys,
        }
    }

    #[test]
    fn a_message_round_trips_and_keys_are_capped() {
        let m = msg(vec![0, 1, u64::MAX, 1 << 40]);
        assert_eq!(decode(&encode(&m)).unwrap(), m);
        let v6 = PeerSpeculation {
            endpoint: "[fd00::1]:8000".parse().unwrap(),
            keys: vec![7],
        };
        assert_eq!(decode(&encode(&v6)).unwrap(), v6);
        let long = msg((0..MAX_PEER_KEYS as u64 + 10).map(|k| k * 977).collect());
        let bytes = encode(&long);
        assert!(bytes.len() <= MAX_PEER_MESSAGE_BYTES);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.keys.len(), MAX_PEER_KEYS);
        assert_eq!(back.keys[..], long.keys[..MAX_PEER_KEYS]);
    }

    #[test]
    fn bad_messages_are_refused() {
        let good = encode(&msg(vec![1, 2, 3]));
        assert!(decode(&good[..good.len() - 1]).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        assert!(decode(&[]).is_err());
        assert!(matches!(
            decode(&vec![0u8; MAX_PEER_MESSAGE_BYTES + 1]),
            Err(PeerDecodeError::TooLong(_))
        ));
        // Version 2.
        let mut v2 = good.clone();
        v2[1] = 2;
        assert_eq!(decode(&v2), Err(PeerDecodeError::Version(2)));
        // A key count far beyond the bytes: refused before allocating.
        let mut lie = Vec::new();
        let _ = rmp::encode::write_array_len(&mut lie, 3);
        let _ = rmp::encode::write_uint(&mut lie, 1);
        let _ = rmp::encode::write_str(&mut lie, "10.0.0.7:8000");
        let _ = rmp::encode::write_array_len(&mut lie, u32::MAX);
        assert!(decode(&lie).is_err());
        // Not an address.
        let mut name = Vec::new();
        let _ = rmp::encode::write_array_len(&mut name, 3);
        let _ = rmp::encode::write_uint(&mut name, 1);
        let _ = rmp::encode::write_str(&mut name, "pod-a:8000");
        let _ = rmp::encode::write_array_len(&mut name, 0);
        assert!(decode(&name).is_err());
    }

    #[test]
    fn the_outbox_never_waits_and_counts_what_it_drops() {
        let outbox = PeerOutbox::default();
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        outbox.offer(a, &[1]);
        assert_eq!(
            outbox.dropped.load(Ordering::Relaxed),
            1,
            "no publisher yet"
        );
        let mut rx = outbox.attach();
        for k in 0..PEER_QUEUE as u64 + 5 {
            outbox.offer(a, &[k]);
        }
        assert_eq!(outbox.queued.load(Ordering::Relaxed), PEER_QUEUE as u64);
        assert_eq!(outbox.dropped.load(Ordering::Relaxed), 6);
        assert_eq!(rx.try_recv().unwrap().keys, vec![0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, rng_seed: proptest::test_runner::RngSeed::Fixed(15), ..ProptestConfig::default() })]

        /// Any bytes decode to a message within the caps or to an error, never a panic.
        #[test]
        fn any_bytes_decode_within_the_caps(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = decode(&bytes) {
                prop_assert!(m.keys.len() <= MAX_PEER_KEYS);
            }
        }

        /// Every message survives a round trip; a mutated one decodes within the caps or not.
        #[test]
        fn messages_round_trip(keys in proptest::collection::vec(any::<u64>(), 0..64), flip in any::<usize>(), bit in 0u8..8) {
            let m = msg(keys);
            let mut bytes = encode(&m);
            prop_assert_eq!(decode(&bytes).unwrap(), m);
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            if let Ok(d) = decode(&bytes) {
                prop_assert!(d.keys.len() <= MAX_PEER_KEYS);
            }
        }
    }
}
