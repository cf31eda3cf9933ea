"""esem.Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event, Barrier in one process
(threads), against the real daemon: threading's signatures and rules, where the state is
(in the service's table, key-bound, nothing in /dev/shm), and the handle lifetime."""

from __future__ import annotations

import gc
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import esem
from esem import BoundedSemaphore, Condition, Event, KeyRejected, Lock, RLock, Semaphore
from esem.client.admin import list_semaphores, stat_semaphore


def _names() -> set[str]:
    return {e["name"] for e in list_semaphores(esem.get_client())}


def _in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    return out[0]


@pytest.fixture(autouse=True)
def _service(service: Any) -> None:
    pass


# ------------------------------------------------------------------ Lock


def test_lock_threading_signature() -> None:
    lock = Lock()
    assert not lock.locked()
    assert lock.acquire() is True
    assert lock.locked()
    assert lock.acquire(False) is False
    assert lock.acquire(timeout=0.05) is False
    assert lock.acquire(True, 0) is False
    assert _in_thread(lambda: lock.acquire(blocking=False)) is False
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()  # release unlocked lock: refused, the count stays 1
    assert lock.acquire(False) and lock.acquire(False) is False
    lock.release()
    with lock:
        assert lock.locked()
    assert not lock.locked()


@pytest.mark.parametrize(("blocking", "timeout", "exc"), [
    (False, 1, ValueError), (True, -2, ValueError), (True, "1", TypeError)])
def test_lock_bad_arguments(blocking: bool, timeout: Any, exc: type[Exception]) -> None:
    lock = Lock()
    with pytest.raises(exc):
        lock.acquire(blocking, timeout)
    assert not lock.locked()


def test_lock_released_by_another_thread_wakes_waiter() -> None:
    lock = Lock()
    lock.acquire()
    threading.Timer(0.1, lock.release).start()
    assert lock.acquire(timeout=20) is True  # threading.Lock allows any thread to release
    lock.release()


def test_named_lock_is_one_lock_for_every_opener(sem_name: str) -> None:
    a, b = Lock(sem_name), Lock(sem_name)
    assert a.name == b.name == sem_name
    assert a.acquire()
    assert b.acquire(False) is False
    a.release()
    assert b.acquire(False) is True
    b.release()


def test_named_lock_with_key(sem_name: str) -> None:
    key = os.urandom(32)
    lock = Lock(sem_name, key=key)
    with pytest.raises(KeyRejected):
        Lock(sem_name)
    with Lock(sem_name, key=key):
        assert lock.locked()


# ------------------------------------------------------------------ Semaphore


def test_semaphore_threading_signature() -> None:
    sem = Semaphore(2)
    assert sem.acquire() and sem.acquire(timeout=1)
    assert sem.acquire(False) is False
    assert sem.acquire(timeout=0.05) is False
    assert sem.acquire(timeout=-1) is False  # as threading: a past deadline, no wait
    with pytest.raises(ValueError):
        sem.acquire(timeout=float("nan"))
    sem.release()
    assert sem.acquire(timeout=float("inf")) is True  # no deadline (and no overflow)
    sem.release(3)
    assert sem.statistics()["value"] == 3
    with pytest.raises(ValueError):
        sem.release(0)
    with pytest.raises(ValueError):
        sem.acquire(False, 1)
    with sem:
        assert sem.statistics()["value"] == 2
    with pytest.raises(ValueError):
        Semaphore(-1)
    with pytest.raises(TypeError):
        Semaphore(1.5)  # type: ignore[arg-type]


def test_bounded_semaphore_refuses_release_past_initial() -> None:
    sem = BoundedSemaphore(2)
    with pytest.raises(ValueError):
        sem.release()
    sem.acquire()
    sem.acquire()
    with pytest.raises(ValueError):
        sem.release(3)
    sem.release(2)
    with pytest.raises(ValueError):
        sem.release()
    assert sem.statistics()["value"] == 2


