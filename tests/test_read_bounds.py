"""What one read may cost: a slow or huge read passes with its own reason and never opens the
database breaker for the other clients (the service, no proxy)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from cache.errors import Passthrough
from cache.proxy.breaker import BREAKER_FAILURES
from cache.proxy.service import CacheService
from cache.read import ReadBudget, Reader, ReplicaState
from cache.replica.dialect import classify_error
from cache.replica.schema import Schema
from cache.replica.store import Store
from cache.wire import wire_from_epoch

from .paths import BASIC_SCHEMA

N_SHOTS = 3000


def shots(store: Store, n: int) -> list[dict[str, Any]]:
    """Complete Shot records (every cached field)."""
    blank = dict.fromkeys(store.schema.entities["Shot"].fields)
    return [{**blank, "id": i, "code": f"sh{i:05d}", "sg_cut_in": 1000 + i, "description": "a shot " * 20}
            for i in range(1, n + 1)]


@pytest.fixture
def service(db_url: str) -> Iterator[CacheService]:
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    with store.engine.begin() as conn:
        store.write_entities(conn, "Shot", shots(store, N_SHOTS), "scan", complete=True)
        store.mark_primed(conn, "Shot")
    store.dispose()
    svc = CacheService(db_url, BASIC_SCHEMA, max_lag=0)
    yield svc
    svc.close()


def args(filters: Any, **extra: Any) -> dict[str, Any]:
    out = {"type": "Shot", "return_fields": ["code"], "return_only": "active", "filters": filters,
           "paging": {"entities_per_page": 50, "current_page": 1}, "return_paging_info": False}
    out.update(extra)
    return out


def slow_filters() -> dict[str, Any]:
    """300 case-insensitive 'contains' tests on each of 3,000 rows: far more than 20 ms."""
    return {"logical_operator": "or", "conditions": [
        {"path": "description", "relation": "contains", "values": [f"no such text {i}"]} for i in range(300)]}


BUDGET = 0.02


SMALL = args({"logical_operator": "and", "conditions": [{"path": "id", "relation": "is", "values": [7]}]})


def test_budget_stops_a_slow_statement_in_the_database(service: CacheService) -> None:
    """The database itself stops the statement (PostgreSQL statement_timeout, SQLite progress
    handler): the read passes as slow-read, caused by the database's error."""
    reader: Reader = service.reader
    params = args(slow_filters(), return_paging_info=True)
    with service.store.engine.connect() as conn:
        replica_state = ReplicaState(service.store.primed_fields(conn))
        with pytest.raises(Passthrough) as info:
            reader.read(conn, params, replica_state, ReadBudget(BUDGET))
    assert info.value.reason == "slow-read"
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError), "the database should have stopped it"
    # without a budget the same read completes (it is slow, not wrong)
    with service.store.engine.connect() as conn:
        result = reader.read(conn, params, replica_state)
    assert result["entities"] == [] and result["paging_info"]["entity_count"] == 0


def test_budget_stops_raw_sql_too(service: CacheService) -> None:
    """The mechanism alone, on a statement that would run for minutes."""
    endless = ("SELECT pg_sleep(120)" if service.store.dialect.name == "postgresql" else
               "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c "
               "WHERE x < 10000000000")
    budget = ReadBudget(BUDGET)
    with service.store.engine.connect() as conn, pytest.raises(Passthrough) as info, budget.watching(conn):
        budget.before_statement(conn)
        conn.exec_driver_sql(endless).all()
    assert info.value.reason == "slow-read" and budget.spent


def test_connection_is_clean_after_a_stopped_read(service: CacheService) -> None:
    """The progress handler / statement_timeout of a stopped read does not stick to the pooled connection."""
    with service.store.engine.connect() as conn:
        replica_state = ReplicaState(service.store.primed_fields(conn))
        with pytest.raises(Passthrough):
            service.reader.read(conn, args(slow_filters()), replica_state, ReadBudget(BUDGET))
    with service.store.engine.connect() as conn:
        result = service.reader.read(conn, args(slow_filters()), replica_state)
    assert result["entities"] == []


def test_slow_and_huge_reads_never_open_the_breaker(service: CacheService) -> None:
    service.read_budget = BUDGET
    huge = args({"logical_operator": "and", "conditions": [
        {"path": "sg_sequence", "relation": "in", "values": [{"type": "Sequence", "id": i} for i in range(9_000)]}]})
    reasons = []
    for _ in range(BREAKER_FAILURES + 2):
        with pytest.raises(Passthrough) as info:
            service.read(args(slow_filters()))
        reasons.append(info.value.reason)
        service.read_budget = 5.0
        service.read(huge)  # a 9,000-link in-list is answered (one bound parameter), not a failure
        with pytest.raises(Passthrough, match="too-large"):  # 30,000 links: SG's to answer
            service.read(args({"logical_operator": "and", "conditions": [
                {"path": "id", "relation": "in", "values": list(range(30_000))}]}))
        service.read_budget = BUDGET
    assert reasons == ["slow-read"] * (BREAKER_FAILURES + 2)
    assert service.breaker.failures == 0
    assert service.read(SMALL)["entities"] == [{"type": "Shot", "id": 7, "code": "sh00007"}]


