"""e-semaphores for anyio, hence for trio as well as asyncio: structured, and native.

Structured concurrency has no loop-wide background tasks, so the session is a context
that owns its reader task::

    async with esem.anyio.connect() as session:
        sem = await session.open("/jobs", os.O_CREAT, 0o600, 4)
        async with sem:
            ...

It is a thin shell over the sans-I/O ``ClientSession``, as the blocking and asyncio
clients are, on an anyio Unix socket stream: the service key is pinned, requests are
encrypted and written under one lock (ids reach the wire in order), a reader task feeds
replies to the session and wakes their waiters, a keepalive PING makes a dropped frame
surface, a lost connection is resumed by the reader task (reconnect with a backoff for up
to ``ESEM_RESUME_TIMEOUT``, RESUME, PROTOCOL.md 16; requests made meanwhile are sent once
it is back), and failure is sticky. Handles have ``esem.aio``'s shape (``acquire(timeout=None)
-> bool``, ``try_acquire``, ``release``, ``async with``, ``getvalue``, ``close``,
``unlink``). Cancellation (a cancel scope, ``move_on_after``, ``fail_after``) withdraws a
queued wait at the service inside a shielded scope (CANCEL, both replies, a unit granted
at that instant posted back) before the cancellation propagates. A session belongs to the
process that opened it: a forked child gets ``RuntimeError`` and opens its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from types import TracebackType

import anyio
import anyio.abc

from esem.api import USE_ESEM, _check_args, _current_umask
from esem.client import resume
from esem.client.blocking import (
    CONNECT_TIMEOUT,
    END_LINGER,
    KEEPALIVE_INTERVAL,
    RECV_BYTES,
    pinned_key,
    recheck_key,
)
from esem.core.limits import check_key, check_name
from esem.core.status import CoreError, Status
from esem.core.table import WaitMode
from esem.errors import (
    EsemError,
    ExistentialError,
    IntegrityError,
    ProtocolError,
    ServiceUnavailable,
    error_for,
    wait_granted,
)
from esem.legacy import _check_timeout
from esem.paths import is_default_location, socket_path
from esem.protocol.constants import MAX_TIMEOUT_NS, Opcode, OpenFlag
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession

O_CREAT = os.O_CREAT
O_EXCL = os.O_EXCL
# What a lost connection raises on an anyio stream.
_LOST = (anyio.EndOfStream, anyio.BrokenResourceError, OSError)


class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Reply | None = None


class Session:
    """One authenticated session, owned by the ``connect()`` context that made it."""

    def __init__(self, stream: anyio.abc.ByteStream, session: ClientSession, path: Path,
                 keepalive: float, *, pub: bytes = b"", explicit_pubkey: bytes | str | None = None,
                 default_location: bool = False, connect_timeout: float = CONNECT_TIMEOUT,
                 resume_timeout: float | None = None) -> None:
        self._resume_timeout = resume.resume_timeout(resume_timeout)
        self._pub = pub
        self._explicit_pubkey = explicit_pubkey
        self._default_location = default_location
        self._connect_timeout = connect_timeout
        self._down_since: float | None = None  # the connection is lost: being resumed
        self._down_reason = ""
        self._secrets = resume.Secrets()
        self.resumes = 0
        self.socket_path = path
        self.pid = os.getpid()
        self.requests = 0
        self.keepalives = 0
        self._stream = stream
        self._session = session
        self._keepalive = keepalive
        self._send_lock = anyio.Lock()
        self._slots: dict[int, _Slot] = {}
        self._pings: set[int] = set()
        self._failure: EsemError | None = None
        self._failed = anyio.Event()

    def __repr__(self) -> str:
        state = "failed" if self._failure else "open"
        if state == "open" and self._down_since is not None:
            state = "reconnecting"
        return f"<esem.anyio.Session {self.socket_path} {state} pending={len(self._slots)}>"

    @property
    def failed(self) -> EsemError | None:
        return self._failure

    def _check(self) -> None:
        if os.getpid() != self.pid:
            raise RuntimeError("esem anyio session used across fork; open a new one")
        if self._failure is not None:
            raise self._failure

    @property
    def resumable(self) -> bool:
        return (self._resume_timeout > 0 and self._session.resumption_secret is not None
                and len(self._pub) == 32)

    def _lost(self, exc: BaseException, what: str) -> None:
        """The connection is gone: the reader resumes the session, or it fails."""
        reason = f"{what}: {exc!r}"
        if not self.resumable:
            raise self._fail(ServiceUnavailable(f"esem service at {self.socket_path} {reason}"))
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._down_reason = reason

    def _fail(self, exc: EsemError) -> EsemError:
        if self._failure is None:
            self._failure = exc
            self._failed.set()
            for slot in self._slots.values():
                slot.event.set()  # wakes every waiter to see the failure
        return self._failure

    # ------------------------------------------------------------------ I/O

    async def send(self, build: Request, *, key: bytes | None = None) -> int:
        """Encrypt and write ``build`` under a fresh id; returns the id. The write is
        shielded: a request half on the wire would desynchronise the session."""
        self._check()
        async with self._send_lock:
            self._check()
            req_id = self._session.next_request_id()
            frame = self._session.send_request(build, key=key, req_id=req_id)
            self._slots[req_id] = _Slot()
            # While the connection is lost the request waits in the session: the resume
            # sends it.
            if self._down_since is None:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._stream.send(frame)
                    except anyio.ClosedResourceError as exc:
                        raise self._fail(ServiceUnavailable("session closed")) from exc
                    except _LOST as exc:
                        self._lost(exc, "went away")
        self.requests += 1
        return req_id

    async def reply(self, req_id: int) -> Reply:
        """Wait for the reply to ``req_id`` (cancellable: it stays pending)."""
        slot = self._slots.get(req_id)
        if slot is None:
            raise RuntimeError(f"request {req_id} is not pending")
        await slot.event.wait()
        if slot.reply is None:
            assert self._failure is not None
            raise self._failure
        del self._slots[req_id]
        return slot.reply

    async def call(self, build: Request, *, key: bytes | None = None) -> Reply:
        reply = await self.reply(await self.send(build, key=key))
        if reply.status:
            raise error_for(reply.status, reply.message)
        return reply

    async def _reader(self) -> None:
        """Reads and files replies, sends keepalives, and resumes a lost connection."""
        while self._failure is None:
            try:
                await self._read()
            except EsemError as exc:
                self._fail(exc)
            except anyio.ClosedResourceError:
                self._fail(ServiceUnavailable("session closed"))
            except _LOST as exc:
                try:
                    self._lost(exc, "closed the session")
                except EsemError:
                    return
                await self._resume()

    def _deliver(self, replies: list[Reply]) -> None:
        for reply in replies:
            if reply.req_id in self._pings:
                self._pings.discard(reply.req_id)
                self._slots.pop(reply.req_id, None)
                continue
            slot = self._slots.get(reply.req_id)
            if slot is not None:
                slot.reply = reply
                slot.event.set()

    async def _resume(self) -> None:
        """Reconnect with a backoff and RESUME, until resumed, refused or out of time."""
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
        assert self._down_since is not None
        if not await resume.retry(self._resume_once, anyio.sleep,
                                  end=self._down_since + self._resume_timeout,
                                  connect_timeout=self._connect_timeout,
                                  lost=lambda: self._failure is None):
            self._fail(resume.gave_up(self.socket_path, self._resume_timeout,
                                      self._down_reason))

    async def _resume_once(self, timeout: float) -> bool:
        """One attempt: True once resumed."""
        try:
            pub = recheck_key(self.socket_path, self._explicit_pubkey,
                              default_location=self._default_location, pinned=self._pub)
        except IntegrityError as exc:
            self._fail(exc)
            return False
        if pub is None:
            return False
        new = ClientSession(pub)
        stream: anyio.abc.ByteStream | None = None
        offered: tuple[bytes, bytes | None] | None = None
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_unix(str(self.socket_path))
                await stream.send(new.start())
                while not new.established:
                    new.receive_data(await stream.receive(RECV_BYTES))
                old = self._session
                assert old.resumption_secret is not None
                secret = self._secrets.pick(old.resumption_secret)
                old.resumption_secret = secret
                offered = (secret, new.resumption_secret)
                await stream.send(new.resume(old))
                replies: list[Reply] = []
                while not replies:
                    replies = new.receive_data(await stream.receive(RECV_BYTES))
            offered = None  # answered
            answer = replies[0]  # RESUME was the first request, so it is answered first
            if answer.opcode is not Opcode.RESUME:
                self._fail(ProtocolError("the first reply after RESUME does not answer it"))
                return False
            if answer.status is not Status.OK:
                if not (answer.status is Status.EACCES and self._secrets.refused()):
                    self._fail(resume.not_resumed(self.socket_path, answer.status,
                                                  answer.message))
                return False
            async with self._send_lock:
                self._session = new  # it has taken over the pending requests
                self._stream, stream = stream, None
                self._down_since = None
                self._secrets.clear()
                self.resumes += 1
                self._deliver(replies[1:])
                with anyio.CancelScope(shield=True):
                    try:
                        await self._stream.send(new.resend())
                    except _LOST as exc:
                        self._lost(exc, "went away")  # the reader notices and resumes again
            return True
        except IntegrityError as exc:
            self._fail(exc)
            return False
        except (TimeoutError, EsemError, *_LOST):
            return False
        finally:
            if stream is not None:
                if offered is not None:
                    self._secrets.unknown_outcome(*offered)
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

    async def _end(self) -> None:
        """Best effort: END, so the service ends the session now instead of keeping it
        for a resumption."""
        if self._failure is not None or self._down_since is not None:
            return
        async with self._send_lock:
            frame = self._session.send_request(Request(Opcode.END, 0),
                                               req_id=self._session.next_request_id())
            await self._stream.send(frame)

    async def _read(self) -> None:
        """Until the connection is lost (raises). Entered afresh after each resume: a
        keepalive PING still pending then counts from now."""
        ping_at = progress = time.monotonic()
        while True:
            data = None
            with anyio.move_on_after(self._keepalive / 2):
                data = await self._stream.receive(RECV_BYTES)
            now = time.monotonic()
            if data is None:  # quiet: keepalive while something is pending
                if not self._slots:
                    progress = now
                    continue
                if self._pings:
                    if now - ping_at >= self._keepalive:
                        raise ServiceUnavailable(
                            f"esem service at {self.socket_path} stopped answering "
                            f"({self._keepalive:.0f}s without a reply to a keepalive)")
                elif now - progress >= self._keepalive:
                    ping_at = now
                    self.keepalives += 1
                    self._pings.add(await self.send(Request(Opcode.PING, 0)))
                continue
            replies = self._session.receive_data(data)
            if replies:
                progress = now
            self._deliver(replies)

    # ---------------------------------------------------------------- opening

    async def open(self, name: str, oflag: int = 0, mode: int = 0o600, value: int = 0, *,
                   key: bytes | None = None, robust: bool = False) -> Semaphore:
        """As ``esem.aio.open``, through this session."""
        _check_args(name, oflag, mode, value, USE_ESEM, key)
        if not isinstance(robust, bool):
            raise TypeError(f"robust must be a bool, not {robust!r}")
        create, excl = bool(oflag & O_CREAT), bool(oflag & O_EXCL)
        mode &= ~_current_umask()
        flags = (OpenFlag.CREAT if create else OpenFlag.NONE) | (
            OpenFlag.EXCL if excl else OpenFlag.NONE) | (
            OpenFlag.ROBUST if robust else OpenFlag.NONE)
        bkey = bytes(key) if key is not None else None
        reply = await self.call(Request(Opcode.OPEN, 0, name=name, oflag=flags, mode=mode,
                                        value=value if create else 0,
                                        key=bkey if create else None), key=bkey)
        return Semaphore(self, name, reply.handle, bkey, reply.created)

    async def unlink(self, name: str, *, key: bytes | None = None) -> None:
        try:
            check_name(name)
            check_key(key)
        except CoreError as exc:
            raise ValueError(exc.message) from None
        await self.call(Request(Opcode.UNLINK, 0, name=name),
                        key=bytes(key) if key is not None else None)


@asynccontextmanager
async def connect(sock: str | os.PathLike[str] | None = None,
                  pubkey: bytes | str | None = None, *,
                  connect_timeout: float = CONNECT_TIMEOUT,
                  keepalive: float = KEEPALIVE_INTERVAL,
                  resume_timeout: float | None = None) -> AsyncIterator[Session]:
    """Open a session with the service (socket and key resolved as everywhere in esem),
    run its reader for the duration of the block, and end the session after it (END).
    ``resume_timeout``: seconds to keep resuming a lost connection (default
    ``ESEM_RESUME_TIMEOUT``, else 10; 0: never)."""
    path = Path(socket_path(sock))
    pub = pinned_key(path, pubkey, default_location=is_default_location(sock))
    session = ClientSession(pub)
    try:
        with anyio.fail_after(connect_timeout):
            stream = await anyio.connect_unix(str(path))
    except TimeoutError as exc:
        raise ServiceUnavailable(f"esem service at {path} did not answer") from exc
    except OSError as exc:
        raise ServiceUnavailable(f"no esem service at {path}: {exc}") from exc
    async with stream:
        try:
            with anyio.fail_after(connect_timeout):
                await stream.send(session.start())
                while not session.established:
                    session.receive_data(await stream.receive(RECV_BYTES))
        except TimeoutError as exc:
            raise ServiceUnavailable(f"esem service at {path} did not answer") from exc
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            raise ServiceUnavailable(
                f"esem service at {path} closed during the handshake") from exc
        s = Session(stream, session, path, keepalive, pub=pub, explicit_pubkey=pubkey,
                    default_location=is_default_location(sock),
                    connect_timeout=connect_timeout, resume_timeout=resume_timeout)
        async with anyio.create_task_group() as tg:
            tg.start_soon(s._reader)
            try:
                yield s
            finally:
                with anyio.move_on_after(END_LINGER, shield=True), suppress(Exception):
                    await s._end()
                s._fail(ServiceUnavailable("session closed"))
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await s._stream.aclose()


class Semaphore:
    """An open handle on an e-semaphore, bound to its ``Session``."""

    backend = "esem"

    def __init__(self, session: Session, name: str, token: bytes, key: bytes | None,
                 created: bool) -> None:
        self.session = session
        self.name = name
        self.created = created
        self._token = token
        self._key = key
        self._closed = False
        self.waits = 0
        self.returned = 0

    def __repr__(self) -> str:
        return f"<esem.anyio.Semaphore {self.name}{' closed' if self._closed else ''}>"

    def statistics(self) -> dict[str, object]:
        return {"name": self.name, "closed": self._closed, "waits": self.waits,
                "returned": self.returned}

    def _live(self) -> None:
        if self._closed:
            raise ExistentialError(f"semaphore {self.name} has been closed")

    async def acquire(self, timeout: float | None = None) -> bool:
        """True when granted (FIFO); with ``timeout`` (the service's deadline), False when
        it expires."""
        if timeout is not None:
            _check_timeout(timeout)
        if timeout is None or timeout * 1e9 >= MAX_TIMEOUT_NS:
            mode, ns = WaitMode.BLOCK, 0
        else:
            mode, ns = WaitMode.TIMED, int(timeout * 1e9)
        self._live()
        s = self.session
        with anyio.CancelScope(shield=True):  # the WAIT and its bookkeeping go together
            req_id = await s.send(Request(Opcode.WAIT, 0, handle=self._token,
                                          wait_mode=mode, timeout_ns=ns), key=self._key)
        try:
            reply = await s.reply(req_id)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._withdraw(req_id)
            raise
        if not wait_granted(reply.status, reply.message, miss=Status.ETIMEDOUT):
            return False
        self.waits += 1
        return True

    async def _withdraw(self, req_id: int) -> None:
        s = self.session
        cancel_id = await s.send(Request(Opcode.CANCEL, 0, target=req_id))
        final = await s.reply(req_id)
        await s.reply(cancel_id)
        if final.status is Status.OK:
            await s.call(Request(Opcode.POST, 0, handle=self._token), key=self._key)
            self.returned += 1

    async def try_acquire(self) -> bool:
        self._live()
        reply = await self.session.reply(await self.session.send(
            Request(Opcode.WAIT, 0, handle=self._token, wait_mode=WaitMode.TRY),
            key=self._key))
        if not wait_granted(reply.status, reply.message, miss=Status.EAGAIN):
            return False
        self.waits += 1
        return True

    async def release(self) -> None:
        self._live()
        await self.session.call(Request(Opcode.POST, 0, handle=self._token), key=self._key)

    async def getvalue(self) -> int:
        self._live()
        return (await self.session.call(Request(Opcode.GETVALUE, 0, handle=self._token),
                                        key=self._key)).value

    async def close(self) -> None:
        self._live()
        await self.session.call(Request(Opcode.CLOSE, 0, handle=self._token), key=self._key)
        self._closed = True

    async def unlink(self) -> None:
        await self.session.unlink(self.name, key=self._key)

    async def __aenter__(self) -> Semaphore:
        await self.acquire()
        return self

    async def __aexit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with anyio.CancelScope(shield=True):  # a unit taken is always given back
            await self.release()


__all__ = ["O_CREAT", "O_EXCL", "Semaphore", "Session", "connect"]
