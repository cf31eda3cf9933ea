"""``esem bench micro``: the latency of each semaphore operation, esem beside legacy.

Every figure is measured in the same run on the same machine, so the ratios carry over
to other machines even when the absolute numbers do not. Two references bound the
design: ``legacy/handoff`` (half a ping-pong between two processes through two legacy
semaphores: what a cross-process wake-up costs with shared memory and futexes) and
``floor/uds-roundtrip`` (a bare request/reply over a Unix socket between two Python
processes, no protocol and no crypto: the least any socket design can cost), with
``floor/uds-aead-roundtrip`` beside it (the same with a ChaCha20-Poly1305 seal and open
each way: the least a Python client and service on an encrypted channel can cost).
esem's contended hand-off (``esem/handoff``) is measured the same way as legacy's.

The native rows (``native/...`` cases; ``esem.bench.native_micro``) are the same
operations from a C program: through ``libesem_preload.so`` (the native client, esem
socket mode) and through glibc (legacy from C), plus the native floor
(``floor/native-aead-roundtrip``: a socketpair round trip between two native processes
with a ChaCha20-Poly1305 seal and open each way). They run in the same invocation, so
legacy, the Python client, the native client and the floors share one machine state.

Everything runs once per placement (``--placement``, ``esem.bench.placement``): the
service and the clients pinned to one vCPU (same) or to two (split); legacy's and the
floors' second process goes where the service would. Every row carries its placement,
and each table is made from one placement's rows.

Waits are measured uncontended (value > 0): for legacy that is glibc's user-space fast
path, no syscall. For esem each loop also reports the CPU the clients and the service
spent on it (``cpu_per_mop``). Nothing here passes or fails on a time.
"""

from __future__ import annotations

import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from esem.api import O_CREAT, USE_ESEM, sem_open, sem_unlink
from esem.bench import native_micro, placement
from esem.bench.common import (
    NO_MODE,
    Options,
    Phase,
    Row,
    Table,
    Target,
    Workers,
    check_transport,
    cpu_rows,
    emit,
    esem_target,
    latency_rows,
    lookup,
    make_report,
    num,
    per_placement,
    phase,
    placement_of,
    ratio,
    self_cpu,
)
from esem.native import NativeError

BENCH = "micro"
OPS = ("open", "close", "unlink", "post", "wait", "trywait", "getvalue")
CASES = (*OPS, "handoff")
DEFAULT_ITERATIONS = 2000
SMOKE_ITERATIONS = 30
# Loops with CPU rows, and the calls each iteration makes (open+close share one loop;
# the unlink loop also creates and closes, so it has none of its own).
CPU_CASES = {"open+close": 2, "post": 1, "wait": 1, "trywait": 1, "getvalue": 1,
             "handoff": 4}


