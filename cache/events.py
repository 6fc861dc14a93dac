"""The event ingester: polls SG's EventLogEntry and applies each event to the replica.

One poll is one transaction: the new events are applied, stored raw in
``sgcache_events``, the gaps (ids not yet visible) updated, and the cursor and the
heartbeat advanced, all together; a process killed at any point leaves either the
whole poll or none of it. Entities whose values cannot be taken from an event (New,
Revival, rows never seen, values in doubt, events that filled a gap late) are put in
the ``sgcache_fetch`` queue in that same transaction and re-read from SG right after
it commits, grouped per type (``id in [...]``, then ``retired_only`` for the rest).
A Change whose ``old_value`` and ``new_value`` both differ from the row's value is not applied
but fetched: the row holds a later write (the proxy learned it before this event was polled) or
missed one, and an older value must not overwrite a newer one.
When EventLogEntry is a cached type, every applied event also becomes its EventLogEntry row in
that transaction. All replica writes go through :class:`cache.writes.WriteBatch` (upserts, so
the proxy writing the same rows at the same moment never collides with a poll).

State keys (``sgcache_state``):

- ``event_cursor``: every event id at or below it is applied or given up;
- ``event_high``: the highest event id applied; ids between the cursor and it that
  were never seen are open gaps (``sgcache_gaps``), looked for on every poll and given
  up once the event that revealed them is ``gap_timeout`` seconds old by SG's clock;
- ``sg_clock``: the newest ``created_at`` seen (SG's clock, wire form);
- ``ingester_heartbeat``: ISO UTC time of the last successful poll;
- ``schema_pending``: field names named by schema (DisplayColumn) events, to re-check;
- ``ingester_leader``: who leads (informational);
- ``event_floor``: the cursor the replica started from (set with the first cursor, by the prime
  or by the ingester): events at or below it came with the scan, and the sweep never looks there.

Gap time is SG's time: a gap's ``first_seen`` is the ``created_at`` of the first
visible event above it, and "now" is SG's clock estimated as the newest ``created_at``
seen plus the local time elapsed since it was seen (the local clock measures only
elapsed time, so skew between the hosts does not matter; with no ``created_at`` ever
seen the local clock stands in). An id that becomes visible after its gap was given up
is found by the sweep: every ``sweep_every`` polls the ids of events created in the
last ``sweep_window`` seconds (SG's clock, default twice the gap timeout) are read and
any id above ``event_floor`` missing from ``sgcache_events`` is applied as a late event.

Leadership: on PostgreSQL a session advisory lock on a connection held for the
process lifetime, which is also the connection every write goes through (so a leader
that lost its session cannot write); on SQLite an OS file lock next to the database
file, released by the kernel however the process dies.
"""

from __future__ import annotations

import bisect
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import fieldtypes, pending
from .private import open_private
from .schema import Schema
from .store import Store, now_utc
from .writes import WriteBatch, upsert_stmt

log = logging.getLogger("sgcache.events")

EVENT_FIELDS = ["id", "event_type", "attribute_name", "meta", "entity", "project", "user",
                "created_at", "session_uuid"]
#: Fields of the event's entity read with the event (``entity.<Type>.<field>``): SG
#: changes them without events of their own.
DEEP_FIELDS = ("updated_at", "updated_by")
ACTIONS = ("New", "Change", "Retirement", "Revival")
SCHEMA_TYPE = "DisplayColumn"
EVENT_TYPE = "EventLogEntry"
RETIREMENT_FIELD = "retirement_date"
WIRE_DT = "%Y-%m-%dT%H:%M:%SZ"
FETCH_CHUNK = 500

K_CURSOR = "event_cursor"
K_HIGH = "event_high"
K_HEARTBEAT = "ingester_heartbeat"
K_SCHEMA = "schema_pending"
K_LEADER = "ingester_leader"
K_SG_CLOCK = "sg_clock"
K_FLOOR = "event_floor"


class SGClient(Protocol):
    """The part of ``shotgun_api3.Shotgun`` the ingester uses."""

    def find(self, entity_type: str, filters: Any, fields: list[str] | None = None,
             order: list[dict[str, str]] | None = None, filter_operator: str | None = None,
             limit: int = 0, retired_only: bool = False) -> list[dict[str, Any]]: ...

    def schema_read(self) -> dict[str, Any]: ...


class LockHeld(RuntimeError):
    """Another ingester leads and this one may not wait (SQLite)."""


