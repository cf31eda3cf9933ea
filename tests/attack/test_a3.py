"""A3: a rogue process of another uid (nobody) against a mode-0600 semaphore.

esem must refuse every attempt and leave the owner's semaphore as it was; legacy is
defended by file mode and the sticky bit for the same four attacks, but not when the
rogue holds the owner's mapping (inherited across fork, then setuid).
"""

from __future__ import annotations

import os

import pytest

from esem.attack import a3_rogue
from esem.attack.base import Outcome, Target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")

LABELS = ("A3 open 0600", "A3 guessed handle", "A3 unlink other's", "A3 post without handle",
          "A3 inherited handle")



@pytest.fixture(scope="module")
def rows(target: Target) -> dict[tuple[str, str], Outcome]:
    result = a3_rogue.run(target)
    table = {(r.attack, r.backend): r for r in result}
    assert len(table) == len(result) == 2 * len(LABELS)
    return table


@pytest.mark.parametrize("label", LABELS)
def test_esem_defends(rows: dict[tuple[str, str], Outcome], label: str) -> None:
    row = rows[(label, "esem")]
    assert row.outcome == "defended", row.evidence
    assert "ALLOWED" not in row.evidence
    assert "owner sees value 1, its handle still waits and posts" in row.evidence


@pytest.mark.parametrize(("label", "expected"), [
    ("A3 open 0600", "defended"),
    ("A3 guessed handle", "defended"),
    ("A3 unlink other's", "defended"),
    ("A3 post without handle", "defended"),
    ("A3 inherited handle", "broken"),
])
def test_legacy_rows(rows: dict[tuple[str, str], Outcome], label: str, expected: str) -> None:
    row = rows[(label, "legacy")]
    assert row.outcome == expected, row.evidence


def test_refusals_are_the_documented_ones(rows: dict[tuple[str, str], Outcome]) -> None:
    assert "PermissionsError(EACCES)" in rows[("A3 open 0600", "esem")].evidence
    assert "PermissionsError(EACCES)" in rows[("A3 unlink other's", "esem")].evidence
    guessed = rows[("A3 guessed handle", "esem")].evidence
    assert "ATTACH with the owner's token -> ExistentialError(EBADF)" in guessed
    assert "POST with the owner's token -> ExistentialError(EBADF)" in guessed
    assert "random tokens each -> ExistentialError(EBADF) x" in guessed
    inherited = rows[("A3 inherited handle", "legacy")].evidence
    assert "ALLOWED" in inherited and "owner sees value 2" in inherited


def test_nothing_left_behind(rows: dict[tuple[str, str], Outcome]) -> None:
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith("sem.esem-a3-")]
    assert leftovers == []
