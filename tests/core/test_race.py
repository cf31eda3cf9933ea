"""The classic race: a wait cancelled, timed out or orphaned by its session's death at the
same moment as a grant (docs/design.md section 4).

The server may see the grant and the wait's end in either order. Whatever the order, the
unit must not be lost or duplicated: it goes to exactly one waiter, or back to the count.
Every interleaving of the racing events is enumerated (``itertools.permutations``), with
one to three waiters, and compared step by step against a small explicit simulation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from esem.core import CoreError, Cred, SemTable, Status, WaitDone, WaitMode

POSTER = 1  # a session that only posts, and so never holds a unit: its posts are
# hand-offs, charged to the longest-standing holder
HOLDER = 2  # a session that took the initial unit before the waiters queued
FIRST_WAITER_SID = 10  # waiter i runs in its own session FIRST_WAITER_SID + i
REQ = 7  # every waiter's request id (they are in different sessions)
NAME = "/race"

FATES = ("cancel", "expire", "end_session")


def cred(sid: int) -> Cred:
    return Cred(uid=1000 + sid, gid=1000, pid=5000 + sid)


def deadline_of(i: int) -> float:
    return float(i + 1)


@dataclass(frozen=True)
class Scenario:
    waiters: int
    posts: int
    fates: tuple[str | None, ...]  # fate of waiter i (None: no racing end for it)
    robust: bool
    holder_dies: bool  # the holder of the initial unit dies as one of the racing events

    def events(self) -> list[str]:
        evs = [f"post{k}" for k in range(self.posts)]
        evs += [f"{fate}:{i}" for i, fate in enumerate(self.fates) if fate is not None]
        if self.holder_dies:
            evs.append("holder_dies")
        return evs

    def __str__(self) -> str:
        return (
            f"waiters={self.waiters} posts={self.posts} fates={self.fates} "
            f"robust={self.robust} holder_dies={self.holder_dies}"
        )


def scenarios() -> Iterator[Scenario]:
    for waiters in (1, 2, 3):
        second_fates: tuple[str | None, ...] = (None, *FATES) if waiters >= 2 else (None,)
        for first, second, posts, robust, holder_dies in itertools.product(
            FATES, second_fates, (1, 2), (False, True), (False, True)
        ):
            fates = (first, second, *([None] * (waiters - 2)))[:waiters]
            yield Scenario(waiters, posts, fates, robust, holder_dies)


SCENARIOS = list(scenarios())


@dataclass
class Sim:
    """The expected behaviour, written out by hand: one queue, one count."""

    timed: dict[int, float]  # waiter -> deadline, for waiters whose fate is expire
    robust: bool
    initial: int
    value: int = 0
    queue: list[int] = field(default_factory=list)  # waiter indices, FIFO
    held: dict[str, int] = field(default_factory=dict)  # live session -> units, oldest first
    dead: dict[str, int] = field(default_factory=dict)  # dead non-robust session -> units
    ended: dict[int, Status] = field(default_factory=dict)  # how each wait ended
    charged: int = 0  # posts charged to a holder (hand-offs)
    forgiven: int = 0  # units of dead robust holders not released (already back)

    def release(self) -> list[tuple[int, Status]]:
        """A unit comes back: to the first waiter, else to the count."""
        if self.queue:
            w = self.queue.pop(0)
            self.held[f"w{w}"] = self.held.get(f"w{w}", 0) + 1
            self.ended[w] = Status.OK
            return [(w, Status.OK)]
        self.value += 1
        return []

    def post(self) -> list[tuple[int, Status]]:
        if self.held:  # the poster holds nothing: charge the longest-standing holder
            oldest = next(iter(self.held))
            self.held[oldest] -= 1
            if not self.held[oldest]:
                del self.held[oldest]
            self.charged += 1
        return self.release()

    def cancel(self, w: int) -> list[tuple[int, Status]]:
        if w in self.queue:
            self.queue.remove(w)
            self.ended[w] = Status.ECANCELED
            return [(w, Status.ECANCELED)]
        return []

    def expire(self, now: float) -> list[tuple[int, Status]]:
        due = sorted(
            (self.timed[w], w) for w in self.queue if w in self.timed and self.timed[w] <= now
        )
        for _, w in due:
            self.queue.remove(w)
            self.ended[w] = Status.ETIMEDOUT
        return [(w, Status.ETIMEDOUT) for _, w in due]

    def die(self, who: str) -> list[tuple[int, Status]]:
        if who.startswith("w") and int(who[1:]) in self.queue:
            self.queue.remove(int(who[1:]))  # dropped: nobody is owed an answer
        units = self.held.pop(who, 0)
        out: list[tuple[int, Status]] = []
        if self.robust:  # released only up to the capacity
            free = min(units, max(0, self.initial - self.value - sum(self.held.values())))
            self.forgiven += units - free
            for _ in range(free):
                out += self.release()
        elif units:
            self.dead[who] = self.dead.get(who, 0) + units
        return out


def run(scenario: Scenario, order: tuple[str, ...]) -> None:
    table = SemTable(token_factory=_tokens())
    table.add_session(POSTER, cred(POSTER))
    table.add_session(HOLDER, cred(HOLDER))
    initial = 1
    poster = table.open(POSTER, NAME, create=True, excl=True, mode=0o666, value=initial,
                        now_wall=0.0, robust=scenario.robust).handle
    holder = table.open(HOLDER, NAME, create=False, excl=False, mode=0, value=0,
                        now_wall=0.0).handle
    assert table.wait(HOLDER, holder, 1, mode=WaitMode.TRY, now=0.0) is not None

    sim = Sim(
        timed={i: deadline_of(i) for i, f in enumerate(scenario.fates) if f == "expire"},
        robust=scenario.robust,
        initial=initial,
        held={"holder": 1},
    )
    handles: dict[int, bytes] = {}
    for i in range(scenario.waiters):
        sid = FIRST_WAITER_SID + i
        table.add_session(sid, cred(sid))
        handles[i] = table.open(sid, NAME, create=False, excl=False, mode=0, value=0,
                                now_wall=0.0).handle
        if i in sim.timed:
            queued = table.wait(sid, handles[i], REQ, mode=WaitMode.TIMED, now=0.0,
                                deadline=deadline_of(i))
        else:
            queued = table.wait(sid, handles[i], REQ, mode=WaitMode.BLOCK, now=0.0)
        assert queued is None
        sim.queue.append(i)
    table.check_invariants()

    def waiter_of(event: WaitDone) -> int:
        i = event.sid - FIRST_WAITER_SID
        assert 0 <= i < scenario.waiters and event.req_id == REQ
        assert event.handle == handles[i], "answer names the waiter's own handle"
        return i

    outcomes: dict[int, list[Status]] = {i: [] for i in range(scenario.waiters)}
    posts_done = 0
    for step in order:
        kind, _, arg = step.partition(":")
        got: list[WaitDone]
        if kind.startswith("post"):
            result = table.post(POSTER, poster)
            got = [result] if result is not None else []
            expected = sim.post()
            posts_done += 1
        elif kind == "cancel":
            result = table.cancel(FIRST_WAITER_SID + int(arg), REQ)
            got = [result] if result is not None else []
            expected = sim.cancel(int(arg))
        elif kind == "expire":
            got = table.expire(deadline_of(int(arg)))
            expected = sim.expire(deadline_of(int(arg)))
        elif kind == "end_session":
            got = table.end_session(FIRST_WAITER_SID + int(arg))
            expected = sim.die(f"w{arg}")
        else:
            assert kind == "holder_dies"
            got = table.end_session(HOLDER)
            expected = sim.die("holder")
        table.check_invariants()
        assert [(waiter_of(e), e.status) for e in got] == expected, step
        for e in got:
            outcomes[waiter_of(e)].append(e.status)

        info = table.infos(include_unlinked=True)
        assert len(info) == 1
        [sem] = info
        held = sum(n for _, n in sem.holders) + sum(n for _, n in sem.dead_holders)
        # conservation: no unit lost or duplicated; a hand-off returns a held unit, and
        # what a dead robust holder had already got back is forgiven, not released
        assert sem.value + held == initial + posts_done - sim.charged - sim.forgiven, step
        assert sem.robust_forgiven == sim.forgiven
        assert sem.value == sem.initial + sem.posts - sem.waits + sem.robust_releases
        assert sem.posts == posts_done
        # the table's view matches the simulation
        assert sem.value == sim.value
        assert [pid - 5000 - FIRST_WAITER_SID for pid, _, _ in sem.queue] == sim.queue
        live = {f"w{pid - 5000 - FIRST_WAITER_SID}" if pid != cred(HOLDER).pid else "holder": n
                for pid, n in sem.holders}
        assert live == sim.held
        dead = {f"w{pid - 5000 - FIRST_WAITER_SID}" if pid != cred(HOLDER).pid else "holder": n
                for pid, n in sem.dead_holders}
        assert dead == sim.dead

    # every wait ended at most once, and the answers agree with the simulation
    for i, statuses in outcomes.items():
        assert len(statuses) <= 1, (i, statuses)
        if statuses:
            assert sim.ended[i] == statuses[0]
    granted = sum(1 for s in outcomes.values() if s == [Status.OK])
    assert granted + 1 == table.infos(include_unlinked=True)[0].waits  # +1: holder's take

    # a cancel or expire that lost the race is a no-op, and later ones stay no-ops
    before = table.infos(include_unlinked=True)
    for i in range(scenario.waiters):
        sid = FIRST_WAITER_SID + i
        try:
            table.session_cred(sid)
        except CoreError:
            continue
        if i not in sim.queue:
            assert table.cancel(sid, REQ) is None
    assert table.expire(0.5) == []
    assert table.infos(include_unlinked=True) == before
    table.check_invariants()


def _tokens() -> Callable[[], bytes]:
    counter = itertools.count(1)
    return lambda: next(counter).to_bytes(16, "big")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_every_interleaving(scenario: Scenario) -> None:
    events = scenario.events()
    orders = list(itertools.permutations(events))
    assert len(orders) == _factorial(len(events))
    for order in orders:
        try:
            run(scenario, order)
        except AssertionError as exc:
            raise AssertionError(f"{scenario} order={order}: {exc}") from exc


def _factorial(n: int) -> int:
    out = 1
    for k in range(2, n + 1):
        out *= k
    return out


def test_scenarios_cover_each_fate_with_one_to_three_waiters() -> None:
    seen = {(s.waiters, s.fates[0]) for s in SCENARIOS}
    assert seen == {(n, f) for n in (1, 2, 3) for f in FATES}


# ---------------------------------------------------------- the two orders, spelled out


@pytest.mark.parametrize("fate", FATES)
@pytest.mark.parametrize("waiters", [1, 2, 3])
def test_end_before_grant_unit_goes_to_next(fate: str, waiters: int) -> None:
    table = SemTable(token_factory=_tokens())
    table.add_session(POSTER, cred(POSTER))
    poster = table.open(POSTER, NAME, create=True, excl=True, mode=0o666, value=0,
                        now_wall=0.0).handle
    hs = []
    for i in range(waiters):
        sid = FIRST_WAITER_SID + i
        table.add_session(sid, cred(sid))
        h = table.open(sid, NAME, create=False, excl=False, mode=0, value=0,
                       now_wall=0.0).handle
        hs.append(h)
        table.wait(sid, h, REQ, mode=WaitMode.TIMED, now=0.0, deadline=1.0 + i)
    first = FIRST_WAITER_SID
    if fate == "cancel":
        assert table.cancel(first, REQ) == WaitDone(first, REQ, hs[0], None, Status.ECANCELED)
    elif fate == "expire":
        assert table.expire(1.0) == [WaitDone(first, REQ, hs[0], None, Status.ETIMEDOUT)]
    else:
        assert table.end_session(first) == []
    result = table.post(POSTER, poster)
    info = table.info(NAME)
    if waiters > 1:
        assert result == WaitDone(first + 1, REQ, hs[1], None, Status.OK)
        assert (info.value, info.holders) == (0, ((cred(first + 1).pid, 1),))
    else:
        assert result is None
        assert (info.value, info.holders) == (1, ())
    table.check_invariants()


@pytest.mark.parametrize("fate", FATES)
@pytest.mark.parametrize("robust", [False, True])
@pytest.mark.parametrize("waiters", [1, 2, 3])
def test_grant_before_end_unit_stays_granted(fate: str, robust: bool, waiters: int) -> None:
    table = SemTable(token_factory=_tokens())
    table.add_session(POSTER, cred(POSTER))
    # capacity 1, the poster's own unit: a robust release can hand it on (a semaphore
    # created at 0 has no capacity to restore)
    poster = table.open(POSTER, NAME, create=True, excl=True, mode=0o666, value=1,
                        now_wall=0.0, robust=robust).handle
    assert table.wait(POSTER, poster, 1, mode=WaitMode.TRY, now=0.0) is not None
    hs = []
    for i in range(waiters):
        sid = FIRST_WAITER_SID + i
        table.add_session(sid, cred(sid))
        h = table.open(sid, NAME, create=False, excl=False, mode=0, value=0,
                       now_wall=0.0).handle
        hs.append(h)
        table.wait(sid, h, REQ, mode=WaitMode.TIMED, now=0.0, deadline=1.0 + i)
    first = FIRST_WAITER_SID
    assert table.post(POSTER, poster) == WaitDone(first, REQ, hs[0], None, Status.OK)
    if fate == "cancel":
        assert table.cancel(first, REQ) is None
        expected_holders = ((cred(first).pid, 1),)
    elif fate == "expire":
        # only the first waiter's deadline has passed, and it was already granted
        assert table.expire(1.0) == []
        expected_holders = ((cred(first).pid, 1),)
    else:
        events = table.end_session(first)
        if robust and waiters > 1:
            assert events == [WaitDone(first + 1, REQ, hs[1], None, Status.OK)]
            expected_holders = ((cred(first + 1).pid, 1),)
        else:
            assert events == []
            expected_holders = ()
    info = table.info(NAME)
    assert info.holders == expected_holders
    handed_on = fate == "end_session" and robust and waiters > 1
    assert info.waiters == waiters - 1 - (1 if handed_on else 0)
    units_out = sum(n for _, n in info.holders) + sum(n for _, n in info.dead_holders)
    assert info.value + units_out == 1
    if fate == "end_session" and not robust:
        assert info.dead_holders == ((cred(first).pid, 1),)
    table.check_invariants()
