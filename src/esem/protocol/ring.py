"""The switchless transport's shared-memory layout: two single-producer, single-consumer
byte rings in one region, and nothing else. Pure: it works on any writable buffer (the
service's memfd mapping, a bytearray in tests) and makes no system call.

The rings are a *transport*, not a protocol: they carry exactly the bytes the session's
socket would carry (``u32 length | AEAD frame``, PROTOCOL.md section 2), produced and
checked by the same ``ClientSession``/``ServerSession``. So a slot is authenticated
exactly as a socket frame is, and this module never needs to know what a frame is.

Everything in the region is writable by the peer and, in the threat model, by the A2
adversary. Each end therefore keeps its own counter privately and only *reads* the
peer's; every index read from the region is checked against the private one before it
is used, so garbage indices raise ``RingError`` (a ``ProtocolError``) and never read or
write outside the buffer. Data is copied out before anyone looks at it (no
check-then-use on shared bytes).

Layout (PROTOCOL.md section 15), native byte order (the region never leaves the host),
every counter on a cache line of its own so the two ends do not false-share::

    offset    0  magic "esemring", layout version, capacity (u64 each)
             64  request ring head   (client writes: bytes produced, mod 2**64)
            128  request ring tail   (service writes: bytes consumed)
            192  request consumer sleeping flag (service writes)
            256  reply ring head     (service writes)
            320  reply ring tail     (client writes)
            384  reply consumer sleeping flag (client writes)
            448  request bytes fully processed (service writes; see ``Consumer.done``)
           4096  request data, ``capacity`` bytes
    4096 + cap   reply data, ``capacity`` bytes

Ordering: on x86-64 (TSO) stores are seen in program order, so "copy the bytes, then
publish the head" needs no fence. The one pattern TSO does not order is a store followed
by a load of another location (the sleeping-flag handshake: "publish head, then read
whether the consumer sleeps" against "set sleeping, then re-read the head"); ``fence()``
covers it, and the I/O shells keep a timed backstop besides.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass

from esem.errors import ProtocolError
from esem.protocol.constants import LENGTH_BYTES, MAX_FRAME_BODY

MASK64 = 2**64 - 1  # counters are free-running u64 byte counts
CACHE_LINE = 64  # bytes; one counter per line
HEADER_BYTES = 4096  # one page of counters before the data areas
RING_MAGIC = int.from_bytes(b"esemring", "little")
RING_LAYOUT_VERSION = 1
# Bytes of data per direction. Must be a power of two (positions are counter & (cap-1))
# and hold at least one maximal frame, so a producer can always make progress once the
# consumer has drained the ring; 64 KiB holds ~1000 typical frames.
DEFAULT_RING_BYTES = 64 * 1024
MIN_RING_BYTES = 32 * 1024  # the smallest power of two >= LENGTH_BYTES + MAX_FRAME_BODY
MAX_RING_BYTES = 1024 * 1024  # bounds what one session can make the service map
assert MIN_RING_BYTES >= LENGTH_BYTES + MAX_FRAME_BODY

# u64 slot numbers in the header (byte offset / 8).
_MAGIC, _VERSION, _CAPACITY = 0, 1, 2
REQ_HEAD, REQ_TAIL, REQ_SLEEP = 8, 16, 24
REP_HEAD, REP_TAIL, REP_SLEEP = 32, 40, 48
REQ_DONE = 56


class RingError(ProtocolError):
    """The shared region holds something no honest peer writes (an index out of range, a
    wrong header): tampering, so an ``IntegrityError``; the session is closed."""


def fence(lock: threading.Lock) -> None:
    """A full memory barrier between a store and a later load, which Python has no
    statement for. Taking and releasing an uncontended ``threading.Lock`` runs an atomic
    read-modify-write in C (glibc ``sem_trywait``/``sem_post``: ``lock cmpxchg``/``lock
    xadd`` on x86-64), and every locked instruction drains the store buffer. That is an
    implementation property, not a language guarantee, so the shells never rely on it
    alone for liveness: a sleeper also wakes up on a timed backstop."""
    lock.acquire()
    lock.release()


def check_capacity(capacity: int) -> int:
    """``capacity`` if it is a valid per-direction ring size, else ``RingError`` (the
    value arrives in a reply and sizes a mapping: it is checked before anything is)."""
    if (
        not isinstance(capacity, int)
        or not MIN_RING_BYTES <= capacity <= MAX_RING_BYTES
        or capacity & (capacity - 1)
    ):
        raise RingError(f"ring capacity {capacity!r} is not a power of two in "
                        f"{MIN_RING_BYTES}..{MAX_RING_BYTES}")
    return capacity


def region_size(capacity: int) -> int:
    """Bytes of the whole shared region for rings of ``capacity`` bytes each way."""
    return HEADER_BYTES + 2 * check_capacity(capacity)


@dataclass(frozen=True, slots=True)
class _Side:
    head: int  # slot of the producer's counter
    tail: int  # slot of the consumer's counter
    sleep: int  # slot of the consumer's sleeping flag
    done: int | None  # slot of the consumer's "processed up to" counter (requests only)
    data: int  # byte offset of the data area


_REQUEST = _Side(REQ_HEAD, REQ_TAIL, REQ_SLEEP, REQ_DONE, HEADER_BYTES)


def _reply_side(capacity: int) -> _Side:
    return _Side(REP_HEAD, REP_TAIL, REP_SLEEP, None, HEADER_BYTES + capacity)


class Producer:
    """The writing end of one ring. ``_head`` is private: the shared copy is only ever
    written from it, never read back, so a peer that rewrites it cannot move us."""

    __slots__ = ("_cap", "_ctl", "_data", "_done_slot", "_fence", "_head", "_head_slot",
                 "_mask", "_sleep_slot", "_tail_slot")

    def __init__(self, ctl: memoryview, data: memoryview, side: _Side, start: int = 0) -> None:
        self._ctl = ctl
        self._data = data
        self._cap = len(data)
        self._mask = self._cap - 1
        self._head = start & MASK64
        self._head_slot, self._tail_slot, self._sleep_slot = side.head, side.tail, side.sleep
        self._done_slot = side.done
        self._fence = threading.Lock()

    def __repr__(self) -> str:
        return f"<Producer head={self._head} capacity={self._cap}>"

    def _used(self) -> int:
        used = (self._head - self._ctl[self._tail_slot]) & MASK64
        if used > self._cap:
            raise RingError("ring consumer index out of range")
        return used

    def free(self) -> int:
        """Bytes that can be written now."""
        return self._cap - self._used()

    def unconsumed(self) -> int:
        """Bytes written that the consumer has not taken yet."""
        return self._used()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy as much of ``data`` as fits (a byte stream, like a socket's send) and
        publish it; returns how many bytes were written."""
        n = len(data)
        room = self._cap - self._used()
        if n > room:
            n = room
            if n == 0:
                return 0
            data = memoryview(data)[:n]
        pos = self._head & self._mask
        end = pos + n
        if end <= self._cap:
            self._data[pos:end] = data
        else:  # split copy at the wrap
            first = self._cap - pos
            view = memoryview(data)
            self._data[pos:] = view[:first]
            self._data[: n - first] = view[first:n]
        self._head = (self._head + n) & MASK64
        self._ctl[self._head_slot] = self._head  # after the bytes: TSO keeps the order
        return n

    def peer_sleeping(self) -> bool:
        """After a write: does the consumer say it sleeps (so it needs its doorbell)?"""
        fence(self._fence)  # order our head store before this load (see module doc)
        return self._ctl[self._sleep_slot] != 0

    def all_done(self) -> bool:
        """Has the consumer processed every byte we wrote (``Consumer.done``)? A hint
        for when waiting is worth a spin, never trusted for anything else: a peer that
        lies about it only makes us spin or sleep at the wrong moment."""
        return self._done_slot is not None and self._ctl[self._done_slot] == self._head


