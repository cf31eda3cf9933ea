"""``esem bench restart``: how long a service restart keeps waiting clients waiting.

N Python-client sessions (``ESEM_CLIENT=python``: its statistics say when each
session resumed; the native client's resume is timed by tests/native/measure_resume.py),
spread over up to ``MAX_PROCS`` worker processes with a thread each,
block in ``wait`` on one value-0 e-semaphore of an embedded daemon whose state
directory (key and journal) survives; the daemon is SIGKILLed and started again on the
same directory, and every client reconnects and RESUMEs by itself. Measured, per N and
repetition, on CLOCK_MONOTONIC (system-wide, so the processes' clocks agree):

- ``restart_to_ready``: from spawning the new daemon until it publishes its key
  (process start, imports, journal replay);
- ``restart_to_all_resumed``: from spawning it until the last client has resumed
  (its session back with its queued wait), the figure a user sees as latency;
- ``ready_to_all_resumed``: the clients' part (backoff, handshake, RESUME).

Medians over the repetitions. The waiters are then granted (N posts) and must all
return: a benchmark that lost a waiter is a failed benchmark, not a number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from esem.bench.common import BenchError, Options, Row, emit, make_report, median, row
from esem.bench.report import other_tables

BENCH = "restart"
MAX_PROCS = 10  # worker processes at most: clients beyond this share a process
DEFAULT_CLIENTS = (1, 10, 100)
SMOKE_CLIENTS = (1, 4)
WAIT = 60.0  # seconds any step may take before the benchmark fails


def run(opts: Options, json_out: str | None, clients: list[int] | None,
        reps: int | None) -> int:
    if opts.socket is not None:
        raise BenchError("restart kills and restarts the service: it needs its own "
                         "embedded one (drop --socket)")
    counts = clients or list(SMOKE_CLIENTS if opts.smoke else DEFAULT_CLIENTS)
    reps = reps or (1 if opts.smoke else 3)
    results: list[Row] = []
    for n in counts:
        samples: dict[str, list[float]] = {}
        for _ in range(reps):
            for metric, value in measure(n).items():
                samples.setdefault(metric, []).append(value)
        for metric, values in samples.items():
            results.append(row(BENCH, "esem", "socket", f"{n} clients", metric,
                               median(values) * 1e3, "ms"))
    emit(make_report(opts, results), other_tables(results), json_out)
    return 0


def measure(n: int) -> dict[str, float]:
    """One restart under ``n`` waiting clients: its timings in seconds."""
    from esem import O_CREAT, O_EXCL, USE_ESEM
    from esem.api import sem_open
    from esem.client.admin import stat_semaphore
    from esem.client.blocking import Client
    from esem.server.embedded import EmbeddedService

    with tempfile.TemporaryDirectory(prefix="esem-bench-restart-") as tmp:
        svc = EmbeddedService(Path(tmp) / "state")
        svc.dir.mkdir(mode=0o700)
        svc.start(timeout=WAIT)
        name = f"/esem-bench-restart-{os.getpid()}-{n}"
        procs: list[subprocess.Popen[str]] = []
        try:
            admin = Client(svc.socket_path)
            sem_open(name, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM, client=admin)
            per = [n // MAX_PROCS + (i < n % MAX_PROCS) for i in range(min(n, MAX_PROCS))]
            for k in per:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "esem.bench.restart", str(svc.socket_path),
                     name, str(k)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    text=True, env={**os.environ, "ESEM_RESUME_TIMEOUT": str(WAIT),
                                        # the Python client's resume is what it times
                                        # (its stats say when each session resumed)
                                        "ESEM_CLIENT": "python"}))
            for p in procs:
                _expect(p, "ready")
            deadline = time.monotonic() + WAIT
            while stat_semaphore(admin, name)["waiters"] < n:
                if time.monotonic() > deadline:
                    raise BenchError(f"{n} waiters did not queue within {WAIT:g}s")
                time.sleep(0.01)
            assert svc.proc is not None
            os.kill(svc.proc.pid, signal.SIGKILL)
            svc.proc.wait()
            spawned = time.monotonic()
            svc.start(timeout=WAIT)
            ready = time.monotonic()
            resumed: list[float] = []
            for p in procs:
                resumed += json.loads(_expect(p, "resumed "))
            last = max(resumed)
            sem = sem_open(name, flags=USE_ESEM, client=admin)
            for _ in range(n):
                sem.post()
            for p in procs:
                _expect(p, "granted")
                p.wait(WAIT)
            admin.close()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            svc.cleanup()
    return {"restart_to_ready": ready - spawned, "restart_to_all_resumed": last - spawned,
            "ready_to_all_resumed": max(0.0, last - ready)}


def _expect(p: subprocess.Popen[str], prefix: str) -> str:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith(prefix):
        raise BenchError(f"restart worker {p.pid}: expected {prefix.strip()!r}, got "
                         f"{line.strip()!r} (exit status {p.poll()})")
    return line[len(prefix):]


def _worker(sock: str, name: str, k: int) -> int:
    """``k`` sessions of this process, each with a thread blocked in ``wait``."""
    from esem import USE_ESEM
    from esem.api import sem_open
    from esem.client.blocking import Client

    clients = [Client(sock) for _ in range(k)]
    sems = [sem_open(name, flags=USE_ESEM, client=c) for c in clients]
    errors: list[BaseException] = []

    def wait(sem: Any) -> None:
        try:
            sem.wait()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(s,), daemon=True) for s in sems]
    for t in threads:
        t.start()
    print("ready", flush=True)
    deadline = time.monotonic() + WAIT
    while not all(c.stats.resumes for c in clients):
        if errors or time.monotonic() > deadline:
            print(f"failed {errors!r}", flush=True)
            return 1
        time.sleep(0.001)
    print("resumed " + json.dumps([c.stats.resumed_at for c in clients]), flush=True)
    for t in threads:
        t.join(WAIT)
    if errors or any(t.is_alive() for t in threads):
        print(f"failed {errors!r}", flush=True)
        return 1
    print("granted", flush=True)
    for c in clients:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2], int(sys.argv[3])))
