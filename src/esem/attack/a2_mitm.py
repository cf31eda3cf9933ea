"""A2, channel adversary: a man-in-the-middle on the client's socket path.

The adversary stands for the kernel, which carries every byte of IPC: it sits between a
victim client and the service and may read, drop, delay, duplicate, replay, reorder,
flip, truncate, inject and forge frames. Here it is a real proxy (``MitmProxy``): a Unix
socket in ``target.workdir`` served by threads of this process, which relays every
connection to the real service frame by frame (``u32 length | body``). The handshake
frames pass untouched; after it, a per-direction one-shot hook (``Link.arm``) may tamper
with the Nth or the next frame of either direction (client to service ``c2s``, service to
client ``s2c``), or the scenario injects frames of its own.

The victim is an ordinary ``Client(proxy_path, pubkey=target.pubkey)``, as if the kernel
had rerouted its connection, with a short keepalive so that a dropped frame surfaces at
once. It opens a semaphore that an honest, direct "admin" client created (value 0, so a
wait can only end in success if the service grants it), then waits and posts through
the proxy while the adversary acts. Every strategy attacks the replies (and all but
``delay`` the requests too), each scenario on a fresh semaphore, proxy and session:

* ``s2c``: the prize is a wait that returns without a grant. The tampered wait must end
  in ``IntegrityError`` (for ``drop``/``delay``: any error or timeout, never success).
* ``c2s``: the prize is a unit the victim never posted (a replayed or duplicated POST).
  The service must drop the session on the first frame that fails authentication, so
  the victim's next operation fails (``ServiceUnavailable``), and no unit appears.

The truth is read from the service through the admin client (``STAT``): ``waits`` (grants
the service gave), ``posts``, ``value``, holders and queue. A scenario is defended iff
its tampered operations ended as required, the victim returned from no more waits than
the service granted, the service counted no post the victim did not send and lost none
it acknowledged, conservation (``value == initial + posts - waits + robust_releases``)
holds, and the victim's handles and queued waits were gone once its session ended. A
strategy row is ``defended`` iff all its scenarios are; anything else is ``broken``, with
the reason first in the evidence. Rows exist for ``esem`` and, with a key-bound
semaphore (every operation and reply MAC'd under the semaphore's key), ``esem+key``.

The same scenarios run against the native client (``esem-native``, ``esem-native+key``):
the victim is then a C program using ``sem_wait``/``sem_post`` under the preload library
(``native_victim``), its session pointed at the proxy; a tampered frame must come back
as ``-1`` with an errno (``EPROTO`` for a failed authentication, read as
``IntegrityError``), never as a success. The native client's keepalive is the
protocol's 5 s (not the Python victims' 0.3 s), so a dropped frame surfaces later and
the operations get a longer bound. Without a C compiler or a built preload library
those rows are ``n/a``, saying which is missing.

Legacy POSIX semaphores have no channel at all (the count is a word in shared memory,
see A1), so their row is ``n/a``.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from esem.api import O_CREAT, O_EXCL, USE_ESEM, EsemSemaphore, sem_open, sem_unlink
from esem.attack.base import Outcome, Target
from esem.attack.native_victim import NativeBuild, NativeSem, NativeVictim
from esem.attack.native_victim import build as build_native
from esem.client.admin import stat_semaphore
from esem.client.blocking import Client
from esem.core.status import Status
from esem.errors import BusyError, IntegrityError, ServiceUnavailable
from esem.protocol.constants import (
    AEAD_TAG_BYTES,
    HANDLE_BYTES,
    MAC_BYTES,
    MAX_FRAME_BODY,
    REPLY_HEADER,
    Opcode,
)
from esem.protocol.crypto import generate_static_key, public_key_of
from esem.protocol.messages import Reply, Request, encode_reply, encode_request
from esem.protocol.session import ClientSession, ServerSession

LABEL = "A2"
STRATEGIES: tuple[str, ...] = (
    "drop",
    "delay",
    "duplicate",
    "replay-grant",
    "reorder",
    "flip-bits",
    "truncate",
    "inject-random",
    "forge-grant",
)
ESEM_BACKENDS: tuple[str, ...] = ("esem", "esem+key")
NATIVE_BACKENDS: tuple[str, ...] = ("esem-native", "esem-native+key")

C2S = "c2s"  # victim -> service
S2C = "s2c"  # service -> victim
KEEPALIVE = 0.3  # seconds: the victims' keepalive, so a dropped frame surfaces quickly
TIMED = 0.15  # seconds: the victims' timed waits
HOLD = 1.5  # seconds the delay strategy holds a direction (beyond 2 keepalives)
OP_BOUND = 4.0  # seconds: a victim operation still running by then "hung"
# The native client pings after KEEPALIVE_INTERVAL (5 s) without an answer and gives up
# 5 s later: a dropped frame surfaces within about 10 s.
NATIVE_OP_BOUND = 14.0
SETTLE = 3.0  # seconds for the service to forget a victim session that ended
CLOSE_GRACE = 1.0  # seconds to wait for the service to drop a tampered session
GAP = 0.05  # seconds between a frame and its duplicate, so each is read on its own
REPLY_HEADER_BYTES = struct.calcsize(REPLY_HEADER)
_LEN = struct.Struct(">I")

# What a hook sends on: wire bytes, or a float = hold this direction that many seconds.
Chunk: TypeAlias = bytes | float
Hook: TypeAlias = Callable[["Link", int, bytes], list[Chunk]]


def frame(body: bytes) -> bytes:
    """A frame as the adversary writes it: any body, no checks."""
    return _LEN.pack(len(body)) + body


# ------------------------------------------------------------------ the proxy


class Link:
    """One relayed connection, victim <-> proxy <-> service, with its tamper hooks.

    ``frames[direction]`` holds every transport frame body seen (after the handshake), in
    order; hooks see the frame's index in its direction and decide what goes on.
    """

    def __init__(self, proxy: MitmProxy, client: socket.socket, service: socket.socket) -> None:
        self._proxy = proxy
        self._src = {C2S: client, S2C: service}
        self._dst = {C2S: service, S2C: client}
        self._send_locks = {C2S: threading.Lock(), S2C: threading.Lock()}
        self._cond = threading.Condition()
        self._hooks: dict[str, list[tuple[int | None, Hook]]] = {C2S: [], S2C: []}
        self._closed = threading.Event()
        self.frames: dict[str, list[bytes]] = {C2S: [], S2C: []}
        self.tampered = 0  # hooks that fired
        self.injected = 0  # frames the scenario wrote itself
        self.closed_by: str | None = None  # "client", "service" or "proxy"
        self._threads = [
            threading.Thread(target=self._pump, args=(d,), daemon=True, name=f"a2-mitm-{d}")
            for d in (C2S, S2C)
        ]

    def __repr__(self) -> str:
        return (f"<Link c2s={len(self.frames[C2S])} s2c={len(self.frames[S2C])} "
                f"tampered={self.tampered} injected={self.injected} closed_by={self.closed_by}>")

    def start(self) -> None:
        for t in self._threads:
            t.start()

    # -------------------------------------------------------- adversary's controls

    def arm(self, direction: str, hook: Hook, at: int | None = None) -> None:
        """Run ``hook`` on the transport frame of index ``at`` (None: the next one) in
        ``direction`` instead of forwarding it; it returns what to send on."""
        with self._cond:
            self._hooks[direction].append((at, hook))

    def inject(self, direction: str, wire: bytes) -> None:
        """Write ``wire`` (raw bytes) to the receiver of ``direction``."""
        self._send(direction, wire)
        with self._cond:
            self.injected += 1
            self._cond.notify_all()

    def count(self, direction: str) -> int:
        with self._cond:
            return len(self.frames[direction])

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    @property
    def seen(self) -> int:
        with self._cond:
            return len(self.frames[C2S]) + len(self.frames[S2C])

    @property
    def acted(self) -> int:
        with self._cond:
            return self.tampered + self.injected

    # --------------------------------------------------------------- relaying

    def _pump(self, direction: str) -> None:
        src = self._src[direction]
        buf = bytearray()
        handshake = True
        raw = False  # not the esem framing: relay bytes as they come
        try:
            while not self._closed.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if raw:
                    self._send(direction, data)
                    continue
                buf += data
                while len(buf) >= _LEN.size:
                    (n,) = _LEN.unpack_from(buf)
                    if not 1 <= n <= MAX_FRAME_BODY:
                        raw = True
                        self._send(direction, bytes(buf))
                        buf.clear()
                        break
                    if len(buf) < _LEN.size + n:
                        break
                    body = bytes(buf[_LEN.size : _LEN.size + n])
                    del buf[: _LEN.size + n]
                    if handshake:  # HELLO / WELCOME pass untouched
                        handshake = False
                        self._send(direction, frame(body))
                    elif not self._relay(direction, body):
                        return
        except OSError:
            pass
        finally:
            self.close("client" if direction == C2S else "service")

    def _relay(self, direction: str, body: bytes) -> bool:
        with self._cond:
            index = len(self.frames[direction])
            self.frames[direction].append(body)
            hook: Hook | None = None
            hooks = self._hooks[direction]
            for i, (at, h) in enumerate(hooks):
                if at is None or at == index:
                    hook = h
                    del hooks[i]
                    break
            self._cond.notify_all()
        chunks: list[Chunk] = [frame(body)] if hook is None else hook(self, index, body)
        if hook is not None:
            with self._cond:
                self.tampered += 1
                self._cond.notify_all()
        for chunk in chunks:
            if isinstance(chunk, float):
                if self._closed.wait(chunk):
                    return False
            else:
                self._send(direction, chunk)
        return True

    def _send(self, direction: str, data: bytes) -> None:
        try:
            with self._send_locks[direction]:
                self._dst[direction].sendall(data)
        except OSError:
            self.close("service" if direction == C2S else "client")

    def close(self, by: str) -> None:
        with self._cond:
            if self._closed.is_set():
                return
            self._closed.set()
            self.closed_by = by
            self._cond.notify_all()
        for sock in (self._src[C2S], self._src[S2C]):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def release(self, timeout: float = 2.0) -> None:
        for t in self._threads:
            if t.ident is not None:
                t.join(timeout)
        for sock in (self._src[C2S], self._src[S2C]):
            sock.close()


class MitmProxy:
    """Listens on ``path`` and relays each connection to ``upstream`` through a ``Link``."""

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.links: list[Link] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<MitmProxy {self.path} -> {self.upstream} links={len(self.links)}>"

    def __enter__(self) -> MitmProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> MitmProxy:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            listener.listen(16)
            listener.settimeout(0.05)  # the accept loop notices stop() within this
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, daemon=True, name="a2-mitm-accept")
        self._thread.start()
        return self

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(self.upstream))
            except OSError:
                conn.close()
                upstream.close()
                continue
            link = Link(self, conn, upstream)
            with self._cond:
                self.links.append(link)
                self._cond.notify_all()
            link.start()

    def link(self, index: int, timeout: float = OP_BOUND) -> Link:
        """The ``index``-th connection made to the proxy (waits for it)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.links) > index, timeout):
                raise RuntimeError(f"no connection #{index} reached the proxy")
            return self.links[index]

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._cond:
            links = list(self.links)
        for link in links:
            link.close("proxy")
        for link in links:
            link.release()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @property
    def seen(self) -> int:
        return sum(link.seen for link in self.links)

    @property
    def acted(self) -> int:
        return sum(link.acted for link in self.links)


