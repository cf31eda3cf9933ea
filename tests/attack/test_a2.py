"""A2: a real man-in-the-middle on the client's socket path gets no grant out of esem."""

from __future__ import annotations

import pytest

from esem.attack import a2_mitm
from esem.attack.base import Target
from esem.errors import IntegrityError
from esem.protocol.messages import Reply, decode_reply
from esem.protocol.session import ClientSession

# The issue's list, in its words: every one must have a row per esem backend.
ISSUE_STRATEGIES = {"drop", "delay", "duplicate", "replay-grant", "reorder", "flip-bits",
                    "truncate", "inject-random", "forge-grant"}


@pytest.fixture(scope="module")
def results(target: Target) -> list[a2_mitm.StrategyResult]:
    return a2_mitm.run_strategies(target)


def test_every_esem_row_is_defended(results: list[a2_mitm.StrategyResult]) -> None:
    rows = a2_mitm.outcomes(results)
    esem_rows = [r for r in rows if r.backend != "legacy"]
    assert esem_rows
    for row in esem_rows:
        assert row.outcome == "defended", f"{row.attack} {row.backend}: {row.evidence}"
        assert row.evidence and "NOT DEFENDED" not in row.evidence
        assert "service: posts=" in row.evidence  # the service's truth was read


def test_strategy_set_is_complete(results: list[a2_mitm.StrategyResult]) -> None:
    assert set(a2_mitm.STRATEGIES) == ISSUE_STRATEGIES
    rows = a2_mitm.outcomes(results)
    for backend in ("esem", "esem+key"):
        labels = {r.attack for r in rows if r.backend == backend}
        assert labels == {f"A2 {s}" for s in ISSUE_STRATEGIES}, backend
    legacy = [r for r in rows if r.backend == "legacy"]
    assert len(legacy) == 1
    assert legacy[0].attack == "A2 channel" and legacy[0].outcome == "n/a"
    assert "shared memory" in legacy[0].evidence and "A1" in legacy[0].evidence
    for r in results:  # the grant-bearing direction is always attacked
        assert any(p.direction == a2_mitm.S2C for p in r.phases), r.strategy


def test_the_adversary_acted_in_every_scenario(results: list[a2_mitm.StrategyResult]) -> None:
    for r in results:
        for p in r.phases:
            assert p.frames_seen > 0 and p.frames_tampered > 0, p.evidence


def test_tampered_grants_end_in_integrity_error(results: list[a2_mitm.StrategyResult]) -> None:
    """Every forged, replayed, reordered, flipped, cut or injected reply is an
    IntegrityError at the victim; a dropped or delayed one is an error, never success; and
    the service's count adds up with no grant the victim saw that it did not give."""
    for r in results:
        for p in r.phases:
            assert p.truth is not None and p.truth.conserved and p.truth.settled, p.evidence
            victim_results = [op.split(": ", 1)[1] for op in p.ops]
            assert victim_results
            if p.direction == a2_mitm.S2C and r.strategy not in ("drop", "delay"):
                assert any(v.startswith("IntegrityError") for v in victim_results), p.evidence
            if r.strategy in ("drop", "delay"):
                assert not any(v.startswith("success") for v in victim_results), p.evidence


def test_the_mitm_is_real(target: Target) -> None:
    """With no tampering, esem works through the proxy exactly as directly, and every
    request and reply of the victim went through it frame by frame."""
    c = a2_mitm.run_control(target)
    assert c.ops == (("wait 1", "success"), ("timedwait (0.15s)", "BusyError"),
                     ("post", "success"), ("getvalue", "success"))
    assert c.value_seen == 1
    assert c.requests_sent == 5  # open, wait, timedwait, post, getvalue
    assert c.c2s_frames == c.requests_sent and c.s2c_frames == c.requests_sent
    assert c.acted == 0
    assert c.truth is not None
    assert (c.truth.posts, c.truth.waits, c.truth.value) == (2, 1, 1)


def test_a_row_can_fail(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that accepted an unauthenticated reply (falling back to plaintext when a
    frame fails to decrypt) is broken by the very same scenarios: the forged grant then
    returns success and the row says so."""
    original = ClientSession._on_reply

    def lenient(self: ClientSession, body: bytes) -> Reply:
        try:
            return original(self, body)
        except IntegrityError:
            reply, _, _ = decode_reply(body)
            self._pending.pop(reply.req_id, None)
            return reply

    monkeypatch.setattr(ClientSession, "_on_reply", lenient)
    [result] = a2_mitm.run_strategies(target, ["forge-grant"], ["esem"])
    row = result.outcome()
    assert row.outcome == "broken", row.evidence
    assert "false grant" in row.evidence and "returned success" in row.evidence