@dataclass
class IngestConfig:
    """Tunables of the ingester (the script's flags)."""

    batch: int = 500
    poll_interval: float = 1.0
    # while no events come the wait grows to this ceiling (never below poll_interval); a change on
    # an idle site is then visible within idle_max plus the apply time. None: no back-off.
    idle_max: float | None = 3.0
    gap_timeout: float = 300.0
    sweep_every: int = 30  # polls between sweeps for ids that became visible after being given up; 0: never
    sweep_window: float | None = None  # seconds of SG time a sweep looks back (default 2 x gap_timeout)
    sweep_limit: int = 10_000
    max_gap_span: int = 10_000
    lock_retry: float = 1.0
    retry_max: float = 60.0

    def sweep_seconds(self) -> float:
        return self.sweep_window if self.sweep_window is not None else 2 * self.gap_timeout

    def idle_ceiling(self) -> float:
        if self.idle_max is not None:
            return max(self.idle_max, self.poll_interval)
        return self.poll_interval


@dataclass
class PollResult:
    """What one poll did."""

    received: int = 0
    applied: int = 0
    full: bool = False
    gaps_opened: int = 0
    gaps_filled: int = 0
    gaps_expired: list[int] = field(default_factory=list)
    swept: list[int] = field(default_factory=list)


# -- helpers -------------------------------------------------------------------------
def to_wire(value: Any) -> Any:
    """Datetimes/dates that shotgun_api3 decoded, back into SG's wire strings."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime(WIRE_DT)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value


def split_event_type(event_type: Any) -> tuple[str, str] | None:
    """``Shotgun_<Type>_<Action>`` -> (Type, Action); None for other applications."""
    if not isinstance(event_type, str) or not event_type.startswith("Shotgun_"):
        return None
    entity_type, _, action = event_type[len("Shotgun_"):].rpartition("_")
    if not entity_type:
        return None
    return entity_type, action


def _is_link(value: Any) -> bool:
    return (isinstance(value, Mapping) and isinstance(value.get("type"), str)
            and isinstance(value.get("id"), int) and not isinstance(value.get("id"), bool))


def parse_wire_dt(value: Any) -> dt.datetime | None:
    """SG's wire datetime (``YYYY-MM-DDTHH:MM:SSZ``) -> naive UTC; None if absent or unparsable."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.strptime(value, WIRE_DT)
    except ValueError:
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed.astimezone(dt.UTC).replace(tzinfo=None) if parsed.tzinfo else parsed


