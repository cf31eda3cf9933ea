"""Switchless mode against a real ``esem serve --switchless``: what only the rings have.

The whole conformance suite also runs over the rings (see ``conftest.py``); this module
covers what it cannot: the upgrade and its refusals, the API, tampering with the mapped
memfd from another process (the A2 adversary now writes shared memory instead of the
socket), full rings, a client killed in the middle of a frame, idle CPU, socket and
switchless sessions queued on one semaphore, and fork.

The tamper tests use the victim client's low-level calls (``send`` now, ``wait_reply``
later) so that a reply can sit unread in the ring while a forked adversary process, which
found the memfd in ``/proc/PID/fd`` as any same-uid process can, rewrites it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import esem
from esem import (
    O_CREAT,
    O_EXCL,
    USE_ESEM,
    BusyError,
    EsemSemaphore,
    IntegrityError,
    ServiceUnavailable,
    SwitchlessUnavailable,
    get_client,
    sem_open,
)
from esem.attack.a2_ring import Tap
from esem.client import admin as admin_calls
from esem.client import switchless
from esem.client.blocking import Client
from esem.core.status import Status
from esem.core.table import WaitMode
from esem.errors import ProtocolError
from esem.protocol.constants import Opcode
from esem.protocol.messages import Request
from esem.protocol.ring import (
    MASK64,
    REP_HEAD,
    REP_TAIL,
    REQ_HEAD,
    REQ_TAIL,
)
from esem.protocol.session import ClientSession
from esem.server.embedded import EmbeddedService

from . import reap, run_forked, spawn, wait_until
from .conftest import _mode_params, _pointed_at, _start

CREX = O_CREAT | O_EXCL
JOIN_TIMEOUT = 30.0
GRANT_FRAME = 4 + 13 + 16  # length prefix, WAIT-OK reply header, AEAD tag


# ------------------------------------------------------------------ helpers


@pytest.fixture
def admin(python_switchless_service: EmbeddedService) -> Iterator[Client]:
    """An honest socket-mode client of the same service: reads the truth, posts."""
    client = Client(switchless=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def victim(python_switchless_service: EmbeddedService) -> Iterator[Client]:
    client = Client(switchless=True)
    client.connect()
    assert client.mode == "switchless"
    try:
        yield client
    finally:
        client.close()


def stat_of(client: Client, name: str) -> dict[str, Any]:
    return admin_calls.stat_semaphore(client, name)


def opened(name: str, client: Client, *args: Any) -> EsemSemaphore:
    sem = sem_open(name, *args, flags=USE_ESEM, client=client)
    assert isinstance(sem, EsemSemaphore)
    return sem


def token_of(sem: EsemSemaphore) -> bytes:
    return sem._tokens[os.getpid()][1]


def wait_request(token: bytes, mode: WaitMode = WaitMode.BLOCK) -> Request:
    return Request(Opcode.WAIT, 0, handle=token, wait_mode=mode)


def ring_inodes(pid: int | str = "self") -> set[int]:
    """Inodes of the esem rings mapped into process ``pid``."""
    inodes = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/memfd:esem-ring" in line:
                inodes.add(int(line.split()[4]))
    return inodes


def raw_switchless(svc: EmbeddedService) -> tuple[socket.socket, ClientSession,
                                                  switchless.ClientRing]:
    """A hand-driven switchless session: the real protocol, no client library policy."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(svc.socket_path))
    session = ClientSession(svc.pubkey)
    sock.sendall(session.start())
    while not session.established:
        session.receive_data(sock.recv(4096))
    ring = switchless.upgrade(sock, session, time.monotonic() + 5, strict=True)
    assert ring is not None
    sock.settimeout(None)
    return sock, session, ring


def adversary(victim: Client, act: Callable[[Tap], None]) -> None:
    """Run ``act`` in a forked process that maps the rings of ``victim`` (a client of
    this process) through /proc."""
    assert victim._ring is not None
    pid, fd_number = os.getpid(), victim._ring.memfd

    def child() -> int:
        act(Tap(pid, fd_number))
        return 0

    assert run_forked(child) == 0


# ------------------------------------------------------------ upgrade and API