# --------------------------------------------------------------- the scenarios


class _Op:
    """One victim operation, run in a thread of its own."""

    def __init__(self, label: str, kind: str, fn: Callable[[], object],
                 bound: float = OP_BOUND) -> None:
        self.label = label
        self.kind = kind  # "wait", "post" or "other"
        self.bound = bound
        self.error: BaseException | None = None
        self.done = False
        self.hung = False
        self.elapsed = 0.0
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True,
                                        name=f"a2-victim-{label}")
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.elapsed = time.monotonic() - self._started
            self.done = True

    def finish(self, bound: float | None = None) -> _Op:
        self._thread.join(self.bound if bound is None else bound)
        if self._thread.is_alive():
            self.hung = True
        return self

    @property
    def succeeded(self) -> bool:
        """It returned normally (even if only after it was declared hung)."""
        return self.done and self.error is None

    @property
    def result(self) -> str:
        end = "running" if not self.done else (
            "success" if self.error is None else type(self.error).__name__)
        c_errno = getattr(self.error, "c_errno", None)  # a native victim's sem_* errno
        if c_errno is not None:
            end += f" (-1, errno {c_errno})"
        return f"hung, then {end}" if self.hung else end

    def describe(self) -> str:
        return f"{self.label}: {self.result} after {self.elapsed:.2f}s"


