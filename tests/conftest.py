"""Shared fixtures: a real esem daemon, unique semaphore names, and both backends.

``service`` starts one real ``python -m esem serve`` per test module and points this
process at it through ``ESEM_SOCKET`` (forked children inherit it). Tests that kill the
service take ``fresh_service`` instead: a daemon of their own, with the process pointed
back at the shared one afterwards. Every switch drops the per-process client, so a
session with one service is never reused against another.

Semaphore names come from ``sem_names`` (uuid-based), so legacy names in ``/dev/shm``
never collide between tests or runs, and are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import posix_ipc
import pytest

import esem.client.blocking as blocking
from esem.api import USE_ESEM, EsemSemaphore, sem_open, sem_unlink
from esem.errors import EsemError
from esem.legacy import LegacySemaphore
from esem.server.embedded import EmbeddedService

NAME_PREFIX = "/esem-test-"


def _point_at(socket: str | None) -> None:
    """Aim this process's esem client at ``socket`` (None: the default location) and
    forget the per-process client, which belongs to whatever service it connected to."""
    if socket is None:
        os.environ.pop("ESEM_SOCKET", None)
    else:
        os.environ["ESEM_SOCKET"] = socket
    stale = blocking._process_client
    blocking._process_client = None
    if stale is not None and stale.pid == os.getpid():
        stale.close()


def _start_service() -> EmbeddedService:
    svc = EmbeddedService()
    # Other uids (the tests' `nobody` children) must reach the socket and the published
    # public key; the private key stays 0600 inside.
    os.chmod(svc.dir, 0o755)
    return svc.start()


@contextlib.contextmanager
def _serving() -> Iterator[EmbeddedService]:
    previous = os.environ.get("ESEM_SOCKET")
    pinned = os.environ.pop("ESEM_PUBKEY", None)  # would pin another service's key
    svc = _start_service()
    try:
        _point_at(str(svc.socket_path))
        yield svc
    finally:
        _point_at(previous)
        if pinned is not None:
            os.environ["ESEM_PUBKEY"] = pinned
        svc.cleanup()


@pytest.fixture(scope="module")
def service() -> Iterator[EmbeddedService]:
    """One real esem daemon shared by a test module; this process is pointed at it while
    the module runs (and at nothing afterwards, so other modules see no ESEM_SOCKET)."""
    with _serving() as svc:
        yield svc


@pytest.fixture
def fresh_service() -> Iterator[EmbeddedService]:
    """A real esem daemon of this test alone (for tests that kill it)."""
    with _serving() as svc:
        yield svc


@pytest.fixture
def sem_names() -> Iterator[Callable[[], str]]:
    """A factory of unique semaphore names; both backends' names are removed afterwards."""
    made: list[str] = []

    def new() -> str:
        name = f"{NAME_PREFIX}{uuid.uuid4().hex[:20]}"
        made.append(name)
        return name

    yield new
    for name in made:
        with contextlib.suppress(posix_ipc.ExistentialError, OSError):
            posix_ipc.unlink_semaphore(name)
        if os.environ.get("ESEM_SOCKET"):
            # Best effort: a key-bound name, or a killed service, refuses; uuids never
            # collide, so a leftover harms nothing.
            with contextlib.suppress(EsemError):
                sem_unlink(name, flags=USE_ESEM)


@pytest.fixture
def sem_name(sem_names: Callable[[], str]) -> str:
    return sem_names()


@dataclass(frozen=True)
class Backend:
    """``sem_open``/``sem_unlink`` bound to one backend's flags."""

    name: str
    flags: int

    @property
    def handle_type(self) -> type[EsemSemaphore] | type[LegacySemaphore]:
        return EsemSemaphore if self.flags & USE_ESEM else LegacySemaphore

    def open(self, name: str, oflag: int = 0, mode: int = 0o600,
             value: int = 0) -> EsemSemaphore | LegacySemaphore:
        return sem_open(name, oflag, mode, value, flags=self.flags)

    def unlink(self, name: str) -> None:
        sem_unlink(name, flags=self.flags)


@pytest.fixture(params=["legacy", "esem"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The same test against real POSIX semaphores and against the esem service."""
    if request.param == "esem":
        request.getfixturevalue("service")
        return Backend("esem", USE_ESEM)
    return Backend("legacy", 0)
