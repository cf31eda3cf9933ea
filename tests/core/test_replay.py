"""The replay window (esem.core.replay): bounded in replies and bytes, oldest first."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esem.core.replay import REPLAY_WINDOW, ReplayWindow


def test_keeps_the_last_256_replies() -> None:
    w = ReplayWindow()
    for i in range(1, 1001):
        w.add(i, b"r%d" % i)
    assert len(w) == REPLAY_WINDOW == 256
    assert 744 not in w and 745 in w and w.get(1000) == b"r1000"
    assert [i for i, _ in w] == list(range(745, 1001))


def test_bounded_in_bytes_but_the_last_reply_stays() -> None:
    w = ReplayWindow(limit=10, limit_bytes=100)
    w.add(1, b"a" * 60)
    w.add(2, b"b" * 60)  # 120 > 100: the oldest goes
    assert 1 not in w and w.get(2) == b"b" * 60 and w.size == 60
    w.add(3, b"c" * 500)  # alone above the bound: kept, as the last reply
    assert [i for i, _ in w] == [3] and w.size == 500


def test_a_second_final_reply_is_a_bug() -> None:
    w = ReplayWindow()
    w.add(5, b"x")
    with pytest.raises(ValueError):
        w.add(5, b"y")
    with pytest.raises(ValueError):
        ReplayWindow(limit=0)


@given(st.lists(st.binary(max_size=40), max_size=80), st.integers(1, 20), st.integers(1, 200))
def test_model(bodies: list[bytes], limit: int, limit_bytes: int) -> None:
    """Against a model: the longest suffix within both bounds (at least one reply)."""
    w = ReplayWindow(limit=limit, limit_bytes=limit_bytes)
    for i, body in enumerate(bodies):
        w.add(i, body)
        kept: list[int] = []
        total = 0
        for j in range(i, -1, -1):
            if kept and (len(kept) + 1 > limit or total + len(bodies[j]) > limit_bytes):
                break
            kept.insert(0, j)
            total += len(bodies[j])
        assert [k for k, _ in w] == kept
        assert w.size == total == sum(len(b) for _, b in w)
