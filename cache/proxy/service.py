"""The proxy's core: answer reads from the replica, learn from writes, know when to step aside.

Everything here is blocking (SQL); the addon calls it from a worker thread.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import Passthrough
from ..private import redact, url_secrets
from ..read import READ_BUDGET_SECONDS, ReadBudget, Reader, ReplicaState
from ..replica import fetchqueue, pending
from ..replica.dialect import classify_error, dialect_for
from ..replica.effects import WriteEffects
from ..replica.pairs import DEFAULT_PAIRS_FILE, PairRegistry, load_pairs_file
from ..replica.schema import Schema
from ..replica.statekeys import EVENT_CURSOR, EVENT_HIGH, INGESTER_HEARTBEAT
from ..replica.store import Store
from ..wire import parse_wire_dt
from . import upstream
from .inline import InlineReads
from .metrics import Counters

log = logging.getLogger("sgcache.service")

#: How long the replica's state (primed types, heartbeat) is reused between reads.
REPLICA_STATE_TTL = 1.0
#: Consecutive database failures that open the breaker, and how long it stays open.
BREAKER_FAILURES = 3
BREAKER_SECONDS = 5.0
#: Default ``max_lag``: the ingester's heartbeat is written on every poll that reaches the end of
#: SG's event stream (not while it works through a backlog), at least every 3 s when the site is
#: idle (IngestConfig.idle_max); 10 s allows a slow poll or two and the context TTL.
DEFAULT_MAX_LAG = 10.0


#: :meth:`CacheService.learn` called without a mark (no ingester check).
UNMARKED = object()
#: Writes whose effects could not be recorded, kept in memory until they are (then every type is
#: marked at once past this many).
MAX_UNRECORDED = 1000


class CacheService:
    """Reads and writes against one replica, with fail-open health tracking."""

    def __init__(self, db_url: str, schema_path: str | Path, max_lag: float = DEFAULT_MAX_LAG,
                 read_budget: float = READ_BUDGET_SECONDS, pairs_path: str | Path | None = None):
        self.schema = Schema.load(schema_path)
        self.pairs = PairRegistry.build(load_pairs_file(pairs_path or DEFAULT_PAIRS_FILE))
        self._secrets = url_secrets(db_url)  # masked in every log line about the database
        self.store = Store.open(db_url, self.schema, **dialect_for(db_url).proxy_engine_options())
        self._check_replica = self._watch_engine()
        self.reader = Reader(self.store)
        self.inline = self._inline_reads()
        self.max_lag = max_lag
        self.read_budget = read_budget  # seconds; 0: no budget
        self.counters = Counters()  # what info() reports: hits, passes per reason
        self._lock = threading.Lock()
        self._cached_state: ReplicaState | None = None
        self._cached_state_at = 0.0
        self._lag: float | None = None
        self._failures = 0
        self._open_until = 0.0
        self._stale: bool | None = None  # last freshness seen (None: not yet), for the log
        # writes SG answered whose effects the database did not take (it failed, or the breaker
        # was open): (method, args); None past MAX_UNRECORDED. Reads pass until they are marked.
        self._unrecorded: list[tuple[str, Any]] | None = []
        self._deferred = 0  # writes deferred so far (tells a flush whether more came meanwhile)

    def close(self) -> None:
        self.inline.close()
        self.store.dispose()

    def _inline_reads(self) -> InlineReads:
        """Reads on the event loop (cache/proxy/inline.py) and the database's versions (the answers
        kept), each on connections of their own with the same engine hooks as the pool's."""
        dialect = self.store.dialect
        engine, versions = dialect.inline_engine(self.store.engine), dialect.versions_engine(self.store.engine)
        for each in (engine, versions):
            if each is not None:
                dialect.guard_proxy(each, each)
        return InlineReads(engine, versions, dialect.shared_versions)

    # -- health ----------------------------------------------------------------------
    def _watch_engine(self) -> Callable[[Any], None]:
        """Engine hooks (PostgreSQL: a statement timeout; SQLite: never create a missing replica
        file); returns the check that a read's connection still reads the configured replica."""
        check = self.store.dialect.guard_proxy(self.store.engine, self.store.write_engine)
        self.store.engine.dispose()  # connections made before the hooks were in place
        self.store.write_engine.dispose()
        return check

    def _check_breaker(self) -> None:
        """Raise db-backoff while the breaker is open; once it has been open long enough, let one
        request through as a probe (the others keep passing until it succeeds)."""
        with self._lock:
            if self._failures < BREAKER_FAILURES:
                return
            now = time.monotonic()
            if now < self._open_until:
                raise Passthrough("db-backoff")
            self._open_until = now + BREAKER_SECONDS

    def _db_failed(self, exc: BaseException) -> Passthrough:
        """Record a database failure; the Passthrough to raise for it."""
        reason, trips = classify_error(exc)
        if not trips:
            if reason in ("slow-read", "too-large"):  # one request's cost: no warning per request
                log.info("read %s, passing through: %s", reason, _short(exc))
                return Passthrough(reason, type(exc).__name__)
            # an internal error is a bug: its traceback goes to the log (never to the client)
            log.warning("replica cannot answer (%s), passing through: %s", reason, redact(_short(exc), self._secrets),
                        exc_info=reason == "internal-error")
            return Passthrough(reason, type(exc).__name__)
        with self._lock:
            self._failures += 1
            failures = self._failures
            if failures >= BREAKER_FAILURES:
                self._open_until = time.monotonic() + BREAKER_SECONDS
            self._cached_state = None
        log.warning("database error, passing through: %s", redact(_short(exc), self._secrets))
        if failures >= BREAKER_FAILURES:
            if failures == BREAKER_FAILURES:
                log.warning("database failing; not using it for %.0fs at a time", BREAKER_SECONDS)
            try:
                self.store.engine.dispose()  # reconnect from scratch when it is back
            except Exception:  # noqa: BLE001
                log.debug("dispose failed", exc_info=True)
        return Passthrough(reason, type(exc).__name__)

    def breaker_open(self) -> bool:
        """Whether the breaker is open: reads pass (``db-backoff``) until a probe succeeds."""
        with self._lock:
            return self._failures >= BREAKER_FAILURES

    def note_timeout(self) -> None:
        """The caller gave up waiting for a read: count it as a database failure."""
        self._db_failed(TimeoutError("the replica did not answer in time"))

    def _db_ok(self) -> None:
        if self._failures or self._open_until:
            with self._lock:
                if self._failures >= BREAKER_FAILURES:
                    log.warning("database answering again; reads served from the replica")
                self._failures = 0
                self._open_until = 0.0

    def _replica_state(self, conn: Any) -> ReplicaState:
        now = time.monotonic()
        replica_state = self._cached_state
        if replica_state is not None and now - self._cached_state_at < REPLICA_STATE_TTL:
            return replica_state
        self._check_replica(conn)
        primed = self.store.primed_fields(conn)
        pending = fetchqueue.queued_types(conn, self.store.fetch_queue)
        beat = self.store.get_state(conn, INGESTER_HEARTBEAT)
        self._lag = _age_seconds(beat)
        cursor = self.store.get_state(conn, EVENT_CURSOR) if "EventLogEntry" in primed else None
        replica_state = ReplicaState(primed=primed, pending_fetch=pending, event_cursor=cursor)
        with self._lock:
            self._cached_state, self._cached_state_at = replica_state, now
        return replica_state

    def fresh_state(self) -> ReplicaState | None:
        """The cached replica state while it is fresh, the breaker closed and no write left
        unrecorded; else None (a worker's read refreshes it or deals with the rest)."""
        replica_state = self._cached_state
        if (replica_state is None or self._failures or self._unrecorded != []
                or time.monotonic() - self._cached_state_at >= REPLICA_STATE_TTL):
            return None
        return replica_state

    def check_replica(self, conn: Any) -> None:
        """Raise when ``conn`` no longer reads the configured replica (SQLite: the file was moved)."""
        self._check_replica(conn)

    def stale(self) -> bool:
        """Whether the replica is stale (see :meth:`_note_freshness`)."""
        return self._note_freshness()

    def invalidate(self) -> None:
        """Forget the cached replica state (after a write by this process)."""
        with self._lock:
            self._cached_state = None

    # -- reads -----------------------------------------------------------------------
    def read(self, args: Any, allow_stale: bool = False, budget: float | None = None) -> dict[str, Any]:
        """Answer a ``read`` from the replica, or raise Passthrough. ``budget``: seconds this read
        may run in the database (default: ``read_budget``)."""
        self._check_breaker()
        if self._unrecorded != []:
            self._record_unrecorded()
        try:
            with self.store.engine.connect() as conn:
                replica_state = self._replica_state(conn)
                stale = self._note_freshness()
                if stale and not allow_stale:
                    raise Passthrough("stale", "ingester heartbeat missing or old")
                seconds = self.read_budget if budget is None else min(budget, self.read_budget or budget)
                # every read checks the markers: another proxy may have written a second ago
                result = self.reader.read(conn, args, replica_state, ReadBudget(seconds) if seconds > 0 else None,
                                          check_pending=True)
        except Passthrough:
            self._db_ok()
            raise
        except Exception as exc:  # noqa: BLE001 - any database trouble means: go upstream
            raise self._db_failed(exc) from exc
        self._db_ok()
        return result

    def _note_freshness(self) -> bool:
        """Whether the replica is stale (heartbeat missing or older than ``max_lag``); log each
        change: a warning when reads start passing as stale, info when they are served again."""
        lag = self._lag
        stale = self.max_lag > 0 and (lag is None or lag > self.max_lag)
        if stale == self._stale:
            return stale
        with self._lock:
            if stale == self._stale:
                return stale
            was, self._stale = self._stale, stale
        if stale:
            age = "missing" if lag is None else f"{lag:.0f}s old"
            log.warning("replica stale: ingester heartbeat %s (max lag %gs); reads pass until it is fresh",
                        age, self.max_lag)
        elif was is not None:
            log.info("replica fresh again (ingester heartbeat %.1fs old); serving reads", lag or 0.0)
        return stale

    def count(self, reason: str | None) -> None:
        """Count a hit (reason None) or a pass with its reason."""
        self.counters.count(reason)

    # -- writes seen passing by --------------------------------------------------------
    def write_mark(self) -> int | None:
        """The ingester's highest applied event id, read just before a write is sent to SG
        (given back to :meth:`learn`); None when the replica cannot say."""
        try:
            with self.store.engine.connect() as conn:
                return int(self.store.get_state(conn, EVENT_HIGH) or 0)
        except Exception as exc:  # noqa: BLE001 - learn then only marks
            log.info("could not read the event mark before a write: %s", _short(exc))
            return None

    def learn(self, method: str, args: Any, results: Any,
              mark: int | None | object = UNMARKED) -> list[tuple[str, int]]:
        """Write the upstream answer of a create/update/delete/revive/batch into the replica.

        Returns the entities whose answer was partial: they are queued for a fetch, and
        reads of their type pass until the rows are complete. Never raises: what is not
        recorded here (database trouble, the breaker open) the ingester brings.

        ``mark`` is :meth:`write_mark` from before the write was sent. When the ingester has
        applied events since then, SG's answer may be older than what the replica holds (a
        concurrent write SG applied after this one, already brought by an event): the answer
        is then not stored; everything the write could have changed is marked pending instead,
        until the ingester has the write's own events.
        """
        to_fetch: list[tuple[str, int]] = []
        try:
            self._check_breaker()
            with self.store.write_engine.begin() as conn:
                registry = self.pairs.with_learned(conn, self.store.pairs_table)
                markers: set[tuple[str, str]] = set()
                if mark is not UNMARKED and self._ingester_moved(conn, mark):
                    effects = WriteEffects(self.store, registry, conn)
                    for kind, req in _write_requests(method, args):
                        effects.outcome_unknown(kind, req["type"], req)
                    pending.mark(conn, self.store.pending, effects.markers)
                    log.debug("%s answer older than the replica may be: marked pending, not stored", method)
                    return []
                if method == "batch":
                    if isinstance(args, list) and isinstance(results, list) and len(args) == len(results):
                        for req, res in zip(args, results, strict=True):
                            if isinstance(req, Mapping):
                                to_fetch += self._learn_one(conn, req.get("request_type"), req, res,
                                                            registry, markers)
                else:
                    to_fetch += self._learn_one(conn, method, args, results, registry, markers)
                pending.mark(conn, self.store.pending, markers)
        except Passthrough as exc:
            log.info("%s answer not recorded (%s); the ingester will bring it", method, exc.reason)
            self.defer(method, args)
            return []
        except Exception as exc:  # noqa: BLE001
            self._db_failed(exc)
            log.warning("could not record a %s answer; the ingester will bring it", method)
            self.defer(method, args)
            return []
        self._db_ok()
        self.invalidate()
        return to_fetch

    def _ingester_moved(self, conn: Any, mark: Any) -> bool:
        """Whether the ingester applied events since ``mark`` (taken before the write was sent).

        Read under the write lock (PostgreSQL; SQLite write transactions are serial), so a poll
        either committed before (seen here) or applies its events after this transaction."""
        self.store.dialect.lock_writes(conn)
        return mark is None or int(self.store.get_state(conn, EVENT_HIGH) or 0) != mark

    def outcome_unknown(self, method: str, args: Any) -> None:
        """A write was sent to SG but no answer came back: it may have been applied. Reads of
        what it could have changed pass until the ingester is past it (never raises)."""
        try:
            with self.store.write_engine.begin() as conn:
                effects = WriteEffects(self.store, self.pairs.with_learned(conn, self.store.pairs_table), conn)
                for kind, req in _write_requests(method, args):
                    effects.outcome_unknown(kind, req["type"], req)
                pending.mark(conn, self.store.pending, effects.markers)
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: reads pass anyway meanwhile
            self._db_failed(exc)
            log.warning("could not record a %s of unknown outcome; the ingester will bring it", method)
            self.defer(method, args)

    def defer(self, method: str, args: Any) -> None:
        """Remember a write SG answered whose effects the database did not take: this proxy's
        reads pass until :meth:`_record_unrecorded` has marked them pending for every proxy."""
        with self._lock:
            self._deferred += 1
            if self._unrecorded is not None:
                self._unrecorded.append((method, args))
                if len(self._unrecorded) > MAX_UNRECORDED:
                    self._unrecorded = None  # too many to tell apart: every type will be marked

    def _record_unrecorded(self) -> None:
        """Mark pending everything the deferred writes could have changed (the markers' time is
        now, after those writes, so they clear only once the ingester is past them); raise
        the database's pass reason while it does not take them."""
        with self._lock:
            deferred = None if self._unrecorded is None else list(self._unrecorded)
            count = self._deferred
        try:
            with self.store.write_engine.begin() as conn:
                if deferred is None:
                    markers = {(t, pending.WHOLE_TYPE) for t in self.schema.entities}
                else:
                    effects = WriteEffects(self.store, self.pairs.with_learned(conn, self.store.pairs_table), conn)
                    for method, args in deferred:
                        for kind, req in _write_requests(method, args):
                            effects.outcome_unknown(kind, req["type"], req)
                    markers = effects.markers
                pending.mark(conn, self.store.pending, markers)
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: keep passing
            raise self._db_failed(exc) from exc
        with self._lock:
            if self._deferred == count:
                self._unrecorded = []
            elif deferred is not None and self._unrecorded is not None:
                del self._unrecorded[:len(deferred)]  # those deferred meanwhile wait for the next read
        self.invalidate()
        log.info("recorded the effects of %s write(s) learned while the database failed",
                 "many" if deferred is None else len(deferred))

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
        old = effects.snapshot(method, entity_type, args)
        to_fetch = self._store_answer(conn, method, entity_type, args, result)
        if method in ("create", "update") or result is True:
            effects.after_write(method, entity_type, args, result, old)
        if markers is not None:
            markers |= effects.markers
        return to_fetch

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
                f.get("field_name") for f in args.get("fields") or []
                if isinstance(f, Mapping) and (legacy_mode or f.get("multi_entity_update_mode") in ("add", "remove"))
            ]
            for fname in partial:
                record.pop(fname, None)
            outcome = self.store.write_entities(conn, entity_type, [record], "proxy")
            if partial and not outcome.to_fetch:
                outcome.to_fetch = [(entity_type, int(result["id"]))]
            if outcome.to_fetch:
                self.store.queue_fetch(conn, outcome.to_fetch, f"partial {method} answer")
                return list(outcome.to_fetch)
        elif method in ("delete", "revive") and result is True and isinstance(args.get("id"), int):
            self.store.set_retired(conn, entity_type, args["id"], method == "delete", "proxy")
        return []

    def fetch_rows(
        self, url: str, auth: Mapping[str, Any], items: list[tuple[str, int]], ssl_context: ssl.SSLContext | None
    ) -> None:
        """Read whole rows from SG with the writer's own credentials and store them.

        On any failure the entities stay queued; the ingester fetches them later. So they also
        do when the ingester applied events while SG was read: the rows read may then be older
        than what the replica holds (see :meth:`learn`).
        """
        mark = self.write_mark()
        by_type: dict[str, list[int]] = collections.defaultdict(list)
        for entity_type, entity_id in items:
            by_type[entity_type].append(entity_id)
        for entity_type, ids in by_type.items():
            fields = self.store.cached_field_names(entity_type)
            call = {"method_name": "read", "params": [dict(auth), {
                "type": entity_type, "return_fields": fields, "return_only": "active",
                "filters": {"logical_operator": "and", "conditions": [
                    {"path": "id", "relation": "in", "values": ids}]},
                "paging": {"entities_per_page": 500, "current_page": 1},
                "return_paging_info": False}]}
            try:
                reply = upstream.post_json(url, call, ssl_context)
                records = reply["results"]["entities"]
                with self.store.write_engine.begin() as conn:
                    if self._ingester_moved(conn, mark):
                        pending.mark(conn, self.store.pending, [(entity_type, pending.WHOLE_TYPE)])
                        log.debug("fetched %s %s older than the replica may be: left for the ingester",
                                  entity_type, ids)
                        continue
                    self.store.write_entities(conn, entity_type, records, "proxy", complete=True)
                    self.store.unqueue_fetch(conn, [(entity_type, r["id"]) for r in records])
            except Exception as exc:  # noqa: BLE001 - the queue keeps them; the ingester retries
                log.warning("could not fetch %s %s after a write (%s); left for the ingester", entity_type, ids, exc)
                self._mark_type_pending(entity_type)
        self.invalidate()

    def uploaded(self, entity_types: Collection[str] | None) -> None:
        """An upload form reached SG (answered or not): the rows of ``entity_types`` (None: every
        cached type) may have changed; their reads pass until the ingester has the upload's events
        (cache/proxy/uploads.py)."""
        cached = self.store.schema.entities  # the replica answers nothing of another type
        types = sorted(cached if entity_types is None else [t for t in entity_types if t in cached])
        if not types:
            return
        try:
            with self.store.write_engine.begin() as conn:
                pending.mark(conn, self.store.pending, [(t, pending.WHOLE_TYPE) for t in types])
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: its reads fail too
            log.warning("could not mark %s pending after an upload: %s", ", ".join(types), _short(exc))

    def _mark_type_pending(self, entity_type: str) -> None:
        """Rows of ``entity_type`` stay queued for a fetch: other proxies learn of the queue up to a
        second late (their cached replica state), the marker reaches their very next read."""
        try:
            with self.store.write_engine.begin() as conn:
                pending.mark(conn, self.store.pending, [(entity_type, pending.WHOLE_TYPE)])
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: its reads fail too
            log.warning("could not mark %s pending: %s", entity_type, _short(exc))

    # -- info --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The ``sgcache`` key added to ``info`` answers."""
        primed: list[str] = []
        try:
            if time.monotonic() >= self._open_until:
                with self.store.engine.connect() as conn:
                    primed = sorted(self._replica_state(conn).primed)
        except Exception as exc:  # noqa: BLE001
            self._db_failed(exc)
        with self._lock:
            return {
                "version": __version__,
                "lag_seconds": None if self._lag is None else round(self._lag, 3),
                "primed_types": primed,
                **self.counters.snapshot(),
            }



def _write_requests(method: str, args: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """(kind, request) of each entity write in a write call's args (a batch's items)."""
    items = [(r.get("request_type"), r) for r in args if isinstance(r, Mapping)] \
        if method == "batch" and isinstance(args, list) else [(method, args)]
    return [(kind, req) for kind, req in items
            if isinstance(req, Mapping) and isinstance(req.get("type"), str) and isinstance(kind, str)]


def _age_seconds(stamp: Any) -> float | None:
    when = parse_wire_dt(stamp) if isinstance(stamp, str) else None
    if when is None:
        return None
    return max(0.0, (datetime.now(UTC).replace(tzinfo=None) - when).total_seconds())


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
