"""Re-reading queued entities from SG (the fetch queue, :mod:`cache.replica.fetchqueue`), after each poll.

Invariant kept here: never lose an update. Entities are read per type, ``id in [...]`` first
and ``retired_only`` for the rest, and written whole (``complete`` unless the site lost a
cached field) in one transaction with the removal of their queue entries; an entry queued
again while SG was read is kept (:func:`cache.replica.fetchqueue.remove_handled`). An entity SG has
neither active nor retired is dropped from the queue with a warning.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from sqlalchemy.engine import Connection

from ..replica import fetchqueue, fieldtypes
from ..replica.store import Store
from ..wire import chunks, to_wire
from .config import SGClient
from .eventwire import FETCH_CHUNK, id_ranges

log = logging.getLogger("sgcache.events")


class Fetcher:
    """Reads the entities waiting in the fetch queue from SG into the replica."""

    def __init__(self, store: Store, sg: SGClient | None, connect: Callable[[], Connection],
                 missing_fields: set[tuple[str, str]]):
        self.store = store
        self.sg = sg
        self.connect = connect
        self.missing_fields = missing_fields  # shared with the schema refresh, which fills it

    def fetch_fields(self, entity_type: str) -> list[str]:
        """The fields a fetch asks for: the type's cached fields that the site still has."""
        entity = self.store.schema.entities[entity_type]
        return sorted(f for f, s in entity.fields.items()
                      if fieldtypes.is_cached_type(s.data_type) and (entity_type, f) not in self.missing_fields)

    def process(self, limit: int = 5000) -> int:
        """Re-read queued entities from SG, grouped per type; returns how many were handled."""
        if self.sg is None:
            return 0
        conn = self.connect()
        q = self.store.fetch_queue
        with conn.begin():
            queued_by_type = fetchqueue.entries(conn, q, limit)
        for entity_type, queued in queued_by_type.items():
            if entity_type not in self.store.tables:  # the schema file lost the type meanwhile
                with conn.begin():
                    fetchqueue.remove_handled(conn, q, entity_type, queued)
                continue
            for chunk in chunks(sorted(queued), FETCH_CHUNK):
                self._fetch_chunk(conn, entity_type, {i: queued[i] for i in chunk})
        return sum(len(queued) for queued in queued_by_type.values())

    def _fetch_chunk(self, conn: Connection, entity_type: str, queued: dict[int, dt.datetime]) -> None:
        fields = self.fetch_fields(entity_type)
        ids = sorted(queued)
        sg = self.sg
        assert sg is not None
        active = [to_wire(r) for r in sg.find(entity_type, [["id", "in", ids]], fields)]
        missing = sorted(set(ids) - {int(r["id"]) for r in active})
        retired = [to_wire(r) for r in sg.find(entity_type, [["id", "in", missing]], fields, retired_only=True)] \
            if missing else []
        gone = sorted(set(missing) - {int(r["id"]) for r in retired})
        complete = not any(t == entity_type for t, _f in self.missing_fields)
        with conn.begin():
            batch = self.store.batch(conn, "fetch")
            for records, is_retired in ((active, False), (retired, True)):
                batch.put(entity_type, records, complete=complete, retired=is_retired)
            batch.flush()
            fetchqueue.remove_handled(conn, self.store.fetch_queue, entity_type, queued)
        if gone:
            log.warning("%s %s not found on SG (active or retired); dropped from the fetch queue",
                        entity_type, id_ranges(gone))