@dataclass(frozen=True)
class ServiceTruth:
    """The semaphore as the service saw it once every victim session had ended."""

    value: int
    initial: int
    posts: int
    waits: int  # grants the service gave
    robust_releases: int
    held: int  # units recorded as held, by live or dead holders
    waiters: int
    handles: int
    settled: bool  # the victims' handles and queued waits were gone

    @property
    def conserved(self) -> bool:
        return self.value == self.initial + self.posts - self.waits + self.robust_releases

    def describe(self) -> str:
        return (f"service: posts={self.posts} grants={self.waits} value={self.value} "
                f"held={self.held} queued={self.waiters}")


@dataclass(frozen=True)
class PhaseResult:
    """One scenario of a strategy: what the adversary did and what came of it."""

    strategy: str
    backend: str
    direction: str
    action: str
    ops: tuple[str, ...]
    frames_seen: int
    frames_tampered: int
    truth: ServiceTruth | None
    reasons: tuple[str, ...]  # why it is not defended; empty when it is

    @property
    def defended(self) -> bool:
        return not self.reasons

    @property
    def evidence(self) -> str:
        parts = [f"{self.direction}: {self.action} -> " + ", ".join(self.ops)]
        if self.truth is not None:
            parts.append(self.truth.describe())
        parts.append(f"proxy saw {self.frames_seen} frames, acted on {self.frames_tampered}")
        text = "; ".join(parts)
        return f"NOT DEFENDED ({'; '.join(self.reasons)}): {text}" if self.reasons else text


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    backend: str
    phases: tuple[PhaseResult, ...]
    seconds: float

    @property
    def defended(self) -> bool:
        return bool(self.phases) and all(p.defended for p in self.phases)

    def outcome(self) -> Outcome:
        bad = [p for p in self.phases if not p.defended]
        evidence = " | ".join(p.evidence for p in bad + [p for p in self.phases if p.defended])
        return Outcome(f"{LABEL} {self.strategy}", self.backend,
                       "defended" if self.defended else "broken", evidence)


@dataclass
class _Env:
    target: Target
    backend: str
    key: bytes | None
    admin: Client
    native: NativeBuild | None = None  # the victims are C programs under the preload

    @property
    def op_bound(self) -> float:
        return OP_BOUND if self.native is None else NATIVE_OP_BOUND


class VictimSem(Protocol):
    """What the scenarios do with a victim's semaphore (Python or native client)."""

    def wait(self) -> None: ...
    def timedwait(self, timeout: float) -> None: ...
    def post(self) -> None: ...
    def getvalue(self) -> int: ...


@dataclass
class _Plan:
    """What a scenario returns: which victim operations the adversary went after."""

    direction: str
    action: str
    tampered: list[_Op]
    expected: tuple[type[BaseException], ...]
    links: list[Link]
    service_must_close: bool = False


INTEGRITY: tuple[type[BaseException], ...] = (IntegrityError,)
LATE: tuple[type[BaseException], ...] = (BusyError, ServiceUnavailable, IntegrityError)
DROPPED: tuple[type[BaseException], ...] = (ServiceUnavailable, IntegrityError)


