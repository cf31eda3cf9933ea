"""Access policy and quotas: who may do what to a semaphore, and how much of it.

Permission checks follow POSIX named semaphores, which Linux implements as files in
``/dev/shm``: opening an existing semaphore needs read and write permission under the
usual owner/group/other mode bits, unlinking needs ownership (``/dev/shm`` is sticky),
and uid 0 bypasses both. The caller's identity comes from the kernel (``SO_PEERCRED``);
the core trusts it exactly as much as the kernel is trusted, which is why key-bound
semaphores exist (see the A4 adversary in docs/design.md section 2).

Only the primary gid is considered: ``SO_PEERCRED`` vouches for nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from esem.core.status import CoreError, Status

ROOT_UID = 0
MODE_MASK = 0o777


@dataclass(frozen=True, slots=True)
class Cred:
    """Kernel-vouched credentials of a session's peer process."""

    uid: int
    gid: int
    pid: int


@dataclass(frozen=True, slots=True)
class Quotas:
    """Limits that bound what one tenant can take from all the others (adversary A7).

    Every limit counts live objects, not operations, so a tenant that gives back what it
    took can go on forever.
    """

    semaphores_per_uid: int = 1024  # semaphores alive (named or still open) created by a uid
    # Concurrent client sessions of one uid. Under the preload every process that uses a
    # semaphore holds its own session, opened in the fork handler before a server's child
    # drops privileges, so a root server's workers all count as root's. Apache's prefork
    # default is 150 workers plus the parent, and a graceful restart overlaps the old
    # generation with the new one (about 301); PostgreSQL's defaults (max_connections 100,
    # 3 autovacuum workers and their launcher, 8 background workers, 10 WAL senders, 5
    # auxiliary processes: one semaphore each, 127, measured as 47 with max_connections
    # 20) and the postmaster make 128. 512 runs both unchanged, with headroom, and still
    # bounds one tenant's share of the service (A7).
    sessions_per_uid: int = 512
    handles_per_session: int = 1024  # open handles held by one session
    waiters_per_session: int = 256  # blocked waits one session may have queued
    waiters_per_uid: int = 4096  # blocked waits across all sessions of a uid

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"quota {name} must be at least 1")


def may_access(cred: Cred, owner_uid: int, owner_gid: int, mode: int) -> bool:
    """Read+write permission, as ``open(O_RDWR)`` of ``/dev/shm/sem.NAME`` would check it."""
    if cred.uid == ROOT_UID:
        return True
    if cred.uid == owner_uid:
        bits = (mode >> 6) & 0o7
    elif cred.gid == owner_gid:
        bits = (mode >> 3) & 0o7
    else:
        bits = mode & 0o7
    return bits & 0o6 == 0o6


def may_read(cred: Cred, owner_uid: int, owner_gid: int, mode: int) -> bool:
    """Read permission: what reading ``/dev/shm/sem.NAME`` (its count) would need."""
    if cred.uid == ROOT_UID:
        return True
    shift = 6 if cred.uid == owner_uid else 3 if cred.gid == owner_gid else 0
    return bool((mode >> shift) & 0o4)


def check_access(cred: Cred, owner_uid: int, owner_gid: int, mode: int, name: str) -> None:
    if not may_access(cred, owner_uid, owner_gid, mode):
        raise CoreError(
            Status.EACCES,
            f"uid {cred.uid} may not open {name} (owner {owner_uid}:{owner_gid}, "
            f"mode {mode:04o})",
        )


def check_adopt(cred: Cred, owner_uid: int, owner_gid: int, mode: int, name: str) -> None:
    """``O_CREAT`` finding a semaphore of another uid: refuse to adopt it unless that uid
    is root. POSIX would open it as if it were the caller's own, so another uid could
    create the name first (with its own mode and value) and keep control of it (name
    squatting); root callers are refused too, so a root server never adopts a user's."""
    if owner_uid not in (cred.uid, ROOT_UID):
        raise CoreError(
            Status.EACCES,
            f"{name} already exists and belongs to uid {owner_uid} (gid {owner_gid}, mode "
            f"{mode:04o}), not to uid {cred.uid}: O_CREAT does not adopt another uid's "
            "semaphore; open it without O_CREAT, or accept a foreign owner "
            "(accept_foreign=True)",
        )


def check_unlink(cred: Cred, owner_uid: int, name: str) -> None:
    """Only the owner or root may remove a name (the sticky-bit rule of /dev/shm)."""
    if cred.uid not in (ROOT_UID, owner_uid):
        raise CoreError(
            Status.EACCES, f"uid {cred.uid} may not unlink {name} (owned by uid {owner_uid})"
        )