def test_bounded_semaphore_exact_under_threads() -> None:
    """Within a process the check and the post are one step: of 8 threads releasing a
    full BoundedSemaphore(1) after one acquire, exactly one succeeds."""
    sem = BoundedSemaphore(1)
    sem.acquire()
    ok: list[bool] = []
    barrier = threading.Barrier(8)

    def release() -> None:
        barrier.wait()
        try:
            sem.release()
            ok.append(True)
        except ValueError:
            ok.append(False)

    threads = [threading.Thread(target=release) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ok) == [False] * 7 + [True]
    assert sem.statistics()["value"] == 1


# ------------------------------------------------------------------ RLock


def test_rlock_is_reentrant_and_owned() -> None:
    lock = RLock()
    assert lock.acquire() and lock.acquire() and lock.acquire(False)
    assert _in_thread(lambda: lock.acquire(False)) is False
    errors: list[BaseException] = []

    def foreign_release() -> None:
        try:
            lock.release()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=foreign_release)
    t.start()
    t.join()
    assert errors, "another thread released an RLock it does not own"
    lock.release()
    lock.release()
    assert _in_thread(lambda: lock.acquire(False)) is False
    lock.release()
    assert _in_thread(lambda: lock.acquire(False)) is True  # taken by that thread now
    with pytest.raises(RuntimeError):
        lock.release()


# ------------------------------------------------------------------ Condition, Event, Barrier


