"""SQLite: the embedded replica, one file (or memory) that several processes may open."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sa_sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from ...errors import Passthrough
from ...private import open_private
from ..textcase import lower_simple
from .base import Dialect, LeaderLock, LockHeld, no_check

#: Virtual-machine instructions between two looks at a read's clock (a hit runs far fewer).
PROGRESS_STEPS = 200_000


class SQLiteDialect(Dialect):
    name = "sqlite"

    def create_engine(self, url: str, *, writer: bool = False, **kwargs: Any) -> Engine:
        """WAL, a busy timeout and ``sg_lower`` on every connection; one shared connection for an
        in-memory database; a writer's transactions begin IMMEDIATE (:func:`_begin_immediate`)."""
        connect_args = {"timeout": 30, "check_same_thread": False}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs.setdefault("poolclass", StaticPool)
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        sa.event.listen(engine, "connect", _setup_connection)
        if writer:
            _begin_immediate(engine)
        return engine

    def write_engine(self, engine: Engine) -> Engine:
        """For a file, a second engine whose transactions begin IMMEDIATE, so a read-then-write
        transaction cannot fail on a lock upgrade; readers keep ``engine`` (no write lock)."""
        if not _on_disk(engine.url):
            return engine
        return self.create_engine(engine.url.render_as_string(hide_password=False), writer=True)

    def inline_engine(self, engine: Engine) -> Engine | None:
        """A file's replica: one connection that never waits for a lock (``busy_timeout`` 0: a
        locked file is an error at once, and the read goes to a worker thread)."""
        if not _on_disk(engine.url):
            return None  # an in-memory database is one connection's: no second one
        inline = sa.create_engine(engine.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0,
                                  pool_timeout=0, connect_args={"timeout": 0, "check_same_thread": False})
        sa.event.listen(inline, "connect", _setup_connection)

        @sa.event.listens_for(inline, "connect")
        def _never_wait(dbapi_conn: Any, _record: Any) -> None:  # after _setup_connection's 30 s
            dbapi_conn.execute("PRAGMA busy_timeout=0")

        return inline

    def versions_engine(self, engine: Engine) -> Engine | None:
        """One connection of its own, which never waits (``PRAGMA data_version`` is one connection's)."""
        return self.inline_engine(engine)

    def data_version(self, conn: Connection) -> Any:
        """``PRAGMA data_version``: changes when any other connection or process commits."""
        return conn.connection.driver_connection.execute("PRAGMA data_version").fetchone()[0]

    def guard_proxy(self, engine: Engine, write_engine: Engine) -> Callable[[Connection], None]:
        """Never create a missing replica file; notice one moved, deleted or made unreadable."""
        path = self.database_file(engine.url)
        if path is None:
            return no_check

        def _no_create(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
            # sqlite3 would make a new empty file where the replica was (renamed, deleted)
            if not os.path.exists(path):
                raise sqlite3.OperationalError(f"replica file {path} is missing")

        for each in {engine, write_engine}:
            sa.event.listen(each, "do_connect", _no_create)

        @sa.event.listens_for(engine, "connect")
        def _remember_file(_dbapi_conn: Any, record: Any) -> None:
            record.info["sgcache_file"] = _file_id(path)

        def check(conn: Connection) -> None:
            # an open connection keeps reading a replica file that was moved, deleted or made
            # unreadable: notice it, so the replica at the configured path is the one served
            now = _file_id(path) if os.access(path, os.R_OK) else None
            seen = conn.connection.info.setdefault("sgcache_file", now)
            if now is None or seen != now:
                raise sqlite3.OperationalError(f"replica file {path} was moved, removed or made unreadable")

        return check

    def database_file(self, url: str | sa.URL) -> str | None:
        """The file of a file-backed SQLite URL, else None (memory, URI filenames)."""
        parsed = sa.engine.make_url(url)
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("uri"):
            return None
        return os.path.abspath(database)

    def leader_lock(self, engine: Engine) -> LeaderLock:
        """A file lock beside the database file; none for a database only this process sees."""
        if not _on_disk(engine.url):
            return NoLock()
        return FileLock(Path(f"{engine.url.database}.ingest.lock"))

    def insert(self, table: sa.Table) -> Any:
        return sa_sqlite.insert(table)

    def greatest(self, a: Any, b: Any) -> Any:
        return sa.func.max(a, b)  # max() of two arguments: SQLite's scalar maximum

    def lock_writes(self, conn: Connection) -> None:
        """Nothing: SQLite serializes writers (a write transaction begins IMMEDIATE)."""

    def snapshot(self, conn: Connection) -> None:
        """An explicit BEGIN (the driver begins none before a SELECT): in WAL mode the reads of one
        transaction see one snapshot, and a reader takes no write lock."""
        if not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
            conn.exec_driver_sql("BEGIN")

    def clock(self, conn: Connection) -> float:
        """SQLite's clock is this machine's (its ``'now'`` reads the system time, as ``time.time()``
        does): no statement needed."""
        return time.time()

    def lower(self, expr: Any) -> Any:
        """SQLite's own lower() is ASCII-only but runs in C: it is used for ASCII values (as many
        bytes as characters), the registered Python sg_lower() for the others."""
        non_ascii = sa.func.length(sa.cast(expr, sa.LargeBinary)) != sa.func.length(expr)  # bytes vs chars
        return sa.case((non_ascii, sa.func.sg_lower(expr)), else_=sa.func.lower(expr))

    def rebuild_lowered_indexes(self, conn: Connection) -> list[str]:
        """``REINDEX`` each index on ``sg_lower``: its entries hold what the function returned
        when each row was written (a function that changes needs its indexes rebuilt)."""
        names = [r[0] for r in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '%sg_lower%' ORDER BY name")]
        for name in names:
            conn.exec_driver_sql(f"REINDEX {conn.dialect.identifier_preparer.quote(name)}")
        return names

    def index_names(self, conn: Connection, table: str) -> set[str]:
        rows = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,))
        return {r[0] for r in rows}

    def _bound_in(self, expr: Any, values: list[Any], storage: str) -> Any:
        """A JSON array read with ``json_each``."""
        if any(isinstance(v, str) and "\x00" in v for v in values):
            raise Passthrough("filter-value", "NUL in a long in list")
        try:
            text = json.dumps(values, allow_nan=False, ensure_ascii=False)
        except ValueError:
            raise Passthrough("filter-value", "not a finite number") from None
        each = sa.func.json_each(sa.bindparam(None, text, type_=sa.Text)).table_valued("value")
        return expr.in_(sa.select(each.c.value))

    @contextlib.contextmanager
    def interrupting(self, conn: Connection, over: Callable[[], bool]) -> Iterator[None]:
        """A progress handler asks ``over()`` every :data:`PROGRESS_STEPS` instructions; when it
        is true sqlite3 raises OperationalError("interrupted")."""
        raw = conn.connection.driver_connection
        raw.set_progress_handler(lambda: 1 if over() else 0, PROGRESS_STEPS)
        try:
            yield
        finally:
            raw.set_progress_handler(None, 0)


