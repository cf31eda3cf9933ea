"""``--placement``: the processes of a benchmark really run where its placement says (the
embedded service's every thread, this process, the forked partners, read back from the
kernel), every row says under which placement it was made, and no ratio mixes two
placements (``lookup`` refuses; the tables and the targets are made per placement).

Rows for the ratio checks are built with ``esem.bench.common.row`` under a placement
with chosen values: what is checked is which rows a ratio is taken between, never a
speed. Nothing here asserts a timing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from esem.bench import micro, native_micro, placement, stress, targets
from esem.bench.common import (
    Options,
    Row,
    UsageError,
    Workers,
    esem_target,
    lookup,
    per_placement,
    placements,
    row,
    switchless_supported,
)

CPUS = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="split placement needs two vCPUs")


def _pinned_to(pid: int) -> set[frozenset[int]]:
    """The distinct affinity masks of the threads of process ``pid``."""
    return {frozenset(cpus) for cpus in placement.affinity(pid).values()}


@two_cpus
def test_split_pins_the_service_the_clients_and_each_partner() -> None:
    before = _pinned_to(0)
    split = placement.make("split")
    assert split.service == {CPUS[0]} and split.client == {CPUS[1]}
    with placement.active(split), esem_target("socket", None) as target:
        assert target.service_pid is not None
        # every thread of the service (its event loop and any helper thread)
        assert _pinned_to(target.service_pid) == {split.service}
        assert _pinned_to(0) == {split.client}  # every thread of this (client) process

        def where(backend: str) -> list[int]:
            placement.pin_partner(backend)
            return sorted(os.sched_getaffinity(0))

        def worker(i: int) -> list[int]:
            placement.pin_worker("legacy", i)
            return sorted(os.sched_getaffinity(0))

        got = Workers([lambda: where("legacy"), lambda: where("floor"),
                       lambda: where("esem"), lambda: worker(0), lambda: worker(1),
                       lambda: sorted(os.sched_getaffinity(0))]).start().results(60)
        assert got == [[CPUS[0]], [CPUS[0]], [CPUS[1]], [CPUS[1]], [CPUS[0]], [CPUS[1]]]
        assert row("micro", "esem", "socket", "post", "median", 1, "us")["placement"] == \
            "split"
    assert _pinned_to(0) == before  # this process may run where it could before
    assert row("micro", "esem", "socket", "post", "median", 1, "us")["placement"] == \
        "unpinned"


@two_cpus
def test_split_pins_every_thread_of_a_switchless_service() -> None:
    if not switchless_supported():
        pytest.skip("this build has no switchless mode")
    split = placement.make("split")
    with placement.active(split), esem_target("switchless", None) as target:
        assert target.service_pid is not None
        # the rings' poller and whatever else the service runs: one mask, the service's
        assert _pinned_to(target.service_pid) == {split.service}
        assert len(placement.affinity(target.service_pid)) >= 1
        assert _pinned_to(0) == {split.client}


def test_same_puts_the_service_beside_the_clients() -> None:
    same = placement.make("same")
    assert same.service == same.client == {CPUS[0]}
    with placement.active(same), esem_target("socket", None) as target:
        assert target.service_pid is not None
        assert _pinned_to(target.service_pid) == {same.service}
        assert _pinned_to(0) == {same.client}
        (partner,) = Workers([lambda: (placement.pin_partner("legacy"),
                                       sorted(os.sched_getaffinity(0)))[1]]).start().results(60)
        assert partner == [CPUS[0]]


def test_a_running_service_is_never_pinned() -> None:
    with (placement.active(placement.make("same")),
          pytest.raises(UsageError, match="cannot be pinned"),
          esem_target("socket", "/nonexistent/esem.sock")):
        pass
    opts = Options(socket="/some/where.sock", placements=("same", "split"))
    assert placement.names(opts) == ("unpinned",)
    assert [p.name for p in placement.each(opts, "test")] == ["unpinned"]


def test_parse_placements() -> None:
    assert placement.parse("same") == ("same",)
    assert placement.parse("unpinned") == ("unpinned",)
    if len(CPUS) >= 2:
        assert placement.parse("both") == ("same", "split")
    else:
        assert placement.parse("both") == ("same",)
        with pytest.raises(UsageError, match="two vCPUs"):
            placement.parse("split")
    with pytest.raises(UsageError):
        placement.parse("apart")


@two_cpus
def test_the_native_floor_pins_its_echo_side_and_refuses_bad_cpus() -> None:
    if micro.native_available() is not None:
        pytest.skip(f"no native harness: {micro.native_available()}")
    samples, cpu = native_micro.measure_floor(20, frozenset({CPUS[1]}))
    assert len(samples) == 20 and cpu > 0
    binary = str(native_micro.floor_binary())
    done = subprocess.run([binary, "5", "100000"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
    # a vCPU the echo process may not use: it fails, it does not silently run elsewhere
    allowed = set(range(os.cpu_count() or 1))
    outside = max(allowed) + 1
    done = subprocess.run([binary, "5", str(outside)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "pinning to CPU" in done.stderr


# ------------------------------------------------------------- ratio rules


def _under(name: str, *rows: tuple[str, str, str, str, float]) -> list[Row]:
    """Rows (backend, mode, case, metric, value) of micro, made under placement ``name``."""
    p = placement.Placement(name, None, None)
    placement.CURRENT_PLACEMENT.append(p.name)
    try:
        return [row("micro", b, m, c, metric, v, "s" if metric == "cpu_per_mop" else "us")
                for b, m, c, metric, v in rows]
    finally:
        placement.CURRENT_PLACEMENT.pop()


@pytest.fixture
def two_placements() -> Iterator[list[Row]]:
    # same: esem 10x legacy; split: esem 50x legacy. A ratio across them would read
    # 100x (split esem / same legacy) or 5x (same esem / split legacy).
    yield (_under("same", ("legacy", "-", "post", "median", 1.0),
                  ("esem", "socket", "post", "median", 10.0),
                  ("floor", "-", "uds-roundtrip", "median", 5.0),
                  ("floor", "-", "uds-aead-roundtrip", "median", 8.0))
           + _under("split", ("legacy", "-", "post", "median", 2.0),
                    ("esem", "socket", "post", "median", 100.0),
                    ("floor", "-", "uds-roundtrip", "median", 50.0),
                    ("floor", "-", "uds-aead-roundtrip", "median", 80.0)))


def test_lookup_refuses_to_mix_placements(two_placements: list[Row]) -> None:
    with pytest.raises(ValueError, match="placements same and split"):
        lookup(two_placements, backend="esem", case="post", metric="median")
    assert lookup(two_placements, placement="split", backend="esem", case="post",
                  metric="median") == 100.0


def test_each_table_holds_one_placement(two_placements: list[Row]) -> None:
    tables = micro.tables(two_placements)
    assert [t.title for t in tables] == [
        "micro: latency per operation, microseconds (esem socket mode) [placement same]",
        "micro: latency per operation, microseconds (esem socket mode) [placement split]"]
    post = [next(r for r in t.body if r[0] == "post") for t in tables]
    header = list(tables[0].header)
    ratios = [(r[header.index("esem/legacy")], r[header.index("esem/floor")]) for r in post]
    assert ratios == [("10.00x", "2.00x"), ("50.00x", "2.00x")]
    # the generic splitter hands a table maker one placement's rows at a time
    seen: list[set[str]] = []
    per_placement(lambda rows: seen.append({r["placement"] for r in rows}) or [],
                  two_placements)
    assert seen == [{"same"}, {"split"}]


def test_targets_are_judged_within_each_placement(two_placements: list[Row]) -> None:
    t = targets.table(two_placements, benches=("micro",))
    lines = {(r[0], r[1]): r for r in t.body}
    py_post = "Python-API socket post / Python UDS round trip with AEAD"
    assert lines[(py_post, "same")][2:5] == ["1.25x", "<= 1.5x (both placements)", "met"]
    assert lines[(py_post, "split")][2:5] == ["1.25x", "<= 1.5x (both placements)", "met"]
    # a row this run lacks is named, so the table fills in when it exists
    native = lines[("native-client switchless post / legacy cross-process hand-off (C)",
                    "split")]
    assert native[4].startswith("not measured (missing: micro/esem/switchless/native/post/"
                                "median")


def test_targets_explain_a_miss_with_the_cpu_per_call() -> None:
    rows = _under("split", ("esem", "socket", "post", "median", 100.0),
                  ("esem", "socket", "post/client-cpu", "cpu_per_mop", 10.0),
                  ("esem", "socket", "post/service-cpu", "cpu_per_mop", 15.0),
                  ("floor", "-", "uds-aead-roundtrip", "median", 20.0))
    t = targets.table(rows, benches=("micro",))
    (line,) = [r for r in t.body if r[0].startswith("Python-API socket post")]
    assert line[2:7] == ["5.00x", "<= 1.5x (both placements)", "MISSED", "10.0", "15.0"]
    assert any(n.startswith("missed at split: post: 100.0 us latency") and "waiting is the cost"
               in n for n in t.notes)


def test_stress_targets_compare_modes_of_one_placement() -> None:
    def stress_rows(name: str, socket: float, switchless: float) -> list[Row]:
        placement.CURRENT_PLACEMENT.append(name)
        try:
            return [row("stress", "esem", m, "workers=2,threads=2", "ops_per_s", v, "ops/s")
                    for m, v in (("socket", socket), ("switchless", switchless))]
        finally:
            placement.CURRENT_PLACEMENT.pop()

    rows = stress_rows("same", 1000, 6000) + stress_rows("split", 100_000, 200_000)
    assert stress.tables(rows)  # one table per placement, no mixing error
    t = targets.table(rows, benches=("stress",))
    got = {r[1]: (r[2], r[4]) for r in t.body}
    assert got == {"same": ("6.00x", "met"), "split": ("2.00x", "MISSED")}


def test_rows_written_before_placements_read_as_unpinned() -> None:
    old = {"bench": "micro", "backend": "esem", "mode": "socket", "case": "post",
           "metric": "median", "value": 40.0, "unit": "us"}  # a results.json of before
    assert placements([old]) == ["unpinned"]
    assert lookup([old], case="post") == 40.0
    assert [t.title for t in micro.tables([old])] == [
        "micro: latency per operation, microseconds (esem socket mode) [placement unpinned]"]