def _iso_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def insert_rows(store: Store, conn: Connection, table: sa.Table, keys: Sequence[str],
                rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT many rows, skipping those whose primary key ``keys`` is already there."""
    if rows:
        conn.execute(upsert_stmt(store.dialect, table, keys, ()), list(rows))


# -- leadership ----------------------------------------------------------------------
class LeaderLock:
    """Exactly one ingester per replica may write; this is its token."""

    def acquire(self, conn: Connection) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> None:
        pass


class PgAdvisoryLock(LeaderLock):
    """``pg_try_advisory_lock`` on the ingester's own connection, keyed by database and schema."""

    SQL = ("SELECT pg_try_advisory_lock(hashtext('sgcache-ingest:' || current_database()"
           " || ':' || current_schema()))")

    def acquire(self, conn: Connection) -> bool:
        with conn.begin():
            return bool(conn.exec_driver_sql(self.SQL).scalar())


class FileLock(LeaderLock):
    """An exclusive ``flock`` on ``<db file>.ingest.lock``; refuses at once when taken."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, conn: Connection) -> bool:
        fd = open_private(self.path)  # mode 0600 when created
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(self.path).read_text(encoding="utf-8", errors="replace").strip() or "?"
            os.close(fd)
            raise LockHeld(f"another ingester ({holder}) already runs on this SQLite replica "
                           f"(lock {self.path}); only one may run on SQLite") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class NoLock(LeaderLock):
    """In-memory SQLite: nothing else can reach the database."""

    def acquire(self, conn: Connection) -> bool:
        return True


def leader_lock_for(engine: Engine) -> LeaderLock:
    if engine.dialect.name == "postgresql":
        return PgAdvisoryLock()
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        return FileLock(Path(database + ".ingest.lock"))
    return NoLock()


def engine_options(url: str) -> dict[str, Any]:
    """Engine options for the ingester: on psycopg2, batch executemany UPDATEs (fewer round trips)."""
    return {"executemany_mode": "values_plus_batch"} if url.startswith(("postgresql", "postgres")) else {}


# -- the ingester --------------------------------------------------------------------
class Ingester:
    """Polls events from ``sg`` and applies them to ``store``."""

    def __init__(self, store: Store, sg: SGClient | None, config: IngestConfig | None = None,
                 clock: Callable[[], dt.datetime] = now_utc, lock: LeaderLock | None = None):
        self.store = store
        self.sg = sg
        self.config = config or IngestConfig()
        self.clock = clock
        self.lock = lock or leader_lock_for(store.engine)
        self.conn: Connection | None = None
        self.stop_event = threading.Event()
        self.missing_fields: set[tuple[str, str]] = set()
        self._skipped_types: set[str] = set()
        self._event_fields = self._wanted_event_fields() + self._deep_fields()
        self._sg_anchor: tuple[dt.datetime, dt.datetime] | None = None  # (SG time seen, local time then)
        self._polls = 0
        self.stop_reason: str | None = None

    # -- connection and leadership ------------------------------------------------
    def connect(self) -> Connection:
        """The ingester's own connection (the one holding the leader lock on PostgreSQL)."""
        if self.conn is None or self.conn.closed:
            self.conn = self.store.engine.connect()
        return self.conn

    def close(self) -> None:
        """Give up leadership: the session holding the advisory lock is ended, not pooled."""
        self.lock.release()
        self._drop_connection()

    def become_leader(self, wait: bool = True) -> bool:
        """Take the leader lock, waiting (PostgreSQL) while another ingester holds it."""
        announced = False
        while not self.stop_event.is_set():
            try:
                if self.lock.acquire(self.connect()):
                    self._note_leader()
                    log.info("leader lock taken (pid %s)", os.getpid())
                    return True
            except sa.exc.DBAPIError as exc:
                log.warning("database unavailable while taking the leader lock: %s", exc)
                self._drop_connection()
            if not wait:
                return False
            if not announced:
                log.info("another ingester leads; waiting for the leader lock")
                announced = True
            self.stop_event.wait(self.config.lock_retry)
        return False

    def _note_leader(self) -> None:
        conn = self.connect()
        with conn.begin():
            self.store.set_state(conn, K_LEADER, {"pid": os.getpid(), "host": socket.gethostname(),
                                                  "since": _iso_now()})

    def _drop_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.invalidate()
                self.conn.close()
            except sa.exc.DBAPIError:
                pass
        self.conn = None

    # -- main loops ---------------------------------------------------------------
    def run(self, follow: bool = True) -> None:
        """Lead, then poll until stopped (``follow``) or caught up (once)."""
        if not self.become_leader(wait=True):
            return
        delay = self.config.poll_interval
        failures = 0
        while not self.stop_event.is_set():
            try:
                result = self.poll_once()
                self._polls += 1
                if self.config.sweep_every > 0 and self._polls % self.config.sweep_every == 0:
                    self.sweep()
                self.process_fetch_queue()
                self.process_schema()
            except sa.exc.DBAPIError as exc:
                failures += 1
                log.error("database error (attempt %d): %s; reconnecting", failures, exc)
                self._drop_connection()
                self.stop_event.wait(self._backoff(failures))
                if not self.become_leader(wait=True):
                    return
                continue
            except Exception as exc:  # noqa: BLE001 - SG unreachable or answering errors: retry, never exit
                failures += 1
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
                    cursor, high = self.store.get_state(conn, K_CURSOR), self.store.get_state(conn, K_HIGH)
            finally:
                conn.close()
            where = f"event cursor {cursor}, highest event applied {high}"
        except Exception as exc:  # noqa: BLE001 - the database may be why it stops
            where = f"cursor unknown ({type(exc).__name__})"
        log.info("ingester stopping (%s): %s", why, where)

    # -- one poll -----------------------------------------------------------------
    def poll_once(self) -> PollResult:
        """Read the next events and apply them, with the cursor, in one transaction."""
        conn = self.connect()
        with conn.begin():
            _cursor, high = self._cursor(conn)
            gaps = self._open_gaps(conn)
            started = pending.poll_started(self.store, conn)
        events = self.fetch_events(high, sorted(gaps)) if self.sg is not None else []
        full = len(events) >= self.config.batch + len(gaps)
        try:
            result = self._apply_polled(conn, events, full, careful=False)
        except sa.exc.DBAPIError:
            raise
        except Exception:  # noqa: BLE001 - one bad event must not stall the stream
            log.exception("applying a batch failed; retrying event by event")
            result = self._apply_polled(conn, events, full, careful=True)
        if self.sg is not None:
            pending.poll_done(self.store, conn, started, events, full)  # learn pairs, clear markers
        return result

    def _apply_polled(self, conn: Connection, events: list[dict[str, Any]], full: bool,
                      careful: bool) -> PollResult:
        result = PollResult(received=len(events), full=full)
        with conn.begin():
            _cursor, high = self._cursor(conn)
            gaps = self._open_gaps(conn)
            self.apply_batch(conn, events, gaps, high, result, careful=careful)
        return result

    # -- SG's clock ---------------------------------------------------------------
    def sg_now(self) -> dt.datetime:
        """SG's clock (naive UTC): the newest ``created_at`` seen plus local time elapsed since;
        the local clock when no ``created_at`` was ever seen."""
        local = self.clock()
        if self._sg_anchor is None:
            return local
        seen, at = self._sg_anchor
        return seen + max(local - at, dt.timedelta(0))

    def _load_sg_clock(self, conn: Connection) -> None:
        if self._sg_anchor is None:
            seen = parse_wire_dt(self.store.get_state(conn, K_SG_CLOCK))
            if seen is not None:
                self._sg_anchor = (seen, self.clock())

    def _see_sg_times(self, conn: Connection, events: Sequence[Mapping[str, Any]]) -> None:
        """Move the SG clock estimate forward to the newest ``created_at`` among ``events``."""
        times = [t for t in (parse_wire_dt(e.get("created_at")) for e in events) if t is not None]
        if not times:
            return
        newest = max(times)
        if self._sg_anchor is None or newest > self.sg_now():
            self._sg_anchor = (newest, self.clock())
        stored = parse_wire_dt(self.store.get_state(conn, K_SG_CLOCK))
        if stored is None or newest > stored:
            self.store.set_state(conn, K_SG_CLOCK, newest.strftime(WIRE_DT))

    # -- the sweep ----------------------------------------------------------------
    def sweep(self) -> PollResult:
        """Apply events created in the last ``sweep_window`` seconds (SG's clock) whose ids were never
        applied: ids that became visible after their gap was given up (or was too wide to wait for)."""
        result = PollResult()
        if self.sg is None:
            return result
        conn = self.connect()
        with conn.begin():
            self._load_sg_clock(conn)
            cursor, _high = self._cursor(conn)
            floor = self._floor(conn, cursor)
        if floor >= cursor:
            return result
        since = self.sg_now() - dt.timedelta(seconds=self.config.sweep_seconds())
        rows = self.sg.find("EventLogEntry", [["created_at", "greater_than", since.replace(tzinfo=dt.UTC)],
                                              ["id", "greater_than", floor],
                                              ["id", "less_than", cursor + 1]], ["id"],
                            order=[{"field_name": "id", "direction": "asc"}], limit=self.config.sweep_limit)
        ids = [int(r["id"]) for r in rows]
        with conn.begin():
            missing = sorted(set(ids) - self._stored_ids(conn, ids))
        if not missing:
            return result
        events: list[dict[str, Any]] = []
        for chunk in _chunks(missing, FETCH_CHUNK):
            events.extend(to_wire(e) for e in self.sg.find(  # type: ignore[union-attr]
                "EventLogEntry", [["id", "in", list(chunk)]], self._event_fields,
                order=[{"field_name": "id", "direction": "asc"}]))
        result = self._apply_polled(conn, events, full=False, careful=False)
        result.swept = sorted(int(e["id"]) for e in events)
        if result.swept:
            log.warning("sweep: applied event ids %s, visible only after their gap was given up",
                        _ranges(result.swept))
        return result

    def _floor(self, conn: Connection, cursor: int) -> int:
        """The id at or below which events predate this replica's event stream (the prime's cursor):
        their effects came with the scan, so the sweep never treats them as late. Replicas primed
        before the floor was recorded: the id below the first event stored, else the cursor."""
        floor = self.store.get_state(conn, K_FLOOR)
        if floor is not None:
            return int(floor)
        first = conn.execute(sa.select(sa.func.min(self.store.events.c.id))).scalar()
        return int(first) - 1 if first is not None else cursor

    def fetch_events(self, high: int, gaps: list[int]) -> list[dict[str, Any]]:
        """Events above ``high`` plus any open gap that became visible, by id."""
        filters: list[Any] = [["id", "greater_than", high]]
        if gaps:
            filters = [{"filter_operator": "any",
                        "filters": [["id", "in", gaps], ["id", "greater_than", high]]}]
        events = self.sg.find("EventLogEntry", filters, self._event_fields,  # type: ignore[union-attr]
                              order=[{"field_name": "id", "direction": "asc"}],
                              limit=self.config.batch + len(gaps))
        return [to_wire(e) for e in events]

    def _wanted_event_fields(self) -> list[str]:
        """The event fields to read: what the ingester needs, plus every cached EventLogEntry field."""
        fields = list(EVENT_FIELDS)
        if EVENT_TYPE in self.store.tables:
            fields += [f for f in self.store.cached_field_names(EVENT_TYPE) if f not in fields]
        return fields

    def _deep_fields(self) -> list[str]:
        out = []
        for entity in self.store.schema.entities.values():
            for fname in DEEP_FIELDS:
                if fname in entity.fields:
                    out.append(f"entity.{entity.name}.{fname}")
        return out

    def _cursor(self, conn: Connection) -> tuple[int, int]:
        cursor = self.store.get_state(conn, K_CURSOR)
        if cursor is None:
            cursor = self._newest_event_id()
            log.warning("no event cursor yet: starting after the newest event, %d "
                        "(prime the replica with scripts/scan --full)", cursor)
            self.store.set_state(conn, K_CURSOR, cursor)
            if self.store.get_state(conn, K_FLOOR) is None:
                self.store.set_state(conn, K_FLOOR, cursor)
        high = self.store.get_state(conn, K_HIGH)
        return int(cursor), max(int(cursor), int(high or 0))

    def _newest_event_id(self) -> int:
        if self.sg is None:
            return 0
        rows = self.sg.find("EventLogEntry", [], ["id"], order=[{"field_name": "id", "direction": "desc"}],
                            limit=1)
        return int(rows[0]["id"]) if rows else 0

    def _open_gaps(self, conn: Connection) -> dict[int, dt.datetime]:
        table = self.store.gaps
        return {r.id: r.first_seen for r in conn.execute(sa.select(table.c.id, table.c.first_seen))}

    # -- a batch ------------------------------------------------------------------
    def apply_batch(self, conn: Connection, events: Sequence[Mapping[str, Any]], gaps: dict[int, dt.datetime],
                    high: int, result: PollResult, careful: bool = False) -> None:
        """Apply events (inside the caller's transaction), then move gaps, cursor and heartbeat."""
        events = sorted(events, key=lambda e: int(e["id"]))
        seen = self._stored_ids(conn, [int(e["id"]) for e in events])
        fresh = [e for e in events if int(e["id"]) not in seen]
        buf = WriteBatch(self.store, conn)
        buf.load(s for s in map(self.subject, fresh) if s is not None)
        buf.load_links(self._link_keys(fresh))
        for event in fresh:
            late = int(event["id"]) <= high
            if careful:
                self._apply_guarded(conn, event, late, buf)
            else:
                self.apply_event(conn, event, late=late, buf=buf)
        self._event_rows(buf, fresh)
        buf.flush()
        result.applied = len(fresh)
        self._store_raw(conn, fresh)
        self._load_sg_clock(conn)
        self._see_sg_times(conn, events)
        ids = [int(e["id"]) for e in events]
        new_high = max([high, *ids])
        self._update_gaps(conn, gaps, events, high, new_high, result)
        still_open = self._open_gaps(conn)
        self.store.set_state(conn, K_CURSOR, (min(still_open) - 1) if still_open else new_high)
        self.store.set_state(conn, K_HIGH, new_high)
        self.store.set_state(conn, K_HEARTBEAT, _iso_now())

    def _event_rows(self, buf: WriteBatch, events: Sequence[Mapping[str, Any]]) -> None:
        """EventLogEntry as a cached type: every applied event becomes its row, in the poll's batch."""
        if EVENT_TYPE not in self.store.tables or not events:
            return
        rows = [{k: v for k, v in e.items() if "." not in k} for e in events]
        result = buf.put(EVENT_TYPE, rows, complete=True, log_changes=False)
        for key in result.to_fetch or []:
            buf.queue(key, "event row not stored")

    def _link_keys(self, events: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, int]]:
        """(type, multi_entity field, parent id) that the Changes among ``events`` name."""
        out = []
        for event in events:
            attr = event.get("attribute_name")
            subject = self.subject(event) if isinstance(attr, str) else None
            if subject is not None and (subject[0], attr) in self.store.multi:
                out.append((subject[0], attr, subject[1]))
        return out

    def _apply_guarded(self, conn: Connection, event: Mapping[str, Any], late: bool, buf: WriteBatch) -> None:
        try:
            with conn.begin_nested():
                buf.flush()
                self.apply_event(conn, event, late=late)  # its own buffer, flushed in the savepoint
        except sa.exc.DBAPIError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("event %s could not be applied; its entity will be re-read", event.get("id"))
            subject = self.subject(event)
            if subject is not None:
                self.store.queue_fetch(conn, [subject], "event failed")

    def _stored_ids(self, conn: Connection, ids: list[int]) -> set[int]:
        table = self.store.events
        out: set[int] = set()
        for chunk in _chunks(ids, 500):
            out.update(r.id for r in conn.execute(sa.select(table.c.id).where(table.c.id.in_(chunk))))
        return out

    def _store_raw(self, conn: Connection, events: Sequence[Mapping[str, Any]]) -> None:
        if not events:
            return
        now = now_utc()
        rows = [{"id": int(e["id"]), "event_type": str(e.get("event_type") or "")[:128],
                 "created_at": e.get("created_at"), "body": json.dumps(e, default=str, sort_keys=True),
                 "received_at": now} for e in events]
        insert_rows(self.store, conn, self.store.events, ["id"], rows)

    def _update_gaps(self, conn: Connection, gaps: dict[int, dt.datetime], events: Sequence[Mapping[str, Any]],
                     high: int, new_high: int, result: PollResult) -> None:
        """Fill gaps that showed up, give up those revealed ``gap_timeout`` ago by SG's clock, open new ones
        (``first_seen``: the ``created_at`` of the first event above the gap, else SG's estimated now)."""
        table = self.store.gaps
        ids = [int(e["id"]) for e in events]
        filled = sorted(set(gaps) & set(ids))
        if filled:
            conn.execute(table.delete().where(table.c.id.in_(filled)))
            result.gaps_filled = len(filled)
            log.info("late events applied for gap ids %s", _ranges(filled))
        now = self.sg_now()
        timeout = self.config.gap_timeout

        def too_old(first: dt.datetime) -> bool:
            return (now - first).total_seconds() >= timeout

        expired = sorted(i for i, first in gaps.items() if i not in filled and too_old(first))
        if expired:
            for chunk in _chunks(expired, 500):
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
            log.debug("event ids %s not visible yet: open gaps", _ranges([r["id"] for r in opened]))
        if expired:
            result.gaps_expired = sorted(expired)
            log.warning("gave up on event ids %s: not visible %ss (SG's clock) after a later event",
                        _ranges(result.gaps_expired), timeout)

    # -- one event ----------------------------------------------------------------
    def subject(self, event: Mapping[str, Any]) -> tuple[str, int] | None:
        """The entity an event is about: ``entity`` if it matches, else ``meta.entity_id`` (never for backrefs)."""
        parsed = split_event_type(event.get("event_type"))
        if parsed is None or parsed[1] not in ACTIONS or parsed[0] == SCHEMA_TYPE:
            return None
        entity_type = parsed[0]
        entity = event.get("entity")
        if _is_link(entity) and entity["type"] == entity_type:
            return entity_type, int(entity["id"])
        meta = event.get("meta") if isinstance(event.get("meta"), Mapping) else {}
        if meta.get("actual_attribute_changed"):
            return None
        entity_id = meta.get("entity_id", meta.get("id"))
        if isinstance(entity_id, int) and not isinstance(entity_id, bool):
            return entity_type, entity_id
        return None

    def apply_event(self, conn: Connection, event: Mapping[str, Any], late: bool = False,
                    buf: WriteBatch | None = None) -> None:
        """Apply one event inside the caller's transaction; applying it twice changes nothing.

        With ``buf`` (a batch) some writes wait in it until it is flushed.
        """
        own = buf is None
        buf = buf or WriteBatch(self.store, conn)
        self._dispatch(conn, event, late, buf)
        if own:
            buf.flush()

    def _dispatch(self, conn: Connection, event: Mapping[str, Any], late: bool, buf: WriteBatch) -> None:
        parsed = split_event_type(event.get("event_type"))
        if parsed is None or parsed[1] not in ACTIONS:
            return
        entity_type, action = parsed
        if entity_type == SCHEMA_TYPE:
            self._schema_event(conn, event)
            return
        subject = self.subject(event)
        if subject is None:
            log.debug("event %s names no entity; skipped", event.get("id"))
            return
        entity = event.get("entity")
        if _is_link(entity) and entity["type"] == entity_type:
            buf.note([entity])
        cached = entity_type in self.store.tables
        if not cached and entity_type not in self._skipped_types:
            self._skipped_types.add(entity_type)
            log.info("events of uncached type %s: only the registry is kept", entity_type)
        event_id = int(event["id"])
        if action == "New":
            if cached:
                buf.queue(subject, "new")
        elif action in ("Retirement", "Revival"):
            self._retire(conn, buf, subject, action == "Retirement", event_id, late)
        else:
            self._change(conn, buf, event, subject, event_id, late)

    def _retire(self, conn: Connection, buf: WriteBatch, subject: tuple[str, int], retired: bool,
                event_id: int, late: bool) -> None:
        cached = subject[0] in self.store.tables
        if cached and late:
            buf.queue(subject, "late retirement/revival")
            return
        buf.retire(subject, retired, event_id)
        if cached and (not retired or not buf.exists(subject)):
            buf.queue(subject, "revival" if not retired else "unknown row")

    def _change(self, conn: Connection, buf: WriteBatch, event: Mapping[str, Any], subject: tuple[str, int],
                event_id: int, late: bool) -> None:
        meta = event.get("meta") if isinstance(event.get("meta"), Mapping) else {}
        attr = event.get("attribute_name") or meta.get("attribute_name")
        if attr == RETIREMENT_FIELD and "new_value" in meta:
            self._retire(conn, buf, subject, meta["new_value"] is not None, event_id, late)
            return
        if subject[0] not in self.store.tables:
            return
        fschema = self.store.schema.field(subject[0], attr) if isinstance(attr, str) else None
        if fschema is None or attr == "id" or not fieldtypes.is_cached_type(fschema.data_type):
            return
        backref = bool(meta.get("actual_attribute_changed"))
        exists = buf.exists(subject)
        if meta.get("in_create") and not backref and exists:
            return  # the New's fetch already read this value
        if late or not exists:
            buf.queue(subject, "late event" if late else "unknown row")
            return
        if not backref and meta.get("field_data_type") not in (None, fschema.data_type):
            buf.queue(subject, "field type differs")
            return
        storage = fieldtypes.TYPES[fschema.data_type].storage
        record = self._deep_values(event, subject)
        if storage == "multi" and ("added" in meta or "removed" in meta):
            self._change_multi(conn, buf, subject, attr, meta, event_id)
        elif "new_value" in meta and storage != "multi":
            if (not backref and "old_value" in meta and not buf.holds(subject, attr, meta["new_value"])
                    and not buf.holds(subject, attr, meta["old_value"])):
                # the row is neither before nor after this event: a later write (the proxy learned
                # it) or a missed one; an older value must not overwrite it: read SG's row instead
                buf.queue(subject, "replica not at the event's old value")
                return
            record[attr] = meta["new_value"]
        else:
            buf.queue(subject, "change without usable value")
            return
        if not buf.write(subject, record, event_id):
            buf.queue(subject, "value not applicable")

    def _change_multi(self, conn: Connection, buf: WriteBatch, subject: tuple[str, int], attr: str,
                      meta: Mapping[str, Any], event_id: int) -> None:
        added, removed = meta.get("added") or [], meta.get("removed") or []
        if not isinstance(added, list) or not isinstance(removed, list) or not all(
                _is_link(x) for x in [*added, *removed]):
            buf.queue(subject, "bad multi_entity change")
            return
        buf.change_links(subject, attr, added, removed, event_id)

    def _deep_values(self, event: Mapping[str, Any], subject: tuple[str, int]) -> dict[str, Any]:
        """``updated_at``/``updated_by`` of the entity, read with the event (SG logs no event for them)."""
        out: dict[str, Any] = {}
        for fname in DEEP_FIELDS:
            value = event.get(f"entity.{subject[0]}.{fname}")
            if value is not None:
                out[fname] = value
        return out

    # -- schema events ------------------------------------------------------------
    def _schema_event(self, conn: Connection, event: Mapping[str, Any]) -> None:
        entity = event.get("entity")
        name = entity.get("name") if isinstance(entity, Mapping) else None
        pending = self.store.get_state(conn, K_SCHEMA) or []
        marker = name if isinstance(name, str) and name else "*"
        if marker not in pending:
            pending.append(marker)
            self.store.set_state(conn, K_SCHEMA, pending)
        log.info("schema event %s (%s): the site's schema will be re-read", event.get("event_type"), marker)

    def process_schema(self) -> None:
        """Re-read the site's schema after schema events; un-prime or re-fetch affected cached fields."""
        conn = self.connect()
        with conn.begin():
            pending = self.store.get_state(conn, K_SCHEMA)
        if not pending or self.sg is None:
            return
        site = Schema.from_schema_read(to_wire(self.sg.schema_read()))
        names = set(pending)
        refetch: list[tuple[str, str]] = []
        with conn.begin():
            primed = self._primed_field_set(conn)
            for entity in self.store.schema.entities.values():
                for fname, fschema in entity.fields.items():
                    if fname == "id" or not fieldtypes.is_cached_type(fschema.data_type):
                        continue
                    theirs = site.field(entity.name, fname)
                    key = (entity.name, fname)
                    if theirs is None or theirs.data_type != fschema.data_type:
                        self._unprime(conn, key, theirs.data_type if theirs else None, fschema.data_type)
                        if theirs is None:
                            self.missing_fields.add(key)
                    elif fname in names and key in primed:
                        refetch.append(key)
                        self._set_field_primed(conn, key, False)
        for key in refetch:
            self._refetch_field(key)
        with conn.begin():
            left = [n for n in (self.store.get_state(conn, K_SCHEMA) or []) if n not in names]
            self.store.set_state(conn, K_SCHEMA, left or None)

    def _primed_field_set(self, conn: Connection) -> set[tuple[str, str]]:
        f = self.store.fields
        return {(r.entity_type, r.field_name)
                for r in conn.execute(sa.select(f.c.entity_type, f.c.field_name).where(f.c.primed))}

    def _set_field_primed(self, conn: Connection, key: tuple[str, str], primed: bool) -> None:
        f = self.store.fields
        conn.execute(f.update().where((f.c.entity_type == key[0]) & (f.c.field_name == key[1]))
                     .values(primed=primed))

    def _unprime(self, conn: Connection, key: tuple[str, str], theirs: str | None, ours: str) -> None:
        self._set_field_primed(conn, key, False)
        log.error("field %s.%s changed on the site (%s -> %s): reads of it pass through until the "
                  "schema file is updated and the type rescanned", key[0], key[1], ours, theirs or "deleted")

    def _refetch_field(self, key: tuple[str, str]) -> None:
        """Read one field of every row (active and retired) again, then serve it again."""
        entity_type, fname = key
        conn = self.connect()
        for retired in (False, True):
            rows = [to_wire(r) for r in self.sg.find(entity_type, [], ["id", fname],  # type: ignore[union-attr]
                                                     retired_only=retired)]
            for chunk in _chunks(rows, FETCH_CHUNK):
                with conn.begin():
                    res = self.store.write_entities(conn, entity_type, chunk, "fetch")
                    if res.to_fetch:
                        self.store.queue_fetch(conn, res.to_fetch, "field refetch")
        with conn.begin():
            self._set_field_primed(conn, key, True)
        log.info("field %s.%s re-read after a schema change", entity_type, fname)

    # -- fetches ------------------------------------------------------------------
    def fetch_fields(self, entity_type: str) -> list[str]:
        entity = self.store.schema.entities[entity_type]
        return sorted(f for f, s in entity.fields.items()
                      if fieldtypes.is_cached_type(s.data_type) and (entity_type, f) not in self.missing_fields)

    def process_fetch_queue(self, limit: int = 5000) -> int:
        """Re-read queued entities from SG, grouped per type; returns how many were handled."""
        if self.sg is None:
            return 0
        conn = self.connect()
        q = self.store.fetch_queue
        with conn.begin():
            rows = conn.execute(sa.select(q).order_by(q.c.entity_type, q.c.entity_id).limit(limit)).all()
        by_type: dict[str, dict[int, dt.datetime]] = {}
        for row in rows:
            by_type.setdefault(row.entity_type, {})[row.entity_id] = row.queued_at
        for entity_type, queued in by_type.items():
            if entity_type not in self.store.tables:
                self._unqueue(conn, entity_type, queued)
                continue
            for chunk in _chunks(sorted(queued), FETCH_CHUNK):
                self._fetch_chunk(conn, entity_type, {i: queued[i] for i in chunk})
        return len(rows)

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
            self._unqueue(conn, entity_type, queued)
        if gone:
            log.warning("%s %s not found on SG (active or retired); dropped from the fetch queue",
                        entity_type, _ranges(gone))

    def _unqueue(self, conn: Connection, entity_type: str, queued: Mapping[int, dt.datetime]) -> None:
        """Remove handled queue entries, unless re-queued since they were read."""
        q = self.store.fetch_queue
        if not queued:
            return
        read_at = max(queued.values())  # re-queued since the read: a later queued_at, kept
        for chunk in _chunks(sorted(queued), 500):
            conn.execute(q.delete().where((q.c.entity_type == entity_type) & q.c.entity_id.in_(chunk)
                                          & (q.c.queued_at <= read_at)))


