"""The interface every database of the replica implements, with what they share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ...errors import Passthrough
from ..textcase import lower_simple

#: The storage classes of values a long ``in`` list may hold, with their SQL types.
BOUND_LIST_TYPES = {"text": sa.Text, "int": sa.BigInteger, "float": sa.Float}


class Dialect:
    """What differs between the replica's databases (one instance per kind of database)."""

    name = ""

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<dialect {self.name}>"

    # -- engines -------------------------------------------------------------------------
    def create_engine(self, url: str, *, writer: bool = False, **kwargs: Any) -> Engine:
        """An engine tuned for the replica. ``writer``: the engine of a writing process (the
        scripts), every transaction of which is a write transaction."""
        raise NotImplementedError

    def write_engine(self, engine: Engine) -> Engine:
        """The engine for the write transactions of a process that reads through ``engine``."""
        return engine

    def inline_engine(self, engine: Engine) -> Engine | None:
        """An engine for the proxy's reads on its event loop (cache/proxy/inline.py): one
        connection that never waits (no lock wait, no network), or None: every read goes to a
        worker thread."""
        return None

    #: Whether :meth:`data_version` means the same on every connection (else only on one).
    shared_versions = False
    #: Whether a text column takes a NUL character (PostgreSQL's do not).
    stores_nul = True

    def versions_engine(self, engine: Engine) -> Engine | None:
        """An engine to ask :meth:`data_version` on (cache/proxy/inline.py), or None: the
        database cannot tell, and no answer is kept."""
        return None

    def data_version(self, conn: Connection) -> Any:
        """A value that changes whenever another connection commits to the database, as this
        connection sees it (cache/proxy/answercache.py); None: the database cannot tell."""
        return None

    #: The statement a non-blocking connection asks for :meth:`data_version` (a shared version only).
    data_version_sql = ""

    def nonblocking_connect(self, engine: Engine) -> Callable[[], Any] | None:
        """A function opening a connection to ``engine``'s database in psycopg2's asynchronous
        mode, on which the event loop asks :attr:`data_version_sql` (cache/proxy/loopversions.py);
        None: versions are asked in worker threads or on the inline connection."""
        return None

    def proxy_engine_options(self) -> dict[str, Any]:
        """``create_engine`` options of the proxy, which must fail fast when the database does."""
        return {}

    def guard_proxy(self, engine: Engine, write_engine: Engine) -> Callable[[Connection], None]:
        """Install the proxy's engine hooks; returns the check to run on a connection before the
        replica's state is read from it (it raises when the replica is not the one configured)."""
        return no_check

    def ingester_engine_options(self) -> dict[str, Any]:
        """``create_engine`` options for the ingester."""
        return {}

    def database_file(self, url: str | sa.URL) -> str | None:
        """The replica's file (absolute path) when the URL names a plain file, else None."""
        return None

    def leader_lock(self, engine: Engine) -> LeaderLock:
        """The token an ingester writing through ``engine`` holds (exactly one per replica)."""
        raise NotImplementedError

    # -- SQL -----------------------------------------------------------------------------
    def insert(self, table: sa.Table) -> Any:
        """An ``INSERT`` that supports ``ON CONFLICT``."""
        raise NotImplementedError

    def upsert(self, table: sa.Table, keys: Sequence[str], update_cols: Iterable[str] = ()) -> Any:
        """``INSERT .. ON CONFLICT (keys) DO UPDATE SET col = excluded.col`` (DO NOTHING without columns)."""
        stmt = self.insert(table)
        cols = [c for c in update_cols if c not in keys]
        if cols:
            return stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})
        return stmt.on_conflict_do_nothing(index_elements=list(keys))

    def greatest(self, a: Any, b: Any) -> Any:
        """The larger of two values, as an SQL expression."""
        raise NotImplementedError

    def lock_writes(self, conn: Connection) -> None:
        """Serialize write transactions from here to the end of ``conn``'s transaction."""

    def locked_read(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> Any:
        """:meth:`lock_writes`, then ``stmt`` (a SELECT) with ``params``: its result, read after the
        lock is held (what it reads, no write can change before this transaction ends)."""
        self.lock_writes(conn)
        return conn.execute(stmt, params)

    def snapshot(self, conn: Connection) -> None:
        """Make ``conn``'s transaction (begun, no statement run yet) read one snapshot of the
        database to its end (a dump reads many tables and must see them at one moment)."""

    def clock(self, conn: Connection) -> float:
        """The database server's clock now, in seconds since the epoch (sub-second resolution)."""
        raise NotImplementedError

    def clock_expression(self) -> Any:
        """:meth:`clock` as an SQL expression a statement can carry (None: ask :meth:`clock`)."""
        return None

    def lower(self, expr: Any) -> Any:
        """Lower case over all of Unicode, as SG compares text."""
        return sa.func.lower(expr)

    def lower_value(self, text: str) -> str:
        """``text`` lowered as :meth:`lower` lowers a stored value: the filter's side of a
        case-insensitive match (both sides must be lowered the same way, or a value does not
        match itself): Unicode's simple mapping, one code point at a time (cache/replica/textcase.py)."""
        return lower_simple(text)

    def lower_problem(self, conn: Connection) -> str | None:
        """Why :meth:`lower` cannot be trusted on ``conn``'s database (it does not lower as
        :meth:`lower_value` does), or None. Asked once per replica (``Store.lower_problem``)."""
        return None

    def codepoint_order(self, expr: Any) -> Any:
        """``expr``, sorting by code point whatever the database's collation."""
        return expr

    def index_names(self, conn: Connection, table: str) -> set[str]:
        """The names of the indexes on ``table`` (expression indexes too: SQLAlchemy's reflection
        skips those on some databases)."""
        raise NotImplementedError

    def analyze(self, conn: Connection, tables: Sequence[str]) -> None:
        """Refresh the planner's statistics of ``tables`` (after a full scan filled them). Without,
        at a million rows, PostgreSQL (a table autovacuum has not analyzed yet) planned sequential
        scans and sorts, and SQLite took a status index over a link's for a deep filter
        (benchmarks/bench_scale.py, docs/scale.md)."""
        quote = conn.dialect.identifier_preparer.quote
        for table in tables:
            conn.exec_driver_sql(f"ANALYZE {quote(table)}")

    def rebuild_lowered_indexes(self, conn: Connection) -> list[str]:
        """Rebuild the indexes that hold this process's lowering of text (:meth:`lower`) when a
        replica was indexed with another (cache/replica/textcase.py); the names rebuilt. The
        database's own lower() needs none."""
        return []

    def text_key(self, expr: Any) -> Any:
        """The lower-cased text in code-point order: what text sorts by, and what case-insensitive
        matches compare. The replica's text-key indexes (:meth:`text_key_index`) hold exactly this
        expression, so a sort or a match written with it can use them."""
        return self.codepoint_order(self.lower(expr))

    def sort_index(self, name: str, column: Any, id_column: Any) -> Any:
        """An index on ``column`` then ``id`` in the order a read sorts (NULL first ascending)."""
        return sa.Index(name, column, id_column)

    def desc_sort_index(self, name: str, column: Any, id_column: Any) -> Any:
        """An index on ``column`` descending (NULL last) then ``id`` ascending: a descending
        sort's order, ties by id ascending as SG breaks them."""
        return sa.Index(name, column.desc(), id_column)

    def text_key_index(self, name: str, column: Any, id_column: Any) -> Any:
        """An index on :meth:`text_key` of ``column`` then ``id``, in the order a read sorts
        (NULL first ascending, ties by id: docs/semantics.md)."""
        return sa.Index(name, self.text_key(column), id_column)

    def bound_in(self, expr: Any, values: list[Any], storage: str) -> Any:
        """``expr IN values`` (no None among them) with the values bound as ONE parameter, so a
        list of 30,000 values is neither 30,000 parameters nor a deep tree. ``storage``: the
        values' storage class; one not in :data:`BOUND_LIST_TYPES` passes."""
        if storage not in BOUND_LIST_TYPES:
            raise Passthrough("filter-value", f"long in list of {storage}")
        return self._bound_in(expr, values, storage)

    def _bound_in(self, expr: Any, values: list[Any], storage: str) -> Any:
        raise NotImplementedError

    def serial_plans(self, conn: Connection) -> None:
        """Have the planner choose plans without parallel workers to the end of ``conn``'s
        transaction (if it has them)."""

    def limit_statement(self, conn: Connection, seconds: float) -> None:
        """Have the database stop the next statement on ``conn`` after ``seconds`` (if it can)."""

    @contextlib.contextmanager
    def interrupting(self, conn: Connection, over: Callable[[], bool]) -> Iterator[None]:
        """Stop a statement running on ``conn`` once ``over()`` is true (if the database lets a
        client do so; else :meth:`limit_statement` does it)."""
        yield

    def timed_out(self, exc: sa.exc.DBAPIError) -> bool:
        """Whether the database cancelled the statement for running past its time limit."""
        return False


def no_check(_conn: Connection) -> None:
    """The proxy's check when there is nothing to check."""


class LockHeld(RuntimeError):
    """Another ingester leads and this one may not wait (SQLite)."""


class LeaderLock:
    """Exactly one ingester per replica may write; this is its token."""

    def acquire(self, conn: Connection) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> None:
        pass

    def release_session(self, conn: Connection) -> None:
        """Give the lock up on ``conn``, the session that holds it, before that session ends (a
        closed session's locks are freed only when its server process has exited: a successor
        asking at once could find the lock still held)."""