class _Bench:
    """A fresh semaphore made by the admin, a fresh proxy, and the victims behind it."""

    def __init__(self, env: _Env, label: str, value: int = 0) -> None:
        self.env = env
        self.name = f"/a2-{label}-{secrets.token_hex(4)}"
        self.initial = value
        self.clients: list[Client | NativeVictim] = []
        self.ops: list[_Op] = []
        self.admin_posts = 0
        sem = sem_open(self.name, O_CREAT | O_EXCL, 0o600, value, flags=USE_ESEM,
                       key=env.key, client=env.admin)
        assert isinstance(sem, EsemSemaphore)
        self.admin_sem = sem
        sock = env.target.workdir / f"a2-{secrets.token_hex(4)}.sock"
        try:
            self.proxy = MitmProxy(env.target.socket_path, sock).start()
        except BaseException:
            self._drop_semaphore()
            raise
        self._torn_down = False

    @property
    def keyed(self) -> bool:
        return self.env.key is not None

    @property
    def grant_bytes(self) -> int:
        """Size of a WAIT-OK transport frame body: what a grant looks like on the wire."""
        return REPLY_HEADER_BYTES + (MAC_BYTES if self.keyed else 0) + AEAD_TAG_BYTES

    def victim(self) -> tuple[VictimSem, Link]:
        """A victim client pointed at the proxy, pinned to the real key, with the
        semaphore open through it (for the native backends: a C program's)."""
        if self.env.native is not None:
            native = NativeVictim(self.env.native, self.proxy.path, self.env.target.pubkey)
            self.clients.append(native)
            return (NativeSem.open(native, self.name, self.env.key),
                    self.proxy.link(len(self.clients) - 1))
        client = Client(self.proxy.path, pubkey=self.env.target.pubkey,
                        connect_timeout=OP_BOUND, keepalive=KEEPALIVE)
        self.clients.append(client)
        sem = sem_open(self.name, 0, flags=USE_ESEM, key=self.env.key, client=client)
        assert isinstance(sem, EsemSemaphore)
        return sem, self.proxy.link(len(self.clients) - 1)

    def wait(self, sem: VictimSem, label: str, timeout: float | None = None) -> _Op:
        bound = self.env.op_bound
        if timeout is None:
            op = _Op(label, "wait", sem.wait, bound)
        else:
            op = _Op(f"{label} ({timeout:g}s)", "wait", lambda: sem.timedwait(timeout), bound)
        self.ops.append(op)
        return op

    def post(self, sem: VictimSem, label: str = "post") -> _Op:
        op = _Op(label, "post", sem.post, self.env.op_bound)
        self.ops.append(op)
        return op

    def getvalue(self, sem: VictimSem, label: str = "next getvalue") -> _Op:
        op = _Op(label, "other", sem.getvalue, self.env.op_bound)
        self.ops.append(op)
        return op

    def admin_post(self) -> None:
        self.admin_sem.post()
        self.admin_posts += 1

    def stat(self) -> dict[str, Any]:
        return stat_semaphore(self.env.admin, self.name, key=self.env.key)

    def wait_queued(self, n: int, timeout: float = OP_BOUND) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if int(self.stat()["waiters"]) >= n:
                return True
            time.sleep(0.005)
        return False

    def teardown(self) -> ServiceTruth | None:
        """Stop the victims and the proxy, let the service forget them, read the truth,
        remove the semaphore. Idempotent."""
        if self._torn_down:
            return None
        self._torn_down = True
        # The scenario has already waited for the operations it attacked; whatever still
        # runs must end once the proxy hangs up on it, or it hangs.
        self.proxy.stop()
        for op in self.ops:
            op.finish(2.0)
        for client in self.clients:
            client.close()
        truth: ServiceTruth | None = None
        try:
            deadline = time.monotonic() + SETTLE
            while True:
                info = self.stat()
                settled = int(info["handles"]) == 1 and int(info["waiters"]) == 0
                if settled or time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
            held = sum(int(n) for _, n in info["holders"]) + sum(
                int(n) for _, n in info["dead_holders"])
            truth = ServiceTruth(
                value=int(info["value"]), initial=int(info["initial"]),
                posts=int(info["posts"]), waits=int(info["waits"]),
                robust_releases=int(info["robust_releases"]), held=held,
                waiters=int(info["waiters"]), handles=int(info["handles"]), settled=settled)
        finally:
            self._drop_semaphore()
        return truth

    def _drop_semaphore(self) -> None:
        with contextlib.suppress(Exception):
            self.admin_sem.close()
        with contextlib.suppress(Exception):
            sem_unlink(self.name, flags=USE_ESEM, key=self.env.key, client=self.env.admin)

    def judge(self, strategy: str, plan: _Plan, truth: ServiceTruth | None) -> PhaseResult:
        reasons: list[str] = []
        acted = sum(link.acted for link in plan.links)
        if not acted:
            reasons.append("the adversary never got to act (harness failure)")
        for op in plan.tampered:
            names = "/".join(e.__name__ for e in plan.expected)
            if op.hung:
                reasons.append(f"{op.label} hung ({op.result})")
            elif op.succeeded:
                reasons.append(f"{op.label} returned success")
            elif not isinstance(op.error, plan.expected):
                reasons.append(f"{op.label} ended in {type(op.error).__name__} "
                               f"({op.error}), expected {names}")
        victim_waits = sum(op.succeeded for op in self.ops if op.kind == "wait")
        posts = [op for op in self.ops if op.kind == "post"]
        posts_min = self.admin_posts + sum(op.succeeded for op in posts)
        posts_max = self.admin_posts + len(posts)
        if truth is None:
            reasons.append("could not read the service's state")
        else:
            if victim_waits > truth.waits:
                reasons.append(f"false grant: the victim returned from {victim_waits} waits, "
                               f"the service granted {truth.waits}")
            if truth.posts > posts_max:
                reasons.append(f"unit created: the service counted {truth.posts} posts, "
                               f"at most {posts_max} were sent")
            if truth.posts < posts_min:
                reasons.append(f"unit lost: the service counted {truth.posts} posts, "
                               f"{posts_min} were acknowledged")
            if not truth.conserved:
                reasons.append("conservation broken (value != initial + posts - grants)")
            if truth.held > truth.waits:
                reasons.append(f"{truth.held} units held but only {truth.waits} granted")
            if not truth.settled:
                reasons.append(f"victim session not forgotten ({truth.handles} handles, "
                               f"{truth.waiters} queued waits left)")
        if plan.service_must_close:
            for link in plan.links:
                if link.closed_by != "service":
                    reasons.append("the service did not drop the tampered session "
                                   f"(closed by {link.closed_by or 'nobody'})")
        ops = [op.describe() for op in self.ops]
        return PhaseResult(strategy, self.env.backend, plan.direction, plan.action,
                           tuple(ops), sum(link.seen for link in plan.links), acted, truth,
                           tuple(reasons))


