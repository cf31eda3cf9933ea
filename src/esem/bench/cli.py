"""``esem bench ...``: the benchmark commands' options and dispatch.

``esem.cli`` calls ``register(subparsers)`` to add ``bench`` and ``run(args)`` to run
it, so the benchmarks' options live beside the benchmarks. Heavy imports (matplotlib,
redis) happen only in the command that needs them.

``peer`` and ``all`` need the ``bench`` extra (redis-py, matplotlib); without it they
exit 2 with the ``pip install`` line before measuring anything.

``esem bench app`` appears when the module ``esem.bench.app`` exists (the contract is in
``esem.bench.all``): it gets the common options here, any of its own through an optional
``add_arguments(parser)``, and runs as ``run(opts, args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import Any

from esem.bench import placement
from esem.bench.common import (
    MODES,
    BenchError,
    Options,
    UsageError,
    app_module,
    parse_modes,
)
from esem.bench.progress import set_quiet

EXIT_FAILED, EXIT_USAGE = 1, 2

DESCRIPTION = """\
Benchmarks: every figure esem claims, measured in the same run beside legacy POSIX
semaphores (and, for peer, a Redis semaphore), so the ratios hold on any machine.
Each command runs on a fresh embedded esem service (a real daemon in a temporary
directory) unless --socket names a running one, prints progress on stderr (bars with
an ETA on a terminal, one line per step otherwise, none with --quiet) and a table on
stdout, and writes its rows as JSON with --json FILE ('-' for stdout). --smoke uses
tiny sizes (seconds), for CI. Benchmarks print numbers; they never fail on a time.
"""

JSON_SCHEMA = """\
JSON: {"machine": {cpu, cores, kernel, python, esem_mode, uvloop, esem_version,
placements, timestamp, ...}, "results": [{"bench", "backend"
(esem|legacy|floor|redis|stress-ng), "mode" (socket|switchless|-), "placement"
(same|split|unpinned), "case", "metric", "value", "unit"}, ...]}. CPU use is in rows
with metric cpu_per_mop (CPU seconds per million semaphore calls) and case suffixed
/client-cpu or /service-cpu. Every ratio is taken between rows of one placement.
Rows that know which esem client measured them (stress) also carry "client"
(python|native|preload).
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def _int_list(lo: int, hi: int) -> Any:
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of integers") from None
        for v in values:
            if not lo <= v <= hi:
                raise argparse.ArgumentTypeError(f"{v} is out of range {lo}..{hi}")
        return values
    return parse


def _probabilities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers") from None
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(
                f"{v:g} is not a probability: a restart ratio is in 0..1")
    return values


def _bounded(kind: type[int] | type[float], lo: float, hi: float) -> Any:
    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range {lo:g}..{hi:g}")
        return v
    return parse


def _common(p: argparse.ArgumentParser, modes: bool = True, placed: bool = False,
            mode_default: str = "socket") -> None:
    p.add_argument("--socket", metavar="PATH",
                   help="measure the running service at PATH instead of an embedded one "
                   "(its CPU is then shared with whatever else it serves; it is not "
                   "pinned: placement unpinned)")
    if modes:
        p.add_argument("--mode", choices=(*MODES, "both"), default=mode_default,
                       help=f"esem transport: socket, switchless (the shared-memory fast "
                       f"path; clients get ESEM_SWITCHLESS=1), or both (default "
                       f"{mode_default})")
    if placed:
        p.add_argument("--placement", choices=placement.CHOICES, default=placement.DEFAULT,
                       help=placement.HELP)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes that finish in seconds (for CI; not for comparison)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress on stderr (by default: bars with an ETA on a "
                   "terminal, one line per step otherwise)")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE",
                   help="also write the results as JSON to FILE ('-': stdout, and the "
                   "table goes to stderr)")


