"""cache/dialect: each operation of the SQLite/PostgreSQL interface, on the backend under test."""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cache.config import open_bound_store
from cache.errors import Passthrough
from cache.replica import dialect as dialects
from cache.replica.dialect import (
    POSTGRESQL,
    SQLITE,
    FileLock,
    LockHeld,
    NoLock,
    PgAdvisoryLock,
    classify_error,
    dialect_for,
    engine_options,
    leader_lock_for,
    normalize_url,
    sqlite_path,
)
from cache.replica.schema import Schema
from cache.replica.store import Store

from .paths import BASIC_SCHEMA

metadata = sa.MetaData()
items = sa.Table(
    "t_items", metadata,
    sa.Column("k", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text),
    sa.Column("n", sa.Float),
)
numbered = sa.Table("t_numbered", metadata, sa.Column("seq", dialects.sequence_key_type(), primary_key=True),
                    sa.Column("v", sa.Text))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = dialect_for(db_url).create_engine(db_url)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def _is_sqlite(backend: str) -> bool:
    return backend == "sqlite"


# -- choosing the dialect ------------------------------------------------------------------
def test_dialect_for_urls_engines_and_connections(engine: Engine, backend: str) -> None:
    assert dialect_for("sqlite:///x.db") is SQLITE and dialect_for("sqlite://") is SQLITE
    for url in ("postgresql://u@h/d", "postgres://u@h/d", "postgresql+psycopg2://u@h/d"):
        assert dialect_for(url) is POSTGRESQL
    assert dialect_for(sa.engine.make_url("sqlite://")) is SQLITE
    expected = SQLITE if _is_sqlite(backend) else POSTGRESQL
    assert dialect_for(engine) is expected and dialect_for(expected) is expected
    with engine.connect() as conn:
        assert dialect_for(conn) is expected
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        dialect_for("mysql://u@h/d")
    assert str(expected) == backend and expected.name == backend


