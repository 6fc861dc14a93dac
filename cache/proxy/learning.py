"""What the proxy writes into the replica after a write it sent: SG's answer, or the markers that stand in for it.

- :meth:`Learner.learn` stores SG's answer to a create/update/delete/revive/batch (and the other
  side of its pairs), unless the ingester applied events since :meth:`Learner.write_mark`;
- :meth:`Learner.fetch_rows` reads back from SG the rows of a partial answer;
- :meth:`Learner.outcome_unknown` and :meth:`Learner.uploaded` mark pending what a write of
  unknown outcome or an upload could have changed;
- :meth:`Learner.defer` keeps in memory the writes the database did not take, and
  :meth:`Learner.record_unrecorded` marks them pending before the next read is served.

Everything here is blocking (SQL, HTTP); the addon calls it from a worker thread. What a write's
client waits for (the mark, learning the answer, the markers of a write) waits for the database at
most :attr:`Learner.wait` seconds (cache/proxy/dbwait.py); what it did not do by then is deferred.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

from sqlalchemy.engine import Engine

from ..errors import Passthrough
from ..replica import fetchqueue, pending
from ..replica.dialect import classify_error
from ..replica.effects import WriteEffects, field_items, written_id
from ..replica.pairs import PairRegistry
from ..replica.schema import Schema
from ..replica.statekeys import EVENT_HIGH, SCHEMA_PENDING
from ..replica.store import Store
from ..wire import chunks, links_in
from . import upstream
from .breaker import Breaker, short_error
from .dbwait import WRITE_WAIT_SECONDS, BoundedSteps, DatabaseWait

log = logging.getLogger("sgcache.service")

#: :meth:`Learner.learn` called without a mark (no ingester check).
UNMARKED = object()
#: :meth:`Learner.write_mark` when the database did not give the mark in time (or the breaker was
#: backing off): the write's answer is then not learnt but deferred at once (see :meth:`Learner.learn`).
MISSED = -1
#: Write transactions of the proxy at once (each on a connection of the replica's pool, which the
#: reads share: writers waiting on the write lock must not hold every connection), and event
#: marks asked at once.
LEARNERS = 4
MARKERS = 4
#: Writes whose effects could not be recorded, kept in memory until they are (then every type is
#: marked at once past this many).
MAX_UNRECORDED = 1000
#: Seconds after a write is deferred that it is recorded even when no read comes (every read
#: records first: this bounds how long other proxies may serve what it changed), doubled while
#: the database does not take it, up to FLUSH_MAX.
FLUSH_FIRST = 0.5
FLUSH_MAX = 5.0
#: Ids read back by one SG read after a partial answer (one page), and by one write in all: the
#: writer waits for them; past this many the type is marked pending and the ingester fetches the rest.
FETCH_PAGE = 500
MAX_FETCH_BACK = 5000


class Learner:
    """Learns from the writes sent through the proxy into one replica."""

    def __init__(self, store: Store, schema: Schema, pairs: PairRegistry, breaker: Breaker,
                 invalidate: Callable[[], None], marks: Engine | None = None,
                 wait: float = WRITE_WAIT_SECONDS) -> None:
        self.store = store
        #: Where :meth:`write_mark` asks (PostgreSQL: the autocommit pool of the versions, one
        #: round trip, where the read pool's connection costs a ping and a rollback too).
        self.marks = marks or store.engine
        self.schema = schema
        self.pairs = pairs
        self.breaker = breaker
        self._invalidate = invalidate  # forgets the service's cached replica state after a write
        self._lock = threading.Lock()
        # writes SG answered whose effects the database did not take (it failed, or the breaker
        # was open): (method, args); None past MAX_UNRECORDED. Reads pass until they are marked.
        self._unrecorded: list[tuple[str, Any]] | None = []
        self._deferred = 0  # writes deferred so far (tells a flush whether more came meanwhile)
        #: fields SG changed through this proxy whose un-priming the database did not take
        self._fields_changed: list[tuple[str, str]] = []
        #: Seconds a write's client waits for each database step here (0: as long as it takes).
        self.wait = wait
        #: held by the one :meth:`record_unrecorded` running: two at once would each take the
        #: deferred writes they marked off the list, the second taking newer ones it never marked
        self._flushing = threading.Lock()
        self._flusher: threading.Thread | None = None  # records the deferred writes when no read does
        self._closed = threading.Event()
        self._marking = BoundedSteps(MARKERS, "sgcache-mark")
        self._recording = BoundedSteps(LEARNERS, "sgcache-learn")

    def close(self) -> None:
        """Let go of the steps' threads (those waiting on the database end with it)."""
        self._closed.set()
        self._marking.close()
        self._recording.close()

    def _bounded(self, steps: BoundedSteps, step: Callable[[], Any]) -> Any:
        """``step()`` in ``steps``' threads, waited for at most :attr:`wait` (raises :class:`DatabaseWait`)."""
        return steps.run(self.wait, step)

    def _timed_out(self, exc: DatabaseWait) -> Passthrough:
        """A step not done in time: a database failure for the breaker when it was running (a step
        still queued behind others is the proxy's own load: it passes ``busy``)."""
        return self.breaker.failed(exc) if exc.started else Passthrough("busy", str(exc))

    def _step_failed(self, exc: Exception) -> Passthrough:
        """A bounded step that raised or was not done in time, told to the breaker: the pass reason."""
        return self._timed_out(exc) if isinstance(exc, DatabaseWait) else self.breaker.failed(exc)

    def all_recorded(self) -> bool:
        """Whether no write (nor field SG changed) is left whose effects the database has not taken."""
        return self._unrecorded == [] and not self._fields_changed

    def field_changed(self, entity_type: str, field_name: str) -> None:
        """SG changed or deleted a cached field through this proxy (no event says so): un-prime it
        and mark it (its reads pass, on every proxy) and name it for the ingester's schema re-read.
        When the database does not take that (within :attr:`wait`), it is kept in memory: this
        proxy's reads pass until :meth:`record_unrecorded` has done it (never raises)."""
        try:
            self._bounded(self._recording, lambda: self._unprime([(entity_type, field_name)]))
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: done before the next read
            self._step_failed(exc)
            log.warning("could not un-prime %s.%s after SG changed it (%s); reads pass until it is",
                        entity_type, field_name, short_error(exc))
            with self._lock:
                self._fields_changed.append((entity_type, field_name))
            self._flush_later()

    def _unprime(self, fields: list[tuple[str, str]]) -> None:
        """Un-prime and mark ``fields`` and name them for the ingester's schema re-read (one transaction)."""
        store = self.store
        with store.write_engine.begin() as conn:
            for entity_type, field_name in fields:
                conn.execute(store.fields.update()
                             .where((store.fields.c.entity_type == entity_type)
                                    & (store.fields.c.field_name == field_name))
                             .values(primed=False))
            pending.mark(conn, store.pending, fields)
            names = store.get_state(conn, SCHEMA_PENDING) or []
            new = [f for f in dict.fromkeys(f for _t, f in fields) if f not in names]
            if new:
                store.set_state(conn, SCHEMA_PENDING, [*names, *new])

    def write_mark(self) -> WriteMark | int | None:
        """Where the ingester and the change log stood just before a write is sent to SG (given
        back to :meth:`learn`); None when the replica cannot say; :data:`MISSED` when it did not
        say within :attr:`wait` (or the breaker is backing off: the database is not asked)."""
        if self.breaker.backing_off():
            return MISSED
        try:
            return self._bounded(self._marking, self._read_mark)
        except DatabaseWait as exc:
            self._timed_out(exc)
            log.warning("the replica did not give the event mark before a write in %gs; its answer will "
                        "not be learnt, reads of what it changes pass until they are marked", self.wait)
            return MISSED

    def _read_mark(self) -> WriteMark | None:
        try:
            with self.marks.connect() as conn:
                high, seq = self.store.state_and_mark(conn, EVENT_HIGH)
                return WriteMark(int(high or 0), seq)
        except Exception as exc:  # noqa: BLE001 - learn then only marks
            log.info("could not read the event mark before a write: %s", short_error(exc))
            return None

    def learn(self, method: str, args: Any, results: Any,
              mark: WriteMark | None | object = UNMARKED) -> list[tuple[str, int]]:
        """Write the upstream answer of a create/update/delete/revive/batch into the replica.

        Returns the entities whose answer was partial: they are queued for a fetch, and
        reads of their type pass until the rows are complete. Never raises: what is not
        recorded here (database trouble, the breaker open) the ingester brings.

        ``mark`` is :meth:`write_mark` from before the write was sent. When the ingester has
        applied events since then, or a proxy learnt another write to one of the same entities or
        to the other side of its link fields (:meth:`_touched_rows`) meanwhile (two writes in
        flight at once: which one SG applied last is not known), SG's
        answer may be older than what the replica holds: the answer is then not stored;
        everything the write could have changed is marked pending instead, until the ingester
        has the write's own events.

        The caller waits at most :attr:`wait`; then (or at once when the mark was
        :data:`MISSED`: the database just failed to answer, a second wait would double the
        write's delay) the write is deferred (:meth:`defer`): this proxy's reads pass until what
        it could change is marked. A learn given up on goes on in its thread and may still commit
        when the database answers: it is then a learn that waited that long for the write lock,
        and as safe. It reads the ingester's mark and the rows proxies wrote under the lock, so it
        stores nothing once the ingester applied any event since the write was sent (or a proxy
        learnt another write to the same entity): the write's own events move the mark, so a
        late answer is stored only before the ingester has them, and the ingester applies them
        (and any later write's) after it, under the same lock. Its markers, written by the next
        read, only make reads pass until the ingester is past the write.
        """
        if mark == MISSED:
            log.info("%s answer not learnt (no event mark); its effects are deferred", method)
            self.defer(method, args)
            return []
        try:
            return self._bounded(self._recording, lambda: self._learn(method, args, results, mark))
        except DatabaseWait as exc:
            self._timed_out(exc)
            log.warning("could not record a %s answer in %gs; reads of what it changes pass until they "
                        "are marked", method, self.wait)
            self.defer(method, args)
            return []

    def _learn(self, method: str, args: Any, results: Any, mark: WriteMark | None | object) -> list[tuple[str, int]]:
        """:meth:`learn`'s work, in a thread of :attr:`_recording`."""
        to_fetch: list[tuple[str, int]] = []
        try:
            self.breaker.check()
            with self.store.write_engine.begin() as conn:
                if mark is UNMARKED:
                    registry = self.pairs.with_learned(conn, self.store.pairs_table)
                    moved = False
                elif not isinstance(mark, WriteMark):  # unknown before the write: it may have moved
                    registry = self.pairs.with_learned(conn, self.store.pairs_table)
                    moved = True
                else:  # the ingester's mark, the learned pairs and the rows proxies wrote since the
                    # write was sent, under the write lock, in one round trip
                    high, learned, written = self.store.locked_state_pairs_written(
                        conn, EVENT_HIGH, mark.change_seq)
                    registry = self.pairs.with_rows(learned)
                    moved = _moved(mark.event_high, high) or bool(
                        written and written & self._touched_rows(conn, registry, method, args))
                markers: set[tuple[str, str]] = set()
                if moved:
                    effects = WriteEffects(self.store, registry, conn)
                    for kind, req in _write_requests(method, args):
                        effects.outcome_unknown(kind, req["type"], req)
                    self._mark(conn, effects.markers)
                    log.debug("%s answer older than the replica may be: marked pending, not stored", method)
                    return []
                if method == "batch":
                    if isinstance(args, list) and isinstance(results, list) and len(args) == len(results):
                        for req, res in zip(args, results, strict=True):
                            if isinstance(req, Mapping):
                                to_fetch += self._learn_one(conn, req.get("request_type"), req, res,
                                                            registry, markers)
                    else:  # an answer that does not pair with the requests: what each could change is marked
                        effects = WriteEffects(self.store, registry, conn)
                        for kind, req in _write_requests(method, args):
                            effects.outcome_unknown(kind, req["type"], req)
                        markers |= effects.markers
                else:
                    to_fetch += self._learn_one(conn, method, args, results, registry, markers)
                self._mark(conn, markers)
        except Passthrough as exc:
            log.info("%s answer not recorded (%s); the ingester will bring it", method, exc.reason)
            self.defer(method, args)
            return []
        except Exception as exc:  # noqa: BLE001
            self.breaker.failed(exc)
            log.warning("could not record a %s answer; the ingester will bring it", method)
            self.defer(method, args)
            return []
        self.breaker.ok()
        self._invalidate()
        return to_fetch

    def _touched_rows(self, conn: Any, registry: PairRegistry, method: str, args: Any) -> set[tuple[str, int]]:
        """The existing rows storing a write call's answer would write: the entities it writes, and
        the other side of its link fields, the entities they link after the write (the values sent)
        and before it (the replica's). Another proxy's write learnt meanwhile to any of them (say
        ``Sequence.shots`` set while this write moved a Shot into that Sequence) may be the one SG
        applied last: the pair applied from this answer would then undo it."""
        rows = _written_rows(method, args)
        effects = WriteEffects(self.store, registry, conn)
        for kind, req in _write_requests(method, args):
            if kind not in ("create", "update"):
                continue
            for item in field_items(req) or []:
                rows.update((link["type"], int(link["id"])) for link in links_in(item.get("value")))
            if kind == "update" and written_id(req) is not None:
                for before in effects.snapshot(kind, req["type"], req).values():
                    rows.update((link["type"], int(link["id"])) for link in before or [])
        return rows

    def _ingester_moved(self, conn: Any, mark: WriteMark | None) -> bool:
        """Whether the ingester applied events since ``mark`` (taken before SG was asked).

        Read under the write lock (PostgreSQL; SQLite write transactions are serial), so a poll
        either committed before (seen here) or applies its events after this transaction."""
        return mark is None or _moved(mark.event_high, self.store.locked_state(conn, EVENT_HIGH))

    def outcome_unknown(self, method: str, args: Any) -> None:
        """A write was sent to SG but no answer came back: it may have been applied. Reads of
        what it could have changed pass until the ingester is past it (never raises; waits at
        most :attr:`wait`, then defers it: markers written late only make reads pass longer)."""

        def mark() -> None:
            with self.store.write_engine.begin() as conn:
                effects = WriteEffects(self.store, self.pairs.with_learned(conn, self.store.pairs_table), conn)
                for kind, req in _write_requests(method, args):
                    effects.outcome_unknown(kind, req["type"], req)
                self._mark(conn, effects.markers)

        try:
            self._bounded(self._recording, mark)
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: reads pass anyway meanwhile
            self._step_failed(exc)
            log.warning("could not record a %s of unknown outcome; the ingester will bring it", method)
            self.defer(method, args)

    def defer(self, method: str, args: Any) -> None:
        """Remember a write SG answered whose effects the database did not take: this proxy's
        reads pass until :meth:`record_unrecorded` has marked them pending for every proxy."""
        with self._lock:
            self._deferred += 1
            if self._unrecorded is not None:
                self._unrecorded.append((method, args))
                if len(self._unrecorded) > MAX_UNRECORDED:
                    self._unrecorded = None  # too many to tell apart: every type will be marked
        self._flush_later()

    def defer_every_type(self) -> None:
        """Something that may have changed any row (an upload, a body too large to decode) could not
        be marked: this proxy's reads pass until :meth:`record_unrecorded` has marked every cached type."""
        with self._lock:
            self._deferred += 1
            self._unrecorded = None
        self._flush_later()

    def _flush_later(self) -> None:
        """Record the deferred writes in a thread of their own (:data:`FLUSH_FIRST`) unless a read
        does first: with no read coming, other proxies could serve what they changed until the
        ingester brings their events."""
        with self._lock:
            if self._flusher is not None or self._closed.is_set():
                return
            self._flusher = threading.Thread(target=self._flush_until_recorded, name="sgcache-flush", daemon=True)
            self._flusher.start()

    def _flush_until_recorded(self) -> None:
        delay = FLUSH_FIRST
        while not self._closed.wait(delay):
            if not self.all_recorded() and not self.breaker.backing_off():
                try:
                    self.record_unrecorded()
                except Exception as exc:  # noqa: BLE001 - the database in trouble: again, later
                    log.debug("deferred writes not recorded yet: %s", short_error(exc))
                    delay = min(delay * 2, FLUSH_MAX)
                    continue
            with self._lock:
                if self.all_recorded():
                    self._flusher = None
                    return
            delay = min(delay * 2, FLUSH_MAX)
        with self._lock:
            self._flusher = None

    def record_unrecorded(self) -> None:
        """Mark pending everything the deferred writes could have changed (the markers' time is
        now, after those writes, so they clear only once the ingester is past them); raise
        the database's pass reason while it does not take them. Deferred writes that cannot be
        turned into markers for another reason (a shape of arguments not foreseen, a bug) mark
        every cached type instead, once: one odd write never keeps every read passing. The read
        waits for the database at most :attr:`wait` (markers written later only make reads pass
        longer). One runs at a time: a read that finds another recording waits for it as long (then
        passes, ``pending-write``)."""
        if not self._flushing.acquire(timeout=self.wait if self.wait > 0 else -1):
            raise Passthrough("pending-write", "the deferred writes are being recorded")
        try:
            self._record_unrecorded()
        finally:
            self._flushing.release()

    def _record_unrecorded(self) -> None:
        """:meth:`record_unrecorded`'s work (the flush lock held)."""
        with self._lock:
            fields = list(self._fields_changed)
        if fields:
            try:
                self._bounded(self._recording, lambda: self._unprime(fields))
            except Exception as exc:  # noqa: BLE001 - the database is in trouble: keep passing
                raise self._step_failed(exc) from exc
            with self._lock:
                del self._fields_changed[:len(fields)]
            log.info("un-primed %s, changed at SG while the database failed",
                     ", ".join(f"{t}.{f}" for t, f in fields))
        with self._lock:
            deferred = None if self._unrecorded is None else list(self._unrecorded)
            count = self._deferred
        if deferred == []:
            self._invalidate()
            return
        try:
            self._bounded(self._recording, lambda: self._mark_deferred(deferred))
        except DatabaseWait as exc:
            raise self._timed_out(exc) from exc
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: keep passing
            if classify_error(exc)[1]:
                raise self.breaker.failed(exc) from exc
            log.warning("could not mark what %s deferred write(s) changed; marking every type",
                        "many" if deferred is None else len(deferred), exc_info=True)
            try:
                self._bounded(self._recording, lambda: self._mark_deferred(None))
            except Exception as again:  # noqa: BLE001
                raise self.breaker.failed(again) from again
        with self._lock:
            if self._deferred == count:
                self._unrecorded = []
            elif deferred is not None and self._unrecorded is not None:
                del self._unrecorded[:len(deferred)]  # those deferred meanwhile wait for the next read
        self._invalidate()
        log.info("recorded the effects of %s write(s) learned while the database failed",
                 "many" if deferred is None else len(deferred))

    def _mark_deferred(self, deferred: list[tuple[str, Any]] | None) -> None:
        """Mark pending what the ``deferred`` writes could have changed (None: every cached type)."""
        with self.store.write_engine.begin() as conn:
            if deferred is None:
                markers = {(t, pending.WHOLE_TYPE) for t in self.schema.entities}
            else:
                effects = WriteEffects(self.store, self.pairs.with_learned(conn, self.store.pairs_table), conn)
                for method, args in deferred:
                    for kind, req in _write_requests(method, args):
                        effects.outcome_unknown(kind, req["type"], req)
                markers = effects.markers
            self._mark(conn, markers)

    def _mark(self, conn: Any, markers: Collection[tuple[str, str]]) -> None:
        """Record the ``markers`` of cached types and fields: a read of anything else passes anyway,
        and a name taken from a client's write may not fit the markers' table (any length or character)."""
        pending.mark(conn, self.store.pending, [
            (t, f) for t, f in markers
            if t in self.schema.entities and (f == pending.WHOLE_TYPE or f in self.schema.entities[t].fields)])

    def _learn_one(self, conn: Any, method: Any, args: Any, result: Any, registry: PairRegistry | None = None,
                   markers: set[tuple[str, str]] | None = None) -> list[tuple[str, int]]:
        """Store one write's answer, apply the other side of its pairs, and add to ``markers``
        what it may have changed that the replica cannot know yet (cache/replica/effects.py)."""
        if not isinstance(args, Mapping) or method not in ("create", "update", "delete", "revive"):
            return []
        entity_type = args.get("type")
        if not isinstance(entity_type, str):
            return []
        if isinstance(result, list) and result and method in ("create", "update"):
            result = result[0]
        effects = WriteEffects(self.store, registry or self.pairs, conn)
        if method in ("create", "update") and field_items(args) is None:
            # what it sent cannot be read (SG would refuse it): whatever SG did, nothing is stored
            effects.everything()
            if markers is not None:
                markers |= effects.markers
            return []
        old = effects.snapshot(method, entity_type, args)
        to_fetch = self._store_answer(conn, method, entity_type, args, result)
        if method in ("create", "update") or result is True:
            effects.after_write(method, entity_type, args, result, old)
        if method in ("delete", "revive") and result is True and written_id(args) is None:
            effects.markers.add((entity_type, pending.WHOLE_TYPE))  # which row SG took that id for is not known
        if markers is not None:
            markers |= effects.markers
        return to_fetch

    def _removed(self, conn: Any, entity_type: str, entity_id: int, args: Mapping[str, Any]) -> None:
        """The links a ``remove``-mode update took out of the written row (SG applied it): gone
        before the row is read back, whose list would otherwise leave them out while the replica
        holds them live, which a read-back cannot tell from a retirement not polled yet."""
        batch_mode = args.get("multi_entity_update_mode")
        for item in field_items(args) or []:
            mode = item.get("multi_entity_update_mode") or batch_mode
            value = item.get("value")
            if (mode == "remove" and isinstance(value, list) and value
                    and (entity_type, item["field_name"]) in self.store.multi):
                try:
                    self.store.change_multi(conn, entity_type, entity_id, item["field_name"], removed=value,
                                            source="proxy")
                except ValueError:  # not links the replica can read: the read-back decides
                    continue

    def _store_answer(self, conn: Any, method: Any, entity_type: str, args: Mapping[str, Any],
                      result: Any) -> list[tuple[str, int]]:
        """Write the answer's own row into the replica; the entities to fetch when it was partial."""
        if entity_type not in self.schema:
            return []
        if method in ("create", "update"):
            if not isinstance(result, Mapping) or not isinstance(result.get("id"), int):
                return []
            record = {k: v for k, v in result.items() if k != "type"}
            # After an add/remove, whether SG answers with the whole list is not documented:
            # do not store that field from the answer; read the row back instead.
            legacy_mode = args.get("multi_entity_update_mode") in ("add", "remove")  # old batch form
            partial = [
                f["field_name"] for f in field_items(args) or []
                if legacy_mode or f.get("multi_entity_update_mode") in ("add", "remove")
            ]
            for fname in partial:
                record.pop(fname, None)
            outcome = self.store.write_entities(conn, entity_type, [record], "proxy")
            if partial and not outcome.to_fetch:
                self._removed(conn, entity_type, int(result["id"]), args)
                outcome.to_fetch = [(entity_type, int(result["id"]))]
            if outcome.to_fetch:
                self.store.queue_fetch(conn, outcome.to_fetch, f"partial {method} answer")
                return list(outcome.to_fetch)
        elif method in ("delete", "revive") and result is True and (entity_id := written_id(args)) is not None:
            self.store.set_retired(conn, entity_type, entity_id, method == "delete", "proxy")
        return []

    def fetch_rows(
        self, url: str, auth: Mapping[str, Any], items: list[tuple[str, int]], ssl_context: ssl.SSLContext | None
    ) -> None:
        """Read whole rows from SG with the writer's own credentials and store them, a page of
        :data:`FETCH_PAGE` ids at a time, up to :data:`MAX_FETCH_BACK` ids.

        What is not read back stays queued (the ingester fetches it) and its type is marked
        pending: other proxies learn of the queue up to a second late. So it is on any failure, for
        the rows SG did not return, and when the ingester applied events while SG was read or a
        proxy learnt a write to one of the rows meanwhile (the rows read may then be older than what
        the replica holds, see :meth:`learn`).
        """
        mark = self.write_mark()
        by_type: dict[str, list[int]] = collections.defaultdict(list)
        for entity_type, entity_id in items:
            by_type[entity_type].append(entity_id)
        budget = MAX_FETCH_BACK if mark != MISSED else 0  # MISSED: the database hangs, nothing is read back
        incomplete = []
        for entity_type, ids in by_type.items():
            complete = len(ids) <= budget
            for page in chunks(ids[:max(budget, 0)], FETCH_PAGE):
                budget -= len(page)
                if not self._fetch_page(url, auth, entity_type, list(page), ssl_context, mark):
                    complete = False
                    break  # SG or the replica in trouble, or the ingester moved: the rest waits too
            if not complete:
                incomplete.append(entity_type)
        if incomplete:
            self._mark_types_pending(incomplete)
        self._invalidate()

    def _fetch_page(self, url: str, auth: Mapping[str, Any], entity_type: str, ids: list[int],
                    ssl_context: ssl.SSLContext | None, mark: WriteMark | None) -> bool:
        """Read one page of rows from SG and store them; whether every one of ``ids`` was."""
        fields = self.store.cached_field_names(entity_type)
        call = {"method_name": "read", "params": [dict(auth), {
            "type": entity_type, "return_fields": fields, "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": [
                {"path": "id", "relation": "in", "values": ids}]},
            "paging": {"entities_per_page": FETCH_PAGE, "current_page": 1},
            "return_paging_info": False}]}

        def store(records: list[dict[str, Any]]) -> bool:
            with self.store.write_engine.begin() as conn:
                if self._ingester_moved(conn, mark):
                    log.debug("fetched %s %s older than the replica may be: left for the ingester", entity_type, ids)
                    return False
                assert mark is not None
                # a row another writer changed while SG was read is newer than SG's answer: it stays
                # queued; so does one linking an entity a proxy wrote meanwhile (the other side of a
                # pair: a write there may have changed this row's links after SG was read)
                overtaken = self.store.overtaken(conn, entity_type, ids, records, mark.change_seq)
                records = [r for r in records if r["id"] not in overtaken]
                batch = self.store.batch(conn, "proxy")
                # a row leaving out a link to an entity live here (SG cleared it, or retired the
                # entity, not polled yet): it stays queued for the ingester, which waits for its poll
                left_out = batch.drops_live_links(entity_type, records)
                records = [r for r in records if r["id"] not in left_out]
                batch.put(entity_type, records, complete=True)
                batch.flush()
                self.store.unqueue_fetch(conn, [(entity_type, r["id"]) for r in records])
                if left_out:
                    fetchqueue.requeue(conn, self.store.fetch_queue, entity_type, left_out,
                                       fetchqueue.LINK_LEFT_OUT, self.store.db_now(conn))
            # an overtaken row stays queued too: not read back (its type is marked, see fetch_rows)
            return not left_out and not overtaken

        try:
            reply = upstream.post_json(url, call, ssl_context)
            records = reply["results"]["entities"]
            # given up on, it may still commit: under the lock, as any (see learn)
            if not self._bounded(self._recording, lambda: store(records)):
                return False
        except Exception as exc:  # noqa: BLE001 - the queue keeps them; the ingester retries
            log.warning("could not fetch %s %s after a write (%s); left for the ingester", entity_type, ids, exc)
            return False
        # a row SG did not return (retired since, or not visible to the writer) stays queued
        return {r["id"] for r in records} >= set(ids)

    def uploaded(self, entity_types: Collection[str] | None) -> None:
        """An upload form reached SG (answered or not): the rows of ``entity_types`` (None: every
        cached type) may have changed; their reads pass until the ingester has the upload's events
        (cache/proxy/uploads.py)."""
        cached = self.store.schema.entities  # the replica answers nothing of another type
        types = sorted(cached if entity_types is None else [t for t in entity_types if t in cached])
        if not types:
            return
        try:
            self._bounded(self._recording, lambda: self._mark_whole(types))
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: marked before this proxy's next read
            if isinstance(exc, DatabaseWait):
                self._timed_out(exc)
            log.warning("could not mark %s pending after an upload: %s", ", ".join(types), short_error(exc))
            self.defer_every_type()

    def left_queued(self, entity_types: Collection[str]) -> None:
        """Rows of a partial answer are not read back (the writer's credentials are not ones the
        cache serves, so SG may hide fields from them): they stay queued for the ingester's fetch
        and their types are marked, so another proxy passes their reads at once too."""
        if entity_types:
            self._mark_types_pending(sorted(entity_types))

    def _mark_types_pending(self, entity_types: list[str]) -> None:
        """Rows of ``entity_types`` stay queued for a fetch: other proxies learn of the queue up to a
        second late (their cached replica state), the marker reaches their very next read. (Not
        marked, the queue still makes this proxy's reads of them pass: it was committed.)"""
        try:
            self._bounded(self._recording, lambda: self._mark_whole(entity_types))
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: marked when it takes it
            log.warning("could not mark %s pending: %s", ", ".join(entity_types), short_error(exc))
            self.defer_every_type()  # other proxies' replica state may not show the queue for a second

    def _mark_whole(self, entity_types: Collection[str]) -> None:
        """Mark ``entity_types`` pending as a whole, in one transaction."""
        with self.store.write_engine.begin() as conn:
            pending.mark(conn, self.store.pending, [(t, pending.WHOLE_TYPE) for t in entity_types])


class WriteMark(NamedTuple):
    """Where the replica stood just before a write was sent (:meth:`Learner.write_mark`)."""

    event_high: int  # the ingester's highest applied event id
    change_seq: int  # the change log's newest seq


def _written_rows(method: str, args: Any) -> set[tuple[str, int]]:
    """The existing entities a write call changes (a create's row is new: no other write had it)."""
    out = set()
    for kind, req in _write_requests(method, args):
        entity_id = written_id(req) if kind in ("update", "delete", "revive") else None
        if entity_id is not None:
            out.add((req["type"], entity_id))
    return out


def _moved(mark: Any, high: Any) -> bool:
    """Whether the ingester's mark read under the write lock (``high``) differs from ``mark``, read
    before the write was sent (None: unknown then, so it may have)."""
    return mark is None or int(high or 0) != mark


def _write_requests(method: str, args: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """(kind, request) of each entity write in a write call's args (a batch's items)."""
    items = [(r.get("request_type"), r) for r in args if isinstance(r, Mapping)] \
        if method == "batch" and isinstance(args, list) else [(method, args)]
    return [(kind, req) for kind, req in items
            if isinstance(req, Mapping) and isinstance(req.get("type"), str) and isinstance(kind, str)]
