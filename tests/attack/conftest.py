"""A real esem service for the adversaries, reachable by other uids."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.attack.base import Target
from esem.client import blocking
from esem.server.embedded import EmbeddedService


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    # Not under pytest's tmp_path: its base directory is 0700, and the adversaries that
    # drop to other uids must be able to reach the socket.
    with tempfile.TemporaryDirectory(prefix="esem-attack-") as tmp:
        yield from _target(Path(tmp))


def _target(work: Path) -> Iterator[Target]:
    os.chmod(work, 0o755)
    # A victim whose client failed (IntegrityError) cannot END its session: the service
    # sees only its connection close and holds the session detached for the grace
    # period. A short one keeps the attacks' "session forgotten" checks within SETTLE.
    with EmbeddedService(work / "service", extra_args=["--resume-grace", "1"]) as svc:
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
