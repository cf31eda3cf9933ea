"""The native client as a conformance backend: the preload library's C API via ctypes.

``libesem_preload.so`` exports the POSIX ``sem_*`` functions; called here directly (not
interposed: ``ctypes.CDLL`` loads it ``RTLD_LOCAL``, so posix_ipc keeps glibc's), with
esem.h's ``USE_ESEM`` in ``oflag``, they run the Rust client in this process against the service
``ESEM_SOCKET`` names. ``NativeSemaphore`` gives the handles the methods and exceptions of
``esem.EsemSemaphore`` so the conformance tests run unchanged: errno becomes esem's
exception for the same refusal. What the adapter itself decides is only what the C API
leaves to its caller: a handle used after its own ``sem_close`` (undefined in C) raises
``ExistentialError`` as the Python handles do, and a relative timeout is turned into the
absolute ``CLOCK_REALTIME`` deadline ``sem_timedwait`` takes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from collections.abc import Iterator
from types import TracebackType

from esem.core.status import Status
from esem.errors import (
    BusyError,
    EsemError,
    ExistentialError,
    InvalidRequest,
    PermissionsError,
    SemaphoreOverflow,
    SignalError,
)
from esem.legacy import timeout_ns
from esem.native import library_path

# esem.h's oflag bit (bit 30), not the Python API's ``flags=USE_ESEM`` (a separate argument).
C_USE_ESEM = 0x4000_0000

_BY_ERRNO: dict[int, type[EsemError]] = {
    errno.ENOENT: ExistentialError,
    errno.EEXIST: ExistentialError,
    errno.EACCES: PermissionsError,
    errno.EAGAIN: BusyError,
    errno.ETIMEDOUT: BusyError,
    errno.EOVERFLOW: SemaphoreOverflow,
    errno.EINVAL: InvalidRequest,
    errno.ENAMETOOLONG: InvalidRequest,
    errno.EINTR: SignalError,
}


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_lib: ctypes.CDLL | None = None


@contextlib.contextmanager
def _no_resume() -> Iterator[None]:
    """Around the calls that may connect the library's process client: resumption off
    for that session (read at connect). The tests move this process from one module's
    daemon to the next, and a session whose daemon is gone for good must fail at once,
    so the next call connects to the new one, not wait ESEM_RESUME_TIMEOUT trying to
    resume at the old path (tests/native/test_resume.py tests resumption)."""
    old = os.environ.get("ESEM_RESUME_TIMEOUT")
    os.environ["ESEM_RESUME_TIMEOUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["ESEM_RESUME_TIMEOUT"]
        else:
            os.environ["ESEM_RESUME_TIMEOUT"] = old


def library() -> ctypes.CDLL:
    """The preload library, loaded on first use (so after the fixture set ESEM_SOCKET;
    the client reads it when it connects, on its first call)."""
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(library_path()), use_errno=True)
        lib.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
        lib.sem_open.restype = ctypes.c_void_p
        lib.esem_sem_open_keyed.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                                            ctypes.c_uint, ctypes.c_char_p, ctypes.c_size_t]
        lib.esem_sem_open_keyed.restype = ctypes.c_void_p
        for fn in ("sem_wait", "sem_trywait", "sem_post", "sem_close"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_int
        lib.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
        lib.sem_timedwait.restype = ctypes.c_int
        lib.sem_getvalue.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        lib.sem_getvalue.restype = ctypes.c_int
        lib.esem_shim_ours.argtypes = [ctypes.c_void_p]
        lib.esem_shim_ours.restype = ctypes.c_int
        lib.sem_unlink.argtypes = [ctypes.c_char_p]
        lib.sem_unlink.restype = ctypes.c_int
        _lib = lib
    return _lib


def _error(what: str) -> EsemError:
    code = ctypes.get_errno()
    status = Status.__members__.get(errno.errorcode.get(code, ""))
    cls = _BY_ERRNO.get(code, EsemError)
    return cls(f"{what}: {os.strerror(code)}", status=status)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise _error(what)


class NativeSemaphore:
    """A ``sem_t *`` of the native client, with ``EsemSemaphore``'s methods."""

    backend = "esem"

    def __init__(self, sem: int, name: str, mode: int) -> None:
        self.name = name
        self.mode = mode
        self._sem: int | None = sem

    def _ptr(self) -> int:
        if self._sem is None:
            raise ExistentialError(f"semaphore {self.name} has been closed")
        return self._sem

    def wait(self) -> None:
        _check(library().sem_wait(self._ptr()), "sem_wait")

    def trywait(self) -> None:
        _check(library().sem_trywait(self._ptr()), "sem_trywait")

    def timedwait(self, seconds: float) -> None:
        ns = timeout_ns(seconds)
        sem = self._ptr()
        if ns is None:
            self.wait()
            return
        deadline = time.clock_gettime_ns(time.CLOCK_REALTIME) + ns
        abstime = _Timespec(deadline // 1_000_000_000, deadline % 1_000_000_000)
        _check(library().sem_timedwait(sem, ctypes.byref(abstime)), "sem_timedwait")

    def post(self) -> None:
        _check(library().sem_post(self._ptr()), "sem_post")

    def getvalue(self) -> int:
        value = ctypes.c_int(-1)
        _check(library().sem_getvalue(self._ptr(), ctypes.byref(value)), "sem_getvalue")
        return value.value

    def close(self) -> None:
        _check(library().sem_close(self._ptr()), "sem_close")
        self._sem = None

    def unlink(self) -> None:
        unlink(self.name)

    def __enter__(self) -> NativeSemaphore:
        self.wait()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.post()


def open_semaphore(name: str, oflag: int = 0, mode: int = 0o600,
                   value: int = 0, key: bytes | None = None) -> NativeSemaphore:
    """``sem_open(name, oflag | C_USE_ESEM, mode, value)`` of the native client, or with
    ``key`` esem.h's ``esem_sem_open_keyed``. A value outside ``unsigned int`` cannot be
    passed to C: it is the ``EINVAL`` glibc gives a value above SEM_VALUE_MAX (as is -1,
    which a C caller's ``unsigned int`` would make 4294967295)."""
    if -(2**31) <= value < 0:
        value &= 0xFFFF_FFFF  # a negative int, as C converts it to unsigned int
    elif not 0 <= value <= 0xFFFF_FFFF:
        raise InvalidRequest(f"initial value {value} is not an unsigned int",
                             status=Status.EINVAL)
    with _no_resume():
        if key is None:
            sem = library().sem_open(name.encode(), oflag | C_USE_ESEM, mode, value)
        else:
            sem = library().esem_sem_open_keyed(name.encode(), oflag, mode, value, key,
                                                len(key))
    if not sem:
        raise _error(f"sem_open({name!r})")
    # The library hands glibc's own semaphore to an oflag without the bit: a backend
    # that silently tested glibc would pass most of the suite, so refuse it here.
    if not library().esem_shim_ours(sem):
        raise AssertionError(f"sem_open({name!r}) returned a glibc semaphore, not an esem one")
    umask = os.umask(0)
    os.umask(umask)
    return NativeSemaphore(sem, name, mode & ~umask & 0o7777)


def unlink(name: str) -> None:
    """``sem_unlink`` of the native client. The library sends it to the service only for
    a name it opened with USE_ESEM (else glibc's): the tests unlink names they opened."""
    with _no_resume():
        _check(library().sem_unlink(name.encode()), f"sem_unlink({name!r})")
