"""The report of ``esem bench all``: Markdown tables and PNG plots, made from the result
rows alone (so a ``results.json`` from any commit can be rendered again).

Every table and headline is made from one placement's rows (``common.per_placement``);
a plot holding several placements names each in its series labels and marks them with
their own marker shapes, and its title lists them.

Plots use matplotlib's Agg backend (no display); the rules they keep are written above
the plotting code. ``figures`` returns the matplotlib objects (the tests read them),
``plot_all`` writes them as PNGs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from esem.bench import latsem, loop, micro, peer, stress, targets
from esem.bench.common import (
    NO_MODE,
    UNPINNED,
    Row,
    Table,
    lookup,
    machine_line,
    num,
    of_placement,
    placement_of,
    placements,
)

KNOWN = {"micro": micro.tables, "loop": loop.tables, "latsem": latsem.tables,
         "stress": stress.tables, "peer": peer.tables}
PLOTS = ("latency_by_operation.png", "latency_by_pairs.png", "throughput.png")


def other_tables(results: Sequence[Row]) -> list[Table]:
    """Rows of benches this module does not know (e.g. ``app``), listed as they are."""
    out = []
    for bench in dict.fromkeys(r["bench"] for r in results if r["bench"] not in KNOWN):
        body = [[r["backend"], r["mode"], r["case"], r["metric"], num(r["value"], 3),
                 r["unit"]] for r in results if r["bench"] == bench]
        out.append(Table(f"{bench}", ["backend", "mode", "case", "metric", "value", "unit"],
                         body))
    return out


def headline(results: Sequence[Row]) -> list[str]:
    """The few ratios the project's goals are stated in, for each placement and esem mode
    measured (each from that placement's rows alone)."""
    lines = []
    for pl in placements(results):
        lines += [f"- placement {pl}:"] + [f"  {line}" for line in
                                          _headline(of_placement(results, pl))]
    return lines


def _headline(results: Sequence[Row]) -> list[str]:
    lines = []
    floor = lookup(results, bench="micro", backend="floor", case=micro.UDS_FLOOR,
                   metric="median")
    for mode in sorted({r["mode"] for r in results if r["backend"] == "esem"}):
        def e(bench: str, case: str, metric: str, m: str = mode) -> float | None:
            return lookup(results, bench=bench, backend="esem", mode=m, case=case,
                          metric=metric)

        for op in ("post", "wait"):
            v = e("micro", op, "median")
            if v is not None and floor:
                lines.append(f"- esem {mode} `{op}`: {v:.1f} us median = **{v / floor:.2f}x** "
                             f"the bare Unix-socket round trip ({floor:.1f} us; target 1.5x)")
        svc = e("micro", "post/service-cpu", "cpu_per_mop")
        if svc:
            lines.append(f"- esem {mode} service CPU per call, one call at a time (micro "
                         f"post): {svc:.1f} us = **{1e6 / svc:,.0f} operations/s per "
                         "service core** at that cost (target 50,000)")
        for case in peer.THROUGHPUT_CASES:
            busy = e("peer", f"{case}/service-cpu", "cpu_per_mop")
            if busy:
                lines.append(f"- esem {mode} service CPU per call under load (peer {case}): "
                             f"{busy:.1f} us = **{1e6 / busy:,.0f} operations/s per service "
                             "core**")
        h, lh = e("micro", "handoff", "median"), lookup(results, bench="micro",
                                                        backend="legacy", case="handoff",
                                                        metric="median")
        if h is not None and lh:
            lines.append(f"- esem {mode} cross-process hand-off (micro): {h:.1f} us vs legacy "
                         f"{lh:.1f} us ({h / lh:.1f}x)")
        for case in dict.fromkeys(r["case"] for r in results
                                  if r["bench"] == "stress" and r["metric"] == "ops_per_s"):
            s = e("stress", case, "ops_per_s")
            ls = lookup(results, bench="stress", backend="legacy", case=case,
                        metric="ops_per_s")
            if s is not None and ls:
                lines.append(f"- stress ({case}): esem {mode} {s:,.0f} ops/s vs legacy "
                             f"{ls:,.0f} ops/s ({100 * s / ls:.1f}% of legacy)")
        rh = lookup(results, bench="peer", backend="redis", case="handoff", metric="median")
        ph = e("peer", "handoff", "median")
        if rh and ph is not None:
            lines.append(f"- hand-off (peer): esem {mode} {ph:.1f} us vs Redis {rh:.1f} us "
                         f"({ph / rh:.2f}x)")
    return lines


def markdown(report: dict[str, Any], plots: Sequence[str] = (),
             notes: Sequence[str] = (), others: Sequence[Table] | None = None) -> str:
    """The report; ``others`` renders the benches this module does not know (default:
    their rows as they are)."""
    results = report["results"]
    parts = ["# esem benchmark report", "", machine_line(report["machine"]), "",
             f"Recorded {report['machine'].get('timestamp', '')}; every figure measured in "
             "this run, esem beside legacy POSIX semaphores on the same machine. Ratios "
             "carry across machines; absolute numbers do not. Benchmarks never pass or "
             "fail on a time.", ""]
    head = headline(results)
    if head:
        parts += ["## Headline", "", *head, ""]
    parts += ["## Targets", "", targets.table(results).markdown()]
    parts += [*(f"> {n}" for n in notes), ""] if notes else []
    parts += ["## Tables", ""]
    for bench, make in KNOWN.items():
        if any(r["bench"] == bench for r in results):
            parts += [t.markdown() for t in make(results)]
    parts += [t.markdown() for t in (other_tables(results) if others is None else others)]
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})\n" for p in plots]
    return "\n".join(parts)


