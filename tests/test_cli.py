"""The esem command line, against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from esem.api import O_CREAT, USE_ESEM, _current_umask, sem_open
from esem.client.blocking import Client
from esem.server.embedded import EmbeddedService


def esem(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "esem", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedService:
    with EmbeddedService(tmp_path_factory.mktemp("cli")) as service:
        yield service  # type: ignore[misc]


def test_help_explains_every_command() -> None:
    out = esem("--help").stdout
    for command in ("serve", "ls", "stat", "unlink", "demo", "bench"):
        assert command in out
    assert "exit status" in out


def test_ls_stat_unlink(svc: EmbeddedService) -> None:
    name = f"/cli-{uuid.uuid4().hex[:8]}"
    plain = f"/cli-{uuid.uuid4().hex[:8]}"
    client = Client(svc.socket_path)
    sem = sem_open(name, O_CREAT, 0o640, 3, flags=USE_ESEM, client=client,
                   key=b"k" * 16)
    sem.wait()
    other = sem_open(plain, O_CREAT, 0o640, 3, flags=USE_ESEM, client=client)
    other.wait()
    sock = ["--socket", str(svc.socket_path)]
    listing = json.loads(esem("ls", "--json", *sock).stdout)
    entry = next(e for e in listing if e["name"] == name)
    # Key-bound: LIST never proves the key, so only the public fields, even to root.
    assert entry["value"] is None and entry["handles"] is None and entry["key_bound"] is True
    assert entry["owner_uid"] == os.getuid()
    assert entry["mode"] == 0o640 & ~_current_umask()
    shown = next(e for e in listing if e["name"] == plain)
    assert shown["value"] == 2 and shown["handles"] == 1 and shown["key_bound"] is False
    human = esem("ls", *sock).stdout
    assert name in human and "KEY" in human
    info = json.loads(esem("stat", plain, "--json", *sock).stdout)
    assert info["holders"] == [[os.getpid(), 1]] and info["holders_total"] == 1
    assert info["waits"] == 1
    assert "holders" in esem("stat", plain, *sock).stdout
    hidden = json.loads(esem("stat", name, "--json", *sock).stdout)
    assert hidden["holders"] is None and hidden["value"] is None and hidden["key_bound"]
    assert "shown only with its key" in esem("stat", name, *sock).stdout
    refused = esem("unlink", name, *sock)  # key-bound: refused without the key
    assert refused.returncode == 1 and "key" in refused.stderr
    assert "refused UNLINK: EKEYREJECTED" in svc.log_path.read_text()  # within its budget
    assert esem("unlink", name, "--key-hex", (b"k" * 16).hex(), *sock).returncode == 0
    missing = esem("stat", name, *sock)
    assert missing.returncode == 1 and "no semaphore" in missing.stderr
    other.close()
    assert esem("unlink", plain, *sock).returncode == 0
    client.close()


def test_ls_and_stat_escape_hostile_names(svc: EmbeddedService) -> None:
    tag = uuid.uuid4().hex[:8]
    name = f"/cli-{tag}\nFORGED ROW\x1b[2J\x1b]0;title\x07\u202e"
    client = Client(svc.socket_path)
    sem = sem_open(name, O_CREAT, 0o644, 1, flags=USE_ESEM, client=client)
    sock = ["--socket", str(svc.socket_path)]
    try:
        for out in (esem("ls", *sock).stdout, esem("stat", name, *sock).stdout):
            assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
            assert f"/cli-{tag}\\nFORGED ROW\\x1b[2J\\x1b]0;title\\x07\\u202e" in out
            assert not any(line.startswith("FORGED") for line in out.splitlines())
        # --json keeps the exact name (JSON escapes control characters itself).
        listing = json.loads(esem("ls", "--json", *sock).stdout)
        assert any(e["name"] == name for e in listing)
    finally:
        sem.close()
        esem("unlink", name, *sock)
        client.close()


def test_no_service_exit_code(tmp_path: Path) -> None:
    result = esem("ls", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 3
    assert "none.sock" in result.stderr


def test_bad_name_is_usage_error(svc: EmbeddedService) -> None:
    result = esem("unlink", "no-slash", "--socket", str(svc.socket_path))
    assert result.returncode == 2
    assert "must start with '/'" in result.stderr


def test_bench_micro_smoke(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    result = esem("bench", "micro", "-n", "20", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    cases = {(r["backend"], r["case"]) for r in report["results"]}
    for op in ("open", "close", "unlink", "post", "wait", "trywait", "getvalue", "handoff"):
        assert ("esem", op) in cases and ("legacy", op) in cases
    assert ("floor", "uds-roundtrip") in cases
    assert all(r["value"] > 0 for r in report["results"])
    assert "esem/legacy" in result.stdout


def test_attack_cli_json_and_exit_status() -> None:
    result = esem("attack", "--only", "a1", "--quick", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {"attack", "backend", "outcome", "evidence"} <= set(rows[0])
    assert {r["backend"]: r["outcome"] for r in rows} == {"legacy": "broken",
                                                          "esem": "defended"}
    assert "running A1" in result.stderr  # progress
    unknown = esem("attack", "--only", "A9")
    assert unknown.returncode == 2 and "unknown attack" in unknown.stderr
