"""Many real processes and threads on one semaphore service.

A bounded buffer shared by producer and consumer processes, eight threads of one process
sharing handles, handles inherited across ``fork`` (and across ``fork`` again), and an
unlink while other processes hold handles. Each runs against both backends, so the esem
service is held to what real POSIX semaphores do.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from esem import (
    O_CREAT,
    O_EXCL,
    USE_ESEM,
    BusyError,
    EsemSemaphore,
    ExistentialError,
    get_client,
    sem_open,
)

from . import reap, run_forked, spawn, stat, wait_for_waiters, wait_until

pytestmark = pytest.mark.native_backend  # the backend tests run as esem-native too

CREX = O_CREAT | O_EXCL
JOIN_TIMEOUT = 30.0

# -------------------------------------------------------------- bounded buffer

SLOTS = 4
PRODUCERS = 2
CONSUMERS = 3
ITEMS_EACH = 120
SENTINEL = -1


def test_producer_consumer_bounded_buffer(backend: Any, sem_names: Callable[[], str]) -> None:
    """Six processes (two producers, three consumers, and the parent, which sends one
    sentinel per consumer at the end) move every item through a four-slot buffer in
    shared memory, guarded by slots/items/mutex semaphores: each item is consumed exactly
    once, and the mutex is never held by two processes at once."""
    ctx = multiprocessing.get_context("fork")
    buf = ctx.RawArray("q", SLOTS)
    cursor = ctx.RawArray("q", 3)  # head, tail, processes inside the critical section
    violations = ctx.RawValue("q", 0)
    total = PRODUCERS * ITEMS_EACH
    logs = [ctx.RawArray("q", total) for _ in range(CONSUMERS)]
    counts = ctx.RawArray("q", CONSUMERS)

    n_slots, n_items, n_mutex = sem_names(), sem_names(), sem_names()
    slots = backend.open(n_slots, CREX, 0o600, SLOTS)
    items = backend.open(n_items, CREX, 0o600, 0)
    mutex = backend.open(n_mutex, CREX, 0o600, 1)

    def locked(action: Callable[[], int]) -> int:
        mutex.wait()
        try:
            cursor[2] += 1
            if cursor[2] != 1:
                violations.value += 1
            result = action()
            cursor[2] -= 1
            return result
        finally:
            mutex.post()

    def put(item: int) -> None:
        slots.wait()

        def store() -> int:
            buf[cursor[1] % SLOTS] = item
            cursor[1] += 1
            return 0

        locked(store)
        items.post()

    def producer(index: int) -> None:
        # Producers use the handles they inherited.
        for i in range(ITEMS_EACH):
            put(index * ITEMS_EACH + i)

    def consumer(index: int) -> None:
        # Consumers open the semaphores by name, each in its own process.
        nonlocal slots, items, mutex
        slots, items, mutex = backend.open(n_slots), backend.open(n_items), backend.open(n_mutex)
        while True:
            items.wait()

            def take() -> int:
                item = buf[cursor[0] % SLOTS]
                cursor[0] += 1
                return item

            item = locked(take)
            slots.post()
            if item == SENTINEL:
                return
            logs[index][counts[index]] = item
            counts[index] += 1

    consumers = [spawn(lambda i=i: consumer(i)) for i in range(CONSUMERS)]  # type: ignore[misc]
    producers = [spawn(lambda i=i: producer(i)) for i in range(PRODUCERS)]  # type: ignore[misc]
    assert [reap(pid) for pid in producers] == [0] * PRODUCERS
    for _ in range(CONSUMERS):
        put(SENTINEL)
    assert [reap(pid) for pid in consumers] == [0] * CONSUMERS

    consumed = sorted(logs[c][i] for c in range(CONSUMERS) for i in range(counts[c]))
    assert consumed == list(range(total)), "an item was lost or consumed twice"
    assert violations.value == 0, "two processes were inside the mutex at once"
    assert (slots.getvalue(), items.getvalue(), mutex.getvalue()) == (SLOTS, 0, 1)
    if isinstance(slots, EsemSemaphore):
        info = stat(n_items)
        assert info["posts"] == info["waits"] == total + CONSUMERS
        assert info["waiters"] == 0


# ------------------------------------------------------------ threads, one process


def test_blocked_waits_never_delay_other_threads(backend: Any,
                                                 sem_names: Callable[[], str]) -> None:
    """Eight threads share two handles: four block in ``wait`` on one semaphore while four
    post and take from another, and all of those finish while the waiters are still
    blocked (with esem, one waiter holds the session's reader role meanwhile)."""
    gate = backend.open(sem_names(), CREX, 0o600, 0)
    work = backend.open(sem_names(), CREX, 0o600, 0)
    rounds = 40
    errors: list[BaseException] = []
    passed = threading.Semaphore(0)

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
        return run

    def waiter() -> None:
        gate.wait()
        passed.release()

    def worker() -> None:
        for _ in range(rounds):
            work.post()
            work.post()
            work.trywait()
            work.getvalue()

    waiters = [threading.Thread(target=guard(waiter), daemon=True) for _ in range(4)]
    for t in waiters:
        t.start()
    if isinstance(gate, EsemSemaphore):
        wait_for_waiters(gate.name, 4)
    workers = [threading.Thread(target=guard(worker), daemon=True) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive(), "a post was held up behind a blocked wait"
    assert not errors, errors
    assert work.getvalue() == 4 * rounds
    assert all(t.is_alive() for t in waiters)
    assert not passed.acquire(timeout=0)

    for i in range(4):
        gate.post()
        assert passed.acquire(timeout=JOIN_TIMEOUT), f"waiter {i} not woken"
    for t in waiters:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive()
    assert not errors, errors
    assert gate.getvalue() == 0


def test_threads_share_a_mutex(backend: Any, sem_name: str) -> None:
    """Eight threads take turns through one handle used as a mutex; no two are ever
    inside at once and every critical section runs."""
    mutex = backend.open(sem_name, CREX, 0o600, 1)
    inside = [0]
    runs = [0]
    broken: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(25):
                with mutex:
                    inside[0] += 1
                    if inside[0] != 1:
                        broken.append("two threads inside")
                    runs[0] += 1
                    inside[0] -= 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
        assert not t.is_alive()
    assert not errors, errors
    assert not broken
    assert runs[0] == 8 * 25
    assert mutex.getvalue() == 1


# ------------------------------------------------------------------------ fork


def test_fork_child_uses_inherited_handles(backend: Any, sem_names: Callable[[], str]) -> None:
    sem = backend.open(sem_names(), CREX, 0o600, 0)
    go = backend.open(sem_names(), CREX, 0o600, 0)
    sem.post()
    sem.wait()  # the parent has used its handles (and, with esem, its session)

    def child() -> int:
        for _ in range(3):
            sem.post()
        go.wait()  # released by the parent once it saw the posts
        sem.post()
        return 0

    pid = spawn(child)
    for _ in range(3):
        sem.timedwait(JOIN_TIMEOUT)  # the child's posts reach the parent
    go.post()
    assert reap(pid) == 0
    assert sem.getvalue() == 1
    # The parent's own session was never touched by the child.
    sem.post()
    sem.wait()
    sem.wait()
    assert sem.getvalue() == 0


def test_fork_before_first_use_and_grandchild(backend: Any,
                                              sem_names: Callable[[], str]) -> None:
    """A handle inherited twice (child, then grandchild) keeps naming the same
    semaphore, even when the parent forks before it ever used it."""
    sem = backend.open(sem_names(), CREX, 0o600, 0)

    def grandchild() -> int:
        sem.post()
        return 0

    def child() -> int:
        sem.post()
        return run_forked(grandchild)

    assert run_forked(child) == 0
    assert sem.getvalue() == 2
    sem.wait()
    sem.wait()
    with pytest.raises(BusyError):
        sem.trywait()


def test_fork_while_a_thread_waits(backend: Any, sem_name: str) -> None:
    """Fork while another thread of the parent is blocked in a wait (and, with esem,
    holds the session's reader role): the child still works, and its post wakes the
    parent's thread."""
    sem = backend.open(sem_name, CREX, 0o600, 0)
    woke = threading.Event()
    errors: list[BaseException] = []

    def wait_in_thread() -> None:
        try:
            sem.wait()
            woke.set()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait_in_thread, daemon=True)
    thread.start()
    if isinstance(sem, EsemSemaphore):
        wait_for_waiters(sem_name, 1)

    def child() -> int:
        assert sem.getvalue() == 0
        sem.post()
        return 0

    assert run_forked(child) == 0
    assert woke.wait(JOIN_TIMEOUT)
    thread.join(JOIN_TIMEOUT)
    assert not errors, errors
    assert sem.getvalue() == 0


def test_multiprocessing_fork_child(backend: Any, sem_name: str) -> None:
    """The same through multiprocessing's fork context."""
    sem = backend.open(sem_name, CREX, 0o600, 1)
    ctx = multiprocessing.get_context("fork")

    def child() -> None:
        sem.wait()
        sem.post()
        sem.post()

    proc = ctx.Process(target=child)
    proc.start()
    proc.join(JOIN_TIMEOUT)
    assert proc.exitcode == 0
    assert sem.getvalue() == 2


def test_esem_fork_child_gets_its_own_session(service: Any, sem_name: str) -> None:
    """After fork the child never reuses the parent's session: it connects anew."""
    sem = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)
    parent_client = get_client()
    before = stat(sem_name)["handles"]

    def child() -> int:
        sem.post()
        client = get_client()
        return 0 if client is not parent_client and client.pid == os.getpid() else 3

    assert run_forked(child) == 0
    assert get_client() is parent_client and parent_client.failed is None
    assert sem.getvalue() == 1
    # The child's session ended with it, and took its handle along.
    wait_until(lambda: stat(sem_name)["handles"] == before, what="child session gone")


