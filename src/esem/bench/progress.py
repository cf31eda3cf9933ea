"""Where a benchmark is, on stderr: progress bars with an ETA on a terminal, plain lines
elsewhere, nothing with ``--quiet``.

A benchmark's run is a *phase* of known *steps* (each configuration it measures); a step
may last a known wall time (a throughput run of S seconds), and then its bar fills with
the clock. On a terminal (``rich.progress``) each step prints its line above the bar,
and the bar shows how far the phase is (steps done of all, filling with the clock during
a timed step), the time elapsed and an estimate of the time left; the bar disappears
when the phase ends. Off a terminal (CI logs, pipes) every step is one line with the
elapsed time, its number and, once a step has finished, an estimate of the time left;
no ANSI codes. ``--quiet`` prints no progress at all (errors still go to stderr).
stdout stays the tables or the JSON.

Only the measuring parent process reports progress; forked workers never touch it.
Updates happen between measured spans, never inside one.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_T0 = time.monotonic()
_quiet = False
_live: Progress | None = None
_depth = 0  # phases open (``all`` runs each benchmark's phase inside its own)
_lock = threading.Lock()


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no progress lines or bars from now on."""
    global _quiet
    _quiet = quiet


def bars_enabled() -> bool:
    """Bars only on a terminal, and never with ``--quiet``."""
    return not _quiet and Console(stderr=True).is_terminal


def _stamp(message: str) -> str:
    return f"[{time.monotonic() - _T0:6.1f}s] {message}"


def progress(message: str) -> None:
    """One line on stderr (above the bars when they are shown)."""
    if _quiet:
        return
    live = _live
    if live is not None:
        live.console.print(Text(_stamp(message)), highlight=False)
    else:
        print(_stamp(message), file=sys.stderr, flush=True)


def _eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Phase:
    """One benchmark's run: ``steps`` steps, announced one by one with ``step``."""

    def __init__(self, title: str, steps: int) -> None:
        self.title = title
        self.total = max(1, steps)
        self.done = 0  # steps finished
        self.started = time.monotonic()
        self._current = ""
        self._step_started = self.started
        self._step_seconds: float | None = None
        self._task: TaskID | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # -- the two renderings

    def _open(self) -> None:
        global _live, _depth
        if not bars_enabled():
            return
        with _lock:
            if _live is None:
                _live = Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)
                _live.start()
            _depth += 1
            self._task = _live.add_task(self.title, total=self.total)
        self._ticker = threading.Thread(target=self._tick, name="bench-progress",
                                        daemon=True)
        self._ticker.start()

    def _close(self) -> None:
        global _live, _depth
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with _lock:
            if self._task is None or _live is None:
                return
            _live.remove_task(self._task)
            _depth -= 1
            if _depth == 0:
                _live.stop()
                _live = None

    def _tick(self) -> None:
        """Fill a timed step's share of the bar with the clock (a thread: the measuring
        loop itself must not be interrupted)."""
        while not self._stop.wait(0.2):
            self._update()

    def _update(self) -> None:
        live, task = _live, self._task
        if live is None or task is None:
            return
        part = 0.0
        if self._step_seconds:
            part = min(0.99, (time.monotonic() - self._step_started) / self._step_seconds)
        live.update(task, completed=self.done + part)

    # -- the API

    def step(self, message: str, seconds: float | None = None) -> None:
        """Finish the step in progress (if any) and start the next, described by
        ``message``; ``seconds``: its expected wall time, when known."""
        if self._current:
            self.done = min(self.total, self.done + 1)
        self._current, self._step_started, self._step_seconds = (
            message, time.monotonic(), seconds)
        if _quiet:
            return
        if self._task is not None:  # the step's line above the bar, the bar below it
            progress(message)
            self._update()
            return
        where = f"step {min(self.done + 1, self.total)}/{self.total}"
        if self.done:
            per_step = (time.monotonic() - self.started) / self.done
            where += f", about {_eta(per_step * (self.total - self.done))} left"
        progress(f"{message} ({where})")

    def message(self, text: str) -> None:
        """A line that is not a step (a note, a skipped part)."""
        progress(text)


@contextlib.contextmanager
def phase(title: str, steps: int) -> Iterator[Phase]:
    """A phase of ``steps`` steps; its bar (on a terminal) lasts as long as the block."""
    p = Phase(title, steps)
    p._open()
    try:
        yield p
    finally:
        p._close()
