"""In-memory client/service pairs over the sans-I/O sessions (no sockets).

Covers the handshake and service-key pinning (adversary A5), the channel adversary on
the byte stream between the two ends (A2: replay, reorder, drop, flip, truncate, inject,
cross-session forgery), request-id sequencing, reply matching, key-binding MACs (A4) and
refusals. Every tamper must raise ``IntegrityError`` on the receiving side, close the
session for good, and never deliver the tampered message.
"""

from __future__ import annotations

import errno
import struct

import pytest

from esem.core.status import CoreError, Status
from esem.core.table import WaitMode
from esem.errors import (
    Cancelled,
    EsemError,
    IntegrityError,
    KeyRejected,
    ProtocolError,
    QuotaExceeded,
    error_for,
)
from esem.protocol.constants import (
    MAC_BYTES,
    MAX_FRAME_BODY,
    MAX_MESSAGE_BYTES,
    MAX_PLAINTEXT,
    NOISE_MSG_BYTES,
    NOISE_WELCOME_BYTES,
    VERSION,
    Direction,
    FrameKind,
    Opcode,
)
from esem.protocol.crypto import generate_static_key, keybind_mac, public_key_of
from esem.protocol.frames import encode_frame
from esem.protocol.messages import Reply, Request, encode_reply, encode_request
from esem.protocol.session import ClientSession, RequestIn, ServerSession, State

from . import SERVICE_KEY, SERVICE_PUBLIC, Pair, feed, make_pair

H = bytes(range(16))
K = b"k" * 32
K2 = b"K" * 16


def post(req_id: int = 0) -> Request:
    return Request(Opcode.POST, req_id, handle=H)


def ok(op: Opcode, req_id: int, **fields: object) -> Reply:
    return Reply(op, req_id, Status.OK, **fields)  # type: ignore[arg-type]


def frames_of(stream: bytes) -> list[bytes]:
    """Split a byte stream back into whole frames (length prefix included)."""
    out: list[bytes] = []
    while stream:
        n = int.from_bytes(stream[:4], "big")
        out.append(stream[: 4 + n])
        stream = stream[4 + n :]
    return out


def assert_closed(session: ClientSession | ServerSession) -> None:
    assert session.state is State.CLOSED
    with pytest.raises(ProtocolError, match="closed"):
        session.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        session.receive_data(encode_frame(b"anything"))


# -------------------------------------------------------------------- handshake


def test_handshake_establishes_one_session_id() -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    assert client.state is State.START and server.state is State.AWAIT_HELLO
    assert not client.established
    hello = client.start()
    assert client.state is State.AWAIT_WELCOME
    assert server.receive_data(hello) == []
    assert server.state is State.OPEN
    welcome = server.data_to_send()
    assert server.data_to_send() == b""  # drained
    assert client.receive_data(welcome) == []
    assert client.established and client.state is State.OPEN
    assert client.session_id == server.session_id
    assert len(client.session_id) == 32  # the BLAKE2s handshake hash


def test_handshake_frames_layout() -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    hello = client.start()
    assert hello[:6] == struct.pack(">IBB", 2 + NOISE_MSG_BYTES, VERSION, FrameKind.HELLO)
    assert len(hello) == 4 + 2 + NOISE_MSG_BYTES
    server.receive_data(hello)
    welcome = server.data_to_send()
    # WELCOME carries the 32-byte resumption secret: 80 + 2 = 82 body bytes, 86 on the wire
    assert welcome[:6] == struct.pack(">IBB", 2 + NOISE_WELCOME_BYTES, VERSION,
                                      FrameKind.WELCOME)
    assert len(welcome) == 4 + 2 + NOISE_WELCOME_BYTES == 86


def test_each_session_has_its_own_id_and_keys() -> None:
    a, b = make_pair(), make_pair()
    assert a.client.session_id != b.client.session_id
    # Same request, same id, same service key: different ciphertexts.
    assert a.request(post(1)) != b.request(post(1))


def test_handshake_bytewise() -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    assert feed(server.receive_data, client.start(), bytewise=True) == []
    assert feed(client.receive_data, server.data_to_send(), bytewise=True) == []
    assert client.established


def test_session_id_before_handshake_is_misuse() -> None:
    with pytest.raises(RuntimeError):
        _ = ClientSession(SERVICE_PUBLIC).session_id


