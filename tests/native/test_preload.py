"""The LD_PRELOAD library (``native/esem-preload``): small C programs compiled here run
under it against the live service: every operation, the same pointer for the same
name, a hand-off across fork, EINTR, a signal handler's sem_post, pthread_cancel of a
waiter (no unit lost), sem_open/sem_unlink not being cancellation points, unnamed
semaphores (``ESEM_PRELOAD_ALL=1``) private and process-shared, glibc's semaphores left
alone, a name squatted by another uid refused to ``O_CREAT`` (EACCES), and
``stress-ng --sem``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from esem import O_CREAT, USE_ESEM, sem_open
from esem.client.admin import stat_semaphore
from esem.client.blocking import get_client
from esem.errors import ExistentialError
from esem.server.embedded import EmbeddedService


def run(preload: Path, argv: list[str], *, all_sems: bool = False,
        env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "LD_PRELOAD": str(preload), **(env or {})}
    if all_sems:
        e["ESEM_PRELOAD_ALL"] = "1"
    return subprocess.run(argv, env=e, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("case", ["ops", "handoff", "eintr", "cancel", "legacy"])
def test_c_program_under_preload(preload: Path, semtest: Path, service: EmbeddedService,
                                 sem_name: str, case: str) -> None:
    r = run(preload, [str(semtest), case, sem_name])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{case} ok" in r.stdout


def test_unnamed_semaphores_with_all(preload: Path, semtest: Path,
                                     service: EmbeddedService) -> None:
    r = run(preload, [str(semtest), "unnamed"], all_sems=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unnamed ok" in r.stdout


@pytest.mark.parametrize("case", ["main-exit", "private-fork"])
def test_process_semantics_with_all(preload: Path, semtest: Path, service: EmbeddedService,
                                    case: str) -> None:
    """The process ends when its main thread's pthread_exit is followed by its last
    thread's end, the client's reader thread notwithstanding; a pshared=0 unnamed
    semaphore is a fork child's own copy (both as with glibc)."""
    r = run(preload, [str(semtest), case], all_sems=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{case} ok" in r.stdout


def test_a_stop_and_continue_never_ends_a_wait_with_eintr(
        preload: Path, semtest: Path, service: EmbeddedService, sem_name: str) -> None:
    """A child SIGSTOPs and SIGCONTs the program 1000 times while it waits for units
    another child posts every half millisecond; no handler is installed, so no wait may
    fail with EINTR (glibc's do not). A wait that blocked in a recv under SO_RCVTIMEO
    would (signal(7): such a recv fails with EINTR after a stop): 485 of about 1400
    waits did, in a build that tried it."""
    r = run(preload, [str(semtest), "stopcont", sem_name, "1000"])
    assert r.returncode == 0, r.stdout + r.stderr
    words = r.stdout.split()
    assert words[0] == "waits" and int(words[1]) > 0 and words[2:] == ["eintr", "0"], r.stdout


@pytest.mark.parametrize("all_sems", [False, True])
def test_semaphore_lives_in_the_service(preload: Path, semtest: Path, service: EmbeddedService,
                                        sem_name: str, all_sems: bool) -> None:
    """USE_ESEM (or --all without it): the count is in the service, nothing in /dev/shm."""
    e = {**os.environ, "LD_PRELOAD": str(preload)}
    if all_sems:
        e["ESEM_PRELOAD_ALL"] = "1"
    argv = [str(semtest), "hold-plain" if all_sems else "hold", sem_name]
    proc = subprocess.Popen(argv, env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "open 3"
        info = stat_semaphore(get_client(), sem_name)
        assert info["value"] == 3 and info["handles"] == 1
        assert not Path(f"/dev/shm/sem.{sem_name[1:]}").exists()
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ExistentialError):
        stat_semaphore(get_client(), sem_name)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")
def test_squatted_name_is_eacces_to_o_creat(preload: Path, semtest: Path,
                                            service: EmbeddedService, sem_name: str) -> None:
    """The C API has no foreign-owner flag (OpenFlag.FOREIGN): a name another uid created
    first is refused to the caller's ``O_CREAT`` with errno EACCES, not adopted."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.umask(0)
            sem = sem_open(sem_name, O_CREAT, 0o666, 1000, flags=USE_ESEM)
            code = 0 if sem.created else 2  # type: ignore[union-attr]
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    r = run(preload, [str(semtest), "squatted", sem_name])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "squatted ok" in r.stdout
    # Nothing was adopted or changed: still the squatter's, with its count.
    info = stat_semaphore(get_client(), sem_name)
    assert (info["owner_uid"], info["value"]) == (nobody.pw_uid, 1000)


def test_without_a_service_the_calls_fail(preload: Path, semtest: Path, tmp_path: Path) -> None:
    """Proof that the calls really go to the service: with none reachable they fail
    (errno EIO) instead of silently falling back to glibc."""
    env = {"ESEM_SOCKET": str(tmp_path / "none.sock"), "ESEM_PUBKEY": "11" * 32}
    r = run(preload, [str(semtest), "ops", "/esem-test-nosvc"], env=env)
    assert r.returncode == 1 and "errno 5" in r.stderr, r.stderr


def test_stress_ng_sem(preload: Path, service: EmbeddedService, tmp_path: Path) -> None:
    stress = shutil.which("stress-ng")
    if stress is None:
        pytest.skip("stress-ng is not installed (.ci/run installs it)")
    r = run(preload, [stress, "--sem", "2", "-t", "3", "--metrics-brief"], all_sems=True,
            cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "successful run completed" in r.stdout + r.stderr
    # The same run with no service fails: its semaphores were e-semaphores.
    env = {"ESEM_SOCKET": str(tmp_path / "none.sock"), "ESEM_PUBKEY": "11" * 32}
    r = run(preload, [stress, "--sem", "2", "-t", "3"], all_sems=True, env=env, cwd=tmp_path)
    assert "semaphore init (POSIX) failed" in r.stdout + r.stderr
