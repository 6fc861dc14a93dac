"""A write's database steps, each waited for at most a bound: a hung replica never holds a write for long.

Before a write is sent the proxy reads the ingester's mark, and once SG has answered it stores
the answer, both before the client has SG's answer (cache/proxy/learning.py). A database that
hangs (a PostgreSQL server that stops answering on open connections, where no server-side
timeout can fire; another process holding SQLite's write lock, with the 30 s busy timeout)
would hold the client's write that long. So each step runs in a small pool of threads of its
own, and the writer waits for it at most ``seconds`` (``sgcache_write_wait``):

- a step not started by then (every thread of the pool busy with steps still waiting on the
  database) is cancelled: it never runs;
- a step started goes on in its thread; what it does when the database answers at last must be
  as safe as if it had run then (the caller's business, see :meth:`Learner.learn`).

The pool's size bounds the threads and database connections steps can hold while the database
hangs; a step past it waits its turn (within the same bound).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("sgcache.service")

T = TypeVar("T")

#: How long a write waits for each database step by default (``sgcache_write_wait``), seconds.
WRITE_WAIT_SECONDS = 2.0


class DatabaseWait(TimeoutError):
    """The database did not finish a write's step in time (it may still, in its thread).
    ``started``: the step was running (else it was still waiting for a thread of the pool, behind
    other steps: that alone says nothing of the database's health)."""

    def __init__(self, message: str, started: bool) -> None:
        super().__init__(message)
        self.started = started


class BoundedSteps:
    """Runs database steps in ``workers`` threads of their own and waits for each at most a bound."""

    def __init__(self, workers: int, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    def run(self, seconds: float, step: Callable[[], T]) -> T:
        """``step()``'s result (or its exception); :class:`DatabaseWait` when it has not finished
        within ``seconds`` (0 or less: wait as long as it takes)."""
        future = self._pool.submit(step)
        try:
            return future.result(timeout=seconds if seconds > 0 else None)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise DatabaseWait(f"no thread free for a database step within {seconds:g} s",
                                   started=False) from None
            if future.done():  # it finished just now
                return future.result()
            raise DatabaseWait(f"the replica did not answer within {seconds:g} s (the step goes on in its thread)",
                               started=True) from None

    def close(self) -> None:
        """Cancel the steps not started; those waiting on the database end with it."""
        self._pool.shutdown(wait=False, cancel_futures=True)