def test_client_misuse_raises_runtime_error() -> None:
    client = ClientSession(SERVICE_PUBLIC)
    with pytest.raises(RuntimeError):
        client.send_request(post(1))
    client.start()
    with pytest.raises(RuntimeError, match="already"):
        client.start()
    with pytest.raises(ValueError):
        ClientSession(b"short")


def test_server_cannot_reply_before_handshake() -> None:
    with pytest.raises(RuntimeError):
        ServerSession(SERVICE_KEY).send_reply(ok(Opcode.PING, 1))


def test_impersonator_with_another_key_fails_the_handshake() -> None:
    """A5: a service with another static key listens where the pinned one should. NK's
    first message is already sealed to the pinned key, so the impostor cannot read it;
    whatever WELCOME it answers with (here, a well-formed one from a handshake with a
    client that does trust its key) fails the pinned client's handshake."""
    rogue_key = generate_static_key()
    client = ClientSession(SERVICE_PUBLIC)
    hello = client.start()
    with pytest.raises(IntegrityError):
        ServerSession(rogue_key).receive_data(hello)
    rogue = ServerSession(rogue_key)
    rogue.receive_data(ClientSession(public_key_of(rogue_key)).start())
    with pytest.raises(IntegrityError, match="pinned"):
        client.receive_data(rogue.data_to_send())
    assert_closed(client)
    with pytest.raises(RuntimeError):
        client.send_request(post(1))


def test_impersonator_replaying_a_real_welcome_fails() -> None:
    """A recorded WELCOME of the real service answers another client's HELLO."""
    real = make_pair(establish=False)
    real.server.receive_data(real.client.start())
    recorded = real.server.data_to_send()
    victim = ClientSession(SERVICE_PUBLIC)
    victim.start()
    with pytest.raises(IntegrityError):
        victim.receive_data(recorded)
    assert_closed(victim)


@pytest.mark.parametrize(
    "body",
    [
        b"\x01",  # truncated
        bytes((VERSION + 1, FrameKind.HELLO)) + bytes(NOISE_MSG_BYTES),
        bytes((VERSION, 0)) + bytes(NOISE_MSG_BYTES),
        bytes((VERSION, 9)) + bytes(NOISE_MSG_BYTES),
        bytes((VERSION, FrameKind.WELCOME)) + bytes(NOISE_MSG_BYTES),
        bytes((VERSION, FrameKind.REFUSED)) + b"\x00\x01",
        bytes((VERSION, FrameKind.HELLO)),  # no Noise message
        bytes((VERSION, FrameKind.HELLO)) + bytes(NOISE_MSG_BYTES),  # all-zero key
        bytes((VERSION, FrameKind.HELLO)) + b"\x09" * (NOISE_MSG_BYTES + 5),
    ],
)
def test_service_refuses_malformed_hello(body: bytes) -> None:
    server = ServerSession(SERVICE_KEY)
    with pytest.raises(IntegrityError):
        server.receive_data(encode_frame(body))
    assert_closed(server)
    assert server.data_to_send() == b""


def test_client_refuses_hello_and_garbage_as_welcome() -> None:
    for body in (bytes((VERSION, FrameKind.HELLO)) + bytes(NOISE_MSG_BYTES), b"\x01",
                 bytes((2, FrameKind.WELCOME)) + bytes(NOISE_MSG_BYTES)):
        client = ClientSession(SERVICE_PUBLIC)
        client.start()
        with pytest.raises(ProtocolError):
            client.receive_data(encode_frame(body))
        assert_closed(client)


def test_client_refuses_data_before_start() -> None:
    client = ClientSession(SERVICE_PUBLIC)
    with pytest.raises(ProtocolError, match="no frame expected"):
        client.receive_data(encode_frame(b"\x01\x02"))
    assert client.state is State.CLOSED


def test_second_hello_after_handshake_fails_authentication() -> None:
    pair = make_pair()
    with pytest.raises(IntegrityError):
        pair.server.receive_data(ClientSession(SERVICE_PUBLIC).start())
    assert_closed(pair.server)


# --------------------------------------------------------------------- refusals


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.OK],
                         ids=lambda s: s.name)
def test_refusal_raises_the_mapped_error(status: Status) -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    hello = client.start()
    server.refuse(status, "nope")
    assert server.state is State.CLOSED
    with pytest.raises(EsemError) as info:
        client.receive_data(server.data_to_send())
    assert type(info.value) is type(error_for(status, ""))
    assert info.value.status is status
    assert "nope" in str(info.value)
    assert_closed(client)
    # The refused service ignores nothing: any later byte is a protocol error.
    with pytest.raises(ProtocolError):
        server.receive_data(hello)


