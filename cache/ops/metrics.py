"""Prometheus metrics (``prometheus_client``), every name ``sgcache_*``.

Each process has its own registry and endpoint: the proxy's (:data:`PROXY`, served on
``sgcache_status``), the ingester's (:class:`IngestMetrics`) and the scanner's
(:class:`ScanMetrics`), both served by :func:`serve` for ``--metrics HOST:PORT``. Several
mitmdump processes on one host each serve their own port; Prometheus adds them up.

Label values are bounded: entity types are the cached schema's (others are ``other``), reasons
the proxy's own fixed pass reasons.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("sgcache.ops")

#: Latency buckets (seconds): hits take milliseconds, passes what SG takes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ProxyMetrics:
    """The proxy's metrics, in their own registry (one per process: see :data:`PROXY`)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.hits = Counter("sgcache_hits", "API3 reads answered from the replica", ["entity_type"], registry=r)
        self.passes = Counter("sgcache_passes", "API3 requests passed to SG (or refused), by X-SGCache reason",
                              ["reason", "entity_type"], registry=r)
        self.hit_seconds = Histogram("sgcache_hit_service_seconds",
                                     "Time to answer a hit: worker queue, SQL and encoding",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("sgcache_request_seconds",
                                         "End-to-end time of an API3 request, from its first byte to its answer",
                                         ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.read_db_seconds = Histogram("sgcache_read_db_seconds",
                                         "Time a read spent in the replica's database (plan, SQL, rows), hit or pass",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("sgcache_upstream_errors",
                                       "SG unreachable (connect, TLS, DNS), dropped requests and 5xx answers",
                                       ["kind"], registry=r)
        self.connections = Gauge("sgcache_client_connections", "Open client connections", registry=r)
        # The audit (shadow reads) registers its own sgcache_audit_* counters in this registry.

    def collect_from(self, collector: Collector) -> None:
        """Register a collector read at scrape time (replica state, breaker)."""
        self.registry.register(collector)


#: The proxy's metrics (mitmdump loads the addon once per process).
PROXY = ProxyMetrics()


class StateCollector(Collector):
    """Gauges computed at scrape time from ``read()``: {name: (help, value)}; None values are left out."""

    def __init__(self, read: Callable[[], dict[str, tuple[str, float | None]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            values = self.read()
        except Exception as exc:  # noqa: BLE001 - a scrape never fails for a state it cannot read
            log.debug("state for metrics not readable: %s", exc)
            values = {}
        for name, (text, value) in values.items():
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)


class IngestMetrics:
    """``scripts/ingest-events``: events applied, polls and failed polls, leadership, last good poll."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.events = Counter("sgcache_ingester_events_applied", "Events applied to the replica", registry=r)
        self.polls = Counter("sgcache_ingester_polls", "Successful polls of SG's event log", registry=r)
        self.polls_failed = Counter("sgcache_ingester_polls_failed", "Polls that failed (SG or the database)",
                                    ["kind"], registry=r)
        self.leader = Gauge("sgcache_ingester_leader", "1 while this process holds the leader lock", registry=r)
        self.last_poll = Gauge("sgcache_ingester_last_poll_timestamp_seconds",
                               "Unix time of the last successful poll (the heartbeat)", registry=r)

    def polled(self, applied: int) -> None:
        self.polls.inc()
        self.events.inc(applied)
        self.last_poll.set(time.time())

    def failed(self, kind: str) -> None:
        self.polls_failed.labels(kind=kind).inc()


class ScanMetrics:
    """``scripts/scan``: passes done and failed, rows read, time of the last good pass."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.passes = Counter("sgcache_scan_passes", "Scan or reconcile passes completed", ["kind"], registry=r)
        self.failed = Counter("sgcache_scan_passes_failed", "Scan or reconcile passes that failed", registry=r)
        self.last_pass = Gauge("sgcache_scan_last_pass_timestamp_seconds",
                               "Unix time the last scan or reconcile pass completed", registry=r)

    def done(self, kind: str) -> None:
        self.passes.labels(kind=kind).inc()
        self.last_pass.set(time.time())


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9180`` for IPv6) as (host, port); ValueError when it is not one."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def serve(hostport: str, registry: CollectorRegistry, what: str) -> Any:
    """Serve ``registry`` on ``http://HOST:PORT/metrics`` in a daemon thread (sidecars), bounded as
    the status server is (idle connections closed, at most so many at once: cache/ops/server.py);
    logs the address (port 0: the one the system chose). Returns the server."""
    from .server import serve_metrics  # (it imports this module)

    host, port = parse_hostport(hostport)
    server = serve_metrics(host, port, registry)
    log.info("%s metrics at http://%s:%d/metrics", what, host, server.server_address[1])
    return server

