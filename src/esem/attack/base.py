"""What every adversary of the threat model returns, and what it is given.

An attack is a function ``run(target) -> list[Outcome]``: it plays one adversary of
docs/design.md section 2 for real (processes, sockets, uids) against the running service in
``target`` and, where it applies, against legacy POSIX semaphores, and reports one row
per backend. A row is ``broken`` when the adversary achieved what the threat model says
it must not (a grant the service did not give, a changed count, a refused tenant), and
``defended`` when it tried and failed; ``n/a`` says why it does not apply. The evidence
is what was observed, in words a reviewer can check.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OutcomeKind = Literal["broken", "defended", "n/a"]
BACKENDS = ("legacy", "esem", "esem+key")


@dataclass(frozen=True)
class Outcome:
    attack: str  # "A1".."A7" and a short label, e.g. "A2 replay"
    backend: str  # one of BACKENDS
    outcome: OutcomeKind
    evidence: str
    # True for a row the threat model expects to break: a documented limit (A4 on a
    # semaphore without a key), shown so that the limit is measured, not hidden.
    documented_limit: bool = False


@dataclass(frozen=True)
class Target:
    """A running esem service, and a scratch directory the attacks may use."""

    socket_path: Path
    pubkey: bytes
    workdir: Path
    quick: bool = False  # smaller sizes (tests, CI); the full run is the default


def reap(pid: int, grace: float) -> None:
    """Let a child process that has reported exit within ``grace`` seconds; else kill it
    (only ever a pid this process started)."""
    end = time.monotonic() + grace
    done, _ = os.waitpid(pid, os.WNOHANG)
    while done == 0 and time.monotonic() < end:
        time.sleep(0.01)
        done, _ = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def stopped(pid: int) -> bool:
    """Every thread of process ``pid`` is stopped (state T or t). The leader's state
    alone says too little: SIGSTOP goes to one thread, which must run before it stops
    the others, and meanwhile another thread (one a doorbell just woke, say) goes on
    reading shared memory."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited
        if state not in ("T", "t"):
            return False
    return True


def stop_all(pid: int, timeout: float) -> None:
    """SIGSTOP ``pid`` and return once all its threads are stopped (RuntimeError after
    ``timeout`` seconds)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while not stopped(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not stop within {timeout}s")
        time.sleep(0.001)


@contextlib.contextmanager
def frozen(pid: int, timeout: float = 10.0) -> Iterator[None]:
    """Process ``pid`` stopped, every thread of it (as the kernel can stop it): nothing
    it has in flight is read or written until the block ends (SIGCONT)."""
    stop_all(pid, timeout)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