@dataclass
class Measured:
    """Latency samples per case (us) and the CPU of each CPU case: (calls, client s,
    service s)."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, tuple[int, float, float | None]] = field(default_factory=dict)


class _CpuMeter:
    """Client (this process, plus what children report) and service CPU over a loop."""

    def __init__(self, target: Target | None) -> None:
        self.target = target
        self.client0 = self_cpu()
        self.service0 = target.service_cpu() if target else None

    def done(self, calls: int, extra_client: float = 0.0) -> tuple[int, float, float | None]:
        client = self_cpu() - self.client0 + extra_client
        service = None
        if self.target is not None and self.service0 is not None:
            now = self.target.service_cpu()
            service = None if now is None else now - self.service0
        return calls, client, service


def _time_each(n: int, op: Callable[[], object]) -> list[float]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        op()
        samples.append((clock() - t0) / 1000.0)
    return samples


def measure_ops(backend: str, n: int, target: Target | None = None) -> Measured:
    """Per-operation samples in microseconds (and, with a target, CPU per loop)."""
    flags = USE_ESEM if backend == "esem" else 0
    tag = uuid.uuid4().hex[:10]
    name = f"/esem-bench-{tag}"
    base = sem_open(name, O_CREAT, 0o600, 0, flags=flags)
    if target is not None:
        check_transport(target.mode)
    m = Measured()
    opens, closes = m.samples.setdefault("open", []), m.samples.setdefault("close", [])
    clock = time.perf_counter_ns
    meter = _CpuMeter(target)
    for _ in range(n):  # in pairs, so no session ever holds more than two handles
        t0 = clock()
        handle = sem_open(name, 0, flags=flags)
        t1 = clock()
        handle.close()
        opens.append((t1 - t0) / 1000.0)
        closes.append((clock() - t1) / 1000.0)
    m.cpu["open+close"] = meter.done(2 * n)
    for op, fn in (("post", base.post), ("wait", base.wait)):
        meter = _CpuMeter(target)
        m.samples[op] = _time_each(n, fn)
        m.cpu[op] = meter.done(n)
    for _ in range(n):
        base.post()
    meter = _CpuMeter(target)
    m.samples["trywait"] = _time_each(n, base.trywait)
    m.cpu["trywait"] = meter.done(n)
    meter = _CpuMeter(target)
    m.samples["getvalue"] = _time_each(n, base.getvalue)
    m.cpu["getvalue"] = meter.done(n)
    unlinks = m.samples.setdefault("unlink", [])
    for i in range(n):  # one at a time: never near the per-uid semaphore quota
        victim = f"/esem-bench-{tag}-{i}"
        sem_open(victim, O_CREAT, 0o600, 0, flags=flags).close()
        t0 = clock()
        sem_unlink(victim, flags=flags)
        unlinks.append((clock() - t0) / 1000.0)
    base.close()
    sem_unlink(name, flags=flags)
    return m


def measure_handoff(backend: str, rounds: int,
                    target: Target | None = None) -> tuple[list[float], tuple[int, float,
                                                                              float | None]]:
    """One-way hand-off latency between two processes: half of each ping-pong, in us;
    and the CPU of both processes and the service over the rounds."""
    flags = USE_ESEM if backend == "esem" else 0
    tag = uuid.uuid4().hex[:10]
    ping_name, pong_name = f"/esem-ping-{tag}", f"/esem-pong-{tag}"
    ping = sem_open(ping_name, O_CREAT, 0o600, 0, flags=flags)
    pong = sem_open(pong_name, O_CREAT, 0o600, 0, flags=flags)

    def pong_side() -> float:
        placement.pin_partner(backend)
        p_ping = sem_open(ping_name, 0, flags=flags)
        p_pong = sem_open(pong_name, 0, flags=flags)
        p_ping.wait()  # the warm-up round: both sessions are up before the clock starts
        p_pong.post()
        if target is not None:
            check_transport(target.mode)
        c0 = self_cpu()
        for _ in range(rounds):
            p_ping.wait()
            p_pong.post()
        return self_cpu() - c0

    workers = Workers([pong_side]).start()
    try:
        ping.post()
        pong.wait()
        if target is not None:
            check_transport(target.mode)
        samples = []
        clock = time.perf_counter_ns
        meter = _CpuMeter(target)
        for _ in range(rounds):
            t0 = clock()
            ping.post()
            pong.wait()
            samples.append((clock() - t0) / 2000.0)
        (child_cpu,) = workers.results(timeout=60 + rounds * 0.05)
        cpu = meter.done(4 * rounds, extra_client=float(child_cpu))
    finally:
        workers.stop()
        for sem, nm in ((ping, ping_name), (pong, pong_name)):
            sem.close()
            sem_unlink(nm, flags=flags)
    return samples, cpu


UDS_FLOOR, AEAD_FLOOR = "uds-roundtrip", "uds-aead-roundtrip"
PAYLOAD = 32


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the floor's peer closed the socket")
        buf += chunk
    return bytes(buf)


class _Aead:
    """One direction of the AEAD floor: ChaCha20-Poly1305 (the channel's cipher, through
    the same library esem's Python protocol uses) with a counter nonce, as Noise does."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self.aead = ChaCha20Poly1305(key)
        self.n = 0

    def _nonce(self) -> bytes:
        self.n += 1
        return b"\0\0\0\0" + self.n.to_bytes(8, "little")

    def seal(self, payload: bytes) -> bytes:
        body = self.aead.encrypt(self._nonce(), payload, None)
        return len(body).to_bytes(2, "big") + body

    def open(self, s: socket.socket) -> bytes:
        size = int.from_bytes(_recv_exact(s, 2), "big")
        return self.aead.decrypt(self._nonce(), _recv_exact(s, size), None)


def measure_uds_roundtrip(rounds: int, aead: bool = False) -> tuple[list[float], float]:
    """A request/reply (32 bytes each way) between two Python processes, in us: bare, or
    (``aead``) each message sealed by its sender and opened by its receiver; and both
    processes' CPU over the rounds (s). The echo side stands where the service would."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    up, down = bytes(range(32)), bytes(0xA5 ^ i for i in range(32))

    def echo() -> float:
        placement.pin_partner("floor")
        a.close()
        if not aead:
            b.sendall(b.recv(64))  # warm-up
            c0 = self_cpu()
            for _ in range(rounds):
                b.sendall(b.recv(64))
            return self_cpu() - c0
        rx, tx = _Aead(up), _Aead(down)
        b.sendall(tx.seal(rx.open(b)))
        c0 = self_cpu()
        for _ in range(rounds):
            b.sendall(tx.seal(rx.open(b)))
        return self_cpu() - c0

    workers = Workers([echo]).start()
    b.close()
    try:
        msg = b"x" * PAYLOAD
        samples = []
        clock = time.perf_counter_ns
        if aead:
            tx, rx = _Aead(up), _Aead(down)
            a.sendall(tx.seal(msg))  # warm-up
            rx.open(a)
            c0 = self_cpu()
            for _ in range(rounds):
                t0 = clock()
                a.sendall(tx.seal(msg))
                if rx.open(a) != msg:
                    raise ConnectionError("the floor's reply is not the request")
                samples.append((clock() - t0) / 1000.0)
        else:
            a.sendall(msg)  # warm-up
            a.recv(64)
            c0 = self_cpu()
            for _ in range(rounds):
                t0 = clock()
                a.sendall(msg)
                a.recv(64)
                samples.append((clock() - t0) / 1000.0)
        cpu = self_cpu() - c0
        (echo_cpu,) = workers.results(timeout=60)
    finally:
        workers.stop()
        a.close()
    return samples, cpu + float(echo_cpu)


def _esem_rows(target: Target, n: int, ph: Phase) -> list[Row]:
    rows: list[Row] = []
    ph.step(f"micro: esem ({target.mode}) operations, {n} samples each ...")
    m = measure_ops("esem", n, target)
    ph.step(f"micro: esem ({target.mode}) hand-off between two processes ...")
    m.samples["handoff"], m.cpu["handoff"] = measure_handoff("esem", n, target)
    for case in CASES:
        rows += latency_rows(BENCH, "esem", target.mode, case, m.samples[case])
    for case, (calls, client, service) in m.cpu.items():
        rows += cpu_rows(BENCH, "esem", target.mode, case, calls, client, service)
    return rows


NATIVE = native_micro.CASE_PREFIX  # "native/": the case prefix of the C program's rows


def _placement_note(rows: list[Row]) -> str:
    name = placement_of(rows[0]) if rows else "unpinned"
    return "placement " + placement.make(name).describe()


def _native_rows(backend: str, mode: str, m: native_micro.NativeMeasured) -> list[Row]:
    rows: list[Row] = []
    for case in native_micro.CASES:
        rows += latency_rows(BENCH, backend, mode, NATIVE + case, m.samples[case])
    for case, (calls, client, service) in m.cpu.items():
        rows += cpu_rows(BENCH, backend, mode, NATIVE + case, calls, client, service)
    return rows


def native_available() -> str | None:
    """None when the native rows can be measured (building what they need on first
    use), else why not."""
    try:
        native_micro.check_available()
    except NativeError as exc:
        return str(exc)
    return None


def collect(opts: Options, iterations: int | None = None) -> list[Row]:
    """Every micro row: legacy and the floors once, esem once per mode, the native
    client once per mode (``ESEM_SWITCHLESS=1``, which ``esem_target`` sets for the
    switchless mode, makes the preload library's client take the rings too)."""
    n = iterations or (SMOKE_ITERATIONS if opts.smoke else DEFAULT_ITERATIONS)
    if n < 10:
        raise ValueError("--iterations must be at least 10")
    rows: list[Row] = []
    why_not = native_available()
    if why_not is not None:
        print(f"micro: the native rows are skipped: {why_not}", file=sys.stderr)
    native = why_not is None
    steps = 4 + 2 * len(opts.modes) + (2 + len(opts.modes) if native else 0)
    with phase("micro", steps * len(placement.names(opts))) as ph:
        for _ in placement.each(opts, BENCH):
            rows += _collect(opts, n, native, ph)
    return rows


def _collect(opts: Options, n: int, native: bool, ph: Phase) -> list[Row]:
    """One placement's rows (the placement is in effect)."""
    rows: list[Row] = []
    tag = uuid.uuid4().hex[:10]
    pl = placement.current()
    ph.step(f"micro: legacy operations, {n} samples each ...")
    m = measure_ops("legacy", n)
    ph.step("micro: legacy hand-off between two processes ...")
    m.samples["handoff"], m.cpu["handoff"] = measure_handoff("legacy", n)
    for case in CASES:
        rows += latency_rows(BENCH, "legacy", NO_MODE, case, m.samples[case])
    for case, (calls, client, _) in m.cpu.items():
        rows += cpu_rows(BENCH, "legacy", NO_MODE, case, calls, client, None)
    for case, aead, what in ((UDS_FLOOR, False, "bare"), (AEAD_FLOOR, True, "AEAD")):
        ph.step(f"micro: the {what} Unix-socket round trip between Python processes ...")
        samples, cpu = measure_uds_roundtrip(n, aead)
        rows += latency_rows(BENCH, "floor", NO_MODE, case, samples)
        rows += cpu_rows(BENCH, "floor", NO_MODE, case, n, cpu, None)
    if native:
        ph.step("micro: legacy operations and hand-off from C ...")
        rows += _native_rows("legacy", NO_MODE, native_micro.measure(
            "legacy", n, None, tag, pl.partner("legacy")))
        ph.step("micro: the native Unix-socket round trip with AEAD ...")
        samples, cpu = native_micro.measure_floor(n, pl.partner("floor"))
        rows += latency_rows(BENCH, "floor", NO_MODE, native_micro.FLOOR_CASE, samples)
        rows += cpu_rows(BENCH, "floor", NO_MODE, native_micro.FLOOR_CASE, n, cpu, None)
    for mode in opts.modes:
        with esem_target(mode, opts.socket) as target:
            rows += _esem_rows(target, n, ph)
            if native:
                ph.step(f"micro: esem native client ({mode}; C under "
                        "libesem_preload.so) ...")
                rows += _native_rows("esem", mode, native_micro.measure(
                    "esem", n, target.service_pid, tag, pl.partner("esem"), mode))
    return rows


def tables(results: list[Row]) -> list[Table]:
    """The tables of each placement (a table never holds two placements' figures)."""
    return per_placement(_tables, [r for r in results if r["bench"] == BENCH])


def _tables(rows: list[Row]) -> list[Table]:
    modes = sorted({r["mode"] for r in rows if r["backend"] == "esem"})
    floor = lookup(rows, backend="floor", case=UDS_FLOOR, metric="median")
    out = []
    for mode in modes:
        body = []
        for case in CASES:
            lm = lookup(rows, backend="legacy", case=case, metric="median")
            em = lookup(rows, backend="esem", mode=mode, case=case, metric="median")
            cpu_case = {"open": "open+close", "close": "-"}.get(case, case)
            cc = lookup(rows, backend="esem", mode=mode, case=f"{cpu_case}/client-cpu")
            sc = lookup(rows, backend="esem", mode=mode, case=f"{cpu_case}/service-cpu")
            lc = lookup(rows, backend="legacy", case=f"{cpu_case}/client-cpu")
            body.append([case, num(lm, 2),
                         num(lookup(rows, backend="legacy", case=case, metric="p99"), 2),
                         num(em, 2),
                         num(lookup(rows, backend="esem", mode=mode, case=case,
                                    metric="p99"), 2),
                         ratio(em, lm), ratio(em, floor), num(lc, 2), num(cc, 1),
                         num(sc, 1)])
        notes = []
        if floor is not None:
            fp = lookup(rows, backend="floor", case=UDS_FLOOR, metric="p99")
            fc = lookup(rows, backend="floor", case=f"{UDS_FLOOR}/client-cpu")
            notes.append(f"floor: bare Unix-socket round trip between two Python processes, "
                         f"median {floor:.2f} us, p99 {num(fp, 2)} us, cpu {num(fc, 1)} us "
                         "(both processes)")
        af = lookup(rows, backend="floor", case=AEAD_FLOOR, metric="median")
        if af is not None:
            ap = lookup(rows, backend="floor", case=AEAD_FLOOR, metric="p99")
            ac = lookup(rows, backend="floor", case=f"{AEAD_FLOOR}/client-cpu")
            post, wait = (lookup(rows, backend="esem", mode=mode, case=op, metric="median")
                          for op in ("post", "wait"))
            notes.append(f"floor with AEAD: the same, each message sealed and opened with "
                         f"ChaCha20-Poly1305, median {af:.2f} us, p99 {num(ap, 2)} us, cpu "
                         f"{num(ac, 1)} us; esem/(floor with AEAD): post {ratio(post, af)}, "
                         f"wait {ratio(wait, af)}")
        notes.append("cpu: CPU microseconds per semaphore call (= seconds per million) of "
                     "the legacy and esem clients and of the esem service; the open row's are "
                     "for its loop of open+close; handoff counts both processes")
        notes.append(_placement_note(rows))
        out.append(Table(
            f"micro: latency per operation, microseconds (esem {mode} mode)",
            ["operation", "legacy med", "p99", "esem med", "p99", "esem/legacy",
             "esem/floor", "legacy cpu", "esem cpu", "service cpu"], body, notes))
        native = _native_table(rows, mode)
        if native is not None:
            out.append(native)
    return out


def _native_table(rows: list[Row], mode: str) -> Table | None:
    """The native client beside legacy (from C and from Python) and the Python client,
    with the native floor; None when this run has no native rows for ``mode``."""
    def get(backend: str, case: str, metric: str = "median", m: str = NO_MODE) -> float | None:
        return lookup(rows, backend=backend, mode=m, case=case, metric=metric)

    if get("esem", NATIVE + "post", m=mode) is None:
        return None
    floor = get("floor", native_micro.FLOOR_CASE)
    body = []
    for case in CASES:
        nm = get("esem", NATIVE + case, m=mode)
        cpu_case = NATIVE + {"open": "open+close", "close": "-"}.get(case, case)
        body.append([case, num(get("legacy", case), 2), num(get("legacy", NATIVE + case), 2),
                     num(get("esem", case, m=mode), 2), num(nm, 2),
                     num(get("esem", NATIVE + case, "p99", mode), 2),
                     ratio(nm, get("legacy", NATIVE + case)), ratio(nm, floor),
                     ratio(nm, get("esem", case, m=mode)),
                     num(get("legacy", f"{cpu_case}/client-cpu", "cpu_per_mop"), 2),
                     num(get("esem", f"{cpu_case}/client-cpu", "cpu_per_mop", mode), 1),
                     num(get("esem", f"{cpu_case}/service-cpu", "cpu_per_mop", mode), 1)])
    fc = get("floor", f"{native_micro.FLOOR_CASE}/client-cpu", "cpu_per_mop")
    body.append(["native floor", "", "", "", num(floor, 2),
                 num(get("floor", native_micro.FLOOR_CASE, "p99"), 2), "", "", "", "",
                 num(fc, 1), ""])
    handoff_c = get("legacy", NATIVE + "handoff")
    body.append(["post / legacy C handoff", "", "", "", "", "",
                 ratio(get("esem", NATIVE + "post", m=mode), handoff_c), "", "", "", "", ""])
    notes = [
        "esem native: a C program calling sem_open(name, O_CREAT | USE_ESEM, ...) and the "
        "other sem_* functions under LD_PRELOAD=libesem_preload.so (the Rust native client, "
        f"{mode} transport); legacy C: the same binary through glibc; legacy py and esem "
        "py: the rows of the table above",
        "native floor: two native processes over a Unix socketpair, a 32-byte message "
        "sealed and opened with ChaCha20-Poly1305 each way (esem-floor); its cpu is both "
        "processes' per round trip",
        "cpu: CPU microseconds per call of the legacy C process and of the native client "
        "process (its reader thread included; handoff counts both processes), and of the "
        "esem service",
        "post / legacy C handoff: the native post against legacy's one-way hand-off "
        "between two C processes (which must wake a sleeping process; a spinning "
        "switchless service need not): issue 12's target is <= 0.5 in switchless mode, "
        "split placement",
        _placement_note(rows),
    ]
    return Table(
        f"micro: the native client, microseconds (esem {mode} mode)",
        ["operation", "legacy py", "legacy C", "esem py", "esem native", "p99",
         "native/legacy C", "native/floor", "native/py", "legacy C cpu", "native cpu",
         "service cpu"],
        body, notes)


def run(opts: Options, iterations: int | None, json_out: str | None) -> int:
    from esem.bench import targets

    report = make_report(opts, collect(opts, iterations))
    results = report["results"]
    emit(report, [*tables(results), targets.table(results, benches=(BENCH,))], json_out)
    return 0

