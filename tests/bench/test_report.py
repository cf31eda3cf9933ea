"""The report's figures, read back from the matplotlib objects ``report.figures`` makes:
no bars on any axis, log axes labelled as log, latencies with p99 whiskers, one unit
per axis, legends outside the axes, and the smoke banner exactly on smoke runs.

The rows are built with ``esem.bench.common.row`` in the exact schema every benchmark
writes (values chosen, not measured: what is checked is the drawing, not the speed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from esem.bench import micro, peer, report
from esem.bench.common import Row, row
from esem.bench.stress import CAPACITY_CASE


def _rows() -> list[Row]:
    rows: list[Row] = []
    for i, case in enumerate(micro.CASES):
        for backend, mode, base in (("legacy", "-", 1.0), ("esem", "socket", 50.0)):
            rows += [row("micro", backend, mode, case, "median", base + i, "us"),
                     row("micro", backend, mode, case, "p99", 3 * (base + i), "us")]
        rows.append(row("micro", "esem", "socket", f"{case}/client-cpu", "cpu_per_mop", 30,
                        "s"))
    rows += [row("micro", "floor", "-", "uds-roundtrip", "median", 13.0, "us"),
             row("micro", "floor", "-", "uds-roundtrip", "p99", 20.0, "us")]
    for p in (1, 2, 4):
        for r in ("0", "0.3"):
            case = f"pairs={p},restart={r}"
            for backend, mode, base in (("legacy", "-", 5.0), ("esem", "socket", 90.0)):
                rows += [row("latsem", backend, mode, case, "median", base * p, "us"),
                         row("latsem", backend, mode, case, "p99", 2 * base * p, "us")]
    case = "workers=2,threads=2"
    rows += [row("stress", "legacy", "-", case, "ops_per_s", 270_000, "ops/s"),
             row("stress", "esem", "socket", case, "ops_per_s", 4_500, "ops/s"),
             row("stress", "esem", "socket", case, "calls_per_s", 9_000, "calls/s"),
             row("stress", "stress-ng", "-", case, "ops_per_s", 135_000, "ops/s"),
             row("stress", "esem", "socket", CAPACITY_CASE, "ops_per_s", 74_000, "ops/s"),
             row("stress", "esem", "socket", CAPACITY_CASE, "ops_per_cpu_s", 87_000,
                 "ops/s")]
    for backend, mode in (("legacy", "-"), ("redis", "-"), ("esem", "socket")):
        for c in peer.LATENCY_CASES:
            rows += [row("peer", backend, mode, c, "median", 80, "us"),
                     row("peer", backend, mode, c, "p99", 200, "us")]
        for c in peer.THROUGHPUT_CASES:
            rows.append(row("peer", backend, mode, c, "ops_per_s", 20_000, "ops/s"))
    return rows


def _report(smoke: bool) -> dict[str, Any]:
    return {"machine": {"smoke": smoke, "cpu": "x", "cores": 2}, "results": _rows()}


@pytest.fixture(scope="module")
def figs() -> dict[str, Any]:
    return report.figures(_report(smoke=False))


def _axes(figs: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(name, ax) for name, fig in figs.items() for ax in fig.axes]


def test_every_plot_is_made(figs: dict[str, Any]) -> None:
    assert set(figs) == set(report.PLOTS)


def test_no_bars_and_log_axes_say_so(figs: dict[str, Any]) -> None:
    for name, ax in _axes(figs):
        assert not any(isinstance(c, BarContainer) for c in ax.containers), name
        assert not ax.patches, name  # no bars of any kind
        for axis, label in ((ax.yaxis, ax.get_ylabel()), (ax.xaxis, ax.get_xlabel())):
            if axis.get_scale() == "log":
                assert "log" in label and "scale" in label, (name, label)
        assert ax.get_yscale() == "log", name


def test_latencies_show_median_and_p99(figs: dict[str, Any]) -> None:
    for name in ("latency_by_operation.png", "latency_by_pairs.png"):
        (ax,) = figs[name].axes
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        labels = [c.get_label() for c in bars]
        expected = ({"legacy", "esem socket", "redis"} if name.startswith("latency_by_op")
                    else {f"{s}, restart={r}" for s in ("legacy", "esem socket")
                          for r in ("0", "0.3")})
        assert set(labels) == expected, (name, labels)
        for c in bars:
            line, _caps, (whiskers,) = c.lines
            medians = list(line.get_ydata())
            tops = [seg[1][1] for seg in whiskers.get_segments()]
            assert len(tops) == len(medians) > 0
            assert all(t > m for t, m in zip(tops, medians, strict=True)), c.get_label()
        assert "median" in ax.get_title() and "p99" in ax.get_title()


def test_one_unit_per_axis(figs: dict[str, Any]) -> None:
    units = {"microseconds": "us", "operations per second": "ops/s"}
    for name, ax in _axes(figs):
        found = [u for word, u in units.items() if word in ax.get_ylabel()]
        assert len(found) == 1, (name, ax.get_ylabel())
    # the pipelined capacity row measures something else: it is not on the stressor panel
    stressor = figs["throughput.png"].axes[0]
    labels = [t.get_text() for t in stressor.get_xticklabels()]
    assert CAPACITY_CASE not in labels and labels


def test_legends_are_outside_the_axes(figs: dict[str, Any]) -> None:
    for name, fig in figs.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            legend = ax.get_legend()
            assert legend is not None, name
            box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
            assert box.x0 >= area.x1, (name, box, area)  # right of the plotting area


def test_smoke_runs_are_marked_and_full_runs_are_not(figs: dict[str, Any],
                                                    tmp_path: Path) -> None:
    def marks(fig: Any) -> list[str]:
        return [t.get_text() for t in fig.texts if t.get_gid() == report.SMOKE_GID]

    assert all(marks(f) == [] for f in figs.values())
    smoke = report.figures(_report(smoke=True))
    for name, fig in smoke.items():
        assert marks(fig) == [report.SMOKE_MARK], name
        (text,) = [t for t in fig.texts if t.get_gid() == report.SMOKE_GID]
        assert text.get_position()[1] >= 1.0, name  # above the axes, over no data
    written = report.plot_all(_report(smoke=True), tmp_path)
    assert written == list(report.PLOTS)
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