class Consumer:
    """The reading end of one ring; ``_tail`` is private, as ``Producer._head`` is."""

    __slots__ = ("_cap", "_ctl", "_data", "_done_slot", "_fence", "_head_slot", "_mask",
                 "_sleep_slot", "_tail", "_tail_slot")

    def __init__(self, ctl: memoryview, data: memoryview, side: _Side, start: int = 0) -> None:
        self._ctl = ctl
        self._data = data
        self._cap = len(data)
        self._mask = self._cap - 1
        self._tail = start & MASK64
        self._head_slot, self._tail_slot, self._sleep_slot = side.head, side.tail, side.sleep
        self._done_slot = side.done
        self._fence = threading.Lock()

    def __repr__(self) -> str:
        return f"<Consumer tail={self._tail} capacity={self._cap}>"

    def available(self) -> int:
        """Bytes ready to read (checked: never more than the ring holds)."""
        n = (self._ctl[self._head_slot] - self._tail) & MASK64
        if n > self._cap:
            raise RingError("ring producer index out of range")
        return n

    def read(self, limit: int | None = None) -> bytes:
        """What is available (at most ``limit`` bytes), copied out of shared memory,
        then released to the producer; b"" when the ring is empty."""
        n = (self._ctl[self._head_slot] - self._tail) & MASK64
        if n == 0:
            return b""
        if n > self._cap:
            raise RingError("ring producer index out of range")
        if limit is not None and n > limit:
            n = limit
        pos = self._tail & self._mask
        end = pos + n
        if end <= self._cap:
            out = self._data[pos:end].tobytes()
        else:
            out = self._data[pos:].tobytes() + self._data[: end - self._cap].tobytes()
        # Released only once copied: until then the producer may not reuse the bytes.
        self._tail = (self._tail + n) & MASK64
        self._ctl[self._tail_slot] = self._tail
        return out

    def sleep(self) -> int:
        """Say we are about to sleep, then re-check: returns what became available
        meanwhile (read it, and ``wake()``, instead of sleeping if not 0)."""
        self._ctl[self._sleep_slot] = 1
        fence(self._fence)  # the flag store must be visible before we re-read the head
        return self.available()

    def wake(self) -> None:
        """We are awake (spinning or working): producers need not ring."""
        self._ctl[self._sleep_slot] = 0

    def done(self) -> None:
        """Everything read so far is processed and its immediate answers published: a
        producer that sees this and no answer knows its request is parked (a queued
        wait) and may sleep at once instead of spinning."""
        if self._done_slot is None:
            raise RuntimeError("this ring has no processed counter")
        self._ctl[self._done_slot] = self._tail