# ------------------------------------------------------------------ plots
#
# Rules every figure keeps, so a reader can trust it: values are markers, never bars (a
# bar's length means nothing on a log axis, and these axes must be log: esem and legacy
# differ by orders of magnitude); a log axis says so in its label; a latency is shown as
# its median with a whisker up to its p99; one axis carries one unit; the legend sits
# outside the axes, over nothing; a smoke run is stamped across every figure.


COLORS = {"legacy": "tab:blue", "esem socket": "tab:orange", "esem switchless": "tab:red",
          "redis": "tab:green", "stress-ng": "tab:purple", "floor": "black"}
SERIES_ORDER = ("legacy", "esem socket", "esem switchless", "redis", "stress-ng")
SMOKE_MARK = "SMOKE RUN: sizes too small to compare"
SMOKE_GID = "smoke-marker"
LATENCY_LABEL = "latency, microseconds (log scale)"
THROUGHPUT_LABEL = "operations per second (log scale)"
STYLES = ("-", "--", ":", "-.")


MARKERS = {"same": "o", "split": "s", UNPINNED: "D"}


def _series_key(r: Row, placed: bool = False) -> str:
    """The series a row belongs to; ``placed``: the figure holds several placements,
    so the placement is part of it."""
    return (str(r["backend"]) + (f" {r['mode']}" if r["mode"] != NO_MODE else "")
            + (f", {placement_of(r)}" if placed else ""))


def _base(series: str) -> str:
    return series.split(",")[0]


def _color(series: str) -> str | None:
    return COLORS.get(_base(series))


def _marker(series: str) -> str:
    """The marker of a series: its placement's shape (a circle without one)."""
    parts = series.split(", ")
    return MARKERS.get(parts[1], "o") if len(parts) > 1 else "o"


def _ordered(series: Sequence[str]) -> list[str]:
    rank = {s: i for i, s in enumerate(SERIES_ORDER)}
    return sorted(dict.fromkeys(series), key=lambda s: (rank.get(_base(s), len(rank)), s))


