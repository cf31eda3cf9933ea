"""The fuzz invariant (h11/wsproto style, adversary A6): any bytes fed to any decoder or
session either parse or raise ``ProtocolError`` (``IntegrityError`` for authentication
failures; ``ProtocolError`` is one). Nothing else ever escapes: no ``struct.error``, no
``UnicodeDecodeError``, no ``ValueError`` from an enum, no noise exception.

Inputs are random bytes, random bytes behind a plausible header, and truncated,
bit-flipped, spliced or extended valid messages and frames, fed whole and byte by byte.
Sessions are also checked for integrity: whatever the tampering, every message a session
delivers is one the peer really sent, in order (a prefix of the genuine stream).

``tests/fuzz/fuzz_decoder.py`` runs the decoder half of this under atheris on demand.
"""

from __future__ import annotations

import contextlib
import re

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from esem.core.status import Status
from esem.core.table import WaitMode
from esem.errors import EsemError, IntegrityError, ProtocolError, error_for
from esem.protocol.constants import MAC_BYTES, MAX_FRAME_BODY, VERSION, Opcode
from esem.protocol.frames import FrameDecoder, encode_frame
from esem.protocol.messages import (
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from esem.protocol.session import ClientSession, RequestIn, ServerSession, State

from . import (
    SERVICE_KEY,
    SERVICE_PUBLIC,
    Mutation,
    feed,
    make_pair,
    mutate,
    mutations,
    replies,
    requests,
)

# ~30 s for the whole file on a slow CI machine; raise locally to dig deeper.
FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SESSION_FUZZ = settings(FUZZ, max_examples=250)

KEY = b"fuzz-key-binding-key-32-bytes!!!"
H = bytes(range(16))
macs = st.binary(min_size=MAC_BYTES, max_size=MAC_BYTES)
byte = st.integers(0, 255)


def _shape(exc: Exception) -> str:
    return re.sub(r"0x[0-9a-f]+|\d+", "N", str(exc))


def _with_mac(body: bytes, mac: bytes | None) -> bytes:
    return body + (mac or b"")


valid_request_bytes = st.builds(
    lambda r, mac: _with_mac(encode_request(r, mac=mac is not None), mac),
    requests, st.none() | macs,
)
valid_reply_bytes = st.builds(
    lambda r, mac: _with_mac(encode_reply(r, mac=mac is not None), mac),
    replies(), st.none() | macs,
)
plausible_op = st.one_of(st.sampled_from(Opcode).map(int), byte)
plausible_flags = st.sampled_from([0, 1]) | byte


def message_inputs(valid: st.SearchStrategy[bytes], extra_header: int) -> st.SearchStrategy[bytes]:
    """Garbage of every useful shape for a message decoder."""
    header = st.builds(
        lambda op, fl, rest: bytes((VERSION, op, fl)) + rest,
        plausible_op, plausible_flags, st.binary(min_size=8 + extra_header, max_size=400),
    )
    return st.one_of(
        st.binary(max_size=64),
        st.binary(min_size=64, max_size=2000),
        header,
        st.builds(mutate, valid, mutations()),
        valid,
    )


def frame_inputs(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    frames = st.lists(bodies.filter(lambda b: 1 <= len(b) <= MAX_FRAME_BODY), max_size=4).map(
        lambda bs: b"".join(encode_frame(b) for b in bs)
    )
    return st.one_of(
        st.binary(max_size=200),
        frames,
        st.builds(mutate, frames, mutations()),
        st.builds(lambda n, rest: n.to_bytes(4, "big") + rest,
                  st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    )


# ------------------------------------------------------------------- decoders


@FUZZ
@given(data=message_inputs(valid_request_bytes, 0))
def test_decode_request_parses_or_raises_protocol_error(data: bytes) -> None:
    try:
        req, signed, mac = decode_request(data)
    except ProtocolError as exc:
        event(f"refused: {_shape(exc)}")
        return
    event(f"parsed {req.opcode.name}")
    # Whatever parses is canonical: it re-encodes to exactly the bytes received, so no
    # two byte strings mean the same request (and a MAC covers all of its meaning).
    assert _with_mac(encode_request(req, mac=mac is not None), mac) == data
    assert signed == data[: len(data) - (MAC_BYTES if mac else 0)]


@FUZZ
@given(data=message_inputs(valid_reply_bytes, 2))
def test_decode_reply_parses_or_raises_protocol_error(data: bytes) -> None:
    try:
        rep, signed, mac = decode_reply(data)
    except ProtocolError as exc:
        event(f"refused: {_shape(exc)}")
        return
    event(f"parsed {rep.status.name}")
    if _with_mac(encode_reply(rep, mac=mac is not None), mac) != data:
        # Only refusal text is decoded leniently (invalid UTF-8 becomes U+FFFD).
        assert rep.status is not Status.OK and "\ufffd" in rep.message
    assert signed == data[: len(data) - (MAC_BYTES if mac else 0)]


@FUZZ
@given(data=frame_inputs(st.one_of(valid_request_bytes, valid_reply_bytes, st.binary())))
def test_frame_decoder_whole_and_bytewise_agree(data: bytes) -> None:
    def run(chunks: list[bytes]) -> tuple[list[bytes], bool, int]:
        dec = FrameDecoder()
        frames: list[bytes] = []
        try:
            for chunk in chunks:
                frames += dec.feed(chunk)
        except ProtocolError:
            return frames, True, dec.buffered
        return frames, False, dec.buffered

    whole = run([data])
    bytewise = run([data[i : i + 1] for i in range(len(data))])
    assert whole[1] == bytewise[1]
    if not whole[1]:
        assert whole == bytewise
    else:
        # Byte by byte, the frames before the bad length came out first; whole, the
        # error won. Either way the session that owns the decoder closes.
        assert whole[0] == []


# ------------------------------------------------------------------- sessions


def _check_error(exc: EsemError, session: ClientSession | ServerSession) -> None:
    assert isinstance(exc, IntegrityError), f"{type(exc).__name__}: {exc}"
    assert session.state is State.CLOSED


def _drive(
    session: ClientSession | ServerSession, data: bytes, bytewise: bool
) -> tuple[list[object], EsemError | None]:
    events: list[object] = []
    try:
        feed(session.receive_data, data, bytewise=bytewise, into=events)
    except EsemError as exc:  # anything else escapes and fails the test
        return events, exc
    return events, None


def _note(events: list[object], exc: EsemError | None, session: object) -> None:
    """Label the outcome, for ``pytest --hypothesis-show-statistics``."""
    outcome = type(exc).__name__ if exc is not None else "no error"
    event(f"{outcome} after {len(events)} events, {session!r}")


def _is_prefix(events: list[object], genuine: list[object]) -> bool:
    return events == genuine[: len(events)]


def _junk_or_mutation() -> st.SearchStrategy[tuple[str, object]]:
    return st.one_of(
        mutations().map(lambda m: ("mutate", m)),
        st.binary(max_size=300).map(lambda b: ("raw", b)),
        st.binary(min_size=1, max_size=200).map(lambda b: ("frame", b)),
    )


def _apply(kind_and_arg: tuple[str, object], genuine_stream: bytes) -> bytes:
    kind, arg = kind_and_arg
    if kind == "mutate":
        recipe: list[Mutation] = arg  # type: ignore[assignment]
        return mutate(genuine_stream, recipe)
    if kind == "frame":
        return encode_frame(arg)  # type: ignore[arg-type]
    return arg  # type: ignore[return-value]


@SESSION_FUZZ
@given(attack=_junk_or_mutation())
def test_server_before_handshake(attack: tuple[str, object]) -> None:
    for bytewise in (False, True):
        _server_before_handshake(attack, bytewise)


def _server_before_handshake(attack: tuple[str, object], bytewise: bool) -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    hello = client.start()
    data = _apply(attack, hello)
    events, exc = _drive(server, data, bytewise)
    _note(events, exc, server.state)
    assert events == []  # a handshake yields no request
    if exc is not None:
        _check_error(exc, server)
    elif server.state is State.OPEN:
        # The one way to open a session is the client's genuine HELLO.
        assert data.startswith(hello)
        assert client.receive_data(server.data_to_send()) == []


GENUINE_REQUESTS = [
    Request(Opcode.OPEN, 1, name="/fuzz", mode=0o600, key=KEY),
    Request(Opcode.WAIT, 2, handle=H, wait_mode=WaitMode.TIMED, timeout_ns=10**9),
    Request(Opcode.PING, 3),
]


@SESSION_FUZZ
@given(attack=_junk_or_mutation())
def test_server_after_handshake(attack: tuple[str, object]) -> None:
    for bytewise in (False, True):
        _server_after_handshake(attack, bytewise)


def _server_after_handshake(attack: tuple[str, object], bytewise: bool) -> None:
    pair = make_pair()
    stream = b"".join(pair.client.send_request(r, key=KEY if i < 2 else None)
                      for i, r in enumerate(GENUINE_REQUESTS))
    events, exc = _drive(pair.server, _apply(attack, stream), bytewise)
    _note(events, exc, pair.server.state)
    got = [e.request for e in events if isinstance(e, RequestIn)]
    assert len(got) == len(events)
    assert _is_prefix(got, GENUINE_REQUESTS)  # A2: nothing tampered is ever delivered
    if exc is not None:
        _check_error(exc, pair.server)


def _acceptable_handshake_error(exc: EsemError, client: ClientSession) -> None:
    """During the handshake a (plaintext, unauthenticated) REFUSED frame legitimately
    raises its mapped error; everything else is an IntegrityError."""
    assert client.state is State.CLOSED
    if isinstance(exc, IntegrityError):
        return
    assert exc.status is not None and exc.status is not Status.OK
    assert type(exc) is type(error_for(exc.status, ""))
    assert str(exc).startswith("service refused the session")


@SESSION_FUZZ
@given(attack=_junk_or_mutation(), refused=st.booleans())
def test_client_awaiting_welcome(attack: tuple[str, object], refused: bool) -> None:
    for bytewise in (False, True):
        _client_awaiting_welcome(attack, refused, bytewise)


def _client_awaiting_welcome(attack: tuple[str, object], refused: bool, bytewise: bool) -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    hello = client.start()
    if refused:
        server.refuse(Status.EDQUOT, "too many sessions")
    else:
        server.receive_data(hello)
    answer = server.data_to_send()
    data = _apply(attack, answer)
    events, exc = _drive(client, data, bytewise)
    _note(events, exc, client.state)
    assert events == []
    if exc is not None:
        _acceptable_handshake_error(exc, client)
    elif client.state is State.OPEN:
        assert not refused and data.startswith(answer)


def _genuine_replies() -> list[Reply]:
    return [
        Reply(Opcode.OPEN, 1, Status.OK, handle=H, created=True),
        Reply(Opcode.WAIT, 2, Status.ETIMEDOUT, message="timed wait reached its deadline"),
        Reply(Opcode.PING, 3, Status.OK),
    ]


@SESSION_FUZZ
@given(attack=_junk_or_mutation())
def test_client_after_handshake(attack: tuple[str, object]) -> None:
    for bytewise in (False, True):
        _client_after_handshake(attack, bytewise)


def _client_after_handshake(attack: tuple[str, object], bytewise: bool) -> None:
    pair = make_pair()
    for i, r in enumerate(GENUINE_REQUESTS):
        pair.server.receive_data(pair.client.send_request(r, key=KEY if i < 2 else None))
    genuine = _genuine_replies()
    for i, rep in enumerate(genuine):
        pair.server.send_reply(rep, mac_key=KEY if i < 2 else None)
    stream = pair.server.data_to_send()
    events, exc = _drive(pair.client, _apply(attack, stream), bytewise)
    _note(events, exc, pair.client.state)
    assert _is_prefix(events, list(genuine))
    if exc is not None:
        _check_error(exc, pair.client)


@SESSION_FUZZ
@given(first=st.binary(max_size=100), later=st.binary(max_size=100))
def test_closed_sessions_stay_closed(first: bytes, later: bytes) -> None:
    """After any error, every later byte is refused with ProtocolError."""
    pair = make_pair()
    for session in (pair.server, pair.client):
        with contextlib.suppress(IntegrityError):
            session.receive_data(encode_frame(b"\x00" + first))
        assert session.state is State.CLOSED
        try:
            session.receive_data(later)
        except ProtocolError:
            continue
        raise AssertionError("a closed session accepted data")


def test_valid_streams_still_work_under_the_fuzz_harness() -> None:
    """The harness itself: genuine traffic, whole and byte by byte, is all delivered."""
    for bytewise in (False, True):
        pair = make_pair()
        stream = b"".join(pair.client.send_request(r, key=KEY if i < 2 else None)
                          for i, r in enumerate(GENUINE_REQUESTS))
        events, exc = _drive(pair.server, stream, bytewise)
        assert exc is None
        assert [e.request for e in events] == GENUINE_REQUESTS  # type: ignore[attr-defined]
        for i, rep in enumerate(_genuine_replies()):
            pair.server.send_reply(rep, mac_key=KEY if i < 2 else None)
        replies_, exc = _drive(pair.client, pair.server.data_to_send(), bytewise)
        assert exc is None and replies_ == _genuine_replies()
