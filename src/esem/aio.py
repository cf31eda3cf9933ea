"""e-semaphores for asyncio: ``await esem.aio.open(...)``, ``async with sem:``.

The shape is ``asyncio.Semaphore``'s, over a named e-semaphore that lives in the
service: ``await sem.acquire()`` returns True (FIFO at the service),
``await sem.acquire(timeout=s)`` returns False when the service's deadline passes (the
deadline is the service's, never a local timer racing a grant), ``sem.release()`` posts
at once and returns a future that reports the service's answer (await it to see an
overflow), ``async with sem:`` is acquire/release. Errors are the blocking API's
(``esem.EsemError`` and its tree; ``ValueError``/``TypeError`` before anything is sent).

Cancellation (``task.cancel()``, ``asyncio.timeout``) withdraws a queued wait at the
service: CANCEL is sent, both replies are awaited (whatever else cancels the task in the
meantime), a unit granted at that very instant is posted back, and ``CancelledError`` is
re-raised. No unit is lost or created.

Handles belong to the session of the loop that opened them; used from another loop (or a
forked child's loop) they attach through that loop's own session on first use.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from types import TracebackType

from esem.api import USE_ESEM, _check_args, _current_umask
from esem.client.aio import AsyncClient, get_async_client
from esem.core.limits import check_key, check_name
from esem.core.status import CoreError, Status
from esem.core.table import WaitMode
from esem.errors import BusyError, EsemError, ExistentialError, error_for, wait_granted
from esem.legacy import _check_timeout
from esem.protocol.constants import MAX_TIMEOUT_NS, Opcode, OpenFlag
from esem.protocol.messages import Reply, Request

O_CREAT = os.O_CREAT
O_EXCL = os.O_EXCL


class AsyncSemaphore:
    """An open handle on an e-semaphore for asyncio code (see the module docstring)."""

    backend = "esem"

    def __init__(self, client: AsyncClient, name: str, token: bytes, key: bytes | None,
                 created: bool, mode: int) -> None:
        self.name = name
        self.mode = mode
        self.created = created
        self._key = key
        self._closed = False
        self._tokens: weakref.WeakKeyDictionary[AsyncClient, bytes] = (
            weakref.WeakKeyDictionary({client: token}))
        self._last_token = token
        self._home = client  # the session that opened it: used whenever its loop runs
        self._attaching: dict[AsyncClient, asyncio.Future[bytes]] = {}
        self.waits = 0  # granted waits through this handle (a statistic)
        self.returned = 0  # units granted as their wait was cancelled, posted back

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<esem.aio.AsyncSemaphore {self.name} {state}{' key-bound' if self._key else ''}>"

    @property
    def key_bound(self) -> bool:
        return self._key is not None

    def statistics(self) -> dict[str, object]:
        """What this handle did (local counts; the semaphore's state is the service's)."""
        return {"name": self.name, "closed": self._closed, "key_bound": self.key_bound,
                "waits": self.waits, "returned": self.returned,
                "sessions": len(self._tokens)}

    # ------------------------------------------------------------ plumbing

    def _client(self) -> AsyncClient:
        """The opening session while its loop runs (its failure is sticky), else the
        running loop's own session."""
        home = self._home
        if home.pid == os.getpid() and home.loop is asyncio.get_running_loop():
            if home.failed is not None:
                raise home.failed
            return home
        return get_async_client()

    def _ready(self) -> tuple[AsyncClient, bytes] | None:
        """The session and token to use, if no I/O is needed to get them."""
        if self._closed:
            raise ExistentialError(f"semaphore {self.name} has been closed")
        client = self._client()
        token = self._tokens.get(client)
        if token is not None and client.connected:
            return client, token
        return None

    async def _ctx(self) -> tuple[AsyncClient, bytes]:
        ready = self._ready()
        if ready is not None:
            return ready
        client = self._client()
        await client.connect()
        token = self._tokens.get(client)
        if token is not None:
            return client, token
        # Another loop's (or a fork parent's) handle: attach through this session, once.
        pending = self._attaching.get(client)
        if pending is None:
            pending = asyncio.ensure_future(self._attach(client))
            self._attaching[client] = pending
        return client, await asyncio.shield(pending)

    async def _attach(self, client: AsyncClient) -> bytes:
        try:
            reply = await client.call(Request(Opcode.ATTACH, 0, handle=self._last_token),
                                      key=self._key)
            self._tokens[client] = self._last_token = reply.handle
            return reply.handle
        finally:
            self._attaching.pop(client, None)

    async def _call(self, op: Opcode) -> Reply:
        client, token = await self._ctx()
        return await client.call(Request(op, 0, handle=token), key=self._key)

    # ---------------------------------------------------------- operations

    async def acquire(self, timeout: float | None = None) -> bool:
        """Wait for a unit (FIFO). True when granted; with ``timeout`` (seconds, kept by
        the service; 0 = try once), False when it expires."""
        if timeout is not None:
            _check_timeout(timeout)
        if timeout is None or timeout * 1e9 >= MAX_TIMEOUT_NS:  # inf: no deadline
            mode, timeout_ns = WaitMode.BLOCK, 0
        else:
            mode, timeout_ns = WaitMode.TIMED, int(timeout * 1e9)
        client, token = await self._ctx()
        req = Request(Opcode.WAIT, 0, handle=token, wait_mode=mode, timeout_ns=timeout_ns)
        req_id, fut = client._send(req, self._key)
        try:
            reply = await asyncio.shield(fut)
        except asyncio.CancelledError:
            await self._withdraw(client, token, req_id, fut)
            raise
        if not wait_granted(reply.status, reply.message, miss=Status.ETIMEDOUT):
            return False
        self.waits += 1
        return True

    async def _withdraw(self, client: AsyncClient, token: bytes, req_id: int,
                        fut: asyncio.Future[Reply]) -> None:
        """The awaiting task was cancelled: withdraw the wait at the service and give back
        a unit that was granted at the same instant. Runs to the end even if the task is
        cancelled again meanwhile: those cancellations are absorbed, and the caller then
        raises one CancelledError."""
        work = asyncio.ensure_future(self._withdraw_steps(client, token, req_id, fut))
        while not work.done():
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                continue  # the first CancelledError is re-raised by our caller
        work.result()  # an EsemError from the service wins over the cancellation

    async def _withdraw_steps(self, client: AsyncClient, token: bytes, req_id: int,
                              fut: asyncio.Future[Reply]) -> None:
        if not fut.done():
            cancel = client.send(Request(Opcode.CANCEL, 0, target=req_id))
            await fut  # answered before the CANCEL's reply (PROTOCOL.md section 10)
            await cancel
        if fut.result().status is Status.OK:
            reply = await client.send(Request(Opcode.POST, 0, handle=token), key=self._key)
            if reply.status:
                raise error_for(reply.status, reply.message)
            self.returned += 1

    async def try_acquire(self) -> bool:
        """Take a unit if one is free, without queueing."""
        client, token = await self._ctx()
        reply = await client.send(
            Request(Opcode.WAIT, 0, handle=token, wait_mode=WaitMode.TRY), key=self._key)
        if not wait_granted(reply.status, reply.message, miss=Status.EAGAIN):
            return False
        self.waits += 1
        return True

    def release(self) -> asyncio.Future[None]:
        """Post a unit: sent at once (so releases keep their order), the returned future
        resolves when the service accepted it or raises its error (``SemaphoreOverflow``).
        Must be called from a coroutine of the loop the handle is used on."""
        loop = asyncio.get_running_loop()
        ready = self._ready()
        done: asyncio.Future[None] = loop.create_future()
        task: asyncio.Future[Reply]
        if ready is None:
            task = asyncio.ensure_future(self._call(Opcode.POST))
        else:
            client, token = ready
            task = client.send(Request(Opcode.POST, 0, handle=token), key=self._key)

        def finish(f: asyncio.Future[Reply]) -> None:
            if done.cancelled():
                return
            if f.cancelled():
                done.cancel()
            elif (exc := f.exception()) is not None:
                done.set_exception(exc)
            elif f.result().status:
                done.set_exception(error_for(f.result().status, f.result().message))
            else:
                done.set_result(None)

        task.add_done_callback(finish)
        return done

    async def getvalue(self) -> int:
        """The count (0, never negative, while waiters queue)."""
        return (await self._call(Opcode.GETVALUE)).value

    value = getvalue

    async def close(self) -> None:
        """Close this handle in the running loop's session (others keep theirs)."""
        client, token = await self._ctx()
        await client.call(Request(Opcode.CLOSE, 0, handle=token), key=self._key)
        self._closed = True
        self._tokens.clear()

    async def unlink(self) -> None:
        """Remove this semaphore's name (with its key, if key-bound)."""
        await unlink(self.name, key=self._key)

    async def __aenter__(self) -> AsyncSemaphore:
        await self.acquire()
        return self

    async def __aexit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


