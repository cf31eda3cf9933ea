"""The asyncio client: one authenticated session per event loop, no thread per wait.

A thin shell over the same sans-I/O ``ClientSession`` as the blocking client: an
``asyncio.Protocol`` feeds the bytes it receives to the session and resolves one future
per pending request. Requests are encrypted and written synchronously (``transport.write``
never suspends), so ids reach the wire in the order the coroutines sent them; that order
is what makes 200 waiters of one loop queue FIFO at the service.

It keeps the blocking client's rules: the service key is pinned (``read_pubkey``), the
socket is resolved the same way, a keepalive PING makes a dropped frame surface instead
of a hang, a lost connection is resumed (a task reconnects with a backoff for up to
``ESEM_RESUME_TIMEOUT`` and RESUMEs the session, PROTOCOL.md 16; requests made meanwhile
are sent once it is back), and failure is sticky: once a frame fails authentication or
the session cannot be resumed, every pending and later call raises the same error. A
forked child never uses a parent's session: at fork its descriptor is replaced by
``/dev/null`` (the service sees the parent's session only through the parent) and the
client is failed.
Sessions are kept per loop (weakly), made lazily by ``get_async_client()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import weakref
from pathlib import Path
from typing import cast

from esem.client import resume
from esem.client.blocking import CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, pinned_key, recheck_key
from esem.core.status import Status
from esem.errors import EsemError, IntegrityError, ProtocolError, ServiceUnavailable, error_for
from esem.paths import is_default_location, socket_path
from esem.protocol.constants import Opcode
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession


class _Protocol(asyncio.Protocol):
    """One connection and the protocol session made on it. A client has a current one
    and, while it resumes, the one of its attempt; events of any other are stale."""

    def __init__(self, client: AsyncClient, session: ClientSession) -> None:
        self._client = client
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but are one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._client._data_received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._connection_lost(self, exc)


class AsyncClient:
    """A session with the esem service for one event loop. Use ``get_async_client()``."""

    def __init__(
        self,
        sock: str | os.PathLike[str] | None = None,
        pubkey: bytes | str | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        keepalive: float = KEEPALIVE_INTERVAL,
        resume_timeout: float | None = None,
    ) -> None:
        self._resume_timeout = resume.resume_timeout(resume_timeout)
        self.socket_path = Path(socket_path(sock))
        self._default_location = is_default_location(sock)
        self._explicit_pubkey = pubkey
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self.pid = os.getpid()
        self.requests = 0
        self.keepalives = 0
        self._session: ClientSession | None = None
        self._transport: asyncio.Transport | None = None
        self._fd = -1  # the transport's socket, while it is open
        self._fd_id = (0, 0)  # its (st_dev, st_ino): never act on a reused number
        self._futures: dict[int, asyncio.Future[Reply]] = {}
        self._pings: set[int] = set()
        self._handshake: asyncio.Future[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._failure: EsemError | None = None
        self._timer: asyncio.TimerHandle | None = None
        # The session's loop, set at connect; weakly, as _clients is keyed weakly by it.
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._progress_at = 0.0
        self._ping_sent_at: float | None = None
        # Resumption: the key pinned at connect; the current connection; while it is
        # lost, since when, why, and the attempt in progress (its connection, the future
        # its RESUME's answer resolves: True resumed, False try again).
        self._pub: bytes | None = None
        self._proto: _Protocol | None = None
        self._down_since: float | None = None
        self._down_reason = ""
        self._resuming: asyncio.Task[None] | None = None
        self._attempt: _Protocol | None = None
        self._answer: asyncio.Future[bool] | None = None
        self._offered: tuple[bytes, bytes | None] | None = None
        self._secrets = resume.Secrets()
        self.resumes = 0
        _all_clients.add(self)

    def __repr__(self) -> str:
        state = "failed" if self._failure else ("open" if self._session else "unconnected")
        if state == "open" and self._down_since is not None:
            state = "reconnecting"
        return (f"<esem.AsyncClient {self.socket_path} pid={self.pid} {state} "
                f"pending={len(self._futures)}>")

    def statistics(self) -> dict[str, object]:
        return {"socket": str(self.socket_path), "pid": self.pid,
                "connected": self.connected, "failed": repr(self._failure),
                "requests": self.requests, "pending": len(self._futures),
                "keepalives": self.keepalives, "resumes": self.resumes,
                "reconnecting": self._down_since is not None}

    @property
    def failed(self) -> EsemError | None:
        return self._failure

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this session belongs to (None before it connected)."""
        return self._loop() if self._loop is not None else None

    @property
    def connected(self) -> bool:
        """True once the session is established and until it fails; while a lost
        connection is being resumed too (requests are then sent once it is back)."""
        return self._session is not None and self._failure is None

    @property
    def resumable(self) -> bool:
        session = self._session
        return (self._resume_timeout > 0 and session is not None
                and session.resumption_secret is not None)

    # ------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Connect and finish the handshake (once; concurrent callers share the attempt)."""
        if self._failure is not None:
            raise self._failure
        if self._session is not None:
            return
        if os.getpid() != self.pid:
            raise RuntimeError("esem async client used across fork; use get_async_client()")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        await asyncio.shield(self._connecting)

    async def _connect(self) -> None:
        try:
            pub = pinned_key(self.socket_path, self._explicit_pubkey,
                             default_location=self._default_location)
        except ServiceUnavailable as exc:
            raise self._fail(exc) from exc.__cause__
        loop = asyncio.get_running_loop()
        self._loop = weakref.ref(loop)
        session = ClientSession(pub)
        self._handshake = loop.create_future()
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, proto = await loop.create_unix_connection(
                    lambda: _Protocol(self, session), str(self.socket_path))
                self._proto = proto
                self._set_transport(transport)
                transport.write(session.start())
                await self._handshake
                self._session = session
                self._pub = pub
        except TimeoutError as exc:
            raise self._fail(ServiceUnavailable(
                f"esem service at {self.socket_path} did not answer")) from exc
        except OSError as exc:
            raise self._fail(ServiceUnavailable(
                f"no esem service at {self.socket_path}: {exc}")) from exc
        except EsemError as exc:  # refused (a quota) or failed to prove its identity
            raise self._fail(exc) from None

    def _set_transport(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        if self._fd >= 0:
            st = os.fstat(self._fd)
            self._fd_id = (st.st_dev, st.st_ino)

    def close(self) -> None:
        """End the session: the service closes its handles and drops its waits. END
        goes first (best effort), so the service does not keep the session for a
        resumption."""
        session, transport = self._session, self._transport
        if (self._failure is None and session is not None and transport is not None
                and os.getpid() == self.pid):
            with contextlib.suppress(OSError, EsemError, RuntimeError):
                transport.write(session.send_request(Request(Opcode.END, 0),
                                                     req_id=session.next_request_id()))
            self._transport = None
            self._fd = -1
            self._fail(ServiceUnavailable("client closed"))
            transport.close()  # after the buffered END is written, unlike abort()
            return
        self._fail(ServiceUnavailable("client closed"))

    def _forked_away(self) -> None:
        """In a fork child: release the inherited connection without writing to it and
        without touching the parent's loop."""
        self._let_go(ServiceUnavailable("esem session belongs to the parent process"))

    def _let_go(self, failure: EsemError) -> None:
        """Drop the connection from outside its loop (a fork child, or a loop already
        closed): the descriptor number is kept, pointing at /dev/null, so the service sees
        this copy close while a later close by the transport cannot hit an unrelated
        file; the loop's transport is forgotten, so nothing here keeps that loop alive."""
        if self._fd >= 0 and self._fd_is_ours():
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.dup2(devnull, self._fd, inheritable=False)
            finally:
                os.close(devnull)
        self._fd = -1
        self._transport = None
        self._proto = self._attempt = None  # they refer to the loop through their transport
        self._resuming = None
        self._answer = None
        self._timer = None
        self._connecting = self._handshake = None
        self._futures = {}
        if self._failure is None:
            self._failure = failure

    def _fd_is_ours(self) -> bool:
        try:
            st = os.fstat(self._fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._fd_id

    def _fail(self, exc: EsemError) -> EsemError:
        if self._failure is not None:
            return self._failure
        self._failure = exc
        self._fd = -1  # aborted below: the number may be reused at once
        if isinstance(exc, IntegrityError):
            exc.add_note("the esem session was closed; its handles are no longer usable")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, self._transport = self._transport, None
        if transport is not None and os.getpid() == self.pid:
            transport.abort()
        self._abort_attempt()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(False)
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(exc)
            self._handshake.exception()  # raised through _connect, not by this future
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(exc)
        return exc

    # ------------------------------------------------------------------ I/O

    def _data_received(self, proto: _Protocol, data: bytes) -> None:
        if self._failure is not None or (proto is not self._proto and proto is not self._attempt):
            return  # a stale connection's
        session = proto.session
        try:
            replies = session.receive_data(data)
        except EsemError as exc:
            self._fail(exc)
            return
        if self._handshake is not None and not self._handshake.done() and session.established:
            self._handshake.set_result(None)
        # RESUME was the first request on an attempt's connection, so it is answered first.
        if proto is self._attempt and replies and not self._resumed(proto, replies.pop(0)):
            return
        if replies:
            self._progress_at = time.monotonic()
        for reply in replies:
            if reply.opcode is Opcode.PING and reply.req_id in self._pings:
                self._pings.discard(reply.req_id)
                self._ping_sent_at = None
                continue
            fut = self._futures.pop(reply.req_id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    # ---------------------------------------------------------- resumption

    def _connection_lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is self._attempt:  # a resume attempt's connection died
            self._attempt = None
            if self._handshake is not None and not self._handshake.done():
                self._handshake.set_exception(ServiceUnavailable("closed during the handshake"))
                self._handshake.exception()
            if self._answer is not None and not self._answer.done():
                self._answer.set_result(False)
            return
        if proto is not self._proto or self._failure is not None:
            return
        reason = "closed the session" + (f": {exc}" if exc else "")
        if not self.resumable:
            self._fail(ServiceUnavailable(f"esem service at {self.socket_path} {reason}"))
            return
        self._proto = None
        self._transport = None
        self._fd = -1
        self._down_since = time.monotonic()
        self._down_reason = reason
        self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        """Reconnect with a backoff and RESUME, until resumed, refused or out of time."""
        assert self._down_since is not None
        try:
            if not await resume.retry(
                    self._resume_once, asyncio.sleep,
                    end=self._down_since + self._resume_timeout,
                    connect_timeout=self._connect_timeout,
                    lost=lambda: self._failure is None and self._down_since is not None):
                self._fail(resume.gave_up(self.socket_path, self._resume_timeout,
                                          self._down_reason))
        except asyncio.CancelledError:
            self._fail(ServiceUnavailable("esem session resumption cancelled (loop closing)"))
            raise

    async def _resume_once(self, timeout: float) -> bool:
        """One attempt; True when there is nothing more to try (resumed, or failed)."""
        try:
            pub = recheck_key(self.socket_path, self._explicit_pubkey,
                              default_location=self._default_location, pinned=self._pub)
        except IntegrityError as exc:
            self._fail(exc)
            return True
        if pub is None:
            return False
        loop = asyncio.get_running_loop()
        new = ClientSession(pub)
        self._handshake = loop.create_future()
        self._answer = answer = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                transport, proto = await loop.create_unix_connection(
                    lambda: _Protocol(self, new), str(self.socket_path))
                self._attempt = proto
                transport.write(new.start())
                await self._handshake
                old = self._session
                assert old is not None and old.resumption_secret is not None
                secret = self._secrets.pick(old.resumption_secret)
                old.resumption_secret = secret
                self._offered = (secret, new.resumption_secret)
                transport.write(new.resume(old))
                resumed: bool = await answer
                return resumed
        except (OSError, TimeoutError):
            return self._failure is not None
        except IntegrityError as exc:
            self._fail(exc)
            return True
        except EsemError:
            return self._failure is not None
        finally:
            self._handshake = None
            self._answer = None
            if self._attempt is not None and self._down_since is not None:
                self._abort_attempt()
            self._attempt = None

    def _abort_attempt(self) -> None:
        attempt, self._attempt = self._attempt, None
        if self._offered is not None:
            self._secrets.unknown_outcome(*self._offered)
            self._offered = None
        if attempt is not None and attempt.transport is not None:
            attempt.transport.abort()

    def _resumed(self, proto: _Protocol, answer: Reply) -> bool:
        """The RESUME of attempt ``proto`` was answered: carry on over it, or not."""
        self._offered = None
        result = self._answer
        ok = False
        if answer.opcode is not Opcode.RESUME:
            self._fail(ProtocolError("the first reply after RESUME does not answer it"))
        elif answer.status is Status.OK:
            assert proto.transport is not None
            self._attempt = None
            self._proto = proto
            self._session = proto.session  # it has taken over the pending requests
            self._secrets.clear()
            self._set_transport(proto.transport)
            self._down_since = None
            self._progress_at, self._ping_sent_at = time.monotonic(), None
            self.resumes += 1
            proto.transport.write(proto.session.resend())
            ok = True
        elif answer.status is Status.EACCES and self._secrets.refused():
            self._abort_attempt()
        else:
            self._fail(resume.not_resumed(self.socket_path, answer.status, answer.message))
        if result is not None and not result.done():
            result.set_result(ok or self._failure is not None)
        return ok

    def send(self, build: Request, *, key: bytes | None = None) -> asyncio.Future[Reply]:
        """Send ``build`` at once (connected clients only) under a fresh id; the future
        resolves with its reply. The future is the client's: cancelling an ``await`` on
        it does not withdraw anything at the service (``esem.aio`` does that)."""
        return self._send(build, key)[1]

    def _send(self, build: Request, key: bytes | None) -> tuple[int, asyncio.Future[Reply]]:
        if self._failure is not None:
            raise self._failure
        if self._session is None:
            raise RuntimeError("esem async client is not connected; await connect() first")
        session = self._session
        req_id = session.next_request_id()
        frame = session.send_request(build, key=key, req_id=req_id)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._futures[req_id] = fut
        if self._transport is not None:
            self._transport.write(frame)
        # else the connection is lost: the request is pending in the session, and the
        # resume sends it
        self.requests += 1
        if self._timer is None:
            self._progress_at = time.monotonic()
            self._arm()
        return req_id, fut

    async def call(self, build: Request, *, key: bytes | None = None) -> Reply:
        """Send and await the reply; a refusal raises its ``EsemError``."""
        await self.connect()
        reply = await self.send(build, key=key)
        if reply.status:
            raise error_for(reply.status, reply.message)
        return reply

    # ------------------------------------------------------------ keepalive

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._keepalive / 2, self._tick)

    def _tick(self) -> None:
        """Every half interval while requests are pending: after an interval of silence,
        PING; after another one with that PING unanswered, fail the session."""
        self._timer = None
        if self._failure is not None or not (self._futures or self._pings):
            return
        now = time.monotonic()
        if self._down_since is not None:  # the resume has its own deadline
            self._progress_at, self._ping_sent_at = now, None
            self._arm()
            return
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= self._keepalive:
                self._fail(ServiceUnavailable(
                    f"esem service at {self.socket_path} stopped answering "
                    f"({self._keepalive:.0f}s without a reply to a keepalive)"))
                return
        elif now - self._progress_at >= self._keepalive:
            self._ping_sent_at = now
            self.keepalives += 1
            req_id, _ = self._send(Request(Opcode.PING, 0), None)
            del self._futures[req_id]  # its reply is consumed by _data_received
            self._pings.add(req_id)
        if self._timer is None:
            self._arm()


# Per loop. Not a WeakKeyDictionary: the client's transport refers to its loop, so a weak
# key would never die; entries of loops that have closed are let go at the next lookup
# (so a program that calls asyncio.run() in a loop keeps at most one stale session).
_clients: dict[asyncio.AbstractEventLoop, AsyncClient] = {}
_all_clients: weakref.WeakSet[AsyncClient] = weakref.WeakSet()


def get_async_client() -> AsyncClient:
    """The session of the running event loop: created on first use, replaced after
    ``fork`` and after it failed. Must be called from a coroutine."""
    loop = asyncio.get_running_loop()
    for other in [lp for lp in _clients if lp.is_closed()]:
        _clients.pop(other)._let_go(ServiceUnavailable("its event loop was closed"))
    client = _clients.get(loop)
    if client is None or client.pid != os.getpid() or client.failed is not None:
        client = _clients[loop] = AsyncClient()
    return client


def _after_fork_in_child() -> None:
    _clients.clear()
    for client in list(_all_clients):
        with contextlib.suppress(OSError):
            client._forked_away()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["AsyncClient", "get_async_client"]
