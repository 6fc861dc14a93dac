"""The :class:`Ingester`: leads, then polls SG's event log and applies it, until stopped.

A poll reads the events above ``event_high`` plus the open gaps that became visible, applies
them in one transaction (:mod:`cache.ingest.batch`), then re-reads the fetch queue
(:mod:`cache.ingest.fetch`) and handles schema events (:mod:`cache.ingest.schemarefresh`);
every ``sweep_every`` polls a sweep applies late-visible events. Invariants kept here:

- Never exit on trouble: SG unreachable or answering errors is retried with exponential
  back-off (up to ``retry_max``); a database error drops the connection, which ends the
  session and so the PostgreSQL leadership, and leadership is taken again before the next poll.
- A batch that fails to apply (a value the database refuses too) is applied again event by event
  (careful mode), so one bad event does not stall the stream.
- The heartbeat moves only with a poll that reached the end of the stream (the time it asked
  SG): every ``poll_interval`` while events come, backing off to ``idle_max`` while none do (the
  proxy's ``sgcache_max_lag`` counts on it); a poll working through a backlog says nothing of freshness.
- A poll asks for ``batch`` events; after a full one (a backlog: a restart, an outage, a burst)
  it asks for ``catch_up_batch`` until it reaches the end, so catching up costs fewer
  transactions and folds repeated fetches of the same entity.
- The sweep looks for the given-up ids by id (one query, whatever their age) and for the ids
  among SG's last ``sweep_window`` seconds, never at or below ``event_floor``; what it applies
  goes through the same one-transaction batch, which forgets the given-up ids it applies (event
  by event, as a poll, when the batch fails).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..ops.metrics import IngestMetrics
from ..replica import pending
from ..replica.dialect import LeaderLock, leader_lock_for
from ..replica.statekeys import EVENT_CURSOR, EVENT_HIGH
from ..replica.store import Store
from ..replica.writes import WriteBatch
from ..wire import chunks, to_wire, wire_from_epoch
from .apply import EventApplier
from .batch import BatchApplier, refused_value, stored_ids
from .config import IngestConfig, PollResult, SGClient
from .eventwire import EVENT_TYPE, FETCH_CHUNK, event_fields, id_ranges
from .fetch import Fetcher
from .gaps import EventPosition
from .leader import LeaderSession
from .retention import EventRetention
from .schemarefresh import SchemaRefresh
from .settling import Settling
from .sgclock import SGClock, SteadyClock

log = logging.getLogger("sgcache.events")


class Ingester:
    """Polls events from ``sg`` and applies them to ``store``."""

    def __init__(self, store: Store, sg: SGClient | None, config: IngestConfig | None = None,
                 clock: Callable[[], dt.datetime] | None = None, lock: LeaderLock | None = None,
                 metrics: IngestMetrics | None = None):
        self.store = store
        self.metrics = metrics or IngestMetrics()  # served by scripts/ingest-events --metrics
        self.sg = sg
        self.config = config or IngestConfig()
        self.clock = clock or SteadyClock()  # elapsed time only: SG's clock is estimated (sgclock.py)
        self.lock = lock or leader_lock_for(store.engine)
        self.stop_event = threading.Event()
        self.stop_reason: str | None = None
        self.session = LeaderSession(store, self.lock, self.stop_event, self.config.lock_retry)
        self.sg_clock = SGClock(store, self.clock)
        self.position = EventPosition(store, sg, self.config, self.sg_clock)
        self.schema_refresh = SchemaRefresh(store, sg, self.connect)
        self.applier = EventApplier(store, self.schema_refresh)
        self.batch = BatchApplier(store, self.applier, self.position, self.sg_clock)
        self.settling = Settling(store)
        self.retention = EventRetention(store, self.config.events_keep)
        self.fetcher = Fetcher(store, sg, self.connect, self.schema_refresh.missing_fields,
                               self.schema_refresh.request)
        self._event_fields = event_fields(store)
        self._polls = 0
        self._behind = False  # the last poll was full: the next asks for catch_up_batch events

    # -- connection and leadership (cache/ingest/leader.py) ----------------------------
    @property
    def conn(self) -> Connection | None:
        return self.session.conn

    def connect(self) -> Connection:
        """The ingester's own connection (the one holding the leader lock on PostgreSQL)."""
        return self.session.connect()

    def close(self) -> None:
        """Give up leadership: the session holding the advisory lock is ended, not pooled."""
        self.session.close()

    def become_leader(self, wait: bool = True) -> bool:
        """Take the leader lock, waiting (PostgreSQL) while another ingester holds it."""
        return self.session.become_leader(wait)

    # -- the loop ----------------------------------------------------------------------
    def run(self, follow: bool = True) -> None:
        """Lead, then poll until stopped (``follow``) or caught up (once)."""
        if not self.become_leader(wait=True):
            return
        self.metrics.leader.set(1)
        delay = self.config.poll_interval
        failures = 0
        while not self.stop_event.is_set():
            try:
                result = self.poll_once()
                self.metrics.polled(result.applied)
                self._polls += 1
                if self.config.sweep_every > 0 and self._polls % self.config.sweep_every == 0:
                    self.sweep()
                self.process_fetch_queue()
                self.process_schema()
            except sa.exc.DBAPIError as exc:
                failures += 1
                self.metrics.failed("database")
                log.error("database error (attempt %d): %s; reconnecting", failures, exc)
                self.session.drop_connection()
                self.metrics.leader.set(0)
                self.stop_event.wait(self._backoff(failures))
                if not self.become_leader(wait=True):
                    return
                self.metrics.leader.set(1)
                continue
            except Exception as exc:  # noqa: BLE001 - SG unreachable or answering errors: retry, never exit
                failures += 1
                self.metrics.failed("sg")
                log.error("poll failed (attempt %d): %s: %s", failures, type(exc).__name__, exc,
                          exc_info=failures == 1)
                self.stop_event.wait(self._backoff(failures))
                continue
            if failures:
                log.info("SG reachable again after %d failed attempts", failures)
            failures = 0
            if not follow and not result.full:
                return
            if result.full:
                delay = self.config.poll_interval
                continue
            delay = self.config.poll_interval if result.received else min(delay * 1.5, self.config.idle_ceiling())
            self.stop_event.wait(delay)

    def _backoff(self, failures: int) -> float:
        base = max(self.config.poll_interval, 0.1)
        return min(self.config.retry_max, base * 2 ** min(failures - 1, 10))

    def stop(self, reason: str = "asked to stop") -> None:
        self.stop_reason = self.stop_reason or reason
        self.stop_event.set()

    def log_shutdown(self, reason: str | None = None) -> None:
        """Log why the ingester stops and where its cursor is (never raises)."""
        why = reason or self.stop_reason or "done"
        try:
            conn = self.store.engine.connect()
            try:
                with conn.begin():
                    cursor = self.store.get_state(conn, EVENT_CURSOR)
                    high = self.store.get_state(conn, EVENT_HIGH)
            finally:
                conn.close()
            where = f"event cursor {cursor}, highest event applied {high}"
        except Exception as exc:  # noqa: BLE001 - the database may be why it stops
            where = f"cursor unknown ({type(exc).__name__})"
        log.info("ingester stopping (%s): %s", why, where)

    # -- one poll ----------------------------------------------------------------------
    def poll_once(self) -> PollResult:
        """Read the next events and apply them, with the cursor, in one transaction."""
        conn = self.connect()
        with conn.begin():
            cursor, high = self.position.cursor(conn)
            gaps = self.position.open_gaps(conn)
            mark = self.store.change_mark(conn)  # before the clock: every record at or below it is older
            started = pending.poll_started(self.store, conn)
        self.settling.poll_started(started, mark)
        asked = time.monotonic()
        limit = self.config.catch_up_batch if self._behind else self.config.batch
        events = self.fetch_events(high, sorted(gaps), limit) if self.sg is not None else []
        full = len(events) >= limit + len(gaps)
        self._behind = full
        caught_up = None if full else asked
        result = self._apply_or_carefully(conn, events, full, caught_up, "the batch")
        if self.sg is not None:
            pending.poll_done(self.store, conn, started, events, full)  # learn pairs, clear markers
            if not full:
                self.settling.caught_up(conn, started)  # the proxies' writes it is past
                self.retention.caught_up(conn, self.sg_now(), cursor)  # events older than events_keep
        return result

    def _apply_or_carefully(self, conn: Connection, events: list[dict[str, Any]], full: bool,
                            caught_up: float | None, what: str) -> PollResult:
        """:meth:`_apply_polled` of ``events`` in one go; when that fails other than by the database
        failing (a bug, a value the database refuses), again event by event (careful mode): one bad
        event must not keep the others out. A database failure raises."""
        try:
            return self._apply_polled(conn, events, full, careful=False, caught_up=caught_up)
        except sa.exc.DBAPIError as exc:
            if not refused_value(exc):
                raise
            log.exception("the database refused a value of %s; retrying event by event", what)
        except Exception:  # noqa: BLE001 - one bad event must not stall the stream
            log.exception("applying %s failed; retrying event by event", what)
        return self._apply_polled(conn, events, full, careful=True, caught_up=caught_up)

    def _apply_polled(self, conn: Connection, events: list[dict[str, Any]], full: bool,
                      careful: bool, caught_up: float | None = None) -> PollResult:
        """Apply ``events`` in one transaction; ``caught_up``: when (``time.monotonic()``) the poll
        that reached the end of the stream asked SG, which becomes the heartbeat."""
        result = PollResult(received=len(events), full=full)
        with conn.begin():
            if caught_up is not None:
                result.caught_up_at = heartbeat_at(conn, caught_up)
            _cursor, high = self.position.cursor(conn)
            gaps = self.position.open_gaps(conn)
            self.apply_batch(conn, events, gaps, high, result, careful=careful)
        return result

    def fetch_events(self, high: int, gaps: list[int], limit: int | None = None) -> list[dict[str, Any]]:
        """Events above ``high`` plus any open gap that became visible, by id: ``limit`` of them
        (default ``batch``) plus the gaps."""
        limit = self.config.batch if limit is None else limit
        filters: list[Any] = [["id", "greater_than", high]]
        if gaps:
            filters = [{"filter_operator": "any",
                        "filters": [["id", "in", gaps], ["id", "greater_than", high]]}]
        events = self.sg.find(EVENT_TYPE, filters, self._event_fields,  # type: ignore[union-attr]
                              order=[{"field_name": "id", "direction": "asc"}], limit=limit + len(gaps))
        return [to_wire(e) for e in events]

    # -- the sweep ---------------------------------------------------------------------
    def sweep(self) -> PollResult:
        """Apply the events whose ids were never applied: given-up ids that SG shows now (looked
        for by id, however old), and ids among the events created in the last ``sweep_window``
        seconds (SG's clock: gaps too wide to wait for)."""
        result = PollResult()
        sg = self.sg
        if sg is None:
            return result
        conn = self.connect()
        with conn.begin():
            self.sg_clock.load(conn)
            cursor, _high = self.position.cursor(conn)
            floor = self.position.floor(conn, cursor)
            given_up = self.position.given_up(conn)
        # one query for all of them (at most given_up_max ids), independent of their created_at
        events = self._find_events(sg, sorted(given_up)) if given_up else []
        found = {int(e["id"]) for e in events}
        if floor < cursor:
            missing = sorted(self._missing_in_window(sg, conn, floor, cursor) - found)
            for chunk in chunks(missing, FETCH_CHUNK):
                events.extend(self._find_events(sg, list(chunk)))
        if events:
            result = self._apply_or_carefully(conn, events, False, None, "the swept events")
            result.swept = sorted(int(e["id"]) for e in events)
            log.warning("sweep: applied event ids %s, visible only after their gap was given up",
                        id_ranges(result.swept))
        if given_up:
            with conn.begin():
                self.position.expire_given_up(conn, given_up, found, result)
        return result

    def _missing_in_window(self, sg: SGClient, conn: Connection, floor: int, cursor: int) -> set[int]:
        """Ids of the events created in the last ``sweep_window`` seconds (SG's clock), above the
        floor and at or below the cursor, that were never applied: read ``sweep_limit`` ids at a
        time, by id, through the whole window (a busy site logs more than one read returns)."""
        since = self.sg_now() - dt.timedelta(seconds=self.config.sweep_seconds())
        ids: list[int] = []
        after = floor
        while True:
            rows = sg.find(EVENT_TYPE, [["created_at", "greater_than", since.replace(tzinfo=dt.UTC)],
                                        ["id", "greater_than", after],
                                        ["id", "less_than", cursor + 1]], ["id"],
                           order=[{"field_name": "id", "direction": "asc"}], limit=self.config.sweep_limit)
            page = [int(r["id"]) for r in rows]
            ids += page
            if len(page) < self.config.sweep_limit or not page:
                break
            after = page[-1]
        with conn.begin():
            return set(ids) - stored_ids(self.store, conn, ids)

    def _find_events(self, sg: SGClient, ids: list[int]) -> list[dict[str, Any]]:
        """The events among ``ids`` that SG shows, by id."""
        return [to_wire(e) for e in sg.find(EVENT_TYPE, [["id", "in", ids]], self._event_fields,
                                            order=[{"field_name": "id", "direction": "asc"}])]

    # -- the parts, for scripts and tests ----------------------------------------------
    def sg_now(self) -> dt.datetime:
        """SG's clock as estimated from the events seen (:class:`~cache.ingest.sgclock.SGClock`)."""
        return self.sg_clock.now()

    def apply_batch(self, conn: Connection, events: Sequence[Mapping[str, Any]], gaps: dict[int, dt.datetime],
                    high: int, result: PollResult, careful: bool = False) -> None:
        """Apply events (inside the caller's transaction), then move gaps, cursor and heartbeat."""
        self.batch.apply_batch(conn, events, gaps, high, result, careful=careful)

    def apply_event(self, conn: Connection, event: Mapping[str, Any], late: bool = False,
                    buf: WriteBatch | None = None) -> None:
        """Apply one event inside the caller's transaction; applying it twice changes nothing."""
        self.applier.apply_event(conn, event, late, buf)

    def process_fetch_queue(self, limit: int = 5000) -> int:
        """Re-read queued entities from SG, grouped per type; returns how many were handled."""
        return self.fetcher.process(limit)

    def fetch_fields(self, entity_type: str) -> list[str]:
        return self.fetcher.fetch_fields(entity_type)

    def process_schema(self) -> None:
        """Re-read the site's schema after schema events; un-prime or re-fetch affected cached fields."""
        self.schema_refresh.process()

    @property
    def missing_fields(self) -> set[tuple[str, str]]:
        return self.schema_refresh.missing_fields


def heartbeat_at(conn: Connection, asked: float) -> str:
    """The moment ``asked`` (``time.monotonic()``) on the database server's clock, as the heartbeat's
    wire form: the proxies compare it with that same clock, so the hosts' own clocks need not agree
    (an ingester host ahead of a proxy's would otherwise keep a dead ingester's replica served)."""
    return wire_from_epoch(pending.db_clock(conn) - max(0.0, time.monotonic() - asked))
