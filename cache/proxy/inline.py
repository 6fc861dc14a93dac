"""Reads answered on mitmproxy's event loop, without the trip to a worker thread.

A hit that takes a tenth of a millisecond in the database pays more for the thread hop (queue,
wake-up, the GIL passed twice, the loop woken again) than for its SQL. So a read is answered on
the event loop itself when all of these hold, else it goes to a worker thread as before
(cache/proxy/reads.py):

- the dialect offers a connection that never waits (SQLite on a file: ``busy_timeout`` 0, no
  network; PostgreSQL reads always go to a worker);
- the replica's state is cached and fresh, the breaker is closed, no write is left unrecorded;
- the client connection is not marked slow;
- and either the same request's answer is kept and the database has not changed since
  (cache/proxy/answercache.py), or the same request took less than ``FAST_READ_SECONDS`` when
  it last ran.

Inline, a read has :data:`INLINE_BUDGET_SECONDS` (SQLite's progress handler stops it); a read
that overruns it, finds the file locked or fails in any way is read again in a worker thread
with the whole budget, which counts the failures and says why it passes. The answers and pass
reasons are the worker's: same planner, same pending-write check (on every read that is not a
kept answer, on a connection outside any transaction: a marker this proxy committed is seen by
its next read; a kept answer is reused only while no marker, or anything else, was committed).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine

from ..errors import Passthrough
from ..read import ReadBudget, ReplicaState
from ..read.limits import MAX_PLAN_KEY
from ..read.reader import request_key
from .answercache import AnswerCache, Version
from .loopversions import LoopVersions, VersionUnknown

if TYPE_CHECKING:
    from .service import CacheService

log = logging.getLogger("sgcache")

#: What one inline read may cost (the event loop waits for it); SQLite checks it every
#: PROGRESS_STEPS instructions.
INLINE_BUDGET_SECONDS = 0.005
_TOKEN = "sgcache_inline_token"

Encoded = tuple[bytes, int | None]


class NotInline(Exception):
    """This read goes to a worker thread. ``key`` and ``version``, when known: the request's key and
    the database version seen for it (cache/proxy/reads.py shares one worker's
    read among identical requests that saw the same version)."""

    def __init__(self, key: str | None = None, version: Version | None = None) -> None:
        super().__init__()
        self.key, self.version = key, version


def _entry(service: CacheService, args: Any, offline: bool) -> tuple[ReplicaState, str]:
    """The checks before any read on the event loop: the replica's state known fresh and the
    request's key (else NotInline), the heartbeat fresh unless ``offline`` (else it passes)."""
    state = service.fresh_state()
    key = request_key(args)
    if state is None or key is None:
        raise NotInline
    if service.stale() and not offline:
        raise Passthrough("stale", "ingester heartbeat missing or old")
    return state, key


