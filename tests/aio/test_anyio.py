"""esem.anyio on both of anyio's backends, trio and asyncio, against the real daemon:
the handle's semantics, cancellation by cancel scopes (withdrawn at the service; a unit
granted at the same instant given back; conservation under random cancellations), 200
waiters of one session served FIFO, key binding, and a session that is not forked."""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

import esem
import esem.anyio as ea
from esem import (
    SEM_VALUE_MAX,
    USE_ESEM,
    ExistentialError,
    KeyRejected,
    SemaphoreOverflow,
    ServiceUnavailable,
    get_client,
    sem_open,
)
from esem.client.admin import stat_semaphore

CREX = os.O_CREAT | os.O_EXCL


@pytest.fixture(params=["trio", "asyncio"])
def run(request: pytest.FixtureRequest,
        service: Any) -> Callable[[Callable[[], Awaitable[None]]], None]:
    def go(fn: Callable[[], Awaitable[None]]) -> None:
        anyio.run(fn, backend=request.param)

    return go


def _stat(name: str) -> dict[str, Any]:
    return stat_semaphore(get_client(), name)


def test_semantics(run: Any, sem_name: str) -> None:
    async def body() -> None:
        async with ea.connect() as s:
            sem = await s.open(sem_name, CREX, 0o600, 0)
            assert sem.created
            with pytest.raises(ExistentialError):
                await s.open(sem_name, CREX, 0o600, 0)
            assert await sem.try_acquire() is False
            assert await sem.acquire(timeout=0.05) is False
            await sem.release()
            await sem.release()
            assert await sem.getvalue() == 2
            assert await sem.acquire() is True
            assert await sem.acquire(timeout=5) is True
            async with anyio.create_task_group() as tg:
                async def later() -> None:
                    await anyio.sleep(0.1)
                    await sem.release()
                tg.start_soon(later)
                assert await sem.acquire(timeout=20) is True
            await sem.release()
            async with sem:
                assert await sem.getvalue() == 0
            assert await sem.getvalue() == 1
            with pytest.raises(ValueError):
                await s.open("noslash")
            with pytest.raises(ValueError):
                await sem.acquire(timeout=-1)
            await sem.unlink()
            with pytest.raises(ExistentialError):
                await s.open(sem_name)
            await sem.close()
            with pytest.raises(ExistentialError):
                await sem.acquire()

    run(body)


def test_overflow_and_key(run: Any, sem_names: Callable[[], str]) -> None:
    a, b = sem_names(), sem_names()
    key = os.urandom(32)

    async def body() -> None:
        async with ea.connect() as s:
            full = await s.open(a, CREX, 0o600, SEM_VALUE_MAX)
            with pytest.raises(SemaphoreOverflow):
                await full.release()
            keyed = await s.open(b, CREX, 0o600, 1, key=key)
            with pytest.raises(KeyRejected):
                await s.open(b)
            again = await s.open(b, key=key)
            assert await again.acquire() is True
            await again.release()
            assert await keyed.getvalue() == 1

    run(body)


def test_cancel_scope_withdraws_the_wait(run: Any, sem_name: str) -> None:
    async def body() -> None:
        async with ea.connect() as s:
            sem = await s.open(sem_name, CREX, 0o600, 0)
            with anyio.move_on_after(0.1) as scope:
                await sem.acquire()
            assert scope.cancelled_caught
            assert _stat(sem_name)["waiters"] == 0
            await sem.release()
            assert await sem.getvalue() == 1

    run(body)


def test_unit_granted_at_the_instant_of_cancellation_is_given_back(
    run: Any, sem_name: str
) -> None:
    blocking = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)

    async def body() -> None:
        async with ea.connect() as s:
            sem = await s.open(sem_name)
            async with anyio.create_task_group() as tg:
                tg.start_soon(sem.acquire)
                for _ in range(200):
                    if _stat(sem_name)["waiters"]:
                        break
                    await anyio.sleep(0.01)
                blocking.post()  # granted on the wire; this thread has not read it
                tg.cancel_scope.cancel()
            assert sem.waits == 0 and sem.returned == 1
            assert await sem.getvalue() == 1

    run(body)


def test_random_cancellations_conserve_units(run: Any, sem_name: str) -> None:
    rng = random.Random(0xA1)

    async def body() -> None:
        async with ea.connect() as s:
            sem = await s.open(sem_name, CREX, 0o600, 0)
            posts = acquired = 0
            done = anyio.Event()

            async def poster() -> None:
                nonlocal posts
                while not done.is_set():
                    await anyio.sleep(rng.random() * 0.002)
                    await sem.release()
                    posts += 1

            async def waiter() -> None:
                nonlocal acquired
                with anyio.move_on_after(rng.random() * 0.004):
                    if await sem.acquire():
                        acquired += 1

            async with anyio.create_task_group() as outer:
                outer.start_soon(poster)
                for _ in range(150):
                    async with anyio.create_task_group() as tg:
                        for _ in range(rng.randint(1, 4)):
                            tg.start_soon(waiter)
                done.set()
            assert acquired > 0
            assert await sem.getvalue() == posts - acquired
            assert _stat(sem_name)["waiters"] == 0

    run(body)


def test_200_waiters_fifo(run: Any, sem_name: str) -> None:
    async def body() -> None:
        async with ea.connect() as s:
            sem = await s.open(sem_name, CREX, 0o600, 0)
            order: list[int] = []

            async def waiter(i: int) -> None:
                await sem.acquire()
                order.append(i)

            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(waiter, i)
                    while _stat(sem_name)["waiters"] < i + 1:  # queued in this order
                        await anyio.sleep(0.001)
                for _ in range(200):
                    await sem.release()
            assert order == list(range(200))

    run(body)


def test_session_is_not_used_across_fork(run: Any, sem_name: str) -> None:
    async def body() -> None:
        async with ea.connect() as s:
            sem = await s.open(sem_name, CREX, 0o600, 0)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - reports through the exit status
                code = 1
                try:
                    try:
                        await sem.release()
                    except RuntimeError:
                        code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert await sem.getvalue() == 0  # the child sent nothing

    run(body)


def test_service_gone(fresh_service: Any, sem_name: str) -> None:
    async def body() -> None:
        async with ea.connect() as s:
            sem = await s.open(sem_name, CREX, 0o600, 0)
            fresh_service.stop()
            with pytest.raises(ServiceUnavailable):
                await sem.acquire()
            with pytest.raises(ServiceUnavailable):
                await sem.getvalue()

    anyio.run(body, backend="trio")


def test_no_service(tmp_path: Any) -> None:
    async def body() -> None:
        with pytest.raises(ServiceUnavailable):
            async with ea.connect(tmp_path / "none.sock", b"\x01" * 32):
                pass

    anyio.run(body, backend="trio")
    assert esem.anyio.Session is ea.Session
