"""Session resumption against a real daemon (PROTOCOL.md 16): a raw client (the protocol
objects over a real socket) loses its connection and resumes, with its queued waits in
their FIFO place and a grant made while it was detached delivered exactly once; a wrong
secret, another uid or another pid is refused; the grace period ends a session that does
not come back; a tampered frame or END ends it for good."""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import Callable, Iterator

import pytest

from esem.core.status import Status
from esem.protocol.constants import Opcode, OpenFlag
from esem.protocol.messages import Request
from esem.server.embedded import EmbeddedService

from .rawclient import Raw

GRACE = 1.0


@pytest.fixture(scope="module")
def svc() -> Iterator[EmbeddedService]:
    service = EmbeddedService(extra_args=["--resume-grace", str(GRACE), "--no-journal"])
    os.chmod(service.dir, 0o755)
    with service:
        yield service


@pytest.fixture
def names() -> Iterator[str]:
    yield f"/resume-{os.getpid()}-{time.monotonic_ns()}"


def raw(svc: EmbeddedService) -> Raw:
    return Raw(svc.socket_path, svc.pubkey)


def stat(svc: EmbeddedService, name: str) -> dict[str, object]:
    c = raw(svc)
    r = c.call(Request(Opcode.STAT, 0, name=name))
    assert r.status is Status.OK, r
    c.call(Request(Opcode.END, 0))
    data: dict[str, object] = json.loads(r.data)
    return data


def test_a_detached_wait_keeps_its_place_and_its_grant_is_delivered_once(
        svc: EmbeddedService, names: str) -> None:
    a, c, poster = raw(svc), raw(svc), raw(svc)
    ha = a.open(names)
    hc = c.open(names)
    hp = poster.open(names)
    wa = a.wait(ha)
    time.sleep(0.05)
    wc = c.wait(hc)
    time.sleep(0.05)
    assert stat(svc, names)["queue_total"] == 2
    a.drop()
    time.sleep(0.1)
    assert stat(svc, names)["queue_total"] == 2  # detached, not ended: still first
    # a grant while A is detached goes to A (first in the queue), not C
    assert poster.call(Request(Opcode.POST, 0, handle=hp)).status is Status.OK
    assert c.quiet() == []
    a2 = raw(svc)
    r = a2.resume(a)
    assert r.status is Status.OK and r.value == wa
    got = a2.reply(wa)
    assert got.status is Status.OK and got.opcode is Opcode.WAIT
    assert a2.quiet() == []  # exactly once
    # the resumed session goes on: its handle works, and C is next in the queue
    assert a2.call(Request(Opcode.POST, 0, handle=ha)).status is Status.OK
    assert c.reply(wc).status is Status.OK
    assert a2.call(Request(Opcode.UNLINK, 0, name=names)).status is Status.OK


def test_a_queued_wait_resumed_before_its_grant_keeps_its_fifo_place(
        svc: EmbeddedService, names: str) -> None:
    a, c, poster = raw(svc), raw(svc), raw(svc)
    ha, hc, hp = a.open(names), c.open(names), poster.open(names)
    wa = a.wait(ha)
    time.sleep(0.05)
    wc = c.wait(hc)
    time.sleep(0.05)
    a.drop()
    time.sleep(0.1)
    a2 = raw(svc)
    r = a2.resume(a)
    assert r.status is Status.OK
    assert a2.quiet() == []  # still queued: nothing yet
    assert poster.call(Request(Opcode.POST, 0, handle=hp)).status is Status.OK
    assert a2.reply(wa).status is Status.OK  # A first, as before its connection went
    assert c.quiet() == []
    assert poster.call(Request(Opcode.POST, 0, handle=hp)).status is Status.OK
    assert c.reply(wc).status is Status.OK
    # requests the service never saw are re-sent and executed once
    lost = a2.session.send_request(Request(Opcode.GETVALUE, a2.session.next_request_id(),
                                           handle=ha))
    del lost  # never written: as if the connection died with it in the client's buffer
    a3 = raw(svc)
    a2.drop()
    time.sleep(0.1)
    r = a3.resume(a2)
    assert r.status is Status.OK
    a3.sock.sendall(a3.session.resend())
    assert [x.opcode for x in a3.quiet()] == [Opcode.GETVALUE]


