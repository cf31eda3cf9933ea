"""The service's native transport codec (esem._native_core.ServerCodec, through
ServerSession) against the pure-Python reference: the same bytes in give the same
requests, the same replies out, and the same exception class at the same frame, for
valid traffic and for hostile frames (hypothesis), split however the stream is read.

The differential tests run two ServerSessions over one established transport: the
reference (``codec="python"``) after a real handshake, and its twin whose native codec
takes over the very same keys and nonce counters, so that one client's frames are valid
(or invalid) for both alike."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esem.core.status import Status
from esem.core.table import WaitMode
from esem.errors import EsemError, IntegrityError, ProtocolError
from esem.protocol.constants import MAX_FRAME_BODY, MAX_PLAINTEXT, Direction, Opcode, OpenFlag
from esem.protocol.crypto import MAX_NONCE, keybind_mac
from esem.protocol.frames import encode_frame
from esem.protocol.messages import Reply, Request, decode_reply, encode_request
from esem.protocol.session import (
    CODEC_ENV,
    ClientSession,
    HelloIn,
    RequestIn,
    ServerSession,
    State,
    seal_reply,
    service_codec,
)
from tests.protocol import SERVICE_KEY, SERVICE_PUBLIC

native_core = pytest.importorskip("esem._native_core")

HANDLE = bytes(range(16))
KEY = b"k" * 32


def established() -> tuple[ClientSession, ServerSession, ServerSession]:
    """A client, the reference server it shook hands with, and that server's native
    twin (same keys, same counters, same session id)."""
    client, ref = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY, codec="python")
    assert ref.receive_data(client.start()) == []
    assert client.receive_data(ref.data_to_send()) == []
    assert ref._transport is not None
    (rx_key, rx_n), (tx_key, tx_n) = ref._transport.directions()
    twin = ServerSession(SERVICE_KEY, codec="native")
    twin._transport = ref._transport  # for its session id only
    twin._native = native_core.ServerCodec(rx_key, rx_n, tx_key, tx_n)
    twin.state = State.OPEN
    return client, ref, twin


Outcome = tuple[list[RequestIn], str | None]


def run(server: ServerSession, chunks: list[bytes]) -> Outcome:
    """Feed ``chunks`` one read at a time, processing every event after each: the
    requests it yields, then the class of the error that stopped it (None)."""
    events: list[RequestIn] = []
    try:
        for chunk in chunks:
            server.feed(chunk)
            while (event := server.next_event()) is not None:
                assert isinstance(event, RequestIn)
                events.append(event)
    except EsemError as exc:
        assert server.state is State.CLOSED
        return events, type(exc).__name__
    return events, None


def requests() -> st.SearchStrategy[tuple[Request, bool]]:
    """Valid requests of every opcode a client sends (and whether to MAC it)."""
    name = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]),
                   min_size=1, max_size=40).map(lambda s: "/" + s).filter(
        lambda s: 2 <= len(s.encode()) <= 252)
    handle = st.binary(min_size=16, max_size=16)
    op_req = st.one_of(
        st.builds(lambda h: Request(Opcode.POST, 0, handle=h), handle),
        st.builds(lambda h: Request(Opcode.GETVALUE, 0, handle=h), handle),
        st.builds(lambda h: Request(Opcode.CLOSE, 0, handle=h), handle),
        st.builds(lambda h: Request(Opcode.ATTACH, 0, handle=h), handle),
        st.builds(lambda h, m: Request(Opcode.WAIT, 0, handle=h, wait_mode=m), handle,
                  st.sampled_from([WaitMode.BLOCK, WaitMode.TRY])),
        st.builds(lambda h, t: Request(Opcode.WAIT, 0, handle=h, wait_mode=WaitMode.TIMED,
                                       timeout_ns=t), handle, st.integers(0, 10**12)),
        st.builds(lambda n, f, m, v, k: Request(Opcode.OPEN, 0, name=n, oflag=f, mode=m,
                                                value=v, key=k),
                  name, st.sampled_from([OpenFlag.NONE, OpenFlag.CREAT,
                                         OpenFlag.CREAT | OpenFlag.EXCL | OpenFlag.ROBUST]),
                  st.integers(0, 0o7777), st.integers(0, 2**31 - 1),
                  st.one_of(st.none(), st.binary(min_size=16, max_size=32))),
        st.builds(lambda n: Request(Opcode.UNLINK, 0, name=n), name),
        st.builds(lambda n: Request(Opcode.STAT, 0, name=n), name),
        st.builds(lambda n: Request(Opcode.RECLAIM, 0, name=n), name),
        st.builds(lambda t: Request(Opcode.CANCEL, 0, target=t), st.integers(0, 2**64 - 1)),
        st.builds(lambda a: Request(Opcode.LIST, 0, after=a), st.one_of(st.just(""), name)),
        st.just(Request(Opcode.PING, 0)),
        st.just(Request(Opcode.SWITCHLESS, 0)),
        st.just(Request(Opcode.END, 0)),
    )
    return st.tuples(op_req, st.booleans())


def _frames_of(client: ClientSession, reqs: list[tuple[Request, bool]]) -> list[bytes]:
    out = []
    for req, mac in reqs:
        mac = mac and req.opcode not in (Opcode.END, Opcode.CANCEL, Opcode.LIST,
                                         Opcode.PING, Opcode.SWITCHLESS)
        out.append(client.send_request(req, key=KEY if mac else None,
                                       req_id=client.next_request_id()))
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def assert_same(chunks: list[bytes], ref: ServerSession, twin: ServerSession) -> Outcome:
    want = run(ref, chunks)
    got = run(twin, chunks)
    assert got == want
    return want


def test_native_is_the_default_and_the_variable_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CODEC_ENV, raising=False)
    assert service_codec() == "native" and ServerSession(SERVICE_KEY).codec == "native"
    monkeypatch.setenv(CODEC_ENV, " Python ")
    assert ServerSession(SERVICE_KEY).codec == "python"
    monkeypatch.setenv(CODEC_ENV, "rust")
    with pytest.raises(ValueError, match=CODEC_ENV):
        ServerSession(SERVICE_KEY)


@pytest.mark.parametrize("codec", ["native", "python"])
def test_a_real_handshake_hands_over_and_traffic_flows_both_ways(codec: str) -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY, codec=codec)
    assert server.receive_data(client.start()) == []
    assert client.receive_data(server.data_to_send()) == []
    assert (server._native is not None) == (codec == "native")
    frames = b"".join(_frames_of(client, [(Request(Opcode.POST, 0, handle=HANDLE), False),
                                          (Request(Opcode.GETVALUE, 0, handle=HANDLE), True)]))
    events = server.receive_data(frames)
    assert [e.request for e in events] == [Request(Opcode.POST, 1, handle=HANDLE),
                                           Request(Opcode.GETVALUE, 2, handle=HANDLE)]
    assert events[0].mac is None and events[1].mac is not None
    server.send_status(Opcode.POST, 1, Status.OK)
    server.send_status(Opcode.GETVALUE, 2, Status.OK, 7, mac_key=KEY)
    server.send_reply(Reply(Opcode.PING, 99, Status.EINVAL, message="no"))  # not pending
    with pytest.raises(ProtocolError):
        client.receive_data(server.data_to_send())  # PING 99 answers nothing...
    # ... after the two real replies, which the client took (they were no longer pending)
    assert not client.is_pending(1) and not client.is_pending(2)


def test_frames_sent_right_after_the_hello_go_through_the_codec_in_order() -> None:
    """Bytes a peer sends behind its HELLO (before any WELCOME it could have keys from)
    reach the codec at ``accept``: here a garbage frame and a partial one. Both codecs
    close on the garbage frame, at the same point."""
    outcomes = []
    for codec in ("python", "native"):
        client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY, codec=codec)
        server.feed(client.start() + encode_frame(b"\x00" * 40) + b"\x00\x00")
        assert isinstance(server.next_event(), HelloIn)
        server.accept()
        assert server.backlog == 1
        with pytest.raises(IntegrityError) as info:
            server.next_event()
        outcomes.append((type(info.value), server.state, server.backlog))
    assert outcomes[0] == outcomes[1] == (IntegrityError, State.CLOSED, 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(requests(), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 10**6), max_size=5))
def test_valid_traffic_decodes_identically_however_split(
        reqs: list[tuple[Request, bool]], cuts: list[int]) -> None:
    client, ref, twin = established()
    data = b"".join(_frames_of(client, reqs))
    events, error = assert_same(_split(data, cuts), ref, twin)
    assert error is None and len(events) == len(reqs)


# A mutation of the stream: (kind, position, byte).
mutations = st.tuples(st.sampled_from(["flip", "cut", "insert", "length"]),
                      st.integers(0, 10**6), st.integers(0, 255))


def _mutate(data: bytes, kind: str, pos: int, byte: int) -> bytes:
    pos %= len(data) + 1
    if kind == "flip" and pos < len(data):
        return data[:pos] + bytes([data[pos] ^ (byte or 1)]) + data[pos + 1:]
    if kind == "cut":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + bytes([byte]) + data[pos:]
    # a frame length rewritten: 0, beyond the limit, or just off
    value = [0, MAX_FRAME_BODY + 1, byte, 2**32 - 1][byte % 4]
    return data[:pos] + struct.pack(">I", value) + data[pos + 4:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(requests(), min_size=1, max_size=5),
       muts=st.lists(mutations, min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_mutated_frames_fail_identically(reqs: list[tuple[Request, bool]],
                                         muts: list[tuple[str, int, int]],
                                         cuts: list[int]) -> None:
    client, ref, twin = established()
    data = b"".join(_frames_of(client, reqs))
    for kind, pos, byte in muts:
        data = _mutate(data, kind, pos, byte)
    assert_same(_split(data, cuts), ref, twin)


def _plaintexts() -> st.SearchStrategy[bytes]:
    """Hostile plaintexts under a valid AEAD: a valid request's bytes mutated, or a
    header of any opcode/flags followed by random bytes."""
    header = st.builds(lambda op, fl, rid: struct.pack(">BBBQ", 1, op, fl, rid),
                       st.integers(0, 20), st.sampled_from([0, 1, 2, 0x81]),
                       st.integers(1, 2**64 - 1))
    random_body = st.builds(lambda h, b: h + b, header, st.binary(max_size=120))
    mutated = st.builds(
        lambda rq, muts: _mutate_plain(encode_request(rq[0], mac=rq[1], req_id=5)
                                       + (b"m" * 32 if rq[1] else b""), muts),
        requests(), st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]),
                                       st.integers(0, 400), st.integers(0, 255)), max_size=3))
    huge = st.builds(lambda h, n: h + b"\x00" * n, header,
                     st.integers(MAX_PLAINTEXT - 20, MAX_PLAINTEXT - 11))
    return st.one_of(random_body, mutated, huge, st.binary(max_size=16))


def _mutate_plain(data: bytes, muts: list[tuple[str, int, int]]) -> bytes:
    for kind, pos, byte in muts:
        data = _mutate(data, kind, pos, byte)
    return data


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plains=st.lists(_plaintexts(), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 10**6), max_size=3))
def test_hostile_plaintexts_decode_identically(plains: list[bytes], cuts: list[int]) -> None:
    """The request decoder on both sides: every plaintext sealed correctly, so what is
    compared is decoding and the session's id rules (exception class included)."""
    client, ref, twin = established()
    assert client._transport is not None
    data = b"".join(encode_frame(client._transport.encrypt(p)) for p in plains)
    assert_same(_split(data, cuts), ref, twin)