def test_quota_refusal_is_quota_exceeded() -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    client.start()
    server.refuse(Status.EDQUOT, "uid 1000 has 128 sessions (quota)")
    frame = server.data_to_send()
    assert frame[4:8] == struct.pack(">BBH", VERSION, FrameKind.REFUSED, Status.EDQUOT)
    with pytest.raises(QuotaExceeded, match="128 sessions") as info:
        client.receive_data(frame)
    assert info.value.errno == errno.EDQUOT


def test_refusal_text_is_cut_to_max_message_bytes() -> None:
    server = ServerSession(SERVICE_KEY)
    server.refuse(Status.EDQUOT, "q" * 5000)
    frame = server.data_to_send()
    assert len(frame) == 4 + 4 + MAX_MESSAGE_BYTES


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", b"\x00\x00quota", b"\xff\xffquota", (max(Status) + 1).to_bytes(2, "big")],
    ids=["empty", "short", "status-OK", "unknown", "unknown-bare"],
)
def test_malformed_refusal_is_a_protocol_error(payload: bytes) -> None:
    client = ClientSession(SERVICE_PUBLIC)
    client.start()
    with pytest.raises(ProtocolError):
        client.receive_data(encode_frame(bytes((VERSION, FrameKind.REFUSED)) + payload))
    assert_closed(client)


# --------------------------------------------------------------- request/reply


def test_every_opcode_goes_through_and_back() -> None:
    pair = make_pair()
    sent = [
        Request(Opcode.OPEN, 0, name="/a", mode=0o600),
        Request(Opcode.CLOSE, 0, handle=H),
        Request(Opcode.UNLINK, 0, name="/a"),
        Request(Opcode.WAIT, 0, handle=H, wait_mode=WaitMode.TIMED, timeout_ns=5),
        Request(Opcode.POST, 0, handle=H),
        Request(Opcode.GETVALUE, 0, handle=H),
        Request(Opcode.CANCEL, 0, target=4),
        Request(Opcode.ATTACH, 0, handle=H),
        Request(Opcode.LIST, 0, after=""),
        Request(Opcode.STAT, 0, name="/a"),
        Request(Opcode.PING, 0),
        Request(Opcode.SWITCHLESS, 0),
        Request(Opcode.RECLAIM, 0, name="/a"),
        Request(Opcode.END, 0),
    ]
    # RESUME is valid only as a connection's first request: tests of its own below
    assert {r.opcode for r in sent} == set(Opcode) - {Opcode.RESUME}
    stream = b"".join(pair.request(r) for r in sent)
    assert pair.client.pending == len(sent)
    events = pair.server.receive_data(stream)
    assert [e.request.opcode for e in events] == [r.opcode for r in sent]
    assert [e.request.req_id for e in events] == list(range(1, len(sent) + 1))
    assert all(e.mac is None for e in events)
    payload: dict[Opcode, dict[str, object]] = {
        Opcode.OPEN: {"handle": H, "created": True},
        Opcode.ATTACH: {"handle": H},
        Opcode.GETVALUE: {"value": 3},
        Opcode.CANCEL: {"value": 0},
        Opcode.SWITCHLESS: {"value": 65536},
        Opcode.RECLAIM: {"value": 2},
        Opcode.LIST: {"data": b'{"total": 0, "offset": 0, "entries": []}'},
        Opcode.STAT: {"data": b"{}"},
    }
    answers = [ok(e.request.opcode, e.request.req_id, **payload.get(e.request.opcode, {}))
               for e in reversed(events)]  # replies may come in any order
    for answer in answers:
        pair.server.send_reply(answer)
    assert pair.client.receive_data(pair.server.data_to_send()) == answers
    assert pair.client.pending == 0


def test_bytewise_delivery_in_both_directions() -> None:
    pair = make_pair()
    stream = pair.request(post()) + pair.request(Request(Opcode.GETVALUE, 0, handle=H))
    events = feed(pair.server.receive_data, stream, bytewise=True)
    assert [e.request.req_id for e in events] == [1, 2]  # type: ignore[attr-defined]
    pair.server.send_reply(ok(Opcode.POST, 1))
    pair.server.send_reply(ok(Opcode.GETVALUE, 2, value=9))
    replies = feed(pair.client.receive_data, pair.server.data_to_send(), bytewise=True)
    assert replies == [ok(Opcode.POST, 1), ok(Opcode.GETVALUE, 2, value=9)]


