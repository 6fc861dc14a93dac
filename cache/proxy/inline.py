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

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import Passthrough
from ..read import ReadBudget
from ..read.limits import MAX_PLAN_KEY
from ..read.reader import request_key
from .answercache import AnswerCache, Version

if TYPE_CHECKING:
    from .service import CacheService

log = logging.getLogger("sgcache")

#: What one inline read may cost (the event loop waits for it); SQLite checks it every
#: PROGRESS_STEPS instructions.
INLINE_BUDGET_SECONDS = 0.005
_TOKEN = "sgcache_inline_token"

Encoded = tuple[bytes, int | None]


class NotInline(Exception):
    """This read goes to a worker thread."""


class InlineReads:
    """Reads on the event loop through ``engine`` (None: never), and the answers kept."""

    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine
        self.answers = AnswerCache()

    def answer(self, service: CacheService, args: Any, offline: bool,
               encode: Callable[[Any], Encoded]) -> Encoded:
        """The encoded answer (``encode(results)``); raises Passthrough (the read passes) or NotInline."""
        if self.engine is None:
            raise NotInline
        state = service.fresh_state()
        key = request_key(args)
        if state is None or key is None:
            raise NotInline
        if service.stale() and not offline:
            raise Passthrough("stale", "ingester heartbeat missing or old")
        reader = service.reader
        try:
            with self.engine.connect() as conn:
                service.check_replica(conn)  # the file at the configured path is the one read
                version = self._version(conn, service)
                kept = self.answers.get(key, version)
                if kept is not None:
                    return kept
                if not reader.fast(key):
                    raise NotInline
                result = reader.read(conn, args, state, ReadBudget(INLINE_BUDGET_SECONDS), check_pending=True,
                                     key=key, remember_slow=False)
                encoded = encode(result)
                if len(key) <= MAX_PLAN_KEY and reader.reusable(args, state, key):
                    self.answers.put(key, version, *encoded)
                return encoded
        except (Passthrough, NotInline) as exc:
            if isinstance(exc, Passthrough) and exc.reason != "slow-read":
                raise
            raise NotInline from exc
        except Exception as exc:  # noqa: BLE001 - locked, interrupted, anything: the worker decides
            log.debug("inline read failed (%s); read in a worker", type(exc).__name__)
            if not isinstance(exc, sa.exc.TimeoutError):  # (a worker is asking its version: no matter)
                self.engine.dispose()  # a new connection next time (the file may have been replaced)
            raise NotInline from exc

    def version_now(self, service: CacheService) -> Version | None:
        """The database's version as the inline connection sees it (for a worker's read; None
        when the connection is busy on the event loop, or there is none)."""
        if self.engine is None:
            return None
        try:
            with self.engine.connect() as conn:
                return self._version(conn, service)
        except Exception:  # noqa: BLE001 - in use, locked: the answer is just not kept
            return None

    def keep(self, service: CacheService, args: Any, before: Version | None, encoded: Encoded) -> None:
        """Keep a worker's answer when the database did not change while it was read."""
        if before is None:
            return
        key = request_key(args)
        state = service.fresh_state()
        if key is None or len(key) > MAX_PLAN_KEY or state is None or self.version_now(service) != before:
            return
        try:
            reusable = service.reader.reusable(args, state, key)
        except Passthrough:
            return
        if reusable:
            self.answers.put(key, before, *encoded)

    @staticmethod
    def _version(conn: Connection, service: CacheService) -> Version:
        token = conn.connection.info.setdefault(_TOKEN, object())  # one per database connection
        version = service.store.dialect.data_version(conn)
        if version is None:
            raise NotInline
        return token, version

    def close(self) -> None:
        self.answers.clear()
        if self.engine is not None:
            self.engine.dispose()
