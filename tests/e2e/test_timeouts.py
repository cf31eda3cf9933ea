"""``timedwait`` timeouts at the edges, one behaviour for both backends.

``inf`` and any timeout at or beyond ``MAX_TIMEOUT_NS`` (about 292 years) wait without a
deadline, exactly like ``wait()``; NaN and negatives are ``ValueError``; non-numbers are
``TypeError``, raised before anything is sent. (Before: ``OverflowError`` from esem,
``ExistentialError`` or an instant ``BusyError`` from posix_ipc.)
"""

from __future__ import annotations

import math
import threading
from decimal import Decimal
from typing import Any

import pytest

from esem import O_CREAT, O_EXCL, EsemSemaphore, get_client
from esem.legacy import MAX_TIMEOUT_S, timeout_ns
from esem.protocol.constants import MAX_TIMEOUT_NS

from . import stat, wait_for_waiters

pytestmark = pytest.mark.native_backend  # the backend tests run as esem-native too

CREX = O_CREAT | O_EXCL
JOIN_TIMEOUT = 30.0
NO_DEADLINE = [math.inf, 1e300, MAX_TIMEOUT_S, MAX_TIMEOUT_S * 2, 10**400]


def _post_once_queued(sem: Any, name: str, deadlines: list[float | None]) -> threading.Thread:
    """Post ``sem`` from another thread once the wait is queued (esem: as the service
    sees it, recording the wait's deadline; legacy: after a pause, all it can do)."""

    def post() -> None:
        if isinstance(sem, EsemSemaphore):
            wait_for_waiters(name, 1)
            deadlines.append(stat(name)["queue"][0][2])
        else:
            threading.Event().wait(0.2)
        sem.post()

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("seconds", NO_DEADLINE, ids=["inf", "1e300", "max", "2max", "10**400"])
def test_unrepresentable_timeout_waits_like_wait(backend: Any, sem_name: str,
                                                 seconds: float) -> None:
    sem = backend.open(sem_name, CREX, 0o600, 0)
    deadlines: list[float | None] = []
    poster = _post_once_queued(sem, sem_name, deadlines)
    sem.timedwait(seconds)  # returns only through the other thread's post
    poster.join(JOIN_TIMEOUT)
    assert not poster.is_alive()
    assert sem.getvalue() == 0
    if isinstance(sem, EsemSemaphore):
        assert deadlines == [None]  # queued as a plain wait: no deadline at the service


def test_largest_representable_timeout_keeps_a_deadline(backend: Any, sem_name: str) -> None:
    """Just below the limit the wait is still a timed one (the service keeps a deadline)."""
    sem = backend.open(sem_name, CREX, 0o600, 0)
    deadlines: list[float | None] = []
    poster = _post_once_queued(sem, sem_name, deadlines)
    sem.timedwait(MAX_TIMEOUT_S / 2)
    poster.join(JOIN_TIMEOUT)
    assert sem.getvalue() == 0
    if isinstance(sem, EsemSemaphore):
        [deadline] = deadlines
        assert deadline is not None


@pytest.mark.parametrize("seconds, error", [
    (math.nan, ValueError), (-1, ValueError), (-1e-9, ValueError), (-math.inf, ValueError),
    ("1", TypeError), (None, TypeError), (True, TypeError), (Decimal(1), TypeError),
], ids=["nan", "-1", "-1ns", "-inf", "str", "None", "bool", "Decimal"])
def test_bad_timeouts_are_refused_before_anything_is_sent(
        backend: Any, sem_name: str, seconds: Any, error: type[Exception]) -> None:
    sem = backend.open(sem_name, CREX, 0o600, 1)
    sent = get_client().stats.requests if isinstance(sem, EsemSemaphore) else 0
    with pytest.raises(error):
        sem.timedwait(seconds)
    if isinstance(sem, EsemSemaphore):
        assert get_client().stats.requests == sent
    assert sem.getvalue() == 1  # nothing was taken


def test_timeout_ns_rule() -> None:
    assert timeout_ns(0) == 0
    assert timeout_ns(1.5) == 1_500_000_000
    assert timeout_ns(MAX_TIMEOUT_S / 2) == pytest.approx(MAX_TIMEOUT_NS / 2, rel=1e-9)
    assert all(timeout_ns(s) is None for s in NO_DEADLINE)
    assert timeout_ns(math.nextafter(MAX_TIMEOUT_S, 0)) is not None
