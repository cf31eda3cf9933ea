"""What every ``esem bench`` command shares: the machine note, result rows, percentiles,
text and Markdown tables, the JSON report, CPU clocks, forked worker processes, and the
esem service a benchmark runs against (embedded, or a running one given by ``--socket``).

The JSON report is compared across commits, so its shape is fixed here and checked on
every row: ``{"machine": {...}, "results": [{"bench", "backend", "mode", "placement",
"case", "metric", "value", "unit"}, ...]}``. ``placement`` (same, split or unpinned:
``esem.bench.placement``) is the one in effect when the row was made, and ``lookup``
refuses to choose between rows of two placements, so a ratio never mixes them. CPU use
is reported as ``cpu_per_mop`` rows (CPU seconds per million semaphore calls,
numerically microseconds per call), for the client processes and for the service
separately; ``case`` carries a ``/client-cpu`` or ``/service-cpu`` suffix so the row
keys never change.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.util
import inspect
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import IO, Any

# Progress (bars or lines on stderr) and the tables (the one renderer's) are
# re-exported so a benchmark module (and esem.bench.app's contract) imports them here.
from esem.bench.progress import Phase as Phase
from esem.bench.progress import phase as phase
from esem.bench.progress import progress as progress
from esem.tables import Table as Table

BACKENDS = ("esem", "legacy", "floor", "redis", "stress-ng")
MODES = ("socket", "switchless")
NO_MODE = "-"  # the mode of rows that do not run through esem
ROW_KEYS = ("bench", "backend", "mode", "placement", "case", "metric", "value", "unit")
SAME, SPLIT, UNPINNED = "same", "split", "unpinned"
PLACEMENTS = (SAME, SPLIT, UNPINNED)
# The placement rows are made under, innermost last (pushed and popped only by
# esem.bench.placement.active; outside it, nothing is pinned).
CURRENT_PLACEMENT: list[str] = [UNPINNED]
CLIENT_CPU, SERVICE_CPU = "client-cpu", "service-cpu"  # case suffixes of cpu_per_mop rows

Row = dict[str, Any]
# The esem clients a row may name (``row``'s ``client``): the Python API on the
# pure-Python client or on the native one (``esem.Client.transport``), or a C program on
# the native client through the preload library.
CLIENTS = ("python", "native", "preload")


class BenchError(Exception):
    """A benchmark could not run (a worker failed, a server did not start)."""


class UsageError(BenchError):
    """The options ask for something this build or machine cannot do."""


@dataclass(frozen=True)
class Options:
    """What every command takes. ``app`` runners get the same object from ``bench all``."""

    socket: str | None = None  # a running service; None: an embedded one per mode
    modes: tuple[str, ...] = ("socket",)
    smoke: bool = False  # tiny sizes: seconds, for CI
    # what esem.bench.placement.each runs; the CLI's default is both pinned ones
    placements: tuple[str, ...] = (UNPINNED,)


APP_MODULE = "esem.bench.app"  # the application benchmark, when it exists


def app_module() -> ModuleType | None:
    """``esem.bench.app`` when it is part of this build, else None."""
    if importlib.util.find_spec(APP_MODULE) is None:
        return None
    return importlib.import_module(APP_MODULE)




# ---------------------------------------------------------------------- rows


def row(bench: str, backend: str, mode: str, case: str, metric: str, value: float,
        unit: str, client: str | None = None) -> Row:
    """One result, checked: a known backend, a finite non-negative number; labelled
    with the placement in effect, and with the esem client (``CLIENTS``) that measured
    it when the bench knows it (a ``client`` field)."""
    if client is not None and client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BenchError(f"{bench}/{backend}/{case}/{metric}: measured {value!r}")
    out: Row = {"bench": bench, "backend": backend, "mode": mode,
                "placement": CURRENT_PLACEMENT[-1], "case": case, "metric": metric,
                "value": round(value, 3), "unit": unit}
    if client is not None:
        out["client"] = client
    return out


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1); no interpolation between samples."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def latency_rows(bench: str, backend: str, mode: str, case: str,
                 samples_us: Sequence[float]) -> list[Row]:
    """Median and p99 of per-operation samples in microseconds."""
    return [row(bench, backend, mode, case, "median", median(samples_us), "us"),
            row(bench, backend, mode, case, "p99", percentile(samples_us, 0.99), "us")]


def cpu_rows(bench: str, backend: str, mode: str, case: str, calls: int,
             client_s: float | None, service_s: float | None,
             client: str | None = None) -> list[Row]:
    """CPU seconds per million semaphore calls, of the clients and of the service
    (``client``: as for ``row``)."""
    out: list[Row] = []
    if calls <= 0:
        return out
    for suffix, seconds in ((CLIENT_CPU, client_s), (SERVICE_CPU, service_s)):
        if seconds is not None:
            out.append(row(bench, backend, mode, f"{case}/{suffix}", "cpu_per_mop",
                           max(0.0, seconds) * 1e6 / calls, "s", client))
    return out


def lookup(results: Sequence[Row], **match: str) -> float | None:
    """The value of the first row whose fields equal ``match`` (None when absent).

    ValueError when rows of two placements match: a figure is one placement's, and a
    ratio of two lookups must not mix them (``placements``, ``of_placement``)."""
    found: Row | None = None
    for r in results:
        if all(r[k] == v for k, v in match.items()):
            if found is None:
                found = r
            elif placement_of(r) != placement_of(found):
                raise ValueError(f"lookup {match} matches rows of placements "
                                 f"{placement_of(found)} and {placement_of(r)}: compare "
                                 "within one placement (select it first)")
    return None if found is None else float(found["value"])


def placement_of(r: Row) -> str:
    """A row's placement (rows written before placements existed: unpinned)."""
    return str(r.get("placement", UNPINNED))


