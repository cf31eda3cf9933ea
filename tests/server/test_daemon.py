"""The daemon's start-up and shutdown contract, on real processes and real sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esem.client.blocking import Client
from esem.errors import QuotaExceeded, ServiceUnavailable
from esem.paths import KEY_NAME, pubkey_path
from esem.protocol.crypto import public_key_of
from esem.server.embedded import EmbeddedService


def _serve(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "esem", "serve", "--dir", str(directory), *extra],
        capture_output=True, text=True, timeout=30,
    )


def test_creates_key_0600_and_publishes_public_key(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path) as svc:
        key_file = tmp_path / KEY_NAME
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert svc.pubkey == public_key_of(key_file.read_bytes())
        assert pubkey_path(svc.socket_path).exists()
    # The key survives restarts: clients that pinned it keep working.
    first = (tmp_path / KEY_NAME).read_bytes()
    with EmbeddedService(tmp_path) as svc:
        assert (tmp_path / KEY_NAME).read_bytes() == first
        assert svc.pubkey == public_key_of(first)


def test_refuses_key_readable_by_others(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path):
        pass
    os.chmod(tmp_path / KEY_NAME, 0o644)
    result = _serve(tmp_path)
    assert result.returncode == 3
    assert "readable by others" in result.stderr


def test_refuses_second_live_instance(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path) as svc:
        result = _serve(tmp_path, "--socket", str(svc.socket_path))
        assert result.returncode == 3
        assert "another esem service is live" in result.stderr
        Client(svc.socket_path).connect()  # the first one is untouched


def test_removes_stale_socket(tmp_path: Path) -> None:
    stale = tmp_path / "esem.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # bound, never listening: a leftover of a crashed service
    with EmbeddedService(tmp_path) as svc:
        c = Client(svc.socket_path)
        c.connect()
        c.close()


def test_refuses_non_socket_at_socket_path(tmp_path: Path) -> None:
    (tmp_path / "esem.sock").write_text("not a socket")
    result = _serve(tmp_path)
    assert result.returncode == 3
    assert "not a socket" in result.stderr
    assert (tmp_path / "esem.sock").read_text() == "not a socket"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exits_cleanly_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    svc = EmbeddedService(tmp_path).start()
    assert svc.proc is not None
    client = Client(svc.socket_path)
    client.connect()
    svc.proc.send_signal(sig)
    assert svc.proc.wait(10) == 0
    assert not svc.socket_path.exists()
    log = svc.log_path.read_text()
    assert "session 1 start" in log and "stopping" in log
    client.close()


def test_client_without_service_is_unavailable(tmp_path: Path) -> None:
    client = Client(tmp_path / "nothing.sock")
    with pytest.raises(ServiceUnavailable, match=r"nothing\.sock"):
        client.connect()
    assert list(tmp_path.iterdir()) == []  # and it did not start one


def test_session_quota_refuses_with_clear_error(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path, ["--quota-sessions", "2"]) as svc:
        a, b = Client(svc.socket_path), Client(svc.socket_path)
        a.connect()
        b.connect()
        with pytest.raises(QuotaExceeded, match="sessions"):
            Client(svc.socket_path).connect()
        a.close()
        deadline = time.monotonic() + 5
        while True:  # the service notices a's end asynchronously
            try:
                Client(svc.socket_path).connect()
                break
            except QuotaExceeded:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert "refused connection" in svc.log_path.read_text()


def test_refusal_reaches_a_client_whose_hello_comes_late(tmp_path: Path) -> None:
    """The service writes its refusal at once; a client that sends HELLO only after that
    must still read the reason, not a reset connection."""
    from esem.protocol.session import ClientSession

    with EmbeddedService(tmp_path, ["--quota-sessions", "1"]) as svc:
        holder = Client(svc.socket_path)
        holder.connect()
        for _ in range(3):
            session = ClientSession(svc.pubkey)
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(5)
            raw.connect(str(svc.socket_path))
            time.sleep(0.2)  # the REFUSED frame is written by now
            raw.sendall(session.start())
            with pytest.raises(QuotaExceeded, match="sessions"):
                session.receive_data(raw.recv(4096))
            raw.close()
        holder.close()


def test_refuses_state_dir_of_another_uid_or_writable_by_others(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)  # nobody's: it could swap the key clients pin
    result = _serve(foreign)
    assert result.returncode == 3 and "belongs to uid 65534" in result.stderr
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    result = _serve(open_dir)
    assert result.returncode == 3 and "writable by others" in result.stderr
    assert not (open_dir / KEY_NAME).exists()
