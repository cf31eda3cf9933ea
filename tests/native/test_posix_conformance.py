"""Conformance on a live service: the Open POSIX Test Suite's semaphore tests
(``conformance/interfaces/sem_*``, Debian's ``posixtestsuite`` 1.5.2) give the same
verdict, test by test, natively and under ``esem run --all`` against a fresh service.

Each test program is run natively, then under the preload library, with a per-test
timeout. ``sem_post/8-1`` checks that a post wakes the highest-priority waiter, which
depends on scheduling and occasionally fails natively too: it alone is retried (up to
``RETRIES`` runs in each mode, the first PASS counts). Under esem it fails for a reason
of design (FIFO service of waiters, ``KNOWN_DIFFERENCES``): it is checked on its own and
reported as an xfail with that reason. The service's log must show a
session of every program run under esem that calls a semaphore function (three return
before calling any), so the preload cannot have been bypassed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from esem.server.embedded import EmbeddedService
from tests.native import posixtestsuite as pts

# Known to differ, with the reason; asserted on their own (xfail, not strict: the
# native side is itself scheduling-dependent) and reported, never folded in silently.
KNOWN_DIFFERENCES = {
    "sem_post/8-1": "POSIX with the Process Scheduling option: a post unblocks the "
    "highest-priority waiter (here SCHED_FIFO children of priorities 2 and 3). The "
    "service serves waiters FIFO by design (README, Exact semantics) and a wait does not "
    "carry its thread's priority, so the first waiter (priority 2) gets the unit.",
}
# Programs that return before calling any semaphore function (so no session is
# expected of them, and the test checks that none was made).
NO_SEMAPHORE_CALL = {
    "sem_init/6-1": "SEM_VALUE_MAX is INT_MAX on glibc: 'Test skipped' before sem_init",
    "sem_open/5-1": "SEM_VALUE_MAX is INT_MAX on glibc: returns before sem_open",
    "sem_init/7-1": "calls only sysconf(_SC_SEM_NSEMS_MAX), which is -1: UNTESTED",
}
TIMEOUT = 60.0  # seconds per program (the suite's own is 240; none needs more than ~5)
FLAKY = {"sem_post/8-1": "wakes the highest-priority waiter: scheduling-dependent"}
RETRIES = 3
# 69 runnable tests; the notes measured 68 PASS and one UNTESTED on Debian 12, and this
# machine passes all 69. Fewer than 68 natively means the run itself is broken.
EXPECTED_NATIVE_PASS = 68
# The module fixture runs every program twice (about a minute when idle): the default
# per-test timeout would cut it off.
pytestmark = pytest.mark.timeout(1800)


@dataclass
class Outcome:
    verdict: str
    runs: int
    output: str


@dataclass
class Results:
    native: dict[str, Outcome] = field(default_factory=dict)
    esem: dict[str, Outcome] = field(default_factory=dict)
    pids: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [f"{'test':<20} {'native':<12} esem"]
        for name in sorted(self.native):
            n, e = self.native[name], self.esem[name]
            mark = "" if n.verdict == e.verdict else "   <-- differs"
            rows.append(f"{name:<20} {n.verdict:<12} {e.verdict}{mark}")
        return "\n".join(rows)


def _run(name: str, argv: list[str], env: dict[str, str], cwd: Path,
         pids: list[int] | None = None) -> Outcome:
    tries = RETRIES if name in FLAKY else 1
    runs = 0
    while True:
        runs += 1
        verdict, pid, output = pts.run_one(argv, env=env, cwd=cwd, timeout=TIMEOUT)
        if pids is not None:
            pids.append(pid)
        if verdict == "PASS" or runs == tries:
            return Outcome(verdict, runs, output)


@pytest.fixture(scope="module")
def results(preload: Path, service: EmbeddedService,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Results]:
    if shutil.which("apt-get") is None or shutil.which("dpkg-source") is None:
        pytest.skip("needs apt-get and dpkg-source (dpkg-dev) to fetch Debian's "
                    "posixtestsuite source (.ci/run installs dpkg-dev)")
    top = pts.fetch()
    exes = pts.build(top)
    assert len(exes) >= EXPECTED_NATIVE_PASS, sorted(exes)
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "ESEM_PRELOAD_ALL")}
    under = {**base, "ESEM_PRELOAD_LIB": str(preload), **service.env()}
    out = Results()
    start = time.monotonic()
    for name, exe in exes.items():
        cwd = tmp_path_factory.mktemp(name.replace("/", "_"))
        out.native[name] = _run(name, [str(exe)], base, cwd)
        out.pids[name] = []
        out.esem[name] = _run(name, [sys.executable, "-m", "esem", "run", "--all", "--",
                                     str(exe)], under, cwd, out.pids[name])
    out.seconds = time.monotonic() - start
    print(f"\n{out.table()}\n{len(exes)} tests, {out.seconds:.1f} s")
    yield out


def test_same_verdict_natively_and_under_esem(results: Results) -> None:
    differ = {name: (results.native[name], results.esem[name]) for name in results.native
              if results.native[name].verdict != results.esem[name].verdict
              and name not in KNOWN_DIFFERENCES}
    detail = "\n".join(f"--- {name}: native {n.verdict}, esem {e.verdict}; esem output:\n"
                       f"{e.output[-1500:]}" for name, (n, e) in differ.items())
    assert not differ, f"{results.table()}\n{detail}"


def test_native_run_passes_the_expected_number(results: Results) -> None:
    # A FLAKY test depends on the scheduler natively too (it failed natively 3 times in
    # a row on a loaded 2-vCPU machine): it is not counted either way.
    passed = [name for name, o in results.native.items()
              if o.verdict == "PASS" and name not in FLAKY]
    assert len(passed) >= EXPECTED_NATIVE_PASS - len(FLAKY), results.table()


def test_every_program_under_esem_had_a_session(results: Results,
                                                service: EmbeddedService) -> None:
    """``esem run`` execs the program, so its pid is the session's: each one's must be in
    the service log's ``session N start pid=P`` lines."""
    log = service.log_path.read_text(errors="replace")
    started = {int(p) for p in re.findall(r"session \d+ start pid=(\d+)", log)}
    had = {name for name, pids in results.pids.items() if started & set(pids)}
    missing = sorted(set(results.pids) - had - set(NO_SEMAPHORE_CALL))
    assert not missing, f"no session in the service log for {missing}"
    assert not had & set(NO_SEMAPHORE_CALL), "NO_SEMAPHORE_CALL is out of date"


@pytest.mark.parametrize("name", sorted(KNOWN_DIFFERENCES))
def test_known_difference(results: Results, name: str) -> None:
    if results.native[name].verdict == results.esem[name].verdict:
        return  # the scheduler happened to agree this time
    pytest.xfail(f"{name}: native {results.native[name].verdict}, esem "
                 f"{results.esem[name].verdict}: {KNOWN_DIFFERENCES[name]}")
