"""The asyncio client against the real daemon, under asyncio's loop and uvloop.

The semantic cases of the conformance suite that apply to an asyncio handle, then what is
new: cancellation (withdrawn at the service, a unit granted at the same instant given
back, conservation under random cancellations), many concurrent waiters of one loop
served FIFO, one session per loop, and fork.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

import esem
import esem.aio as aio
from esem import (
    SEM_VALUE_MAX,
    USE_ESEM,
    BusyError,
    ExistentialError,
    KeyRejected,
    SemaphoreOverflow,
    ServiceUnavailable,
    get_client,
    sem_open,
)
from esem.client.admin import stat_semaphore
from esem.client.aio import get_async_client

CREX = os.O_CREAT | os.O_EXCL
T = TypeVar("T")
Run = Callable[[Callable[[], Awaitable[T]]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest, service: Any) -> Iterator[Run[Any]]:
    """Run one coroutine function to completion on a fresh loop of the given kind."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None
    runner = asyncio.Runner(loop_factory=factory)

    def go(fn: Callable[[], Awaitable[T]]) -> T:
        async def main() -> T:
            return await fn()

        return runner.run(main())

    try:
        yield go
    finally:
        runner.close()


def _stat(name: str) -> dict[str, Any]:
    return stat_semaphore(get_client(), name)


# ------------------------------------------------------------- conformance


def test_create_exclusive_open_existing_and_missing(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        first = await aio.open(sem_name, CREX, 0o600, 3)
        assert first.created and await first.getvalue() == 3
        with pytest.raises(ExistentialError):
            await aio.open(sem_name, CREX, 0o600, 0)
        again = await aio.open(sem_name, os.O_CREAT, 0o600, 9)
        assert not again.created and await again.getvalue() == 3
        plain = await aio.open(sem_name)
        await plain.release()
        assert await first.value() == 4
        with pytest.raises(ExistentialError):
            await aio.open(sem_name + "x")

    run(body)


@pytest.mark.parametrize("value", [0, 1, SEM_VALUE_MAX])
def test_initial_value(run: Run[None], sem_name: str, value: int) -> None:
    async def body() -> None:
        assert await (await aio.open(sem_name, CREX, 0o600, value)).getvalue() == value

    run(body)


def test_acquire_try_timed_and_release(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 0)
        assert await sem.try_acquire() is False
        assert await sem.acquire(timeout=0) is False
        assert await sem.acquire(timeout=0.05) is False
        for _ in range(3):
            sem.release()
        await sem.release()
        assert await sem.getvalue() == 4
        assert await sem.acquire() is True
        assert await sem.try_acquire() is True
        assert await sem.acquire(timeout=5) is True
        assert await sem.acquire(timeout=0) is True
        assert await sem.getvalue() == 0
        assert sem.waits == 4
        sem.release()
        assert await sem.acquire(timeout=float("inf")) is True  # no deadline, no overflow

    run(body)


def test_timed_acquire_granted_by_another_task(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 0)

        async def later() -> None:
            await asyncio.sleep(0.1)
            await sem.release()

        poster = asyncio.create_task(later())
        assert await sem.acquire(timeout=20) is True
        await poster
        assert await sem.getvalue() == 0

    run(body)


def test_granted_by_a_blocking_client_in_another_thread(run: Run[None], sem_name: str) -> None:
    blocking = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)

    async def body() -> None:
        sem = await aio.open(sem_name)
        timer = threading.Timer(0.1, blocking.post)
        timer.start()
        try:
            assert await sem.acquire() is True
        finally:
            timer.join()

    run(body)
    assert blocking.getvalue() == 0


def test_release_past_max_overflows(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, SEM_VALUE_MAX)
        with pytest.raises(SemaphoreOverflow):
            await sem.release()
        assert await sem.getvalue() == SEM_VALUE_MAX

    run(body)


_BAD: dict[str, dict[str, Any]] = {
    "no-leading-slash": {"name": "nolead"},
    "value-negative": {"value": -1},
    "value-too-big": {"value": SEM_VALUE_MAX + 1},
    "key-too-short": {"key": b"k" * 15},
    "excl-without-creat": {"oflag": os.O_EXCL},
    "mode-out-of-range": {"mode": 0o10000},
    "robust-not-bool": {"robust": 1},
}


