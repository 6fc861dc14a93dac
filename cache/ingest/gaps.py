"""Where the ingester stands in the event stream: cursor, high, floor and the open gaps.

Invariants kept here (see :mod:`cache.ingest`):

- ``event_cursor``: every event id at or below it is applied or given up. It moves, in the
  poll's transaction, to just below the lowest open gap (or to ``event_high`` when none is open).
- ``event_high``: the highest event id applied; ids between the cursor and it that were never
  seen are open gaps (``sgcache_gaps``), looked for on every poll.
- A gap is given up once the event that revealed it is ``gap_timeout`` seconds old by SG's
  clock (:mod:`cache.ingest.sgclock`): its ``first_seen`` is the ``created_at`` of the first
  visible event above it (SG's estimated now when there is none). More than ``max_gap_span``
  missing ids at once are not waited for (the sweep may still find them).
- ``event_floor``: the cursor the replica started from, set with the first cursor (by the prime
  or here): events at or below it came with the scan, and the sweep never looks there.
- A given-up id is kept (``sgcache_given_up``, with SG's time it was given up) in the same
  transaction, and looked for by id by every sweep until it shows (then it is applied and
  forgotten with it) or until a sweep ``given_up_keep`` seconds later (SG's clock) still does not
  find it; at most ``given_up_max`` are kept (the lowest are dropped first). The time counts
  only at a sweep that asked SG, so an ingester down longer than that loses none.
- The first cursor (:func:`starting_cursor`) is the newest event id, or just below the lowest id
  not visible yet among the recent ones: SG takes an event id at insert and shows it at commit,
  so a transaction open at that moment holds a lower id, which must be waited for as a gap.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..replica.statekeys import EVENT_CURSOR, EVENT_FLOOR, EVENT_HIGH, INGESTER_HEARTBEAT
from ..replica.store import Store
from ..wire import chunks, parse_wire_dt, to_wire
from .config import IngestConfig, PollResult, SGClient
from .eventwire import EVENT_TYPE, id_ranges
from .sgclock import SGClock

log = logging.getLogger("sgcache.events")

#: Ids per DELETE of given-up gaps.
CHUNK = 500


def starting_cursor(sg: SGClient, config: IngestConfig) -> int:
    """Where a replica's event stream starts: the newest event id, or just below the lowest id
    missing among the events created in the last ``sweep_window`` seconds before it (SG's clock;
    at most ``max_gap_span`` ids back). A missing id may be a transaction still open (its event
    shows when it commits, after the scan read its row): starting below it, the ingester replays
    the visible events above it (idempotent) and waits for it as for any gap, and the sweep looks
    for it above the floor. 0 when SG has no event."""
    desc = [{"field_name": "id", "direction": "desc"}]
    newest = [to_wire(e) for e in sg.find(EVENT_TYPE, [], ["id", "created_at"], order=desc, limit=1)]
    if not newest:
        return 0
    top = int(newest[0]["id"])
    created = parse_wire_dt(newest[0].get("created_at"))
    lowest = max(0, top - config.max_gap_span)
    if created is None or top - lowest <= 1:
        return top
    since = (created - dt.timedelta(seconds=config.sweep_seconds())).replace(tzinfo=dt.UTC)
    recent = sorted(int(e["id"]) for e in sg.find(
        EVENT_TYPE, [["id", "greater_than", lowest], ["created_at", "greater_than", since]], ["id"],
        order=[{"field_name": "id", "direction": "asc"}], limit=config.max_gap_span))
    # ids below the first recent event, down to the visible one before it, were revealed by a recent event too
    before = sg.find(EVENT_TYPE, [["id", "greater_than", lowest], ["id", "less_than", recent[0] if recent else top]],
                     ["id"], order=desc, limit=1)
    base = int(before[0]["id"]) if before else lowest
    missing = sorted(set(range(base + 1, top)) - set(recent))
    if not missing:
        return top
    log.info("event ids %s below the newest event %d not visible yet: the event stream starts below them",
             id_ranges(missing), top)
    return missing[0] - 1


def insert_rows(store: Store, conn: Connection, table: sa.Table, keys: Sequence[str],
                rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT many rows, skipping those whose primary key ``keys`` is already there."""
    if rows:
        conn.execute(store.dialect.upsert(table, keys), list(rows))


