"""A3, rogue local process: squat a name before its owner creates it.

Another uid (``nobody``) creates the owner's name first, mode 0666 and value 1000. The
owner's ten workers then start as written, each with ``sem_open(name, O_CREAT, 0600, 4)``,
and enter a section meant for four. POSIX opens the existing semaphore as if it were
the owner's own (and the owner's handle reports the mode it asked for, not the file's):
all ten get in at once, and the squatter, who owns the name, can unlink it under them.
esem refuses ``O_CREAT`` of a semaphore owned by another non-root uid with a
``PermissionsError`` naming that uid, unless the caller passes ``accept_foreign=True``.

The harm is measured: the most workers seen inside the section at once. The row is
``broken`` when more than four were, ``defended`` when every worker was refused with the
squatter's uid in the error and none got in.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open, sem_unlink
from esem.attack.a3_rogue import ROGUE_USER, check_reachable, rogue_ids, run_as, unique_name
from esem.attack.base import Outcome, Target
from esem.errors import EsemError, PermissionsError
from esem.legacy import unlink as legacy_unlink

WORKERS = 10
SLOTS = 4  # the section admits this many: the owner's initial value
SQUAT_VALUE = 1000
HOLD_S = 0.3  # each worker stays inside this long, so that all who can get in overlap
BARRIER_TIMEOUT_S = 20.0


def _squat(name: str, flags: int) -> dict[str, Any]:
    """In the squatter (already ``nobody``): create ``name`` 0666 with value 1000."""
    old = os.umask(0)
    try:
        sem = sem_open(name, O_CREAT | O_EXCL, 0o666, SQUAT_VALUE, flags=flags)
    finally:
        os.umask(old)
    sem.close()
    return {"uid": os.getuid()}


def _worker(name: str, flags: int, inside: Synchronized, most: Synchronized,  # type: ignore[type-arg]
            refused: Synchronized, meter: Any, barrier: Any) -> None:  # type: ignore[type-arg]
    code = 0
    try:
        sem = None
        try:
            sem = sem_open(name, O_CREAT, 0o600, SLOTS, flags=flags)  # the owner's code
        except PermissionsError:
            with meter:
                refused.value += 1
        barrier.wait(BARRIER_TIMEOUT_S)  # everyone tries to enter at the same moment
        if sem is not None:
            sem.wait()
            with meter:
                inside.value += 1
                most.value = max(most.value, inside.value)
            time.sleep(HOLD_S)
            with meter:
                inside.value -= 1
            sem.post()
            sem.close()
    except BaseException as exc:
        print(f"worker {os.getpid()}: {exc!r}", file=sys.stderr)
        code = 1
    os._exit(code)


def _run_workers(name: str, flags: int) -> tuple[int, int]:
    """(most inside at once, workers refused) over ``WORKERS`` forked owner processes."""
    ctx = mp.get_context("fork")
    inside = ctx.Value(ctypes.c_int, 0, lock=False)
    most = ctx.Value(ctypes.c_int, 0, lock=False)
    refused = ctx.Value(ctypes.c_int, 0, lock=False)
    meter = ctx.Lock()
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_worker, args=(name, flags, inside, most, refused, meter,
                                               barrier))
             for _ in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"owner's workers failed with exit codes {failed}")
    return int(most.value), int(refused.value)


def _legacy_row(target: Target, uid: int, gid: int) -> Outcome:
    name = unique_name("a3squat")
    path = f"/dev/shm/sem.{name[1:]}"
    try:
        run_as(uid, gid, lambda: _squat(name, 0), target)
        adopted = sem_open(name, O_CREAT, 0o600, SLOTS)
        reported, real = adopted.mode, os.stat(path).st_mode & 0o777
        value = adopted.getvalue()
        adopted.close()
        most, refused = _run_workers(name, 0)
        unlinked = run_as(uid, gid, lambda: _unlink_as_squatter(name, 0), target)
    finally:
        with contextlib.suppress(EsemError):
            legacy_unlink(name)
    broken = most > SLOTS or refused < WORKERS
    return Outcome(
        "A3 squat O_CREAT", "legacy", "broken" if broken else "defended",
        f"{WORKERS} owner workers (sem_open O_CREAT 0600 value {SLOTS}) in a section meant "
        f"for {SLOTS}: up to {most} inside at once, {refused} refused; {ROGUE_USER} (uid "
        f"{uid}) had created the name first, 0666 value {SQUAT_VALUE}, and the owner's "
        f"O_CREAT adopted it silently (value {value}; the handle reports mode "
        f"{reported:04o}, the file is {real:04o}); the squatter then unlinked the name: "
        f"{unlinked}",
    )


def _unlink_as_squatter(name: str, flags: int) -> str:
    try:
        sem_unlink(name, flags=flags)
    except EsemError as exc:
        return f"refused ({type(exc).__name__})"
    return "allowed"


def _esem_row(target: Target, uid: int, gid: int) -> Outcome:
    name = unique_name("a3squat")
    try:
        run_as(uid, gid, lambda: _squat(name, USE_ESEM), target)
        try:
            sem_open(name, O_CREAT, 0o600, SLOTS, flags=USE_ESEM).close()
            error = "ALLOWED"
        except PermissionsError as exc:
            error = f"PermissionsError: {exc}"
        most, refused = _run_workers(name, USE_ESEM)
    finally:
        with contextlib.suppress(EsemError):
            sem_unlink(name, flags=USE_ESEM)  # root may remove the squatter's name
    named = f"uid {uid}" in error
    defended = most == 0 and refused == WORKERS and named
    return Outcome(
        "A3 squat O_CREAT", "esem", "defended" if defended else "broken",
        f"{WORKERS} owner workers (sem_open O_CREAT 0600 value {SLOTS}) in a section meant "
        f"for {SLOTS}: up to {most} inside at once, {refused} refused; {ROGUE_USER} (uid "
        f"{uid}) had created the name first, 0666 value {SQUAT_VALUE}, and the owner's "
        f"O_CREAT -> {error}",
    )


def run(target: Target) -> list[Outcome]:
    uid, gid = rogue_ids()
    check_reachable(target, uid, gid)
    return [_legacy_row(target, uid, gid), _esem_row(target, uid, gid)]