def _inject_then_forward(link: Link, direction: str, wire: bytes, body: bytes) -> list[Chunk]:
    link.inject(direction, wire)
    return [frame(body)]


def _xor(data: bytes, at: int, mask: bytes) -> bytes:
    out = bytearray(data)
    for i, m in enumerate(mask):
        out[at + i] ^= m
    return bytes(out)


def _forged_grant_plain(req_id: int, keyed: bool) -> bytes:
    """A WAIT-OK reply in the clear (with a guessed MAC if the semaphore is keyed)."""
    body = encode_reply(Reply(Opcode.WAIT, req_id, Status.OK), mac=keyed)
    return frame(body + (secrets.token_bytes(MAC_BYTES) if keyed else b""))


def _forged_grant_own_session(req_id: int, counter: int, keyed: bool) -> bytes:
    """A WAIT-OK reply properly encrypted at transport counter ``counter``, but in a
    Noise session the adversary made with a service key of its own (and, if keyed,
    MAC'd under a key it guessed)."""
    private = generate_static_key()
    client = ClientSession(public_key_of(private))
    server = ServerSession(private)
    server.receive_data(client.start())
    client.receive_data(server.data_to_send())
    for i in range(counter):  # advance the nonce to the victim's next counter
        server.send_reply(Reply(Opcode.PING, i + 1, Status.OK))
    server.data_to_send()
    server.send_reply(Reply(Opcode.WAIT, req_id, Status.OK),
                      mac_key=secrets.token_bytes(32) if keyed else None)
    return server.data_to_send()


def _hold_and_swap(direction: str) -> Hook:
    """Hold the next frame until the one after it arrives, then send them swapped."""
    held: list[bytes] = []

    def second(_link: Link, _i: int, body: bytes) -> list[Chunk]:
        return [frame(body), frame(held[0])]

    def first(link: Link, _i: int, body: bytes) -> list[Chunk]:
        held.append(body)
        link.arm(direction, second)
        return []

    return first


# Each scenario gets a fresh bench and returns its plan; teardown and judging follow.

def _drop_s2c(b: _Bench) -> _Plan:
    sem, link = b.victim()
    w = b.wait(sem, "wait")
    b.wait_queued(1)
    link.arm(S2C, lambda _l, _i, _body: [])
    b.admin_post()  # the service grants the queued wait; the grant is dropped
    w.finish()
    return _Plan(S2C, "dropped the grant of a queued wait (the service did grant it)",
                 [w], LATE, [link])


def _drop_c2s(b: _Bench) -> _Plan:
    sem, link = b.victim()
    link.arm(C2S, lambda _l, _i, _body: [])
    w = b.wait(sem, "wait")
    link.wait_until(lambda: link.tampered >= 1, OP_BOUND)
    b.admin_post()  # a unit is free, but the service never saw the wait
    w.finish()
    return _Plan(C2S, "dropped the WAIT request, then a unit was posted", [w], LATE, [link],
                 service_must_close=True)


def _delay_s2c(b: _Bench) -> _Plan:
    sem, link = b.victim()
    link.arm(S2C, lambda _l, _i, body: [HOLD, frame(body)])
    w = b.wait(sem, "timedwait", timeout=TIMED)
    link.wait_until(lambda: link.tampered >= 1, OP_BOUND)
    b.admin_post()  # after the deadline: a unit the late answer must not turn into a grant
    w.finish()
    return _Plan(S2C, f"held the timed wait's answer and everything after it {HOLD:g}s, "
                 "posting a unit meanwhile", [w], LATE, [link])


