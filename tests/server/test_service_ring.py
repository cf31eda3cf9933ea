"""The native service ring ends (``esem._native_core.ServiceRing``) against the Python
reference (``esem.protocol.ring``'s service ``Consumer``/``Producer``), differentially.

Two real sealed memfds, each mapped shared: one served by the Python ends, one by the
native ring (which maps it itself). The same client (the Python client ends over each
region) and the same adversary (arbitrary values written into the header's counters)
act on both; after every step both service ends must have answered alike (the same
value, or an exception of the same class with the same message) and the two regions
must hold the same bytes, counters and data alike.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esem.protocol.ring import (
    MASK64,
    MIN_RING_BYTES,
    REP_HEAD,
    REP_SLEEP,
    REP_TAIL,
    REQ_DONE,
    REQ_HEAD,
    REQ_SLEEP,
    REQ_TAIL,
    Consumer,
    Producer,
    Region,
    RingError,
    region_size,
)
from esem.protocol.session import CODEC_ENV
from esem.server.embedded import EmbeddedService
from esem.server.switchless import RINGS_ENV, service_rings

native = pytest.importorskip("esem._native_core")
ServiceRing = native.ServiceRing

CAP = MIN_RING_BYTES
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(size: int, seals: int = SEALS) -> int:
    fd = os.memfd_create("esem-ring-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@dataclass
class Side:
    """One region: its mapping, the client's Python ends, and the service's ends."""

    fd: int
    mm: mmap.mmap
    region: Region
    client_tx: Producer
    client_rx: Consumer
    rx: Any  # the service's request end (Consumer or ServiceRing)
    tx: Any  # the service's reply end (Producer or ServiceRing)

    def close(self) -> None:
        if isinstance(self.rx, ServiceRing):
            self.rx.close()
        self.region.release()
        self.mm.close()
        os.close(self.fd)


def side(start: int, use_native: bool) -> Side:
    fd = sealed_memfd(region_size(CAP))
    mm = mmap.mmap(fd, region_size(CAP), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    region = Region(mm, CAP)
    region.initialize()
    for slot in (REQ_HEAD, REQ_TAIL, REP_HEAD, REP_TAIL):
        region.ctl[slot] = start  # as the honest ends' private counters start
    client_tx, client_rx = region.client_ends(start)
    if use_native:
        ring = ServiceRing(fd, CAP, start)
        rx: Any = ring
        tx: Any = ring
    else:
        rx, tx = region.service_ends(start)
    return Side(fd, mm, region, client_tx, client_rx, rx, tx)


@pytest.fixture
def pair() -> Iterator[tuple[Side, Side]]:
    ref, nat = side(0, False), side(0, True)
    try:
        yield ref, nat
    finally:
        ref.close()
        nat.close()


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # compared by class and message
        return (type(exc).__name__, str(exc))


def ready_ref(s: Side) -> bool:
    """What ``rings_ready`` must say, from the reference: bytes waiting, or a bad index."""
    try:
        return bool(s.rx.available())
    except RingError:
        return True


def awake_unread_ref(s: Side) -> bool:
    try:
        return bool(s.tx.unconsumed() > 0 and not s.tx.peer_sleeping())
    except RingError:
        return False


HEADER_SLOTS = (REQ_HEAD, REQ_TAIL, REQ_SLEEP, REP_HEAD, REP_TAIL, REP_SLEEP, REQ_DONE)
_limits = st.one_of(st.none(), st.integers(1, 64), st.integers(1, 2 * CAP))


def _pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ at every position (a misplaced copy shows)."""
    return bytes((i * 131 + seed) & 0xFF for i in range(n))


