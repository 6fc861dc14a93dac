"""Scans: prime the replica from SG (``--full``) and reconcile it by ``updated_at``.

A full scan of a type reads every row, active and retired, in id order, one page per
transaction (a keyset loop, ``id greater_than <last id>``, so memory stays bounded and rows
created meanwhile do not shift pages). When it completes, rows the replica holds that SG
did not return in either pass, and does not show when asked again by id, are marked retired,
and the type is marked primed, with the largest ``updated_at`` SG held when the scan began as its
watermark (SG's clock, never the local one; never a row read later, whose write may be newer than
a silent write to a row whose page was already read).

A reconcile pass reads, per primed type, the rows with ``updated_at`` greater than the
watermark minus an overlap, upserts them and advances the watermark to the largest
``updated_at`` SG held when the pass began. It catches writes made with event generation turned
off, which the event ingester never sees. A type with no watermark (no row had ``updated_at``
when it was primed: usually it was empty) is read whole.

A page is never written over what the replica learned after SG was read: the change log's
newest ``seq`` is noted before each page is asked for, and a row of the page changed since
(the ingester applied a newer event, the proxy learned a write) is queued for a fetch instead
of written (checked under the write lock, so no writer commits in between).

Before the first full prime, where the event stream starts is stored as ``event_cursor``
(only if no cursor is set): the newest EventLogEntry id, or just below an id not visible yet
among the recent ones (:func:`cache.ingest.gaps.starting_cursor`: a transaction open then holds
it, and commits after the scan read its row). The ingester resumes from there without a hole:
events between it and the end of the scan are replayed, and replaying is idempotent. The same id
is stored as ``event_floor``: the ingester's sweep for late-visible events never looks at or
below it (those events' effects came with the scan).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ..ingest.config import IngestConfig
from ..ingest.gaps import starting_cursor
from ..replica import fetchqueue, fieldtypes
from ..replica.statekeys import EVENT_CURSOR, EVENT_FLOOR
from ..replica.store import Store, now_utc
from ..wire import chunks, format_wire_dt, parse_when, to_wire
from . import DEFAULT_OVERLAP, PAGE_SIZE
from .progress import DEFAULT_LOG_EVERY, TypeProgress, format_duration

log = logging.getLogger("sgcache.scanner")

#: Attempts per page when the database refuses a write (a concurrent writer, a dropped connection).
DB_ATTEMPTS = 3
#: Ids per ``id in [...]`` sent to SG or the database.
CHUNK = 500
_ID_ORDER = [{"field_name": "id", "direction": "asc"}]
_NEWEST_UPDATE = [{"field_name": "updated_at", "direction": "desc"}]


@dataclass
class TypeScan:
    """What one scan of one entity type did."""

    entity_type: str
    rows: int = 0
    inserted: int = 0
    changed: int = 0
    retired_missing: int = 0
    watermark: str | None = None  # SG's newest updated_at when the read began
    primed: bool = False
    seen: set[int] = field(default_factory=set, repr=False)
    max_id: int = 0

    def summary(self) -> str:
        text = f"{self.entity_type}: {self.rows} rows, {self.inserted} new, {self.changed} changed"
        if self.retired_missing:
            text += f", {self.retired_missing} gone at SG marked retired"
        if self.primed:
            text += ", primed"
        return text


def wire_datetime(value: Any) -> str | None:
    """A datetime from SG (object or wire string) in SG's wire form, for watermarks."""
    if value is None:
        return None
    return fieldtypes.encode_scalar("date_time", value)


def later(a: str | None, b: str | None) -> str | None:
    """The later of two wire datetimes (they sort as text)."""
    if a is None or b is None:
        return a or b
    return max(a, b)


