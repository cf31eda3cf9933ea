"""The service session driven one frame at a time (``feed``/``next_event``), and the
HELLO that waits for the shell's ``accept`` or ``refuse`` (PROTOCOL.md 2, 3.2, 9)."""

from __future__ import annotations

import pytest

from esem.core.status import Status
from esem.errors import IntegrityError, ProtocolError, QuotaExceeded
from esem.protocol.constants import FrameKind, Opcode
from esem.protocol.frames import encode_frame
from esem.protocol.messages import Request
from esem.protocol.session import ClientSession, HelloIn, RequestIn, ServerSession, State

from . import SERVICE_KEY, SERVICE_PUBLIC

H = bytes(range(16))


def _post(client: ClientSession) -> bytes:
    return client.send_request(Request(Opcode.POST, 0, handle=H),
                               req_id=client.next_request_id())


def _opened() -> tuple[ClientSession, ServerSession]:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    server.feed(client.start())
    assert isinstance(server.next_event(), HelloIn)
    server.accept()
    client.receive_data(server.data_to_send())
    assert client.established
    return client, server


def test_hello_waits_for_accept_and_later_frames_wait_behind_it() -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    server.feed(client.start())
    assert server.backlog == 1
    assert isinstance(server.next_event(), HelloIn)
    assert server.state is State.HELLO_RECEIVED
    assert server.data_to_send() == b""  # no WELCOME until the shell admits the session
    assert server.next_event() is None
    server.accept()
    assert server.state is State.OPEN
    client.receive_data(server.data_to_send())
    assert client.established
    with pytest.raises(RuntimeError):
        server.accept()


def test_refuse_after_hello_sends_refused_and_the_client_raises_the_quota_error() -> None:
    client, server = ClientSession(SERVICE_PUBLIC), ServerSession(SERVICE_KEY)
    server.feed(client.start())
    assert isinstance(server.next_event(), HelloIn)
    server.refuse(Status.EDQUOT, "uid 7 has 2 sessions (quota)")
    out = server.data_to_send()
    assert out[5] == FrameKind.REFUSED and server.state is State.CLOSED
    with pytest.raises(QuotaExceeded, match="2 sessions"):
        client.receive_data(out)


def test_frames_are_processed_one_at_a_time() -> None:
    client, server = _opened()
    server.feed(b"".join(_post(client) for _ in range(5)))
    assert server.backlog == 5
    got = []
    while (event := server.next_event()) is not None:
        assert isinstance(event, RequestIn)
        got.append(event.request.req_id)
        assert server.backlog == 5 - len(got)
    assert got == [1, 2, 3, 4, 5]


def test_a_bad_frame_stops_processing_at_that_frame() -> None:
    client, server = _opened()
    good = [_post(client) for _ in range(2)]
    bad = bytearray(_post(client))
    bad[-1] ^= 1
    after = _post(client)
    server.feed(good[0] + good[1] + bytes(bad) + after)
    assert isinstance(server.next_event(), RequestIn)
    assert isinstance(server.next_event(), RequestIn)
    with pytest.raises(IntegrityError):
        server.next_event()
    assert server.state is State.CLOSED and server.backlog == 0
    with pytest.raises(ProtocolError, match="closed"):
        server.feed(after)


def test_an_oversized_length_is_refused_at_feed() -> None:
    _, server = _opened()
    with pytest.raises(ProtocolError, match="frame length"):
        server.feed(b"\xff\xff\xff\xff")
    assert server.state is State.CLOSED


def test_a_frame_before_hello_is_refused() -> None:
    server = ServerSession(SERVICE_KEY)
    server.feed(encode_frame(b"\x01\x02" + b"x" * 48))
    with pytest.raises(ProtocolError):
        server.next_event()
    assert server.state is State.CLOSED
