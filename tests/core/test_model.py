"""Stateful property test: SemTable against a small reference model (docs/design.md section 4).

The model is deliberately naive (plain dicts and lists, no heaps, no lazy deletion) and
predicts, for every operation, the exact status and the exact answers owed to waiters.
After every step the table's invariants are checked and its whole observable state (every
semaphore's info, the statistics, the next deadline) must equal the model's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from esem.core import SEM_VALUE_MAX, CoreError, Cred, Quotas, SemInfo, SemTable, Status, WaitDone
from esem.core import WaitMode as WM

QUOTAS = Quotas(
    semaphores_per_uid=3,
    sessions_per_uid=3,
    handles_per_session=4,
    waiters_per_session=3,
    waiters_per_uid=4,
)
USERS = [(0, 0), (1000, 1000), (1001, 1000), (1002, 1002)]  # root, two in a group, other
NAMES = ["/a", "/b", "/c"]
MODES = [0o600, 0o660, 0o666, 0o644, 0o606, 0o000]
VALUES = [0, 0, 0, 1, 1, 2, SEM_VALUE_MAX - 1, SEM_VALUE_MAX, -1, SEM_VALUE_MAX + 1]
DEADLINE_OFFSETS = [-1.0, 0.0, 0.5, 1.0, 3.0]


# ------------------------------------------------------------------ the model


@dataclass(eq=False)
class MWait:
    sid: int
    req_id: int
    token: bytes
    deadline: float | None
    seq: int  # order in which timed waits were queued, to break deadline ties


@dataclass(eq=False)
class MSem:
    sem_id: int
    name: str
    value: int
    initial: int
    owner_uid: int
    owner_gid: int
    mode: int
    robust: bool
    created: float
    linked: bool = True
    handles: int = 0
    queue: list[MWait] = field(default_factory=list)
    holdings: dict[int, int] = field(default_factory=dict)  # sid -> units, never 0, oldest first
    dead: dict[int, int] = field(default_factory=dict)  # pid -> units
    posts: int = 0
    waits: int = 0
    robust_releases: int = 0
    robust_forgiven: int = 0
    reclaimed: int = 0


@dataclass(eq=False)
class MSess:
    sid: int
    cred: Cred
    handles: dict[bytes, MSem] = field(default_factory=dict)
    waits: dict[int, MWait] = field(default_factory=dict)  # insertion ordered
    next_req: int = 1


class Model:
    def __init__(self, quotas: Quotas = QUOTAS) -> None:
        self.quotas = quotas
        self.sessions: dict[int, MSess] = {}
        self.names: dict[str, MSem] = {}
        self.alive: dict[int, MSem] = {}
        self.next_sem_id = 1
        self.timed_seq = 0

    # -- helpers

    def sems_of_uid(self, uid: int) -> int:
        return sum(1 for s in self.alive.values() if s.owner_uid == uid)

    def waiters_of_uid(self, uid: int) -> int:
        return sum(len(s.waits) for s in self.sessions.values() if s.cred.uid == uid)

    @staticmethod
    def may_open(cred: Cred, sem: MSem) -> bool:
        if cred.uid == 0:
            return True
        if cred.uid == sem.owner_uid:
            bits = sem.mode >> 6
        elif cred.gid == sem.owner_gid:
            bits = sem.mode >> 3
        else:
            bits = sem.mode
        return bits & 0o6 == 0o6

    def maybe_destroy(self, sem: MSem) -> None:
        if not sem.linked and sem.handles == 0:
            del self.alive[sem.sem_id]

    def unqueue(self, w: MWait) -> None:
        sem = self.sessions[w.sid].handles[w.token]
        sem.queue.remove(w)
        del self.sessions[w.sid].waits[w.req_id]

    def give_unit(self, sem: MSem) -> WaitDone | None:
        """A unit becomes free: the first waiter gets it, else the count does."""
        if sem.queue:
            w = sem.queue[0]
            self.unqueue(w)
            sem.waits += 1
            sem.holdings[w.sid] = sem.holdings.get(w.sid, 0) + 1
            return WaitDone(w.sid, w.req_id, w.token, None, Status.OK)
        sem.value += 1
        return None

    # -- operations: each returns (status, result) without raising

    def add_session(self, sid: int, cred: Cred) -> Status:
        if sum(1 for s in self.sessions.values() if s.cred.uid == cred.uid) >= (
            self.quotas.sessions_per_uid
        ):
            return Status.EDQUOT
        self.sessions[sid] = MSess(sid, cred)
        return Status.OK

    def open(
        self, sid: int, name: str, create: bool, excl: bool, mode: int, value: int,
        robust: bool, now: float, token: bytes, accept_foreign: bool = False,
    ) -> tuple[Status, bool | None]:
        sess = self.sessions[sid]
        if excl and not create:
            return Status.EINVAL, None
        if len(sess.handles) >= self.quotas.handles_per_session:
            return Status.EDQUOT, None
        sem = self.names.get(name)
        created = False
        if sem is not None:
            if create and excl:
                return Status.EEXIST, None
            if not self.may_open(sess.cred, sem):
                return Status.EACCES, None
            if create and not accept_foreign and sem.owner_uid not in (0, sess.cred.uid):
                return Status.EACCES, None  # O_CREAT never adopts a squatted name
        else:
            if not create:
                return Status.ENOENT, None
            if not 0 <= value <= SEM_VALUE_MAX:
                return Status.EINVAL, None
            if self.sems_of_uid(sess.cred.uid) >= self.quotas.semaphores_per_uid:
                return Status.EDQUOT, None
            sem = MSem(self.next_sem_id, name, value, value, sess.cred.uid, sess.cred.gid,
                       mode, robust, now)
            self.next_sem_id += 1
            self.names[name] = sem
            self.alive[sem.sem_id] = sem
            created = True
        sess.handles[token] = sem
        sem.handles += 1
        return Status.OK, created

    def wait(
        self, sid: int, token: bytes, req_id: int, mode: WM, now: float,
        deadline: float | None,
    ) -> tuple[Status, WaitDone | None]:
        sess = self.sessions[sid]
        sem = sess.handles.get(token)
        if sem is None:
            return Status.EBADF, None
        if sem.value > 0:
            sem.value -= 1
            sem.waits += 1
            sem.holdings[sid] = sem.holdings.get(sid, 0) + 1
            return Status.OK, WaitDone(sid, req_id, token, None, Status.OK)
        if mode == WM.TRY:
            return Status.EAGAIN, None
        if deadline is not None and deadline <= now:
            return Status.ETIMEDOUT, None
        if req_id in sess.waits:
            return Status.EINVAL, None
        if len(sess.waits) >= self.quotas.waiters_per_session:
            return Status.EDQUOT, None
        if self.waiters_of_uid(sess.cred.uid) >= self.quotas.waiters_per_uid:
            return Status.EDQUOT, None
        self.timed_seq += 1
        w = MWait(sid, req_id, token, deadline, self.timed_seq)
        sem.queue.append(w)
        sess.waits[req_id] = w
        return Status.OK, None

    def post(self, sid: int, token: bytes) -> tuple[Status, WaitDone | None]:
        sess = self.sessions[sid]
        sem = sess.handles.get(token)
        if sem is None:
            return Status.EBADF, None
        if not sem.queue and sem.value >= SEM_VALUE_MAX:
            return Status.EOVERFLOW, None
        if sem.holdings:
            # the poster's own unit, or else a hand-off: the longest-standing holder's
            charged = sid if sid in sem.holdings else next(iter(sem.holdings))
            sem.holdings[charged] -= 1
            if not sem.holdings[charged]:
                del sem.holdings[charged]
        sem.posts += 1
        return Status.OK, self.give_unit(sem)

    def cancel(self, sid: int, req_id: int) -> WaitDone | None:
        w = self.sessions[sid].waits.get(req_id)
        if w is None:
            return None
        self.unqueue(w)
        return WaitDone(sid, req_id, w.token, None, Status.ECANCELED)

    def close(self, sid: int, token: bytes) -> tuple[Status, list[WaitDone]]:
        sess = self.sessions[sid]
        sem = sess.handles.get(token)
        if sem is None:
            return Status.EBADF, []
        mine = [w for w in sess.waits.values() if w.token == token]
        for w in mine:
            self.unqueue(w)
        del sess.handles[token]
        sem.handles -= 1
        self.maybe_destroy(sem)
        return Status.OK, [WaitDone(sid, w.req_id, token, None, Status.EBADF) for w in mine]

    def attach(self, sid: int, token: bytes, new_token: bytes) -> Status:
        sess = self.sessions[sid]
        owner = next((s for s in self.sessions.values() if token in s.handles), None)
        if owner is None or (owner.cred.uid != sess.cred.uid and sess.cred.uid != 0):
            return Status.EBADF
        if len(sess.handles) >= self.quotas.handles_per_session:
            return Status.EDQUOT
        sem = owner.handles[token]
        sess.handles[new_token] = sem
        sem.handles += 1
        return Status.OK

    def unlink(self, sid: int, name: str) -> Status:
        sess = self.sessions[sid]
        sem = self.names.get(name)
        if sem is None:
            return Status.ENOENT
        if sess.cred.uid not in (0, sem.owner_uid):
            return Status.EACCES
        del self.names[name]
        sem.linked = False
        self.maybe_destroy(sem)
        return Status.OK

    def reclaim(self, sid: int, name: str) -> tuple[Status, int, list[WaitDone]]:
        """The dead holders' units go back, oldest pid first, as far as the count has
        room (the rest stay on record)."""
        sess = self.sessions[sid]
        sem = self.names.get(name)
        if sem is None:
            return Status.ENOENT, 0, []
        if sess.cred.uid not in (0, sem.owner_uid):
            return Status.EACCES, 0, []
        units, done = 0, []
        for pid in sorted(sem.dead):
            while sem.dead.get(pid, 0) and (
                    sem.queue or sem.value + sum(sem.holdings.values()) < SEM_VALUE_MAX):
                sem.dead[pid] -= 1
                if not sem.dead[pid]:
                    del sem.dead[pid]
                sem.reclaimed += 1
                units += 1
                granted = self.give_unit(sem)
                if granted is not None:
                    done.append(granted)
        return Status.OK, units, done

    def expire(self, now: float) -> list[WaitDone]:
        due = [
            w
            for sem in self.alive.values()
            for w in sem.queue
            if w.deadline is not None and w.deadline <= now
        ]
        due.sort(key=lambda w: (w.deadline, w.seq))
        for w in due:
            self.unqueue(w)
        return [WaitDone(w.sid, w.req_id, w.token, None, Status.ETIMEDOUT) for w in due]

    def end_session(self, sid: int) -> list[WaitDone]:
        sess = self.sessions[sid]
        for w in list(sess.waits.values()):
            self.unqueue(w)
        done: list[WaitDone] = []
        for sem in self.alive.values():
            units = sem.holdings.pop(sid, 0)
            if not units:
                continue
            if sem.robust:
                # restore units only while value + held stays within the capacity
                for _ in range(units):
                    if sem.value + sum(sem.holdings.values()) >= sem.initial:
                        sem.robust_forgiven += 1
                        continue
                    sem.robust_releases += 1
                    granted = self.give_unit(sem)
                    if granted is not None:
                        done.append(granted)
            else:
                pid = sess.cred.pid
                sem.dead[pid] = sem.dead.get(pid, 0) + units
        for token in list(sess.handles):
            sem = sess.handles.pop(token)
            sem.handles -= 1
            self.maybe_destroy(sem)
        del self.sessions[sid]
        return done

    # -- views

    def infos(self) -> list[SemInfo]:
        pid = {sid: s.cred.pid for sid, s in self.sessions.items()}
        return [
            SemInfo(
                sem_id=sem.sem_id,
                name=sem.name,
                linked=sem.linked,
                value=sem.value,
                initial=sem.initial,
                owner_uid=sem.owner_uid,
                owner_gid=sem.owner_gid,
                mode=sem.mode,
                key_bound=False,
                robust=sem.robust,
                created=sem.created,
                handles=sem.handles,
                waiters=len(sem.queue),
                posts=sem.posts,
                waits=sem.waits,
                robust_releases=sem.robust_releases,
                robust_forgiven=sem.robust_forgiven,
                reclaimed=sem.reclaimed,
                holders=tuple(sorted((pid[sid], n) for sid, n in sem.holdings.items())),
                dead_holders=tuple(sorted(sem.dead.items())),
                queue=tuple((pid[w.sid], w.req_id, w.deadline) for w in sem.queue),
            )
            for sem in sorted(self.alive.values(), key=lambda s: (s.name, s.sem_id))
        ]

    def next_deadline(self) -> float | None:
        deadlines = [
            w.deadline for s in self.alive.values() for w in s.queue if w.deadline is not None
        ]
        return min(deadlines) if deadlines else None


# ------------------------------------------------------------ the state machine


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Status, Any]:
    """(status, result) of a table call: CoreError becomes its status."""
    try:
        return Status.OK, fn(*args, **kwargs)
    except CoreError as exc:
        return exc.status, None


picks = st.integers(min_value=0, max_value=1000)
rarely = st.integers(0, 9).map(lambda n: n == 0)
WAIT_ARGS = {
    "who": picks,
    "which": picks,
    "foreign": rarely,
    "mode": st.sampled_from([WM.TRY, WM.BLOCK, WM.BLOCK, WM.TIMED, WM.TIMED]),
    "offset": st.sampled_from(DEADLINE_OFFSETS),
    "reuse": st.integers(0, 5).map(lambda n: n == 0),
}


class TableVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        counter = itertools.count(1)
        self.issued: list[bytes] = []  # every token the factory produced, for EBADF probes

        def tokens() -> bytes:
            token = next(counter).to_bytes(16, "big")
            self.issued.append(token)
            return token

        self.table = SemTable(quotas=QUOTAS, token_factory=tokens)
        self.model = Model()
        self.next_sid = 1
        self.now = 0.0
        self.granted_order: list[tuple[int, int]] = []  # (sid, req_id) of queued grants

    # -- helpers

    def sid(self, pick: int) -> int:
        sids = sorted(self.model.sessions)
        return sids[pick % len(sids)]

    def has_handles(self) -> bool:
        return any(s.handles for s in self.model.sessions.values())

    def target(self, who: int, which: int, foreign: bool) -> tuple[int, bytes]:
        """A session and one of its own handles; or, when ``foreign``, any session and
        any token ever issued (usually someone else's, or closed: EBADF)."""
        if foreign:
            return self.sid(who), self.issued[which % len(self.issued)]
        pairs = [
            (sid, token)
            for sid, sess in sorted(self.model.sessions.items())
            for token in sess.handles
        ]
        return pairs[(who * 7919 + which) % len(pairs)]

    def compare_events(self, got: list[WaitDone], expected: list[WaitDone]) -> None:
        assert got == expected
        self.granted_order += [(e.sid, e.req_id) for e in got if e.status is Status.OK]

    # -- rules

    @initialize(
        users=st.lists(st.integers(0, len(USERS) - 1), min_size=1, max_size=4),
        value=st.sampled_from([0, 0, 1]),
        robust=st.booleans(),
    )
    def shared_semaphore(self, users: list[int], value: int, robust: bool) -> None:
        """Start with a few sessions sharing one semaphore, so that waits queue early."""
        for user in users:
            self.add_session(user)
        for who in range(len(self.model.sessions)):
            self.open(who, "/a", create=True, excl=False, mode=0o666, value=value,
                      robust=robust, foreign=True)

    @precondition(lambda self: len(self.model.sessions) < 6)
    @rule(user=st.integers(0, len(USERS) - 1))
    def add_session(self, user: int) -> None:
        sid = self.next_sid
        uid, gid = USERS[user]
        cred = Cred(uid, gid, 10_000 + sid)
        status, _ = call(self.table.add_session, sid, cred)
        assert status == self.model.add_session(sid, cred)
        event(f"add_session {status.name}")
        if status is Status.OK:
            self.next_sid += 1

    @precondition(lambda self: self.model.sessions)
    @rule(
        who=picks,
        name=st.sampled_from(NAMES),
        create=st.sampled_from([True, True, True, False]),
        excl=st.sampled_from([False, False, True]),
        mode=st.sampled_from(MODES),
        value=st.sampled_from(VALUES),
        robust=st.booleans(),
        foreign=st.booleans(),
    )
    def open(
        self, who: int, name: str, create: bool, excl: bool, mode: int, value: int,
        robust: bool, foreign: bool,
    ) -> None:
        sid = self.sid(who)
        status, opened = call(self.table.open, sid, name, create=create, excl=excl, mode=mode,
                              value=value, now_wall=self.now, robust=robust,
                              accept_foreign=foreign)
        token = opened.handle if opened is not None else b"-"
        expected, created = self.model.open(sid, name, create, excl, mode, value, robust,
                                            self.now, token, foreign)
        assert status == expected
        event(f"open {status.name}")
        if status is Status.OK:
            assert opened.created == created
            assert opened.key is None

    # wait and post are each registered under several rule names: hypothesis picks rules
    # uniformly, and these are the operations whose interleavings matter most

    @precondition(lambda self: self.has_handles())
    @rule(**WAIT_ARGS)
    def wait(self, **kwargs: Any) -> None:
        self.do_wait(**kwargs)

    @precondition(lambda self: self.has_handles())
    @rule(**WAIT_ARGS)
    def wait_more(self, **kwargs: Any) -> None:
        self.do_wait(**kwargs)

    @precondition(lambda self: self.has_handles())
    @rule(**WAIT_ARGS)
    def wait_even_more(self, **kwargs: Any) -> None:
        self.do_wait(**kwargs)

    def do_wait(
        self, who: int, which: int, foreign: bool, mode: WM, offset: float, reuse: bool
    ) -> None:
        sid, token = self.target(who, which, foreign)
        sess = self.model.sessions[sid]
        if reuse and sess.waits:
            req_id = list(sess.waits)[which % len(sess.waits)]
        else:
            req_id = sess.next_req
            sess.next_req += 1
        deadline = self.now + offset if mode is WM.TIMED else None
        status, done = call(self.table.wait, sid, token, req_id, mode=mode, now=self.now,
                            deadline=deadline)
        expected, expected_done = self.model.wait(sid, token, req_id, mode, self.now, deadline)
        assert (status, done) == (expected, expected_done)
        event(f"wait {mode.name} {status.name} {'granted' if done else 'queued/refused'}")

    @precondition(lambda self: self.has_handles())
    @rule(who=picks, which=picks, foreign=rarely)
    def post(self, who: int, which: int, foreign: bool) -> None:
        self.do_post(who, which, foreign)

    @precondition(lambda self: self.has_handles())
    @rule(who=picks, which=picks, foreign=rarely)
    def post_more(self, who: int, which: int, foreign: bool) -> None:
        self.do_post(who, which, foreign)

    def do_post(self, who: int, which: int, foreign: bool) -> None:
        sid, token = self.target(who, which, foreign)
        status, done = call(self.table.post, sid, token)
        expected, expected_done = self.model.post(sid, token)
        assert status == expected
        event(f"post {status.name} {'to a waiter' if done else 'to the count/refused'}")
        self.compare_events(
            [done] if done is not None else [],
            [expected_done] if expected_done is not None else [],
        )

    @precondition(lambda self: any(s.waits for s in self.model.sessions.values()))
    @rule(who=picks, which=picks, known=st.sampled_from([True, True, True, False]))
    def cancel(self, who: int, which: int, known: bool) -> None:
        queued = [(sid, r) for sid, s in sorted(self.model.sessions.items()) for r in s.waits]
        if known and queued:
            sid, req_id = queued[which % len(queued)]
        else:
            sid = self.sid(who)
            sess = self.model.sessions[sid]
            req_id = which % (sess.next_req + 1)  # granted, ended, or never issued
        status, done = call(self.table.cancel, sid, req_id)
        assert status is Status.OK
        assert done == self.model.cancel(sid, req_id)
        event(f"cancel {'ECANCELED' if done else 'None'}")

    @precondition(lambda self: self.has_handles())
    @rule(who=picks, which=picks, foreign=rarely)
    def close(self, who: int, which: int, foreign: bool) -> None:
        sid, token = self.target(who, which, foreign)
        status, done = call(self.table.close, sid, token)
        expected, expected_done = self.model.close(sid, token)
        assert status == expected
        self.compare_events(done or [], expected_done)
        event(f"close {status.name} {'with' if done else 'without'} EBADF waits")

    @precondition(lambda self: self.model.sessions and self.issued)
    @rule(who=picks, which=picks)
    def attach(self, who: int, which: int) -> None:
        """A forked child re-attaching a handle: usually one of its own uid's."""
        sid = self.sid(who)
        uid = self.model.sessions[sid].cred.uid
        same_uid = [
            t for s in self.model.sessions.values() if s.cred.uid == uid for t in s.handles
        ]
        pool = same_uid if same_uid and which % 3 else self.issued
        token = pool[which % len(pool)]
        status, opened = call(self.table.attach, sid, token)
        new_token = opened.handle if opened is not None else b"-"
        assert status == self.model.attach(sid, token, new_token)
        event(f"attach {status.name}{' by root' if uid == 0 else ''}")
        if opened is not None:
            assert not opened.created and opened.key is None

    @precondition(lambda self: self.model.sessions)
    @rule(who=picks, name=st.sampled_from(NAMES), existing=st.integers(0, 4))
    def unlink(self, who: int, name: str, existing: int) -> None:
        sid = self.sid(who)
        if existing and self.model.names:
            names = sorted(self.model.names)
            name = names[existing % len(names)]
        status, _ = call(self.table.unlink, sid, name)
        assert status == self.model.unlink(sid, name)
        event(f"unlink {status.name}")

    @precondition(lambda self: self.model.sessions)
    @rule(who=picks, name=st.sampled_from(NAMES), dead=st.booleans())
    def reclaim(self, who: int, name: str, dead: bool) -> None:
        if dead:  # usually a semaphore that has dead holders, when there is one
            with_dead = sorted(n for n, s in self.model.names.items() if s.dead)
            name = with_dead[who % len(with_dead)] if with_dead else name
        sid = self.sid(who)
        status, result = call(self.table.reclaim, sid, name)
        expected, units, expected_done = self.model.reclaim(sid, name)
        assert status == expected
        if status is Status.OK:
            assert result[0] == units
            self.compare_events(result[1], expected_done)
        event(f"reclaim {status.name} {'units' if units else 'none'}")

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.now += dt  # the timer has not fired yet: grants may still reach overdue waits
        # (checked here rather than as an invariant: next_deadline() prunes stale heap
        # entries, and pruning after every step would hide bugs in expire's own pruning)
        assert self.table.next_deadline() == self.model.next_deadline()

    @rule(fire=st.booleans())
    def expire(self, fire: bool) -> None:
        deadline = self.model.next_deadline()
        if fire:
            # the timer fires on time for the earliest queued deadline (or a while later)
            self.now = max(self.now, deadline if deadline is not None else self.now + 1.0)
        done = self.table.expire(self.now)
        self.compare_events(done, self.model.expire(self.now))
        event(f"expire {'ended waits' if done else 'nothing due'}")

    @precondition(lambda self: len(self.model.sessions) > 1)
    @rule(who=picks, holder=st.booleans())
    def end_session(self, who: int, holder: bool) -> None:
        holders = sorted(
            {sid for sem in self.model.alive.values() for sid in sem.holdings}
        )
        sid = holders[who % len(holders)] if holder and holders else self.sid(who)
        token_sem = {
            t: s.sem_id for sess in self.model.sessions.values() for t, s in sess.handles.items()
        }
        within = {sem.sem_id for sem in self.model.alive.values()
                  if sem.robust and sem.value + sum(sem.holdings.values()) <= sem.initial}
        expected = self.model.end_session(sid)
        got = self.table.end_session(sid)
        for info in self.table.infos(include_unlinked=True):
            if info.sem_id in within:  # a robust release never takes it past the capacity
                assert info.value + sum(n for _, n in info.holders) <= info.initial
        # grants on one semaphore come in FIFO order; across semaphores any order will do
        for sem_id in {token_sem[e.handle] for e in got + expected}:
            assert [e for e in got if token_sem[e.handle] == sem_id] == [
                e for e in expected if token_sem[e.handle] == sem_id
            ]
        assert len(got) == len(expected)
        event(f"end_session {'granted others' if got else 'no grants'}")
        self.granted_order += [(e.sid, e.req_id) for e in got]

    # -- invariants

    @invariant()
    def table_invariants(self) -> None:
        self.table.check_invariants()

    @invariant()
    def same_state(self) -> None:
        infos = self.table.infos(include_unlinked=True)
        assert infos == self.model.infos()
        assert {i.name for i in self.table.infos()} == set(self.model.names)
        assert self.table.statistics() == {
            "names": len(self.model.names),
            "semaphores": len(self.model.alive),
            "sessions": len(self.model.sessions),
            "handles": sum(len(s.handles) for s in self.model.sessions.values()),
            "waiters": sum(len(s.waits) for s in self.model.sessions.values()),
        }

    @invariant()
    def conservation(self) -> None:
        for sem in self.model.alive.values():
            assert sem.value == (sem.initial + sem.posts - sem.waits + sem.robust_releases
                                 + sem.reclaimed)
            assert 0 <= sem.value <= SEM_VALUE_MAX
            assert sem.value == 0 or not sem.queue
            held = sum(sem.holdings.values()) + sum(sem.dead.values())
            assert held <= sem.waits
        for info in self.table.infos(include_unlinked=True):
            assert info.value == (info.initial + info.posts - info.waits + info.robust_releases
                                  + info.reclaimed)

    @invariant()
    def grants_are_unique(self) -> None:
        # no queued request is ever granted twice (sids are never reused here)
        assert len(self.granted_order) == len(set(self.granted_order))


TableVsModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_table_matches_model = TableVsModel.TestCase


# ------------------------------------------- robust semaphores never create units
#
# The two scenarios, replayed on the table and the model side by side, then two
# machines of random hand-offs. In a disciplined use (every post returns a unit some live
# session holds, whoever posts it), value + held must stay exactly the capacity whatever
# dies when: no unit is created (two holders of a mutex) or lost.

PARENT, WORKER, PRODUCER, CONSUMER = (Cred(1000, 1000, 10_000 + n) for n in range(4))


def pair(*creds: Cred) -> tuple[SemTable, Model]:
    counter = itertools.count(1)
    table = SemTable(token_factory=lambda: next(counter).to_bytes(16, "big"))
    model = Model(Quotas())
    for sid, cred in enumerate(creds, 1):
        table.add_session(sid, cred)
        assert model.add_session(sid, cred) is Status.OK
    return table, model


def open_both(table: SemTable, model: Model, sid: int, value: int) -> bytes:
    opened = table.open(sid, "/r", create=True, excl=False, mode=0o600, value=value,
                        now_wall=0.0, robust=True)
    assert model.open(sid, "/r", True, False, 0o600, value, True, 0.0, opened.handle) == (
        Status.OK, opened.created)
    return opened.handle


def agree(table: SemTable, model: Model) -> SemInfo:
    table.check_invariants()
    (info,) = table.infos(include_unlinked=True)
    assert [info] == model.infos()
    return info


def test_scenario_hand_off_then_holder_exits() -> None:
    table, model = pair(PARENT, WORKER)
    h_p, h_w = open_both(table, model, 1, 1), open_both(table, model, 2, 0)
    assert table.wait(1, h_p, 1, mode=WM.TRY, now=0.0) == model.wait(1, h_p, 1, WM.TRY, 0.0,
                                                                      None)[1]
    assert table.post(2, h_w) is model.post(2, h_w)[1] is None  # the worker hands it back
    agree(table, model)
    assert table.end_session(1) == model.end_session(1) == []
    info = agree(table, model)
    assert (info.value, info.holders) == (1, ())  # the old rule made it 2


def test_scenario_work_queue_consumer_exits() -> None:
    table, model = pair(PRODUCER, CONSUMER)
    h_p, h_c = open_both(table, model, 1, 0), open_both(table, model, 2, 0)
    for _ in range(100):
        table.post(1, h_p)
        model.post(1, h_p)
    for req in range(100):
        assert table.wait(2, h_c, req, mode=WM.TRY, now=0.0) is not None
        model.wait(2, h_c, req, WM.TRY, 0.0, None)
    assert agree(table, model).holders == ((CONSUMER.pid, 100),)
    assert table.end_session(2) == model.end_session(2) == []
    info = agree(table, model)
    assert (info.value, info.robust_releases, info.robust_forgiven) == (0, 0, 100)


class RobustHandOffs(RuleBasedStateMachine):
    """Sessions of one robust semaphore of capacity 1..3 take units, hand them to each
    other (a post by any live session while someone holds), and die at random."""

    def __init__(self) -> None:
        super().__init__()
        counter = itertools.count(1)
        self.table = SemTable(token_factory=lambda: next(counter).to_bytes(16, "big"))
        self.model = Model(Quotas())
        self.tokens: dict[int, bytes] = {}  # live sid -> its handle
        self.next_sid = 1
        self.capacity = 0

    def spawn(self) -> None:
        sid = self.next_sid
        self.next_sid += 1
        cred = Cred(1000, 1000, 20_000 + sid)
        self.table.add_session(sid, cred)
        assert self.model.add_session(sid, cred) is Status.OK
        opened = self.table.open(sid, "/m", create=True, excl=False, mode=0o600,
                                 value=self.capacity, now_wall=0.0, robust=True)
        assert self.model.open(sid, "/m", True, False, 0o600, self.capacity, True, 0.0,
                               opened.handle)[0] is Status.OK
        self.tokens[sid] = opened.handle

    def pick(self, n: int) -> int:
        sids = sorted(self.tokens)
        return sids[n % len(sids)]

    def info(self) -> SemInfo:
        (info,) = [i for i in self.table.infos() if i.name == "/m"]
        return info

    @initialize(capacity=st.integers(1, 3), sessions=st.integers(2, 4))
    def start(self, capacity: int, sessions: int) -> None:
        self.capacity = capacity
        for _ in range(sessions):
            self.spawn()

    @rule(who=picks, block=st.booleans())
    def wait(self, who: int, block: bool) -> None:
        sid = self.pick(who)
        sess = self.model.sessions[sid]
        if block and sess.waits:
            return  # one queued wait per session: a process blocks in one sem_wait
        req = sess.next_req
        sess.next_req += 1
        mode = WM.BLOCK if block else WM.TRY
        status, done = call(self.table.wait, sid, self.tokens[sid], req, mode=mode, now=0.0)
        assert (status, done) == self.model.wait(sid, self.tokens[sid], req, mode, 0.0, None)

    @precondition(lambda self: any(s.holdings for s in self.model.alive.values()))
    @rule(who=picks)
    def hand_back(self, who: int) -> None:
        """Any live session posts a unit someone holds: its own, or one handed to it."""
        sid = self.pick(who)
        got = self.table.post(sid, self.tokens[sid])
        assert (Status.OK, got) == self.model.post(sid, self.tokens[sid])

    @precondition(lambda self: len(self.tokens) > 1)
    @rule(who=picks, holder=st.booleans())
    def die(self, who: int, holder: bool) -> None:
        holders = [sid for s in self.model.alive.values() for sid in s.holdings]
        sid = holders[who % len(holders)] if holder and holders else self.pick(who)
        del self.tokens[sid]
        assert self.table.end_session(sid) == self.model.end_session(sid)
        self.spawn()  # a replacement worker

    @invariant()
    def conserved(self) -> None:
        if not self.capacity:
            return  # before initialize
        self.table.check_invariants()
        assert self.table.infos(include_unlinked=True) == self.model.infos()
        info = self.info()
        held = sum(n for _, n in info.holders)
        assert info.value + held == self.capacity, "a unit was created or lost"
        if self.capacity == 1:
            assert held <= 1, "two holders of a mutex"
        assert info.value == info.initial + info.posts - info.waits + info.robust_releases


class RobustWorkQueue(RuleBasedStateMachine):
    """A value-0 robust queue: producers post jobs, consumers take them and die at
    random. A dead consumer's jobs were done: none comes back."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.model = pair(PRODUCER, CONSUMER)
        self.producer = open_both(self.table, self.model, 1, 0)
        self.consumers = {2: open_both(self.table, self.model, 2, 0)}
        self.next_sid = 3
        self.req = itertools.count(1)
        self.produced = self.consumed = 0

    @rule(jobs=st.integers(1, 5))
    def produce(self, jobs: int) -> None:
        for _ in range(jobs):
            assert self.table.post(1, self.producer) == self.model.post(1, self.producer)[1]
        self.produced += jobs

    @rule(who=picks)
    def consume(self, who: int) -> None:
        sid = sorted(self.consumers)[who % len(self.consumers)]
        req = next(self.req)
        status, done = call(self.table.wait, sid, self.consumers[sid], req, mode=WM.TRY,
                            now=0.0)
        assert (status, done) == self.model.wait(sid, self.consumers[sid], req, WM.TRY, 0.0,
                                                 None)
        self.consumed += status is Status.OK

    @rule(who=picks)
    def consumer_dies(self, who: int) -> None:
        sid = sorted(self.consumers)[who % len(self.consumers)]
        del self.consumers[sid]
        assert self.table.end_session(sid) == self.model.end_session(sid) == []
        new = self.next_sid
        self.next_sid += 1
        self.table.add_session(new, Cred(1000, 1000, 30_000 + new))
        self.model.add_session(new, Cred(1000, 1000, 30_000 + new))
        self.consumers[new] = open_both(self.table, self.model, new, 0)

    @invariant()
    def jobs_conserved(self) -> None:
        self.table.check_invariants()
        assert self.table.infos(include_unlinked=True) == self.model.infos()
        (info,) = self.table.infos()
        assert info.value == self.produced - self.consumed
        assert info.robust_releases == 0


for machine in (RobustHandOffs, RobustWorkQueue):
    machine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_robust_hand_offs = RobustHandOffs.TestCase
test_robust_work_queue = RobustWorkQueue.TestCase
