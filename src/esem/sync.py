"""Threading-style primitives whose state lives in the esem service, usable across processes.

``Lock``, ``RLock``, ``Semaphore``, ``BoundedSemaphore``, ``Condition``, ``Event`` and
``Barrier`` have the signatures of their ``threading`` namesakes; each is built on
e-semaphores only (no shared memory anywhere: nothing in ``/dev/shm`` to tamper with).
Give a name (``esem.Lock("/mylock")``) to meet other processes at it, or none for an
anonymous primitive: a fresh name of the form ``/esem-anon-PID-RANDOM`` bound to a random
32-byte key, so that only processes this object reaches (by ``fork``, or pickled while
multiprocessing spawns a child) can operate it, even of the same uid. The name shows in
``esem ls`` while the primitive lives, and is unlinked when its creator drops it (the
handle and name are released at the next esem call of the process or at exit: a
finalizer never talks to the service, since it may run inside the client's own lock).

Exactness across processes: waits, grants and counts are the service's (FIFO, never
lost); what is only checked, not enforced atomically, is the misuse guard of a release:
``Lock.release`` of an unlocked lock raises ``RuntimeError`` and
``BoundedSemaphore.release`` past the initial value ``ValueError``, exactly within one
process (the check and the post are under a process-local lock), but two processes that
release at the same instant can both pass the check, as with multiprocessing's own
``BoundedSemaphore`` (``sem_getvalue`` then ``sem_post``). Ownership (``RLock``,
``Condition``) is per process and thread, as in ``threading``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from esem.api import O_CREAT, O_EXCL, USE_ESEM, EsemSemaphore, sem_open
from esem.errors import BusyError, EsemError
from esem.protocol.constants import MAX_TIMEOUT_NS

T = TypeVar("T")
_Owner = tuple[int, int]  # (pid, thread ident)

ANON_PREFIX = "/esem-anon-"
MAX_TIMEOUT_S = MAX_TIMEOUT_NS / 1e9
ANON_KEY_BYTES = 32


def _me() -> _Owner:
    return os.getpid(), threading.get_ident()


# ------------------------------------------------------------------ lifetime

# Handles whose primitive was dropped: (handle, unlink its name?, creator pid). Filled by
# finalizers (deque.append takes no lock a GC pass could already hold), emptied by
# ``_reap`` from ordinary code.
_graveyard: collections.deque[tuple[EsemSemaphore, bool, int]] = collections.deque()
_live: weakref.WeakSet[_Base] = weakref.WeakSet()


def _bury(sem: EsemSemaphore, unlink: bool, creator: int) -> None:
    _graveyard.append((sem, unlink, creator))


def _release_handle(sem: EsemSemaphore, unlink: bool, creator: int) -> None:
    pid = os.getpid()
    with contextlib.suppress(EsemError):
        if unlink and pid == creator:
            sem.unlink()
    with contextlib.suppress(EsemError):
        if pid in sem._tokens:  # attached in this process (else nothing to close here)
            sem.close()


def _reap() -> None:
    while True:
        try:
            sem, unlink, creator = _graveyard.popleft()
        except IndexError:
            return
        _release_handle(sem, unlink, creator)


def _at_exit() -> None:
    """Unlink the names of this process's anonymous primitives that still live, and
    nothing more: their handles keep working (an unlinked semaphore does) for whatever
    still runs after atexit, such as multiprocessing's exit finalizers and a Pool's
    ``__del__``; they close with the session when the process ends."""
    _reap()
    pid = os.getpid()
    for prim in list(_live):
        if prim._anonymous and prim._creator == pid:
            prim._anonymous = False
            with contextlib.suppress(EsemError):
                prim._sem.unlink()


atexit.register(_at_exit)


class _Base:
    """One e-semaphore, its lifetime, and pickling for multiprocessing's spawn."""

    _sem: EsemSemaphore
    _anonymous: bool
    _creator: int
    _finalizer: weakref.finalize[[EsemSemaphore, bool, int], _Base]

    def __init__(self, value: int, name: str | None, *, key: bytes | None, robust: bool,
                 mode: int) -> None:
        _reap()
        anonymous = name is None
        if name is None:
            name = f"{ANON_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            key = key if key is not None else secrets.token_bytes(ANON_KEY_BYTES)
            oflag = O_CREAT | O_EXCL
        else:
            oflag = O_CREAT
        sem = sem_open(name, oflag, mode, value, flags=USE_ESEM, key=key, robust=robust)
        assert isinstance(sem, EsemSemaphore)
        self._setup(sem, anonymous=anonymous, creator=os.getpid())

    def _setup(self, sem: EsemSemaphore, *, anonymous: bool, creator: int) -> None:
        self._sem = sem
        self._anonymous = anonymous
        self._creator = creator
        self._local = threading.Lock()
        self._finalizer = weakref.finalize(self, _bury, sem, anonymous, creator)
        self._finalizer.atexit = False
        _live.add(self)

    @property
    def name(self) -> str:
        return self._sem.name

    def close(self) -> None:
        """Release the handle now (and, for the creator of an anonymous primitive, its
        name); the object is unusable afterwards."""
        if self._finalizer.detach() is not None:
            _release_handle(self._sem, self._anonymous, self._creator)

    # The key travels only inside a pickle made while multiprocessing spawns a child
    # (EsemSemaphore.__reduce__ checks it, as multiprocessing's own locks do).
    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing.context import assert_spawning

        assert_spawning(self)
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_local", "_finalizer", "_sem", "_anonymous", "_creator")}
        state["_sem"] = self._sem
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        sem = state.pop("_sem")
        self.__dict__.update(state)
        self._setup(sem, anonymous=False, creator=-1)

    # -------------------------------------------------------------- waits

    def _take(self, blocking: bool, timeout: float | None) -> bool:
        if timeout is not None and timeout != timeout:
            raise ValueError("timeout must not be NaN")
        if timeout is not None and timeout >= MAX_TIMEOUT_S:
            timeout = None  # beyond what the wire carries (292 years): no deadline
        try:
            if not blocking:
                self._sem.trywait()
            elif timeout is None:
                self._sem.wait()
            else:
                self._sem.timedwait(max(0.0, timeout))
        except BusyError:
            return False
        return True

    def _value(self) -> int:
        return self._sem.getvalue()

    @property
    def _semlock(self) -> _SemLockView:
        """What ``multiprocessing.queues`` reads of its semaphores (``qsize``, ``full``,
        ``JoinableQueue.task_done``): the count, from the service."""
        return _SemLockView(self)


