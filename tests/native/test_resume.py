"""Crash safety in the native client (issue 14, PROTOCOL.md 16): unmodified C programs
under ``esem run --all`` whose service is SIGKILLed and restarted on the same state
directory (so its key and journal survive) carry on without seeing an error: a
``sem_wait`` blocked across the restart returns 0 once granted, and workers doing mutual
exclusion with posts across restarts keep it and keep conservation. Over a man in the
middle (the real service behind it): a lost connection resumes by itself, a tampered one
is never resumed, resumption can be turned off, and a service that forgot the session
makes every call fail as unavailable, never hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from esem.attack.a2_mitm import MitmProxy, frame
from esem.server.embedded import EmbeddedService

from .conftest import compile_c
from .test_client import Esemc

ANSWER = 60.0  # seconds a step may take before the test calls it hung (never a timing)


@pytest.fixture(scope="module")
def resume_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "resume")


@pytest.fixture
def restartable() -> Iterator[EmbeddedService]:
    """A daemon of this test alone, with its journal in its state directory (the
    default) and a grace period long enough for a loaded machine's restart."""
    svc = EmbeddedService(extra_args=["--resume-grace", "30"])
    os.chmod(svc.dir, 0o755)
    svc.start()
    try:
        yield svc
    finally:
        svc.cleanup()


def client_env(svc: EmbeddedService, preload: Path | None = None,
               **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ESEM_PUBKEY"}
    env["ESEM_SOCKET"] = str(svc.socket_path)
    if preload is not None:
        env["ESEM_PRELOAD_LIB"] = str(preload)
    env.update(extra)
    return env


def stat(svc: EmbeddedService, name: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "esem", "stat", "--json", name],
                       capture_output=True, text=True, timeout=ANSWER, env=client_env(svc))
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + ANSWER
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def restart(svc: EmbeddedService) -> None:
    """SIGKILL the daemon (no clean shutdown, nothing flushed on the way out) and start
    it again on the same directory: same key, same journal."""
    assert svc.proc is not None
    os.kill(svc.proc.pid, signal.SIGKILL)
    svc.proc.wait()
    svc.start()


def line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], ANSWER)
    assert ready, "the program hung"
    return proc.stdout.readline().strip()


def run_all(prog: Path, svc: EmbeddedService, preload: Path, *args: str,
            **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "esem", "run", "--all", "--", str(prog), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=client_env(svc, preload, **env), start_new_session=True)


@contextlib.contextmanager
def running(prog: Path, svc: EmbeddedService, preload: Path, *args: str,
            **env: str) -> Iterator[subprocess.Popen[str]]:
    """``run_all``, killed (its whole process group) if the test leaves it running."""
    proc = run_all(prog, svc, preload, *args, **env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def restart_and_post(svc: EmbeddedService, native_build: Path, name: str,
                     waiters: int = 1) -> None:
    """Once ``waiters`` WAITs are queued on ``name``: SIGKILL and restart the service,
    check they were restored in the queue, and post once per waiter from a new client."""
    wait_for(lambda: stat(svc, name)["waiters"] == waiters, f"{waiters} WAITs queued")
    restart(svc)
    after = stat(svc, name)
    assert after["value"] == 0 and after["waiters"] == waiters, after  # restored, queued
    poster = Esemc(native_build / "examples" / "esemc", client_env(svc))
    assert poster(f"open {name} - 0 600") == "ok created=0"  # the same semaphore
    for _ in range(waiters):
        assert poster("post") == "ok"


def settled(svc: EmbeddedService, name: str) -> None:
    s = stat(svc, name)
    assert s["value"] == 0 and s["waiters"] == 0, s


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=ANSWER)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the program hung: {out} {err}")
    return proc.returncode, out, err


