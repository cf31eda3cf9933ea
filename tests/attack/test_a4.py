"""A4: a forger the kernel presents under the victim's uid.

A plain e-semaphore falls (uid checks trust the kernel: the documented limit, and the
proof that the forger is real); a key-bound one refuses every operation and keeps its
count; legacy falls.
"""

from __future__ import annotations

import os

import pytest

from esem.attack import a4_forger
from esem.attack.base import Outcome, Target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change uid")



@pytest.fixture(scope="module")
def rows(target: Target) -> dict[str, Outcome]:
    result = a4_forger.run_python(target)  # the native rows: test_a4_native.py
    assert [r.attack for r in result] == ["A4 forged uid"] * 3
    return {r.backend: r for r in result}


def test_plain_esem_is_broken_by_a_forged_uid(rows: dict[str, Outcome]) -> None:
    row = rows["esem"]
    assert row.outcome == "broken", row.evidence  # the forger is real
    assert "documented limit of uid-based checks" in row.evidence
    assert "victim sees value 2, name GONE" in row.evidence


def test_key_bound_esem_is_defended(rows: dict[str, Outcome]) -> None:
    row = rows["esem+key"]
    assert row.outcome == "defended", row.evidence
    assert "ALLOWED" not in row.evidence
    assert "victim sees value 1, name still there, its handle still works" in row.evidence
    assert row.evidence.count("KeyRejected(EKEYREJECTED)") >= 8
    assert "as uid 0" in row.evidence


def test_legacy_is_broken_by_a_forged_uid(rows: dict[str, Outcome]) -> None:
    row = rows["legacy"]
    assert row.outcome == "broken", row.evidence
    assert "victim sees value 2, name GONE" in row.evidence


def test_nothing_left_behind(rows: dict[str, Outcome]) -> None:
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("sem.esem-a4")]


def test_plain_row_is_marked_as_the_documented_limit(rows: dict[str, Outcome]) -> None:
    from esem.attack.runner import esem_rows_hold

    assert rows["esem"].documented_limit
    assert not rows["esem+key"].documented_limit
    assert esem_rows_hold(list(rows.values()))  # the suite's exit status is not spoiled
