"""A7 flood and half-open: one tenant (nobody) against another (daemon), real processes.

The flood round asserts liveness with generous bounds only (every bystander call
answered, none slower than the client's keepalive, service RSS growth under
``RSS_BOUND_MB``); the latencies it measures are reported, never asserted.
"""

from __future__ import annotations

import os

import pytest

from esem.attack import a7_flood, runner
from esem.attack.base import Outcome, Target
from esem.server import service

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")


@pytest.fixture(scope="module")
def rows(target: Target) -> dict[str, Outcome]:
    result = a7_flood.run(target)
    assert [r.attack for r in result] == ["A7 admin flood", "A7 half-open"]
    return {r.attack: r for r in result}


def test_admin_flood_leaves_the_bystander_answered_and_memory_bounded(
    rows: dict[str, Outcome],
) -> None:
    row = rows["A7 admin flood"]
    assert row.outcome == "defended", row.evidence
    assert "all answered" in row.evidence
    assert f"bound +{a7_flood.RSS_BOUND_MB} MB" in row.evidence
    assert "a STAT of the long queue" in row.evidence
    assert "(alone before the flood: p50" in row.evidence


def test_half_open_connections_cannot_hold_the_session_quota(
    rows: dict[str, Outcome],
) -> None:
    row = rows["A7 half-open"]
    assert row.outcome == "defended", row.evidence
    tries, limit = a7_flood.HALF_OPEN_TRIES, service.HALF_OPEN_PER_UID
    assert f"{tries - limit} were refused at once, {limit} left" in row.evidence
    assert "meanwhile uid" in row.evidence and "got a session" in row.evidence
    assert f"{tries} of {tries} were closed by the service" in row.evidence
    assert row.evidence.endswith("own new session was served")


def test_registered_in_esem_attack() -> None:
    assert runner.ATTACKS["A7-FLOOD"] == "esem.attack.a7_flood"