def _placed(rows: Sequence[Row]) -> bool:
    return len(placements(rows)) > 1


def _placement_title(rows: Sequence[Row]) -> str:
    return f"\nplacement: {', '.join(placements(rows))}"


def _value(rows: Sequence[Row], series: str, case: str, metric: str) -> float | None:
    placed = _placed(rows)
    return next((float(r["value"]) for r in rows if _series_key(r, placed) == series
                 and r["case"] == case and r["metric"] == metric), None)


def _legend_outside(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
              frameon=False)


def _mark_smoke(fig: Any, report: dict[str, Any]) -> None:
    """A red banner above the axes (over no data) on every figure of a smoke run."""
    if report["machine"].get("smoke"):
        fig.text(0.5, 1.0, SMOKE_MARK, ha="center", va="bottom", fontsize=14, color="red",
                 weight="bold", gid=SMOKE_GID)


def _plain_log_ticks(ax: Any) -> None:
    """Log-axis tick labels as plain numbers (600, not 6x10^2); when fewer than two powers
    of ten fall inside the axis, 2x and 5x ticks are labelled too, so it is readable."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator

    def plain(v: float, _: object) -> str:
        return f"{v:,.0f}" if v >= 10 else f"{v:g}"

    ax.yaxis.set_major_formatter(FuncFormatter(plain))
    lo, hi = ax.get_ylim()
    if math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) + 1 < 2:
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FuncFormatter(plain))


def _whiskers(ax: Any, xs: list[float], med: list[float], p99: list[float | None],
              **style: Any) -> None:
    """Markers at the medians, whiskers up to the p99s (none where no p99 was recorded)."""
    up = [0.0 if q is None else max(0.0, q - m) for m, q in zip(med, p99, strict=True)]
    ax.errorbar(xs, med, yerr=[[0.0] * len(med), up], capsize=3, elinewidth=1, **style)


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The figures that have data, by file name (matplotlib Figure objects, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: list[Row] = report["results"]
    out = {}
    for name, fn in ((PLOTS[0], _plot_ops), (PLOTS[1], _plot_pairs),
                     (PLOTS[2], _plot_throughput)):
        fig = fn(plt, results)
        if fig is not None:
            _mark_smoke(fig, report)
            out[name] = fig
    return out


def plot_all(report: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs that have data; return their file names."""
    import matplotlib.pyplot as plt

    made = []
    for name, fig in figures(report).items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append(name)
    return made


def _plot_ops(plt: Any, results: Sequence[Row]) -> Any:
    """Latency by operation: micro (legacy, esem per mode) and Redis from peer."""
    rows = [r for r in results if r["metric"] in ("median", "p99") and r["unit"] == "us" and (
        (r["bench"] == "micro" and r["backend"] in ("legacy", "esem"))
        or (r["bench"] == "peer" and r["backend"] == "redis"))]
    if not rows:
        return None
    cases = list(micro.CASES)
    series = _ordered([_series_key(r, _placed(rows)) for r in rows])
    fig, ax = plt.subplots(figsize=(10, 5))
    step = 0.8 / len(series)
    for i, s in enumerate(series):
        xs, med, p99 = [], [], []
        for j, case in enumerate(cases):
            m = _value(rows, s, case, "median")
            if m:
                xs.append(j + (i - (len(series) - 1) / 2) * step)
                med.append(m)
                p99.append(_value(rows, s, case, "p99"))
        _whiskers(ax, xs, med, p99, fmt=_marker(s), color=_color(s), label=s)
    for k, pl in enumerate(placements(rows)):
        floor = lookup(of_placement(results, pl), bench="micro", backend="floor",
                       case=micro.UDS_FLOOR, metric="median")
        if floor:
            ax.axhline(floor, color="black", linestyle=STYLES[k % len(STYLES)], linewidth=1,
                       label=f"floor ({pl}): bare Unix-socket\nround trip, median "
                       f"({floor:.1f} us)")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    ax.set_yscale("log")
    ax.set_ylabel(LATENCY_LABEL)
    _plain_log_ticks(ax)
    ax.set_title("Latency by operation (marker: median; whisker: up to p99)"
                 + _placement_title(rows))
    ax.grid(axis="y", which="major", alpha=0.3)
    _legend_outside(ax)
    return fig


