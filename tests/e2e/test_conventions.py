"""Python conventions of the public API: errors that say what the user meant, and the
client's warnings through ``logging``.

Against a real daemon; the "no service" cases point the process at a socket path where
none answers (never starting one).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import esem
import esem.client.blocking as blocking
from esem.server.embedded import EmbeddedService

CREX = esem.O_CREAT | esem.O_EXCL


@pytest.fixture
def nowhere() -> Iterator[Path]:
    """This process pointed at ``path``, a socket path under a fresh directory."""
    saved = os.environ.get("ESEM_SOCKET")
    blocking._process_client = None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "esem.sock"
        os.environ["ESEM_SOCKET"] = str(path)
        try:
            yield path
        finally:
            if saved is None:
                os.environ.pop("ESEM_SOCKET", None)
            else:
                os.environ["ESEM_SOCKET"] = saved
            blocking._process_client = None


def test_legacy_unlink_of_an_e_semaphore_says_so(socket_service: EmbeddedService,
                                                 sem_name: str) -> None:
    esem.sem_open(sem_name, CREX, 0o600, 1, flags=esem.USE_ESEM)
    with pytest.raises(esem.ExistentialError, match="exists as an e-semaphore: pass "
                       "flags=USE_ESEM") as info:
        esem.sem_unlink(sem_name)
    assert info.value.errno is not None  # ENOENT, as the plain refusal
    esem.sem_unlink(sem_name, flags=esem.USE_ESEM)  # the hint was right
    with pytest.raises(esem.ExistentialError) as info:
        esem.sem_unlink(sem_name)  # now in neither: no hint
    assert "e-semaphore" not in str(info.value)


def test_legacy_open_of_an_e_semaphore_says_so(socket_service: EmbeddedService,
                                               sem_name: str) -> None:
    esem.sem_open(sem_name, CREX, 0o600, 1, flags=esem.USE_ESEM)
    with pytest.raises(esem.ExistentialError, match="exists as an e-semaphore: pass "
                       "flags=USE_ESEM"):
        esem.sem_open(sem_name)
    # O_CREAT makes a legacy semaphore of the same name: no error, so no hint
    esem.sem_open(sem_name, esem.O_CREAT, 0o600, 0).unlink()


def test_esem_open_and_unlink_of_a_posix_semaphore_say_so(socket_service: EmbeddedService,
                                                          sem_name: str) -> None:
    esem.sem_open(sem_name, CREX, 0o600, 1)  # a real POSIX semaphore in /dev/shm
    with pytest.raises(esem.ExistentialError, match="exists as a POSIX semaphore: drop "
                       "flags=USE_ESEM") as info:
        esem.sem_open(sem_name, flags=esem.USE_ESEM)
    assert info.value.status is not None and info.value.status.name == "ENOENT"
    with pytest.raises(esem.ExistentialError, match="POSIX semaphore"):
        esem.sem_unlink(sem_name, flags=esem.USE_ESEM)
    esem.sem_unlink(sem_name)
    with pytest.raises(esem.ExistentialError) as info:
        esem.sem_open(sem_name, flags=esem.USE_ESEM)  # in neither now
    assert "POSIX" not in str(info.value)


def test_legacy_unlink_hint_for_a_key_bound_e_semaphore(socket_service: EmbeddedService,
                                                        sem_name: str) -> None:
    key = os.urandom(16)
    sem = esem.sem_open(sem_name, CREX, 0o600, 1, flags=esem.USE_ESEM, key=key)
    with pytest.raises(esem.ExistentialError, match="e-semaphore"):
        esem.sem_unlink(sem_name)
    sem.unlink()


def test_legacy_unlink_of_a_legacy_name_unchanged(socket_service: EmbeddedService,
                                                  sem_name: str) -> None:
    esem.sem_open(sem_name, CREX, 0o600, 1)
    esem.sem_unlink(sem_name)  # a POSIX semaphore: removed, no detour via the service
    with pytest.raises(esem.ExistentialError):
        esem.sem_open(sem_name)


def test_no_hint_and_no_service_started_when_none_runs(nowhere: Path, sem_name: str) -> None:
    with pytest.raises(esem.ExistentialError) as info:
        esem.sem_unlink(sem_name)
    assert "e-semaphore" not in str(info.value)
    assert not nowhere.exists()  # nothing was started


def test_no_hang_when_the_socket_never_answers(nowhere: Path, sem_name: str) -> None:
    """A socket that accepts (in the kernel's backlog) but never speaks: the hint is given
    up after its short timeout and the plain error is raised."""
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(nowhere))
        mute.listen(8)
        Path(str(nowhere) + ".pub").write_text("00" * 32)
        with pytest.raises(esem.ExistentialError) as info:
            esem.sem_unlink(sem_name)
    assert "e-semaphore" not in str(info.value)


@pytest.mark.parametrize("bad", [42, None, 1.5, ["/x"]])
def test_unlink_wrong_name_type_is_type_error(bad: object) -> None:
    for flags in (0, esem.USE_ESEM):
        with pytest.raises(TypeError):
            esem.sem_unlink(bad, flags=flags)  # type: ignore[arg-type]


def test_unlink_wrong_key_type_is_type_error(sem_name: str) -> None:
    with pytest.raises(TypeError):
        esem.sem_unlink(sem_name, flags=esem.USE_ESEM, key="k" * 16)  # type: ignore[arg-type]