def test_switchless_session_uses_a_sealed_memfd_and_no_name(victim: Client) -> None:
    ring = victim._ring
    assert ring is not None and victim.mode == "switchless"
    assert os.readlink(f"/proc/self/fd/{ring.memfd}").startswith("/memfd:esem-ring")
    import fcntl

    seals = fcntl.fcntl(ring.memfd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    # never a name in /dev/shm: no file there is the ring's memory (other tests' legacy
    # semaphores may sit there, so it is the inode that is compared, not the names)
    mine = os.fstat(ring.memfd)
    for entry in os.scandir("/dev/shm"):
        st = entry.stat(follow_symlinks=False)
        assert (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino), entry.path
    assert victim.call(Request(Opcode.PING, 0)).status is Status.OK
    assert ring.statistics()["mode"] == "switchless"


def test_explicit_switchless_needs_a_switchless_service(socket_service: EmbeddedService,
                                                        sem_name: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SwitchlessUnavailable, match="not enabled"):
        Client(switchless=True).connect()
    with pytest.raises(SwitchlessUnavailable):
        esem.connect(switchless=True)
    assert issubclass(SwitchlessUnavailable, ServiceUnavailable)
    # The environment alone is a preference: a socket session, and a logged warning.
    os.environ["ESEM_SWITCHLESS"] = "1"
    client = Client()
    with caplog.at_level(logging.WARNING, logger="esem.client"):
        client.connect()
    assert [r.levelname for r in caplog.records if "using socket mode" in r.getMessage()] == [
        "WARNING"]
    assert all(r.name == "esem.client" for r in caplog.records)
    try:
        assert client.mode == "socket"
        sem = opened(sem_name, client, CREX, 0o600, 1)
        sem.wait()
        assert sem.getvalue() == 0
    finally:
        client.close()


def test_esem_connect_is_the_process_client_and_sticks_across_fork(
        python_switchless_service: EmbeddedService, sem_name: str) -> None:
    os.environ.pop("ESEM_SWITCHLESS", None)  # the explicit choice alone decides
    client = esem.connect(switchless=True)
    assert client is get_client() and client.mode == "switchless"
    assert esem.connect() is client
    with pytest.raises(RuntimeError, match="switchless mode"):
        esem.connect(switchless=False)
    with pytest.raises(TypeError):
        esem.connect(switchless="yes")  # type: ignore[arg-type]
    sem = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)
    assert client._ring is not None
    parent_ring = os.fstat(client._ring.memfd).st_ino
    assert parent_ring in ring_inodes()

    def child() -> int:
        if parent_ring in ring_inodes():
            return 3  # the parent's mapping went with its session object
        sem.post()  # through the child's own session ...
        mine = get_client()
        if mine is client or mine.mode != "switchless" or mine._ring is None:
            return 4  # ... in the same mode
        own = os.fstat(mine._ring.memfd).st_ino
        return 0 if own in ring_inodes() and parent_ring not in ring_inodes() else 5

    assert run_forked(child) == 0
    sem.wait()  # the parent's rings are untouched and still work
    assert client.mode == "switchless" and client.failed is None


def test_socket_byte_after_the_upgrade_ends_the_session(
        python_switchless_service: EmbeddedService, admin: Client, sem_name: str) -> None:
    """A raw client upgrades, then writes on the socket: a protocol error, and only its
    own session ends."""
    sock, session, ring = raw_switchless(python_switchless_service)
    # A second upgrade, through the rings, is refused: the session already is switchless.
    ring.send(session.send_request(Request(Opcode.SWITCHLESS, 0),
                                   req_id=session.next_request_id()))
    replies: list[Any] = []
    while not replies:
        data = ring.recv(5.0)
        assert data is not None
        replies = session.receive_data(data)
    assert replies[0].status is Status.EINVAL
    sock.settimeout(5)
    sock.send(b"x")
    assert sock.recv(1) == b""  # the service hung up
    ring.close()
    sock.close()
    sem = opened(sem_name, admin, CREX, 0o600, 1)
    sem.wait()
    assert "data on the socket of a switchless session" in \
        python_switchless_service.log_path.read_text()


