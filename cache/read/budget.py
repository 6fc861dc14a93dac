"""The time one read may spend in the database, and the memory of requests that overran it."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import Passthrough

#: What one read may cost, in seconds from its first statement to its last row (all its statements
#: together; the addon's ``sgcache_read_budget``). A read past it is stopped by the database
#: (PostgreSQL: ``statement_timeout``; SQLite: a progress handler) and passes (``slow-read``):
#: that client's problem, not the database's.
READ_BUDGET_SECONDS = 2.0
#: A request that overran its budget passes at once (``slow-read``) when it comes again within
#: this many seconds: a client repeating a slow read costs the database nothing more.
SLOW_MEMORY_SECONDS = 60.0
SLOW_MEMORY_SIZE = 1000
#: SQLite: virtual-machine instructions between two looks at the clock (a hit runs far fewer).
SQLITE_PROGRESS_STEPS = 200_000
#: PostgreSQL's SQLSTATE for a statement cancelled (here: by ``statement_timeout``).
PG_QUERY_CANCELED = "57014"


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
        """Raise slow-read when the budget is spent; on PostgreSQL, give the next statement
        what is left (``SET LOCAL``: it ends with the read's transaction)."""
        left = self.left()
        if left <= 0:
            self.spent = True
            raise Passthrough("slow-read", f"over {self.seconds:g}s")
        _limit_next_statement(conn, left)

    @contextlib.contextmanager
    def watching(self, conn: Connection) -> Iterator[None]:
        """Stop a SQLite statement that runs past the deadline; turn the database's
        cancellation of a statement over budget into ``Passthrough("slow-read")``."""
        raw = _interruptible(conn)
        self.deadline = time.monotonic() + self.seconds

        def _progress() -> int:
            if time.monotonic() > self.deadline:
                self.spent = True
                return 1  # sqlite3 raises OperationalError("interrupted")
            return 0

        if raw is not None:
            raw.set_progress_handler(_progress, SQLITE_PROGRESS_STEPS)
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if self.spent or getattr(exc.orig, "pgcode", None) == PG_QUERY_CANCELED:
                self.spent = True
                conn.rollback()  # PostgreSQL: the cancelled statement aborted the transaction
                raise Passthrough("slow-read", f"over {self.seconds:g}s") from exc
            raise
        finally:
            if raw is not None:
                raw.set_progress_handler(None, 0)


# dialect: PostgreSQL stops a statement itself (statement_timeout, set per statement);
# SQLite has no statement timeout: a progress handler interrupts it (see _interruptible).
def _limit_next_statement(conn: Connection, seconds: float) -> None:
    """Let the database cancel the next statement after ``seconds`` (PostgreSQL only)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")


# dialect: only SQLite's driver connection takes a progress handler (PostgreSQL: see above).
def _interruptible(conn: Connection) -> Any:
    """The sqlite3 connection under ``conn`` (to install a progress handler on), else None."""
    return conn.connection.driver_connection if conn.dialect.name == "sqlite" else None


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

