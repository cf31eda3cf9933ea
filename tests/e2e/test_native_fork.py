"""Forks that skip ``os.register_at_fork``: libc's ``fork()`` called through ctypes.

Native code that forks (ctypes, C extensions, embedding applications) never runs
Python's atfork handlers, so the child starts with the parent's sessions looking
usable. Parent and child then share one socket (or one pair of rings) and one cipher
state: a child that sends reuses the parent's nonces, one that reads steals the
parent's replies, one that shuts the socket down ends the parent's session. The client
checks, on every path that sends, reads or closes, that it is still in the process that
opened the session; these tests fork for real and use what the child inherited.

Every test runs over the socket and over the switchless rings (``service`` fixture).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

import esem
from esem import O_CREAT, O_EXCL, USE_ESEM, EsemSemaphore, ServiceUnavailable, sem_open
from esem.client import admin
from esem.client.blocking import Client, get_client
from esem.core.status import Status
from esem.core.table import WaitMode
from esem.protocol.constants import Opcode
from esem.protocol.messages import Request

from . import reap, spawn, wait_for_waiters


def others_threads() -> bool:
    """Threads besides this one, not counting the esem clients' watchers (which block
    every signal and sleep in poll, so they neither take a signal nor, but for a
    microsecond every ten seconds, hold the GIL)."""
    return any(t is not threading.current_thread() and not t.name.startswith("esem-watch")
               for t in threading.enumerate())

CREX = O_CREAT | O_EXCL
JOIN_TIMEOUT = 30.0
_libc_fork = ctypes.CDLL(None, use_errno=True).fork
_libc_fork.restype = ctypes.c_int
_libc_fork.argtypes = []


def native_spawn(child: Callable[[], int | None]) -> int:
    """``spawn`` (tests/e2e/__init__.py) through libc's ``fork()``: no atfork handler runs
    in parent or child."""
    if others_threads():
        # ctypes releases the GIL around the call: another thread could hold it at the
        # moment of the fork, and the child would never get it back.
        pytest.skip("a C-level fork needs a single-threaded process")
    return spawn(child, fork=_libc_fork)


def opened(name: str, *args: Any) -> EsemSemaphore:
    sem = sem_open(name, *args, flags=USE_ESEM)
    assert isinstance(sem, EsemSemaphore)
    return sem


def used_session(sem: EsemSemaphore) -> Client:
    """Make sure the parent's session has sent and received (its counters are past 0)."""
    sem.post()
    sem.wait()
    client = get_client()
    assert client.failed is None and client.connected
    return client


def test_native_fork_parent_and_child_share_an_inherited_handle(
        service: Any, sem_names: Callable[[], str]) -> None:
    """Both processes use the same inherited handle, interleaved: the child through a
    session of its own (re-attaching the handle), the parent through its old session,
    which keeps authenticating (no reused nonce)."""
    sem, go = opened(sem_names(), CREX, 0o600, 0), opened(sem_names(), CREX, 0o600, 0)
    client = used_session(sem)
    mode = client.mode

    def child() -> int:
        sem.post()
        sem.post()
        mine = get_client()  # the child's own session, in the parent's mode
        if mine is client or not mine.in_own_process or mine.mode != mode:
            return 3
        if esem.connect() is not mine:
            return 4
        go.wait()  # the parent has taken both units meanwhile
        sem.post()
        return 0

    pid = native_spawn(child)
    sem.timedwait(JOIN_TIMEOUT)
    sem.timedwait(JOIN_TIMEOUT)
    go.post()
    assert reap(pid) == 0
    sem.wait()  # the child's third post
    assert sem.getvalue() == 0
    assert client.failed is None and get_client() is client
    assert client.call(Request(Opcode.PING, 0)).status is Status.OK