def test_a_reply_out_of_the_window_is_estale(svc: EmbeddedService) -> None:
    a = raw(svc)
    first = a.send(Request(Opcode.PING, 0))
    for _ in range(300):
        a.send(Request(Opcode.PING, 0))
    a.quiet()
    a.session._pending[first] = a.session._pending.get(first) or _pending_ping()
    a.drop()
    a2 = raw(svc)
    assert a2.resume(a).status is Status.OK
    r = a2.reply(first)
    assert r.status is Status.ESTALE and r.opcode is Opcode.RESUME


def _pending_ping() -> object:
    from esem.protocol.session import _Pending

    return _Pending(Opcode.PING, None)


def test_an_attached_session_resumed_elsewhere_loses_its_old_connection(
        svc: EmbeddedService) -> None:
    a = raw(svc)
    a.call(Request(Opcode.PING, 0))
    b = raw(svc)
    assert b.resume(a).status is Status.OK
    with pytest.raises(EOFError):
        a.quiet(1.0)
    assert b.call(Request(Opcode.PING, 0)).status is Status.OK


def test_a_wrong_secret_is_refused_and_the_fresh_session_goes_on(svc: EmbeddedService) -> None:
    a = raw(svc)
    a.call(Request(Opcode.PING, 0))
    a.drop()
    assert a.session.resumption_secret is not None
    a.session.resumption_secret = bytes(32)
    b = raw(svc)
    r = b.resume(a)
    assert r.status is Status.EACCES
    assert b.call(Request(Opcode.PING, 0)).status is Status.OK  # its own session


def _resume_in_child(svc: EmbeddedService, old: Raw, *, as_nobody: bool) -> int:
    """Fork: the child (same uid, other pid; or nobody) tries to resume ``old``; its
    exit status is the RESUME's status."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            if as_nobody:
                user = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
            code = int(raw(svc).resume(old).status)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("as_nobody", [False, True], ids=["other-pid", "other-uid"])
def test_another_process_cannot_resume_even_with_the_secret(
        svc: EmbeddedService, as_nobody: bool) -> None:
    if as_nobody and os.geteuid() != 0:
        pytest.skip("needs root to become nobody")
    a = raw(svc)
    a.call(Request(Opcode.PING, 0))
    a.drop()
    assert _resume_in_child(svc, a, as_nobody=as_nobody) == Status.EACCES
    assert raw(svc).resume(a).status is Status.OK  # the owner still can


def _in_child(body: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def test_a_process_that_drops_root_after_connecting_resumes(svc: EmbeddedService) -> None:
    """Apache's pattern: the session is opened as root, the process then becomes another
    user; its connection is lost (a service restart) and it resumes as that user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    user = pwd.getpwnam("nobody")

    def body() -> int:
        a = raw(svc)
        a.call(Request(Opcode.PING, 0))
        _become(user.pw_uid, user.pw_gid)
        a.drop()
        b = raw(svc)
        status = b.resume(a).status
        if status is not Status.OK:
            return int(status)
        return 0 if b.call(Request(Opcode.PING, 0)).status is Status.OK else 98

    assert _in_child(body) == 0


