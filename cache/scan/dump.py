"""Dump the replica's rows as JSON lines in SG's wire format (the file: cache/scan/dumpformat.py).

The whole dump reads one snapshot of the database (one read transaction), page by page in id
order (a keyset loop), so memory stays bounded by a page and the header's event cursor matches
the rows. It never writes to the replica.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..replica import fieldtypes
from ..replica.dialect import dialect_for
from ..replica.schema import Schema
from ..replica.site import stored_site
from ..replica.statekeys import EVENT_CURSOR
from ..replica.store import Store
from ..wire import chunks
from .dumpformat import (
    FORMAT,
    REGISTRY,
    RETIRED,
    DumpError,
    Redactor,
    encode_line,
    schema_digest,
    type_digest,
)

log = logging.getLogger("sgcache.dump")

PAGE_SIZE = 500
#: Seconds between two progress lines in the log when there is no progress bar.
LOG_EVERY = 10.0


@dataclass
class DumpStats:
    """What a dump wrote: rows per type, and registry lines."""

    rows: dict[str, int] = field(default_factory=dict)
    registry: int = 0

    def summary(self) -> str:
        total = sum(self.rows.values())
        return f"{total} rows of {len(self.rows)} types, {self.registry} registry lines"


def open_replica(url: str, schema: Schema) -> Store:
    """Open an existing replica to read (no table created, no write lock); DumpError when there is none."""
    path = dialect_for(url).database_file(url)
    if path is not None and not Path(path).is_file():
        raise DumpError(f"no replica at {path}")
    store = Store.open(url, schema, create=False)
    try:
        with store.engine.connect() as conn:
            if not sa.inspect(conn).has_table(store.fields.name):
                raise DumpError("not an sgcache replica (no sgcache_fields table)")
    except BaseException:
        store.dispose()
        raise
    return store




class Dumper:
    """Writes the rows of ``types`` (all cached types by default) of ``store``, optionally only
    those of ``projects`` (like ``scripts/scan --projects``), text replaced by ``redactor``."""

    def __init__(self, store: Store, *, types: Sequence[str] | None = None,
                 projects: Sequence[int] | None = None, redactor: Redactor | None = None,
                 page_size: int = PAGE_SIZE, progress: bool = False,
                 progress_factory: Callable[..., Any] | None = None):
        self.store = store
        self.types = sorted(types) if types else sorted(store.schema.entities)
        self.projects = list(projects) if projects else None
        self.redactor = redactor
        self.page_size = page_size
        self.progress = progress
        self._progress_factory = progress_factory
        self._retired_links: set[tuple[str, int]] = set()  # retired entities the dumped rows link to

    # -- what to read ------------------------------------------------------------------
    def _cached(self, entity_type: str) -> dict[str, str]:
        """Cached field -> data type, ``id`` left out."""
        fields = self.store.schema.entities[entity_type].fields
        return {f: s.data_type for f, s in sorted(fields.items())
                if f != "id" and fieldtypes.is_cached_type(s.data_type)}

    def project_condition(self, entity_type: str) -> Any | None:
        """The ``projects`` condition on the type's table, or None when the type is dumped whole."""
        if not self.projects:
            return None
        table = self.store.tables[entity_type]
        if entity_type == "Project":
            return table.c.id.in_(self.projects)
        fschema = self.store.schema.field(entity_type, "project")
        if fschema is None or fschema.data_type != "entity":
            return None
        return (table.c.project__type == "Project") & table.c.project__id.in_(self.projects)

    def header(self, conn: Connection) -> dict[str, Any]:
        """The header line: site, digests, event cursor, and per type whether the dump is complete."""
        store = self.store
        primed = store.primed_fields(conn)
        watermarks = dict(conn.execute(sa.select(store.types.c.entity_type, store.types.c.scan_watermark)).all())
        doubtful = {r[0] for r in conn.execute(sa.select(store.fetch_queue.c.entity_type).distinct())}
        doubtful |= {r[0] for r in conn.execute(sa.select(store.pending.c.entity_type).distinct())}
        types: dict[str, Any] = {}
        for entity_type in self.types:
            complete = (entity_type in primed and entity_type not in doubtful
                        and self.project_condition(entity_type) is None)
            if entity_type in primed and entity_type in doubtful:
                log.warning("%s: queued fetches or pending writes: dumped, but not as complete", entity_type)
            unprimed = sorted(f for f in self._cached(entity_type) if f not in primed.get(entity_type, ()))
            types[entity_type] = {"digest": type_digest(store.schema, entity_type), "complete": complete,
                                  "watermark": watermarks.get(entity_type) if complete else None,
                                  "unprimed": unprimed if complete else []}
        return {"sgcache_dump": FORMAT, "site": stored_site(store, conn),
                "schema_digest": schema_digest(store.schema), "event_cursor": store.get_state(conn, EVENT_CURSOR),
                "projects": self.projects, "redacted": self.redactor is not None, "types": types}

    def check_tables(self, conn: Connection) -> None:
        """The replica holds the fields of the schema as the schema defines them (else DumpError)."""
        fields = self.store.fields
        stored = {(r.entity_type, r.field_name): r.data_type
                  for r in conn.execute(sa.select(fields.c.entity_type, fields.c.field_name, fields.c.data_type))}
        for entity_type in self.types:
            for fname, data_type in self._cached(entity_type).items():
                if stored.get((entity_type, fname)) != data_type:
                    raise DumpError(f"the replica does not hold {entity_type}.{fname} as {data_type}: "
                                    "give the schema the replica was made with")

    # -- reading -----------------------------------------------------------------------
    def rows(self, conn: Connection, entity_type: str) -> Iterator[list[dict[str, Any]]]:
        """Pages of entity records of one type, in id order."""
        table = self.store.tables[entity_type]
        condition = self.project_condition(entity_type)
        cached = self._cached(entity_type)
        last = None
        while True:
            stmt = sa.select(table).order_by(table.c.id).limit(self.page_size)
            if condition is not None:
                stmt = stmt.where(condition)
            if last is not None:
                stmt = stmt.where(table.c.id > last)
            page = [dict(r._mapping) for r in conn.execute(stmt)]
            if not page:
                return
            yield self._records(conn, entity_type, cached, page)
            last = page[-1]["id"]
            if len(page) < self.page_size:
                return

    def _records(self, conn: Connection, entity_type: str, cached: dict[str, str],
                 page: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows of one page as SG's entity dicts, links named from the registry."""
        ids = [r["id"] for r in page]
        multi: dict[str, dict[int, list[tuple[str, int]]]] = {}
        wanted: set[tuple[str, int]] = set()
        for fname, data_type in cached.items():
            storage = fieldtypes.TYPES[data_type].storage
            if storage == "multi":
                multi[fname] = self._links(conn, entity_type, fname, ids)
                for links in multi[fname].values():
                    wanted.update(links)
            elif storage == "entity":
                wanted.update((r[f"{fname}__type"], r[f"{fname}__id"]) for r in page if r[f"{fname}__id"] is not None)
        names = self._names(conn, wanted)
        out = []
        for row in page:
            record: dict[str, Any] = {"type": entity_type, "id": row["id"], RETIRED: bool(row["_retired"])}
            for fname, data_type in cached.items():
                storage = fieldtypes.TYPES[data_type].storage
                if storage == "multi":
                    record[fname] = [self._link(k, names) for k in multi[fname].get(row["id"], [])]
                elif storage == "entity":
                    link_id = row[f"{fname}__id"]
                    record[fname] = None if link_id is None else self._link((row[f"{fname}__type"], link_id), names)
                else:
                    value = fieldtypes.decode_scalar(data_type, row[fname])
                    record[fname] = self.redactor.value(data_type, value) if self.redactor else value
            out.append(record)
        return out

    def _links(self, conn: Connection, entity_type: str, fname: str, ids: list[int]) -> dict[int, list[tuple[str, int]]]:
        assoc = self.store.multi[(entity_type, fname)]
        out: dict[int, list[tuple[str, int]]] = {}
        stmt = (sa.select(assoc.c.parent_id, assoc.c.child_type, assoc.c.child_id)
                .where(assoc.c.parent_id.in_(ids)).order_by(assoc.c.parent_id, assoc.c.pos))
        for r in conn.execute(stmt):
            out.setdefault(r.parent_id, []).append((r.child_type, r.child_id))
        return out

    def _names(self, conn: Connection, keys: set[tuple[str, int]]) -> dict[tuple[str, int], Any]:
        """(type, id) -> name, for the linked entities whose name the registry knows; the retired
        ones are remembered for the registry lines."""
        reg = self.store.entities
        by_type: dict[str, list[int]] = {}
        for t, i in keys:
            by_type.setdefault(t, []).append(i)
        out: dict[tuple[str, int], Any] = {}
        for t, ids in by_type.items():
            for chunk in chunks(sorted(ids), PAGE_SIZE):
                stmt = sa.select(reg.c.id, reg.c.name, reg.c.name_known, reg.c.retired).where(
                    (reg.c.type == t) & reg.c.id.in_(chunk))
                for r in conn.execute(stmt):
                    if r.name_known:
                        out[(t, r.id)] = r.name
                    if r.retired:
                        self._retired_links.add((t, r.id))
        return out

    def _link(self, key: tuple[str, int], names: dict[tuple[str, int], Any]) -> dict[str, Any]:
        link: dict[str, Any] = {"type": key[0], "id": key[1]}
        if key in names:
            link["name"] = self.redactor.text(names[key]) if self.redactor else names[key]
        return link

    def registry(self, conn: Connection) -> Iterator[dict[str, Any]]:
        """Registry lines: the retired entities that dumped rows link to, and that have no line of
        their own in the dump (another type's, a row outside ``projects``, or no row at all)."""
        reg = self.store.entities
        by_type: dict[str, list[int]] = {}
        for t, i in self._retired_links:
            by_type.setdefault(t, []).append(i)
        for entity_type in sorted(by_type):
            dumped: set[int] = set()
            if entity_type in self.types:
                table = self.store.tables[entity_type]
                condition = self.project_condition(entity_type)
                for chunk in chunks(sorted(by_type[entity_type]), PAGE_SIZE):
                    stmt = sa.select(table.c.id).where(table.c.id.in_(chunk))
                    if condition is not None:
                        stmt = stmt.where(condition)
                    dumped.update(conn.execute(stmt).scalars())
            for chunk in chunks(sorted(set(by_type[entity_type]) - dumped), PAGE_SIZE):
                stmt = sa.select(reg).where((reg.c.type == entity_type) & reg.c.id.in_(chunk)).order_by(reg.c.id)
                for r in conn.execute(stmt):
                    line: dict[str, Any] = {"type": r.type, "id": r.id, RETIRED: True, REGISTRY: True}
                    if r.name_known:
                        line["name"] = self.redactor.text(r.name) if self.redactor else r.name
                    yield line

    # -- writing -------------------------------------------------------------------------
    def dump(self, out: IO[str]) -> DumpStats:
        """Write the header, every row, then the registry lines, from one snapshot."""
        stats = DumpStats()
        self._retired_links = set()
        with self.store.engine.connect() as conn, conn.begin():
            self.store.dialect.snapshot(conn)
            self.check_tables(conn)
            out.write(encode_line(self.header(conn)))
            for entity_type in self.types:
                stats.rows[entity_type] = self._dump_type(conn, entity_type, out)
            for line in self.registry(conn):
                out.write(encode_line(line))
                stats.registry += 1
        log.info("dumped %s", stats.summary())
        return stats

    def _dump_type(self, conn: Connection, entity_type: str, out: IO[str]) -> int:
        table = self.store.tables[entity_type]
        count_stmt = sa.select(sa.func.count()).select_from(table)
        if (condition := self.project_condition(entity_type)) is not None:
            count_stmt = count_stmt.where(condition)
        total = int(conn.execute(count_stmt).scalar_one())
        done, logged = 0, time.monotonic()
        with self._bar(entity_type, total) as bar:
            for records in self.rows(conn, entity_type):
                for record in records:
                    out.write(encode_line(record))
                done += len(records)
                bar.update(len(records))
                if not self.progress and time.monotonic() - logged >= LOG_EVERY:
                    log.info("%s: %d of %d rows", entity_type, done, total)
                    logged = time.monotonic()
        log.info("%s: %d rows", entity_type, done)
        return done

    def _bar(self, entity_type: str, total: int) -> Any:
        factory = self._progress_factory
        if factory is None:
            from tqdm import tqdm as factory
        return factory(desc=entity_type, total=total, unit=" rows", disable=not self.progress, leave=False)