# ---------------------------------------------------------------- tampering


def test_flipped_grant_in_the_ring_is_an_integrity_error(victim: Client, admin: Client,
                                                         sem_name: str) -> None:
    base = opened(sem_name, admin, CREX, 0o600, 0)
    req_id = victim.send(wait_request(token_of(opened(sem_name, victim))))
    wait_until(lambda: stat_of(admin, sem_name)["waiters"] == 1, what="queued wait")
    base.post()  # the service grants; the grant waits unread in the victim's ring

    def flip(t: Tap) -> None:
        assert t.wait_unread(GRANT_FRAME, timeout=10.0), "no reply reached the ring"
        at = t.reply_offset(t.ctl[REP_TAIL] + 10)
        t.mm[at] ^= 0x01

    adversary(victim, flip)
    with pytest.raises(IntegrityError):
        victim.wait_reply(req_id)
    assert isinstance(victim.failed, IntegrityError)  # sticky
    truth = stat_of(admin, sem_name)
    assert (truth["posts"], truth["waits"], truth["value"]) == (1, 1, 0)  # granted, not taken
    base.post()
    base.wait()  # the service and other sessions carry on


def test_replayed_grant_is_an_integrity_error(victim: Client, admin: Client,
                                              sem_name: str) -> None:
    opened(sem_name, admin, CREX, 0o600, 1)
    token = token_of(opened(sem_name, victim))
    assert victim.call(wait_request(token, WaitMode.TRY)).status is Status.OK  # one grant
    req_id = victim.send(wait_request(token))  # value 0 now: queued
    wait_until(lambda: stat_of(admin, sem_name)["waiters"] == 1, what="queued wait")

    def replay(t: Tap) -> None:
        grant = t.last_bytes(True, GRANT_FRAME)
        t.append(True, grant)  # the earlier grant, as the answer to the new wait

    adversary(victim, replay)
    with pytest.raises(IntegrityError):
        victim.wait_reply(req_id)
    truth = stat_of(admin, sem_name)
    assert (truth["waits"], truth["value"]) == (1, 0)  # the replay granted nothing


def test_injected_garbage_is_an_integrity_error(victim: Client, admin: Client,
                                                sem_name: str) -> None:
    opened(sem_name, admin, CREX, 0o600, 0)
    req_id = victim.send(wait_request(token_of(opened(sem_name, victim))))
    wait_until(lambda: stat_of(admin, sem_name)["waiters"] == 1, what="queued wait")
    forged = (GRANT_FRAME - 4).to_bytes(4, "big") + os.urandom(GRANT_FRAME - 4)
    adversary(victim, lambda t: t.append(True, forged))
    with pytest.raises(IntegrityError):
        victim.wait_reply(req_id)
    assert stat_of(admin, sem_name)["waits"] == 0


@pytest.mark.parametrize("where", ["reply-head", "request-tail"])
def test_garbage_indices_are_caught_by_the_client(victim: Client, admin: Client,
                                                  sem_name: str, where: str) -> None:
    opened(sem_name, admin, CREX, 0o600, 0)
    token = token_of(opened(sem_name, victim))
    req_id = victim.send(wait_request(token))
    wait_until(lambda: stat_of(admin, sem_name)["waiters"] == 1, what="queued wait")

    def corrupt(t: Tap) -> None:
        if where == "reply-head":
            t.ctl[REP_HEAD] = (t.ctl[REP_TAIL] + t.cap + 7) & MASK64
        else:
            t.ctl[REQ_TAIL] = (t.ctl[REQ_HEAD] + 5) & MASK64  # "consumed" the future

    adversary(victim, corrupt)
    with pytest.raises(ProtocolError):  # a RingError: an IntegrityError
        if where == "reply-head":
            victim.wait_reply(req_id)
        else:
            victim.send(Request(Opcode.PING, 0))
    assert stat_of(admin, sem_name)["waits"] == 0