class InlineReads:
    """Reads on the event loop through ``engine`` (None: never), and the answers kept, each with
    the database's version as ``versions`` tells it (None: no answer is kept). ``shared``: a
    version means the same on every connection (PostgreSQL's snapshot: ``versions`` is a pool,
    asked by workers only); else it is one connection's (SQLite's ``data_version``: ``versions``
    is one connection, which the event loop and the workers take in turns, asking takes
    microseconds)."""

    def __init__(self, engine: Engine | None, versions: Engine | None = None, shared: bool = False,
                 loop_versions: LoopVersions | None = None) -> None:
        self.engine = engine
        self.versions = versions
        self.shared = shared
        #: Shared versions asked by the event loop itself (PostgreSQL): see :meth:`kept_on_loop`.
        self.loop_versions = loop_versions
        self._versions_lock = threading.Lock()
        self._versions_conn: Connection | None = None  # see _held_versions
        self._shared_token = object()  # the token of every shared version
        self.answers = AnswerCache()

    def answer(self, service: CacheService, args: Any, offline: bool,
               encode: Callable[[Any], Encoded]) -> Encoded:
        """The encoded answer (``encode(results)``); raises Passthrough (the read passes) or NotInline."""
        if self.engine is None:
            raise NotInline
        state, key = _entry(service, args, offline)
        reader = service.reader
        try:
            version = self._version(service, check=True)  # (the versions connection reads the configured file)
            kept = self.answers.get(key, version)
            if kept is not None:
                return kept
            if not reader.fast(key):
                raise NotInline(key, version)
            with self.engine.connect() as conn:
                service.check_replica(conn)  # the file at the configured path is the one read
                result = reader.read(conn, args, state, ReadBudget(INLINE_BUDGET_SECONDS), check_pending=True,
                                     key=key, remember_slow=False)
                encoded = encode(result)
                if len(key) <= MAX_PLAN_KEY and reader.reusable(args, state, key):
                    self.answers.put(key, version, *encoded)
                return encoded
        except NotInline:
            raise
        except Passthrough as exc:
            if exc.reason != "slow-read":
                raise
            raise NotInline from exc
        except Exception as exc:  # noqa: BLE001 - locked, interrupted, anything: the worker decides
            log.debug("inline read failed (%s); read in a worker", type(exc).__name__)
            self.engine.dispose()  # new connections next time (the file may have been replaced)
            if self.versions is not None and not self.shared:
                with self._versions_lock:
                    self._release_versions()
                self.versions.dispose()
            raise NotInline from exc

    async def kept_on_loop(self, service: CacheService, args: Any, offline: bool) -> Encoded:
        """The answer kept for a read while the database is at the version asked now on the event
        loop (cache/proxy/loopversions.py: no worker thread; PostgreSQL); raises NotInline, with
        the key and that version when known (the worker's read then takes it as its "before"),
        or Passthrough (the read passes)."""
        if self.loop_versions is None:
            raise NotInline
        _, key = _entry(service, args, offline)
        try:
            version = (self._shared_token, await self.loop_versions.version())
        except VersionUnknown:
            self.answers.clear()  # as any failure to ask: versions may start over
            raise NotInline from None
        # (the checks above may have changed while the question was on its way)
        kept = self.kept(service, key, version, offline)
        if kept is not None:
            return kept
        raise NotInline(key, version)

    def version_now(self, service: CacheService) -> Version | None:
        """The database's version now (for a worker's read; None when it cannot be told: the
        answer is then not kept). Not asked while the breaker is open: the database is left alone
        (a hung one would cost each read a connect timeout before it passes ``db-backoff``)."""
        if self.versions is None or service.breaker_open():
            return None
        try:
            return self._version(service)
        except Exception:  # noqa: BLE001 - locked, gone: the answer is just not kept
            return None

    def keep(self, service: CacheService, args: Any, before: Version | None, encoded: Encoded,
             key: str | None = None) -> None:
        """Keep a worker's answer when the database did not change while it was read (``key``: the
        request's, when the caller has it)."""
        if before is None:
            return
        key = key or request_key(args)
        state = service.fresh_state()
        if key is None or len(key) > MAX_PLAN_KEY or state is None or self.version_now(service) != before:
            return
        try:
            reusable = service.reader.reusable(args, state, key)
        except Passthrough:
            return
        if reusable:
            self.answers.put(key, before, *encoded)

    def kept(self, service: CacheService, key: str, version: Version, offline: bool) -> Encoded | None:
        """The answer kept for ``key`` while the database is at ``version``, when the checks that
        are not in the database allow it (the replica state fresh, the breaker closed, no write
        left unrecorded, the heartbeat fresh unless ``offline``); a worker asks before reading."""
        if service.fresh_state() is None or (service.stale() and not offline):
            return None
        return self.answers.get(key, version)

    def _version(self, service: CacheService, check: bool = False) -> Version:
        """(the connection's token, its data version): raises NotInline when there is none. Any
        failure forgets every kept answer (a database restored or replaced: versions start over).
        ``check``: first check that the connection reads the configured replica."""
        if self.versions is None:
            raise NotInline
        try:
            if self.shared:  # asked on any connection of a pool
                with self.versions.connect() as conn:
                    if check:
                        service.check_replica(conn)
                    token, version = self._shared_token, service.store.dialect.data_version(conn)
            else:  # on the one connection, in turns
                with self._versions_lock:
                    conn = self._held_versions()
                    try:
                        if check:
                            service.check_replica(conn)
                        token = conn.connection.info.setdefault(_TOKEN, object())  # one per database connection
                        version = service.store.dialect.data_version(conn)
                    except Exception:
                        self._release_versions()  # back to its pool, checked out again next time
                        raise
        except Exception:
            self.answers.clear()
            raise
        if version is None:
            raise NotInline
        return token, version

    def _held_versions(self) -> Connection:
        """The one versions connection (not shared), kept checked out between questions: a checkout
        from the pool and its return cost more than ``PRAGMA data_version`` itself. It never begins
        a transaction (the version is asked on the driver's connection). Call under the lock."""
        if self._versions_conn is None:
            assert self.versions is not None
            self._versions_conn = self.versions.connect()
        return self._versions_conn

    def _release_versions(self) -> None:
        """Give the held versions connection back to its pool (call under the lock)."""
        conn, self._versions_conn = self._versions_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: the pool's dispose deals with it
                conn.close()

    def close(self) -> None:
        self.answers.clear()
        with self._versions_lock:
            self._release_versions()
        if self.loop_versions is not None:
            self.loop_versions.close()
        for engine in (self.engine, self.versions):
            if engine is not None:
                engine.dispose()