def placements(results: Sequence[Row]) -> list[str]:
    """The placements the rows were measured under, in the order they ran."""
    return list(dict.fromkeys(placement_of(r) for r in results))


def of_placement(results: Sequence[Row], name: str) -> list[Row]:
    return [r for r in results if placement_of(r) == name]


def per_placement(make: Callable[[list[Row]], list[Table]],
                  results: Sequence[Row]) -> list[Table]:
    """``make``'s tables for the rows of each placement on their own, the placement in
    each title: a table (and every ratio in it) sees one placement's figures only."""
    out = []
    for name in placements(results):
        for t in make(of_placement(results, name)):
            out.append(Table(f"{t.title} [placement {name}]", t.header, t.body, t.notes,
                             t.right, t.wrap))
    return out


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value >= 10_000 or (digits == 0 and value >= 1000):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _esem_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esem")
    except PackageNotFoundError:
        return "unknown"


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def machine(opts: Options) -> dict[str, Any]:
    uv = uvloop_installed()
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "esem_mode": ",".join(opts.modes),
        "service_loop": "uvloop" if uv else "asyncio", "uvloop": "yes" if uv else "no",
        "esem_version": _esem_version(),
        "esem_client": _esem_client(),
        "service": opts.socket or "embedded",
        "placements": placement_notes(opts),
        "smoke": opts.smoke,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def placement_notes(opts: Options) -> dict[str, str]:
    """What each placement of this run pins where (the machine record's "placements")."""
    from esem.bench import placement

    return placement.machine_note(placement.names(opts))


def _esem_client() -> str:
    """Which client the Python API's esem rows ride on (ESEM_CLIENT, esem.client.native)."""
    from esem.client import native
    from esem.errors import EsemError

    try:
        return native.chosen()
    except (ValueError, EsemError):  # a bad ESEM_CLIENT: the esem rows then raise it
        return "python"


def machine_line(m: dict[str, Any]) -> str:
    return (f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python "
            f"{m['python']}, esem {m['esem_version']} {m['esem_mode']} mode "
            f"on the {m.get('esem_client', 'python')} client "
            f"({m['service_loop']}), {m['service']} service"
            + (", SMOKE sizes (not for comparison)" if m.get("smoke") else "")
            + "".join(f"\nplacement {note}" for note in m.get("placements", {}).values()))


# --------------------------------------------------------------- CPU clocks


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float | None:
    """User+system CPU seconds of process ``pid`` (all its threads, live and exited).

    Read from the process's POSIX CPU clock (what ``clock_getcpuclockid(pid)`` returns:
    ``~pid << 3 | CPUCLOCK_SCHED``), which has nanosecond resolution; ``/proc/PID/stat``
    utime+stime, in clock ticks (10 ms), is the fallback. None when neither is readable.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def self_cpu() -> float:
    """User+system CPU seconds of this process, all threads (ns resolution)."""
    return time.process_time()


# -------------------------------------------------------------- esem target


def switchless_supported() -> bool:
    from esem.server.embedded import EmbeddedService

    return "switchless" in inspect.signature(EmbeddedService).parameters


def parse_modes(value: str) -> tuple[str, ...]:
    modes = MODES if value == "both" else (value,)
    if "switchless" in modes and not switchless_supported():
        raise UsageError(
            "--mode switchless is not available in this build: EmbeddedService takes no "
            "'switchless' argument yet (the shared-memory fast path is not merged); "
            "use --mode socket")
    return modes


def _peer_pid(path: str) -> int | None:
    """The pid of the process listening on ``path``, vouched for by the kernel
    (SO_PEERCRED). The probe connection closes before any handshake."""
    from esem.errors import ServiceUnavailable

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5.0)
        s.connect(path)
        cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _, _ = struct.unpack("3i", cred)
        return pid if pid > 0 else None
    except OSError as exc:
        raise ServiceUnavailable(f"no esem service answers on {path}: {exc}") from exc
    finally:
        s.close()


@dataclass
class Target:
    """The esem service one mode runs against; this process's env points at it."""

    mode: str
    socket_path: str
    service_pid: int | None
    embedded: bool

    def service_cpu(self) -> float | None:
        return process_cpu(self.service_pid) if self.service_pid else None


