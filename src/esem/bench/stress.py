"""``esem bench stress``: a port of stress-ng's POSIX semaphore stressor (``--sem``), the
one the Phoronix suite runs, for esem and legacy; and stress-ng itself when installed.

The stressor, as stress-ng 0.15 (the Debian 12 package) runs it: one worker process per
CPU, each with its own semaphore of initial value 1 shared by 2 threads (``--sem-procs``),
each thread looping {getvalue; on odd turns a trywait, on even turns a timed wait whose
deadline has already passed; when the unit was taken, count one bogo op and post it
back; yield the CPU}. A failed attempt skips the count, the post and the yield, as there.
Throughput is bogo ops per second of wall time, summed over the workers.

Differences that are not ours to remove: stress-ng's semaphore is an unnamed ``sem_init``
one; ours are named (legacy: ``/dev/shm/sem.*`` through posix_ipc; esem: in the service),
since named semaphores are what esem replaces. And a passed deadline is ``timedwait(0)``
through the common interface: esem's service computes deadline = now and fails at once
unless a unit is free, exactly like glibc's ``sem_timedwait`` with a past ``abstime``;
posix_ipc turns a zero timeout into ``sem_trywait``, which takes the same atomic fast
path and differs only by the futex syscall glibc makes before reporting ETIMEDOUT. (A
tiny positive timeout would not be a passed deadline: posix_ipc then sleeps for the
kernel's timer slack, about 50 us.) Python threads share the GIL where C threads run in
parallel; the C figure from stress-ng is printed beside ours for that reason.

Every backend runs once per placement (``esem.bench.placement``): same puts the service
and every worker on one vCPU; split puts the service on one and esem's workers on the
other, while legacy's workers (which need no service) alternate between the two, so each
backend has the whole machine. stress-ng itself runs on the placement's vCPUs (one under
same, both under split).

Each esem row names the client its workers used (``client``: ``native`` or ``python``
for the Python API, as ``ESEM_CLIENT`` chose, ``preload`` for stress-ng under the
preload library): with the native client built, the switchless rows run on its rings.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open, sem_unlink
from esem.bench import native_micro, placement
from esem.bench.common import (
    NO_MODE,
    BenchError,
    Options,
    Phase,
    Row,
    Sync,
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
    progress,
    ratio,
    row,
    self_cpu,
)
from esem.errors import BusyError, EsemError
from esem.native import NativeError, preload_environment

BENCH = "stress"
DEFAULT_SECONDS, SMOKE_SECONDS = 5.0, 0.5
DEFAULT_THREADS = 2  # stress-ng's default --sem-procs
MAX_WORKERS, MAX_THREADS = 64, 64  # stress-ng's own bound on --sem-procs is 64
PASSED_DEADLINE = 0.0  # the relative form of an absolute deadline already in the past


def case_name(workers: int, threads: int) -> str:
    return f"workers={workers},threads={threads}"


def _thrash(sem: Any, stop_at: list[float], go: threading.Event,
            out: list[Any], k: int) -> None:
    """One stressor thread (stress-ng's semaphore thrash loop)."""
    ops = calls = 0
    i = 0
    try:
        go.wait()
        end = stop_at[0]
        clock = time.monotonic
        while clock() < end:
            sem.getvalue()
            try:
                if i & 1:
                    sem.trywait()
                else:
                    sem.timedwait(PASSED_DEADLINE)
            except BusyError:
                calls += 2
                i += 1
                continue
            ops += 1  # the unit is ours here: one bogo op
            sem.post()
            calls += 3
            os.sched_yield()
            i += 1
        out[k] = (ops, calls)
    except BaseException as exc:
        out[k] = exc


def _worker(flags: int, mode: str, name: str, threads: int, seconds: float,
            sync: Sync, index: int) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        placement.pin_worker("esem" if flags else "legacy", index)
        sem = sem_open(name, O_CREAT | O_EXCL, 0o600, 1, flags=flags)
        sem.getvalue()  # the session is up before the clock starts
        client = NO_MODE
        if mode != NO_MODE:
            check_transport(mode)
            from esem.client.blocking import get_client

            client = get_client().transport  # "native" or "python"
        go = threading.Event()
        stop_at = [0.0]
        out: list[Any] = [None] * threads
        pool = [threading.Thread(target=_thrash, args=(sem, stop_at, go, out, k))
                for k in range(threads)]
        for t in pool:
            t.start()
        try:
            sync.start()
        except BaseException:
            go.set()  # with stop_at 0: the threads end at once
            for t in pool:
                t.join()
            raise
        t0, c0 = time.monotonic(), self_cpu()
        stop_at[0] = t0 + seconds
        go.set()
        for t in pool:
            t.join()
        elapsed, cpu = time.monotonic() - t0, self_cpu() - c0
        sync.end()
        sem.close()
        sem_unlink(name, flags=flags)
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return {"ops": sum(r[0] for r in out), "calls": sum(r[1] for r in out),
                "elapsed": elapsed, "cpu": cpu, "client": client}
    return run


def measure(backend: str, target: Target | None, workers: int, threads: int,
            seconds: float) -> list[Row]:
    flags = USE_ESEM if backend == "esem" else 0
    mode = target.mode if target else NO_MODE
    tag = uuid.uuid4().hex[:10]
    names = [f"/esem-stress-{tag}-{w}" for w in range(workers)]
    sync = Sync(workers, timeout=seconds + 60.0)
    try:
        results, service_cpu = sync.run(
            [_worker(flags, mode, n, threads, seconds, sync, i)
             for i, n in enumerate(names)],
            target.service_cpu if target else lambda: None)
    finally:
        for n in names:  # normally unlinked by their workers
            with suppress(EsemError):
                sem_unlink(n, flags=flags)
    ops = sum(r["ops"] for r in results)
    calls = sum(r["calls"] for r in results)
    wall = max(r["elapsed"] for r in results)
    case = case_name(workers, threads)
    # Which client the esem workers ran on (ESEM_CLIENT, and whether the native one is
    # built): a figure without it is ambiguous. Every worker must have had the same.
    used = {r["client"] for r in results}
    if len(used) != 1:
        raise BenchError(f"stress: the workers ran on different clients: {sorted(used)}")
    client = None if backend != "esem" else str(used.pop())
    rows = [row(BENCH, backend, mode, case, "ops_per_s", ops / wall, "ops/s", client),
            row(BENCH, backend, mode, case, "calls_per_s", calls / wall, "calls/s", client)]
    rows += cpu_rows(BENCH, backend, mode, case, calls, sum(r["cpu"] for r in results),
                     service_cpu, client)
    return rows


_METRIC_LINE = re.compile(r"\bsem\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")


def stress_ng(workers: int, threads: int, seconds: float,
              ph: Phase | None = None) -> list[Row]:
    """``stress-ng --sem`` with the same workers, threads and duration; its bogo ops/s
    (real time). No rows when the binary is not installed."""
    exe = shutil.which("stress-ng")
    if exe is None:
        progress("stress: stress-ng is not installed (apt-get install stress-ng): "
                 "no C reference row")
        return []
    whole = max(1, round(seconds))  # stress-ng times whole seconds
    if ph is not None:
        ph.step(f"stress: stress-ng --sem {workers} --sem-procs {threads} for {whole}s ...",
                whole)
    else:
        progress(f"stress: stress-ng --sem {workers} --sem-procs {threads} for {whole}s ...")
    cmd = [exe, "--sem", str(workers), "--sem-procs", str(threads), "--timeout",
           f"{whole}s", "--metrics-brief"]
    try:
        with placement.starting_on(placement.current().whole()):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=whole + 60)
    except subprocess.TimeoutExpired:
        progress("stress: stress-ng did not finish in time: no C reference row")
        return []
    match = _METRIC_LINE.search(done.stdout + done.stderr)
    if done.returncode != 0 or match is None:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        progress(f"stress: stress-ng exited {done.returncode} without a sem metric line: "
                 + " | ".join(tail))
        return []
    return [row(BENCH, "stress-ng", NO_MODE, case_name(workers, threads), "ops_per_s",
                float(match.group(5)), "ops/s")]


