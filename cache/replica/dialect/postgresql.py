"""PostgreSQL: one replica shared by several proxies and the ingester over the network."""

from __future__ import annotations

import functools
import logging
import time
import unicodedata
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as sa_postgresql
from sqlalchemy.engine import Connection, Engine

from ..textcase import LAST_CASED, lower_simple
from .base import BOUND_LIST_TYPES, Dialect, LeaderLock, no_check

log = logging.getLogger("sgcache.events")

#: The proxy gives up connecting after this many seconds, and cancels statements running longer.
CONNECT_TIMEOUT = 3
#: The ingester's connect timeout: it has no client waiting, only its next poll.
INGESTER_CONNECT_TIMEOUT = 10
STATEMENT_TIMEOUT_MS = 10_000
#: A pooled connection idle longer than this is pinged before it is used (:func:`ping_when_idle`).
PING_AFTER_IDLE_SECONDS = 1.0
_USED_AT = "sgcache_used_at"
#: The transaction that holds the write lock, on a connection's info.
_LOCKED_IN = "sgcache_write_locked_in"
#: SQLSTATE of a statement cancelled (here: by ``statement_timeout``).
QUERY_CANCELED = "57014"
#: Held by a write transaction from its first flush to its end (cache/replica/writes.py says why).
WRITE_LOCK_SQL = ("SELECT pg_advisory_xact_lock(hashtext('sgcache-write:' || current_database()"
                  " || ':' || current_schema()))")


@functools.cache
def _probe_text() -> str:
    """The characters the lower() probe asks about: every code point Python lowers or uppers,
    and those Python's Unicode tables do not assign (a newer Unicode in the database's libc may
    have letters there), up to :data:`LAST_CASED`; neither NUL nor surrogates (not text)."""
    chars = []
    for code in range(1, LAST_CASED + 1):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        if char.lower() != char or char.upper() != char or unicodedata.category(char) == "Cn":
            chars.append(char)
    return "".join(chars)


