"""Log budgets: a token bucket per session (and per uid for connection events).

Every line the service logs about a session is something that session can make it write.
Unbudgeted, one connection sending refused requests grew the log by 2.1 MB/s. A bucket
lets a burst through (a real problem usually shows in its first lines), then a few lines
per second; what it drops is counted and reported in one "suppressed N lines" line when
the bucket lets a line through again, or when the session ends. Time is passed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

LOG_BURST = 20  # lines a session may log at once
LOG_RATE = 2.0  # lines per second after the burst


@dataclass(slots=True)
class LogBucket:
    """A token bucket of log lines. ``suppressed`` counts lines dropped since the last
    line that got through."""

    burst: float = LOG_BURST
    rate: float = LOG_RATE
    tokens: float = LOG_BURST
    stamp: float | None = None
    suppressed: int = 0
    suppressed_total: int = 0

    def take(self, now: float) -> bool:
        """Spend a token if there is one (refilled at ``rate`` since the last call)."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        self.suppressed_total += 1
        return False

    def log(self, logger: logging.Logger, level: int, who: str, now: float,
            msg: str, *args: object) -> None:
        """Log ``msg % args`` if the budget allows, first saying how many lines it had
        to drop before. ``who`` names the session in that line. Arguments must already
        be safe to print (``esem.safe_text.printable`` for anything a peer chose)."""
        if not logger.isEnabledFor(level):
            return
        if not self.take(now):
            return
        self.flush(logger, who)
        logger.log(level, msg, *args)

    def flush(self, logger: logging.Logger, who: str) -> None:
        """Report what was dropped since the last line, if anything (e.g. at the end)."""
        if self.suppressed:
            logger.warning("%s: suppressed %d log lines (rate limit %d, then %g/s)",
                           who, self.suppressed, int(self.burst), self.rate)
            self.suppressed = 0
