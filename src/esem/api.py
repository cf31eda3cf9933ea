"""The POSIX-shaped public API and the one-flag switch.

``sem_open(name, oflag, mode, value, flags=USE_ESEM)`` returns an ``EsemSemaphore`` whose
count lives in the esem service; without ``USE_ESEM`` it returns a ``LegacySemaphore``
(a real POSIX named semaphore). Both have the same methods, raise the same exceptions,
and are safe to share between threads and across ``fork``.

Arguments are checked here, before anything is sent, and misuse raises ``ValueError`` or
``TypeError`` saying what is wrong.
"""

from __future__ import annotations

import os
import threading
import weakref
from types import TracebackType
from typing import Protocol

import esem.client.blocking as _blocking
from esem.client.blocking import Client, get_client
from esem.core.limits import check_key, check_name, check_value
from esem.core.status import CoreError, Status
from esem.core.table import WaitMode
from esem.errors import EsemError, ExistentialError, SignalError, error_for
from esem.legacy import LegacySemaphore, _check_timeout
from esem.legacy import unlink as _legacy_unlink
from esem.protocol.constants import MAX_TIMEOUT_NS, Opcode, OpenFlag
from esem.protocol.messages import Request

O_CREAT = os.O_CREAT
O_EXCL = os.O_EXCL
USE_ESEM = 1  # ``flags`` bit: keep this semaphore in the esem service
_FLAGS = USE_ESEM


class SemaphoreHandle(Protocol):
    """The handle interface both backends implement (``esem.Semaphore`` is the
    threading-style class of ``esem.sync``)."""

    name: str
    backend: str

    def wait(self) -> None: ...
    def trywait(self) -> None: ...
    def timedwait(self, seconds: float) -> None: ...
    def post(self) -> None: ...
    def getvalue(self) -> int: ...
    def close(self) -> None: ...
    def unlink(self) -> None: ...


Semaphore = SemaphoreHandle  # the Protocol's old name; esem.Semaphore is esem.sync's class


