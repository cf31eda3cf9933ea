"""A drop-in for the ``posix_ipc`` package whose semaphores are kept by esem.

Code written against posix_ipc switches with one line and keeps working, hardened::

    import esem.posix_ipc as posix_ipc

Only semaphores are hardened. ``Semaphore`` and ``unlink_semaphore`` are esem's; every
other name (``SharedMemory``, ``MessageQueue``, their functions and constants, the
exception classes, ``VERSION``...) is posix_ipc's own object, re-exported unchanged, so
a program that also uses shared memory or message queues runs as before.

The semaphore side behaves as posix_ipc does on Linux: names as ``str`` or ``bytes``,
with or without the leading slash (glibc drops it, so ``"jobs"`` and ``"/jobs"`` are one
semaphore; ``.name`` is the name as given); the same exception for the same misuse
(``TypeError`` for a wrong type, ``ValueError`` for a bad name or value, a ``TypeError``
for a negative timeout, as posix_ipc raises); flag bits other than ``O_CREAT`` and
``O_EXCL`` are ignored, as ``sem_open`` ignores them. Stricter in two places, where
posix_ipc passes garbage to the kernel: a mode outside 0..0o7777 is a ``ValueError``,
and so is an initial value above 2**32 (which posix_ipc truncates). ``unlink_semaphore``
of a name that cannot exist raises ``ExistentialError``, as glibc answers ENOENT for
it. A refusal raises an exception that
is both posix_ipc's class (``except posix_ipc.ExistentialError`` catches it) and esem's
(``except esem.ExistentialError`` too). What posix_ipc has no name for stays esem's
alone, on purpose: ``IntegrityError`` (tampering), ``ServiceUnavailable`` and
``QuotaExceeded`` are not ``posix_ipc.Error``, so a handler written for posix_ipc's
failures cannot swallow them. Three additions: ``key=`` binds a new semaphore to a
secret (key-bound semaphores), ``robust=`` releases the units a dead process held, and
``accept_foreign=`` lets ``O_CREAT`` open a semaphore another uid created (refused by
default: name squatting).
"""

from __future__ import annotations

import operator
import secrets
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import posix_ipc as _real

from esem import errors as _errors
from esem.api import O_CREAT as O_CREAT_OS
from esem.api import O_EXCL as O_EXCL_OS
from esem.api import USE_ESEM, EsemSemaphore, sem_open, sem_unlink
from esem.core.limits import check_name as _check_name
from esem.core.status import CoreError as _CoreError
from esem.core.status import Status as _Status

# Everything posix_ipc offers but its semaphores, as posix_ipc's own objects, re-exported
# unchanged: named one by one so that users' type checkers see them, then whatever a
# later posix_ipc adds.
BusyError = _real.BusyError
Error = _real.Error
ExistentialError = _real.ExistentialError
MESSAGE_QUEUES_SUPPORTED = _real.MESSAGE_QUEUES_SUPPORTED
MessageQueue = _real.MessageQueue
O_CREAT = _real.O_CREAT
O_CREX = _real.O_CREX
O_EXCL = _real.O_EXCL
O_NONBLOCK = _real.O_NONBLOCK
O_RDONLY = _real.O_RDONLY
O_RDWR = _real.O_RDWR
O_TRUNC = _real.O_TRUNC
O_WRONLY = _real.O_WRONLY
PAGE_SIZE = _real.PAGE_SIZE
PermissionsError = _real.PermissionsError
QUEUE_MESSAGES_MAX_DEFAULT = _real.QUEUE_MESSAGES_MAX_DEFAULT
QUEUE_MESSAGE_SIZE_MAX_DEFAULT = _real.QUEUE_MESSAGE_SIZE_MAX_DEFAULT
QUEUE_PRIORITY_MAX = _real.QUEUE_PRIORITY_MAX
SEMAPHORE_TIMEOUT_SUPPORTED = _real.SEMAPHORE_TIMEOUT_SUPPORTED
SEMAPHORE_VALUE_MAX = _real.SEMAPHORE_VALUE_MAX
SEMAPHORE_VALUE_SUPPORTED = _real.SEMAPHORE_VALUE_SUPPORTED
SharedMemory = _real.SharedMemory
SignalError = _real.SignalError
USER_SIGNAL_MAX = _real.USER_SIGNAL_MAX
USER_SIGNAL_MIN = _real.USER_SIGNAL_MIN
VERSION = _real.VERSION
unlink_message_queue = _real.unlink_message_queue
unlink_shared_memory = _real.unlink_shared_memory
_HARDENED = frozenset({"Semaphore", "unlink_semaphore"})
_REEXPORTED = sorted(n for n in dir(_real) if not n.startswith("_") and n not in _HARDENED)
globals().update({n: getattr(_real, n) for n in _REEXPORTED if n not in globals()})


def _both(esem_cls: type[_errors.EsemError],
          real_cls: type[Exception]) -> type[_errors.EsemError]:
    return type(esem_cls.__name__, (esem_cls, real_cls), {
        "__module__": __name__,
        "__doc__": f"esem's {esem_cls.__name__} that is also posix_ipc's {real_cls.__name__}.",
    })


