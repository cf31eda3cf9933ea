"""Crash torture: the service is SIGKILLed and restarted under busy real processes.

One real daemon (``python -m esem serve``) with a fixed state directory, so its key and
journal survive each restart, and real worker processes (``torture_worker.py``) that use
the public API with no retries: three do mutual exclusion on a value-1 e-semaphore around
a read-modify-write of a counter file, a producer and a consumer move numbered items
through a four-slot buffer (``slots``/``items`` counting semaphores). A killer SIGKILLs
the service at random moments and starts it again, ``ESEM_TORTURE_RESTARTS`` times (50 by
default; once more with the workers on the Python client's switchless rings, half as
many restarts, since the first moves their sessions to the socket; and on the native
client, over the socket and over its rings, which it asks for again after each resume).
Nothing may be seen but latency:

- never two workers inside at once (an O_EXCL marker file), and the counter equals the
  number of completed critical sections;
- every produced item consumed exactly once, in order;
- no worker saw an error (each reports its own);
- conservation at the end, by getvalue and by the service's own STAT.

Two smaller tests: waiters queued in a known order are granted in that order after three
restarts; and a client that dies while the service is down has its units handled after
the grace period (robust released, others kept as dead holdings).

Before resumption existed (main before issue 14) the first restart ends every session:
the workers' next call raises ``ServiceUnavailable`` and the test fails on their errors.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import esem.client.admin as admin
import esem.client.blocking as blocking
from esem import O_CREAT, O_EXCL, USE_ESEM, sem_open
from esem.server.embedded import EmbeddedService

WORKER = Path(__file__).with_name("torture_worker.py")
RESTARTS = int(os.environ.get("ESEM_TORTURE_RESTARTS", "50"))
MUTEX_WORKERS = 3
SLOTS = 4
GRACE = 5.0  # seconds: the daemon's default --resume-grace
CREX = O_CREAT | O_EXCL


class Restartable:
    """A real daemon in a fixed directory, killed with SIGKILL and started again."""

    def __init__(self, directory: Path, extra: list[str] | None = None) -> None:
        self.svc = EmbeddedService(directory, extra_args=extra)
        self.restarts = 0
        self.switchless = False
        self.client = "python"  # the workers' ESEM_CLIENT

    def start(self) -> None:
        self.svc.start(timeout=30.0)

    def crash_and_restart(self) -> None:
        assert self.svc.proc is not None
        os.kill(self.svc.proc.pid, signal.SIGKILL)
        self.svc.proc.wait()
        self.start()
        self.restarts += 1

    def ring_sessions(self) -> int:
        """Sessions on the switchless rings now, by the service's metrics (started with
        ``--metrics 127.0.0.1:0``: a new port at each start, the last one logged); 0
        while the endpoint is not up yet."""
        found = re.findall(r"metrics on (http://\S+/metrics)",
                           self.svc.log_path.read_text(errors="replace"))
        if not found:
            return 0
        try:
            with urllib.request.urlopen(found[-1], timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return 0
        got = re.search(r"^esem_switchless_sessions (\S+)$", text, re.MULTILINE)
        return int(float(got.group(1))) if got else 0

    def stat(self, name: str) -> dict[str, Any]:
        """The service's view of ``name``, through a client of its own (resumed too, if
        a restart comes in between)."""
        client = blocking.Client(self.svc.socket_path)
        try:
            return admin.stat_semaphore(client, name)
        finally:
            client.close()


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Restartable]:
    """The daemon; with ``switchless`` or ``native-switchless`` (indirect
    parametrization) started with ``--switchless``, and the workers ask for it (on the
    Python client their sessions resume over the socket; the native one upgrades
    again); ``native*``: the workers on the native client."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    previous = os.environ.get("ESEM_SOCKET")
    param = getattr(request, "param", "socket")
    switchless = param in ("switchless", "native-switchless")
    extra = ["--switchless"] if switchless else []
    if param == "native-switchless":
        extra += ["--metrics", "127.0.0.1:0"]  # ring_sessions()
    d = Restartable(state, extra or None)
    d.switchless = switchless
    d.client = "native" if param.startswith("native") else "python"
    d.start()
    os.environ["ESEM_SOCKET"] = str(d.svc.socket_path)
    blocking._process_client = None
    try:
        yield d
    finally:
        stale = blocking._process_client
        blocking._process_client = None
        if stale is not None and stale.pid == os.getpid():
            stale.close()
        if previous is None:
            os.environ.pop("ESEM_SOCKET", None)
        else:
            os.environ["ESEM_SOCKET"] = previous
        d.svc.stop()


