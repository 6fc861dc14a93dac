"""Answering one read from the replica, in a worker thread, within bounds; else a reason to pass.

Reads run in a worker pool, never on mitmproxy's event loop. A read the database has not
answered after :data:`READ_TIMEOUT` goes to SG (``db-timeout``; a read that never got a worker
is ``busy``, which says nothing of the database). Any failure passes the read with a reason:
the client never sees a traceback.

A client connection whose read overran the read budget gets :data:`SLOW_CLIENT_FRACTION` of
the budget (never below :data:`SLOW_CLIENT_MIN_BUDGET`) for :data:`SLOW_CLIENT_SECONDS`: its
repeated slow reads then cost a tenth as much, while its hits (milliseconds) are not
affected. Per connection, not per host or script: the other processes of a farm node using
the same script keep the whole budget.

Identical reads that arrive while one of them is being read in a worker (many clients asking the
same thing just after a commit made every kept answer old) wait for that read instead of each
taking a worker: the first one's answer is kept (cache/proxy/answercache.py) when the database did
not change while it was read, and each waiting read takes it only if the database is still at the
version that read saw when it arrived (the same test as any kept answer: a write its client made
before it asked is in that version); otherwise it is read in a worker of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

from cache.errors import Passthrough
from cache.ops.metrics import PROXY
from cache.proxy import api3
from cache.proxy.service import CacheService
from cache.read.limits import MAX_PLAN_KEY
from cache.read.reader import request_key

from .answercache import Version
from .answers import Answer, hit
from .inline import NotInline
from .memory import MAX_ANSWER_MB

log = logging.getLogger("sgcache")

#: A read the database has not answered by then goes upstream.
READ_TIMEOUT = 5.0
SLOW_CLIENT_SECONDS = 30.0
SLOW_CLIENT_FRACTION = 0.1
SLOW_CLIENT_MIN_BUDGET = 0.05
#: Remembered slow connections before expired ones are swept.
_SWEEP_AT = 10_000


class SlowClients:
    """Client connections whose read overran the budget, each until when (monotonic clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.until: dict[str, float] = {}
        self._clock = clock

    def note(self, client: str) -> None:
        """``client``'s read overran the budget: smaller budgets for :data:`SLOW_CLIENT_SECONDS`."""
        now = self._clock()
        if len(self.until) > _SWEEP_AT:
            self.until = {k: v for k, v in self.until.items() if v > now}
        self.until[client] = now + SLOW_CLIENT_SECONDS

    def budget(self, client: str, read_budget: float) -> float | None:
        """The budget for ``client``'s next read: None for the replica's own, a fraction of it
        while the connection counts as slow."""
        if self.until.get(client, 0.0) > self._clock():
            return max(read_budget * SLOW_CLIENT_FRACTION, min(read_budget, SLOW_CLIENT_MIN_BUDGET))
        return None


class Reads:
    """Answers reads from the replica in ``executor`` (the replica's worker pool)."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.slow_clients = SlowClients()
        #: Reads in a worker, by request key: done when that read is (identical reads wait for it).
        self._flights: dict[str, asyncio.Future[None]] = {}
        #: Largest answer served, bytes (``sgcache_max_answer``; 0: no bound); a larger one passes.
        self.max_answer = MAX_ANSWER_MB * 1024 * 1024

    async def answer(self, service: CacheService, args: Any, client: str, offline: bool = False) -> Answer | str:
        """The replica's answer to a read with ``args`` (``offline``: SG is down; stale data is
        served, marked so), or the reason it passes. A hit is counted here."""
        started = time.perf_counter()
        began: list[float] = []  # set by the worker: an empty list means the read never left the queue
        budget = self.slow_clients.budget(client, service.read_budget)
        try:
            try:
                if budget is not None:
                    raise NotInline
                body, rows = read_inline(service, args, offline, self.max_answer)
            except NotInline as wanted:
                if budget is None and wanted.version is None and service.inline.loop_versions is not None:
                    try:
                        body, rows = await kept_on_loop(service, args, offline)
                    except NotInline as asked:
                        wanted = asked
                    else:
                        return self._hit(service, body, rows, offline, started)
                body, rows = await self._in_worker(service, args, offline, began, budget, wanted)
        except Passthrough as exc:
            if exc.detail:
                log.debug("pass %s: %s", exc.reason, exc.detail)
            if exc.reason == "slow-read" and "recently" not in exc.detail:
                self.slow_clients.note(client)
            return exc.reason
        except TimeoutError:
            if not began:
                # every worker busy: this request's wait, not a sign the database is down
                log.info("no worker free for a read in %.0fs; passing through", READ_TIMEOUT)
                return "busy"
            log.warning("replica too slow; passing through")
            service.note_timeout()
            return "db-timeout"
        except Exception:  # noqa: BLE001 - fail open, never a traceback to the client
            log.exception("unexpected error answering a read; passing through")
            return "internal-error"
        return self._hit(service, body, rows, offline, started)

    @staticmethod
    def _hit(service: CacheService, body: bytes, rows: int | None, offline: bool, started: float) -> Answer:
        """A hit, counted."""
        service.count(None)
        seconds = time.perf_counter() - started
        log.debug("hit in %.2f ms", seconds * 1000)
        return replace(hit(body, stale=offline), rows=rows, seconds=seconds)

    async def _in_worker(self, service: CacheService, args: Any, offline: bool, began: list[float],
                         budget: float | None, wanted: NotInline) -> tuple[bytes, int | None]:
        """Read in a worker thread, or take the answer of an identical read already there when the
        database is still at the version ``wanted`` saw (see the module's docstring)."""
        key, version = wanted.key, wanted.version
        # shared only with what a kept answer could be given to (a key too long is never kept)
        shared = key if key is not None and version is not None and len(key) <= MAX_PLAN_KEY else None
        if shared is not None and version is not None and (flight := self._flights.get(shared)) is not None:
            await asyncio.wait_for(asyncio.shield(flight), READ_TIMEOUT)
            kept = service.inline.answers.get(shared, version)
            if kept is not None:
                began.append(time.monotonic())
                return kept
        leads = shared is not None and shared not in self._flights
        if leads:
            self._flights[shared] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(
                    self.executor, read_encoded, service, args, offline, began, budget, self.max_answer, key,
                    version),
                READ_TIMEOUT,
            )
        finally:
            if leads and shared is not None:
                self._flights.pop(shared).set_result(None)