def test_request_ids_need_only_increase() -> None:
    pair = make_pair()
    for rid in (1, 5, 2**40, 2**64 - 1):
        assert pair.server.receive_data(pair.request(post(rid)))[0].request.req_id == rid


@pytest.mark.parametrize("ids", [(0,), (3, 3), (7, 2)], ids=["zero", "repeat", "decrease"])
def test_request_id_that_does_not_increase_is_a_protocol_error(ids: tuple[int, ...]) -> None:
    pair = make_pair()
    for rid in ids[:-1]:
        pair.server.receive_data(pair.client.send_request(post(rid)))
        pair.client.receive_data(pair.reply(ok(Opcode.POST, rid)))  # not pending any more
    with pytest.raises(ProtocolError, match="does not increase"):
        pair.server.receive_data(pair.client.send_request(post(ids[-1])))
    assert_closed(pair.server)


def test_client_refuses_a_second_request_with_a_pending_id() -> None:
    pair = make_pair()
    pair.request(post(4))
    with pytest.raises(RuntimeError, match="in flight"):
        pair.request(post(4))


def _answered(pair: Pair, *reqs: Request) -> None:
    for r in reqs:
        pair.server.receive_data(pair.request(r))


def test_reply_to_no_pending_request_is_refused() -> None:
    pair = make_pair()
    _answered(pair, post(1))
    with pytest.raises(ProtocolError, match="no pending"):
        pair.client.receive_data(pair.reply(ok(Opcode.POST, 2)))
    assert_closed(pair.client)


def test_reply_with_another_opcode_is_refused() -> None:
    pair = make_pair()
    _answered(pair, post(1))
    with pytest.raises(ProtocolError, match="no pending"):
        pair.client.receive_data(pair.reply(ok(Opcode.GETVALUE, 1, value=5)))
    assert_closed(pair.client)


def test_second_reply_to_one_request_is_refused() -> None:
    pair = make_pair()
    _answered(pair, post(1))
    assert pair.client.receive_data(pair.reply(ok(Opcode.POST, 1))) == [ok(Opcode.POST, 1)]
    with pytest.raises(ProtocolError):
        pair.client.receive_data(pair.reply(ok(Opcode.POST, 1)))
    assert_closed(pair.client)


def test_reply_that_does_not_parse_is_a_protocol_error() -> None:
    pair = make_pair()
    _answered(pair, post(1))
    # The service's own transport, sealing a malformed reply: only a buggy or tampered
    # peer does that, and the client closes the session.
    forged = pair.server._transport.encrypt(b"\x01\x05\x00")  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="truncated"):
        pair.client.receive_data(encode_frame(forged))
    assert_closed(pair.client)


def test_cancel_and_wait_answers() -> None:
    """CANCEL answers 1 (withdrawn) and the wait ends ECANCELED, in either order."""
    pair = make_pair()
    wait = Request(Opcode.WAIT, 0, handle=H, wait_mode=WaitMode.BLOCK)
    _answered(pair, wait, Request(Opcode.CANCEL, 0, target=1))
    pair.server.send_reply(Reply(Opcode.WAIT, 1, Status.ECANCELED, message="wait cancelled"))
    pair.server.send_reply(ok(Opcode.CANCEL, 2, value=1))
    got = pair.client.receive_data(pair.server.data_to_send())
    assert got[0].status is Status.ECANCELED and got[1].value == 1
    with pytest.raises(Cancelled):
        raise error_for(got[0].status, got[0].message)


# ----------------------------------------------------------- channel adversary


def _two_requests(pair: Pair) -> list[bytes]:
    return [pair.request(post()), pair.request(Request(Opcode.GETVALUE, 0, handle=H))]


def _two_replies(pair: Pair) -> list[bytes]:
    _answered(pair, post(1), Request(Opcode.GETVALUE, 2, handle=H))
    return [pair.reply(ok(Opcode.POST, 1)), pair.reply(ok(Opcode.GETVALUE, 2, value=3))]


DIRECTIONS = pytest.mark.parametrize("to", ["service", "client"])


def _setup(to: str) -> tuple[Pair, list[bytes], ClientSession | ServerSession]:
    pair = make_pair()
    if to == "service":
        return pair, _two_requests(pair), pair.server
    return pair, _two_replies(pair), pair.client


