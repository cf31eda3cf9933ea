"""``esem bench journal``: what crash safety costs, and how long a restart takes.

In one run, three real daemons side by side: no journal (``--no-journal``, today's
in-memory service), the journal on tmpfs (``/dev/shm``, the default's kind of place:
the state directory under ``/run``), and the journal on disk with ``--fsync``
(group-committed fdatasync before replies). For each: post latency (median, p99) from
one client, and the service's CPU per post (its process CPU clock over the loop).

Then the time from a restart until every waiting client has resumed: N raw sessions
(the protocol objects over sockets) each with a wait queued, SIGKILL, a new daemon,
each session reconnects and sends RESUME. Then restart time: a daemon with the journal on
tmpfs holds N semaphores (each created and closed: they stay, as POSIX named semaphores
do), is SIGKILLed, and a new daemon is
started on its journal; the time from ``exec`` until it listens (its published key
appears), the journal read, verified, replayed and compacted in between. Nothing here
passes or fails on a time.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from esem.bench.common import (
    BenchError,
    Options,
    Row,
    Table,
    UsageError,
    cpu_rows,
    emit,
    latency_rows,
    lookup,
    make_report,
    num,
    process_cpu,
    row,
)
from esem.bench.progress import phase
from esem.client.blocking import Client
from esem.core.status import Status
from esem.core.table import WaitMode
from esem.protocol.constants import Opcode, OpenFlag
from esem.protocol.messages import Request
from esem.protocol.session import ClientSession
from esem.server.embedded import EmbeddedService

BENCH = "journal"
CONFIGS = ("no-journal", "tmpfs", "disk-fsync")
DEFAULT_POSTS, SMOKE_POSTS = 5000, 200
DEFAULT_SIZES, SMOKE_SIZES = (1, 1000, 100_000), (1, 100)
DEFAULT_RESUMERS, SMOKE_RESUMERS = (1, 10, 100), (1, 5)  # clients with a wait queued
TMPFS = Path("/dev/shm")


def _service(config: str, work: Path, extra: list[str] | None = None) -> EmbeddedService:
    directory = work / config
    args = list(extra or [])
    if config == "no-journal":
        args.append("--no-journal")
    elif config == "tmpfs":
        args += ["--journal", str(_tmpfs_dir(work, config))]
    else:
        args += ["--journal", str(directory / "journal"), "--fsync"]
    return EmbeddedService(directory, extra_args=args)


def _tmpfs_dir(work: Path, tag: str) -> Path:
    base = TMPFS if TMPFS.is_dir() else work
    return base / f"jbench-{os.getpid()}-{work.name}-{tag}"  # no "esem": see test_switchless


def _posts(svc: EmbeddedService, n: int) -> tuple[list[float], float | None]:
    """Per-post latency in microseconds, and the service's CPU seconds over the loop."""
    client = Client(svc.socket_path, svc.pubkey)
    try:
        opened = client.call(Request(Opcode.OPEN, 0, name="/bench-journal",
                                     oflag=OpenFlag.CREAT, mode=0o600, value=0))
        post = Request(Opcode.POST, 0, handle=opened.handle)
        take = Request(Opcode.WAIT, 0, handle=opened.handle, wait_mode=WaitMode.TRY)
        for _ in range(min(n, 50)):  # warm up
            client.call(post)
            client.call(take)
        assert svc.proc is not None
        cpu0 = process_cpu(svc.proc.pid)
        samples = []
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            client.call(post)
            samples.append((clock() - t0) * 1e6)
        cpu1 = process_cpu(svc.proc.pid)
        for _ in range(n):  # back to 0: the count stays far from SEM_VALUE_MAX
            client.call(take)
    finally:
        client.close()
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return samples, cpu


def _fill(svc: EmbeddedService, count: int) -> None:
    client = Client(svc.socket_path, svc.pubkey)
    try:
        for i in range(count):
            opened = client.call(Request(Opcode.OPEN, 0, name=f"/bench-restart-{i}",
                                         oflag=OpenFlag.CREAT, mode=0o600, value=1))
            client.call(Request(Opcode.CLOSE, 0, handle=opened.handle))
    finally:
        client.close()


