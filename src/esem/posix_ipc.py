"""A drop-in for the semaphore API of the ``posix_ipc`` package, backed by esem.

Code written against posix_ipc switches with one line and keeps working, hardened::

    import esem.posix_ipc as posix_ipc

Same constants, same ``Semaphore`` class (``acquire(timeout=None)``, ``release()``,
``value``, ``name``, ``mode``, ``close()``, ``unlink()``, context manager), same
``unlink_semaphore``, same exception names with the same meanings. Three additions:
``key=`` binds a new semaphore to a secret (see key-bound semaphores), ``robust=``
releases the units a dead process held, and ``accept_foreign=`` lets ``O_CREAT`` open a
semaphore another uid created (refused by default: name squatting).
"""

from __future__ import annotations

import secrets
from types import TracebackType

import posix_ipc as _real

from esem.api import O_CREAT as O_CREAT_OS
from esem.api import O_EXCL as O_EXCL_OS
from esem.api import USE_ESEM, EsemSemaphore, sem_open, sem_unlink
from esem.core.limits import SEM_VALUE_MAX as _SEM_VALUE_MAX
from esem.errors import BusyError, EsemError, ExistentialError, PermissionsError, SignalError

O_CREAT: int = _real.O_CREAT
O_EXCL: int = _real.O_EXCL
O_CREX: int = _real.O_CREX
SEMAPHORE_TIMEOUT_SUPPORTED = True
SEMAPHORE_VALUE_SUPPORTED = True
SEMAPHORE_VALUE_MAX = _SEM_VALUE_MAX
Error = EsemError

_RANDOM_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _random_name() -> str:
    return "/" + "".join(secrets.choice(_RANDOM_NAME_ALPHABET) for _ in range(12))


class Semaphore:
    """``posix_ipc.Semaphore``, kept in the esem service."""

    def __init__(
        self,
        name: str | None,
        flags: int = 0,
        mode: int = 0o600,
        initial_value: int = 0,
        *,
        key: bytes | None = None,
        robust: bool = False,
        accept_foreign: bool = False,
    ) -> None:
        if flags & ~O_CREX:
            raise ValueError(f"flags {flags!r} may hold only O_CREAT and O_EXCL")
        oflag = (O_CREAT_OS if flags & O_CREAT else 0) | (O_EXCL_OS if flags & O_EXCL else 0)
        if name is None:
            if flags & O_CREX != O_CREX:
                raise ValueError("name=None needs flags O_CREX (a new, randomly named semaphore)")
            while True:
                try:
                    self._h = self._open(_random_name(), oflag, mode, initial_value, key, robust)
                    break
                except ExistentialError:
                    continue  # the random name was taken; draw another
        else:
            self._h = self._open(name, oflag, mode, initial_value, key, robust, accept_foreign)

    @staticmethod
    def _open(name: str, oflag: int, mode: int, value: int, key: bytes | None,
              robust: bool, accept_foreign: bool = False) -> EsemSemaphore:
        handle = sem_open(name, oflag, mode, value, flags=USE_ESEM, key=key, robust=robust,
                          accept_foreign=accept_foreign)
        assert isinstance(handle, EsemSemaphore)
        return handle

    def __repr__(self) -> str:
        return f"esem.posix_ipc.Semaphore({self.name!r}, mode={self.mode:#o})"

    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        return self._h.name

    @property
    def mode(self) -> int:
        return self._h.mode

    @property
    def value(self) -> int:
        return self._h.getvalue()

    def acquire(self, timeout: float | None = None) -> None:
        """Block (``None``), try once (``0``), or wait up to ``timeout`` seconds;
        ``BusyError`` when no unit came."""
        if timeout is None:
            self._h.wait()
        elif timeout == 0:
            self._h.trywait()
        else:
            self._h.timedwait(timeout)

    def release(self) -> None:
        self._h.post()

    def close(self) -> None:
        self._h.close()

    def unlink(self) -> None:
        self._h.unlink()

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def unlink_semaphore(name: str, *, key: bytes | None = None) -> None:
    sem_unlink(name, flags=USE_ESEM, key=key)

__all__ = [
    "O_CREAT",
    "O_CREX",
    "O_EXCL",
    "SEMAPHORE_TIMEOUT_SUPPORTED",
    "SEMAPHORE_VALUE_MAX",
    "SEMAPHORE_VALUE_SUPPORTED",
    "BusyError",
    "Error",
    "ExistentialError",
    "PermissionsError",
    "Semaphore",
    "SignalError",
    "unlink_semaphore",
]
