"""The POSIX-shaped public API and the one-flag switch.

``sem_open(name, oflag, mode, value, flags=USE_ESEM)`` returns an ``EsemSemaphore`` whose
count lives in the esem service; without ``USE_ESEM`` it returns a ``LegacySemaphore``
(a real POSIX named semaphore). Both have the same methods, raise the same exceptions,
and are safe to share between threads and across ``fork``.

Arguments are checked here, before anything is sent, and misuse raises ``ValueError`` or
``TypeError`` saying what is wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from types import TracebackType
from typing import Final, Literal, Protocol, overload

import esem.client.blocking as _blocking
from esem.client.blocking import Client, get_client
from esem.core.limits import check_key, check_name, check_value
from esem.core.status import CoreError, Status
from esem.core.table import WaitMode
from esem.errors import EsemError, ExistentialError, SignalError, error_for
from esem.legacy import LegacySemaphore, timeout_ns
from esem.legacy import unlink as _legacy_unlink
from esem.protocol.constants import Opcode, OpenFlag
from esem.protocol.messages import Request

O_CREAT = os.O_CREAT
O_EXCL = os.O_EXCL
USE_ESEM: Final = 1  # ``flags`` bit: keep this semaphore in the esem service
_FLAGS = USE_ESEM

log = logging.getLogger("esem.client")


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


def _need_int(what: str, value: object) -> None:
    """``TypeError`` unless ``value`` is an int (a bool is not a count, a mode or flags)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")


def _name_arg(name: object) -> str:
    """The semaphore name as ``str``: a ``str`` as given, ``bytes`` decoded as UTF-8 (the
    wire's encoding); anything else is a ``TypeError``. Its form is checked later."""
    if isinstance(name, str):
        return name
    if isinstance(name, bytes | bytearray):
        try:
            return bytes(name).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"semaphore name {bytes(name)!r} is not valid UTF-8") from None
    raise TypeError(f"semaphore name must be str or bytes, not {type(name).__name__}")


def _key_arg(key: object) -> bytes | None:
    if key is None:
        return None
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError(f"key must be bytes, not {type(key).__name__}")
    return bytes(key)


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
            # The pid alone could be a dead ancestor's, reused by a descendant forked
            # without atfork handlers: the entry is ours only if its client is.
            if entry is not None and entry[0].in_own_process:
                return entry  # a failed session raises its failure when used
            # Inherited across fork: attach through this process's own session, with
            # the token of the nearest ancestor that used the handle.
            _, ancestor = list(self._tokens.values())[-1]
            client = get_client()
            reply = client.call(Request(Opcode.ATTACH, 0, handle=ancestor), key=self._key)
            self._tokens = {pid: (client, reply.handle)}
            return client, reply.handle


    # ---------------------------------------------------------- operations
    # On a native session (``client._native``, esem.client.native) each operation is one
    # call into esem._native_core, with no Request or Reply object; a failure it raises is
    # the session's (``_native_failed``), sticky as on the Python transport.

    def wait(self) -> None:
        """``sem_wait``: block until a unit is granted (FIFO)."""
        self._wait(WaitMode.BLOCK, 0)

    def trywait(self) -> None:
        """``sem_trywait``: take a unit or raise ``BusyError`` at once."""
        self._wait(WaitMode.TRY, 0)

    def timedwait(self, seconds: float) -> None:
        """``sem_timedwait`` with a relative timeout; ``BusyError`` when it expires. The
        deadline is kept by the service, so a grant and a timeout never both happen.
        ``inf`` (or a timeout beyond ``MAX_TIMEOUT_NS``, about 292 years) waits with no
        deadline, as ``wait()``; NaN or a negative timeout is a ``ValueError``."""
        ns = timeout_ns(seconds)
        if ns is None:
            self._wait(WaitMode.BLOCK, 0)
        else:
            self._wait(WaitMode.TIMED, ns)

    def _wait(self, mode: WaitMode, timeout_ns: int) -> None:
        client, token = self._ctx()
        native = client._native
        if native is not None:
            client.stats.requests += 1
            try:
                # Withdraws the wait itself if a signal handler raises (and re-raises).
                native.wait(token, mode, timeout_ns, self._key)
            except EsemError as exc:
                raise client._native_failed(exc) from None
            except Exception as exc:  # a signal handler raised; the wait was withdrawn
                raise SignalError("the wait was interrupted by a signal") from exc
            return
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
        client, token = self._ctx()
        native = client._native
        if native is None:
            client.call(Request(Opcode.POST, 0, handle=token), key=self._key)
            return
        client.stats.requests += 1
        try:
            native.post(token, self._key)
        except EsemError as exc:
            raise client._native_failed(exc) from None

    def getvalue(self) -> int:
        """``sem_getvalue`` (0 while waiters queue, never negative)."""
        client, token = self._ctx()
        native = client._native
        if native is None:
            return client.call(Request(Opcode.GETVALUE, 0, handle=token), key=self._key).value
        client.stats.requests += 1
        try:
            return native.getvalue(token, self._key)
        except EsemError as exc:
            raise client._native_failed(exc) from None

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
    """Every argument's type (``TypeError``), then its value (``ValueError``)."""
    _need_int("oflag", oflag)
    _need_int("mode", mode)
    _need_int("value", value)
    _need_int("flags", flags)
    try:
        check_name(name)
        if oflag & O_CREAT:
            check_value(value)
        check_key(key)
    except CoreError as exc:
        raise _argument_error(exc) from None
    if oflag & ~(O_CREAT | O_EXCL):
        raise ValueError(f"oflag {oflag!r} may hold only O_CREAT and O_EXCL")
    if oflag & O_EXCL and not oflag & O_CREAT:
        raise ValueError("O_EXCL needs O_CREAT")
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode!r} is not a permission mode (0..0o7777)")
    if flags & ~_FLAGS:
        raise ValueError(f"flags {flags!r} may hold only USE_ESEM")
    if key is not None and not flags & USE_ESEM:
        raise ValueError("key binding needs flags=USE_ESEM (legacy semaphores have no keys)")