@settings(max_examples=200, deadline=None)
@given(op=st.sampled_from([Opcode.POST, Opcode.WAIT, Opcode.GETVALUE, Opcode.CLOSE,
                           Opcode.UNLINK, Opcode.CANCEL, Opcode.PING, Opcode.RECLAIM]),
       req_id=st.integers(0, 2**64 - 1),
       status=st.sampled_from(list(Status)), value=st.integers(0, 2**32 - 1),
       message=st.text(max_size=400), mac=st.booleans())
def test_replies_encode_byte_for_byte_as_the_reference(op: Opcode, req_id: int,
                                                       status: Status, value: int,
                                                       message: str, mac: bool) -> None:
    """``send_status`` (the native encoder) seals the very body ``seal_reply`` makes:
    the journal's replay compares them."""
    _, ref, twin = established()
    key = KEY if mac else None
    body = twin.send_status(op, req_id, status, value, message, mac_key=key)
    reply = Reply(op, req_id, status, value=value, message=message)
    assert body == seal_reply(reply, twin.binding_id, key)
    assert body == ref.send_status(op, req_id, status, value, message, mac_key=key)
    assert twin.data_to_send() == ref.data_to_send()  # same ciphertext, same counters
    decoded, signed, got_mac = decode_reply(body)
    assert decoded.status is status and decoded.req_id == req_id
    if mac:
        assert got_mac == keybind_mac(KEY, twin.binding_id, Direction.TO_CLIENT, signed)


