"""Pending-write markers: reads that a recent write may have changed pass until the ingester has it.

A proxy that learns a write whose effects it cannot apply exactly (a link field whose pair is
not known, rows SG creates from a task template, a retirement others link to, the fields SG
sets itself such as ``updated_at``) records markers ``(entity type, field)`` -- or
``(entity type, "*")`` for the whole type -- in ``sgcache_pending``, in the same transaction
as the write. Every read through every proxy on the database checks the markers first (one
small query per read) and passes (``pending-write``) when it touches one. The ingester marks
too: the link fields that can link an entity it revived, until SG was asked which rows link it
(cache/replica/linksearch.py).

A marker holds the database's clock when the write was learned (after SG answered it). The
ingester records the database's clock before each poll; a poll that started ``MARGIN`` seconds
after a marker and reached the end of the event log has applied that write's events, so the
ingester then deletes every marker older than the poll's start, once no fetch and no link
search is queued. Without an ingester the
markers stay and the reads keep passing: the cache cannot be sure.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import Passthrough
from . import fetchqueue, linksearch, pairs
from .dialect import dialect_for
from .statekeys import PENDING_CAUGHT_UP

log = logging.getLogger("sgcache.pending")

WHOLE_TYPE = "*"
#: Seconds a poll must start after a write for that write's events to count as seen by it.
MARGIN = 1.0
NAME_LEN = 64

Marker = tuple[str, str]


def define_table(metadata: sa.MetaData) -> sa.Table:
    """``sgcache_pending``: one row per (type, field) with the newest write's time (database clock)."""
    return sa.Table(
        "sgcache_pending",
        metadata,
        sa.Column("entity_type", sa.String(NAME_LEN), primary_key=True),
        sa.Column("field_name", sa.String(NAME_LEN), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),  # seconds since the epoch, the database's clock
    )


def db_clock(conn: Connection) -> float:
    """The database server's clock now, in seconds since the epoch (sub-second resolution)."""
    return dialect_for(conn).clock(conn)


#: Markers written by one statement (SQLite binds at most 32,766 parameters to one).
MARK_CHUNK = 500


def mark(conn: Connection, table: sa.Table, markers: Iterable[Marker]) -> None:
    """Record markers for a write just learned (inside the write's transaction)."""
    rows = sorted({(t, f) for t, f in markers if t and f})
    if not rows:
        return
    dialect = dialect_for(conn)
    # the server's clock in the statement itself where the dialect has one (one round trip fewer)
    at = None if dialect.clock_expression() is not None else db_clock(conn)
    # sorted rows: concurrent writers lock the same keys in the same order (no deadlock); one
    # statement of many rows, where an executemany was a round trip per marker on psycopg2
    for start in range(0, len(rows), MARK_CHUNK):
        chunk = rows[start:start + MARK_CHUNK]
        values: dict[str, Any] = {}
        for i, (t, f) in enumerate(chunk):
            values[f"t{i}"], values[f"f{i}"] = t, f
            if at is not None:
                values[f"a{i}"] = at
        sql, order = _upsert_markers(dialect, table, len(chunk), conn.dialect)
        conn.exec_driver_sql(sql, values if order is None else tuple(values[name] for name in order))
    log.debug("pending-write markers: %s", ", ".join(f"{t}.{f}" for t, f in rows))


@functools.lru_cache(maxsize=32)
def _upsert_markers(dialect: Any, table: sa.Table, count: int, driver: Any) -> tuple[str, tuple[str, ...] | None]:
    """Insert ``count`` markers (parameters ``t<i>``, ``f<i>`` and, without the server's clock,
    ``a<i>``), keeping the newer time of a marker already there: the SQL for ``driver`` and, when
    its parameters are positional, their names in order. Compiled here once per count: SQLAlchemy
    compiles a statement of many rows again on every execution (it has no cache key)."""
    clock = dialect.clock_expression()
    stmt = dialect.insert(table).values([
        {"entity_type": sa.bindparam(f"t{i}"), "field_name": sa.bindparam(f"f{i}"),
         "at": clock if clock is not None else sa.bindparam(f"a{i}")} for i in range(count)])
    stmt = stmt.on_conflict_do_update(index_elements=["entity_type", "field_name"],
                                      set_={"at": dialect.greatest(stmt.excluded.at, table.c.at)})
    compiled = stmt.compile(dialect=driver)
    return str(compiled), tuple(compiled.positiontup) if compiled.positional else None


