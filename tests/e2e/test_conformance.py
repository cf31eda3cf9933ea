"""POSIX named-semaphore conformance, the same tests against both backends.

Two surfaces, each parametrized over legacy and esem:

* ``sem_open``/``sem_unlink`` with and without ``USE_ESEM`` (the ``backend`` fixture);
* the posix_ipc API: the real ``posix_ipc`` package beside ``esem.posix_ipc``, the
  one-line switch that must keep code written for the former working.

The esem side runs against the real session daemon.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import posix_ipc as real_posix_ipc
import pytest

import esem
import esem.posix_ipc as esem_posix_ipc
from esem import (
    O_CREAT,
    O_EXCL,
    SEM_VALUE_MAX,
    USE_ESEM,
    BusyError,
    EsemSemaphore,
    ExistentialError,
    SemaphoreOverflow,
    get_client,
    sem_open,
    sem_unlink,
)

from . import stat

CREX = O_CREAT | O_EXCL

pytestmark = pytest.mark.native_backend  # the backend tests run as esem-native too


C_TYPES = ("the argument types are C's, checked by the compiler: a C caller cannot pass a "
           "str, float, bool or None where sem_open takes a char *, int or unsigned int")


def skip_native(backend: Any, why: str) -> None:
    """Skip a test the native client's C API cannot express (``why`` says what; an empty
    ``why`` skips nothing)."""
    if why and getattr(backend, "native", False):
        pytest.skip(f"esem-native: {why}")

# ------------------------------------------------------------------ sem_open surface


def test_backend_selected_by_flag(backend: Any, sem_name: str) -> None:
    sem = backend.open(sem_name, CREX, 0o600, 0)
    assert isinstance(sem, backend.handle_type)
    assert sem.backend == backend.name
    assert sem.name == sem_name


def test_create_exclusive_and_open_existing(backend: Any, sem_name: str) -> None:
    first = backend.open(sem_name, CREX, 0o600, 3)
    assert first.getvalue() == 3
    with pytest.raises(ExistentialError):
        backend.open(sem_name, CREX, 0o600, 0)
    # O_CREAT alone opens the existing semaphore; its initial value is ignored.
    again = backend.open(sem_name, O_CREAT, 0o600, 9)
    assert again.getvalue() == 3
    plain = backend.open(sem_name)
    plain.post()
    assert first.getvalue() == again.getvalue() == 4


def test_open_missing(backend: Any, sem_name: str) -> None:
    with pytest.raises(ExistentialError):
        backend.open(sem_name)
    with pytest.raises(ExistentialError):
        backend.unlink(sem_name)


@pytest.mark.parametrize("value", [0, 1, 7, SEM_VALUE_MAX])
def test_initial_value(backend: Any, sem_name: str, value: int) -> None:
    assert backend.open(sem_name, CREX, 0o600, value).getvalue() == value


def test_post_wait_trywait_timedwait_getvalue(backend: Any, sem_name: str) -> None:
    sem = backend.open(sem_name, CREX, 0o600, 0)
    with pytest.raises(BusyError):
        sem.trywait()
    for _ in range(3):
        sem.post()
    assert sem.getvalue() == 3
    sem.wait()
    assert sem.getvalue() == 2
    sem.trywait()
    assert sem.getvalue() == 1
    sem.timedwait(5)
    assert sem.getvalue() == 0
    with pytest.raises(BusyError):
        sem.timedwait(0.05)
    with pytest.raises(BusyError):
        sem.timedwait(0)
    assert sem.getvalue() == 0


def test_timedwait_granted_by_another_thread(backend: Any, sem_name: str) -> None:
    sem = backend.open(sem_name, CREX, 0o600, 0)
    poster = threading.Timer(0.1, sem.post)
    poster.start()
    try:
        sem.timedwait(20)
    finally:
        poster.join()
    assert sem.getvalue() == 0


def test_post_past_max_overflows(backend: Any, sem_name: str) -> None:
    sem = backend.open(sem_name, CREX, 0o600, SEM_VALUE_MAX)
    with pytest.raises(SemaphoreOverflow) as info:
        sem.post()
    assert isinstance(info.value, OSError)  # posix_ipc raises an OSError here
    assert info.value.errno == errno.EOVERFLOW
    assert sem.getvalue() == SEM_VALUE_MAX
    sem.wait()
    sem.post()
    assert sem.getvalue() == SEM_VALUE_MAX


_BAD_OPENS: dict[str, dict[str, Any]] = {
    "no-leading-slash": {"name": "nolead"},
    "second-slash": {"name": "/a/b"},
    "slash-only": {"name": "/"},
    "value-negative": {"value": -1},
    "value-too-big": {"value": SEM_VALUE_MAX + 1},
    "key-too-short": {"key": b"k" * 15},
    "key-too-long": {"key": b"k" * 33},
    "oflag-unknown": {"oflag": CREX | os.O_TRUNC},
    "excl-without-creat": {"oflag": O_EXCL},
    "mode-out-of-range": {"mode": 0o10000},
}


# What glibc's sem_open does not check, and the preload library (which answers C
# callers as glibc would) does not either: these arguments are valid in C.
_GLIBC_ACCEPTS = {
    "oflag-unknown": "glibc's sem_open ignores oflag bits other than O_CREAT and O_EXCL",
    "excl-without-creat": "glibc's sem_open ignores O_EXCL without O_CREAT",
    "mode-out-of-range": "glibc's sem_open keeps only the permission bits of mode",
}


@pytest.mark.parametrize("bad", list(_BAD_OPENS.values()), ids=list(_BAD_OPENS))
def test_bad_open_arguments_raise_value_error_at_once(
    backend: Any, sem_name: str, bad: dict[str, Any]
) -> None:
    if getattr(backend, "native", False):
        _bad_open_in_c(backend, sem_name, next(k for k, v in _BAD_OPENS.items() if v == bad))
        return
    args: dict[str, Any] = {"name": sem_name, "oflag": CREX, "mode": 0o600, "value": 0,
                            "flags": backend.flags, **bad}
    sent = get_client().stats.requests if backend.flags else 0
    with pytest.raises(ValueError):
        sem_open(args.pop("name"), args.pop("oflag"), args.pop("mode"), args.pop("value"),
                 **args)
    if backend.flags:
        assert get_client().stats.requests == sent, "a bad argument reached the service"
    with pytest.raises(ExistentialError):
        backend.open(sem_name)  # nothing was created


def _bad_open_in_c(backend: Any, sem_name: str, which: str) -> None:
    """The same arguments through the C API (sem_open; esem_sem_open_keyed for a key):
    refused with EINVAL (read as a ValueError) and nothing created; except what glibc
    accepts, which the preload library accepts as glibc does."""
    args = {"name": sem_name, "oflag": CREX, "mode": 0o600, "value": 0, **_BAD_OPENS[which]}

    def call() -> Any:
        return backend.open(args.pop("name"), args.pop("oflag"), args.pop("mode"),
                            args.pop("value"), **args)

    if which == "excl-without-creat":  # O_EXCL alone is a plain open: no such name
        with pytest.raises(ExistentialError):
            call()
    elif which in _GLIBC_ACCEPTS:  # created, the unknown bits ignored
        sem = call()
        assert sem.getvalue() == 0
        backend.unlink(sem_name)
    else:
        with pytest.raises(ValueError) as info:
            call()
        assert info.value.errno == errno.EINVAL  # type: ignore[attr-defined]
    with pytest.raises(ExistentialError):
        backend.open(sem_name)  # nothing (left) under the name


_BAD_TYPES: dict[str, dict[str, Any]] = {
    "name-int": {"name": 42},
    "name-none": {"name": None},
    "value-float": {"value": 1.5},
    "value-str": {"value": "1"},
    "value-bool": {"value": True},
    "mode-str": {"mode": "600"},
    "oflag-str": {"oflag": "c"},
    "flags-float": {"flags": 1.0},
    "key-str": {"key": "k" * 16},
    "robust-str": {"robust": "yes"},
}


@pytest.mark.parametrize("bad", list(_BAD_TYPES.values()), ids=list(_BAD_TYPES))
def test_wrong_types_raise_type_error_at_once(
    backend: Any, sem_name: str, bad: dict[str, Any]
) -> None:
    skip_native(backend, C_TYPES)
    args: dict[str, Any] = {"name": sem_name, "oflag": CREX, "mode": 0o600, "value": 0,
                            "flags": backend.flags, **bad}
    if "key" in bad or "robust" in bad:
        args["flags"] = USE_ESEM  # legacy refuses keys and robust as values already
    sent = get_client().stats.requests if backend.flags else 0
    with pytest.raises(TypeError):
        sem_open(args.pop("name"), args.pop("oflag"), args.pop("mode"), args.pop("value"),
                 **args)
    if backend.flags:
        assert get_client().stats.requests == sent, "a bad argument reached the service"
    with pytest.raises(ExistentialError):
        backend.open(sem_name)  # nothing was created


def test_names_as_bytes(backend: Any, sem_name: str) -> None:
    skip_native(backend, "a C name is always bytes (a char *): there is no str or bytes "
                "choice to make, and no int to refuse")
    sem = sem_open(sem_name.encode(), CREX, 0o600, 2, flags=backend.flags)
    assert sem.name == sem_name
    assert backend.open(sem_name).getvalue() == 2
    sem_unlink(sem_name.encode(), flags=backend.flags)
    with pytest.raises(TypeError):
        sem_unlink(42, flags=backend.flags)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, -0.001, float("nan")])
def test_bad_timeout_raises_value_error_at_once(
    backend: Any, sem_name: str, timeout: float
) -> None:
    skip_native(backend, "a relative timeout is the adapter's to check; the C "
                "API takes an absolute timespec, and no timespec is NaN or a negative duration")
    sem = backend.open(sem_name, CREX, 0o600, 1)
    sent = get_client().stats.requests if backend.flags else 0
    with pytest.raises(ValueError):
        sem.timedwait(timeout)
    if backend.flags:
        assert get_client().stats.requests == sent
    assert sem.getvalue() == 1


@pytest.mark.parametrize("name", ["nolead", "/a/b", "/"])
def test_bad_unlink_name_raises_value_error(backend: Any, name: str) -> None:
    if getattr(backend, "native", False):
        # C's sem_unlink: glibc reports every name it cannot use as ENOENT (the preload
        # library does the same, and never sends such a name to the service).
        with pytest.raises(ExistentialError) as info:
            backend.unlink(name)
        assert info.value.errno == errno.ENOENT
        return
    with pytest.raises(ValueError):
        backend.unlink(name)


def test_closed_handle_raises_existential_error(backend: Any, sem_name: str) -> None:
    sem = backend.open(sem_name, CREX, 0o600, 1)
    other = backend.open(sem_name)
    sem.close()
    ops: list[Callable[[], object]] = [
        sem.post, sem.wait, sem.trywait, lambda: sem.timedwait(0.01), sem.getvalue, sem.close,
    ]
    for op in ops:
        with pytest.raises(ExistentialError):
            op()
    # Closing is this handle's business only: the semaphore and other handles live on.
    assert other.getvalue() == 1
    other.post()
    assert backend.open(sem_name).getvalue() == 2


def test_context_manager(backend: Any, sem_name: str) -> None:
    sem = backend.open(sem_name, CREX, 0o600, 1)
    with sem as entered:
        assert entered is sem
        assert sem.getvalue() == 0
    assert sem.getvalue() == 1
    with pytest.raises(RuntimeError), sem:
        raise RuntimeError("inside")
    assert sem.getvalue() == 1


def test_unlink_semantics(backend: Any, sem_name: str) -> None:
    old = backend.open(sem_name, CREX, 0o600, 2)
    old_too = backend.open(sem_name)
    backend.unlink(sem_name)
    # The name is gone at once ...
    with pytest.raises(ExistentialError):
        backend.open(sem_name)
    with pytest.raises(ExistentialError):
        backend.unlink(sem_name)
    # ... while open handles keep working, on the same (now nameless) semaphore.
    old.wait()
    old_too.post()
    old_too.post()
    assert old.getvalue() == old_too.getvalue() == 3
    # A new create under the name is a new semaphore.
    new = backend.open(sem_name, CREX, 0o600, 5)
    assert new.getvalue() == 5
    old.post()
    new.wait()
    assert old.getvalue() == 4
    assert new.getvalue() == 4
    assert backend.open(sem_name).getvalue() == 4  # the name resolves to the new one
    new.unlink()  # the handle's own unlink
    with pytest.raises(ExistentialError):
        backend.open(sem_name)
    assert new.getvalue() == 4


def test_mode_is_masked_by_umask(backend: Any, sem_name: str) -> None:
    old_umask = os.umask(0o077)
    try:
        sem = backend.open(sem_name, CREX, 0o666, 0)
    finally:
        os.umask(old_umask)
    assert sem.mode == 0o600
    if backend.flags & USE_ESEM:
        assert stat(sem_name)["mode"] == 0o600
    else:
        st = os.stat(f"/dev/shm/sem.{sem_name[1:]}")
        assert stat_mod.S_IMODE(st.st_mode) == 0o600


def test_esem_semaphore_lives_only_in_the_service(service: Any, sem_name: str) -> None:
    """The one-flag switch: the same name in the two backends is two semaphores, and the
    esem one has no word in /dev/shm that a same-uid process could rewrite."""
    esem_sem = sem_open(sem_name, CREX, 0o600, 1, flags=USE_ESEM)
    assert isinstance(esem_sem, EsemSemaphore)
    assert not os.path.exists(f"/dev/shm/sem.{sem_name[1:]}")
    legacy = sem_open(sem_name, CREX, 0o600, 7)
    assert os.path.exists(f"/dev/shm/sem.{sem_name[1:]}")
    assert esem_sem.getvalue() == 1 and legacy.getvalue() == 7
    sem_unlink(sem_name)
    assert esem_sem.getvalue() == 1


# --------------------------------------------------------------- posix_ipc surface


@pytest.fixture(params=["posix_ipc", "esem.posix_ipc-socket", "esem.posix_ipc-switchless"])
def pmod(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The real posix_ipc package (legacy) and esem's drop-in for it (in both modes)."""
    if request.param.startswith("esem."):
        request.getfixturevalue(request.param.split("-")[1] + "_service")
        yield esem_posix_ipc
    else:
        yield real_posix_ipc