def _current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` is racy with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _argument_error(exc: CoreError) -> ValueError:
    return ValueError(exc.message)


class EsemSemaphore:
    """An open handle on an e-semaphore. Thread-safe; usable after ``fork`` (the child
    attaches its own handle through its own session on first use)."""

    backend = "esem"

    def __init__(self, client: Client, name: str, token: bytes, key: bytes | None,
                 created: bool, mode: int, *, robust: bool = False) -> None:
        self.name = name
        self.mode = mode
        self.created = created
        self.robust = robust
        self._key = key
        self._closed = False
        self._lock = threading.Lock()
        self._tokens: dict[int, tuple[Client, bytes]] = {os.getpid(): (client, token)}
        _all_handles.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<EsemSemaphore {self.name} {state}{' key-bound' if self._key else ''}>"

    @property
    def key_bound(self) -> bool:
        return self._key is not None

    # ------------------------------------------------------------ plumbing

    def _ctx(self) -> tuple[Client, bytes]:
        pid = os.getpid()
        with self._lock:
            if self._closed:
                raise ExistentialError(f"semaphore {self.name} has been closed")
            entry = self._tokens.get(pid)
            if entry is not None:
                if entry[0].failed is not None:
                    raise entry[0].failed
                return entry
            # Inherited across fork: attach through this process's own session, with
            # the token of the nearest ancestor that used the handle.
            _, ancestor = list(self._tokens.values())[-1]
            client = get_client()
            reply = client.call(Request(Opcode.ATTACH, 0, handle=ancestor), key=self._key)
            self._tokens = {pid: (client, reply.handle)}
            return client, reply.handle

    def _call(self, op: Opcode) -> int:
        client, token = self._ctx()
        return client.call(Request(op, 0, handle=token), key=self._key).value

    # ---------------------------------------------------------- operations

    def wait(self) -> None:
        """``sem_wait``: block until a unit is granted (FIFO)."""
        self._wait(WaitMode.BLOCK, 0)

    def trywait(self) -> None:
        """``sem_trywait``: take a unit or raise ``BusyError`` at once."""
        self._wait(WaitMode.TRY, 0)

    def timedwait(self, seconds: float) -> None:
        """``sem_timedwait`` with a relative timeout; ``BusyError`` when it expires. The
        deadline is kept by the service, so a grant and a timeout never both happen."""
        _check_timeout(seconds)
        self._wait(WaitMode.TIMED, min(int(seconds * 1e9), MAX_TIMEOUT_NS))

    def _wait(self, mode: WaitMode, timeout_ns: int) -> None:
        client, token = self._ctx()
        req = Request(Opcode.WAIT, 0, handle=token, wait_mode=mode, timeout_ns=timeout_ns)
        req_id = client.send(req, key=self._key)
        try:
            reply = client.wait_reply(req_id)
        except EsemError:
            raise
        except BaseException as exc:  # a signal handler raised, e.g. KeyboardInterrupt
            self._withdraw(client, token, req_id)
            if isinstance(exc, Exception):
                raise SignalError("the wait was interrupted by a signal") from exc
            raise
        if reply.status:
            raise error_for(reply.status, reply.message)

    def _withdraw(self, client: Client, token: bytes, req_id: int) -> None:
        """Cancel an interrupted wait without losing a unit: if the grant won the race,
        post the unit back."""
        cancel_id = client.send(Request(Opcode.CANCEL, 0, target=req_id))
        deferred: BaseException | None = None
        while True:
            try:
                final = client.wait_reply(req_id)
                client.wait_reply(cancel_id)
                break
            except EsemError:
                raise
            except BaseException as exc:  # another signal: finish the withdrawal first
                deferred = deferred or exc
        if final.status is Status.OK:
            client.call(Request(Opcode.POST, 0, handle=token), key=self._key)
        if deferred is not None:
            raise deferred

    def post(self) -> None:
        """``sem_post``: hand a unit to the first waiter, or add it to the count."""
        self._call(Opcode.POST)

    def getvalue(self) -> int:
        """``sem_getvalue`` (0 while waiters queue, never negative)."""
        return self._call(Opcode.GETVALUE)

    def close(self) -> None:
        """``sem_close``: this process's handle only; other processes keep theirs."""
        client, token = self._ctx()
        client.call(Request(Opcode.CLOSE, 0, handle=token), key=self._key)
        with self._lock:
            self._closed = True
            self._tokens.clear()

    def unlink(self) -> None:
        """``sem_unlink`` of this semaphore's name (with its key, if key-bound)."""
        sem_unlink(self.name, flags=USE_ESEM, key=self._key)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        """Pickled only while multiprocessing spawns a child (spawn, forkserver): the
        key then travels the way the start method passes its own secrets (a pipe to the
        child), never in an arbitrary pickle. The child re-attaches with the token while
        a holder of it lives, else reopens the name; with a key both are MAC'd, so it
        cannot end up on another semaphore of that name."""
        from multiprocessing.context import assert_spawning

        assert_spawning(self)
        with self._lock:
            if self._closed:
                raise ExistentialError(f"semaphore {self.name} has been closed")
            client, token = list(self._tokens.values())[-1]
        return _rebuild, (str(client.socket_path), self.name, token, self._key, self.mode,
                          self.robust)

    def __enter__(self) -> EsemSemaphore:
        self.wait()
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.post()


_all_handles: weakref.WeakSet[EsemSemaphore] = weakref.WeakSet()
_spawned_clients: dict[tuple[int, str], Client] = {}


def _rebuild(sock: str, name: str, token: bytes, key: bytes | None, mode: int,
             robust: bool) -> EsemSemaphore:
    """Unpickle a handle in a spawned child, through a session with the same service."""
    client = get_client()
    if str(client.socket_path) != sock:  # e.g. a forkserver started under another one
        client = _spawned_clients.get((os.getpid(), sock)) or Client(sock)
        if client.failed is not None:
            client = Client(sock)
        _spawned_clients[(os.getpid(), sock)] = client
    try:
        reply = client.call(Request(Opcode.ATTACH, 0, handle=token), key=key)
    except ExistentialError:  # every holder of the token has closed it: by name
        reply = client.call(Request(Opcode.OPEN, 0, name=name), key=key)
    return EsemSemaphore(client, name, reply.handle, key, False, mode, robust=robust)


def _after_fork_in_child() -> None:
    for handle in list(_all_handles):
        handle._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_args(name: str, oflag: int, mode: int, value: int, flags: int,
                key: bytes | None) -> None:
    try:
        check_name(name)
        if oflag & O_CREAT:
            check_value(value)
        check_key(key)
    except CoreError as exc:
        raise _argument_error(exc) from None
    if isinstance(oflag, bool) or not isinstance(oflag, int) or oflag & ~(O_CREAT | O_EXCL):
        raise ValueError(f"oflag {oflag!r} may hold only O_CREAT and O_EXCL")
    if oflag & O_EXCL and not oflag & O_CREAT:
        raise ValueError("O_EXCL needs O_CREAT")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode!r} is not a permission mode (0..0o7777)")
    if isinstance(flags, bool) or not isinstance(flags, int) or flags & ~_FLAGS:
        raise ValueError(f"flags {flags!r} may hold only USE_ESEM")
    if key is not None and not flags & USE_ESEM:
        raise ValueError("key binding needs flags=USE_ESEM (legacy semaphores have no keys)")


def sem_open(
    name: str,
    oflag: int = 0,
    mode: int = 0o600,
    value: int = 0,
    *,
    flags: int = 0,
    key: bytes | None = None,
    robust: bool = False,
    client: Client | None = None,
) -> EsemSemaphore | LegacySemaphore:
    """Open (``O_CREAT``: or create) the named semaphore ``name``.

    ``flags=USE_ESEM`` keeps it in the esem service; ``key`` (16-32 bytes, esem only)
    binds a new semaphore to a secret, and is needed for every later use of it.
    ``robust`` (esem only) releases the units a process held when it dies. The mode is
    masked by the process umask, as POSIX does.
    """
    _check_args(name, oflag, mode, value, flags, key)
    create, excl = bool(oflag & O_CREAT), bool(oflag & O_EXCL)
    mode &= ~_current_umask()
    if not flags & USE_ESEM:
        if robust:
            raise ValueError("robust semaphores need flags=USE_ESEM")
        return LegacySemaphore(name, create=create, excl=excl, mode=mode, value=value)
    client = client or get_client()
    oflags = (OpenFlag.CREAT if create else OpenFlag.NONE) | (
        OpenFlag.EXCL if excl else OpenFlag.NONE) | (OpenFlag.ROBUST if robust else OpenFlag.NONE)
    req = Request(Opcode.OPEN, 0, name=name, oflag=oflags, mode=mode,
                  value=value if create else 0, key=key if create else None)
    reply = client.call(req, key=bytes(key) if key is not None else None)
    return EsemSemaphore(client, name, reply.handle, bytes(key) if key else None,
                         reply.created, mode, robust=robust)


def connect(*, switchless: bool | None = None) -> Client:
    """Open this process's esem session now and return its client (the one
    ``get_client()`` returns and ``sem_open`` uses).

    ``switchless=True`` asks for the shared-memory fast path and raises
    ``SwitchlessUnavailable`` (a ``ServiceUnavailable``) if the service does not offer it;
    ``False`` keeps the socket. The choice holds for this process and for the children it
    forks later, each of which opens its own session in the same mode. ``None`` keeps an
    earlier choice, or else follows ``ESEM_SWITCHLESS`` (falling back to the socket, with
    a warning, if the service does not offer it). Call it before the first operation: a
    process whose session is already open in the other mode gets ``RuntimeError`` (its
    open handles belong to that session).
    """
    if switchless is not None and not isinstance(switchless, bool):
        raise TypeError(f"switchless must be a bool or None, not {switchless!r}")
    with _blocking._process_lock:
        current = _blocking._process_client
        usable = (current is not None and current.pid == os.getpid()
                  and current.failed is None)
        if usable and current is not None and current._session is not None:
            if switchless is not None and (current.mode == "switchless") != switchless:
                raise RuntimeError(
                    f"this process's esem session is already open in {current.mode} mode; "
                    "call esem.connect() before its first operation")
        elif usable and switchless is not None:
            _blocking._process_client = None  # not connected yet: made anew in this mode
        if switchless is not None:
            _blocking._process_switchless = switchless
    client = get_client()
    client.connect()
    return client


def sem_unlink(name: str, *, flags: int = 0, key: bytes | None = None,
               client: Client | None = None) -> None:
    """Remove the name ``name``; open handles keep working until closed."""
    try:
        check_name(name)
        check_key(key)
    except CoreError as exc:
        raise _argument_error(exc) from None
    if not flags & USE_ESEM:
        if key is not None:
            raise ValueError("key binding needs flags=USE_ESEM")
        _legacy_unlink(name)
        return
    client = client or get_client()
    client.call(Request(Opcode.UNLINK, 0, name=name), key=bytes(key) if key else None)
