"""Hardening (issue "Security round 2", item 13): the shipped systemd unit, started the
way its ``ExecStart`` says with systemd's readiness protocol, ``--user``, and a
non-dumpable service, on real processes.

There is no systemd in the test container: the test plays systemd's part. It creates
the unit's ``RuntimeDirectory``/``StateDirectory`` (in a temporary place instead of
``/run/esem`` and ``/var/lib/esem``, with the unit's modes), applies its ``UMask``,
binds the ``NOTIFY_SOCKET`` datagram socket, and runs ``ExecStart`` parsed from the
unit ``esem serve --print-systemd-unit`` prints; the only other substitution is
``--user esem`` -> ``--user nobody`` (there is no esem account here).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import esem
from esem.client.blocking import Client
from esem.paths import pubkey_path
from esem.server.unit import exec_start, service_settings, shipped_unit, systemd_unit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
NOBODY = 65534


@pytest.fixture
def base() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="esem-unit-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


def _printed_unit() -> str:
    out = subprocess.run([sys.executable, "-m", "esem", "serve", "--print-systemd-unit"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out == systemd_unit()
    return out


def test_printed_unit_runs_this_installation_and_has_the_hardening() -> None:
    unit = _printed_unit()
    assert exec_start(unit)[:3] == [sys.executable, "-m", "esem"]
    assert exec_start(shipped_unit())[0] == "/usr/local/bin/esem"
    s = {k: v[-1] for k, v in service_settings(unit).items()}
    assert s["Type"] == "notify" and s["RuntimeDirectory"] == "esem"
    assert "--user" in exec_start(unit) and "/run/esem/esem.sock" in exec_start(unit)
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "MemoryDenyWriteExecute"):
        assert s[key] == "yes", key
    assert s["ProtectSystem"] == "strict" and s["RestrictAddressFamilies"] == "AF_UNIX"
    assert service_settings(unit)["SystemCallFilter"][0] == "@system-service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(base: Path) -> None:
    path = base / "esem.service"
    path.write_text(_printed_unit())
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "esem.service" not in result.stderr, result.stderr  # no warning about it


def _as_the_unit_says(base: Path) -> tuple[list[str], Path, Path, int]:
    unit = _printed_unit()
    settings = {k: v[-1] for k, v in service_settings(unit).items()}
    run_dir, state_dir = base / "run" / "esem", base / "lib" / "esem"
    for d, mode in ((run_dir, settings["RuntimeDirectoryMode"]),
                    (state_dir, settings["StateDirectoryMode"])):
        d.mkdir(parents=True)
        os.chmod(d.parent, 0o755)
        os.chmod(d, int(mode, 8))
    argv = [a.replace("/run/esem", str(run_dir)).replace("/var/lib/esem", str(state_dir))
            for a in exec_start(unit)]
    argv[argv.index("--user") + 1] = "nobody"
    return argv, run_dir / "esem.sock", state_dir, int(settings["UMask"], 8)


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


def _nobody_can_open_mem(pid: int) -> str:
    """Whether a process of uid nobody (the service's own uid after --user) can read the
    service's memory, as a debugger or a memory scraper would."""
    child = os.fork()
    if child == 0:
        code = 2
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            try:
                os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
                code = 0
            except PermissionError:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return {0: "opened", 1: "refused"}.get(os.waitstatus_to_exitcode(status), "error")


def test_started_as_the_unit_says(base: Path) -> None:
    argv, sock_path, state_dir, umask = _as_the_unit_says(base)
    notify_path = base / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    env.pop("ESEM_SOCKET", None)
    proc = subprocess.Popen(argv, env=env, umask=umask, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        message = notify.recv(4096).decode()
        # READY=1 comes once the socket listens and the service is nobody for good.
        assert "READY=1" in message.splitlines(), message
        assert f"MAINPID={proc.pid}" in message.splitlines()
        assert _uids(proc.pid) == [NOBODY] * 4
        groups = [ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                  if ln.startswith("Groups:")]
        assert [g.split() for g in groups] == [["Groups:"]]  # no supplementary groups
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(sock_path))
        # Non-dumpable: its /proc files belong to root, and its own uid cannot read it.
        assert os.stat(f"/proc/{proc.pid}/mem").st_uid == 0
        assert _nobody_can_open_mem(proc.pid) == "refused"
        # The key is root's, 0600, in the root-owned state directory; it was read
        # before the drop and nobody cannot read it now.
        key = state_dir / "service.key"
        assert key.stat().st_uid == 0 and key.stat().st_mode & 0o777 == 0o600
        assert os.stat(state_dir).st_mode & 0o777 == 0o700
        # A client uses it (pinning the key it published).
        client = Client(sock_path)
        name = f"/esem-unit-{os.getpid()}"
        sem = esem.sem_open(name, esem.O_CREAT, 0o600, 1, flags=esem.USE_ESEM, client=client)
        sem.wait()
        sem.post()
        assert sem.getvalue() == 1
        sem.close()
        esem.sem_unlink(name, flags=esem.USE_ESEM, client=client)
        client.close()
        assert pubkey_path(sock_path).stat().st_uid == 0
        proc.terminate()
        assert proc.wait(15) == 0
        assert "STOPPING=1" in notify.recv(4096).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert "running as user nobody (uid 65534" in log, log


def _become_ordinary_nobody() -> None:
    """In a fork: become nobody as a program exec'd by nobody would be. The kernel makes
    a process that changed its uid non-dumpable (fs.suid_dumpable is 0 here), and an
    exec by nobody would make it dumpable again; there is no exec here (see below), so
    the flag is set back by hand."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(4, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) == 0  # PR_SET_DUMPABLE 1


def _wait_for(pid: int, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 15
    while not ready():
        assert time.monotonic() < deadline, "the child did not get ready"
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child died"
        time.sleep(0.02)


def _control_mem_owner(base: Path) -> int:
    """The owner of /proc/PID/mem of an ordinary (dumpable) process of nobody: shows
    that the owner seen for the service is the service's doing."""
    flag = base / "control-ready"
    pid = os.fork()
    if pid == 0:
        try:
            _become_ordinary_nobody()
            os.close(os.open(flag, os.O_CREAT | os.O_WRONLY, 0o644))
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        _wait_for(pid, flag.exists)
        return os.stat(f"/proc/{pid}/mem").st_uid
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_non_dumpable_without_user(base: Path) -> None:
    """A service run as an ordinary user from the start (no --user) is non-dumpable
    too. It runs in a fork that became nobody (the interpreter under /root is not
    executable by nobody in this container, so no exec)."""
    from esem.server.daemon import ServeConfig, serve

    os.chmod(base, 0o1777)  # nobody's control process leaves its flag here (sticky: allowed)
    assert _control_mem_owner(base) == NOBODY
    state = base / "nobody-state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    cfg = ServeConfig(state_dir=state, socket_path=state / "esem.sock")
    pid = os.fork()
    if pid == 0:
        try:
            _become_ordinary_nobody()
            serve(cfg)
        finally:
            os._exit(0)
    try:
        _wait_for(pid, pubkey_path(cfg.socket_path).exists)
        assert _uids(pid)[0] == NOBODY
        assert os.stat(f"/proc/{pid}/mem").st_uid == 0
        assert _nobody_can_open_mem(pid) == "refused"
    finally:
        os.kill(pid, 15)
        os.waitpid(pid, 0)


def test_user_that_does_not_exist_is_refused_before_anything_is_made(base: Path) -> None:
    state = base / "state"
    result = subprocess.run(
        [sys.executable, "-m", "esem", "serve", "--dir", str(state), "--user",
         "esem-no-such-user"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert "--user esem-no-such-user: no such user" in result.stderr
    assert not state.exists()


def test_user_switch_needs_root(base: Path) -> None:
    from esem.server.daemon import StartupError, resolve_user

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            try:
                resolve_user("root")
            except StartupError as exc:
                code = 0 if "only root can switch" in str(exc) else 3
            assert resolve_user("nobody").uid == NOBODY  # becoming oneself is fine
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


_PR_SET_MDWE, _PR_GET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_GET_MDWE, 0, 0, 0, 0)) >= 0


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel without PR_SET_MDWE (6.3+)")
def test_service_works_with_memory_deny_write_execute(base: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes; the kernel's own version of it
    (PR_SET_MDWE, inherited across exec) shows the service, switchless rings included,
    needs no writable-and-executable memory."""

    def deny_write_execute() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_MDWE, ctypes.c_ulong(_PR_MDWE_REFUSE_EXEC_GAIN), 0, 0, 0) != 0 \
                or libc.prctl(_PR_GET_MDWE, 0, 0, 0, 0) != _PR_MDWE_REFUSE_EXEC_GAIN:
            os._exit(99)

    svc_dir = base / "mdwe"
    proc = subprocess.Popen([sys.executable, "-m", "esem", "serve", "--dir", str(svc_dir),
                             "--switchless"], preexec_fn=deny_write_execute,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(proc.pid, pubkey_path(svc_dir / "esem.sock").exists)
        code = ("import esem; s = esem.sem_open('/esem-mdwe', esem.O_CREAT, 0o600, 1, "
                "flags=esem.USE_ESEM); s.wait(); s.post(); print(s.getvalue()); s.close(); "
                "esem.sem_unlink('/esem-mdwe', flags=esem.USE_ESEM)")
        env = {**os.environ, "ESEM_SOCKET": str(svc_dir / "esem.sock"),
               "ESEM_SWITCHLESS": "1"}
        env.pop("ESEM_PUBKEY", None)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert "switchless (rings" in log, log
