"""Service capacity: authenticated operations per second that one service core sustains.

A ping-pong client cannot measure this on a small machine: each Python client spends
more CPU per call than the service does, so the clients saturate the cores first. Here
the load generators do almost nothing at measuring time, like ``redis-benchmark -P``:
each opens a real session (Noise handshake, real socket, real ``SO_PEERCRED``), opens a
semaphore, and encrypts its whole stream of POST/WAIT requests *before* the clock
starts; during the run it only writes pipelined batches and reads the replies back.
Every reply is decrypted and checked after the clock stops, so a run that was not
served in full, in order and authenticated does not count.

The service does its full work for every request: decrypt, parse, check the handle,
apply it to the table, encode, encrypt, write. Capacity is reported two ways: the
operations per second achieved, and operations per second of service CPU time (its
utime + stime from /proc), which is what one core can sustain.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from esem.bench.common import BenchError, process_cpu
from esem.core.status import Status
from esem.core.table import WaitMode
from esem.paths import read_pubkey
from esem.protocol.constants import Opcode, OpenFlag
from esem.protocol.frames import FrameDecoder
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession

BATCH = 64  # requests per write: bounded so the service never holds a big backlog
RECV_BYTES = 1 << 16


@dataclass(frozen=True)
class LoadResult:
    ops: int
    seconds: float


def _roundtrip(sock: socket.socket, session: ClientSession, frame: bytes) -> list[Reply]:
    sock.sendall(frame)
    while True:
        replies = session.receive_data(sock.recv(RECV_BYTES))
        if replies:
            return replies


def generate_load(socket_path: str, ops: int,
                  ready: Callable[[], object] = lambda: None) -> LoadResult:
    """One load generator: ``ops`` authenticated requests (POST then WAIT, alternating,
    on a semaphore of value 1 so no WAIT ever blocks), pipelined in batches of BATCH.
    ``ready()`` is called once every frame is built, right before the timed stream."""
    pub = read_pubkey(Path(socket_path))
    session = ClientSession(pub)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    try:
        sock.sendall(session.start())
        while not session.established:
            session.receive_data(sock.recv(RECV_BYTES))
        name = f"/esem-capacity-{os.getpid()}"
        opened = _roundtrip(sock, session, session.send_request(Request(
            Opcode.OPEN, session.next_request_id(), name=name,
            oflag=OpenFlag.CREAT, mode=0o600, value=1)))[0]
        if opened.status is not Status.OK:
            raise RuntimeError(f"open {name}: {opened.status.name} {opened.message}")
        handle = opened.handle
        post = Request(Opcode.POST, 0, handle=handle)
        wait = Request(Opcode.WAIT, 0, handle=handle, wait_mode=WaitMode.TRY)
        batches = [
            b"".join(
                session.send_request(post if i % 2 == 0 else wait,
                                     req_id=session.next_request_id())
                for i in range(start, min(start + BATCH, ops))
            )
            for start in range(0, ops, BATCH)
        ]
        counter = FrameDecoder()  # counts whole frames; decryption waits for the end
        received: list[bytes] = []
        ready()
        t0 = time.perf_counter()
        for n, batch in enumerate(batches):
            sock.sendall(batch)
            want = min(BATCH, ops - n * BATCH)
            while want > 0:
                data = sock.recv(RECV_BYTES)
                if not data:
                    raise RuntimeError("service closed the session")
                received.append(data)
                want -= len(counter.feed(data))
        seconds = time.perf_counter() - t0
        # Now check every reply: authenticated, in order, each one OK.
        replies = session.receive_data(b"".join(received))
        bad = [r for r in replies if r.status is not Status.OK]
        if len(replies) != ops or bad or session.pending:
            raise RuntimeError(f"{len(replies)} of {ops} replies, {len(bad)} refused")
        _roundtrip(sock, session, session.send_request(Request(
            Opcode.CLOSE, session.next_request_id(), handle=handle)))
        _roundtrip(sock, session, session.send_request(Request(
            Opcode.UNLINK, session.next_request_id(), name=name)))
        return LoadResult(ops, seconds)
    finally:
        sock.close()


def _generator(socket_path: str, ops: int, ready: mp.synchronize.Barrier,
               out: mp.queues.Queue[tuple[int, float] | str]) -> None:
    try:
        r = generate_load(socket_path, ops, ready=ready.wait)
        out.put((r.ops, r.seconds))
    except Exception as exc:  # reported to the parent, which raises
        ready.abort()  # a generator that fails before the barrier must not hang the rest
        out.put(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Capacity:
    clients: int
    ops: int
    seconds: float  # wall time from the first batch sent to the last reply read
    service_cpu: float  # service CPU seconds over the same span (utime + stime)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def ops_per_cpu_s(self) -> float:
        """What one fully busy service core sustains."""
        return self.ops / self.service_cpu if self.service_cpu > 0 else float("inf")


def measure_capacity(socket_path: str, service_pid: int, *, clients: int = 2,
                     ops_per_client: int = 100_000) -> Capacity:
    """Run ``clients`` pipelined load generators against the service at ``socket_path``
    (whose process is ``service_pid``, for its CPU clock) and measure."""
    ctx = mp.get_context("fork")
    # Every generator connects and encrypts its whole stream first; the clock and the
    # service's CPU clock start when all of them (and this process) reach the barrier.
    ready = ctx.Barrier(clients + 1)
    out: mp.queues.Queue[tuple[int, float] | str] = ctx.Queue()
    procs = [ctx.Process(target=_generator, args=(socket_path, ops_per_client, ready, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a failure: reported below
        ready.wait()
    cpu0, t0 = process_cpu(service_pid), time.perf_counter()
    results = [out.get() for _ in procs]
    wall, cpu1 = time.perf_counter() - t0, process_cpu(service_pid)
    for p in procs:
        p.join()
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise RuntimeError("load generator failed: " + "; ".join(errors))
    if cpu0 is None or cpu1 is None:
        raise BenchError(f"cannot read the CPU clock of the service (pid {service_pid})")
    ops = sum(r[0] for r in results if not isinstance(r, str))
    return Capacity(clients, ops, wall, cpu1 - cpu0)
