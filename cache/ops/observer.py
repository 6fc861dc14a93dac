"""Where each finished API3 request goes: the Prometheus counters and histograms, the recent
window of the status page, and the access log (one :class:`RequestRecord` per request)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from .access import RequestRecord, format_line
from .access import log as access_log
from .metrics import PROXY, ProxyMetrics
from .recent import Recent

log = logging.getLogger("sgcache.ops")

#: The entity-type label of a type outside the cached schema (label values stay bounded).
OTHER = "other"
NONE = "-"


class Observer:
    """Counts and logs finished requests. ``known_types()``: the cached schema's entity types."""

    def __init__(self, known_types: Callable[[], Collection[str]], metrics: ProxyMetrics = PROXY) -> None:
        self.known_types = known_types
        self.metrics = metrics
        self.recent = Recent()
        self.access_format = "logfmt"

    def label(self, entity_type: object) -> str:
        """``entity_type`` as a label value: a cached type's name, ``other``, or ``-`` for none."""
        if not isinstance(entity_type, str) or not entity_type:
            return NONE
        return entity_type if entity_type in self.known_types() else OTHER

    def finished(self, record: RequestRecord) -> None:
        """Count, time and log one finished request."""
        self.count(record)
        self.log(record)

    def count(self, record: RequestRecord) -> None:
        """Count and time one finished request (the metrics and the status page's window)."""
        m = self.metrics
        entity_type = record.entity_type
        if record.outcome == "hit":
            m.hits.labels(entity_type=entity_type).inc()
            if record.service_ms is not None:
                m.hit_seconds.observe(record.service_ms / 1000)
        elif record.reason is not None:
            m.passes.labels(reason=record.reason, entity_type=entity_type).inc()
        m.request_seconds.labels(outcome=record.outcome).observe(record.ms / 1000)
        if record.outcome == "hit" or record.reason is not None:
            self.recent.add(entity_type, None if record.outcome == "hit" else record.reason)

    def log(self, record: RequestRecord) -> None:
        """The request's access-log line (when the access log is on)."""
        if self.access_format != "off":
            access_log.info("%s", format_line(record, self.access_format))

    def upstream_error(self, kind: str) -> None:
        """SG could not be reached, dropped a request, or answered 5xx."""
        self.metrics.upstream_errors.labels(kind=kind).inc()

    def connections(self, delta: int) -> None:
        self.metrics.connections.inc(delta)
