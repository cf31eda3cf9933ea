"""A1: the same-uid tamperer breaks legacy mutual exclusion and finds nothing in esem."""

from __future__ import annotations

from esem.attack import a1_tamper
from esem.attack.base import Target


def test_a1_breaks_legacy_and_not_esem(target: Target) -> None:
    rows = {r.backend: r for r in a1_tamper.run(target)}
    assert rows["legacy"].outcome == "broken", rows["legacy"].evidence  # the attack is real
    assert rows["esem"].outcome == "defended", rows["esem"].evidence
    assert "0 of" in rows["esem"].evidence and "up to 1 inside" in rows["esem"].evidence
