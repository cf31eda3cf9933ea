"""The table's bounded views: LIST pages by cursor over the sorted name index, STAT with
capped lists and exact totals, and what a key-bound semaphore shows without its key."""

from __future__ import annotations

import random

import pytest

from esem.core import CoreError, Cred, SemTable, Status, WaitMode

ROOT = Cred(uid=0, gid=0, pid=100)
BOB = Cred(uid=1002, gid=1002, pid=400)
KEY = bytes(range(16))


def _table() -> SemTable:
    t = SemTable()
    t.add_session(1, ROOT)
    t.add_session(2, BOB)
    return t


def _open(t: SemTable, name: str, *, mode: int = 0o644, key: bytes | None = None) -> bytes:
    return t.open(1, name, create=True, excl=False, mode=mode, value=1, now_wall=0.0,
                  key=key).handle


def _all_pages(t: SemTable, sid: int, limit: int) -> list[str]:
    names, after = [], ""
    while True:
        views, more = t.page(sid, after, limit)
        names += [v.name for v in views]
        if not more:
            return names
        after = views[-1].name


def test_name_index_stays_sorted_through_creates_and_unlinks() -> None:
    t = _table()
    rng = random.Random(7)
    live: set[str] = set()
    for _ in range(400):
        name = f"/n{rng.randrange(60)}"
        if name in live and rng.random() < 0.5:
            t.unlink(1, name)
            live.discard(name)
        elif name not in live:
            t.close(1, _open(t, name))
            live.add(name)
        t.check_invariants()
    for limit in (1, 7, 64):
        assert _all_pages(t, 1, limit) == sorted(live)


def test_a_cursor_is_a_position_not_an_index() -> None:
    t = _table()
    for n in ("/a", "/c", "/e"):
        _open(t, n)
    views, more = t.page(1, "/b", 1)
    assert [v.name for v in views] == ["/c"] and more
    t.unlink(1, "/c")  # the cursor's name is gone: the next page is still right
    assert [v.name for v in t.page(1, "/c", 5)[0]] == ["/e"]
    assert t.page(1, "/z", 5) == ([], False)
    assert t.page(1, "", 0) == ([], True)


def test_page_hides_what_the_caller_may_not_read_and_every_key_bound_semaphore() -> None:
    t = _table()
    _open(t, "/private", mode=0o600)
    _open(t, "/public", mode=0o644)
    _open(t, "/keyed", mode=0o644, key=KEY)
    root = {v.name: v for v in t.page(1, "", 10)[0]}
    bob = {v.name: v for v in t.page(2, "", 10)[0]}
    assert root["/private"].detail is not None and bob["/private"].detail is None
    assert root["/public"].detail is not None and bob["/public"].detail is not None
    assert root["/keyed"].detail is None and bob["/keyed"].detail is None  # even root
    assert root["/keyed"].key_bound and root["/keyed"].owner_uid == 0


def test_view_caps_lists_and_counts_exactly() -> None:
    t = _table()
    h = _open(t, "/q", mode=0o666)
    t.wait(1, h, 1, mode=WaitMode.TRY, now=0.0)  # root holds the unit
    hb = t.open(2, "/q", create=False, excl=False, mode=0, value=0, now_wall=0.0).handle
    for req in range(1, 201):
        t.wait(2, hb, req, mode=WaitMode.BLOCK, now=0.0)
    v = t.view(2, "/q", cap=64)
    assert v.detail is not None
    assert v.detail.queue_total == 200 and v.detail.waiters == 200
    assert len(v.detail.queue) == 64
    assert [q[1] for q in v.detail.queue] == list(range(1, 65))  # FIFO order
    assert v.detail.holders == ((100, 1),) and v.detail.holders_total == 1


def test_view_of_a_key_bound_semaphore_needs_the_key() -> None:
    t = _table()
    _open(t, "/k", mode=0o644, key=KEY)
    assert t.view(1, "/k", cap=8).detail is None  # no MAC: public fields only

    def good(key: bytes) -> None:
        assert key == KEY

    def bad(key: bytes) -> None:
        raise CoreError(Status.EKEYREJECTED, "bad MAC")

    assert t.view(1, "/k", cap=8, keyed=True, auth=good).detail is not None
    with pytest.raises(CoreError) as exc:
        t.view(1, "/k", cap=8, keyed=True, auth=bad)
    assert exc.value.status is Status.EKEYREJECTED


def test_view_refusals() -> None:
    t = _table()
    _open(t, "/p", mode=0o600)
    with pytest.raises(CoreError) as exc:
        t.view(2, "/p", cap=8)
    assert exc.value.status is Status.EACCES
    with pytest.raises(CoreError) as exc:
        t.view(1, "/p", cap=8, keyed=True, auth=lambda k: None)
    assert exc.value.status is Status.EKEYREJECTED
    with pytest.raises(CoreError) as exc:
        t.view(1, "/missing", cap=8)
    assert exc.value.status is Status.ENOENT


def test_name_index_refuses_untracked_mutation() -> None:
    t = _table()
    with pytest.raises(TypeError):
        t._names.update({})
    with pytest.raises(TypeError):
        t._names.clear()
