"""``esem bench latsem``: LMBench-style semaphore ping-pong between pairs of processes.

Each pair is two processes and two semaphores: the initiator posts ``ping`` and waits on
``pong``, the responder waits on ``ping`` and posts ``pong``. All pairs run at once, so
more pairs means more processes competing for the CPUs (and, for esem, for the service).
One-way latency is half a round trip; a repetition times ``rounds`` round trips and
takes their mean (as LMBench's lat_sem does), and the figure is the median over all
repetitions of all pairs.

The restart ratio follows the published evaluation: before each semaphore operation,
with that probability, the process closes the semaphore and opens it again by name, so
the figure includes what reconnecting to a semaphore costs. Both sides draw from seeded
generators, so a run is repeatable. esem (per mode) runs beside legacy POSIX semaphores,
once per placement (``esem.bench.placement``): same puts the service and every process on
one vCPU; split puts the service on one and esem's processes on the other, and legacy's
initiators on one and responders on the other (where esem's service would be).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from esem.api import O_CREAT, USE_ESEM, sem_open, sem_unlink
from esem.bench import placement
from esem.bench.common import (
    NO_MODE,
    Options,
    Phase,
    Row,
    Sync,
    Table,
    Target,
    barrier,
    check_transport,
    cpu_rows,
    emit,
    esem_target,
    latency_rows,
    lookup,
    make_report,
    num,
    per_placement,
    phase,
    ratio,
    self_cpu,
)
from esem.errors import EsemError

BENCH = "latsem"
DEFAULT_PAIRS = (1, 2, 4, 8)
DEFAULT_RESTART = (0.0, 0.1, 0.3)
DEFAULT_REPS, DEFAULT_ROUNDS = 5, 200
SMOKE_PAIRS, SMOKE_RESTART, SMOKE_REPS, SMOKE_ROUNDS = (1, 2), (0.0, 0.3), 2, 20
MAX_PAIRS = 32  # 2 sessions per pair: far inside the per-uid session quota (128)


def case_name(pairs: int, restart: float) -> str:
    return f"pairs={pairs},restart={restart:g}"


class _Side:
    """One process of a pair: its two handles and the restart coin."""

    def __init__(self, flags: int, mode: str, names: tuple[str, str], restart: float,
                 seed: int) -> None:
        self.flags = flags
        self.names = names
        self.restart = restart
        self.rng = random.Random(seed)
        self.handles = [sem_open(n, 0, flags=flags) for n in names]
        if mode != NO_MODE:
            check_transport(mode)
        self.calls = 0

    def sem(self, i: int) -> Any:
        """Handle ``i`` (0 ping, 1 pong), first closed and reopened with the restart
        probability."""
        if self.restart and self.rng.random() < self.restart:
            self.handles[i].close()
            self.handles[i] = sem_open(self.names[i], 0, flags=self.flags)
            self.calls += 2
        self.calls += 1
        return self.handles[i]

    def close(self) -> None:
        for h in self.handles:
            h.close()


def measure(backend: str, target: Target | None, pairs: int, restart: float, reps: int,
            rounds: int) -> list[Row]:
    flags = USE_ESEM if backend == "esem" else 0
    mode = target.mode if target else NO_MODE
    tag = uuid.uuid4().hex[:10]
    names = [(f"/esem-lat-{tag}-{p}-ping", f"/esem-lat-{tag}-{p}-pong") for p in range(pairs)]
    created = [sem_open(n, O_CREAT, 0o600, 0, flags=flags) for pair in names for n in pair]
    timeout = 60.0 + reps * rounds * pairs * 0.02
    sync = Sync(2 * pairs, timeout)
    reps_barrier = barrier(pairs)  # the initiators start each repetition together

    def initiator(p: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            try:
                return timed(p)
            except BaseException:
                reps_barrier.abort()
                raise
        return run

    def timed(p: int) -> dict[str, Any]:
        side = _Side(flags, mode, names[p], restart, seed=2 * p)
        side.handles[0].post()  # warm-up round: every session is up before timing
        side.handles[1].wait()
        sync.start()
        c0, side.calls = self_cpu(), 0
        lat = []
        clock = time.perf_counter_ns
        for _ in range(reps):
            if pairs > 1:
                reps_barrier.wait(timeout)
            t0 = clock()
            for _ in range(rounds):
                side.sem(0).post()
                side.sem(1).wait()
            lat.append((clock() - t0) / rounds / 2000.0)
        cpu = self_cpu() - c0
        sync.end()
        side.close()
        return {"lat": lat, "cpu": cpu, "calls": side.calls}

    def responder(p: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            placement.pin_partner(backend)
            side = _Side(flags, mode, names[p], restart, seed=2 * p + 1)
            side.handles[0].wait()
            side.handles[1].post()
            sync.start()
            c0, side.calls = self_cpu(), 0
            for _ in range(reps * rounds):
                side.sem(0).wait()
                side.sem(1).post()
            cpu = self_cpu() - c0
            sync.end()
            side.close()
            return {"lat": [], "cpu": cpu, "calls": side.calls}
        return run

    fns = [f(p) for p in range(pairs) for f in (initiator, responder)]
    try:
        results, service_cpu = sync.run(fns, target.service_cpu if target else lambda: None)
    finally:
        for h in created:
            h.close()
        for pair in names:
            for n in pair:
                with suppress(EsemError):
                    sem_unlink(n, flags=flags)
    latencies = [x for r in results for x in r["lat"]]
    case = case_name(pairs, restart)
    # median and p99 over every repetition of every pair (each one a mean of its rounds)
    rows = latency_rows(BENCH, backend, mode, case, latencies)
    rows += cpu_rows(BENCH, backend, mode, case, sum(r["calls"] for r in results),
                     sum(r["cpu"] for r in results), service_cpu)
    return rows


def collect(opts: Options, pairs: Sequence[int] | None = None,
            restart: Sequence[float] | None = None, reps: int | None = None,
            rounds: int | None = None) -> list[Row]:
    pairs = pairs or (SMOKE_PAIRS if opts.smoke else DEFAULT_PAIRS)
    restart = restart if restart is not None else (
        SMOKE_RESTART if opts.smoke else DEFAULT_RESTART)
    reps = reps or (SMOKE_REPS if opts.smoke else DEFAULT_REPS)
    rounds = rounds or (SMOKE_ROUNDS if opts.smoke else DEFAULT_ROUNDS)
    for p in pairs:
        if not 1 <= p <= MAX_PAIRS:
            raise ValueError(f"pairs must be 1..{MAX_PAIRS}, not {p}")
    for r in restart:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"a restart ratio is a probability in 0..1, not {r}")
    rows: list[Row] = []

    def sweep(backend: str, target: Target | None, ph: Phase) -> None:
        for p in pairs:
            for r in restart:
                label = backend + (f" ({target.mode})" if target else "")
                ph.step(f"latsem: {label} {case_name(p, r)}, {reps} x {rounds} rounds ...")
                rows.extend(measure(backend, target, p, r, reps, rounds))

    steps = (1 + len(opts.modes)) * len(pairs) * len(restart) * len(placement.names(opts))
    with phase("latsem", steps) as ph:
        for _ in placement.each(opts, BENCH):
            sweep("legacy", None, ph)
            for mode in opts.modes:
                with esem_target(mode, opts.socket) as target:
                    sweep("esem", target, ph)
    return rows


def tables(results: list[Row]) -> list[Table]:
    """One table per placement (a ratio never mixes two placements' figures)."""
    return per_placement(_tables, [r for r in results if r["bench"] == BENCH])


def _tables(rows: list[Row]) -> list[Table]:
    modes = sorted({r["mode"] for r in rows if r["backend"] == "esem"})
    cases = list(dict.fromkeys(r["case"] for r in rows if r["metric"] == "median"))
    header = ["pairs", "restart", "legacy", "legacy cpu"]
    for m in modes:
        header += [f"esem {m}", "esem/legacy", "client cpu", "service cpu"]
    body = []
    for case in cases:
        p, r = (kv.split("=")[1] for kv in case.split(","))
        leg = lookup(rows, backend="legacy", case=case, metric="median")
        line = [p, r, num(leg, 2),
                num(lookup(rows, backend="legacy", case=f"{case}/client-cpu"))]
        for m in modes:
            e = lookup(rows, backend="esem", mode=m, case=case, metric="median")
            line += [num(e, 2), ratio(e, leg),
                     num(lookup(rows, backend="esem", mode=m, case=f"{case}/client-cpu")),
                     num(lookup(rows, backend="esem", mode=m, case=f"{case}/service-cpu"))]
        body.append(line)
    return [Table("latsem: one-way hand-off latency, microseconds (median over repetitions)",
                  header, body,
                  ["cpu: CPU microseconds per semaphore call (= seconds per million), all "
                   "client processes (legacy: both processes of every pair) / the service"])]


def run(opts: Options, json_out: str | None, pairs: Sequence[int] | None,
        restart: Sequence[float] | None, reps: int | None, rounds: int | None) -> int:
    report = make_report(opts, collect(opts, pairs, restart, reps, rounds))
    emit(report, tables(report["results"]), json_out)
    return 0