class _SemLockView:
    """The read-only part of ``_multiprocessing.SemLock`` that the standard library
    calls on a context's primitives."""

    def __init__(self, prim: _Base) -> None:
        self._prim = prim

    def _get_value(self) -> int:
        return self._prim._value()

    def _is_zero(self) -> bool:
        return self._prim._value() == 0


def _after_fork_in_child() -> None:
    for prim in list(_live):
        prim._local = threading.Lock()  # may have been held by another thread at fork


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------ semaphores


class Semaphore(_Base):
    """``threading.Semaphore`` over an e-semaphore: ``acquire(blocking=True,
    timeout=None) -> bool``, ``release(n=1)``, context manager. ``name`` (optional)
    opens or creates the named semaphore, with ``value`` if it creates it."""

    def __init__(self, value: int = 1, name: str | None = None, *, key: bytes | None = None,
                 robust: bool = False, mode: int = 0o600) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"semaphore initial value must be an int, not {value!r}")
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        super().__init__(value, name, key=key, robust=robust, mode=mode)
        self._initial = value

    def __repr__(self) -> str:
        return f"<esem.{type(self).__name__} {self.name} value={self._safe_value()}>"

    def _safe_value(self) -> int | str:
        try:
            return self._value()
        except EsemError:
            return "?"

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take a unit: block (FIFO), or with ``timeout`` seconds (kept by the service)
        return False when it expires; ``blocking=False`` tries once."""
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        return self._take(blocking, timeout)

    __enter__ = acquire

    def release(self, n: int = 1) -> None:
        """Give back ``n`` units (each to the first waiter, if any)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {n!r}")
        if n < 1:
            raise ValueError("n must be one or more")
        for _ in range(n):
            self._sem.post()

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def statistics(self) -> dict[str, object]:
        return {"name": self.name, "value": self._value(), "initial": self._initial}


