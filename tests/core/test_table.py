"""Unit tests of the trusted core's semaphore table (docs/design.md section 4).

Every step is followed by ``check_invariants``, and every refused operation is checked to
leave the whole observable table (every semaphore's info, the statistics, the next
deadline) exactly as it was.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from esem.core import (
    KEY_MAX_BYTES,
    KEY_MIN_BYTES,
    MAX_NAME_BYTES,
    SEM_VALUE_MAX,
    CoreError,
    Cred,
    Opened,
    Quotas,
    SemInfo,
    SemTable,
    Status,
    WaitDone,
    WaitMode,
)
from esem.core.limits import check_key, check_name, check_value

ROOT = Cred(uid=0, gid=0, pid=100)
ALICE = Cred(uid=1000, gid=1000, pid=200)
ALICE2 = Cred(uid=1000, gid=1000, pid=201)  # same user, another process
GROUPMATE = Cred(uid=1001, gid=1000, pid=300)  # another user in alice's primary group
BOB = Cred(uid=1002, gid=1002, pid=400)  # neither owner nor group

# session ids used throughout
S_ROOT, S_ALICE, S_ALICE2, S_GROUP, S_BOB = 1, 2, 3, 4, 5
CREDS = {S_ROOT: ROOT, S_ALICE: ALICE, S_ALICE2: ALICE2, S_GROUP: GROUPMATE, S_BOB: BOB}

KEY = bytes(range(1, 17))
KEY32 = bytes(range(32))


def counter_tokens() -> Callable[[], bytes]:
    counter = itertools.count(1)
    return lambda: next(counter).to_bytes(16, "big")


def new_table(quotas: Quotas | None = None) -> SemTable:
    table = SemTable(quotas=quotas, token_factory=counter_tokens())
    for sid, cred in CREDS.items():
        table.add_session(sid, cred)
    table.check_invariants()
    return table


@pytest.fixture
def table() -> SemTable:
    return new_table()


def snapshot(table: SemTable) -> tuple[Any, ...]:
    return (
        table.infos(include_unlinked=True),
        table.statistics(),
        table.next_deadline(),
    )


def ok(table: SemTable, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    table.check_invariants()
    return result


def fails(
    table: SemTable, status: Status, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> CoreError:
    """Call ``fn``; it must raise CoreError(status) and change nothing observable."""
    before = snapshot(table)
    with pytest.raises(CoreError) as excinfo:
        fn(*args, **kwargs)
    assert excinfo.value.status is status, excinfo.value
    table.check_invariants()
    assert snapshot(table) == before
    return excinfo.value


def create(
    table: SemTable,
    sid: int,
    name: str,
    value: int = 0,
    mode: int = 0o600,
    *,
    excl: bool = True,
    **kwargs: Any,
) -> bytes:
    opened = ok(
        table, table.open, sid, name, create=True, excl=excl, mode=mode, value=value,
        now_wall=1234.5, **kwargs,
    )
    assert opened.created
    return opened.handle


def reopen(table: SemTable, sid: int, name: str, **kwargs: Any) -> Opened:
    return ok(
        table, table.open, sid, name, create=False, excl=False, mode=0, value=0,
        now_wall=0.0, **kwargs,
    )


def try_wait(table: SemTable, sid: int, token: bytes, req_id: int = 1, **kw: Any) -> Any:
    return table.wait(sid, token, req_id, mode=WaitMode.TRY, now=0.0, **kw)


def block_wait(table: SemTable, sid: int, token: bytes, req_id: int, **kw: Any) -> Any:
    return ok(table, table.wait, sid, token, req_id, mode=WaitMode.BLOCK, now=0.0, **kw)


def timed_wait(
    table: SemTable, sid: int, token: bytes, req_id: int, *, now: float, deadline: float
) -> Any:
    return table.wait(sid, token, req_id, mode=WaitMode.TIMED, now=now, deadline=deadline)


def value_of(table: SemTable, name: str) -> int:
    return table.info(name).value


def accept(_key: bytes) -> None:
    """An authenticator whose request carried a valid MAC."""


def refuse(_key: bytes) -> None:
    raise CoreError(Status.EKEYREJECTED, "bad MAC")


def granted(sid: int, req_id: int, token: bytes, key: bytes | None = None) -> WaitDone:
    return WaitDone(sid, req_id, token, key, Status.OK)


# ------------------------------------------------------------------ sessions


def test_add_session_twice_is_einval(table: SemTable) -> None:
    fails(table, Status.EINVAL, table.add_session, S_ALICE, ALICE)


def test_unknown_session_is_einval(table: SemTable) -> None:
    h = create(table, S_ALICE, "/s")
    fails(table, Status.EINVAL, table.open, 99, "/s", create=False, excl=False, mode=0,
          value=0, now_wall=0.0)
    fails(table, Status.EINVAL, table.wait, 99, h, 1, mode=WaitMode.TRY, now=0.0)
    fails(table, Status.EINVAL, table.post, 99, h)
    fails(table, Status.EINVAL, table.close, 99, h)
    fails(table, Status.EINVAL, table.unlink, 99, "/s")
    fails(table, Status.EINVAL, table.cancel, 99, 1)
    fails(table, Status.EINVAL, table.end_session, 99)
    fails(table, Status.EINVAL, table.session_cred, 99)
    assert table.session_cred(S_ALICE) == ALICE


# ----------------------------------------------------------- open: O_CREAT/O_EXCL


def test_create_new_semaphore(table: SemTable) -> None:
    opened = ok(table, table.open, S_ALICE, "/a", create=True, excl=False, mode=0o640,
                value=3, now_wall=99.5)
    assert opened == Opened(opened.handle, True, None, opened.sem_id)
    assert len(opened.handle) == 16
    info = table.info("/a")
    assert info.name == "/a" and info.linked
    assert info.value == info.initial == 3
    assert (info.owner_uid, info.owner_gid, info.mode) == (1000, 1000, 0o640)
    assert info.created == 99.5
    assert info.handles == 1 and info.waiters == 0
    assert (info.posts, info.waits, info.robust_releases) == (0, 0, 0)
    assert not info.key_bound and not info.robust
    assert table.getvalue(S_ALICE, opened.handle) == 3


def test_create_without_excl_opens_existing(table: SemTable) -> None:
    h1 = create(table, S_ALICE, "/a", 2, 0o666)
    before = table.info("/a")
    opened = ok(table, table.open, S_ALICE2, "/a", create=True, excl=False, mode=0o600,
                value=77, now_wall=5.0)
    assert not opened.created
    assert opened.handle != h1
    after = table.info("/a")
    # the existing semaphore's value, mode and owner are untouched by the second create
    assert after.sem_id == before.sem_id
    assert (after.value, after.initial, after.mode, after.owner_uid) == (2, 2, 0o666, 1000)
    assert after.handles == 2


# ------------------------------------------------------- name squatting


def test_create_refuses_to_adopt_another_uids_semaphore(table: SemTable) -> None:
    # bob squats the name first, world-writable and with a large count
    create(table, S_BOB, "/jobs", 1000, 0o666)
    for sid in (S_ALICE, S_ROOT):  # a root server must not adopt a user's name either
        err = fails(table, Status.EACCES, table.open, sid, "/jobs", create=True, excl=False,
                    mode=0o600, value=4, now_wall=0.0)
        assert "uid 1002 (gid 1002, mode 0666)" in err.message
        assert "accept_foreign" in err.message
    # refused even when a key is proven: the key binds nothing here (bob's is unkeyed)
    fails(table, Status.EKEYREJECTED, table.open, S_ALICE, "/jobs", create=True, excl=False,
          mode=0o600, value=4, now_wall=0.0, key=KEY, auth=accept)
    # opening someone's semaphore on purpose (no O_CREAT) is what the mode allows
    assert not reopen(table, S_ALICE, "/jobs").created
    # and so is O_CREAT that explicitly accepts a foreign owner
    opened = ok(table, table.open, S_ALICE, "/jobs", create=True, excl=False, mode=0o600,
                value=4, now_wall=0.0, accept_foreign=True)
    assert not opened.created
    assert table.info("/jobs").owner_uid == BOB.uid


def test_create_adopts_own_and_roots_semaphores(table: SemTable) -> None:
    create(table, S_ALICE, "/mine", 1, 0o600)
    assert not ok(table, table.open, S_ALICE2, "/mine", create=True, excl=False, mode=0o600,
                  value=4, now_wall=0.0).created
    create(table, S_ROOT, "/roots", 1, 0o666)
    assert not ok(table, table.open, S_BOB, "/roots", create=True, excl=False, mode=0o600,
                  value=4, now_wall=0.0).created


def test_create_of_foreign_semaphore_checks_mode_first(table: SemTable) -> None:
    # a squatted 0600 name: the caller may not open it at all, accepted or not
    create(table, S_BOB, "/s", 1, 0o600)
    for accept_foreign in (False, True):
        fails(table, Status.EACCES, table.open, S_ALICE, "/s", create=True, excl=False,
              mode=0o600, value=1, now_wall=0.0, accept_foreign=accept_foreign)


def test_squatted_name_is_refused_to_a_keyed_owner(table: SemTable) -> None:
    # unkeyed squat: a caller with a key never accepts a semaphore without one
    create(table, S_BOB, "/k", 100, 0o666)
    for accept_foreign in (False, True):
        fails(table, Status.EKEYREJECTED, table.open, S_ALICE, "/k", create=True, excl=False,
              mode=0o600, value=1, now_wall=0.0, key=KEY, auth=accept,
              accept_foreign=accept_foreign)
    # differently keyed squat: the owner's MAC does not verify under the squatter's key
    create(table, S_BOB, "/k2", 100, 0o666, key=KEY32)
    fails(table, Status.EKEYREJECTED, table.open, S_ALICE, "/k2", create=True, excl=False,
          mode=0o600, value=1, now_wall=0.0, key=KEY, auth=refuse, accept_foreign=True)


def test_open_existing_without_create(table: SemTable) -> None:
    h1 = create(table, S_ALICE, "/a", 1)
    opened = reopen(table, S_ALICE2, "/a")
    assert not opened.created and opened.handle != h1
    # both handles reach the same semaphore
    assert ok(table, try_wait, table, S_ALICE2, opened.handle) == granted(
        S_ALICE2, 1, opened.handle
    )
    fails(table, Status.EAGAIN, try_wait, table, S_ALICE, h1)


def test_create_excl_existing_is_eexist(table: SemTable) -> None:
    create(table, S_ALICE, "/a", 1)
    fails(table, Status.EEXIST, table.open, S_ALICE, "/a", create=True, excl=True,
          mode=0o600, value=0, now_wall=0.0)
    # EEXIST even for a caller who could not open it (as open(2) with O_EXCL reports)
    fails(table, Status.EEXIST, table.open, S_BOB, "/a", create=True, excl=True,
          mode=0o600, value=0, now_wall=0.0)


def test_open_missing_without_create_is_enoent(table: SemTable) -> None:
    fails(table, Status.ENOENT, table.open, S_ALICE, "/nope", create=False, excl=False,
          mode=0o600, value=0, now_wall=0.0)


def test_excl_without_create_is_einval(table: SemTable) -> None:
    fails(table, Status.EINVAL, table.open, S_ALICE, "/nope", create=False, excl=True,
          mode=0o600, value=0, now_wall=0.0)
    create(table, S_ALICE, "/a")
    fails(table, Status.EINVAL, table.open, S_ALICE, "/a", create=False, excl=True,
          mode=0o600, value=0, now_wall=0.0)


@pytest.mark.parametrize("value", [0, 1, 12345, SEM_VALUE_MAX - 1, SEM_VALUE_MAX])
def test_initial_value_in_range(table: SemTable, value: int) -> None:
    create(table, S_ALICE, "/v", value)
    assert value_of(table, "/v") == value
    assert table.info("/v").initial == value


@pytest.mark.parametrize("value", [-1, -(2**31), SEM_VALUE_MAX + 1, 2**32, 2**64])
def test_initial_value_out_of_range_is_einval(table: SemTable, value: int) -> None:
    fails(table, Status.EINVAL, table.open, S_ALICE, "/v", create=True, excl=True,
          mode=0o600, value=value, now_wall=0.0)
    assert table.infos() == []


@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_initial_value_of_wrong_type_is_einval(table: SemTable, value: object) -> None:
    fails(table, Status.EINVAL, table.open, S_ALICE, "/v", create=True, excl=True,
          mode=0o600, value=value, now_wall=0.0)


def test_check_value_directly() -> None:
    check_value(0)
    check_value(SEM_VALUE_MAX)
    assert SEM_VALUE_MAX == 2**31 - 1
    for bad in (-1, SEM_VALUE_MAX + 1, False):
        with pytest.raises(CoreError) as excinfo:
            check_value(bad)
        assert excinfo.value.status is Status.EINVAL


@pytest.mark.parametrize("mode", [-1, 0o10000, True, 1.5, "0600"])
def test_bad_mode_is_einval(table: SemTable, mode: object) -> None:
    fails(table, Status.EINVAL, table.open, S_ALICE, "/m", create=True, excl=True,
          mode=mode, value=0, now_wall=0.0)


def test_mode_keeps_only_permission_bits(table: SemTable) -> None:
    create(table, S_ALICE, "/m", mode=0o4777)
    assert table.info("/m").mode == 0o777


# ------------------------------------------------------------ access policy


def _open_status(table: SemTable, sid: int, name: str) -> Status:
    before = snapshot(table)
    try:
        opened = table.open(sid, name, create=False, excl=False, mode=0, value=0, now_wall=0.0)
    except CoreError as exc:
        table.check_invariants()
        assert snapshot(table) == before
        return exc.status
    table.check_invariants()
    ok(table, table.close, sid, opened.handle)
    return Status.OK


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # mode: (owner alice, alice's other session, groupmate, bob, root)
        (0o600, (Status.OK, Status.OK, Status.EACCES, Status.EACCES, Status.OK)),
        (0o660, (Status.OK, Status.OK, Status.OK, Status.EACCES, Status.OK)),
        (0o666, (Status.OK, Status.OK, Status.OK, Status.OK, Status.OK)),
        (0o606, (Status.OK, Status.OK, Status.EACCES, Status.OK, Status.OK)),
        (0o060, (Status.EACCES, Status.EACCES, Status.OK, Status.EACCES, Status.OK)),
        # the owner's bits apply to the owner even when group/other bits would allow
        (0o066, (Status.EACCES, Status.EACCES, Status.OK, Status.OK, Status.OK)),
        # the group's bits apply to the group even when other bits would allow
        (0o646, (Status.OK, Status.OK, Status.EACCES, Status.OK, Status.OK)),
        # read-only or write-only is not enough: a semaphore is opened read+write
        (0o400, (Status.EACCES, Status.EACCES, Status.EACCES, Status.EACCES, Status.OK)),
        (0o200, (Status.EACCES, Status.EACCES, Status.EACCES, Status.EACCES, Status.OK)),
        (0o644, (Status.OK, Status.OK, Status.EACCES, Status.EACCES, Status.OK)),
        (0o662, (Status.OK, Status.OK, Status.OK, Status.EACCES, Status.OK)),
        (0o664, (Status.OK, Status.OK, Status.OK, Status.EACCES, Status.OK)),
        (0o700, (Status.OK, Status.OK, Status.EACCES, Status.EACCES, Status.OK)),
        (0o000, (Status.EACCES, Status.EACCES, Status.EACCES, Status.EACCES, Status.OK)),
    ],
)
def test_access_by_mode_bits(table: SemTable, mode: int, expected: tuple[Status, ...]) -> None:
    create(table, S_ALICE, "/p", mode=mode)
    got = tuple(
        _open_status(table, sid, "/p") for sid in (S_ALICE, S_ALICE2, S_GROUP, S_BOB, S_ROOT)
    )
    assert got == expected


def test_open_with_create_on_existing_still_checks_access(table: SemTable) -> None:
    create(table, S_ALICE, "/p", mode=0o600)
    fails(table, Status.EACCES, table.open, S_BOB, "/p", create=True, excl=False,
          mode=0o666, value=0, now_wall=0.0)


def test_owner_and_group_come_from_creator(table: SemTable) -> None:
    create(table, S_GROUP, "/g", mode=0o660)
    info = table.info("/g")
    assert (info.owner_uid, info.owner_gid) == (1001, 1000)
    assert _open_status(table, S_ALICE, "/g") is Status.OK  # alice shares gid 1000
    assert _open_status(table, S_BOB, "/g") is Status.EACCES


def test_unlink_only_by_owner_or_root(table: SemTable) -> None:
    create(table, S_ALICE, "/u", mode=0o666)
    # opening is allowed for everyone, removing the name is not
    fails(table, Status.EACCES, table.unlink, S_BOB, "/u")
    fails(table, Status.EACCES, table.unlink, S_GROUP, "/u")
    ok(table, table.unlink, S_ALICE2, "/u")  # same uid, another session
    assert table.infos() == []
    create(table, S_ALICE, "/u")
    ok(table, table.unlink, S_ROOT, "/u")
    assert table.infos() == []


def test_unlink_missing_is_enoent(table: SemTable) -> None:
    fails(table, Status.ENOENT, table.unlink, S_ALICE, "/missing")


def test_handle_of_another_session_is_ebadf(table: SemTable) -> None:
    h = create(table, S_ALICE, "/h", 1, 0o666)
    # even a session of the same uid cannot use a token it did not open or attach
    for sid in (S_ALICE2, S_BOB, S_ROOT):
        fails(table, Status.EBADF, try_wait, table, sid, h)
        fails(table, Status.EBADF, table.post, sid, h)
        fails(table, Status.EBADF, table.getvalue, sid, h)
        fails(table, Status.EBADF, table.close, sid, h)
    fails(table, Status.EBADF, table.post, S_ALICE, b"\0" * 16)


# ------------------------------------------------------------------- post


def test_post_increments_value(table: SemTable) -> None:
    h = create(table, S_ALICE, "/p", 0)
    assert ok(table, table.post, S_ALICE, h) is None
    assert ok(table, table.post, S_ALICE, h) is None
    info = table.info("/p")
    assert (info.value, info.posts, info.waits) == (2, 2, 0)


def test_post_at_max_is_eoverflow_and_changes_nothing(table: SemTable) -> None:
    h = create(table, S_ALICE, "/o", SEM_VALUE_MAX - 1)
    ok(table, table.post, S_ALICE, h)
    assert value_of(table, "/o") == SEM_VALUE_MAX
    fails(table, Status.EOVERFLOW, table.post, S_ALICE, h)
    info = table.info("/o")
    assert (info.value, info.posts) == (SEM_VALUE_MAX, 1)
    # still usable: take one, give it back
    assert ok(table, try_wait, table, S_ALICE, h) is not None
    ok(table, table.post, S_ALICE, h)
    assert value_of(table, "/o") == SEM_VALUE_MAX


def test_post_at_max_does_not_touch_holdings(table: SemTable) -> None:
    h = create(table, S_ALICE, "/o", SEM_VALUE_MAX - 1)
    ok(table, try_wait, table, S_ALICE, h)  # alice holds one
    ok(table, try_wait, table, S_ALICE, h)  # and two
    hr = ok(table, table.open, S_ROOT, "/o", create=False, excl=False, mode=0, value=0,
            now_wall=0.0).handle
    # root hands two units back for alice: they are charged to her holding
    ok(table, table.post, S_ROOT, hr)
    assert table.info("/o").holders == ((ALICE.pid, 1),)
    ok(table, table.post, S_ROOT, hr)
    ok(table, table.post, S_ROOT, hr)  # nobody holds: a plain post, up to the max
    assert table.info("/o").holders == ()
    assert value_of(table, "/o") == SEM_VALUE_MAX
    # the count is full, so nobody can hold a unit (value + held <= SEM_VALUE_MAX):
    # the refused post has no holding to touch, and changes nothing (``fails``)
    fails(table, Status.EOVERFLOW, table.post, S_ALICE, h)


# ------------------------------------------------------------- waits, FIFO


def test_trywait_takes_a_unit_then_eagain(table: SemTable) -> None:
    h = create(table, S_ALICE, "/t", 1)
    done = ok(table, try_wait, table, S_ALICE, h, 7)
    assert done == WaitDone(S_ALICE, 7, h, None, Status.OK)
    fails(table, Status.EAGAIN, try_wait, table, S_ALICE, h, 8)
    info = table.info("/t")
    assert (info.value, info.waits, info.waiters) == (0, 1, 0)


def test_block_wait_with_free_unit_is_immediate(table: SemTable) -> None:
    h = create(table, S_ALICE, "/b", 2)
    assert block_wait(table, S_ALICE, h, 1) == granted(S_ALICE, 1, h)
    assert value_of(table, "/b") == 1
    assert table.info("/b").waiters == 0


def test_fifo_handoff_and_no_overtaking(table: SemTable) -> None:
    h_a = create(table, S_ALICE, "/f", 0, 0o666)
    h_b = reopen(table, S_BOB, "/f").handle
    h_g = reopen(table, S_GROUP, "/f").handle
    h_r = reopen(table, S_ROOT, "/f").handle
    assert block_wait(table, S_ALICE, h_a, 1) is None
    assert block_wait(table, S_BOB, h_b, 1) is None
    assert block_wait(table, S_ALICE, h_a, 2) is None
    assert [q[:2] for q in table.info("/f").queue] == [
        (ALICE.pid, 1), (BOB.pid, 1), (ALICE.pid, 2)
    ]
    # a newcomer cannot take anything while waiters queue
    fails(table, Status.EAGAIN, try_wait, table, S_GROUP, h_g, 1)
    # each post goes straight to the head of the queue; the count stays 0
    assert ok(table, table.post, S_ROOT, h_r) == granted(S_ALICE, 1, h_a)
    assert value_of(table, "/f") == 0
    fails(table, Status.EAGAIN, try_wait, table, S_GROUP, h_g, 1)
    assert ok(table, table.post, S_ROOT, h_r) == granted(S_BOB, 1, h_b)
    assert ok(table, table.post, S_ROOT, h_r) == granted(S_ALICE, 2, h_a)
    assert table.info("/f").waiters == 0
    assert ok(table, table.post, S_ROOT, h_r) is None
    assert value_of(table, "/f") == 1
    assert ok(table, try_wait, table, S_GROUP, h_g, 1) == granted(S_GROUP, 1, h_g)
    info = table.info("/f")
    assert (info.value, info.posts, info.waits) == (0, 4, 4)


def test_late_blocker_queues_behind(table: SemTable) -> None:
    h = create(table, S_ALICE, "/f", 0, 0o666)
    h_b = reopen(table, S_BOB, "/f").handle
    block_wait(table, S_ALICE, h, 1)
    ok(table, table.post, S_BOB, h_b)  # to alice
    block_wait(table, S_BOB, h_b, 1)  # queues: no unit was left over
    assert table.info("/f").queue == ((BOB.pid, 1, None),)


def test_duplicate_queued_request_id_is_einval(table: SemTable) -> None:
    h = create(table, S_ALICE, "/d")
    block_wait(table, S_ALICE, h, 5)
    fails(table, Status.EINVAL, table.wait, S_ALICE, h, 5, mode=WaitMode.BLOCK, now=0.0)
    # request ids are per session: another session may use the same number
    h_a2 = reopen(table, S_ALICE2, "/d").handle
    block_wait(table, S_ALICE2, h_a2, 5)
    assert table.info("/d").waiters == 2


def test_getvalue_is_zero_while_waiters_queue(table: SemTable) -> None:
    h = create(table, S_ALICE, "/g")
    block_wait(table, S_ALICE, h, 1)
    assert table.getvalue(S_ALICE, h) == 0


# ------------------------------------------------------------- timed waits


def test_timed_wait_past_deadline_with_unit_succeeds(table: SemTable) -> None:
    h = create(table, S_ALICE, "/t", 1)
    done = ok(table, timed_wait, table, S_ALICE, h, 1, now=100.0, deadline=50.0)
    assert done == granted(S_ALICE, 1, h)
    assert value_of(table, "/t") == 0


@pytest.mark.parametrize("deadline", [50.0, 100.0])
def test_timed_wait_past_deadline_at_zero_times_out(table: SemTable, deadline: float) -> None:
    h = create(table, S_ALICE, "/t", 0)
    fails(table, Status.ETIMEDOUT, timed_wait, table, S_ALICE, h, 1, now=100.0,
          deadline=deadline)
    assert table.info("/t").waiters == 0
    assert table.next_deadline() is None


def test_timed_wait_without_deadline_is_einval(table: SemTable) -> None:
    h = create(table, S_ALICE, "/t", 1)
    fails(table, Status.EINVAL, table.wait, S_ALICE, h, 1, mode=WaitMode.TIMED, now=0.0)


def test_expire_ends_due_waits_only(table: SemTable) -> None:
    h = create(table, S_ALICE, "/t", 0, 0o666)
    h_b = reopen(table, S_BOB, "/t").handle
    assert table.next_deadline() is None
    assert ok(table, timed_wait, table, S_ALICE, h, 1, now=0.0, deadline=10.0) is None
    assert ok(table, timed_wait, table, S_BOB, h_b, 1, now=0.0, deadline=5.0) is None
    block_wait(table, S_ALICE, h, 2)
    assert table.next_deadline() == 5.0
    assert table.info("/t").queue == (
        (ALICE.pid, 1, 10.0), (BOB.pid, 1, 5.0), (ALICE.pid, 2, None)
    )
    assert ok(table, table.expire, 4.999) == []
    assert table.info("/t").waiters == 3
    assert ok(table, table.expire, 5.0) == [WaitDone(S_BOB, 1, h_b, None, Status.ETIMEDOUT)]
    assert table.next_deadline() == 10.0
    assert ok(table, table.expire, 5.0) == []  # exactly once
    assert ok(table, table.expire, 1e9) == [WaitDone(S_ALICE, 1, h, None, Status.ETIMEDOUT)]
    assert table.next_deadline() is None
    # the untimed wait never expires; it is still first in line
    assert table.info("/t").queue == ((ALICE.pid, 2, None),)
    assert ok(table, table.post, S_BOB, h_b) == granted(S_ALICE, 2, h)


def test_expire_orders_by_deadline(table: SemTable) -> None:
    h = create(table, S_ALICE, "/t")
    for req, deadline in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 1.0)]:
        ok(table, timed_wait, table, S_ALICE, h, req, now=0.0, deadline=deadline)
    events = ok(table, table.expire, 10.0)
    assert [e.req_id for e in events] == [2, 4, 3, 1]
    assert all(e.status is Status.ETIMEDOUT for e in events)


def test_granted_timed_wait_does_not_expire(table: SemTable) -> None:
    h = create(table, S_ALICE, "/t")
    timed_wait(table, S_ALICE, h, 1, now=0.0, deadline=5.0)
    assert ok(table, table.post, S_ALICE, h) == granted(S_ALICE, 1, h)
    assert table.next_deadline() is None
    assert ok(table, table.expire, 100.0) == []
    info = table.info("/t")
    assert (info.value, info.waits) == (0, 1)


def test_overdue_wait_granted_before_expire_runs(table: SemTable) -> None:
    # the timer has not fired yet when the post arrives: the grant wins, and the later
    # expire must not report a timeout for the same request
    h = create(table, S_ALICE, "/t")
    timed_wait(table, S_ALICE, h, 1, now=0.0, deadline=5.0)
    assert ok(table, table.post, S_ALICE, h) == granted(S_ALICE, 1, h)
    assert ok(table, table.expire, 6.0) == []


def test_next_deadline_skips_cancelled(table: SemTable) -> None:
    h = create(table, S_ALICE, "/t")
    timed_wait(table, S_ALICE, h, 1, now=0.0, deadline=1.0)
    timed_wait(table, S_ALICE, h, 2, now=0.0, deadline=2.0)
    assert table.next_deadline() == 1.0
    ok(table, table.cancel, S_ALICE, 1)
    assert table.next_deadline() == 2.0
    assert ok(table, table.expire, 1.5) == []
    assert table.info("/t").queue == ((ALICE.pid, 2, 2.0),)


def test_block_wait_has_no_deadline(table: SemTable) -> None:
    h = create(table, S_ALICE, "/t")
    block_wait(table, S_ALICE, h, 1)
    assert table.next_deadline() is None
    assert ok(table, table.expire, 1e18) == []
    assert table.info("/t").waiters == 1


def test_ended_timed_waits_do_not_accumulate() -> None:
    # One live timed wait with an early deadline sits at the top of the deadline heap;
    # behind it, a tenant within every quota (two waiters at most) makes and cancels
    # timed waits with later deadlines, again and again. Memory must stay bounded by
    # what is live, as the quotas promise ("every limit counts live objects").
    import gc
    import tracemalloc

    table = SemTable(quotas=Quotas(waiters_per_session=2, waiters_per_uid=2))
    table.add_session(1, ALICE)
    h = table.open(1, "/leak", create=True, excl=True, mode=0o600, value=0,
                   now_wall=0.0).handle
    table.wait(1, h, 0, mode=WaitMode.TIMED, now=0.0, deadline=86_400.0)

    def cycles(first: int, n: int) -> None:
        for req in range(first, first + n):
            table.wait(1, h, req, mode=WaitMode.TIMED, now=0.0, deadline=172_800.0)
            table.cancel(1, req)
            table.next_deadline()  # what the server's timer asks after every request
            table.expire(1.0)

    cycles(1, 1_000)  # warm up: let every lazily-built structure reach its size
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        cycles(1_001, 20_000)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    table.check_invariants()
    assert table.statistics()["waiters"] == 1
    # about 200 bytes leak per cycle (4 MB here); a bounded table stays well under 256 KB
    assert after - before < 256 * 1024, f"{after - before} bytes retained"


# ------------------------------------------------------------------ cancel


def test_cancel_queued_wait(table: SemTable) -> None:
    h = create(table, S_ALICE, "/c", 0, 0o666)
    h_b = reopen(table, S_BOB, "/c").handle
    block_wait(table, S_ALICE, h, 1)
    block_wait(table, S_BOB, h_b, 1)
    assert ok(table, table.cancel, S_ALICE, 1) == WaitDone(
        S_ALICE, 1, h, None, Status.ECANCELED
    )
    assert table.info("/c").queue == ((BOB.pid, 1, None),)
    # the next post goes to the remaining waiter, not to the cancelled one
    assert ok(table, table.post, S_ALICE, h) == granted(S_BOB, 1, h_b)
    assert value_of(table, "/c") == 0


def test_cancel_after_grant_returns_none(table: SemTable) -> None:
    h = create(table, S_ALICE, "/c")
    block_wait(table, S_ALICE, h, 1)
    ok(table, table.post, S_ALICE, h)
    before = snapshot(table)
    assert ok(table, table.cancel, S_ALICE, 1) is None
    assert snapshot(table) == before
    assert table.info("/c").holders == ((ALICE.pid, 1),)


def test_cancel_unknown_request_returns_none(table: SemTable) -> None:
    create(table, S_ALICE, "/c", 0, 0o666)
    h_b = reopen(table, S_BOB, "/c").handle
    block_wait(table, S_BOB, h_b, 1)
    before = snapshot(table)
    # alice cannot cancel bob's request 1 by naming the same number
    assert ok(table, table.cancel, S_ALICE, 1) is None
    assert ok(table, table.cancel, S_BOB, 2) is None
    assert snapshot(table) == before


def test_cancelled_request_id_can_be_reused(table: SemTable) -> None:
    h = create(table, S_ALICE, "/c")
    block_wait(table, S_ALICE, h, 1)
    ok(table, table.cancel, S_ALICE, 1)
    block_wait(table, S_ALICE, h, 1)
    assert table.info("/c").waiters == 1


# ------------------------------------------------------------------ close


def test_close_cancels_own_waits_on_that_handle_with_ebadf(table: SemTable) -> None:
    h1 = create(table, S_ALICE, "/c", 0, 0o666)
    h2 = reopen(table, S_ALICE, "/c").handle
    h_b = reopen(table, S_BOB, "/c").handle
    block_wait(table, S_ALICE, h1, 1)
    block_wait(table, S_BOB, h_b, 1)
    block_wait(table, S_ALICE, h2, 2)
    block_wait(table, S_ALICE, h1, 3)
    events = ok(table, table.close, S_ALICE, h1)
    assert events == [
        WaitDone(S_ALICE, 1, h1, None, Status.EBADF),
        WaitDone(S_ALICE, 3, h1, None, Status.EBADF),
    ]
    assert table.info("/c").queue == ((BOB.pid, 1, None), (ALICE.pid, 2, None))
    assert table.info("/c").handles == 2
    fails(table, Status.EBADF, table.post, S_ALICE, h1)
    fails(table, Status.EBADF, table.close, S_ALICE, h1)
    assert ok(table, table.post, S_ALICE, h2) == granted(S_BOB, 1, h_b)


def test_close_keeps_linked_semaphore(table: SemTable) -> None:
    h = create(table, S_ALICE, "/k", 0)
    ok(table, table.post, S_ALICE, h)
    sem_id = table.info("/k").sem_id
    assert ok(table, table.close, S_ALICE, h) == []
    info = table.info("/k")  # still named, value kept, like a file in /dev/shm
    assert (info.sem_id, info.value, info.handles) == (sem_id, 1, 0)
    h2 = reopen(table, S_ALICE, "/k").handle
    assert table.getvalue(S_ALICE, h2) == 1


# ------------------------------------------------------------------ unlink


def test_unlink_removes_name_at_once_but_handles_keep_working(table: SemTable) -> None:
    h = create(table, S_ALICE, "/u", 1, 0o666)
    h_b = reopen(table, S_BOB, "/u").handle
    old_id = table.info("/u").sem_id
    ok(table, table.unlink, S_ALICE, "/u")
    fails(table, Status.ENOENT, table.info, "/u")
    fails(table, Status.ENOENT, table.open, S_ALICE, "/u", create=False, excl=False,
          mode=0, value=0, now_wall=0.0)
    fails(table, Status.ENOENT, table.unlink, S_ALICE, "/u")
    assert table.infos() == []
    [gone] = table.infos(include_unlinked=True)
    assert (gone.sem_id, gone.linked, gone.handles, gone.value) == (old_id, False, 2, 1)
    # handles keep working on the unlinked semaphore
    assert ok(table, try_wait, table, S_BOB, h_b) == granted(S_BOB, 1, h_b)
    assert block_wait(table, S_ALICE, h, 1) is None
    assert ok(table, table.post, S_BOB, h_b) == granted(S_ALICE, 1, h)

    # a create under the same name is a new semaphore
    h_new = create(table, S_BOB, "/u", 5, 0o600)
    new = table.info("/u")
    assert new.sem_id != old_id and new.value == 5 and new.owner_uid == BOB.uid
    assert table.getvalue(S_ALICE, h) == 0  # the old one is unaffected
    ok(table, table.post, S_ALICE, h)
    assert table.getvalue(S_BOB, h_new) == 5
    assert [i.sem_id for i in table.infos(include_unlinked=True)] == sorted([old_id, new.sem_id])

    # the old semaphore lives until its last handle closes
    ok(table, table.close, S_ALICE, h)
    assert len(table.infos(include_unlinked=True)) == 2
    ok(table, table.close, S_BOB, h_b)
    assert [i.sem_id for i in table.infos(include_unlinked=True)] == [new.sem_id]
    assert table.statistics()["semaphores"] == 1


def test_semaphore_destroyed_when_unlinked_and_last_handle_closed(table: SemTable) -> None:
    h = create(table, S_ALICE, "/d", 3)
    ok(table, table.close, S_ALICE, h)
    assert table.statistics()["semaphores"] == 1  # named: still alive
    ok(table, table.unlink, S_ALICE, "/d")
    assert table.statistics() == {
        "names": 0, "semaphores": 0, "sessions": 5, "handles": 0, "waiters": 0
    }
    assert table.infos(include_unlinked=True) == []
    # and re-creating gives a fresh one with its own initial value
    create(table, S_ALICE, "/d", 0)
    assert value_of(table, "/d") == 0


def test_unlink_while_waiters_queue(table: SemTable) -> None:
    h = create(table, S_ALICE, "/w")
    block_wait(table, S_ALICE, h, 1)
    ok(table, table.unlink, S_ALICE, "/w")
    [info] = table.infos(include_unlinked=True)
    assert info.waiters == 1 and not info.linked
    events = ok(table, table.close, S_ALICE, h)
    assert events == [WaitDone(S_ALICE, 1, h, None, Status.EBADF)]
    assert table.infos(include_unlinked=True) == []


# --------------------------------------------------------------- holdings


def test_holdings_tracking(table: SemTable) -> None:
    h = create(table, S_ALICE, "/h", 3, 0o666)
    h_b = reopen(table, S_BOB, "/h").handle
    assert table.info("/h").holders == ()
    ok(table, try_wait, table, S_ALICE, h, 1)
    ok(table, try_wait, table, S_ALICE, h, 2)
    ok(table, try_wait, table, S_BOB, h_b, 1)
    assert table.info("/h").holders == ((ALICE.pid, 2), (BOB.pid, 1))
    ok(table, table.post, S_ALICE, h)
    assert table.info("/h").holders == ((ALICE.pid, 1), (BOB.pid, 1))
    ok(table, table.post, S_ALICE, h)
    assert table.info("/h").holders == ((BOB.pid, 1),)
    # a post by a session that holds nothing while another holds is that unit handed
    # back: charged to the holder (never negative)
    ok(table, table.post, S_ALICE, h)
    assert table.info("/h").holders == ()
    assert value_of(table, "/h") == 3
    # with nobody holding, a post just adds to the count
    ok(table, table.post, S_ALICE, h)
    assert value_of(table, "/h") == 4
    ok(table, try_wait, table, S_BOB, h_b, 9)
    # a queued wait that is granted counts as held too
    ok(table, try_wait, table, S_ALICE, h, 3)
    ok(table, try_wait, table, S_ALICE, h, 4)
    ok(table, try_wait, table, S_ALICE, h, 5)
    block_wait(table, S_BOB, h_b, 2)
    assert table.info("/h").holders == ((ALICE.pid, 3), (BOB.pid, 1))
    ok(table, table.post, S_ALICE, h)
    assert table.info("/h").holders == ((ALICE.pid, 2), (BOB.pid, 2))


def test_holdings_survive_close_of_the_handle(table: SemTable) -> None:
    h = create(table, S_ALICE, "/h", 1, 0o666, robust=True)
    h_b = reopen(table, S_BOB, "/h").handle
    ok(table, try_wait, table, S_ALICE, h)
    ok(table, table.close, S_ALICE, h)
    assert table.info("/h").holders == ((ALICE.pid, 1),)
    block_wait(table, S_BOB, h_b, 1)
    # the robust holder dies without its handle: its unit still goes to bob
    assert ok(table, table.end_session, S_ALICE) == [granted(S_BOB, 1, h_b)]


# ------------------------------------------------------------ end_session


def test_end_session_drops_waits_and_closes_handles(table: SemTable) -> None:
    h = create(table, S_ALICE, "/e", 0, 0o666)
    h_b = reopen(table, S_BOB, "/e").handle
    block_wait(table, S_ALICE, h, 1)
    block_wait(table, S_BOB, h_b, 1)
    timed_wait(table, S_ALICE, h, 2, now=0.0, deadline=3.0)
    assert ok(table, table.end_session, S_ALICE) == []
    info = table.info("/e")
    assert info.queue == ((BOB.pid, 1, None),)
    assert info.handles == 1
    assert table.next_deadline() is None
    assert ok(table, table.expire, 10.0) == []
    assert table.statistics()["sessions"] == 4
    fails(table, Status.EINVAL, table.post, S_ALICE, h)
    fails(table, Status.EINVAL, table.end_session, S_ALICE)
    # bob is first now
    h_r = reopen(table, S_ROOT, "/e").handle
    assert ok(table, table.post, S_ROOT, h_r) == granted(S_BOB, 1, h_b)
    # the sid may be reused by a new session
    ok(table, table.add_session, S_ALICE, ALICE)


def test_end_session_destroys_unlinked_semaphore(table: SemTable) -> None:
    create(table, S_ALICE, "/e")
    ok(table, table.unlink, S_ALICE, "/e")
    ok(table, table.end_session, S_ALICE)
    assert table.infos(include_unlinked=True) == []


def test_end_session_robust_releases_to_next_waiter_then_count(table: SemTable) -> None:
    h = create(table, S_ALICE, "/r", 2, 0o666, robust=True)
    h_b = reopen(table, S_BOB, "/r").handle
    ok(table, try_wait, table, S_ALICE, h, 1)
    ok(table, try_wait, table, S_ALICE, h, 2)
    block_wait(table, S_BOB, h_b, 1)
    events = ok(table, table.end_session, S_ALICE)
    assert events == [granted(S_BOB, 1, h_b)]  # first unit to the waiter
    info = table.info("/r")
    assert info.value == 1  # second unit to the count
    assert info.robust_releases == 2
    assert info.holders == ((BOB.pid, 1),)
    assert info.dead_holders == ()
    assert info.value == info.initial + info.posts - info.waits + info.robust_releases


def test_end_session_non_robust_records_dead_holders(table: SemTable) -> None:
    h = create(table, S_ALICE, "/n", 3, 0o666)
    h_b = reopen(table, S_BOB, "/n").handle
    ok(table, try_wait, table, S_ALICE, h, 1)
    ok(table, try_wait, table, S_ALICE, h, 2)
    ok(table, try_wait, table, S_BOB, h_b, 1)
    block_wait(table, S_BOB, h_b, 2)
    assert ok(table, table.end_session, S_ALICE) == []
    info = table.info("/n")
    assert info.value == 0
    assert info.queue == ((BOB.pid, 2, None),)  # nobody was given alice's units
    assert info.holders == ((BOB.pid, 1),)
    assert info.dead_holders == ((ALICE.pid, 2),)
    assert info.robust_releases == 0
    # a second session of the same pid dying adds to that pid's record
    ok(table, table.add_session, 50, ALICE)
    h2 = reopen(table, 50, "/n").handle
    ok(table, table.post, S_BOB, h_b)  # to bob's queued wait
    ok(table, table.post, S_BOB, h_b)
    ok(table, try_wait, table, 50, h2, 1)
    ok(table, table.end_session, 50)
    assert table.info("/n").dead_holders == ((ALICE.pid, 3),)


def test_end_session_robust_release_into_full_count(table: SemTable) -> None:
    h = create(table, S_ALICE, "/r", SEM_VALUE_MAX, 0o666, robust=True)
    h_b = reopen(table, S_BOB, "/r").handle
    ok(table, try_wait, table, S_ALICE, h)
    ok(table, table.post, S_BOB, h_b)  # count back at the maximum
    assert ok(table, table.end_session, S_ALICE) == []
    info = table.info("/r")
    assert info.value == SEM_VALUE_MAX
    assert info.value == info.initial + info.posts - info.waits + info.robust_releases


def test_end_session_only_own_holdings_released(table: SemTable) -> None:
    h = create(table, S_ALICE, "/r", 2, 0o666, robust=True)
    h_b = reopen(table, S_BOB, "/r").handle
    ok(table, try_wait, table, S_ALICE, h)
    ok(table, try_wait, table, S_BOB, h_b)
    ok(table, table.end_session, S_BOB)
    info = table.info("/r")
    assert info.value == 1 and info.holders == ((ALICE.pid, 1),)


# ------------------------------------------- robust releases never create units


def held_units(info: SemInfo) -> int:
    return sum(n for _, n in info.holders)


def test_robust_hand_off_then_holder_dies(table: SemTable) -> None:
    # a parent takes the mutex, its worker posts it back (a hand-off), the parent exits
    h = create(table, S_ALICE, "/m", 1, 0o600, robust=True)
    h_w = ok(table, table.attach, S_ALICE2, h).handle
    ok(table, try_wait, table, S_ALICE, h)
    ok(table, table.post, S_ALICE2, h_w)  # charged to alice, the holder
    assert table.info("/m").holders == ()
    assert ok(table, table.end_session, S_ALICE) == []
    info = table.info("/m")
    assert info.value == 1  # not 2: there is still one mutex
    assert (info.robust_releases, info.robust_forgiven) == (0, 0)
    ok(table, try_wait, table, S_ALICE2, h_w)
    fails(table, Status.EAGAIN, try_wait, table, S_ALICE2, h_w, 2)


def test_robust_hand_off_then_holder_dies_while_next_holds(table: SemTable) -> None:
    # the hand-off is charged to the longest-standing holder even when another session
    # takes the unit at once: after alice dies there is still at most one holder
    h = create(table, S_ALICE, "/m", 1, 0o666, robust=True)
    h_w = ok(table, table.attach, S_ALICE2, h).handle
    h_b = reopen(table, S_BOB, "/m").handle
    ok(table, try_wait, table, S_ALICE, h)
    block_wait(table, S_BOB, h_b, 1)
    assert ok(table, table.post, S_ALICE2, h_w) == granted(S_BOB, 1, h_b)
    assert table.info("/m").holders == ((BOB.pid, 1),)
    assert ok(table, table.end_session, S_ALICE) == []
    info = table.info("/m")
    assert (info.value, held_units(info)) == (0, 1)
    # bob dies holding the mutex: it is released, once
    assert ok(table, table.end_session, S_BOB) == []
    info = table.info("/m")
    assert (info.value, info.holders, info.robust_releases) == (1, (), 1)


def test_robust_work_queue_consumer_exits(table: SemTable) -> None:
    # a producer posts 100 jobs into a value-0 queue, a consumer takes all 100 and exits
    h = create(table, S_ALICE, "/q", 0, 0o666, robust=True)
    h_c = reopen(table, S_BOB, "/q").handle
    for _ in range(100):
        ok(table, table.post, S_ALICE, h)
    for req in range(100):
        ok(table, try_wait, table, S_BOB, h_c, req)
    assert table.info("/q").holders == ((BOB.pid, 100),)
    assert ok(table, table.end_session, S_BOB) == []
    info = table.info("/q")
    assert info.value == 0  # not 100: the jobs were done, not lost
    assert (info.robust_releases, info.robust_forgiven) == (0, 100)
    assert info.value == info.initial + info.posts - info.waits + info.robust_releases


def test_robust_release_restores_at_most_the_capacity(table: SemTable) -> None:
    # capacity 3: alice holds 2, bob 1; root's post while they hold is charged to
    # alice, the longest-standing holder, so her death releases only one unit
    h = create(table, S_ALICE, "/c", 3, 0o666, robust=True)
    h_b = reopen(table, S_BOB, "/c").handle
    h_r = reopen(table, S_ROOT, "/c").handle
    ok(table, try_wait, table, S_ALICE, h, 1)
    ok(table, try_wait, table, S_BOB, h_b, 1)
    ok(table, try_wait, table, S_ALICE, h, 2)
    ok(table, table.post, S_ROOT, h_r)
    assert table.info("/c").holders == ((ALICE.pid, 1), (BOB.pid, 1))
    ok(table, table.end_session, S_ALICE)
    info = table.info("/c")
    assert (info.value, info.holders) == (2, ((BOB.pid, 1),))
    assert (info.robust_releases, info.robust_forgiven) == (1, 0)
    # the count was filled past the capacity by plain posts: bob's death restores nothing
    ok(table, table.post, S_ROOT, h_r)  # charged to bob
    ok(table, try_wait, table, S_BOB, h_b, 2)  # bob holds one again: value 2 + 1 = 3
    ok(table, table.post, S_ROOT, h_r)  # charged to bob: value 3, nobody holds
    ok(table, table.post, S_ROOT, h_r)  # nobody holds: value 4, above the capacity
    ok(table, try_wait, table, S_BOB, h_b, 3)
    ok(table, table.end_session, S_BOB)
    info = table.info("/c")
    assert (info.value, info.robust_releases, info.robust_forgiven) == (3, 1, 1)


def test_robust_created_at_zero_restores_nothing(table: SemTable) -> None:
    # the documented consequence: "open it with a post" gives a robust mutex nothing back
    h = create(table, S_ALICE, "/z", 0, 0o666, robust=True)
    h_b = reopen(table, S_BOB, "/z").handle
    ok(table, table.post, S_ALICE, h)
    ok(table, try_wait, table, S_BOB, h_b)
    ok(table, table.end_session, S_BOB)
    info = table.info("/z")
    assert (info.value, info.robust_releases, info.robust_forgiven) == (0, 0, 1)


def test_robust_release_of_many_units_goes_to_waiters_then_count(table: SemTable) -> None:
    h = create(table, S_ALICE, "/r", 5, 0o666, robust=True)
    h_b = reopen(table, S_BOB, "/r").handle
    for req in range(5):
        ok(table, try_wait, table, S_ALICE, h, req)
    block_wait(table, S_BOB, h_b, 1)
    block_wait(table, S_BOB, h_b, 2)
    assert ok(table, table.end_session, S_ALICE) == [granted(S_BOB, 1, h_b),
                                                      granted(S_BOB, 2, h_b)]
    info = table.info("/r")
    assert (info.value, info.holders, info.robust_releases) == (3, ((BOB.pid, 2),), 5)


def test_non_robust_hand_off_is_not_a_dead_holding(table: SemTable) -> None:
    # plain semaphores get the same charging, so stat does not blame a process that
    # handed its unit off
    h = create(table, S_ALICE, "/n", 1, 0o600)
    h_w = ok(table, table.attach, S_ALICE2, h).handle
    ok(table, try_wait, table, S_ALICE, h)
    ok(table, table.post, S_ALICE2, h_w)
    ok(table, table.end_session, S_ALICE)
    info = table.info("/n")
    assert (info.value, info.dead_holders, info.robust_forgiven) == (1, (), 0)
    # a holder that really dies with its unit is still on record
    ok(table, try_wait, table, S_ALICE2, h_w)
    ok(table, table.end_session, S_ALICE2)
    assert table.info("/n").dead_holders == ((ALICE2.pid, 1),)


def test_charge_goes_to_the_longest_standing_holder(table: SemTable) -> None:
    h = create(table, S_ALICE, "/l", 3, 0o666)
    h_b = reopen(table, S_BOB, "/l").handle
    h_g = reopen(table, S_GROUP, "/l").handle
    h_r = reopen(table, S_ROOT, "/l").handle
    ok(table, try_wait, table, S_BOB, h_b, 1)
    ok(table, try_wait, table, S_ALICE, h, 1)
    ok(table, try_wait, table, S_BOB, h_b, 2)  # bob holds 2 and still holds longest
    ok(table, table.post, S_ROOT, h_r)
    assert table.info("/l").holders == ((ALICE.pid, 1), (BOB.pid, 1))
    ok(table, table.post, S_ROOT, h_r)
    assert table.info("/l").holders == ((ALICE.pid, 1),)
    ok(table, try_wait, table, S_BOB, h_b, 3)  # bob starts holding again: now the newest
    ok(table, table.post, S_GROUP, h_g)
    assert table.info("/l").holders == ((BOB.pid, 1),)


# ------------------------------------------------------------------ attach


def test_attach_same_uid(table: SemTable) -> None:
    h = create(table, S_ALICE, "/a", 1)
    opened = ok(table, table.attach, S_ALICE2, h)
    assert opened.handle != h and not opened.created and opened.key is None
    assert table.info("/a").handles == 2
    assert ok(table, try_wait, table, S_ALICE2, opened.handle) == granted(
        S_ALICE2, 1, opened.handle
    )
    # the two handles are independent: closing the original leaves the attached one
    ok(table, table.close, S_ALICE, h)
    ok(table, table.post, S_ALICE2, opened.handle)
    assert value_of(table, "/a") == 1


def test_open_and_attach_carry_the_semaphores_identity(table: SemTable) -> None:
    """OPEN and ATTACH name the semaphore they opened (its sem_id): the same for every
    handle on it, another for the name unlinked and created again."""
    first = ok(table, table.open, S_ALICE, "/a", create=True, excl=True, mode=0o600,
               value=0, now_wall=1.0)
    assert first.sem_id == table.info("/a").sem_id
    again = ok(table, table.open, S_ALICE2, "/a", create=False, excl=False, mode=0,
               value=0, now_wall=2.0)
    attached = ok(table, table.attach, S_ALICE2, first.handle)
    assert again.sem_id == attached.sem_id == first.sem_id
    ok(table, table.unlink, S_ALICE, "/a")
    renewed = ok(table, table.open, S_ALICE, "/a", create=True, excl=True, mode=0o600,
                 value=0, now_wall=3.0)
    assert renewed.created and renewed.sem_id != first.sem_id


def test_attach_other_uid_is_ebadf(table: SemTable) -> None:
    h = create(table, S_ALICE, "/a", 1, 0o666)
    fails(table, Status.EBADF, table.attach, S_BOB, h)
    fails(table, Status.EBADF, table.attach, S_GROUP, h)


def test_attach_by_root(table: SemTable) -> None:
    h = create(table, S_ALICE, "/a", 1, 0o600)
    opened = ok(table, table.attach, S_ROOT, h)
    assert ok(table, table.post, S_ROOT, opened.handle) is None
    assert value_of(table, "/a") == 2


def test_attach_unknown_or_closed_token_is_ebadf(table: SemTable) -> None:
    fails(table, Status.EBADF, table.attach, S_ALICE, b"\x00" * 16)
    h = create(table, S_ALICE, "/a")
    ok(table, table.close, S_ALICE, h)
    fails(table, Status.EBADF, table.attach, S_ALICE2, h)
    fails(table, Status.EBADF, table.attach, S_ROOT, h)


def test_attach_to_unlinked_semaphore(table: SemTable) -> None:
    h = create(table, S_ALICE, "/a", 4)
    ok(table, table.unlink, S_ALICE, "/a")
    opened = ok(table, table.attach, S_ALICE2, h)
    ok(table, table.close, S_ALICE, h)
    assert table.getvalue(S_ALICE2, opened.handle) == 4


# ------------------------------------------------------------- key binding


@pytest.mark.parametrize("key", [bytes(KEY_MIN_BYTES), bytes(KEY_MAX_BYTES), bytearray(20)])
def test_key_length_accepted(table: SemTable, key: bytes) -> None:
    opened = ok(table, table.open, S_ALICE, "/k", create=True, excl=True, mode=0o600,
                value=0, now_wall=0.0, key=key)
    assert opened.key == bytes(key) and type(opened.key) is bytes
    assert table.info("/k").key_bound
    assert table.key_for_name("/k") == bytes(key)
    assert table.key_for_handle(S_ALICE, opened.handle) == bytes(key)
    assert table.key_for_token(opened.handle) == bytes(key)


@pytest.mark.parametrize("key", [b"", bytes(KEY_MIN_BYTES - 1), bytes(KEY_MAX_BYTES + 1), "k" * 16])
def test_key_length_refused(table: SemTable, key: Any) -> None:
    fails(table, Status.EINVAL, table.open, S_ALICE, "/k", create=True, excl=True,
          mode=0o600, value=0, now_wall=0.0, key=key)
    with pytest.raises(CoreError) as excinfo:
        check_key(key)
    assert excinfo.value.status is Status.EINVAL


def test_key_lookups_of_plain_and_unknown(table: SemTable) -> None:
    h = create(table, S_ALICE, "/p")
    assert table.key_for_name("/p") is None
    assert table.key_for_name("/none") is None
    assert table.key_for_handle(S_ALICE, h) is None
    assert table.key_for_handle(S_BOB, h) is None
    assert table.key_for_handle(99, h) is None
    assert table.key_for_token(b"nope") is None


def _key_bound(table: SemTable, value: int = 1) -> bytes:
    return create(table, S_ALICE, "/kb", value, 0o666, key=KEY)


def test_key_bound_every_operation_needs_auth(table: SemTable) -> None:
    h = _key_bound(table, 1)
    # without an authenticator, every operation on a key-bound semaphore is refused
    for fn, args, kwargs in [
        (table.open, (S_BOB, "/kb"),
         {"create": False, "excl": False, "mode": 0, "value": 0, "now_wall": 0.0}),
        (table.open, (S_BOB, "/kb"),
         {"create": True, "excl": False, "mode": 0, "value": 0, "now_wall": 0.0}),
        (table.wait, (S_ALICE, h, 1), {"mode": WaitMode.TRY, "now": 0.0}),
        (table.post, (S_ALICE, h), {}),
        (table.getvalue, (S_ALICE, h), {}),
        (table.close, (S_ALICE, h), {}),
        (table.unlink, (S_ALICE, "/kb"), {}),
        (table.attach, (S_ALICE2, h), {}),
    ]:
        fails(table, Status.EKEYREJECTED, fn, *args, **kwargs)
        fails(table, Status.EKEYREJECTED, fn, *args, auth=refuse, **kwargs)
    info = table.info("/kb")
    assert (info.value, info.handles, info.posts, info.waits) == (1, 1, 0, 0)


def test_key_bound_with_valid_auth(table: SemTable) -> None:
    h = _key_bound(table, 1)
    seen: list[bytes] = []

    def check(key: bytes) -> None:
        seen.append(key)
        if key != KEY:
            raise CoreError(Status.EKEYREJECTED, "wrong key")

    opened = ok(table, table.open, S_BOB, "/kb", create=False, excl=False, mode=0, value=0,
                now_wall=0.0, auth=check)
    assert opened.key == KEY and not opened.created
    done = ok(table, table.wait, S_BOB, opened.handle, 1, mode=WaitMode.TRY, now=0.0,
              auth=check)
    assert done == WaitDone(S_BOB, 1, opened.handle, KEY, Status.OK)
    assert ok(table, table.wait, S_ALICE, h, 1, mode=WaitMode.BLOCK, now=0.0,
              auth=check) is None
    assert ok(table, table.post, S_BOB, opened.handle, auth=check) == WaitDone(
        S_ALICE, 1, h, KEY, Status.OK
    )
    attached = ok(table, table.attach, S_ALICE2, h, auth=check)
    assert attached.key == KEY
    ok(table, table.wait, S_ALICE2, attached.handle, 9, mode=WaitMode.BLOCK, now=0.0,
       auth=check)
    assert ok(table, table.cancel, S_ALICE2, 9) == WaitDone(
        S_ALICE2, 9, attached.handle, KEY, Status.ECANCELED
    )
    ok(table, table.close, S_ALICE2, attached.handle, auth=check)
    ok(table, table.unlink, S_ALICE, "/kb", auth=check)
    assert seen and all(k == KEY for k in seen)


def test_key_bound_refusing_callback_changes_nothing(table: SemTable) -> None:
    h = _key_bound(table, 1)
    create(table, S_BOB, "/other")  # a bystander, to show nothing else moves either
    fails(table, Status.EKEYREJECTED, table.post, S_ALICE, h, auth=refuse)
    fails(table, Status.EKEYREJECTED, table.wait, S_ALICE, h, 1, mode=WaitMode.TRY,
          now=0.0, auth=refuse)
    fails(table, Status.EKEYREJECTED, table.unlink, S_ALICE, "/kb", auth=refuse)
    fails(table, Status.EKEYREJECTED, table.close, S_ALICE, h, auth=refuse)
    fails(table, Status.EKEYREJECTED, table.open, S_BOB, "/kb", create=False, excl=False,
          mode=0, value=0, now_wall=0.0, auth=refuse)
    info = table.info("/kb")
    assert (info.value, info.handles, info.posts, info.waits) == (1, 1, 0, 0)


def test_key_bound_timed_wait_expires_with_key(table: SemTable) -> None:
    h = _key_bound(table, 0)
    ok(table, table.wait, S_ALICE, h, 1, mode=WaitMode.TIMED, now=0.0, deadline=1.0,
       auth=accept)
    assert ok(table, table.expire, 1.0) == [WaitDone(S_ALICE, 1, h, KEY, Status.ETIMEDOUT)]


def test_opening_plain_semaphore_with_key_is_rejected(table: SemTable) -> None:
    create(table, S_ALICE, "/plain", 0, 0o666)
    for create_flag in (False, True):
        fails(table, Status.EKEYREJECTED, table.open, S_BOB, "/plain", create=create_flag,
              excl=False, mode=0o600, value=0, now_wall=0.0, key=KEY, auth=accept)


def test_keyed_caller_refuses_plain_semaphore(table: SemTable) -> None:
    # a caller that holds a key (its requests carry MACs) must not silently get a
    # semaphore nobody can authenticate: an A4 adversary could have pre-created it
    create(table, S_ALICE, "/plain", 0, 0o666)
    for create_flag in (False, True):
        fails(table, Status.EKEYREJECTED, table.open, S_BOB, "/plain", create=create_flag,
              excl=False, mode=0o600, value=0, now_wall=0.0, keyed=True, auth=accept)


def test_keyed_caller_without_key_cannot_create(table: SemTable) -> None:
    fails(table, Status.EKEYREJECTED, table.open, S_ALICE, "/new", create=True, excl=False,
          mode=0o600, value=0, now_wall=0.0, keyed=True, auth=accept)
    assert table.infos(include_unlinked=True) == []
    fails(table, Status.ENOENT, table.open, S_ALICE, "/new", create=False, excl=False,
          mode=0o600, value=0, now_wall=0.0, keyed=True, auth=accept)


def test_keyed_caller_opens_key_bound(table: SemTable) -> None:
    _key_bound(table)
    opened = ok(table, table.open, S_BOB, "/kb", create=False, excl=False, mode=0, value=0,
                now_wall=0.0, keyed=True, auth=accept)
    assert opened.key == KEY and not opened.created
    fails(table, Status.EKEYREJECTED, table.open, S_BOB, "/kb", create=False, excl=False,
          mode=0, value=0, now_wall=0.0, keyed=True, auth=refuse)


def test_plain_semaphore_ignores_authenticator(table: SemTable) -> None:
    # no key: the authenticator must not even be consulted
    h = create(table, S_ALICE, "/plain", 1)
    ok(table, table.post, S_ALICE, h, auth=refuse)
    ok(table, table.wait, S_ALICE, h, 1, mode=WaitMode.TRY, now=0.0, auth=refuse)
    assert value_of(table, "/plain") == 1


def test_create_with_key_does_not_need_auth(table: SemTable) -> None:
    opened = ok(table, table.open, S_ALICE, "/new", create=True, excl=False, mode=0o600,
                value=0, now_wall=0.0, key=KEY32, auth=refuse)
    assert opened.created and opened.key == KEY32


# ------------------------------------------------------------------ quotas


def test_quotas_must_be_positive() -> None:
    for field_name in (
        "semaphores_per_uid", "sessions_per_uid", "handles_per_session",
        "waiters_per_session", "waiters_per_uid",
    ):
        with pytest.raises(ValueError):
            Quotas(**{field_name: 0})
    assert Quotas(semaphores_per_uid=1).semaphores_per_uid == 1


def test_quota_semaphores_per_uid() -> None:
    table = new_table(Quotas(semaphores_per_uid=2))
    h1 = create(table, S_ALICE, "/1", mode=0o666)
    create(table, S_ALICE2, "/2", mode=0o666)  # same uid, another session: counts too
    err = fails(table, Status.EDQUOT, table.open, S_ALICE, "/3", create=True, excl=True,
                mode=0o600, value=0, now_wall=0.0)
    assert "quota" in err.message
    fails(table, Status.EDQUOT, table.open, S_ALICE2, "/3", create=True, excl=False,
          mode=0o600, value=0, now_wall=0.0)
    # opening an existing semaphore is not creating one
    reopen(table, S_ALICE, "/2")
    extra = ok(table, table.open, S_ALICE, "/1", create=True, excl=False, mode=0o600,
               value=0, now_wall=0.0)
    assert not extra.created
    # another uid is unaffected, and its semaphores don't count against alice
    create(table, S_BOB, "/b1")
    create(table, S_BOB, "/b2")
    fails(table, Status.EDQUOT, table.open, S_BOB, "/b3", create=True, excl=False,
          mode=0o600, value=0, now_wall=0.0)
    create(table, S_GROUP, "/g1")
    # the count is of live semaphores: unlinked but still open counts
    ok(table, table.unlink, S_ALICE, "/1")
    fails(table, Status.EDQUOT, table.open, S_ALICE, "/3", create=True, excl=True,
          mode=0o600, value=0, now_wall=0.0)
    ok(table, table.close, S_ALICE, h1)
    fails(table, Status.EDQUOT, table.open, S_ALICE, "/3", create=True, excl=True,
          mode=0o600, value=0, now_wall=0.0)
    # ... and a destroyed one frees the slot
    ok(table, table.close, S_ALICE, extra.handle)
    create(table, S_ALICE, "/3")
    # root is subject to the quota too (it bounds memory, not permissions)
    table2 = new_table(Quotas(semaphores_per_uid=1))
    create(table2, S_ROOT, "/r1")
    fails(table2, Status.EDQUOT, table2.open, S_ROOT, "/r2", create=True, excl=True,
          mode=0o600, value=0, now_wall=0.0)


def test_quota_sessions_per_uid() -> None:
    table = SemTable(quotas=Quotas(sessions_per_uid=2), token_factory=counter_tokens())
    ok(table, table.add_session, 1, ALICE)
    ok(table, table.add_session, 2, ALICE2)
    fails(table, Status.EDQUOT, table.add_session, 3, ALICE)
    ok(table, table.add_session, 4, BOB)
    ok(table, table.add_session, 5, BOB)
    fails(table, Status.EDQUOT, table.add_session, 6, BOB)
    ok(table, table.end_session, 1)
    ok(table, table.add_session, 3, ALICE)
    assert table.statistics()["sessions"] == 4


def test_quota_handles_per_session() -> None:
    table = new_table(Quotas(handles_per_session=2))
    h = create(table, S_ALICE, "/a", mode=0o666)
    reopen(table, S_ALICE, "/a")
    fails(table, Status.EDQUOT, table.open, S_ALICE, "/a", create=False, excl=False,
          mode=0, value=0, now_wall=0.0)
    fails(table, Status.EDQUOT, table.open, S_ALICE, "/b", create=True, excl=True,
          mode=0o600, value=0, now_wall=0.0)
    # attach is a handle too
    h2 = reopen(table, S_ALICE2, "/a").handle
    reopen(table, S_ALICE2, "/a")
    fails(table, Status.EDQUOT, table.attach, S_ALICE2, h)
    # another session (same uid or not) is unaffected
    ok(table, table.close, S_ALICE2, h2)
    ok(table, table.attach, S_ALICE2, h)
    reopen(table, S_BOB, "/a")
    reopen(table, S_BOB, "/a")
    # closing frees a slot
    ok(table, table.close, S_ALICE, h)
    create(table, S_ALICE, "/b")


def test_quota_waiters_per_session() -> None:
    table = new_table(Quotas(waiters_per_session=2))
    h = create(table, S_ALICE, "/w", 0, 0o666)
    h_b = reopen(table, S_BOB, "/w").handle
    block_wait(table, S_ALICE, h, 1)
    ok(table, timed_wait, table, S_ALICE, h, 2, now=0.0, deadline=10.0)
    err = fails(table, Status.EDQUOT, table.wait, S_ALICE, h, 3, mode=WaitMode.BLOCK,
                now=0.0)
    assert "quota" in err.message
    fails(table, Status.EDQUOT, timed_wait, table, S_ALICE, h, 3, now=0.0, deadline=10.0)
    # trywait does not queue, so the quota does not apply to it
    fails(table, Status.EAGAIN, try_wait, table, S_ALICE, h, 3)
    # an immediate grant is not a queued waiter, even at the quota
    h_x = create(table, S_ALICE, "/x", 1)
    assert block_wait(table, S_ALICE, h_x, 3) == granted(S_ALICE, 3, h_x)
    # another session of the same uid is unaffected
    h_a2 = reopen(table, S_ALICE2, "/w").handle
    block_wait(table, S_ALICE2, h_a2, 1)
    block_wait(table, S_ALICE2, h_a2, 2)
    fails(table, Status.EDQUOT, table.wait, S_ALICE2, h_a2, 3, mode=WaitMode.BLOCK, now=0.0)
    # so is another uid
    block_wait(table, S_BOB, h_b, 1)
    block_wait(table, S_BOB, h_b, 2)
    # a granted wait frees a slot ...
    assert ok(table, table.post, S_BOB, h_b) == granted(S_ALICE, 1, h)
    block_wait(table, S_ALICE, h, 4)
    fails(table, Status.EDQUOT, table.wait, S_ALICE, h, 5, mode=WaitMode.BLOCK, now=0.0)
    # ... so does a timed-out one ...
    assert len(ok(table, table.expire, 10.0)) == 1
    block_wait(table, S_ALICE, h, 5)
    fails(table, Status.EDQUOT, table.wait, S_ALICE, h, 6, mode=WaitMode.BLOCK, now=0.0)
    # ... and a cancelled one
    ok(table, table.cancel, S_ALICE, 4)
    block_wait(table, S_ALICE, h, 6)
    assert [q[:2] for q in table.info("/w").queue if q[0] == ALICE.pid] == [
        (ALICE.pid, 5), (ALICE.pid, 6)
    ]


def test_quota_waiters_per_uid() -> None:
    table = new_table(Quotas(waiters_per_uid=3))
    h = create(table, S_ALICE, "/w", 0, 0o666)
    h2 = reopen(table, S_ALICE2, "/w").handle
    h_b = reopen(table, S_BOB, "/w").handle
    block_wait(table, S_ALICE, h, 1)
    block_wait(table, S_ALICE, h, 2)
    block_wait(table, S_ALICE2, h2, 1)
    # the uid's fourth waiter is refused, from either of its sessions
    fails(table, Status.EDQUOT, table.wait, S_ALICE2, h2, 2, mode=WaitMode.BLOCK, now=0.0)
    fails(table, Status.EDQUOT, table.wait, S_ALICE, h, 3, mode=WaitMode.BLOCK, now=0.0)
    # another uid is unaffected
    for req in (1, 2, 3):
        block_wait(table, S_BOB, h_b, req)
    fails(table, Status.EDQUOT, table.wait, S_BOB, h_b, 4, mode=WaitMode.BLOCK, now=0.0)
    # ending a session returns its waiters to the uid's budget
    ok(table, table.end_session, S_ALICE2)
    block_wait(table, S_ALICE, h, 3)
    fails(table, Status.EDQUOT, table.wait, S_ALICE, h, 4, mode=WaitMode.BLOCK, now=0.0)
    # as do cancel, close and expiry
    ok(table, table.cancel, S_ALICE, 1)
    ok(table, timed_wait, table, S_ALICE, h, 4, now=0.0, deadline=2.0)
    fails(table, Status.EDQUOT, table.wait, S_ALICE, h, 5, mode=WaitMode.BLOCK, now=0.0)
    assert [e.req_id for e in ok(table, table.expire, 2.0)] == [4]
    h_x = create(table, S_ALICE, "/x")
    block_wait(table, S_ALICE, h_x, 5)
    fails(table, Status.EDQUOT, table.wait, S_ALICE, h, 6, mode=WaitMode.BLOCK, now=0.0)
    assert len(ok(table, table.close, S_ALICE, h_x)) == 1
    block_wait(table, S_ALICE, h, 6)


def test_quota_errors_before_queueing_do_not_hide_immediate_grants() -> None:
    table = new_table(Quotas(waiters_per_session=1, waiters_per_uid=1))
    h = create(table, S_ALICE, "/w", 0)
    block_wait(table, S_ALICE, h, 1)
    ok(table, table.post, S_ALICE, h)  # granted to req 1
    ok(table, table.post, S_ALICE, h)  # value 1
    assert block_wait(table, S_ALICE, h, 2) == granted(S_ALICE, 2, h)  # immediate
    assert block_wait(table, S_ALICE, h, 3) is None  # queued: the one allowed waiter
    fails(table, Status.EDQUOT, table.wait, S_ALICE, h, 4, mode=WaitMode.BLOCK, now=0.0)


# --------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("noslash", Status.EINVAL),
        ("", Status.EINVAL),
        ("/", Status.EINVAL),
        ("//", Status.EINVAL),
        ("/a/b", Status.EINVAL),
        ("/a/", Status.EINVAL),
        ("a/", Status.EINVAL),
        ("/a\0b", Status.EINVAL),
        ("/\0", Status.EINVAL),
        ("/\ud800", Status.EINVAL),  # lone surrogate: not UTF-8
        ("/" + "a" * (MAX_NAME_BYTES + 1), Status.ENAMETOOLONG),
        ("/" + "é" * 126, Status.ENAMETOOLONG),  # 126 characters but 252 bytes
        (b"/bytes", Status.EINVAL),
        (None, Status.EINVAL),
    ],
)
def test_bad_names(table: SemTable, name: Any, status: Status) -> None:
    with pytest.raises(CoreError) as excinfo:
        check_name(name)
    assert excinfo.value.status is status
    fails(table, status, table.open, S_ALICE, name, create=True, excl=False, mode=0o600,
          value=0, now_wall=0.0)
    fails(table, status, table.unlink, S_ALICE, name)
    fails(table, status, table.info, name)


@pytest.mark.parametrize(
    "name", ["/a", "/" + "a" * MAX_NAME_BYTES, "/" + "é" * 125 + "a", "/with space", "/ü.x"]
)
def test_good_names(table: SemTable, name: str) -> None:
    assert check_name(name) == name.encode("utf-8")
    create(table, S_ALICE, name)
    assert table.info(name).name == name
    ok(table, table.unlink, S_ALICE, name)


# --------------------------------------------------------------------- views


def test_info_contents(table: SemTable) -> None:
    h = create(table, S_ALICE, "/i", 2, 0o660, robust=True)
    h_g = reopen(table, S_GROUP, "/i").handle
    h_a2 = ok(table, table.attach, S_ALICE2, h).handle
    ok(table, try_wait, table, S_ALICE, h, 1)
    ok(table, try_wait, table, S_GROUP, h_g, 1)
    ok(table, timed_wait, table, S_ALICE2, h_a2, 11, now=0.0, deadline=7.5)
    block_wait(table, S_GROUP, h_g, 12)
    block_wait(table, S_ALICE, h, 13)
    info = table.info("/i")
    assert isinstance(info, SemInfo)
    assert info == SemInfo(
        sem_id=info.sem_id,
        name="/i",
        linked=True,
        value=0,
        initial=2,
        owner_uid=1000,
        owner_gid=1000,
        mode=0o660,
        key_bound=False,
        robust=True,
        created=1234.5,
        handles=3,
        waiters=3,
        posts=0,
        waits=2,
        robust_releases=0,
        robust_forgiven=0,
        reclaimed=0,
        holders=((ALICE.pid, 1), (GROUPMATE.pid, 1)),
        dead_holders=(),
        queue=((ALICE2.pid, 11, 7.5), (GROUPMATE.pid, 12, None), (ALICE.pid, 13, None)),
    )
    assert table.statistics() == {
        "names": 1, "semaphores": 1, "sessions": 5, "handles": 3, "waiters": 3
    }
    assert "names=1" in repr(table)


def test_info_dead_holders_of_non_robust(table: SemTable) -> None:
    h = create(table, S_ALICE, "/n", 2, 0o666)
    h_b = reopen(table, S_BOB, "/n").handle
    ok(table, try_wait, table, S_BOB, h_b, 1)
    ok(table, try_wait, table, S_BOB, h_b, 2)
    ok(table, table.end_session, S_BOB)
    info = table.info("/n")
    assert info.dead_holders == ((BOB.pid, 2),)
    assert info.holders == ()
    assert info.value == 0
    fails(table, Status.EAGAIN, try_wait, table, S_ALICE, h)


def test_infos_sorted_and_filtered(table: SemTable) -> None:
    create(table, S_ALICE, "/b")
    create(table, S_ALICE, "/a")
    h = create(table, S_ALICE, "/c")
    assert [i.name for i in table.infos()] == ["/a", "/b", "/c"]
    ok(table, table.unlink, S_ALICE, "/c")
    create(table, S_ALICE, "/c", 9)
    assert [(i.name, i.linked) for i in table.infos()] == [("/a", True), ("/b", True),
                                                           ("/c", True)]
    every = table.infos(include_unlinked=True)
    assert [(i.name, i.linked) for i in every] == [
        ("/a", True), ("/b", True), ("/c", False), ("/c", True)
    ]
    assert table.getvalue(S_ALICE, h) == 0


def test_info_of_missing_is_enoent(table: SemTable) -> None:
    fails(table, Status.ENOENT, table.info, "/missing")


def test_default_tokens_are_random_and_distinct() -> None:
    table = SemTable()
    table.add_session(1, ALICE)
    tokens = {
        table.open(1, "/r", create=True, excl=False, mode=0o600, value=0,
                   now_wall=0.0).handle
        for _ in range(50)
    }
    assert len(tokens) == 50
    assert all(len(t) == 16 for t in tokens)
    table.check_invariants()


def test_repeating_token_factory_still_gives_distinct_handles() -> None:
    seq = iter([b"A" * 16, b"A" * 16, b"A" * 16, b"B" * 16])
    table = SemTable(token_factory=lambda: next(seq))
    table.add_session(1, ALICE)
    h1 = table.open(1, "/x", create=True, excl=True, mode=0o600, value=0, now_wall=0.0)
    h2 = table.open(1, "/x", create=False, excl=False, mode=0, value=0, now_wall=0.0)
    assert (h1.handle, h2.handle) == (b"A" * 16, b"B" * 16)
    table.check_invariants()


# -------------------------------------------------------- conservation spot check


def test_conservation_over_a_busy_sequence(table: SemTable) -> None:
    h = create(table, S_ALICE, "/z", 1, 0o666, robust=True)
    h_b = reopen(table, S_BOB, "/z").handle
    h_g = reopen(table, S_GROUP, "/z").handle
    steps: list[Callable[[], object]] = [
        lambda: try_wait(table, S_ALICE, h, 1),
        lambda: block_wait(table, S_BOB, h_b, 1),
        lambda: timed_wait(table, S_GROUP, h_g, 1, now=0.0, deadline=2.0),
        lambda: table.post(S_ALICE, h),
        lambda: table.expire(2.0),
        lambda: block_wait(table, S_GROUP, h_g, 2),
        lambda: table.end_session(S_BOB),
        lambda: table.post(S_GROUP, h_g),
    ]
    for step in steps:
        step()
        table.check_invariants()
        info = table.info("/z")
        assert info.value == info.initial + info.posts - info.waits + info.robust_releases
    info = table.info("/z")
    # alice took the initial unit and gave it to bob; group's timed wait expired; bob died
    # holding it (robust: it went to group's second wait); group's post put it back
    assert (info.value, info.holders, info.waiters) == (1, (), 0)
    assert (info.posts, info.waits, info.robust_releases) == (2, 3, 1)


def test_keyed_unlink_refuses_plain_semaphore(table: SemTable) -> None:
    # A caller that proves a key must not remove a name that no key protects (and get a
    # success it cannot authenticate): refused, and the name stays.
    create(table, S_ALICE, "/plain")
    fails(table, Status.EKEYREJECTED, table.unlink, S_ALICE, "/plain", keyed=True, auth=accept)
    assert [i.name for i in table.infos()] == ["/plain"]
    ok(table, table.unlink, S_ALICE, "/plain")
    assert table.infos() == []
