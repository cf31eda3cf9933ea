"""Name squatting across uids, between real processes on a real daemon.

Another uid (a child that drops to ``nobody``) creates the owner's name first, mode 0666
and value 1000. POSIX would let the owner's ``O_CREAT`` open adopt it (and report the
mode the owner asked for); esem refuses with a ``PermissionsError`` naming the squatter,
unless the owner explicitly accepts a foreign owner. An owner that uses a key is refused
either way (``KeyRejected``): the squatter's semaphore is not bound to that key.
"""

from __future__ import annotations

import os
import pwd
import secrets
from collections.abc import Callable
from typing import Any

import pytest

import esem.posix_ipc as esem_posix_ipc
from esem import O_CREAT, USE_ESEM, KeyRejected, PermissionsError, sem_open

from . import run_forked, stat

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")

NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None


def squat(name: str, key: bytes | None = None) -> None:
    """A ``nobody`` process creates ``name`` 0666 with value 1000 and exits; the name
    stays."""

    def body() -> int:
        assert NOBODY is not None
        os.setgroups([])
        os.setgid(NOBODY.pw_gid)
        os.setuid(NOBODY.pw_uid)
        old = os.umask(0)
        try:
            sem = sem_open(name, O_CREAT, 0o666, 1000, flags=USE_ESEM, key=key)
        finally:
            os.umask(old)
        return 0 if sem.created else 1  # type: ignore[union-attr]

    assert run_forked(body) == 0
    info = stat(name, key)  # a key-bound squat shows its count only with its key
    assert (info["owner_uid"], info["mode"], info["value"]) == (65534, 0o666, 1000)


def refused(action: Callable[[], object], error: type[BaseException]) -> str:
    with pytest.raises(error) as excinfo:
        action()
    return str(excinfo.value)


def test_owner_create_refuses_a_squatted_name(service: Any, sem_name: str) -> None:
    squat(sem_name)
    text = refused(lambda: sem_open(sem_name, O_CREAT, 0o600, 4, flags=USE_ESEM),
                   PermissionsError)
    assert "uid 65534" in text and "mode 0666" in text and "accept_foreign" in text
    refused(lambda: esem_posix_ipc.Semaphore(sem_name, esem_posix_ipc.O_CREAT, 0o600, 4),
            PermissionsError)
    # accepting a foreign owner on purpose opens it, and it is still the squatter's
    sem = sem_open(sem_name, O_CREAT, 0o600, 4, flags=USE_ESEM, accept_foreign=True)
    assert not sem.created  # type: ignore[union-attr]
    assert sem.getvalue() == 1000
    sem.close()
    other = esem_posix_ipc.Semaphore(sem_name, esem_posix_ipc.O_CREAT, 0o600, 4,
                                     accept_foreign=True)
    assert other.value == 1000
    other.close()
    # opening it by name without O_CREAT is what its mode allows, as before
    sem_open(sem_name, flags=USE_ESEM).close()
    assert stat(sem_name)["owner_uid"] == 65534


def test_keyed_owner_refuses_a_squatted_name(service: Any, sem_names: Any) -> None:
    key = secrets.token_bytes(32)
    plain, keyed = sem_names(), sem_names()
    squat(plain)  # not key-bound
    squat(keyed, key=secrets.token_bytes(32))  # bound to the squatter's own key
    for name in (plain, keyed):
        for accept in (False, True):
            with pytest.raises(KeyRejected):
                sem_open(name, O_CREAT, 0o600, 4, flags=USE_ESEM, key=key,
                         accept_foreign=accept)
        assert stat(name)["owner_uid"] == 65534
