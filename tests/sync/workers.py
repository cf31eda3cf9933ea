"""Functions the multiprocessing tests run in child processes (importable by spawn and
forkserver children, which cannot run a test module's local functions)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def bump_counter(lock: Any, path: str, times: int) -> None:
    """Read-modify-write a counter file under ``lock``, with a pause inside the window so
    that without mutual exclusion updates are lost."""
    for _ in range(times):
        with lock:
            value = int(Path(path).read_text())
            time.sleep(0.002)
            Path(path).write_text(str(value + 1))


def square(x: int) -> int:
    return x * x


def produce(queue: Any, start: int, count: int) -> None:
    for i in range(start, start + count):
        queue.put(i)


def wait_event_then_report(event: Any, queue: Any, ident: int) -> None:
    queue.put(("waiting", ident))
    queue.put(("woke", ident, event.wait(60)))


def condition_consumer(cond: Any, sem: Any, queue: Any) -> None:
    """Wait on ``cond`` until ``sem`` (the 'item count') is positive; take one item."""
    with cond:
        got = cond.wait_for(lambda: sem.acquire(False), timeout=60)
    queue.put(bool(got))


def barrier_party(barrier: Any, queue: Any, rounds: int) -> None:
    for r in range(rounds):
        index = barrier.wait(60)
        queue.put((r, index))


def hold_then_release(lock: Any, held: Any, release: Any) -> None:
    with lock:
        held.set()
        release.wait(60)


def bump_value(total: Any, times: int) -> None:
    for _ in range(times):
        with total.get_lock():
            value = total.value
            time.sleep(0.001)
            total.value = value + 1
