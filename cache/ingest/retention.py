"""How long the replica keeps the events it applied (``sgcache_events``).

Every applied event is kept raw: the ingester does not apply an event twice (a gap's event read
again, a sweep), a backref finds its original event there, and ``scripts/reprocess`` replays
them. All of that looks back minutes or hours (the sweep's window, ``given_up_keep``); the table
itself grows with SG's event log, a busy site's hundreds of megabytes a day. So the events older
than ``events_keep`` seconds (SG's clock, their ``created_at``) are deleted, a slice of ids at a
time, at most every :data:`PRUNE_EVERY` seconds, by a poll that reached the end of the log. The
oldest id to keep is found by id (the primary key; ``created_at`` grows with it), so no index on
the time is needed.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..replica.store import Store
from ..wire import format_wire_dt

log = logging.getLogger("sgcache.events")

#: Seconds between two prunings.
PRUNE_EVERY = 600.0
#: Events deleted by one statement.
PRUNE_SLICE = 10_000


class EventRetention:
    """Deletes the applied events older than ``keep`` seconds of SG's time (None or 0: keeps all)."""

    def __init__(self, store: Store, keep: float | None):
        self.store = store
        self.keep = keep
        self._next = 0.0  # time.monotonic() of the next pruning

    def caught_up(self, conn: Connection, sg_now: dt.datetime, cursor: int) -> int:
        """After a poll that reached the end of the log: prune when due; how many events went."""
        if not self.keep or time.monotonic() < self._next:
            return 0
        self._next = time.monotonic() + PRUNE_EVERY
        cutoff = format_wire_dt(sg_now - dt.timedelta(seconds=self.keep))
        deleted = 0
        table = self.store.events
        with conn.begin():
            first = conn.execute(sa.select(sa.func.min(table.c.id))).scalar()
            last = self._last_older_than(conn, cutoff, first, cursor) if first is not None else None
            while first is not None and last is not None and first <= last:
                upto = min(last, first + PRUNE_SLICE - 1)
                deleted += conn.execute(sa.delete(table).where(table.c.id <= upto)).rowcount or 0
                first = upto + 1
        if deleted:
            log.info("pruned %d applied events created before %s (--events-keep %gs)", deleted, cutoff, self.keep)
        return deleted

    def _last_older_than(self, conn: Connection, cutoff: str, low: int, cursor: int) -> int | None:
        """The highest stored event id from ``low`` (the lowest stored) to ``cursor`` created
        before ``cutoff`` (a wire time), found by bisecting the ids (None: there is none)."""
        table = self.store.events
        probe = (sa.select(table.c.id, table.c.created_at)
                 .where((table.c.id >= sa.bindparam("at")) & table.c.created_at.is_not(None))
                 .order_by(table.c.id).limit(1))
        first = conn.execute(probe, {"at": low}).first()
        if first is None or first.created_at >= cutoff:
            return None
        best, high = first.id, cursor
        low = first.id + 1
        while low <= high:
            mid = (low + high) // 2
            row = conn.execute(probe, {"at": mid}).first()
            if row is None or row.id > cursor or row.created_at >= cutoff:
                high = mid - 1
            else:
                best, low = row.id, row.id + 1
        return best
