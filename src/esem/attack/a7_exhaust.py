"""A7, exhaustion: a rogue uid floods semaphores, handles, waiters and connections.

To keep the run short this attack starts an esem daemon of its own with small quotas
(``QUOTA_ARGS``, the ``--quota-*`` flags of ``esem serve``; the defaults are in
``esem.core.policy.Quotas``), in a directory other uids can reach. Each round forks a
rogue process that drops to ``nobody`` and floods one resource until the service
refuses it with ``QuotaExceeded``, then holds everything it got. While it holds them, a
victim process of another uid (``daemon``) creates a semaphore, posts, waits, is
refused a trywait at zero, and has a queued wait granted. A round is ``defended`` when
the rogue was stopped by ``QuotaExceeded`` exactly at the configured quota and the
victim did all of its work; ``broken`` otherwise.

* connections: sessions of the rogue's uid until one is refused (and every further try);
* semaphores: create-and-close until refused; a second session of the uid is refused too
  (the quota is per uid);
* handles: one session opens one name again and again until refused;
* waiters: sessions queue blocking waits on a semaphore at zero until the per-session
  quota, and further sessions until the per-uid quota, refuses them;
* connection storm: the rogue uid at its session quota, and ``STORM_PROCESSES`` more of
  its processes connecting again and again and never sending a HELLO (at most
  ``HALF_OPEN_PER_UID`` of them wait in their handshake, closed after
  ``HANDSHAKE_TIMEOUT``; the rest are refused at accept), sockets kept open; the victim
  opens ``STORM_ATTEMPTS`` sessions meanwhile, and every one must be served.

The legacy row floods real POSIX semaphores in ``/dev/shm`` as the same rogue uid, up to
``LEGACY_BOUND``: nothing but the size of that tmpfs, shared by every uid, would stop
it; ``broken`` if the bound is reached unhindered. Everything is removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import posix_ipc

from esem.api import O_CREAT, O_EXCL, USE_ESEM, sem_open, sem_unlink
from esem.attack.base import Outcome, Target
from esem.client.admin import stat_semaphore
from esem.client.blocking import Client
from esem.core import Quotas
from esem.core.table import WaitMode
from esem.errors import BusyError, EsemError, QuotaExceeded
from esem.protocol.constants import FrameKind, Opcode
from esem.protocol.messages import Reply, Request
from esem.protocol.session import ClientSession
from esem.server.embedded import EmbeddedService
from esem.server.service import HALF_OPEN_PER_UID, HANDSHAKE_TIMEOUT

SEMAPHORES = 64
SESSIONS = 8
HANDLES = 64
WAITERS = 16
UID_WAITERS = 32
QUOTA_ARGS = [
    "--quota-semaphores", str(SEMAPHORES), "--quota-sessions", str(SESSIONS),
    "--quota-handles", str(HANDLES), "--quota-waiters", str(WAITERS),
    "--quota-uid-waiters", str(UID_WAITERS),
]
LEGACY_BOUND = 2000  # more than esem's default per-uid semaphore quota (1024)
STORM_HELD = 1000  # raw connections the storm keeps open at once
STORM_WARMUP = 0.5  # seconds the storm runs before the victim starts
RETRIES = 20  # further sessions the rogue tries once refused
STORM_PROCESSES = 4  # rogue processes knocking at once in the "connection storm" round
STORM_ATTEMPTS = 10  # the victim's connection attempts during that storm
CHILD_TIMEOUT = 60.0  # seconds a child may take for one step
MK = O_CREAT | O_EXCL
Json = dict[str, Any]


# ------------------------------------------------------------ child processes


class Channel:
    """The child's end: JSON lines to the parent, commands from it."""

    def __init__(self, ctl: int, out: int) -> None:
        self.ctl = ctl
        self.out = out

    def send(self, obj: Json) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.out, data):]

    def commanded(self, timeout: float | None) -> bool:
        """Has the parent said to go on (wait at most ``timeout``; None: forever)?"""
        ready, _, _ = select.select([self.ctl], [], [], timeout)
        if ready:
            os.read(self.ctl, 64)
        return bool(ready)


