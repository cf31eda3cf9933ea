"""The operator's command line: version, exit codes, keys kept off the command line,
``esem ls`` in pipes and on terminals, service log levels. Against a real daemon, with
the real ``esem`` command in a subprocess (a real pipe, a real pseudo-terminal).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open
from esem.client.blocking import Client
from esem.server.embedded import EmbeddedService

KEY = bytes(range(100, 132))


def esem(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
         **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "esem", *args], capture_output=True,
                          text=True, timeout=120, input=stdin,
                          env={**os.environ, **(env or {})}, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    with EmbeddedService(tmp_path_factory.mktemp("ops")) as service:
        yield service


@pytest.fixture(scope="module")
def client(svc: EmbeddedService) -> Iterator[Client]:
    c = Client(svc.socket_path)
    yield c
    c.close()


def _name(tag: str = "") -> str:
    return f"/ops-{tag}{uuid.uuid4().hex[:8]}"


def _sessions_started(svc: EmbeddedService) -> int:
    return len(re.findall(r" session \d+ start ", svc.log_path.read_text()))


def test_version_is_the_package_version() -> None:
    result = esem("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"esem {version('esem')}"


@pytest.mark.parametrize("command", [
    ["stat"], ["stat", "--json"], ["unlink"], ["reclaim"], ["reclaim", "--json"]])
@pytest.mark.parametrize("bad", ["no-slash", "/two/slashes", "/", "/" + "x" * 252])
def test_bad_name_is_usage_error_before_anything_is_sent(
        svc: EmbeddedService, command: list[str], bad: str) -> None:
    before = _sessions_started(svc)
    result = esem(*command, bad, "--socket", str(svc.socket_path))
    assert result.returncode == 2, result
    assert "semaphore name" in result.stderr
    assert _sessions_started(svc) == before  # no session was even opened


def _key_bound(client: Client) -> str:
    name = _name("k")
    sem_open(name, O_CREAT | O_EXCL, 0o600, 1, flags=USE_ESEM, key=KEY, client=client)
    return name


def test_unlink_key_from_file(svc: EmbeddedService, client: Client, tmp_path: Path) -> None:
    name = _key_bound(client)
    path = tmp_path / "key"
    path.write_text(f"  {KEY.hex()[:20]}\n{KEY.hex()[20:]}  \n")  # whitespace ignored
    result = esem("unlink", name, "--key-file", str(path), "--socket", str(svc.socket_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_stat_of_a_key_bound_semaphore_with_its_key(
        svc: EmbeddedService, client: Client, tmp_path: Path) -> None:
    name = _name("statkey-")
    sem = sem_open(name, O_CREAT, 0o600, 3, flags=USE_ESEM, key=KEY, client=client)
    sem.trywait()
    sock = ["--socket", str(svc.socket_path)]
    without = json.loads(esem("stat", name, "--json", *sock).stdout)
    assert without["key_bound"] and without["value"] is None and without["holders"] is None
    (tmp_path / "k").write_text(KEY.hex() + "\n")
    result = esem("stat", name, "--json", "--key-file", str(tmp_path / "k"), *sock)
    assert result.returncode == 0, result.stderr
    full = json.loads(result.stdout)
    assert full["value"] == 2 and full["holders_total"] == 1
    wrong = esem("stat", name, "--key-env", "K", *sock, env={"K": bytes(32).hex()})
    assert wrong.returncode == 1 and wrong.stdout == ""  # refused: nothing shown
    human = esem("stat", name, *sock).stdout
    assert "shown only with its key" in human


def test_unlink_key_from_env(svc: EmbeddedService, client: Client) -> None:
    name = _key_bound(client)
    result = esem("unlink", name, "--key-env", "MY_KEY", "--socket", str(svc.socket_path),
                  env={"MY_KEY": KEY.hex()})
    assert result.returncode == 0, result.stderr


def test_unlink_key_from_stdin(svc: EmbeddedService, client: Client) -> None:
    name = _key_bound(client)
    result = esem("unlink", name, "--key-stdin", "--socket", str(svc.socket_path),
                  stdin=KEY.hex() + "\n")
    assert result.returncode == 0, result.stderr


def test_key_hex_still_works_but_warns(svc: EmbeddedService, client: Client) -> None:
    name = _key_bound(client)
    result = esem("unlink", name, "--key-hex", KEY.hex(), "--socket", str(svc.socket_path))
    assert result.returncode == 0
    assert "warning" in result.stderr and "ps" in result.stderr


@pytest.mark.parametrize("how", ["not-hex", "short", "missing-env", "missing-file"])
def test_bad_key_is_usage_error_before_anything_is_sent(
        svc: EmbeddedService, client: Client, tmp_path: Path, how: str) -> None:
    name = _key_bound(client)
    args = {
        "not-hex": ["--key-stdin"],
        "short": ["--key-stdin"],
        "missing-env": ["--key-env", "ESEM_TEST_NO_SUCH_VAR"],
        "missing-file": ["--key-file", str(tmp_path / "none")],
    }[how]
    # "short": 15 bytes, below the 16-byte minimum
    stdin = {"not-hex": "zz" * 16, "short": "ab" * 15}.get(how, "")
    for command in ("unlink", "reclaim"):
        before = _sessions_started(svc)
        result = esem(command, name, *args, "--socket", str(svc.socket_path), stdin=stdin)
        assert result.returncode == 2, (command, result)
        assert _sessions_started(svc) == before
    assert json.loads(esem("stat", name, "--json", "--socket", str(svc.socket_path)).stdout)


def test_key_options_are_exclusive(svc: EmbeddedService) -> None:
    result = esem("unlink", "/x", "--key-stdin", "--key-env", "A")
    assert result.returncode == 2 and "not allowed with" in result.stderr


def test_ls_into_a_closed_pipe_is_quiet(svc: EmbeddedService, client: Client) -> None:
    sem_open(_name(), O_CREAT, 0o600, 1, flags=USE_ESEM, client=client)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before esem writes a byte
    try:
        result = subprocess.run(
            [sys.executable, "-m", "esem", "ls", "--socket", str(svc.socket_path)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"
    assert result.returncode == 141


def test_ls_head_in_a_shell_pipe(svc: EmbeddedService, client: Client) -> None:
    for _ in range(3):
        sem_open(_name(), O_CREAT, 0o600, 1, flags=USE_ESEM, client=client)
    result = subprocess.run(
        f"'{sys.executable}' -m esem ls --socket '{svc.socket_path}' | head -1",
        shell=True, capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("NAME")
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr


def _on_a_terminal(*args: str) -> str:
    """``esem ARGS`` with its stdout on a real pseudo-terminal; what it printed."""
    master, slave = pty.openpty()
    # a terminal as wide as an operator's (a bare pty reports 0x0 and rich assumes 80
    # columns, too few for ls's columns beside a 40-character name)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "esem", *args], stdin=slave,
                                stdout=slave, stderr=subprocess.PIPE,
                                env={**os.environ, "COLUMNS": "200", "LINES": "50"})
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(60)
    finally:
        os.close(master)
    return b"".join(chunks).decode()


def test_ls_long_names_readable(svc: EmbeddedService, client: Client) -> None:
    long_name = "/ops-long-" + "x" * 150 + uuid.uuid4().hex[:8]
    sem_open(long_name, O_CREAT, 0o600, 1, flags=USE_ESEM, client=client)
    sock = ["--socket", str(svc.socket_path)]
    shown = _on_a_terminal("ls", *sock)
    row = next(line for line in shown.splitlines() if line.startswith("/ops-long-"))
    assert long_name not in row and "..." in row
    assert row.split()[0].endswith(long_name[-8:])  # the unique tail survives
    assert len(row.split()[0]) <= 40
    assert long_name in _on_a_terminal("ls", "--wide", *sock)
    assert long_name in esem("ls", *sock).stdout  # a pipe gets names whole
    assert any(e["name"] == long_name for e in json.loads(esem("ls", "--json", *sock).stdout))


def test_service_log_lines_carry_a_level(svc: EmbeddedService, client: Client) -> None:
    esem("stat", "/ops-absent", "--socket", str(svc.socket_path))  # a refusal: INFO line
    lines = [line for line in svc.log_path.read_text().splitlines() if " esem[" in line]
    assert lines
    levels = {line.split("] ", 1)[1].split(" ", 1)[0] for line in lines}
    assert levels <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, levels
    assert any(" INFO session " in line for line in lines)
