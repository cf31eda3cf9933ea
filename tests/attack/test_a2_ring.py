"""A2 against switchless sessions: an adversary that maps the victim's rings (through
/proc/PID/fd, as any same-uid process can) and flips, replays, forges and corrupts slots
and indices gets only IntegrityError out of esem, never a grant."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from esem.attack import a2_ring, native_victim, runner
from esem.attack.base import Target
from esem.client import blocking
from esem.server.embedded import EmbeddedService


@pytest.fixture(scope="module")
def switchless_target() -> Iterator[Target]:
    with tempfile.TemporaryDirectory(prefix="esem-attack-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        with EmbeddedService(work / "service", switchless=True) as svc:
            blocking._process_client = None
            yield Target(svc.socket_path, svc.pubkey, work, quick=True)


@pytest.fixture(scope="module")
def results(switchless_target: Target) -> list[a2_ring.StrategyResult]:
    return a2_ring.run_strategies(switchless_target)


def test_every_ring_row_is_defended(results: list[a2_ring.StrategyResult]) -> None:
    assert {(r.strategy, r.backend) for r in results} == {
        (s, b) for s in a2_ring.STRATEGIES for b in a2_ring.ESEM_BACKENDS}
    for r in results:
        row = r.outcome()
        assert row.outcome == "defended", f"{row.attack} {row.backend}: {row.evidence}"
        assert "service: posts=" in row.evidence  # the service's truth was read


def test_reply_tampering_ends_in_integrity_error(
        results: list[a2_ring.StrategyResult]) -> None:
    for r in results:
        for p in r.phases:
            assert p.truth is not None and p.truth.conserved and p.truth.settled, p.evidence
            tampered = [op for op in p.ops if "wait" in op or "getvalue" in op]
            assert tampered, p.evidence
            if p.direction == "s2c":
                assert any(op.endswith(("IntegrityError", "ProtocolError", "RingError"))
                           for op in p.ops), p.evidence
            assert not any(op.startswith("wait: success") for op in p.ops
                           if p.direction == "s2c" and r.strategy != "ring-replay-grant")


def test_a_plain_service_has_no_rings_to_attack(tmp_path: Path) -> None:
    """Against a service without --switchless the rows say so (n/a), not defended."""
    os.chmod(tmp_path, 0o755)
    with EmbeddedService(tmp_path / "service") as svc:
        rows = a2_ring.run(Target(svc.socket_path, svc.pubkey, tmp_path, quick=True))
    assert rows[0].backend == "legacy" and rows[0].outcome == "n/a"
    assert all(r.outcome == "n/a" and "--switchless" in r.evidence for r in rows[1:])
    assert runner.ATTACKS["A2-RING"] == "esem.attack.a2_ring"


@pytest.fixture(scope="module")
def native_results(switchless_target: Target) -> list[a2_ring.StrategyResult]:
    native = native_victim.build(switchless_target.workdir)
    if isinstance(native, str):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the ring adversary against the native client: {native}")
        pytest.skip(f"the native victim cannot run here: {native}")
    return a2_ring.run_strategies(switchless_target, backends=(a2_ring.NATIVE_BACKEND,),
                                  native=native)


def test_every_ring_row_is_defended_for_the_native_client(
        native_results: list[a2_ring.StrategyResult]) -> None:
    """The same scenarios against a C program under the preload library, its session on
    the rings: every tampered operation is an error in the host program (EPROTO for a
    reply that fails authentication, EIO once the service dropped the session), never a
    grant, and the service's counts hold."""
    assert {r.strategy for r in native_results} == set(a2_ring.STRATEGIES)
    for r in native_results:
        row = r.outcome()
        assert row.backend == "esem native"
        assert row.outcome == "defended", f"{row.attack} {row.backend}: {row.evidence}"
        for p in r.phases:
            assert p.truth is not None and p.truth.conserved and p.truth.settled, p.evidence
            if p.direction == "s2c":
                # The host program learns the channel failed (not a bare EINVAL).
                assert any(op.endswith("IntegrityError") for op in p.ops), p.evidence