def collect(opts: Options, seconds: float | None = None, workers: int | None = None,
            threads: int | None = None) -> list[Row]:
    seconds = seconds or (SMOKE_SECONDS if opts.smoke else DEFAULT_SECONDS)
    workers = workers or min(os.cpu_count() or 1, MAX_WORKERS)
    threads = threads or DEFAULT_THREADS
    if not 0 < seconds <= 3600:
        raise ValueError(f"--seconds must be in (0, 3600], not {seconds}")
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers must be 1..{MAX_WORKERS}, not {workers}")
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"--threads must be 1..{MAX_THREADS}, not {threads}")
    label = f"{workers} workers x {threads} threads, {seconds:g}s"
    # legacy, esem per mode, capacity, stress-ng, and stress-ng on esem per mode
    steps = 1 + 2 * len(opts.modes) + ("socket" in opts.modes) + 1
    rows: list[Row] = []
    with phase("stress", steps * len(placement.names(opts))) as ph:
        for _ in placement.each(opts, BENCH):
            ph.step(f"stress: legacy, {label} ...", seconds)
            rows += measure("legacy", None, workers, threads, seconds)
            for mode in opts.modes:
                with esem_target(mode, opts.socket) as target:
                    ph.step(f"stress: esem ({mode}), {label} ...", seconds)
                    rows += measure("esem", target, workers, threads, seconds)
                    if mode == "socket" and target.service_pid is not None:
                        rows += capacity(target, opts.smoke, ph)
                    rows += stress_ng_native(target, workers, threads, seconds, ph)
            rows += stress_ng(workers, threads, seconds, ph)
    return rows