def test_condition_wait_notify_and_timeout() -> None:
    cond = Condition()
    with pytest.raises(RuntimeError):
        cond.wait(0)
    with pytest.raises(RuntimeError):
        cond.notify()
    items: list[int] = []
    got: list[int] = []

    def consumer() -> None:
        with cond:
            assert cond.wait_for(lambda: items, timeout=30)
            got.append(items.pop())

    threads = [threading.Thread(target=consumer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    for i in range(3):
        with cond:
            items.append(i)
            cond.notify()
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert sorted(got) == [0, 1, 2]
    with cond:
        assert cond.wait(0.05) is False  # nobody notifies: times out
        cond.notify_all()  # no sleeper: nothing to do


def test_condition_with_recursive_lock_held_twice() -> None:
    cond = Condition(RLock())
    with cond, cond:
        threading.Timer(0.1, lambda: _notify(cond)).start()
        assert cond.wait(20) is True
        assert cond._lock._count == 2  # restored


def _notify(cond: Condition) -> None:
    with cond:
        cond.notify()


def test_event() -> None:
    ev = Event()
    assert not ev.is_set()
    assert ev.wait(0.05) is False
    threading.Timer(0.1, ev.set).start()
    assert ev.wait(20) is True
    ev.set()
    assert ev.is_set()
    ev.clear()
    assert not ev.is_set()


def test_barrier_threads_and_abort() -> None:
    barrier = esem.Barrier(3)
    indexes: list[int] = []

    def party() -> None:
        indexes.append(barrier.wait(30))

    threads = [threading.Thread(target=party) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(indexes) == [0, 1, 2]
    assert barrier.n_waiting == 0 and not barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(0.1)  # a lone party times out and breaks it
    assert barrier.broken
    barrier.reset()
    assert not barrier.broken


# ------------------------------------------------------------------ where they live


def test_anonymous_primitive_is_in_the_service_key_bound_and_unlinked_when_dropped() -> None:
    before = set(os.listdir("/dev/shm"))
    lock = Lock()
    name = lock.name
    assert name.startswith(esem.sync.ANON_PREFIX)
    assert name in _names()
    info = stat_semaphore(esem.get_client(), name)
    assert info["key_bound"] and info["value"] is None  # its count: only with its key
    assert stat_semaphore(esem.get_client(), name, key=lock._sem._key)["value"] == 1
    with pytest.raises(KeyRejected):  # a same-uid process that reads the name gets nothing
        esem.sem_open(name, 0, flags=esem.USE_ESEM)
    assert set(os.listdir("/dev/shm")) == before
    del lock
    gc.collect()
    Lock().close()  # the next esem primitive call releases what was dropped
    assert name not in _names()


def test_pickling_outside_spawning_is_refused() -> None:
    for prim in (Lock(), Semaphore(), Condition(), Event()):
        with pytest.raises(RuntimeError):
            pickle.dumps(prim)


# ------------------------------------------------------------------ unpickling in a child


def test_rebuild_reattaches_then_reopens_by_name_with_the_key(sem_name: str) -> None:
    """What a spawned child does with a pickled handle: ATTACH with the token while a
    holder lives; once none does, OPEN the name, MAC'd under the key."""
    from esem.api import _rebuild

    key = os.urandom(32)
    sem = esem.sem_open(sem_name, os.O_CREAT | os.O_EXCL, 0o600, 1, flags=esem.USE_ESEM,
                        key=key)
    assert isinstance(sem, esem.EsemSemaphore)
    (_, token), = sem._tokens.values()
    sock = str(esem.get_client().socket_path)
    attached = _rebuild(sock, sem_name, token, key, 0o600, False)
    assert attached._tokens[os.getpid()][1] != token  # a handle of its own
    attached.trywait()
    sem.close()
    attached.close()
    other = esem.sem_open(sem_name, 0, flags=esem.USE_ESEM, key=key)
    reopened = _rebuild(sock, sem_name, token, key, 0o600, False)  # token dead: by name
    reopened.post()
    assert other.getvalue() == 1


def test_rebuild_never_lands_on_an_impostor_of_the_name(sem_name: str) -> None:
    """The creator's name was unlinked and a same-uid process made an unkeyed semaphore
    under it: the child's by-name reopen is refused instead of using it (the service
    refuses a keyed open of an unkeyed semaphore; were the refusal forged, the missing
    reply MAC would be an IntegrityError)."""
    from esem.api import _rebuild

    key = os.urandom(32)
    sem = esem.sem_open(sem_name, os.O_CREAT | os.O_EXCL, 0o600, 0, flags=esem.USE_ESEM,
                        key=key)
    assert isinstance(sem, esem.EsemSemaphore)
    (_, token), = sem._tokens.values()
    sem.unlink()
    sem.close()
    esem.sem_open(sem_name, os.O_CREAT | os.O_EXCL, 0o600, 5, flags=esem.USE_ESEM)
    client = esem.Client()  # the failure closes a session: not this process's shared one
    with pytest.raises(KeyRejected):
        _rebuild(str(client.socket_path), sem_name, token, key, 0o600, False)


def test_robust_lock_is_released_when_its_holder_dies(sem_name: str) -> None:
    lock = Lock(sem_name, robust=True)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only takes the lock and dies
        lock.acquire()
        os._exit(0)
    os.waitpid(pid, 0)
    assert lock.acquire(timeout=30) is True  # the dead holder's unit came back
    lock.release()


def test_plain_lock_held_by_a_dead_process_stays_held(sem_name: str) -> None:
    lock = Lock(sem_name)
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        lock.acquire()
        os._exit(0)
    os.waitpid(pid, 0)
    assert lock.acquire(timeout=0.2) is False  # as a POSIX semaphore: a dead holder
    info = stat_semaphore(esem.get_client(), sem_name)
    assert info["dead_holders"] and info["dead_holders"][0][0] == pid


def test_esem_lock_serves_threading_condition() -> None:
    """threading.Condition takes any lock with threading's private protocol."""
    cond = threading.Condition(Lock())
    with cond:
        threading.Timer(0.1, lambda: _notify_threading(cond)).start()
        assert cond.wait(20) is True


def _notify_threading(cond: threading.Condition) -> None:
    with cond:
        cond.notify()


def test_rebuild_reaches_the_service_the_handle_lives_in(sem_name: str) -> None:
    """A forkserver started under another service's ESEM_SOCKET: the pickled handle names
    its own service, and the child talks to that one."""
    from esem.api import _rebuild
    from esem.server.embedded import EmbeddedService

    with EmbeddedService() as other:
        client = esem.Client(other.socket_path)
        key = os.urandom(32)
        sem = esem.sem_open(sem_name, os.O_CREAT | os.O_EXCL, 0o600, 3,
                            flags=esem.USE_ESEM, key=key, client=client)
        assert isinstance(sem, esem.EsemSemaphore)
        (_, token), = sem._tokens.values()
        child = _rebuild(str(other.socket_path), sem_name, token, key, 0o600, False)
        (child_client, _), = child._tokens.values()
        assert child_client.socket_path == other.socket_path
        assert child_client is not esem.get_client()
        assert child.getvalue() == 3
        child_client.close()
        client.close()
