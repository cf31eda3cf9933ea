"""Prometheus metrics of the service (``esem serve --metrics HOST:PORT``).

What is counted as it happens, on the event-loop thread, costs one clock read on each
side of a request and two pre-bound metric updates (a counter and a histogram); the
rest (sessions, waiters, semaphores, per-uid quota use) is read from the table when
Prometheus scrapes, so the hot path never pays for it. prometheus_client serves HTTP
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
    """The service's observer (``Service.observer``) and the metrics registry."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        prom = _require()
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._gauge, self._counter = GaugeMetricFamily, CounterMetricFamily
        self.service = service
        self.loop = loop
        self.registry = prom.CollectorRegistry(auto_describe=False)
        self._requests = prom.Counter(
            "esem_requests", "Requests handled, by opcode and status (OK, a refusal such "
            "as EAGAIN or EACCES, or QUEUED for a wait that queued)",
            ["opcode", "status"], registry=self.registry)
        self._latency = prom.Histogram(
            "esem_request_duration_seconds", "Time to handle one request: parse, table "
            "step, reply sealed (not the socket write)", ["opcode"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self._wait_ends = prom.Counter(
            "esem_queued_wait_ends", "Queued waits that ended, by status (OK granted, "
            "ETIMEDOUT, ECANCELED, EBADF)", ["status"], registry=self.registry)
        self._refused_sessions = prom.Counter(
            "esem_sessions_refused", "Connections refused at the door (session quota)",
            registry=self.registry)
        self._protocol_errors = prom.Counter(
            "esem_protocol_errors", "Sessions closed for breaking the protocol (or "
            "tampering)", registry=self.registry)
        prom.ProcessCollector(registry=self.registry)
        self.registry.register(_TableCollector(self))
        # Children bound once: a labels() lookup costs more than the update itself.
        self._latency_of = {op: self._latency.labels(op.name) for op in Opcode}
        self._counter_of: dict[tuple[Opcode, Status | None], Any] = {}
        self._wait_end_of = {st: self._wait_ends.labels(st.name) for st in Status}
        self._server: Any = None

    # -------------------------------------------------------- observer hooks

    def request(self, op: Opcode, status: Status | None, seconds: float) -> None:
        counter = self._counter_of.get((op, status))
        if counter is None:
            label = QUEUED if status is None else status.name
            counter = self._counter_of[(op, status)] = self._requests.labels(op.name, label)
        counter.inc()
        self._latency_of[op].observe(seconds)

    def wait_ended(self, status: Status) -> None:
        self._wait_end_of[status].inc()

    def session_refused(self) -> None:
        self._refused_sessions.inc()

    def protocol_error(self) -> None:
        self._protocol_errors.inc()

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

    def snapshot(self) -> dict[str, Any]:
        """What the scrape reports from the table; runs on the event-loop thread."""
        quotas = self.service.table.quotas
        return {
            "statistics": self.service.statistics(),
            "use": self.service.table.quota_use(),
            "quotas": {f.name: getattr(quotas, f.name) for f in fields(quotas)},
        }


class _TableCollector:
    """Gauges read from the table at scrape time, through the event loop."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # nothing to check at registration (collect() needs the loop)

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(m.snapshot())
            except BaseException as exc:  # handed to the scraping thread
                future.set_exception(exc)

        m.loop.call_soon_threadsafe(take)
        snap = future.result(timeout=SCRAPE_TIMEOUT)
        stats = snap["statistics"]
        gauge, counter = m._gauge, m._counter
        for name, what in (("connections", "Open client connections"),
                           ("sessions", "Live sessions in the table"),
                           ("semaphores", "Semaphores alive (named, or unlinked and open)"),
                           ("names", "Named semaphores"),
                           ("handles", "Open handles"),
                           ("waiters", "Queued waits")):
            yield gauge(f"esem_{name}", what, value=stats[name])
        yield counter("esem_sessions_started", "Sessions started since the service began",
                      value=stats["sessions_started"])
        for kind, by_uid in sorted(snap["use"].items()):
            family = gauge(f"esem_uid_{kind}", f"{kind.capitalize()} in use per uid "
                           f"(quota: esem_quota{{quota=\"{kind}_per_uid\"}})", labels=["uid"])
            for uid, count in sorted(by_uid.items()):
                family.add_metric([str(uid)], count)
            yield family
        limits = gauge("esem_quota", "Configured quota limits", labels=["quota"])
        for name, limit in sorted(snap["quotas"].items()):
            limits.add_metric([name], limit)
        yield limits


def enable(service: Service, address: str, loop: asyncio.AbstractEventLoop) -> Metrics:
    """Attach metrics to ``service`` and serve them on ``address``."""
    host, port = parse_address(address)
    metrics = Metrics(service, loop)
    bound = metrics.start(host, port)
    service.observer = metrics
    log.info("metrics on http://%s:%d/metrics", *bound)
    return metrics