def test_normalize_url_picks_psycopg2() -> None:
    assert normalize_url("postgresql://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert normalize_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_store_dialect(db_url: str, backend: str) -> None:
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    try:
        assert store.dialect is dialect_for(db_url) and store.dialect.name == backend
    finally:
        store.dispose()


# -- engines -------------------------------------------------------------------------------
def test_database_file_and_sqlite_path(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    assert SQLITE.database_file(f"sqlite:///{path}") == str(path)
    assert sqlite_path("sqlite:///rel.db") == str(Path("rel.db").resolve())
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:r.db?mode=ro&uri=true",
                f"sqlite:///{path}?uri=true", "postgresql://u@h/d", "not a url"):
        assert sqlite_path(url) is None, url
    assert POSTGRESQL.database_file("postgresql://u@h/d") is None


def test_sqlite_connections_have_a_larger_page_cache(tmp_path: Path) -> None:
    """Reader, writer and inline engines alike (docs/scale.md: a page read at a million rows)."""
    from cache.replica.dialect.sqlite import CACHE_KIB

    url = f"sqlite:///{tmp_path / 'r.db'}"
    reader = SQLITE.create_engine(url)
    engines = [reader, SQLITE.write_engine(reader), SQLITE.inline_engine(reader)]
    try:
        for engine in engines:
            assert engine is not None
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -CACHE_KIB
    finally:
        for engine in engines:
            if engine is not None:
                engine.dispose()


def test_sqlite_writer_engine_takes_the_write_lock_at_begin(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    reader, writer = SQLITE.create_engine(url), SQLITE.create_engine(url, writer=True)
    try:
        metadata.create_all(reader)
        with writer.connect() as held, held.begin():  # no statement yet: BEGIN IMMEDIATE alone
            with reader.connect() as other:
                other.exec_driver_sql("PRAGMA busy_timeout=0")
                with pytest.raises(sa.exc.OperationalError, match="locked"):
                    other.execute(items.insert().values(k=1))
        with reader.connect() as plain, plain.begin():  # a reader's transaction takes no lock
            plain.execute(sa.select(items)).all()
            with writer.begin() as w:
                w.execute(items.insert().values(k=2))
    finally:
        reader.dispose()
        writer.dispose()


def test_scripts_open_a_writer_store(tmp_path: Path, db_url: str, backend: str) -> None:
    """scripts/scan, ingest-events and reprocess open the replica with open_bound_store: on SQLite
    every transaction of the store's engine begins IMMEDIATE, whatever the script forgets."""
    store = open_bound_store(db_url, Schema.load(BASIC_SCHEMA), None)
    try:
        assert store.write_engine is store.engine
        if not _is_sqlite(backend):
            return
        with store.engine.connect() as held, held.begin():
            other = SQLITE.create_engine(db_url)
            try:
                with other.connect() as conn:
                    conn.exec_driver_sql("PRAGMA busy_timeout=0")
                    with pytest.raises(sa.exc.OperationalError, match="locked"):
                        store.set_state(conn, "probe", 1)
            finally:
                other.dispose()
    finally:
        store.dispose()


def test_write_engine(db_url: str, backend: str) -> None:
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    memory = SQLITE.create_engine("sqlite://")
    try:
        if _is_sqlite(backend):
            assert store.write_engine is not store.engine  # readers keep a lock-free engine
            with store.write_engine.begin() as conn:
                store.set_state(conn, "probe", 1)
        else:
            assert store.write_engine is store.engine
        assert SQLITE.write_engine(memory) is memory  # nothing else can reach it
    finally:
        store.dispose()
        memory.dispose()


def test_engine_options() -> None:
    assert engine_options("postgresql://u@h/d")["executemany_mode"] == "values_plus_batch"
    assert engine_options("sqlite:///x.db") == {}
    assert POSTGRESQL.proxy_engine_options()["connect_args"]["connect_timeout"] == 3
    assert SQLITE.proxy_engine_options() == {}


def test_the_ingesters_connections_notice_a_vanished_database_host(db_url: str, backend: str) -> None:
    """A host gone mid-statement answers nothing, not even a reset: only TCP keepalives end the wait
    (the kernel's own start after two hours). The ingester's sockets probe after 10 s idle."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's connections")
    engine = sa.create_engine(normalize_url(db_url), **engine_options(db_url))
    try:
        with engine.connect() as conn:
            fd = conn.connection.dbapi_connection.fileno()
            with socket.socket(fileno=os.dup(fd)) as sock:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    finally:
        engine.dispose()


def test_guard_proxy(tmp_path: Path, db_url: str, backend: str) -> None:
    if not _is_sqlite(backend):
        engine = POSTGRESQL.create_engine(db_url)
        try:
            check = POSTGRESQL.guard_proxy(engine, engine)
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "10s"
                check(conn)
        finally:
            engine.dispose()
        return
    path = tmp_path / "guarded.db"
    url = f"sqlite:///{path}"
    engine = SQLITE.create_engine(url)
    write = SQLITE.write_engine(engine)
    try:
        metadata.create_all(engine)
        check = SQLITE.guard_proxy(engine, write)
        with engine.connect() as conn:
            check(conn)
            path.rename(tmp_path / "moved.db")
            with pytest.raises(sqlite3.OperationalError, match="moved, removed or made unreadable"):
                check(conn)
        engine.dispose()
        write.dispose()
        for each in (engine, write):
            with pytest.raises(sa.exc.OperationalError, match="is missing"):
                each.connect()
        assert not path.exists()  # never created anew
    finally:
        engine.dispose()
        write.dispose()


def test_leader_locks(tmp_path: Path, db_url: str, backend: str) -> None:
    engine = dialect_for(db_url).create_engine(db_url)
    try:
        lock = leader_lock_for(engine)
        if _is_sqlite(backend):
            assert isinstance(lock, FileLock) and str(lock.path) == engine.url.database + ".ingest.lock"
            assert lock.acquire(None)  # type: ignore[arg-type]
            with pytest.raises(LockHeld, match="only one may run on SQLite"):
                FileLock(lock.path).acquire(None)  # type: ignore[arg-type]
            lock.release()
            assert FileLock(lock.path).acquire(None)  # type: ignore[arg-type]
        else:
            assert isinstance(lock, PgAdvisoryLock)
            with engine.connect() as first, engine.connect() as second:
                assert lock.acquire(first)
                assert not PgAdvisoryLock().acquire(second)
    finally:
        engine.dispose()
    memory = SQLITE.create_engine("sqlite://")
    assert isinstance(leader_lock_for(memory), NoLock)
    memory.dispose()


# -- SQL -----------------------------------------------------------------------------------
def test_upsert(engine: Engine) -> None:
    dialect = dialect_for(engine)
    with engine.begin() as conn:
        conn.execute(dialect.upsert(items, ["k"], ["name"]), [{"k": 1, "name": "a", "n": 1.0}])
        conn.execute(dialect.upsert(items, ["k"], ["k", "name"]), [{"k": 1, "name": "b", "n": 2.0},
                                                                   {"k": 2, "name": "c", "n": 3.0}])
        conn.execute(dialect.upsert(items, ["k"]), [{"k": 2, "name": "ignored", "n": 9.0},
                                                    {"k": 3, "name": "d", "n": 4.0}])
        rows = conn.execute(sa.select(items).order_by(items.c.k)).all()
    # an update sets the named columns only (n kept); without columns, existing rows stay
    assert [tuple(r) for r in rows] == [(1, "b", 1.0), (2, "c", 3.0), (3, "d", 4.0)]


def test_insert_and_greatest(engine: Engine) -> None:
    dialect = dialect_for(engine)
    stmt = dialect.insert(items)
    stmt = stmt.on_conflict_do_update(index_elements=["k"], set_={"n": dialect.greatest(stmt.excluded.n, items.c.n)})
    with engine.begin() as conn:
        for n in (5.0, 3.0, 7.0):
            conn.execute(stmt, [{"k": 1, "name": "x", "n": n}])
        assert conn.execute(sa.select(items.c.n)).scalar_one() == 7.0


def test_sequence_key(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(numbered.insert(), [{"v": "a"}, {"v": "b"}])
        assert conn.execute(sa.select(numbered.c.seq).order_by(numbered.c.seq)).scalars().all() == [1, 2]


def test_clock(engine: Engine) -> None:
    with engine.connect() as conn:
        first = dialect_for(conn).clock(conn)
        second = dialect_for(conn).clock(conn)
    assert abs(first - time.time()) < 5 and second >= first


def test_lower_and_codepoint_order(engine: Engine) -> None:
    dialect = dialect_for(engine)
    words = ["b", "B", "a", "é", "Z", "École", "ÀB"]
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"k": i, "name": w} for i, w in enumerate(words)])
        lowered = conn.execute(sa.select(dialect.lower(items.c.name)).order_by(items.c.k)).scalars().all()
        ordered = conn.execute(sa.select(items.c.name).order_by(dialect.codepoint_order(items.c.name))).scalars().all()
    assert lowered == ["b", "b", "a", "é", "z", "école", "àb"]
    assert ordered == sorted(words)


@pytest.mark.parametrize(("storage", "values", "column"), [
    ("int", list(range(0, 80, 2)), "k"),
    ("text", [f"n{i}" for i in range(0, 80, 2)], "name"),
    ("float", [i / 2 for i in range(0, 80, 2)], "n"),
])
def test_bound_in(engine: Engine, storage: str, values: list, column: str) -> None:
    dialect = dialect_for(engine)
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"k": i, "name": f"n{i}", "n": i / 2} for i in range(60)])
        found = conn.execute(sa.select(items.c.k).where(dialect.bound_in(items.c[column], values, storage))
                             .order_by(items.c.k)).scalars().all()
    assert found == list(range(0, 60, 2))


def test_bound_in_refuses(engine: Engine, backend: str) -> None:
    dialect = dialect_for(engine)
    with pytest.raises(Passthrough, match="long in list of json"):
        dialect.bound_in(items.c.name, ["a"] * 40, "json")
    if _is_sqlite(backend):
        with pytest.raises(Passthrough, match="NUL"):
            dialect.bound_in(items.c.name, ["a\x00"] * 40, "text")
        with pytest.raises(Passthrough, match="finite"):
            dialect.bound_in(items.c.n, [math.nan] * 40, "float")


def test_lock_writes(engine: Engine, backend: str) -> None:
    dialect = dialect_for(engine)
    with engine.connect() as first, first.begin():
        dialect.lock_writes(first)
        if _is_sqlite(backend):
            return  # nothing to take: SQLite writers are serial (BEGIN IMMEDIATE)
        with engine.connect() as second, second.begin():
            second.exec_driver_sql("SET LOCAL lock_timeout = '100ms'")
            with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
                dialect.lock_writes(second)
    with engine.connect() as again, again.begin():
        dialect.lock_writes(again)  # released with the first transaction


SLOW_SQL = {"sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c",
            "postgresql": "SELECT pg_sleep(30)"}


def test_a_slow_statement_is_stopped(engine: Engine, backend: str) -> None:
    dialect = dialect_for(engine)
    deadline = time.monotonic() + 0.2
    started = time.monotonic()
    with engine.connect() as conn:
        with dialect.interrupting(conn, lambda: time.monotonic() > deadline):
            conn.begin()
            dialect.limit_statement(conn, 0.2)
            with pytest.raises(sa.exc.DBAPIError) as caught:
                conn.exec_driver_sql(SLOW_SQL[backend])
        conn.rollback()
        assert dialect.timed_out(caught.value) is (not _is_sqlite(backend))
        assert classify_error(caught.value)[1] is (_is_sqlite(backend))  # SQLite: "interrupted" (ReadBudget.spent)
        conn.exec_driver_sql("SELECT 1")  # the handler is gone, the connection usable
    assert time.monotonic() - started < 10


def test_classify_errors_of_the_backend(engine: Engine) -> None:
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as caught:
        conn.exec_driver_sql("SELECT * FROM no_such_table_here")
    assert classify_error(caught.value) == ("missing-table", False)


# -- PostgreSQL: round trips a learnt write and a read no longer pay --------------------------
def _postgresql_only(backend: str) -> None:
    if _is_sqlite(backend):
        pytest.skip("PostgreSQL's pool, write lock and clock")


def test_a_connection_is_pinged_only_after_being_idle(db_url: str, backend: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection used within the last second is taken as it is; one idle longer is pinged, and
    replaced without an error when the server ended it meanwhile."""
    _postgresql_only(backend)
    from cache.replica.dialect import postgresql

    engine = POSTGRESQL.create_engine(db_url, pool_size=1, max_overflow=0)
    pings: list[int] = []
    real_ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: pings.append(1) or real_ping(conn))
    clock = [1000.0]
    monkeypatch.setattr(postgresql.time, "monotonic", lambda: clock[0])
    try:
        with engine.connect() as conn:  # new: not pinged
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        clock[0] += 0.5
        with engine.connect() as conn:  # used half a second ago: not pinged
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid
        assert pings == []
        with sa.create_engine(normalize_url(db_url), poolclass=sa.pool.NullPool).connect() as killer:
            killer.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        clock[0] += 2.0
        with engine.connect() as conn:  # idle two seconds: pinged, found dead, replaced
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
        assert pings == [1]
    finally:
        engine.dispose()


def test_the_write_lock_is_taken_once_per_transaction(db_url: str, backend: str) -> None:
    _postgresql_only(backend)
    from cache.replica.dialect.postgresql import WRITE_LOCK_SQL

    engine = POSTGRESQL.create_engine(db_url)
    sent: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        for _ in range(2):
            with engine.begin() as conn:
                POSTGRESQL.lock_writes(conn)
                POSTGRESQL.lock_writes(conn)
                held = conn.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                            " AND pid = pg_backend_pid()").scalar()
                assert held == 1
        assert sent.count(WRITE_LOCK_SQL) == 2  # once in each transaction
        sent.clear()
        with engine.begin() as conn:  # taken in a savepoint rolled back: let go, so taken again
            savepoint = conn.begin_nested()
            POSTGRESQL.lock_writes(conn)
            savepoint.rollback()
            held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            assert conn.exec_driver_sql(held).scalar() == 0
            POSTGRESQL.lock_writes(conn)
            assert conn.exec_driver_sql(held).scalar() == 1
            with conn.begin_nested():  # held outside any savepoint: not asked again inside one
                POSTGRESQL.lock_writes(conn)
        assert sent.count(WRITE_LOCK_SQL) == 2
    finally:
        engine.dispose()


