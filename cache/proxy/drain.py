"""Stopping without cutting requests off: on SIGTERM the proxy waits for the requests in flight.

mitmproxy cancels every connection once the addons' ``done`` hooks return. A client whose
request is cut off re-sends it (httplib2 re-sends once on a connection closed without an
answer), and a write the proxy had already sent to SG would then be applied twice. So the
addon's ``done`` hook waits, up to :data:`DRAIN_SECONDS`, until every request it has seen
has had its answer, and past that for the writes it has sent to SG (as long as SG takes: a
write cut off could be applied twice; reads cut off are re-sent by the client, harmlessly). Meanwhile new connections are
refused and every answer closes its connection, so busy clients move elsewhere (another
proxy behind the balancer, or this one restarted) instead of keeping the proxy busy, except
an answer to a read that filled its page (:func:`next_page_expected`): shotgun_api3's
``find()`` asks for the next page at once, on the same connection, and the call would fail
halfway on a refused new one; that request arrives within the quiet time and is answered too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sgcache")

#: How long ``done`` waits for the requests in flight (mitmproxy's own shutdown takes about
#: half a second more: under the two seconds a service manager usually allows before SIGKILL).
DRAIN_SECONDS = 1.2
#: Quiet time that ends the wait: the last answers reach their clients, and a request already
#: on its way on a kept-alive connection arrives (and is answered) instead of being cut off.
QUIET_SECONDS = 0.2


class InFlight:
    """The requests between their headers and their answer (or error), by flow id."""

    def __init__(self) -> None:
        #: flow id -> whether it is (by now) a write the proxy sends to SG
        self.flows: dict[str, Callable[[], bool]] = {}
        #: Stopping: refuse new connections, close each connection after its answer.
        self.draining = False
        self._changed: asyncio.Event | None = None

    def start(self, flow_id: str, is_write: Callable[[], bool]) -> None:
        self.flows[flow_id] = is_write

    def end(self, flow_id: str) -> None:
        self.flows.pop(flow_id, None)
        if self._changed is not None:
            self._changed.set()

    def writes(self) -> int:
        """How many of the requests in flight are writes (never cut off)."""
        return sum(1 for is_write in list(self.flows.values()) if is_write())

    async def drain(self, timeout: float = DRAIN_SECONDS) -> int:
        """Wait until no request is in flight (at most ``timeout`` seconds, then as long as
        writes are); how many requests are still in flight."""
        self.draining = True
        started = time.monotonic()
        deadline = started + timeout
        log.info("sgcache: stopping; waiting for %d requests in flight", len(self.flows))
        while True:
            idle = await self._until(lambda: not self.flows, deadline - time.monotonic())
            if idle:
                await asyncio.sleep(min(QUIET_SECONDS, max(0.0, deadline - time.monotonic())))
            if (idle and not self.flows) or time.monotonic() >= deadline:
                break
        if self.writes():
            log.warning("sgcache: stopping; waiting for SG's answer to %d writes", self.writes())
            await self._until(lambda: not self.writes(), None)
            await asyncio.sleep(QUIET_SECONDS)
        if self.flows:
            log.warning("sgcache: stopping with %d reads still in flight after %.1fs",
                        len(self.flows), time.monotonic() - started)
        return len(self.flows)

    async def _until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait for ``done()`` (re-checked as flows end), at most ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self._changed = asyncio.Event()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return done()
        return True


def next_page_expected(method: str | None, args: Any, rows: int | None) -> bool:
    """Whether a call's answer filled the page it asked for: a ``read`` answered with
    ``entities_per_page`` rows, after which ``find()`` asks for the next page (unless its limit is
    reached, which the request does not say)."""
    if method != "read" or not isinstance(args, dict) or rows is None:
        return False
    paging = args.get("paging")
    per_page = paging.get("entities_per_page") if isinstance(paging, dict) else None
    return isinstance(per_page, int) and not isinstance(per_page, bool) and 0 < per_page <= rows


#: Seconds the process may take to end once the proxy has stopped before it is ended anyway.
EXIT_GRACE_SECONDS = 1.0


def end_process_if_stuck(grace: float = EXIT_GRACE_SECONDS) -> threading.Timer:
    """Call once the proxy has stopped (its requests answered): a process still alive ``grace``
    seconds later ends at once. A worker thread waiting on a database that no longer answers
    (PostgreSQL hung with its connections open) never returns, and the interpreter waits for
    every worker thread at exit: the proxy would never end (until a service manager's SIGKILL).
    The timer's thread is a daemon: it dies with a process that ends by itself."""
    timer = threading.Timer(grace, _end_now, args=(grace,))
    timer.daemon = True
    timer.start()
    return timer


def _end_now(grace: float) -> None:
    log.warning("sgcache: stopped, but threads still wait on the replica's database %gs later: ending the "
                "process without them", grace)
    logging.shutdown()  # the logs' last lines out first
    os._exit(0)
