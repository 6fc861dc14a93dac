"""The time one read may spend in the database, and the memory of requests that overran it."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import Passthrough
from ..replica.dialect import dialect_for

#: What one read may cost, in seconds from its first statement to its last row (all its statements
#: together; the addon's ``sgcache_read_budget``). A read past it is stopped by the database
#: (PostgreSQL: ``statement_timeout``; SQLite: a progress handler) and passes (``slow-read``):
#: that client's problem, not the database's.
READ_BUDGET_SECONDS = 2.0
#: A request that overran its budget passes at once (``slow-read``) when it comes again within
#: this many seconds: a client repeating a slow read costs the database nothing more.
SLOW_MEMORY_SECONDS = 60.0
SLOW_MEMORY_SIZE = 1000


class ReadBudget:
    """The time one read may spend in the database; see :data:`READ_BUDGET_SECONDS`.

    Use ``with budget.watching(conn):`` around the read and call :meth:`before_statement`
    before each statement. A read that overruns raises ``Passthrough("slow-read")``.
    """

    def __init__(self, seconds: float = READ_BUDGET_SECONDS):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds  # restarted by watching(): planning is not counted
        self.spent = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def before_statement(self, conn: Connection) -> None:
        """Raise slow-read when the budget is spent; else let the database stop the next
        statement when what is left runs out (PostgreSQL: ``SET LOCAL statement_timeout``)."""
        left = self.left()
        if left <= 0:
            self.spent = True
            raise Passthrough("slow-read", f"over {self.seconds:g}s")
        dialect_for(conn).limit_statement(conn, left)

    @contextlib.contextmanager
    def watching(self, conn: Connection) -> Iterator[None]:
        """Stop a statement that runs past the deadline (SQLite: a progress handler); turn the
        database's cancellation of a statement over budget into ``Passthrough("slow-read")``."""
        dialect = dialect_for(conn)
        self.deadline = time.monotonic() + self.seconds

        def over() -> bool:
            if time.monotonic() > self.deadline:
                self.spent = True
            return self.spent

        with dialect.interrupting(conn, over):
            try:
                yield
            except sa.exc.DBAPIError as exc:
                if self.spent or dialect.timed_out(exc):
                    self.spent = True
                    conn.rollback()  # PostgreSQL: the cancelled statement aborted the transaction
                    raise Passthrough("slow-read", f"over {self.seconds:g}s") from exc
                raise


class SlowRequests:
    """Requests (by digest) that overran their budget lately; see :data:`SLOW_MEMORY_SECONDS`."""

    def __init__(self, seconds: float = SLOW_MEMORY_SECONDS, size: int = SLOW_MEMORY_SIZE):
        self.seconds = seconds
        self.size = size
        self._until: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # digest -> until when
        self._lock = threading.Lock()

    def remember(self, digest: bytes) -> None:
        with self._lock:
            self._until[digest] = time.monotonic() + self.seconds
            self._until.move_to_end(digest)
            while len(self._until) > self.size:
                self._until.popitem(last=False)

    def recent(self, digest: bytes) -> bool:
        """Whether this request overran its budget less than :attr:`seconds` ago."""
        if not self._until:
            return False
        with self._lock:
            until = self._until.get(digest)
            if until is None:
                return False
            if time.monotonic() < until:
                return True
            del self._until[digest]
            return False

    def clear(self) -> None:
        with self._lock:
            self._until.clear()

    def __len__(self) -> int:
        return len(self._until)

