"""A2 against the native client: the man-in-the-middle's every strategy, with the victim
a C program using sem_* under the preload library. A tampered, replayed, reordered,
forged or cut frame must be -1 with an errno in the host program (EPROTO for a failed
authentication), never a grant, and the service's counts must add up."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from esem.attack import a2_mitm, native_victim
from esem.attack.base import Target
from esem.errors import IntegrityError, ServiceUnavailable


@pytest.fixture(scope="module")
def native(target: Target) -> native_victim.NativeBuild:
    from tests.native.conftest import TARGET, _build

    result = _build()  # the debug build of this tree, which the native tests use
    if result is None:
        pytest.skip("cargo is not installed: no preload library to attack")
    assert result.returncode == 0, result.stderr
    built = native_victim.build(target.workdir, TARGET / "libesem_preload.so")
    assert not isinstance(built, str), built
    return built


@pytest.fixture(scope="module")
def results(target: Target, native: native_victim.NativeBuild) -> list[a2_mitm.StrategyResult]:
    return a2_mitm.run_strategies(target, backends=a2_mitm.NATIVE_BACKENDS, native=native)


def test_every_native_row_is_defended(results: list[a2_mitm.StrategyResult]) -> None:
    rows = [r.outcome() for r in results]
    assert {(r.attack, r.backend) for r in rows} == {
        (f"A2 {s}", b) for s in a2_mitm.STRATEGIES for b in a2_mitm.NATIVE_BACKENDS}
    for row in rows:
        assert row.outcome == "defended", f"{row.attack} {row.backend}: {row.evidence}"
        assert "service: posts=" in row.evidence


def test_tampered_replies_are_eproto_in_the_c_program(
        results: list[a2_mitm.StrategyResult]) -> None:
    """Every reply the adversary forged, replayed, reordered, flipped, cut or injected
    ended the C program's sem_* call with errno EPROTO (read as IntegrityError)."""
    seen = 0
    for r in results:
        for p in r.phases:
            assert p.truth is not None and p.truth.conserved and p.truth.settled, p.evidence
            if p.direction == a2_mitm.S2C and r.strategy not in ("drop", "delay"):
                assert "IntegrityError (-1, errno EPROTO)" in " ".join(p.ops), p.evidence
                seen += 1
    assert seen >= 10


def test_errno_mapping() -> None:
    assert isinstance(native_victim.error_for(errno.EPROTO, "sem_wait"), IntegrityError)
    assert isinstance(native_victim.error_for(errno.EIO, "sem_post"), ServiceUnavailable)
    assert "EPROTO" in str(native_victim.error_for(errno.EPROTO, "sem_wait"))


def test_a_native_row_can_fail(target: Target, native: native_victim.NativeBuild,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The judge is not blind for native victims: a victim whose waits "succeed" whatever
    the service said (as a client that ignored the tag would) is reported broken."""
    monkeypatch.setattr(native_victim.NativeVictim, "op",
                        lambda self, kind, ms=None: 0)
    (result,) = a2_mitm.run_strategies(target, strategies=["forge-grant"],
                                       backends=["esem-native"], native=native)
    assert not result.defended
    assert "NOT DEFENDED" in result.outcome().evidence


def test_native_rows_are_na_without_the_library(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESEM_PRELOAD_LIB", str(tmp_path / "missing.so"))
    reason = native_victim.build(tmp_path)
    assert isinstance(reason, str) and "preload library" in reason
    rows = a2_mitm.native_na_rows(reason)
    assert [r.backend for r in rows] == list(a2_mitm.NATIVE_BACKENDS)
    assert all(r.outcome == "n/a" for r in rows)
