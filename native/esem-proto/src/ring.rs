//! Switchless ring layout (PROTOCOL.md 15.2) as pure index arithmetic: offsets, the
//! capacity and header checks, and the untrusted-index rules. No memory is touched
//! here; an I/O shell maps the region, reads the peer's counter, asks these types
//! what it may copy, copies, and publishes the counter they return.
//!
//! Each end keeps its own counter privately (never read back from the region) and
//! checks the peer's against it: the consumer refuses a head more than `capacity`
//! ahead of its tail, the producer a tail more than `capacity` behind its head or
//! ahead of it. A refused index is a `Protocol` error (Python `RingError`).

use crate::consts::{LENGTH_BYTES, MAX_FRAME_BODY};
use crate::error::{Error, Result};

pub const CACHE_LINE: usize = 64;
pub const HEADER_BYTES: usize = 4096;
/// `esemring` as a little-endian u64.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"esemring");
pub const RING_LAYOUT_VERSION: u64 = 1;
pub const DEFAULT_RING_BYTES: u64 = 64 * 1024;
pub const MIN_RING_BYTES: u64 = 32 * 1024;
pub const MAX_RING_BYTES: u64 = 1024 * 1024;
const _: () = assert!(MIN_RING_BYTES as usize >= LENGTH_BYTES + MAX_FRAME_BODY);

/// Byte offsets of the header fields (each counter on its own cache line).
pub mod offset {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CAPACITY: usize = 16;
    pub const REQ_HEAD: usize = 64;
    pub const REQ_TAIL: usize = 128;
    pub const REQ_SLEEP: usize = 192;
    pub const REP_HEAD: usize = 256;
    pub const REP_TAIL: usize = 320;
    pub const REP_SLEEP: usize = 384;
    pub const REQ_DONE: usize = 448;
}

/// `capacity` if it is a valid ring size (a power of two in MIN..=MAX), else an error:
/// the value arrives in a reply and sizes a mapping.
pub fn check_capacity(capacity: u64) -> Result<u64> {
    if !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&capacity) || !capacity.is_power_of_two() {
        return Err(Error::protocol(format!(
            "ring capacity {capacity} is not a power of two in {MIN_RING_BYTES}..{MAX_RING_BYTES}"
        )));
    }
    Ok(capacity)
}

/// Bytes of the whole region for rings of `capacity` bytes each way.
pub fn region_size(capacity: u64) -> Result<usize> {
    Ok(HEADER_BYTES + 2 * check_capacity(capacity)? as usize)
}

/// Offsets of the two data areas in the region.
pub fn request_area(_capacity: u64) -> usize {
    HEADER_BYTES
}

pub fn reply_area(capacity: u64) -> usize {
    HEADER_BYTES + capacity as usize
}

/// The attacher's check of the header words the creator wrote, against the capacity
/// of the authenticated reply.
pub fn check_header(magic: u64, version: u64, capacity: u64, expected: u64) -> Result<()> {
    if magic != RING_MAGIC || version != RING_LAYOUT_VERSION || capacity != expected {
        return Err(Error::protocol(
            "shared region header does not match the session's rings",
        ));
    }
    Ok(())
}

/// Up to two spans (offset within the data area, length) of one copy, split at the wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spans {
    pub first: (usize, usize),
    pub second: (usize, usize),
}

impl Spans {
    fn new(counter: u64, n: u64, cap: u64) -> Self {
        let pos = (counter & (cap - 1)) as usize;
        let n = n as usize;
        let cap = cap as usize;
        let first = n.min(cap - pos);
        Spans {
            first: (pos, first),
            second: (0, n - first),
        }
    }

    pub fn len(&self) -> usize {
        self.first.1 + self.second.1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The producer's private head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerIndex {
    head: u64,
    cap: u64,
}

impl ProducerIndex {
    pub fn new(capacity: u64, start: u64) -> Result<Self> {
        Ok(ProducerIndex {
            head: start,
            cap: check_capacity(capacity)?,
        })
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    /// Bytes written and not yet consumed, given the tail read from the region.
    pub fn used(&self, shared_tail: u64) -> Result<u64> {
        let used = self.head.wrapping_sub(shared_tail);
        if used > self.cap {
            return Err(Error::protocol("ring consumer index out of range"));
        }
        Ok(used)
    }

    /// Where to copy up to `want` bytes now (possibly fewer: a byte stream).
    pub fn plan_write(&self, shared_tail: u64, want: usize) -> Result<Spans> {
        let room = self.cap - self.used(shared_tail)?;
        Ok(Spans::new(self.head, room.min(want as u64), self.cap))
    }

    /// After copying `spans`: the new head, to publish in the region.
    pub fn commit(&mut self, spans: &Spans) -> u64 {
        self.head = self.head.wrapping_add(spans.len() as u64);
        self.head
    }
}

/// The consumer's private tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerIndex {
    tail: u64,
    cap: u64,
}

impl ConsumerIndex {
    pub fn new(capacity: u64, start: u64) -> Result<Self> {
        Ok(ConsumerIndex {
            tail: start,
            cap: check_capacity(capacity)?,
        })
    }

    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Bytes ready, given the head read from the region.
    pub fn available(&self, shared_head: u64) -> Result<u64> {
        let n = shared_head.wrapping_sub(self.tail);
        if n > self.cap {
            return Err(Error::protocol("ring producer index out of range"));
        }
        Ok(n)
    }

    /// Where to copy out up to `limit` ready bytes.
    pub fn plan_read(&self, shared_head: u64, limit: usize) -> Result<Spans> {
        let n = self.available(shared_head)?.min(limit as u64);
        Ok(Spans::new(self.tail, n, self.cap))
    }

    /// After copying `spans` out: the new tail, to publish in the region.
    pub fn commit(&mut self, spans: &Spans) -> u64 {
        self.tail = self.tail.wrapping_add(spans.len() as u64);
        self.tail
    }
}
