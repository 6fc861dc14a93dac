"""PostgreSQL: one replica shared by several proxies and the ingester over the network."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import psycopg2
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as sa_postgresql
from sqlalchemy.engine import Connection, Engine

from .base import BOUND_LIST_TYPES, Dialect, LeaderLock, no_check

#: The proxy gives up connecting after this many seconds, and cancels statements running longer.
CONNECT_TIMEOUT = 3
STATEMENT_TIMEOUT_MS = 10_000
#: SQLSTATE of a statement cancelled (here: by ``statement_timeout``).
QUERY_CANCELED = "57014"
#: Held by a write transaction from its first flush to its end (cache/replica/writes.py says why).
WRITE_LOCK_SQL = ("SELECT pg_advisory_xact_lock(hashtext('sgcache-write:' || current_database()"
                  " || ':' || current_schema()))")


def normalize_url(url: str) -> str:
    """Use psycopg2 for plain ``postgresql://`` URLs (SQLAlchemy 2.1 would pick psycopg 3)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


class PostgreSQLDialect(Dialect):
    name = "postgresql"

    def create_engine(self, url: str, *, writer: bool = False, **kwargs: Any) -> Engine:
        """psycopg2, pre-ping, and a pool for the proxy's threads (``writer`` changes nothing:
        write transactions serialize their flushes with :meth:`lock_writes`)."""
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 10)
        return sa.create_engine(normalize_url(url), **kwargs)

    def proxy_engine_options(self) -> dict[str, Any]:
        return {
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 10,
                             "keepalives_interval": 3, "keepalives_count": 3},
            "pool_timeout": 5,
        }

    #: A snapshot (xmin:xmax:in-progress ids) is the whole cluster's: the same on every connection.
    shared_versions = True

    def versions_engine(self, engine: Engine) -> Engine | None:
        """A small pool of its own (asked by the workers only: it is a network round trip), in
        autocommit: one round trip a question (no BEGIN before it, no ROLLBACK after it), and no
        transaction left open to hold back the cluster's snapshot."""
        return sa.create_engine(engine.url.render_as_string(hide_password=False), pool_size=2, max_overflow=6,
                                isolation_level="AUTOCOMMIT", **self.proxy_engine_options())

    data_version_sql = "SELECT txid_current_snapshot()::text"

    def data_version(self, conn: Connection) -> Any:
        """The current snapshot (``xmin:xmax:xip``): it stays the same exactly while no transaction
        that writes (here or in another database of the cluster) commits, aborts or starts; a
        change of it is often not a change of the replica, which only costs a read."""
        return conn.exec_driver_sql(self.data_version_sql).scalar()

    def nonblocking_connect(self, engine: Engine) -> Callable[[], Any] | None:
        """psycopg2 in asynchronous mode (always autocommit), with the proxy's connect timeout and
        keepalives, to the database of ``engine``'s URL."""
        args, params = engine.dialect.create_connect_args(engine.url)
        params = {**params, **self.proxy_engine_options()["connect_args"], "async_": True}
        return functools.partial(psycopg2.connect, *args, **params)

    def guard_proxy(self, engine: Engine, write_engine: Engine) -> Callable[[Connection], None]:
        """A statement timeout on every connection of the proxy."""

        @sa.event.listens_for(engine, "connect")
        def _statement_timeout(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            cur.close()
            dbapi_conn.commit()

        return no_check

    def ingester_engine_options(self) -> dict[str, Any]:
        """On psycopg2, batch executemany UPDATEs (fewer round trips)."""
        return {"executemany_mode": "values_plus_batch"}

    def leader_lock(self, engine: Engine) -> LeaderLock:
        return PgAdvisoryLock()

    def insert(self, table: sa.Table) -> Any:
        return sa_postgresql.insert(table)

    def greatest(self, a: Any, b: Any) -> Any:
        return sa.func.greatest(a, b)

    def lock_writes(self, conn: Connection) -> None:
        """A transaction-level advisory lock, one per database and schema (:data:`WRITE_LOCK_SQL`)."""
        conn.exec_driver_sql(WRITE_LOCK_SQL)

    def snapshot(self, conn: Connection) -> None:
        """REPEATABLE READ, READ ONLY: one snapshot from the first query on."""
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def clock(self, conn: Connection) -> float:
        return float(conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())

    def codepoint_order(self, expr: Any) -> Any:
        """COLLATE "C": a database created with a linguistic locale would order differently
        (SQLite's collation is binary already)."""
        return expr.collate("C")

    def index_names(self, conn: Connection, table: str) -> set[str]:
        rows = conn.exec_driver_sql("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
                                    " AND tablename = %(t)s", {"t": table})
        return {r[0] for r in rows}

    def sort_index(self, name: str, column: Any, id_column: Any) -> Any:
        """NULLS FIRST (a btree index is NULLS LAST: read backwards, NULLS FIRST descending, the
        reverse of SG's order, and PostgreSQL then sorts the whole table for a page)."""
        return sa.Index(name, column.asc().nulls_first(), id_column)

    def desc_sort_index(self, name: str, column: Any, id_column: Any) -> Any:
        """NULLS LAST (a descending btree column is NULLS FIRST by default)."""
        return sa.Index(name, column.desc().nulls_last(), id_column)

    def text_key_index(self, name: str, column: Any, id_column: Any) -> Any:
        """NULLS FIRST: the order of an ascending sort (a btree index is NULLS LAST by default)."""
        return sa.Index(name, self.text_key(column).asc().nulls_first(), id_column)

    def _bound_in(self, expr: Any, values: list[Any], storage: str) -> Any:
        """An array compared with ``= ANY``."""
        array = sa.bindparam(None, values, type_=sa_postgresql.ARRAY(BOUND_LIST_TYPES[storage]()))
        return expr == sa.any_(array)

    def serial_plans(self, conn: Connection) -> None:
        """``SET LOCAL max_parallel_workers_per_gather = 0``: it ends with the transaction. A
        page of Tasks with one assignee by due date, at a million rows, was planned as a parallel
        walk of the date index (cost 8,900 against 18,400 for the serial one) and took 92 ms, most
        of it starting the two workers; serial: 26 ms (EXPLAIN ANALYZE, docs/scale.md)."""
        conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")

    def limit_statement(self, conn: Connection, seconds: float) -> None:
        """``SET LOCAL statement_timeout``: it ends with the transaction."""
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")

    def timed_out(self, exc: sa.exc.DBAPIError) -> bool:
        return getattr(exc.orig, "pgcode", None) == QUERY_CANCELED


class PgAdvisoryLock(LeaderLock):
    """``pg_try_advisory_lock`` on the ingester's own connection, keyed by database and schema.
    That session holds it for the process lifetime, and every write goes through that connection
    (so a leader that lost its session cannot write)."""

    SQL = ("SELECT pg_try_advisory_lock(hashtext('sgcache-ingest:' || current_database()"
           " || ':' || current_schema()))")

    def acquire(self, conn: Connection) -> bool:
        with conn.begin():
            return bool(conn.exec_driver_sql(self.SQL).scalar())

    def release_session(self, conn: Connection) -> None:
        try:
            with conn.begin():
                conn.exec_driver_sql("SELECT pg_advisory_unlock_all()")
        except sa.exc.SQLAlchemyError:
            pass  # the session is gone (or busy): its lock goes with it, once its process has exited
