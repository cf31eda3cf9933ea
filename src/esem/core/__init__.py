"""The trusted core of esem: the semaphore table, access policy and quotas (pure)."""

from esem.core.limits import KEY_MAX_BYTES, KEY_MIN_BYTES, MAX_NAME_BYTES, SEM_VALUE_MAX
from esem.core.policy import Cred, Quotas
from esem.core.status import CoreError, Status
from esem.core.table import Opened, SemDetail, SemInfo, SemTable, SemView, WaitDone, WaitMode

__all__ = [
    "KEY_MAX_BYTES",
    "KEY_MIN_BYTES",
    "MAX_NAME_BYTES",
    "SEM_VALUE_MAX",
    "CoreError",
    "Cred",
    "Opened",
    "Quotas",
    "SemDetail",
    "SemInfo",
    "SemTable",
    "SemView",
    "Status",
    "WaitDone",
    "WaitMode",
]
