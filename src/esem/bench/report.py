"""The report of ``esem bench all``: Markdown tables and PNG plots, made from the result
rows alone (so a ``results.json`` from any commit can be rendered again).

Plots use matplotlib's Agg backend (no display). Latencies are on log scales: esem and
legacy differ by orders of magnitude, and the ratios are what carries across machines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from esem.bench import latsem, micro, peer, stress
from esem.bench.common import NO_MODE, Row, Table, lookup, machine_line, num

KNOWN = {"micro": micro.tables, "latsem": latsem.tables, "stress": stress.tables,
         "peer": peer.tables}
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
    """The few ratios the project's goals are stated in, for each esem mode measured."""
    lines = []
    floor = lookup(results, bench="micro", backend="floor", metric="median")
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


COLORS = {"legacy": "tab:blue", "esem socket": "tab:orange", "esem switchless": "tab:red",
          "redis": "tab:green", "stress-ng": "tab:purple", "floor": "black"}


def _series_key(r: Row) -> str:
    return str(r["backend"]) + (f" {r['mode']}" if r["mode"] != NO_MODE else "")


def _color(series: str) -> str | None:
    return COLORS.get(series)


def plot_all(report: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs that have data; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: list[Row] = report["results"]
    made = []
    for name, fn in ((PLOTS[0], _plot_ops), (PLOTS[1], _plot_pairs),
                     (PLOTS[2], _plot_throughput)):
        fig = fn(plt, results)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            made.append(name)
    return made


def _plot_ops(plt: Any, results: Sequence[Row]) -> Any:
    """Median latency by operation: micro (legacy, esem per mode) and Redis from peer."""
    rows = [r for r in results if r["metric"] == "median" and (
        (r["bench"] == "micro" and r["backend"] in ("legacy", "esem"))
        or (r["bench"] == "peer" and r["backend"] == "redis"))]
    if not rows:
        return None
    cases = list(micro.CASES)
    series = list(dict.fromkeys(_series_key(r) for r in rows))
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        xs, ys = [], []
        for j, case in enumerate(cases):
            v = next((r["value"] for r in rows if _series_key(r) == s and r["case"] == case),
                     None)
            if v:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=s, color=_color(s))
    floor = lookup(results, bench="micro", backend="floor", metric="median")
    if floor:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1,
                   label=f"floor: Unix-socket round trip ({floor:.1f} us)")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_yscale("log")
    ax.set_ylabel("median latency (us, log scale)")
    ax.set_title("Latency by operation")
    ax.legend(fontsize=8)
    return fig


def _plot_pairs(plt: Any, results: Sequence[Row]) -> Any:
    rows = [r for r in results if r["bench"] == "latsem" and r["metric"] == "median"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    restarts = list(dict.fromkeys(r["case"].split(",")[1] for r in rows))
    for s in dict.fromkeys(_series_key(r) for r in rows):
        for k, rs in enumerate(restarts):
            pts = sorted((int(r["case"].split(",")[0].split("=")[1]), r["value"])
                         for r in rows if _series_key(r) == s and r["case"].split(",")[1] == rs)
            if pts:
                ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o",
                        linestyle=styles[k % len(styles)], color=_color(s),
                        label=f"{s}, {rs}")
    pairs = sorted({int(r["case"].split(",")[0].split("=")[1]) for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(p) for p in pairs])
    ax.set_yscale("log")
    ax.set_xlabel("process pairs")
    ax.set_ylabel("one-way hand-off latency (us, log scale)")
    ax.set_title("Ping-pong latency by pairs and restart ratio")
    ax.legend(fontsize=8)
    return fig


def _plot_throughput(plt: Any, results: Sequence[Row]) -> Any:
    panels: list[tuple[str, Callable[[Row], bool]]] = [
        ("stress-ng semaphore stressor", lambda r: r["bench"] == "stress"),
        ("wait+post, several processes", lambda r: r["bench"] == "peer")]
    used = [(t, f) for t, f in panels
            if any(f(r) and r["metric"] == "ops_per_s" for r in results)]
    if not used:
        return None
    fig, axes = plt.subplots(1, len(used), figsize=(6 * len(used), 5), squeeze=False)
    for ax, (title, keep) in zip(axes[0], used, strict=True):
        rows = [r for r in results if keep(r) and r["metric"] == "ops_per_s"]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        series = list(dict.fromkeys(_series_key(r) for r in rows))
        width = 0.8 / len(series)
        for i, s in enumerate(series):
            xs, ys = [], []
            for j, case in enumerate(cases):
                v = next((r["value"] for r in rows
                          if _series_key(r) == s and r["case"] == case), None)
                if v:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=s, color=_color(s))
        ax.set_xticks(range(len(cases)), [c.replace(",", "\n") for c in cases], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("operations per second (log scale)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return fig
