"""Switchless sessions of the Python API on the native client (issue 12).

With the native client chosen (``ESEM_CLIENT=native``, the default once it is built),
``Client(switchless=True)``, ``esem.connect(switchless=True)`` and ``ESEM_SWITCHLESS=1``
ride on ``esem._native_core``'s rings. The whole e2e suite runs so in its ``switchless``
mode (``conftest.py``); this module checks what the suite cannot see: that the frames
really went through the rings (the service's poller counters, the mapped memfd), that a
refusal behaves exactly as on the Python client, that closing ends the session at once,
threads and fork, and a session that resumes across a restart of the service and asks
for its rings again.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

import esem
from esem import (
    O_CREAT,
    O_EXCL,
    USE_ESEM,
    SwitchlessUnavailable,
    get_client,
    sem_open,
)
from esem.client import admin
from esem.client import native as native_client
from esem.client.blocking import Client
from esem.server.embedded import EmbeddedService

from . import reap, spawn, wait_until
from .conftest import _pointed_at

pytestmark = pytest.mark.skipif(not native_client.available(),
                                reason="esem._native_core is not built")

CREX = O_CREAT | O_EXCL
JOIN_TIMEOUT = 30.0


def _samples(svc: EmbeddedService) -> dict[str, float]:
    """The service's metrics (unlabelled samples), scraped from its HTTP endpoint."""
    give_up = time.monotonic() + 10
    while (found := re.search(r"metrics on (http://\S+/metrics)",
                              svc.log_path.read_text())) is None:
        assert time.monotonic() < give_up, svc.log_path.read_text()
        time.sleep(0.02)
    with urllib.request.urlopen(found.group(1), timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if not s.labels}


@pytest.fixture
def metered() -> Iterator[EmbeddedService]:
    """A --switchless daemon with metrics, this process pointed at it on the native
    client (``ESEM_SWITCHLESS=1``)."""
    svc = EmbeddedService(extra_args=["--metrics", "127.0.0.1:0"], switchless=True).start()
    try:
        with _pointed_at(svc, "switchless"):
            yield svc
    finally:
        svc.cleanup()


def _stat(name: str) -> dict[str, object]:
    """The service's view of ``name``, through a socket session of its own."""
    client = Client(switchless=False)
    try:
        return admin.stat_semaphore(client, name)
    finally:
        client.close()


def _ring_memfds() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the directory's own descriptor, gone by now
    return [link for link in links if link.startswith("/memfd:esem-ring")]


def test_a_switchless_session_from_python_runs_on_the_native_rings(
        metered: EmbeddedService, sem_name: str) -> None:
    before = _samples(metered)
    assert before["esem_switchless_sessions"] == 0
    # Other tests' sessions of this process (on other services) may hold regions too:
    # this session's is the one more, and none is left of it after its close.
    others = len(_ring_memfds())
    client = Client(switchless=True)
    try:
        sem = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM, client=client)
        assert client.transport == "native" and client.mode == "switchless"
        assert client._ring is None and client._session is None  # not the Python client
        assert len(_ring_memfds()) == others + 1  # the region, mapped by esem-client
        mid = _samples(metered)
        assert mid["esem_switchless_sessions"] == 1
        for _ in range(200):
            sem.post()
        for _ in range(200):
            sem.trywait()
        assert sem.getvalue() == 0
        after = _samples(metered)
        # The poller served them: a socket frame on a session that has rings is a
        # protocol error that ends it, so these operations can only have been on the rings.
        assert after["esem_switchless_sessions"] == 1
        assert after["esem_switchless_passes_total"] > mid["esem_switchless_passes_total"]
        assert after["esem_switchless_wakeups_total"] >= 1
        assert client.failed is None
    finally:
        client.close()
    wait_until(lambda: _samples(metered)["esem_switchless_sessions"] == 0,
               what="the session's rings released")
    assert len(_ring_memfds()) == others  # unmapped and closed with the session