def _worker(d: Restartable, work: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ESEM_SOCKET": str(d.svc.socket_path),
           # Generous for a loaded CI machine: a restart takes well under a second idle.
           "ESEM_RESUME_TIMEOUT": "30", "ESEM_SWITCHLESS": "1" if d.switchless else "0",
           "ESEM_CLIENT": d.client}
    return subprocess.Popen([sys.executable, str(WORKER), args[0], str(work), *args[1:]],
                            env=env, stdin=subprocess.DEVNULL)


def _results(work: Path) -> dict[str, dict[str, Any]]:
    return {p.name[len("result-"):-len(".json")]: json.loads(p.read_text())
            for p in work.glob("result-*.json")}


def _join(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _names(tag: str) -> str:
    return f"/esem-torture-{tag}-{os.getpid()}-{random.randrange(1 << 30)}"


# A restart takes about half a second on an idle machine; a loaded one may take seconds.
@pytest.mark.timeout(60 + 3 * RESTARTS)
@pytest.mark.parametrize("daemon", ["socket", "switchless", "native", "native-switchless"],
                         indirect=True)
def test_torture_mutex_and_buffer_survive_restarts(daemon: Restartable, tmp_path: Path) -> None:
    """``socket`` and ``switchless``: the workers on the pure-Python client; with
    ``switchless`` they start on the shared-memory rings, and only half the restarts are
    made (the first moves every session to the socket). ``native``: the same API on the
    native client (PyO3 over esem-client, which resumes in its reader thread), half the
    restarts; it keeps no resume count, so there the evidence is that no worker saw an
    error (a session not resumed fails its next call). ``native-switchless``: the native
    client on its rings; each resume goes over the socket and asks for rings again, so
    every worker ends on the rings. The next kill waits until every worker is back on
    rings: a connection lost during that upgrade fails the session by design (PROTOCOL.md
    16.6: the SWITCHLESS reply's descriptors cannot be replayed), which a kill at a
    random moment would otherwise hit now and then."""
    restarts = RESTARTS if daemon.client == "python" and not daemon.switchless \
        else RESTARTS // 2
    work = tmp_path / "work"
    (work / "items").mkdir(parents=True)
    (work / "consumed").mkdir()
    (work / "counter").write_text("0")
    mutex_name, slots_name, items_name = _names("mutex"), _names("slots"), _names("items")
    for name, value in ((mutex_name, 1), (slots_name, SLOTS), (items_name, 0)):
        sem_open(name, CREX, 0o600, value, flags=USE_ESEM).close()

    procs = [_worker(daemon, work, "mutex", mutex_name, str(i)) for i in range(MUTEX_WORKERS)]
    procs.append(_worker(daemon, work, "producer", slots_name, items_name))
    procs.append(_worker(daemon, work, "consumer", slots_name, items_name))
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    try:
        _until(lambda: len(list(work.glob("up-*"))) == len(procs), "every worker at work",
               timeout=60)
        modes = {p.read_text() for p in work.glob("up-*")}
        assert modes == {("switchless" if daemon.switchless else "socket")
                         + f" {daemon.client}"}, modes
        while daemon.restarts < restarts:
            time.sleep(rng.uniform(0.02, 0.3))
            exited = [p.args for p in procs if p.poll() is not None]
            assert not exited, f"workers exited during the torture: {exited}: {_results(work)}"
            if daemon.client == "native" and daemon.switchless:
                _until(lambda: daemon.ring_sessions() == len(procs),
                       "every worker on the rings again", timeout=60)
            daemon.crash_and_restart()
        time.sleep(0.3)
    finally:
        (work / "stop").touch()
        _join(procs, 60.0)

    results = _results(work)
    errors = {who: r["error"] for who, r in results.items() if r.get("error")}
    assert not errors, f"workers saw errors: {errors}"
    assert [p.returncode for p in procs] == [0] * len(procs)
    assert daemon.restarts == restarts

    mutexes = [results[f"mutex-{i}"] for i in range(MUTEX_WORKERS)]
    assert sum(m["violations"] for m in mutexes) == 0, "two workers were inside at once"
    completed = sum(m["completed"] for m in mutexes)
    assert int((work / "counter").read_text()) == completed
    assert completed > 0
    assert not (work / "inside").exists()

    produced = results["producer"]["produced"]
    consumed = results["consumer"]["consumed"]
    assert results["consumer"]["errors"] == []
    assert consumed == list(range(produced)), "items lost, duplicated or out of order"
    assert not os.listdir(work / "items")
    resumed = sum(r.get("resumes", 0) for r in results.values())
    if daemon.client == "python":
        assert resumed >= restarts, f"only {resumed} resumptions over {restarts} restarts"
    if daemon.client == "native" and daemon.switchless:  # upgraded again after each resume
        assert {who: r["mode"] for who, r in results.items()} == dict.fromkeys(
            results, "switchless")

    for name, value in ((mutex_name, 1), (slots_name, SLOTS), (items_name, 0)):
        sem = sem_open(name, flags=USE_ESEM)
        assert sem.getvalue() == value, name
        sem.close()
        st = daemon.stat(name)
        assert st["value"] == value
        assert st["waiters"] == 0 and st["holders_total"] == 0
        if name == mutex_name:  # the buffer's producer keeps slot units (a work queue)
            assert st["dead_holders_total"] == 0, st
        # Conservation by the service's own counts, kept across every restart.
        assert st["value"] == st["initial"] + st["posts"] - st["waits"] + st["robust_releases"]
    mode = ("switchless" if daemon.switchless else "socket") + f", {daemon.client} client"
    print(f"{restarts} restarts ({mode}): {completed} critical sections, {produced} items, "
          f"{resumed} resumptions")


FIFO_WAITERS = 5


def test_fifo_order_kept_across_restarts(daemon: Restartable, tmp_path: Path) -> None:
    work = tmp_path / "fifo"
    work.mkdir()
    name = _names("fifo")
    sem = sem_open(name, CREX, 0o600, 0, flags=USE_ESEM)
    procs = []
    try:
        for i in range(FIFO_WAITERS):  # queued one by one, so the order is known
            procs.append(_worker(daemon, work, "waiter", name, str(i)))
            _until(lambda i=i: daemon.stat(name)["waiters"] == i + 1, f"waiter {i} queued")
        for _ in range(3):
            daemon.crash_and_restart()
            time.sleep(0.2)
        assert daemon.stat(name)["waiters"] == FIFO_WAITERS
        for i in range(FIFO_WAITERS):  # one unit at a time: each goes to the queue's head
            sem.post()
            _until(lambda i=i: len(_order(work)) > i, f"grant {i}")
        _join(procs, 30.0)
    finally:
        _join(procs, 0.1)
    assert _order(work) == list(range(FIFO_WAITERS))
    errors = {who: r["error"] for who, r in _results(work).items() if r.get("error")}
    assert not errors
    assert sem.getvalue() == 0
    sem.close()


def _order(work: Path) -> list[int]:
    path = work / "order"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _until(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_client_that_died_during_the_outage(daemon: Restartable, tmp_path: Path) -> None:
    """A holder killed while the service is down never resumes: after the grace period
    (at once, since its process is gone) its robust unit is released and its unit of
    the plain semaphore is kept as a dead holding, exactly as when a holder dies."""
    work = tmp_path / "dead"
    work.mkdir()
    robust_name, plain_name = _names("robust"), _names("plain")
    sem_open(robust_name, CREX, 0o600, 1, flags=USE_ESEM, robust=True).close()
    sem_open(plain_name, CREX, 0o600, 1, flags=USE_ESEM).close()
    proc = _worker(daemon, work, "holder", robust_name, plain_name)
    try:
        _until(lambda: (work / "held").exists(), "the holder to hold")
        assert daemon.svc.proc is not None
        os.kill(daemon.svc.proc.pid, signal.SIGKILL)
        daemon.svc.proc.wait()
        proc.kill()
        proc.wait()
        daemon.start()
        _until(lambda: daemon.stat(robust_name)["value"] == 1, "the robust release",
               timeout=GRACE + 10)
    finally:
        _join([proc], 0.1)
    plain = daemon.stat(plain_name)
    assert plain["value"] == 0 and plain["dead_holders_total"] == 1
    robust = daemon.stat(robust_name)
    assert robust["holders_total"] == 0 and robust["robust_releases"] == 1


def test_an_idle_holder_keeps_its_unit_across_a_restart(daemon: Restartable) -> None:
    """A process that holds the mutex and makes no call while the service restarts, and
    for longer than the grace period after: its session was resumed by itself (not at
    its next call), so the unit is still its own, and its post returns it."""
    name = _names("idle")
    sem = sem_open(name, CREX, 0o600, 1, flags=USE_ESEM)
    sem.wait()
    daemon.crash_and_restart()
    time.sleep(GRACE + 1.0)
    st = daemon.stat(name)
    assert st["value"] == 0 and st["holders_total"] == 1 and st["dead_holders_total"] == 0
    sem.post()
    assert sem.getvalue() == 1


def test_asyncio_and_anyio_clients_ride_out_restarts(daemon: Restartable) -> None:
    """Waiters of an asyncio client and of an anyio session, queued when the service is
    killed, are granted after three restarts by posts made after them: each exactly
    once, and nothing else changed."""
    import asyncio

    import anyio

    import esem.aio
    import esem.anyio

    name = _names("async")
    sem_open(name, CREX, 0o600, 0, flags=USE_ESEM).close()
    restarted = threading.Event()

    def restarts() -> None:
        _until(lambda: daemon.stat(name)["waiters"] == 4, "four waiters")
        for _ in range(3):
            daemon.crash_and_restart()
            time.sleep(0.2)
        restarted.set()

    async def aio_side() -> list[bool]:
        sem = await esem.aio.open(name)
        waits = [asyncio.ensure_future(sem.acquire()) for _ in range(2)]
        while not restarted.is_set():
            await asyncio.sleep(0.05)
        return list(await asyncio.wait_for(asyncio.gather(*waits), 30))

    async def anyio_side(out: list[bool]) -> None:
        async with esem.anyio.connect() as s:
            sem = await s.open(name)

            async def one() -> None:
                out.append(await sem.acquire())

            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                tg.start_soon(one)

    results: dict[str, object] = {}

    def run_anyio() -> None:
        out: list[bool] = []
        try:
            anyio.run(anyio_side, out)
            results["anyio"] = out
        except BaseException as exc:
            results["anyio"] = exc

    thread = threading.Thread(target=run_anyio, daemon=True)
    thread.start()
    killer = threading.Thread(target=restarts, daemon=True)
    killer.start()

    async def main() -> list[bool]:
        side = asyncio.ensure_future(aio_side())
        while not restarted.is_set():
            await asyncio.sleep(0.05)
        poster = sem_open(name, flags=USE_ESEM)
        for _ in range(4):
            poster.post()
        return await side

    assert asyncio.run(main()) == [True, True]
    killer.join(60)
    thread.join(30)
    assert results["anyio"] == [True, True]
    sem = sem_open(name, flags=USE_ESEM)
    assert sem.getvalue() == 0
    st = daemon.stat(name)
    assert st["posts"] == 4 and st["waits"] == 4 and st["waiters"] == 0
