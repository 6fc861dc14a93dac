"""Re-reading queued entities from SG (the fetch queue, :mod:`cache.replica.fetchqueue`), after each poll.

Invariant kept here: never lose an update. Entities are read per type, ``id in [...]`` first
and ``retired_only`` for the rest, and written whole (``complete``: every cached field the fetch
leaves out, one the site deleted or changed the type of, is un-primed) in one transaction with
the removal of their queue entries. An entry stays queued when it was queued again while SG
was read (:func:`cache.replica.fetchqueue.remove_handled`), when the write path refused its row
(its type's reads keep passing), and when another writer (a proxy learning a client's write)
changed its row after SG was read: that newer row is not written over but read again. An
entity SG has neither active nor retired is dropped from the queue with a warning. A type whose
fetch fails stays queued while the other types are fetched; its failure, or a row refused,
asks for a schema re-read (a field deleted on the site comes with no event), which leaves such
fields out of later fetches.

Before the queue is read, the link searches of revivals (:mod:`cache.replica.linksearch`) ask
SG which rows link each revived entity, and queue those rows: SG shows such links again with no
event for the linking row, and a row first read while the entity was retired lacks them.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from ..replica import fetchqueue, fieldtypes, linksearch, pending
from ..replica.statekeys import PENDING_CAUGHT_UP
from ..replica.store import Store
from ..wire import Key, chunks, to_wire
from .apply import LATE_RETIREMENT, RETIREMENT_AFTER_PROXY
from .config import SGClient
from .eventwire import FETCH_CHUNK, id_ranges

log = logging.getLogger("sgcache.events")

#: Times a chunk's rows changed in the replica while SG was read are read again in one round.
OVERTAKEN_TRIES = 3
#: The reason of a row SG showed linking a revived entity (cache/replica/linksearch.py).
LINKS_A_REVIVED = "links a revived entity"


class Fetcher:
    """Reads the entities waiting in the fetch queue from SG into the replica."""

    def __init__(self, store: Store, sg: SGClient | None, connect: Callable[[], Connection],
                 missing_fields: set[tuple[str, str]], recheck_schema: Callable[[], None] = lambda: None):
        self.store = store
        self.sg = sg
        self.connect = connect
        self.missing_fields = missing_fields  # shared with the schema refresh, which fills it
        self.recheck_schema = recheck_schema  # asks the schema refresh to re-read the site's schema
        self._rechecked: set[str] = set()  # types whose failure asked for a re-read already

    def fetch_fields(self, entity_type: str) -> list[str]:
        """The fields a fetch asks for: the type's cached fields that the site still has."""
        entity = self.store.schema.entities[entity_type]
        return sorted(f for f, s in entity.fields.items()
                      if fieldtypes.is_cached_type(s.data_type) and (entity_type, f) not in self.missing_fields)

    def process(self, limit: int = 5000) -> int:
        """Re-read queued entities from SG, up to ``limit`` of each type (the longest queued first);
        returns how many left the queue.

        A type whose fetch fails (SG refuses it) is left queued and the others go on."""
        if self.sg is None:
            return 0
        conn = self.connect()
        self._search_linking(conn, limit)
        q = self.store.fetch_queue
        with conn.begin():
            queued_by_type = fetchqueue.entries(conn, q, limit)
            waiting = fetchqueue.waiting(conn, q, fetchqueue.LINK_LEFT_OUT, self._caught_up_before(conn))
        for entity_type, entity_id in waiting:  # not read again before a poll has caught up after them
            queued_by_type.get(entity_type, {}).pop(entity_id, None)
        queued_by_type = {t: queued for t, queued in queued_by_type.items() if queued}
        handled = 0
        for entity_type, queued in queued_by_type.items():
            if entity_type not in self.store.tables:  # the schema file lost the type meanwhile
                with conn.begin():
                    fetchqueue.remove_handled(conn, q, entity_type, queued)
                handled += len(queued)
                continue
            refused = 0
            try:
                for chunk in chunks(sorted(queued), FETCH_CHUNK):
                    left, not_stored = self._fetch_ids(conn, entity_type, {i: queued[i] for i in chunk})
                    handled, refused = handled + left, refused + not_stored
            except DBAPIError:
                raise  # the run loop reconnects
            except Exception as exc:  # noqa: BLE001 - one type SG refuses must not stall the others
                log.error("fetch of %s %s failed (%s: %s); what it did not store stays queued", entity_type,
                          id_ranges(sorted(queued)), type(exc).__name__, exc)
                self._recheck_schema(entity_type, "its fetch failed")
                continue
            if refused:
                self._recheck_schema(entity_type, "rows SG sent could not be stored")
            else:
                self._rechecked.discard(entity_type)
        return handled

    def _search_linking(self, conn: Connection, limit: int) -> None:
        """Ask SG which rows link the entities revived since (the link searches queued, up to
        ``limit``), and queue those rows for a re-read, removing the searches in the same
        transaction. A type whose search SG refuses stays queued, at the back (its link fields'
        markers stand)."""
        with conn.begin():
            searches = linksearch.entries(conn, self.store.link_search, limit)
        by_type: dict[str, dict[int, dt.datetime]] = {}
        for (entity_type, entity_id), at in searches.items():
            by_type.setdefault(entity_type, {})[entity_id] = at
        for entity_type, ids in sorted(by_type.items()):
            try:
                found = self._linking_at_sg(entity_type, sorted(ids))
            except DBAPIError:
                raise  # the run loop reconnects
            except Exception as exc:  # noqa: BLE001 - one type SG refuses must not stall the others
                log.error("asking SG for the rows linking revived %s %s failed (%s: %s); asked again later",
                          entity_type, id_ranges(sorted(ids)), type(exc).__name__, exc)
                with conn.begin():  # at the back: searches queued after them are asked first next time
                    linksearch.put(conn, self.store.link_search, [(entity_type, i) for i in ids],
                                   self.store.db_now(conn))
                continue
            with conn.begin():
                batch = self.store.batch(conn, "fetch")
                for key in sorted(found):
                    batch.queue(key, LINKS_A_REVIVED)
                batch.flush()
                linksearch.remove_handled(conn, self.store.link_search, entity_type, ids)
            if found:
                log.info("revived %s %s: %d rows SG shows linking them queued for a re-read", entity_type,
                         id_ranges(sorted(ids)), len(found))

    def _linking_at_sg(self, entity_type: str, ids: list[int]) -> set[Key]:
        """The cached rows SG shows linking one of these entities (ids only, two finds per link
        field that can link the type and chunk of ids: active rows, then retired ones); a failing find asks for a schema re-read
        (a link field deleted on the site) and raises."""
        sg = self.sg
        assert sg is not None
        found: set[Key] = set()
        for owner, fname, _storage in linksearch.link_fields(self.store, entity_type):
            if fname not in self.fetch_fields(owner):
                continue  # deleted on the site: not fetched, not primed
            for chunk in chunks(ids, FETCH_CHUNK):
                links = [{"type": entity_type, "id": i} for i in chunk]
                # retired rows too: the replica answers ``return_only: retired`` reads, and SG
                # shows a retired row's link to the revived entity again as well
                for retired in (False, True):
                    try:
                        rows = sg.find(owner, [[fname, "in", links]], ["id"], retired_only=retired)
                    except Exception:
                        self._recheck_schema(owner, f"asking SG for {owner}.{fname} failed")
                        raise
                    found.update((owner, int(r["id"])) for r in rows)
        return found

    def _recheck_schema(self, entity_type: str, why: str) -> None:
        """Ask for a schema re-read (once per type until its fetches succeed): a field deleted on
        the site (SG logs no event for it) or whose type changed makes every fetch of the type
        fail or its rows unstorable; the re-read un-primes the field and leaves it out of fetches."""
        if entity_type in self._rechecked:
            return
        self._rechecked.add(entity_type)
        log.warning("%s: %s; the site's schema will be re-read", entity_type, why)
        self.recheck_schema()

    def _fetch_ids(self, conn: Connection, entity_type: str, queued: dict[int, dt.datetime]) -> tuple[int, int]:
        """Fetch and store one chunk, reading again (a few times) the rows written meanwhile;
        returns how many left the queue and how many rows were not stored (they stay queued)."""
        left = refused = 0
        for _attempt in range(OVERTAKEN_TRIES):
            stored, not_stored, overtaken = self._fetch_chunk(conn, entity_type, queued)
            left, refused = left + stored, refused + not_stored
            queued = {i: queued[i] for i in overtaken}
            if not queued:
                break
        return left, refused

    def _fetch_chunk(self, conn: Connection, entity_type: str,
                     queued: dict[int, dt.datetime]) -> tuple[int, int, set[int]]:
        """Fetch and store one chunk; returns how many left the queue, how many rows were not
        stored, and the ids written by another writer after SG was read (they stay queued)."""
        with conn.begin():
            mark = self.store.change_mark(conn)
        fields = self.fetch_fields(entity_type)
        ids = sorted(queued)
        sg = self.sg
        assert sg is not None
        active = [to_wire(r) for r in sg.find(entity_type, [["id", "in", ids]], fields)]
        missing = sorted(set(ids) - {int(r["id"]) for r in active})
        retired = [to_wire(r) for r in sg.find(entity_type, [["id", "in", missing]], fields, retired_only=True)] \
            if missing else []
        gone = sorted(set(missing) - {int(r["id"]) for r in retired})
        refused: set[int] = set()
        held: set[int] = set()
        with conn.begin():
            overtaken = self._written_since(conn, entity_type, ids, mark, active + retired)
            complete = self._complete(conn, entity_type, fields)
            batch = self.store.batch(conn, "fetch")
            for records, is_retired in ((active, False), (retired, True)):
                records = [r for r in records if int(r["id"]) not in overtaken]
                held |= self._wait_for_events(conn, entity_type, batch.live_links_left_out(entity_type, records))
                records = [r for r in records if int(r["id"]) not in held]
                result = batch.put(entity_type, records, complete=complete, retired=is_retired)
                refused.update(entity_id for _t, entity_id in result.to_fetch)
            batch.flush()
            # an entity whose row was not stored stays queued: its type's reads pass (pending-fetch)
            # rather than be answered without it
            stored = {i: at for i, at in queued.items() if i not in refused and i not in overtaken and i not in held}
            fetchqueue.remove_handled(conn, self.store.fetch_queue, entity_type, stored)
            if refused:  # at the back of the queue: later rows of the type are fetched before them again
                fetchqueue.requeue(conn, self.store.fetch_queue, entity_type, refused, "not stored",
                                   self.store.db_now(conn))
            if held:
                fetchqueue.requeue(conn, self.store.fetch_queue, entity_type, held, fetchqueue.LINK_LEFT_OUT,
                                   self.store.db_now(conn))
        if held:
            log.info("%s %s: SG's rows leave out links to entities live here; read again after the next poll",
                     entity_type, id_ranges(sorted(held)))
        gone = [i for i in gone if i not in overtaken]
        if gone:
            log.warning("%s %s not found on SG (active or retired); dropped from the fetch queue",
                        entity_type, id_ranges(gone))
        if refused:
            log.error("%s %s: SG's rows could not be stored; they stay queued (reads of %s pass)",
                      entity_type, id_ranges(sorted(refused)), entity_type)
        return len(stored), len(refused), overtaken

    def _wait_for_events(self, conn: Connection, entity_type: str, left_out: Mapping[int, set[Key]]) -> set[int]:
        """Of the rows whose SG row leaves out a link to an entity live in the replica (``ids``),
        those not stored yet. SG cleared that link, or retired that entity after the ingester's
        last poll: the replica cannot tell, and in the second case a row stored without the link
        would lack it for good once SG shows it again on the entity's revival (no event for this
        row). Such a row stays queued (:data:`fetchqueue.LINK_LEFT_OUT`) until a poll that started after it
        was queued so (the database's clock, ``pending.MARGIN`` later) reached the end of the log:
        the entity's retirement is then applied, and the row read again is stored as SG has it
        (the link kept hidden if the entity is retired). In the database, so a restart or
        ``--once`` runs keep the wait. A row also waits while an entity it leaves out is queued
        because its retirement or revival came late (its retired flag comes with its own fetch)."""
        if not left_out:
            return set()
        since = fetchqueue.queued_for(conn, self.store.fetch_queue, entity_type, left_out,
                                     fetchqueue.LINK_LEFT_OUT)
        caught_up = self._caught_up_before(conn)
        in_doubt = fetchqueue.queued_with(conn, self.store.fetch_queue, set().union(*left_out.values()),
                                          (LATE_RETIREMENT, RETIREMENT_AFTER_PROXY))
        return {i for i, children in left_out.items()
                if i not in since or caught_up is None or since[i] >= caught_up or children & in_doubt}

    def _caught_up_before(self, conn: Connection) -> dt.datetime | None:
        """The latest time (the database's clock) such that a poll that started ``pending.MARGIN``
        later reached the end of the event log; None before any such poll, and while a gap is open
        (the retirement may be the event that commits late: held rows wait for it, or for the gap
        to be given up)."""
        if conn.execute(sa.select(self.store.gaps.c.id).limit(1)).first() is not None:
            return None
        started = self.store.get_state(conn, PENDING_CAUGHT_UP)
        if not isinstance(started, int | float) or isinstance(started, bool):
            return None
        return dt.datetime.fromtimestamp(float(started) - pending.MARGIN, dt.UTC).replace(tzinfo=None)

    def _written_since(self, conn: Connection, entity_type: str, ids: list[int], mark: int,
                       records: list[dict[str, Any]]) -> set[int]:
        """The ids whose rows another writer overtook after ``mark`` (taken before SG was read),
        under the write lock (:meth:`Store.overtaken`): a proxy that learned a client's write
        meanwhile holds a row newer than the fetch's, which must not be written over it."""
        overtaken = self.store.overtaken(conn, entity_type, ids, records, mark)
        if overtaken:
            log.info("%s %s changed in the replica while SG was read; read again", entity_type,
                     id_ranges(sorted(overtaken)))
        return overtaken

    def _complete(self, conn: Connection, entity_type: str, fields: list[str]) -> bool:
        """Whether rows read with ``fields`` may be stored whole (a new row too): every cached field
        left out is un-primed (its reads pass), so the row's empty value there is never served."""
        left_out = set(self.store.cached_field_names(entity_type)) - set(fields) - {"id"}
        return not left_out & self.store.primed_fields(conn).get(entity_type, set())