@contextlib.contextmanager
def _observed_on_loop() -> Iterator[None]:
    """Observe a read answered or passed on the event loop; NotInline goes through unobserved (the
    worker's read is the one observed)."""
    started = time.perf_counter()
    try:
        yield
    except Passthrough:
        PROXY.read_db_seconds.observe(time.perf_counter() - started)
        raise
    PROXY.read_db_seconds.observe(time.perf_counter() - started)


def read_inline(service: CacheService, args: Any, offline: bool, max_answer: int = 0) -> tuple[bytes, int | None]:
    """Answer a read on the event loop when it is cheap and safe (cache/proxy/inline.py): (body,
    rows); raises NotInline when it goes to a worker thread, Passthrough when it passes."""
    with _observed_on_loop():
        return service.inline.answer(service, args, offline, lambda result: _encoded(result, max_answer))


async def kept_on_loop(service: CacheService, args: Any, offline: bool) -> tuple[bytes, int | None]:
    """The answer kept for a read while the database is at the version the event loop asks now
    (PostgreSQL: cache/proxy/loopversions.py): (body, rows); raises NotInline (with the key and
    version when known) when it goes to a worker thread, Passthrough when it passes."""
    with _observed_on_loop():
        return await service.inline.kept_on_loop(service, args, offline)


def read_encoded(
    service: CacheService, args: Any, offline: bool, began: list[float] | None = None, budget: float | None = None,
    max_answer: int = 0, key: str | None = None, version: Version | None = None,
) -> tuple[bytes, int | None]:
    """Answer a read and encode SG's envelope, in one trip to a worker thread: (body, rows).
    An answer of more than ``max_answer`` bytes (0: no bound) passes (``large-answer``). ``key``:
    the request's key, when known. ``version``: the database's version when the read arrived,
    when it was asked then (no kept answer was there for it); else it is asked here, and an
    answer kept for the request is given while the database is at it. The read then runs, and its
    answer is kept if the database is still at that version after it."""
    if began is not None:
        began.append(time.monotonic())
    started = time.perf_counter()
    before = version
    if before is None:  # not asked on arrival: asked now, and a kept answer given while it holds
        before = service.inline.version_now(service)
        if before is not None:
            key = key or request_key(args)
            kept = service.inline.kept(service, key, before, offline) if key is not None else None
            if kept is not None:
                PROXY.read_db_seconds.observe(time.perf_counter() - started)
                return kept
    try:
        result = service.read(args, offline) if budget is None else service.read(args, offline, budget)
    finally:
        PROXY.read_db_seconds.observe(time.perf_counter() - started)
    encoded = _encoded(result, max_answer)
    service.inline.keep(service, args, before, encoded, key)
    return encoded


def _encoded(result: Any, max_answer: int = 0) -> tuple[bytes, int | None]:
    """SG's envelope of a read's ``results``, and its rows; an answer of more than ``max_answer``
    bytes (0: no bound) passes (``large-answer``)."""
    entities = result.get("entities") if isinstance(result, dict) else None
    body = api3.encode_results(result)
    if max_answer and len(body) > max_answer:
        raise Passthrough("large-answer", f"{len(body)} bytes (sgcache_max_answer {max_answer})")
    return body, len(entities) if isinstance(entities, list) else None
