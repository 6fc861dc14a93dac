"""The proxy's core: answer reads from the replica, learn from writes, know when to step aside.

:class:`CacheService` is the one object the addon holds per open replica. It answers reads
itself (the replica's cached state, its freshness, the read in a worker) and holds the rest:
the database breaker (cache/proxy/breaker.py) and what the proxy writes into the replica after
a write (cache/proxy/learning.py); its methods for those delegate.

Everything here is blocking (SQL); the addon calls it from a worker thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import Passthrough
from ..private import url_secrets
from ..read import READ_BUDGET_SECONDS, ReadBudget, Reader, ReplicaState
from ..replica import fetchqueue
from ..replica.dialect import dialect_for
from ..replica.pairs import DEFAULT_PAIRS_FILE, PairRegistry, load_pairs_file
from ..replica.pending import db_clock
from ..replica.schema import Schema
from ..replica.statekeys import EVENT_CURSOR, INGESTER_HEARTBEAT
from ..replica.store import Store
from ..wire import seconds_since
from .breaker import Breaker
from .dbwait import WRITE_WAIT_SECONDS
from .inline import InlineReads
from .learning import UNMARKED, Learner, WriteMark
from .loopversions import LoopVersions
from .metrics import Counters

log = logging.getLogger("sgcache.service")

#: How long the replica's state (primed types, heartbeat) is reused between reads.
REPLICA_STATE_TTL = 1.0
#: Default ``max_lag``: the ingester's heartbeat is written on every poll that reaches the end of
#: SG's event stream (not while it works through a backlog), at least every 3 s when the site is
#: idle (IngestConfig.idle_max); 10 s allows a slow poll or two and the context TTL.
DEFAULT_MAX_LAG = 10.0


class CacheService:
    """Reads and writes against one replica, with fail-open health tracking."""

    def __init__(self, db_url: str, schema_path: str | Path, max_lag: float = DEFAULT_MAX_LAG,
                 read_budget: float = READ_BUDGET_SECONDS, pairs_path: str | Path | None = None,
                 write_wait: float = WRITE_WAIT_SECONDS):
        self.schema = Schema.load(schema_path).cacheable()
        pairs = PairRegistry.build(load_pairs_file(pairs_path or DEFAULT_PAIRS_FILE))
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
        self._stale: bool | None = None  # last freshness seen (None: not yet), for the log
        # secrets of the URL are masked in every log line about the database
        self.breaker = Breaker(lambda: self.store.engine.dispose(), self.invalidate, url_secrets(db_url))
        # a write's mark is one question: asked where versions are (autocommit, no ping) when they are shared
        marks = self.inline.versions if self.inline.shared else None
        self.learner = Learner(self.store, self.schema, pairs, self.breaker, self.invalidate, marks, write_wait)

    def close(self) -> None:
        self.learner.close()
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
        connect = dialect.nonblocking_connect(self.store.engine)
        loop_versions = LoopVersions(connect, dialect.data_version_sql) if connect is not None else None
        return InlineReads(engine, versions, dialect.shared_versions, loop_versions)

    # -- health ----------------------------------------------------------------------
    def _watch_engine(self) -> Callable[[Any], None]:
        """Engine hooks (PostgreSQL: a statement timeout; SQLite: never create a missing replica
        file); returns the check that a read's connection still reads the configured replica."""
        check = self.store.dialect.guard_proxy(self.store.engine, self.store.write_engine)
        self.store.engine.dispose()  # connections made before the hooks were in place
        self.store.write_engine.dispose()
        return check

    def _replica_state(self, conn: Any) -> ReplicaState:
        now = time.monotonic()
        replica_state = self._cached_state
        if replica_state is not None and now - self._cached_state_at < REPLICA_STATE_TTL:
            return replica_state
        self._check_replica(conn)
        primed = self.store.primed_fields(conn)
        pending = fetchqueue.queued_types(conn, self.store.fetch_queue)
        beat = self.store.get_state(conn, INGESTER_HEARTBEAT)
        self._lag = seconds_since(beat, db_clock(conn))  # the clock the ingester stamped it with
        cursor = self.store.get_state(conn, EVENT_CURSOR) if "EventLogEntry" in primed else None
        replica_state = ReplicaState(primed=primed, pending_fetch=pending, event_cursor=cursor)
        with self._lock:
            self._cached_state, self._cached_state_at = replica_state, now
        return replica_state

    def fresh_state(self) -> ReplicaState | None:
        """The cached replica state while it is fresh, the breaker closed and no write left
        unrecorded; else None (a worker's read refreshes it or deals with the rest)."""
        replica_state = self._cached_state
        if (replica_state is None or self.breaker.failures or not self.learner.all_recorded()
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
        self.breaker.check()
        if not self.learner.all_recorded():
            self.learner.record_unrecorded()
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
            self.breaker.ok()
            raise
        except Exception as exc:  # noqa: BLE001 - any database trouble means: go upstream
            raise self.breaker.failed(exc) from exc
        self.breaker.ok()
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

    # -- the breaker (cache/proxy/breaker.py) -------------------------------------------
    def breaker_open(self) -> bool:
        """Whether the breaker is open: reads pass (``db-backoff``) until a probe succeeds."""
        return self.breaker.is_open()

    def note_timeout(self) -> None:
        """The caller gave up waiting for a read: count it as a database failure."""
        self.breaker.failed(TimeoutError("the replica did not answer in time"))

    # -- writes seen passing by (cache/proxy/learning.py) ----------------------------------
    def write_mark(self) -> WriteMark | int | None:
        """See :meth:`Learner.write_mark`: the event mark to give back to :meth:`learn`."""
        return self.learner.write_mark()

    def learn(self, method: str, args: Any, results: Any,
              mark: WriteMark | None | object = UNMARKED) -> list[tuple[str, int]]:
        """See :meth:`Learner.learn`: store SG's answer to a write; the entities to fetch (never raises)."""
        return self.learner.learn(method, args, results, mark)

    def outcome_unknown(self, method: str, args: Any) -> None:
        """See :meth:`Learner.outcome_unknown`: a write SG may have applied (never raises)."""
        self.learner.outcome_unknown(method, args)

    def field_changed(self, entity_type: Any, field_name: Any) -> None:
        """SG changed (``schema_field_update``) or deleted (``schema_field_delete``) a field through
        this proxy, which SG logs no event for: a cached one is un-primed and marked at once (its
        reads pass, on every proxy), and named for the ingester's schema re-read, which primes it
        again if it is still the same (cache/ingest/schemarefresh.py). Never raises."""
        if not isinstance(entity_type, str) or not isinstance(field_name, str):
            return
        if self.schema.field(entity_type, field_name) is None or field_name == "id":
            return
        self.learner.field_changed(entity_type, field_name)
        log.info("%s.%s changed at SG through this proxy: its reads pass until the ingester re-reads "
                 "the schema", entity_type, field_name)
        self.invalidate()

    def field_edited(self, entity: str, field_name: str) -> None:
        """A REST API schema edit of ``entity``'s field ``field_name`` (names as the path gives them):
        :meth:`field_changed` for the cached type of that name, or where the name is not one (the
        REST API's own names), for every cached type with a field ``field_name``. Never raises."""
        types = [entity] if entity in self.schema.entities else [
            t for t, spec in self.schema.entities.items() if field_name in spec.fields]
        for entity_type in types:
            self.field_changed(entity_type, field_name)

    def defer_every_type(self) -> None:
        """See :meth:`Learner.defer_every_type`: any row may have changed; marked before the next read."""
        self.learner.defer_every_type()

    def defer(self, method: str, args: Any) -> None:
        """See :meth:`Learner.defer`: a write whose effects the database did not take."""
        self.learner.defer(method, args)

    def fetch_rows(
        self, url: str, auth: Mapping[str, Any], items: list[tuple[str, int]], ssl_context: ssl.SSLContext | None
    ) -> None:
        """See :meth:`Learner.fetch_rows`: read back from SG the rows of a partial answer."""
        self.learner.fetch_rows(url, auth, items, ssl_context)

    def left_queued(self, entity_types: Collection[str]) -> None:
        """See :meth:`Learner.left_queued`: rows of a partial answer not read back."""
        self.learner.left_queued(entity_types)

    def uploaded(self, entity_types: Collection[str] | None) -> None:
        """See :meth:`Learner.uploaded`: an upload reached SG (None: every cached type)."""
        self.learner.uploaded(entity_types)

    # -- info --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The ``sgcache`` key added to ``info`` answers."""
        primed: list[str] = []
        try:
            if not self.breaker.backing_off():
                with self.store.engine.connect() as conn:
                    primed = sorted(self._replica_state(conn).primed)
        except Exception as exc:  # noqa: BLE001
            self.breaker.failed(exc)
        with self._lock:
            return {
                "version": __version__,
                "lag_seconds": None if self._lag is None else round(self._lag, 3),
                "primed_types": primed,
                **self.counters.snapshot(),
            }