# ------------------------------------------------------------------------ unlink


def test_unlink_while_other_processes_hold_handles(backend: Any, sem_name: str,
                                                   sem_names: Callable[[], str]) -> None:
    """A child holds its own handle (opened by name) across the parent's unlink: it keeps
    working on the old semaphore, and a new create under the name is a new semaphore."""
    ready = backend.open(sem_names(), CREX, 0o600, 0)
    resume = backend.open(sem_names(), CREX, 0o600, 0)
    old = backend.open(sem_name, CREX, 0o600, 0)

    def child() -> int:
        mine = backend.open(sem_name)
        ready.post()
        resume.wait()  # meanwhile the parent unlinks and re-creates the name
        mine.post()
        mine.post()
        try:
            backend.open(sem_name).post()  # the name now is the new semaphore
        except ExistentialError:
            return 4
        return 0

    pid = spawn(child)
    ready.timedwait(JOIN_TIMEOUT)
    backend.unlink(sem_name)
    with pytest.raises(ExistentialError):
        backend.open(sem_name)
    new = backend.open(sem_name, CREX, 0o600, 10)
    resume.post()
    assert reap(pid) == 0
    assert old.getvalue() == 2  # the child's held handle still reached the old one
    assert new.getvalue() == 11
    if isinstance(old, EsemSemaphore):
        wait_until(lambda: stat(sem_name)["handles"] == 1, what="child handle gone")
        assert stat(sem_name)["initial"] == 10
