"""SemTable.snapshot / SemTable.restore (the journal's compaction, docs/design.md): a
restored table is indistinguishable from the original. Checked as a bisimulation: random
operation sequences, a snapshot at a random point, then the same operations applied to
both tables give the same results, the same late answers, the same snapshots, and every
invariant holds on the restored one."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esem.core import CoreError, Cred, Quotas, SemTable, WaitMode

CREDS = [Cred(uid=0, gid=0, pid=10), Cred(uid=1000, gid=1000, pid=20),
         Cred(uid=1000, gid=1000, pid=21), Cred(uid=1001, gid=1001, pid=30)]
NAMES = ["/a", "/b", "/c"]
KEY = bytes(range(16))


def tokens(start: int) -> Callable[[], bytes]:
    counter = itertools.count(start)
    return lambda: next(counter).to_bytes(16, "big")


SID = st.sampled_from([0, 1, 1, 2, 2, 3, 4])  # sessions 0..3 exist at first; 4 only once started
_open = st.tuples(st.just("open"), SID, st.sampled_from(NAMES), st.integers(0, 2),
                  st.booleans(), st.booleans())
_wait = st.tuples(st.just("wait"), SID, st.integers(0, 40),
                  st.sampled_from([WaitMode.BLOCK, WaitMode.TIMED, WaitMode.TRY]),
                  st.integers(0, 6))
op = st.one_of(
    _open, _open, _open, _wait, _wait, _wait,
    st.tuples(st.just("post"), SID, st.integers(0, 40)),
    st.tuples(st.just("open"), SID, st.sampled_from(NAMES), st.integers(0, 3),
              st.booleans(), st.booleans()),
    st.tuples(st.just("wait"), SID, st.integers(0, 40), st.sampled_from(WaitMode),
              st.integers(0, 6)),
    st.tuples(st.just("post"), SID, st.integers(0, 40)),
    st.tuples(st.just("close"), SID, st.integers(0, 40)),
    st.tuples(st.just("unlink"), SID, st.sampled_from(NAMES)),
    st.tuples(st.just("cancel"), SID, st.integers(0, 60)),
    st.tuples(st.just("expire"), st.integers(0, 8)),
    st.tuples(st.just("end"), SID),
    st.tuples(st.just("start"), SID, st.integers(0, 3)),
    st.tuples(st.just("reclaim"), SID, st.sampled_from(NAMES)),
    st.tuples(st.just("attach"), SID, st.integers(0, 40)),
)


class Driver:
    """Applies one abstract operation to a table; returns a comparable outcome."""

    def __init__(self, table: SemTable) -> None:
        self.t = table
        self.req = 0

    def handle(self, sid: int, i: int) -> bytes:
        """The session's i-th own handle (mod how many it has), or one it does not own."""
        sess = self.t._sessions.get(sid)
        own = list(sess.handles) if sess is not None else []
        return own[i % len(own)] if own else bytes(16)

    def any_handle(self, i: int) -> bytes:
        every = sorted(self.t._tokens)
        return every[i % len(every)] if every else bytes(16)

    def apply(self, o: tuple[Any, ...]) -> Any:
        t = self.t
        self.req += 1
        try:
            kind = o[0]
            if kind == "open":
                _, sid, name, value, robust, keyed = o
                r = t.open(sid, name, create=True, excl=False, mode=0o666, value=value,
                           now_wall=1.5, key=KEY if keyed else None, robust=robust,
                           auth=(lambda k: None))
                return ("open", r)
            if kind == "wait":
                _, sid, h, mode, dl = o
                return ("wait", t.wait(sid, self.handle(sid, h), self.req, mode=mode, now=1.0,
                                       deadline=float(dl), auth=lambda k: None))
            if kind == "post":
                return ("post", t.post(o[1], self.handle(o[1], o[2]), auth=lambda k: None))
            if kind == "close":
                return ("close", t.close(o[1], self.handle(o[1], o[2]), auth=lambda k: None))
            if kind == "unlink":
                return ("unlink", t.unlink(o[1], o[2], auth=lambda k: None))
            if kind == "cancel":
                return ("cancel", t.cancel(o[1], o[2]))
            if kind == "expire":
                return ("expire", t.expire(float(o[1])), t.next_deadline())
            if kind == "end":
                return ("end", t.end_session(o[1]))
            if kind == "start":
                return ("start", t.add_session(o[1], CREDS[o[2]]))
            if kind == "reclaim":
                return ("reclaim", t.reclaim(o[1], o[2], auth=lambda k: None,
                                             running=lambda pid: pid == 20))
            if kind == "attach":
                return ("attach", t.attach(o[1], self.any_handle(o[2]), auth=lambda k: None))
        except CoreError as exc:
            return ("error", exc.status, exc.message)
        raise AssertionError(o)


