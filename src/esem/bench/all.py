"""``esem bench all --out DIR``: every benchmark in one run, one report.

Runs micro, loop, latsem and stress once per placement (``--placement``, default both),
and peer (and the application benchmark when the module ``esem.bench.app`` exists)
unpinned, then writes ``DIR/results.json`` (the same schema as each command's ``--json``,
all rows), ``DIR/report.md`` (the performance targets per placement, Markdown tables with the
esem/legacy and esem/floor ratios, each table one placement's) and the PNG plots. A
benchmark that cannot run on this machine (no ``redis-server`` for peer) is skipped with
a note in the report; one that fails stops the run, since a partial report would hide
it.

The application benchmark plugs in by contract, not by edits here or in the CLI: the
module ``esem.bench.app`` provides ``run(opts: esem.bench.common.Options, args:
argparse.Namespace | None = None) -> list[Row]``, rows in the common schema (``bench``
"app"), honouring ``opts.socket``, ``opts.modes`` and ``opts.smoke`` (``args`` is None
here, the parsed options under ``esem bench app``). Optional: ``add_arguments(parser)``
for options of its own, ``tables(results) -> list[Table]`` for the report and the
console (without it the app rows are listed as they are).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from esem.bench import latsem, loop, micro, peer, report, stress, targets
from esem.bench.common import (
    APP_MODULE,
    Options,
    Row,
    Table,
    UsageError,
    app_module,
    emit,
    make_report,
    phase,
    progress,
    write_json,
)

STEPS = ("micro", "loop", "latsem", "stress", "peer", "app")


def parse_skip(text: str) -> frozenset[str]:
    """``--skip micro,app`` as a set of step names; an unknown name is a usage error."""
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - set(STEPS))
    if unknown:
        raise UsageError(f"no benchmark {', '.join(unknown)} "
                         f"(choose from {', '.join(STEPS)})")
    return names


def run(opts: Options, out: str, skip: frozenset[str] = frozenset()) -> int:
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = [f"{name} skipped (--skip)" for name in STEPS if name in skip]
    results: list[Row] = []
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("micro", lambda: micro.collect(opts)),
        ("loop", lambda: loop.collect(opts)),
        ("latsem", lambda: latsem.collect(opts)),
        ("stress", lambda: stress.collect(opts)),
    ]
    steps = [(name, step) for name, step in steps if name not in skip]
    if "peer" not in skip:
        if shutil.which("redis-server"):
            steps.append(("peer", lambda: peer.collect(opts)))
        else:
            notes.append("peer skipped: redis-server is not installed "
                         "(apt-get install redis-server)")
            progress(notes[-1])
    app = None if "app" in skip else app_module()
    if app is not None:
        steps.append(("app", lambda: list(app.run(opts))))
    elif "app" not in skip:
        notes.append(f"app skipped: {APP_MODULE} is not part of this build")
        progress(notes[-1])
    with phase("all", len(steps)) as ph:
        for name, step in steps:
            ph.step(f"all: {name} ...")
            results += step()
    rep = make_report(opts, results)
    write_json(rep, str(outdir / "results.json"))
    others: list[Table] = (app.tables(results) if app is not None and hasattr(app, "tables")
                           else report.other_tables(results))
    plots = report.plot_all(rep, outdir)
    (outdir / "report.md").write_text(report.markdown(rep, plots, notes, others))
    tables = [t for bench, make in report.KNOWN.items()
              if any(r["bench"] == bench for r in results) for t in make(results)]
    emit(rep, [targets.table(results), *tables, *others], None)
    progress(f"all: wrote {outdir / 'results.json'}, {outdir / 'report.md'} and "
             f"{len(plots)} plots")
    return 0