@DIRECTIONS
def test_untampered_baseline(to: str) -> None:
    _, frames, receiver = _setup(to)
    assert len(receiver.receive_data(b"".join(frames))) == 2


@DIRECTIONS
def test_replayed_frame_fails(to: str) -> None:
    _, (f1, _), receiver = _setup(to)
    assert len(receiver.receive_data(f1)) == 1
    with pytest.raises(IntegrityError):
        receiver.receive_data(f1)
    assert_closed(receiver)


@DIRECTIONS
def test_replayed_frame_fails_even_after_later_ones(to: str) -> None:
    _, (f1, f2), receiver = _setup(to)
    assert len(receiver.receive_data(f1 + f2)) == 2
    with pytest.raises(IntegrityError):
        receiver.receive_data(f2)
    assert_closed(receiver)


@DIRECTIONS
def test_reordered_frames_fail(to: str) -> None:
    _, (_, f2), receiver = _setup(to)
    with pytest.raises(IntegrityError):
        receiver.receive_data(f2)
    assert_closed(receiver)


@DIRECTIONS
def test_reordered_frames_in_one_read_fail(to: str) -> None:
    _, (f1, f2), receiver = _setup(to)
    with pytest.raises(IntegrityError):
        receiver.receive_data(f2 + f1)
    assert_closed(receiver)


def test_dropped_frame_then_next_fails() -> None:
    pair = make_pair()
    f1, _f2, f3 = pair.request(post()), pair.request(post()), pair.request(post())
    assert len(pair.server.receive_data(f1)) == 1
    with pytest.raises(IntegrityError):
        pair.server.receive_data(f3)  # f2 dropped: f3 is under the wrong counter
    assert_closed(pair.server)


def test_dropped_reply_then_next_fails() -> None:
    _, (_, r2), client = _setup("client")
    with pytest.raises(IntegrityError):
        client.receive_data(r2)  # r1 dropped
    assert_closed(client)


@DIRECTIONS
def test_every_single_bit_flip_fails(to: str) -> None:
    """Flip each bit of the second frame in turn: body flips fail authentication at
    once; length flips either fail at once (out of range) or swallow the bytes that
    follow (the frame is then cut or overlong) and fail when the decoder has them."""
    _, frames, _ = _setup(to)
    for bit in range(len(frames[1]) * 8):  # the frame's length is the same every time
        _, (f1, f2), receiver = _setup(to)
        flipped = bytearray(f2)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert len(receiver.receive_data(f1)) == 1
        events: list[object] = []
        with pytest.raises(IntegrityError):
            feed(receiver.receive_data, bytes(flipped), bytewise=False, into=events)
            # Later traffic (here: padding) completes a lengthened frame.
            feed(receiver.receive_data, b"\x00" * (MAX_FRAME_BODY + 4), bytewise=False,
                 into=events)
        assert events == [], f"bit {bit} flipped and accepted"
        assert_closed(receiver)


def _genuine(to: str) -> list[object]:
    """What the receiver of ``_setup(to)`` yields for the untampered frames."""
    if to == "service":
        reqs = [post(1), Request(Opcode.GETVALUE, 2, handle=H)]
        return [RequestIn(r, encode_request(r), None) for r in reqs]
    return [ok(Opcode.POST, 1), ok(Opcode.GETVALUE, 2, value=3)]


@DIRECTIONS
@pytest.mark.parametrize("cut", [1, 5, 16, 17])
def test_truncated_frame_then_next_fails(to: str, cut: int) -> None:
    """Cut the first frame short and send the second: the decoder makes a frame of the
    stump and the next bytes, which fails. (If the cut bytes happen to equal the next
    ones, the first frame is genuine after all and the stream fails one frame later.)"""
    _, (f1, f2), receiver = _setup(to)
    events: list[object] = []
    assert receiver.receive_data(f1[: len(f1) - cut]) == []  # incomplete: nothing yet
    with pytest.raises(IntegrityError):
        feed(receiver.receive_data, f2, bytewise=False, into=events)
        feed(receiver.receive_data, bytes(MAX_FRAME_BODY + 4), bytewise=False, into=events)
    assert events == _genuine(to)[: len(events)] and len(events) <= 1
    assert_closed(receiver)


