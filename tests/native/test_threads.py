"""Reply routing in the native client under many threads of one process (one session):
the client lets a calling thread read the session socket itself while nobody else
does and hands the reading to its reader thread when several threads wait, a wait
blocks, a signal withdraws a wait or the connection is lost. An unmodified C program
(``c/threads.c``) under ``esem run --all`` checks every reply it gets (a reply that
reached the wrong thread shows as a wrong value or error), with blocking and timed
waits interrupted by signals, while the service is SIGKILLed and restarted under it;
conservation is checked at the end.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from esem.server.embedded import EmbeddedService

from .conftest import compile_c
from .test_client import Esemc
from .test_resume import client_env, finish, line, restart, restartable, run_all  # noqa: F401

FAST, WAITERS, GATE = 6, 4, 200


@pytest.fixture(scope="module")
def threads_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "threads")


def run_threads(svc: EmbeddedService, preload: Path, prog: Path, prefix: str,
                iterations: int, restarts: int) -> tuple[int, int]:
    """Run the program, restart the service ``restarts`` times while it runs; return
    (restarts done, operations) after checking its replies and conservation."""
    proc = run_all(prog, svc, preload, prefix, str(FAST), str(WAITERS), str(iterations),
                   str(GATE))
    try:
        assert line(proc) == "ready"
        rng = random.Random(12)
        done = 0
        for _ in range(restarts):
            time.sleep(rng.uniform(0.2, 0.5))
            if proc.poll() is not None:
                break
            restart(svc)
            done += 1
        rc, out, err = finish(proc)
        assert rc == 0, (out, err)
        words = out.split()
        assert words[-5] == "done", out
        ops, got, left = int(words[-4]), int(words[-3]), int(words[-2])
        assert got + left == GATE + WAITERS, out  # no unit lost or made up
        return done, ops
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_many_threads_each_get_their_own_replies(
        restartable: EmbeddedService, preload: Path, threads_prog: Path,  # noqa: F811
        sem_name: str) -> None:
    """Six threads posting, reading values and trywaiting their own semaphores, four
    waiting (blocking and timed, interrupted by SIGUSR1) on a gate a seventh posts:
    every reply is the right one, and the gate's units add up."""
    _, ops = run_threads(restartable, preload, threads_prog, sem_name, 150, restarts=0)
    assert ops > FAST * 150 * 4


def test_many_threads_across_service_restarts(
        restartable: EmbeddedService, preload: Path, threads_prog: Path,  # noqa: F811
        sem_name: str) -> None:
    """The same while the service is SIGKILLed and restarted twice: the connection is
    lost under a thread reading the socket for itself or under the reader thread; the
    session resumes and every thread still gets exactly its own replies."""
    done, _ = run_threads(restartable, preload, threads_prog, sem_name, 600, restarts=2)
    assert done >= 1, "the program finished before any restart: nothing was tested"


def test_an_idle_client_meets_the_loss_of_its_service(
        restartable: EmbeddedService, native_build: Path, sem_name: str) -> None:  # noqa: F811
    """Nobody reads the socket of an idle client (its reader thread waits for a hang-up
    only): the service's death is still met at once. With resumption off the session
    fails then, so the next call, after the service is back, opens a new session and
    works (were the loss met only by that call, it would fail as unavailable)."""
    c = Esemc(native_build / "examples" / "esemc",
              client_env(restartable, ESEM_RESUME_TIMEOUT="0"))
    try:
        assert c(f"open {sem_name} c 1 600") == "ok created=1"
        sid = c("sid")
        assert c("trywait") == "ok"
        restart(restartable)  # SIGKILL; the new one starts in about a second
        assert c(f"open {sem_name} - 0 600") == "ok created=0"  # restored from the journal
        assert c("sid") != sid
        assert c("post") == "ok"
    finally:
        c.close()