def active(conn: Connection, table: sa.Table) -> frozenset[Marker]:
    """The markers standing now (one query on a table that is empty most of the time)."""
    return frozenset((r.entity_type, r.field_name)
                     for r in conn.execute(sa.select(table.c.entity_type, table.c.field_name)))


def check(touched: Collection[Marker], markers: Collection[Marker]) -> None:
    """Raise ``pending-write`` when a read touching ``touched`` meets a marker.

    ``touched`` holds (type, field) for every field a read names (return fields, filters,
    sorts, each hop of a deep path, implicit fields) and (type, "*") for every type it reads.
    """
    if not markers:
        return
    for entity_type, fname in touched:
        if (entity_type, fname) in markers or (entity_type, WHOLE_TYPE) in markers:
            raise Passthrough("pending-write", f"{entity_type}.{fname}")


def check_read(conn: Connection, table: sa.Table, touched: Collection[Marker]) -> None:
    """:func:`check` against the markers standing now (one query, on every read).

    All the markers are read (at most one per cached field; none most of the time), in plain
    SQL built once per table: the cheapest statement the driver can run, no expanding list."""
    rows = conn.exec_driver_sql(_all_markers_sql(conn, table)).all()
    if rows:
        check(touched, frozenset((r[0], r[1]) for r in rows))


def _all_markers_sql(conn: Connection, table: sa.Table) -> str:
    key = f"sgcache_all_markers_{conn.dialect.name}"
    sql = table.info.get(key)
    if sql is None:  # quoted as the dialect quotes (a schema-qualified table too)
        quote = conn.dialect.identifier_preparer
        sql = (f"SELECT {quote.quote(table.c.entity_type.name)}, {quote.quote(table.c.field_name.name)} "
               f"FROM {quote.format_table(table)}")
        table.info[key] = sql
    return sql


def nothing_queued(store: Any, conn: Connection) -> bool:
    """Whether no fetch and no link search (cache/replica/linksearch.py) waits: the markers a
    revival set stand until SG was asked for the rows linking it and they were read again."""
    return fetchqueue.is_empty(conn, store.fetch_queue) and linksearch.is_empty(conn, store.link_search)


def poll_started(store: Any, conn: Connection) -> float:
    """Call before an ingester poll asks SG for events (in its transaction): the time to pass to
    :func:`poll_done`. When the fetches an earlier complete poll queued are all done, the
    markers that poll covers clear now."""
    now = db_clock(conn)
    candidate = store.get_state(conn, PENDING_CAUGHT_UP)
    if isinstance(candidate, int | float) and nothing_queued(store, conn):
        clear(conn, store.pending, float(candidate))
    return now


def clear(conn: Connection, table: sa.Table, started: float) -> int:
    """Drop the markers of writes learned ``MARGIN`` seconds or more before ``started``."""
    res = conn.execute(table.delete().where(table.c.at < started - MARGIN))
    if res.rowcount:
        log.debug("%d pending-write markers cleared", res.rowcount)
    return int(res.rowcount or 0)


def poll_done(store: Any, conn: Connection, started: float, events: Iterable[Mapping[str, Any]],
              full: bool) -> None:
    """After an ingester poll applied ``events``: learn pairs from backref events, and (when the
    poll reached the end of the log and no fetch is queued) clear the markers it covers."""
    with conn.begin():
        pairs.learn_from_events(conn, store.pairs_table, events)
        if full:
            return
        # Rows the poll queued for a fetch (a New) are not in the replica yet, and a proxy may
        # know of the queue only a second later (its cached context): clear once it is empty,
        # now or at the start of a later poll (the fetches run between polls).
        if nothing_queued(store, conn):
            clear(conn, store.pending, started)
        store.set_state(conn, PENDING_CAUGHT_UP, started)