@DIRECTIONS
def test_frame_cut_by_a_shortened_length_fails(to: str) -> None:
    _, (f1, _), receiver = _setup(to)
    n = len(f1) - 4
    relabelled = (n - 1).to_bytes(4, "big") + f1[4:-1]
    with pytest.raises(IntegrityError):
        receiver.receive_data(relabelled)
    assert_closed(receiver)


@DIRECTIONS
@pytest.mark.parametrize("size", [1, 16, 17, 45, 64, MAX_FRAME_BODY])
def test_injected_random_frame_fails(to: str, size: int) -> None:
    import os

    _, (f1, _), receiver = _setup(to)
    assert len(receiver.receive_data(f1)) == 1
    with pytest.raises(IntegrityError):
        receiver.receive_data(encode_frame(os.urandom(size)))
    assert_closed(receiver)


@DIRECTIONS
def test_injected_frame_before_the_real_one_fails(to: str) -> None:
    import os

    _, (f1, _), receiver = _setup(to)
    fake = encode_frame(os.urandom(len(f1) - 4))  # same length as the real frame
    with pytest.raises(IntegrityError):
        receiver.receive_data(fake + f1)
    assert_closed(receiver)


@DIRECTIONS
def test_zero_and_oversized_lengths_are_protocol_errors(to: str) -> None:
    for prefix in (b"\x00\x00\x00\x00", (MAX_FRAME_BODY + 1).to_bytes(4, "big")):
        _, _, receiver = _setup(to)
        with pytest.raises(ProtocolError, match="frame length"):
            receiver.receive_data(prefix)
        assert_closed(receiver)


def test_forged_reply_from_another_session_fails() -> None:
    """A reply the real service sealed for another session, spliced into this one."""
    victim, other = make_pair(), make_pair()
    _answered(victim, post(1))
    _answered(other, post(1))
    forged = other.reply(ok(Opcode.POST, 1))
    with pytest.raises(IntegrityError):
        victim.client.receive_data(forged)
    assert_closed(victim.client)


def test_request_from_another_session_fails() -> None:
    victim, other = make_pair(), make_pair()
    with pytest.raises(IntegrityError):
        victim.server.receive_data(other.request(post(1)))
    assert_closed(victim.server)


def test_reflected_frame_fails() -> None:
    """The client's own request bounced back at it as if it were a reply."""
    pair = make_pair()
    frame = pair.request(post())
    with pytest.raises(IntegrityError):
        pair.client.receive_data(frame)
    assert_closed(pair.client)


def test_server_tampering_closes_only_that_session() -> None:
    hit, bystander = make_pair(), make_pair()
    with pytest.raises(IntegrityError):
        hit.server.receive_data(encode_frame(b"\x00" * 40))
    assert bystander.server.receive_data(bystander.request(post()))[0].request.req_id == 1


def test_closed_session_refuses_to_send() -> None:
    pair = make_pair()
    with pytest.raises(IntegrityError):
        pair.client.receive_data(encode_frame(b"junk"))
    with pytest.raises(RuntimeError):
        pair.request(post())
    with pytest.raises(IntegrityError):
        pair.server.receive_data(encode_frame(b"junk"))
    with pytest.raises(RuntimeError):
        pair.server.send_reply(ok(Opcode.PING, 1))


# ------------------------------------------------------------------ key binding


def _keyed_event(pair: Pair, req: Request, key: bytes | None) -> RequestIn:
    (event,) = pair.server.receive_data(pair.request(req, key=key))
    return event


def test_mac_travels_with_the_request() -> None:
    pair = make_pair()
    event = _keyed_event(pair, post(1), K)
    assert event.mac is not None and len(event.mac) == MAC_BYTES
    assert event.signed == encode_request(post(1), mac=True)
    assert event.mac == keybind_mac(K, pair.server.session_id, Direction.TO_SERVICE,
                                    event.signed)
    pair.server.authenticator(event)(K)  # verifies: no exception


def _rejected(auth_key: bytes, event: RequestIn, pair: Pair) -> None:
    with pytest.raises(CoreError) as info:
        pair.server.authenticator(event)(auth_key)
    assert info.value.status is Status.EKEYREJECTED


def test_authenticator_rejects_a_missing_mac() -> None:
    pair = make_pair()
    _rejected(K, _keyed_event(pair, post(1), None), pair)


def test_authenticator_rejects_a_wrong_key() -> None:
    pair = make_pair()
    event = _keyed_event(pair, post(1), K2)
    _rejected(K, event, pair)
    _rejected(K[:16], event, pair)


