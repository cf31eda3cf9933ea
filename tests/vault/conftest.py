"""Fixtures for the vault tests: real vault servers (TLS on 127.0.0.1, real semaphores).

``service`` (from tests/conftest.py) is a real esem daemon for the module, with this
process pointed at it; ``make_vault(sync)`` starts an in-process ``VaultServer`` on a
fresh directory with two users, and stops it (unlinking its semaphores) afterwards.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from esem.server.embedded import EmbeddedService
from esem.vault.client import VaultClient
from esem.vault.server import VaultServer
from esem.vault.sync import Sync
from esem.vault.users import add_user

ALICE, ALICE_PW = "alice", "alice-password"
BOB, BOB_PW = "bob", "bob-password"


@dataclass
class Vault:
    server: VaultServer
    dir: Path

    def client(self, user: str = ALICE, password: str = ALICE_PW) -> VaultClient:
        return VaultClient.for_directory(self.dir, user, password)


def new_vault_dir(base: Path) -> Path:
    """A fresh vault directory under ``base`` with users alice and bob."""
    d = Path(tempfile.mkdtemp(prefix="vault-", dir=base))  # mode 0700
    add_user(d, ALICE, ALICE_PW)
    add_user(d, BOB, BOB_PW)
    return d


@pytest.fixture
def make_vault(tmp_path: Path, service: EmbeddedService) -> Iterator[Callable[..., Vault]]:
    started: list[VaultServer] = []

    def make(sync: Sync = "esem", directory: Path | None = None) -> Vault:
        d = directory if directory is not None else new_vault_dir(tmp_path)
        server = VaultServer(d, port=0, sync=sync).start()
        started.append(server)
        return Vault(server, d)

    yield make
    for server in started:
        server.stop()


@pytest.fixture(params=["legacy", "esem"])
def vault(request: pytest.FixtureRequest, make_vault: Callable[..., Vault]) -> Vault:
    """A running vault, once per backend."""
    return make_vault(request.param)
