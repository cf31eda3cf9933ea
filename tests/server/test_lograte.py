"""The log budget: a burst, then a steady rate, and a count of what was dropped."""

from __future__ import annotations

import logging

import pytest

from esem.server.lograte import LOG_BURST, LOG_RATE, LogBucket


def test_burst_then_rate_then_summary(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("esem.test.lograte")
    bucket = LogBucket()
    with caplog.at_level(logging.INFO, logger="esem.test.lograte"):
        for i in range(1000):  # 1000 lines in the same instant
            bucket.log(logger, logging.INFO, "session 9", 100.0, "line %d", i)
        assert [r.getMessage() for r in caplog.records] == [f"line {i}" for i in range(LOG_BURST)]
        assert bucket.suppressed == 1000 - LOG_BURST
        caplog.clear()
        # Ten seconds later: the summary first, then the line; the refill is capped.
        bucket.log(logger, logging.INFO, "session 9", 110.0, "later")
        messages = [r.getMessage() for r in caplog.records]
        assert messages[0].startswith(f"session 9: suppressed {1000 - LOG_BURST} log lines")
        assert messages[1] == "later"
        assert bucket.tokens == pytest.approx(min(LOG_BURST, 10 * LOG_RATE) - 1)
        caplog.clear()
        bucket.flush(logger, "session 9")  # nothing dropped since: nothing said
        assert not caplog.records


def test_disabled_levels_cost_no_budget() -> None:
    logger = logging.getLogger("esem.test.lograte.quiet")
    logger.setLevel(logging.WARNING)
    bucket = LogBucket()
    for _ in range(100):
        bucket.log(logger, logging.DEBUG, "s", 0.0, "x")
    assert bucket.tokens == LOG_BURST and bucket.suppressed == 0
