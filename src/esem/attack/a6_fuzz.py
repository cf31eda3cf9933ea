"""A6, malformed input: a fuzzer against the live service while a bystander works.

A forked fuzzer process opens connection after connection to the service and sends each
one malformed frame (or raw garbage), optionally followed by more garbage in the same
write:

* before the handshake: random bytes, random frames, zero and oversized length prefixes,
  bit-flipped and truncated HELLOs, HELLOs with another version, kind, payload size, or
  sealed to another service key;
* after a real handshake (``Initiator`` against the pinned key): random and bit-flipped
  ciphertext, truncated frames, zero and oversized lengths, maximal frames, and frames
  that authenticate but carry random or mutated plaintext (checked locally not to parse),
  a request id that does not increase, or a handshake frame. Some sessions first send a
  few well-formed hostile requests (unknown handles and names, stray cancels), which
  must be answered with a refusal and leave the session open.

For each connection it checks that the service closes it: at once for a complete bad
frame, on end-of-stream for an incomplete one. Meanwhile, in this process, a bystander
session keeps waiting and posting on two semaphores (one key-bound) and another session
keeps a wait queued on a third. Afterwards the service must still take new sessions,
the bystander must never have seen an error or a wrong value, the queued wait must still
be granted, and every semaphore the service lists must be exactly as before (the
bystander's own only advanced by the operations it made). The service log, when found
beside the socket, must show no traceback.

Legacy semaphores have no parser and no peer to feed: ``n/a``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esem.api import O_CREAT, O_EXCL, USE_ESEM, EsemSemaphore, sem_open, sem_unlink
from esem.attack.base import Outcome, Target, reap
from esem.client.admin import list_semaphores, stat_semaphore
from esem.client.blocking import Client
from esem.core.status import Status
from esem.core.table import WaitMode
from esem.errors import EsemError, ProtocolError
from esem.protocol.constants import (
    MAX_FRAME_BODY,
    MAX_PLAINTEXT,
    VERSION,
    FrameKind,
    Opcode,
    OpenFlag,
)
from esem.protocol.crypto import Initiator, Transport, generate_static_key, public_key_of
from esem.protocol.frames import FrameDecoder, encode_frame
from esem.protocol.messages import Request, decode_reply, decode_request, encode_request

LABEL = "A6 malformed input"
FULL_FRAMES = 10_000
QUICK_FRAMES = 3_000
FULL_TIME_LIMIT = 240.0  # seconds; the fuzzer stops there even short of its count
QUICK_TIME_LIMIT = 30.0
_PROTOCOL_ERROR = re.compile(r"session \S+ protocol error: .*; closing$", re.MULTILINE)
CLOSE_TIMEOUT = 2.0  # seconds the service may take to close a connection
HANDSHAKE_TIMEOUT = 5.0


# ---------------------------------------------------------------- the fuzzer


@dataclass
class FuzzStats:
    seed: int
    target: int
    frames: int = 0  # malformed frames or garbage blobs, one per connection
    trailing: int = 0  # further garbage frames sent behind the malformed one
    connections: int = 0
    before_handshake: int = 0
    after_handshake: int = 0
    hostile_requests: int = 0  # well-formed requests with bogus handles/names
    hostile_answered: int = 0  # ... answered by the service, session still open
    closed_by_service: int = 0  # closed at once after a complete malformed frame
    closed_on_eof: int = 0  # incomplete input: closed once our side ended
    left_open: int = 0  # not closed within CLOSE_TIMEOUT (an anomaly)
    anomalies: list[str] = field(default_factory=list)  # what they were sent
    answered_garbage: int = 0  # the service sent bytes back after the malformed input
    refused_sessions: int = 0  # the service refused the connection (quota)
    handshake_failures: int = 0
    elapsed: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)  # answers to hostile requests
    error: str = ""


def _flip(rng: random.Random, data: bytes, start: int = 0) -> bytes:
    """``data`` with 1 to 4 distinct bits flipped (never the same bit twice: two flips of
    one bit would give back the valid input)."""
    out = bytearray(data)
    for bit in rng.sample(range(start * 8, len(out) * 8), rng.randint(1, 4)):
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _hs(version: int, kind: int, payload: bytes) -> bytes:
    return encode_frame(bytes((version, kind)) + payload)


def _hello(pubkey: bytes) -> bytes:
    return _hs(VERSION, FrameKind.HELLO, Initiator(pubkey).hello())


def _oversized(rng: random.Random) -> bytes:
    return struct.pack(">I", rng.randrange(MAX_FRAME_BODY + 1, 2**32)) + rng.randbytes(
        rng.randrange(0, 64))


def _zero(rng: random.Random) -> bytes:
    return struct.pack(">I", 0) + rng.randbytes(rng.randrange(0, 64))


Pre = Callable[[random.Random, bytes], bytes]

PRE_HANDSHAKE: dict[str, Pre] = {
    "pre random bytes": lambda r, k: r.randbytes(r.randint(1, 300)),
    "pre random frame": lambda r, k: encode_frame(r.randbytes(r.randint(1, 300))),
    "pre oversized length": lambda r, k: _oversized(r),
    "pre zero length": lambda r, k: _zero(r),
    "pre bit-flipped HELLO": lambda r, k: _flip(r, _hello(k)),
    "pre truncated HELLO": lambda r, k: _hello(k)[: r.randrange(1, 54)],
    "pre HELLO other version": lambda r, k: _hs(r.choice([0, 2, 255]), FrameKind.HELLO,
                                                Initiator(k).hello()),
    "pre HELLO other kind": lambda r, k: _hs(VERSION, r.choice([0, 2, 3, 4, 255]),
                                             Initiator(k).hello()),
    "pre HELLO long payload": lambda r, k: _hs(VERSION, FrameKind.HELLO,
                                               Initiator(k).hello() + r.randbytes(
                                                   r.randint(1, 64))),
    "pre HELLO short payload": lambda r, k: _hs(VERSION, FrameKind.HELLO,
                                                Initiator(k).hello()[: r.randrange(0, 48)]),
    "pre HELLO for another key": lambda r, k: _hello(public_key_of(generate_static_key())),
}


class _Live:
    """A raw session after a real handshake: the fuzzer encrypts whatever it likes."""

    def __init__(self, sock: socket.socket, transport: Transport) -> None:
        self.sock = sock
        self.transport = transport
        self.next_id = 1
        self.decoder = FrameDecoder()

    def frame(self, plaintext: bytes) -> bytes:
        return encode_frame(self.transport.encrypt(plaintext))

    def plain(self, req: Request) -> bytes:
        body = encode_request(req, req_id=self.next_id)
        self.next_id += 1
        return body

    def harmless(self, rng: random.Random) -> bytes:
        """A well-formed request that can change nothing (unknown names, handles)."""
        handle = rng.randbytes(16)
        name = f"/esem-a6-nx-{rng.randbytes(8).hex()}"
        req = rng.choice([
            Request(Opcode.OPEN, 0, name=name, mode=0o600),
            Request(Opcode.OPEN, 0, name=name, oflag=OpenFlag.EXCL),
            Request(Opcode.UNLINK, 0, name=name),
            Request(Opcode.STAT, 0, name=name),
            Request(Opcode.POST, 0, handle=handle),
            Request(Opcode.GETVALUE, 0, handle=handle),
            Request(Opcode.CLOSE, 0, handle=handle),
            Request(Opcode.ATTACH, 0, handle=handle),
            Request(Opcode.WAIT, 0, handle=handle, wait_mode=WaitMode.BLOCK),
            Request(Opcode.WAIT, 0, handle=handle, wait_mode=WaitMode.TIMED,
                    timeout_ns=rng.randrange(2**63)),
            Request(Opcode.CANCEL, 0, target=rng.randrange(1, 2**64)),
            Request(Opcode.LIST, 0, after=f"/{rng.randrange(2**32):x}"),
            Request(Opcode.PING, 0),
        ])
        return self.plain(req)

    def reply(self) -> Status:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the service closed a well-formed session")
            frames = self.decoder.feed(data)
            if frames:
                reply, _, _ = decode_reply(self.transport.decrypt(frames[0]))
                return reply.status


def _unparsable(rng: random.Random, make: Callable[[], bytes]) -> bytes:
    """A plaintext from ``make`` that the request decoder refuses (tries a few)."""
    for _ in range(20):
        data = make()
        try:
            decode_request(data)
        except ProtocolError:
            return data
    return b"\xff" * rng.randint(1, 64)  # version 255: never parses


def _mutate(rng: random.Random, live: _Live) -> bytes:
    plain = live.harmless(rng)
    how = rng.randrange(4)
    if how == 0:
        return _flip(rng, plain)
    if how == 1:
        return plain[: rng.randrange(0, len(plain))]
    if how == 2:
        return plain + rng.randbytes(rng.randint(1, 40))
    i = rng.randrange(len(plain))
    return plain[:i] + bytes((rng.randrange(256),)) + plain[i + 1:]


Post = Callable[[random.Random, _Live], bytes]

POST_HANDSHAKE: dict[str, Post] = {
    "post random bytes": lambda r, s: r.randbytes(r.randint(1, 300)),
    "post random ciphertext": lambda r, s: encode_frame(r.randbytes(r.randint(1, 400))),
    "post maximal random frame": lambda r, s: encode_frame(r.randbytes(MAX_FRAME_BODY)),
    "post oversized length": lambda r, s: _oversized(r),
    "post zero length": lambda r, s: _zero(r),
    "post bit-flipped request": lambda r, s: _flip(r, s.frame(s.harmless(r))),
    "post truncated request": lambda r, s: (lambda f: f[: r.randrange(1, len(f))])(
        s.frame(s.harmless(r))),
    "post reframed truncation": lambda r, s: (lambda b: encode_frame(
        b[: r.randrange(1, len(b))]))(s.transport.encrypt(s.harmless(r))),
    "post random plaintext": lambda r, s: s.frame(_unparsable(
        r, lambda: r.randbytes(r.randint(0, 300)))),
    "post maximal plaintext": lambda r, s: s.frame(_unparsable(
        r, lambda: r.randbytes(MAX_PLAINTEXT))),
    "post mutated request": lambda r, s: s.frame(_unparsable(r, lambda: _mutate(r, s))),
    "post stale request id": lambda r, s: s.frame(encode_request(
        Request(Opcode.PING, 0), req_id=r.choice([0, s.next_id - 1]))),
    "post handshake frame": lambda r, s: _hello(public_key_of(generate_static_key())),
}


def _complete(data: bytes) -> bool:
    """Does ``data`` hold a whole frame or a bad length (the service can judge it now)?"""
    try:
        return bool(FrameDecoder().feed(data))
    except ProtocolError:
        return True


def _await_close(sock: socket.socket, complete: bool, stats: FuzzStats, what: str) -> None:
    if not complete:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    sock.settimeout(CLOSE_TIMEOUT)
    got = 0
    try:
        while data := sock.recv(65536):
            got += len(data)
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        stats.left_open += 1
        stats.anomalies.append(f"left open after {what}" + (f", {got} bytes answered"
                                                             if got else ""))
        return
    if got:
        stats.answered_garbage += 1
        stats.anomalies.append(f"answered {got} bytes to {what}")
    if complete:
        stats.closed_by_service += 1
    else:
        stats.closed_on_eof += 1


def _handshake(sock: socket.socket, pubkey: bytes) -> Transport | None:
    """A real NK handshake; None when the service refused the session."""
    init = Initiator(pubkey)
    sock.sendall(_hs(VERSION, FrameKind.HELLO, init.hello()))
    decoder = FrameDecoder()
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed during the handshake")
        frames = decoder.feed(data)
        if frames:
            body = frames[0]
            if body[1] == FrameKind.REFUSED:
                return None
            return init.finish(body[2:])


def fuzz(sock_path: Path, pubkey: bytes, count: int, seed: int, time_limit: float) -> FuzzStats:
    """Send ``count`` malformed inputs, one connection each; stop at ``time_limit``."""
    rng = random.Random(seed)
    stats = FuzzStats(seed=seed, target=count)
    pre, post = list(PRE_HANDSHAKE.items()), list(POST_HANDSHAKE.items())
    start = time.monotonic()
    while stats.frames < count and time.monotonic() - start < time_limit:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock.connect(str(sock_path))
            stats.connections += 1
            if rng.random() < 0.5:
                kind, make = rng.choice(pre)
                item = make(rng, pubkey)
                stats.before_handshake += 1
            else:
                try:
                    transport = _handshake(sock, pubkey)
                except (OSError, EsemError):
                    stats.handshake_failures += 1
                    continue
                if transport is None:
                    stats.refused_sessions += 1
                    continue
                live = _Live(sock, transport)
                if rng.random() < 0.3:
                    try:
                        for _ in range(rng.randint(1, 3)):
                            sock.sendall(live.frame(live.harmless(rng)))
                            stats.hostile_requests += 1
                            status = live.reply()
                            stats.hostile_answered += 1
                            stats.statuses[status.name] = stats.statuses.get(status.name, 0) + 1
                    except (OSError, EsemError):
                        continue  # the service dropped a valid session: counted, reported
                kind, make_post = rng.choice(post)
                item = make_post(rng, live)
                stats.after_handshake += 1
            complete = _complete(item)
            data = item
            if complete and rng.random() < 0.3:  # garbage after the bad frame, too
                extra = [encode_frame(rng.randbytes(rng.randint(1, 100)))
                         for _ in range(rng.randint(1, 5))]
                stats.trailing += len(extra)
                data += b"".join(extra)
            stats.frames += 1
            stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                stats.closed_by_service += 1  # it hung up before we finished writing
                continue
            what = f"{kind} ({'complete' if complete else 'incomplete'}) {data[:64].hex()}"
            _await_close(sock, complete, stats, what)
    stats.elapsed = time.monotonic() - start
    return stats


def _fork_fuzzer(sock_path: Path, pubkey: bytes, count: int, seed: int,
                 time_limit: float) -> tuple[int, int, int]:
    """Fork the fuzzer; it starts when a byte arrives on ``go``. Returns pid, go, out."""
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(go_w)
            os.close(out_r)
            if os.read(go_r, 1):  # nothing: the parent gave up before starting us
                try:
                    result: dict[str, Any] = asdict(
                        fuzz(sock_path, pubkey, count, seed, time_limit))
                except BaseException as exc:
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                    code = 1
                with os.fdopen(out_w, "w") as out:
                    out.write(json.dumps(result))
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(out_w)
    return pid, go_w, out_r


def _collect(pid: int, out_r: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with os.fdopen(out_r, "rb") as out:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = out.read1(65536)
            if not chunk:
                break
            chunks.append(chunk)
    reap(pid, 5)  # it has reported (or timed out): let it exit
    try:
        result: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        return {"error": "the fuzzer process reported nothing"}
    return result


# -------------------------------------------------------------- the bystander


@dataclass
class Bystander:
    x: EsemSemaphore
    y: EsemSemaphore  # key-bound
    cycles: int = 0
    x_ops: list[int] = field(default_factory=lambda: [0, 0])  # waits, posts
    y_ops: list[int] = field(default_factory=lambda: [0, 0])
    wrong_values: int = 0
    error: str = ""

    def loop(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.x.wait()
                self.x_ops[0] += 1
                self.y.wait()
                self.y_ops[0] += 1
                self.y.post()
                self.y_ops[1] += 1
                self.x.post()
                self.x_ops[1] += 1
                if self.x.getvalue() != 3 or self.y.getvalue() != 1:
                    self.wrong_values += 1
                self.cycles += 1
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


def _esem(sem: object) -> EsemSemaphore:
    assert isinstance(sem, EsemSemaphore)
    return sem


def _log_tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _snapshot(client: Client, keys: dict[str, bytes] | None = None) -> dict[str, dict[str, Any]]:
    """Every semaphore as LIST shows it; a key-bound one in ``keys`` as a STAT with its
    key shows it (LIST hides its counts), cut to the same fields."""
    snap = {str(e["name"]): e for e in list_semaphores(client)}
    for name, key in (keys or {}).items():
        if name in snap:
            full = stat_semaphore(client, name, key=key)
            snap[name] = {k: full[k] for k in snap[name]}
    return snap


def run(target: Target) -> list[Outcome]:
    count = QUICK_FRAMES if target.quick else FULL_FRAMES
    limit = QUICK_TIME_LIMIT if target.quick else FULL_TIME_LIMIT
    seed = secrets.randbits(32)
    # Fork before this process has threads or sessions; the fuzzer starts on "go".
    pid, go, out = _fork_fuzzer(target.socket_path, target.pubkey, count, seed, limit)
    tag = secrets.token_hex(5)
    names = [f"/esem-a6-{w}-{tag}" for w in ("x", "y", "z")]
    key = secrets.token_bytes(32)
    log_path = target.socket_path.parent / "service.log"
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    clients = [Client(target.socket_path, pubkey=target.pubkey) for _ in range(3)]
    bystander_client, waiter_client, admin = clients
    stop = threading.Event()
    granted = threading.Event()
    waiter_error: list[str] = []
    problems: list[str] = []
    fuzz_result: dict[str, Any] = {"error": "the fuzzer never started"}
    after: dict[str, dict[str, Any]] = {}
    alive = "no check made"
    held_through = False
    threads: list[threading.Thread] = []
    try:
        mk = O_CREAT | O_EXCL
        by = Bystander(
            _esem(sem_open(names[0], mk, 0o600, 3, flags=USE_ESEM, client=bystander_client)),
            _esem(sem_open(names[1], mk, 0o600, 1, flags=USE_ESEM, key=key,
                           client=bystander_client)),
        )
        z = _esem(sem_open(names[2], mk, 0o600, 0, flags=USE_ESEM, client=waiter_client))

        def wait_z() -> None:
            try:
                z.wait()
                granted.set()
            except Exception as exc:
                waiter_error.append(f"{type(exc).__name__}: {exc}")

        threads.append(threading.Thread(target=wait_z, name="a6-waiter", daemon=True))
        threads[0].start()
        deadline = time.monotonic() + 5
        while stat_semaphore(admin, names[2])["waiters"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = _snapshot(admin, {names[1]: key})
        threads.append(threading.Thread(target=by.loop, args=(stop,), name="a6-bystander",
                                        daemon=True))
        threads[1].start()
        os.write(go, b"g")
        fuzz_result = _collect(pid, out, limit + 60)
        pid = 0
        stop.set()
        threads[1].join(10)
        try:
            fresh = Client(target.socket_path, pubkey=target.pubkey)
            try:
                fresh.call(Request(Opcode.PING, 0))
                after = _snapshot(fresh, {names[1]: key})
                alive = "afterwards a new session was served"
            finally:
                fresh.close()
            held_through = not granted.is_set()
            # The wait queued all along must take the next unit.
            poster = _esem(sem_open(names[2], 0, flags=USE_ESEM, client=admin))
            poster.post()
            threads[0].join(5)
            poster.close()
        except EsemError as exc:
            alive = f"afterwards the service failed: {type(exc).__name__}: {exc}"
            problems.append("the service did not survive")
    finally:
        with contextlib.suppress(OSError):
            os.close(go)
        if pid:
            fuzz_result = _collect(pid, out, 5)
        stop.set()
        owners = (bystander_client, bystander_client, waiter_client)
        for name, client in zip(names, owners, strict=True):
            with contextlib.suppress(EsemError):
                sem_unlink(name, flags=USE_ESEM, key=key if name == names[1] else None,
                           client=client)
        for c in clients:
            c.close()

    # ------------------------------------------------------------- verdict
    changed = sorted(n for n in set(before) | set(after)
                     if n not in names[:2] and before.get(n) != after.get(n))
    own_ok = bool(after)
    for name, ops in ((names[0], by.x_ops), (names[1], by.y_ops)):
        if not after:
            break
        b, a = dict(before[name]), dict(after[name])
        own_ok = own_ok and (a.pop("waits") - b.pop("waits"), a.pop("posts") - b.pop("posts")
                             ) == (ops[0], ops[1]) and a == b
    tail = _log_tail(log_path, log_offset)
    tracebacks = tail.count("Traceback")
    stats = fuzz_result
    if stats.get("error"):
        problems.append(f"fuzzer failed: {stats['error']}")
    frames = int(stats.get("frames", 0))
    if frames < count:
        problems.append(f"only {frames} of {count} frames were sent")
    bad_close = int(stats.get("left_open", 0)) + int(stats.get("answered_garbage", 0))
    if bad_close:
        problems.append(f"{stats.get('left_open')} connections left open, "
                        f"{stats.get('answered_garbage')} answered garbage: "
                        + "; ".join(stats.get("anomalies", [])[:3]))
    if stats.get("hostile_requests") != stats.get("hostile_answered"):
        problems.append("a well-formed session was dropped")
    if stats.get("handshake_failures") or stats.get("refused_sessions"):
        problems.append(f"{stats.get('handshake_failures')} valid handshakes failed, "
                        f"{stats.get('refused_sessions')} sessions were refused")
    if by.error or by.wrong_values or by.cycles == 0:
        problems.append(f"bystander disturbed ({by.cycles} cycles, {by.wrong_values} wrong "
                        f"values, error: {by.error or 'none'})")
    if not held_through or not granted.is_set() or waiter_error:
        problems.append(f"queued wait: held through the fuzz {held_through}, granted "
                        f"afterwards {granted.is_set()} {' '.join(waiter_error)}")
    if changed or not own_ok:
        problems.append(f"semaphores changed: {', '.join(changed) or 'none of the others'}"
                        f"{'' if own_ok else '; bystander counters off'}")
    if tracebacks:
        problems.append(f"{tracebacks} tracebacks in the service log")
    kinds: dict[str, int] = stats.get("kinds", {})
    statuses: dict[str, int] = stats.get("statuses", {})
    evidence = (
        f"{frames} malformed frames (+{stats.get('trailing', 0)} trailing garbage frames "
        f"behind them) over {stats.get('connections', 0)} connections "
        f"({stats.get('before_handshake', 0)} before the handshake, "
        f"{stats.get('after_handshake', 0)} after a real one), plus "
        f"{stats.get('hostile_requests', 0)} well-formed hostile requests, "
        f"{stats.get('hostile_answered', 0)} answered with the session kept open ("
        + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
        + f"), in {float(stats.get('elapsed', 0)):.1f}s, seed {seed}; the service closed "
        f"{stats.get('closed_by_service', 0)} connections at the bad frame and "
        f"{stats.get('closed_on_eof', 0)} incomplete ones at end of stream, "
        f"{stats.get('left_open', 0)} left open, {stats.get('answered_garbage', 0)} "
        f"answered; {alive}; meanwhile a bystander session did {by.cycles} wait/post cycles "
        f"on {names[0]} and key-bound {names[1]}, {by.wrong_values} wrong values, "
        f"error: {by.error or 'none'}; a wait queued on {names[2]} by another session "
        f"stayed queued {held_through} and was granted afterwards {granted.is_set()}; "
        f"{len(after)} listed semaphores, {len(changed)} others changed, the bystander's "
        f"two advanced by exactly its own operations {own_ok}; service log: "
        f"{len(_PROTOCOL_ERROR.findall(tail))} protocol errors logged, {tracebacks} tracebacks; "
        "inputs by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    )
    if problems:
        evidence = "; ".join(problems) + ". " + evidence
    return [
        Outcome(LABEL, "esem", "broken" if problems else "defended", evidence),
        Outcome(LABEL, "legacy", "n/a",
                "legacy semaphores have no parser and no peer: sem_post/sem_wait are "
                "atomic operations on shared memory, there is no input to malform"),
    ]