class Child:
    """The parent's end of a forked child running as another uid."""

    def __init__(self, uid: int, gid: int, body: Callable[[Channel], Json]) -> None:
        ctl_r, self._ctl = os.pipe()
        self._out, out_w = os.pipe()
        self._buf = b""
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(self._ctl)
                os.close(self._out)
                channel = Channel(ctl_r, out_w)
                try:
                    os.setgroups([])
                    os.setgid(gid)
                    os.setuid(uid)
                    channel.send(body(channel))
                    code = 0
                except BaseException as exc:
                    channel.send({"error": f"{type(exc).__name__}: {exc}"})
            finally:
                os._exit(code)
        os.close(ctl_r)
        os.close(out_w)

    def recv(self, timeout: float = CHILD_TIMEOUT) -> Json:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._out], [], [], max(0.0, left))
            chunk = os.read(self._out, 65536) if ready else b""
            if not chunk:
                return {"error": "the child died or timed out without a report"}
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        result: Json = json.loads(line)
        return result

    def tell(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._ctl, b"go\n")

    def finish(self) -> Json:
        """Tell it to go on, take its last report, reap it."""
        self.tell()
        last = self.recv()
        self.reap()
        return last

    def reap(self) -> None:
        if self.pid:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done == 0:
                deadline = time.monotonic() + 5
                while done == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                    done, _ = os.waitpid(self.pid, os.WNOHANG)
                if done == 0:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
            self.pid = 0
        for fd in (self._ctl, self._out):
            with contextlib.suppress(OSError):
                os.close(fd)


# --------------------------------------------------------------- raw session


