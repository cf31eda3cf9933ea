"""``esem bench peer``: esem beside what people use instead when a cross-process semaphore
should live in a service: a Redis-backed semaphore. Legacy POSIX semaphores run too.

The Redis semaphore is the usual recipe: the units are tokens in a list, ``wait`` is
``BLPOP`` (blocks in the server while the list is empty), ``post`` is ``RPUSH``,
``trywait`` is ``LPOP`` and ``getvalue`` is ``LLEN``; clients use redis-py over TCP on
127.0.0.1. The benchmark starts its own ``redis-server`` on a free loopback port in a
temporary directory, with persistence off (``--save ''``, no AOF), and stops it after.
It offers neither authentication of the server nor per-semaphore access control: it is
here for its speed, to show what esem's guarantees cost against a service people trust.

The same code drives all three backends: latency of post, wait (uncontended) and the
hand-off between two processes (half a ping-pong), then throughput: several processes
each looping {wait; post} on one semaphore, uncontended (value = processes) and
contended (value = 1). CPU rows are given for the clients and for the service process
(esem's daemon, redis-server).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from esem.api import O_CREAT, USE_ESEM, sem_open, sem_unlink
from esem.bench.common import (
    NO_MODE,
    BenchError,
    Options,
    Phase,
    Row,
    Sync,
    Table,
    Target,
    Workers,
    check_transport,
    cpu_rows,
    emit,
    esem_target,
    latency_rows,
    lookup,
    make_report,
    num,
    phase,
    process_cpu,
    ratio,
    row,
    self_cpu,
)
from esem.errors import BusyError

BENCH = "peer"
LATENCY_CASES = ("post", "wait", "handoff")
THROUGHPUT_CASES = ("throughput-uncontended", "throughput-contended")
DEFAULT_ITERATIONS, SMOKE_ITERATIONS = 2000, 30
DEFAULT_SECONDS, SMOKE_SECONDS = 3.0, 0.3
REDIS_START_TIMEOUT = 10.0


class Sem(Protocol):
    def wait(self) -> None: ...
    def trywait(self) -> None: ...
    def post(self) -> None: ...
    def getvalue(self) -> int: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------ redis


class RedisSemaphore:
    """A counting semaphore as tokens in a Redis list (one connection per handle)."""

    backend = "redis"

    def __init__(self, port: int, key: str) -> None:
        import redis

        self._r = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=5)
        self.key = key

    def __repr__(self) -> str:
        return f"<RedisSemaphore {self.key}>"

    def wait(self) -> None:
        self._r.blpop([self.key], timeout=0)

    def trywait(self) -> None:
        if self._r.lpop(self.key) is None:
            raise BusyError(f"redis semaphore {self.key} is zero")

    def post(self) -> None:
        self._r.rpush(self.key, b"u")

    def getvalue(self) -> int:
        return int(self._r.llen(self.key))

    def close(self) -> None:
        self._r.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    pid: int


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1, persistence off, in a temporary directory."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="esem-redis-") as tmp:
        for _ in range(3):  # the free port may be taken between the probe and the bind
            port = _free_port()
            log = os.path.join(tmp, "redis.log")
            proc = subprocess.Popen(
                [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                 "--appendonly", "no", "--dir", tmp, "--logfile", log,
                 "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + REDIS_START_TIMEOUT
            up = False
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with contextlib.closing(redis.Redis(host="127.0.0.1", port=port)) as r:
                        up = bool(r.ping())
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            if up:
                break
            proc.kill()
            proc.wait()
        else:
            text = Path(log).read_text()[-1000:] if os.path.exists(log) else ""
            raise BenchError(f"redis-server did not start: {text}")
        try:
            yield RedisServer(port, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------- backends


@dataclass
class Backend:
    """Creates, opens (also in forked children) and removes one backend's semaphores."""

    name: str
    mode: str
    create: Callable[[str, int], Sem]
    open: Callable[[str], Sem]
    unlink: Callable[[str], None]
    service_cpu: Callable[[], float | None]


def posix_backend(target: Target | None) -> Backend:
    flags = USE_ESEM if target else 0

    def opened(sem: Sem) -> Sem:
        if target is not None:
            check_transport(target.mode)
        return sem

    return Backend(
        "esem" if target else "legacy", target.mode if target else NO_MODE,
        lambda name, value: opened(sem_open(name, O_CREAT, 0o600, value, flags=flags)),
        lambda name: opened(sem_open(name, 0, flags=flags)),
        lambda name: sem_unlink(name, flags=flags),
        target.service_cpu if target else lambda: None)


