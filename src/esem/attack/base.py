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

import os
import signal
import time
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
