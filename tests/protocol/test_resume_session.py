"""The session objects' side of RESUME (PROTOCOL.md 16): a new connection carries on an
old session, keeps its id for key-binding MACs, gets its held replies byte-identical and
re-sends what the service never executed; RESUME is valid only as a first request."""

from __future__ import annotations

import pytest

from esem.core.status import Status
from esem.errors import ProtocolError
from esem.protocol.constants import Opcode
from esem.protocol.crypto import resume_verifier, verifier_matches
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession, RequestIn, ServerSession, seal_reply

from . import Pair, make_pair

H = bytes(range(16))
K = bytes(range(100, 132))


def _send(pair: Pair, req: Request, key: bytes | None = None) -> RequestIn:
    [event] = pair.server.receive_data(pair.request(req, key=key))
    return event


def test_the_client_learns_the_secret_the_service_keeps_only_its_hash() -> None:
    pair = make_pair()
    secret = pair.client.resumption_secret
    assert secret is not None and len(secret) == 32
    assert pair.server.verifier == resume_verifier(secret)
    assert verifier_matches(pair.server.verifier, secret)
    assert make_pair().client.resumption_secret != secret


def test_resume_carries_the_old_session_replays_and_resends() -> None:
    old = make_pair()
    e1 = _send(old, Request(Opcode.POST, 0, handle=H), key=K)  # executed; reply lost
    _send(old, Request(Opcode.WAIT, 0, handle=H))  # queued at the service
    old.request(Request(Opcode.GETVALUE, 0, handle=H), key=K)  # never reached the service
    lost = seal_reply(Reply(Opcode.POST, e1.request.req_id, Status.OK), old.server.binding_id, K)
    assert old.client.pending == 3

    new = make_pair()
    frame = new.client.resume(old.client)
    [event] = new.server.receive_data(frame)
    req = event.request
    assert req.opcode is Opcode.RESUME and event.mac is None
    assert req.session == old.server.session_id
    assert verifier_matches(old.server.verifier or b"", req.secret)
    assert req.awaited == (1, 2, 3) and req.req_id == 4
    # The service side: adopt the old session (its last executed id was 2)
    new.server.adopt(old.server.session_id, 2, req.req_id)
    new.server.send_reply(Reply(Opcode.RESUME, req.req_id, Status.OK, value=2))
    new.server.send_body(lost)  # the held reply, byte-identical, MAC under the old h
    replies = new.client.receive_data(new.server.data_to_send())
    assert [r.req_id for r in replies] == [4, 1]
    assert new.client.resumed_last == 2 and new.client.binding_id == old.client.session_id
    # 2 (a queued wait) and 3 (never executed) are still awaited; only 3 is re-sent
    assert new.client.is_pending(2) and new.client.is_pending(3)
    [resent] = new.server.receive_data(new.client.resend())
    assert resent.request.req_id == 3 and resent.request.opcode is Opcode.GETVALUE
    new.server.authenticator(resent)(K)  # its MAC binds the original session id
    # the wait ends later, under the old id's MAC
    new.server.send_reply(Reply(Opcode.WAIT, 2, Status.OK))
    new.server.send_reply(Reply(Opcode.GETVALUE, 3, Status.OK, value=1), mac_key=K)
    assert [r.req_id for r in new.client.receive_data(new.server.data_to_send())] == [2, 3]
    assert new.client.pending == 0
    # numbering goes on above the RESUME; its own id is never valid again
    assert new.client.next_request_id() == 5


def test_a_lost_reply_is_answered_estale_with_the_resume_opcode() -> None:
    old = make_pair()
    _send(old, Request(Opcode.POST, 0, handle=H))
    new = make_pair()
    [event] = new.server.receive_data(new.client.resume(old.client))
    new.server.adopt(old.server.session_id, 1, event.request.req_id)
    new.server.send_reply(Reply(Opcode.RESUME, event.request.req_id, Status.OK, value=1))
    new.server.send_reply(Reply(Opcode.RESUME, 1, Status.ESTALE, message="lost"))
    replies = new.client.receive_data(new.server.data_to_send())
    assert [(r.req_id, r.status) for r in replies] == [(2, Status.OK), (1, Status.ESTALE)]
    assert new.client.pending == 0


def test_a_failed_resume_leaves_the_fresh_session() -> None:
    old = make_pair()
    old.request(Request(Opcode.PING, 0))
    new = make_pair()
    [event] = new.server.receive_data(new.client.resume(old.client))
    new.server.send_reply(Reply(Opcode.RESUME, event.request.req_id, Status.EACCES))
    [reply] = new.client.receive_data(new.server.data_to_send())
    assert reply.status is Status.EACCES
    assert new.client.resumed_last is None
    assert new.client.binding_id == new.client.session_id
    assert old.client.pending == 1  # the caller fails those
    with pytest.raises(ProtocolError):  # ESTALE is only for a resumed session
        new.server.send_reply(Reply(Opcode.RESUME, 1, Status.ESTALE))
        new.client.receive_data(new.server.data_to_send())


def test_resume_is_valid_only_as_the_first_request() -> None:
    old, new = make_pair(), make_pair()
    _send(new, Request(Opcode.PING, 0))
    frame = new.client.send_request(Request(Opcode.RESUME, 9, session=old.server.session_id,
                                            secret=bytes(32)))
    with pytest.raises(ProtocolError, match="first request"):
        new.server.receive_data(frame)


def test_resume_and_end_never_carry_a_mac() -> None:
    for req in (Request(Opcode.RESUME, 1, session=bytes(32), secret=bytes(32)),
                Request(Opcode.END, 1)):
        pair = make_pair()
        with pytest.raises(ProtocolError, match="no MAC"):
            pair.server.receive_data(pair.client.send_request(req, key=K))


def _resumed(last: int, resume_id: int) -> Pair:
    pair = make_pair()
    pair.server.receive_data(pair.client.send_request(
        Request(Opcode.RESUME, resume_id, session=bytes(32), secret=bytes(32))))
    pair.server.adopt(bytes(32), last, resume_id)
    return pair


def test_after_adopt_ids_increase_from_the_sessions_last_and_skip_the_resume() -> None:
    pair = _resumed(5, 10)
    for rid in (6, 8, 11):  # re-sent ones below the RESUME, then new ones
        [event] = pair.server.receive_data(pair.client.send_request(Request(Opcode.PING, rid)))
        assert event.request.req_id == rid
    for rid in (5, 10):  # executed before, and the RESUME's own
        pair = _resumed(5, 10)
        with pytest.raises(ProtocolError, match="does not increase"):
            pair.server.receive_data(_reuse(pair.client, rid))


def _reuse(client: ClientSession, req_id: int) -> bytes:
    """A frame that reuses ``req_id`` (a client bug or an attack the AEAD cannot see)."""
    client._pending.pop(req_id, None)
    return client.send_request(Request(Opcode.PING, req_id))


def test_client_resume_misuse() -> None:
    pair = make_pair()
    with pytest.raises(RuntimeError):
        pair.client.resend()
    unfinished = ClientSession(b"\x01" * 32)
    with pytest.raises(RuntimeError):
        pair.client.resume(unfinished)
    used = make_pair()
    used.request(Request(Opcode.PING, 0))
    with pytest.raises(RuntimeError, match="first request"):
        used.client.resume(pair.client)
    with pytest.raises(RuntimeError):
        ServerSession(b"\x02" * 32).adopt(bytes(32), 0, 1)
