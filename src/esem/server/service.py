"""The service's I/O shell: one asyncio protocol per connection over one SemTable.

Everything runs on the event loop thread, so each request is applied to the table as one
atomic step. The shell does four things and nothing else: read the peer's kernel-vouched
credentials, feed bytes to the connection's ``ServerSession``, turn its requests into
table calls, and write the replies (including the late ones: grants of queued waits,
timeouts from the single deadline timer, cancellations). A connection that breaks the
protocol is logged and dropped; the table then forgets its session, and any unit that
session was waiting for goes to the next waiter.

Fairness and bounds (adversary A7): a connection's requests are executed one at a time
from its session's backlog, and the connection stops being served, and read, as soon as
its unsent replies pass ``WRITE_HIGH_WATER`` (until they drain) or its uid has had
``TURN_BUDGET`` of this loop turn (it continues on a later turn, after the others). So
what one connection can make the service hold is about one read of requests and one
high-water mark of replies, and what one uid can make the others wait is about
``TURN_BUDGET`` (or one request, if longer) per loop turn. A connection
counts against its uid's session quota only once its HELLO is accepted; before that it
is half-open, at most ``HALF_OPEN_PER_UID`` per uid, and closed after
``HANDSHAKE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from esem.core import CoreError, Cred, Quotas, SemTable, SemView, Status, WaitDone, WaitMode
from esem.core.replay import ReplayWindow
from esem.core.table import TOKEN_BYTES, Authenticator
from esem.errors import EsemError
from esem.protocol.constants import MAX_PLAINTEXT, RESUME_MAX_AWAITED, Direction, Opcode, OpenFlag
from esem.protocol.crypto import verifier_matches, verify_keybind_mac
from esem.protocol.messages import Reply, Request, decode_request
from esem.protocol.session import (
    HelloIn,
    RequestIn,
    ServerSession,
    State,
    seal_reply,
    service_codec,
)
from esem.safe_text import printable
from esem.server.lograte import LogBucket

log = logging.getLogger("esem.server")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Stop serving (and reading) a connection whose unsent replies pass this many bytes,
# until the transport drains them (adversary A7: a client that sends and never reads).
WRITE_HIGH_WATER = 256 * 1024
# Loop time the connections of one uid may use together in one event-loop turn
# (seconds); what they sent beyond it waits for a later turn, so a tenant with many
# connections gets no more of the service than a tenant with one. At least one request
# of each uid with work runs per turn. The same budget as the switchless poller's pass.
TURN_BUDGET = 0.0005
TURN_UNCOUNTED = TURN_BUDGET / 10  # a serve shorter than this is not charged to its uid
REFUSED_LINGER = 1.0  # seconds a refused connection may stay open for its HELLO
HANDSHAKE_TIMEOUT = 5.0  # seconds from accept to HELLO (a client gives up after 5 s too)
# Connections of one uid still in their handshake. As many as its default session quota:
# a burst of clients connecting at once (all accepted before any HELLO is read) must not
# be refused for it, and a uid cannot use more sessions than that anyway.
HALF_OPEN_PER_UID = 128
LIST_PAGE_BUDGET = MAX_PLAINTEXT - 1024  # bytes of JSON per LIST reply, header room left
LIST_PAGE_ENTRIES = 64  # entries at most per LIST reply, whatever their size
# At most this many holders, dead holders and queued waiters are listed by STAT (the
# counts stay exact), so a reply fits a frame however long the queue grows.
STAT_LIST_CAP = 64
MESSAGE_LOG_LIMIT = 300  # characters of peer-influenced text in one log line
# Seconds a session whose connection was lost (its process still running) waits, detached,
# for a RESUME before it ends (PROTOCOL.md 16.4); 0 disables resumption.
RESUME_GRACE = 5.0
PROCESS_CHECK = 1.0  # seconds between looks in /proc for the processes of detached sessions
EXIT_RECHECK = 0.05  # seconds after a detach: a second look, for a process still exiting
# Requests about the connection or the session rather than a semaphore (_session_op);
# their replies never enter the replay window (PROTOCOL.md 16.3).
_SESSION_OPS = frozenset({Opcode.RESUME, Opcode.END, Opcode.SWITCHLESS})
_OK = Status.OK
# What _execute returns: (status, value, text, reply, key); see there.
Outcome = tuple[Status | None, int, str, Reply | None, bytes | None]
_STALE_TEXT = "reply lost across a service restart"
JOURNAL_FAILED = 74  # EX_IOERR: the exit status when the journal cannot be written


_END_TEXT = {
    Status.ETIMEDOUT: "timed wait reached its deadline",
    Status.ECANCELED: "wait cancelled",
    Status.EBADF: "handle closed while waiting",
}

# The fields of SemDetail that LIST shows (STAT adds the lists and their totals).
_COUNT_FIELDS = ("value", "initial", "handles", "waiters", "posts", "waits",
                 "robust_releases", "robust_forgiven", "reclaimed")
_LIST_FIELDS = ("holders", "dead_holders", "queue")


def _public(view: SemView) -> dict[str, object]:
    return {"sem_id": view.sem_id, "name": view.name, "linked": view.linked,
            "owner_uid": view.owner_uid, "owner_gid": view.owner_gid, "mode": view.mode,
            "key_bound": view.key_bound, "robust": view.robust, "created": view.created}


def _summary(view: SemView) -> dict[str, object]:
    """A LIST entry: the public fields, and the counts (null when hidden)."""
    d = _public(view)
    detail = view.detail
    for name in _COUNT_FIELDS:
        d[name] = None if detail is None else getattr(detail, name)
    return d


def _stat_json(view: SemView) -> bytes:
    d = _summary(view)
    detail = view.detail
    for name in _LIST_FIELDS:
        d[name] = None if detail is None else [list(x) for x in getattr(detail, name)]
        d[f"{name}_total"] = None if detail is None else getattr(detail, f"{name}_total")
    return json.dumps(d).encode()


class Journal(Protocol):
    """Where the service records every acknowledged change before it replies
    (``esem.server.journal.Journal``): records are appended as the table changes and
    ``commit`` writes (and with --fsync syncs) them before any reply is written."""

    def append(self, record: list[Any]) -> None: ...
    def append_req(self, sid: int, plaintext: bytes, body: bytes | None, now: float,
                   wall: float, tokens: list[bytes], running: list[int] | None) -> None: ...
    def commit(self) -> None: ...
    def wants_compaction(self) -> bool: ...
    def compact(self, snapshot: dict[str, Any]) -> bool: ...
    compaction_error: str | None


@dataclass(eq=False, slots=True)
class SessionRecord:
    """What the service keeps of a session beyond the table: what RESUME needs. All of
    it but ``conn`` and ``grace`` is journaled."""

    sid: int
    binding: bytes  # the session id h of the handshake that created it (16.1)
    verifier: bytes  # BLAKE2s(R) of its current resumption secret
    conn: Connection | None = None  # None while detached
    last_req_id: int = 0  # the highest request id executed, RESUME not counted
    window: ReplayWindow = field(default_factory=ReplayWindow)
    detached_at: float | None = None  # loop time it was detached, None while attached
    grace: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class Ctx:
    """What executing one request read from the world, so the journal can replay it
    exactly: loop time, wall time, the handle tokens drawn, the pids found running."""

    now: float = 0.0
    wall: float = 0.0
    tokens: list[bytes] = field(default_factory=list)
    running: list[int] | None = None
    replay: bool = False


class Observer(Protocol):
    """What the service reports as it runs (``esem.server.metrics.Metrics``); called on
    the event-loop thread, so it must be cheap."""

    def request(self, op: Opcode, status: Status | None, seconds: float) -> None: ...
    def wait_ended(self, status: Status) -> None: ...
    def session_refused(self) -> None: ...
    def protocol_error(self) -> None: ...


def process_running(pid: int) -> bool:
    """Whether process ``pid`` (in this service's pid namespace) exists and is not a
    zombie. A reused pid reads as running: the safe answer for ``reclaim``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # cannot tell: assume it runs
    # "pid (comm) S ...": comm may hold spaces and parentheses, so split at the last ")"
    state = stat.rpartition(b")")[2].split(maxsplit=1)[:1]
    return state not in ([b"Z"], [b"X"])


_PF_EXITING = 0x4  # <linux/sched.h>: the task is in do_exit


def process_staying(pid: int) -> bool:
    """Whether process ``pid`` runs and is not exiting: a lost connection of a process in
    its exit (it closes its sockets before it becomes a zombie) is not held for a RESUME
    that will never come. A process whose main thread alone has exited reads as exiting:
    its sessions end as they did before resumption existed."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # cannot tell: assume it runs
    fields = stat.rpartition(b")")[2].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return False
    try:
        return not int(fields[6]) & _PF_EXITING
    except (IndexError, ValueError):
        return True


def boot_id() -> str:
    """This boot's random id (Linux): a journal from another boot has no live clients."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def peer_cred(sock: socket.socket) -> Cred:
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Cred(uid=uid, gid=gid, pid=pid)


def _text(obj: object) -> str:
    """Peer-influenced text (names inside core messages, protocol errors) for a log."""
    return printable(str(obj), limit=MESSAGE_LOG_LIMIT)


class Service:
    """The semaphore table and the live connections that use it."""

    def __init__(self, static_private: bytes, quotas: Quotas | None = None, *,
                 resume_grace: float = RESUME_GRACE, codec: str | None = None) -> None:
        self.table = SemTable(quotas, token_factory=self._token)
        self._static_private = static_private
        # The sessions' transport codec, "native" or "python" (ESEM_SERVICE_CODEC by
        # default): chosen once, so a bad value stops the start-up, not a connection.
        self.codec = service_codec(codec)
        self.resume_grace = resume_grace
        self._conns: dict[int, Connection] = {}
        self._records: dict[int, SessionRecord] = {}  # every session in the table
        self._by_binding: dict[bytes, SessionRecord] = {}
        self._ctx = Ctx()  # the request being executed
        self._idle = self._ctx  # the context between requests
        self._live = Ctx()  # reused by every live request (reset by _dispatch)
        self._clock: Callable[[], float] | None = None  # the loop's time(), once known
        self.journal: Journal | None = None
        self.stopping = False
        self.restored_boot: str | None = None  # the boot id of the journal restored
        self._process_check: asyncio.TimerHandle | None = None
        self._next_sid = 1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._dirty: set[Connection] = set()
        self._half_open: Counter[int] = Counter()  # uid -> connections in handshake
        self._turn_spent: dict[int, float] = {}  # uid -> seconds served in this loop turn
        self._turn_reset_armed = False
        # Connection events (refusals, starts, ends) are budgeted per uid: a uid that
        # connects in a loop must not flood the log either.
        self._uid_logs: dict[int, LogBucket] = {}
        self.sessions_started = 0
        self.handshake_timeouts = 0
        # What accepts connections: ``esem.server.switchless.enable`` swaps in the
        # connections that can move to shared-memory rings (``esem serve --switchless``).
        self.connection_factory: Callable[[Service], Connection] = Connection
        self.switchboard: object | None = None  # the switchless poller, when enabled
        self.observer: Observer | None = None  # metrics, when enabled (--metrics)

    def __repr__(self) -> str:
        return (f"<Service connections={len(self._conns)} "
                f"half_open={sum(self._half_open.values())} {self.table!r}>")

    def _token(self) -> bytes:
        """The table's handle tokens: fresh random ones, drawn into the request's
        context (journaled); in a replay, the recorded ones."""
        ctx = self._ctx
        if ctx.replay:
            return ctx.tokens.pop(0)
        token = secrets.token_bytes(TOKEN_BYTES)
        ctx.tokens.append(token)
        return token

    def _log(self, record: list[Any]) -> None:
        if self.journal is not None and not self._ctx.replay:
            self.journal.append(record)

    def commit(self) -> None:
        """Write the journal records of this turn: called before any reply is written."""
        journal = self.journal
        if journal is None:
            return
        try:
            journal.commit()
        except OSError as exc:
            # A change that cannot be journaled must never be acknowledged: stop now, as
            # a crash would, with the journal whole up to its last commit (clients resume
            # once the service is back).
            log.critical("cannot write the journal (%s): stopping before any reply", exc)
            os._exit(JOURNAL_FAILED)
        if journal.wants_compaction() and not journal.compact(self.snapshot_state()):
            log.warning("journal compaction failed (%s); the journal keeps growing",
                        journal.compaction_error)

    # ------------------------------------------------------- journal: restore

    def snapshot_state(self) -> dict[str, Any]:
        """Everything the journal must keep, as plain data: the table and, per session,
        what RESUME needs (never a secret: V only)."""
        return {
            "format": 1,
            "boot_id": boot_id(),
            "next_sid": self._next_sid,
            "table": self.table.snapshot(),
            "sessions": [[r.sid, r.binding.hex(), r.verifier.hex(), r.last_req_id,
                          r.conn is None, [[i, b.hex()] for i, b in r.window]]
                         for r in self._records.values()],
        }

    def restore(self, snapshot: dict[str, Any], records: list[tuple[int, list[Any]]]) -> None:
        """Rebuild the state from a verified journal: the snapshot, then every record
        replayed through the same code that executed it (``_execute`` over the one
        table). Raises ``ValueError`` if the journal does not replay to what it recorded.
        Every session comes back detached; ``start_restored`` gives them their grace."""
        position = 0
        try:
            self.table = SemTable.restore(snapshot["table"], self.table.quotas,
                                          token_factory=self._token)
            self._next_sid = int(snapshot["next_sid"])
            for sid, binding, verifier, last, _detached, window in snapshot["sessions"]:
                rec = SessionRecord(sid, bytes.fromhex(binding), bytes.fromhex(verifier),
                                    last_req_id=last)
                for req_id, body in window:
                    rec.window.add(req_id, bytes.fromhex(body))
                self._records[sid] = rec
                self._by_binding[rec.binding] = rec
            for seq, record in records:
                position = seq
                self._replay(record)
        except (KeyError, IndexError, TypeError, ValueError, CoreError, EsemError) as exc:
            where = f"record seq {position}" if position else "its snapshot"
            raise ValueError(f"the journal does not replay at {where}: {exc!r}") from None
        finally:
            self._ctx = Ctx()
        self.restored_boot = snapshot.get("boot_id")

    def _replay(self, record: list[Any]) -> None:
        kind = record[0]
        self._ctx = Ctx(replay=True)
        if kind == "start":
            _, sid, uid, gid, pid, binding, verifier = record
            self.table.add_session(sid, Cred(uid=uid, gid=gid, pid=pid))
            rec = SessionRecord(sid, binding, verifier)
            self._records[sid] = rec
            self._by_binding[rec.binding] = rec
            self._next_sid = max(self._next_sid, sid + 1)
        elif kind == "req":
            _, sid, plaintext, body, now, wall, tokens, running = record
            req, signed, mac = decode_request(plaintext)
            rec = self._records[sid]
            self._ctx = Ctx(now=now, wall=wall, tokens=list(tokens), running=running,
                            replay=True)
            auth = None
            if mac is not None:
                binding = rec.binding

                def auth(key: bytes) -> None:
                    try:
                        verify_keybind_mac(key, binding, Direction.TO_SERVICE, signed, mac)
                    except EsemError:
                        raise CoreError(Status.EKEYREJECTED, "key-bound semaphore: missing "
                                        "or invalid key MAC") from None

            status, value, text, reply, key = self._execute(sid, req, keyed=mac is not None,
                                                            auth=auth)
            rec.last_req_id = req.req_id
            if (status is None) != (body is None):
                raise ValueError(f"request {req.req_id} of session {sid} did not replay")
            if status is not None:
                if reply is None:
                    reply = Reply(req.opcode, req.req_id, status, value=value, message=text)
                use = key is not None and status is not Status.EKEYREJECTED
                sealed = seal_reply(reply, rec.binding, key if use and mac else None)
                if sealed != body:
                    raise ValueError(f"request {req.req_id} of session {sid} replayed to "
                                     "another reply")
                rec.window.add(req.req_id, sealed)
        elif kind == "expire":
            self._deliver(self.table.expire(record[1]))
        elif kind == "detach":
            pass  # every restored session is detached
        elif kind == "end":
            self._end(record[1], "ended")
        elif kind == "resume":
            _, sid, fresh, verifier = record
            fresh_rec = self._records.pop(fresh)
            self._by_binding.pop(fresh_rec.binding, None)
            self.table.end_session(fresh)
            self._records[sid].verifier = verifier
        else:
            raise ValueError(f"unknown record {kind!r}")

    def start_restored(self) -> None:
        """On the event loop, after ``restore``: a journal from another boot has no live
        client (its processes are gone, their pids may be reused), so its sessions end
        now; otherwise every session waits detached for a fresh grace period. Timed
        waits keep their deadlines: CLOCK_MONOTONIC is system-wide, so within one boot
        they need no rebase."""
        other_boot = self.restored_boot not in (None, boot_id())
        for rec in list(self._records.values()):
            if other_boot or self.resume_grace <= 0:
                self._end(rec.sid, "restored from a journal of another boot" if other_boot
                          else "restored, resumption disabled")
            else:
                self._hold_detached(rec)
        self._arm_timer()

    def detached(self) -> int:
        return sum(1 for r in self._records.values() if r.conn is None)

    def statistics(self) -> dict[str, int]:
        return {"connections": len(self._conns), "sessions_started": self.sessions_started,
                "detached": self.detached(),
                "half_open": sum(self._half_open.values()),
                "handshake_timeouts": self.handshake_timeouts, **self.table.statistics()}

    def protocol_factory(self) -> Connection:
        return self.connection_factory(self)

    # -------------------------------------------------------- connection events

    def _uid_log(self, uid: int, level: int, msg: str, *args: object) -> None:
        bucket = self._uid_logs.get(uid)
        if bucket is None:
            bucket = self._uid_logs[uid] = LogBucket(burst=100, rate=20.0)
        bucket.log(log, level, f"uid {uid}", time.monotonic(), msg, *args)

    def _accepted(self, conn: Connection, cred: Cred) -> bool:
        """A new connection: admit it to its handshake unless its uid already has
        ``HALF_OPEN_PER_UID`` connections there (then refuse it at once)."""
        if self._half_open[cred.uid] >= HALF_OPEN_PER_UID:
            self._uid_log(cred.uid, logging.WARNING,
                          "refused connection pid=%d uid=%d: %d connections in handshake",
                          cred.pid, cred.uid, HALF_OPEN_PER_UID)
            conn.session.refuse(Status.EDQUOT, f"uid {cred.uid} has {HALF_OPEN_PER_UID} "
                                "connections in their handshake (limit)")
            return False
        self._half_open[cred.uid] += 1
        return True

    def _handshake_over(self, conn: Connection) -> None:
        """The connection leaves the half-open count (HELLO, timeout or hang-up)."""
        cred = conn.cred
        if cred is None or not conn.half_open:
            return
        conn.half_open = False
        self._half_open[cred.uid] -= 1
        if not self._half_open[cred.uid]:
            del self._half_open[cred.uid]

    def _attach(self, conn: Connection) -> int | None:
        """The HELLO was valid: count the session against its uid's quota, then WELCOME
        it, or refuse it (REFUSED) if the uid is at its quota."""
        cred = conn.cred
        assert cred is not None
        self._handshake_over(conn)
        sid = self._next_sid
        self._next_sid += 1
        try:
            self.table.add_session(sid, cred)
        except CoreError as exc:
            self._uid_log(cred.uid, logging.WARNING, "refused connection pid=%d uid=%d: %s",
                          cred.pid, cred.uid, _text(exc.message))
            if self.observer is not None:
                self.observer.session_refused()
            conn.session.refuse(exc.status, exc.message)
            return None
        conn.session.accept()
        conn.sid = sid
        self._conns[sid] = conn
        binding, verifier = conn.session.session_id, conn.session.verifier
        assert verifier is not None
        rec = SessionRecord(sid, binding, verifier, conn)
        self._records[sid] = rec
        self._by_binding[binding] = rec
        self._log(["start", sid, cred.uid, cred.gid, cred.pid, binding, verifier])
        self.sessions_started += 1
        self._uid_log(cred.uid, logging.INFO, "session %d start pid=%d uid=%d gid=%d",
                      sid, cred.pid, cred.uid, cred.gid)
        return sid

    def _detach(self, conn: Connection, reason: str, *, final: bool = False) -> None:
        """The connection is gone. Its session is detached (PROTOCOL.md 16.4) if it may
        resume: not ``final`` (a protocol error, END), resumption enabled, its process
        running. Otherwise it ends now."""
        self._handshake_over(conn)
        sid = conn.sid
        if sid is None or self._conns.get(sid) is not conn:
            return
        del self._conns[sid]
        conn.logs.flush(log, f"session {sid}")
        rec = self._records[sid]
        rec.conn = None
        if self.stopping and self.journal is not None:
            return  # the journal keeps the session: it comes back detached at restart
        cred = self.table.session_cred(sid)
        if not final and self.resume_grace > 0 and process_staying(cred.pid):
            self._uid_log(cred.uid, logging.INFO, "session %d detached pid=%d uid=%d (%s)",
                          sid, cred.pid, cred.uid, _text(reason))
            self._log(["detach", sid])
            self._hold_detached(rec)
            return
        self._end(sid, reason)

    def _hold_detached(self, rec: SessionRecord) -> None:
        """Keep a detached session for its grace period."""
        loop = asyncio.get_running_loop()
        rec.detached_at = loop.time()
        rec.grace = loop.call_later(self.resume_grace, self._grace_over, rec)
        # A process that is exiting closes its sockets before it becomes a zombie, so
        # the look at detach can see it still running: look again very soon.
        loop.call_later(EXIT_RECHECK, self._check_one, rec)
        if self._process_check is None:
            self._process_check = loop.call_later(PROCESS_CHECK, self._check_processes)

    def _grace_over(self, rec: SessionRecord) -> None:
        rec.grace = None
        if rec.conn is None and self._records.get(rec.sid) is rec:
            self._end(rec.sid, f"not resumed within {self.resume_grace:g} s")

    def _check_one(self, rec: SessionRecord) -> None:
        if (rec.conn is None and self._records.get(rec.sid) is rec
                and not process_staying(self.table.session_cred(rec.sid).pid)):
            self._end(rec.sid, "its process exited")

    def _check_processes(self) -> None:
        """End the detached sessions whose process is gone: nobody can resume them."""
        self._process_check = None
        waiting = False
        for rec in list(self._records.values()):
            if rec.conn is not None:
                continue
            if process_staying(self.table.session_cred(rec.sid).pid):
                waiting = True
            else:
                self._end(rec.sid, "its process exited")
        if waiting:
            self._process_check = asyncio.get_running_loop().call_later(
                PROCESS_CHECK, self._check_processes)

    def _end(self, sid: int, reason: str) -> None:
        """End a session for good, as a lost connection did before resumption."""
        rec = self._records.pop(sid)
        self._by_binding.pop(rec.binding, None)
        if rec.grace is not None:
            rec.grace.cancel()
            rec.grace = None
        cred = self.table.session_cred(sid)
        self._log(["end", sid])
        done = self.table.end_session(sid)
        if not self._ctx.replay:
            self._uid_log(cred.uid, logging.INFO, "session %d end pid=%d uid=%d (%s)",
                          sid, cred.pid, cred.uid, _text(reason))
        self._deliver(done)
        if not self._ctx.replay:
            self._arm_timer()
            self._flush()

    def _handshake_expired(self, conn: Connection) -> None:
        if not conn.half_open:
            return
        cred = conn.cred
        self.handshake_timeouts += 1
        if cred is not None:
            self._uid_log(cred.uid, logging.INFO,
                          "closed connection pid=%d uid=%d: no HELLO within %g s",
                          cred.pid, cred.uid, HANDSHAKE_TIMEOUT)
        self._handshake_over(conn)
        conn.abort()

    def _received(self, conn: Connection, data: bytes) -> None:
        try:
            conn.session.feed(data)
        except EsemError as exc:
            self._protocol_error(conn, exc)
            return
        self._serve(conn)

    def _protocol_error(self, conn: Connection, exc: EsemError) -> None:
        if self.observer is not None:
            self.observer.protocol_error()
        conn.logs.log(log, logging.WARNING, f"session {conn.sid}", time.monotonic(),
                      "session %s protocol error: %s; closing", conn.sid, _text(exc))
        # Forget the session now, before any later grant could be sent to it; a session
        # that broke the protocol can never be resumed.
        self._detach(conn, f"protocol error: {exc}", final=True)
        conn.abort()

    def _serve(self, conn: Connection) -> None:
        """Execute the connection's received requests in order, until none is left, its
        unsent replies pass the high-water mark (it resumes when they drain), or its
        turn is over (it continues on a later loop turn)."""
        conn.scheduled = False
        session = conn.session
        clock = time.perf_counter
        uid = conn.cred.uid if conn.cred is not None else -1
        start = clock()
        left = TURN_BUDGET - self._turn_spent.get(uid, 0.0)
        if left <= 0.0 and session.backlog:
            conn.update_flow()  # this uid's turn is over: stop reading, go on later
            return
        end = start + max(left, 0.0)
        try:
            # Unsent replies = the session's queue + what the transport holds, which
            # changes only when we flush: read that once.
            limit = WRITE_HIGH_WATER - conn.transport_pending()
            next_event, dispatch, obs = session.next_event, self._dispatch, self.observer
            while True:
                if session.buffered > limit:
                    conn.flush()  # the transport pauses us (or takes it all: go on)
                    limit = WRITE_HIGH_WATER - conn.transport_pending()
                    if limit < 0:
                        break
                event = next_event()
                if event is None:
                    break
                if isinstance(event, HelloIn):
                    if self._attach(conn) is None:
                        conn.flush()
                        conn.close()  # its HELLO has been read: the REFUSED gets through
                        return
                elif obs is None:
                    dispatch(conn, event)
                else:
                    began = clock()
                    status = dispatch(conn, event)
                    obs.request(event.request.opcode, status, clock() - began)
                if clock() >= end or conn.is_closing():
                    break
        except EsemError as exc:
            self._protocol_error(conn, exc)
            return
        finally:
            spent = clock() - start
            # A serve of a request or two is not counted: counting arms a callback, which
            # costs every ping-pong request an extra loop iteration; what can hold the
            # loop (batches, admin pages) always takes longer than this.
            if spent >= TURN_UNCOUNTED:
                self._charge(uid, spent)
        if conn.sid is not None:
            self._dirty.add(conn)
        else:
            conn.flush()
        self._arm_timer()
        self._flush()
        conn.update_flow()

    def _charge(self, uid: int, seconds: float) -> None:
        """Count ``seconds`` of this loop turn against ``uid``; the counts are cleared by
        a callback of the next turn (callbacks scheduled now run on the next turn)."""
        self._turn_spent[uid] = self._turn_spent.get(uid, 0.0) + seconds
        if not self._turn_reset_armed:
            self._turn_reset_armed = True
            asyncio.get_running_loop().call_soon(self._new_turn)

    def _new_turn(self) -> None:
        self._turn_spent.clear()
        self._turn_reset_armed = False

    def _resume(self, conn: Connection) -> None:
        """Serve the connection's backlog on a later loop turn (once)."""
        if not conn.scheduled and conn.session.backlog:
            conn.scheduled = True
            asyncio.get_running_loop().call_soon(self._serve, conn)

    # ------------------------------------------------------------- dispatch

    def _dispatch(self, conn: Connection, event: RequestIn) -> Status | None:
        """Apply one request and send its reply; returns the reply's status, or None
        for a wait that queued (answered later)."""
        req = event.request
        op = req.opcode
        if op in _SESSION_OPS:
            return self._session_op(conn, req)
        sid = conn.sid
        assert sid is not None
        session = conn.session
        clock = self._clock
        if clock is None:
            clock = self._clock = asyncio.get_running_loop().time
        # One context object for every live request, reset here rather than built:
        # the journal record takes copies of what it needs.
        ctx = self._ctx = self._live
        ctx.now = clock()
        ctx.wall = time.time()
        if ctx.tokens:
            ctx.tokens = []
        ctx.running = None
        mac = event.mac
        # Only a request with a MAC can prove a key; without one the core refuses any
        # key-bound semaphore (auth None), which is the same answer, cheaper.
        auth = session.authenticator(event) if mac is not None else None
        try:
            status, value, text, reply, key = self._execute(sid, req, keyed=mac is not None,
                                                            auth=auth)
        finally:
            self._ctx = self._idle
        rec = self._records[sid]
        rec.last_req_id = req.req_id
        body: bytes | None = None  # a queued wait has no reply yet
        if status is not None:
            if status is not Status.OK:
                # A tenant can make every request fail: logged within the session's
                # budget only; the core's text may carry a peer's name: escaped.
                conn.logs.log(log, logging.INFO, f"session {sid}", time.monotonic(),
                              "session %d refused %s: %s %s", sid, op.name, status.name,
                              _text(text if reply is None else reply.message))
            mac_key = (key if mac is not None and key is not None
                       and status is not Status.EKEYREJECTED else None)
            if reply is None:
                body = session.send_status(op, req.req_id, status, value, text,
                                           mac_key=mac_key)
            else:
                body = session.send_reply(reply, mac_key=mac_key)
            rec.window.add(req.req_id, body)
        journal = self.journal
        if journal is not None:
            plaintext = event.signed if mac is None else event.signed + mac  # as sent
            journal.append_req(sid, plaintext, body, ctx.now, ctx.wall, ctx.tokens,
                               ctx.running)
        return status

    def _session_op(self, conn: Connection, req: Request) -> Status:
        """RESUME, END and SWITCHLESS: requests about the connection or the session,
        never about a semaphore."""
        op = req.opcode
        if op is Opcode.RESUME:
            return self._resume_session(conn, req)
        if op is Opcode.END:
            conn.session.send_reply(Reply(op, req.req_id, Status.OK))
            # End first, then write the reply: flush commits the journal (with this
            # session's end) before the client can read that its session is over.
            self._detach(conn, "ended by its client", final=True)
            conn.flush()
            conn.close()
            return Status.OK
        # SWITCHLESS: the connection's, not the session's: not journaled
        upgraded = conn.upgrade(req)
        conn.session.send_reply(upgraded)
        return upgraded.status

    def _execute(self, sid: int, req: Request, *, keyed: bool,
                 auth: Authenticator | None) -> Outcome:
        """Apply one request of session ``sid`` to the table in the context ``_ctx``:
        live, or replayed from the journal (the same code, so a restore can never mean
        anything else). Returns ``(status, value, text, reply, key)``: status None for
        a queued wait; a reply with no payload or one u32 (``value``), or a refusal
        (``text``), as those three with ``reply`` None (the codec encodes them without
        a ``Reply``); any other reply as ``reply``; and the semaphore's key for its MAC.
        Grants it causes are delivered."""
        table = self.table
        op = req.opcode
        key: bytes | None = None
        try:
            # The common requests first, each answered without a Reply object.
            if op is Opcode.POST:
                key = table.key_for_handle(sid, req.handle)
                granted = table.post(sid, req.handle, auth=auth)
                if granted is not None:
                    self._deliver([granted])
                return _OK, 0, "", None, key
            if op is Opcode.WAIT:
                key = table.key_for_handle(sid, req.handle)
                now = self._ctx.now
                mode = req.wait_mode
                deadline = now + req.timeout_ns / 1e9 if mode is WaitMode.TIMED else None
                done = table.wait(sid, req.handle, req.req_id, mode=mode, now=now,
                                  deadline=deadline, auth=auth)
                if done is None:
                    return None, 0, "", None, key  # queued: answered by a grant, timeout, cancel
                return _OK, 0, "", None, key
            if op is Opcode.GETVALUE:
                key = table.key_for_handle(sid, req.handle)
                return _OK, table.getvalue(sid, req.handle, auth=auth), "", None, key
            if op is Opcode.CLOSE:
                key = table.key_for_handle(sid, req.handle)
                self._deliver(table.close(sid, req.handle, auth=auth))
                return _OK, 0, "", None, key
            if op is Opcode.OPEN:
                opened = table.open(
                    sid, req.name,
                    create=bool(req.oflag & OpenFlag.CREAT),
                    excl=bool(req.oflag & OpenFlag.EXCL),
                    mode=req.mode, value=req.value, key=req.key,
                    robust=bool(req.oflag & OpenFlag.ROBUST), keyed=keyed,
                    now_wall=self._ctx.wall, auth=auth,
                    accept_foreign=bool(req.oflag & OpenFlag.FOREIGN),
                )
                key = opened.key
                reply = Reply(op, req.req_id, Status.OK, handle=opened.handle,
                              created=opened.created, sem_id=opened.sem_id)
            elif op is Opcode.UNLINK:
                key = table.key_for_name(req.name)
                table.unlink(sid, req.name, keyed=keyed, auth=auth)
                return _OK, 0, "", None, key
            elif op is Opcode.RECLAIM:
                key = table.key_for_name(req.name)
                reply = self._reclaim(sid, req, keyed=keyed, auth=auth)
            elif op is Opcode.CANCEL:
                cancelled = table.cancel(sid, req.target)
                if cancelled is not None:
                    self._deliver([cancelled])
                return _OK, int(cancelled is not None), "", None, key
            elif op is Opcode.ATTACH:
                opened = table.attach(sid, req.handle, auth=auth)
                key = opened.key
                reply = Reply(op, req.req_id, Status.OK, handle=opened.handle,
                              sem_id=opened.sem_id)
            elif op is Opcode.LIST:
                reply = Reply(op, req.req_id, Status.OK, data=self._list_page(sid, req.after))
            elif op is Opcode.STAT:
                key = table.key_for_name(req.name)
                view = table.view(sid, req.name, cap=STAT_LIST_CAP, keyed=keyed, auth=auth)
                reply = Reply(op, req.req_id, Status.OK, data=_stat_json(view))
            else:
                return _OK, 0, "", None, key
        except CoreError as exc:
            return exc.status, 0, exc.message, None, key
        return reply.status, reply.value, "", reply, key

    def _resume_session(self, conn: Connection, req: Request) -> Status:
        """RESUME (PROTOCOL.md 16.2): carry on a detached (or still attached) session
        over this connection, whose own fresh session is discarded."""
        fresh = conn.sid
        assert fresh is not None and conn.cred is not None

        def refuse(status: Status, text: str) -> Status:
            conn.session.send_reply(Reply(Opcode.RESUME, req.req_id, status, message=text))
            return status

        if self.resume_grace <= 0:
            return refuse(Status.ENOENT, "no such session (resumption is disabled)")
        if len(req.awaited) > RESUME_MAX_AWAITED:
            return refuse(Status.EINVAL, f"RESUME lists more than {RESUME_MAX_AWAITED} "
                          "request ids")
        rec = self._by_binding.get(req.session)
        if rec is None or rec.sid == fresh:
            return refuse(Status.ENOENT, "no such session")
        cred = self.table.session_cred(rec.sid)
        # uid, pid and secret are all checked, the secret in constant time, and a failure
        # says which was wrong only as "EACCES": the peer proves ownership or learns nothing.
        # A session opened as root may come back under another uid: a process that drops
        # its privileges after connecting (Apache's workers) kept its connection, so it
        # keeps its session; the pid and the secret (in that process's memory only, lost
        # at exec) prove it is the same process. Any other uid change is refused.
        uid_ok = cred.uid in (conn.cred.uid, 0)
        if (not uid_ok or cred.pid != conn.cred.pid
                or not verifier_matches(rec.verifier, req.secret)):
            log.warning("session %d: refused RESUME of session %d from pid=%d uid=%d",
                        fresh, rec.sid, conn.cred.pid, conn.cred.uid)
            return refuse(Status.EACCES, "wrong session secret, uid or pid")
        if req.req_id <= rec.last_req_id or any(r >= req.req_id for r in req.awaited):
            return refuse(Status.EINVAL, "RESUME's request id must exceed the session's")
        old = rec.conn
        if old is not None:  # the new connection proved ownership: the old one goes
            rec.conn = None
            self._conns.pop(rec.sid, None)
            old.sid = None
            old.abort()
        if rec.grace is not None:
            rec.grace.cancel()
            rec.grace = None
        # Discard the connection's own fresh session (it has done nothing) and carry the
        # old one, under a rotated secret.
        fresh_rec = self._records.pop(fresh)
        self._by_binding.pop(fresh_rec.binding, None)
        del self._conns[fresh]
        self.table.end_session(fresh)
        verifier = conn.session.verifier
        assert verifier is not None
        rec.verifier = verifier
        rec.conn = conn
        rec.detached_at = None
        conn.sid = rec.sid
        self._conns[rec.sid] = conn
        self._log(["resume", rec.sid, fresh, verifier])
        session = conn.session
        session.adopt(rec.binding, rec.last_req_id, req.req_id)
        session.send_reply(Reply(Opcode.RESUME, req.req_id, Status.OK, value=rec.last_req_id))
        replayed = stale = 0
        for awaited in sorted(req.awaited):
            if awaited > rec.last_req_id:
                break
            body = rec.window.get(awaited)
            if body is not None:
                session.send_body(body)
                replayed += 1
            elif not self.table.queued(rec.sid, awaited):
                session.send_reply(Reply(Opcode.RESUME, awaited, Status.ESTALE,
                                         message=_STALE_TEXT))
                stale += 1
        log.info("session %d resumed by pid=%d uid=%d (last request %d, %d replies "
                 "re-sent, %d stale)", rec.sid, cred.pid, cred.uid, rec.last_req_id,
                 replayed, stale)
        return Status.OK

    def _reclaim(self, sid: int, req: Request, *, keyed: bool,
                 auth: Authenticator | None) -> Reply:
        # A recorded holder whose process still runs lost its session, not its critical
        # section: its units stay (the core decides; this shell only looks in /proc).
        running: set[int] = set()
        ctx = self._ctx
        recorded = set(ctx.running or ())

        def still_running(pid: int) -> bool:
            if (pid in recorded) if ctx.replay else process_running(pid):
                running.add(pid)
                return True
            return False

        units, done = self.table.reclaim(sid, req.name, keyed=keyed, auth=auth,
                                         running=still_running)
        if not ctx.replay:
            ctx.running = sorted(running)
        cred = self.table.session_cred(sid)
        # An operator's recovery changes a count outside the normal flow: visible at -q.
        log.log(logging.WARNING if units else logging.INFO,
                "session %d pid=%d uid=%d reclaimed %d unit(s) of %s held by dead processes%s",
                sid, cred.pid, cred.uid, units, printable(req.name),
                f"; kept those of running pid(s) {sorted(running)}" if running else "")
        self._deliver(done)
        return Reply(Opcode.RECLAIM, req.req_id, Status.OK, value=units)

    def _list_page(self, sid: int, after: str) -> bytes:
        """One LIST page: the entries after the cursor that fit ``LIST_PAGE_BUDGET``
        (at least one), ``more`` if any follow, and the number of names in all (the
        cursor of the next page is the last entry's name)."""
        views, more = self.table.page(sid, after, LIST_PAGE_ENTRIES)
        entries: list[str] = []
        size = 96  # the envelope below
        for view in views:
            entry = json.dumps(_summary(view))
            if size + len(entry) + 1 > LIST_PAGE_BUDGET and entries:
                more = True  # the rest of this batch did not fit: the next page has it
                break
            entries.append(entry)
            size += len(entry) + 1
        total = self.table.name_count()
        return (f'{{"total": {total}, "more": {json.dumps(more)}, '
                f'"entries": [{",".join(entries)}]}}').encode()

    def _deliver(self, done: list[WaitDone]) -> None:
        """Answer waits that ended outside their own request (grant, timeout, cancel):
        each final reply enters its session's replay window and, if the session is
        attached, is sent. A detached session finds it there when it resumes."""
        for d in done:
            rec = self._records[d.sid]  # a session leaves the table when it leaves _records
            reply = Reply(Opcode.WAIT, d.req_id, d.status, message=_END_TEXT.get(d.status, ""))
            if self.observer is not None:
                self.observer.wait_ended(d.status)
            body = seal_reply(reply, rec.binding, d.key)
            rec.window.add(d.req_id, body)
            conn = rec.conn
            if conn is not None:
                conn.session.send_body(body)
                self._dirty.add(conn)

    def _flush(self) -> None:
        # Commit even with no reply to write: a wait that queued has its place recorded.
        self.commit()
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            conn.flush()

    # ----------------------------------------------------------------- timers

    def _arm_timer(self) -> None:
        when = self.table.next_deadline()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = asyncio.get_running_loop().time()
        done = self.table.expire(now)
        if done:
            self._log(["expire", now])
        self._deliver(done)
        self._arm_timer()
        self._flush()

    def close_all(self) -> None:
        """The service stops. With a journal every session stays in it (they come back
        detached at the next start); without, they end as their connections do."""
        self.stopping = True
        self.commit()
        for conn in list(self._conns.values()):
            self._detach(conn, "service stopping", final=True)
            conn.abort()
        if self.journal is None:
            for sid in list(self._records):
                self._end(sid, "service stopping")


class Connection(asyncio.Protocol):
    """One client connection: a thin adapter between the transport and the Service.

    Reading is paused while the session has a backlog of received requests (so what a
    peer can make us hold is one read) or its replies pile up unread (``pause_writing``
    from the transport, above ``WRITE_HIGH_WATER``)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.session = ServerSession(service._static_private, codec=service.codec)
        self.sid: int | None = None
        self.cred: Cred | None = None
        self.transport: asyncio.Transport | None = None
        self.logs = LogBucket()  # this session's log budget
        self.half_open = False  # counted in the service's half-open connections
        self.scheduled = False  # a later loop turn will serve the backlog
        self._write_paused = False  # the transport's buffer is above the high-water mark
        self._reading = True
        self._handshake_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Connection sid={self.sid} {self.session!r}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport = self.transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        self.cred = peer_cred(sock)
        loop = asyncio.get_running_loop()
        if not self.service._accepted(self, self.cred):  # refused: say why, then hang up
            self.flush()
            # Close once the client's HELLO has been read (closing with it unread would
            # reset the connection and could destroy our reason before the client reads
            # it), or after REFUSED_LINGER seconds at the latest.
            loop.call_later(REFUSED_LINGER, transport.close)
            return
        self.half_open = True
        self._handshake_timer = loop.call_later(
            HANDSHAKE_TIMEOUT, self.service._handshake_expired, self)

    def data_received(self, data: bytes) -> None:
        if self.session.state is not State.CLOSED:
            self.service._received(self, data)
        elif self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.service._detach(self, "disconnected" if exc is None else f"lost: {exc}")

    def pause_writing(self) -> None:
        self._write_paused = True
        self.update_flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.update_flow()
        self.service._resume(self)

    def output_pending(self) -> int:
        """Reply bytes not yet taken by the kernel: the session's and the transport's."""
        return self.session.buffered + self.transport_pending()

    def transport_pending(self) -> int:
        """Reply bytes handed to the transport and not yet taken by the kernel."""
        t = self.transport
        return t.get_write_buffer_size() if t is not None else 0

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def update_flow(self) -> None:
        """Read from the peer only while nothing it sent waits and its replies drain; a
        backlog left by a finished turn is served on the next one."""
        backlog = self.session.backlog > 0
        if not backlog and self._reading and not self._write_paused:
            return  # the usual case: all served, reading, nothing to change
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want = not backlog and not self._write_paused
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()
        if backlog and not self._write_paused:
            self.service._resume(self)

    def flush(self) -> None:
        data = self.session.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.service.commit()  # a reply is written only after its journal records
            self.transport.write(data)

    def close(self) -> None:
        """Hang up once what is queued has been written."""
        if self.transport is not None:
            self.transport.close()

    def upgrade(self, req: Request) -> Reply:
        """SWITCHLESS: a service started without ``--switchless`` refuses (the session
        goes on over the socket); ``esem.server.switchless`` overrides this."""
        return Reply(Opcode.SWITCHLESS, req.req_id, Status.EINVAL,
                     message="switchless mode is not enabled on this service "
                     "(start it with esem serve --switchless)")

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
