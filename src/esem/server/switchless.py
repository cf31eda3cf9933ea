"""The service's side of switchless mode: a session's frames through shared memory.

A service started with ``--switchless`` accepts the SWITCHLESS request (PROTOCOL.md
section 15): it creates a memfd for that session alone (sealed so no one can shrink it
under us, which would SIGBUS the service), lays two rings out in it
(``esem.protocol.ring``), and answers OK over the socket with the memfd and the
client's end of a doorbell socket pair attached (SCM_RIGHTS). From then on the session's
frames, the very bytes the socket would have carried, go through the rings and are fed
to the same ``Service._received`` as socket data; the socket carries nothing more and
stays open only so that its EOF ends the session, exactly as before.

One poller (``Switchboard``) serves every switchless session from the event-loop thread,
the only thread that touches the table. It sleeps until a client rings; then it drains
every ring, dispatches, writes the replies, and keeps spinning while work keeps coming
(so a busy client pays no wake-up per operation), but yields to the event loop every
``PASS_BUDGET`` so socket sessions and timers are never starved, and goes back to sleep
after ``SPIN_IDLE`` without work. While it spins it keeps its CPU: it gives it away
(``sched_yield``, which hands it to whatever else is runnable, another tenant included)
only when it finds a reply unread while its client says it is awake, the sign of a
client waiting for this vCPU (the two share one): at once after a batch of work, then at
most once per ``YIELD_AFTER`` of idle spinning.
A native client on another vCPU thus costs no yield per operation. A session
whose reply ring is full keeps its replies in memory and is retried on a timer; it stops
being read above ``WRITE_HIGH_WATER``, as a socket session is paused.

Doorbells are a socket pair, not an eventfd. An eventfd passed to the client is one open
file description shared with it, so the client could clear its ``O_NONBLOCK`` and leave
the counter at its maximum (or at zero), and the service's next write (or read) would
block the single service thread forever: one tenant hanging all. Each end of a socket
pair is a description of its own; ours stays non-blocking whatever the client does.

The ring ends are native when the native codec is on (``esem._native_core.ServiceRing``:
the same methods, index checks and ``RingError`` as ``esem.protocol.ring``'s
``Consumer``/``Producer``), so a request costs no Python index arithmetic and an idle
spin pass one native call (``rings_ready``) instead of a Python loop over the sessions.
``ESEM_SERVICE_RINGS=python`` keeps the pure-Python reference ends (and the poller's
plain loop); ``native`` insists on the native ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import socket
import time

from esem.core import Status
from esem.errors import EsemError, ProtocolError
from esem.protocol.constants import Opcode
from esem.protocol.messages import Reply, Request
from esem.protocol.ring import (
    DEFAULT_RING_BYTES,
    Consumer,
    Producer,
    Region,
    RingError,
    region_size,
)
from esem.protocol.session import native_or_python
from esem.safe_text import printable
from esem.server.service import WRITE_HIGH_WATER, Connection, Service

try:
    from esem._native_core import ServiceRing, rings_awake_unread, rings_ready
except ImportError:  # built without Rust: Service.codec is then "python"
    ServiceRing = None  # type: ignore[assignment,misc]

log = logging.getLogger("esem.server")

RINGS_ENV = "ESEM_SERVICE_RINGS"


def service_rings(codec: str) -> str:
    """``"native"`` or ``"python"``: the service's ring ends, from ``ESEM_SERVICE_RINGS``
    (by default native with the native codec, else python). ``native`` needs the native
    codec and module (RuntimeError)."""
    return native_or_python(RINGS_ENV, os.environ.get(RINGS_ENV, ""),
                            codec == "native" and ServiceRing is not None,
                            "needs the native codec (esem._native_core built, "
                            "ESEM_SERVICE_CODEC not python)")


# Seconds the poller keeps spinning with no work before it sleeps: longer than a client
# takes from one reply to its next request (Python, ~10-20 us), so back-to-back
# operations find it awake, and short enough that an idle service costs nothing.
SPIN_IDLE = 100e-6
# Seconds of continuous work after which the poller yields to the event loop (socket
# sessions, timers) before its next pass.
PASS_BUDGET = 500e-6
# The idle poller gives its CPU away (``sched_yield``) when it finds a reply unread
# while its client says it is awake: that client may be waiting for this very vCPU (it
# gets it at once after every batch of work), or be slow on another one (then at most
# once per this many seconds of idle spinning). A native client spinning on another
# vCPU has read its reply before the poller looks, so the poller then never yields.
YIELD_AFTER = 20e-6
# Seconds between retries of a session whose reply ring was full (doubling up to the
# maximum while the client does not read).
RETRY_MIN = 0.001
RETRY_MAX = 0.1
DOORBELL_BYTES = 4096  # one recv drains this many rings of the doorbell
# Reads of a doorbell per wake-up: a client that rings non-stop must not keep the
# service in the drain loop (the rest fires the reader again, after other work).
DOORBELL_READS = 16
# Request bytes taken from one ring per poller step (~170 operations), so that one busy
# session does not hold the poller for a whole 64 KiB ring while others wait.
PUMP_BYTES = 8192
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_BELL = b"\x01"


class _Offer:
    """A ring made for one session and not yet handed over: the memfd (mapped and
    sealed) and both ends of its doorbell pair."""

    def __init__(self, capacity: int) -> None:
        size = region_size(capacity)
        self.memfd = os.memfd_create("esem-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.mm: mmap.mmap | None = None
        self.region: Region | None = None
        self.bell: socket.socket | None = None
        self.client_bell: socket.socket | None = None
        try:
            os.ftruncate(self.memfd, size)
            # Sealed before anyone else sees it: the client may write the memory, but
            # never shrink it (a read past the end would SIGBUS the service) or grow it.
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, _SEALS)
            self.mm = mmap.mmap(self.memfd, size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            self.region = Region(self.mm, capacity)
            self.region.initialize()
            self.bell, self.client_bell = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.bell.setblocking(False)
        except BaseException:
            self.close()
            raise

    def handed_over(self) -> None:
        """The client has its copies: ours of the memfd and of its bell are not needed
        (the mapping keeps the memory alive)."""
        os.close(self.memfd)
        self.memfd = -1
        if self.client_bell is not None:
            self.client_bell.close()
            self.client_bell = None

    def close(self) -> None:
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
        for s in (self.bell, self.client_bell):
            if s is not None:
                s.close()
        if self.region is not None:
            self.region.release()
            self.region = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None


class SwitchlessConnection(Connection):
    """A connection that may move to the rings. Before the upgrade it is a plain
    ``Connection``; after it, ``flush`` writes to the reply ring, the poller feeds the
    request ring to the service, and a byte on the socket is a protocol error."""

    def __init__(self, service: Service, board: Switchboard) -> None:
        super().__init__(service)
        self.board = board
        # Requests in, replies out: both one ServiceRing with the native codec.
        self.rx: Consumer | ServiceRing | None = None
        self.tx: Producer | ServiceRing | None = None
        self._native: ServiceRing | None = None
        self._offer: _Offer | None = None  # an accepted upgrade, until its reply is out
        self._region: Region | None = None
        self._mm: mmap.mmap | None = None
        self._bell: socket.socket | None = None
        self._pending = bytearray()  # replies that did not fit in the reply ring
        self.paused = False  # pending above WRITE_HIGH_WATER: requests are not read
        self.closed = False

    def __repr__(self) -> str:
        mode = "switchless" if self.rx is not None else "socket"
        return f"<SwitchlessConnection sid={self.sid} {mode} pending={len(self._pending)}>"

    # ------------------------------------------------------------ the upgrade

    def upgrade(self, req: Request) -> Reply:
        if self.rx is not None or self._offer is not None:
            return Reply(Opcode.SWITCHLESS, req.req_id, Status.EINVAL,
                         message="session is already switchless")
        try:
            self._offer = _Offer(self.board.capacity)
        except OSError as exc:  # out of descriptors or memory
            self.logs.log(log, logging.WARNING, f"session {self.sid}", time.monotonic(),
                          "session %s: cannot create a switchless ring: %s", self.sid,
                          printable(str(exc)))
            return Reply(Opcode.SWITCHLESS, req.req_id, Status.EDQUOT,
                         message=f"cannot create a switchless ring: {exc.strerror}")
        return Reply(Opcode.SWITCHLESS, req.req_id, Status.OK, value=self.board.capacity)

    def _hand_over(self, offer: _Offer) -> None:
        """Send what the session has queued (ending with the upgrade's OK reply) with the
        descriptors attached, then switch to the rings."""
        data = self.session.data_to_send()
        transport = self.transport
        if transport is None or transport.is_closing():
            offer.close()
            return
        if transport.get_write_buffer_size():
            # Earlier bytes still wait in the transport: ours would overtake them.
            offer.close()
            self._fail(ProtocolError("switchless upgrade with replies still unsent"))
            return
        region, bell, client_bell = offer.region, offer.bell, offer.client_bell
        assert region is not None and bell is not None and client_bell is not None
        native: ServiceRing | None = None
        if self.board.native:
            try:  # mapped before the client has the memfd: nobody else holds it yet
                native = ServiceRing(offer.memfd, self.board.capacity)
            except (OSError, ProtocolError) as exc:
                offer.close()
                self._fail(ProtocolError(f"could not map the ring: {exc}"))
                return
        # The transport owns the socket (uvloop's object cannot sendmsg): a duplicate
        # descriptor is the same connection. Its write buffer is empty, so writing
        # directly keeps the byte order; what the kernel does not take now follows
        # through the transport.
        try:
            dup = os.dup(transport.get_extra_info("socket").fileno())
            try:
                raw = socket.socket(fileno=dup)
            except OSError:
                os.close(dup)
                raise
            try:
                sent = socket.send_fds(raw, [data], [offer.memfd, client_bell.fileno()],
                                       socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            finally:
                raw.close()
        except OSError as exc:
            offer.close()
            if native is not None:
                native.close()
            self._fail(ProtocolError(f"could not hand the ring over: {exc}"))
            return
        if sent < len(data):
            transport.write(data[sent:])
        offer.handed_over()
        self._bell = bell
        if native is not None:
            # The native ring has a mapping of its own: the Python one is not needed.
            region.release()
            if offer.mm is not None:
                offer.mm.close()
            offer.region = offer.mm = None
            self._native = self.rx = self.tx = native
        else:
            self._region, self._mm = region, offer.mm
            self.rx, self.tx = region.service_ends()
        self.rx.sleep()  # the poller is not watching this ring yet: the client must ring
        loop = asyncio.get_running_loop()
        loop.add_reader(self._bell.fileno(), self.board.on_doorbell, self)
        self.board.add(self)
        log.info("session %s switchless (rings of %d bytes)", self.sid, self.board.capacity)

    # ------------------------------------------------------------------- I/O

    def data_received(self, data: bytes) -> None:
        if self.rx is not None:
            self._fail(ProtocolError("data on the socket of a switchless session"))
            return
        super().data_received(data)

    def flush(self) -> None:
        offer = self._offer
        if offer is not None:
            self._offer = None
            self._hand_over(offer)
        elif self.tx is None:
            super().flush()
        elif not self.closed:
            data = self.session.data_to_send()
            if data:
                self.send_ring(data)

    def send_ring(self, data: bytes) -> None:
        """Write replies to the reply ring (what does not fit waits in ``_pending``) and
        ring the client if it sleeps. Never raises: this runs inside the service's flush
        of every session, and one session's corrupt ring must not stop the others'."""
        tx = self.tx
        assert tx is not None
        try:
            native = self._native
            rung = False  # the native send rings a sleeping client itself
            if self._pending:
                self._pending += data
                self._flush_pending()
            else:
                if native is not None:
                    bell = self._bell
                    n = native.send(data, -1 if bell is None else bell.fileno())
                    rung = True
                else:
                    n = tx.write(data)
                if n < len(data):
                    self._pending += memoryview(data)[n:]
                    self.board.backed_up.add(self)
            if not rung and tx.peer_sleeping():
                self.ring_client()
        except RingError as exc:
            self._fail(exc)
            return
        if self._pending:
            self.board.retry_soon()  # nobody may ring when the client makes room
            if len(self._pending) > WRITE_HIGH_WATER:
                self.paused = True

    def _flush_pending(self) -> bool:
        """Move what fits of the pending replies into the ring; True if any moved."""
        assert self.tx is not None
        n = self.tx.write(self._pending)
        if n:
            del self._pending[:n]
            if not self._pending:
                self.board.backed_up.discard(self)
            if self.paused and len(self._pending) <= WRITE_HIGH_WATER // 2:
                self.paused = False
                self.service._resume(self)  # requests it received wait to be served
        return n > 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def transport_pending(self) -> int:
        if self.tx is None:
            return super().transport_pending()
        return len(self._pending)  # replies that did not fit the reply ring

    def is_closing(self) -> bool:
        return self.closed or super().is_closing()

    def update_flow(self) -> None:
        if self.rx is None:
            super().update_flow()
            return
        # Ring mode: the poller reads requests only while none wait (``pump``); the
        # processed counter moves once every request read has been executed.
        if self.session.backlog:
            if not self.paused:
                self.service._resume(self)
        elif not self.closed:
            try:
                self.rx.done()
            except RingError as exc:
                self._fail(exc)

    def pump(self) -> bool:
        """One poller step for this session: flush pending replies, feed new requests to
        the service. True if there was anything to do."""
        rx, tx = self.rx, self.tx
        if rx is None or tx is None or self.closed:
            return False
        worked = False
        try:
            if self._pending and self._flush_pending():
                worked = True
                if tx.peer_sleeping():
                    self.ring_client()
            if not self.paused and not self.session.backlog:
                data = rx.read(PUMP_BYTES)
                if data:
                    # Executes what fits this turn; ``update_flow`` then marks the ring
                    # processed (after the replies: a client seeing it may sleep), or
                    # the rest is served on a later turn before the ring is read again.
                    self.service._received(self, data)
                    worked = True
        except RingError as exc:
            self._fail(exc)
            return True
        return worked

    def awake_with_unread_replies(self) -> bool:
        """Replies sit in the ring while the client says it is not sleeping: a hint
        (from untrusted memory) that it may be waiting for a CPU. A lying client only
        makes the idle poller yield, at most once per ``YIELD_AFTER``."""
        tx = self.tx
        if tx is None or self.closed:
            return False
        try:
            return tx.unconsumed() > 0 and not tx.peer_sleeping()
        except RingError:
            return False  # the next pump refuses the ring and ends the session

    def ring_client(self) -> None:
        if self._bell is None:
            return
        try:
            self._bell.send(_BELL, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            pass  # rings the client has not read yet: it will wake anyway
        except OSError:
            pass  # the client is gone; its socket's EOF ends the session

    def drain_doorbell(self) -> None:
        bell = self._bell
        if bell is None:
            return
        try:
            for _ in range(DOORBELL_READS):
                if not bell.recv(DOORBELL_BYTES):
                    break
            else:
                return  # still ringing: the reader fires again
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(ProtocolError(f"switchless doorbell failed: {exc}"))
            return
        # EOF: the client closed its end, which it does only when it goes (its socket's
        # EOF is on its way); end the session now rather than poll a dead doorbell.
        self.service._detach(self, "disconnected")
        self.abort()

    # --------------------------------------------------------------- endings

    def _fail(self, exc: EsemError) -> None:
        """The session broke the protocol through its ring (or the hand-over failed):
        end it as ``Service._received`` ends a socket session that did."""
        if self.closed:
            return
        self.logs.log(log, logging.WARNING, f"session {self.sid}", time.monotonic(),
                      "session %s protocol error: %s; closing", self.sid, printable(str(exc)))
        self.service._detach(self, f"protocol error: {exc}", final=True)
        self.abort()

    def abort(self) -> None:
        self._close_ring()
        super().abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_ring()
        super().connection_lost(exc)

    def _close_ring(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._offer is not None:
            self._offer.close()
            self._offer = None
        self.board.remove(self)
        if self._bell is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._bell.fileno())
            self._bell.close()
            self._bell = None
        self.rx = self.tx = None
        self._pending.clear()
        self.board.backed_up.discard(self)
        if self._native is not None:
            self._native.close()
            self._native = None
        if self._region is not None:
            self._region.release()
            self._region = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class Switchboard:
    """The poller of every switchless session of one service (event-loop thread only)."""

    def __init__(self, service: Service, capacity: int = DEFAULT_RING_BYTES) -> None:
        region_size(capacity)  # validates
        self.service = service
        self.capacity = capacity
        # Native ring ends with the native codec, unless told otherwise (module docstring).
        self.native = service_rings(service.codec) == "native"
        self._conns: list[SwitchlessConnection] = []
        # Sessions whose replies wait for room in their ring: a pass pumps them even
        # when no request is waiting anywhere.
        self.backed_up: set[SwitchlessConnection] = set()
        self._running = False  # a pass is running or scheduled
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = RETRY_MIN
        self._version = 0  # bumped when a session comes or goes
        self.passes = 0
        self.wakeups = 0
        self.yields = 0  # sched_yield calls of the idle poller (see YIELD_AFTER)

    def __repr__(self) -> str:
        state = "running" if self._running else "asleep"
        return f"<Switchboard sessions={len(self._conns)} {state} passes={self.passes}>"

    def statistics(self) -> dict[str, int]:
        return {"switchless_sessions": len(self._conns), "switchless_wakeups": self.wakeups,
                "switchless_passes": self.passes, "switchless_yields": self.yields}

    def connection(self, service: Service) -> Connection:
        return SwitchlessConnection(service, self)

    def add(self, conn: SwitchlessConnection) -> None:
        self._conns.append(conn)
        self._version += 1

    def remove(self, conn: SwitchlessConnection) -> None:
        with contextlib.suppress(ValueError):
            self._conns.remove(conn)
            self._version += 1

    def on_doorbell(self, conn: SwitchlessConnection) -> None:
        conn.drain_doorbell()
        self.wakeups += 1
        if not self._running:
            self._running = True
            self._pass()

    def retry_soon(self) -> None:
        """A reply ring was full: come back even if nobody rings."""
        if self._retry is None:
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(self._retry_delay, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        before = sum(c.pending for c in self._conns)
        for c in tuple(self._conns):
            c.pump()
        after = sum(c.pending for c in self._conns)
        if after:
            # Back off while no client reads (a rogue one may never); a reader that made
            # room keeps the retries quick.
            moved = after < before
            self._retry_delay = RETRY_MIN if moved else min(self._retry_delay * 2, RETRY_MAX)
            self.retry_soon()
        else:
            self._retry_delay = RETRY_MIN

    def _pass(self) -> None:
        """Serve the rings until SPIN_IDLE passes without work (then sleep) or
        PASS_BUDGET is used up (then yield to the event loop and come back)."""
        self.passes += 1
        conns = tuple(self._conns)
        version = self._version
        if not conns:
            self._running = False
            return
        rings = self._rings(conns)
        for c in conns:
            if c.rx is not None:
                c.rx.wake()  # clients need not ring while we look anyway
        clock = time.perf_counter
        now = clock()
        idle_since = now
        last_yield = -YIELD_AFTER
        budget_end = now + PASS_BUDGET
        while True:
            worked = False
            # With native rings one call tells whether any pump can have work: a pump
            # works only on a waiting request (or bad index) or on pending replies.
            if rings is None or self.backed_up or rings_ready(rings):
                for c in conns:
                    if c.pump():
                        worked = True
            now = clock()
            if worked:
                idle_since = now
                last_yield = -YIELD_AFTER  # new replies: their clients may need us at once
            elif now - idle_since >= SPIN_IDLE:
                break
            elif now - last_yield >= YIELD_AFTER and (
                    any(c.awake_with_unread_replies() for c in conns) if rings is None
                    else rings_awake_unread(rings)):
                # That client may be waiting for our vCPU: let it run, once.
                os.sched_yield()
                self.yields += 1
                last_yield = clock()
            if now >= budget_end:
                asyncio.get_running_loop().call_soon(self._pass)
                return
            if version != self._version:  # sessions came or went during dispatch
                conns, version = tuple(self._conns), self._version
                rings = self._rings(conns)
        # Going to sleep: say so in every ring, then look once more (a client that wrote
        # just before reading our flag would not ring; see esem.protocol.ring).
        again = False
        for c in conns:
            rx = c.rx
            if rx is None:
                continue
            try:
                if rx.sleep():
                    again = True
            except RingError as exc:
                c._fail(exc)
        if again:
            asyncio.get_running_loop().call_soon(self._pass)
        else:
            self._running = False


    def _rings(self, conns: tuple[SwitchlessConnection, ...]) -> tuple[ServiceRing, ...] | None:
        """The native rings of ``conns`` for the spin's one-call checks, or None when
        the poller must ask every session itself (Python rings)."""
        if not self.native:
            return None
        rings = tuple(c._native for c in conns if c._native is not None)
        return rings if len(rings) == len(conns) else None


def enable(service: Service, capacity: int = DEFAULT_RING_BYTES) -> Switchboard:
    """Make ``service`` offer switchless mode: its new connections can upgrade."""
    board = Switchboard(service, capacity)
    service.switchboard = board
    service.connection_factory = board.connection
    return board