class BoundedSemaphore(Semaphore):
    """``threading.BoundedSemaphore``: ``release`` past the initial value raises
    ``ValueError`` (exact within a process; see the module docstring across processes)."""

    def release(self, n: int = 1) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {n!r}")
        if n < 1:
            raise ValueError("n must be one or more")
        with self._local:
            if self._value() + n > self._initial:
                raise ValueError("Semaphore released too many times")
            for _ in range(n):
                self._sem.post()


# ------------------------------------------------------------------ locks


def _lock_timeout(blocking: bool, timeout: float) -> float | None:
    """threading.Lock's argument rules; None means wait without a deadline."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number, not {timeout!r}")
    if not blocking and timeout != -1:
        raise ValueError("can't specify a timeout for a non-blocking call")
    if timeout < 0 and timeout != -1:
        raise ValueError("timeout value must be a non-negative number")
    return None if timeout == -1 else timeout


class Lock(_Base):
    """``threading.Lock`` over an e-semaphore of value 1: ``acquire(blocking=True,
    timeout=-1) -> bool``, ``release()``, ``locked()``, context manager."""

    def __init__(self, name: str | None = None, *, key: bytes | None = None,
                 robust: bool = False, mode: int = 0o600) -> None:
        super().__init__(1, name, key=key, robust=robust, mode=mode)
        self._owner: _Owner | None = None

    def __repr__(self) -> str:
        try:
            state = "locked" if self.locked() else "unlocked"
        except EsemError:
            state = "?"
        return f"<esem.{type(self).__name__} {self.name} {state}>"

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._take(blocking, _lock_timeout(blocking, timeout)):
            self._owner = _me()
            return True
        return False

    def __enter__(self) -> bool:
        return self.acquire()

    def release(self) -> None:
        """Unlock; ``RuntimeError`` if it is not locked (checked, see the module doc)."""
        with self._local:
            if self._value() != 0:
                raise RuntimeError("release unlocked lock")
            self._owner = None
            self._sem.post()

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def locked(self) -> bool:
        return self._value() == 0

    # What Condition needs (the names threading.Condition uses).
    def _is_owned(self) -> bool:
        return self._owner == _me()

    def _release_save(self) -> object:
        self.release()
        return None

    def _acquire_restore(self, state: object) -> None:
        self.acquire()


class RLock(_Base):
    """``threading.RLock``: the owning thread (of the owning process) may take it again;
    it is free once released as many times."""

    def __init__(self, name: str | None = None, *, key: bytes | None = None,
                 robust: bool = False, mode: int = 0o600) -> None:
        super().__init__(1, name, key=key, robust=robust, mode=mode)
        self._owner: _Owner | None = None
        self._count = 0

    def __repr__(self) -> str:
        owner = self._owner if self._owner and self._owner[0] == os.getpid() else None
        return f"<esem.RLock {self.name} owner={owner} count={self._count if owner else 0}>"

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._owner, self._count = None, 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        wait = _lock_timeout(blocking, timeout)
        if self._owner == _me():
            self._count += 1
            return True
        if not self._take(blocking, wait):
            return False
        self._owner, self._count = _me(), 1
        return True

    def __enter__(self) -> bool:
        return self.acquire()

    def release(self) -> None:
        if self._owner != _me():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if self._count == 0:
            self._owner = None
            self._sem.post()

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _is_owned(self) -> bool:
        return self._owner == _me()

    def _release_save(self) -> object:
        if self._owner != _me():
            raise RuntimeError("cannot release un-acquired lock")
        count, self._owner, self._count = self._count, None, 0
        self._sem.post()
        return count

    def _acquire_restore(self, state: object) -> None:
        assert isinstance(state, int)
        self._take(True, None)
        self._owner, self._count = _me(), state


# ------------------------------------------------------------------ condition


class Condition:
    """``threading.Condition`` across processes. Its lock is an esem ``Lock`` or
    ``RLock`` (a new ``RLock`` by default). Sleepers are counted in e-semaphores: a
    waiter posts ``sleeping`` before it releases the lock and sleeps on ``wake``; a
    notifier (holding the lock) first forgets sleepers that have left on a timeout
    (each left a ``woken`` post), then posts ``wake`` once per sleeper it wakes, waits for
    each of them to post ``woken``, and takes back a ``wake`` unit that nobody took (its
    sleeper timed out in between)."""

    def __init__(self, lock: Lock | RLock | None = None) -> None:
        if lock is not None and not isinstance(lock, Lock | RLock):
            raise TypeError("an esem Condition needs an esem Lock or RLock")
        self._lock: Lock | RLock = lock if lock is not None else RLock()
        self._sleeping = Semaphore(0)
        self._woken = Semaphore(0)
        self._wake = Semaphore(0)

    def __repr__(self) -> str:
        return f"<esem.Condition {self._lock!r}>"

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing.context import assert_spawning

        assert_spawning(self)
        return dict(self.__dict__)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        self._sleeping.release()
        saved = self._lock._release_save()
        try:
            return self._wake.acquire(True, timeout)
        finally:
            self._woken.release()
            self._lock._acquire_restore(saved)

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            left = None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
            self.wait(left)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        if not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        while self._woken.acquire(False):  # a sleeper that left by timing out
            self._sleeping.acquire(False)
        woken = 0
        while woken < n and self._sleeping.acquire(False):
            self._wake.release()
            woken += 1
        for _ in range(woken):
            self._woken.acquire()
        while self._wake.acquire(False):  # its sleeper timed out before taking it
            pass

    def notify_all(self) -> None:
        self.notify(2**31 - 1)

    def close(self) -> None:
        for prim in (self._sleeping, self._woken, self._wake):
            prim.close()


# ------------------------------------------------------------------ event, barrier


class Event:
    """``threading.Event`` across processes: the flag is an e-semaphore's value."""

    def __init__(self) -> None:
        self._cond = Condition(Lock())
        self._flag = Semaphore(0)

    def __repr__(self) -> str:
        return f"<esem.Event {'set' if self.is_set() else 'unset'}>"

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing.context import assert_spawning

        assert_spawning(self)
        return dict(self.__dict__)

    def is_set(self) -> bool:
        return self._flag._value() > 0

    def set(self) -> None:
        with self._cond:
            if self._flag._value() == 0:
                self._flag.release()
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag.acquire(False)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if self._flag._value() > 0:
                return True
            self._cond.wait(timeout)
            return self._flag._value() > 0


