"""A7, one tenant against the others: an admin-request flood and half-open connections.

Both rounds run against a daemon of their own with the default quotas, in a directory
other uids can reach, so the service's memory can be measured from a clean start.

* **A7 admin flood.** root fills the table with ``SEMAPHORES`` semaphores (one of them
  with ``QUEUE`` blocking waits queued, from 16 sessions at the per-session quota). A
  rogue process of uid ``nobody`` then opens ``READERS`` connections that send LIST and
  STAT (of the long queue) as fast as the service takes them and read the replies, and
  ``SINKS`` connections that send them and never read one, for ``FLOOD_SECONDS``.
  Meanwhile a bystander of uid ``daemon`` posts and trywaits its own semaphore every
  millisecond, timing each call. ``defended`` when every bystander call was answered,
  none slower than the client's keepalive (``KEEPALIVE_INTERVAL``, after which a client
  declares the service dead), and the service's peak RSS grew by less than
  ``RSS_BOUND_MB``.
* **A7 half-open.** uid ``nobody`` opens ``HALF_OPEN_TRIES`` connections and never sends
  a HELLO. ``defended`` when all but ``HALF_OPEN_PER_UID`` of them are refused at once,
  another uid gets a session meanwhile, the service closes the rest within
  ``HANDSHAKE_TIMEOUT`` (plus a grace), and ``nobody`` then gets a session itself.

The module only uses what a client of any version has (Request, ClientSession, the
blocking client), so the same rounds measure a service without these defences.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open
from esem.attack.a7_exhaust import Channel, Child, RawSession, _ids, _reachable
from esem.attack.base import Outcome, Target
from esem.client.blocking import KEEPALIVE_INTERVAL, Client
from esem.core.table import WaitMode
from esem.errors import EsemError
from esem.protocol.constants import FrameKind, Opcode
from esem.protocol.messages import Request
from esem.protocol.session import ClientSession
from esem.server import service as _service
from esem.server.embedded import EmbeddedService

SEMAPHORES = 1024  # root's default per-uid quota: the whole table of one uid
QUEUE = 4096  # waits queued on one semaphore: the default per-uid quota
QUEUE_SESSIONS = 16  # sessions that queue them (256 each: the per-session quota)
READERS = 4  # flood connections that read their replies
SINKS = 4  # flood connections that never read
FLOOD_SECONDS = 10.0
QUICK_FLOOD_SECONDS = 5.0
BYSTANDER_PERIOD = 0.001  # seconds between the bystander's post/trywait pairs
BASELINE_SECONDS = 2.0  # the bystander alone, before the flood, for comparison
RSS_BOUND_MB = 64  # peak RSS growth allowed during the flood (the fix needs ~10 MB)
CHUNK = 128  # requests the flood encrypts at a time, per connection
HALF_OPEN_TRIES = 200
HALF_OPEN_GRACE = 2.0  # seconds beyond the handshake timeout before judging
# What the service under test enforces (a service without them: the fallbacks).
HANDSHAKE_TIMEOUT = float(getattr(_service, "HANDSHAKE_TIMEOUT", 5.0))
HALF_OPEN_PER_UID = int(getattr(_service, "HALF_OPEN_PER_UID", 0))
Json = dict[str, Any]


def _vm(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------- the flood


class _FloodConn:
    def __init__(self, sock_path: Path, pubkey: bytes, requests: list[Request],
                 reads: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(sock_path))
        self.session = ClientSession(pubkey)
        self.sock.sendall(self.session.start())
        while not self.session.established:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the service closed the flood connection")
            self.session.receive_data(data)
        self.sock.setblocking(False)
        self.requests = requests
        self.reads = reads
        self.out = b""
        self.sent = 0
        self.received = 0
        self.closed = False

    def refill(self) -> None:
        # The replies are never decrypted, so the session's pending set is of no use:
        # clear it, or it would grow by every request sent.
        session = self.session
        frames = []
        for i in range(CHUNK):
            req = self.requests[(self.sent + i) % len(self.requests)]
            frames.append(session.send_request(req, req_id=session.next_request_id()))
        session._pending.clear()
        self.out = b"".join(frames)


def flood(sock_path: Path, pubkey: bytes, names: list[str], queue_name: str,
          seconds: float) -> Any:
    def body(ch: Channel) -> Json:
        mix = [Request(Opcode.LIST, 0), Request(Opcode.STAT, 0, name=queue_name),
               Request(Opcode.STAT, 0, name=names[len(names) // 2])]
        conns = [_FloodConn(sock_path, pubkey, mix, reads=i < READERS)
                 for i in range(READERS + SINKS)]
        ch.send({"connected": len(conns)})
        ch.commanded(None)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            live = [c for c in conns if not c.closed]
            if not live:
                break
            rd = [c.sock for c in live if c.reads]
            wr = [c.sock for c in live]
            r, w, _ = select.select(rd, wr, [], 0.05)
            for c in live:
                try:
                    if c.sock in r:
                        data = c.sock.recv(1 << 20)
                        if not data:
                            c.closed = True
                        c.received += len(data)
                    if c.sock in w and not c.closed:
                        if not c.out:
                            c.refill()
                        n = c.sock.send(c.out)
                        c.out = c.out[n:]
                        c.sent += CHUNK if not c.out else 0
                except BlockingIOError:
                    pass
                except OSError:
                    c.closed = True
        sent = sum(c.sent for c in conns)
        received = sum(c.received for c in conns)
        dropped = sum(c.closed for c in conns)
        ch.send({"sent": sent, "received_bytes": received, "dropped": dropped})
        ch.commanded(None)
        for c in conns:
            c.sock.close()
        return {"done": True}

    return body


def _summary(lat: list[float], errors: list[str]) -> Json:
    lat_ms = sorted(x * 1000 for x in lat)
    return {
        "ops": len(lat_ms), "errors": errors,
        "p50": statistics.median(lat_ms) if lat_ms else None,
        "p99": lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))] if lat_ms else None,
        "max": lat_ms[-1] if lat_ms else None,
    }


def bystander(sock_path: Path, pubkey: bytes, name: str) -> Any:
    """Post and trywait its own semaphore every ``BYSTANDER_PERIOD``, timing each call:
    once before the flood (the baseline, reported when told), once during it."""

    def body(ch: Channel) -> Json:
        client = Client(sock_path, pubkey=pubkey)
        sem = sem_open(name, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM, client=client)
        clock = time.perf_counter

        def phase() -> Json:
            lat: list[float] = []
            errors: list[str] = []
            while not errors and not ch.commanded(BYSTANDER_PERIOD):
                for op in (sem.post, sem.trywait):
                    t0 = clock()
                    try:
                        op()
                    except EsemError as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        break
                    finally:
                        lat.append(clock() - t0)
            if errors:
                ch.commanded(None)  # still wait for the end of the phase
            return _summary(lat, errors)

        ch.send({"ready": True})
        ch.commanded(None)
        ch.send(phase())  # the baseline, until told the flood starts
        during = phase()
        with contextlib.suppress(EsemError):
            sem.close()
            sem.unlink()
        client.close()
        return during

    return body


def _populate(sock_path: Path, pubkey: bytes, tag: str) -> tuple[Client, list[str], str,
                                                                 list[RawSession]]:
    client = Client(sock_path, pubkey=pubkey)
    names = [f"/esem-a7f-{tag}-{i:04d}" for i in range(SEMAPHORES - 1)]
    for name in names:
        sem_open(name, O_CREAT | O_EXCL, 0o644, 1, flags=USE_ESEM, client=client).close()
    queue_name = f"/esem-a7f-{tag}-queue"
    sem_open(queue_name, O_CREAT | O_EXCL, 0o666, 0, flags=USE_ESEM, client=client)
    raws: list[RawSession] = []
    per = QUEUE // QUEUE_SESSIONS
    for _ in range(QUEUE_SESSIONS):
        raw = RawSession(sock_path, pubkey)
        raws.append(raw)
        handle = raw.reply(raw.send(Request(Opcode.OPEN, 0, name=queue_name))).handle
        frames = []
        for _ in range(per):
            req_id = raw.session.next_request_id()
            frames.append(raw.session.send_request(
                Request(Opcode.WAIT, 0, handle=handle, wait_mode=WaitMode.BLOCK),
                req_id=req_id))
        raw.sock.sendall(b"".join(frames))
        raw.reply(raw.send(Request(Opcode.PING, 0)))  # every WAIT before it was handled
    return client, names, queue_name, raws


def admin_flood(sock_path: Path, pubkey: bytes, service_pid: int, tag: str,
                seconds: float, rogue: tuple[int, int],
                victim: tuple[int, int]) -> Json:
    admin, names, queue_name, raws = _populate(sock_path, pubkey, tag)
    try:
        rss0 = _vm(service_pid, "VmRSS")
        f = Child(*rogue, flood(sock_path, pubkey, names, queue_name, seconds))
        b = Child(*victim, bystander(sock_path, pubkey, f"/esem-a7f-{tag}-bystander"))
        try:
            connected, ready = f.recv(), b.recv()
            if "error" in connected or "error" in ready:
                return {"error": connected.get("error") or ready.get("error")}
            b.tell()  # the baseline
            time.sleep(BASELINE_SECONDS)
            b.tell()
            baseline = b.recv()
            f.tell()
            peak = rss0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                peak = max(peak, _vm(service_pid, "VmRSS"))
                time.sleep(0.1)
            flooded = f.recv(seconds + 30)
            b.tell()
            seen = b.recv(60)
            peak = max(peak, _vm(service_pid, "VmRSS"))
            f.finish()
        finally:
            f.reap()
            b.reap()
        # The service must still answer root at once, and have lost no waiter.
        t0 = time.perf_counter()
        try:
            after = (f"a STAT of the long queue "
                     f"({len(admin.call(Request(Opcode.STAT, 0, name=queue_name)).data)} "
                     f"bytes) took {(time.perf_counter() - t0) * 1000:.1f} ms")
        except EsemError as exc:
            after = f"root's STAT failed: {type(exc).__name__}: {exc}"
        return {"rss0_mb": rss0 / 1024, "peak_mb": peak / 1024, "flooded": flooded,
                "bystander": seen, "baseline": baseline, "after": after}
    finally:
        for raw in raws:
            raw.close()
        admin.close()


def half_open(sock_path: Path, pubkey: bytes) -> Any:
    def body(ch: Channel) -> Json:
        held: list[socket.socket] = []
        refused = 0
        for _ in range(HALF_OPEN_TRIES):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock_path))
            held.append(s)
        time.sleep(0.5)  # a refusal is written at accept: it is there by now or never
        readable, _, _ = select.select(held, [], [], 0)
        for s in readable:
            with contextlib.suppress(OSError):
                head = s.recv(64)
                if len(head) >= 6 and head[5] == FrameKind.REFUSED:
                    refused += 1
        ch.send({"tries": HALF_OPEN_TRIES, "refused_at_once": refused})
        ch.commanded(None)
        start = time.monotonic()
        closed = 0
        deadline = start + HANDSHAKE_TIMEOUT + HALF_OPEN_GRACE
        for s in held:
            s.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
            try:
                data = s.recv(64)
                if not data or (len(data) >= 6 and data[5] == FrameKind.REFUSED):
                    with contextlib.suppress(OSError):
                        while s.recv(64):
                            pass
                    closed += 1
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed += 1  # reset by the service: closed too
        waited = time.monotonic() - start
        own = ""
        client = Client(sock_path, pubkey=pubkey)
        try:
            client.call(Request(Opcode.PING, 0))
            own = "served"
        except EsemError as exc:
            own = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
        for s in held:
            s.close()
        return {"closed": closed, "waited": waited, "own": own}

    return body


def other_uid_session(sock_path: Path, pubkey: bytes) -> Any:
    def body(ch: Channel) -> Json:
        client = Client(sock_path, pubkey=pubkey)
        try:
            client.call(Request(Opcode.PING, 0))
            return {"ok": True}
        except EsemError as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            client.close()

    return body


def half_open_round(sock_path: Path, pubkey: bytes, rogue: tuple[int, int],
                    victim: tuple[int, int]) -> Json:
    h = Child(*rogue, half_open(sock_path, pubkey))
    try:
        held = h.recv()
        if "error" in held:
            return held
        v = Child(*victim, other_uid_session(sock_path, pubkey))
        try:
            other = v.recv()
        finally:
            v.reap()
        h.tell()
        after = h.recv(HANDSHAKE_TIMEOUT + HALF_OPEN_GRACE + 30)
        h.reap()
    finally:
        h.reap()
    return {**held, "other": other, **after}


def run(target: Target) -> list[Outcome]:
    tag = secrets.token_hex(4)
    rogue, victim = _ids("nobody", 65534), _ids("daemon", 1)
    seconds = QUICK_FLOOD_SECONDS if target.quick else FLOOD_SECONDS
    tmp: Path | None = None
    base = target.workdir / f"a7f-{tag}"
    if not _reachable(target.workdir):
        tmp = base = Path(tempfile.mkdtemp(prefix="esem-a7f-"))
    base.mkdir(mode=0o755, exist_ok=True)
    os.chmod(base, 0o755)

    rows: list[Outcome] = []
    try:
        # A daemon per round, so that neither round measures the other's aftermath.
        for i, play in enumerate((_play_flood, _play_half_open)):
            directory = base / f"service-{i}"
            directory.mkdir(mode=0o755)
            os.chmod(directory, 0o755)
            service = EmbeddedService(directory)
            try:
                service.start()
                rows.append(play(service, tag, seconds, rogue, victim))
            finally:
                service.cleanup()
    finally:
        shutil.rmtree(tmp if tmp is not None else base, ignore_errors=True)
    return rows


def _play_flood(service: Any, tag: str, seconds: float, rogue: tuple[int, int],
                victim: tuple[int, int]) -> Outcome:
    assert service.proc is not None
    r = admin_flood(service.socket_path, service.pubkey, service.proc.pid, tag, seconds,
                    rogue, victim)
    return _flood_row(r, seconds)


def _play_half_open(service: Any, tag: str, seconds: float, rogue: tuple[int, int],
                    victim: tuple[int, int]) -> Outcome:
    r = half_open_round(service.socket_path, service.pubkey, rogue, victim)
    return _half_open_row(r, rogue[0], victim[0])


def _flood_row(r: Json, seconds: float) -> Outcome:
    if "error" in r:
        return Outcome("A7 admin flood", "esem", "broken", f"the round failed: {r['error']}")
    b, f = r["bystander"], r["flooded"]
    growth = r["peak_mb"] - r["rss0_mb"]
    answered = not b.get("errors") and b.get("ops", 0) > 0
    slowest = float(b["max"]) if b.get("max") is not None else float("inf")
    ok = (answered and slowest < KEEPALIVE_INTERVAL * 1000 and growth < RSS_BOUND_MB
          and "failed" not in r["after"])
    lat = _latency(b)
    base = _latency(r["baseline"])
    return Outcome(
        "A7 admin flood", "esem", "defended" if ok else "broken",
        f"table of {SEMAPHORES} semaphores, one with {QUEUE} queued waits; uid nobody "
        f"flooded LIST and STAT for {seconds:.0f} s from {READERS} connections that read "
        f"and {SINKS} that never read ({f.get('sent', 0)} requests sent, "
        f"{f.get('received_bytes', 0) / 2**20:.0f} MiB of replies read, "
        f"{f.get('dropped', 0)} connections dropped by the service); the bystander of "
        f"uid daemon made {b.get('ops', 0)} post/trywait calls, "
        + ("all answered" if answered else f"FAILED: {'; '.join(b.get('errors', []))}")
        + f": {lat} (alone before the flood: {base}); service RSS {r['rss0_mb']:.0f} MB "
        f"before, peak {r['peak_mb']:.0f} MB "
        f"(+{growth:.0f} MB, bound +{RSS_BOUND_MB} MB); afterwards {r['after']}",
    )


def _latency(b: Json) -> str:
    if not b.get("ops") or b.get("p50") is None:
        return "no call answered"
    return f"p50 {b['p50']:.2f} ms, p99 {b['p99']:.2f} ms, max {b['max']:.1f} ms"


def _half_open_row(r: Json, ru: int, vu: int) -> Outcome:
    if "error" in r:
        return Outcome("A7 half-open", "esem", "broken", f"the round failed: {r['error']}")
    tries, refused = int(r["tries"]), int(r["refused_at_once"])
    other = r.get("other", {})
    held = tries - refused
    ok = (HALF_OPEN_PER_UID > 0 and held <= HALF_OPEN_PER_UID and bool(other.get("ok"))
          and int(r["closed"]) == tries and r["own"] == "served")
    return Outcome(
        "A7 half-open", "esem", "defended" if ok else "broken",
        f"uid {ru} opened {tries} connections and never sent a HELLO: {refused} were refused "
        f"at once, {held} left in their handshake (limit {HALF_OPEN_PER_UID or 'none'} per "
        f"uid); meanwhile uid {vu} "
        + ("got a session" if other.get("ok") else f"was refused: {other.get('error')}")
        + f"; {r['closed']} of {tries} were closed by the service within {r['waited']:.1f} s "
        f"(handshake timeout {HANDSHAKE_TIMEOUT:g} s); then uid {ru}'s own new session was "
        f"{r['own']}",
    )
