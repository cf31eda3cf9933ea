"""``VaultClient``: the vault's Python client, over TLS pinned to the server's certificate.

One client is one TLS connection and one login. It connects on first use, checks that
the server presents exactly the pinned certificate (the file given, or the vault
directory's ``cert.pem``), logs in, and then sends one request at a time (a lock makes
it safe to share between threads, which then take turns; give each thread its own
client for concurrency). Errors arrive as the ``VaultError`` subclasses of
``esem.vault.errors``: ``AuthFailed``, ``NotFound``, ``TooLarge``, ``NoSlot``,
``DiskFull``, ``Corrupt``, ``VaultUnavailable`` (no server, or the connection broke),
``CertificateMismatch``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from esem.vault import tls
from esem.vault.errors import (
    CertificateMismatch,
    ProtocolViolation,
    TooLarge,
    VaultError,
    VaultUnavailable,
    error_for,
)
from esem.vault.limits import (
    CONNECT_TIMEOUT_S,
    IO_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_LISTING_BYTES,
    MAX_UPLOAD_BYTES,
)
from esem.vault.server import read_endpoint
from esem.vault.wire import Closed, Header, check_name, read_frame, write_frame


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int  # bytes
    created: float  # seconds since the epoch


class VaultClient:
    """A logged-in connection to a vault server on 127.0.0.1."""

    def __init__(self, user: str, password: str, *, port: int, cert_pem: bytes,
                 host: str = tls.HOST, connect_timeout: float = CONNECT_TIMEOUT_S,
                 io_timeout: float = IO_TIMEOUT_S) -> None:
        if not 0 < port <= 65535:
            raise ValueError(f"port {port} is not a TCP port")
        self.user = user
        self._password = password
        self.host = host
        self.port = port
        self._cert_pem = cert_pem
        self._fingerprint = tls.fingerprint(cert_pem)
        self._ctx = tls.client_context(cert_pem)
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._lock = threading.Lock()
        self._sock: ssl.SSLSocket | None = None
        self.requests = 0

    @classmethod
    def for_directory(cls, directory: str | os.PathLike[str], user: str, password: str, *,
                      port: int | None = None, cert: str | os.PathLike[str] | None = None,
                      **kwargs: Any) -> VaultClient:
        """A client of the vault served from ``directory``: the certificate is
        ``DIR/cert.pem`` (or ``cert``), the port the one the server published (or
        ``port``)."""
        d = Path(directory)
        if port is None:
            port = int(read_endpoint(d)["port"])
        cert_path = Path(cert) if cert is not None else d / tls.CERT_NAME
        try:
            pem = cert_path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the vault certificate {cert_path}: "
                             f"{exc.strerror}") from None
        return cls(user, password, port=port, cert_pem=pem, **kwargs)

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "not connected"
        return f"<VaultClient {self.user}@{self.host}:{self.port} {state}>"

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        with self._lock:
            self._connect_locked()

    def _connect_locked(self) -> None:
        if self._sock is not None:
            return
        where = f"{self.host}:{self.port}"
        try:
            raw = socket.create_connection((self.host, self.port), self._connect_timeout)
        except OSError as exc:
            raise VaultUnavailable(f"no vault server answers at {where}: "
                                   f"{exc.strerror or exc}") from None
        try:
            sock = self._ctx.wrap_socket(raw, server_hostname=self.host)
            tls.check_pin(sock, self._fingerprint)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise CertificateMismatch(f"the server at {where} is not the pinned vault: "
                                      f"{exc.verify_message}") from None
        except CertificateMismatch:
            raw.close()
            raise
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise VaultUnavailable(f"TLS with {where} failed: {exc}") from None
        self._sock = sock
        try:
            self._exchange({"op": "auth", "user": self.user, "password": self._password})
        except BaseException:
            self._drop()
            raise

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> VaultClient:
        self.connect()
        return self

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------ requests

    def _exchange(self, header: Header, body: bytes = b"",
                  max_reply: int = MAX_BODY_BYTES) -> tuple[Header, bytes]:
        sock = self._sock
        assert sock is not None
        sock.settimeout(self._io_timeout)
        try:
            write_frame(sock, header, body)
            frame = read_frame(sock, max_reply)
        except (Closed, OSError) as exc:
            self._drop()
            raise VaultUnavailable(f"the connection to {self.host}:{self.port} broke: "
                                   f"{exc}") from None
        except VaultError as exc:  # BadRequest/TooLarge: the server is not speaking vault
            self._drop()
            raise ProtocolViolation(f"bad reply from the server: {exc}") from None
        if frame is None:
            self._drop()
            raise VaultUnavailable(f"the server at {self.host}:{self.port} closed the "
                                   "connection")
        reply, out = frame
        self.requests += 1
        if reply.get("ok") is True:
            return reply, out
        if reply.get("close"):
            self._drop()
        raise error_for(str(reply.get("error")), str(reply.get("message")))

    def _request(self, header: Header, body: bytes = b"",
                 max_reply: int = MAX_BODY_BYTES) -> tuple[Header, bytes]:
        with self._lock:
            self._connect_locked()
            return self._exchange(header, body, max_reply)

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` (replacing an older file of that name)."""
        check_name(name)
        if len(data) > MAX_UPLOAD_BYTES:
            raise TooLarge(f"{len(data)} bytes exceed the vault's limit of "
                           f"{MAX_UPLOAD_BYTES} bytes per file")
        self._request({"op": "put", "name": name}, bytes(data))

    def get(self, name: str) -> bytes:
        check_name(name)
        return self._request({"op": "get", "name": name})[1]

    def ls(self) -> list[FileInfo]:
        _, body = self._request({"op": "ls"}, max_reply=MAX_LISTING_BYTES)
        try:
            return [FileInfo(str(e["name"]), int(e["size"]), float(e["created"]))
                    for e in json.loads(body)]
        except (ValueError, TypeError, KeyError) as exc:
            raise ProtocolViolation(f"bad listing from the server: {exc!r}") from None

    def rm(self, name: str) -> None:
        check_name(name)
        self._request({"op": "rm", "name": name})
