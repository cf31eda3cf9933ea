"""Where a benchmark's processes run: ``--placement same|split|both|unpinned``.

On a small machine a blocking round trip between two processes costs tens of
microseconds more when they sit on different vCPUs than on one, and an unpinned run
flips between the two from run to run; a figure means something only with its
placement, and a ratio only between figures of one placement. So every benchmark that
takes ``--placement`` runs its whole body once per placement, with every process pinned:

* ``same``: the service and every client on one vCPU (the first this process may use);
* ``split``: the service on that vCPU, every client on a second one;
* ``unpinned``: nothing pinned (the only honest label for ``--socket``: a service this
  benchmark did not start is not moved).

Legacy and the floors have no service; their second process stands where the service
would: the two processes of a legacy hand-off (or of a floor round trip) share the vCPU
under ``same`` and sit on the two vCPUs under ``split``, and independent legacy workers
(the stressor's) alternate between them. An esem client's partner in a hand-off is
another client (the service is between them), so it stays with the clients.

Pinning applies to every thread of a process (``sched_setaffinity`` acts on one thread,
so each task in ``/proc/PID/task`` is pinned); processes forked or started afterwards
inherit it. The embedded service is started from a thread pinned to the service's vCPU
and then pinned whole. Every row made while a placement is active carries its name
(``esem.bench.common.row``), and ``common.lookup`` refuses to pick between rows of two
placements, so no ratio can mix them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from esem.bench.common import (
    CURRENT_PLACEMENT,
    PLACEMENTS,
    SAME,
    SPLIT,
    UNPINNED,
    Options,
    UsageError,
)
from esem.bench.progress import progress

CHOICES = (SAME, SPLIT, "both", UNPINNED)
DEFAULT = "both"
HELP = ("where the processes run: same (the service and every client on one vCPU), split "
        "(the service on one vCPU, the clients on another; legacy's two processes of a "
        "hand-off on the two), both (default: each in turn, every figure per placement, "
        "ratios only within one), or unpinned (the scheduler's choice; forced with "
        "--socket, whose service this benchmark does not move)")

Cpus = frozenset[int]


@dataclass(frozen=True)
class Placement:
    """One placement: the vCPUs of the service (and of the partner that plays its part
    for legacy and the floors) and of the clients; None for unpinned."""

    name: str
    service: Cpus | None
    client: Cpus | None

    @property
    def pinned(self) -> bool:
        return self.service is not None

    def describe(self) -> str:
        if self.service is None or self.client is None:
            return f"{self.name}: nothing pinned (every process where the scheduler puts it)"
        if self.service == self.client:
            return f"{self.name}: the service and every client on CPU {_cpus(self.service)}"
        return (f"{self.name}: the service on CPU {_cpus(self.service)}, the clients on CPU "
                f"{_cpus(self.client)} (legacy and the floors: the two processes of a "
                "pair on the two)")

    def partner(self, backend: str) -> Cpus | None:
        """The vCPUs of the second process of a pair: with the clients for esem (the
        service sits between the two), where the service would be otherwise."""
        return self.client if backend == "esem" else self.service

    def whole(self) -> Cpus | None:
        """Every vCPU of the placement (one under same, two under split)."""
        if self.service is None or self.client is None:
            return None
        return self.service | self.client

    def worker(self, backend: str, index: int) -> Cpus | None:
        """The vCPUs of independent worker ``index``: esem's with the clients; legacy's
        alternate between the two vCPUs (the whole machine, as esem's service and
        clients together use it)."""
        if backend == "esem" or self.service is None or self.client is None:
            return self.client
        return (self.client, self.service)[index % 2]


UNPINNED_PLACEMENT = Placement(UNPINNED, None, None)
_current: list[Placement] = [UNPINNED_PLACEMENT]


def _cpus(cpus: Cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def available() -> list[int]:
    """The vCPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def parse(value: str) -> tuple[str, ...]:
    """``--placement`` as the placements to run, checked against this machine."""
    if value not in CHOICES:
        raise UsageError(f"--placement must be one of {', '.join(CHOICES)}, not {value!r}")
    names = (SAME, SPLIT) if value == "both" else (value,)
    if SPLIT in names and len(available()) < 2:
        if value == SPLIT:
            raise UsageError("--placement split needs two vCPUs; this process may use "
                             f"only CPU {_cpus(frozenset(available()))}")
        progress("placement: one vCPU only: running same, not split")
        names = (SAME,)
    return names


