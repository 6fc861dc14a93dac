"""The replica's state as an operator sees it (status page, ``/healthz``, scrape-time gauges).

Read from the database on demand, off mitmproxy's event loop (the status server's thread), and
kept for :data:`TTL` seconds so a busy load balancer or a refreshing page costs one read a
second. Row counts (one ``count(*)`` per primed type) are read only for the page, at most every
:data:`COUNTS_TTL` seconds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ..private import redact, safe_url, url_secrets
from ..replica.pending import db_clock
from ..replica.statekeys import EVENT_CURSOR, EVENT_HIGH, INGESTER_HEARTBEAT, INGESTER_LEADER, SG_CLOCK
from ..replica.store import entity_table_name
from ..wire import seconds_since

#: Seconds a status read is reused.
TTL = 1.0
#: Seconds row counts are reused (a ``count(*)`` of a big table takes a while).
COUNTS_TTL = 30.0


@dataclass
class ReplicaStatus:
    """What the replica says about itself, and why it cannot answer (``problem``)."""

    site: str | None = None
    db: str = ""
    problem: str | None = None  # None: reachable and fresh
    reachable: bool = False
    breaker_open: bool = False
    max_lag: float = 0.0
    heartbeat_age: float | None = None
    newest_event_age: float | None = None
    leader: dict[str, Any] | None = None
    event_cursor: int | None = None
    event_high: int | None = None
    primed: dict[str, int | None] = field(default_factory=dict)  # type -> active rows (None: not counted)
    read_at: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.problem is None


class StatusReader:
    """Reads :class:`ReplicaStatus` through ``replica`` (a :class:`cache.proxy.replica.Replica`)."""

    def __init__(self, replica: Any) -> None:
        self.replica = replica
        self._lock = threading.Lock()
        self._cached: dict[bool, ReplicaStatus] = {}
        self._counts: dict[str, int] = {}
        self._counts_at: float | None = None

    def status(self, counts: bool = False) -> ReplicaStatus:
        """The replica's status, at most :data:`TTL` seconds old (``counts``: with row counts)."""
        now = time.monotonic()
        with self._lock:
            cached = self._cached.get(counts)
            if cached is not None and now - cached.read_at < TTL:
                return cached
            status = self._read(counts)
            status.read_at = now
            self._cached[counts] = status
            return status

    def _read(self, counts: bool) -> ReplicaStatus:
        replica = self.replica
        options = replica.options
        out = ReplicaStatus(site=str(replica.site) if replica.site else None,
                            db=safe_url(options.db_url) if options else "",
                            max_lag=options.max_lag if options else 0.0)
        service = replica.service
        if service is None:
            out.problem = "replica not open (database unreachable, or another site's): every request passes"
            return out
        out.breaker_open = service.breaker_open()
        try:
            recount = counts and (self._counts_at is None or time.monotonic() - self._counts_at >= COUNTS_TTL)
            with service.store.engine.connect() as conn:
                _read_state(service.store, conn, out, recount)
            out.reachable = True
            if recount:
                self._counts = {t: n for t, n in out.primed.items() if n is not None}
                self._counts_at = time.monotonic()
            elif counts:
                out.primed = {t: self._counts.get(t) for t in out.primed}
        except Exception as exc:  # noqa: BLE001 - the page and the probe say why, never raise
            text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            detail = redact(f"{type(exc).__name__}: {text[0] if text else ''}", url_secrets(options.db_url))
            out.problem = f"database error: {detail[:200]}"
            return out
        if out.site is None:
            out.problem = "no SG site known: every request passes (no-site)"
        elif out.breaker_open:
            out.problem = "database failing: the proxy leaves it alone for a while (db-backoff)"
        elif out.max_lag > 0 and (out.heartbeat_age is None or out.heartbeat_age > out.max_lag):
            age = "missing" if out.heartbeat_age is None else f"{out.heartbeat_age:.1f}s old"
            out.problem = f"stale: ingester heartbeat {age} (max lag {out.max_lag:g}s); reads pass"
        return out


def _read_state(store: Any, conn: Any, out: ReplicaStatus, counts: bool) -> None:
    # the heartbeat is stamped with the database server's clock (cache/ingest/poll.py): aged by it
    out.heartbeat_age = seconds_since(store.get_state(conn, INGESTER_HEARTBEAT), db_clock(conn))
    out.newest_event_age = seconds_since(store.get_state(conn, SG_CLOCK), time.time())
    leader = store.get_state(conn, INGESTER_LEADER)
    out.leader = leader if isinstance(leader, dict) else None
    out.event_cursor = _int(store.get_state(conn, EVENT_CURSOR))
    out.event_high = _int(store.get_state(conn, EVENT_HIGH))
    for entity_type in sorted(store.primed_fields(conn)):
        rows = None
        if counts:
            table = store.metadata.tables.get(entity_table_name(entity_type))
            if table is not None:
                query = sa.select(sa.func.count()).select_from(table).where(sa.not_(table.c._retired))
                rows = int(conn.execute(query).scalar() or 0)
        out.primed[entity_type] = rows


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def this_process() -> str:
    """``pid@host``, as the page shows who serves it."""
    return f"{os.getpid()}@{socket.gethostname()}"