def normalize_url(url: str) -> str:
    """Use psycopg2 for plain ``postgresql://`` URLs (SQLAlchemy 2.1 would pick psycopg 3)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


#: The server's wall clock in seconds since the epoch, as an expression (built once).
_CLOCK = sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Float)


def ping_when_idle(engine: Engine, idle: float = PING_AFTER_IDLE_SECONDS) -> None:
    """Ping a pooled connection before it is used when it was idle more than ``idle`` seconds
    (a server restarted, a connection cut by a firewall: the pool replaces it, unseen). SQLAlchemy's
    ``pool_pre_ping`` pings on every use: a round trip on each read and write of the proxy. A
    connection used within the last second that fails anyway fails its statement, which the caller
    handles as any database failure (the read passes, the write's effects are marked pending), and
    the pool then replaces every connection as old as it."""
    dialect = engine.dialect

    @sa.event.listens_for(engine, "connect")
    def _connected(_dbapi_conn: Any, record: Any) -> None:
        record.info[_USED_AT] = time.monotonic()

    @sa.event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_USED_AT] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get(_USED_AT, 0.0) <= idle:
            return
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 - any failure: the pool makes a new connection
            raise sa.exc.DisconnectionError(str(exc)) from exc
        record.info[_USED_AT] = time.monotonic()


@functools.lru_cache(maxsize=16)
def _after_the_lock(stmt: Any, dialect: Any) -> tuple[str, Any]:
    """The write lock and ``stmt`` as one query string, and ``stmt`` compiled (for its parameters)."""
    compiled = stmt.compile(dialect=dialect)
    return f"{WRITE_LOCK_SQL};\n{compiled}", compiled


class PostgreSQLDialect(Dialect):
    name = "postgresql"

    def create_engine(self, url: str, *, writer: bool = False, **kwargs: Any) -> Engine:
        """psycopg2, a ping before a connection idle for a while is used, and a pool for the
        proxy's threads (``writer`` changes nothing: write transactions serialize their flushes
        with :meth:`lock_writes`)."""
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 10)
        engine = sa.create_engine(normalize_url(url), **kwargs)
        ping_when_idle(engine)
        return engine

    def proxy_engine_options(self) -> dict[str, Any]:
        return {
            "connect_args": {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 10,
                             "keepalives_interval": 3, "keepalives_count": 3},
            "pool_timeout": 5,
        }

    #: A snapshot (xmin:xmax:in-progress ids) is the whole cluster's: the same on every connection.
    shared_versions = True
    stores_nul = False

    def versions_engine(self, engine: Engine) -> Engine | None:
        """A small pool of its own for the questions of worker threads (the snapshot after a read,
        a write's event mark; the event loop asks on a connection of its own), in autocommit: one
        round trip a question (no BEGIN before it, no ROLLBACK after it), and no transaction left
        open to hold back the cluster's snapshot."""
        versions = sa.create_engine(engine.url.render_as_string(hide_password=False), pool_size=2, max_overflow=6,
                                    isolation_level="AUTOCOMMIT", **self.proxy_engine_options())
        ping_when_idle(versions)
        return versions

    data_version_sql = "SELECT txid_current_snapshot()::text"

    def data_version(self, conn: Connection) -> Any:
        """The current snapshot (``xmin:xmax:xip``): it stays the same exactly while no transaction
        that writes (here or in another database of the cluster) commits, aborts or starts; a
        change of it is often not a change of the replica, which only costs a read."""
        return conn.exec_driver_sql(self.data_version_sql).scalar()

    def nonblocking_connect(self, engine: Engine) -> Callable[[], Any] | None:
        """psycopg2 in asynchronous mode (always autocommit), with the proxy's connect timeout and
        keepalives, to the database of ``engine``'s URL; None when the URL names another driver
        (``postgresql+psycopg://``: its versions are asked by worker threads)."""
        if engine.dialect.driver != "psycopg2":
            return None
        import psycopg2  # (installed with the postgres extra; a SQLite-only install never gets here)

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
        """On psycopg2, batch executemany UPDATEs (fewer round trips); TCP keepalives, so a database
        host that vanished mid-statement ends the wait in about 20 s (the ingester then connects
        again) instead of the kernel's two hours; a connect timeout, as the proxy's but longer."""
        return {"executemany_mode": "values_plus_batch",
                "connect_args": {**self.proxy_engine_options()["connect_args"],
                                 "connect_timeout": INGESTER_CONNECT_TIMEOUT}}

    def leader_lock(self, engine: Engine) -> LeaderLock:
        return PgAdvisoryLock()

    def insert(self, table: sa.Table) -> Any:
        return sa_postgresql.insert(table)

    def greatest(self, a: Any, b: Any) -> Any:
        return sa.func.greatest(a, b)

    def lock_writes(self, conn: Connection) -> None:
        """A transaction-level advisory lock, one per database and schema (:data:`WRITE_LOCK_SQL`);
        asked once per transaction (a learnt write asks twice: one round trip saved). A lock taken
        inside a savepoint is let go if the savepoint is rolled back (the ingester's careful mode
        applies each event in one): only a lock taken outside any is known held to the end."""
        transaction = conn.get_transaction()
        if transaction is not None and conn.info.get(_LOCKED_IN) is transaction:
            return
        conn.exec_driver_sql(WRITE_LOCK_SQL)
        if not conn.in_nested_transaction():
            conn.info[_LOCKED_IN] = transaction

    def locked_read(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> Any:
        """The lock and the SELECT in one round trip: one query string of two statements. Under READ
        COMMITTED each statement takes its snapshot when it starts, so the SELECT's is taken once
        the lock is held, as when they are sent apart; psycopg2 gives the last one's rows."""
        transaction = conn.get_transaction()
        if (transaction is not None and conn.info.get(_LOCKED_IN) is transaction) or conn.in_nested_transaction():
            return super().locked_read(conn, stmt, params)  # held already, or taken inside a savepoint
        sql, compiled = _after_the_lock(stmt, conn.dialect)
        result = conn.exec_driver_sql(sql, compiled.construct_params(params))
        conn.info[_LOCKED_IN] = transaction
        return result

    def snapshot(self, conn: Connection) -> None:
        """REPEATABLE READ, READ ONLY: one snapshot from the first query on."""
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def clock(self, conn: Connection) -> float:
        return float(conn.execute(sa.select(self.clock_expression())).scalar_one())

    def clock_expression(self) -> Any:
        """The wall clock of the server now (``clock_timestamp()``, not the transaction's start)."""
        return _CLOCK

    def codepoint_order(self, expr: Any) -> Any:
        """COLLATE "C": a database created with a linguistic locale would order differently
        (SQLite's collation is binary already)."""
        return expr.collate("C")

    def lower_problem(self, conn: Connection) -> str | None:
        """lower() depends on the database's LC_CTYPE (and locale provider): C lowers ASCII only,
        tr_TR lowers 'I' to 'ı', ICU applies the full mapping, another libc may have other Unicode
        tables. Ask it to lower every cased character once and compare with :meth:`lower_value`."""
        probe = _probe_text()
        row = conn.exec_driver_sql(
            "SELECT lower(%(probe)s), d.datctype, to_jsonb(d) ->> 'datlocprovider' FROM pg_database d"
            " WHERE d.datname = current_database()", {"probe": probe}).one()
        lowered, ctype, provider = row
        expected = lower_simple(probe)
        if lowered == expected:
            return None
        provider = {"c": "libc", "i": "ICU", "b": "builtin"}.get(provider, provider or "libc")
        sample = next(((c, a, b) for c, a, b in zip(probe, lowered, expected, strict=False) if a != b), None)
        example = f"; e.g. lower({sample[0]!r}) is {sample[1]!r}, not {sample[2]!r}" if sample else ""
        return f"LC_CTYPE {ctype!r} ({provider}){example}"

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
    (so a leader that lost its session cannot write).

    A connection that broke on the ingester's side only (a network path lost, a firewall's state
    dropped) leaves the server's session alive, idle, with the lock, until the server's own TCP
    keepalive ends it (two hours by default): the ingester, connected again, would wait for its
    own dead session. So the lock remembers the session that took it (server pid and start), and
    while the lock is refused ends that session, only that one: the ingester dropped it already."""

    SQL = ("SELECT pg_try_advisory_lock(hashtext('sgcache-ingest:' || current_database()"
           " || ':' || current_schema())), pg_backend_pid(),"
           " (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())")
    END_SQL = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = :pid AND backend_start = :start"

    def __init__(self) -> None:
        #: (server pid, backend_start) of the session that took the lock last
        self._session: tuple[int, Any] | None = None

    def acquire(self, conn: Connection) -> bool:
        with conn.begin():
            taken, pid, start = conn.exec_driver_sql(self.SQL).one()
        if taken:
            self._session = (pid, start)
            return True
        if self._session is not None and self._session[0] != pid:
            self._end_lost_session(conn, *self._session)
        return False

    def _end_lost_session(self, conn: Connection, pid: int, start: Any) -> None:
        """End this process's previous session (``pid`` started at ``start``) if the server still has it."""
        try:
            with conn.begin():
                ended = conn.execute(sa.text(self.END_SQL), {"pid": pid, "start": start}).scalar()
        except sa.exc.DBAPIError as exc:  # not allowed to: wait for the server to end it
            log.warning("cannot end this ingester's previous session (server pid %s): %s", pid, exc)
            self._session = None
            return
        if ended:
            log.warning("ended this ingester's previous session (server pid %s), lost on this side but "
                        "still holding the leader lock", pid)

    def release_session(self, conn: Connection) -> None:
        try:
            with conn.begin():
                conn.exec_driver_sql("SELECT pg_advisory_unlock_all()")
        except sa.exc.SQLAlchemyError:
            pass  # the session is gone (or busy): its lock goes with it, once its process has exited
