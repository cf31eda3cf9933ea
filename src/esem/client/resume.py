"""What the blocking, asyncio and anyio clients share about session resumption.

A client whose connection to the service is lost (EOF, reset, a broken pipe; never a
frame that failed authentication or parsing) reconnects to the same socket, pins the same
key and sends RESUME for its session (PROTOCOL.md, section 16); the sans-I/O part is
``ClientSession.resume``/``resend``. This module holds the policy around it: how long to
keep trying (``ESEM_RESUME_TIMEOUT``), how fast (a doubling backoff), which resumption
secret to offer after an attempt whose outcome is unknown, and which failures end the
session instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

from esem.core.status import Status
from esem.errors import IntegrityError, ServiceUnavailable

ENV = "ESEM_RESUME_TIMEOUT"
# Seconds a client keeps trying to resume a lost session: a service restart (journal
# replay included) takes well under a second; 10 s also covers a slow supervisor.
RESUME_TIMEOUT = 10.0
BACKOFF_FIRST = 0.005  # seconds before the first reconnect attempt
BACKOFF_MAX = 0.2  # seconds between attempts at most (the delay doubles up to this)


def resume_timeout(explicit: float | None = None) -> float:
    """The resume timeout in seconds: ``explicit``, else ``ESEM_RESUME_TIMEOUT``, else
    ``RESUME_TIMEOUT``. 0 turns resumption off (a lost connection fails the session, as
    before resumption existed). A value that is not a non-negative number is a
    ``ValueError`` naming the variable."""
    if explicit is not None:
        value = float(explicit)
        where = "resume_timeout"
    else:
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return RESUME_TIMEOUT
        where = ENV
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{ENV}={raw!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):  # also NaN
        raise ValueError(f"{where} must be a finite number of seconds >= 0, not {value}")
    return value


class Backoff:
    """Delays between reconnect attempts: ``BACKOFF_FIRST`` doubling to ``BACKOFF_MAX``."""

    __slots__ = ("delay",)

    def __init__(self) -> None:
        self.delay = BACKOFF_FIRST

    def next(self) -> float:
        delay = self.delay
        self.delay = min(delay * 2, BACKOFF_MAX)
        return delay


async def retry(attempt: Callable[[float], Awaitable[bool]],
                sleep: Callable[[float], Awaitable[object]], *, end: float,
                connect_timeout: float, lost: Callable[[], bool]) -> bool:
    """The resumption loop of the asyncio and anyio clients (the blocking client's own
    loop also hands the reader role around): ``await attempt(timeout)`` while ``lost()``
    (the session is neither back nor failed), with a ``Backoff`` ``sleep`` of the
    client's runtime between attempts, until one returns True (nothing more to try) or
    ``end`` (a ``time.monotonic`` time) passes. False when time ran out: the caller then
    fails the session with ``gave_up``."""
    backoff = Backoff()
    while lost():
        left = end - time.monotonic()
        if left <= 0:
            return False
        if await attempt(min(left, connect_timeout)):
            return True
        await sleep(max(0.0, min(backoff.next(), end - time.monotonic())))
    return True


def is_connection_loss(exc: BaseException) -> bool:
    """True for a failure that a resumption may repair: the service (or its socket) went
    away. Tampering (``IntegrityError``, ``ProtocolError`` is one) never is: a session
    whose stream was attacked must end."""
    if isinstance(exc, IntegrityError):
        return False
    return isinstance(exc, (OSError, ServiceUnavailable, EOFError))


class Secrets:
    """The resumption secrets to offer, newest first.

    Normally one: the session's current R. An attempt cut off after its RESUME was sent
    (the connection dropped, or a signal handler raised) leaves the outcome unknown: the
    service may have resumed the session and rotated its secret to that connection's
    WELCOME secret. The next attempt offers that one first and, if the service answers
    EACCES, the previous one; only when none is left is the session lost."""

    __slots__ = ("_candidates",)

    def __init__(self) -> None:
        self._candidates: list[bytes] = []

    def pick(self, current: bytes) -> bytes:
        return self._candidates[0] if self._candidates else current

    def unknown_outcome(self, offered: bytes, rotated: bytes | None) -> None:
        """The RESUME offering ``offered`` was sent on a connection whose WELCOME gave
        ``rotated``, and no answer came."""
        if not self._candidates:
            self._candidates = [offered]
        if rotated is not None and rotated not in self._candidates:
            self._candidates.insert(0, rotated)

    def refused(self) -> bool:
        """EACCES for the secret offered: True if another candidate is left to try."""
        if len(self._candidates) > 1:
            self._candidates.pop(0)
            return True
        return False

    def clear(self) -> None:
        self._candidates = []


def not_resumed(socket_path: object, status: Status, message: str) -> ServiceUnavailable:
    """The failure of every pending and later call once the service refused a RESUME."""
    why = {Status.ENOENT: "no such session (it ended, or its grace period expired)",
           Status.EACCES: "the service refused the session's proof"}.get(status, status.name)
    text = f"; {message}" if message else ""
    return ServiceUnavailable(
        f"esem session could not be resumed at {socket_path}: {why}{text}")


def gave_up(socket_path: object, timeout: float, reason: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"esem service at {socket_path} {reason}, and the session could not be resumed "
        f"within {timeout:g}s (ESEM_RESUME_TIMEOUT)")


__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "ENV", "RESUME_TIMEOUT", "Backoff", "Secrets",
           "gave_up", "is_connection_loss", "not_resumed", "resume_timeout"]
