"""A raw esem client for service tests: the protocol's own session objects over a real
Unix socket, so a test can drop a connection, resume, or send what no library would."""

from __future__ import annotations

import dataclasses
import os
import select
import socket
from pathlib import Path

from esem.core.status import Status
from esem.core.table import WaitMode
from esem.protocol.constants import Opcode, OpenFlag
from esem.protocol.frames import encode_frame
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession


class Raw:
    def __init__(self, socket_path: Path, pubkey: bytes) -> None:
        self.path, self.pubkey = socket_path, pubkey
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self.session = ClientSession(pubkey)
        self.replies: list[Reply] = []
        self.sock.sendall(self.session.start())
        while not self.session.established:
            self._read(5.0)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("service closed the connection")
        self.replies += self.session.receive_data(data)
        return True

    def send(self, req: Request, key: bytes | None = None) -> int:
        if req.req_id == 0:
            req = dataclasses.replace(req, req_id=self.session.next_request_id())
        self.sock.sendall(self.session.send_request(req, key=key))
        return req.req_id

    def reply(self, req_id: int, timeout: float = 5.0) -> Reply:
        while True:
            for r in self.replies:
                if r.req_id == req_id:
                    self.replies.remove(r)
                    return r
            if not self._read(timeout):
                raise TimeoutError(f"no reply to {req_id}")

    def call(self, req: Request, key: bytes | None = None) -> Reply:
        return self.reply(self.send(req, key))

    def quiet(self, timeout: float = 0.3) -> list[Reply]:
        """Whatever arrives within ``timeout``."""
        while self._read(timeout):
            pass
        out, self.replies = self.replies, []
        return out

    def open(self, name: str, value: int = 0, robust: bool = False) -> bytes:
        flags = OpenFlag.CREAT | (OpenFlag.ROBUST if robust else OpenFlag.NONE)
        r = self.call(Request(Opcode.OPEN, 0, name=name, oflag=flags, mode=0o600, value=value))
        assert r.status is Status.OK, r
        return r.handle

    def wait(self, handle: bytes) -> int:
        return self.send(Request(Opcode.WAIT, 0, handle=handle, wait_mode=WaitMode.BLOCK))

    def drop(self) -> None:
        """Lose the connection (as a crash of the link would: no END)."""
        self.sock.close()

    def resume(self, old: Raw) -> Reply:
        """Send RESUME for ``old``'s session on this fresh connection; its reply."""
        self.sock.sendall(self.session.resume(old.session))
        assert self.session._resuming is not None
        return self.reply(self.session._resuming.req_id)

    def garbage(self) -> None:
        self.sock.sendall(encode_frame(os.urandom(40)))