@pytest.mark.parametrize(("error", "reason", "trips"), [
    (sqlite3.OperationalError("Expression tree is too large (maximum depth 1000)"), "too-large", False),
    (sqlite3.OperationalError("too many SQL variables"), "too-large", False),
    (sqlite3.OperationalError("string or blob too big"), "too-large", False),
    (sqlite3.OperationalError("LIKE or GLOB pattern too complex"), "too-large", False),  # a long 'contains'
    (sqlite3.OperationalError("database is locked"), "db-error", True),
    (sqlite3.OperationalError("unable to open database file"), "db-error", True),
])
def test_classify_sqlite(error: Exception, reason: str, trips: bool) -> None:
    wrapped = sa.exc.OperationalError("SELECT 1", {}, error)
    assert classify_error(wrapped) == (reason, trips)


def test_classify_postgresql_codes() -> None:
    class PgError(Exception):
        def __init__(self, pgcode: str):
            super().__init__(f"pg error {pgcode}")
            self.pgcode = pgcode

    assert classify_error(sa.exc.OperationalError("q", {}, PgError("57014"))) == ("slow-read", False)
    assert classify_error(sa.exc.OperationalError("q", {}, PgError("54001"))) == ("too-large", False)
    assert classify_error(sa.exc.OperationalError("q", {}, PgError("08006"))) == ("db-error", True)


@pytest.mark.parametrize("condition", [
    {"path": "code", "relation": "is", "values": ["sh00007\x00x"]},
    {"path": "code", "relation": "contains", "values": ["sh00007\x00zzz"]},  # SQLite's LIKE stops at NUL
    {"path": "code", "relation": "in", "values": [f"sh{i:05d}\x00" for i in range(40)]},
    {"path": "description", "relation": "starts_with", "values": ["a\x00"]},
])
def test_nul_in_a_filter_passes_and_never_opens_the_breaker(service: CacheService, condition: Any) -> None:
    """PostgreSQL refuses NUL in text, SQLite reads text up to it: the read is SG's to answer."""
    for _ in range(BREAKER_FAILURES + 1):
        with pytest.raises(Passthrough, match="filter-value"):
            service.read(args({"logical_operator": "and", "conditions": [condition]}))
    assert service.breaker.failures == 0
    assert service.read(SMALL)["entities"] == [{"type": "Shot", "id": 7, "code": "sh00007"}]


@pytest.mark.parametrize("condition", [
    {"path": "id", "relation": "is", "values": [2**63]},  # PostgreSQL found no row, SQLite refused it
    {"path": "id", "relation": "in", "values": [7, 2**64]},  # PostgreSQL answered Shot 7 alone
    {"path": "sg_cut_in", "relation": "between", "values": [-(2**63) - 1, 5]},
    {"path": "code", "relation": "is", "values": ["\ud800"]},  # JSON's lone surrogate: not UTF-8
    {"path": "code", "relation": "in", "values": ["sh00007", "x\udfff"]},
])
def test_values_no_database_takes_pass_and_never_open_the_breaker(service: CacheService, condition: Any) -> None:
    """An integer past 64 bits or a lone surrogate: no column holds it and the driver cannot send it;
    SG's answer (no row? an error?) is not known, so the read is SG's to answer, the same on both
    databases, and the breaker is not touched."""
    for _ in range(BREAKER_FAILURES + 1):
        with pytest.raises(Passthrough, match="filter-value"):
            service.read(args({"logical_operator": "and", "conditions": [condition]}))
    assert service.breaker.failures == 0
    assert service.read(SMALL)["entities"] == [{"type": "Shot", "id": 7, "code": "sh00007"}]


def test_classify_nul_refused_by_psycopg2() -> None:
    """psycopg2 refuses a NUL in a text value before the database sees it: the value's trouble."""
    assert classify_error(ValueError("A string literal cannot contain NUL (0x00) characters.")) == \
        ("db-query-error", False)


