"""The fetch queue (``sgcache_fetch``): entities whose rows must be re-read whole from SG.

Writers queue entities through :class:`cache.replica.writes.WriteBatch` (``queue``/``unqueue``,
flushed with their transaction): the ingester when an event's value cannot be applied (a New,
a revival, a row never seen, a value in doubt), the proxy after a partial write answer. The
ingester re-reads them after every poll (:mod:`cache.ingest.fetch`); meanwhile reads of a type
with queued entities pass (``pending-fetch``), and pending-write markers clear only once the
queue is empty (cache/replica/pending.py). This module is the only one that writes SQL against the
table; it sits beside the store, not in the ingester, because the proxy and the write path
use it too.

Rule kept here: removing the entries a fetch handled keeps any that were queued again after
the fetch read the queue (a later ``queued_at``), so a change queued meanwhile is fetched again.
``queued_at`` is the database server's clock (``Store.db_now``): the proxies and the ingester
may run on hosts whose clocks disagree, and a re-queue stamped by a host behind would look
older than the read and be dropped unfetched.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..wire import Key, chunks
from .dialect import dialect_for

TYPE_LEN = 64
#: The reason of a row a re-read left out a link of (to an entity the replica holds live): the
#: ingester's fetch reads it again once a poll has caught up after it (cache/ingest/fetch.py).
LINK_LEFT_OUT = "link left out"
#: Ids per DELETE when entries are removed.
CHUNK = 500


def define_table(metadata: sa.MetaData) -> sa.Table:
    """``sgcache_fetch``: one row per queued entity, with why and when it was (last) queued."""
    return sa.Table(
        "sgcache_fetch",
        metadata,
        sa.Column("entity_type", sa.String(TYPE_LEN), primary_key=True),
        sa.Column("entity_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("reason", sa.String(64)),
        sa.Column("queued_at", sa.DateTime, nullable=False),
    )


def put(conn: Connection, table: sa.Table, entries: Mapping[Key, str], now: dt.datetime) -> None:
    """Queue entities (``{(type, id): reason}``); one already queued gets the new reason and time."""
    if not entries:
        return
    rows = [{"entity_type": t, "entity_id": i, "reason": reason, "queued_at": now}
            for (t, i), reason in sorted(entries.items())]
    upsert = dialect_for(conn).upsert(table, ["entity_type", "entity_id"], ["reason", "queued_at"])
    conn.execute(upsert, rows)


def remove(conn: Connection, table: sa.Table, keys: Iterable[Key]) -> None:
    """Drop entities from the queue (their rows are complete now), whenever they were queued."""
    rows = [{"p_type": t, "p_id": i} for t, i in sorted(keys)]
    if rows:
        conn.execute(table.delete().where((table.c.entity_type == sa.bindparam("p_type"))
                                          & (table.c.entity_id == sa.bindparam("p_id"))), rows)


def entries(conn: Connection, table: sa.Table, limit: int) -> dict[str, dict[int, dt.datetime]]:
    """Up to ``limit`` queued entities of each type, the longest queued first: ``{type: {id:
    queued_at}}``. Per type, so rows of one type that cannot be stored never keep another type's
    from their fetch; oldest first, with such rows queued again at the back (:func:`requeue`), so
    they never keep later rows of their own type from it either."""
    out: dict[str, dict[int, dt.datetime]] = {}
    for entity_type in sorted(queued_types(conn, table)):
        rows = conn.execute(sa.select(table.c.entity_id, table.c.queued_at)
                            .where(table.c.entity_type == entity_type)
                            .order_by(table.c.queued_at, table.c.entity_id).limit(limit))
        out[entity_type] = {row.entity_id: row.queued_at for row in rows}
    return out


def requeue(conn: Connection, table: sa.Table, entity_type: str, ids: Iterable[int], reason: str,
            now: dt.datetime) -> None:
    """Queue again, at the back (``queued_at`` now), rows a fetch read but could not store."""
    put(conn, table, {(entity_type, i): reason for i in ids}, now)


def remove_handled(conn: Connection, table: sa.Table, entity_type: str,
                   queued: Mapping[int, dt.datetime]) -> None:
    """Drop the entries a fetch handled (``{id: queued_at}`` as :func:`entries` read them),
    unless they were queued again since."""
    if not queued:
        return
    read_at = max(queued.values())  # re-queued since the read: a later queued_at, kept
    for chunk in chunks(sorted(queued), CHUNK):
        conn.execute(table.delete().where((table.c.entity_type == entity_type) & table.c.entity_id.in_(chunk)
                                          & (table.c.queued_at <= read_at)))


def queued_for(conn: Connection, table: sa.Table, entity_type: str, ids: Iterable[int],
               reason: str) -> dict[int, dt.datetime]:
    """Of these queued entities, those whose last queueing gave ``reason``: ``{id: queued_at}``."""
    out: dict[int, dt.datetime] = {}
    for chunk in chunks(sorted(ids), CHUNK):
        rows = conn.execute(sa.select(table.c.entity_id, table.c.queued_at)
                            .where((table.c.entity_type == entity_type) & table.c.entity_id.in_(chunk)
                                   & (table.c.reason == reason)))
        out.update({int(r.entity_id): r.queued_at for r in rows})
    return out


def queued_with(conn: Connection, table: sa.Table, keys: Iterable[Key], reasons: Iterable[str]) -> set[Key]:
    """Of these entities, those queued with one of ``reasons``."""
    wanted, reasons = set(keys), list(reasons)
    by_type: dict[str, list[int]] = {}
    for entity_type, entity_id in wanted:
        by_type.setdefault(entity_type, []).append(int(entity_id))
    out: set[Key] = set()
    for entity_type, ids in by_type.items():
        for chunk in chunks(sorted(ids), CHUNK):
            rows = conn.execute(sa.select(table.c.entity_id)
                                .where((table.c.entity_type == entity_type) & table.c.entity_id.in_(chunk)
                                       & table.c.reason.in_(reasons)))
            out.update((entity_type, int(r.entity_id)) for r in rows)
    return out


def waiting(conn: Connection, table: sa.Table, reason: str, before: dt.datetime | None) -> set[Key]:
    """The entities queued with ``reason`` at ``before`` or later (all of them when None)."""
    query = sa.select(table.c.entity_type, table.c.entity_id).where(table.c.reason == reason)
    if before is not None:
        query = query.where(table.c.queued_at >= before)
    return {(r.entity_type, int(r.entity_id)) for r in conn.execute(query)}


def queued_types(conn: Connection, table: sa.Table) -> set[str]:
    """The entity types with at least one queued entity (their reads pass: ``pending-fetch``)."""
    return {row.entity_type for row in conn.execute(sa.select(table.c.entity_type).distinct())}


def is_empty(conn: Connection, table: sa.Table) -> bool:
    """Whether no entity waits for a fetch."""
    return conn.execute(sa.select(table.c.entity_id).limit(1)).first() is None