def test_receive_nonce_exhaustion_is_the_same_integrity_error() -> None:
    client, ref, twin = established()
    assert ref._transport is not None
    (rx_key, _), (tx_key, tx_n) = ref._transport.directions()
    ref._transport._rx.n = MAX_NONCE
    twin._native = native_core.ServerCodec(rx_key, MAX_NONCE, tx_key, tx_n)
    frame = _frames_of(client, [(Request(Opcode.PING, 0), False)])[0]
    assert assert_same([frame], ref, twin) == ([], "IntegrityError")


def test_send_nonce_exhaustion_is_the_same_integrity_error() -> None:
    _, ref, twin = established()
    assert ref._transport is not None
    (rx_key, rx_n), (tx_key, _) = ref._transport.directions()
    ref._transport._tx.n = MAX_NONCE
    twin._native = native_core.ServerCodec(rx_key, rx_n, tx_key, MAX_NONCE)
    for server in (ref, twin):
        with pytest.raises(IntegrityError, match="nonces exhausted"):
            server.send_status(Opcode.PING, 1, Status.OK)
        with pytest.raises(IntegrityError, match="nonces exhausted"):
            server.send_body(seal_reply(Reply(Opcode.PING, 1, Status.OK), server.binding_id))


def test_an_oversized_reply_is_refused_before_it_uses_a_nonce() -> None:
    client, ref, twin = established()
    huge = Reply(Opcode.LIST, 1, Status.OK, data=b"x" * MAX_PLAINTEXT)
    for server in (ref, twin):
        with pytest.raises(ValueError):
            server.send_reply(huge)
    assert twin._native is not None and twin._native.nonces == (0, 0)
    # The next reply still reaches the client: no counter was skipped.
    client.send_request(Request(Opcode.PING, 1))
    twin.send_status(Opcode.PING, 1, Status.OK)
    assert [r.status for r in client.receive_data(twin.data_to_send())] == [Status.OK]


