"""The replica: SQL tables made from the cached schema, and the writes into them.

Layout (SQLAlchemy Core, the same on SQLite and PostgreSQL):

- ``sg_<type>``: one row per entity; one column per scalar field, ``<f>__type`` and
  ``<f>__id`` per entity field, ``_retired`` for retirement (never a delete).
- ``sg_<type>__<field>``: one association table per multi_entity / addressing field.
- ``sgcache_entities``: every entity the replica has heard of (cached type or not), with
  its display ``name`` and retired flag; links get their ``name`` from here.
- ``sgcache_*``: state, per-type and per-field scan state, raw events, change log,
  event gaps, event ids given up and the queue of entities to fetch.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..audit import table as audit_table
from ..private import ensure_private_file
from ..wire import check_link, chunks, row_links
from . import fetchqueue, fieldtypes, linksearch, pairs, pending
from .dialect import Dialect, dialect_for, sequence_key_type
from .schema import FieldSchema, Schema
from .statekeys import TEXT_LOWERING
from .textcase import LOWERING
from .writes import PROXY, WriteBatch

log = logging.getLogger("sgcache.store")

TYPE_LEN = 64


def now_utc() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def entity_table_name(entity_type: str) -> str:
    return f"sg_{entity_type.lower()}"


def multi_table_name(entity_type: str, field_name: str) -> str:
    return f"sg_{entity_type.lower()}__{field_name}"


def sort_index_name(entity_type: str, field_name: str) -> str:
    """The index on a date field then id (it replaces an older release's ``ix_<table>_<field>``)."""
    return f"ix_{entity_table_name(entity_type)}_{field_name}__sort"


def desc_sort_index_name(entity_type: str, field_name: str) -> str:
    """The index on a date field descending then ``id`` ascending: SG's order of a descending
    sort (ties by id ascending in both directions), which the ``__sort`` index read backwards
    cannot give (docs/scale.md)."""
    return f"ix_{entity_table_name(entity_type)}_{field_name}__desc"


def text_key_index_name(entity_type: str, field_name: str) -> str:
    """The index on a text field's sort key (lower case, code-point order) and id."""
    return f"ix_{entity_table_name(entity_type)}_{field_name}__key"


@dataclass
class WriteResult:
    """What a write did: rows inserted/changed, and entities that need a full fetch."""

    inserted: int = 0
    changed: int = 0
    to_fetch: list[tuple[str, int]] | None = None

    def merge(self, other: WriteResult) -> None:
        self.inserted += other.inserted
        self.changed += other.changed
        if other.to_fetch:
            self.to_fetch = (self.to_fetch or []) + other.to_fetch


class Store:
    """The replica's tables for one schema, and the writes into them."""

    def __init__(self, engine: Engine, schema: Schema, *, writer: bool = False):
        self.engine = engine
        self.dialect: Dialect = dialect_for(engine)
        self._write_engine: Engine | None = engine if writer else None
        self.writer = writer  # a sidecar that keeps the replica current (not a proxy)
        self.schema = schema.cacheable()  # never a field whose value depends on who reads it
        # why the database's lower() cannot be trusted, once asked (:meth:`lower_problem`)
        self._lower_problem: tuple[str | None] | None = None
        self._lower_lock = threading.Lock()
        self.metadata = sa.MetaData()
        self.tables: dict[str, sa.Table] = {}
        self.multi: dict[tuple[str, str], sa.Table] = {}
        self._build_meta_tables()
        for entity in self.schema.entities.values():
            self._build_entity_tables(entity.name, entity.fields)

    @classmethod
    def open(cls, url: str, schema: Schema, create: bool = True, *, writer: bool = False,
             **engine_kwargs: Any) -> Store:
        """Connect to ``url`` and (by default) create or migrate the tables.

        ``writer``: this process writes (the scripts): every transaction of ``engine`` is a write
        transaction (on SQLite it takes the write lock at BEGIN). The proxy, whose reads must not
        wait for writers, reads through ``engine`` and writes through :attr:`write_engine`.

        A missing SQLite file is created mode 0600 (SQLite would create it anyway, with the
        umask's mode); an existing one keeps its mode, with a warning when others may read it."""
        dialect = dialect_for(url)
        if (path := dialect.database_file(url)) is not None:
            try:
                ensure_private_file(path)
            except OSError as exc:  # SQLite reports the same trouble in its own words
                log.debug("cannot create %s: %s", path, exc)
        store = cls(dialect.create_engine(url, writer=writer, **engine_kwargs), schema, writer=writer)
        if create:
            store.create()
            store.lower_problem()  # asked now, so a database whose lower() cannot be trusted is told at start
        return store

    def lower_problem(self) -> str | None:
        """Why this database's lower() cannot be trusted (it does not lower text as
        ``dialect.lower_value`` lowers a filter's value), or None: then case-insensitive text
        conditions and text sorts pass (``case-mapping``, cache/read/collation.py). Asked of the
        database once per replica (the dialect is shared by every replica of the process), with a
        warning when it cannot be trusted; a failure to ask raises and is asked again next time."""
        known = self._lower_problem
        if known is None:
            with self._lower_lock:
                known = self._lower_problem
                if known is None:
                    with self.engine.connect() as conn:
                        known = (self.dialect.lower_problem(conn),)
                    if known[0] is not None:
                        log.warning("the database's lower() does not lower text as SG does (%s): reads with "
                                    "case-insensitive text conditions or text sorts pass (case-mapping); "
                                    "docs/postgresql.md says which databases are fit", known[0])
                    self._lower_problem = known
        return known[0]

    def dispose(self) -> None:
        self.engine.dispose()
        if self._write_engine is not None and self._write_engine is not self.engine:
            self._write_engine.dispose()

    @property
    def write_engine(self) -> Engine:
        """The engine for write transactions (on SQLite one that begins IMMEDIATE, so a
        read-then-write transaction cannot fail on a lock upgrade)."""
        if self._write_engine is None:
            self._write_engine = self.dialect.write_engine(self.engine)
        return self._write_engine

    # -- table definitions -------------------------------------------------------------
    def _build_meta_tables(self) -> None:
        md = self.metadata
        self.state = sa.Table(
            "sgcache_state",
            md,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.Text),
            sa.Column("updated_at", sa.DateTime, nullable=False),
        )
        # built once: get_state runs on every write and replica-state refresh
        self._get_state = sa.select(self.state.c.value).where(self.state.c.key == sa.bindparam("key"))
        self.types = sa.Table(
            "sgcache_types",
            md,
            sa.Column("entity_type", sa.String(TYPE_LEN), primary_key=True),
            sa.Column("primed", sa.Boolean, nullable=False, default=False),
            sa.Column("primed_at", sa.DateTime),
            sa.Column("last_scan_at", sa.DateTime),
            sa.Column("scan_watermark", sa.String(32)),  # SG's updated_at, not the local clock
        )
        self.fields = sa.Table(
            "sgcache_fields",
            md,
            sa.Column("entity_type", sa.String(TYPE_LEN), primary_key=True),
            sa.Column("field_name", sa.String(TYPE_LEN), primary_key=True),
            sa.Column("data_type", sa.String(32), nullable=False),
            sa.Column("spec", sa.Text, nullable=False),
            sa.Column("primed", sa.Boolean, nullable=False, default=False),
        )
        self.entities = sa.Table(
            "sgcache_entities",
            md,
            sa.Column("type", sa.String(TYPE_LEN), primary_key=True),
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("name", sa.Text),
            sa.Column("name_known", sa.Boolean, nullable=False, default=False),
            sa.Column("retired", sa.Boolean, nullable=False, default=False),
        )
        self.events = sa.Table(
            "sgcache_events",
            md,
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("event_type", sa.String(128), nullable=False),
            sa.Column("created_at", sa.String(32)),
            sa.Column("body", sa.Text, nullable=False),
            sa.Column("received_at", sa.DateTime, nullable=False),
        )
        self.changes = sa.Table(
            "sgcache_changes",
            md,
            sa.Column("seq", sequence_key_type(), primary_key=True),
            sa.Column("at", sa.DateTime, nullable=False),
            sa.Column("source", sa.String(16), nullable=False),  # event / scan / proxy / fetch
            sa.Column("event_id", sa.BigInteger),
            sa.Column("entity_type", sa.String(TYPE_LEN), nullable=False),
            sa.Column("entity_id", sa.BigInteger, nullable=False),
            sa.Column("field_name", sa.String(TYPE_LEN)),  # None: the row was created
            sa.Column("old", sa.Text),
            sa.Column("new", sa.Text),
        )
        sa.Index("ix_sgcache_changes_entity", self.changes.c.entity_type, self.changes.c.entity_id)
        sa.Index("ix_sgcache_changes_event", self.changes.c.event_id)
        self.gaps = sa.Table(
            "sgcache_gaps",
            md,
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("first_seen", sa.DateTime, nullable=False),
        )
        # event ids given up as gaps, still looked for by id (SG may show them later): the
        # ingester's sweep applies them, and reads of events across them pass (cache/read/eventlog.py)
        self.given_up = sa.Table(
            "sgcache_given_up",
            md,
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("given_up_at", sa.DateTime, nullable=False),  # SG's clock (cache/ingest/sgclock.py)
        )
        self.fetch_queue = fetchqueue.define_table(md)  # entities to re-read from SG (cache/replica/fetchqueue.py)
        self.pairs_table = pairs.define_table(md)  # learned pairs (cache/replica/pairs.py)
        self.pending = pending.define_table(md)  # pending-write markers (cache/replica/pending.py)
        self.link_search = linksearch.define_table(md)  # revivals to ask SG about (cache/replica/linksearch.py)
        # a state value, the learned pairs and the rows proxies wrote after a change-log mark in
        # one statement (a learnt write reads them all): the state's row is the one whose second
        # column is NULL (a pair's field name never is), a written row's has _WRITTEN_ROW there
        state_row = sa.select(self.state.c.value, sa.null().label("b"), sa.null().label("c"),
                              sa.null().label("d")).where(self.state.c.key == sa.bindparam("key"))
        changes = self.changes
        self._state_pairs_written = sa.union_all(
            state_row, pairs.learned_pairs(self.pairs_table),
            sa.select(changes.c.entity_type, sa.literal(_WRITTEN_ROW).label("b"),
                      sa.cast(changes.c.entity_id, sa.String).label("c"), sa.null().label("d"))
            .where((changes.c.seq > sa.bindparam("since")) & (changes.c.source == PROXY)).distinct())
        # a state value and the change log's newest seq in one statement (read before a write is sent)
        self._state_and_mark = sa.select(
            sa.select(self.state.c.value).where(self.state.c.key == sa.bindparam("key")).scalar_subquery(),
            sa.select(sa.func.max(changes.c.seq)).scalar_subquery())
        audit_table.define(md)  # the audit's disagreements and rules switched off (cache/audit/table.py)

    def _build_entity_tables(self, entity_type: str, fields: Mapping[str, FieldSchema]) -> None:
        name = entity_table_name(entity_type)
        cols: list[sa.Column[Any]] = [
            sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("_retired", sa.Boolean, nullable=False, default=False),
        ]
        indexed: list[str] = []
        sorted_by: list[str] = []
        by_day: list[str] = []  # date fields: many rows a day, so a descending sort has long runs of ties
        identifier = self.schema.identifier(entity_type)
        for fname, fschema in sorted(fields.items()):
            if fname == "id" or not fieldtypes.is_cached_type(fschema.data_type):
                continue
            storage = fieldtypes.TYPES[fschema.data_type].storage
            if storage == "multi":
                self.multi[(entity_type, fname)] = sa.Table(
                    multi_table_name(entity_type, fname),
                    self.metadata,
                    sa.Column("parent_id", sa.BigInteger, primary_key=True, autoincrement=False),
                    sa.Column("child_type", sa.String(TYPE_LEN), primary_key=True),
                    sa.Column("child_id", sa.BigInteger, primary_key=True, autoincrement=False),
                    sa.Column("pos", sa.Integer, nullable=False),
                    sa.Index(f"ix_{multi_table_name(entity_type, fname)}_child", "child_id", "child_type"),
                )
            elif storage == "entity":
                cols.append(sa.Column(f"{fname}__type", sa.String(TYPE_LEN)))
                cols.append(sa.Column(f"{fname}__id", sa.BigInteger))
                indexed.append(f"{fname}__id")
            else:
                cols.append(sa.Column(fname, _column_type(storage)))
                if fschema.data_type in ("date", "date_time"):
                    sorted_by.append(fname)
                if fschema.data_type == "date":
                    by_day.append(fname)
                elif fschema.data_type == "status_list" or fname == identifier:
                    indexed.append(fname)
        table = sa.Table(name, self.metadata, *cols)
        for col in indexed:
            sa.Index(f"ix_{name}_{col}", table.c[col])
        for col in sorted_by:  # in a read's order, ties by id: a sorted page stops at its last row
            self.dialect.sort_index(sort_index_name(entity_type, col), table.c[col], table.c.id)
        for col in by_day:  # a descending page stops at its last row too (ties by id ascending)
            self.dialect.desc_sort_index(desc_sort_index_name(entity_type, col), table.c[col], table.c.id)
        keyed = fields.get(identifier) if identifier else None
        if keyed is not None and keyed.data_type in fieldtypes.LOWER_SORTED:
            # the name field's sorts and case-insensitive matches (cache/read/sorting.py, scalar_conditions.py)
            self.dialect.text_key_index(text_key_index_name(entity_type, identifier), table.c[identifier],
                                        table.c.id)
        self.tables[entity_type] = table

    # -- creation and schema diffs -----------------------------------------------------
    def create(self) -> None:
        """Create missing tables and columns; un-prime fields whose definition changed."""
        with self.engine.connect() as conn:
            existed = set(sa.inspect(conn).get_table_names())
        self.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            self._sync_fields(conn, existed)
            self._add_indexes(conn, existed)
            self._relower(conn)

    def _relower(self, conn: Connection) -> None:
        """Rebuild the indexes on lowered text when the replica was indexed with another lowering
        than this release's (``textcase.LOWERING``): SQLite's hold what ``sg_lower`` returned when
        each row was written. Once, by the first process to open it after the upgrade."""
        if self.get_state(conn, TEXT_LOWERING) == LOWERING:
            return
        rebuilt = self.dialect.rebuild_lowered_indexes(conn)
        if rebuilt:
            log.info("rebuilt %d index(es) on lowered text (%s lowering): %s", len(rebuilt), LOWERING,
                     ", ".join(rebuilt))
        self.set_state(conn, TEXT_LOWERING, LOWERING)

    def _add_indexes(self, conn: Connection, existed: set[str]) -> None:
        """Create the indexes a replica made by an older version lacks (create_all adds none to a
        table that exists): the first process to open it after an upgrade builds them, once (on a
        million-row replica, seconds; writers wait meanwhile, docs/scale.md)."""
        for table in self.metadata.sorted_tables:
            if table.name not in existed:
                continue  # made whole by create_all just now
            have = self.dialect.index_names(conn, table.name)
            for index in table.indexes:
                if index.name not in have:
                    log.info("creating index %s on %s", index.name, table.name)
                    conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))  # another process may too
                old = index.name.removesuffix("__sort") if index.name.endswith("__sort") else None
                if old in have:  # the single-column index an older release made: the new one leads with it
                    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {conn.dialect.identifier_preparer.quote(old)}")

    def _sync_fields(self, conn: Connection, existed: set[str]) -> None:
        """Record each cached field's definition; add the storage of new ones, re-create changed ones.
        ``existed``: the tables there before this start (the others have just been made whole)."""
        stored = {
            (r.entity_type, r.field_name): r for r in conn.execute(sa.select(self.fields)).all()
        }
        if self.writer:
            self._unprime_uncached(conn, stored)
        new_rows: list[dict[str, Any]] = []
        for entity in self.schema.entities.values():
            table = self.tables[entity.name]
            existing_cols: set[str] | None = None if table.name in existed else set(table.c.keys())
            for fname, fschema in entity.fields.items():
                if not fieldtypes.is_cached_type(fschema.data_type):
                    continue
                spec = json.dumps(
                    {"type": fschema.data_type, "links": list(fschema.links)}, sort_keys=True
                )
                old = stored.get((entity.name, fname))
                if old is not None and old.spec == spec:
                    continue
                if old is not None:
                    log.warning("field %s.%s changed (%s -> %s): rescan needed", entity.name, fname, old.spec, spec)
                    self._drop_field_storage(conn, entity.name, fname, old.data_type)
                    conn.execute(
                        self.fields.delete().where(
                            (self.fields.c.entity_type == entity.name) & (self.fields.c.field_name == fname)
                        )
                    )
                    existing_cols = None
                if existing_cols is None:  # read only when a field of an older table needs storage
                    existing_cols = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
                self._add_field_storage(conn, table, fname, fschema, existing_cols)
                new_rows.append({"entity_type": entity.name, "field_name": fname, "data_type": fschema.data_type,
                                 "spec": spec, "primed": fname == "id"})
        if new_rows:  # one statement (executemany), not one per field
            conn.execute(self.fields.insert(), new_rows)

    def _unprime_uncached(self, conn: Connection, stored: dict[tuple[str, str], Any]) -> None:
        """A writer (ingester, scanner) opened with a schema that no longer caches a type or field stops
        keeping it current: un-prime it, so that if it comes back its old values are not served
        before a full scan primes it again. (A proxy's schema may be a subset: it un-primes nothing.)"""
        gone = [key for key, row in stored.items() if row.primed and key[1] != "id"
                and (key[0] not in self.schema.entities or key[1] not in self.schema.entities[key[0]].fields)]
        for entity_type, fname in gone:
            log.warning("field %s.%s is no longer cached: un-primed (a full scan primes it again if it comes back)",
                        entity_type, fname)
            conn.execute(self.fields.update().where((self.fields.c.entity_type == entity_type)
                                                    & (self.fields.c.field_name == fname)).values(primed=False))
        types = self.types
        dropped = [r.entity_type for r in conn.execute(sa.select(types.c.entity_type).where(types.c.primed))
                   if r.entity_type not in self.schema.entities]
        if dropped:
            log.warning("types no longer cached: %s: un-primed (a full scan primes them again if they come back)",
                        ", ".join(sorted(dropped)))
            conn.execute(types.update().where(types.c.entity_type.in_(dropped)).values(primed=False))

    def _add_field_storage(
        self, conn: Connection, table: sa.Table, fname: str, fschema: FieldSchema, existing: set[str]
    ) -> None:
        storage = fieldtypes.TYPES[fschema.data_type].storage
        if storage == "multi":
            self.multi[(fschema.entity_type, fname)].create(conn, checkfirst=True)
            return
        names = [f"{fname}__type", f"{fname}__id"] if storage == "entity" else [fname]
        for col_name in names:
            if col_name in existing:
                continue
            col = table.c[col_name]
            ddl_type = col.type.compile(dialect=conn.dialect)
            quote = conn.dialect.identifier_preparer.quote
            conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(col_name)} {ddl_type}")

    def _drop_field_storage(self, conn: Connection, entity_type: str, fname: str, data_type: str) -> None:
        quote = conn.dialect.identifier_preparer.quote
        if fieldtypes.TYPES.get(data_type, fieldtypes.TYPES["text"]).storage == "multi":
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {quote(multi_table_name(entity_type, fname))}")
            return
        names = [f"{fname}__type", f"{fname}__id"] if data_type == "entity" else [fname]
        existing = {c["name"] for c in sa.inspect(conn).get_columns(entity_table_name(entity_type))}
        # the text-key index is an expression on the column: SQLite refuses to drop a column one uses
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {quote(text_key_index_name(entity_type, fname))}")
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {quote(desc_sort_index_name(entity_type, fname))}")
        for col_name in names:
            if col_name in existing:
                for idx in sa.inspect(conn).get_indexes(entity_table_name(entity_type)):
                    if col_name in idx["column_names"]:
                        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {quote(idx['name'])}")
                table = quote(entity_table_name(entity_type))
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {quote(col_name)}")

    def drop_all(self) -> None:
        """Drop every table of this store (tests and re-priming)."""
        self.metadata.drop_all(self.engine)

    # -- state ---------------------------------------------------------------------------
    def get_state(self, conn: Connection, key: str) -> Any:
        return _state_value(conn.execute(self._get_state, {"key": key}).first())

    def locked_state(self, conn: Connection, key: str) -> Any:
        """:meth:`get_state` under the write lock (``Dialect.locked_read``: one round trip on PostgreSQL)."""
        return _state_value(self.dialect.locked_read(conn, self._get_state, {"key": key}).first())

    def locked_state_pairs_written(self, conn: Connection, key: str, since: int
                                   ) -> tuple[Any, list[tuple[str, str, str, str]], set[tuple[str, int]]]:
        """:meth:`locked_state`, the learned pairs (entity type, field, other type, other field) and
        the rows a proxy wrote after the change log's ``since`` (:meth:`state_and_mark`), all read
        once the write lock is held, in one round trip on PostgreSQL."""
        value: Any = None
        learned = []
        written: set[tuple[str, int]] = set()
        for row in self.dialect.locked_read(conn, self._state_pairs_written, {"key": key, "since": since}):
            if row[1] is None:
                value = _state_value(row)
            elif row[1] == _WRITTEN_ROW:
                written.add((row[0], int(row[2])))
            else:
                learned.append((row[0], row[1], row[2], row[3]))
        return value, learned, written

    def state_and_mark(self, conn: Connection, key: str) -> tuple[Any, int]:
        """A state value and the change log's newest ``seq`` (:meth:`change_mark`), one statement."""
        row = conn.execute(self._state_and_mark, {"key": key}).first()
        value = None if row is None or row[0] is None else json.loads(row[0])
        return value, int(row[1] or 0) if row is not None else 0

    def set_state(self, conn: Connection, key: str, value: Any) -> None:
        self._upsert(
            conn,
            self.state,
            {"key": key, "value": json.dumps(value), "updated_at": now_utc()},
            ["key"],
        )

    def mark_primed(self, conn: Connection, entity_type: str, watermark: str | None = None) -> None:
        """Record that a full scan of ``entity_type`` completed: reads of it may be answered."""
        now = now_utc()
        values = {
            "entity_type": entity_type,
            "primed": True,
            "primed_at": now,
            "last_scan_at": now,
            "scan_watermark": watermark,
        }
        self._upsert(conn, self.types, values, ["entity_type"])
        conn.execute(
            self.fields.update().where(self.fields.c.entity_type == entity_type).values(primed=True)
        )

    def primed_fields(self, conn: Connection) -> dict[str, set[str]]:
        """Cached types whose full scan completed, with their primed fields."""
        primed_types = {
            r.entity_type
            for r in conn.execute(sa.select(self.types.c.entity_type).where(self.types.c.primed)).all()
        }
        out: dict[str, set[str]] = {t: set() for t in primed_types if t in self.schema}
        rows = conn.execute(
            sa.select(self.fields.c.entity_type, self.fields.c.field_name).where(self.fields.c.primed)
        ).all()
        for row in rows:
            if row.entity_type in out:
                out[row.entity_type].add(row.field_name)
        return out

    # -- writes ------------------------------------------------------------------------
    def _upsert(
        self, conn: Connection, table: sa.Table, values: Any, keys: Sequence[str], update: bool = True
    ) -> None:
        """Insert or update rows of ``table`` by primary key ``keys`` (insert-if-absent without ``update``)."""
        rows = values if isinstance(values, list) else [values]
        if not rows:
            return
        update_cols = [c for c in rows[0] if c not in keys] if update else []
        conn.execute(self.dialect.upsert(table, keys, update_cols), rows)

    def batch(self, conn: Connection, source: str = "event") -> WriteBatch:
        """A :class:`~cache.replica.writes.WriteBatch` on ``conn``: the one write path (flush before commit)."""
        return WriteBatch(self, conn, source)

    now = staticmethod(now_utc)

    def db_now(self, conn: Connection) -> datetime:
        """The database server's clock now (naive UTC): the one clock every host writing to the
        replica shares (SQLite's is this host's)."""
        return datetime.fromtimestamp(self.dialect.clock(conn), UTC).replace(tzinfo=None)

    def change_mark(self, conn: Connection) -> int:
        """The change log's newest ``seq``, read before SG is: a row another writer changes after
        that (the ingester applied a newer event, a proxy learned a write) is logged above it. Every
        writer logs under the write lock, so ``seq`` grows in commit order."""
        return int(conn.execute(sa.select(sa.func.max(self.changes.c.seq))).scalar() or 0)

    def changed_since(self, conn: Connection, entity_type: str, ids: Sequence[int], mark: int) -> set[int]:
        """Which of these rows a writer changed after ``mark`` (:meth:`change_mark`), read under the
        write lock (no other writer commits before ``conn``'s transaction does): what was read from
        SG before ``mark`` is older than those rows and must not be written over them."""
        self.dialect.lock_writes(conn)
        return {entity_id for _t, entity_id in self._logged_since(conn, [(entity_type, i) for i in ids], mark)}

    def overtaken(self, conn: Connection, entity_type: str, ids: Sequence[int],
                  records: Sequence[Mapping[str, Any]], mark: int) -> set[int]:
        """Of ``ids`` (rows asked of SG after ``mark``; ``records``: SG's answer), those that must not
        be written: their row changed here since (:meth:`changed_since`, under the write lock), or
        SG's row links an entity a proxy wrote since (a write on the other side of a pair may have
        changed the row's links after SG was read without touching the row here)."""
        overtaken = self.changed_since(conn, entity_type, ids, mark)
        linked = {int(r["id"]): row_links(r) for r in records if int(r["id"]) not in overtaken}
        written = self.written_since(conn, set().union(*linked.values()), mark)
        return overtaken | {i for i, links in linked.items() if links & written}

    def written_since(self, conn: Connection, keys: Iterable[tuple[str, int]], mark: int) -> set[tuple[str, int]]:
        """Which of these (type, id) a proxy wrote after the change log's ``mark`` (inside the
        caller's transaction, under the write lock it holds)."""
        return self._logged_since(conn, keys, mark, source=PROXY)

    def _logged_since(self, conn: Connection, keys: Iterable[tuple[str, int]], mark: int,
                      source: str | None = None) -> set[tuple[str, int]]:
        table = self.changes
        by_type: dict[str, set[int]] = {}
        for entity_type, entity_id in keys:
            by_type.setdefault(entity_type, set()).add(int(entity_id))
        out: set[tuple[str, int]] = set()
        for entity_type, ids in sorted(by_type.items()):
            for chunk in chunks(sorted(ids), 500):
                cond = (table.c.seq > mark) & (table.c.entity_type == entity_type) & table.c.entity_id.in_(chunk)
                if source is not None:
                    cond &= table.c.source == source
                out.update((entity_type, i) for i in conn.execute(
                    sa.select(table.c.entity_id).distinct().where(cond)).scalars())
        return out

    def note_links(self, conn: Connection, links: Iterable[Mapping[str, Any]]) -> None:
        """Remember linked entities and their names as SG sent them."""
        batch = self.batch(conn)
        batch.note(links)
        batch.flush()

    def set_retired(
        self, conn: Connection, entity_type: str, entity_id: int, retired: bool, source: str,
        event_id: int | None = None,
    ) -> bool:
        """Flip the retired flag of one entity; True when something changed."""
        batch = self.batch(conn, source)
        changed = batch.retire((entity_type, int(entity_id)), retired, event_id)
        batch.flush()
        return changed

    def write_entities(
        self,
        conn: Connection,
        entity_type: str,
        records: Sequence[Mapping[str, Any]],
        source: str,
        *,
        complete: bool = False,
        retired: bool | None = None,
        event_id: int | None = None,
    ) -> WriteResult:
        """Upsert SG entity dicts of one type.

        ``complete`` says each record holds every cached field (a scan or a fetch); a
        record for an unknown row that is not complete is not stored but returned in
        ``to_fetch``. Only cached fields are written; values are checked against the
        field's data type and a record with a bad value is sent to ``to_fetch`` too.
        """
        batch = self.batch(conn, source)
        result = batch.put(entity_type, records, complete=complete, retired=retired, event_id=event_id)
        batch.flush()
        return result

    def encode_record(
        self, entity_type: str, cached_fields: Mapping[str, FieldSchema], record: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, list[Mapping[str, Any]]], list[Mapping[str, Any]]]:
        """An SG record -> (column values, multi_entity lists, links seen); ValueError on a bad shape."""
        values: dict[str, Any] = {}
        multis: dict[str, list[Mapping[str, Any]]] = {}
        links: list[Mapping[str, Any]] = []
        for fname, fschema in cached_fields.items():
            if fname not in record:
                continue
            value = record[fname]
            storage = fieldtypes.TYPES[fschema.data_type].storage
            if storage == "entity":
                if value is None:
                    values[f"{fname}__type"] = None
                    values[f"{fname}__id"] = None
                else:
                    check_link(value)
                    values[f"{fname}__type"] = value["type"]
                    values[f"{fname}__id"] = int(value["id"])
                    links.append(value)
            elif storage == "multi":
                if value is None:
                    value = []
                if not isinstance(value, list):
                    raise ValueError(f"{fname}: multi_entity value must be a list")
                for link in value:
                    check_link(link)
                multis[fname] = value
                links.extend(value)
            else:
                if fschema.data_type == "checkbox" and value is None:
                    value = False
                encoded = fieldtypes.encode_scalar(fschema.data_type, value)
                if not self.dialect.stores_nul and isinstance(encoded, str) and "\x00" in encoded:
                    # that row alone is refused (the writer reads it again or leaves it queued),
                    # not the whole statement of the rows written with it
                    raise ValueError(f"{fname}: a NUL character, which the database's text cannot hold")
                values[fname] = encoded
        return values, multis, links

    def change_multi(
        self,
        conn: Connection,
        entity_type: str,
        parent_id: int,
        fname: str,
        added: Sequence[Mapping[str, Any]] = (),
        removed: Sequence[Mapping[str, Any]] = (),
        source: str = "event",
        event_id: int | None = None,
    ) -> bool:
        """Apply an ``added``/``removed`` change to a multi_entity field; idempotent."""
        for link in [*added, *removed]:
            check_link(link)
        batch = self.batch(conn, source)
        changed = batch.change_links((entity_type, int(parent_id)), fname, added, removed, event_id)
        batch.flush()
        return changed

    def _replace_multi(
        self, conn: Connection, entity_type: str, parent_id: int, fname: str, value: Sequence[Mapping[str, Any]]
    ) -> bool:
        """Set a multi_entity field to exactly ``value`` (no change-log record); True when it changed."""
        batch = self.batch(conn)
        changed = batch.replace_links((entity_type, int(parent_id)), fname, value, log_changes=False)
        batch.flush()
        return changed

    def _log(
        self, conn: Connection, source: str, event_id: int | None, entity_type: str, entity_id: int,
        field_name: str | None, old: Any, new: Any,
    ) -> None:
        """One change-log record, written now."""
        batch = self.batch(conn, source)
        batch.log_change((entity_type, int(entity_id)), field_name, old, new, event_id)
        batch.flush()

    def queue_fetch(self, conn: Connection, items: Iterable[tuple[str, int]], reason: str) -> None:
        """Ask for these entities to be re-read from SG (reads of their type pass meanwhile)."""
        batch = self.batch(conn)
        for key in items:
            batch.queue(key, reason)
        batch.flush()

    def type_tables(self, entity_type: str) -> list[str]:
        """The tables holding a type's rows: its own, its multi_entity fields', and the registry."""
        multi = [t.name for (owner, _f), t in sorted(self.multi.items()) if owner == entity_type]
        return [self.tables[entity_type].name, *multi, self.entities.name]

    def cached_field_names(self, entity_type: str) -> list[str]:
        """The fields of a type the replica stores (what a full fetch must ask for)."""
        fields = self.schema.entities[entity_type].fields
        return sorted(f for f, s in fields.items() if fieldtypes.is_cached_type(s.data_type))

    def unqueue_fetch(self, conn: Connection, items: Iterable[tuple[str, int]]) -> None:
        """Drop entities from the fetch queue (their rows are complete now)."""
        batch = self.batch(conn)
        batch.unqueue(items)
        batch.flush()


