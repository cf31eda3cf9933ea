"""``esem bench loop``: how long a loop of a million ``post`` calls from Python takes, on
esem (``sem_open(..., flags=USE_ESEM).post``: the Python API, whatever client it rides
on) beside legacy POSIX semaphores (``posix_ipc.Semaphore.release`` called directly, no
layer of esem's between), in the same run, per placement.

The loop is the plainest program there is: open a semaphore, call ``post`` N times, read
the clock before and after (one ``perf_counter`` pair around the whole loop, nothing
inside it). The figure is the wall time of the loop (``elapsed``, seconds), its mean per
call (``mean``, microseconds), and the CPU the client and (esem) the service spent per
call (``cpu_per_mop``). The semaphore's value ends at N: far below ``SEM_VALUE_MAX``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import posix_ipc

from esem.api import O_CREAT, USE_ESEM, sem_open, sem_unlink
from esem.bench import placement
from esem.bench.common import (
    NO_MODE,
    BenchError,
    Options,
    Row,
    Table,
    Target,
    check_transport,
    cpu_rows,
    emit,
    esem_target,
    lookup,
    make_report,
    num,
    per_placement,
    phase,
    ratio,
    row,
    self_cpu,
)

BENCH = "loop"
DEFAULT_CALLS, SMOKE_CALLS = 1_000_000, 2_000


def case_name(calls: int) -> str:
    return f"post-loop,n={calls}"


def measure(backend: str, target: Target | None, calls: int) -> list[Row]:
    """Time ``calls`` posts in one loop on a fresh semaphore."""
    mode = target.mode if target else NO_MODE
    name = f"/esem-loop-{uuid.uuid4().hex[:10]}"
    sem: Any
    if backend == "esem":
        sem = sem_open(name, O_CREAT, 0o600, 0, flags=USE_ESEM)
        post, value = sem.post, sem.getvalue
    else:
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREAT | posix_ipc.O_EXCL, 0o600, 0)
        post, value = sem.release, lambda: sem.value
    try:
        value()  # the session is up before the clock starts
        if target is not None:
            check_transport(target.mode)
        s0 = target.service_cpu() if target else None
        c0 = self_cpu()
        t0 = time.perf_counter()
        for _ in range(calls):
            post()
        elapsed = time.perf_counter() - t0
        client = self_cpu() - c0
        s1 = target.service_cpu() if target else None
        if value() != calls:
            raise BenchError(f"{backend}: {calls} posts left the value at {value()}")
    finally:
        sem.close()
        if backend == "esem":
            sem_unlink(name, flags=USE_ESEM)
        else:
            posix_ipc.unlink_semaphore(name)
    case = case_name(calls)
    service = None if s0 is None or s1 is None else s1 - s0
    return [row(BENCH, backend, mode, case, "elapsed", elapsed, "s"),
            row(BENCH, backend, mode, case, "mean", elapsed * 1e6 / calls, "us"),
            *cpu_rows(BENCH, backend, mode, case, calls, client, service)]


def collect(opts: Options, calls: int | None = None) -> list[Row]:
    n = calls or (SMOKE_CALLS if opts.smoke else DEFAULT_CALLS)
    if n < 1:
        raise ValueError("--calls must be at least 1")
    rows: list[Row] = []
    with phase("loop", (1 + len(opts.modes)) * len(placement.names(opts))) as ph:
        for _ in placement.each(opts, BENCH):
            ph.step(f"loop: legacy, {n:,} posts ...")
            rows += measure("legacy", None, n)
            for mode in opts.modes:
                with esem_target(mode, opts.socket) as target:
                    ph.step(f"loop: esem ({mode}), {n:,} posts ...")
                    rows += measure("esem", target, n)
    return rows


def tables(results: list[Row]) -> list[Table]:
    return per_placement(_tables, [r for r in results if r["bench"] == BENCH])


def _tables(rows: list[Row]) -> list[Table]:
    body = []
    for case in dict.fromkeys(r["case"] for r in rows if r["metric"] == "elapsed"):
        # the ratio of the means per call: a short legacy loop's elapsed rounds to 0 s
        leg = lookup(rows, backend="legacy", case=case, metric="mean")
        for backend, mode in dict.fromkeys((r["backend"], r["mode"]) for r in rows
                                           if r["case"] == case and r["metric"] == "elapsed"):
            def get(c: str, metric: str, backend: str = backend,
                    mode: str = mode) -> float | None:
                return lookup(rows, backend=backend, mode=mode, case=c, metric=metric)

            mean = get(case, "mean")
            elapsed = get(case, "elapsed")
            body.append([case.split("=")[1], backend, mode, num(elapsed, 3), num(mean, 3),
                         ratio(mean, leg), num(get(f"{case}/client-cpu", "cpu_per_mop"), 2),
                         num(get(f"{case}/service-cpu", "cpu_per_mop"), 1)])
    return [Table("loop: N post calls from Python, one loop", ["calls", "backend", "mode",
                  "seconds", "us per call", "x legacy", "client cpu", "service cpu"], body,
                  ["legacy: posix_ipc.Semaphore.release; esem: the Python API's post; cpu: "
                   "CPU microseconds per call (= seconds per million)"])]


def run(opts: Options, json_out: str | None, calls: int | None) -> int:
    report = make_report(opts, collect(opts, calls))
    emit(report, tables(report["results"]), json_out)
    return 0
