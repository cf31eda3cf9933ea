"""The Python clients resume a lost session (PROTOCOL.md 16) against a real daemon.

The connection is cut for real: a ``shutdown(SHUT_RDWR)`` on a duplicate of the client's
own socket descriptor ends the connection both ways, so the service sees an EOF from a
process that still runs (and detaches the session) and the client sees one (and
resumes). To keep a client from coming back at once, the service's published key is
moved away: the client's reconnect finds no key to pin and tries again, and whatever
happens at the service meanwhile (a grant to the detached session, the grace period
running out) happens for real. Blocking, asyncio and anyio clients; socket and
switchless sessions. These are the pure-Python clients (``ESEM_CLIENT=python``): the
native client's resumption is tested in tests/native/test_resume.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import pytest

import esem.aio
import esem.anyio
from esem import O_CREAT, O_EXCL, USE_ESEM, IntegrityError, ServiceUnavailable, SignalError
from esem.api import EsemSemaphore, sem_open
from esem.client import blocking
from esem.client.admin import stat_semaphore
from esem.client.aio import AsyncClient
from esem.client.blocking import Client
from esem.paths import pubkey_path
from esem.server.embedded import EmbeddedService

GRACE = 2.0
CREX = O_CREAT | O_EXCL
JOIN = 20.0


@pytest.fixture(autouse=True)
def python_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocking client under test is the Python one, whatever the default."""
    monkeypatch.setenv("ESEM_CLIENT", "python")


def _start(switchless: bool = False) -> EmbeddedService:
    svc = EmbeddedService(extra_args=["--resume-grace", str(GRACE), "--no-journal"],
                          switchless=switchless)
    return svc.start()


@pytest.fixture(scope="module")
def svc() -> Iterator[EmbeddedService]:
    service = _start()
    try:
        yield service
    finally:
        service.cleanup()


@pytest.fixture
def name() -> str:
    return f"/esem-resume-{os.getpid()}-{time.monotonic_ns()}"


def client(svc: EmbeddedService, **kw: Any) -> Client:
    return Client(svc.socket_path, **kw)


def opened(c: Client, name: str, value: int | None = None) -> EsemSemaphore:
    if value is None:
        sem = sem_open(name, flags=USE_ESEM, client=c)
    else:
        sem = sem_open(name, CREX, 0o600, value, flags=USE_ESEM, client=c)
    assert isinstance(sem, EsemSemaphore)
    return sem


def stat(svc: EmbeddedService, name: str) -> dict[str, Any]:
    c = client(svc)
    try:
        return stat_semaphore(c, name)
    finally:
        c.close()


def cut(fd: int) -> None:
    """End the connection under descriptor ``fd`` both ways, as a reset would."""
    dup = socket.socket(fileno=os.dup(fd))
    try:
        dup.shutdown(socket.SHUT_RDWR)
    finally:
        dup.close()


def cut_blocking(c: Client) -> None:
    sock = c._sock
    assert sock is not None
    cut(sock.fileno())


@contextlib.contextmanager
def key_hidden(svc: EmbeddedService) -> Iterator[None]:
    """While inside, a reconnecting client finds no published key (and tries again)."""
    pub = pubkey_path(svc.socket_path)
    aside = pub.with_name(pub.name + ".aside")
    pub.rename(aside)
    try:
        yield
    finally:
        aside.rename(pub)


def until(predicate: Callable[[], bool], what: str, timeout: float = JOIN) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # reported by the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# ---------------------------------------------------------------- blocking


def test_waiters_see_only_latency(svc: EmbeddedService, name: str) -> None:
    """Three threads wait, the connection is cut: the session resumes and each wait is
    granted exactly once by three later posts."""
    c, poster = client(svc), client(svc)
    sem = opened(c, name, 0)
    runs = [in_thread(sem.wait) for _ in range(3)]
    until(lambda: stat(svc, name)["waiters"] == 3, "three waiters")
    cut_blocking(c)
    until(lambda: c.stats.resumes == 1, "the resume")
    p = opened(poster, name)
    for _ in range(3):
        p.post()
    for t, out in runs:
        t.join(JOIN)
        assert out == [None]
    assert sem.getvalue() == 0
    assert c.failed is None
    c.close()
    poster.close()