def field_changes(diff: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Changed columns -> {field: (old, new)}; an entity field's two columns become one link."""
    out: dict[str, tuple[Any, Any]] = {}
    for col, new in diff.items():
        if col == "_retired":
            out["retired"] = (old[col], new)
        elif col.endswith(("__type", "__id")):
            fname = col.rsplit("__", 1)[0]
            if fname in out:
                continue
            t_col, i_col = f"{fname}__type", f"{fname}__id"
            new_type, new_id = diff.get(t_col, old[t_col]), diff.get(i_col, old[i_col])
            out[fname] = (
                None if old[i_col] is None else {"type": old[t_col], "id": old[i_col]},
                None if new_id is None else {"type": new_type, "id": new_id},
            )
        else:
            out[col] = (old[col], new)
    return out


def _column_type(storage: str) -> sa.types.TypeEngine[Any]:
    return {
        "text": sa.Text(),
        "int": sa.BigInteger(),
        "float": sa.Float(precision=53),
        "bool": sa.Boolean(),
        "json": sa.Text(),
    }[storage]


#: The second column of a row of ``_state_pairs_written`` that names a row a proxy wrote (no
#: field name of a pair is this).
_WRITTEN_ROW = "*written"


def _state_value(row: Any) -> Any:
    """A ``sgcache_state`` row's value, decoded (None: no row, or no value)."""
    return None if row is None or row.value is None else json.loads(row.value)
