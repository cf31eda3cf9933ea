"""The native client in switchless mode (PROTOCOL.md 15) against the real Python service
started with ``--switchless``: every operation over the rings, a hand-off between two
processes (a sleeping waiter woken through its doorbell), a fork child that opens a
switchless session of its own, the descriptors high and close-on-exec, the fallback to
the socket (with a warning) when the service does not offer the rings, a dead service
noticed by a blocked waiter, and a ring tampered by a same-uid process: an error in the
client, never a grant.

The client is driven through its ``esemc`` example (``ESEM_SWITCHLESS=1``).
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open
from esem.attack.base import stop_all, stopped
from esem.client.admin import stat_semaphore
from esem.client.blocking import Client
from esem.protocol.ring import HEADER_BYTES, MASK64, REP_HEAD, REP_TAIL, Region
from esem.server.embedded import EmbeddedService

from .test_client import Esemc

SWITCHLESS = {"ESEM_SWITCHLESS": "1"}


@pytest.fixture(scope="module")
def sl_service() -> Iterator[EmbeddedService]:
    with EmbeddedService(switchless=True) as svc:
        yield svc


def _tools(native_build: Path, svc: EmbeddedService) -> Iterator[Callable[..., Esemc]]:
    made: list[Esemc] = []

    def new(env: dict[str, str] | None = None) -> Esemc:
        tool = Esemc(native_build / "examples" / "esemc",
                     {**svc.env(), "ESEM_PUBKEY": svc.pubkey.hex(), **SWITCHLESS,
                      **(env or {})})
        made.append(tool)
        return tool

    yield new
    for tool in made:
        if tool.proc.poll() is None:
            tool.close()


@pytest.fixture
def esemc(native_build: Path, sl_service: EmbeddedService) -> Iterator[Callable[..., Esemc]]:
    yield from _tools(native_build, sl_service)


def admin(svc: EmbeddedService) -> Client:
    c = Client(svc.socket_path, pubkey=svc.pubkey, switchless=False)
    c.connect()
    return c


def switchless_session(c: Esemc) -> int:
    """Assert the tool's session is switchless; its region's descriptor."""
    mode, memfd = c("mode").split()[1:]
    assert mode == "switchless"
    return int(memfd)


def test_every_operation_over_the_rings(esemc: Callable[..., Esemc], sem_name: str) -> None:
    c = esemc()
    assert c(f"open {sem_name} cx 1 600") == "ok created=1"
    switchless_session(c)
    assert c("value") == "ok 1"
    assert c("trywait") == "ok"
    assert c("trywait").startswith("err Status EAGAIN")
    assert c("timedwait 50").startswith("err Status ETIMEDOUT")
    for _ in range(500):  # many frames: the rings wrap their 64 KiB several times
        assert c("post") == "ok"
    assert c("value") == "ok 500"
    for _ in range(500):
        assert c("wait") == "ok"
    assert c("timedwait 1000").startswith("err Status ETIMEDOUT")
    assert c("post") == "ok"
    assert c("timedwait 1000") == "ok"
    assert c("ping") == "ok"
    assert c("close") == "ok"
    assert c("value").startswith("err Status EBADF")
    assert c(f"unlink {sem_name}") == "ok"
    assert c(f"unlink {sem_name}").startswith("err Status ENOENT")
    switchless_session(c)  # still the rings, after every refusal


def test_hand_off_wakes_a_sleeping_waiter(esemc: Callable[..., Esemc], sl_service: EmbeddedService,
                                          sem_name: str) -> None:
    a, b = esemc(), esemc()
    assert a(f"open {sem_name} c 0 600") == "ok created=1"
    assert b(f"open {sem_name} - 0 600") == "ok created=0"
    adm = admin(sl_service)
    try:
        for _ in range(3):
            a.send("wait")  # queued in the service; a's threads stop spinning and sleep
            deadline = time.monotonic() + 10
            while stat_semaphore(adm, sem_name)["waiters"] != 1:
                assert time.monotonic() < deadline, "the wait never queued"
                time.sleep(0.01)
            time.sleep(0.2)  # well past any spin: only the doorbell can wake it now
            assert b("post") == "ok"
            assert a.answer() == "ok"
        assert a("value") == "ok 0"
    finally:
        adm.close()
    switchless_session(a)
    switchless_session(b)
    assert a(f"unlink {sem_name}") == "ok"


def test_fork_child_has_switchless_session_of_its_own(esemc: Callable[..., Esemc],
                                                      sem_name: str) -> None:
    c = esemc()
    assert c(f"open {sem_name} c 0 600") == "ok created=1"
    assert c("fork-post") == "ok child=0"
    assert c("value") == "ok 1"
    assert c("post") == "ok"  # the parent's rings survived its child
    assert c("value") == "ok 2"
    switchless_session(c)
    assert c(f"unlink {sem_name}") == "ok"


def test_ring_descriptors_are_high_and_close_on_exec(esemc: Callable[..., Esemc]) -> None:
    c = esemc()
    memfd = switchless_session(c)
    pid = c.proc.pid
    assert memfd >= 100
    assert os.readlink(f"/proc/{pid}/fd/{memfd}").startswith("/memfd:esem-ring")
    ours = [int(fd) for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) >= 100]
    sockets = [fd for fd in ours if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")]
    assert len(sockets) >= 2  # the session socket and the doorbell
    for fd in ours:
        info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        assert int(info.split("flags:")[1].split()[0], 8) & 0o2000000, fd  # O_CLOEXEC
    # Nothing of the session below the high mark: the program's numbers stay its own.
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) < 100:
            assert not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:")


def test_service_without_switchless_falls_back_to_the_socket(
        native_build: Path, service: EmbeddedService, sem_name: str) -> None:
    c = Esemc(native_build / "examples" / "esemc", {**service.env(), **SWITCHLESS})
    try:
        assert c(f"open {sem_name} c 0 600") == "ok created=1"
        assert c("mode") == "ok socket -1"
        assert c("post") == "ok"
        assert c("wait") == "ok"
        assert c(f"unlink {sem_name}") == "ok"
    finally:
        assert c.proc.stdin is not None
        c.proc.stdin.close()
        c.proc.wait(timeout=10)


def test_fallback_warns(native_build: Path, service: EmbeddedService) -> None:
    done = subprocess.run([str(native_build / "examples" / "esemc")], input="mode\n",
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **service.env(), **SWITCHLESS})
    assert done.stdout.strip() == "ok socket -1"
    assert "ESEM_SWITCHLESS is set but the esem service refused switchless mode" in done.stderr


def test_dead_service_ends_a_blocked_wait(native_build: Path, sem_name: str) -> None:
    with EmbeddedService(switchless=True) as svc:
        c = Esemc(native_build / "examples" / "esemc",
                  {**svc.env(), "ESEM_PUBKEY": svc.pubkey.hex(), **SWITCHLESS})
        try:
            assert c(f"open {sem_name} c 0 600") == "ok created=1"
            switchless_session(c)
            c.send("wait")
            time.sleep(0.3)  # asleep on its doorbell and the socket
            svc.kill()
            assert c.answer(hang=20).startswith("err Unavailable")
        finally:
            c.close()


def _log_tail(svc: EmbeddedService, size: int = 3000) -> str:
    return svc.log_path.read_text(errors="replace")[-size:]


def _map(pid: int, fd: int) -> tuple[mmap.mmap, Region]:
    path = f"/proc/{pid}/fd/{fd}"
    f = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(f).st_size
        mm = mmap.mmap(f, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(f)
    return mm, Region(mm, (size - HEADER_BYTES) // 2)


@pytest.mark.parametrize("tamper", ["garbage-head", "flip-grant"])
def test_tampered_ring_is_an_error_never_a_grant(
        esemc: Callable[..., Esemc], sl_service: EmbeddedService, sem_name: str,
        tamper: str) -> None:
    """A same-uid process maps the victim's region through /proc/PID/fd and either sets
    the reply ring's head beyond its capacity or flips a bit of the grant it finds
    there: the victim's wait ends in an integrity error, and the service granted what it
    says it did (no unit appears from nowhere)."""
    adm = admin(sl_service)
    owner = sem_open(sem_name, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM, client=adm)
    victim = esemc()
    try:
        assert victim(f"open {sem_name} - 0 600") == "ok created=0"
        mm, region = _map(victim.proc.pid, switchless_session(victim))
        ctl, cap = region.ctl, region.capacity
        victim.send("wait")
        deadline = time.monotonic() + 10
        while stat_semaphore(adm, sem_name)["waiters"] != 1:
            assert time.monotonic() < deadline, "the wait never queued"
            time.sleep(0.01)
        # Every thread stopped, not just the one SIGSTOP went to: a reader thread that the
        # doorbell wakes would otherwise take the grant before the group stop reaches it.
        stop_all(victim.proc.pid, 10)  # a grant can sit unread in the ring
        try:
            if tamper == "garbage-head":
                ctl[REP_HEAD] = (ctl[REP_TAIL] + cap + 1 + 4096) & MASK64
            else:
                owner.post()
                deadline = time.monotonic() + 10
                while ctl[REP_HEAD] == ctl[REP_TAIL]:
                    assert time.monotonic() < deadline, (
                        f"the grant never reached the ring; {stat_semaphore(adm, sem_name)}; "
                        f"the service's log ends: {_log_tail(sl_service)}")
                    assert stopped(victim.proc.pid), "the victim runs again"
                    time.sleep(0.001)
                at = HEADER_BYTES + cap + ((ctl[REP_TAIL] + 10) & (cap - 1))
                mm[at] ^= 0x04
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        out = victim.answer(hang=30)
        assert out.startswith("err Integrity"), out
        region.release()
        mm.close()
        info = stat_semaphore(adm, sem_name)
        posts = 1 if tamper == "flip-grant" else 0
        assert info["posts"] == posts
        assert info["value"] + info["waits"] == posts  # conservation: nothing created
    finally:
        owner.close()
        adm.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (a counter, not a timing)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


IDLE_BUDGET = 0.1  # CPU seconds over a 1-second window: generous (a spinner uses ~1.0)


def test_idle_and_blocked_native_sessions_cost_no_cpu(
        esemc: Callable[..., Esemc], sl_service: EmbeddedService, sem_name: str) -> None:
    """A native switchless session that is idle, then one with a thread blocked in a
    wait on a semaphore at zero: over a second each, neither the service nor the native
    client burns CPU (both spun briefly after the last operation, then slept)."""
    assert sl_service.proc is not None
    service = sl_service.proc.pid
    a, b = esemc(), esemc()
    assert a(f"open {sem_name} c 0 600") == "ok created=1"
    assert b(f"open {sem_name} - 0 600") == "ok created=0"
    switchless_session(a)
    for _ in range(200):  # warm: the poller and the callers spin after this
        assert a("post") == "ok"
        assert a("wait") == "ok"
    for label, blocked in (("idle", False), ("blocked", True)):
        if blocked:
            a.send("wait")
            adm = admin(sl_service)
            try:
                deadline = time.monotonic() + 10
                while stat_semaphore(adm, sem_name)["waiters"] != 1:
                    assert time.monotonic() < deadline, "the wait never queued"
                    time.sleep(0.01)
            finally:
                adm.close()
        time.sleep(0.1)
        s0, c0 = cpu_seconds(service), cpu_seconds(a.proc.pid)
        time.sleep(1.0)
        used_service = cpu_seconds(service) - s0
        used_client = cpu_seconds(a.proc.pid) - c0
        assert used_service < IDLE_BUDGET, f"{label}: the service used {used_service:.2f}s"
        assert used_client < IDLE_BUDGET, f"{label}: the client used {used_client:.2f}s"
    assert b("post") == "ok"
    assert a.answer() == "ok"
    assert a(f"unlink {sem_name}") == "ok"


@pytest.mark.parametrize("case", ["ops", "handoff", "eintr", "cancel"])
def test_c_program_under_preload_on_the_rings(preload: Path, semtest: Path,
                                              sl_service: EmbeddedService, sem_name: str,
                                              case: str) -> None:
    """The preload library's own C tests (every operation, a hand-off across fork, EINTR
    with the unit accounting, pthread_cancel of a waiter) with the session on the rings:
    the spinning caller, the doorbell and the fork child's own rings behave as the
    socket does."""
    env = {**os.environ, **sl_service.env(), "ESEM_PUBKEY": sl_service.pubkey.hex(),
           "LD_PRELOAD": str(preload), **SWITCHLESS}
    r = subprocess.run([str(semtest), case, sem_name], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "using socket mode" not in r.stderr  # it really ran on the rings
