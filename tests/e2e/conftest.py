"""The end-to-end suite runs in four modes: socket, pyo3, switchless, python-switchless.

Each esem test runs against a plain daemon, its session over the socket, on the
pure-Python client (``socket``, ``ESEM_CLIENT=python``) and on the native client
(``pyo3``, ``ESEM_CLIENT=native``: the Python API on ``esem._native_core``); and against a
daemon started with ``--switchless`` with ``ESEM_SWITCHLESS=1`` in the environment (so this
process and every child it forks upgrade their sessions to the shared-memory rings), on
the native client (``switchless``, its rings in ``esem_client::ring``) and on the Python
one (``python-switchless``, the reference). After a switchless test the process's client
is checked to have really been switchless (the environment alone would fall back to the
socket, with only a warning, if the upgrade were refused), and after every test to have
been on the client of its mode. The modes on the native client are skipped when it is
not built.

The daemons are shared by a test module, one per mode; each test points this process at
the one of its mode (``ESEM_SOCKET``, ``ESEM_SWITCHLESS``) and drops the per-process
client before and after, so a session is never reused across modes or services. Legacy
tests (no service) run once.

A module marked ``native_backend`` runs its ``backend`` tests once more, as
``esem-native``: the native client (the preload library's C API, called through ctypes,
``native_backend.py``) against the module's plain daemon. That client connects on its
first call, reading ``ESEM_SOCKET`` then (the library is loaded only then too), and is the
library's for the rest of the process: it is not dropped between tests, but it only ever
served this one daemon; when the daemon is gone its session fails and a later call
connects afresh. Its fork handler gives each later fork child a session of its own,
connected at fork.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import Backend  # tests/conftest.py (tests/ is not a package)

import esem.client.blocking as blocking
import esem.client.native as native_client
from esem.api import USE_ESEM
from esem.server.embedded import EmbeddedService

from . import native_backend

# "pyo3" and "switchless": this process's sessions on the native client under the Python
# API (ESEM_CLIENT=native, esem._native_core), on the socket and on the rings; "socket"
# and "python-switchless" pin the pure-Python client (ESEM_CLIENT=python), whatever the
# default is.
MODES = ("socket", "pyo3", "switchless", "python-switchless")
NATIVE_MODES = frozenset({"pyo3", "switchless"})
SWITCHLESS_MODES = frozenset({"switchless", "python-switchless"})
_NOT_BUILT = "esem._native_core is not built (no cargo at install): no native-client mode"


def _mode_params(names: tuple[str, ...]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.skip(reason=_NOT_BUILT))
            if n.removeprefix("esem-") in NATIVE_MODES and not native_client.available()
            else n for n in names]


def _drop_process_client() -> blocking.Client | None:
    stale = blocking._process_client
    blocking._process_client = None
    return stale if stale is not None and stale.pid == os.getpid() else None


def _start(mode: str) -> EmbeddedService:
    svc = EmbeddedService(switchless=mode in SWITCHLESS_MODES)
    # Other uids (the tests' `nobody` children) must reach the socket and the published
    # public key; the private key stays 0600 inside.
    os.chmod(svc.dir, 0o755)
    return svc.start()


@contextlib.contextmanager
def _pointed_at(svc: EmbeddedService, mode: str) -> Iterator[EmbeddedService]:
    """This process (and children forked meanwhile) use ``svc`` in ``mode``."""
    saved = {k: os.environ.get(k)
             for k in ("ESEM_SOCKET", "ESEM_PUBKEY", "ESEM_SWITCHLESS", native_client.ENV)}
    os.environ.pop("ESEM_PUBKEY", None)  # would pin another service's key
    os.environ["ESEM_SOCKET"] = str(svc.socket_path)
    os.environ[native_client.ENV] = "native" if mode in NATIVE_MODES else "python"
    if mode in SWITCHLESS_MODES:
        os.environ["ESEM_SWITCHLESS"] = "1"
    else:
        os.environ.pop("ESEM_SWITCHLESS", None)
    stale = _drop_process_client()
    if stale is not None:
        stale.close()
    try:
        yield svc
        used = _drop_process_client()
        if used is not None:
            try:
                # A resumed session carries on over the socket on the Python client
                # (PROTOCOL.md 16.5); the native one upgrades again.
                if (mode in SWITCHLESS_MODES and used.failed is None
                        and (used._native is not None
                             or (used._session is not None and not used.stats.resumes))):
                    assert used.mode == "switchless", "the session fell back to the socket"
                if used.connected:
                    want = "native" if mode in NATIVE_MODES else "python"
                    assert used.transport == want, f"the session was not on the {want} client"
            finally:
                used.close()
    finally:
        blocking._process_switchless = None  # an esem.connect() choice ends with the test
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def socket_daemon() -> Iterator[EmbeddedService]:
    svc = _start("socket")
    try:
        yield svc
    finally:
        svc.cleanup()


@pytest.fixture(scope="module")
def switchless_daemon() -> Iterator[EmbeddedService]:
    svc = _start("switchless")
    try:
        yield svc
    finally:
        svc.cleanup()


@pytest.fixture
def socket_service(socket_daemon: EmbeddedService) -> Iterator[EmbeddedService]:
    """The module's plain daemon, this process's sessions on the socket."""
    with _pointed_at(socket_daemon, "socket"):
        yield socket_daemon


@pytest.fixture
def switchless_service(switchless_daemon: EmbeddedService) -> Iterator[EmbeddedService]:
    """The module's --switchless daemon, this process's sessions on the native client's
    rings."""
    with _pointed_at(switchless_daemon, "switchless"):
        yield switchless_daemon


@pytest.fixture
def python_switchless_service(switchless_daemon: EmbeddedService) -> Iterator[EmbeddedService]:
    """The module's --switchless daemon, this process's sessions on the Python client's
    rings (the reference implementation)."""
    with _pointed_at(switchless_daemon, "python-switchless"):
        yield switchless_daemon


@pytest.fixture
def pyo3_service(socket_daemon: EmbeddedService) -> Iterator[EmbeddedService]:
    """The module's plain daemon, this process's sessions on the native client."""
    with _pointed_at(socket_daemon, "pyo3"):
        yield socket_daemon


@pytest.fixture(params=_mode_params(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    """The transport of this test's esem sessions."""
    return str(request.param)