class _Counter:
    """An integer kept as an e-semaphore's value (0..2**31-1), read and set under a lock
    the caller holds."""

    def __init__(self, offset: int = 0) -> None:
        self._sem = Semaphore(0)
        self._offset = offset  # stored value = integer + offset (values are never < 0)

    def get(self) -> int:
        return self._sem._value() - self._offset

    def set(self, value: int) -> None:
        diff = value + self._offset - self._sem._value()
        if diff > 0:
            self._sem.release(diff)
        for _ in range(-diff):
            self._sem.acquire(False)


class Barrier(threading.Barrier):
    """``threading.Barrier`` across processes: threading's own algorithm, with its state
    and count kept in e-semaphores and its condition an esem ``Condition``."""

    def __init__(self, parties: int, action: Callable[[], None] | None = None,
                 timeout: float | None = None) -> None:
        if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
            raise ValueError("parties must be > 0")
        self._cond = Condition(Lock())
        self._action = action
        self._timeout = timeout
        self._parties = parties
        self._state_cell = _Counter(offset=2)  # threading's states run from -2 to 1
        self._count_cell = _Counter()
        self._state = 0  # filling

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing.context import assert_spawning

        assert_spawning(self)
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<esem.Barrier parties={self._parties}>"

    @property
    def _state(self) -> int:
        return self._state_cell.get()

    @_state.setter
    def _state(self, value: int) -> None:
        self._state_cell.set(value)

    @property
    def _count(self) -> int:
        return self._count_cell.get()

    @_count.setter
    def _count(self, value: int) -> None:
        self._count_cell.set(value)


__all__ = ["Barrier", "BoundedSemaphore", "Condition", "Event", "Lock", "RLock", "Semaphore"]