def test_a_session_of_another_uid_never_resumes_under_a_third(svc: EmbeddedService) -> None:
    """Only root's sessions follow a uid change: a session opened by uid 1 (its process
    could switch, holding root as its saved uid) is refused once the process is nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch uids")
    user = pwd.getpwnam("nobody")

    def body() -> int:
        os.setgroups([])
        os.setresgid(1, 1, 0)
        os.setresuid(1, 1, 0)  # uid 1 at connect, root kept as the saved uid
        a = raw(svc)
        a.call(Request(Opcode.PING, 0))
        os.setresuid(0, 0, 0)
        _become(user.pw_uid, user.pw_gid)
        a.drop()
        return int(raw(svc).resume(a).status)

    assert _in_child(body) == Status.EACCES


def test_a_tampered_frame_ends_the_session_for_good(svc: EmbeddedService) -> None:
    a = raw(svc)
    a.call(Request(Opcode.PING, 0))
    a.garbage()
    with pytest.raises(EOFError):
        a.quiet(2.0)
    assert raw(svc).resume(a).status is Status.ENOENT


def test_end_ends_the_session_at_once(svc: EmbeddedService) -> None:
    a = raw(svc)
    assert a.call(Request(Opcode.END, 0)).status is Status.OK
    with pytest.raises(EOFError):
        a.quiet(2.0)
    assert raw(svc).resume(a).status is Status.ENOENT


def test_resume_out_of_place_is_a_protocol_error(svc: EmbeddedService) -> None:
    a = raw(svc)
    a.call(Request(Opcode.PING, 0))
    a.send(Request(Opcode.RESUME, 0, session=bytes(32), secret=bytes(32)))
    with pytest.raises(EOFError):
        a.quiet(2.0)


@pytest.mark.parametrize("robust", [True, False], ids=["robust", "plain"])
def test_grace_expiry_ends_the_session_as_a_lost_one(svc: EmbeddedService, names: str,
                                                    robust: bool) -> None:
    a, c = raw(svc), raw(svc)
    ha = a.open(names, value=1, robust=robust)
    hc = c.open(names)
    assert a.call(Request(Opcode.WAIT, 0, handle=ha)).status is Status.OK  # holds the unit
    wa2 = a.wait(ha)  # and queues a second wait
    wc = c.wait(hc)
    del wa2
    time.sleep(0.05)
    a.drop()
    time.sleep(GRACE / 2)
    s = stat(svc, names)
    assert s["holders_total"] == 1 and s["queue_total"] == 2  # detached: all in place
    time.sleep(GRACE + 0.5)
    s = stat(svc, names)
    if robust:  # released by the robust rule: to the next waiter (C), who now holds it
        assert c.reply(wc).status is Status.OK
        assert s["queue_total"] == 0 and s["dead_holders_total"] == 0
    else:  # kept as a dead holding; C still waits
        assert s["holders_total"] == 0
        assert s["dead_holders_total"] == 1 and s["queue_total"] == 1
        assert c.quiet() == []
    assert raw(svc).resume(a).status is Status.ENOENT
    c.call(Request(Opcode.UNLINK, 0, name=names))


def test_a_dead_process_session_ends_at_once(svc: EmbeddedService, names: str) -> None:
    """A connection lost with its process gone is not held for a grace period."""
    c = raw(svc)
    c.open(names, value=1, robust=True)
    pid = os.fork()
    if pid == 0:
        try:
            a = raw(svc)
            h = a.open(names)
            a.call(Request(Opcode.WAIT, 0, handle=h))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.3)  # well within the grace period
    s = stat(svc, names)
    assert s["holders_total"] == 0 and s["value"] == 1
    c.call(Request(Opcode.UNLINK, 0, name=names))


def test_grace_zero_disables_resumption(tmp_path: object) -> None:
    with EmbeddedService(extra_args=["--resume-grace", "0", "--no-journal"]) as svc:
        a = raw(svc)
        a.call(Request(Opcode.PING, 0))
        a.drop()
        time.sleep(0.1)
        r = raw(svc).resume(a)
        assert r.status is Status.ENOENT and "disabled" in r.message


@pytest.mark.parametrize("args, message", [
    (["--no-journal", "--fsync"], "--no-journal excludes"),
    (["--resume-grace", "-1"], "not negative"),
    (["--resume-grace", "nan"], "finite"),
])
def test_serve_option_misuse_is_exit_2(args: list[str], message: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "esem", "serve", "--dir", "/nonexistent/x",
                             *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_each_resumption_rotates_the_secret_and_keeps_the_key_binding(
        svc: EmbeddedService, names: str) -> None:
    """The second resumption needs the secret of the first resuming connection's WELCOME
    (the original one no longer works), and key-binding MACs keep binding the session's
    original id: a keyed POST after two resumptions verifies both ways."""
    key = bytes(range(7, 39))
    a = raw(svc)
    r = a.call(Request(Opcode.OPEN, 0, name=names, oflag=OpenFlag.CREAT, mode=0o600,
                       value=0, key=key), key=key)
    assert r.status is Status.OK
    handle = r.handle
    a.drop()
    a2 = raw(svc)
    assert a2.resume(a).status is Status.OK
    assert a2.session.resumption_secret != a.session.resumption_secret
    a2.drop()
    stale_secret = raw(svc).resume(a)  # the first secret, after it was rotated
    assert stale_secret.status is Status.EACCES
    a3 = raw(svc)
    assert a3.resume(a2).status is Status.OK
    posted = a3.call(Request(Opcode.POST, 0, handle=handle), key=key)
    assert posted.status is Status.OK  # the client verified the reply's MAC (original h)
    got = a3.call(Request(Opcode.GETVALUE, 0, handle=handle), key=key)
    assert got.status is Status.OK and got.value == 1
    assert a3.call(Request(Opcode.UNLINK, 0, name=names), key=key).status is Status.OK