def _duplicate_s2c(b: _Bench) -> _Plan:
    sem, link = b.victim()
    w1 = b.wait(sem, "wait 1")
    b.wait_queued(1)
    link.arm(S2C, lambda _l, _i, body: [frame(body), GAP, frame(body)])
    b.admin_post()
    w1.finish()
    w2 = b.wait(sem, "wait 2", timeout=TIMED)  # nothing to take: only the copy could end it
    w2.finish()
    return _Plan(S2C, f"delivered the grant of wait 1 twice, {GAP:g}s apart", [w2],
                 INTEGRITY, [link])


def _duplicate_c2s(b: _Bench) -> _Plan:
    sem, link = b.victim()
    link.arm(C2S, lambda _l, _i, body: [frame(body), GAP, frame(body)])
    b.post(sem).finish()
    link.wait_until(lambda: link.closed_by is not None, CLOSE_GRACE)
    g = b.getvalue(sem)
    g.finish()
    return _Plan(C2S, f"sent the victim's POST request twice, {GAP:g}s apart", [g], DROPPED,
                 [link], service_must_close=True)


def _replay_grant_same_session(b: _Bench) -> _Plan:
    sem, link = b.victim()
    w1 = b.wait(sem, "wait 1")
    b.wait_queued(1)
    b.admin_post()
    w1.finish()
    grant = frame(link.frames[S2C][-1])  # the frame that carried wait 1's grant
    link.arm(C2S, lambda lk, _i, body: _inject_then_forward(lk, S2C, grant, body))
    w2 = b.wait(sem, "wait 2", timeout=TIMED)
    w2.finish()
    return _Plan(S2C, "replayed the earlier grant of wait 1 as the answer to wait 2",
                 [w2], INTEGRITY, [link])


def _replay_grant_other_session(b: _Bench) -> _Plan:
    sem_a, link_a = b.victim()
    wa = b.wait(sem_a, "session A wait")
    b.wait_queued(1)
    b.admin_post()
    wa.finish()
    counter = link_a.count(S2C) - 1
    grant = frame(link_a.frames[S2C][-1])
    sem_b, link_b = b.victim()
    aligned = link_b.count(S2C) == counter and link_b.count(C2S) == link_a.count(C2S) - 1
    link_b.arm(C2S, lambda lk, _i, body: _inject_then_forward(lk, S2C, grant, body))
    wb = b.wait(sem_b, "session B wait", timeout=TIMED)
    wb.finish()
    how = "same counter and request id" if aligned else "misaligned counter"
    return _Plan(S2C, f"replayed session A's grant into session B ({how})", [wb],
                 INTEGRITY, [link_a, link_b])


def _replay_c2s(b: _Bench) -> _Plan:
    sem, link = b.victim()
    b.post(sem).finish()
    link.inject(C2S, frame(link.frames[C2S][-1]))  # the POST request, once more
    link.wait_until(lambda: link.closed_by is not None, CLOSE_GRACE)
    g = b.getvalue(sem)
    g.finish()
    return _Plan(C2S, "replayed the victim's earlier POST request", [g], DROPPED, [link],
                 service_must_close=True)


def _reorder_s2c(b: _Bench) -> _Plan:
    sem, link = b.victim()
    w1 = b.wait(sem, "wait 1")
    b.wait_queued(1)
    w2 = b.wait(sem, "wait 2")
    b.wait_queued(2)
    link.arm(S2C, _hold_and_swap(S2C))
    b.admin_post()
    b.admin_post()
    w1.finish()
    w2.finish()
    return _Plan(S2C, "delivered the grant of wait 2 before the grant of wait 1 (FIFO)",
                 [w1, w2], INTEGRITY, [link])


def _reorder_c2s(b: _Bench) -> _Plan:
    sem, link = b.victim()
    link.arm(C2S, _hold_and_swap(C2S))
    w = b.wait(sem, "wait")
    link.wait_until(lambda: link.tampered >= 1, OP_BOUND)
    p = b.post(sem)
    w.finish()
    p.finish()
    return _Plan(C2S, "sent the victim's POST before its earlier WAIT", [w, p], DROPPED,
                 [link], service_must_close=True)


def _flip_s2c(b: _Bench) -> _Plan:
    """ChaCha20 is a stream cipher: flipping ciphertext bits flips the same plaintext
    bits. The keepalive reply (PING OK, request n+2) differs from a grant of the pending
    wait (WAIT OK, request n+1) only in the opcode and request id, so the flip below
    turns it into a perfect grant unless the tag catches it."""
    sem, link = b.victim()
    n = link.count(C2S)  # the WAIT is request n+1, the keepalive PING request n+2
    mask = ((n + 1) ^ (n + 2)).to_bytes(8, "big")

    def flip(_l: Link, _i: int, body: bytes) -> list[Chunk]:
        body = _xor(body, 1, bytes([Opcode.PING ^ Opcode.WAIT]))
        return [frame(_xor(body, 3, mask))]

    def on_ping(link_: Link, _i: int, body: bytes) -> list[Chunk]:
        link_.arm(S2C, flip)
        return [frame(body)]

    link.arm(C2S, on_ping, at=n + 1)
    w = b.wait(sem, "wait")
    w.finish()
    return _Plan(S2C, "flipped the opcode and request-id bits of the keepalive reply so "
                 "it would read as a grant of the pending wait", [w], INTEGRITY, [link])