@pytest.mark.parametrize("where", ["request-head", "reply-tail"])
def test_garbage_indices_are_caught_by_the_service(victim: Client, admin: Client,
                                                   sem_name: str, where: str) -> None:
    """Indices only the service reads: it ends that session alone (the victim then sees
    its socket close), never reads outside the ring, and serves everyone else."""
    base = opened(sem_name, admin, CREX, 0o600, 0)
    req_id = victim.send(wait_request(token_of(opened(sem_name, victim))))
    wait_until(lambda: stat_of(admin, sem_name)["waiters"] == 1, what="queued wait")

    def corrupt(t: Tap) -> None:
        if where == "request-head":
            t.ctl[REQ_HEAD] = (t.ctl[REQ_TAIL] + t.cap + 1) & MASK64
        else:
            t.ctl[REP_TAIL] = (t.ctl[REP_HEAD] + 3) & MASK64

    adversary(victim, corrupt)
    if where == "request-head":
        # The poller looks at every switchless ring whenever any of them rings.
        bystander = Client(switchless=True)
        try:
            opened(sem_name, bystander).getvalue()
        finally:
            bystander.close()
    else:
        base.post()  # the grant cannot be written: the ring's tail is garbage
    with pytest.raises(ServiceUnavailable):
        victim.wait_reply(req_id)
    wait_until(lambda: stat_of(admin, sem_name)["handles"] == 1, what="victim session gone")
    info = stat_of(admin, sem_name)
    assert info["waiters"] == 0
    assert info["value"] + info["waits"] == info["posts"]
    base.post()
    base.wait()


# ------------------------------------------------------------ flow and death


def test_full_rings_in_both_directions(victim: Client, sem_name: str) -> None:
    """More requests than the request ring holds, sent without reading a reply: the
    sender waits for room, the service keeps the replies that do not fit its reply ring
    and delivers them all, in order, once they are read."""
    sem = opened(sem_name, victim, CREX, 0o600, 7)
    token = token_of(sem)
    assert victim._ring is not None
    count = 3 * victim._ring.capacity // 40  # ~47-byte requests, ~37-byte replies
    ids = [victim.send(Request(Opcode.GETVALUE, 0, handle=token)) for _ in range(count)]
    values = [victim.wait_reply(i).value for i in ids]
    assert values == [7] * count
    assert sem.getvalue() == 7


def test_a_client_that_never_reads_is_paused_and_others_go_on(
        python_switchless_service: EmbeddedService, admin: Client, sem_name: str) -> None:
    """A session floods requests and never reads a reply: the service keeps what does
    not fit its reply ring up to WRITE_HIGH_WATER, then stops reading that session's
    requests (as it pauses a socket session), and every other session is served."""
    base = opened(sem_name, admin, CREX, 0o600, 1)
    token = token_of(opened(sem_name, admin))
    sock, session, ring = raw_switchless(python_switchless_service)
    try:
        req = Request(Opcode.OPEN, 0, name=sem_name)
        ring.send(session.send_request(req, req_id=session.next_request_id()))
        got: list[Any] = []
        while not got:
            data = ring.recv(5.0)
            assert data is not None
            got = session.receive_data(data)
        handle = got[0].handle
        tx = ring._tx
        stalled_since: float | None = None
        give_up = time.monotonic() + 30
        sent = 0
        while time.monotonic() < give_up:
            frame = session.send_request(Request(Opcode.GETVALUE, 0, handle=handle),
                                         req_id=session.next_request_id())
            while tx.free() < len(frame):
                ring._ring()
                time.sleep(0.01)
                if tx.free() >= len(frame):
                    stalled_since = None
                    break
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    break
            if stalled_since is not None and time.monotonic() - stalled_since > 1.0:
                break
            tx.write(frame)
            sent += 1
            if sent % 64 == 0:
                ring._ring()
        assert stalled_since is not None, "the service never stopped reading the flood"
        # 256 KiB of ~37-byte replies pending, plus a full reply ring: thousands read.
        assert sent > 5000
        # Everyone else is served meanwhile.
        base.wait()
        base.post()
        other = Client(switchless=True)
        try:
            assert opened(sem_name, other).getvalue() == 1
        finally:
            other.close()
        assert admin.call(Request(Opcode.GETVALUE, 0, handle=token)).value == 1
    finally:
        ring.shutdown()
        ring.close()
        sock.close()
    wait_until(lambda: stat_of(admin, sem_name)["handles"] == 2, what="flooder forgotten")


