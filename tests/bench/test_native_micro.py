"""``esem bench micro``'s native rows: the C program under the real preload library against
a real embedded daemon, legacy from the same C program, and the native AEAD floor
(``esem-floor``, two real processes over a socketpair), all in one smoke run.

Nothing here looks at how fast anything was; it checks that every native figure was
measured (present, positive) and labelled (the table, its notes, each placement).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from esem.bench import micro, native_micro

from .test_bench import check_report, micro_native_keys, native_expected


def need_native() -> None:
    if not native_expected():
        pytest.skip(f"micro's native rows cannot run here: {micro.native_available()}")


def test_micro_smoke_measures_the_native_client_and_floor(tmp_path: Path) -> None:
    need_native()
    out = tmp_path / "micro.json"
    result = subprocess.run([sys.executable, "-m", "esem", "bench", "micro", "--smoke",
                             "--json", str(out)], capture_output=True, text=True,
                            timeout=180, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    rows = check_report(json.loads(out.read_text()))
    for placement in ("same", "split"):
        _check_native_rows([r for r in rows if r["placement"] == placement])
    text = result.stdout
    for placement in ("same", "split"):
        assert (f"micro: the native client, microseconds (esem socket mode) [placement "
                f"{placement}]") in text
        assert f"placement {placement}: the service" in text
    for column in ("legacy C", "esem py", "esem native", "native/floor", "native floor"):
        assert column in text, column
    assert "micro: esem native client (socket; C under libesem_preload.so)" in result.stderr


def _check_native_rows(rows: list[dict[str, Any]]) -> None:
    got = {(r["backend"], r["mode"], r["case"], r["metric"]): r["value"] for r in rows}
    assert micro_native_keys() <= set(got)
    # The native client and the floor really ran: every one of their figures is positive
    # (a service that was never reached, or a loop that did nothing, gives none or zero).
    checked = 0
    for (backend, _, case, metric), value in got.items():
        if (backend == "esem" and case.startswith("native/")) or \
                case.startswith(native_micro.FLOOR_CASE):
            assert value > 0, (backend, case, metric, value)
            checked += 1
    assert checked == len({k for k in micro_native_keys() if k[0] != "legacy"})
    for case in native_micro.CPU_CASES:  # the service worked for the native client
        assert got[("esem", "socket", f"native/{case}/service-cpu", "cpu_per_mop")] > 0


def test_native_c_program_is_cached_and_rebuilt_on_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_native()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = native_micro.c_binary()
    assert first.is_file() and first.is_relative_to(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native_micro.c_binary() == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setattr(native_micro, "C_SOURCE", native_micro.C_SOURCE + "\n/* edit */\n")
    second = native_micro.c_binary()
    assert second != first and second.is_file()


def test_floor_refuses_bad_usage() -> None:
    need_native()
    done = subprocess.run([str(native_micro.floor_binary()), "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
