"""Leadership: exactly one ingester writes to a replica, through one connection.

On PostgreSQL the leader holds a session advisory lock on a connection kept for the process
lifetime, which is also the connection every write of the ingester goes through (so a leader
that lost its session cannot write); on SQLite an OS file lock next to the database file,
released by the kernel however the process dies; an in-memory SQLite database needs none.

The lock itself is the database's (:meth:`cache.replica.dialect.Dialect.leader_lock`: the classes live in
cache/replica/dialect/); this module holds the session that takes it and writes through it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..replica.dialect import LeaderLock
from ..replica.statekeys import INGESTER_LEADER
from ..replica.store import Store
from ..wire import iso_now

log = logging.getLogger("sgcache.events")


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
        if self.conn is not None:
            self.lock.release_session(self.conn)
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