def test_sem_wait_blocked_across_a_service_restart_is_granted(
        restartable: EmbeddedService, preload: Path, resume_prog: Path,
        native_build: Path, sem_name: str) -> None:
    """A C program blocked in sem_wait while the service is SIGKILLed and restarted:
    its client reconnects and resumes, the WAIT keeps its place, and a post made after
    the restart grants it: sem_wait returns 0 and the program saw no error."""
    with running(resume_prog, restartable, preload, "wait", sem_name) as waiter:
        assert line(waiter) == "waiting"
        restart_and_post(restartable, native_build, sem_name)
        assert line(waiter) == "granted"
        rc, out, err = finish(waiter)
        assert rc == 0, (out, err)
        assert "error" not in out
        settled(restartable, sem_name)


def test_a_program_that_drops_root_resumes_after_a_restart(
        restartable: EmbeddedService, preload: Path, resume_prog: Path,
        native_build: Path, sem_name: str) -> None:
    """Apache's pattern: the program opens its semaphore as root, becomes nobody, and
    blocks in sem_wait while the service restarts: it resumes under its new uid (the
    session was root's) and is granted, with no error."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    nobody = pwd.getpwnam("nobody").pw_uid
    with running(resume_prog, restartable, preload, "dropwait", sem_name,
                 str(nobody)) as waiter:
        assert line(waiter) == f"waiting uid={nobody}"
        restart_and_post(restartable, native_build, sem_name)
        assert line(waiter) == "granted"
        rc, out, err = finish(waiter)
        assert rc == 0, (out, err)
        settled(restartable, sem_name)


@pytest.fixture
def restartable_switchless() -> Iterator[EmbeddedService]:
    """As ``restartable``, with ``--switchless`` (kept across the restart)."""
    svc = EmbeddedService(extra_args=["--resume-grace", "30"], switchless=True)
    os.chmod(svc.dir, 0o755)
    svc.start()
    try:
        yield svc
    finally:
        svc.cleanup()


def test_a_switchless_sem_wait_across_a_restart_resumes_and_is_back_on_the_rings(
        restartable_switchless: EmbeddedService, preload: Path, resume_prog: Path,
        native_build: Path, sem_name: str) -> None:
    """A C program with ESEM_SWITCHLESS=1, its session on the rings, blocked in
    sem_wait while the service is SIGKILLed and restarted: its client sees the EOF of
    the socket and doorbell, drops the dead rings, resumes over the socket (the new
    service has no rings for it), and upgrades again; the post after the restart
    grants the wait, sem_wait returns 0 with no error or fallback warning, and the
    session is back on the rings (esem_transport() is 2)."""
    svc = restartable_switchless
    with running(resume_prog, svc, preload, "ringwait", sem_name,
                 ESEM_SWITCHLESS="1") as waiter:
        assert line(waiter) == "waiting transport=2"  # on the rings before the restart
        restart_and_post(svc, native_build, sem_name)
        assert line(waiter) == "granted"
        assert line(waiter) == "transport=2"  # upgraded again once resumed
        rc, out, err = finish(waiter)
        assert rc == 0, (out, err)
        assert "error" not in out
        assert "socket mode" not in err, err  # no fallback to the socket
        settled(svc, sem_name)


def test_a_fork_child_resumes_its_own_session_not_its_parents(
        restartable: EmbeddedService, preload: Path, resume_prog: Path,
        native_build: Path, sem_name: str) -> None:
    """A C program forks after sem_open; parent and child both block in sem_wait across
    a restart. The child's session is its own (opened by the fork handler, never the
    parent's inherited one), so each process resumes its own, and two posts grant both:
    neither sees an error (a child that tried to resume its parent's session would be
    refused: another pid)."""
    with running(resume_prog, restartable, preload, "forkwait", sem_name) as prog:
        assert sorted([line(prog), line(prog)]) == ["waiting child", "waiting parent"]
        restart_and_post(restartable, native_build, sem_name, waiters=2)
        assert sorted([line(prog), line(prog)]) == ["granted child", "granted parent"]
        rc, out, err = finish(prog)
        assert rc == 0, (out, err)
        settled(restartable, sem_name)


def test_mutual_exclusion_across_restarts_keeps_conservation(
        restartable: EmbeddedService, preload: Path, resume_prog: Path, sem_name: str,
        tmp_path: Path) -> None:
    """Three C workers take a value-1 semaphore around a read-modify-write of a counter
    file while the service is SIGKILLed and restarted three times (more with
    ESEM_NATIVE_RESTARTS): never two inside at
    once (O_EXCL marker), the counter equals the sections completed, every worker
    finished without an error, and the semaphore is back at 1 with no holder."""
    mutex_across_restarts(restartable, preload, resume_prog, sem_name, tmp_path)


def test_switchless_mutual_exclusion_across_restarts_keeps_conservation(
        restartable_switchless: EmbeddedService, preload: Path, resume_prog: Path,
        sem_name: str, tmp_path: Path) -> None:
    """The same on the rings (ESEM_SWITCHLESS=1, a --switchless service): restarts land
    while callers spin on a ring or publish in it; each session resumes over the socket
    and upgrades again, and exclusion and conservation hold."""
    mutex_across_restarts(restartable_switchless, preload, resume_prog, sem_name, tmp_path,
                          ESEM_SWITCHLESS="1")


def mutex_across_restarts(restartable: EmbeddedService, preload: Path, resume_prog: Path,
                          sem_name: str, tmp_path: Path, **env: str) -> None:
    # ESEM_NATIVE_RESTARTS=N for a longer run (the workers' iterations grow with it).
    restarts = int(os.environ.get("ESEM_NATIVE_RESTARTS", "3"))
    workers, iterations = 3, max(60, 40 * restarts)
    work = tmp_path / "work"
    work.mkdir()
    procs = [run_all(resume_prog, restartable, preload, "mutex", sem_name, str(work),
                     str(iterations), **env) for _ in range(workers)]
    try:
        # Restarts begin once every worker has its session (a program that starts while
        # the service is down fails to connect, as before: nothing to resume yet).
        for p in procs:
            assert line(p) == "ready"
        rng = random.Random(14)
        done = 0
        for _ in range(restarts):
            time.sleep(rng.uniform(0.2, 0.6))
            if all(p.poll() is not None for p in procs):
                break
            restart(restartable)
            done += 1
        results = [finish(p) for p in procs]
        for rc, out, err in results:
            assert rc == 0 and f"done {iterations}" in out, (out, err)
            assert "socket mode" not in err, err  # never a fallback from the rings
        assert done >= 1, "the workers finished before any restart: nothing was tested"
        print(f"{done} restarts, {workers * iterations} critical sections")
        assert int((work / "counter").read_text()) == workers * iterations
        assert not (work / "inside").exists()
        s = stat(restartable, sem_name)
        assert s["value"] == 1 and s["waiters"] == 0 and not s["holders"], s
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


@pytest.fixture
def proxied(service: EmbeddedService, tmp_path: Path) -> Iterator[MitmProxy]:
    proxy = MitmProxy(service.socket_path, tmp_path / "mitm.sock").start()
    try:
        yield proxy
    finally:
        proxy.stop()


def via(proxy: MitmProxy, service: EmbeddedService, native_build: Path,
        **extra: str) -> Esemc:
    env = {"ESEM_SOCKET": str(proxy.path), "ESEM_PUBKEY": service.pubkey.hex(), **extra}
    return Esemc(native_build / "examples" / "esemc", env)


def owner_of(service: EmbeddedService, native_build: Path, name: str) -> Esemc:
    owner = Esemc(native_build / "examples" / "esemc", {"ESEM_SOCKET": str(service.socket_path)})
    assert owner(f"open {name} c 0 600") == "ok created=1"
    return owner


def test_a_lost_connection_resumes_and_the_wait_is_granted(
        service: EmbeddedService, proxied: MitmProxy, native_build: Path,
        sem_name: str) -> None:
    """The connection of a client blocked in a WAIT is cut (the service sees EOF, the
    client a hang-up): the client reconnects by itself, RESUMEs, and the grant made
    meanwhile reaches the blocked call exactly once."""
    owner = owner_of(service, native_build, sem_name)
    victim = via(proxied, service, native_build)
    assert victim(f"open {sem_name} - 0 600") == "ok created=0"
    sid = victim("sid")
    victim.send("wait")
    wait_for(lambda: stat(service, sem_name)["waiters"] == 1, "the WAIT queued")
    proxied.link(0).close(by="test")
    assert owner("post") == "ok"  # granted while the session is detached
    assert victim.answer() == "ok"
    assert proxied.link(1).seen > 0  # it came back on a connection of its own
    assert victim("sid") == sid  # the same session: its id is kept for life
    assert victim("value") == "ok 0"
    assert owner("post") == "ok"
    assert victim("trywait") == "ok"
    assert owner(f"unlink {sem_name}") == "ok"


def test_a_tampered_connection_is_never_resumed(
        service: EmbeddedService, proxied: MitmProxy, native_build: Path,
        sem_name: str) -> None:
    """A flipped byte in a reply is an integrity error: the client fails the session for
    good and never reconnects to resume it (the service ends it too)."""
    owner = owner_of(service, native_build, sem_name)
    victim = via(proxied, service, native_build)
    assert victim(f"open {sem_name} - 0 600") == "ok created=0"

    def flip(_link: object, _index: int, body: bytes) -> list[bytes | float]:
        b = bytearray(body)
        b[len(b) // 2] ^= 0x01
        return [frame(bytes(b))]

    proxied.link(0).arm("s2c", flip)
    victim.send("wait")
    wait_for(lambda: stat(service, sem_name)["waiters"] == 1, "the WAIT queued")
    assert owner("post") == "ok"
    assert victim.answer().startswith("err Integrity")
    time.sleep(1.0)  # the backoff's first attempts would all have been made by now
    assert len(proxied.links) == 1, "the client reconnected after tampering"
    # The handle dies with its session (docs/design.md): it reports that session's
    # failure, and the process's next call runs on a new session of its own; the
    # tampered session is gone for good.
    assert victim("post").startswith("err Integrity")
    assert victim("ping") == "ok"
    assert len(proxied.links) == 2, "the process's new session is a fresh connection"
    assert owner(f"unlink {sem_name}") == "ok"


def test_resumption_off_fails_at_once(
        service: EmbeddedService, proxied: MitmProxy, native_build: Path,
        sem_name: str) -> None:
    """ESEM_RESUME_TIMEOUT=0: a lost connection fails the blocked call as unavailable
    (the behaviour before resumption), and the client does not reconnect."""
    owner = owner_of(service, native_build, sem_name)
    victim = via(proxied, service, native_build, ESEM_RESUME_TIMEOUT="0")
    assert victim(f"open {sem_name} - 0 600") == "ok created=0"
    victim.send("wait")
    wait_for(lambda: stat(service, sem_name)["waiters"] == 1, "the WAIT queued")
    proxied.link(0).close(by="test")
    assert victim.answer().startswith("err Unavailable")
    assert len(proxied.links) == 1
    assert owner(f"unlink {sem_name}") == "ok"


def test_a_session_the_service_forgot_is_unavailable_not_hung(
        native_build: Path, sem_name: str) -> None:
    """A service restarted without its journal (--no-journal) knows nothing of the
    session: the RESUME is refused (ENOENT), and the blocked call and every later one of
    that session fail as unavailable ("could not be resumed"), promptly."""
    svc = EmbeddedService(extra_args=["--no-journal"])
    os.chmod(svc.dir, 0o755)
    svc.start()
    try:
        victim = Esemc(native_build / "examples" / "esemc", client_env(svc))
        assert victim(f"open {sem_name} c 0 600") == "ok created=1"
        victim.send("wait")
        wait_for(lambda: stat(svc, sem_name)["waiters"] == 1, "the WAIT queued")
        restart(svc)
        answer = victim.answer()
        assert answer.startswith("err Unavailable") and "could not be resumed" in answer, answer
        # A new session (the process client reconnects afresh) works on the new service.
        assert victim(f"open {sem_name} c 1 600") == "ok created=1"
        assert victim("trywait") == "ok"
    finally:
        svc.cleanup()


def test_a_restart_with_the_client_idle_goes_unnoticed(
        restartable: EmbeddedService, native_build: Path, sem_name: str) -> None:
    """An idle client whose service restarts: its next calls just work, on the same
    session and the same handle (no new OPEN), through the resumed session."""
    c = Esemc(native_build / "examples" / "esemc", client_env(restartable))
    assert c(f"open {sem_name} c 2 600") == "ok created=1"
    sid = c("sid")
    assert c("trywait") == "ok"
    restart(restartable)
    assert c("value") == "ok 1"
    assert c("sid") == sid
    assert c("post") == "ok"
    assert stat(restartable, sem_name)["value"] == 2


def test_closing_a_client_ends_its_session_at_once(native_build: Path, sem_name: str) -> None:
    """A client that is closed sends END: the service ends the session at once (its
    robust unit is released) instead of keeping it detached through the grace period
    (ten minutes here), although its process still runs."""
    svc = EmbeddedService(extra_args=["--resume-grace", "600", "--no-journal"])
    os.chmod(svc.dir, 0o755)
    svc.start()
    try:
        c = Esemc(native_build / "examples" / "esemc", client_env(svc))
        assert c(f"hold-and-close {sem_name}") == "ok"
        wait_for(lambda: stat(svc, sem_name)["value"] == 1, "the closed session's unit back")
        assert not stat(svc, sem_name)["holders"]
        assert c("ping") == "ok"  # the process's own session is untouched
    finally:
        svc.cleanup()


def test_the_process_sends_end_when_it_exits(
        service: EmbeddedService, proxied: MitmProxy, native_build: Path) -> None:
    """A program's exit (its last line read, main returns) sends END on its session
    (from the client's exit hook, after the program's own atexit handlers): one more
    request frame reaches the service after the last call (its reply may find the
    program gone)."""
    c = via(proxied, service, native_build)
    assert c("ping") == "ok"
    link = proxied.link(0)
    sent = link.count("c2s")
    assert c.proc.stdin is not None
    c.proc.stdin.close()
    assert c.proc.wait(timeout=ANSWER) == 0
    assert link.wait_until(lambda: link.closed_by is not None, ANSWER)
    assert link.count("c2s") == sent + 1  # the END, and nothing else
    assert len(proxied.links) == 1


def test_a_service_with_another_key_is_never_resumed_with(
        native_build: Path, sem_name: str) -> None:
    """The service comes back with a different key (its key file replaced): the client
    re-reads the published key before reconnecting and fails the session as an
    integrity error at once; it never runs a handshake with, let alone resumes to, a
    service it did not pin."""
    svc = EmbeddedService(extra_args=["--no-journal"])
    os.chmod(svc.dir, 0o755)
    svc.start()
    try:
        victim = Esemc(native_build / "examples" / "esemc", client_env(svc))
        assert victim(f"open {sem_name} c 0 600") == "ok created=1"
        old_key = svc.pubkey
        victim.send("wait")
        wait_for(lambda: stat(svc, sem_name)["waiters"] == 1, "the WAIT queued")
        assert svc.proc is not None
        os.kill(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait()
        (svc.dir / "service.key").unlink()
        svc.start()
        assert svc.pubkey != old_key
        answer = victim.answer()
        assert answer.startswith("err Integrity") and "another key" in answer, answer
    finally:
        svc.cleanup()
