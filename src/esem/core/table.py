"""The semaphore table: every e-semaphore of the host and the state machine over it.

This is the trusted computing base of esem. It is pure: no sockets, no threads, no clock
reads (the caller passes ``now``), no randomness except through the injected token
factory. One caller drives it from one thread; every method either completes its whole
change or raises ``CoreError`` having changed nothing.

Semantics (docs/design.md section 4):

* POSIX named semaphores: O_CREAT/O_EXCL, mode, initial value 0..SEM_VALUE_MAX, post
  past the maximum is EOVERFLOW, unlink removes the name at once while open handles keep
  the semaphore alive, and a later create under that name is a new semaphore.
* Waiters are served FIFO, and ``post`` hands its unit straight to the first waiter, so a
  newcomer's ``trywait`` can never overtake a queued waiter.
* A queued wait ends exactly once: granted, timed out, cancelled, or dropped with its
  session. Because the table is the only place a unit can move and it moves it atomically,
  a cancel or timeout racing a grant either finds the wait still queued (and the unit goes
  to the next waiter or the count) or finds it already granted (and reports that).
* Holdings: units a session took and has not given back. A post by a session that holds
  nothing while others hold is a hand-off coming back: it is charged to the
  longest-standing holder. A dead session's holdings are kept on record (by pid) for
  plain semaphores, until the owner (or root) reclaims them (``reclaim``, ``esem
  reclaim``), and released for robust ones, but only up to the capacity (the initial
  value): a release never makes ``value + held`` exceed it, so a unit already posted
  back by someone else is never restored twice. Units not released are counted as
  ``robust_forgiven``.
* ``O_CREAT`` does not adopt an existing semaphore of another non-root uid (a squatted
  name) unless the caller accepts a foreign owner.
* Conservation, at every point between calls, for every semaphore::

      value == initial + posts - waits + robust_releases + reclaimed

  where ``waits`` counts granted waits; and no more units are held than were ever
  taken. ``check_invariants`` asserts these and the bookkeeping behind them.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from esem.core.limits import SEM_VALUE_MAX, check_key, check_name, check_value
from esem.core.policy import (
    ROOT_UID,
    Cred,
    Quotas,
    check_access,
    check_adopt,
    check_unlink,
    may_read,
)
from esem.core.status import CoreError, Status

TOKEN_BYTES = 16  # handle capability: 128 random bits, unguessable (adversary A3)

# Given the semaphore's key, raises CoreError(EKEYREJECTED) unless the request carries a
# valid MAC under it. The protocol layer builds one per request; the core only decides
# when a key must be proven.
Authenticator = Callable[[bytes], None]
TokenFactory = Callable[[], bytes]


class WaitMode(IntEnum):
    TRY = 0  # never queue: EAGAIN at zero
    BLOCK = 1  # queue until granted or cancelled
    TIMED = 2  # queue until granted, cancelled, or the deadline passes


@dataclass(frozen=True, slots=True)
class WaitDone:
    """A wait has ended: the service owes session ``sid`` the answer ``status`` to
    request ``req_id``. ``key`` is the semaphore's key, for the reply's MAC."""

    sid: int
    req_id: int
    handle: bytes
    key: bytes | None
    status: Status


@dataclass(frozen=True, slots=True)
class Opened:
    handle: bytes
    created: bool
    key: bytes | None


@dataclass(frozen=True, slots=True)
class SemInfo:
    """A read-only view of one semaphore, for ``esem ls`` and ``esem stat``."""

    sem_id: int
    name: str
    linked: bool
    value: int
    initial: int
    owner_uid: int
    owner_gid: int
    mode: int
    key_bound: bool
    robust: bool
    created: float
    handles: int
    waiters: int
    posts: int
    waits: int
    robust_releases: int
    robust_forgiven: int  # units dead robust holders had on record but were already back
    reclaimed: int  # dead holders' units released by ``reclaim``
    holders: tuple[tuple[int, int], ...]  # (pid, units) of live sessions holding units
    dead_holders: tuple[tuple[int, int], ...]  # (pid, units) that died holding them
    queue: tuple[tuple[int, int, float | None], ...]  # (pid, request id, deadline), FIFO


@dataclass(frozen=True, slots=True)
class SemDetail:
    """What reading a semaphore reveals (STAT, LIST): its count, activity, and the first
    entries of its holders, dead holders and FIFO queue (``*_total`` are exact)."""

    value: int
    initial: int
    handles: int
    waiters: int
    posts: int
    waits: int
    robust_releases: int
    robust_forgiven: int
    reclaimed: int
    holders: tuple[tuple[int, int], ...]  # (pid, units), in the order they first took one
    holders_total: int
    dead_holders: tuple[tuple[int, int], ...]  # (pid, units)
    dead_holders_total: int
    queue: tuple[tuple[int, int, float | None], ...]  # (pid, request id, deadline), FIFO
    queue_total: int


@dataclass(frozen=True, slots=True)
class SemView:
    """A bounded view of one semaphore: what anyone may see of it (as ``ls -l /dev/shm``
    shows a file) and, if the caller may read it, ``detail``."""

    sem_id: int
    name: str
    linked: bool
    owner_uid: int
    owner_gid: int
    mode: int
    key_bound: bool
    robust: bool
    created: float
    detail: SemDetail | None = None  # None: no read permission, or no proof of the key


class _NameIndex(dict[str, "_Sem"]):
    """The linked names (a dict, as before) that also keeps them sorted in ``order``, so
    LIST serves the page after any cursor by bisection instead of sorting the table.
    Adding or removing a name costs a bisection and an O(n) move of pointers in the
    list (``bisect.insort``): about a microsecond per thousand names."""

    __slots__ = ("order",)

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def __setitem__(self, name: str, sem: _Sem) -> None:
        if name not in self:
            bisect.insort(self.order, name)
        super().__setitem__(name, sem)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        del self.order[bisect.bisect_left(self.order, name)]

    def pop(self, *args: Any, **kwargs: Any) -> Any:
        name = args[0]
        if name in self:
            sem = self[name]
            del self[name]
            return sem
        return super().pop(*args, **kwargs)

    def _unsupported(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the name index supports only item assignment, del and pop")

    popitem = clear = update = setdefault = __ior__ = _unsupported


@dataclass(eq=False, slots=True)
class _Sem:
    sem_id: int
    name: str
    value: int  # invariant: value > 0 implies not waiters
    initial: int
    owner_uid: int
    owner_gid: int
    mode: int
    key: bytes | None
    robust: bool
    created: float
    linked: bool = True
    handles: int = 0  # open handles over all sessions; alive while linked or handles > 0
    waiters: OrderedDict[tuple[int, int], _Waiter] = field(default_factory=OrderedDict)
    # sid -> units, all > 0, in the order the holders began holding (oldest first)
    holdings: dict[int, int] = field(default_factory=dict)
    held: int = 0  # == sum(holdings.values()), kept so a release costs O(1)
    dead_holdings: dict[int, int] = field(default_factory=dict)  # pid -> units
    posts: int = 0
    waits: int = 0  # granted waits, immediate or queued
    robust_releases: int = 0
    robust_forgiven: int = 0
    reclaimed: int = 0  # dead holders' units released by ``reclaim``


@dataclass(eq=False, slots=True)
class _Handle:
    token: bytes
    sem: _Sem
    sid: int


@dataclass(eq=False, slots=True)
class _Waiter:
    sid: int
    req_id: int
    handle: _Handle
    deadline: float | None
    active: bool = True  # False once granted/cancelled/expired (lazy deletion from the heap)


@dataclass(eq=False, slots=True)
class _Session:
    sid: int
    cred: Cred
    handles: dict[bytes, _Handle] = field(default_factory=dict)
    waits: dict[int, _Waiter] = field(default_factory=dict)  # queued waits by request id
    held: set[_Sem] = field(default_factory=set)  # semaphores where holdings[sid] > 0


class SemTable:
    """All e-semaphores of one service, with the sessions that use them."""

    def __init__(
        self, quotas: Quotas | None = None, token_factory: TokenFactory | None = None
    ) -> None:
        self.quotas = quotas or Quotas()
        self._new_token = token_factory or (lambda: secrets.token_bytes(TOKEN_BYTES))
        self._names: _NameIndex = _NameIndex()  # linked semaphores only; sorted for LIST
        self._alive: dict[int, _Sem] = {}  # every semaphore not yet destroyed, by id
        self._sessions: dict[int, _Session] = {}
        self._tokens: dict[bytes, _Handle] = {}  # every open handle, for attach
        self._deadlines: list[tuple[float, int, _Waiter]] = []  # heap, lazily cleaned
        self._stale_deadlines = 0  # heap entries of waits that already ended
        self._next_sem_id = 1
        self._heap_seq = 0
        self._sems_by_uid: Counter[int] = Counter()
        self._sessions_by_uid: Counter[int] = Counter()
        self._waiters_by_uid: Counter[int] = Counter()

    def __repr__(self) -> str:
        return (
            f"<SemTable names={len(self._names)} alive={len(self._alive)} "
            f"sessions={len(self._sessions)} handles={len(self._tokens)}>"
        )

    def statistics(self) -> dict[str, int]:
        return {
            "names": len(self._names),
            "semaphores": len(self._alive),
            "sessions": len(self._sessions),
            "handles": len(self._tokens),
            "waiters": sum(len(s.waiters) for s in self._alive.values()),
        }

    # ----------------------------------------------------------------- sessions

    def add_session(self, sid: int, cred: Cred) -> None:
        if sid in self._sessions:
            raise CoreError(Status.EINVAL, f"session {sid} exists")
        if self._sessions_by_uid[cred.uid] >= self.quotas.sessions_per_uid:
            raise CoreError(
                Status.EDQUOT,
                f"uid {cred.uid} has {self.quotas.sessions_per_uid} sessions (quota)",
            )
        self._sessions[sid] = _Session(sid, cred)
        self._sessions_by_uid[cred.uid] += 1

    def end_session(self, sid: int) -> list[WaitDone]:
        """Forget a dead session: drop its queued waits, release its holdings of robust
        semaphores (which may grant other sessions' waits: returned), record the rest,
        close its handles."""
        sess = self._session(sid)
        for waiter in list(sess.waits.values()):
            self._unqueue(waiter)
        done: list[WaitDone] = []
        for sem in list(sess.held):
            units = sem.holdings.pop(sid)
            sess.held.discard(sem)
            sem.held -= units
            if sem.robust:
                # Restore units only up to the capacity. Units above it came from posts
                # made while nobody held (a work queue's producer, a mutex "opened" with
                # a post): a session that took those and died was done, not stuck.
                free = min(units, max(0, sem.initial - sem.value - sem.held))
                sem.robust_forgiven += units - free
                sem.robust_releases += free
                while free and sem.waiters:
                    done.append(self._grant_first(sem))
                    free -= 1
                sem.value += free  # <= initial - held <= SEM_VALUE_MAX
            else:
                pid = sess.cred.pid
                sem.dead_holdings[pid] = sem.dead_holdings.get(pid, 0) + units
        for handle in list(sess.handles.values()):
            self._drop_handle(sess, handle)
        del self._sessions[sid]
        self._sessions_by_uid[sess.cred.uid] -= 1
        if not self._sessions_by_uid[sess.cred.uid]:
            del self._sessions_by_uid[sess.cred.uid]
        return done

    def reclaim(self, sid: int, name: str, *, keyed: bool = False,
                auth: Authenticator | None = None,
                running: Callable[[int], bool] | None = None) -> tuple[int, list[WaitDone]]:
        """Release the units recorded as held by dead processes on the semaphore ``name``
        (a plain semaphore's holders whose sessions ended; a robust one has none) to its
        waiters or its count: recovery without restarting the service. Only the owner
        or root may (EACCES); a key-bound semaphore needs its key, and ``keyed`` (the
        caller holds a key) refuses one that is not key-bound. ``running(pid)`` says
        whether a recorded pid's process still runs (the I/O shell looks; asked only
        once the caller is allowed): a session can end while its process lives on
        inside its critical section (its session failed), so those units stay on
        record. Returns the number of units released and the
        waits they granted. Units that would lift the count past SEM_VALUE_MAX stay on
        record too: nothing is created, nothing lost."""
        sess = self._session(sid)
        check_name(name)
        sem = self._names.get(name)
        if sem is None:
            raise CoreError(Status.ENOENT, f"no semaphore {name}")
        if sess.cred.uid not in (ROOT_UID, sem.owner_uid):
            raise CoreError(Status.EACCES, f"uid {sess.cred.uid} may not reclaim units of "
                            f"{name} (owned by uid {sem.owner_uid})")
        if sem.key is None and keyed:
            raise CoreError(Status.EKEYREJECTED, f"semaphore {name} is not key-bound")
        self._authenticate(sem, auth)
        released = 0
        done: list[WaitDone] = []
        for pid in sorted(sem.dead_holdings):
            if running is not None and running(pid):
                continue
            while pid in sem.dead_holdings:
                if not sem.waiters and sem.value + sem.held >= SEM_VALUE_MAX:
                    return released, done  # the count is full: the rest stay on record
                left = sem.dead_holdings[pid] - 1
                if left:
                    sem.dead_holdings[pid] = left
                else:
                    del sem.dead_holdings[pid]
                sem.reclaimed += 1
                released += 1
                if sem.waiters:
                    done.append(self._grant_first(sem))
                else:
                    sem.value += 1  # checked above
        return released, done

    def quota_use(self) -> dict[str, dict[int, int]]:
        """What each uid holds of its per-uid quotas (for metrics): semaphores, sessions
        and queued waits by uid, uids holding none left out."""
        return {"semaphores": dict(self._sems_by_uid), "sessions": dict(self._sessions_by_uid),
                "waiters": dict(self._waiters_by_uid)}

    def session_cred(self, sid: int) -> Cred:
        return self._session(sid).cred

    # ------------------------------------------------------------ names/handles

    def open(
        self,
        sid: int,
        name: str,
        *,
        create: bool,
        excl: bool,
        mode: int,
        value: int,
        now_wall: float,
        key: bytes | None = None,
        robust: bool = False,
        keyed: bool = False,
        auth: Authenticator | None = None,
        accept_foreign: bool = False,
    ) -> Opened:
        """``sem_open``. ``key`` makes a newly created semaphore key-bound; for an existing
        key-bound one, ``auth`` must prove the key. ``keyed`` says the caller holds a key
        and will not accept a semaphore that is not bound to one. ``accept_foreign`` lets
        ``create`` open an existing semaphore of another non-root uid."""
        keyed = keyed or key is not None
        sess = self._session(sid)
        check_name(name)
        if excl and not create:
            raise CoreError(Status.EINVAL, "O_EXCL needs O_CREAT")
        if len(sess.handles) >= self.quotas.handles_per_session:
            raise CoreError(
                Status.EDQUOT,
                f"session holds {self.quotas.handles_per_session} handles (quota)",
            )
        sem = self._names.get(name)
        if sem is not None:
            if create and excl:
                raise CoreError(Status.EEXIST, f"semaphore {name} exists")
            check_access(sess.cred, sem.owner_uid, sem.owner_gid, sem.mode, name)
            if sem.key is None and keyed:
                raise CoreError(
                    Status.EKEYREJECTED, f"semaphore {name} exists and is not key-bound"
                )
            self._authenticate(sem, auth)
            if create and not accept_foreign:
                check_adopt(sess.cred, sem.owner_uid, sem.owner_gid, sem.mode, name)
            created = False
        else:
            if not create:
                raise CoreError(Status.ENOENT, f"no semaphore {name}")
            check_value(value)
            check_key(key)
            if keyed and key is None:
                raise CoreError(Status.EKEYREJECTED, f"no semaphore {name} to open with a key")
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                raise CoreError(Status.EINVAL, f"mode {mode!r} is not a permission mode")
            uid = sess.cred.uid
            if self._sems_by_uid[uid] >= self.quotas.semaphores_per_uid:
                raise CoreError(
                    Status.EDQUOT,
                    f"uid {uid} owns {self.quotas.semaphores_per_uid} semaphores (quota)",
                )
            sem = _Sem(
                sem_id=self._next_sem_id,
                name=name,
                value=value,
                initial=value,
                owner_uid=uid,
                owner_gid=sess.cred.gid,
                mode=mode & 0o777,
                key=bytes(key) if key is not None else None,
                robust=robust,
                created=now_wall,
            )
            self._next_sem_id += 1
            self._names[name] = sem
            self._alive[sem.sem_id] = sem
            self._sems_by_uid[uid] += 1
            created = True
        handle = self._add_handle(sess, sem)
        return Opened(handle.token, created, sem.key)

    def attach(self, sid: int, token: bytes, *, auth: Authenticator | None = None) -> Opened:
        """Give session ``sid`` its own handle on the semaphore behind another session's
        open handle ``token`` (a forked child re-attaching what it inherited). The token
        is a capability, and only valid for the uid of the session that holds it."""
        sess = self._session(sid)
        other = self._tokens.get(token)
        if other is None or (
            self._sessions[other.sid].cred.uid != sess.cred.uid and sess.cred.uid != 0
        ):
            raise CoreError(Status.EBADF, "no such handle")
        if len(sess.handles) >= self.quotas.handles_per_session:
            raise CoreError(
                Status.EDQUOT,
                f"session holds {self.quotas.handles_per_session} handles (quota)",
            )
        self._authenticate(other.sem, auth)
        handle = self._add_handle(sess, other.sem)
        return Opened(handle.token, False, other.sem.key)

    def close(self, sid: int, token: bytes, *, auth: Authenticator | None = None) -> list[WaitDone]:
        """``sem_close``. Waits of this session still queued on the handle end with EBADF
        (returned), as a thread waiting on a closed descriptor would."""
        sess, handle = self._handle(sid, token)
        self._authenticate(handle.sem, auth)
        done = [
            WaitDone(sid, w.req_id, token, handle.sem.key, Status.EBADF)
            for w in list(sess.waits.values())
            if w.handle is handle
        ]
        for event in done:
            self._unqueue(sess.waits[event.req_id])
        self._drop_handle(sess, handle)
        return done

    def unlink(self, sid: int, name: str, *, keyed: bool = False,
               auth: Authenticator | None = None) -> None:
        """``sem_unlink``: the name goes at once; open handles keep the semaphore.
        ``keyed``: the caller holds a key and refuses to unlink an unbound semaphore."""
        sess = self._session(sid)
        check_name(name)
        sem = self._names.get(name)
        if sem is None:
            raise CoreError(Status.ENOENT, f"no semaphore {name}")
        check_unlink(sess.cred, sem.owner_uid, name)
        if sem.key is None and keyed:
            raise CoreError(Status.EKEYREJECTED, f"semaphore {name} is not key-bound")
        self._authenticate(sem, auth)
        del self._names[name]
        sem.linked = False
        self._maybe_destroy(sem)

    def key_for_name(self, name: str) -> bytes | None:
        sem = self._names.get(name)
        return sem.key if sem is not None else None

    def key_for_handle(self, sid: int, token: bytes) -> bytes | None:
        sess = self._sessions.get(sid)
        handle = sess.handles.get(token) if sess is not None else None
        return handle.sem.key if handle is not None else None

    def key_for_token(self, token: bytes) -> bytes | None:
        handle = self._tokens.get(token)
        return handle.sem.key if handle is not None else None

    # --------------------------------------------------------------- counting

    def wait(
        self,
        sid: int,
        token: bytes,
        req_id: int,
        *,
        mode: WaitMode,
        now: float,
        deadline: float | None = None,
        auth: Authenticator | None = None,
    ) -> WaitDone | None:
        """``sem_wait``/``sem_trywait``/``sem_timedwait``. Returns the grant when a unit
        was free, or None when the wait was queued (its end comes from ``post``,
        ``expire``, ``cancel``, ``close`` or ``end_session``)."""
        try:
            mode = WaitMode(mode)
        except ValueError:
            raise CoreError(Status.EINVAL, f"unknown wait mode {mode!r}") from None
        if mode is not WaitMode.TIMED:
            deadline = None  # only a timed wait has one
        sess, handle = self._handle(sid, token)
        sem = handle.sem
        self._authenticate(sem, auth)
        if mode is WaitMode.TIMED and deadline is None:
            raise CoreError(Status.EINVAL, "a timed wait needs a deadline")
        if sem.value > 0:
            sem.value -= 1
            sem.waits += 1
            self._hold(sem, sess)
            return WaitDone(sid, req_id, token, sem.key, Status.OK)
        if mode is WaitMode.TRY:
            raise CoreError(Status.EAGAIN, f"semaphore {sem.name} is zero")
        if deadline is not None and deadline <= now:
            raise CoreError(Status.ETIMEDOUT, f"timed wait on {sem.name} timed out")
        if req_id in sess.waits:
            raise CoreError(Status.EINVAL, f"request {req_id} is already waiting")
        if len(sess.waits) >= self.quotas.waiters_per_session:
            raise CoreError(
                Status.EDQUOT,
                f"session has {self.quotas.waiters_per_session} waits queued (quota)",
            )
        uid = sess.cred.uid
        if self._waiters_by_uid[uid] >= self.quotas.waiters_per_uid:
            raise CoreError(
                Status.EDQUOT, f"uid {uid} has {self.quotas.waiters_per_uid} waits queued (quota)"
            )
        waiter = _Waiter(sid, req_id, handle, deadline)
        sem.waiters[(sid, req_id)] = waiter
        sess.waits[req_id] = waiter
        self._waiters_by_uid[uid] += 1
        if waiter.deadline is not None:
            self._heap_seq += 1
            heapq.heappush(self._deadlines, (waiter.deadline, self._heap_seq, waiter))
        return None

    def post(
        self, sid: int, token: bytes, *, auth: Authenticator | None = None
    ) -> WaitDone | None:
        """``sem_post``. Returns the grant when the unit went to a queued waiter."""
        _, handle = self._handle(sid, token)
        sem = handle.sem
        self._authenticate(sem, auth)
        if not sem.waiters and sem.value >= SEM_VALUE_MAX:
            raise CoreError(Status.EOVERFLOW, f"semaphore {sem.name} is at SEM_VALUE_MAX")
        if sem.holdings:
            # A post by a non-holder while others hold returns a unit one of them took
            # (a hand-off): charge the longest-standing holder, whose end must then not
            # release that unit again. With nobody holding, the post adds a unit.
            self._unhold(sem, sid if sid in sem.holdings else next(iter(sem.holdings)))
        sem.posts += 1
        if sem.waiters:
            return self._grant_first(sem)
        sem.value += 1
        return None

    def getvalue(self, sid: int, token: bytes, *, auth: Authenticator | None = None) -> int:
        """``sem_getvalue``; Linux reports 0, never a negative count, while waiters queue."""
        _, handle = self._handle(sid, token)
        self._authenticate(handle.sem, auth)
        return handle.sem.value

    def cancel(self, sid: int, req_id: int) -> WaitDone | None:
        """Withdraw a queued wait of this session. None when it is no longer queued:
        it was granted, timed out or never existed, and its answer is already owed."""
        sess = self._session(sid)
        waiter = sess.waits.get(req_id)
        if waiter is None:
            return None
        self._unqueue(waiter)
        return WaitDone(sid, req_id, waiter.handle.token, waiter.handle.sem.key, Status.ECANCELED)

    def queued(self, sid: int, req_id: int) -> bool:
        """Whether request ``req_id`` of session ``sid`` is a wait still queued."""
        sess = self._sessions.get(sid)
        return sess is not None and req_id in sess.waits

    def expire(self, now: float) -> list[WaitDone]:
        """End every timed wait whose deadline is at or before ``now``."""
        done: list[WaitDone] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, waiter = heapq.heappop(self._deadlines)
            if not waiter.active:
                self._stale_deadlines -= 1
            else:
                self._unqueue(waiter, in_heap=False)
                sem = waiter.handle.sem
                done.append(
                    WaitDone(waiter.sid, waiter.req_id, waiter.handle.token, sem.key,
                             Status.ETIMEDOUT)
                )
        return done

    def next_deadline(self) -> float | None:
        while self._deadlines and not self._deadlines[0][2].active:
            heapq.heappop(self._deadlines)
            self._stale_deadlines -= 1
        return self._deadlines[0][0] if self._deadlines else None

    # ----------------------------------------------------------------- views

    def info(self, name: str) -> SemInfo:
        check_name(name)
        sem = self._names.get(name)
        if sem is None:
            raise CoreError(Status.ENOENT, f"no semaphore {name}")
        return self._info(sem)

    def readable(self, sid: int, info: SemInfo) -> bool:
        return may_read(self._session(sid).cred, info.owner_uid, info.owner_gid, info.mode)

    # The bounded views the service serves (LIST, STAT): each costs O(log n + what it
    # returns), whatever the number of semaphores or the length of a queue (docs/design.md
    # section 4: one tenant cannot stall the service with cheap requests).

    def view(self, sid: int, name: str, *, cap: int, keyed: bool = False,
             auth: Authenticator | None = None) -> SemView:
        """STAT: one named semaphore with at most ``cap`` holders, dead holders and
        queued waiters each (the counts are exact). Its count, holders, queue and
        activity need read permission (EACCES otherwise) and, for a key-bound
        semaphore, proof of the key: without a MAC (``auth`` None) only the public
        fields are shown, with a bad one it is EKEYREJECTED. ``keyed``: the caller
        holds a key and refuses a semaphore that is not key-bound."""
        sess = self._session(sid)
        check_name(name)
        sem = self._names.get(name)
        if sem is None:
            raise CoreError(Status.ENOENT, f"no semaphore {name}")
        if not may_read(sess.cred, sem.owner_uid, sem.owner_gid, sem.mode):
            raise CoreError(Status.EACCES, f"uid {sess.cred.uid} may not read {name} (owner "
                            f"{sem.owner_uid}:{sem.owner_gid}, mode {sem.mode:04o})")
        if sem.key is None and keyed:
            raise CoreError(Status.EKEYREJECTED, f"semaphore {name} is not key-bound")
        if sem.key is not None:
            if auth is None:
                return self._view(sem, None)
            auth(sem.key)
        return self._view(sem, cap)

    def name_count(self) -> int:
        """How many names are linked (O(1))."""
        return len(self._names)

    def page(self, sid: int, after: str, limit: int) -> tuple[list[SemView], bool]:
        """LIST: up to ``limit`` named semaphores whose names sort after ``after`` (""
        for the first page), in name order, and whether more follow. What the caller
        may not read, and every key-bound semaphore (LIST never proves a key), shows
        only its public fields. O(log n + limit): a bisection of the sorted names."""
        cred = self._session(sid).cred
        order = self._names.order
        start = bisect.bisect_right(order, after)
        views = []
        for name in itertools.islice(order, start, start + max(limit, 0)):
            sem = self._names[name]
            shown = sem.key is None and may_read(cred, sem.owner_uid, sem.owner_gid, sem.mode)
            views.append(self._view(sem, 0 if shown else None))
        return views, start + len(views) < len(order)

    def _view(self, sem: _Sem, cap: int | None) -> SemView:
        public = SemView(sem_id=sem.sem_id, name=sem.name, linked=sem.linked,
                         owner_uid=sem.owner_uid, owner_gid=sem.owner_gid, mode=sem.mode,
                         key_bound=sem.key is not None, robust=sem.robust, created=sem.created)
        if cap is None:
            return public

        def first(items: Iterator[tuple[Any, ...]]) -> tuple[Any, ...]:
            return tuple(itertools.islice(items, cap))

        sessions = self._sessions
        return dataclasses.replace(public, detail=SemDetail(
            value=sem.value, initial=sem.initial, handles=sem.handles,
            waiters=len(sem.waiters), posts=sem.posts, waits=sem.waits,
            robust_releases=sem.robust_releases, robust_forgiven=sem.robust_forgiven,
            reclaimed=sem.reclaimed,
            holders=first((sessions[sid].cred.pid, n) for sid, n in sem.holdings.items()),
            holders_total=len(sem.holdings),
            dead_holders=first(iter(sem.dead_holdings.items())),
            dead_holders_total=len(sem.dead_holdings),
            queue=first((sessions[w.sid].cred.pid, w.req_id, w.deadline)
                        for w in sem.waiters.values()),
            queue_total=len(sem.waiters),
        ))

    def infos(self, *, include_unlinked: bool = False) -> list[SemInfo]:
        sems = self._alive.values() if include_unlinked else self._names.values()
        return [self._info(sem) for sem in sorted(sems, key=lambda s: (s.name, s.sem_id))]

    def check_invariants(self) -> None:
        """Assert the table's invariants; for tests and debugging (O(size))."""
        waiting = 0
        for sem in self._alive.values():
            assert 0 <= sem.value <= SEM_VALUE_MAX, sem
            assert sem.value == 0 or not sem.waiters, "a unit is free while waiters queue"
            assert sem.linked == (self._names.get(sem.name) is sem)
            assert sem.linked or sem.handles > 0, "a dead semaphore is still alive"
            assert sem.value == (sem.initial + sem.posts - sem.waits + sem.robust_releases
                                 + sem.reclaimed)
            assert sem.held == sum(sem.holdings.values())
            # only a post with nobody holding raises value + held, and it stops at the max
            assert sem.value + sem.held <= SEM_VALUE_MAX
            held = sem.held + sum(sem.dead_holdings.values())
            assert all(v > 0 for v in sem.holdings.values())
            assert held <= sem.waits, "more units held than ever taken"
            for (sid, req_id), w in sem.waiters.items():
                assert w.active and w.handle.sem is sem
                assert self._sessions[sid].waits[req_id] is w
            waiting += len(sem.waiters)
        assert waiting == sum(len(s.waits) for s in self._sessions.values())
        assert sum(self._waiters_by_uid.values()) == waiting
        handles = 0
        for sess in self._sessions.values():
            for token, handle in sess.handles.items():
                assert self._tokens[token] is handle and handle.sid == sess.sid
                assert handle.sem.sem_id in self._alive
            handles += len(sess.handles)
            for sem in sess.held:
                assert sem.holdings.get(sess.sid, 0) > 0
        assert handles == len(self._tokens)
        for sem in self._alive.values():
            assert sem.handles == sum(1 for h in self._tokens.values() if h.sem is sem)
        assert sum(self._sems_by_uid.values()) == len(self._alive)
        assert self._names.order == sorted(self._names), "the name index is out of order"
        stale = sum(1 for e in self._deadlines if not e[2].active)
        assert stale == self._stale_deadlines, "stale deadline count drifted"
        live_timed = sum(1 for s in self._sessions.values() for w in s.waits.values()
                         if w.deadline is not None)
        assert len(self._deadlines) - stale == live_timed

    # ------------------------------------------------------------ snapshot

    def snapshot(self) -> dict[str, Any]:
        """The whole table as plain data (ints, strings, lists; bytes as hex), for the
        service's journal: ``restore`` of it is a table that answers every later call
        exactly as this one would. O(size)."""
        # A timed wait's heap sequence orders waits with equal deadlines: kept, so a
        # restored table ends them in the same order.
        seq = {id(e[2]): e[1] for e in self._deadlines if e[2].active}
        sems = []
        for sem in self._alive.values():
            sems.append([
                sem.sem_id, sem.name, sem.linked, sem.value, sem.initial, sem.owner_uid,
                sem.owner_gid, sem.mode, None if sem.key is None else sem.key.hex(),
                sem.robust, sem.created, sem.posts, sem.waits, sem.robust_releases,
                sem.robust_forgiven, sem.reclaimed,
                [[sid, n] for sid, n in sem.holdings.items()],  # oldest holder first
                [[pid, n] for pid, n in sem.dead_holdings.items()],
                [[w.sid, w.req_id, w.handle.token.hex(), w.deadline, seq.get(id(w), 0)]
                 for w in sem.waiters.values()],  # FIFO
            ])
        sessions = [[sess.sid, sess.cred.uid, sess.cred.gid, sess.cred.pid,
                     [[h.token.hex(), h.sem.sem_id] for h in sess.handles.values()]]
                    for sess in self._sessions.values()]
        return {"next_sem_id": self._next_sem_id, "heap_seq": self._heap_seq, "sems": sems,
                "sessions": sessions}

    @classmethod
    def restore(cls, data: dict[str, Any], quotas: Quotas | None = None,
                token_factory: TokenFactory | None = None) -> SemTable:
        """The table ``snapshot`` described (the counters and indexes derived again).
        Raises ``ValueError`` for data that is not a consistent snapshot."""
        table = cls(quotas, token_factory)
        try:
            table._restore(data)
        except (KeyError, IndexError, TypeError, AssertionError) as exc:
            raise ValueError(f"not a consistent table snapshot: {exc!r}") from None
        return table

    def _restore(self, data: dict[str, Any]) -> None:
        self._next_sem_id = int(data["next_sem_id"])
        self._heap_seq = int(data["heap_seq"])
        for sid, uid, gid, pid, _ in data["sessions"]:
            assert sid not in self._sessions, f"session {sid} twice"
            self._sessions[sid] = _Session(sid, Cred(uid=uid, gid=gid, pid=pid))
            self._sessions_by_uid[uid] += 1
        for (sem_id, name, linked, value, initial, owner_uid, owner_gid, mode, key, robust,
             created, posts, waits, releases, forgiven, reclaimed, holdings, dead,
             _) in data["sems"]:
            assert sem_id not in self._alive and sem_id < self._next_sem_id
            sem = _Sem(sem_id=sem_id, name=name, value=value, initial=initial,
                       owner_uid=owner_uid, owner_gid=owner_gid, mode=mode,
                       key=None if key is None else bytes.fromhex(key), robust=robust,
                       created=created, linked=linked, posts=posts, waits=waits,
                       robust_releases=releases, robust_forgiven=forgiven,
                       reclaimed=reclaimed)
            for sid, n in holdings:
                sem.holdings[sid] = n
                sem.held += n
                self._sessions[sid].held.add(sem)
            sem.dead_holdings = {pid: n for pid, n in dead}
            self._alive[sem_id] = sem
            self._sems_by_uid[owner_uid] += 1
            if linked:
                assert name not in self._names, f"name {name} twice"
                self._names[name] = sem
        for sid, _, _, _, handles in data["sessions"]:
            sess = self._sessions[sid]
            for token_hex, sem_id in handles:
                token = bytes.fromhex(token_hex)
                assert token not in self._tokens, "a handle token twice"
                handle = _Handle(token, self._alive[sem_id], sid)
                sess.handles[token] = handle
                self._tokens[token] = handle
                handle.sem.handles += 1
        for entry in data["sems"]:
            sem = self._alive[entry[0]]
            for sid, req_id, token_hex, deadline, seq in entry[-1]:
                handle = self._tokens[bytes.fromhex(token_hex)]
                assert handle.sid == sid and handle.sem is sem
                waiter = _Waiter(sid, req_id, handle, deadline)
                sem.waiters[(sid, req_id)] = waiter
                self._waiters_by_uid[self._sessions[sid].cred.uid] += 1
                if deadline is not None:
                    assert 0 < seq <= self._heap_seq
                    self._deadlines.append((deadline, seq, waiter))
        heapq.heapify(self._deadlines)
        # A session's queued waits in the order they queued: request ids increase.
        for sem in self._alive.values():
            for waiter in sem.waiters.values():
                self._sessions[waiter.sid].waits[waiter.req_id] = waiter
        for sess in self._sessions.values():
            sess.waits = dict(sorted(sess.waits.items()))

    # --------------------------------------------------------------- helpers

    def _session(self, sid: int) -> _Session:
        sess = self._sessions.get(sid)
        if sess is None:
            raise CoreError(Status.EINVAL, f"no session {sid}")
        return sess

    def _handle(self, sid: int, token: bytes) -> tuple[_Session, _Handle]:
        sess = self._session(sid)
        handle = sess.handles.get(token)
        if handle is None:
            raise CoreError(Status.EBADF, "no such handle in this session")
        return sess, handle

    @staticmethod
    def _authenticate(sem: _Sem, auth: Authenticator | None) -> None:
        if sem.key is None:
            return
        if auth is None:
            raise CoreError(Status.EKEYREJECTED, f"semaphore {sem.name} is key-bound: no MAC")
        auth(sem.key)

    def _add_handle(self, sess: _Session, sem: _Sem) -> _Handle:
        token = self._new_token()
        while token in self._tokens:  # 2**-128 per draw, but a test factory may repeat
            token = self._new_token()
        handle = _Handle(token, sem, sess.sid)
        sess.handles[token] = handle
        self._tokens[token] = handle
        sem.handles += 1
        return handle

    def _drop_handle(self, sess: _Session, handle: _Handle) -> None:
        del sess.handles[handle.token]
        del self._tokens[handle.token]
        handle.sem.handles -= 1
        self._maybe_destroy(handle.sem)

    def _maybe_destroy(self, sem: _Sem) -> None:
        if sem.linked or sem.handles:
            return
        del self._alive[sem.sem_id]
        self._sems_by_uid[sem.owner_uid] -= 1
        if not self._sems_by_uid[sem.owner_uid]:
            del self._sems_by_uid[sem.owner_uid]
        for sid in sem.holdings:
            self._sessions[sid].held.discard(sem)
        sem.holdings.clear()
        sem.held = 0

    def _hold(self, sem: _Sem, sess: _Session) -> None:
        sem.holdings[sess.sid] = sem.holdings.get(sess.sid, 0) + 1
        sem.held += 1
        sess.held.add(sem)

    def _unhold(self, sem: _Sem, sid: int) -> None:
        left = sem.holdings[sid] - 1
        sem.held -= 1
        if left:
            sem.holdings[sid] = left
        else:
            del sem.holdings[sid]
            self._sessions[sid].held.discard(sem)

    def _unqueue(self, waiter: _Waiter, *, in_heap: bool = True) -> None:
        sem = waiter.handle.sem
        del sem.waiters[(waiter.sid, waiter.req_id)]
        sess = self._sessions[waiter.sid]
        del sess.waits[waiter.req_id]
        waiter.active = False
        if waiter.deadline is not None and in_heap:
            # Its heap entry is now stale. Compact when stale entries dominate, so the
            # heap is bounded by live timed waits (the quotas), not by waits ever made.
            self._stale_deadlines += 1
            if self._stale_deadlines > 64 and 2 * self._stale_deadlines > len(self._deadlines):
                self._deadlines = [e for e in self._deadlines if e[2].active]
                heapq.heapify(self._deadlines)
                self._stale_deadlines = 0
        uid = sess.cred.uid
        self._waiters_by_uid[uid] -= 1
        if not self._waiters_by_uid[uid]:
            del self._waiters_by_uid[uid]

    def _grant_first(self, sem: _Sem) -> WaitDone:
        """Give a unit that just became free to the first queued waiter."""
        waiter = next(iter(sem.waiters.values()))
        self._unqueue(waiter)
        sem.waits += 1
        self._hold(sem, self._sessions[waiter.sid])
        return WaitDone(waiter.sid, waiter.req_id, waiter.handle.token, sem.key, Status.OK)

    def _info(self, sem: _Sem) -> SemInfo:
        pid_of = {sid: self._sessions[sid].cred.pid for sid in sem.holdings}
        return SemInfo(
            sem_id=sem.sem_id,
            name=sem.name,
            linked=sem.linked,
            value=sem.value,
            initial=sem.initial,
            owner_uid=sem.owner_uid,
            owner_gid=sem.owner_gid,
            mode=sem.mode,
            key_bound=sem.key is not None,
            robust=sem.robust,
            created=sem.created,
            handles=sem.handles,
            waiters=len(sem.waiters),
            posts=sem.posts,
            waits=sem.waits,
            robust_releases=sem.robust_releases,
            robust_forgiven=sem.robust_forgiven,
            reclaimed=sem.reclaimed,
            holders=tuple(sorted((pid_of[sid], n) for sid, n in sem.holdings.items())),
            dead_holders=tuple(sorted(sem.dead_holdings.items())),
            queue=tuple(
                (self._sessions[w.sid].cred.pid, w.req_id, w.deadline)
                for w in sem.waiters.values()
            ),
        )