def check_transport(mode: str) -> None:
    """Refuse to label figures with a mode the measuring process did not get: with only
    ``ESEM_SWITCHLESS=1`` set, a client that the service refuses the rings quietly goes
    on over the socket. Call it in each measuring process after its first esem call."""
    from esem.client.blocking import get_client

    actual = getattr(get_client(), "mode", "socket")
    if actual != mode:
        raise BenchError(f"asked for esem {mode} mode but the session runs in {actual} "
                         "mode (is the service started with --switchless?)")


def _connect_and_check(mode: str) -> None:
    """Open this process's session now, so a service that refuses the mode is reported
    before anything is measured (forked workers check again for themselves)."""
    import warnings

    from esem.client.blocking import get_client

    with warnings.catch_warnings():  # the fallback warning: we say it better below
        warnings.simplefilter("ignore", RuntimeWarning)
        get_client().connect()
    check_transport(mode)


def _reset_client() -> None:
    """Forget this process's esem client: it belongs to whatever service and mode it
    was created for (forked children make their own anyway)."""
    from esem.client import blocking

    stale = blocking._process_client
    blocking._process_client = None
    if stale is not None and stale.pid == os.getpid():
        stale.close()


_ENV_KEYS = ("ESEM_SOCKET", "ESEM_SWITCHLESS", "ESEM_PUBKEY", "ESEM_DIR")


@contextlib.contextmanager
def esem_target(mode: str, sock: str | None) -> Iterator[Target]:
    """Point this process (and the processes it forks from now on) at an esem service in
    ``mode``: a fresh embedded daemon, or the running one at ``sock``. The switchless
    client is selected by ``ESEM_SWITCHLESS=1`` in the environment, set here before any
    measuring process creates its client. The embedded daemon runs where the placement
    in effect puts the service (``esem.bench.placement``); a running one is not moved."""
    from esem.bench import placement
    from esem.server.embedded import EmbeddedService

    if sock is not None and placement.current().pinned:
        raise UsageError(f"the service at {sock} cannot be pinned: measure it unpinned")
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    service: EmbeddedService | None = None
    pid: int | None
    try:
        if sock is None:
            for k in ("ESEM_PUBKEY", "ESEM_DIR"):  # would pin or aim at another service
                os.environ.pop(k, None)
            kwargs: dict[str, Any] = {"switchless": True} if mode == "switchless" else {}
            service = EmbeddedService(**kwargs)
            try:
                with placement.service_start():
                    service.start()
            except RuntimeError as exc:
                raise BenchError(f"the embedded esem service did not start: {exc}") from exc
            assert service.proc is not None
            path, pid = str(service.socket_path), service.proc.pid
            placement.pin_service(pid)
        else:
            path, pid = sock, _peer_pid(sock)
        os.environ["ESEM_SOCKET"] = path
        if mode == "switchless":
            os.environ["ESEM_SWITCHLESS"] = "1"
        else:
            os.environ.pop("ESEM_SWITCHLESS", None)
        _reset_client()
        _connect_and_check(mode)
        yield Target(mode, path, pid, service is not None)
    finally:
        _reset_client()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if service is not None:
            service.cleanup()


# ----------------------------------------------------------- forked workers


_FORK = mp.get_context("fork")


def barrier(parties: int) -> Any:
    """A barrier shared by forked processes (created before they fork)."""
    return _FORK.Barrier(parties)


def _child(conn: multiprocessing.connection.Connection, fn: Callable[[], Any]) -> None:
    try:
        payload = {"ok": fn()}
    except BaseException:  # report everything, the parent decides
        payload = {"error": traceback.format_exc(limit=6)}
    try:
        conn.send_bytes(json.dumps(payload).encode())
    finally:
        conn.close()
        os._exit(0)


