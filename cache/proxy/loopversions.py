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
    executor: host names are resolved there, not on the loop).

    A question is driven by the loop's callbacks alone (no task of its own: a task, its wake-ups and
    a shielded future per question cost more than the question): readers arriving in one turn of
    the loop are sent one question at the end of that turn; readers arriving while it is on the
    wire wait for the next, sent as soon as it is answered. Each reader waits on a future of its
    own, so one that gives up never cancels the answer of the others."""

    def __init__(self, connect: Callable[[], Any], sql: str, timeout: float = TIMEOUT_SECONDS,
                 retry_after: float = RETRY_AFTER_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._connect = connect
        self._sql = sql
        self.timeout = timeout
        self.retry_after = retry_after
        self._clock = clock
        self._conn: Any = None
        self._cursor: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[asyncio.Future[Any]] = []  # readers of the next question
        self._wire: list[asyncio.Future[Any]] | None = None  # readers of the question on the wire
        self._scheduled: asyncio.Handle | None = None  # the next question's send, at the end of this turn
        self._opening: asyncio.Task[None] | None = None  # a connection being made
        #: (loop, socket, as reader) while watched: for reading from the first question on, between
        #: questions too (watching it anew for each one cost more of the loop than the question)
        self._watching: tuple[asyncio.AbstractEventLoop, int, bool] | None = None
        self._timer: asyncio.TimerHandle | None = None  # the question on the wire's deadline
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
        loop = self._loop = asyncio.get_running_loop()
        mine = loop.create_future()
        self._waiting.append(mine)
        if not self._busy():
            self._scheduled = loop.call_soon(self._send_scheduled)
        return await mine

    def _busy(self) -> bool:
        """A question is on the wire, sent at the end of this turn, or waiting for a connection."""
        return (self._wire is not None or self._scheduled is not None
                or (self._opening is not None and not self._opening.done()))

    def _send_scheduled(self) -> None:
        self._scheduled = None
        self._next_question()

    def _next_question(self) -> None:
        """Send the readers waiting their question (after a connection is made, when there is none)."""
        if not self._waiting or self._closed:
            return
        assert self._loop is not None
        if self._conn is None:
            self._opening = self._loop.create_task(self._open())
            return
        self._wire, self._waiting = self._waiting, []
        self._timer = self._loop.call_later(self.timeout, self._timed_out)
        try:
            self.asked += 1
            self._cursor.execute(self._sql)
            self._advance()
        except Exception as exc:  # noqa: BLE001 - any failure
            self._fail(exc)

    async def _open(self) -> None:
        """Make the connection (within ``timeout``), then send the waiting readers' question."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                conn = await loop.run_in_executor(None, self._connect)
                try:
                    await _ready(loop, conn)
                    if self._closed:
                        raise VersionUnknown("closed")
                except BaseException:
                    conn.close()
                    raise
        except asyncio.CancelledError:  # closed (:meth:`close`)
            self._tell_waiting("closed")
            raise
        except Exception as exc:  # noqa: BLE001 - any failure
            self._fail(exc)
            return
        finally:
            self._opening = None
        self._conn, self._cursor = conn, conn.cursor()
        self._next_question()

    def _advance(self) -> None:
        """Poll the connection: the question on the wire answered, or its socket watched (a
        callback of the loop). Between questions the socket stays watched for reading: what
        arrives then is read at once (the server gone: the poll fails, the connection is replaced)."""
        reading = _waits_to_read(self._conn)
        self._watch_socket(for_reading=reading is not False)
        if reading is None and self._wire is not None:
            self._answered()

    def _watch_socket(self, for_reading: bool) -> None:
        assert self._loop is not None
        wanted = (self._loop, self._conn.fileno(), for_reading)
        if self._watching == wanted:
            return
        self._unwatch()
        _start_watching(self._loop, (wanted[1], for_reading), self._on_socket)
        self._watching = wanted

    def _on_socket(self) -> None:
        try:
            self._advance()
        except Exception as exc:  # noqa: BLE001 - any failure
            self._fail(exc)

    def _answered(self) -> None:
        row = self._cursor.fetchone()
        self._cancel_timer()
        readers, self._wire = self._wire or [], None
        self._failed_at = None
        for reader in readers:
            if not reader.done():  # (one that gave up is cancelled)
                reader.set_result(row[0])
        self._next_question()  # those who arrived while it was on the wire

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError(f"no answer in {self.timeout:g} s"))

    def _unwatch(self) -> None:
        if self._watching is not None:
            loop, fd, for_reading = self._watching
            if not loop.is_closed():  # (a loop closed since: its callbacks are gone with it)
                _stop_watching(loop, (fd, for_reading))
        self._watching = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tell_waiting(self, why: str) -> None:
        """Every reader waiting, for the question on the wire or the next one, gets VersionUnknown."""
        readers = (self._wire or []) + self._waiting
        self._wire, self._waiting = None, []
        for reader in readers:
            if not reader.done():
                reader.set_exception(VersionUnknown(why))

    def _fail(self, exc: BaseException) -> None:
        self._cancel_timer()
        self._unwatch()  # before the socket closes
        if not self._closed:  # (a connection made as the replica closed: nothing went wrong)
            log.warning("asking the database's version failed (%s); reads go to worker threads for %.0f s",
                        type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {str(exc).strip()}",
                        self.retry_after)
            self._failed_at = self._clock()
        conn, self._conn, self._cursor = self._conn, None, None  # the next question opens a new one
        if conn is not None:
            _close_quietly(conn)
        self._tell_waiting(type(exc).__name__)

    def close(self) -> None:
        """Close for good (the replica is closed): later questions fail. A question on the wire is
        cancelled, and the socket let go of, on the loop first, so its callbacks are gone before the
        socket closes (the descriptor's number may be reused at once by a client's connection,
        whose callbacks must not be touched)."""
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed() and (self._busy() or self._watching is not None):
            try:
                loop.call_soon_threadsafe(self._shut)
                return
            except RuntimeError:  # its loop is closed: no callback can run any more
                pass
        self._shut()

    def _shut(self) -> None:
        self._cancel_timer()
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._opening is not None:
            self._opening.cancel()
        self._unwatch()
        self._tell_waiting("closed")
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            _close_quietly(conn)


