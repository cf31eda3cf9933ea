"""tests/sync runs under both clients of the Python API: each module once on the
pure-Python client (``ESEM_CLIENT=python``) and once on the native one
(``ESEM_CLIENT=native``, ``esem._native_core``; skipped when it is not built). The
module's daemon is the root conftest's ``service``; children (fork, spawn, forkserver)
inherit the choice through the environment."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from conftest import _serving  # tests/conftest.py (tests/ is not a package)

import esem.client.blocking as blocking
import esem.client.native as native_client
from esem.server.embedded import EmbeddedService

CLIENTS = [
    "python",
    pytest.param("native", marks=pytest.mark.skipif(
        not native_client.available(), reason="esem._native_core is not built")),
]


@pytest.fixture(scope="module", params=CLIENTS)
def service(request: pytest.FixtureRequest) -> Iterator[EmbeddedService]:
    """One real daemon per module and client; this process's sessions on that client."""
    saved = os.environ.get(native_client.ENV)
    os.environ[native_client.ENV] = request.param
    try:
        with _serving() as svc:
            yield svc
            used = blocking._process_client
            if used is not None and used.pid == os.getpid() and used.connected:
                assert used.transport == request.param, "the session was on the other client"
    finally:
        if saved is None:
            os.environ.pop(native_client.ENV, None)
        else:
            os.environ[native_client.ENV] = saved
