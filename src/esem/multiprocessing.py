"""A ``multiprocessing`` context whose synchronization lives in the esem service.

``esem.multiprocessing.get_context(method=None)`` returns a context (a
``multiprocessing.context.BaseContext``, for the ``fork``, ``forkserver`` or ``spawn``
start method) whose ``Lock``, ``RLock``, ``Semaphore``, ``BoundedSemaphore``,
``Condition``, ``Event`` and ``Barrier`` are the e-semaphore primitives of ``esem.sync``.
Everything multiprocessing builds on them through the context is then hardened too:
``ctx.Queue()``, ``ctx.JoinableQueue()``, ``ctx.SimpleQueue()`` and ``ctx.Pool()`` take
their locks and counting semaphores from it, and the locks of ``ctx.Value``/``ctx.Array``
(their data stays in shared memory: only the synchronization moves).

How handles reach the children: with ``fork`` by inheritance (each child attaches the
handles it uses through its own session); with ``spawn`` and ``forkserver`` pickled while
the child is being spawned, and only then (the primitives refuse any other pickle, as
multiprocessing's own locks do), so each primitive's key travels on the pipe the start
method already uses for the child's authentication key.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context as _mpc
from collections.abc import Callable
from typing import Any

from esem import sync


class _EsemContext:
    """The primitives of an esem context (mixed into each concrete context)."""

    _name: str

    def Lock(self) -> sync.Lock:
        return sync.Lock()

    def RLock(self) -> sync.RLock:
        return sync.RLock()

    def Semaphore(self, value: int = 1) -> sync.Semaphore:
        return sync.Semaphore(value)

    def BoundedSemaphore(self, value: int = 1) -> sync.BoundedSemaphore:
        return sync.BoundedSemaphore(value)

    def Condition(
        self, lock: sync.Lock | sync.RLock | None = None
    ) -> sync.Condition:
        return sync.Condition(lock)

    def Event(self) -> sync.Event:
        return sync.Event()

    def Barrier(
        self, parties: int, action: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> sync.Barrier:
        return sync.Barrier(parties, action, timeout)

    def get_context(self, method: str | None = None) -> Any:
        if method is None:
            return self
        return get_context(method)

    def __repr__(self) -> str:
        return f"<esem.multiprocessing context {self._name!r}>"


# The ignores: these contexts return esem.sync's primitives where typeshed expects
# multiprocessing.synchronize's (the same interface; not the same classes).
class ForkContext(_EsemContext, _mpc.ForkContext):  # type: ignore[misc]
    pass


class ForkServerContext(_EsemContext, _mpc.ForkServerContext):  # type: ignore[misc]
    pass


class SpawnContext(_EsemContext, _mpc.SpawnContext):  # type: ignore[misc]
    pass


_contexts: dict[str, _mpc.BaseContext] = {
    "fork": ForkContext(),
    "forkserver": ForkServerContext(),
    "spawn": SpawnContext(),
}


def get_context(method: str | None = None) -> _mpc.BaseContext:
    """The esem context for ``method`` (default: multiprocessing's current start
    method). Use it as multiprocessing's: ``ctx.Process``, ``ctx.Queue()``,
    ``ctx.Pool()``, ``ctx.Lock()``..."""
    if method is None:
        # allow_none: asking must not fix multiprocessing's own start method for good;
        # unset, it is the platform default, which get_all_start_methods lists first.
        method = (multiprocessing.get_start_method(allow_none=True)
                  or multiprocessing.get_all_start_methods()[0])
    try:
        ctx = _contexts[method]
    except KeyError:
        raise ValueError(f"cannot find context for {method!r}") from None
    ctx._check_available()
    return ctx


__all__ = ["ForkContext", "ForkServerContext", "SpawnContext", "get_context"]
