"""Load a dump (cache/scan/dumpformat.py) into a replica, through the scanner's write path.

Rows go in one page per transaction (``Store.write_entities``, source ``load``: rows, links,
the entity registry and the change log, as a scan writes them). A type is marked primed only
when asked (``complete``), when the file says it is complete for the type, and when the replica
holds no row of the type that the file lacks (such a row could be stale: a scan must settle it).
A type already primed in the replica is refused: a dump may be older than what the replica holds.
The event cursor (and floor) are taken from the file when the replica has none, as a full scan
sets them, so ``scripts/ingest-events`` resumes where the dumped replica stood.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import sqlalchemy as sa

from ..replica.site import Site, SiteError, bind
from ..replica.site import check as check_site
from ..replica.statekeys import EVENT_CURSOR, EVENT_FLOOR
from ..replica.store import Store
from .dumpformat import REGISTRY, RETIRED, DumpError, read_header, type_digest

log = logging.getLogger("sgcache.load")

PAGE_SIZE = 500
SOURCE = "load"
#: Seconds between two progress lines in the log when there is no progress bar.
LOG_EVERY = 10.0


@dataclass
class LoadStats:
    """What a load did."""

    rows: dict[str, int] = field(default_factory=dict)
    inserted: int = 0
    changed: int = 0
    registry: int = 0
    primed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{sum(self.rows.values())} rows ({self.inserted} new, {self.changed} changed), "
                f"{self.registry} registry lines")
        return text + (f"; primed: {', '.join(self.primed)}" if self.primed else "; no type primed")


class Loader:
    """Loads one dump into ``store``. ``complete``: the types to mark primed (the file must say it
    is complete for each), ``True`` for every type the file says it is complete for, or None."""

    def __init__(self, store: Store, *, complete: Sequence[str] | bool | None = None,
                 page_size: int = PAGE_SIZE, progress: bool = False,
                 progress_factory: Callable[..., Any] | None = None):
        self.store = store
        self.complete = complete
        self.page_size = page_size
        self.progress = progress
        self._progress_factory = progress_factory

    def check(self, header: dict[str, Any]) -> list[str]:
        """The file fits this replica (site, types and digests; no type already primed); the types
        to prime. An unbound replica is bound to the dump's site once every check passed."""
        schema = self.store.schema
        site = None
        if header.get("site"):
            try:
                site = Site.parse(header["site"])
            except SiteError as exc:
                raise DumpError(f"the dump names a bad site: {exc}") from None
            check_site(self.store, site)  # SiteMismatch: another site's replica
        types: dict[str, Any] = header["types"]
        unknown = sorted(t for t in types if t not in schema)
        if unknown:
            raise DumpError(f"types not cached by this replica's schema: {', '.join(unknown)}")
        differ = sorted(t for t, info in types.items() if info["digest"] != type_digest(schema, t))
        if differ:
            raise DumpError(f"the schema defines these types otherwise than the dump: {', '.join(differ)} "
                            "(load with the schema the dump was made with)")
        with self.store.engine.connect() as conn:
            primed = sorted(set(types) & set(self.store.primed_fields(conn)))
        if primed:
            raise DumpError(f"already primed in this replica: {', '.join(primed)} (load into a new replica)")
        to_prime = self._to_prime(types)
        if site is not None:
            bind(self.store, site)
        return to_prime

    def _to_prime(self, types: dict[str, Any]) -> list[str]:
        """The types ``complete`` asks to prime, checked against what the file is complete for."""
        whole = [t for t, info in types.items() if info.get("complete")]
        if self.complete is True:
            partial = sorted(set(types) - set(whole))
            if partial:
                log.warning("not complete in the dump (dumped by project, or not primed where dumped), "
                            "loaded but not primed: %s", ", ".join(partial))
            return sorted(whole)
        if not self.complete:
            return []
        named = list(self.complete)
        missing = sorted(set(named) - set(types))
        if missing:
            raise DumpError(f"not in the dump: {', '.join(missing)}")
        partial = sorted(set(named) - set(whole))
        if partial:
            raise DumpError(f"the dump is not complete for: {', '.join(partial)}")
        return sorted(named)

    def load(self, stream: IO[str], header: dict[str, Any] | None = None) -> LoadStats:
        """Read the header (unless given: the caller read it), then every line; prime the types asked for."""
        header = header if header is not None else read_header(stream)
        to_prime = self.check(header)
        stats = LoadStats()
        seen: dict[str, set[int]] = {t: set() for t in to_prime}
        page: list[dict[str, Any]] = []
        registry: list[dict[str, Any]] = []
        logged = time.monotonic()
        with self._bar() as bar:
            for number, record in self._records(stream, header):
                if record.get(REGISTRY):
                    registry.append(record)
                    continue
                if page and (record["type"] != page[0]["type"] or len(page) >= self.page_size):
                    self._write(page, stats, seen, number)
                    bar.update(len(page))
                    page = []
                    if not self.progress and time.monotonic() - logged >= LOG_EVERY:
                        log.info("%d rows loaded (line %d)", sum(stats.rows.values()), number)
                        logged = time.monotonic()
                page.append(record)
            if page:
                self._write(page, stats, seen, None)
                bar.update(len(page))
        self._finish(header, registry, to_prime, seen, stats)
        log.info("loaded %s", stats.summary())
        return stats

    def _records(self, stream: IO[str], header: dict[str, Any]) -> Iterable[tuple[int, dict[str, Any]]]:
        """(line number, record) of every line after the header, checked for shape."""
        types = header["types"]
        for number, line in enumerate(stream, start=2):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DumpError(f"line {number}: not JSON ({exc.msg})") from None
            if not (isinstance(record, dict) and isinstance(record.get("type"), str)
                    and isinstance(record.get("id"), int) and isinstance(record.get(RETIRED), bool)):
                raise DumpError(f"line {number}: not an entity line (type, id, {RETIRED})")
            if not record.get(REGISTRY):
                if record["type"] not in types:
                    raise DumpError(f"line {number}: {record['type']} is not a type of the dump's header")
                missing = [f for f in self.store.cached_field_names(record["type"]) if f not in record]
                if missing:
                    raise DumpError(f"line {number}: {record['type']} {record['id']} lacks {', '.join(missing[:5])}")
            yield number, record

    def _write(self, page: list[dict[str, Any]], stats: LoadStats, seen: dict[str, set[int]],
               number: int | None) -> None:
        """One page of one type in one transaction, active and retired rows apart."""
        entity_type = page[0]["type"]
        where = f"before line {number}" if number else "at the end of the file"
        with self.store.engine.begin() as conn:
            for retired in (False, True):
                rows = [{k: v for k, v in r.items() if k != RETIRED} for r in page if r[RETIRED] is retired]
                if not rows:
                    continue
                result = self.store.write_entities(conn, entity_type, rows, SOURCE, complete=True, retired=retired)
                if result.to_fetch:
                    raise DumpError(f"{entity_type}: bad values in the page {where}, e.g. id {result.to_fetch[0][1]} "
                                    "(see the log); nothing of that page was stored")
                stats.inserted += result.inserted
                stats.changed += result.changed
        stats.rows[entity_type] = stats.rows.get(entity_type, 0) + len(page)
        if entity_type in seen:
            seen[entity_type].update(r["id"] for r in page)

    def _finish(self, header: dict[str, Any], registry: list[dict[str, Any]], to_prime: list[str],
                seen: dict[str, set[int]], stats: LoadStats) -> None:
        """Registry lines, the event cursor, and the types to prime, in one transaction."""
        store = self.store
        with store.engine.begin() as conn:
            batch = store.batch(conn, SOURCE)
            for line in registry:
                key = (line["type"], int(line["id"]))
                batch.note([{k: v for k, v in line.items() if k in ("type", "id", "name")}])
                batch.retire(key, True)
            batch.flush()
            stats.registry = len(registry)
            cursor = header.get("event_cursor")
            if isinstance(cursor, int) and store.get_state(conn, EVENT_CURSOR) is None:
                store.set_state(conn, EVENT_CURSOR, cursor)
                store.set_state(conn, EVENT_FLOOR, cursor)
                log.info("event cursor set to %d (the dumped replica's)", cursor)
            for entity_type in to_prime:
                table = store.tables[entity_type]
                held = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                if held != len(seen[entity_type]):
                    log.warning("%s: the replica holds %d rows the dump lacks: not primed (run scripts/scan --full)",
                                entity_type, held - len(seen[entity_type]))
                    continue
                info = header["types"][entity_type]
                store.mark_primed(conn, entity_type, watermark=info.get("watermark"))
                unprimed = [f for f in info.get("unprimed") or () if f in store.schema.entities[entity_type].fields]
                if unprimed:
                    fields = store.fields
                    conn.execute(fields.update().where((fields.c.entity_type == entity_type)
                                                       & fields.c.field_name.in_(unprimed)).values(primed=False))
                stats.primed.append(entity_type)

    def _bar(self) -> Any:
        factory = self._progress_factory
        if factory is None:
            from tqdm import tqdm as factory
        return factory(desc="load", unit=" rows", disable=not self.progress, leave=False)
