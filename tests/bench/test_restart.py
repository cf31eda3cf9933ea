"""``esem bench restart`` runs for real (a daemon SIGKILLed and restarted under waiting
client processes) and reports its three timings per number of clients; it needs an
embedded service of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esem.cli import main

from .test_bench import check_report, esem

METRICS = {"restart_to_ready", "restart_to_all_resumed", "ready_to_all_resumed"}


def test_restart_smoke(tmp_path: Path) -> None:
    out = tmp_path / "restart.json"
    result = esem("bench", "restart", "--smoke", "--clients", "1,3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = check_report(json.loads(out.read_text()))
    assert {(r["case"], r["metric"]) for r in rows} == {
        (f"{n} clients", m) for n in (1, 3) for m in METRICS}
    assert all(r["bench"] == "restart" and r["unit"] == "ms" for r in rows)
    by = {(r["case"], r["metric"]): r["value"] for r in rows}
    for n in (1, 3):  # all resumed only after the restart began
        assert by[(f"{n} clients", "restart_to_all_resumed")] > 0
    assert "restart_to_all_resumed" in result.stdout


def test_restart_refuses_a_running_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "restart", "--socket", "/nonexistent/esem.sock"]) == 1
    assert "needs its own" in capsys.readouterr().err