def test_posix_ipc_surface_matches(pmod: ModuleType) -> None:
    for attr in ("O_CREAT", "O_EXCL", "O_CREX", "SEMAPHORE_VALUE_MAX",
                 "SEMAPHORE_TIMEOUT_SUPPORTED", "SEMAPHORE_VALUE_SUPPORTED"):
        assert getattr(pmod, attr) == getattr(real_posix_ipc, attr), attr
    for exc in ("Error", "ExistentialError", "BusyError", "PermissionsError", "SignalError"):
        assert issubclass(getattr(pmod, exc), Exception), exc


def test_posix_ipc_create_exclusive_open_missing(pmod: ModuleType, sem_name: str) -> None:
    sem = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, 2)
    assert sem.name == sem_name
    assert sem.value == 2
    with pytest.raises(pmod.ExistentialError):
        pmod.Semaphore(sem_name, pmod.O_CREX)
    again = pmod.Semaphore(sem_name, pmod.O_CREAT, 0o600, 9)
    assert again.value == 2
    assert pmod.Semaphore(sem_name).value == 2
    with pytest.raises(pmod.ExistentialError):
        pmod.Semaphore(sem_name + "x")


def test_posix_ipc_acquire_release(pmod: ModuleType, sem_name: str) -> None:
    sem = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, 0)
    with pytest.raises(pmod.BusyError):
        sem.acquire(0)
    with pytest.raises(pmod.BusyError):
        sem.acquire(0.05)
    sem.release()
    sem.release()
    sem.release()
    assert sem.value == 3
    sem.acquire()
    sem.acquire(0)
    sem.acquire(5)
    assert sem.value == 0
    poster = threading.Timer(0.1, sem.release)
    poster.start()
    sem.acquire(20)
    poster.join()
    assert sem.value == 0