class EventPosition:
    """The cursor, high, floor and open gaps of the replica's event stream."""

    def __init__(self, store: Store, sg: SGClient | None, config: IngestConfig, sg_clock: SGClock):
        self.store = store
        self.sg = sg
        self.config = config
        self.sg_clock = sg_clock

    def cursor(self, conn: Connection) -> tuple[int, int]:
        """(cursor, high); with no cursor yet, start at :func:`starting_cursor` (and set the floor there)."""
        cursor = self.store.get_state(conn, EVENT_CURSOR)
        if cursor is None:
            cursor = 0 if self.sg is None else starting_cursor(self.sg, self.config)
            log.warning("no event cursor yet: starting after event %d (the newest, or below an id not "
                        "visible yet; prime the replica with sgcache-scan --full)", cursor)
            self.store.set_state(conn, EVENT_CURSOR, cursor)
            if self.store.get_state(conn, EVENT_FLOOR) is None:
                self.store.set_state(conn, EVENT_FLOOR, cursor)
        high = self.store.get_state(conn, EVENT_HIGH)
        return int(cursor), max(int(cursor), int(high or 0))

    def floor(self, conn: Connection, cursor: int) -> int:
        """The id at or below which events predate this replica's event stream (the prime's cursor):
        their effects came with the scan, so the sweep never treats them as late. Replicas primed
        before the floor was recorded: the id below the first event stored, else the cursor."""
        floor = self.store.get_state(conn, EVENT_FLOOR)
        if floor is not None:
            return int(floor)
        first = conn.execute(sa.select(sa.func.min(self.store.events.c.id))).scalar()
        return int(first) - 1 if first is not None else cursor

    def open_gaps(self, conn: Connection) -> dict[int, dt.datetime]:
        """The open gaps: ``{event id: first_seen}``."""
        table = self.store.gaps
        return {r.id: r.first_seen for r in conn.execute(sa.select(table.c.id, table.c.first_seen))}

    def given_up(self, conn: Connection) -> dict[int, dt.datetime]:
        """The given-up ids still looked for: ``{event id: given_up_at}`` (SG's clock)."""
        table = self.store.given_up
        return {r.id: r.given_up_at for r in conn.execute(sa.select(table.c.id, table.c.given_up_at))}

    def keep_given_up(self, conn: Connection, ids: Sequence[int], now: dt.datetime, result: PollResult) -> None:
        """Keep ids just given up, to be looked for by id by the sweep; beyond ``given_up_max`` the
        lowest (the oldest) are no longer looked for."""
        table = self.store.given_up
        insert_rows(self.store, conn, table, ["id"], [{"id": i, "given_up_at": now} for i in ids])
        over = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() - self.config.given_up_max
        if over <= 0:
            return
        dropped = [r.id for r in conn.execute(sa.select(table.c.id).order_by(table.c.id).limit(over))]
        self.forget_given_up(conn, dropped)
        result.given_up_dropped = dropped
        log.warning("more than %d given-up event ids: ids %s are no longer looked for",
                    self.config.given_up_max, id_ranges(dropped))

    def expire_given_up(self, conn: Connection, given_up: Mapping[int, dt.datetime], found: set[int],
                        result: PollResult) -> None:
        """After a sweep looked for ``given_up`` by id and found ``found``: stop looking for those
        given up ``given_up_keep`` seconds ago (SG's clock)."""
        now = self.sg_clock.now()
        expired = sorted(i for i, at in given_up.items()
                         if i not in found and (now - at).total_seconds() >= self.config.given_up_keep)
        if expired:
            self.forget_given_up(conn, expired)
            result.given_up_dropped = expired
            log.warning("event ids %s still not visible %ss (SG's clock) after they were given up: "
                        "no longer looked for", id_ranges(expired), self.config.given_up_keep)

    def forget_given_up(self, conn: Connection, ids: Sequence[int]) -> None:
        """Stop looking for these ids (applied, or looked for long enough)."""
        table = self.store.given_up
        for chunk in chunks(sorted(ids), CHUNK):
            conn.execute(table.delete().where(table.c.id.in_(chunk)))

    def advance(self, conn: Connection, new_high: int, caught_up_at: str | None) -> None:
        """After a poll's events are applied: the cursor to just below the lowest open gap (else
        ``new_high``) and the high mark, in the poll's transaction; and the heartbeat, only when the
        poll reached the end of the stream (``caught_up_at``: when it asked SG). A poll that took a
        full batch leaves the heartbeat alone: while the ingester works through a backlog (after an
        outage, a restore) the replica is behind SG, and the proxy must pass once the heartbeat is
        older than its ``sgcache_max_lag``."""
        still_open = self.open_gaps(conn)
        self.store.set_state(conn, EVENT_CURSOR, (min(still_open) - 1) if still_open else new_high)
        self.store.set_state(conn, EVENT_HIGH, new_high)
        if caught_up_at is not None:
            self.store.set_state(conn, INGESTER_HEARTBEAT, caught_up_at)

    def update_gaps(self, conn: Connection, gaps: dict[int, dt.datetime], events: Sequence[Mapping[str, Any]],
                    high: int, new_high: int, result: PollResult) -> None:
        """Fill gaps that showed up, give up those revealed ``gap_timeout`` ago by SG's clock, open new ones
        (``first_seen``: the ``created_at`` of the first event above the gap, else SG's estimated now)."""
        table = self.store.gaps
        ids = [int(e["id"]) for e in events]
        late = [i for i in ids if i <= high and i not in gaps]  # only a sweep brings these
        if late:
            self.forget_given_up(conn, late)
        filled = sorted(set(gaps) & set(ids))
        if filled:
            conn.execute(table.delete().where(table.c.id.in_(filled)))
            result.gaps_filled = len(filled)
            log.info("late events applied for gap ids %s", id_ranges(filled))
        now = self.sg_clock.now()
        timeout = self.config.gap_timeout

        def too_old(first: dt.datetime) -> bool:
            return (now - first).total_seconds() >= timeout

        expired = sorted(i for i, first in gaps.items() if i not in filled and too_old(first))
        if expired:
            for chunk in chunks(expired, CHUNK):
                conn.execute(table.delete().where(table.c.id.in_(chunk)))
        missing = sorted(set(range(high + 1, new_high)) - set(ids))
        if len(missing) > self.config.max_gap_span:
            log.warning("%d event ids between %d and %d never seen: too many to wait for, skipped",
                        len(missing), high, new_high)
            missing = []
        opened = []
        if missing:
            created = sorted((int(e["id"]), parse_wire_dt(e.get("created_at"))) for e in events)
            created_ids = [i for i, _t in created]
            for gap_id in missing:
                at = bisect.bisect_right(created_ids, gap_id)  # the event that revealed it
                after = created[at][1] if at < len(created) else None
                first = after if after is not None else now
                if too_old(first):
                    expired.append(gap_id)
                else:
                    opened.append({"id": gap_id, "first_seen": first})
        if opened:
            insert_rows(self.store, conn, table, ["id"], opened)  # all above ``high``
            result.gaps_opened = len(opened)
            log.debug("event ids %s not visible yet: open gaps", id_ranges([r["id"] for r in opened]))
        if expired:
            result.gaps_expired = sorted(expired)
            log.warning("gave up on event ids %s: not visible %ss (SG's clock) after a later event; "
                        "the sweep still looks for them", id_ranges(result.gaps_expired), timeout)
            self.keep_given_up(conn, result.gaps_expired, now, result)
