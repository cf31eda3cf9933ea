"""Robust semaphores between real processes: a dead session's release never creates a unit.

The two uses that broke the old rule ("release whatever the dead session took"), played
by forked processes on a real daemon:

* hand-off: a parent takes a robust mutex (value 1), its forked worker posts it back, then
  the parent exits. The old rule released the parent's unit a second time (value 2: two
  processes could hold the mutex).
* work queue: a producer posts 100 jobs into a robust value-0 semaphore, a consumer takes
  all 100 and exits normally. The old rule put the 100 done jobs back (value 100).

And the release that must still happen: a holder that dies inside the section gives the
unit back to the next waiter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from esem import O_CREAT, O_EXCL, USE_ESEM, BusyError, sem_open

from . import reap, run_forked, spawn, stat, wait_until

CREX = O_CREAT | O_EXCL
JOBS = 100


def test_hand_off_then_parent_exits(service: Any, sem_name: str) -> None:
    def parent() -> int:
        sem = sem_open(sem_name, CREX, 0o600, 1, flags=USE_ESEM, robust=True)
        sem.wait()  # the parent holds the mutex ...

        def worker() -> int:
            sem.post()  # ... and its worker hands it back
            return 0

        return run_forked(worker)  # then the parent exits, without posting

    assert run_forked(parent) == 0
    info = stat(sem_name)
    assert info["value"] == 1, info  # was 2 before the capacity rule
    assert (info["holders"], info["robust_releases"], info["robust_forgiven"]) == ([], 0, 0)
    # still one mutex: exactly one process gets in
    sem = sem_open(sem_name, flags=USE_ESEM)
    sem.trywait()
    with pytest.raises(BusyError):
        sem.trywait()
    sem.post()
    sem.close()


def test_work_queue_consumer_exits(service: Any, sem_name: str) -> None:
    queue = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM, robust=True)

    def producer() -> int:
        for _ in range(JOBS):
            queue.post()
        return 0

    def consumer() -> int:
        for _ in range(JOBS):
            queue.wait()
        return 0

    assert run_forked(producer) == 0
    assert run_forked(consumer) == 0
    # The consumer has exited, but the service may read its connection's end after this
    # process's next request (another connection): its session ends, and its units are
    # counted, once only this process's handle is left.
    wait_until(lambda: stat(sem_name)["handles"] == 1, what="the consumer's session ended")
    info = stat(sem_name)
    assert info["value"] == 0, info  # was 100 before the capacity rule
    assert (info["posts"], info["waits"]) == (JOBS, JOBS)
    assert (info["robust_releases"], info["robust_forgiven"]) == (0, JOBS)
    shown = subprocess.run([sys.executable, "-m", "esem", "stat", sem_name, "--socket",
                            str(service.socket_path)], capture_output=True, text=True,
                           timeout=120, check=True).stdout
    assert f"robust: yes (0 released, {JOBS} forgiven)" in shown
    queue.close()


def test_holder_dying_in_the_section_still_releases(service: Any, sem_name: str) -> None:
    mutex = sem_open(sem_name, CREX, 0o600, 1, flags=USE_ESEM, robust=True)
    r, w = os.pipe()

    def holder() -> int:
        os.close(r)
        mutex.wait()
        os.write(w, b"in")
        os.kill(os.getpid(), 9)  # dies holding it, without a word to the service
        return 1

    pid = spawn(holder)
    os.close(w)
    assert os.read(r, 2) == b"in"
    os.close(r)

    def next_one() -> int:
        mutex.wait()  # granted only by the release of the dead holder's unit
        mutex.post()
        return 0

    assert run_forked(next_one) == 0
    assert reap(pid) == -9
    info = stat(sem_name)
    assert (info["value"], info["robust_releases"], info["robust_forgiven"]) == (1, 1, 0)
    mutex.close()
