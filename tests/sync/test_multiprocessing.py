"""esem.multiprocessing contexts under the fork, forkserver and spawn start methods, with
real child processes and the real daemon: mutual exclusion, Queue and Pool, Condition,
Event and Barrier across processes, and where the state is (the service's table; nothing
in /dev/shm, where multiprocessing's own context keeps its semaphores)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue as queue_mod
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import esem
import esem.multiprocessing as emp
from esem.client.admin import list_semaphores, stat_semaphore

from . import workers

METHODS = ["fork", "forkserver", "spawn"]


@pytest.fixture(params=METHODS)
def ctx(request: pytest.FixtureRequest, service: Any) -> Any:
    return emp.get_context(request.param)


def _names() -> set[str]:
    return {e["name"] for e in list_semaphores(esem.get_client())}


def _join_all(procs: list[Any]) -> None:
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_context_is_a_multiprocessing_context(ctx: Any) -> None:
    assert isinstance(ctx, multiprocessing.context.BaseContext)
    assert ctx.get_context() is ctx
    assert ctx.get_context("spawn") is emp.get_context("spawn")
    assert ctx.get_start_method() in METHODS
    for make in (ctx.Lock, ctx.RLock, ctx.Semaphore, ctx.BoundedSemaphore, ctx.Condition,
                 ctx.Event):
        assert type(make()).__module__ == "esem.sync"
    assert type(ctx.Barrier(2)).__module__ == "esem.sync"
    with pytest.raises(ValueError):
        emp.get_context("threads")


def test_default_context_follows_multiprocessing_without_fixing_it() -> None:
    code = ("import multiprocessing, esem.multiprocessing as emp\n"
            "assert emp.get_context().get_start_method() == "
            "multiprocessing.get_all_start_methods()[0]\n"
            "multiprocessing.set_start_method('spawn')\n"  # still allowed
            "assert emp.get_context().get_start_method() == 'spawn'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_lock_mutual_exclusion_across_processes(ctx: Any, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    lock = ctx.Lock()
    procs = [ctx.Process(target=workers.bump_counter, args=(lock, str(counter), 15))
             for _ in range(3)]
    for p in procs:
        p.start()
    _join_all(procs)
    assert int(counter.read_text()) == 45
    assert not lock.locked()


def test_value_with_its_default_lock(ctx: Any) -> None:
    total = ctx.Value("i", 0)  # synchronized by ctx.RLock(): an esem RLock
    assert type(total.get_lock()).__module__ == "esem.sync"
    procs = [ctx.Process(target=workers.bump_value, args=(total, 20)) for _ in range(3)]
    for p in procs:
        p.start()
    _join_all(procs)
    assert total.value == 60


def test_queue_and_joinable_queue(ctx: Any) -> None:
    q = ctx.Queue()
    procs = [ctx.Process(target=workers.produce, args=(q, 100 * i, 20)) for i in range(3)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=60) for _ in range(60))
    _join_all(procs)
    assert got == sorted(100 * i + j for i in range(3) for j in range(20))
    with pytest.raises(queue_mod.Empty):
        q.get(timeout=0.1)
    assert q.empty() and q.qsize() == 0
    bounded = ctx.Queue(2)
    bounded.put(1)
    bounded.put(2)
    with pytest.raises(queue_mod.Full):
        bounded.put(3, timeout=0.1)
    jq = ctx.JoinableQueue()
    jq.put("x")
    assert jq.get(timeout=10) == "x"
    jq.task_done()
    jq.join()
    with pytest.raises(ValueError):
        jq.task_done()  # its BoundedSemaphore(0)'s bound, as multiprocessing's


def test_pool(ctx: Any) -> None:
    with ctx.Pool(2) as pool:
        assert pool.map(workers.square, range(30)) == [x * x for x in range(30)]
        assert pool.apply_async(workers.square, (12,)).get(60) == 144


def test_event_across_processes(ctx: Any) -> None:
    ev, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=workers.wait_event_then_report, args=(ev, q, i))
             for i in range(2)]
    for p in procs:
        p.start()
    assert sorted(q.get(timeout=60) for _ in range(2)) == [("waiting", 0), ("waiting", 1)]
    ev.set()
    assert sorted(q.get(timeout=60) for _ in range(2)) == [("woke", 0, True),
                                                           ("woke", 1, True)]
    _join_all(procs)


def test_condition_across_processes(ctx: Any) -> None:
    cond, items, q = ctx.Condition(), ctx.Semaphore(0), ctx.Queue()
    procs = [ctx.Process(target=workers.condition_consumer, args=(cond, items, q))
             for _ in range(3)]
    for p in procs:
        p.start()
    for _ in range(3):
        with cond:
            items.release()
            cond.notify()
    assert [q.get(timeout=60) for _ in range(3)] == [True, True, True]
    _join_all(procs)
    assert items.statistics()["value"] == 0


def test_barrier_across_processes(ctx: Any) -> None:
    barrier, q = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=workers.barrier_party, args=(barrier, q, 2))
             for _ in range(2)]
    for p in procs:
        p.start()
    mine = [barrier.wait(60) for _ in range(2)]
    theirs = [q.get(timeout=60) for _ in range(4)]
    _join_all(procs)
    for r in range(2):
        indexes = sorted([i for rr, i in theirs if rr == r] + [mine[r]])
        assert indexes == [0, 1, 2]
    assert not barrier.broken and barrier.n_waiting == 0


def test_lock_held_in_a_child_excludes_the_parent(ctx: Any) -> None:
    lock, held, release = ctx.Lock(), ctx.Event(), ctx.Event()
    p = ctx.Process(target=workers.hold_then_release, args=(lock, held, release))
    p.start()
    assert held.wait(60)
    assert lock.locked() and lock.acquire(timeout=0.1) is False
    release.set()
    assert lock.acquire(timeout=60) is True
    _join_all([p])


def test_primitives_live_in_the_service_and_not_in_dev_shm(ctx: Any) -> None:
    """The esem context's Queue and locks are names in the service's table, key-bound;
    nothing of theirs is in /dev/shm. multiprocessing's own spawn context, beside it,
    keeps a writable semaphore file there for the same Lock."""
    before = set(os.listdir("/dev/shm"))
    q = ctx.Queue()
    lock = ctx.Lock()
    p = ctx.Process(target=workers.produce, args=(q, 0, 1))
    p.start()
    assert q.get(timeout=60) == 0
    _join_all([p])
    assert set(os.listdir("/dev/shm")) == before
    names = _names()
    listed = subprocess.run([sys.executable, "-m", "esem", "ls", "--json"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert {e["name"] for e in json.loads(listed.stdout)} >= {lock.name, q._rlock.name}
    for prim in (lock, q._rlock, q._wlock, q._sem):
        assert prim.name in names
        assert stat_semaphore(esem.get_client(), prim.name)["key_bound"]
    legacy = multiprocessing.get_context("spawn").Lock()
    legacy_files = set(os.listdir("/dev/shm")) - before
    assert any(f.startswith("sem.mp-") for f in legacy_files), legacy_files
    del legacy


def test_handles_pickle_only_while_spawning(ctx: Any) -> None:
    lock = ctx.Lock()
    with pytest.raises(RuntimeError):
        pickle.dumps(lock)
    with pytest.raises(RuntimeError):
        pickle.dumps(lock._sem)  # the EsemSemaphore itself (it carries the key)


_EXIT_SCRIPT = """
import os
import sys
import esem.multiprocessing
from esem.client.admin import list_semaphores
import esem

def square(x):
    return x * x

if __name__ == "__main__":
    ctx = esem.multiprocessing.get_context(sys.argv[1])
    pool = ctx.Pool(2)                      # never closed: multiprocessing ends it at exit
    assert pool.map(square, range(4)) == [0, 1, 4, 9]
    q = ctx.Queue()
    q.put(b"x" * 1000)                      # flushed by the feeder thread at exit
    print(" ".join(e["name"] for e in list_semaphores(esem.get_client())
                   if e["name"].startswith(f"/esem-anon-{os.getpid()}-")))
"""


@pytest.mark.parametrize("method", METHODS)
def test_exit_with_an_open_pool_and_queue(service: Any, tmp_path: Path, method: str) -> None:
    """multiprocessing's own exit finalizers (terminate the pool, flush the queue's
    feeder thread) still find their locks; the names go only after them."""
    script = tmp_path / "exit_script.py"
    script.write_text(_EXIT_SCRIPT)
    done = subprocess.run([sys.executable, str(script), method], cwd=tmp_path,
                          env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    names = set(done.stdout.split())
    assert names, "the script's primitives were not in the table"
    assert not names & _names(), "anonymous names outlived their creator"
