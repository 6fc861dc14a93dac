"""Memory given back after large bodies, and the bound on answers the proxy builds or decodes.

mitmproxy reads an API3 request (and SG's answer to one) whole, and the proxy decodes them: a
50 MB body costs hundreds of MB of short-lived objects. CPython frees them, but glibc's
``malloc`` keeps freed memory in its arenas (one per thread that allocated), so the process
stays that large. After a flow with a large body, :class:`Trimmer` calls ``malloc_trim(0)``
(a second later, once at a time, in a worker thread), which hands the free pages back to the system.

``sgcache_max_answer`` bounds the answers: a hit larger than it passes (``large-answer``), and
SG's answer larger than it is relayed without being decoded (a read: nothing learned from it;
a write: its effects are marked pending until the ingester brings them).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from concurrent.futures import Executor

log = logging.getLogger("sgcache")

#: ``sgcache_max_answer``'s default, in MB (SG's largest page, 500 rows, at 32 kB a row).
MAX_ANSWER_MB = 16
#: Bodies at least this large (request or answer, bytes) are followed by a trim...
TRIM_AFTER_BYTES = 4 * 1024 * 1024
#: ... this many seconds later (once the flow's answer is sent and its memory freed).
TRIM_DELAY = 1.0


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
    """Gives freed memory back to the system after large bodies (one trim at a time)."""

    def __init__(self, executor: Executor, threshold: int = TRIM_AFTER_BYTES, delay: float = TRIM_DELAY,
                 trim: Callable[[], object] | None = None) -> None:
        self.executor = executor
        self.threshold, self.delay = threshold, delay
        self._trim = trim if trim is not None else _malloc_trim()
        self._running = False
        self.trims = 0  # for tests and the log

    def after(self, size: int) -> None:
        """A flow with a body of ``size`` bytes ended: trim when it was large (call on the loop)."""
        if size < self.threshold or self._trim is None or self._running:
            return
        self._running = True
        asyncio.get_running_loop().call_later(self.delay, self._start)

    def _start(self) -> None:
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, self._trim)
        except RuntimeError:  # the executor was shut down (stopping)
            self._running = False
            return
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[object]) -> None:
        self._running = False
        self.trims += 1
        if not future.cancelled() and future.exception() is not None:
            log.debug("malloc_trim failed: %s", future.exception())
