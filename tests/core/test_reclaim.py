"""``SemTable.reclaim``: the owner (or root) gives a plain semaphore's dead holders'
units back, to the first waiter and then the count, without restarting the service.

Every step is checked with ``check_invariants`` (conservation now counts ``reclaimed``),
and every refusal leaves the whole observable table as it was.
"""

from __future__ import annotations

import pytest

from esem.core import SEM_VALUE_MAX, SemTable, Status

from .test_table import (
    ALICE,
    ALICE2,
    BOB,
    KEY,
    S_ALICE,
    S_ALICE2,
    S_BOB,
    S_GROUP,
    S_ROOT,
    accept,
    block_wait,
    create,
    fails,
    granted,
    new_table,
    ok,
    refuse,
    reopen,
    try_wait,
)


@pytest.fixture
def table() -> SemTable:
    return new_table()


def _dead_alice(table: SemTable, name: str, value: int, taken: int, **kw: object) -> bytes:
    """``name`` created by alice's second process, which takes ``taken`` units and dies;
    returns bob's handle on it."""
    h = create(table, S_ALICE2, name, value, 0o666, **kw)
    h_b = reopen(table, S_BOB, name, **({"auth": accept} if "key" in kw else {})).handle
    for i in range(taken):
        ok(table, try_wait, table, S_ALICE2, h, i + 1, **({"auth": accept} if "key" in kw
                                                          else {}))
    ok(table, table.end_session, S_ALICE2)
    assert table.info(name).dead_holders == ((ALICE2.pid, taken),)
    return h_b


def test_owner_reclaims_to_the_waiter_first_then_the_count(table: SemTable) -> None:
    h_b = _dead_alice(table, "/n", 2, 2)
    block_wait(table, S_BOB, h_b, 7)
    units, done = ok(table, table.reclaim, S_ALICE, "/n")  # another process of the owner
    assert units == 2
    assert done == [granted(S_BOB, 7, h_b)]
    info = table.info("/n")
    assert info.dead_holders == ()
    assert info.value == 1 and info.reclaimed == 2
    assert info.holders == ((BOB.pid, 1),)
    assert info.value == (info.initial + info.posts - info.waits + info.robust_releases
                          + info.reclaimed)
    # nothing left: a second reclaim is a no-op
    assert ok(table, table.reclaim, S_ALICE, "/n") == (0, [])


def test_root_may_reclaim(table: SemTable) -> None:
    _dead_alice(table, "/n", 1, 1)
    assert ok(table, table.reclaim, S_ROOT, "/n") == (1, [])
    assert table.info("/n").value == 1


def test_others_may_not_reclaim(table: SemTable) -> None:
    _dead_alice(table, "/n", 1, 1)
    fails(table, Status.EACCES, table.reclaim, S_BOB, "/n")
    fails(table, Status.EACCES, table.reclaim, S_GROUP, "/n")  # group may open, not reclaim


def test_reclaim_missing_or_bad_name(table: SemTable) -> None:
    fails(table, Status.ENOENT, table.reclaim, S_ALICE, "/none")
    fails(table, Status.EINVAL, table.reclaim, S_ALICE, "none")


def test_reclaim_key_bound_needs_the_key(table: SemTable) -> None:
    _dead_alice(table, "/k", 1, 1, key=KEY)
    fails(table, Status.EKEYREJECTED, table.reclaim, S_ALICE, "/k")
    fails(table, Status.EKEYREJECTED, table.reclaim, S_ALICE, "/k", auth=refuse)
    assert ok(table, table.reclaim, S_ALICE, "/k", keyed=True, auth=accept) == (1, [])


def test_keyed_reclaim_of_unbound_semaphore_refused(table: SemTable) -> None:
    _dead_alice(table, "/n", 1, 1)
    fails(table, Status.EKEYREJECTED, table.reclaim, S_ALICE, "/n", keyed=True, auth=accept)


def test_reclaim_stops_at_a_full_count(table: SemTable) -> None:
    h_b = _dead_alice(table, "/f", SEM_VALUE_MAX, 2)
    ok(table, table.post, S_BOB, h_b)  # SEM_VALUE_MAX - 1: room for one unit
    units, done = ok(table, table.reclaim, S_ALICE, "/f")
    assert (units, done) == (1, [])
    info = table.info("/f")
    assert info.value == SEM_VALUE_MAX
    assert info.dead_holders == ((ALICE2.pid, 1),)  # the other stays on record
    assert info.reclaimed == 1


def test_reclaim_leaves_live_holders_alone(table: SemTable) -> None:
    h_b = _dead_alice(table, "/n", 3, 1)
    ok(table, try_wait, table, S_BOB, h_b, 1)
    assert ok(table, table.reclaim, S_ALICE, "/n") == (1, [])
    info = table.info("/n")
    assert info.holders == ((BOB.pid, 1),) and info.value == 2
    assert ALICE.uid == info.owner_uid


def test_units_of_a_running_process_stay_on_record(table: SemTable) -> None:
    """A session can end while its process lives on (its session failed) and may still
    be inside its critical section: those units are not reclaimed."""
    h_b = _dead_alice(table, "/n", 2, 1)
    ok(table, try_wait, table, S_BOB, h_b, 1)
    ok(table, table.end_session, S_BOB)  # bob's session ended too; bob's process runs
    assert table.info("/n").dead_holders == ((ALICE2.pid, 1), (BOB.pid, 1))
    asked: list[int] = []

    def running(pid: int) -> bool:
        asked.append(pid)
        return pid == BOB.pid

    assert ok(table, table.reclaim, S_ALICE, "/n", running=running) == (1, [])
    assert sorted(asked) == [ALICE2.pid, BOB.pid]
    info = table.info("/n")
    assert info.dead_holders == ((BOB.pid, 1),) and info.value == 1 and info.reclaimed == 1


def test_liveness_is_asked_only_of_an_allowed_caller(table: SemTable) -> None:
    _dead_alice(table, "/n", 1, 1)

    def never(pid: int) -> bool:
        raise AssertionError("a refused caller made the shell look at processes")

    fails(table, Status.EACCES, table.reclaim, S_BOB, "/n", running=never)
    fails(table, Status.ENOENT, table.reclaim, S_ALICE, "/none", running=never)