class Region:
    """Views over one shared region: the header counters and the two data areas.

    ``buf`` is an ``mmap`` (or, in tests, a ``bytearray``) of exactly
    ``region_size(capacity)`` bytes. ``release()`` drops every view so the owner can
    unmap it; an end used after that raises ``ValueError``, never touches freed memory.
    """

    def __init__(self, buf: mmap.mmap | bytearray, capacity: int) -> None:
        check_capacity(capacity)
        self.capacity = capacity
        self._mv = memoryview(buf)
        if self._mv.readonly or self._mv.nbytes != region_size(capacity):
            raise RingError("shared region has the wrong size or is read-only")
        self._mv = self._mv.cast("B")
        self.ctl = self._mv[:HEADER_BYTES].cast("Q")
        self._req = self._mv[HEADER_BYTES : HEADER_BYTES + capacity]
        self._rep = self._mv[HEADER_BYTES + capacity :]

    def __repr__(self) -> str:
        return f"<Region capacity={self.capacity}>"

    def initialize(self) -> None:
        """The creator (the service) writes the header; the counters start at zero."""
        for i in range(HEADER_BYTES // 8):
            self.ctl[i] = 0
        self.ctl[_MAGIC] = RING_MAGIC
        self.ctl[_VERSION] = RING_LAYOUT_VERSION
        self.ctl[_CAPACITY] = self.capacity

    def check_header(self) -> None:
        """The attacher's sanity check of what the creator wrote (read once, never
        trusted afterwards: the capacity used is the one from the authenticated reply)."""
        if (self.ctl[_MAGIC], self.ctl[_VERSION], self.ctl[_CAPACITY]) != (
            RING_MAGIC, RING_LAYOUT_VERSION, self.capacity
        ):
            raise RingError("shared region header does not match the session's rings")

    def client_ends(self, start: int = 0) -> tuple[Producer, Consumer]:
        """(requests out, replies in); ``start`` presets the counters (tests of wrap)."""
        reply = _reply_side(self.capacity)
        return (Producer(self.ctl, self._req, _REQUEST, start),
                Consumer(self.ctl, self._rep, reply, start))

    def service_ends(self, start: int = 0) -> tuple[Consumer, Producer]:
        """(requests in, replies out)."""
        reply = _reply_side(self.capacity)
        return (Consumer(self.ctl, self._req, _REQUEST, start),
                Producer(self.ctl, self._rep, reply, start))

    def release(self) -> None:
        for view in (self.ctl, self._req, self._rep, self._mv):
            view.release()