class Scanner:
    """Reads entity rows from ``sg`` (a ``shotgun_api3.Shotgun`` or alike) into ``store``."""

    def __init__(
        self,
        store: Store,
        sg: Any,
        *,
        page_size: int = PAGE_SIZE,
        projects: Sequence[int] | None = None,
        progress: bool | str = False,
        log_every: float = DEFAULT_LOG_EVERY,
        progress_factory: Callable[..., Any] | None = None,
    ):
        """``progress``: ``"bar"`` (a tqdm bar per type; True), ``"log"`` (a line every ``log_every``
        seconds) or ``"off"`` (False); with progress, a full scan counts each type's rows first."""
        self.store = store
        self.sg = sg
        self.page_size = page_size
        self.projects = list(projects) if projects else None
        self.progress = ("bar" if progress else "off") if isinstance(progress, bool) else progress
        self.log_every = log_every
        self._progress_factory = progress_factory

    # -- what to read ----------------------------------------------------------------
    def scan_fields(self, entity_type: str) -> list[str]:
        """Every cached field of the type whose data type the replica holds."""
        return self.store.cached_field_names(entity_type)

    def project_filter(self, entity_type: str) -> list[Any] | None:
        """The ``--projects`` condition for the type, or None when the type is read whole."""
        if not self.projects:
            return None
        if entity_type == "Project":
            return ["id", "in", self.projects]
        fschema = self.store.schema.field(entity_type, "project")
        if fschema is None or fschema.data_type != "entity":
            return None
        return ["project", "in", [{"type": "Project", "id": pid} for pid in self.projects]]

    def has_updated_at(self, entity_type: str) -> bool:
        fschema = self.store.schema.field(entity_type, "updated_at")
        return fschema is not None and fschema.data_type == "date_time"

    # -- reading SG ----------------------------------------------------------------------
    def pages(self, entity_type: str, filters: list[Any], retired: bool) -> Iterator[list[dict[str, Any]]]:
        """Pages of rows matching ``filters``, in id order, by keyset (``id greater_than``)."""
        fields = self.scan_fields(entity_type)
        last_id = 0
        while True:
            page_filters = [*filters, ["id", "greater_than", last_id]]
            rows = self.sg.find(entity_type, page_filters, fields=fields, order=_ID_ORDER,
                                limit=self.page_size, retired_only=retired)
            if not rows:
                return
            # SG's wire form back, as the ingester's fetch has it: shotgun_api3 decodes every
            # string of a datetime's shape (a text field's too), which the write path refuses
            rows = [to_wire(r) for r in rows]
            yield rows
            last_id = max(int(r["id"]) for r in rows)
            if len(rows) < self.page_size:
                return

    def count(self, entity_type: str, filters: list[Any]) -> int | None:
        """SG's count of the active rows matching ``filters`` (``summarize``); None when SG (or
        the client) cannot say: the count only feeds progress figures."""
        try:
            result = self.sg.summarize(entity_type, filters, [{"field": "id", "type": "count"}])
            return int(result["summaries"]["id"])
        except Exception as exc:  # noqa: BLE001 - any failure: progress without a total
            log.debug("%s: no count from SG (%s)", entity_type, exc)
            return None

    def newest_update(self, entity_type: str) -> str | None:
        """The largest ``updated_at`` SG holds for the type now (None when no row has one): a
        watermark read before the first page, so never later than SG's clock when the read began."""
        rows = self.sg.find(entity_type, [["updated_at", "is_not", None]], fields=["updated_at"],
                            order=_NEWEST_UPDATE, limit=1)
        return wire_datetime(rows[0].get("updated_at")) if rows else None

    # -- writing the replica -----------------------------------------------------------
    def change_mark(self) -> int:
        """The change log's newest ``seq`` (:meth:`Store.change_mark`), read before SG is."""
        with self.store.engine.connect() as conn:
            return self.store.change_mark(conn)

    def _write_page(self, scan: TypeScan, rows: list[dict[str, Any]], retired: bool, mark: int) -> None:
        """Upsert one page in one transaction, retrying when the database refuses it. A row the
        replica changed since ``mark`` (taken before the page was read) may be newer than the page's:
        it is not written but queued for a fetch."""
        for attempt in range(1, DB_ATTEMPTS + 1):
            try:
                with self.store.write_engine.begin() as conn:
                    newer = self.store.changed_since(conn, scan.entity_type, [int(r["id"]) for r in rows], mark)
                    batch = self.store.batch(conn, "scan")
                    # a row leaving out a link to an entity live here: SG cleared it, or retired the
                    # entity and the ingester has not polled that yet; the ingester's fetch waits for
                    # its poll before storing such a row (cache/ingest/fetch.py)
                    left_out = batch.drops_live_links(
                        scan.entity_type, [r for r in rows if int(r["id"]) not in newer])
                    result = batch.put(scan.entity_type, [r for r in rows if int(r["id"]) not in newer | left_out],
                                       complete=True, retired=retired)
                    batch.flush()
                    if result.to_fetch:  # left out of a type the scan marks primed: its reads pass
                        self.store.queue_fetch(conn, result.to_fetch, "not stored by the scan")
                    if newer:
                        self.store.queue_fetch(conn, [(scan.entity_type, i) for i in sorted(newer)],
                                               "changed while the scan read it")
                    if left_out:
                        self.store.queue_fetch(conn, [(scan.entity_type, i) for i in sorted(left_out)],
                                               fetchqueue.LINK_LEFT_OUT)
                break
            except (sa.exc.OperationalError, sa.exc.IntegrityError) as exc:
                if attempt == DB_ATTEMPTS:
                    raise
                log.warning("%s: page write failed (%s), retrying", scan.entity_type, exc.__class__.__name__)
                time.sleep(0.2 * attempt)
        if result.to_fetch:
            log.warning("%s: %d rows not stored (bad values), queued for the ingester's fetch (reads of the "
                        "type pass until it stores them): %s", scan.entity_type, len(result.to_fetch),
                        result.to_fetch[:10])
        if newer:
            log.info("%s: %d rows changed while the scan read them, queued for a fetch: %s", scan.entity_type,
                     len(newer), sorted(newer)[:10])
        if left_out:
            log.info("%s: %d rows leave out links to entities live here, queued for a fetch: %s", scan.entity_type,
                     len(left_out), sorted(left_out)[:10])
        scan.rows += len(rows)
        scan.inserted += result.inserted
        scan.changed += result.changed
        for row in rows:
            eid = int(row["id"])
            scan.seen.add(eid)
            scan.max_id = max(scan.max_id, eid)

    def _read_into(self, scan: TypeScan, filters: list[Any], progress: TypeProgress) -> None:
        """Read active then retired rows matching ``filters`` into the replica; each page's change
        mark is taken before SG is asked for it."""
        for retired in (False, True):
            mark = self.change_mark()
            for rows in self.pages(scan.entity_type, filters, retired):
                self._write_page(scan, rows, retired, mark)
                progress.update(len(rows))
                mark = self.change_mark()

    def _progress(self, entity_type: str, total: int | None = None) -> TypeProgress:
        return TypeProgress(entity_type, total, self.progress, log_every=self.log_every,
                            bar_factory=self._progress_factory)

    # -- full scans --------------------------------------------------------------------
    def record_event_cursor(self) -> None:
        """Store where the event stream starts (:func:`~cache.ingest.gaps.starting_cursor`: the
        newest event id, or below an id not visible yet) as ``event_cursor`` and ``event_floor``,
        unless a cursor is already set."""
        with self.store.engine.connect() as conn:
            if self.store.get_state(conn, EVENT_CURSOR) is not None:
                return
        start = starting_cursor(self.sg, IngestConfig())
        with self.store.write_engine.begin() as conn:
            if self.store.get_state(conn, EVENT_CURSOR) is None:
                self.store.set_state(conn, EVENT_CURSOR, start)
                self.store.set_state(conn, EVENT_FLOOR, start)
                log.info("event cursor set to %d (before the prime)", start)

    def full_filters(self, entity_type: str) -> list[Any]:
        """What a full scan of the type reads: every row, or the ``--projects`` rows."""
        pfilter = self.project_filter(entity_type)
        return [pfilter] if pfilter else []

    def full_scan(self, entity_type: str, total: int | None = None) -> TypeScan:
        """Read every row of the type; prime it unless ``--projects`` made the scan partial.
        ``total``: SG's count of its rows, for progress (counted here when progress is shown)."""
        if total is None and self.progress != "off":
            total = self.count(entity_type, self.full_filters(entity_type))
        return self._full_scan(entity_type, total)

    def _full_scan(self, entity_type: str, total: int | None) -> TypeScan:
        scan = TypeScan(entity_type)
        filters = self.full_filters(entity_type)
        if not filters and self.has_updated_at(entity_type):
            scan.watermark = self.newest_update(entity_type)
        with self._progress(entity_type, total) as progress:
            self._read_into(scan, filters, progress)
        if not filters:
            self._finish_full(scan)
        log.info("%s (%s)", scan.summary(), progress.elapsed())
        return scan

    def _finish_full(self, scan: TypeScan) -> None:
        """Retire rows SG no longer has, and mark the type primed, in one transaction. A row neither
        pass saw is asked of SG again by id (revived between the passes, it is in neither), and one
        SG shows, or the replica changed since that question, is queued for a fetch, not retired."""
        table = self.store.tables[scan.entity_type]
        with self.store.engine.connect() as conn:
            held = conn.execute(
                sa.select(table.c.id).where(~table.c._retired & (table.c.id <= scan.max_id))
            ).scalars().all()
        # events are never retired; one the ingester stored while the scan ran is not "gone"
        unseen = [] if scan.entity_type == "EventLogEntry" else sorted(set(held) - scan.seen)
        mark = self.change_mark()
        shown = self.still_at_sg(scan.entity_type, unseen)
        with self.store.write_engine.begin() as conn:
            newer = self.store.changed_since(conn, scan.entity_type, unseen, mark)
            for eid in unseen:
                if eid in shown or eid in newer:
                    continue
                if self.store.set_retired(conn, scan.entity_type, eid, True, source="scan"):
                    scan.retired_missing += 1
            again = sorted(set(unseen) & (shown | newer))
            if again:
                self.store.queue_fetch(conn, [(scan.entity_type, i) for i in again], "not seen by the full scan")
                log.info("%s: %d rows neither pass saw, active at SG or changed meanwhile, queued for a fetch: %s",
                         scan.entity_type, len(again), again[:10])
            self.store.mark_primed(conn, scan.entity_type, watermark=scan.watermark)
        scan.primed = True
        if scan.inserted:  # new rows: the planner's statistics of the type's tables are out of date
            with self.store.engine.begin() as conn:
                self.store.dialect.analyze(conn, self.store.type_tables(scan.entity_type))

    def still_at_sg(self, entity_type: str, ids: Sequence[int]) -> set[int]:
        """Which of these ids SG has active now (asked after both passes missed them)."""
        out: set[int] = set()
        for chunk in chunks(list(ids), CHUNK):
            rows = self.sg.find(entity_type, [["id", "in", list(chunk)]], fields=["id"])
            out.update(int(r["id"]) for r in rows)
        return out

    def prime(self, types: Sequence[str]) -> list[TypeScan]:
        """Full scans of ``types``, after recording the event cursor. With progress, SG's count of
        every type comes first, and the run's position after each type."""
        self.record_event_cursor()
        if self.progress == "off":
            return [self.full_scan(t) for t in types]
        totals = {t: self.count(t, self.full_filters(t)) for t in types}
        known = sum(n for n in totals.values() if n is not None)
        log.info("full scan of %d types, %d rows by SG's count (%s)", len(types), known,
                 ", ".join(f"{t} {'?' if n is None else n}" for t, n in totals.items()))
        started, done, out = time.monotonic(), 0, []
        for number, entity_type in enumerate(types, 1):
            out.append(self._full_scan(entity_type, totals[entity_type]))
            done += out[-1].rows
            if number < len(types):
                elapsed = time.monotonic() - started
                eta = f", ETA {format_duration((known - done) * elapsed / done)}" if 0 < done < known else ""
                log.info("%d/%d types, %d/%d rows%s", number, len(types), done, known, eta)
        return out

    # -- reconcile -----------------------------------------------------------------------
    def primed_types(self) -> dict[str, str | None]:
        """Primed cached types and their watermarks."""
        types = self.store.types
        with self.store.engine.connect() as conn:
            rows = conn.execute(sa.select(types.c.entity_type, types.c.scan_watermark).where(types.c.primed))
            return {r.entity_type: r.scan_watermark for r in rows if r.entity_type in self.store.schema}

    def reconcile(self, types: Sequence[str], since: datetime | None = None,
                  overlap: float = DEFAULT_OVERLAP) -> list[TypeScan]:
        """Upsert rows updated after ``since`` (or each type's watermark minus ``overlap``)."""
        primed = self.primed_types()
        out = []
        for entity_type in types:
            if entity_type not in primed:
                log.info("%s: not primed, skipped (run a full scan first)", entity_type)
                continue
            if not self.has_updated_at(entity_type):
                log.warning("%s: updated_at is not cached, cannot reconcile", entity_type)
                continue
            start = since
            if start is None and primed[entity_type] is not None:
                start = parse_when(primed[entity_type]) - timedelta(seconds=overlap)
            # no watermark: the type had no row with updated_at when primed (often: it was empty);
            # every row is read, so rows created since without events are found
            out.append(self.reconcile_type(entity_type, start, primed[entity_type]))
        return out

    def reconcile_type(self, entity_type: str, start: datetime | None, watermark: str | None) -> TypeScan:
        """Read rows of one type with ``updated_at`` after ``start`` (every row when None); advance
        its watermark."""
        scan = TypeScan(entity_type)
        filters: list[Any] = [] if start is None else [["updated_at", "greater_than", start]]
        pfilter = self.project_filter(entity_type)
        if pfilter:
            filters.insert(0, pfilter)
        after = "the start (no watermark yet)" if start is None else format_wire_dt(start)
        log.debug("%s: reading rows updated after %s", entity_type, after)
        scan.watermark = later(watermark, self.newest_update(entity_type))
        with self._progress(entity_type) as progress:
            self._read_into(scan, filters, progress)
        types = self.store.types
        with self.store.engine.begin() as conn:
            conn.execute(
                types.update()
                .where(types.c.entity_type == entity_type)
                .values(scan_watermark=scan.watermark, last_scan_at=now_utc())
            )
        log.info("%s (updated after %s)", scan.summary(), after)
        return scan
