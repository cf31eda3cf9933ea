"""``esem bench``: every command in smoke mode through the real CLI (real processes, a
real esem daemon, real POSIX semaphores, a real redis-server), each report checked
strictly against the JSON schema, and bad options refused with exit status 2.

No test looks at how fast anything was: benchmarks print numbers, they never fail on a
time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from esem.bench import all as all_benches
from esem.bench import latsem, loop, micro, native_micro, peer, stress
from esem.bench.common import switchless_supported
from esem.cli import main
from esem.client import native as native_client
from esem.server.embedded import EmbeddedService

ALLOWED_BACKENDS = {"esem", "legacy", "floor", "redis", "stress-ng"}
ALLOWED_MODES = {"socket", "switchless", "-"}
ALLOWED_PLACEMENTS = {"same", "split", "unpinned"}
PINNED = ("same", "split")
ROW_KEYS = {"bench", "backend", "mode", "placement", "case", "metric", "value", "unit"}
UNITS = {"median": "us", "p99": "us", "cpu_per_mop": "s", "ops_per_s": "ops/s",
         "calls_per_s": "calls/s", "elapsed": "s", "mean": "us"}
MACHINE_KEYS = {"cpu": str, "cores": int, "kernel": str, "python": str, "esem_mode": str,
                "uvloop": str, "esem_version": str, "timestamp": str}


def esem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m esem ARGS`` in a child process, output captured."""
    return subprocess.run([sys.executable, "-m", "esem", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def check_report(report: Any) -> list[dict[str, Any]]:
    """Assert the exact compared shape; return the rows."""
    assert isinstance(report, dict) and set(report) == {"machine", "results"}
    machine = report["machine"]
    for key, kind in MACHINE_KEYS.items():
        assert isinstance(machine.get(key), kind), (key, machine.get(key))
    assert machine["uvloop"] in ("yes", "no")
    rows = report["results"]
    assert isinstance(rows, list) and rows
    seen = set()
    for r in rows:
        assert set(r) - {"client"} == ROW_KEYS, r
        if "client" in r:  # the esem client that measured it (stress names it)
            assert r["backend"] == "esem" and r["client"] in ("python", "native", "preload"), r
        for k in ROW_KEYS - {"value"}:
            assert isinstance(r[k], str) and r[k], r
        assert r["backend"] in ALLOWED_BACKENDS, r
        assert r["mode"] in ALLOWED_MODES, r
        assert r["placement"] in ALLOWED_PLACEMENTS, r
        assert (r["mode"] == "-") == (r["backend"] != "esem"), r
        v = r["value"]
        assert isinstance(v, int | float) and not isinstance(v, bool), r
        assert math.isfinite(v) and v >= 0, r
        assert UNITS.get(r["metric"], r["unit"]) == r["unit"], r
        key = (r["bench"], r["backend"], r["mode"], r["placement"], r["case"], r["metric"])
        assert key not in seen, f"duplicate row {key}"
        seen.add(key)
    return rows


def keys(rows: Iterable[dict[str, Any]], bench: str | None = None) -> set[tuple[str, ...]]:
    """(backend, mode, case, metric) of each row (of one bench)."""
    return {(r["backend"], r["mode"], r["case"], r["metric"]) for r in rows
            if bench is None or r["bench"] == bench}


def placed_keys(rows: Iterable[dict[str, Any]],
                bench: str | None = None) -> dict[str, set[tuple[str, ...]]]:
    """``keys`` of each placement's rows, by placement."""
    out: dict[str, set[tuple[str, ...]]] = {}
    for r in rows:
        if bench is None or r["bench"] == bench:
            out.setdefault(r["placement"], set()).add(
                (r["backend"], r["mode"], r["case"], r["metric"]))
    return out


def load(path: Any) -> list[dict[str, Any]]:
    with open(path) as f:
        return check_report(json.load(f))


def need_redis() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI must run the peer benchmark")
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")


def native_expected() -> bool:
    """Whether micro's native rows must be there: the preload library, a C compiler and
    cargo are present (CI has them all: a missing one there is a failure)."""
    why_not = micro.native_available()
    if why_not is not None and os.environ.get("CI"):
        pytest.fail(f"CI must measure micro's native rows: {why_not}")
    return why_not is None


def micro_native_keys(mode: str = "socket") -> set[tuple[str, ...]]:
    """The rows of the C program (legacy always, esem in every mode) and the native
    floor."""
    floor = native_micro.FLOOR_CASE
    expected = {("floor", "-", floor, m) for m in ("median", "p99")}
    expected.add(("floor", "-", f"{floor}/client-cpu", "cpu_per_mop"))
    backends = [("legacy", "-"), ("esem", mode)]
    for backend, m in backends:
        for case in native_micro.CASES:
            expected |= {(backend, m, f"native/{case}", "median"),
                         (backend, m, f"native/{case}", "p99")}
        for case in native_micro.CPU_CASES:
            expected.add((backend, m, f"native/{case}/client-cpu", "cpu_per_mop"))
            if backend == "esem":
                expected.add((backend, m, f"native/{case}/service-cpu", "cpu_per_mop"))
    return expected


def micro_keys(mode: str = "socket") -> set[tuple[str, ...]]:
    expected = micro_native_keys(mode) if native_expected() else set()
    for floor in (micro.UDS_FLOOR, micro.AEAD_FLOOR):
        expected |= {("floor", "-", floor, m) for m in ("median", "p99")}
        expected.add(("floor", "-", f"{floor}/client-cpu", "cpu_per_mop"))
    for case in micro.CASES:
        for m in ("median", "p99"):
            expected |= {("legacy", "-", case, m), ("esem", mode, case, m)}
    for case in micro.CPU_CASES:
        expected |= {("legacy", "-", f"{case}/client-cpu", "cpu_per_mop"),
                     ("esem", mode, f"{case}/client-cpu", "cpu_per_mop"),
                     ("esem", mode, f"{case}/service-cpu", "cpu_per_mop")}
    return expected


def latsem_keys(pairs: Iterable[int], restart: Iterable[float],
                mode: str = "socket") -> set[tuple[str, ...]]:
    expected = set()
    for p in pairs:
        for r in restart:
            case = latsem.case_name(p, r)
            expected |= {("legacy", "-", case, "median"), ("esem", mode, case, "median"),
                         ("legacy", "-", case, "p99"), ("esem", mode, case, "p99"),
                         ("legacy", "-", f"{case}/client-cpu", "cpu_per_mop"),
                         ("esem", mode, f"{case}/client-cpu", "cpu_per_mop"),
                         ("esem", mode, f"{case}/service-cpu", "cpu_per_mop")}
    return expected


def stress_keys(workers: int, threads: int, mode: str = "socket") -> set[tuple[str, ...]]:
    case = stress.case_name(workers, threads)
    expected = {("legacy", "-", f"{case}/client-cpu", "cpu_per_mop"),
                ("esem", mode, f"{case}/client-cpu", "cpu_per_mop"),
                ("esem", mode, f"{case}/service-cpu", "cpu_per_mop")}
    for backend, m in (("legacy", "-"), ("esem", mode)):
        expected |= {(backend, m, case, "ops_per_s"), (backend, m, case, "calls_per_s")}
    if mode == "socket":  # the service's capacity under pipelined load
        expected |= {("esem", mode, stress.CAPACITY_CASE, "ops_per_s"),
                     ("esem", mode, stress.CAPACITY_CASE, "ops_per_cpu_s")}
    if shutil.which("stress-ng"):
        expected.add(("stress-ng", "-", case, "ops_per_s"))
        if native_expected():  # stress-ng under the preload library, in this mode
            native = stress.NATIVE + case
            expected |= {("esem", mode, native, "ops_per_s"),
                         ("esem", mode, f"{native}/client-cpu", "cpu_per_mop"),
                         ("esem", mode, f"{native}/service-cpu", "cpu_per_mop")}
    return expected


def loop_keys(calls: int, modes: Iterable[str] = ("socket",)) -> set[tuple[str, ...]]:
    case = loop.case_name(calls)
    expected = {("legacy", "-", c, m) for c, m in ((case, "elapsed"), (case, "mean"),
                                                   (f"{case}/client-cpu", "cpu_per_mop"))}
    for mode in modes:
        expected |= {("esem", mode, case, "elapsed"), ("esem", mode, case, "mean"),
                     ("esem", mode, f"{case}/client-cpu", "cpu_per_mop"),
                     ("esem", mode, f"{case}/service-cpu", "cpu_per_mop")}
    return expected


def peer_keys(mode: str = "socket") -> set[tuple[str, ...]]:
    expected = set()
    for backend, m in (("legacy", "-"), ("redis", "-"), ("esem", mode)):
        for case in peer.LATENCY_CASES:
            expected |= {(backend, m, case, "median"), (backend, m, case, "p99")}
        for case in peer.THROUGHPUT_CASES:
            expected.add((backend, m, case, "ops_per_s"))
        for case in (*peer.LATENCY_CASES, *peer.THROUGHPUT_CASES):
            expected.add((backend, m, f"{case}/client-cpu", "cpu_per_mop"))
            if backend != "legacy":
                expected.add((backend, m, f"{case}/service-cpu", "cpu_per_mop"))
    return expected


# ---------------------------------------------------------------- commands


def test_micro_smoke(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    result = esem("bench", "micro", "--smoke", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = load(out)
    # the default is both placements, each with every row
    assert placed_keys(rows, "micro") == {p: micro_keys() for p in PINNED}
    assert {r["bench"] for r in rows} == {"micro"}
    assert "esem/legacy" in result.stdout and "esem/floor" in result.stdout
    assert "micro: esem (socket) operations" in result.stderr  # progress, on stderr
    assert "machine:" in result.stdout
    for p in PINNED:
        assert f"micro: latency per operation, microseconds (esem socket mode) [placement {p}]" \
            in result.stdout
    assert "performance targets: measured per placement" in result.stdout
    machine = json.loads(out.read_text())["machine"]
    assert set(machine["placements"]) == set(PINNED)


def test_latsem_smoke_json_on_stdout() -> None:
    result = esem("bench", "latsem", "--smoke", "--pairs", "1,3", "--restart", "0,0.5",
                  "--rounds", "8", "--json", "-")
    assert result.returncode == 0, result.stderr
    rows = check_report(json.loads(result.stdout))  # stdout is the JSON alone
    assert placed_keys(rows) == {p: latsem_keys((1, 3), (0.0, 0.5)) for p in PINNED}
    assert "one-way hand-off latency" in result.stderr  # the table moved to stderr


def test_stress_smoke(tmp_path: Path) -> None:
    out = tmp_path / "stress.json"
    result = esem("bench", "stress", "--smoke", "--seconds", "0.3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = load(out)
    workers = os.cpu_count() or 1
    assert placed_keys(rows) == {p: stress_keys(workers, 2) for p in PINNED}
    for r in rows:  # the esem workers really ran the loop
        if r["metric"] == "calls_per_s":
            assert r["value"] > 0, r
    # Every esem row names its client: the Python API's workers on the default client
    # (the native one when built), stress-ng on the preload library.
    want = native_client.chosen()
    for r in rows:
        if r["backend"] == "esem" and r["case"] != stress.CAPACITY_CASE:
            expected = "preload" if r["case"].startswith(stress.NATIVE) else want
            assert r.get("client") == expected, r
    assert "bogo ops per second" in result.stdout


def test_peer_smoke(tmp_path: Path) -> None:
    need_redis()
    out = tmp_path / "peer.json"
    result = esem("bench", "peer", "--smoke", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = load(out)
    assert placed_keys(rows) == {"unpinned": peer_keys()}  # peer takes no --placement
    assert "redis-server pid" in result.stderr
    assert "esem/redis" in result.stdout


def test_all_skip_leaves_out_what_it_names_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = esem("bench", "all", "--smoke", "--placement", "same", "--mode", "socket",
                  "--skip", "micro,latsem,stress,peer,app", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stderr
    assert {r["bench"] for r in load(out / "results.json")} == {"loop"}
    text = (out / "report.md").read_text()
    for name in ("micro", "latsem", "stress", "peer", "app"):
        assert f"{name} skipped (--skip)" in text, name


def test_all_smoke_writes_results_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = esem("bench", "all", "--smoke", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stderr
    rows = load(out / "results.json")
    workers = os.cpu_count() or 1
    # all runs both esem modes (where the build has switchless) and both placements by
    # default: micro, loop, latsem and stress pinned, peer and app unpinned
    modes = ("socket", "switchless") if switchless_supported() else ("socket",)
    pinned: set[tuple[str, ...]] = set()
    unpinned: set[tuple[str, ...]] = {("app", "legacy", "-", "vault", "requests_per_s")}
    for mode in modes:
        pinned |= {("micro", *k) for k in micro_keys(mode)}
        pinned |= {("latsem", *k) for k in latsem_keys(latsem.SMOKE_PAIRS,
                                                       latsem.SMOKE_RESTART, mode)}
        pinned |= {("stress", *k) for k in stress_keys(workers, 2, mode)}
        if shutil.which("redis-server"):
            unpinned |= {("peer", *k) for k in peer_keys(mode)}
        unpinned |= {("app", "esem", mode, "vault", "requests_per_s"),
                     ("app", "esem", mode, "vault", "overhead")}
    pinned |= {("loop", *k) for k in loop_keys(loop.SMOKE_CALLS, modes)}
    if not shutil.which("redis-server") and os.environ.get("CI"):
        pytest.fail("redis-server is not installed, and CI must run the peer benchmark")
    got: dict[str, set[tuple[str, ...]]] = {}
    for r in rows:
        got.setdefault(r["placement"], set()).add(
            (r["bench"], r["backend"], r["mode"], r["case"], r["metric"]))
    assert got == {"same": pinned, "split": pinned, "unpinned": unpinned}
    text = (out / "report.md").read_text()
    for title in ("micro: latency per operation", "latsem: one-way hand-off latency",
                  "stress: stress-ng's semaphore stressor", "esem/legacy", "esem/floor",
                  "## Headline", "SMOKE sizes", "FILE VAULT requests per second",
                  "## Targets", "performance targets: measured", "loop: N post calls from Python",
                  "- placement same:", "- placement split:"):
        assert title in text, title
    for p in PINNED:
        for title in ("micro: latency per operation", "latsem: one-way hand-off latency",
                      "stress: stress-ng's semaphore stressor", "loop: N post calls"):
            assert f"{title}" in text and f"[placement {p}]" in text, (title, p)
    if shutil.which("redis-server"):
        assert "peer: esem (socket mode) beside a Redis semaphore" in text
    for png in all_benches.report.PLOTS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in text
    assert "micro: latency per operation" in result.stdout


def test_against_a_running_service_with_socket(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path / "svc") as svc:
        out = tmp_path / "micro.json"
        result = esem("bench", "micro", "-n", "10", "--socket", str(svc.socket_path),
                      "--json", str(out))
        assert result.returncode == 0, result.stderr
        rows = load(out)
        # a service this benchmark did not start is not moved: one unpinned pass, said so
        assert placed_keys(rows) == {"unpinned": micro_keys()}
        assert "is not moved; nothing is pinned" in result.stderr
        machine = json.loads(out.read_text())["machine"]
        assert machine["service"] == str(svc.socket_path)
        assert set(machine["placements"]) == {"unpinned"}
        # its CPU was read through the pid the kernel vouched for on the socket
        assert any(r["case"].endswith("/service-cpu") and r["value"] > 0 for r in rows)
        if switchless_supported():  # this service has no rings: no figure may say it had
            refused = esem("bench", "latsem", "--smoke", "--mode", "switchless",
                           "--socket", str(svc.socket_path))
            assert refused.returncode == 1
            assert "session runs in socket mode" in refused.stderr


def test_no_service_at_socket_is_exit_3(tmp_path: Path) -> None:
    result = esem("bench", "latsem", "--smoke", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 3, result.stderr
    assert "none.sock" in result.stderr


def test_switchless_mode() -> None:
    if switchless_supported():  # the fast path is merged: both modes run side by side
        result = esem("bench", "micro", "--smoke", "--mode", "both", "--placement", "same",
                      "--json", "-")
        assert result.returncode == 0, result.stderr
        rows = check_report(json.loads(result.stdout))
        assert placed_keys(rows) == {"same": micro_keys("socket") | micro_keys("switchless")}
    else:
        result = esem("bench", "stress", "--smoke", "--mode", "switchless")
        assert result.returncode == 2
        assert "--mode switchless is not available" in result.stderr


# ------------------------------------------------------------ bad options


@pytest.mark.parametrize(("args", "message"), [
    (["latsem", "--pairs", "0"], "0 is out of range 1..32"),
    (["latsem", "--pairs", "1,x"], "not a comma-separated list of integers"),
    (["latsem", "--restart", "2"], "2 is not a probability"),
    (["latsem", "--restart", "0,-0.1"], "-0.1 is not a probability"),
    (["micro", "-n", "5"], "out of range"),
    (["micro", "--mode", "tcp"], "invalid choice"),
    (["stress", "--seconds", "0"], "out of range"),
    (["stress", "--workers", "0"], "out of range"),
    (["peer", "--procs", "1000"], "out of range"),
    (["all"], "--out"),
    (["all", "--out", "x", "--skip", "micro,lat"], "no benchmark lat (choose from micro,"),
    (["micro", "--placement", "apart"], "invalid choice"),
    (["loop", "--calls", "0"], "out of range"),
])
def test_bad_options_exit_2(args: list[str], message: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    out = capsys.readouterr().out
    for command in ("micro", "loop", "latsem", "stress", "peer", "all"):
        assert command in out


@pytest.mark.parametrize("command", ["micro", "loop", "latsem", "stress", "peer", "all"])
def test_help_explains(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--smoke", "--socket", "JSON", "cpu_per_mop"):
        assert word in text, word


# --------------------------------------------------------- the app benchmark


def test_app_smoke_measures_the_vault_on_both_backends(tmp_path: Path) -> None:
    out = tmp_path / "app.json"
    result = esem("bench", "app", "--smoke", "--json", str(out), timeout=240)
    assert result.returncode == 0, result.stderr
    rows = load(out)
    assert keys(rows) == {("legacy", "-", "vault", "requests_per_s"),
                          ("esem", "socket", "vault", "requests_per_s"),
                          ("esem", "socket", "vault", "overhead")}
    assert all(r["value"] > 0 for r in rows if r["metric"] == "requests_per_s")
    assert "FILE VAULT requests per second" in result.stdout


def test_stress_native_switchless_beside_socket() -> None:
    """stress-ng under the preload library in both modes: rows per mode, and the table of
    switchless beside socket (issue 12's ratio)."""
    if not (switchless_supported() and shutil.which("stress-ng") and native_expected()):
        pytest.skip("needs switchless mode, stress-ng and the native client")
    result = esem("bench", "stress", "--smoke", "--seconds", "0.3", "--mode", "both",
                  "--json", "-")
    assert result.returncode == 0, result.stderr
    rows = check_report(json.loads(result.stdout))
    workers = os.cpu_count() or 1
    assert keys(rows) == stress_keys(workers, 2, "socket") | stress_keys(workers, 2,
                                                                         "switchless")
    for r in rows:
        if r["case"].startswith(stress.NATIVE) and r["metric"] == "ops_per_s":
            assert r["value"] > 0, r
    assert "switchless beside socket" in result.stderr  # --json -: the tables on stderr


def test_journal_smoke(tmp_path: Path) -> None:
    out = tmp_path / "journal.json"
    before = set(Path("/dev/shm").glob("jbench-*"))
    result = esem("bench", "journal", "--smoke", "-n", "20", "--sizes", "1,20",
                  "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = load(out)
    got = {(r["case"], r["metric"]) for r in rows}
    for config in ("no-journal", "tmpfs", "disk-fsync"):
        assert {(f"post/{config}", "median"), (f"post/{config}", "p99"),
                (f"post/{config}/service-cpu", "cpu_per_mop")} <= got
    assert {("restart/1", "seconds"), ("restart/20", "seconds")} <= got
    assert {("resume-all/1", "seconds"), ("resume-all/5", "seconds")} <= got
    assert "restart on a tmpfs" in result.stdout
    assert set(Path("/dev/shm").glob("jbench-*")) <= before  # cleaned up
    refused = esem("bench", "journal", "--smoke", "--socket", str(tmp_path / "x"))
    assert refused.returncode == 2 and "--socket does not apply" in refused.stderr