def test_posix_ipc_overflow_is_oserror(pmod: ModuleType, sem_name: str) -> None:
    sem = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, pmod.SEMAPHORE_VALUE_MAX)
    with pytest.raises(OSError) as info:
        sem.release()
    assert info.value.errno == errno.EOVERFLOW
    assert sem.value == pmod.SEMAPHORE_VALUE_MAX


@pytest.mark.parametrize("bad", [
    {"name": "/a/b"},
    {"initial_value": -1},
    {"initial_value": SEM_VALUE_MAX + 1},
], ids=["second-slash", "value-negative", "value-too-big"])
def test_posix_ipc_bad_arguments(pmod: ModuleType, sem_name: str, bad: dict[str, Any]) -> None:
    args: dict[str, Any] = {"name": sem_name, "flags": pmod.O_CREX, "mode": 0o600,
                            "initial_value": 0, **bad}
    with pytest.raises(ValueError):
        pmod.Semaphore(args["name"], args["flags"], args["mode"], args["initial_value"])
    with pytest.raises(pmod.ExistentialError):
        pmod.Semaphore(sem_name)


def test_posix_ipc_negative_timeout(pmod: ModuleType, sem_name: str) -> None:
    sem = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, 1)
    # posix_ipc raises TypeError here, esem the ValueError its API promises for misuse.
    with pytest.raises((ValueError, TypeError)):
        sem.acquire(-1)
    assert sem.value == 1


