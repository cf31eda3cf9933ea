"""Access control between real processes: other uids (mode bits), and key binding.

The tests run as root; a forked child drops to ``nobody`` before it first talks to the
service, so the service sees it through ``SO_PEERCRED`` as another uid. Mode-bit checks
run against both backends (POSIX semaphores are files in /dev/shm), key binding against
esem alone (legacy semaphores have no keys).
"""

from __future__ import annotations

import os
import pwd
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import esem.posix_ipc as esem_posix_ipc
from esem import (
    O_CREAT,
    O_EXCL,
    USE_ESEM,
    BusyError,
    EsemSemaphore,
    ExistentialError,
    KeyRejected,
    PermissionsError,
    sem_open,
    sem_unlink,
)

from . import run_forked, stat

CREX = O_CREAT | O_EXCL

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody"),
              pytest.mark.native_backend]  # the backend tests run as esem-native too

# Exit codes of the children: 0 is "as expected"; anything else says what went wrong.
ALLOWED, REFUSED, WRONG_ERROR = 10, 11, 12


@pytest.fixture
def umask0() -> Iterator[None]:
    """``sem_open`` masks the mode by the umask, as POSIX does: clear it, so the modes
    under test are the modes created."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def as_nobody(body: Callable[[], int | None]) -> Callable[[], int | None]:
    """``body`` run after this (forked) process became ``nobody``."""
    user = pwd.getpwnam("nobody")

    def run() -> int | None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        assert os.getuid() == user.pw_uid and os.geteuid() == user.pw_uid
        return body()

    return run


def outcome(action: Callable[[], object], refused: type[BaseException]) -> int:
    try:
        action()
    except refused:
        return REFUSED
    except BaseException as exc:
        print(f"unexpected {type(exc).__name__}: {exc}")
        return WRONG_ERROR
    return ALLOWED


def test_other_uid_refused_by_mode_0600(backend: Any, sem_name: str, umask0: None) -> None:
    sem = backend.open(sem_name, CREX, 0o600, 1)
    assert sem.mode == 0o600
    code = run_forked(as_nobody(lambda: outcome(lambda: backend.open(sem_name),
                                                PermissionsError)))
    assert code == REFUSED
    code = run_forked(as_nobody(lambda: outcome(lambda: backend.unlink(sem_name),
                                                PermissionsError)))
    assert code == REFUSED
    assert sem.getvalue() == 1  # nothing changed
    assert backend.open(sem_name).getvalue() == 1


def test_other_uid_allowed_by_mode_0666(backend: Any, sem_name: str, umask0: None) -> None:
    sem = backend.open(sem_name, CREX, 0o666, 1)
    assert sem.mode == 0o666

    def use() -> int:
        theirs = backend.open(sem_name)
        theirs.wait()
        theirs.post()
        theirs.post()
        return 0

    assert run_forked(as_nobody(use)) == 0
    assert sem.getvalue() == 2
    # The name is still the owner's to remove (/dev/shm is sticky).
    code = run_forked(as_nobody(lambda: outcome(lambda: backend.unlink(sem_name),
                                                PermissionsError)))
    assert code == REFUSED
    assert backend.open(sem_name).getvalue() == 2


def test_umask_applies_without_umask0(backend: Any, sem_name: str) -> None:
    """With the usual umask 022, a requested 0666 is 0644: others may not open it for
    read and write."""
    old = os.umask(0o022)
    try:
        sem = backend.open(sem_name, CREX, 0o666, 0)
    finally:
        os.umask(old)
    assert sem.mode == 0o644
    code = run_forked(as_nobody(lambda: outcome(lambda: backend.open(sem_name),
                                                PermissionsError)))
    assert code == REFUSED


def test_esem_inherited_handle_is_bound_to_its_uid(service: Any, sem_name: str,
                                                   umask0: None) -> None:
    """An esem handle is a capability of its owner's uid: a child that drops to another
    uid cannot use the one it inherited (legacy: the mapped word would still work), even
    though the mode lets it open the semaphore by name."""
    sem = sem_open(sem_name, CREX, 0o666, 1, flags=USE_ESEM)
    assert isinstance(sem, EsemSemaphore)
    sem.getvalue()
    code = run_forked(as_nobody(lambda: outcome(sem.post, ExistentialError)))
    assert code == REFUSED
    assert sem.getvalue() == 1

    def by_name() -> int:
        sem_open(sem_name, flags=USE_ESEM).post()
        return 0

    assert run_forked(as_nobody(by_name)) == 0
    assert sem.getvalue() == 2
    assert stat(sem_name)["owner_uid"] == 0


# ------------------------------------------------------------------ key binding


@pytest.fixture
def keyed(service: Any, sem_name: str) -> tuple[str, bytes]:
    key = secrets.token_bytes(32)
    sem = sem_open(sem_name, CREX, 0o600, 1, flags=USE_ESEM, key=key)
    assert isinstance(sem, EsemSemaphore) and sem.key_bound
    return sem_name, key


def test_key_bound_refused_without_key(keyed: tuple[str, bytes]) -> None:
    name, _ = keyed
    with pytest.raises(KeyRejected):
        sem_open(name, flags=USE_ESEM)
    with pytest.raises(KeyRejected):
        sem_open(name, O_CREAT, 0o600, 5, flags=USE_ESEM)
    with pytest.raises(KeyRejected):
        sem_unlink(name, flags=USE_ESEM)
    assert issubclass(KeyRejected, PermissionsError)


@pytest.mark.parametrize("wrong", [b"w" * 16, b"w" * 32, None])
def test_key_bound_refused_with_wrong_key(keyed: tuple[str, bytes],
                                          wrong: bytes | None) -> None:
    name, key = keyed
    wrong = wrong if wrong is not None else key[:-1] + bytes([key[-1] ^ 1])  # one bit off
    with pytest.raises(KeyRejected):
        sem_open(name, flags=USE_ESEM, key=wrong)
    with pytest.raises(KeyRejected):
        sem_unlink(name, flags=USE_ESEM, key=wrong)
    with pytest.raises(KeyRejected):
        esem_posix_ipc.Semaphore(name, key=wrong)
    # Nothing changed: the right key sees the original count.
    assert sem_open(name, flags=USE_ESEM, key=key).getvalue() == 1


def test_key_bound_accepted_with_right_key(keyed: tuple[str, bytes]) -> None:
    name, key = keyed
    sem = sem_open(name, flags=USE_ESEM, key=key)
    sem.wait()
    with pytest.raises(BusyError):
        sem.trywait()
    sem.post()
    sem.timedwait(5)
    sem.post()
    assert sem.getvalue() == 1
    alias = esem_posix_ipc.Semaphore(name, key=key)
    alias.acquire(0)
    alias.release()
    assert alias.value == 1
    # Opening with O_CREAT and the key is an open of the existing one.
    assert sem_open(name, O_CREAT, 0o600, 9, flags=USE_ESEM, key=key).getvalue() == 1
    sem_unlink(name, flags=USE_ESEM, key=key)
    with pytest.raises(ExistentialError):
        sem_open(name, flags=USE_ESEM, key=key)
    assert sem.getvalue() == 1  # still usable after the unlink


def test_key_bound_in_other_processes(keyed: tuple[str, bytes]) -> None:
    """A second client (another process, its own session) needs the key too; with it, it
    shares the semaphore; an inherited key-bound handle works in a fork child."""
    name, key = keyed
    sem = sem_open(name, flags=USE_ESEM, key=key)

    def without_key() -> int:
        return outcome(lambda: sem_open(name, flags=USE_ESEM), KeyRejected)

    def with_key() -> int:
        sem_open(name, flags=USE_ESEM, key=key).post()
        return 0

    def inherited() -> int:
        sem.post()
        return 0

    assert run_forked(without_key) == REFUSED
    assert run_forked(with_key) == 0
    assert run_forked(inherited) == 0
    assert sem.getvalue() == 3


def test_key_is_refused_where_unbound_or_misused(service: Any, sem_name: str) -> None:
    """A keyed open of a semaphore that is not key-bound, or of a missing one without
    O_CREAT, is refused; a key without USE_ESEM, or of a bad length, is misuse."""
    key = secrets.token_bytes(16)
    sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)
    with pytest.raises(KeyRejected):
        sem_open(sem_name, flags=USE_ESEM, key=key)
    with pytest.raises(KeyRejected):  # a keyed unlink of an unbound name changes nothing
        sem_unlink(sem_name, flags=USE_ESEM, key=key)
    assert sem_open(sem_name, flags=USE_ESEM).getvalue() == 0  # the name is still there
    with pytest.raises((KeyRejected, ExistentialError)):
        sem_open(sem_name + "-missing", flags=USE_ESEM, key=key)
    with pytest.raises(ValueError):
        sem_open(sem_name, CREX, 0o600, 0, key=key)  # legacy has no keys
    with pytest.raises(ValueError):
        sem_open(sem_name, flags=USE_ESEM, key=key[:15])


def test_key_bound_other_uid_needs_mode_and_key(service: Any, sem_names: Callable[[], str],
                                                umask0: None) -> None:
    """Mode and key are both checked: another uid with the key but no permission is
    refused, and with permission but no key too."""
    key = secrets.token_bytes(24)
    owner_only, everyone = sem_names(), sem_names()
    sem_open(owner_only, CREX, 0o600, 0, flags=USE_ESEM, key=key)
    sem_open(everyone, CREX, 0o666, 0, flags=USE_ESEM, key=key)

    def try_open(name: str, k: bytes | None) -> Callable[[], int | None]:
        return as_nobody(lambda: outcome(lambda: sem_open(name, flags=USE_ESEM, key=k),
                                         PermissionsError))

    assert run_forked(try_open(owner_only, key)) == REFUSED
    assert run_forked(try_open(everyone, None)) == REFUSED
    assert run_forked(try_open(everyone, key)) == ALLOWED
    for name in (owner_only, everyone):
        sem_unlink(name, flags=USE_ESEM, key=key)


def test_other_uid_sees_only_public_fields(service: Any, sem_name: str, umask0: None) -> None:
    """``esem stat`` and ``esem ls`` reveal a semaphore's count and activity only to a
    caller that may read it (as reading /dev/shm/sem.NAME would need); anyone sees its
    name, owner and mode (as ``ls -l /dev/shm`` shows them)."""
    from esem.client import admin
    from esem.client.blocking import get_client

    sem_open(sem_name, CREX, 0o600, 3, flags=USE_ESEM)
    assert stat(sem_name)["value"] == 3  # the owner reads it

    def nobody_stat() -> int:
        return outcome(lambda: admin.stat_semaphore(get_client(), sem_name), PermissionsError)

    assert run_forked(as_nobody(nobody_stat)) == REFUSED
    owner = os.getuid()

    def nobody_ls() -> int:
        entry = next(e for e in admin.list_semaphores(get_client()) if e["name"] == sem_name)
        public = entry["owner_uid"] == owner and entry["mode"] == 0o600
        hidden = entry["value"] is None and entry["handles"] is None
        return ALLOWED if public and hidden else WRONG_ERROR

    assert run_forked(as_nobody(nobody_ls)) == ALLOWED
