"""OPEN replies carry the semaphore's identity (``sem_id``, PROTOCOL.md 6.2), and the
preload library's per-process name cache uses it: a C program that has a name open
while another process unlinks it and creates it again gets a new ``sem_t`` for the new
semaphore on its next ``sem_open`` (as glibc maps the new file), its old one keeps the
old semaphore, and repeated opens of one semaphore still return the same pointer.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from esem import O_CREAT, O_EXCL, USE_ESEM, sem_open, sem_unlink
from esem.server.embedded import EmbeddedService
from tests.native.conftest import compile_c


@pytest.fixture(scope="module")
def reopen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "reopen")


def test_recreated_name_is_a_new_sem_t(preload: Path, reopen: Path,
                                       service: EmbeddedService, sem_name: str) -> None:
    env = {**os.environ, "LD_PRELOAD": str(preload)}
    proc = subprocess.Popen([str(reopen), sem_name], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().split() == ["ready", "1"]
        # Another process (this one) replaces the semaphore behind the name.
        sem_unlink(sem_name, flags=USE_ESEM)
        sem_open(sem_name, O_CREAT | O_EXCL, 0o600, 5, flags=USE_ESEM).close()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert out.split() == ["same", "0", "value_old", "1", "value_new", "5",
                           "repeat_same", "1"], out + err
    sem_unlink(sem_name, flags=USE_ESEM)
