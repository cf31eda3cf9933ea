"""The vault server: TLS on 127.0.0.1, one thread per connection, one login each.

``VaultServer(directory, port=..., sync="legacy"|"esem")`` prepares its directory on
first start (certificate, master key, empty file tree), sweeps what an interrupted run
left (temporary files, orphan blobs), creates its two semaphores, listens, and publishes
``endpoint.json`` (address, certificate fingerprint, semaphore names): that file appearing
is the readiness signal. A lock file keeps a second server off the same directory.

A connection must authenticate first (``auth``: scrypt, see ``users``); a failed or
missing login gets one error reply and the connection is closed. Every later request on
it runs as that user: the TLS channel authenticates it. Malformed frames, oversized
uploads and silent peers (``IO_TIMEOUT_S``) get one error reply (where the stream allows)
and are closed; a client that hangs up inside a request has stored nothing, because a
put is acted on only once its whole body has arrived. No failure of one connection
reaches another.

``stop()`` (or SIGTERM/SIGINT under ``esem vault serve``) stops accepting, closes the open
connections, waits for their threads, unlinks the semaphores and writes ``stats.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import socketserver
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Any

from esem.api import SemaphoreHandle
from esem.errors import EsemError
from esem.vault import tls, users
from esem.vault.engine import MASTER_KEY_BYTES, SealingEngine
from esem.vault.errors import (
    BadRequest,
    DiskFull,
    NotAuthenticated,
    TooLarge,
    VaultError,
    VaultUnavailable,
)
from esem.vault.limits import (
    DEFAULT_PORT,
    ENGINE_WORK_S,
    HANDSHAKE_TIMEOUT_S,
    IO_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_UPLOAD_BYTES,
    TREE_WINDOW_S,
)
from esem.vault.storage import atomic_write
from esem.vault.store import Vault
from esem.vault.sync import SYNCS, SemNames, Sync, close_semaphores, open_semaphores, semaphore_key
from esem.vault.wire import Closed, Header, read_frame, str_field, write_frame

log = logging.getLogger("esem.vault")

ENDPOINT_NAME = "endpoint.json"
MASTER_KEY_NAME = "master.key"
LOCK_NAME = "lock"
STATS_NAME = "stats.json"
STOP_JOIN_S = 10.0  # how long stop() waits for connection threads to finish


class StartupError(Exception):
    """The server could not start; the message says why and what to do."""


def _check_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_mode & 0o022:
        raise StartupError(f"{directory} is writable by others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); the vault keeps its keys there")


def load_master_key(directory: Path) -> bytes:
    path = directory / MASTER_KEY_NAME
    if not path.exists():
        tls.write_private(path, os.urandom(MASTER_KEY_BYTES))
    st = path.stat()
    if st.st_mode & 0o077:
        raise StartupError(f"{path} is accessible by others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    key = path.read_bytes()
    if len(key) != MASTER_KEY_BYTES:
        raise StartupError(f"{path} is not a {MASTER_KEY_BYTES}-byte key")
    return key


def read_endpoint(directory: Path) -> dict[str, Any]:
    """What a running server published about itself: ``VaultUnavailable`` if nothing,
    ``ValueError`` if something unreadable."""
    path = Path(directory) / ENDPOINT_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise VaultUnavailable(f"no vault server is running on {directory} (no {ENDPOINT_NAME}); "
                         "start one with: esem vault serve --dir DIR") from None
    except ValueError as exc:
        raise ValueError(f"{path} does not parse: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("port"), int):
        raise ValueError(f"{path} is not a vault endpoint file")
    return doc


class _Listener(socketserver.TCPServer):
    """Accepts on 127.0.0.1 and hands each connection to a thread of its own."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, owner: VaultServer, address: tuple[str, int]) -> None:
        self.owner = owner
        super().__init__(address, socketserver.BaseRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._spawn(request)


class VaultServer:
    def __init__(self, directory: str | os.PathLike[str], *, port: int = DEFAULT_PORT,
                 sync: Sync = "esem", engine_work_s: float = ENGINE_WORK_S,
                 tree_window_s: float = TREE_WINDOW_S) -> None:
        if sync not in SYNCS:
            raise ValueError(f"sync must be one of {', '.join(SYNCS)}, not {sync!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port (0..65535; 0 picks a free one)")
        self.directory = Path(directory)
        self.requested_port = port
        self.sync = sync
        self.engine_work_s = engine_work_s
        self.tree_window_s = tree_window_s
        self.port = 0
        self.fingerprint = ""
        self.names: SemNames | None = None
        self.vault: Vault | None = None
        self._lock_fd: int | None = None
        self._ctx: ssl.SSLContext | None = None
        self._listener: _Listener | None = None
        self._accept_thread: threading.Thread | None = None
        self._sems: tuple[SemaphoreHandle, SemaphoreHandle] | None = None
        self._conn_lock = threading.Lock()
        # connection thread -> its socket (the TLS one once the handshake is done)
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._refused_connections = 0
        self._stopped = threading.Event()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() or not self.port else f"port {self.port}"
        return f"<VaultServer {self.directory} sync={self.sync} {state}>"

    # ------------------------------------------------------------ lifecycle

    def start(self) -> VaultServer:
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise
        return self

    def _start(self) -> None:
        _check_private_dir(self.directory)
        self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StartupError(f"another vault server is already serving {self.directory}"
                               ) from None
        (self.directory / ENDPOINT_NAME).unlink(missing_ok=True)
        try:
            cert, key = tls.ensure_certificate(self.directory)
            master = load_master_key(self.directory)
            engine = SealingEngine(master, work_s=self.engine_work_s)
            self.fingerprint = tls.fingerprint(cert.read_bytes())
            self._ctx = tls.server_context(cert, key)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot prepare {self.directory}: {exc}") from exc
        self.names = SemNames.fresh()
        try:
            self._sems = open_semaphores(self.sync, self.names, semaphore_key(master))
        except EsemError as exc:
            raise StartupError(f"cannot create the vault's {self.sync} semaphores: {exc}"
                               + ("; is an esem service running (esem serve)? Or use "
                                  "--sync legacy" if self.sync == "esem" else "")) from exc
        self.vault = Vault(self.directory, engine, *self._sems,
                           tree_window_s=self.tree_window_s)
        try:
            self.vault.tree.create_if_missing()
            temps, orphans = self.vault.tree.sweep()
        except (OSError, VaultError) as exc:
            raise StartupError(f"the vault in {self.directory} is not usable: {exc}") from exc
        if temps or orphans:
            log.warning("removed %d temporary files and %d orphan blobs of an interrupted "
                        "run", temps, orphans)
        if not users.user_names(self.directory):
            log.warning("no users yet: add one with esem vault adduser --dir %s NAME",
                        self.directory)
        try:
            self._listener = _Listener(self, (tls.HOST, self.requested_port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {tls.HOST}:{self.requested_port}: "
                               f"{exc.strerror}") from exc
        self.port = self._listener.server_address[1]
        self._accept_thread = threading.Thread(target=self._listener.serve_forever,
                                               kwargs={"poll_interval": 0.1},
                                               name="vault-accept", daemon=True)
        self._accept_thread.start()
        atomic_write(self.directory / ENDPOINT_NAME, json.dumps({
            "host": tls.HOST, "port": self.port, "pid": os.getpid(),
            "fingerprint": self.fingerprint, "sync": self.sync,
            "semaphores": {"service": self.names.service, "filetree": self.names.filetree},
            "started": time.time(),
        }, indent=1).encode(), mode=0o644)
        log.info("vault %s serving on %s:%d (sync=%s, semaphores %s %s)", self.directory,
                 tls.HOST, self.port, self.sync, self.names.service, self.names.filetree)

    def stop(self) -> dict[str, Any]:
        """Stop and clean up; returns the final statistics (also in stats.json)."""
        if self._stopped.is_set():
            return self.statistics()
        self._stopped.set()
        stats = self._teardown()
        log.info("vault %s stopped: %s", self.directory, json.dumps(stats))
        return stats

    def _teardown(self) -> dict[str, Any]:
        self._stopped.set()
        if self._listener is not None:
            if self._accept_thread is not None:
                self._listener.shutdown()
            self._listener.server_close()
        with self._conn_lock:
            conns = dict(self._conns)
        for sock in conns.values():  # wake every connection thread out of its read
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also for a TLS socket: it acts on the fd
                # and leaves the TLS object to the thread that owns it.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_JOIN_S
        for thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))
        stats = self.statistics()
        if self._sems is not None:
            close_semaphores(*self._sems)
            self._sems = None
        if self._lock_fd is not None:  # only the server holding the lock owns these files
            if self.vault is not None:
                with contextlib.suppress(OSError, DiskFull):
                    atomic_write(self.directory / STATS_NAME, json.dumps(stats).encode(),
                                 mode=0o644)
            (self.directory / ENDPOINT_NAME).unlink(missing_ok=True)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        return stats

    def statistics(self) -> dict[str, Any]:
        with self._conn_lock:
            open_now = len(self._conns)
        base: dict[str, Any] = {"sync": self.sync, "port": self.port, "connections": open_now,
                                "refused_connections": self._refused_connections}
        if self.vault is not None:
            base.update(self.vault.statistics())
        return base

    def __enter__(self) -> VaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ connections

    def _spawn(self, sock: socket.socket) -> None:
        with self._conn_lock:
            if len(self._conns) >= MAX_CONNECTIONS or self._stopped.is_set():
                self._refused_connections += 1
                refuse = True
            else:
                refuse = False
                thread = threading.Thread(target=self._connection, args=(sock,),
                                          name="vault-conn", daemon=True)
                self._conns[thread] = sock
        if refuse:
            log.warning("refused a connection: %d open (MAX_CONNECTIONS)", MAX_CONNECTIONS)
            sock.close()
            return
        thread.start()

    def _connection(self, raw: socket.socket) -> None:
        me = threading.current_thread()
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT_S)
            assert self._ctx is not None
            try:
                conn = self._ctx.wrap_socket(raw, server_side=True)  # takes over the fd
            except (OSError, ssl.SSLError) as exc:
                log.info("TLS handshake failed: %s", exc)
                return
            with conn:
                with self._conn_lock:
                    self._conns[me] = conn
                if not self._stopped.is_set():  # else stop() may have looked before the swap
                    self._serve(conn)
        finally:
            with self._conn_lock:
                self._conns.pop(me, None)
            raw.close()

    def _serve(self, conn: ssl.SSLSocket) -> None:
        user: str | None = None
        while True:
            conn.settimeout(IO_TIMEOUT_S if user else HANDSHAKE_TIMEOUT_S)
            try:
                frame = read_frame(conn, MAX_UPLOAD_BYTES)
            except (BadRequest, TooLarge) as exc:
                # The stream is out of step (an unread body, a broken header): answer once
                # and close.
                self._reply_error(conn, exc, close=True)
                return
            except Closed as exc:
                if exc.partial:
                    log.info("client of %s hung up inside a request: nothing stored",
                             user or "(no login)")
                return
            except (OSError, ssl.SSLError):  # timeout, reset, or stop()
                return
            if frame is None:
                return
            header, body = frame
            close = False
            try:
                if user is None:
                    user = self._login(header)
                    reply, out = {"ok": True, "user": user}, b""
                else:
                    reply, out = self._dispatch(user, header, body)
            except VaultError as exc:
                close = user is None  # one login attempt per connection
                reply, out = self._error(exc, close), b""
            except Exception as exc:  # a bug or an I/O error: report it, keep serving others
                log.exception("request %r of %s failed", header.get("op"), user)
                close = True
                reply, out = self._error(VaultError(f"internal error: {exc}"), close), b""
            try:
                write_frame(conn, reply, out)
            except OSError:  # the client is gone
                return
            if close:
                return

    def _login(self, header: Header) -> str:
        if header.get("op") != "auth":
            raise NotAuthenticated("log in first: the first request must be auth")
        try:
            user = users.authenticate(self.directory, header.get("user"),
                                      header.get("password"))
        except VaultError:
            log.warning("failed login for %r", header.get("user"))
            raise
        except ValueError as exc:  # an unreadable users file
            log.error("%s", exc)
            raise VaultError("the server's users file is unreadable") from exc
        log.info("login %s", user)
        return user

    def _dispatch(self, user: str, header: Header, body: bytes) -> tuple[Header, bytes]:
        vault = self.vault
        assert vault is not None
        op = header.get("op")
        if op == "put":
            vault.put(user, str_field(header, "name"), body)
            return {"ok": True, "size": len(body)}, b""
        if op == "get":
            return {"ok": True}, vault.get(user, str_field(header, "name"))
        if op == "ls":
            return {"ok": True}, json.dumps(vault.ls(user)).encode()
        if op == "rm":
            vault.rm(user, str_field(header, "name"))
            return {"ok": True}, b""
        if op == "auth":
            raise BadRequest("already logged in on this connection")
        raise BadRequest(f"unknown request {op!r}")

    @staticmethod
    def _error(exc: VaultError, close: bool) -> Header:
        return {"ok": False, "error": str(exc.code), "message": str(exc), "close": close}

    def _reply_error(self, conn: ssl.SSLSocket, exc: VaultError, *, close: bool) -> None:
        with contextlib.suppress(OSError):
            write_frame(conn, self._error(exc, close))