def test_posix_ipc_closed_handle(pmod: ModuleType, sem_name: str) -> None:
    sem = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, 1)
    other = pmod.Semaphore(sem_name)
    sem.close()
    for op in (sem.release, sem.acquire, lambda: sem.acquire(0), lambda: sem.value,
               sem.close):
        with pytest.raises(pmod.ExistentialError):
            op()
    other.release()
    assert other.value == 2


def test_posix_ipc_context_manager(pmod: ModuleType, sem_name: str) -> None:
    sem = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, 1)
    with sem:
        assert sem.value == 0
    assert sem.value == 1


def test_posix_ipc_unlink(pmod: ModuleType, sem_name: str) -> None:
    old = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, 1)
    pmod.unlink_semaphore(sem_name)
    with pytest.raises(pmod.ExistentialError):
        pmod.Semaphore(sem_name)
    with pytest.raises(pmod.ExistentialError):
        pmod.unlink_semaphore(sem_name)
    old.release()
    assert old.value == 2
    new = pmod.Semaphore(sem_name, pmod.O_CREX, 0o600, 0)
    assert new.value == 0
    new.unlink()
    with pytest.raises(pmod.ExistentialError):
        new.unlink()
    assert old.value == 2 and new.value == 0


def test_posix_ipc_random_name(pmod: ModuleType) -> None:
    sem = pmod.Semaphore(None, pmod.O_CREX, 0o600, 1)
    try:
        assert sem.name.startswith("/") and len(sem.name) > 1
        assert pmod.Semaphore(sem.name).value == 1
    finally:
        sem.unlink()
    with pytest.raises(ValueError):
        pmod.Semaphore(None, pmod.O_CREAT)


def test_esem_posix_ipc_takes_names_and_flags_as_glibc(service: Any, sem_name: str) -> None:
    """Names as glibc takes them (the leading slash optional) and flag bits beyond
    O_CREAT|O_EXCL ignored, as posix_ipc passes them to sem_open, which ignores them;
    keys are checked."""
    sem = esem_posix_ipc.Semaphore(sem_name[1:], esem_posix_ipc.O_CREX | 0o4000000, 0o600, 1)
    assert sem.name == sem_name[1:]
    assert esem_posix_ipc.Semaphore(sem_name).value == 1
    with pytest.raises(ValueError):
        esem_posix_ipc.Semaphore(sem_name + "k", esem_posix_ipc.O_CREX, key=b"short")
    with pytest.raises(esem_posix_ipc.ExistentialError):
        esem_posix_ipc.Semaphore(sem_name + "k")
    with pytest.raises(esem.ExistentialError):
        esem_posix_ipc.Semaphore(sem_name + "k")
