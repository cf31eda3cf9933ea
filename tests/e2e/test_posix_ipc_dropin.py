"""``esem.posix_ipc`` as a drop-in: every misuse is run against the real ``posix_ipc``
package and against esem's module, and must raise the same exception type; names in
every form posix_ipc accepts on Linux; posix_ipc's other objects re-exported unchanged.

The esem side runs against a real daemon (socket mode; the switchless transport carries
the same requests and is covered by test_conformance).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import posix_ipc as real
import pytest

import esem
import esem.posix_ipc as dropin
from esem.server.embedded import EmbeddedService

KEY = bytes(range(16))


@pytest.fixture(params=["posix_ipc", "esem.posix_ipc"])
def pmod(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    if request.param == "esem.posix_ipc":
        request.getfixturevalue("socket_service")
        yield dropin
    else:
        yield real


# Each misuse: a function of (module, a fresh unique name, an open semaphore of value 1).
Misuse = Callable[[ModuleType, str, Any], object]

MISUSES: dict[str, Misuse] = {
    "name-int": lambda m, n, s: m.Semaphore(123, m.O_CREX),
    "name-float": lambda m, n, s: m.Semaphore(1.5, m.O_CREX),
    "flags-str": lambda m, n, s: m.Semaphore(n, "a"),
    "mode-str": lambda m, n, s: m.Semaphore(n, m.O_CREX, "a"),
    "value-str": lambda m, n, s: m.Semaphore(n, m.O_CREX, 0o600, "a"),
    "value-float": lambda m, n, s: m.Semaphore(n, m.O_CREX, 0o600, 1.5),
    "value-none": lambda m, n, s: m.Semaphore(n, m.O_CREX, 0o600, None),
    "value-negative": lambda m, n, s: m.Semaphore(n, m.O_CREX, 0o600, -1),
    "value-too-big": lambda m, n, s: m.Semaphore(n, m.O_CREX, 0o600, 2**31),
    "name-slash-only": lambda m, n, s: m.Semaphore("/", m.O_CREX),
    "name-empty": lambda m, n, s: m.Semaphore("", m.O_CREX),
    "name-second-slash": lambda m, n, s: m.Semaphore(n + "/x", m.O_CREX),
    "name-inner-slash-no-lead": lambda m, n, s: m.Semaphore(n[1:] + "/x", m.O_CREX),
    "name-too-long": lambda m, n, s: m.Semaphore(n + "a" * 300, m.O_CREX),
    "name-none-without-excl": lambda m, n, s: m.Semaphore(None, m.O_CREAT),
    "excl-without-creat": lambda m, n, s: m.Semaphore(n, m.O_EXCL),
    "too-many-args": lambda m, n, s: m.Semaphore(n, m.O_CREX, 0o600, 1, 5),
    "unknown-keyword": lambda m, n, s: m.Semaphore(n, m.O_CREX, bogus=1),
    "open-missing": lambda m, n, s: m.Semaphore(n),
    "create-existing-exclusive": lambda m, n, s: m.Semaphore(s.name, m.O_CREX),
    "acquire-str": lambda m, n, s: s.acquire("a"),
    "acquire-negative": lambda m, n, s: s.acquire(-1),
    "release-argument": lambda m, n, s: s.release(1),
    "busy-after-take": lambda m, n, s: (s.acquire(0), s.acquire(0)),
    "timed-out": lambda m, n, s: (s.acquire(0), s.acquire(0.01)),
    "unlink-int": lambda m, n, s: m.unlink_semaphore(123),
    "unlink-missing": lambda m, n, s: m.unlink_semaphore(n),
    "unlink-empty": lambda m, n, s: m.unlink_semaphore(""),
    "unlink-second-slash": lambda m, n, s: m.unlink_semaphore(n + "/x"),
    "unlink-too-long": lambda m, n, s: m.unlink_semaphore(n + "a" * 300),
}


def _raised(mod: ModuleType, misuse: Misuse, names: Callable[[], str]) -> BaseException:
    sem = mod.Semaphore(names(), mod.O_CREX, 0o600, 1)
    try:
        misuse(mod, names(), sem)
    except Exception as exc:
        return exc
    finally:
        with contextlib.suppress(Exception):
            sem.unlink()
    raise AssertionError(f"{mod.__name__}: no exception")


@pytest.mark.parametrize("case", sorted(MISUSES))
def test_same_exception_as_posix_ipc(socket_service: EmbeddedService,
                                     sem_names: Callable[[], str], case: str) -> None:
    expected = _raised(real, MISUSES[case], sem_names)
    got = _raised(dropin, MISUSES[case], sem_names)
    # The exact class of posix_ipc's exception (TypeError, ValueError, or posix_ipc's own
    # ExistentialError / BusyError), and esem's is an instance of it.
    assert isinstance(got, type(expected)), (case, expected, got)
    if isinstance(expected, real.Error):
        assert isinstance(got, esem.EsemError)  # and esem's tree too


def test_closed_handle_same_exception(pmod: ModuleType, sem_name: str) -> None:
    sem = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, 1)
    sem.unlink()
    sem.close()
    for op in (sem.release, lambda: sem.acquire(0), lambda: sem.value, sem.close, sem.unlink):
        with pytest.raises(real.ExistentialError):
            op()


@pytest.mark.parametrize("form", ["no-slash", "bytes", "bytes-no-slash", "double-slash"])
def test_name_forms_name_one_semaphore(pmod: ModuleType, sem_name: str, form: str) -> None:
    given: str | bytes = {
        "no-slash": sem_name[1:],
        "bytes": sem_name.encode(),
        "bytes-no-slash": sem_name[1:].encode(),
        "double-slash": "/" + sem_name,
    }[form]
    sem = pmod.Semaphore(given, pmod.O_CREX, 0o600, 3)
    # posix_ipc's .name is the name as given (bytes decoded)
    assert sem.name == (given.decode() if isinstance(given, bytes) else given)
    same = pmod.Semaphore(sem_name)  # the slashed form opens the very same semaphore
    same.acquire(0)
    assert sem.value == 2
    other_form = sem_name[1:] if form != "no-slash" else sem_name
    pmod.unlink_semaphore(other_form)
    with pytest.raises(real.ExistentialError):
        pmod.Semaphore(sem_name)


def test_name_forms_really_in_the_service(socket_service: EmbeddedService,
                                          sem_name: str) -> None:
    """Not a legacy semaphore by accident: the no-slash name is in the service."""
    sem = dropin.Semaphore(sem_name[1:], dropin.O_CREX, 0o600, 2)
    handle = esem.sem_open(sem_name, flags=esem.USE_ESEM)
    handle.trywait()
    assert sem.value == 1
    with pytest.raises(real.ExistentialError):
        real.Semaphore(sem_name)


def test_everything_else_is_posix_ipc_unchanged() -> None:
    public = [n for n in dir(real) if not n.startswith("_")]
    assert {"SharedMemory", "MessageQueue", "unlink_shared_memory", "VERSION"} <= set(public)
    for name in public:
        if name in ("Semaphore", "unlink_semaphore"):
            assert getattr(dropin, name) is not getattr(real, name), name
        else:
            assert getattr(dropin, name) is getattr(real, name), name
    assert set(dropin.__all__) == set(public)


def test_shared_memory_through_the_dropin(sem_name: str) -> None:
    shm = dropin.SharedMemory(sem_name, dropin.O_CREX, size=4096)
    try:
        assert shm.size == 4096
        with pytest.raises(dropin.ExistentialError):
            dropin.SharedMemory(sem_name, dropin.O_CREX, size=4096)
    finally:
        shm.close_fd()
        dropin.unlink_shared_memory(sem_name)


def test_refusals_are_both_posix_ipc_and_esem(socket_service: EmbeddedService,
                                              sem_name: str) -> None:
    sem = dropin.Semaphore(sem_name, dropin.O_CREX, 0o600, 0)
    with pytest.raises(real.BusyError) as busy:
        sem.acquire(0)
    assert isinstance(busy.value, esem.BusyError) and isinstance(busy.value, real.Error)
    assert busy.value.errno is not None
    keyed = dropin.Semaphore(sem_name + "k", dropin.O_CREX, 0o600, 1, key=KEY)
    try:
        with pytest.raises(real.PermissionsError) as refused:
            dropin.Semaphore(sem_name + "k")  # no key
        assert isinstance(refused.value, esem.KeyRejected)
        with pytest.raises(esem.ExistentialError):  # esem's except clauses still catch
            dropin.Semaphore(sem_name + "missing")
    finally:
        dropin.unlink_semaphore(sem_name + "k", key=KEY)
        keyed.close()


def test_bool_and_int_like_arguments_as_posix_ipc(pmod: ModuleType, sem_name: str) -> None:
    sem = pmod.Semaphore(sem_name, flags=pmod.O_CREX, initial_value=True)
    assert sem.value == 1
    sem.acquire(True)  # a one-second timeout in posix_ipc: a unit is free
    assert sem.value == 0


def test_random_name_needs_only_excl(pmod: ModuleType) -> None:
    sem = pmod.Semaphore(None, pmod.O_CREX, 0o600, 1)
    try:
        assert sem.name.startswith("/")
        assert pmod.Semaphore(sem.name).value == 1
    finally:
        sem.unlink()