@pytest.mark.parametrize("bad", list(_BAD.values()), ids=list(_BAD))
def test_bad_arguments_raise_before_anything_is_sent(
    run: Run[None], sem_name: str, bad: dict[str, Any]
) -> None:
    async def body() -> None:
        client = get_async_client()
        await client.connect()
        sent = client.requests
        args: dict[str, Any] = {"name": sem_name, "oflag": CREX, "mode": 0o600, "value": 0,
                                **bad}
        with pytest.raises((ValueError, TypeError)):
            await aio.open(**args)
        sem = await aio.open(sem_name + "t", CREX, 0o600, 0)
        sent = client.requests
        for timeout in (-1, float("nan")):
            with pytest.raises(ValueError):
                await sem.acquire(timeout=timeout)
        with pytest.raises(TypeError):
            await sem.acquire(timeout="1")  # type: ignore[arg-type]
        assert client.requests == sent, "a bad argument reached the service"
        await sem.unlink()

    run(body)


def test_closed_handle_raises_existential_error(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 1)
        await sem.close()
        with pytest.raises(ExistentialError):
            await sem.acquire()
        with pytest.raises(ExistentialError):
            sem.release()
        assert await (await aio.open(sem_name)).getvalue() == 1

    run(body)


def test_async_with(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 1)
        async with sem:
            assert await sem.getvalue() == 0
        assert await sem.getvalue() == 1
        with pytest.raises(RuntimeError):
            async with sem:
                raise RuntimeError("inside")
        assert await sem.getvalue() == 1

    run(body)


def test_unlink_semantics(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 2)
        await aio.unlink(sem_name)
        with pytest.raises(ExistentialError):
            await aio.open(sem_name)
        assert await sem.acquire() is True  # open handles keep working
        fresh = await aio.open(sem_name, CREX, 0o600, 0)
        assert await fresh.getvalue() == 0 and await sem.getvalue() == 1
        with pytest.raises(ExistentialError):
            await aio.unlink(sem_name + "x")

    run(body)


def test_key_bound(run: Run[None], sem_name: str) -> None:
    key = os.urandom(32)

    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 1, key=key)
        assert sem.key_bound
        assert await sem.acquire() is True
        with pytest.raises(KeyRejected):
            await aio.open(sem_name)
        with pytest.raises(KeyRejected):
            await aio.open(sem_name, key=os.urandom(32))
        other = await aio.open(sem_name, key=key)
        await other.release()
        assert await sem.getvalue() == 1
        with pytest.raises(KeyRejected):
            await aio.unlink(sem_name)
        await sem.unlink()

    run(body)


def test_lives_only_in_the_service(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        await aio.open(sem_name, CREX, 0o600, 1)

    run(body)
    assert not os.path.exists(f"/dev/shm/sem.{sem_name[1:]}")
    assert _stat(sem_name)["value"] == 1


# ------------------------------------------------------------- cancellation


def test_cancel_withdraws_the_wait_at_the_service(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 0)
        task = asyncio.create_task(sem.acquire())
        await asyncio.sleep(0.05)
        assert len(_stat(sem_name)["queue"]) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _stat(sem_name)["queue"] == []
        await sem.release()
        assert await sem.getvalue() == 1  # nobody took the posted unit

    run(body)


def test_asyncio_timeout_withdraws_the_wait(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await sem.acquire()
        assert _stat(sem_name)["queue"] == []
        assert await sem.getvalue() == 0

    run(body)


def test_unit_granted_at_the_instant_of_cancellation_is_given_back(
    run: Run[None], sem_name: str
) -> None:
    """The grant is on the wire (posted by a blocking call from the loop's own thread, so
    the loop has not read it) when the task is cancelled: the wait ends granted, and the
    unit must be posted back, not kept and not lost."""
    blocking = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)

    async def body() -> None:
        sem = await aio.open(sem_name)
        task = asyncio.create_task(sem.acquire())
        await asyncio.sleep(0.05)
        blocking.post()  # returns once the service granted the queued wait
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sem.waits == 0
        assert sem.statistics()["returned"] == 1  # the grant won the race, and went back
        assert await sem.getvalue() == 1

    run(body)
    assert _stat(sem_name)["queue"] == []


def test_second_cancellation_during_withdrawal_loses_nothing(
    run: Run[None], sem_name: str
) -> None:
    blocking = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)

    async def body() -> None:
        sem = await aio.open(sem_name)
        task = asyncio.create_task(sem.acquire())
        await asyncio.sleep(0.05)
        blocking.post()
        task.cancel()
        await asyncio.sleep(0)  # the task is now withdrawing
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await sem.getvalue() == 1

    run(body)


