"""Leadership: exactly one ingester writes to a replica, through one connection.

On PostgreSQL the leader holds a session advisory lock on a connection kept for the process
lifetime, which is also the connection every write of the ingester goes through (so a leader
that lost its session cannot write); on SQLite an OS file lock next to the database file,
released by the kernel however the process dies; an in-memory SQLite database needs none.

The lock classes and their choice (:func:`leader_lock_for`, :func:`engine_options`) are
dialect branches; cache/dialect.py is to choose them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..private import open_private
from ..statekeys import INGESTER_LEADER
from ..store import Store
from ..wire import iso_now

log = logging.getLogger("sgcache.events")


class LockHeld(RuntimeError):
    """Another ingester leads and this one may not wait (SQLite)."""


class LeaderLock:
    """Exactly one ingester per replica may write; this is its token."""

    def acquire(self, conn: Connection) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> None:
        pass


class PgAdvisoryLock(LeaderLock):
    """``pg_try_advisory_lock`` on the ingester's own connection, keyed by database and schema."""

    SQL = ("SELECT pg_try_advisory_lock(hashtext('sgcache-ingest:' || current_database()"
           " || ':' || current_schema()))")

    def acquire(self, conn: Connection) -> bool:
        with conn.begin():
            return bool(conn.exec_driver_sql(self.SQL).scalar())


class FileLock(LeaderLock):
    """An exclusive ``flock`` on ``<db file>.ingest.lock``; refuses at once when taken."""

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


def leader_lock_for(engine: Engine) -> LeaderLock:
    if engine.dialect.name == "postgresql":
        return PgAdvisoryLock()
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        return FileLock(Path(database + ".ingest.lock"))
    return NoLock()


def engine_options(url: str) -> dict[str, Any]:
    """Engine options for the ingester: on psycopg2, batch executemany UPDATEs (fewer round trips)."""
    return {"executemany_mode": "values_plus_batch"} if url.startswith(("postgresql", "postgres")) else {}


class LeaderSession:
    """The ingester's own connection and the leader lock taken on it.

    Every write of the ingester goes through :meth:`connect`'s connection: on PostgreSQL the
    one holding the advisory lock, so a leader whose session ended cannot write.
    """

    def __init__(self, store: Store, lock: LeaderLock, stop_event: threading.Event, retry: float):
        self.store = store
        self.lock = lock
        self.stop_event = stop_event
        self.retry = retry
        self.conn: Connection | None = None

    def connect(self) -> Connection:
        """The ingester's own connection (opened again after it was dropped)."""
        if self.conn is None or self.conn.closed:
            self.conn = self.store.engine.connect()
        return self.conn

    def close(self) -> None:
        """Give up leadership: the session holding the advisory lock is ended, not pooled."""
        self.lock.release()
        self.drop_connection()

    def become_leader(self, wait: bool = True) -> bool:
        """Take the leader lock, waiting (PostgreSQL) while another ingester holds it; False when
        stopped meanwhile, or at once when it is taken and ``wait`` is false."""
        announced = False
        while not self.stop_event.is_set():
            try:
                if self.lock.acquire(self.connect()):
                    self._note_leader()
                    log.info("leader lock taken (pid %s)", os.getpid())
                    return True
            except sa.exc.DBAPIError as exc:
                log.warning("database unavailable while taking the leader lock: %s", exc)
                self.drop_connection()
            if not wait:
                return False
            if not announced:
                log.info("another ingester leads; waiting for the leader lock")
                announced = True
            self.stop_event.wait(self.retry)
        return False

    def _note_leader(self) -> None:
        conn = self.connect()
        with conn.begin():
            self.store.set_state(conn, INGESTER_LEADER, {"pid": os.getpid(), "host": socket.gethostname(),
                                                         "since": iso_now()})

    def drop_connection(self) -> None:
        """Forget the connection (after a database error): the next :meth:`connect` opens another."""
        if self.conn is not None:
            try:
                self.conn.invalidate()
                self.conn.close()
            except sa.exc.DBAPIError:
                pass
        self.conn = None
