"""The vault's two semaphores, and the one-flag switch between legacy and esem.

``sem_service`` (initial value ENGINE_SLOTS) admits service threads to the sealing
engine; ``sem_filetree`` (initial value 1) serialises changes to the file tree. Under
``--sync legacy`` they are POSIX named semaphores whose counts live in
``/dev/shm/sem.NAME``; under ``--sync esem`` they live in the esem service, bound to a
key derived from the vault's master key, so that not even a process of the vault's own
uid can post them. The two branches of ``open_semaphores`` differ in exactly the
``flags=USE_ESEM, key=key`` of the two ``sem_open`` calls: that is the whole port.

Names are fresh per server start (``/esem-vault-<random>-service``): a count left behind
by a crashed or tampered run can never be inherited. The names are not secret; they are
published in ``endpoint.json``.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from esem.api import O_CREAT, O_EXCL, USE_ESEM, SemaphoreHandle, sem_open
from esem.errors import EsemError
from esem.vault.limits import ENGINE_SLOTS

Sync = Literal["legacy", "esem"]
SYNCS: tuple[Sync, ...] = ("legacy", "esem")
CREATE = O_CREAT | O_EXCL
SEM_KEY_INFO = b"esem-vault semaphore key v1"


@dataclass(frozen=True)
class SemNames:
    service: str
    filetree: str

    @classmethod
    def fresh(cls) -> SemNames:
        tag = secrets.token_hex(6)
        return cls(f"/esem-vault-{tag}-service", f"/esem-vault-{tag}-filetree")


def semaphore_key(master_key: bytes) -> bytes:
    """The key that binds the vault's e-semaphores (32 bytes, from the master key). In
    the case study it never leaves the enclave; here it is as safe as the master key."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=SEM_KEY_INFO).derive(master_key)


def open_semaphores(sync: Sync, names: SemNames,
                    key: bytes) -> tuple[SemaphoreHandle, SemaphoreHandle]:
    """Create the vault's ``sem_service`` and ``sem_filetree``."""
    service, filetree = names.service, names.filetree
    sem_service: SemaphoreHandle  # sem_open's type follows its flags: one of two handle types
    sem_filetree: SemaphoreHandle
    if sync == "esem":
        sem_service = sem_open(service, CREATE, 0o600, ENGINE_SLOTS, flags=USE_ESEM, key=key)
        sem_filetree = sem_open(filetree, CREATE, 0o600, 1, flags=USE_ESEM, key=key)
    elif sync == "legacy":
        sem_service = sem_open(service, CREATE, 0o600, ENGINE_SLOTS)
        sem_filetree = sem_open(filetree, CREATE, 0o600, 1)
    else:
        raise ValueError(f"--sync must be one of {', '.join(SYNCS)}, not {sync!r}")
    return sem_service, sem_filetree


def close_semaphores(*sems: SemaphoreHandle) -> None:
    """Unlink and close (best effort: the esem service may already be gone). Unlink
    first: a closed legacy handle can no longer name its semaphore."""
    for sem in sems:
        with contextlib.suppress(EsemError):
            sem.unlink()
        with contextlib.suppress(EsemError):
            sem.close()