def test_native_fork_child_never_sends_on_the_parents_session(service: Any,
                                                              sem_name: str) -> None:
    """The child calls the parent's client object directly (the one ``esem.connect()``
    returned to it): every call is refused before a byte is sent, closing it leaves
    the parent's session up, and the parent's session goes on as if nothing happened."""
    sem = opened(sem_name, CREX, 0o600, 0)
    client = used_session(sem)
    token = sem._tokens[os.getpid()][1]

    def child() -> int:
        calls: list[Callable[[], object]] = [
            lambda: client.call(Request(Opcode.PING, 0)),
            lambda: client.send(Request(Opcode.POST, 0, handle=token)),
            lambda: sem_open(sem_name, flags=USE_ESEM, client=client),
            lambda: admin.stat_semaphore(client, sem_name),
            client.connect,
        ]
        for i, call in enumerate(calls):
            try:
                call()
            except ServiceUnavailable as exc:
                if "parent process" not in str(exc):
                    return 10 + i
            else:
                return 20 + i  # it went through on the parent's session
        if client.failed is None or client.in_own_process:
            return 3
        client.close()  # must not shut the parent's connection down
        sem.post()  # and the handle still works, through a session of the child's own
        return 0

    assert reap(native_spawn(child)) == 0
    for _ in range(3):
        sem.post()
    assert sem.getvalue() == 4
    assert client.failed is None and get_client() is client
    assert client.call(Request(Opcode.PING, 0)).status is Status.OK


def test_native_fork_child_never_reads_the_parents_replies(service: Any,
                                                           sem_name: str) -> None:
    """The parent has a wait queued when it forks; the child asks for that wait's reply
    on the inherited client. It must be refused at once (reading would take the grant
    from the shared socket or ring, and the keepalive would write to the session), and
    the grant must reach the parent."""
    sem = opened(sem_name, CREX, 0o600, 0)
    client = used_session(sem)
    token = sem._tokens[os.getpid()][1]
    req_id = client.send(Request(Opcode.WAIT, 0, handle=token, wait_mode=WaitMode.BLOCK))
    wait_for_waiters(sem_name, 1)

    def child() -> int:
        try:
            client.wait_reply(req_id)
        except ServiceUnavailable:
            return 0
        return 2

    assert reap(native_spawn(child), timeout=15) == 0
    sem.post()  # the grant goes to the parent's queued wait
    assert client.wait_reply(req_id).status is Status.OK
    assert sem.getvalue() == 0
    assert client.failed is None


# ------------------------------------------------------------- a recycled pid

PR_SET_CHILD_SUBREAPER = 36
NOT_RECYCLED = 77


def _fork_with_pid(pid: int, child: Callable[[], int | None]) -> int | None:
    """Native-fork ``child`` as process ``pid`` (root: ``ns_last_pid``); None if another
    process of the machine took that pid first."""
    for _ in range(5):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        got = native_spawn(lambda: child() if os.getpid() == pid else NOT_RECYCLED)
        if got == pid:
            return got
        reap(got)
    return None


def test_descendant_with_a_dead_ancestors_pid_does_not_use_its_session(
        service: Any, sem_name: str) -> None:
    """The pid check alone would be fooled: A uses a handle (its own session), forks B
    natively and dies; B forks G natively with A's pid (recycled on purpose). G sees a
    handle entry and a client "of its pid", yet they are A's: G must attach through a
    session of its own, not send on A's (which B's inherited descriptor keeps open)."""
    if os.geteuid() != 0 or not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("choosing a child's pid needs root (ns_last_pid)")
    sem = opened(sem_name, CREX, 0o600, 0)
    used_session(sem)

    def g() -> int:
        inherited = get_client.__globals__["_process_client"]  # A's, as B left it
        sem.post()
        client = sem._tokens[os.getpid()][0]
        return 0 if client is not inherited and client.in_own_process else 5

    def b(a_pid: int) -> int:  # not getppid(): once A is dead, that is X
        while True:  # until A is dead and reaped: its pid is free again
            try:
                os.kill(a_pid, 0)
            except ProcessLookupError:
                break
            threading.Event().wait(0.005)
        g_pid = _fork_with_pid(a_pid, g)
        return NOT_RECYCLED if g_pid is None else reap(g_pid)

    def a() -> int:
        sem.post()  # attaches: the handle's entry for A's pid, on A's session
        a_pid = os.getpid()
        return 0 if native_spawn(lambda: b(a_pid)) > 0 else 1

    def x() -> int:  # B's parent once A is gone: it reaps B
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return 2
        a_pid = os.fork()
        if a_pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                code = a()
            finally:
                os._exit(code)
        if reap(a_pid) != 0:
            return 3
        _, status = os.wait()  # B, reparented to us
        return os.waitstatus_to_exitcode(status)

    from . import run_forked

    code = run_forked(x)
    if code == NOT_RECYCLED:
        pytest.skip("another process took the pid to recycle")
    assert code == 0
    assert sem.getvalue() == 2  # A's post and G's
