"""Link searches (``sgcache_link_search``): revived entities whose linking rows SG must be asked for.

SG leaves a link to a retired entity out of the rows it shows, and shows it again on the
entity's revival with no event for the linking row. The replica keeps such links hidden where
it held them (cache/replica/writes.py), but a row it first read while the entity was retired
(created just before the retirement, or primed by a scan meanwhile) never held the link. So a
revival the ingester applies queues a search here and marks pending the link fields that can
link the revived type (their reads pass); the ingester's fetch step then asks SG which rows
link the entity and queues them for a re-read (cache/ingest/fetch.py), and the markers clear
once both queues are empty (cache/replica/pending.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..wire import EVENT_TYPE, Key, chunks
from . import fieldtypes
from .dialect import dialect_for

TYPE_LEN = 64
#: Entries per DELETE when handled ones are removed.
CHUNK = 500


def define_table(metadata: sa.MetaData) -> sa.Table:
    """``sgcache_link_search``: one row per revived entity still to search for, with when."""
    return sa.Table(
        "sgcache_link_search",
        metadata,
        sa.Column("entity_type", sa.String(TYPE_LEN), primary_key=True),
        sa.Column("entity_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("queued_at", sa.DateTime, nullable=False),
    )


def link_fields(store: Any, entity_type: str, events: bool = True) -> list[tuple[str, str, str]]:
    """(type, field, storage) of every cached link field that can link an ``entity_type`` entity:
    single-entity fields (storage ``entity``) and multi_entity fields kept in link tables
    (``multi``). EventLogEntry's ``entity`` only with ``events``: its rows are written once, as
    SG sent them (cache/ingest/batch.py keeps a row's ``entity`` when its entity is retired, so no
    revival needs to read the rows that hold a link again, :meth:`WriteBatch.linking`); but an
    event polled while its entity was retired in SG and not yet here was stored without the
    link, and only the search finds it (SG shows the link again on the revival, with no event).
    Its other link fields (``user``, ``project``) are left out: a revived user or project would
    have every event it ever made or held read again (see docs/semantics.md)."""
    out: list[tuple[str, str, str]] = []
    for entity in store.schema.entities.values():
        if entity.name not in store.tables or (entity.name == EVENT_TYPE and not events):
            continue
        for fname, fschema in entity.fields.items():
            if (fschema.links and entity_type not in fschema.links) or (entity.name == EVENT_TYPE
                                                                          and fname != "entity"):
                continue
            info = fieldtypes.TYPES.get(fschema.data_type)
            if info is None or (info.storage == "multi" and (entity.name, fname) not in store.multi):
                continue
            if info.storage in ("entity", "multi"):
                out.append((entity.name, fname, info.storage))
    return out


def put(conn: Connection, table: sa.Table, keys: Iterable[Key], now: dt.datetime) -> None:
    """Queue searches for these revived entities (one already queued gets the new time)."""
    rows = [{"entity_type": t, "entity_id": int(i), "queued_at": now} for t, i in sorted(set(keys))]
    if rows:
        conn.execute(dialect_for(conn).upsert(table, ["entity_type", "entity_id"], ["queued_at"]), rows)


def entries(conn: Connection, table: sa.Table, limit: int) -> dict[Key, dt.datetime]:
    """Up to ``limit`` queued searches, the longest queued first: ``{(type, id): queued_at}``."""
    rows = conn.execute(sa.select(table.c.entity_type, table.c.entity_id, table.c.queued_at)
                        .order_by(table.c.queued_at, table.c.entity_type, table.c.entity_id).limit(limit))
    return {(r.entity_type, int(r.entity_id)): r.queued_at for r in rows}


def remove_handled(conn: Connection, table: sa.Table, entity_type: str, handled: Mapping[int, dt.datetime]) -> None:
    """Drop the searches done (``{id: queued_at}`` as :func:`entries` read them), unless queued
    again since (the entity retired and revived again meanwhile: SG is asked again)."""
    if not handled:
        return
    read_at = max(handled.values())
    for chunk in chunks(sorted(handled), CHUNK):
        conn.execute(table.delete().where((table.c.entity_type == entity_type) & table.c.entity_id.in_(chunk)
                                          & (table.c.queued_at <= read_at)))


def is_empty(conn: Connection, table: sa.Table) -> bool:
    """Whether no search waits."""
    return conn.execute(sa.select(table.c.entity_id).limit(1)).first() is None