class RawSession:
    """A session driven request by request, so queued waits can be left unanswered."""

    def __init__(self, path: Path, pubkey: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.session = ClientSession(pubkey)
        self.replies: dict[int, Reply] = {}
        self.sock.sendall(self.session.start())
        while not self.session.established:
            self._read()

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the service closed the session")
        for reply in self.session.receive_data(data):
            self.replies[reply.req_id] = reply

    def send(self, req: Request) -> int:
        req_id = self.session.next_request_id()
        self.sock.sendall(self.session.send_request(req, req_id=req_id))
        return req_id

    def reply(self, req_id: int) -> Reply:
        while req_id not in self.replies:
            self._read()
        return self.replies.pop(req_id)

    def close(self) -> None:
        """END the session, then close (as ``release`` does for a ``Client``): a session
        whose connection just closes waits detached for its grace period, still counted
        in its uid's quota, and would hold a quota of the next round."""
        with contextlib.suppress(EsemError, OSError):
            self.reply(self.send(Request(Opcode.END, 0)))
        self.sock.close()


# -------------------------------------------------------------------- rogues


Flood = Callable[[Channel], Json]


def release(client: Client) -> None:
    """END the session, then close: it leaves the uid's quota now, not after its grace
    period (a closed connection of a running process waits detached for a RESUME)."""
    with contextlib.suppress(EsemError):
        client.call(Request(Opcode.END, 0))
    client.close()


def flood_connections(sock: Path, pubkey: bytes) -> Flood:
    def body(ch: Channel) -> Json:
        clients: list[Client] = []
        refused = ""
        for _ in range(SESSIONS * 4 + 4):
            client = Client(sock, pubkey=pubkey)
            try:
                client.connect()
            except QuotaExceeded as exc:
                refused = str(exc)
                break
            clients.append(client)
        again = 0  # the quota holds for every further try, not just the first
        for _ in range(RETRIES if refused else 0):
            client = Client(sock, pubkey=pubkey)
            with contextlib.suppress(QuotaExceeded):
                client.connect()
                clients.append(client)
                continue
            again += 1
        ch.send({"held": len(clients), "refused": refused, "again": again})
        ch.commanded(None)
        for client in clients:
            release(client)
        return {"released": len(clients)}

    return body


def storm(sock: Path, ch: Channel) -> Json:
    """Knock at the socket again and again until told to stop, keeping up to
    ``STORM_HELD`` connections open (the service refuses each: the uid is at its quota)."""
    held: deque[socket.socket] = deque()
    knocks = sampled = sampled_refused = failed = 0
    while not ch.commanded(0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(str(sock))
        except OSError:
            failed += 1
            s.close()
            continue
        knocks += 1
        if knocks % 50 == 1:  # read what the service says, now and then
            sampled += 1
            with contextlib.suppress(OSError):
                head = s.recv(64)
                if len(head) >= 6 and head[5] == FrameKind.REFUSED:
                    sampled_refused += 1
        held.append(s)
        if len(held) > STORM_HELD:
            held.popleft().close()
    for s in held:
        s.close()
    return {"storm": knocks, "sampled": sampled, "sampled_refused": sampled_refused,
            "storm_failed": failed}


def storm_only(sock: Path) -> Flood:
    def body(ch: Channel) -> Json:
        ch.send({"held": 0})
        return storm(sock, ch)

    return body


def flood_semaphores(sock: Path, pubkey: bytes, tag: str) -> Flood:
    def body(ch: Channel) -> Json:
        client = Client(sock, pubkey=pubkey)
        names: list[str] = []
        refused = ""
        for i in range(SEMAPHORES * 4 + 4):
            name = f"/esem-a7-r{tag}-{i}"
            try:
                sem = sem_open(name, MK, 0o600, 0, flags=USE_ESEM, client=client)
            except QuotaExceeded as exc:
                refused = str(exc)
                break
            names.append(name)
            sem.close()  # the name keeps the semaphore alive; only the uid's count grows
        other = Client(sock, pubkey=pubkey)
        try:
            sem_open(f"/esem-a7-r{tag}-other", MK, 0o600, 0, flags=USE_ESEM, client=other)
            names.append(f"/esem-a7-r{tag}-other")
            second = "created one more"
        except QuotaExceeded:
            second = "refused too"
        ch.send({"held": len(names), "refused": refused, "second": second})
        ch.commanded(None)
        for name in names:
            sem_unlink(name, flags=USE_ESEM, client=client)
        release(client)
        release(other)
        return {"released": len(names)}

    return body


def flood_handles(sock: Path, pubkey: bytes, tag: str) -> Flood:
    def body(ch: Channel) -> Json:
        client = Client(sock, pubkey=pubkey)
        name = f"/esem-a7-r{tag}-h"
        sem_open(name, MK, 0o600, 0, flags=USE_ESEM, client=client)
        held, refused = 1, ""
        for _ in range(HANDLES * 4 + 4):
            try:
                sem_open(name, 0, flags=USE_ESEM, client=client)
            except QuotaExceeded as exc:
                refused = str(exc)
                break
            held += 1
        ch.send({"held": held, "refused": refused})
        ch.commanded(None)
        sem_unlink(name, flags=USE_ESEM, client=client)
        release(client)
        return {"released": held}

    return body


def flood_waiters(sock: Path, pubkey: bytes, tag: str) -> Flood:
    def body(ch: Channel) -> Json:
        client = Client(sock, pubkey=pubkey)
        name = f"/esem-a7-r{tag}-w"
        sem_open(name, MK, 0o600, 0, flags=USE_ESEM, client=client)
        sessions: list[RawSession] = []
        queued: list[int] = []
        refusals: list[str] = []
        for _ in range(SESSIONS - 1):  # the client above holds one session
            raw = RawSession(sock, pubkey)
            sessions.append(raw)
            handle = raw.reply(raw.send(Request(Opcode.OPEN, 0, name=name))).handle
            n, refusal = 0, ""
            for _ in range(WAITERS * 4 + 4):
                wait_id = raw.send(Request(Opcode.WAIT, 0, handle=handle,
                                           wait_mode=WaitMode.BLOCK))
                raw.reply(raw.send(Request(Opcode.PING, 0)))  # the WAIT was handled
                if wait_id in raw.replies:
                    r = raw.replies.pop(wait_id)
                    refusal = f"{r.status.name} {r.message}"
                    break
                n += 1
            queued.append(n)
            refusals.append(refusal)
            if n == 0:
                break  # a fresh session could queue nothing: the uid quota holds
        ch.send({"held": sum(queued), "queued": queued, "refusals": refusals})
        ch.commanded(None)
        for raw in sessions:
            raw.close()
        sem_unlink(name, flags=USE_ESEM, client=client)
        release(client)
        return {"released": sum(queued)}

    return body


def flood_legacy(tag: str) -> Flood:
    def body(ch: Channel) -> Json:
        created, refused = 0, ""
        for i in range(LEGACY_BOUND):
            try:
                sem = posix_ipc.Semaphore(f"/esem-a7-l{tag}-{i}", posix_ipc.O_CREX, 0o600, 0)
            except Exception as exc:
                refused = f"{type(exc).__name__}: {exc}"
                break
            sem.close()  # the file in /dev/shm stays
            created += 1
        files = len(list(Path("/dev/shm").glob(f"sem.esem-a7-l{tag}-*")))
        ch.send({"held": created, "refused": refused, "files": files})
        ch.commanded(None)
        for i in range(created):
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(f"/esem-a7-l{tag}-{i}")
        return {"released": created}

    return body


# -------------------------------------------------------------------- victim


def victim(sock: Path, pubkey: bytes, name: str, legacy: bool = False) -> Flood:
    """Create, post, wait, trywait at zero, and a queued wait granted by a post."""

    def body(ch: Channel) -> Json:
        start = time.monotonic()
        steps: list[str] = []
        client = Client(sock, pubkey=pubkey)
        try:
            flags = 0 if legacy else USE_ESEM
            sem = sem_open(name, MK, 0o600, 0, flags=flags, client=client)
            steps.append("created")
            sem.post()
            sem.wait()
            steps.append("posted and waited")
            try:
                sem.trywait()
                return {"ok": False, "steps": steps, "error": "trywait at zero succeeded"}
            except BusyError:
                steps.append("refused a trywait at zero")
            granted = threading.Event()

            def wait() -> None:
                sem.wait()
                granted.set()

            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            deadline = time.monotonic() + 5
            while not legacy and time.monotonic() < deadline:
                if stat_semaphore(client, name)["waiters"] == 1:
                    break
                time.sleep(0.005)
            if legacy:
                time.sleep(0.05)
            sem.post()
            waiter.join(5)
            if not granted.is_set():
                return {"ok": False, "steps": steps, "error": "queued wait not granted"}
            steps.append("had a queued wait granted")
            if sem.getvalue() != 0:
                return {"ok": False, "steps": steps, "error": "value not 0 at the end"}
            sem.close()
            sem_unlink(name, flags=flags, client=client)
            steps.append("closed and unlinked")
            return {"ok": True, "steps": steps, "ms": (time.monotonic() - start) * 1000}
        except Exception as exc:
            return {"ok": False, "steps": steps, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            release(client)

    return body


def connecting_victim(sock: Path, pubkey: bytes) -> Flood:
    """``STORM_ATTEMPTS`` fresh sessions, each connecting and answering a PING."""

    def body(ch: Channel) -> Json:
        ok, errors = 0, []
        for _ in range(STORM_ATTEMPTS):
            client = Client(sock, pubkey=pubkey)
            try:
                client.call(Request(Opcode.PING, 0))
                ok += 1
            except EsemError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                release(client)
            time.sleep(0.05)
        return {"ok": ok, "errors": errors}

    return body


# ----------------------------------------------------------------------- run


def _reachable(path: Path) -> bool:
    """Can any uid traverse every directory down to ``path``?"""
    p = path.resolve()
    return all(os.stat(d).st_mode & 0o001 for d in (p, *p.parents))


def _ids(user: str, fallback: int) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return fallback, fallback


def _round(rogue: Child, sock: Path, pubkey: bytes, victim_ids: tuple[int, int],
           victim_name: str, legacy: bool = False) -> tuple[Json, Json, Json]:
    """The rogue floods and holds; the victim works; the rogue lets go."""
    try:
        flooded = rogue.recv()
        if "error" in flooded:
            return flooded, {"ok": False, "error": "not run"}, {}
        v = Child(*victim_ids, victim(sock, pubkey, victim_name, legacy))
        try:
            worked = v.recv()
        finally:
            v.reap()
        released = rogue.finish()
    finally:
        rogue.reap()
    return flooded, worked, released


def _victim_words(uid: int, name: str, worked: Json) -> str:
    if worked.get("ok"):
        return (f"meanwhile uid {uid} {', '.join(worked['steps'])} {name} in "
                f"{float(worked['ms']):.0f} ms")
    return (f"VICTIM FAILED: uid {uid} {', '.join(worked.get('steps', [])) or 'did nothing'}"
            f", then {worked.get('error')}")


def run(target: Target) -> list[Outcome]:
    tag = secrets.token_hex(4)
    rogue_ids = _ids("nobody", 65534)
    victim_ids = _ids("daemon", 1)
    ru, vu = rogue_ids[0], victim_ids[0]
    tmp: Path | None = None
    base = target.workdir / f"a7-{tag}"
    if not _reachable(target.workdir):
        tmp = base = Path(tempfile.mkdtemp(prefix="esem-a7-"))
    base.mkdir(mode=0o755, exist_ok=True)
    os.chmod(base, 0o755)
    (base / "service").mkdir(mode=0o755)
    os.chmod(base / "service", 0o755)
    defaults = Quotas()
    where = (
        f"own daemon started with {' '.join(QUOTA_ARGS)} (defaults {defaults.semaphores_per_uid}"
        f"/{defaults.sessions_per_uid}/{defaults.handles_per_session}/"
        f"{defaults.waiters_per_session}/{defaults.waiters_per_uid})"
    )
    rows: list[Outcome] = []
    service = EmbeddedService(base / "service", extra_args=QUOTA_ARGS)
    try:
        service.start()
        sock, pub = service.socket_path, service.pubkey
        v_name = f"/esem-a7-v{tag}"

        def esem_round(label: str, flood: Flood, quota: int, judge: Callable[[Json], bool],
                       words: Callable[[Json, Json], str]) -> None:
            flooded, worked, released = _round(Child(*rogue_ids, flood), sock, pub, victim_ids,
                                               f"{v_name}-{label.split()[-1]}")
            if "error" in flooded or "error" in released:
                rows.append(Outcome(label, "esem", "broken",
                                    f"the rogue failed: {flooded.get('error')} "
                                    f"{released.get('error', '')}; {where}"))
                return
            stopped = bool(flooded.get("refused") or flooded.get("refusals"))
            ok = stopped and flooded["held"] == quota and judge(flooded) and bool(worked["ok"])
            rows.append(Outcome(label, "esem", "defended" if ok else "broken",
                                f"{words(flooded, released)}; "
                                f"{_victim_words(vu, f'{v_name}-{label.split()[-1]}', worked)}"
                                f"; {where}"))

        esem_round(
            "A7 connections", flood_connections(sock, pub), SESSIONS,
            lambda f: "sessions (quota)" in f["refused"] and f["again"] == RETRIES,
            lambda f, r: (
                f"uid {ru} opened {f['held']} sessions, the next was refused "
                f"(QuotaExceeded: {f['refused']}), and so were {f['again']} of {RETRIES} "
                "further tries; it held its sessions open while the victim worked"),
        )
        esem_round(
            "A7 semaphores", flood_semaphores(sock, pub, tag), SEMAPHORES,
            lambda f: "semaphores (quota)" in f["refused"] and f["second"] == "refused too",
            lambda f, r: (
                f"uid {ru} created {f['held']} semaphores, the next was refused "
                f"(QuotaExceeded: {f['refused']}); a second session of that uid was "
                f"{f['second']}"),
        )
        esem_round(
            "A7 handles", flood_handles(sock, pub, tag), HANDLES,
            lambda f: "handles (quota)" in f["refused"],
            lambda f, r: (
                f"one session of uid {ru} opened {f['held']} handles on one name, the next "
                f"was refused (QuotaExceeded: {f['refused']})"),
        )
        esem_round(
            "A7 waiters", flood_waiters(sock, pub, tag), UID_WAITERS,
            lambda f: (f["queued"][0] == WAITERS and f["queued"][-1] == 0
                       and "waits queued (quota)" in f["refusals"][0]
                       and f"uid {ru} has {UID_WAITERS}" in f["refusals"][-1]
                       and all(r.startswith("EDQUOT") for r in f["refusals"])),
            lambda f, r: (
                f"sessions of uid {ru} queued {'+'.join(map(str, f['queued']))} = "
                f"{f['held']} blocking waits; refusals: "
                + "; ".join(x for x in f["refusals"] if x)),
        )

        # Connection storm: several processes of the rogue uid (at its session quota)
        # knock at once while the victim opens session after session.
        rogues = [Child(*rogue_ids, flood_connections(sock, pub))]
        try:
            first = rogues[0].recv()  # at its quota: from now on every knock is refused
            rogues += [Child(*rogue_ids, storm_only(sock)) for _ in range(STORM_PROCESSES)]
            for r in rogues[1:]:
                r.recv()
            time.sleep(STORM_WARMUP)
            v = Child(*victim_ids, connecting_victim(sock, pub))
            try:
                tried = v.recv()
            finally:
                v.reap()
            stormed = [r.finish() for r in rogues]
        finally:
            for r in rogues:
                r.reap()
        knocks = sum(int(x.get("storm", 0)) for x in stormed)
        jammed = sum(int(x.get("storm_failed", 0)) for x in stormed)
        sampled = sum(int(x.get("sampled", 0)) for x in stormed)
        sampled_refused = sum(int(x.get("sampled_refused", 0)) for x in stormed)
        errors: list[str] = tried.get("errors", [])
        fine = (first.get("held") == SESSIONS and bool(first.get("refused"))
                and tried.get("ok") == STORM_ATTEMPTS)
        rows.append(Outcome(
            "A7 connection storm", "esem", "defended" if fine else "broken",
            f"uid {ru} held {first.get('held')} sessions (quota {SESSIONS}: "
            f"{first.get('refused') or first.get('error')}), then {STORM_PROCESSES} more of "
            f"its processes knocked {knocks} times (from {STORM_WARMUP}s before the victim "
            f"until it was done), each holding up to {STORM_HELD} connections open and "
            f"never sending a HELLO: beyond {HALF_OPEN_PER_UID} in their handshake (closed "
            f"after {HANDSHAKE_TIMEOUT:g} s) every one was refused at accept "
            f"({sampled_refused} of {sampled} sampled were told REFUSED), and {jammed} more "
            f"of their connects found the listen backlog full; "
            f"meanwhile {tried.get('ok', 0)} of {STORM_ATTEMPTS} sessions of uid {vu} "
            f"connected and were served"
            + (f"; {len(errors)} failed, e.g. {errors[0]}" if errors else "")
            + (f" ({tried['error']})" if "error" in tried else "") + f"; {where}",
        ))

        # Legacy: the same rogue uid against /dev/shm.
        shm = os.statvfs("/dev/shm")
        flooded, worked, released = _round(
            Child(*rogue_ids, flood_legacy(tag)), sock, pub, victim_ids, f"{v_name}-legacy",
            legacy=True)
        reached = flooded.get("held") == LEGACY_BOUND and not flooded.get("refused")
        rows.append(Outcome(
            "A7 semaphores", "legacy", "broken" if reached else "defended",
            f"uid {ru} created {flooded.get('held')} of {LEGACY_BOUND} POSIX semaphores "
            f"({flooded.get('files')} files in /dev/shm), "
            + ("no quota refused any" if reached else f"stopped: {flooded.get('refused')}")
            + f"; legacy has no per-uid quota: only the size of /dev/shm, a tmpfs shared by "
            f"every uid ({shm.f_blocks * shm.f_frsize / 2**30:.1f} GiB, {shm.f_files} "
            f"inodes here), bounds it, where esem's default quota stops a uid at "
            f"{defaults.semaphores_per_uid}; {_victim_words(vu, f'{v_name}-legacy', worked)} "
            f"(legacy's harm is the unbounded share, not a refusal yet); all "
            f"{released.get('released', 0)} removed afterwards",
        ))
    finally:
        service.cleanup()
        for leftover in Path("/dev/shm").glob(f"sem.esem-a7-*{tag}*"):
            leftover.unlink(missing_ok=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return rows
