"""End-to-end tests: a real esem daemon, real processes, no mocks of the service.

Helpers for forked children live here. A child runs one function and leaves with
``os._exit`` (never through pytest's own exit path); its exit status is the verdict.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import esem.client.admin as admin
from esem.client.blocking import get_client

CHILD_TIMEOUT = 30.0  # seconds any child may take before the test fails (and kills it)


def spawn(child: Callable[[], int | None], fork: Callable[[], int] = os.fork) -> int:
    """Run ``child()`` in a child made by ``fork`` (``os.fork``); return its pid. The
    child's exit status is what ``child`` returns (0 for None), or 1 with a traceback on
    stderr if it raised."""
    pid = fork()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = child() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = CHILD_TIMEOUT) -> int:
    """Wait for child ``pid`` and return its exit code; kill it and fail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout}s")
        time.sleep(0.01)


def run_forked(child: Callable[[], int | None], timeout: float = CHILD_TIMEOUT) -> int:
    return reap(spawn(child), timeout)


def stat(name: str, key: bytes | None = None) -> dict[str, Any]:
    """The service's view of esem semaphore ``name`` (through this process's client);
    a key-bound one shows its counts only with its ``key``."""
    return admin.stat_semaphore(get_client(), name, key=key)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
               what: str = "condition") -> None:
    """Poll ``predicate`` until true; used to know that a waiter is queued, never to
    measure speed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_for_waiters(name: str, count: int, timeout: float = 10.0) -> None:
    """Block until the service queues ``count`` waiters on esem semaphore ``name``."""
    wait_until(lambda: stat(name)["waiters"] >= count, timeout,
               f"{count} waiter(s) on {name}")
