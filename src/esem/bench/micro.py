"""``esem bench micro``: the latency of each semaphore operation, esem beside legacy.

Every figure is measured in the same run on the same machine, so the ratios carry over
to other machines even when the absolute numbers do not. Two references bound the
design: ``legacy/handoff`` (half a ping-pong between two processes through two legacy
semaphores: what a cross-process wake-up costs with shared memory and futexes) and
``floor/uds-roundtrip`` (a bare request/reply over a Unix socket between two Python
processes, no protocol and no crypto: the least any socket design can cost). esem's
contended hand-off (``esem/handoff``) is measured the same way as legacy's.

Nothing here passes or fails on a time.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from esem.api import O_CREAT, USE_ESEM, sem_open, sem_unlink

OPS = ("open", "close", "unlink", "post", "wait", "trywait", "getvalue")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "esem_mode": "socket", "service_loop": loop}


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _time_each(n: int, op: Callable[[int], None]) -> list[float]:
    samples = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        op(i)
        samples.append((clock() - t0) / 1000.0)
    return samples


def measure_ops(backend: str, n: int) -> dict[str, list[float]]:
    """Per-operation samples in microseconds. Waits are uncontended (value > 0): for
    legacy that is glibc's user-space fast path, no syscall."""
    flags = USE_ESEM if backend == "esem" else 0
    tag = uuid.uuid4().hex[:10]
    name = f"/esem-bench-{tag}"
    base = sem_open(name, O_CREAT, 0o600, 0, flags=flags)
    out: dict[str, list[float]] = {"open": [], "close": []}
    clock = time.perf_counter_ns
    for _ in range(n):  # in pairs, so no session ever holds more than two handles
        t0 = clock()
        handle = sem_open(name, 0, flags=flags)
        t1 = clock()
        handle.close()
        out["open"].append((t1 - t0) / 1000.0)
        out["close"].append((clock() - t1) / 1000.0)
    out["post"] = _time_each(n, lambda i: base.post())
    out["wait"] = _time_each(n, lambda i: base.wait())
    for _ in range(n):
        base.post()
    out["trywait"] = _time_each(n, lambda i: base.trywait())

    def getvalue(i: int) -> None:
        base.getvalue()

    out["getvalue"] = _time_each(n, getvalue)
    out["unlink"] = []
    for i in range(n):  # one at a time: never near the per-uid semaphore quota
        victim = f"/esem-bench-{tag}-{i}"
        sem_open(victim, O_CREAT, 0o600, 0, flags=flags).close()
        t0 = clock()
        sem_unlink(victim, flags=flags)
        out["unlink"].append((clock() - t0) / 1000.0)
    base.close()
    sem_unlink(name, flags=flags)
    return out


def _pong(ping_name: str, pong_name: str, flags: int, rounds: int) -> None:
    code = 0
    try:
        ping = sem_open(ping_name, 0, flags=flags)
        pong = sem_open(pong_name, 0, flags=flags)
        for _ in range(rounds):
            ping.wait()
            pong.post()
    except BaseException as exc:
        print(f"bench pong: {exc!r}", file=sys.stderr)
        code = 1
    os._exit(code)


def measure_handoff(backend: str, rounds: int) -> list[float]:
    """One-way hand-off latency between two processes: half of each ping-pong, in us."""
    flags = USE_ESEM if backend == "esem" else 0
    tag = uuid.uuid4().hex[:10]
    ping_name, pong_name = f"/esem-ping-{tag}", f"/esem-pong-{tag}"
    ping = sem_open(ping_name, O_CREAT, 0o600, 0, flags=flags)
    pong = sem_open(pong_name, O_CREAT, 0o600, 0, flags=flags)
    child = mp.get_context("fork").Process(target=_pong,
                                           args=(ping_name, pong_name, flags, rounds))
    child.start()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        ping.post()
        pong.wait()
        samples.append((clock() - t0) / 2000.0)
    child.join()
    for sem, nm in ((ping, ping_name), (pong, pong_name)):
        sem.close()
        sem_unlink(nm, flags=flags)
    return samples


def _echo(sock: socket.socket, rounds: int) -> None:
    for _ in range(rounds):
        sock.sendall(sock.recv(64))
    os._exit(0)


def measure_uds_roundtrip(rounds: int) -> list[float]:
    """A bare request/reply (32 bytes each way) between two Python processes, in us."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = mp.get_context("fork").Process(target=_echo, args=(b, rounds))
    child.start()
    msg = b"x" * 32
    samples = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        a.sendall(msg)
        a.recv(64)
        samples.append((clock() - t0) / 1000.0)
    child.join()
    a.close()
    b.close()
    return samples


def _row(backend: str, case: str, samples: list[float]) -> list[dict[str, Any]]:
    return [
        {"bench": "micro", "backend": backend, "mode": "socket" if backend == "esem" else "-",
         "case": case, "metric": metric, "value": round(value, 3), "unit": "us"}
        for metric, value in (("median", statistics.median(samples)),
                              ("p99", _percentile(samples, 0.99)))
    ]


def run_micro(iterations: int = 2000, sock: str | None = None,
              json_out: str | None = None) -> int:
    from esem.client import blocking
    from esem.server.embedded import EmbeddedService

    if iterations < 10:
        raise ValueError("--iterations must be at least 10")
    service = None
    if sock is None:
        service = EmbeddedService().start()
        os.environ.update(service.env())
    else:
        os.environ["ESEM_SOCKET"] = sock
    blocking._process_client = None
    results: list[dict[str, Any]] = []
    try:
        for backend in ("legacy", "esem"):
            print(f"measuring {backend} operations ({iterations} samples each) ...",
                  file=sys.stderr, flush=True)
            for op, samples in measure_ops(backend, iterations).items():
                results += _row(backend, op, samples)
            print(f"measuring {backend} hand-off between two processes ...",
                  file=sys.stderr, flush=True)
            results += _row(backend, "handoff", measure_handoff(backend, iterations))
        print("measuring the bare Unix-socket round trip ...", file=sys.stderr, flush=True)
        results += _row("floor", "uds-roundtrip", measure_uds_roundtrip(iterations))
    finally:
        if service is not None:
            service.cleanup()
    report = {"machine": machine(), "results": results}
    if json_out == "-":
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        if json_out:
            with open(json_out, "w") as f:
                json.dump(report, f, indent=2)
    return 0


def print_report(report: dict[str, Any]) -> None:
    med: dict[tuple[str, str], float] = {}
    p99: dict[tuple[str, str], float] = {}
    for r in report["results"]:
        (med if r["metric"] == "median" else p99)[(r["backend"], r["case"])] = r["value"]
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
          f"Python {m['python']}, esem {m['esem_mode']} mode ({m['service_loop']})")
    floor = med.get(("floor", "uds-roundtrip"))
    print(f"{'operation':10} {'legacy med':>10} {'p99':>8} {'esem med':>10} {'p99':>8} "
          f"{'esem/legacy':>11} {'esem/floor':>10}   (microseconds)")
    for case in (*OPS, "handoff"):
        lm, em = med[("legacy", case)], med[("esem", case)]
        print(f"{case:10} {lm:10.2f} {p99[('legacy', case)]:8.2f} {em:10.2f} "
              f"{p99[('esem', case)]:8.2f} {em / lm:10.1f}x "
              f"{(em / floor if floor else float('nan')):9.2f}x")
    if floor is not None:
        print(f"{'floor':10} uds-roundtrip median {floor:.2f} us, "
              f"p99 {p99[('floor', 'uds-roundtrip')]:.2f} us")
