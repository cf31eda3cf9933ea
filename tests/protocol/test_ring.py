"""The switchless rings (``esem.protocol.ring``) over plain bytearrays: layout, byte-stream
semantics at every wrap, and hostile indices.

The region is shared with the peer and, in the threat model, with the A2 adversary, so
the properties that matter most are negative: whatever a peer writes into the header, an
end either does its job within its own data area or raises ``RingError``; it never reads
or writes outside, never returns more than the ring holds, and never lets the peer move
its private counter.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esem.errors import IntegrityError, ProtocolError
from esem.protocol.constants import LENGTH_BYTES, MAX_FRAME_BODY, Opcode
from esem.protocol.messages import Request
from esem.protocol.ring import (
    CACHE_LINE,
    HEADER_BYTES,
    MASK64,
    MAX_RING_BYTES,
    MIN_RING_BYTES,
    REP_HEAD,
    REP_SLEEP,
    REP_TAIL,
    REQ_DONE,
    REQ_HEAD,
    REQ_SLEEP,
    REQ_TAIL,
    RING_MAGIC,
    Region,
    RingError,
    check_capacity,
    region_size,
)

from . import make_pair

CAP = MIN_RING_BYTES
H = bytes(range(16))
SLOTS = (REQ_HEAD, REQ_TAIL, REQ_SLEEP, REP_HEAD, REP_TAIL, REP_SLEEP, REQ_DONE)
u64 = st.integers(0, MASK64)
# Counter starting points: zero, just before the u64 wrap, and anywhere.
starts = st.one_of(st.just(0), st.integers(MASK64 - 3 * CAP, MASK64), u64)


def region(capacity: int = CAP) -> tuple[bytearray, Region]:
    buf = bytearray(region_size(capacity))
    reg = Region(buf, capacity)
    reg.initialize()
    return buf, reg


def preset(reg: Region, start: int) -> None:
    """Both ends of both rings agree on ``start`` (as if that many bytes had passed)."""
    for slot in (REQ_HEAD, REQ_TAIL, REP_HEAD, REP_TAIL):
        reg.ctl[slot] = start & MASK64


# ------------------------------------------------------------------- layout


def test_layout_constants() -> None:
    assert MIN_RING_BYTES >= LENGTH_BYTES + MAX_FRAME_BODY  # a maximal frame always fits
    assert region_size(CAP) == HEADER_BYTES + 2 * CAP
    lines = {slot * 8 // CACHE_LINE for slot in SLOTS}
    assert len(lines) == len(SLOTS), "every counter and flag on a cache line of its own"
    assert all(slot * 8 + 8 <= HEADER_BYTES for slot in SLOTS)


@pytest.mark.parametrize("capacity", [0, 1, MIN_RING_BYTES // 2, MIN_RING_BYTES + 1,
                                      3 * MIN_RING_BYTES, MAX_RING_BYTES * 2, -CAP, 2**64])
def test_bad_capacities_are_ring_errors(capacity: int) -> None:
    with pytest.raises(RingError):
        check_capacity(capacity)
    assert issubclass(RingError, ProtocolError) and issubclass(RingError, IntegrityError)


def test_region_must_have_the_exact_size_and_be_writable() -> None:
    with pytest.raises(RingError):
        Region(bytearray(region_size(CAP) - 1), CAP)
    with pytest.raises(RingError):
        Region(bytearray(region_size(CAP) + 4096), CAP)
    with pytest.raises(RingError):
        Region(bytes(region_size(CAP)), CAP)  # type: ignore[arg-type]


def test_header_is_checked_by_the_attacher() -> None:
    buf, reg = region()
    assert struct.unpack_from("<Q", buf, 0)[0] == RING_MAGIC
    reg.check_header()
    assert all(reg.ctl[slot] == 0 for slot in SLOTS)
    other = Region(buf, CAP)
    other.check_header()
    for index, value in ((0, 0), (1, 99), (2, CAP * 2)):
        saved = reg.ctl[index]
        reg.ctl[index] = value
        with pytest.raises(RingError):
            other.check_header()
        reg.ctl[index] = saved


# ------------------------------------------------------------- byte streams


def test_requests_and_replies_flow_between_the_two_ends() -> None:
    _, reg = region()
    c_tx, c_rx = reg.client_ends()
    s_rx, s_tx = reg.service_ends()
    assert c_tx.write(b"request") == 7
    assert s_rx.available() == 7 and s_rx.read() == b"request" and s_rx.read() == b""
    assert s_tx.write(b"reply!") == 6
    assert c_rx.read() == b"reply!"
    assert c_tx.unconsumed() == 0 and c_tx.free() == CAP


def test_full_ring_takes_what_fits_and_wraps_with_a_split_copy() -> None:
    _, reg = region()
    tx, _ = reg.client_ends()
    rx, _ = reg.service_ends()
    assert tx.write(b"a" * (CAP - 10)) == CAP - 10
    assert tx.write(b"b" * 30) == 10  # only what fits: a byte stream, like send()
    assert tx.free() == 0 and tx.write(b"c") == 0
    assert rx.read() == b"a" * (CAP - 10) + b"b" * 10
    blob = bytes(range(256)) * 4
    assert tx.write(blob) == len(blob)  # starts 0 bytes before the end: wraps at once
    assert rx.read() == blob
    assert tx.write(b"x" * (CAP - 5)) == CAP - 5
    assert rx.read() == b"x" * (CAP - 5)
    assert tx.write(b"0123456789") == 10  # 5 bytes at the end, 5 at the start
    assert rx.read() == b"0123456789"


@settings(max_examples=200)
@given(start=starts, ops=st.lists(st.one_of(st.integers(0, 3 * CAP // 2),
                                            st.integers(-2 * CAP, -1)), max_size=40))
def test_stream_model(start: int, ops: list[int]) -> None:
    """Writes of any size (a negative op is a read: -1 of everything, -k of at most k
    bytes) at any counter position, across the u64 wrap: what comes out is exactly the
    prefix of what went in that was accepted, in order, and the two ends always agree on
    how full the ring is."""
    _, reg = region()
    preset(reg, start)
    tx, _ = reg.client_ends(start)
    rx, _ = reg.service_ends(start)
    sent = bytearray()
    got = bytearray()
    counter = 0
    for op in ops:
        if op == -1:
            got += rx.read()
        elif op < 0:
            before = len(sent) - len(got)
            chunk = rx.read(-op)
            assert len(chunk) == min(before, -op)
            got += chunk
        else:
            data = bytes((counter + i) % 251 for i in range(op))
            counter += op
            n = tx.write(data)
            assert n == min(op, CAP - (len(sent) - len(got)))
            sent += data[:n]
        assert rx.available() == len(sent) - len(got) == tx.unconsumed()
        assert tx.free() == CAP - tx.unconsumed()
    got += rx.read()
    assert got == sent


# ---------------------------------------------------------- hostile indices


def _outside(buf: bytearray, data_offset: int, cap: int, own: tuple[int, ...]) -> bytes:
    """Every byte an end must leave alone: all but its data area and its own slots."""
    out = bytearray(buf)
    out[data_offset : data_offset + cap] = bytes(cap)
    for slot in own:
        out[slot * 8 : slot * 8 + 8] = bytes(8)
    return bytes(out)


@settings(max_examples=300)
@given(start=starts, used=st.integers(0, CAP), head=u64, tail=u64,
       size=st.integers(0, 2 * CAP))
def test_garbage_indices_never_escape_the_ring(start: int, used: int, head: int, tail: int,
                                               size: int) -> None:
    """The peer overwrites the counters with anything: each end either works inside its
    own data area (never returning or writing more than the ring holds) or raises
    RingError; nothing else in the region changes, and the private counters hold."""
    buf, reg = region()
    preset(reg, start)
    tx, _ = reg.client_ends(start)
    rx, _ = reg.service_ends(start)
    tx.write(bytes(used))
    before = _outside(buf, HEADER_BYTES, CAP, (REQ_HEAD, REQ_TAIL))
    reg.ctl[REQ_HEAD] = head  # what the service's consumer reads
    try:
        data = rx.read()
    except RingError:
        assert (head - start) & MASK64 > CAP
    else:
        assert len(data) == (head - start) & MASK64 <= CAP
    reg.ctl[REQ_TAIL] = tail  # what the client's producer reads
    try:
        n = tx.write(bytes(size))
    except RingError:
        assert (start + used - tail) & MASK64 > CAP
    else:
        assert 0 <= n <= min(size, CAP)
    assert _outside(buf, HEADER_BYTES, CAP, (REQ_HEAD, REQ_TAIL)) == before


def test_a_peer_cannot_rewind_our_counters() -> None:
    """Our counter is private: the shared copy is written from it, never read back."""
    _, reg = region()
    tx, _ = reg.client_ends()
    rx, _ = reg.service_ends()
    tx.write(b"one")
    assert rx.read() == b"one"
    reg.ctl[REQ_TAIL] = 0  # the "consumer" pretends to have read nothing
    reg.ctl[REQ_HEAD] = 0  # and the "producer" to have written nothing
    with pytest.raises(RingError):
        rx.read()  # head 0 is behind our tail 3: out of range, not a replay
    reg.ctl[REQ_HEAD] = 3
    assert tx.free() == CAP - 3  # a stale tail only makes the producer more careful
    tx.write(b"two")
    assert rx.read() == b"two"


# ------------------------------------------------------------------ sleeping


def test_sleeping_flag_handshake() -> None:
    _, reg = region()
    tx, rx = reg.client_ends()[0], reg.service_ends()[0]
    assert not tx.peer_sleeping()
    assert rx.sleep() == 0  # nothing arrived: really sleep
    assert tx.peer_sleeping() and reg.ctl[REQ_SLEEP] == 1
    tx.write(b"wake up")
    assert tx.peer_sleeping()  # the producer must ring
    rx.wake()
    assert not tx.peer_sleeping()
    assert rx.sleep() == 7  # what came meanwhile is reported: read it, do not sleep
    rx.wake()
    assert rx.read() == b"wake up"


def test_processed_counter_tells_a_parked_request_from_a_busy_one() -> None:
    _, reg = region()
    tx, rx = reg.client_ends()[0], reg.service_ends()[0]
    tx.write(b"wait")
    assert not tx.all_done()  # not even read
    rx.read()
    assert not tx.all_done()  # read, still being processed: worth a spin
    rx.done()
    assert tx.all_done() and reg.ctl[REQ_DONE] == 4  # processed, no answer: parked
    tx.write(b"post")
    assert not tx.all_done()
    reg.ctl[REQ_DONE] = 12345  # a lying peer only moves the hint
    assert not tx.all_done()
    with pytest.raises(RuntimeError):
        reg.client_ends()[1].done()  # replies have no processed counter


def test_released_region_fails_cleanly() -> None:
    _, reg = region()
    tx, rx = reg.client_ends()
    reg.release()
    with pytest.raises(ValueError):
        tx.write(b"late")
    with pytest.raises(ValueError):
        rx.read()


# -------------------------------------------- the ring as the session's transport


def test_ring_carries_the_sessions_frames_and_tampering_is_caught() -> None:
    """The bytes in the ring are the socket's bytes: the same sessions produce and check
    them, so a flipped byte in a slot is an IntegrityError, never a request."""
    pair = make_pair()
    _, reg = region()
    tx, _ = reg.client_ends()
    rx, _ = reg.service_ends()
    post = pair.request(Request(Opcode.POST, 0, handle=H))
    assert tx.write(post) == len(post)
    [event] = pair.server.receive_data(rx.read())
    assert event.request.opcode is Opcode.POST
    second = pair.request(Request(Opcode.POST, 0, handle=H))
    tx.write(second)
    reg._req[(len(post) + 10) % CAP] ^= 0x40  # the adversary flips a ciphertext byte
    with pytest.raises(IntegrityError):
        pair.server.receive_data(rx.read())