def _ranges(ids: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3,7`` for logs."""
    out: list[str] = []
    start = prev = None
    for i in sorted(ids):
        if start is None:
            start = prev = i
        elif i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(out)


def replay(store: Store, ingester: Ingester, *, from_id: int = 0, types: set[str] | None = None,
           retirement: bool = False, chunk: int = 500) -> int:
    """Apply stored raw events again, in id order (``scripts/reprocess``); returns how many."""
    table = store.events
    conn = ingester.connect()
    last, count = from_id - 1, 0
    while True:
        with conn.begin():
            rows = conn.execute(sa.select(table.c.id, table.c.event_type, table.c.body)
                                .where(table.c.id > last).order_by(table.c.id).limit(chunk)).all()
            for row in rows:
                event = json.loads(row.body)
                if _selected(event, types, retirement):
                    ingester.apply_event(conn, event)
                    count += 1
        if len(rows) < chunk:
            return count
        last = rows[-1].id


def _selected(event: Mapping[str, Any], types: set[str] | None, retirement: bool) -> bool:
    parsed = split_event_type(event.get("event_type"))
    if parsed is None:
        return False
    if types and parsed[0] not in types:
        return False
    if not retirement:
        return True
    if parsed[1] in ("Retirement", "Revival"):
        return True
    return parsed[1] == "Change" and event.get("attribute_name") == RETIREMENT_FIELD
