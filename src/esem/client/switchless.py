"""The client's side of switchless mode: the upgrade, and the rings as a transport.

Right after the handshake a client that wants switchless sends SWITCHLESS over the
socket (PROTOCOL.md section 15). The OK reply, authenticated like every reply, carries
the ring capacity; the kernel attaches the memfd and our end of the doorbell pair to it
(SCM_RIGHTS, received close-on-exec with ``recvmsg``). Those descriptors are *not*
authenticated (the channel adversary could swap them), so they are only ever used as a
transport for frames that are: they are checked to be what they claim (a memfd sealed
against shrinking, so no one can SIGBUS us; a Unix stream socket) and the region's header
is checked, and from then on nothing in the memory is trusted but authenticated bytes.

``ClientRing`` then replaces the socket's ``sendall``/``recv`` in ``Client``: requests
are written under the client's send lock (one producer); replies are read by the thread
that holds the reader role (one consumer). Reading spins for ``CLIENT_SPIN`` (a reply
to a post comes back in tens of microseconds; only ``PARKED_SPIN`` once the service says
it has processed everything and what is left is a queued wait), then sets the sleeping
flag, re-checks,
and sleeps in ``poll`` on the doorbell *and* the session socket, so a dead service
(socket EOF) is noticed at once and a blocked wait burns no CPU. The socket carries
nothing after the upgrade: a byte on it is a protocol error.

Who asks: ``Client(switchless=True)`` (and ``esem.connect(switchless=True)``) insists
and raises ``SwitchlessUnavailable`` if the service does not offer it;
``ESEM_SWITCHLESS=1`` alone is a preference for every process that inherits it, and a
service without ``--switchless`` then gets a socket session and a ``RuntimeWarning``
(so one service without the flag does not break every program on the host).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import math
import mmap
import os
import select
import socket
import stat
import time

from esem.errors import IntegrityError, ProtocolError, ServiceUnavailable
from esem.protocol.constants import Opcode
from esem.protocol.messages import Request
from esem.protocol.ring import Region, check_capacity, region_size
from esem.protocol.session import ClientSession
from esem.safe_text import printable

log = logging.getLogger("esem.client")

# Seconds the reader spins on the reply ring before it sleeps: longer than the service
# takes to answer a post (tens of us), far shorter than any blocking wait worth sleeping.
CLIENT_SPIN = 200e-6
# Seconds it spins at most once the service has processed everything we sent without
# answering: what is left is a queued wait, which only another process's post ends. A
# short spin still catches a quick hand-off (measured: sleeping at once made the
# two-process ping-pong slower), and a long blocked wait costs no more than this.
PARKED_SPIN = 50e-6
# Longest sleep without looking again (seconds). The doorbell normally wakes us; this is
# the backstop for a wake-up lost to memory ordering (see esem.protocol.ring), and the
# moment we ring the service again if our requests still sit unread.
BACKSTOP = 0.05
# Seconds a sender waits for room in a full request ring before the session fails.
FULL_RING_TIMEOUT = 10.0
UPGRADE_FDS = 2  # memfd, doorbell
RECV_BYTES = 65536
ENV = "ESEM_SWITCHLESS"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
_BELL = b"\x01"


def _never() -> bool:
    return False


class SwitchlessUnavailable(ServiceUnavailable):
    """Switchless mode was asked for explicitly and the service does not offer it (not
    started with ``--switchless``, or out of resources); nothing was changed."""


def from_environment() -> bool:
    """Whether ``ESEM_SWITCHLESS`` asks for switchless mode."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw not in _FALSE:
        log.warning("%s=%s is neither 1 nor 0; using socket mode", ENV, printable(repr(raw)))
    return False


def upgrade(sock: socket.socket, session: ClientSession, deadline: float, *,
            strict: bool) -> ClientRing | None:
    """Ask the service for switchless mode on a fresh session. Returns the rings, or
    None when the service refused and ``strict`` is false (the session goes on over the
    socket); raises ``SwitchlessUnavailable`` when it refused and ``strict`` is true."""
    req_id = session.next_request_id()
    sock.sendall(session.send_request(Request(Opcode.SWITCHLESS, 0), req_id=req_id))
    fds: list[int] = []
    try:
        while session.is_pending(req_id):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            data, got, flags = _recv_fds_cloexec(sock)
            fds += got
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("descriptors of the switchless upgrade were cut off")
            if not data:
                raise ServiceUnavailable("esem service closed the session during the "
                                         "switchless upgrade")
            replies = session.receive_data(data)
        [reply] = replies
        if reply.status:
            reason = f"the esem service refused switchless mode: {reply.message}"
            if strict:
                raise SwitchlessUnavailable(reason)
            log.warning("%s is set but %s; using socket mode", ENV, printable(reason))
            return None
        if len(fds) != UPGRADE_FDS:
            raise IntegrityError(f"switchless upgrade carried {len(fds)} descriptors, "
                                 f"not {UPGRADE_FDS}")
        ring = ClientRing(fds[0], fds[1], sock, check_capacity(reply.value))
        fds = []  # the ring owns them now
        return ring
    finally:
        for fd in fds:
            os.close(fd)