@dataclass
class Workers:
    """Forked worker processes, each running one function and sending back its JSON
    result (JSON, not pickle: nothing here unpickles what another process wrote)."""

    fns: Sequence[Callable[[], Any]]
    procs: list[Any] = field(default_factory=list)
    conns: list[multiprocessing.connection.Connection] = field(default_factory=list)

    def start(self) -> Workers:
        for fn in self.fns:
            parent, child = _FORK.Pipe(duplex=False)
            p = _FORK.Process(target=_child, args=(child, fn), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        return self

    def results(self, timeout: float) -> list[Any]:
        """Every worker's result, in order; BenchError when one failed or hung (naming
        the root cause first: a worker that failed breaks the others' barriers)."""
        deadline = time.monotonic() + timeout
        out: dict[int, Any] = {}
        errors: list[tuple[bool, str]] = []
        pending = dict(enumerate(self.conns))
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    errors.append((False, f"{len(pending)} worker(s) did not finish "
                                          f"within {timeout:.0f}s"))
                    break
                ready = multiprocessing.connection.wait(list(pending.values()), left)
                for i, conn in list(pending.items()):
                    if conn not in ready:
                        continue
                    del pending[i]
                    try:
                        payload = json.loads(conn.recv_bytes())
                    except EOFError:
                        errors.append((False, f"worker {i} died without a result (exit "
                                              f"{self.procs[i].exitcode})"))
                        continue
                    if "error" in payload:
                        text = payload["error"]
                        errors.append(("BrokenBarrierError" in text,
                                       f"worker {i} failed:\n{text}"))
                    else:
                        out[i] = payload["ok"]
        finally:
            self.stop()
        if errors:
            errors.sort(key=lambda e: e[0])  # root causes before broken barriers
            raise BenchError(errors[0][1])
        return [out[i] for i in range(len(self.fns))]

    def stop(self) -> None:
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()


class Sync:
    """Start and end barriers around a measured loop, shared by N forked workers and
    the parent, which reads the service's CPU clock at both. A worker that fails aborts
    them, so nobody waits for it."""

    def __init__(self, workers: int, timeout: float) -> None:
        self.timeout = timeout
        self._start = barrier(workers + 1)
        self._end = barrier(workers + 1)

    def start(self) -> None:
        self._start.wait(self.timeout)

    def end(self) -> None:
        self._end.wait(self.timeout)

    def guard(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def guarded() -> Any:
            try:
                return fn()
            except BaseException:
                self._start.abort()
                self._end.abort()
                raise

        return guarded

    def run(self, fns: Sequence[Callable[[], Any]],
            probe: Callable[[], float | None]) -> tuple[list[Any], float | None]:
        """Run ``fns`` in forked workers; return their results and how much ``probe``
        (a CPU clock) advanced between the two barriers."""
        workers = Workers([self.guard(fn) for fn in fns]).start()
        try:
            self.start()
            c0 = probe()
            self.end()
            c1 = probe()
        except threading.BrokenBarrierError:
            workers.results(timeout=15)  # raises the worker's own error
            raise BenchError("the workers did not reach the end of the measured loop "
                             f"within {self.timeout:.0f}s") from None
        except BaseException:
            self._start.abort()
            self._end.abort()
            workers.stop()
            raise
        delta = None if c0 is None or c1 is None else c1 - c0
        return workers.results(self.timeout), delta


# ----------------------------------------------------------------- reports


def validate(report: dict[str, Any]) -> None:
    """Raise ValueError unless ``report`` has exactly the compared shape."""
    if set(report) != {"machine", "results"} or not isinstance(report["machine"], dict):
        raise ValueError("a report is {'machine': {...}, 'results': [...]}")
    for r in report["results"]:
        if tuple(sorted(set(r) - {"client"})) != tuple(sorted(ROW_KEYS)):
            raise ValueError(f"row keys {sorted(r)}")
        if "client" in r and r["client"] not in CLIENTS:
            raise ValueError(f"client {r['client']!r}")
        if r["backend"] not in BACKENDS:
            raise ValueError(f"backend {r['backend']!r}")
        if r["placement"] not in PLACEMENTS:
            raise ValueError(f"placement {r['placement']!r}")
        v = r["value"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                or v < 0:
            raise ValueError(f"value {v!r} in {r}")
        for k in ("bench", "backend", "mode", "placement", "case", "metric", "unit"):
            if not isinstance(r[k], str) or not r[k]:
                raise ValueError(f"{k} {r[k]!r} in {r}")


def make_report(opts: Options, results: list[Row]) -> dict[str, Any]:
    report = {"machine": machine(opts), "results": results}
    validate(report)
    return report


def write_json(report: dict[str, Any], path: str) -> None:
    """``path`` '-' is stdout."""
    text = json.dumps(report, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with open(path, "w") as f:
            f.write(text)


def emit(report: dict[str, Any], tables: Sequence[Table], json_out: str | None) -> None:
    """The human tables on stdout (on stderr when the JSON goes to stdout)."""
    out: IO[str] = sys.stderr if json_out == "-" else sys.stdout
    print(machine_line(report["machine"]), file=out)
    for t in tables:
        print(file=out)
        t.print(out)
    out.flush()
    if json_out:
        write_json(report, json_out)
