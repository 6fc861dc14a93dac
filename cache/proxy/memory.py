"""Memory given back after large bodies, and the bound on answers the proxy builds or decodes.

mitmproxy reads an API3 request (and SG's answer to one) whole, and the proxy decodes them: a
50 MB body costs hundreds of MB of short-lived objects. CPython frees them, but glibc's
``malloc`` keeps freed memory in its arenas (one per thread that allocated), so the process
stays that large. A second after a flow with a large body, :class:`Trimmer` runs the garbage
collector (mitmproxy's flows sit in reference cycles) and ``malloc_trim(0)``, which hands the
free pages back to the system (in a worker thread, at most every few seconds).

``sgcache_max_answer`` bounds the answers: a hit larger than it passes (``large-answer``), and
SG's answer larger than it is relayed without being decoded (a read: nothing learned from it;
a write: its effects are marked pending until the ingester brings them).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

log = logging.getLogger("sgcache")

#: ``sgcache_max_answer``'s default, in MB (SG's largest page, 500 rows, at 32 kB a row).
MAX_ANSWER_MB = 16
#: Bodies at least this large (request and answer, bytes) are followed by a trim ...
TRIM_AFTER_BYTES = 4 * 1024 * 1024
#: ... this many seconds later (the flow's answer sent, its connection on to the next request) ...
TRIM_DELAY = 1.0
#: ... and at most once in this many seconds (a full collection costs the GIL for a while).
TRIM_INTERVAL = 5.0


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where there is none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class Trimmer:
    """Gives freed memory back to the system a second after a flow with large bodies: a full
    garbage collection (mitmproxy's flows sit in reference cycles, freed only by the collector),
    then ``malloc_trim(0)``; in a worker thread, at most once every :data:`TRIM_INTERVAL` seconds."""

    def __init__(self, executor: Executor, threshold: int = TRIM_AFTER_BYTES, delay: float = TRIM_DELAY,
                 interval: float = TRIM_INTERVAL, trim: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.executor = executor
        self.threshold, self.delay, self.interval = threshold, delay, interval
        self._trim = trim if trim is not None else _malloc_trim()
        self._clock = clock
        self._scheduled = False
        self._last = -interval
        self.trims = 0  # for tests and the log

    def after(self, size: int) -> None:
        """A flow held ``size`` bytes of bodies: trim soon when they were large (call on the loop)."""
        if size < self.threshold or self._trim is None or self._scheduled:
            return
        self._scheduled = True
        delay = max(self.delay, self._last + self.interval - self._clock())
        asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, self._collect_and_trim)
        except RuntimeError:  # the executor was shut down (stopping)
            return
        future.add_done_callback(self._done)

    def _collect_and_trim(self) -> None:
        assert self._trim is not None
        gc.collect()
        self._trim()

    def _done(self, future: asyncio.Future[None]) -> None:
        self._scheduled, self._last = False, self._clock()
        self.trims += 1
        if not future.cancelled() and future.exception() is not None:
            log.debug("malloc_trim failed: %s", future.exception())
        else:
            log.debug("malloc_trim: freed memory given back to the system")
