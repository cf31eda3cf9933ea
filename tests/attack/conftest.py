"""A real esem service for the adversaries, reachable by other uids."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.attack.base import Target
from esem.client import blocking
from esem.server.embedded import EmbeddedService


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    work = tmp_path_factory.mktemp("attack")
    os.chmod(work, 0o755)
    with EmbeddedService(work / "service") as svc:
        os.chmod(svc.dir, 0o755)
        old = os.environ.get("ESEM_SOCKET")
        os.environ["ESEM_SOCKET"] = str(svc.socket_path)
        blocking._process_client = None
        try:
            yield Target(svc.socket_path, svc.pubkey, Path(work), quick=True)
        finally:
            if old is None:
                os.environ.pop("ESEM_SOCKET", None)
            else:
                os.environ["ESEM_SOCKET"] = old
            blocking._process_client = None