def _pairs_of(case: str) -> int:
    return int(case.split(",")[0].split("=")[1])


def _plot_pairs(plt: Any, results: Sequence[Row]) -> Any:
    rows = [r for r in results if r["bench"] == "latsem" and r["metric"] in ("median", "p99")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 5))
    restarts = list(dict.fromkeys(r["case"].split(",")[1] for r in rows))
    placed = _placed(rows)
    for s in _ordered([_series_key(r, placed) for r in rows]):
        for k, rs in enumerate(restarts):
            cases = sorted({r["case"] for r in rows if _series_key(r, placed) == s
                            and r["case"].split(",")[1] == rs}, key=_pairs_of)
            xs, med, p99 = [], [], []
            for case in cases:
                m = _value(rows, s, case, "median")
                if m is not None:
                    xs.append(float(_pairs_of(case)))
                    med.append(m)
                    p99.append(_value(rows, s, case, "p99"))
            if xs:
                _whiskers(ax, xs, med, p99, fmt=_marker(s), linestyle=STYLES[k % len(STYLES)],
                          color=_color(s), label=f"{s}, {rs}")
    pairs = sorted({_pairs_of(r["case"]) for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(p) for p in pairs])
    ax.minorticks_off()
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("process pairs (log2 scale)")
    ax.set_ylabel("one-way hand-off " + LATENCY_LABEL)
    ax.set_title("Ping-pong latency by pairs and restart ratio\n(marker: median of the "
                 "repetitions; whisker: up to their p99)" + _placement_title(rows))
    ax.grid(axis="y", which="major", alpha=0.3)
    _legend_outside(ax)
    return fig


def _plot_throughput(plt: Any, results: Sequence[Row]) -> Any:
    """Operations per second of whole runs (one run each: no spread to show). The
    stressor's rows, not the service-capacity row: that one measures another thing
    (pipelined pre-encrypted load) and is in the tables."""
    panels: list[tuple[str, Callable[[Row], bool]]] = [
        ("stress-ng semaphore stressor",
         lambda r: r["bench"] == "stress" and r["case"] != stress.CAPACITY_CASE),
        ("wait+post, several processes", lambda r: r["bench"] == "peer")]
    used = [(t, f) for t, f in panels
            if any(f(r) and r["metric"] == "ops_per_s" for r in results)]
    if not used:
        return None
    fig, axes = plt.subplots(1, len(used), figsize=(7 * len(used), 5), squeeze=False)
    for ax, (title, keep) in zip(axes[0], used, strict=True):
        rows = [r for r in results if keep(r) and r["metric"] == "ops_per_s"]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        series = _ordered([_series_key(r, _placed(rows)) for r in rows])
        step = 0.8 / len(series)
        for i, s in enumerate(series):
            xs, ys = [], []
            for j, case in enumerate(cases):
                v = _value(rows, s, case, "ops_per_s")
                if v:
                    xs.append(j + (i - (len(series) - 1) / 2) * step)
                    ys.append(v)
            ax.plot(xs, ys, _marker(s), markersize=8, color=_color(s), label=s)
        ax.set_xticks(range(len(cases)), [c.replace(",", "\n") for c in cases], fontsize=8)
        ax.set_xlim(-0.6, len(cases) - 0.4)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_ylabel(THROUGHPUT_LABEL)
        ax.set_title(f"{title}\n(one run each)" + _placement_title(rows))
        ax.grid(axis="y", which="major", alpha=0.3)
        _legend_outside(ax)
    fig.tight_layout()
    return fig