@pytest.fixture
def service(request: pytest.FixtureRequest, mode: str) -> EmbeddedService:
    """The module's daemon of this test's mode, this process pointed at it."""
    svc: EmbeddedService = request.getfixturevalue(f"{mode.replace('-', '_')}_service")
    return svc


@pytest.fixture
def fresh_service(mode: str) -> Iterator[EmbeddedService]:
    """A daemon of this test alone, in this test's mode (for tests that kill it)."""
    svc = _start(mode)
    try:
        with _pointed_at(svc, mode):
            yield svc
    finally:
        svc.cleanup()


BACKENDS = ("legacy", "esem-socket", "esem-switchless", "esem-python-switchless", "esem-pyo3")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "native_backend: the module's `backend` tests also run as esem-native, "
        "the native client through the preload library's C API (tests/e2e/native_backend.py)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        native = metafunc.definition.get_closest_marker("native_backend") is not None
        names = (*BACKENDS, "esem-native") if native else BACKENDS
        metafunc.parametrize("backend", _mode_params(names), indirect=True)


@dataclass(frozen=True)
class NativeBackend:
    """``Backend``'s interface over the native client's C API; its handles are
    ``NativeSemaphore``s, which behave as ``esem.EsemSemaphore``."""

    name: str = "esem"
    flags: int = USE_ESEM
    native: bool = True

    @property
    def handle_type(self) -> type[native_backend.NativeSemaphore]:
        return native_backend.NativeSemaphore

    def open(self, name: str, oflag: int = 0, mode: int = 0o600,
             value: int = 0, key: bytes | None = None) -> native_backend.NativeSemaphore:
        return native_backend.open_semaphore(name, oflag, mode, value, key)

    def unlink(self, name: str) -> None:
        native_backend.unlink(name)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Backend | NativeBackend]:
    """The same test against real POSIX semaphores and against the esem service, over
    the socket and over the rings; in modules marked ``native_backend`` also through the
    native client (on the socket: the C API has no switchless choice of its own)."""
    if request.param == "legacy":
        yield Backend("legacy", 0)
        return
    if request.param == "esem-native":
        request.getfixturevalue("socket_service")
        yield NativeBackend()
        return
    request.getfixturevalue(f"{request.param.removeprefix('esem-').replace('-', '_')}_service")
    yield Backend("esem", USE_ESEM)
