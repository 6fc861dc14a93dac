"""The proxy's operator view in one object (mitmproxy-free): the :class:`Observer` of finished
requests, the replica's status, the scrape-time gauges and the status server. The addon's hooks
only dispatch here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from .. import __version__
from .metrics import PROXY, ProxyMetrics, StateCollector
from .observer import Observer
from .page import PageData, render
from .server import StatusServer
from .status import ReplicaStatus, StatusReader

log = logging.getLogger("sgcache.ops")


class Operations:
    """Metrics, access log, status page and health for the proxy serving ``replica``
    (a :class:`cache.proxy.replica.Replica`)."""

    def __init__(self, replica: Any, metrics: ProxyMetrics = PROXY) -> None:
        self.replica = replica
        self.metrics = metrics
        self.observer = Observer(self.known_types, metrics)
        self.status = StatusReader(replica)
        self.server: StatusServer | None = None
        self.started = time.time()
        #: The audit's rows for the page (None: not enabled); set by the audit when it runs.
        self.audit: Callable[[], Sequence[tuple[str, str]] | None] = lambda: None
        self._gauges = StateCollector(self.gauges)
        self._registered = False

    def known_types(self) -> Collection[str]:
        service = self.replica.service
        return service.schema.entities.keys() if service is not None else ()

    # -- the status server ---------------------------------------------------------------
    def serve(self, hostport: str) -> None:
        """Serve the status page, ``/metrics`` and ``/healthz`` on ``hostport`` (empty: stop)."""
        self.stop()
        if not self._registered:
            self.metrics.collect_from(self._gauges)
            self._registered = True
        if not hostport.strip():
            return
        try:
            self.server = StatusServer(hostport, self.metrics.registry, self.status.status, self.page).start()
        except (OSError, ValueError) as exc:  # the proxy serves on: its status port is its own business
            log.warning("sgcache: cannot serve the status page on %s: %s", hostport, exc)

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()

    def close(self) -> None:
        self.stop()
        if self._registered:
            self.metrics.registry.unregister(self._gauges)
            self._registered = False

    def page(self) -> str:
        service = self.replica.service
        snapshot: dict[str, Any] = service.counters.snapshot() if service is not None else {}
        return render(PageData(status=self.status.status(counts=True), recent=self.observer.recent.window_totals(),
                               totals_hits=int(snapshot.get("hits", 0)), totals_passes=dict(snapshot.get("passes", {})),
                               version=__version__, audit=self.audit(), started=self.started))

    def gauges(self) -> dict[str, tuple[str, float | None]]:
        """The scrape-time gauges, from the replica's status (at most a second old)."""
        s: ReplicaStatus = self.status.status()
        return {
            "sgcache_replica_up": ("1 when the replica's database answers", float(s.reachable)),
            "sgcache_replica_fresh": ("1 when reads are served: replica reachable, site known, heartbeat within "
                                      "sgcache_max_lag (as /healthz)", float(s.healthy)),
            "sgcache_replica_lag_seconds": ("Age of the ingester's heartbeat (its last successful poll)",
                                            s.heartbeat_age),
            "sgcache_replica_max_lag_seconds": ("sgcache_max_lag (0: no check)", s.max_lag),
            "sgcache_newest_event_age_seconds": ("Age of the newest event applied (SG's clock); grows on an "
                                                 "idle site", s.newest_event_age),
            "sgcache_breaker_open": ("1 while the database breaker is open (reads pass db-backoff)",
                                     float(s.breaker_open)),
            "sgcache_event_cursor": ("Every event id at or below it is applied", s.event_cursor),
            "sgcache_primed_types": ("Cached types whose full scan completed", float(len(s.primed))),
        }
