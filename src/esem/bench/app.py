"""``esem bench app``: real applications on esem, legacy beside esem.

Real servers from Debian's packages, each started and stopped by the benchmark in a
private directory on loopback, under three configurations in alternating order, several
repetitions each (median and spread): legacy (no preload), esem socket (``esem run
--all``) and esem switchless (the same with ESEM_SWITCHLESS=1, when the preload library
supports it; otherwise the row says why not):

- PostgreSQL + pgbench: TPC-B-like and select-only, tps; checked by pgbench's own
  counts and TPC-B's invariant (sum of account balances = sum of history deltas).
- Apache httpd, prefork MPM with ``Mutex posixsem default`` and two Listen ports (so
  that it really serializes accept on a semaphore), driven by ``ab`` at several
  concurrencies: requests/s and time per request; every response checked (ab's failed
  and non-2xx counts 0, every body its full length).
- ``stress-ng --sem``: bogo ops/s.
- The FILE VAULT (esem's own case study: its requests per second, legacy beside the
  Python client), every file verified byte for byte.
- Redis: not applicable when its binary imports no POSIX semaphore (checked here).

For each, the overhead in percent of legacy's requests per second (esem/legacy), the
semaphore operations per request or transaction and the service's CPU, both counted
by the service itself (its Prometheus counters); before anything is measured, each
program is checked to be really on esem (the service holds its semaphores and counts
its operations). The closing table compares the medians with targets (esem/legacy at
least 0.97; stress-ng at least 0.83) and, where one is missed, says by how much and where
the time goes. The published evaluation's figures stand beside ours.

--quick: short runs (one repetition; what CI runs). --smoke: the vault only, tiny.
--attack: instead of the benchmark, an adversary tampers with the real servers'
semaphores in their memory, under legacy and then under esem, and reports what it wrote
and what the server did: it zeroes PostgreSQL's counts while pgbench runs, and inflates
the count of Apache's accept mutex while ab runs. --mode does not apply to the real programs (every
configuration runs; choose with --configs). The real programs need root (Apache binds and
drops to www-data; PostgreSQL runs as postgres) and their packages; without them their
rows say why they are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esem.bench import app_attack, app_published, app_servers
from esem.bench.app_published import fmt
from esem.bench.app_servers import (
    PgCluster,
    ServerError,
    Watched,
    apache_argv,
    apache_missing,
    apache_site,
    pg_missing,
    shared_tmpdir,
    spawn,
    stop,
    wait_listening,
)
from esem.bench.common import (
    NO_MODE,
    BenchError,
    Options,
    Phase,
    Row,
    Table,
    UsageError,
    esem_target,
    lookup,
    median,
    num,
    phase,
    process_cpu,
    progress,
    row,
    switchless_supported,
)

BENCH = "app"
CASE = "vault"
REPEATS = 3
CLIENTS, FILES, SIZE = 8, 12, 4096  # per run: CLIENTS x FILES puts, then as many gets
SMOKE = (6, 2, 1024, 1)  # clients, files, size, repeats
CONFIGS = ("legacy", "socket", "switchless")
TARGET, STRESS_TARGET = 0.97, 0.83  # esem/legacy medians the benchmark compares with


@dataclass(frozen=True)
class Sizes:
    reps: int
    pg_scale: int
    pg_clients: int
    pg_seconds: int
    ab_requests: int
    ab_concurrency: tuple[int, ...]
    apache_workers: int
    stress_workers: int
    stress_seconds: int


FULL = Sizes(reps=3, pg_scale=10, pg_clients=4, pg_seconds=10, ab_requests=3000,
             ab_concurrency=(1, 8, 32), apache_workers=16, stress_workers=2,
             stress_seconds=5)
QUICK = Sizes(reps=1, pg_scale=1, pg_clients=2, pg_seconds=2, ab_requests=300,
              ab_concurrency=(4,), apache_workers=4, stress_workers=2, stress_seconds=1)
PAGE = b"esem served by apache prefork\n" * 64  # 1920 bytes


# ------------------------------------------------------------- configurations


def switchless_status() -> tuple[bool, str]:
    """Whether the preload library can run a program in switchless mode, and why not.

    The native client asks for the rings when ``ESEM_SWITCHLESS`` is set; a library that
    never reads that variable runs on the socket whatever it says. When the native rings
    land the check passes by itself; a run in switchless mode then also checks that the
    service granted the programs' sessions their rings (its SWITCHLESS counter)."""
    from esem.native import NativeError, library_path

    if not switchless_supported():
        return False, "this build's service has no switchless mode"
    try:
        lib = library_path()
    except NativeError as exc:
        return False, str(exc)
    if b"ESEM_SWITCHLESS" not in lib.read_bytes():
        return False, (f"the preload library ({lib.name}) does not read ESEM_SWITCHLESS: "
                       "the native client has no switchless rings in this build")
    return True, ""


@dataclass
class Config:
    name: str  # legacy | socket | switchless
    watched: Watched | None = None
    preload: Path | None = None
    rings_before: float = 0.0  # sessions granted rings before the program started


    @property
    def backend(self) -> str:
        return "legacy" if self.name == "legacy" else "esem"

    @property
    def mode(self) -> str:
        return NO_MODE if self.name == "legacy" else self.name

    def kw(self) -> dict[str, Any]:
        """What ``spawn`` (or ``PgCluster.start``) takes to run the program in this
        configuration; called right before the program starts."""
        if self.watched is None:
            return {}
        if self.name == "switchless":
            self.rings_before = _granted_rings(self.watched.scrape())
        return {"svc": self.watched.svc, "preload": self.preload,
                "switchless": self.name == "switchless"}