def test_grant_while_detached_is_delivered_once(svc: EmbeddedService, name: str) -> None:
    """A post that grants the wait of a detached session: the reply is kept in the
    replay window and delivered on resume, once; the unit is not granted twice."""
    c = client(svc)
    poster = client(svc, pubkey=svc.pubkey)
    sem = opened(c, name, 0)
    p = opened(poster, name)
    t, out = in_thread(sem.wait)
    until(lambda: stat(svc, name)["waiters"] == 1, "the waiter")
    with key_hidden(svc):
        cut_blocking(c)
        until(lambda: c.stats.reconnect_attempts >= 2, "a failed reconnect")
        p.post()  # granted to the detached session
        assert p.getvalue() == 0
    t.join(JOIN)
    assert out == [None]
    assert c.stats.resumes == 1
    assert sem.getvalue() == 0
    st = stat(svc, name)
    assert st["waits"] == 1 and st["posts"] == 1
    c.close()
    poster.close()


def test_requests_made_during_the_outage_are_sent_after(svc: EmbeddedService,
                                                        name: str) -> None:
    c = client(svc)
    sem = opened(c, name, 0)
    t, out = in_thread(sem.wait)  # holds the reader role and resumes
    until(lambda: stat(svc, name)["waiters"] == 1, "the waiter")
    with key_hidden(svc):
        cut_blocking(c)
        until(lambda: c.stats.reconnect_attempts >= 2, "a failed reconnect")
        poster, post_out = in_thread(sem.post)  # made while the session is down
        time.sleep(0.1)
        assert post_out == []  # still waiting for the session to be back
    poster.join(JOIN)
    t.join(JOIN)
    assert post_out == [None] and out == [None]
    assert sem.getvalue() == 0
    c.close()