def _recv_fds_cloexec(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """``recvmsg`` with up to ``UPGRADE_FDS`` descriptors, received close-on-exec
    (``MSG_CMSG_CLOEXEC``): SCM_RIGHTS descriptors otherwise arrive inheritable and would
    leak our rings and doorbell into every program this process execs. Not
    ``socket.recv_fds``: Python 3.11's ignores its ``flags`` argument."""
    fd_size = array.array("i").itemsize
    data, ancdata, flags, _ = sock.recvmsg(
        RECV_BYTES, socket.CMSG_SPACE(UPGRADE_FDS * fd_size), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fd_size])
    return data, list(fds), flags


class ClientRing:
    """The switchless transport of one client session (see the module doc)."""

    mode = "switchless"

    def __init__(self, memfd: int, bell_fd: int, sock: socket.socket, capacity: int) -> None:
        size = region_size(capacity)
        bell: socket.socket | None = None
        try:
            st = os.fstat(memfd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise IntegrityError("switchless region has the wrong size")
            try:
                seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
            except OSError:
                raise IntegrityError("switchless region is not a memfd") from None
            if not seals & fcntl.F_SEAL_SHRINK:
                # Anyone holding it could shrink it under our mapping: SIGBUS, not an error.
                raise IntegrityError("switchless region is not sealed against shrinking")
            bell = socket.socket(fileno=bell_fd)
            if bell.family != socket.AF_UNIX or bell.type != socket.SOCK_STREAM:
                raise IntegrityError("switchless doorbell is not a Unix stream socket")
            bell.setblocking(False)
            self._mm = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._region = Region(self._mm, capacity)
            self._region.check_header()
        except OSError as exc:
            if bell is None:
                os.close(bell_fd)
            else:
                bell.close()
            os.close(memfd)
            raise IntegrityError(f"switchless descriptors are unusable: {exc}") from None
        except BaseException:
            if bell is None:
                os.close(bell_fd)
            else:
                bell.close()
            os.close(memfd)
            raise
        # The memfd stays open for the session's life: nothing in it is secret (frames
        # are encrypted), and tools (ls -l /proc/PID/fd, the A2 ring tamperer) find it.
        self.memfd = memfd
        self.capacity = capacity
        self._bell = bell
        self._sock = sock
        self._tx, self._rx = self._region.client_ends()
        self._poller = select.poll()  # the reader's sleep: doorbell and session socket
        self._poller.register(bell, select.POLLIN)
        self._poller.register(sock, select.POLLIN)
        self._sock_poller = select.poll()  # a sender's wait for room: the socket alone
        self._sock_poller.register(sock, select.POLLIN)
        self._sock_fd = sock.fileno()
        self._dead = False
        self.taking = False  # see _take
        self.rings = 0  # doorbells we rang
        self.sleeps = 0  # times the reader slept instead of spinning

    def __repr__(self) -> str:
        return f"<ClientRing capacity={self.capacity} tx={self._tx!r} rx={self._rx!r}>"

    def statistics(self) -> dict[str, int | str]:
        return {"mode": self.mode, "capacity": self.capacity, "rings": self.rings,
                "sleeps": self.sleeps}

    # ------------------------------------------------------------- requests

    def send(self, frame: bytes) -> None:
        """Write one frame (called under the client's send lock: one producer). Raises
        ``ServiceUnavailable`` or ``RingError``."""
        tx = self._tx
        n = tx.write(frame)
        if n < len(frame):
            self._send_slow(memoryview(frame)[n:])
        if tx.peer_sleeping():
            self._ring()

    def _send_slow(self, rest: memoryview) -> None:
        """The request ring is full: the service has not drained it (it may sleep, or
        have paused us while our replies pile up). Ring, and wait for room, watching the
        socket so that a dead service is an error, not a hang."""
        give_up = time.monotonic() + FULL_RING_TIMEOUT
        while rest:
            self._ring()
            self._check_socket(wait=0.001)
            n = self._tx.write(rest)
            rest = rest[n:]
            if not n and time.monotonic() > give_up:
                raise ServiceUnavailable(
                    f"esem service left the switchless request ring full for "
                    f"{FULL_RING_TIMEOUT:.0f}s")

    def _ring(self) -> None:
        try:
            self._bell.send(_BELL, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            self.rings += 1
        except BlockingIOError:
            pass  # unread rings are queued: the service will wake anyway
        except OSError as exc:
            raise ServiceUnavailable(f"esem service went away: {exc}") from None

    # -------------------------------------------------------------- replies

    def recv(self, timeout: float) -> bytes | None:
        """Reply bytes, or None once ``timeout`` seconds passed with none (the caller's
        keepalive). Only the reader-role thread calls it (one consumer)."""
        rx = self._rx
        data = self._take()
        if data:
            return data
        clock = time.perf_counter
        now = clock()
        spin_end = now + CLIENT_SPIN
        available = rx.available
        parked = self._tx.all_done  # every request answered but a queued wait's
        yield_cpu = os.sched_yield  # lets the service run first if it shares our CPU
        while now < spin_end:
            if available():
                return self._take()
            if parked():
                # The service has processed all we sent and has nothing for us: what
                # is left is a blocked wait, which a post from elsewhere ends. Spin no
                # longer than PARKED_SPIN: that post may need our CPU.
                spin_end = min(spin_end, now + PARKED_SPIN)
                parked = _never
            yield_cpu()
            now = clock()
        end = now + max(timeout, 0.0)
        while True:
            if self._dead:
                raise ServiceUnavailable("client closed")
            if rx.sleep():  # raced with a reply: take it instead of sleeping
                rx.wake()
                return self._take()
            left = end - clock()
            if left <= 0:
                rx.wake()
                return None
            self.sleeps += 1
            try:
                events = self._poller.poll(math.ceil(min(left, BACKSTOP) * 1000))
            finally:
                rx.wake()
            for fd, _ in events:
                if fd == self._sock_fd:
                    self._check_socket(wait=0)
                else:
                    self._drain_bell()
            data = self._take()
            if data:
                return data
            if not events:
                self._backstop()

    def _take(self) -> bytes:
        """Copy what the reply ring holds out of it (advancing its tail), and say so in
        ``taking`` until the client has filed the replies: a signal handler raising in
        between loses those bytes, and the client must then end the session instead of
        parsing a stream with a hole in it (which would look like tampering)."""
        self.taking = True
        data = self._rx.read()
        if not data:
            self.taking = False
        return data

    def _backstop(self) -> None:
        """A sleep ended with no ring: if our requests still sit unread, the service's
        wake-up was lost (or its flag is not to be believed): ring it again. A spurious
        ring costs the service one look at the rings."""
        if self._tx.unconsumed():
            self._ring()

    def _drain_bell(self) -> None:
        try:
            while self._bell.recv(4096):
                pass
        except BlockingIOError:
            return
        except OSError as exc:
            raise ServiceUnavailable(f"esem service went away: {exc}") from None
        raise ServiceUnavailable("esem service closed the session")  # EOF: it is gone

    def _check_socket(self, wait: float) -> None:
        """The session socket carries nothing after the upgrade: EOF or an error means
        the service is gone, a byte means someone is not speaking the protocol."""
        if not self._sock_poller.poll(math.ceil(wait * 1000)):
            return
        try:
            data = self._sock.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            raise ServiceUnavailable(f"esem service went away: {exc}") from None
        if data:
            raise ProtocolError("data on the socket of a switchless session")
        raise ServiceUnavailable("esem service closed the session")

    # ----------------------------------------------------------------- ends

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the service to have processed everything
        written (``close()`` after END: the socket's EOF must not overtake the END still
        in the ring). A hint only: a service that lies about it just makes us wait."""
        give_up = time.monotonic() + timeout
        while not self._tx.all_done() and time.monotonic() < give_up:
            self._ring()
            time.sleep(0.001)

    def shutdown(self) -> None:
        """The session is over (failed or closed): wake a sleeping reader at once."""
        self._dead = True
        with contextlib.suppress(OSError):
            self._bell.shutdown(socket.SHUT_RDWR)

    def forget(self) -> None:
        """In a fork child: close our copies of the descriptors and never touch the
        parent's rings (the mapping goes with this object; the parent keeps its own)."""
        self._dead = True
        self.close()

    def close(self) -> None:
        """Close our descriptors (the mapping goes when this object does)."""
        self._bell.close()
        if self.memfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.memfd)
            self.memfd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