CAPACITY_CASE = "capacity"
CAPACITY_OPS = 100_000  # per load generator; smoke: 2,000


def capacity(target: Target, smoke: bool, ph: Phase | None = None) -> list[Row]:
    """The service's own limit (esem.bench.capacity): pipelined pre-encrypted requests
    from two load generators, so the service, not Python clients, is the bottleneck."""
    from esem.bench.capacity import measure_capacity

    assert target.service_pid is not None
    ops = 2_000 if smoke else CAPACITY_OPS
    (ph.step if ph else progress)(
        f"stress: esem service capacity, 2 pipelined generators x {ops} ops ...")
    c = measure_capacity(target.socket_path, target.service_pid, clients=2,
                         ops_per_client=ops)
    return [row(BENCH, "esem", target.mode, CAPACITY_CASE, "ops_per_s", c.ops_per_s, "ops/s"),
            row(BENCH, "esem", target.mode, CAPACITY_CASE, "ops_per_cpu_s", c.ops_per_cpu_s,
                "ops/s")]


def tables(results: list[Row]) -> list[Table]:
    """The tables of each placement (a ratio never mixes two placements' figures)."""
    return per_placement(_tables, [r for r in results if r["bench"] == BENCH])


def _tables(results: list[Row]) -> list[Table]:
    rows = [r for r in results if r["case"] != CAPACITY_CASE]
    cap = [r for r in results if r["case"] == CAPACITY_CASE]
    out = _stress_tables(rows)
    if cap:
        out.append(Table(
            "stress: esem service capacity (authenticated operations, pipelined load)",
            ["mode", "ops/s achieved", "ops per service CPU-second"],
            [[r["mode"], num(r["value"], 0),
              num(lookup(cap, mode=r["mode"], metric="ops_per_cpu_s"), 0)]
             for r in cap if r["metric"] == "ops_per_s"],
            ["two generators send pre-encrypted POST/TRYWAIT in batches of 64; every reply "
             "is decrypted and checked after the clock stops"]))
    return out


def _stress_tables(rows: list[Row]) -> list[Table]:
    body = []
    for case in dict.fromkeys(r["case"] for r in rows if r["metric"] == "ops_per_s"
                              and not r["case"].startswith(NATIVE)):
        leg = lookup(rows, backend="legacy", case=case, metric="ops_per_s")
        keys = sorted({(r["backend"], r["mode"]) for r in rows
                       if r["case"] == case and r["metric"] == "ops_per_s"},
                      key=lambda k: ("legacy", "esem", "stress-ng").index(k[0]))
        for backend, mode in keys:
            ops = lookup(rows, backend=backend, mode=mode, case=case, metric="ops_per_s")
            client = next((str(r["client"]) for r in rows if r["case"] == case
                           and r["backend"] == backend and r["mode"] == mode
                           and "client" in r), "-")
            body.append([case, backend, mode, client, num(ops, 0),
                         num(lookup(rows, backend=backend, mode=mode, case=case,
                                    metric="calls_per_s"), 0),
                         ratio(ops, leg),
                         num(lookup(rows, backend=backend, mode=mode,
                                    case=f"{case}/client-cpu")),
                         num(lookup(rows, backend=backend, mode=mode,
                                    case=f"{case}/service-cpu"))])
    return [Table("stress: stress-ng's semaphore stressor, bogo ops per second",
                  ["case", "backend", "mode", "client", "ops/s", "calls/s", "x legacy",
                   "client cpu", "service cpu"], body,
                  ["calls: every getvalue, trywait/timedwait and post; cpu: CPU "
                   "microseconds per call (= seconds per million)",
                   "client: the esem client of the workers (the Python API on the native "
                   "client or the pure-Python one: ESEM_CLIENT)",
                   "stress-ng: the C stressor itself (bogo ops/s, real time), same workers "
                   "and threads"]),
            *_native_stress_tables(rows)]


