"""``esem vault ...`` as a user runs it: real processes, real TLS, exit statuses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.server.embedded import EmbeddedService
from esem.vault.server import ENDPOINT_NAME, read_endpoint

PASSWORD = "correct horse battery"


def esem(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "esem", *args], input=stdin,
                          capture_output=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture
def served(tmp_path: Path, service: EmbeddedService) -> Iterator[Path]:
    """``esem vault serve --sync esem`` on a fresh directory with user alice."""
    d = tmp_path / "vault"
    added = esem("vault", "adduser", "--dir", str(d), "alice", stdin=PASSWORD.encode() + b"\n")
    assert added.returncode == 0, added.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "esem", "vault", "serve", "--dir", str(d), "--port", "0",
         "--sync", "esem", "--socket", str(service.socket_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (d / ENDPOINT_NAME).exists():
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "vault server did not start"
            time.sleep(0.02)
        yield d
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"stopped" in err and not (d / ENDPOINT_NAME).exists()


def client_env() -> dict[str, str]:
    return {"ESEM_VAULT_USER": "alice", "ESEM_VAULT_PASSWORD": PASSWORD}


def test_put_get_ls_rm(served: Path) -> None:
    d, env = str(served), client_env()
    data = os.urandom(70_000)
    put = esem("vault", "put", "--dir", d, "photos/cat.jpg", stdin=data, env=env)
    assert put.returncode == 0, put.stderr
    got = esem("vault", "get", "--dir", d, "photos/cat.jpg", env=env)
    assert got.returncode == 0 and got.stdout == data
    listing = esem("vault", "ls", "--dir", d, env=env)
    assert b"photos/cat.jpg" in listing.stdout and b"70000" in listing.stdout
    js = esem("vault", "ls", "--dir", d, "--json", env=env)
    assert b'"size": 70000' in js.stdout
    assert esem("vault", "rm", "--dir", d, "photos/cat.jpg", env=env).returncode == 0
    assert b"(no files)" in esem("vault", "ls", "--dir", d, env=env).stdout


def test_password_file_and_refusals(served: Path, tmp_path: Path) -> None:
    d = str(served)
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    ok = esem("vault", "ls", "--dir", d, "--user", "alice", "--password-file", str(pw))
    assert ok.returncode == 0, ok.stderr
    wrong = esem("vault", "ls", "--dir", d, env={**client_env(), "ESEM_VAULT_PASSWORD": "x"})
    assert wrong.returncode == 1 and b"authentication failed" in wrong.stderr
    missing = esem("vault", "get", "--dir", d, "nothing", env=client_env())
    assert missing.returncode == 1 and b"no file named 'nothing'" in missing.stderr
    second = esem("vault", "serve", "--dir", d, "--port", "0", "--sync", "legacy")
    assert second.returncode == 3 and b"already serving" in second.stderr
    assert read_endpoint(served)["sync"] == "esem"  # the first server is unaffected
    assert esem("vault", "ls", "--dir", d, env=client_env()).returncode == 0


def test_usage_errors_and_no_server(tmp_path: Path) -> None:
    none = esem("vault", "ls", "--dir", str(tmp_path), env=client_env())
    assert none.returncode == 3 and b"no vault server is running" in none.stderr
    nodir = esem("vault", "ls", env={**client_env(), "ESEM_VAULT_DIR": ""})
    assert nodir.returncode == 2 and b"--dir" in nodir.stderr
    short = esem("vault", "adduser", "--dir", str(tmp_path / "v"), "bob", stdin=b"short\n")
    assert short.returncode == 2 and b"at least 8" in short.stderr
    bad_sync = esem("vault", "serve", "--dir", str(tmp_path), "--sync", "futex")
    assert bad_sync.returncode == 2 and b"invalid choice" in bad_sync.stderr


def test_help_explains() -> None:
    top = esem("--help").stdout.decode()
    assert "vault" in top and "demo" in top
    vault = esem("vault", "--help").stdout.decode()
    for word in ("serve", "adduser", "put", "get", "ls", "rm", "exit status",
                 "ESEM_VAULT_PASSWORD"):
        assert word in vault
    serve = esem("vault", "serve", "--help").stdout.decode()
    assert "--sync" in serve and "legacy" in serve
    assert esem("vault").returncode == 2  # no subcommand: help, usage status
