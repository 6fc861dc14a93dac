"""One poll's events applied in one transaction, with the cursor.

Invariants kept here (see :mod:`cache.ingest`):

- One poll is one transaction: the new events are applied, stored raw in ``sgcache_events``,
  the gaps updated, and the cursor and the heartbeat advanced, all together; a process killed
  at any point leaves either the whole poll or none of it.
- An event already in ``sgcache_events`` is not applied again (a gap's event read twice, a
  sweep finding one applied meanwhile).
- When EventLogEntry is a cached type, every applied event also becomes its EventLogEntry
  row in that transaction (the proxy answers reads of events below the cursor).
- One bad event must not stall the stream: in careful mode each event is applied in its own
  savepoint, and an event that fails (a value the database refuses too) has its entity queued
  for a fetch instead, or is skipped when the replica cannot hold that entity at all.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..replica.statekeys import CHANGES_SETTLED
from ..replica.store import Store, now_utc
from ..replica.writes import WriteBatch
from ..wire import Key, chunks
from .apply import EventApplier
from .config import PollResult
from .eventwire import EVENT_TYPE, links_in_meta, subject_of
from .gaps import EventPosition, insert_rows
from .sgclock import SGClock

log = logging.getLogger("sgcache.events")

#: Ids per ``id in [...]`` when looking for events already stored.
CHUNK = 500

Event = Mapping[str, Any]


def fits(key: Key) -> bool:
    """Whether an entity id fits the replica's 64-bit columns (an event any script creates may
    name any id; SQLite's driver refuses a larger one in a query's parameters)."""
    return -(2**63) <= key[1] < 2**63


def refused_value(exc: BaseException) -> bool:
    """Whether the database refused a value of the statement (out of range, too long, a
    constraint), not failed: that event's trouble, which careful mode sets aside."""
    return isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError)


def stored_ids(store: Store, conn: Connection, ids: list[int]) -> set[int]:
    """Which of these event ids are in ``sgcache_events`` already."""
    table = store.events
    out: set[int] = set()
    for chunk in chunks(ids, CHUNK):
        out.update(r.id for r in conn.execute(sa.select(table.c.id).where(table.c.id.in_(chunk))))
    return out


def store_raw(store: Store, conn: Connection, events: Sequence[Event]) -> None:
    """Keep the events as SG sent them (``scripts/reprocess`` replays them); ids already kept are skipped."""
    if not events:
        return
    now = now_utc()
    rows = [{"id": int(e["id"]), "event_type": str(e.get("event_type") or "")[:128],
             "created_at": e.get("created_at"), "body": json.dumps(e, default=str, sort_keys=True),
             "received_at": now} for e in events]
    insert_rows(store, conn, store.events, ["id"], rows)