NATIVE = "native/"  # case prefix of stress-ng under the preload library (esem backend)


def stress_ng_native(target: Target, workers: int, threads: int, seconds: float,
                     ph: Phase | None = None) -> list[Row]:
    """``stress-ng --sem`` under ``esem run --all`` against ``target``: every semaphore of
    the C stressor in the service, through the native client in ``target.mode``
    (``esem_target`` sets ``ESEM_SWITCHLESS`` for the switchless mode, which the native
    client reads as the Python client does). Bogo ops/s (real time), and CPU per bogo op
    of stress-ng's processes and of the service. No rows without stress-ng or the
    preload library."""
    exe = shutil.which("stress-ng")
    if exe is None:
        return []  # stress_ng() says so once
    try:
        env = preload_environment(True)
        # The same library, environment and service: the transport stress-ng gets.
        native_micro.check_transport(native_micro.probe_transport(env), target.mode,
                                     "stress-ng under esem")
    except NativeError as exc:
        progress(f"stress: no row for stress-ng on esem: {exc}")
        return []
    whole = max(1, round(seconds))
    what = (f"stress: stress-ng --sem {workers} --sem-procs {threads} for {whole}s under "
            f"esem run --all ({target.mode}) ...")
    (ph.step(what, whole) if ph is not None else progress(what))
    cmd = [exe, "--sem", str(workers), "--sem-procs", str(threads), "--timeout",
           f"{whole}s", "--metrics-brief"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    service0 = target.service_cpu()
    try:
        # The clients' vCPUs of the placement: the service keeps its own under split.
        with placement.starting_on(placement.current().client):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=whole + 60,
                                  env=env)
    except subprocess.TimeoutExpired:
        progress(f"stress: stress-ng under esem ({target.mode}) did not finish in time")
        return []
    service1 = target.service_cpu()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = _METRIC_LINE.search(done.stdout + done.stderr)
    if done.returncode != 0 or match is None:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        progress(f"stress: stress-ng under esem ({target.mode}) exited {done.returncode} "
                 "without a sem metric line: " + " | ".join(tail))
        return []
    case = NATIVE + case_name(workers, threads)
    bogo = int(match.group(1))
    client = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    service = None if service0 is None or service1 is None else service1 - service0
    rows = [row(BENCH, "esem", target.mode, case, "ops_per_s", float(match.group(5)),
                "ops/s", "preload")]
    if bogo > 0:
        rows += cpu_rows(BENCH, "esem", target.mode, case, bogo, client, service, "preload")
    return rows


def _native_stress_tables(rows: list[Row]) -> list[Table]:
    """stress-ng on esem, switchless beside socket (issue 12's target: >= 5x)."""
    body = []
    for case in dict.fromkeys(r["case"] for r in rows if r["case"].startswith(NATIVE)
                              and r["metric"] == "ops_per_s"):
        sock = lookup(rows, backend="esem", mode="socket", case=case, metric="ops_per_s")
        fast = lookup(rows, backend="esem", mode="switchless", case=case, metric="ops_per_s")
        if sock is None or fast is None:
            continue
        body.append([case.removeprefix(NATIVE), num(sock, 0), num(fast, 0), ratio(fast, sock),
                     num(lookup(rows, backend="esem", mode="socket",
                                case=f"{case}/service-cpu")),
                     num(lookup(rows, backend="esem", mode="switchless",
                                case=f"{case}/service-cpu"))])
    if not body:
        return []
    return [Table("stress: stress-ng on esem (native client), switchless beside socket",
                  ["case", "socket ops/s", "switchless ops/s", "switchless/socket",
                   "service cpu socket", "service cpu switchless"], body,
                  ["stress-ng --sem under esem run --all (rows native/CASE of the esem "
                   "backend), bogo ops/s (real time); service cpu: the service's CPU "
                   "microseconds per bogo op",
                   "issue 12's target: switchless/socket >= 5"])]


def run(opts: Options, json_out: str | None, seconds: float | None, workers: int | None,
        threads: int | None) -> int:
    report = make_report(opts, collect(opts, seconds, workers, threads))
    emit(report, tables(report["results"]), json_out)
    return 0
