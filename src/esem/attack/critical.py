"""A critical section shared by processes: the measuring stick of adversary A1.

Several worker processes increment a shared counter with a deliberate read-modify-write
window, guarded by a named semaphore of initial value 1, under either backend. With
``attack='tamper'`` a process of the same uid rewrites the legacy semaphore's count in
``/dev/shm`` meanwhile (A1). The harm is measured, not inferred: the most processes seen
inside at once, and lost updates. ``esem attack`` (A1) runs it; it was the first
``esem demo`` before the file-vault case study replaced it.

``legacy_sem_path`` and ``tamper_word`` are the A1 primitives, shared with the vault's
attacks (``esem.vault.attacks``).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open, sem_unlink

WORKERS = 2
RMW_WINDOW_S = 0.0002  # time between reading and writing the counter: where races bite
TAMPER_VALUE = 5
SHM_DIR = Path("/dev/shm")


@dataclass
class Row:
    backend: str
    attack: str
    processes: int
    increments: int
    counted: int
    lost_updates: int
    max_inside: int
    seconds: float
    evidence: str


def legacy_sem_path(name: str) -> Path:
    """glibc keeps the named semaphore ``/NAME`` in ``/dev/shm/sem.NAME``."""
    return SHM_DIR / f"sem.{name.lstrip('/')}"


def tamper_word(path: Path, value: int) -> None:
    """Rewrite the count of a glibc ``sem_t`` in place. On 64-bit Linux glibc's
    ``struct new_sem`` starts with ``uint64_t data``: the value in the low 32 bits,
    the number of waiters in the high 32 bits (little-endian), so the value is the
    first 4 bytes of the file."""
    with open(path, "r+b") as f:
        f.write(struct.pack("<I", value))


def _tamperer(name: str, stop: Any, found: Synchronized) -> None:  # type: ignore[type-arg]
    path = legacy_sem_path(name)
    while not stop.is_set():
        if path.exists():
            found.value = 1
            with contextlib.suppress(FileNotFoundError):
                tamper_word(path, TAMPER_VALUE)
        time.sleep(0.0005)
    os._exit(0)


def _worker(sem: Any, iterations: int, counter: Synchronized, inside: Synchronized,  # type: ignore[type-arg]
            max_inside: Synchronized, meter: Any) -> None:  # type: ignore[type-arg]
    code = 0
    try:
        for _ in range(iterations):
            sem.wait()
            with meter:
                inside.value += 1
                max_inside.value = max(max_inside.value, inside.value)
            value = counter.value  # read ...
            time.sleep(RMW_WINDOW_S)
            counter.value = value + 1  # ... modify, write: lost if another got in between
            with meter:
                inside.value -= 1
            sem.post()
    except BaseException as exc:
        print(f"worker {os.getpid()}: {exc!r}", file=sys.stderr)
        code = 1
    os._exit(code)


def _run_workers(ctx: Any, sem: Any, iterations: int, workers: int, *shared: Any) -> None:
    procs = [ctx.Process(target=_worker, args=(sem, iterations, *shared))
             for _ in range(workers)]
    for w in procs:
        w.start()
    for w in procs:
        w.join()
    failed = [w.exitcode for w in procs if w.exitcode]
    if failed:
        raise RuntimeError(f"{sem.backend} workers failed with exit codes {failed}")


def contend(sem: Any, iterations: int, workers: int = WORKERS) -> tuple[int, int]:
    """Run the critical section over an open semaphore ``sem`` (of either backend) in
    ``workers`` forked processes; returns (most inside at once, lost updates)."""
    ctx = mp.get_context("fork")
    counter = ctx.Value(ctypes.c_long, 0, lock=False)
    inside = ctx.Value(ctypes.c_int, 0, lock=False)
    max_inside = ctx.Value(ctypes.c_int, 0, lock=False)
    _run_workers(ctx, sem, iterations, workers, counter, inside, max_inside, ctx.Lock())
    return int(max_inside.value), workers * iterations - int(counter.value)


def run_case(backend: str, attack: str, iterations: int, workers: int = WORKERS) -> Row:
    """Run the critical section in ``workers`` processes under ``backend``; with
    ``attack='tamper'`` an A1 adversary rewrites the legacy count meanwhile."""
    ctx = mp.get_context("fork")
    name = f"/esem-demo-{uuid.uuid4().hex[:12]}"
    flags = USE_ESEM if backend == "esem" else 0
    sem = sem_open(name, O_CREAT | O_EXCL, 0o600, 1, flags=flags)
    counter = ctx.Value(ctypes.c_long, 0, lock=False)
    inside = ctx.Value(ctypes.c_int, 0, lock=False)
    max_inside = ctx.Value(ctypes.c_int, 0, lock=False)
    meter = ctx.Lock()  # guards only the bookkeeping, never the counter
    stop = ctx.Event()
    found = ctx.Value(ctypes.c_int, 0, lock=False)
    adversary = None
    if attack == "tamper":
        adversary = ctx.Process(target=_tamperer, args=(name, stop, found))
        adversary.start()
    start = time.perf_counter()
    try:
        _run_workers(ctx, sem, iterations, workers, counter, inside, max_inside, meter)
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        if adversary is not None:
            adversary.join()
        sem.close()
        sem_unlink(name, flags=flags)
    expected = workers * iterations
    if attack == "none":
        evidence = "no adversary"
    elif found.value:
        evidence = f"adversary rewrote {legacy_sem_path(name)} to {TAMPER_VALUE} repeatedly"
    else:
        evidence = f"adversary found no {legacy_sem_path(name)}: the count is in the service"
    counted, most_inside = int(counter.value), int(max_inside.value)
    return Row(backend, attack, workers, expected, counted, expected - counted,
               most_inside, round(seconds, 3), evidence)
