"""A peer that trickles bytes must not stretch the client's deadlines (availability).

The fake service below speaks the real protocol (a ServerSession with its own key, which
the client pins) over a real Unix socket, then dribbles its answers one byte at a time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.client.blocking import Client
from esem.errors import EsemError, ServiceUnavailable
from esem.protocol.constants import Opcode
from esem.protocol.crypto import generate_static_key, public_key_of
from esem.protocol.messages import Request
from esem.protocol.session import ServerSession

DRIBBLE_S = 0.1


def _dribble(conn: socket.socket, data: bytes, stop: threading.Event) -> None:
    for i in range(len(data)):
        if stop.wait(DRIBBLE_S):
            return
        try:
            conn.sendall(data[i : i + 1])
        except OSError:
            return


@pytest.fixture
def trickler(tmp_path: Path) -> Iterator[tuple[Path, bytes, list[str]]]:
    """A service at ``path`` that trickles either its WELCOME ('welcome' mode) or, after
    a prompt handshake, a never-ending frame ('reply' mode)."""
    path = tmp_path / "trickle.sock"
    private = generate_static_key()
    mode: list[str] = ["welcome"]
    stop = threading.Event()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            session = ServerSession(private)
            session.receive_data(conn.recv(4096))
            welcome = session.data_to_send()
            if mode[0] == "welcome":
                _dribble(conn, welcome, stop)
            else:
                conn.sendall(welcome)
                conn.recv(4096)  # the request
                _dribble(conn, (16384).to_bytes(4, "big") + b"\0" * 16384, stop)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, public_key_of(private), mode
    stop.set()
    thread.join(5)
    listener.close()


def test_trickled_handshake_is_bounded_by_connect_timeout(
        trickler: tuple[Path, bytes, list[str]]) -> None:
    path, pub, _ = trickler
    client = Client(path, pub, connect_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="did not answer"):
        client.connect()
    assert time.monotonic() - start < 2.0  # the WELCOME alone would take ~5 s


def test_trickled_reply_is_caught_by_the_keepalive(
        trickler: tuple[Path, bytes, list[str]]) -> None:
    path, pub, mode = trickler
    mode[0] = "reply"
    client = Client(path, pub, keepalive=0.3)
    start = time.monotonic()
    with pytest.raises(EsemError):
        client.call(Request(Opcode.PING, 0))
    # Two keepalive intervals without a decoded reply end it; byte by byte the frame
    # would take 16384 x 0.1 s.
    assert time.monotonic() - start < 3.0
