"""Key-bound e-semaphores from C: ``esem_sem_open_keyed`` / ``esem_sem_unlink_keyed``
(native/include/esem.h) in a C program compiled here, under the preload library,
against the live service. A wrong key is ``EKEYREJECTED`` (errno 129), the right key
works with every ``sem_*`` call (each request MAC'd, each reply's MAC checked), and
the same semaphore is refused to a client (C or Python) that does not prove the key.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from esem import O_CREAT, O_EXCL, USE_ESEM, sem_open, sem_unlink
from esem.client.admin import stat_semaphore
from esem.client.blocking import get_client
from esem.errors import KeyRejected
from esem.server.embedded import EmbeddedService
from tests.native.conftest import compile_c


@pytest.fixture(scope="module")
def keytest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "keytest")


def run(preload: Path | None, *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=60)


def test_keyed_semaphore_from_c(preload: Path, keytest: Path, service: EmbeddedService,
                                sem_name: str) -> None:
    key = secrets.token_bytes(32)
    r = run(preload, str(keytest), "keyed", sem_name, key.hex())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "keyed ok" in r.stdout
    # The C program's semaphore is key-bound in the service: without the key a Python
    # client is refused, with it the counts are the C program's.
    with pytest.raises(KeyRejected):
        sem_open(sem_name, 0, flags=USE_ESEM)
    with pytest.raises(KeyRejected):
        sem_open(sem_name, 0, flags=USE_ESEM, key=secrets.token_bytes(32))
    info = stat_semaphore(get_client(), sem_name, key=key)
    assert info["key_bound"] is True
    assert info["value"] == 1
    # trywait, wait: 2 grants; post (parent), post (fork child): 2 posts
    assert (info["waits"], info["posts"]) == (2, 2)
    s = sem_open(sem_name, 0, flags=USE_ESEM, key=key)
    assert s.getvalue() == 1
    s.close()
    r = run(preload, str(keytest), "unlink", sem_name, key.hex())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unlink ok" in r.stdout


def test_wrong_or_missing_key_from_c(preload: Path, keytest: Path, service: EmbeddedService,
                                     sem_names: object) -> None:
    assert callable(sem_names)
    bound, plain = sem_names(), sem_names()
    key = secrets.token_bytes(16)
    sem_open(bound, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM, key=key).close()
    sem_open(plain, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM).close()
    try:
        wrong = bytes([key[0] ^ 1]) + key[1:]
        for name, k in ((bound, wrong), (plain, key)):  # wrong key; not key-bound
            r = run(preload, str(keytest), "open", name, k.hex(), str(errno.EKEYREJECTED))
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"errno {errno.EKEYREJECTED}" in r.stdout
        r = run(preload, str(keytest), "open", bound, key.hex())  # right key: posts once
        assert r.returncode == 0, r.stdout + r.stderr
        assert stat_semaphore(get_client(), bound, key=key)["posts"] == 1
    finally:
        sem_unlink(bound, flags=USE_ESEM, key=key)
        sem_unlink(plain, flags=USE_ESEM)


def test_keyed_functions_absent_without_the_library(keytest: Path) -> None:
    """esem.h declares them weak: a program runs without the library and sees NULL."""
    r = run(None, str(keytest), "absent")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "absent ok" in r.stdout
