"""The native client under the Python API (esem._native_core, ESEM_CLIENT): which client
a session gets, that the native session is the one really used, and that bad input to
the extension is a Python error, never a Rust panic. The API's behaviour on the native
client is tested by the whole of tests/e2e (its pyo3 mode) and tests/sync (both
clients); these are the parts only the adapter has."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import esem
import esem.client.blocking as blocking
import esem.client.native as native_client
from esem import O_CREAT, O_EXCL, USE_ESEM, sem_open
from esem.errors import ServiceUnavailable, SignalError
from esem.server.embedded import EmbeddedService

needs_native = pytest.mark.skipif(not native_client.available(),
                                  reason="esem._native_core is not built")


@pytest.fixture
def choose(service: EmbeddedService,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Set ESEM_CLIENT for the next session of this process (dropping the current one)."""

    def set_client(value: str) -> None:
        monkeypatch.setenv(native_client.ENV, value)
        stale, blocking._process_client = blocking._process_client, None
        if stale is not None and stale.pid == os.getpid():
            stale.close()

    yield set_client
    stale, blocking._process_client = blocking._process_client, None
    if stale is not None and stale.pid == os.getpid():
        stale.close()


@needs_native
@pytest.mark.parametrize("value", ["native", "python", " Native "])
def test_esem_client_chooses_the_transport(choose: Callable[[str], None], sem_name: str,
                                           value: str) -> None:
    choose(value)
    sem = sem_open(sem_name, O_CREAT | O_EXCL, 0o600, 1, flags=USE_ESEM)
    sem.wait()
    assert esem.get_client().transport == value.strip().lower()
    assert type(sem) is esem.EsemSemaphore


def test_unknown_esem_client_is_a_value_error(choose: Callable[[str], None],
                                              sem_name: str) -> None:
    choose("rust")
    with pytest.raises(ValueError, match="ESEM_CLIENT='rust'"):
        sem_open(sem_name, O_CREAT, 0o600, 1, flags=USE_ESEM)
    choose("")  # so that the name fixture's clean-up can connect


def test_native_forced_but_not_built_says_so(choose: Callable[[str], None], sem_name: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """As an installation without cargo has it: the extension failed to import."""
    monkeypatch.setattr(native_client, "_module", None)
    choose("native")
    with pytest.raises(ServiceUnavailable, match="not built"):
        sem_open(sem_name, O_CREAT, 0o600, 1, flags=USE_ESEM)
    choose("")  # unset: the Python client serves
    sem_open(sem_name, O_CREAT, 0o600, 1, flags=USE_ESEM).wait()
    assert esem.get_client().transport == "python"


@needs_native
def test_switchless_and_custom_timeouts_stay_on_the_python_client(
        choose: Callable[[str], None], service: EmbeddedService) -> None:
    choose("native")
    short = blocking.Client(connect_timeout=1.0)
    try:
        short.connect()
        assert short.transport == "python"
    finally:
        short.close()
    plain = blocking.Client(switchless=False)
    try:
        plain.connect()
        assert plain.transport == "native"
    finally:
        plain.close()


@needs_native
def test_native_wait_runs_handlers_and_withdraws(choose: Callable[[str], None],
                                                 sem_name: str) -> None:
    """A handler that raises interrupts a native wait: SignalError from it, the wait
    withdrawn (a later post is not swallowed by a phantom waiter); KeyboardInterrupt
    passes unchanged."""
    choose("native")
    sem = sem_open(sem_name, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM)

    class Boom(Exception):
        pass

    def boom(signum: int, frame: Any) -> None:
        raise Boom

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, boom)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(SignalError) as info:
            sem.wait()
        assert isinstance(info.value.__cause__, Boom)
        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            sem.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    sem.post()
    assert sem.getvalue() == 1  # no withdrawn wait took it
    sem.wait()


@needs_native
def test_native_wait_releases_the_gil(choose: Callable[[str], None], sem_name: str) -> None:
    """Python threads run while one is blocked in the extension (else this would hang:
    the post comes from a Python thread that needs the GIL)."""
    choose("native")
    sem = sem_open(sem_name, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM)
    ticks = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    spinner = threading.Thread(target=spin)
    spinner.start()
    poster = threading.Timer(0.2, sem.post)
    poster.start()
    try:
        sem.timedwait(30)
    finally:
        stop.set()
        spinner.join()
        poster.join()
    assert ticks > 10