@contextlib.contextmanager
def configs(names: Sequence[str]) -> Iterator[list[Config]]:
    """The configurations asked for that can run here, each esem one with a private
    service (metrics on) for the whole benchmark."""
    from esem.native import NativeError, library_path

    if any(n != "legacy" for n in names) and importlib.util.find_spec(
            "prometheus_client") is None:
        raise UsageError("the real programs' operations are counted by the service's "
                         "metrics, which need prometheus_client: pip install 'esem[bench]'")
    out: list[Config] = []
    with contextlib.ExitStack() as stack:
        for name in names:
            if name == "legacy":
                out.append(Config(name))
                continue
            if name == "switchless":
                ok, why = switchless_status()
                if not ok:
                    progress(f"app: esem switchless not available: {why}")
                    continue
            try:
                lib = library_path()
            except NativeError as exc:
                raise BenchError(f"esem run needs the preload library: {exc}") from exc
            w = stack.enter_context(app_servers.watched_service(
                switchless=name == "switchless"))
            out.append(Config(name, w, lib))
        yield out


def rotated(cfgs: Sequence[Config], rep: int) -> list[Config]:
    """Repetition ``rep``'s order: each configuration goes first in turn, so a slow
    drift of a busy machine hits all of them alike."""
    k = rep % len(cfgs)
    return [*cfgs[k:], *cfgs[:k]]


# -------------------------------------------------------------- measurement


@dataclass
class Sample:
    value: float  # the program's own figure (tps, requests/s, bogo ops/s)
    units: float  # transactions, requests or bogo ops done
    ops: float  # semaphore operations the service served meanwhile (esem)
    service_cpu: float | None  # seconds of service CPU meanwhile
    wall: float
    extra: dict[str, float] = field(default_factory=dict)