def redis_backend(server: RedisServer) -> Backend:
    import redis

    def create(key: str, value: int) -> Sem:
        with contextlib.closing(redis.Redis(host="127.0.0.1", port=server.port)) as r:
            r.delete(key)
            if value:
                r.rpush(key, *([b"u"] * value))
        return RedisSemaphore(server.port, key)

    def unlink(key: str) -> None:
        with contextlib.closing(redis.Redis(host="127.0.0.1", port=server.port)) as r:
            r.delete(key)

    return Backend("redis", NO_MODE, create, lambda key: RedisSemaphore(server.port, key),
                   unlink, lambda: process_cpu(server.pid))


# ---------------------------------------------------------------- measures


def _cpu(b: Backend, fn: Callable[[], None]) -> tuple[float, float | None]:
    c0, s0 = self_cpu(), b.service_cpu()
    fn()
    s1 = b.service_cpu()
    return self_cpu() - c0, None if s0 is None or s1 is None else s1 - s0


def latency(b: Backend, n: int) -> list[Row]:
    rows: list[Row] = []
    tag = uuid.uuid4().hex[:10]
    name = f"/esem-peer-{tag}"
    sem = b.create(name, 0)
    clock = time.perf_counter_ns
    try:
        for case, op in (("post", sem.post), ("wait", sem.wait)):
            samples: list[float] = []

            def loop(op: Callable[[], None] = op, samples: list[float] = samples) -> None:
                for _ in range(n):
                    t0 = clock()
                    op()
                    samples.append((clock() - t0) / 1000.0)

            client, service = _cpu(b, loop)
            rows += latency_rows(BENCH, b.name, b.mode, case, samples)
            rows += cpu_rows(BENCH, b.name, b.mode, case, n, client, service)
    finally:
        sem.close()
        b.unlink(name)
    rows += handoff(b, n)
    return rows


def handoff(b: Backend, rounds: int) -> list[Row]:
    tag = uuid.uuid4().hex[:10]
    names = (f"/esem-peer-{tag}-ping", f"/esem-peer-{tag}-pong")
    ping, pong = (b.create(n, 0) for n in names)

    def other() -> float:
        p_ping, p_pong = b.open(names[0]), b.open(names[1])
        p_ping.wait()  # warm-up round
        p_pong.post()
        c0 = self_cpu()
        for _ in range(rounds):
            p_ping.wait()
            p_pong.post()
        cpu = self_cpu() - c0
        p_ping.close()
        p_pong.close()
        return cpu

    workers = Workers([other]).start()
    samples: list[float] = []
    try:
        ping.post()
        pong.wait()
        clock = time.perf_counter_ns

        def loop() -> None:
            for _ in range(rounds):
                t0 = clock()
                ping.post()
                pong.wait()
                samples.append((clock() - t0) / 2000.0)

        client, service = _cpu(b, loop)
        (child_cpu,) = workers.results(timeout=60 + rounds * 0.05)
    finally:
        workers.stop()
        for s, n in ((ping, names[0]), (pong, names[1])):
            s.close()
            b.unlink(n)
    return (latency_rows(BENCH, b.name, b.mode, "handoff", samples)
            + cpu_rows(BENCH, b.name, b.mode, "handoff", 4 * rounds,
                       client + float(child_cpu), service))


def throughput(b: Backend, case: str, procs: int, seconds: float) -> list[Row]:
    """``procs`` processes each looping {wait; post} for ``seconds`` on one semaphore."""
    value = procs if case == "throughput-uncontended" else 1
    name = f"/esem-peer-{uuid.uuid4().hex[:10]}"
    creator = b.create(name, value)
    sync = Sync(procs, timeout=seconds + 60.0)

    def worker() -> dict[str, Any]:
        sem = b.open(name)
        sem.getvalue()  # connected before the clock starts
        sync.start()
        ops = 0
        t0, c0 = time.monotonic(), self_cpu()
        end = t0 + seconds
        while time.monotonic() < end:
            sem.wait()
            sem.post()
            ops += 2
        elapsed, cpu = time.monotonic() - t0, self_cpu() - c0
        sync.end()
        sem.close()
        return {"ops": ops, "elapsed": elapsed, "cpu": cpu}

    try:
        results, service = sync.run([worker] * procs, b.service_cpu)
    finally:
        creator.close()
        b.unlink(name)
    ops = sum(r["ops"] for r in results)
    wall = max(r["elapsed"] for r in results)
    return [row(BENCH, b.name, b.mode, case, "ops_per_s", ops / wall, "ops/s"),
            *cpu_rows(BENCH, b.name, b.mode, case, ops, sum(r["cpu"] for r in results),
                      service)]