def test_stale_and_fresh_are_logged_once_per_change(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    with store.engine.begin() as conn:
        store.write_entities(conn, "Shot", shots(store, 3), "scan", complete=True)
        store.mark_primed(conn, "Shot")
    svc = CacheService(db_url, BASIC_SCHEMA, max_lag=5)
    caplog.set_level(logging.INFO, logger="sgcache.service")

    def beat(age: float) -> None:
        stamp = (datetime.now(UTC) - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
        with store.engine.begin() as conn:
            store.set_state(conn, "ingester_heartbeat", stamp)
        svc._cached_state = None  # as after REPLICA_STATE_TTL

    def lines(word: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if f"replica {word}" in r.getMessage()]

    try:
        for _ in range(3):
            with pytest.raises(Passthrough, match="stale"):
                svc.read(SMALL)
        assert [r.levelno for r in lines("stale")] == [logging.WARNING]
        beat(0)
        for _ in range(3):
            svc.read(SMALL)
        assert [r.levelno for r in lines("fresh")] == [logging.INFO]
        beat(60)
        for _ in range(3):
            with pytest.raises(Passthrough, match="stale"):
                svc.read(SMALL)
        assert len(lines("stale")) == 2 and len(lines("fresh")) == 1
    finally:
        svc.close()
        store.dispose()



def test_the_heartbeat_is_aged_by_the_database_s_clock(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ingester stamps its heartbeat with the database server's clock (tests/test_events.py);
    the proxy ages it by that clock too, not by its own host's: with a proxy host ten minutes
    behind the database's (a server without NTP), a heartbeat ten minutes old by the database's
    clock was "from the future" to the proxy, so a dead ingester's replica went on being served."""
    import cache.ops.status as statusmod
    import cache.proxy.service as servicemod

    store = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    with store.engine.begin() as conn:
        store.write_entities(conn, "Shot", shots(store, 3), "scan", complete=True)
        store.mark_primed(conn, "Shot")
    ahead = 600.0
    monkeypatch.setattr(servicemod, "db_clock", lambda conn: time.time() + ahead)  # the database's clock
    svc = CacheService(db_url, BASIC_SCHEMA, max_lag=5)

    def beat(seconds_ago: float) -> None:  # stamped as the ingester does: the database's clock
        with store.engine.begin() as conn:
            store.set_state(conn, "ingester_heartbeat", wire_from_epoch(time.time() + ahead - seconds_ago))
        svc._cached_state = None  # as after REPLICA_STATE_TTL

    try:
        beat(1)
        svc.read(SMALL)
        assert svc.info()["lag_seconds"] == pytest.approx(1, abs=4)  # (a busy machine's seconds)
        beat(ahead)  # ten minutes old by the database's clock, "now" by this host's
        with pytest.raises(Passthrough, match="stale"):
            svc.read(SMALL)
        # the status page, /healthz and the lag metric age it the same way
        monkeypatch.setattr(statusmod, "db_clock", lambda conn: time.time() + ahead)
        status = statusmod.ReplicaStatus()
        with store.engine.connect() as conn:
            statusmod._read_state(store, conn, status, False)
        assert status.heartbeat_age == pytest.approx(ahead, abs=5)
    finally:
        svc.close()
        store.dispose()

def test_a_slow_request_repeated_passes_without_touching_the_database(service: CacheService) -> None:
    reader = service.reader
    with service.store.engine.connect() as conn:
        replica_state = ReplicaState(service.store.primed_fields(conn))
        with pytest.raises(Passthrough) as first:
            reader.read(conn, args(slow_filters()), replica_state, ReadBudget(BUDGET))
        assert isinstance(first.value.__cause__, sa.exc.DBAPIError)
        budget = ReadBudget(BUDGET)
        with pytest.raises(Passthrough) as again:
            reader.read(conn, args(slow_filters()), replica_state, budget)
        assert again.value.reason == "slow-read" and "recently" in again.value.detail
        assert not budget.spent  # it never ran
        # another request is not affected, and the memory expires
        assert reader.read(conn, SMALL, replica_state, ReadBudget(5.0))["entities"][0]["id"] == 7
        reader._slow.clear()
        with pytest.raises(Passthrough) as later:
            reader.read(conn, args(slow_filters()), replica_state, ReadBudget(BUDGET))
        assert isinstance(later.value.__cause__, sa.exc.DBAPIError)


@pytest.mark.parametrize("relation", ["is", "in", "greater_than"])
def test_a_number_beyond_64_bits_passes_as_that_reads_trouble(service: CacheService, relation: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """SQLite's driver refuses such a number (OverflowError) and PostgreSQL compared it as a numeric
    (no row holds it): whether SG finds no row or refuses it is not known, so the read passes on both
    (SG answers it), the breaker counts nothing, and no traceback is logged for it."""
    from cache.proxy.reads import read_encoded
    big = args({"logical_operator": "and", "conditions": [{"path": "sg_cut_in", "relation": relation,
                                                            "values": [2**70]}]})
    with caplog.at_level(logging.INFO), pytest.raises(Passthrough) as passed:
        read_encoded(service, big, False)
    assert passed.value.reason == "filter-value"
    assert service.breaker.failures == 0
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged for the client's number"
    assert service.read(SMALL)["entities"] == [{"type": "Shot", "id": 7, "code": "sh00007"}]
