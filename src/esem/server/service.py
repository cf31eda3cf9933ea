"""The service's I/O shell: one asyncio protocol per connection over one SemTable.

Everything runs on the event loop thread, so each request is applied to the table as one
atomic step. The shell does four things and nothing else: read the peer's kernel-vouched
credentials, feed bytes to the connection's ``ServerSession``, turn its requests into
table calls, and write the replies (including the late ones: grants of queued waits,
timeouts from the single deadline timer, cancellations). A connection that breaks the
protocol is logged and dropped; the table then forgets its session, and any unit that
session was waiting for goes to the next waiter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Protocol, cast

from esem.core import CoreError, Cred, Quotas, SemInfo, SemTable, Status, WaitDone, WaitMode
from esem.core.table import Authenticator
from esem.errors import EsemError
from esem.protocol.constants import MAX_PLAINTEXT, Opcode, OpenFlag
from esem.protocol.messages import Reply, Request
from esem.protocol.session import RequestIn, ServerSession
from esem.safe_text import printable

log = logging.getLogger("esem.server")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Pause reading from a client whose replies pile up unread (adversary A7).
WRITE_HIGH_WATER = 256 * 1024
REFUSED_LINGER = 1.0  # seconds a refused connection may stay open for its HELLO
LIST_PAGE_BUDGET = MAX_PLAINTEXT - 1024  # bytes of JSON per LIST reply, header room left


_END_TEXT = {
    Status.ETIMEDOUT: "timed wait reached its deadline",
    Status.ECANCELED: "wait cancelled",
    Status.EBADF: "handle closed while waiting",
}


# At most this many holders, dead holders and queued waiters are listed by STAT (the
# counts stay exact), so a reply fits a frame however long the queue grows.
STAT_LIST_CAP = 64


# What anyone may see of a semaphore, as ``ls -l /dev/shm`` shows it; the rest (its
# count and activity) only a caller with read permission.
_PUBLIC_FIELDS = ("sem_id", "name", "linked", "owner_uid", "owner_gid", "mode", "key_bound",
                  "robust", "created")


def _summary(info: SemInfo, *, full: bool) -> dict[str, object]:
    """The fields of ``esem ls``: everything but the per-process lists; without read
    permission, the public fields and nulls."""
    d = dataclasses.asdict(info)
    for name in ("holders", "dead_holders", "queue"):
        del d[name]
    if not full:
        d = {k: (v if k in _PUBLIC_FIELDS else None) for k, v in d.items()}
    return d


def _stat_json(info: SemInfo) -> bytes:
    d = dataclasses.asdict(info)
    for name in ("holders", "dead_holders", "queue"):
        d[f"{name}_total"] = len(d[name])
        d[name] = d[name][:STAT_LIST_CAP]
    return json.dumps(d).encode()


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


def peer_cred(sock: socket.socket) -> Cred:
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return Cred(uid=uid, gid=gid, pid=pid)


class Service:
    """The semaphore table and the live connections that use it."""

    def __init__(self, static_private: bytes, quotas: Quotas | None = None) -> None:
        self.table = SemTable(quotas)
        self._static_private = static_private
        self._conns: dict[int, Connection] = {}
        self._next_sid = 1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._dirty: set[Connection] = set()
        self.sessions_started = 0
        # What accepts connections: ``esem.server.switchless.enable`` swaps in the
        # connections that can move to shared-memory rings (``esem serve --switchless``).
        self.connection_factory: Callable[[Service], Connection] = Connection
        self.switchboard: object | None = None  # the switchless poller, when enabled
        self.observer: Observer | None = None  # metrics, when enabled (--metrics)

    def __repr__(self) -> str:
        return f"<Service connections={len(self._conns)} {self.table!r}>"

    def statistics(self) -> dict[str, int]:
        return {"connections": len(self._conns), "sessions_started": self.sessions_started,
                **self.table.statistics()}

    def protocol_factory(self) -> Connection:
        return self.connection_factory(self)

    # -------------------------------------------------------- connection events

    def _attach(self, conn: Connection, cred: Cred) -> int | None:
        sid = self._next_sid
        self._next_sid += 1
        try:
            self.table.add_session(sid, cred)
        except CoreError as exc:
            log.warning("refused connection pid=%d uid=%d: %s", cred.pid, cred.uid, exc.message)
            if self.observer is not None:
                self.observer.session_refused()
            conn.session.refuse(exc.status, exc.message)
            return None
        self._conns[sid] = conn
        self.sessions_started += 1
        log.info("session %d start pid=%d uid=%d gid=%d", sid, cred.pid, cred.uid, cred.gid)
        return sid

    def _detach(self, conn: Connection, reason: str) -> None:
        sid = conn.sid
        if sid is None or self._conns.get(sid) is not conn:
            return
        del self._conns[sid]
        cred = self.table.session_cred(sid)
        done = self.table.end_session(sid)
        log.info("session %d end pid=%d uid=%d (%s)", sid, cred.pid, cred.uid, reason)
        self._deliver(done)
        self._arm_timer()
        self._flush()

    def _received(self, conn: Connection, data: bytes) -> None:
        try:
            events = conn.session.receive_data(data)
        except EsemError as exc:
            log.warning("session %s protocol error: %s; closing", conn.sid, exc)
            if self.observer is not None:
                self.observer.protocol_error()
            # Forget the session now, before any later grant could be sent to it.
            self._detach(conn, f"protocol error: {exc}")
            conn.abort()
            return
        obs = self.observer
        for event in events:
            if obs is None:
                self._dispatch(conn, event)
            else:
                start = time.perf_counter()
                status = self._dispatch(conn, event)
                obs.request(event.request.opcode, status, time.perf_counter() - start)
        self._dirty.add(conn)
        self._arm_timer()
        self._flush()

    # ------------------------------------------------------------- dispatch

    def _dispatch(self, conn: Connection, event: RequestIn) -> Status | None:
        """Apply one request and send its reply; returns the reply's status, or None
        for a wait that queued (answered later)."""
        req = event.request
        sid = conn.sid
        assert sid is not None
        table = self.table
        # Only a request with a MAC can prove a key; without one the core refuses any
        # key-bound semaphore (auth None), which is the same answer, cheaper.
        auth = conn.session.authenticator(event) if event.mac is not None else None
        op = req.opcode
        key: bytes | None = None
        try:
            if op in (Opcode.CLOSE, Opcode.WAIT, Opcode.POST, Opcode.GETVALUE):
                key = table.key_for_handle(sid, req.handle)
            if op is Opcode.OPEN:
                opened = table.open(
                    sid, req.name,
                    create=bool(req.oflag & OpenFlag.CREAT),
                    excl=bool(req.oflag & OpenFlag.EXCL),
                    mode=req.mode, value=req.value, key=req.key,
                    robust=bool(req.oflag & OpenFlag.ROBUST), keyed=event.mac is not None,
                    now_wall=time.time(), auth=auth,
                    accept_foreign=bool(req.oflag & OpenFlag.FOREIGN),
                )
                key = opened.key
                reply = Reply(op, req.req_id, Status.OK, handle=opened.handle,
                              created=opened.created)
            elif op is Opcode.WAIT:
                now = asyncio.get_running_loop().time()
                deadline = now + req.timeout_ns / 1e9 if req.wait_mode is WaitMode.TIMED else None
                done = table.wait(sid, req.handle, req.req_id, mode=req.wait_mode, now=now,
                                  deadline=deadline, auth=auth)
                if done is None:
                    return None  # queued: answered later by a grant, timeout or cancel
                reply = Reply(op, req.req_id, Status.OK)
            elif op is Opcode.POST:
                granted = table.post(sid, req.handle, auth=auth)
                reply = Reply(op, req.req_id, Status.OK)
                if granted is not None:
                    self._deliver([granted])
            elif op is Opcode.GETVALUE:
                value = table.getvalue(sid, req.handle, auth=auth)
                reply = Reply(op, req.req_id, Status.OK, value=value)
            elif op is Opcode.CLOSE:
                self._deliver(table.close(sid, req.handle, auth=auth))
                reply = Reply(op, req.req_id, Status.OK)
            elif op is Opcode.UNLINK:
                key = table.key_for_name(req.name)
                table.unlink(sid, req.name, keyed=event.mac is not None, auth=auth)
                reply = Reply(op, req.req_id, Status.OK)
            elif op is Opcode.RECLAIM:
                key = table.key_for_name(req.name)
                reply = self._reclaim(sid, req, keyed=event.mac is not None, auth=auth)
            elif op is Opcode.CANCEL:
                cancelled = table.cancel(sid, req.target)
                if cancelled is not None:
                    self._deliver([cancelled])
                reply = Reply(op, req.req_id, Status.OK, value=int(cancelled is not None))
            elif op is Opcode.ATTACH:
                opened = table.attach(sid, req.handle, auth=auth)
                key = opened.key
                reply = Reply(op, req.req_id, Status.OK, handle=opened.handle)
            elif op is Opcode.LIST:
                reply = Reply(op, req.req_id, Status.OK,
                              data=self._list_page(sid, req.offset))
            elif op is Opcode.SWITCHLESS:
                reply = conn.upgrade(req)
            elif op is Opcode.STAT:
                reply = Reply(op, req.req_id, Status.OK,
                              data=_stat_json(table.stat(sid, req.name)))
            else:
                reply = Reply(op, req.req_id, Status.OK)
        except CoreError as exc:
            cred = table.session_cred(sid)
            log.info("session %d pid=%d uid=%d refused %s: %s %s", sid, cred.pid, cred.uid,
                     op.name, exc.status.name, exc.message)
            reply = Reply(op, req.req_id, exc.status, message=exc.message)
        mac = event.mac is not None and key is not None and reply.status is not Status.EKEYREJECTED
        conn.session.send_reply(reply, mac_key=key if mac else None)
        return reply.status

    def _reclaim(self, sid: int, req: Request, *, keyed: bool,
                 auth: Authenticator | None) -> Reply:
        # A recorded holder whose process still runs lost its session, not its critical
        # section: its units stay (the core decides; this shell only looks in /proc).
        running: set[int] = set()

        def still_running(pid: int) -> bool:
            if process_running(pid):
                running.add(pid)
                return True
            return False

        units, done = self.table.reclaim(sid, req.name, keyed=keyed, auth=auth,
                                         running=still_running)
        cred = self.table.session_cred(sid)
        # An operator's recovery changes a count outside the normal flow: visible at -q.
        log.log(logging.WARNING if units else logging.INFO,
                "session %d pid=%d uid=%d reclaimed %d unit(s) of %s held by dead processes%s",
                sid, cred.pid, cred.uid, units, printable(req.name),
                f"; kept those of running pid(s) {sorted(running)}" if running else "")
        self._deliver(done)
        return Reply(Opcode.RECLAIM, req.req_id, Status.OK, value=units)

    def _list_page(self, sid: int, offset: int) -> bytes:
        infos = self.table.infos()
        entries: list[str] = []
        size = 64
        for info in infos[offset:]:
            entry = json.dumps(_summary(info, full=self.table.readable(sid, info)))
            if size + len(entry) + 1 > LIST_PAGE_BUDGET and entries:
                break
            entries.append(entry)
            size += len(entry) + 1
        page = f'{{"total": {len(infos)}, "offset": {offset}, "entries": [{",".join(entries)}]}}'
        return page.encode()

    def _deliver(self, done: list[WaitDone]) -> None:
        """Answer waits that ended outside their own request (grant, timeout, cancel)."""
        for d in done:
            conn = self._conns[d.sid]  # a session leaves the table when it leaves _conns
            reply = Reply(Opcode.WAIT, d.req_id, d.status, message=_END_TEXT.get(d.status, ""))
            if self.observer is not None:
                self.observer.wait_ended(d.status)
            conn.session.send_reply(reply, mac_key=d.key)
            self._dirty.add(conn)

    def _flush(self) -> None:
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
        self._deliver(self.table.expire(asyncio.get_running_loop().time()))
        self._arm_timer()
        self._flush()

    def close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._detach(conn, "service stopping")
            conn.abort()


class Connection(asyncio.Protocol):
    """One client connection: a thin adapter between the transport and the Service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.session = ServerSession(service._static_private)
        self.sid: int | None = None
        self.transport: asyncio.Transport | None = None
        self._paused = False

    def __repr__(self) -> str:
        return f"<Connection sid={self.sid} {self.session!r}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport = self.transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        self.sid = self.service._attach(self, peer_cred(sock))
        if self.sid is None:  # refused: say why, then hang up
            self.flush()
            # Close once the client's HELLO has been read (closing with it unread would
            # reset the connection and could destroy our reason before the client reads
            # it), or after REFUSED_LINGER seconds at the latest.
            asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.sid is not None:
            self.service._received(self, data)
        elif self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.service._detach(self, "disconnected" if exc is None else f"lost: {exc}")

    def pause_writing(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def flush(self) -> None:
        data = self.session.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def upgrade(self, req: Request) -> Reply:
        """SWITCHLESS: a service started without ``--switchless`` refuses (the session
        goes on over the socket); ``esem.server.switchless`` overrides this."""
        return Reply(Opcode.SWITCHLESS, req.req_id, Status.EINVAL,
                     message="switchless mode is not enabled on this service "
                     "(start it with esem serve --switchless)")

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