@needs_native
def test_bad_input_is_a_python_error_not_a_panic(service: EmbeddedService) -> None:
    from esem import _native_core

    session = _native_core.Session(str(service.socket_path), service.pubkey)
    try:
        bad: list[Callable[[], object]] = [
            lambda: session.post(b"short", None),
            lambda: session.getvalue(b"x" * 17, None),
            lambda: session.wait(b"\0" * 16, 9, 0, None),
            lambda: session.send(200, b"", "", 0, 0, 0, None, 0, 0, 0, "", None),
            lambda: session.send(1, b"", "/x", 256, 0, 0, None, 0, 0, 0, "", None),
            lambda: session.send(1, b"", "/x", 0, 1 << 16, 0, None, 0, 0, 0, "", None),
            lambda: session.send(1, b"", "/x", 0, 0, 1 << 32, None, 0, 0, 0, "", None),
            lambda: session.send(12, b"", "", 0, 0, 0, None, 0, 0, 0, "", None),
            lambda: session.send(7, b"", "", 0, 0, 0, None, 0, 0, 0, "", b"k" * 16),
            lambda: session.open("/x", 0, 0, 0, None, b"short key"),
            lambda: session.attach(b"", None),
        ]
        for call in bad:
            with pytest.raises((ValueError, OverflowError, esem.EsemError)) as info:
                call()
            assert "Panic" not in type(info.value).__name__
        with pytest.raises(OverflowError):
            session.wait(b"\0" * 16, 1, -1, None)
        with pytest.raises(ValueError, match="32 bytes"):
            _native_core.Session(str(service.socket_path), b"short")
        # The session survived all of it: nothing was sent.
        assert session.failure() is None
        handle, created = session.open("/esem-test-pyo3-bad-input", 1, 0o600, 0, None, None)
        assert created
        session.post(handle, None)
        assert session.getvalue(handle, None) == 1
        session.unlink("/esem-test-pyo3-bad-input", None)
    finally:
        session.close()
    assert isinstance(session.failure(), ServiceUnavailable)


@needs_native
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.integers(0, 255), handle=st.binary(max_size=20),
       name=st.text(max_size=300), oflag=st.integers(0, 1 << 20),
       mode=st.integers(0, 1 << 20), value=st.integers(0, 1 << 40),
       create_key=st.none() | st.binary(max_size=40), wait_mode=st.integers(0, 255),
       timeout_ns=st.integers(0, (1 << 64) - 1), target=st.integers(0, (1 << 64) - 1),
       after=st.text(max_size=300), key=st.none() | st.binary(max_size=40))
def test_any_request_fields_are_sent_or_refused_never_a_panic(
        service: EmbeddedService, opcode: int, handle: bytes, name: str, oflag: int,
        mode: int, value: int, create_key: bytes | None, wait_mode: int, timeout_ns: int,
        target: int, after: str, key: bytes | None) -> None:
    """Whatever fields Python passes, the extension raises a Python error before sending,
    or sends a request the service answers (a refusal at most): never a panic, and the
    session stays usable (a WAIT that might block is sent as TRY)."""
    from esem import _native_core

    session = _SESSIONS.get(service.socket_path)
    if session is None or session.failure() is not None:
        session = _SESSIONS[service.socket_path] = _native_core.Session(
            str(service.socket_path), service.pubkey)
    if opcode == 4 and wait_mode == 1:  # BLOCK could wait forever on a real semaphore
        wait_mode = 0
    try:
        req_id = session.send(opcode, handle, name, oflag, mode, value, create_key,
                              wait_mode, timeout_ns, target, after, key)
    except (ValueError, OverflowError) as exc:
        assert "Panic" not in type(exc).__name__
        return
    reply = session.wait_reply(req_id)
    assert reply[1] == req_id
    assert session.failure() is None


_SESSIONS: dict[object, Any] = {}