def register(sub: Any) -> None:
    """Add ``bench`` and its commands to ``esem``'s subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("bench", help="benchmarks (esem beside legacy, a peer and the floor)",
                       description=DESCRIPTION, epilog=JSON_SCHEMA, formatter_class=fmt)
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")

    b = bsub.add_parser(
        "micro", help="median and p99 latency of each operation", formatter_class=fmt,
        description=_wrap("Median and p99 latency of open, close, unlink, post, wait, trywait "
        "and getvalue for esem and legacy (uncontended: legacy takes glibc's user-space "
        "fast path), the hand-off between two processes, and the bare Unix-socket round "
        "trip between two Python processes (the floor of any socket design) and the "
        "same with a ChaCha20-Poly1305 seal and open each way, all in the same run, "
        "once per placement; plus the CPU per call of the clients and the service, and "
        "the performance targets that these rows decide, judged per placement."),
        epilog=JSON_SCHEMA)
    b.add_argument("-n", "--iterations", type=_bounded(int, 10, 10**7), metavar="N",
                   help="samples per operation (default 2000; smoke 30)")
    _common(b, placed=True)
    _json(b)

    b = bsub.add_parser(
        "loop", help="the time of a loop of a million post calls from Python",
        formatter_class=fmt,
        description=_wrap("One loop of N post calls from Python on one semaphore (a clock "
        "read before and after, nothing inside): esem through the Python API beside "
        "legacy posix_ipc, same run, per placement; wall time, time per call, and the "
        "CPU per call of the client and the service."), epilog=JSON_SCHEMA)
    b.add_argument("--calls", type=_bounded(int, 1, 10**8), metavar="N",
                   help="post calls in the loop (default 1,000,000; smoke 2,000)")
    _common(b, placed=True)
    _json(b)

    b = bsub.add_parser(
        "latsem", help="LMBench-style ping-pong between pairs of processes",
        formatter_class=fmt,
        description=_wrap("One-way semaphore hand-off latency (half a round trip) between the "
        "two processes of each pair, all pairs at once, median over repetitions; with a "
        "restart ratio: before each operation, with that probability, close the "
        "semaphore and open it again. esem beside legacy."), epilog=JSON_SCHEMA)
    b.add_argument("--pairs", type=_int_list(1, 32), metavar="P,P,...",
                   help="numbers of process pairs to run (1..32; default 1,2,4,8; "
                   "smoke 1,2)")
    b.add_argument("--restart", type=_probabilities, metavar="R,R,...",
                   help="restart probabilities per operation (0..1; default 0,0.1,0.3; "
                   "smoke 0,0.3)")
    b.add_argument("--reps", type=_bounded(int, 1, 1000), metavar="N",
                   help="repetitions per configuration (default 5; smoke 2)")
    b.add_argument("--rounds", type=_bounded(int, 1, 10**6), metavar="N",
                   help="round trips per repetition (default 200; smoke 20)")
    _common(b, placed=True)
    _json(b)

    b = bsub.add_parser(
        "stress", help="port of stress-ng's semaphore stressor (ops/s)",
        formatter_class=fmt,
        description=_wrap("stress-ng's --sem stressor, ported: one worker process per CPU, each "
        "with threads sharing one semaphore, looping {getvalue; trywait or a timed wait "
        "with a passed deadline, alternately; on success count a bogo op and post; "
        "yield}. Bogo ops/s for esem and legacy; and stress-ng --sem itself with the "
        "same workers when the stress-ng binary is on PATH."), epilog=JSON_SCHEMA)
    b.add_argument("--seconds", type=_bounded(float, 0.1, 3600), metavar="S",
                   help="run time per backend (default 5; smoke 0.5)")
    b.add_argument("--workers", type=_bounded(int, 1, 64), metavar="N",
                   help="worker processes (default: one per CPU)")
    b.add_argument("--threads", type=_bounded(int, 1, 64), metavar="N",
                   help="threads per worker sharing its semaphore (default 2, as "
                   "stress-ng's --sem-procs)")
    _common(b, placed=True)
    _json(b)

    b = bsub.add_parser(
        "peer", help="esem beside a Redis-backed semaphore", formatter_class=fmt,
        description=_wrap("A Redis semaphore (tokens in a list: wait = BLPOP, post = RPUSH, "
        "through redis-py) on a redis-server the benchmark starts on 127.0.0.1 "
        "(persistence off), beside esem and legacy: latency of post, wait and the "
        "hand-off between two processes, and wait+post throughput of several "
        "processes, uncontended and contended. Needs redis-server on PATH and the bench "
        "extra (pip install 'esem[bench]')."),
        epilog=JSON_SCHEMA)
    b.add_argument("-n", "--iterations", type=_bounded(int, 10, 10**7), metavar="N",
                   help="latency samples (default 2000; smoke 30)")
    b.add_argument("--procs", type=_bounded(int, 1, 64), metavar="N",
                   help="processes in the throughput runs (default 2 per CPU, at most 32; "
                   "smoke 2)")
    b.add_argument("--seconds", type=_bounded(float, 0.1, 3600), metavar="S",
                   help="duration of each throughput run (default 3; smoke 0.3)")
    _common(b)
    _json(b)

    b = bsub.add_parser(
        "restart", help="time from a service restart until every waiting client resumed",
        formatter_class=fmt,
        description=_wrap("N client sessions block in wait on one e-semaphore; the "
        "embedded service is SIGKILLed and started again on the same state directory "
        "(key and journal), and every client reconnects and resumes by itself. Median "
        "time from the restart until the service is ready and until the last client has "
        "resumed, per N. Needs the service's journal (a restart without one cannot be "
        "resumed)."), epilog=JSON_SCHEMA)
    b.add_argument("--clients", type=_int_list(1, 1000), metavar="N,N,...",
                   help="numbers of waiting clients (default 1,10,100; smoke 1,4)")
    b.add_argument("--reps", type=_bounded(int, 1, 100), metavar="N",
                   help="restarts per number of clients (default 3; smoke 1)")
    _common(b, modes=False)
    _json(b)

    b = bsub.add_parser(
        "journal", help="crash safety's cost: post latency and service CPU without a "
        "journal, on tmpfs, on disk with fsync; restart time", formatter_class=fmt,
        description=_wrap("Post latency (median, p99) and the service's CPU per post of "
        "three daemons in the same run: no journal, the journal on tmpfs, the journal on "
        "disk with --fsync; then the restart time (SIGKILL, then exec until listening) "
        "of a service holding 1, 1,000 and 100,000 semaphores in its journal."),
        epilog=JSON_SCHEMA)
    b.add_argument("-n", "--posts", type=_bounded(int, 10, 10**7), metavar="N",
                   help="posts per configuration (default 5000; smoke 200)")
    b.add_argument("--sizes", type=_int_list(1, 10**6), metavar="N,N,...",
                   help="semaphore counts for the restart times (default 1,1000,100000; "
                   "smoke 1,100)")
    _common(b, modes=False)
    _json(b)

    b = bsub.add_parser(
        "all", help="run every benchmark; write results.json, report.md and plots",
        formatter_class=fmt,
        description=_wrap("Run micro, loop, latsem and stress once per placement, and peer "
        "(and the application benchmark when esem.bench.app is installed) unpinned, "
        "with their default sizes, in both esem modes by default, then write "
        "OUT/results.json (all rows, the same schema), OUT/report.md (the targets "
        "table, Markdown tables with esem/legacy and esem/floor ratios, per placement) "
        "and PNG plots: latency by operation, latency by pairs and restart ratio, "
        "throughput. peer is skipped when redis-server is not installed. Needs the bench "
        "extra (matplotlib, redis-py: pip install 'esem[bench]')."), epilog=JSON_SCHEMA)
    b.add_argument("--out", required=True, metavar="DIR", help="directory for the report")
    b.add_argument("--skip", default=frozenset(), type=_skip, metavar="BENCH[,BENCH]",
                   help="leave these out (of: micro, loop, latsem, stress, peer, app); "
                   "the report says which were skipped")
    _common(b, placed=True, mode_default="both")

    app = _app()
    if app is not None:
        b = bsub.add_parser(
            "app", help="the application benchmark (esem.bench.app)", formatter_class=fmt,
            description=(app.__doc__ or "The application benchmark.").strip(),
            epilog=JSON_SCHEMA)
        if hasattr(app, "add_arguments"):
            app.add_arguments(b)
        _common(b)
        _json(b)
    p.set_defaults(bench_parser=p)


def _app() -> Any:
    return app_module()


def _skip(text: str) -> frozenset[str]:
    from esem.bench import all as all_benches

    try:
        return all_benches.parse_skip(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The Python packages of the ``bench`` extra each command imports (peer talks to Redis
# through redis-py; all also plots with matplotlib). A plain ``pip install .`` leaves
# them out, so they are checked before anything is measured, not minutes into a run.
NEEDS = {"peer": ("redis",), "all": ("matplotlib", "redis", "prometheus_client")}
EXTRA_HINT = "pip install 'esem[bench]'"


def missing_modules(command: str) -> list[str]:
    """The modules ``esem bench COMMAND`` needs that cannot be imported here."""
    missing = []
    for name in NEEDS.get(command, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def run(args: argparse.Namespace) -> int:
    """Run the ``bench`` command ``args`` names; its exit status."""
    if args.bench is None:
        args.bench_parser.print_help()
        return EXIT_USAGE
    set_quiet(getattr(args, "quiet", False))
    missing = missing_modules(args.bench)
    if missing:
        print(f"esem bench {args.bench}: needs the Python package(s) {', '.join(missing)} "
              f"of the bench extra, which this installation lacks; install it with: "
              f"{EXTRA_HINT}", file=sys.stderr)
        return EXIT_USAGE
    try:
        opts = Options(socket=getattr(args, "socket", None),
                       modes=parse_modes(getattr(args, "mode", "socket")),
                       smoke=getattr(args, "smoke", False),
                       placements=placement.parse(getattr(args, "placement", "unpinned")))
        if args.bench == "micro":
            from esem.bench import micro

            return micro.run(opts, args.iterations, args.json)
        if args.bench == "loop":
            from esem.bench import loop

            return loop.run(opts, args.json, args.calls)
        if args.bench == "latsem":
            from esem.bench import latsem

            return latsem.run(opts, args.json, args.pairs, args.restart, args.reps,
                              args.rounds)
        if args.bench == "stress":
            from esem.bench import stress

            return stress.run(opts, args.json, args.seconds, args.workers, args.threads)
        if args.bench == "peer":
            from esem.bench import peer

            return peer.run(opts, args.json, args.iterations, args.procs, args.seconds)
        if args.bench == "restart":
            from esem.bench import restart

            return restart.run(opts, args.json, args.clients, args.reps)
        if args.bench == "journal":
            from esem.bench import journal

            return journal.run(opts, args.json, args.posts, args.sizes)
        if args.bench == "all":
            from esem.bench import all as all_benches

            return all_benches.run(opts, args.out, args.skip)
        app = _app()
        if args.bench == "app" and app is not None:
            from esem.bench.common import emit, make_report
            from esem.bench.report import other_tables

            report = make_report(opts, list(app.run(opts, args)))
            tables = (app.tables(report["results"]) if hasattr(app, "tables")
                      else other_tables(report["results"]))
            emit(report, tables, args.json)
            return 0
    except UsageError as exc:
        print(f"esem bench {args.bench}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BenchError as exc:
        print(f"esem bench {args.bench}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    args.bench_parser.print_help()
    return EXIT_USAGE