# esem's refusal classes, most specific first, with the class that raises them here.
_TRANSLATED: tuple[tuple[type[_errors.EsemError], type[_errors.EsemError]], ...] = (
    (_errors.KeyRejected, _both(_errors.KeyRejected, _real.PermissionsError)),
    (_errors.PermissionsError, _both(_errors.PermissionsError, _real.PermissionsError)),
    (_errors.ExistentialError, _both(_errors.ExistentialError, _real.ExistentialError)),
    (_errors.BusyError, _both(_errors.BusyError, _real.BusyError)),
    (_errors.SignalError, _both(_errors.SignalError, _real.SignalError)),
)

_DUAL_EXISTENTIAL = _TRANSLATED[2][1]
_R = TypeVar("_R")


def _translated(call: Callable[[], _R]) -> _R:
    """Run ``call``; a refusal posix_ipc has a class for is re-raised as one that is
    both posix_ipc's and esem's, with the same message, status and cause."""
    try:
        return call()
    except _errors.EsemError as exc:
        for esem_cls, dual in _TRANSLATED:
            if isinstance(exc, esem_cls) and not isinstance(exc, dual):
                new = dual(str(exc), status=exc.status)
                raise new.with_traceback(exc.__traceback__) from exc.__cause__
        raise


def _name(name: object) -> str:
    """posix_ipc's name forms on Linux: ``str`` or ``bytes``, the leading slash optional
    (glibc strips every leading slash, so ``"jobs"``, ``"/jobs"`` and ``"//jobs"`` name
    one semaphore)."""
    return "/" + _given(name).lstrip("/")


def _given(name: object) -> str:
    if isinstance(name, bytes | bytearray):
        raw = bytes(name)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"semaphore name {raw!r} is not valid UTF-8") from None
    if not isinstance(name, str):
        raise TypeError(f"semaphore name must be None, str or bytes, not "
                        f"{type(name).__name__}")
    return name


def _int(what: str, value: object) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None


_RANDOM_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _random_name() -> str:
    return "/" + "".join(secrets.choice(_RANDOM_NAME_ALPHABET) for _ in range(12))


class Semaphore:
    """``posix_ipc.Semaphore``, kept in the esem service."""

    def __init__(
        self,
        name: str | bytes | None,
        flags: int = 0,
        mode: int = 0o600,
        initial_value: int = 0,
        *,
        key: bytes | None = None,
        robust: bool = False,
        accept_foreign: bool = False,
    ) -> None:
        flags = _int("flags", flags)
        mode = _int("mode", mode)
        initial_value = _int("initial_value", initial_value)
        oflag = (O_CREAT_OS if flags & O_CREAT else 0) | (O_EXCL_OS if flags & O_EXCL else 0)
        if name is None:
            if not flags & O_EXCL:
                raise ValueError("Name can only be None if O_EXCL is set")
            while True:
                try:
                    given = _random_name()
                    self._h = self._open(given, oflag, mode, initial_value, key, robust)
                    break
                except _errors.ExistentialError as exc:
                    if exc.status is not _Status.EEXIST:
                        raise
                    # the random name was taken; draw another
        else:
            given = _given(name)
            path = _name(given)
            self._h = self._open(path, oflag, mode, initial_value, key, robust, accept_foreign)
        self._given = given

    @staticmethod
    def _open(name: str, oflag: int, mode: int, value: int, key: bytes | None,
              robust: bool, accept_foreign: bool = False) -> EsemSemaphore:
        return _translated(lambda: sem_open(name, oflag, mode, value, flags=USE_ESEM,
                                            key=key, robust=robust,
                                            accept_foreign=accept_foreign))

    def __repr__(self) -> str:
        return f'esem.posix_ipc.Semaphore("{self.name}", mode={self.mode:04o})'

    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        """The name as it was given (posix_ipc's ``.name``), with or without the slash."""
        return self._given

    @property
    def mode(self) -> int:
        return self._h.mode

    @property
    def value(self) -> int:
        return _translated(self._h.getvalue)

    def acquire(self, timeout: float | None = None) -> None:
        """Block (``None``), try once (``0``), or wait up to ``timeout`` seconds;
        ``BusyError`` when no unit came."""
        if timeout is None:
            _translated(self._h.wait)
            return
        if not isinstance(timeout, int | float) or not timeout >= 0:
            # posix_ipc's exception and message for a bad timeout, negative ones included.
            raise TypeError("The timeout must be None or a non-negative number")
        seconds = float(timeout)  # posix_ipc takes a bool as 0 or 1 second
        if seconds == 0:
            _translated(self._h.trywait)
        else:
            _translated(lambda: self._h.timedwait(seconds))

    def release(self) -> None:
        _translated(self._h.post)

    def close(self) -> None:
        _translated(self._h.close)

    def unlink(self) -> None:
        _translated(self._h.unlink)

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def unlink_semaphore(name: str | bytes, *, key: bytes | None = None) -> None:
    """``posix_ipc.unlink_semaphore`` of an e-semaphore (with its key, if key-bound)."""
    path = _name(name)
    try:
        _check_name(path)
    except _CoreError as exc:
        # glibc's sem_unlink answers ENOENT for a name that cannot exist, and posix_ipc
        # raises ExistentialError for it: so do we.
        raise _DUAL_EXISTENTIAL(f"No semaphore exists with the specified name "
                                f"({exc.message})", status=_Status.ENOENT) from None
    _translated(lambda: sem_unlink(path, flags=USE_ESEM, key=key))


__all__ = sorted({*_REEXPORTED, *_HARDENED})
