"""Prometheus metrics of the service (``esem serve --metrics HOST:PORT``).

What is counted as it happens, on the event-loop thread, costs one clock read on each
side of a request and three updates of plain Python counters (no lock: only that thread
writes them); the rest (sessions, waiters, semaphores, per-uid quota use) is read from
the table when Prometheus scrapes, so the hot path never pays for it. prometheus_client serves HTTP
from its own thread; that thread never touches the table: a scrape asks the event loop
for a snapshot and waits for it (``SCRAPE_TIMEOUT`` at most).

No label carries a semaphore name or anything else a tenant chooses: labels are
opcodes, statuses, quota kinds and uids, so a tenant can neither inject text into the
exposition nor blow up its cardinality beyond the uids that hold live objects. The
endpoint shows every tenant's usage to whoever reaches it: bind it to localhost (the
default host) or to an address only the monitoring system reaches.

prometheus_client is the optional extra ``metrics`` (``pip install 'esem[metrics]'``).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import ipaddress
import logging
from collections.abc import Iterable, Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from esem.core.status import Status
from esem.protocol.constants import Opcode

if TYPE_CHECKING:
    from esem.server.service import Service

log = logging.getLogger("esem.server")

DEFAULT_HOST = "127.0.0.1"
SCRAPE_TIMEOUT = 5.0  # seconds a scrape waits for the event loop's snapshot
# Request handling takes tens of microseconds; the buckets resolve that range and the
# outliers (a loaded machine, a big LIST page) up to 100 ms.
LATENCY_BUCKETS = (5e-6, 1e-5, 2e-5, 3e-5, 5e-5, 7.5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3,
                   1e-2, 1e-1)
QUEUED = "QUEUED"  # status label of a WAIT that queued (its end is counted apart)


class MetricsUnavailable(RuntimeError):
    """prometheus_client is not installed."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (host ``DEFAULT_HOST``); port 0 lets the
    system choose (the service logs the port it got). ``ValueError`` otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"metrics address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # ValueError if not
    elif ":" in host:
        raise ValueError(f"metrics address {text!r}: write an IPv6 host as [ADDR]:PORT")
    return host or DEFAULT_HOST, int(port_text)


def _require() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailable(
            "--metrics needs the prometheus_client package: pip install 'esem[metrics]'"
        ) from None
    return prometheus_client