async def open(  # shadows the builtin inside this module only, as os.open does
    name: str,
    oflag: int = 0,
    mode: int = 0o600,
    value: int = 0,
    *,
    key: bytes | None = None,
    robust: bool = False,
    client: AsyncClient | None = None,
) -> AsyncSemaphore:
    """Open (``O_CREAT``: or create) the e-semaphore ``name`` through the running loop's
    session. Arguments as ``esem.sem_open(..., flags=USE_ESEM)``; checked before
    anything is sent."""
    _check_args(name, oflag, mode, value, USE_ESEM, key)
    if not isinstance(robust, bool):
        raise TypeError(f"robust must be a bool, not {robust!r}")
    create, excl = bool(oflag & O_CREAT), bool(oflag & O_EXCL)
    mode &= ~_current_umask()
    client = client or get_async_client()
    oflags = (OpenFlag.CREAT if create else OpenFlag.NONE) | (
        OpenFlag.EXCL if excl else OpenFlag.NONE) | (OpenFlag.ROBUST if robust else OpenFlag.NONE)
    bkey = bytes(key) if key is not None else None
    req = Request(Opcode.OPEN, 0, name=name, oflag=oflags, mode=mode,
                  value=value if create else 0, key=bkey if create else None)
    reply = await client.call(req, key=bkey)
    return AsyncSemaphore(client, name, reply.handle, bkey, reply.created, mode)


async def unlink(name: str, *, key: bytes | None = None,
                 client: AsyncClient | None = None) -> None:
    """Remove the e-semaphore name ``name``; open handles keep working until closed."""
    try:
        check_name(name)
        check_key(key)
    except CoreError as exc:
        raise ValueError(exc.message) from None
    client = client or get_async_client()
    await client.call(Request(Opcode.UNLINK, 0, name=name),
                      key=bytes(key) if key is not None else None)


__all__ = ["O_CREAT", "O_EXCL", "AsyncClient", "AsyncSemaphore", "BusyError", "EsemError",
           "get_async_client", "open", "unlink"]