def test_after_an_error_the_codec_takes_nothing_more() -> None:
    """The native codec itself refuses input once a frame failed: a shell that went on
    feeding a failed session would still never get a later frame processed."""
    client, _, twin = established()
    good = _frames_of(client, [(Request(Opcode.PING, 0), False)] * 2)
    assert twin._native is not None
    events, error = twin._native.open(encode_frame(b"\x01" * 40) + good[0])
    assert events == [] and isinstance(error, IntegrityError)
    with pytest.raises(ProtocolError, match="closed"):
        twin._native.open(good[1])


def test_bad_arguments_are_value_errors_not_panics() -> None:
    with pytest.raises(ValueError):
        native_core.ServerCodec(b"short", 0, b"k" * 32, 0)
    codec = native_core.ServerCodec(b"k" * 32, 0, b"k" * 32, 0)
    with pytest.raises(ValueError):
        codec.seal_reply(200, 1, 0, 0, "", None, b"\0" * 32)  # no such opcode
    with pytest.raises(ValueError):
        codec.seal_reply(int(Opcode.POST), 1, 0, 0, "", KEY, b"short")  # binding id
    with pytest.raises(ValueError):
        codec.seal(b"x" * (MAX_PLAINTEXT + 1))  # would not fit a frame
    assert codec.nonces == (0, 0)
    with pytest.raises(OverflowError):
        codec.seal_reply(int(Opcode.POST), -1, 0, 0, "", None, b"\0" * 32)


def test_request_fields_match_the_reference_decoder_for_every_opcode() -> None:
    reqs: list[tuple[Request, bool]] = [
        (Request(Opcode.OPEN, 0, name="/a", oflag=OpenFlag.CREAT | OpenFlag.FOREIGN,
                 mode=0o640, value=3, key=b"q" * 16), True),
        (Request(Opcode.OPEN, 0, name="/é", oflag=OpenFlag.NONE), False),
        (Request(Opcode.WAIT, 0, handle=HANDLE, wait_mode=WaitMode.TIMED,
                 timeout_ns=123), True),
        (Request(Opcode.WAIT, 0, handle=HANDLE, wait_mode=WaitMode.TRY), False),
        (Request(Opcode.CANCEL, 0, target=2), False),
        (Request(Opcode.LIST, 0, after="/b"), False),
        (Request(Opcode.RECLAIM, 0, name="/c"), True),
    ]
    client, ref, twin = established()
    events, error = assert_same([b"".join(_frames_of(client, reqs))], ref, twin)
    assert error is None
    assert [dataclasses.replace(e.request, req_id=0) for e in events] == [r for r, _ in reqs]
    assert all(type(e.request.opcode) is Opcode for e in events)
    assert type(events[2].request.wait_mode) is WaitMode
    assert type(events[0].request.oflag) is OpenFlag


def test_resume_fields_match_the_reference() -> None:
    client, ref, twin = established()
    assert client._transport is not None
    body = encode_request(Request(Opcode.RESUME, 1, session=b"s" * 32, secret=b"r" * 32,
                                  awaited=(3, 9, 2**64 - 1)))
    events, error = assert_same([encode_frame(client._transport.encrypt(body))], ref, twin)
    assert error is None and events[0].request.awaited == (3, 9, 2**64 - 1)
