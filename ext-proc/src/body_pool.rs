//! Reused buffers for long streamed request bodies.
//!
//! A streamed request body is gathered into one buffer, sized from `content-length`, before it
//! is parsed. For bodies of hundreds of kilobytes glibc's malloc hands out fresh pages for that
//! buffer (and for tonic's receive buffer beside it) more often than not: its dynamic mmap and
//! trim thresholds give the memory back to the kernel between requests, and every page is
//! faulted in and zeroed again on the next one. The `epp` took 100–260 minor faults per 400 KB
//! request that way, about a fifth of its CPU for such a request (bench/RESULTS.md, "EPP
//! overhead"), and whether it did depended on the order of allocations, not on anything an
//! operator can see. Keeping a few such buffers here takes most of that out of the allocator's
//! hands (tonic's receive buffer stays tonic's, and still faults now and then), without tuning
//! the allocator (`mallopt` would need `unsafe`, and raising glibc's thresholds for the whole
//! process made the soak's memory drift).
//!
//! Bounded: only buffers of [`MIN_POOLED`] to [`MAX_POOLED`] bytes of capacity are kept, at
//! most [`MAX_IDLE_BUFFERS`] of them and [`MAX_IDLE_BYTES`] in total; anything else is freed as
//! before. Bodies declared short never come here: small allocations are what malloc reuses
//! well. A body of unknown length takes an idle buffer if there is one, since it may be long.

use bytes::Bytes;
use parking_lot::Mutex;

/// Smallest capacity worth keeping (below it malloc's bins serve the buffer well).
pub const MIN_POOLED: usize = 64 * 1024;
/// Largest capacity kept; a longer body's buffer is freed.
pub const MAX_POOLED: usize = 4 * 1024 * 1024;
/// Most idle buffers kept.
pub const MAX_IDLE_BUFFERS: usize = 16;
/// Most idle bytes (capacity) kept in total.
pub const MAX_IDLE_BYTES: usize = 8 * 1024 * 1024;
/// Most bytes a buffer reserves ahead of the body: the length is the client's word, and a
/// stream that declares 16 MiB and sends nothing must not hold 16 MiB. What is reserved counts
/// against the reservations' share of the gathered-bytes budget (`body_budget`), apart from
/// the bytes charged as they arrive. A longer body grows its buffer as it comes.
pub const MAX_RESERVED_AHEAD: usize = MAX_POOLED;

/// The process's pool for streamed request bodies.
pub static REQUEST_BODIES: BodyPool = BodyPool::new();

/// Idle buffers, ready for the next long body.
#[derive(Debug)]
pub struct BodyPool {
    idle: Mutex<Idle>,
}

#[derive(Debug)]
struct Idle {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl BodyPool {
    /// An empty pool.
    pub const fn new() -> Self {
        Self {
            idle: parking_lot::const_mutex(Idle {
                buffers: Vec::new(),
                bytes: 0,
            }),
        }
    }

    /// An empty buffer with room for at least `capacity` bytes: an idle one when one is large
    /// enough (the smallest such), a new one otherwise. A `capacity` of 0 is a body of unknown
    /// length (no `content-length`), which may be long: it takes the smallest idle buffer.
    pub fn take(&'static self, capacity: usize) -> BodyBuffer {
        let reused = if capacity == 0 || (MIN_POOLED..=MAX_POOLED).contains(&capacity) {
            let mut idle = self.idle.lock();
            let best = idle
                .buffers
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= capacity)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| {
                let buf = idle.buffers.swap_remove(i);
                idle.bytes -= buf.capacity();
                buf
            })
        } else {
            None
        };
        BodyBuffer {
            buf: reused.unwrap_or_else(|| Vec::with_capacity(capacity.min(MAX_RESERVED_AHEAD))),
            pool: self,
        }
    }

    /// Keeps `buf` if it is worth keeping and the pool has room; frees it otherwise.
    fn give_back(&self, mut buf: Vec<u8>) {
        let capacity = buf.capacity();
        if !(MIN_POOLED..=MAX_POOLED).contains(&capacity) {
            return;
        }
        buf.clear();
        let mut idle = self.idle.lock();
        if idle.buffers.len() < MAX_IDLE_BUFFERS && idle.bytes + capacity <= MAX_IDLE_BYTES {
            idle.bytes += capacity;
            idle.buffers.push(buf);
        }
    }

    /// Idle buffers and their total capacity.
    pub fn idle(&self) -> (usize, usize) {
        let idle = self.idle.lock();
        (idle.buffers.len(), idle.bytes)
    }
}

impl Default for BodyPool {
    fn default() -> Self {
        Self::new()
    }
}