def test_refusals_are_the_python_clients(pyo3_service: EmbeddedService, sem_name: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """Against a service without --switchless: asked for explicitly, SwitchlessUnavailable
    (with the service's reason); preferred by the environment, a socket session on the
    native client and one warning on the ``esem.client`` logger, nothing on stderr."""
    with pytest.raises(SwitchlessUnavailable, match="not enabled"):
        Client(switchless=True).connect()
    with pytest.raises(SwitchlessUnavailable):
        esem.connect(switchless=True)
    os.environ["ESEM_SWITCHLESS"] = "1"
    client = Client()
    with caplog.at_level(logging.WARNING, logger="esem.client"):
        client.connect()
    try:
        assert [r.levelname for r in caplog.records
                if "using socket mode" in r.getMessage()] == ["WARNING"]
        assert all(r.name == "esem.client" for r in caplog.records)
        assert client.transport == "native" and client.mode == "socket"
        sem = sem_open(sem_name, CREX, 0o600, 1, flags=USE_ESEM, client=client)
        sem.wait()
        assert sem.getvalue() == 0
    finally:
        client.close()


def test_close_ends_the_session_at_once(metered: EmbeddedService,
                                        sem_names: object) -> None:
    """Closing a session whose poller sleeps: the END in the request ring must reach the
    service before the socket's EOF, or the service keeps the session (and the unit it
    holds) for a resume during the grace period. The race was lost about one time in
    five before the close waited for the END to be taken; twenty rounds."""
    assert callable(sem_names)
    for _ in range(20):
        name = sem_names()
        client = Client(switchless=True)
        sem = sem_open(name, CREX, 0o600, 1, flags=USE_ESEM, client=client)
        sem.wait()
        time.sleep(0.05)  # the service's poller goes to sleep (SPIN_IDLE)
        client.close()
        info = _stat(name)
        assert (info["holders_total"], info["dead_holders_total"]) == (0, 1), info


def test_threads_share_one_native_switchless_session(metered: EmbeddedService,
                                                     sem_name: str) -> None:
    """Four threads post and wait on one session's rings at once: nothing lost."""
    client = Client(switchless=True)
    try:
        sem = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM, client=client)
        assert client.mode == "switchless"
        rounds, errors = 300, []

        def work() -> None:
            try:
                for _ in range(rounds):
                    sem.post()
                    sem.wait()
                    sem.post()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_TIMEOUT)
        assert errors == [] and not any(t.is_alive() for t in threads)
        assert sem.getvalue() == 4 * rounds
        assert client.mode == "switchless" and client.failed is None
    finally:
        client.close()


def test_a_fork_child_gets_native_rings_of_its_own(metered: EmbeddedService,
                                                   sem_name: str) -> None:
    sem = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)
    parent = get_client()
    assert parent.transport == "native" and parent.mode == "switchless"

    def child() -> int:
        sem.post()  # through a session of the child's own (ATTACH)
        mine = get_client()
        if mine is parent or mine.transport != "native" or mine.mode != "switchless":
            return 3
        return 0 if parent.failed is not None else 4  # the parent's is not ours

    assert reap(spawn(child)) == 0
    sem.wait()  # the child's unit
    assert parent.failed is None and parent.mode == "switchless"


def test_a_session_resumes_across_a_restart_and_gets_its_rings_back(
        sem_name: str, tmp_path: object) -> None:
    """SIGKILL the service while a thread waits, start it again in the same directory:
    the native session resumes over the socket (the waiter still queued), asks the new
    service for rings again, and the wait is granted through them."""
    svc = EmbeddedService(switchless=True).start()
    try:
        with _pointed_at(svc, "switchless"):
            sem = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)
            client = get_client()
            assert client.mode == "switchless"
            out: list[BaseException | None] = []

            def waiter() -> None:
                try:
                    sem.wait()
                    out.append(None)
                except BaseException as exc:
                    out.append(exc)

            t = threading.Thread(target=waiter)
            t.start()
            wait_until(lambda: _stat(sem_name)["waiters"] == 1, what="the waiter queued")
            svc.kill()
            svc.start()
            wait_until(lambda: client.mode == "switchless" and _stat(sem_name)["waiters"] == 1,
                       what="the session resumed, its wait queued again, on rings again")
            sem.post()
            t.join(JOIN_TIMEOUT)
            assert out == [None]
            assert sem.getvalue() == 0 and client.failed is None
            assert client.mode == "switchless"
    finally:
        svc.cleanup()