class Metrics:
    """The service's observer (``Service.observer``) and the metrics registry.

    The observer's counts are plain ints and lists touched only on the event-loop
    thread, so the hot path takes no lock (prometheus_client's own Counter and
    Histogram take one per update, which tripled the cost); a scrape copies them on
    the loop thread, with the table's gauges, and builds the metric families there."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        prom = _require()
        self.service = service
        self.loop = loop
        self.registry = prom.CollectorRegistry(auto_describe=False)
        prom.ProcessCollector(registry=self.registry)
        self.registry.register(_Collector(self))
        self.requests: dict[tuple[Opcode, Status | None], int] = {}
        # per opcode: observations per bucket (last: above every bound), and their sum
        self.buckets = {op: [0] * (len(LATENCY_BUCKETS) + 1) for op in Opcode}
        self.seconds = dict.fromkeys(Opcode, 0.0)
        self.wait_ends = dict.fromkeys(Status, 0)
        self.sessions_refused = 0
        self.protocol_errors = 0
        self._server: Any = None

    # -------------------------------------------------------- observer hooks

    def request(self, op: Opcode, status: Status | None, seconds: float) -> None:
        key = (op, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.buckets[op][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds[op] += seconds

    def wait_ended(self, status: Status) -> None:
        self.wait_ends[status] += 1

    def session_refused(self) -> None:
        self.sessions_refused += 1

    def protocol_error(self) -> None:
        self.protocol_errors += 1

    # ---------------------------------------------------------------- HTTP

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port``; returns the address bound."""
        prom = _require()
        self._server, _ = prom.start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------ snapshot

    def snapshot(self) -> list[Any]:
        """Every metric family but the process's; runs on the event-loop thread."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        out: list[Any] = []
        requests = CounterMetricFamily(
            "esem_requests", "Requests handled, by opcode and status (OK, a refusal such "
            "as EAGAIN or EACCES, or QUEUED for a wait that queued)",
            labels=["opcode", "status"])
        def order(item: tuple[tuple[Opcode, Status | None], int]) -> tuple[int, int]:
            op, status = item[0]
            return op, -1 if status is None else status

        for (op, status), count in sorted(self.requests.items(), key=order):
            requests.add_metric([op.name, QUEUED if status is None else status.name], count)
        out.append(requests)
        latency = HistogramMetricFamily(
            "esem_request_duration_seconds", "Time to handle one request: parse, table "
            "step, reply sealed (not the socket write)", labels=["opcode"])
        for op in Opcode:
            counts = self.buckets[op]
            if not any(counts):
                continue
            cumulative, total = [], 0
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                total += n
                cumulative.append((bound, total))
            latency.add_metric([op.name], cumulative, sum_value=self.seconds[op])
        out.append(latency)
        ends = CounterMetricFamily(
            "esem_queued_wait_ends", "Queued waits that ended, by status (OK granted, "
            "ETIMEDOUT, ECANCELED, EBADF)", labels=["status"])
        for status, count in self.wait_ends.items():
            if count:
                ends.add_metric([status.name], count)
        out.append(ends)
        out.append(CounterMetricFamily(
            "esem_sessions_refused", "Connections refused at the door (session quota)",
            value=self.sessions_refused))
        out.append(CounterMetricFamily(
            "esem_protocol_errors", "Sessions closed for breaking the protocol (or "
            "tampering)", value=self.protocol_errors))
        stats = self.service.statistics()
        for name, what in (("connections", "Open client connections"),
                           ("sessions", "Live sessions in the table"),
                           ("semaphores", "Semaphores alive (named, or unlinked and open)"),
                           ("names", "Named semaphores"),
                           ("handles", "Open handles"),
                           ("waiters", "Queued waits")):
            out.append(GaugeMetricFamily(f"esem_{name}", what, value=stats[name]))
        out.append(CounterMetricFamily(
            "esem_sessions_started", "Sessions started since the service began",
            value=stats["sessions_started"]))
        board = self.service.switchboard
        if board is not None and hasattr(board, "statistics"):
            sl = board.statistics()
            out.append(GaugeMetricFamily("esem_switchless_sessions", "Sessions on the "
                                         "switchless rings", value=sl["switchless_sessions"]))
            for key, what in (("wakeups", "Doorbells that woke the switchless poller"),
                              ("passes", "Passes of the switchless poller over the rings"),
                              ("yields", "CPU yields of the idle switchless poller")):
                out.append(CounterMetricFamily(f"esem_switchless_{key}", what,
                                               value=sl[f"switchless_{key}"]))
        for kind, by_uid in sorted(self.service.table.quota_use().items()):
            family = GaugeMetricFamily(
                f"esem_uid_{kind}", f"{kind.capitalize()} in use per uid (quota: "
                f"esem_quota{{quota=\"{kind}_per_uid\"}})", labels=["uid"])
            for uid, count in sorted(by_uid.items()):
                family.add_metric([str(uid)], count)
            out.append(family)
        quotas = self.service.table.quotas
        limits = GaugeMetricFamily("esem_quota", "Configured quota limits", labels=["quota"])
        for f in fields(quotas):
            limits.add_metric([f.name], getattr(quotas, f.name))
        out.append(limits)
        return out


class _Collector:
    """Hands a scrape (on prometheus_client's HTTP thread) to the event loop."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # nothing to check at registration (collect() needs the loop)

    def collect(self) -> Iterator[Any]:
        future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(self.metrics.snapshot())
            except BaseException as exc:  # handed to the scraping thread
                future.set_exception(exc)

        self.metrics.loop.call_soon_threadsafe(take)
        yield from future.result(timeout=SCRAPE_TIMEOUT)


def enable(service: Service, address: str, loop: asyncio.AbstractEventLoop) -> Metrics:
    """Attach metrics to ``service`` and serve them on ``address``."""
    host, port = parse_address(address)
    metrics = Metrics(service, loop)
    bound = metrics.start(host, port)
    service.observer = metrics
    log.info("metrics on http://%s:%d/metrics", *bound)
    return metrics