@overload
def sem_open(
    name: str | bytes,
    oflag: int = ...,
    mode: int = ...,
    value: int = ...,
    *,
    flags: Literal[1],
    key: bytes | None = ...,
    robust: bool = ...,
    accept_foreign: bool = ...,
    client: Client | None = ...,
) -> EsemSemaphore: ...


@overload
def sem_open(
    name: str | bytes,
    oflag: int = ...,
    mode: int = ...,
    value: int = ...,
    *,
    flags: Literal[0] = ...,
    key: None = ...,
    robust: Literal[False] = ...,
    accept_foreign: Literal[False] = ...,
    client: None = ...,
) -> LegacySemaphore: ...


@overload
def sem_open(
    name: str | bytes,
    oflag: int = ...,
    mode: int = ...,
    value: int = ...,
    *,
    flags: int = ...,
    key: bytes | None = ...,
    robust: bool = ...,
    accept_foreign: bool = ...,
    client: Client | None = ...,
) -> EsemSemaphore | LegacySemaphore: ...


def sem_open(
    name: str | bytes,
    oflag: int = 0,
    mode: int = 0o600,
    value: int = 0,
    *,
    flags: int = 0,
    key: bytes | None = None,
    robust: bool = False,
    accept_foreign: bool = False,
    client: Client | None = None,
) -> EsemSemaphore | LegacySemaphore:
    """Open (``O_CREAT``: or create) the named semaphore ``name``.

    ``flags=USE_ESEM`` keeps it in the esem service; ``key`` (16-32 bytes, esem only)
    binds a new semaphore to a secret, and is needed for every later use of it.
    ``robust`` (esem only) releases the units a process held when it dies. The mode is
    masked by the process umask, as POSIX does. ``O_CREAT`` of an existing semaphore that
    another non-root uid owns raises ``PermissionsError`` unless ``accept_foreign``.
    Wrong types raise ``TypeError``, bad values ``ValueError``, before anything is sent.
    """
    name = _name_arg(name)
    key = _key_arg(key)
    _check_args(name, oflag, mode, value, flags, key)
    if not isinstance(robust, bool):
        raise TypeError(f"robust must be a bool, not {type(robust).__name__}")
    create, excl = bool(oflag & O_CREAT), bool(oflag & O_EXCL)
    mode &= ~_current_umask()
    if not flags & USE_ESEM:
        if robust or accept_foreign:
            raise ValueError("robust= and accept_foreign= need flags=USE_ESEM")
        try:
            return LegacySemaphore(name, create=create, excl=excl, mode=mode, value=value)
        except ExistentialError as exc:
            if create or not _exists_in_service(name, client):
                raise
            raise _missing(name, "POSIX semaphore", "an e-semaphore: pass flags=USE_ESEM",
                           exc) from exc
    client = client or get_client()
    oflags = (OpenFlag.CREAT if create else OpenFlag.NONE) | (
        OpenFlag.EXCL if excl else OpenFlag.NONE) | (OpenFlag.ROBUST if robust else OpenFlag.NONE)
    if accept_foreign:
        oflags |= OpenFlag.FOREIGN
    req = Request(Opcode.OPEN, 0, name=name, oflag=oflags, mode=mode,
                  value=value if create else 0, key=key if create else None)
    try:
        reply = client.call(req, key=key)
    except ExistentialError as exc:
        if exc.status is not Status.ENOENT or not _exists_as_legacy(name):
            raise
        raise _missing(name, "e-semaphore", "a POSIX semaphore: drop flags=USE_ESEM",
                       exc) from exc
    return EsemSemaphore(client, name, reply.handle, key, reply.created, mode,
                         robust=robust)


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
    _blocking.check_fork()
    with _blocking._process_lock:
        current = _blocking._process_client
        usable = current is not None and current.failed is None
        if usable and current is not None and current.connected:
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