class BatchApplier:
    """Applies a poll's events and moves the stream's position, inside the poll's transaction."""

    def __init__(self, store: Store, applier: EventApplier, position: EventPosition, sg_clock: SGClock):
        self.store = store
        self.applier = applier
        self.position = position
        self.sg_clock = sg_clock

    def apply_batch(self, conn: Connection, events: Sequence[Event], gaps: dict[int, dt.datetime],
                    high: int, result: PollResult, careful: bool = False) -> None:
        """Apply events (inside the caller's transaction), then move gaps, cursor and heartbeat.

        The write lock is taken first: the old-value guard compares each event with the rows as
        loaded here, and a proxy's learnt write committed between this load and the flush would be
        overwritten by an older event (PostgreSQL; SQLite's write transaction holds it from BEGIN)."""
        self.store.dialect.lock_writes(conn)
        events = sorted(events, key=lambda e: int(e["id"]))
        seen = stored_ids(self.store, conn, [int(e["id"]) for e in events])
        fresh = [(e, subject_of(e)) for e in events if int(e["id"]) not in seen]  # each subject once
        buf = WriteBatch(self.store, conn)
        buf.load(subject for _e, subject in fresh if subject is not None and fits(subject))
        buf.load_links(self._link_keys(fresh))
        self.applier.recent = {int(e["id"]): e for e in events}  # a backref's original event
        self.applier.unsettled = self._unsettled(conn, fresh)
        try:
            for event, subject in fresh:
                late = int(event["id"]) <= high
                if careful:
                    self._apply_guarded(conn, event, subject, late, buf)
                else:
                    self.applier.apply(conn, event, subject, late, buf)
            self.applier.queue_linking(buf)
        finally:
            self.applier.recent = {}
            self.applier.unsettled = ()
            self.applier.revived = set()
        fresh_events = [e for e, _subject in fresh]
        self._event_rows(buf, fresh_events)
        buf.flush()
        result.applied = len(fresh)
        store_raw(self.store, conn, fresh_events)
        self.sg_clock.load(conn)
        self.sg_clock.see(conn, events)
        new_high = max([high, *(int(e["id"]) for e in events)])
        self.position.update_gaps(conn, gaps, events, high, new_high, result)
        self.position.advance(conn, new_high, result.caught_up_at)

    def _unsettled(self, conn: Connection, fresh: Sequence[tuple[Event, Key | None]]) -> set[Key]:
        """The rows among the events' subjects and the rows their metas link to that a proxy wrote
        since the ingester last caught up (``CHANGES_SETTLED``): see cache/ingest/apply.py."""
        keys: set[Key] = set()
        for event, subject in fresh:
            if subject is not None and subject[0] in self.store.tables:
                keys.add(subject)
                keys.update(k for k in links_in_meta(event) if k[0] in self.store.tables)
        keys = {k for k in keys if fits(k)}
        if not keys:
            return set()
        settled = self.store.get_state(conn, CHANGES_SETTLED)
        return self.store.written_since(conn, keys, settled if isinstance(settled, int) else 0)

    def _event_rows(self, buf: WriteBatch, events: Sequence[Event]) -> None:
        """EventLogEntry as a cached type: every applied event becomes its row, in the poll's batch."""
        if EVENT_TYPE not in self.store.tables or not events:
            return
        rows = [{k: v for k, v in e.items() if "." not in k} for e in events]
        # SG shows ``entity`` None while the event's entity is retired, and the entity again once
        # it is revived (no event for these rows): the row keeps the link, hidden while retired
        nulled = [(row, subject) for row, e in zip(rows, events, strict=True)
                  if row.get("entity") is None and (subject := subject_of(e)) is not None]
        retired = buf.retired_now(sorted({subject for _row, subject in nulled}))
        for row, subject in nulled:
            if subject in retired:
                row["entity"] = {"type": subject[0], "id": subject[1]}
        result = buf.put(EVENT_TYPE, rows, complete=True, log_changes=False)
        for key in result.to_fetch or []:
            buf.queue(key, "event row not stored")

    def _link_keys(self, fresh: Iterable[tuple[Event, Key | None]]) -> list[tuple[str, str, int]]:
        """(type, multi_entity field, parent id) that the Changes among the events name."""
        out = []
        for event, subject in fresh:
            attr = event.get("attribute_name")
            if isinstance(attr, str) and subject is not None and fits(subject) and (subject[0], attr) in self.store.multi:
                out.append((subject[0], attr, subject[1]))
        return out

    def _apply_guarded(self, conn: Connection, event: Event, subject: Key | None, late: bool,
                       buf: WriteBatch) -> None:
        try:
            with conn.begin_nested():
                buf.flush()
                self.applier.apply(conn, event, subject, late)  # its own buffer, flushed in the savepoint
        except sa.exc.DBAPIError as exc:
            if not refused_value(exc):
                raise
            log.exception("event %s could not be applied; its entity will be re-read", event.get("id"))
        except Exception:  # noqa: BLE001
            log.exception("event %s could not be applied; its entity will be re-read", event.get("id"))
        else:
            return
        if subject is None:
            return
        try:
            with conn.begin_nested():
                self.store.queue_fetch(conn, [subject], "event failed")
        except sa.exc.DBAPIError as exc:
            if not refused_value(exc):
                raise
            log.error("event %s skipped: the replica cannot hold its entity %s", event.get("id"), subject)
        except (ValueError, OverflowError):  # the driver refused the value (SQLite: beyond 64 bits)
            log.error("event %s skipped: the replica cannot hold its entity %s", event.get("id"), subject)
