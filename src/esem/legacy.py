"""The legacy backend: real POSIX named semaphores (``/dev/shm/sem.NAME``) through the
posix_ipc package, behind the same handle interface as esem's.

This is what esem hardens, kept runnable so every test and benchmark can show both side
by side. Its count lives in shared memory that any process of the same uid can rewrite.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from types import TracebackType

import posix_ipc

from esem import errors
from esem.core.limits import SEM_VALUE_MAX
from esem.core.status import Status
from esem.protocol.constants import MAX_TIMEOUT_NS


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """Translate posix_ipc's exceptions into esem's tree (same names, same meaning)."""
    try:
        yield
    except posix_ipc.ExistentialError as exc:
        raise errors.ExistentialError(str(exc)) from exc
    except posix_ipc.BusyError as exc:
        raise errors.BusyError(str(exc)) from exc
    except posix_ipc.PermissionsError as exc:
        raise errors.PermissionsError(str(exc)) from exc
    except posix_ipc.SignalError as exc:
        raise errors.SignalError(str(exc)) from exc
    except OSError as exc:
        if exc.errno == errno.EOVERFLOW:
            # With its status, so ``.errno`` is EOVERFLOW as for posix_ipc's OSError and
            # for the esem backend's SemaphoreOverflow (``except OSError`` code checks it).
            raise errors.SemaphoreOverflow(
                "semaphore is at SEM_VALUE_MAX", status=Status.EOVERFLOW
            ) from exc
        raise


class LegacySemaphore:
    """A POSIX named semaphore, opened with ``sem_open`` semantics."""

    backend = "legacy"

    def __init__(self, name: str, *, create: bool, excl: bool, mode: int, value: int) -> None:
        flags = (posix_ipc.O_CREAT if create else 0) | (posix_ipc.O_EXCL if excl else 0)
        with _mapped():
            self._sem = posix_ipc.Semaphore(name, flags, mode, value)
        self.name = name
        self.mode = mode
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"value={self._sem.value}"
        return f"<LegacySemaphore {self.name} {state}>"

    def wait(self) -> None:
        with _mapped():
            self._sem.acquire()

    def trywait(self) -> None:
        with _mapped():
            self._sem.acquire(0)

    def timedwait(self, seconds: float) -> None:
        if timeout_ns(seconds) is None:
            # No deadline (inf, or beyond MAX_TIMEOUT_NS): posix_ipc would turn inf into
            # EINVAL (reported as ExistentialError) and 1e300 into an instant timeout.
            self.wait()
            return
        with _mapped():
            # posix_ipc treats 0 as "don't block"; a zero timeout means the same here.
            self._sem.acquire(seconds)

    def post(self) -> None:
        with _mapped():
            self._sem.release()

    def getvalue(self) -> int:
        with _mapped():
            return int(self._sem.value)

    def close(self) -> None:
        with _mapped():
            self._sem.close()
        self._closed = True

    def unlink(self) -> None:
        with _mapped():
            self._sem.unlink()

    def __enter__(self) -> LegacySemaphore:
        self.wait()
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.post()


def unlink(name: str) -> None:
    with _mapped():
        posix_ipc.unlink_semaphore(name)


def _check_timeout(seconds: float) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {type(seconds).__name__}")
    if not seconds >= 0:  # also NaN
        raise ValueError(f"timeout must be >= 0 seconds, not {seconds}")


# The longest deadline a timed wait can carry (MAX_TIMEOUT_NS, 2**63 - 1 ns: about 292
# years). Python compares ints and floats exactly, so a huge int never overflows here.
MAX_TIMEOUT_S = MAX_TIMEOUT_NS / 1e9


def timeout_ns(seconds: float) -> int | None:
    """The relative timeout of ``timedwait(seconds)`` in nanoseconds, or None for no
    deadline: one rule for both backends. ``inf`` and anything at or beyond
    ``MAX_TIMEOUT_S`` wait exactly like ``wait()``; NaN and negatives are ``ValueError``,
    non-numbers (and bools) ``TypeError``."""
    _check_timeout(seconds)
    if seconds >= MAX_TIMEOUT_S:
        return None
    return min(int(seconds * 1e9), MAX_TIMEOUT_NS)


__all__ = ["MAX_TIMEOUT_S", "SEM_VALUE_MAX", "LegacySemaphore", "timeout_ns", "unlink"]