def _fresh() -> SemTable:
    table = SemTable(Quotas(waiters_per_session=4, handles_per_session=6),
                     token_factory=tokens(0))
    for sid in range(4):
        table.add_session(sid, CREDS[sid])
    return table


def _tokens_used(table: SemTable) -> int:
    return max((int.from_bytes(t, "big") for t in table._tokens), default=-1) + 1


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), st.lists(op, max_size=40))
def test_a_restored_table_is_indistinguishable(before: list[Any], after: list[Any]) -> None:
    a = _fresh()
    da = Driver(a)
    issued = itertools.count(0)
    a._new_token = lambda: next(issued).to_bytes(16, "big")
    for o in before:
        da.apply(o)
    snap = a.snapshot()
    json.loads(json.dumps(snap))  # plain data
    b = SemTable.restore(json.loads(json.dumps(snap)), a.quotas)
    nxt = next(issued)
    a._new_token = tokens(nxt)
    b._new_token = tokens(nxt)
    b.check_invariants()
    assert b.snapshot() == snap
    assert b.infos(include_unlinked=True) == a.infos(include_unlinked=True)
    assert b.statistics() == a.statistics() and b.quota_use() == a.quota_use()
    assert b.next_deadline() == a.next_deadline()
    db = Driver(b)
    db.req = da.req
    for o in after:
        ra, rb = da.apply(o), db.apply(o)
        if ra[0] in ("expire", "close", "end"):  # late answers: the same set
            ra = (ra[0], sorted(map(repr, ra[1])), *ra[2:])
            rb = (rb[0], sorted(map(repr, rb[1])), *rb[2:])
        assert ra == rb, o
        b.check_invariants()
    assert b.snapshot() == a.snapshot()


def test_restore_refuses_inconsistent_data() -> None:
    a = _fresh()
    Driver(a).apply(("open", 1, "/a", 1, False, False))
    snap = a.snapshot()
    for broken in ({}, {**snap, "sems": snap["sems"] * 2},
                   {**snap, "sessions": snap["sessions"] * 2},
                   {**snap, "next_sem_id": 0}):
        with pytest.raises(ValueError):
            SemTable.restore(broken)


def _random_op(r: Any) -> tuple[Any, ...]:
    sid = r.choice([0, 1, 1, 2, 2, 3, 4])
    kind = r.choices(["open", "wait", "post", "close", "unlink", "cancel", "expire", "end",
                      "start", "reclaim", "attach"],
                     weights=[6, 10, 6, 1, 1, 2, 2, 1, 1, 1, 1])[0]
    if kind == "open":
        return (kind, sid, r.choice(NAMES), r.randint(0, 2), r.random() < 0.5,
                r.random() < 0.3)
    if kind == "wait":
        return (kind, sid, r.randint(0, 9), r.choice(list(WaitMode)), r.randint(0, 9))
    if kind in ("post", "close", "attach"):
        return (kind, sid, r.randint(0, 9))
    if kind in ("unlink", "reclaim"):
        return (kind, sid, r.choice(NAMES))
    if kind == "cancel":
        return (kind, sid, r.randint(0, 300))
    if kind == "expire":
        return (kind, r.randint(0, 9))
    if kind == "start":
        return (kind, sid, r.randint(0, 3))
    return (kind, sid)


@pytest.mark.parametrize("seed", range(60))
def test_random_walks_restore_anywhere(seed: int) -> None:
    """Long biased random walks (queues, holders, dead holders, unlinked semaphores):
    snapshot and restore every 25 steps, carrying on with the restored table."""
    import random

    r = random.Random(seed)
    a = _fresh()
    da = Driver(a)
    issued = itertools.count(0)
    a._new_token = lambda: next(issued).to_bytes(16, "big")
    shadow = _fresh()  # never restored: the reference
    ds = Driver(shadow)
    shadow_issued = itertools.count(0)
    shadow._new_token = lambda: next(shadow_issued).to_bytes(16, "big")
    seen_waiters = 0
    for step in range(400):
        o = _random_op(r)
        ra, rs = da.apply(o), ds.apply(o)
        assert repr(ra) == repr(rs), (step, o)
        if step % 25 == 24:
            snap = a.snapshot()
            seen_waiters += sum(len(s[-1]) for s in snap["sems"])
            restored = SemTable.restore(json.loads(json.dumps(snap)), a.quotas)
            restored._new_token = a._new_token
            restored.check_invariants()
            assert restored.snapshot() == snap == shadow.snapshot()
            a = restored
            da.t = a
    assert seen_waiters > 0