def test_client_killed_mid_frame(python_switchless_service: EmbeddedService, admin: Client,
                                 sem_name: str) -> None:
    """A client dies with a wait queued and half a POST frame in its ring: the service
    drops its session (wait and handle gone, the half frame never executed) and carries
    on."""
    base = opened(sem_name, admin, CREX, 0o600, 0)

    def child() -> int:
        client = esem.connect(switchless=True)
        sem = sem_open(sem_name, flags=USE_ESEM)
        assert isinstance(sem, EsemSemaphore)
        client.send(wait_request(token_of(sem)))
        session, ring = client._session, client._ring
        assert session is not None and ring is not None
        frame = session.send_request(Request(Opcode.POST, 0, handle=token_of(sem)),
                                     req_id=session.next_request_id())
        ring._tx.write(frame[: len(frame) // 2])
        ring._ring()
        deadline = time.monotonic() + 10
        while ring._tx.unconsumed() and time.monotonic() < deadline:
            time.sleep(0.001)  # the service has read the half frame
        os.kill(os.getpid(), signal.SIGKILL)
        return 1

    assert reap(spawn(child)) == -signal.SIGKILL
    wait_until(lambda: stat_of(admin, sem_name)["handles"] == 1, what="dead session gone")
    info = stat_of(admin, sem_name)
    assert (info["waiters"], info["posts"], info["value"]) == (0, 0, 0)
    other = Client(switchless=True)
    try:
        mine = opened(sem_name, other)
        base.post()
        mine.wait()
    finally:
        other.close()


@pytest.fixture(params=_mode_params(("switchless", "python-switchless")))
def own_switchless_service(request: pytest.FixtureRequest) -> Iterator[EmbeddedService]:
    """A --switchless daemon of this test alone; the session on the native client's
    rings, then on the Python client's."""
    svc = _start(request.param)
    try:
        with _pointed_at(svc, request.param):
            yield svc
    finally:
        svc.cleanup()


def test_service_killed_while_a_switchless_client_spins(
        own_switchless_service: EmbeddedService, sem_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill the service for good in the middle of a stream of operations: the client
    fails with ServiceUnavailable once its resume timeout is over, never hangs, never
    succeeds afterwards."""
    monkeypatch.setenv("ESEM_RESUME_TIMEOUT", "1")
    sem = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)
    assert get_client().mode == "switchless"
    errors: list[BaseException] = []
    done = threading.Event()

    def hammer() -> None:
        try:
            while True:
                sem.post()
                sem.wait()
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    time.sleep(0.2)
    own_switchless_service.kill()
    assert done.wait(JOIN_TIMEOUT), "the client hung after the service died"
    assert isinstance(errors[0], ServiceUnavailable), repr(errors[0])
    with pytest.raises(ServiceUnavailable):
        sem.post()


# --------------------------------------------------------------- CPU budget


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


IDLE_BUDGET = 0.1  # CPU seconds over the 1-second windows below: generous, not a timing


def test_idle_and_blocked_sessions_cost_no_cpu(python_switchless_service: EmbeddedService,
                                               victim: Client, sem_name: str) -> None:
    """Over a second with a switchless session open and idle, and over another with a
    thread blocked in a wait on a semaphore at zero, neither the service nor this
    process burns CPU: both sides spun briefly, then slept."""
    assert python_switchless_service.proc is not None
    pid = python_switchless_service.proc.pid
    sem = opened(sem_name, victim, CREX, 0o600, 0)
    for _ in range(200):  # warm: the poller and the reader spin after this
        sem.post()
        sem.wait()
    time.sleep(0.1)
    service0, me0 = cpu_seconds(pid), cpu_seconds(os.getpid())
    time.sleep(1.0)
    idle_service = cpu_seconds(pid) - service0
    idle_me = cpu_seconds(os.getpid()) - me0
    assert idle_service < IDLE_BUDGET, f"idle service used {idle_service:.2f}s of CPU"
    assert idle_me < IDLE_BUDGET, f"idle client used {idle_me:.2f}s of CPU"

    waiter = threading.Thread(target=sem.wait, daemon=True)
    waiter.start()
    wait_until(lambda: stat_of(victim, sem_name)["waiters"] == 1, what="blocked wait")
    time.sleep(0.1)
    service0, me0 = cpu_seconds(pid), cpu_seconds(os.getpid())
    time.sleep(1.0)
    blocked_service = cpu_seconds(pid) - service0
    blocked_me = cpu_seconds(os.getpid()) - me0
    sem.post()
    waiter.join(JOIN_TIMEOUT)
    assert not waiter.is_alive()
    assert blocked_service < IDLE_BUDGET, f"service used {blocked_service:.2f}s"
    assert blocked_me < IDLE_BUDGET, f"a blocked wait used {blocked_me:.2f}s of CPU"


# ---------------------------------------------------------- mixed transports


def test_socket_and_switchless_waiters_are_served_in_fifo_order(
        python_switchless_service: EmbeddedService, admin: Client, sem_name: str) -> None:
    """Four processes queue on one semaphore, switchless and socket sessions in turn:
    posts grant them in exactly the order they queued."""
    base = opened(sem_name, admin, CREX, 0o600, 0)
    order_r, order_w = os.pipe()
    modes = ["switchless", "socket", "switchless", "socket"]

    def waiter(index: int, mode: str) -> Callable[[], int]:
        def run() -> int:
            os.environ["ESEM_SWITCHLESS"] = "1" if mode == "switchless" else "0"
            sem = sem_open(sem_name, flags=USE_ESEM)
            if get_client().mode != mode:
                return 3
            sem.wait()
            os.write(order_w, bytes([index]))
            return 0
        return run

    pids = []
    for i, m in enumerate(modes):
        pids.append(spawn(waiter(i, m)))
        wait_until(lambda i=i: stat_of(admin, sem_name)["waiters"] == i + 1,
                   what=f"waiter {i} queued")
    os.close(order_w)
    order = []
    for _ in modes:
        base.post()
        order.append(os.read(order_r, 1)[0])
    os.close(order_r)
    assert [reap(pid) for pid in pids] == [0] * len(modes)
    assert order == [0, 1, 2, 3]
    with pytest.raises(BusyError):
        base.trywait()


def test_socket_sessions_are_served_while_switchless_ones_keep_the_poller_busy(
        python_switchless_service: EmbeddedService, admin: Client,
        sem_names: Callable[[], str]) -> None:
    """Two processes hammer the service through the rings without pause, so its poller
    always has work: it must still yield to the event loop, and a socket session's
    operations (and a timed wait's timer) go through. Nothing here is timed: starving
    them would hang the test."""
    sem_name, busy = sem_names(), sem_names()
    base = opened(sem_name, admin, CREX, 0o600, 0)
    opened(busy, admin, CREX, 0o600, 0)
    stop_r, stop_w = os.pipe()

    def hammer() -> int:
        os.close(stop_w)
        sem = sem_open(busy, flags=USE_ESEM)
        if get_client().mode != "switchless":
            return 3
        while not select_readable(stop_r):
            for _ in range(50):
                sem.post()
                sem.wait()
        return 0

    pids = [spawn(hammer) for _ in range(2)]
    os.close(stop_r)
    try:
        wait_until(lambda: stat_of(admin, busy)["posts"] > 100, what="the hammers at work")
        for _ in range(100):
            base.post()
            base.trywait()
        with pytest.raises(BusyError):
            base.timedwait(0.05)  # the service's deadline timer fires meanwhile
    finally:
        os.close(stop_w)
        codes = [reap(pid) for pid in pids]
    assert codes == [0, 0]


def select_readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_env_value_other_than_0_or_1_warns(python_switchless_service: EmbeddedService,
                                           caplog: pytest.LogCaptureFixture) -> None:
    os.environ["ESEM_SWITCHLESS"] = "maybe"
    client = Client()
    try:
        with caplog.at_level(logging.WARNING, logger="esem.client"):
            client.connect()
        assert client.mode == "socket"
        assert any("neither 1 nor 0" in r.getMessage() and r.name == "esem.client"
                   for r in caplog.records)
    finally:
        client.close()
