"""A7: a rogue uid (nobody) floods each resource up to its quota; another uid still works.

The attack runs its own daemon with small quotas; legacy POSIX semaphores have no quota
at all, so the same rogue fills /dev/shm as far as it likes (the flood is real).
"""

from __future__ import annotations

import os

import pytest

from esem.attack import a7_exhaust
from esem.attack.base import Outcome, Target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")

QUOTAS = {
    "A7 connections": a7_exhaust.SESSIONS,
    "A7 semaphores": a7_exhaust.SEMAPHORES,
    "A7 handles": a7_exhaust.HANDLES,
    "A7 waiters": a7_exhaust.UID_WAITERS,
}
VICTIM = "refused a trywait at zero, had a queued wait granted, closed and unlinked"


@pytest.fixture(scope="module")
def rows(target: Target) -> dict[tuple[str, str], Outcome]:
    result = a7_exhaust.run(target)
    table = {(r.attack, r.backend): r for r in result}
    assert len(table) == len(result) == 6
    return table


@pytest.mark.parametrize("label", list(QUOTAS))
def test_quota_stops_the_rogue_and_the_victim_works(
    rows: dict[tuple[str, str], Outcome], label: str
) -> None:
    row = rows[(label, "esem")]
    assert row.outcome == "defended", row.evidence
    assert "QuotaExceeded" in row.evidence or "EDQUOT" in row.evidence
    assert f" {QUOTAS[label]} " in row.evidence
    assert VICTIM in row.evidence
    assert "--quota-semaphores 64" in row.evidence


def test_waiter_quotas_per_session_and_per_uid(rows: dict[tuple[str, str], Outcome]) -> None:
    evidence = rows[("A7 waiters", "esem")].evidence
    assert "queued 16+16+0 = 32 blocking waits" in evidence
    assert "session has 16 waits queued (quota)" in evidence
    assert "has 32 waits queued (quota)" in evidence


def test_semaphore_quota_is_per_uid(rows: dict[tuple[str, str], Outcome]) -> None:
    assert "a second session of that uid was refused too" in rows[
        ("A7 semaphores", "esem")].evidence


def test_connection_storm_does_not_lock_out_others(
    rows: dict[tuple[str, str], Outcome],
) -> None:
    row = rows[("A7 connection storm", "esem")]
    assert row.outcome == "defended", row.evidence


def test_legacy_flood_is_unbounded(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A7 semaphores", "legacy")]
    assert row.outcome == "broken", row.evidence  # the flood is real
    bound = a7_exhaust.LEGACY_BOUND
    assert f"created {bound} of {bound} POSIX semaphores ({bound} files in /dev/shm)" \
        in row.evidence
    assert VICTIM in row.evidence
    assert f"all {bound} removed afterwards" in row.evidence


def test_nothing_left_behind(rows: dict[tuple[str, str], Outcome]) -> None:
    import pathlib

    assert not list(pathlib.Path("/dev/shm").glob("sem.esem-a7-*"))
