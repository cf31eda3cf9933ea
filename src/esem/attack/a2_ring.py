"""A2, channel adversary, switchless edition: the adversary writes the shared rings.

In switchless mode a session's frames travel through a memfd shared by the client and
the service instead of the socket, so the A2 adversary (the kernel, or any process of
the victim's uid) no longer needs a man in the middle: it opens the victim's memfd
through ``/proc/PID/fd`` (as any same-uid process may), maps it, and rewrites slots and
indices at will. It may also stop and resume the victim (SIGSTOP/SIGCONT), so that a
reply sits in the ring, unread, while it works on it.

The victim is a forked process with an ordinary switchless client, commanded over a
pipe; it opens a semaphore an honest admin made (value 0, so a wait can only end in
success if the service grants it). Strategies, each on a fresh semaphore and victim:

* ``ring-flip-bits``: the service grants a queued wait while the victim is stopped; one
  bit of the grant's ciphertext is flipped in the ring before the victim reads it.
* ``ring-replay-grant``: after a genuine grant, the victim waits again; the old grant's
  bytes are appended to the reply ring as the answer.
* ``ring-forge-grant``: a plaintext WAIT-OK frame for the pending request (with a guessed
  key MAC on a key-bound semaphore) is appended to the reply ring.
* ``ring-garbage-indices``: the reply ring's head is set beyond its capacity (the client
  must refuse it), and, in a second scenario, the request ring's head (the service must
  refuse it, ending that session alone).
* ``ring-replay-request``: the victim's last POST frame is appended to the request ring
  (a unit it did not post, if the service accepted it).

The adversary cannot ring the victim's or the service's doorbell (a socket: it cannot be
reopened through /proc); the victim's own backstop and a bystander session's traffic
(the service's poller looks at every ring whenever any rings) make both sides look.

A scenario is ``defended`` iff every tampered operation ended in ``IntegrityError``
(service->client tampering) or ``ServiceUnavailable``/``IntegrityError`` (client->service:
the service dropped the session), the victim returned from no wait the service did not
grant, the service counted no post the victim did not make, conservation holds, the
victim's session was forgotten, and a bystander session kept working throughout. The
truth is the service's STAT, read by the admin. Rows: ``esem`` and ``esem+key``; legacy
has no channel (its shared memory *is* the count, see A1): ``n/a``.

``esem native``: the same scenarios against a C program under the preload library, whose
native client runs the session on the rings (``esem.attack.native_victim``, the C victim
of A2 and A4, started with ``ESEM_SWITCHLESS=1``): a tampered
ring must be an error in the host program (``EPROTO``, or ``EIO`` once the service
dropped the session), never a grant. A native client replaces a failed session on its
next call (as it does after fork), so after a dropped session its next operation is
either refused or goes through a new, honest session; what is judged is that the
tampered one failed and the service's counts.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from esem.api import O_CREAT, O_EXCL, USE_ESEM, EsemSemaphore, sem_open, sem_unlink
from esem.attack.a3_rogue import Channel, Child
from esem.attack.base import Outcome, Target, frozen
from esem.attack.native_victim import NativeBuild, NativeVictim, VictimDied, error_for
from esem.attack.native_victim import build as build_native
from esem.client.admin import stat_semaphore
from esem.client.blocking import Client
from esem.client.switchless import SwitchlessUnavailable
from esem.core.status import Status
from esem.errors import EsemError
from esem.protocol.constants import AEAD_TAG_BYTES, LENGTH_BYTES, MAC_BYTES, Opcode
from esem.protocol.messages import Reply, Request, encode_reply
from esem.protocol.ring import HEADER_BYTES, MASK64, REP_HEAD, REP_TAIL, REQ_HEAD, REQ_TAIL, Region

LABEL = "A2"
STRATEGIES: tuple[str, ...] = ("ring-flip-bits", "ring-replay-grant", "ring-forge-grant",
                               "ring-garbage-indices", "ring-replay-request")
ESEM_BACKENDS: tuple[str, ...] = ("esem", "esem+key")
NATIVE_BACKEND = "esem native"  # a C program under the preload library (no key API)
KEEPALIVE = 1.0  # seconds: the victim's keepalive, so that nothing it does can hang long
OP_BOUND = 6.0  # seconds: a victim operation still running by then "hung"
SETTLE = 3.0  # seconds for the service to forget a victim session that ended
REQUEST_HEADER_BYTES = 11
REPLY_HEADER_BYTES = 13
HANDLE_BYTES = 16

INTEGRITY = ("IntegrityError", "ProtocolError", "RingError")
DROPPED = ("ServiceUnavailable", *INTEGRITY)


# ------------------------------------------------------------------ the victim


def _victim_body(target: Target, name: str, key: bytes | None, ch: Channel) -> None:
    """In the victim process: an ordinary switchless client, doing what it is told."""
    client = Client(target.socket_path, pubkey=target.pubkey, switchless=True,
                    keepalive=KEEPALIVE)
    sem = sem_open(name, 0, flags=USE_ESEM, key=key, client=client)
    assert isinstance(sem, EsemSemaphore) and client._ring is not None
    ch.send({"memfd": client._ring.memfd})
    ops: dict[str, Callable[[], object]] = {"wait": sem.wait, "post": sem.post,
                                            "getvalue": sem.getvalue}
    while True:
        cmd = ch.recv()
        if cmd == "exit":
            return
        try:
            ops[cmd]()
            result = "success"
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"
        ch.send({"result": result})


class _PyVictim:
    """A forked process with the Python switchless client (``_victim_body``)."""

    def __init__(self, target: Target, name: str, key: bytes | None) -> None:
        self.child = _spawn_victim(target, name, key)
        self.pid = self.child.pid
        hello = self.child.channel.recv()
        if "crash" in hello:
            raise RuntimeError(f"victim failed: {hello['crash']}")
        self.memfd = int(hello["memfd"])

    def start(self, op: str) -> None:
        self.child.channel.send(op)

    def result(self) -> str:
        """What the oldest started operation ended in: "success" or "CLASS: text"."""
        msg = self.child.channel.recv()
        return str(msg.get("result", msg.get("crash")))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.child.channel.send("exit")
        if _exited_soon(self.child):
            self.child.channel.close()
        else:
            self.child.kill()


class _CVictim:
    """The C victim under the preload library, its session on the rings."""

    def __init__(self, target: Target, native: NativeBuild, name: str) -> None:
        self.victim = NativeVictim(native, target.socket_path, target.pubkey, switchless=True)
        self.pid = self.victim.pid
        self._started: list[tuple[int, str]] = []
        try:
            opened = self.victim.command(f"open {name}")
            if opened[0] != "0":
                raise RuntimeError(f"victim failed: {error_for(int(opened[1]), 'sem_open')}")
            transport = self.victim.transport()
            if transport != SWITCHLESS:
                raise RuntimeError(f"the native victim's session is not switchless "
                                   f"(esem_transport() = {transport})")
            self.memfd = ring_fd(self.pid)
        except BaseException:
            self.victim.close()
            raise

    def start(self, op: str) -> None:
        self._started.append((self.victim.start(op), op))

    def result(self) -> str:
        op_id, op = self._started.pop(0)
        try:
            rc, err, _ = self.victim.result(op_id, OP_BOUND)
        except VictimDied as exc:
            raise EOFError(str(exc)) from exc
        if rc == 0:
            return "success"
        failure = error_for(err, f"sem_{op}")
        return f"{type(failure).__name__}: {failure}"

    def stop(self) -> None:
        self.victim.close()


SWITCHLESS = 2  # esem_transport(): the session runs on the rings


def ring_fd(pid: int) -> int:
    """The descriptor number of a process's switchless region (its memfd), found as any
    same-uid process finds it: through ``/proc/PID/fd``."""
    base = f"/proc/{pid}/fd"
    for entry in os.listdir(base):
        with contextlib.suppress(OSError):
            if os.readlink(f"{base}/{entry}").startswith("/memfd:esem-ring"):
                return int(entry)
    raise RuntimeError(f"process {pid} has no switchless region open")


def _spawn_victim(target: Target, name: str, key: bytes | None) -> Child:
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        ch = Channel(down_r, up_w)
        try:
            os.close(down_w)
            os.close(up_r)
            _victim_body(target, name, key, ch)
        except BaseException as exc:
            code = 1
            with contextlib.suppress(BaseException):
                ch.send({"crash": f"{type(exc).__name__}: {exc}"})
        finally:
            os._exit(code)
    os.close(down_r)
    os.close(up_w)
    return Child(pid, Channel(up_r, down_w, timeout=OP_BOUND))


class Tap:
    """The adversary's mapping of a victim's rings, through /proc/PID/fd."""

    def __init__(self, pid: int, fd_number: int) -> None:
        path = f"/proc/{pid}/fd/{fd_number}"
        if not os.readlink(path).startswith("/memfd:esem-ring"):
            raise RuntimeError(f"{path} is not an esem ring")
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.cap = (size - HEADER_BYTES) // 2
        self.region = Region(self.mm, self.cap)
        self.ctl = self.region.ctl

    def close(self) -> None:
        self.region.release()
        self.mm.close()

    def _at(self, base: int, counter: int) -> int:
        return base + (counter & (self.cap - 1))

    def reply_offset(self, counter: int) -> int:
        """Where byte ``counter`` of the reply stream lies in the mapping."""
        return self._at(HEADER_BYTES + self.cap, counter)

    def unread_replies(self) -> int:
        return (self.ctl[REP_HEAD] - self.ctl[REP_TAIL]) & MASK64

    def wait_unread(self, n: int, timeout: float = OP_BOUND) -> bool:
        deadline = time.monotonic() + timeout
        while self.unread_replies() < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def flip_unread_reply(self, offset: int) -> None:
        i = self.reply_offset(self.ctl[REP_TAIL] + offset)
        self.mm[i] ^= 1 << secrets.randbelow(8)

    def last_bytes(self, reply: bool, n: int) -> bytes:
        base = HEADER_BYTES + (self.cap if reply else 0)
        head = self.ctl[REP_HEAD if reply else REQ_HEAD]
        return bytes(self.mm[self._at(base, head - n + i)] for i in range(n))

    def append(self, reply: bool, data: bytes) -> None:
        base = HEADER_BYTES + (self.cap if reply else 0)
        slot = REP_HEAD if reply else REQ_HEAD
        head = self.ctl[slot]
        for i, b in enumerate(data):
            self.mm[self._at(base, head + i)] = b
        self.ctl[slot] = (head + len(data)) & MASK64

    def garbage_head(self, reply: bool) -> None:
        head, tail = (REP_HEAD, REP_TAIL) if reply else (REQ_HEAD, REQ_TAIL)
        self.ctl[head] = (self.ctl[tail] + self.cap + 1 + secrets.randbelow(1 << 20)) & MASK64


# --------------------------------------------------------------- a scenario


@dataclass
class _Op:
    label: str
    kind: str  # "wait", "post", "other"
    result: str = "running"

    @property
    def succeeded(self) -> bool:
        return self.result == "success"


@dataclass(frozen=True)
class Truth:
    value: int
    initial: int
    posts: int
    waits: int
    robust_releases: int
    waiters: int
    handles: int
    settled: bool

    @property
    def conserved(self) -> bool:
        return self.value == self.initial + self.posts - self.waits + self.robust_releases

    def describe(self) -> str:
        return f"service: posts={self.posts} grants={self.waits} value={self.value}"


@dataclass
class _Bench:
    target: Target
    backend: str
    admin: Client
    bystander: Client
    key: bytes | None = None
    native_build: NativeBuild | None = None
    name: str = field(default_factory=lambda: f"/a2r-{secrets.token_hex(5)}")
    ops: list[_Op] = field(default_factory=list)
    admin_posts: int = 0
    bystander_ok: bool = True
    victim: _PyVictim | _CVictim | None = None
    tap: Tap | None = None
    sem: EsemSemaphore | None = None

    @property
    def native(self) -> bool:
        return self.backend == NATIVE_BACKEND

    def setup(self) -> None:
        sem = sem_open(self.name, O_CREAT | O_EXCL, 0o600, 0, flags=USE_ESEM, key=self.key,
                       client=self.admin)
        assert isinstance(sem, EsemSemaphore)
        self.sem = sem
        if self.native:
            assert self.native_build is not None
            self.victim = _CVictim(self.target, self.native_build, self.name)
        else:
            self.victim = _PyVictim(self.target, self.name, self.key)
        self.tap = Tap(self.victim.pid, self.victim.memfd)

    @property
    def keyed(self) -> bool:
        return self.key is not None

    @property
    def grant_bytes(self) -> int:
        return LENGTH_BYTES + REPLY_HEADER_BYTES + (MAC_BYTES if self.keyed else 0) + \
            AEAD_TAG_BYTES

    @property
    def post_bytes(self) -> int:
        return (LENGTH_BYTES + REQUEST_HEADER_BYTES + HANDLE_BYTES
                + (MAC_BYTES if self.keyed else 0) + AEAD_TAG_BYTES)

    def command(self, op: str, kind: str, label: str | None = None) -> _Op:
        assert self.victim is not None
        self.victim.start(op)
        entry = _Op(label or op, kind)
        self.ops.append(entry)
        return entry

    def finish(self, entry: _Op) -> _Op:
        assert self.victim is not None
        try:
            entry.result = self.victim.result()
        except (TimeoutError, EOFError) as exc:
            entry.result = f"hung ({type(exc).__name__})"
        return entry

    def wait_queued(self, n: int) -> bool:
        deadline = time.monotonic() + OP_BOUND
        while time.monotonic() < deadline:
            if int(stat_semaphore(self.admin, self.name, key=self.key)["waiters"]) >= n:
                return True
            time.sleep(0.002)
        return False

    def admin_post(self) -> None:
        assert self.sem is not None
        self.sem.post()
        self.admin_posts += 1

    def poke(self) -> None:
        """Bystander traffic: a switchless session of its own, whose doorbell makes the
        service's poller look at every ring (the victim's included). It must work."""
        try:
            self.bystander.call(Request(Opcode.PING, 0))
        except EsemError:
            self.bystander_ok = False

    def teardown(self) -> Truth | None:
        if self.victim is not None:
            self.victim.stop()
        if self.tap is not None:
            self.tap.close()
        truth: Truth | None = None
        try:
            deadline = time.monotonic() + SETTLE
            while True:
                info = stat_semaphore(self.admin, self.name, key=self.key)
                settled = int(info["handles"]) == 1 and int(info["waiters"]) == 0
                if settled or time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
            truth = Truth(int(info["value"]), int(info["initial"]), int(info["posts"]),
                          int(info["waits"]), int(info["robust_releases"]),
                          int(info["waiters"]), int(info["handles"]), settled)
        finally:
            with contextlib.suppress(Exception):
                if self.sem is not None:
                    self.sem.close()
            with contextlib.suppress(Exception):
                sem_unlink(self.name, flags=USE_ESEM, key=self.key, client=self.admin)
        return truth


def _exited_soon(child: Child, grace: float = 2.0) -> bool:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        done, _ = os.waitpid(child.pid, os.WNOHANG)
        if done:
            child.reaped = True
            return True
        time.sleep(0.01)
    return False


@dataclass
class _Plan:
    direction: str  # "s2c" or "c2s"
    action: str
    tampered: list[_Op]
    expected: tuple[str, ...]


def _queued_wait(b: _Bench, label: str = "wait") -> _Op:
    op = b.command("wait", "wait", label)
    if not b.wait_queued(1):
        raise RuntimeError("the victim's wait never queued")
    return op


def _flip(b: _Bench) -> _Plan:
    assert b.tap is not None and b.victim is not None
    w = _queued_wait(b)
    with frozen(b.victim.pid, OP_BOUND):
        b.admin_post()  # the service grants; the victim, stopped, cannot read it
        if not b.tap.wait_unread(b.grant_bytes):
            raise RuntimeError("the grant never reached the ring")
        b.tap.flip_unread_reply(LENGTH_BYTES + secrets.randbelow(b.grant_bytes - LENGTH_BYTES))
    b.finish(w)
    return _Plan("s2c", "flipped one bit of a grant in the reply ring before the victim "
                 "read it", [w], INTEGRITY)


def _replay_grant(b: _Bench) -> _Plan:
    assert b.tap is not None and b.victim is not None
    w1 = _queued_wait(b, "wait 1")
    b.admin_post()
    b.finish(w1)  # a genuine grant, read and consumed
    w2 = _queued_wait(b, "wait 2")
    with frozen(b.victim.pid, OP_BOUND):
        old = b.tap.last_bytes(True, b.grant_bytes)
        b.tap.append(True, old)
    b.finish(w2)
    return _Plan("s2c", "appended the bytes of the earlier grant to the reply ring as the "
                 "answer to a second wait", [w2], INTEGRITY)


def _forge_grant(b: _Bench) -> _Plan:
    assert b.tap is not None and b.victim is not None
    w = _queued_wait(b)
    # The victim's requests so far: OPEN, then this WAIT (request ids 1..: the upgrade
    # is id 1, OPEN 2, WAIT 3).
    body = encode_reply(Reply(Opcode.WAIT, 3, Status.OK), mac=b.keyed)
    body += secrets.token_bytes(MAC_BYTES) if b.keyed else b""
    with frozen(b.victim.pid, OP_BOUND):
        b.tap.append(True, len(body).to_bytes(LENGTH_BYTES, "big") + body)
    b.finish(w)
    what = "a plaintext WAIT-OK" + (" with a guessed key MAC" if b.keyed else "")
    return _Plan("s2c", f"wrote {what} into the reply ring", [w], INTEGRITY)


def _garbage_reply_head(b: _Bench) -> _Plan:
    assert b.tap is not None and b.victim is not None
    w = _queued_wait(b)
    with frozen(b.victim.pid, OP_BOUND):
        b.tap.garbage_head(True)
    b.finish(w)
    return _Plan("s2c", "set the reply ring's head beyond its capacity", [w], INTEGRITY)


def _garbage_request_head(b: _Bench) -> _Plan:
    assert b.tap is not None and b.victim is not None
    w = _queued_wait(b)
    with frozen(b.victim.pid, OP_BOUND):
        b.tap.garbage_head(False)
        b.poke()  # the service looks at every ring, refuses this one, drops the session
    b.finish(w)
    return _Plan("c2s", "set the request ring's head beyond its capacity", [w], DROPPED)


def _replay_request(b: _Bench) -> _Plan:
    assert b.tap is not None and b.victim is not None
    b.finish(b.command("post", "post"))
    with frozen(b.victim.pid, OP_BOUND):
        frame = b.tap.last_bytes(False, b.post_bytes)
        b.tap.append(False, frame)  # the POST once more
        b.poke()
    g = b.finish(b.command("getvalue", "other", "next getvalue"))
    return _Plan("c2s", "appended the victim's earlier POST frame to the request ring",
                 [g], DROPPED)


Scenario = Callable[[_Bench], _Plan]
SCENARIOS: dict[str, tuple[Scenario, ...]] = {
    "ring-flip-bits": (_flip,),
    "ring-replay-grant": (_replay_grant,),
    "ring-forge-grant": (_forge_grant,),
    "ring-garbage-indices": (_garbage_reply_head, _garbage_request_head),
    "ring-replay-request": (_replay_request,),
}


@dataclass(frozen=True)
class PhaseResult:
    strategy: str
    backend: str
    direction: str
    action: str
    ops: tuple[str, ...]
    truth: Truth | None
    reasons: tuple[str, ...]

    @property
    def defended(self) -> bool:
        return not self.reasons

    @property
    def evidence(self) -> str:
        text = f"{self.direction}: {self.action} -> " + ", ".join(self.ops)
        if self.truth is not None:
            text += "; " + self.truth.describe()
        return f"NOT DEFENDED ({'; '.join(self.reasons)}): {text}" if self.reasons else text


def _judge(b: _Bench, strategy: str, plan: _Plan, truth: Truth | None) -> PhaseResult:
    reasons: list[str] = []
    expected = plan.expected
    if b.native and plan.direction == "c2s":
        # After the service dropped its session, a native client's next call may run on a
        # new session (it replaces a failed one), where the old handle is unknown: EINVAL.
        expected = (*expected, "OSError: Invalid argument")
    for op in plan.tampered:
        if op.succeeded:
            reasons.append(f"{op.label} returned success")
        elif not op.result.startswith(expected):
            reasons.append(f"{op.label} ended in {op.result!r}, expected "
                           f"{'/'.join(expected)}")
    victim_waits = sum(op.succeeded for op in b.ops if op.kind == "wait")
    posts = [op for op in b.ops if op.kind == "post"]
    if truth is None:
        reasons.append("could not read the service's state")
    else:
        if victim_waits > truth.waits:
            reasons.append(f"false grant: the victim returned from {victim_waits} waits, "
                           f"the service granted {truth.waits}")
        if truth.posts > b.admin_posts + len(posts):
            reasons.append(f"unit created: the service counted {truth.posts} posts")
        if truth.posts < b.admin_posts + sum(op.succeeded for op in posts):
            reasons.append("unit lost: an acknowledged post is missing")
        if not truth.conserved:
            reasons.append("conservation broken")
        if not truth.settled:
            reasons.append("victim session not forgotten")
    if not b.bystander_ok:
        reasons.append("a bystander session failed")
    ops = tuple(f"{op.label}: {op.result.split(':')[0]}" for op in b.ops)
    return PhaseResult(strategy, b.backend, plan.direction, plan.action, ops, truth,
                       tuple(reasons))


def _run_phase(target: Target, backend: str, admin: Client, bystander: Client,
               strategy: str, scenario: Scenario,
               native: NativeBuild | None) -> PhaseResult:
    key = secrets.token_bytes(32) if backend == "esem+key" else None
    bench = _Bench(target, backend, admin, bystander, key, native)
    plan: _Plan | None = None
    error: BaseException | None = None
    try:
        bench.setup()
        plan = scenario(bench)
        bench.poke()  # other sessions are fine afterwards too
    except Exception as exc:  # a step failed outright: report it, never hide it
        error = exc
    finally:
        truth = bench.teardown()
    if plan is None:
        return PhaseResult(strategy, backend, "-", scenario.__name__.strip("_"), (), truth,
                           (f"scenario failed: {type(error).__name__}: {error}",))
    return _judge(bench, strategy, plan, truth)


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    backend: str
    phases: tuple[PhaseResult, ...]

    @property
    def defended(self) -> bool:
        return bool(self.phases) and all(p.defended for p in self.phases)

    def outcome(self) -> Outcome:
        evidence = " | ".join(p.evidence for p in sorted(self.phases, key=lambda p: p.defended))
        return Outcome(f"{LABEL} {self.strategy}", self.backend,
                       "defended" if self.defended else "broken", evidence)


def run_strategies(target: Target, strategies: Sequence[str] = STRATEGIES,
                   backends: Sequence[str] = ESEM_BACKENDS,
                   native: NativeBuild | None = None) -> list[StrategyResult]:
    """Every strategy against every backend in ``backends`` (``ESEM_BACKENDS``, and
    ``NATIVE_BACKEND`` for the C victim, built as ``native``)."""
    if NATIVE_BACKEND in backends and native is None:
        raise ValueError("the native backend needs the built native victim")
    admin = Client(target.socket_path, pubkey=target.pubkey, switchless=False)
    bystander = Client(target.socket_path, pubkey=target.pubkey, switchless=True)
    try:
        admin.connect()
        bystander.connect()
        results = []
        for strategy in strategies:
            for backend in backends:
                phases = tuple(_run_phase(target, backend, admin, bystander, strategy, s,
                                          native)
                               for s in SCENARIOS[strategy])
                results.append(StrategyResult(strategy, backend, phases))
        return results
    finally:
        admin.close()
        bystander.close()


LEGACY_ROW = Outcome(
    f"{LABEL} ring", "legacy", "n/a",
    "legacy POSIX semaphores have no ring to tamper with: their shared memory is the "
    "count itself, which a same-uid process rewrites directly, and wins (A1)")


def run(target: Target) -> list[Outcome]:
    probe = Client(target.socket_path, pubkey=target.pubkey, switchless=True)
    try:
        probe.connect()
    except SwitchlessUnavailable as exc:
        return [LEGACY_ROW] + [
            Outcome(f"{LABEL} {s}", b, "n/a", f"the service does not offer switchless mode "
                    f"(start it with esem serve --switchless): {exc}")
            for s in STRATEGIES for b in (*ESEM_BACKENDS, NATIVE_BACKEND)]
    finally:
        probe.close()
    rows = [LEGACY_ROW] + [r.outcome() for r in run_strategies(target)]
    native = build_native(target.workdir)
    if isinstance(native, str):
        return rows + [Outcome(f"{LABEL} {s}", NATIVE_BACKEND, "n/a",
                               f"the native victim cannot run here: {native}")
                       for s in STRATEGIES]
    return rows + [r.outcome() for r in run_strategies(target, backends=(NATIVE_BACKEND,),
                                                       native=native)]
