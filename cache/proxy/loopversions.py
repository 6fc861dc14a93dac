"""The database's version asked from the event loop, without a worker thread and without blocking.

On PostgreSQL a kept answer (cache/proxy/answercache.py) may be given while the cluster's
snapshot is the one its read saw. Asking the snapshot is a network round trip: in a worker thread
it costs a thread hop each way and the GIL passed four times, more than the question itself. So
the event loop asks it on a connection of its own in psycopg2's asynchronous mode, waiting for the
socket with the loop's own reader and writer callbacks: no thread, and the loop serves other flows
while the answer is on its way.

Questions are shared: a read arriving while a question is on the wire waits for the next one
(which is sent after it arrived, so it sees every commit its client saw acknowledged); every read
that arrived meanwhile takes that next answer. Under load this is one round trip for many reads.

A question not answered within ``timeout`` seconds, or any failure, closes the connection and
raises; for ``retry_after`` seconds after a failure every question fails at once (the read then
goes to a worker thread, which knows how to fail open), so a database that is down costs the loop
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sgcache")

#: Seconds a question may take; seconds without questions after a failure.
TIMEOUT_SECONDS = 1.0
RETRY_AFTER_SECONDS = 5.0


class VersionUnknown(Exception):
    """The version could not be asked (now, or recently)."""


class LoopVersions:
    """Asks ``sql`` (one value) on a non-blocking psycopg2 connection made by ``connect`` (a
    callable returning ``psycopg2.connect(..., async_=True)``; called in the loop's default
    executor: host names are resolved there, not on the loop)."""

    def __init__(self, connect: Callable[[], Any], sql: str, timeout: float = TIMEOUT_SECONDS,
                 retry_after: float = RETRY_AFTER_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._connect = connect
        self._sql = sql
        self.timeout = timeout
        self.retry_after = retry_after
        self._clock = clock
        self._conn: Any = None
        self._next: asyncio.Future[Any] | None = None  # the question readers arriving now will take
        self._driver: asyncio.Task[None] | None = None
        self._failed_at: float | None = None
        self._closed = False
        #: Questions sent (a figure for tests and benchmarks).
        self.asked = 0

    async def version(self) -> Any:
        """The value of the question sent after this call began; raises VersionUnknown."""
        if self._closed:
            raise VersionUnknown("closed")
        if self._failed_at is not None and self._clock() - self._failed_at < self.retry_after:
            raise VersionUnknown("failed recently")
        loop = asyncio.get_running_loop()
        answer = self._next
        if answer is None:
            answer = self._next = loop.create_future()
            answer.add_done_callback(_retrieve)
        # (mitmproxy runs tasks eagerly on Python 3.12: the driver may take ``answer``, and even
        # answer it and end, before create_task returns)
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        # shielded: a reader that gives up does not cancel the answer the others wait for
        return await asyncio.shield(answer)

    async def _drive(self) -> None:
        """Send questions while readers wait for one, one at a time."""
        try:
            while self._next is not None and not self._closed:
                answer, self._next = self._next, None
                try:
                    value = await asyncio.wait_for(self._ask(), self.timeout)
                except asyncio.CancelledError:  # closed (:meth:`close`)
                    self._tell_waiting(answer, "closed")
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure
                    self._fail(exc)
                    self._tell_waiting(answer, type(exc).__name__)
                else:
                    if not answer.done():
                        answer.set_result(value)
        finally:
            self._driver = None

    def _tell_waiting(self, answer: asyncio.Future[Any], why: str) -> None:
        """Every reader waiting, for ``answer`` or for the question after it, gets VersionUnknown."""
        for waiting in (answer, self._next):
            if waiting is not None and not waiting.done():
                waiting.set_exception(VersionUnknown(why))
        self._next = None

    async def _ask(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._conn is None:
            conn = await loop.run_in_executor(None, self._connect)
            try:
                await _ready(loop, conn)
                if self._closed:
                    raise VersionUnknown("closed")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        cursor = self._conn.cursor()
        try:
            self.asked += 1
            cursor.execute(self._sql)
            await _ready(loop, self._conn)
            row = cursor.fetchone()
        finally:
            cursor.close()
        self._failed_at = None
        return row[0]

    def _fail(self, exc: BaseException) -> None:
        if self._closed:  # (a connection made as the replica closed: nothing went wrong)
            return
        log.warning("asking the database's version failed (%s); reads go to worker threads for %.0f s",
                    type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {str(exc).strip()}",
                    self.retry_after)
        self._failed_at = self._clock()
        conn, self._conn = self._conn, None  # (no question is on it: the next one opens a new one)
        if conn is not None:
            _close_quietly(conn)

    def close(self) -> None:
        """Close for good (the replica is closed): later questions fail. A question on the wire is
        cancelled first, so its socket callbacks are gone before the socket closes (the descriptor's
        number may be reused at once by a client's connection, whose callbacks must not be touched)."""
        self._closed = True
        conn, self._conn = self._conn, None
        driver = self._driver
        if conn is None:
            return
        if driver is None or driver.done():
            _close_quietly(conn)
            return

        def stop() -> None:
            driver.cancel()
            driver.add_done_callback(lambda _: _close_quietly(conn))

        try:
            driver.get_loop().call_soon_threadsafe(stop)
        except RuntimeError:  # its loop is closed: no callback can run any more
            _close_quietly(conn)


async def _ready(loop: asyncio.AbstractEventLoop, conn: Any) -> None:
    """Wait, with the loop's socket callbacks, until ``conn`` has finished what it was doing."""
    from psycopg2 import extensions  # (only PostgreSQL gets here: psycopg2 is the postgres extra)

    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        fd = conn.fileno()
        ready = loop.create_future()
        if state == extensions.POLL_READ:
            loop.add_reader(fd, _set, ready)
            remove = loop.remove_reader
        elif state == extensions.POLL_WRITE:
            loop.add_writer(fd, _set, ready)
            remove = loop.remove_writer
        else:
            raise OSError(f"unexpected poll state {state}")
        try:
            await ready
        finally:
            remove(fd)


def _set(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _retrieve(answer: asyncio.Future[Any]) -> None:
    """Mark a failed answer's exception retrieved (every reader may have given up waiting)."""
    if not answer.cancelled():
        answer.exception()


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection
        pass
