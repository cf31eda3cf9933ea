"""A5: fakes on the socket path, with another key or garbage; the pinned client refuses."""

from __future__ import annotations

import os
import pathlib
import re

import pytest

from esem.attack import a5_impersonator
from esem.attack.base import Outcome, Target


@pytest.fixture(scope="module")
def rows(target: Target) -> dict[tuple[str, str], Outcome]:
    result = a5_impersonator.run(target)
    table = {(r.attack, r.backend): r for r in result}
    assert len(table) == len(result) == 10
    return table


def test_protocol_speaking_fakes_are_refused(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A5 impersonator", "esem")]
    assert row.outcome == "defended", row.evidence
    assert "3 protocol-speaking fakes, 3 refused with IntegrityError, 0 received a request" \
        in row.evidence
    for variant in ("other key", "recorded WELCOME", "forged WELCOME"):
        assert f"{variant}: IntegrityError" in row.evidence
    # The fake is a real service: a client trusting its key was served (and "granted").
    assert "control: returned a handle" in row.evidence
    assert "decrypted 3 requests (OPEN, WAIT, END)" in row.evidence  # END: its close()


def test_garbage_fakes_are_refused(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A5 impersonator garbage", "esem")]
    assert row.outcome == "defended", row.evidence
    assert "8 fakes answering the HELLO with garbage, 8 refused with an EsemError, 0 did not" \
        in row.evidence
    assert "returned a handle" not in row.evidence
    assert "forged REFUSED: QuotaExceeded" in row.evidence
    assert "silence: ServiceUnavailable" in row.evidence


def test_legacy_has_no_identity(rows: dict[tuple[str, str], Outcome]) -> None:
    assert rows[("A5 impersonator", "legacy")].outcome == "n/a"


def test_the_fake_is_gone(target: Target, rows: dict[tuple[str, str], Outcome]) -> None:
    assert not list(target.workdir.glob("a5-*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play two uids")
def test_squatted_default_path_is_refused(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A5 squatted default path", "esem")]
    assert row.outcome == "defended", row.evidence


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play two uids")
def test_squat_is_real_and_cleaned_up(rows: dict[tuple[str, str], Outcome]) -> None:
    row = rows[("A5 squatted default path", "esem")]
    assert row.outcome in ("defended", "broken"), row.evidence
    assert "the victim failed" not in row.evidence and "squatter failed" not in row.evidence
    squatted = re.search(r"looks for (/tmp/esem-\d+)/esem.sock", row.evidence)
    assert squatted is not None, row.evidence
    assert not pathlib.Path(squatted.group(1)).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play two uids")
@pytest.mark.parametrize("label", ["A5 planted link", "A5 foreign socket dir",
                                   "A5 swapped link"])
def test_filesystem_impersonator_is_refused(rows: dict[tuple[str, str], Outcome],
                                            label: str) -> None:
    row = rows[(label, "esem")]
    assert row.outcome == "defended", row.evidence
    assert "failed" not in row.evidence, row.evidence  # the attack itself was played
    assert rows[(label, "legacy")].outcome == "n/a"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play two uids")
def test_filesystem_rows_say_what_refused(rows: dict[tuple[str, str], Outcome]) -> None:
    planted = rows[("A5 planted link", "esem")].evidence
    assert "refused to start (exit 3" in planted and "kept its" in planted
    assert "belongs to uid 65534" in planted
    foreign = rows[("A5 foreign socket dir", "esem")].evidence
    assert "belongs to uid 65534" in foreign and "saw no client" in foreign
    swapped = rows[("A5 swapped link", "esem")].evidence
    assert swapped.count("is a symbolic link") == 2  # before and after the swap
    assert "saw no client" in swapped


def test_filesystem_attack_is_cleaned_up(target: Target,
                                         rows: dict[tuple[str, str], Outcome]) -> None:
    assert not list(target.workdir.glob("a5f-*"))