#: Each connection's page cache, KiB (SQLite's default is 2,000): a page read that walks an index
#: and probes a row and a link table for each entry touches a few thousand pages spread over a
#: million-row file; at 2 MB they were read again from the OS on every call (the Tasks of one
#: assignee by due date: 9.2 ms at a million rows against 6.0 at 10,000; 16 MiB: 6.1 against 7.0,
#: docs/scale.md). Filled only as pages are read: at most this much per connection.
CACHE_KIB = 16_384


def _setup_connection(dbapi_conn: Any, _record: Any) -> None:
    # SG matches text case-insensitively for all of Unicode; SQLite's lower() is ASCII only.
    # SQLiteDialect.lower() calls sg_lower() only for values with non-ASCII characters. It lowers
    # as PostgreSQL does (cache/replica/textcase.py); indexes on it are rebuilt when that changes.
    dbapi_conn.create_function("sg_lower", 1, _py_lower, deterministic=True)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    cur.close()


def _py_lower(value: Any) -> Any:
    return lower_simple(value) if isinstance(value, str) else value


def _begin_immediate(engine: Engine) -> None:
    """Take the write lock at BEGIN, so a write transaction never fails upgrading a read lock
    while another process writes (WAL gives readers their own snapshot anyway)."""

    @sa.event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _on_disk(url: sa.URL) -> bool:
    """Whether other processes may open this database (it is not in this process's memory)."""
    return url.database not in (None, "", ":memory:")


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class FileLock(LeaderLock):
    """An exclusive ``flock`` on ``<db file>.ingest.lock``; refuses at once when taken. The
    kernel releases it however the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, conn: Connection) -> bool:
        fd = open_private(self.path)  # mode 0600 when created
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(self.path).read_text(encoding="utf-8", errors="replace").strip() or "?"
            os.close(fd)
            raise LockHeld(f"another ingester ({holder}) already runs on this SQLite replica "
                           f"(lock {self.path}); only one may run on SQLite") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class NoLock(LeaderLock):
    """In-memory SQLite: nothing else can reach the database."""

    def acquire(self, conn: Connection) -> bool:
        return True