async def _ready(loop: asyncio.AbstractEventLoop, conn: Any) -> None:
    """Wait, with the loop's socket callbacks, until ``conn`` has finished what it was doing."""
    while True:
        ready = loop.create_future()
        watching = _watch(loop, conn, _set, ready)
        if watching is None:
            return
        try:
            await ready
        finally:
            _stop_watching(loop, watching)


def _watch(loop: asyncio.AbstractEventLoop, conn: Any, callback: Callable[..., None],
           *args: Any) -> tuple[int, bool] | None:
    """Poll ``conn``: None when it has finished, else the socket it waits for, now watched by the
    loop with ``callback(*args)``: (descriptor, whether for reading)."""
    reading = _waits_to_read(conn)
    if reading is None:
        return None
    watching = (conn.fileno(), reading)
    _start_watching(loop, watching, callback, *args)
    return watching


def _waits_to_read(conn: Any) -> bool | None:
    """Poll ``conn``: None when it has finished, True when it waits to read, False to write."""
    from psycopg2 import extensions  # (only PostgreSQL gets here: psycopg2 is the postgres extra)

    state = conn.poll()
    if state == extensions.POLL_OK:
        return None
    if state in (extensions.POLL_READ, extensions.POLL_WRITE):
        return state == extensions.POLL_READ
    raise OSError(f"unexpected poll state {state}")


def _start_watching(loop: asyncio.AbstractEventLoop, watching: tuple[int, bool], callback: Callable[..., None],
                    *args: Any) -> None:
    """Watch a socket, (descriptor, for reading), with ``callback(*args)``."""
    fd, for_reading = watching
    (loop.add_reader if for_reading else loop.add_writer)(fd, callback, *args)


def _stop_watching(loop: asyncio.AbstractEventLoop, watching: tuple[int, bool]) -> None:
    """Stop watching a socket :func:`_watch` watched."""
    fd, for_reading = watching
    (loop.remove_reader if for_reading else loop.remove_writer)(fd)


def _set(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection
        pass
