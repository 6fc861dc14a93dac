"""Reads answered on mitmproxy's event loop, without the trip to a worker thread.

A hit that takes a tenth of a millisecond in the database pays more for the thread hop (queue,
wake-up, the GIL passed twice, the loop woken again) than for its SQL. So a read runs on the
event loop itself when all of these hold, else it goes to a worker thread as before
(cache/proxy/reads.py):

- the dialect offers a connection that never waits (SQLite on a file: ``busy_timeout`` 0, no
  network; PostgreSQL reads always go to a worker);
- the replica's state is cached and fresh, the breaker is closed, no write is left unrecorded;
- the same request (same JSON) took less than ``FAST_READ_SECONDS`` when it last ran;
- the client connection is not marked slow.

Inline, the read has :data:`INLINE_BUDGET_SECONDS` (SQLite's progress handler stops it); a read
that overruns it, finds the file locked or fails in any way is read again in a worker thread
with the whole budget, which counts the failures and says why it passes. The answers and pass
reasons are the worker's: same planner, same pending-write check (on every read, on a
connection outside any transaction: a marker this proxy committed is seen by its next read).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from ..errors import Passthrough
from ..read import ReadBudget
from ..read.reader import request_key

if TYPE_CHECKING:
    from .service import CacheService

log = logging.getLogger("sgcache")

#: What one inline read may cost (the event loop waits for it); SQLite checks it every
#: PROGRESS_STEPS instructions.
INLINE_BUDGET_SECONDS = 0.005


class NotInline(Exception):
    """This read goes to a worker thread."""


class InlineReads:
    """Reads on the event loop through ``engine`` (None: never)."""

    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine

    def read(self, service: CacheService, args: Any, offline: bool) -> dict[str, Any]:
        """The value of ``results``; raises Passthrough (the read passes) or NotInline."""
        if self.engine is None:
            raise NotInline
        state = service.fresh_state()
        if state is None:
            raise NotInline
        reader = service.reader
        key = request_key(args)
        if key is None or not reader.fast(key):
            raise NotInline
        if service.stale() and not offline:
            raise Passthrough("stale", "ingester heartbeat missing or old")
        try:
            with self.engine.connect() as conn:
                return reader.read(conn, args, state, ReadBudget(INLINE_BUDGET_SECONDS), check_pending=True,
                                   key=key, remember_slow=False)
        except Passthrough as exc:
            if exc.reason == "slow-read":
                raise NotInline from exc
            raise
        except Exception as exc:  # noqa: BLE001 - locked, interrupted, anything: the worker decides
            log.debug("inline read failed (%s); read in a worker", type(exc).__name__)
            raise NotInline from exc

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