@pytest.fixture
def alarm_raises() -> Iterator[None]:
    class Alarm(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Alarm

    old = signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_wait_interrupted_during_the_outage_is_withdrawn_exactly(
        svc: EmbeddedService, name: str, alarm_raises: None) -> None:
    """SIGALRM interrupts a wait while the session is down: the CANCEL is made then,
    sent on resume after the service answered nothing; the wait is withdrawn (a unit
    granted meanwhile would be posted back), nothing is lost or created."""
    c = client(svc)
    sem = opened(c, name, 1)
    sem.wait()  # hold the only unit: the next wait queues
    pub = pubkey_path(svc.socket_path)
    aside = pub.with_name(pub.name + ".aside")

    def outage() -> None:
        until(lambda: stat(svc, name)["waiters"] == 1, "the waiter")
        pub.rename(aside)
        try:
            cut_blocking(c)
            until(lambda: c.stats.reconnect_attempts >= 2, "a failed reconnect")
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # interrupts the reconnect backoff
            time.sleep(0.3)  # the withdrawal's CANCEL is made meanwhile, and waits
        finally:
            aside.rename(pub)

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    with pytest.raises(SignalError):
        sem.wait()
    t.join(JOIN)
    assert c.stats.resumes == 1
    sem.post()
    assert sem.getvalue() == 1
    st = stat(svc, name)
    assert st["waiters"] == 0 and st["value"] == 1
    assert st["waits"] == 1 and st["posts"] == 1  # the withdrawn wait took nothing
    c.close()


def test_a_service_with_another_key_is_never_accepted(name: str) -> None:
    """The reconnect pins the key again: a different one is an IntegrityError, and the
    session is not resumed through it."""
    svc = _start()
    try:
        c = client(svc)
        sem = opened(c, name, 0)
        pub = pubkey_path(svc.socket_path)
        with key_hidden(svc):
            cut_blocking(c)  # noticed by the next call
            other = bytes(range(32)).hex()  # a well-formed key of nobody's
            pub.write_text(other + "\n")
            with pytest.raises(IntegrityError):
                sem.getvalue()
            pub.unlink()
        assert isinstance(c.failed, IntegrityError)
    finally:
        svc.cleanup()


def test_the_async_clients_never_resume_with_another_key(name: str) -> None:
    """The asyncio and anyio clients re-read the key before a RESUME as the blocking one
    does (one ``recheck_key``): another key fails the session with IntegrityError."""
    svc = _start()
    pub = pubkey_path(svc.socket_path)
    other = bytes(range(32)).hex() + "\n"  # a well-formed key of nobody's

    async def on_asyncio() -> None:
        c = AsyncClient(svc.socket_path)
        await c.connect()
        sem = await esem.aio.open(name, CREX, 0o600, 0, client=c)
        with key_hidden(svc):
            pub.write_text(other)
            cut(c._fd)
            with pytest.raises(IntegrityError):
                await asyncio.wait_for(sem.getvalue(), JOIN)
            pub.unlink()
        assert c.resumes == 0
        c.close()

    async def on_anyio() -> None:
        async with esem.anyio.connect(svc.socket_path) as s:
            sem = await s.open(name + "-anyio", CREX, 0o600, 0)
            with key_hidden(svc):
                pub.write_text(other)
                cut(s._stream.extra(anyio.abc.SocketAttribute.raw_socket).fileno())
                with pytest.raises(IntegrityError), anyio.fail_after(JOIN):
                    await sem.getvalue()
                pub.unlink()
            assert s.resumes == 0

    try:
        asyncio.run(on_asyncio())
        anyio.run(on_anyio)
    finally:
        svc.cleanup()


def test_resume_timeout_zero_fails_at_once(svc: EmbeddedService, name: str) -> None:
    c = client(svc, resume_timeout=0)
    sem = opened(c, name, 0)
    cut_blocking(c)
    with pytest.raises(ServiceUnavailable):
        sem.trywait()
    assert c.stats.reconnect_attempts == 0


def test_a_session_past_its_grace_period_is_not_resumed(svc: EmbeddedService,
                                                        name: str) -> None:
    """Kept away longer than the grace period, the session has ended at the service:
    its RESUME is refused (ENOENT), and every pending and later call fails."""
    c = client(svc)
    sem = opened(c, name, 0)
    t, out = in_thread(sem.wait)
    until(lambda: stat(svc, name)["waiters"] == 1, "the waiter")
    with key_hidden(svc):
        cut_blocking(c)
        time.sleep(GRACE + 1.5)
    t.join(JOIN)
    [exc] = out
    assert isinstance(exc, ServiceUnavailable) and "could not be resumed" in str(exc), exc
    with pytest.raises(ServiceUnavailable, match="could not be resumed"):
        sem.post()
    assert stat(svc, name)["handles"] == 0


def test_close_ends_the_session_at_once(svc: EmbeddedService, name: str) -> None:
    """close() sends END: the service ends the session now rather than keeping it
    detached for the grace period (a process that still runs would otherwise keep its
    handles and units that long)."""
    c = client(svc)
    opened(c, name, 1).wait()
    assert stat(svc, name)["handles"] == 1
    c.close()
    st = stat(svc, name)
    assert st["handles"] == 0 and st["holders_total"] == 0


def test_keepalive_pings_survive_a_resume(svc: EmbeddedService, name: str) -> None:
    c = client(svc, keepalive=0.2)
    sem = opened(c, name, 0)
    t, out = in_thread(sem.wait)
    until(lambda: c.stats.keepalives >= 2, "keepalives")
    with key_hidden(svc):
        cut_blocking(c)
        time.sleep(0.5)
    until(lambda: c.stats.resumes == 1, "the resume")
    keepalives = c.stats.keepalives
    until(lambda: c.stats.keepalives > keepalives + 2, "keepalives after the resume")
    sem.post()
    t.join(JOIN)
    assert out == [None] and c.failed is None
    c.close()


def test_a_switchless_session_resumes_over_the_socket(name: str) -> None:
    svc = _start(switchless=True)
    try:
        c = client(svc, switchless=True)
        sem = opened(c, name, 0)
        assert c.mode == "switchless"
        t, out = in_thread(sem.wait)
        until(lambda: stat(svc, name)["waiters"] == 1, "the waiter")
        cut_blocking(c)
        until(lambda: c.stats.resumes == 1, "the resume")
        assert c.mode == "socket"
        sem.post()
        t.join(JOIN)
        assert out == [None]
        assert sem.getvalue() == 0
        c.close()
    finally:
        svc.cleanup()


def test_a_fork_child_never_resumes_its_parents_session(svc: EmbeddedService,
                                                        name: str) -> None:
    """The child's first use opens its own session (ATTACH); cutting the parent's
    connection afterwards is resumed by the parent alone."""
    previous = os.environ.get("ESEM_SOCKET")
    os.environ["ESEM_SOCKET"] = str(svc.socket_path)
    blocking._process_client = None
    try:
        sem = sem_open(name, CREX, 0o600, 0, flags=USE_ESEM)
        parent = blocking.get_client()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                sem.post()
                code = 0 if blocking.get_client() is not parent else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        cut_blocking(parent)
        sem.wait()  # the child's unit, through the parent's resumed session
        assert parent.stats.resumes == 1
    finally:
        stale = blocking._process_client
        blocking._process_client = None
        if stale is not None:
            stale.close()
        if previous is None:
            os.environ.pop("ESEM_SOCKET", None)
        else:
            os.environ["ESEM_SOCKET"] = previous


# ----------------------------------------------------------------- asyncio


def test_asyncio_client_resumes(svc: EmbeddedService, name: str) -> None:
    async def main() -> None:
        c = AsyncClient(svc.socket_path)
        await c.connect()
        sem = await esem.aio.open(name, CREX, 0o600, 0, client=c)
        waits = [asyncio.ensure_future(sem.acquire()) for _ in range(3)]
        await asyncio.sleep(0.1)
        with key_hidden(svc):
            assert c._fd >= 0
            cut(c._fd)
            await asyncio.sleep(0.3)
            assert c.resumes == 0
            post = asyncio.ensure_future(sem.release())  # made during the outage
            await asyncio.sleep(0.1)
            assert not post.done()
        await asyncio.wait_for(post, JOIN)
        await sem.release()
        await sem.release()
        assert await asyncio.wait_for(asyncio.gather(*waits), JOIN) == [True] * 3
        assert c.resumes == 1
        assert await sem.getvalue() == 0
        c.close()

    asyncio.run(main())


# ------------------------------------------------------------------- anyio


def test_anyio_session_resumes(svc: EmbeddedService, name: str) -> None:
    async def main() -> None:
        async with esem.anyio.connect(svc.socket_path) as s:
            sem = await s.open(name, CREX, 0o600, 0)
            results: list[bool] = []
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(lambda: _acquire(sem, results))
                await anyio.sleep(0.1)
                raw = s._stream.extra(anyio.abc.SocketAttribute.raw_socket)
                cut(raw.fileno())
                with anyio.fail_after(JOIN):
                    while s.resumes == 0:
                        await anyio.sleep(0.01)
                await sem.release()
                await sem.release()
            assert results == [True, True]
            assert await sem.getvalue() == 0

    anyio.run(main)


async def _acquire(sem: esem.anyio.Semaphore, results: list[bool]) -> None:
    results.append(await sem.acquire())


def test_an_idle_holder_resumes_by_itself(svc: EmbeddedService, name: str) -> None:
    """A client that holds a unit and makes no call for longer than the grace period
    (a long critical section) still has its session: the loss was noticed and resumed
    at once, not at its next call."""
    c = client(svc)
    sem = opened(c, name, 1)
    sem.wait()
    cut_blocking(c)
    time.sleep(GRACE + 1.0)  # no call: only the client's watcher can notice
    assert c.stats.resumes == 1
    st = stat(svc, name)
    assert st["holders_total"] == 1 and st["value"] == 0
    sem.post()
    assert sem.getvalue() == 1
    c.close()


def test_retry_loop_schedule_stop_and_give_up() -> None:
    """``resume.retry``, the asyncio and anyio clients' loop: each attempt's timeout is
    the connect timeout capped by the time left, the sleeps between attempts follow the
    backoff, a True attempt or a session no longer lost ends it (True), and running out
    of time ends it with False (the caller's "gave up")."""
    from esem.client import resume

    async def run(results: list[bool], lost: Callable[[], bool], span: float
                  ) -> tuple[bool, list[float], list[float]]:
        timeouts: list[float] = []
        sleeps: list[float] = []

        async def attempt(timeout: float) -> bool:
            timeouts.append(timeout)
            return results.pop(0) if results else False

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            await asyncio.sleep(seconds)

        done = await resume.retry(attempt, sleep, end=time.monotonic() + span,
                                  connect_timeout=5.0, lost=lost)
        return done, timeouts, sleeps

    done, timeouts, sleeps = asyncio.run(run([False, False, True], lambda: True, 30.0))
    assert done and len(timeouts) == 3 and all(4.0 < t <= 5.0 for t in timeouts)
    assert sleeps == [resume.BACKOFF_FIRST, 2 * resume.BACKOFF_FIRST]
    done, timeouts, _ = asyncio.run(run([], lambda: False, 30.0))
    assert done and timeouts == []  # already back (or failed): nothing to try
    done, timeouts, sleeps = asyncio.run(run([], lambda: True, 0.05))
    assert not done and timeouts and all(t <= 0.05 for t in timeouts)
    assert sum(sleeps) <= 0.05 + 0.01 and max(sleeps) <= resume.BACKOFF_MAX
