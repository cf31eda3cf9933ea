"""``esem demo``: the README's main command, run as a user runs it (small N and M)."""

from __future__ import annotations

import json
import subprocess
import sys

from esem.demo import _print_rows
from esem.vault.workload import Row

KEYS = {"backend", "attack", "files_written", "files_intact", "files_lost_or_corrupt",
        "slot_failures", "requests_per_s"}


def test_demo_json_shows_legacy_harmed_and_esem_intact() -> None:
    clients, files = 8, 3
    done = subprocess.run([sys.executable, "-m", "esem", "demo", "--clients", str(clients),
                           "--files", str(files), "--size", "1024", "--json"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert all(set(r) >= KEYS for r in rows)
    by = {(r["backend"], r["attack"]): r for r in rows}
    assert list(by) == [(b, a) for b in ("legacy", "esem")
                        for a in ("none", "filetree-race", "service-blocking")]
    total = clients * files
    for attack in ("none", "filetree-race", "service-blocking"):
        r = by[("esem", attack)]
        assert r["files_written"] == r["files_intact"] == total, r
        assert r["files_lost_or_corrupt"] == 0 and r["slot_failures"] == 0, r
        assert r["requests_per_s"] > 0
    clean = by[("legacy", "none")]
    assert clean["files_intact"] == total and clean["slot_failures"] == 0
    # The same adversary harms legacy: the attacks are real.
    assert by[("legacy", "filetree-race")]["files_lost_or_corrupt"] > 0
    assert by[("legacy", "service-blocking")]["slot_failures"] > 0
    assert "[6/6] esem   service-blocking" in done.stderr  # progress, on stderr
    assert "done in" in done.stderr


def test_demo_table_has_the_named_columns(capsys: object) -> None:
    row = Row("legacy", "filetree-race", 96, 6, 90, 0, 742.1, evidence="adversary did X")
    _print_rows([row])
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    header = out.splitlines()[0].split()
    assert header[:4] == ["backend", "attack", "written", "intact"]
    assert "lost/corrupt" in out and "slot failures" in out and "requests/s" in out
    assert "legacy   filetree-race" in out and "742.1" in out
    assert "legacy filetree-race: adversary did X" in out


def test_demo_rejects_bad_sizes() -> None:
    done = subprocess.run([sys.executable, "-m", "esem", "demo", "--clients", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--clients must be at least 1" in done.stderr
