"""A4 against the native client: the forger (a process the kernel presents under the
victim's uid, and uid 0) goes after a C program's semaphores, with the handle tokens read
out of the program's sem_t memory. The plain one falls (the documented limit); the
key-bound one (esem_sem_open_keyed) refuses every forged or keyless operation and the C
program still sees its count, its name and a working handle."""

from __future__ import annotations

import os

import pytest

from esem.attack import a4_forger, native_victim
from esem.attack.base import Outcome, Target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change uid")


@pytest.fixture(scope="module")
def rows(target: Target) -> dict[str, Outcome]:
    from tests.native.conftest import TARGET, _build

    result = _build()  # the debug build of this tree, which the native tests use
    if result is None:
        pytest.skip("cargo is not installed: no preload library to attack")
    assert result.returncode == 0, result.stderr
    built = native_victim.build(target.workdir, TARGET / "libesem_preload.so")
    assert not isinstance(built, str), built
    out = a4_forger.run_native(target, built)
    assert [r.attack for r in out] == ["A4 forged uid"] * 2
    return {r.backend: r for r in out}


def test_plain_native_semaphore_falls_to_a_forged_uid(rows: dict[str, Outcome]) -> None:
    row = rows["esem-native"]
    assert row.outcome == "broken" and row.documented_limit, row.evidence
    assert "victim sees value 2, name GONE" in row.evidence  # the forger is real


def test_key_bound_native_semaphore_is_defended(rows: dict[str, Outcome]) -> None:
    row = rows["esem-native+key"]
    assert row.outcome == "defended", row.evidence
    assert "ALLOWED" not in row.evidence
    assert "victim sees value 1, name still there, its handle still works" in row.evidence
    assert row.evidence.count("KeyRejected(EKEYREJECTED)") >= 8
    assert "as uid 0" in row.evidence


def test_native_rows_hold(rows: dict[str, Outcome]) -> None:
    from esem.attack.runner import esem_rows_hold

    assert esem_rows_hold(list(rows.values()))


def test_native_rows_are_na_without_a_build(target: Target) -> None:
    out = a4_forger.run_native(target, "no C compiler to build the native victim")
    assert [(r.backend, r.outcome) for r in out] == [
        ("esem-native", "n/a"), ("esem-native+key", "n/a")]
