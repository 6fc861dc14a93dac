"""When the ingester has caught up past a proxy's write, and when the change log may be pruned.

A proxy stores SG's answer to a write at once and leaves a record in the change log
(``sgcache_changes``, source ``proxy``) on every row it wrote. Until the ingester has applied
every event older than that write, an event on such a row may be older than the row
(cache/ingest/apply.py reads SG's row instead of applying it). The ingester knows it is past the
write as the pending-write markers do (cache/replica/pending.py): once a poll that reached the end
of the log started ``MARGIN`` seconds after the write was committed.

Each poll notes the change log's newest ``seq`` before it reads the database clock; every record
at or below it was committed before the poll started. When a later poll that reached the end of
the log started ``MARGIN`` seconds after that one, those records are settled: the ingester stores
the ``seq`` as ``CHANGES_SETTLED``. Marks kept in memory are lost with a restart, which only delays
the settling by one poll interval.

The change log itself is read only by writers comparing it with a mark they took seconds before
(``Store.change_mark``) and by this settling: records settled and older than ``keep`` seconds
are deleted, a slice of ids at a time, but the newest record: SQLite numbers the next one from the
largest left, so an emptied log would number new records below the settled mark.
"""

from __future__ import annotations

import collections
import logging
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..replica import pending
from ..replica.statekeys import CHANGES_SETTLED
from ..replica.store import Store

log = logging.getLogger("sgcache.events")

#: Poll marks kept (a backlog polls many times before it catches up: the oldest go first, which
#: only delays the settling).
MAX_MARKS = 1000
#: Seconds the change log keeps settled records (a mark older than this is never compared).
CHANGES_KEEP = 3600.0
#: Records deleted by one statement of the pruning.
PRUNE_SLICE = 10_000


class Settling:
    """The settled mark of the change log, moved by the polls that reach the end of the log."""

    def __init__(self, store: Store, keep: float = CHANGES_KEEP):
        self.store = store
        self.keep = keep
        self._marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=MAX_MARKS)
        self._settled: int | None = None
        # (monotonic time, settled mark) samples: what was settled ``keep`` seconds ago may go
        self._history: collections.deque[tuple[float, int]] = collections.deque(maxlen=MAX_MARKS)
        self._prunable = 0  # settled ``keep`` seconds ago: the records at or below it may go
        self._pruned = 0

    def poll_started(self, started: float, mark: int) -> None:
        """A poll started at ``started`` (the database clock, ``pending.poll_started``), when the
        change log's newest ``seq`` (read before that clock) was ``mark``."""
        self._marks.append((started, mark))

    def caught_up(self, conn: Connection, started: float) -> None:
        """A poll that started at ``started`` reached the end of the log: settle what it covers,
        and prune what was settled ``keep`` seconds ago (one transaction on ``conn``)."""
        cut = started - pending.MARGIN
        covered = [mark for at, mark in self._marks if at <= cut]
        if not covered:
            return
        mark = max(covered)
        while self._marks and self._marks[0][0] <= cut:
            self._marks.popleft()
        with conn.begin():
            if self._settled is None:
                stored = self.store.get_state(conn, CHANGES_SETTLED)
                self._settled = stored if isinstance(stored, int) else 0
            if mark > self._settled:
                self.store.set_state(conn, CHANGES_SETTLED, mark)
                self._settled = mark
                self._history.append((time.monotonic(), mark))
            self._prune(conn)

    def _prune(self, conn: Connection) -> None:
        """Delete one slice of the records settled more than ``keep`` seconds ago."""
        now = time.monotonic()
        while self._history and now - self._history[0][0] >= self.keep:
            self._prunable = self._history.popleft()[1]
        if self._prunable <= self._pruned:
            return
        table = self.store.changes
        if not self._pruned:  # the first slice starts at the oldest record kept
            self._pruned = int(conn.execute(sa.select(sa.func.min(table.c.seq))).scalar() or 1) - 1
        # the newest record stays: SQLite numbers the next one from the largest left (from 1 in an
        # empty table), which would put new records at or below CHANGES_SETTLED and writers' marks
        newest = int(conn.execute(sa.select(sa.func.max(table.c.seq))).scalar() or 0)
        upto = min(self._prunable, self._pruned + PRUNE_SLICE, newest - 1)
        if upto <= self._pruned:
            return
        res = conn.execute(sa.delete(table).where(table.c.seq <= upto))
        self._pruned = upto
        if res.rowcount:
            log.debug("change log: %d records up to seq %d pruned", res.rowcount, upto)