/// A body being gathered; its memory goes back to its pool when it (or the last [`Bytes`]
/// made from it by [`BodyBuffer::freeze`]) is dropped.
#[derive(Debug)]
pub struct BodyBuffer {
    buf: Vec<u8>,
    pool: &'static BodyPool,
}

impl BodyBuffer {
    /// An empty buffer that keeps nothing (what a stream holds before its headers).
    pub fn empty() -> Self {
        Self {
            buf: Vec::new(),
            pool: &REQUEST_BODIES,
        }
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends a chunk.
    pub fn extend_from_slice(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The gathered body as shared bytes, without copying; the buffer returns to the pool when
    /// the last slice of it is dropped.
    pub fn freeze(self) -> Bytes {
        if self.buf.capacity() < MIN_POOLED {
            let mut this = self;
            return Bytes::from(std::mem::take(&mut this.buf));
        }
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for BodyBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for BodyBuffer {
    fn drop(&mut self) {
        if self.buf.capacity() > 0 {
            self.pool.give_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> &'static BodyPool {
        Box::leak(Box::new(BodyPool::new()))
    }

    #[test]
    fn a_long_body_s_buffer_is_reused_once_its_last_slice_is_dropped() {
        let pool = pool();
        let mut body = pool.take(400_000);
        body.extend_from_slice(&[b'a'; 400_000]);
        let frozen = body.freeze();
        let slice = frozen.slice(1000..2000);
        let address = frozen.as_ptr();
        drop(frozen);
        assert_eq!(pool.idle(), (0, 0), "a slice still holds the buffer");
        assert_eq!(&slice[..3], b"aaa");
        drop(slice);
        let (buffers, bytes) = pool.idle();
        assert_eq!(buffers, 1);
        assert!(bytes >= 400_000);

        let again = pool.take(300_000);
        assert!(again.is_empty(), "a reused buffer starts empty");
        assert_eq!(again.buf.as_ptr(), address, "the same memory");
        assert_eq!(pool.idle(), (0, 0));
    }

    #[test]
    fn short_and_oversized_bodies_are_not_kept() {
        let pool = pool();
        let mut short = pool.take(1000);
        short.extend_from_slice(b"{}");
        assert_eq!(&short.freeze()[..], b"{}");
        // A declared length is not reserved past MAX_RESERVED_AHEAD (in a pool of its own).
        let declared_huge = self::pool().take(16 << 20);
        assert_eq!(declared_huge.buf.capacity(), MAX_RESERVED_AHEAD);
        // A body that outgrew its declared length is kept only if it stayed within bounds.
        let mut grown = pool.take(0);
        grown.extend_from_slice(&vec![0; MAX_POOLED + 1]);
        drop(grown);
        assert_eq!(pool.idle(), (0, 0));
        // Proof that the pool keeps what it should, in the same pool.
        drop(pool.take(MIN_POOLED));
        assert_eq!(pool.idle().0, 1);
    }

    #[test]
    fn a_body_of_unknown_length_takes_an_idle_buffer() {
        let pool = pool();
        let mut chunked = pool.take(0);
        assert_eq!(
            chunked.buf.capacity(),
            0,
            "nothing idle yet: nothing allocated up front"
        );
        chunked.extend_from_slice(&[1; 300_000]);
        drop(chunked.freeze());
        assert_eq!(pool.idle().0, 1, "the grown buffer is kept");
        let again = pool.take(0);
        assert!(again.buf.capacity() >= 300_000);
        assert_eq!(pool.idle(), (0, 0));
    }

    #[test]
    fn idle_memory_is_capped_in_buffers_and_bytes() {
        let pool = pool();
        let many: Vec<_> = (0..MAX_IDLE_BUFFERS + 4)
            .map(|_| pool.take(MIN_POOLED))
            .collect();
        drop(many);
        assert_eq!(pool.idle().0, MAX_IDLE_BUFFERS);

        let pool = super::tests::pool();
        let big: Vec<_> = (0..4).map(|_| pool.take(MAX_POOLED)).collect();
        drop(big);
        let (buffers, bytes) = pool.idle();
        assert_eq!(buffers, MAX_IDLE_BYTES / MAX_POOLED);
        assert!(bytes <= MAX_IDLE_BYTES);
    }

    #[test]
    fn the_smallest_large_enough_buffer_is_taken() {
        let pool = pool();
        drop((pool.take(1_000_000), pool.take(200_000)));
        let body = pool.take(150_000);
        assert!(body.buf.capacity() >= 150_000 && body.buf.capacity() < 1_000_000);
        let longer = pool.take(900_000);
        assert!(longer.buf.capacity() >= 1_000_000);
        let none_left = pool.take(100_000);
        assert_eq!(pool.idle(), (0, 0));
        drop((body, longer, none_left));
        assert_eq!(pool.idle().0, 3);
    }
}