class _Waiter:
    """A raw session (the protocol objects over a socket) with one wait queued."""

    def __init__(self, svc: EmbeddedService, name: str) -> None:
        self.session = self._connect(svc)
        frame = self.session.send_request(
            Request(Opcode.OPEN, 1, name=name, oflag=OpenFlag.CREAT, mode=0o600, value=0))
        self.sock.sendall(frame)
        self._until(lambda: not self.session.pending)
        self.sock.sendall(self.session.send_request(
            Request(Opcode.WAIT, 2, handle=self.handle, wait_mode=WaitMode.BLOCK)))
        self.session._next_req_id = 3

    def _connect(self, svc: EmbeddedService) -> ClientSession:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(svc.socket_path))
        session = ClientSession(svc.pubkey)
        self.sock.sendall(session.start())
        self.session = session
        self._until(lambda: session.established)
        return session

    def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("the service closed a benchmark connection")
            for reply in self.session.receive_data(data):
                if reply.opcode is Opcode.OPEN:
                    self.handle = reply.handle
                elif reply.opcode is Opcode.RESUME and reply.status is not Status.OK:
                    raise BenchError(f"RESUME refused: {reply.status.name}")

    def resume(self, svc: EmbeddedService) -> None:
        old = self.session
        self.sock.close()
        new = self._connect(svc)
        self.sock.sendall(new.resume(old))
        self._until(lambda: new.resumed_last is not None)

    def close(self) -> None:
        self.sock.close()


def _resume_all_seconds(svc: EmbeddedService, waiters: int) -> float:
    """Kill the service under ``waiters`` queued waits; restart it; the time until
    every waiter has reconnected and resumed (one after the other, from this process:
    an upper bound of what clients resuming in parallel see)."""
    clients = [_Waiter(svc, "/bench-resume") for _ in range(waiters)]
    try:
        svc.kill()
        t0 = time.perf_counter()
        svc.start(timeout=600)
        for c in clients:
            c.resume(svc)
        return time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()


def _restart_seconds(svc: EmbeddedService) -> float:
    svc.kill()
    t0 = time.perf_counter()
    svc.start(timeout=600)
    return time.perf_counter() - t0


def run(opts: Options, json_out: str | None, posts: int | None = None,
        sizes: list[int] | None = None) -> int:
    if opts.socket is not None:
        raise UsageError("measures daemons of its own (three journal settings, restarts): "
                         "--socket does not apply")
    n = posts or (SMOKE_POSTS if opts.smoke else DEFAULT_POSTS)
    counts = sizes or list(SMOKE_SIZES if opts.smoke else DEFAULT_SIZES)
    resumers = list(SMOKE_RESUMERS if opts.smoke else DEFAULT_RESUMERS)
    results: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="esem-bench-journal-") as tmp:
        work = Path(tmp)
        try:
            with phase("journal", len(CONFIGS) + len(resumers) + len(counts)) as steps:
                for config in CONFIGS:
                    steps.step(f"{n} posts, {config}")
                    with _service(config, work) as svc:
                        samples, cpu = _posts(svc, n)
                    results += latency_rows(BENCH, "esem", "socket", f"post/{config}",
                                            samples)
                    results += cpu_rows(BENCH, "esem", "socket", f"post/{config}", n, None,
                                        cpu)
                for waiters in resumers:
                    steps.step(f"restart under {waiters} queued waits until all resumed")
                    with _service("tmpfs", work / f"resume-{waiters}") as svc:
                        seconds = _resume_all_seconds(svc, waiters)
                    results.append(row(BENCH, "esem", "socket", f"resume-all/{waiters}",
                                       "seconds", seconds, "s"))
                for count in counts:
                    steps.step(f"restart with {count} semaphores")
                    quota = ["--quota-semaphores", str(max(1024, count + 16))]
                    with _service("tmpfs", work / f"restart-{count}", quota) as svc:
                        _fill(svc, count)
                        seconds = _restart_seconds(svc)
                    results.append(row(BENCH, "esem", "socket", f"restart/{count}",
                                       "seconds", seconds, "s"))
        finally:
            for d in TMPFS.glob(f"jbench-{os.getpid()}-*"):
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
    report = make_report(opts, results)
    emit(report, tables(results, n), json_out)
    return 0


def tables(results: list[Row], n: int) -> list[Table]:
    body = []
    for config in CONFIGS:
        case = f"post/{config}"
        body.append([config, num(lookup(results, case=case, metric="median")),
                     num(lookup(results, case=case, metric="p99")),
                     num(lookup(results, case=f"{case}/service-cpu", metric="cpu_per_mop"))])
    restart = [[c.split("/")[1], num(r["value"], 3)] for r in results
               if (c := str(r["case"])).startswith("restart/")]
    resumed = [[c.split("/")[1], num(r["value"], 3)] for r in results
               if (c := str(r["case"])).startswith("resume-all/")]
    return [
        Table(f"post latency, {n} posts from one client (one run, three daemons)",
              ["journal", "median us", "p99 us", "service CPU s / M posts"], body,
              notes=["tmpfs: --journal in /dev/shm; disk-fsync: --journal on disk "
                     "with --fsync (fdatasync per group commit)"]),
        Table("restart on a tmpfs journal (SIGKILL, then exec until listening)",
              ["semaphores", "seconds"], restart),
        Table("restart until every waiting client has resumed (SIGKILL, exec, then each "
              "client reconnects and sends RESUME, one after the other)",
              ["waiting clients", "seconds"], resumed),
    ]
