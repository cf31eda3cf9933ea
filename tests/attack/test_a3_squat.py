"""A3-SQUAT: another uid (nobody) creates the owner's name first, 0666 with value 1000.

Legacy adopts it and ten workers share a section meant for four; esem refuses every
worker's ``O_CREAT`` with a ``PermissionsError`` that names the squatter, and nobody
gets in.
"""

from __future__ import annotations

import os

import pytest

from esem.attack import a3_squat, runner
from esem.attack.base import Outcome, Target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to nobody")


@pytest.fixture(scope="module")
def rows(target: Target) -> dict[str, Outcome]:
    result = a3_squat.run(target)
    assert [(r.attack, r.backend) for r in result] == [
        ("A3 squat O_CREAT", "legacy"), ("A3 squat O_CREAT", "esem")]
    return {r.backend: r for r in result}


def test_registered() -> None:
    assert runner.ATTACKS["A3-SQUAT"] == "esem.attack.a3_squat"


def test_legacy_adopts_the_squatted_name(rows: dict[str, Outcome]) -> None:
    row = rows["legacy"]
    assert row.outcome == "broken", row.evidence
    assert f"up to {a3_squat.WORKERS} inside at once" in row.evidence
    assert "O_CREAT adopted it silently (value 1000;" in row.evidence
    assert "the squatter then unlinked the name: allowed" in row.evidence


def test_esem_refuses_to_adopt(rows: dict[str, Outcome]) -> None:
    row = rows["esem"]
    assert row.outcome == "defended", row.evidence
    assert "-> PermissionsError:" in row.evidence and "belongs to uid 65534" in row.evidence
    assert f"up to 0 inside at once, {a3_squat.WORKERS} refused" in row.evidence


def test_nothing_left_behind(rows: dict[str, Outcome]) -> None:
    assert [f for f in os.listdir("/dev/shm") if f.startswith("sem.esem-a3squat-")] == []