def test_authenticator_binds_the_session() -> None:
    """The same request, MAC'd in another session, does not verify in this one."""
    a, b = make_pair(), make_pair()
    ev_a, ev_b = _keyed_event(a, post(1), K), _keyed_event(b, post(1), K)
    assert ev_a.signed == ev_b.signed and ev_a.mac != ev_b.mac
    _rejected(K, RequestIn(ev_b.request, ev_b.signed, ev_a.mac), b)


def test_authenticator_binds_the_sequence() -> None:
    """A MAC taken from an earlier request of the same session does not verify."""
    pair = make_pair()
    first = _keyed_event(pair, post(1), K)
    second = _keyed_event(pair, post(2), K)
    _rejected(K, RequestIn(second.request, second.signed, first.mac), pair)


def test_authenticator_binds_the_arguments() -> None:
    pair = make_pair()
    first = _keyed_event(pair, post(1), K)
    other = encode_request(Request(Opcode.POST, 1, handle=bytes(16)), mac=True)
    _rejected(K, RequestIn(first.request, other, first.mac), pair)


def test_authenticator_binds_the_direction() -> None:
    pair = make_pair()
    event = _keyed_event(pair, post(1), K)
    reflected = keybind_mac(K, pair.server.session_id, Direction.TO_CLIENT, event.signed)
    _rejected(K, RequestIn(event.request, event.signed, reflected), pair)


def test_keybind_mac_covers_every_input() -> None:
    sid, body = b"s" * 32, b"body"
    base = keybind_mac(K, sid, Direction.TO_SERVICE, body)
    assert len(base) == MAC_BYTES
    assert base != keybind_mac(K2, sid, Direction.TO_SERVICE, body)
    assert base != keybind_mac(K, b"t" * 32, Direction.TO_SERVICE, body)
    assert base != keybind_mac(K, sid, Direction.TO_CLIENT, body)
    assert base != keybind_mac(K, sid, Direction.TO_SERVICE, body + b"!")


def test_keyed_reply_with_valid_mac_is_accepted() -> None:
    pair = make_pair()
    _keyed_event(pair, Request(Opcode.GETVALUE, 1, handle=H), K)
    got = pair.client.receive_data(pair.reply(ok(Opcode.GETVALUE, 1, value=4), mac_key=K))
    assert got == [ok(Opcode.GETVALUE, 1, value=4)]


def test_ok_reply_to_a_keyed_request_without_mac_is_refused() -> None:
    """A4: a success for a key-bound semaphore needs the key's MAC, whatever the
    transport says."""
    pair = make_pair()
    _keyed_event(pair, post(1), K)
    with pytest.raises(IntegrityError, match="MAC"):
        pair.client.receive_data(pair.reply(ok(Opcode.POST, 1)))
    assert_closed(pair.client)


def test_ok_reply_to_a_keyed_request_with_a_wrong_key_mac_is_refused() -> None:
    pair = make_pair()
    _keyed_event(pair, post(1), K)
    with pytest.raises(IntegrityError, match="MAC"):
        pair.client.receive_data(pair.reply(ok(Opcode.POST, 1), mac_key=K2))
    assert_closed(pair.client)


def test_keyed_reply_mac_binds_the_request_sequence() -> None:
    """A valid MAC of reply 1 spliced onto reply 2 (sealed by the real transport, as a
    confused or compromised service shell might) does not verify: the request id is
    under the MAC."""
    pair = make_pair()
    _keyed_event(pair, post(1), K)
    _keyed_event(pair, post(2), K)
    sid = pair.server.session_id
    mac_of_1 = encode_reply_with_mac(ok(Opcode.POST, 1), K, sid)[-MAC_BYTES:]
    spliced = encode_reply(ok(Opcode.POST, 2), mac=True) + mac_of_1
    sealed = pair.server._transport.encrypt(spliced)  # type: ignore[union-attr]
    with pytest.raises(IntegrityError, match="MAC"):
        pair.client.receive_data(encode_frame(sealed))
    assert_closed(pair.client)