def test_random_cancellations_conserve_units(run: Run[None], sem_name: str) -> None:
    """Waiters cancelled at random moments while another task posts at random moments:
    at the end value == posts - successful acquires, and nothing is left queued."""
    rng = random.Random(0xE5E)

    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 0)
        posts = acquired = cancelled = 0
        stop = False

        async def poster() -> None:
            nonlocal posts
            while not stop:
                await asyncio.sleep(rng.random() * 0.002)
                sem.release()
                posts += 1

        post_task = asyncio.create_task(poster())
        for _ in range(250):
            waiters = [asyncio.create_task(sem.acquire()) for _ in range(rng.randint(1, 4))]
            await asyncio.sleep(rng.random() * 0.003)
            for w in waiters:
                if rng.random() < 0.7:
                    w.cancel()
            for w in waiters:
                try:
                    if await w:
                        acquired += 1
                except asyncio.CancelledError:
                    cancelled += 1
        stop = True
        await post_task
        await sem.release()  # the last one is awaited: every post is now applied
        posts += 1
        assert cancelled > 0 and acquired > 0
        print(f"posts={posts} acquired={acquired} cancelled={cancelled} "
              f"given back={sem.returned}")
        assert await sem.getvalue() == posts - acquired
        assert _stat(sem_name)["queue"] == []

    run(body)


# ------------------------------------------------------------- many waiters


def test_200_concurrent_waiters_are_served_fifo(run: Run[None], sem_name: str) -> None:
    async def body() -> None:
        sem = await aio.open(sem_name, CREX, 0o600, 0)
        order: list[int] = []

        async def waiter(i: int) -> None:
            await sem.acquire()
            order.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(200)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if _stat(sem_name)["waiters"] == 200:
                break
        assert _stat(sem_name)["waiters"] == 200
        assert get_async_client().requests < 220, "one session, one request per wait"
        for _ in range(200):
            sem.release()
        await asyncio.gather(*tasks)
        assert order == list(range(200))
        assert await sem.getvalue() == 0

    run(body)


# ------------------------------------------------------------- sessions


def test_one_session_per_loop_and_handles_attach_in_another_loop(
    service: Any, sem_name: str
) -> None:
    with asyncio.Runner() as first:
        sem = first.run(aio.open(sem_name, CREX, 0o600, 0))
        c1 = first.run(_client())
        assert first.run(_client()) is c1
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as second:
            c2 = second.run(_client())
            assert c2 is not c1
            second.run(_release(sem))  # attaches through the second loop's session
            assert second.run(sem.getvalue()) == 1
        assert first.run(sem.acquire(timeout=0)) is True  # the first's handle, untouched


async def _client() -> esem.aio.AsyncClient:
    return get_async_client()


async def _release(sem: aio.AsyncSemaphore) -> None:
    await sem.release()


def test_fork_child_uses_its_own_session(service: Any, sem_name: str) -> None:
    with asyncio.Runner() as runner:
        sem = runner.run(aio.open(sem_name, CREX, 0o600, 0))
        parent_client = runner.run(_client())
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 1
            try:
                assert parent_client.failed is not None
                with asyncio.Runner() as child:
                    assert child.run(_client()) is not parent_client
                    child.run(_release(sem))
                    child.run(_release(sem))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's session is untouched by the child.
        assert runner.run(sem.acquire(timeout=5)) is True
        assert runner.run(sem.getvalue()) == 1
        assert parent_client.failed is None


