"""A signal handler that raises anywhere inside the client: never a hang, never "tampering".

Python runs a handler in the main thread between any two bytecodes, so one that raises
can strike inside the client's own code: between taking the reader role and reading,
between reading bytes and filing their replies, in the middle of parsing. The exact
path (a handler raising while a wait is blocked in its poll) is tested in
``test_failures.py``; this is everything else. What is promised there is an error and
nothing worse: the session may have to end (``ServiceUnavailable``) if bytes were taken
off the connection and not filed, but it never hangs (the reader role used to stay
taken by the interrupted thread, and its next call waited forever for a reader that did
not exist) and never reports the interruption as ``IntegrityError`` (parsing on after a
hole in the stream used to fail authentication).
"""

from __future__ import annotations

import collections
import os
import signal
from types import FrameType
from typing import Any

from esem import O_CREAT, O_EXCL, USE_ESEM, BusyError, EsemSemaphore, sem_open
from esem.errors import IntegrityError, ServiceUnavailable, SignalError

from . import reap, spawn

CREX = O_CREAT | O_EXCL
ROUNDS = 400
_CLIENT_CODE = (f"{os.sep}esem{os.sep}client{os.sep}", f"{os.sep}esem{os.sep}protocol{os.sep}")


class Alarm(Exception):
    pass


def _in_client_code(frame: FrameType | None) -> bool:
    return frame is not None and any(p in frame.f_code.co_filename for p in _CLIENT_CODE)


def test_raising_handler_inside_the_client_never_hangs_nor_reports_tampering(
        service: Any, sem_name: str) -> None:
    opened = sem_open(sem_name, CREX, 0o600, 0, flags=USE_ESEM)
    assert isinstance(opened, EsemSemaphore)

    def child() -> int:
        sem = sem_open(sem_name, flags=USE_ESEM)  # this child's own session
        seen: collections.Counter[str] = collections.Counter()
        calm = [False]  # a SIGALRM already pending when the timer stops still arrives

        def handler(signum: int, frame: FrameType | None) -> None:
            if not calm[0] and _in_client_code(frame):  # inside the client: the hard places
                raise Alarm

        signal.signal(signal.SIGALRM, handler)
        storm = (signal.ITIMER_REAL, 50e-6, 50e-6)
        signal.setitimer(*storm)
        try:
            for _ in range(ROUNDS):
                try:
                    sem.post()
                    sem.getvalue()
                    sem.trywait()
                except (Alarm, SignalError, BusyError):
                    seen["interrupted"] += 1
                except IntegrityError as exc:
                    print(f"interruption reported as tampering: {exc!r}")
                    return 2
                except ServiceUnavailable:
                    seen["session ended"] += 1
                    calm[0] = True  # a calm handshake, then on
                    sem = sem_open(sem_name, flags=USE_ESEM)
                    calm[0] = False
        finally:
            calm[0] = True
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(dict(seen))
        return 0 if seen else 3  # 3: no signal ever landed in the client's code

    assert reap(spawn(child), timeout=60) == 0