def make(name: str) -> Placement:
    if name not in PLACEMENTS:
        raise ValueError(f"unknown placement {name!r}")
    if name == UNPINNED:
        return UNPINNED_PLACEMENT
    cpus = available()
    first = frozenset(cpus[:1])
    if name == SAME:
        return Placement(SAME, first, first)
    if len(cpus) < 2:
        raise UsageError("placement split needs two vCPUs")
    return Placement(SPLIT, first, frozenset(cpus[1:2]))


def current() -> Placement:
    """The placement in effect (unpinned outside ``active``)."""
    return _current[-1]


def tasks(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (0: this one)."""
    base = f"/proc/{pid or os.getpid()}/task"
    try:
        return [int(t) for t in os.listdir(base)]
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None


def pin(cpus: Cpus | None, pid: int = 0) -> None:
    """Pin every thread of process ``pid`` (0: this one) to ``cpus``; None: leave it."""
    if cpus is None:
        return
    for tid in tasks(pid):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(tid, cpus)


def affinity(pid: int = 0) -> dict[int, set[int]]:
    """Each thread's allowed vCPUs, by thread id (what the tests check)."""
    out = {}
    for tid in tasks(pid):
        with contextlib.suppress(ProcessLookupError):
            out[tid] = os.sched_getaffinity(tid)
    return out


@contextlib.contextmanager
def active(p: Placement) -> Iterator[Placement]:
    """Run the body under placement ``p``: this process (every thread) pinned where the
    clients go, the rows made meanwhile labelled ``p.name``; afterwards this process
    may run where it could before."""
    before = frozenset(os.sched_getaffinity(0))
    CURRENT_PLACEMENT.append(p.name)
    _current.append(p)
    try:
        pin(p.client)
        yield p
    finally:
        _current.pop()
        CURRENT_PLACEMENT.pop()
        if p.pinned:
            pin(before)


def names(opts: Options) -> tuple[str, ...]:
    """The placements a run with ``opts`` measures (a ``--socket`` service cannot be
    pinned: then unpinned alone)."""
    return (UNPINNED,) if opts.socket is not None else opts.placements


def each(opts: Options, bench: str) -> Iterator[Placement]:
    """The placements ``opts`` asks for, each active while the caller's loop body runs
    (a ``--socket`` service cannot be pinned: one unpinned pass, and a note)."""
    run: Sequence[str] = names(opts)
    if opts.socket is not None and any(n != UNPINNED for n in opts.placements):
        progress(f"{bench}: placement unpinned: the service at {opts.socket} was not started "
                 "by this benchmark and is not moved; nothing is pinned")
    for name in run:
        p = make(name)
        if len(run) > 1:
            progress(f"{bench}: placement {p.describe()}")
        with active(p):
            yield p


def pin_partner(backend: str) -> None:
    """In the second process of a pair (forked): go where the placement puts it."""
    pin(current().partner(backend))


def pin_worker(backend: str, index: int) -> None:
    """In independent worker ``index`` (forked): go where the placement puts it."""
    pin(current().worker(backend, index))


@contextlib.contextmanager
def starting_on(cpus: Cpus | None) -> Iterator[None]:
    """Around the start of a process: the starting thread sits on ``cpus``, so the
    process (and every thread and process it makes) inherits them from its first
    instruction; the thread goes back where it was after. None: nothing changes."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)  # this thread only: what fork() copies
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def service_start() -> contextlib.AbstractContextManager[None]:
    """Around the start of the service: it starts on the service's vCPU."""
    return starting_on(current().service)


def pin_service(pid: int | None) -> None:
    """Pin every thread of the started service ``pid`` to the service's vCPU (what
    inherited it already is unchanged; this covers a service that moved itself)."""
    if pid is not None:
        pin(current().service, pid)


def machine_note(run: Sequence[str]) -> dict[str, str]:
    """For the report's machine record: what each placement of this run pinned where."""
    return {n: make(n).describe() for n in run}