def _flip_c2s(b: _Bench) -> _Plan:
    sem, link = b.victim()
    where: list[str] = []

    def flip(_l: Link, _i: int, body: bytes) -> list[Chunk]:
        at, bit = secrets.randbelow(len(body)), secrets.randbelow(8)
        where.append(f"bit {bit} of byte {at}/{len(body)}")
        return [frame(_xor(body, at, bytes([1 << bit])))]

    link.arm(C2S, flip)
    p = b.post(sem)
    p.finish()
    return _Plan(C2S, f"flipped {where[0] if where else 'one bit'} of a POST request", [p],
                 DROPPED, [link], service_must_close=True)


def _truncate_s2c_refit(b: _Bench) -> _Plan:
    sem, link = b.victim()
    tail = b.grant_bytes - REPLY_HEADER_BYTES

    def cut(_l: Link, _i: int, body: bytes) -> list[Chunk]:
        return [frame(body[:REPLY_HEADER_BYTES] + body[-tail:])]

    link.arm(S2C, cut)
    w = b.wait(sem, "timedwait", timeout=TIMED)
    w.finish()
    return _Plan(S2C, f"cut the ETIMEDOUT reply to the {b.grant_bytes} bytes of a grant "
                 "(length prefix rewritten)", [w], INTEGRITY, [link])


def _truncate_s2c_stream(b: _Bench) -> _Plan:
    sem, link = b.victim()
    link.arm(S2C, lambda _l, _i, body: [frame(body)[:-1]])
    w = b.wait(sem, "timedwait", timeout=TIMED)
    w.finish()
    return _Plan(S2C, "cut the last byte of the ETIMEDOUT reply off the stream (length "
                 "prefix kept)", [w], INTEGRITY, [link])


def _truncate_c2s(b: _Bench) -> _Plan:
    sem, link = b.victim()
    link.arm(C2S, lambda _l, _i, body: [frame(body[:-1])])
    p = b.post(sem)
    p.finish()
    return _Plan(C2S, "cut the last byte of a POST request (length prefix rewritten)", [p],
                 DROPPED, [link], service_must_close=True)


def _inject_s2c(b: _Bench) -> _Plan:
    sem, link = b.victim()
    size = b.grant_bytes
    link.arm(C2S, lambda lk, _i, body: _inject_then_forward(
        lk, S2C, frame(secrets.token_bytes(size)), body))
    w = b.wait(sem, "timedwait", timeout=TIMED)
    w.finish()
    return _Plan(S2C, f"injected a random {size}-byte frame (a grant's size) while the "
                 "wait was pending", [w], INTEGRITY, [link])


def _inject_c2s(b: _Bench) -> _Plan:
    sem, link = b.victim()
    link.inject(C2S, frame(secrets.token_bytes(1 + secrets.randbelow(96))))
    p = b.post(sem)
    p.finish()
    return _Plan(C2S, "injected a random frame toward the service before a POST", [p],
                 DROPPED, [link], service_must_close=True)


def _forge_plain(b: _Bench) -> _Plan:
    sem, link = b.victim()
    req_id = link.count(C2S) + 1
    forged = _forged_grant_plain(req_id, b.keyed)
    link.arm(C2S, lambda lk, _i, body: _inject_then_forward(lk, S2C, forged, body))
    w = b.wait(sem, "timedwait", timeout=TIMED)
    w.finish()
    what = "a plaintext WAIT-OK" + (" with a guessed key MAC" if b.keyed else "")
    return _Plan(S2C, f"forged {what} for request {req_id}", [w], INTEGRITY, [link])


def _forge_own_session(b: _Bench) -> _Plan:
    sem, link = b.victim()
    req_id = link.count(C2S) + 1
    forged = _forged_grant_own_session(req_id, link.count(S2C), b.keyed)
    link.arm(C2S, lambda lk, _i, body: _inject_then_forward(lk, S2C, forged, body))
    w = b.wait(sem, "timedwait", timeout=TIMED)
    w.finish()
    what = "a WAIT-OK encrypted at the right counter in a session under its own key"
    if b.keyed:
        what += ", MAC'd under a guessed key"
    return _Plan(S2C, f"forged {what}", [w], INTEGRITY, [link])


def _forge_c2s(b: _Bench) -> _Plan:
    sem, link = b.victim()
    req_id = link.count(C2S) + 1
    body = encode_request(Request(Opcode.POST, req_id, handle=secrets.token_bytes(HANDLE_BYTES)),
                          mac=b.keyed)
    link.inject(C2S, frame(body + (secrets.token_bytes(MAC_BYTES) if b.keyed else b"")))
    p = b.post(sem)
    p.finish()
    return _Plan(C2S, "forged a plaintext POST request toward the service", [p], DROPPED,
                 [link], service_must_close=True)


Scenario: TypeAlias = Callable[[_Bench], _Plan]

SCENARIOS: dict[str, tuple[Scenario, ...]] = {
    "drop": (_drop_s2c, _drop_c2s),
    "delay": (_delay_s2c,),
    "duplicate": (_duplicate_s2c, _duplicate_c2s),
    "replay-grant": (_replay_grant_same_session, _replay_grant_other_session, _replay_c2s),
    "reorder": (_reorder_s2c, _reorder_c2s),
    "flip-bits": (_flip_s2c, _flip_c2s),
    "truncate": (_truncate_s2c_refit, _truncate_s2c_stream, _truncate_c2s),
    "inject-random": (_inject_s2c, _inject_c2s),
    "forge-grant": (_forge_plain, _forge_own_session, _forge_c2s),
}
FULL_REPEATS = {"inject-random": 4, "flip-bits": 2}  # more random draws outside quick mode


