"""A3-ROBUST: hand-offs and a work queue on robust semaphores must not mint units.

Against the old release rule ("give back whatever the dead session took") the hand-off
row read value 11 after 10 rounds with up to 4 processes inside the mutex, and the
work-queue row value 100; both must now be ``defended`` with the exact counts.
"""

from __future__ import annotations

import pytest

from esem.attack import a3_robust, runner
from esem.attack.base import Outcome, Target


@pytest.fixture(scope="module")
def rows(target: Target) -> dict[tuple[str, str], Outcome]:
    result = a3_robust.run(target)
    table = {(r.attack, r.backend): r for r in result}
    assert len(table) == len(result) == 4
    return table


def test_registered() -> None:
    assert runner.ATTACKS["A3-ROBUST"] == "esem.attack.a3_robust"


def test_hand_off_keeps_one_mutex(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A3 robust hand-off", "esem")]
    assert row.outcome == "defended", row.evidence
    assert "the mutex has value 1 " in row.evidence
    assert "up to 1 inside at once, 0 updates lost" in row.evidence


def test_work_queue_gives_back_no_done_job(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A3 robust work-queue", "esem")]
    assert row.outcome == "defended", row.evidence
    assert row.evidence.startswith("value 0 after")
    assert f"forgiven {a3_robust.JOBS}" in row.evidence
    assert "finds the queue empty" in row.evidence


@pytest.mark.parametrize("label", ["A3 robust hand-off", "A3 robust work-queue"])
def test_legacy_has_no_robust_mode(rows: dict[tuple[str, str], Outcome], label: str) -> None:
    row = rows[(label, "legacy")]
    assert row.outcome == "n/a" and "no robust mode" in row.evidence
