"""A3, local processes of the owner's uid: mint units out of a robust semaphore's releases.

A robust semaphore gives back the units a dead session held. Released naively, "what
the session took" is not "what is still out": a unit taken by one process and posted
back by another (a hand-off) or taken from a work queue that a producer filled was
already returned, and releasing it again creates a unit. No rogue post is needed; each
process posts at most what was handed to it:

* hand-off: a process takes a robust mutex (value 1), its forked worker posts it back,
  and the process exits. Repeated, each round would mint one more unit; then four
  processes contend for the "mutex" and the most seen inside at once is measured.
* work queue: a producer posts 100 jobs into a robust value-0 semaphore; a consumer
  takes all 100 and exits normally. Released naively, the 100 done jobs come back.

esem restores units only up to the capacity (the initial value) and charges a post by a
non-holder to the holder it returns a unit for; the row is ``defended`` when the counts
after the rounds are exactly the capacity (1) and the empty queue (0), and the mutex
admits one process at a time. Legacy POSIX semaphores have no robust mode (``n/a``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from esem.api import O_CREAT, O_EXCL, USE_ESEM, EsemSemaphore, sem_open, sem_unlink
from esem.attack.a3_rogue import run_as, unique_name
from esem.attack.base import Outcome, Target
from esem.attack.critical import contend
from esem.client.admin import stat_semaphore
from esem.client.blocking import get_client
from esem.errors import BusyError, EsemError

CONTENDERS = 4
JOBS = 100
SETTLE_TIMEOUT_S = 10.0


def _settled(name: str) -> dict[str, object]:
    """The service's view once every session but this process's has ended (its end is
    what releases units: reading earlier would miss a release that is still on its way)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        info = stat_semaphore(get_client(), name)
        if info["handles"] == 1 or time.monotonic() > deadline:
            return info
        time.sleep(0.01)


def _as_me(target: Target, body: Callable[[], object]) -> Any:
    """``body()`` in a forked child of this process's own uid (its own session)."""
    return run_as(os.getuid(), os.getgid(), body, target)


def _hand_off_row(target: Target) -> Outcome:
    rounds = 3 if target.quick else 10
    iterations = 15 if target.quick else 40
    name = unique_name("a3robust")
    mutex = sem_open(name, O_CREAT | O_EXCL, 0o600, 1, flags=USE_ESEM, robust=True)
    assert isinstance(mutex, EsemSemaphore)
    try:
        def parent() -> int:
            mutex.wait()  # takes the mutex ...
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the worker
                code = 1
                with contextlib.suppress(BaseException):
                    mutex.post()  # ... its worker hands it back ...
                    code = 0
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)  # ... and it exits without a post

        for _ in range(rounds):
            code = _as_me(target, parent)
            if code != 0:
                raise RuntimeError(f"hand-off worker failed with exit code {code}")
        info = _settled(name)
        value = mutex.getvalue()
        most, lost = contend(mutex, iterations, CONTENDERS)
    finally:
        with contextlib.suppress(EsemError):
            mutex.close()
        with contextlib.suppress(EsemError):
            sem_unlink(name, flags=USE_ESEM)
    defended = value == 1 and most == 1 and lost == 0
    return Outcome(
        "A3 robust hand-off", "esem", "defended" if defended else "broken",
        f"after {rounds} hand-off rounds the mutex has value {value} (a naive release adds "
        f"one per round); {CONTENDERS} processes x {iterations} entries: up to {most} "
        f"inside at once, {lost} updates lost. A round: a process takes the robust mutex "
        f"(value 1), its forked worker posts it back, the process exits; robust releases "
        f"{info['robust_releases']}, forgiven {info['robust_forgiven']}",
    )


def _work_queue_row(target: Target) -> Outcome:
    name = unique_name("a3robust")
    queue = sem_open(name, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM, robust=True)
    try:
        def producer() -> int:
            for _ in range(JOBS):
                queue.post()
            return JOBS

        def consumer() -> int:
            for _ in range(JOBS):
                queue.wait()
            return JOBS  # and exits normally, every job done

        _as_me(target, producer)
        _as_me(target, consumer)
        info = _settled(name)
        value = queue.getvalue()
        try:
            queue.trywait()
            extra = "a further take got a job nobody produced"
        except BusyError:
            extra = "a further take finds the queue empty (BusyError)"
    finally:
        with contextlib.suppress(EsemError):
            queue.close()
        with contextlib.suppress(EsemError):
            sem_unlink(name, flags=USE_ESEM)
    defended = value == 0 and "empty" in extra
    return Outcome(
        "A3 robust work-queue", "esem", "defended" if defended else "broken",
        f"value {value} after a consumer took all {JOBS} jobs a producer posted into a "
        f"robust value-0 semaphore and exited (a naive release gives back {JOBS}); {extra}; "
        f"robust releases {info['robust_releases']}, forgiven {info['robust_forgiven']}",
    )


_NO_ROBUST = ("legacy POSIX semaphores have no robust mode: nothing is released when a "
              "process dies (its units are lost with it), so no release can create one")


def run(target: Target) -> list[Outcome]:
    return [
        Outcome("A3 robust hand-off", "legacy", "n/a", _NO_ROBUST),
        _hand_off_row(target),
        Outcome("A3 robust work-queue", "legacy", "n/a", _NO_ROBUST),
        _work_queue_row(target),
    ]
