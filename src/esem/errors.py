"""esem's exception tree, rooted at ``EsemError``.

The names follow the posix_ipc package (``ExistentialError``, ``BusyError``,
``PermissionsError``, ``SignalError``) so code written against it keeps its ``except``
clauses; each exception also carries the POSIX errno it stands for. Misuse of the API
(a bad name, a value out of range) raises ``ValueError``/``TypeError`` before anything is
sent. ``IntegrityError`` means tampering was detected: never a silent success.
"""

from __future__ import annotations

import errno as _errno

from esem.core.status import Status


class EsemError(Exception):
    """Root of every error esem raises for a refused or failed operation."""

    errno: int | None = None
    status: Status | None = None

    def __init__(self, message: str, *, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
            self.errno = getattr(_errno, status.name, None)


class ExistentialError(EsemError):
    """The name exists when it must not (EEXIST), or does not when it must (ENOENT),
    or the handle is closed or unknown (EBADF)."""


class PermissionsError(EsemError):
    """Mode bits or ownership refuse the caller (EACCES)."""


class KeyRejected(PermissionsError):
    """A key-bound semaphore refused the operation: no key, or the wrong one."""


class BusyError(EsemError):
    """A trywait found the semaphore at zero (EAGAIN) or a timed wait timed out
    (ETIMEDOUT)."""


class SignalError(EsemError):
    """A wait was interrupted by a signal (EINTR); the wait was withdrawn, no unit taken."""


class SemaphoreOverflow(EsemError, OSError):
    """A post would pass SEM_VALUE_MAX (EOVERFLOW); the count is unchanged. An
    ``OSError`` too, as posix_ipc raises one for the same condition."""


class QuotaExceeded(EsemError):
    """A quota of the caller's uid or session is exhausted (EDQUOT)."""


class Cancelled(EsemError):
    """The wait was cancelled by its own session (ECANCELED)."""


class InvalidRequest(EsemError, ValueError):
    """The service found an argument invalid (EINVAL, ENAMETOOLONG)."""


class IntegrityError(EsemError):
    """Tampering detected: a frame failed authentication, a reply's key MAC did not
    verify, or the service's identity did not match the pinned key. The session is closed
    and the operation did not succeed."""


class ProtocolError(IntegrityError):
    """Bytes that do not parse as the esem protocol. From a service that is pinned and
    authenticated this can only be tampering, hence an ``IntegrityError``."""


class ServiceUnavailable(EsemError):
    """No esem service answers on the socket, or it went away mid-operation. esem never
    starts a service implicitly."""


_BY_STATUS: dict[Status, type[EsemError]] = {
    Status.ENOENT: ExistentialError,
    Status.EEXIST: ExistentialError,
    Status.EBADF: ExistentialError,
    Status.EACCES: PermissionsError,
    Status.EKEYREJECTED: KeyRejected,
    Status.EAGAIN: BusyError,
    Status.ETIMEDOUT: BusyError,
    Status.EOVERFLOW: SemaphoreOverflow,
    Status.EDQUOT: QuotaExceeded,
    Status.ECANCELED: Cancelled,
    Status.EINVAL: InvalidRequest,
    Status.ENAMETOOLONG: InvalidRequest,
    Status.ESTALE: ServiceUnavailable,
}


def error_for(status: Status, message: str) -> EsemError:
    """The exception a client raises for a refusal ``status`` from the service."""
    return _BY_STATUS.get(status, EsemError)(message, status=status)


def wait_granted(status: Status, message: str, *, miss: Status) -> bool:
    """A wait's answer as an ``acquire() -> bool`` reports it: True when granted, False for
    ``miss`` (EAGAIN of a try, ETIMEDOUT of a timed wait), else the refusal's error. The
    asyncio and anyio handles both answer this way."""
    if status is miss:
        return False
    if status:
        raise error_for(status, message)
    return True
