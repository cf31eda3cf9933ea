"""The native client's switchless rings (``native/esem-client/src/ring.rs``) against the
Python reference (``esem.protocol.ring``) on the same regions: what the Python service
end writes the Rust client end reads byte for byte, what the Rust client end writes is
what the Python client end writes (the same region afterwards) and what the Python
service end reads, across the 2^64 wrap, and both refuse the same hostile counters.

Driven through the ``ringcodec`` example, one JSON command per line.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from esem.protocol.frames import encode_frame
from esem.protocol.ring import (
    MASK64,
    MIN_RING_BYTES,
    REP_HEAD,
    REQ_TAIL,
    Region,
    RingError,
    region_size,
)


class RingCodec:
    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "ringcodec exited"
        answer: dict[str, Any] = json.loads(line)
        assert answer.get("error") != "Bad", answer
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def codec(native_build: Path) -> Iterator[RingCodec]:
    tool = RingCodec(native_build / "examples" / "ringcodec")
    yield tool
    tool.close()


def fresh(cap: int, start: int) -> tuple[bytearray, Region]:
    buf = bytearray(region_size(cap))
    region = Region(buf, cap)
    region.initialize()
    for slot in (8, 16, 32, 40):  # both rings' heads and tails start at `start`
        region.ctl[slot] = start
    return buf, region


STARTS = (0, 12345, MASK64 - 50, MASK64 - MIN_RING_BYTES + 7)


@pytest.mark.parametrize("start", STARTS)
def test_rust_reads_what_python_writes(codec: RingCodec, start: int) -> None:
    rnd = random.Random(start)
    cap = MIN_RING_BYTES
    buf, region = fresh(cap, start)
    _, service_tx = region.service_ends(start)
    read_so_far = 0
    for step in range(12):
        chunk = b"".join(encode_frame(rnd.randbytes(rnd.randrange(16, 200)))
                         for _ in range(rnd.randrange(1, 40)))
        written = service_tx.write(chunk)
        limit = None if step % 3 else rnd.randrange(1, 3000)
        # The Python client end on a copy of the same region, as the reference.
        ref_buf = bytearray(buf)
        ref_region = Region(ref_buf, cap)
        _, ref_rx = ref_region.client_ends((start + read_so_far) & MASK64)
        want = ref_rx.read(limit)
        got = codec.call(op="read", cap=cap, start=(start + read_so_far) & MASK64,
                         region=buf.hex(), limit=limit)
        assert got["ok"], got
        assert bytes.fromhex(got["data"]) == want
        assert bytes.fromhex(got["region"]) == bytes(ref_buf)  # the same tail published
        buf[:] = ref_buf
        read_so_far += len(want)
        assert written > 0
        ref_region.release()


@pytest.mark.parametrize("start", STARTS)
def test_python_reads_what_rust_writes(codec: RingCodec, start: int) -> None:
    rnd = random.Random(~start)
    cap = MIN_RING_BYTES
    buf, region = fresh(cap, start)
    service_rx, _ = region.service_ends(start)
    sent = 0
    for _ in range(12):
        data = rnd.randbytes(rnd.choice((1, 57, 4000, cap // 2, cap + 100)))
        ref_buf = bytearray(buf)
        ref_region = Region(ref_buf, cap)
        ref_tx, _ = ref_region.client_ends((start + sent) & MASK64)
        n = ref_tx.write(data)
        got = codec.call(op="write", cap=cap, start=(start + sent) & MASK64, region=buf.hex(),
                         data=data.hex())
        assert got["ok"], got
        assert got["n"] == n
        assert bytes.fromhex(got["region"]) == bytes(ref_buf)
        ref_region.release()
        buf[:] = bytes.fromhex(got["region"])
        sent += n
        assert service_rx.read() == data[:n]


@pytest.mark.parametrize("start", STARTS)
def test_both_refuse_the_same_hostile_counters(codec: RingCodec, start: int) -> None:
    cap = MIN_RING_BYTES
    for head_delta in (cap + 1, cap + 4096, MASK64, MASK64 - 3, 1 << 63):
        buf, region = fresh(cap, start)
        region.ctl[REP_HEAD] = (start + head_delta) & MASK64
        _, rx = region.client_ends(start)
        with pytest.raises(RingError):
            rx.read()
        got = codec.call(op="read", cap=cap, start=start, region=buf.hex(), limit=None)
        assert not got["ok"] and got["error"] == "ProtocolError", got
        region.release()
    for tail_delta in (1, 5, cap + 1, 1 << 63):  # ahead of our head, or too far behind
        for sign in (1, -1):
            buf, region = fresh(cap, start)
            region.ctl[REQ_TAIL] = (start + sign * tail_delta
                                    - (cap if sign < 0 else 0)) & MASK64
            tx, _ = region.client_ends(start)
            with pytest.raises(RingError):
                tx.write(b"x")
            got = codec.call(op="write", cap=cap, start=start, region=buf.hex(), data="78")
            assert not got["ok"] and got["error"] == "ProtocolError", got
            region.release()
    # The edges that are legal for both: a full reply ring, a request ring with no room.
    buf, region = fresh(cap, start)
    region.ctl[REP_HEAD] = (start + cap) & MASK64
    region.ctl[REQ_TAIL] = (start - cap) & MASK64
    _, rx = region.client_ends(start)
    want = rx.read()
    assert len(want) == cap
    got = codec.call(op="read", cap=cap, start=start, region=buf.hex(), limit=None)
    assert got["ok"] and len(bytes.fromhex(got["data"])) == cap
    got = codec.call(op="write", cap=cap, start=start, region=buf.hex(), data="78")
    assert got["ok"] and got["n"] == 0
    region.release()


def test_both_refuse_a_wrong_header(codec: RingCodec) -> None:
    cap = MIN_RING_BYTES
    buf, region = fresh(cap, 0)
    region.ctl[2] = cap * 2  # the header's capacity is not the authenticated one
    with pytest.raises(RingError):
        region.check_header()
    got = codec.call(op="read", cap=cap, start=0, region=buf.hex(), limit=None)
    assert not got["ok"] and got["error"] == "ProtocolError", got
    region.release()