# Small frames, and large writes that wrap the ring or overfill it.
_payload = st.builds(_pattern, st.one_of(st.integers(0, 64),
                                         st.integers(CAP // 2 - 64, CAP + 100)),
                     st.integers(0, 255))
_BOUNDS = (1, -1, CAP - 1, CAP, CAP + 1, -CAP, -CAP + 1, -CAP - 1, 2**63)
_counter = st.one_of(
    st.integers(0, MASK64),
    # Relative to the current value (see ``step``): at and around the capacity bound.
    st.sampled_from(_BOUNDS),
    st.integers(-2 * CAP, 2 * CAP),
)
_ops = st.one_of(
    st.tuples(st.just("client_write"), _payload),
    st.tuples(st.just("client_read"), _limits),
    st.tuples(st.just("client_sleep"), st.booleans()),
    st.tuples(st.just("read"), _limits),
    st.tuples(st.just("write"), _payload),
    st.tuples(st.sampled_from(["available", "sleep", "wake", "done", "free",
                               "unconsumed", "peer_sleeping"]), st.none()),
    st.tuples(st.just("poke"), st.tuples(st.sampled_from(HEADER_SLOTS), _counter,
                                         st.booleans())),
    # The two indices the service reads, moved to and around their bounds.
    st.tuples(st.just("poke"), st.tuples(st.sampled_from([REQ_HEAD, REP_TAIL]),
                                         st.sampled_from(_BOUNDS), st.just(True))),
)


def step(s: Side, op: str, arg: Any) -> tuple[str, Any]:
    if op == "client_write":
        return outcome(s.client_tx.write, arg)
    if op == "client_read":
        return outcome(s.client_rx.read, arg)
    if op == "client_sleep":
        return outcome(s.client_rx.sleep if arg else s.client_rx.wake)
    if op == "read":
        return outcome(s.rx.read, arg)
    if op == "write":
        return outcome(s.tx.write, arg)
    if op == "poke":
        slot, value, relative = arg
        # Relative values land near the current counter (the interesting range: just
        # beyond capacity, just behind); absolute ones anywhere in the u64 space.
        s.region.ctl[slot] = ((s.region.ctl[slot] + value) if relative else value) & MASK64
        return ("ok", None)
    end = s.tx if op in ("free", "unconsumed", "peer_sleeping") else s.rx
    return outcome(getattr(end, op))


@settings(max_examples=1000, deadline=None)
@given(start=st.sampled_from([0, MASK64 - CAP // 2, 2**63]), ops=st.lists(_ops, max_size=40))
def test_native_ends_match_the_python_reference(start: int, ops: list[tuple[str, Any]]) -> None:
    ref, nat = side(start, False), side(start, True)
    try:
        for op, arg in ops:
            want = step(ref, op, arg)
            got = step(nat, op, arg)
            assert got == want, (op, arg)
            assert nat.mm[:] == ref.mm[:], (op, arg)  # counters and data, byte for byte
            for query in ("available", "free", "unconsumed", "peer_sleeping"):
                assert step(nat, query, None) == step(ref, query, None), (op, arg, query)
            assert native.rings_ready((nat.rx,)) == ready_ref(ref)
            assert native.rings_awake_unread((nat.tx,)) == awake_unread_ref(ref)
    finally:
        ref.close()
        nat.close()


def test_a_hostile_head_is_the_references_ring_error(pair: tuple[Side, Side]) -> None:
    """The concrete case the fuzzer covers: a head beyond capacity, for every method
    that reads it, raises RingError (a ProtocolError) with the reference's message."""
    ref, nat = pair
    for s in pair:
        s.region.ctl[REQ_HEAD] = CAP + 1
    for name in ("available", "read", "sleep"):
        with pytest.raises(RingError, match="producer index out of range"):
            getattr(nat.rx, name)()
        with pytest.raises(RingError, match="producer index out of range"):
            getattr(ref.rx, name)()
    for s in pair:
        s.region.ctl[REP_TAIL] = 5  # ahead of our head (0)
    for name in ("free", "unconsumed"):
        with pytest.raises(RingError, match="consumer index out of range"):
            getattr(nat.tx, name)()
    with pytest.raises(RingError, match="consumer index out of range"):
        nat.tx.write(b"x")
    assert nat.mm[:] == ref.mm[:]


def test_wrap_at_2_64_and_split_copies() -> None:
    ref, nat = side(MASK64 - 10, False), side(MASK64 - 10, True)
    try:
        data = bytes(range(256)) * 200
        assert nat.client_tx.write(data[:CAP]) == ref.client_tx.write(data[:CAP]) == CAP
        assert nat.rx.read(100) == ref.rx.read(100) == data[:100]
        assert nat.rx.read() == ref.rx.read() == data[100:CAP]
        assert nat.tx.write(data) == ref.tx.write(data) == CAP  # a byte stream: what fits
        assert nat.client_rx.read() == ref.client_rx.read() == data[:CAP]
        assert nat.region.ctl[REP_HEAD] == (MASK64 - 10 + CAP) & MASK64
        assert nat.mm[:] == ref.mm[:]
    finally:
        ref.close()
        nat.close()


def test_rings_ready_spans_many_rings_and_skips_closed_ones() -> None:
    sides = [side(0, True) for _ in range(3)]
    try:
        rings = tuple(s.rx for s in sides)
        assert native.rings_ready(rings) is False
        sides[2].client_tx.write(b"abc")
        assert native.rings_ready(rings) is True
        sides[2].rx.close()
        assert native.rings_ready(rings) is False  # closed: skipped, never touched
        sides[0].region.ctl[REQ_HEAD] = MASK64  # behind the tail: hostile
        assert native.rings_ready(rings) is True  # so that the pump raises and ends it
        sides[1].tx.write(b"reply")
        sides[1].client_rx.wake()
        assert native.rings_awake_unread(rings) is True
        sides[1].client_rx.sleep()
        assert native.rings_awake_unread(rings) is False
        with pytest.raises(TypeError):
            native.rings_ready((sides[0].region,))
    finally:
        for s in sides:
            s.close()


def test_a_closed_ring_refuses_everything() -> None:
    s = side(0, True)
    try:
        s.rx.close()
        assert s.rx.closed
        for name, args in (("read", ()), ("write", (b"x",)), ("available", ()),
                           ("sleep", ()), ("wake", ()), ("done", ()), ("free", ()),
                           ("unconsumed", ()), ("peer_sleeping", ())):
            with pytest.raises(ValueError, match="closed"):
                getattr(s.rx, name)(*args)
    finally:
        s.close()


def test_only_a_sealed_memfd_of_the_regions_size_is_mapped() -> None:
    size = region_size(CAP)
    unsealed = sealed_memfd(size, seals=0)
    short = sealed_memfd(size - 4096)
    right = sealed_memfd(size)
    try:
        with pytest.raises(RingError, match="not sealed"):
            ServiceRing(unsealed, CAP)
        with pytest.raises(RingError, match="wrong size"):
            ServiceRing(short, CAP)
        with pytest.raises(RingError, match="power of two"):
            ServiceRing(right, CAP + 1)
        with pytest.raises(OSError):
            ServiceRing(-1, CAP)
        ServiceRing(right, CAP).close()
    finally:
        for fd in (unsealed, short, right):
            os.close(fd)


HOLDER = r"""
import sys
from esem import O_CREAT, USE_ESEM, get_client, sem_open
s = sem_open(sys.argv[1], O_CREAT, 0o600, 0, flags=USE_ESEM)
s.post()
print(get_client().mode, flush=True)
sys.stdin.read()  # the session stays open until the test closes our stdin
"""


def test_service_rings_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Native ends by default with the native codec, Python ends with the Python codec;
    an explicit choice wins; native without the native codec, or a misspelt value, is
    an error (the daemon turns it into a start-up error)."""
    monkeypatch.delenv(RINGS_ENV, raising=False)
    assert service_rings("native") == "native"
    assert service_rings("python") == "python"
    monkeypatch.setenv(RINGS_ENV, " Python ")
    assert service_rings("native") == "python"
    monkeypatch.setenv(RINGS_ENV, "native")
    assert service_rings("native") == "native"
    with pytest.raises(RuntimeError, match="needs the native codec"):
        service_rings("python")
    monkeypatch.setenv(RINGS_ENV, "rust")
    with pytest.raises(ValueError, match="expected native or python"):
        service_rings("native")


@pytest.mark.parametrize("rings", ["native", "python", ""])
def test_esem_service_rings_selects_the_ring_ends(rings: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ESEM_SERVICE_RINGS picks the ends in a real daemon (unset: native, as the codec
    is): the native ring maps the memfd itself and keeps no descriptor of it after the
    hand-over, while Python's mmap keeps a duplicate; both map the region, and both
    serve the session."""
    monkeypatch.setenv(CODEC_ENV, "native")
    monkeypatch.setenv(RINGS_ENV, rings)
    codec = rings or "native"
    with EmbeddedService(switchless=True) as svc:
        assert svc.proc is not None
        env = {**os.environ, **svc.env(), "ESEM_SWITCHLESS": "1"}
        env.pop("ESEM_PUBKEY", None)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, f"/ring-{codec}"], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().strip() == "switchless"
            pid = svc.proc.pid
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            with open(f"/proc/{pid}/maps") as f:
                maps = [line for line in f if "/memfd:esem-ring" in line]
            assert len(maps) == 1
            held = [link for link in fds if link.startswith("/memfd:esem-ring")]
            assert len(held) == (0 if codec == "native" else 1)
        finally:
            if holder.stdin is not None:
                holder.stdin.close()
            assert holder.wait(timeout=30) == 0


def test_send_writes_and_rings_a_sleeping_client_only() -> None:
    """``send`` is ``write`` plus the doorbell: one byte when the client says it
    sleeps, none when it is awake or there is no bell; a full or dead doorbell is no
    error (the client reads the rings it has, or is gone)."""
    ref, nat = side(0, False), side(0, True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        for s in (ref, nat):
            s.client_rx.wake()
        assert nat.rx.send(b"one", ours.fileno()) == ref.tx.write(b"one") == 3
        with pytest.raises(BlockingIOError):
            theirs.recv(16)  # awake: not rung
        for s in (ref, nat):
            s.client_rx.sleep()
        assert nat.rx.send(b"two", ours.fileno()) == ref.tx.write(b"two") == 3
        assert theirs.recv(16) == b"\x01"
        assert nat.rx.send(b"3", -1) == ref.tx.write(b"3") == 1  # no bell: nothing rung
        assert nat.mm[:] == ref.mm[:]
        for s in (ref, nat):  # a client that never reads: the ring fills, then no room
            assert s.client_rx.read() == b"onetwo3"
        big = bytes(CAP + 10)
        assert nat.rx.send(big, ours.fileno()) == ref.tx.write(big) == CAP
        assert nat.rx.send(b"x", ours.fileno()) == ref.tx.write(b"x") == 0
        while True:  # fill the doorbell itself
            try:
                ours.send(b"\x01" * 4096)
            except BlockingIOError:
                break
        for s in (ref, nat):
            s.client_rx.read()
        assert nat.rx.send(b"full bell", ours.fileno()) == 9
        theirs.close()
        assert nat.rx.send(b"dead bell", ours.fileno()) == 9
        for s in (ref, nat):
            s.region.ctl[REP_TAIL] = s.region.ctl[REP_HEAD] + 5  # ahead of the head
        with pytest.raises(RingError, match="consumer index out of range"):
            nat.rx.send(b"y", ours.fileno())
    finally:
        ours.close()
        theirs.close()
        ref.close()
        nat.close()