def sem_unlink(name: str | bytes, *, flags: int = 0, key: bytes | None = None,
               client: Client | None = None) -> None:
    """Remove the name ``name``; open handles keep working until closed.

    Without ``USE_ESEM`` this is the POSIX ``sem_unlink``. When the name is missing from
    the backend asked but exists in the other one (a running esem service, or
    ``/dev/shm``), the ``ExistentialError`` says so instead of just "no semaphore";
    ``sem_open`` without ``O_CREAT`` does the same."""
    name = _name_arg(name)
    key = _key_arg(key)
    _need_int("flags", flags)
    try:
        check_name(name)
        check_key(key)
    except CoreError as exc:
        raise _argument_error(exc) from None
    if flags & ~_FLAGS:
        raise ValueError(f"flags {flags!r} may hold only USE_ESEM")
    if not flags & USE_ESEM:
        if key is not None:
            raise ValueError("key binding needs flags=USE_ESEM")
        try:
            _legacy_unlink(name)
        except ExistentialError as exc:
            if not _exists_in_service(name, client):
                raise
            raise _missing(name, "POSIX semaphore", "an e-semaphore: pass flags=USE_ESEM",
                           exc) from exc
        return
    client = client or get_client()
    try:
        client.call(Request(Opcode.UNLINK, 0, name=name), key=key)
    except ExistentialError as exc:
        if exc.status is not Status.ENOENT or not _exists_as_legacy(name):
            raise
        raise _missing(name, "e-semaphore", "a POSIX semaphore: drop flags=USE_ESEM",
                       exc) from exc


def _missing(name: str, what: str, instead: str, exc: ExistentialError) -> ExistentialError:
    """The "no such semaphore" error, saying where the name does exist."""
    return ExistentialError(f"no {what} {name}, but it exists as {instead}",
                            status=exc.status or Status.ENOENT)


# Where glibc keeps a named semaphore "/NAME" (Linux).
_LEGACY_DIR = "/dev/shm"


def _exists_as_legacy(name: str) -> bool:
    return os.path.exists(f"{_LEGACY_DIR}/sem.{name[1:]}")


# A hint must never make an error slow: a service that exists but does not answer is
# given about this long (connect + handshake, then one keepalive round) before the
# hint is dropped.
_HINT_TIMEOUT = 1.0


def _exists_in_service(name: str, client: Client | None) -> bool:
    """Whether an esem service that is already running has a semaphore ``name``.
    Never starts a service; any failure to ask means "don't know", hence False."""
    own = client is None
    try:
        if own:
            client = Client(connect_timeout=_HINT_TIMEOUT, keepalive=_HINT_TIMEOUT,
                            switchless=False)
        assert client is not None
        reply = client.wait_reply(client.send(Request(Opcode.STAT, 0, name=name)))
    except (EsemError, OSError, ValueError) as exc:
        log.debug("could not ask the esem service about %s: %s", name, exc)
        return False
    finally:
        if own and client is not None:
            with contextlib.suppress(EsemError, OSError):
                client.close()
    # Refusals that still prove the name exists: no read permission, or a key needed.
    return reply.status in (Status.OK, Status.EACCES, Status.EKEYREJECTED)
