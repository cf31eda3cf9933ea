"""A1 at rest: the journal tamperer. Every edit of a real service's journal stops the next
start with its reason; a rollback to an older complete copy is reported as the documented
limit it is; the legacy /dev/shm word changes silently."""

from __future__ import annotations

import pytest

from esem.attack import a1_journal
from esem.attack.base import Outcome, Target
from esem.attack.runner import ATTACKS, esem_rows_hold


@pytest.fixture(scope="module")
def rows(target: Target) -> dict[tuple[str, str], Outcome]:
    result = a1_journal.run(target)
    table = {(r.attack, r.backend): r for r in result}
    assert len(table) == len(result) == 7
    return table


@pytest.mark.parametrize("case, reason", [
    ("edit", "does not verify"), ("reorder", "does not verify"),
    ("splice", "does not verify"), ("cut middle", "expected seq"),
    ("cut tail", "cut off its end"),
])
def test_each_tampering_is_refused_with_its_reason(rows: dict[tuple[str, str], Outcome],
                                                   case: str, reason: str) -> None:
    row = rows[(f"A1 journal {case}", "esem")]
    assert row.outcome == "defended", row.evidence
    assert "refused to start (exit 3)" in row.evidence and reason in row.evidence


def test_rollback_is_an_honest_documented_limit(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A1 journal rollback", "esem")]
    assert row.outcome == "broken" and row.documented_limit, row.evidence
    assert "count 5 instead of 8" in row.evidence and "TEE" in row.evidence
    assert esem_rows_hold(list(rows.values()))


def test_legacy_count_changes_silently(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A1 journal tamper", "legacy")]
    assert row.outcome == "broken" and "from 1 to 5" in row.evidence


def test_it_is_an_attack_of_esem_attack() -> None:
    assert ATTACKS["A1-JOURNAL"] == "esem.attack.a1_journal"
