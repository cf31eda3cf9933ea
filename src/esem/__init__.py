"""esem: a hardened semaphore service.

Every semaphore of the host lives in one trusted service process, reached over an
authenticated, encrypted channel. Switch a POSIX named semaphore to it with one flag::

    import esem
    sem = esem.sem_open("/jobs", esem.O_CREAT, 0o600, 1, flags=esem.USE_ESEM)
    sem.wait(); ...; sem.post()

or keep code written for posix_ipc with ``import esem.posix_ipc as posix_ipc``.
"""

from esem.api import (
    O_CREAT,
    O_EXCL,
    USE_ESEM,
    EsemSemaphore,
    SemaphoreHandle,
    connect,
    sem_open,
    sem_unlink,
)
from esem.client.blocking import Client, get_client
from esem.client.switchless import SwitchlessUnavailable
from esem.core.limits import SEM_VALUE_MAX
from esem.errors import (
    BusyError,
    Cancelled,
    EsemError,
    ExistentialError,
    IntegrityError,
    InvalidRequest,
    KeyRejected,
    PermissionsError,
    ProtocolError,
    QuotaExceeded,
    SemaphoreOverflow,
    ServiceUnavailable,
    SignalError,
)
from esem.legacy import LegacySemaphore
from esem.sync import Barrier, BoundedSemaphore, Condition, Event, Lock, RLock, Semaphore

__version__ = "0.1.0"

__all__ = [
    "O_CREAT",
    "O_EXCL",
    "SEM_VALUE_MAX",
    "USE_ESEM",
    "Barrier",
    "BoundedSemaphore",
    "BusyError",
    "Cancelled",
    "Client",
    "Condition",
    "EsemError",
    "EsemSemaphore",
    "Event",
    "ExistentialError",
    "IntegrityError",
    "InvalidRequest",
    "KeyRejected",
    "LegacySemaphore",
    "Lock",
    "PermissionsError",
    "ProtocolError",
    "QuotaExceeded",
    "RLock",
    "Semaphore",
    "SemaphoreHandle",
    "SemaphoreOverflow",
    "ServiceUnavailable",
    "SignalError",
    "SwitchlessUnavailable",
    "connect",
    "get_client",
    "sem_open",
    "sem_unlink",
]
