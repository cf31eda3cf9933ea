"""The fast data path's five performance targets, judged per placement from one run's rows.

Each target is a ratio of two rows (or one row's figure) of one placement of one run,
beside the CPU per operation of the rows it is about (a fast path that burns both cores
is not a win). A target whose rows this build does not produce yet reads "not measured
(missing: ROW)", naming the row by bench/backend/mode/case/metric, so the table fills in
when the row exists. The rows read:

1. ``micro/esem/socket/native/{post,wait}/median`` over
   ``micro/floor/-/native-aead-roundtrip/median``: <= 1.5x, both placements;
2. ``micro/esem/socket/{post,wait}/median`` (the Python API, whatever client it rides on)
   over ``micro/floor/-/uds-aead-roundtrip/median``: <= 1.5x, both placements;
3. ``micro/esem/socket/post/service-cpu/cpu_per_mop`` (and ``native/post/service-cpu``):
   <= 10 us of service CPU per post;
4. ``micro/esem/switchless/native/post/median`` (the native switchless client) over
   ``micro/legacy/-/native/handoff/median`` (legacy's cross-process hand-off, from C):
   <= 0.5x at split placement;
5. ``stress/esem/switchless/CASE/ops_per_s`` over ``stress/esem/socket/CASE/ops_per_s``
   for each stressor CASE: >= 5x, both placements.

A missed target shows why beside it: the CPU the client and the service spent per call
against the latency. CPU near the latency means the work is the cost (profile the code);
CPU far below it means waiting is (wake-ups, vCPU crossings: the placement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from esem.bench.common import (
    CLIENT_CPU,
    NO_MODE,
    SAME,
    SERVICE_CPU,
    SPLIT,
    UNPINNED,
    Row,
    Table,
    lookup,
    num,
    of_placement,
    placements,
)

BOTH = (SAME, SPLIT)
STRESS_CAPACITY = "capacity"  # stress.CAPACITY_CASE: not a stressor case


@dataclass(frozen=True)
class Ref:
    """One row by name."""

    bench: str
    backend: str
    mode: str
    case: str
    metric: str

    def name(self) -> str:
        return "/".join((self.bench, self.backend, self.mode, self.case, self.metric))

    def get(self, rows: Sequence[Row]) -> float | None:
        return lookup(rows, bench=self.bench, backend=self.backend, mode=self.mode,
                      case=self.case, metric=self.metric)

    def cpu(self, suffix: str) -> Ref:
        """The CPU row of this row's case."""
        return Ref(self.bench, self.backend, self.mode, f"{self.case}/{suffix}",
                   "cpu_per_mop")


@dataclass(frozen=True)
class Goal:
    """A figure, its target (``op`` ``limit`` in ``unit``), where it is judged."""

    figure: str
    num: Ref
    den: Ref | None  # None: the figure is ``num`` itself
    op: str  # "<=" or ">="
    limit: float
    unit: str  # "x" (a ratio) or "us"
    judged: tuple[str, ...] = BOTH
    latency: bool = True  # num is a latency: the CPU-against-latency diagnosis applies
    about: Ref | None = None  # the row whose CPU is shown beside (default: num)

    def cpu_of(self) -> Ref:
        return self.about or self.num

    def target(self) -> str:
        where = "both placements" if self.judged == BOTH else f"{'/'.join(self.judged)} only"
        return f"{self.op} {self.limit:g}{'x' if self.unit == 'x' else ' us'} ({where})"


def _micro(backend: str, mode: str, case: str, metric: str = "median") -> Ref:
    return Ref("micro", backend, mode, case, metric)