def _run_phase(env: _Env, strategy: str, scenario: Scenario) -> PhaseResult:
    try:
        bench = _Bench(env, strategy)
    except Exception as exc:
        return PhaseResult(strategy, env.backend, "-", scenario.__name__.strip("_"), (), 0, 0,
                           None, (f"setup failed: {type(exc).__name__}: {exc}",))
    plan: _Plan | None = None
    error: BaseException | None = None
    try:
        plan = scenario(bench)
    except Exception as exc:  # a scenario step failed outright: report it, never hide it
        error = exc
    finally:
        truth = bench.teardown()
    if plan is None:
        return PhaseResult(strategy, env.backend, "-", scenario.__name__.strip("_"),
                           tuple(op.describe() for op in bench.ops), bench.proxy.seen,
                           bench.proxy.acted, truth,
                           (f"scenario failed: {type(error).__name__}: {error}",))
    return bench.judge(strategy, plan, truth)


@contextlib.contextmanager
def _admin(target: Target) -> Iterator[Client]:
    admin = Client(target.socket_path, pubkey=target.pubkey)
    try:
        admin.connect()
        yield admin
    finally:
        admin.close()


def run_strategies(target: Target, strategies: Sequence[str] = STRATEGIES,
                   backends: Sequence[str] = ESEM_BACKENDS,
                   native: NativeBuild | None = None) -> list[StrategyResult]:
    """Every scenario of every strategy, against each esem backend (the native ones
    with the victim ``native``, built by ``native_victim.build``)."""
    results: list[StrategyResult] = []
    for backend in backends:
        if backend not in ESEM_BACKENDS + NATIVE_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        if backend in NATIVE_BACKENDS and native is None:
            raise ValueError(f"backend {backend!r} needs the native victim's build")
    with _admin(target) as admin:
        for strategy in strategies:
            for backend in backends:
                key = secrets.token_bytes(32) if backend.endswith("+key") else None
                env = _Env(target, backend, key, admin,
                           native if backend in NATIVE_BACKENDS else None)
                repeats = 1 if target.quick else FULL_REPEATS.get(strategy, 1)
                start = time.monotonic()
                phases = [_run_phase(env, strategy, scenario)
                          for _ in range(repeats) for scenario in SCENARIOS[strategy]]
                results.append(StrategyResult(strategy, backend, tuple(phases),
                                              time.monotonic() - start))
    return results


LEGACY_ROW = Outcome(
    f"{LABEL} channel", "legacy", "n/a",
    "legacy POSIX semaphores have no channel to attack: sem_wait/sem_post are atomic "
    "operations on a counter in the caller's own mapping of /dev/shm/sem.NAME, so there "
    "is no frame to drop, replay or forge; the adversary that reaches their state writes "
    "that shared memory directly, and wins (A1)",
)


def outcomes(results: Sequence[StrategyResult]) -> list[Outcome]:
    return [LEGACY_ROW] + [r.outcome() for r in results]


def native_na_rows(reason: str) -> list[Outcome]:
    return [Outcome(f"{LABEL} channel", backend, "n/a",
                    f"the native client cannot be attacked on this machine: {reason}")
            for backend in NATIVE_BACKENDS]


def run(target: Target) -> list[Outcome]:
    rows = outcomes(run_strategies(target))
    native = build_native(target.workdir)
    if isinstance(native, str):
        return rows + native_na_rows(native)
    return rows + [r.outcome() for r in run_strategies(target, backends=NATIVE_BACKENDS,
                                                           native=native)]


# ------------------------------------------------------------------ the control


@dataclass(frozen=True)
class ControlResult:
    """The proxy with no tampering at all: esem works through it as through the kernel."""

    ops: tuple[tuple[str, str], ...]  # (label, result)
    value_seen: int | None  # what the victim's getvalue returned
    requests_sent: int  # the victim client's own count
    c2s_frames: int  # transport frames the proxy relayed each way
    s2c_frames: int
    acted: int
    truth: ServiceTruth | None


def run_control(target: Target) -> ControlResult:
    with _admin(target) as admin:
        bench = _Bench(_Env(target, "esem", None, admin), "control")
        value: list[int] = []
        try:
            sem, link = bench.victim()
            w1 = bench.wait(sem, "wait 1")
            bench.wait_queued(1)
            bench.admin_post()
            w1.finish()
            bench.wait(sem, "timedwait", timeout=TIMED).finish()
            bench.post(sem).finish()
            bench.ops.append(_Op("getvalue", "other", lambda: value.append(sem.getvalue())))
            bench.ops[-1].finish()
            client = bench.clients[0]
            assert isinstance(client, Client)  # the control's victim is a Python client
            requests = client.stats.requests
            c2s, s2c = link.count(C2S), link.count(S2C)
        finally:
            truth = bench.teardown()
        return ControlResult(tuple((op.label, op.result) for op in bench.ops),
                             value[0] if value else None, requests, c2s, s2c,
                             bench.proxy.acted, truth)
