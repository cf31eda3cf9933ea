"""``esem serve --metrics``: a real daemon, real requests through the client, and the
endpoint scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import os
import re
import socket as socket_mod
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open, sem_unlink
from esem.client.blocking import Client
from esem.core.policy import Quotas
from esem.errors import BusyError, ExistentialError
from esem.server.embedded import EmbeddedService
from esem.server.metrics import DEFAULT_HOST, parse_address

CREX = O_CREAT | O_EXCL


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[EmbeddedService]:
    with EmbeddedService(tmp_path, ["--metrics", "127.0.0.1:0"]) as service:
        yield service


def _url(svc: EmbeddedService) -> str:
    # The service publishes its key (EmbeddedService's readiness) once its socket is
    # bound; the metrics endpoint comes up a moment later, in the event loop.
    give_up = time.monotonic() + 10
    while True:
        found = re.search(r"metrics on (http://\S+/metrics)", svc.log_path.read_text())
        if found or time.monotonic() > give_up:
            break
        time.sleep(0.02)
    assert found, svc.log_path.read_text()
    return found.group(1)


def scrape(svc: EmbeddedService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(_url(svc), timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_real_requests(svc: EmbeddedService) -> None:
    before = scrape(svc)
    client = Client(svc.socket_path)
    name = f"/metrics-{uuid.uuid4().hex[:8]}"
    sem = sem_open(name, CREX, 0o600, 0, flags=USE_ESEM, client=client)
    for _ in range(5):
        sem.post()
    for _ in range(5):
        sem.trywait()
    with pytest.raises(BusyError):
        sem.trywait()  # refused: EAGAIN
    with pytest.raises(ExistentialError):
        sem_open(name + "-absent", flags=USE_ESEM, client=client)  # refused: ENOENT
    # a wait that queues, seen by the waiters gauge, then granted by a post
    other = Client(svc.socket_path)
    mine = sem_open(name, flags=USE_ESEM, client=other)
    waiter = threading.Thread(target=mine.wait)
    waiter.start()
    uid = str(os.getuid())
    queued = scrape(svc)
    while queued[("esem_waiters", ())] < 1:
        queued = scrape(svc)
    assert queued[("esem_uid_waiters", (("uid", uid),))] == 1
    sem.post()
    waiter.join(10)
    after = scrape(svc)

    def grew(metric: str, **labels: str) -> float:
        key = (metric, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("esem_requests_total", opcode="POST", status="OK") == 6
    assert grew("esem_requests_total", opcode="WAIT", status="OK") == 5
    assert grew("esem_requests_total", opcode="WAIT", status="EAGAIN") == 1
    assert grew("esem_requests_total", opcode="WAIT", status="QUEUED") == 1
    assert grew("esem_requests_total", opcode="OPEN", status="ENOENT") == 1
    assert grew("esem_queued_wait_ends_total", status="OK") == 1
    # every request handled went into the latency histogram, in its opcode's series
    requests = sum(v - before.get(k, 0.0) for k, v in after.items()
                   if k[0] == "esem_requests_total")
    observed = sum(v - before.get(k, 0.0) for k, v in after.items()
                   if k[0] == "esem_request_duration_seconds_count")
    assert observed == requests > 0
    assert grew("esem_request_duration_seconds_count", opcode="POST") == 6
    assert after[("esem_request_duration_seconds_bucket",
                  (("le", "+Inf"), ("opcode", "POST")))] >= 6
    # gauges read from the table: two sessions of this uid, one semaphore
    assert after[("esem_sessions", ())] >= 2
    assert after[("esem_uid_sessions", (("uid", uid),))] >= 2
    assert after[("esem_uid_semaphores", (("uid", uid),))] >= 1
    assert after[("esem_waiters", ())] == 0
    assert after[("esem_quota", (("quota", "sessions_per_uid"),))] == Quotas().sessions_per_uid
    assert after[("esem_sessions_started_total", ())] >= 2
    sem_unlink(name, flags=USE_ESEM, client=client)
    client.close()
    other.close()


def test_refused_sessions_and_protocol_errors_counted(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path, ["--metrics", "127.0.0.1:0", "--quota-sessions", "1"]) as svc:
        first = Client(svc.socket_path)
        first.connect()
        with pytest.raises(Exception, match="quota"):
            Client(svc.socket_path).connect()
        with socket_mod.socket(socket_mod.AF_UNIX) as raw:  # no session slot: refused too
            raw.connect(str(svc.socket_path))
        first.close()
        # the slot is free once the service has seen that session end
        deadline = time.monotonic() + 10
        while scrape(svc)[("esem_sessions", ())] != 0:
            assert time.monotonic() < deadline, "the session did not end"
            time.sleep(0.01)
        with socket_mod.socket(socket_mod.AF_UNIX) as raw:
            raw.connect(str(svc.socket_path))
            raw.sendall(b"\x00\x00\x00\x05garbage")  # not a handshake
            raw.recv(100)
        samples = scrape(svc)
        assert samples[("esem_sessions_refused_total", ())] >= 1
        assert samples[("esem_protocol_errors_total", ())] >= 1


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    (":9464", (DEFAULT_HOST, 9464)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:80", ("localhost", 80)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:port", ":70000", "::1:80", "[x]:1"])
def test_bad_address_is_usage_error(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
    result = subprocess.run([sys.executable, "-m", "esem", "serve", "--dir", str(tmp_path),
                             "--metrics", text], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "metrics" in result.stderr


def test_missing_prometheus_client_says_what_to_install(tmp_path: Path) -> None:
    """A Python without the package (made so by blocking its import) refuses to start,
    naming the extra, instead of starting without the metrics it was asked for."""
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "from esem.cli import main\n"
            f"sys.exit(main(['serve', '--dir', {str(tmp_path)!r}, '--metrics', ':0']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 3, result
    assert "esem[metrics]" in result.stderr
    assert not (tmp_path / "esem.sock").exists()


def test_service_with_metrics_stops_cleanly(tmp_path: Path) -> None:
    svc = EmbeddedService(tmp_path, ["--metrics", "127.0.0.1:0"]).start()
    try:
        url = _url(svc)
        assert scrape(svc)[("esem_sessions", ())] == 0
    finally:
        assert svc.stop() == 0  # SIGTERM: exit status 0, the HTTP thread stopped with it
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


def test_switchless_poller_counters(tmp_path: Path) -> None:
    """A --switchless service exports its poller's counters (sessions on the rings,
    wake-ups, passes, idle yields): what a profile of the poller reads."""
    with EmbeddedService(tmp_path, ["--metrics", "127.0.0.1:0"], switchless=True) as svc:
        before = scrape(svc)
        assert before[("esem_switchless_sessions", ())] == 0
        client = Client(svc.socket_path, pubkey=svc.pubkey, switchless=True)
        client.connect()
        try:
            sem = sem_open(f"/m-{uuid.uuid4().hex[:12]}", CREX, 0o600, 0, flags=USE_ESEM,
                           client=client)
            for _ in range(20):
                sem.post()
            after = scrape(svc)
            assert after[("esem_switchless_sessions", ())] == 1
            assert after[("esem_switchless_wakeups_total", ())] >= 1
            assert after[("esem_switchless_passes_total", ())] >= 1
            assert ("esem_switchless_yields_total", ()) in after
            sem.close()
            sem_unlink(sem.name, flags=USE_ESEM, client=client)
        finally:
            client.close()
    plain = tmp_path / "plain"
    with EmbeddedService(plain, ["--metrics", "127.0.0.1:0"]) as svc:
        assert ("esem_switchless_sessions", ()) not in scrape(svc)
