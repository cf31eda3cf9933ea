"""A6: thousands of malformed frames against the live service; nothing else notices."""

from __future__ import annotations

import re

import pytest

from esem.attack import a6_fuzz
from esem.attack.base import Outcome, Target


@pytest.fixture(scope="module")
def rows(target: Target) -> dict[str, Outcome]:
    result = a6_fuzz.run(target)
    table = {r.backend: r for r in result}
    assert len(table) == len(result) == 2
    return table


def _number(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in {text!r}"
    return int(m.group(1))


def test_service_and_bystander_untouched(rows: dict[str, Outcome]) -> None:
    row = rows["esem"]
    assert row.outcome == "defended", row.evidence
    frames = _number(r"(\d+) malformed frames", row.evidence)
    assert frames >= a6_fuzz.QUICK_FRAMES
    assert _number(r"over (\d+) connections", row.evidence) == frames
    assert _number(r"(\d+) before the handshake", row.evidence) > 0
    assert _number(r"(\d+) after a real one", row.evidence) > 0
    closed = (_number(r"closed (\d+) connections at the bad frame", row.evidence)
              + _number(r"and (\d+) incomplete ones", row.evidence))
    assert closed == frames
    assert "0 left open, 0 answered" in row.evidence
    assert "afterwards a new session was served" in row.evidence
    assert _number(r"bystander session did (\d+) wait/post cycles", row.evidence) > 0
    assert "0 wrong values, error: none" in row.evidence
    assert "stayed queued True and was granted afterwards True" in row.evidence
    assert "0 others changed" in row.evidence
    assert "by exactly its own operations True" in row.evidence
    assert "0 tracebacks" in row.evidence


def test_legacy_has_no_parser(rows: dict[str, Outcome]) -> None:
    assert rows["legacy"].outcome == "n/a"