def test_refusal_to_a_keyed_request_without_mac_is_accepted() -> None:
    """EKEYREJECTED (and any refusal) may come without a MAC: it grants nothing."""
    pair = make_pair()
    _keyed_event(pair, post(1), K)
    _keyed_event(pair, Request(Opcode.WAIT, 2, handle=H, wait_mode=WaitMode.TRY), K)
    pair.server.send_reply(Reply(Opcode.POST, 1, Status.EKEYREJECTED, message="bad key"))
    pair.server.send_reply(Reply(Opcode.WAIT, 2, Status.EAGAIN), mac_key=K)
    got = pair.client.receive_data(pair.server.data_to_send())
    assert [r.status for r in got] == [Status.EKEYREJECTED, Status.EAGAIN]
    with pytest.raises(KeyRejected):
        raise error_for(got[0].status, got[0].message)


def test_refusal_with_a_bad_mac_is_refused() -> None:
    pair = make_pair()
    _keyed_event(pair, post(1), K)
    with pytest.raises(IntegrityError, match="MAC"):
        pair.client.receive_data(
            pair.reply(Reply(Opcode.POST, 1, Status.EOVERFLOW), mac_key=K2)
        )


def test_mac_on_a_reply_to_an_unkeyed_request_is_refused() -> None:
    pair = make_pair()
    _answered(pair, post(1))
    with pytest.raises(ProtocolError, match="MAC"):
        pair.client.receive_data(pair.reply(ok(Opcode.POST, 1), mac_key=K))
    assert_closed(pair.client)


def test_reply_mac_from_another_session_is_refused() -> None:
    """The client checks the reply MAC under its own session id: a service that reused
    a MAC computed for another session (here: forged through our transport) fails."""
    a, b = make_pair(), make_pair()
    _keyed_event(a, post(1), K)
    _keyed_event(b, post(1), K)
    b.server.send_reply(ok(Opcode.POST, 1), mac_key=K)
    plaintext_b = encode_reply_with_mac(ok(Opcode.POST, 1), K, b.server.session_id)
    sealed = a.server._transport.encrypt(plaintext_b)  # type: ignore[union-attr]
    with pytest.raises(IntegrityError, match="MAC"):
        a.client.receive_data(encode_frame(sealed))
    assert_closed(a.client)


def encode_reply_with_mac(reply: Reply, key: bytes, session_id: bytes) -> bytes:
    body = encode_reply(reply, mac=True)
    return body + keybind_mac(key, session_id, Direction.TO_CLIENT, body)


def test_reprs_show_state() -> None:
    pair = make_pair()
    pair.request(post())
    assert repr(pair.client) == "<ClientSession open pending=1>"
    assert repr(pair.server) == "<ServerSession open last_req=0 backlog=0>"


def test_server_session_other_key_sizes_are_misuse() -> None:
    with pytest.raises(ValueError):
        ServerSession(b"\x00" * 5)
    assert len(public_key_of(generate_static_key())) == 32


def test_oversized_reply_is_refused_before_it_burns_a_nonce() -> None:
    """Regression: the reply used to be encrypted before its size was checked, so the
    ValueError left the service one counter ahead and every later reply failed."""
    pair = make_pair()
    _answered(pair, Request(Opcode.STAT, 1, name="/a"), Request(Opcode.PING, 2))
    head = len(encode_reply(ok(Opcode.STAT, 1)))
    with pytest.raises(ValueError, match="exceeds"):
        pair.server.send_reply(ok(Opcode.STAT, 1, data=b"x" * (MAX_PLAINTEXT - head + 1)))
    assert pair.server.state is State.OPEN and pair.server.data_to_send() == b""
    biggest = ok(Opcode.STAT, 1, data=b"x" * (MAX_PLAINTEXT - head))
    pair.server.send_reply(ok(Opcode.PING, 2))
    pair.server.send_reply(biggest)
    frames = pair.server.data_to_send()
    assert pair.client.receive_data(frames) == [ok(Opcode.PING, 2), biggest]
    assert len(frames_of(frames)[1]) == 4 + MAX_FRAME_BODY  # exactly the largest frame


def test_largest_request_is_far_below_the_frame_limit() -> None:
    """Requests cannot be oversized: the largest, a MAC'd OPEN with the longest key and
    name, is a few hundred bytes (so only replies need the size check)."""
    pair = make_pair()
    huge = Request(Opcode.OPEN, 0, name="/" + "n" * 251, key=b"k" * 32, mode=0o600)
    frame = pair.request(huge, key=b"k" * 32)
    assert len(frame) == 4 + 336 + 16 < 400
    assert pair.server.receive_data(frame)[0].request.name == huge.name