def _measure(b: Backend, n: int, procs: int, seconds: float, ph: Phase) -> list[Row]:
    label = b.name + (f" ({b.mode})" if b.mode != NO_MODE else "")
    ph.step(f"peer: {label} latency of post, wait and hand-off, {n} samples ...")
    rows = latency(b, n)
    for case in THROUGHPUT_CASES:
        ph.step(f"peer: {label} {case}, {procs} processes, {seconds:g}s ...", seconds)
        rows += throughput(b, case, procs, seconds)
    return rows


def collect(opts: Options, iterations: int | None = None, procs: int | None = None,
            seconds: float | None = None) -> list[Row]:
    n = iterations or (SMOKE_ITERATIONS if opts.smoke else DEFAULT_ITERATIONS)
    procs = procs or (2 if opts.smoke else min(2 * (os.cpu_count() or 1), 32))
    seconds = seconds or (SMOKE_SECONDS if opts.smoke else DEFAULT_SECONDS)
    if n < 10:
        raise ValueError("--iterations must be at least 10")
    if not 1 <= procs <= 64:
        raise ValueError(f"--procs must be 1..64, not {procs}")
    if not 0 < seconds <= 3600:
        raise ValueError(f"--seconds must be in (0, 3600], not {seconds}")
    with phase("peer", (2 + len(opts.modes)) * (1 + len(THROUGHPUT_CASES))) as ph:
        with redis_server() as server:
            ph.message(f"peer: redis-server pid {server.pid} on 127.0.0.1:{server.port}")
            rows = _measure(redis_backend(server), n, procs, seconds, ph)
        rows += _measure(posix_backend(None), n, procs, seconds, ph)
        for mode in opts.modes:
            with esem_target(mode, opts.socket) as target:
                rows += _measure(posix_backend(target), n, procs, seconds, ph)
    return rows


def tables(results: list[Row]) -> list[Table]:
    rows = [r for r in results if r["bench"] == BENCH]
    modes = sorted({r["mode"] for r in rows if r["backend"] == "esem"})
    out = []
    for mode in modes:
        def get(backend: str, case: str, metric: str, m: str = mode) -> float | None:
            return lookup(rows, backend=backend, mode=m if backend == "esem" else NO_MODE,
                          case=case, metric=metric)

        body = []
        for case in (*LATENCY_CASES, *THROUGHPUT_CASES):
            metric = "median" if case in LATENCY_CASES else "ops_per_s"
            e, leg, red = (get(k, case, metric) for k in ("esem", "legacy", "redis"))
            body.append([case, "us" if metric == "median" else "ops/s",
                         num(leg, 2), num(red, 2), num(e, 2), ratio(e, leg), ratio(e, red),
                         num(get("esem", f"{case}/client-cpu", "cpu_per_mop")),
                         num(get("esem", f"{case}/service-cpu", "cpu_per_mop")),
                         num(get("redis", f"{case}/service-cpu", "cpu_per_mop"))])
        out.append(Table(
            f"peer: esem ({mode} mode) beside a Redis semaphore and legacy",
            ["case", "unit", "legacy", "redis", "esem", "esem/legacy", "esem/redis",
             "esem client cpu", "esem service cpu", "redis service cpu"], body,
            ["latency: median microseconds; throughput: wait+post operations per second, "
             "all processes together", "cpu: CPU microseconds per call (= seconds per "
             "million)"]))
    return out


def run(opts: Options, json_out: str | None, iterations: int | None, procs: int | None,
        seconds: float | None) -> int:
    report = make_report(opts, collect(opts, iterations, procs, seconds))
    emit(report, tables(report["results"]), json_out)
    return 0
