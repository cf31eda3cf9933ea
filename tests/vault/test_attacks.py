"""The case study's two attacks, for real: harm against legacy, none against esem.

Each case is a full ``run_workload``: a vault server process, a same-uid adversary
process (A1: rewrites /dev/shm/sem.NAME; A4-style: opens the semaphore by name without
the key and posts it), eight concurrent TLS clients, and a byte-for-byte check of every
file. The legacy rows prove the attacks are real; the esem rows that they fail.
"""

from __future__ import annotations

import pytest

from esem.server.embedded import EmbeddedService
from esem.vault.attacks import POST_ATTEMPTS, TAMPER_VALUE
from esem.vault.limits import ENGINE_SLOTS
from esem.vault.workload import Row, run_workload

CLIENTS, FILES = 8, 5


def run(service: EmbeddedService, backend: str, attack: str) -> Row:
    return run_workload(backend, attack, clients=CLIENTS, files=FILES, size=2048,
                        esem_socket=service.socket_path)


def assert_unharmed(row: Row) -> None:
    assert row.files_written == CLIENTS * FILES, row
    assert row.files_intact == CLIENTS * FILES, row
    assert row.files_lost_or_corrupt == 0 and row.slot_failures == 0, row
    assert row.other_failures == {}, row
    assert row.service_peak <= ENGINE_SLOTS and row.filetree_peak == 1, row
    # The adversary tried both ways and got nowhere.
    assert "no such file, the count is in the esem service" in row.evidence
    assert f"0 of {POST_ATTEMPTS} posts went through" in row.evidence
    assert f"refused {POST_ATTEMPTS}x KeyRejected" in row.evidence


def assert_adversary_acted(row: Row) -> None:
    assert "rewrote /dev/shm/sem.esem-vault-" in row.evidence
    assert f"to {TAMPER_VALUE}" in row.evidence
    assert f"{POST_ATTEMPTS} of {POST_ATTEMPTS} posts went through" in row.evidence


def test_filetree_race_loses_files_under_legacy(service: EmbeddedService) -> None:
    row = run(service, "legacy", "filetree-race")
    assert_adversary_acted(row)
    assert row.filetree_peak > 1, row  # mutual exclusion on the tree is gone ...
    assert row.files_lost_or_corrupt > 0, row  # ... and files with it
    assert row.files_lost + row.files_corrupt == row.files_lost_or_corrupt


def test_filetree_race_is_defeated_by_esem(service: EmbeddedService) -> None:
    assert_unharmed(run(service, "esem", "filetree-race"))


def test_service_blocking_fails_requests_under_legacy(service: EmbeddedService) -> None:
    row = run(service, "legacy", "service-blocking")
    assert_adversary_acted(row)
    assert row.service_peak > ENGINE_SLOTS, row  # more threads than slots got through ...
    assert row.slot_failures > 0, row  # ... and the engine refused requests
    assert row.files_lost_or_corrupt == 0, row  # refused, not corrupted: the tree is intact


def test_service_blocking_is_defeated_by_esem(service: EmbeddedService) -> None:
    assert_unharmed(run(service, "esem", "service-blocking"))


def test_run_workload_checks_its_arguments() -> None:
    for kwargs in ({"clients": 0}, {"files": 0}, {"size": -1}, {"clients": True}):
        with pytest.raises(ValueError):
            run_workload("legacy", "none", **kwargs)
    with pytest.raises(ValueError, match="backend"):
        run_workload("futex", "none")
    with pytest.raises(ValueError, match="attack"):
        run_workload("esem", "rowhammer")
