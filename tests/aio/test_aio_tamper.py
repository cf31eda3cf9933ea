"""The asyncio client under the A2 channel adversary (the attack suite's real proxy
between the client and the service): a tampered, replayed, dropped or forged reply to a
wait ends in an error, never in a grant the service did not give, and the session's
failure is sticky. The truth is read from the service by a direct client (STAT)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import esem
import esem.aio as aio
from esem import IntegrityError, ServiceUnavailable
from esem.attack.a2_mitm import S2C, Chunk, Link, MitmProxy, frame
from esem.client.admin import stat_semaphore

CREX = os.O_CREAT | os.O_EXCL


@pytest.fixture
def proxy(service: Any, tmp_path: Path) -> Iterator[MitmProxy]:
    with MitmProxy(Path(service.socket_path), tmp_path / "mitm.sock") as p:
        yield p


def _victim(proxy: MitmProxy, service: Any) -> aio.AsyncClient:
    return aio.AsyncClient(proxy.path, service.pubkey, keepalive=0.3)


def _granted(name: str, key: bytes | None = None) -> int:
    waits: int = stat_semaphore(esem.get_client(), name, key=key)["waits"]
    return waits


async def _queued(name: str, key: bytes | None = None) -> None:
    # a key-bound semaphore shows its counts only to a STAT with its key
    for _ in range(200):
        if stat_semaphore(esem.get_client(), name, key=key)["waiters"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the wait never queued")


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["esem", "esem+key"])
def test_flipped_grant_is_an_integrity_error(
    proxy: MitmProxy, service: Any, sem_name: str, key: bytes | None
) -> None:
    poster = esem.sem_open(sem_name, CREX, 0o600, 0, flags=esem.USE_ESEM, key=key)

    async def body() -> None:
        client = _victim(proxy, service)
        sem = await aio.open(sem_name, key=key, client=client)
        task = asyncio.create_task(sem.acquire())
        await _queued(sem_name, key)

        def flip(_l: Link, _i: int, b: bytes) -> list[Chunk]:
            return [frame(bytes([b[0] ^ 0x01]) + b[1:])]

        proxy.link(0).arm(S2C, flip)
        poster.post()  # the service grants; the victim gets a flipped grant
        with pytest.raises(IntegrityError):
            await asyncio.wait_for(task, 10)
        assert sem.waits == 0
        with pytest.raises(IntegrityError):  # sticky
            await sem.getvalue()

    asyncio.run(body())
    assert _granted(sem_name, key) == 1  # the service gave it; the victim never claimed it


def test_replayed_grant_is_not_a_second_grant(
    proxy: MitmProxy, service: Any, sem_name: str
) -> None:
    poster = esem.sem_open(sem_name, CREX, 0o600, 0, flags=esem.USE_ESEM)

    async def body() -> None:
        client = _victim(proxy, service)
        sem = await aio.open(sem_name, client=client)
        link = proxy.link(0)
        first = asyncio.create_task(sem.acquire())
        await _queued(sem_name)
        before = link.count(S2C)
        poster.post()
        assert await asyncio.wait_for(first, 10) is True
        grant = link.frames[S2C][before]
        second = asyncio.create_task(sem.acquire())
        await _queued(sem_name)
        link.inject(S2C, frame(grant))  # the earlier grant, as the answer to this wait
        with pytest.raises(IntegrityError):
            await asyncio.wait_for(second, 10)
        assert sem.waits == 1

    asyncio.run(body())
    assert _granted(sem_name) == 1


def test_dropped_grant_surfaces_through_the_keepalive(
    proxy: MitmProxy, service: Any, sem_name: str
) -> None:
    poster = esem.sem_open(sem_name, CREX, 0o600, 0, flags=esem.USE_ESEM)

    async def body() -> None:
        client = _victim(proxy, service)
        sem = await aio.open(sem_name, client=client)
        task = asyncio.create_task(sem.acquire())
        await _queued(sem_name)
        proxy.link(0).arm(S2C, lambda _l, _i, _b: [])  # the grant never arrives
        poster.post()
        with pytest.raises((IntegrityError, ServiceUnavailable)):
            await asyncio.wait_for(task, 10)  # an error, never a hang or a success
        assert sem.waits == 0

    asyncio.run(body())


def test_forged_plaintext_grant_is_refused(
    proxy: MitmProxy, service: Any, sem_name: str
) -> None:
    esem.sem_open(sem_name, CREX, 0o600, 0, flags=esem.USE_ESEM)

    async def body() -> None:
        client = _victim(proxy, service)
        sem = await aio.open(sem_name, client=client)
        task = asyncio.create_task(sem.acquire())
        await _queued(sem_name)
        # A WAIT-OK reply in plaintext with the right request id: no valid AEAD tag.
        forged = bytes([1, 4, 0]) + (2).to_bytes(8, "big") + b"\x00\x00" + b"\x00" * 16
        proxy.link(0).inject(S2C, frame(forged))
        with pytest.raises(IntegrityError):
            await asyncio.wait_for(task, 10)
        assert sem.waits == 0

    asyncio.run(body())
    assert _granted(sem_name) == 0


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_anyio_flipped_grant_is_an_integrity_error(
    proxy: MitmProxy, service: Any, sem_name: str, backend: str
) -> None:
    import anyio

    import esem.anyio

    poster = esem.sem_open(sem_name, CREX, 0o600, 0, flags=esem.USE_ESEM)
    outcome: list[BaseException] = []

    async def body() -> None:
        async with esem.anyio.connect(proxy.path, service.pubkey, keepalive=0.3) as s:
            sem = await s.open(sem_name)

            async def wait() -> None:
                try:
                    await sem.acquire()
                except IntegrityError as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                for _ in range(200):
                    if stat_semaphore(esem.get_client(), sem_name)["waiters"]:
                        break
                    await anyio.sleep(0.01)

                def flip(_l: Link, _i: int, b: bytes) -> list[Chunk]:
                    return [frame(bytes([b[0] ^ 0x01]) + b[1:])]

                proxy.link(0).arm(S2C, flip)
                poster.post()
            assert sem.waits == 0
            with pytest.raises(IntegrityError):  # sticky
                await sem.getvalue()

    anyio.run(body, backend=backend)
    assert len(outcome) == 1
    assert _granted(sem_name) == 1