def test_service_gone_is_sticky(fresh_service: Any, sem_name: str) -> None:
    with asyncio.Runner() as runner:
        sem = runner.run(aio.open(sem_name, CREX, 0o600, 0))
        waiter = runner.run(_start_acquire(sem))
        fresh_service.stop()
        with pytest.raises(ServiceUnavailable):
            runner.run(_await(waiter))
        with pytest.raises(ServiceUnavailable):
            runner.run(sem.getvalue())


async def _start_acquire(sem: aio.AsyncSemaphore) -> asyncio.Task[bool]:
    task = asyncio.create_task(sem.acquire())
    await asyncio.sleep(0.05)
    return task


async def _await(task: asyncio.Task[bool]) -> bool:
    return await task


def test_no_service_is_service_unavailable(tmp_path: Any) -> None:
    async def body() -> None:
        client = esem.aio.AsyncClient(tmp_path / "none.sock", b"\x01" * 32)
        with pytest.raises(ServiceUnavailable):
            await aio.open("/x", client=client)
        with pytest.raises(ServiceUnavailable):
            await client.connect()

    asyncio.run(body())


def test_busy_error_is_exported() -> None:
    assert aio.BusyError is BusyError


def test_keepalive_surfaces_a_silent_service(fresh_service: Any, sem_name: str) -> None:
    """A service that stops answering (SIGSTOP) fails a pending wait with
    ServiceUnavailable after two keepalive intervals, never a hang."""
    import signal

    async def body() -> None:
        client = esem.aio.AsyncClient(keepalive=0.3)
        sem = await aio.open(sem_name, CREX, 0o600, 0, client=client)
        task = asyncio.create_task(sem.acquire())
        await asyncio.sleep(0.05)
        assert fresh_service.proc is not None
        os.kill(fresh_service.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ServiceUnavailable, match="stopped answering"):
                await asyncio.wait_for(task, 30)
        finally:
            os.kill(fresh_service.proc.pid, signal.SIGCONT)
        assert client.keepalives == 1
        with pytest.raises(ServiceUnavailable):
            await sem.getvalue()

    asyncio.run(body())


def test_keepalive_ping_is_answered_while_a_wait_is_queued(service: Any, sem_name: str) -> None:
    async def body() -> None:
        client = esem.aio.AsyncClient(keepalive=0.1)
        sem = await aio.open(sem_name, CREX, 0o600, 0, client=client)
        task = asyncio.create_task(sem.acquire())
        await asyncio.sleep(0.5)  # several quiet intervals: PINGs, each answered
        assert client.keepalives >= 2 and client.failed is None
        await sem.release()
        assert await task is True

    asyncio.run(body())


def test_a_closed_loop_and_its_session_are_let_go(service: Any) -> None:
    """asyncio.run() called again and again must not pile up sessions at the service
    (a per-uid quota) nor keep the closed loops alive."""
    import gc
    import weakref

    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    clients: list[esem.aio.AsyncClient] = []
    for _ in range(5):
        with asyncio.Runner() as runner:
            clients.append(runner.run(_connected()))
            loops.append(weakref.ref(runner.get_loop()))
    asyncio.run(_connected())  # any later lookup lets the closed loops' sessions go
    gc.collect()
    assert [ref() for ref in loops] == [None] * 5
    assert all(isinstance(c.failed, ServiceUnavailable) for c in clients)


async def _connected() -> esem.aio.AsyncClient:
    client = get_async_client()
    await client.connect()
    return client


def test_letting_go_never_touches_a_reused_descriptor(service: Any, tmp_path: Any) -> None:
    """A session that failed (its socket closed) in a loop that then closed: when it is
    let go, the descriptor number it once had may belong to another file by now; that
    file must be left alone."""
    with asyncio.Runner() as runner:
        client = runner.run(_connected())
        fd = client._fd
        client.close()
        runner.run(asyncio.sleep(0.01))  # the transport's close runs
    with open(tmp_path / "other", "w+") as other:
        os.dup2(other.fileno(), fd)  # another file now has that number
        try:
            before = os.fstat(fd)
            asyncio.run(_connected())  # lets the closed loop's client go
            after = os.fstat(fd)
            assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        finally:
            os.close(fd)
