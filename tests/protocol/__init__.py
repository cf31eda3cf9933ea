"""Tests of the sans-I/O protocol layer (``esem.protocol``), and their shared helpers.

The helpers live here rather than in a conftest so the test modules import them
explicitly (``from . import ...``): hypothesis strategies that build every well-formed
request and reply within the wire limits, a deterministic byte mutator for the fuzz
tests, and an in-memory client/service pair that runs the real Noise NK handshake with
no sockets in between.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from hypothesis import strategies as st

from esem.core.limits import KEY_MAX_BYTES, KEY_MIN_BYTES, MAX_NAME_BYTES
from esem.core.status import Status
from esem.core.table import WaitMode
from esem.protocol.constants import (
    HANDLE_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_TIMEOUT_NS,
    Opcode,
    OpenFlag,
)
from esem.protocol.crypto import generate_static_key, public_key_of
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession, ServerSession, State

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

# ------------------------------------------------------------------ strategies

req_ids = st.integers(0, U64_MAX)
handles = st.binary(min_size=HANDLE_BYTES, max_size=HANDLE_BYTES)
keys = st.binary(min_size=KEY_MIN_BYTES, max_size=KEY_MAX_BYTES)
mac_keys = keys  # what a client MACs with: a key-binding key


def _fits(name: str) -> bool:
    return 2 <= len(name.encode("utf-8")) <= MAX_NAME_BYTES + 1


# The wire accepts any UTF-8 string of 2..MAX_NAME_BYTES + 1 bytes as a name (the core
# validates its shape); cover short text, multi-byte text and the exact upper bound.
names = st.one_of(
    st.text(min_size=1, max_size=40).map(lambda s: "/" + s).filter(_fits),
    st.integers(1, MAX_NAME_BYTES).map(lambda n: "/" + "n" * n),
    st.just("/" + "\u00e9" * (MAX_NAME_BYTES // 2)),  # 2-byte characters up to the bound
    st.just("/" + "\U0001f512" * (MAX_NAME_BYTES // 4)),  # 4-byte characters
)
open_flags = st.integers(0, 15).map(OpenFlag)


def _request_strategies(rid: st.SearchStrategy[int]) -> dict[Opcode, st.SearchStrategy[Request]]:
    wait = st.one_of(
        st.builds(
            lambda i, h, m: Request(Opcode.WAIT, i, handle=h, wait_mode=m),
            rid, handles, st.sampled_from([WaitMode.TRY, WaitMode.BLOCK]),
        ),
        st.builds(
            lambda i, h, t: Request(
                Opcode.WAIT, i, handle=h, wait_mode=WaitMode.TIMED, timeout_ns=t
            ),
            rid, handles, st.one_of(st.integers(0, MAX_TIMEOUT_NS), st.just(MAX_TIMEOUT_NS)),
        ),
    )
    by_op: dict[Opcode, st.SearchStrategy[Request]] = {
        Opcode.OPEN: st.builds(
            lambda i, n, f, m, v, k: Request(
                Opcode.OPEN, i, name=n, oflag=f, mode=m, value=v, key=k
            ),
            rid, names, open_flags, st.integers(0, 0xFFFF), st.integers(0, U32_MAX),
            st.none() | keys,
        ),
        Opcode.WAIT: wait,
        Opcode.CANCEL: st.builds(
            lambda i, t: Request(Opcode.CANCEL, i, target=t), rid, st.integers(0, U64_MAX)
        ),
        Opcode.LIST: st.builds(
            lambda i, a: Request(Opcode.LIST, i, after=a), rid,
            st.text(max_size=60).filter(lambda t: len(t.encode()) <= 252)
        ),
        Opcode.PING: st.builds(lambda i: Request(Opcode.PING, i), rid),
        Opcode.SWITCHLESS: st.builds(lambda i: Request(Opcode.SWITCHLESS, i), rid),
        Opcode.END: st.builds(lambda i: Request(Opcode.END, i), rid),
        Opcode.RESUME: st.builds(
            lambda i, h, r, a: Request(Opcode.RESUME, i, session=h, secret=r, awaited=a),
            rid, st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32),
            st.one_of(st.lists(st.integers(0, U64_MAX), max_size=40).map(tuple),
                      st.just(tuple(range(1, 1025)))),  # RESUME_MAX_AWAITED
        ),
    }
    for op in (Opcode.CLOSE, Opcode.POST, Opcode.GETVALUE, Opcode.ATTACH):
        by_op[op] = st.builds(lambda i, h, op=op: Request(op, i, handle=h), rid, handles)
    for op in (Opcode.UNLINK, Opcode.STAT, Opcode.RECLAIM):
        by_op[op] = st.builds(lambda i, n, op=op: Request(op, i, name=n), rid, names)
    assert set(by_op) == set(Opcode), "a new opcode needs a request strategy"
    return by_op


REQUESTS_BY_OPCODE = _request_strategies(req_ids)
requests = st.one_of(*REQUESTS_BY_OPCODE.values())

_refusal_text = st.text(max_size=200).filter(
    lambda t: len(t.encode("utf-8")) <= MAX_MESSAGE_BYTES
) | st.just("x" * MAX_MESSAGE_BYTES)


def _ok_reply(op: Opcode, rid: int, draw: st.DrawFn) -> Reply:
    if op in (Opcode.OPEN, Opcode.ATTACH):
        return Reply(op, rid, Status.OK, handle=draw(handles), created=draw(st.booleans()))
    # SWITCHLESS: the ring capacity; RECLAIM: the units released
    if op in (Opcode.GETVALUE, Opcode.SWITCHLESS, Opcode.RECLAIM):
        return Reply(op, rid, Status.OK, value=draw(st.integers(0, U32_MAX)))
    if op is Opcode.CANCEL:
        return Reply(op, rid, Status.OK, value=draw(st.integers(0, 1)))
    if op in (Opcode.LIST, Opcode.STAT):
        return Reply(op, rid, Status.OK, data=draw(st.binary(max_size=300)))
    if op is Opcode.RESUME:  # last_req_id
        return Reply(op, rid, Status.OK, value=draw(st.integers(0, U64_MAX)))
    return Reply(op, rid, Status.OK)


@st.composite
def replies(draw: st.DrawFn, opcode: Opcode | None = None, req_id: int | None = None) -> Reply:
    op = opcode if opcode is not None else draw(st.sampled_from(Opcode))
    rid = req_id if req_id is not None else draw(req_ids)
    status = draw(st.sampled_from(Status))
    if status is Status.OK:
        return _ok_reply(op, rid, draw)
    return Reply(op, rid, status, message=draw(_refusal_text))


# ------------------------------------------------------------------- mutation

Mutation = tuple[str, int, int, bytes]


@st.composite
def mutations(draw: st.DrawFn, max_ops: int = 3) -> list[Mutation]:
    """A recipe of byte edits, applied deterministically by ``mutate`` to any input
    (positions are reduced modulo its length), so one drawn recipe can be replayed on
    fresh sessions whose ciphertexts differ."""
    op = st.tuples(
        st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "append"]),
        st.integers(0, 2**16),
        st.integers(0, 255),
        st.binary(min_size=1, max_size=24),
    )
    return draw(st.lists(op, min_size=1, max_size=max_ops))


def mutate(data: bytes, recipe: list[Mutation]) -> bytes:
    buf = bytearray(data)
    for kind, pos, small, blob in recipe:
        at = pos % (len(buf) + 1)
        if kind == "flip" and buf:
            buf[pos % len(buf)] ^= 1 << (small % 8)
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = blob
        elif kind == "delete":
            del buf[at : at + 1 + small % 8]
        elif kind == "overwrite":
            buf[at : at + len(blob)] = blob
        elif kind == "append":
            buf += blob
    return bytes(buf)


def changes(data: bytes, recipe: list[Mutation]) -> bool:
    return mutate(data, recipe) != data


# ---------------------------------------------------------- in-memory sessions

SERVICE_KEY = generate_static_key()  # one per test run; the handshake's ephemerals vary
SERVICE_PUBLIC = public_key_of(SERVICE_KEY)


@dataclasses.dataclass
class Pair:
    """A client and a service session wired back to back in memory."""

    client: ClientSession
    server: ServerSession

    def request(self, req: Request, *, key: bytes | None = None) -> bytes:
        """The frame of ``req`` (numbered by the client when its id is 0)."""
        if req.req_id == 0:
            req = dataclasses.replace(req, req_id=self.client.next_request_id())
        return self.client.send_request(req, key=key)

    def reply(self, reply: Reply, *, mac_key: bytes | None = None) -> bytes:
        self.server.send_reply(reply, mac_key=mac_key)
        return self.server.data_to_send()


def handshake(client: ClientSession, server: ServerSession) -> None:
    assert server.receive_data(client.start()) == []
    assert client.receive_data(server.data_to_send()) == []


def make_pair(
    *, service_key: bytes = SERVICE_KEY, pinned: bytes = SERVICE_PUBLIC, establish: bool = True
) -> Pair:
    pair = Pair(ClientSession(pinned), ServerSession(service_key))
    if establish:
        handshake(pair.client, pair.server)
        assert pair.client.state is State.OPEN and pair.server.state is State.OPEN
    return pair


def feed(
    receive: Callable[[bytes], Sequence[object]],
    data: bytes,
    *,
    bytewise: bool,
    into: list[object] | None = None,
) -> list[object]:
    """Feed ``data`` to ``receive`` whole or one byte per call. Events are appended to
    ``into`` as they come, so a caller still has the ones delivered before an error."""
    events: list[object] = [] if into is None else into
    if not bytewise:
        events += receive(data)
        return events
    for i in range(len(data)):
        events += receive(data[i : i + 1])
    return events
