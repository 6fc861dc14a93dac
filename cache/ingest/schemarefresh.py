"""Schema events: when the site's schema changes, cached fields it touched are re-checked.

A schema (``DisplayColumn``) event only records the field name in ``schema_pending``, in the
poll's transaction. After the poll :meth:`SchemaRefresh.process` reads the site's schema once:
a cached field that the site deleted or whose type changed is un-primed (its reads pass until
the schema file is updated and the type rescanned) and no longer fetched, and a
named field that is still the same is read again for every row, active and retired, and primed
again (an un-primed one of a primed type too: a re-check that failed half-way, a proxy's
``schema_field_update``). The pending names are cleared only after that work, so a crash repeats it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..replica import fieldtypes
from ..replica.schema import Schema
from ..replica.statekeys import SCHEMA_PENDING
from ..replica.store import Store
from ..wire import chunks, to_wire
from .config import SGClient
from .eventwire import FETCH_CHUNK

log = logging.getLogger("sgcache.events")

FieldKey = tuple[str, str]


class SchemaRefresh:
    """Schema events noted during a poll, and the re-check of the cached fields after it."""

    def __init__(self, store: Store, sg: SGClient | None, connect: Callable[[], Connection]):
        self.store = store
        self.sg = sg
        self.connect = connect
        #: Cached fields the site deleted or changed the type of (un-primed): fetches leave them out.
        self.missing_fields: set[FieldKey] = set()

    def note_event(self, conn: Connection, event: Mapping[str, Any]) -> None:
        """Record the field a schema event names (``*`` when none) in the poll's transaction."""
        entity = event.get("entity")
        name = entity.get("name") if isinstance(entity, Mapping) else None
        marker = name if isinstance(name, str) and name else "*"
        self._add_pending(conn, marker)
        log.info("schema event %s (%s): the site's schema will be re-read", event.get("event_type"), marker)

    def request(self) -> None:
        """Ask for a re-read of the site's schema without an event (``*``: no field to re-fetch):
        the fetcher does when SG refuses a fetch or sends rows that cannot be stored."""
        conn = self.connect()
        with conn.begin():
            self._add_pending(conn, "*")

    def _add_pending(self, conn: Connection, marker: str) -> None:
        pending = self.store.get_state(conn, SCHEMA_PENDING) or []
        if marker not in pending:
            pending.append(marker)
            self.store.set_state(conn, SCHEMA_PENDING, pending)

    def process(self) -> None:
        """Re-read the site's schema after schema events; un-prime or re-fetch affected cached fields."""
        conn = self.connect()
        with conn.begin():
            pending = self.store.get_state(conn, SCHEMA_PENDING)
        if not pending or self.sg is None:
            return
        site = Schema.from_schema_read(to_wire(self.sg.schema_read()))
        names = set(pending)
        refetch: list[FieldKey] = []
        with conn.begin():
            primed = self._primed_field_set(conn)
            # a named field of a primed type is read again even when un-primed already: by an
            # earlier re-check that failed or died before reading it, or by a proxy that saw SG
            # change it (schema_field_update); left un-primed, its reads would pass for good
            primed_types = set(self.store.primed_fields(conn))
            for entity in self.store.schema.entities.values():
                for fname, fschema in entity.fields.items():
                    if fname == "id" or not fieldtypes.is_cached_type(fschema.data_type):
                        continue
                    theirs = site.field(entity.name, fname)
                    key = (entity.name, fname)
                    if theirs is None or theirs.data_type != fschema.data_type:
                        self._unprime(conn, key, theirs.data_type if theirs else None, fschema.data_type)
                        # a value of the new type does not fit the column: fetching it would
                        # make the write path refuse the whole row
                        self.missing_fields.add(key)
                    elif fname in names and (key in primed or entity.name in primed_types):
                        refetch.append(key)
                        self.missing_fields.discard(key)  # the site has it again, with our type
                        self._set_field_primed(conn, key, False)
        for key in refetch:
            self._refetch_field(key)
        with conn.begin():
            left = [n for n in (self.store.get_state(conn, SCHEMA_PENDING) or []) if n not in names]
            self.store.set_state(conn, SCHEMA_PENDING, left or None)

    def _primed_field_set(self, conn: Connection) -> set[FieldKey]:
        f = self.store.fields
        return {(r.entity_type, r.field_name)
                for r in conn.execute(sa.select(f.c.entity_type, f.c.field_name).where(f.c.primed))}

    def _set_field_primed(self, conn: Connection, key: FieldKey, primed: bool) -> None:
        f = self.store.fields
        conn.execute(f.update().where((f.c.entity_type == key[0]) & (f.c.field_name == key[1]))
                     .values(primed=primed))

    def _unprime(self, conn: Connection, key: FieldKey, theirs: str | None, ours: str) -> None:
        self._set_field_primed(conn, key, False)
        log.error("field %s.%s changed on the site (%s -> %s): reads of it pass through until the "
                  "schema file is updated and the type rescanned", key[0], key[1], ours, theirs or "deleted")

    def _refetch_field(self, key: FieldKey) -> None:
        """Read one field of every row (active and retired) again, then serve it again. A row
        another writer changed after SG was read (a proxy learned a client's write) is not written
        over but queued for a fetch (its type's reads pass until it is read again)."""
        entity_type, fname = key
        conn = self.connect()
        for retired in (False, True):
            with conn.begin():
                mark = self.store.change_mark(conn)
            rows = [to_wire(r) for r in self.sg.find(entity_type, [], ["id", fname],  # type: ignore[union-attr]
                                                     retired_only=retired)]
            for chunk in chunks(rows, FETCH_CHUNK):
                with conn.begin():
                    newer = self.store.changed_since(conn, entity_type, [int(r["id"]) for r in chunk], mark)
                    res = self.store.write_entities(conn, entity_type,
                                                    [r for r in chunk if int(r["id"]) not in newer], "fetch")
                    again = [*(res.to_fetch or []), *((entity_type, i) for i in sorted(newer))]
                    if again:
                        self.store.queue_fetch(conn, again, "field refetch")
        with conn.begin():
            self._set_field_primed(conn, key, True)
        log.info("field %s.%s re-read after a schema change", entity_type, fname)