def goals(results: Sequence[Row]) -> list[Goal]:
    """The targets, the stressor's expanded to every case this run measured."""
    native_floor = _micro("floor", NO_MODE, "native-aead-roundtrip")
    py_floor = _micro("floor", NO_MODE, "uds-aead-roundtrip")
    out = [Goal(f"native-client socket {op} / native UDS round trip with AEAD",
                _micro("esem", "socket", f"native/{op}"), native_floor, "<=", 1.5, "x")
           for op in ("post", "wait")]
    out += [Goal(f"Python-API socket {op} / Python UDS round trip with AEAD",
                 _micro("esem", "socket", op), py_floor, "<=", 1.5, "x")
            for op in ("post", "wait")]
    out += [Goal(f"service CPU per post, socket ({who})",
                 _micro("esem", "socket", f"{case}/{SERVICE_CPU}", "cpu_per_mop"), None, "<=",
                 10.0, "us", latency=False, about=_micro("esem", "socket", case))
            for who, case in (("Python API", "post"), ("native client", "native/post"))]
    out.append(Goal("native-client switchless post / legacy cross-process hand-off (C)",
                    _micro("esem", "switchless", "native/post"),
                    _micro("legacy", NO_MODE, "native/handoff"), "<=", 0.5, "x",
                    judged=(SPLIT,)))
    cases = list(dict.fromkeys(
        r["case"] for r in results if r["bench"] == "stress" and r["backend"] == "esem"
        and r["metric"] == "ops_per_s" and r["case"] != STRESS_CAPACITY)) or ["CASE"]
    for case in cases:
        switchless = Ref("stress", "esem", "switchless", case, "ops_per_s")
        out.append(Goal(f"stress ops/s, esem switchless / esem socket ({case})", switchless,
                        Ref("stress", "esem", "socket", case, "ops_per_s"), ">=", 5.0, "x",
                        latency=False, about=switchless))
    return out


def _verdict(g: Goal, placement: str, value: float) -> str:
    if placement not in g.judged:
        return ("not judged: unpinned" if placement == UNPINNED
                else f"not judged at {placement}")
    ok = value <= g.limit if g.op == "<=" else value >= g.limit
    return "met" if ok else "MISSED"


def _why(g: Goal, rows: Sequence[Row]) -> str | None:
    """For a missed latency target: the CPU per call against the latency."""
    lat = g.num.get(rows)
    cc, sc = g.num.cpu(CLIENT_CPU).get(rows), g.num.cpu(SERVICE_CPU).get(rows)
    if not g.latency or lat is None or not lat or (cc is None and sc is None):
        return None
    busy = (cc or 0.0) + (sc or 0.0)
    kind = ("the work itself is the cost: profile the client and service code"
            if busy >= 0.6 * lat else "waiting is the cost (wake-ups and vCPU crossings), "
            "not the work")
    return (f"{g.num.case}: {lat:.1f} us latency, CPU per call {num(cc, 1)} us client + "
            f"{num(sc, 1)} us service ({100 * busy / lat:.0f}% of the latency): {kind}")


def table(results: Sequence[Row], benches: Sequence[str] | None = None) -> Table:
    """Every target (of ``benches``' rows only, when given) for each placement of the
    run, each figure computed from that placement's rows alone."""
    gs = [g for g in goals(results)
          if benches is None or g.num.bench in benches]
    wanted = {g.num.bench for g in gs}
    run = placements([r for r in results if r["bench"] in wanted]) or list(BOTH)
    body: list[list[str]] = []
    notes: list[str] = []
    for g in gs:
        for pl in run:
            rows = of_placement(results, pl)
            v, d = g.num.get(rows), g.den.get(rows) if g.den else 1.0
            cc = g.cpu_of().cpu(CLIENT_CPU).get(rows)
            sc = g.cpu_of().cpu(SERVICE_CPU).get(rows)
            if v is None or not d:
                missing = [r.name() for r in (g.num, g.den) if r is not None
                           and r.get(rows) is None]
                body.append([g.figure, pl, "-", g.target(),
                             f"not measured (missing: {', '.join(missing)})", "-", "-"])
                continue
            value = v / d
            shown = f"{value:.2f}x" if g.unit == "x" else f"{value:.1f} us"
            verdict = _verdict(g, pl, value)
            body.append([g.figure, pl, shown, g.target(), verdict, num(cc, 1), num(sc, 1)])
            why = _why(g, rows) if verdict == "MISSED" else None
            if why is not None:
                notes.append(f"missed at {pl}: {why}")
    notes.append("every figure is a median (or CPU per call) of one placement's rows of this "
                 "run; ratios never mix placements or runs; cpu: CPU microseconds per call "
                 "of the client(s) and the service, for the figure's own row (a ratio's "
                 "numerator)")
    return Table("performance targets: measured per placement",
                 ["figure", "placement", "measured", "target", "verdict", "client cpu",
                  "service cpu"], body, notes, right=[2, 5, 6], wrap={0: 44, 4: 64})