def test_a_state_read_under_the_write_lock_sees_what_the_holder_committed(db_url: str, backend: str) -> None:
    """PostgreSQL sends the lock and the read as one query string: the read's snapshot is still
    taken once the lock is held, so a value committed while it waited is what it reads."""
    _postgresql_only(backend)
    import threading

    from cache.replica.dialect.postgresql import WRITE_LOCK_SQL

    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    sent: list[str] = []
    sa.event.listen(store.write_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        with store.write_engine.begin() as conn:
            store.set_state(conn, "probe", 1)
        got: list[object] = []
        holder = store.write_engine.connect()
        holder.begin()
        POSTGRESQL.lock_writes(holder)
        store.set_state(holder, "probe", 2)

        def waiter() -> None:
            with store.write_engine.begin() as conn:
                got.append(store.locked_state(conn, "probe"))
                got.append(store.locked_state(conn, "probe"))  # held now: a plain read

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
        assert got == []  # waiting for the lock
        holder.commit()
        holder.close()
        thread.join(10)
        assert got == [2, 2]
        both = [sql for sql in sent if sql.startswith(WRITE_LOCK_SQL) and "sgcache_state" in sql]
        assert len(both) == 1 and sent.count(WRITE_LOCK_SQL) == 1  # the holder's lock alone
    finally:
        store.dispose()


def test_a_learnt_write_reads_the_mark_the_learned_pairs_and_the_rows_written_in_one_statement(
        db_url: str, backend: str) -> None:
    """The ingester's mark, every learned pair and the rows proxies wrote after a change-log mark,
    told apart in one result (the state's row has no field name), under the write lock; no state
    row reads as None."""
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    sent: list[str] = []
    sa.event.listen(store.write_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        with store.write_engine.begin() as conn:
            assert store.locked_state_pairs_written(conn, "probe", 0) == (None, [], set())
        with store.write_engine.begin() as conn:
            store.set_state(conn, "probe", {"high": 7})
            conn.execute(store.pairs_table.insert(), [
                {"entity_type": "Shot", "field_name": "assets", "other_type": "Asset", "other_field": "shots"},
                {"entity_type": "Asset", "field_name": "shots", "other_type": "Shot", "other_field": "assets"}])
            store.set_retired(conn, "Shot", 12, True, "proxy")  # a proxy wrote Shot 12 (no row: only its record)
            mark = store.change_mark(conn)
            store.set_retired(conn, "Shot", 13, True, "proxy")
            store.set_retired(conn, "Asset", 14, True, "scan")  # not a proxy's
        sent.clear()
        with store.write_engine.begin() as conn:
            value, learned, written = store.locked_state_pairs_written(conn, "probe", mark)
        assert value == {"high": 7}
        assert sorted(learned) == [("Asset", "shots", "Shot", "assets"), ("Shot", "assets", "Asset", "shots")]
        assert written == {("Shot", 13)}
        assert len(sent) == (1 if backend == "postgresql" else 2)  # SQLite takes its lock apart
        assert "sgcache_pairs" in sent[-1] and "sgcache_state" in sent[-1] and "sgcache_changes" in sent[-1]
        with store.engine.connect() as conn:
            assert store.state_and_mark(conn, "probe") == ({"high": 7}, store.change_mark(conn))
            assert store.state_and_mark(conn, "absent") == (None, store.change_mark(conn))
    finally:
        store.dispose()


def test_pending_markers_take_the_servers_clock_in_their_own_statement(db_url: str, backend: str) -> None:
    from cache.replica import pending

    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    inserts: list[str] = []
    sa.event.listen(store.write_engine, "before_cursor_execute",
                    lambda *a: inserts.append(a[2]) if "INSERT INTO sgcache_pending" in a[2] else None)
    try:
        with store.write_engine.begin() as conn:
            before = pending.db_clock(conn)
            pending.mark(conn, store.pending, [("Shot", "code"), ("Shot", "sg_status_list")])
            after = pending.db_clock(conn)
            rows = conn.execute(sa.select(store.pending.c.at)).scalars().all()
        assert len(rows) == 2 and all(before <= at <= after for at in rows)
        assert len(inserts) == 1  # one statement for both markers (one round trip)
        with store.write_engine.begin() as conn:  # many: in chunks, an older time never replaces a newer
            conn.execute(sa.update(store.pending).values(at=store.pending.c.at + 3600))
            kept = conn.execute(sa.select(store.pending.c.at)).scalars().all()
            pending.mark(conn, store.pending, [("Shot", "code")] + [("Type", f"f{i}") for i in range(1200)])
            assert sorted(conn.execute(sa.select(store.pending.c.at).where(
                store.pending.c.entity_type == "Shot")).scalars().all()) == sorted(kept)
            assert conn.execute(sa.select(sa.func.count()).select_from(store.pending)).scalar() == 1202
        assert len(inserts) == 1 + 3
        expression = store.dialect.clock_expression()
        assert (expression is None) == _is_sqlite(backend)
    finally:
        store.dispose()


def test_a_sqlite_install_needs_no_psycopg2(tmp_path: Path) -> None:
    """psycopg2 comes with the ``postgres`` extra: without it every module imports and a SQLite
    replica answers a read through the proxy's service (its reads, kept answers and versions)."""
    import subprocess
    import sys

    store = Store.open(f"sqlite:///{tmp_path / 'r.db'}", Schema.load(BASIC_SCHEMA))
    blank = dict.fromkeys(store.schema.entities["Shot"].fields)
    with store.engine.begin() as conn:
        store.write_entities(conn, "Shot", [{**blank, "id": 7, "code": "sh007"}], "scan", complete=True)
        store.mark_primed(conn, "Shot")
    store.dispose()
    code = f"""
import importlib, pkgutil, sys
sys.modules["psycopg2"] = None  # import psycopg2 now fails, as where it is not installed
import cache
for module in pkgutil.walk_packages(cache.__path__, "cache."):
    importlib.import_module(module.name)
import asyncio, json
from concurrent.futures import ThreadPoolExecutor
from cache.proxy.reads import Reads
from cache.proxy.service import CacheService
service = CacheService({f"sqlite:///{tmp_path / 'r.db'}"!r}, {str(BASIC_SCHEMA)!r}, max_lag=0)
args = {{"type": "Shot", "return_fields": ["code"], "return_only": "active",
        "filters": {{"logical_operator": "and", "conditions": [{{"path": "id", "relation": "is", "values": [7]}}]}},
        "paging": {{"entities_per_page": 50, "current_page": 1}}, "return_paging_info": False}}
async def twice():
    with ThreadPoolExecutor(2) as pool:
        return [await Reads(pool).answer(service, args, "client") for _ in range(2)]
for answer in asyncio.run(twice()):
    print(json.loads(answer.body)["results"]["entities"][0]["code"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["sh007", "sh007"]