class Meter:
    """The service's counters and CPU clock, and the wall clock, around one run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.before = cfg.watched.scrape() if cfg.watched else {}
        self.cpu0 = process_cpu(cfg.watched.pid) if cfg.watched else None
        self.t0 = time.monotonic()

    def done(self, value: float, units: float, **extra: float) -> Sample:
        wall = time.monotonic() - self.t0
        w = self.cfg.watched
        if w is None:
            return Sample(value, units, 0.0, None, wall, extra)
        after = w.scrape()
        cpu1 = process_cpu(w.pid)
        ops = Watched.sem_ops(self.before, after)
        if ops <= 0:
            raise BenchError(f"{self.cfg.name}: the service counted no semaphore operation "
                             "during the run: the program is not on esem")
        if self.cfg.name == "switchless" and _granted_rings(after) <= self.cfg.rings_before:
            raise BenchError("switchless: the service granted no session of the program "
                             "its rings: it ran over the socket")
        cpu = None if cpu1 is None or self.cpu0 is None else cpu1 - self.cpu0
        return Sample(value, units, ops, cpu, wall, extra)


def _granted_rings(sample: dict[str, float]) -> float:
    """Sessions the service has moved to shared-memory rings (SWITCHLESS granted)."""
    return sum(v for k, v in sample.items() if k.startswith(
        'esem_requests_total{') and 'opcode="SWITCHLESS"' in k and 'status="OK"' in k)


Samples = dict[tuple[str, str], list[Sample]]  # (case, config) -> runs


def _held(cfg: Config, uid: int, at_least: float, what: str, timeout: float = 60.0) -> None:
    """Wait until the service holds ``at_least`` semaphores of ``uid`` (the program's,
    made at its start): before measuring, the program is shown to be on esem."""
    if cfg.watched is None:
        return
    deadline = time.monotonic() + timeout
    key = f'esem_uid_semaphores{{uid="{uid}"}}'
    while (held := cfg.watched.scrape().get(key, 0)) < at_least:
        if time.monotonic() > deadline:
            raise BenchError(f"{what} under esem run --all: the service holds {held:.0f} "
                             f"semaphores of uid {uid}, expected at least {at_least:.0f}: "
                             "it is not on esem")
        time.sleep(0.1)


# ---------------------------------------------------------------- PostgreSQL

_TPS = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")


def pg_case(workload: str, s: Sizes) -> str:
    return f"postgres/{workload},scale={s.pg_scale},clients={s.pg_clients}," \
           f"seconds={s.pg_seconds}"


def postgres(cfgs: list[Config], s: Sizes, ph: Phase) -> Samples:
    samples: Samples = {}
    with shared_tmpdir("esem-bench-pg-") as root:
        pg = PgCluster(root, max_connections=max(20, s.pg_clients + 5))
        pg.initdb()
        pg.start()
        try:
            init = pg.pgbench("-i", "-s", str(s.pg_scale), "-q")
            if init.returncode != 0:
                raise BenchError(f"pgbench -i failed: {init.stderr.strip()[-500:]}")
        finally:
            pg.stop()
        history = 0  # pgbench -i leaves an empty history
        for rep in range(s.reps):
            for cfg in rotated(cfgs, rep):
                pg.start(**cfg.kw())
                try:
                    _held(cfg, pg.pg.pw_uid, pg.max_connections, "PostgreSQL")
                    for workload, flags in (("tpcb", []), ("select-only", ["-S"])):
                        ph.step(f"app: postgres {workload} run {rep + 1}/{s.reps}, "
                                f"{cfg.name}", s.pg_seconds)
                        m = Meter(cfg)
                        # -n: no vacuum first, which would truncate the history that
                        # TPC-B's invariant is checked against across the runs.
                        done = pg.pgbench("-n", "-c", str(s.pg_clients), "-j", "2", "-T",
                                          str(s.pg_seconds), *flags,
                                          timeout=s.pg_seconds + 120)
                        tps, processed, failed = (_TPS.search(done.stdout),
                                                  _PROCESSED.search(done.stdout),
                                                  _FAILED.search(done.stdout))
                        if done.returncode != 0 or not tps or not processed or not failed:
                            raise BenchError(f"pgbench {workload} ({cfg.name}) failed: "
                                             f"{(done.stdout + done.stderr)[-800:]}")
                        if int(failed[1]):
                            raise BenchError(f"pgbench {workload} ({cfg.name}): "
                                             f"{failed[1]} failed transactions")
                        sample = m.done(float(tps[1]), int(processed[1]))
                        if workload == "tpcb":
                            a, d, n = pg.tpcb_sums()
                            if a != d or n != history + int(processed[1]):
                                raise BenchError(
                                    f"TPC-B invariant broken ({cfg.name}): sum(abalance) "
                                    f"{a}, sum(delta) {d}, history {n} after "
                                    f"{history} + {processed[1]}")
                            history = n
                            sample.extra["consistent"] = 1.0
                        sample.extra["failed"] = float(failed[1])
                        samples.setdefault((pg_case(workload, s), cfg.name), []).append(
                            sample)
                finally:
                    pg.stop()
    return samples


# ------------------------------------------------------------------- Apache

_AB = {"complete": r"Complete requests:\s+(\d+)", "failed": r"Failed requests:\s+(\d+)",
       "non2xx": r"Non-2xx responses:\s+(\d+)", "rps": r"Requests per second:\s+([\d.]+)",
       "tpr": r"Time per request:\s+([\d.]+) \[ms\] \(mean\)",
       "length": r"Document Length:\s+(\d+) bytes",
       "html": r"HTML transferred:\s+(\d+) bytes"}


def parse_ab(text: str) -> dict[str, float]:
    out = {}
    for key, pattern in _AB.items():
        m = re.search(pattern, text)
        if m:
            out[key] = float(m[1])
    return out


def ab_case(c: int, s: Sizes) -> str:
    return f"apache/c={c},n={s.ab_requests},workers={s.apache_workers}"


def _ab(port: int, n: int, c: int) -> dict[str, float]:
    exe = shutil.which("ab")
    if exe is None:
        raise BenchError("ab is not installed (Debian apache2-utils)")
    done = subprocess.run([exe, "-q", "-n", str(n), "-c", str(c), "-s", "30",
                           f"http://127.0.0.1:{port}/page.txt"],
                          capture_output=True, text=True, timeout=600)
    got = parse_ab(done.stdout)
    if done.returncode != 0 or "rps" not in got:
        raise BenchError(f"ab failed: {(done.stdout + done.stderr)[-800:]}")
    bad = got.get("failed", 0) + got.get("non2xx", 0)
    if (bad or got.get("complete") != n or got.get("length") != len(PAGE)
            or got.get("html") != n * len(PAGE)):
        raise BenchError(f"Apache answered wrongly: {got} (expected {n} complete responses "
                         f"of {len(PAGE)} bytes, none failed)")
    return got


def apache(cfgs: list[Config], s: Sizes, ph: Phase) -> Samples:
    samples: Samples = {}
    with shared_tmpdir("esem-bench-apache-") as root:
        conf, ports = apache_site(root, PAGE, s.apache_workers, access_log=False)
        for rep in range(s.reps):
            for cfg in rotated(cfgs, rep):
                ph.step(f"app: apache run {rep + 1}/{s.reps}, {cfg.name}")
                proc = spawn(apache_argv(root, conf), root, **cfg.kw())
                try:
                    try:
                        wait_listening(ports, proc, root / "logs" / "error.log")
                    except ServerError as exc:
                        raise BenchError(f"apache ({cfg.name}): {exc}") from exc
                    if cfg.watched is not None:  # the parent's and every worker's session
                        deadline = time.monotonic() + 60
                        key = 'esem_uid_sessions{uid="0"}'
                        while cfg.watched.scrape().get(key, 0) < 1 + s.apache_workers:
                            if time.monotonic() > deadline or proc.poll() is not None:
                                raise BenchError("Apache's workers never all attached their "
                                                 "accept mutex in the service")
                            time.sleep(0.1)
                        _held(cfg, 0, 1, "Apache")
                    else:
                        time.sleep(1.0)  # the workers start
                    _ab(ports[1], 50, 2)  # warm up (and checked like the rest)
                    for i, c in enumerate(s.ab_concurrency):
                        m = Meter(cfg)
                        got = _ab(ports[i % 2], s.ab_requests, c)
                        sample = m.done(got["rps"], got["complete"],
                                        time_per_request=got["tpr"] * 1000,
                                        failed=got.get("failed", 0) + got.get("non2xx", 0))
                        samples.setdefault((ab_case(c, s), cfg.name), []).append(sample)
                finally:
                    out = stop(proc, signal.SIGTERM, root / "out.log")
                if proc.returncode not in (0, -signal.SIGTERM):
                    raise BenchError(f"apache ({cfg.name}) exited {proc.returncode}: "
                                     f"{out[-500:]}")
    return samples


# --------------------------------------------------------------- stress-ng


def stress_case(s: Sizes) -> str:
    return f"stress-ng/sem={s.stress_workers},seconds={s.stress_seconds}"


def stress_ng(cfgs: list[Config], s: Sizes, ph: Phase) -> Samples:
    from esem.bench.stress import _METRIC_LINE

    exe = shutil.which("stress-ng")
    if exe is None:
        raise BenchError("stress-ng is not installed")
    samples: Samples = {}
    for rep in range(s.reps):
        for cfg in rotated(cfgs, rep):
            ph.step(f"app: stress-ng --sem run {rep + 1}/{s.reps}, {cfg.name}",
                    s.stress_seconds)
            with shared_tmpdir("esem-bench-stress-") as root:
                m = Meter(cfg)
                proc = spawn([exe, "--sem", str(s.stress_workers), "-t",
                              f"{s.stress_seconds}s", "--metrics-brief"], root, **cfg.kw())
                try:
                    proc.wait(timeout=s.stress_seconds + 120)
                finally:
                    out = stop(proc, signal.SIGTERM, root / "out.log")
            match = _METRIC_LINE.search(out)
            if proc.returncode != 0 or "successful run completed" not in out or not match:
                raise BenchError(f"stress-ng ({cfg.name}) failed: {out[-800:]}")
            sample = m.done(float(match[5]), float(match[1]))  # checked: exit 0, "successful"
            samples.setdefault((stress_case(s), cfg.name), []).append(sample)
    return samples


# -------------------------------------------------------------------- Redis


def redis_sem_imports() -> tuple[str, int] | None:
    """redis-server's path and how many ``sem_*`` functions it imports; None when Redis
    or objdump is not installed."""
    exe = shutil.which("redis-server")
    if exe is None or shutil.which("objdump") is None:
        return None
    real = str(Path(exe).resolve())
    return real, sem_imports(real)


def sem_imports(path: str) -> int:
    """How many ``sem_*`` functions the ELF file ``path`` imports (its undefined dynamic
    symbols, ``objdump -T``): a program that imports none cannot call one."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise BenchError("objdump is not installed (Debian binutils)")
    real = path
    done = subprocess.run([objdump, "-T", real], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BenchError(f"objdump -T {real} failed: {done.stderr.strip()}")
    syms = [line.split()[-1] for line in done.stdout.splitlines()
            if "*UND*" in line and line.split()]
    if not syms:
        raise BenchError(f"objdump -T {real} listed no imported symbol at all")
    return sum(1 for name in syms if re.fullmatch(r"sem_\w+", name))


# --------------------------------------------------------------------- rows


def sample_rows(samples: Samples, unit: str, per: str) -> list[Row]:
    rows: list[Row] = []
    for case in dict.fromkeys(c for c, _ in samples):
        leg = samples.get((case, "legacy"))
        leg_med = median([x.value for x in leg]) if leg else None
        for cfg in CONFIGS:
            runs = samples.get((case, cfg))
            if not runs:
                continue
            backend, mode = ("legacy", NO_MODE) if cfg == "legacy" else ("esem", cfg)
            values = [x.value for x in runs]
            med = median(values)
            metric = {"tps": "tps", "req/s": "requests_per_s", "ops/s": "ops_per_s"}[unit]
            rows += [row(BENCH, backend, mode, case, metric, med, unit),
                     row(BENCH, backend, mode, case, "spread",
                         (max(values) - min(values)) / med * 100 if med else 0, "%"),
                     row(BENCH, backend, mode, case, "runs", len(runs), "runs")]
            tpr = [x.extra["time_per_request"] for x in runs if "time_per_request" in x.extra]
            if tpr:
                rows.append(row(BENCH, backend, mode, case, "time_per_request", median(tpr),
                                "us"))
            for check in ("failed", "consistent"):
                vals = [x.extra[check] for x in runs if check in x.extra]
                if vals:
                    rows.append(row(BENCH, backend, mode, case, check,
                                    sum(vals) if check == "failed" else min(vals),
                                    "count" if check == "failed" else "bool"))
            if backend == "esem":
                rows.append(row(BENCH, backend, mode, case, "sem_ops_per_unit",
                                median([x.ops / x.units for x in runs if x.units]), per))
                cpu = [x for x in runs if x.service_cpu is not None]
                if cpu:
                    rows.append(row(BENCH, backend, mode, case, "service_cpu",
                                    median([x.service_cpu / x.wall * 100 for x in cpu
                                            if x.service_cpu is not None]), "%"))
                    rows.append(row(BENCH, backend, mode, case, "service_us_per_op",
                                    median([x.service_cpu / x.ops * 1e6 for x in cpu
                                            if x.service_cpu is not None and x.ops]), "us"))
                if leg_med:
                    rows.append(row(BENCH, backend, mode, case, "ratio", med / leg_med, "x"))
                    rows.append(row(BENCH, backend, mode, case, "overhead",
                                    max(0.0, (leg_med - med) / leg_med * 100), "%"))
    return rows


def _vault_one(backend: str, socket_path: str | None, clients: int, files: int,
               size: int) -> float:
    from esem.vault.workload import run_workload

    r = run_workload(backend, "none", clients=clients, files=files, size=size,
                     esem_socket=socket_path)
    if r.files_intact != r.files_written or r.files_lost_or_corrupt or r.slot_failures:
        raise BenchError(f"vault run on {backend} was not clean: {r.evidence}")
    return float(r.requests_per_s)


def vault(opts: Options, modes: Sequence[str], smoke: bool) -> list[Row]:
    clients, files, size, repeats = SMOKE if smoke else (CLIENTS, FILES, SIZE, REPEATS)
    rows: list[Row] = []
    with phase("app vault", 2 * repeats * len(modes)) as ph:
        for mode in modes:
            with esem_target(mode, opts.socket) as target:
                legacy: list[float] = []
                esem: list[float] = []
                for i in range(repeats):
                    what = f"{clients} clients x {files} files"
                    ph.step(f"app: vault run {i + 1}/{repeats}, {what}, legacy")
                    legacy.append(_vault_one("legacy", None, clients, files, size))
                    ph.step(f"app: vault run {i + 1}/{repeats}, {what}, esem ({mode})")
                    esem.append(_vault_one("esem", target.socket_path, clients, files, size))
            leg, es = median(legacy), median(esem)
            if mode == modes[0]:
                rows.append(row(BENCH, "legacy", NO_MODE, CASE, "requests_per_s", leg,
                                "req/s"))
            rows.append(row(BENCH, "esem", mode, CASE, "requests_per_s", es, "req/s"))
            # Overhead in percent of legacy's rate; negative (esem faster: noise) shows as 0.
            rows.append(row(BENCH, "esem", mode, CASE, "overhead",
                            max(0.0, (leg - es) / leg * 100), "%"))
    return rows


# ---------------------------------------------------------------------- run

PROGRAMS: dict[str, tuple[Callable[[], str | None], Callable[..., Samples], str, str]] = {
    "postgres": (pg_missing, postgres, "tps", "ops/tx"),
    "apache": (apache_missing, apache, "req/s", "ops/req"),
    "stress-ng": (lambda: None if shutil.which("stress-ng") else "stress-ng is not installed",
                  stress_ng, "ops/s", "ops/bogo-op"),
}
APPS = (*PROGRAMS, "vault", "redis")
_evidence: list[str] = []  # the attack's evidence, for this process's tables
_missing: dict[str, str] = {}  # program -> why it did not run (this process)


def _names(text: str, allowed: Sequence[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in allowed:
            raise argparse.ArgumentTypeError(f"{n!r} is not one of {', '.join(allowed)}")
    return names


def _reps(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= n <= 100:
        raise argparse.ArgumentTypeError(f"{n} is out of range 1..100")
    return n


def add_arguments(parser: Any) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one short repetition of every program (about a minute; what "
                        "CI runs); not for comparison")
    parser.add_argument("--attack", action="store_true",
                        help="instead of the benchmark: an adversary zeroes PostgreSQL's "
                        "semaphore counts in its shared memory during pgbench, and inflates "
                        "Apache's accept mutex under ab, legacy beside esem, with the "
                        "evidence of what broke (--only postgres or apache: one of them)")
    parser.add_argument("--only", type=lambda t: _names(t, APPS), metavar="APP,...",
                        help=f"run only these ({', '.join(APPS)}; default all)")
    parser.add_argument("--configs", type=lambda t: _names(t, CONFIGS), metavar="C,...",
                        help="configurations (legacy,socket,switchless; default all: "
                        "switchless only where the preload library supports it)")
    parser.add_argument("--reps", type=_reps, metavar="N",
                        help="repetitions per configuration (1..100; default 3; quick 1)")


def run(opts: Options, args: argparse.Namespace | None = None) -> list[Row]:
    try:
        return _run(opts, args)
    except ServerError as exc:
        raise BenchError(str(exc)) from exc


def _run(opts: Options, args: argparse.Namespace | None) -> list[Row]:
    quick = bool(args is not None and getattr(args, "quick", False))
    if args is not None and getattr(args, "attack", False):
        return attack(quick, getattr(args, "only", None) or list(APPS))
    if opts.smoke and not quick:  # the common --smoke: the vault only, tiny (as ever)
        return vault(opts, opts.modes, smoke=True)
    sizes = QUICK if quick else FULL
    reps = getattr(args, "reps", None) if args is not None else None
    if reps is not None:
        sizes = dataclasses.replace(sizes, reps=reps)
    only = (getattr(args, "only", None) if args is not None else None) or list(APPS)
    names = (getattr(args, "configs", None) if args is not None else None) or list(CONFIGS)
    if "legacy" not in names:
        names = ["legacy", *names]  # every ratio is against legacy, in the same run
    rows: list[Row] = []
    ok, _why = switchless_status()
    if "switchless" in names and not ok:
        rows.append(row(BENCH, "esem", "switchless", "preload", "available", 0, "bool"))
    if "redis" in only:
        found = redis_sem_imports()
        if found is None:
            _missing["redis"] = "redis-server (or objdump) is not installed"
        else:
            rows.append(row(BENCH, "redis", NO_MODE, "redis", "sem_imports", found[1],
                            "symbols"))
    todo = [p for p in PROGRAMS if p in only]
    for p in todo:
        why_not = PROGRAMS[p][0]()
        if why_not:
            _missing[p] = why_not
            progress(f"app: {p} skipped: {why_not}")
    todo = [p for p in todo if p not in _missing]
    if todo:
        with configs(names) as cfgs, phase("app", sizes.reps * len(cfgs) * sum(
                {"postgres": 2, "apache": 1, "stress-ng": 1}[p] for p in todo)) as ph:
            for p in todo:
                _, fn, unit, per = PROGRAMS[p]
                rows += sample_rows(fn(cfgs, sizes, ph), unit, per)
    if "vault" in only:
        modes = [n for n in names if n != "legacy" and (n == "socket" or switchless_supported())]
        rows += vault(opts, tuple(modes) or ("socket",), smoke=quick)
    return rows


def attack(quick: bool, only: Sequence[str] = APPS) -> list[Row]:
    """``--attack``: the adversaries of ``esem.bench.app_attack``, on PostgreSQL and on
    Apache, each under legacy and then under esem."""
    pg_why = pg_missing() if "postgres" in only else "not asked for (--only)"
    ap_why = apache_missing() if "apache" in only else "not asked for (--only)"
    if pg_why and ap_why:
        raise BenchError(f"--attack runs PostgreSQL and Apache, which cannot run here: "
                         f"{pg_why}; {ap_why}")
    rows: list[Row] = []
    with configs(["legacy", "socket"]) as cfgs, phase(
            "app attack", 3 * (not pg_why) + 2 * (not ap_why)) as ph:
        if pg_why:
            _missing["postgres (attack)"] = pg_why
        else:
            rows += _attack_postgres(cfgs, quick, ph)
        if ap_why:
            _missing["apache (attack)"] = ap_why
        else:
            rows += _attack_apache(cfgs, quick, ph)
    return rows


ATTACK_WORKERS = 8


def _attack_apache(cfgs: list[Config], quick: bool, ph: Phase) -> list[Row]:
    seconds = 2 if quick else 5
    ab = shutil.which("ab")
    if ab is None:
        raise BenchError("ab is not installed (Debian apache2-utils)")
    rows: list[Row] = []
    with shared_tmpdir("esem-bench-attack-apache-") as root:
        conf, ports = apache_site(root, PAGE, ATTACK_WORKERS, access_log=False)
        for cfg in cfgs:
            ph.step(f"app: attack on apache, {cfg.name}", 2 * seconds)
            proc = spawn(apache_argv(root, conf), root, **cfg.kw())
            try:
                wait_listening(ports, proc, root / "logs" / "error.log")
                deadline = time.monotonic() + 60
                while len(kids := app_attack.apache_children(proc.pid)) < ATTACK_WORKERS:
                    if time.monotonic() > deadline:
                        raise BenchError("Apache never started its workers")
                    time.sleep(0.1)
                time.sleep(1.0)  # each worker reaches the mutex
                failed, most = 0.0, []
                found = app_attack.find_accept_mutex([proc.pid, *kids])
                old = 0
                for attacked in (False, True):
                    if attacked and found is not None:
                        old = app_attack.inflate(found[0], found[1])
                    load = subprocess.Popen(
                        [ab, "-q", "-t", str(seconds), "-n", "10000000", "-c",
                         str(ATTACK_WORKERS), "-s", "30", f"http://127.0.0.1:{ports[0]}/page.txt"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    most.append(app_attack.sample_section(kids, load))
                    out = load.communicate()[0]
                    got = parse_ab(out)
                    if "rps" not in got:
                        raise BenchError(f"ab failed: {out[-800:]}")
                    failed += got.get("failed", 0) + got.get("non2xx", 0)
            finally:
                stop(proc, signal.SIGTERM, root / "out.log")
            o = app_attack.ApacheOutcome(
                "legacy" if cfg.watched is None else "esem socket", ATTACK_WORKERS,
                found[2] if found else "", old, app_attack.INFLATED if found else 0,
                most[0], most[1], int(failed))
            case = "attack/apache"
            rows += [row(BENCH, cfg.backend, cfg.mode, case, "mutex_found", int(bool(found)),
                         "bool"),
                     row(BENCH, cfg.backend, cfg.mode, case, "count_written", o.written,
                         "units"),
                     row(BENCH, cfg.backend, cfg.mode, case, "in_accept_before", o.before,
                         "children"),
                     row(BENCH, cfg.backend, cfg.mode, case, "in_accept_after", o.after,
                         "children"),
                     row(BENCH, cfg.backend, cfg.mode, case, "failed", o.failed, "count")]
            _evidence.append(app_attack.describe_apache(o))
            progress(f"app: {_evidence[-1]}")
    return rows


def _attack_postgres(cfgs: list[Config], quick: bool, ph: Phase) -> list[Row]:
    seconds, clients = (4, 4) if quick else (8, 4)
    rows: list[Row] = []
    with shared_tmpdir("esem-bench-attack-") as root:
        pg = PgCluster(root)
        pg.initdb()
        pg.start()
        try:
            init = pg.pgbench("-i", "-s", "1", "-q")
            if init.returncode != 0:
                raise BenchError(f"pgbench -i failed: {init.stderr.strip()[-500:]}")
        finally:
            pg.stop()
        # The count-zeroer under each configuration, then under esem the handle-flipper:
        # what the sem_t still holds there (a reference, in the program's own memory).
        runs = [(cfg, False) for cfg in cfgs] + [(c, True) for c in cfgs if c.watched]
        for cfg, flip in runs:
            ph.step(f"app: attack on postgres, {cfg.name}"
                    + (", handle-flipper" if flip else ""), seconds)
            pg.start(**cfg.kw())
            try:
                _held(cfg, pg.pg.pw_uid, pg.max_connections, "PostgreSQL")
                o = app_attack.attack_run(pg, cfg.name if cfg.watched is None
                                          else "esem socket", seconds, clients, cfg.watched,
                                          flip_handles=flip)
            finally:
                app_attack.stop_attacked(pg)
            case = "attack/postgres-handles" if flip else "attack/postgres"
            rows += [row(BENCH, cfg.backend, cfg.mode, case, "glibc_counts_found",
                         o.glibc_cells, "cells"),
                     row(BENCH, cfg.backend, cfg.mode, case, "esem_cells_found",
                         o.esem_cells, "cells"),
                     row(BENCH, cfg.backend, cfg.mode, case, "writes", o.writes, "writes"),
                     row(BENCH, cfg.backend, cfg.mode, case, "pgbench_finished",
                         int(o.finished), "bool"),
                     row(BENCH, cfg.backend, cfg.mode, case, "transactions", o.transactions,
                         "tx"),
                     row(BENCH, cfg.backend, cfg.mode, case, "zero_tps_s", o.stalled_s, "s"),
                     row(BENCH, cfg.backend, cfg.mode, case, "stuck_backends", len(o.stuck),
                         "backends")]
            if o.consistent is not None:
                rows.append(row(BENCH, cfg.backend, cfg.mode, case, "consistent",
                                int(o.consistent), "bool"))
            _evidence.append(app_attack.describe(o))
            progress(f"app: {_evidence[-1]}")
    return rows


# ------------------------------------------------------------------- tables


def _unit_word(case: str) -> str:
    return ("transaction" if case.startswith("postgres") else
            "request" if case.startswith(("apache", "vault")) else "bogo op")


def _target(case: str) -> float:
    return STRESS_TARGET if case.startswith("stress-ng") else TARGET


def tables(results: list[Row]) -> list[Table]:
    rows = [r for r in results if r["bench"] == BENCH]
    out: list[Table] = []
    real = [r for r in rows if r["case"].split("/")[0] in PROGRAMS]
    if real:
        body = []
        for case in dict.fromkeys(r["case"] for r in real):
            for backend, mode in (("legacy", NO_MODE), ("esem", "socket"),
                                  ("esem", "switchless")):
                def v(metric: str, b: str = backend, m: str = mode, c: str = case) \
                        -> float | None:
                    return lookup(rows, backend=b, mode=m, case=c, metric=metric)

                value = next((x for x in (v("tps"), v("requests_per_s"), v("ops_per_s"))
                              if x is not None), None)
                if value is None:
                    continue
                tpr = v("time_per_request")
                checks = []
                if v("failed") is not None:
                    checks.append(f"{v('failed'):.0f} failed")
                if v("consistent") is not None:
                    checks.append("balances = deltas" if v("consistent") else "INCONSISTENT")
                if case.startswith("stress-ng"):
                    checks.append("successful run")  # every run was, or it raised
                body.append([case, "legacy" if backend == "legacy" else f"esem {mode}",
                             fmt(value), f"{num(v('spread'))}%", num(tpr, 0) if tpr else "-",
                             "-" if backend == "legacy" else num(v("ratio"), 3) + "x",
                             num(v("sem_ops_per_unit"), 2), num(v("service_cpu")) +
                             ("%" if v("service_cpu") is not None else ""),
                             num(v("service_us_per_op")), ", ".join(checks) or "-"])
        notes = ["median of alternating runs (spread: max-min over median); figure: tps "
                 "(postgres), requests/s (apache), bogo ops/s (stress-ng); time per request: "
                 "ab's mean, microseconds",
                 "sem ops: wait+post+getvalue+cancel requests the service counted, per "
                 "transaction / request / bogo op; service CPU: percent of one core during "
                 "the run, and microseconds per operation (the service runs with --metrics, "
                 "whose counting costs it about 0.4 us per request)"]
        if lookup(rows, mode="switchless", case="preload", metric="available") == 0:
            notes.append("esem switchless: not available (" + switchless_status()[1] + ")")
        out.append(Table("app: real programs, legacy beside esem run --all",
                         ["program", "config", "median", "spread", "time/req us",
                          "esem/legacy", "sem ops", "service CPU", "us/op", "checked"],
                         body, notes, wrap={0: 44}))
    vault_rows = [r for r in rows if r["case"] == CASE]
    if vault_rows:
        leg = lookup(vault_rows, backend="legacy", metric="requests_per_s")
        body = [["legacy", "-", num(leg), "-"]]
        for r in vault_rows:
            if r["backend"] == "esem" and r["metric"] == "requests_per_s":
                body.append(["esem", r["mode"], num(r["value"]),
                             num(lookup(vault_rows, backend="esem", mode=r["mode"],
                                        metric="overhead")) + "%"])
        out.append(Table("app: FILE VAULT requests per second (put + get, TLS, no attack)",
                         ["backend", "mode", "requests/s", "overhead"], body,
                         ["median of alternating runs; every file verified byte for byte"]))
    if real or vault_rows:
        out.append(_targets(rows))
    redis = lookup(rows, backend="redis", case="redis", metric="sem_imports")
    missing = [f"{p}: not run here ({why})" for p, why in _missing.items()]
    if redis is not None:
        missing.insert(0, "redis: not applicable: Redis takes no POSIX semaphore (its "
                       "binary imports no sem_* function: objdump -T)" if redis == 0 else
                       f"redis: imports {redis:.0f} sem_* functions: not measured here")
    if missing:
        out.append(Table("app: programs not measured", ["program", "why"],
                         [m.split(": ", 1) for m in missing], right=[], wrap={1: 80}))
    attack_rows = [r for r in rows if r["case"].startswith("attack/postgres")]
    if attack_rows:
        body = []
        for backend, mode, case in (("legacy", NO_MODE, "attack/postgres"),
                                    ("esem", "socket", "attack/postgres"),
                                    ("esem", "socket", "attack/postgres-handles")):
            def a(metric: str, b: str = backend, m: str = mode, c: str = case) -> str:
                x = lookup(attack_rows, backend=b, mode=m, case=c, metric=metric)
                return "-" if x is None else num(x, 0)

            if a("writes") == "-":
                continue
            body.append(["legacy" if backend == "legacy" else
                         "esem socket" + (", handle-flipper" if "handles" in case else ""),
                         a("glibc_counts_found"), a("writes"), a("transactions"),
                         a("zero_tps_s"), a("stuck_backends"),
                         {"1": "yes", "0": "NO"}.get(a("pgbench_finished"), "-")])
        out.append(Table("app --attack: tampering with PostgreSQL's semaphores during pgbench",
                         ["config", "counts found", "writes", "tx committed", "0-tps s",
                          "stuck backends", "pgbench finished"], body,
                         [e for e in _evidence if "pgbench" in e]))
    ap_rows = [r for r in rows if r["case"] == "attack/apache"]
    if ap_rows:
        body = []
        for backend, mode in (("legacy", NO_MODE), ("esem", "socket")):
            def b(metric: str, be: str = backend, m: str = mode) -> str:
                x = lookup(ap_rows, backend=be, mode=m, metric=metric)
                return "-" if x is None else num(x, 0)

            body.append(["legacy" if backend == "legacy" else "esem socket",
                         {"1": "yes", "0": "no"}.get(b("mutex_found"), "-"),
                         b("count_written"), b("in_accept_before"), b("in_accept_after"),
                         b("failed")])
        out.append(Table("app --attack: inflating Apache's accept mutex count under load",
                         ["config", "sem_t found", "count written",
                          "in accept at once, before", "after", "failed responses"], body,
                         ["children waiting for a connection (epoll_wait or accept) at once, "
                          "the most seen while ab ran and in the half second after it; the mutex "
                          "admits one",
                          *(e for e in _evidence if "accept" in e)]))
    if real or vault_rows:
        out.append(app_published.comparison(results))
    return out


def _throughput(rows: list[Row], backend: str, mode: str, case: str) -> float | None:
    for metric in ("tps", "requests_per_s", "ops_per_s"):
        v = lookup(rows, backend=backend, mode=mode, case=case, metric=metric)
        if v is not None:
            return v
    return None


def _targets(rows: list[Row]) -> Table:
    body = []
    cases = dict.fromkeys(r["case"] for r in rows
                          if r["backend"] == "esem" and r["metric"] in (
                              "tps", "requests_per_s", "ops_per_s"))
    for case in cases:
        leg = _throughput(rows, "legacy", NO_MODE, case)
        for mode in ("socket", "switchless"):
            es = _throughput(rows, "esem", mode, case)
            if es is None or not leg:
                continue
            ratio, goal = es / leg, _target(case)
            if ratio >= goal:
                body.append([case, mode, f">= {goal:.2f}", f"{ratio:.3f}", "met"])
                continue
            added = (1 / es - 1 / leg) * 1e6 if es else 0.0
            ops = lookup(rows, backend="esem", mode=mode, case=case,
                         metric="sem_ops_per_unit") or 0.0
            us_op = lookup(rows, backend="esem", mode=mode, case=case,
                           metric="service_us_per_op")
            word = _unit_word(case)
            where = (f"missed by {(goal - ratio) * 100:.1f} points: esem adds {added:,.0f} us "
                     f"of wall time per {word} (1/throughput)")
            if ops:
                where += (f" = {ops:.2f} semaphore operations per {word} x "
                          f"{added / ops:,.0f} us each")
            if us_op is not None:
                where += f"; the service spends {us_op:.0f} us of CPU per operation"
            body.append([case, mode, f">= {goal:.2f}", f"{ratio:.3f}", where])
    return Table("app: targets (esem/legacy throughput, medians)",
                 ["program", "mode", "target", "esem/legacy", "verdict"], body,
                 ["targets from the issue: 0.97 for PostgreSQL, Apache and the vault; 0.83 "
                  "for stress-ng --sem (the published -17%)"], right=[3], wrap={0: 30, 4: 60})
