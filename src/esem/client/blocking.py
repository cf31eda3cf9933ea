"""The blocking client: one authenticated session per process, shared by its threads.

It is a thin shell over the sans-I/O ``ClientSession``. Requests are encrypted and sent
under one lock, so ids reach the wire in order. Replies are read by whichever waiting
thread holds the reader role (leader/follower): a thread blocked in a wait reads and
hands out the replies of every other thread, and passes the role on when its own reply
comes, so a blocked wait never delays another thread's post, and a lone thread pays no
hand-off to a reader thread.

A lost connection (the service restarted, or its socket was reset) is not a failure:
the thread that finds it lost (or the next one to read) reconnects with a backoff for up
to ``ESEM_RESUME_TIMEOUT``, pins the same key, and RESUMEs the session (PROTOCOL.md 16):
the service re-sends the replies it had already sent, the client re-sends, under their
ids, the requests it never executed, and callers see only latency. Requests made
meanwhile are kept and sent once the session is back.

Failure is sticky: once a frame fails authentication, or the session cannot be resumed,
every pending and later call on this session raises the same error, and nothing it
granted before is taken back. While requests are pending and the line is quiet, the reader sends
a keepalive PING, so a dropped frame surfaces as an ``IntegrityError`` (the next frame
fails its counter) or, if nothing at all arrives, as ``ServiceUnavailable``; never as a
hang. The client never starts a service.

A session belongs to the process that opened it: a forked child that wrote to it would
reuse the parent's nonces, and one that read from it would steal the parent's replies.
``os.register_at_fork`` lets go of inherited sessions at fork, but a C-level ``fork()``
(ctypes, native extensions) skips it, so every path that sends, reads or closes also
checks a ``ForkGuard`` first and, in a child, lets go of the session there, without a
byte sent or read.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import select
import signal
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from esem.client import resume
from esem.core.status import Status
from esem.errors import (
    EsemError,
    IntegrityError,
    ProtocolError,
    ServiceUnavailable,
    SignalError,
    error_for,
)
from esem.paths import is_default_location, read_pubkey, socket_path
from esem.protocol.constants import Opcode
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession

if TYPE_CHECKING:
    from esem._native_core import Session as NativeSession
    from esem.client.switchless import ClientRing

CONNECT_TIMEOUT = 5.0  # seconds for connect + handshake
KEEPALIVE_INTERVAL = 5.0  # seconds of silence with requests pending before a PING
RECV_BYTES = 65536
END_LINGER = 0.2  # seconds close() waits at most for END to leave (best effort)
# Milliseconds the watcher of an idle session sleeps in poll between looks at its client
# (it wakes at once on a hang-up, and close() hangs up): bounds how long the thread of a
# client dropped without close() lingers. Long, so that it seldom runs at all (a C-level
# fork made while it holds the GIL would leave the child without it).
WATCH_POLL_MS = 10_000


# madvise(2) MADV_WIPEONFORK (Linux 4.14): the kernel hands a fork child this page zeroed,
# however the fork was made. Python 3.11's mmap module has no name for it.
_MADV_WIPEONFORK = 18


class ForkGuard:
    """Tells the process that made it from any process forked from it, whether or not
    the fork ran ``os.register_at_fork`` handlers (a ctypes ``fork()`` does not).

    Two marks, both cheap to read: a byte in a page the kernel wipes in every fork child
    (MADV_WIPEONFORK; unlike the pid it cannot be fooled by a descendant that got a dead
    ancestor's pid), and the pid (for kernels without the flag, and for a vfork-style
    child that shares our memory)."""

    __slots__ = ("_page", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._page: mmap.mmap | None = None
        try:
            page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError:
            return
        try:
            page.madvise(_MADV_WIPEONFORK)
        except OSError:  # EINVAL: a kernel older than 4.14; the pid alone must do
            page.close()
            return
        page[0] = 1
        self._page = page

    def here(self) -> bool:
        """True in the process that made this guard, False in a forked child."""
        page = self._page
        return (page is None or page[0] == 1) and os.getpid() == self.pid


def pinned_key(sock: Path, explicit: bytes | str | None, *, default_location: bool) -> bytes:
    """The service key a client pins (``esem.paths.read_pubkey``), or
    ``ServiceUnavailable`` saying why there is none to pin. Every client (blocking,
    asyncio, anyio) reads it here."""
    try:
        return read_pubkey(sock, explicit, default_location=default_location)
    except (OSError, ValueError) as exc:
        raise ServiceUnavailable(
            f"no esem service at {sock} (cannot read its public key: {exc})") from exc


def recheck_key(sock: Path, explicit: bytes | str | None, *, default_location: bool,
                pinned: bytes | None) -> bytes | None:
    """Before a RESUME, every client (blocking, asyncio, anyio) reads the service key
    again: None while the restarting service has not published it yet (try again
    later), ``IntegrityError`` if it now publishes another key than the session pinned
    (a session is never resumed with another service)."""
    try:
        pub = pinned_key(sock, explicit, default_location=default_location)
    except ServiceUnavailable:
        return None
    if pub != pinned:
        raise IntegrityError(f"the esem service at {sock} now publishes another key; the "
                             "session is not resumed with it")
    return pub


@dataclass
class ClientStats:
    requests: int = 0
    reader_handoffs: int = 0
    keepalives: int = 0
    resumes: int = 0  # connections lost and the session resumed on a new one
    reconnect_attempts: int = 0
    resumed_at: float | None = None  # time.monotonic() of the last resume


class Client:
    """A session with the esem service. Use ``get_client()`` for the per-process one."""

    def __init__(
        self,
        sock: str | os.PathLike[str] | None = None,
        pubkey: bytes | str | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        keepalive: float = KEEPALIVE_INTERVAL,
        switchless: bool | None = None,
        resume_timeout: float | None = None,
    ) -> None:
        """``resume_timeout``: seconds to keep trying to resume the session after its
        connection is lost (default ``ESEM_RESUME_TIMEOUT``, else 10; 0: never)."""
        self._resume_timeout = resume.resume_timeout(resume_timeout)
        self.socket_path = Path(socket_path(sock))
        self._default_location = is_default_location(sock)
        self._explicit_pubkey = pubkey
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._guard = ForkGuard()
        self.pid = self._guard.pid
        self._lock = threading.Lock()
        # Always enter the lock as ``with self._lock``, never ``with self._cond``: the
        # Condition's __enter__ is Python code, so a signal handler that raises (the
        # documented way to interrupt a wait) can fire after it took the lock and before
        # the with-block began; the lock then stays held and every thread of the process
        # deadlocks on this client. The C lock's __enter__ leaves no such gap.
        self._cond = threading.Condition(self._lock)
        self._sock: socket.socket | None = None
        self._session: ClientSession | None = None
        self._replies: dict[int, Reply] = {}
        self._reader: int | None = None  # thread ident of the reader (leader/follower)
        self._taking = False  # bytes taken off the socket, replies not yet filed
        # Threads parked in ``_cond.wait()``: notify only when there is one, since
        # Condition.notify_all is Python code that costs a microsecond or two per reply.
        self._sleepers = 0
        self._failure: EsemError | None = None
        self._ping_sent_at: float | None = None
        self._progress_at = 0.0  # when the reader last decoded a reply (or took the role)
        self._pings: set[int] = set()
        self._poller = select.poll()  # registered with the socket once connected
        # Switchless: True insists, False refuses, None follows ESEM_SWITCHLESS (see
        # esem.client.switchless); ``_ring`` replaces the socket once upgraded.
        self._switchless = switchless
        self._ring: ClientRing | None = None
        # Resumption. The key pinned at the first connect: a reconnect must find it again.
        self._pub: bytes | None = None
        # While the connection is lost: since when (monotonic) and why. Requests made
        # meanwhile are encrypted into the session (so they are pending, and listed in
        # the RESUME) but not written; the resume re-sends them.
        self._down_since: float | None = None
        self._down_reason = ""
        # Sockets and rings of lost connections, closed by the reader that resumes (a
        # reader may still be polling one: closing it under that thread could let the
        # reconnect reuse its descriptor number).
        self._retired: list[socket.socket | ClientRing] = []
        self._secrets = resume.Secrets()
        self._backoff = resume.Backoff()
        # The native transport (esem.client.native): when set, it carries every frame
        # of this session instead of ``_sock``/``_session``.
        self._native: NativeSession | None = None
        self.stats = ClientStats()
        _all_clients.add(self)

    def __repr__(self) -> str:
        state = "failed" if self._failure else (
            "open" if self._session or self._native else "unconnected")
        if state == "open" and self._down_since is not None:
            state = "reconnecting"
        return f"<esem.Client {self.socket_path} pid={self.pid} {state}>"

    @property
    def resumable(self) -> bool:
        """True when a lost connection will be resumed (resumption not turned off, and
        the session's service gave it a resumption secret)."""
        session = self._session
        return (self._resume_timeout > 0 and session is not None
                and session.resumption_secret is not None)

    # ------------------------------------------------------------ lifecycle

    @property
    def failed(self) -> EsemError | None:
        """The error that ended this session, or None while it is usable. In a process
        forked from the session's own, always an error: the session is the parent's."""
        if not self._guard.here():
            return self._forked_away()
        native = self._native
        if self._failure is None and native is not None:
            failure = native.failure()
            if failure is not None:
                self._failure = _as_esem_error(failure)
        return self._failure

    @property
    def in_own_process(self) -> bool:
        """False in a forked child (however forked): this client is its parent's."""
        return self._guard.here()

    @property
    def mode(self) -> str:
        """How the session's frames travel: "switchless" (shared-memory rings) or
        "socket" (also before the session is connected, and while a native session that
        had rings resumes over the socket)."""
        native = self._native
        if native is not None:
            return native.mode()
        return "switchless" if self._ring is not None else "socket"

    @property
    def transport(self) -> str:
        """Which implementation carries the session: "native" (``esem._native_core``) or
        "python" (also before the session is connected)."""
        return "native" if self._native is not None else "python"

    @property
    def connected(self) -> bool:
        """True once the session is open (it may have failed since)."""
        return self._session is not None or self._native is not None

    def connect(self) -> None:
        if not self._guard.here():
            raise self._forked_away()
        with self._lock:
            self._ensure_connected()

    def close(self) -> None:
        """End the session: the service closes its handles and drops its waits. In a
        forked child it only drops the child's copies of the descriptors: the session is
        the parent's, and a shutdown would end it for the parent too."""
        if not self._guard.here():
            self._forked_away()
            return
        with self._lock:
            if self._failure is None:
                self._failure = ServiceUnavailable("client closed")
                self._send_end_locked()
            sock, self._sock = self._sock, None
            ring, self._ring = self._ring, None  # unmapped once no reader holds it
            if ring is not None:
                ring.shutdown()  # wakes a reader asleep on the rings
            native = self._native
            if native is not None:
                native.close()  # wakes its waiters with "client closed"
            self._cond.notify_all()
        if sock is not None:
            with contextlib.suppress(OSError):  # wakes the watcher (END is out already)
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            if ring is not None:
                ring.close()

    def _send_end_locked(self) -> None:
        """Best effort: END tells the service the session is over on purpose, so it does
        not keep it for a resumption during the grace period. Not waited for: on the
        socket END is read before the EOF that follows it; on the rings the reader
        waits a moment for the service to have taken it (the EOF of the socket could
        otherwise overtake it)."""
        session = self._session
        if session is None or self._down_since is not None or not session.established:
            return
        try:
            frame = session.send_request(Request(Opcode.END, 0),
                                         req_id=session.next_request_id())
            if self._ring is not None:
                self._ring.send(frame)
                self._ring.drain(END_LINGER)
            elif self._sock is not None:
                self._sock.settimeout(END_LINGER)
                self._sock.sendall(frame)
        except (OSError, EsemError, RuntimeError):
            pass  # gone already: the service ends the session by itself

    def _forked_away(self) -> EsemError:
        """In a fork child: drop the inherited descriptors (closing our copies sends
        nothing; the parent's stay open), never send, read or shut anything down, and
        fail every later use of this object. Its lock may be held by a thread that does
        not exist in this process, so it is not taken; idempotent. Returns the failure."""
        sock, self._sock = self._sock, None
        if not isinstance(self._failure, _ParentsSession):
            self._failure = _ParentsSession("esem session belongs to the parent process")
        self._session = None  # its cipher states are the parent's: never used here
        if sock is not None:
            sock.close()
        native, self._native = self._native, None
        if native is not None:
            native.abandon_in_child()  # closes the child's copy, sends nothing
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.forget()  # the parent's rings: never touched from here
        return self._failure

    def _ensure_connected(self) -> None:
        """Called with the lock held.

        A signal handler that raises while we connect (in connect, in the handshake's
        recv, or inside noise's own Python code) is an interruption, never tampering:
        the half-made connection is closed, nothing is kept (the next call connects
        afresh), and, as for a wait, an ``Exception`` from the handler becomes
        ``SignalError`` (its ``__cause__``) while ``KeyboardInterrupt``/``SystemExit``
        propagate unchanged."""
        if self._failure is not None:
            raise self._failure
        if self._session is not None or self._native is not None:
            return
        rings = self._native_switchless()
        if rings is not None:
            from esem.client import native

            pub = pinned_key(self.socket_path, self._explicit_pubkey,
                             default_location=self._default_location)
            try:
                self._native = native.connect(str(self.socket_path), pub, rings)
            except EsemError:
                raise
            except Exception as exc:  # a signal handler raised during the handshake
                raise SignalError(
                    f"connecting to the esem service at {self.socket_path} was interrupted "
                    "by a signal; nothing was opened") from exc
            return
        try:
            pub = pinned_key(self.socket_path, self._explicit_pubkey,
                             default_location=self._default_location)
            sock, session, ring = self._open_session(pub)
        except EsemError:
            raise
        except Exception as exc:  # raised by a signal handler (as in EsemSemaphore._wait)
            raise SignalError(
                f"connecting to the esem service at {self.socket_path} was interrupted by a "
                "signal; nothing was opened") from exc
        sock.settimeout(None)
        self._poller.register(sock, select.POLLIN)
        self._sock, self._session, self._ring = sock, session, ring
        self._pub = pub
        if self.resumable:
            threading.Thread(target=_watch, args=(weakref.ref(self),), daemon=True,
                             name=f"esem-watch-{self.socket_path.name}").start()

    def _open_session(self, pub: bytes) -> tuple[socket.socket, ClientSession, ClientRing | None]:
        """Connect, complete the handshake and (if asked) the switchless upgrade; on any
        exception the socket is closed and nothing is left behind."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._connect(sock)
            session, deadline = self._handshake(sock, pub)
            ring = self._upgrade(sock, session, deadline)
        except TimeoutError as exc:
            sock.close()
            raise ServiceUnavailable(f"esem service at {self.socket_path} did not answer") from exc
        except OSError as exc:
            sock.close()
            raise ServiceUnavailable(f"esem service at {self.socket_path}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return sock, session, ring

    def _handshake(self, sock: socket.socket, pub: bytes) -> tuple[ClientSession, float]:
        """Noise NK over a connected socket: the new session and the deadline it used."""
        session = ClientSession(pub)
        # A service that refuses us (a quota) writes its reason and hangs up,
        # possibly before our HELLO is out: read the reason before giving up.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(session.start())
        deadline = time.monotonic() + self._connect_timeout
        while not session.established:
            # One deadline for the whole handshake: a peer that trickles its answer
            # byte by byte must not stretch it (each recv gets what is left).
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            data = sock.recv(RECV_BYTES)
            if not data:
                raise ServiceUnavailable(
                    f"esem service at {self.socket_path} closed during the handshake"
                )
            session.receive_data(data)
        return session, deadline

    def _connect(self, sock: socket.socket) -> None:
        sock.settimeout(self._connect_timeout)
        give_up = time.monotonic() + self._connect_timeout
        while True:
            try:
                sock.connect(str(self.socket_path))
                return
            except BlockingIOError as exc:
                # EAGAIN: the service's listen backlog is full (perhaps another tenant's
                # connection storm); a Unix socket does not queue us, so try again.
                if time.monotonic() >= give_up:
                    raise ServiceUnavailable(
                        f"esem service at {self.socket_path} is not accepting connections "
                        f"(backlog full for {self._connect_timeout}s)") from exc
                time.sleep(0.002)
            except OSError as exc:
                raise ServiceUnavailable(
                    f"no esem service at {self.socket_path}: {exc}") from exc

    def _native_switchless(self) -> int | None:
        """None if this session goes over the Python client; else how the native one
        asks for the rings (``esem.client.native.SOCKET/PREFER/REQUIRE``, as ``_upgrade``
        would: ``switchless=True`` requires them, ``ESEM_SWITCHLESS=1`` prefers them).
        ``ESEM_CLIENT`` chooses the client (``esem.client.native.chosen``); a client made
        with other timeouts than the native client's stays on the Python one."""
        from esem.client import native, switchless

        if native.chosen() != "native":
            return None
        if self._connect_timeout != CONNECT_TIMEOUT or self._keepalive != KEEPALIVE_INTERVAL:
            return None
        if self._switchless is True:
            return native.REQUIRE
        if self._switchless is None and switchless.from_environment():
            return native.PREFER
        return native.SOCKET

    def _upgrade(self, sock: socket.socket, session: ClientSession,
                 deadline: float) -> ClientRing | None:
        from esem.client import switchless

        want = switchless.from_environment() if self._switchless is None else self._switchless
        if not want:
            return None
        return switchless.upgrade(sock, session, deadline, strict=self._switchless is True)

    # -------------------------------------------------------------- calls

    def send(self, build: Request, *, key: bytes | None = None) -> int:
        """Send ``build`` (its ``req_id`` is replaced by a fresh one); returns the id."""
        if not self._guard.here():  # the one path to the socket and the request ring
            raise self._forked_away()
        native = self._native
        if native is None:
            with self._lock:
                self._ensure_connected()
                native = self._native
        if native is not None:
            self.stats.requests += 1
            try:
                return native.send(build.opcode, build.handle, build.name, build.oflag,
                                   build.mode, build.value, build.key, build.wait_mode,
                                   build.timeout_ns, build.target, build.after, key)
            except EsemError as exc:
                raise self._native_failed(exc) from None
        with self._lock:
            self._ensure_connected()
            assert self._session is not None
            req_id = self._session.next_request_id()
            frame = self._session.send_request(build, key=key, req_id=req_id)
            self.stats.requests += 1
            if self._down_since is not None:
                return req_id  # pending in the session: the resume sends it
            try:
                if self._ring is not None:
                    self._ring.send(frame)
                else:
                    assert self._sock is not None  # set whenever the connection is up
                    self._sock.sendall(frame)
            except (OSError, EsemError) as exc:  # gone; on the rings also: tampered
                # Whether the service read it or not, it stays pending: a resume re-sends
                # it if the service never executed it, or gets its reply again if it did.
                self._lost_locked(exc, "went away")
            return req_id

    def call(self, build: Request, *, key: bytes | None = None) -> Reply:
        """Send and wait for the reply; a refusal raises its ``EsemError``."""
        reply = self.wait_reply(self.send(build, key=key))
        if reply.status:
            raise error_for(reply.status, reply.message)
        return reply

    def wait_reply(self, req_id: int) -> Reply:
        """Block until the reply to ``req_id`` arrives. Interruptible by signals: an
        exception from a signal handler propagates, and the request stays pending (its
        reply is kept and can still be awaited).

        The reader role belongs to a thread (its ident), is decided afresh under the
        lock before every read, and is given back in ``finally``. A raising signal
        handler can still strike between taking the role and the ``try`` (or inside
        the ``finally``) and leave it taken; since only the main thread runs handlers,
        that thread then finds the role its own on its next call and simply reads: it
        is not reading anywhere else (before, the role stayed taken and the next call
        waited forever for a reader that did not exist)."""
        if not self._guard.here():  # reading would steal the parent's replies
            raise self._forked_away()
        native = self._native
        if native is not None:
            try:
                op, rid, status, handle, created, value, payload, message = (
                    native.wait_reply(req_id))
            except EsemError as exc:
                raise self._native_failed(exc) from None
            return Reply(Opcode(op), rid, Status(status), handle=handle, created=created,
                         value=value, data=payload, message=message)
        me = threading.get_ident()
        try:
            while True:
                with self._lock:
                    reply = self._replies.pop(req_id, None)
                    if reply is not None:
                        return reply
                    if self._failure is not None:
                        raise self._failure
                    if self._session is not None and not self._session.is_pending(req_id):
                        # Answered, yet the reply is nowhere: a signal handler raised
                        # inside the reader between receiving and filing it. Waiting would
                        # hang and guessing the answer could lose a unit, so the session
                        # ends here.
                        raise self._fail_locked(ServiceUnavailable(
                            f"esem session lost the reply to request {req_id} (a signal "
                            "handler raised inside the client); the session is closed"))
                    if self._reader is not None and self._reader != me:
                        self._sleepers += 1
                        try:
                            self._cond.wait()
                        finally:
                            self._sleepers -= 1
                        continue
                    if self._reader is None:
                        self._reader = me
                        self._progress_at = time.monotonic()
                if self._down_since is not None:  # only the reader changes it back
                    self._resume()
                    continue
                data = self._recv()
                if data is None:
                    continue
                with self._lock:
                    assert self._session is not None
                    try:
                        replies = self._session.receive_data(data)
                    except EsemError as exc:
                        raise self._fail_locked(exc) from None
                    self._file_locked(replies)
                    self._taking = False
                    if self._ring is not None:
                        self._ring.taking = False
                    mine = self._replies.pop(req_id, None)
                    if replies and self._sleepers:
                        self._cond.notify_all()
                    if mine is not None:
                        return mine
        except EsemError:
            raise
        except BaseException:
            self._interrupted_with_bytes()
            raise
        finally:
            if self._reader == me:  # pass the role on
                with self._lock:
                    if self._reader == me:
                        self._reader = None
                        self.stats.reader_handoffs += 1
                        if self._sleepers:
                            self._cond.notify_all()

    def _file_locked(self, replies: list[Reply]) -> None:
        """Keep decoded replies for the threads that wait for them (keepalive PINGs are
        consumed here, also when a RESUME answers one ESTALE)."""
        if replies:
            self._progress_at = time.monotonic()
        for reply in replies:
            if reply.req_id in self._pings:
                self._pings.discard(reply.req_id)
                self._ping_sent_at = None
                continue
            self._replies[reply.req_id] = reply

    def _interrupted_with_bytes(self) -> None:
        """A signal handler raised in the reader. If it struck after bytes were taken
        off the socket or ring and before their replies were filed, those bytes are
        lost and the stream has a hole: end the session now, as the interruption it is
        (parsing on would fail authentication and look like tampering)."""
        if self._took_unfiled():
            # The marks stay set until the session is failed: a second handler raising
            # in here leaves them set, and the next read (_recv) ends the session then.
            self._fail(self._lost_bytes())
            self._taking = False

    def _took_unfiled(self) -> bool:
        ring = self._ring
        return self._taking or (ring is not None and ring.taking)

    def _lost_bytes(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"esem session at {self.socket_path} closed: a signal handler raised while "
            "the client was taking a reply off the connection, so bytes may be lost")

    def _recv(self) -> bytes | None:
        """One recv, or None after a keepalive interval without a decoded reply (a PING is
        then in flight). Quiet is measured in replies, not bytes: a peer that trickles a
        frame byte by byte is as quiet as one that sends nothing. (No fork check here:
        only ``wait_reply``, which has checked, makes a thread the reader.)"""
        sock = self._sock
        if sock is None:
            if self._down_since is not None:
                return None  # lost meanwhile (by a sender): the reader loop resumes
            raise self._fail(ServiceUnavailable("client closed"))
        if self._took_unfiled():
            # An earlier read was interrupted after taking bytes and before filing their
            # replies, and its clean-up was interrupted too: never parse past the hole.
            raise self._fail(self._lost_bytes())
        since = self._ping_sent_at if self._ping_sent_at is not None else self._progress_at
        left = self._keepalive - (time.monotonic() - since)
        ring = self._ring
        if ring is not None:
            try:
                data = ring.recv(left)
            except EsemError as exc:  # the service is gone, or the rings were tampered
                ring.taking = False  # nothing was taken
                self._lost(exc, "went away")
                return None
            if data is None:
                self._keepalive_tick()
            return data
        # Rounded up: poll() must not wake before the interval is really over.
        if left <= 0 or not self._poller.poll(math.ceil(left * 1000)):
            self._keepalive_tick()
            return None
        self._taking = True  # until filed (wait_reply): see _interrupted_with_bytes
        try:
            data = sock.recv(RECV_BYTES)
        except OSError as exc:
            self._taking = False
            self._lost(exc, "went away")
            return None
        if not data:
            self._taking = False
            self._lost(None, "closed the connection")
            return None
        return data

    def _keepalive_tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._ping_sent_at is not None:
                if now - self._ping_sent_at >= self._keepalive:
                    raise self._fail_locked(
                        ServiceUnavailable(
                            f"esem service at {self.socket_path} stopped answering "
                            f"({self._keepalive:.0f}s without a reply to a keepalive)"
                        )
                    )
                return
            self._ping_sent_at = now
            self.stats.keepalives += 1
        req_id = self.send(Request(Opcode.PING, 0))
        with self._lock:
            self._pings.add(req_id)

    # ---------------------------------------------------------- resumption

    def _lost(self, exc: BaseException | None, what: str) -> None:
        with self._lock:
            self._lost_locked(exc, what)

    def _lost_locked(self, exc: BaseException | None, what: str) -> None:
        """The connection failed with ``exc`` (None: EOF). A lost connection of a
        resumable session marks it down for the reader to resume; anything else (a
        tampered ring, resumption turned off) fails the session and raises."""
        if self._failure is not None:
            raise self._failure
        reason = f"{what}: {exc}" if exc is not None else what
        if (exc is not None and not resume.is_connection_loss(exc)) or not self.resumable:
            error = (exc if isinstance(exc, EsemError)
                     else ServiceUnavailable(f"esem service at {self.socket_path} {reason}"))
            raise self._fail_locked(error) from (exc if isinstance(exc, OSError) else None)
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        self._down_reason = reason
        self._backoff = resume.Backoff()
        sock, self._sock = self._sock, None
        ring, self._ring = self._ring, None
        if sock is not None:
            with contextlib.suppress(OSError):  # wakes a reader polling it
                sock.shutdown(socket.SHUT_RDWR)
            self._retired.append(sock)
        if ring is not None:
            ring.shutdown()
            self._retired.append(ring)
        if self._sleepers:
            self._cond.notify_all()  # one of them takes the reader role and resumes

    def _resume(self) -> None:
        """Called by the reader while the connection is lost: reconnect with a backoff
        and RESUME the session, until it is back (return), refused or out of time
        (raise, and the session fails). A signal handler that raises interrupts it like
        any read: the session stays lost, and the next reader carries on."""
        while True:
            with self._lock:
                if self._failure is not None:
                    raise self._failure
                since = self._down_since
                if since is None:
                    return
                retired, self._retired = self._retired, []
            for old in retired:
                with contextlib.suppress(OSError):
                    old.close()
            end = since + self._resume_timeout
            left = end - time.monotonic()
            if left <= 0:
                raise self._fail(resume.gave_up(self.socket_path, self._resume_timeout,
                                                self._down_reason))
            self.stats.reconnect_attempts += 1
            if self._resume_once(min(left, self._connect_timeout)):
                continue  # resumed; or lost again at once, which the loop notices
            time.sleep(max(0.0, min(self._backoff.next(), end - time.monotonic())))

    def _resume_once(self, timeout: float) -> bool:
        """One attempt: True once the session is resumed, False to try again later."""
        try:
            pub = recheck_key(self.socket_path, self._explicit_pubkey,
                              default_location=self._default_location, pinned=self._pub)
        except IntegrityError as exc:
            raise self._fail(exc) from None
        if pub is None:
            return False
        sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        assert sock is not None
        offered: bytes | None = None  # the secret of a RESUME sent and not yet answered
        rotated: bytes | None = None
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
            new, deadline = self._handshake(sock, pub)
            with self._lock:
                if self._failure is not None:
                    raise self._failure
                old = self._session
                assert old is not None and old.resumption_secret is not None
                secret = self._secrets.pick(old.resumption_secret)
                old.resumption_secret = secret
                frame = new.resume(old)
            sock.sendall(frame)
            offered, rotated = secret, new.resumption_secret
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                data = sock.recv(RECV_BYTES)
                if not data:
                    return False
                with self._lock:
                    try:
                        replies = new.receive_data(data)
                    except EsemError as exc:
                        raise self._fail_locked(exc) from None
                    if not replies:
                        continue
                    offered = None  # answered: the outcome is known
                    answer = replies[0]  # RESUME was the first request, so first answered
                    if answer.opcode is not Opcode.RESUME:
                        raise self._fail_locked(ProtocolError(
                            "the first reply after RESUME does not answer it"))
                    if answer.status is not Status.OK:
                        if answer.status is Status.EACCES and self._secrets.refused():
                            return False
                        raise self._fail_locked(resume.not_resumed(
                            self.socket_path, answer.status, answer.message))
                    self._session = new  # it has taken over the pending requests
                    self._secrets.clear()
                    self._file_locked(replies[1:])
                    self._install_locked(sock)
                    sock = None
                    try:
                        self._sock_sendall_locked(new.resend())
                    except OSError as exc:
                        self._lost_locked(exc, "went away")
                    return True
        except (OSError, TimeoutError):
            return False
        except IntegrityError as exc:  # an impostor or tampering: never resumed through
            raise self._fail(exc) from None
        except EsemError:
            if self._failure is not None:  # refused, closed, or failed meanwhile
                raise
            return False  # closed during the handshake, or refused (a quota): again
        finally:
            if sock is not None:
                if offered is not None:
                    self._secrets.unknown_outcome(offered, rotated)
                sock.close()

    def _watch_lost(self) -> None:
        """The watcher saw the connection hang up while no thread reads: resume now
        (an idle holder must not wait for its next call, or its session could outlive
        the grace period and its units be taken from it)."""
        me = threading.get_ident()
        with self._lock:
            if self._failure is not None or self._reader is not None:
                return
            if self._down_since is None:
                try:
                    self._lost_locked(None, "closed the connection")
                except EsemError:
                    return
            self._reader = me
        try:
            self._resume()
        except EsemError:
            pass  # sticky: the next call raises it
        finally:
            with self._lock:
                if self._reader == me:
                    self._reader = None
                    if self._sleepers:
                        self._cond.notify_all()

    def _install_locked(self, sock: socket.socket) -> None:
        """The resumed session's connection is up: reads and writes go to it again."""
        sock.settimeout(None)
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._sock = sock
        self._down_since = None
        self._ping_sent_at = None
        self._progress_at = self.stats.resumed_at = time.monotonic()
        self.stats.resumes += 1
        if self._sleepers:
            self._cond.notify_all()

    def _sock_sendall_locked(self, data: bytes) -> None:
        if data and self._sock is not None:
            self._sock.sendall(data)

    def _native_failed(self, exc: EsemError) -> EsemError:
        """A native call raised ``exc``: if the session has failed, that failure is
        kept (sticky, as the Python transport's) and raised from now on."""
        native = self._native
        if self._failure is None and native is not None and native.failure() is not None:
            self._failure = exc
        return self._failure or exc

    def _fail(self, exc: EsemError) -> EsemError:
        with self._lock:
            return self._fail_locked(exc)

    def _fail_locked(self, exc: EsemError) -> EsemError:
        if self._failure is None:
            self._failure = exc
            if isinstance(exc, IntegrityError):
                exc.add_note("the esem session was closed; its handles are no longer usable")
            # A shutdown acts on the connection, not on our descriptor: from a forked
            # child it would end the parent's session (never reached: every path checks
            # the guard first; kept as the last line).
            if self._guard.here():
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                if self._ring is not None:
                    self._ring.shutdown()
            self._cond.notify_all()
        return self._failure


def _watch(ref: weakref.ref[Client]) -> None:
    """The thread of a resumable client: waits for its connection to hang up
    (``POLLRDHUP``: never reads, so it takes nothing from the reader) and then, if no
    thread is reading, resumes the session. Ends with the client (failed, closed,
    garbage-collected, or left behind in a fork child). It blocks every signal, so the
    kernel delivers them to threads that run Python handlers promptly (a signal caught
    by a thread asleep in poll would wait until the main thread next wakes)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    # Neither the client nor its socket is kept alive by the watcher: a client dropped
    # without close() still closes its connection when it is collected, as before.
    watched: weakref.ref[socket.socket] | None = None
    poller = select.poll()  # a new one per connection: a closed one's number may be reused
    while True:
        client = ref()
        if client is None or client._failure is not None or not client._guard.here():
            return
        sock = client._sock
        if client._down_since is not None or sock is None:
            if client._reader is None:
                client._watch_lost()
            del client, sock
            time.sleep(0.01)
            continue
        if watched is None or watched() is not sock:
            poller = select.poll()
            poller.register(sock, select.POLLRDHUP)
            watched = weakref.ref(sock)
        del client, sock
        try:
            events = poller.poll(WATCH_POLL_MS)
        except (OSError, ValueError):
            return
        if not events:
            continue
        client = ref()
        if client is None:
            return
        if client._reader is None:
            client._watch_lost()
        del client
        time.sleep(0.01)  # a reader has it, or it was just resumed


class _ParentsSession(ServiceUnavailable):
    """This client's session was opened by the process this one was forked from."""


def _as_esem_error(exc: BaseException) -> EsemError:
    """A native session's failure as the ``EsemError`` it always is."""
    return exc if isinstance(exc, EsemError) else ServiceUnavailable(str(exc))


# ----------------------------------------------------------- per-process client

_process_client: Client | None = None
_all_clients: weakref.WeakSet[Client] = weakref.WeakSet()
_process_lock = threading.Lock()
_process_guard = ForkGuard()  # notices a fork that skipped _after_fork_in_child
# The process's switchless choice (``esem.connect``); None follows ESEM_SWITCHLESS. Kept
# across fork, so children open their own sessions in the same mode.
_process_switchless: bool | None = None


def get_client() -> Client:
    """The client of this process: created on first use, replaced after ``fork`` (the
    child never touches the parent's session) and after the session failed."""
    global _process_client
    check_fork()
    with _process_lock:
        client = _process_client
        if client is None or client.failed is not None:
            client = _process_client = Client(switchless=_process_switchless)
        return client


def check_fork() -> None:
    """Do now what ``_after_fork_in_child`` would have done at fork, if this process
    was forked without it (a C-level ``fork()``)."""
    if not _process_guard.here():
        _after_fork_in_child()


def _after_fork_in_child() -> None:
    """The child must not keep the parent's sessions alive (the service sees a session
    end when its last descriptor closes) nor ever write to them (a reused nonce).
    Also run late, by ``check_fork``, and then possibly by two threads at once: it only
    ever lets go of clients made by another process, never of this one's."""
    global _process_client, _process_lock, _process_guard
    _process_guard = ForkGuard()
    _process_lock = threading.Lock()  # another thread may have held it at fork time
    _process_client = None
    for client in list(_all_clients):
        if not client.in_own_process:
            client._forked_away()


os.register_at_fork(after_in_child=_after_fork_in_child)
